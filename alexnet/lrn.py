"""Local response normalisation across channels (section 3.3 of the paper).

b[i] = a[i] / (k + alpha_sum * sum_{j=max(0,i-h)}^{min(N-1,i+h)} a[j]^2) ** beta,  h = n // 2

with alpha_sum = alpha in the paper's form and alpha / n in Caffe's.

Two implementations of the same math, each with a hand-written backward that keeps only
the input for the backward pass:

  "c"      a fused C kernel (csrc/lrn.c), one pass over memory forward and one backward,
           for float32 CPU tensors in NCHW or channels_last layout (and bfloat16/float16
           CPU tensors, computed in float32). It is compiled with the system C compiler on
           first use and cached in $ALEXNET_CACHE (default ~/.cache/alexnet), keyed by a
           hash of the source, the compiler command and the CPU.
  "torch"  plain torch operations: everything else (CUDA, float64, no compiler), or
           everything when the environment variable ALEXNET_LRN=torch.

`backend(x)` says which one runs for a tensor.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from alexnet.config import LRNConfig
from alexnet.fileio import cache_dir

# ---------------------------------------------------------------------------------------
# The pure-torch path.


def _window_sum(v: torch.Tensor, size: int) -> torch.Tensor:
    """Sum over the `size` neighbouring channels (dim 1), zero beyond the edges."""
    s = v.clone()
    for j in range(1, size // 2 + 1):
        s[:, j:] += v[:, :-j]
        s[:, :-j] += v[:, j:]
    return s


def _torch_denominator(x: torch.Tensor, size: int, alpha_sum: float, k: float) -> torch.Tensor:
    return _window_sum(x * x, size).mul_(alpha_sum).add_(k)  # k + alpha * sum a^2


class _TorchLRN(torch.autograd.Function):
    """In float32 at least, as the C kernel computes: in float16 a^2 overflows from |a| = 256
    on, and the whole window's outputs became 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha_sum: float, beta: float, k: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.hyper = (size, alpha_sum, beta, k)
        xf = _wide(x)
        return (xf * _torch_denominator(xf, size, alpha_sum, k).pow_(-beta)).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        dtype = x.dtype
        x, g = _wide(x), _wide(g)
        size, alpha_sum, beta, k = ctx.hyper
        # dy[i]/dx[j] = scale[i] [i == j] - 2 alpha beta x[i] scale[i] / d[i] x[j] for j in window(i);
        # the window is symmetric, so the sum over i runs over window(j).
        d = _torch_denominator(x, size, alpha_sum, k)
        gs = g * d.pow(-beta)
        t = gs * x / d
        grad = gs - _window_sum(t, size) * x * (2.0 * alpha_sum * beta)
        return grad.to(dtype), None, None, None, None


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 if it is in a narrower float type (float64 stays)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ---------------------------------------------------------------------------------------
# The C kernel: built on first use, loaded with ctypes.

_SOURCE = Path(__file__).with_name("csrc") / "lrn.c"
# -fno-math-errno lets sqrtf vectorise (it only stops errno being set); no -ffast-math, so
# results round as written and loading the library leaves the process's FPU flags alone.
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_failed = False


def _cpu_id() -> bytes:
    """What -march=native depends on, so that a cache shared between machines stays safe."""
    try:
        with open("/proc/cpuinfo", "rb") as f:
            return b"".join(line for line in f if line.startswith((b"model name", b"flags")))
    except OSError:
        return platform.processor().encode()


