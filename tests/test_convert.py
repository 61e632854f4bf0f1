"""`alexnet convert`: files in Caffe's and torchvision's formats, written here from random
numbers, must convert into model files whose network, fed an RGB image preprocessed as the
file says, gives the logits that the original numbers give under the source's own
preprocessing (computed here independently, op by op); bad files must be refused in one line."""

import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alexnet import cli
from alexnet.augment import EvalTransform
from alexnet.checkpoint import CheckpointError, load_model_file
from alexnet.reference import plain_alexnet
from alexnet.sources import imagenet_wnids
from tests.helpers import run_command

# BVLC AlexNet's weighted layers in Caffe's shapes: (out, in/groups, kh, kw) and (out, in).
CAFFE_SHAPES = {"conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
                "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3), "fc6": (4096, 9216),
                "fc7": (4096, 4096), "fc8": (1000, 4096)}
# deploy.prototxt's order: conv -> relu -> LRN -> pool, dropout after fc6 and fc7.
BVLC_LAYERS = [("conv1", "Convolution"), ("relu1", "ReLU"), ("norm1", "LRN"), ("pool1", "Pooling"),
               ("conv2", "Convolution"), ("relu2", "ReLU"), ("norm2", "LRN"), ("pool2", "Pooling"),
               ("conv3", "Convolution"), ("relu3", "ReLU"), ("conv4", "Convolution"), ("relu4", "ReLU"),
               ("conv5", "Convolution"), ("relu5", "ReLU"), ("pool5", "Pooling"),
               ("fc6", "InnerProduct"), ("relu6", "ReLU"), ("drop6", "Dropout"),
               ("fc7", "InnerProduct"), ("relu7", "ReLU"), ("drop7", "Dropout"),
               ("fc8", "InnerProduct"), ("prob", "Softmax")]
V1_CODES = {"Convolution": 4, "ReLU": 18, "LRN": 15, "Pooling": 17, "InnerProduct": 14, "Dropout": 6,
            "Softmax": 20, "TanH": 23}
# deploy.prototxt's convolution_param: (kernel_size, stride, pad, group)
CAFFE_CONV = {"conv1": (11, 4, 0, 1), "conv2": (5, 1, 2, 2), "conv3": (3, 1, 1, 1), "conv4": (3, 1, 1, 2),
              "conv5": (3, 1, 1, 2)}
TV_MEAN, TV_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------ a tiny protobuf encoder

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(num: int, wire: int) -> bytes:
    return _varint(num << 3 | wire)


def _msg(num: int, payload: bytes | list[bytes]) -> bytes | list[bytes]:
    """A length-delimited field; a list of chunks stays a list (no copies of big blobs)."""
    if isinstance(payload, bytes):
        return _key(num, 2) + _varint(len(payload)) + payload
    return [_key(num, 2) + _varint(sum(map(len, payload))), *payload]


def _int(num: int, v: int) -> bytes:
    return _key(num, 0) + _varint(v)


def _float(num: int, v: float) -> bytes:
    return _key(num, 5) + struct.pack("<f", v)


def _blob(a: np.ndarray, legacy: bool = False, packed: bool = True) -> list[bytes]:
    """BlobProto: `shape` (BlobShape, packed dims) or the legacy num/channels/height/width,
    then `data` (field 5) packed, or as one (tag, float) record per value."""
    a = np.ascontiguousarray(a, dtype="<f4")
    if legacy:
        shape = (1,) * (4 - a.ndim) + a.shape
        head = b"".join(_int(i + 1, d) for i, d in enumerate(shape))
    else:
        head = _msg(7, _msg(1, b"".join(_varint(d) for d in a.shape)))
    if packed:
        return [head, *_msg(5, [a.tobytes()])]
    rec = np.empty((a.size, 5), dtype=np.uint8)
    rec[:, 0] = 5 << 3 | 5
    rec[:, 1:] = a.reshape(-1).view(np.uint8).reshape(-1, 4)
    return [head, rec.tobytes()]


