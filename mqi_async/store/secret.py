"""The per-database secret that keys case names on hosts, kept 0600 beside the database."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from mqi_async.domain.errors import DatabaseError
from mqi_async.domain.privacy import SECRET_BYTES


def secret_path(database: Path) -> Path:
    """`<database>.key`, next to the database and its `.lock`."""
    return database.with_name(database.name + ".key")


def load_or_create_secret(database: Path) -> bytes:
    """Read the secret, or create it (0600, written atomically) the first time.

    Raises:
        DatabaseError: `case_key_unreadable` when the file exists but cannot be used.
    """
    path = secret_path(database)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as exc:
        raise DatabaseError("case_key_unreadable", f"{path}: {exc.strerror}") from exc
    if data:
        if len(data) != SECRET_BYTES:
            raise DatabaseError(
                "case_key_unreadable",
                f"{path} holds {len(data)} bytes, not {SECRET_BYTES}; restore it from the"
                " database's backup",
            )
        return data
    new = secrets.token_bytes(SECRET_BYTES)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        # link, not rename: of two starts racing, the first secret wins and both use it
        try:
            os.link(tmp, path)
        except FileExistsError:
            return load_or_create_secret(database)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return new
