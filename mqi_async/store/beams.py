"""The `beams` table: one row holds a beam's whole workflow state; status changes are audited."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping, Sequence

from mqi_async.domain.model import BeamStatus, check_beam_transition
from mqi_async.domain.records import BeamRow, NewBeam
from mqi_async.store import events
from mqi_async.store.columns import (
    Encoder,
    SqlValue,
    as_beam_status,
    as_count,
    as_int_list,
    as_percent,
    as_str_list,
    as_text,
    as_time,
    decode_int_list,
    decode_optional_time,
    decode_str_list,
    decode_time,
    encode_changes,
    set_clause,
)
from mqi_async.store.session import Session


def beam_id_for(case_id: str, beam_index: int) -> str:
    """`<case_id>_beam_<k>`, k the 1-based index among the plan's treatment beams."""
    return f"{case_id}_beam_{beam_index}"


COLUMN_NAMES = (
    "beam_id",
    "case_id",
    "beam_index",
    "beam_number",
    "beam_name",
    "delivery_path",
    "status",
    "resume_status",
    "progress",
    "error",
    "attempts",
    "host",
    "gpu_uuids",
    "not_before_at",
    "transfer_done_bytes",
    "transfer_total_bytes",
    "outputs",
    "created_at",
    "updated_at",
    "gpu_indices",
    "attempts_base",
)
COLUMNS = ", ".join(COLUMN_NAMES)

#: Columns a caller may set through `changes`; status and attempts have their own paths.
CHANGEABLE: Mapping[str, Encoder] = {
    "progress": as_percent,
    "error": as_text,
    "resume_status": as_beam_status,
    "host": as_text,
    "gpu_uuids": as_str_list,
    "not_before_at": as_time,
    "transfer_done_bytes": as_count,
    "transfer_total_bytes": as_count,
    "outputs": as_str_list,
    "gpu_indices": as_int_list,
    "attempts_base": as_count,
}

ACTIVE_STATUSES: tuple[str, ...] = tuple(str(s) for s in BeamStatus if not s.is_terminal)
TERMINAL_STATUSES: tuple[str, ...] = tuple(str(s) for s in BeamStatus if s.is_terminal)
_RESUMABLE = frozenset(ACTIVE_STATUSES) - {str(BeamStatus.PAUSED)}


def beam_from(row: sqlite3.Row) -> BeamRow:
    resume = row["resume_status"]
    return BeamRow(
        beam_id=row["beam_id"],
        case_id=row["case_id"],
        beam_index=row["beam_index"],
        beam_number=row["beam_number"],
        beam_name=row["beam_name"],
        delivery_path=row["delivery_path"],
        status=BeamStatus(row["status"]),
        resume_status=None if resume is None else BeamStatus(resume),
        progress=row["progress"],
        error=row["error"],
        attempts=row["attempts"],
        host=row["host"],
        gpu_uuids=decode_str_list(row["gpu_uuids"]),
        not_before_at=decode_optional_time(row["not_before_at"]),
        transfer_done_bytes=row["transfer_done_bytes"],
        transfer_total_bytes=row["transfer_total_bytes"],
        outputs=decode_str_list(row["outputs"]),
        created_at=decode_time(row["created_at"]),
        updated_at=decode_time(row["updated_at"]),
        gpu_indices=decode_int_list(row["gpu_indices"]),
        attempts_base=row["attempts_base"],
    )


def placeholders(count: int) -> str:
    return ", ".join("?" * count)


