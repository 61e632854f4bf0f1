"""Augmentation and test-time crops against their definitions, written out independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alexnet.augment import (
    CropParams,
    DeferredEvalTransform,
    DeferredTrainTransform,
    EvalTransform,
    RawBatch,
    TrainTransform,
    _on,
    average_ten_crop,
    center_crop,
    crop_flip,
    pca_lighting,
    random_crop_flip,
    rgb_eigen,
    ten_crop,
    ten_crop_offsets,
)
from alexnet.dataset import DataStats


def _images(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _coordinate_image(s: int) -> torch.Tensor:
    """(3, s, s) float: channel 0 is the row, channel 1 the column, channel 2 row*s+col."""
    r, c = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    return torch.stack([r, c, r * s + c]).double()


def _stats(s: int, seed: int = 1) -> DataStats:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return DataStats(mean_image=torch.from_numpy(rng.uniform(0, 255, (3, s, s))).float(),
                     eigval=torch.tensor([5000.0, 300.0, 40.0]), eigvec=torch.from_numpy(q).float())


# --- training crops ------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 6), s=st.integers(4, 20), data=st.data())
def test_random_crop_is_a_slice_at_the_recorded_offset(b, s, data):
    crop = data.draw(st.integers(1, s))
    seed = data.draw(st.integers(0, 2**31))
    images = _images(b, s, seed)
    out, p = random_crop_flip(images, crop, torch.Generator().manual_seed(seed))
    assert out.shape == (b, 3, crop, crop) and out.dtype == torch.uint8
    for i in range(b):
        t, l = int(p.top[i]), int(p.left[i])
        assert 0 <= t <= s - crop and 0 <= l <= s - crop
        want = images[i, :, t:t + crop, l:l + crop].numpy()
        if p.flip[i]:
            want = want[:, :, ::-1]
        np.testing.assert_array_equal(out[i].numpy(), want)


def test_crop_positions_cover_the_range_and_flips_are_fair():
    b, s, crop = 4000, 256, 224
    out, p = random_crop_flip(torch.zeros(b, 3, s, s, dtype=torch.uint8), crop, torch.Generator().manual_seed(3))
    assert int(p.top.min()) == 0 and int(p.top.max()) == s - crop
    assert int(p.left.min()) == 0 and int(p.left.max()) == s - crop
    assert abs(p.flip.float().mean().item() - 0.5) < 0.05
    assert not torch.equal(p.top, p.left)


def test_flip_mirrors_columns():
    img = _coordinate_image(10)[None]
    out = crop_flip(img, CropParams(torch.tensor([2]), torch.tensor([3]), torch.tensor([True])), 5)
    # column j of the mirrored crop is column left + crop - 1 - j of the image
    np.testing.assert_array_equal(out[0, 1, 0].numpy(), [7, 6, 5, 4, 3])
    np.testing.assert_array_equal(out[0, 0, :, 0].numpy(), [2, 3, 4, 5, 6])  # rows unchanged
    straight = crop_flip(img, CropParams(torch.tensor([2]), torch.tensor([3]), torch.tensor([False])), 5)
    np.testing.assert_array_equal(straight[0, 1, 0].numpy(), [3, 4, 5, 6, 7])


def test_flip_off_never_mirrors_and_keeps_the_offsets():
    images = _images(64, 12)
    g_flip, g_none = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _, with_flip = random_crop_flip(images, 8, g_flip)
    _, no_flip = random_crop_flip(images, 8, g_none, flip=False)
    assert with_flip.flip.any() and not no_flip.flip.any()
    assert torch.equal(with_flip.top, no_flip.top) and torch.equal(with_flip.left, no_flip.left)
    # the same numbers drawn either way: the lighting drawn next is the same too
    assert torch.equal(g_flip.get_state(), g_none.get_state())


def test_same_seed_same_crops_other_seed_other_crops():
    images = _images(32, 16)
    a, pa = random_crop_flip(images, 9, torch.Generator().manual_seed(1))
    b, _ = random_crop_flip(images, 9, torch.Generator().manual_seed(1))
    c, pc = random_crop_flip(images, 9, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(pa.top, pc.top)


def test_crop_rejects_bad_shapes():
    with pytest.raises(ValueError):
        random_crop_flip(_images(2, 8), 9)
    with pytest.raises(ValueError):
        random_crop_flip(torch.zeros(2, 3, 8, 9, dtype=torch.uint8), 4)


@pytest.mark.parametrize("transform", ["train", "eval"])
def test_the_transforms_take_uint8_levels_only(transform):
    """A float batch in 0..1 (ToTensor's) would be a black image to the network; floats in
    0..255 skip the rounding the stored images had: both are refused, naming the dtype."""
    stats = _stats(12)
    tr = TrainTransform(stats, 9) if transform == "train" else EvalTransform(stats, 9)
    images = _images(2, 12)
    tr(images)
    for other in (images.float() / 255, images.float(), images.to(torch.int16)):
        with pytest.raises(ValueError, match=rf"expected uint8 images \(levels 0..255\), got {other.dtype}"):
            tr(other)


# --- test-time crops ------------------------------------------------------------------


@pytest.mark.parametrize("crop, e, c", [(224, 32, 16), (227, 29, 14)])
def test_ten_crop_exact_positions(crop, e, c):
    img = _coordinate_image(256)
    crops = ten_crop(img[None], crop)
    assert crops.shape == (1, 10, 3, crop, crop)
    corners = [(0, 0), (0, e), (e, 0), (e, e), (c, c)]  # top-left, top-right, bottom-left, bottom-right, centre
    assert ten_crop_offsets(256, crop) == [(t, l, False) for t, l in corners] + [(t, l, True) for t, l in corners]
    for k, (t, l) in enumerate(corners + corners):
        patch = crops[0, k]
        rows = np.arange(t, t + crop)
        cols = np.arange(l, l + crop)
        if k >= 5:
            cols = cols[::-1]
        np.testing.assert_array_equal(patch[0].numpy(), np.broadcast_to(rows[:, None], (crop, crop)))
        np.testing.assert_array_equal(patch[1].numpy(), np.broadcast_to(cols[None, :], (crop, crop)))
        np.testing.assert_array_equal(patch[2].numpy(), rows[:, None] * 256 + cols[None, :])


@pytest.mark.parametrize("crop, o", [(224, 16), (227, 14)])
def test_center_crop_position(crop, o):
    img = _coordinate_image(256)
    out = center_crop(img[None], crop)
    assert out.shape == (1, 3, crop, crop)
    assert out[0, 0, 0, 0] == o and out[0, 1, 0, 0] == o
    assert out[0, 0, -1, -1] == o + crop - 1 and out[0, 1, -1, -1] == o + crop - 1
    assert torch.equal(ten_crop(img, crop)[4], out[0])  # the 5th of the ten is the centre one


def test_average_ten_crop_averages_softmax_outputs():
    logits = torch.randn(3, 10, 7, generator=torch.Generator().manual_seed(0)) * 3
    z = logits.double().numpy()
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = p.mean(1)
    np.testing.assert_allclose(average_ten_crop(logits).numpy(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(average_ten_crop(logits.reshape(30, 7)).numpy(), want, rtol=1e-5, atol=1e-7)
    # the average of probabilities, not the softmax of averaged logits
    assert not np.allclose(torch.softmax(logits.mean(1), -1).numpy(), want, atol=1e-3)
    with pytest.raises(ValueError):
        average_ten_crop(torch.zeros(11, 7))
    # its log, for evaluation's loss, from log-probabilities: the same figures, and finite
    # where every crop is sure against a class (the log of the average underflows to -inf)
    from alexnet.augment import log_average_ten_crop

    np.testing.assert_allclose(log_average_ten_crop(logits).numpy(), np.log(want), rtol=1e-5, atol=1e-6)
    sure = torch.zeros(1, 10, 2)
    sure[..., 1] = 200.0
    assert torch.log(average_ten_crop(sure))[0, 0] == -math.inf
    assert log_average_ten_crop(sure)[0, 0].item() == pytest.approx(-200.0, rel=1e-6)
    with pytest.raises(ValueError):
        log_average_ten_crop(torch.zeros(11, 7))


# --- PCA lighting and its eigenvectors ------------------------------------------------------


def test_pca_lighting_matches_the_formula():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 5, 6)) * 50
    eigval = np.array([9.0, 2.0, 0.5])
    eigvec, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    alpha = rng.normal(size=(4, 3)) * 0.1
    want = x.copy()
    for b in range(4):  # every pixel of image b gets sum_i alpha_bi * lambda_i * p_i
        for i in range(3):
            want[b] += (alpha[b, i] * eigval[i] * eigvec[:, i])[:, None, None]
    got = pca_lighting(torch.from_numpy(x), torch.from_numpy(eigval), torch.from_numpy(eigvec),
                       alpha=torch.from_numpy(alpha))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-4)


def test_pca_lighting_draws_alpha_with_the_given_std():
    b = 20000
    x = torch.zeros(b, 3, 1, 1)
    eigval, eigvec = torch.tensor([4.0, 2.0, 1.0]), torch.eye(3)[:, [2, 0, 1]]
    out = pca_lighting(x, eigval, eigvec, std=0.1, generator=torch.Generator().manual_seed(0))
    alpha = (out[:, :, 0, 0] @ eigvec) / eigval  # back to the alphas
    assert torch.allclose(alpha.std(0), torch.full((3,), 0.1), rtol=0.03)
    assert torch.allclose(alpha.mean(0), torch.zeros(3), atol=0.004)
    # one alpha per image, the same offset for every pixel of it
    y = pca_lighting(torch.zeros(2, 3, 4, 4), eigval, eigvec, generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, y[:, :, :1, :1].expand_as(y))


def test_rgb_eigen_against_numpy():
    rng = np.random.default_rng(0)
    mix = np.array([[1.0, 0.8, 0.6], [0.0, 0.5, 0.3], [0.0, 0.0, 0.2]])
    pixels = np.clip(rng.normal(size=(5000, 3)) @ mix * 40 + 120, 0, 255).round()
    images = torch.from_numpy(pixels.reshape(2, 50, 50, 3)).permute(0, 3, 1, 2).to(torch.uint8)
    eigval, eigvec = rgb_eigen(images)
    cov = np.cov(pixels.T, bias=True)
    w, v = np.linalg.eigh(cov)
    w, v = w[::-1], v[:, ::-1]
    np.testing.assert_allclose(eigval.numpy(), w, rtol=1e-5)
    for i in range(3):  # the same eigenvectors up to sign
        assert abs(abs(float(np.dot(eigvec[:, i].numpy(), v[:, i]))) - 1) < 1e-5
        np.testing.assert_allclose(cov @ eigvec[:, i].numpy(), w[i] * eigvec[:, i].numpy(), rtol=1e-4, atol=1e-3)
        assert eigvec[:, i].abs().argmax() == eigvec[:, i].argmax()  # the documented sign
    assert eigval[0] >= eigval[1] >= eigval[2]
    np.testing.assert_allclose(eigvec.numpy().T @ eigvec.numpy(), np.eye(3), atol=1e-5)
    e2, v2 = rgb_eigen(pixels)  # (N, 3) pixels give the same
    assert torch.allclose(e2, eigval) and torch.allclose(v2, eigvec)


# --- the transforms ---------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 64.0])
def test_train_transform_is_the_paper_formula(scale):
    s, crop, b = 20, 13, 12
    stats = _stats(s)
    images = _images(b, s, seed=7)
    tr = TrainTransform(stats, crop, scale=scale)
    out = tr(images, torch.Generator().manual_seed(11))
    assert out.dtype == torch.float32 and out.shape == (b, 3, crop, crop)
    # the documented draws, in order: tops, lefts, coins, alphas ~ N(0, 0.1)
    g = torch.Generator().manual_seed(11)
    top = torch.randint(0, s - crop + 1, (b,), generator=g).numpy()
    left = torch.randint(0, s - crop + 1, (b,), generator=g).numpy()
    coin = torch.randint(0, 2, (b,), generator=g).numpy()
    alpha = (torch.randn(b, 3, generator=g) * 0.1).double().numpy()
    img, mean = images.double().numpy(), stats.mean_image.double().numpy()
    lam, p = stats.eigval.double().numpy(), stats.eigvec.double().numpy()
    for i in range(b):
        t, l = top[i], left[i]
        x = img[i] - mean  # mean subtraction on the whole image, then the crop
        x = x[:, t:t + crop, l:l + crop]
        if coin[i]:
            x = x[:, :, ::-1]
        # lighting with eigenvalues in 0..1 units (lambda / 255^2), offset back in 0..255 levels
        offset = 255.0 * sum(alpha[i, k] * (lam[k] / 255.0**2) * p[:, k] for k in range(3))
        want = (x + offset[:, None, None]) / scale
        np.testing.assert_allclose(out[i].numpy(), want, rtol=1e-5, atol=2e-4 / scale)
    assert coin.any() and not coin.all()


def test_train_transform_subtracts_the_mean_image():
    s = 16
    images = _images(5, s)
    mean = images.float().mean(0)
    stats = DataStats(mean, torch.tensor([1.0, 0.5, 0.1]), torch.eye(3))
    same = TrainTransform(DataStats(images[2].float(), stats.eigval, stats.eigvec), 10, lighting_std=0.0)
    assert same(images[2:3].clone(), torch.Generator().manual_seed(0)).abs().max() == 0
    out = TrainTransform(stats, s, lighting_std=0.0, flip=False)(images, torch.Generator().manual_seed(0))
    assert torch.allclose(out, images.float() - mean)  # full-size crop: just the mean removed
    assert out.mean(0).abs().max() < 1e-3


def test_train_transform_out_argument_and_threads_agree():
    stats, images = _stats(24), _images(6, 24)
    tr = TrainTransform(stats, 17)
    a = tr(images, torch.Generator().manual_seed(4))
    buf = torch.full((6, 3, 17, 17), float("nan"))
    b = tr(images, torch.Generator().manual_seed(4), out=buf)
    assert b is buf and torch.equal(a, b)
    with pytest.raises(ValueError):
        tr(images, torch.Generator().manual_seed(4), out=torch.empty(6, 3, 16, 16))
    with pytest.raises(ValueError):
        tr(_images(2, 25), torch.Generator())  # not the mean image's size


@pytest.mark.parametrize("ten", [False, True])
def test_eval_transform(ten):
    stats, images = _stats(30), _images(3, 30)
    out = EvalTransform(stats, 21, ten_crop=ten, scale=2.0)(images)
    centred = images.float() - stats.mean_image
    want = ten_crop(centred, 21) if ten else center_crop(centred, 21)
    assert out.shape == ((3, 10, 3, 21, 21) if ten else (3, 3, 21, 21))
    assert torch.allclose(out, want / 2.0, atol=1e-4)


# --- augmentation on the model's device -----------------------------------------------


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 7), s=st.integers(8, 24), data=st.data())
def test_whole_batch_gathers_give_the_loops_bits(b, s, data):
    """The GPU's way (whole-batch gathers) against the CPU's loop, here both on the CPU:
    the same numbers to the last bit, flips on or off, any scale."""
    crop = data.draw(st.integers(1, s))
    scale = data.draw(st.sampled_from([1.0, 64.0, 255.0]))
    flip = data.draw(st.booleans())
    lighting = data.draw(st.sampled_from([0.0, 0.1]))
    tr = TrainTransform(_stats(s, seed=b), crop, scale=scale, flip=flip, lighting_std=lighting)
    images = _images(b, s, seed=s)
    params, alpha = tr.sample(b, torch.Generator().manual_seed(data.draw(st.integers(0, 2**31))))
    looped = tr.apply(images, params, alpha)
    gathered = tr._apply_gathered(images, params, alpha, torch.full_like(looped, float("nan")))
    assert torch.equal(looped, gathered)


def test_gathers_into_a_channels_last_buffer_give_the_same_bits():
    tr = TrainTransform(_stats(40), 31)
    images = _images(9, 40, seed=2)
    params, alpha = tr.sample(9, torch.Generator().manual_seed(5))
    assert params.flip.any() and not params.flip.all()
    buf = torch.empty(9, 3, 31, 31).contiguous(memory_format=torch.channels_last)
    assert torch.equal(tr._apply_gathered(images, params, alpha, buf), tr.apply(images, params, alpha))


def test_a_deferred_batch_finishes_as_the_loader_would_have_made_it():
    stats, images = _stats(24), _images(6, 24, seed=3)
    tr = TrainTransform(stats, 17, scale=2.0)
    now = tr(images, torch.Generator().manual_seed(8))
    later = DeferredTrainTransform(tr)
    raw = later(images, torch.Generator().manual_seed(8))
    assert isinstance(raw, RawBatch) and raw.images.dtype == torch.uint8 and raw.images.shape == (6, 3, 24, 24)
    assert raw.alpha.shape == (6, 3) and raw.top.shape == raw.left.shape == raw.flip.shape == (6,)
    moved = raw.to("cpu")
    assert isinstance(moved, RawBatch) and torch.equal(later.finish(moved), now)
    # the images are the loader's uint8 ones, untouched (a third of the float crop's bytes)
    assert torch.equal(raw.images, images)
    assert raw.images.numel() * raw.images.element_size() < now.numel() * now.element_size() / 2
    with pytest.raises(ValueError, match="mean image"):
        later(_images(2, 25), torch.Generator())


@pytest.mark.parametrize("ten", [False, True])
def test_deferred_eval_crops_the_same(ten):
    stats, images = _stats(30), _images(3, 30)
    tr = EvalTransform(stats, 21, ten_crop=ten, scale=2.0)
    later = DeferredEvalTransform(tr)
    shipped = later(images)
    assert shipped.dtype == torch.uint8 and torch.equal(shipped, images)
    assert torch.equal(later.finish(shipped), tr(images))
    with pytest.raises(ValueError, match="mean image"):
        later(_images(2, 31))


def test_device_copies_of_a_transforms_constants_are_not_pickled():
    """A transform goes to spawned loader workers by pickle: the copies of its mean image
    on a device (CUDA after the first device-side batch; `meta` here) stay behind."""
    import pickle

    tr, ev = TrainTransform(_stats(32), 27), EvalTransform(_stats(32), 27)
    _on(tr._device_copies, tr.mean, torch.device("meta"))
    _on(ev._device_copies, ev.mean_crops, torch.device("meta"))
    assert len(tr._device_copies) == len(ev._device_copies) == 1
    for t in (tr, ev):
        back = pickle.loads(pickle.dumps(t))
        assert len(back._device_copies) == 0
        assert torch.equal(back.mean if t is tr else back.mean_crops, t.mean if t is tr else t.mean_crops)
