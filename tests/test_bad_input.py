"""Issue 8, bad input: the corpus of tests/corpus.py through decoding, `prepare`,
`train`, `evaluate`, `predict` and `serve`; bad configs and arguments; checkpoints as
untrusted files. Good-but-odd images must decode to the right pixels; bad ones must be
refused with a reason, never crash a run or lose a good image silently; user errors are
one line, exit 2, no stack trace."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet import cli
from alexnet.checkpoint import save_model
from alexnet.dataset import DataStats
from alexnet.images import ImageError, load_rgb
from alexnet.model import build_model
from alexnet.predict import Classifier
from tests.corpus import build, build_tree
from tests.helpers import TEST_FC_WIDTH

REPO = Path(__file__).resolve().parents[1]
with tempfile.TemporaryDirectory() as _d:
    NAMES = sorted(build(_d))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return d, build(d)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The corpus as a train/val ImageFolder, the non-UTF-8 name included."""
    root = tmp_path_factory.mktemp("tree")
    manifest, info = build_tree(root)
    return root, manifest, info


def main(capsys, *argv):
    """`alexnet ARGV` through cli.main: (exit code, stdout, stderr)."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line_error(rc, err, *words):
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "alexnet" in err and "error: " in err, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


def checkpoint(path, classes, variant="paper", seed=0, crop=227):
    torch.manual_seed(seed)
    model = build_model(variant, num_classes=len(classes), init="kaiming", input_size=crop,
                        fc_width=TEST_FC_WIDTH)
    stats = DataStats(torch.full((3, 256, 256), 120.0), torch.ones(3), torch.eye(3))
    save_model(path, model, list(classes), stats, {"image_size": 256, "crop": crop, "pixel_scale": 60.0})
    return path


# ---------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", NAMES)
def test_each_case_decodes_to_the_right_pixels_or_is_refused_with_its_reason(corpus, name):
    d, manifest = corpus
    case = manifest[name]
    if not case.ok:
        with pytest.raises(ImageError, match=case.reason):
            load_rgb(d / name)
        return
    img = load_rgb(d / name)
    assert img.mode == "RGB" and img.size == case.size
    err = np.abs(np.asarray(img, np.int16) - case.pixels.astype(np.int16)).max()
    assert err <= case.tolerance, f"{name}: max pixel error {err}"


def test_corpus_covers_the_issue():
    must = {"zero.jpg", "truncated.jpg", "truncated.png", "text.jpg", "cmyk.jpg", "grey16.png",
            "palette.png", "rgba.png", "one.png", "bomb.png", "exif6.jpg", "loop.jpg", "fifo.jpg"}
    assert must <= set(NAMES)
    assert any(not n.isascii() for n in NAMES)  # the non-UTF-8 name (Linux filesystems allow it)


def test_a_fifo_is_refused_without_blocking(corpus):
    # before the fix a FIFO was "empty (0 bytes)" only by luck of its st_size; a
    # directory named .jpg was an OSError message; both are now said plainly
    d, _ = corpus
    (d / "folder.jpg").mkdir(exist_ok=True)
    for name in ("fifo.jpg", "folder.jpg"):
        with pytest.raises(ImageError, match="not a regular file"):
            load_rgb(d / name)


# ---------------------------------------------------------------------------- prepare


def read_report(path):
    rows = {}
    for line in path.read_bytes().decode("utf-8", "surrogateescape").splitlines():
        p, reason = line.split("\t")
        rows[p] = reason
    return rows


def test_prepare_stores_good_images_and_reports_every_bad_one(tree, tmp_path, capsys):
    root, manifest, info = tree
    rc, out, err = main(capsys, "prepare", root / "train", tmp_path / "store", "--quiet", "--workers", "1")
    assert rc == 0, err
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    assert index["count"] == info["good_train"]
    assert index["classes"] == info["train_classes"]  # the empty class folder keeps its label
    report = read_report(tmp_path / "store" / "skipped.tsv")
    bad = {n: c for n, c in manifest.items() if not c.ok}
    assert len(report) == len(bad)
    for name, case in bad.items():
        assert case.reason in report[f"bad/{name}"], (name, report[f"bad/{name}"])
    assert f"{len(bad)} skipped" in out


def test_prepare_a_non_utf8_file_name(tmp_path):
    # Linux allows any bytes but / and NUL in a name; os.listdir gives such a name as a str
    # with surrogate escapes, which a plain str.encode() refuses
    from alexnet.store import open_store, prepare

    d = tmp_path / "src" / "cls"
    d.mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(d / "a.png")
    with open(os.fsencode(d) + b"/caf\xe9.png", "wb") as f:
        f.write((d / "a.png").read_bytes())
    with open(os.fsencode(d) + b"/bad\xff.jpg", "wb") as f:
        f.write(b"not an image")
    result = prepare(tmp_path / "src", tmp_path / "out", workers=1, progress=False)
    assert result.written == 2 and result.skipped == 1
    ds = open_store(tmp_path / "out")
    assert sorted(ds.sources) == sorted(["cls/a.png", os.fsdecode(b"cls/caf\xe9.png")])
    # the report holds the file's own bytes, as ls shows them
    assert (tmp_path / "out" / "skipped.tsv").read_bytes().startswith(b"cls/bad\xff.jpg\t")


def test_prepare_resumes_past_a_non_utf8_file_name(tmp_path):
    from alexnet.store import open_store, prepare

    d = tmp_path / "src" / "cls"
    d.mkdir(parents=True)
    names = [b"a\xe9%d.png" % i for i in range(3)] + [b"bad\xff.jpg"]
    for i, name in enumerate(names):
        with open(os.fsencode(d) + b"/" + name, "wb") as f:
            if name.endswith(b".png"):
                Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(f, "PNG")
            else:
                f.write(b"garbage")
    first = prepare(tmp_path / "src", tmp_path / "out", workers=1, progress=False, commit_every=1,
                    _stop_after=2)
    assert not first.complete
    result = prepare(tmp_path / "src", tmp_path / "out", workers=1, progress=False)
    assert result.complete and result.written == 3 and result.skipped == 1  # nothing done twice
    assert len(set(open_store(tmp_path / "out").sources)) == 3


def test_folder_symlink_loops_end_and_list_each_image_once(tmp_path, model_file, capsys):
    # a/self -> a, and b/up -> the training folder itself: an os.walk that follows links
    # without remembering where it has been never ends. b/also-a -> a would list a's images
    # again as b's (it did, through b/up too), and so would a/shared -> b/more, a folder
    # inside b (it did): each image is listed once, under the class whose folder holds it
    root = tmp_path / "train"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (30, 20), (80, 40, 160)).save(root / cls / f"{cls}.png")
    (root / "a" / "self").symlink_to(".")
    (root / "b" / "up").symlink_to(root)
    (root / "b" / "also-a").symlink_to(root / "a")  # another class's folder: its images are a's
    (root / "b" / "more").mkdir()
    Image.new("RGB", (30, 20), (90, 40, 160)).save(root / "b" / "more" / "m.png")
    (root / "a" / "shared").symlink_to(root / "b" / "more")  # inside b: b's images, not a's
    (tmp_path / "outside").mkdir()
    Image.new("RGB", (30, 20), (70, 40, 160)).save(tmp_path / "outside" / "o.png")
    (root / "a" / "linked").symlink_to(tmp_path / "outside")  # outside the tree: followed
    rc, out, err = main(capsys, "prepare", root, tmp_path / "store", "--quiet", "--workers", "1")
    assert rc == 0, err
    from alexnet.store import open_store

    store = open_store(tmp_path / "store")
    assert dict(zip(store.sources, store.labels.tolist())) == {"a/a.png": 0, "a/linked/o.png": 0, "b/b.png": 1,
                                                               "b/more/m.png": 1}
    # predict walks a folder as prepare walks a class folder: links followed, each folder once
    (root / "a" / ".thumbnails").mkdir()
    Image.new("RGB", (30, 20), (70, 40, 160)).save(root / "a" / ".thumbnails" / "t.png")  # hidden: left out
    rc, out, err = main(capsys, "predict", model_file, tmp_path / "train" / "a", "--top", "1")
    a = root / "a"
    assert rc == 0 and [x for x in out.splitlines() if not x.startswith(" ")] == [
        str(a / "a.png"), str(a / "linked" / "o.png"), str(a / "shared" / "m.png")]


def test_prepare_val_lists_classes_the_training_set_lacks(tree, tmp_path, capsys):
    root, _, info = tree
    rc, out, err = main(capsys, "prepare", root, tmp_path / "val", "--split", "val", "--quiet", "--workers", "1")
    assert rc == 0, err
    report = read_report(tmp_path / "val" / "skipped.tsv")
    assert list(report) == info["val_extra"] and "not among the training classes" in report["zebra/zebra0.png"]


# ---------------------------------------------------------------------------- train / evaluate


def tiny_run(data, out, **over):
    from alexnet.config import run_config

    return run_config("fast", {"data": {"path": str(data), "num_workers": 0, "val_holdout": 2},
                               "model": {"input_size": 227, "fc_width": TEST_FC_WIDTH},
                               "train": {"batch_size": 4, "epochs": 1, "max_steps": 2, "checkpoint_every": 0,
                                         "device": "cpu", "amp": "off", **over}})


def test_train_val_class_mismatch_is_a_one_line_error(tree, tmp_path, capsys):
    root, _, _ = tree
    rc, out, err = main(capsys, "train", "--data", root, "--out", tmp_path / "run", "--max-steps", "1",
                        "--device", "cpu")
    one_line_error(rc, err, "zebra", "not among the 3 training classes")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_goes_on_past_bad_files_and_reports_them(tree, tmp_path, monkeypatch):
    from alexnet.train import Trainer

    monkeypatch.setenv("ALEXNET_CACHE", str(tmp_path / "cache"))  # the statistics pass must run

    root, manifest, _ = tree
    bad = sorted(n for n, c in manifest.items() if not c.ok)
    with pytest.warns(RuntimeWarning, match="unreadable image") as rec:
        trainer = Trainer(tiny_run(root / "train", tmp_path / "run"), tmp_path / "run")  # statistics pass
        try:
            result = trainer.fit()
        finally:
            trainer.close()
    assert result["step"] == 2 and (tmp_path / "run" / "best.safetensors").exists()
    full = getattr(trainer.data.train, "base", trainer.data.train)  # a held-out split wraps the folder
    reported = {os.path.basename(full.sources[i]) for i in full.bad}
    assert reported == set(bad)  # the statistics pass and validation (the held-out part) decode every file
    assert len({str(w.message) for w in rec if "unreadable image" in str(w.message)}) == len(bad)  # one per bad file


def test_training_validation_leaves_unreadable_files_out(tree, tmp_path, capsys):
    """Training substitutes the next readable record for a bad file; validation, like
    `alexnet evaluate`, leaves it out, so that no image counts twice in the figures."""
    from dataclasses import replace

    from alexnet.train import Trainer, open_data

    root, manifest, _ = tree
    cfg = tiny_run(root / "train", tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = open_data(cfg)  # a held-out part of the folder: validation reads a copy of it
        full, seen = d.train.base, d.val.base
        assert seen is not full and seen.drop_unreadable and not full.drop_unreadable
        bad = [i for i, p in enumerate(full.sources) if os.path.basename(p) in manifest
               and not manifest[os.path.basename(p)].ok]
        assert bad and (seen.read(bad)[1] == -1).all() and (full.read(bad)[1] >= 0).all()
        assert seen.bad is full.bad  # what one learns of bad files, the other knows
        # a validation folder of its own (here the same files): trained on, the bad ones left out
        (tmp_path / "v").mkdir()
        (tmp_path / "v" / "val").symlink_to(root / "train")
        cfg = replace(cfg, data=replace(cfg.data, val_path=str(tmp_path / "v")))
        trainer = Trainer(cfg, tmp_path / "run")
        try:
            trainer.fit()
        finally:
            trainer.close()
    line = next(x for x in capsys.readouterr().out.splitlines() if "epoch 1 validation" in x)
    good = len(full) - len(bad)
    assert line.startswith(f"epoch 1 validation: {good} images |") and line.endswith(
        f"| {len(bad)} unreadable left out"), line


def test_a_model_whose_finite_weights_compute_nan_is_refused_by_predict_evaluate_and_serve(tree, tmp_path, capsys):
    """fc6's weights at 3e38 (finite, so the file loads) overflow to infinities and NaN:
    `predict` printed "nan" as a probability and `evaluate` wrote figures of "loss nan"."""
    from fastapi.testclient import TestClient

    from alexnet.checkpoint import load_model_file
    from alexnet.serve import create_app

    root, _, info = tree
    ck = load_model_file(checkpoint(tmp_path / "ok.safetensors", info["train_classes"]))
    model = ck.build_model()
    model.load_state_dict(ck.state_dict)
    with torch.no_grad():
        model.layer("fc6").weight.fill_(3e38)
    broken = tmp_path / "overflow.safetensors"
    save_model(broken, model, ck.classes, ck.stats, ck.preprocess)
    image = tmp_path / "x.png"
    Image.new("RGB", (60, 40), (200, 120, 30)).save(image)
    rc, out, err = main(capsys, "predict", broken, image)
    one_line_error(rc, err, "the network's outputs are NaN or infinite")
    assert "nan" not in out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tree's bad files
        rc, out, err = main(capsys, "evaluate", broken, "--data", root / "train", "--split", "train",
                            "--out", tmp_path / "ev" / "deep")
    assert rc == 2 and err.splitlines()[-1].startswith(  # after the progress line
        f"alexnet: error: {broken}: the network's outputs are NaN or infinite"), err
    assert not (tmp_path / "ev").exists()  # the folders made for the report are gone again
    with TestClient(create_app(Classifier.load(broken, device="cpu"))) as c:
        r = c.post("/api/predict", files={"file": ("x.png", image.read_bytes(), "image/png")})
    assert r.status_code == 500 and "NaN or infinite" in r.json()["detail"]


def test_an_evaluation_stopped_midway_leaves_no_report_folder(tree, tmp_path, monkeypatch):
    """Ctrl-C during the evaluation: the folders made for the report go again; a folder
    that was there before stays."""
    import alexnet.evaluate as evaluate_module

    root, _, info = tree
    ck = checkpoint(tmp_path / "ok.safetensors", info["train_classes"])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate_module, "evaluate_model", interrupted)
    (tmp_path / "mine").mkdir()
    for out, gone in ((tmp_path / "ev" / "deep", tmp_path / "ev"), (tmp_path / "mine", None)):
        with pytest.raises(KeyboardInterrupt):
            evaluate_module.evaluate_checkpoint(ck, root / "train", split="train", out_dir=out, workers=0)
        assert gone is None or not gone.exists()
    assert (tmp_path / "mine").is_dir()


def test_evaluate_a_checkpoint_of_other_classes_is_a_one_line_error(tree, tmp_path, capsys):
    root, _, _ = tree
    ck = checkpoint(tmp_path / "three.safetensors", ["c0", "c1", "c2"])
    rc, out, err = main(capsys, "evaluate", ck, "--data", root / "train", "--split", "train")
    one_line_error(rc, err, "is among the 3 training classes")


def test_evaluate_a_val_folder_with_a_class_the_training_set_lacks_is_a_one_line_error(tree, tmp_path, capsys):
    root, _, info = tree
    ck = checkpoint(tmp_path / "m.safetensors", info["train_classes"])
    rc, out, err = main(capsys, "evaluate", ck, "--data", root, "--split", "val", "--out", tmp_path / "ev")
    one_line_error(rc, err, "zebra (1 image) not among the 3 training classes")
    assert not (tmp_path / "ev").exists()


def test_evaluate_goes_on_past_bad_files(tree, tmp_path, capsys):
    root, manifest, info = tree
    ck = checkpoint(tmp_path / "m.safetensors", info["train_classes"], crop=227)
    with pytest.warns(RuntimeWarning, match="unreadable image"):
        rc, out, err = main(capsys, "evaluate", ck, "--data", root / "train", "--split", "train",
                            "--out", tmp_path / "ev", "--workers", "0", "--device", "cpu")
    assert rc == 0, err
    doc = json.loads((tmp_path / "ev" / "eval.json").read_text())
    # every listed file is a record; a bad one is left out of the figures and counted
    good = sum(c.ok for c in manifest.values())
    assert doc["images"] == good + 3 and doc["unreadable"] == len(manifest) - good > 0
    assert doc["per_class_accuracy"]["empty"] is None  # the empty class: no images, no accuracy


# ---------------------------------------------------------------------------- predict / serve


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("ck") / "m.safetensors", ["cat", "dog", "fish"])


def test_predict_one_line_per_bad_image_others_predicted(corpus, model_file, capsys):
    d, manifest = corpus
    rc, out, err = main(capsys, "predict", model_file, d, "--top", "1")
    assert rc == 1 and "Traceback" not in err
    errs = err.splitlines()
    bad = {n: c for n, c in manifest.items() if not c.ok}
    assert len(errs) == len(bad)
    for name, case in bad.items():
        line = next(e for e in errs if e.startswith(f"alexnet: error: {d / name}: "))
        assert case.reason in line
    predicted = [line for line in out.splitlines() if not line.startswith(" ")]
    shown = [os.fsencode(d / n).decode("utf-8", "backslashreplace") for n, c in manifest.items() if c.ok]
    assert sorted(predicted) == sorted(shown)
    assert "caf\\xe9.png" in out  # the Latin-1 name, printable


def as_nobody(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m alexnet ARGV` as the unprivileged user nobody (setpriv), so that a chmod
    000 file really cannot be read; root reads everything."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(cwd), "ALEXNET_CACHE": str(cwd / "cache")}
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
                           sys.executable, "-m", "alexnet", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(os.geteuid() != 0, reason="not root: the corpus's own noperm.jpg is this case")
def test_a_file_the_user_cannot_read_is_reported_by_predict_and_prepare(model_file):
    base = Path(tempfile.mkdtemp(prefix="alexnet-noperm-"))  # outside pytest's 0700 folders
    try:
        os.chmod(base, 0o777)
        (base / "cache").mkdir(mode=0o777)
        os.chmod(base / "cache", 0o777)
        imgs = base / "src" / "cls"
        imgs.mkdir(parents=True)
        Image.new("RGB", (40, 30), (90, 20, 200)).save(imgs / "good.png")
        Image.new("RGB", (40, 30), (9, 20, 200)).save(imgs / "noperm.jpg")
        os.chmod(imgs / "noperm.jpg", 0)
        for d in (base / "src", imgs):
            os.chmod(d, 0o755)
        ck = base / "m.safetensors"
        ck.write_bytes(Path(model_file).read_bytes())
        os.chmod(ck, 0o644)
        probe = as_nobody(["summary", "--json"], base)
        if probe.returncode != 0:
            pytest.skip(f"python cannot run as nobody here: {probe.stderr.strip()[-200:]}")

        r = as_nobody(["predict", str(ck), str(imgs), "--top", "1"], base)
        assert r.returncode == 1 and r.stderr.splitlines() == [
            f"alexnet: error: {imgs / 'noperm.jpg'}: cannot open: Permission denied"], r.stderr
        assert r.stdout.splitlines()[0] == str(imgs / "good.png")

        r = as_nobody(["prepare", str(base / "src"), str(base / "store"), "--workers", "1", "--quiet"], base)
        assert r.returncode == 0, r.stderr
        assert json.loads((base / "store" / "index.json").read_text())["count"] == 1
        assert read_report(base / "store" / "skipped.tsv") == {"cls/noperm.jpg": "cannot open: Permission denied"}
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=True)


@pytest.fixture(scope="module")
def client(model_file):
    from fastapi.testclient import TestClient

    from alexnet.serve import create_app

    with TestClient(create_app(Classifier.load(model_file, device="cpu"))) as c:
        yield c


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("loop.jpg", "dangling.png", "fifo.jpg", "noperm.jpg")])
def test_serve_refuses_bad_uploads_and_keeps_serving(corpus, client, name):
    d, manifest = corpus
    case = manifest[name]
    r = client.post("/api/predict", files={"file": ("upload.jpg", (d / name).read_bytes(), "image/jpeg")})
    if case.ok:
        assert r.status_code == 200 and len(r.json()["top"]) == 3
    else:
        assert r.status_code == 422
        detail = r.json()["detail"]
        assert isinstance(detail, str) and case.reason in detail and "\n" not in detail
    good = (d / "good.png").read_bytes()
    assert client.post("/api/predict", files={"file": ("g.png", good, "image/png")}).status_code == 200


# ---------------------------------------------------------------------------- configs and arguments


@pytest.mark.parametrize("argv, words", [
    (["--set", "train.lr=-1"], ["train.lr must be positive"]),
    (["--set", "train.lr=NaN"], ["train.lr must be a finite number"]),
    (["--set", "train.lr=Infinity"], ["train.lr must be a finite number"]),
    (["--set", "model.init_std=NaN"], ["model.init_std must be a finite number"]),
    (["--set", "train.batch_size=0"], ["train.batch_size must be >= 1"]),
    (["--set", "data.image_size=-5"], ["data.image_size must be from 32 to 2048, not -5"]),
    (["--set", "data.image_size=100000"], ["data.image_size must be from 32 to 2048, not 100000"]),  # was 224 GiB
    (["--set", "train.epochs=\"ten\""], ["train.epochs must be an integer"]),
    (["--set", "train.bogus=1"], ["unknown key train.bogus"]),
    (["--set", "nonsense"], ["KEY=VALUE"]),
    (["--set", ".a=1"], ["--set expects KEY=VALUE with KEY such as train.lr, got '.a=1'"]),  # was "unknown key ;"
    (["--set", "model.lrn=3"], ["model.lrn must be a mapping, not int"]),  # was "model.lrn. must"
    (["--batch-size", "0"], ["must be >= 1"]),
    (["--input", "300"], ["224 or 227"]),
    (["--epochs", "x"], ["not an integer"]),
    (["--set", "data.image_size=100"], ["data.image_size 100 is smaller than the network's 227px crop"]),
    (["--set", "train.plateau_patience=0"], ["train.plateau_patience must be >= 1"]),
    (["--set", "train.dist_timeout=-1"], ["train.dist_timeout must be a number of seconds >= 0, not -1.0"]),
    (["--set", "train.dist_timeout=Infinity"], ["train.dist_timeout must be a finite number"]),
    # a traceback from timedelta (1e15), or "did not all join" at once (1e10: c10d's int of
    # milliseconds wrapped round; 1e-7: 0 ms)
    *[(["--set", f"train.dist_timeout={t}"], [f"train.dist_timeout must be 0 (the backend's own limit) or 1 to "
                                              f"1,000,000 seconds, not {float(t)}"]) for t in ("1e15", "1e10", "1e-7")],
    (["--set", 'model.init_bias_one=["nonsense"]'], ["model.init_bias_one names 'nonsense'"]),
    # 3.7 TB of fc weights: the allocator's traceback, now one line
    (["--set", "model.fc_width=100000000"], ["out of memory: lower train.batch_size (--batch-size) or "
                                             "model.fc_width, or use a device with more memory; nothing was trained"]),
    (["--recipe", "fast", "--set", "recipe=paper"], ["two recipes given: 'fast' and 'paper'"]),
    # these two were run: max_steps keeps a regression short
    (["--device", "cpu:7", "--set", "train.max_steps=1"], ["device 'cpu:7': the CPU is one device, use cpu"]),  # was accepted
    (["--set", "model.num_classes=5", "--set", "train.max_steps=1"],  # was replaced by the data's 10
     ["model.num_classes 5 does not match the data's 10 classes; leave it out"]),
])
def test_bad_train_arguments_are_one_line(capsys, tmp_path, argv, words):
    rc, out, err = main(capsys, "train", "--data", "fashion-mnist", "--out", tmp_path / "r", *argv)
    one_line_error(rc, err, *words)


@pytest.mark.parametrize("name, text, words", [
    ("c.json", '{"train": {"lr": "fast"}}', ["train.lr must be a number"]),
    ("c.json", '{"train": {"momentum": 1.5}}', ["train.momentum must be in [0, 1)"]),
    ("c.json", '{"modle": {}}', ["unknown key modle"]),
    ("c.json", '[1, 2]', ["must hold a mapping"]),
    ("c.json", '{"train": ', ["cannot parse"]),
    ("c.toml", '[train]\nlr = 0\n', ["train.lr must be positive"]),
    ("c.toml", '[data]\nimage_size = "big"\n', ["data.image_size must be an integer"]),
    ("c.toml", '[model\n', ["cannot parse"]),
    ("c.json", b'{"train": {"lr": 0.1}} \xff\xfe', ["cannot parse"]),  # not UTF-8
    ("c.json", '{"recipe": ["fast"]}', ["unknown recipe ['fast']"]),
])
def test_bad_config_files_are_one_line(capsys, tmp_path, name, text, words):
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    rc, out, err = main(capsys, "train", "--data", "fashion-mnist", "--out", tmp_path / "r", "--config", p)
    one_line_error(rc, err, *words)


def test_resume_with_another_variant_is_refused(capsys, tmp_path):
    rc, out, err = main(capsys, "train", "--resume", tmp_path, "--variant", "bn")
    one_line_error(rc, err, "--variant")


# ---------------------------------------------------------------------------- untrusted weights


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def bad_weight_files(d: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words of the error)."""
    from safetensors.torch import load_file, save_file

    data = good.read_bytes()
    out = {}

    def put(name, payload, words):
        (d / name).write_bytes(payload)
        out[name] = (d / name, words)

    put("truncated.safetensors", data[: len(data) // 2], "not a readable safetensors file")
    put("random.safetensors", np.random.default_rng(0).bytes(4096), "not a readable safetensors file")
    put("empty.safetensors", b"", "not a readable safetensors file")
    put("huge-header.safetensors", struct.pack("<Q", 2 ** 60) + b"{}", "not a readable safetensors file")
    put("pickle.safetensors", pickle.dumps(_Payload(d / "PWNED")), "not a readable safetensors file")
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        meta = f.metadata()
    state = load_file(str(good))
    ints = {k: v.to(torch.int32) for k, v in state.items()}
    save_file(ints, str(d / "int.safetensors"), meta)
    out["int.safetensors"] = (d / "int.safetensors", "expected floating point")
    shapes = dict(state)
    shapes["features.0.weight"] = shapes["features.0.weight"][:5]
    save_file(shapes, str(d / "shape.safetensors"), meta)
    out["shape.safetensors"] = (d / "shape.safetensors", "weights do not fit")
    save_file(state, str(d / "nometa.safetensors"))
    out["nometa.safetensors"] = (d / "nometa.safetensors",
                                 "is a safetensors file but not an alexnet model file (it has no alexnet metadata)")
    (d / "store").mkdir()  # a prepared store's statistics, mistaken for a model file
    save_file({"mean_image": torch.zeros(3, 8, 8)}, str(d / "store" / "stats.safetensors"),
              {"of": "the 6 images of this train store"})
    out["stats.safetensors"] = (d / "store" / "stats.safetensors", "(it is a prepared store's data statistics)")
    return out


def test_untrusted_weight_files_are_refused_never_executed(capsys, tmp_path, model_file, corpus):
    d, _ = corpus
    files = bad_weight_files(tmp_path, Path(model_file))
    for name, (path, words) in files.items():
        rc, out, err = main(capsys, "predict", path, d / "good.png")
        one_line_error(rc, err, words)
        rc, out, err = main(capsys, "evaluate", path, "--data", "fashion-mnist")
        one_line_error(rc, err)
    assert not (tmp_path / "PWNED").exists()
    # the pickle would run if unpickled: the oracle that the payload is live
    pickle.loads((tmp_path / "pickle.safetensors").read_bytes())
    assert (tmp_path / "PWNED").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A two-step training run with a checkpoint at each step."""
    from alexnet.config import to_dict
    from tests.test_train import tiny_config, write_idx

    d = tmp_path_factory.mktemp("run")
    cfg = tiny_config(write_idx(d / "idx", train_n=12, test_n=4), batch_size=4, epochs=1, checkpoint_every=1)
    (d / "c.json").write_text(json.dumps(to_dict(cfg)))
    assert cli.main(["train", "--config", str(d / "c.json"), "--out", str(d / "run"), "--no-test"]) == 0
    return d / "run"


@pytest.mark.parametrize("damage, words", [
    ("state.pt", "cannot read the training state"),
    ("model.safetensors", "not a readable safetensors file"),
    ("last.json", "no readable checkpoints/last.json and no step folder"),  # (with one, see test_train)
    ("last.json-escape", "not a step folder of this run"),
    ("last.json-other-run", "not a step folder of this run"),
    ("config.json", "disagree on model.variant (paper vs owt)"),
    ("config.json-key", "config.json: unknown key extra"),
    ("config.json-bytes", "config.json is not valid JSON"),  # not UTF-8
    ("checkpoints-none", "has no checkpoint to resume from (the run stopped before its first); run the same "
                         "alexnet train command again to start it over"),
])
def test_resume_from_a_damaged_checkpoint_is_a_one_line_error(capsys, tmp_path, finished_run, damage, words):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run, copy_function=os.link)  # hard links: the damaged file is replaced below
    last = run / "checkpoints" / "last.json"
    newest = run / "checkpoints" / json.loads(last.read_text())["dir"]
    target = (last if damage.startswith(("last.json", "checkpoints")) else run / "config.json"
              if damage.startswith("config.json") else newest / damage)
    data = target.read_bytes()
    target.unlink()  # not the fixture's file
    if damage == "checkpoints-none":  # killed during its first save: nothing but a partial folder
        shutil.rmtree(run / "checkpoints")
        (run / "checkpoints" / ".step-00000001.partial").mkdir(parents=True)
    elif damage == "last.json":  # and no step folder left to fall back on
        target.write_text("{garbage")
        for step in (run / "checkpoints").glob("step-*"):
            shutil.rmtree(step)
    elif damage == "last.json-escape":  # a folder outside the run
        target.write_text(json.dumps({"dir": "../../elsewhere", "step": 2}))
    elif damage == "last.json-other-run":  # another run's checkpoint, which exists
        target.write_text(json.dumps({"dir": str(finished_run / "checkpoints" / newest.name), "step": 2}))
    elif damage == "config.json":  # hand-edited to another network
        target.write_text(json.dumps({"model": {"variant": "owt"}}))
    elif damage == "config.json-key":
        target.write_text(json.dumps({"extra": 1}))
    elif damage.endswith("-bytes"):
        target.write_bytes(data[:5] + b"\xff\xfe" + data[5:])
    else:
        target.write_bytes(data[: len(data) // 3])
    def files():  # (the resume takes RUN/.lock first: not one of the run's files)
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    rc, out, err = main(capsys, "train", "--resume", run, "--no-test")
    one_line_error(rc, err, words)
    assert files() == before  # nothing touched


def test_convert_refuses_garbage(capsys, tmp_path):
    (tmp_path / "w.caffemodel").write_bytes(np.random.default_rng(1).bytes(3000))
    rc, out, err = main(capsys, "convert", tmp_path / "w.caffemodel", tmp_path / "out.safetensors")
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("argv, words", [
    (["train", "--data", "fashion-mnist", "--set", "train.lr=NaN"], "finite"),
    (["predict", "{pickle}", "{good}"], "not a readable safetensors file"),
])
def test_subprocess_stderr_is_exactly_one_line(tmp_path, corpus, argv, words):
    d, _ = corpus
    (tmp_path / "p.safetensors").write_bytes(pickle.dumps(_Payload(tmp_path / "PWNED")))
    argv = [a.format(pickle=tmp_path / "p.safetensors", good=d / "good.png") for a in argv]
    r = subprocess.run([sys.executable, "-m", "alexnet", *argv], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("command", ["show", "convert", "evaluate", "train"])
def test_an_output_path_that_cannot_be_made_is_a_one_line_error(capsys, tmp_path, model_file, finished_run,
                                                                command):
    """A folder given where a file goes, or a file in the way of a folder: one line,
    exit 2, before any work is done, and nothing in the way is changed."""
    folder, a_file = tmp_path / "folder", tmp_path / "a.jpg"
    folder.mkdir()
    a_file.write_bytes(b"not to be touched")
    data, best = finished_run.parent / "idx", finished_run / "best.safetensors"
    argv = {"show": (["show", "filters", model_file, "--out", folder], f"{folder} is a folder"),
            "convert": (["convert", "torchvision", tmp_path / "tv.pth", folder], f"{folder} is a folder"),
            "evaluate": (["evaluate", best, "--data", data, "--out", a_file / "eval"], f"{a_file} is a file"),
            "train": (["train", "--data", data, "--max-steps", "1", "--batch-size", "4", "--no-test",
                       "--out", a_file / "run"], f"{a_file} is a file")}[command]
    if command == "convert":
        from alexnet.reference import plain_alexnet

        torch.save(plain_alexnet("owt").state_dict(), tmp_path / "tv.pth")
    rc, out, err = main(capsys, *argv[0])
    one_line_error(rc, err, argv[1])
    assert a_file.read_bytes() == b"not to be touched" and list(folder.iterdir()) == []


@pytest.mark.parametrize("command", ["show", "convert", "export"])
def test_an_output_file_name_ending_in_a_slash_is_a_one_line_error(capsys, tmp_path, model_file, command):
    """`out.safetensors/` names a folder that does not exist: it was written as a file."""
    argv = {"show": ["show", "filters", model_file, "--out", f"{tmp_path / 'f.png'}/"],
            "convert": ["convert", "torchvision", tmp_path / "tv.pth", f"{tmp_path / 'w.safetensors'}/"],
            "export": ["export", model_file, f"{tmp_path / 'm.onnx'}/"]}[command]
    if command == "convert":
        from alexnet.reference import plain_alexnet

        torch.save(plain_alexnet("owt").state_dict(), tmp_path / "tv.pth")
    before = sorted(tmp_path.iterdir())
    rc, out, err = main(capsys, *argv)
    one_line_error(rc, err, f"{argv[-1]} names a folder; give a file name such as {argv[-1]}")
    assert sorted(tmp_path.iterdir()) == before


def test_written_files_follow_the_umask(tmp_path):
    from alexnet.fileio import atomic_write_text

    old = os.umask(0o027)
    try:
        import alexnet.fileio as fileio

        mask, fileio._UMASK = fileio._UMASK, 0o027
        try:
            atomic_write_text(tmp_path / "a.txt", "x")
        finally:
            fileio._UMASK = mask
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640


def two_class_tree(root, per_class: int = 1) -> None:
    """train/ and val/ ImageFolder splits of classes a and b, `per_class` small PNGs each."""
    for split in ("train", "val"):
        for i, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for j in range(per_class):
                Image.new("RGB", (40, 30), (40 + 100 * i, 30 * j, 20)).save(root / split / cls / f"{j}.png")


def test_a_class_folder_in_another_unicode_form_is_named_as_such(capsys, tmp_path):
    """macOS writes folder names decomposed ("e" + a combining accent); a checkpoint trained
    elsewhere holds them composed. The names print alike: the error says how they differ."""
    import unicodedata

    nfc = "blu\u00e9"
    nfd = unicodedata.normalize("NFD", nfc)
    for split in ("train", "val"):
        for i, c in enumerate(("a", nfd)):
            (tmp_path / "tree" / split / c).mkdir(parents=True)
            Image.new("RGB", (40, 30), (40 + 100 * i, 30, 20)).save(tmp_path / "tree" / split / c / "0.png")
    ck = checkpoint(tmp_path / "m.safetensors", ["a", nfc])
    rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "tree", "--out", tmp_path / "ev")
    one_line_error(rc, err, "written in another Unicode form ('blue\\u0301' against 'blu\\xe9'): rename the folder")


def test_evaluate_without_split_takes_test_else_val(capsys, tmp_path):
    """The default split: test; for a train/ val/ ImageFolder tree, val; with neither, the
    error names the missing test split."""
    two_class_tree(tmp_path / "tree")
    ck = checkpoint(tmp_path / "m.safetensors", ["a", "b"])
    rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "tree", "--out", tmp_path / "ev")
    assert rc == 0, err
    doc = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert doc["split"] == "val" and doc["images"] == 2
    import shutil

    # a store of the val split serves as the test split; the report names the split it holds
    rc, out, err = main(capsys, "prepare", tmp_path / "tree", tmp_path / "st", "--split", "val", "--quiet",
                        "--workers", "1")
    assert rc == 0, err
    rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "st", "--out", tmp_path / "ev3")
    assert rc == 0, err
    assert json.loads((tmp_path / "ev3" / "eval.json").read_text())["split"] == "val" and out.startswith("val:")

    shutil.rmtree(tmp_path / "tree" / "val")
    rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "tree", "--out", tmp_path / "ev2")
    one_line_error(rc, err, "no 'test' split")


def test_wordnet_ids_without_class_names_are_named_alike_by_predict_evaluate_and_export(capsys, tmp_path):
    """A model file saved with ImageNet's WordNet ids and no `class_names` (as the README's
    Python example saves one): every command shows the readable names."""
    wnids, readable = ["n01440764", "n01443537"], ["tench", "goldfish"]
    for split in ("train", "val"):
        for i, c in enumerate(wnids):
            (tmp_path / "tree" / split / c).mkdir(parents=True)
            Image.new("RGB", (40, 30), (40 + 100 * i, 30, 20)).save(tmp_path / "tree" / split / c / "0.png")
    ck = checkpoint(tmp_path / "m.safetensors", wnids)
    rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "tree", "--out", tmp_path / "ev")
    assert rc == 0, err
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["class_names"] == dict(zip(wnids, readable))
    from alexnet.predict import Classifier

    assert Classifier.load(ck, "cpu").class_names == readable
    rc, out, err = main(capsys, "export", ck, tmp_path / "m.pt2")
    assert rc == 0, err
    from alexnet.export import load_pt2

    assert json.loads(load_pt2(tmp_path / "m.pt2")[1]["alexnet.class_names"]) == readable


def test_a_max_pixels_above_pillows_own_limit_is_the_limit_that_holds(monkeypatch):
    """Pillow refuses more than 2 * Image.MAX_IMAGE_PIXELS (about 179 megapixels) by itself;
    a larger max_pixels must be the one that decides, with its own message."""
    from tests.corpus import bomb_png

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    with pytest.raises(ImageError, match=r"too large: 30000x30000 = 900000000 pixels > limit 500000000"):
        load_rgb(bomb_png(), max_pixels=500_000_000)
    with pytest.raises(ImageError, match=r"> limit 100000000"):  # the default, below Pillow's
        load_rgb(bomb_png())


def test_predict_names_a_fifo_or_dangling_link_given_by_name_and_lists_each_image_once(corpus, model_file,
                                                                                       capsys):
    d, _ = corpus
    good = sorted(p for p in d.iterdir() if p.name == "one.png")
    rc, out, err = main(capsys, "predict", model_file, d / "fifo.jpg", d / "dangling.png", *good, *good,
                        "--top", "1")
    assert rc == 1, err  # some images failed, the rest were predicted
    assert f"{d / 'fifo.jpg'}: not a regular file" in err
    assert f"{d / 'dangling.png'}: " in err and "no such file, or no image files" not in err
    assert [line for line in out.splitlines() if not line.startswith(" ")] == [str(good[0])]


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluate_leaves_an_unreadable_file_out_and_counts_it(capsys, tmp_path, workers):
    """Training replaces an unreadable file by the next readable one; evaluation must not
    count that neighbour twice: the figures equal those of the tree without the file, and
    eval.json says how many were left out."""

    two_class_tree(tmp_path / "tree", per_class=3)
    ck = checkpoint(tmp_path / "m.safetensors", ["a", "b"])
    rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "tree", "--out", tmp_path / "clean")
    assert rc == 0, err
    (tmp_path / "tree" / "val" / "a" / "1b.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "tree", "--out", tmp_path / "bad",
                            "--workers", workers, "--batch-size", "3")
    assert rc == 0, err
    assert "1 unreadable left out" in out
    clean, bad = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("clean", "bad"))
    assert bad["images"] == clean["images"] == 6 and bad["unreadable"] == 1 and "unreadable" not in clean
    for key in ("top1_err", "top5_err", "per_class_accuracy"):
        assert bad[key] == clean[key], key
    assert bad["loss"] == pytest.approx(clean["loss"], rel=1e-6)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_split_where_no_image_decodes_is_the_same_one_line_error_with_workers(capsys, tmp_path, workers):
    """A loader worker hands the data's own error back (it was the worker's traceback, exit 1)."""
    two_class_tree(tmp_path / "tree")
    for png in (tmp_path / "tree" / "val").rglob("*.png"):
        png.write_bytes(b"junk")
    ck = checkpoint(tmp_path / "m.safetensors", ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "tree", "--split", "val",
                            "--workers", workers)
    one_line_error(rc, err, f"no image in {tmp_path / 'tree' / 'val'} can be decoded")


def test_a_loader_worker_failure_is_one_line(capsys, tmp_path, monkeypatch):
    from alexnet import evaluate
    from alexnet.loader import LoaderWorkerError

    def killed(*a, **k):
        raise LoaderWorkerError("loader worker 0 failed on batch 3: OSError: [Errno 5] Input/output error\n"
                                "Traceback (most recent call last):\n  ...\nOSError: [Errno 5] Input/output error")

    monkeypatch.setattr(evaluate, "evaluate_checkpoint", killed)
    rc, out, err = main(capsys, "evaluate", tmp_path / "m.safetensors", "--data", tmp_path)
    one_line_error(rc, err, "loader worker 0 failed on batch 3: OSError: [Errno 5] Input/output error")


def test_a_data_error_during_training_names_its_step_and_the_resume():
    """The data's own error (as a loader worker now hands it back, and as it is without
    workers) is said as a worker's failure is: the step, and how to continue."""
    from types import SimpleNamespace

    from alexnet.sources import DataSourceError
    from alexnet.train import Trainer, TrainingError

    def fails():
        raise DataSourceError("no image in /d can be decoded")

    stub = SimpleNamespace(step=4, _fit=fails, _request_stop=lambda *a: None, _unlock=lambda: None,
                           _resume_hint=lambda: "the checkpoint of step 4 is intact; continue with: X")
    with pytest.raises(TrainingError, match=r"^data loading failed at step 5: no image in /d can be decoded; "
                                            r"the checkpoint of step 4 is intact; continue with: X$"):
        Trainer.fit(stub)


