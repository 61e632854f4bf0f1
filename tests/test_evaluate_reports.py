"""`alexnet evaluate`'s report: which data it names, where it may go, and what it leaves
beside it (the default folder eval-SPLIT/ is also where training writes its test report)."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import alexnet.evaluate as evaluate_module
from tests.test_bad_input import checkpoint, main, one_line_error, two_class_tree
from tests.test_train import write_idx


def three_split_tree(root, shade: int = 0) -> None:
    """train/, val/ and test/ ImageFolder splits of classes a and b, one small PNG each."""
    two_class_tree(root)
    shutil.copytree(root / "val", root / "test")
    if shade:  # other pixels: other data
        for f in root.rglob("*.png"):
            Image.new("RGB", (40, 30), (shade, 60, 20)).save(f)


def not_evaluated(monkeypatch):
    """Make any evaluation fail the test: the refusals must come before it."""
    def evaluated(*args, **kwargs):
        raise AssertionError("evaluated before the refusal")

    monkeypatch.setattr(evaluate_module, "evaluate_model", evaluated)


def test_the_default_folder_keeps_a_report_of_other_data(capsys, tmp_path):
    """Training writes its test report into RUN/eval-test/; `evaluate` of other data
    without --out wrote over it (and eval.json did not say which data it was). Now
    eval.json names its data, other data is refused there with one line, the same data
    again replaces it, and --out takes the other data elsewhere."""
    from alexnet.sources import open_dataset
    from alexnet.train import finish_run

    three_split_tree(tmp_path / "tree")
    three_split_tree(tmp_path / "other", shade=200)
    (tmp_path / "run").mkdir()
    ck = checkpoint(tmp_path / "run" / "best.safetensors", ["a", "b"])
    trainer = SimpleNamespace(run_dir=tmp_path / "run", _lock_fd=0, device="cpu", num_workers=0,
                              augment_on="loader", cfg=SimpleNamespace(data=SimpleNamespace(ten_crop=False)),
                              data=SimpleNamespace(test=open_dataset(tmp_path / "tree", "test", 256,
                                                                     classes=["a", "b"])))
    assert finish_run(trainer) is not None  # training's own test report, as after a run
    report = tmp_path / "run" / "eval-test" / "eval.json"
    doc = json.loads(report.read_text())
    assert doc["data"] == os.path.realpath(tmp_path / "tree" / "test") and doc["split"] == "test"
    assert "data_given" not in doc  # (training hands over the dataset, not a path)
    before = report.read_bytes()
    capsys.readouterr()

    rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "other")
    one_line_error(rc, err, f"{report} is the report of other data: {os.path.realpath(tmp_path / 'tree' / 'test')}",
                   "--out")
    assert report.read_bytes() == before

    rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "other", "--out", tmp_path / "ev")
    assert rc == 0, err
    doc = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert doc["data"] == os.path.realpath(tmp_path / "other" / "test")
    assert doc["data_given"] == str(tmp_path / "other")
    assert report.read_bytes() == before

    rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "tree")  # the same data: evaluated anew
    assert rc == 0, err
    assert json.loads(report.read_text())["data_given"] == str(tmp_path / "tree")

    report.write_text(json.dumps({"split": "test", "images": 2}))  # a report that names no data
    rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "tree")
    one_line_error(rc, err, "is the report of data it does not name", "--out")
    assert json.loads(report.read_text()) == {"split": "test", "images": 2}


def test_split_val_of_idx_data_is_refused(capsys, tmp_path):
    """IDX data has train and test files only; "val" opened the t10k test files and
    labelled them val (eval-val/, "val: N images"), while training validates on images
    held out of train."""
    data = write_idx(tmp_path / "idx")
    ck = checkpoint(tmp_path / "m.safetensors", ["0", "1", "2", "3"])
    rc, out, err = main(capsys, "evaluate", ck, "--data", data, "--split", "val", "--device", "cpu",
                        "--workers", "0")
    one_line_error(rc, err, "has the splits train and test, not val", "held out of train in training",
                   "use --split test")
    assert not (tmp_path / "eval-val").exists()
    rc, out, err = main(capsys, "evaluate", ck, "--data", data, "--split", "test", "--device", "cpu",
                        "--workers", "0")
    assert rc == 0, err
    assert out.startswith("test: 12 images")


def test_a_report_folder_inside_the_data_is_refused_before_evaluating(capsys, tmp_path, monkeypatch):
    """Its confusion.png would be an image of the data at the next evaluation. Training
    refuses a run folder inside its data; evaluate now does too, given with --out or by
    default (a checkpoint kept in the data folder)."""
    two_class_tree(tmp_path / "tree")
    ck = checkpoint(tmp_path / "m.safetensors", ["a", "b"])
    not_evaluated(monkeypatch)
    for out in (tmp_path / "tree" / "val" / "ev", tmp_path / "tree" / "ev"):
        rc, _, err = main(capsys, "evaluate", ck, "--data", tmp_path / "tree", "--out", out)
        one_line_error(rc, err, f"the report folder {out} is inside the data folder", "choose another --out")
        assert not out.exists()
    inside = checkpoint(tmp_path / "tree" / "m.safetensors", ["a", "b"])
    rc, _, err = main(capsys, "evaluate", inside, "--data", tmp_path / "tree")
    one_line_error(rc, err, "is inside the data folder", "choose another --out")
    assert not (tmp_path / "tree" / "eval-val").exists()


def test_above_100_classes_an_earlier_confusion_png_is_removed(tmp_path):
    """No confusion matrix is drawn for more than 100 classes: an old confusion.png in
    the folder would pass for the new eval.json's."""
    from alexnet.evaluate import Metrics, write_report

    k = 101
    conf = np.eye(k, dtype=np.int64)
    m = Metrics(count=k, loss=0.5, top1_hits=k, top5_hits=k, confusion=conf)
    classes = [f"c{i}" for i in range(k)]
    (tmp_path / "confusion.png").write_bytes(b"an earlier report's picture")
    doc = write_report(m, classes, classes, tmp_path, title="t")
    assert "confusion_png" not in doc and (tmp_path / "eval.json").is_file()
    assert not (tmp_path / "confusion.png").exists()


