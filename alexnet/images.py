"""Decoding one image file into the paper's 256x256 8-bit RGB input.

`load_rgb` turns anything Pillow reads into an 8-bit RGB image:

* EXIF orientation (tag 0x0112) is applied, so the pixels are upright as a viewer shows
  them. A broken EXIF block is ignored (the pixels are still good).
* Grey ("1", "L"), palette ("P"), CMYK, YCbCr, HSV and 32-bit int/float modes are
  converted with Pillow. 16-bit grey ("I;16*", and "I" holding values above 255) is
  scaled to 8 bits with round(v / 257), not clipped. (48-bit RGB and 16-bit grey with
  alpha PNGs reach us as Pillow's 8-bit RGB and RGBA: their high bytes, not rounded.)
  Float ("F") images with values in 0..1 are scaled by 255, others clipped to 0..255.
* Transparency (RGBA, LA, PA, palette or colour-key transparency) is composited over a
  WHITE background: transparent pixels of web images (logos, product shots) are meant to
  sit on a white page.
* ICC profiles are not applied: pixel values are taken as sRGB.
* Only the first frame of animated or multi-page files is used.

Files that cannot become an image raise `ImageError` with a one-line reason: empty,
truncated or undecodable files, and files whose header claims more than `max_pixels`
pixels (decompression bombs; the header is checked before any pixel is decoded).

`resize_center_crop` is the paper's preprocessing (section 2): rescale so the shorter
side is `size`, then crop the central `size` x `size` patch. The filter is Pillow's
BILINEAR, which for downscaling widens its support to the scale factor (antialiased),
as `alexnet.dataset.resize_batch` does for in-memory images.

This module needs only Pillow and numpy (no torch), so decoding workers start fast.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import stat
import struct
import warnings
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps

# 100 megapixels: far above any ImageNet photo, small enough that one decode stays
# below about 0.4 GB for 8-bit RGB and 0.9 GB for 16-bit, 32-bit or float pixels
# (measured peaks, 10,000 x 10,000 images). Pillow refuses anything above 2 * Image.MAX_IMAGE_PIXELS on its own
# (about 179 megapixels); a larger `max_pixels` turns Pillow's check off, so that this
# limit is the one that holds.
MAX_PIXELS = 100_000_000

RESAMPLE = Image.Resampling.BILINEAR
MAX_ASPECT = 4  # resize_center_crop resamples only the central patch of longer images
# Formats Pillow reads by running another program: PostScript (EPS) goes to Ghostscript,
# where one is installed. An upload to `serve` must never reach it: not an image, here.
EXTERNAL_FORMATS = frozenset({"EPS"})


# and formats Pillow only identifies (a size, never pixels): MPEG, and its stub plugins
# (BUFR, GRIB, HDF5, and WMF/EMF, which only Windows can draw)
IDENTIFY_ONLY_FORMATS = frozenset({"MPEG"})


@functools.cache
def _formats() -> tuple[str, ...]:
    """The formats Pillow decodes itself, in its own order: not EXTERNAL_FORMATS, not
    those it only identifies. Made once, not per image."""
    from PIL import ImageFile

    Image.init()  # (every plugin registered: the list is complete)
    return tuple(f for f, (factory, _) in Image.OPEN.items()
                 if f not in EXTERNAL_FORMATS and f not in IDENTIFY_ONLY_FORMATS
                 and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)))


def image_extensions() -> frozenset[str]:
    """File name extensions (lower case, with the dot) of the formats `load_rgb` reads."""
    readable = set(_formats())
    return frozenset(e.lower() for e, fmt in Image.registered_extensions().items() if fmt in readable)

# `max_pixels` is the size check here; Pillow's own warning for images above
# Image.MAX_IMAGE_PIXELS (89 megapixels) would only repeat it. A process-wide filter
# rather than warnings.catch_warnings, which is not thread-safe (decoding runs in threads).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


class ImageError(ValueError):
    """A file that cannot be turned into an image; the message is a one-line reason."""


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(e: BaseException) -> str:
    if isinstance(e, Image.DecompressionBombError):
        return "too large: " + _one_line(str(e))
    if isinstance(e, Image.UnidentifiedImageError):
        return "not an image Pillow can read"
    msg = _one_line(str(e))
    if "truncated" in msg.lower():
        return "truncated file: " + msg
    return f"cannot decode ({type(e).__name__}): {msg}" if msg else f"cannot decode ({type(e).__name__})"


def _open_fp(src: ImageSource) -> tuple[BinaryIO, bool]:
    """A binary file object for `src` and whether we opened it (and must close it)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError("empty file (0 bytes)")
        return io.BytesIO(bytes(src)), True
    if isinstance(src, (str, os.PathLike)):
        try:
            st = os.stat(src)
            if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
                raise ImageError("not a regular file")
            if st.st_size == 0:
                raise ImageError("empty file (0 bytes)")
            return open(src, "rb"), True
        except OSError as e:
            raise ImageError(f"cannot open: {_one_line(e.strerror or str(e))}") from None
    return src, False


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # a malformed EXIF block: keep the pixels as stored
        return img
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        try:
            return ImageOps.exif_transpose(img)
        except Exception:
            return img
    return img


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


