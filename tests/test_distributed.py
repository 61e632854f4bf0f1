"""Two Gloo processes on the CPU train to the same weights as one process with the same
global batch."""

import json
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from alexnet.checkpoint import load_model_file
from dataclasses import replace

from alexnet.config import run_config, to_dict
from alexnet.model import AlexNet
from tests.helpers import TEST_FC_WIDTH
from tests.test_train import write_idx


def _config(data):
    # image_size == crop, no flips, no lighting, no dropout: the only randomness left is the
    # epoch order, which every rank shares, so the two runs must agree; float32 (amp off),
    # since bf16 autocast (auto on a CPU with native bf16) rounds half batches differently;
    # losses read back every 2 steps (the GPU's way: the ranks agree on stopping then)
    return run_config("paper", {
        "data": {"path": str(data), "num_workers": 0, "image_size": 227, "flip": False, "lighting_std": 0.0},
        "model": {"dropout": 0.0, "fc_width": TEST_FC_WIDTH},
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


# --- stopping, resuming and the run folder under DDP ----------------------------------------


def _run_worker(rank, world, port, cfg, out, resume, stop_rank, stop_step, report, kill=None):
    """One process of a 2-process run: with `stop_rank`, that process alone is asked to stop
    during step `stop_step` (with `kill`, a signal, it is sent that signal there instead);
    writes what it saw to report-RANK.json."""
    import gc
    import os

    from alexnet.train import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    seen = {}
    try:
        t = Trainer(None, out, resume=True, quiet=True) if resume else Trainer(cfg, out, quiet=True)
    except Exception as e:
        seen["error"] = f"{type(e).__name__}: {e}"
    else:
        if not resume:  # (a draw between a resume and its first step would shift the masks)
            seen["first_draw"] = torch.rand(1).item()  # the generator dropout draws from
        if rank == stop_rank:
            inner = t._train_step

            def step(x, y):
                loss = inner(x, y)
                if t.step + 1 == stop_step:
                    if kill:
                        os.kill(os.getpid(), kill)
                    t.stop_requested = True
                return loss

            t._train_step = step
        try:
            seen.update(t.fit())
        except Exception as e:
            seen["error"] = f"{type(e).__name__}: {e}"
        finally:
            t.close()
        seen["ddp_after_close"] = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel)
                                      for o in gc.get_objects())
    (report / f"report-{rank}.json").write_text(json.dumps(seen))


def _two_processes(cfg, out, report, resume=False, stop_rank=None, stop_step=0):
    report.mkdir(exist_ok=True)
    mp.spawn(_run_worker, args=(2, _free_port(), cfg, out, resume, stop_rank, stop_step, report), nprocs=2,
             join=True)
    return [json.loads((report / f"report-{r}.json").read_text()) for r in range(2)]


def _dropout_config(data, **train):
    return run_config("paper", {
        "data": {"path": str(data), "num_workers": 0, "image_size": 227},
        "model": {"dropout": 0.5, "fc_width": TEST_FC_WIDTH},
        "train": {"batch_size": 8, "epochs": 1, "max_steps": 4, "lr": 0.001, "checkpoint_every": 0,
                  "deterministic": True, "amp": "off", "log_every": 100, **train},
    })


def test_one_process_asked_to_stop_stops_all_after_that_step(tmp_path):
    """Stop requests are agreed after every step, not at the next loss read-back (here 100
    steps away): a SIGTERM from torchrun is answered within one step, inside its grace time."""
    data = write_idx(tmp_path / "idx")
    seen = _two_processes(_dropout_config(data), tmp_path / "r", tmp_path / "rep", stop_rank=1, stop_step=2)
    assert [s["stopped"] for s in seen] == [True, True] and [s["step"] for s in seen] == [2, 2]
    assert json.loads((tmp_path / "r" / "checkpoints" / "last.json").read_text())["step"] == 2
    assert (tmp_path / "r" / "stopped").read_text() == "stopped at step 2\n"
    assert seen[0]["first_draw"] != seen[1]["first_draw"]  # each process draws its own dropout masks
    # the trainer lives on (rank 1's in a reference cycle through its patched step), its DDP
    # wrapper, which holds the process group, does not: the group ended in close(), not at exit
    assert [s["ddp_after_close"] for s in seen] == [0, 0]


