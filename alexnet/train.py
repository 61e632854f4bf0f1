"""Training with the paper's recipe (section 5) or a named preset, with checkpoints, exact
resume, pre-emption handling, logs, plots and data-parallel processes.

A run folder holds:
  config.json            the resolved RunConfig
  log.jsonl              one line per epoch: losses, error rates, learning rate, speed
  curves.png             loss and top-1/top-5 error against epochs
  best.safetensors       the weights with the lowest validation top-1 error, with config,
                         class names and data statistics: enough to predict
  checkpoints/step-N/    model.safetensors + state.pt (optimizer, schedule, epoch, step,
                         RNG states, sampler position); `checkpoints/last.json` names the newest
  stopped / diverged     why the last run ended early, when it did

A run that cannot write (a full disk, a read-only folder) or loses a loader worker stops
with a one-line TrainingError; the checkpoint named by last.json stays whole, and the
temporary files of a write cut short (by an error or a kill -9) are removed when the run
starts or resumes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from alexnet.augment import DeferredTrainTransform, RawBatch, TrainTransform, to_device
from alexnet.checkpoint import (Checkpoint, CheckpointError, load_model_file, load_state, save_model,
                               save_state, saved_extra)
from alexnet.fileio import OutputError, WriteError, atomic_write_text, check_folder_possible, make_dir, within
from alexnet.config import ConfigError, ModelConfig, RunConfig, from_dict, to_dict
from alexnet.dataset import DataStats, ImageDataset, SubsetDataset
from alexnet.distributed import (all_reduce_sum, any_process, broadcast_buffers, broadcast_object, gather_objects,
                                 init_distributed, lost_process, on_stop_signals, resolve_augment, resolve_workers,
                                 shutdown, sum_on_host)
from alexnet.evaluate import Metrics, autocast_context, eval_loader, evaluate_model, format_metrics
from alexnet.loader import BatchLoader, LoaderWorkerError
from alexnet.model import AlexNet
from alexnet.progress import Progress, first_few
from alexnet.sources import DataSourceError

if TYPE_CHECKING:
    from alexnet.sources import Shared


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message says what and where."""


class RunWriteError(TrainingError):
    """A file of the run could not be written (no space left, a read-only folder)."""


@contextlib.contextmanager
def _writing(what: str):
    """Turn an OSError while writing `what` into a one-line RunWriteError."""
    try:
        yield
    except OSError as e:
        raise RunWriteError(f"cannot write {what}: {e.strerror or e}") from None


def _discard(folder: Path) -> None:
    """Remove a checkpoint folder: renamed away first, so no reader (or a kill -9 midway)
    ever finds a step folder with some of its files gone."""
    gone = folder.with_name(f".{folder.name}.deleted")
    shutil.rmtree(gone, ignore_errors=True)
    try:
        os.replace(folder, gone)
    except OSError:
        return
    shutil.rmtree(gone, ignore_errors=True)


# ----------------------------------------------------------------------------- data


@dataclass
class Data:
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset | None  # a separate test split (Fashion-MNIST's 10,000), if the source has one
    stats: DataStats  # of the training images (a held-out validation part left out)


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of process `rank`: `seed` itself for rank 0 (a single process draws
    what it always drew), one derived from (seed, rank) for the others."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0])


