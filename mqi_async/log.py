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

from mqi_async.domain.privacy import redact
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


#: identifiers shorter than this are not redacted (they would mangle ordinary numbers)
MIN_REDACTED_CHARS = 3


class PatientIdRedactor(logging.Filter):
    """`logging.redact_patient_ids`: case ids and patient ids become the opaque case key.

    It knows every id it was told (`learn`: the database's cases at start, each new case
    as it is found) and every `case_id` a record carries, and replaces them in the message,
    the context fields and the traceback, before any handler formats the record.
    """

    def __init__(self, secret: bytes) -> None:
        super().__init__()
        self._secret = secret
        self._known: set[str] = set()

    def learn(self, *ids: str | None) -> None:
        self._known.update(i for i in ids if i and len(i) >= MIN_REDACTED_CHARS)

    def redact(self, text: str) -> str:
        return redact(text, self._secret, tuple(self._known))

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "mqi_redacted", False):
            return True
        case_id = record.__dict__.get("case_id")
        if isinstance(case_id, str):
            self.learn(case_id)
        record.msg = self.redact(record.getMessage())
        record.args = None
        for key in CONTEXT_KEYS:
            value = record.__dict__.get(key)
            if isinstance(value, str):
                setattr(record, key, self.redact(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
            record.exc_info = None
        record.mqi_redacted = True
        return True


def redactor() -> PatientIdRedactor | None:
    """The redactor `configure_logging` installed, if redaction is on."""
    for f in logging.getLogger("mqi_async").filters:
        if isinstance(f, PatientIdRedactor):
            return f
    return None


def learn_patient_ids(*ids: str | None) -> None:
    """Tell the redactor (if redaction is on) about ids before they are logged."""
    found = redactor()
    if found is not None:
        found.learn(*ids)


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
    redact_secret: bytes | None = None,
) -> list[logging.Handler]:
    """Attach the service's handlers to the `mqi_async` logger; returns them for removal.

    With `redact_secret`, patient ids are replaced by case keys (see PatientIdRedactor).
    """
    root = logging.getLogger("mqi_async")
    root.setLevel(level)
    root.propagate = False
    for old in [f for f in root.filters if isinstance(f, PatientIdRedactor)]:
        root.removeFilter(old)
    handlers: list[logging.Handler] = []
    formatter = JsonFormatter()
    if redact_secret is not None:
        redacting = PatientIdRedactor(redact_secret)
        # on the logger for its own records, on the handlers for those of child loggers
        root.addFilter(redacting)
    if directory is not None:
        fh = _private_file_handler(
            directory / "mqi-async.log", max_file_mb * 1024 * 1024, backup_count
        )
        handlers.append(fh)
    if stdout is not None:
        handlers.append(logging.StreamHandler(stdout))
    for h in handlers:
        h.setFormatter(formatter)
        if redact_secret is not None:
            h.addFilter(redacting)
        root.addHandler(h)
    # asyncssh logs every channel at INFO; keep its warnings, drop the chatter
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    return handlers


def remove_handlers(handlers: list[logging.Handler]) -> None:
    root = logging.getLogger("mqi_async")
    for f in [f for f in root.filters if isinstance(f, PatientIdRedactor)]:
        root.removeFilter(f)
    for h in handlers:
        root.removeHandler(h)
        h.close()


def stderr_stream() -> TextIO:
    return sys.stderr
