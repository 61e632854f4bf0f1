"""The layer table: type, kernel/stride/padding/groups, output shape, parameters and MACs
of every layer, as in the source articles' tables but measured from the module itself.

MACs count the multiply-accumulates of convolutions and fully-connected layers for one
image; ReLU, LRN, pooling and dropout are listed with 0 (they are not multiply-adds).
"""

from __future__ import annotations

import torch
from torch import nn

from alexnet.lrn import LocalResponseNorm
from alexnet.model import AlexNet, build_model


def _describe(m: nn.Module) -> tuple[str, str]:
    if isinstance(m, nn.Conv2d):
        k, s, p = m.kernel_size[0], m.stride[0], m.padding[0]
        g = f" g{m.groups}" if m.groups > 1 else ""
        return "Conv2d", f"{m.out_channels}x{k}x{k}/{s} p{p}{g}"
    if isinstance(m, nn.Linear):
        return "Linear", f"{m.in_features}->{m.out_features}"
    if isinstance(m, nn.MaxPool2d):
        return "MaxPool2d", f"{m.kernel_size}x{m.kernel_size}/{m.stride}"
    if isinstance(m, LocalResponseNorm):
        c = m.cfg
        return "LRN", f"n={c.size} k={c.k:g} a={c.alpha:g} b={c.beta:g} {c.form}"
    if isinstance(m, nn.Dropout):
        return "Dropout", f"p={m.p:g} {getattr(m, 'form', 'inverted')}"
    if isinstance(m, nn.BatchNorm2d):
        return "BatchNorm2d", f"{m.num_features}"
    return type(m).__name__, ""


def _macs(m: nn.Module, out: torch.Tensor) -> int:
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return out[0].numel() * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, nn.Linear):
        return m.in_features * m.out_features
    return 0


def layer_table(model: AlexNet) -> dict:
    """Rows for every layer of `model` from one forward pass of a single image, on the
    model's own device (a model on the meta device costs no memory: `summary_table`)."""
    rows: list[dict] = []
    s = model.cfg.input_size
    x = torch.zeros(1, 3, s, s, device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i, (name, m) in enumerate(model.named_layers()):
            if i == len(model.features):  # the classifier's first layer takes the flattened maps
                x = torch.flatten(x, 1)
            x = m(x)
            kind, spec = _describe(m)
            rows.append({
                "name": name,
                "type": kind,
                "spec": spec,
                "output": list(x.shape[1:]),
                "params": sum(p.numel() for p in m.parameters()),
                "macs": _macs(m, x),
            })
    model.train(was_training)
    cfg = model.cfg
    input_note = ("227x227, conv1 padding 0" if s == 227 else "224x224, conv1 padding 2")
    return {
        "variant": cfg.variant,
        "input": [3, s, s],
        "input_note": input_note,
        "num_classes": cfg.num_classes,
        "layers": rows,
        "total_params": sum(r["params"] for r in rows),
        "total_macs": sum(r["macs"] for r in rows),
    }


def summary_table(variant: str, **overrides) -> dict:
    """`layer_table` of a network built on the meta device: shapes and counts without
    its weights' memory or initialisation (any --num-classes, at once)."""
    with torch.device("meta"):
        return layer_table(build_model(variant, **overrides))


def format_table(table: dict) -> str:
    head = ("layer", "type", "kernel / stride / pad / groups", "output", "params", "MACs")
    lines = [("input", "", "", "x".join(map(str, table["input"])), "", "")]
    for r in table["layers"]:
        lines.append((r["name"], r["type"], r["spec"], "x".join(map(str, r["output"])),
                      f"{r['params']:,}" if r["params"] else "-", f"{r['macs']:,}" if r["macs"] else "-"))
    lines.append(("total", "", "", "", f"{table['total_params']:,}", f"{table['total_macs']:,}"))
    widths = [max(len(row[i]) for row in [head, *lines]) for i in range(len(head))]
    right = {4, 5}

    def fmt(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    out = [f"AlexNet variant {table['variant']}: input {table['input_note']}, {table['num_classes']} classes",
           fmt(head), rule, *(fmt(r) for r in lines[:-1]), rule, fmt(lines[-1]),
           f"{table['total_macs'] / 1e9:.3f} GMACs per image (convolutions and FC layers)"]
    return "\n".join(out)
