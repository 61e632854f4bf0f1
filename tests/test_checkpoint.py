"""Model files written before the current format still load, with the same outputs."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from alexnet.checkpoint import FORMAT_V1, load_model_file, save_model
from alexnet.config import run_config, to_dict
from alexnet.model import build_model
from alexnet.train import Trainer
from tests.helpers import TEST_FC_WIDTH

CLASSES = ["a", "b", "c", "d"]


def write_v1(path, model):
    """`model` as format 1 wrote it: the paper variants' fc6 and fc7 at classifier.1 and .4
    (dropout came first), and no dropout_form in the config (it was always inverted)."""
    back = {"classifier.0.": "classifier.1.", "classifier.3.": "classifier.4."}
    tensors = {}
    for k, v in model.state_dict().items():
        if model.cfg.variant != "owt":
            k = next((new + k[len(old):] for old, new in back.items() if k.startswith(old)), k)
        tensors[k] = v.contiguous()
    cfg = to_dict(model.cfg)
    del cfg["dropout_form"]
    save_file(tensors, str(path), metadata={
        "format": FORMAT_V1, "model_config": json.dumps(cfg), "classes": json.dumps(CLASSES),
        "preprocess": json.dumps({"image_size": 256, "crop": model.cfg.input_size}), "extra": "{}"})


@pytest.mark.parametrize("variant", ["paper", "owt", "bn"])
def test_a_format_1_model_file_loads_with_the_same_outputs(variant, tmp_path):
    torch.manual_seed(0)
    old = build_model(variant, num_classes=4, dropout_form="inverted", init="kaiming", fc_width=TEST_FC_WIDTH).eval()
    write_v1(tmp_path / "v1.safetensors", old)
    ck = load_model_file(tmp_path / "v1.safetensors")
    assert ck.model_config.dropout_form == "inverted"
    new = ck.build_model().eval()
    s = old.cfg.input_size
    x = torch.randn(2, 3, s, s) * 60
    with torch.no_grad():
        assert torch.equal(new(x), old(x))
    # saved again, it is a current-format file that loads the same
    save_model(tmp_path / "v2.safetensors", new, CLASSES, None, ck.preprocess)
    again = load_model_file(tmp_path / "v2.safetensors")
    assert again.model_config == ck.model_config
    assert again.state_dict.keys() == new.state_dict().keys()
    for k, v in new.state_dict().items():  # bit for bit, dtype included (BN's int64 counter too)
        assert again.state_dict[k].dtype == v.dtype and torch.equal(again.state_dict[k], v), k


def test_a_model_file_keeps_weights_statistics_classes_and_preprocessing_exactly(tmp_path):
    from alexnet.dataset import DataStats

    torch.manual_seed(1)
    model = build_model("paper", num_classes=4, fc_width=TEST_FC_WIDTH)
    q, _ = torch.linalg.qr(torch.randn(3, 3))  # an orthonormal basis that is not symmetric
    stats = DataStats(torch.rand(3, 256, 256) * 255, torch.tensor([900.0, 40.0, 3.0]), q.float())
    pre = {"image_size": 256, "crop": 227, "pixel_scale": 1.0, "mean": "mean_image"}
    save_model(tmp_path / "m.safetensors", model, CLASSES, stats, pre, {"epoch": 3, "class_names": CLASSES})
    ck = load_model_file(tmp_path / "m.safetensors")
    assert (ck.classes, ck.preprocess, ck.extra["epoch"]) == (CLASSES, pre, 3)
    for name in ("mean_image", "eigval", "eigvec"):
        assert torch.equal(getattr(ck.stats, name), getattr(stats, name)), name
    for k, v in model.state_dict().items():
        assert ck.state_dict[k].dtype == v.dtype and torch.equal(ck.state_dict[k], v), k


@pytest.mark.parametrize("section, key, now, before", [
    ("model", "dropout_form", "paper", "inverted"),  # a run begun before dropout_form trained with nn.Dropout's
    ("train", "momentum_form", "paper", "pytorch"),  # and before momentum_form, with PyTorch's momentum
])
def test_a_run_begun_before_an_option_resumes_as_it_started(tmp_path, section, key, now, before):
    cfg = to_dict(run_config("paper"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert getattr(getattr(Trainer._read_config(SimpleNamespace(run_dir=tmp_path)), section), key) == now
    del cfg[section][key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert getattr(getattr(Trainer._read_config(SimpleNamespace(run_dir=tmp_path)), section), key) == before


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_model_file_with_non_finite_weights_is_refused(tmp_path, value):
    from alexnet.checkpoint import CheckpointError

    model = build_model("bn", num_classes=3, fc_width=TEST_FC_WIDTH)
    with torch.no_grad():
        model.layer("fc7").weight[1, 2] = value
    save_model(tmp_path / "m.safetensors", model, ["a", "b", "c"], None, {})
    with pytest.raises(CheckpointError, match=r"classifier.3.weight holds 1 NaN or infinite value; the file is broken"):
        load_model_file(tmp_path / "m.safetensors")


def test_a_model_file_with_negative_batchnorm_variances_is_refused(tmp_path):
    """Finite, but BatchNorm takes their square root: predict printed "nan" as a probability."""
    from alexnet.checkpoint import CheckpointError

    model = build_model("bn", num_classes=3, fc_width=TEST_FC_WIDTH)
    with torch.no_grad():
        model.features[1].running_var[[0, 5]] = -1.0
    save_model(tmp_path / "m.safetensors", model, ["a", "b", "c"], None, {})
    with pytest.raises(CheckpointError, match=r"features.1.running_var holds 2 negative variances; the file is broken"):
        load_model_file(tmp_path / "m.safetensors")


def test_metadata_of_the_wrong_types_is_refused_with_one_line(tmp_path):
    """Hand-edited or foreign files: each reader takes these types for granted, and got a
    traceback (AttributeError, TypeError, IndexError) before the check."""
    from safetensors import safe_open

    from alexnet.checkpoint import CheckpointError

    good = tmp_path / "good.safetensors"
    save_model(good, build_model("owt", num_classes=3, fc_width=TEST_FC_WIDTH), ["a", "b", "c"], None,
               {"image_size": 256, "crop": 224, "pixel_scale": 1.0}, {"class_names": ["A", "B", "C"]})
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert load_model_file(good).extra["class_names"] == ["A", "B", "C"]
    cases = [
        ("preprocess", "[]", "'preprocess' and 'extra' must be JSON objects"),
        ("extra", "[1]", "'preprocess' and 'extra' must be JSON objects"),
        ("classes", "[0, 1, 2]", "its class list holds entries that are not strings"),
        ("classes", '["a", "b"]', "lists 2 class names for a 3-class network"),
        ("preprocess", '{"image_size": 256, "crop": 224, "pixel_scale": "x"}', "pixel_scale 'x' is not a positive"),
        ("preprocess", '{"image_size": 256, "crop": 224, "pixel_scale": 0}', "pixel_scale 0 is not a positive"),
        ("preprocess", '{"image_size": "256", "crop": 224}', "image_size '256' is not a positive integer"),
        ("preprocess", '{"image_size": 256, "crop": true}', "crop True is not a positive integer"),
        ("extra", '{"class_names": ["A", "B"]}', "its class_names are not 3 strings"),
    ]
    for key, value, message in cases:
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={**meta, key: value})
        with pytest.raises(CheckpointError) as e:
            load_model_file(bad)
        assert message in str(e.value) and "\n" not in str(e.value), (key, value, str(e.value))


def test_save_model_writes_nothing_that_could_not_be_read_back(tmp_path):
    """The Python API's save_model checks what load_model_file and Classifier.load take for
    granted: a class list of the wrong length, preprocessing that does not fit the mean
    image or the network, values JSON cannot hold. It wrote such files, which then failed
    on load (or in json, with a bare TypeError)."""
    import numpy as np

    from alexnet.checkpoint import CheckpointError
    from alexnet.dataset import DataStats

    model = build_model("paper", num_classes=4, fc_width=64)
    stats = DataStats(torch.zeros(3, 256, 256), torch.ones(3), torch.eye(3))
    good = {"image_size": 256, "crop": 227, "pixel_scale": 1.0}
    cases = [
        (["a", "b", "c"], good, None, "lists 3 class names for a 4-class network"),
        (CLASSES, {}, None, "preprocess must give image_size 256 (the mean image's side) and crop 227"),
        (CLASSES, {**good, "crop": 224}, None, "crop 227 (the network's input), not 256 and 224"),
        (CLASSES, {**good, "image_size": np.int64(256)}, None, "preprocess image_size np.int64(256) is not a positive integer"),
        (CLASSES, good, {"when": object()}, "preprocess and extra must hold JSON values only"),
    ]
    for classes, preprocess, extra, message in cases:
        path = tmp_path / "m.safetensors"
        with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            save_model(path, model, classes, stats, preprocess, extra)
        assert not path.exists(), message
    save_model(tmp_path / "ok.safetensors", model, tuple(CLASSES), stats, good, {"epoch": 1})
    assert load_model_file(tmp_path / "ok.safetensors").classes == CLASSES


def test_saved_extra_reads_the_header_alone(tmp_path):
    from alexnet.checkpoint import saved_extra

    path = tmp_path / "m.safetensors"
    save_model(path, build_model("owt", num_classes=4, fc_width=16), CLASSES, None, {}, {"epoch": 3})
    assert saved_extra(path) == {"epoch": 3}
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "list.safetensors"), metadata={"extra": "[1, 2]"})
    for bad in ("missing.safetensors", "junk.safetensors", "list.safetensors"):
        assert saved_extra(tmp_path / bad) is None, bad


def test_a_pipe_named_as_the_model_file_is_said_to_be_one(tmp_path):
    """A named pipe (or device) where the model file should be: "no checkpoint file at" it
    said, of a file that is there."""
    import os

    from alexnet.checkpoint import CheckpointError

    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"m.safetensors is not a regular file \(a pipe, socket or device\), "
                                              r"not a checkpoint file$"):
        load_model_file(fifo)
    with pytest.raises(CheckpointError, match=r"^no checkpoint file at .*none.safetensors$"):
        load_model_file(tmp_path / "none.safetensors")
