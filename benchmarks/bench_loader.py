"""Input pipeline speed, and what it costs a training run, on this machine, in one run.

    .venv/bin/python benchmarks/bench_loader.py [--images 512] [--batch 32]
        [--train-batch 16] [--train-steps 4] [--rounds 2] [--device cpu|cuda] [--json out.json]

1. Loader throughput (images/s, no model): `BatchLoader` with the full training
   augmentation (`TrainTransform`: random 227 crop, reflection, mean image, PCA
   lighting) over
   * the prepared store (`alexnet prepare` of a folder of synthetic 500x375 JPEGs, read
     by memory mapping, page cache warm),
   * the same images as an in-memory uint8 tensor (`TensorImageDataset`),
   * the JPEG folder decoded on the fly (`FolderDataset`: decode, rescale, centre crop),
   and the store shipping uint8 images and the random draws for the device to finish
   (`DeferredTrainTransform`, `data.augment_on=device`), with 0, 1 and 2 worker
   processes, two epochs each. Iterator start-up (forking the workers, every epoch) is
   included, and weighs on these short epochs.
2. A worker's CPU time per image (its reaped process's user + system time over the
   batches it made): with the augmentation, without it, and decoding JPEGs. Cores
   needed to feed N images/s = N x ms / 1000; beside it, the bytes each image costs
   the trip to the trainer and the device.
3. Training speed on `--device`: SGD steps of the paper's network (`build_model("paper",
   num_classes=10)`, the trainer's optimizer and numerics for that device: channels-last,
   bf16 autocast where native) fed by random tensors already on the device, and fed by
   the loader over the prepared store (`--train-workers`, at `--worker-nice`), the
   augmentation in the loader or finished on the device.
   Blocks of `--train-steps` timed steps alternate between the feeds for `--rounds`
   rounds so that drift of the machine hits all alike; each block starts a fresh
   iterator and one untimed step (start-up is a once-per-epoch cost). The ratio
   is (steps/s fed by the loader) / (steps/s fed from memory), median step times; the
   target is >= 0.9. Wall-clock times are only as good as the machine is quiet (the
   load average is printed); the CPU seconds per step (this process and its workers,
   all threads) are a steadier measure of what the loader adds to a step: "CPU-speed"
   is memory's CPU s/step over the feed's.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from alexnet.augment import DeferredTrainTransform, TrainTransform, to_device
from alexnet.dataset import TensorImageDataset
from alexnet.fileio import atomic_write_json, writable_file
from alexnet.loader import BatchLoader
from alexnet.model import build_model


def _make_jpegs(root: Path, n: int, classes: int = 10, size=(500, 375), seed: int = 0) -> None:
    """Photo-like synthetic JPEGs (smooth colour fields plus grain), ImageNet's typical size."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        d = root / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        coarse = rng.uniform(0, 255, (h // 25 + 1, w // 25 + 1, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img += rng.normal(0, 12, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"img{i:05d}.jpg", quality=90)


def _throughput(ds, transform, batch: int, workers: int, epochs: int = 1) -> float:
    loader = BatchLoader(ds, batch, transform, shuffle=True, seed=0, drop_last=True, num_workers=workers)
    n, t = 0, time.perf_counter()
    for e in range(epochs):
        loader.set_epoch(e)
        for _, y in loader:
            n += len(y)
    return n / (time.perf_counter() - t)


