"""Raw dose -> RT Dose: values, geometry, plan references, dciodvfy, atomic writes, failures."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RTDoseStorage

from mqi_async.demo.cases import CaseSpec, build_ion_plan
from mqi_async.domain.errors import TransientError
from mqi_async.domain.tps import (
    TWO_CM_SLAB,
    TWO_CM_SLAB_ONE_SLICE,
    PhantomGrid,
    TpsComputed,
    render_tps_input,
)
from mqi_async.dose import (
    RT_ION_PLAN_STORAGE,
    PlanRef,
    build_rt_dose,
    convert_request,
    main,
    read_plan_ref,
    scaling_text,
    validate_rt_dose,
    write_rt_dose,
)

DCIODVFY = Path(sys.executable).parent / "dciodvfy"
# anisotropic on purpose, so a swapped row/column or x/y spacing shows
GRID = PhantomGrid(nx=20, ny=16, nz=10, dx=2.0, dy=3.0, dz=1.0, x0=-20.0, y0=-24.0, z0=-5.0)


def gaussian_dose(grid: PhantomGrid, peak: float = 1.8) -> np.ndarray:
    """A simulator-style dose: a smooth blob in Gy, (nz, ny, nx)."""
    z = grid.z0 + (np.arange(grid.nz) + 0.5) * grid.dz
    y = grid.y0 + (np.arange(grid.ny) + 0.5) * grid.dy
    x = grid.x0 + (np.arange(grid.nx) + 0.5) * grid.dx
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    r2 = ((xx - 3) / 9) ** 2 + ((yy + 2) / 11) ** 2 + ((zz - 1) / 3) ** 2
    return np.asarray(peak * np.exp(-0.5 * r2), dtype="<f8")


def write_raw(path: Path, dose: np.ndarray) -> Path:
    path.write_bytes(dose.astype("<f8").tobytes())
    return path


@pytest.fixture
def plan_path(tmp_path: Path) -> Path:
    ds = build_ion_plan(CaseSpec(case_id="P123", seed=7), study_uid="1.2.826.0.1.3680043.8.498.77")
    ds.PatientBirthDate = "19700101"
    ds.StudyID = "S1"
    ds.AccessionNumber = "ACC9"
    ds.ReferringPhysicianName = "Doe^Jane"
    (tmp_path / "plan").mkdir()
    path = tmp_path / "plan" / "RP.test.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


@pytest.fixture
def plan(plan_path: Path) -> PlanRef:
    return read_plan_ref(plan_path)


def dciodvfy_errors(path: Path) -> list[str]:
    if not DCIODVFY.exists():
        pytest.skip("dciodvfy (dicom3tools) is not installed in this environment")
    done = subprocess.run(
        [str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (done.stdout + done.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def test_values_round_trip_within_16_bit_quantisation(tmp_path: Path, plan: PlanRef) -> None:
    dose = gaussian_dose(GRID)
    out = write_rt_dose(
        write_raw(tmp_path / "B_1_Dose.raw", dose),
        tmp_path / "dose.dcm",
        grid=GRID,
        plan=plan,
        beam_number=2,
    )
    ds = pydicom.dcmread(out)
    back = ds.pixel_array * float(ds.DoseGridScaling)
    assert back.shape == (GRID.nz, GRID.ny, GRID.nx)
    step = float(ds.DoseGridScaling)
    assert step >= dose.max() / 65535
    assert step <= dose.max() / 65535 * (1 + 1e-9)
    assert np.abs(back - dose).max() <= dose.max() / 65535 + 1e-12
    assert np.abs(back - dose).max() <= step / 2 + 1e-12
    assert int(ds.pixel_array.max()) == 65535  # the brightest voxel uses the full range
    assert len(str(ds.DoseGridScaling.original_string or ds.DoseGridScaling)) <= 16


def test_geometry_and_rt_dose_attributes(tmp_path: Path, plan: PlanRef, plan_path: Path) -> None:
    when = datetime(2026, 3, 4, 5, 6, 7)
    out = write_rt_dose(
        write_raw(tmp_path / "r.raw", gaussian_dose(GRID)),
        tmp_path / "d.dcm",
        grid=GRID,
        plan=plan,
        beam_number=3,
        sop_instance_uid="1.2.3.4",
        series_instance_uid="1.2.3.5",
        created_at=when,
    )
    ds = pydicom.dcmread(out)
    assert ds.file_meta.MediaStorageSOPClassUID == RTDoseStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == RTDoseStorage and ds.SOPInstanceUID == "1.2.3.4"
    assert ds.SeriesInstanceUID == "1.2.3.5"
    assert ds.Modality == "RTDOSE"
    # geometry: IPP = lower edge + half a voxel; PixelSpacing = [dy, dx]; offsets from 0
    assert [float(v) for v in ds.ImagePositionPatient] == [-19.0, -22.5, -4.5]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ds.PixelSpacing] == [3.0, 2.0]
    assert float(ds.SliceThickness) == 1.0
    assert [float(v) for v in ds.GridFrameOffsetVector] == [float(k) for k in range(10)]
    assert (ds.Rows, ds.Columns, int(ds.NumberOfFrames)) == (16, 20, 10)
    assert ds.FrameIncrementPointer == 0x3004000C
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 0)
    assert ds.SamplesPerPixel == 1 and ds.PhotometricInterpretation == "MONOCHROME2"
    assert (ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == ("GY", "PHYSICAL", "BEAM")
    # the plan reference, down to the beam
    (ref,) = ds.ReferencedRTPlanSequence
    assert ref.ReferencedSOPClassUID == RT_ION_PLAN_STORAGE
    assert ref.ReferencedSOPInstanceUID == plan.sop_instance_uid
    (group,) = ref.ReferencedFractionGroupSequence
    assert group.ReferencedFractionGroupNumber == 1
    assert [b.ReferencedBeamNumber for b in group.ReferencedBeamSequence] == [3]
    # patient, study and frame of reference come from the plan
    source = pydicom.dcmread(plan_path)
    for keyword in (
        "PatientID",
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "ReferringPhysicianName",
        "AccessionNumber",
        "FrameOfReferenceUID",
    ):
        assert str(ds.get(keyword)) == str(source.get(keyword)), keyword
    assert ds.PatientID == "P123"
    assert ds.OperatorsName == ""
    assert ds.ContentDate == "20260304" and ds.ContentTime == "050607"


def test_dciodvfy_reports_no_errors(tmp_path: Path, plan: PlanRef) -> None:
    out = write_rt_dose(
        write_raw(tmp_path / "r.raw", gaussian_dose(GRID)),
        tmp_path / "d.dcm",
        grid=GRID,
        plan=plan,
        beam_number=2,
    )
    assert dciodvfy_errors(out) == []


def test_two_centimeter_slab_geometry(tmp_path: Path, plan: PlanRef) -> None:
    dose = gaussian_dose(TWO_CM_SLAB)
    out = write_rt_dose(
        write_raw(tmp_path / "r.raw", dose),
        tmp_path / "d.dcm",
        grid=TWO_CM_SLAB,
        plan=plan,
        beam_number=2,
    )
    ds = pydicom.dcmread(out)
    assert (ds.Rows, ds.Columns, int(ds.NumberOfFrames)) == (400, 400, 3)
    # DS values are at most 16 characters, so thirds of a millimetre are rounded there
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([-199.5, -199.5, -2 / 3])
    assert [float(v) for v in ds.GridFrameOffsetVector] == pytest.approx([0, 2 / 3, 4 / 3])
    assert all(len(v.original_string or str(v)) <= 16 for v in ds.GridFrameOffsetVector)
    back = ds.pixel_array * float(ds.DoseGridScaling)
    assert np.abs(back - dose).max() <= dose.max() / 65535 + 1e-12
    assert dciodvfy_errors(out) == []


def test_all_zero_dose_is_a_failed_run_not_an_rt_dose(tmp_path: Path, plan: PlanRef) -> None:
    # the public fork exits 0 with an all-zero raw file when every spot got 0 histories
    zero = np.zeros(GRID.shape)
    with pytest.raises(TransientError) as info:
        write_rt_dose(
            write_raw(tmp_path / "r.raw", zero),
            tmp_path / "d.dcm",
            grid=GRID,
            plan=plan,
            beam_number=2,
        )
    assert info.value.code == "empty_dose"
    assert info.value.kind == "permanent"
    assert not (tmp_path / "d.dcm").exists()
    # MOQUI's own DICOM of an all-zero dose is refused the same way
    ds = build_rt_dose(zero, grid=GRID, plan=plan, beam_number=2)
    assert float(ds.DoseGridScaling) > 0
    own = tmp_path / "own.dcm"
    pydicom.dcmwrite(own, ds, enforce_file_format=True)
    with pytest.raises(TransientError) as info:
        validate_rt_dose(own)
    assert info.value.code == "empty_dose"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_dose_is_named(tmp_path: Path, plan: PlanRef, bad: float) -> None:
    dose = gaussian_dose(GRID)
    dose[3, 4, 5] = bad
    with pytest.raises(TransientError) as info:
        write_rt_dose(
            write_raw(tmp_path / "r.raw", dose),
            tmp_path / "d.dcm",
            grid=GRID,
            plan=plan,
            beam_number=2,
        )
    assert info.value.code == "nonfinite_dose"
    assert "1 NaN or Inf value(s)" in info.value.detail
    _no_leftovers(tmp_path)


@pytest.mark.parametrize(
    "top", [2.0, 1.0, 1.8, 0.123456789, 1e-9, 3.3e-7, 65535.0, 1e6, 7.5e12, 5e-324, 1.7e308]
)
def test_scaling_is_a_short_ds_that_never_rounds_down(top: float) -> None:
    text = scaling_text(top)
    assert 0 < len(text) <= 16
    assert set(text) <= set("0123456789.e+-E")
    assert Decimal(text) * 65535 >= Decimal(top)
    if top > 1e-300:
        assert float(text) * 65535 <= top * (1 + 1e-8)


def test_scaling_of_zero_and_bad_maxima() -> None:
    assert scaling_text(0.0) == "1"
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError):
            scaling_text(bad)


def _no_leftovers(directory: Path) -> None:
    assert not list(directory.glob("*.dcm")), "no RT Dose for a bad input"
    assert not list(directory.glob("*.part")), "no partial file left behind"


def test_short_raw_is_short_output(tmp_path: Path, plan: PlanRef) -> None:
    raw = tmp_path / "r.raw"
    raw.write_bytes(gaussian_dose(GRID).tobytes()[: GRID.raw_bytes // 2])
    with pytest.raises(TransientError) as info:
        write_rt_dose(raw, tmp_path / "d.dcm", grid=GRID, plan=plan, beam_number=2)
    assert info.value.code == "short_output"
    _no_leftovers(tmp_path)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (lambda: gaussian_dose(GRID).tobytes() + b"\0" * 8, "dose_conversion_failed"),
        (lambda: np.full(GRID.shape, np.nan).tobytes(), "nonfinite_dose"),
        (lambda: (-gaussian_dose(GRID)).tobytes(), "dose_conversion_failed"),
        (None, "missing_output"),
    ],
    ids=["too_long", "nan", "negative", "missing"],
)
def test_bad_raw_files(tmp_path: Path, plan: PlanRef, payload: object, code: str) -> None:
    raw = tmp_path / "r.raw"
    if callable(payload):
        raw.write_bytes(payload())
    with pytest.raises(TransientError) as info:
        write_rt_dose(raw, tmp_path / "d.dcm", grid=GRID, plan=plan, beam_number=2)
    assert info.value.code == code
    _no_leftovers(tmp_path)


def test_a_failed_write_leaves_no_part_file(tmp_path: Path, plan: PlanRef) -> None:
    raw = write_raw(tmp_path / "r.raw", gaussian_dose(GRID))
    target = tmp_path / "taken.dcm"
    target.mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(TransientError) as info:
        write_rt_dose(raw, target, grid=GRID, plan=plan, beam_number=2)
    assert info.value.code == "dose_conversion_failed"
    assert not list(tmp_path.glob("*.part"))


def test_rewriting_replaces_the_file_atomically(tmp_path: Path, plan: PlanRef) -> None:
    raw = write_raw(tmp_path / "r.raw", gaussian_dose(GRID))
    out = tmp_path / "sub" / "d.dcm"
    write_rt_dose(raw, out, grid=GRID, plan=plan, beam_number=2, sop_instance_uid="1.2.3")
    write_rt_dose(raw, out, grid=GRID, plan=plan, beam_number=2, sop_instance_uid="1.2.4")
    assert pydicom.dcmread(out).SOPInstanceUID == "1.2.4"
    assert sorted(p.name for p in out.parent.iterdir()) == ["d.dcm"]


def test_validate_accepts_a_good_rt_dose(tmp_path: Path, plan: PlanRef) -> None:
    out = write_rt_dose(
        write_raw(tmp_path / "r.raw", gaussian_dose(GRID)),
        tmp_path / "d.dcm",
        grid=GRID,
        plan=plan,
        beam_number=2,
    )
    validate_rt_dose(out)
    validate_rt_dose(out, plan_sop_uid=plan.sop_instance_uid)
    with pytest.raises(TransientError, match="references plan") as info:
        validate_rt_dose(out, plan_sop_uid="9.9.9")
    assert info.value.code == "dicom_invalid"


def test_validate_rejects_bad_files(tmp_path: Path, plan: PlanRef, plan_path: Path) -> None:
    out = write_rt_dose(
        write_raw(tmp_path / "r.raw", gaussian_dose(GRID)),
        tmp_path / "d.dcm",
        grid=GRID,
        plan=plan,
        beam_number=2,
    )
    ds = pydicom.dcmread(out)
    ds.DoseGridScaling = "0"  # what an early MOQUI dcm writer produced
    zero_scaling = tmp_path / "zero.dcm"
    ds.save_as(zero_scaling, enforce_file_format=True)
    ds = pydicom.dcmread(out)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
    cut = tmp_path / "cut.dcm"
    ds.save_as(cut, enforce_file_format=True)
    text = tmp_path / "text.dcm"
    text.write_text("not DICOM at all")
    for bad in (zero_scaling, cut, text, plan_path):
        with pytest.raises(TransientError) as info:
            validate_rt_dose(bad)
        assert info.value.code == "dicom_invalid", bad.name
    with pytest.raises(TransientError) as missing:
        validate_rt_dose(tmp_path / "absent.dcm")
    assert missing.value.code == "missing_output"


STATIC = {
    "UseAbsolutePath": True,
    "UsingPhantomGeo": True,
    "PhantomDimX": 20,
    "PhantomDimY": 16,
    "PhantomDimZ": 10,
    "PhantomUnitX": 2,
    "PhantomUnitY": 3,
    "PhantomUnitZ": 1,
    "PhantomPositionX": -20.0,
    "PhantomPositionY": -24,
    "PhantomPositionZ": -5,
    "Scorer": "Dose",
}


def _tps_file(tmp_path: Path, **extra: object) -> Path:
    computed = TpsComputed(
        gpu_id=0,
        parent_dir="/r/csv",
        dicom_dir="/r/csv/plan",
        log_dir="/r/csv/log",
        output_dir="/r/out",
        beam_number=2,
        gantry=1,
    )
    path = tmp_path / "moqui_tps.in"
    path.write_text(render_tps_input({**STATIC, **extra}, computed))  # type: ignore[dict-item]
    return path


@pytest.mark.parametrize(
    ("grid", "frames", "ipp_z", "offsets"),
    [
        (TWO_CM_SLAB, 3, -2 / 3, [0, 2 / 3, 4 / 3]),
        (TWO_CM_SLAB_ONE_SLICE, 1, 0.0, [0.0]),
    ],
    ids=["clinic_3_slices", "public_fork_1_slice"],
)
def test_slab_geometry_follows_the_raw_file(
    tmp_path: Path,
    plan_path: Path,
    grid: PhantomGrid,
    frames: int,
    ipp_z: float,
    offsets: list[float],
) -> None:
    dose = gaussian_dose(grid)
    raw = write_raw(tmp_path / "B_2_Dose.raw", dose)
    out = tmp_path / "d.dcm"
    request: dict[str, object] = {
        # OutputFormat dcm asks to validate; a build without dcm wrote .raw: it is converted
        "op": "validate",
        "input": str(raw),
        "output": str(out),
        "tps": str(_tps_file(tmp_path, TwoCentimeterMode=True, OutputFormat="dcm")),
        "plan": str(plan_path),
        "beam_number": 2,
    }
    assert convert_request(request) == str(out)
    ds = pydicom.dcmread(out)
    assert (ds.Rows, ds.Columns, int(ds.NumberOfFrames)) == (400, 400, frames)
    assert float(ds.ImagePositionPatient[2]) == pytest.approx(ipp_z)
    assert float(ds.SliceThickness) == pytest.approx(grid.dz)
    vector = ds.GridFrameOffsetVector  # one value reads back as a scalar
    values = list(vector) if frames > 1 else [vector]
    assert [float(v) for v in values] == pytest.approx(offsets)
    back = ds.pixel_array * float(ds.DoseGridScaling)
    assert np.abs(back - dose).max() <= dose.max() / 65535 + 1e-12


def test_cli_converts_with_the_geometry_of_the_tps_file(
    tmp_path: Path, plan_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dose = gaussian_dose(GRID)
    raw = write_raw(tmp_path / "r.raw", dose)
    out = tmp_path / "out" / "d.dcm"
    argv = ["--input", str(raw), "--output", str(out), "--tps", str(_tps_file(tmp_path))]
    argv += ["--plan", str(plan_path), "--beam-number", "2"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out)
    ds = pydicom.dcmread(out)
    assert [float(v) for v in ds.PixelSpacing] == [3.0, 2.0]
    assert np.abs(ds.pixel_array * float(ds.DoseGridScaling) - dose).max() <= dose.max() / 65535


def test_cli_reports_named_failures(
    tmp_path: Path, plan_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "r.raw"
    raw.write_bytes(b"\0" * 80)
    argv = ["--input", str(raw), "--output", str(tmp_path / "d.dcm")]
    argv += ["--tps", str(_tps_file(tmp_path)), "--plan", str(plan_path), "--beam-number", "2"]
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith("short_output: ")
    bad_tps = tmp_path / "bad.in"
    bad_tps.write_text("GPUID 0\n \n")
    argv[5] = str(bad_tps)
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith("dose_conversion_failed: ")


def test_cli_runs_as_a_module(tmp_path: Path, plan_path: Path) -> None:
    raw = write_raw(tmp_path / "r.raw", gaussian_dose(GRID))
    out = tmp_path / "d.dcm"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mqi_async.dose",
            "--input",
            str(raw),
            "--output",
            str(out),
            "--tps",
            str(_tps_file(tmp_path)),
            "--plan",
            str(plan_path),
            "--beam-number",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    validate_rt_dose(out, plan_sop_uid=read_plan_ref(plan_path).sop_instance_uid)


def test_read_plan_ref_of_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "RP.dcm"
    broken.write_bytes(b"junk")
    with pytest.raises(TransientError) as info:
        read_plan_ref(broken)
    assert info.value.code == "dose_conversion_failed"
