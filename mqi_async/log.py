"""JSON-lines logging with case/beam/host context, to a rotating file and optionally stdout."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from mqi_async.folders import make_private_dirs

#: record attributes copied into the JSON line when a caller passes them in `extra=`
CONTEXT_KEYS = ("case_id", "beam_id", "host", "run", "code", "component")

_SECRET_WORDS = ("passphrase", "password", "secret", "token")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and context."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_KEYS:
            value = record.__dict__.get(key)
            if value is not None:
                line[key] = value
        data = record.__dict__.get("data")
        if isinstance(data, dict):
            line["data"] = {
                k: ("********" if any(w in k.lower() for w in _SECRET_WORDS) else v)
                for k, v in data.items()
            }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def _private_file_handler(path: Path, max_bytes: int, backups: int) -> logging.Handler:
    make_private_dirs(path.parent)
    if not path.exists():
        # created 0600 before the handler opens it, so logs are never world-readable
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
        os.close(fd)
    os.chmod(path, 0o600)
    return logging.handlers.RotatingFileHandler(
        path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
    )


def configure_logging(
    *,
    level: str,
    directory: Path | None,
    stdout: TextIO | None = None,
    max_file_mb: int = 20,
    backup_count: int = 5,
) -> list[logging.Handler]:
    """Attach the service's handlers to the `mqi_async` logger; returns them for removal."""
    root = logging.getLogger("mqi_async")
    root.setLevel(level)
    root.propagate = False
    handlers: list[logging.Handler] = []
    formatter = JsonFormatter()
    if directory is not None:
        fh = _private_file_handler(
            directory / "mqi-async.log", max_file_mb * 1024 * 1024, backup_count
        )
        handlers.append(fh)
    if stdout is not None:
        handlers.append(logging.StreamHandler(stdout))
    for h in handlers:
        h.setFormatter(formatter)
        root.addHandler(h)
    # asyncssh logs every channel at INFO; keep its warnings, drop the chatter
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    return handlers


def remove_handlers(handlers: list[logging.Handler]) -> None:
    root = logging.getLogger("mqi_async")
    for h in handlers:
        root.removeHandler(h)
        h.close()


def stderr_stream() -> TextIO:
    return sys.stderr