def _batches(loader: BatchLoader):
    """Endless batches, epoch after epoch; the caller closes it."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _cpu() -> float:
    """CPU seconds of this process (all threads) and of its reaped children (workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _train_compare(store, transform, batch: int, steps: int, rounds: int, workers: list[int],
                   nices: tuple[int, ...] = (10,), device: torch.device = torch.device("cpu"),
                   compile_model: bool = False) -> dict:
    """Training steps fed from memory against steps fed by the loader, with the trainer's
    own numerics for `device` (channels-last; bf16 autocast where the device has it), the
    augmentation in the loader or, with the loader shipping uint8 ("augment on device"),
    finished on `device` after the copy."""
    from alexnet.config import run_config
    from alexnet.evaluate import autocast_context
    from alexnet.train import make_optimizer, resolve_numerics

    cfg = run_config("paper", {"train": {"device": str(device)}})
    amp, channels_last = resolve_numerics(cfg, device)
    torch.manual_seed(0)
    model = build_model("paper", num_classes=10).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg.train, device)
    net = torch.compile(model) if compile_model else model
    crop = model.cfg.input_size
    x_mem = (torch.randn(batch, 3, crop, crop) * 50).to(device)
    y_mem = torch.randint(0, 10, (batch,)).to(device)
    later = DeferredTrainTransform(transform)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(x, y, finish=None):
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        if finish is not None:
            x = finish(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, amp):
            loss = nn.functional.cross_entropy(net(x).float(), y)
        loss.backward()
        opt.step()
        sync()  # the trainer's loss.item() waits for the step the same way

    def memory_block():
        step(x_mem, y_mem)  # untimed, as the loader blocks' first step
        times, cpu = [], _cpu()
        for _ in range(steps):
            t = time.perf_counter()
            step(x_mem, y_mem)
            times.append(time.perf_counter() - t)
        return times, (_cpu() - cpu) / steps

    def loader_block(w, nice, deferred):
        loader = BatchLoader(store, batch, later if deferred else transform, shuffle=True, seed=1,
                             drop_last=True, num_workers=w, worker_nice=nice)
        finish = later.finish if deferred else None
        it = _batches(loader)
        try:
            step(*next(it), finish)
            times, cpu = [], _cpu()
            for _ in range(steps):
                t = time.perf_counter()
                step(*next(it), finish)  # the wait for the batch is part of the step
                times.append(time.perf_counter() - t)
        finally:
            it.close()  # reaps the workers, so their CPU time is counted below
        return times, (_cpu() - cpu) / steps  # (workers' CPU includes the batches prefetched in vain)

    model.train()
    feeds = {"memory": memory_block}
    for deferred in (False, True):
        for w in workers:
            for nice in (nices if w else (0,)):
                name = (f"store, {w} workers" + (f" nice {nice}" if w else "")
                        + (", augment on device" if deferred else ""))
                feeds[name] = lambda w=w, nice=nice, deferred=deferred: loader_block(w, nice, deferred)
    times: dict[str, list[float]] = {k: [] for k in feeds}
    cpus: dict[str, list[float]] = {k: [] for k in feeds}
    for r in range(rounds):
        order = list(feeds) if r % 2 == 0 else list(feeds)[::-1]
        for k in order:
            t, c = feeds[k]()
            times[k] += t
            cpus[k].append(c)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    return {"device": str(device), "amp": str(amp).replace("torch.", "") if amp else "off",
            "channels_last": channels_last, "compiled": compile_model,
            "feeds": {k: {"median_step_s": med[k], "img_s": batch / med[k], "ratio_vs_memory": med["memory"] / med[k],
                          "cpu_s_per_step": cpu[k], "cpu_ratio_vs_memory": cpu["memory"] / cpu[k],
                          "steps": len(times[k])} for k in feeds}}


