"""Just enough of Caffe's protobuf files to read trained weights, without Caffe or protobuf.

A `.caffemodel` is a serialized `NetParameter` and a `.binaryproto` mean file a serialized
`BlobProto` (BVLC/caffe src/caffe/proto/caffe.proto). The protobuf wire format is a run
of (tag, value) pairs, tag = field number << 3 | wire type; this module decodes it into
{field number: [values]} one message at a time, with the float arrays read by numpy
straight from the file's bytes.

Field numbers used (caffe.proto):
  NetParameter      layer = 100 (LayerParameter), layers = 2 (V1LayerParameter, older files)
  LayerParameter    name = 1, type = 2 (string), blobs = 7, convolution_param = 106,
                    inner_product_param = 117, lrn_param = 118, pooling_param = 121,
                    relu_param = 123
  V1LayerParameter  name = 4, type = 5 (enum LayerType), blobs = 6, convolution_param = 10,
                    inner_product_param = 17, lrn_param = 18, pooling_param = 19,
                    relu_param = 30
  BlobProto         num, channels, height, width = 1..4 (legacy shape), data = 5 (float),
                    shape = 7 (BlobShape: dim = 1, int64), double_data = 8
  LRNParameter      local_size = 1, alpha = 2, beta = 3, norm_region = 4, k = 5
  PoolingParameter  pool = 1 (MAX = 0, AVE = 1, STOCHASTIC = 2), kernel_size = 2,
                    stride = 3, pad = 4, kernel_h/w = 5/6, stride_h/w = 7/8, pad_h/w = 9/10,
                    global_pooling = 12
  ConvolutionParameter  pad = 3, kernel_size = 4, group = 5, stride = 6, pad_h/w = 9/10,
                    kernel_h/w = 11/12, stride_h/w = 13/14, dilation = 18
  InnerProductParameter  axis = 5, transpose = 6
  ReLUParameter     negative_slope = 1
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import numpy as np

VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5

NET_LAYER, NET_LAYERS_V1 = 100, 2

# V1LayerParameter.LayerType's values, as the names that LayerParameter.type uses.
V1_TYPES = {1: "Accuracy", 2: "BNLL", 3: "Concat", 4: "Convolution", 5: "Data", 6: "Dropout",
            7: "EuclideanLoss", 8: "Flatten", 9: "HDF5Data", 10: "HDF5Output", 11: "Im2col",
            12: "ImageData", 13: "InfogainLoss", 14: "InnerProduct", 15: "LRN",
            16: "MultinomialLogisticLoss", 17: "Pooling", 18: "ReLU", 19: "Sigmoid", 20: "Softmax",
            21: "SoftmaxWithLoss", 22: "Split", 23: "TanH", 24: "WindowData", 25: "Eltwise",
            26: "Power", 27: "SigmoidCrossEntropyLoss", 28: "HingeLoss", 29: "MemoryData",
            30: "ArgMax", 31: "Threshold", 32: "DummyData", 33: "Slice", 34: "MVN", 35: "AbsVal",
            36: "Silence", 37: "ContrastiveLoss", 38: "Exp", 39: "Deconvolution"}

POOL_METHODS = {0: "MAX", 1: "AVE", 2: "STOCHASTIC"}


class ProtoError(ValueError):
    """Bytes that are not the protobuf message expected; the message says where."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ProtoError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ProtoError("varint longer than 10 bytes")


def _run_length(buf: memoryview, pos: int, tag_byte: int, width: int) -> int:
    """How many (tag_byte, value) records of a non-packed repeated fixed-width field follow
    one after another from `pos` (just after the first one-byte tag): counted with numpy
    rather than one Python step per value, in chunks that double, so that the work is
    proportional to the run (short runs of two fields in turn stay linear)."""
    rec = 1 + width
    n = (len(buf) - pos + 1) // rec  # whole records that fit, the one begun included
    if n <= 1 or buf[pos + width] != tag_byte:  # a single value: no numpy
        return 1
    count, chunk = 1, 64
    while count < n:
        m = min(n - count, chunk)
        start = pos - 1 + count * rec
        tags = np.frombuffer(buf[start:start + m * rec], dtype=np.uint8)[::rec]
        other = np.flatnonzero(tags != tag_byte)
        if other.size:
            return count + int(other[0])
        count, chunk = count + m, chunk * 2
    return count


