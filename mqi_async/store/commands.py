"""The `commands` table: requests from the CLI and TUI that the running service carries out."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

from mqi_async.domain.errors import IllegalTransitionError
from mqi_async.domain.records import CommandKind, CommandRow, CommandStatus
from mqi_async.store import events
from mqi_async.store.columns import decode_object, decode_optional_time, decode_time, encode_json
from mqi_async.store.session import Session

#: the range a case's priority may be set to (it is an SQLite INTEGER and a sort key)
PRIORITY_MIN = -999
PRIORITY_MAX = 999

_COLUMNS = "command_id, requested_at, kind, case_id, payload, status, done_at, result"


def _command_from(row: sqlite3.Row) -> CommandRow:
    return CommandRow(
        command_id=row["command_id"],
        requested_at=decode_time(row["requested_at"]),
        kind=CommandKind(row["kind"]),
        case_id=row["case_id"],
        payload=decode_object(row["payload"]) or {},
        status=CommandStatus(row["status"]),
        done_at=decode_optional_time(row["done_at"]),
        result=row["result"],
    )


def priority_value(value: object) -> int:
    """A priority command's value: an int, or the text of one, from PRIORITY_MIN to PRIORITY_MAX.

    Raises:
        ValueError: anything else, with a message fit to show to the operator.
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"the priority must be a whole number, not {text!r}") from None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"the priority must be a whole number, not {value!r}")
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise ValueError(f"the priority must be from {PRIORITY_MIN} to {PRIORITY_MAX}, not {value}")
    return value


class Commands:
    """Queries on `commands`."""

    __slots__ = ("_events", "_s")

    def __init__(self, session: Session) -> None:
        self._s = session
        self._events = events.Events(session)

    async def enqueue(
        self,
        kind: CommandKind,
        case_id: str,
        payload: Mapping[str, object] | None = None,
    ) -> CommandRow | None:
        """Record a request for the service; None (nothing written) when the case is unknown.

        Raises:
            ValueError: a PRIORITY command without an int `priority` (see `priority_value`)
                in its payload.
        """
        self._s.require_writable()
        if await self._s.row("SELECT 1 FROM cases WHERE case_id = ?", (case_id,)) is None:
            return None
        kind = CommandKind(kind)
        if kind == CommandKind.PRIORITY:
            value = (payload or {}).get("priority")
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"a priority command needs an int 'priority', got {value!r}")
            priority_value(value)
        command_id = await self._s.insert(
            "INSERT INTO commands (requested_at, kind, case_id, payload, status)"
            " VALUES (?, ?, ?, ?, ?)",
            (
                self._s.at_text,
                str(kind),
                case_id,
                encode_json(dict(payload or {})),
                str(CommandStatus.PENDING),
            ),
        )
        await self._events.append(
            events.COMMAND_ENQUEUED,
            f"{kind} requested",
            case_id=case_id,
            data={"command_id": command_id, "payload": dict(payload or {})},
        )
        return await self.require(command_id)

    async def pending(self, limit: int = 100) -> list[CommandRow]:
        """Commands not yet handled, oldest first."""
        rows = await self._s.rows(
            f"SELECT {_COLUMNS} FROM commands WHERE status = ? ORDER BY command_id LIMIT ?",
            (str(CommandStatus.PENDING), limit),
        )
        return [_command_from(r) for r in rows]

    async def finish(
        self, command_id: int, status: CommandStatus, result: str | None = None
    ) -> CommandRow:
        """Mark a pending command done or rejected, with what happened.

        Raises:
            ValueError: `status` is PENDING.
            IllegalTransitionError: the command was already handled.
            LookupError: no such command.
        """
        self._s.require_writable()
        if status == CommandStatus.PENDING:
            raise ValueError("a command is finished as done or rejected")
        command = await self.require(command_id)
        if command.status != CommandStatus.PENDING:
            raise IllegalTransitionError("command", str(command.status), str(status))
        await self._s.execute(
            "UPDATE commands SET status = ?, done_at = ?, result = ? WHERE command_id = ?",
            (str(status), self._s.at_text, result, command_id),
        )
        await self._events.append(
            events.COMMAND_FINISHED,
            f"{command.kind} {status}: {result}",
            case_id=command.case_id,
            data={"command_id": command_id},
        )
        return await self.require(command_id)

    async def get(self, command_id: int) -> CommandRow | None:
        row = await self._s.row(
            f"SELECT {_COLUMNS} FROM commands WHERE command_id = ?", (command_id,)
        )
        return None if row is None else _command_from(row)

    async def require(self, command_id: int) -> CommandRow:
        command = await self.get(command_id)
        if command is None:
            raise LookupError(f"unknown command {command_id}")
        return command
