"""`mqi-async gamma`: the JSON line, the human line, and exit 2 with each named code."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from mqi_async.cli import main
from mqi_async.qa.gamma import gamma
from mqi_async.qa.rtdose import read_rt_dose
from tests.unit.test_qa_rtdose import GRID, grid_centres, sample_dose, write_dose

KEYS = [
    "pass_rate_percent",
    "evaluated_points",
    "gamma_mean",
    "gamma_max",
    "dose_percent",
    "distance_mm",
    "cutoff_percent",
    "normalisation",
    "seconds",
]


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    z, y, x = grid_centres(GRID)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    shifted = 2.0 * np.exp(-0.5 * ((xx - 4) ** 2 / 40 + (yy + 2) ** 2 / 60 + zz**2 / 20))
    return (
        write_dose(tmp_path / "ref.dcm", sample_dose()),
        write_dose(tmp_path / "eval.dcm", shifted * 1.02),
    )


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["gamma", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_line(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, str(pair[0]), str(pair[1]), "--dose-percent", "2", "--distance-mm", "2", "--json"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert list(doc) == KEYS
    assert doc["dose_percent"] == 2.0 and doc["distance_mm"] == 2.0
    assert doc["cutoff_percent"] == 10.0 and doc["normalisation"] == "global"
    ref, ev = read_rt_dose(pair[0]), read_rt_dose(pair[1])
    direct = gamma(ref.axes, ref.dose, ev.axes, ev.dose, dose_percent=2, distance_mm=2, max_gamma=2)
    assert doc["evaluated_points"] == direct.evaluated_points > 0
    assert doc["pass_rate_percent"] == round(direct.pass_rate_percent, 2)
    assert 0 < doc["gamma_mean"] <= doc["gamma_max"] <= 2.0


def test_local_and_options(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        str(pair[0]),
        str(pair[1]),
        "--local",
        "--cutoff-percent",
        "30",
        "--max-gamma",
        "1.2",
        "--json",
    )
    doc = json.loads(out)
    assert code == 0
    assert doc["normalisation"] == "local" and doc["cutoff_percent"] == 30.0
    assert doc["gamma_max"] <= 1.2


def test_human_line(pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, str(pair[0]), str(pair[1]))
    assert code == 0
    assert out.startswith("gamma 3 %/3 mm global, cutoff 10 %: pass rate ")
    assert "points (gamma mean" in out


def assert_named(capsys: pytest.CaptureFixture[str], argv: list[str], code_name: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith(f"mqi-async: {code_name}: "), err
    assert len(err.strip()) > len(code_name) + 20  # a sentence, not just the code
    return err


def test_unreadable(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_text("hello")
    err = assert_named(capsys, [str(junk), str(pair[1])], "dose_unreadable")
    assert str(junk) in err
    assert_named(capsys, [str(pair[0]), str(tmp_path / "nope.dcm")], "dose_unreadable")


def test_frame_of_reference_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_dose(tmp_path / "a.dcm", sample_dose())
    b = write_dose(tmp_path / "b.dcm", sample_dose(), frame_of_reference="1.2.3.4.5")
    err = assert_named(capsys, [str(a), str(b)], "frame_of_reference_mismatch")
    assert "1.2.3.4.5" in err


def test_grids_do_not_overlap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_dose(tmp_path / "a.dcm", sample_dose())
    far = replace(GRID, x0=GRID.x0 + 500.0)
    b = write_dose(tmp_path / "b.dcm", sample_dose(far), far)
    err = assert_named(capsys, [str(a), str(b)], "grids_do_not_overlap")
    assert "reference z [" in err
    # overlapping boxes, but the dose above the cutoff lies outside the evaluated grid
    edge = replace(GRID, x0=GRID.x0 + 22.0)
    c = write_dose(tmp_path / "c.dcm", sample_dose(edge), edge)
    assert_named(
        capsys,
        [str(a), str(c), "--cutoff-percent", "80", "--max-gamma", "1"],
        "grids_do_not_overlap",
    )


def test_unsupported_orientation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_dose(tmp_path / "a.dcm", sample_dose())
    b = write_dose(tmp_path / "b.dcm", sample_dose(), ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    err = assert_named(capsys, [str(a), str(b)], "unsupported_orientation")
    assert "ImageOrientationPatient" in err


def test_zero_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_dose(tmp_path / "a.dcm", np.zeros((GRID.nz, GRID.ny, GRID.nx)))
    b = write_dose(tmp_path / "b.dcm", sample_dose())
    assert_named(capsys, [str(a), str(b)], "reference_dose_zero")


@pytest.mark.parametrize(
    "option",
    [
        ["--dose-percent", "0"],
        ["--distance-mm", "-1"],
        ["--max-gamma", "nan"],
        ["--cutoff-percent", "-2"],
    ],
)
def test_bad_options_exit_2(pair: tuple[Path, Path], option: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["gamma", str(pair[0]), str(pair[1]), *option])
    assert info.value.code == 2


def test_console_entry_point(pair: tuple[Path, Path]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mqi_async", "gamma", str(pair[0]), str(pair[1]), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert list(json.loads(done.stdout)) == KEYS
