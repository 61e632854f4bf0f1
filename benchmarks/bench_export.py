"""Inference speed of the exported programs against our PyTorch path: the ONNX graph in
onnxruntime, the torch.export program (.pt2) run by PyTorch, and that program compiled
ahead of time by AOTInductor.

    .venv/bin/python benchmarks/bench_export.py [--batch 64 16] [--repeat 5] [--steps 3] [--no-aoti]
        [--json results.json]

The paper network (1000 classes, random He-normal weights: speed does not depend on them,
and they give logits of a realistic scale for the difference column), float32, with a
mean image (random, with spatial structure) as a trained model file has: every contender
takes the centre crops' pixels (0..255) and subtracts the mean image's centre crop first,
as the exported graphs do inside and `predict` does before the network.
PyTorch runs with our best CPU settings: eval mode, channels_last model and input (so the
fused ReLU-LRN-pool kernel runs), torch.inference_mode(). onnxruntime runs the graph that
`alexnet export` writes, on its CPUExecutionProvider with all graph optimisations and as
many threads as torch uses. The .pt2 program is the one `alexnet export --format pt2`
writes, loaded back with torch.export.load; AOTInductor compiles it once (its time is
printed) for every batch size. The contenders take turns: each round times `steps`
forward passes of each, after one warm-up pass each; the table shows the median round in
images/s, and the largest |difference| between each one's logits and PyTorch's on the same
batch, beside the largest |logit|.
"""

from __future__ import annotations

import argparse
import datetime
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from alexnet.bench import machine
from alexnet.checkpoint import Checkpoint
from alexnet.dataset import DataStats
from alexnet.export import eval_transform, load_pt2, to_onnx, to_pt2
from alexnet.fileio import atomic_write_json, writable_file
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
    ap.add_argument("--no-aoti", action="store_true",
                    help="leave out AOTInductor (its compilation takes 13 to 30 s on 2 cores)")
    ap.add_argument("--json", metavar="FILE", type=writable_file,
                    help="also write the machine, versions and rows as JSON")
    args = ap.parse_args()

    import onnxruntime as ort

    torch.manual_seed(0)
    model = build_model("paper", num_classes=1000, init="kaiming").eval()
    g = torch.Generator().manual_seed(1)
    mean = (torch.rand(3, 8, 8, generator=g) * 160)[:, :, :, None, None].expand(3, 8, 8, 32, 32)
    mean = mean.permute(0, 1, 3, 2, 4).reshape(3, 256, 256).contiguous()  # 32-pixel blocks of 0..160
    stats = DataStats(mean, torch.tensor([3000.0, 200.0, 50.0]), torch.eye(3))
    ck = Checkpoint(model.cfg, model.state_dict(), [str(i) for i in range(1000)], stats,
                    {"image_size": 256, "crop": 227, "pixel_scale": 1.0, "mean": "mean_image"}, {})
    mean_crop = eval_transform(ck, model).mean_crops  # (3, 227, 227)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(to_onnx(ck, model), opts, providers=["CPUExecutionProvider"])
    pt2 = to_pt2(ck, model)
    exported, _ = load_pt2(pt2)
    aoti, aoti_s = None, None
    if not args.no_aoti:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            package = torch._inductor.aoti_compile_and_package(torch.export.load(io.BytesIO(pt2)),
                                                               package_path=str(Path(d) / "aoti.pt2"))
            aoti = torch._inductor.aoti_load_package(package)
            aoti_s = time.perf_counter() - t0
            print(f"AOTInductor compilation: {aoti_s:.1f} s")
    fast = model.to(memory_format=torch.channels_last)

    names = ["PyTorch", "onnxruntime", "torch.export", *(["AOTInductor"] if aoti else [])]
    where = machine(torch.device("cpu"))
    print(f"{where}, {torch.get_num_threads()} threads; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}")
    rows = []
    print("| batch | " + " | ".join(f"{n} img/s" for n in names) + " | "
          + " | ".join(f"{n} / PyTorch" for n in names[1:]) + " | max abs diff | max abs logit |")
    print("|" + "---:|" * (2 * len(names) + 2))
    for batch in args.batch:
        # centre crops' pixels, 0..255
        x = torch.randint(0, 256, (batch, 3, 227, 227), generator=torch.Generator().manual_seed(batch)).float()
        x_np = x.numpy()

        def in_torch(module, inp):
            def run() -> np.ndarray:
                with torch.inference_mode():
                    out = module(inp)
                return (out[0] if isinstance(out, (tuple, list)) else out).numpy()
            return run

        def ours() -> np.ndarray:  # predict's way: the mean subtracted, then the fused network
            with torch.inference_mode():
                return fast((x - mean_crop).contiguous(memory_format=torch.channels_last)).numpy()

        runs = {"PyTorch": ours,
                "onnxruntime": lambda: session.run(["logits"], {"images": x_np})[0],
                "torch.export": in_torch(exported, x)}
        if aoti:
            runs["AOTInductor"] = in_torch(aoti, x)
        ref = runs["PyTorch"]()  # the outputs are also the warm-ups
        diffs = {n: float(np.abs(runs[n]() - ref).max()) for n in names[1:]}
        diff = max(diffs.values())  # (the table's column: the largest of any program)
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.repeat):
            for n in names:
                times[n].append(per_step(runs[n], args.steps))
        rate = {n: batch / statistics.median(times[n]) for n in names}
        rows.append({"batch": batch, "img_s": rate, "max_abs_diff": diffs, "max_abs_logit": float(np.abs(ref).max()),
                     "round_times_s": times})
        print(f"| {batch} | " + " | ".join(f"{rate[n]:.1f}" for n in names) + " | "
              + " | ".join(f"{rate[n] / rate['PyTorch']:.2f}" for n in names[1:])
              + f" | {diff:.1e} | {float(np.abs(ref).max()):.1f} |", flush=True)
    if args.json:
        doc = {"date": datetime.date.today().isoformat(), "machine": where, "threads": torch.get_num_threads(),
               "torch": torch.__version__, "onnxruntime": ort.__version__, "steps": args.steps,
               "repeat": args.repeat, "aoti_compile_s": aoti_s, "rows": rows}
        atomic_write_json(args.json, doc)


if __name__ == "__main__":
    main()