def parse(buf: memoryview | bytes) -> dict[int, list[tuple[int, object]]]:
    """{field number: [(wire type, value)]}: ints for varints, memoryviews of the bytes
    for the others. A run of non-packed fixed-width values of one field becomes one
    entry holding their concatenated bytes (without the tags)."""
    buf = memoryview(buf)
    out: dict[int, list[tuple[int, object]]] = {}
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if num == 0:
            raise ProtoError(f"field number 0 at byte {start}")
        if wire == VARINT:
            value, pos = _varint(buf, pos)
        elif wire == BYTES:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ProtoError(f"field {num} claims {n} bytes at byte {start}, past the end")
            value, pos = buf[pos:pos + n], pos + n
        elif wire in (FIXED32, FIXED64):
            width = 4 if wire == FIXED32 else 8
            if pos + width > end:
                raise ProtoError(f"truncated field {num} at byte {start}")
            count = _run_length(buf, pos, key, width) if key < 0x80 else 1
            if count == 1:
                value, pos = buf[pos:pos + width], pos + width
            else:
                rec = 1 + width
                recs = np.frombuffer(buf[pos - 1:pos - 1 + count * rec], dtype=np.uint8).reshape(count, rec)
                value, pos = recs[:, 1:].tobytes(), pos - 1 + count * rec
        else:
            raise ProtoError(f"unsupported wire type {wire} for field {num} at byte {start}")
        out.setdefault(num, []).append((wire, value))
    return out


