"""Case layout rules on path strings: what a case is, its identity and room, what to ignore, safe names."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from pathlib import PurePath

READY_MARKER = "_CASE_READY"
ROOMS = ("G1", "G2")
PLANINFO_NAME = "PlanInfo.txt"

#: safe_name output is at most this long
SAFE_NAME_MAX = 100
_SAFE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_HASHED = re.compile(r".*--[0-9a-f]{16}")
_HASH_LEN = 16


def is_staging_component(name: str) -> bool:
    """A transfer staging artefact: `*.extracting`, `*.zip.tmp`, `*.backup.*`, `extract_*.tmp`."""
    return (
        name.endswith((".extracting", ".zip.tmp"))
        or ".backup." in name
        or fnmatchcase(name, "extract_*.tmp")
    )


def is_staging_path(path: str | PurePath) -> bool:
    """True when any component of the path is a staging artefact."""
    return any(is_staging_component(part) for part in PurePath(path).parts)


def is_ptn(name: str) -> bool:
    return name.casefold().endswith(".ptn")


def is_dicom_file(name: str) -> bool:
    return name.casefold().endswith(".dcm")


def is_delivery_dir(file_names: Iterable[str]) -> bool:
    """A delivery folder holds PlanInfo.txt or any *.ptn file."""
    return any(name == PLANINFO_NAME or is_ptn(name) for name in file_names)


def is_case_dir(file_names: Iterable[str], subdir_files: Mapping[str, Iterable[str]]) -> bool:
    """A case directory directly holds ≥1 `*.dcm` and ≥1 subfolder that is a delivery folder.

    `file_names` are the plain files in the directory; `subdir_files` maps each
    subfolder name to the plain file names inside it.
    """
    if not any(is_dicom_file(name) for name in file_names):
        return False
    return any(is_delivery_dir(files) for files in subdir_files.values())


def room_of(scan_dir: str | PurePath, path: str | PurePath) -> str:
    """G1/G2: the first component under the scan dir if it is one, else the nearest
    ancestor named G1/G2, else ""."""
    relative = _relative(scan_dir, path)
    if relative is not None and relative.parts and relative.parts[0] in ROOMS:
        return relative.parts[0]
    for part in reversed(PurePath(_norm(path)).parts[:-1]):
        if part in ROOMS:
            return part
    return ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseIdentity:
    """Who a case is: nested (`G1/<patient>/<study>/`, marker in the patient folder) or flat."""

    case_id: str
    #: the folder holding the RTPLAN and the delivery folders
    case_path: str
    room: str
    is_nested: bool
    #: the `_CASE_READY` file that makes the case ready; None while it is missing
    marker_path: str | None
    #: nested layout: the id of this study when the patient has another one registered
    study_case_id: str | None = None

    @property
    def is_ready(self) -> bool:
        return self.marker_path is not None


def case_identity(
    scan_dir: str | PurePath,
    case_dir: str | PurePath,
    *,
    case_has_marker: bool,
    parent_has_marker: bool,
    marker: str = READY_MARKER,
) -> CaseIdentity:
    """The identity of the case directory `case_dir` (domain.md §1.2).

    A marker in the parent makes the layout nested (case_id = parent name) unless the
    parent is the scan dir or a room folder; otherwise case_id is the case folder's name.
    """
    case = PurePath(_norm(case_dir))
    parent = case.parent
    room = room_of(scan_dir, case)
    if parent_has_marker and _can_be_patient_dir(scan_dir, parent):
        return CaseIdentity(
            case_id=parent.name,
            case_path=str(case),
            room=room,
            is_nested=True,
            marker_path=str(parent / marker),
            study_case_id=study_case_id(parent.name, case.name),
        )
    return CaseIdentity(
        case_id=case.name,
        case_path=str(case),
        room=room,
        is_nested=False,
        marker_path=str(case / marker) if case_has_marker else None,
    )


def study_case_id(patient: str, study: str) -> str:
    """The case id of a patient's further study: `<patient>/<study>`.

    The first study registered keeps the patient folder's name (the contract's case id); a
    `/` cannot occur in a folder name, so this id never collides with any other case's.
    """
    return f"{patient}/{study}"


def _can_be_patient_dir(scan_dir: str | PurePath, directory: PurePath) -> bool:
    relative = _relative(scan_dir, directory)
    if relative is None:
        return directory.name not in ROOMS and directory != directory.parent
    parts = relative.parts
    return bool(parts) and not (len(parts) == 1 and parts[0] in ROOMS)


class PathKind(StrEnum):
    """What a changed path means to the watcher."""

    #: outside the scan dir, the scan dir itself, a room folder, or a staging artefact
    IGNORED = "ignored"
    #: a `_CASE_READY` file: its folder is a flat case or holds nested study folders
    MARKER = "marker"
    #: a *.ptn file: a completed case re-runs post-processing (the caller checks the status)
    PTN = "ptn"
    PLANINFO = "planinfo"
    DICOM = "dicom"
    #: anything else under the scan dir (a folder, PlanRange.txt, *.mgn, …)
    OTHER = "other"


@dataclass(frozen=True, slots=True, kw_only=True)
class PathEvent:
    """A classified path: its kind, room, and the folders that may be its case dir."""

    kind: PathKind
    path: str
    room: str
    #: nearest first; the path itself and its ancestors below the scan dir, room folders
    #: excluded. For MARKER only the marker's folder.
    case_dir_candidates: tuple[str, ...]


def classify_event_path(
    scan_dir: str | PurePath, path: str | PurePath, *, marker: str = READY_MARKER
) -> PathEvent:
    """Classify a path reported by the watcher; no file-system access."""
    target = PurePath(_norm(path))
    relative = _relative(scan_dir, target)
    if relative is None or not relative.parts or is_staging_path(relative):
        return PathEvent(kind=PathKind.IGNORED, path=str(target), room="", case_dir_candidates=())
    if len(relative.parts) == 1 and relative.parts[0] in ROOMS:
        return PathEvent(kind=PathKind.IGNORED, path=str(target), room="", case_dir_candidates=())
    room = room_of(scan_dir, target)
    name = target.name
    if name == marker:
        # a marker in the scan dir or a bare room folder never makes that folder a case
        folder = relative.parts[:-1]
        is_case_level = bool(folder) and not (len(folder) == 1 and folder[0] in ROOMS)
        return PathEvent(
            kind=PathKind.MARKER,
            path=str(target),
            room=room,
            case_dir_candidates=(str(target.parent),) if is_case_level else (),
        )
    if is_ptn(name):
        kind = PathKind.PTN
    elif name == PLANINFO_NAME:
        kind = PathKind.PLANINFO
    elif is_dicom_file(name):
        kind = PathKind.DICOM
    else:
        kind = PathKind.OTHER
    candidates: list[str] = []
    for depth in range(len(relative.parts), 0, -1):
        parts = relative.parts[:depth]
        if depth == 1 and parts[0] in ROOMS:
            continue
        candidates.append(str(PurePath(_norm(scan_dir), *parts)))
    return PathEvent(kind=kind, path=str(target), room=room, case_dir_candidates=tuple(candidates))


def safe_name(name: str) -> str:
    """A remote path component for `name`: only `[A-Za-z0-9._-]`, never starting with `-` or
    `.`, at most 100 characters, and different names never give the same result.

    A name that is already safe (and does not look like a hashed result) is kept as it
    is; any other keeps its readable characters and ends in `--` plus 16 hex digits of
    the SHA-256 of the original.
    """
    if len(name) <= SAFE_NAME_MAX and _SAFE.fullmatch(name) and not _HASHED.fullmatch(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LEN]
    readable = _UNSAFE_CHARS.sub("_", name).lstrip("-.")
    readable = readable[: SAFE_NAME_MAX - _HASH_LEN - 2] or "x"
    return f"{readable}--{digest}"


def _norm(path: str | PurePath) -> str:
    return os.path.normpath(os.fspath(path))


def _relative(scan_dir: str | PurePath, path: str | PurePath) -> PurePath | None:
    try:
        return PurePath(_norm(path)).relative_to(_norm(scan_dir))
    except ValueError:
        return None
