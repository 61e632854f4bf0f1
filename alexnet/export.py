"""Export a model file for serving without this package: ONNX, run by onnxruntime, or a
torch.export program (.pt2), run by PyTorch alone (torch.export.load) or compiled ahead of
time for C++ (AOTInductor).

The graph takes `images` (N, 3, crop, crop) float32: the centre crops' RGB pixels in
0..255 (shorter side to image_size, the central square, its centre crop). It subtracts the
mean image's own centre crop (a constant of the graph) and divides by pixel_scale, as
`augment.EvalTransform` does, so that a server needs nothing of the training data; it
returns `logits` and `probabilities` (softmax of the logits), both (N, num_classes); N is a
dynamic axis. The class names, the preprocessing and the model config ride along as JSON
strings under `alexnet.*` keys: in the ONNX model's metadata_props, and as extra files of
the .pt2 archive.

The exporter is torch.onnx's TorchScript-based one (`dynamo=False`): it needs no packages
beyond onnx and gives the batch axis from `dynamic_axes`. Our LRN (a C kernel behind an
autograd.Function) is swapped for one that exports as ONNX's own LRN operator, which is
Caffe's form: alpha there is alpha_sum * size; torch.export traces the same function's
forward, F.local_response_norm, into plain aten operations. Before anything is written,
the exported program is loaded back and run on a random batch (by onnxruntime, or by
torch.export.load) and its outputs are compared with the PyTorch model's.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from alexnet.checkpoint import Checkpoint
from alexnet.config import LRNConfig
from alexnet.lrn import LocalResponseNorm
from alexnet.model import AlexNet

FORMATS = ("onnx", "pt2")
ENGINES = {"onnx": "onnxruntime", "pt2": "torch.export.load"}
MAX_BATCH = 65536  # the dynamic batch axis of the .pt2 program: 1 .. MAX_BATCH
OPSET = 17  # LRN, Conv (grouped), MaxPool, Gemm, Softmax on the last axis: all in onnxruntime's CPU kernels
# Largest |onnxruntime - PyTorch| accepted, relative to the largest |logit|: float32 convolutions
# summed in another order differ by ~1e-6 of the scale; a wrong LRN or layer by far more.
REL_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported graph does not compute what the PyTorch model does."""


class _LRNFunction(torch.autograd.Function):
    """Local response norm that the ONNX exporter writes as one LRN node."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha_sum: float, beta: float, k: float) -> torch.Tensor:
        return F.local_response_norm(x, size, alpha=alpha_sum * size, beta=beta, k=k)  # Caffe's form

    @staticmethod
    def symbolic(g, x, size: int, alpha_sum: float, beta: float, k: float):
        return g.op("LRN", x, size_i=size, alpha_f=alpha_sum * size, beta_f=beta, bias_f=k)


class ExportLRN(nn.Module):
    def __init__(self, cfg: LRNConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        return _LRNFunction.apply(x, c.size, c.alpha_sum, c.beta, c.k)


class Serving(nn.Module):
    """The network in eval mode with exportable layers, behind the last step of its
    preprocessing: takes centre crops in 0..255 (N, 3, crop, crop), subtracts `mean_crop`
    (3, crop, crop; None: nothing) and divides by `pixel_scale`; returns (logits,
    probabilities)."""

    def __init__(self, model: nn.Module, mean_crop: torch.Tensor | None = None, pixel_scale: float = 1.0):
        super().__init__()
        net = copy.deepcopy(model).eval()
        net.fuse = False  # the fused ReLU-LRN-pool kernel is opaque to exporters
        for i, m in enumerate(net.features):
            if isinstance(m, LocalResponseNorm):
                net.features[i] = ExportLRN(m.cfg)
        self.net = net
        s = model.cfg.input_size
        mean = torch.zeros(3, s, s) if mean_crop is None else mean_crop.detach().float().cpu().clone()
        if tuple(mean.shape) != (3, s, s):
            raise ValueError(f"the mean crop is {tuple(mean.shape)}, not (3, {s}, {s})")
        self.register_buffer("mean_crop", mean[None])
        self.inv_scale = 1.0 / float(pixel_scale)  # (EvalTransform multiplies by it too)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images - self.mean_crop
        if self.inv_scale != 1.0:
            x = x * self.inv_scale
        logits = self.net(x)  # (N, num_classes)
        return logits, torch.softmax(logits, dim=1)


def eval_transform(ck: Checkpoint, model: AlexNet):
    """`ck`'s test preprocessing (`augment.EvalTransform`: its mean image, pixel_scale), or
    None for a checkpoint without a mean image."""
    from alexnet.augment import EvalTransform

    if ck.stats is None:
        return None
    return EvalTransform(ck.stats, model.cfg.input_size, scale=float(ck.preprocess.get("pixel_scale", 1.0)))


def serving(ck: Checkpoint, model: AlexNet) -> Serving:
    """`model` (built from `ck`) behind `ck`'s mean image and pixel_scale."""
    transform = eval_transform(ck, model)
    return Serving(model, None if transform is None else transform.mean_crops,
                   float(ck.preprocess.get("pixel_scale", 1.0)))