def holdout_split(n: int, holdout: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random split of range(n) into (train, held-out) index arrays."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[holdout:]), np.sort(perm[:holdout])


def for_validation(ds: ImageDataset) -> ImageDataset:
    """`ds` as validation reads it: an on-the-fly folder whose unreadable files are left out
    of the figures (label -1), not stood in for by the next readable record, which would
    count twice. A copy, so that training, which shares the folder when part of it is held
    out, keeps its stand-ins; what it learns of bad files (`bad`) is shared."""
    if not hasattr(ds, "drop_unreadable"):
        return ds
    ds = copy.copy(ds)
    ds.drop_unreadable = True
    return ds


def for_training(ds: ImageDataset, indices: np.ndarray) -> ImageDataset:
    """`ds` as training reads the records `indices` of it: an on-the-fly folder's stand-ins
    for unreadable files come from those records alone, never from a held-out validation
    image. A copy, sharing what it learns of bad files, as `for_validation` is."""
    if not hasattr(ds, "stand_ins"):
        return ds
    ds = copy.copy(ds)
    ds.stand_ins = np.asarray(indices, dtype=np.int64)
    return ds


def open_data(cfg: RunConfig, stats: DataStats | None = None, shared: Shared | None = None,
              check: Callable[[dict], None] | None = None) -> Data:
    """The run's splits, and the statistics of its training images (a held-out validation
    part left out), or `stats` as given (a resumed run keeps those it started with).
    Under torchrun: `check(what this process trains on)` before the statistics, whose pass
    over a folder the processes then share (`shared`, see `dataset_stats`): every process
    must agree on all that decides whether it makes that pass."""
    from alexnet.sources import (FolderDataset, IdxDataset, MissingSplitError, UnlabelledError, dataset_stats,
                                 open_dataset)

    d = cfg.data
    full = open_dataset(d.path, "train", d.image_size)
    held_out, idx_test = None, None
    if d.val_path is not None:
        train, val = full, for_validation(open_dataset(d.val_path, "val", d.image_size, classes=full.classes))
    else:
        is_idx = isinstance(full, IdxDataset)
        try:
            val = open_dataset(d.path, "val", d.image_size, classes=full.classes)
        except MissingSplitError:  # none: a part of the training images is held out below
            val = None
        except ConfigError as e:
            if not is_idx:  # one there that cannot be used (an unfinished store, unlabelled images):
                # never replaced by held-out training images without a word
                reason = e.reason if isinstance(e, UnlabelledError) else str(e)
                raise DataSourceError(f"the validation split cannot be used: {reason}; fix it, or move it out "
                                      f"of {d.path} to validate on held-out training images") from None
            val = None  # IDX data's "val" is its t10k test files: the test split's warning says why
        if isinstance(val, FolderDataset) and os.path.realpath(val.root) == os.path.realpath(full.root):
            val = None  # a tree named for validation (imagenet-val-sorted) is trained on here: not its own val
        if val is None or is_idx:
            # No validation split of its own (or, for IDX data, the "val" split is the test
            # set, which must not steer training): hold out part of the training images.
            idx_test = val if is_idx else None
            holdout = min(d.val_holdout, len(full) // 10)
            if holdout < 1:
                raise ConfigError(f"{len(full)} training images are too few to hold out a validation set")
            tr, held_out = holdout_split(len(full), holdout)
            train, val = SubsetDataset(for_training(full, tr), tr), SubsetDataset(for_validation(full), held_out)
        else:
            train, val = full, for_validation(val)
    if list(val.classes) != list(full.classes):
        raise ConfigError(f"the validation classes differ from the training classes "
                          f"({len(val.classes)} vs {len(full.classes)})")
    test = _test_split(d, full, cfg.train.test, opened=idx_test)
    if check is not None:
        check({"training images": len(train), "classes": list(train.classes), "training data": _kind(full),
               "statistics": "computed" if stats is None else "kept from the checkpoint (a resume)"})
    if stats is None:
        stats = dataset_stats(full, held_out=held_out, shared=shared)
    return Data(train, val, test, stats)


def _kind(ds: ImageDataset) -> str:
    """What a training source is, in words (compared across the processes of a run)."""
    return {"FolderDataset": "an image folder", "StoreDataset": "a prepared store",
            "IdxDataset": "IDX files"}.get(type(ds).__name__, type(ds).__name__)


def _test_split(d, full: ImageDataset, cfg_test: bool = True,
                opened: ImageDataset | None = None) -> ImageDataset | None:
    """The source's own test split, evaluated after training: IDX data's t10k files, or a
    tree's test/ folder (of images, or a prepared store); None where there is none, or
    with `cfg_test` false (train.test, --no-test: not even opened). One that cannot be
    used (unlabelled, as ILSVRC's test images are, or with classes training lacks) is a
    warning, not an error: training does not need it. `opened`: the test split already
    opened (IDX data's "val" split is its t10k files), not read again."""
    from alexnet.sources import ClassMismatchError, IdxDataset, UnlabelledError, open_dataset, split_folder

    if cfg_test and opened is not None:
        return opened
    idx = isinstance(full, IdxDataset)
    if not cfg_test or not idx and (d.path is None or split_folder(Path(d.path).expanduser(), "test") is None):
        return None
    try:
        return open_dataset(d.path, "test", d.image_size, classes=None if idx else full.classes)
    except (ConfigError, ClassMismatchError) as e:
        reason = e.reason if isinstance(e, UnlabelledError) else str(e)  # (train takes no --labels)
        warnings.warn(f"the test split is left out: {reason}; train with --no-test to skip it", RuntimeWarning,
                      stacklevel=2)
        return None


# ----------------------------------------------------------------------------- numerics


BF16_CPU_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX-512 BF16 and AMX; Arm's BF16 extension


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags the kernel lists for the first CPU (x86 "flags", Arm
    "Features"); empty where there is no such file."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device, cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether `device` multiplies bf16 in hardware: a CUDA GPU that supports it, or a CPU
    with one of BF16_CPU_FLAGS. (torch.backends.cpu.get_cpu_capability() says "AVX512"
    alike for CPUs with and without AVX-512 BF16, so it cannot tell.)"""
    if device.type == "cuda":  # (torch's default also says yes where bf16 is only emulated: pre-Ampere)
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return bool(cpu_flags(cpuinfo) & BF16_CPU_FLAGS)


def resolve_numerics(cfg: RunConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, channels_last). "auto": bf16 on CUDA; on a CPU bf16 only
    where it has native bf16 instructions (`native_bf16`). On an AVX2 CPU a bf16-autocast
    training step of the paper network measured 20x slower than fp32 (1.2 vs 26 img/s,
    batch 32, 2 cores, one run on 2026-11-23). Channels-last on both: on the CPU it spares oneDNN a layout
    conversion around every convolution and lets ReLU, LRN and pooling run as one kernel
    (see README, "Speed")."""
    t = cfg.train
    if t.amp == "auto":
        if device.type == "cuda":
            amp = torch.bfloat16 if native_bf16(device) else torch.float16
        else:
            amp = torch.bfloat16 if native_bf16(device) else None
    else:
        amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[t.amp]
    if amp is torch.float16 and device.type != "cuda":
        raise ConfigError("train.amp=fp16 needs a CUDA device; use bf16 on a CPU")
    cl = t.channels_last != "off"
    return amp, cl


def make_optimizer(model: torch.nn.Module, t, device: torch.device) -> torch.optim.SGD:
    """Section 5's SGD (momentum, weight decay); the fused single-pass update on CPU and CUDA,
    which keeps the same state (momentum buffers) as the default one."""
    return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                           fused=True if device.type in ("cpu", "cuda") else None)


def set_lr(optimizer: torch.optim.SGD, lr: float, momentum_form: str) -> None:
    """Give every parameter group the learning rate `lr`. With `momentum_form` "paper",
    section 5's rule: its velocity v (weight units) is -lr * PyTorch's momentum buffer, so
    at a change of rate from a to b the buffers are multiplied by a / b, after which the
    steps are the paper's exactly (while both rates are above 0)."""
    for g in optimizer.param_groups:
        old = g["lr"]
        if lr != old and momentum_form == "paper" and old > 0 and lr > 0:
            buffers = [optimizer.state[p]["momentum_buffer"] for p in g["params"]
                       if optimizer.state[p].get("momentum_buffer") is not None]
            if buffers:
                torch._foreach_mul_(buffers, old / lr)
        g["lr"] = lr


# ----------------------------------------------------------------------------- schedules


class LRSchedule:
    """The learning rate for each step. "plateau" is the paper's: divide by 10 when the
    validation error did not improve for `plateau_patience` epochs, at most `max_lr_drops`
    times. "cosine" and "onecycle" follow the step count to `total_steps`."""

    def __init__(self, cfg: RunConfig, total_steps: int):
        self.t = cfg.train
        self.total = max(total_steps, 1)
        self.scale = 1.0  # plateau drops so far, as a factor
        self.drops = 0
        self.best = math.inf
        self.bad_epochs = 0

    def lr(self, step: int) -> float:
        t = self.t
        if t.schedule == "onecycle":
            # up from lr/25 over the first 30% (or the warm-up), then cosine down to lr/1e4
            up = t.warmup_steps or max(1, int(0.3 * self.total))
            if step < up:
                return t.lr * (0.04 + 0.96 * step / up)
            p = min(1.0, (step - up) / max(1, self.total - up))
            return t.lr * (1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * p)))
        warm = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
        if t.schedule == "cosine":
            p = min(1.0, step / self.total)
            return t.lr * warm * 0.5 * (1 + math.cos(math.pi * p))
        return t.lr * warm * self.scale  # plateau, constant

    def epoch_end(self, val_err: float) -> bool:
        """Record an epoch's validation error; True if the learning rate was just divided."""
        if val_err < self.best:
            self.best, self.bad_epochs = val_err, 0
            return False
        self.bad_epochs += 1
        if (self.t.schedule == "plateau" and self.bad_epochs >= self.t.plateau_patience
                and self.drops < self.t.max_lr_drops):
            self.drops += 1
            self.scale *= self.t.lr_drop
            self.bad_epochs = 0
            return True
        return False

    def state_dict(self) -> dict:
        return {"scale": self.scale, "drops": self.drops, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, s: dict) -> None:
        self.scale, self.drops, self.best, self.bad_epochs = s["scale"], s["drops"], s["best"], s["bad_epochs"]


