"""RTPLAN parsing: beams, setup beams, layers, gantry, identity, broken and foreign files."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from mqi_async.demo.cases import CaseSpec, build_ion_plan, build_other_dicom, write_case
from mqi_async.domain.errors import IngestError
from mqi_async.domain.plan import (
    find_rtplan_candidates,
    gantry_number,
    is_setup_beam,
    parse_rtplan,
    read_rtplan,
    select_rtplan,
)

STUDY = "1.2.826.0.1.3680043.8.498.1"


def encode(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def plan_bytes(**spec: object) -> bytes:
    return encode(build_ion_plan(CaseSpec(**spec), study_uid=STUDY))  # type: ignore[arg-type]


def expect_code(code: str, data: bytes) -> IngestError:
    with pytest.raises(IngestError) as caught:
        parse_rtplan(data, source="RP.test.dcm")
    assert caught.value.code == code, caught.value
    return caught.value


@pytest.mark.parametrize(
    ("machine", "gantry"),
    [
        ("G1", 1),
        ("G2", 2),
        ("GTR1", 1),
        ("GTR2", 2),
        ("gtr2", 2),
        ("G_2", 2),
        ("G-1", 1),
        ("Gantry2", 2),
        ("GANTRY 1", 1),
        ("SMC_G2", 2),
        ("G1 ", 1),
        ("GTR12", None),
        ("G3", None),
        ("G21", None),
        ("unit001", None),
        ("TR1", None),
        ("", None),
        ("G1_G2", None),
        ("GTR1/GTR2", None),
        ("PROTON_ROOM_3", None),
    ],
)
def test_gantry_number(machine: str, gantry: int | None) -> None:
    assert gantry_number(machine) == gantry


@pytest.mark.parametrize(
    ("name", "description", "delivery", "setup"),
    [
        ("SETUP", "", "TREATMENT", True),
        ("Setup", "", "", True),
        ("setup ", "", "", True),
        ("1G090", "Site Setup", "TREATMENT", True),
        ("kV", "", "SETUP", True),
        ("1G090", "field 1", "TREATMENT", False),
        ("Setup field 2", "", "TREATMENT", False),
    ],
)
def test_is_setup_beam(name: str, description: str, delivery: str, setup: bool) -> None:
    assert is_setup_beam(name, description, delivery) is setup


def test_generated_plan_skips_setup_beam_and_numbers_treatment_beams() -> None:
    plan = parse_rtplan(plan_bytes(beams=3, layers_per_beam=2, room="G2"), source="RP.x.dcm")
    assert plan.setup_beam_numbers == (1,)
    assert [(b.beam_number, b.treatment_index, b.plan_position) for b in plan.beams] == [
        (2, 1, 2),
        (3, 2, 3),
        (4, 3, 4),
    ]
    assert [b.beam_name for b in plan.beams] == ["1G090", "2G180", "3G270"]
    assert all(b.layer_energies_mev == (110.0, 108.0) for b in plan.beams)
    assert all(b.layer_count == 2 and b.control_point_count == 4 for b in plan.beams)
    assert (plan.machine_name, plan.gantry) == ("GTR2", 2)
    assert plan.beam_by_number(3) is plan.beams[1]
    assert plan.beam_by_number(1) is None


def test_plan_keeps_identity_for_rt_dose_writer() -> None:
    spec = CaseSpec(case_id="PAT 7", setup_beam=False)
    ds = build_ion_plan(spec, study_uid=STUDY)
    ds.AccessionNumber = "ACC1"
    ds.PatientBirthDate = "19700101"
    plan = parse_rtplan(encode(ds))
    assert plan.patient_id == "PAT 7"
    assert plan.patient_name == "Synthetic^PAT 7"
    assert plan.patient_birth_date == "19700101"
    assert plan.patient_sex == "O"
    assert plan.study_instance_uid == STUDY
    assert plan.sop_class_uid == "1.2.840.10008.5.1.4.1.1.481.8"
    assert plan.sop_instance_uid == ds.SOPInstanceUID
    assert plan.frame_of_reference_uid == ds.FrameOfReferenceUID
    assert (plan.study_date, plan.study_time, plan.study_id) == ("20250106", "080000", "1")
    assert (plan.accession_number, plan.referring_physician_name) == ("ACC1", "")
    assert plan.setup_beam_numbers == ()
    assert plan.beams[0].beam_number == 1


def test_absent_identity_attributes_are_empty_strings() -> None:
    ds = build_ion_plan(CaseSpec(), study_uid=STUDY)
    del ds.AccessionNumber
    del ds.PatientBirthDate
    plan = parse_rtplan(encode(ds))
    assert (plan.accession_number, plan.patient_birth_date) == ("", "")


@pytest.mark.parametrize(
    ("name", "description", "delivery"),
    [("Setup", "", "TREATMENT"), ("kV imaging", "Site Setup", "TREATMENT"), ("X", "", "SETUP")],
)
def test_setup_beam_spellings_are_skipped(name: str, description: str, delivery: str) -> None:
    ds = build_ion_plan(CaseSpec(beams=2), study_uid=STUDY)
    setup = ds.IonBeamSequence[0]
    setup.BeamName, setup.BeamDescription, setup.TreatmentDeliveryType = name, description, delivery
    plan = parse_rtplan(encode(ds))
    assert plan.setup_beam_numbers == (1,)
    assert [b.treatment_index for b in plan.beams] == [1, 2]


def test_layers_follow_energy_changes() -> None:
    ds = build_ion_plan(CaseSpec(setup_beam=False, beams=1, layers_per_beam=3), study_uid=STUDY)
    points = ds.IonBeamSequence[0].IonControlPointSequence
    for cp in points[1::2]:
        del cp.NominalBeamEnergy  # only required where the energy changes
    plan = parse_rtplan(encode(ds))
    assert plan.beams[0].layer_energies_mev == (110.0, 108.0, 106.0)


@pytest.mark.parametrize(
    ("machines", "code"),
    [
        (("G1", "GTR1"), None),
        (("G1", "GTR2"), "unknown_machine"),
        (("G1", "PROTON"), "unknown_machine"),
        (("G1G2", "G1G2"), "unknown_machine"),
    ],
)
def test_treatment_beams_must_agree_on_the_gantry(
    machines: tuple[str, str], code: str | None
) -> None:
    ds = build_ion_plan(CaseSpec(beams=2), study_uid=STUDY)
    ds.IonBeamSequence[0].TreatmentMachineName = "SETUP ROOM"  # setup beams do not count
    for beam, machine in zip(ds.IonBeamSequence[1:], machines, strict=True):
        beam.TreatmentMachineName = machine
    if code is None:
        assert parse_rtplan(encode(ds)).gantry == 1
    else:
        assert machines[1] in str(expect_code(code, encode(ds)))


def test_only_setup_beams_is_zero_expected_beams() -> None:
    ds = build_ion_plan(CaseSpec(beams=1), study_uid=STUDY)
    del ds.IonBeamSequence[1]
    expect_code("zero_expected_beams", encode(ds))


def test_pydicom_photon_plan_is_not_ion_plan() -> None:
    path = get_testdata_file("rtplan.dcm")
    assert isinstance(path, str)
    with pytest.raises(IngestError) as caught:
        read_rtplan(path)
    assert caught.value.code == "not_ion_plan"
    assert "PHOTON" in caught.value.detail


def test_pydicom_truncated_plan_fails_to_parse() -> None:
    path = get_testdata_file("rtplan_truncated.dcm")
    assert isinstance(path, str)
    with pytest.raises(IngestError) as caught:
        read_rtplan(path)
    assert caught.value.code == "rtplan_parse_failed"


@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.97, 0.995])
def test_truncated_generated_plan_fails_to_parse(fraction: float) -> None:
    data = plan_bytes(beams=2, layers_per_beam=2)
    expect_code("rtplan_parse_failed", data[: int(len(data) * fraction)])


def test_every_short_cut_of_the_file_end_fails() -> None:
    data = plan_bytes(beams=1, layers_per_beam=1)
    for cut in range(1, 40):
        expect_code("rtplan_parse_failed", data[:-cut])


@pytest.mark.parametrize(
    "data", [b"", b"not dicom at all", b"\x00" * 400, b"\x00" * 128 + b"DICM" + b"\x02\x00"]
)
def test_non_dicom_bytes_fail_to_parse(data: bytes) -> None:
    expect_code("rtplan_parse_failed", data)


def test_other_modality_is_not_a_plan() -> None:
    ds = build_other_dicom(CaseSpec(), study_uid=STUDY)
    assert "'CT'" in expect_code("missing_rtplan", encode(ds)).detail


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["RP.1.2.dcm", "PlanInfo.txt", "_CASE_READY"], ["RP.1.2.dcm"]),
        (
            ["CT.1.dcm", "RP.1.dcm", "b.DICOM", "x.dicom"],
            ["RP.1.dcm", "CT.1.dcm", "b.DICOM", "x.dicom"],
        ),
        (
            ["my_rtplan.bin", "notes_plan.txt", "PLAN.raw", "Plan.txt"],
            ["my_rtplan.bin", "PLAN.raw", "notes_plan.txt"],
        ),
        (["sub/RP.2.dcm", "a.dcm"], ["a.dcm", "sub/RP.2.dcm"]),
        (["a/b/RP.3.dcm", "readme.md", "PlanInfo.txt"], []),
        (["x.DCM", "y.Dicom"], ["x.DCM", "y.Dicom"]),
    ],
)
def test_find_rtplan_candidates(names: list[str], expected: list[str]) -> None:
    assert find_rtplan_candidates(names) == expected


def test_select_rtplan_skips_non_plans_and_takes_the_first_plan() -> None:
    other = encode(build_other_dicom(CaseSpec(), study_uid=STUDY))
    plan = plan_bytes(case_id="P1")
    second = plan_bytes(case_id="P2")
    chosen = select_rtplan(
        [("CT.dcm", other), ("notes_plan.txt", b"hello"), ("RP.a.dcm", plan), ("RP.b.dcm", second)]
    )
    assert (chosen.patient_id, chosen.source) == ("P1", "RP.a.dcm")


@pytest.mark.parametrize(
    ("candidates", "code"),
    [
        ([], "missing_rtplan"),
        ([("plan_notes.txt", b"not dicom")], "missing_rtplan"),
        ([("RP.x.dcm", b"not dicom")], "rtplan_parse_failed"),
    ],
)
def test_select_rtplan_failures(candidates: list[tuple[str, bytes]], code: str) -> None:
    with pytest.raises(IngestError) as caught:
        select_rtplan(candidates)
    assert caught.value.code == code


def test_select_rtplan_prefers_a_readable_plan_over_a_broken_file() -> None:
    good = plan_bytes()
    chosen = select_rtplan([("RP.broken.dcm", good[:300]), ("RP.good.dcm", good)])
    assert chosen.source == "RP.good.dcm"
    with pytest.raises(IngestError) as caught:
        select_rtplan([("RP.broken.dcm", good[:300])])
    assert caught.value.code == "rtplan_parse_failed"
    assert "RP.broken.dcm" in caught.value.detail


def test_select_rtplan_first_plan_decides() -> None:
    photon = get_testdata_file("rtplan.dcm")
    assert isinstance(photon, str)
    with pytest.raises(IngestError) as caught:
        select_rtplan([("RP.photon.dcm", Path(photon).read_bytes()), ("RP.ion.dcm", plan_bytes())])
    assert caught.value.code == "not_ion_plan"


def _dciodvfy() -> str | None:
    beside = Path(sys.executable).with_name("dciodvfy")
    return str(beside) if beside.exists() else shutil.which("dciodvfy")


def test_generated_plan_passes_dciodvfy(tmp_path: Path) -> None:
    tool = _dciodvfy()
    if tool is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    case = write_case(tmp_path, CaseSpec(beams=2, layers_per_beam=2))
    assert case.rtplan_path is not None
    result = subprocess.run(
        [tool, str(case.rtplan_path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (result.stdout + result.stderr).splitlines()
    assert "RTIonPlan" in lines
    assert [line for line in lines if line.startswith("Error")] == []
