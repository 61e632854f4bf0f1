"""`alexnet bench`: the FLOP count, the peak, the table's arithmetic and the command."""

import json

import pytest
import torch

from alexnet import bench
from alexnet.train import native_bf16
from alexnet.cli import main
from alexnet.model import build_model


def test_flops_come_from_the_models_own_macs():
    fwd, train = bench.training_flops(build_model("paper"))
    assert fwd == 2 * 724_406_816  # the total of `alexnet summary`
    conv1 = 96 * 55 * 55 * 3 * 11 * 11
    assert train == 2 * (3 * 724_406_816 - conv1)  # conv1's input takes no gradient
    fwd_owt, _ = bench.training_flops(build_model("owt", num_classes=10))
    assert fwd_owt < fwd


def test_matmul_peak_is_measured():
    p = bench.matmul_peak(torch.device("cpu"), torch.float32, min_seconds=0.0, max_n=256)
    assert p["n"] == 256 and p["dtype"] == "fp32" and p["gflops"] > 0
    assert set(p["gflops_by_way"]) == {"torch.mm", "1x1 conv"} and p["gflops"] == max(p["gflops_by_way"].values())


@pytest.mark.parametrize("n", [64, 300])
def test_every_way_of_the_peak_computes_the_product(n):
    torch.manual_seed(0)
    ways = bench._products(n, torch.device("cpu"), torch.float64)
    results = [fn().reshape(n, n) for fn in ways.values()]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0])  # the same 2 n^3 FLOPs of work, counted once


CPUINFO = {
    "avx2-epyc": "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
                 "processor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma avx512_bf16\n",
    "avx512-bf16": "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n",
    "avx512-only": "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n",
    "amx": "processor\t: 0\nflags\t\t: avx512f amx_tile amx_bf16 amx_int8\n",
    "arm-bf16": "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n",
    "arm": "processor\t: 0\nFeatures\t: fp asimd crc32\n",
}


@pytest.mark.parametrize("cpu, native", [("avx2-epyc", False), ("avx512-bf16", True), ("avx512-only", False),
                                         ("amx", True), ("arm-bf16", True), ("arm", False), ("missing", False)])
def test_native_bf16_reads_the_first_cpus_flags(tmp_path, cpu, native):
    path = tmp_path / "cpuinfo"
    if cpu != "missing":
        path.write_text(CPUINFO[cpu])
    assert native_bf16(torch.device("cpu"), str(path)) is native


@pytest.mark.parametrize("hardware", [True, False])
def test_amp_auto_on_cuda_takes_bf16_only_where_the_gpu_computes_it(monkeypatch, hardware):
    """A V100 or T4 emulates bf16 (torch's default answer counts that as supported); there
    auto means fp16 with its loss scaling, in training and in the bench alike."""
    from alexnet.config import run_config
    from alexnet.train import resolve_numerics

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: hardware or including_emulation)
    want = torch.bfloat16 if hardware else torch.float16
    assert resolve_numerics(run_config("paper", {}), torch.device("cuda"))[0] is want
    assert bench.amp_for(torch.device("cuda")) is want


def test_contenders_pick_the_dtype_for_the_device():
    cpu = torch.device("cpu")
    auto = bench.contenders(cpu)
    assert [c.name for c in auto] == ["paper (ours)", "paper (plain)", "owt (plain)"]
    assert auto[0].dtype == ("bf16" if bench.native_bf16(cpu) else "fp32")
    assert auto[0].channels_last and auto[0].fused_sgd and auto[0].ours
    assert all(c.dtype == "fp32" and not c.channels_last for c in auto[1:])
    forced = bench.contenders(cpu, ablation=True, dtype="bf16")
    assert forced[0].dtype == "bf16" and forced[-1].name == "paper (ours, fp32)"
    unfused = next(c for c in forced if c.name == "paper (ours, blocks unfused)")
    assert unfused.dtype == "bf16" and not unfused.fuse_blocks and forced[0].fuse_blocks
    assert bench.build(unfused, 10, cpu, None).fuse is False


@pytest.fixture(scope="module")
def report():
    lines = []
    small = bench.matmul_peak  # small products: the peak has its own tests (bf16 without
    with pytest.MonkeyPatch.context() as mp:  # native support takes ~15 s at its full size)
        mp.setattr(bench, "matmul_peak", lambda *a, **k: small(*a, **{**k, "max_n": 256}))
        r = bench.run([2], ["train", "infer"], 2, torch.device("cpu"), num_classes=10, log=lines.append,
                      peak_seconds=0.01)
    r["log"] = lines
    return r


