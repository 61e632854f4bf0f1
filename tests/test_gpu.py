"""Checks for a machine with a CUDA GPU (marker `gpu`, deselected by default; run with
`pytest -m gpu`, as `benchmarks/gpu_check.sh` does). `ALEXNET_TEST_DEVICE=cpu pytest -m gpu
tests/test_gpu.py` runs the same on the CPU, which checks the tests themselves.

What only a GPU can show: the augmentation's whole-batch gathers on a CUDA tensor give the
CPU loop's bits; a CUDA training run gives the same weights whether the loader or the GPU
augments (deterministic kernels); a CUDA evaluation agrees with the CPU's."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

from alexnet.augment import DeferredEvalTransform, EvalTransform, RawBatch, TrainTransform
from alexnet.dataset import DataStats

DEVICE = torch.device(os.environ.get("ALEXNET_TEST_DEVICE", "cuda"))

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]


def _stats(s: int) -> DataStats:
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return DataStats(mean_image=torch.from_numpy(rng.uniform(0, 255, (3, s, s))).float(),
                     eigval=torch.tensor([3000.0, 400.0, 60.0]), eigvec=torch.from_numpy(q).float())


@pytest.mark.parametrize("scale", [1.0, 64.0])
def test_augmentation_on_the_gpu_gives_the_cpu_loops_bits(scale):
    s, crop, b = 256, 227, 64
    tr = TrainTransform(_stats(s), crop, scale=scale)
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    params, alpha = tr.sample(b, torch.Generator().manual_seed(2))
    on_cpu = tr.apply(images, params, alpha)
    raw = RawBatch(images, *params, alpha).to(DEVICE, non_blocking=True)
    on_device = tr.apply(raw.images, params, alpha)
    assert on_device.device.type == DEVICE.type
    assert torch.equal(on_device.cpu(), on_cpu)


@pytest.mark.parametrize("ten", [False, True])
def test_test_crops_on_the_gpu_match_the_cpu(ten):
    tr = EvalTransform(_stats(256), 227, ten_crop=ten)
    images = torch.randint(0, 256, (8, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    later = DeferredEvalTransform(tr)
    assert torch.equal(later.finish(later(images).to(DEVICE)).cpu(), tr(images))


def _tiny_run(tmp_path, where: str):
    from tests.test_train import tiny_config, weights, write_idx

    from alexnet.train import Trainer

    data = write_idx(tmp_path / "idx")
    cfg = tiny_config(data, epochs=1, max_steps=3, device=str(DEVICE), amp="off")
    cfg = replace(cfg, data=replace(cfg.data, augment_on=where))
    t = Trainer(cfg, tmp_path / where, quiet=True)
    t.fit()
    log = (tmp_path / where / "log.jsonl").read_text().splitlines()
    return t, weights(tmp_path / where), [json.loads(x) for x in log]


def test_a_gpu_run_trains_the_same_weights_wherever_it_augments(tmp_path):
    """Deterministic kernels and the same input bits: the same weights, whether the loader
    or the GPU crops, flips and lights the batches."""
    ta, wa, la = _tiny_run(tmp_path, "loader")
    tb, wb, lb = _tiny_run(tmp_path, "device")
    assert ta.augment_on == "loader" and tb.augment_on == "device"
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert [r["train_loss"] for r in la] == [r["train_loss"] for r in lb]
    assert [r["val_top1_err"] for r in la] == [r["val_top1_err"] for r in lb]


def test_auto_augments_on_a_gpu_and_in_the_loader_on_a_cpu():
    from alexnet.distributed import resolve_augment

    assert resolve_augment("auto", torch.device("cpu")) == "loader"
    assert resolve_augment("auto", torch.device("cuda", 0)) == "device"
    assert resolve_augment("loader", torch.device("cuda", 0)) == "loader"


def test_a_gpu_evaluation_agrees_with_the_cpus(tmp_path):
    from alexnet.evaluate import evaluate_checkpoint

    t, _, _ = _tiny_run(tmp_path, "device")
    best = tmp_path / "device" / "best.safetensors"
    data = tmp_path / "idx"
    here = evaluate_checkpoint(best, str(data), ten_crop=True, out_dir=tmp_path / "a", device=str(DEVICE))
    cpu = evaluate_checkpoint(best, str(data), ten_crop=True, out_dir=tmp_path / "b", device="cpu")
    assert here["images"] == cpu["images"] == 12
    # convolutions may run in TF32 on the GPU: the loss to a few digits, the same top-5
    assert here["loss"] == pytest.approx(cpu["loss"], rel=1e-2, abs=1e-3)
    assert here["top5_err"] == cpu["top5_err"]
