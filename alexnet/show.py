"""Pictures of what a trained network learned: `alexnet show filters|neighbours|activations`.

  filters      conv1's kernels, one block per GPU group, as in the paper's Figure 3.
  neighbours   for a few query images, the training images whose last hidden layer
               (fc7 after its ReLU, fc_width-d: 4096 in the paper) is nearest in
               Euclidean distance, as in the paper's Figure 4 (section 6.1).
  activations  the feature maps of one convolutional-part layer for one image.

Every picture uses the checkpoint's own preprocessing (`predict.Classifier`): the stored
square image, its centre crop, minus the mean image, divided by the pixel scale.

    from alexnet.show import features, nearest
    feats = torch.cat(list(features(model, batches)))  # (N, fc_width) fc7 after ReLU
    dist, idx = nearest(queries, feats, k=6)  # exact, ties to the lower index
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from alexnet.fileio import shown

LAST_HIDDEN = "relu7"  # fc7 after its ReLU: "the last, 4096-dimensional hidden layer" (section 6.1)
PANEL_INCHES = (1.6, 1.9)  # one neighbours panel (width, height) at 100 dpi: 160 x 190 pixels
MAP_INCHES = 0.8  # one activation map's square in the activations grid: 80 pixels
TITLE_INCHES = 0.5  # the activations figure's title band
MIN_TITLE_INCHES = 6.0  # the activations figure at least this wide (600 pixels): the title of a few maps fits


# --- the pure functions -----------------------------------------------------------------


@contextlib.contextmanager
def _watching(model, layer: str) -> Iterator[list[torch.Tensor]]:
    """The model in eval mode, with `layer`'s outputs collected into the list it yields (a
    copy: the next layer's in-place ReLU would otherwise overwrite what it saw); its
    hook and its mode (train or eval) are given back after, on an error too."""
    seen: list[torch.Tensor] = []
    was_training = model.training
    handle = model.layer(layer).register_forward_hook(
        lambda m, i, out: seen.append(out.detach().float().cpu().clone()))
    model.eval()
    try:
        yield seen
    finally:
        handle.remove()
        model.train(was_training)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def features(model, batches: Iterable[torch.Tensor], device: torch.device | str | None = None,
             layer: str = LAST_HIDDEN) -> Iterator[torch.Tensor]:
    """For each preprocessed batch x (B, 3, crop, crop) of `batches`, the output of `layer`
    flattened to (B, D) float32 on the CPU (D = fc_width for relu7: 4096 in the paper), the
    network in eval mode (its own mode is given back after each batch). `device`: where
    the batches go, by default the model's."""
    device = device or _device_of(model)
    for x in batches:
        if x.dim() != 4:
            raise ValueError(f"features takes batches (B, 3, H, W), got a tensor of shape {tuple(x.shape)}")
        with _watching(model, layer) as seen:
            model(x.to(device).contiguous(memory_format=torch.channels_last))
        yield seen[0].flatten(1)


