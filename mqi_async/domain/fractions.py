"""Deliveries of a case: PlanInfo.txt, delivery times, fractions, the reference fraction, beam jobs."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo
from enum import StrEnum
from pathlib import PurePath

from mqi_async.domain.errors import IngestError
from mqi_async.domain.plan import Plan, PlanBeam

DEFAULT_FRACTION_WINDOW = timedelta(minutes=60)

_DIGITS = re.compile(r"[0-9]{1,9}")
_STAMP = re.compile(r"([0-9]{14})([0-9]*)")
_FOLDER_STAMP = re.compile(r"([0-9]{14})([0-9]*)(?:[^0-9].*)?", re.DOTALL)
_BEAM_SUFFIX = re.compile(r".*[^0-9]([0-9]{1,3})")
_NOT_ALNUM = re.compile(r"[^0-9a-z]+")


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanInfo:
    """One delivery folder's PlanInfo.txt (domain.md §1.3)."""

    patient_id: str
    beam_number: int
    study_uid: str = ""
    #: TCSC_IRRAD_DATETIME as written ("" when absent)
    irrad_datetime: str = ""
    tcsc_patient_id: str = ""
    tcsc_plan_number: int | None = None
    tcsc_field_number: int | None = None
    start_layer_number: int | None = None
    stop_layer_number: int | None = None
    #: every KEY,value line, keys upper-cased, in file order
    entries: tuple[tuple[str, str], ...] = ()

    def get(self, key: str, default: str = "") -> str:
        for name, value in self.entries:
            if name == key:
                return value
        return default


def parse_planinfo(text: str | bytes) -> PlanInfo:
    """Parse PlanInfo.txt: `KEY,value` lines; CRLF, a BOM, blank lines and spaces are fine.

    Raises:
        IngestError: planinfo_invalid when DICOM_PATIENT_ID or DICOM_BEAM_NUMBER is
            missing, empty, not a number, or given twice with different values.
    """
    if isinstance(text, bytes):
        text = decode_planinfo(text)
    values: dict[str, str] = {}
    entries: list[tuple[str, str]] = []
    for raw_line in text.lstrip("\ufeff").splitlines():
        line = raw_line.strip()
        if "," not in line:
            continue
        key, _, value = line.partition(",")
        key, value = key.strip().upper(), value.strip()
        if key in values and values[key] != value and key in _REQUIRED:
            raise IngestError(
                "planinfo_invalid", f"{key} is given twice ({values[key]!r}, {value!r})"
            )
        values.setdefault(key, value)
        entries.append((key, value))
    missing = [key for key in _REQUIRED if not values.get(key)]
    if missing:
        raise IngestError("planinfo_invalid", f"missing or empty {', '.join(missing)}")
    beam_number = _int_or_none(values["DICOM_BEAM_NUMBER"])
    if beam_number is None:
        raise IngestError(
            "planinfo_invalid",
            f"DICOM_BEAM_NUMBER {values['DICOM_BEAM_NUMBER']!r} is not a beam number",
        )
    return PlanInfo(
        patient_id=values["DICOM_PATIENT_ID"],
        beam_number=beam_number,
        study_uid=values.get("DICOM_STUDY_INS_UID", ""),
        irrad_datetime=values.get("TCSC_IRRAD_DATETIME", ""),
        tcsc_patient_id=values.get("TCSC_PATIENT_ID", ""),
        tcsc_plan_number=_int_or_none(values.get("TCSC_PLAN_NUMBER", "")),
        tcsc_field_number=_int_or_none(values.get("TCSC_FIELD_NUMBER", "")),
        start_layer_number=_int_or_none(values.get("START_LAYER_NUMBER", "")),
        stop_layer_number=_int_or_none(values.get("STOP_LAYER_NUMBER", "")),
        entries=tuple(entries),
    )


_REQUIRED = ("DICOM_PATIENT_ID", "DICOM_BEAM_NUMBER")


