"""Training: exact resume, pre-emption, divergence, checkpoints, and evaluation of the result."""

import json
import os
import signal
import struct
import time
import types

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from alexnet.checkpoint import CheckpointError, load_model_file, load_state
from alexnet.config import ConfigError, run_config, to_dict
from alexnet.fileio import OutputError
import alexnet.train as train_module
from alexnet.train import LRSchedule, Trainer, TrainingError, holdout_split
from tests.helpers import TEST_FC_WIDTH


def write_idx(folder, train_n=44, test_n=12, classes=4, seed=0):
    """Tiny IDX files in Fashion-MNIST's layout: each class a brighter block in its own corner."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train_n), ("t10k", test_n)):
        labels = np.arange(n) % classes
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, q = divmod(int(c), 2)
            images[i, r * 14:(r + 1) * 14, q * 14:(q + 1) * 14] += 150
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">4B3I", 0, 0, 8, 3, n, 28, 28)
                                                              + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">4BI", 0, 0, 8, 1, n)
                                                              + labels.astype(np.uint8).tobytes())
    return folder


def tiny_config(data, **train):
    t = {"batch_size": 8, "epochs": 2, "lr": 0.001, "deterministic": True, "checkpoint_every": 0,
         "log_every": 1, **train}
    return run_config("paper", {"data": {"path": str(data), "num_workers": 0},
                                "train": t, "model": {"dropout": 0.5, "fc_width": TEST_FC_WIDTH}})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_idx(tmp_path_factory.mktemp("idx"))


def weights(run_dir):
    last = json.loads((run_dir / "checkpoints" / "last.json").read_text())
    return load_model_file(run_dir / "checkpoints" / last["dir"] / "model.safetensors").state_dict


def stop_at(trainer, step, how="flag"):
    """Make `trainer` receive a stop request during step `step`."""
    inner = trainer._train_step

    def step_fn(x, y):
        loss = inner(x, y)
        if trainer.step + 1 == step:
            if how == "signal":
                os.kill(os.getpid(), signal.SIGTERM)
                # the kernel may hand the signal to one of torch's threads, and Python runs
                # its handler a little later: wait for it, so the stop belongs to this step
                deadline = time.monotonic() + 10
                while not trainer.stop_requested and time.monotonic() < deadline:
                    time.sleep(0.001)
            else:
                trainer.stop_requested = True
        return loss

    trainer._train_step = step_fn


def test_resume_mid_epoch_and_at_epoch_end_gives_identical_weights(data, tmp_path):
    cfg = tiny_config(data)
    straight = Trainer(cfg, tmp_path / "straight", quiet=True)
    assert straight.fit()["stopped"] is False
    assert straight.step == 2 * 5  # 40 training images (4 held out) in batches of 8

    # stop mid-epoch 1 by a real SIGTERM, resume; stop again at the end of epoch 1, resume
    run = tmp_path / "interrupted"
    t = Trainer(cfg, run, quiet=True)
    stop_at(t, 3, how="signal")
    r = t.fit()
    assert r["stopped"] and r["step"] == 3 and (run / "stopped").exists()
    t = Trainer(None, run, resume=True, quiet=True)
    assert (t.epoch, t.batch_in_epoch, t.step) == (0, 3, 3)
    stop_at(t, 5)
    assert t.fit()["stopped"]
    last = json.loads((run / "checkpoints" / "last.json").read_text())["dir"]
    epoch_time = load_state(run / "checkpoints" / last / "state.pt")["epoch_time"]  # steps 1-5, both stretches
    t = Trainer(None, run, resume=True, quiet=True)
    assert t.fit()["stopped"] is False
    a, b = weights(tmp_path / "straight"), weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the log has each epoch once, with the same figures
    log_a = [json.loads(x) for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log_b] == [1, 2]
    assert [r["val_top1_err"] for r in log_a] == [r["val_top1_err"] for r in log_b]
    assert [r["train_loss"] for r in log_a] == pytest.approx([r["train_loss"] for r in log_b], rel=1e-9)
    assert (run / "curves.png").stat().st_size > 1000
    assert not (run / "stopped").exists()
    # epoch 1's training time is its steps', before the resumes too (it was the last stretch's:
    # here none, since the resume went straight to the validation)
    assert log_b[0]["train_img_s"] is None and log_b[0]["train_time_s"] >= epoch_time > 0


def test_augmentation_on_the_device_trains_the_same_weights(data, tmp_path):
    """`data.augment_on=device` (the GPU default) moves the crops, flips, mean and lighting
    from the loader to the trainer; here both are the CPU, and the runs must agree to the
    bit: same batches, so same weights, losses and validation (cut on the device too)."""
    runs = {}
    for where in ("loader", "device"):
        cfg = tiny_config(data, epochs=1, max_steps=3)
        cfg = replace(cfg, data=replace(cfg.data, augment_on=where))
        t = Trainer(cfg, tmp_path / where, quiet=True)
        assert t.augment_on == where
        seen = []
        inner = t._train_step
        t._train_step = lambda x, y: (seen.append(type(x).__name__), inner(x, y))[1]
        t.fit()
        log = [json.loads(x) for x in (tmp_path / where / "log.jsonl").read_text().splitlines()]
        log = [{k: v for k, v in r.items() if k not in ("train_img_s", "train_time_s")} for r in log]
        runs[where] = (weights(tmp_path / where), log, seen)
    (wa, la, sa), (wb, lb, sb) = runs["loader"], runs["device"]
    assert sa == ["Tensor"] * 3 and sb == ["RawBatch"] * 3
    assert la == lb and len(la) == 1 and "val_top1_err" in la[0]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_checkpoints_every_n_steps_keep_the_newest(data, tmp_path):
    t = Trainer(tiny_config(data, checkpoint_every=2, keep_checkpoints=2, epochs=1), tmp_path / "r", quiet=True)
    t.fit()
    names = sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir())
    assert names == ["last.json", "step-00000004", "step-00000005"]
    assert not list((tmp_path / "r" / "checkpoints").glob(".*"))  # no partial folders left
    best = load_model_file(tmp_path / "r" / "best.safetensors")
    assert best.classes == ["0", "1", "2", "3"] and best.stats is not None
    assert best.stats.mean_image.shape == (3, 256, 256)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path):
    t = Trainer(tiny_config(data, checkpoint_every=1, epochs=1), tmp_path / "r", quiet=True)
    forward = t.model.forward

    def poisoned(x):
        out = forward(x)
        return out * float("nan") if t.step == 3 else out

    t.net.forward = poisoned
    with pytest.raises(TrainingError, match="the loss became nan at step 4 .*; the last good checkpoint is in"):
        t.fit()
    last = json.loads((tmp_path / "r" / "checkpoints" / "last.json").read_text())
    assert last["step"] == 3
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "r").values())
    assert (tmp_path / "r" / "diverged").read_text().startswith("the loss became nan")

    # a finite loss, then an update that overflowed: not saved as a good checkpoint
    t = Trainer(tiny_config(data, checkpoint_every=1, epochs=1), tmp_path / "w", quiet=True)
    step = t._train_step

    def overflowing(x, y):
        loss = step(x, y)
        if t.step == 2:  # (the step counter moves on after this returns: this is step 3)
            with torch.no_grad():
                t.model.layer("fc8").weight[0, 0] = float("inf")
        return loss

    t._train_step = overflowing
    with pytest.raises(TrainingError, match="the weights became NaN or infinite by step 3 .*the loss still finite"
                                            ".*; the last good checkpoint is in"):
        t.fit()
    assert json.loads((tmp_path / "w" / "checkpoints" / "last.json").read_text())["step"] == 2
    again = Trainer(None, tmp_path / "w", resume=True, quiet=True)  # the resume takes it
    assert again.step == 2
    again.close()

    # at the first step there is no good checkpoint to point to
    t = Trainer(tiny_config(data, epochs=1), tmp_path / "first", quiet=True)
    forward = t.model.forward
    t.net.forward = lambda x: forward(x) * float("nan")
    with pytest.raises(TrainingError, match=r"at step 1 .*; no checkpoint was written before it$"):
        t.fit()


def test_reading_the_loss_back_every_few_steps_changes_nothing(data, tmp_path, uninterrupted):
    """Reading the losses back every `train.log_every` steps lets a GPU run ahead of the
    host: the same weights and logged losses as reading back every step, and a stop
    request still ends the run at the step it came in."""
    runs = {}
    for k in (1, 3):
        if k == 1:  # (tiny_config's log_every is 1: the uninterrupted one-epoch run)
            run = uninterrupted(1)
            assert json.loads((run / "config.json").read_text())["train"]["log_every"] == 1
        else:
            run = tmp_path / f"k{k}"
            Trainer(tiny_config(data, log_every=k, epochs=1), run, quiet=True).fit()  # read at 3, 5
        log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        runs[k] = (weights(run), [(r["train_loss"], r["val_loss"]) for r in log])
    assert runs[1][1] == runs[3][1] and len(runs[1][1]) == 1
    for name in runs[1][0]:
        assert torch.equal(runs[1][0][name], runs[3][0][name]), name
    t = Trainer(tiny_config(data, log_every=3), tmp_path / "stop", quiet=True)
    stop_at(t, 2)
    r = t.fit()
    assert r["stopped"] and r["step"] == 2 and r["checkpoint"].endswith("step-00000002")


def test_a_non_finite_loss_between_read_backs_is_named_by_its_step(data, tmp_path):
    """Read back every 3 steps but checkpointed every 2: the NaN of step 3 is found at
    step 4, where the checkpoint is due, before it is written, and named as step 3; the
    step-2 checkpoint stays the newest, and nothing of the NaN weights is written."""
    t = Trainer(tiny_config(data, log_every=3, checkpoint_every=2, epochs=1), tmp_path / "r", quiet=True)
    forward = t.model.forward

    def poisoned(x):
        out = forward(x)
        return out * float("nan") if t.step == 2 else out

    t.net.forward = poisoned
    with pytest.raises(TrainingError, match=r"the loss became nan at step 3 \(epoch 1\)"):
        t.fit()
    assert t.step == 4
    last = json.loads((tmp_path / "r" / "checkpoints" / "last.json").read_text())
    assert last["step"] == 2
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["last.json", "step-00000002"]
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "r").values())
    assert not (tmp_path / "r" / "best.safetensors").exists()


def test_a_non_finite_loss_on_another_process_is_reported_with_its_value(data, tmp_path, monkeypatch):
    """Under DDP the losses are checked in one collective: a NaN that only another process
    saw is named by its step and its value, not by this process's finite loss."""
    t = Trainer(tiny_config(data), tmp_path / "r", quiet=True)

    def with_a_nan_on_rank_1(flags, info):
        other = torch.zeros_like(flags)
        other[1], other[3] = 1.0, float("nan")  # step 8 (the second) was NaN there
        return flags.add_(other)

    monkeypatch.setattr(train_module, "all_reduce_sum", with_a_nan_on_rank_1)
    t._pending = [(7, torch.tensor(2.25), 8), (8, torch.tensor(1.5), 8)]
    with pytest.raises(TrainingError, match=r"the loss became nan at step 8 \(epoch 1\)"):
        t._sync()


