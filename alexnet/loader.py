"""Batches for training and evaluation: shuffled, sharded, augmented, loaded ahead.

`BatchLoader(dataset, batch_size, transform, shuffle=..., seed=..., drop_last=...)` yields
`(x float32, y int64)` batches. Everything random is a pure function of the seed:

* the epoch's order is `epoch_permutation(len(dataset), seed, epoch)`, the same on every
  rank (`shuffle=False`: 0, 1, 2, ...);
* rank r of `world_size` W takes every W-th image of that order starting at r, so global
  step k (the k-th batch of every rank together) covers positions [k*W*B, (k+1)*W*B) of
  the order;
* the augmentation of rank r's batch k draws from a `torch.Generator` seeded with
  `batch_seed(seed, epoch, k * W + r)` (k * W + r is the batch's global index).

So a run resumed at `start_batch=k` yields exactly the batches k, k+1, ... of the
uninterrupted epoch, and `num_workers` changes only the speed, never a batch.

Sharding modes:

* `drop_last=True` (training): every rank gets `len(dataset) // (W * B)` full batches;
  the images past the last full global step (fewer than W*B, a different set each
  epoch) are skipped.
* `drop_last=False` (evaluation): every image exactly once over all ranks, no padding
  or duplicates. Ranks' image counts differ by at most one, so their batch counts can
  differ by one and each rank's last batch may be short: sum metrics per rank and
  reduce them after the loop, not per step.

Epochs: `set_epoch(epoch, start_batch=0)` (or the constructor's `epoch=`/`start_batch=`)
chooses what the next iteration yields; iterating again without it repeats the same
batches. `len(loader)` is the number of batches of the whole epoch for this rank,
`loader.remaining` the number the next iteration yields (`len - start_batch`).

Workers. `num_workers=0` loads in the calling thread. With `num_workers > 0`, that many
processes (forked, so the dataset is shared, not copied; one torch thread each, niced by
`worker_nice`) read and augment batches round-robin, each keeping up to `prefetch`
batches ahead; the batches come back through shared memory in order, and the main
process only maps them. Each worker reuses a few shared buffers (`_WorkerPool`): new
shared memory for every batch cost more than the augmentation itself (page faults on
both sides: 0.62 against 0.25 ms of a worker's CPU per augmented 227x227 image, 2-core
machine). Budget: on a machine whose cores all train the model, a worker
preempts the model's threads, and a multi-threaded step waits for its slowest thread:
on 2 cores, a prepared store fed training fastest with `num_workers=0` (reading and
augmenting take ~0.2 ms of one core per image, next to 15-50 ms of training); one worker
at nice 10 cost 3% of the speed on that machine (earlier, with fresh shared memory per
batch: ~8%, at nice 0 ~20%). Workers pay off where loading is heavy (decoding JPEGs)
or cores are spare. See benchmarks/bench_loader.py. A worker that
dies (killed, out of memory) makes the iteration raise `LoaderWorkerError` at once
(the main process waits on the workers' sentinels, never on a lock they may hold); an
exception inside a worker is re-raised with the worker's traceback. Abandoning the
iteration (break, exception, garbage collection, `close()` on the iterator) stops and
reaps the workers; they also exit by themselves when the main process disappears.

A batch from workers lives on a buffer that is written again once no tensor on it is
left: keep a batch as a tensor (or a view, or a NumPy array of it), not through its
storage alone, and `clone()` one before handing it to another process, which this
process cannot see holding it.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import pickle
import signal
import traceback
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory pickling of tensors)

from alexnet.augment import RawBatch, TrainTransform
from alexnet.dataset import ImageDataset

_PERMUTATION_STREAM = 0x0A1E_0001
_AUGMENT_STREAM = 0x0A1E_0002

Transform = Callable[..., torch.Tensor]


class LoaderWorkerError(RuntimeError):
    """A loader worker process died or failed."""


def _check_nonnegative(**kw: int) -> None:
    for k, v in kw.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{k} must be a non-negative integer, not {v!r}")


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the images in `epoch`: a permutation of range(n) (int64) that depends
    only on (seed, epoch)."""
    _check_nonnegative(n=n, seed=seed, epoch=epoch)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, _PERMUTATION_STREAM])))
    return rng.permutation(n).astype(np.int64)


