"""The paper's hyperparameters, in one place.

Every number that the paper fixes is a dataclass default here, with the section of
Krizhevsky, Sutskever & Hinton (NIPS 2012) that gives it. Variants, presets and CLI flags
override these defaults with `replace`/`from_dict`; nothing else in the package restates
them. A resolved config turns into plain JSON-able dicts (`to_dict`) and back
(`from_dict`, which rejects unknown keys and wrong types), so it can travel inside runs
and checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

VARIANTS = ("paper", "paper-ungrouped", "owt", "bn")
INPUT_SIZES = (224, 227)
INITS = ("paper", "kaiming")
# The largest side an image is stored or trained at (the paper: 256). The statistics sum
# in int64 (3 x S x S x 8 bytes: 100 MB at 2048) and every image is 3 x S x S bytes, so a
# far larger side only fails later, out of memory.
MAX_IMAGE_SIZE = 2048
MAX_DIST_TIMEOUT = 1_000_000  # seconds (11.6 days): within the backends' int of milliseconds
WEIGHTED_LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
LRN_FORMS = ("paper", "caffe")
DROPOUT_FORMS = ("paper", "inverted")


class ConfigError(ValueError):
    """A config value or key that the user can fix; the message names it."""


@dataclass(frozen=True)
class LRNConfig:
    """Local response normalisation, section 3.3:
    b[i] = a[i] / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a[j]^2) ** beta.
    """

    size: int = 5  # n, neighbouring kernel maps in the sum (section 3.3)
    alpha: float = 1e-4  # section 3.3
    beta: float = 0.75  # section 3.3
    k: float = 2.0  # section 3.3 (Caffe's bvlc_alexnet uses k = 1)
    # "paper": alpha multiplies the sum, as written in section 3.3.
    # "caffe": alpha multiplies the mean (alpha / n times the sum), as in Caffe and
    # torch.nn.LocalResponseNorm; needed to run weights converted from Caffe.
    form: Literal["paper", "caffe"] = "paper"

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "k"):  # (from_dict checks a file's; these are Python's)
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"lrn.{name} must be a finite number, not {v!r}")
        if self.form not in LRN_FORMS:
            raise ConfigError(f"lrn.form must be one of {', '.join(LRN_FORMS)}, not {self.form!r}")
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1 or self.size % 2 == 0:
            raise ConfigError(f"lrn.size must be a positive odd integer, not {self.size!r}")
        if self.k <= 0:
            raise ConfigError(f"lrn.k must be positive, not {self.k}")
        if self.alpha < 0:
            raise ConfigError(f"lrn.alpha must be >= 0, not {self.alpha}")

    @property
    def alpha_sum(self) -> float:
        """The coefficient that multiplies the plain sum of squares."""
        return self.alpha if self.form == "paper" else self.alpha / self.size


@dataclass(frozen=True)
class ModelConfig:
    """The network, section 3.5 and Figure 2."""

    variant: Literal["paper", "paper-ungrouped", "owt", "bn"] = "paper"
    num_classes: int = 1000  # ILSVRC-2012's 1000 classes (section 2)
    # 227 with no padding in conv1, or 224 with padding 2: both give conv1's 55x55
    # (the paper's text says 224, its arithmetic needs 227 or padding).
    input_size: int = 227
    dropout: float = 0.5  # "setting to zero the output of each hidden neuron with probability 0.5" (section 4.2)
    # "paper": kept units pass unchanged in training and every unit is multiplied by
    # 1 - dropout at test time ("multiply their outputs by 0.5", section 4.2).
    # "inverted": kept units are scaled by 1 / (1 - dropout) in training, identity at test
    # (nn.Dropout, Caffe, torchvision); needed to run weights converted from those.
    dropout_form: Literal["paper", "inverted"] = "paper"
    lrn: LRNConfig = field(default_factory=LRNConfig)
    # Units of each fully-connected hidden layer, fc6 and fc7: "The fully-connected layers
    # have 4096 neurons each" (section 3.5). They hold 54M of the 61M parameters; a narrower
    # network (e.g. 512) trains and checkpoints several times faster on a CPU, for quick
    # experiments and the test suite, but is not the paper's and cannot take its weights.
    fc_width: int = 4096
    # "paper": section 5's N(0, std) weights and constant biases below. "kaiming": He et al.
    # (2015) normal weights for the ReLU layers, N(0, 0.01) for fc8, zero biases; with
    # BatchNorm and high learning rates the paper's tiny weights make the effective step
    # of the normalised layers far too large.
    init: Literal["paper", "kaiming"] = "paper"
    init_std: float = 0.01  # weights from N(0, 0.01) (section 5)
    # Biases initialised to 1 "in the second, fourth, and fifth convolutional layers, as
    # well as in the fully-connected hidden layers"; 0 elsewhere (section 5).
    init_bias_one: tuple[str, ...] = ("conv2", "conv4", "conv5", "fc6", "fc7")

    def __post_init__(self) -> None:
        # (a config read from a file has its types checked by from_dict; these are for
        # keyword arguments in Python: build_model("paper", num_classes=10.0, init="he"))
        for name in ("num_classes", "input_size", "fc_width"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ConfigError(f"{name} must be an integer, not {v!r}")
        for name in ("dropout", "init_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"{name} must be a number, not {v!r}")
            if not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, not {v!r}")
        if not isinstance(self.lrn, LRNConfig):
            raise ConfigError(f"lrn must be an LRNConfig, not {self.lrn!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}, not {self.init!r}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.input_size not in INPUT_SIZES:
            raise ConfigError(f"input size must be 224 or 227, not {self.input_size}")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, not {self.num_classes}")
        if self.fc_width < 1:
            raise ConfigError(f"fc_width must be >= 1, not {self.fc_width}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), not {self.dropout}")
        if self.dropout_form not in DROPOUT_FORMS:
            raise ConfigError(f"dropout_form must be one of {', '.join(DROPOUT_FORMS)}, not {self.dropout_form!r}")
        if self.init_std <= 0:
            raise ConfigError(f"init_std must be positive, not {self.init_std}")
        unknown = [n for n in self.init_bias_one if n not in WEIGHTED_LAYERS]
        if unknown:
            raise ConfigError(f"model.init_bias_one names {', '.join(map(repr, unknown))}; "
                              f"layers with biases: {', '.join(WEIGHTED_LAYERS)}")

    @property
    def conv1_padding(self) -> int:
        return 2 if self.input_size == 224 else 0


def model_config(variant: str = "paper", **overrides: Any) -> ModelConfig:
    """The config of a named variant, with overrides. `owt` defaults to torchvision's 224
    input and inverted dropout (its nn.Dropout), so that torchvision's weights load and
    compute as there; the others to 227 and the paper's dropout."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    defaults: dict[str, Any] = {"input_size": 224, "dropout_form": "inverted"} if variant == "owt" else {}
    return ModelConfig(variant=variant, **{**defaults, **overrides})  # type: ignore[arg-type]


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON-able values (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build config dataclass `cls` from a dict: unknown keys and wrong types are
    ConfigErrors naming the key; missing keys take the defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or cls.__name__} must be a mapping, not {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        shown = [where + k if k.isprintable() else repr(where + k) for k in unknown]  # one line: a "\n" as \n
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(shown)}"
            f"; known: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _takes_text(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(isinstance(a, str) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return any(_takes_text(a) for a in typing.get_args(tp))
    return tp is str


