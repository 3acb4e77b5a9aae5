"""The whole pipeline against the real OpenSSH sshd, with the MOQUI and nvidia-smi simulators."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mqi_async.domain.model import BeamStatus, RunStatus
from tests.e2e import make_rig, running_service, statuses, wait_all_running, wait_until
from tests.sshd import SshdServer

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

DCIODVFY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "dciodvfy"


def _all(service_statuses: dict[str, str], n: int, status: str = "completed") -> bool:
    return len(service_statuses) == n and all(s == status for s in service_statuses.values())


async def test_three_cases_four_beams_two_gpus(tmp_path: Path, sshd: SshdServer) -> None:
    rig = make_rig(tmp_path / "rig", sshd, gpus=2, run_seconds=0.3)
    for i in range(3):
        rig.drop_case(f"P{i:03d}", beams=4)
    async with running_service(rig.settings()) as svc:
        await wait_until(lambda: statuses(svc), timeout_s=5, what="first case")
        await wait_until(lambda: _check(svc, 3), timeout_s=180, what="3 completed cases")
        snapshot = await svc.store.snapshot()
        assert await svc.store.list_leases() == []
    one_dcm = None
    for case in snapshot:
        assert len(case.beams) == 4
        for beam in case.beams:
            assert beam.status == BeamStatus.COMPLETED and beam.attempts == 1
            assert len(beam.outputs) == 1
            dcm = Path(beam.outputs[0])
            ds = pydicom.dcmread(dcm)
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.2"
            raw_files = list(
                (tmp_path / "rig" / "work").glob(
                    f"*/runs/beam_{beam.beam_id.rsplit('_', 1)[-1]}/attempt_1/dose/*.raw"
                )
            )
            raw_path = next(p for p in raw_files if p.parts[-6] == case.case_id)
            raw = np.fromfile(raw_path, "<f8").reshape(10, 16, 20)
            dose = ds.pixel_array * float(ds.DoseGridScaling)
            assert dose.shape == raw.shape
            assert np.max(np.abs(dose - raw)) <= raw.max() / 65535 * 1.01 + 1e-12
            one_dcm = dcm
    assert one_dcm is not None
    out = await asyncio.to_thread(
        subprocess.run, [str(DCIODVFY), str(one_dcm)], capture_output=True, text=True
    )
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


async def _check(svc: object, n: int) -> bool:
    return _all(await statuses(svc), n)  # type: ignore[arg-type]


async def test_moqui_crash_is_retried_then_completes(tmp_path: Path, sshd: SshdServer) -> None:
    rig = make_rig(tmp_path / "rig", sshd, gpus=2, run_seconds=0.2)
    rig.fail_beams("abort")
    rig.drop_case("CRASH", beams=1)
    async with running_service(rig.settings()) as svc:

        async def failed_once() -> bool:
            runs = await svc.store.list_runs("CRASH_beam_1")
            return any(r.status == RunStatus.FAILED for r in runs)

        await wait_until(failed_once, timeout_s=90, what="a failed attempt")
        rig.fail_beams(None)
        await wait_until(lambda: _check(svc, 1), timeout_s=90, what="completion")
        runs = await svc.store.list_runs("CRASH_beam_1")
        beam = await svc.store.get_beam("CRASH_beam_1")
    assert beam is not None and beam.attempts == len(runs) >= 2
    assert runs[0].error is not None and runs[0].error.startswith("moqui_exit_134")
    assert runs[-1].status == RunStatus.SUCCEEDED


async def test_hang_is_killed_at_run_timeout(tmp_path: Path, sshd: SshdServer) -> None:
    rig = make_rig(
        tmp_path / "rig", sshd, gpus=1, run_seconds=0.2,
        overrides={"runs": {"timeout_seconds": 2}, "retry": {"max_attempts": 2}},
    )  # fmt: skip
    rig.fail_beams("hang")
    rig.drop_case("HANG", beams=1)
    async with running_service(rig.settings()) as svc:
        await wait_until(lambda: _check_failed(svc), timeout_s=120, what="the beam to fail")
        beam = await svc.store.get_beam("HANG_beam_1")
        runs = await svc.store.list_runs("HANG_beam_1")
        assert await svc.store.list_leases() == []
    assert beam is not None and beam.error is not None and beam.error.startswith("run_timeout")
    assert [r.status for r in runs] == [RunStatus.KILLED, RunStatus.KILLED]
    # the hung simulators were really killed: nothing is left on the simulated GPU
    assert not any((rig.state_dir / "procs").glob("*.json"))


async def _check_failed(svc: object) -> bool:
    return _all(await statuses(svc), 1, "failed")  # type: ignore[arg-type]


async def test_short_output_is_a_named_failure(tmp_path: Path, sshd: SshdServer) -> None:
    rig = make_rig(
        tmp_path / "rig", sshd, gpus=1, run_seconds=0.1, overrides={"retry": {"max_attempts": 1}}
    )
    rig.fail_beams("short")
    rig.drop_case("SHORT", beams=1)
    async with running_service(rig.settings()) as svc:
        await wait_until(lambda: _check_failed(svc), timeout_s=90, what="the case to fail")
        snap = await svc.store.snapshot()
    assert snap[0].error is not None and snap[0].error.startswith("short_output")
    assert snap[0].beams[0].error is not None and snap[0].beams[0].error.startswith("short_output")


async def test_foreign_process_on_every_gpu_makes_beams_wait(
    tmp_path: Path, sshd: SshdServer
) -> None:
    rig = make_rig(tmp_path / "rig", sshd, gpus=2, run_seconds=0.2)
    foreign = [rig.add_foreign_process(0), rig.add_foreign_process(1)]
    rig.drop_case("WAIT", beams=2)
    async with running_service(rig.settings()) as svc:

        async def queued() -> bool:
            beams = await svc.store.list_beams("WAIT")
            return len(beams) == 2 and all(b.status == BeamStatus.QUEUED for b in beams)

        await wait_until(queued, timeout_s=60, what="beams queued")
        # several GPU polls later they still wait, and nothing was launched
        for _ in range(3):
            await svc.engine.pollers["gpu1"].poll_now_and_wait()
        assert all(
            b.status == BeamStatus.QUEUED and b.attempts == 0
            for b in await svc.store.list_beams("WAIT")
        )
        gpus = await svc.store.list_gpus()
        assert gpus and all(g.has_foreign_process for g in gpus)
        for f in foreign:
            f.unlink()
        await wait_until(
            lambda: _check(svc, 1), timeout_s=90, what="completion after the GPUs were freed"
        )


async def test_host_down_pauses_then_resumes(tmp_path: Path, sshd: SshdServer) -> None:
    rig = make_rig(tmp_path / "rig", sshd, gpus=2, run_seconds=4)
    rig.drop_case("DOWN", beams=2)
    async with running_service(rig.settings()) as svc:
        await wait_all_running(svc, "DOWN", 2)
        sshd.stop()
        try:

            async def paused() -> bool:
                beams = await svc.store.list_beams("DOWN")
                return all(b.status == BeamStatus.PAUSED for b in beams)

            await wait_until(paused, timeout_s=60, what="beams paused")
            beams = await svc.store.list_beams("DOWN")
            assert all(b.error and b.error.startswith("host_unreachable") for b in beams)
        finally:
            sshd.start()
        await wait_until(
            lambda: _check(svc, 1), timeout_s=120, what="completion after the host came back"
        )
        beams = await svc.store.list_beams("DOWN")
    # the detached runs went on while the host was unreachable: no second launch
    assert [b.attempts for b in beams] == [1, 1]


async def test_all_gpus_mode_runs_one_beam_at_a_time(tmp_path: Path, sshd: SshdServer) -> None:
    rig = make_rig(
        tmp_path / "rig",
        sshd,
        gpus=3,
        run_seconds=0.5,
        overrides={"gpu": {"allocation": "all_gpus"}},
    )
    rig.drop_case("ALL", beams=3)
    async with running_service(rig.settings()) as svc:
        seen_running: list[int] = []

        async def done() -> bool:
            beams = await svc.store.list_beams("ALL")
            seen_running.append(
                sum(1 for b in beams if b.status in (BeamStatus.LAUNCHING, BeamStatus.RUNNING))
            )
            return _all(await statuses(svc), 1)

        await wait_until(done, timeout_s=120, interval_s=0.05, what="completion")
        beams = await svc.store.list_beams("ALL")
        runs = [r for b in beams for r in await svc.store.list_runs(b.beam_id)]
    assert max(seen_running) == 1
    assert all(len(r.gpu_uuids) == 3 for r in runs)
    # serial: each run started after the previous one ended
    ordered = sorted(runs, key=lambda r: r.started_at)
    for before, after in zip(ordered, ordered[1:], strict=False):
        assert before.ended_at is not None and after.started_at >= before.ended_at
