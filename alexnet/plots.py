"""Figures as PNG files (matplotlib, no display needed): training curves and the
confusion matrix; the figures of what the network learned live here too."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    import io

    from alexnet.fileio import atomic_write

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def plot_curves(rows: list[dict], path: str | Path) -> None:
    """Loss (train and validation) and validation top-1/top-5 error against epochs, from
    the rows of a run's log.jsonl."""
    plt = _pyplot()
    ep = [r["epoch"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(ep, [r["train_loss"] for r in rows], "o-", label="train")
    a.plot(ep, [r["val_loss"] for r in rows], "o-", label="validation")
    a.set_xlabel("epoch")
    a.set_ylabel("cross-entropy loss")
    a.set_title("loss")
    a.legend()
    b.plot(ep, [100 * r["val_top1_err"] for r in rows], "o-", label="top-1")
    b.plot(ep, [100 * r["val_top5_err"] for r in rows], "o-", label="top-5")
    b.set_xlabel("epoch")
    b.set_ylabel("validation error (%)")
    b.set_title("error rate")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, names: list[str], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix (true class down, predicted across); labels are
    written for up to 30 classes, ticks only beyond that."""
    plt = _pyplot()
    k = len(names)
    m = matrix.astype(np.float64)
    m = m / np.maximum(m.sum(1, keepdims=True), 1)
    side = min(4 + 0.35 * k, 24)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 30:
        ax.set_xticks(range(k), names, rotation=90)
        ax.set_yticks(range(k), names)
        if k <= 15:
            for i in range(k):
                for j in range(k):
                    if matrix[i, j]:
                        ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                                color="white" if m[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def filter_grid(weight, groups: int = 1, per_row: int = 16, zoom: int = 4, gap: int = 2,
                group_gap: int = 8) -> np.ndarray:
    """The first layer's kernels as one RGB picture (H, W, 3) uint8, as in the paper's
    Figure 3: each kernel (3, k, k) stretched to the full 0..255 range on its own, enlarged
    `zoom` times, `per_row` to a row on a white background; with `groups` > 1 the kernels
    are split into that many consecutive blocks (those that feed each half of the grouped
    conv2, i.e. were learned "on each GPU"), stacked with a wider gap between them.

    `weight` is a tensor or array of shape (out, 3, k, k); input channels in RGB order."""
    w = np.asarray(weight.detach().cpu() if hasattr(weight, "detach") else weight, dtype=np.float64)
    if w.ndim != 4 or w.shape[1] != 3:
        raise ValueError(f"expected first-layer kernels (out, 3, k, k), got shape {w.shape}")
    n, _, kh, kw = w.shape
    if groups < 1 or n % groups:
        raise ValueError(f"{n} kernels do not split into {groups} groups")
    lo = w.min(axis=(1, 2, 3), keepdims=True)
    span = w.max(axis=(1, 2, 3), keepdims=True) - lo
    tiles = np.where(span > 0, (w - lo) / np.where(span > 0, span, 1), 0.5)
    tiles = (tiles * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)  # (n, k, k, 3)
    tiles = tiles.repeat(zoom, axis=1).repeat(zoom, axis=2)
    th, tw = kh * zoom, kw * zoom
    per_group = n // groups
    cols = min(per_row, per_group)
    rows = -(-per_group // cols)
    block_h = rows * th + (rows - 1) * gap
    height = groups * block_h + (groups - 1) * group_gap
    width = cols * tw + (cols - 1) * gap
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    for i in range(n):
        g, j = divmod(i, per_group)
        r, c = divmod(j, cols)
        y = g * (block_h + group_gap) + r * (th + gap)
        x = c * (tw + gap)
        out[y:y + th, x:x + tw] = tiles[i]
    return out


def save_rgb(image: np.ndarray, path: str | Path) -> None:
    """An (H, W, 3) uint8 array as a PNG, written atomically."""
    import io

    from PIL import Image

    from alexnet.fileio import atomic_write

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    atomic_write(path, lambda f: f.write(buf.getvalue()))
