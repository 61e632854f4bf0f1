"""Classifying images with a trained model file: `alexnet predict` and `Classifier`.

    from alexnet.predict import Classifier
    clf = Classifier.load("runs/RUN/best.safetensors")
    clf("cat.jpg")  # [("tabby cat", 0.87), ("tiger cat", 0.06), ...]: the top 5

Preprocessing comes only from the checkpoint, as in training and `alexnet evaluate`:
the shorter side rescaled to its `image_size` and the central square cropped
(`images.resize_center_crop`, section 2 of the paper), then the centre `crop` patch (or
the paper's ten patches, whose softmax outputs are averaged, section 4.1) minus the
checkpoint's mean image, divided by its `pixel_scale` (`augment.EvalTransform`).

An image is a path (str or Path), a PIL image, or a tensor or numpy array of RGB values
in 0..255, uint8 or float, shaped (3, H, W) or (H, W, 3). Float values are rounded to
whole levels, since the network was trained on 8-bit images.
"""

from __future__ import annotations

import argparse
import glob
import json
import operator
import os
import sys
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from alexnet.augment import EvalTransform, average_ten_crop
from alexnet.checkpoint import CheckpointError, check_preprocess_fits, load_model_file
from alexnet.fileio import shown
from alexnet.images import MAX_PIXELS, ImageError, as_rgb, load_rgb, resize_center_crop

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor, np.ndarray]


