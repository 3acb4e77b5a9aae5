"""RT Dose files: MOQUI's raw dose converted to DICOM RT Dose, and MOQUI's own DICOM checked."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, Decimal, localcontext
from pathlib import Path
from typing import Protocol, TextIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, RTDoseStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

from mqi_async.domain.errors import MqiError, TransientError
from mqi_async.domain.tps import (
    PhantomGrid,
    TpsParseAbort,
    grid_for_size,
    parse_tps_input,
    phantom_grid,
)
from mqi_async.qa.worker import (
    DELIVERY_OP,
    GAMMA_OP,
    answer_delivery_request,
    answer_gamma_request,
)

RT_ION_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.8"
MANUFACTURER = "mqi_async (MOQUI Monte Carlo)"
_U16_MAX = 65535
# (3004,000C) GridFrameOffsetVector: what the frames of a dose grid step along
_FRAME_INCREMENT_POINTER = Tag(0x3004, 0x000C)


class PlanIdentity(Protocol):
    """The RTPLAN strings an RT Dose copies ("" when absent); `domain.plan.Plan` has them."""

    @property
    def sop_instance_uid(self) -> str: ...
    @property
    def patient_id(self) -> str: ...
    @property
    def patient_name(self) -> str: ...
    @property
    def patient_birth_date(self) -> str: ...
    @property
    def patient_sex(self) -> str: ...
    @property
    def study_instance_uid(self) -> str: ...
    @property
    def study_date(self) -> str: ...
    @property
    def study_time(self) -> str: ...
    @property
    def study_id(self) -> str: ...
    @property
    def referring_physician_name(self) -> str: ...
    @property
    def accession_number(self) -> str: ...
    @property
    def frame_of_reference_uid(self) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanRef:
    """The RTPLAN attributes an RT Dose needs, read from the plan file."""

    sop_instance_uid: str
    study_instance_uid: str
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    study_id: str = ""
    referring_physician_name: str = ""
    accession_number: str = ""
    frame_of_reference_uid: str = ""

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PlanRef:
        def text(keyword: str) -> str:
            value = ds.get(keyword)
            return "" if value is None else str(value)

        return cls(
            sop_instance_uid=text("SOPInstanceUID"),
            study_instance_uid=text("StudyInstanceUID"),
            patient_id=text("PatientID"),
            patient_name=text("PatientName"),
            patient_birth_date=text("PatientBirthDate"),
            patient_sex=text("PatientSex"),
            study_date=text("StudyDate"),
            study_time=text("StudyTime"),
            study_id=text("StudyID"),
            referring_physician_name=text("ReferringPhysicianName"),
            accession_number=text("AccessionNumber"),
            frame_of_reference_uid=text("FrameOfReferenceUID"),
        )


def read_plan_ref(path: str | os.PathLike[str]) -> PlanRef:
    """The identity of the RTPLAN at path; `dose_conversion_failed` when it is unreadable."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError, ValueError) as exc:
        raise TransientError("dose_conversion_failed", f"cannot read RTPLAN {path}: {exc}") from exc
    if not ds.get("SOPInstanceUID"):
        raise TransientError("dose_conversion_failed", f"{path} has no SOPInstanceUID")
    return PlanRef.from_dataset(ds)


def scaling_text(max_value: float) -> str:
    """DoseGridScaling as a DS string (at most 16 characters) with max / scaling <= 65535.

    Rounded up, never down, so the brightest voxel still fits in 16 bits; an all-zero dose
    gets 1.
    """
    if not math.isfinite(max_value) or max_value < 0:
        raise ValueError(f"dose maximum {max_value!r} is not a finite value >= 0")
    if max_value == 0:
        return "1"
    with localcontext() as ctx:
        ctx.prec = 60
        ctx.rounding = ROUND_CEILING
        exact = Decimal(max_value) / Decimal(_U16_MAX)
    for digits in range(16, 0, -1):
        fitting = [
            text
            for text in (_ds_candidate(exact, digits, "e"), _ds_candidate(exact, digits, "f"))
            if len(text) <= 16
        ]
        if fitting:
            return min(fitting, key=Decimal)
    raise ValueError(f"cannot format a DoseGridScaling for {max_value!r}")  # pragma: no cover


