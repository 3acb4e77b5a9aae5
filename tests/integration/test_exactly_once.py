"""Exactly once, judged on facts: each MOQUI run starts once and a finished run is never thrown away.

Through the real sshd; the MOQUI simulator appends one line per start to `<state>/starts.log`,
so the number of launches is counted on the host, not taken from our own records.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from mqi_async.domain.errors import TransientError
from mqi_async.domain.model import BeamStatus, RunStatus
from mqi_async.hpc.ssh import SshPool
from tests.e2e import Rig, make_rig, running_service, statuses, wait_all_running, wait_until
from tests.sshd import SshdServer

pytestmark = [pytest.mark.sshd, pytest.mark.slow]


def starts(rig: Rig) -> list[str]:
    path = rig.state_dir / "starts.log"
    return path.read_text().splitlines() if path.exists() else []


async def _all_completed(svc: Any, case_id: str) -> bool:
    return (await statuses(svc)).get(case_id) == "completed"


async def test_runs_that_finish_during_an_outage_past_their_deadline_are_kept(
    tmp_path: Path, sshd: SshdServer
) -> None:
    # two 5 s runs, a 7 s timeout, and the host unreachable for 9 s while they end
    rig = make_rig(
        tmp_path / "rig", sshd, gpus=2, run_seconds=5, overrides={"runs": {"timeout_seconds": 7}}
    )
    rig.drop_case("OUTAGE", beams=2)
    async with running_service(rig.settings()) as svc:
        await wait_all_running(svc, "OUTAGE", 2)
        sshd.stop()
        try:
            await asyncio.sleep(9)
        finally:
            sshd.start()
        await wait_until(lambda: _all_completed(svc, "OUTAGE"), timeout_s=120, what="completion")
        beams = await svc.store.list_beams("OUTAGE")
        runs = [r for b in beams for r in await svc.store.list_runs(b.beam_id)]
    assert [b.attempts for b in beams] == [1, 1]
    assert [r.status for r in runs] == [RunStatus.SUCCEEDED, RunStatus.SUCCEEDED]
    assert len(starts(rig)) == 2


async def test_a_run_that_really_overruns_is_killed_as_timed_out(
    tmp_path: Path, sshd: SshdServer
) -> None:
    rig = make_rig(
        tmp_path / "rig",
        sshd,
        gpus=1,
        run_seconds=0.2,
        overrides={"runs": {"timeout_seconds": 2}, "retry": {"max_attempts": 1}},
    )
    rig.fail_beams("hang")
    rig.drop_case("SLOW", beams=1)
    async with running_service(rig.settings()) as svc:

        async def failed() -> bool:
            return (await statuses(svc)).get("SLOW") == "failed"

        await wait_until(failed, timeout_s=60, what="the case to fail")
        runs = await svc.store.list_runs("SLOW_beam_1")
        assert await svc.store.list_leases() == []
    assert [r.status for r in runs] == [RunStatus.KILLED]
    assert runs[0].error and runs[0].error.startswith("run_timeout")
    await wait_until(
        lambda: not any((rig.state_dir / "procs").glob("*.json")), timeout_s=20, what="job gone"
    )


async def test_a_launch_whose_reply_is_lost_is_adopted_not_run_twice(
    tmp_path: Path, sshd: SshdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launch script ran on the host, but its answer never came back (the transport)."""
    real_run = SshPool.run
    lost: list[str] = []

    async def run_losing_launch_replies(self: SshPool, command: str, **kw: Any) -> Any:
        result = await real_run(self, command, **kw)
        if "MQIPGID" in command and "setsid" in command and len(lost) < 2:
            lost.append(command)
            raise TransientError("remote_timeout", "injected: the launch reply was lost")
        return result

    monkeypatch.setattr(SshPool, "run", run_losing_launch_replies)
    rig = make_rig(tmp_path / "rig", sshd, gpus=2, run_seconds=1)
    rig.drop_case("LOST", beams=2)
    async with running_service(rig.settings()) as svc:
        await wait_until(lambda: _all_completed(svc, "LOST"), timeout_s=90, what="completion")
        beams = await svc.store.list_beams("LOST")
        runs = [r for b in beams for r in await svc.store.list_runs(b.beam_id)]
    assert len(lost) == 2
    assert [b.attempts for b in beams] == [1, 1]
    assert [r.status for r in runs] == [RunStatus.SUCCEEDED, RunStatus.SUCCEEDED]
    # counted on the host: one MOQUI start per beam
    assert len(starts(rig)) == 2