def _to_pil(image: ImageInput, max_pixels: int) -> Image.Image:
    if isinstance(image, Image.Image):
        return as_rgb(image, max_pixels)
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(image, max_pixels=max_pixels)
    if isinstance(image, np.ndarray) and (not image.flags.writeable or min(image.strides, default=0) < 0):
        image = image.copy()  # torch cannot share a read-only array (a warning) or a reversed one
        # (an error), as OpenCV's BGR-to-RGB idiom bgr[..., ::-1] gives
    t = torch.as_tensor(image).detach().cpu()
    if t.dim() != 3 or 3 not in (t.shape[0], t.shape[-1]):
        raise ValueError(f"expected an RGB image tensor (3, H, W) or (H, W, 3), got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"expected RGB levels 0..255, got a {t.dtype} image")
    if t.shape[0] == 3:
        t = t.permute(1, 2, 0)  # (H, W, 3)
    if t.is_floating_point():
        if not torch.isfinite(t).all():
            raise ValueError("the image has NaN or infinite values; expected RGB levels 0..255")
        if t.numel() and t.min() >= 0 and t.max() <= 1:  # 0..1, as matplotlib and ToTensor give them
            t = t * 255  # (as images.as_rgb reads a float "F" image)
        t = t.round()
    if t.numel() and t.dtype != torch.uint8:
        lo, hi = (t if t.is_floating_point() else t.long()).aminmax()  # (uint16/32 have no min)
        if lo < 0 or hi > 255:
            raise ValueError(f"expected RGB levels 0..255, got values from {lo.item():g} to {hi.item():g}")
    # no pixel limit here: it refuses files whose header claims too many pixels before
    # they are decoded, and this image is decoded already (e.g. `prepare`'s output)
    return as_rgb(Image.fromarray(t.to(torch.uint8).contiguous().numpy(), "RGB"), sys.maxsize)


def _image_list(images) -> list:
    """`images` as a list; one image given where a list is expected is a TypeError (a path
    would be read one character at a time, an array row by row)."""
    one = isinstance(images, (str, os.PathLike, Image.Image)) or (
        isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3)
    if one:
        raise TypeError(f"expects a list of images, got one {type(images).__name__}; "
                        f"use the Classifier itself for one image: clf(image)")
    return list(images)  # an (N, H, W, 3) or (N, 3, H, W) array too: N images


NON_FINITE = ("the network's outputs are NaN or infinite: its weights, finite as they are, do not compute "
              "(a damaged or hand-edited model file)")


class Classifier:
    """A trained network with its checkpoint's preprocessing and class names."""

    def __init__(self, model: torch.nn.Module, transform: EvalTransform, ten_crop_transform: EvalTransform,
                 class_names: list[str], image_size: int, device: torch.device, max_pixels: int = MAX_PIXELS):
        self.model = model.to(device).to(memory_format=torch.channels_last).eval()
        self.transforms = {False: transform, True: ten_crop_transform}
        self.class_names, self.image_size = class_names, image_size
        self.device, self.max_pixels = device, max_pixels

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto", max_pixels: int = MAX_PIXELS) -> "Classifier":
        """A model file's network on `device` ("auto", "cpu", "cuda", "cuda:N"); files
        claiming more than `max_pixels` pixels are refused (ImageError)."""
        from alexnet.distributed import DistInfo, resolve_device
        from alexnet.sources import readable_names

        try:
            dev = resolve_device(device, DistInfo())
        except (ValueError, RuntimeError) as e:  # no CUDA; a name torch does not know
            raise ValueError(str(e).splitlines()[0]) from None
        ck = load_model_file(path)
        if ck.stats is None:
            raise CheckpointError(f"{path} has no data statistics (mean image); it cannot preprocess images")
        check_preprocess_fits(path, ck.model_config, ck.stats, ck.preprocess)
        size, crop = ck.preprocess["image_size"], ck.preprocess["crop"]
        scale = ck.preprocess.get("pixel_scale", 1.0)
        names = ck.extra.get("class_names") or readable_names(ck.classes)
        return cls(ck.build_model(), EvalTransform(ck.stats, crop, ten_crop=False, scale=scale),
                   EvalTransform(ck.stats, crop, ten_crop=True, scale=scale), list(names), size,
                   dev, max_pixels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def prepare(self, image: ImageInput) -> torch.Tensor:
        """The stored form of one image: uint8 (3, image_size, image_size)."""
        return torch.from_numpy(resize_center_crop(_to_pil(image, self.max_pixels), self.image_size))

    def _prepare_named(self, image: ImageInput, k: int) -> torch.Tensor:
        """`prepare`, its error naming the image: its path, else its place in the list."""
        try:
            return self.prepare(image)
        except ValueError as e:  # ImageError included, which keeps its type
            where = os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"image {k}"
            raise type(e)(f"{where}: {e}") from None

    @torch.inference_mode()
    def probabilities(self, images: list[ImageInput], ten_crop: bool = False, batch_size: int = 64) -> torch.Tensor:
        """Softmax outputs (N, num_classes) on the CPU, float32; with `ten_crop` the mean of
        the softmax over the paper's ten patches. Runs `batch_size` images at a time, the
        network in eval mode whatever mode `self.model` was left in (given back after)."""
        images = _image_list(images)
        was_training = self.model.training
        self.model.eval()
        try:
            return self._probabilities(images, bool(ten_crop), batch_size)
        finally:
            self.model.train(was_training)

    def _probabilities(self, images: list[ImageInput], ten_crop: bool, batch_size: int) -> torch.Tensor:
        out = []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([self._prepare_named(im, i + k)
                                 for k, im in enumerate(images[i:i + batch_size])])  # (B, 3, S, S) uint8
            x = self.transforms[ten_crop](batch)  # (B, 3, c, c) or (B, 10, 3, c, c)
            b = x.shape[0]
            x = x.flatten(0, 1) if ten_crop else x
            logits = self.model(x.to(self.device).contiguous(memory_format=torch.channels_last)).float().cpu()
            out.append(average_ten_crop(logits.view(b, 10, -1)) if ten_crop else logits.softmax(-1))
            if not bool(torch.isfinite(out[-1]).all()):
                raise CheckpointError(NON_FINITE)
        return torch.cat(out) if out else torch.empty(0, self.num_classes)

    def top(self, probs: torch.Tensor, top: int = 5) -> list[list[tuple[int, str, float]]]:
        """(index, name, probability) of the `top` most likely classes (capped at the
        class count) of each row of `probs`, most likely first."""
        try:
            top = operator.index(top)  # an int, or a NumPy or torch integer
        except TypeError:
            raise ValueError(f"top must be a whole number >= 1, not {top!r}") from None
        if top < 1:
            raise ValueError(f"top must be a whole number >= 1, not {top!r}")
        p, idx = probs.topk(min(top, self.num_classes), dim=-1)
        return [[(i, self.class_names[i], v) for i, v in zip(ri, rp)] for ri, rp in zip(idx.tolist(), p.tolist())]

    def predict_batch(self, images: list[ImageInput], top: int = 5, ten_crop: bool = False,
                      batch_size: int = 64) -> list[list[tuple[str, float]]]:
        """For each image, its `top` (name, probability) pairs, most likely first."""
        rows = self.top(self.probabilities(images, ten_crop, batch_size), top)
        return [[(name, p) for _, name, p in row] for row in rows]

    def __call__(self, image: ImageInput, top: int = 5, ten_crop: bool = False) -> list[tuple[str, float]]:
        return self.predict_batch([image], top, ten_crop)[0]


# --- the command ---------------------------------------------------------------------


def expand_inputs(items: list[str]) -> tuple[list[str], list[str]]:
    """Image paths from files, folders (recursively, image extensions only, sorted) and
    glob patterns (whose matches are taken as files and folders are), in the order given,
    each path once; and the items that matched nothing.
    A name that exists but is no regular file (a FIFO, a dangling symlink) is kept, so that
    reading it reports why."""
    found, missing, seen = [], [], set()
    for item in items:
        if os.path.isdir(item):
            paths = images_below(item)
        elif os.path.lexists(item):  # a file, or a FIFO or dangling link whose reading says why
            paths = [item]
        elif glob.has_magic(item):  # each match as if named itself: a folder's images, a file
            paths = [q for m in sorted(glob.glob(item, recursive=True))
                     for q in (images_below(m) if os.path.isdir(m) else [m] if os.path.isfile(m) else [])]
        else:
            paths = []
        for p in paths:
            key = os.path.normpath(os.path.abspath(p))
            if key not in seen:
                seen.add(key)
                found.append(p)
        if not paths:
            missing.append(item)
    return found, missing


def images_below(folder: str) -> list[str]:
    """The image files anywhere below `folder`, sorted, walked as `prepare` walks a class
    folder: links to folders followed, each real folder once (a link back up ends), hidden
    folders (.thumbnails) and files (._photo.jpg) left out. Not only regular files: a
    broken link or a FIFO named .jpg is listed, so that reading it says why."""
    from alexnet.sources import is_image_name, walk_folder

    return sorted(os.path.join(dirpath, n) for dirpath, filenames in walk_folder(folder, {os.path.realpath(folder)})
                  for n in filenames if is_image_name(n))


def _cmd_predict(args: argparse.Namespace) -> int:
    from alexnet.cli import UserError

    paths, missing = expand_inputs(args.images)
    if not paths:
        raise UserError(f"no image files in {' '.join(args.images)}")
    try:
        clf = Classifier.load(args.checkpoint, args.device, args.max_pixels)
    except ValueError as e:  # a CheckpointError, or a device that is not there
        raise UserError(str(e)) from None
    errors = [(m, "no such file, or no image files in it") for m in missing]
    results = []
    for m, reason in errors:
        sys.stderr.write(f"alexnet: error: {shown(m)}: {reason}\n")
    for i in range(0, len(paths), args.batch_size):
        good, images = [], []
        for path in paths[i:i + args.batch_size]:
            try:
                images.append(clf.prepare(path))  # (3, S, S) uint8: a batch holds no full-size photos
                good.append(path)
            except ImageError as e:
                errors.append((path, str(e)))
                sys.stderr.write(f"alexnet: error: {shown(path)}: {e}\n")
        rows = clf.top(clf.probabilities(images, args.ten_crop, args.batch_size), args.top) if images else []
        for path, row in zip(good, rows):
            if args.json:
                results.append({"image": shown(path), "top": [{"class": n, "index": j, "prob": p} for j, n, p in row]})
            else:
                print(shown(path) + "".join(f"\n  {p:.3f}  {n}" for _, n, p in row), flush=True)
    if args.json:
        results += [{"image": shown(path), "error": msg} for path, msg in errors]
        print(json.dumps(results, indent=2))
    return 1 if errors else 0


def add_command(sub) -> None:
    """Register `alexnet predict` on an argparse subparsers object."""
    from alexnet.cli import _path, _positive_int

    p = sub.add_parser("predict", help="classify images with a trained model file",
                       description="Print the most likely classes of each image, with their probabilities, "
                                   "using the checkpoint's own preprocessing. A file that cannot be read is "
                                   "reported on stderr and the others are still classified; the exit code "
                                   "is then 1.")
    p.add_argument("checkpoint", type=_path, help="a .safetensors model file (e.g. RUN/best.safetensors)")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (searched recursively) or quoted glob patterns ('imgs/*.jpg')")
    p.add_argument("--top", type=_positive_int, default=5, metavar="K",
                   help="classes to show per image (default 5; at most the number of classes)")
    p.add_argument("--ten-crop", action="store_true", help="average the softmax of the paper's 10 patches")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                   help="images per forward pass (default 32)")
    p.add_argument("--device", default="auto", metavar="DEV", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--max-pixels", type=_positive_int, default=MAX_PIXELS, metavar="N",
                   help=f"refuse images whose header claims more pixels (default {MAX_PIXELS:,})")
    p.set_defaults(func=_cmd_predict)
