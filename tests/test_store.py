"""The prepared store (alexnet.store): a prepare run over a messy folder, the pixels
against an independent PIL rescale + crop, the statistics against numpy, resuming an
interrupted prepare, the flat validation layout and IDX sources."""

from __future__ import annotations

import io
import itertools
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.dataset import resize_batch
from alexnet.sources import ClassMismatchError, DataSourceError, dataset_stats, imagenet_wnids, open_dataset
from alexnet.store import StoreDataset, open_store, prepare

S = 64  # stored side in these tests (the code path is the same as for 256)


def rgb_array(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x * y) % 256], -1)
    return np.clip(base + rng.integers(-25, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def expected_crop(rgb: np.ndarray, size: int = S) -> np.ndarray:
    """Shorter side to `size` with PIL's bilinear filter, then the central crop."""
    h, w = rgb.shape[:2]
    if w <= h:
        nw, nh = size, int(round(h * size / w))
    else:
        nw, nh = int(round(w * size / h)), size
    img = Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))


def make_messy_tree(root: Path) -> tuple[dict, dict]:
    """root/train/<class>/... with good images in many formats and modes, broken files
    and junk. Returns ({relative path: (label, expected RGB array)}, {broken path: reason word})."""
    classes = ["cats", "n01440764", "n01443537"]
    good: dict[str, tuple[int, np.ndarray]] = {}
    train = root / "train"
    for c in classes:
        (train / c).mkdir(parents=True)

    def add(rel: str, label: int, save, rgb=None):
        path = train / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        save(path)
        if rgb is None:  # lossy formats: the reference is PIL's own decode of the file
            rgb = np.asarray(Image.open(path).convert("RGB"))
        good[rel] = (label, rgb)

    a = rgb_array(70, 90, 1)
    add("cats/rgb.jpg", 0, lambda p: Image.fromarray(a).save(p, quality=90))
    b = rgb_array(100, 64, 2)
    add("cats/portrait.png", 0, lambda p: Image.fromarray(b).save(p), b)
    g = rgb_array(50, 80, 3)[..., 0]
    add("cats/sub/grey.png", 0, lambda p: Image.fromarray(g, "L").save(p), np.dstack([g] * 3))
    c = rgb_array(66, 66, 4)
    add("n01440764/cmyk.tif", 1, lambda p: Image.fromarray(c).convert("CMYK").save(p), c)
    pal = Image.fromarray(rgb_array(64, 96, 5)).convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    add("n01440764/palette.gif", 1, lambda p: pal.save(p), np.asarray(pal.convert("RGB")))
    d = rgb_array(72, 72, 6)
    alpha = np.full(d.shape[:2], 255, np.uint8)
    alpha[:20] = 0
    d_on_white = d.copy()
    d_on_white[:20] = 255
    add("n01440764/alpha.png", 1, lambda p: Image.fromarray(np.dstack([d, alpha]), "RGBA").save(p), d_on_white)
    v = (rgb_array(80, 70, 7)[..., 1].astype(np.uint16) * 257 + 100)
    v8 = np.round(v / 257).astype(np.uint8)
    add("n01443537/deep.png", 2, lambda p: Image.fromarray(v).save(p), np.dstack([v8] * 3))
    e = rgb_array(60, 100, 8)

    def save_rotated(p):
        img = Image.fromarray(e)
        exif = img.getexif()
        exif[0x0112] = 8  # "rotate 90 counter-clockwise to view"
        img.save(p, exif=exif.tobytes(), quality=92)
    save_rotated(train / "n01443537" / "rotated.JPEG")
    good["n01443537/rotated.JPEG"] = (2, np.rot90(np.asarray(Image.open(train / "n01443537" / "rotated.JPEG")
                                                             .convert("RGB")), k=1))

    jpg = io.BytesIO()
    Image.fromarray(rgb_array(80, 80, 9)).save(jpg, "JPEG")
    broken = {
        "cats/empty.jpg": "empty",
        "n01440764/truncated.JPEG": "truncated",
        "n01443537/text.jpg": "not an image",
        "n01443537/bomb.png": "too large",
    }
    (train / "cats/empty.jpg").write_bytes(b"")
    (train / "n01440764/truncated.JPEG").write_bytes(jpg.getvalue()[:600])
    (train / "n01443537/text.jpg").write_text("not really a JPEG\n")
    (train / "n01443537/bomb.png").write_bytes(bomb_png())
    # junk that is ignored, not reported
    (train / ".DS_Store").write_bytes(b"\0")
    (train / "cats" / "._rgb.jpg").write_bytes(b"\0\5")
    (train / "cats" / "README.txt").write_text("my cats")
    return good, broken


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    good, broken = make_messy_tree(root / "src")
    result = prepare(root / "src", root / "store", workers=2, size=S, max_pixels=10_000_000,
                     progress=False)
    return root, good, broken, result