# ----------------------------------------------------------------------------- the run


STEP_DIR = re.compile(r"step-\d{8,}(\.\d+)?")  # checkpoints/step-00000012, step-00000012.1


def _step_key(name: str) -> tuple[int, int]:
    """A step folder's place in the run: step-00000012.1 -> (12, 1)."""
    step, _, again = name[len("step-"):].partition(".")
    return int(step), int(again or 0)


def _step_folders(ck: Path) -> list[Path]:
    """The run's step folders, oldest first."""
    return sorted((p for p in ck.glob("step-*") if p.is_dir() and STEP_DIR.fullmatch(p.name)),
                  key=lambda p: _step_key(p.name))


def _names(classes: list[str], shown: int = 4) -> str:
    """A class list in a message: the first few names, and the count when there are more."""
    return first_few(classes, shown) + (f" ({len(classes)})" if len(classes) > shown else "")


def _first_difference(a, b) -> str:
    """`key (value in a vs value in b)` for the first field where two model configs differ."""
    k = next(f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name))
    return f"model.{k} ({getattr(a, k)} vs {getattr(b, k)})"


START_OVER = "run the same alexnet train command again to start it over"
# what a run folder holds; a new run may start over in a folder of these alone (a run that
# stopped before its first checkpoint), and never writes into any other non-empty folder
RUN_ENTRIES = frozenset({".lock", "config.json", "log.jsonl", "stopped", "diverged", "curves.png",
                         "best.safetensors", "checkpoints", "eval-test"})
TEMP_ENTRY = re.compile(r"\..+\.tmp")  # a write that a kill cut short (fileio.atomic_write)
# what `evaluate` and `show` write beside best.safetensors by default: of the run's too
BESIDE_BEST = re.compile(r"eval-.+|best-.+\.png")


def _first_key_difference(a: dict, b: dict, prefix: str = "") -> str:
    """The dotted name of the first key where two nested dicts differ."""
    for k in sorted(set(a) | set(b), key=str):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            if x != y:
                return _first_key_difference(x, y, f"{prefix}{k}.")
        elif x != y:
            return f"{prefix}{k}"
    return prefix.rstrip(".") or "?"


