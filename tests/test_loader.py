"""The batch loader: reproducible order and augmentation, resumes, sharding, workers."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import time

import numpy as np
import pytest
import torch

from alexnet.augment import DeferredTrainTransform, EvalTransform, RawBatch, TrainTransform
from alexnet.dataset import DataStats, TensorImageDataset
from alexnet.loader import BatchLoader, LoaderWorkerError, batch_seed, epoch_permutation

S, CROP = 16, 11


def _dataset(n: int = 50) -> TensorImageDataset:
    """Labels are the images' indices, so a batch's y says which images it holds."""
    images = torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    return TensorImageDataset(images, np.arange(n), [f"c{i}" for i in range(n)], image_size=S)


def _stats(ds: TensorImageDataset) -> DataStats:
    return DataStats(ds.images.float().mean(0), torch.tensor([900.0, 100.0, 10.0]), torch.eye(3))


def _loader(ds, **kw) -> BatchLoader:
    args = dict(batch_size=4, transform=TrainTransform(_stats(ds), CROP), shuffle=True, seed=3, drop_last=True)
    args.update(kw)
    return BatchLoader(ds, **args)


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def _children() -> list:
    return [p for p in mp.active_children() if p.name.startswith("alexnet-loader")]


@pytest.fixture(autouse=True)
def _no_leftover_workers():
    yield
    deadline = time.monotonic() + 5
    while _children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _children(), "loader workers outlived their iteration"


def test_permutation_is_a_pure_function_of_seed_and_epoch():
    a = epoch_permutation(100, 7, 2)
    assert np.array_equal(a, epoch_permutation(100, 7, 2))
    assert np.array_equal(np.sort(a), np.arange(100))
    assert not np.array_equal(a, epoch_permutation(100, 7, 3))
    assert not np.array_equal(a, epoch_permutation(100, 8, 2))
    assert batch_seed(1, 2, 3) == batch_seed(1, 2, 3) != batch_seed(1, 2, 4)
    assert 0 <= batch_seed(2**40, 5, 10**6) < 2**63


def test_batches_shapes_and_lengths():
    ds = _dataset(50)
    ld = _loader(ds)
    assert len(ld) == ld.remaining == 12  # 50 // 4, the last 2 images dropped
    batches = _epoch(ld)
    assert len(batches) == 12
    x, y = batches[0]
    assert x.shape == (4, 3, CROP, CROP) and x.dtype == torch.float32 and y.dtype == torch.int64
    ys = torch.cat([y for _, y in batches]).numpy()
    assert len(set(ys)) == 48 and np.array_equal(ys, epoch_permutation(50, 3, 0)[:48])
    ld2 = _loader(ds, drop_last=False, shuffle=False)
    assert len(ld2) == 13
    ys = torch.cat([y for _, y in ld2]).numpy()
    assert np.array_equal(ys, np.arange(50))  # in order, the short last batch included


def test_same_seed_same_batches_with_and_without_workers():
    ds = _dataset(40)
    plain = _epoch(_loader(ds, num_workers=0))
    assert _same(plain, _epoch(_loader(ds, num_workers=2, prefetch=1)))
    assert _same(plain, _epoch(_loader(ds, num_workers=1, prefetch=3)))
    assert _same(plain, _epoch(_loader(ds)))  # and again
    other = _epoch(_loader(ds, seed=4))
    assert not torch.equal(plain[0][0], other[0][0])
    # each batch is augmented differently, also the same images in another epoch
    ld = _loader(ds, shuffle=False)
    e0 = _epoch(ld)
    ld.set_epoch(1)
    e1 = _epoch(ld)
    assert torch.equal(e0[0][1], e1[0][1]) and not torch.equal(e0[0][0], e1[0][0])


def _ptr(x) -> int:
    return (x.images if isinstance(x, RawBatch) else x).untyped_storage().data_ptr()


@pytest.mark.parametrize("deferred", [False, True])
def test_workers_reuse_their_shared_buffers(deferred, monkeypatch):
    """A batch the caller has let go of leaves its buffer to a later batch: one worker
    with prefetch 1 makes at most prefetch + 2 = 3 shared buffers for 12 batches (the
    forked worker counts its allocations in shared memory)."""
    from alexnet import loader as loader_module

    made = mp.get_context("fork").Value("i", 0)
    real = loader_module._new_shared

    def counting(nbytes):
        with made.get_lock():
            made.value += 1
        return real(nbytes)

    monkeypatch.setattr(loader_module, "_new_shared", counting)
    ds = _dataset(50)
    tf = TrainTransform(_stats(ds), CROP)
    want = _epoch(_loader(ds, transform=tf))
    tf = DeferredTrainTransform(tf) if deferred else tf
    got = []
    for x, y in _loader(ds, transform=tf, num_workers=1, prefetch=1):
        got.append((tf.finish(x) if deferred else x.clone(), y.clone()))
    assert len(got) == 12 and _same(want, got)
    assert 1 <= made.value <= 3


def test_batches_the_caller_keeps_are_never_written_over():
    """Kept batches, and views of batches whose tensor was dropped, keep their buffers;
    the later batches go to other buffers, and every kept one still holds its numbers."""
    ds = _dataset(60)
    want = _epoch(_loader(ds))
    kept, views = [], []
    for i, (x, y) in enumerate(_loader(ds, num_workers=2, prefetch=1)):
        if i % 2:
            kept.append((i, x, y))  # the batch itself, no copy
        else:
            views.append((i, x[1:3], y))  # only a view of it; the batch tensor goes
    assert len(kept) + len(views) == 15
    for i, x, y in kept:
        assert torch.equal(x, want[i][0]) and torch.equal(y, want[i][1])
    for i, v, y in views:
        assert torch.equal(v, want[i][0][1:3])
    assert len({_ptr(x) for _, x, _ in kept} | {_ptr(v) for _, v, _ in views}) == 15


@pytest.mark.parametrize("workers", [0, 2])
def test_deferred_augmentation_ships_uint8_and_finishes_to_the_same_batches(workers):
    """Augmentation on the device: the workers send uint8 images and the draws through
    shared memory; finishing them gives the batches of augmentation in the loader."""
    ds = _dataset(40)
    plain = _epoch(_loader(ds))
    later = DeferredTrainTransform(TrainTransform(_stats(ds), CROP))
    got = []
    for raw, y in _loader(ds, transform=later, num_workers=workers):
        assert isinstance(raw, RawBatch) and raw.images.dtype == torch.uint8
        assert raw.images.shape == (4, 3, S, S)
        assert raw.is_shared() == (workers > 0)
        got.append((later.finish(raw), y.clone()))
    assert _same(plain, got)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_rest_of_the_epoch(workers):
    ds = _dataset(40)
    full = _epoch(_loader(ds, epoch=2))
    ld = _loader(ds, epoch=2, start_batch=7, num_workers=workers)
    assert len(ld) == 10 and ld.remaining == 3
    assert _same(_epoch(ld), full[7:])
    ld.set_epoch(2, start_batch=10)
    assert _epoch(ld) == []
    with pytest.raises(ValueError):
        ld.set_epoch(2, start_batch=11)


def test_sharding_for_evaluation_covers_every_image_once():
    ds = _dataset(41)
    shards = [_loader(ds, drop_last=False, rank=r, world_size=2, transform=EvalTransform(_stats(ds), CROP))
              for r in range(2)]
    assert [len(s) for s in shards] == [6, 5]  # 21 and 20 images in batches of 4
    ys = [torch.cat([y for _, y in s]).numpy() for s in shards]
    assert len(ys[0]) == 21 and len(ys[1]) == 20
    assert np.array_equal(np.sort(np.concatenate(ys)), np.arange(41))  # no duplicates, none missing
    x, _ = next(iter(shards[0]))
    assert x.shape == (4, 3, CROP, CROP)


def test_sharding_for_training_gives_equal_batches_per_rank():
    ds = _dataset(43)
    shards = [_loader(ds, rank=r, world_size=2, epoch=5) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5  # 43 // 8
    batches = [_epoch(s) for s in shards]
    ys = np.concatenate([torch.cat([y for _, y in b]).numpy() for b in batches])
    assert len(ys) == 40 and len(set(ys)) == 40
    perm = epoch_permutation(43, 3, 5)
    for k in range(5):  # global step k is the k-th slice of the epoch's order
        step = np.concatenate([batches[0][k][1].numpy(), batches[1][k][1].numpy()])
        assert set(step) == set(perm[k * 8:(k + 1) * 8])
    with pytest.raises(ValueError):
        _loader(_dataset(7), world_size=2)  # no full batch for every rank
    # 3 ranks, 28 images, 4 a batch: 2 full global steps (24 images); a rank with a third
    # batch would wait for the others at its third step for ever
    three = [_loader(_dataset(28), rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in three] == [2, 2, 2] and [len(s.indices()) for s in three] == [8, 8, 8]


def test_uint8_batches_without_transform_and_ten_crops():
    ds = _dataset(12)
    x, y = next(iter(_loader(ds, transform=None, shuffle=False)))
    assert x.dtype == torch.uint8 and torch.equal(x, ds.images[:4]) and y.tolist() == [0, 1, 2, 3]
    ld = _loader(ds, transform=EvalTransform(_stats(ds), CROP, ten_crop=True), num_workers=1)
    x, _ = next(iter(ld))
    assert x.shape == (4, 10, 3, CROP, CROP)


def test_abandoned_iteration_stops_its_workers():
    ld = _loader(_dataset(60), num_workers=2)
    it = iter(ld)
    next(it)
    assert len(_children()) == 2
    del it  # the fixture checks that the workers are gone
    for i, _ in enumerate(ld):
        if i == 2:
            break


class _Slow(TensorImageDataset):
    def _read(self, idx):
        time.sleep(0.05)
        return super()._read(idx)


class _Failing(TensorImageDataset):
    def _read(self, idx):
        if 13 in idx:
            raise OSError("disk on fire reading image 13")
        return super()._read(idx)


def test_a_killed_worker_raises_promptly():
    base = _dataset(200)
    ds = _Slow(base.images, base.labels, base.classes, image_size=S)
    it = iter(_loader(ds, num_workers=2))
    next(it)
    victim = _children()[0]
    os.kill(victim.pid, signal.SIGKILL)
    t = time.monotonic()
    with pytest.raises(LoaderWorkerError, match=r"killed by signal 9"):
        for _ in it:
            pass
    assert time.monotonic() - t < 5


def test_an_exception_in_a_worker_is_raised_with_its_traceback():
    base = _dataset(40)
    ds = _Failing(base.images, base.labels, base.classes, image_size=S)
    with pytest.raises(LoaderWorkerError, match="disk on fire") as e:
        _epoch(_loader(ds, num_workers=2, shuffle=False))
    # the reason on the first line, which a one-line message (train's) keeps; the traceback after it
    first, *rest = str(e.value).splitlines()
    assert re.fullmatch(r"loader worker \d failed on batch \d+: OSError: disk on fire reading image 13", first), first
    assert rest[0].startswith("Traceback") and "_read" in str(e.value)


LONG_BATCHES = """
import numpy as np, torch
from alexnet.dataset import TensorImageDataset
from alexnet.loader import BatchLoader
n = 9000 * 3
ds = TensorImageDataset(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), np.arange(n), ["c"] * n, image_size=4)
ys = [y for _, y in BatchLoader(ds, 9000, None, shuffle=True, seed=0, drop_last=True, num_workers=1)]
assert torch.equal(torch.cat(ys).sort().values, torch.arange(n)), "every image once"
print("ok")
"""


def test_batches_longer_than_a_pipe_holds_do_not_hang():
    """9,000-image batches: a task's indices and a result's labels are each more than a
    pipe's 64 KiB, which once left the main process and the worker each waiting on the
    other's send. In a subprocess, so that a hang fails the test instead of CI."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", LONG_BATCHES], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_a_forkserver_worker_waits_for_a_slow_consumer():
    """A worker exits when the process that started it is gone; a forkserver worker's
    parent process is the fork server, and it must not take that for a dead starter."""
    got = []
    for x, y in _loader(_dataset(12), num_workers=1, prefetch=1, mp_context="forkserver"):
        time.sleep(1.5)  # longer than the worker's 1 s poll for a task
        got.append(y)
    assert len(got) == 3