def test_a_run_folder_in_use_by_another_process_is_refused(data, tmp_path, monkeypatch):
    """A second trainer (another process) on a run under way: refused with the holder's
    pid, for a new run and for a resume; free again once the holder has ended."""
    import subprocess
    import sys

    run = tmp_path / "r"
    first = Trainer(tiny_config(data, epochs=1), run, quiet=True)
    first.stop_requested = True
    first.fit()
    first.close()
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from alexnet.train import Trainer
t = Trainer(None, {str(run)!r}, resume=True, quiet=True)  # holds the folder until it ends
print("held", flush=True)
time.sleep(60)
"""], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        for make in (lambda: Trainer(None, run, resume=True, quiet=True),
                     lambda: Trainer(tiny_config(data, epochs=1), run, quiet=True)):
            with pytest.raises(ConfigError, match=rf"r is in use by another alexnet train \(pid {holder.pid}\)"):
                make()
        def open_data(cfg, **kw):
            raise AssertionError("the data was opened")

        with monkeypatch.context() as m:  # refused before the data is opened (seconds on a large folder)
            m.setattr(train_module, "open_data", open_data)
            for make in (lambda: Trainer(None, run, resume=True, quiet=True),
                         lambda: Trainer(tiny_config(data, epochs=1), run, quiet=True)):
                with pytest.raises(ConfigError, match="in use by another alexnet train"):
                    make()
    finally:
        holder.kill()
        holder.wait()
    with monkeypatch.context() as m:  # took the lock, then refused, before opening the data
        m.setattr(train_module, "open_data", open_data)
        with pytest.raises(ConfigError, match="already holds a run"):
            Trainer(tiny_config(data, epochs=1), run, quiet=True)
    Trainer(None, run, resume=True, quiet=True).close()  # so the refusal gave the folder up
    (tmp_path / "empty").mkdir()  # an existing folder without a run is a new run's
    Trainer(tiny_config(data, epochs=1), tmp_path / "empty", quiet=True).close()
    assert (tmp_path / "empty" / "config.json").exists()
    # default folders: two runs begun in the same second get one each
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")
    a = Trainer(tiny_config(data, epochs=1), None, quiet=True)
    b = Trainer(tiny_config(data, epochs=1), None, quiet=True)
    assert (a.run_dir, b.run_dir) == (Path("runs/20260101-000000-paper"), Path("runs/20260101-000000-paper-2"))


@pytest.mark.parametrize("keep_lock", [False, True])
def test_the_run_folder_stays_held_while_the_test_set_is_evaluated(data, tmp_path, monkeypatch, keep_lock):
    """finish_run writes eval-test/ into the run folder: after fit() it takes the lock again
    for that; after fit(keep_lock=True), as `alexnet train` calls it, the lock is never
    given up in between. Either way a resume begun meanwhile is refused."""
    import alexnet.evaluate as evaluate_module
    from alexnet.train import finish_run

    run = tmp_path / "r"
    t = Trainer(tiny_config(data, epochs=1, max_steps=1), run, quiet=True)
    t.fit(keep_lock=keep_lock)
    refused = rf"r is in use by another alexnet train \(pid {os.getpid()}\)"
    if keep_lock:  # between fit and finish_run
        with pytest.raises(ConfigError, match=refused):
            Trainer(None, run, resume=True, quiet=True)
    seen = []

    def meanwhile(*args, **kwargs):
        with pytest.raises(ConfigError, match=refused):
            Trainer(None, run, resume=True, quiet=True)
        seen.append(kwargs["out_dir"])
        return None

    monkeypatch.setattr(evaluate_module, "evaluate_checkpoint", meanwhile)
    finish_run(t)
    assert seen == [run / "eval-test"]
    if keep_lock:  # still held after it, until close()
        with pytest.raises(ConfigError, match=refused):
            Trainer(None, run, resume=True, quiet=True)
        t.close()
    Trainer(None, run, resume=True, quiet=True).close()  # given up again afterwards


def test_alexnet_train_holds_the_run_folder_from_training_to_the_end_of_the_test(data, tmp_path, monkeypatch):
    """`alexnet train` trains and evaluates the test split under one lock: a resume begun
    when training has ended but the test evaluation has not yet begun is refused too."""
    from alexnet import cli

    (tmp_path / "c.json").write_text(json.dumps(to_dict(tiny_config(data, epochs=1))))
    run, seen = tmp_path / "r", []

    def finish(trainer, test=True):
        with pytest.raises(ConfigError, match="is in use by another alexnet train"):
            Trainer(None, run, resume=True, quiet=True)
        seen.append(test)

    monkeypatch.setattr(train_module, "finish_run", finish)
    assert cli.main(["train", "--config", str(tmp_path / "c.json"), "--out", str(run), "--no-test"]) == 0
    assert seen == [False]
    Trainer(None, run, resume=True, quiet=True).close()  # given up when the command ends


def test_a_relative_data_path_is_saved_absolute_so_a_resume_from_elsewhere_finds_it(data, tmp_path, monkeypatch):
    monkeypatch.chdir(data.parent)
    cfg = tiny_config(data.name, epochs=1, max_steps=2)
    t = Trainer(cfg, tmp_path / "r", quiet=True)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["data"]["path"] == str(data)
    stop_at(t, 1)
    assert t.fit()["stopped"]
    monkeypatch.chdir(tmp_path)  # where "idx..." names nothing
    again = Trainer(None, tmp_path / "r", resume=True, quiet=True)
    assert again.fit()["stopped"] is False and again.step == 2


def test_a_new_run_writes_into_no_folder_of_the_users_nor_into_its_data(data, tmp_path, monkeypatch):
    """--out may name a new or empty folder, or a run of ours that stopped before its first
    checkpoint (started over); any other folder is refused before a file is written in it,
    and so is a folder inside the data, whose files would become images of it."""
    cases = {"notes": {"notes.txt": "mine"}, "config": {"config.json": '{"mine": 1}'},
             "log only": {"log.jsonl": "my log"}}  # a run writes config.json before anything else
    for name, files in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        for f, text in files.items():
            (folder / f).write_text(text)
        with pytest.raises(ConfigError, match="is not a run folder"):
            Trainer(tiny_config(data, epochs=1), folder, quiet=True)
        assert {p.name: p.read_text() for p in folder.iterdir()} == files, name  # not even a .lock
    inside = rf"the run folder {data / 'run'} is inside the data folder {data}, where "
    with pytest.raises(ConfigError, match=inside):
        Trainer(tiny_config(data, epochs=1), data / "run", quiet=True)
    assert not (data / "run").exists()
    # a file where the folder, or one of its parents, would go: refused before the data is
    # opened (a large folder's listing and statistics pass came first)
    (tmp_path / "afile").write_text("mine")
    opened = []
    with monkeypatch.context() as m:
        real_open = train_module.open_data
        m.setattr(train_module, "open_data", lambda *a, **k: opened.append(1) or real_open(*a, **k))
        for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
            with pytest.raises(OutputError, match=f"cannot make the folder {out}: {tmp_path / 'afile'} is a file"):
                Trainer(tiny_config(data, epochs=1), out, quiet=True)
    assert opened == [] and (tmp_path / "afile").read_text() == "mine"
    # a run stopped before its first checkpoint is started over by the same command
    t = Trainer(tiny_config(data, epochs=1), tmp_path / "r", quiet=True)
    t.stop_requested = True
    t.close()
    assert (tmp_path / "r" / "config.json").exists() and not (tmp_path / "r" / "checkpoints").exists()
    Trainer(tiny_config(data, epochs=1), tmp_path / "r", quiet=True).close()
    # but not one whose checkpoints last.json does not name (lost, or a kill before it was written)
    (tmp_path / "r" / "checkpoints" / "step-00000002").mkdir(parents=True)
    with pytest.raises(ConfigError, match="r holds checkpoints that no checkpoints/last.json names; continue it with --resume"):
        Trainer(tiny_config(data, epochs=1), tmp_path / "r", quiet=True)
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-00000002"]
    # nor a finished run whose checkpoints/ was deleted to save space: it was started over,
    # its log deleted and its old best.safetensors and eval-test/ left beside the new run's
    import shutil

    shutil.rmtree(tmp_path / "r" / "checkpoints")
    for results in ({"log.jsonl": '{"epoch": 1}\n'}, {"best.safetensors": "weights", "log.jsonl": ""}):
        for f, text in results.items():
            (tmp_path / "r" / f).write_text(text)
        kept = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()}
        with pytest.raises(ConfigError, match=r"r holds a run's results \((best.safetensors|log.jsonl)\) but no "
                                              r"checkpoint to resume; choose another --out"):
            Trainer(tiny_config(data, epochs=1), tmp_path / "r", quiet=True)
        assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir() if p.is_file()} == kept


def test_a_resume_refuses_what_would_change_the_runs_data(tmp_path):
    """Renamed classes (labels would mean others), an edited batch size or seed (another
    order for the rest of the epoch); data that has moved names where its path is kept."""
    import shutil

    data = write_idx(tmp_path / "idx")
    t = Trainer(tiny_config(data, epochs=1), tmp_path / "r", quiet=True)
    stop_at(t, 2)
    assert t.fit()["stopped"]
    t.close()

    def edited(name, key, value, section="train"):
        run = tmp_path / name
        shutil.copytree(tmp_path / "r", run)
        cfg = json.loads((run / "config.json").read_text())
        cfg[section][key] = value
        (run / "config.json").write_text(json.dumps(cfg))
        return run

    # the image size: the run's mean image is of the old one (a traceback at the first step)
    saved = tiny_config(data).data.image_size
    with pytest.raises(CheckpointError, match=rf"was saved with data.image_size {saved} and .*config.json now "
                                              rf"says {saved + 32}: the run's mean image is {saved}x{saved}; put"):
        Trainer(None, edited("size", "image_size", saved + 32, "data"), resume=True, quiet=True)

    for key, value in (("batch_size", 4), ("seed", 7)):
        saved = getattr(tiny_config(data).train, key)
        with pytest.raises(CheckpointError, match=rf"was saved with train.{key} {saved} and .*config.json now "
                                                  rf"says {value}: the epochs' order"):
            Trainer(None, edited(key, key, value), resume=True, quiet=True)
    # momentum and weight decay edited there are taken (the optimizer's saved groups used
    # to override them), the momentum buffers kept
    run = edited("hyper", "weight_decay", 0.05)
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["momentum"] = 0.5
    (run / "config.json").write_text(json.dumps(cfg))
    t = Trainer(None, run, resume=True, quiet=True)
    assert {(g["weight_decay"], g["momentum"]) for g in t.optimizer.param_groups} == {(0.05, 0.5)}
    saved = load_state(run / "checkpoints" / "step-00000002" / "state.pt")["optimizer"]["state"]
    buffers = [t.optimizer.state[p]["momentum_buffer"] for p in t.model.parameters()]
    assert len(buffers) == len(saved) and all(torch.equal(b, saved[i]["momentum_buffer"])
                                              for i, b in enumerate(buffers))
    t.close()
    (data / "classes.txt").write_text("a\nb\nc\nd\n")  # the classes "0".."3" renamed
    with pytest.raises(CheckpointError, match="was saved with the classes 0, 1, 2, 3 and the data now has "
                                              "a, b, c, d: its labels would mean other classes"):
        Trainer(None, tmp_path / "r", resume=True, quiet=True)
    (data / "classes.txt").unlink()
    data.rename(tmp_path / "moved")
    with pytest.raises(ConfigError, match=r"not found: .*idx; if the data has moved, set data.path \(data.val_path\) "
                                          r"in .*r/config.json to its new place"):
        Trainer(None, tmp_path / "r", resume=True, quiet=True)
    (tmp_path / "moved").rename(data)
    t = Trainer(None, tmp_path / "r", resume=True, quiet=True)  # as it was: resumes
    assert t.step == 2
    t.close()


def test_a_max_steps_lowered_below_the_checkpoint_trains_no_further(data, tmp_path):
    """train.max_steps edited below the step of the checkpoint: the resume validates the
    epoch under way and ends (it ran one more step: the steps left were negative)."""
    t = Trainer(tiny_config(data, epochs=1), tmp_path / "r", quiet=True)
    stop_at(t, 3)
    assert t.fit()["stopped"]
    t.close()
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    cfg["train"]["max_steps"] = 2
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg))
    again = Trainer(None, tmp_path / "r", resume=True, quiet=True)
    r = again.fit()
    again.close()
    assert r["stopped"] is False and r["step"] == 3
    rows = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [(row["epoch"], row["step"]) for row in rows] == [(1, 3)]


def test_a_resume_into_fp16_starts_its_loss_scale_afresh(data, tmp_path, monkeypatch):
    """A run saved without fp16 (a CPU, or a GPU with bf16) resumed where amp=auto picks
    fp16 (a GPU without bf16): the empty loss-scaler state was a traceback."""
    t = Trainer(tiny_config(data, epochs=1), tmp_path / "r", quiet=True)
    stop_at(t, 2)
    assert t.fit()["stopped"]
    t.close()
    monkeypatch.setattr(train_module, "resolve_numerics", lambda cfg, device: (torch.float16, False))
    again = Trainer(None, tmp_path / "r", resume=True, quiet=True)
    assert again.scaler.is_enabled() and again.step == 2
    assert again.scaler.get_scale() == torch.amp.GradScaler("cpu").get_scale()  # the initial scale
    again.close()


def test_a_failure_before_the_first_checkpoint_says_how_to_start_over(tmp_path):
    """The hint after a write or loader failure: the checkpoint to resume from, or, with
    none yet, the way to start over (a resume would find nothing)."""
    from types import SimpleNamespace

    from alexnet.distributed import DistInfo

    stub = SimpleNamespace(run_dir=tmp_path, info=DistInfo())
    stub._last = lambda: Trainer._last(stub)
    stub.resume_command = lambda: Trainer.resume_command(stub)
    assert Trainer._resume_hint(stub) == ("no checkpoint was written yet; run the same alexnet train command "
                                          "again to start it over")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.json").write_text(json.dumps({"dir": "step-00000004", "step": 4}))
    assert Trainer._resume_hint(stub) == (f"the checkpoint of step 4 is intact; continue with: "
                                          f"alexnet train --resume {tmp_path}")
    stub.info = DistInfo(rank=0, world_size=2)  # under torchrun: its command
    assert Trainer._resume_hint(stub) == (f"the checkpoint of step 4 is intact; continue with: the same "
                                          f"torchrun command with -m alexnet train --resume {tmp_path}")


def test_no_test_is_remembered_by_a_resumed_run(data, tmp_path, monkeypatch, capsys):
    """`--no-test` is the run's train.test = false: a run started with it and resumed
    without it still skips the test evaluation; one started without it does not."""
    from alexnet import cli

    seen = []
    monkeypatch.setattr(train_module, "finish_run", lambda trainer, test=True: seen.append(test))
    for started_with in (["--no-test"], []):
        run = tmp_path / f"r{len(started_with)}"
        (tmp_path / "c.json").write_text(json.dumps(to_dict(tiny_config(data, epochs=1, max_steps=1))))
        assert cli.main(["train", "--config", str(tmp_path / "c.json"), "--out", str(run), *started_with]) == 0
        assert json.loads((run / "config.json").read_text())["train"]["test"] is not bool(started_with)
        capsys.readouterr()
        assert cli.main(["train", "--resume", str(run)]) == 0  # a finished run: straight to the end
        assert "the run's training was complete (step 1 of 1); nothing to train" in capsys.readouterr().out
    assert seen == [False, False, True, True]


def test_a_resume_with_no_test_does_not_open_the_test_split(data, tmp_path, monkeypatch, capsys):
    """`--resume RUN --no-test` skipped the evaluation but still opened (listed) the test
    split, and warned about an unusable one with "train with --no-test to skip it"."""
    from alexnet import cli

    monkeypatch.setattr(train_module, "finish_run", lambda trainer, test=True: None)
    opened = []
    real = train_module.open_data
    monkeypatch.setattr(train_module, "open_data", lambda cfg, **kw: opened.append(cfg.train.test) or real(cfg, **kw))
    run = tmp_path / "r"
    (tmp_path / "c.json").write_text(json.dumps(to_dict(tiny_config(data, epochs=1, max_steps=1))))
    assert cli.main(["train", "--config", str(tmp_path / "c.json"), "--out", str(run)]) == 0
    assert cli.main(["train", "--resume", str(run), "--no-test"]) == 0
    assert opened == [True, False]
    assert json.loads((run / "config.json").read_text())["train"]["test"] is True  # (this resume's choice only)


def test_the_end_of_a_run_names_only_the_pictures_it_drew(tmp_path, capsys):
    """confusion.png is drawn for up to 100 classes; the end of a 101-class run named it
    all the same."""
    from alexnet import cli

    data = write_idx(tmp_path / "idx", train_n=230, test_n=12, classes=101)
    (tmp_path / "c.json").write_text(json.dumps(to_dict(tiny_config(data, epochs=1, max_steps=1))))
    assert cli.main(["train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "r")]) == 0
    plots = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("plots:"))
    assert plots == f"plots:      {tmp_path / 'r' / 'curves.png'}"
    assert (tmp_path / "r" / "eval-test" / "eval.json").exists()
    assert not (tmp_path / "r" / "eval-test" / "confusion.png").exists()


def test_a_damaged_log_line_costs_only_itself(tmp_path):
    """The resume reads log.jsonl back and rewrites it: a damaged line in the middle used
    to end the reading there (the rows after it were lost) or raise (a row that is not an
    object, one without an epoch, bytes that are not UTF-8)."""
    from types import SimpleNamespace

    rows = [{"epoch": e, "train_loss": 2.0, "val_loss": 1.5, "val_top1_err": 0.5 / e, "val_top5_err": 0.1}
            for e in (1, 2, 3, 4)]
    line = [json.dumps(r).encode() for r in rows]
    # JSON objects with an epoch but not the figures the curves draw (they ended every
    # later epoch in a KeyError from the plot, so the run never got past it)
    partial = json.dumps({"epoch": 2, "val_top1_err": 0.5}).encode()
    text = json.dumps({**rows[0], "epoch": 3, "val_loss": "1.5"}).encode()
    (tmp_path / "log.jsonl").write_bytes(b"\n".join([line[0], b"", b"[1]", line[1], b'{"step": 9}', line[2],
                                                     b"\xff\xfe", partial, text, line[3], b'{"epoch": 5, "val']))
    with pytest.warns(RuntimeWarning) as rec:
        got = Trainer._read_log(SimpleNamespace(run_dir=tmp_path))
    assert got == rows  # the torn last line is dropped too, without a warning
    assert sorted(str(w.message).split(" line ")[1] for w in rec) == \
        [f"{n} is not a log row; left out" for n in (3, 5, 7, 8, 9)]


def test_a_batch_bigger_than_the_data_and_data_changed_since_the_checkpoint_are_refused(tmp_path):
    from alexnet.checkpoint import CheckpointError

    data = write_idx(tmp_path / "idx")
    with pytest.raises(ConfigError, match="40 training images make no batch of 48; lower train.batch_size"):
        Trainer(tiny_config(data, batch_size=48), tmp_path / "big", quiet=True)
    t = Trainer(tiny_config(data, epochs=1), tmp_path / "r", quiet=True)
    t.stop_requested = True
    assert t.fit()["stopped"]
    write_idx(tmp_path / "idx", train_n=36)  # 33 training images now (3 held out): other epochs
    with pytest.raises(CheckpointError, match="saved with 40 training images and the data now has 33"):
        Trainer(None, tmp_path / "r", resume=True, quiet=True)


def test_a_second_run_in_the_same_folder_is_refused(data, tmp_path):
    """Also once `evaluate` and `show` have written their defaults beside best.safetensors
    (it was "not a run folder (it holds eval-val-10crop)"), and with checkpoints/ deleted."""
    import shutil

    Trainer(tiny_config(data, max_steps=1, epochs=1), tmp_path / "r", quiet=True).fit()
    (tmp_path / "r" / "eval-val-10crop").mkdir()
    (tmp_path / "r" / "best-filters.png").write_bytes(b"png")
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        Trainer(tiny_config(data), tmp_path / "r", quiet=True)
    shutil.rmtree(tmp_path / "r" / "checkpoints")
    with pytest.raises(ConfigError, match=r"holds a run's results \(best-filters.png, best.safetensors, curves.png "
                                          r"\.\.\.\) but no checkpoint to resume"):
        Trainer(tiny_config(data), tmp_path / "r", quiet=True)


def test_evaluate_matches_a_direct_computation(data, tmp_path, capsys):
    from alexnet.augment import center_crop
    from alexnet.cli import main
    from alexnet.sources import open_dataset

    Trainer(tiny_config(data, epochs=1), tmp_path / "r", quiet=True).fit()
    best = tmp_path / "r" / "best.safetensors"
    assert main(["evaluate", str(best), "--data", str(data), "--out", str(tmp_path / "ev")]) == 0
    doc = json.loads((tmp_path / "ev" / "eval.json").read_text())
    # the crops cut after the transfer (the GPU default) give the same report
    assert main(["evaluate", str(best), "--data", str(data), "--out", str(tmp_path / "ev2"),
                 "--augment-on", "device"]) == 0
    assert json.loads((tmp_path / "ev2" / "eval.json").read_text()) == doc
    # the same figure by hand: centre 227 crop of the 256x256 images minus the mean image's
    ck = load_model_file(best)
    model = ck.build_model().eval()
    test = open_dataset(str(data), "test", 256)
    x, y = test.read(np.arange(len(test)))
    inp = center_crop(x, 227).float() - center_crop(ck.stats.mean_image[None], 227)
    with torch.no_grad():
        pred = model(inp).argmax(1)
    assert doc["images"] == len(test) == 12
    assert doc["top1_acc"] == pytest.approx((pred == y).float().mean().item())
    assert 0 <= doc["top5_err"] <= doc["top1_err"]
    assert (tmp_path / "ev" / "confusion.png").stat().st_size > 1000


def test_evaluation_figures_match_a_count_by_hand():
    """Top-1, top-5 (8 classes, so top-5 is not everything), loss and confusion of
    evaluate_model against NumPy, with stand-ins for unreadable files (label -1) left out."""
    from alexnet.evaluate import evaluate_model

    rng = np.random.default_rng(3)
    n, k = 30, 8
    table = rng.normal(0, 3, (n, k)).astype(np.float32)  # image i's logits
    labels = rng.integers(0, k, n)
    labels[[4, 17, 29]] = -1

    class Lookup(torch.nn.Module):
        def forward(self, x):
            return torch.from_numpy(table)[x[:, 0].long()]

    class Batches:
        transform = None

        def __iter__(self):
            for i in range(0, n, 7):
                j = min(i + 7, n)
                yield torch.arange(i, j, dtype=torch.float32)[:, None], torch.from_numpy(labels[i:j])

    m = evaluate_model(Lookup(), Batches(), k, torch.device("cpu"))
    keep = labels >= 0
    t, y = table[keep].astype(np.float64), labels[keep]
    logp = t - t.max(1, keepdims=True) - np.log(np.exp(t - t.max(1, keepdims=True)).sum(1, keepdims=True))
    ranks = (t > t[np.arange(len(y)), y][:, None]).sum(1)  # how many classes score above the true one
    assert (m.count, m.unreadable) == (27, 3)
    assert m.top1_err == pytest.approx(np.mean(ranks >= 1))
    assert m.top5_err == pytest.approx(np.mean(ranks >= 5)) and 0 < m.top5_err < m.top1_err
    assert m.loss == pytest.approx(-logp[np.arange(len(y)), y].mean(), rel=1e-5)
    expected = np.zeros((k, k), dtype=np.int64)
    np.add.at(expected, (y, t.argmax(1)), 1)
    assert np.array_equal(m.confusion, expected)


def test_the_loss_of_a_confident_mistake_is_not_capped():
    """Cross-entropy from log-probabilities: a wrong answer at logit odds of 100 costs 100,
    not the 27.6 of log(1e-12), and ten crops give the log of their mean probability."""
    from alexnet.evaluate import evaluate_model

    class Lookup(torch.nn.Module):
        def __init__(self, table):
            super().__init__()
            self.table = table

        def forward(self, x):
            return self.table[x.flatten(1)[:, 0].long()]

    class One:
        transform = None

        def __init__(self, x):
            self.x = x

        def __iter__(self):
            yield self.x, torch.tensor([0])

    cpu = torch.device("cpu")
    m = evaluate_model(Lookup(torch.tensor([[0.0, 100.0]])), One(torch.zeros(1, 1)), 2, cpu)
    assert m.loss == pytest.approx(100.0, rel=1e-6) and m.top1_err == 1.0
    crops = torch.zeros(10, 2)
    crops[:, 1] = torch.arange(60.0, 160.0, 10.0)  # every crop sure of the wrong class
    m = evaluate_model(Lookup(crops), One(torch.arange(10.0).view(1, 10, 1, 1, 1)), 2, cpu)
    want = -torch.log(torch.softmax(crops.double(), -1)[:, 0].mean()).item()  # about 62.3
    assert m.loss == pytest.approx(want, rel=1e-6) and m.top1_err == 1.0


def test_plateau_schedule_divides_by_ten_at_most_three_times():
    s = LRSchedule(run_config("paper"), total_steps=100)
    errs = [0.5, 0.4, 0.4, 0.39, 0.39, 0.39, 0.39, 0.39, 0.39]
    assert [s.epoch_end(e) for e in errs] == [False, False, True, False, True, True, False, False, False]
    assert s.drops == 3
    assert s.lr(0) == pytest.approx(0.01 * 0.1 ** 3)
    # each drop starts the count of epochs without improvement again
    s = LRSchedule(run_config("paper", {"train": {"plateau_patience": 2}}), total_steps=100)
    assert [s.epoch_end(e) for e in [0.5, 0.5, 0.5, 0.5, 0.5, 0.4, 0.4]] == [False, False, True, False, True,
                                                                             False, False]


def test_onecycle_rises_then_falls():
    s = LRSchedule(run_config("fast"), total_steps=100)
    lrs = [s.lr(i) for i in range(100)]
    peak = int(np.argmax(lrs))
    assert 25 <= peak <= 35 and lrs[peak] == pytest.approx(0.02, rel=0.05)
    assert lrs[0] < 0.1 * lrs[peak] and lrs[-1] < 0.01 * lrs[peak]


def test_training_statistics_leave_the_held_out_validation_images_out(data):
    from alexnet.dataset import TensorImageDataset
    from alexnet.sources import dataset_stats

    d = train_module.open_data(tiny_config(data))
    full, kept = d.train.base, d.train.indices
    assert len(d.val) == 4 and len(kept) == 40
    only = TensorImageDataset(full.images[torch.from_numpy(kept)], full.labels[kept], full.classes,
                              full.image_size)
    expect, whole = dataset_stats(only), dataset_stats(full)
    assert torch.equal(d.stats.mean_image, expect.mean_image) and torch.equal(d.stats.eigval, expect.eigval)
    assert not torch.allclose(d.stats.mean_image, whole.mean_image)


@pytest.mark.filterwarnings("ignore:unreadable image")
def test_a_stand_in_for_an_unreadable_training_file_is_never_a_held_out_image(tmp_path):
    """A folder without val/ holds part of its images out for validation; an unreadable
    training file's stand-in (the next readable record) used to be whatever came next in
    the folder, a held-out image too, which training then learned from."""
    from PIL import Image

    from alexnet.sources import open_dataset

    root, n = tmp_path / "tree", 40
    for k in range(n):  # file k is all 5 * k, so a pixel names its file
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 5 * k, np.uint8)).save(root / f"c{k % 2}" / f"{k:03d}.png")
    records = open_dataset(root, "train").sources
    record_of_file = {int(Path(s).stem): j for j, s in enumerate(records)}
    tr, held = holdout_split(n, 4)
    bad = next(int(i) for i in tr if (i + 1) % n in held)  # the next record is a held-out one
    (root / records[bad]).write_bytes(b"not a PNG")
    cfg = run_config("paper", {"data": {"path": str(root), "val_holdout": 4, "num_workers": 0}})
    d = train_module.open_data(cfg)
    assert np.array_equal(d.train.indices, tr)
    x, y = d.train.read([int(np.searchsorted(tr, bad))])
    stand_in = record_of_file[int(x[0, 0, 0, 0]) // 5]
    assert stand_in in tr and stand_in not in held and stand_in != bad
    assert int(y[0]) == int(d.train.base.labels[stand_in]) and bad in d.train.base.bad


def test_a_validation_split_that_cannot_be_used_is_an_error_not_a_held_out_part(tmp_path):
    """A val/ beside train/ that is an unfinished store, a train store, or a flat folder
    without labels was silently replaced by held-out training images (fewer trained on,
    the real validation set never used); no val/ at all, or a train store given alone,
    still holds a part out."""
    from PIL import Image

    from alexnet.sources import DataSourceError
    from alexnet.store import prepare

    tree = tmp_path / "tree"
    for split, n in (("train", 12), ("val", 4)):
        for k in range(n):
            (tree / split / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 10 * k, np.uint8)).save(tree / split / f"c{k % 2}" / f"{k}.png")
    stores = tmp_path / "stores"
    prepare(tree, stores / "train", split="train", workers=1, size=227, progress=False)
    prepare(tree, stores / "val", split="val", workers=1, size=227, progress=False, _stop_after=2)

    def opened(path):
        return train_module.open_data(run_config("paper", {"data": {"path": str(path), "image_size": 227,
                                                                    "val_holdout": 2, "num_workers": 0}}))

    with pytest.raises(DataSourceError, match=r"^the validation split cannot be used: .*val is an unfinished "
                                              r"store.*; fix it, or move it out of .*stores to validate on "
                                              r"held-out training images$"):
        opened(stores)
    flat = tmp_path / "flat"
    for k in range(4):
        (flat / "train" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 10 * k, np.uint8)).save(flat / "train" / f"c{k % 2}" / f"{k}.png")
    (flat / "val").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "val" / "photo.png")
    with pytest.raises(DataSourceError, match="the validation split cannot be used: no classes: .*val holds 1 images"):
        opened(flat)
    # IDX data's "val" is its t10k test files: damaged, they are the test split's warning
    idx = write_idx(tmp_path / "idx")
    (idx / "t10k-labels-idx1-ubyte").unlink()
    with pytest.warns(RuntimeWarning, match="the test split is left out: .*lacks t10k-labels-idx1-ubyte"):
        d = train_module.open_data(tiny_config(idx))
    assert d.test is None and len(d.val) == 4
    d = opened(stores / "train")  # a train store alone: no val split, a part held out
    assert (len(d.train), len(d.val)) == (11, 1)  # (a tenth at most)
    d = opened(tree / "train")
    assert (len(d.train), len(d.val)) == (11, 1)  # (a tenth at most)


def test_the_test_split_of_every_kind_of_source_is_found(data, tmp_path):
    """The test split that training's end evaluates: a tree's test/ folder (only IDX data's
    t10k files were), IDX data's also when validation comes from elsewhere (--val-data),
    and an unusable test/ (unlabelled, as ILSVRC's) a warning, not the end of the run."""
    from PIL import Image

    tree = tmp_path / "tree"
    for split, n in (("train", 12), ("val", 4), ("test", 6)):
        for k in range(n):
            (tree / split / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 10 * k, np.uint8)).save(tree / split / f"c{k % 2}" / f"{k}.png")
    d = train_module.open_data(run_config("paper", {"data": {"path": str(tree), "num_workers": 0}}))
    assert len(d.val) == 4 and len(d.test) == 6 and list(d.test.classes) == ["c0", "c1"]
    assert {Path(s).parts[0] for s in d.test.sources} == {"c0", "c1"} and d.test.root.endswith("test")
    d = train_module.open_data(tiny_config(data))  # IDX: t10k is the test split, train's tenth validates
    assert len(d.test) == 12 and len(d.val) == 4
    d = train_module.open_data(run_config("paper", {"data": {"path": str(data), "val_path": str(data)}}))
    assert len(d.test) == 12
    for f in (tree / "test").rglob("*.png"):  # test/ as a flat folder of unlabelled images
        f.rename(tree / "test" / f"{f.parent.name}-{f.name}")
    for c in ("c0", "c1"):
        (tree / "test" / c).rmdir()
    with pytest.warns(RuntimeWarning, match="the test split is left out: no classes: .* --no-test") as w:
        d = train_module.open_data(run_config("paper", {"data": {"path": str(tree), "num_workers": 0}}))
    assert d.test is None and len(d.val) == 4 and "--labels" not in str(w[0].message)
    # --no-test (train.test false): not even opened, so no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = train_module.open_data(run_config("paper", {"data": {"path": str(tree), "num_workers": 0},
                                                        "train": {"test": False}}))
    assert d.test is None
    # a test/ with a class training lacks: a warning too, not the end of the run before it begins
    for f in (tree / "test").iterdir():
        f.unlink()
    for c in ("c0", "c9"):
        (tree / "test" / c).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tree / "test" / c / "x.png")
    with pytest.warns(RuntimeWarning, match="the test split is left out: .*class folder c9"):
        assert train_module.open_data(run_config("paper", {"data": {"path": str(tree), "num_workers": 0}})).test is None


