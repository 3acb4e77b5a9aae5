"""PlanInfo parsing, delivery times, fraction grouping, reference choice and case resolution."""

from __future__ import annotations

import hashlib
import tempfile
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from mqi_async.domain.errors import IngestError
from mqi_async.domain.fractions import (
    CaseResolution,
    Delivery,
    DeliveryInput,
    Fraction,
    FractionStatus,
    Waiting,
    choose_reference,
    decode_planinfo,
    delivery_id,
    delivery_timestamp,
    group_fractions,
    infer_beam_number,
    parse_folder_stamp,
    parse_planinfo,
    parse_stamp,
    resolve_case,
)
from mqi_async.domain.plan import Plan, PlanBeam

# Hypothesis writes caches to ./.hypothesis while pytest collects, and with this project's
# norecursedirs pytest then warns (an error under -W error) about that folder on the next run
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "mqi_async-hypothesis")

PATIENT = "00000002"
T0 = datetime(2025, 1, 1, 9, 30)
HOUR = timedelta(hours=1)


def make_plan(numbers: tuple[int, ...] = (2, 3, 4), setup: tuple[int, ...] = (1,)) -> Plan:
    beams = tuple(
        PlanBeam(
            treatment_index=k,
            plan_position=k + len(setup),
            beam_number=n,
            beam_name=f"{k}G{90 * k:03d}",
            beam_description="",
            machine_name="GTR1",
            layer_energies_mev=(150.0,),
            control_point_count=2,
        )
        for k, n in enumerate(numbers, start=1)
    )
    return Plan(
        source="RP.test.dcm",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.481.8",
        sop_instance_uid="1.2.3",
        patient_id=PATIENT,
        patient_name="",
        patient_birth_date="",
        patient_sex="",
        study_instance_uid="1.2.4",
        study_date="",
        study_time="",
        study_id="",
        referring_physician_name="",
        accession_number="",
        frame_of_reference_uid="",
        rt_plan_label="",
        machine_name="GTR1",
        gantry=1,
        beams=beams,
        setup_beam_numbers=setup,
    )


def stamp(at: datetime) -> str:
    return at.strftime("%Y%m%d%H%M%S") + f"{at.microsecond // 10_000:02d}"


def planinfo(beam: int | str, at: datetime | None, patient: str = PATIENT) -> str:
    lines = [
        f"DICOM_PATIENT_ID,{patient}",
        "DICOM_STUDY_INS_UID,1.2.4",
        f"DICOM_BEAM_NUMBER,{beam}",
    ]
    if at is not None:
        lines.append(f"TCSC_IRRAD_DATETIME,{stamp(at)}")
    lines += ["TCSC_PATIENT_ID,0000001", "TCSC_FIELD_NUMBER,1", "STOP_LAYER_NUMBER,32"]
    return "\r\n".join(lines) + "\r\n"


def delivery(
    beam: int, at: datetime, *, folder: str | None = None, patient: str = PATIENT
) -> DeliveryInput:
    name = folder if folder is not None else stamp(at)
    return DeliveryInput(
        path=f"/scan/G1/p/s/{name}", planinfo_text=planinfo(beam, at, patient), has_ptn=True
    )


def fraction_inputs(start: datetime, beams: list[int], gap_min: float = 4) -> list[DeliveryInput]:
    return [delivery(b, start + timedelta(minutes=gap_min * i)) for i, b in enumerate(beams)]


def expect_code(code: str, plan: Plan, inputs: list[DeliveryInput], now: datetime) -> IngestError:
    with pytest.raises(IngestError) as caught:
        resolve_case(plan, inputs, now=now)
    assert caught.value.code == code, caught.value
    return caught.value


