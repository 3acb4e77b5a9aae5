"""Rows of the database as frozen records: what the store writes and returns, what the engine reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from mqi_async.domain.model import BeamStatus, CaseStatus, RunStatus
from mqi_async.domain.verdict import QaStatus

if TYPE_CHECKING:
    # annotations only: importing them would load pydicom into every `status` call
    from mqi_async.domain.fractions import CaseResolution
    from mqi_async.domain.plan import Plan


@dataclass(frozen=True, slots=True, kw_only=True)
class NewBeam:
    """A treatment beam to register; its id is derived from the case id and `beam_index`."""

    beam_index: int
    #: DICOM BeamNumber (300A,00C0) from the RTPLAN
    beam_number: int | None
    beam_name: str | None = None
    #: the reference delivery folder of this beam
    delivery_path: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BeamRow:
    """One beam as stored."""

    beam_id: str
    case_id: str
    beam_index: int
    beam_number: int | None
    beam_name: str | None
    delivery_path: str | None
    status: BeamStatus
    #: where a PAUSED beam resumes; None otherwise
    resume_status: BeamStatus | None
    progress: int
    error: str | None
    #: MOQUI launches recorded for this beam (rows in `runs`)
    attempts: int
    host: str | None
    gpu_uuids: tuple[str, ...]
    #: retry backoff: the beam's next step does not start before this moment
    not_before_at: datetime | None
    transfer_done_bytes: int
    transfer_total_bytes: int
    #: absolute paths of the beam's RT Dose files
    outputs: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    #: nvidia-smi indices of the leased GPUs, for CUDA_VISIBLE_DEVICES
    gpu_indices: tuple[int, ...] = ()
    #: `attempts` when an operator last retried; the retry budget counts from here
    attempts_base: int = 0


class CommandKind(StrEnum):
    RETRY = "retry"
    CANCEL = "cancel"
    #: payload {"priority": int}
    PRIORITY = "priority"
    #: the case's dose and delivery checks are run again, and its report rebuilt
    RECHECK = "recheck"


class CommandStatus(StrEnum):
    PENDING = "pending"
    DONE = "done"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandRow:
    command_id: int
    requested_at: datetime
    kind: CommandKind
    case_id: str
    payload: Mapping[str, object]
    status: CommandStatus
    done_at: datetime | None
    #: what the service did, or why it refused
    result: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseRow:
    """One GPU held by one beam for one attempt."""

    host: str
    uuid: str
    beam_id: str
    #: the run attempt the lease was taken for (the beam's attempts + 1 at that moment)
    attempt: int
    leased_at: datetime


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRow:
    """One attempt of a beam on a host."""

    run_id: int
    beam_id: str
    #: 1 for the first launch of the beam, then 2, 3, …
    attempt: int
    host: str
    gpu_uuids: tuple[str, ...]
    #: the remote attempt directory
    job_dir: str
    #: process-group id or scheduler job id, once the job is started
    job_id: str | None
    status: RunStatus
    exit_code: int | None
    signal: str | None
    error: str | None
    started_at: datetime
    ended_at: datetime | None


class CaseKind(StrEnum):
    """A case from the scan directory, or the service's own run of a plan (its reference dose)."""

    TREATMENT = "treatment"
    #: MOQUI on the plan's own spots; never shown as a case, shared by every case of that plan
    PLANNED = "planned"


@dataclass(frozen=True, slots=True, kw_only=True)
class NewCase:
    """A case to register. Names are kept exactly as they are on disk."""

    case_id: str
    case_path: str
    #: a remote-path-safe, unique form of case_id (the caller's naming rule)
    safe_name: str
    room: str | None = None
    status: CaseStatus = CaseStatus.PENDING
    error: str | None = None
    priority: int = 0
    #: for a WAITING case: when to look at its deliveries again
    recheck_at: datetime | None = None
    plan_path: str | None = None
    gantry: int | None = None
    patient_id: str | None = None
    kind: CaseKind = CaseKind.TREATMENT


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseRow:
    """One case as stored."""

    case_id: str
    safe_name: str
    case_path: str
    room: str | None
    status: CaseStatus
    progress: int
    error: str | None
    priority: int
    created_at: datetime
    updated_at: datetime
    recheck_at: datetime | None
    interpreted_at: datetime | None
    retry_count: int
    postprocess_status: str | None
    postprocess_log: str | None
    plan_path: str | None
    gantry: int | None
    patient_id: str | None
    kind: CaseKind = CaseKind.TREATMENT
    #: a treatment case: the planned case whose runs are its beams' reference doses
    planned_case_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NewDelivery:
    """One delivery folder to register with its case."""

    delivery_id: str
    delivery_path: str
    delivered_at: datetime | None = None
    fraction_index: int | None = None
    #: DICOM_BEAM_NUMBER from PlanInfo.txt
    raw_beam_number: int | None = None
    #: the treatment beam (1-based k of `<case_id>_beam_<k>`) this delivery belongs to
    treatment_beam_index: int | None = None
    #: True for the deliveries of the reference fraction, the ones simulated
    is_reference: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedCase:
    """A case whose plan and deliveries were read and matched."""

    plan_path: str
    plan: Plan
    resolution: CaseResolution