def test_batchnorm_validates_with_fewer_images_than_processes(tmp_path):
    """The bn network under DDP with one validation image for two processes: the process
    with no image to validate ran no DDP forward, whose buffer broadcast the other waited
    on until the timeout. Both now finish, on rank 0's running statistics."""
    data = write_idx(tmp_path / "idx")
    cfg = run_config("fast", {
        "data": {"path": str(data), "num_workers": 0, "image_size": 227, "val_holdout": 1},
        "model": {"fc_width": TEST_FC_WIDTH},
        "train": {"batch_size": 8, "epochs": 1, "max_steps": 2, "checkpoint_every": 0, "amp": "off",
                  "dist_timeout": 20}})
    assert cfg.model.variant == "bn"
    seen = _two_processes(cfg, tmp_path / "r", tmp_path / "rep")
    assert [s.get("error") for s in seen] == [None, None] and [s["step"] for s in seen] == [2, 2]
    row = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[0])
    assert row["val_top1_err"] in (0.0, 1.0)  # one image, counted once


def test_a_run_folder_in_use_is_one_line_on_every_process(tmp_path):
    data = write_idx(tmp_path / "idx")
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "config.json").write_text(json.dumps(to_dict(_dropout_config(data))))
    (tmp_path / "r" / "checkpoints" / "last.json").write_text("{}")
    seen = _two_processes(_dropout_config(data), tmp_path / "r", tmp_path / "rep")
    for s in seen:
        assert s["error"].startswith("ConfigError: ") and "already holds a run" in s["error"], s


def test_a_process_killed_mid_run_leaves_one_line_on_the_others(tmp_path):
    """kill -9 of one process (as a crash or the OOM killer does it) during step 3: the other
    ends at once with one line naming the process group's reason and the checkpoint to
    resume from, not with Gloo's traceback, and does not wait for it."""
    data = write_idx(tmp_path / "idx")
    report = tmp_path / "rep"
    report.mkdir()
    args = (2, _free_port(), _dropout_config(data, checkpoint_every=1), tmp_path / "r", False, 1, 3, report,
            signal.SIGKILL)
    ctx = mp.spawn(_run_worker, args=args, nprocs=2, join=False)
    try:
        for p in ctx.processes:
            p.join(120)
        assert [p.exitcode for p in ctx.processes] == [0, -signal.SIGKILL]
    finally:
        for p in ctx.processes:
            p.kill()
    error = json.loads((report / "report-0.json").read_text())["error"]
    assert error.startswith("TrainingError: another process of this run is gone or not answering (") \
        and "\n" not in error, error
    assert "Traceback" not in error and "pair.cc" not in error, error
    assert error.endswith(f"the checkpoint of step 2 is intact; continue with: the same torchrun command "
                          f"with -m alexnet train --resume {tmp_path / 'r'}"), error


@pytest.mark.slow  # 14 s, most of it the 8 s timeout it waits for
def test_a_process_that_stops_answering_ends_the_others_after_train_dist_timeout(tmp_path):
    """A process frozen mid-run (SIGSTOP: its sockets stay open, as a machine that hangs or
    drops off the network leaves them) ends the other after train.dist_timeout seconds
    with one line, instead of after the backend's 30 minutes."""
    import time

    data = write_idx(tmp_path / "idx")
    report = tmp_path / "rep"
    report.mkdir()
    cfg = _dropout_config(data, checkpoint_every=1, dist_timeout=8)
    ctx = mp.spawn(_run_worker, args=(2, _free_port(), cfg, tmp_path / "r", False, 1, 3, report, signal.SIGSTOP),
                   nprocs=2, join=False)
    try:
        began = time.monotonic()
        ctx.processes[0].join(120)
        waited = time.monotonic() - began
        assert ctx.processes[0].exitcode == 0 and ctx.processes[1].exitcode is None  # rank 1 is frozen
    finally:
        for p in ctx.processes:
            p.kill()
    error = json.loads((report / "report-0.json").read_text())["error"]
    assert error.startswith("TrainingError: another process of this run is gone or not answering (Timed out "
                            "waiting 8000ms") and "\n" not in error, error
    assert error.endswith("the checkpoint of step 2 is intact; continue with: the same torchrun command "
                          f"with -m alexnet train --resume {tmp_path / 'r'}"), error
    assert waited < 100, waited