# --- PlanInfo ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "DICOM_PATIENT_ID,00000002\nDICOM_BEAM_NUMBER,3\n",
        "\ufeffDICOM_PATIENT_ID,00000002\r\nDICOM_BEAM_NUMBER,3\r\n",
        "\n\n  DICOM_PATIENT_ID , 00000002  \r\n\r\n DICOM_BEAM_NUMBER,  3 \n\n",
        "dicom_patient_id,00000002\ndicom_beam_number,3",
        "garbage line\nDICOM_PATIENT_ID,00000002\nDICOM_BEAM_NUMBER,3\nSHARE_DIR,\\\\h\\s,x\n",
        "DICOM_PATIENT_ID,00000002\nDICOM_BEAM_NUMBER,3\nDICOM_BEAM_NUMBER,3\n",
    ],
)
def test_parse_planinfo_tolerates_formatting(text: str) -> None:
    info = parse_planinfo(text)
    assert (info.patient_id, info.beam_number) == ("00000002", 3)


def test_parse_planinfo_reads_all_keys() -> None:
    info = parse_planinfo(planinfo(3, T0) + "SHARE_DIR,\\\\share\\Share,Actual\r\n")
    assert info.irrad_datetime == "2025010109300000"
    assert (info.tcsc_patient_id, info.tcsc_field_number, info.stop_layer_number) == (
        "0000001",
        1,
        32,
    )
    assert info.tcsc_plan_number is None
    assert info.get("SHARE_DIR") == "\\\\share\\Share,Actual"
    assert info.get("NOPE", "-") == "-"


@pytest.mark.parametrize(
    ("data", "patient"),
    [
        ("\ufeffDICOM_PATIENT_ID,Ä1\r\nDICOM_BEAM_NUMBER,3".encode(), "Ä1"),
        ("DICOM_PATIENT_ID,Ä1\nDICOM_BEAM_NUMBER,3".encode("latin-1"), "Ä1"),
    ],
)
def test_parse_planinfo_bytes(data: bytes, patient: str) -> None:
    assert parse_planinfo(data).patient_id == patient
    assert decode_planinfo(data).endswith("3")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "DICOM_PATIENT_ID, DICOM_BEAM_NUMBER"),
        ("DICOM_PATIENT_ID,1\n", "DICOM_BEAM_NUMBER"),
        ("DICOM_BEAM_NUMBER,1\n", "DICOM_PATIENT_ID"),
        ("DICOM_PATIENT_ID,   \nDICOM_BEAM_NUMBER,1", "DICOM_PATIENT_ID"),
        ("DICOM_PATIENT_ID,1\nDICOM_BEAM_NUMBER,three", "'three'"),
        ("DICOM_PATIENT_ID,1\nDICOM_BEAM_NUMBER,-1", "'-1'"),
        ("DICOM_PATIENT_ID,1\nDICOM_BEAM_NUMBER,1_0", "'1_0'"),
        ("DICOM_PATIENT_ID,1\nDICOM_BEAM_NUMBER,\u0663", "'\u0663'"),
        ("DICOM_PATIENT_ID,1\nDICOM_BEAM_NUMBER," + "9" * 5000, "is not a beam number"),
        ("DICOM_PATIENT_ID,1\nDICOM_PATIENT_ID,2\nDICOM_BEAM_NUMBER,1", "twice"),
        ("DICOM_PATIENT_ID;1\nDICOM_BEAM_NUMBER;1", "DICOM_PATIENT_ID"),
    ],
)
def test_parse_planinfo_invalid(text: str, fragment: str) -> None:
    with pytest.raises(IngestError) as caught:
        parse_planinfo(text)
    assert caught.value.code == "planinfo_invalid"
    assert fragment in caught.value.detail


_KEYS = st.sampled_from(["DICOM_PATIENT_ID", "DICOM_BEAM_NUMBER", "TCSC_IRRAD_DATETIME", "X", ""])
_LINE = st.one_of(
    st.text(max_size=40),
    st.builds(
        lambda k, v, sp: f"{sp}{k}{sp},{sp}{v}",
        _KEYS,
        st.text(max_size=20),
        st.sampled_from(["", " ", "\t"]),
    ),
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    lines=st.lists(_LINE, max_size=8),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    bom=st.booleans(),
)
def test_parse_planinfo_only_raises_ingest_error(lines: list[str], newline: str, bom: bool) -> None:
    text = ("\ufeff" if bom else "") + newline.join(lines)
    try:
        info = parse_planinfo(text)
    except IngestError as exc:
        assert exc.code == "planinfo_invalid"
    else:
        assert info.patient_id and info.beam_number >= 0


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.binary(max_size=200))
def test_parse_planinfo_bytes_only_raises_ingest_error(data: bytes) -> None:
    try:
        parse_planinfo(data)
    except IngestError as exc:
        assert exc.code == "planinfo_invalid"


