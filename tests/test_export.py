"""`alexnet export`: the ONNX graph, run by onnxruntime, against the PyTorch model (our own
LRN kernel there, ONNX's LRN operator here), at two batch sizes through one file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from alexnet.checkpoint import CheckpointError
from alexnet.fileio import OutputError
from tests.helpers import crops_and_inputs, model_file_with_statistics, run_command

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

NUM_CLASSES = 5
# |onnxruntime - PyTorch| over the logits, relative to the largest |logit|: float32 sums in
# another order differ by ~1e-6; alpha given in the wrong form (alpha_sum, not alpha_sum * n)
# or BatchNorm in training mode differ by more than 1e-2.
REL_BOUND = 1e-4


def make_checkpoint(path, variant: str):
    return model_file_with_statistics(path, variant, NUM_CLASSES)


@pytest.fixture(scope="module", params=["paper", "owt", "bn"])
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model, stats = make_checkpoint(folder / "model.safetensors", request.param)
    out = folder / "sub" / "model.onnx"
    assert run_command("export", str(folder / "model.safetensors"), str(out), "--format", "onnx") == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return request.param, model, stats, out, onnx.load(str(out)), session


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch(exported, batch):
    variant, model, stats, _, _, session = exported
    crops, x = crops_and_inputs(stats, model.cfg.input_size, batch, seed=batch)
    with torch.inference_mode():
        ref = model(x)
        ref_fused = model(x.contiguous(memory_format=torch.channels_last))  # our fastest path
    logits, probs = session.run(["logits", "probabilities"], {"images": crops.numpy()})
    assert logits.shape == probs.shape == (batch, NUM_CLASSES)
    scale = ref.abs().max().item()
    assert scale > 1e-3  # a dead network would match anything
    for r in (ref, ref_fused):
        assert np.abs(logits - r.numpy()).max() / scale < REL_BOUND
    # the second output is the softmax of the first (logits of tens, as here, make
    # the softmax steep: the logits' float rounding is seen in it, not the output's own)
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-6)


def test_graph_has_dynamic_batch_and_onnx_lrn(exported):
    variant, _, _, _, proto, _ = exported
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    side = 224 if variant == "owt" else 227
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, side, side]
    lrn = [n for n in proto.graph.node if n.op_type == "LRN"]
    assert len(lrn) == (2 if variant == "paper" else 0)
    for node in lrn:  # the paper's alpha 1e-4 over n=5 maps, k=2, beta 0.75 (section 3.3), Caffe's form
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["size"] == 5
        assert attrs["alpha"] == pytest.approx(5e-4) and attrs["beta"] == pytest.approx(0.75)
        assert attrs["bias"] == pytest.approx(2.0)


def test_metadata(exported):
    variant, model, stats, _, proto, _ = exported
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["alexnet.classes"] == [f"n0000{i}" for i in range(NUM_CLASSES)]
    assert meta["alexnet.class_names"] == [f"class {i}" for i in range(NUM_CLASSES)]
    pre = meta["alexnet.preprocess"]
    assert (pre["image_size"], pre["crop"], pre["pixel_scale"]) == (256, model.cfg.input_size, 1.0)
    assert "mean_rgb" not in pre and "subtracts the mean image" in pre["layout"]  # (the graph does)
    assert meta["alexnet.model_config"] == {"variant": variant, "num_classes": NUM_CLASSES,
                                            "input_size": model.cfg.input_size}


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_exported_program_gives_predicts_probabilities_from_the_centre_crop_alone(tmp_path, fmt):
    """The whole path a server takes: an image file rescaled and centre-cropped (predict's
    own preparation), its crop's pixels fed to the exported program with nothing else of
    the checkpoint, against `predict`. A mean image with spatial structure and a
    pixel_scale other than 1, both of which the graph must apply itself."""
    from PIL import Image

    from alexnet.augment import center_crop
    from alexnet.checkpoint import save_model
    from alexnet.dataset import DataStats
    from alexnet.export import load_pt2
    from alexnet.model import build_model
    from alexnet.predict import Classifier

    torch.manual_seed(0)
    model = build_model("paper", num_classes=NUM_CLASSES, init="kaiming", fc_width=256)
    ramp = torch.linspace(0, 1, 256)
    mean = torch.stack([200 * ramp[None, :].expand(256, 256), 180 * ramp[:, None].expand(256, 256),
                        torch.full((256, 256), 90.0)])  # far from its per-channel average at the edges
    save_model(tmp_path / "m.safetensors", model, [f"c{i}" for i in range(NUM_CLASSES)],
               DataStats(mean, torch.ones(3), torch.eye(3)), {"image_size": 256, "crop": 227, "pixel_scale": 58.0})
    out = tmp_path / f"m.{fmt}"
    assert run_command("export", str(tmp_path / "m.safetensors"), str(out)) == 0
    rng = np.random.default_rng(4)
    paths = []
    for i, (w, h) in enumerate([(320, 240), (200, 300), (256, 256)]):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    clf = Classifier.load(tmp_path / "m.safetensors", "cpu")
    want = clf.probabilities(paths).numpy()
    crops = torch.stack([center_crop(clf.prepare(p)[None], 227)[0] for p in paths]).float()
    if fmt == "onnx":
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        probs = session.run(["probabilities"], {"images": crops.numpy()})[0]
    else:
        module, _ = load_pt2(out)
        with torch.inference_mode():
            probs = module(crops)[1].numpy()
    assert want.max(1).min() < 0.99  # not saturated: a wrong input would show
    np.testing.assert_allclose(probs, want, atol=1e-5)


def test_success_leaves_only_the_file(exported):
    out = exported[3]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]


def test_missing_checkpoint_writes_nothing(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous")
    with pytest.raises(CheckpointError, match="no checkpoint file at") as e:
        run_command("export", str(tmp_path / "missing.safetensors"), str(out))
    assert "\n" not in str(e.value)
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_unknown_format_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_command("export", str(tmp_path / "m.safetensors"), str(tmp_path / "m.onnx"), "--format", "tflite")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "invalid choice: 'tflite'" in err
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"the folder is checked before the checkpoint is read")
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OutputError, match="not a writable folder") as e:
        run_command("export", str(tmp_path / "model.safetensors"), str(blocker / "out" / "model.onnx"))
    assert "\n" not in str(e.value)
    with pytest.raises(OutputError, match="is a folder"):
        run_command("export", str(tmp_path / "model.safetensors"), str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "model.safetensors"]


def test_export_never_writes_over_its_checkpoint(tmp_path, capsys):
    from alexnet import cli

    make_checkpoint(tmp_path / "model.safetensors", "bn")
    before = (tmp_path / "model.safetensors").read_bytes()
    assert cli.main(["export", str(tmp_path / "model.safetensors"), str(tmp_path / "model.safetensors")]) == 2
    assert "is the input" in capsys.readouterr().err
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_a_nan_difference_is_refused(tmp_path, monkeypatch):
    """NaN > tolerance is False: the check must be written so that NaN fails it."""
    import alexnet.export as export

    make_checkpoint(tmp_path / "model.safetensors", "bn")
    monkeypatch.setattr(export, "compare", lambda *a, **k: float("nan"))
    with pytest.raises(export.ExportError, match="differ .* by nan"):
        export.export_checkpoint(tmp_path / "model.safetensors", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_the_format_follows_the_file_name_unless_given():
    from alexnet.export import format_for

    assert format_for("a/alexnet.pt2", None) == "pt2"
    assert format_for("alexnet.PT2", None) == "pt2"
    assert format_for("alexnet.onnx", None) == "onnx"
    assert format_for("alexnet.bin", None) == "onnx"  # and then refused (below)
    assert format_for("alexnet.pt2", "onnx") == "onnx"


@pytest.mark.parametrize("name, flags, words", [
    ("model.bin", [], "this writes an ONNX graph (.onnx) or a torch.export program (.pt2); give a name ending in "
                      ".onnx or .pt2"),
    ("model.pt", ["--format", "onnx"], "this writes an ONNX graph (.onnx) or a torch.export program (.pt2); give a "
                                       "name ending in .onnx or .pt2"),
    ("model.pt2", ["--format", "onnx"], "this writes an ONNX graph; give a name ending in .onnx"),
    ("model.onnx", ["--format", "pt2"], "this writes a torch.export program; give a name ending in .pt2"),
])
def test_an_output_name_of_another_format_is_refused(tmp_path, capsys, name, flags, words):
    """An ONNX graph written as model.pt would be opened as the wrong thing later."""
    from alexnet import cli

    make_checkpoint(tmp_path / "model.safetensors", "bn")
    assert cli.main(["export", str(tmp_path / "model.safetensors"), str(tmp_path / name), *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"alexnet: error: {tmp_path / name}: {words}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