def test_a_test_split_that_fails_ends_a_finished_run_with_one_line_and_a_resume_tests_it(capsys, tmp_path):
    """Training is complete when the test evaluation fails: one line says so (with a worker
    it was a traceback, exit 1); a resume once the data is mended does the test evaluation,
    on the ten patches when the run was trained with --ten-crop (it used the centre crop)."""
    two_class_tree(tmp_path / "tree", per_class=2)
    for cls in ("a", "b"):
        (tmp_path / "tree" / "test" / cls).mkdir(parents=True)
        (tmp_path / "tree" / "test" / cls / "0.png").write_bytes(b"junk")
    run = tmp_path / "run"
    argv = ["--data", tmp_path / "tree", "--out", run, "--variant", "owt", "--set", f"model.fc_width={TEST_FC_WIDTH}",
            "--batch-size", "2", "--epochs", "1", "--max-steps", "1", "--workers", "1", "--device", "cpu",
            "--ten-crop"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rc, out, err = main(capsys, "train", *argv)
    last = err.splitlines()[-1]  # (after the progress lines)
    one_line_error(rc, last, "the test evaluation failed: no image in", "can be decoded; training is complete",
                   str(run / "best.safetensors"))
    assert "Traceback" not in err
    for cls in ("a", "b"):
        Image.new("RGB", (40, 30), (90, 60, 20)).save(tmp_path / "tree" / "test" / cls / "0.png")
    rc, out, err = main(capsys, "train", "--resume", run)
    assert rc == 0, err
    assert "test accuracy" in out
    assert json.loads((run / "eval-test-10crop" / "eval.json").read_text())["ten_crop"] is True  # (evaluate's name)
    assert not (run / "eval-test").exists()


def test_a_warning_is_one_line_of_the_command(tmp_path):
    """An unreadable file read on the fly warns in one `alexnet: warning:` line, not in
    Python's two lines naming a thread pool's source file; a newline in its name is
    written \\n, as predict writes it."""
    two_class_tree(tmp_path / "tree")
    (tmp_path / "tree" / "val" / "a" / "y\nz.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    ck = checkpoint(tmp_path / "m.safetensors", ["a", "b"])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "alexnet", "evaluate", str(ck), "--data", str(tmp_path / "tree"),
                        "--out", str(tmp_path / "ev")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "unreadable image" in x or "work_item" in x]
    assert len(lines) == 1 and lines[0].startswith("alexnet: warning: unreadable image a/y\\nz.png ("), r.stderr


def test_evaluate_on_a_flat_folder_names_its_labels_and_counts_the_unlabelled(capsys, tmp_path):
    """A flat folder's labels may come from a file found beside it (here a val.txt in the
    parent folder): evaluate names that file, warns about the images it does not label
    and counts them in eval.json; --labels gives another file, and a flat folder with
    nothing to label it is an error that points to --labels."""
    (tmp_path / "data" / "val").mkdir(parents=True)
    for i, name in enumerate(("x.png", "y.png", "z.png")):
        Image.new("RGB", (40, 30), (40 + 90 * i, 20, 20)).save(tmp_path / "data" / "val" / name)
    (tmp_path / "data" / "val.txt").write_text("x.png a\ny.png b\n")
    ck = checkpoint(tmp_path / "m.safetensors", ["a", "b"])
    with pytest.warns(RuntimeWarning, match=r"1 of the 3 images in .* has no usable label in .*val.txt and is left out \(first: z.png: no label in "
                                            r"ground truth val.txt\)"):
        rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "data" / "val", "--out", tmp_path / "ev")
    assert rc == 0, err
    assert f"labels: {tmp_path / 'data' / 'val.txt'} (1 image without a usable label left out)" in out
    doc = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert doc["images"] == 2 and doc["unlabelled"] == 1 and doc["labels_file"] == str(tmp_path / "data" / "val.txt")

    (tmp_path / "all.txt").write_text("x.png a\ny.png b\nz.png a\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "data" / "val", "--labels",
                            tmp_path / "all.txt", "--out", tmp_path / "ev2")
    assert rc == 0, err
    assert not [w for w in caught if "left out" in str(w.message)]
    assert f"labels: {tmp_path / 'all.txt'}\n" in out
    doc = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert doc["images"] == 3 and doc["unlabelled"] == 0

    (tmp_path / "pics").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "pics" / "x.png")
    rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "pics", "--out", tmp_path / "ev3")
    one_line_error(rc, err, "no 'test' split", "give its labels file (--labels)")
    rc, out, err = main(capsys, "evaluate", ck, "--data", tmp_path / "pics", "--labels", tmp_path / "all.txt",
                        "--out", tmp_path / "ev3")
    assert rc == 0, err
    assert json.loads((tmp_path / "ev3" / "eval.json").read_text())["images"] == 1