BAND_PIXELS = 1 << 20


def _bands(img: Image.Image):
    """(first row, the rows as a NumPy array) for `img` in bands of about BAND_PIXELS
    pixels, so that a 16-bit or float image is converted with a band's int64 or float64
    copy, not a whole image's (8 bytes a pixel: 800 MB at the 100-megapixel limit)."""
    w, h = img.size
    step = max(1, BAND_PIXELS // w)
    for top in range(0, h, step):
        yield top, np.asarray(img.crop((0, top, w, min(h, top + step))))


def _within_8_bits(img: Image.Image) -> bool:
    lo, hi = img.getextrema()
    return lo >= 0 and hi <= 255


def _finite(a: np.ndarray) -> np.ndarray:
    """A float band as float64 levels: NaN black, infinities clipped to 0 and 255."""
    return np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)


def _to_rgb(img: Image.Image, fmt: str | None = None) -> Image.Image:
    """`fmt`: the file's format, where `img` is no longer the opened file (a rotated copy)."""
    mode, fmt = img.mode, fmt or img.format
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        # a 32-bit container holding 8-bit values; not a PGM's, which Pillow has already
        # scaled to 0..65535 from its maxval (> 255: else it would be "L"). (Pillow's
        # getextrema refuses the I;16B, I;16L and I;16N modes: asked of "I" alone.)
        eight_bit = mode == "I" and fmt != "PPM" and _within_8_bits(img)
        key = img.info.get("transparency")  # a PNG's colour key, in the image's own levels
        out = np.empty((img.height, img.width), np.uint8)
        for top, band in _bands(img):
            a = band.astype(np.int64)
            rows = out[top:top + len(a)]
            rows[:] = a if eight_bit else (np.clip(a, 0, 65535) + 128) // 257
            if isinstance(key, int):
                rows[a == key] = 255  # over white, as every other transparency
        return Image.fromarray(out, "L").convert("RGB")
    if mode == "F":
        lo, hi = np.inf, -np.inf
        for _, band in _bands(img):
            a = _finite(band)
            lo, hi = min(lo, a.min()), max(hi, a.max())
        scale = 255.0 if 0.0 <= lo and hi <= 1.0 else 1.0  # levels given as 0..1
        out = np.empty((img.height, img.width), np.uint8)
        for top, band in _bands(img):
            out[top:top + len(band)] = np.clip(np.rint(_finite(band) * scale), 0, 255)
        return Image.fromarray(out, "L").convert("RGB")
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "LAB":
        from PIL import ImageCms

        lab2rgb = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return ImageCms.applyTransform(img, lab2rgb)
    return img.convert("RGB")


