"""What the dose checks cost (issue 17), on the demo's grid (100 mm water, 1 mm voxels).

The same 4 cases of 2 beams (1 s MOQUI stand-in runs, 4 simulated GPUs) go through the service
three times in one run: without dose checks (`qa.reference: none`), with planned runs
(`planned_mc`), and as 4 copies of one plan (`planned_mc`, so the planned run is made once and
reused). Reported: wall time from the first case to the last verdict, the wall time the check
adds per beam (the planned run's orchestration plus the gamma), the gamma's own seconds per
beam, and the GPU time (the sum of MOQUI run times) planned runs take with and without reuse.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mqi_async.config import Settings
from mqi_async.demo.cases import CaseSpec, write_case
from mqi_async.demo.runner import DemoOptions, demo_settings
from mqi_async.domain.model import CaseStatus
from mqi_async.domain.records import CaseKind
from mqi_async.domain.verdict import QaStatus
from mqi_async.service import open_service, run_until_stopped
from tests.bench.conftest import Report

pytestmark = pytest.mark.timeout(1200)

CASES = 4
BEAMS = 2


def _settings(root: Path, reference: str) -> Settings:
    options = DemoOptions(
        workdir=root, cases=CASES, beams=BEAMS, gpus=4, headless=True, exit_when_done=True,
        run_seconds=1.0,
    )  # fmt: skip
    base = demo_settings(root, options)
    # reports off: the figures are the checks' own cost
    qa = base.qa.model_copy(update={"reference": reference, "report": False})
    return base.model_copy(update={"qa": qa})


def _spec(i: int) -> CaseSpec:
    return CaseSpec(
        case_id=f"BENCH{i:02d}", beams=BEAMS, layers_per_beam=4, room="G2", nested=False, seed=i
    )


async def _run(settings: Settings, place: Callable[[Path], None]) -> dict[str, float]:
    async with open_service(settings) as service:
        task = asyncio.create_task(run_until_stopped(service, None))
        await asyncio.wait_for(service.engine.ready.wait(), 30)
        started = time.monotonic()
        await asyncio.to_thread(place, settings.scan_directory)
        while True:
            await asyncio.sleep(0.2)
            cases = await service.store.snapshot()
            if len(cases) >= CASES and all(
                c.status is CaseStatus.COMPLETED and c.qa.status is not QaStatus.PENDING
                for c in cases
            ):
                break
        wall = time.monotonic() - started
        gpu = {"treatment": 0.0, "planned": 0.0}
        for case in await service.store.list_cases():
            for beam in await service.store.list_beams(case.case_id):
                for run in await service.store.list_runs(beam.beam_id):
                    if run.ended_at is not None:
                        seconds = (run.ended_at - run.started_at).total_seconds()
                        gpu[str(case.kind)] += seconds
        gamma = [
            float(b.qa.result["seconds"])  # type: ignore[index, arg-type]
            for c in cases
            for b in c.beams
            if b.qa is not None and b.qa.result and "seconds" in b.qa.result
        ]
        service.request_stop()
        await asyncio.wait_for(task, 60)
    return {
        "wall_s": wall,
        "gpu_treatment_s": gpu[str(CaseKind.TREATMENT)],
        "gpu_planned_s": gpu[str(CaseKind.PLANNED)],
        "gamma_s": statistics.median(gamma) if gamma else float("nan"),
    }


def _cases(scan: Path) -> None:
    for i in range(1, CASES + 1):
        write_case(scan, _spec(i))


def _copies(scan: Path) -> None:
    first = write_case(scan.parent / "template", _spec(1))
    for i in range(1, CASES + 1):
        target = scan / f"COPY{i:02d}"
        shutil.copytree(first.case_dir, target.with_name(target.name + ".extracting"))
        target.with_name(target.name + ".extracting").rename(target)


SCENARIOS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "off": ("none", _cases),
    "on": ("planned_mc", _cases),
    "reused": ("planned_mc", _copies),
}


def measure(root: Path, scenario: str) -> dict[str, float]:
    """One scenario with its own service (one per process: a service owns signal handlers)."""
    reference, place = SCENARIOS[scenario]
    return asyncio.run(_run(_settings(root / scenario, reference), place))


def _child(root: Path, scenario: str) -> dict[str, float]:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys; from pathlib import Path;"
            " from tests.bench.test_bench_dose_checks import measure;"
            " print(json.dumps(measure(Path(sys.argv[1]), sys.argv[2])))",
            str(root),
            scenario,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def test_what_the_dose_checks_cost(tmp_path: Path, report: Report) -> None:
    figures = {name: _child(tmp_path, name) for name in SCENARIOS}
    off, on, reused = figures["off"], figures["on"], figures["reused"]
    beams = CASES * BEAMS
    report("dose_check_wall_without_checks", off["wall_s"], "s", f"{CASES} cases x {BEAMS} beams")
    report("dose_check_wall_with_planned_runs", on["wall_s"], "s", "same cases, planned_mc")
    report(
        "dose_check_added_wall_per_beam",
        (on["wall_s"] - off["wall_s"]) / beams,
        "s",
        "planned run + gamma, 4 GPUs, 1 s runs",
    )
    report("dose_check_gamma_per_beam", on["gamma_s"], "s", "median, 100^3 mm grid at 1 mm")
    report("dose_check_gpu_delivered_runs", on["gpu_treatment_s"], "s", f"{beams} beams")
    report("dose_check_gpu_planned_runs", on["gpu_planned_s"], "s", f"{CASES} plans, no reuse")
    report(
        "dose_check_gpu_planned_runs_reused",
        reused["gpu_planned_s"],
        "s",
        f"{CASES} cases of one plan",
        ratio=round(reused["gpu_planned_s"] / on["gpu_planned_s"], 3),
    )
    assert reused["gpu_planned_s"] < 0.5 * on["gpu_planned_s"]
