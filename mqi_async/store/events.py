"""The append-only audit log: one `events` row per transition, run, lease sweep or command."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from mqi_async.store.columns import SqlValue, decode_object, decode_time, encode_json
from mqi_async.store.session import Session

#: Event kinds the store itself writes; callers may append any other kind.
CASE_REGISTERED = "case_registered"
CASE_STATUS = "case_status"
BEAM_STATUS = "beam_status"
PLAN_ATTACHED = "plan_attached"
RUN_STARTED = "run_started"
RUN_FINISHED = "run_finished"
LEASE_SWEPT = "lease_swept"
COMMAND_ENQUEUED = "command_enqueued"
COMMAND_FINISHED = "command_finished"


@dataclass(frozen=True, slots=True, kw_only=True)
class EventRow:
    """One audit entry; `data` is the JSON object stored with it, if any."""

    event_id: int
    at: datetime
    case_id: str | None
    beam_id: str | None
    kind: str
    message: str
    data: Mapping[str, object] | None


_COLUMNS = "event_id, at, case_id, beam_id, kind, message, data"


def _event_from(row: sqlite3.Row) -> EventRow:
    return EventRow(
        event_id=row["event_id"],
        at=decode_time(row["at"]),
        case_id=row["case_id"],
        beam_id=row["beam_id"],
        kind=row["kind"],
        message=row["message"],
        data=decode_object(row["data"]),
    )


class Events:
    """Queries on `events`."""

    __slots__ = ("_s",)

    def __init__(self, session: Session) -> None:
        self._s = session

    async def append(
        self,
        kind: str,
        message: str,
        *,
        case_id: str | None = None,
        beam_id: str | None = None,
        data: Mapping[str, object] | None = None,
    ) -> EventRow:
        """Add one event stamped with the transaction's time."""
        encoded = None if data is None else encode_json(dict(data))
        event_id = await self._s.insert(
            "INSERT INTO events (at, case_id, beam_id, kind, message, data)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (self._s.at_text, case_id, beam_id, kind, message, encoded),
        )
        return EventRow(
            event_id=event_id,
            at=self._s.at,
            case_id=case_id,
            beam_id=beam_id,
            kind=kind,
            message=message,
            data=decode_object(encoded),
        )

    async def recent(
        self, limit: int = 100, *, case_id: str | None = None, beam_id: str | None = None
    ) -> list[EventRow]:
        """The newest events first, optionally only those of one case or one beam."""
        where: list[str] = []
        params: list[SqlValue] = []
        if case_id is not None:
            where.append("case_id = ?")
            params.append(case_id)
        if beam_id is not None:
            where.append("beam_id = ?")
            params.append(beam_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._s.rows(
            f"SELECT {_COLUMNS} FROM events {clause} ORDER BY event_id DESC LIMIT ?",
            (*params, limit),
        )
        return [_event_from(r) for r in rows]
