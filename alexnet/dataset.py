"""What every data source looks like to the loader, the trainer and the evaluator.

A dataset is a sequence of 8-bit RGB images of one square size (`image_size`, 256 as in
the paper's preprocessing, section 2) with integer labels and class names. `read(idx)`
returns a whole batch as one uint8 tensor, so augmentation runs on batches.

`DataStats` are the training set's statistics that the paper's pipeline needs: the mean
image (section 2: "subtracting the mean activity over the training set from each pixel")
and the eigen-decomposition of the 3x3 covariance of all training RGB pixels (section 4.1,
PCA lighting). They travel inside checkpoints, so they are plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class DataStats:
    mean_image: torch.Tensor  # (3, S, S) float32, pixel units 0..255
    eigval: torch.Tensor  # (3,) float32, eigenvalues of the RGB covariance (pixel units squared), descending
    eigvec: torch.Tensor  # (3, 3) float32, column i is the eigenvector of eigval[i]

    def to_tensors(self, prefix: str = "stats.") -> dict[str, torch.Tensor]:
        return {prefix + "mean_image": self.mean_image, prefix + "eigval": self.eigval,
                prefix + "eigvec": self.eigvec}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "stats.") -> "DataStats":
        try:
            s = cls(*(tensors[prefix + k].float() for k in ("mean_image", "eigval", "eigvec")))
        except KeyError as e:
            raise ValueError(f"missing data statistic {e.args[0]!r}") from None
        if s.mean_image.dim() != 3 or s.mean_image.shape[0] != 3 or s.eigval.shape != (3,) or s.eigvec.shape != (3, 3):
            raise ValueError("data statistics have the wrong shapes: mean image (3, S, S), "
                             "eigenvalues (3,), eigenvectors (3, 3) expected")
        return s


def save_stats(stats: DataStats, path, metadata: dict[str, str] | None = None) -> None:
    """The statistics as a safetensors file, written atomically."""
    from safetensors.torch import save

    from alexnet.fileio import atomic_write

    data = save(stats.to_tensors(prefix=""), metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def load_stats(path) -> DataStats:
    from safetensors.torch import load_file

    return DataStats.from_tensors(load_file(str(path)), prefix="")


def covariance_eigen(cov: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a 3x3 RGB covariance: eigenvalues descending (clamped at 0)
    and eigenvectors as columns, each signed so its largest-magnitude entry is positive;
    float32 tensors."""
    cov = np.asarray(cov, dtype=np.float64)
    val, vec = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(val)[::-1]
    val, vec = np.clip(val[order], 0, None), vec[:, order]
    signs = np.sign(vec[np.abs(vec).argmax(0), np.arange(3)])
    vec = vec * np.where(signs == 0, 1, signs)
    return (torch.from_numpy(np.ascontiguousarray(val, np.float32)),
            torch.from_numpy(np.ascontiguousarray(vec, np.float32)))


class ImageDataset:
    """Base class: subclasses set `classes`, `labels`, `image_size` and implement `_read`."""

    classes: list[str]
    labels: np.ndarray  # (N,) int64
    image_size: int

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, idx: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `idx` as uint8 (B, 3, S, S) and their labels as int64 (B,)."""
        idx = np.asarray(idx, dtype=np.int64)
        return self._read(idx), torch.from_numpy(self.labels[idx])

    def _read(self, idx: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def unreadable(self) -> dict[int, str]:
        """The records found unreadable so far (index -> reason), as a dict that may be
        updated: loader workers send theirs back, so that a file is decoded, and warned
        about, once per run rather than once per epoch's new workers. Empty here."""
        return {}


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, C, h, w) images to uint8 (B, 3, size, size), grey -> RGB: as
    `images.resize_center_crop` does a file, the shorter side to `size` (bilinear,
    antialiased), then the central size x size patch (an odd excess's extra pixel on the
    right/bottom side). Square images are only resized."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    out = resize_center_crop_float(images.float(), size)
    return out.round_().clamp_(0, 255).to(torch.uint8).contiguous()


def resize_center_crop_float(x: torch.Tensor, size: int) -> torch.Tensor:
    """Floating (B, C, h, w) `x`, its shorter side to `size` (bilinear, antialiased), then
    the central size x size patch: the sizes and place of `images.resize_center_crop`."""
    from alexnet.images import shorter_side_crop

    nw, nh, left, top = shorter_side_crop(x.shape[-1], x.shape[-2], size)
    out = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    return out[..., top:top + size, left:left + size]


class TensorImageDataset(ImageDataset):
    """Images held in memory as uint8 (N, C, h, w) at their own size (C 1 or 3), resized
    to `image_size` batch by batch on read. Fashion-MNIST's 28x28 grey images live here."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, classes: list[str], image_size: int = 256):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images must be uint8 (N, 1|3, h, w), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) and not 0 <= self.labels.min() <= self.labels.max() < len(classes):
            raise ValueError(f"labels must be 0 to {len(classes) - 1} for {len(classes)} classes, got "
                             f"{self.labels.min()} to {self.labels.max()}")
        self.classes = list(classes)
        self.image_size = image_size

    def _read(self, idx: np.ndarray) -> torch.Tensor:
        return resize_batch(self.images[torch.from_numpy(idx)], self.image_size)


class SubsetDataset(ImageDataset):
    """The records `indices` of another dataset (e.g. a held-out validation part)."""

    def __init__(self, base: ImageDataset, indices: np.ndarray):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = base.labels[self.indices]
        self.classes = base.classes
        self.image_size = base.image_size
        if hasattr(base, "class_names"):
            self.class_names = base.class_names

    def read(self, idx: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # the base's labels as it reads them: -1 marks a left-out unreadable file (evaluation)
        return self.base.read(self.indices[np.asarray(idx, dtype=np.int64)])

    def _read(self, idx: np.ndarray) -> torch.Tensor:
        return self.base._read(self.indices[idx])

    def unreadable(self) -> dict[int, str]:
        return self.base.unreadable()  # (indices of the base)
