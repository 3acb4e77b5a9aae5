"""GPU choice rules: leases, foreign processes, stale samples, our own finished jobs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from mqi_async.domain.gpus import ComputeApp, GpuInfo, GpuSample
from mqi_async.domain.scheduling import (
    GpuPolicy,
    backoff_s,
    choose_gpus,
    decide_retry,
    free_gpus,
    run_progress,
)

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _gpu(i: int, free: int = 20000) -> GpuInfo:
    return GpuInfo(
        index=i, uuid=f"GPU-{i:04d}-aaaa", name="H200", memory_total_mb=24000,
        memory_used_mb=24000 - free, memory_free_mb=free, temperature_c=30, utilization_pct=0,
    )  # fmt: skip


def _sample(apps: tuple[ComputeApp, ...] = (), n: int = 4, free: int = 20000) -> GpuSample:
    return GpuSample(
        host="h",
        taken_at=NOW,
        gpus=tuple(_gpu(i, free) for i in range(n)),
        apps=apps,
    )


def _app(i: int, pid: int, mb: int = 2000) -> ComputeApp:
    return ComputeApp(
        pid=pid, gpu_uuid=f"GPU-{i:04d}-aaaa", process_name="tps_env", used_memory_mb=mb
    )


POLICY = GpuPolicy(min_free_memory_mb=1000, max_sample_age_s=30, allocation="per_beam")
ALL = GpuPolicy(min_free_memory_mb=1000, max_sample_age_s=30, allocation="all_gpus")


def _free(sample: GpuSample, **kw: object) -> list[int]:
    args: dict[str, object] = {
        "leased": frozenset(),
        "policy": POLICY,
        "age_s": 1.0,
    }
    args.update(kw)
    return [g.index for g in free_gpus(sample, **args)]  # type: ignore[arg-type]


def test_leased_and_foreign_and_low_memory_gpus_are_not_free() -> None:
    sample = _sample(apps=(_app(1, 4242),))
    assert _free(sample, leased=frozenset({"GPU-0000-aaaa"})) == [2, 3]
    assert _free(_sample(free=500)) == []


def test_stale_sample_frees_nothing() -> None:
    assert _free(_sample(), age_s=30.0) == [0, 1, 2, 3]
    assert _free(_sample(), age_s=31.0) == []


def test_sample_age_ignores_the_wall_clock_it_was_stamped_with() -> None:
    # a sample stamped a day "in the future" (clock set back since) is as fresh as its age says
    tomorrow = GpuSample(host="h", taken_at=NOW + timedelta(days=1), gpus=(_gpu(0),))
    assert _free(tomorrow, age_s=2.0) == [0]
    assert _free(tomorrow, age_s=60.0) == []


def test_our_finished_job_in_an_older_sample_does_not_block() -> None:
    sample = _sample(apps=(_app(0, 777, mb=23500),), free=500)
    own = {"GPU-0000-aaaa": frozenset({777})}
    released = frozenset({"GPU-0000-aaaa"})
    # its process and memory are ours and gone: GPU 0 is free; the others lack memory
    assert _free(sample, own_pids=own, released_since=released) == [0]
    # a process we never saw under our lease is foreign
    assert _free(_sample(apps=(_app(0, 778),)), own_pids=own, released_since=released) == [1, 2, 3]


def test_all_gpus_mode_waits_for_a_truly_idle_host() -> None:
    own = {"GPU-0000-aaaa": frozenset({777})}
    stale = _sample(apps=(_app(0, 777),))
    assert (
        choose_gpus(
            stale,
            leased=frozenset(),
            policy=ALL,
            age_s=1.0,
            released_since=frozenset({"GPU-0000-aaaa"}),
            own_pids=own,
        )
        is None
    )
    idle = _sample()
    # an idle sample that predates the release proves nothing about the host now
    assert (
        choose_gpus(
            idle,
            leased=frozenset(),
            policy=ALL,
            age_s=0.0,
            released_since=frozenset({"GPU-0000-aaaa"}),
        )
        is None
    )
    # released before this sample was taken: the host is idle
    choice = choose_gpus(idle, leased=frozenset(), policy=ALL, age_s=0.0)
    assert choice is not None and [g.index for g in choice.gpus] == [0, 1, 2, 3]


def test_per_beam_takes_the_lowest_free_index() -> None:
    choice = choose_gpus(_sample(apps=(_app(0, 1),)), leased=frozenset(), policy=POLICY, age_s=1.0)
    assert choice is not None and [g.index for g in choice.gpus] == [1]


def test_retry_policy() -> None:
    d = decide_retry(
        "moqui_exit_134", attempts_used=1, max_attempts=3, now=NOW, initial_s=5, max_s=300
    )
    assert d.retry and d.not_before is not None and NOW < d.not_before <= NOW + timedelta(seconds=5)
    assert not decide_retry(
        "moqui_exit_134", attempts_used=3, max_attempts=3, now=NOW, initial_s=5, max_s=300
    ).retry
    assert not decide_retry(
        "missing_rtplan", attempts_used=0, max_attempts=3, now=NOW, initial_s=5, max_s=300
    ).retry
    assert backoff_s(10, initial_s=5, max_s=60) <= 60


def test_run_progress_is_monotonic() -> None:
    log = (
        "Uploading particles with batch.. : Particle count --> 100 with 4 batches\n"
        "Generating particles for (2 of 4 batches) in CPU ..\n"
    )
    p = run_progress(log, 20)
    assert 20 < p < 90
    assert run_progress("", p) == p
    assert run_progress("Time taken by MC engine: 12 milli-seconds", p) == 90
