"""A local tool left running by a SIGKILLed service is stopped before its work is done again."""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import BIN, make_rig, spawn_service, wait_status
from tests.sshd import SshdServer

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

# The first run keeps writing into its csv folder for 30 s before interpreting (an orphan in
# the making); later runs interpret at once. Each start leaves `started-<pid>` in MARKS.
_SLOW_FIRST = """\
#!{python}
import os, subprocess, sys, time
case_dir, csv_dir, marks = sys.argv[1], sys.argv[2], sys.argv[3]
pid = os.getpid()
open(os.path.join(marks, f"started-{{pid}}"), "w").close()
first = os.path.join(marks, "first")
if not os.path.exists(first):
    open(first, "w").close()
    for _ in range(300):
        if os.path.isdir(csv_dir):
            open(os.path.join(csv_dir, f"orphan-{{pid}}.txt"), "a").write("x")
        time.sleep(0.1)
sys.exit(subprocess.call([sys.executable, {interpreter!r}, "--logdir", case_dir, "--outputdir", csv_dir]))
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    return state != "Z"


def test_sigkill_during_interpretation_stops_the_orphan(tmp_path: Path, sshd: SshdServer) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    tool = tmp_path / "slow_interpreter"
    tool.write_text(
        _SLOW_FIRST.format(python=sys.executable, interpreter=str(BIN / "mqi_interpreter"))
    )
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    rig = make_rig(
        tmp_path / "rig", sshd, run_seconds=0.2,
        overrides={"tools": {"interpreter": [str(tool), "{case_dir}", "{csv_dir}", str(marks)]}},
    )  # fmt: skip
    rig.drop_case("ORPHAN", beams=1)
    proc = spawn_service(rig)
    try:
        deadline = time.monotonic() + 60
        while not list(marks.glob("started-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    (first,) = [int(p.name.split("-")[1]) for p in marks.glob("started-*")]
    assert _alive(first), "the interpreter should outlive the SIGKILLed service"
    proc = spawn_service(rig, "service2.out")
    try:
        doc = wait_status(
            rig, lambda d: d["cases"] and d["cases"][0]["status"] == "completed", timeout_s=120
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert not _alive(first)
    assert doc["cases"][0]["case_id"] == "ORPHAN"
    # nothing the orphan wrote survives in the folder the second run filled
    assert not list((rig.root / "work").rglob(f"orphan-{first}.txt"))