def _ds_candidate(value: Decimal, digits: int, style: str) -> str:
    """value rounded up to `digits` significant digits, in scientific or fixed notation."""
    with localcontext() as ctx:
        ctx.prec = digits
        ctx.rounding = ROUND_CEILING
        rounded = +value
    if style == "e":
        mantissa, _, exponent = f"{rounded:.{digits - 1}e}".partition("e")
        return f"{mantissa}e{int(exponent)}"
    return format(rounded, "f")


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _raw_dose(raw_path: Path, grid: PhantomGrid) -> np.ndarray:
    try:
        size = raw_path.stat().st_size
    except FileNotFoundError as exc:
        raise TransientError("missing_output", f"{raw_path} does not exist") from exc
    except OSError as exc:
        raise TransientError("dose_conversion_failed", f"cannot read {raw_path}: {exc}") from exc
    if size < grid.raw_bytes:
        raise TransientError(
            "short_output",
            f"{raw_path.name} has {size} bytes; the {grid.nx}x{grid.ny}x{grid.nz} grid needs "
            f"{grid.raw_bytes}",
        )
    if size > grid.raw_bytes:
        raise TransientError(
            "dose_conversion_failed",
            f"{raw_path.name} has {size} bytes, more than the {grid.raw_bytes} of the "
            f"{grid.nx}x{grid.ny}x{grid.nz} grid: the geometry does not match the run",
        )
    try:
        dose = np.fromfile(raw_path, dtype="<f8", count=grid.voxel_count).reshape(grid.shape)
    except (OSError, ValueError) as exc:
        raise TransientError("dose_conversion_failed", f"cannot read {raw_path}: {exc}") from exc
    finite = np.isfinite(dose)
    if not np.all(finite):
        bad = int(dose.size - np.count_nonzero(finite))
        raise TransientError(
            "nonfinite_dose", f"{raw_path.name} holds {bad} NaN or Inf value(s) of {dose.size}"
        )
    if dose.size and float(dose.min()) < 0:
        raise TransientError(
            "dose_conversion_failed", f"{raw_path.name} holds negative dose ({dose.min():g})"
        )
    if not np.any(dose):
        raise TransientError(
            "empty_dose", f"{raw_path.name}: all {dose.size} voxels are 0 (nothing was scored)"
        )
    return dose


