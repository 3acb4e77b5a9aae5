"""The interpreter's layer CSVs in the one line form every MOQUI build reads right, and their histories.

The interpreter writes rows `time_ms,x_mm,y_mm,count`, since 2026-03-30 one per line with CRLF
endings. The public MOQUI fork reads tokens with `getline(…, ',')` only, so each line break
glues a count to the next row's time: it silently reads 60 of 80 spots with shifted
positions. The older single-line form (every value joined by commas, no line break) parses
correctly in every build, so the service rewrites every CSV into it before upload.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

_NUM = rb"[ \t]*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?[ \t]*"
_ROW = _NUM + rb"," + _NUM + rb"," + _NUM + rb"," + _NUM
_EOL = rb"(?:\r\n|\n|\r)"
#: one row per line (LF, CRLF or CR), trailing line breaks allowed
_ROWS = re.compile(rb"(?:" + _ROW + _EOL + rb")*" + _ROW + _EOL + rb"*")
#: the single-line form: rows joined by commas
_ONE_LINE = re.compile(_ROW + rb"(?:," + _ROW + rb")*" + _EOL + rb"?")
_ROW_ONLY = re.compile(_ROW)
_LEADING_INT = re.compile(rb"[ \t\n\v\f\r]*([-+]?\d+)")


class FluenceFormatError(ValueError):
    """A CSV that is not rows of four numbers; MOQUI would misread or abort on it."""


@dataclass(frozen=True, slots=True)
class FluenceLayer:
    """One layer CSV in the single-line form, and what MOQUI makes of its counts."""

    #: the bytes to upload: every value joined by commas, no line break
    text: bytes
    spots: int
    #: the largest count (token 4, read with stoi as MOQUI does); 0 for an empty layer
    max_count: int
    #: whether `text` differs from the interpreter's bytes
    changed: bool


def _stoi(token: bytes) -> int:
    m = _LEADING_INT.match(token)
    return int(m.group(1)) if m else 0


def _first_bad_row(data: bytes) -> str:
    for number, line in enumerate(data.splitlines(), start=1):
        if line.strip() and _ROW_ONLY.fullmatch(line) is None:
            shown = line[:60].decode("latin-1")
            return f"line {number} ({shown!r}) is not four numbers time_ms,x_mm,y_mm,count"
    return "it is not rows of four numbers time_ms,x_mm,y_mm,count"


def normalise_layer(data: bytes) -> FluenceLayer:
    """The single-line form of one layer CSV (idempotent).

    Accepts rows one per line (LF, CRLF or CR) or the single-line form, without a header.
    An empty file stays empty (a layer without spots). Raises FluenceFormatError for
    anything else.
    """
    body = data.rstrip(b"\r\n")
    if not body.strip():
        return FluenceLayer(text=b"", spots=0, max_count=0, changed=bool(data))
    if b"\n" not in body and b"\r" not in body:
        if _ONE_LINE.fullmatch(data) is None:
            tokens = body.count(b",") + 1
            if tokens % 4:
                raise FluenceFormatError(
                    f"it holds {tokens} values, not a multiple of 4 (time_ms,x_mm,y_mm,count)"
                )
            raise FluenceFormatError("a value is not a number (time_ms,x_mm,y_mm,count)")
        single = body
    else:
        if _ROWS.fullmatch(data) is None:
            raise FluenceFormatError(_first_bad_row(data))
        single = b",".join(body.splitlines())
    counts = single.split(b",")[3::4]
    try:
        top = max(map(int, counts))
    except ValueError:
        top = max(map(_stoi, counts))
    return FluenceLayer(text=single, spots=len(counts), max_count=top, changed=single != data)


def _f32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def spot_histories(count: int, particles_per_history: float) -> int:
    """Histories MOQUI gives a spot: `int(stoi(count) * (float) ParticlesPerHistory)`, truncated."""
    return int(_f32(_f32(float(count)) * _f32(particles_per_history)))


def yields_no_histories(max_count: int, particles_per_history: float) -> bool:
    """Whether every spot of a field gets 0 histories (its largest count included).

    Only for a positive ParticlesPerHistory; MOQUI's -1 and other values <= 0 mean something
    else in some builds, so they are never judged here.
    """
    if not particles_per_history > 0:
        return False
    return spot_histories(max_count, particles_per_history) <= 0
