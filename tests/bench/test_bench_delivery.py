"""Delivery check speed (issue 18): one delivery of a 30-layer beam, in a child process.

The beam: 30 layers of spots on a 5 mm grid in discs up to 100 mm across (305 spots in the
widest layer, 4,878 in all), each spot's counts spread over 40 beam-on samples (195,120
samples, as a machine sampling every 0.06 ms records for some seconds of beam). The child
reads the records and the plan and runs the whole check (maps, gamma, positions, meterset);
the median wall time of three `check_delivery` calls after a warm-up and the child's peak
RSS are reported, for a faithful delivery and one with a 2 mm layer shift. Goal: under 2 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mqi_async.demo.cases import CaseSpec, DeliveryError, DeliveryErrorKind, write_case
from tests.bench.conftest import Report

pytestmark = pytest.mark.timeout(900)

GOAL_S = 2.0

CHILD = r"""
import json, resource, sys, time
from mqi_async.domain.delivery_log import DEFAULT_CALIBRATION, DEFAULT_MU_PER_COUNT
from mqi_async.qa.delivery import DeliveryOptions, check_delivery
folder, plan, beam = sys.argv[1], sys.argv[2], int(sys.argv[3])
options = DeliveryOptions(calibration=DEFAULT_CALIBRATION["G2"], mu_per_count=DEFAULT_MU_PER_COUNT["G2"])
check_delivery(folder, plan, beam, options, room="G2")  # warm: imports, first calls
runs = []
for _ in range(3):
    started = time.perf_counter()
    result = check_delivery(folder, plan, beam, options, room="G2")
    runs.append(time.perf_counter() - started)
print(json.dumps({
    "seconds": sorted(runs)[1],
    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "layers": len(result.layers),
    "samples": sum(c.samples for c in result.layers),
    "points": result.evaluated_points,
    "status": str(result.status),
    "deviations": [d.code for d in result.deviations],
}))
"""


@pytest.mark.parametrize("error", ["none", "shift"])
def test_delivery_check_of_a_30_layer_beam(tmp_path: Path, report: Report, error: str) -> None:
    errors = (
        (DeliveryError(kind=DeliveryErrorKind.SHIFT, layer=12, value=2.0),)
        if error == "shift"
        else ()
    )
    spec = CaseSpec(
        beams=1,
        layers_per_beam=30,
        room="G2",
        nested=False,
        field_radius_mm=50.0,
        samples_per_spot=40,
        delivery_errors=errors,
    )
    case = write_case(tmp_path, spec)
    assert case.rtplan_path is not None
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(case.delivery_dirs[0]),
            str(case.rtplan_path),
            str(case.beam_numbers[0]),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    report(
        f"delivery_check_30_layers_{error}_seconds",
        figures["seconds"],
        "s",
        f"target < {GOAL_S:g} s",
        samples=figures["samples"],
        points=figures["points"],
        status=figures["status"],
        deviations="+".join(figures["deviations"]) or "none",
    )
    report(f"delivery_check_30_layers_{error}_peak_rss", figures["rss_mb"], "MB", "reference")
    assert figures["layers"] == 30