def test_prepare_report_lists_exactly_the_broken_files(messy):
    root, good, broken, result = messy
    assert result.complete and result.written == len(good) and result.skipped == len(broken)
    assert result.ignored == 3
    lines = (root / "store" / "skipped.tsv").read_text().splitlines()
    report = dict(line.split("\t") for line in lines)
    assert set(report) == set(broken)
    for path, word in broken.items():
        assert word in report[path], (path, report[path])
    assert f"{len(good)} images written, {len(broken)} skipped" in result.summary()
    leftovers = {p.name for p in (root / "store").iterdir()}
    assert leftovers == {"index.json", "images.u8", "labels.npy", "sources.jsonl",
                         "stats.safetensors", "skipped.tsv"}


def test_prepare_every_good_file_stored_with_label_and_pixels(messy):
    root, good, _, _ = messy
    ds = open_dataset(root / "store", image_size=None)
    assert isinstance(ds, StoreDataset) and len(ds) == len(good) and ds.image_size == S
    assert ds.classes == ["cats", "n01440764", "n01443537"]
    assert ds.class_names == ["cats", "tench", "goldfish"]
    assert sorted(ds.sources) == sorted(good)
    x, y = ds.read(np.arange(len(ds)))
    for i, src in enumerate(ds.sources):
        label, rgb = good[src]
        assert y[i].item() == label, src
        assert np.array_equal(x[i].numpy(), expected_crop(rgb)), src
    index = json.loads((root / "store" / "index.json").read_text())
    assert index["count"] == len(good) and index["shape"] == [len(good), 3, S, S]
    assert index["image_size"] == S and index["complete"] and index["version"] == 1
    assert ds.skipped()[0][0] in {"cats/empty.jpg"}


def test_store_read_batches(messy):
    root, good, _, _ = messy
    ds = open_store(root / "store")
    idx = np.array([5, 0, 5, 3])  # unsorted, repeated
    x, y = ds.read(idx)
    all_x, all_y = ds.read(np.arange(len(ds)))
    assert torch.equal(x, all_x[idx]) and torch.equal(y, all_y[idx])
    assert x.dtype == torch.uint8 and y.dtype == torch.int64
    small = open_store(root / "store", image_size=32)
    assert small.read([1])[0].shape == (1, 3, 32, 32)
    assert dataset_stats(small).mean_image.shape == (3, 32, 32)
    import pickle
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned loader worker gets
    assert clone._mm is None and torch.equal(clone.read([2])[0], all_x[[2]])


def test_prepare_stats_match_numpy(messy):
    root, _, _, _ = messy
    ds = open_store(root / "store")
    images = ds.read(np.arange(len(ds)))[0].numpy()
    s = dataset_stats(ds)
    mean = images.astype(np.float64).mean(0)
    assert np.allclose(s.mean_image.numpy(), mean, atol=1e-3)
    pixels = images.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    val, vec = np.linalg.eigh(np.cov(pixels, bias=True))
    assert np.allclose(s.eigval.numpy(), val[::-1], rtol=1e-4)
    for i in range(3):
        assert abs(abs(s.eigvec[:, i].numpy() @ vec[:, 2 - i]) - 1) < 1e-3


def test_store_stats_leave_the_held_out_records_out(messy):
    from tests.test_sources import assert_stats_match

    root, _, _, _ = messy
    ds = open_store(root / "store")
    images = ds.read(np.arange(len(ds)))[0].numpy()
    held = np.array([0, len(ds) - 1])
    assert_stats_match(dataset_stats(ds, held_out=held), np.delete(images, held, axis=0))
    small = open_store(root / "store", image_size=32)  # taken away at the stored size, then resized
    assert dataset_stats(small, held_out=held).mean_image.shape == (3, 32, 32)


def test_prepare_again_on_a_complete_store_is_a_no_op(messy):
    root, good, broken, _ = messy
    before = (root / "store" / "images.u8").stat().st_mtime_ns
    again = prepare(root / "src", root / "store", workers=1, size=S, max_pixels=10_000_000, progress=False)
    assert again.complete and again.already and again.written == len(good) and again.skipped == len(broken)
    assert again.summary().startswith(f"{root / 'store'} is a complete store already, nothing written: ")
    assert (root / "store" / "images.u8").stat().st_mtime_ns == before
    with pytest.raises(DataSourceError, match="another image_size"):
        prepare(root / "src", root / "store", size=S + 1, progress=False)


def test_prepare_again_after_the_source_changed_says_so(tmp_path):
    """The complete store is kept as it is (it may be in use), with a warning that the
    source has files it lacks and lacks files it has."""
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 30), (60 * i, 90, 20)).save(tmp_path / "src" / c / f"{i}.png")
    (tmp_path / "src" / "a" / "bad.png").write_bytes(b"")  # skipped: listed in the report, not a change
    first = prepare(tmp_path / "src", tmp_path / "store", workers=1, size=16, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing changed: no warning
        prepare(tmp_path / "src", tmp_path / "store", workers=1, size=16, progress=False)
    (tmp_path / "src" / "b" / "1.png").unlink()
    for name in ("2.png", "3.png"):
        Image.new("RGB", (40, 30)).save(tmp_path / "src" / "a" / name)
    with pytest.warns(RuntimeWarning, match=r"has changed since .*store was prepared \(2 files not in the store, "
                                            r"1 of its files gone\); prepare into a new folder"):
        again = prepare(tmp_path / "src", tmp_path / "store", workers=1, size=16, progress=False)
    assert again.already and again.written == first.written == 4 and len(open_store(tmp_path / "store")) == 4


def test_store_splits_and_class_lists(messy, tmp_path):
    root, good, _, _ = messy
    # a train store is never handed out as a validation or test split
    with pytest.raises(DataSourceError, match="store of the 'train' split, not 'val'"):
        open_dataset(root / "store", split="val")
    ds = open_dataset(root / "store", image_size=None)
    # relabelled for a larger class list in another order
    wider = ["n01443537", "zebra", "cats", "n01440764"]
    re = open_dataset(root / "store", image_size=None, classes=wider)
    assert re.classes == wider and re.class_names == ["goldfish", "zebra", "cats", "tench"]
    assert [wider[i] for i in re.labels] == [ds.classes[i] for i in ds.labels]
    with pytest.raises(DataSourceError, match="not among the 2 given"):
        open_dataset(root / "store", classes=["cats", "zebra"])


# ---------------------------------------------------------------------------- resume

def make_plain_tree(root: Path, n_per_class: int = 9) -> None:
    for c in range(3):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rgb_array(30 + i, 40 + c, c * 100 + i)).save(root / f"class{c}" / f"{i:02d}.png")
    (root / "class1" / "03_bad.png").write_bytes(b"\x89PNG broken")
    (root / "class2" / "zz_empty.png").write_bytes(b"")


def store_contents(path: Path) -> dict:
    index = json.loads((path / "index.json").read_text())
    index.pop("created")
    return {name: (path / name).read_bytes()
            for name in ("images.u8", "labels.npy", "sources.jsonl", "stats.safetensors", "skipped.tsv")
            } | {"index": index}


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_prepare_resumes_to_the_same_store(tmp_path, workers):
    make_plain_tree(tmp_path / "src")
    full = prepare(tmp_path / "src", tmp_path / "full", workers=workers, size=32, progress=False)
    assert full.written == 27 and full.skipped == 2

    part = prepare(tmp_path / "src", tmp_path / "part", workers=workers, size=32, progress=False,
                   commit_every=4, _stop_after=13)
    assert not part.complete and 0 < part.written < 27
    with pytest.raises(DataSourceError, match="unfinished"):
        open_dataset(tmp_path / "part")
    # a crash in the middle of a write: bytes past the committed lengths, a stale temp file
    for name in ("images.u8", "labels.i64", "sources.jsonl", "skipped.partial.tsv"):
        with open(tmp_path / "part" / name, "ab") as f:
            f.write(b"\x07" * 1001)
    (tmp_path / "part" / "progress.json.tmp").write_text("{half")
    (tmp_path / "part" / "accum-999.npz").write_bytes(b"junk")

    second = prepare(tmp_path / "src", tmp_path / "part", workers=workers, size=32, progress=False,
                     commit_every=4, _stop_after=5)
    assert not second.complete and second.written > part.written
    done = prepare(tmp_path / "src", tmp_path / "part", workers=workers, size=32, progress=False)
    assert done.complete and (done.written, done.skipped) == (27, 2)
    a, b = store_contents(tmp_path / "full"), store_contents(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k  # byte for byte, statistics included


def test_stopping_with_a_full_pool_does_not_hang(tmp_path, monkeypatch):
    """Stopping (or Ctrl-C) while the pool's task feeder waits for room must end the pool."""
    import threading

    import alexnet.store as store

    monkeypatch.setattr(store, "_AHEAD_PER_WORKER", 1)
    make_plain_tree(tmp_path / "src")
    result = {}
    t = threading.Thread(target=lambda: result.update(r=prepare(
        tmp_path / "src", tmp_path / "out", workers=2, size=32, progress=False, commit_every=2,
        _stop_after=6)), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "prepare hung while stopping its pool"
    assert not result["r"].complete and result["r"].written >= 4


def _prepare_in_a_thread(src: Path, out: Path) -> Exception | None:
    """prepare(src, out) with 2 workers in a thread, which must end within a minute (not
    hang); the exception it raised, or None."""
    import threading

    result = {}

    def run():
        try:
            prepare(src, out, workers=2, size=32, progress=False, commit_every=2)
        except Exception as e:
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "prepare hung after a worker died"
    return result.get("error")


def test_a_decoding_process_that_dies_stops_prepare_and_it_resumes(tmp_path, monkeypatch):
    """Killed (by the OOM killer, say) while decoding: a one-line error at once, not a
    wait for a result that never comes; the next run finishes the same store."""
    import os
    import signal
    import threading

    import alexnet.store as store

    make_plain_tree(tmp_path / "src")
    full = prepare(tmp_path / "src", tmp_path / "full", workers=1, size=32, progress=False)
    decode = store.decode_file

    def dies_on_one_file(path, size, max_pixels):
        if path.endswith(os.path.join("class1", "05.png")):
            os.kill(os.getpid(), signal.SIGKILL)  # (in the worker: the fork carries the patch)
        return decode(path, size, max_pixels)

    monkeypatch.setattr(store, "decode_file", dies_on_one_file)
    error = _prepare_in_a_thread(tmp_path / "src", tmp_path / "out")
    assert isinstance(error, store.PrepareError) and "run the same command again" in str(error)
    monkeypatch.setattr(store, "decode_file", decode)
    done = prepare(tmp_path / "src", tmp_path / "out", workers=2, size=32, progress=False)
    assert done.complete and store_contents(tmp_path / "out") == store_contents(tmp_path / "full")
    assert full.written == done.written


def test_a_decoding_process_killed_half_way_through_a_result_stops_prepare(tmp_path, monkeypatch):
    """A result is several times what a pipe holds, so a kill can cut one in half: the
    reader then sees the end of that worker's own pipe and stops with one line (a process
    pool's shared pipe, kept open by the other workers, waited for the rest for ever).
    The next run finishes the same store."""
    import multiprocessing as mp
    import os
    import pickle
    import signal
    import threading

    import alexnet.store as store

    make_plain_tree(tmp_path / "src")
    full = prepare(tmp_path / "src", tmp_path / "full", workers=1, size=32, progress=False)
    real = store._decode_worker

    def dies_mid_result(paths, size, max_pixels, tasks, results, inherited):
        store._worker_init()
        for c in inherited:
            c.close()
        for n in itertools.count():
            task = tasks.recv()
            if task is None:
                return
            data = pickle.dumps([store._decode_task(p, size, max_pixels) for p in paths[slice(*task)]])
            if n == 1 and mp.current_process().name.endswith("-1"):  # the last worker's second result:
                # the length, half of it, and the end
                os.write(results.fileno(), struct.pack("!i", len(data)) + data[:len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            results.send_bytes(data)

    monkeypatch.setattr(store, "_decode_worker", dies_mid_result)
    error = _prepare_in_a_thread(tmp_path / "src", tmp_path / "out")
    assert isinstance(error, store.PrepareError) and "was killed by signal 9" in str(error), error
    monkeypatch.setattr(store, "_decode_worker", real)
    done = prepare(tmp_path / "src", tmp_path / "out", workers=2, size=32, progress=False)
    assert done.complete and store_contents(tmp_path / "out") == store_contents(tmp_path / "full")


def test_one_prepare_at_a_time(tmp_path):
    from alexnet.store import _store_lock

    make_plain_tree(tmp_path / "src")
    (tmp_path / "out").mkdir()
    with _store_lock(tmp_path / "out"):
        with pytest.raises(DataSourceError, match="another alexnet prepare is writing"):
            prepare(tmp_path / "src", tmp_path / "out", workers=1, size=32, progress=False)


def test_resume_refuses_a_different_source(tmp_path):
    make_plain_tree(tmp_path / "src")
    make_plain_tree(tmp_path / "other")
    prepare(tmp_path / "src", tmp_path / "part", workers=1, size=32, progress=False, _stop_after=3)
    with pytest.raises(DataSourceError, match="another source"):
        prepare(tmp_path / "other", tmp_path / "part", workers=1, size=32, progress=False)
    (tmp_path / "notempty").mkdir()
    (tmp_path / "notempty" / "x").write_text("mine")
    with pytest.raises(DataSourceError, match="not an empty folder"):
        prepare(tmp_path / "src", tmp_path / "notempty", size=32, progress=False)


def test_resume_refuses_another_labels_file_or_pixel_limit(tmp_path):
    (tmp_path / "val").mkdir()
    for k in range(6):
        Image.fromarray(rgb_array(20, 20 + k, k)).save(tmp_path / "val" / f"{k}.png")
    (tmp_path / "A.txt").write_text("".join(f"{k}.png {'ab'[k % 2]}\n" for k in range(6)))
    (tmp_path / "B.txt").write_text("".join(f"{k}.png {'ba'[k % 2]}\n" for k in range(6)))
    prepare(tmp_path / "val", tmp_path / "s", split="val", labels=tmp_path / "A.txt", workers=1, size=16,
            progress=False, commit_every=1, _stop_after=3)
    with pytest.raises(DataSourceError, match="another labels file"):
        prepare(tmp_path / "val", tmp_path / "s", split="val", labels=tmp_path / "B.txt", workers=1, size=16,
                progress=False)
    with pytest.raises(DataSourceError, match="another --max-pixels"):
        prepare(tmp_path / "val", tmp_path / "s", split="val", labels=tmp_path / "A.txt", workers=1, size=16,
                progress=False, max_pixels=10_000)
    # the same labels file by another spelling of its path (relative, from its folder) is the same
    import os

    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        done = prepare("val", tmp_path / "s", split="val", labels="A.txt", workers=1, size=16, progress=False)
        # a store of before, which kept the path as given, is the same store too
        index = json.loads((tmp_path / "s" / "index.json").read_text())
        (tmp_path / "s" / "index.json").write_text(json.dumps({**index, "labels_file": "A.txt"}))
        assert prepare("val", tmp_path / "s", split="val", labels=tmp_path / "A.txt", workers=1, size=16,
                       progress=False).complete
    finally:
        os.chdir(here)
    assert done.complete and open_store(tmp_path / "s").labels.tolist() == [0, 1, 0, 1, 0, 1]


def test_odd_names_of_skipped_files_survive_the_report_and_a_resume(tmp_path):
    """A tab, a newline, a backslash or bytes that are not UTF-8 in a broken file's name:
    the report gives each name back exactly, and a resume does not do them again."""
    import os

    root = tmp_path / "src"
    make_plain_tree(root)  # its own two broken files, in class1 and class2
    odd = ["bad\tone.png", "bad\ntwo.png", "back\\slash.png", os.fsdecode(b"\xffbad.png")]
    for name in odd:
        (root / "class0" / name).write_bytes(b"not a png")
    part = prepare(root, tmp_path / "s", workers=1, size=16, progress=False, commit_every=1, _stop_after=20)
    assert not part.complete
    done = prepare(root, tmp_path / "s", workers=1, size=16, progress=False)
    assert done.complete and done.skipped == len(odd) + 2
    names = [p for p, _ in open_store(tmp_path / "s").skipped()]
    assert sorted(names) == sorted(["class0/" + n for n in odd] + ["class1/03_bad.png", "class2/zz_empty.png"])


@pytest.mark.parametrize("name", ["index.json", "progress.json"])
def test_a_damaged_store_file_is_one_line(tmp_path, name):
    make_plain_tree(tmp_path / "src")
    prepare(tmp_path / "src", tmp_path / "s", workers=1, size=16, progress=False, _stop_after=None if
            name == "index.json" else 3)
    (tmp_path / "s" / name).write_text('{"format": "alexnet-store", "vers')
    with pytest.raises(DataSourceError, match=f"{name} is damaged .*; delete .* and prepare again"):
        prepare(tmp_path / "src", tmp_path / "s", workers=1, size=16, progress=False)


def test_a_store_inside_its_source_folder_is_refused(tmp_path):
    make_plain_tree(tmp_path / "src")
    with pytest.raises(DataSourceError, match="must not be inside the source folder"):
        prepare(tmp_path / "src", tmp_path / "src" / "store", workers=1, size=16, progress=False)
    assert not (tmp_path / "src" / "store").exists()


def test_all_files_broken_is_an_error_with_report(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataSourceError, match="no image .* could be decoded"):
        prepare(tmp_path / "src", tmp_path / "out", workers=1, size=32, progress=False)
    assert "x.jpg\tempty file" in (tmp_path / "out" / "skipped.tsv").read_text()


# ---------------------------------------------------------------------------- val layout and IDX

def test_prepare_flat_val_with_ground_truth_and_train_classes(tmp_path):
    wnids = imagenet_wnids()
    root = tmp_path / "imagenet"
    for w in (wnids[10], wnids[20]):
        (root / "train" / w).mkdir(parents=True)
        Image.fromarray(rgb_array(40, 40, 1)).save(root / "train" / w / "t.JPEG")
    (root / "val").mkdir()
    arrays = {}
    for k in range(1, 5):
        arrays[k] = rgb_array(36 + k, 48, 10 + k)
        Image.fromarray(arrays[k]).save(root / "val" / f"ILSVRC2012_val_{k:08d}.png")
    gt = tmp_path / "gt.txt"
    gt.write_text(f"ILSVRC2012_val_00000001 {wnids[20]}\nILSVRC2012_val_00000002 {wnids[10]}\n"
                  f"ILSVRC2012_val_00000003 {wnids[500]}\nILSVRC2012_val_00000004 {wnids[20]}\n")
    r = prepare(root, tmp_path / "val_store", split="val", labels=gt, workers=1, size=S, progress=False)
    assert (r.written, r.skipped) == (3, 1)
    ds = open_store(tmp_path / "val_store")
    assert ds.classes == [wnids[10], wnids[20]]  # the training split's classes
    assert ds.sources == [f"ILSVRC2012_val_{k:08d}.png" for k in (1, 2, 4)]
    assert ds.labels.tolist() == [1, 0, 1]
    x, _ = ds.read([0, 1, 2])
    for i, k in enumerate((1, 2, 4)):
        assert np.array_equal(x[i].numpy(), expected_crop(arrays[k]))
    report = (tmp_path / "val_store" / "skipped.tsv").read_text()
    assert report.startswith("ILSVRC2012_val_00000003.png\tclass") and report.count("\n") == 1
    # as the folder it was made from, the store is refused as the split: one image's class
    # is none of training's, and its figures would silently leave it out
    with pytest.raises(ClassMismatchError, match=r"label n\w+ \(1 image\) not among the 2 training classes"):
        open_dataset(root, split="val", labels=gt)
    with pytest.raises(ClassMismatchError, match=r"prepared from a split with class n\w+ \(1 image\) not among the 2"):
        open_dataset(tmp_path / "val_store", split="val")
    # a root of stores: <root>/<split>/ is found
    gt.write_text("".join(line + "\n" for line in gt.read_text().splitlines() if wnids[500] not in line))
    prepare(root, tmp_path / "stores" / "val", split="val", labels=gt, workers=1, size=S, progress=False)
    assert len(open_dataset(tmp_path / "stores", split="val")) == 3
    assert open_dataset(tmp_path / "stores", split="val").read([0])[0].shape == (1, 3, 256, 256)


def test_prepare_idx_source(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    y = np.arange(7, dtype=np.uint8) % 3
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name, arr in (("train-images-idx3-ubyte", x), ("train-labels-idx1-ubyte", y)):
        (folder / name).write_bytes(bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
                                    + arr.tobytes())
    r = prepare(folder, tmp_path / "store", size=S, progress=False)
    assert (r.written, r.skipped) == (7, 0)
    ds = open_store(tmp_path / "store")
    imgs, labels = ds.read(np.arange(7))
    assert labels.tolist() == y.tolist() and ds.sources[2] == "train-images-idx3-ubyte#2"
    assert torch.equal(imgs, resize_batch(torch.from_numpy(x)[:, None], S))
    with pytest.raises(DataSourceError, match="already a prepared store"):
        prepare(tmp_path / "store", tmp_path / "again", progress=False)


# ---------------------------------------------------------------------------- damage and odd folders

def _damage_store(path: Path, damage: str) -> None:
    if damage == "labels cut short":
        data = (path / "labels.npy").read_bytes()
        (path / "labels.npy").write_bytes(data[:-20])
    elif damage == "labels beyond the classes":
        np.save(path / "labels.npy", np.array([7] + [0] * 26, np.int64))
    elif damage == "labels negative":
        np.save(path / "labels.npy", np.array([-3] + [0] * 26, np.int64))
    elif damage == "labels not integers":
        np.save(path / "labels.npy", np.zeros(27, np.float32))
    elif damage == "index lacks count":
        index = json.loads((path / "index.json").read_text())
        del index["count"]
        (path / "index.json").write_text(json.dumps(index))
    elif damage == "stats cut short":
        data = (path / "stats.safetensors").read_bytes()
        (path / "stats.safetensors").write_bytes(data[:-1000])
    elif damage == "sources cut short":
        data = (path / "sources.jsonl").read_bytes()
        (path / "sources.jsonl").write_bytes(data[:-5])


@pytest.mark.parametrize("damage, words", [
    ("labels cut short", "labels.npy"), ("labels beyond the classes", "labels 0 to 7 for 3 classes"),
    ("labels negative", "labels -3 to 0 for 3 classes"), ("labels not integers", "not one integer label"),
    ("index lacks count", "index.json: KeyError 'count'"), ("stats cut short", "stats.safetensors"),
    ("sources cut short", "sources.jsonl")])
def test_a_damaged_store_is_one_line_naming_the_file(tmp_path, damage, words):
    """Each was a traceback (a NumPy, safetensors, JSON or KeyError), or, for labels out of
    range, a store that opened and ended training mid-step with an IndexError."""
    make_plain_tree(tmp_path / "src")
    prepare(tmp_path / "src", tmp_path / "st", workers=1, size=32, progress=False)
    _damage_store(tmp_path / "st", damage)
    with pytest.raises(DataSourceError) as e:
        ds = open_store(tmp_path / "st")
        ds.stats()
        ds.sources
    assert f"{tmp_path / 'st'} is damaged (" in str(e.value) and words in str(e.value), str(e.value)
    assert "delete it and prepare again" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage, words", [
    ("no state", "progress.json lacks its state"), ("accum missing", "accum-2.npz is missing"),
    ("accum cut short", "accum-2.npz: BadZipFile"), ("sources garbled", "sources.jsonl: ")])
def test_a_damaged_unfinished_store_is_one_line_not_a_write_error(tmp_path, damage, words):
    """A resume of a damaged unfinished store says so (a missing statistics file was "cannot
    write ...: run the same command again to go on", which could never succeed; the others
    were tracebacks)."""
    make_plain_tree(tmp_path / "src")
    out = tmp_path / "st"
    prepare(tmp_path / "src", out, workers=1, size=32, progress=False, commit_every=4, _stop_after=6)
    progress = json.loads((out / "progress.json").read_text())
    accum = out / progress["state"]["accum"]
    assert accum.name == "accum-2.npz"  # (committed after 4 files, and at the stop)
    if damage == "no state":
        del progress["state"]
        (out / "progress.json").write_text(json.dumps(progress))
    elif damage == "accum missing":
        accum.unlink()
    elif damage == "accum cut short":
        accum.write_bytes(accum.read_bytes()[:100])
    else:
        (out / "sources.jsonl").write_bytes(b"not json\n" + (out / "sources.jsonl").read_bytes()[9:])
    with pytest.raises(DataSourceError) as e:
        prepare(tmp_path / "src", out, workers=1, size=32, progress=False)
    assert f"{out} is damaged (" in str(e.value) and words in str(e.value), str(e.value)
    assert "run the same command again" not in str(e.value)


def test_a_temporary_left_by_a_kill_does_not_make_a_folder_a_non_store(tmp_path):
    """Killed while writing the first progress.json: the folder holds the lock and that
    write's temporary, and every rerun refused it as "not an empty folder or a store"."""
    make_plain_tree(tmp_path / "src")
    out = tmp_path / "st"
    out.mkdir()
    (out / ".lock").write_bytes(b"")
    (out / ".progress.json.a69d7tit.tmp").write_bytes(b'{"format": "alex')
    done = prepare(tmp_path / "src", out, workers=1, size=32, progress=False)
    assert done.complete and done.written == 27
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    for name in ("notes.txt", ".my notes.tmp", ".progress.json.tmp"):  # others' files, even named alike
        other = tmp_path / f"other-{name}"
        other.mkdir()
        (other / name).write_text("mine")
        with pytest.raises(DataSourceError, match="not an empty folder or a store"):
            prepare(tmp_path / "src", other, workers=1, size=32, progress=False)
        assert (other / name).read_text() == "mine"


def test_a_folder_that_cannot_be_written_in(tmp_path, monkeypatch, capsys):
    """On a read-only disk (the lock cannot be made): a complete store is said to be complete,
    nothing written, as a writable one is; any other folder is one line, exit 2 (both were
    an OSError traceback)."""
    import errno

    import alexnet.store as store
    from alexnet import cli

    make_plain_tree(tmp_path / "src")
    prepare(tmp_path / "src", tmp_path / "done", workers=1, size=32, progress=False)
    (tmp_path / "empty").mkdir()
    real_open = open

    def read_only(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(store, "open", read_only, raising=False)
    again = prepare(tmp_path / "src", tmp_path / "done", workers=1, size=32, progress=False)
    assert again.already and again.written == 27
    assert cli.main(["prepare", str(tmp_path / "src"), str(tmp_path / "empty"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"alexnet: error: cannot write {tmp_path / 'empty' / '.lock'}: Read-only file system\n"


def test_prepare_hands_its_workers_the_file_names_in_arrays(tmp_path, monkeypatch):
    """Forked decoding processes share the names (`sources.Names`, two NumPy arrays) instead of
    copying the pages of a list of str as they read it: measured once, 47 MB copied per worker
    for 400,000 names from a list, 2.7 MB from the arrays (tests/test_sources.py checks a
    fork's copying of `Names` itself). The names are the files', non-UTF-8 ones included."""
    import os

    import alexnet.store as store
    from alexnet.sources import Names

    make_plain_tree(tmp_path / "src")
    odd = os.fsdecode(b"class0/caf\xe9.png")  # (not UTF-8)
    Image.fromarray(rgb_array(30, 40, 5)).save(os.path.join(tmp_path / "src", odd))
    given = []
    real = store._folder_results

    def seen(paths, *a):
        given.append(paths)
        return real(paths, *a)

    monkeypatch.setattr(store, "_folder_results", seen)
    done = prepare(tmp_path / "src", tmp_path / "st", workers=2, size=32, progress=False)
    assert done.complete and done.written == 28
    assert isinstance(given[0], Names) and os.path.join(str(tmp_path / "src"), odd) in list(given[0])


def test_a_resume_says_when_files_it_did_are_gone_from_the_source(tmp_path):
    """Files stored before an interruption and removed since stay in the store, as in a
    complete store; the resume now says so (it said nothing, and only a later run warned)."""
    import os

    make_plain_tree(tmp_path / "src")
    out = tmp_path / "st"
    prepare(tmp_path / "src", out, workers=1, size=32, progress=False, commit_every=2, _stop_after=6)
    first = json.loads((out / "sources.jsonl").read_text().splitlines()[0])
    os.remove(tmp_path / "src" / first)
    with pytest.warns(RuntimeWarning, match=r"^1 file done before the interruption is no longer in .*; the store "
                                            r"keeps it \(stored, or listed as skipped\)"):
        done = prepare(tmp_path / "src", out, workers=1, size=32, progress=False)
    assert done.complete and done.written == 27  # (the one removed among them)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a resume of an unchanged source says nothing
        prepare(tmp_path / "src", tmp_path / "again", workers=1, size=32, progress=False, _stop_after=6)
        prepare(tmp_path / "src", tmp_path / "again", workers=1, size=32, progress=False)


@pytest.mark.parametrize("damage", ["labels.npy", "images.u8", "stats.safetensors", "sources.jsonl", "skipped.tsv",
                                    "images cut short"])
def test_prepare_again_on_a_damaged_complete_store_says_it_is_damaged(tmp_path, damage):
    """It said "a complete store already" (a file removed or cut short), or "cannot write ...:
    run the same command again", which looped; training found the damage only later."""
    make_plain_tree(tmp_path / "src")
    out = tmp_path / "st"
    prepare(tmp_path / "src", out, workers=1, size=32, progress=False)
    if damage == "images cut short":
        with open(out / "images.u8", "r+b") as f:
            f.truncate(1000)
    else:
        (out / damage).unlink()
    with pytest.raises(DataSourceError, match=rf"^{out} is damaged.*delete it and prepare again$"):
        prepare(tmp_path / "src", out, workers=1, size=32, progress=False)