def test_run_times_every_contender_in_every_mode(report):
    rows = report["results"]
    assert [(r["contender"], r["mode"]) for r in rows] == [
        (c, m) for m in ("train", "infer") for c in ("paper (ours)", "paper (plain)", "owt (plain)")]
    fwd, train = bench.training_flops(build_model("paper", num_classes=10))
    for r in rows:
        assert len(r["step_times_s"]) == 2 and all(t > 0 for t in r["step_times_s"])
        assert r["img_s"] == pytest.approx(2 / (r["step_ms"] / 1000))
        peak = report["peaks"][r["dtype"]]["gflops"]
        assert r["peak_fraction"] == pytest.approx(r["gflops"] / peak)
        if r["variant"] == "paper":
            flops = train if r["mode"] == "train" else fwd
            assert r["gflops"] == pytest.approx(flops * 2 / (r["step_ms"] / 1000) / 1e9)
    for mode in ("train", "infer"):
        by = {r["contender"]: r for r in rows if r["mode"] == mode}
        assert by["paper (plain)"]["vs_paper_plain"] == 1.0 and by["owt (plain)"]["vs_owt_plain"] == 1.0
        ours = by["paper (ours)"]
        assert ours["vs_paper_plain"] == pytest.approx(ours["img_s"] / by["paper (plain)"]["img_s"])
    assert "bf16" in report["peaks"]
    assert any(line.startswith("paper (ours)") for line in report["log"])


def test_float32_on_cuda_is_compared_with_the_tf32_peak_its_convolutions_get(monkeypatch):
    """cuDNN convolves float32 in TF32 by default: those rows' peak is a TF32 product, and
    they say so; autocast rows keep their dtype, and a CPU has no TF32."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    plain, ours = bench.Contender("p", "paper", False), bench.Contender("o", "paper", True, amp=torch.bfloat16)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert (bench.arithmetic(plain, cuda), bench.arithmetic(ours, cuda), bench.arithmetic(plain, cpu)) == \
        ("tf32", "bf16", "fp32")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert bench.arithmetic(plain, cuda) == "fp32"
    before = torch.backends.cuda.matmul.allow_tf32
    p = bench.matmul_peak(cpu, torch.float32, min_seconds=0.0, max_n=256, tf32=True)
    assert p["dtype"] == "tf32" and torch.backends.cuda.matmul.allow_tf32 == before


def test_each_way_of_the_peak_grows_to_its_own_size_and_its_first_call_is_not_timed(monkeypatch):
    """Scripted times: way "fast" reaches min_seconds at n=1024, way "slow" at n=256, and
    every first call of a size takes 10 s (a kernel loading). The slow way stops at its own
    size; the first calls never count; the peak and its n are the faster way's."""
    calls = {}

    def products(n, device, dtype):
        return {"fast": ("fast", n), "slow": ("slow", n)}

    def timed(fn, device):
        calls[fn] = calls.get(fn, 0) + 1
        if calls[fn] == 1:
            return 10.0
        way, n = fn
        return n ** 3 * (1e-9 if way == "fast" else 1e-7)  # fast: 1,000 GFLOP/s x 2; slow: 20

    monkeypatch.setattr(bench, "_products", products)
    monkeypatch.setattr(bench, "_timed", timed)
    p = bench.matmul_peak(torch.device("cpu"), torch.float32, min_seconds=1.0, max_n=4096)
    assert {way for way, n in calls} == {"fast", "slow"}
    assert max(n for way, n in calls if way == "slow") == 256 and max(n for way, n in calls if way == "fast") == 1024
    assert p["via"] == "fast" and p["n"] == 1024 and p["gflops"] == pytest.approx(2 / 1e-9 / 1e9)
    assert p["gflops_by_way"]["slow"] == pytest.approx(2 / 1e-7 / 1e9)