@pytest.mark.parametrize("name", ["eval.json", "confusion.png"])
def test_a_folder_in_place_of_a_report_file_is_refused_before_evaluating(capsys, tmp_path, monkeypatch, name):
    """It failed only once the whole evaluation had run."""
    two_class_tree(tmp_path / "tree")
    ck = checkpoint(tmp_path / "m.safetensors", ["a", "b"])
    (tmp_path / "ev" / name).mkdir(parents=True)
    not_evaluated(monkeypatch)
    rc, _, err = main(capsys, "evaluate", ck, "--data", tmp_path / "tree", "--out", tmp_path / "ev")
    one_line_error(rc, err, f"{tmp_path / 'ev' / name} is a folder, where the report's {name} goes")
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == [name]


def test_an_unlabelled_test_split_falls_back_to_val_without_split(capsys, tmp_path):
    """ImageNet's layout: train/, val/ and test/, whose ILSVRC test images have no labels.
    Without --split, evaluate takes val, as for a source with no test split, and says
    so; --split test is still the error that asks for --labels."""
    two_class_tree(tmp_path / "tree")
    (tmp_path / "tree" / "test").mkdir()
    for i in range(3):
        Image.new("RGB", (40, 30), (30 * i, 20, 20)).save(tmp_path / "tree" / "test" / f"ILSVRC2012_test_{i:08}.png")
    ck = checkpoint(tmp_path / "m.safetensors", ["a", "b"])
    with pytest.warns(RuntimeWarning, match=r"the test split is left out: no classes: .*test holds 3 images .*; "
                                            r"evaluating the val split instead"):
        rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "tree", "--out", tmp_path / "ev",
                            "--device", "cpu", "--workers", "0")
    assert rc == 0, err
    doc = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert doc["split"] == "val" and doc["images"] == 2 and out.startswith("val: 2 images")
    rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "tree", "--split", "test",
                        "--out", tmp_path / "ev2")
    one_line_error(rc, err, "no classes", "--labels")
    assert not (tmp_path / "ev2").exists()


def test_prepare_split_val_of_idx_data_is_refused(tmp_path):
    """As evaluate's: a store of the t10k files labelled "val" would let `--val-data` steer
    training by the test set."""
    from alexnet.sources import DataSourceError
    from alexnet.store import prepare
    from tests.test_sources import make_idx_folder

    make_idx_folder(tmp_path / "idx")
    with pytest.raises(DataSourceError, match=r"has the splits train and test, not val: .*prepare --split test"):
        prepare(tmp_path / "idx", tmp_path / "st", split="val", workers=1, size=32, progress=False)
    assert not (tmp_path / "st").exists()
    assert prepare(tmp_path / "idx", tmp_path / "st", split="test", workers=1, size=32, progress=False).complete


def test_a_report_inside_an_idx_folder_or_a_store_is_fine(capsys, tmp_path, monkeypatch):
    """Only a folder of image files would read a report's confusion.png as an image: a
    checkpoint kept in a folder of IDX files (`alexnet train --data .` there writes runs/
    beside them) is evaluated into its default folder."""
    from tests.test_sources import make_idx_folder

    make_idx_folder(tmp_path / "idx")
    (tmp_path / "idx" / "runs" / "r").mkdir(parents=True)
    ck = checkpoint(tmp_path / "idx" / "runs" / "r" / "best.safetensors", [str(i) for i in range(10)])
    monkeypatch.chdir(tmp_path / "idx")
    rc, out, err = main(capsys, "evaluate", ck, "--data", ".")
    assert rc == 0, err
    assert json.loads((tmp_path / "idx" / "runs" / "r" / "eval-test" / "eval.json").read_text())["images"] == 5


def test_a_relative_labels_file_is_the_same_file_from_another_folder(capsys, tmp_path, monkeypatch):
    """eval.json keeps the labels file's real path: the same data labelled by the same file,
    named relatively from elsewhere, is the same data (it was refused as other data, naming
    a file that does not exist)."""
    two_class_tree(tmp_path / "tree", per_class=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    lines = []
    for cls in ("a", "b"):
        for png in sorted((tmp_path / "tree" / "val" / cls).glob("*.png")):
            shutil.copy(png, flat / f"{cls}{png.name}")
            lines.append(f"{cls}{png.name} {cls}")
    (tmp_path / "gt.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "run").mkdir()
    ck = checkpoint(tmp_path / "run" / "best.safetensors", ["a", "b"])
    monkeypatch.chdir(tmp_path)
    rc, out, err = main(capsys, "evaluate", ck, "--data", "flat", "--labels", "gt.txt", "--split", "val")
    assert rc == 0, err
    report = json.loads((tmp_path / "run" / "eval-val" / "eval.json").read_text())
    assert report["labels_file"] == str(tmp_path / "gt.txt")
    monkeypatch.chdir(tmp_path / "run")
    rc, out, err = main(capsys, "evaluate", ck, "--data", flat, "--labels", tmp_path / "gt.txt", "--split", "val")
    assert rc == 0, err
