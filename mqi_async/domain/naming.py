"""What a plan value must look like before it becomes part of a file name, and how to quote it."""

from __future__ import annotations

import re

#: DICOM's LO limit; MOQUI adds `_<index>_<Scorer>.<ext>` and the service `beam_<k>_` and `.dcm`
MAX_NAME_CHARS = 64
#: characters of a bad value shown in an error
_QUOTE_CHARS = 60


def file_name_problem(value: str) -> str | None:
    """Why `value` cannot be used inside a file name on every file system, or None if it can.

    Allowed: printable ASCII without `/`, `\\` and the characters Windows shares refuse
    (`<>:"|?*`), not starting with `.` or a space, at most MAX_NAME_CHARS characters.
    """
    if len(value) > MAX_NAME_CHARS:
        return f"is {len(value)} characters long (at most {MAX_NAME_CHARS})"
    for ch in value:
        if ch in "/\\":
            return "holds a path separator"
        if not ch.isascii():
            return f"holds the non-ASCII character {ascii(ch)}"
        if not ch.isprintable():
            return f"holds the control character {ascii(ch)}"
        if ch in '<>:"|?*':
            return f"holds {ch!r}, which file systems refuse"
    if value.startswith((".", " ")) or value.endswith(" "):
        return "starts with '.' or begins or ends with a space"
    return None


def quote_value(value: str) -> str:
    """A bad value made safe to print in one log line: ASCII escapes, cut to a short length."""
    if len(value) <= _QUOTE_CHARS:
        return ascii(value)
    return f"{ascii(value[:_QUOTE_CHARS])}... ({len(value)} characters)"


_NOT_FIELD_CHAR = re.compile(r"[^A-Za-z0-9_-]")


def field_folder(beam_name: str) -> str:
    """The interpreter's folder name for a beam's layer CSVs: BeamName with every character
    outside `[A-Za-z0-9_-]` made `_` (MOQUI finds the field folder by it)."""
    return _NOT_FIELD_CHAR.sub("_", beam_name)


def layer_csv_name(layer: int, energy_mev: float) -> str:
    """`<NN>_<E>MeV.csv`: the layer's 1-based number and nominal energy (MOQUI reads both)."""
    return f"{layer:02d}_{energy_mev:.2f}MeV.csv"
