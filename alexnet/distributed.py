"""Data-parallel training on PyTorch's own engine: `torchrun --nproc_per_node=N -m alexnet
train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; we join the process group (NCCL on CUDA,
Gloo on CPU), and only rank 0 writes logs and checkpoints."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from alexnet.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    if device.type == "cpu" and device.index not in (None, 0):
        raise ConfigError(f"device {name!r}: the CPU is one device, use cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name} was asked for but no CUDA device is available")
        gpus = torch.cuda.device_count()
        if device.index is not None and device.index >= gpus:
            raise ConfigError(f"device {name}: this machine has {gpus} CUDA device(s), numbered from 0")
        # torchrun's processes on this machine each take a GPU of their own (NCCL refuses two
        # processes on one GPU, with a traceback, at the first collective). Where each sees
        # one GPU only (a launcher's CUDA_VISIBLE_DEVICES per process), that one is its own.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if info.enabled else 1
        if local > 1 and gpus > 1 and device.index is not None:
            raise ConfigError(f"device {name} under torchrun with {local} processes on this machine would put them "
                              f"all on one GPU; use --device cuda (each process takes the GPU of its LOCAL_RANK)")
        if gpus > 1 and local > gpus:
            raise ConfigError(f"torchrun started {local} processes on this machine, which has {gpus} CUDA "
                              f"devices: one GPU each; use --nproc-per-node {gpus}")
        if device.index is None:
            device = torch.device("cuda", info.local_rank % gpus)
        torch.cuda.set_device(device)
    return device


def resolve_workers(n: int, device: torch.device) -> int:
    """Loader processes for `data.num_workers` n (-1: auto). On a CPU a worker takes a core
    from the model, which measured slower than loading in the main process."""
    if n >= 0:
        return n
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


def resolve_augment(choice: str, device: torch.device) -> str:
    """Where the augmentation runs for `data.augment_on` ("auto": on the device when it is
    a GPU, whose loader processes then only copy uint8 images; in the loader on a CPU,
    where the loop over the images beats the whole-batch gathers)."""
    if choice != "auto":
        return choice
    return "device" if device.type == "cuda" else "loader"


def init_distributed(device_name: str, timeout_s: float = 0.0) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; a no-op for a single process.
    `timeout_s`: how long a collective waits for the other processes (0: the backend's own)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name, info)
    global _FLAG_GROUP
    if info.enabled and not dist.is_initialized():
        limit = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s > 0 else {}
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **limit)
        except (RuntimeError, dist.DistError) as e:  # a process (a node) that never joined
            text = str(e).strip()
            first = text.splitlines()[0] if text else type(e).__name__
            raise ConfigError(f"the {world} processes of this run did not all join ({first.rstrip('.')}); one "
                              f"that ended at once (an error in its own command?) or never started; every node "
                              f"must run the same command") from None
        # flags agreed every step go host to host, never through (and waiting for) the GPU
        _FLAG_GROUP = dist.new_group(backend="gloo", **limit) if dist.get_backend() == "nccl" else None
    return info, device


_FLAG_GROUP = None  # a Gloo group beside NCCL's; None: the default group (already Gloo)


def any_process(flag: bool, info: DistInfo) -> bool:
    """Whether `flag` is true on any process: one 8-byte host collective, which every
    process must reach at the same point."""
    if not info.enabled:
        return flag
    t = torch.tensor([float(flag)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_FLAG_GROUP)
    return t.item() > 0


def sum_on_host(a: np.ndarray, info: DistInfo) -> np.ndarray:
    """int64 `a` summed over the processes host to host (the Gloo group, beside NCCL's):
    a process lost meanwhile is an error here at once, not a wait in a copy from the GPU
    until NCCL's watchdog ends the process (every process must call this)."""
    if not info.enabled:
        return a
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_FLAG_GROUP)
    return t.numpy()


def gather_objects(obj, info: DistInfo) -> list:
    """`obj` of every process, in rank order (every process must call this)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj, group=_FLAG_GROUP)
    return out


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj`, on every process (every process must call this)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_FLAG_GROUP)
    return box[0]


def broadcast_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers (BatchNorm's running statistics) on every process, in place (every
    process must call this): what a DistributedDataParallel forward does first, for a
    network that then runs without its wrapper."""
    if info.enabled:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `t` over the processes, in place; CPU tensors travel through the GPU under NCCL."""
    if info.enabled:
        if dist.get_backend() == "nccl" and not t.is_cuda:
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
            t.copy_(on_gpu.cpu())
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shutdown(info: DistInfo) -> None:
    global _FLAG_GROUP
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
        _FLAG_GROUP = None


@contextlib.contextmanager
def on_stop_signals(handler):
    """SIGINT and SIGTERM (Ctrl-C, a cluster's pre-emption, torchrun passing one on) go to
    `handler` inside the block; the handlers before it come back after it. Main thread only."""
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def lost_process(e: BaseException, info: DistInfo) -> str | None:
    """What the process group said, in one line, when `e` is its error because another
    process of the run has gone (killed, crashed, out of memory): Gloo raises a RuntimeError
    that names its own source file, NCCL a DistBackendError. None for any other error."""
    if not info.enabled or not isinstance(e, RuntimeError):
        return None
    text = str(e).strip()
    if not (isinstance(e, dist.DistError) or "gloo" in text.lower() or "nccl" in text.lower()):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else "")  # Gloo's "[.../pair.cc:553] "
    return first.split(". ")[0].rstrip(".") or type(e).__name__
