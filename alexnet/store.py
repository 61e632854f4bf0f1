"""The prepared store: every image decoded once, rescaled and centre-cropped to 256x256
(section 2 of the paper), packed as raw uint8 so training reads it by memory mapping.

A store is one folder holding one split:

    index.json          format "alexnet-store", version, complete, split, image_size,
                        count, shape, dtype, classes, class_names, file names below,
                        source (the folder prepared), skipped / ignored counts
    images.u8           raw uint8 (count, 3, S, S), C order, no header
    labels.npy          int64 (count,)
    sources.jsonl       the source file of every record, one JSON string per line,
                        relative to `source` ("file#i" for IDX records)
    stats.safetensors   mean_image (3, S, S), eigval (3,), eigvec (3, 3): float32
                        statistics of this store's own images (see below)
    skipped.tsv         one line per file that was not stored: "path<TAB>reason"

Statistics: every store holds the statistics of its own images, computed exactly while
preparing (see `StatsAccumulator`). The paper's pipeline uses the TRAINING set's
statistics for every split, so the trainer takes them from the train store; a val
store's own statistics are there for inspection only.

Preparing is resumable and crash-safe. While it runs the folder also holds
progress.json (the committed record count and byte lengths, replaced atomically with
os.replace after the data files are flushed), accum-<n>.npz (the statistics sums at that
commit), labels.i64 and skipped.partial.tsv (append-only). Data past the committed
lengths (a write cut short) is truncated when the prepare is run again, which then goes
on with the files not yet done. index.json is written last, so a store with an
index.json is complete.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alexnet.config import MAX_IMAGE_SIZE
from alexnet.dataset import DataStats, ImageDataset, load_stats, resize_batch, save_stats
from alexnet.fileio import WriteError, atomic_write, atomic_write_json, json_bytes, make_dir, within
from alexnet.progress import Progress, first_few, plural
from alexnet.images import MAX_PIXELS, ImageError, decode_file
from alexnet.sources import (DataSourceError, Names, SourceNotFoundError, StatsAccumulator,
                             open_idx, resolve_source)

FORMAT = "alexnet-store"
VERSION = 1
INDEX, PROGRESS = "index.json", "progress.json"
IMAGES, LABELS, LABELS_RAW = "images.u8", "labels.npy", "labels.i64"
SOURCES, STATS = "sources.jsonl", "stats.safetensors"
REPORT, REPORT_PARTIAL = "skipped.tsv", "skipped.partial.tsv"
LOCK = ".lock"


# ---------------------------------------------------------------------------- small file helpers

_TSV_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_TSV_UNESCAPES = {v: k for k, v in _TSV_ESCAPES.items()}


def _report_line(path: str, reason: str) -> bytes:
    """One skipped.tsv row. A file name that is not UTF-8 (a str with surrogate escapes, as
    os.listdir gives it) is written as its own bytes, as `ls` would show them; a backslash,
    tab, newline or carriage return in a name as \\\\, \\t, \\n, \\r (`_report_name` reads them)."""
    path = "".join(_TSV_ESCAPES.get(c, c) for c in str(path))
    return f"{path}\t{' '.join(str(reason).split())}\n".encode("utf-8", "surrogateescape")


def _report_name(field: str) -> str:
    """The file name of a skipped.tsv row's first field."""
    return re.sub(r"\\[\\tnr]", lambda m: _TSV_UNESCAPES[m.group(0)], field)


# ---------------------------------------------------------------------------- decoding work

def _decode_task(path: str, size: int, max_pixels: int):
    """Worker: one file to (uint8 (3,S,S), pixel sum, pixel outer-product sum) or (None, reason)."""
    try:
        arr = decode_file(path, size, max_pixels)
    except ImageError as e:
        return None, str(e)
    except Exception as e:  # never let one file end the run
        return None, f"unexpected error ({type(e).__name__}): {' '.join(str(e).split())[:200]}"
    return arr, StatsAccumulator.pixel_moments(arr)


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    if sys.platform.startswith("linux"):  # end quietly with a parent that was killed
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


_AHEAD_PER_WORKER = 32  # files decoded ahead of the writer, per worker
KEPT = "the images committed so far are kept: run the same command again to go on"


