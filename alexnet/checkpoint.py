"""Checkpoints: weights that predict on their own, and the training state beside them.

A model file is safetensors: the weights, the data statistics (mean image, PCA eigen) as
tensors under `stats.`, and in its metadata the model config, the class names and the
preprocessing (JSON strings). Nothing in it can execute code. The training state
(optimizer, schedule, epoch, step, RNG states, sampler position) is a torch file read back
with `weights_only=True`.

Every write goes through `alexnet.fileio.atomic_write`, so a crash during a save leaves
the previous file whole.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from alexnet.config import ConfigError, ModelConfig, from_dict, to_dict
from alexnet.dataset import DataStats
from alexnet.fileio import atomic_write
from alexnet.model import AlexNet
from alexnet.progress import plural

FORMAT = "alexnet-checkpoint-2"
# Format 1 put the paper variants' dropout before fc6 and fc7 (so their
# weights sat at classifier.1 and classifier.4) and always used inverted dropout; both
# are read, and `upgrade_v1` makes them format 2 with the same outputs.
FORMAT_V1 = "alexnet-checkpoint-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why, in one line."""


@dataclass
class Checkpoint:
    """What a model file holds."""

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    classes: list[str]
    stats: DataStats | None
    preprocess: dict  # how images become inputs: {"image_size", "crop", "pixel_scale", ...}
    extra: dict  # free-form facts: epoch, step, metrics, source

    def build_model(self) -> AlexNet:
        """The network with these weights (float32). It is laid out on the meta device and
        takes the file's tensors as its own, which skips drawing 60 million random initial
        weights first (about 1.4 s of a 2-core CPU)."""
        with torch.device("meta"):
            model = AlexNet(self.model_config)
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.state_dict.items()}
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise CheckpointError(f"weights do not fit the {self.model_config.variant} network: "
                                  f"{' '.join(s.strip() for s in first[:3])}") from None
        return model


def save_model(path: str | Path, model: AlexNet, classes: list[str], stats: DataStats | None,
               preprocess: dict, extra: dict | None = None) -> None:
    """Write a model file (safetensors, written to a temporary name and renamed): the
    weights of `model` (unwrapped from DDP and torch.compile) and its config; `classes`,
    one name per output; `stats`, the training set's mean image and PCA (None: the file
    cannot preprocess images); `preprocess`, {"image_size": the shorter side images are
    rescaled to, which is the mean image's side, "crop": the network's input side,
    "pixel_scale": what the mean-subtracted pixels are divided by}; `extra`, any JSON
    object (the trainer's: epoch, step, errors, readable "class_names"). The metadata is
    checked as `load_model_file` checks it, so no file is written that could not be read
    back: a CheckpointError names the problem."""
    module = getattr(model, "module", model)  # unwrap DDP
    module = getattr(module, "_orig_mod", module)  # unwrap torch.compile
    classes, extra = list(classes), extra or {}
    _check_metadata(Path(path), module.cfg.num_classes, classes, preprocess, extra)
    if stats is not None:
        check_preprocess_fits(path, module.cfg, stats, preprocess)
    try:
        text = {"preprocess": json.dumps(preprocess), "extra": json.dumps(extra)}
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: preprocess and extra must hold JSON values only ({e})") from None
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    if stats is not None:
        tensors.update({k: v.contiguous() for k, v in stats.to_tensors().items()})
    meta = {
        "format": FORMAT,
        "model_config": json.dumps(to_dict(module.cfg)),
        "classes": json.dumps(classes),
        **text,
    }
    data = st_save(tensors, metadata=meta)
    atomic_write(path, lambda f: f.write(data))


