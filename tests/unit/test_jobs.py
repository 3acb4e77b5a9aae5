"""The detached-run scripts and their parsers, run with the local /bin/sh."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqi_async.domain.jobs import JobSpec, JobState
from mqi_async.hpc import jobs


def sh(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=30)


def test_quote_path_expands_only_a_leading_tilde() -> None:
    assert sh(f"printf %s {jobs.quote_path('~/a b')}").stdout == str(Path.home() / "a b")
    assert sh(f"printf %s {jobs.quote_path('/x/~/$(y)')}").stdout == "/x/~/$(y)"


def test_timed_command_quotes_every_argument() -> None:
    args = ["printf", "%s|", "$(echo no)", "`echo no`", "a'b", "", "*", "a\nb"]
    out = sh(jobs.timed_command(args, timeout_s=5)).stdout
    assert out == "$(echo no)|`echo no`|a'b||*|a\nb|"


@pytest.mark.parametrize(
    "spec",
    [
        JobSpec(job_dir="/x", argv=()),
        JobSpec(job_dir="/x", argv=("a",), env=(("BAD-NAME", "1"),)),
        JobSpec(job_dir="/x", argv=("a\0b",)),
        JobSpec(job_dir="/x", argv=("a",), files=(("../escape", "x"),)),
    ],
)
def test_launch_rejects_what_it_cannot_carry(spec: JobSpec) -> None:
    with pytest.raises(ValueError):
        jobs.launch_script(spec)


def test_kill_refuses_dangerous_pgids() -> None:
    for pgid in ("0", "1", "-1", "12 3", ""):
        with pytest.raises(ValueError):
            jobs.kill_script("/x", pgid)


def test_launch_poll_cycle(tmp_path: Path) -> None:
    job_dir = str(tmp_path / "a b $(touch CANARY)")
    spec = JobSpec(
        job_dir=job_dir,
        argv=(sys.executable, "-c", "import sys, json; print(json.dumps(sys.argv[1:]))", "*", "'"),
        env=(("CUDA_VISIBLE_DEVICES", "3"),),
        files=(("moqui_tps.in", "A 1\n"),),
    )
    out = sh(jobs.launch_script(spec))
    pgid = jobs.parse_launch_output(out.stdout)
    assert pgid is not None, out.stderr
    deadline = time.monotonic() + 10
    while True:
        status = jobs.parse_poll_output(sh(jobs.poll_script([job_dir])).stdout, [job_dir])[job_dir]
        if status.state is JobState.EXITED or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (status.state, status.exit_code) == (JobState.EXITED, 0)
    assert json.loads(status.log_tail) == ["*", "'"]
    assert jobs.parse_launch_output(sh(jobs.attach_script(job_dir)).stdout) == pgid
    assert not (tmp_path / "CANARY").exists() and not Path("CANARY").exists()


def test_log_tail_is_bounded_and_binary_safe(tmp_path: Path) -> None:
    job_dir = tmp_path / "j"
    job_dir.mkdir()
    (job_dir / "moqui.log").write_bytes(b"\xff\x00MQIJOB 0 1 - 0 - -\n" * 1000 + b"end\n")
    (job_dir / "exit_code").write_text("0\n\n")
    status = jobs.parse_poll_output(
        sh(jobs.poll_script([str(job_dir)], tail_bytes=64)).stdout, [str(job_dir)]
    )[str(job_dir)]
    assert status.exit_code == 0 and status.log_tail.endswith("end\n")
    assert len(status.log_tail.encode("utf-8", "replace")) <= 64 * 3


def test_poll_parser_reads_records_and_signals() -> None:
    tail = base64.b64encode(b"dose done\n").decode()
    dirs = ["/a", "/b", "/c", "/d"]
    out = (
        f"noise\nMQIJOB 0 0 - 0 123 {tail}\nMQIJOB 1 137 KILL 0 124 -\n"
        "MQIJOB 2 - - 1 125 -\nMQIJOB 3 - - 0 - -\nMQIJOB 9 0 - 0 1 -\n"
    )
    got = jobs.parse_poll_output(out, dirs)
    assert got["/a"].log_tail == "dose done\n" and got["/a"].exit_code == 0
    assert (got["/b"].exit_code, got["/b"].signal) == (137, "KILL")
    assert got["/c"].state is JobState.RUNNING
    assert got["/d"].state is JobState.LOST
    assert len(got) == 4


@given(st.text(), st.lists(st.text(min_size=1), max_size=4))
def test_parsers_never_raise(text: str, dirs: list[str]) -> None:
    statuses = jobs.parse_poll_output(text, dirs)
    assert set(statuses) <= set(dirs)
    jobs.parse_launch_output(text)


def test_chunks_respect_the_limit() -> None:
    items = [f"/runs/case {i}/beam" for i in range(1000)]
    parts = jobs.chunks(items, max_chars=2000)
    assert [x for p in parts for x in p] == items
    assert all(sum(len(x) + 3 for x in p) <= 2000 + 40 for p in parts)