@dataclass(frozen=True, slots=True, kw_only=True)
class SkippedFolder:
    """A folder in the scan directory that intake cannot take, shown in `status` and the
    dashboard: `path` is printable text (bytes that are not UTF-8 appear as `\\xNN`)."""

    path: str
    #: a named code: `folder_name_not_utf8`, `folder_unreadable`
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRow:
    delivery_id: str
    case_id: str
    beam_id: str | None
    delivery_path: str
    delivered_at: datetime | None
    fraction_index: int | None
    raw_beam_number: int | None
    treatment_beam_index: int | None
    is_reference: bool
    qa_status: QaStatus = QaStatus.PENDING
    #: `code: sentence` when the check was skipped or could not be computed
    qa_reason: str | None = None
    #: the check's summary numbers (qa.delivery.DeliveryCheck.summary), {} until checked
    qa_result: Mapping[str, object] | None = None
    qa_detail_path: str | None = None
    qa_checked_at: datetime | None = None
    qa_attempts: int = 0

    @property
    def folder(self) -> str:
        return self.delivery_path.rstrip("/").rsplit("/", 1)[-1]

    def as_status(self) -> dict[str, object]:
        """The `deliveries` entry of `status --json` (CONTRACT.md), plus reason and detail."""
        result = self.qa_result or {}
        return {
            "folder": self.folder,
            "fraction": self.fraction_index,
            "beam_number": self.raw_beam_number,
            "delivered_at": (
                None
                if self.delivered_at is None
                else self.delivered_at.astimezone().replace(tzinfo=None).isoformat()
            ),
            "qa_status": str(self.qa_status),
            "pass_rate_percent": result.get("pass_rate_percent"),
            "gamma_mean": result.get("gamma_mean"),
            "gamma_max": result.get("gamma_max"),
            "max_position_error_mm": result.get("max_position_error_mm"),
            "meterset_error_percent": result.get("meterset_error_percent"),
            "reason": self.qa_reason,
            "deviations": [
                d.get("code") for d in _dicts(result.get("deviations")) if d.get("code")
            ],
            "detail": self.qa_detail_path,
        }


def _dicts(value: object) -> list[Mapping[str, object]]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, Mapping)]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryToCheck:
    """A pending delivery and what its check needs from its case."""

    delivery: DeliveryRow
    room: str | None
    plan_path: str
    case_safe_name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DoseCheckRow:
    """The planned-vs-delivered dose check of one beam, or of a case's plan sum (beam_id None)."""

    case_id: str
    beam_id: str | None
    status: QaStatus
    #: `code: sentence` for skipped and error
    reason: str | None = None
    #: the gamma summary (pass_rate_percent, gamma_mean, …, seconds, reference, evaluated)
    result: Mapping[str, object] | None = None
    checked_at: datetime | None = None

    def as_status(self, *, report: str | None = None) -> dict[str, object]:
        """The `qa` object of `status --json` (CONTRACT.md "Dose checks")."""
        result = self.result or {}
        return {
            "status": str(self.status),
            "pass_rate_percent": result.get("pass_rate_percent"),
            "gamma_mean": result.get("gamma_mean"),
            "gamma_max": result.get("gamma_max"),
            "evaluated_points": result.get("evaluated_points"),
            "reason": self.reason,
            "report": report,
        }


@dataclass(frozen=True, slots=True)
class TpsDoseFiles:
    """Planned RT Doses of a plan found in a case folder: per DICOM BeamNumber, and the sum."""

    beams: Mapping[int, str]
    plan: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportRow:
    """The case report last built (or the failure of the last try) and the verdicts it shows."""

    case_id: str
    pdf: str | None
    html: str | None
    #: the case verdict printed on it
    verdict: str | None
    #: `code: sentence` when the last build failed
    error: str | None
    attempts: int
    built_at: datetime
