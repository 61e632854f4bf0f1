"""Time local response normalisation: ours (C kernel and torch path) against torch's.

    .venv/bin/python benchmarks/bench_lrn.py [--repeat 5] [--threads N] [--beta 0.75] [--json FILE]

For the shapes LRN sees in AlexNet, float32, NCHW and channels_last, prints the best of
`repeat` times (the one least disturbed by other load) of forward and of forward+backward
in ms, and torch.nn.LocalResponseNorm's time divided by ours. torch's module is Caffe's
form, so it gets alpha * size to do the same math as the paper's form. The paper's beta
is 0.75; another --beta shows the kernel's slower general power. The last row, a copy
of x (and of g), is a floor: allocating and writing a fresh output tensor, which any
implementation pays.
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path
import time

import torch

from alexnet.bench import machine
from alexnet.config import LRNConfig
from alexnet.fileio import atomic_write_json, writable_file
from alexnet.lrn import backend, local_response_norm

SHAPES = [(64, 96, 55, 55), (64, 256, 27, 27)]  # after conv1 and conv2, batch 64


def set_torch_path(force: bool) -> None:
    """ALEXNET_LRN=torch forces the torch path; lrn.py reads it on every call."""
    if force:
        os.environ["ALEXNET_LRN"] = "torch"
    else:
        os.environ.pop("ALEXNET_LRN", None)


def best_ms(fn, repeat: int) -> float:
    fn()  # warm-up: first-use compilation, allocator
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def timings(lrn, x: torch.Tensor, g: torch.Tensor, repeat: int) -> tuple[float, float]:
    def forward():
        with torch.no_grad():
            lrn(x)

    def forward_backward():
        x.grad = None
        lrn(x).backward(g)

    return best_ms(forward, repeat), best_ms(forward_backward, repeat)


def ours(force_torch: bool, cfg: LRNConfig):
    def run(x: torch.Tensor) -> torch.Tensor:
        set_torch_path(force_torch)
        return local_response_norm(x, cfg)

    return run


class CopyFloor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--beta", type=float, default=LRNConfig.beta)
    ap.add_argument("--json", metavar="FILE", type=writable_file,
                    help="also write the machine, versions and times as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = LRNConfig(beta=args.beta)
    theirs = torch.nn.LocalResponseNorm(cfg.size, cfg.alpha * cfg.size, cfg.beta, cfg.k)
    impls = {"torch.nn.LocalResponseNorm": theirs, "ours, torch path": ours(True, cfg), "ours, C kernel": ours(False, cfg),
             "copy (floor)": CopyFloor.apply}

    where = machine(torch.device("cpu"))
    print(f"{where}; torch {torch.__version__}, {args.threads} threads, beta {cfg.beta}, best of {args.repeat}")
    rows = []
    for shape in SHAPES:
        for fmt_name, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
            x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
            g = torch.randn(shape).contiguous(memory_format=fmt)
            set_torch_path(False)
            print(f"\n{tuple(shape)} {fmt_name} (kernel backend here: {backend(x)})")
            print(f"  {'':28} {'forward ms':>11} {'fwd+bwd ms':>11} {'speed-up f/f+b':>15}")
            base = None
            for name, lrn in impls.items():
                f, fb = timings(lrn, x, g, args.repeat)
                base = base or (f, fb)
                print(f"  {name:28} {f:11.1f} {fb:11.1f} {base[0] / f:7.1f}x {base[1] / fb:6.1f}x")
                rows.append({"shape": list(shape), "layout": fmt_name, "impl": name, "forward_ms": f,
                             "forward_backward_ms": fb})
    set_torch_path(False)
    if args.json:
        doc = {"date": datetime.date.today().isoformat(), "machine": where, "threads": args.threads,
               "torch": torch.__version__, "beta": cfg.beta, "repeat": args.repeat, "rows": rows}
        atomic_write_json(args.json, doc)


if __name__ == "__main__":
    main()
