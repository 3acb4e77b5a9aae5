"""Synthetic cases: files and layout, determinism, and every breakage ending in its failure code."""

from __future__ import annotations

import re
import struct
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from mqi_async.demo.cases import (
    PLANRANGE_HEADER,
    Breakage,
    CaseSpec,
    WrittenCase,
    layer_spots,
    write_case,
    write_cases,
)
from mqi_async.domain.delivery_log import DEFAULT_MU_PER_COUNT, RANGE_FACTORS
from mqi_async.domain.errors import FAILURES, IngestError
from mqi_async.domain.fractions import (
    CaseResolution,
    DeliveryInput,
    Waiting,
    decode_planinfo,
    resolve_case,
)
from mqi_async.domain.plan import Plan, find_rtplan_candidates, read_rtplan, select_rtplan
from mqi_async.ingest.layout import case_identity, is_case_dir

PLANINFO_KEYS = [
    "DICOM_PATIENT_ID",
    "DICOM_STUDY_INS_UID",
    "DICOM_BEAM_NUMBER",
    "TCSC_IRRAD_DATETIME",
    "TCSC_PATIENT_ID",
    "TCSC_PLAN_NUMBER",
    "TCSC_FIELD_NUMBER",
    "START_LAYER_NUMBER",
    "STOP_LAYER_NUMBER",
    "SHARE_DIR",
    "ACTUAL_DIR",
]
PTN_NAME = re.compile(r"(\d{2})_(\d{7})_(\d{3})_(\d{3})_(\d{3})\.ptn")


def load_plan(case: WrittenCase) -> Plan:
    names = [p.name for p in case.case_dir.iterdir() if p.is_file()]
    return select_rtplan(
        (n, (case.case_dir / n).read_bytes()) for n in find_rtplan_candidates(names)
    )


def delivery_inputs(case: WrittenCase) -> list[DeliveryInput]:
    inputs = []
    for folder in sorted(p for p in case.case_dir.iterdir() if p.is_dir()):
        info = folder / "PlanInfo.txt"
        inputs.append(
            DeliveryInput(
                path=str(folder),
                planinfo_text=decode_planinfo(info.read_bytes()) if info.exists() else None,
                has_ptn=any(p.suffix == ".ptn" for p in folder.iterdir()),
            )
        )
    return inputs


def resolve(case: WrittenCase, now: datetime) -> CaseResolution | Waiting:
    return resolve_case(load_plan(case), delivery_inputs(case), now=now)


def later(case: WrittenCase, hours: float = 3) -> datetime:
    return (case.last_delivery_at or case.spec.first_delivery_at) + timedelta(hours=hours)


def test_intact_case_resolves(tmp_path: Path) -> None:
    case = write_case(tmp_path, CaseSpec(beams=3, layers_per_beam=2, fractions=2))
    result = resolve(case, later(case))
    assert isinstance(result, CaseResolution)
    assert [(b.treatment_index, b.beam_number) for b in result.beams] == [(1, 2), (2, 3), (3, 4)]
    assert case.beam_numbers == (2, 3, 4)
    assert len(result.deliveries) == 6
    assert [f.status for f in result.fractions] == ["complete", "complete"]
    # the second day is delivered in reverse order
    second = [d.beam_number for d in result.deliveries if d.fraction_index == 2]
    assert second == [4, 3, 2]


@pytest.mark.parametrize("breakage", [b for b in Breakage if b is not Breakage.NONE])
def test_each_breakage_ends_in_its_failure_code(tmp_path: Path, breakage: Breakage) -> None:
    case = write_case(
        tmp_path, CaseSpec(beams=3, layers_per_beam=2, fractions=2, breakage=breakage)
    )
    assert breakage.code in FAILURES
    with pytest.raises(IngestError) as caught:
        resolve(case, later(case))
    assert caught.value.code == case.expected_error == breakage.value, caught.value


def test_rtplan_breakages_fail_through_read_rtplan(tmp_path: Path) -> None:
    for breakage in (Breakage.RTPLAN_PARSE_FAILED, Breakage.NOT_ION_PLAN, Breakage.UNKNOWN_MACHINE):
        case = write_case(tmp_path / breakage, CaseSpec(breakage=breakage))
        assert case.rtplan_path is not None
        with pytest.raises(IngestError) as caught:
            read_rtplan(case.rtplan_path)
        assert caught.value.code == breakage.value


@pytest.mark.parametrize("fractions", [1, 2])
def test_open_window_waits_then_resolves(tmp_path: Path, fractions: int) -> None:
    case = write_case(tmp_path, CaseSpec(beams=2, fractions=fractions, open_window=True))
    assert case.last_delivery_at is not None
    waiting = resolve(case, case.last_delivery_at + timedelta(minutes=5))
    assert isinstance(waiting, Waiting)
    assert waiting.fraction_index == fractions
    started = case.spec.first_delivery_at + timedelta(hours=24 * (fractions - 1))
    assert (
        timedelta(0) <= waiting.recheck_at - (started + timedelta(hours=1)) < timedelta(seconds=1)
    )
    if fractions == 1:
        with pytest.raises(IngestError) as caught:
            resolve(case, later(case))
        assert caught.value.code == "beam_count_mismatch"
    else:
        done = resolve(case, later(case))
        assert isinstance(done, CaseResolution) and done.reference_fraction_index == 1


