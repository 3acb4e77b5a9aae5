"""The `cases` table: registering a case with its beams and deliveries, audited changes."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Mapping, Sequence

from mqi_async.domain.model import CaseStatus, check_case_transition
from mqi_async.domain.records import BeamRow, CaseKind, CaseRow, NewBeam, NewCase, NewDelivery
from mqi_async.store import events
from mqi_async.store.beams import Beams, placeholders
from mqi_async.store.columns import (
    Encoder,
    SqlValue,
    as_count,
    as_int,
    as_path_text,
    as_percent,
    as_text,
    as_time,
    decode_optional_time,
    decode_time,
    encode_changes,
    encode_time,
    set_clause,
)
from mqi_async.store.deliveries import Deliveries
from mqi_async.store.session import Session

_NAMES = (
    "case_id",
    "safe_name",
    "case_path",
    "room",
    "status",
    "progress",
    "error",
    "priority",
    "created_at",
    "updated_at",
    "recheck_at",
    "interpreted_at",
    "retry_count",
    "postprocess_status",
    "postprocess_log",
    "plan_path",
    "gantry",
    "patient_id",
    "kind",
    "planned_case_id",
)
_COLUMNS = ", ".join(_NAMES)
#: the columns as `c.<name>`, for queries that join `cases c`
CASE_COLUMNS_AS_C = ", ".join(f"c.{n}" for n in _NAMES)

#: Columns a caller may set through `changes`; the status has its own path.
CHANGEABLE: Mapping[str, Encoder] = {
    "progress": as_percent,
    "error": as_text,
    "priority": as_int,
    "recheck_at": as_time,
    "interpreted_at": as_time,
    "retry_count": as_count,
    "postprocess_status": as_text,
    "postprocess_log": as_path_text,
    "plan_path": as_path_text,
    "gantry": as_int,
    "patient_id": as_text,
    "planned_case_id": as_text,
}


def case_from_row(row: sqlite3.Row) -> CaseRow:
    return CaseRow(
        case_id=row["case_id"],
        safe_name=row["safe_name"],
        case_path=row["case_path"],
        room=row["room"],
        status=CaseStatus(row["status"]),
        progress=row["progress"],
        error=row["error"],
        priority=row["priority"],
        created_at=decode_time(row["created_at"]),
        updated_at=decode_time(row["updated_at"]),
        recheck_at=decode_optional_time(row["recheck_at"]),
        interpreted_at=decode_optional_time(row["interpreted_at"]),
        retry_count=row["retry_count"],
        postprocess_status=row["postprocess_status"],
        postprocess_log=row["postprocess_log"],
        plan_path=row["plan_path"],
        gantry=row["gantry"],
        patient_id=row["patient_id"],
        kind=CaseKind(row["kind"]),
        planned_case_id=row["planned_case_id"],
    )


class Cases:
    """Queries on `cases` (and the beams and deliveries registered with them)."""

    __slots__ = ("_beams", "_deliveries", "_events", "_s")

    def __init__(self, session: Session) -> None:
        self._s = session
        self._beams = Beams(session)
        self._deliveries = Deliveries(session)
        self._events = events.Events(session)

    async def register(
        self,
        case: NewCase,
        beams: Sequence[NewBeam] = (),
        deliveries: Sequence[NewDelivery] = (),
    ) -> tuple[CaseRow, bool]:
        """Add a case with its beams and deliveries; returns (row, True if it is new).

        Registering a case_id that exists changes nothing and returns the stored row.

        Raises:
            ValueError: `safe_name` is already used by another case.
        """
        self._s.require_writable()
        existing = await self.get(case.case_id)
        if existing is not None:
            return existing, False
        at = self._s.at_text
        try:
            await self._s.execute(
                f"INSERT INTO cases ({_COLUMNS}) VALUES ({placeholders(len(_NAMES))})",
                (
                    case.case_id,
                    case.safe_name,
                    case.case_path,
                    case.room,
                    str(case.status),
                    0,
                    case.error,
                    case.priority,
                    at,
                    at,
                    None if case.recheck_at is None else encode_time(case.recheck_at),
                    None,
                    0,
                    None,
                    None,
                    case.plan_path,
                    case.gantry,
                    case.patient_id,
                    str(case.kind),
                    None,
                ),
            )
        except sqlite3.IntegrityError as exc:
            other = await self._s.row(
                "SELECT case_id FROM cases WHERE safe_name = ?", (case.safe_name,)
            )
            if other is not None:
                raise ValueError(
                    f"safe name {case.safe_name!r} of case {case.case_id!r} is already used"
                    f" by case {other['case_id']!r}"
                ) from exc
            raise
        await self._insert_plan(case.case_id, beams, deliveries)
        await self._events.append(
            events.CASE_REGISTERED,
            f"registered ({len(beams)} beams, {len(deliveries)} deliveries)",
            case_id=case.case_id,
            data={"status": str(case.status), "case_path": case.case_path},
        )
        return await self.require(case.case_id), True

    async def attach_plan(
        self,
        case_id: str,
        *,
        beams: Sequence[NewBeam],
        deliveries: Sequence[NewDelivery] = (),
        plan_path: str | None = None,
        gantry: int | None = None,
        patient_id: str | None = None,
    ) -> list[BeamRow]:
        """Give a case registered without beams its resolved plan: beams, deliveries, plan info.

        A case that already has beams keeps them (a retry reuses its beams); then nothing
        is written and the stored beams are returned.

        Raises:
            LookupError: no such case.
        """
        self._s.require_writable()
        await self.require(case_id)
        existing = await self._beams.of_case(case_id)
        if existing:
            return existing
        await self._s.execute(
            "UPDATE cases SET plan_path = ?, gantry = ?, patient_id = ?, updated_at = ?"
            " WHERE case_id = ?",
            (plan_path, gantry, patient_id, self._s.at_text, case_id),
        )
        await self._insert_plan(case_id, beams, deliveries)
        await self._events.append(
            events.PLAN_ATTACHED,
            f"plan resolved: {len(beams)} beams, {len(deliveries)} deliveries",
            case_id=case_id,
            data={"plan_path": plan_path, "gantry": gantry},
        )
        return await self._beams.of_case(case_id)

    async def _insert_plan(
        self, case_id: str, beams: Sequence[NewBeam], deliveries: Sequence[NewDelivery]
    ) -> None:
        if beams:
            await self._beams.insert_many(case_id, beams)
        if deliveries:
            await self._deliveries.insert_many(case_id, deliveries, {b.beam_index for b in beams})

    async def get(self, case_id: str) -> CaseRow | None:
        row = await self._s.row(f"SELECT {_COLUMNS} FROM cases WHERE case_id = ?", (case_id,))
        return None if row is None else case_from_row(row)

    async def require(self, case_id: str) -> CaseRow:
        case = await self.get(case_id)
        if case is None:
            raise LookupError(f"unknown case {case_id!r}")
        return case

    async def find(self, statuses: Collection[CaseStatus] | None = None) -> list[CaseRow]:
        """Cases in creation order, optionally only those in `statuses`."""
        if statuses is None:
            rows = await self._s.rows(f"SELECT {_COLUMNS} FROM cases ORDER BY created_at, rowid")
        else:
            wanted = [str(s) for s in statuses]
            rows = await self._s.rows(
                # the planner prefers the sort index and scans all history; the status index wins
                f"SELECT {_COLUMNS} FROM cases INDEXED BY idx_cases_status"
                f" WHERE status IN ({placeholders(len(wanted))})"
                " ORDER BY created_at, rowid",
                wanted,
            )
        return [case_from_row(r) for r in rows]

    async def transition(
        self,
        case_id: str,
        status: CaseStatus,
        *,
        changes: Mapping[str, object] | None = None,
        message: str = "",
        data: Mapping[str, object] | None = None,
    ) -> CaseRow:
        """Move a case to `status` (checked against the transition table) and audit it.

        Raises:
            IllegalTransitionError: the table forbids the move; nothing is written.
            LookupError: no such case.
        """
        self._s.require_writable()
        current = await self.require(case_id)
        check_case_transition(current.status, status)
        values = encode_changes("cases", CHANGEABLE, changes or {})
        values["status"] = str(status)
        await self._update(case_id, values)
        await self._events.append(
            events.CASE_STATUS,
            message or f"{current.status} -> {status}",
            case_id=case_id,
            data={**(data or {}), "from": str(current.status), "to": str(status)},
        )
        return await self.require(case_id)

    async def update(self, case_id: str, changes: Mapping[str, object]) -> CaseRow:
        """Change columns other than the status (progress, priority, …); not audited."""
        self._s.require_writable()
        values = encode_changes("cases", CHANGEABLE, changes)
        if not await self._update(case_id, values):
            raise LookupError(f"unknown case {case_id!r}")
        return await self.require(case_id)

    async def _update(self, case_id: str, values: dict[str, SqlValue]) -> int:
        values["updated_at"] = self._s.at_text
        return await self._s.execute(
            f"UPDATE cases SET {set_clause(values)} WHERE case_id = ?",
            (*values.values(), case_id),
        )