def floats(msg: dict, num: int, dtype: str = "<f4") -> np.ndarray:
    """A repeated float (or double, dtype '<f8') field, packed or not, as one array."""
    parts = []
    for wire, value in msg.get(num, []):
        if wire not in (BYTES, FIXED32 if dtype == "<f4" else FIXED64):
            raise ProtoError(f"field {num} has wire type {wire}, not a float array")
        if len(value) % np.dtype(dtype).itemsize:
            raise ProtoError(f"field {num} holds {len(value)} bytes, not whole numbers")
        parts.append(np.frombuffer(value, dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def ints(msg: dict, num: int) -> list[int]:
    """A repeated integer field, packed or not."""
    out = []
    for wire, value in msg.get(num, []):
        if wire == VARINT:
            out.append(value)
        elif wire == BYTES:
            pos, view = 0, memoryview(value)
            while pos < len(view):
                v, pos = _varint(view, pos)
                out.append(v)
        else:
            raise ProtoError(f"field {num} has wire type {wire}, not an integer")
    return out


def scalar(msg: dict, num: int, default):
    """The last value of an optional field (protobuf's rule), decoded by the default's
    type: float (fixed32), int (varint) or str (bytes)."""
    if num not in msg:
        return default
    wire, value = msg[num][-1]
    if isinstance(default, float) and wire == FIXED32:
        # float32 as the shortest decimal that reads back to it: a file's 1e-4 is 1e-4, not 9.99999974e-05
        return float(str(np.float32(struct.unpack("<f", bytes(value)[-4:])[0])))
    if isinstance(default, int) and wire == VARINT:
        return value
    if isinstance(default, str) and wire == BYTES:
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtoError(f"field {num} is not UTF-8 text") from None
    raise ProtoError(f"field {num} has wire type {wire}, not a {type(default).__name__}")


def message(msg: dict, num: int) -> dict | None:
    """An optional sub-message field, parsed; None when absent."""
    if num not in msg:
        return None
    wire, value = msg[num][-1]
    if wire != BYTES:
        raise ProtoError(f"field {num} has wire type {wire}, not a message")
    return parse(value)


def blob(buf: memoryview) -> np.ndarray:
    """A BlobProto as a float32 array of its shape (`shape` or legacy num/channels/height/width)."""
    msg = parse(buf)
    shape_msg = message(msg, 7)
    if shape_msg is not None:
        shape = tuple(ints(shape_msg, 1))
    else:
        shape = tuple(scalar(msg, n, 0) for n in (1, 2, 3, 4))
    data = floats(msg, 5)
    if data.size == 0 and 8 in msg:
        data = floats(msg, 8, "<f8")
    if any(d >= 2**31 for d in shape):  # (int64 dims: a negative one reads as a huge number)
        raise ProtoError(f"blob of shape {shape}: a dimension is negative or past 2**31")
    if data.size != math.prod(shape):  # Python ints: no wrap-around
        raise ProtoError(f"blob of shape {shape} holds {data.size} values")
    return np.array(data, dtype=np.float32).reshape(shape)  # a writable copy, off the file's bytes


@dataclass
class Layer:
    name: str
    type: str  # LayerParameter's type names ("Convolution", "LRN", ...), V1 enums translated
    blobs: list[np.ndarray] = field(default_factory=list)
    lrn: dict | None = None  # {"local_size", "alpha", "beta", "k", "norm_region"} when given
    pool: str | None = None  # "MAX", "AVE", ... for Pooling layers
    # the window of Convolution and Pooling layers: {"kernel", "stride", "pad"} as (h, w),
    # with "group" and "dilation" (h, w) for Convolution, "global" for Pooling
    window: dict | None = None
    relu_slope: float = 0.0  # ReLU's negative_slope
    transpose: bool = False  # InnerProduct's weights stored (in, out)
    axis: int = 1  # InnerProduct's first flattened axis


def _hw(msg: dict, both: int, h: int | None, w: int | None, default: int | None) -> tuple[int, int]:
    """A (height, width) pair given as one value, two values, or by its _h and _w fields
    (Caffe's ConvolutionParameter and PoolingParameter); None where it is missing."""
    if h is not None and (h in msg or w in msg):
        return scalar(msg, h, 0), scalar(msg, w, 0)
    values = ints(msg, both)
    if len(values) > 2:
        raise ProtoError(f"field {both} holds {len(values)} values, not one per spatial axis")
    if not values:
        return default, default
    return (values[0], values[-1])


def _window(msg: dict | None, conv: bool) -> dict:
    msg = msg or {}
    if conv:
        window = {"kernel": _hw(msg, 4, 11, 12, None), "stride": _hw(msg, 6, 13, 14, 1),
                  "pad": _hw(msg, 3, 9, 10, 0), "group": scalar(msg, 5, 1), "dilation": _hw(msg, 18, None, None, 1)}
    else:
        window = {"kernel": _hw(msg, 2, 5, 6, None), "stride": _hw(msg, 3, 7, 8, 1),
                  "pad": _hw(msg, 4, 9, 10, 0), "global": bool(scalar(msg, 12, 0))}
    return window


def net_layers(data: bytes | memoryview) -> tuple[list[Layer], str]:
    """The layers of a serialized NetParameter in file order, and which field held them
    ("layer" or "layers (V1)")."""
    net = parse(data)
    if NET_LAYER in net:
        entries, v1 = net[NET_LAYER], False
    elif NET_LAYERS_V1 in net:
        entries, v1 = net[NET_LAYERS_V1], True
    else:
        raise ProtoError("no layers in the file (neither NetParameter.layer nor .layers)")
    name_f, type_f, blobs_f, lrn_f, pool_f = (4, 5, 6, 18, 19) if v1 else (1, 2, 7, 118, 121)
    conv_f, ip_f, relu_f = (10, 17, 30) if v1 else (106, 117, 123)
    layers = []
    for wire, value in entries:
        if wire != BYTES:
            raise ProtoError("a layer entry is not a message")
        msg = parse(value)
        if v1:
            code = scalar(msg, type_f, 0)
            kind = V1_TYPES.get(code, f"V1 type {code}")
        else:
            kind = scalar(msg, type_f, "")
        layer = Layer(scalar(msg, name_f, ""), kind)
        for w, b in msg.get(blobs_f, []):
            if w != BYTES:
                raise ProtoError(f"layer {layer.name!r}: a blob entry is not a message")
            try:
                layer.blobs.append(blob(b))
            except ProtoError as e:
                raise ProtoError(f"layer {layer.name!r}: {e}") from None
        lrn = message(msg, lrn_f)
        if lrn is not None:
            layer.lrn = {"local_size": scalar(lrn, 1, 5), "alpha": scalar(lrn, 2, 1.0),
                         "beta": scalar(lrn, 3, 0.75), "k": scalar(lrn, 5, 1.0),
                         "norm_region": scalar(lrn, 4, 0)}
        if kind == "Pooling":
            pool = message(msg, pool_f)
            code = scalar(pool, 1, 0) if pool is not None else 0
            layer.pool = POOL_METHODS.get(code, str(code))
            layer.window = _window(pool, conv=False)
        elif kind == "Convolution":
            layer.window = _window(message(msg, conv_f), conv=True)
        elif kind == "ReLU":
            relu = message(msg, relu_f)
            layer.relu_slope = scalar(relu, 1, 0.0) if relu is not None else 0.0
        elif kind == "InnerProduct":
            ip = message(msg, ip_f) or {}
            layer.transpose, layer.axis = bool(scalar(ip, 6, 0)), scalar(ip, 5, 1)
        layers.append(layer)
    return layers, "layers (V1)" if v1 else "layer"
