"""Runs, GPU samples and GPU leases in the store, on a real SQLite file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mqi_async.domain.errors import IllegalTransitionError
from mqi_async.domain.gpus import ComputeApp, GpuInfo, GpuSample
from mqi_async.domain.model import BeamStatus, RunStatus
from mqi_async.store import NewBeam, NewCase, Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "mqi.db") as opened:
        for case_id in ("c1", "c2"):
            await opened.register_case(
                NewCase(case_id=case_id, case_path=f"/data/{case_id}", safe_name=case_id),
                [NewBeam(beam_index=k, beam_number=k) for k in (1, 2, 3)],
            )
        yield opened


def _job_dir(attempt: int) -> str:
    return f"/remote/c1/c1_beam_1/{attempt}"


async def test_run_lifecycle_counts_attempts(store: Store) -> None:
    run = await store.start_run("c1_beam_1", host="gpu1", gpu_uuids=["GPU-a"], job_dir_for=_job_dir)
    assert (run.attempt, run.status, run.job_dir, run.job_id) == (
        1,
        RunStatus.LAUNCHING,
        "/remote/c1/c1_beam_1/1",
        None,
    )
    beam = await store.get_beam("c1_beam_1")
    assert beam is not None
    assert (beam.attempts, beam.host, beam.gpu_uuids) == (1, "gpu1", ("GPU-a",))
    assert [r.run_id for r in await store.list_open_runs()] == [run.run_id]

    running = await store.set_run_job(run.run_id, "4242")
    assert (running.status, running.job_id) == (RunStatus.RUNNING, "4242")
    with pytest.raises(IllegalTransitionError):
        await store.start_run("c1_beam_1", host="gpu1", gpu_uuids=["GPU-a"], job_dir_for=_job_dir)

    failed = await store.finish_run(
        run.run_id, RunStatus.FAILED, exit_code=134, error="moqui_exit_134: see moqui.log"
    )
    assert (failed.status, failed.exit_code) == (RunStatus.FAILED, 134)
    assert failed.ended_at is not None
    assert await store.list_open_runs() == []

    second = await store.start_run(
        "c1_beam_1", host="gpu2", gpu_uuids=["GPU-b", "GPU-c"], job_dir_for=_job_dir
    )
    assert (second.attempt, second.job_dir) == (2, "/remote/c1/c1_beam_1/2")
    assert [r.attempt for r in await store.list_runs("c1_beam_1")] == [1, 2]
    beam = await store.get_beam("c1_beam_1")
    assert beam is not None and (beam.attempts, beam.host) == (2, "gpu2")
    kinds = [e.kind for e in await store.recent_events(beam_id="c1_beam_1")]
    assert kinds == ["run_started", "run_finished", "run_started"]


async def test_finishing_a_run_is_idempotent_but_never_rewritten(store: Store) -> None:
    run = await store.start_run("c1_beam_1", host="gpu1", gpu_uuids=[], job_dir_for=_job_dir)
    with pytest.raises(ValueError):
        await store.finish_run(run.run_id, RunStatus.RUNNING)
    done = await store.finish_run(run.run_id, RunStatus.SUCCEEDED, exit_code=0)
    assert await store.finish_run(run.run_id, RunStatus.SUCCEEDED, exit_code=0) == done
    with pytest.raises(IllegalTransitionError):
        await store.finish_run(run.run_id, RunStatus.LOST)
    with pytest.raises(IllegalTransitionError):
        await store.set_run_job(run.run_id, "1")
    with pytest.raises(LookupError):
        await store.start_run("nope", host="gpu1", gpu_uuids=[], job_dir_for=_job_dir)


async def test_leases_are_all_or_nothing(store: Store) -> None:
    assert await store.lease_gpus("c1_beam_1", "gpu1", ["GPU-0", "GPU-1"])
    # GPU-1 is taken, so GPU-2 is not leased either
    assert not await store.lease_gpus("c1_beam_2", "gpu1", ["GPU-1", "GPU-2"])
    assert [(lease.uuid, lease.beam_id) for lease in await store.list_leases()] == [
        ("GPU-0", "c1_beam_1"),
        ("GPU-1", "c1_beam_1"),
    ]
    # the same uuid on another host is another GPU
    assert await store.lease_gpus("c1_beam_2", "gpu2", ["GPU-1"])
    assert await store.lease_gpus("c1_beam_2", "gpu1", ["GPU-2"])
    # asking again for what a beam holds succeeds and changes nothing
    assert await store.lease_gpus("c1_beam_1", "gpu1", ["GPU-0"])
    leases = await store.list_leases(beam_id="c1_beam_1")
    assert [(lease.host, lease.uuid, lease.attempt) for lease in leases] == [
        ("gpu1", "GPU-0", 1),
        ("gpu1", "GPU-1", 1),
    ]
    with pytest.raises(ValueError):
        await store.lease_gpus("c1_beam_3", "gpu1", [])
    with pytest.raises(ValueError):
        await store.lease_gpus("c1_beam_3", "gpu1", ["GPU-5", "GPU-5"])
    with pytest.raises(LookupError):
        await store.lease_gpus("nope", "gpu1", ["GPU-5"])

    assert await store.release_leases("c1_beam_1") == 2
    assert await store.lease_gpus("c1_beam_3", "gpu1", ["GPU-0", "GPU-1"])


async def test_racing_beams_never_share_a_gpu(store: Store) -> None:
    beams = [f"c{c}_beam_{k}" for c in (1, 2) for k in (1, 2, 3)]
    won = await asyncio.gather(*(store.lease_gpus(b, "gpu1", ["GPU-0"]) for b in beams))
    assert won.count(True) == 1
    assert len(await store.list_leases()) == 1


async def test_sweep_releases_only_leases_of_ended_beams(store: Store) -> None:
    await store.lease_gpus("c1_beam_1", "gpu1", ["GPU-0", "GPU-1"])
    await store.lease_gpus("c1_beam_2", "gpu1", ["GPU-2"])
    await store.lease_gpus("c2_beam_1", "gpu1", ["GPU-3"])
    await store.transition_beam("c1_beam_1", BeamStatus.FAILED, changes={"error": "x"})
    await store.transition_beam("c2_beam_1", BeamStatus.UPLOADING)
    await store.transition_beam("c2_beam_1", BeamStatus.PAUSED)

    swept = await store.sweep_leases()

    assert [(lease.uuid, lease.beam_id) for lease in swept] == [
        ("GPU-0", "c1_beam_1"),
        ("GPU-1", "c1_beam_1"),
    ]
    assert [lease.uuid for lease in await store.list_leases()] == ["GPU-2", "GPU-3"]
    events = await store.recent_events(beam_id="c1_beam_1", limit=2)
    assert {e.kind for e in events} == {"lease_swept"}
    assert await store.sweep_leases() == []


def _gpu(index: int) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index}",
        name="A100",
        memory_total_mb=40000,
        memory_used_mb=100,
        memory_free_mb=39900,
        temperature_c=40,
        utilization_pct=0,
    )


async def test_a_gpu_sample_replaces_that_hosts_rows(store: Store) -> None:
    taken_at = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
    await store.lease_gpus("c1_beam_1", "gpu1", ["GPU-1"])
    apps = tuple(
        ComputeApp(pid=pid, gpu_uuid=uuid, process_name="tps_env", used_memory_mb=900)
        for pid, uuid in ((10, "GPU-1"), (11, "GPU-2"))
    )
    await store.record_gpu_sample(
        GpuSample(host="gpu1", taken_at=taken_at, gpus=(_gpu(0), _gpu(1), _gpu(2)), apps=apps)
    )
    await store.record_gpu_sample(GpuSample(host="gpu2", taken_at=taken_at, gpus=(_gpu(0),)))

    rows = await store.list_gpus("gpu1")
    assert [(g.index, g.has_foreign_process) for g in rows] == [(0, False), (1, False), (2, True)]
    assert rows[0].sampled_at == taken_at and rows[0].memory_free_mb == 39900

    later = datetime(2026, 3, 1, 8, 1, tzinfo=UTC)
    await store.record_gpu_sample(GpuSample(host="gpu1", taken_at=later, gpus=(_gpu(1),)))
    assert [(g.host, g.uuid, g.sampled_at) for g in await store.list_gpus()] == [
        ("gpu1", "GPU-1", later),
        ("gpu2", "GPU-0", taken_at),
    ]
    # a vanished GPU's sample goes, its lease stays until released
    assert [lease.uuid for lease in await store.list_leases()] == ["GPU-1"]