def load_rgb(src: ImageSource, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `src` (a path, the file's bytes, or a binary file object) as an 8-bit RGB
    Pillow image, upright per EXIF. Raises `ImageError` with a one-line reason."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > 2 * Image.MAX_IMAGE_PIXELS:
        # asked for more than Pillow allows: its check off, ours (on the header, just
        # below, before any decoding) the one that holds
        Image.MAX_IMAGE_PIXELS = None
    fp, owned = _open_fp(src)
    try:
        _check_icon_entries(fp, max_pixels)
        try:
            img = Image.open(fp, formats=_formats())
        except Exception as e:
            raise ImageError(_describe(e)) from None
        return as_rgb(img, max_pixels)
    finally:
        if owned:
            fp.close()


def _check_icon_entries(fp: BinaryIO, max_pixels: int) -> None:
    """An ImageError for an ICO file holding a PNG of more than `max_pixels` pixels: Pillow
    decodes an icon's largest entry as it opens the file, before its size can be asked
    (the directory says at most 256 x 256; the PNG inside may be 12,000 x 12,000)."""
    try:
        start = fp.tell()
    except (OSError, ValueError):
        return
    largest = (0, 0)
    try:
        head = fp.read(6)
        if head[:4] == b"\x00\x00\x01\x00":
            directory = fp.read(16 * struct.unpack("<H", head[4:6])[0])
            for i in range(len(directory) // 16):
                fp.seek(start + struct.unpack("<I", directory[16 * i + 12:16 * i + 16])[0])
                png = fp.read(24)
                if png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR":
                    largest = max(largest, struct.unpack(">II", png[16:24]), key=lambda wh: wh[0] * wh[1])
    except (OSError, ValueError, struct.error):  # cut short: Pillow says what it is
        pass
    finally:
        with contextlib.suppress(OSError, ValueError):
            fp.seek(start)
    w, h = largest
    if w * h > max_pixels:
        raise ImageError(f"too large: an icon of {w}x{h} = {w * h} pixels > limit {max_pixels}")


def as_rgb(img: Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An opened (perhaps not yet decoded) Pillow image as 8-bit RGB, upright per EXIF,
    after the checks `load_rgb` makes: not empty, at most `max_pixels` pixels, decodable.
    Raises `ImageError` with a one-line reason."""
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"empty image: {w}x{h} pixels")
    if w * h > max_pixels:
        raise ImageError(f"too large: {w}x{h} = {w * h} pixels > limit {max_pixels}")
    try:
        img.load()
        fmt = img.format
        img = _apply_exif_orientation(img)
        return _to_rgb(img, fmt)
    except MemoryError:
        raise ImageError(f"too large: out of memory decoding {w}x{h} pixels") from None
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(_describe(e)) from None


def shorter_side_crop(w: int, h: int, size: int) -> tuple[int, int, int, int]:
    """For a w x h image: (new width, new height) with the shorter side `size` (the longer
    rounded, at least `size`), and the (left, top) of the central size x size patch there,
    an odd excess's extra pixel on the right/bottom side."""
    if w <= h:
        nw, nh = size, max(size, round(h * size / w))
    else:
        nw, nh = max(size, round(w * size / h)), size
    return nw, nh, (nw - size) // 2, (nh - size) // 2


def resize_center_crop(img: Image.Image, size: int = 256) -> np.ndarray:
    """uint8 (3, size, size): `img` (RGB) rescaled so its shorter side is `size`
    (bilinear, antialiased), then its central size x size patch. When the excess is odd,
    the crop keeps the extra pixel on the right/bottom side ((excess) // 2 offset).

    Beyond an aspect ratio of `MAX_ASPECT` only the patch is resampled (Pillow's `box`:
    the same scale and pixel centres, within 1 of the whole resize in a few pixels), so
    a 1 x 20,000 image of a few hundred bytes does not become a 256 x 5,120,000 one."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    w, h = img.size
    nw, nh, left, top = shorter_side_crop(w, h, size)
    if max(nw, nh) > MAX_ASPECT * size:
        sx, sy = w / nw, h / nh
        img = img.resize((size, size), RESAMPLE, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
    else:
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), RESAMPLE)
        if (nw, nh) != (size, size):
            img = img.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def decode_file(path: str, size: int = 256, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`resize_center_crop(load_rgb(path))`: the prepared record of one file."""
    return resize_center_crop(load_rgb(path, max_pixels=max_pixels), size)
