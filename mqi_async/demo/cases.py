"""Synthetic treatment-log cases on disk (RT Ion Plan + SHI delivery folders), intact or broken."""

from __future__ import annotations

import hashlib
import io
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from mqi_async.domain.delivery_log import DEFAULT_CALIBRATION, DEFAULT_MU_PER_COUNT, range_factor
from mqi_async.domain.plan import RT_ION_PLAN_STORAGE, RT_PLAN_STORAGE
from mqi_async.ingest.layout import READY_MARKER
from mqi_async.qa.ptn import encode_ptn

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

PLANRANGE_HEADER = (
    "RESULT_ID,LAYER_NO,LAYER_ENERGY,PATIENT_ID,FLD_NO,DOSE1_RANGE,DOSE2_RANGE,"
    "PLAN_DOSE1_RANGE,PLAN_DOSE2_RANGE,SCAN_OUT_FL_NM,PLAN_SCAN_OUT_FL_NM"
)
_FIRST_ENERGY_MEV = 110.0
_ENERGY_STEP_MEV = 2.0
#: spots lie on this grid within a disc whose radius follows the layer (a sphere-like target)
_SPOT_SPACING_MM = 5.0
_SPOT_FWHM_MM = 6.0
#: MU of a spot before the layer and radial factors
_SPOT_MU = 0.02
#: a record sample holds at most this many dose monitor counts
_MAX_COUNTS_PER_SAMPLE = 60000


class Breakage(StrEnum):
    """How a generated case is broken; the value is the failure code it must end in.

    `no_reference_fraction` is not offered: every fraction that is not pending can be
    the reference, and a pending one makes the case wait instead.
    """

    NONE = "none"
    MISSING_RTPLAN = "missing_rtplan"
    RTPLAN_PARSE_FAILED = "rtplan_parse_failed"
    NOT_ION_PLAN = "not_ion_plan"
    ZERO_EXPECTED_BEAMS = "zero_expected_beams"
    MISSING_DELIVERIES = "missing_deliveries"
    PLANINFO_INVALID = "planinfo_invalid"
    PATIENT_ID_MISMATCH = "patient_id_mismatch"
    UNRESOLVED_FOLDERS = "unresolved_folders"
    DUPLICATE_BEAM_DELIVERY = "duplicate_beam_delivery"
    MISSING_DELIVERY_TIMESTAMP = "missing_delivery_timestamp"
    BEAM_COUNT_MISMATCH = "beam_count_mismatch"
    UNKNOWN_MACHINE = "unknown_machine"

    @property
    def code(self) -> str | None:
        return None if self is Breakage.NONE else self.value


