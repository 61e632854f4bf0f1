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
