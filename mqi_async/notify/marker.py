"""`<database>.running`: written at start, removed on a clean stop; found at a start, it means
the last run ended without one (killed, crashed, power lost)."""

from __future__ import annotations

import contextlib
import os
from datetime import UTC, datetime
from pathlib import Path


class RunningMarker:
    """The marker file next to the database (written only while the service holds its lock)."""

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".running")

    def was_left(self) -> bool:
        """Whether the last run left its marker behind."""
        return self.path.exists()

    def write(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"pid {os.getpid()} started {datetime.now(UTC).isoformat()}\n")

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