def _coerce(tp: Any, v: Any, key: str) -> Any:
    if isinstance(v, NumberText) and not _takes_text(tp):
        v = v.number  # (`--set` text that reads as a number, for a field that is not text)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, v, key + ".")
    if origin is Literal:
        if v not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise ConfigError(f"{key} must be one of {choices}, not {v!r}")
        return str(v) if isinstance(v, str) else v
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, v, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key} has the wrong type: {v!r}")
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"{key} must be a list, not {type(v).__name__}")
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        return tuple(_coerce(item, x, key) for x in v)
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{key} must be a number, not {v!r}")
        try:
            f = float(v)
        except OverflowError:  # an int beyond float range
            f = math.inf
        if not math.isfinite(f):  # json.loads reads NaN and Infinity; every check passes NaN
            raise ConfigError(f"{key} must be a finite number, not {v!r}")
        return f
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{key} must be an integer, not {v!r}")
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{key} must be true or false, not {v!r}")
        return v
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{key} must be a string, not {v!r}")
        return str(v)  # (a NumberText's text)
    return v


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they become inputs (sections 2 and 4.1)."""

    # A prepared store, an ImageFolder tree, a flat ILSVRC2012 validation folder or a folder
    # of Fashion-MNIST IDX files; None is the built-in default, Fashion-MNIST.
    path: str | None = None
    val_path: str | None = None  # None: the source's own validation split, or a held-out part of train
    image_size: int = 256  # "down-sampled ... to a fixed resolution of 256x256" (section 2)
    lighting_std: float = 0.1  # alpha_i ~ N(0, 0.1) for PCA lighting (section 4.1)
    flip: bool = True  # horizontal reflections (section 4.1)
    ten_crop: bool = False  # validate and test on the 10 patches of section 4.1 instead of the centre crop
    # Training images held out for validation when the source has no validation split of
    # its own (the paper used ILSVRC's 50,000 validation images).
    val_holdout: int = 5000
    # Loader processes reading and augmenting ahead of training; -1: none on a CPU (a worker
    # takes a core from the model there: measured slower), min(8, cores) beside a GPU.
    num_workers: int = -1
    # Where crops, flips, mean subtraction and lighting run: "loader" (its processes, on the
    # CPU) or "device" (the loader ships uint8 images and the random draws; the model's
    # device finishes the batch, the same bits). "auto": device on a GPU, loader on a CPU.
    augment_on: Literal["auto", "loader", "device"] = "auto"
    # Inputs are (pixel - mean image + lighting) / pixel_scale: 1 feeds the paper's raw
    # mean-subtracted 0..255 values, as its N(0, 0.01) initialisation expects.
    pixel_scale: float = 1.0

    def __post_init__(self) -> None:
        if not 32 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"data.image_size must be from 32 to {MAX_IMAGE_SIZE}, not {self.image_size}")
        if self.val_holdout < 1:
            raise ConfigError(f"data.val_holdout must be >= 1, not {self.val_holdout}")
        if self.lighting_std < 0:
            raise ConfigError(f"data.lighting_std must be >= 0, not {self.lighting_std}")
        if self.pixel_scale <= 0:
            raise ConfigError(f"data.pixel_scale must be positive, not {self.pixel_scale}")
        if self.num_workers < -1:
            raise ConfigError(f"data.num_workers must be >= 0 (or -1 for auto), not {self.num_workers}")
        for key in ("path", "val_path"):  # "" would be the current folder (an unset shell variable)
            if getattr(self, key) is not None and not str(getattr(self, key)).strip():
                raise ConfigError(f"data.{key} must not be empty (leave it out for the default)")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe of section 5; other recipes are presets over these fields."""

    epochs: int = 90  # "roughly 90 cycles through the training set" (section 5)
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit beyond epochs)
    batch_size: int = 128  # global batch, split over DDP processes (section 5)
    lr: float = 0.01  # initial learning rate (section 5)
    momentum: float = 0.9  # section 5
    # "paper": section 5's rule, whose velocity v is in weight units (the learning rate
    # inside it), so that at a change of learning rate the velocity gathered so far runs on;
    # "pytorch": torch.optim.SGD's, whose buffer is in gradient units and times the new
    # rate at once. The same steps while the learning rate holds.
    momentum_form: Literal["paper", "pytorch"] = "paper"
    weight_decay: float = 5e-4  # section 5
    # "plateau": divide lr by 10 when the validation error stops improving (section 5);
    # "cosine" and "onecycle" are for short budgets.
    schedule: Literal["plateau", "cosine", "onecycle", "constant"] = "plateau"
    lr_drop: float = 0.1  # "divide the learning rate by 10" (section 5)
    max_lr_drops: int = 3  # "reduced three times prior to termination" (section 5)
    plateau_patience: int = 1  # epochs without a new best validation error before a drop (not in the paper)
    warmup_steps: int = 0  # linear warm-up from 0 (not in the paper)
    label_smoothing: float = 0.0  # not in the paper
    grad_clip: float = 0.0  # clip the gradients' global norm to this (0: off, as in the paper)
    seed: int = 0
    # Numerics and speed; "auto" picks the fastest safe choice for the device.
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    deterministic: bool = False  # deterministic kernels (exact resume, slower)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # Under DDP: seconds a process waits for the others at a collective before it ends the
    # run with one line (a node that froze or vanished without closing its sockets); 0: the
    # backend's own limit (30 minutes for Gloo, 10 for NCCL). It must exceed the longest
    # stretch one process works alone, e.g. a folder's first statistics pass.
    dist_timeout: float = 0.0
    checkpoint_every: int = 500  # also checkpoint every N steps (0: only at epoch ends)
    keep_checkpoints: int = 2  # step checkpoints kept besides `best`
    # Steps between read-backs of the losses from the device: the progress line's loss, the
    # non-finite check and, under DDP, the agreement to stop (also at every checkpoint and
    # epoch end). Between them a GPU queues the next steps instead of waiting for the host.
    log_every: int = 10
    # After the last epoch, evaluate the best weights on the source's test split (if it has
    # one); kept in the run's config, so a resumed run does as the started one would.
    test: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every", "keep_checkpoints", "plateau_patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, not {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every", "warmup_steps", "max_lr_drops"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, not {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"train.seed must be an integer from 0 to 2**63 - 1, not {self.seed}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, not {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), not {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be >= 0, not {self.weight_decay}")
        if not 0 < self.lr_drop < 1:
            raise ConfigError(f"train.lr_drop must be in (0, 1), not {self.lr_drop}")
        if not (self.dist_timeout >= 0 and math.isfinite(self.dist_timeout)):
            raise ConfigError(f"train.dist_timeout must be a number of seconds >= 0, not {self.dist_timeout}")
        if self.dist_timeout and not 1 <= self.dist_timeout <= MAX_DIST_TIMEOUT:
            # (below a millisecond it is 0 ms to the backend; past C's int of milliseconds it
            # wraps round, or overflows Python's timedelta: "did not all join", or a traceback)
            raise ConfigError(f"train.dist_timeout must be 0 (the backend's own limit) or 1 to "
                              f"{MAX_DIST_TIMEOUT:,} seconds, not {self.dist_timeout}")
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip must be >= 0, not {self.grad_clip}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), not {self.label_smoothing}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; saved as config.json in the run folder."""

    recipe: str = "paper"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.data.image_size < self.model.input_size:
            raise ConfigError(f"data.image_size {self.data.image_size} is smaller than the network's "
                              f"{self.model.input_size}px crop (model.input_size)")


# Named presets: overrides of the defaults above, never a second copy of them.
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {},
    # Short budgets on small data: BatchNorm in the convolutions, one-cycle and label
    # smoothing converge in few epochs; clipping the gradient norm keeps the first steps of
    # the 9216-input fc6 from blowing up at this learning rate (measured: without it the
    # loss jumped to 10-60 in the first 20 steps and the run did not learn).
    "fast": {
        "model": {"variant": "bn"},
        # (PyTorch's momentum: the one-cycle schedule, which moves the rate every step, is
        # tuned with it, and it saves rescaling the momentum buffers every step)
        "train": {"schedule": "onecycle", "lr": 0.02, "grad_clip": 2.0, "label_smoothing": 0.1,
                  "batch_size": 64, "epochs": 10, "momentum_form": "pytorch"},
    },
}


def merge_overrides(base: dict, over: dict, _where: str = "") -> dict:
    """`over`'s values over `base`'s, nested dicts merged key by key. A value of `base`
    that should be a section (`over` has keys under it) but is not is refused, not
    replaced: `{"train": 5}` in a config file is a mistake that `--epochs 3` must not hide."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and k in out and not isinstance(out[k], dict):
            was = out[k].number if isinstance(out[k], NumberText) else out[k]
            raise ConfigError(f"{_where}{k} must be a mapping, not {type(was).__name__}")
        out[k] = merge_overrides(out[k], v, f"{_where}{k}.") if isinstance(v, dict) and k in out else v
    return out


# `fast` cut to a few minutes on a 2-core CPU (about 3 to 11, by the machine): the built-in default run.
# (Measured on that machine: batch 32 ran faster per image than 64 and reached 74.3% test
# accuracy in 180 steps against 72.7% for 90 steps of 64.)
RECIPES["demo"] = merge_overrides(RECIPES["fast"], {"data": {"val_holdout": 1000},
                                                   "train": {"epochs": 1, "max_steps": 220, "batch_size": 32}})


def run_config(recipe: str = "paper", overrides: dict | None = None) -> RunConfig:
    """The recipe's preset, then `overrides` (nested dicts: {"train": {"lr": 0.02}})."""
    if not isinstance(recipe, str) or recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    if (overrides or {}).get("recipe", recipe) != recipe:
        raise ConfigError(f"two recipes given: {recipe!r} and {overrides['recipe']!r}")
    data = merge_overrides(RECIPES[recipe], overrides or {})
    data["recipe"] = recipe
    return from_dict(RunConfig, data)


class NumberText(str):
    """`--set` text that reads as a number: the number where the field wants one, the text
    where it wants text (`data.path=007` is the folder 007, not 7)."""

    def __new__(cls, text: str, number: int | float):
        self = super().__new__(cls, text)
        self.number = number
        return self


def parse_override(text: str) -> dict:
    """`train.lr=0.02` -> {"train": {"lr": NumberText("0.02", 0.02)}}; the value is read as
    JSON when it parses, else as a number when it is one in Python's spelling (`.01`, `5.`,
    `+30`, `010`, which JSON refuses), else as a string (so `data.path=/x` works). A number
    is kept with its text (`NumberText`), which a text field takes as it was written."""
    import json
    import re

    key, sep, value = text.partition("=")
    if not sep or not key or "" in key.split("."):
        raise ConfigError(f"--set expects KEY=VALUE with KEY such as train.lr, got {text!r}")
    try:
        v: Any = json.loads(value)
    except json.JSONDecodeError:
        number = re.fullmatch(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*", value)
        if number is None:
            v = value
        else:
            v = NumberText(value, int(value) if number.group(1).isdigit() and not number.group(2) else float(value))
    else:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = NumberText(value, v)
    out: dict = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = v
    return out