# (fileio.atomic_write's: mkstemp's 8 random letters, digits or underscores)
_TEMPORARY = re.compile(r"\.(%s)\.[A-Za-z0-9_]{8}\.tmp" % "|".join(
    re.escape(n) for n in (INDEX, PROGRESS, LABELS, STATS, REPORT)))


def _stray(p: Path) -> bool:
    """The lock, or a temporary of a store file's atomic write that a kill cut short
    (`.progress.json.a69d7tit.tmp`): files that do not make a folder a store, nor keep it
    from being an empty one."""
    if p.name == LOCK:
        return True
    return _TEMPORARY.fullmatch(p.name) is not None and p.is_file() and not p.is_symlink()


def _damaged(out: Path, what: str) -> DataSourceError:
    return DataSourceError(f"{out} is damaged ({' '.join(str(what).split())}); delete it and prepare again")


class _NoLock(WriteError):
    """The lock file could not be made: a folder this process cannot write in."""


class PrepareError(RuntimeError):
    """prepare could not go on (a decoding process died); the store stays resumable."""


def _named(e: OSError, out: Path) -> str:
    """' (FILE)' for an error about a file other than `out` itself."""
    return f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""


def _decode_worker(paths: Sequence[str], size: int, max_pixels: int, tasks, results, inherited: list) -> None:
    """A decoding process: for each task (start, stop) from `tasks`, the decoded files
    `paths[start:stop]` (a list of `_decode_task` results) to `results`; None ends it."""
    _worker_init()
    for c in inherited:  # the other workers' pipes, inherited by fork: theirs to end
        c.close()
    while True:
        try:
            task = tasks.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if task is None:
            return
        try:
            results.send([_decode_task(p, size, max_pixels) for p in paths[slice(*task)]])
        except OSError:
            return