# --- timestamps -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20250101093015", datetime(2025, 1, 1, 9, 30, 15)),
        ("2025010109301500", datetime(2025, 1, 1, 9, 30, 15)),
        ("2025010109301550", datetime(2025, 1, 1, 9, 30, 15, 500_000)),
        ("2025010109301507", datetime(2025, 1, 1, 9, 30, 15, 70_000)),
        ("20250101093015123456789", datetime(2025, 1, 1, 9, 30, 15, 123_456)),
        (" 2025010109301500 ", datetime(2025, 1, 1, 9, 30, 15)),
        ("2025010109301", None),
        ("20251301093015", None),
        ("20250230093015", None),
        ("20250101253015", None),
        ("2025-01-01 09:30", None),
        ("", None),
    ],
)
def test_parse_stamp(value: str, expected: datetime | None) -> None:
    assert parse_stamp(value) == expected


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("2025010109301500", datetime(2025, 1, 1, 9, 30, 15)),
        ("2025010109301500_2", datetime(2025, 1, 1, 9, 30, 15)),
        ("20250101093015 - copy", datetime(2025, 1, 1, 9, 30, 15)),
        ("beam_2", None),
        ("x2025010109301500", None),
    ],
)
def test_parse_folder_stamp(folder: str, expected: datetime | None) -> None:
    assert parse_folder_stamp(folder) == expected


def test_delivery_timestamp_prefers_planinfo_then_folder() -> None:
    info = parse_planinfo(planinfo(2, T0))
    assert delivery_timestamp(info, "20990101000000") == T0
    no_time = parse_planinfo(planinfo(2, None))
    assert delivery_timestamp(no_time, "2025010110000000") == datetime(2025, 1, 1, 10)
    bad_time = parse_planinfo(planinfo(2, None) + "TCSC_IRRAD_DATETIME,soon\n")
    assert delivery_timestamp(bad_time, "2025010110000000") == datetime(2025, 1, 1, 10)
    assert delivery_timestamp(None, "2025010110000000_3") == datetime(2025, 1, 1, 10)
    with pytest.raises(IngestError) as caught:
        delivery_timestamp(no_time, "beam_2")
    assert caught.value.code == "missing_delivery_timestamp"
    assert "beam_2" in caught.value.detail


def test_delivery_id() -> None:
    digest = hashlib.sha1(b"/scan/G1/p/s/2025010109300000").hexdigest()[:12]
    assert delivery_id("c1", "/scan/G1/p/s/2025010109300000") == f"c1_delivery_{digest}"
    assert delivery_id("c1", "/a/b") != delivery_id("c1", "/a/c")


# --- fractions --------------------------------------------------------------------------


def d(k: int, at: datetime) -> Delivery:
    return Delivery(
        path=f"/x/{stamp(at)}",
        folder_name=stamp(at),
        delivered_at=at,
        beam_number=k + 1,
        treatment_index=k,
    )