def check_preprocess_fits(path: str | Path, cfg: ModelConfig, stats: DataStats, preprocess: dict) -> None:
    """A CheckpointError unless `preprocess` rescales images to the mean image's side and
    crops the network's input: what a model file needs to preprocess images for itself."""
    side, crop = int(stats.mean_image.shape[-1]), cfg.input_size
    if stats.mean_image.shape[-2] != side or side < crop:
        raise CheckpointError(f"{path}: the mean image is {stats.mean_image.shape[-2]}x{side}; it must be square "
                              f"and at least the network's {crop}x{crop} input")
    if (preprocess.get("image_size"), preprocess.get("crop")) != (side, crop):
        raise CheckpointError(f"{path}: preprocess must give image_size {side} (the mean image's side) and "
                              f"crop {crop} (the network's input), not {preprocess.get('image_size')!r} "
                              f"and {preprocess.get('crop')!r}")


def non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """'tensor K holds N NaN or infinite values' for the first such floating tensor, else None."""
    for k, v in tensors.items():
        if v.is_floating_point():
            bad = v.numel() - int(torch.isfinite(v).sum())
            if bad:
                return f"tensor {k} holds {plural(bad, 'NaN or infinite value')}"
    return None


def load_model_file(path: str | Path) -> Checkpoint:
    """Read and check a model file; any problem is a CheckpointError with one line."""
    path = Path(path)
    if path.is_dir():
        best = path / "best.safetensors"
        raise CheckpointError(f"{path} is a folder, not a model file"
                              + (f"; the run's best model is {best}" if best.is_file() else ""))
    if not path.is_file():
        from alexnet.fileio import not_a_file

        raise CheckpointError(not_a_file(path, "checkpoint file"))
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") in (FORMAT, FORMAT_V1):  # (another file's tensors: not read at all)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})"
                              f"{_convert_hint(path)}") from None
    if meta.get("format") not in (FORMAT, FORMAT_V1):
        what = (f"its format is {meta['format']!r}" if "format" in meta else
                "it is a prepared store's data statistics" if path.name == "stats.safetensors" and "of" in meta
                else "it has no alexnet metadata")
        raise CheckpointError(f"{path} is a safetensors file but not an alexnet model file ({what})")
    try:
        model_dict = json.loads(meta["model_config"])
        if meta["format"] == FORMAT_V1:
            model_dict, tensors = upgrade_v1(model_dict, tensors)
        cfg = from_dict(ModelConfig, model_dict)
        classes = json.loads(meta["classes"])
        preprocess = json.loads(meta["preprocess"])
        extra = json.loads(meta.get("extra", "{}"))
    except (KeyError, json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{path} has broken metadata: {e}") from None
    _check_metadata(path, cfg.num_classes, classes, preprocess, extra)
    broken = non_finite(tensors)
    if broken:
        raise CheckpointError(f"{path}: {broken}; the file is broken or its training diverged")
    stats = None
    if "stats.mean_image" in tensors:
        try:
            stats = DataStats.from_tensors(tensors)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    weights = {k: v for k, v in tensors.items() if not k.startswith("stats.")}
    for k, v in weights.items():
        if not v.is_floating_point() and not k.endswith("num_batches_tracked"):
            raise CheckpointError(f"{path}: tensor {k} has dtype {v.dtype}, expected floating point")
        if k.endswith("running_var") and bool((v < 0).any()):  # BatchNorm would compute NaN from them
            raise CheckpointError(f"{path}: tensor {k} holds {plural(int((v < 0).sum()), 'negative variance')}; "
                                  f"the file is broken")
    return Checkpoint(cfg, weights, classes, stats, preprocess, extra)


def saved_extra(path: str | Path) -> dict | None:
    """A model file's `extra` metadata (epoch, step, ...) from its header alone, without
    reading the weights; None when the file is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            extra = json.loads((f.metadata() or {}).get("extra", "{}"))
    except (SafetensorError, ValueError, OSError):
        return None
    return extra if isinstance(extra, dict) else None


def is_torch_save_head(head: bytes) -> bool:
    """Whether a file's first bytes may be torch.save's: a zip archive, or a pickle (every
    protocol from 2 on starts with its PROTO opcode)."""
    return head.startswith(b"PK") or head[:1] == b"\x80"


def is_exported_program(path: str | Path, names: list[str] | None = None) -> bool:
    """Whether `path` is a torch.export archive (`alexnet export`'s .pt2): named so, or a zip
    holding torch.export's archive_format entry (`names`: the zip's entries, where the
    caller has read them already)."""
    import zipfile

    if Path(path).suffix.lower() == ".pt2":
        return True
    if names is None:
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except Exception:  # not a zip, or a damaged one: not a program it could run
            return False
    return any(n.endswith("/archive_format") for n in names)


def _convert_hint(path: Path) -> str:
    """For a run's training state, where its model file is; for weights of another
    framework, how to make them one."""
    beside = path.with_name("model.safetensors")
    if path.name == "state.pt" and beside.is_file():
        return f"; this is a run's training state, and the model file beside it is {beside}"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return ""
    if is_exported_program(path):
        return ("; it is an exported program (torch.export), which runs without alexnet (see the README's "
                "export section): this command takes the .safetensors model file it was exported from")
    if path.suffix.lower() == ".caffemodel":
        kind = "caffe"
    elif is_torch_save_head(head) or path.suffix.lower() in (".pth", ".pt"):
        kind = "torchvision"
    else:
        return ""
    return f"; to use these weights, convert them first: alexnet convert {kind} {path} OUT.safetensors"


def _check_metadata(path: Path, num_classes: int, classes, preprocess, extra) -> None:
    """A CheckpointError unless the metadata has the types the readers take for granted:
    hand-edited or foreign files otherwise fail later with a traceback."""
    def names(value) -> bool:
        return isinstance(value, list) and len(value) == num_classes and all(isinstance(c, str) for c in value)

    if not isinstance(classes, list) or len(classes) != num_classes:
        raise CheckpointError(f"{path} lists {len(classes) if isinstance(classes, list) else '?'} class names "
                              f"for a {num_classes}-class network")
    if not names(classes):
        raise CheckpointError(f"{path} has broken metadata: its class list holds entries that are not strings")
    if not isinstance(preprocess, dict) or not isinstance(extra, dict):
        raise CheckpointError(f"{path} has broken metadata: 'preprocess' and 'extra' must be JSON objects")
    for key in ("image_size", "crop"):
        value = preprocess.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise CheckpointError(f"{path} has broken metadata: preprocess {key} {value!r} is not a positive integer")
    scale = preprocess.get("pixel_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise CheckpointError(f"{path} has broken metadata: pixel_scale {scale!r} is not a positive number")
    shown = extra.get("class_names")
    if shown is not None and not names(shown):
        raise CheckpointError(f"{path} has broken metadata: its class_names are not {num_classes} strings")


def upgrade_v1(model_dict: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A format-1 model config and weights as format 2: inverted dropout (the only form
    then), and for the paper variants fc6 and fc7 moved from classifier.1 and .4 to .0 and
    .3 (the dropout layers, now after relu6 and relu7, hold no weights, so in evaluation
    the network computes what it did)."""
    if not isinstance(model_dict, dict):
        return model_dict, tensors
    model_dict = {"dropout_form": "inverted", **model_dict}
    if model_dict.get("variant", "paper") != "owt" and "classifier.1.weight" in tensors:
        moved = {"classifier.1.": "classifier.0.", "classifier.4.": "classifier.3."}
        tensors = {next((new + k[len(old):] for old, new in moved.items() if k.startswith(old)), k): v
                   for k, v in tensors.items()}
    return model_dict, tensors


def save_state(path: str | Path, state: dict) -> None:
    """The training state: tensors, numbers, strings, lists and dicts only."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def load_state(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no training state at {path}") from None
    except Exception as e:  # a damaged file and a refused unpickling raise many types
        raise CheckpointError(f"cannot read the training state {path} (damaged, or not a run's): "
                              f"{str(e).splitlines()[0]}") from None