async def _cancel(rig: Rig) -> None:
    import subprocess
    import sys

    res = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mqi_async", "cancel", "CXL", "-c", str(rig.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


def _moqui_alive(rig: Rig) -> int:
    return len(list((rig.state_dir / "procs").glob("*.json")))


async def test_cancel_while_the_host_is_down_kills_once_it_is_back(
    tmp_path: Path, sshd: SshdServer
) -> None:
    rig = make_rig(tmp_path / "rig", sshd, gpus=2, run_seconds=0.3)
    rig.fail_beams("hang")
    rig.drop_case("CXL", beams=2)
    async with running_service(rig.settings()) as svc:
        await wait_all_running(svc, "CXL", 2)
        sshd.stop()
        try:
            await _cancel(rig)

            async def cancelled() -> bool:
                return (await statuses(svc)).get("CXL") == "cancelled"

            await wait_until(cancelled, timeout_s=30, what="the case cancelled")
            beams = await svc.store.list_beams("CXL")
            assert all(b.error and "kill_pending" in b.error for b in beams)
            # the runs still go on: their GPUs stay leased, nothing is marked killed yet
            assert len(await svc.store.list_leases()) == 2
            assert {r.status for r in await svc.store.list_open_runs()} == {RunStatus.RUNNING}
            assert _moqui_alive(rig) == 2
        finally:
            sshd.start()
        await wait_until(lambda: _moqui_alive(rig) == 0, timeout_s=60, what="jobs killed")

        async def reaped() -> bool:
            return not await svc.store.list_open_runs() and not await svc.store.list_leases()

        await wait_until(reaped, timeout_s=30, what="runs closed and leases released")
        runs = [r for b in beams for r in await svc.store.list_runs(b.beam_id)]
    assert {r.status for r in runs} == {RunStatus.KILLED}


async def test_cancel_during_launch_kills_what_the_launch_started(
    tmp_path: Path, sshd: SshdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_run = SshPool.run
    slow: list[str] = []

    async def run_with_slow_launch_replies(self: SshPool, command: str, **kw: Any) -> Any:
        result = await real_run(self, command, **kw)
        if "MQIPGID" in command and "setsid" in command:
            slow.append(command)
            await asyncio.sleep(60)  # the job runs; its launch reply is very late
        return result

    monkeypatch.setattr(SshPool, "run", run_with_slow_launch_replies)
    rig = make_rig(tmp_path / "rig", sshd, gpus=1, run_seconds=0.3)
    rig.fail_beams("hang")
    rig.drop_case("CXL", beams=1)
    async with running_service(rig.settings()) as svc:
        await wait_until(lambda: slow and _moqui_alive(rig) == 1, timeout_s=60, what="launch")
        beam = await svc.store.get_beam("CXL_beam_1")
        assert beam is not None and beam.status == BeamStatus.LAUNCHING
        await _cancel(rig)
        await wait_until(lambda: _moqui_alive(rig) == 0, timeout_s=60, what="the job killed")

        async def closed() -> bool:
            return (await statuses(svc)).get("CXL") == "cancelled" and not (
                await svc.store.list_leases()
            )

        await wait_until(closed, timeout_s=30, what="cancelled, leases released")
        runs = await svc.store.list_runs("CXL_beam_1")
    assert [r.status for r in runs] == [RunStatus.KILLED]
    assert len(starts(rig)) == 1