def _build() -> Path:
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or shutil.which("gcc") or ""]
    if not cc[0]:
        raise RuntimeError("no C compiler: cc and gcc are not on PATH and CC is not set")
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join((*cc, *_FLAGS)).encode(), _cpu_id()]))
    lib = cache_dir() / f"lrn-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name and rename: a concurrent process sees no file or a whole one.
    fd, tmp = tempfile.mkstemp(prefix="lrn-", suffix=".so.tmp", dir=lib.parent)
    os.close(fd)
    try:
        done = subprocess.run([*cc, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
            raise RuntimeError(f"{cc[0]} failed: {lines[0]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load() -> ctypes.CDLL | None:
    """The kernel library, or None (after one warning) when it cannot be built."""
    global _lib, _lib_failed
    with _lock:
        if _lib is None and not _lib_failed:
            try:
                lib = ctypes.CDLL(str(_build()))
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _lib_failed = True
                msg = " ".join(str(e).split())
                warnings.warn(f"alexnet.lrn: C kernel unavailable ({msg}); using the slower torch path",
                              RuntimeWarning, stacklevel=3)
                return None
            p, long, f = ctypes.c_void_p, ctypes.c_long, ctypes.c_float
            common = [long, long, long, ctypes.c_int, f, f, f, ctypes.c_int]  # N, C, H*W, size, ...
            for name in ("lrn_forward_nchw", "lrn_forward_nhwc"):
                getattr(lib, name).argtypes = [p, p, *common]  # x, y
            for name in ("lrn_backward_nchw", "lrn_backward_nhwc"):
                getattr(lib, name).argtypes = [p, p, p, *common]  # x, g, dx
            i = ctypes.c_int
            shape = [long, long, long, long, i, f, f, f, i, i, i]  # N, H, W, C, size, ..., z, s, threads
            for suffix in ("", "_bf16"):
                getattr(lib, f"block_forward_nhwc{suffix}").argtypes = [p, p, p, *shape]  # x, y, idx (or NULL)
                getattr(lib, f"block_backward_nhwc{suffix}").argtypes = [p, p, p, p, *shape]  # x, idx, gy, gx
            _lib = lib
        return _lib


def _kernel(name: str, x: torch.Tensor, *more: torch.Tensor, hyper: tuple[int, float, float, float]) -> torch.Tensor:
    """Runs lrn_{name}_{layout}(x, *more, out) in float32 and returns out in x's dtype."""
    # channels_last when x is stored so; NCHW otherwise (copying x if it is not dense).
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        fmt, layout = torch.channels_last, "nhwc"
    else:
        fmt, layout = torch.contiguous_format, "nchw"
    args = [t.to(torch.float32).contiguous(memory_format=fmt) for t in (x, *more)]
    out = torch.empty_like(args[0])
    n, c, h, w = out.shape
    fn = getattr(_lib, f"lrn_{name}_{layout}")
    fn(*(t.data_ptr() for t in args), out.data_ptr(), n, c, h * w, *hyper, torch.get_num_threads())
    return out.to(x.dtype)


class _KernelLRN(torch.autograd.Function):
    """CPU tensors of _KERNEL_DTYPES; half-precision ones are computed in float32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha_sum: float, beta: float, k: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.hyper = (size, alpha_sum, beta, k)
        return _kernel("forward", x, hyper=ctx.hyper)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        return _kernel("backward", x, g, hyper=ctx.hyper), None, None, None, None


# ---------------------------------------------------------------------------------------
# ReLU -> LRN -> max-pool as one kernel (channels_last float32 or bfloat16 CPU tensors).

_BLOCK_DTYPES = {torch.float32: "", torch.bfloat16: "_bf16"}  # bfloat16: computed in float32


def _block_call(name: str, x: torch.Tensor, *rest, lrn: LRNConfig | None, pool: tuple[int, int]):
    """Runs block_{name}_nhwc (for x's dtype) on x and the tensors `rest` (None: NULL)."""
    n, c, h, w = x.shape
    size, alpha, beta, k = (lrn.size, lrn.alpha_sum, lrn.beta, lrn.k) if lrn else (0, 0.0, 0.0, 0.0)
    ptrs = [t.data_ptr() if t is not None else None for t in rest]
    fn = getattr(_lib, f"block_{name}_nhwc{_BLOCK_DTYPES[x.dtype]}")
    fn(x.data_ptr(), *ptrs, n, h, w, c, size, alpha, beta, k, *pool, torch.get_num_threads())


def _pooled(x: torch.Tensor, pool: tuple[int, int]) -> tuple[int, int, int, int]:
    z, s = pool
    n, c, h, w = x.shape
    return n, c, (h - z) // s + 1, (w - z) // s + 1


class _BlockFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lrn: LRNConfig | None, pool: tuple[int, int]) -> torch.Tensor:
        y = torch.empty(_pooled(x, pool), dtype=x.dtype, memory_format=torch.channels_last)
        idx = torch.empty(y.shape, dtype=torch.uint8, memory_format=torch.channels_last)
        _block_call("forward", x, y, idx, lrn=lrn, pool=pool)
        ctx.save_for_backward(x, idx)
        ctx.hyper = (lrn, pool)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: torch.Tensor):
        x, idx = ctx.saved_tensors
        lrn, pool = ctx.hyper
        gx = torch.empty_like(x)
        gy = gy.to(x.dtype).contiguous(memory_format=torch.channels_last)
        _block_call("backward", x, idx, gy, gx, lrn=lrn, pool=pool)
        return gx, None, None


def block_fusable(x: torch.Tensor) -> bool:
    """Whether relu_lrn_pool runs as one kernel for x: float32 or bfloat16 channels_last
    CPU tensors (with the C kernel built and ALEXNET_LRN not set to torch)."""
    return (x.dim() == 4 and x.device.type == "cpu" and x.dtype in _BLOCK_DTYPES and x.shape[1] > 1
            and x.is_contiguous(memory_format=torch.channels_last)
            and os.environ.get("ALEXNET_LRN") != "torch" and _load() is not None)


def relu_lrn_pool(x: torch.Tensor, lrn: LRNConfig | None, pool: tuple[int, int] = (3, 2)) -> torch.Tensor:
    """max_pool2d(local_response_norm(relu(x)), z, s) (no LRN when `lrn` is None) in one pass
    over memory each way; for tensors that block_fusable() rejects, the same ops one by one.
    x is not modified. The result is channels_last."""
    z, s = pool
    if x.dim() == 4 and min(x.shape[2:]) < z:
        raise ValueError(f"max-pool window {z} is larger than the {tuple(x.shape[2:])} maps")
    if not block_fusable(x):
        y = torch.relu(x)
        if lrn is not None:
            y = local_response_norm(y, lrn)
        return nn.functional.max_pool2d(y, z, s)
    if torch.is_grad_enabled() and x.requires_grad:
        return _BlockFunction.apply(x, lrn, pool)
    y = torch.empty(_pooled(x, pool), dtype=x.dtype, memory_format=torch.channels_last)
    _block_call("forward", x, y, None, lrn=lrn, pool=pool)
    return y


# ---------------------------------------------------------------------------------------
# Public interface.


def backend(x: torch.Tensor) -> str:
    """Which implementation local_response_norm runs for x: "c" (the kernel) or "torch"."""
    if os.environ.get("ALEXNET_LRN") == "torch" or x.device.type != "cpu" or x.dtype not in _KERNEL_DTYPES:
        return "torch"
    return "c" if _load() is not None else "torch"


def local_response_norm(x: torch.Tensor, cfg: LRNConfig) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"local response norm expects (N, C, H, W) input, got shape {tuple(x.shape)}")
    fn = _KernelLRN if backend(x) == "c" else _TorchLRN
    return fn.apply(x, cfg.size, cfg.alpha_sum, cfg.beta, cfg.k)


class LocalResponseNorm(nn.Module):
    def __init__(self, cfg: LRNConfig | None = None):
        super().__init__()
        self.cfg = cfg or LRNConfig()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_response_norm(x, self.cfg)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"size={c.size}, alpha={c.alpha}, beta={c.beta}, k={c.k}, form={c.form}"
