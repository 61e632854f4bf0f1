"""`alexnet export --format pt2`: the torch.export program, loaded back in a Python that
never imports this package, against the PyTorch model (our LRN kernel and fused path
there, plain aten operations in the program), at two batch sizes through one file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from alexnet.export import load_pt2, metadata
from alexnet.checkpoint import load_model_file
from tests.helpers import crops_and_inputs, model_file_with_statistics, run_command

NUM_CLASSES = 4
REL_BOUND = 1e-4  # as for ONNX: float32 sums in another order differ by ~1e-6 of the scale

# Run by a separate interpreter: load the archive with torch alone, run it on the saved
# inputs, and say whether anything of alexnet was imported on the way.
LOADER = """
import io, json, sys, numpy as np, torch
path, inputs, outputs = sys.argv[1:4]
meta = {"alexnet.classes": "", "alexnet.preprocess": ""}
module = torch.export.load(path, extra_files=meta).module()
x = np.load(inputs)
results = {}
with torch.inference_mode():
    for n in (1, 3):
        logits, probs = module(torch.from_numpy(x[:n]))
        results[f"logits{n}"], results[f"probs{n}"] = logits.numpy(), probs.numpy()
np.savez(outputs, **results)
print(json.dumps({"alexnet_imported": any(m.split(".")[0] == "alexnet" for m in sys.modules), **meta}))
"""


@pytest.fixture(scope="module", params=["paper", "bn"])
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model, stats = model_file_with_statistics(folder / "model.safetensors", request.param, NUM_CLASSES)
    out = folder / "sub" / "model.pt2"
    assert run_command("export", str(folder / "model.safetensors"), str(out), "--format", "pt2") == 0
    return request.param, model, folder / "model.safetensors", out, stats


def test_a_python_without_alexnet_runs_it_like_pytorch(exported, tmp_path):
    variant, model, _, out, stats = exported
    crops, x = crops_and_inputs(stats, model.cfg.input_size, 3, seed=7)  # the program takes the crops
    np.save(tmp_path / "x.npy", crops.numpy())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", LOADER, str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npz")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    said = json.loads(r.stdout.splitlines()[-1])
    assert said["alexnet_imported"] is False
    assert json.loads(said["alexnet.classes"]) == [f"n0000{i}" for i in range(NUM_CLASSES)]
    y = np.load(tmp_path / "y.npz")
    with torch.inference_mode():
        ref = model(x)
        ref_fused = model(x.contiguous(memory_format=torch.channels_last))  # our fastest path
    scale = ref.abs().max().item()
    assert scale > 1e-3  # a dead network would match anything
    for n in (1, 3):
        assert y[f"logits{n}"].shape == y[f"probs{n}"].shape == (n, NUM_CLASSES)
        for r_ in (ref, ref_fused):
            assert np.abs(y[f"logits{n}"] - r_[:n].numpy()).max() / scale < REL_BOUND
        np.testing.assert_allclose(y[f"probs{n}"], torch.softmax(torch.from_numpy(y[f"logits{n}"]), 1).numpy(),
                                   atol=1e-6)


def test_program_is_plain_aten_with_a_dynamic_batch(exported):
    variant, model, _, out, _ = exported
    program = torch.export.load(str(out))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert all(t.startswith("aten.") for t in targets), targets  # no kernel of ours inside
    assert any("avg_pool3d" in t for t in targets) == (variant == "paper")  # LRN as aten ops
    spec = program.graph_signature.user_inputs
    assert list(spec) == ["images"]
    shape = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "images").meta["val"].shape
    s = model.cfg.input_size
    assert isinstance(shape[0], torch.SymInt) and tuple(shape[1:]) == (3, s, s)


def test_metadata_is_the_checkpoints(exported):
    _, _, ck_path, out, _ = exported
    _, meta = load_pt2(out)
    assert meta == metadata(load_model_file(ck_path))  # the same keys and JSON as the ONNX file's
    assert json.loads(meta["alexnet.class_names"]) == [f"class {i}" for i in range(NUM_CLASSES)]


def test_success_leaves_only_the_file(exported):
    out = exported[3]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.pt2"]
