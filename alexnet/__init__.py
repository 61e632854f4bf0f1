"""AlexNet as the 2012 paper defines it (Krizhevsky, Sutskever, Hinton), on PyTorch."""

import importlib

__all__ = ["AlexNet", "LRNConfig", "ModelConfig", "build_model", "model_config"]
__version__ = "0.1.0"

# imported when first asked for: `import alexnet` alone (as the command does first) does
# not import torch, so a Ctrl-C during that second or two reaches the command's own handler
_HOME = {"AlexNet": "alexnet.model", "build_model": "alexnet.model",
         "LRNConfig": "alexnet.config", "ModelConfig": "alexnet.config", "model_config": "alexnet.config"}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'alexnet' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