def test_a_sigterm_to_the_workers_leaves_the_batches_coming():
    """A SIGTERM to the whole process group (Slurm, systemd) reaches the workers too: the
    trainer takes it as "stop after this step", and the validation under way still needs
    its workers. They ignore it (and so do not run the trainer's handler either)."""
    ds = _dataset(200)
    want = [y for _, y in _loader(ds, num_workers=0)]
    old = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        it = iter(_loader(ds, num_workers=2))
        got = [next(it)[1]]
        for p in _children():
            os.kill(p.pid, signal.SIGTERM)
        time.sleep(0.5)
        got += [y for _, y in it]
    finally:
        signal.signal(signal.SIGTERM, old)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_arguments():
    ds = _dataset(10)
    for kw in ({"batch_size": 0}, {"rank": 2, "world_size": 2}, {"prefetch": 0}, {"seed": -1},
               {"epoch": -1}, {"num_workers": -1}):
        with pytest.raises(ValueError):
            _loader(ds, **kw)


ONE_BAD_FILE = """
import sys
import numpy as np
from PIL import Image
from alexnet.loader import BatchLoader
from alexnet.sources import open_dataset
root = sys.argv[1]
for k in range(16):
    Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(f"{root}/c{k % 2}/{k:02d}.png")
with open(f"{root}/c1/05.png", "wb") as f:
    f.write(b"not a PNG")
ds = open_dataset(root, "train", 16)
loader = BatchLoader(ds, 4, None, shuffle=True, seed=0, drop_last=False, num_workers=int(sys.argv[2]))
for epoch in range(3):
    loader.set_epoch(epoch)
    n = sum(len(y) for _, y in loader)
    assert n == 16, n
print(sorted(ds.bad), flush=True)
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_an_unreadable_file_is_decoded_and_warned_about_once_per_run(tmp_path, workers):
    """Workers are forked afresh each epoch from the main process: what they learned of
    an unreadable file went with them, so it was decoded, and warned about, every epoch."""
    import subprocess
    import sys

    for c in ("c0", "c1"):
        (tmp_path / c).mkdir()
    r = subprocess.run([sys.executable, "-c", ONE_BAD_FILE, str(tmp_path), str(workers)], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "always"})
    assert r.returncode == 0, r.stderr[-2000:]
    bad = sorted(os.listdir(tmp_path / "c0")) + sorted(os.listdir(tmp_path / "c1"))
    assert r.stdout.strip() == f"[{bad.index('05.png')}]"  # the main process knows it too
    assert r.stderr.count("unreadable image c1/05.png") == 1, r.stderr