class DeliveryErrorKind(StrEnum):
    """What a generated delivery record does differently from the plan."""

    SHIFT = "shift"  # the layer's spots land `value` mm away along x
    MISSING_LAYER = "missing_layer"  # the layer has no record (and no PlanRange row)
    METERSET = "meterset"  # the layer (every layer when `layer` is None) gets `value` % more MU
    SWAP = "swap"  # the records of `layer` and `other_layer` are exchanged


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryError:
    """One injected delivery error; `fraction`/`beam` None means every fraction/beam."""

    kind: DeliveryErrorKind
    #: 1-based layer; None (meterset only) means every layer
    layer: int | None = 1
    value: float = 0.0
    other_layer: int = 2
    fraction: int | None = None
    #: 1-based treatment beam index
    beam: int | None = None

    def applies(self, fraction: int, beam: int) -> bool:
        return (self.fraction is None or self.fraction == fraction) and (
            self.beam is None or self.beam == beam
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseSpec:
    """What to generate. Everything derived (UIDs, spot data, delivery order) follows `seed`."""

    #: the patient id; also the case id (nested: patient folder; flat: case folder)
    case_id: str = "00000001"
    #: None: derived from the seed
    study_uid: str | None = None
    beams: int = 2
    layers_per_beam: int = 2
    fractions: int = 1
    beam_gap_minutes: float = 4.0
    fraction_gap_hours: float = 24.0
    setup_beam: bool = True
    #: "G1", "G2" or "" (no room folder)
    room: str = "G1"
    #: None: "G1" in room G1, "GTR2" in room G2 (and "" room), to exercise the gantry regex
    machine_name: str | None = None
    nested: bool = True
    write_marker: bool = True
    breakage: Breakage = Breakage.NONE
    #: leave the last fraction's last beam undelivered, so the case waits for it
    open_window: bool = False
    first_delivery_at: datetime = datetime(2025, 1, 6, 9, 30)
    #: the fewest samples a layer's record holds (beam-off samples pad a short one)
    samples_per_layer: int = 24
    seed: int = 0
    #: errors written into the delivery records; none: every record delivers the plan
    delivery_errors: tuple[DeliveryError, ...] = ()
    #: the widest layer's spot disc (mm); a clinical field is 30 to 100
    field_radius_mm: float = 14.0
    #: beam-on samples each spot's counts are spread over at least (the machine samples every
    #: 0.06 ms, so a real layer holds thousands)
    samples_per_spot: int = 1

    def __post_init__(self) -> None:
        if self.beams < 1 or self.layers_per_beam < 1 or self.fractions < 1:
            raise ValueError("a case needs at least one beam, layer and fraction")
        needs_two = self.breakage is Breakage.BEAM_COUNT_MISMATCH or self.open_window
        if needs_two and self.beams < 2:
            raise ValueError(f"{self.breakage} / open_window need at least 2 beams")
        if self.room not in ("G1", "G2", ""):
            raise ValueError(f"room must be G1, G2 or '', not {self.room!r}")

    @property
    def patient_id(self) -> str:
        return self.case_id

    @property
    def expected_error(self) -> str | None:
        return self.breakage.code


@dataclass(frozen=True, slots=True, kw_only=True)
class WrittenCase:
    """Where a generated case went."""

    spec: CaseSpec
    #: the folder holding the RTPLAN and the delivery folders (= case_path)
    case_dir: Path
    case_id: str
    case_path: Path
    #: None when the spec wrote no marker
    marker_path: Path | None
    rtplan_path: Path | None
    delivery_dirs: tuple[Path, ...]
    study_uid: str
    #: DICOM BeamNumbers of the treatment beams, in plan order
    beam_numbers: tuple[int, ...]
    last_delivery_at: datetime | None

    @property
    def expected_error(self) -> str | None:
        return self.spec.expected_error


@dataclass(frozen=True, slots=True, kw_only=True)
class _Delivery:
    folder: str
    beam_number: int
    field_number: int
    layers: int
    stamp: str
    planinfo: str | None
    fraction: int = 1


def write_case(root: Path, spec: CaseSpec, *, marker_last: bool = True) -> WrittenCase:
    """Write one case below `root`; the `_CASE_READY` marker (if any) is written last
    unless `marker_last` is False, in which case it is written first."""
    return _write_case(root, spec, marker_last=marker_last, beams=None)


def write_cases(root: Path, count: int, base: CaseSpec | None = None) -> list[WrittenCase]:
    """`count` small intact cases with ids 00000001, 00000002, … (benchmarks, the demo)."""
    spec = base or CaseSpec(beams=1, layers_per_beam=1, samples_per_layer=8)
    # the beam and fraction sequences are the same for every case and end the dataset
    # (their tags are the highest), so their encoded bytes are appended to each header
    template = build_ion_plan(spec, study_uid=_uid(spec, "template"))
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, template, enforce_file_format=True)
    data = buffer.getvalue()
    first = pydicom.dcmread(io.BytesIO(data)).get_item(_FRACTION_GROUP_SEQUENCE)
    if not isinstance(first, RawDataElement):
        raise TypeError("the template plan was not read lazily")
    # the value follows a 12-byte explicit-VR SQ header
    beams = data[first.value_tell - 12 :]
    return [
        _write_case(
            root,
            replace(spec, case_id=f"{index:08d}", seed=spec.seed + index),
            marker_last=True,
            beams=beams,
        )
        for index in range(1, count + 1)
    ]


_FRACTION_GROUP_SEQUENCE = 0x300A0070