def test_the_processes_are_compared_before_the_statistics_pass_they_share(tmp_path, monkeypatch):
    """Under torchrun the statistics of a folder come from collectives: a node on other
    data (another image size, an IDX file) would join other collectives, waiting for ever
    or aborting, before the check that names what differs."""
    from PIL import Image

    from alexnet.sources import Shared

    monkeypatch.setenv("ALEXNET_CACHE", str(tmp_path / "cache"))
    for k in range(10):
        (tmp_path / "tree" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 10 * k, np.uint8)).save(tmp_path / "tree" / f"c{k % 2}" / f"{k}.png")
    seen = []

    def collective(what):
        def call(value):
            seen.append(what)
            raise RuntimeError(f"{what}: a collective before the check")
        return call

    def check(data):
        seen.append(data)
        raise ConfigError("process 1 of this run differs from process 0")

    cfg = run_config("paper", {"data": {"path": str(tmp_path / "tree"), "num_workers": 0}})
    with pytest.raises(ConfigError, match="differs from process 0"):
        train_module.open_data(cfg, shared=Shared(0, 2, collective("any_true"), collective("add_up")), check=check)
    folder = {"training images": 9, "classes": ["c0", "c1"], "training data": "an image folder",
              "statistics": "computed"}  # (9: one image held out for validation)
    assert seen == [folder]

    # Whether a process makes the shared pass is compared too: a node given the prepared
    # store of the same folder, or resuming with the checkpoint's statistics, makes none
    # and would leave the others waiting in it. Count and classes alone did not tell.
    from alexnet.store import prepare

    prepare(tmp_path / "tree", tmp_path / "store", progress=False, size=16)
    store_cfg = run_config("paper", {"data": {"path": str(tmp_path / "store"), "num_workers": 0}})
    seen.clear()
    for c, stats in ((store_cfg, None), (cfg, train_module.open_data(store_cfg).stats)):
        with pytest.raises(ConfigError):
            train_module.open_data(c, stats=stats, check=check)
    store, resumed = seen
    assert store == {**folder, "training data": "a prepared store"}
    assert resumed == {**folder, "statistics": "kept from the checkpoint (a resume)"}
    me = types.SimpleNamespace(info=types.SimpleNamespace(enabled=True))
    monkeypatch.setattr(train_module, "gather_objects", lambda mine, info: [{**mine, **folder}, mine])
    with pytest.raises(ConfigError, match=r"process 1 of this run differs from process 0 in training data "
                                          r"\('a prepared store' against 'an image folder'\)"):
        Trainer._check_same_everywhere(me, cfg, store)
    Trainer._check_same_everywhere(me, cfg, folder)


