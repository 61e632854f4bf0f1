"""AlexNet as the 2012 paper defines it (Krizhevsky, Sutskever, Hinton), on PyTorch."""

from alexnet.config import LRNConfig, ModelConfig, model_config
from alexnet.model import AlexNet, build_model

__all__ = ["AlexNet", "LRNConfig", "ModelConfig", "build_model", "model_config"]
__version__ = "0.1.0"