def _write_case(
    root: Path, spec: CaseSpec, *, marker_last: bool, beams: bytes | None
) -> WrittenCase:
    rng = random.Random(f"{spec.seed}:{spec.case_id}")
    study_uid = spec.study_uid or _uid(spec, "study")
    room_dir = root / spec.room if spec.room else root
    if spec.nested:
        patient_dir = room_dir / spec.case_id
        case_dir = patient_dir / study_uid
        marker = patient_dir / READY_MARKER
    else:
        case_dir = room_dir / spec.case_id
        marker = case_dir / READY_MARKER
    case_dir.mkdir(parents=True, exist_ok=True)
    marker_path = marker if spec.write_marker else None
    if marker_path is not None and not marker_last:
        marker_path.write_text("")

    numbers = _treatment_beam_numbers(spec)
    rtplan_path = _write_plan_file(case_dir, spec, study_uid, numbers, beams)
    deliveries = _deliveries(spec, numbers, study_uid, rng)
    delivery_dirs = tuple(_write_delivery(case_dir, spec, d, rng) for d in deliveries)
    if spec.breakage is Breakage.MISSING_DELIVERIES:
        # the log transfer made the folder but delivered nothing into it
        (case_dir / spec.first_delivery_at.strftime("%Y%m%d%H%M%S00")).mkdir(exist_ok=True)

    if marker_path is not None and marker_last:
        marker_path.write_text("")
    stamps = [d.stamp for d in deliveries]
    return WrittenCase(
        spec=spec,
        case_dir=case_dir,
        case_id=spec.case_id,
        case_path=case_dir,
        marker_path=marker_path,
        rtplan_path=rtplan_path,
        delivery_dirs=delivery_dirs,
        study_uid=study_uid,
        beam_numbers=numbers,
        last_delivery_at=_stamp_time(max(stamps)) if stamps else None,
    )


def build_ion_plan(
    spec: CaseSpec, *, study_uid: str, beam_numbers: Iterable[int] | None = None
) -> Dataset:
    """A valid RT Ion Plan dataset (with file meta) for the spec."""
    numbers = tuple(beam_numbers) if beam_numbers is not None else _treatment_beam_numbers(spec)
    machine = _machine_name(spec)
    ds = _plan_header(spec, study_uid, RT_ION_PLAN_STORAGE)
    beams: list[Dataset] = []
    if spec.setup_beam or spec.breakage is Breakage.ZERO_EXPECTED_BEAMS:
        beams.append(_ion_beam(spec, 1, "SETUP", machine, layers=1, setup=True))
    if spec.breakage is not Breakage.ZERO_EXPECTED_BEAMS:
        for index, number in enumerate(numbers, start=1):
            name = f"{index}G{(90 * index) % 360:03d}"
            beams.append(_ion_beam(spec, number, name, machine, layers=spec.layers_per_beam))
    ds.IonBeamSequence = Sequence(beams)
    ds.FractionGroupSequence = Sequence([_fraction_group(beams)])
    return ds


