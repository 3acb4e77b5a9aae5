"""RT Dose files read into Gy on (z, y, x) with patient coordinates; broken files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from mqi_async.domain.errors import PermanentError
from mqi_async.domain.tps import PhantomGrid
from mqi_async.dose import PlanRef, build_rt_dose
from mqi_async.qa.rtdose import read_rt_dose

FOR_UID = "1.2.826.0.1.3680043.8.498.1001"
PLAN = PlanRef(
    sop_instance_uid="1.2.826.0.1.3680043.8.498.1002",
    study_instance_uid="1.2.826.0.1.3680043.8.498.1003",
    patient_id="QA1",
    frame_of_reference_uid=FOR_UID,
)
# anisotropic on purpose, so a swapped row/column or x/y spacing shows
GRID = PhantomGrid(nx=12, ny=9, nz=5, dx=2.0, dy=3.0, dz=2.5, x0=-12.0, y0=-13.5, z0=-6.25)


def grid_centres(grid: PhantomGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z0, y0, x0 = grid.first_voxel_centre[2], grid.first_voxel_centre[1], grid.first_voxel_centre[0]
    return (
        z0 + grid.dz * np.arange(grid.nz),
        y0 + grid.dy * np.arange(grid.ny),
        x0 + grid.dx * np.arange(grid.nx),
    )


def write_dose(
    path: Path,
    dose: np.ndarray,
    grid: PhantomGrid = GRID,
    *,
    frame_of_reference: str = FOR_UID,
    **attributes: object,
) -> Path:
    """An RT Dose file written by the service's own writer, attributes overridden."""
    plan = PlanRef(
        sop_instance_uid=PLAN.sop_instance_uid,
        study_instance_uid=PLAN.study_instance_uid,
        patient_id=PLAN.patient_id,
        frame_of_reference_uid=frame_of_reference,
    )
    ds = build_rt_dose(dose, grid=grid, plan=plan, beam_number=1)
    for key, value in attributes.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def sample_dose(grid: PhantomGrid = GRID) -> np.ndarray:
    z, y, x = grid_centres(grid)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return 2.0 * np.exp(-0.5 * ((xx - 3) ** 2 / 40 + (yy + 2) ** 2 / 60 + zz**2 / 20))


def test_values_and_coordinates(tmp_path: Path) -> None:
    dose = sample_dose()
    got = read_rt_dose(write_dose(tmp_path / "d.dcm", dose))
    assert got.dose.shape == (GRID.nz, GRID.ny, GRID.nx)
    np.testing.assert_allclose(got.dose, dose, atol=dose.max() / 65535)
    z, y, x = grid_centres(GRID)
    np.testing.assert_allclose(got.x, x)
    np.testing.assert_allclose(got.y, y)
    np.testing.assert_allclose(got.z, z)
    assert got.frame_of_reference_uid == FOR_UID


def test_absolute_frame_offsets(tmp_path: Path) -> None:
    z = grid_centres(GRID)[0]
    got = read_rt_dose(
        write_dose(tmp_path / "d.dcm", sample_dose(), GridFrameOffsetVector=[f"{v:g}" for v in z])
    )
    np.testing.assert_allclose(got.z, z)


def test_feet_first_orientation_reverses_axes(tmp_path: Path) -> None:
    """ImageOrientationPatient [-1,0,0,0,-1,0]: x and y decrease with column and row."""
    dose = sample_dose()
    ipp = [float(v) for v in GRID.first_voxel_centre]
    got = read_rt_dose(
        write_dose(tmp_path / "d.dcm", dose, ImageOrientationPatient=[-1, 0, 0, 0, -1, 0])
    )
    np.testing.assert_allclose(got.x, ipp[0] - GRID.dx * np.arange(GRID.nx))
    np.testing.assert_allclose(got.y, ipp[1] - GRID.dy * np.arange(GRID.ny))
    # the normal is still +z
    np.testing.assert_allclose(got.z, ipp[2] + GRID.dz * np.arange(GRID.nz))


def test_rows_along_x_are_transposed_to_z_y_x(tmp_path: Path) -> None:
    """ImageOrientationPatient [0,1,0,1,0,0]: columns run along y, rows along x."""
    dose = sample_dose()
    ipp = [float(v) for v in GRID.first_voxel_centre]
    got = read_rt_dose(
        write_dose(tmp_path / "d.dcm", dose, ImageOrientationPatient=[0, 1, 0, 1, 0, 0])
    )
    # stored (frames, rows, cols) = (nz, ny, nx) now means rows step x by dy, cols step y by dx
    assert got.dose.shape == (GRID.nz, GRID.nx, GRID.ny)
    np.testing.assert_allclose(got.dose, dose.transpose(0, 2, 1), atol=dose.max() / 65535)
    np.testing.assert_allclose(got.y, ipp[1] + GRID.dx * np.arange(GRID.nx))
    np.testing.assert_allclose(got.x, ipp[0] + GRID.dy * np.arange(GRID.ny))
    # row x col = y x x = -z: relative offsets run down
    np.testing.assert_allclose(got.z, ipp[2] - GRID.dz * np.arange(GRID.nz))


def test_centigray_is_converted(tmp_path: Path) -> None:
    dose = sample_dose()
    got = read_rt_dose(write_dose(tmp_path / "d.dcm", dose, DoseUnits="CGY"))
    np.testing.assert_allclose(got.dose, dose / 100, atol=dose.max() / 65535)


@pytest.mark.parametrize(
    "orientation",
    [[1, 0, 0, 0, 0, -1], [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0.7071, 0.7071]],
    ids=["coronal", "sagittal", "oblique"],
)
def test_non_axial_is_unsupported_orientation(tmp_path: Path, orientation: list[float]) -> None:
    path = write_dose(tmp_path / "d.dcm", sample_dose(), ImageOrientationPatient=orientation)
    with pytest.raises(PermanentError) as info:
        read_rt_dose(path)
    assert info.value.code == "unsupported_orientation"


def test_unreadable_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not dicom at all" * 10)
    plan_like = write_dose(tmp_path / "plan.dcm", sample_dose(), Modality="RTPLAN")
    ds = pydicom.dcmread(plan_like)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.8"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    pydicom.dcmwrite(plan_like, ds)
    no_pixels = write_dose(tmp_path / "nopix.dcm", sample_dose())
    ds = pydicom.dcmread(no_pixels)
    del ds.PixelData
    pydicom.dcmwrite(no_pixels, ds)
    bad_offsets = write_dose(tmp_path / "offsets.dcm", sample_dose(), GridFrameOffsetVector=[0, 1])
    for path, why in [
        (tmp_path / "missing.dcm", "no such file"),
        (garbage, "not readable DICOM"),
        (plan_like, "not an RT Dose"),
        (no_pixels, "no pixel data"),
        (bad_offsets, "GridFrameOffsetVector"),
    ]:
        with pytest.raises(PermanentError) as info:
            read_rt_dose(path)
        assert info.value.code == "dose_unreadable", path
        assert why in info.value.detail
        assert str(path) in info.value.detail