def test_rows_in_tf32_are_measured_against_the_tf32_peak(monkeypatch):
    """Where the float32 contenders compute in TF32 (a GPU), their rows say so and their
    fraction is of a TF32 product's peak; the plain contenders never ask cuDNN to time
    its algorithms."""
    asked = []
    real = bench.matmul_peak

    def peak(device, dtype, min_seconds=0.25, max_n=8192, tf32=False):
        asked.append(tf32)
        return {**real(device, dtype, min_seconds=0.0, max_n=256, tf32=tf32), "gflops": 1000.0 if tf32 else 10.0}

    monkeypatch.setattr(bench, "matmul_peak", peak)
    monkeypatch.setattr(bench, "arithmetic", lambda c, device: "tf32" if c.amp is None else c.dtype)
    torch.backends.cudnn.benchmark = True
    r = bench.run([1], ["infer"], 1, torch.device("cpu"), num_classes=3, log=lambda line: None, dtype="fp32")
    assert torch.backends.cudnn.benchmark is False  # set by the last (plain) contender's steps
    assert r["peaks"]["tf32"]["dtype"] == "tf32" and True in asked
    for row in r["results"]:
        assert row["dtype"] == "tf32" and row["peak_fraction"] == pytest.approx(row["gflops"] / 1000.0)


def test_a_bench_cut_short_keeps_the_blocks_it_finished(tmp_path, monkeypatch):
    """The JSON is written after every (batch, mode): a Ctrl-C (or a time limit) in the
    second batch size leaves the first one's rows."""
    small = bench.matmul_peak
    monkeypatch.setattr(bench, "matmul_peak", lambda *a, **k: small(*a, **{**k, "max_n": 256}))
    steps = bench.step_functions

    def cut(c, model, batch, *rest):
        if batch == 2:
            raise KeyboardInterrupt
        return steps(c, model, batch, *rest)

    monkeypatch.setattr(bench, "step_functions", cut)
    out = tmp_path / "bench.json"
    assert main(["bench", "--batch", "1", "2", "--steps", "1", "--modes", "infer", "--num-classes", "3",
                 "--json", str(out)]) == 130
    doc = json.loads(out.read_text())
    assert [(r["batch"], r["mode"]) for r in doc["results"]] == [(1, "infer")] * 3


def test_running_out_of_memory_is_one_line_and_keeps_the_blocks_measured(tmp_path, monkeypatch, capsys):
    """A batch (or a class count) too large for the machine: the allocator's own error,
    raised where the input is made, becomes one line; the JSON keeps batch 1's rows."""
    small = bench.matmul_peak
    monkeypatch.setattr(bench, "matmul_peak", lambda *a, **k: small(*a, **{**k, "max_n": 256}))
    steps = bench.step_functions

    def too_big(c, model, batch, *rest):
        if batch == 2:
            torch.empty(2**62, dtype=torch.uint8)  # past any address space: refused everywhere
        return steps(c, model, batch, *rest)

    monkeypatch.setattr(bench, "step_functions", too_big)
    out = tmp_path / "bench.json"
    capsys.readouterr()
    assert main(["bench", "--batch", "1", "2", "--steps", "1", "--modes", "infer", "--num-classes", "3",
                 "--json", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"alexnet: error: out of memory on cpu with --batch 1 2 and --num-classes 3: try smaller "
                   f"ones; {out} keeps the batch sizes measured before")
    assert {r["batch"] for r in json.loads(out.read_text())["results"]} == {1}
    assert bench.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not bench.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_markdown_table_has_a_row_per_result_and_names_the_machine(report):
    md = bench.markdown(report)
    assert md.count("\n| paper (ours) |") == 2
    assert report["machine"] in md and "GFLOP/s" in md


def test_the_command_writes_json(tmp_path, capsys, monkeypatch):
    small = bench.matmul_peak  # a small peak here: the peak has its own test
    monkeypatch.setattr(bench, "matmul_peak", lambda *a, **k: small(*a, **{**k, "max_n": 512}))
    out = tmp_path / "bench.json"
    assert main(["bench", "--batch", "1", "--steps", "1", "--modes", "infer", "--num-classes", "3",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert {r["contender"] for r in doc["results"]} == {"paper (ours)", "paper (plain)", "owt (plain)"}
    assert "contender" in capsys.readouterr().out
    assert all(p["n"] <= 512 for p in doc["peaks"].values())


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--modes", "fly"], ["--steps", "x"], ["--device", "gpu"],
                                  ["--dtype", "fp16", "--device", "cpu"], ["--json", "/proc/self/no/bench.json"],
                                  ["--json", "/"],
                                  *([["--device", "cuda"]] if not torch.cuda.is_available() else [])])
def test_bad_arguments_are_one_line_errors(argv, capsys):
    try:
        code = main(["bench", *argv])
    except SystemExit as e:
        code = e.code
    assert code == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and "error" in err and out.out == ""  # before any table