def metadata(ck: Checkpoint) -> dict[str, str]:
    """What a server needs besides the graph, as JSON strings: the sizes to resize and crop
    the image to (the mean image and pixel_scale are inside the graph)."""
    from alexnet.sources import readable_names

    pre = dict(ck.preprocess)
    pre.setdefault("crop", ck.model_config.input_size)
    pre.setdefault("pixel_scale", 1.0)
    pre["layout"] = ("NCHW, RGB, float32 pixels in 0..255: shorter side to image_size, central square, "
                     "centre crop of side crop; the graph subtracts the mean image and divides by "
                     "pixel_scale itself")
    return {
        "alexnet.classes": json.dumps(list(ck.classes)),
        "alexnet.class_names": json.dumps(list(ck.extra.get("class_names") or readable_names(ck.classes))),
        "alexnet.preprocess": json.dumps(pre),
        "alexnet.model_config": json.dumps({"variant": ck.model_config.variant,
                                            "num_classes": ck.model_config.num_classes,
                                            "input_size": ck.model_config.input_size}),
    }


def to_onnx(ck: Checkpoint, model: AlexNet) -> bytes:
    """The serialized ONNX model of `model` (built from `ck`), with `ck`'s metadata, checked
    by onnx's checker."""
    import warnings

    import onnx

    program = serving(ck, model)
    s = ck.model_config.input_size
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(program, (torch.zeros(2, 3, s, s),), buf, dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=["logits", "probabilities"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"},
                                        "probabilities": {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    for key, value in metadata(ck).items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "alexnet"
    data = proto.SerializeToString()
    onnx.checker.check_model(data)
    return data


def to_pt2(ck: Checkpoint, model: AlexNet) -> bytes:
    """The torch.export program of `model` (built from `ck`) with a dynamic batch, saved as a
    .pt2 archive holding `ck`'s metadata as extra files."""
    s = ck.model_config.input_size
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    program = torch.export.export(serving(ck, model), (torch.zeros(2, 3, s, s),),
                                  dynamic_shapes={"images": {0: batch}})
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files=metadata(ck))
    return buf.getvalue()


def load_pt2(data: bytes | str | Path) -> tuple[nn.Module, dict[str, str]]:
    """A .pt2 archive written by `to_pt2` (bytes or a path): the callable module
    (images -> (logits, probabilities)) and the `alexnet.*` metadata."""
    meta = {key: "" for key in ("alexnet.classes", "alexnet.class_names", "alexnet.preprocess",
                                "alexnet.model_config")}
    source = io.BytesIO(data) if isinstance(data, bytes) else str(data)
    program = torch.export.load(source, extra_files=meta)
    return program.module(), meta


def compare(model: AlexNet, data: bytes, fmt: str, transform, batch: int = 2, seed: int = 0) -> float:
    """max |exported - PyTorch| over the logits of a random batch, divided by max |logit|;
    the exported program (`fmt`) is run by its own engine (ENGINES) on the images' centre
    crops, PyTorch's `model` on what `transform` (the checkpoint's `EvalTransform`) makes
    of the same images."""
    from alexnet.augment import center_crop

    model = model.eval()
    size = transform.size
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    x = center_crop(images, transform.crop).float().contiguous()
    with torch.inference_mode():
        ref = model(transform(images))
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
    else:
        module, _ = load_pt2(data)
        with torch.inference_mode():
            logits = module(x)[0]
    return float((logits - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def export_checkpoint(checkpoint: str | Path, out: str | Path, fmt: str = "onnx") -> float:
    """Write `checkpoint` to `out` as `fmt`; returns the relative difference measured by
    `compare`. Nothing is written unless it is within REL_TOLERANCE."""
    from alexnet.checkpoint import CheckpointError, check_preprocess_fits, load_model_file
    from alexnet.cli import UserError
    from alexnet.fileio import atomic_write, check_writable, refuse_overwriting, require_suffix

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise UserError(f"export to onnx needs onnx and onnxruntime ({e.name} is missing): "
                            "pip install 'alexnet[export]'") from None
    check_writable(out, example="model.onnx")
    out = Path(out)
    refuse_overwriting(out, checkpoint)
    require_suffix(out, "an ONNX graph (.onnx) or a torch.export program (.pt2)", ".onnx", ".pt2")
    require_suffix(out, {"onnx": "an ONNX graph", "pt2": "a torch.export program"}[fmt], f".{fmt}")
    ck = load_model_file(checkpoint)
    if ck.stats is None:  # (the graph subtracts the mean image itself)
        raise CheckpointError(f"{checkpoint} has no data statistics (mean image); it cannot preprocess images")
    check_preprocess_fits(checkpoint, ck.model_config, ck.stats, ck.preprocess)
    model = ck.build_model().eval()
    data = to_onnx(ck, model) if fmt == "onnx" else to_pt2(ck, model)
    diff = compare(model, data, fmt, eval_transform(ck, model))
    if not diff <= REL_TOLERANCE:  # NaN included
        raise ExportError(f"{ENGINES[fmt]}'s logits differ from PyTorch's by {diff:.2e} of their scale "
                          f"(more than {REL_TOLERANCE:.0e}); nothing written")
    atomic_write(out, lambda f: f.write(data))  # a failure: fileio.WriteError, one line
    return diff


def format_for(out: str | Path, fmt: str | None) -> str:
    """The export format: `fmt`, else from OUT's suffix (.pt2: pt2), else onnx (and
    `export_checkpoint` refuses an OUT that does not end in the format's suffix)."""
    return fmt or ("pt2" if Path(out).suffix.lower() == ".pt2" else "onnx")


def _cmd_export(args: argparse.Namespace) -> int:
    args.format = format_for(args.out, args.format)
    diff = export_checkpoint(args.checkpoint, args.out, args.format)
    size_mb = Path(args.out).stat().st_size / 1e6
    print(f"wrote {args.out} ({args.format}, {size_mb:.1f} MB, dynamic batch); {ENGINES[args.format]} vs "
          f"PyTorch: max |difference| {diff:.1e} of the largest logit")
    return 0


def add_command(sub) -> None:
    from alexnet.cli import _out_path, _path

    p = sub.add_parser("export", help="write a checkpoint as an ONNX graph or a torch.export program",
                       description="Export a model file as ONNX for onnxruntime, or as a torch.export "
                                   "program (.pt2) for torch.export.load and AOTInductor, with a dynamic "
                                   "batch: input `images` (N, 3, crop, crop), the centre crops' pixels in "
                                   "0..255 (the graph subtracts the mean image), outputs `logits` "
                                   "and `probabilities`; class names and preprocessing in the metadata. "
                                   "The program is run by its engine and compared with PyTorch "
                                   "before it is written.")
    p.add_argument("checkpoint", type=_path, help="a .safetensors model file (e.g. RUN/best.safetensors)")
    p.add_argument("out", metavar="OUT", type=_out_path, help="file to write, ending in .onnx or .pt2, which decides the format")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="onnx (needs the export extra) or pt2 (torch.export; needs only torch); it must "
                        "agree with OUT's extension")
    p.set_defaults(func=_cmd_export)
