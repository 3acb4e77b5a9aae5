"""The RTPLAN: which file it is, its treatment beams and layers, its gantry, and its identity."""

from __future__ import annotations

import io
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from mqi_async.domain.errors import IngestError
from mqi_async.domain.naming import file_name_problem, quote_value

RT_ION_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.8"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"

#: file-name patterns that may hold the RTPLAN (domain.md §1.4 step 1), matched case-sensitively;
#: a .dcm/.dicom suffix counts in any case, as it does for recognising a case directory
RTPLAN_PATTERNS = ("*.dcm", "*.DICOM", "*.dicom", "*rtplan*", "*RTPLAN*", "*plan*", "*PLAN*")

_GANTRY_RE = re.compile(r"G[^0-9]*([12])(?![0-9])", re.IGNORECASE)
_ION_RADIATION_TYPES = frozenset({"PROTON", "ION"})


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanBeam:
    """One treatment beam of the plan (setup beams are never PlanBeams)."""

    #: 1-based position among the treatment beams; the `k` of `<case_id>_beam_<k>`
    treatment_index: int
    #: 1-based position in the plan's beam sequence, setup beams included (MOQUI output names)
    plan_position: int
    #: DICOM BeamNumber (300A,00C0)
    beam_number: int
    beam_name: str
    beam_description: str
    machine_name: str
    #: nominal energy of each layer in delivery order; a layer starts where the energy changes
    layer_energies_mev: tuple[float, ...]
    control_point_count: int

    @property
    def layer_count(self) -> int:
        return len(self.layer_energies_mev)


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What the service needs from an RT Ion Plan; DICOM strings are "" when absent."""

    source: str
    sop_class_uid: str
    sop_instance_uid: str
    patient_id: str
    patient_name: str
    patient_birth_date: str
    patient_sex: str
    study_instance_uid: str
    study_date: str
    study_time: str
    study_id: str
    referring_physician_name: str
    accession_number: str
    frame_of_reference_uid: str
    rt_plan_label: str
    #: TreatmentMachineName shared by the treatment beams
    machine_name: str
    #: 1 or 2, from the machine name
    gantry: int
    #: treatment beams in plan order
    beams: tuple[PlanBeam, ...]
    #: BeamNumbers of the skipped setup beams
    setup_beam_numbers: tuple[int, ...] = ()

    def beam_by_number(self, beam_number: int) -> PlanBeam | None:
        """The treatment beam with this DICOM BeamNumber, if any."""
        for beam in self.beams:
            if beam.beam_number == beam_number:
                return beam
        return None


def gantry_number(machine_name: str) -> int | None:
    """1 or 2 when the name names exactly one gantry (GTR1, G1, G_2, Gantry2 …), else None."""
    found = {int(m) for m in _GANTRY_RE.findall(machine_name)}
    if len(found) != 1:
        return None
    return found.pop()


def is_setup_beam(beam_name: str, beam_description: str, delivery_type: str) -> bool:
    """Setup beams: BeamName SETUP (any case), BeamDescription "Site Setup", or delivery type SETUP."""
    return (
        beam_name.strip().casefold() == "setup"
        or beam_description.strip().casefold() == "site setup"
        or delivery_type.strip().upper() == "SETUP"
    )


def find_rtplan_candidates(names: Iterable[str]) -> list[str]:
    """The names (relative to case_path, at most one level deep) that may be the RTPLAN, best first.

    Files directly in case_path come before those one level down; names that say
    RTPLAN or start with RP come first within a level.
    """
    chosen: list[tuple[int, int, str]] = []
    for name in names:
        parts = PurePosixPath(name.replace(os.sep, "/")).parts
        if not parts or len(parts) > 2:
            continue
        base = parts[-1]
        dicom_suffix = base.casefold().endswith((".dcm", ".dicom"))
        if not dicom_suffix and not any(fnmatchcase(base, p) for p in RTPLAN_PATTERNS):
            continue
        says_plan = "rtplan" in base.casefold() or base.upper().startswith("RP")
        chosen.append((len(parts), 0 if says_plan else 1, name))
    return [name for *_, name in sorted(chosen)]


def read_rtplan(path: str | os.PathLike[str]) -> Plan:
    """Read and parse one RTPLAN file.

    Raises:
        IngestError: as parse_rtplan.
        OSError: the file cannot be read.
    """
    file_path = Path(path)
    return parse_rtplan(file_path.read_bytes(), source=file_path.name)


def select_rtplan(candidates: Iterable[tuple[str, bytes]]) -> Plan:
    """The first candidate (name, bytes) whose Modality is RTPLAN, parsed.

    Files that are DICOM but not RTPLAN are skipped, as are non-DICOM files whose
    name does not end in .dcm/.dicom. The first RTPLAN decides: its own errors raise.

    Raises:
        IngestError: missing_rtplan, rtplan_parse_failed, or any error of parse_rtplan.
    """
    broken: list[str] = []
    seen: list[str] = []
    for name, data in candidates:
        seen.append(name)
        dicom_name = name.casefold().endswith((".dcm", ".dicom"))
        if not _has_dicom_magic(data) and not dicom_name:
            continue
        try:
            return parse_rtplan(data, source=name)
        except IngestError as exc:
            if exc.code == "missing_rtplan":
                continue
            if exc.code == "rtplan_parse_failed":
                broken.append(exc.detail)
                continue
            raise
    if broken:
        raise IngestError("rtplan_parse_failed", "; ".join(broken))
    looked = ", ".join(seen) if seen else "no candidate files"
    raise IngestError("missing_rtplan", f"no DICOM file with Modality RTPLAN ({looked})")


def parse_rtplan(data: bytes, *, source: str = "RTPLAN") -> Plan:
    """Parse an RT Ion Plan from the bytes of a DICOM file.

    Raises:
        IngestError: rtplan_parse_failed (not DICOM, truncated, unreadable values),
            missing_rtplan (readable DICOM but Modality is not RTPLAN), not_ion_plan,
            zero_expected_beams, unknown_machine.
    """
    ds = _read_dataset(data, source)
    try:
        modality = _text(ds, "Modality")
        if modality != "RTPLAN":
            raise IngestError("missing_rtplan", f"{source} has Modality {modality!r}, not RTPLAN")
        return _plan_from_dataset(ds, source)
    except IngestError:
        raise
    # pydicom converts values lazily, so a bad value surfaces here as any exception type
    except Exception as exc:
        raise IngestError("rtplan_parse_failed", f"{source}: unreadable value ({exc})") from exc


def _plan_from_dataset(ds: Dataset, source: str) -> Plan:
    sop_class = _text(ds, "SOPClassUID")
    items = _beam_items(ds, source, sop_class)
    beams: list[PlanBeam] = []
    setup_numbers: list[int] = []
    seen_numbers: set[int] = set()
    for position, item in enumerate(items, start=1):
        number = _beam_number(item, source, position)
        if number in seen_numbers:
            raise IngestError("rtplan_parse_failed", f"{source}: BeamNumber {number} appears twice")
        seen_numbers.add(number)
        name = _text(item, "BeamName")
        description = _text(item, "BeamDescription")
        if is_setup_beam(name, description, _text(item, "TreatmentDeliveryType")):
            setup_numbers.append(number)
            continue
        problem = file_name_problem(name)
        if problem is not None:
            # MOQUI names its output after it and the service its RT Dose file: `../x`
            # would write outside the attempt folder
            raise IngestError(
                "invalid_beam_name",
                f"{source}: BeamName {quote_value(name)} of beam {number} {problem};"
                " fix it in the TPS and export the plan again",
            )
        control_points = _control_points(item)
        beams.append(
            PlanBeam(
                treatment_index=len(beams) + 1,
                plan_position=position,
                beam_number=number,
                beam_name=name,
                beam_description=description,
                machine_name=_text(item, "TreatmentMachineName"),
                layer_energies_mev=_layer_energies(control_points),
                control_point_count=len(control_points),
            )
        )
    if not beams:
        raise IngestError(
            "zero_expected_beams",
            f"{source} has {len(items)} beam(s), all setup beams (numbers {setup_numbers})",
        )
    machine_name, gantry = _plan_gantry(beams, source)
    return Plan(
        source=source,
        sop_class_uid=sop_class,
        sop_instance_uid=_text(ds, "SOPInstanceUID"),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        study_id=_text(ds, "StudyID"),
        referring_physician_name=_text(ds, "ReferringPhysicianName"),
        accession_number=_text(ds, "AccessionNumber"),
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        rt_plan_label=_text(ds, "RTPlanLabel"),
        machine_name=machine_name,
        gantry=gantry,
        beams=tuple(beams),
        setup_beam_numbers=tuple(setup_numbers),
    )


def _beam_items(ds: Dataset, source: str, sop_class: str) -> list[Dataset]:
    ion = ds.get("IonBeamSequence")
    if ion is not None:
        return list(ion)
    if sop_class == RT_ION_PLAN_STORAGE:
        raise IngestError("rtplan_parse_failed", f"{source}: RT Ion Plan without IonBeamSequence")
    items = list(ds.get("BeamSequence") or [])
    kinds = sorted(
        {
            _text(item, "RadiationType") or "unknown"
            for item in items
            if not is_setup_beam(
                _text(item, "BeamName"),
                _text(item, "BeamDescription"),
                _text(item, "TreatmentDeliveryType"),
            )
        }
    )
    if not items or not kinds or not set(kinds) <= _ION_RADIATION_TYPES:
        what = ", ".join(kinds) if kinds else "no treatment beams"
        raise IngestError(
            "not_ion_plan", f"{source} has no IonBeamSequence; its BeamSequence holds {what}"
        )
    return items


def _beam_number(item: Dataset, source: str, position: int) -> int:
    value = item.get("BeamNumber")
    if value is None or str(value).strip() == "":
        raise IngestError("rtplan_parse_failed", f"{source}: beam #{position} has no BeamNumber")
    return int(value)


def _control_points(item: Dataset) -> list[Dataset]:
    seq = item.get("IonControlPointSequence")
    if seq is None:
        seq = item.get("ControlPointSequence")
    return list(seq or [])


def _layer_energies(control_points: list[Dataset]) -> tuple[float, ...]:
    energies: list[float] = []
    for cp in control_points:
        value = cp.get("NominalBeamEnergy")
        if value is None or str(value).strip() == "":
            continue
        energy = float(value)
        if not energies or energy != energies[-1]:
            energies.append(energy)
    return tuple(energies)


def _plan_gantry(beams: list[PlanBeam], source: str) -> tuple[str, int]:
    gantries: dict[int, list[str]] = {}
    for beam in beams:
        gantry = gantry_number(beam.machine_name)
        if gantry is None:
            raise IngestError(
                "unknown_machine",
                f"{source}: beam {beam.beam_number} ({beam.beam_name}) has TreatmentMachineName "
                f"{beam.machine_name!r}, which names neither gantry 1 nor gantry 2 (or both)",
            )
        gantries.setdefault(gantry, []).append(beam.machine_name)
    if len(gantries) != 1:
        names = sorted({b.machine_name for b in beams})
        raise IngestError(
            "unknown_machine", f"{source}: treatment beams disagree on the machine: {names}"
        )
    (gantry,) = gantries
    return beams[0].machine_name, gantry


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        # a backslash in a text value splits it into values; keep the text as it was sent
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()


def _has_dicom_magic(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def _read_dataset(data: bytes, source: str) -> Dataset:
    if not _has_dicom_magic(data):
        raise IngestError("rtplan_parse_failed", f"{source} is not a DICOM file")
    try:
        _check_complete(data)
    except _BrokenFile as exc:
        raise IngestError("rtplan_parse_failed", f"{source} is damaged: {exc}") from exc
    try:
        return pydicom.dcmread(io.BytesIO(data))
    # pydicom raises many exception types for malformed input; all mean the same here
    except Exception as exc:
        raise IngestError("rtplan_parse_failed", f"{source}: {exc}") from exc


class _BrokenFile(Exception):
    """The DICOM byte stream ends early or is structurally wrong."""


# pydicom silently returns a partial dataset for many truncated files, so the
# element structure is walked first: every length must fit and every
# undefined-length sequence and item must be closed before the end of the file.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
_DEFLATED = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1"})


@dataclass(frozen=True, slots=True)
class _Encoding:
    little: bool
    implicit: bool


_META = _Encoding(little=True, implicit=False)


def _check_complete(data: bytes) -> None:
    end = len(data)
    pos = 132
    syntax = ""
    for tag, value_pos, length in _meta_elements(data, pos):
        if tag == 0x00020010:
            syntax = (
                data[value_pos : value_pos + length].rstrip(b"\x00 ").decode("ascii", "replace")
            )
        pos = value_pos + length
    if syntax in _DEFLATED:
        return
    encoding = _Encoding(little=syntax != _EXPLICIT_BE, implicit=syntax == _IMPLICIT_LE)
    _walk_dataset(data, pos, end, encoding, in_item=False)


def _meta_elements(data: bytes, pos: int) -> Iterator[tuple[int, int, int]]:
    end = len(data)
    while pos + 8 <= end and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        tag, value_pos, length = _element_header(data, pos, end, _META)
        if length == _UNDEFINED or value_pos + length > end:
            raise _BrokenFile(f"file meta element {tag:08X} runs past the end")
        yield tag, value_pos, length
        pos = value_pos + length


def _element_header(data: bytes, pos: int, end: int, enc: _Encoding) -> tuple[int, int, int]:
    order = "<" if enc.little else ">"
    if pos + 8 > end:
        raise _BrokenFile(f"element header cut at byte {pos} of {end}")
    group, element = struct.unpack_from(order + "HH", data, pos)
    tag = group << 16 | element
    if enc.implicit or group == 0xFFFE:
        return tag, pos + 8, struct.unpack_from(order + "L", data, pos + 4)[0]
    if data[pos + 4 : pos + 6] in _LONG_VRS:
        if pos + 12 > end:
            raise _BrokenFile(f"element header cut at byte {pos} of {end}")
        return tag, pos + 12, struct.unpack_from(order + "L", data, pos + 8)[0]
    return tag, pos + 8, struct.unpack_from(order + "H", data, pos + 6)[0]


def _walk_dataset(data: bytes, pos: int, end: int, enc: _Encoding, *, in_item: bool) -> int:
    while pos < end:
        tag, value_pos, length = _element_header(data, pos, end, enc)
        if tag == _ITEM_END:
            if in_item:
                return value_pos
            raise _BrokenFile(f"item delimiter outside an item at byte {pos}")
        if length == _UNDEFINED:
            pos = _walk_items(data, value_pos, end, enc)
        elif value_pos + length > end:
            raise _BrokenFile(f"element {tag:08X} needs {length} bytes, {end - value_pos} remain")
        else:
            pos = value_pos + length
    if in_item:
        raise _BrokenFile("an item of undefined length is not closed")
    return pos


def _walk_items(data: bytes, pos: int, end: int, enc: _Encoding) -> int:
    order = "<" if enc.little else ">"
    while True:
        if pos + 8 > end:
            raise _BrokenFile("a sequence of undefined length is not closed")
        group, element, length = struct.unpack_from(order + "HHL", data, pos)
        tag = group << 16 | element
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _BrokenFile(f"expected a sequence item, found {tag:08X} at byte {pos - 8}")
        if length == _UNDEFINED:
            pos = _walk_dataset(data, pos, end, enc, in_item=True)
        elif pos + length > end:
            raise _BrokenFile(f"an item needs {length} bytes, {end - pos} remain")
        else:
            pos += length
