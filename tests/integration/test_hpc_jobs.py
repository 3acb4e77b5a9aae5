"""Detached MOQUI runs over real SSH: survive disconnects, re-attach, kill groups, detect loss."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mqi_async.domain.jobs import JobHandle, JobSpec, JobState, JobStatus
from mqi_async.hpc.ssh import ConnectLimiter, SshPool
from mqi_async.hpc.ssh_host import SshHost
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group; sshd runs on this machine."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if fields[0] != "Z" and fields[2] == str(pgid):
            members.append(int(entry.name))
    return members


@pytest.fixture
def remote_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mqi-jobs-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_host(sshd: SshdServer, remote_root: Path, **kwargs: object) -> SshHost:
    pool = SshPool(sshd.endpoint(), limiter=ConnectLimiter(min_interval_s=0))
    return SshHost(pool, remote_root=str(remote_root), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def host(sshd: SshdServer, remote_root: Path) -> AsyncIterator[SshHost]:
    h = make_host(sshd, remote_root, kill_grace_s=1.0)
    await h.start()
    yield h
    await h.aclose()


async def wait_for(
    host: SshHost, handle: JobHandle, states: set[JobState], timeout_s: float = 15
) -> JobStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = (await host.poll_jobs([handle]))[handle.job_dir]
        if status.state in states or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


async def test_job_outlives_the_connection_and_is_reattached(
    sshd: SshdServer, remote_root: Path
) -> None:
    job_dir = f"{remote_root}/case 1/beam_1/attempt 1"
    spec = JobSpec(
        job_dir=job_dir,
        argv=("sh", "-c", "echo started; sleep 1.5; echo 'Total execution time: 1.5'; exit 5"),
        files=(("moqui_tps.in", "GPUID 0\nBeamNumbers 1\n"),),
    )
    first = make_host(sshd, remote_root)
    await first.start()
    handle = await first.spawn_job(spec)
    status = (await first.poll_jobs([handle]))[job_dir]
    assert status.state is JobState.RUNNING
    await first.aclose()  # the service goes away; the run must not

    await asyncio.sleep(2.0)
    second = make_host(sshd, remote_root)
    await second.start()
    try:
        attached = await second.attach_job(job_dir)
        assert attached == handle
        # launching the same attempt again re-attaches instead of starting a second run
        assert await second.spawn_job(spec) == handle
        done = await wait_for(second, handle, {JobState.EXITED})
        assert (done.state, done.exit_code, done.signal) == (JobState.EXITED, 5, None)
        assert "Total execution time" in done.log_tail
        assert done.log_tail.count("started") == 1
        assert (Path(job_dir) / "moqui_tps.in").read_text() == "GPUID 0\nBeamNumbers 1\n"
    finally:
        await second.aclose()


async def test_kill_stops_the_whole_process_group(host: SshHost, remote_root: Path) -> None:
    # one child ignores TERM, so the KILL stage is needed too
    script = "trap '' TERM; sleep 300 & sleep 300 & (trap - TERM; sleep 300) & wait"
    handle = await host.spawn_job(JobSpec(job_dir=f"{remote_root}/k", argv=("sh", "-c", script)))
    pgid = int(handle.job_id)
    deadline = time.monotonic() + 5
    while len(group_members(pgid)) < 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(group_members(pgid)) >= 5  # wrapper, sh and three sleeps
    started = time.monotonic()
    await host.kill_job(handle)
    assert time.monotonic() - started < 8
    assert group_members(pgid) == []
    status = (await host.poll_jobs([handle]))[handle.job_dir]
    assert status.state is JobState.EXITED and status.exit_code == 137
    assert status.signal == "KILL"


async def test_kill_records_term_when_the_job_obeys(host: SshHost, remote_root: Path) -> None:
    handle = await host.spawn_job(JobSpec(job_dir=f"{remote_root}/t", argv=("sleep", "300")))
    await host.kill_job(handle)
    status = await wait_for(host, handle, {JobState.EXITED})
    assert (status.exit_code, status.signal) == (143, "TERM")
    assert group_members(int(handle.job_id)) == []


async def test_vanished_job_is_lost(host: SshHost, remote_root: Path) -> None:
    handle = await host.spawn_job(JobSpec(job_dir=f"{remote_root}/l", argv=("sleep", "300")))
    os.killpg(int(handle.job_id), signal.SIGKILL)  # as if the host rebooted under it
    status = await wait_for(host, handle, {JobState.LOST})
    assert status.state is JobState.LOST and status.exit_code is None


async def test_argv_env_and_paths_pass_literally(host: SshHost, remote_root: Path) -> None:
    job_dir = f"{remote_root}/a b'c\"d $(touch CANARY) `touch CANARY`;e&f\nnl"
    args = ("$(touch CANARY)", "`touch CANARY`", "it's", 'say "hi"', "a;b|c&d", "", "*", "~")
    script = (
        "import json, os, sys; "
        "json.dump([sys.argv[1:], os.environ.get('CUDA_VISIBLE_DEVICES'), "
        "os.environ.get('MQI_NOTE'), os.getcwd()], open('seen.json', 'w'))"
    )
    handle = await host.spawn_job(
        JobSpec(
            job_dir=job_dir,
            argv=(sys.executable, "-c", script, *args),
            env=(("CUDA_VISIBLE_DEVICES", "1"), ("MQI_NOTE", "$(touch CANARY) 'x'")),
            files=(("moqui_tps.in", "ParentDir $(touch CANARY)\n"),),
        )
    )
    status = await wait_for(host, handle, {JobState.EXITED})
    assert status.exit_code == 0, status.log_tail
    argv, cuda, note, cwd = json.loads((Path(job_dir) / "seen.json").read_text())
    assert argv == list(args)
    assert (cuda, note, cwd) == ("1", "$(touch CANARY) 'x'", job_dir)
    for where in (Path.home(), remote_root, Path(job_dir), Path.cwd()):
        assert not (where / "CANARY").exists()


async def test_one_poll_reads_many_jobs(host: SshHost, remote_root: Path) -> None:
    specs = [
        JobSpec(job_dir=f"{remote_root}/many/{i}", argv=("sh", "-c", f"echo job {i}; exit {i}"))
        for i in range(12)
    ]
    handles = [await host.spawn_job(s) for s in specs]
    missing = JobHandle(job_dir=f"{remote_root}/never started", job_id="99999")
    deadline = time.monotonic() + 10
    while True:
        statuses = await host.poll_jobs([*handles, missing])
        if all(statuses[h.job_dir].state is JobState.EXITED for h in handles):
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert [statuses[h.job_dir].exit_code for h in handles] == list(range(12))
    assert statuses[handles[3].job_dir].log_tail == "job 3\n"
    assert statuses[missing.job_dir].state is JobState.LOST


async def test_a_command_that_cannot_start_exits_127(host: SshHost, remote_root: Path) -> None:
    handle = await host.spawn_job(
        JobSpec(job_dir=f"{remote_root}/x", argv=("/nonexistent/tps_env", "moqui_tps.in"))
    )
    status = await wait_for(host, handle, {JobState.EXITED})
    assert status.exit_code == 127