@pytest.mark.parametrize(
    ("offsets_min", "indices", "now_after_min", "statuses"),
    [
        pytest.param([0, 4, 8], [1, 2, 3], 9, ["complete"], id="complete-while-open"),
        pytest.param([0, 4], [1, 2], 30, ["pending"], id="pending"),
        pytest.param([0, 4], [1, 2], 60, ["partial"], id="pending-becomes-partial"),
        pytest.param([0, 4], [1, 1], 30, ["pending"], id="redelivery-still-open"),
        pytest.param([0, 4, 8, 12], [1, 2, 3, 1], 90, ["anomaly"], id="anomaly"),
        pytest.param(
            [0, 4, 8, 24 * 60, 24 * 60 + 3],
            [1, 2, 3, 3, 2],
            25 * 60,
            ["complete", "partial"],
            id="partial-second-day",
        ),
        pytest.param([0, 30, 60], [1, 2, 3], 120, ["complete"], id="window-edge-inclusive"),
        pytest.param([0, 40, 80], [1, 2, 3], 200, ["partial", "partial"], id="start-anchored"),
    ],
)
def test_group_fractions(
    offsets_min: list[int], indices: list[int], now_after_min: int, statuses: list[str]
) -> None:
    items = [d(k, T0 + timedelta(minutes=m)) for m, k in zip(offsets_min, indices, strict=True)]
    fractions = group_fractions(
        reversed(items), expected_beams=3, now=T0 + timedelta(minutes=now_after_min)
    )
    assert [f.status for f in fractions] == statuses
    assert [f.index for f in fractions] == list(range(1, len(statuses) + 1))


def test_fraction_across_midnight_stays_one_fraction() -> None:
    start = datetime(2025, 1, 1, 23, 40)
    items = [d(k, start + timedelta(minutes=15 * i)) for i, k in enumerate([3, 2, 1])]
    (fraction,) = group_fractions(items, expected_beams=3, now=start + 2 * HOUR)
    assert fraction.status == FractionStatus.COMPLETE
    assert fraction.started_at == start
    assert [x.treatment_index for x in fraction.deliveries] == [3, 2, 1]
    assert fraction.window_ends_at == start + HOUR


def test_configurable_window() -> None:
    items = [d(1, T0), d(2, T0 + timedelta(minutes=20))]
    assert (
        len(group_fractions(items, expected_beams=2, now=T0 + HOUR, window=timedelta(minutes=10)))
        == 2
    )
    assert len(group_fractions(items, expected_beams=2, now=T0 + HOUR)) == 1


def frac(index: int, status: FractionStatus) -> Fraction:
    at = T0 + timedelta(days=index)
    return Fraction(
        index=index, started_at=at, window_ends_at=at + HOUR, status=status, deliveries=()
    )


C, P, A, W = (
    FractionStatus.COMPLETE,
    FractionStatus.PARTIAL,
    FractionStatus.ANOMALY,
    FractionStatus.PENDING,
)


@pytest.mark.parametrize(
    ("statuses", "reference"),
    [
        ([C, C], 1),
        ([P, C, C], 2),
        ([A, P, C], 3),
        ([A, P, P], 2),
        ([A, A], 1),
        ([P, A], 1),
    ],
)
def test_choose_reference(statuses: list[FractionStatus], reference: int) -> None:
    fractions = [frac(i, s) for i, s in enumerate(statuses, start=1)]
    assert choose_reference(fractions).index == reference


@pytest.mark.parametrize("statuses", [[], [W]])
def test_no_reference_fraction(statuses: list[FractionStatus]) -> None:
    with pytest.raises(IngestError) as caught:
        choose_reference([frac(i, s) for i, s in enumerate(statuses, start=1)])
    assert caught.value.code == "no_reference_fraction"


# --- resolve_case -----------------------------------------------------------------------


def test_resolve_maps_beam_numbers_to_treatment_indices() -> None:
    plan = make_plan((2, 3, 4), setup=(1,))
    day1 = fraction_inputs(T0, [4, 3, 2])
    day2 = fraction_inputs(T0 + 24 * HOUR, [2, 3, 4])
    result = resolve_case(plan, day2 + day1, now=T0 + 30 * HOUR)
    assert isinstance(result, CaseResolution)
    assert [(b.treatment_index, b.beam_number, b.beam_name) for b in result.beams] == [
        (1, 2, "1G090"),
        (2, 3, "2G180"),
        (3, 4, "3G270"),
    ]
    assert [b.delivery_folder for b in result.beams] == [
        stamp(T0 + timedelta(minutes=m)) for m in (8, 4, 0)
    ]
    assert result.reference_fraction_index == 1
    assert len(result.deliveries) == 6
    assert [r.is_reference for r in result.deliveries] == [True] * 3 + [False] * 3
    assert [r.fraction_index for r in result.deliveries] == [1, 1, 1, 2, 2, 2]
    assert {r.treatment_index for r in result.deliveries} == {1, 2, 3}
    assert result.notes == ()


