"""Property-based tests (Hypothesis) of the three places untrusted input enters: image
decoding, crop geometry for any image and crop size, and config parsing. Random
training crops are in test_augment.py; these add what it does not cover."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from alexnet.augment import center_crop, center_offset, ten_crop, ten_crop_offsets
from alexnet.config import ConfigError, RunConfig, from_dict, parse_override, run_config, to_dict
from alexnet.images import ImageError, load_rgb, resize_center_crop

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------- decoding

# (mode, format, lossless for RGB content)
MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "I;16", "CMYK"]
FORMATS = {"PNG": {"1", "L", "P", "RGB", "RGBA", "LA", "I;16"}, "TIFF": {"1", "L", "P", "RGB", "RGBA", "CMYK"},
           "BMP": {"1", "L", "P", "RGB"}, "GIF": {"L", "P"}, "JPEG": {"L", "RGB", "CMYK"},
           "WEBP": {"RGB", "RGBA"}}


def _image(mode: str, w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16))
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode in ("RGBA", "LA"):
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)
    return rgb.convert(mode)


@SETTINGS
@given(fmt=st.sampled_from(sorted(FORMATS)), data=st.data(), w=st.integers(1, 40), h=st.integers(1, 40),
       seed=st.integers(0, 2**16))
def test_any_small_image_decodes_to_rgb_of_its_size(fmt, data, w, h, seed):
    mode = data.draw(st.sampled_from(sorted(FORMATS[fmt])))
    img = _image(mode, w, h, seed)
    buf = io.BytesIO()
    img.save(buf, fmt)
    out = load_rgb(buf.getvalue())
    assert out.mode == "RGB" and out.size == (w, h)
    if mode == "RGB" and fmt in ("PNG", "TIFF", "BMP"):  # lossless: the very pixels
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img))
    if mode in ("L", "1") and fmt != "JPEG":  # grey stays grey: three equal channels
        a = np.asarray(out)
        assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    if mode == "I;16" and fmt == "PNG":  # scaled to 8 bits, not clipped
        want = np.floor(np.asarray(img).astype(np.float64) / 257 + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(out)[..., 0], want)


@SETTINGS
@given(st.binary(max_size=2000))
def test_random_bytes_are_an_image_or_an_imageerror(data):
    try:
        out = load_rgb(data)
    except ImageError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert out.mode == "RGB"


def _valid(fmt: str) -> bytes:
    buf = io.BytesIO()
    _image("RGB", 24, 18, 0).save(buf, fmt)
    return buf.getvalue()


VALID = {fmt: _valid(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}


@SETTINGS
@given(fmt=st.sampled_from(sorted(VALID)), cut=st.floats(0, 1),
       flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=8))
def test_damaged_files_are_an_image_or_an_imageerror(fmt, cut, flips):
    """Truncated and bit-damaged copies of valid files: never an exception other than
    ImageError (a run must not end on one bad file), never a wrong size."""
    data = bytearray(VALID[fmt])
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    data = bytes(data[: max(1, int(cut * len(data)))])
    try:
        out = load_rgb(data)
    except ImageError:
        return
    assert out.mode == "RGB" and out.size[0] >= 1 and out.size[1] >= 1


@SETTINGS
@given(w=st.integers(1, 300), h=st.integers(1, 300), size=st.integers(8, 64), seed=st.integers(0, 100))
def test_resize_center_crop_shape_and_the_shorter_side_case(w, h, size, seed):
    img = _image("RGB", w, h, seed)
    out = resize_center_crop(img, size)
    assert out.shape == (3, size, size) and out.dtype == np.uint8
    if min(w, h) == size:  # no resize: the output is the central slice, extra pixel right/bottom
        a = np.asarray(img).transpose(2, 0, 1)
        t, l = (h - size) // 2, (w - size) // 2
        np.testing.assert_array_equal(out, a[:, t:t + size, l:l + size])


# ---------------------------------------------------------------------------- crop geometry


@SETTINGS
@given(s=st.integers(1, 40), data=st.data())
def test_ten_crop_for_any_size_is_corners_centre_then_mirrors(s, data):
    crop = data.draw(st.integers(1, s))
    b = data.draw(st.integers(1, 3))
    img = torch.from_numpy(np.random.default_rng(s * 41 + crop).integers(0, 256, (b, 3, s, s), dtype=np.uint8))
    e, c = s - crop, (s - crop) // 2
    corners = [(0, 0), (0, e), (e, 0), (e, e), (c, c)]
    assert center_offset(s, crop) == c
    assert ten_crop_offsets(s, crop) == [(t, l, False) for t, l in corners] + [(t, l, True) for t, l in corners]
    out = ten_crop(img, crop)
    assert out.shape == (b, 10, 3, crop, crop)
    for k, (t, l) in enumerate(corners + corners):
        want = img[:, :, t:t + crop, l:l + crop]
        torch.testing.assert_close(out[:, k], want.flip(-1) if k >= 5 else want, rtol=0, atol=0)
    torch.testing.assert_close(center_crop(img, crop), img[:, :, c:c + crop, c:c + crop], rtol=0, atol=0)


@settings(max_examples=20, deadline=None)
@given(s=st.integers(1, 20), extra=st.integers(1, 5))
def test_a_crop_larger_than_the_image_is_refused(s, extra):
    img = torch.zeros(1, 3, s, s, dtype=torch.uint8)
    for f in (center_crop, ten_crop):
        with pytest.raises(ValueError):
            f(img, s + extra)


# ---------------------------------------------------------------------------- configs

FIELDS = {section: {f: v for f, v in values.items()}
          for section, values in to_dict(RunConfig()).items() if isinstance(values, dict)}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
known_keys = st.sampled_from([(s, k) for s, keys in FIELDS.items() for k in keys])
any_key = known_keys | st.tuples(st.sampled_from([*FIELDS, "bogus", ""]), st.text(max_size=8))


def assert_holds(actual, asked) -> None:
    """`asked` is in `actual`: a mapping given for a nested section (model.lrn) sets the keys
    it names and leaves the others; anything else is the value itself (2 == 2.0 for a float)."""
    if isinstance(asked, dict) and isinstance(actual, dict):
        for key, value in asked.items():
            assert_holds(actual[key], value)
    else:
        assert actual == asked


@settings(max_examples=150, deadline=None)
@example(items=[(("model", "lrn"), {})], recipe="paper")  # a nested section given as {}: no change
@example(items=[(("model", "lrn"), {"size": 3})], recipe="fast")
@given(items=st.lists(st.tuples(any_key, json_values), max_size=4), recipe=st.sampled_from(["paper", "fast", "demo"]))
def test_random_overrides_give_a_valid_config_or_a_config_error(items, recipe):
    over: dict = {}
    for (section, key), value in items:
        over.setdefault(section, {})[key] = value
    try:
        cfg = run_config(recipe, over)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert isinstance(cfg, RunConfig)
    for section, keys in over.items():  # what was asked for is what is there
        assert_holds(to_dict(getattr(cfg, section)), keys)
    assert from_dict(RunConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg  # round trip through JSON


@settings(max_examples=100, deadline=None)
@given(st.one_of(json_values, st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), json_values, max_size=4)))
def test_from_dict_of_anything_is_a_config_or_a_config_error(data):
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError:
        return
    assert from_dict(RunConfig, to_dict(cfg)) == cfg


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30))
def test_parse_override_of_any_text(text):
    try:
        out = parse_override(text)
    except ConfigError:
        assert "=" not in text or text.startswith("=")
        return
    key, _, value = text.partition("=")
    node = out
    for part in key.split(".")[:-1]:
        node = node[part]
    got = node[key.split(".")[-1]]
    try:
        want = json.loads(value)
    except json.JSONDecodeError:
        want = value
    assert got == want or (got != got and want != want)  # NaN


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([(s, k) for s, keys in FIELDS.items() for k, v in keys.items() if isinstance(v, float)]),
       st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999"]))
def test_non_finite_floats_are_refused(field, text):
    section, key = field
    with pytest.raises(ConfigError, match="finite"):
        run_config("paper", parse_override(f"{section}.{key}={text}"))
