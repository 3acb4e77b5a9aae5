"""The database file on disk: checked read-only before use, private modes, the service lock."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import urllib.parse
from pathlib import Path

import aiosqlite

from mqi_async.domain.errors import DatabaseError
from mqi_async.store.schema import APPLICATION_ID, SCHEMA_VERSION, read_version, too_new_error
from mqi_async.store.session import damaged_error, is_corruption

#: SQLite waits this long for another connection's write lock before "database is locked".
BUSY_TIMEOUT_S = 5.0


def absolute(path: str | os.PathLike[str]) -> Path:
    # absolute but not resolved: the lock and sidecar files sit beside the name given
    return Path(os.path.abspath(os.fspath(path)))


def is_missing_or_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return True


def sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


async def readonly_uri(path: Path) -> str:
    """A URI that reads `path` without creating `-wal`/`-shm` files where none exist.

    Without a `-wal` the main file holds every committed page, so `immutable=1` reads it
    with no locking and no sidecar files; with one, `mode=ro` reads through it.
    """
    has_wal = await asyncio.to_thread(sidecar(path, "-wal").exists)
    quoted = urllib.parse.quote(str(path), safe="/")
    return f"file:{quoted}?{'mode=ro' if has_wal else 'immutable=1'}"


def readwrite_uri(path: Path) -> str:
    """A URI that writes an existing database and never creates one (`mode=rw`)."""
    return f"file:{urllib.parse.quote(str(path), safe='/')}?mode=rw"


async def connect(target: str, path: Path, *, uri: bool) -> aiosqlite.Connection:
    try:
        # timeout= is SQLite's busy timeout: PRAGMA busy_timeout reads 5000 afterwards
        conn = await aiosqlite.connect(
            target, uri=uri, isolation_level=None, timeout=BUSY_TIMEOUT_S
        )
    except sqlite3.Error as exc:
        raise database_error(path, exc) from exc
    conn.row_factory = sqlite3.Row
    return conn


def database_error(path: Path, exc: sqlite3.Error) -> DatabaseError:
    if is_corruption(exc):
        return damaged_error(str(path), exc)
    return DatabaseError(
        "database_unavailable", f"{path}: {exc} — check the path, its permissions and free space"
    )


async def inspect_file(path: Path) -> None:
    """Check an existing file read-only before anything writes to it.

    Raises:
        DatabaseError: `database_damaged` when `PRAGMA integrity_check` fails or the file
            is not an mqi-async database; `database_version` when it is newer than this code.
    """
    conn = await connect(await readonly_uri(path), path, uri=True)
    try:
        problems = [
            line
            for row in await conn.execute_fetchall("PRAGMA integrity_check")
            for line in str(row[0]).splitlines()
            if line != "ok" and not line.startswith("*** in database")
        ]
        version = await read_version(conn)
        app_id = list(await conn.execute_fetchall("PRAGMA application_id"))[0][0]
        objects = list(await conn.execute_fetchall("SELECT count(*) FROM sqlite_master"))[0][0]
    except sqlite3.Error as exc:
        raise database_error(path, exc) from exc
    finally:
        await conn.close()
    if problems:
        more = f" (and {len(problems) - 3} more problems)" if len(problems) > 3 else ""
        raise damaged_error(str(path), "; ".join(problems[:3]) + more)
    if version > SCHEMA_VERSION:
        raise too_new_error(str(path), version)
    if (version == 0 and objects > 0) or (version > 0 and app_id != APPLICATION_ID):
        raise damaged_error(
            str(path),
            f"not an mqi-async database (user_version {version}, application_id {app_id},"
            f" {objects} schema objects)",
        )


async def read_checked_version(conn: aiosqlite.Connection, path: Path) -> int:
    try:
        version = await read_version(conn)
    except sqlite3.Error as exc:
        raise database_error(path, exc) from exc
    if version > SCHEMA_VERSION:
        raise too_new_error(str(path), version)
    if version < SCHEMA_VERSION:
        raise DatabaseError(
            "database_version",
            f"{path}: schema v{version} is older than this mqi-async's v{SCHEMA_VERSION}"
            " — start the service once to upgrade it",
        )
    return version


def prepare_files(path: Path) -> int:
    """Create missing directories (0700) and the file (0600), and take the service lock.

    Returns the lock file's descriptor; the lock lasts until it is closed.

    Raises:
        DatabaseError: `already_running` when another service holds the lock.
    """
    missing: list[Path] = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue
        # mkdir's mode is filtered by the umask; chmod is not
        os.chmod(directory, 0o700)
    lock_path = sidecar(path, ".lock")
    lock_fd = open_private(lock_path)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise DatabaseError(
            "already_running",
            f"{path}: another mqi-async service uses this database (it holds {lock_path})"
            " — stop it first",
        ) from None
    try:
        # an existing database is never opened here: closing any descriptor of a file drops
        # this process's POSIX locks on it, including SQLite's
        if not path.exists():
            os.close(open_private(path))
    except BaseException:
        os.close(lock_fd)
        raise
    return lock_fd


def open_private(path: Path) -> int:
    """Open `path` read-write, creating it 0600 (whatever the umask) if it is missing."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    os.fchmod(fd, 0o600)
    return fd
