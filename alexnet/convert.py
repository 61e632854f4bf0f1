"""Pretrained weights from elsewhere as this project's model files.

  caffe        BVLC AlexNet (`bvlc_alexnet.caffemodel`) -> the `paper` variant with Caffe's
               LRN form (k = 1, alpha divided by n), 227 input
  torchvision  `alexnet-owt-*.pth` -> the `owt` variant, 224 input

Each source's preprocessing is folded into the terms every model file uses (RGB pixels in
0..255, minus a mean image, divided by `pixel_scale`), so predict and evaluate treat a
converted file like one of our own:

  Caffe        BGR 0..255 minus a BGR mean: conv1's input channels are reversed to RGB,
               the mean becomes an RGB mean image.
  torchvision  (x/255 - mean) / std per channel = (x - 255 mean) / (255 std): the mean
               image is 255 * mean, and conv1's weights are divided by 255 * std per
               input channel (the same function up to float rounding).

The classes are the 1000 ILSVRC2012 WordNet ids in sorted order, which both sources use.
The PCA statistics (eigval, eigvec) are training-only; they are stored as zeros and the
identity.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from alexnet.caffe_proto import Layer, ProtoError, blob, net_layers
from alexnet.checkpoint import (CheckpointError, is_exported_program, is_torch_save_head, non_finite,
                                save_model)
from alexnet.config import ConfigError, LRNConfig
from alexnet.dataset import DataStats
from alexnet.fileio import check_writable, not_a_file, refuse_overwriting, require_suffix
from alexnet.model import AlexNet, build_model
from alexnet.progress import first_few

# The per-channel mean of ILSVRC2012's training images (ilsvrc_2012_mean.npy averaged over
# pixels, as Caffe's classification examples use it), in Caffe's B, G, R order.
CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)
# torchvision's ImageNet normalisation, applied to x / 255 in R, G, B order.
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)

IMAGE_SIZE = 256  # both sources centre-crop a 256-pixel image
CAFFE_WEIGHTED = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
# BVLC AlexNet's layers that compute, in order (conv -> relu -> LRN -> pool, as in the
# paper). CaffeNet pools before it normalises; `paper` cannot express that.
BVLC_SEQUENCE = ("Convolution", "ReLU", "LRN", "Pooling", "Convolution", "ReLU", "LRN", "Pooling",
                 "Convolution", "ReLU", "Convolution", "ReLU", "Convolution", "ReLU", "Pooling",
                 "InnerProduct", "ReLU", "InnerProduct", "ReLU", "InnerProduct")
# Layers that change nothing the converted network computes: inputs, dropout (Caffe's
# scales in training and passes everything at test time), plumbing, the flattening that
# fc6 does anyway; and, after fc8 only, the outputs (the converted network gives logits).
CAFFE_PASSIVE = {"Data", "ImageData", "MemoryData", "Input", "DummyData", "HDF5Data", "WindowData",
                 "Dropout", "Split", "Silence", "Flatten"}
CAFFE_OUTPUTS = {"Softmax", "SoftmaxWithLoss", "Accuracy", "ArgMax"}
# each convolution's (kernel, stride, pad, groups), and every pooling's (kernel, stride, pad)
BVLC_CONV = {"conv1": (11, 4, 0, 1), "conv2": (5, 1, 2, 2), "conv3": (3, 1, 1, 1), "conv4": (3, 1, 1, 2),
             "conv5": (3, 1, 1, 2)}
BVLC_POOL = (3, 2, 0)
# The LRN of bvlc_alexnet's deploy.prototxt, for files whose LRN layers carry no parameters.
BVLC_LRN = {"local_size": 5, "alpha": 1e-4, "beta": 0.75, "k": 1.0, "norm_region": 0}


def _classes() -> tuple[list[str], list[str]]:
    from alexnet.sources import imagenet_wnids, readable_names

    wnids = imagenet_wnids()
    return wnids, readable_names(wnids)


def _constant_mean(rgb: tuple[float, float, float], size: int = IMAGE_SIZE) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, size, size).contiguous()


def _stats(mean_image: torch.Tensor) -> DataStats:
    return DataStats(mean_image, torch.zeros(3), torch.eye(3))


def _save(out: str | Path, model: AlexNet, mean_image: torch.Tensor, source: dict) -> None:
    broken = non_finite({**model.state_dict(), "mean_image": mean_image})
    if broken:
        raise CheckpointError(f"the weights are broken: {broken}; nothing written")
    classes, names = _classes()
    preprocess = {"image_size": int(mean_image.shape[-1]), "crop": model.cfg.input_size,
                  "pixel_scale": 1.0, "mean": "mean_image"}
    save_model(out, model, classes, _stats(mean_image), preprocess,
               extra={"source": source, "class_names": names})


def _uninitialised(variant: str, **overrides) -> AlexNet:
    """The network with storage but no initialisation: every parameter is about to be
    overwritten, and drawing 61M random numbers first would only cost time."""
    with torch.device("meta"):
        model = build_model(variant, **overrides)
    return model.to_empty(device="cpu")


def _check_output(out: str | Path, *inputs) -> None:
    """Before any work: `out` can be written, is none of the inputs, and is named as what
    is written."""
    check_writable(out, "model.safetensors")
    refuse_overwriting(out, *inputs)
    require_suffix(out, "a safetensors model file", ".safetensors")


def _read(path: str | Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(not_a_file(path, what))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not data:
        raise CheckpointError(f"{path} is empty")
    return data


# --------------------------------------------------------------------------------- Caffe

def _shape_fits(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """V1 files store fc weights as (1, 1, out, in) and biases as (1, 1, 1, n)."""
    def strip(s):
        s = list(s)
        while len(s) > 1 and s[0] == 1:
            s.pop(0)
        return tuple(s)

    return strip(got) == strip(want)


def _check_caffe_layers(layers: list[Layer], path: Path) -> dict[str, Layer]:
    """The file's network is BVLC AlexNet's: the same layers in the same order, with the
    same windows, weights for each weighted layer, and nothing else that computes."""
    by_name = {layer.name: layer for layer in layers}
    missing = [n for n in CAFFE_WEIGHTED if n not in by_name or not by_name[n].blobs]
    if missing:
        raise CheckpointError(f"{path} is not BVLC AlexNet: no weights for layer{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(missing)}")
    fc8 = next((i for i, layer in enumerate(layers) if layer.name == "fc8"), len(layers))
    for i, layer in enumerate(layers):
        if layer.type in BVLC_SEQUENCE or layer.type in CAFFE_PASSIVE or (layer.type in CAFFE_OUTPUTS and i > fc8):
            continue
        where = "before fc8" if layer.type in CAFFE_OUTPUTS else "which BVLC AlexNet has not"
        raise CheckpointError(f"{path} is not BVLC AlexNet: it has a {layer.type} layer {layer.name!r}, {where}")
    computing = [layer for layer in layers if layer.type in BVLC_SEQUENCE]
    sequence = tuple(layer.type for layer in computing)
    if sequence != BVLC_SEQUENCE:
        if sequence[:4] == ("Convolution", "ReLU", "Pooling", "LRN"):
            raise CheckpointError(f"{path} pools before it normalises (CaffeNet, bvlc_reference_caffenet); "
                                  "only BVLC AlexNet's conv -> LRN -> pool order can be converted")
        raise CheckpointError(f"{path} has the layers {' -> '.join(sequence)}, not BVLC AlexNet's "
                              f"{' -> '.join(BVLC_SEQUENCE)}")
    weighted = tuple(layer.name for layer in computing if layer.type in ("Convolution", "InnerProduct"))
    if weighted != CAFFE_WEIGHTED:
        raise CheckpointError(f"{path}: the weighted layers are {', '.join(weighted)} in that order, not "
                              f"{', '.join(CAFFE_WEIGHTED)}")
    for layer in computing:
        w, what = layer.window, None
        if layer.type == "Pooling" and layer.pool != "MAX":
            raise CheckpointError(f"{path}: layer {layer.name!r} pools by {layer.pool}, not MAX")
        if layer.type == "Pooling":
            got = (w["kernel"], w["stride"], w["pad"], w["global"])
            want = tuple((v, v) for v in BVLC_POOL) + (False,)
            what = "(kernel, stride, pad, global)"
        elif layer.type == "Convolution":
            got = (w["kernel"], w["stride"], w["pad"], w["group"], w["dilation"])
            k, st, pad, groups = BVLC_CONV[layer.name]
            want = ((k, k), (st, st), (pad, pad), groups, (1, 1))
            what = "(kernel, stride, pad, groups, dilation)"
        elif layer.type == "ReLU" and layer.relu_slope != 0:
            raise CheckpointError(f"{path}: layer {layer.name!r} is a leaky ReLU (negative slope "
                                  f"{layer.relu_slope}), not BVLC AlexNet's")
        elif layer.type == "InnerProduct" and (layer.transpose or layer.axis != 1):
            raise CheckpointError(f"{path}: layer {layer.name!r} stores its weights transposed or flattens "
                                  f"from axis {layer.axis}; BVLC AlexNet's are (out, in) from axis 1")
        if what and got != want:
            raise CheckpointError(f"{path}: layer {layer.name!r} has {what} = {got}, BVLC AlexNet's are {want}")
    return by_name


def _caffe_lrn(layers: list[Layer], path: Path) -> LRNConfig:
    params = [layer.lrn or BVLC_LRN for layer in layers if layer.type == "LRN"]
    if any(p != params[0] for p in params[1:]):
        raise CheckpointError(f"{path}: the LRN layers differ ({params}); the paper network has one LRN setting")
    p = params[0]
    if p["norm_region"] != 0:
        raise CheckpointError(f"{path}: LRN normalises within channels; only ACROSS_CHANNELS can be converted")
    try:
        return LRNConfig(size=p["local_size"], alpha=p["alpha"], beta=p["beta"], k=p["k"], form="caffe")
    except ConfigError as e:
        raise CheckpointError(f"{path}: unusable LRN parameters: {e}") from None


def read_caffe_mean(path: str | Path) -> torch.Tensor:
    """A Caffe mean file (BlobProto, (1, 3, S, S) BGR) as a (3, S, S) RGB mean image."""
    path = Path(path)
    try:
        mean = blob(memoryview(_read(path, "mean file")))
    except ProtoError as e:
        raise CheckpointError(f"{path} is not a Caffe mean file (BlobProto): {e}") from None
    if mean.ndim == 4 and mean.shape[0] == 1:
        mean = mean[0]
    if mean.ndim != 3 or mean.shape[0] != 3 or mean.shape[1] != mean.shape[2]:
        raise CheckpointError(f"{path}: the mean has shape {mean.shape}, not (1, 3, S, S)")
    if mean.shape[1] < 227:
        raise CheckpointError(f"{path}: the mean image is {mean.shape[1]}x{mean.shape[2]}, smaller than the "
                              "227x227 crop")
    return torch.from_numpy(mean[::-1].copy())


def convert_caffe(src: str | Path, out: str | Path, mean: str | Path | None = None) -> AlexNet:
    """BVLC AlexNet's caffemodel as a `paper` model file at `out`; returns the network."""
    src = Path(src)
    _check_output(out, src, mean)
    if mean is None:
        mean_image, mean_source = _constant_mean(CAFFE_MEAN_BGR[::-1]), f"per-channel BGR {CAFFE_MEAN_BGR}"
    else:
        mean_image, mean_source = read_caffe_mean(mean), Path(mean).name
    try:
        layers, field = net_layers(_read(src, "caffemodel"))
    except ProtoError as e:
        raise CheckpointError(f"{src} is not a readable caffemodel (NetParameter): {e}") from None
    by_name = _check_caffe_layers(layers, src)
    # Caffe's dropout scales in training and passes everything at test time
    model = _uninitialised("paper", input_size=227, lrn=_caffe_lrn(layers, src), dropout_form="inverted")
    for name in CAFFE_WEIGHTED:
        module, blobs = model.layer(name), by_name[name].blobs
        if len(blobs) != 2:
            raise CheckpointError(f"{src}: layer {name} has {len(blobs)} blobs, not 2 (weights and bias)")
        for param, b in zip((module.weight, module.bias), blobs):
            if not _shape_fits(b.shape, tuple(param.shape)):
                raise CheckpointError(f"{src}: layer {name} has a blob of shape {b.shape}, "
                                      f"expected {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(torch.from_numpy(b.reshape(param.shape)))
    with torch.no_grad():
        conv1 = model.layer("conv1").weight
        conv1.copy_(conv1.flip(1))  # B, G, R input channels -> R, G, B
    _save(out, model, mean_image, {"file": src.name, "format": f"caffe NetParameter.{field}",
                                   "mean": mean_source})
    return model


# --------------------------------------------------------------------------- torchvision

def _why_refused(e: Exception) -> str:
    """torch.load's refusal in a few words: the object the file would have built, when it
    names one, else the first sentence (its message is a page of advice with colours)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if found:
        return f"it would build the Python object {found.group(1)}"
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    if found:
        return found.group(1).strip().rstrip(".")
    first = (text.strip().splitlines() or [type(e).__name__])[0]
    return first.split(". ")[0].rstrip(".")


def _check_pth_container(path: Path) -> None:
    """A CheckpointError saying what `path` is, unless it looks like a file of torch.save:
    a zip archive holding a data.pkl, or a legacy pickle. Damage and foreign files are
    told apart from refused pickles, whose message is about code that would run."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not head:
        raise CheckpointError(f"{path} is empty")
    try:
        is_zip = zipfile.is_zipfile(path)
        if is_zip:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
    # (zipfile's words for damaged headers: another version, a name not UTF-8, several disks)
    except (zipfile.BadZipFile, NotImplementedError, UnicodeDecodeError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is a damaged zip archive ({e})") from None
    if is_zip:
        if is_exported_program(path, names):
            raise CheckpointError(f"{path} is an exported program (torch.export), not a state dict; it runs "
                                  f"without alexnet, and the .safetensors model file it was exported from is "
                                  f"already alexnet's")
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            raise CheckpointError(f"{path} is a TorchScript archive, not a state dict; save the scripted "
                                  f"module's state_dict() with torch.save and convert that")
        if not any(n.endswith("data.pkl") for n in names):
            raise CheckpointError(f"{path} is a zip archive but not a PyTorch file (it has no data.pkl)")
    elif not is_torch_save_head(head):
        raise CheckpointError(f"{path} is not a PyTorch file (neither a zip archive nor a pickle)")
    elif head.startswith(b"PK"):
        raise CheckpointError(f"{path} is truncated or damaged (a zip archive without its central directory)")


def _load_pth(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(not_a_file(path, ".pth file"))
    _check_pth_container(path)
    try:
        with warnings.catch_warnings(record=True) as said:  # torch's warnings: told in our own line
            warnings.simplefilter("always")
            # torchvision's training script saves its command line beside the weights as an
            # argparse.Namespace: a bag of attributes, safe to build
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = _why_refused(e)
        protocol = next((m.group(1) for w in said
                         if (m := re.search(r"Detected pickle protocol (\d+)", str(w.message)))), None)
        if protocol is not None and why.startswith("Unsupported operand"):
            raise CheckpointError(f"refused to load {path}: its pickle is protocol {protocol}, which torch's "
                                  f"safe loader (weights_only) cannot read; if you trust the file, load it with "
                                  f"weights_only=False and torch.save its state dict again (default protocol)") from None
        if isinstance(e, pickle.UnpicklingError) or why.startswith("it would build"):
            if "torch.nn.modules." in why:
                why += " (a whole pickled model: torch.save its state_dict() instead)"
            raise CheckpointError(f"refused to load {path} (only plain tensors are accepted, nothing that runs "
                                  f"code): {why}") from None
        # the rest is damage past a well-formed start (EOFError, torch's RuntimeErrors, ...)
        why = "it ends early" if isinstance(e, EOFError) else why
        raise CheckpointError(f"{path} is truncated or damaged ({why})") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if (not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values())
            or not all(isinstance(k, str) for k in obj)):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return _without_parallel_prefixes(obj)


def _without_parallel_prefixes(state: dict) -> dict:
    """Keys as the bare network has them. A network saved inside nn.DataParallel or DDP
    has every key under "module."; torchvision's ImageNet training script wraps only
    AlexNet's features, so theirs are "features.module.N"."""
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return {("features." + k[len("features.module."):] if k.startswith("features.module.") else k): v
            for k, v in state.items()}


def convert_torchvision(src: str | Path, out: str | Path) -> AlexNet:
    """torchvision's AlexNet weights as an `owt` model file at `out`; returns the network."""
    src = Path(src)
    _check_output(out, src)
    state = _load_pth(src)
    model = _uninitialised("owt", dropout_form="inverted")  # torchvision trained with nn.Dropout
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        parts = [f"{what} {first_few(keys, 4)}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"{src} is not torchvision's AlexNet: {'; '.join(parts)}")
    for k, v in want.items():
        t = state[k]
        if tuple(t.shape) != tuple(v.shape) or not t.is_floating_point():
            raise CheckpointError(f"{src}: {k} has shape {tuple(t.shape)} ({t.dtype}), "
                                  f"expected {tuple(v.shape)} floating point")
        if t.layout is not torch.strided or t.device.type != "cpu":  # sparse, or meta: no values to copy
            raise CheckpointError(f"{src}: {k} is a {str(t.layout).removeprefix('torch.')} tensor on "
                                  f"{t.device.type}, expected a dense one with its values")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    std = torch.tensor(TORCHVISION_STD, dtype=torch.float64) * 255
    with torch.no_grad():
        conv1 = model.layer("conv1").weight
        conv1.copy_((conv1.double() / std.view(1, 3, 1, 1)).float())
    mean_image = _constant_mean(tuple(255 * m for m in TORCHVISION_MEAN))
    _save(out, model, mean_image, {"file": src.name, "format": "torchvision state dict"})
    return model


# ----------------------------------------------------------------------------------- CLI

def _cmd_caffe(args: argparse.Namespace) -> int:
    convert_caffe(args.src, args.out, args.mean)
    print(f"wrote {args.out} (paper variant, Caffe LRN, 227 input, from {args.src})")
    return 0


def _cmd_torchvision(args: argparse.Namespace) -> int:
    convert_torchvision(args.src, args.out)
    print(f"wrote {args.out} (owt variant, 224 input, from {args.src})")
    return 0


def add_command(sub) -> None:
    """`alexnet convert caffe|torchvision SRC OUT`."""
    from alexnet.cli import _out_path, _path

    p = sub.add_parser("convert", help="import pretrained weights (Caffe, torchvision) as a model file",
                       description="Convert pretrained AlexNet weights into a .safetensors model file that "
                                   "predict and evaluate use as they are, with the source's preprocessing "
                                   "folded in. Nothing in the source is executed.")
    kinds = p.add_subparsers(dest="source", metavar="SOURCE")
    kinds.required = True
    c = kinds.add_parser("caffe", help="BVLC AlexNet (bvlc_alexnet.caffemodel)",
                         description="Read a Caffe NetParameter (new 'layer' or V1 'layers' files) with BVLC "
                                     "AlexNet's layers into the paper variant (Caffe's LRN, 227 input).")
    c.add_argument("src", metavar="FILE.caffemodel", type=_path)
    c.add_argument("out", metavar="OUT", type=_out_path, help="model file to write (.safetensors)")
    c.add_argument("--mean", metavar="MEAN.binaryproto", type=_path,
                   help="Caffe mean image (ilsvrc_2012_mean.binaryproto); default the per-channel "
                        "BVLC mean (B, G, R) = (104, 117, 123)")
    c.set_defaults(func=_cmd_caffe)
    t = kinds.add_parser("torchvision", help="torchvision's alexnet weights (alexnet-owt-*.pth)",
                         description="Read torchvision's AlexNet state dict (tensors only, weights_only "
                                     "unpickling) into the owt variant (224 input).")
    t.add_argument("src", metavar="FILE.pth", type=_path)
    t.add_argument("out", metavar="OUT", type=_out_path, help="model file to write (.safetensors)")
    t.set_defaults(func=_cmd_torchvision)
