"""The command line: the summary table and its errors."""

import json
import os
import subprocess
import sys

import pytest

from alexnet.cli import main


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def conv_macs(side, cout, cin_per_group, k):
    return side * side * cout * cin_per_group * k * k


def test_summary_table_totals(capsys):
    code, out, _ = run(capsys, "summary")
    assert code == 0
    assert "input 227x227, conv1 padding 0" in out
    assert "60,965,224" in out
    macs = (conv_macs(55, 96, 3, 11) + conv_macs(27, 256, 48, 5) + conv_macs(13, 384, 256, 3)
            + conv_macs(13, 384, 192, 3) + conv_macs(13, 256, 192, 3) + 9216 * 4096 + 4096 * 4096 + 4096 * 1000)
    assert f"{macs:,}" in out


@pytest.mark.parametrize("variant, size, params", [("paper", 224, 60_965_224), ("paper-ungrouped", 227, 62_378_344),
                                                   ("owt", 224, 61_100_840)])
def test_summary_json(capsys, variant, size, params):
    code, out, _ = run(capsys, "summary", "--variant", variant, "--input", str(size), "--json")
    assert code == 0
    t = json.loads(out)
    assert t["total_params"] == params == sum(r["params"] for r in t["layers"])
    assert t["input"] == [3, size, size]
    shapes = {r["name"]: r["output"][-1] for r in t["layers"] if r["name"].startswith(("conv", "pool"))}
    assert shapes == {"conv1": 55, "pool1": 27, "conv2": 27, "pool2": 13, "conv3": 13, "conv4": 13,
                      "conv5": 13, "pool5": 6}


def test_summary_num_classes(capsys):
    code, out, _ = run(capsys, "summary", "--num-classes", "10", "--json")
    t = json.loads(out)
    assert t["layers"][-1]["output"] == [10]
    assert t["total_params"] == 60_965_224 - 4_097_000 + 4096 * 10 + 10


def test_summary_fc_width(capsys):
    code, out, _ = run(capsys, "summary", "--fc-width", "512", "--num-classes", "10", "--json")
    t = json.loads(out)
    rows = {r["name"]: r for r in t["layers"]}
    assert rows["fc6"]["spec"] == "9216->512" and rows["fc7"]["spec"] == "512->512" and rows["fc8"]["spec"] == "512->10"
    fc_paper = 9216 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 10 + 10
    fc_narrow = 9216 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert t["total_params"] == 60_965_224 - 4_097_000 + 4096 * 10 + 10 - fc_paper + fc_narrow
    assert rows["fc7"]["macs"] == 512 * 512


def test_summary_costs_no_weights(capsys):
    """The table comes from a network on the meta device: a classifier far larger than
    memory (4096 x 10^11 weights) is counted, not allocated (it was a MemoryError
    traceback), and the counts of every variant are those of the real network."""
    import torch

    from alexnet.config import VARIANTS
    from alexnet.model import build_model
    from alexnet.summary import layer_table, summary_table

    code, out, _ = run(capsys, "summary", "--num-classes", str(10 ** 11), "--json")
    t = json.loads(out)
    assert code == 0 and t["layers"][-1]["output"] == [10 ** 11]
    assert t["total_params"] == 60_965_224 - 4_097_000 + 4097 * 10 ** 11
    for variant in VARIANTS:  # (fc layers 256 wide: the same counting, a sixteenth of the weights drawn)
        real = build_model(variant, num_classes=10, fc_width=256)
        assert summary_table(variant, num_classes=10, fc_width=256) == layer_table(real)
        assert next(real.parameters()).device == torch.device("cpu")


