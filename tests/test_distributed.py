"""Two Gloo processes on the CPU train to the same weights as one process with the same
global batch."""

import json
import socket

import pytest
import torch
import torch.multiprocessing as mp

from alexnet.checkpoint import load_model_file
from dataclasses import replace

from alexnet.config import run_config
from alexnet.model import AlexNet
from tests.test_train import write_idx


def _config(data):
    # image_size == crop, no flips, no lighting, no dropout: the only randomness left is the
    # epoch order, which every rank shares, so the two runs must agree; float32 (amp off),
    # since bf16 autocast (auto on a CPU with native bf16) rounds half batches differently;
    # losses read back every 2 steps (the GPU's way: the ranks agree on stopping then)
    return run_config("paper", {
        "data": {"path": str(data), "num_workers": 0, "image_size": 227, "flip": False, "lighting_std": 0.0},
        "model": {"dropout": 0.0},
        "train": {"batch_size": 8, "epochs": 1, "max_steps": 3, "lr": 0.001, "checkpoint_every": 0,
                  "deterministic": True, "amp": "off", "log_every": 2},
    })


def _worker(rank, world, port, data, out):
    import os

    from alexnet.train import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    t = Trainer(_config(data), out, quiet=True)
    try:
        t.fit()
    finally:
        t.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_weights(run):
    last = json.loads((run / "checkpoints" / "last.json").read_text())
    return load_model_file(run / "checkpoints" / last["dir"] / "model.safetensors").state_dict


def test_two_gloo_processes_equal_one_process(tmp_path):
    data = write_idx(tmp_path / "idx")
    from alexnet.train import Trainer

    single = Trainer(_config(data), tmp_path / "single", quiet=True)
    single.fit()
    mp.spawn(_worker, args=(2, _free_port(), data, tmp_path / "ddp"), nprocs=2, join=True)
    a, b = _last_weights(tmp_path / "single"), _last_weights(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    torch.manual_seed(0)  # the initial weights, to show that training moved them
    init = AlexNet(replace(single.cfg.model)).state_dict()
    assert not torch.allclose(init["classifier.6.weight"], a["classifier.6.weight"], rtol=0, atol=1e-7)
    log_a = json.loads((tmp_path / "single" / "log.jsonl").read_text().splitlines()[0])
    log_b = json.loads((tmp_path / "ddp" / "log.jsonl").read_text().splitlines()[0])
    # exact validation counts: both saw the same 4 held-out images
    assert log_a["val_top1_err"] == pytest.approx(log_b["val_top1_err"])
    assert log_a["step"] == log_b["step"] == 3
    assert log_a["train_loss"] == pytest.approx(log_b["train_loss"], rel=1e-4)