def decode_planinfo(data: bytes) -> str:
    """PlanInfo bytes as text: UTF-8 (with or without BOM), else Latin-1 (never fails)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _int_or_none(value: str) -> int | None:
    # ASCII digits only and bounded: int() would accept "1_0" and other scripts' digits
    return int(value) if _DIGITS.fullmatch(value) else None


def parse_stamp(value: str) -> datetime | None:
    """`YYYYMMDDHHMMSS` plus optional fraction-of-second digits, or None."""
    match = _STAMP.fullmatch(value.strip())
    return _stamp_from(match) if match else None


def parse_folder_stamp(folder_name: str) -> datetime | None:
    """The timestamp a delivery folder name starts with (`2025010109301500`, `…_2`), or None."""
    match = _FOLDER_STAMP.fullmatch(folder_name)
    return _stamp_from(match) if match else None


def _stamp_from(match: re.Match[str]) -> datetime | None:
    head, fraction = match.group(1), match.group(2)[:6]
    year, month, day = int(head[0:4]), int(head[4:6]), int(head[6:8])
    hour, minute, second = int(head[8:10]), int(head[10:12]), int(head[12:14])
    try:
        stamp = datetime(year, month, day, hour, minute, second)
    except ValueError:
        return None
    if fraction:
        stamp += timedelta(microseconds=int(fraction.ljust(6, "0")))
    return stamp


def delivery_timestamp(planinfo: PlanInfo | None, folder_name: str) -> datetime:
    """When a delivery happened: TCSC_IRRAD_DATETIME, else the folder name.

    The result is naive: the treatment machine's local wall-clock time.

    Raises:
        IngestError: missing_delivery_timestamp when neither holds a timestamp.
    """
    if planinfo is not None and planinfo.irrad_datetime:
        stamp = parse_stamp(planinfo.irrad_datetime)
        if stamp is not None:
            return stamp
    stamp = parse_folder_stamp(folder_name)
    if stamp is None:
        raise IngestError(
            "missing_delivery_timestamp",
            f"delivery folder {folder_name!r} has no TCSC_IRRAD_DATETIME and its name is "
            "not a YYYYMMDDHHMMSS timestamp",
        )
    return stamp


def delivery_id(case_id: str, path: str) -> str:
    """The `deliveries` row id of a delivery folder: `<case_id>_delivery_<sha1(path)[:12]>`."""
    digest = hashlib.sha1(
        path.encode("utf-8", "surrogateescape"), usedforsecurity=False
    ).hexdigest()[:12]
    return f"{case_id}_delivery_{digest}"


class FractionStatus(StrEnum):
    #: every treatment beam delivered once
    COMPLETE = "complete"
    #: more deliveries than treatment beams (a beam delivered again)
    ANOMALY = "anomaly"
    #: beams missing, but the window is still open
    PENDING = "pending"
    #: beams missing and the window has closed
    PARTIAL = "partial"


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryInput:
    """What the file system says about one subfolder of case_path."""

    path: str
    #: PlanInfo.txt text, or None when the folder has none
    planinfo_text: str | None
    has_ptn: bool

    @property
    def folder_name(self) -> str:
        return PurePath(self.path).name

    @property
    def is_delivery(self) -> bool:
        return self.planinfo_text is not None or self.has_ptn


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """A delivery folder matched to a treatment beam."""

    path: str
    folder_name: str
    #: naive; the treatment machine's local wall-clock time
    delivered_at: datetime
    beam_number: int
    treatment_index: int
    planinfo: PlanInfo | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Fraction:
    """Deliveries within one start-anchored window."""

    index: int
    started_at: datetime
    window_ends_at: datetime
    status: FractionStatus
    deliveries: tuple[Delivery, ...]

    @property
    def treatment_indices(self) -> tuple[int, ...]:
        return tuple(sorted({d.treatment_index for d in self.deliveries}))

    @property
    def duplicate_indices(self) -> tuple[int, ...]:
        seen: set[int] = set()
        twice: set[int] = set()
        for delivery in self.deliveries:
            (twice if delivery.treatment_index in seen else seen).add(delivery.treatment_index)
        return tuple(sorted(twice))


def group_fractions(
    deliveries: Iterable[Delivery],
    *,
    expected_beams: int,
    now: datetime,
    window: timedelta = DEFAULT_FRACTION_WINDOW,
    local_tz: tzinfo | None = None,
) -> tuple[Fraction, ...]:
    """Group deliveries by time: a fraction starts at a delivery more than `window` after the
    current fraction's first delivery (start-anchored, so midnight does not split one).

    `now` may be naive (local) or aware; aware times are compared in `local_tz`
    (None: this host's zone), the zone the treatment machine writes.
    """
    local_now = _local_naive(now, local_tz)
    ordered = sorted(deliveries, key=lambda d: (d.delivered_at, d.folder_name))
    groups: list[list[Delivery]] = []
    for delivery in ordered:
        if groups and delivery.delivered_at <= groups[-1][0].delivered_at + window:
            groups[-1].append(delivery)
        else:
            groups.append([delivery])
    fractions: list[Fraction] = []
    for index, group in enumerate(groups, start=1):
        started_at = group[0].delivered_at
        ends_at = started_at + window
        fractions.append(
            Fraction(
                index=index,
                started_at=started_at,
                window_ends_at=ends_at,
                status=_fraction_status(group, expected_beams, is_open=local_now < ends_at),
                deliveries=tuple(group),
            )
        )
    return tuple(fractions)


def _fraction_status(group: list[Delivery], expected: int, *, is_open: bool) -> FractionStatus:
    distinct = len({d.treatment_index for d in group})
    if len(group) > expected:
        return FractionStatus.ANOMALY
    if distinct == expected:
        return FractionStatus.COMPLETE
    return FractionStatus.PENDING if is_open else FractionStatus.PARTIAL


def choose_reference(fractions: Sequence[Fraction]) -> Fraction:
    """The earliest complete fraction, else the earliest partial, else the earliest anomaly.

    Raises:
        IngestError: no_reference_fraction when none qualifies (only pending, or none).
    """
    for status in (FractionStatus.COMPLETE, FractionStatus.PARTIAL, FractionStatus.ANOMALY):
        for fraction in fractions:
            if fraction.status == status:
                return fraction
    summary = ", ".join(f"#{f.index} {f.status}" for f in fractions) or "no fractions"
    raise IngestError("no_reference_fraction", f"no fraction can be the reference ({summary})")


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedBeam:
    """A beam job to create: one per treatment beam, from the reference fraction."""

    treatment_index: int
    beam_number: int
    beam_name: str
    delivery_path: str
    delivery_folder: str
    delivered_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRecord:
    """One `deliveries` row; its id is `delivery_id(case_id, path)`."""

    path: str
    folder_name: str
    delivered_at: datetime
    beam_number: int
    treatment_index: int
    fraction_index: int
    fraction_status: FractionStatus
    is_reference: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseResolution:
    """A resolved case: its beam jobs, every delivery, the fractions and what was noticed."""

    beams: tuple[ResolvedBeam, ...]
    deliveries: tuple[DeliveryRecord, ...]
    fractions: tuple[Fraction, ...]
    reference_fraction_index: int
    #: fraction events worth a log line (re-delivered beams, anomaly or partial fractions)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Waiting:
    """A fraction window is still open; resolve again at `recheck_at`."""

    recheck_at: datetime
    fraction_index: int
    detail: str


def resolve_case(
    plan: Plan,
    deliveries: Iterable[DeliveryInput],
    *,
    now: datetime,
    window: timedelta = DEFAULT_FRACTION_WINDOW,
    local_tz: tzinfo | None = None,
) -> CaseResolution | Waiting:
    """Match delivery folders to the plan's treatment beams (domain.md §1.4 steps 2-10).

    Returns Waiting while any fraction's window is open and beams are missing;
    `recheck_at` is that window's end, naive or aware like `now`.

    Raises:
        IngestError: zero_expected_beams, missing_deliveries, planinfo_invalid,
            patient_id_mismatch, missing_delivery_timestamp, unresolved_folders,
            duplicate_beam_delivery, beam_count_mismatch.
    """
    if not plan.beams:
        raise IngestError("zero_expected_beams", f"{plan.source} has no treatment beams")
    inputs = sorted((d for d in deliveries if d.is_delivery), key=lambda d: d.path)
    if not inputs:
        raise IngestError(
            "missing_deliveries", "no subfolder of the case holds PlanInfo.txt or *.ptn files"
        )
    matched = _match_deliveries(plan, inputs)
    expected = len(plan.beams)
    fractions = group_fractions(
        matched, expected_beams=expected, now=now, window=window, local_tz=local_tz
    )
    pending = [f for f in fractions if f.status == FractionStatus.PENDING]
    if pending:
        first = min(pending, key=lambda f: f.window_ends_at)
        return Waiting(
            recheck_at=_like(now, first.window_ends_at, local_tz),
            fraction_index=first.index,
            detail=(
                f"fraction {first.index} has {len(first.treatment_indices)} of {expected} "
                f"beams; its window closes at {first.window_ends_at:%Y-%m-%d %H:%M:%S}"
            ),
        )
    reference = choose_reference(fractions)
    _check_reference(plan, reference)
    return CaseResolution(
        beams=tuple(_reference_beams(plan, reference)),
        deliveries=_records(fractions, reference.index),
        fractions=fractions,
        reference_fraction_index=reference.index,
        notes=tuple(_notes(fractions)),
    )


def list_deliveries(
    plan: Plan,
    deliveries: Iterable[DeliveryInput],
    *,
    now: datetime,
    window: timedelta = DEFAULT_FRACTION_WINDOW,
    local_tz: tzinfo | None = None,
) -> tuple[tuple[DeliveryRecord, ...], tuple[str, ...]]:
    """Every delivery folder of a case already resolved, with its fraction, and the problems.

    For a case whose beams exist: a fraction that arrives later (its window may still be
    open) is listed at once, so its delivery check needs no wait. Folders that match no beam
    are left out and described in the problems (`code: sentence`), never raised.
    """
    inputs = sorted((d for d in deliveries if d.is_delivery), key=lambda d: d.path)
    matched, problems = _match_each(plan, inputs)
    fractions = group_fractions(
        matched, expected_beams=len(plan.beams), now=now, window=window, local_tz=local_tz
    )
    records = _records(fractions, reference_index=None)
    notes = tuple(
        f"{code}: {sentence}" for code in _PROBLEM_ORDER for sentence in problems.get(code, [])
    )
    return records, notes


def _records(
    fractions: Sequence[Fraction], reference_index: int | None
) -> tuple[DeliveryRecord, ...]:
    return tuple(
        DeliveryRecord(
            path=d.path,
            folder_name=d.folder_name,
            delivered_at=d.delivered_at,
            beam_number=d.beam_number,
            treatment_index=d.treatment_index,
            fraction_index=f.index,
            fraction_status=f.status,
            is_reference=f.index == reference_index,
        )
        for f in fractions
        for d in f.deliveries
    )


def infer_beam_number(folder_name: str, plan: Plan) -> int | None:
    """A beam number from a folder name without PlanInfo: a numeric suffix that is a
    treatment BeamNumber, else a name part equal to one beam's name (ignoring case and
    punctuation); None when nothing or more than one beam matches."""
    suffix = _BEAM_SUFFIX.fullmatch(folder_name)
    if suffix and plan.beam_by_number(int(suffix.group(1))) is not None:
        return int(suffix.group(1))
    parts = {_NOT_ALNUM.sub("", p.casefold()) for p in re.split(r"[ _\-]+", folder_name)}
    parts.add(_NOT_ALNUM.sub("", folder_name.casefold()))
    hits = [b for b in plan.beams if _NOT_ALNUM.sub("", b.beam_name.casefold()) in parts - {""}]
    return hits[0].beam_number if len(hits) == 1 else None


def _match_deliveries(plan: Plan, inputs: list[DeliveryInput]) -> list[Delivery]:
    matched, problems = _match_each(plan, inputs)
    for code in _PROBLEM_ORDER:
        if code in problems:
            raise IngestError(code, "; ".join(problems[code]))
    return matched


def _match_each(
    plan: Plan, inputs: list[DeliveryInput]
) -> tuple[list[Delivery], dict[str, list[str]]]:
    """Every folder matched to a treatment beam, and code -> sentences for those that are not."""
    problems: dict[str, list[str]] = {}
    matched: list[Delivery] = []
    plan_patient = plan.patient_id.strip()
    for item in inputs:
        name = item.folder_name
        info: PlanInfo | None = None
        if item.planinfo_text is not None:
            try:
                info = parse_planinfo(item.planinfo_text)
            except IngestError as exc:
                problems.setdefault("planinfo_invalid", []).append(f"{name}: {exc.detail}")
                continue
            if info.patient_id.strip() != plan_patient:
                # the ids stay out of the text: errors travel to status, logs and notifications
                problems.setdefault("patient_id_mismatch", []).append(
                    f"{name}: its PlanInfo.txt DICOM_PATIENT_ID differs from the RTPLAN's"
                    " PatientID (compare the two files)"
                )
                continue
        try:
            stamp = delivery_timestamp(info, name)
        except IngestError as exc:
            problems.setdefault("missing_delivery_timestamp", []).append(exc.detail)
            continue
        number = info.beam_number if info is not None else infer_beam_number(name, plan)
        beam = plan.beam_by_number(number) if number is not None else None
        if beam is None:
            problems.setdefault("unresolved_folders", []).append(_unresolved(name, number, plan))
            continue
        matched.append(
            Delivery(
                path=item.path,
                folder_name=name,
                delivered_at=stamp,
                beam_number=beam.beam_number,
                treatment_index=beam.treatment_index,
                planinfo=info,
            )
        )
    return matched, problems


_PROBLEM_ORDER = (
    "planinfo_invalid",
    "patient_id_mismatch",
    "missing_delivery_timestamp",
    "unresolved_folders",
)


def _unresolved(name: str, number: int | None, plan: Plan) -> str:
    known = [b.beam_number for b in plan.beams]
    if number is None:
        return f"{name}: no PlanInfo.txt and no beam number in its name (plan beams {known})"
    if number in plan.setup_beam_numbers:
        return f"{name}: DICOM_BEAM_NUMBER {number} is a setup beam (treatment beams {known})"
    return f"{name}: DICOM_BEAM_NUMBER {number} is not in the RTPLAN (treatment beams {known})"


def _check_reference(plan: Plan, reference: Fraction) -> None:
    dupes = reference.duplicate_indices
    if dupes:
        folders = [
            f"{d.folder_name} (beam {d.beam_number})"
            for d in reference.deliveries
            if d.treatment_index in dupes
        ]
        raise IngestError(
            "duplicate_beam_delivery",
            f"reference fraction {reference.index} holds the same beam more than once: "
            + ", ".join(folders),
        )
    present = set(reference.treatment_indices)
    missing = [b for b in plan.beams if b.treatment_index not in present]
    if missing:
        names = ", ".join(f"{b.beam_number} ({b.beam_name})" for b in missing)
        raise IngestError(
            "beam_count_mismatch",
            f"reference fraction {reference.index} ({reference.status}, started "
            f"{reference.started_at:%Y-%m-%d %H:%M}) has {len(present)} of {len(plan.beams)} "
            f"treatment beams; missing beam(s) {names}",
        )


def _reference_beams(plan: Plan, reference: Fraction) -> Iterable[ResolvedBeam]:
    by_index = {d.treatment_index: d for d in reversed(reference.deliveries)}
    for beam in plan.beams:
        delivery = by_index[beam.treatment_index]
        yield _resolved(beam, delivery)


def _resolved(beam: PlanBeam, delivery: Delivery) -> ResolvedBeam:
    return ResolvedBeam(
        treatment_index=beam.treatment_index,
        beam_number=beam.beam_number,
        beam_name=beam.beam_name,
        delivery_path=delivery.path,
        delivery_folder=delivery.folder_name,
        delivered_at=delivery.delivered_at,
    )


def _notes(fractions: Sequence[Fraction]) -> Iterable[str]:
    for fraction in fractions:
        if fraction.duplicate_indices:
            yield (
                f"fraction {fraction.index}: beam index(es) {list(fraction.duplicate_indices)} "
                "delivered more than once"
            )
        if fraction.status in (FractionStatus.ANOMALY, FractionStatus.PARTIAL):
            yield (
                f"fraction {fraction.index} is {fraction.status} "
                f"({len(fraction.deliveries)} deliveries)"
            )


def _local_naive(moment: datetime, local_tz: tzinfo | None) -> datetime:
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(local_tz).replace(tzinfo=None)


def _like(now: datetime, local: datetime, local_tz: tzinfo | None) -> datetime:
    """A naive local time in the same form as `now` (naive, or aware in now's zone)."""
    if now.tzinfo is None:
        return local
    aware = local.replace(tzinfo=local_tz) if local_tz is not None else local.astimezone()
    return aware.astimezone(now.tzinfo)