@pytest.mark.parametrize("argv, message", [
    (["summary", "--variant", "vgg"], "invalid choice: 'vgg'"),
    (["summary", "--input", "225"], "input size must be 224 or 227, not 225"),
    (["summary", "--input", "big"], "not an integer"),
    (["summary", "--num-classes", "0"], "must be >= 1"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_are_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--help"], ["summary", "--help"]])
def test_help(capsys, argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "usage: alexnet" in out


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "alexnet", "summary", "--variant", "owt"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "61,100,840" in r.stdout


def test_a_reader_that_leaves_early_stops_the_command_quietly():
    """`alexnet summary | true`: stdout's reader is gone before the table is written."""
    p = subprocess.Popen([sys.executable, "-m", "alexnet", "summary"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == "", err  # 128 + SIGPIPE, as a shell reports it


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_under_stdout_is_one_line():
    """`alexnet summary > out` on a full disk: one line and exit 2, not a traceback (from
    the print, or an "Exception ignored" from the exit's flush)."""
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "-m", "alexnet", "summary"], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    assert (r.returncode, r.stderr) == (2, "alexnet: error: cannot write standard output: No space left on device\n")


@pytest.mark.parametrize("entry", ["python -m", "console script"])
def test_a_ctrl_c_while_torch_is_imported_is_one_line(entry):
    """The first second or two of every command is torch's import: a Ctrl-C then (here
    delivered at the moment torch's import begins) ends as one later would, exit 130."""
    start = ("import runpy; runpy.run_module('alexnet', run_name='__main__')" if entry == "python -m" else
             "import sys; from importlib.metadata import entry_points; "
             "sys.exit(entry_points(group='console_scripts')['alexnet'].load()())")
    code = ("import builtins, os, signal, sys\n"
            "real = builtins.__import__\n"
            "def imp(name, *a, **k):\n"
            "    if name == 'torch' and 'torch' not in sys.modules:\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = imp\n"
            "sys.argv = ['alexnet', 'summary']\n" + start + "\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr, r.stdout) == (130, "alexnet: interrupted\n", "")


@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "train.lrr=1"], "unknown key train.lrr"),
    (["train", "--set", "train.lr=fast"], "train.lr must be a number"),
    (["train", "--set", "lr"], "--set expects KEY=VALUE"),
    (["train", "--batch-size", "0"], "must be >= 1"),
    (["train", "--data", "/nonexistent/images"], "not found"),
    (["train", "--config", "/nonexistent.toml"], "no config file"),
    (["train", "--config", "/"], "/ is a folder, not a config file"),  # was "no config file at /"
    (["convert", "torchvision", "/", "o.safetensors"], "/ is a folder, not a .pth file"),
    (["convert", "caffe", "/", "o.safetensors"], "/ is a folder, not a caffemodel"),
    (["train", "--resume", "/nonexistent/run"], "not a run folder"),
    (["train", "--resume", "runs/x", "--lr", "0.1"], "drop --lr"),
    # a value of 0 is given too (0 == False let it through, silently ignored)
    (["train", "--resume", "runs/x", "--seed", "0"], "drop --seed"),
    (["train", "--resume", "runs/x", "--workers", "0"], "drop --workers"),
    (["evaluate", "/nonexistent.safetensors"], "no checkpoint file"),
    (["evaluate", "m.safetensors", "--workers", "-7"], "must be >= 0 (or -1"),
    (["train", "--seed", "-1"], "train.seed must be an integer from 0 to 2**63 - 1"),
    (["train", "--set", "train.seed=99999999999999999999"], "train.seed must be an integer from 0"),
    (["serve", "m.safetensors", "--port", "99999"], "a TCP port is 0 to 65535"),
    (["serve", "m.safetensors", "--port", "-1"], "a TCP port is 0 to 65535"),
])
def test_train_and_evaluate_argument_errors(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
    assert err.startswith("alexnet: error: "), err


def test_an_error_line_is_one_write(monkeypatch):
    """Under torchrun every process writes its error line to the one stderr: written in two
    parts (print's text, then its newline), two processes' lines ran into one."""
    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, text):
            self.writes.append(text)
            return len(text)

        def flush(self):
            pass

    err = Recorder()
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["train", "--set", "train.lr=-1"]) == 2
    assert err.writes == ["alexnet: error: train.lr must be positive, not -1.0\n"]


@pytest.mark.parametrize("argv, line", [
    (["train", "--epochs", "-1"], "alexnet: error: train: argument --epochs: must be >= 1, not -1"),
    (["show", "filters"], "alexnet: error: show filters: the following arguments are required: checkpoint"),
    (["bogus"], "alexnet: error: argument COMMAND: invalid choice: 'bogus'"),
    # an empty path (an unset shell variable) meant the current folder, or no --json at all
    (["train", "--out", ""], "alexnet: error: train: argument --out: must not be empty"),
    (["evaluate", "m.safetensors", "--data", " "], "alexnet: error: evaluate: argument --data: must not be empty"),
    (["bench", "--json", ""], "alexnet: error: bench: argument --json: must not be empty"),
    (["show", "filters", "m.safetensors", "--out", ""],
     "alexnet: error: show filters: argument --out: must not be empty"),
    # positional paths too; "-" as an output would be a file or folder named "-"
    (["prepare", "src", ""], "alexnet: error: prepare: argument OUT: must not be empty"),
    (["prepare", "", "out"], "alexnet: error: prepare: argument SRC: must not be empty"),
    (["convert", "caffe", "x.caffemodel", "o.safetensors", "--mean", ""],  # (it was ". is a folder")
     "alexnet: error: convert caffe: argument --mean: must not be empty"),
    (["predict", "", "x.png"], "alexnet: error: predict: argument checkpoint: must not be empty"),
    (["prepare", "src", "-"], "alexnet: error: prepare: argument OUT: '-' would be a file named '-'"),
    (["evaluate", "m.safetensors", "--out", "-"], "alexnet: error: evaluate: argument --out: '-' would be"),
    (["export", "m.safetensors", "-"], "alexnet: error: export: argument OUT: '-' would be"),
    (["convert", "caffe", "x.caffemodel", "-"], "alexnet: error: convert caffe: argument OUT: '-' would be"),
    (["train", "--set", "data.path="], "alexnet: error: data.path must not be empty"),
    # options no command takes: named by the command (they were said from the top, without it)
    (["summary", "--bogus"], "alexnet: error: summary: unrecognized arguments: --bogus"),
    (["show", "filters", "m.safetensors", "--bogus", "x"],
     "alexnet: error: show filters: unrecognized arguments: --bogus x"),
])
def test_usage_errors_have_the_prefix_of_every_other_error(capsys, argv, line):
    """argparse's own errors start as the commands' do, the (sub)command after it."""
    code, out, err = run(capsys, *argv)
    assert code == 2 and err.startswith(line) and err.count("\n") == 1, err


def test_train_config_file_and_overrides(tmp_path):
    from alexnet.cli import _train_config, build_parser

    f = tmp_path / "c.toml"
    f.write_text('recipe = "fast"\n[train]\nlr = 0.3\nepochs = 4\n[data]\nlighting_std = 0.0\n')
    args = build_parser().parse_args(["train", "--config", str(f), "--epochs", "5", "--set", "train.seed=7",
                                      "--data", "x"])
    cfg = _train_config(args)
    assert cfg.recipe == "fast" and cfg.model.variant == "bn"  # from the recipe
    assert cfg.train.lr == 0.3 and cfg.data.lighting_std == 0.0  # from the file
    assert cfg.train.epochs == 5 and cfg.train.seed == 7  # flags and --set win
    # --set recipe=NAME is the recipe, as --recipe NAME is (it was silently dropped)
    cfg = _train_config(build_parser().parse_args(["train", "--data", "x", "--set", "recipe=fast"]))
    assert cfg.recipe == "fast" and cfg.model.variant == "bn"
    f.write_text('[train]\nlearning_rate = 0.3\n')
    with pytest.raises(Exception, match="unknown key train.learning_rate"):
        _train_config(build_parser().parse_args(["train", "--config", str(f)]))


def test_a_config_section_that_is_not_one_is_refused_even_when_a_flag_sets_a_key_in_it(tmp_path):
    """`{"train": 5}` with --epochs 3: the flag's section replaced the bad value unseen."""
    from alexnet.cli import _train_config, build_parser
    from alexnet.config import ConfigError

    f = tmp_path / "c.json"
    f.write_text('{"train": 5}')
    for argv in (["--config", str(f), "--epochs", "3"], ["--set", "train=5", "--set", "train.lr=0.1"],
                 ["--config", str(f)]):
        with pytest.raises(ConfigError, match="^train must be a mapping, not int$"):
            _train_config(build_parser().parse_args(["train", *argv]))


def test_default_recipe_depends_on_the_data(tmp_path):
    from alexnet.cli import _train_config, build_parser

    assert _train_config(build_parser().parse_args(["train"])).recipe == "demo"
    cfg = _train_config(build_parser().parse_args(["train", "--data", "x"]))
    assert cfg.recipe == "paper" and cfg.train.lr == 0.01 and cfg.model.variant == "paper"
    # the data's path from a config file or --set is data of one's own too (it got the
    # demo's 220 steps of the bn network, whatever the epochs asked)
    f = tmp_path / "c.json"
    f.write_text('{"data": {"path": "x"}, "train": {"epochs": 90}}')
    for argv in (["--config", str(f)], ["--set", "data.path=x"]):
        cfg = _train_config(build_parser().parse_args(["train", *argv]))
        assert (cfg.recipe, cfg.model.variant, cfg.train.max_steps) == ("paper", "paper", 0), argv
    # the demo's 220-step limit, lifted by --max-steps 0 as by train.max_steps=0 (it was refused: must be >= 1)
    assert _train_config(build_parser().parse_args(["train", "--epochs", "2"])).train.max_steps == 220
    cfg = _train_config(build_parser().parse_args(["train", "--epochs", "2", "--max-steps", "0"]))
    assert (cfg.train.epochs, cfg.train.max_steps) == (2, 0)


def test_a_stop_during_the_test_evaluation_says_how_to_finish_it(capsys, tmp_path, monkeypatch):
    """SIGTERM (a pre-empted job) after training, while the test set is evaluated: it used
    to end the process at once, without a word and with code -15."""
    import os
    import signal
    import time

    import alexnet.train
    from tests.test_train import write_idx

    def finish_run(trainer, test=True):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises in here
        raise AssertionError("SIGTERM did not stop the test evaluation")

    monkeypatch.setattr(alexnet.train, "finish_run", finish_run)
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = run(capsys, "train", "--data", str(write_idx(tmp_path / "idx")), "--out", str(tmp_path / "r"),
                         "--recipe", "demo", "--set", "model.fc_width=64", "--set", "data.val_holdout=4",
                         "--max-steps", "2", "--batch-size", "4", "--device", "cpu")
    assert code == 0, err
    assert out.splitlines()[-1] == (f"alexnet: SIGTERM: the test evaluation stopped; training is complete (best "
                                    f"weights: {tmp_path / 'r' / 'best.safetensors'}); finish it with: alexnet "
                                    f"train --resume {tmp_path / 'r'}")
    assert signal.getsignal(signal.SIGTERM) is before


def test_toml_config_without_tomllib_is_one_clear_line(tmp_path, capsys, monkeypatch):
    # Python 3.10 has no tomllib: a TOML config is refused with the reason, JSON still works
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` now fails as on 3.10
    f = tmp_path / "c.toml"
    f.write_text("[train]\nlr = 0.3\n")
    code, out, err = run(capsys, "train", "--config", str(f), "--data", str(tmp_path))
    assert code == 2 and err == "alexnet: error: TOML configs need Python 3.11 or newer (tomllib); " \
                                "write the config as JSON\n", err
    from alexnet.cli import _load_config_file

    g = tmp_path / "c.json"
    g.write_text('{"train": {"lr": 0.3}}')
    assert _load_config_file(str(g)) == {"train": {"lr": 0.3}}


def test_the_main_jobs_script_takes_paths_from_where_it_is_run(tmp_path):
    """scripts/run.sh is `alexnet train`: relative paths in its arguments are the caller's
    (it used to run from the repository, where `--data mine` was not found, and a relative
    --out put the run inside the checkout)."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "run.sh"
    p = subprocess.run(["bash", str(script), "--data", "nothing-here", "--out", "r"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and p.stderr.splitlines()[-1] == \
        f"alexnet: error: data source not found: {tmp_path / 'nothing-here'}", p.stderr
