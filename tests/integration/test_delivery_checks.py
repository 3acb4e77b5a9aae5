"""Every delivery of every fraction checked, end to end through the real sshd.

A 3-fraction case is simulated once (its reference fraction) and all of its deliveries are
checked; one delivery carries an injected missing layer and fails, the others pass. A 4th
fraction's folders copied in after completion are checked within one rescan, while the
service runs and across a restart, and MOQUI is never launched again (counted on the host).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mqi_async.demo.cases import CaseSpec, DeliveryError, DeliveryErrorKind, write_case
from tests.e2e import Rig, make_rig, running_service, status_json, wait_until
from tests.sshd import SshdServer

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

CASE = "FRAC3"
BEAMS = 2


def starts(rig: Rig) -> list[str]:
    path = rig.state_dir / "starts.log"
    return path.read_text().splitlines() if path.exists() else []


def _spec(fractions: int) -> CaseSpec:
    return CaseSpec(
        case_id=CASE,
        beams=BEAMS,
        layers_per_beam=3,
        fractions=fractions,
        room="G2",
        first_delivery_at=(datetime.now() - timedelta(days=4)).replace(
            hour=9, minute=0, second=0, microsecond=0
        ),
        delivery_errors=(
            DeliveryError(kind=DeliveryErrorKind.MISSING_LAYER, layer=2, fraction=3, beam=2),
        ),
        seed=5,
    )


def _case(rig: Rig) -> dict[str, Any]:
    found = [c for c in status_json(rig)["cases"] if c["case_id"] == CASE]
    return found[0] if found else {"deliveries": []}


def _checked(rig: Rig, count: int) -> bool:
    """The case completed and `count` deliveries have their verdicts."""
    case = _case(rig)
    found = case["deliveries"]
    done = case.get("status") == "completed"
    return done and len(found) == count and all(d["qa_status"] != "pending" for d in found)


def _copy_fraction(rig: Rig, tmp_path: Path, fraction: int) -> list[str]:
    """The delivery folders of one more fraction, made by the same generator, moved in whole."""
    later = write_case(tmp_path / f"gen{fraction}", _spec(fraction))
    case_dir = next(rig.scan.rglob(f"{CASE}/*/RP*.dcm")).parent
    have = {p.name for p in case_dir.iterdir()}
    moved = []
    for folder in later.delivery_dirs:
        if folder.name not in have:
            staging = case_dir.parent / f"{folder.name}.extracting"
            shutil.copytree(folder, staging)
            os.rename(staging, case_dir / folder.name)
            moved.append(folder.name)
    return moved


async def test_every_delivery_is_checked_and_a_later_fraction_too(
    tmp_path: Path, sshd: SshdServer
) -> None:
    rig = make_rig(tmp_path / "rig", sshd, gpus=2, run_seconds=0.3)
    write_case(rig.scan, _spec(3))
    async with running_service(rig.settings()) as svc:
        await wait_until(lambda: _checked(rig, 3 * BEAMS), timeout_s=120, what="6 checks")
        trail = await svc.store.recent_events(500, case_id=CASE)
        verdicts = [e.message for e in trail if e.kind == "delivery_check"]
        assert len(verdicts) == 3 * BEAMS
        assert sum(": failed" in m for m in verdicts) == 1
        case = _case(rig)
        assert case["status"] == "completed"
        launched = len(starts(rig))
        assert launched == BEAMS  # the reference fraction only
        by_fraction = sorted(
            (d["fraction"], d["beam_number"], d["qa_status"]) for d in case["deliveries"]
        )
        assert [f for f, _, _ in by_fraction] == [1, 1, 2, 2, 3, 3]
        failed = [d for d in case["deliveries"] if d["qa_status"] != "passed"]
        (bad,) = failed
        assert bad["fraction"] == 3 and bad["qa_status"] == "failed"
        assert bad["deviations"] == ["missing_layers"]
        for d in case["deliveries"]:
            if d is not bad:
                assert d["pass_rate_percent"] == 100.0
                assert abs(d["meterset_error_percent"]) < 0.01
                assert Path(d["detail"]).is_file()
        # a 4th fraction arrives after completion: checked within one rescan, no new run
        moved = _copy_fraction(rig, tmp_path, 4)
        assert len(moved) == BEAMS
        await wait_until(lambda: _checked(rig, 4 * BEAMS), timeout_s=30, what="the 4th fraction")
        fourth = [d for d in _case(rig)["deliveries"] if d["folder"] in moved]
        assert {d["fraction"] for d in fourth} == {4}
        assert {d["qa_status"] for d in fourth} == {"passed"}
        await asyncio.sleep(1)
        assert len(starts(rig)) == launched
    # a 5th arrives while the service is down: the start-up scan finds it
    moved = _copy_fraction(rig, tmp_path, 5)
    async with running_service(rig.settings()):
        await wait_until(lambda: _checked(rig, 5 * BEAMS), timeout_s=30, what="the 5th fraction")
        assert {d["fraction"] for d in _case(rig)["deliveries"] if d["folder"] in moved} == {5}
        assert _case(rig)["status"] == "completed"
    assert len(starts(rig)) == launched
