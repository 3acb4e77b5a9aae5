"""Planned-vs-delivered dose checks end to end, through the real sshd.

Every case runs MOQUI (the bundled stand-in with its pencil-beam model) on its log fluence and,
once per plan, on the plan's own spots; the 3-D gamma of the two decides each beam's verdict.
The expected pass rates are computed here independently: the doses from the stand-in's model
fed with the spots the plan and the (injected-error) records hold, the gamma by PyMedPhys.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import shutil
import signal
import sqlite3
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from mqi_async.config import default_moqui
from mqi_async.demo.cases import (
    CaseSpec,
    DeliveryError,
    DeliveryErrorKind,
    layer_spots,
    write_case,
)
from mqi_async.domain.delivery_log import DEFAULT_MU_PER_COUNT
from mqi_async.domain.verdict import QaStatus, Thresholds, classify
from tests.e2e import BIN, Rig, make_rig, running_service, spawn_service, status_json, wait_until
from tests.sshd import SshdServer

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

#: 120 x 120 x 40 mm of water in 2 mm voxels: the 110-104 MeV layers stop inside it
QA_PHANTOM: dict[str, Any] = {
    "PhantomDimX": 60,
    "PhantomDimY": 60,
    "PhantomDimZ": 20,
    "PhantomUnitX": 2,
    "PhantomUnitY": 2,
    "PhantomUnitZ": 2,
    "PhantomPositionX": -60,
    "PhantomPositionY": -60,
    "PhantomPositionZ": -20,
}
LAYERS = 4
MU_PER_COUNT = DEFAULT_MU_PER_COUNT["G2"]


def _rig(
    root: Path, sshd: SshdServer, reference: str = "planned_mc", *, report: bool = False
) -> Rig:
    return make_rig(
        root,
        sshd,
        gpus=2,
        run_seconds=0.3,
        overrides={
            "moqui": {**default_moqui(), **QA_PHANTOM},
            "qa": {"reference": reference, "report": report},
        },
    )


def _spec(case_id: str, *errors: DeliveryError) -> CaseSpec:
    return CaseSpec(
        case_id=case_id,
        beams=2,
        layers_per_beam=LAYERS,
        room="G2",
        nested=False,
        first_delivery_at=(datetime.now() - timedelta(hours=3)).replace(microsecond=0),
        delivery_errors=errors,
        seed=len(case_id),
    )


def starts(rig: Rig) -> list[str]:
    path = rig.state_dir / "starts.log"
    return path.read_text().splitlines() if path.exists() else []


def _case(rig: Rig, case_id: str) -> dict[str, Any]:
    found = [c for c in status_json(rig)["cases"] if c["case_id"] == case_id]
    return found[0] if found else {}


def _judged(rig: Rig, *case_ids: str) -> bool:
    cases = [_case(rig, c) for c in case_ids]
    return all(c and c["qa"]["status"] != "pending" for c in cases)


# ---------------------------------------------------------------- the expected verdicts


def _stand_in() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("tps_env_model", str(BIN / "tps_env"))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _layers(errors: tuple[DeliveryError, ...], beam: int) -> list[tuple[float, list[Any]]]:
    """(energy, [(x, y, histories)]) as MOQUI gets them: from the plan, or from the records."""
    energies = [110.0 - 2.0 * k for k in range(LAYERS)]
    mine = [e for e in errors if e.beam in (None, beam)]
    delivered = []
    for k in range(LAYERS):
        if any(e.kind is DeliveryErrorKind.MISSING_LAYER and e.layer == k + 1 for e in mine):
            continue
        shift = sum(e.value for e in mine if e.kind is DeliveryErrorKind.SHIFT and e.layer == k + 1)
        scale = 1.0
        for e in mine:
            if e.kind is DeliveryErrorKind.METERSET and e.layer in (None, k + 1):
                scale *= 1 + e.value / 100
        spots = [(x + shift, y, mu * scale / MU_PER_COUNT) for x, y, mu in layer_spots(k, LAYERS)]
        delivered.append(spots)
    # the interpreter pairs the records it finds with the plan's energies in order
    return list(zip(energies, delivered, strict=False))


def _expected_rate(
    model: ModuleType, errors: tuple[DeliveryError, ...], beam: int, number: int
) -> float:
    pymedphys = pytest.importorskip("pymedphys", reason="PyMedPhys is a dev dependency")
    grid = (60, 60, 20, 2.0, 2.0, 2.0, -60.0, -60.0, -20.0)
    angle = float((90 * number) % 360)
    planned = model.physical_dose(grid, _layers((), beam), angle)
    delivered = model.physical_dose(grid, _layers(errors, beam), angle)
    axes = tuple(
        lo + (np.arange(n) + 0.5) * 2.0 for n, lo in ((20, -20.0), (60, -60.0), (60, -60.0))
    )
    g = np.asarray(
        pymedphys.gamma(
            axes, planned, axes, delivered, 3.0, 3.0,
            lower_percent_dose_cutoff=10.0, interp_fraction=10, max_gamma=2.0,
            interp_algo="pymedphys" if importlib.util.find_spec("numba") else "scipy",
        )
    )  # fmt: skip
    valid = ~np.isnan(g)
    return float(100.0 * np.count_nonzero(g[valid] <= 1.0) / valid.sum())


CASES = {
    "QA-CLEAN": (),
    "QA-SHIFT": (DeliveryError(kind=DeliveryErrorKind.SHIFT, layer=2, value=3.0, beam=1),),
    "QA-MISSING": (DeliveryError(kind=DeliveryErrorKind.MISSING_LAYER, layer=3, beam=2),),
    "QA-METERSET": (DeliveryError(kind=DeliveryErrorKind.METERSET, layer=None, value=5.0, beam=1),),
}


async def test_each_beam_gets_the_verdict_its_delivery_earns(
    tmp_path: Path, sshd: SshdServer
) -> None:
    rig = _rig(tmp_path / "rig", sshd)
    written = {cid: write_case(rig.scan, _spec(cid, *errs)) for cid, errs in CASES.items()}
    async with running_service(rig.settings()):
        await wait_until(lambda: _judged(rig, *CASES), timeout_s=240, what="the dose verdicts")
    model = _stand_in()
    beams_run = sum(len(w.beam_numbers) for w in written.values())
    assert len(starts(rig)) == 2 * beams_run  # each delivered beam and each planned one, once
    for case_id, errors in CASES.items():
        case = _case(rig, case_id)
        assert case["status"] == "completed"
        for k, (beam, number) in enumerate(
            zip(case["beams"], written[case_id].beam_numbers, strict=True), start=1
        ):
            want = _expected_rate(model, errors, k, number)
            qa = beam["qa"]
            assert qa["pass_rate_percent"] == pytest.approx(want, abs=0.5), (case_id, k)
            assert qa["status"] == str(classify(want, Thresholds())), (case_id, k, want)
            assert qa["evaluated_points"] > 1000
        plan = case["qa"]
        assert plan["pass_rate_percent"] is not None and plan["evaluated_points"] > 1000
    clean = _case(rig, "QA-CLEAN")
    assert [b["qa"]["status"] for b in clean["beams"]] == ["passed", "passed"]
    assert clean["qa"]["status"] == "passed" and clean["qa"]["pass_rate_percent"] == 100.0
    # a 3 mm shift of one layer stays within 3 %/3 mm; a missing layer does not
    missing = [b["qa"]["pass_rate_percent"] for b in _case(rig, "QA-MISSING")["beams"]]
    assert missing[0] == 100.0 and missing[1] < 80.0
    assert _case(rig, "QA-MISSING")["qa"]["status"] == "failed"


async def test_a_recheck_runs_the_checks_again_and_rebuilds_the_report(
    tmp_path: Path, sshd: SshdServer
) -> None:
    rig = _rig(tmp_path / "rig", sshd, report=True)
    write_case(rig.scan, _spec("RECHECK", *CASES["QA-MISSING"]))
    async with running_service(rig.settings()) as service:
        first = await wait_until(
            lambda: _case(rig, "RECHECK").get("qa", {}).get("report"),
            timeout_s=240,
            what="the report",
        )
        before = _case(rig, "RECHECK")
        assert before["qa"]["status"] == "failed"
        written = Path(first).stat().st_mtime_ns
        runs = len(starts(rig))
        message = await service.engine.apply("recheck", "RECHECK")
        assert message.startswith("checks of RECHECK run again: 2 delivery check(s)")
        await wait_until(
            lambda: Path(first).stat().st_mtime_ns > written and _judged(rig, "RECHECK"),
            timeout_s=240,
            what="the checks and the report again",
        )
    after = _case(rig, "RECHECK")
    # the same data gives the same verdicts; no MOQUI run was repeated
    assert after["qa"]["status"] == "failed" and after["qa"]["report"] == first
    assert [b["qa"] for b in after["beams"]] == [b["qa"] for b in before["beams"]]
    assert len(starts(rig)) == runs
    assert Path(first).with_suffix(".html").is_file()


def _copy_in(source: Path, target: Path) -> None:
    """A whole case folder appears at once (copied beside, then renamed)."""
    staging = target.with_name(target.name + ".extracting")
    shutil.copytree(source, staging)
    staging.rename(target)


async def test_a_case_of_an_unchanged_plan_reuses_its_planned_doses(
    tmp_path: Path, sshd: SshdServer
) -> None:
    rig = _rig(tmp_path / "rig", sshd)
    first = write_case(tmp_path / "gen", _spec("REUSE-A"))
    async with running_service(rig.settings()):
        _copy_in(first.case_dir, rig.scan / "REUSE-A")
        await wait_until(lambda: _judged(rig, "REUSE-A"), timeout_s=120, what="the first case")
        after_first = len(starts(rig))
        # the same plan again (a copy under another name: the same SOPInstanceUID)
        _copy_in(first.case_dir, rig.scan / "REUSE-B")
        await wait_until(lambda: _judged(rig, "REUSE-B"), timeout_s=120, what="the copy")
    assert after_first == 4  # 2 delivered + 2 planned
    assert len(starts(rig)) == after_first + 2  # the copy's delivered beams only
    assert _case(rig, "REUSE-B")["qa"]["status"] == "passed"


async def test_tps_dose_reference_and_a_case_without_one(tmp_path: Path, sshd: SshdServer) -> None:
    from mqi_async.domain.tps import phantom_grid
    from mqi_async.dose import build_rt_dose, read_plan_ref

    rig = _rig(tmp_path / "rig", sshd, reference="tps_dose")
    with_dose = write_case(tmp_path / "gen", _spec("TPS-WITH"))
    assert with_dose.rtplan_path is not None
    model = _stand_in()
    grid = phantom_grid({**default_moqui(), **QA_PHANTOM})
    plan = read_plan_ref(with_dose.rtplan_path)
    for k, number in enumerate(with_dose.beam_numbers, start=1):
        dose = model.physical_dose(
            (60, 60, 20, 2.0, 2.0, 2.0, -60.0, -60.0, -20.0),
            _layers((), k),
            float((90 * number) % 360),
        )
        ds = build_rt_dose(dose, grid=grid, plan=plan, beam_number=number)
        # in a subfolder: the interpreter takes the first .dcm of the case folder as the plan
        (with_dose.case_dir / "tps").mkdir(exist_ok=True)
        ds.save_as(with_dose.case_dir / "tps" / f"RD_beam{number}.dcm", enforce_file_format=True)
    _copy_in(with_dose.case_dir, rig.scan / "TPS-WITH")
    write_case(rig.scan, _spec("TPS-NONE"))
    async with running_service(rig.settings()):
        await wait_until(
            lambda: _judged(rig, "TPS-WITH", "TPS-NONE"), timeout_s=120, what="verdicts"
        )
    assert len(starts(rig)) == 4  # no planned runs with a TPS reference
    found = _case(rig, "TPS-WITH")
    assert [b["qa"]["status"] for b in found["beams"]] == ["passed", "passed"]
    assert all(b["qa"]["pass_rate_percent"] >= 99.0 for b in found["beams"])
    assert found["qa"]["status"] == "passed"
    none = _case(rig, "TPS-NONE")
    assert none["qa"]["status"] == "skipped" and none["qa"]["reason"].startswith("no_tps_dose")
    assert {b["qa"]["status"] for b in none["beams"]} == {"skipped"}


def _planned_running(rig: Rig) -> bool:
    try:
        with sqlite3.connect(f"file:{rig.db}?mode=ro", uri=True, timeout=5) as db:
            rows = db.execute("SELECT status FROM beams WHERE case_id LIKE 'planned-%'").fetchall()
    except sqlite3.Error:
        return False
    return any(r[0] == "running" for r in rows)


def test_a_crash_during_the_planned_runs_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, sshd: SshdServer
) -> None:
    rig = make_rig(
        tmp_path / "rig",
        sshd,
        gpus=2,
        run_seconds=3,
        overrides={
            "moqui": {**default_moqui(), **QA_PHANTOM},
            "qa": {"reference": "planned_mc", "report": False},
        },
    )
    write_case(rig.scan, _spec("CRASH"))
    proc = spawn_service(rig, "first.out")
    try:
        deadline = time.monotonic() + 90
        while not _planned_running(rig):
            assert time.monotonic() < deadline, "the planned runs never started"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc = spawn_service(rig, "second.out")
        deadline = time.monotonic() + 120
        while not _judged(rig, "CRASH"):
            assert time.monotonic() < deadline, "no verdict after the restart"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert len(starts(rig)) == 4
    case = _case(rig, "CRASH")
    assert case["qa"]["status"] == str(QaStatus.PASSED)
    assert [b["attempts"] for b in case["beams"]] == [1, 1]