def _folder_results(paths: Sequence[str], size: int, max_pixels: int, workers: int):
    """Decode `paths` in order with `workers` processes, a bounded number of files ahead.
    A worker that dies (the kernel's OOM killer, a kill -9) is a PrepareError at once,
    not a wait for a result that never comes: each worker answers on a pipe of its own,
    whose only writer it is, so a death, even half-way through a result (several times
    what a pipe holds), ends the read there. (A process pool's shared result pipe, kept
    open by the others, waited for the rest of that result for ever.)"""
    if workers <= 1 or not paths:
        for p in paths:
            yield _decode_task(p, size, max_pixels)
        return
    import multiprocessing.connection as mpc

    chunk = 4
    n_chunks = -(-len(paths) // chunk)
    ahead = workers * max(1, _AHEAD_PER_WORKER // chunk)  # chunks asked for beyond the one read
    fork = "fork" in mp.get_all_start_methods()
    ctx = mp.get_context("fork" if fork else None)
    procs, tasks, results = [], [], []

    def dead(w: int) -> PrepareError:
        procs[w].join(timeout=1.0)
        code = procs[w].exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else \
            f"exited with code {code}" if code is not None else "stopped answering"
        return PrepareError(f"a decoding process {how} (killed, perhaps by the system for want of memory); {KEPT}")

    sent = 0

    def ask(upto: int) -> None:
        nonlocal sent
        while sent < min(upto, n_chunks):
            w = sent % workers
            try:
                tasks[w].send((sent * chunk, min(len(paths), (sent + 1) * chunk)))
            except OSError:
                raise dead(w) from None
            sent += 1

    try:
        for w in range(workers):
            t_read, t_write = ctx.Pipe(duplex=False)
            r_read, r_write = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_decode_worker, name=f"alexnet-decode-{w}", daemon=True,
                            args=(paths, size, max_pixels, t_read, r_write, tasks + results if fork else []))
            p.start()
            t_read.close()
            r_write.close()
            procs.append(p)
            tasks.append(t_write)
            results.append(r_read)
        ask(ahead)
        for i in range(n_chunks):
            w = i % workers
            conn = results[w]
            mpc.wait([conn, procs[w].sentinel])
            try:
                part = conn.recv()  # (a worker that has sent its result and died: the result first)
            except Exception:  # EOF half-way through a result, or none: the worker died
                raise dead(w) from None
            ask(i + 1 + ahead)
            yield from part
        for t in tasks:
            with contextlib.suppress(OSError):
                t.send(None)
        for p in procs:
            p.join(timeout=5)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        for c in tasks + results:
            c.close()


def _idx_results(images: torch.Tensor, order: list[int], size: int):
    """In-memory IDX images resized batch-wise (torch uses the cores)."""
    for start in range(0, len(order), 256):
        part = order[start:start + 256]
        batch = resize_batch(images[torch.tensor(part)], size).numpy()
        for arr in batch:
            yield arr, StatsAccumulator.pixel_moments(arr)


# ---------------------------------------------------------------------------- prepare

@dataclass
class PrepareResult:
    out: str
    written: int
    skipped: int
    ignored: int
    report: str
    complete: bool
    already: bool = False  # complete before this call: nothing was written

    def summary(self) -> str:
        state = "" if self.complete else " (unfinished: run again to finish)"
        ign = f", {self.ignored} non-image files ignored" if self.ignored else ""
        if self.already:
            return (f"{self.out} is a complete store already, nothing written: {plural(self.written, 'image')}, "
                    f"{self.skipped} skipped{ign} (report: {self.report})")
        return (f"prepared {self.out}: {plural(self.written, 'image')} written, {self.skipped} skipped"
                f"{ign} (report: {self.report}){state}")


class _Writer:
    """Append-only data files plus the atomically replaced progress.json."""

    def __init__(self, out: Path, meta: dict, state: dict, acc: StatsAccumulator):
        self.out, self.meta, self.state, self.acc = out, meta, state, acc
        self.files = {k: open(out / k, "ab") for k in (IMAGES, LABELS_RAW, SOURCES, REPORT_PARTIAL)}
        self.last_commit = time.monotonic()

    def add(self, source: str, label: int, arr: np.ndarray, moments) -> None:
        self.files[IMAGES].write(memoryview(arr).cast("B"))
        self.files[LABELS_RAW].write(np.int64(label).tobytes())
        self.files[SOURCES].write(json_bytes(source) + b"\n")
        self.acc.image_sum += arr
        self.acc.count += 1
        self.acc.add_pixels(arr.size // 3, *moments)
        self.state["records"] += 1

    def skip(self, source: str, reason: str) -> None:
        self.files[REPORT_PARTIAL].write(_report_line(source, reason))
        self.state["skipped"] += 1

    def commit(self) -> None:
        for name, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            self.state[name] = f.tell()
        seq = self.state["seq"] + 1
        accum = f"accum-{seq}.npz"
        with open(self.out / accum, "wb") as f:
            np.savez(f, **self.acc.state())
            f.flush()
            os.fsync(f.fileno())
        old = self.state.get("accum")
        self.state.update(seq=seq, accum=accum)
        atomic_write_json(self.out / PROGRESS, {**self.meta, "state": self.state})
        if old and old != accum:
            (self.out / old).unlink(missing_ok=True)
        self.last_commit = time.monotonic()

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def _params(src, listing, split: str, size: int, max_pixels: int) -> dict:
    return {"format": FORMAT, "version": VERSION, "split": split, "image_size": size,
            "source": os.path.realpath(src.path), "source_kind": src.kind,
            "labels_file": os.path.realpath(listing.labels_file) if listing and listing.labels_file else None,
            "max_pixels": max_pixels}


def prepare(src: str | os.PathLike | None, out: str | os.PathLike, split: str = "train",
            workers: int | None = None, size: int = 256, labels: str | os.PathLike | None = None,
            max_pixels: int = MAX_PIXELS, progress: bool = True, commit_every: int = 512,
            _stop_after: int | None = None) -> PrepareResult:
    """Decode, rescale and centre-crop every image of `src` (any `open_dataset` source but
    a store) into a store at `out`, computing the statistics on the way.

    Uses `workers` processes (default: all cores); shows progress on stderr. Files that do
    not decode are skipped and listed in skipped.tsv. If `out` holds an unfinished prepare
    of the same source, split and size, it is continued; a complete store is left as it
    is. `_stop_after` (tests) stops after about that many files, as an interruption
    would."""
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise DataSourceError(f"size must be from 1 to {MAX_IMAGE_SIZE}, not {size}")
    workers = max(1, workers or os.cpu_count() or 1)
    out = Path(out).expanduser()
    source = resolve_source(src, split, labels)
    if source.kind == "store":
        raise DataSourceError(f"{source.path} is already a prepared store")
    if out.exists() and os.path.realpath(out) == os.path.realpath(source.path):
        raise DataSourceError("the store folder must not be the source folder")
    if source.listing is not None and within(out, source.path):
        raise DataSourceError(f"the store folder {out} must not be inside the source folder {source.path} "
                              f"(its files would be listed as images of the source)")
    listing = source.listing
    if listing is not None:
        root = listing.root
        names, item_labels = listing.paths, listing.labels
        classes, class_names = listing.classes, listing.class_names
        pre_skipped, ignored = listing.skipped, listing.ignored
        idx_ds = None
    else:
        if split == "val":  # (open_idx reads "val" as the t10k files: a test set passed off as validation)
            raise DataSourceError(f"IDX data ({source.path}) has the splits train and test, not val: training "
                                  f"validates on images held out of train; prepare --split test for its test set")
        idx_ds = open_idx(source.path, split, image_size=size)
        root = idx_ds.root
        names, item_labels = idx_ds.sources, idx_ds.labels
        classes, class_names = idx_ds.classes, idx_ds.class_names
        pre_skipped, ignored = [], 0
    meta = _params(source, listing, split, size, max_pixels)
    meta.update(classes=classes, class_names=class_names, source_root=os.path.realpath(root),
                # a val/ or test/ split's classes that train/ lacks: their images are in the
                # report, and the store is refused for use as the split it was made from
                extra_classes=list(listing.extra_classes) if listing else [],
                extra_images=int(listing.extra_images) if listing else 0)

    if out.exists() and not out.is_dir():
        raise DataSourceError(f"{out} exists and is not a folder")
    if (out / INDEX).is_file():
        index = _read_json(out / INDEX)
        _check_same(out, index, meta)
    elif out.exists() and not (out / PROGRESS).is_file() and not all(map(_stray, out.iterdir())):
        raise DataSourceError(f"{out} exists and is not an empty folder or a store")
    make_dir(out)
    try:
        with _store_lock(out):
            try:
                return _prepare_locked(out, meta, names, item_labels, pre_skipped, ignored, idx_ds, root,
                                       size, max_pixels, workers, progress, commit_every, _stop_after)
            except OSError as e:  # a full disk, most often: the records already committed stay
                raise WriteError(e.errno, f"{e.strerror or e}{_named(e, out)}; {KEPT}", str(out)) from None
    except _NoLock:
        if (out / INDEX).is_file():  # complete, on a read-only disk say: nothing to write, nor to tidy
            return _complete(out, root, names, pre_skipped, tidy=False)
        raise


@contextlib.contextmanager
def _store_lock(out: Path):
    """An exclusive lock on `out` for one prepare at a time (where fcntl exists)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    try:
        f = open(out / LOCK, "a")
    except OSError as e:
        raise _NoLock.of(e, out / LOCK) from None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataSourceError(f"another alexnet prepare is writing {out}") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _prepare_locked(out: Path, meta: dict, names: list[str], item_labels: np.ndarray,
                    pre_skipped: list[tuple[str, str]], ignored: int, idx_ds, root: str,
                    size: int, max_pixels: int, workers: int, progress: bool, commit_every: int,
                    _stop_after: int | None) -> PrepareResult:
    # the output folder: new, complete, or an unfinished prepare to continue
    if (out / INDEX).is_file():
        _check_same(out, _read_json(out / INDEX), meta)
        return _complete(out, root, names, pre_skipped, tidy=True)
    if (out / PROGRESS).is_file():
        saved = _read_json(out / PROGRESS)
        _check_same(out, saved, meta)
        state = saved.get("state")
        keys = ("records", "skipped", "seq", IMAGES, LABELS_RAW, SOURCES, REPORT_PARTIAL)
        if not isinstance(state, dict) or not all(isinstance(state.get(k), int) for k in keys):
            raise _damaged(out, f"{PROGRESS} lacks its state")
        acc = _load_accum(out, state, size)
        _truncate(out, state)
    else:
        if not all(map(_stray, out.iterdir())):
            raise DataSourceError(f"{out} exists and is not an empty folder or a store")
        for p in out.iterdir():
            if p.name != LOCK:
                p.unlink(missing_ok=True)
        state = {"records": 0, "skipped": 0, "seq": 0, "accum": None,
                 **{k: 0 for k in (IMAGES, LABELS_RAW, SOURCES, REPORT_PARTIAL)}}
        acc = StatsAccumulator(size)
        # progress.json first: a kill before the data files exist leaves a store that the
        # next run continues (it creates missing files whose committed length is 0)
        atomic_write_json(out / PROGRESS, {**meta, "state": state})
        for k in (IMAGES, LABELS_RAW, SOURCES, REPORT_PARTIAL):
            (out / k).write_bytes(b"")

    done = _listed(out, REPORT_PARTIAL)
    todo = [i for i, n in enumerate(names) if n not in done]
    if len(done) > len(names) - len(todo):  # a resume, and files it did are gone from the source
        import warnings

        gone = len(done - set(names))
        if gone:
            it = "it" if gone == 1 else "them"
            warnings.warn(f"{plural(gone, 'file')} done before the interruption {'is' if gone == 1 else 'are'} "
                          f"no longer in {root}; the store keeps {it} (stored, or listed as skipped): prepare into "
                          f"a new folder to leave {it} out", RuntimeWarning, stacklevel=3)
    total = len(names)
    writer = _Writer(out, meta, state, acc)
    bar = Progress(total, "prepare", every_s=10.0, enabled=progress, done=total - len(todo))
    processed = 0
    stopped = False
    try:
        if idx_ds is not None:
            results = _idx_results(idx_ds.images, todo, size)
        else:
            # (in NumPy arrays, not a list of str: forked workers that read a list's names copy
            # the pages that hold them, 47 MB each for 400,000 names, 2.7 MB from these)
            results = _folder_results(Names(os.path.join(root, names[i]) for i in todo), size,
                                      max_pixels, workers)
        since_commit = 0
        try:
            for (arr, extra), i in zip(results, todo):  # (results first: its end stops the workers in order)
                if arr is None:
                    writer.skip(names[i], extra)
                else:
                    writer.add(names[i], int(item_labels[i]), arr, extra)
                processed += 1
                since_commit += 1
                if since_commit >= commit_every or time.monotonic() - writer.last_commit > 30:
                    writer.commit()
                    since_commit = 0
                bar.update(1, skipped=state["skipped"] + len(pre_skipped))
                if _stop_after is not None and processed >= _stop_after:
                    stopped = True
                    break
        finally:
            if hasattr(results, "close"):
                results.close()  # stops the pool
        writer.commit()
    except KeyboardInterrupt:
        # Nothing is committed here (the cut may have come in the middle of a record):
        # what the last commit (at most 30 s ago) recorded is kept, the rest is redone.
        writer.close()
        if progress:
            saved = json.loads((out / PROGRESS).read_text(encoding="utf-8"))["state"]
            sys.stderr.write(f"\nprepare: interrupted; {saved['records']} images kept in {out}; "
                             f"run the same command again to finish\n")
        raise
    writer.close()
    if stopped:
        return PrepareResult(str(out), state["records"], state["skipped"] + len(pre_skipped),
                             ignored, str(out / REPORT_PARTIAL), False)
    bar.close(skipped=state["skipped"] + len(pre_skipped))
    return _finalize(out, meta, state, acc, pre_skipped, ignored)


def _complete(out: Path, root: str, names, pre_skipped: list, tidy: bool) -> PrepareResult:
    """The result of a prepare into the complete store `out`: nothing written; with `tidy`,
    the leftovers of its making removed."""
    store = StoreDataset(out)  # the checks opening it to train makes: a damaged store is not called complete
    store.stats()
    if not (out / REPORT).is_file():
        raise _damaged(out, f"{REPORT} is missing")
    try:
        skipped = int(store.index["skipped"])
    except (KeyError, TypeError, ValueError) as e:
        raise _damaged(out, f"{INDEX}: {type(e).__name__} {e}") from None
    if tidy:
        _cleanup(out)
    _warn_if_changed(out, root, set(names) | {p for p, _ in pre_skipped}, store.sources)
    return PrepareResult(str(out), store.count, skipped, store.ignored, str(out / REPORT), True, already=True)


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DataSourceError(f"{path} is damaged ({e}); delete {path.parent} and prepare again") from None
    if not isinstance(doc, dict):
        raise DataSourceError(f"{path} is damaged (not a JSON object); delete {path.parent} and prepare again")
    return doc


def _check_same(out: Path, saved: dict, meta: dict) -> None:
    if saved.get("format") != FORMAT:
        raise DataSourceError(f"{out} is not an alexnet store")
    if saved.get("version") != VERSION:
        raise DataSourceError(f"{out} is a store of version {saved.get('version')}; this is {VERSION}")
    saved = dict(saved)
    if saved.get("labels_file"):  # (kept as given by stores before it was kept as a real path)
        saved["labels_file"] = os.path.realpath(saved["labels_file"])
    for key in ("source", "split", "image_size", "classes", "labels_file", "max_pixels"):
        if saved.get(key) != meta[key]:
            what = {"classes": "class list", "labels_file": "labels file", "max_pixels": "--max-pixels"}.get(key, key)
            raise DataSourceError(f"{out} holds a prepare with another {what}; delete it or "
                                  f"choose another folder")


def _warn_if_changed(out: Path, root: str, now: set[str], stored: list[str]) -> None:
    """Warn when the files of the source (`now`: stored or skipped) are no longer those that
    the complete store at `out` was prepared from (files added or removed since; `stored`:
    its sources, as read)."""
    then = _listed(out, REPORT, stored)
    new, gone = len(now - then), len(then - now)
    if new or gone:
        import warnings

        warnings.warn(f"{root} has changed since {out} was prepared ({plural(new, 'file')} not in the store, "
                      f"{gone} of its files gone); prepare into a new folder to include the changes",
                      RuntimeWarning, stacklevel=3)


def _load_accum(out: Path, state: dict, size: int) -> StatsAccumulator:
    if not state.get("accum"):
        return StatsAccumulator(size)
    try:
        with np.load(out / state["accum"], allow_pickle=False) as z:
            return StatsAccumulator.from_state(z)
    except FileNotFoundError:
        raise _damaged(out, f"{state['accum']} is missing") from None
    except Exception as e:  # (a cut or garbled zip: BadZipFile, EOFError, ValueError, KeyError)
        raise _damaged(out, f"{state['accum']}: {type(e).__name__}: {e}") from None


def _truncate(out: Path, state: dict) -> None:
    """Cut every append-only file back to its committed length; drop stale temporaries."""
    for name in (IMAGES, LABELS_RAW, SOURCES, REPORT_PARTIAL):
        path = out / name
        if not path.exists():
            if state[name]:
                raise _damaged(out, f"{name} is missing")
            path.write_bytes(b"")
        elif path.stat().st_size < state[name]:
            raise _damaged(out, f"{name} is shorter than committed")
        else:
            os.truncate(path, state[name])
    for p in out.glob("accum-*.npz"):
        if p.name != state.get("accum"):
            p.unlink(missing_ok=True)
    for p in [*out.glob("*.tmp"), *out.glob(".*.tmp")]:
        p.unlink(missing_ok=True)


def _listed(out: Path, report: str, stored: list[str] | None = None) -> set[str]:
    """The source files of the store at `out`: those stored (sources.jsonl, unless given
    as read in `stored`) and those its report `report` (skipped.tsv, or the unfinished
    prepare's) lists as skipped."""
    if stored is not None:
        done = set(stored)
    else:
        with open(out / SOURCES, "rb") as f:
            try:
                done = {json.loads(line) for line in f}
            except ValueError as e:
                raise _damaged(out, f"{SOURCES}: {e}") from None
    with open(out / report, "rb") as f:
        return done | {_report_name(line.decode("utf-8", "surrogateescape").split("\t", 1)[0]) for line in f}


def _cleanup(out: Path) -> None:
    for name in (PROGRESS, LABELS_RAW, REPORT_PARTIAL, LOCK):
        (out / name).unlink(missing_ok=True)
    for p in out.glob("accum-*.npz"):
        p.unlink(missing_ok=True)
    for p in [*out.glob("*.tmp"), *out.glob(".*.tmp")]:
        p.unlink(missing_ok=True)


def _finalize(out: Path, meta: dict, state: dict, acc: StatsAccumulator,
              pre_skipped: list[tuple[str, str]], ignored: int) -> PrepareResult:

    n, size = state["records"], meta["image_size"]
    report = out / REPORT
    lines = b"".join(_report_line(path, reason) for path, reason in pre_skipped)
    atomic_write(report, lambda f: f.write(lines + (out / REPORT_PARTIAL).read_bytes()))
    skipped = state["skipped"] + len(pre_skipped)
    if n == 0:
        raise DataSourceError(f"no image of {meta['source']} could be decoded "
                              f"({skipped} skipped, see {report})")
    labels = np.fromfile(out / LABELS_RAW, dtype=np.int64)
    assert len(labels) == n and (out / IMAGES).stat().st_size == n * 3 * size * size
    np.save(out / (LABELS + ".tmp.npy"), labels)
    os.replace(out / (LABELS + ".tmp.npy"), out / LABELS)
    stats = acc.result()
    save_stats(stats, out / STATS, metadata={"of": f"the {n} images of this {meta['split']} store"})
    index = {k: v for k, v in meta.items()}
    index.update(complete=True, count=n, shape=[n, 3, size, size], dtype="uint8",
                 skipped=skipped, ignored=ignored, images=IMAGES, labels=LABELS,
                 sources=SOURCES, stats=STATS, report=REPORT,
                 created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    atomic_write_json(out / INDEX, index)
    _cleanup(out)
    return PrepareResult(str(out), n, skipped, ignored, str(report), True)


# ---------------------------------------------------------------------------- reading

class StoreDataset(ImageDataset):
    """A prepared store, read by memory mapping: `read` copies the requested records
    (in file order, which helps when the file is not in the page cache) into one uint8
    batch. If `image_size` differs from the stored size, batches are resized on read."""

    def __init__(self, path: str | os.PathLike, image_size: int | None = None):
        self.path = Path(path)
        index_file = self.path / INDEX
        if not index_file.is_file():
            if (self.path / PROGRESS).is_file():
                raise DataSourceError(f"{self.path} is an unfinished store; run alexnet prepare "
                                      f"again to finish it")
            raise SourceNotFoundError(f"no store at {self.path} (no {INDEX})")
        try:
            self.index = json.loads(index_file.read_text(encoding="utf-8"))
        except ValueError as e:
            raise DataSourceError(f"{index_file} is not valid JSON: {e}") from None
        if not isinstance(self.index, dict) or self.index.get("format") != FORMAT or \
                self.index.get("version") != VERSION:
            raise DataSourceError(f"{self.path} is not an alexnet store of version {VERSION}")
        try:
            self.stored_size = int(self.index["image_size"])
            self.count = int(self.index["count"])
            self.classes = [str(c) for c in self.index["classes"]]
            self.class_names = [str(c) for c in self.index["class_names"]]
            self.ignored = int(self.index.get("ignored", 0))
            files = {k: str(self.index[k]) for k in ("images", "labels", "sources", "stats", "report")}
        except (KeyError, TypeError, ValueError) as e:
            raise _damaged(self.path, f"{INDEX}: {type(e).__name__} {e}") from None
        self.image_size = int(image_size or self.stored_size)
        self.root = self.index.get("source_root", self.index.get("source"))
        try:
            self.labels = np.load(self.path / files["labels"], allow_pickle=False)
        except Exception as e:  # (missing, cut short, not an array)
            raise _damaged(self.path, f"{files['labels']}: {getattr(e, 'strerror', None) or e}") from None
        if self.labels.ndim != 1 or self.labels.dtype.kind not in "iu":
            raise _damaged(self.path, f"{files['labels']} holds {self.labels.dtype} {self.labels.shape}, "
                                      f"not one integer label per record")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise _damaged(self.path, f"labels {self.labels.min()} to {self.labels.max()} for "
                                      f"{len(self.classes)} classes")
        self.labels = self.labels.astype(np.int64, copy=False)
        try:
            actual = (self.path / files["images"]).stat().st_size
        except OSError as e:
            raise _damaged(self.path, f"{files['images']}: {e.strerror}") from None
        expect = self.count * 3 * self.stored_size ** 2
        if len(self.labels) != self.count or actual != expect:
            raise _damaged(self.path, f"{actual} image bytes and {len(self.labels)} labels for {self.count} records")
        self._mm: np.memmap | None = None
        self._sources: list[str] | None = None
        self._stats: DataStats | None = None

    @property
    def images(self) -> np.memmap:
        if self._mm is None:
            s = self.stored_size
            self._mm = np.memmap(self.path / self.index["images"], np.uint8, "r",
                                 shape=(self.count, 3, s, s))
        return self._mm

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_mm"] = None  # reopened in the new process, never pickled as an array
        state["_sources"] = None
        return state

    def _read(self, idx: np.ndarray) -> torch.Tensor:
        mm = self.images
        s = self.stored_size
        if len(idx) and (idx.min() < -self.count or idx.max() >= self.count):
            raise IndexError(f"index out of range for {self.count} images")
        idx = idx % max(self.count, 1)
        out = np.empty((len(idx), 3, s, s), np.uint8)
        for k in np.argsort(idx, kind="stable"):
            out[k] = mm[idx[k]]
        batch = torch.from_numpy(out)
        return batch if self.image_size == s else resize_batch(batch, self.image_size)

    @property
    def sources(self) -> list[str]:
        if self._sources is None:
            try:
                with open(self.path / self.index["sources"], "rb") as f:
                    self._sources = [json.loads(line) for line in f]
            except (OSError, ValueError) as e:
                raise _damaged(self.path, f"{self.index['sources']}: {getattr(e, 'strerror', None) or e}") from None
            if len(self._sources) != self.count:
                raise _damaged(self.path, f"{self.index['sources']} names {len(self._sources)} files for "
                                          f"{self.count} records")
        return self._sources

    def stats(self, held_out: np.ndarray | None = None) -> DataStats:
        """This store's own statistics, as prepared (at the stored size); with `held_out`
        (sorted record indices), those of the other records: the held-out images are read
        and taken away from the prepared sums (`sources.stats_without`)."""
        if self._stats is None:
            try:
                self._stats = load_stats(self.path / self.index["stats"])
            except Exception as e:  # (missing, cut short: safetensors' own error, or a tensor lacking)
                raise _damaged(self.path, f"{self.index['stats']}: {getattr(e, 'strerror', None) or e}") from None
        if held_out is None or not len(held_out):
            return self._stats
        from alexnet.sources import stats_without

        held = np.asarray(held_out, np.int64)
        return stats_without(self._stats, self.count,
                             (np.asarray(self.images[held[i:i + 64]]) for i in range(0, len(held), 64)))

    def use_classes(self, classes: list[str]) -> None:
        """Relabel the records for the class list `classes` (a training split's), which
        must contain every class that a record of this store has (a flat validation
        folder's store lists all 1000 ImageNet classes, of which a training set may have a
        few)."""
        index = {c: i for i, c in enumerate(classes)}
        missing = [self.classes[i] for i in np.unique(self.labels) if self.classes[i] not in index]
        if missing:
            raise DataSourceError(f"{self.path} has classes that are not among the {len(classes)} "
                                  f"given ones: {first_few(missing, 5)}")
        from alexnet.sources import readable_names

        names = dict(zip(self.classes, self.class_names))
        self.labels = np.array([index.get(c, -1) for c in self.classes], np.int64)[self.labels]
        self.class_names = [names.get(c) or n for c, n in zip(classes, readable_names(classes))]
        self.classes = list(classes)

    def skipped(self) -> list[tuple[str, str]]:
        """(source file, reason) of every file left out when preparing."""
        out = []
        with open(self.path / self.index["report"], encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            for line in f:
                path, _, reason = line.rstrip("\n").partition("\t")
                out.append((_report_name(path), reason))
        return out


def open_store(path: str | os.PathLike, image_size: int | None = None) -> StoreDataset:
    """The store at `path` (a folder `alexnet prepare` wrote)."""
    if not Path(path).exists():
        raise SourceNotFoundError(f"store not found: {path}")
    return StoreDataset(path, image_size)
