"""Faults injected for real: kill -9 of `alexnet train` and `alexnet prepare` at random
points (and in the phases that matter: a step, a checkpoint write, validation), a full or
read-only disk during a checkpoint save, a data-loader worker killed mid-run. After each:
nothing readable is half-written, the newest checkpoint is whole, the run resumes, and the
end result equals an uninterrupted run's bit for bit; user-facing failures are one line."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import alexnet.checkpoint as checkpoint_mod
import alexnet.fileio as fileio
from alexnet.checkpoint import load_model_file, load_state
from alexnet.config import to_dict
from alexnet.sources import DataSourceError
from alexnet.store import open_store
from alexnet.train import Trainer
from tests.test_store import store_contents
from tests.test_train import tiny_config, write_idx

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 2  # 12 IDX images, 1 held out, batches of 4


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_idx(tmp_path_factory.mktemp("idx"), train_n=12, test_n=4)


def config_file(data, folder: Path, **train) -> Path:
    cfg = tiny_config(data, batch_size=4, checkpoint_every=1, **train)
    path = folder / "config.json"
    path.write_text(json.dumps(to_dict(cfg)))
    return path


def killable_env(folder: Path) -> dict[str, str]:
    """The environment for a process that will be killed: its temporary files (the
    multiprocessing folders a kill leaves behind) go under `folder`, the test's own."""
    tmp = folder / "tmp"
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


