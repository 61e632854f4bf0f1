"""The paper's data augmentation and test-time cropping, on whole batches of tensors.

Section 4.1 of Krizhevsky, Sutskever & Hinton (2012):

* Training: a random `crop` x `crop` patch of each 256x256 image (224 in the paper's
  text, 227 for the arithmetic of its conv1; see `alexnet.config`), mirrored
  horizontally with probability 1/2, with the mean image subtracted (section 2) and the
  PCA lighting offset added (section 4.1).
* Testing: the centre patch, or the paper's ten patches (the four corner patches and
  the centre patch, and their horizontal reflections) whose softmax outputs are
  averaged (`average_ten_crop`).

Units. Pixels stay in the paper's 0..255 units throughout: a transform's output is
`(pixel - mean_image_pixel + lighting_offset) / scale` with `scale = 1` by default, i.e.
the raw mean-subtracted pixel values the paper fed its network (with its N(0, 0.01)
initialisation and learning rate 0.01). `scale` is an explicit option, e.g. 255 or 64
for unit-range inputs.

PCA lighting. The paper adds `[p1 p2 p3] [a1*l1, a2*l2, a3*l3]^T` to every pixel of an
image, `p_i`/`l_i` the eigenvectors/eigenvalues of the 3x3 covariance of the training
set's RGB pixel values, `a_i ~ N(0, 0.1)` drawn once per image each time it is used.
`pca_lighting` evaluates exactly that formula in whatever units it is given. The
eigenvalue of a covariance has the units of pixel values squared, so the formula is not
scale-free; `TrainTransform` takes the eigenvalues of the covariance of pixel values
scaled to 0..1 (the convention of the common re-implementations; `DataStats.eigval`,
in 0..255 units squared, divided by 255**2), and converts the resulting offset back to
0..255 units (times 255). Net effect: `offset = eigvec @ (alpha * eigval / 255)` pixel
levels, with `DataStats`'s eigval: along the first eigenvector (a unit vector) the offset
has a standard deviation of 0.1 * l1 * 255 levels, l1 in 0..1 units, and each channel
moves by that times its entry in the eigenvector (Fashion-MNIST's l1 = 0.374, three times
its pixel variance, eigenvector (1, 1, 1)/sqrt(3): 9.5 levels along it, 5.5 per channel).

Random draws, in this order, from the caller's `torch.Generator` (so a batch is a pure
function of the generator's seed): crop tops (B,), crop lefts (B,), flips (B,), lighting
alphas (B, 3).

Implementation note (measured on a 2-core machine, batch 128, crop 227): crop, flip,
mean subtraction and lighting are one small loop over the images of the batch, three
whole-image tensor ops each on cache-resident data: ~0.15 ms/image into a reused `out`
buffer, ~0.5 ms/image with a fresh output (the page faults of 79 MB cost more than the
arithmetic). Index-grid gathers over the whole batch were 2-7x slower. The loop runs
its ops on one thread (`_one_thread`): a 2-thread OpenMP region per small op was up to
100x slower on that machine. That sets torch's thread count for the whole process for
the loop's duration, so call the transforms from the thread that trains (as
`BatchLoader` does) or from worker processes, not from a thread beside training.

Off the CPU (a batch already on a GPU) `TrainTransform.apply` does the same arithmetic
as whole-batch gathers instead, the same bits in a few kernels. `DeferredTrainTransform`
splits the transform there: the loader draws the random numbers and ships the uint8
images (`RawBatch`, 196,608 bytes an image against 618,348 for a float32 227x227 crop),
and the trainer finishes the batch on its device (`data.augment_on`).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import numpy as np
import torch

from alexnet.config import DataConfig
from alexnet.dataset import DataStats, covariance_eigen

LIGHTING_STD = DataConfig.lighting_std  # "alpha_i ... standard deviation 0.1" (section 4.1)
PIXEL_RANGE = 255.0  # eigenvalues are taken in 0..1 units: DataStats.eigval / PIXEL_RANGE**2


class CropParams(NamedTuple):
    """Where each image of a batch was cropped: top row, left column (of the unflipped
    image), and whether the crop was then mirrored left-right."""

    top: torch.Tensor  # (B,) int64
    left: torch.Tensor  # (B,) int64
    flip: torch.Tensor  # (B,) bool


@contextlib.contextmanager
def _one_thread():
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _check_levels(images: torch.Tensor) -> None:
    """The transforms take stored images, uint8 levels: floats in 0..1 would pass as a black
    image, and floats in 0..255 would skip the rounding the training images had."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (levels 0..255), got {images.dtype}; "
                         f"Classifier.prepare or the datasets give them")


