"""All cases with their beams in one consistent read, in the shape of `status --json`."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from mqi_async.domain.model import BeamStatus, CaseStatus, case_progress
from mqi_async.domain.records import DeliveryRow, DoseCheckRow
from mqi_async.domain.verdict import QaStatus, worst
from mqi_async.store.columns import SqlValue, decode_optional_time, decode_str_list, decode_time
from mqi_async.store.deliveries import DELIVERY_COLUMNS, delivery_from_row
from mqi_async.store.dose_checks import DOSE_CHECK_COLUMNS, dose_check_from_row
from mqi_async.store.session import Session

#: the `qa` object of a beam whose dose check has no verdict yet
_PENDING_QA = DoseCheckRow(case_id="", beam_id=None, status=QaStatus.PENDING).as_status()


@dataclass(frozen=True, slots=True, kw_only=True)
class BeamSnapshot:
    """A beam as `status` shows it; `as_dict()` is exactly the CONTRACT.md beam object."""

    beam_id: str
    beam_number: int | None
    status: BeamStatus
    host: str | None
    gpus: tuple[str, ...]
    attempts: int
    progress: int
    outputs: tuple[str, ...]
    error: str | None
    # for the TUI; not part of `status --json`
    beam_name: str | None
    resume_status: BeamStatus | None
    not_before_at: datetime | None
    transfer_done_bytes: int
    transfer_total_bytes: int
    updated_at: datetime | None = None
    #: the planned-vs-delivered dose check; None while pending
    qa: DoseCheckRow | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "beam_id": self.beam_id,
            "beam_number": self.beam_number,
            "status": str(self.status),
            "host": self.host,
            "gpus": list(self.gpus),
            "attempts": self.attempts,
            "progress": self.progress,
            "outputs": list(self.outputs),
            "error": self.error,
            "qa": self.qa.as_status() if self.qa is not None else dict(_PENDING_QA),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseSnapshot:
    """A case as `status` shows it; `as_dict()` is exactly the CONTRACT.md case object."""

    case_id: str
    room: str | None
    status: CaseStatus
    progress: int
    error: str | None
    case_path: str
    beams: tuple[BeamSnapshot, ...]
    # for the TUI; not part of `status --json`
    priority: int
    created_at: datetime
    updated_at: datetime
    #: every delivery folder of every fraction, with its delivery check
    deliveries: tuple[DeliveryRow, ...] = ()
    #: the plan-sum dose check; None while pending
    plan_qa: DoseCheckRow | None = None
    #: the case report's PDF; None while none has been written
    report: str | None = None

    @property
    def qa(self) -> DoseCheckRow:
        """The case's verdict: the plan sum's numbers, and the worst status of all its checks
        (the plan sum, every beam, every delivery) once none is pending."""
        plan = self.plan_qa or DoseCheckRow(
            case_id=self.case_id, beam_id=None, status=QaStatus.PENDING
        )
        parts = [plan.status]
        parts += [b.qa.status if b.qa else QaStatus.PENDING for b in self.beams]
        parts += [d.qa_status for d in self.deliveries]
        # final only once every check has its verdict
        status = QaStatus.PENDING if QaStatus.PENDING in parts else worst(parts)
        reason = plan.reason
        if status != plan.status and reason is None:
            reason = _worst_reason(status, self.beams, self.deliveries)
        return DoseCheckRow(
            case_id=self.case_id,
            beam_id=None,
            status=status,
            reason=reason,
            result=plan.result,
            checked_at=plan.checked_at,
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "case_id": self.case_id,
            "room": self.room,
            "status": str(self.status),
            "progress": self.progress,
            "error": self.error,
            "case_path": self.case_path,
            "beams": [b.as_dict() for b in self.beams],
            "qa": self.qa.as_status(report=self.report),
            "deliveries": [d.as_status() for d in self.deliveries],
        }


def _worst_reason(
    status: QaStatus, beams: Sequence[BeamSnapshot], deliveries: Sequence[DeliveryRow]
) -> str | None:
    """Which part makes the case's verdict `status` (a beam or a delivery), in words."""
    for b in beams:
        if b.qa is not None and b.qa.status == status:
            return f"{b.beam_id}: {status}" + (f" ({b.qa.reason})" if b.qa.reason else "")
    for d in deliveries:
        if d.qa_status == status:
            return f"delivery {d.folder}: {status}" + (f" ({d.qa_reason})" if d.qa_reason else "")
    return None


def status_document(cases: list[CaseSnapshot]) -> dict[str, object]:
    """The whole `status --json` object: `{"cases": [...]}`."""
    return {"cases": [c.as_dict() for c in cases]}


def _progress(status: CaseStatus, stored: int, beams: Sequence[BeamSnapshot]) -> int:
    """While beams run, the case's progress is theirs (the one rule in domain.model)."""
    if status != CaseStatus.PROCESSING or not beams:
        return stored
    return case_progress([float(b.progress) for b in beams], [b.status for b in beams])


_BEAM_COLUMNS = (
    "case_id, beam_id, beam_number, status, host, gpu_uuids, attempts, progress, outputs, error,"
    " beam_name, resume_status, not_before_at, transfer_done_bytes, transfer_total_bytes,"
    " updated_at"
)
_CASE_COLUMNS = (
    "case_id, room, status, progress, error, case_path, priority, created_at, updated_at"
)
_TERMINAL = tuple(str(s) for s in CaseStatus if s.is_terminal)


