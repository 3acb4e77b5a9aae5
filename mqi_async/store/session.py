"""One open transaction: its connection, its timestamp, and the helpers every query module uses."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime

import aiosqlite

from mqi_async.domain.errors import DatabaseError
from mqi_async.store.columns import SqlValue, encode_time

_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
#: a write that the file system refuses: read-only, I/O error, full, cannot open the journal
_SQLITE_UNWRITABLE = (8, 10, 13, 14)


def damaged_error(path: str, exc: BaseException | str) -> DatabaseError:
    """The one error for a database file SQLite cannot trust."""
    return DatabaseError(
        "database_damaged", f"{path}: {exc} — restore a backup or move the file aside"
    )


def is_corruption(exc: sqlite3.Error) -> bool:
    """True when SQLite says the file itself is broken (not a lock, constraint or SQL error)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def is_unwritable(exc: sqlite3.Error) -> bool:
    """True when a write failed because of the file system (full, read-only, I/O), not the SQL."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in _SQLITE_UNWRITABLE


def unwritable_error(path: str, exc: sqlite3.Error) -> DatabaseError:
    return DatabaseError(
        "database_unwritable", f"{path}: {exc}; the service waits and resumes when writes work"
    )


class Session:
    """The connection and the moment of one transaction (or read), shared by all query modules.

    Every row a transaction writes carries the same timestamp `at`, taken when it began.
    """

    __slots__ = ("_conn", "_path", "at", "at_text", "writable")

    def __init__(
        self, conn: aiosqlite.Connection, *, path: str, at: datetime, writable: bool
    ) -> None:
        self._conn = conn
        self._path = path
        self.at = at
        self.at_text = encode_time(at)
        self.writable = writable

    def require_writable(self) -> None:
        if not self.writable:
            raise RuntimeError("this is a read: open `store.transaction()` to write")

    def _translate(self, exc: sqlite3.Error) -> BaseException:
        return damaged_error(self._path, exc) if is_corruption(exc) else exc

    async def rows(self, sql: str, params: Sequence[SqlValue] = ()) -> list[sqlite3.Row]:
        try:
            return list(await self._conn.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    async def row(self, sql: str, params: Sequence[SqlValue] = ()) -> sqlite3.Row | None:
        found = await self.rows(sql, params)
        return found[0] if found else None

    async def execute(self, sql: str, params: Sequence[SqlValue] = ()) -> int:
        """Run one write statement; returns the number of rows it changed."""
        self.require_writable()
        try:
            cursor = await self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        return cursor.rowcount

    async def insert(self, sql: str, params: Sequence[SqlValue]) -> int:
        """Run one INSERT; returns the new row's rowid."""
        self.require_writable()
        try:
            found = await self._conn.execute_insert(sql, params)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
        if found is None:
            raise RuntimeError("INSERT returned no rowid")
        return int(found[0])

    async def execute_many(self, sql: str, params: Iterable[Sequence[SqlValue]]) -> None:
        self.require_writable()
        try:
            await self._conn.executemany(sql, params)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc
