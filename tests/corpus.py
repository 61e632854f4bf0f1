"""The bad-input corpus of issue 8: files a real image folder holds besides good photos.

`build(folder)` writes every case into `folder` and returns its manifest, one `Case` per
file: either it decodes (to an RGB image of `size`, with `pixels` the exact RGB array a
correct decoder gives, worked out here without alexnet.images) or it is refused with
`reason` in the message. `build_tree(root)` lays the corpus out as an ImageFolder with
train and val splits (an empty class folder, and a val class the training set lacks).

Platform notes: file names that are not UTF-8 need a filesystem that stores raw bytes
(Linux ext4/tmpfs do; the case is left out where the name cannot be created). chmod 000
does not stop root from reading a file, so the "unreadable" case uses chmod only when
not root; a FIFO named .jpg stands in for a file that cannot be read (open() on it would
block forever) in every case.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class Case:
    name: str  # file name in the folder (str; see `fs_name` for non-UTF-8 names)
    size: tuple[int, int] | None = None  # (W, H) after decoding; None: refused
    pixels: np.ndarray | None = None  # expected (H, W, 3) uint8, None: not checked exactly
    tolerance: int = 0  # max abs pixel error allowed (lossy formats)
    reason: str = ""  # substring of the refusal message
    fs_name: bytes | None = None  # the raw bytes name when it is not UTF-8

    @property
    def ok(self) -> bool:
        return self.size is not None


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(w: int = 30_000, h: int = 30_000) -> bytes:
    """A grey PNG whose header claims w x h pixels (900 megapixels), ~70 bytes on disk."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        _chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image (H, W, 3) uint8 that JPEG keeps close."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    r, g, b = rng.integers(0, 120, 3)
    return np.stack([(r + x * 100 // max(w - 1, 1)), (g + y * 100 // max(h - 1, 1)),
                     np.full_like(x, b + 60)], -1).astype(np.uint8)


def _halves(w: int, h: int) -> np.ndarray:
    """Left half red, right half blue: orientation shows."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2:] = (0, 0, 255)
    return a


def build(folder: str | os.PathLike, with_fifo: bool = True, bytes_name: bool = True) -> dict[str, Case]:
    """Write the corpus into `folder` (created); the manifest, by file name."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    def add(case: Case, data: bytes) -> None:
        (d / case.name).write_bytes(data)
        cases.append(case)

    good = gradient(48, 32)
    add(Case("good.png", (48, 32), good), encode(Image.fromarray(good), "PNG"))
    add(Case("good.jpg", (48, 32), good, tolerance=12), encode(Image.fromarray(good), "JPEG", quality=95))

    add(Case("zero.jpg", reason="empty"), b"")
    add(Case("zero.png", reason="empty"), b"")
    jpg = encode(Image.fromarray(gradient(120, 90, 1)), "JPEG", quality=90)
    add(Case("truncated.jpg", reason="truncated"), jpg[: len(jpg) // 2])
    png = encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (90, 120, 3), np.uint8)), "PNG")
    add(Case("truncated.png", reason="truncated"), png[: len(png) // 2])
    add(Case("text.jpg", reason="not an image"), b"hello, I am a text file named like a JPEG\n")
    add(Case("random.png", reason="not an image"), np.random.default_rng(3).bytes(500))
    # PostScript, which Pillow would hand to Ghostscript where one is installed: never run
    add(Case("drawing.png", reason="not an image"),
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n")
    add(Case("bomb.png", reason="too large"), bomb_png())

    # CMYK JPEG of one colour: Pillow's RGB->CMYK is C = 255 - R etc. with K = 0, so
    # the colour comes back up to JPEG's rounding.
    cmyk = Image.new("CMYK", (24, 16), (55, 205, 155, 0))
    add(Case("cmyk.jpg", (24, 16), np.full((16, 24, 3), (200, 50, 100), np.uint8), tolerance=3),
        encode(cmyk, "JPEG", quality=95))

    # 16-bit grey: v -> round(v / 257) in all three channels, not clipped at 255
    v = (np.arange(20 * 10).reshape(10, 20) * 329).astype(np.uint16)  # 0 .. 65471
    exp16 = np.floor(v / 257 + 0.5).astype(np.uint8)
    add(Case("grey16.png", (20, 10), np.repeat(exp16[..., None], 3, -1)),
        encode(Image.fromarray(v), "PNG"))  # uint16 -> mode I;16

    # a dark 16-bit PGM (maxval 65535, every value below 256): still 16-bit, so nearly black,
    # not read as 8-bit (Pillow opens it as mode I, as it does some 8-bit containers)
    v = np.arange(20 * 10).reshape(10, 20).astype(np.uint16)  # 0 .. 199
    exp_dark = np.floor(v / 257 + 0.5).astype(np.uint8)
    add(Case("dark16.pgm", (20, 10), np.repeat(exp_dark[..., None], 3, -1)),
        b"P5\n20 10\n65535\n" + v.astype(">u2").tobytes())

    # palette with a transparent entry: transparent pixels become white
    pal = Image.new("P", (8, 6), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (3 * 253))
    pal.paste(1, (0, 0, 4, 6))
    pal.paste(2, (4, 0, 6, 6))  # columns 6, 7 keep index 0: transparent
    exp_pal = np.zeros((6, 8, 3), np.uint8)
    exp_pal[:, :4], exp_pal[:, 4:6], exp_pal[:, 6:] = (255, 0, 0), (0, 255, 0), (255, 255, 255)
    add(Case("palette.png", (8, 6), exp_pal), encode(pal, "PNG", transparency=0))

    # RGBA: out = round(c * a / 255 + 255 * (1 - a / 255)), compositing over white
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3] = (10, 100, 200)
    rgba[..., 3] = np.array([0, 64, 128, 200, 255], np.uint8)[None, :]
    a = rgba[..., 3:].astype(np.float64) / 255
    exp_rgba = np.rint(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    add(Case("rgba.png", (5, 4), exp_rgba, tolerance=1), encode(Image.fromarray(rgba, "RGBA"), "PNG"))

    add(Case("one.png", (1, 1), np.array([[[7, 77, 177]]], np.uint8)),
        encode(Image.new("RGB", (1, 1), (7, 77, 177)), "PNG"))

    # EXIF orientation 6: stored 40x20, shown rotated 90 degrees clockwise (20x40); the
    # stored left half (red) is then the top half.
    stored = _halves(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    add(Case("exif6.jpg", (20, 40), np.rot90(stored, k=-1).copy(), tolerance=8),
        encode(Image.fromarray(stored), "JPEG", quality=100, subsampling=0, exif=exif.tobytes()))

    # a good image whose name is not UTF-8 (Latin-1 "cafe" with an acute e)
    raw = b"caf\xe9.png"
    try:
        if not bytes_name:
            raise OSError
        with open(os.fsencode(d) + b"/" + raw, "wb") as f:
            f.write(encode(Image.fromarray(good), "PNG"))
        cases.append(Case(os.fsdecode(raw), (48, 32), good, fs_name=raw))
    except OSError:  # the filesystem wants UTF-8 names
        pass

    (d / "loop.jpg").symlink_to("loop.jpg")  # a symlink to itself: ELOOP on open
    cases.append(Case("loop.jpg", reason="cannot open"))
    (d / "dangling.png").symlink_to("no-such-file.png")
    cases.append(Case("dangling.png", reason="cannot open"))

    if with_fifo:
        os.mkfifo(d / "fifo.jpg")
        cases.append(Case("fifo.jpg", reason="not a regular file"))
    if os.geteuid() != 0:
        add(Case("noperm.jpg", reason="cannot open"), encode(Image.fromarray(good), "JPEG"))
        os.chmod(d / "noperm.jpg", 0)
    return {c.name: c for c in cases}


def build_tree(root: str | os.PathLike, bytes_name: bool = True) -> tuple[dict[str, Case], dict]:
    """An ImageFolder with train/ and val/ splits:

    train/bad/       the whole corpus (good and bad files)
    train/cat/       3 good images
    train/empty/     an empty class folder
    val/cat/         2 good images, val/bad/ 1 good image
    val/zebra/       1 good image of a class the training set lacks

    Returns the manifest of train/bad and a description of the rest."""
    root = Path(root)
    manifest = build(root / "train" / "bad", bytes_name=bytes_name)
    for split, cls, n in (("train", "cat", 3), ("val", "cat", 2), ("val", "bad", 1), ("val", "zebra", 1)):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(gradient(40, 30, seed=10 + i)).save(root / split / cls / f"{cls}{i}.png")
    (root / "train" / "empty").mkdir()
    return manifest, {"train_classes": ["bad", "cat", "empty"], "val_extra": ["zebra/zebra0.png"],
                      "good_train": sum(c.ok for c in manifest.values()) + 3}