def _check_batch(images: torch.Tensor, crop: int) -> int:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected a batch of RGB images (B, 3, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if h != w:
        raise ValueError(f"expected square images, got {h}x{w}")
    if not 1 <= crop <= h:
        raise ValueError(f"crop {crop} does not fit in {h}x{w} images")
    return h


# --- training crops ------------------------------------------------------------------


def sample_crop_params(batch: int, size: int, crop: int, generator: torch.Generator | None = None,
                       flip: bool = True) -> CropParams:
    """Uniform crop positions in [0, size - crop] and fair coin flips (all False when
    `flip` is off; the coins are drawn anyway so the later draws do not move)."""
    top = torch.randint(0, size - crop + 1, (batch,), generator=generator)
    left = torch.randint(0, size - crop + 1, (batch,), generator=generator)
    coins = torch.randint(0, 2, (batch,), generator=generator).bool()
    return CropParams(top, left, coins if flip else torch.zeros_like(coins))


def crop_flip(images: torch.Tensor, params: CropParams, crop: int) -> torch.Tensor:
    """The crops `params` describe, same dtype as `images`: (B, 3, crop, crop)."""
    _check_batch(images, crop)
    out = images.new_empty((images.shape[0], images.shape[1], crop, crop))
    with _one_thread():
        for i, (t, l, f) in enumerate(zip(params.top.tolist(), params.left.tolist(), params.flip.tolist())):
            patch = images[i, :, t:t + crop, l:l + crop]
            out[i].copy_(patch.flip(-1) if f else patch)
    return out


def random_crop_flip(images: torch.Tensor, crop: int, generator: torch.Generator | None = None,
                     flip: bool = True) -> tuple[torch.Tensor, CropParams]:
    """Random `crop` x `crop` patches of a batch (B, 3, S, S), each mirrored left-right
    with probability 1/2. Returns the patches (dtype of `images`) and the `CropParams`
    used: patch i is `images[i, :, top:top+crop, left:left+crop]`, flipped on its last
    axis when `flip[i]`."""
    size = _check_batch(images, crop)
    params = sample_crop_params(images.shape[0], size, crop, generator, flip)
    return crop_flip(images, params, crop), params


# --- PCA lighting ---------------------------------------------------------------------


def sample_lighting_alpha(batch: int, std: float = LIGHTING_STD,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """alpha ~ N(0, std), one row of 3 per image: (B, 3) float32."""
    return torch.randn(batch, 3, generator=generator) * std


def lighting_offset(alpha: torch.Tensor, eigval: torch.Tensor, eigvec: torch.Tensor) -> torch.Tensor:
    """Per-image RGB offsets `eigvec @ (alpha_b * eigval)`: (B, 3). `eigvec`'s columns are
    the eigenvectors."""
    return (alpha.float() * eigval.float()) @ eigvec.float().T


def pca_lighting(x: torch.Tensor, eigval: torch.Tensor, eigvec: torch.Tensor, std: float = LIGHTING_STD,
                 generator: torch.Generator | None = None, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """`x + offset` for a float batch (B, 3, H, W): every pixel of image b gets
    `sum_i alpha_bi * eigval_i * eigvec[:, i]`, alpha_bi ~ N(0, std) (or the `alpha`
    given). Units are those of `x` and `eigval` (see the module docstring)."""
    if not x.is_floating_point():
        raise TypeError(f"PCA lighting needs a float batch, got {x.dtype}")
    if alpha is None:
        alpha = sample_lighting_alpha(x.shape[0], std, generator)
    return x + lighting_offset(alpha, eigval, eigvec).to(x.dtype)[:, :, None, None]


def rgb_eigen(pixels: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of the 3x3 covariance of RGB pixels, given as (N, 3) or as
    images (B, 3, H, W), in their own units. Returns eigval (3,) descending and eigvec
    (3, 3) with the eigenvectors as columns, each signed so that its largest-magnitude
    component is positive; float32. Covariance with 1/N (population), in float64."""
    p = torch.as_tensor(pixels)
    if p.dim() == 4 and p.shape[1] == 3:
        p = p.permute(0, 2, 3, 1).reshape(-1, 3)
    if p.dim() != 2 or p.shape[1] != 3 or p.shape[0] < 1:
        raise ValueError(f"expected pixels (N, 3) or images (B, 3, H, W), got {tuple(p.shape)}")
    p = p.double()
    centred = p - p.mean(0)
    return covariance_eigen((centred.T @ centred / p.shape[0]).numpy())


# --- test-time crops ------------------------------------------------------------------


def center_offset(size: int, crop: int) -> int:
    """Top (= left) of the centre crop: (size - crop) // 2 (14 for 227 of 256, 16 for 224)."""
    return (size - crop) // 2


def ten_crop_offsets(size: int, crop: int) -> list[tuple[int, int, bool]]:
    """(top, left, flipped) of the ten test patches, in `ten_crop`'s order: top-left,
    top-right, bottom-left, bottom-right, centre, then the same five mirrored."""
    e, c = size - crop, center_offset(size, crop)
    five = [(0, 0), (0, e), (e, 0), (e, e), (c, c)]
    return [(t, l, False) for t, l in five] + [(t, l, True) for t, l in five]


def center_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    """The centre `crop` x `crop` patch of square images (..., S, S); same dtype."""
    size = images.shape[-1]
    if images.shape[-2] != size or not 1 <= crop <= size:
        raise ValueError(f"cannot take a {crop}x{crop} centre crop of {tuple(images.shape[-2:])} images")
    o = center_offset(size, crop)
    return images[..., o:o + crop, o:o + crop].contiguous()


def ten_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    """The paper's ten test patches of (B, 3, S, S) images: (B, 10, 3, crop, crop) in the
    order of `ten_crop_offsets` (four corners and the centre, then their reflections);
    also works on one image (3, S, S) -> (10, 3, crop, crop)."""
    size = images.shape[-1]
    if images.shape[-2] != size or not 1 <= crop <= size:
        raise ValueError(f"cannot take {crop}x{crop} crops of {tuple(images.shape[-2:])} images")
    five = torch.stack([images[..., t:t + crop, l:l + crop]
                        for t, l, f in ten_crop_offsets(size, crop) if not f], dim=-4)
    return torch.cat([five, five.flip(-1)], dim=-4)


def _per_image(logits: torch.Tensor, n_crops: int) -> torch.Tensor:
    """Logits (B*n, K) with each image's crops consecutive, or (B, n, K), as (B, n, K)."""
    if logits.dim() == 2:
        if logits.shape[0] % n_crops:
            raise ValueError(f"{logits.shape[0]} rows of logits are not a multiple of {n_crops} crops")
        return logits.reshape(-1, n_crops, logits.shape[-1])
    if logits.dim() != 3 or logits.shape[1] != n_crops:
        raise ValueError(f"expected logits (B*{n_crops}, K) or (B, {n_crops}, K), got {tuple(logits.shape)}")
    return logits


def average_ten_crop(logits: torch.Tensor, n_crops: int = 10) -> torch.Tensor:
    """Average of the softmax outputs over the crops of each image: logits (B*n, K) with
    each image's crops consecutive, or (B, n, K) -> probabilities (B, K)."""
    return torch.softmax(_per_image(logits, n_crops).float(), dim=-1).mean(1)


def log_average_ten_crop(logits: torch.Tensor, n_crops: int = 10) -> torch.Tensor:
    """The log of `average_ten_crop`, computed from log-probabilities, so that a class
    every crop is sure against stays finite (a loss, not a log of 0)."""
    logp = _per_image(logits, n_crops).float().log_softmax(-1)
    return torch.logsumexp(logp, dim=1) - math.log(n_crops)


# --- the transforms the loader applies ---------------------------------------------------


class TrainTransform:
    """The paper's training input: a random crop and reflection of each uint8 image, the
    mean image subtracted (at the same position, so equal to cropping the
    mean-subtracted image), PCA lighting added, divided by `scale`:

        out[b] = (flip_b(img_b[crop_b] - mean[crop_b]) + eigvec @ (alpha_b * eigval / 255)) / scale

    Call `(images uint8 (B, 3, S, S), generator) -> float32 (B, 3, crop, crop)`; `out=`
    writes into a given tensor. `lighting_std=0` turns lighting off, `flip=False`
    reflections (the same random numbers are drawn either way)."""

    def __init__(self, stats: DataStats, crop: int, lighting_std: float = LIGHTING_STD, scale: float = 1.0,
                 flip: bool = True):
        if scale <= 0:
            raise ValueError(f"scale must be positive, not {scale}")
        self.crop, self.lighting_std, self.scale, self.flip = crop, lighting_std, float(scale), flip
        self.mean = stats.mean_image.float().contiguous()
        self.mean_flipped = self.mean.flip(-1).contiguous()
        self.eigval = stats.eigval.float() / PIXEL_RANGE**2  # l_i in 0..1 units; offsets times 255 to levels
        self.eigvec = stats.eigvec.float()
        self._device_copies = _DeviceCopies()
        _check_batch(self.mean[None], crop)

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[CropParams, torch.Tensor]:
        """The random numbers of one batch: crop parameters and lighting alphas (B, 3)."""
        params = sample_crop_params(batch, self.mean.shape[-1], self.crop, generator, self.flip)
        alpha = sample_lighting_alpha(batch, 1.0, generator) * self.lighting_std
        return params, alpha

    def check(self, images: torch.Tensor) -> int:
        """The side of a batch of square uint8 RGB images of the mean image's size; else ValueError."""
        size = _check_batch(images, self.crop)
        _check_levels(images)
        if images.shape[-2:] != self.mean.shape[-2:]:
            raise ValueError(f"images are {size}x{size} but the mean image is "
                             f"{self.mean.shape[-2]}x{self.mean.shape[-1]}")
        return size

    def apply(self, images: torch.Tensor, params: CropParams, alpha: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
        size = self.check(images)
        b, c = images.shape[0], self.crop
        if out is None:  # off the CPU in channels-last, the gathers' own order and the model's
            out = torch.empty(b, 3, c, c, device=images.device, memory_format=torch.channels_last
                              if images.device.type != "cpu" else torch.contiguous_format)
        elif out.shape != (b, 3, c, c) or out.dtype != torch.float32 or out.device != images.device:
            raise ValueError(f"out must be float32 {(b, 3, c, c)} on {images.device}, "
                             f"got {out.dtype} {tuple(out.shape)} on {out.device}")
        if images.device.type != "cpu":
            return self._apply_gathered(images, params, alpha, out)
        inv = 1.0 / self.scale
        with _one_thread():  # also makes the numbers independent of the caller's thread count
            offset = (lighting_offset(alpha, self.eigval, self.eigvec) * PIXEL_RANGE).tolist()
            for i, (t, l, f) in enumerate(zip(params.top.tolist(), params.left.tolist(), params.flip.tolist())):
                patch = images[i, :, t:t + c, l:l + c]
                if f:  # mirror(img - mean) = mirror(img) - mirror(mean), mirror(mean) precomputed
                    patch, m = patch.flip(-1), self.mean_flipped[:, t:t + c, size - l - c:size - l]
                else:
                    m = self.mean[:, t:t + c, l:l + c]
                o = out[i]
                torch.sub(patch, m, out=o)
                o += torch.tensor(offset[i]).view(3, 1, 1)
                if inv != 1.0:
                    o *= inv
        return out

    def _apply_gathered(self, images: torch.Tensor, params: CropParams, alpha: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
        """`apply` as a few whole-batch gathers instead of a loop over the images: a
        handful of kernels, whatever the batch, which is what a GPU wants (on a CPU the
        loop is 2-7x faster). The same operations on the same numbers in the same order,
        so the same bits: the lighting offsets are computed on the CPU, as the loop does."""
        dev, c = images.device, self.crop
        mean = _on(self._device_copies, self.mean, dev)
        offset = (lighting_offset(alpha.cpu(), self.eigval, self.eigvec) * PIXEL_RANGE).to(dev, non_blocking=True)
        ar = torch.arange(c, device=dev)
        flip = params.flip.to(dev, non_blocking=True)[:, None]
        rows = params.top.to(dev, non_blocking=True)[:, None] + ar  # (B, c)
        cols = params.left.to(dev, non_blocking=True)[:, None] + torch.where(flip, c - 1 - ar, ar)  # (B, c)
        r, k = rows[:, :, None], cols[:, None, :]
        patch = images[torch.arange(images.shape[0], device=dev)[:, None, None], :, r, k]  # (B, c, c, 3)
        m = mean[:, r, k]  # (3, B, c, c)
        torch.sub(patch.permute(0, 3, 1, 2), m.permute(1, 0, 2, 3), out=out)
        out += offset[:, :, None, None]
        if self.scale != 1.0:
            out *= 1.0 / self.scale
        return out

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        params, alpha = self.sample(images.shape[0], generator)
        return self.apply(images, params, alpha, out)


class RawBatch(NamedTuple):
    """A training batch before augmentation: the uint8 images (B, 3, S, S) and the random
    numbers `TrainTransform.sample` drew for them. A third of the bytes of the finished
    float32 crops, and no arithmetic yet; `DeferredTrainTransform.finish` makes the same
    tensor `TrainTransform` would have, wherever the images are by then."""

    images: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor
    alpha: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "RawBatch":
        """The images moved to `device` (`to_device`); the random numbers stay on the CPU."""
        return self._replace(images=to_device(self.images, device, non_blocking))

    def share_memory_(self) -> "RawBatch":
        """The images into shared memory; the few bytes of draws travel by value (see
        `__reduce__`)."""
        self.images.share_memory_()
        return self

    def is_shared(self) -> bool:
        return self.images.is_shared()

    def __reduce__(self):
        # Pickled between processes, a CPU tensor goes through shared memory, one file
        # descriptor each; the (B,) and (B, 3) draws are cheaper sent as bytes.
        return _raw_batch, (self.images, *(t.numpy() for t in self[1:]))


def _raw_batch(images: torch.Tensor, *draws: np.ndarray) -> RawBatch:
    return RawBatch(images, *(torch.from_numpy(d) for d in draws))


class DeferredTrainTransform:
    """`TrainTransform` split in two: the loader calls it to draw the batch's random
    numbers (from the same generator, in the same order) and ships a `RawBatch`; the
    trainer calls `finish` after the batch reached its device. `finish(loader batch)`
    equals what `TrainTransform` would have given the loader, bit for bit, so where the
    augmentation runs changes neither a batch nor an exact resume."""

    def __init__(self, transform: TrainTransform):
        self.transform = transform
        self.crop = transform.crop

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> RawBatch:
        self.transform.check(images)
        params, alpha = self.transform.sample(images.shape[0], generator)
        return RawBatch(images.contiguous(), params.top, params.left, params.flip, alpha)

    def finish(self, raw: RawBatch) -> torch.Tensor:
        return self.transform.apply(raw.images, CropParams(raw.top, raw.left, raw.flip), raw.alpha)


class EvalTransform:
    """The paper's test input: the centre crop (B, 3, crop, crop), or with `ten_crop` the
    ten patches (B, 10, 3, crop, crop) in `ten_crop_offsets`' order, minus the mean image
    at the same positions, divided by `scale`; float32. No randomness: the generator
    argument is accepted and ignored."""

    def __init__(self, stats: DataStats, crop: int, ten_crop: bool = False, scale: float = 1.0):
        if scale <= 0:
            raise ValueError(f"scale must be positive, not {scale}")
        self.crop, self.ten_crop, self.scale = crop, ten_crop, float(scale)
        mean = stats.mean_image.float()
        self.size = _check_batch(mean[None], crop)
        self.mean_crops = _ten_crop(mean, crop) if ten_crop else center_crop(mean, crop)
        self._device_copies = _DeviceCopies()

    def check(self, images: torch.Tensor) -> int:
        """The side of a batch of square uint8 RGB images of the mean image's size; else ValueError."""
        size = _check_batch(images, self.crop)
        _check_levels(images)
        if size != self.size:
            raise ValueError(f"images are {size}x{size} but the mean image is {self.size}x{self.size}")
        return size

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self.check(images)
        crops = _ten_crop(images, self.crop) if self.ten_crop else center_crop(images, self.crop)
        out = crops.float().sub_(_on(self._device_copies, self.mean_crops, images.device))
        if self.scale != 1.0:
            out.mul_(1.0 / self.scale)
        return out


class DeferredEvalTransform:
    """`EvalTransform` moved to the model's device: the loader ships the uint8 images
    (a tenth of the bytes of ten float32 crops) and `finish` crops them there."""

    def __init__(self, transform: EvalTransform):
        self.transform = transform
        self.crop = transform.crop

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        self.transform.check(images)
        return images.contiguous()

    def finish(self, images: torch.Tensor) -> torch.Tensor:
        return self.transform(images)


def to_device(x: torch.Tensor | RawBatch, device: torch.device | str, non_blocking: bool = True):
    """A loader's batch (a tensor or a `RawBatch`) on `device`; to a CUDA device through
    pinned memory, so the copy runs without holding the host (and the loader's shared
    buffer is free again at once)."""
    if isinstance(x, RawBatch):
        return x.to(device, non_blocking)
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu" and not x.is_pinned():
        x = x.pin_memory()
    return x.to(device, non_blocking=non_blocking)


class _DeviceCopies(dict):
    """A transform's constants copied to devices; pickled empty, so that workers started
    by spawn or forkserver do not each open a CUDA context to unpickle them."""

    def __reduce__(self):
        return _DeviceCopies, ()


def _on(copies: dict, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`, copied there once per device and kept in `copies`."""
    if t.device == device:
        return t
    key = (id(t), str(device))
    if key not in copies:
        copies[key] = t.to(device)
    return copies[key]


_ten_crop = ten_crop  # EvalTransform's `ten_crop` flag shadows the function inside it