def _plan_header(spec: CaseSpec, study_uid: str, sop_class: str) -> Dataset:
    instance_uid = _uid(spec, f"plan:{sop_class}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = instance_uid
    ds.StudyDate = spec.first_delivery_at.strftime("%Y%m%d")
    ds.StudyTime = "080000"
    ds.AccessionNumber = ""
    ds.Modality = "RTPLAN"
    ds.Manufacturer = "mqi_async synthetic"
    ds.ReferringPhysicianName = ""
    ds.OperatorsName = ""
    ds.PatientName = f"Synthetic^{spec.case_id}"
    ds.PatientID = spec.case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = _uid(spec, "series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.FrameOfReferenceUID = _uid(spec, "frame")
    ds.PositionReferenceIndicator = ""
    ds.RTPlanLabel = "SYNTH"
    ds.RTPlanName = "synthetic water phantom plan"
    ds.RTPlanDate = ds.StudyDate
    ds.RTPlanTime = "080000"
    ds.RTPlanGeometry = "TREATMENT_DEVICE"
    return ds


def _ion_beam(
    spec: CaseSpec, number: int, name: str, machine: str, *, layers: int, setup: bool = False
) -> Dataset:
    beam = Dataset()
    beam.BeamNumber = number
    beam.BeamName = name
    beam.BeamDescription = "Site Setup" if setup else f"field {name}"
    beam.BeamType = "STATIC"
    beam.RadiationType = "PROTON"
    beam.TreatmentMachineName = machine
    beam.Manufacturer = "mqi_async synthetic"
    beam.InstitutionName = "Synthetic Proton Centre"
    beam.PrimaryDosimeterUnit = "NP"
    beam.TreatmentDeliveryType = "SETUP" if setup else "TREATMENT"
    beam.NumberOfWedges = 0
    beam.NumberOfCompensators = 0
    beam.NumberOfBoli = 0
    beam.NumberOfBlocks = 0
    beam.NumberOfRangeShifters = 0
    beam.NumberOfLateralSpreadingDevices = 0
    beam.NumberOfRangeModulators = 0
    beam.PatientSupportType = "TABLE"
    beam.ScanMode = "MODULATED"
    beam.ModulatedScanModeType = "STATIONARY"
    beam.VirtualSourceAxisDistances = [2000.0, 2000.0]
    gantry_angle = float((90 * number) % 360)
    points: list[Dataset] = []
    cumulative = 0.0
    for layer in range(layers):
        energy = _FIRST_ENERGY_MEV - _ENERGY_STEP_MEV * layer
        spots = layer_spots(layer, layers, spec.field_radius_mm)
        positions = [v for x, y, _ in spots for v in (x, y)]
        for half in range(2):
            cp = Dataset()
            cp.ControlPointIndex = len(points)
            cp.CumulativeMetersetWeight = round(cumulative, 6)
            cp.NominalBeamEnergy = energy
            cp.NominalBeamEnergyUnit = "MEV"
            cp.ScanSpotTuneID = "3.0"
            cp.NumberOfScanSpotPositions = len(spots)
            cp.ScanSpotPositionMap = positions
            cp.ScanSpotMetersetWeights = [0.0 if half else mu for _, _, mu in spots]
            cp.ScanningSpotSize = [_SPOT_FWHM_MM, _SPOT_FWHM_MM]
            cp.NumberOfPaintings = 1
            if not points:
                _first_control_point(cp, gantry_angle)
            points.append(cp)
            if not half:
                cumulative += sum(mu for _, _, mu in spots)
    beam.FinalCumulativeMetersetWeight = round(cumulative, 6)
    beam.NumberOfControlPoints = len(points)
    beam.IonControlPointSequence = Sequence(points)
    return beam


def layer_spots(
    layer: int, layers: int, field_radius_mm: float = 14.0
) -> list[tuple[float, float, float]]:
    """(x mm, y mm, MU) of the spots of 0-based `layer` of a demo beam of `layers` layers.

    Spots on a 5 mm grid within a disc whose radius peaks mid-beam at `field_radius_mm`, as a
    sphere's layers do; distal (first, highest-energy) layers and the disc's rim get more MU.
    """
    radius = 4.0 + (field_radius_mm - 4.0) * math.sin(math.pi * (layer + 0.5) / layers)
    depth_factor = 1.0 + 0.5 * (layers - 1 - layer) / max(layers - 1, 1)
    reach = int(radius // _SPOT_SPACING_MM)
    spots: list[tuple[float, float, float]] = []
    for j in range(-reach, reach + 1):
        for i in range(-reach, reach + 1):
            x, y = i * _SPOT_SPACING_MM, j * _SPOT_SPACING_MM
            rho = math.hypot(x, y)
            if rho <= radius:
                mu = _SPOT_MU * depth_factor * (0.8 + 0.4 * rho / radius)
                spots.append((x, y, round(mu, 6)))
    return spots


def _first_control_point(cp: Dataset, gantry_angle: float) -> None:
    cp.GantryAngle = gantry_angle
    cp.GantryRotationDirection = "NONE"
    cp.BeamLimitingDeviceAngle = 0.0
    cp.BeamLimitingDeviceRotationDirection = "NONE"
    cp.PatientSupportAngle = 0.0
    cp.PatientSupportRotationDirection = "NONE"
    cp.TableTopVerticalPosition = 0.0
    cp.TableTopLongitudinalPosition = 0.0
    cp.TableTopLateralPosition = 0.0
    cp.IsocenterPosition = [0.0, 0.0, 0.0]
    cp.GantryPitchAngle = 0.0
    cp.GantryPitchRotationDirection = "NONE"
    cp.TableTopPitchAngle = 0.0
    cp.TableTopPitchRotationDirection = "NONE"
    cp.TableTopRollAngle = 0.0
    cp.TableTopRollRotationDirection = "NONE"
    cp.SnoutPosition = 465.0
    cp.MetersetRate = 0.0


def _fraction_group(beams: list[Dataset]) -> Dataset:
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = 30
    group.NumberOfBeams = len(beams)
    group.NumberOfBrachyApplicationSetups = 0
    referenced: list[Dataset] = []
    for beam in beams:
        ref = Dataset()
        ref.ReferencedBeamNumber = beam.BeamNumber
        ref.BeamMeterset = float(beam.FinalCumulativeMetersetWeight)
        referenced.append(ref)
    group.ReferencedBeamSequence = Sequence(referenced)
    return group


def build_photon_plan(spec: CaseSpec, *, study_uid: str) -> Dataset:
    """A minimal photon RT Plan (BeamSequence, no IonBeamSequence): not an ion plan."""
    ds = _plan_header(spec, study_uid, RT_PLAN_STORAGE)
    beam = Dataset()
    beam.BeamNumber = 1
    beam.BeamName = "Field 1"
    beam.BeamType = "STATIC"
    beam.RadiationType = "PHOTON"
    beam.TreatmentMachineName = "G1"
    beam.TreatmentDeliveryType = "TREATMENT"
    beam.NumberOfControlPoints = 2
    points = []
    for index in range(2):
        cp = Dataset()
        cp.ControlPointIndex = index
        cp.CumulativeMetersetWeight = float(index)
        cp.NominalBeamEnergy = 6.0
        points.append(cp)
    beam.ControlPointSequence = Sequence(points)
    ds.BeamSequence = Sequence([beam])
    return ds


def build_other_dicom(spec: CaseSpec, *, study_uid: str) -> Dataset:
    """A small DICOM file that is not an RTPLAN (a CT header without pixels)."""
    ds = _plan_header(spec, study_uid, CT_IMAGE_STORAGE)
    ds.Modality = "CT"
    return ds


def _write_plan_file(
    case_dir: Path,
    spec: CaseSpec,
    study_uid: str,
    numbers: tuple[int, ...],
    beams: bytes | None,
) -> Path | None:
    breakage = spec.breakage
    if breakage is Breakage.MISSING_RTPLAN:
        path = case_dir / f"CT.{_uid(spec, 'ct')}.dcm"
        pydicom.dcmwrite(
            path, build_other_dicom(spec, study_uid=study_uid), enforce_file_format=True
        )
        return None
    if breakage is Breakage.NOT_ION_PLAN:
        ds = build_photon_plan(spec, study_uid=study_uid)
    elif beams is not None and breakage is Breakage.NONE:
        ds = _plan_header(spec, study_uid, RT_ION_PLAN_STORAGE)
        path = case_dir / f"RP.{ds.SOPInstanceUID}.dcm"
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        path.write_bytes(buffer.getvalue() + beams)
        return path
    else:
        ds = build_ion_plan(spec, study_uid=study_uid, beam_numbers=numbers)
    path = case_dir / f"RP.{ds.SOPInstanceUID}.dcm"
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    if breakage is Breakage.RTPLAN_PARSE_FAILED:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _treatment_beam_numbers(spec: CaseSpec) -> tuple[int, ...]:
    first = 2 if spec.setup_beam else 1
    return tuple(range(first, first + spec.beams))


def _machine_name(spec: CaseSpec) -> str:
    if spec.breakage is Breakage.UNKNOWN_MACHINE:
        return "PROTON_ROOM_3"
    if spec.machine_name is not None:
        return spec.machine_name
    return "G1" if spec.room == "G1" else "GTR2"


def _deliveries(
    spec: CaseSpec, numbers: tuple[int, ...], study_uid: str, rng: random.Random
) -> list[_Delivery]:
    breakage = spec.breakage
    if breakage is Breakage.MISSING_DELIVERIES:
        return []
    out: list[_Delivery] = []
    for fraction in range(spec.fractions):
        order = list(enumerate(numbers, start=1))
        if fraction % 2:
            order.reverse()
        if breakage is Breakage.BEAM_COUNT_MISMATCH and len(order) > 1:
            order = order[:-1]
        if spec.open_window and fraction == spec.fractions - 1 and len(order) > 1:
            order = order[:-1]
        if breakage is Breakage.DUPLICATE_BEAM_DELIVERY:
            order.append(order[0])
        start = spec.first_delivery_at + timedelta(hours=spec.fraction_gap_hours * fraction)
        for slot, (field, number) in enumerate(order):
            at = start + timedelta(minutes=spec.beam_gap_minutes * slot)
            stamp = at.strftime("%Y%m%d%H%M%S") + f"{rng.randrange(100):02d}"
            out.append(
                _Delivery(
                    folder=stamp,
                    beam_number=number,
                    field_number=field,
                    layers=spec.layers_per_beam,
                    stamp=stamp,
                    planinfo=None,
                    fraction=fraction + 1,
                )
            )
    out = [replace(d, planinfo=_planinfo(spec, study_uid, d)) for d in out]
    return _break_deliveries(spec, out)


def _break_deliveries(spec: CaseSpec, deliveries: list[_Delivery]) -> list[_Delivery]:
    if not deliveries:
        return deliveries
    first, rest = deliveries[0], deliveries[1:]
    text = first.planinfo or ""
    match spec.breakage:
        case Breakage.PLANINFO_INVALID:
            text = text.replace(
                f"DICOM_BEAM_NUMBER,{first.beam_number}", "DICOM_BEAM_NUMBER,beam two"
            )
        case Breakage.PATIENT_ID_MISMATCH:
            text = text.replace(
                f"DICOM_PATIENT_ID,{spec.case_id}", f"DICOM_PATIENT_ID,9{spec.case_id}"
            )
        case Breakage.UNRESOLVED_FOLDERS:
            text = text.replace(f"DICOM_BEAM_NUMBER,{first.beam_number}", "DICOM_BEAM_NUMBER,99")
        case Breakage.MISSING_DELIVERY_TIMESTAMP:
            lines = text.split("\r\n")
            text = "\r\n".join(x for x in lines if not x.startswith("TCSC_IRRAD_DATETIME"))
            return [
                replace(first, folder=f"beam_{first.field_number}_redelivery", planinfo=text),
                *rest,
            ]
        case _:
            return deliveries
    return [replace(first, planinfo=text), *rest]


def _planinfo(spec: CaseSpec, study_uid: str, delivery: _Delivery) -> str:
    tcsc_id = _tcsc_patient_id(spec)
    lines = [
        f"DICOM_PATIENT_ID,{spec.case_id}",
        f"DICOM_STUDY_INS_UID,{study_uid}",
        f"DICOM_BEAM_NUMBER,{delivery.beam_number}",
        f"TCSC_IRRAD_DATETIME,{delivery.stamp}",
        f"TCSC_PATIENT_ID,{tcsc_id}",
        "TCSC_PLAN_NUMBER,1",
        f"TCSC_FIELD_NUMBER,{delivery.field_number}",
        "START_LAYER_NUMBER,1",
        f"STOP_LAYER_NUMBER,{delivery.layers}",
        "SHARE_DIR,\\\\share-host\\Share\\ScanActual",
        f"ACTUAL_DIR,{spec.case_id}\\{study_uid}\\{delivery.stamp}",
    ]
    # the treatment-room PCs write CRLF files
    return "\r\n".join(lines) + "\r\n"


def _write_delivery(
    case_dir: Path, spec: CaseSpec, delivery: _Delivery, rng: random.Random
) -> Path:
    folder = case_dir / delivery.folder
    folder.mkdir(exist_ok=True)
    if delivery.planinfo is not None:
        (folder / "PlanInfo.txt").write_bytes(delivery.planinfo.encode())
    room_digit = "2" if spec.room == "G2" else "1"
    tcsc_id = _tcsc_patient_id(spec)
    errors = [
        e for e in spec.delivery_errors if e.applies(delivery.fraction, delivery.field_number)
    ]
    contents = list(range(delivery.layers))  # the planned layer each record delivers
    for error in errors:
        if error.kind is DeliveryErrorKind.SWAP and error.layer is not None:
            a, b = error.layer - 1, error.other_layer - 1
            contents[a], contents[b] = contents[b], contents[a]
    rows = [PLANRANGE_HEADER]
    for layer in range(1, delivery.layers + 1):
        if any(e.kind is DeliveryErrorKind.MISSING_LAYER and e.layer == layer for e in errors):
            continue
        base = f"{room_digit.zfill(2)}_{tcsc_id}_001_{delivery.field_number:03d}_{layer:03d}"
        energy = _FIRST_ENERGY_MEV - _ENERGY_STEP_MEV * (layer - 1)
        dose_range = rng.choice((4, 5, 5))
        rows.append(
            f"{delivery.stamp},{layer},{energy:.1f},{spec.case_id},{delivery.field_number},"
            f"{dose_range},{dose_range},{dose_range},{dose_range},{base}.ptn,"
            f"{room_digit.zfill(2)}_{spec.case_id}_001_{delivery.field_number:03d}_{layer:03d}.mgn"
        )
        shift = sum(
            e.value for e in errors if e.kind is DeliveryErrorKind.SHIFT and e.layer == layer
        )
        scale = 1.0
        for e in errors:
            if e.kind is DeliveryErrorKind.METERSET and e.layer in (None, layer):
                scale *= 1.0 + e.value / 100.0
        spots = layer_spots(contents[layer - 1], delivery.layers, spec.field_radius_mm)
        record = _layer_record(
            spec,
            spots,
            layer=layer,
            range_code=dose_range,
            shift_x_mm=shift,
            meterset_scale=scale,
            rng=rng,
        )
        (folder / f"{base}.ptn").write_bytes(record)
    (folder / "PlanRange.txt").write_text("\n".join(rows) + "\n")
    return folder


def _layer_record(
    spec: CaseSpec,
    spots: list[tuple[float, float, float]],
    *,
    layer: int,
    range_code: int,
    shift_x_mm: float,
    meterset_scale: float,
    rng: random.Random,
) -> bytes:
    """The record of one layer that delivers `spots` (big-endian uint16, 8 columns).

    Each spot's MU becomes dose monitor counts (MU / MU per count / the range factor), spread
    over as many beam-on samples at the spot as the 16-bit field needs; beam-off samples lead,
    trail and pad the record to `samples_per_layer`.
    """
    room = "G2" if spec.room in ("G2", "") else "G1"
    cal = DEFAULT_CALIBRATION[room]
    per_count = DEFAULT_MU_PER_COUNT[room]
    factor, _ = range_factor(range_code)

    def raw_xy(x_mm: float, y_mm: float) -> tuple[int, int]:
        x = round(x_mm / cal.x_gain_mm + cal.x_offset)
        y = round(y_mm / cal.y_gain_mm + cal.y_offset)
        return min(max(x, 0), 0xFFFF), min(max(y, 0), 0xFFFF)

    def row(x_mm: float, y_mm: float, dose: int, on: int) -> list[int]:
        x, y = raw_xy(x_mm, y_mm)
        size = 400 + rng.randrange(40)
        return [x, y, size, size, dose, dose, layer, on]

    first_x, first_y = (spots[0][0], spots[0][1]) if spots else (0.0, 0.0)
    rows = [row(first_x + shift_x_mm, first_y, 0, 0)]
    for x, y, mu in spots:
        counts = mu * meterset_scale / per_count / factor
        samples = max(spec.samples_per_spot, math.ceil(counts / _MAX_COUNTS_PER_SAMPLE))
        share = [
            round(counts * (k + 1) / samples) - round(counts * k / samples) for k in range(samples)
        ]
        rows.extend(row(x + shift_x_mm, y, dose, 1) for dose in share)
    while len(rows) < max(spec.samples_per_layer, 2):
        rows.append(row(first_x + shift_x_mm, first_y, 0, 0))
    return encode_ptn(rows)


def _tcsc_patient_id(spec: CaseSpec) -> str:
    return f"{random.Random(f'tcsc:{spec.seed}:{spec.case_id}').randrange(10**7):07d}"


def _uid(spec: CaseSpec, what: str) -> str:
    """A UUID-derived `2.25.` UID that depends only on the seed, the case and `what`."""
    digest = hashlib.sha256(f"{spec.seed}\0{spec.case_id}\0{what}".encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def _stamp_time(stamp: str) -> datetime:
    return datetime.strptime(stamp[:14], "%Y%m%d%H%M%S") + timedelta(
        microseconds=int(stamp[14:16] or "0") * 10_000
    )