def _short(d: dict, dotted: str) -> str:
    v = d
    for part in dotted.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_log_row(row) -> bool:
    """A row of log.jsonl as `_end_epoch` writes it, as far as the curves and the resume
    read it: an int epoch and the four figures as numbers (a row without them, JSON though
    it is, ended every later epoch in a traceback from the plot)."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return (isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool)
            and all(number(row.get(k)) for k in ("train_loss", "val_loss", "val_top1_err", "val_top5_err")))


def _absolute(path: str | None) -> str | None:
    """A data path as an absolute one (None and the built-in "fashion-mnist" as they are)."""
    if path is None or path == "fashion-mnist":
        return path
    return os.path.abspath(os.path.expanduser(path))


class Trainer:
    def __init__(self, cfg: RunConfig | None, run_dir: str | Path | None, resume: bool = False,
                 quiet: bool = False, no_test: bool = False):
        """`run_dir` None: a new folder runs/DATE-TIME-RECIPE (with -2, -3, ... if that is taken).
        `no_test`: a resume's --no-test, for this process only (the test split not opened)."""
        self._named = run_dir is not None
        self.run_dir = Path(run_dir) if self._named else Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.recipe}"
        self._lock_fd: int | None = None
        if resume:
            cfg = self._read_config()
            if no_test:
                cfg = replace(cfg, train=replace(cfg.train, test=False))
        else:  # config.json must name the data wherever a resume is started from
            d = cfg.data
            cfg = replace(cfg, data=replace(d, path=_absolute(d.path), val_path=_absolute(d.val_path)))
            for data in (cfg.data.path, cfg.data.val_path):
                if data is not None and os.path.isdir(data) and within(self.run_dir, data):
                    raise ConfigError(f"the run folder {self.run_dir} is inside the data folder {data}, "
                                      f"where its files would be read as images; choose another --out")
        self.info, self.device = init_distributed(cfg.train.device, cfg.train.dist_timeout)
        self.quiet = quiet or not self.info.is_main
        try:
            # a run another trainer holds, or a finished one as a new run's --out, is refused
            # before the data is opened (a large folder takes a while to list)
            if resume:
                self._on_main_first(self._lock)
            else:
                self._on_main_first(self._claim_existing)
            self._setup(cfg, resume)
        except BaseException:  # no trainer to close: the folder is free again at once, and the
            self._unlock()      # process group ends now, not at the interpreter's exit (see close)
            self.__dict__.pop("net", None)
            shutdown(self.info)
            raise

    def _setup(self, cfg: RunConfig, resume: bool) -> None:
        """The data, the network and its optimizer, then the run folder: a new one, or the
        resumed run's last checkpoint (whose data statistics it keeps)."""
        last = self._last_checkpoint() if resume else None
        try:  # (under torchrun: the same settings and data everywhere, then a statistics pass shared)
            self.data = open_data(cfg, stats=last[1].stats if last else None, shared=self._shared(),
                                  check=lambda data: self._check_same_everywhere(cfg, data))
        except FileNotFoundError as e:  # --data cannot be given with --resume: say where the path is kept
            if not resume:
                raise
            raise ConfigError(f"{e}; if the data has moved, set data.path (data.val_path) in "
                              f"{self.run_dir / 'config.json'} to its new place") from None
        except RuntimeError as e:  # a process gone during the shared statistics pass
            lost = self._lost(e, "nothing was trained yet; run the same command again")
            if lost is e:
                raise
            raise lost from None
        classes = list(self.data.train.classes)
        asked = cfg.model.num_classes
        if asked not in (len(classes), ModelConfig.num_classes):
            raise ConfigError(f"model.num_classes {asked} does not match the data's {len(classes)} "
                              f"classes; leave it out, it is taken from the data")
        cfg = replace(cfg, model=replace(cfg.model, num_classes=len(classes)))
        self.cfg = cfg
        self.classes = classes
        self.class_names = list(getattr(self.data.train, "class_names", None) or classes)
        t = cfg.train
        if t.batch_size % self.info.world_size:
            raise ConfigError(f"train.batch_size {t.batch_size} is not divisible by the "
                              f"{self.info.world_size} processes")
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if self.device.type == "cuda":  # the same shapes every step: cuDNN may time its algorithms once
            torch.backends.cudnn.benchmark = not t.deterministic
        # dropout masks of their own on every process (DDP gives them rank 0's initial weights)
        torch.manual_seed(rank_seed(t.seed, self.info.rank))
        self.amp, self.channels_last = resolve_numerics(cfg, self.device)
        self.num_workers = resolve_workers(cfg.data.num_workers, self.device)
        self.augment_on = resolve_augment(cfg.data.augment_on, self.device)
        self.crop = cfg.model.input_size
        d = cfg.data
        self.train_transform = TrainTransform(self.data.stats, self.crop, lighting_std=d.lighting_std,
                                              scale=d.pixel_scale, flip=d.flip)
        if self.augment_on == "device":  # the loader draws and ships uint8; _train_step finishes
            self.train_transform = DeferredTrainTransform(self.train_transform)
        self.model = AlexNet(cfg.model).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, t, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp is torch.float16)
        self.net = self.model
        if self.info.enabled:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if t.compile:
            self.net = torch.compile(self.net)
        self._eval_net = torch.compile(self.model) if t.compile and self.info.enabled else self.model
        self.per_rank_batch = t.batch_size // self.info.world_size
        if len(self.data.train) < t.batch_size:
            raise ConfigError(f"{len(self.data.train)} training images make no batch of {t.batch_size}; "
                              f"lower train.batch_size")
        self.steps_per_epoch = len(self._train_loader(0, 0))
        total = t.epochs * self.steps_per_epoch
        self.total_steps = min(total, t.max_steps) if t.max_steps else total
        self.schedule = LRSchedule(cfg, self.total_steps)
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.epoch_loss = [0.0, 0]  # loss sum, images, over this epoch so far
        self.epoch_time, self._stretch_t0 = 0.0, None  # training seconds of this epoch (see _epoch_seconds)
        self.best_err = math.inf
        self.best_epoch: int | None = None  # the epochs done when best_err was reached
        self.history: list[dict] = []
        self.stop_requested = False
        self._saved: tuple[tuple[int, int, int], Path] | None = None  # (epoch, step, batch), folder
        self._pending: list[tuple[int, torch.Tensor, int]] = []  # (step, loss on the device, images)
        self._last_loss: float | None = None
        self.preprocess = {"image_size": cfg.data.image_size, "crop": self.crop,
                           "pixel_scale": cfg.data.pixel_scale, "mean": "mean_image"}
        if resume:
            self._load_last(*last)
        else:
            self._on_main_first(self._start_run_dir)

    # --- run folder -----------------------------------------------------------------

    def _on_main_first(self, work) -> None:
        """`work()` on rank 0 alone; every process then stops with its error, if any, as one
        line. The run folder is rank 0's (a default name from the clock may differ)."""
        error = None
        if self.info.is_main:
            try:
                work()
            except (ConfigError, OutputError, OSError) as e:
                error = e
        reason, folder = broadcast_object((error and str(error), str(self.run_dir)), self.info)
        self.run_dir = Path(folder)
        if error is not None:
            raise error
        if reason is not None:
            raise ConfigError(reason)

    def _lock(self) -> None:
        """Hold an flock on RUN/.lock (given up when the process ends, however it ends) so
        that a second trainer cannot write into a run under way. The file is held open
        read-only: an open file for writing would keep its file system from being remounted."""
        import fcntl

        path = self.run_dir / ".lock"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as e:
            raise WriteError.of(e, path) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EWOULDBLOCK: held by another process
            holder = os.pread(fd, 20, 0).decode(errors="replace").strip()
            os.close(fd)
            raise ConfigError(f"{self.run_dir} is in use by another alexnet train"
                              f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it to end "
                              f"or choose another --out") from None
        self._lock_fd = fd
        try:
            path.write_text(f"{os.getpid()}\n")  # for the message above: another descriptor keeps the lock
        except OSError as e:
            self._unlock()
            raise WriteError.of(e, path) from e

    def _claim(self) -> None:
        """Lock the run folder (unless this trainer holds it) for a new run: refused if it
        holds anything but a run of ours (so no file of the user's is overwritten), or a run
        that has saved a checkpoint."""
        names = os.listdir(self.run_dir)
        if self._lock_fd is None:
            ours = RUN_ENTRIES if "config.json" in names else {".lock"}  # a run writes config.json first
            foreign = sorted(n for n in names if n not in ours and not TEMP_ENTRY.fullmatch(n)
                             and not (ours is RUN_ENTRIES and BESIDE_BEST.fullmatch(n)))
            if foreign:
                raise ConfigError(f"{self.run_dir} is not empty and is not a run folder (it holds "
                                  f"{first_few(foreign, 3)}); choose another --out")
            if (self.run_dir / "config.json").exists():
                try:  # a config.json of the user's is not written over
                    self._read_config()
                except ConfigError as e:
                    raise ConfigError(f"{self.run_dir} is not a run folder: {e}; choose another --out") from None
            self._lock()
        ck = self.run_dir / "checkpoints"
        if (ck / "last.json").exists():
            raise ConfigError(f"{self.run_dir} already holds a run; continue it with --resume {self.run_dir} "
                              f"or choose another --out")
        if _step_folders(ck):  # last.json lost, or a kill between a save and last.json: never mixed in
            raise ConfigError(f"{self.run_dir} holds checkpoints that no checkpoints/last.json names; "
                              f"continue it with --resume {self.run_dir} or choose another --out")
        # an epoch's end saves a checkpoint before any of these is written: with none left
        # (checkpoints/ deleted to save space), they are a finished run's, not to be mixed in
        results = sorted(n for n in names if n in ("best.safetensors", "curves.png") or BESIDE_BEST.fullmatch(n))
        log = self.run_dir / "log.jsonl"
        if log.is_file() and log.stat().st_size:
            results.append("log.jsonl")
        if results:
            raise ConfigError(f"{self.run_dir} holds a run's results ({first_few(results, 3)}) but no checkpoint "
                              f"to resume; choose another --out")

    def _claim_existing(self) -> None:
        """`_claim` a named --out that exists already; of one to be made (once the data is
        open), check that it can be (not a file, nor under one, and writable)."""
        if self._named and self.run_dir.is_dir():
            self._claim()
        else:
            check_folder_possible(self.run_dir)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # gives the lock up
            self._lock_fd = None

    def _read_config(self) -> RunConfig:
        path = self.run_dir / "config.json"
        if not path.is_file():
            raise ConfigError(f"{self.run_dir} is not a run folder (no config.json)")
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and isinstance(data.get("model"), dict):
                # a run begun before model.dropout_form existed trained with inverted dropout
                data["model"].setdefault("dropout_form", "inverted")
            if isinstance(data, dict) and isinstance(data.get("train"), dict):
                # and one begun before train.momentum_form, with PyTorch's momentum
                data["train"].setdefault("momentum_form", "pytorch")
            return from_dict(RunConfig, data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def _start_run_dir(self) -> None:
        if not self._named:  # a folder of its own, even for two runs begun in the same second
            make_dir(self.run_dir.parent)
            base, n = self.run_dir, 1
            while True:
                try:
                    self.run_dir.mkdir()
                    break
                except FileExistsError:
                    n += 1
                    self.run_dir = base.with_name(f"{base.name}-{n}")
                except OSError as e:
                    raise WriteError.of(e, self.run_dir) from e
        make_dir(self.run_dir)
        self._claim()
        self._remove_stale_temp()
        atomic_write_text(self.run_dir / "config.json", json.dumps(to_dict(self.cfg), indent=2) + "\n")
        (self.run_dir / "log.jsonl").unlink(missing_ok=True)
        for f in ("stopped", "diverged"):
            (self.run_dir / f).unlink(missing_ok=True)

    def _remove_stale_temp(self) -> None:
        """Temporary files and step folders of writes that a kill cut short (one writer per
        run folder: these are never in use when a run starts)."""
        ck = self.run_dir / "checkpoints"
        for p in [*self.run_dir.glob(".*.tmp"), *ck.glob(".*.tmp"), *ck.glob(".step-*.partial"),
                  *ck.glob(".step-*.deleted")]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def _train_loader(self, epoch: int, start_batch: int) -> BatchLoader:
        return BatchLoader(self.data.train, self.per_rank_batch, self.train_transform, shuffle=True,
                           seed=self.cfg.train.seed, epoch=epoch, start_batch=start_batch, drop_last=True,
                           rank=self.info.rank, world_size=self.info.world_size, num_workers=self.num_workers)

    # --- checkpoints ------------------------------------------------------------------

    def _rng(self) -> dict:
        r = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            r["cuda"] = torch.cuda.get_rng_state(self.device)
        return r

    def _state(self, epoch_loss: list, rngs: list[dict]) -> dict:
        """`epoch_loss`: the epoch's loss over all processes; `rngs`: every process's
        generators, in rank order (rank 0's also as rng_cpu/rng_cuda, as before DDP kept them)."""
        s = {
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
            "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(), "epoch_loss": epoch_loss,
            "best_err": self.best_err, "best_epoch": self.best_epoch, "rng_cpu": rngs[0]["cpu"], "rng_ranks": rngs,
            "train_images": len(self.data.train), "epoch_time": self._epoch_seconds(),
            # what fixes each epoch's order: a config.json edited to others is refused on resume
            "batch_size": self.cfg.train.batch_size, "seed": self.cfg.train.seed,
        }
        if "cuda" in rngs[0]:
            s["rng_cuda"] = rngs[0]["cuda"]
        return s

    def save_checkpoint(self) -> Path:
        """checkpoints/step-N/{model.safetensors,state.pt}, then last.json names it; older
        step folders beyond `keep_checkpoints` are removed only after that. A step saved
        again (mid-epoch, then at the epoch's end, with validation done) goes to step-N.1, step-N.2,
        ...: the folder last.json names is never touched until last.json names another."""
        tensors = [t.detach() for t in self.model.state_dict().values() if t.is_floating_point()]
        if not bool(torch.stack([t.abs().amax() for t in tensors if t.numel()]).isfinite().all()):
            # a finite loss, then an update that overflowed: no checkpoint for a resume to refuse
            raise TrainingError(f"the weights became NaN or infinite by step {self.step} (epoch {self.epoch + 1}), "
                                f"the loss still finite; a lower learning rate may help")
        ck = self.run_dir / "checkpoints"
        name = f"step-{self.step:08d}"
        final = ck / name
        # what is not the same on every process: each one's share of the epoch's loss, and
        # its generators (its own dropout masks)
        loss, count = all_reduce_sum(torch.tensor(self.epoch_loss, dtype=torch.float64), self.info).tolist()
        rngs = gather_objects(self._rng(), self.info)
        if self.info.is_main:
            same_step = [p for p in _step_folders(ck) if _step_key(p.name)[0] == self.step]
            n = 0
            while (ck / name).exists():
                n += 1
                name = f"step-{self.step:08d}.{n}"
            final = ck / name
            tmp = ck / f".{name}.partial"
            try:
                with _writing(f"checkpoint {final}"):
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                    save_model(tmp / "model.safetensors", self.model, self.classes, self.data.stats,
                               self.preprocess, {"epoch": self.epoch, "step": self.step,
                                                 "class_names": self.class_names})
                    save_state(tmp / "state.pt", self._state([loss, int(count)], rngs))
                    os.replace(tmp, final)
                    self._name_last(name)
            except RunWriteError:
                # give back the space of a half checkpoint, or of a whole one last.json does not name
                shutil.rmtree(tmp, ignore_errors=True)
                if final.exists():
                    _discard(final)
                raise
            older = [p for p in _step_folders(ck) if p != final and p not in same_step]
            # same_step: superseded; never `final`, which last.json names now
            for old in [*same_step, *older[:max(len(older) - self.cfg.train.keep_checkpoints + 1, 0)]]:
                _discard(old)
        self._saved = (self._position(), final)
        return final

    def _name_last(self, name: str) -> None:
        atomic_write_text(self.run_dir / "checkpoints" / "last.json", json.dumps(
            {"dir": name, "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}) + "\n")

    def _position(self) -> tuple[int, int, int]:
        return self.epoch, self.step, self.batch_in_epoch

    def _last_checkpoint(self) -> tuple[Path, Checkpoint, dict]:
        """The folder, model file and training state of the checkpoint last.json names (or,
        with last.json lost or unreadable, of the newest step folder: each is complete, as
        it is written under another name and renamed)."""
        ck = self.run_dir / "checkpoints"
        last = self._last()
        if last is None or "dir" not in last:
            steps = _step_folders(ck)
            if not steps:
                if not (ck / "last.json").exists():
                    raise CheckpointError(f"{self.run_dir} has no checkpoint to resume from (the run stopped "
                                          f"before its first); {START_OVER}")
                raise CheckpointError(f"{self.run_dir} has no readable checkpoints/last.json and no step "
                                      f"folder to resume from")
            how = "unreadable" if (ck / "last.json").exists() else "missing"
            if self.info.is_main:
                warnings.warn(f"{ck / 'last.json'} is {how}: resuming from the newest step folder, "
                              f"{steps[-1].name}", RuntimeWarning, stacklevel=2)
            last = {"dir": steps[-1].name}
        name = last["dir"]
        if not isinstance(name, str) or not STEP_DIR.fullmatch(name):
            # only this run's own step folders: never another run's, never a path out of it
            raise CheckpointError(f"{ck / 'last.json'} names {name!r}, not a step folder of this run")
        folder = ck / name
        return folder, load_model_file(folder / "model.safetensors"), load_state(folder / "state.pt")

    def _load_last(self, folder: Path, model_file: Checkpoint, state: dict) -> None:
        ck = folder.parent
        if model_file.model_config != self.cfg.model:
            raise CheckpointError(f"{folder / 'model.safetensors'} and {self.run_dir / 'config.json'} disagree on "
                                  f"{_first_difference(model_file.model_config, self.cfg.model)}")
        saved_n = state.get("train_images")  # (not in checkpoints before it was kept)
        if saved_n is not None and saved_n != len(self.data.train):
            raise CheckpointError(f"{folder} was saved with {saved_n} training images and the data now has "
                                  f"{len(self.data.train)}: the epochs' order would not be the run's; "
                                  f"start a new run")
        if list(model_file.classes) != list(self.classes):  # a class folder renamed: labels would move
            raise CheckpointError(f"{folder} was saved with the classes {_names(model_file.classes)} and the "
                                  f"data now has {_names(self.classes)}: its labels would mean other classes; "
                                  f"start a new run")
        for key in ("batch_size", "seed"):  # (not in checkpoints before they were kept)
            if key in state and state[key] != getattr(self.cfg.train, key):
                raise CheckpointError(f"{folder} was saved with train.{key} {state[key]} and "
                                      f"{self.run_dir / 'config.json'} now says {getattr(self.cfg.train, key)}: "
                                      f"the epochs' order would not be the run's; put it back or start a new run")
        saved_size = model_file.preprocess.get("image_size")
        if saved_size is not None and saved_size != self.cfg.data.image_size:  # the mean image is of its size
            raise CheckpointError(f"{folder} was saved with data.image_size {saved_size} and "
                                  f"{self.run_dir / 'config.json'} now says {self.cfg.data.image_size}: the "
                                  f"run's mean image is {saved_size}x{saved_size}; put it back or start a new run")
        self.model.load_state_dict(model_file.state_dict)
        # the momentum buffers and the rate they were made at come from the checkpoint;
        # momentum, weight decay and the update's form from the config as it is now (an
        # edit of config.json is taken, as for the other train settings), and the device
        fresh = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, settings in zip(self.optimizer.param_groups, fresh):
            group.update(settings)
        self.schedule.load_state_dict(state["schedule"])
        if state["scaler"]:  # (empty: saved without fp16; a resume into fp16 starts its scale afresh)
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        # the sum over all processes: rank 0 carries it on, the others add from zero
        self.epoch_loss = list(state["epoch_loss"]) if self.info.is_main else [0.0, 0]
        self.best_err = state["best_err"]
        self.best_epoch = state.get("best_epoch")  # (not in checkpoints before it was kept)
        self.epoch_time = float(state.get("epoch_time", 0.0))  # (not in checkpoints before it was kept)
        self._saved = (self._position(), folder)
        rngs = state.get("rng_ranks") or []
        own = rngs[self.info.rank] if len(rngs) == self.info.world_size else \
            {"cpu": state["rng_cpu"], **({"cuda": state["rng_cuda"]} if "rng_cuda" in state else {})}
        torch.set_rng_state(own["cpu"])
        if "cuda" in own and self.device.type == "cuda":
            torch.cuda.set_rng_state(own["cuda"], self.device)
        if len(rngs) != self.info.world_size and self.info.rank:
            # saved by another number of processes: fresh masks of its own, not rank 0's again
            torch.manual_seed(rank_seed(self.cfg.train.seed + self.step, self.info.rank))
        self.history = [r for r in self._read_log() if r["epoch"] <= self.epoch]
        if self.info.is_main:  # drop log lines of epochs after the checkpoint
            self._remove_stale_temp()
            for p in _step_folders(ck):  # written, but a kill came before last.json named them
                if _step_key(p.name) > _step_key(folder.name):
                    _discard(p)
            self._write_log()
            if (self._last() or {}).get("dir") != folder.name:  # resumed without last.json: name it again
                with _writing(str(ck / "last.json")):
                    self._name_last(folder.name)
            self._restore_best()
            for f in ("stopped", "diverged"):
                (self.run_dir / f).unlink(missing_ok=True)

    def _read_log(self) -> list[dict]:
        path = self.run_dir / "log.jsonl"
        if not path.exists():
            return []
        lines = path.read_text(errors="replace").splitlines()
        rows = []
        for n, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if _is_log_row(row):
                rows.append(row)
            elif line.strip() and n < len(lines):  # (a torn last line goes without a word)
                # one damaged line costs itself, not the rows after it: the resume rewrites the log
                warnings.warn(f"{path} line {n} is not a log row; left out", RuntimeWarning, stacklevel=2)
        return rows

    def _write_log(self) -> None:
        with _writing(str(self.run_dir / "log.jsonl")):
            atomic_write_text(self.run_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))

    # --- the loop -------------------------------------------------------------------

    def _set_lr(self) -> float:
        lr = self.schedule.lr(self.step)
        set_lr(self.optimizer, lr, self.cfg.train.momentum_form)
        return lr

    def _train_step(self, x: torch.Tensor | RawBatch, y: torch.Tensor) -> torch.Tensor:
        """One SGD step; returns the loss as a tensor on the device, not read back (`_sync`)."""
        x = to_device(x, self.device)
        y = y.to(self.device, non_blocking=True)
        if isinstance(x, RawBatch):
            x = self.train_transform.finish(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.amp):
            logits = self.net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.train.label_smoothing)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def _sync(self) -> None:
        """Read back the losses of the steps since the last call (one copy from the device),
        raise `TrainingError` naming the first step whose loss was not finite on any
        process (one collective under DDP, which every process reaches at the same step),
        and add them to the epoch's loss. A non-finite step's update has been applied in
        memory, but no checkpoint is written before this check, so the newest checkpoint
        stays the last good one."""
        steps, losses, sizes = zip(*self._pending)
        self._pending = []
        values = torch.stack(losses).float().cpu()
        finite = torch.isfinite(values)
        # per step: how many processes saw a non-finite loss, and the sum of those losses
        # (the value itself where one process did)
        n = len(values)
        flags = torch.cat([(~finite).double(), torch.where(finite, 0.0, values).double()])
        all_reduce_sum(flags, self.info)
        bad = flags[:n].nonzero()
        if len(bad):
            i = int(bad[0])
            raise TrainingError(f"the loss became {flags[n + i].item()} at step {steps[i]} (epoch {self.epoch + 1})")
        for v, size in zip(values.tolist(), sizes):
            self.epoch_loss[0] += v * size
            self.epoch_loss[1] += size
        self._last_loss = float(values[-1])

    def _validate(self) -> Metrics:
        d = self.cfg.data
        loader = eval_loader(self.data.val, self.data.stats, self.crop, self.per_rank_batch, d.ten_crop,
                             d.pixel_scale, self.num_workers, self.info,
                             on_device=self.augment_on == "device")
        # rank 0 shows its own share (every W-th image): the others' go at its pace
        share = len(range(self.info.rank, len(self.data.val), self.info.world_size))
        prog = Progress(share, f"validate {self.epoch + 1}", enabled=not self.quiet)
        net = self.net
        if self.info.enabled and any(True for _ in self.model.buffers()):
            # not through the DDP wrapper: its forward broadcasts rank 0's buffers (BatchNorm's),
            # so every process must run as many, and one with fewer batches to validate (none,
            # with fewer images than processes) ran fewer: the others waited until the timeout.
            # (A network without buffers has no collective in its forward: the wrapper, as ever.)
            broadcast_buffers(self.model, self.info)
            net = self._eval_net
        m = evaluate_model(net, loader, self.cfg.model.num_classes, self.device, self.amp,
                           self.channels_last, self.info, prog)
        prog.close()
        return m

    def _request_stop(self, signum, frame) -> None:
        self.stop_requested = True
        if not self.quiet:
            with contextlib.suppress(OSError):  # (stdout's reader may be gone: Ctrl-C ended `| tee` too)
                print(f"\nalexnet: {signal.Signals(signum).name}: finishing this step, then saving", flush=True)

    def fit(self, keep_lock: bool = False) -> dict:
        """Train to the end (or a stop request); returns a summary dict. The run folder's
        lock is given up at the end, unless `keep_lock` (then `close()` gives it up): for
        `finish_run`, so that no resume can come in between."""
        with on_stop_signals(self._request_stop):
            try:
                return self._fit()
            except (LoaderWorkerError, DataSourceError) as e:  # (a worker's, or the data's own, as without workers)
                raise TrainingError(f"data loading failed at step {self.step + 1}: {str(e).splitlines()[0]}; "
                                    f"{self._resume_hint()}") from None
            except RunWriteError as e:
                raise RunWriteError(f"{e}; {self._resume_hint()}") from None
            except TrainingError as e:
                if self.info.is_main:
                    with contextlib.suppress(OSError):
                        atomic_write_text(self.run_dir / "diverged", str(e) + "\n")
                where = (f"the last good checkpoint is in {self.run_dir / 'checkpoints'}" if self._last() is not None
                         else "no checkpoint was written before it")
                raise TrainingError(f"{e}; {where}") from None
            except RuntimeError as e:
                raise self._lost(e, self._resume_hint()) from None
            finally:
                if not keep_lock:
                    self._unlock()  # the run's files are all written: another trainer may take the folder

    def _last(self) -> dict | None:
        """checkpoints/last.json, or None when there is none (or none readable: an OSError,
        bad JSON or bytes that are not UTF-8, or no JSON object)."""
        try:
            last = json.loads((self.run_dir / "checkpoints" / "last.json").read_text())
        except (OSError, ValueError):
            return None
        return last if isinstance(last, dict) else None

    def _lost(self, e: RuntimeError, hint: str) -> RuntimeError:
        """The one-line TrainingError for `e` when it is the process group's word that another
        process has gone (`lost_process`), with `hint`; any other error as it is."""
        reason = lost_process(e, self.info)
        if reason is None:
            return e
        return TrainingError(f"another process of this run is gone or not answering ({reason}); {hint}")

    def _shared(self) -> Shared | None:
        """Under torchrun, the collectives a pass split among the processes adds up with."""
        from alexnet.sources import Shared

        if not self.info.enabled:
            return None
        return Shared(self.info.rank, self.info.world_size, lambda flag: any_process(flag, self.info),
                      lambda a: sum_on_host(a, self.info))

    def _check_same_everywhere(self, cfg: RunConfig, data: dict) -> None:
        """Under torchrun, every process's settings and data (`data`: what `open_data` says
        it trains on) as rank 0's: a node started with another --lr or --data trained on
        silently, another batch size ended in Gloo's abort. Before any other collective:
        one that a process on other data (a store, not its folder) skips waits for ever."""
        if not self.info.enabled:
            return
        mine = {**to_dict(cfg), **data}
        try:
            every = gather_objects(mine, self.info)
        except RuntimeError as e:
            raise self._lost(e, "nothing was trained yet; run the same command again") from None
        for rank, theirs in enumerate(every):
            if theirs != every[0]:
                key = _first_key_difference(every[0], theirs)
                raise ConfigError(f"process {rank} of this run differs from process 0 in {key} "
                                  f"({_short(theirs, key)} against {_short(every[0], key)}); every node must "
                                  f"run the same command on the same data at the same path")

    def _resume_hint(self) -> str:
        # this process's own record of what it saved (every process keeps it), then the run
        # folder's last.json: a process on another node may not see the folder rank 0 writes
        saved = getattr(self, "_saved", None)
        if saved is not None:
            return f"the checkpoint of step {saved[0][1]} is intact; continue with: {self.resume_command()}"
        last = self._last()
        if last is None:
            return f"no checkpoint was written yet; {START_OVER}"
        return f"the checkpoint of step {last.get('step')} is intact; continue with: {self.resume_command()}"

    def resume_command(self) -> str:
        """The command that continues this run (under torchrun: torchrun's, as it was started)."""
        again = f"alexnet train --resume {self.run_dir}"
        return f"the same torchrun command with -m {again}" if self.info.enabled else again

    def _epoch_seconds(self) -> float:
        """Seconds of training in this epoch so far: before a resume (from the checkpoint)
        and in the stretch under way."""
        now = time.perf_counter() - self._stretch_t0 if self._stretch_t0 is not None else 0.0
        return self.epoch_time + now

    def _training_left(self) -> bool:
        """Whether steps, or an epoch's validation, remain: an epoch with steps done is not
        over until its validation, so a checkpoint of its last step (checkpoint_every, or a
        stop at it) resumes into the validation alone."""
        return self.epoch < self.cfg.train.epochs and (self.step < self.total_steps or self.batch_in_epoch > 0)

    def _fit(self) -> dict:
        t = self.cfg.train
        if not self.quiet:
            print(f"run {self.run_dir}: {self.cfg.model.variant} AlexNet, {len(self.classes)} classes, "
                  f"{len(self.data.train)} training / {len(self.data.val)} validation images, "
                  f"{self.total_steps} step{'s' if self.total_steps != 1 else ''} of {t.batch_size} "
                  f"({self.steps_per_epoch}/epoch), "
                  f"{self.device}, amp {self.amp or 'off'}, channels-last {'on' if self.channels_last else 'off'}, "
                  f"augmentation in the {self.augment_on}"
                  f"{f', {self.info.world_size} processes' if self.info.enabled else ''}", flush=True)
            if not self._training_left():
                print(f"the run's training was complete (step {self.step} of {self.total_steps}); "
                      f"nothing to train", flush=True)
        while self._training_left():
            if any_process(self.stop_requested, self.info):  # asked during validation: the
                return self._stop()                         # epoch's checkpoint is written
            self.net.train()
            steps_left = max(0, min(self.steps_per_epoch - self.batch_in_epoch, self.total_steps - self.step))
            loader = self._train_loader(self.epoch, self.batch_in_epoch) if steps_left else ()
            prog = Progress(steps_left * t.batch_size, f"epoch {self.epoch + 1}/{t.epochs}",
                            enabled=not self.quiet and steps_left > 0)
            self._stretch_t0 = time.perf_counter()
            for x, y in loader:
                lr = self._set_lr()
                loss = self._train_step(x, y)
                self.step += 1
                self.batch_in_epoch += 1
                self._pending.append((self.step, loss, len(y)))
                checkpoint = bool(t.checkpoint_every) and self.step % t.checkpoint_every == 0
                last = self.step >= self.total_steps or self.batch_in_epoch >= self.steps_per_epoch
                # a stop request is read after every step; under DDP every process learns
                # of any one's (8 bytes host to host) and all stop after the same step
                stop = any_process(self.stop_requested, self.info)
                if checkpoint or last or stop or len(self._pending) >= t.log_every:
                    self._sync()
                figures = {} if self._last_loss is None else {"loss": self._last_loss}
                prog.update(len(y) * self.info.world_size, **figures, lr=lr)
                if checkpoint:
                    self.save_checkpoint()
                if stop:
                    prog.close()
                    return self._stop()
                if self.step >= self.total_steps:
                    break
            if self._pending:  # (an epoch always ends on a read-back; this is for a short loader)
                self._sync()
            speed = prog.close() if steps_left else None  # its steps ran before the resume
            self.epoch_time, self._stretch_t0 = self._epoch_seconds(), None
            self._end_epoch(speed, self.epoch_time)
        if any_process(self.stop_requested, self.info):  # asked during the last validation: a
            return self._stop()                          # stop, not on to the test set
        return {"stopped": False, "step": self.step, "epochs": self.epoch,
                "best": str(self.run_dir / "best.safetensors"), "best_top1_err": self.best_err}

    def _stop(self) -> dict:
        # nothing has run since a checkpoint of this very position (a stop asked during the
        # epoch-end validation, or at a checkpoint_every step): it is the stop's checkpoint
        saved = self._saved
        path = saved[1] if saved is not None and saved[0] == self._position() else self.save_checkpoint()
        if self.info.is_main:
            with _writing(str(self.run_dir / "stopped")):
                atomic_write_text(self.run_dir / "stopped", f"stopped at step {self.step}\n")
        return {"stopped": True, "step": self.step, "checkpoint": str(path)}

    def _end_epoch(self, speed: float | None, train_time: float) -> None:
        m = self._validate()
        loss_sum = torch.tensor(self.epoch_loss, dtype=torch.float64)
        all_reduce_sum(loss_sum, self.info)
        row = {"epoch": self.epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": float(loss_sum[0] / max(loss_sum[1], 1)), "val_loss": m.loss,
               "val_top1_err": m.top1_err, "val_top5_err": m.top5_err, "train_img_s": speed,
               "train_time_s": train_time}
        if not self.quiet:
            print(format_metrics(m, f"epoch {self.epoch + 1} validation"), flush=True)
        if self.schedule.epoch_end(m.top1_err) and not self.quiet:
            print(f"validation error stopped improving: learning rate divided by "
                  f"{1 / self.cfg.train.lr_drop:g} (drop {self.schedule.drops} of {self.cfg.train.max_lr_drops})")
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_loss = [0.0, 0]
        self.epoch_time = 0.0
        improved = m.top1_err < self.best_err
        if improved:
            self.best_err, self.best_epoch = m.top1_err, self.epoch
        # the log before the checkpoint (a resume from the previous one redoes this epoch and
        # drops its line), best.safetensors after it (a resume from this one writes it again,
        # _restore_best): so best never holds weights of an epoch that a resume redoes
        if self.info.is_main:
            self.history.append(row)
            self._write_log()
            from alexnet.plots import plot_curves

            with _writing(str(self.run_dir / "curves.png")):
                plot_curves(self.history, self.run_dir / "curves.png")
        self.save_checkpoint()
        if self.info.is_main and improved:
            self._save_best(m.top1_err, m.top5_err)

    def _save_best(self, top1_err: float, top5_err: float | None) -> None:
        with _writing(str(self.run_dir / "best.safetensors")):
            save_model(self.run_dir / "best.safetensors", self.model, self.classes, self.data.stats,
                       self.preprocess, {"epoch": self.epoch, "step": self.step, "val_top1_err": top1_err,
                                         "val_top5_err": top5_err, "class_names": self.class_names})

    def _restore_best(self) -> None:
        """A kill between the epoch's checkpoint and best.safetensors: the checkpoint resumed
        from holds the best weights, so write them now, as that epoch would have."""
        if self.best_epoch != self.epoch or self.batch_in_epoch:
            return
        if (saved_extra(self.run_dir / "best.safetensors") or {}).get("epoch") == self.epoch:
            return
        row = next((r for r in self.history if r.get("epoch") == self.epoch), {})
        self._save_best(self.best_err, row.get("val_top5_err"))

    def close(self) -> None:
        self._unlock()
        # DDP holds the process group: destroy_process_group alone leaves it (and Gloo's
        # threads) alive until the interpreter's exit, where ending them aborted the process
        self.net = self._eval_net = self.model
        shutdown(self.info)



def finish_run(trainer: Trainer, test: bool = True) -> dict | None:
    """After training: evaluate the best weights on the source's test split (if it has
    one) and print where everything is."""
    from alexnet.evaluate import evaluate_checkpoint, report_folder

    run = trainer.run_dir
    best = run / "best.safetensors"
    result = None
    if test and trainer.data.test is not None:
        held = trainer._lock_fd is not None  # still held from fit(keep_lock=True)
        if not held:
            trainer._lock()  # eval-test/ is the run's too: no resume of it may write there meanwhile
        try:
            result = evaluate_checkpoint(best, dataset=trainer.data.test,
                                         out_dir=report_folder(best, "test", trainer.cfg.data.ten_crop),
                                         ten_crop=trainer.cfg.data.ten_crop, device=str(trainer.device),
                                         workers=trainer.num_workers, label="test", augment_on=trainer.augment_on)
        finally:
            if not held:
                trainer._unlock()
    print(f"run folder: {run}")
    print(f"checkpoint: {best}")
    print(f"plots:      {run / 'curves.png'}" + (f", {result['confusion_png']}" if result and "confusion_png" in result
                                                  else ""))  # (drawn for up to 100 classes)
    if result:
        print(f"test accuracy: {100 * result['top1_acc']:.2f}% (top-1 error {100 * result['top1_err']:.2f}%)")
    return result
