"""RT Dose files read into a dose in Gy on a (z, y, x) grid with patient coordinates in mm.

- values: stored pixels x DoseGridScaling (DoseUnits GY; CGY is divided by 100);
- x, y: ImagePositionPatient (the centre of the first voxel) plus column/row index times
  PixelSpacing, which is [row spacing = dy, column spacing = dx], along
  ImageOrientationPatient's direction cosines;
- z: GridFrameOffsetVector, relative to ImagePositionPatient when its first value is 0,
  otherwise the frames' z coordinates themselves (both forms are in use).

Only axial grids are read: rows and columns along the patient x and y axes, in any sign or
order (feet-first and prone exports too); anything else is `unsupported_orientation`.
Axes may come out decreasing; the gamma core accepts that.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.errors import InvalidDicomError

from mqi_async.domain.errors import PermanentError

RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
_COS_TOL = 1e-4


@dataclass(frozen=True, slots=True)
class DoseGrid:
    """A dose in Gy, shape (nz, ny, nx), with its voxel-centre coordinates in mm."""

    dose: NDArray[np.float64]
    z: NDArray[np.float64]
    y: NDArray[np.float64]
    x: NDArray[np.float64]
    frame_of_reference_uid: str
    path: str = ""
    units: str = "GY"

    @property
    def axes(self) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
        return (self.z, self.y, self.x)

    @property
    def shape(self) -> tuple[int, int, int]:
        nz, ny, nx = self.dose.shape
        return (nz, ny, nx)

    def bounds(self) -> tuple[tuple[float, float], ...]:
        """(low, high) coordinate of the voxel centres along z, y and x."""
        return tuple((float(a.min()), float(a.max())) for a in self.axes)


def _unreadable(path: str, why: str) -> PermanentError:
    return PermanentError("dose_unreadable", f"{path}: {why}")


def _floats(ds: pydicom.Dataset, keyword: str, count: int | None, path: str) -> list[float]:
    value = ds.get(keyword)
    if value is None:
        raise _unreadable(path, f"no {keyword}")
    many = hasattr(value, "__iter__") and not isinstance(value, (str, bytes))
    try:
        items = [float(v) for v in (value if many else [value])]
    except (TypeError, ValueError) as exc:
        raise _unreadable(path, f"{keyword} is not numeric ({value!r})") from exc
    if count is not None and len(items) != count:
        raise _unreadable(path, f"{keyword} has {len(items)} values, not {count}")
    if not all(math.isfinite(v) for v in items):
        raise _unreadable(path, f"{keyword} holds non-finite values")
    return items


def _axis_of(cosines: list[float]) -> tuple[int, float] | None:
    """(patient axis 0=x 1=y 2=z, sign) of a direction cosine along a patient axis, else None."""
    for axis in range(3):
        others = [abs(c) for k, c in enumerate(cosines) if k != axis]
        if abs(abs(cosines[axis]) - 1.0) <= _COS_TOL and max(others) <= _COS_TOL:
            return axis, math.copysign(1.0, cosines[axis])
    return None


def read_rt_dose(path: str | os.PathLike[str]) -> DoseGrid:
    """Read an RT Dose file. Raises PermanentError `dose_unreadable` or
    `unsupported_orientation`."""
    p = str(path)
    if not Path(p).is_file():
        raise _unreadable(p, "no such file")
    try:
        ds = pydicom.dcmread(p)
    except (OSError, InvalidDicomError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise _unreadable(p, f"not readable DICOM ({exc})") from exc
    sop_class = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", ""))
    if sop_class != RT_DOSE_STORAGE and modality != "RTDOSE":
        raise _unreadable(p, f"not an RT Dose (Modality {modality or 'none'!r})")
    if "PixelData" not in ds:
        raise _unreadable(p, "no pixel data")

    orientation = _floats(ds, "ImageOrientationPatient", 6, p)
    row_axis = _axis_of(orientation[:3])  # direction of increasing column index
    col_axis = _axis_of(orientation[3:])  # direction of increasing row index
    if row_axis is None or col_axis is None or {row_axis[0], col_axis[0]} != {0, 1}:
        raise PermanentError(
            "unsupported_orientation",
            f"{p}: ImageOrientationPatient {orientation} is not an axial grid "
            "(rows and columns along the patient x and y axes)",
        )
    normal_sign = row_axis[1] * col_axis[1] * (1.0 if row_axis[0] == 0 else -1.0)

    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:  # pydicom raises many kinds for broken or unsupported pixel data
        raise _unreadable(p, f"pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    frames = int(ds.get("NumberOfFrames") or 1)
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if pixels.size != frames * rows * cols or pixels.size == 0:
        raise _unreadable(p, f"{pixels.size} pixels for {frames} x {rows} x {cols}")
    pixels = pixels.reshape(frames, rows, cols)

    scaling_raw = ds.get("DoseGridScaling", 1.0)
    try:
        scaling = float(scaling_raw)
    except (TypeError, ValueError) as exc:
        raise _unreadable(p, f"DoseGridScaling {scaling_raw!r} is not a number") from exc
    if not (math.isfinite(scaling) and scaling > 0):
        raise _unreadable(p, f"DoseGridScaling {scaling!r} is not a positive number")
    units = str(ds.get("DoseUnits", "GY") or "GY").upper()
    if units == "CGY":
        scaling /= 100.0
    dose = pixels.astype(np.float64) * scaling

    ipp = _floats(ds, "ImagePositionPatient", 3, p)
    dy, dx = _floats(ds, "PixelSpacing", 2, p)
    if not (dy > 0 and dx > 0):
        raise _unreadable(p, f"PixelSpacing [{dy}, {dx}] is not positive")
    along_cols = ipp[row_axis[0]] + row_axis[1] * dx * np.arange(cols)
    along_rows = ipp[col_axis[0]] + col_axis[1] * dy * np.arange(rows)

    if frames > 1 or "GridFrameOffsetVector" in ds:
        offsets = _floats(ds, "GridFrameOffsetVector", None, p)
        if len(offsets) != frames:
            raise _unreadable(
                p, f"GridFrameOffsetVector has {len(offsets)} values, {frames} frames"
            )
        off = np.asarray(offsets, dtype=np.float64)
        z = ipp[2] + normal_sign * off if offsets[0] == 0 else off
    else:
        z = np.asarray([ipp[2]])
    if frames > 1:
        steps = np.diff(z)
        if not (np.all(steps > 0) or np.all(steps < 0)):
            raise _unreadable(p, "GridFrameOffsetVector is not strictly monotonic")

    if row_axis[0] == 0:  # columns along x, rows along y: already (z, y, x)
        x, y = along_cols, along_rows
    else:  # columns along y, rows along x
        dose = np.ascontiguousarray(dose.transpose(0, 2, 1))
        x, y = along_rows, along_cols
    return DoseGrid(
        dose=dose,
        z=np.asarray(z, dtype=np.float64),
        y=np.asarray(y, dtype=np.float64),
        x=np.asarray(x, dtype=np.float64),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        path=p,
        units=units,
    )


def read_summed(paths: Sequence[str | os.PathLike[str]]) -> DoseGrid:
    """The sum of RT Doses on one grid (a plan's beams). Raises PermanentError
    `dose_unreadable`, or `dose_grids_differ` when the grids or frames of reference differ."""
    if not paths:
        raise PermanentError("dose_unreadable", "no dose file to sum")
    first = read_rt_dose(paths[0])
    total = first.dose.copy()
    for path in paths[1:]:
        grid = read_rt_dose(path)
        same_axes = grid.shape == first.shape and all(
            np.allclose(a, b, atol=1e-3) for a, b in zip(grid.axes, first.axes, strict=True)
        )
        if not same_axes or grid.frame_of_reference_uid != first.frame_of_reference_uid:
            raise PermanentError(
                "dose_grids_differ",
                f"{grid.path} is not on the grid (or in the frame of reference) of {first.path};"
                " beam doses on different grids cannot be summed",
            )
        total += grid.dose
    return DoseGrid(
        dose=total,
        z=first.z,
        y=first.y,
        x=first.x,
        frame_of_reference_uid=first.frame_of_reference_uid,
        path=" + ".join(str(p) for p in paths),
        units=first.units,
    )


@dataclass(frozen=True, slots=True)
class TpsDoses:
    """The planned RT Doses found for a plan: per DICOM BeamNumber, and the plan sum."""

    beams: dict[int, str]
    plan: str | None


def find_tps_doses(folder: str | os.PathLike[str], plan_uid: str) -> TpsDoses:
    """RT Dose files directly in `folder` or one level down that reference the plan.

    Only headers are read. A dose summed over the plan (DoseSummationType PLAN or FRACTION)
    is the plan sum; a BEAM dose belongs to the ReferencedBeamNumber it names.
    """
    beams: dict[int, str] = {}
    plan: str | None = None
    root = Path(folder)
    candidates = sorted([*root.glob("*"), *root.glob("*/*")], key=lambda p: (len(p.parts), str(p)))
    for path in candidates:
        if not path.is_file() or path.suffix.lower() not in (".dcm", ".dicom"):
            continue
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception:  # not DICOM, or damaged: not a dose for this check
            continue
        if str(ds.get("Modality", "")) != "RTDOSE":
            continue
        refs = [
            str(r.get("ReferencedSOPInstanceUID", ""))
            for r in ds.get("ReferencedRTPlanSequence") or []
        ]
        if plan_uid not in refs:
            continue
        summation = str(ds.get("DoseSummationType", "")).upper()
        if summation in ("PLAN", "FRACTION", "MULTI_PLAN"):
            plan = plan or str(path)
            continue
        for ref in ds.get("ReferencedRTPlanSequence") or []:
            for group in ref.get("ReferencedFractionGroupSequence") or []:
                for beam in group.get("ReferencedBeamSequence") or []:
                    number = beam.get("ReferencedBeamNumber")
                    if number is not None:
                        beams.setdefault(int(number), str(path))
    return TpsDoses(beams=beams, plan=plan)
