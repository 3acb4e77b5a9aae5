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
    (job_dir / "moqui.log").write_bytes(b"\xff\x00MQIJOB 0 1 - 0 - - -\n" * 1000 + b"end\n")
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
        f"noise\nMQINOW 1000\nMQIJOB 0 0 - 0 123 900 {tail}\nMQIJOB 1 137 KILL 0 124 - -\n"
        "MQIJOB 2 - - 1 125 400 -\nMQIJOB 3 - - 0 - - -\nMQIJOB 9 0 - 0 1 - -\n"
    )
    got = jobs.parse_poll_output(out, dirs)
    assert got["/a"].log_tail == "dose done\n" and got["/a"].exit_code == 0
    assert got["/a"].run_seconds == 100
    assert (got["/b"].exit_code, got["/b"].signal) == (137, "KILL")
    assert got["/b"].run_seconds is None
    assert got["/c"].state is JobState.RUNNING and got["/c"].run_seconds == 600
    assert got["/d"].state is JobState.LOST
    assert len(got) == 4


def _wait_exit(job_dir: str, timeout_s: float = 10) -> jobs.JobStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = jobs.parse_poll_output(sh(jobs.poll_script([job_dir])).stdout, [job_dir])[job_dir]
        if status.state is JobState.EXITED or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def test_a_second_launch_of_one_attempt_runs_the_command_once(tmp_path: Path) -> None:
    """A launch retried after a lost reply re-attaches; the command never starts twice."""
    job_dir = str(tmp_path / "attempt")
    counter = tmp_path / "starts"
    spec = JobSpec(
        job_dir=job_dir,
        argv=("/bin/sh", "-c", f"echo x >> {counter}; sleep 0.5"),
    )
    first = subprocess.Popen(["/bin/sh", "-c", jobs.launch_script(spec)], stdout=subprocess.PIPE)
    second = sh(jobs.launch_script(spec))
    out_first, _ = first.communicate(timeout=30)
    pgids = {jobs.parse_launch_output(out_first.decode()), jobs.parse_launch_output(second.stdout)}
    assert len(pgids) == 1 and None not in pgids
    assert _wait_exit(job_dir).exit_code == 0
    assert counter.read_text().count("x") == 1


def test_a_fenced_attempt_never_starts(tmp_path: Path) -> None:
    job_dir = str(tmp_path / "attempt")
    fenced = sh(jobs.attach_script(job_dir, fence=True))
    assert jobs.parse_fenced(fenced.stdout)
    out = sh(jobs.launch_script(JobSpec(job_dir=job_dir, argv=("touch", str(tmp_path / "ran")))))
    assert out.returncode == 5 and jobs.parse_launch_output(out.stdout) is None
    time.sleep(0.3)
    assert not (tmp_path / "ran").exists()


def test_fence_adopts_a_job_that_did_start(tmp_path: Path) -> None:
    job_dir = str(tmp_path / "attempt")
    pgid = jobs.parse_launch_output(
        sh(jobs.launch_script(JobSpec(job_dir=job_dir, argv=("sleep", "0.2")))).stdout
    )
    out = sh(jobs.attach_script(job_dir, fence=True)).stdout
    assert jobs.parse_launch_output(out) == pgid and not jobs.parse_fenced(out)


def test_the_host_measures_run_time(tmp_path: Path) -> None:
    job_dir = str(tmp_path / "attempt")
    sh(jobs.launch_script(JobSpec(job_dir=job_dir, argv=("sleep", "30"))))
    pgid_file = Path(job_dir) / "pgid"
    lines = pgid_file.read_text().splitlines()
    # pretend the wrapper started 500 s ago on the host's clock
    pgid_file.write_text(f"{lines[0]}\n{lines[1]}\n{int(lines[2]) - 500}\n")
    status = jobs.parse_poll_output(sh(jobs.poll_script([job_dir])).stdout, [job_dir])[job_dir]
    assert status.state is JobState.RUNNING
    assert status.run_seconds is not None and 499 <= status.run_seconds <= 510
    sh(jobs.kill_script(job_dir, lines[0], grace_s=2))


def test_kill_leaves_an_exited_jobs_group_alone(tmp_path: Path) -> None:
    """A job that already wrote its exit file is not signalled (its pgid may be reused)."""
    job_dir = tmp_path / "attempt"
    job_dir.mkdir()
    bystander = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        (job_dir / "pgid").write_text(f"{bystander.pid}\n{boot}\n")
        (job_dir / "exit_code").write_text("0\n\n")
        out = sh(jobs.kill_script(str(job_dir), str(bystander.pid), grace_s=1))
        assert "MQIEXITED" in out.stdout
        time.sleep(0.2)
        assert bystander.poll() is None
        assert (job_dir / "exit_code").read_text() == "0\n\n"
    finally:
        bystander.kill()
        bystander.wait()


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