def _beam_from(r: sqlite3.Row) -> BeamSnapshot:
    resume = r["resume_status"]
    return BeamSnapshot(
        beam_id=r["beam_id"],
        beam_number=r["beam_number"],
        status=BeamStatus(r["status"]),
        host=r["host"],
        gpus=decode_str_list(r["gpu_uuids"]),
        attempts=r["attempts"],
        progress=r["progress"],
        outputs=decode_str_list(r["outputs"]),
        error=r["error"],
        beam_name=r["beam_name"],
        resume_status=None if resume is None else BeamStatus(resume),
        not_before_at=decode_optional_time(r["not_before_at"]),
        transfer_done_bytes=r["transfer_done_bytes"],
        transfer_total_bytes=r["transfer_total_bytes"],
        updated_at=decode_time(r["updated_at"]),
    )


async def _cases_with_beams(
    session: Session, where: str = "", params: Sequence[SqlValue] = ()
) -> list[CaseSnapshot]:
    """Cases matching `where` (SQL on `cases`) with their beams, deliveries, checks and report
    (five queries, whatever the count)."""
    beams_of: dict[str, list[BeamSnapshot]] = {}
    deliveries_of: dict[str, list[DeliveryRow]] = {}
    checks: dict[str, DoseCheckRow] = {}
    # the service's own planned cases are never shown as cases
    where = f"{where} AND kind = 'treatment'" if where else "WHERE kind = 'treatment'"
    beam_filter = f" WHERE case_id IN (SELECT case_id FROM cases {where})"
    for r in await session.rows(
        f"SELECT {DOSE_CHECK_COLUMNS} FROM dose_checks{beam_filter}", params
    ):
        check = dose_check_from_row(r)
        checks[check.beam_id or check.case_id] = check
    for r in await session.rows(
        f"SELECT {_BEAM_COLUMNS} FROM beams{beam_filter} ORDER BY case_id, beam_index", params
    ):
        beam = _beam_from(r)
        beams_of.setdefault(r["case_id"], []).append(replace(beam, qa=checks.get(beam.beam_id)))
    for r in await session.rows(
        f"SELECT {DELIVERY_COLUMNS} FROM deliveries{beam_filter} ORDER BY case_id,"
        " fraction_index IS NULL, fraction_index, delivered_at, delivery_id",
        params,
    ):
        deliveries_of.setdefault(r["case_id"], []).append(delivery_from_row(r))
    reports = {
        r[0]: r[1]
        for r in await session.rows(
            f"SELECT case_id, pdf FROM reports{beam_filter} AND pdf IS NOT NULL", params
        )
    }
    return [
        CaseSnapshot(
            case_id=r["case_id"],
            room=r["room"],
            status=CaseStatus(r["status"]),
            progress=_progress(
                CaseStatus(r["status"]), r["progress"], beams_of.get(r["case_id"], ())
            ),
            error=r["error"],
            case_path=r["case_path"],
            beams=tuple(beams_of.get(r["case_id"], ())),
            priority=r["priority"],
            created_at=decode_time(r["created_at"]),
            updated_at=decode_time(r["updated_at"]),
            deliveries=tuple(deliveries_of.get(r["case_id"], ())),
            plan_qa=checks.get(r["case_id"]),
            report=reports.get(r["case_id"]),
        )
        for r in await session.rows(
            f"SELECT {_CASE_COLUMNS} FROM cases {where} ORDER BY created_at, rowid", params
        )
    ]


async def read_snapshot(session: Session) -> list[CaseSnapshot]:
    """Every case in creation order with its beams by index: two queries, whatever the count."""
    return await _cases_with_beams(session)


async def read_case_snapshot(session: Session, case_id: str) -> CaseSnapshot | None:
    """One treatment case with its beams, deliveries, checks and report."""
    found = await _cases_with_beams(session, "WHERE case_id = ?", (case_id,))
    return found[0] if found else None


@dataclass(frozen=True, slots=True, kw_only=True)
class DashboardCounts:
    """Whole-database counts for the dashboard header, from covering-index scans."""

    cases_by_status: dict[str, int]
    beams_by_status: dict[str, int]


async def read_dashboard_cases(
    session: Session, *, recent: int = 200, text: str = ""
) -> tuple[list[CaseSnapshot], DashboardCounts]:
    """What the dashboard shows: every unfinished case plus the `recent` newest (or, with
    `text`, the cases whose id, status or room contains it), and whole-database counts.

    Bounded by what is on screen, so it stays fast with years of history in the database.
    """
    if text:
        like = f"%{text}%"
        where = (
            "WHERE case_id IN (SELECT case_id FROM cases WHERE case_id LIKE ? OR status LIKE ?"
            " OR room LIKE ? ORDER BY created_at DESC LIMIT ?)"
        )
        params: tuple[SqlValue, ...] = (like, like, like, recent)
    else:
        where = (
            "WHERE case_id IN (SELECT case_id FROM cases INDEXED BY idx_cases_status"
            f" WHERE status NOT IN ({', '.join('?' * len(_TERMINAL))})"
            " UNION SELECT case_id FROM (SELECT case_id FROM cases"
            " ORDER BY created_at DESC LIMIT ?))"
        )
        params = (*_TERMINAL, recent)
    cases = await _cases_with_beams(session, where, params)
    by_case = {
        r[0]: r[1]
        for r in await session.rows(
            "SELECT status, COUNT(*) FROM cases WHERE kind = 'treatment' GROUP BY status"
        )
    }
    by_beam = {
        r[0]: r[1] for r in await session.rows("SELECT status, COUNT(*) FROM beams GROUP BY status")
    }
    return cases, DashboardCounts(cases_by_status=by_case, beams_by_status=by_beam)