def start_train(cfg: Path, run: Path, log: Path) -> subprocess.Popen:
    """`alexnet train` in its own process: a fresh run, or `--resume` once a checkpoint exists."""
    if (run / "checkpoints" / "last.json").exists():
        argv = ["--resume", str(run)]
    else:
        argv = ["--config", str(cfg), "--out", str(run)]
    return subprocess.Popen([sys.executable, "-m", "alexnet", "train", *argv, "--no-test"], cwd=REPO,
                            env=killable_env(log.parent),
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL the process and anything it started (its process group); wait for it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def partial_dirs(run: Path) -> list[Path]:
    return list((run / "checkpoints").glob(".step-*.partial"))


def temp_files(run: Path) -> list[Path]:
    return [*run.glob(".*.tmp"), *(run / "checkpoints").glob(".*.tmp"), *partial_dirs(run),
            *(run / "checkpoints").glob(".*.deleted")]


def assert_run_folder_whole(run: Path) -> dict | None:
    """Every file a reader may open is complete; last.json names a whole checkpoint."""
    assert read_json(run / "config.json") is not None
    if (run / "log.jsonl").exists():
        for line in (run / "log.jsonl").read_text().splitlines():
            json.loads(line)
    if (run / "best.safetensors").exists():
        load_model_file(run / "best.safetensors")
    ck = run / "checkpoints"
    for folder in ck.glob("step-*"):
        model = load_model_file(folder / "model.safetensors")
        state = load_state(folder / "state.pt")
        assert model.extra["step"] == state["step"] == int(folder.name.split("-")[1].split(".")[0])
    last = None
    if (ck / "last.json").exists():
        last = json.loads((ck / "last.json").read_text())
        assert (ck / last["dir"] / "model.safetensors").is_file() and (ck / last["dir"] / "state.pt").is_file()
        assert load_state(ck / last["dir"] / "state.pt")["step"] == last["step"]
    return last


def kill_in_phase(proc: subprocess.Popen, run: Path, target: str, rng: random.Random,
                  lengths: dict[str, float]) -> str | None:
    """Wait for `target` ("step", "checkpoint" or "validation") to begin, SIGKILL the trainer
    at a random moment inside it, and return the phase it was in (or None if it ended first).
    `lengths`: a step's and a save's length in seconds, measured here (this machine's and this
    network's, not a guess) the first time they are needed, and kept for the next kills."""
    last_path = run / "checkpoints" / "last.json"
    seen = last_path.read_text() if last_path.exists() else None
    began = None  # when the step or save being measured began
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        now = last_path.read_text() if last_path.exists() else None
        last = read_json(last_path) if now != seen else None  # a checkpoint was just completed
        seen = now if last else seen
        if target == "checkpoint":
            if partial_dirs(run):  # a save is under way: model, then state
                if "checkpoint" in lengths:
                    time.sleep(rng.uniform(0.05, 0.7) * lengths["checkpoint"])
                    break
                began = began or time.monotonic()
            elif began is not None and last:  # ... and has ended
                lengths["checkpoint"] = time.monotonic() - began
        if last and target == "validation" and last["batch_in_epoch"] == STEPS_PER_EPOCH:
            time.sleep(rng.uniform(0, 0.2))  # validation runs right after the epoch's last step is saved
            break
        if target == "step":
            if last and last["batch_in_epoch"] < STEPS_PER_EPOCH:  # a step inside the epoch begins
                if "step" in lengths:
                    time.sleep(rng.uniform(0.1, 0.8) * lengths["step"])
                    break
                began = time.monotonic()
            elif began is not None and partial_dirs(run):  # ... and has ended
                lengths["step"] = time.monotonic() - began
        time.sleep(0.005)
    if proc.poll() is not None:
        return None
    last = read_json(last_path)
    if partial_dirs(run):
        phase = "checkpoint"
    elif last and last["batch_in_epoch"] == STEPS_PER_EPOCH:
        phase = "validation"
    else:
        phase = "step"
    stop(proc)
    return phase


def kill_train_repeatedly(data, tmp_path: Path, kills: int, epochs: int, seed: int) -> Counter:
    cfg = config_file(data, tmp_path, epochs=epochs)
    straight = tmp_path / "straight"
    assert finish(start_train(cfg, straight, tmp_path / "straight.err"), 600) == 0, \
        (tmp_path / "straight.err").read_text()

    run, rng, phases, lengths = tmp_path / "killed", random.Random(seed), Counter(), {}
    for i in range(kills):
        proc = start_train(cfg, run, tmp_path / f"kill{i}.err")
        try:
            phase = kill_in_phase(proc, run, ("checkpoint", "step", "validation")[i % 3], rng, lengths)
        finally:
            stop(proc)
        if phase is None:  # the run ended before this kill
            assert proc.returncode == 0, (tmp_path / f"kill{i}.err").read_text()
            break
        phases[phase] += 1
        assert_run_folder_whole(run)
    proc = start_train(cfg, run, tmp_path / "last.err")
    assert finish(proc, 600) == 0, (tmp_path / "last.err").read_text()

    # the result: the same bits as the run that was never interrupted, and no leftovers
    a, b = assert_run_folder_whole(straight), assert_run_folder_whole(run)
    assert a == b and a["step"] == epochs * STEPS_PER_EPOCH
    for name in ("model.safetensors",):
        wa = load_model_file(straight / "checkpoints" / a["dir"] / name).state_dict
        wb = load_model_file(run / "checkpoints" / b["dir"] / name).state_dict
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = load_state(straight / "checkpoints" / a["dir"] / "state.pt")["optimizer"]["state"]
    sb = load_state(run / "checkpoints" / b["dir"] / "state.pt")["optimizer"]["state"]
    assert all(torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    ba, bb = load_model_file(straight / "best.safetensors"), load_model_file(run / "best.safetensors")
    assert all(torch.equal(ba.state_dict[k], bb.state_dict[k]) for k in ba.state_dict)
    la = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lb] == list(range(1, epochs + 1))
    assert [(r["val_loss"], r["val_top1_err"]) for r in la] == [(r["val_loss"], r["val_top1_err"]) for r in lb]
    assert not temp_files(run), temp_files(run)
    print(f"train: {sum(phases.values())} kills by phase {dict(phases)}")
    return phases


def test_train_killed_at_random_points_resumes_to_the_same_weights(data, tmp_path):
    phases = kill_train_repeatedly(data, tmp_path, kills=3, epochs=3, seed=1)  # one per phase
    assert sum(phases.values()) >= 3


@pytest.mark.slow
def test_train_killed_thirty_times_resumes_to_the_same_weights(data, tmp_path):
    phases = kill_train_repeatedly(data, tmp_path, kills=30, epochs=12, seed=2)
    assert sum(phases.values()) >= 25 and len(phases) == 3


# ----------------------------------------------------------------------------- prepare


def start_prepare(src: Path, out: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "alexnet", "prepare", str(src), str(out), "--size", "64",
                             "--workers", "1", "--quiet"], cwd=REPO, env=killable_env(log.parent),
                            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True)