def test_only_the_process_groups_errors_name_a_lost_process():
    from alexnet.distributed import DistInfo, lost_process

    two = DistInfo(rank=0, world_size=2)
    gloo = RuntimeError("[/w/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:924. This is typically caused by a remote worker crashing.")
    assert lost_process(gloo, two) == "Connection closed by peer [127.0.0.1]:924"
    assert lost_process(gloo, DistInfo()) is None  # one process has no others to lose
    assert lost_process(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), two) is None
    assert lost_process(ValueError("gloo"), two) is None
    nccl = torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1.\nmore")
    assert lost_process(nccl, two) == "NCCL communicator was aborted on rank 1"


@pytest.mark.slow  # 35 s: three 2-process runs
def test_a_stopped_and_resumed_ddp_run_equals_a_straight_one(tmp_path):
    """Weights, momentum and the logged training loss (every process's share of it), with
    dropout on: each process's generator is saved and restored."""
    data = write_idx(tmp_path / "idx")
    cfg = _dropout_config(data)
    _two_processes(cfg, tmp_path / "straight", tmp_path / "rep1")
    seen = _two_processes(cfg, tmp_path / "r", tmp_path / "rep2", stop_rank=0, stop_step=2)
    assert [s["step"] for s in seen] == [2, 2]
    _two_processes(cfg, tmp_path / "r", tmp_path / "rep3", resume=True)
    a, b = _last_weights(tmp_path / "straight"), _last_weights(tmp_path / "r")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = json.loads((tmp_path / "straight" / "log.jsonl").read_text().splitlines()[0])
    log_b = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[0])
    assert log_a["train_loss"] == log_b["train_loss"] and log_a["val_top1_err"] == log_b["val_top1_err"]


@pytest.mark.parametrize("name, local, gpus, error", [
    ("cuda:1", 2, 4, "would put them all on one GPU; use --device cuda"),
    ("cuda", 4, 2, "torchrun started 4 processes on this machine, which has 2 CUDA devices"),
    ("auto", 4, 2, "use --nproc-per-node 2"),
    ("cuda", 2, 2, "cuda:1"),  # rank 1 takes GPU 1
    ("cuda:1", 1, 2, "cuda:1"),  # one process per machine may name its GPU
    ("cuda", 4, 1, "cuda:0"),  # each process shown one GPU of its own (CUDA_VISIBLE_DEVICES)
    ("cuda:0", 4, 1, "cuda:0"),
])
def test_torchrun_processes_take_a_gpu_each(monkeypatch, name, local, gpus, error):
    """(No GPU here: torch.cuda's answers stood in.) Under torchrun an explicit cuda:N put
    every process of a machine on one GPU, and more processes than GPUs wrapped round; NCCL
    then failed at the first collective with a traceback."""
    from alexnet.config import ConfigError
    from alexnet.distributed import DistInfo, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    info = DistInfo(rank=1, world_size=local, local_rank=1 % local)
    if not error.startswith("cuda:"):
        with pytest.raises(ConfigError, match=error):
            resolve_device(name, info)
    else:
        assert resolve_device(name, info) == torch.device(error) and chosen == [torch.device(error)]


def _differing_worker(rank, world, port, cfgs, out, report):
    import os

    from alexnet.train import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        Trainer(cfgs[rank], out, quiet=True).close()
        seen = "started"
    except Exception as e:
        seen = f"{type(e).__name__}: {e}"
    (report / f"report-{rank}.json").write_text(json.dumps(seen))


def test_nodes_started_with_other_settings_are_refused_on_every_process(tmp_path):
    """Two nodes' commands that differ: another --lr trained on silently with the log
    saying rank 0's, another batch size ended in Gloo's abort and a misleading line."""
    data = write_idx(tmp_path / "idx")
    base = _dropout_config(data)
    other = replace(base, train=replace(base.train, lr=0.5))
    report = tmp_path / "report"
    report.mkdir()
    mp.spawn(_differing_worker, args=(2, _free_port(), [base, other], tmp_path / "run", report), nprocs=2,
             join=True)
    for rank in range(2):
        seen = json.loads((report / f"report-{rank}.json").read_text())
        assert seen == ("ConfigError: process 1 of this run differs from process 0 in train.lr (0.5 against "
                        "0.001); every node must run the same command on the same data at the same path"), seen


