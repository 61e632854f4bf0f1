"""Training and inference speed of each variant against the same layers written the obvious
way in plain PyTorch (nn.LocalResponseNorm, grouped nn.Conv2d), in one run.

    .venv/bin/python benchmarks/bench_model.py [--batch 64] [--steps 5] [--variants paper owt]

A training step is forward, cross-entropy, backward and an SGD update (momentum 0.9,
weight decay 5e-4), on random data already in memory. Timings alternate between the two
versions so that the machine's drift hits both alike; the median step is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from alexnet.model import build_model
from alexnet.reference import plain_alexnet


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _timers(model, batch, size, num_classes):
    x = torch.randn(batch, 3, size, size) * 50
    y = torch.randint(0, num_classes, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)

    def train():
        model.train()
        _train_step(model, opt, x, y)

    def infer():
        model.eval()
        with torch.inference_mode():
            model(x)

    return {"train": train, "infer": infer}


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(variant: str, batch: int, steps: int, num_classes: int) -> dict:
    ours = build_model(variant, num_classes=num_classes)
    size = ours.cfg.input_size
    plain = plain_alexnet(variant, num_classes=num_classes, input_size=size)
    plain.load_state_dict(ours.state_dict())
    result = {"variant": variant, "batch": batch, "input": size}
    for mode in ("train", "infer"):
        fa, fb = _timers(ours, batch, size, num_classes)[mode], _timers(plain, batch, size, num_classes)[mode]
        fa(), fb()  # warm-up
        ta, tb = [], []
        for _ in range(steps):
            ta.append(_time(fa))
            tb.append(_time(fb))
        a, b = statistics.median(ta), statistics.median(tb)
        result[mode] = {"ours_img_s": batch / a, "plain_img_s": batch / b, "speedup": b / a}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per mode (after one warm-up)")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--variants", nargs="+", default=["paper", "paper-ungrouped", "owt"])
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, fp32, eager")
    print(f"{'variant':16} {'mode':6} {'ours img/s':>11} {'plain img/s':>12} {'speed-up':>9}")
    results = []
    for v in args.variants:
        r = bench(v, args.batch, args.steps, args.num_classes)
        results.append(r)
        for mode in ("train", "infer"):
            m = r[mode]
            print(f"{v:16} {mode:6} {m['ours_img_s']:11.1f} {m['plain_img_s']:12.1f} {m['speedup']:8.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