def test_an_error_opening_the_data_keeps_its_cause(data, tmp_path, monkeypatch):
    """Only a lost process's error is replaced by one line; any other keeps its chain."""
    def open_data(cfg, **kw):
        try:
            raise KeyError("inner")
        except KeyError as e:
            raise RuntimeError("outer") from e

    monkeypatch.setattr(train_module, "open_data", open_data)
    with pytest.raises(RuntimeError, match="outer") as caught:
        Trainer(tiny_config(data), tmp_path / "r", quiet=True)
    assert isinstance(caught.value.__cause__, KeyError)


def test_a_tree_named_for_validation_is_not_its_own_validation_set(tmp_path):
    """Training on a class tree whose name says val (imagenet-val-sorted) validated on the
    very images it trained on; it holds a part out, as any tree without val/ does."""
    from PIL import Image

    from alexnet.dataset import SubsetDataset

    root = tmp_path / "imagenet-val-sorted"
    for k in range(20):
        (root / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(root / f"c{k % 2}" / f"{k}.png")
    d = train_module.open_data(run_config("paper", {"data": {"path": str(root), "num_workers": 0}}))
    assert isinstance(d.val, SubsetDataset) and len(d.val) == 2 and len(d.train) == 18
    assert not set(d.train.indices) & set(d.val.indices)


def test_resume_keeps_the_statistics_the_run_started_with(data, tmp_path, monkeypatch):
    t = Trainer(tiny_config(data), tmp_path / "run", quiet=True)
    stop_at(t, 2)
    assert t.fit()["stopped"]
    started = t.data.stats

    def no_new_statistics(*a, **k):
        raise AssertionError("a resumed run computed its data statistics again")

    monkeypatch.setattr("alexnet.sources.dataset_stats", no_new_statistics)
    t = Trainer(None, tmp_path / "run", resume=True, quiet=True)
    for a, b in ((t.data.stats.mean_image, started.mean_image), (t.data.stats.eigvec, started.eigvec)):
        assert torch.equal(a, b)
    assert t.fit()["stopped"] is False


@pytest.mark.parametrize("fused", [False, True])
def test_the_paper_momentum_rule_holds_across_a_learning_rate_drop(fused):
    """Section 5: v <- 0.9 v - 0.0005 lr w - lr grad; w <- w + v, written out in float64,
    against torch's SGD stepped with set_lr, through two drops of the rate by 10."""
    from alexnet.train import set_lr

    rng = np.random.default_rng(0)
    target = torch.from_numpy(rng.normal(size=50))
    w0 = torch.from_numpy(rng.normal(size=50))
    rates = [0.1] * 5 + [0.01] * 5 + [0.001] * 5

    def grad(w):  # of 0.5 * |w - target|^2 + sin(w).sum(): not linear, so the paths differ if the rule does
        return (w - target) + torch.cos(w)

    w, v = w0.clone(), torch.zeros(50, dtype=torch.float64)
    for lr in rates:
        v = 0.9 * v - 0.0005 * lr * w - lr * grad(w)
        w = w + v
    paths = {}
    for form in ("paper", "pytorch"):
        p = torch.nn.Parameter(w0.clone())
        opt = torch.optim.SGD([p], lr=rates[0], momentum=0.9, weight_decay=0.0005, fused=fused)
        for lr in rates:
            set_lr(opt, lr, form)
            p.grad = grad(p.detach())
            opt.step()
        paths[form] = p.detach()
    torch.testing.assert_close(paths["paper"], w, rtol=0, atol=1e-12)
    assert (paths["pytorch"] - w).abs().max() > 1e-3  # PyTorch's own rule is another path after a drop


def test_momentum_form_defaults():
    assert run_config("paper").train.momentum_form == "paper"
    assert run_config("fast").train.momentum_form == run_config("demo").train.momentum_form == "pytorch"


def test_holdout_split_is_fixed_and_disjoint():
    a, b = holdout_split(100, 10)
    a2, b2 = holdout_split(100, 10)
    assert np.array_equal(a, a2) and np.array_equal(b, b2)
    assert len(b) == 10 and len(set(a) | set(b)) == 100 and not set(a) & set(b)
    # a random choice, not a block: an image folder lists its images class by class, and the
    # held-out tenth must draw from all of them
    _, held = holdout_split(1000, 100)
    per_tenth = np.bincount(held // 100, minlength=10)
    assert per_tenth.min() >= 3 and per_tenth.max() <= 20, per_tenth
    assert not np.array_equal(holdout_split(1000, 100, seed=1)[1], held)


def test_ten_crop_evaluation_matches_a_direct_computation(data, tmp_path):
    from alexnet.augment import ten_crop
    from alexnet.evaluate import evaluate_checkpoint
    from alexnet.sources import open_dataset

    Trainer(tiny_config(data, epochs=1, max_steps=2), tmp_path / "r", quiet=True).fit()
    best = tmp_path / "r" / "best.safetensors"
    doc = evaluate_checkpoint(best, str(data), split="test", ten_crop=True, out_dir=tmp_path / "ev")
    ck = load_model_file(best)
    model = ck.build_model().eval()
    x, y = open_dataset(str(data), "test", 256).read(np.arange(12))
    crops = ten_crop(x, 227).float() - ten_crop(ck.stats.mean_image[None], 227)  # (12, 10, 3, 227, 227)
    with torch.no_grad():
        probs = model(crops.flatten(0, 1)).softmax(-1).view(12, 10, -1).mean(1)
    assert doc["ten_crop"] is True
    assert doc["top1_acc"] == pytest.approx((probs.argmax(1) == y).float().mean().item())


def test_bf16_autocast_trains_on_the_cpu(data, tmp_path):
    t = Trainer(tiny_config(data, amp="bf16", max_steps=2, epochs=1, deterministic=False), tmp_path / "r",
                quiet=True)
    assert t.amp is torch.bfloat16
    dtypes = []
    t.model.register_forward_hook(lambda module, args, out: dtypes.append((module.training, out.dtype)))
    t.fit()
    row = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[0])
    assert np.isfinite(row["train_loss"]) and row["step"] == 2
    # the network ran in bf16 in both training steps and in the validation
    assert dtypes[:2] == [(True, torch.bfloat16)] * 2 and (False, torch.bfloat16) in dtypes
    assert {d for _, d in dtypes} == {torch.bfloat16}


@pytest.mark.slow
# torch's own import of torch.utils.mkldnn under inductor, hidden from `alexnet train --compile`
# (Python shows a DeprecationWarning only for __main__'s code), shown by pytest
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_network_trains(data, tmp_path):
    t = Trainer(tiny_config(data, compile=True, max_steps=2, epochs=1, deterministic=False), tmp_path / "r",
                quiet=True)
    t.fit()
    row = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[0])
    assert np.isfinite(row["train_loss"]) and row["step"] == 2
    assert load_model_file(tmp_path / "r" / "best.safetensors").state_dict  # saved unwrapped