def build_rt_dose(
    dose: np.ndarray,
    *,
    grid: PhantomGrid,
    plan: PlanIdentity,
    beam_number: int,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    series_description: str = "",
    created_at: datetime | None = None,
    fraction_group_number: int = 1,
) -> Dataset:
    """An RT Dose dataset (formats.md §4.3) for a (nz, ny, nx) dose in Gy, unscaled."""
    if dose.shape != grid.shape:
        raise ValueError(f"dose shape {dose.shape} differs from the grid's {grid.shape}")
    if not plan.sop_instance_uid:
        raise ValueError("the plan has no SOPInstanceUID to reference")
    max_dose = float(dose.max()) if dose.size else 0.0
    scaling = scaling_text(max_dose)
    pixels = np.clip(np.rint(dose / float(scaling)), 0, _U16_MAX).astype(np.uint16)

    sop_uid = UID(sop_instance_uid) if sop_instance_uid else generate_uid()
    when = created_at or datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTDoseStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = RTDoseStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S")
    # Patient and General Study: copied from the plan, "" where it has none (Type 2)
    ds.PatientName = plan.patient_name
    ds.PatientID = plan.patient_id
    ds.PatientBirthDate = plan.patient_birth_date
    ds.PatientSex = plan.patient_sex
    ds.StudyInstanceUID = plan.study_instance_uid or generate_uid(
        entropy_srcs=[plan.sop_instance_uid, "study"]
    )
    ds.StudyDate = plan.study_date
    ds.StudyTime = plan.study_time
    ds.StudyID = plan.study_id
    ds.ReferringPhysicianName = plan.referring_physician_name
    ds.AccessionNumber = plan.accession_number
    # RT Series
    ds.Modality = "RTDOSE"
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description or f"MOQUI dose, beam {beam_number}"
    ds.OperatorsName = ""
    # Frame of Reference: the plan's; a stable made-up one if the plan has none (Type 1)
    ds.FrameOfReferenceUID = plan.frame_of_reference_uid or generate_uid(
        entropy_srcs=[ds.StudyInstanceUID, "frame-of-reference"]
    )
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.InstanceNumber = instance_number
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    # Image Plane: IPP is the centre of voxel (0,0,0); PixelSpacing is row spacing first
    ds.ImagePositionPatient = [_ds(v) for v in grid.first_voxel_centre]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [_ds(grid.dy), _ds(grid.dx)]
    ds.SliceThickness = _ds(grid.dz)
    # Image Pixel and Multi-frame; set_pixel_data fills Rows/Columns/NumberOfFrames/Bits*
    ds.set_pixel_data(pixels, "MONOCHROME2", 16, generate_instance_uid=False)
    ds.FrameIncrementPointer = _FRAME_INCREMENT_POINTER
    # RT Dose
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "BEAM"
    ds.GridFrameOffsetVector = [_ds(v) for v in grid.frame_offsets]
    ds.DoseGridScaling = scaling
    ds.TissueHeterogeneityCorrection = "IMAGE"
    beam_ref = Dataset()
    beam_ref.ReferencedBeamNumber = beam_number
    fraction_ref = Dataset()
    fraction_ref.ReferencedFractionGroupNumber = fraction_group_number
    fraction_ref.ReferencedBeamSequence = DicomSequence([beam_ref])
    plan_ref = Dataset()
    plan_ref.ReferencedSOPClassUID = RT_ION_PLAN_STORAGE
    plan_ref.ReferencedSOPInstanceUID = plan.sop_instance_uid
    plan_ref.ReferencedFractionGroupSequence = DicomSequence([fraction_ref])
    ds.ReferencedRTPlanSequence = DicomSequence([plan_ref])
    return ds