def test_a_process_that_never_joins_is_one_line(monkeypatch):
    """A node whose command ended at once (a usage error) left the other waiting for the
    backend's limit, then a DistStoreError traceback."""
    import torch.distributed as dist

    from alexnet import distributed
    from alexnet.config import ConfigError

    def never(*args, **kwargs):
        raise dist.DistStoreError("wait timeout after 15000ms, keys: /default_pg/0//cpu//0/1\n(more)")

    monkeypatch.setattr(distributed.dist, "init_process_group", never)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match=r"^the 2 processes of this run did not all join \(wait timeout after "
                                          r"15000ms, keys: /default_pg/0//cpu//0/1\); one that ended at once"):
        distributed.init_distributed("cpu", 15)


def test_the_resume_hint_comes_from_what_this_process_saved():
    """A process on another node does not see rank 0's run folder: its hint after a lost
    process said no checkpoint was written, though rank 0 had saved step 4."""
    from pathlib import Path
    from types import SimpleNamespace

    from alexnet.train import Trainer

    me = SimpleNamespace(_saved=((0, 4, 4), Path("runs/r/checkpoints/step-00000004")), _last=lambda: None,
                         resume_command=lambda: "the same torchrun command with -m alexnet train --resume runs/r")
    assert Trainer._resume_hint(me) == ("the checkpoint of step 4 is intact; continue with: the same torchrun "
                                        "command with -m alexnet train --resume runs/r")
    me._saved = None
    assert Trainer._resume_hint(me).startswith("no checkpoint was written yet")


def _folder_worker(rank, world, port, cfg, out, report):
    import os

    from alexnet.sources import FolderDataset
    from alexnet.train import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    decoded = []
    decode = FolderDataset._decode
    FolderDataset._decode = lambda self, i: decoded.append(i) or decode(self, i)
    t = Trainer(cfg, out, quiet=True)
    try:
        torch.save({"stats": t.data.stats.to_tensors(prefix=""), "decoded": decoded}, report / f"rank-{rank}.pt")
    finally:
        t.close()


def test_processes_share_the_statistics_pass_over_a_folder(tmp_path, monkeypatch):
    """Training straight from a folder under torchrun: the processes decode the images for
    the statistics between them, and every one ends with one process's statistics exactly."""
    from alexnet.sources import dataset_stats, open_dataset
    from alexnet.train import holdout_split
    from tests.test_sources import make_tree

    make_tree(tmp_path / "tree", per_class=5)
    cfg = _config(tmp_path / "tree")
    full = open_dataset(tmp_path / "tree", image_size=227)
    _, held = holdout_split(len(full), 1)
    monkeypatch.setenv("ALEXNET_CACHE", str(tmp_path / "cache"))
    alone = dataset_stats(full, held_out=held).to_tensors(prefix="")
    (tmp_path / "cache").rename(tmp_path / "kept")  # (the processes find none cached)
    report = tmp_path / "report"
    report.mkdir()
    mp.spawn(_folder_worker, args=(2, _free_port(), cfg, tmp_path / "run", report), nprocs=2, join=True)
    got = [torch.load(report / f"rank-{r}.pt") for r in range(2)]
    for g in got:
        assert g["stats"].keys() == alone.keys() and all(torch.equal(g["stats"][k], alone[k]) for k in alone)
    training = sorted(set(range(10)) - set(held.tolist()))
    assert sorted(got[0]["decoded"] + got[1]["decoded"]) == training  # each image once, by one process
    assert [len(g["decoded"]) for g in got] == [5, 4]


def test_the_shared_statistics_are_added_up_host_to_host(monkeypatch):
    """Under NCCL a CPU tensor was added up through the GPU, where a process lost during its
    share of the pass left the others waiting in the copy back until NCCL's watchdog; the
    sums go through the host group (Gloo, beside NCCL) as int64 on the CPU."""
    import numpy as np

    import alexnet.distributed as d

    calls = []

    def all_reduce(t, op=None, group=None):
        calls.append((t.device.type, t.dtype, group))
        t.mul_(2)

    monkeypatch.setattr(d, "_FLAG_GROUP", "the host group")
    monkeypatch.setattr(d.dist, "all_reduce", all_reduce)
    got = d.sum_on_host(np.array([3, 2 ** 60], np.int64), d.DistInfo(0, 2, 0))
    assert got.tolist() == [6, 2 ** 61] and calls == [("cpu", torch.int64, "the host group")]
    assert d.sum_on_host(np.array([5]), d.DistInfo(0, 1, 0)).tolist() == [5] and len(calls) == 1