def _cpu_per_image(ds, transform, batch: int, batches: int) -> float:
    """CPU milliseconds one loader worker spends per image (read, augment or not, into
    shared memory, send): measured in a worker, by the CPU time of the reaped process."""
    loader = BatchLoader(ds, batch, transform, shuffle=True, seed=2, drop_last=True, num_workers=1, prefetch=1)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    it = _batches(loader)
    try:
        for _ in range(batches):
            next(it)
    finally:
        it.close()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return 1000 * used / (batches * batch)  # (includes the worker's start and the batch prefetched in vain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=512, help="synthetic JPEGs to prepare")
    ap.add_argument("--batch", type=int, default=32, help="batch size of the throughput runs")
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=4, help="timed steps per block")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-workers", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--worker-nice", type=int, nargs="+", default=[10],
                    help="niceness of the training runs' workers (one run per value)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--device", default="cpu", help="where the training comparison runs (cpu, cuda)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network of the training comparison")
    ap.add_argument("--json", type=writable_file, help="also write the results to this file")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    results: dict = {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        _measure(args, results)
    except KeyboardInterrupt:  # a time limit (timeout --signal=INT): keep what was measured
        results["cut_short"] = True
        print("interrupted: the results so far are kept", flush=True)
    results["load_average_after"] = os.getloadavg()[0]
    print(f"load average after: {results['load_average_after']:.2f}")
    if args.json:
        atomic_write_json(args.json, results)
    if results.get("cut_short"):
        sys.exit(130)


def _measure(args: argparse.Namespace, results: dict) -> None:
    from alexnet.sources import open_dataset
    from alexnet.store import open_store, prepare

    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "jpegs", Path(tmp) / "store"
        _make_jpegs(folder, args.images)
        t = time.perf_counter()
        prepare(folder, out, split="train", workers=os.cpu_count(), progress=False)
        results["prepare_img_s"] = args.images / (time.perf_counter() - t)
        store = open_store(out)
        stats = store.stats()
        transform = TrainTransform(stats, 227)
        memory = TensorImageDataset(torch.from_numpy(np.array(store.images)), store.labels, store.classes)
        folder_ds = open_dataset(folder, "train")
        print(f"{args.images} JPEGs 500x375 -> store 256x256: prepared at {results['prepare_img_s']:.0f} img/s "
              f"(decode + resize + statistics, {os.cpu_count()} processes)", flush=True)

        later = DeferredTrainTransform(transform)
        print(f"\nloader throughput, batch {args.batch} (img/s): full training augmentation to 227x227 in "
              f"the loader, or uint8 256x256 and the draws (augmentation left to the device)")
        print(f"{'source':44} " + " ".join(f"{f'{w} workers':>10}" for w in args.workers))
        sources = [("prepared store (memmap)", store, transform, 2), ("in-memory uint8 tensor", memory, transform, 2),
                   ("JPEG decoding on the fly", folder_ds, transform, 1),
                   ("prepared store, uint8 + draws", store, later, 2)]
        results["throughput_img_s"] = {}
        for name, ds, tf, epochs in sources:
            _throughput(ds, tf, args.batch, 0, 1) if ds is store else None  # page cache warm
            row = {w: _throughput(ds, tf, args.batch, w, epochs) for w in args.workers}
            results["throughput_img_s"][name] = row
            print(f"{name:44} " + " ".join(f"{row[w]:10.0f}" for w in args.workers), flush=True)

        n_batches = max(4, args.images // args.batch)
        cost = {"augment in the loader": _cpu_per_image(store, transform, args.batch, n_batches),
                "uint8 + draws (augment on device)": _cpu_per_image(store, later, args.batch, n_batches),
                "JPEG decode + augment": _cpu_per_image(folder_ds, transform, args.batch, max(2, n_batches // 4))}
        crop_bytes, raw_bytes = 3 * 227 * 227 * 4, 3 * 256 * 256
        results["worker_cpu_ms_per_image"] = cost
        results["bytes_per_image"] = {"float32 227 crop": crop_bytes, "uint8 256 image": raw_bytes}
        print(f"\none worker's CPU per image, from the store, batch {args.batch} "
              f"(cores needed = img/s x ms / 1000):")
        for k, v in cost.items():
            print(f"  {k:36} {v:6.3f} ms -> {1000 / v:7.0f} img/s per core")
        print(f"  bytes sent per image to the trainer and the device: {crop_bytes:,} (float32 crop) against "
              f"{raw_bytes:,} (uint8 image)")

        if not args.skip_train:
            device = torch.device(args.device)
            print(f"\ntraining on {device}, paper network 227 input, batch {args.train_batch}, "
                  f"{args.rounds} x {args.train_steps} timed steps per feed")
            tr = _train_compare(store, transform, args.train_batch, args.train_steps, args.rounds,
                                args.train_workers, tuple(args.worker_nice), device, args.compile)
            results["train"] = tr
            print(f"numerics: amp {tr['amp']}, channels-last {tr['channels_last']}, compiled {tr['compiled']}")
            print(f"{'feed':42} {'step s':>8} {'img/s':>8} {'speed vs memory':>16} {'CPU s/step':>11} "
                  f"{'CPU-speed vs memory':>20}")
            for k, v in tr["feeds"].items():
                print(f"{k:42} {v['median_step_s']:8.3f} {v['img_s']:8.1f} {v['ratio_vs_memory']:15.3f}x "
                      f"{v['cpu_s_per_step']:11.3f} {v['cpu_ratio_vs_memory']:19.3f}x")
            best = max(v["ratio_vs_memory"] for k, v in tr["feeds"].items() if k != "memory")
            print(f"best loader-fed speed ratio {best:.3f} (target >= 0.9): {'met' if best >= 0.9 else 'NOT met'}")


if __name__ == "__main__":
    main()
