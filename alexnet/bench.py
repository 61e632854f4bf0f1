"""`alexnet bench`: how fast the paper's network trains and infers here, against what a
user would otherwise run, measured in one process on one machine.

Contenders (each with the same weights and the same random input):

  paper (ours)   the `paper` variant with its best settings for the device: channels-last,
                 the fused ReLU-LRN-pool kernel and the fused SGD update; on CUDA also
                 bf16 autocast, fp16 on a GPU without bf16 arithmetic (and torch.compile
                 with --compile). On a CPU the dtype is float32 unless the CPU has native
                 bf16 (AMX or AVX-512 BF16).
  paper (plain)  the same layers written the obvious way (alexnet.reference): NCHW,
                 nn.LocalResponseNorm, grouped nn.Conv2d, float32, eager, default SGD.
  owt (plain)    torchvision's "one weird trick" layout written the same obvious way.

With --ablation, the levers one at a time: our model NCHW (LRN kernel only), then
+ channels-last (which turns the fused blocks on), then + the fused SGD update; where the
best dtype is bf16, also bf16 with the blocks unfused, and the best settings in float32.

A training step is forward, cross-entropy, backward and an SGD update (momentum 0.9,
weight decay 5e-4); inference is a forward pass in eval mode under inference_mode. The
contenders take turns, round after round, so that the machine's drift hits all alike, and
the median step counts.

GFLOP/s come from the model's own MAC count (alexnet.summary): 2 FLOPs per MAC forward,
and in training as much again for the weight gradients and for the input gradients of
every layer but conv1 (whose input needs none). The peak is a square matrix multiply of
the contender's dtype on the same device, sized to run at least a quarter of a second; on
a CPU the faster of torch.mm and the same product as a oneDNN 1x1 convolution.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from alexnet.config import ConfigError
from alexnet.model import AlexNet, build_model, model_config
from alexnet.reference import plain_alexnet
from alexnet.summary import layer_table
from alexnet.train import native_bf16

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}  # the rows' names, used for the peaks too


@dataclass
class Contender:
    name: str
    variant: str
    ours: bool
    channels_last: bool = False
    fused_sgd: bool = False
    amp: torch.dtype | None = None
    compile: bool = False
    fuse_blocks: bool = True  # our model's fused ReLU-LRN-pool kernel, where the tensors allow it

    @property
    def dtype(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp]


def amp_for(device: torch.device, dtype: str = "auto") -> torch.dtype | None:
    """Our contender's autocast dtype for `--dtype` on `device` (None: float32). fp16 on
    a CPU is a ConfigError, as in train: CPU float16 matmuls run at a fraction of a
    GFLOP/s, and timing the peak alone would take minutes."""
    if dtype == "auto":  # as train.amp=auto: fp16 on a GPU without bf16 arithmetic
        return torch.bfloat16 if native_bf16(device) else torch.float16 if device.type == "cuda" else None
    if dtype == "fp16" and device.type != "cuda":
        raise ConfigError("--dtype fp16 needs a CUDA device; use bf16 on a CPU")
    return None if dtype == "fp32" else DTYPES[dtype]


def contenders(device: torch.device, ablation: bool = False, compile: bool = False,
               dtype: str = "auto") -> list[Contender]:
    amp = amp_for(device, dtype)
    best = Contender("paper (ours)", "paper", True, channels_last=True, fused_sgd=True, amp=amp, compile=compile)
    out = [best, Contender("paper (plain)", "paper", False), Contender("owt (plain)", "owt", False)]
    if ablation:
        out += [
            Contender("paper (ours, NCHW)", "paper", True),
            Contender("paper (ours, +channels-last)", "paper", True, channels_last=True),
            Contender("paper (ours, +fused SGD)", "paper", True, channels_last=True, fused_sgd=True),
        ]
        if amp is not None:
            out.append(Contender("paper (ours, blocks unfused)", "paper", True, channels_last=True, fused_sgd=True,
                                 amp=amp, fuse_blocks=False))
            out.append(Contender("paper (ours, fp32)", "paper", True, channels_last=True, fused_sgd=True))
    return out


def training_flops(model: AlexNet) -> tuple[int, int]:
    """(FLOPs of one image's forward pass, of one image's training step)."""
    layers = layer_table(model)["layers"]
    macs = sum(r["macs"] for r in layers)
    first = next(r["macs"] for r in layers if r["macs"])
    return 2 * macs, 2 * (3 * macs - first)


def arithmetic(c: Contender, device: torch.device) -> str:
    """What a contender's convolutions compute in: its autocast dtype, or "tf32" for float32
    on CUDA where cuDNN may use TF32 (PyTorch's default), which is what its peak must be."""
    if c.amp is None and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return c.dtype


def matmul_peak(device: torch.device, dtype: torch.dtype, min_seconds: float = 0.25,
                max_n: int = 8192, tf32: bool = False) -> dict:
    """Best GFLOP/s of an n x n matrix multiply, n doubled from 256 until one takes min_seconds
    (float32 with `tf32`: in TF32, where the device has it); "n" is the best way's.

    On a CPU the product is timed two ways, and the faster counts: torch.mm (MKL's sgemm for
    float32, which on AMD CPUs keeps to AVX2 code: 192 against oneDNN's 370 GFLOP/s on one
    AVX-512 EPYC, benchmarks/results-cpu-2core-avx512.json), and the same product as a 1x1
    convolution, which oneDNN computes with the kernels the network's convolutions use."""
    was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    done: dict[str, tuple[int, float]] = {}  # way -> (its n, its best seconds)
    try:
        n = 256
        while True:
            # each way grows on its own: a slow one (bf16 torch.mm on a CPU without bf16, 0.3
            # GFLOP/s) stops at its own size, not at the fast one's, where it took a minute
            every = _products(n, device, dtype)
            ways = {k: fn for k, fn in every.items() if k not in done}
            for fn in ways.values():  # untimed: the first call of a size loads its kernel (on a GPU, the
                _timed(fn, device)    # process's first also creates the cuBLAS handle and wakes the clocks)
            for name, fn in ways.items():
                t = _timed(fn, device)
                if t >= min_seconds or n >= max_n:
                    done[name] = n, min([t] + [_timed(fn, device) for _ in range(2)])
            if len(done) == len(every):
                break
            n *= 2
    finally:
        torch.backends.cuda.matmul.allow_tf32 = was
    rates = {k: 2 * m ** 3 / t / 1e9 for k, (m, t) in done.items()}
    via = max(rates, key=rates.get)
    return {"dtype": "tf32" if tf32 else DTYPE_NAMES[dtype], "n": done[via][0],
            "gflops": rates[via], "via": via, "gflops_by_way": rates}


def _products(n: int, device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    """Ways to compute an (n x n) @ (n x n) product on `device`: each does 2 n^3 FLOPs."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ways: dict[str, Callable[[], object]] = {"torch.mm": lambda: a @ b}
    if device.type == "cpu":
        # out[0, o, i, 0] = sum_c w[o, c] x[0, c, i, 0]: n outputs x n positions x n inputs
        x = b.reshape(1, n, n, 1).contiguous(memory_format=torch.channels_last)
        w = a.reshape(n, n, 1, 1).contiguous(memory_format=torch.channels_last)
        ways["1x1 conv"] = lambda: torch.nn.functional.conv2d(x, w)
    return ways


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _autocast(device: torch.device, amp: torch.dtype | None):
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp)


def build(c: Contender, num_classes: int, device: torch.device, state: dict | None) -> nn.Module:
    if c.ours:
        model: nn.Module = build_model(c.variant, num_classes=num_classes)
        model.fuse = c.fuse_blocks
    else:
        model = plain_alexnet(c.variant, num_classes=num_classes, input_size=model_config(c.variant).input_size)
    if state is not None:
        model.load_state_dict(state)
    model = model.to(device)
    if c.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def step_functions(c: Contender, model: nn.Module, batch: int, size: int, num_classes: int,
                   device: torch.device) -> dict[str, Callable[[], None]]:
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, 3, size, size, generator=gen) * 50).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(device)
    if c.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fused = True if c.fused_sgd and device.type in ("cpu", "cuda") else None
    opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9, weight_decay=5e-4, fused=fused)
    # one graph per batch size: without dynamic=False the second size compiles a slower dynamic one
    net = torch.compile(model, dynamic=False) if c.compile else model
    algos = c.ours and device.type == "cuda"  # cuDNN times its algorithms for our shapes; plain: defaults

    def train() -> None:
        torch.backends.cudnn.benchmark = algos
        model.train()
        opt.zero_grad(set_to_none=True)
        with _autocast(device, c.amp):
            loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    def infer() -> None:
        torch.backends.cudnn.benchmark = algos
        model.eval()
        with torch.inference_mode(), _autocast(device, c.amp):
            net(x)

    return {"train": train, "infer": infer}


def run(batches: list[int], modes: list[str], steps: int, device: torch.device, num_classes: int = 1000,
        ablation: bool = False, compile: bool = False, dtype: str = "auto",
        log: Callable[[str], None] = print, peak_seconds: float = 0.25,
        on_block: Callable[[dict], None] | None = None) -> dict:
    """The contenders' rows, batch by batch and mode by mode; `on_block` gets the report so
    far after each (batch, mode), so a run cut short keeps what it measured."""
    torch.manual_seed(0)
    cs = contenders(device, ablation, compile, dtype)
    kind = {c.name: arithmetic(c, device) for c in cs}
    peaks: dict[str, dict] = {}
    for c in cs:
        if kind[c.name] not in peaks:
            peaks[kind[c.name]] = matmul_peak(device, DTYPES[c.dtype], min_seconds=peak_seconds,
                                              tf32=kind[c.name] == "tf32")
    if "bf16" not in peaks:  # for the record: what bf16 would give on this device
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, min_seconds=peak_seconds / 2, max_n=2048)
    for p in peaks.values():
        ways = ", ".join(f"{k} {v:.1f}" for k, v in p["gflops_by_way"].items())
        log(f"matmul peak {p['dtype']}: {p['gflops']:.1f} GFLOP/s (n={p['n']}, via {p['via']}; {ways})")
    # every contender starts from the same weights as the others of its variant; each is built
    # once (a build costs about a second on a CPU) and stepped through every batch and mode
    first = {v: build_model(v, num_classes=num_classes) for v in {c.variant for c in cs}}
    flops = {v: training_flops(m) for v, m in first.items()}
    models = {c.name: build(c, num_classes, device, first[c.variant].state_dict()) for c in cs}
    del first
    rows: list[dict] = []
    report = {"machine": machine(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "steps": steps, "peaks": peaks, "results": rows}
    if device.type == "cuda":
        report["tf32"] = {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    for batch in batches:
        for mode in modes:
            fns = {}
            for c in cs:
                size = model_config(c.variant).input_size
                fns[c.name] = step_functions(c, models[c.name], batch, size, num_classes, device)[mode]
                fns[c.name]()  # warm-up (and compilation)
                fns[c.name]()
            times: dict[str, list[float]] = {c.name: [] for c in cs}
            for _ in range(steps):
                for c in cs:
                    times[c.name].append(_timed(fns[c.name], device))
            for c in cs:
                t = statistics.median(times[c.name])
                f = flops[c.variant][1 if mode == "train" else 0] * batch
                row = {"contender": c.name, "variant": c.variant, "mode": mode, "batch": batch,
                       "dtype": kind[c.name], "channels_last": c.channels_last, "compiled": c.compile,
                       "step_ms": 1000 * t, "img_s": batch / t, "gflops": f / t / 1e9,
                       "peak_fraction": f / t / 1e9 / peaks[kind[c.name]]["gflops"],
                       "step_times_s": times[c.name]}
                rows.append(row)
            base = {r["contender"]: r["img_s"] for r in rows if r["batch"] == batch and r["mode"] == mode}
            for r in rows[-len(cs):]:
                r["vs_paper_plain"] = r["img_s"] / base["paper (plain)"]
                r["vs_owt_plain"] = r["img_s"] / base["owt (plain)"]
                log(format_row(r))
            log("")
            if on_block is not None:
                on_block(report)
    return report


def out_of_memory(e: BaseException) -> bool:
    """`e` is an allocator saying it has no memory left (Python's, the CPU's or the GPU's)."""
    text = str(e)
    return (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
            or "out of memory" in text)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    cap = torch.backends.cpu.get_cpu_capability()
    bf16 = "native bf16" if native_bf16(torch.device("cpu")) else "no native bf16"
    return f"{name}, {os.cpu_count()} cores, {cap}, {bf16}"


HEADER = (f"{'contender':30} {'mode':5} {'batch':>5} {'dtype':5} {'ms/step':>9} {'img/s':>8} "
          f"{'GFLOP/s':>8} {'of peak':>7} {'vs paper plain':>14} {'vs owt plain':>12}")


def format_row(r: dict) -> str:
    return (f"{r['contender']:30} {r['mode']:5} {r['batch']:5d} {r['dtype']:5} {r['step_ms']:9.1f} "
            f"{r['img_s']:8.1f} {r['gflops']:8.1f} {100 * r['peak_fraction']:6.0f}% "
            f"{r['vs_paper_plain']:13.2f}x {r['vs_owt_plain']:11.2f}x")


def markdown(report: dict) -> str:
    """The results as a Markdown table (for the README)."""
    lines = ["| contender | mode | batch | dtype | img/s | GFLOP/s | of peak | vs paper plain | vs owt plain |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['contender']} | {r['mode']} | {r['batch']} | {r['dtype']} | {r['img_s']:.1f} | "
                     f"{r['gflops']:.1f} | {100 * r['peak_fraction']:.0f}% | {r['vs_paper_plain']:.2f}x | "
                     f"{r['vs_owt_plain']:.2f}x |")
    peaks = ", ".join(f"{p['dtype']} {p['gflops']:.1f} GFLOP/s ({p['via']})" for p in report["peaks"].values())
    lines.append("")
    lines.append(f"Machine: {report['machine']}; torch {report['torch']}, {report['threads']} threads; "
                 f"median of {report['steps']} steps; matmul peaks: {peaks}.")
    return "\n".join(lines)


def write_json(report: dict, path: str) -> None:
    from alexnet.fileio import atomic_write_json

    atomic_write_json(path, report)