def test_nested_layout(tmp_path: Path) -> None:
    case = write_case(tmp_path, CaseSpec(case_id="00000007", room="G2"))
    assert case.case_dir == tmp_path / "G2" / "00000007" / case.study_uid
    assert case.marker_path == tmp_path / "G2" / "00000007" / "_CASE_READY"
    assert case.marker_path.exists()
    identity = case_identity(tmp_path, case.case_dir, case_has_marker=False, parent_has_marker=True)
    assert (identity.case_id, identity.case_path, identity.room) == (
        "00000007",
        str(case.case_dir),
        "G2",
    )
    assert load_plan(case).machine_name == "GTR2"


def test_flat_layout_without_room(tmp_path: Path) -> None:
    case = write_case(tmp_path, CaseSpec(case_id="c1", room="", nested=False))
    assert case.case_dir == tmp_path / "c1"
    assert case.marker_path == tmp_path / "c1" / "_CASE_READY"
    identity = case_identity(tmp_path, case.case_dir, case_has_marker=True, parent_has_marker=False)
    assert (identity.case_id, identity.room, identity.is_ready) == ("c1", "", True)


def test_case_dir_is_recognised(tmp_path: Path) -> None:
    case = write_case(tmp_path, CaseSpec())
    files = [p.name for p in case.case_dir.iterdir() if p.is_file()]
    subdirs = {p.name: [f.name for f in p.iterdir()] for p in case.case_dir.iterdir() if p.is_dir()}
    assert is_case_dir(files, subdirs)


def test_marker_can_be_left_out_or_written_first(tmp_path: Path) -> None:
    unmarked = write_case(tmp_path / "a", CaseSpec(write_marker=False))
    assert unmarked.marker_path is None
    assert not list((tmp_path / "a").rglob("_CASE_READY"))
    first = write_case(tmp_path / "b", CaseSpec(), marker_last=False)
    last = write_case(tmp_path / "c", CaseSpec())
    assert first.marker_path is not None and last.marker_path is not None
    newest = max(p.stat().st_mtime_ns for p in last.case_dir.rglob("*"))
    assert last.marker_path.stat().st_mtime_ns >= newest
    oldest = min(p.stat().st_mtime_ns for p in first.case_dir.rglob("*") if p.is_file())
    assert first.marker_path.stat().st_mtime_ns <= oldest


def test_delivery_files(tmp_path: Path) -> None:
    spec = CaseSpec(beams=2, layers_per_beam=3, samples_per_layer=30, room="G2")
    case = write_case(tmp_path, spec)
    assert len(case.delivery_dirs) == 2
    for folder in case.delivery_dirs:
        assert re.fullmatch(r"\d{16}", folder.name)
        info = (folder / "PlanInfo.txt").read_bytes().decode()
        assert [line.split(",", 1)[0] for line in info.splitlines()] == PLANINFO_KEYS
        assert info.endswith("\r\n")
        assert f"TCSC_IRRAD_DATETIME,{folder.name}" in info
        rows = (folder / "PlanRange.txt").read_text().splitlines()
        assert rows[0] == PLANRANGE_HEADER and len(rows) == 4
        ptns = sorted(folder.glob("*.ptn"))
        assert [p.name for p in ptns] == [row.split(",")[9] for row in rows[1:]]
        for layer, ptn in enumerate(ptns, start=1):
            match = PTN_NAME.fullmatch(ptn.name)
            assert match is not None and match[1] == "02" and int(match[5]) == layer
            data = ptn.read_bytes()
            assert len(data) % 16 == 0 and len(data) >= 30 * 16
            assert int.from_bytes(data[12:14], "big") == layer  # column 7 of row 0
            # the record delivers the planned layer: its counts are the layer's MU
            values = struct.unpack(f">{len(data) // 2}H", data)
            rows8 = [values[i : i + 8] for i in range(0, len(values), 8)]
            code = int(rows[layer].split(",")[5])
            counts = sum(r[4] for r in rows8 if r[7] == 1) * RANGE_FACTORS[code]
            planned = sum(mu for _, _, mu in layer_spots(layer - 1, 3))
            assert counts * DEFAULT_MU_PER_COUNT["G2"] == pytest.approx(planned, rel=1e-4)


def test_generation_is_deterministic(tmp_path: Path) -> None:
    spec = CaseSpec(beams=2, fractions=2, seed=7)
    first = write_case(tmp_path / "a", spec)
    second = write_case(tmp_path / "b", spec)
    files_a = {
        p.relative_to(tmp_path / "a"): p.read_bytes()
        for p in (tmp_path / "a").rglob("*")
        if p.is_file()
    }
    files_b = {
        p.relative_to(tmp_path / "b"): p.read_bytes()
        for p in (tmp_path / "b").rglob("*")
        if p.is_file()
    }
    assert files_a == files_b
    assert first.study_uid == second.study_uid
    other = write_case(tmp_path / "c", CaseSpec(beams=2, fractions=2, seed=8))
    assert other.study_uid != first.study_uid


def test_write_cases_makes_small_distinct_cases(tmp_path: Path) -> None:
    cases = write_cases(tmp_path, 3)
    assert [c.case_id for c in cases] == ["00000001", "00000002", "00000003"]
    assert len({c.study_uid for c in cases}) == 3
    for case in cases:
        plan = read_rtplan(case.rtplan_path) if case.rtplan_path else None
        assert plan is not None and plan.patient_id == case.case_id
        assert plan.study_instance_uid == case.study_uid
        assert isinstance(resolve(case, later(case)), CaseResolution)


@pytest.mark.parametrize(
    "spec",
    [
        {"beams": 0},
        {"beams": 1, "breakage": Breakage.BEAM_COUNT_MISMATCH},
        {"beams": 1, "open_window": True},
        {"room": "G3"},
    ],
)
def test_invalid_specs(spec: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CaseSpec(**spec)  # type: ignore[arg-type]
