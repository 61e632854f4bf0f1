"""The conv1 filter picture (Figure 3 layout)."""

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.plots import filter_grid, plot_confusion, plot_curves, save_rgb


def test_each_kernel_lands_in_its_block_stretched_to_full_range():
    w = torch.randn(96, 3, 11, 11)
    w[5] = 0.0  # a constant kernel shows as mid-grey, not a division by zero
    img = filter_grid(w, groups=2, per_row=16, zoom=2, gap=1, group_gap=6)
    th = 22  # 11 x zoom
    assert img.shape == (2 * (3 * th + 2) + 6, 16 * th + 15, 3)
    # kernel 50 = group 1, index 2 in it: row 0, column 2 of the second block
    y, x = (3 * th + 2) + 6, 2 * (th + 1)
    tile = img[y:y + th:2, x:x + th:2].astype(np.float64)  # undo the zoom
    k = w[50].numpy().transpose(1, 2, 0)
    expect = (k - k.min()) / (k.max() - k.min()) * 255
    np.testing.assert_allclose(tile, expect, atol=0.51)
    assert tile.min() == 0 and tile.max() == 255
    y5, x5 = 0, 5 * (th + 1)
    assert (img[y5:y5 + th, x5:x5 + th] == 128).all()
    assert (img[3 * th + 2:3 * th + 8] == 255).all(), "white gap between the two GPUs' blocks"


def test_one_group_and_bad_shapes():
    img = filter_grid(np.random.rand(64, 3, 11, 11), groups=1, per_row=8, zoom=1, gap=0)
    assert img.shape == (8 * 11, 8 * 11, 3)
    with pytest.raises(ValueError, match="split"):
        filter_grid(np.zeros((96, 3, 11, 11)), groups=5)
    with pytest.raises(ValueError, match="kernels"):
        filter_grid(np.zeros((96, 1, 11, 11)))


def test_save_rgb_writes_a_png(tmp_path):
    img = filter_grid(torch.randn(8, 3, 5, 5), per_row=4)
    save_rgb(img, tmp_path / "f.png")
    back = np.asarray(Image.open(tmp_path / "f.png"))
    assert np.array_equal(back, img)


# ----------------------------------------------------------------------------- curves, confusion


def read_picture(path) -> np.ndarray:
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.std() > 10, "blank picture"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20, "too few colours"
    return img


def has_colour(img: np.ndarray, rgb: tuple[int, int, int], tol: int = 8) -> int:
    """How many pixels are within `tol` of `rgb`."""
    return int((np.abs(img.astype(np.int16) - np.array(rgb)).max(-1) <= tol).sum())


def test_training_curves_picture(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    rows = [{"epoch": e, "train_loss": 2.3 / e, "val_loss": 2.4 / e, "val_top1_err": 0.9 / e,
             "val_top5_err": 0.5 / e} for e in range(1, 6)]
    drawn, plot = [], Axes.plot

    def recording(ax, x, y, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(x), list(y)))
        return plot(ax, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", recording)
    plot_curves(rows, tmp_path / "curves.png")
    ep = [1, 2, 3, 4, 5]
    assert drawn == [("train", ep, [r["train_loss"] for r in rows]), ("validation", ep, [r["val_loss"] for r in rows]),
                     ("top-1", ep, [100 * r["val_top1_err"] for r in rows]),
                     ("top-5", ep, [100 * r["val_top5_err"] for r in rows])]
    img = read_picture(tmp_path / "curves.png")
    assert img.shape == (400, 1100, 3)  # figsize 11 x 4 inches at 100 dpi
    # each panel draws two series in matplotlib's first two colours (blue, orange)
    assert has_colour(img, (31, 119, 180)) > 200 and has_colour(img, (255, 127, 14)) > 200


def test_confusion_picture_shows_the_matrix(tmp_path):
    names = ["cat", "dog", "eel"]
    plot_confusion(np.diag([10, 20, 30]), names, tmp_path / "right.png")
    plot_confusion(np.full((3, 3), 7), names, tmp_path / "even.png")
    right, even = read_picture(tmp_path / "right.png"), read_picture(tmp_path / "even.png")
    assert right.shape == even.shape == (505, 655, 3)  # side 4 + 0.35 x 3 inches (+1.5 for the colour bar)
    darkest = (8, 48, 107)  # "Blues" at 1.0: the diagonal of an all-correct matrix
    colour_bar = has_colour(even, darkest)  # the bar's top is that colour too
    assert has_colour(right, darkest) > colour_bar + 3 * 5000  # three full cells more
