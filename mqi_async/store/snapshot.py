"""All cases with their beams in one consistent read, in the shape of `status --json`."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from mqi_async.domain.model import BeamStatus, CaseStatus, case_progress
from mqi_async.domain.records import DeliveryRow
from mqi_async.store.columns import SqlValue, decode_optional_time, decode_str_list, decode_time
from mqi_async.store.deliveries import DELIVERY_COLUMNS, delivery_from_row
from mqi_async.store.session import Session


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

    def as_dict(self) -> dict[str, object]:
        return {
            "case_id": self.case_id,
            "room": self.room,
            "status": str(self.status),
            "progress": self.progress,
            "error": self.error,
            "case_path": self.case_path,
            "beams": [b.as_dict() for b in self.beams],
            "deliveries": [d.as_status() for d in self.deliveries],
        }


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
    """Cases matching `where` (SQL on `cases`) with their beams and deliveries: three queries."""
    beams_of: dict[str, list[BeamSnapshot]] = {}
    deliveries_of: dict[str, list[DeliveryRow]] = {}
    beam_filter = f" WHERE case_id IN (SELECT case_id FROM cases {where})" if where else ""
    for r in await session.rows(
        f"SELECT {_BEAM_COLUMNS} FROM beams{beam_filter} ORDER BY case_id, beam_index", params
    ):
        beams_of.setdefault(r["case_id"], []).append(_beam_from(r))
    for r in await session.rows(
        f"SELECT {DELIVERY_COLUMNS} FROM deliveries{beam_filter} ORDER BY case_id,"
        " fraction_index IS NULL, fraction_index, delivered_at, delivery_id",
        params,
    ):
        deliveries_of.setdefault(r["case_id"], []).append(delivery_from_row(r))
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
        )
        for r in await session.rows(
            f"SELECT {_CASE_COLUMNS} FROM cases {where} ORDER BY created_at, rowid", params
        )
    ]


async def read_snapshot(session: Session) -> list[CaseSnapshot]:
    """Every case in creation order with its beams by index: two queries, whatever the count."""
    return await _cases_with_beams(session)


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
        r[0]: r[1] for r in await session.rows("SELECT status, COUNT(*) FROM cases GROUP BY status")
    }
    by_beam = {
        r[0]: r[1] for r in await session.rows("SELECT status, COUNT(*) FROM beams GROUP BY status")
    }
    return cases, DashboardCounts(cases_by_status=by_case, beams_by_status=by_beam)