def test_a_stop_during_validation_ends_the_run_at_the_epoch_checkpoint(data, tmp_path):
    t = Trainer(tiny_config(data, epochs=2), tmp_path / "r", quiet=True)
    validate = t._validate

    def interrupted_validation():
        os.kill(os.getpid(), signal.SIGINT)
        return validate()

    t._validate = interrupted_validation
    saves = counting_saves(t)
    r = t.fit()
    assert r["stopped"] and r["step"] == 5  # the first epoch's 5 steps, none of the second
    assert json.loads((tmp_path / "r" / "checkpoints" / "last.json").read_text())["epoch"] == 1
    # the epoch's checkpoint is the stop's: not written a second time
    assert saves == [5] and step_folders(tmp_path / "r") == ["step-00000005"]
    assert r["checkpoint"] == str(tmp_path / "r" / "checkpoints" / "step-00000005")


def counting_saves(trainer):
    """The step of every checkpoint `trainer` writes, in order."""
    saves, inner = [], trainer.save_checkpoint

    def save():
        saves.append(trainer.step)
        return inner()

    trainer.save_checkpoint = save
    return saves


def step_folders(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def test_a_stop_at_a_checkpoint_step_writes_it_once_and_resumes_exactly(data, tmp_path):
    cfg = tiny_config(data, epochs=1)
    straight = Trainer(cfg, tmp_path / "straight", quiet=True)
    straight.fit()
    t = Trainer(tiny_config(data, epochs=1, checkpoint_every=3), tmp_path / "r", quiet=True)
    stop_at(t, 3)
    saves = counting_saves(t)
    assert t.fit()["stopped"] and saves == [3] and step_folders(tmp_path / "r") == ["step-00000003"]
    # stopped again at once after resuming: the checkpoint it resumed from is the stop's
    again = Trainer(None, tmp_path / "r", resume=True, quiet=True)
    again.stop_requested = True
    saves = counting_saves(again)
    r = again.fit()
    assert r["stopped"] and r["step"] == 3 and saves == [] and step_folders(tmp_path / "r") == ["step-00000003"]
    done = Trainer(None, tmp_path / "r", resume=True, quiet=True)
    assert done.fit()["stopped"] is False
    for k, v in weights(tmp_path / "straight").items():
        assert torch.equal(v, weights(tmp_path / "r")[k]), k

    # a stop at the run's last step: its checkpoint precedes the validation, which the
    # resume runs (it used to call the run finished, with no log row and no best model)
    t = Trainer(cfg, tmp_path / "last", quiet=True)
    stop_at(t, 5)
    assert t.fit()["stopped"] and not (tmp_path / "last" / "best.safetensors").exists()
    # a stop asked during that validation, the run's last: a stop, not on to the test set
    again = Trainer(None, tmp_path / "last", resume=True, quiet=True)
    validate = again._validate
    again._validate = lambda: (setattr(again, "stop_requested", True), validate())[1]
    r = again.fit()
    assert r["stopped"] and r["step"] == 5 and again.epoch == 1
    done = Trainer(None, tmp_path / "last", resume=True, quiet=True)
    saves = counting_saves(done)
    assert done.fit()["stopped"] is False and saves == [] and done.epoch == 1
    rows = [json.loads(x) for x in (tmp_path / "last" / "log.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["val_top1_err"], r["val_loss"]) for r in rows] == \
        [(r["epoch"], r["val_top1_err"], r["val_loss"]) for r in want]
    assert rows[0]["train_img_s"] is None  # its steps ran before the resume
    best = load_model_file(tmp_path / "last" / "best.safetensors").state_dict
    for k, v in load_model_file(tmp_path / "straight" / "best.safetensors").state_dict.items():
        assert torch.equal(v, best[k]), k


class Killed(BaseException):
    """A kill -9 stand-in: no handler of the trainer's runs."""


def test_a_step_folder_a_kill_left_unnamed_never_costs_the_checkpoint_resumed_from(data, tmp_path, monkeypatch):
    """Killed between a step folder's rename and the last.json naming it: the resume
    goes on from the step before, and the leftover folder (newer than any it writes for a
    while) once made the rotation remove the checkpoint last.json had just named."""
    import alexnet.train as train_mod

    cfg = tiny_config(data, epochs=1, checkpoint_every=2, keep_checkpoints=1)
    write = train_mod.atomic_write_text

    def killed_naming_step_4(path, text):
        if path.name == "last.json" and '"step": 4,' in text:
            raise Killed
        return write(path, text)

    monkeypatch.setattr(train_mod, "atomic_write_text", killed_naming_step_4)
    run = tmp_path / "r"
    with pytest.raises(Killed):
        Trainer(cfg, run, quiet=True).fit()
    monkeypatch.undo()
    assert step_folders(run) == ["step-00000002", "step-00000004"]
    t = Trainer(None, run, resume=True, quiet=True)
    assert t.step == 2 and step_folders(run) == ["step-00000002"]
    stop_at(t, 3)
    assert t.fit()["stopped"] and step_folders(run) == ["step-00000003"]
    done = Trainer(None, run, resume=True, quiet=True)  # (exact resume itself is tested above)
    assert done.fit()["stopped"] is False and done.step == 5 and step_folders(run) == ["step-00000005"]


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """The folder of an uninterrupted tiny_config run of `epochs` epochs (made once)."""
    runs = {}

    def run(epochs):
        if epochs not in runs:
            runs[epochs] = tmp_path_factory.mktemp("whole")
            Trainer(tiny_config(data, epochs=epochs), runs[epochs], quiet=True).fit()
        return runs[epochs]

    return run


@pytest.mark.parametrize("epochs", [1, pytest.param(2, marks=pytest.mark.slow)])  # (2: ~19 s; 1 has the same path)
def test_a_kill_between_the_epoch_checkpoint_and_best_is_mended_by_the_resume(data, tmp_path, monkeypatch, epochs,
                                                                              uninterrupted):
    """best.safetensors comes after the epoch's checkpoint: a kill between them leaves the
    epoch's best unwritten, and the resume (even one with nothing left to train) writes it
    from the checkpoint; it never holds the weights of an epoch that a resume redoes."""
    cfg = tiny_config(data, epochs=epochs)
    whole = uninterrupted(epochs)

    def killed(trainer, *args):
        raise Killed

    monkeypatch.setattr(Trainer, "_save_best", killed)
    run = tmp_path / "r"
    with pytest.raises(Killed):
        Trainer(cfg, run, quiet=True).fit()
    monkeypatch.undo()
    assert not (run / "best.safetensors").exists() and step_folders(run) == ["step-00000005"]
    resumed = Trainer(None, run, resume=True, quiet=True)
    mended = load_model_file(run / "best.safetensors")  # written by the resume itself
    assert mended.extra["epoch"] == 1 and mended.extra["step"] == 5
    resumed.fit()
    got, want = load_model_file(run / "best.safetensors"), load_model_file(whole / "best.safetensors")
    assert got.extra == want.extra
    for k, v in want.state_dict.items():
        assert torch.equal(got.state_dict[k], v), k
    before = (run / "best.safetensors").stat()
    Trainer(None, run, resume=True, quiet=True).close()  # best is the epoch's already: not written again
    after = (run / "best.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_lost_last_json_resumes_from_the_newest_step_folder(data, tmp_path, uninterrupted):
    """Step folders are complete once they have their names, so without a readable
    last.json (missing, or unreadable) the resume takes the newest, says so, names it again
    in last.json and ends with the uninterrupted run's weights; a new run into that folder
    is pointed at --resume."""
    import shutil

    cfg = tiny_config(data, checkpoint_every=2)
    whole = uninterrupted(cfg.train.epochs)  # (checkpoints change no weight)
    t = Trainer(cfg, tmp_path / "r", quiet=True)
    stop_at(t, 3)
    assert t.fit()["stopped"] and step_folders(tmp_path / "r") == ["step-00000002", "step-00000003"]
    for damage in ("unreadable", "missing"):  # (the same stopped run, copied: one training for both)
        run = shutil.copytree(tmp_path / "r", tmp_path / damage)
        last = run / "checkpoints" / "last.json"
        if damage == "missing":
            last.unlink()
        else:
            last.write_bytes(b"\xff{")
        with pytest.raises(ConfigError, match="continue it with --resume"):
            Trainer(cfg, run, quiet=True)
        with pytest.warns(RuntimeWarning, match=f"last.json is {damage}: resuming from the newest step folder, "
                                                f"step-00000003"):
            resumed = Trainer(None, run, resume=True, quiet=True)
        assert resumed.step == 3 and json.loads(last.read_text())["dir"] == "step-00000003"
        if damage == "unreadable":
            resumed.close()
            continue
        resumed.fit()
        got, want = weights(run), weights(whole)
        for k, v in want.items():
            assert torch.equal(got[k], v), k


def test_the_report_keeps_classes_whose_readable_names_repeat(tmp_path):
    """ImageNet-1k has two "missile" classes (n03773504, n04008634): keyed by name, the
    second would overwrite the first in eval.json."""
    from alexnet.evaluate import Metrics, write_report

    conf = np.array([[2, 0, 0], [1, 1, 0], [0, 0, 0]])
    m = Metrics(count=4, loss=1.0, top1_hits=3, top5_hits=4, confusion=conf)
    doc = write_report(m, ["n03773504", "n04008634", "n01440764"], ["missile", "missile", "tench"], tmp_path,
                       title="t")
    on_disk = json.loads((tmp_path / "eval.json").read_text())
    assert on_disk["per_class_accuracy"] == {"n03773504": 1.0, "n04008634": 0.5, "n01440764": None}
    assert on_disk["class_names"] == {"n03773504": "missile", "n04008634": "missile", "n01440764": "tench"}
    assert doc["per_class_accuracy"] == on_disk["per_class_accuracy"]


@pytest.mark.parametrize("how", ["ctrl-c", "reader gone"])
def test_a_stop_with_stdouts_reader_gone_still_saves(data, tmp_path, how):
    """`alexnet train | tee log`: a Ctrl-C ends tee too, and the printing that follows (the
    signal's own line, then the stop's) met a broken pipe, which ended the process before it
    saved. The same when the reader leaves by itself (`| head -1`). The run now stops after
    the step, saves, and exits 141 as a SIGPIPE would, its last words on stderr."""
    import subprocess
    import sys

    out = tmp_path / "r"
    p = subprocess.Popen([sys.executable, "-m", "alexnet", "train", "--data", str(data), "--out", str(out),
                          "--epochs", "40", "--batch-size", "8", "--no-test", "--set", "data.num_workers=0",
                          "--set", f"model.fc_width={TEST_FC_WIDTH}", "--set", "train.checkpoint_every=0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert p.stdout.readline().startswith("run ")  # training has begun
        p.stdout.close()  # the reader is gone
        if how == "ctrl-c":
            p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=120)[1]
    finally:
        p.kill()
    assert p.returncode == 141, err
    last = json.loads((out / "checkpoints" / "last.json").read_text())
    assert (out / "stopped").read_text() == f"stopped at step {last['step']}\n"
    assert f"stopped at step {last['step']}; checkpoint" in err and "Traceback" not in err, err
    if how == "reader gone":  # the first validation line was the first write to meet the broken pipe
        assert last["epoch"] == 1 and last["step"] == 5
    resumed = Trainer(None, out, resume=True, quiet=True)
    assert resumed.step == last["step"]
    resumed.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_stdout_stops_and_saves_with_one_line(data, tmp_path):
    """`alexnet train > log` on a disk that fills: the first print that cannot be written
    ended the process with a traceback, before it saved. Now the run stops after the step,
    saves, says so on stderr in one line and exits 2."""
    import subprocess
    import sys

    out = tmp_path / "r"
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "alexnet", "train", "--data", str(data), "--out", str(out),
                            "--epochs", "40", "--batch-size", "8", "--no-test", "--set", "data.num_workers=0",
                            "--set", f"model.fc_width={TEST_FC_WIDTH}", "--set", "train.checkpoint_every=0"],
                           stdout=full, stderr=subprocess.PIPE, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert ("alexnet: error: cannot write standard output: No space left on device; training stopped after "
            "that step, its checkpoint saved") in r.stderr.splitlines(), r.stderr
    last = json.loads((out / "checkpoints" / "last.json").read_text())
    assert (out / "stopped").read_text() == f"stopped at step {last['step']}\n"
    resumed = Trainer(None, out, resume=True, quiet=True)  # (here step 0: the run's first line failed)
    assert resumed.step == last["step"]
    resumed.close()


@pytest.mark.parametrize("closed", [">&- 2>&-", pytest.param(">&-", marks=pytest.mark.slow),
                                    pytest.param("2>&-", marks=pytest.mark.slow)])
def test_a_run_with_stdout_or_stderr_closed_trains_as_any(data, tmp_path, closed):
    """`alexnet train ... >&-` (or `2>&-`): Python's sys.stdout (sys.stderr) is None; the
    broken-pipe guard wrapped it all the same, and the progress line wrote to it, whose
    first write was an AttributeError: the run ended silently before its first checkpoint."""
    import subprocess
    import sys

    out = tmp_path / "r"
    cmd = (f"{sys.executable} -m alexnet train --data {data} --out {out} --epochs 1 --max-steps 1 --batch-size 8 "
           f"--no-test --set data.num_workers=0 --set model.fc_width={TEST_FC_WIDTH} {closed}")
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr + r.stdout, (r.stdout + r.stderr)[-2000:]
    assert json.loads((out / "log.jsonl").read_text().splitlines()[0])["step"] == 1