def _layer(name: str, kind: str, blobs: list[np.ndarray], v1: bool, lrn: dict | None = None,
           pool: int = 0, extra: bytes = b"") -> list[bytes]:
    """LayerParameter (name 1, type 2 string, bottom 3, top 4, blobs 7, convolution_param
    106, lrn_param 118, pooling_param 121) or V1LayerParameter (bottom 2, top 3, name 4,
    type 5 enum, blobs 6, convolution_param 10, lrn_param 18, pooling_param 19); `extra`
    is appended as it is."""
    if v1:
        out = [_msg(2, b"data"), _msg(3, name.encode()), _msg(4, name.encode()), _int(5, V1_CODES[kind])]
        for b in blobs:
            out += _msg(6, _blob(b, legacy=True, packed=False))
    else:
        out = [_msg(1, name.encode()), _msg(2, kind.encode()), _msg(3, b"data"), _msg(4, name.encode())]
        for b in blobs:
            out += _msg(7, _blob(b))
    if kind == "LRN" and lrn is not None:
        params = _int(1, lrn["size"]) + _float(2, lrn["alpha"]) + _float(3, lrn["beta"]) + _float(5, lrn["k"])
        out.append(_msg(18 if v1 else 118, params))
    if kind == "Pooling":
        out.append(_msg(19 if v1 else 121, _int(1, pool) + _int(2, 3) + _int(3, 2)))
    if kind == "Convolution" and name in CAFFE_CONV:
        k, stride, pad, group = CAFFE_CONV[name]  # (num_output 1 left out: the blobs say it)
        params = _int(4, k) + (_int(6, stride) if stride != 1 else b"") + (_int(3, pad) if pad else b"")
        out.append(_msg(10 if v1 else 106, params + (_int(5, group) if group != 1 else b"")))
    out.append(extra)
    return out


def _caffemodel(weights: dict, v1: bool, lrn: dict | None = None, layers=BVLC_LAYERS, pool: int = 0,
                extra: dict | None = None) -> bytes:
    """NetParameter: name (1), then the layers in V1 `layers` (2) or `layer` (100);
    `extra` maps a layer's name to bytes appended to its message."""
    body = [_msg(1, b"AlexNet")]
    for name, kind in layers:
        body += _msg(2 if v1 else 100, _layer(name, kind, list(weights.get(name, ())), v1, lrn, pool,
                                              (extra or {}).get(name, b"")))
    return b"".join(body)


# ------------------------------------------------------------------------ oracles

def _caffe_logits(w: dict, image: np.ndarray, mean_bgr: np.ndarray, lrn: dict) -> torch.Tensor:
    """Caffe's forward pass on a (3, 256, 256) RGB uint8 image: BGR, minus the BGR mean,
    centre 227 crop, then BVLC AlexNet with the weights exactly as Caffe holds them."""
    t = {k: (torch.from_numpy(a), torch.from_numpy(b)) for k, (a, b) in w.items()}
    x = torch.from_numpy(image[::-1].astype(np.float32) - mean_bgr)[None, :, 14:241, 14:241]
    norm = nn.LocalResponseNorm(lrn["size"], alpha=lrn["alpha"], beta=lrn["beta"], k=lrn["k"])

    def conv(x, name, stride=1, pad=0, groups=1):
        return F.relu(F.conv2d(x, *t[name], stride=stride, padding=pad, groups=groups))

    x = F.max_pool2d(norm(conv(x, "conv1", stride=4)), 3, 2)
    x = F.max_pool2d(norm(conv(x, "conv2", pad=2, groups=2)), 3, 2)
    x = conv(conv(conv(x, "conv3", pad=1), "conv4", pad=1, groups=2), "conv5", pad=1, groups=2)
    x = F.max_pool2d(x, 3, 2).flatten(1)
    x = F.relu(F.linear(x, *t["fc6"]))
    x = F.relu(F.linear(x, *t["fc7"]))
    return F.linear(x, *t["fc8"])[0]


