"""Inference speed of the exported ONNX graph in onnxruntime against our PyTorch path.

    .venv/bin/python benchmarks/bench_onnx.py [--batch 64 16] [--repeat 5] [--steps 3]

The paper network (1000 classes, random He-normal weights: speed does not depend on them,
and they give logits of a realistic scale for the difference column), float32.
PyTorch runs with our best CPU settings: eval mode, channels_last model and input (so the
fused ReLU-LRN-pool kernel runs), torch.inference_mode(). onnxruntime runs the graph that
`alexnet export` writes, on its CPUExecutionProvider with all graph optimisations and as
many threads as torch uses. The two take turns: each round times `steps` forward passes of
each, after one warm-up pass each; the table shows the median round in images/s, and the
largest |difference| between their logits on the same batch beside the largest |logit|.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch

from alexnet.checkpoint import Checkpoint
from alexnet.export import to_onnx
from alexnet.model import build_model


def per_step(fn, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 16])
    ap.add_argument("--repeat", type=int, default=5, help="rounds; the median is shown")
    ap.add_argument("--steps", type=int, default=3, help="forward passes per contender per round")
    args = ap.parse_args()

    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model("paper", num_classes=1000, init="kaiming").eval()
    ck = Checkpoint(model.cfg, model.state_dict(), [str(i) for i in range(1000)], None,
                    {"image_size": 256, "crop": 227, "pixel_scale": 1.0}, {})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(to_onnx(ck, model), opts, providers=["CPUExecutionProvider"])
    fast = model.to(memory_format=torch.channels_last)

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"{cpu}, {torch.get_num_threads()} threads; torch {torch.__version__}, onnxruntime {ort.__version__}")
    print(f"{'batch':>5}  {'PyTorch img/s':>13}  {'onnxruntime img/s':>17}  {'ort/torch':>9}  {'max |diff|':>10}  {'max |logit|':>11}")
    for batch in args.batch:
        x = torch.randn(batch, 3, 227, 227, generator=torch.Generator().manual_seed(batch)) * 60
        x_cl = x.contiguous(memory_format=torch.channels_last)
        x_np = x.numpy()

        def run_torch() -> torch.Tensor:
            with torch.inference_mode():
                return fast(x_cl)

        def run_ort() -> np.ndarray:
            return session.run(["logits"], {"images": x_np})[0]

        ref = run_torch().numpy()  # also the warm-ups
        diff, scale = float(np.abs(run_ort() - ref).max()), float(np.abs(ref).max())
        times: dict[str, list[float]] = {"torch": [], "ort": []}
        for _ in range(args.repeat):
            times["torch"].append(per_step(run_torch, args.steps))
            times["ort"].append(per_step(run_ort, args.steps))
        pt, rt = (batch / statistics.median(times[k]) for k in ("torch", "ort"))
        print(f"{batch:>5}  {pt:>13.1f}  {rt:>17.1f}  {rt / pt:>9.2f}  {diff:>10.1e}  {scale:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