def nearest_in_batches(queries: torch.Tensor, batches: Iterable[torch.Tensor],
                       k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest rows, in Euclidean distance, of the database given as consecutive
    row batches (numbered 0, 1, ... across batches), for each query row; a running top-k,
    so memory is O(queries * (k + batch)). Returns (distances float64, indices int64), both
    (Q, min(k, N)), nearest first; equal distances are ordered by index.

    Distances are the differences' norms in float64 (not |a|^2 - 2ab + |b|^2), so an exact
    copy of a query is at distance 0."""
    if queries.dim() != 2:
        raise ValueError(f"queries must be rows (Q, D), got a tensor of shape {tuple(queries.shape)}; "
                         f"one query is q[None]")
    q = queries.double()
    best_d = torch.empty(len(q), 0, dtype=torch.float64)
    best_i = torch.empty(len(q), 0, dtype=torch.int64)
    offset = 0
    for b in batches:
        d = torch.cdist(q, b.double(), compute_mode="donot_use_mm_for_euclid_dist")  # (Q, n)
        i = torch.arange(offset, offset + len(b)).expand(len(q), -1)
        offset += len(b)
        # the running best hold lower indices and come first: a stable sort keeps ties in index order
        d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
        order = d.argsort(dim=1, stable=True)[:, :k]
        best_d, best_i = d.gather(1, order), i.gather(1, order)
    return best_d, best_i


def nearest(queries: torch.Tensor, database: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`nearest_in_batches` with the database (N, D) in one piece."""
    return nearest_in_batches(queries, [database], k)


@torch.inference_mode()
def activations(model, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The output of `layer` for one preprocessed image x (3, crop, crop): (C, H, W) float32
    on the CPU, the network in eval mode (its own mode is given back)."""
    if x.dim() != 3:
        raise ValueError(f"activations takes one image (3, H, W), got a tensor of shape {tuple(x.shape)}")
    with _watching(model, layer) as seen:
        model(x[None].to(_device_of(model)).contiguous(memory_format=torch.channels_last))
    return seen[0][0]


def map_grid(maps: torch.Tensor, gap: int = 1) -> tuple[np.ndarray, tuple[float, float]]:
    """Feature maps (C, H, W) as one grey picture: ceil(sqrt(C)) maps to a row, one grey
    scale shared by all of them (so weak maps look weak), its lowest value black and its
    highest white, a white `gap` between maps. Returns the (rows*(H+gap)-gap,
    cols*(W+gap)-gap) float image in 0..1 and the (low, high) of the scale."""
    m = maps.double().numpy()
    c, h, w = m.shape
    cols = math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    lo, hi = float(m.min()), float(m.max())
    scaled = (m - lo) / (hi - lo) if hi > lo else np.full_like(m, 0.5)
    out = np.ones((rows * (h + gap) - gap, cols * (w + gap) - gap))
    for i in range(c):
        r, q = divmod(i, cols)
        out[r * (h + gap):r * (h + gap) + h, q * (w + gap):q * (w + gap) + w] = scaled[i]
    return out, (lo, hi)


# --- the figures --------------------------------------------------------------------------


def plot_maps(maps: torch.Tensor, title: str, path: str | Path) -> None:
    """`map_grid`'s picture filling the figure under a title band; each map gets
    MAP_INCHES square (80 pixels), so 96 maps are 800 x 850 pixels."""
    from alexnet.plots import _pyplot, _save

    plt = _pyplot()
    grid, (lo, hi) = map_grid(maps)
    c = maps.shape[0]
    cols = math.ceil(math.sqrt(c))
    rows = math.ceil(c / cols)
    grid_width = cols * MAP_INCHES
    width, height = max(grid_width, MIN_TITLE_INCHES), rows * MAP_INCHES + TITLE_INCHES
    fig = plt.figure(figsize=(width, height))  # (a few maps: the grid centred under a title that fits)
    ax = fig.add_axes(((1 - grid_width / width) / 2, 0, grid_width / width, rows * MAP_INCHES / height))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    fig.suptitle(f"{title}\ngrey scale {lo:.3g} (black) to {hi:.3g} (white)", fontsize=9,
                 y=1 - 0.05 / height)
    _save(fig, path)
    plt.close(fig)


def plot_neighbours(queries: np.ndarray, query_titles: list[str], neighbours: np.ndarray,
                    neighbour_titles: list[list[str]], path: str | Path) -> None:
    """One row per query: the query, then its neighbours, nearest first, each a uint8
    (3, c, c) crop with a small title; PANEL_INCHES per panel (160 x 190 pixels)."""
    from alexnet.plots import _pyplot, _save

    plt = _pyplot()
    n, k = neighbours.shape[:2]
    fig, axes = plt.subplots(n, k + 1, figsize=(PANEL_INCHES[0] * (k + 1), PANEL_INCHES[1] * n), squeeze=False)
    for r in range(n):
        row = [(queries[r], query_titles[r])] + list(zip(neighbours[r], neighbour_titles[r]))
        for ax, (img, title) in zip(axes[r], row):
            ax.imshow(img.transpose(1, 2, 0))
            ax.set_title(title, fontsize=8, color="tab:red" if ax is axes[r][0] else "black")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


# --- the commands -------------------------------------------------------------------------


def _classifier(path: str, device: str = "cpu"):
    from alexnet.cli import UserError
    from alexnet.predict import Classifier

    try:
        return Classifier.load(path, device)
    except ValueError as e:  # a CheckpointError, or a device that is not there
        raise UserError(str(e)) from None


def _output(args: argparse.Namespace, suffix: str, *inputs: str | None) -> Path:
    """The picture's path (`--out`, or beside the checkpoint), refused before any work if
    it cannot be written or is one of the command's inputs."""
    from alexnet.fileio import check_writable, refuse_overwriting, require_suffix

    p = Path(args.checkpoint)
    out = Path(args.out) if args.out else p.with_name(f"{p.stem}-{suffix}.png")
    check_writable(args.out or out, "picture.png")  # as typed: a trailing slash names a folder
    refuse_overwriting(out, args.checkpoint, *inputs)
    require_suffix(out, "a PNG picture", ".png")
    return out


def _prepare(clf, path: str) -> torch.Tensor:
    from alexnet.cli import UserError
    from alexnet.images import ImageError

    try:
        return clf.prepare(path)
    except ImageError as e:
        raise UserError(f"{shown(path)}: {e}") from None


def _cmd_filters(args: argparse.Namespace) -> int:
    from alexnet.plots import filter_grid, save_rgb

    out = _output(args, "filters")
    clf = _classifier(args.checkpoint)
    groups = clf.model.layer("conv2").groups  # conv1 kernels feeding each GPU's half of conv2
    save_rgb(filter_grid(clf.model.layer("conv1").weight, groups=groups), out)
    print(f"wrote {shown(out)} ({clf.model.layer('conv1').out_channels} kernels, {groups} group(s))")
    return 0


def _cmd_neighbours(args: argparse.Namespace) -> int:
    from alexnet.augment import center_crop
    from alexnet.cli import UserError
    from alexnet.dataset import SubsetDataset
    from alexnet.loader import BatchLoader
    from alexnet.fileio import within
    from alexnet.progress import plural
    from alexnet.sources import check_classes, open_dataset

    if args.images and (args.queries is not None or args.query_split is not None):
        given = [f for f, v in (("--queries", args.queries), ("--query-split", args.query_split)) if v is not None]
        raise UserError(f"{' and '.join(given)} choose{'s' if len(given) == 1 else ''} queries from the data; "
                        f"--images gives them: drop one or the other")
    args.queries = 5 if args.queries is None else args.queries
    args.query_split = args.query_split or "test"

    out = _output(args, "neighbours", *(args.images or ()))
    data = args.data and os.path.expanduser(args.data)  # (--data=~/x: the shell leaves the ~)
    if data and os.path.isdir(data) and within(out, data):
        raise UserError(f"{out} is inside the data folder {args.data}, where it could replace one of its images "
                        f"(and would be read as one); choose another --out")
    clf = _classifier(args.checkpoint, args.device)
    classes = [shown(c) for c in clf.class_names]  # (printed and drawn: a name that is not UTF-8 as \xNN)
    ck_classes = _checkpoint_classes(args.checkpoint)
    train = open_dataset(args.data, args.split, clf.image_size, classes=ck_classes)
    check_classes(train.classes, ck_classes)
    train.drop_unreadable = True  # an unreadable file is left out (label -1), not stood in for
    # an evenly spread subset, so a class-sorted folder still gives every class
    searched = np.arange(len(train)) if args.limit is None or args.limit >= len(train) else \
        np.arange(args.limit) * len(train) // args.limit
    bad_queries = 0
    if args.images:
        images = torch.stack([_prepare(clf, p) for p in args.images])  # (Q, 3, S, S) uint8
        titles = [f"query: {shown(Path(p).name)}" for p in args.images]
        labels = [shown(p) for p in args.images]
    else:
        queries = open_dataset(args.data, args.query_split, clf.image_size, classes=ck_classes)
        queries.drop_unreadable = True
        qidx = np.unique(np.linspace(0, len(queries) - 1, min(args.queries, len(queries))).round().astype(np.int64))
        images, qlab = queries.read(qidx)
        readable = qlab >= 0
        if not readable.any():
            raise UserError(f"none of the {len(qidx)} query images of the {args.query_split} split can be decoded")
        bad_queries = len(qidx) - int(readable.sum())
        images, qlab, qidx = images[readable], qlab[readable], qidx[readable.numpy()]
        titles = [f"query: {classes[y]}" for y in qlab.tolist()]
        # the record's own name too: for IDX data "val" is the t10k file, not a training hold-out
        names = queries.sources
        labels = [f"{args.query_split} #{i} ({shown(names[i])}) {classes[y]}"
                  for i, y in zip(qidx.tolist(), qlab.tolist())]
    transform = clf.transforms[False]
    q = torch.cat(list(features(clf.model, (transform(images[i:i + args.batch_size])
                                            for i in range(0, len(images), args.batch_size)), clf.device)))
    loader = BatchLoader(SubsetDataset(train, searched), args.batch_size, transform, shuffle=False, seed=0,
                         drop_last=False)
    labels_seen: list[torch.Tensor] = []

    def batches() -> Iterator[torch.Tensor]:
        for x, y in loader:
            labels_seen.append(y)
            yield x

    def rows() -> Iterator[torch.Tensor]:  # an unreadable file's row at +inf: never a neighbour
        for f in features(clf.model, batches(), clf.device):
            yield f.masked_fill((labels_seen[-1] < 0)[:, None], math.inf)

    dist, pos = nearest_in_batches(q, rows(), args.k)
    unreadable = sum(int((y < 0).sum()) for y in labels_seen)
    if unreadable == len(searched):
        raise UserError(f"none of the {len(searched)} searched {args.split} images can be decoded")
    finite = torch.isfinite(dist[0])  # fewer readable images than --k: the +inf rows come last
    dist, pos = dist[:, finite], pos[:, finite]
    idx = searched[pos.numpy()]  # (Q, k) indices into the training split
    found, found_labels = train.read(idx.reshape(-1))
    found_labels = found_labels.view(idx.shape).tolist()
    for r, label in enumerate(labels):
        print(f"{label}: " + ", ".join(f"{args.split} #{i} {classes[y]} {d:.4g}"
                                       for i, y, d in zip(idx[r], found_labels[r], dist[r].tolist())))
    crop = clf.model.cfg.input_size
    plot_neighbours(center_crop(images, crop).numpy(), titles,
                    center_crop(found, crop).view(*idx.shape, 3, crop, crop).numpy(),
                    [[classes[y] for y in row] for row in found_labels], out)
    left = [f"{bad_queries} unreadable {'query' if bad_queries == 1 else 'queries'}"] if bad_queries else []
    left += [plural(unreadable, f"unreadable {args.split} image")] if unreadable else []
    left_out = f", {' and '.join(left)} left out" if left else ""
    print(f"wrote {shown(out)} ({len(labels)} queries, {idx.shape[1]} nearest of {len(searched) - unreadable} "
          f"{args.split} images by fc7 distance{left_out})")
    return 0


def _checkpoint_classes(path: str) -> list[str]:
    """The class list a dataset's labels must agree with (not the readable names), from
    the metadata alone: `Classifier.load` has already read and checked the file."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(json.loads(f.metadata()["classes"]))


def _cmd_activations(args: argparse.Namespace) -> int:
    from alexnet.cli import UserError

    if not re.fullmatch(r"[A-Za-z_]\w*", args.layer):  # (the picture's name is made of it: conv9/ is no name)
        raise UserError(f"unknown layer {args.layer!r}; layers are named as conv1, norm1, pool5")
    out = _output(args, f"{args.layer}-{Path(args.image).name}", args.image)  # photo.jpg, photo.png: two
    clf = _classifier(args.checkpoint)
    conv_part = [n for n, _ in clf.model.named_layers()][:len(clf.model.features)]
    if args.layer not in conv_part:
        raise UserError(f"unknown layer {args.layer!r}; layers with feature maps: {', '.join(conv_part)}")
    x = clf.transforms[False](_prepare(clf, args.image)[None])[0]  # (3, crop, crop)
    maps = activations(clf.model, x, args.layer)  # (C, H, W)
    first = maps[:args.max_maps]
    title = (f"{args.layer} {tuple(maps.shape)} of {shown(Path(args.image).name)}"
             + (f": first {len(first)} of {len(maps)} maps" if len(first) < len(maps) else ""))
    plot_maps(first, title, out)
    print(f"wrote {shown(out)} ({title})")
    return 0


def add_command(sub) -> None:
    """Register `alexnet show` and its three pictures on an argparse subparsers object."""
    from alexnet.cli import _out_path, _path, _positive_int

    p = sub.add_parser("show", help="pictures of what a trained network learned",
                       description="Draw what a model file learned: its first-layer kernels, the "
                                   "training images nearest to a query in its last hidden layer, or "
                                   "one layer's feature maps for an image. Each writes a PNG.")
    kinds = p.add_subparsers(dest="picture", metavar="PICTURE")
    kinds.required = True

    f = kinds.add_parser("filters", help="conv1's kernels, a block per GPU group (paper Figure 3)",
                         description="conv1's kernels, each stretched to the full colour range, the kernels "
                                     "of each GPU group (conv2's groups) in their own block, as in the "
                                     "paper's Figure 3.")
    f.add_argument("checkpoint", type=_path, help="a .safetensors model file")
    f.add_argument("--out", type=_out_path, metavar="FILE.png", help="default: beside the checkpoint, STEM-filters.png")
    f.set_defaults(func=_cmd_filters)

    n = kinds.add_parser("neighbours", help="training images nearest to queries in fc7 (paper Figure 4)",
                         description="For each query image, the training images whose fc7 activations "
                                     "(after ReLU: model.fc_width numbers, 4096 in the paper) are nearest in "
                                     "Euclidean distance, as in the "
                                     "paper's Figure 4: one row per query, the query then its neighbours. "
                                     "The search is exact; it prints the neighbours' indices and distances.")
    n.add_argument("checkpoint", type=_path, help="a .safetensors model file")
    n.add_argument("--data", type=_path, metavar="PATH", help="dataset (default: Fashion-MNIST)")
    n.add_argument("--split", default="train", help="split searched for neighbours (default train)")
    n.add_argument("--query-split", default=None, choices=("test", "val"),
                   help="split the queries come from (default test; IDX data such as Fashion-MNIST "
                        "has one file, t10k, for both); each query is printed with its file")
    n.add_argument("--queries", type=_positive_int, default=None, metavar="N",
                   help="query images, evenly spread over the query split (default 5)")
    n.add_argument("--images", nargs="+", metavar="IMAGE",
                   help="query with these image files instead (then --queries and --query-split have no use)")
    n.add_argument("--k", type=_positive_int, default=6, metavar="K", help="neighbours per query (default 6)")
    n.add_argument("--limit", type=_positive_int, metavar="M",
                   help="search only M training images, evenly spread (default all)")
    n.add_argument("--batch-size", type=_positive_int, default=64, metavar="N",
                   help="images per forward pass (default 64)")
    n.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:N")
    n.add_argument("--out", type=_out_path, metavar="FILE.png", help="default: beside the checkpoint, STEM-neighbours.png")
    n.set_defaults(func=_cmd_neighbours)

    a = kinds.add_parser("activations", help="one layer's feature maps for one image",
                         description="The feature maps of one layer of the convolutional part for one "
                                     "image (its centre crop), as grey panels on one shared scale.")
    a.add_argument("checkpoint", type=_path, help="a .safetensors model file")
    a.add_argument("image", metavar="IMAGE", type=_path, help="an image file")
    a.add_argument("--layer", default="conv1",
                   help="conv1, relu1, norm1, pool1, conv2, ..., conv5, relu5, pool5 (default conv1)")
    a.add_argument("--max-maps", type=_positive_int, default=96, metavar="N",
                   help="show the first N maps (default 96)")
    a.add_argument("--out", type=_out_path, metavar="FILE.png",
                   help="default: beside the checkpoint, STEM-LAYER-IMAGE.png, IMAGE the image's file name "
                        "with its extension (best-conv1-cat.jpg.png)")
    a.set_defaults(func=_cmd_activations)