def write_rt_dose(
    raw_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    grid: PhantomGrid,
    plan: PlanIdentity,
    beam_number: int,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    series_description: str = "",
    created_at: datetime | None = None,
    fraction_group_number: int = 1,
) -> Path:
    """Convert MOQUI's raw dose (float64 LE, (nz, ny, nx)) into a 16-bit RT Dose at out_path.

    Values stay MOQUI's Gy, unscaled. The file appears atomically: it is written to
    `<out_path>.part`, synced, then renamed; on failure nothing is left behind. Raises
    TransientError `missing_output`, `short_output` (raw smaller than the grid),
    `disk_full` or `dose_conversion_failed`.
    """
    raw = Path(raw_path)
    out = Path(out_path)
    dose = _raw_dose(raw, grid)
    try:
        ds = build_rt_dose(
            dose,
            grid=grid,
            plan=plan,
            beam_number=beam_number,
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid,
            series_number=series_number,
            instance_number=instance_number,
            series_description=series_description,
            created_at=created_at,
            fraction_group_number=fraction_group_number,
        )
    except ValueError as exc:
        raise TransientError("dose_conversion_failed", f"{raw.name}: {exc}") from exc
    part = out.with_name(out.name + ".part")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(part, "wb") as fh:
            pydicom.dcmwrite(fh, ds, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(part, out)
    except OSError as exc:
        part.unlink(missing_ok=True)
        code = "disk_full" if exc.errno == errno.ENOSPC else "dose_conversion_failed"
        raise TransientError(code, f"cannot write {out}: {exc}") from exc
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return out


def validate_rt_dose(path: str | os.PathLike[str], *, plan_sop_uid: str | None = None) -> None:
    """Check MOQUI's own DICOM output (`OutputFormat dcm`); TransientError `dicom_invalid` if bad.

    It must be readable DICOM of the RT Dose SOP class with pixel data whose length fits
    Rows x Columns x NumberOfFrames, and a positive DoseGridScaling. When plan_sop_uid is
    given and the file references plans, one of them must be that plan (MOQUI's writer sets
    no reference, so a missing one is accepted).
    """
    p = Path(path)
    if not p.exists():
        raise TransientError("missing_output", f"{p} does not exist")
    try:
        ds = pydicom.dcmread(p)
    except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
        raise TransientError("dicom_invalid", f"{p.name} is not readable DICOM: {exc}") from exc
    problems: list[str] = []
    if str(ds.get("SOPClassUID", "")) != RTDoseStorage:
        problems.append(f"SOP class {ds.get('SOPClassUID', '(none)')} is not RT Dose")
    if "PixelData" not in ds:
        problems.append("no pixel data")
    else:
        try:
            rows, cols = int(ds.Rows), int(ds.Columns)
            frames = int(ds.get("NumberOfFrames") or 1)
            bits = int(ds.BitsAllocated)
            need = rows * cols * frames * bits // 8
            have = len(ds.PixelData)
            if have not in (need, need + 1):
                problems.append(
                    f"pixel data has {have} bytes; {rows}x{cols}x{frames} at {bits} bits needs {need}"
                )
        except (AttributeError, TypeError, ValueError) as exc:
            problems.append(f"image pixel attributes are missing or broken ({exc})")
    try:
        scaling = float(ds.get("DoseGridScaling"))
        if not math.isfinite(scaling) or scaling <= 0:
            problems.append(f"DoseGridScaling {scaling!r} is not positive")
    except (TypeError, ValueError):
        problems.append("no usable DoseGridScaling")
    if plan_sop_uid is not None and "ReferencedRTPlanSequence" in ds:
        refs = {
            str(item.get("ReferencedSOPInstanceUID", "")) for item in ds.ReferencedRTPlanSequence
        }
        if plan_sop_uid not in refs:
            problems.append(f"references plan(s) {sorted(refs)}, not {plan_sop_uid}")
    if problems:
        raise TransientError("dicom_invalid", f"{p.name}: " + "; ".join(problems))
    if not bytes(ds.PixelData).strip(b"\x00"):
        raise TransientError("empty_dose", f"{p.name}: every pixel is 0 (nothing was scored)")


def grid_from_tps_file(
    path: str | os.PathLike[str], *, raw_path: str | os.PathLike[str] | None = None
) -> PhantomGrid:
    """The phantom grid of the `moqui_tps.in` MOQUI ran with.

    With raw_path, the grid whose size that raw file has where builds differ (the
    TwoCentimeterMode slab has 3 slices in the clinic's build, 1 in the public fork).
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
        keys = parse_tps_input(text)
        if raw_path is not None:
            try:
                size = Path(raw_path).stat().st_size
            except OSError:
                return phantom_grid(keys)  # the raw reader names the problem
            return grid_for_size(keys, size)
        return phantom_grid(keys)
    except (OSError, ValueError, TpsParseAbort) as exc:
        raise TransientError(
            "dose_conversion_failed", f"cannot read the dose grid from {path}: {exc}"
        ) from exc


def convert_request(request: dict[str, object]) -> str:
    """Carry out one conversion or validation request; returns the written file's path.

    Raises:
        MqiError: a named failure (short_output, dose_conversion_failed, dicom_invalid, ...).
    """
    op = request.get("op", "convert")
    source, target = str(request["input"]), str(request["output"])
    if op == "validate" and source.endswith(".raw"):
        # `OutputFormat dcm` on a build without it (the public fork): it wrote raw dose
        op = "convert"
    if op == "validate":
        validate_rt_dose(source)
        tmp = target + ".part"
        with open(source, "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read())
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, target)
        return target
    beam_number = request["beam_number"]
    if not isinstance(beam_number, int):
        raise TransientError(
            "dose_conversion_failed", f"beam_number must be an int: {beam_number!r}"
        )
    out = write_rt_dose(
        source,
        target,
        grid=grid_from_tps_file(str(request["tps"]), raw_path=source),
        plan=read_plan_ref(str(request["plan"])),
        beam_number=beam_number,
    )
    return str(out)


def serve(lines: Iterable[str], reply: TextIO) -> None:
    """The warm worker: one JSON request per line in, one JSON answer per line out.

    Conversions and validations answer `{"ok": true, "output": PATH}`; a gamma request
    (`{"op": "gamma", ...}`) and a delivery check (`{"op": "delivery_check", ...}`, both in
    `mqi_async.qa.worker`) answer `{"ok": true, "result": SUMMARY}`; failures `{"ok": false, "code": CODE, "detail": SENTENCE}`.
    """
    for line in lines:
        if not line.strip():
            continue
        failure_code = "dose_conversion_failed"
        try:
            request = json.loads(line)
            answer: dict[str, object]
            if isinstance(request, dict) and request.get("op") == GAMMA_OP:
                failure_code = "gamma_failed"
                answer = {"ok": True, "result": answer_gamma_request(request)}
            elif isinstance(request, dict) and request.get("op") == DELIVERY_OP:
                failure_code = "delivery_check_failed"
                answer = {"ok": True, "result": answer_delivery_request(request)}
            else:
                answer = {"ok": True, "output": convert_request(request)}
        except MqiError as exc:
            answer = {"ok": False, "code": exc.code, "detail": exc.detail}
        except Exception as exc:  # the worker must answer every request, whatever went wrong
            answer = {
                "ok": False,
                "code": failure_code,
                "detail": f"{type(exc).__name__}: {exc}",
            }
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: convert one raw dose; prints the output path, or `<code>: <detail>` and exits 1."""
    parser = argparse.ArgumentParser(
        prog="python -m mqi_async.dose",
        description="Convert MOQUI raw dose (float64 LE) into a DICOM RT Dose file.",
    )
    parser.add_argument("--serve", action="store_true", help="answer JSON requests on stdin")
    parser.add_argument(
        "--validate", metavar="DCM", help="validate MOQUI's RT Dose, copy to --output"
    )
    parser.add_argument("--input", help="MOQUI .raw file")
    parser.add_argument("--output", help="RT Dose .dcm to write (atomically)")
    parser.add_argument("--tps", help="the moqui_tps.in the run used (geometry)")
    parser.add_argument("--plan", help="the RTPLAN the run used")
    parser.add_argument("--beam-number", type=int, help="DICOM BeamNumber")
    parser.add_argument("--sop-instance-uid", default=None)
    parser.add_argument("--series-instance-uid", default=None)
    args = parser.parse_args(argv)
    if args.serve:
        serve(sys.stdin, sys.stdout)
        return 0
    if args.validate:
        if not args.output:
            parser.error("--validate needs --output")
        try:
            checked = convert_request(
                {"op": "validate", "input": args.validate, "output": args.output}
            )
        except MqiError as exc:
            sys.stderr.write(f"{exc.code}: {exc.detail}\n")
            return 1
        sys.stdout.write(f"{checked}\n")
        return 0
    missing = [
        n for n in ("input", "output", "tps", "plan", "beam_number") if getattr(args, n) is None
    ]
    if missing:
        parser.error("missing " + ", ".join("--" + n.replace("_", "-") for n in missing))
    try:
        grid = grid_from_tps_file(args.tps, raw_path=args.input)
        plan = read_plan_ref(args.plan)
        out = write_rt_dose(
            args.input,
            args.output,
            grid=grid,
            plan=plan,
            beam_number=args.beam_number,
            sop_instance_uid=args.sop_instance_uid,
            series_instance_uid=args.series_instance_uid,
        )
    except MqiError as exc:
        sys.stderr.write(f"{exc.code}: {exc.detail}\n")
        return 1
    sys.stdout.write(f"{out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