def test_partial_first_fraction_then_complete_reference() -> None:
    plan = make_plan((2, 3, 4))
    inputs = fraction_inputs(T0, [3, 4]) + fraction_inputs(T0 + 24 * HOUR, [2, 3, 4])
    result = resolve_case(plan, inputs, now=T0 + 48 * HOUR)
    assert isinstance(result, CaseResolution)
    assert result.reference_fraction_index == 2
    assert [f.status for f in result.fractions] == ["partial", "complete"]
    assert any("fraction 1 is partial" in n for n in result.notes)


def test_duplicate_outside_reference_is_only_noted() -> None:
    plan = make_plan((2, 3))
    inputs = fraction_inputs(T0, [2, 3]) + fraction_inputs(T0 + 24 * HOUR, [2, 2, 3])
    result = resolve_case(plan, inputs, now=T0 + 48 * HOUR)
    assert isinstance(result, CaseResolution)
    assert result.reference_fraction_index == 1
    assert any("delivered more than once" in n for n in result.notes)
    assert any("fraction 2 is anomaly" in n for n in result.notes)


def test_duplicate_in_reference_fails() -> None:
    plan = make_plan((2, 3))
    inputs = fraction_inputs(T0, [2, 3, 2])
    error = expect_code("duplicate_beam_delivery", plan, inputs, T0 + 2 * HOUR)
    assert stamp(T0) in error.detail and stamp(T0 + timedelta(minutes=8)) in error.detail


def test_partial_reference_is_beam_count_mismatch() -> None:
    plan = make_plan((2, 3, 4))
    inputs = fraction_inputs(T0, [2, 3]) + fraction_inputs(T0 + 24 * HOUR, [3, 4])
    error = expect_code("beam_count_mismatch", plan, inputs, T0 + 48 * HOUR)
    assert "missing beam(s) 4 (3G270)" in error.detail


def test_open_window_waits_until_it_closes() -> None:
    plan = make_plan((2, 3, 4))
    inputs = fraction_inputs(T0, [2, 3])
    waiting = resolve_case(plan, inputs, now=T0 + timedelta(minutes=20))
    assert isinstance(waiting, Waiting)
    assert (waiting.recheck_at, waiting.fraction_index) == (T0 + HOUR, 1)
    assert "2 of 3" in waiting.detail
    assert isinstance(resolve_case(plan, inputs, now=T0 + HOUR - timedelta(seconds=1)), Waiting)
    expect_code("beam_count_mismatch", plan, inputs, T0 + HOUR)


def test_open_window_with_aware_now() -> None:
    plan = make_plan((2, 3))
    inputs = fraction_inputs(T0, [2])
    zone = timezone(timedelta(hours=9))
    now = (T0 + timedelta(minutes=5)).replace(tzinfo=zone).astimezone(UTC)
    waiting = resolve_case(plan, inputs, now=now, local_tz=zone)
    assert isinstance(waiting, Waiting)
    assert waiting.recheck_at == (T0 + HOUR).replace(tzinfo=zone)
    assert waiting.recheck_at.tzinfo == UTC


def test_earlier_complete_fraction_does_not_wait_for_later_pending() -> None:
    plan = make_plan((2, 3))
    inputs = fraction_inputs(T0, [2, 3]) + fraction_inputs(T0 + 24 * HOUR, [2])
    result = resolve_case(plan, inputs, now=T0 + 24 * HOUR + timedelta(minutes=10))
    assert isinstance(result, Waiting) and result.fraction_index == 2


