"""How Python values are written to and read from columns: UTC timestamps, JSON, checked updates."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from enum import Enum
from pathlib import PurePath

from mqi_async.domain.model import BeamStatus, CaseStatus

#: A column value as sqlite3 binds it.
SqlValue = str | int | float | bytes | None

#: Checks one value for a column and turns it into what is bound to SQL.
Encoder = Callable[[object], SqlValue]


def encode_time(value: datetime) -> str:
    """An aware datetime as fixed-width ISO-8601 UTC text with 'Z', so text order is time order."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value!r}: timestamps must be timezone-aware")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def decode_time(text: str) -> datetime:
    """The aware UTC datetime stored by `encode_time`."""
    return datetime.fromisoformat(text).astimezone(UTC)


def decode_optional_time(text: str | None) -> datetime | None:
    return None if text is None else decode_time(text)


def _json_default(value: object) -> object:
    if isinstance(value, datetime):
        return encode_time(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def encode_json(value: object) -> str:
    """Compact, key-sorted JSON; datetimes, paths and enums are written as text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default)


def encode_str_list(values: Sequence[str]) -> str:
    if isinstance(values, str) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"expected a sequence of strings, got {values!r}")
    return encode_json(list(values))


def decode_str_list(text: str) -> tuple[str, ...]:
    if text == "[]":
        return ()
    items = json.loads(text)
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"expected a JSON list of strings, got {text!r}")
    return tuple(items)


def decode_object(text: str | None) -> Mapping[str, object] | None:
    if text is None:
        return None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {text!r}")
    return value


# Encoders for columns that callers may change through `changes={...}`.


def as_text(value: object) -> SqlValue:
    if value is None or isinstance(value, str):
        return value
    raise TypeError(f"expected str or None, got {value!r}")


def as_path_text(value: object) -> SqlValue:
    if isinstance(value, PurePath):
        return str(value)
    return as_text(value)


def as_int(value: object) -> SqlValue:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise TypeError(f"expected int or None, got {value!r}")


def as_count(value: object) -> SqlValue:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError(f"expected an int >= 0, got {value!r}")


def as_percent(value: object) -> SqlValue:
    """Progress in whole percent, clamped to 0..100."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(min(max(value, 0), 100))
    raise TypeError(f"expected a number for progress, got {value!r}")


def as_time(value: object) -> SqlValue:
    if value is None:
        return None
    if isinstance(value, datetime):
        return encode_time(value)
    raise TypeError(f"expected an aware datetime or None, got {value!r}")


def as_str_list(value: object) -> SqlValue:
    if isinstance(value, list | tuple):
        return encode_str_list(value)
    raise TypeError(f"expected a list of strings, got {value!r}")


def as_int_list(value: object) -> SqlValue:
    if isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
        return json.dumps([int(v) for v in value])
    raise TypeError(f"expected a list of integers, got {value!r}")


def decode_int_list(text: str) -> tuple[int, ...]:
    items = json.loads(text)
    if not isinstance(items, list) or not all(isinstance(i, int) for i in items):
        raise ValueError(f"expected a JSON list of integers, got {text!r}")
    return tuple(items)


def as_beam_status(value: object) -> SqlValue:
    if value is None:
        return None
    if isinstance(value, str):
        return str(BeamStatus(value))
    raise TypeError(f"expected a BeamStatus or None, got {value!r}")


def as_case_status(value: object) -> SqlValue:
    if isinstance(value, str):
        return str(CaseStatus(value))
    raise TypeError(f"expected a CaseStatus, got {value!r}")


def encode_changes(
    table: str, encoders: Mapping[str, Encoder], changes: Mapping[str, object]
) -> dict[str, SqlValue]:
    """Check `changes` against the columns a caller may set and encode their values.

    Column names come only from `encoders`, never from the caller, so they are safe to
    splice into SQL.
    """
    unknown = sorted(set(changes) - set(encoders))
    if unknown:
        raise ValueError(f"{table}: cannot change column(s) {', '.join(unknown)}")
    return {name: encoders[name](value) for name, value in changes.items()}


def set_clause(values: Mapping[str, SqlValue]) -> str:
    """`a = ?, b = ?` for checked column names (see `encode_changes`)."""
    return ", ".join(f"{name} = ?" for name in values)