def test_accuracy_and_error_are_counted_not_subtracted():
    """9 hits of 10 are 0.9 and 0.1 exactly as floats go, not 1 - 0.9 = 0.09999999999999998."""
    from alexnet.evaluate import Metrics

    m = Metrics(count=10, loss=0.0, top1_hits=9, top5_hits=10, confusion=np.eye(2, dtype=np.int64))
    assert (m.top1_acc, m.top1_err, m.top5_acc, m.top5_err) == (0.9, 0.1, 1.0, 0.0)
    assert Metrics(count=0, loss=0.0, top1_hits=0, top5_hits=0, confusion=np.zeros((2, 2))).top1_err == 1.0


def test_a_run_folder_or_foreign_weights_given_as_the_model_say_what_to_give(capsys, tmp_path):
    """A run folder points to its best.safetensors; PyTorch or Caffe weights point to
    `alexnet convert`; a file that is neither gets no such hint."""
    run = tmp_path / "run"
    run.mkdir()
    rc, out, err = main(capsys, "evaluate", run)
    one_line_error(rc, err, f"{run} is a folder, not a model file")
    assert "best" not in err
    checkpoint(run / "best.safetensors", ["a", "b"])
    for argv in (["evaluate", run], ["export", run, tmp_path / "out.onnx"]):
        rc, out, err = main(capsys, *argv)
        one_line_error(rc, err, f"the run's best model is {run / 'best.safetensors'}")
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pth")
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights")  # known by its bytes, not its name
    (tmp_path / "bvlc.caffemodel").write_bytes(b"\x0a\x07AlexNet")
    (tmp_path / "junk.bin").write_bytes(b"junk junk junk")
    for command in ("evaluate", "export"):
        extra = [tmp_path / "out.onnx"] if command == "export" else []
        for name, kind in (("w.pth", "torchvision"), ("weights", "torchvision"), ("bvlc.caffemodel", "caffe"),
                           ("junk.bin", None)):
            rc, out, err = main(capsys, command, tmp_path / name, *extra)
            one_line_error(rc, err, "is not a readable safetensors file")
            hint = f"convert them first: alexnet convert {kind} {tmp_path / name} OUT.safetensors"
            assert (hint in err) == (kind is not None), err
    # an exported program is no weights to convert (convert refuses it): it runs on its own
    torch.export.save(torch.export.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),)), str(tmp_path / "m.pt2"))
    for argv in (["evaluate", tmp_path / "m.pt2"], ["predict", tmp_path / "m.pt2", tmp_path / "junk.bin"]):
        rc, out, err = main(capsys, *argv)
        one_line_error(rc, err, "is not a readable safetensors file")
        assert "it is an exported program (torch.export)" in err and "convert" not in err, err
    # a run's training state is no weights to convert: the model file is beside it
    step = run / "checkpoints" / "step-00000003"
    step.mkdir(parents=True)
    torch.save({"step": 3}, step / "state.pt")
    rc, out, err = main(capsys, "evaluate", step / "state.pt")
    one_line_error(rc, err, "is not a readable safetensors file")
    assert "convert" in err and "model file beside it" not in err  # no model.safetensors there yet
    checkpoint(step / "model.safetensors", ["a", "b"])
    rc, out, err = main(capsys, "evaluate", step / "state.pt")
    one_line_error(rc, err, f"this is a run's training state, and the model file beside it is "
                            f"{step / 'model.safetensors'}")
    assert "convert" not in err


