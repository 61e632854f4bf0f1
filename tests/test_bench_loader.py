"""The benchmark scripts: benchmarks/bench_loader.py, the input pipeline's benchmark (the
one gpu_check.sh runs beside the GPU), run small: every block measures, the JSON holds every
row, and a time limit's SIGINT keeps what was measured; and an unwritable --json refused
before any of the scripts measures."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_loader.py"
SMALL = ["--images", "16", "--batch", "4", "--workers", "0", "1", "--train-batch", "2", "--train-steps", "2",
         "--rounds", "1", "--train-workers", "0"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # 10 s: the paper network's training steps, fed three ways
def test_every_block_is_measured_and_written(tmp_path):
    out = tmp_path / "loader.json"
    p = subprocess.run([sys.executable, str(SCRIPT), *SMALL, "--json", str(out)], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert "cut_short" not in r and r["prepare_img_s"] > 0
    sources = {"prepared store (memmap)", "in-memory uint8 tensor", "JPEG decoding on the fly",
               "prepared store, uint8 + draws"}
    assert set(r["throughput_img_s"]) == sources
    for row in r["throughput_img_s"].values():
        assert set(row) == {"0", "1"} and all(v > 0 for v in row.values())  # JSON keys are strings
    cost = r["worker_cpu_ms_per_image"]
    assert len(cost) == 3 and all(v > 0 for v in cost.values())
    # the uint8 image a deferred batch ships is smaller than the float32 crop it replaces
    assert r["bytes_per_image"] == {"float32 227 crop": 3 * 227 * 227 * 4, "uint8 256 image": 3 * 256 * 256}
    feeds = r["train"]["feeds"]
    assert set(feeds) == {"memory", "store, 0 workers", "store, 0 workers, augment on device"}
    assert feeds["memory"]["ratio_vs_memory"] == 1.0
    for v in feeds.values():
        assert v["steps"] == 2 and v["median_step_s"] > 0 and v["cpu_s_per_step"] > 0
        assert abs(v["img_s"] - 2 / v["median_step_s"]) < 1e-6 * v["img_s"]
    assert r["train"]["device"] == "cpu" and r["train"]["compiled"] is False
    assert "best loader-fed speed ratio" in p.stdout


def test_an_interrupt_keeps_the_results_so_far(tmp_path):
    """gpu_check.sh stops the benchmark with SIGINT at its time limit: the rows measured by
    then are written, marked cut short, and the exit code says it was interrupted."""
    out = tmp_path / "loader.json"
    p = subprocess.Popen([sys.executable, str(SCRIPT), *SMALL, "--json", str(out)], env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if line.startswith("prepared store (memmap)"):  # the first row of throughputs is done
                p.send_signal(signal.SIGINT)
                break
        rest, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, err[-2000:]
    assert "interrupted: the results so far are kept" in rest
    r = json.loads(out.read_text())
    assert r["cut_short"] is True and "prepared store (memmap)" in r["throughput_img_s"]
    assert "train" not in r


@pytest.mark.parametrize("script", ["bench_loader.py", "bench_lrn.py", "bench_export.py"])
@pytest.mark.parametrize("where", ["folder", "file as folder"])
def test_a_json_that_cannot_be_written_is_refused_before_measuring(tmp_path, script, where):
    """The benchmark scripts take minutes; an output they could not write at the end is
    refused while their arguments are read, in one line, with nothing measured."""
    (tmp_path / "a-file").write_text("x")
    out = tmp_path if where == "folder" else tmp_path / "a-file" / "r.json"
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--json", str(out)], env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{script}: error: argument --json: ") and (
        "is a folder" in last if where == "folder" else "is not a writable folder" in last), p.stderr
    assert (tmp_path / "a-file").read_text() == "x"