def watch_store(out: Path, expected: dict, stop_event: threading.Event, seen: Counter) -> None:
    """A reader polling the store while it is written: it is refused as unfinished, or it is
    the finished store; never a half-written one."""
    while not stop_event.is_set():
        try:
            ds = open_store(out)
        except DataSourceError as e:
            msg = str(e)
            seen["unfinished" if "unfinished" in msg else "absent" if "not found" in msg or "no store" in msg
                 else f"error: {msg}"] += 1
        else:
            x, y = ds.read(np.array([0, len(ds) - 1]))
            seen["complete" if store_contents(out) == expected and len(ds) == expected["index"]["count"]
                 else "MISMATCH"] += 1
        time.sleep(0.01)


def committed(out: Path) -> int:
    """The number of images the store at `out` has committed so far (-1: none yet)."""
    progress = read_json(out / "progress.json")
    return progress["state"]["records"] if progress else -1


def kill_prepare_at_random(proc: subprocess.Popen, out: Path, rng: random.Random) -> bool:
    """SIGKILL `prepare` at a random moment (start-up included) no later than its first new
    commit: each killed run adds at most a commit or two (one takes ~40 ms from IDX files),
    so a store of enough images is never finished by the kills. False if it ended first."""
    before, deadline = committed(out), time.monotonic() + rng.uniform(0.3, 4.0)  # start-up ~1.5 s
    while proc.poll() is None and time.monotonic() < deadline and committed(out) <= before:
        time.sleep(0.002)
    finished = proc.poll() is not None
    stop(proc)
    return not finished


def kill_prepare_repeatedly(tmp_path: Path, kills: int, seed: int) -> tuple[int, Counter]:
    # 512 images a commit, at most about two a killed run: the kills never finish the store
    src = write_idx(tmp_path / "src", train_n=512 * (3 * kills + 3), test_n=4)
    assert finish(start_prepare(src, tmp_path / "once", tmp_path / "once.err"), 300) == 0
    expected = store_contents(tmp_path / "once")
    out, rng, done = tmp_path / "killed", random.Random(seed), 0
    seen: Counter = Counter()
    stop_event = threading.Event()
    reader = threading.Thread(target=watch_store, args=(out, expected, stop_event, seen), daemon=True)
    reader.start()
    try:
        for i in range(kills):
            proc = start_prepare(src, out, tmp_path / f"kill{i}.err")
            if not kill_prepare_at_random(proc, out, rng):
                assert proc.returncode == 0, (tmp_path / f"kill{i}.err").read_text()
                break
            done += 1
            assert (out / "index.json").exists() or committed(out) >= 0 or not out.exists()
        kept = committed(out)
        assert finish(start_prepare(src, out, tmp_path / "last.err"), 300) == 0, \
            (tmp_path / "last.err").read_text()
        time.sleep(0.1)
    finally:
        stop_event.set()
        reader.join(10)
    assert store_contents(out) == expected  # images, labels, sources, statistics, report: bit for bit
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "once").iterdir())
    assert set(seen) <= {"unfinished", "absent", "complete"}, seen
    print(f"prepare: {done} kills, {kept} of {expected['index']['count']} images committed by then; "
          f"reader saw {dict(seen)}")
    return done, seen


def test_prepare_killed_at_random_points_ends_with_the_same_store(tmp_path):
    done, seen = kill_prepare_repeatedly(tmp_path, kills=4, seed=3)
    assert done == 4 and seen["unfinished"] > 0 and seen["complete"] > 0


@pytest.mark.slow
def test_prepare_killed_thirty_times_ends_with_the_same_store(tmp_path):
    done, seen = kill_prepare_repeatedly(tmp_path, kills=30, seed=4)
    assert done == 30


# ----------------------------------------------------------------------------- full or read-only disk