@pytest.mark.parametrize(
    ("make_inputs", "code", "fragment"),
    [
        pytest.param(lambda: [], "missing_deliveries", "PlanInfo.txt", id="none"),
        pytest.param(
            lambda: [DeliveryInput(path="/s/2025010109300000", planinfo_text=None, has_ptn=False)],
            "missing_deliveries",
            "*.ptn",
            id="empty-folder",
        ),
        pytest.param(
            lambda: [delivery(2, T0), delivery(3, T0 + HOUR / 10, patient="OTHER")],
            "patient_id_mismatch",
            "differs from the RTPLAN's PatientID",
            id="patient",
        ),
        pytest.param(
            lambda: [delivery(2, T0, patient=f" {PATIENT} "), delivery(3, T0)],
            None,
            "",
            id="patient-stripped",
        ),
        pytest.param(
            lambda: [delivery(2, T0), delivery(9, T0)],
            "unresolved_folders",
            "DICOM_BEAM_NUMBER 9",
            id="unknown-beam",
        ),
        pytest.param(
            lambda: [delivery(1, T0), delivery(2, T0)],
            "unresolved_folders",
            "setup beam",
            id="setup-beam",
        ),
        pytest.param(
            lambda: [
                DeliveryInput(path="/s/2025010109300000", planinfo_text=None, has_ptn=True),
                delivery(2, T0),
            ],
            "unresolved_folders",
            "no PlanInfo.txt",
            id="no-planinfo",
        ),
        pytest.param(
            lambda: [DeliveryInput(path="/s/x", planinfo_text="DICOM_BEAM_NUMBER,2", has_ptn=True)],
            "planinfo_invalid",
            "x: missing or empty DICOM_PATIENT_ID",
            id="planinfo",
        ),
        pytest.param(
            lambda: [
                DeliveryInput(path="/s/beam_2", planinfo_text=planinfo(2, None), has_ptn=True)
            ],
            "missing_delivery_timestamp",
            "'beam_2'",
            id="timestamp",
        ),
    ],
)
def test_resolve_failures(make_inputs: object, code: str | None, fragment: str) -> None:
    plan = make_plan((2, 3), setup=(1,))
    assert callable(make_inputs)
    inputs: list[DeliveryInput] = make_inputs()
    if code is None:
        assert isinstance(resolve_case(plan, inputs, now=T0 + 2 * HOUR), CaseResolution)
        return
    error = expect_code(code, plan, inputs, T0 + 2 * HOUR)
    assert fragment in error.detail


def test_failures_name_every_offending_folder() -> None:
    plan = make_plan((2, 3))
    inputs = [delivery(7, T0, folder="A7"), delivery(8, T0, folder="B8"), delivery(2, T0)]
    error = expect_code("unresolved_folders", plan, inputs, T0 + 2 * HOUR)
    assert "A7" in error.detail and "B8" in error.detail


def test_zero_expected_beams() -> None:
    plan = make_plan((), setup=(1,))
    expect_code("zero_expected_beams", plan, [delivery(1, T0)], T0 + 2 * HOUR)


def test_folders_without_planinfo_are_inferred() -> None:
    plan = make_plan((2, 3))
    inputs = [
        DeliveryInput(path=f"/s/{stamp(T0)}_2", planinfo_text=None, has_ptn=True),
        DeliveryInput(path=f"/s/{stamp(T0 + HOUR / 10)}_3", planinfo_text=None, has_ptn=True),
    ]
    result = resolve_case(plan, inputs, now=T0 + 2 * HOUR)
    assert isinstance(result, CaseResolution)
    assert [b.beam_number for b in result.beams] == [2, 3]


@pytest.mark.parametrize(
    ("folder", "number"),
    [
        ("2025010109300000_3", 3),
        ("field-2", 2),
        ("2025010109300000_9", None),
        ("2025010109300000 2G180", 3),
        ("1g090", 2),
        ("2025010109300000", None),
        ("", None),
    ],
)
def test_infer_beam_number(folder: str, number: int | None) -> None:
    assert infer_beam_number(folder, make_plan((2, 3))) == number


def test_patient_id_mismatch_names_the_folder_but_no_patient_id() -> None:
    plan = make_plan((2, 3))
    inputs = [delivery(2, T0), delivery(3, T0 + HOUR / 10, patient="OTHER9")]
    error = expect_code("patient_id_mismatch", plan, inputs, T0 + 2 * HOUR)
    assert stamp(T0 + HOUR / 10) in str(error)
    assert "OTHER9" not in str(error) and PATIENT not in str(error)
