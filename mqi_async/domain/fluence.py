"""The interpreter's layer CSVs in the one line form every MOQUI build reads right, and their histories.

The interpreter writes rows `time_ms,x_mm,y_mm,count`, since 2026-03-30 one per line with CRLF
endings. The public MOQUI fork reads tokens with `getline(…, ',')` only, so each line break
glues a count to the next row's time: it silently reads 60 of 80 spots with shifted
positions. The older single-line form (every value joined by commas, no line break) parses
correctly in every build, so the service rewrites every CSV into it before upload.
"""

from __future__ import annotations

import operator
import re
import struct
from dataclasses import dataclass

#: bytes a layer CSV may hold: numbers, separators and line breaks
_ALLOWED = b"0123456789.+-eE, \t\r\n"
_NUM = rb"[ \t]*[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?[ \t]*"
_ROW_ONLY = re.compile(_NUM + rb"," + _NUM + rb"," + _NUM + rb"," + _NUM)
_LEADING_INT = re.compile(rb"[ \t\n\v\f\r]*([-+]?\d+)")
_COMMAS = operator.methodcaller("count", b",")


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
    lines = data.splitlines()
    if len(lines) == 1:
        return "a value is not a number, or one is empty (time_ms,x_mm,y_mm,count)"
    for number, line in enumerate(lines, start=1):
        if _ROW_ONLY.fullmatch(line) is None:
            shown = line[:60].decode("latin-1")
            return f"line {number} ({shown!r}) is not four numbers time_ms,x_mm,y_mm,count"
    return "it is not rows of four numbers time_ms,x_mm,y_mm,count"


def normalise_layer(data: bytes) -> FluenceLayer:
    """The single-line form of one layer CSV (idempotent); a few ms per MB.

    Accepts rows one per line (LF, CRLF or CR) or the single-line form, without a header.
    An empty file stays empty (a layer without spots). Raises FluenceFormatError for
    anything else: other characters, a row without exactly four values, an empty value.
    """
    body = data.rstrip(b"\r\n")
    if not body.strip():
        return FluenceLayer(text=b"", spots=0, max_count=0, changed=bool(data))
    if body.translate(None, _ALLOWED):  # anything left is not part of a number row
        raise FluenceFormatError(_first_bad_row(data))
    if b"\n" in body or b"\r" in body:
        lines = body.splitlines()
        if set(map(_COMMAS, lines)) != {3}:
            raise FluenceFormatError(_first_bad_row(data))
        single = b",".join(lines)
    else:
        single = body
    tokens = single.split(b",")
    if len(tokens) % 4:
        raise FluenceFormatError(
            f"it holds {len(tokens)} values, not a multiple of 4 (time_ms,x_mm,y_mm,count)"
        )
    if b"" in tokens:
        raise FluenceFormatError(_first_bad_row(data))
    counts = tokens[3::4]
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
