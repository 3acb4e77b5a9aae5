"""`mqi-async demo`: a newcomer's first run, through every stage on the simulated host."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_exits_zero_when_every_case_completed(tmp_path: Path) -> None:
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "mqi_async", "demo", "--no-ui", "--exit-when-done", "--cases", "3", "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    took_s = time.monotonic() - started
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert any("demo finished" in line["message"] for line in lines)
    cfg = tmp_path / "demo" / "c.yaml"
    cfg.write_text("database: mqi.db\n")
    status = subprocess.run(
        [sys.executable, "-m", "mqi_async", "status", "--json", "-c", str(cfg)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    cases = json.loads(status.stdout)["cases"]
    assert len(cases) == 3 and all(c["status"] == "completed" for c in cases)
    assert all(Path(o).is_file() for c in cases for b in c["beams"] for o in b["outputs"])
    print(f"\ndemo with 3 cases took {took_s:.1f} s")
