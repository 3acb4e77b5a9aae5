"""The plan's fluence CSVs (for the planned MOQUI run) against the log CSVs of a faithful delivery.

The bundled interpreter turns the delivery records into log CSVs (dose monitor counts x range
factor, at the calibrated positions); the service writes the plan's CSVs from the RTPLAN
(MU / MU per count, at the planned positions). For a delivery that follows the plan, the two
must carry the same counts at the same places, layer by layer, in the same file tree.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from mqi_async.demo.cases import CaseSpec, write_case
from mqi_async.domain.delivery_log import DEFAULT_CALIBRATION, DEFAULT_MU_PER_COUNT
from mqi_async.qa.plan_fluence import write_plan_fluence
from tests.e2e import BIN


def _rows(path: Path) -> list[tuple[float, float, float, int]]:
    tokens = [t for t in re.split(r"[,\r\n]+", path.read_text()) if t]
    return [
        (float(tokens[i]), float(tokens[i + 1]), float(tokens[i + 2]), int(tokens[i + 3]))
        for i in range(0, len(tokens), 4)
    ]


def _by_place(rows: list[tuple[float, float, float, int]]) -> dict[tuple[float, float], int]:
    """Counts summed per position (a spot's counts may span several samples)."""
    out: dict[tuple[float, float], int] = defaultdict(int)
    for _, x, y, count in rows:
        out[(round(x, 1), round(y, 1))] += count
    return dict(out)


@pytest.mark.parametrize("room", ["G1", "G2"])
def test_plan_and_log_csvs_of_a_faithful_delivery_agree(tmp_path: Path, room: str) -> None:
    case = write_case(
        tmp_path / "in", CaseSpec(case_id="PF1", beams=2, layers_per_beam=5, room=room, seed=4)
    )
    assert case.rtplan_path is not None
    out = tmp_path / "csv"
    subprocess.run(
        [sys.executable, str(BIN / "mqi_interpreter"), "--logdir", str(case.case_path),
         "--outputdir", str(out)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    names = {2: "1G090", 3: "2G180"}
    plan_dir = tmp_path / "plan_csv"
    written = write_plan_fluence(
        case.rtplan_path,
        plan_dir,
        list(names.items()),
        mu_per_count=DEFAULT_MU_PER_COUNT[room],
        time_gain_ms=DEFAULT_CALIBRATION[room].time_gain_ms,
    )
    assert [w.layers for w in written] == [5, 5]
    log_tree = sorted(str(p.relative_to(out / "log")) for p in (out / "log").rglob("*.csv"))
    plan_tree = sorted(str(p.relative_to(plan_dir)) for p in plan_dir.rglob("*.csv"))
    assert plan_tree == log_tree  # the same field folders and layer files (names, energies)
    for relative in log_tree:
        log_rows = _rows(out / "log" / relative)
        plan_rows = _rows(plan_dir / relative)
        assert "\n" not in (plan_dir / relative).read_text()  # the single-line form
        log_counts, plan_counts = _by_place(log_rows), _by_place(plan_rows)
        assert log_counts.keys() == plan_counts.keys(), relative
        for place, count in plan_counts.items():
            # each record sample's counts were rounded to whole monitor units
            assert log_counts[place] == pytest.approx(count, rel=1e-4, abs=30), (relative, place)
        assert sum(log_counts.values()) == pytest.approx(sum(plan_counts.values()), rel=1e-5)