def test_a_labels_file_beside_a_flat_folder_of_any_name_labels_it(capsys, tmp_path):
    """Found beside the folder, a ground-truth file labels it whatever the folder is
    called (not only val/ or test/); a folder named for a split is that split only; and
    --labels with data that has its own labels is an error, not ignored."""
    (tmp_path / "p" / "imgs").mkdir(parents=True)
    for i, name in enumerate(("x.png", "y.png")):
        Image.new("RGB", (40, 30), (40 + 90 * i, 20, 20)).save(tmp_path / "p" / "imgs" / name)
    (tmp_path / "p" / "val.txt").write_text("x.png a\ny.png b\n")
    ck = checkpoint(tmp_path / "m.safetensors", ["a", "b"])
    for split, out in ((None, "ev"), ("val", "ev-val")):
        flags = ["--split", split] if split else []
        rc, _, err = main(capsys, "evaluate", ck, "--data", tmp_path / "p" / "imgs", *flags, "--out", tmp_path / out)
        assert rc == 0, err
        doc = json.loads((tmp_path / out / "eval.json").read_text())
        assert doc["images"] == 2 and doc["labels_file"] == str(tmp_path / "p" / "val.txt")
        assert doc["split"] == (split or "test")
    (tmp_path / "p" / "imgs").rename(tmp_path / "p" / "val")  # named val: not a test split, with --labels too
    rc, _, err = main(capsys, "evaluate", ck, "--data", tmp_path / "p" / "val", "--labels", tmp_path / "p" / "val.txt",
                      "--out", tmp_path / "ev-named")
    assert rc == 0, err
    assert json.loads((tmp_path / "ev-named" / "eval.json").read_text())["split"] == "val"
    rc, _, err = main(capsys, "evaluate", ck, "--data", tmp_path / "p" / "val", "--split", "test",
                      "--out", tmp_path / "ev-test")
    one_line_error(rc, err, "no 'test' split")
    rc, _, err = main(capsys, "evaluate", ck, "--labels", tmp_path / "p" / "val.txt", "--out", tmp_path / "ev-fm")
    one_line_error(rc, err, "applies to a flat folder of images", "is IDX data")
    rc, _, err = main(capsys, "evaluate", ck, "--data", tmp_path / "p" / "val", "--labels", tmp_path / "p",
                      "--out", tmp_path / "ev-dir")
    one_line_error(rc, err, f"the ground-truth file {tmp_path / 'p'} is a folder")
    assert not (tmp_path / "ev-fm").exists() and not (tmp_path / "ev-dir").exists()
    # a tree of class folders (with a stray image) beside a val.txt is no flat folder: the
    # file does not make it a validation split, and the error does not ask for --labels
    (tmp_path / "q" / "t" / "a").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "q" / "t" / "a" / "x.png")
    Image.new("RGB", (40, 30)).save(tmp_path / "q" / "t" / "loose.png")
    (tmp_path / "q" / "val.txt").write_text("x.png a\n")
    rc, _, err = main(capsys, "evaluate", ck, "--data", tmp_path / "q" / "t", "--split", "val",
                      "--out", tmp_path / "ev-tree")
    one_line_error(rc, err, "no 'val' split")
    assert "--labels" not in err


def test_an_output_extension_is_matched_whatever_its_case(tmp_path):
    from alexnet.fileio import OutputError, require_suffix

    for name in ("m.png", "M.PNG", "m.Png"):
        require_suffix(tmp_path / name, "a PNG picture", ".png")
    with pytest.raises(OutputError, match=r"m.jpg: this writes a PNG picture; give a name ending in .png$"):
        require_suffix(tmp_path / "m.jpg", "a PNG picture", ".png")