def _converted_logits(path, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The converted file used as predict/evaluate use it: its own preprocessing, its
    network; in NCHW (module by module) and channels_last (the fused ReLU-LRN-pool kernel)."""
    ck = load_model_file(path)
    transform = EvalTransform(ck.stats, ck.preprocess["crop"], scale=ck.preprocess["pixel_scale"])
    x = transform(torch.from_numpy(image)[None])
    model = ck.build_model().eval()
    with torch.no_grad():
        plain = model(x)[0]
        model = model.to(memory_format=torch.channels_last)
        fused = model(x.contiguous(memory_format=torch.channels_last))[0]
    return plain, fused


def _assert_logits_equal(got: tuple[torch.Tensor, ...], want: torch.Tensor) -> None:
    scale = want.abs().max().item()
    assert scale > 1e-2 and want.std() > 1e-3 * scale  # the test network is not degenerate
    for g in got:
        torch.testing.assert_close(g, want, atol=1e-3 * scale, rtol=1e-4)
        assert g.argmax() == want.argmax()


# ------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def caffe_weights() -> dict:
    """Random BVLC AlexNet weights, He-scaled so activations keep their size and LRN matters."""
    rng = np.random.default_rng(0)
    out = {}
    for name, shape in CAFFE_SHAPES.items():
        fan_in = int(np.prod(shape[1:]))
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32((2.0 / fan_in) ** 0.5)
        out[name] = (w, rng.standard_normal(shape[0], dtype=np.float32) * np.float32(0.1))
    return out


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """An RGB uint8 image, already at the 256x256 both sources crop from: smooth colour
    gradients plus noise, so that the channel order matters."""
    rng = np.random.default_rng(1)
    ramp = np.linspace(0, 1, 256, dtype=np.float32)
    base = np.stack([200 * ramp[None, :].repeat(256, 0), 150 * ramp[:, None].repeat(256, 1),
                     np.full((256, 256), 60, np.float32)])
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _small_weights(shape_of=lambda name: (2,)) -> dict:
    return {name: (np.zeros(shape_of(name), np.float32), np.zeros(1, np.float32)) for name in CAFFE_SHAPES}


# --------------------------------------------------------------------------- Caffe

def test_caffe_new_format_default_mean(tmp_path, caffe_weights, image):
    lrn = {"size": 5, "alpha": 2e-4, "beta": 0.8, "k": 1.5}  # not BVLC's: they must come from the file
    src, out = tmp_path / "alexnet.caffemodel", tmp_path / "alexnet.safetensors"
    src.write_bytes(_caffemodel(caffe_weights, v1=False, lrn=lrn))
    assert run_command("convert", "caffe", str(src), str(out)) == 0

    ck = load_model_file(out)
    assert ck.model_config.variant == "paper" and ck.model_config.input_size == 227
    assert (ck.model_config.lrn.form, ck.model_config.lrn.k, ck.model_config.lrn.beta) == ("caffe", 1.5, 0.8)
    assert ck.classes == imagenet_wnids() and len(ck.extra["class_names"]) == 1000
    assert ck.extra["class_names"][0] == "tench"
    assert ck.extra["source"]["file"] == "alexnet.caffemodel"
    assert ck.preprocess == {"image_size": 256, "crop": 227, "pixel_scale": 1.0, "mean": "mean_image"}
    torch.testing.assert_close(ck.stats.mean_image[:, 0, 0], torch.tensor([123.0, 117.0, 104.0]))

    mean_bgr = np.array([104, 117, 123], np.float32).reshape(3, 1, 1)
    want = _caffe_logits(caffe_weights, image, mean_bgr, lrn)
    _assert_logits_equal(_converted_logits(out, image), want)


def test_caffe_v1_format_unpacked_floats_and_binaryproto_mean(tmp_path, caffe_weights, image):
    lrn = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0}
    src, mean_file, out = tmp_path / "bvlc.caffemodel", tmp_path / "mean.binaryproto", tmp_path / "out.safetensors"
    src.write_bytes(_caffemodel(caffe_weights, v1=True, lrn=lrn))
    rng = np.random.default_rng(2)
    mean_bgr = (np.array([104, 117, 123], np.float32).reshape(3, 1, 1)
                + rng.normal(0, 20, (3, 256, 256)).astype(np.float32))
    mean_file.write_bytes(b"".join(_blob(mean_bgr[None], legacy=True)))  # (1, 3, 256, 256), as Caffe writes it
    assert run_command("convert", "caffe", str(src), str(out), "--mean", str(mean_file)) == 0

    ck = load_model_file(out)
    torch.testing.assert_close(ck.stats.mean_image, torch.from_numpy(mean_bgr[::-1].copy()))
    assert ck.extra["source"]["format"] == "caffe NetParameter.layers (V1)"
    _assert_logits_equal(_converted_logits(out, image), _caffe_logits(caffe_weights, image, mean_bgr, lrn))


def test_caffe_lrn_defaults_to_bvlc_when_the_file_has_no_parameters(tmp_path):
    from alexnet.caffe_proto import net_layers
    from alexnet.convert import _caffe_lrn

    layers, _ = net_layers(_caffemodel(_small_weights(), v1=False, lrn=None))
    cfg = _caffe_lrn(layers, tmp_path)
    assert (cfg.size, cfg.alpha, cfg.beta, cfg.k, cfg.form) == (5, 1e-4, 0.75, 1.0, "caffe")


def _refused(tmp_path, data: bytes, *extra: str) -> str:
    src = tmp_path / "bad.caffemodel"
    src.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        run_command("convert", "caffe", str(src), str(tmp_path / "out.safetensors"), *extra)
    message = str(e.value)
    assert "\n" not in message and not (tmp_path / "out.safetensors").exists()
    return message


def test_caffe_wrong_shape_is_refused(tmp_path):
    weights = _small_weights()
    weights["conv1"] = (np.zeros((96, 3, 11, 12), np.float32), np.zeros(96, np.float32))
    msg = _refused(tmp_path, _caffemodel(weights, v1=False))
    assert "conv1" in msg and "(96, 3, 11, 12)" in msg and "(96, 3, 11, 11)" in msg


def test_caffe_missing_layer_is_refused(tmp_path):
    layers = [layer for layer in BVLC_LAYERS if layer[0] != "fc8"]
    msg = _refused(tmp_path, _caffemodel(_small_weights(), v1=True, layers=layers))
    assert "no weights for layer fc8" in msg


def test_caffenet_order_is_refused(tmp_path):
    layers = list(BVLC_LAYERS)
    layers[2], layers[3] = layers[3], layers[2]  # conv1 -> relu1 -> pool1 -> norm1
    msg = _refused(tmp_path, _caffemodel(_small_weights(), v1=False, layers=layers))
    assert "CaffeNet" in msg


def test_caffe_average_pooling_is_refused(tmp_path):
    assert "pools by AVE" in _refused(tmp_path, _caffemodel(_small_weights(), v1=False, pool=1))


@pytest.mark.parametrize("v1", [False, True])
def test_caffe_network_other_than_bvlc_alexnet_is_refused(tmp_path, v1):
    """Same weighted layers and shapes, but a network that computes something else."""
    w = _small_weights()

    def refused(**kw):
        return _refused(tmp_path, _caffemodel(w, v1=v1, **kw))

    tanh = [(n, "TanH" if n == "relu6" else k) for n, k in BVLC_LAYERS]
    assert "a TanH layer 'relu6', which BVLC AlexNet has not" in refused(layers=tanh)
    no_relu = [layer for layer in BVLC_LAYERS if layer[0] != "relu3"]
    assert "not BVLC AlexNet's" in refused(layers=no_relu)
    if not v1:  # (V1 has no BatchNorm)
        bn = BVLC_LAYERS[:1] + [("bn1", "BatchNorm")] + BVLC_LAYERS[1:]
        assert "a BatchNorm layer 'bn1'" in refused(layers=bn)
    early = BVLC_LAYERS[:8] + [("prob0", "Softmax")] + BVLC_LAYERS[8:]
    assert "a Softmax layer 'prob0', before fc8" in refused(layers=early)
    pool_f, conv_f, relu_f, ip_f = (19, 10, 30, 17) if v1 else (121, 106, 123, 117)
    # pooling 2/2 gives the same 55 -> 27 -> 13 -> 6 sizes, so only the parameters tell
    msg = refused(extra={"pool2": _msg(pool_f, _int(2, 2) + _int(3, 2))})
    assert "layer 'pool2' has (kernel, stride, pad, global) = ((2, 2), (2, 2), (0, 0), False)" in msg
    assert "layer 'conv2' has" in refused(extra={"conv2": _msg(conv_f, _int(6, 2))})  # stride 2
    assert "layer 'conv3' has" in refused(extra={"conv3": _msg(conv_f, _int(5, 2))})  # two groups
    assert "leaky ReLU (negative slope 0.1" in refused(extra={"relu7": _msg(relu_f, _float(1, 0.1))})
    assert "'fc7' stores its weights transposed" in refused(extra={"fc7": _msg(ip_f, _int(6, 1))})
    swapped = [(("conv4" if n == "conv5" else "conv5" if n == "conv4" else n), k) for n, k in BVLC_LAYERS]
    assert "the weighted layers are conv1, conv2, conv3, conv5, conv4" in refused(layers=swapped)


def test_caffe_blob_with_an_impossible_shape_is_refused(tmp_path):
    """Dimensions whose product wraps around in int64 (2**32 * 2**32 = 0 would match 0 values)."""
    huge = _msg(7, _msg(1, _varint(2**32) + _varint(2**32)))  # a BlobProto: shape, no data
    extra_layer = _msg(100, [_msg(1, b"x"), _msg(2, b"Dropout"), _msg(7, huge)])
    msg = _refused(tmp_path, _caffemodel(_small_weights(), v1=False) + b"".join(extra_layer))
    assert "layer 'x': blob of shape (4294967296, 4294967296): a dimension is negative or past 2**31" in msg
    mean = tmp_path / "mean.binaryproto"
    mean.write_bytes(huge)
    from alexnet.convert import read_caffe_mean

    with pytest.raises(CheckpointError, match="not a Caffe mean file .*past 2"):
        read_caffe_mean(mean)


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc/self/mem (reading it fails)")
def test_caffe_file_that_cannot_be_read_is_one_line(tmp_path):
    for args in (["/proc/self/mem"], [str(tmp_path / "absent.caffemodel"), "--mean", "/proc/self/mem"]):
        with pytest.raises(CheckpointError, match="^cannot read /proc/self/mem: "):
            run_command("convert", "caffe", *args, str(tmp_path / "o.safetensors"))


def test_unpacked_floats_of_two_fields_in_turn_are_read_in_linear_time(monkeypatch):
    """Records of fields 5 and 6 alternating (a damaged or made-up file): each record's run
    is measured without scanning the whole rest of the message again."""
    import alexnet.caffe_proto as cp

    n = 4000
    rec = np.zeros((n, 5), np.uint8)
    rec[0::2, 0], rec[1::2, 0] = 5 << 3 | 5, 6 << 3 | 5
    rec[:, 1:] = np.arange(n, dtype="<f4").view(np.uint8).reshape(n, 4)
    data = rec.tobytes() + b"".join(_float(5, float(v)) for v in range(300))  # then a long run
    scanned = []
    real = cp.np.frombuffer

    def counting(buf, *a, **k):
        out = real(buf, *a, **k)
        scanned.append(out.nbytes)
        return out

    monkeypatch.setattr(cp.np, "frombuffer", counting)
    msg = cp.parse(data)
    assert sum(scanned) < 4 * len(data)  # the old count scanned ~n**2 / 2 records' bytes here
    five = np.frombuffer(b"".join(bytes(v) for _, v in msg[5]), "<f4")
    assert five.tolist() == list(range(0, n, 2)) + list(range(300))
    assert len(msg[6]) == n // 2


def test_truncated_and_random_caffemodels_are_refused(tmp_path):
    data = _caffemodel(_small_weights(), v1=False)
    assert "not a readable caffemodel" in _refused(tmp_path, data[:len(data) // 2])
    rng = np.random.default_rng(3)
    for _ in range(30):
        _refused(tmp_path, rng.bytes(int(rng.integers(1, 2000))))
    assert "is empty" in _refused(tmp_path, b"")
    with pytest.raises(CheckpointError, match="no caffemodel at"):
        run_command("convert", "caffe", str(tmp_path / "absent.caffemodel"), str(tmp_path / "o.safetensors"))


def test_bad_mean_file_is_refused(tmp_path):
    bad = tmp_path / "mean.binaryproto"
    bad.write_bytes(b"".join(_blob(np.zeros((1, 3, 100, 100), np.float32))))
    from alexnet.convert import read_caffe_mean

    with pytest.raises(CheckpointError, match="smaller than the 227x227 crop"):
        read_caffe_mean(bad)
    bad.write_bytes(b"\x0f\xff")
    with pytest.raises(CheckpointError, match="not a Caffe mean file"):
        read_caffe_mean(bad)


# --------------------------------------------------------------------- torchvision

def test_torchvision(tmp_path, image):
    torch.manual_seed(0)
    reference = plain_alexnet("owt", input_size=224).eval()  # torch's default init: real-sized logits
    state = reference.state_dict()
    src, out = tmp_path / "alexnet-owt-7be5be79.pth", tmp_path / "owt.safetensors"
    torch.save(state, src)
    assert run_command("convert", "torchvision", str(src), str(out)) == 0

    ck = load_model_file(out)
    assert ck.model_config.variant == "owt" and ck.model_config.input_size == 224
    assert ck.preprocess["crop"] == 224 and ck.preprocess["pixel_scale"] == 1.0
    assert ck.classes == imagenet_wnids()
    # torchvision's own preprocessing of the same 256x256 image: centre 224, x/255, normalise.
    x = torch.from_numpy(image).float()[None, :, 16:240, 16:240] / 255
    x = (x - torch.tensor(TV_MEAN).view(1, 3, 1, 1)) / torch.tensor(TV_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = reference(x)[0]
    _assert_logits_equal(_converted_logits(out, image), want)


@pytest.mark.parametrize("wrap", ["module.", pytest.param("features.module.", marks=pytest.mark.slow)])
def test_torchvision_weights_saved_inside_data_parallel(tmp_path, wrap):
    """DataParallel / DDP put every key under "module."; torchvision's training script
    wraps only the features, giving "features.module.N". Both convert as the bare dict."""
    state = plain_alexnet("owt", input_size=224).state_dict()
    if wrap == "module.":
        wrapped = {f"module.{k}": v for k, v in state.items()}
    else:
        wrapped = {k.replace("features.", "features.module.", 1): v for k, v in state.items()}
    assert set(wrapped) != set(state)
    torch.save(state, tmp_path / "bare.pth")
    torch.save(wrapped, tmp_path / "wrapped.pth")
    for name in ("bare", "wrapped"):
        assert run_command("convert", "torchvision", str(tmp_path / f"{name}.pth"),
                           str(tmp_path / f"{name}.safetensors")) == 0
    a, b = (load_model_file(tmp_path / f"{n}.safetensors").state_dict for n in ("bare", "wrapped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("key", ["state_dict", "model"])
def test_torchvision_state_dict_inside_a_training_checkpoint(tmp_path, key):
    from alexnet.convert import _load_pth

    state = {"features.0.weight": torch.ones(2)}
    torch.save({key: state, "epoch": 90}, tmp_path / "ck.pth")
    assert list(_load_pth(tmp_path / "ck.pth")) == ["features.0.weight"]


def test_torchvision_training_script_checkpoint_converts(tmp_path):
    """torchvision's references/classification/train.py saves {"model", "optimizer",
    "lr_scheduler", "epoch", "args"}, args an argparse.Namespace."""
    import argparse

    state = plain_alexnet("owt").state_dict()
    src = tmp_path / "checkpoint.pth"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]}, "epoch": 89,
                "args": argparse.Namespace(lr=0.01, model="alexnet", data_path="/data")}, src)
    assert run_command("convert", "torchvision", str(src), str(tmp_path / "out.safetensors")) == 0
    got = load_model_file(tmp_path / "out.safetensors").state_dict
    assert torch.equal(got["classifier.6.weight"], state["classifier.6.weight"])


def test_torchvision_state_dict_with_keys_that_are_not_names_is_refused(tmp_path):
    state = plain_alexnet("owt").state_dict()
    assert "does not hold a state dict of tensors" in _tv_refused(tmp_path, {**state, 0: torch.zeros(1)})
    assert "does not hold a state dict of tensors" in _tv_refused(tmp_path, {"model": {0: torch.zeros(1)}})


def _tv_refused(tmp_path, obj) -> str:
    src = tmp_path / "bad.pth"
    torch.save(obj, src)
    with pytest.raises(CheckpointError) as e:
        run_command("convert", "torchvision", str(src), str(tmp_path / "out.safetensors"))
    assert "\n" not in str(e.value) and not (tmp_path / "out.safetensors").exists()
    return str(e.value)


def test_torchvision_weights_with_a_nan_are_refused(tmp_path):
    state = plain_alexnet("owt").state_dict()
    state["features.3.weight"][0, 0, 0, 0] = float("nan")
    assert "features.3.weight holds 1 NaN or infinite value; nothing written" in _tv_refused(tmp_path, state)


def test_convert_never_writes_over_its_source(tmp_path, capsys):
    src = tmp_path / "alexnet.pth"
    torch.save(plain_alexnet("owt").state_dict(), src)
    before = src.read_bytes()
    os.link(src, tmp_path / "same.pth")
    for out in (src, tmp_path / "same.pth", tmp_path / "." / "alexnet.pth"):
        assert cli.main(["convert", "torchvision", str(src), str(out)]) == 2
        err = capsys.readouterr().err
        assert "is the input" in err and err.count("\n") == 1
    assert src.read_bytes() == before
    (tmp_path / "model.caffemodel").write_bytes(b"x")
    assert cli.main(["convert", "caffe", str(tmp_path / "model.caffemodel"), str(src), "--mean", str(src)]) == 2
    assert src.read_bytes() == before


def test_convert_writes_only_to_a_safetensors_name(tmp_path, capsys):
    src = tmp_path / "alexnet.pth"
    torch.save(plain_alexnet("owt").state_dict(), src)
    for out in ("owt.pth", "owt", "owt.st"):
        assert cli.main(["convert", "torchvision", str(src), str(tmp_path / out)]) == 2
        err = capsys.readouterr().err
        assert err == (f"alexnet: error: {tmp_path / out}: this writes a safetensors model file; give a name "
                       f"ending in .safetensors\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alexnet.pth"]


def test_a_write_failure_is_one_line(tmp_path, capsys):
    src = tmp_path / "alexnet.pth"
    torch.save(plain_alexnet("owt").state_dict(), src)
    assert cli.main(["convert", "torchvision", str(src), "/proc/self/owt.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alexnet: error: cannot write /proc/self/owt.safetensors: ") and err.count("\n") == 1


def test_torchvision_wrong_keys_and_shapes_are_refused(tmp_path):
    with torch.device("meta"):
        keys = list(plain_alexnet("owt").state_dict())
    tiny = {k: torch.zeros(1) for k in keys}
    assert "features.0.weight has shape (1,)" in _tv_refused(tmp_path, tiny)
    assert "missing classifier.6.bias" in _tv_refused(tmp_path, {k: v for k, v in tiny.items() if k != keys[-1]})
    assert "unexpected features.1.weight" in _tv_refused(tmp_path, {**tiny, "features.1.weight": torch.zeros(1)})
    assert "does not hold a state dict of tensors" in _tv_refused(tmp_path, [1, 2])
    shaped = plain_alexnet("owt").state_dict()
    bias = shaped["classifier.6.bias"]
    for odd, words in ((bias.to_sparse(), "classifier.6.bias is a sparse_coo tensor on cpu, expected a dense one"),
                       (torch.empty(bias.shape, device="meta"), "classifier.6.bias is a strided tensor on meta")):
        assert words in _tv_refused(tmp_path, {**shaped, "classifier.6.bias": odd})  # was load_state_dict's traceback


class _Payload:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_torchvision_pickle_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    src = tmp_path / "evil.pth"
    torch.save({"features.0.weight": torch.zeros(1), "extra": _Payload(marker)}, src)
    with zipfile.ZipFile(src) as z:  # the payload really is in the pickle
        pickled = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"system" in pickled
    with pytest.raises(CheckpointError, match="refused to load .*nothing that runs code.*: it would build the "
                                              "Python object (posix|os).system$") as e:
        run_command("convert", "torchvision", str(src), str(tmp_path / "out.safetensors"))
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()



def _pth_variants(tmp_path) -> dict:
    """Files named .pth that are not state dicts, by what convert should call them."""
    good = tmp_path / "good.pth"
    torch.save({"features.0.weight": torch.zeros(4)}, good)
    data = good.read_bytes()
    legacy = tmp_path / "legacy.pth"
    torch.save({"features.0.weight": torch.zeros(4)}, legacy, _use_new_zipfile_serialization=False)
    foreign = tmp_path / "foreign.pth"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("notes/readme.txt", "hello")
    script = tmp_path / "script.pth"
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; such files are still about
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(script))
    files = {"empty": b"", "text": b"not a torch file", "truncated zip": data[:len(data) // 2],
             "truncated pickle": legacy.read_bytes()[:-10], "cut pickle": legacy.read_bytes()[:40]}
    # one damaged field of the zip's headers each, which zipfile meets with errors of its own
    entry = data.index(b"PK\x01\x02")  # the first central-directory entry
    version, utf8, disks = bytearray(data), bytearray(data), bytearray(data)
    struct.pack_into("<H", version, entry + 6, 116)  # needs zip 11.6: NotImplementedError
    struct.pack_into("<H", utf8, entry + 8, struct.unpack_from("<H", utf8, entry + 8)[0] | 0x800)
    utf8[entry + 48] = 0xBF  # a name flagged UTF-8 that is not: UnicodeDecodeError
    struct.pack_into("<I", disks, disks.rindex(b"PK\x06\x07") + 16, 2)  # two disks: BadZipFile from is_zipfile
    files.update({"zip version": bytes(version), "zip name": bytes(utf8), "zip disks": bytes(disks)})
    out = {}
    for what, content in files.items():
        out[what] = tmp_path / f"{what.replace(' ', '-')}.pth"
        out[what].write_bytes(content)
    exported = tmp_path / "exported.pth"  # (alexnet export's .pt2, renamed)
    torch.export.save(torch.export.export(nn.Linear(2, 2), (torch.zeros(1, 2),)), str(exported))
    return {**out, "foreign zip": foreign, "TorchScript": script, "exported program": exported}


def test_damaged_and_foreign_pth_files_are_named_as_such(tmp_path, capsys):
    """Damage is not a refused pickle: each gets one line saying what the file is, and no
    warning of torch's before it."""
    words = {"empty": "is empty", "text": "is not a PyTorch file (neither a zip archive nor a pickle)",
             "truncated zip": "is truncated or damaged (a zip archive without its central directory)",
             "truncated pickle": "is truncated or damaged (unexpected EOF",
             "cut pickle": "is truncated or damaged (it ends early)",
             "foreign zip": "is a zip archive but not a PyTorch file",
             "TorchScript": "is a TorchScript archive, not a state dict",
             "zip version": "is a damaged zip archive (zip file version 11.6)",
             "zip name": "is a damaged zip archive ('utf-8' codec can't decode byte 0xbf",
             "zip disks": "is a damaged zip archive (zipfiles that span multiple disks are not supported)",
             "exported program": "is an exported program (torch.export), not a state dict"}
    files = _pth_variants(tmp_path)
    assert set(files) == set(words)
    for what, path in files.items():
        assert cli.main(["convert", "torchvision", str(path), str(tmp_path / "out.safetensors")]) == 2, what
        err = capsys.readouterr().err
        assert err.startswith(f"alexnet: error: {path} {words[what]}"), (what, err)
        assert err.count("\n") == 1 and "nothing that runs code" not in err, (what, err)
        assert not (tmp_path / "out.safetensors").exists()


def test_a_protocol_4_pickle_is_refused_as_such_without_torchs_warning(tmp_path, capsys):
    """torch's safe loader reads no protocol-4 pickle, harmless or not: the line says so
    (it used to read "Unsupported operand 149"), and a payload still never runs."""
    marker = tmp_path / "payload-ran"
    (tmp_path / "evil4.pth").write_bytes(pickle.dumps(_Payload(marker), protocol=4))
    torch.save({"features.0.weight": torch.zeros(2)}, tmp_path / "plain4.pth", pickle_protocol=4)
    for name in ("evil4.pth", "plain4.pth"):
        assert cli.main(["convert", "torchvision", str(tmp_path / name), str(tmp_path / "out.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"alexnet: error: refused to load {tmp_path / name}: its "
                                                       f"pickle is protocol 4, which torch's safe loader"), err
    assert not marker.exists()
    torch.save(nn.Linear(2, 2), tmp_path / "whole.pth")
    assert cli.main(["convert", "torchvision", str(tmp_path / "whole.pth"), str(tmp_path / "out.safetensors")]) == 2
    assert capsys.readouterr().err.endswith("torch.nn.modules.linear.Linear (a whole pickled model: torch.save "
                                            "its state_dict() instead)\n")