def batch_seed(seed: int, epoch: int, global_batch: int) -> int:
    """The seed of the augmentation generator of one batch (63 bits)."""
    _check_nonnegative(seed=seed, epoch=epoch, global_batch=global_batch)
    hi, lo = np.random.SeedSequence([seed, epoch, global_batch, _AUGMENT_STREAM]).generate_state(2, np.uint32)
    return ((int(hi) << 32) | int(lo)) & ((1 << 63) - 1)


def _new_shared(nbytes: int) -> torch.UntypedStorage:
    """Uninitialised shared memory. `_new_shared` (what torch's own DataLoader collation
    uses) saves the copy that `share_memory_()` makes."""
    try:
        return torch.UntypedStorage._new_shared(nbytes)
    except (AttributeError, TypeError, RuntimeError):
        return torch.empty(nbytes, dtype=torch.uint8).share_memory_().untyped_storage()


def _on_storage(storage: torch.UntypedStorage, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return int(np.prod(shape)) * dtype.itemsize


def _fresh_shared(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return _on_storage(_new_shared(_nbytes(shape, dtype)), shape, dtype)


Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def load_batch(dataset: ImageDataset, transform: Transform | None, idx: np.ndarray, seed: int,
               alloc: Alloc | None = None) -> tuple[torch.Tensor | RawBatch, torch.Tensor]:
    """Read images `idx` and apply `transform(images, generator)` with a generator seeded
    with `seed`. With `alloc(shape, dtype)` the batch's big tensor (the crops, or the
    uint8 images) is written into the buffer it returns (a worker's shared memory)."""
    images, labels = dataset.read(idx)
    if transform is None:
        x = images
    else:
        g = torch.Generator().manual_seed(seed)
        if alloc is not None and isinstance(transform, TrainTransform):  # straight into the buffer
            return transform(images, g, out=alloc((images.shape[0], 3, transform.crop, transform.crop),
                                                  torch.float32)), labels
        x = transform(images, g)
    if alloc is not None:
        if isinstance(x, RawBatch):
            x = x._replace(images=alloc(tuple(x.images.shape), x.images.dtype).copy_(x.images))
        else:
            x = alloc(tuple(x.shape), x.dtype).copy_(x)
    return x, labels


class BatchLoader:
    """See the module docstring. `transform(images uint8 (B, 3, S, S), generator)` makes
    the batch (`TrainTransform`, `EvalTransform`, or None for the uint8 images).

    Every draw (the order, the crops, flips and lighting) is fixed by (seed, epoch, batch),
    so iterating again repeats the same epoch exactly: a training loop of one's own calls
    `set_epoch(e)` before each epoch, or it sees the same augmentation every time."""

    def __init__(self, dataset: ImageDataset, batch_size: int, transform: Transform | None, *, shuffle: bool,
                 seed: int, epoch: int = 0, start_batch: int = 0, drop_last: bool, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, prefetch: int = 2, timeout: float | None = None,
                 worker_nice: int = 10, mp_context: str | None = None):
        _check_nonnegative(seed=seed, num_workers=num_workers, rank=rank)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if world_size < 1 or rank >= world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, not {prefetch}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive or None, not {timeout}")
        self.dataset, self.batch_size, self.transform = dataset, batch_size, transform
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.prefetch, self.timeout = num_workers, prefetch, timeout
        self.worker_nice = worker_nice
        if mp_context is None:
            mp_context = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        self.mp_context = mp_context
        n = len(dataset)
        if drop_last and n < world_size * batch_size:
            raise ValueError(f"{n} images make no full batch of {batch_size} for each of {world_size} ranks")
        self.set_epoch(epoch, start_batch)

    # --- what an epoch contains ---------------------------------------------------------

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration yield batches start_batch, ... of `epoch`."""
        _check_nonnegative(epoch=epoch, start_batch=start_batch)
        self.epoch = int(epoch)
        self._shard = self._make_shard()
        if start_batch > len(self):
            raise ValueError(f"start_batch {start_batch} is past the {len(self)} batches of the epoch")
        self.start_batch = int(start_batch)

    def _make_shard(self) -> np.ndarray:
        n, w = len(self.dataset), self.world_size
        order = epoch_permutation(n, self.seed, self.epoch) if self.shuffle else np.arange(n, dtype=np.int64)
        if self.drop_last:
            order = order[: n // (w * self.batch_size) * w * self.batch_size]
        return order[self.rank::w]

    def __len__(self) -> int:
        k, b = len(self._shard), self.batch_size
        return k // b if self.drop_last else -(-k // b)

    @property
    def remaining(self) -> int:
        """Batches the next iteration yields."""
        return len(self) - self.start_batch

    def indices(self) -> np.ndarray:
        """This rank's images of the epoch, in order (all batches, also before start_batch)."""
        return self._shard.copy()

    def batch_indices(self, b: int) -> np.ndarray:
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} of {len(self)}")
        return self._shard[b * self.batch_size:(b + 1) * self.batch_size]

    def global_batch(self, b: int) -> int:
        """The index of this rank's batch b among all ranks' batches of the epoch."""
        return b * self.world_size + self.rank

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch b of the epoch, loaded here; the same tensors the iteration yields."""
        return load_batch(self.dataset, self.transform, self.batch_indices(b),
                          batch_seed(self.seed, self.epoch, self.global_batch(b)))

    # --- iteration ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = range(self.start_batch, len(self))
        if self.num_workers == 0:
            return (self.batch(b) for b in batches)
        return _pooled(self, batches)


def _pooled(loader: BatchLoader, batches: range) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    pool = _WorkerPool(loader, min(loader.num_workers, max(len(batches), 1)))
    try:
        yield from pool.run(batches)
    finally:
        pool.close()


def _worker_main(wid: int, dataset: ImageDataset, transform: Transform | None, tasks: mpc.Connection,
                 results: mpc.Connection, parent: int, inherited: list[mpc.Connection], nice: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    # a SIGTERM to the whole process group (Slurm's preemption, systemd's stop) is the main
    # process's "stop after this step", and the validation under way still needs its workers:
    # the pool ends them (SIGKILL when they do not return), the parent check if it dies
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for c in inherited:  # the other ends, and other workers' pipes, inherited by fork
        c.close()
    torch.set_num_threads(1)
    slots: list[torch.UntypedStorage | None] = []  # this worker's reused shared buffers
    bad = getattr(dataset, "unreadable", dict)()  # what this worker learns of unreadable files goes back with its batch
    told = len(bad)
    if nice > 0:
        try:
            os.nice(nice)
        except OSError:
            pass
    while True:
        try:
            if not tasks.poll(1.0):
                if not _parent_alive(parent):
                    return
                continue
            task = tasks.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        b, idx, seed, k = task
        if isinstance(idx, torch.Tensor):  # a long batch's indices, sent in shared memory
            idx = idx.numpy()
        try:
            x, y = load_batch(dataset, transform, idx, seed, lambda shape, dtype: _slot(slots, k, shape, dtype))
            msg = (b, k, x, y.numpy(), None, dict(list(bad.items())[told:]) if len(bad) > told else None)
            told = len(bad)
        except Exception as e:
            msg = (b, k, None, None, (traceback.format_exc(), _as_sent(e)), None)
        try:
            results.send(msg)
        except (BrokenPipeError, OSError):
            return
        msg = x = None  # drop this side's reference to the shared memory


def _as_sent(e: Exception) -> Exception | None:
    """`e` itself, for the main process to raise as it is, where it is the data's or the
    settings' fault (a `ConfigError`: "no image in X can be decoded"), as it would be
    without workers; None for any other error, or one that cannot be pickled."""
    from alexnet.config import ConfigError

    if not isinstance(e, ConfigError):
        return None
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:
        return None
    return e.with_traceback(None)


def _parent_alive(pid: int) -> bool:
    """Whether the process that started this worker is still there. Forked workers see a
    new parent pid once it dies; with forkserver or spawn the parent is not the starter,
    so ask multiprocessing, which watches the starter's end of a pipe."""
    starter = mp.parent_process()
    if starter is not None:
        return starter.is_alive()
    return os.getppid() == pid


def _slot(slots: list, k: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A (shape, dtype) tensor on the worker's shared buffer k, made or grown as needed;
    k = -1: a fresh buffer that is not kept."""
    if k < 0:
        return _fresh_shared(shape, dtype)
    slots.extend([None] * (k + 1 - len(slots)))
    n = _nbytes(shape, dtype)
    if slots[k] is None or slots[k].nbytes() < n:
        slots[k] = _new_shared(n)
    return _on_storage(slots[k], shape, dtype)


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _reuse_baseline() -> int | None:
    """`_use_count` of a storage that one tensor alone holds, or None where this torch
    cannot say (then every batch gets a fresh buffer)."""
    try:
        return _use_count(torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage(8)))
    except (AttributeError, RuntimeError, TypeError):
        return None


TASK_BYTES = 16384  # index bytes a worker's queued tasks may take in its pipe


class _WorkerPool:
    """The workers, and the shared buffers they write batches into. Each worker keeps up
    to `prefetch + 2` buffers and is told, with each task, which one to use: one that
    no batch the caller may still hold lives on (the main process keeps one tensor on
    each buffer and reads its storage's reference count), else a new one, else a fresh
    one that is not kept. A reused buffer is mapped once in each process, so neither
    pays the page faults of new shared memory for every batch; a batch the caller keeps
    (a list of them, a view of one) is never written over."""

    def __init__(self, loader: BatchLoader, n: int):
        self.loader, self.n = loader, n
        self.baseline = _reuse_baseline()
        self.cap = loader.prefetch + 2 if self.baseline is not None else 0
        self.kept: list[dict[int, torch.Tensor]] = [{} for _ in range(n)]  # slot -> a tensor on it
        self.pending: list[set[int]] = [set() for _ in range(n)]  # slots of tasks not yet received
        ctx = mp.get_context(loader.mp_context)
        forked = loader.mp_context == "fork"
        task_pipes = [ctx.Pipe(duplex=False) for _ in range(n)]  # (worker reads, main writes)
        result_pipes = [ctx.Pipe(duplex=False) for _ in range(n)]  # (main reads, worker writes)
        self.tasks = [w for _, w in task_pipes]
        self.results = [r for r, _ in result_pipes]
        self.workers: list[mp.process.BaseProcess] = []
        self.closed = False
        try:
            for i in range(n):
                mine = {id(task_pipes[i][0]), id(result_pipes[i][1])}
                inherited = [c for pair in task_pipes + result_pipes for c in pair
                             if id(c) not in mine and not c.closed] if forked else []
                p = ctx.Process(target=_worker_main, name=f"alexnet-loader-{i}", daemon=True,
                                args=(i, loader.dataset, loader.transform, task_pipes[i][0], result_pipes[i][1],
                                      os.getpid(), inherited, loader.worker_nice))
                p.start()
                self.workers.append(p)
                task_pipes[i][0].close()  # the worker's ends live in the worker only
                result_pipes[i][1].close()
        except BaseException:
            for pair in task_pipes + result_pipes:
                for c in pair:
                    c.close()
            self.close()
            raise

    def _free_slot(self, w: int) -> int:
        kept, pending = self.kept[w], self.pending[w]
        for k, t in kept.items():
            if k not in pending and _use_count(t) == self.baseline:
                return k
        used = set(kept) | pending
        return next((k for k in range(self.cap) if k not in used), -1)

    def _send(self, b: int, first: int) -> None:
        ld = self.loader
        w = (b - first) % self.n
        k = self._free_slot(w)
        if k >= 0:
            self.pending[w].add(k)
        idx = ld.batch_indices(b)
        if idx.nbytes * ld.prefetch > TASK_BYTES:
            # A pipe holds 64 KiB: tasks that fill it block this process in send() while
            # the worker blocks sending it the last batch's labels. Long index lists go
            # in shared memory, so a task stays a few hundred bytes.
            idx = torch.from_numpy(np.ascontiguousarray(idx)).share_memory_()
        task = (b, idx, batch_seed(ld.seed, ld.epoch, ld.global_batch(b)), k)
        try:
            self.tasks[w].send(task)
        except (BrokenPipeError, OSError):
            self._raise_dead(w)

    def _raise_dead(self, w: int) -> None:
        p = self.workers[w]
        p.join(timeout=1.0)
        code = p.exitcode
        how = (f"was killed by signal {-code}" if code is not None and code < 0
               else f"exited with code {code}" if code is not None else "stopped answering")
        raise LoaderWorkerError(f"loader worker {w} (pid {p.pid}) {how}; the batches it was loading are lost")

    def _receive(self, b: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = (b - first) % self.n
        conn = self.results[w]
        sentinels = {p.sentinel: i for i, p in enumerate(self.workers)}
        timeout = self.loader.timeout
        while True:
            ready = mpc.wait([conn, *sentinels], timeout=timeout)
            if not ready:
                raise LoaderWorkerError(f"no batch from loader worker {w} (pid {self.workers[w].pid}) "
                                        f"in {timeout} s")
            for r in ready:
                if r in sentinels:
                    self._raise_dead(sentinels[r])
            try:
                got, k, x, y, err, learned = conn.recv()
            except (EOFError, OSError):
                self._raise_dead(w)
            except Exception:
                if not self.workers[w].is_alive():
                    self._raise_dead(w)
                raise
            if err is not None:
                err, same = err
                if same is not None:  # the data's fault: the error it is without workers
                    raise same
                # the reason (the traceback's last line) first, as a one-line message shows it
                reason = next((line for line in reversed(err.splitlines()) if line.strip()), "unknown error")
                raise LoaderWorkerError(f"loader worker {w} failed on batch {got}: {reason}\n{err}")
            if learned:  # later workers (the next epoch's) are forked knowing them
                getattr(self.loader.dataset, "unreadable", dict)().update(learned)
            if got != b:  # cannot happen: each worker answers its tasks in order
                raise LoaderWorkerError(f"loader worker {w} sent batch {got}, expected {b}")
            self.pending[w].discard(k)
            if k >= 0:  # keep the buffer mapped here (the next batch on it arrives on the same storage)
                big = x.images if isinstance(x, RawBatch) else x
                held = self.kept[w].get(k)
                if held is None or held.untyped_storage().data_ptr() != big.untyped_storage().data_ptr():
                    self.kept[w][k] = torch.empty(0, dtype=torch.uint8).set_(big.untyped_storage())
            return x, torch.from_numpy(y)

    def run(self, batches: range) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not batches:
            return
        first, stop = batches.start, batches.stop
        ahead = first + min(len(batches), self.n * self.loader.prefetch)
        for b in range(first, ahead):
            self._send(b, first)
        for b in batches:
            x, y = self._receive(b, first)
            if ahead < stop:
                self._send(ahead, first)
                ahead += 1
            yield x, y

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for c in self.tasks:
            try:
                c.send(None)
            except (BrokenPipeError, OSError):
                pass
            c.close()
        for p in self.workers:
            p.join(timeout=2.0)
            if p.is_alive():  # SIGKILL: a worker ignores SIGTERM
                p.kill()
                p.join()
        for c in self.results:
            c.close()