def one_line_error(err: str, *words: str) -> None:
    """The run's end on stderr (after its progress lines) is one line `alexnet: error: ...`."""
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("alexnet: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    for w in words:
        assert w in errors[0], (w, errors[0])


def inject_write_error(monkeypatch, fails, code: int) -> list[str]:
    """Make `fileio.atomic_write` fail with OSError(code) in the middle of writing the
    first file for which `fails(path)` is true, as a full disk does; returns the paths written."""
    real, written, failed = fileio.atomic_write, [], []

    def atomic_write(path, write):
        path = Path(path)
        if not failed and fails(path):
            written.append(str(path))
            failed.append(str(path))

            def half_then_fail(f):
                f.write(b"\0" * 4096)
                raise OSError(code, os.strerror(code))
            return real(path, half_then_fail)
        written.append(str(path))
        return real(path, write)

    monkeypatch.setattr(fileio, "atomic_write", atomic_write)
    monkeypatch.setattr(checkpoint_mod, "atomic_write", atomic_write)
    return written


@pytest.fixture(scope="module")
def straight_one_epoch(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    Trainer(tiny_config(data, batch_size=4, checkpoint_every=1, epochs=1), run, quiet=True).fit()
    return run


@pytest.mark.parametrize("where, code, words", [
    ("state.pt", errno.ENOSPC, ("cannot write checkpoint", "step-00000002", "No space left on device",
                                              "the checkpoint of step 1 is intact")),
    ("last.json", errno.EROFS, ("cannot write checkpoint", "step-00000002", "Read-only file system")),
    ("best.safetensors", errno.EACCES, ("cannot write", "best.safetensors", "Permission denied",
                                        "the checkpoint of step 2 is intact")),
])
def test_a_write_error_stops_with_one_line_and_keeps_the_checkpoint(data, tmp_path, monkeypatch, capsys,
                                                                     straight_one_epoch, where, code, words):
    from alexnet.cli import main

    cfg = config_file(data, tmp_path, epochs=1)
    run = tmp_path / "run"
    step2_state = ".step-00000002.partial/state.pt"  # written; then last.json, to name it, fails
    written = inject_write_error(monkeypatch, lambda p: p.name == where and (
        where == "best.safetensors" or where == "state.pt" and step2_state in str(p)
        or where == "last.json" and any(step2_state in w for w in written)), code)
    assert main(["train", "--config", str(cfg), "--out", str(run), "--no-test"]) == 2
    one_line_error(capsys.readouterr().err, *words)
    assert any(w.endswith(where) for w in written)
    last = assert_run_folder_whole(run)
    assert last["step"] == (2 if where == "best.safetensors" else 1)
    assert not temp_files(run), temp_files(run)  # the half-written file is gone, its space given back
    # and so is a whole step folder that last.json could not be made to name
    assert max(int(p.name[5:13]) for p in (run / "checkpoints").glob("step-*")) == last["step"]
    monkeypatch.undo()
    # resumed, the run ends where the uninterrupted one did, bit for bit
    t = Trainer(None, run, resume=True, quiet=True)
    assert t.fit()["stopped"] is False
    a, b = assert_run_folder_whole(straight_one_epoch), assert_run_folder_whole(run)
    wa = load_model_file(straight_one_epoch / "checkpoints" / a["dir"] / "model.safetensors").state_dict
    wb = load_model_file(run / "checkpoints" / b["dir"] / "model.safetensors").state_dict
    assert a["step"] == b["step"] == 2 and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_resume_that_cannot_rewrite_the_log_is_one_line(data, tmp_path, monkeypatch, capsys):
    """The resume rewrites log.jsonl (dropping epochs after its checkpoint) while the
    trainer is built: a read-only disk there was a traceback."""
    from alexnet.cli import main

    run = tmp_path / "run"
    t = Trainer(tiny_config(data, batch_size=4, epochs=1), run, quiet=True)
    t.stop_requested = True  # stops before its first step, with a checkpoint
    assert t.fit()["stopped"]
    t.close()
    inject_write_error(monkeypatch, lambda p: p.name == "log.jsonl", errno.EROFS)
    assert main(["train", "--resume", str(run)]) == 2
    one_line_error(capsys.readouterr().err, "cannot write", "log.jsonl", "Read-only file system")


@pytest.fixture
def tmpfs(tmp_path):
    """A real, small file system of our own (needs the right to mount: root here)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600M", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}); "
                    f"the in-process injection above covers the logic")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def remount(disk: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(disk)], check=True, capture_output=True)


@pytest.mark.slow  # the in-process injection above covers the same handling in the default suite
@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_real_full_or_read_only_disk_stops_the_run_cleanly(data, tmp_path, tmpfs, straight_one_epoch, fault):
    cfg = config_file(data, tmp_path, epochs=1)
    run = tmpfs / "run"
    if fault == "full":  # room for the run's first checkpoint and half of its second
        step = sum(f.stat().st_size for f in (straight_one_epoch / "checkpoints" / "step-00000001").iterdir())
        remount(tmpfs, f"size={int(1.5 * step) // 1024}k")
    else:
        remount(tmpfs, "size=2000M")
    proc = start_train(cfg, run, tmp_path / "err")
    try:
        if fault == "read-only":  # as soon as step 1 is saved, the disk turns read-only
            deadline = time.monotonic() + 120
            while not (run / "checkpoints" / "last.json").exists() and time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "err").read_text()
                time.sleep(0.005)
            remount(tmpfs, "ro")
        code = finish(proc, 300)
    finally:
        stop(proc)
    err = (tmp_path / "err").read_text()
    assert code == 2, err
    one_line_error(err, "cannot write checkpoint", "step-00000002",
                   "No space left on device" if fault == "full" else "Read-only file system",
                   "the checkpoint of step 1 is intact", f"alexnet train --resume {run}")
    assert assert_run_folder_whole(run)["step"] == 1
    assert not temp_files(run), temp_files(run)
    remount(tmpfs, "rw,size=2000M")  # space freed: the same command goes on
    assert finish(start_train(cfg, run, tmp_path / "err2"), 300) == 0, (tmp_path / "err2").read_text()
    a, b = assert_run_folder_whole(straight_one_epoch), assert_run_folder_whole(run)
    wa = load_model_file(straight_one_epoch / "checkpoints" / a["dir"] / "model.safetensors").state_dict
    wb = load_model_file(run / "checkpoints" / b["dir"] / "model.safetensors").state_dict
    assert b["step"] == 2 and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_prepare_on_a_full_disk_stops_with_one_line_and_resumes(tmp_path, tmpfs, capsys):
    from alexnet import cli
    from tests.test_store import make_plain_tree

    make_plain_tree(tmp_path / "src", n_per_class=20)
    args = ["prepare", str(tmp_path / "src"), "--size", "64", "--workers", "1", "--quiet"]
    assert cli.main([*args, str(tmp_path / "full")]) == 0
    remount(tmpfs, "size=300k")  # about 20 of the 60 images (12 KB each)
    capsys.readouterr()
    assert cli.main([*args, str(tmpfs / "store")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"alexnet: error: cannot write {tmpfs / 'store'}: ")
    assert "No space left on device" in err and "run the same command again" in err
    remount(tmpfs, "size=600M")
    assert cli.main([*args, str(tmpfs / "store")]) == 0
    assert store_contents(tmpfs / "store") == store_contents(tmp_path / "full")


# ----------------------------------------------------------------------------- a loader worker dies


def children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def test_a_killed_loader_worker_fails_the_run_loudly_and_promptly(tmp_path):
    # 36 training images in batches of 4: the worker still owes 6 or more batches after step 1
    data = write_idx(tmp_path / "idx", train_n=40, test_n=4)
    cfg = tiny_config(data, batch_size=4, checkpoint_every=1, epochs=1)
    cfg_path = tmp_path / "config.json"
    doc = to_dict(cfg)
    doc["data"]["num_workers"] = 1
    cfg_path.write_text(json.dumps(doc))
    run = tmp_path / "run"
    proc = start_train(cfg_path, run, tmp_path / "err")
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "last.json").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "err").read_text()
            time.sleep(0.01)
        workers = children(proc.pid)
        assert workers, "the trainer has no loader worker"
        for w in workers:
            os.kill(w, signal.SIGKILL)
        t0 = time.monotonic()
        code = finish(proc, 60)  # bounded: a hang fails here
        took = time.monotonic() - t0
    finally:
        stop(proc)
    err = (tmp_path / "err").read_text()
    assert code == 2 and took < 30, (code, took, err)
    one_line_error(err, "data loading failed", "was killed by signal 9", "is intact",
                   f"alexnet train --resume {run}")
    last = assert_run_folder_whole(run)
    assert last["step"] >= 1
    assert not [c for c in children(os.getpid()) if c == proc.pid]
