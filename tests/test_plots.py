"""The conv1 filter picture (Figure 3 layout)."""

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet.plots import filter_grid, save_rgb


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
