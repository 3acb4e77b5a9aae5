"""The GPU poller's parsers and the foreign-GPU rule on real nvidia-smi output (H200, driver 580).

The captures (tests/fixtures/nvidia-smi/h200-driver580, from ../shared/fixtures) are what the
service's own combined query script printed on a real GPU machine: idle, busy with a foreign
CUDA process, and just after that process exited (utilisation still reads 13 %).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from mqi_async.domain.gpus import split_gpu_query_output
from mqi_async.domain.jobs import CommandResult
from mqi_async.domain.scheduling import GpuPolicy, free_gpus
from mqi_async.hpc.ssh_host import gpu_sample_from_output

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi" / "h200-driver580"
UUID = "GPU-3b4d6ac0-f10a-8cfc-ea15-250ea44ac899"
NOW = datetime(2026, 12, 4, 17, 44, 50, tzinfo=UTC)
POLICY = GpuPolicy(min_free_memory_mb=1000, max_sample_age_s=30, allocation="per_beam")


def _sample(state: str):  # type: ignore[no-untyped-def]
    text = (FIXTURES / f"{state}.combined.txt").read_text()
    result = CommandResult(exit_status=0, stdout=text, stderr="")
    return gpu_sample_from_output("h200", NOW, result, None)


@pytest.mark.parametrize("state", ["idle", "busy", "after"])
def test_every_capture_parses_without_skipped_rows(state: str) -> None:
    parts = split_gpu_query_output((FIXTURES / f"{state}.combined.txt").read_text())
    assert parts is not None and (parts.inventory_rc, parts.apps_rc) == (0, 0)
    sample = _sample(state)
    assert sample.skipped_rows == ()
    (gpu,) = sample.gpus
    assert (gpu.index, gpu.uuid, gpu.memory_total_mb) == (0, UUID, 143771)
    assert "H200" in gpu.name


def test_the_numbers_match_the_capture_with_units() -> None:
    # the header-and-units query of the same moment says the same thing
    (gpu,) = _sample("busy").gpus
    header_units = (FIXTURES / "busy.inventory.header_units.csv").read_text().splitlines()[1]
    assert "19957 MiB" in header_units and "123200 MiB" in header_units
    assert (gpu.memory_used_mb, gpu.memory_free_mb, gpu.utilization_pct) == (19957, 123200, 100)


def test_idle_gpu_is_free() -> None:
    sample = _sample("idle")
    assert [g.uuid for g in free_gpus(sample, leased=frozenset(), policy=POLICY, age_s=1.0)] == [
        UUID
    ]


def test_a_foreign_cuda_process_makes_the_gpu_busy() -> None:
    sample = _sample("busy")
    (app,) = sample.apps
    assert (app.pid, app.gpu_uuid, app.process_name, app.used_memory_mb) == (
        458,
        UUID,
        "python3",
        19948,
    )
    assert free_gpus(sample, leased=frozenset(), policy=POLICY, age_s=1.0) == []


def test_our_own_finished_process_does_not_block_the_gpu() -> None:
    sample = _sample("busy")
    own = {UUID: frozenset({458})}
    free = free_gpus(sample, leased=frozenset(), policy=POLICY, age_s=1.0, own_pids=own)
    assert [g.uuid for g in free] == [UUID]


def test_utilisation_left_over_after_exit_is_not_a_foreign_process() -> None:
    sample = _sample("after")
    (gpu,) = sample.gpus
    assert gpu.utilization_pct == 13 and sample.apps == ()
    free = free_gpus(sample, leased=frozenset(), policy=POLICY, age_s=1.0)
    assert [g.uuid for g in free] == [UUID]
