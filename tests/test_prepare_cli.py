"""`alexnet prepare`: the summary line on success, one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from alexnet.cli import main

REPO = Path(__file__).resolve().parents[1]


def make_src(root: Path) -> None:
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((20, 30, 3), 40 * i + 80 * (c == "b"), np.uint8)).save(root / c / f"{i}.png")
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")


def one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("alexnet: error: "), err
    assert match in err and "Traceback" not in err


def test_prepare_prints_summary(tmp_path, capsys):
    make_src(tmp_path / "src")
    assert main(["prepare", str(tmp_path / "src"), str(tmp_path / "out"), "--size", "32",
                 "--workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == (f"prepared {tmp_path / 'out'}: 4 images written, 1 skipped "
                           f"(report: {tmp_path / 'out' / 'skipped.tsv'})")
    assert "prepare 100.0% 5/5 | skipped 1 |" in err and "elapsed" in err  # the final progress line
    assert (tmp_path / "out" / "skipped.tsv").read_text().startswith("b/broken.jpg\t")
    assert (tmp_path / "out" / "images.u8").stat().st_size == 4 * 3 * 32 * 32


def test_prepare_user_errors(tmp_path, capsys):
    one_line_error(capsys, ["prepare", str(tmp_path / "missing"), str(tmp_path / "o")], "not found")
    (tmp_path / "empty").mkdir()
    one_line_error(capsys, ["prepare", str(tmp_path / "empty"), str(tmp_path / "o")], "no images")
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.png")
    one_line_error(capsys, ["prepare", str(tmp_path / "flat"), str(tmp_path / "o")], "no classes")
    (tmp_path / "c" / "a").mkdir(parents=True)
    one_line_error(capsys, ["prepare", str(tmp_path / "c"), str(tmp_path / "o")], "no images in the 1 class folders")
    one_line_error(capsys, ["prepare", str(tmp_path / "flat"), str(tmp_path / "o"), "--labels",
                            str(tmp_path / "nope.txt")], "ground-truth file not found")
    one_line_error(capsys, ["prepare", str(tmp_path / "c"), str(tmp_path / "o"), "--size", "100000"],
                   "size must be from 1 to 2048, not 100000")  # it was a 224 GiB allocation's traceback
    assert not (tmp_path / "o").exists()


def test_prepare_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "a", "b", "--workers", "0"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_prepare_missing_source_subprocess(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "alexnet", "prepare", str(tmp_path / "missing"),
                        str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr == f"alexnet: error: data source not found: {tmp_path / 'missing'}\n"
    assert r.stdout == ""