class Beams:
    """Queries on `beams`."""

    __slots__ = ("_events", "_s")

    def __init__(self, session: Session) -> None:
        self._s = session
        self._events = events.Events(session)

    async def insert_many(self, case_id: str, beams: Sequence[NewBeam]) -> None:
        """Add PENDING beams to a case (the caller has checked the case has none)."""
        indexes = [b.beam_index for b in beams]
        if len(set(indexes)) != len(indexes):
            raise ValueError(f"case {case_id!r}: duplicate beam_index in {indexes}")
        at = self._s.at_text
        await self._s.execute_many(
            "INSERT INTO beams (beam_id, case_id, beam_index, beam_number, beam_name,"
            " delivery_path, status, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    beam_id_for(case_id, b.beam_index),
                    case_id,
                    b.beam_index,
                    b.beam_number,
                    b.beam_name,
                    b.delivery_path,
                    str(BeamStatus.PENDING),
                    at,
                    at,
                )
                for b in beams
            ],
        )

    async def get(self, beam_id: str) -> BeamRow | None:
        row = await self._s.row(f"SELECT {COLUMNS} FROM beams WHERE beam_id = ?", (beam_id,))
        return None if row is None else beam_from(row)

    async def require(self, beam_id: str) -> BeamRow:
        beam = await self.get(beam_id)
        if beam is None:
            raise LookupError(f"unknown beam {beam_id!r}")
        return beam

    async def of_case(self, case_id: str) -> list[BeamRow]:
        """The beams of one case, by beam index."""
        rows = await self._s.rows(
            f"SELECT {COLUMNS} FROM beams WHERE case_id = ? ORDER BY beam_index", (case_id,)
        )
        return [beam_from(r) for r in rows]

    async def active(self) -> list[BeamRow]:
        """Every non-terminal beam (PAUSED included), in scheduling order.

        Higher case priority first, then older cases, then beam index.
        """
        rows = await self._s.rows(
            f"SELECT {', '.join('b.' + c for c in COLUMN_NAMES)}"
            " FROM beams AS b INDEXED BY idx_beams_status JOIN cases AS c ON c.case_id = b.case_id"
            f" WHERE b.status IN ({placeholders(len(ACTIVE_STATUSES))})"
            " ORDER BY c.priority DESC, c.created_at, c.rowid, b.beam_index",
            ACTIVE_STATUSES,
        )
        return [beam_from(r) for r in rows]

    async def in_statuses(self, statuses: Collection[BeamStatus]) -> list[BeamRow]:
        """Beams in any of the statuses, in scheduling order (as `active`)."""
        wanted = tuple(str(st) for st in statuses)
        if not wanted:
            return []
        rows = await self._s.rows(
            f"SELECT {', '.join('b.' + c for c in COLUMN_NAMES)}"
            " FROM beams AS b INDEXED BY idx_beams_status JOIN cases AS c ON c.case_id = b.case_id"
            f" WHERE b.status IN ({placeholders(len(wanted))})"
            " ORDER BY c.priority DESC, c.created_at, c.rowid, b.beam_index",
            wanted,
        )
        return [beam_from(r) for r in rows]

    async def transition(
        self,
        beam_id: str,
        status: BeamStatus,
        *,
        changes: Mapping[str, object] | None = None,
        message: str = "",
        data: Mapping[str, object] | None = None,
    ) -> BeamRow:
        """Move a beam to `status` (checked against the transition table) and audit it.

        Going to PAUSED remembers the current status in `resume_status` unless `changes`
        names one; any other status clears it. The `events` row is written in the same
        transaction, with `from` and `to` added to `data`.

        Raises:
            IllegalTransitionError: the table forbids the move; nothing is written.
            LookupError: no such beam.
        """
        self._s.require_writable()
        current = await self.require(beam_id)
        check_beam_transition(current.status, status)
        values = encode_changes("beams", CHANGEABLE, changes or {})
        resume = values.get("resume_status")
        if status == BeamStatus.PAUSED:
            if resume is None:
                resume = str(current.status)
                if current.status == BeamStatus.PAUSED and current.resume_status is not None:
                    resume = str(current.resume_status)
            if resume not in _RESUMABLE:
                raise ValueError(f"a paused beam cannot resume at {resume!r}")
        elif resume is not None:
            raise ValueError("resume_status is set only by a transition to PAUSED")
        values["resume_status"] = resume
        values["status"] = str(status)
        await self._update(beam_id, values)
        await self._events.append(
            events.BEAM_STATUS,
            message or f"{current.status} -> {status}",
            case_id=current.case_id,
            beam_id=beam_id,
            data={**(data or {}), "from": str(current.status), "to": str(status)},
        )
        return await self.require(beam_id)

    async def update(self, beam_id: str, changes: Mapping[str, object]) -> BeamRow:
        """Change columns other than the status (progress, transfer bytes, …); not audited."""
        self._s.require_writable()
        values = encode_changes("beams", CHANGEABLE, changes)
        if "resume_status" in values:
            raise ValueError("resume_status changes only with a transition to or from PAUSED")
        if not await self._update(beam_id, values):
            raise LookupError(f"unknown beam {beam_id!r}")
        return await self.require(beam_id)

    async def _update(self, beam_id: str, values: dict[str, SqlValue]) -> int:
        values["updated_at"] = self._s.at_text
        return await self._s.execute(
            f"UPDATE beams SET {set_clause(values)} WHERE beam_id = ?",
            (*values.values(), beam_id),
        )
