"""File-system reads for ingest: find ready case folders, and read a case for plan resolution."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pydicom

from mqi_async.domain.errors import IngestError
from mqi_async.domain.fractions import (
    DeliveryInput,
    DeliveryRecord,
    Waiting,
    list_deliveries,
    resolve_case,
)
from mqi_async.domain.plan import Plan, find_rtplan_candidates, select_rtplan
from mqi_async.domain.records import ResolvedCase, SkippedFolder, TpsDoseFiles
from mqi_async.ingest.layout import (
    PLANINFO_NAME,
    ROOMS,
    case_identity,
    is_case_dir,
    is_delivery_dir,
    is_ptn,
    is_staging_component,
    safe_name,
)

#: the default of `ingest.max_rtplan_mb`
DEFAULT_MAX_PLAN_BYTES = 64 * 1024 * 1024
#: values above this are skipped, not read, while a candidate's header is looked at
_DEFER_BYTES = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class FoundCase:
    """A ready case folder as the scanner saw it."""

    case_id: str
    case_path: str
    room: str
    safe_name: str
    #: nested layout: the id this study takes when its patient already has another study
    study_case_id: str | None = None
    study_safe_name: str | None = None
    #: subfolders that hold a delivery (PlanInfo.txt or *.ptn), as the scan saw them
    delivery_folders: int = 0


def _listing(path: str) -> tuple[list[str], list[str]]:
    files: list[str] = []
    dirs: list[str] = []
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        dirs.append(entry.name)
                    elif entry.is_file():
                        files.append(entry.name)
                except OSError:
                    continue
    except OSError:
        pass
    return files, dirs


def outside_scan(scan_dir: str, path: str) -> bool:
    """Whether `path`, with every symbolic link resolved, leaves the scan directory."""
    real = os.path.realpath(path)
    base = os.path.realpath(scan_dir)
    return real != base and not real.startswith(base.rstrip(os.sep) + os.sep)


def via_link(scan_dir: str, path: str) -> bool:
    """Whether some folder between the scan directory and `path` (or `path`) is a link."""
    relative = os.path.relpath(os.path.normpath(path), os.path.normpath(scan_dir))
    base = os.path.realpath(scan_dir)
    return os.path.realpath(path) != (
        base if relative == os.curdir else os.path.join(base, relative)
    )


def is_scan_root_or_room(scan_dir: str, path: str) -> bool:
    """True for the scan directory itself and for a room folder (`G1`, `G2`) right below it:
    neither is ever a case, and a marker in them marks nothing."""
    relative = os.path.relpath(os.path.normpath(path), os.path.normpath(scan_dir))
    return relative == os.curdir or relative in ROOMS


def check_case_dir(scan_dir: str, path: str, marker: str) -> FoundCase | None:
    """The ready case at `path`, or None when it is not a case or not ready yet."""
    if is_scan_root_or_room(scan_dir, path):
        return None
    # One link policy, start-up and live alike: a folder reached through a link is never a
    # case of its own when the link stays inside (its target is found as itself); one that
    # leaves is reported, and CaseReader fails it (`symlink_outside_scan`) without reading it.
    if via_link(scan_dir, path) and not outside_scan(scan_dir, path):
        return None
    files, dirs = _listing(path)
    subdir_files = {
        d: _listing(os.path.join(path, d))[0] for d in dirs if not is_staging_component(d)
    }
    if not is_case_dir(files, subdir_files):
        return None
    parent = os.path.dirname(os.path.normpath(path))
    identity = case_identity(
        scan_dir,
        path,
        case_has_marker=marker in files,
        parent_has_marker=os.path.isfile(os.path.join(parent, marker)),
        marker=marker,
    )
    if not identity.is_ready:
        return None
    return FoundCase(
        case_id=identity.case_id,
        case_path=identity.case_path,
        room=identity.room,
        safe_name=safe_name(identity.case_id),
        study_case_id=identity.study_case_id,
        study_safe_name=safe_name(identity.study_case_id) if identity.study_case_id else None,
        delivery_folders=sum(1 for names in subdir_files.values() if is_delivery_dir(names)),
    )


#: levels below a link out of the scan directory looked at for cases (room, patient, study)
_LINK_DEPTH = 2
#: folders looked at behind one such link at most (a link to `/` must not walk the disk)
_LINK_MAX_FOLDERS = 200


def _cases_behind_link(scan_dir: str, link: str, marker: str) -> list[FoundCase]:
    """The cases at or just below a link out of the scan directory, found only so that they
    fail visibly (CaseReader refuses to read them); no further link is followed."""
    found: list[FoundCase] = []
    level = [link]
    looked = 0
    for _ in range(_LINK_DEPTH + 1):
        below: list[str] = []
        for folder in level:
            looked += 1
            if looked > _LINK_MAX_FOLDERS:
                return found
            case = check_case_dir(scan_dir, folder, marker)
            if case is not None:
                found.append(case)
                continue
            below.extend(
                os.path.join(folder, d)
                for d in sorted(_listing(folder)[1])
                if not is_staging_component(d)
            )
        level = below
    return found


def printable_path(path: str) -> str:
    """`path` as text any terminal or database takes: bytes that are not UTF-8 become `\\xNN`."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes arrive as lone surrogates
        return False
    return True


def scan_tree(
    scan_dir: str,
    root: str,
    marker: str,
    *,
    max_depth: int = 6,
    skipped: list[SkippedFolder] | None = None,
) -> list[FoundCase]:
    """Every ready case at or below `root` (a bounded walk; staging folders are skipped).

    Links are never walked: one that stays inside the scan directory leads to folders found
    as themselves; the cases behind one that leaves it are reported (and fail unread).
    Folders that cannot be taken (a name that is not UTF-8, no permission to list) are not
    walked; with `skipped` given, each is appended to it with its reason.
    """
    if via_link(scan_dir, root):
        return _cases_behind_link(scan_dir, root, marker) if outside_scan(scan_dir, root) else []
    found: list[FoundCase] = []
    base_depth = os.path.normpath(root).count(os.sep)

    def unreadable(exc: OSError) -> None:
        if skipped is not None and exc.filename is not None:
            skipped.append(
                SkippedFolder(
                    path=printable_path(os.fsdecode(exc.filename)),
                    reason="folder_unreadable",
                    detail=exc.strerror or type(exc).__name__,
                )
            )

    for dirpath, dirnames, _files in os.walk(root, onerror=unreadable):
        case = check_case_dir(scan_dir, dirpath, marker)
        if case is not None:
            found.append(case)
            # a case's subfolders are deliveries, never cases of their own
            dirnames[:] = []
            continue
        keep: list[str] = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if is_staging_component(d):
                continue
            if not _is_utf8(d):
                # the database stores names as text: such a case could never be recorded
                if skipped is not None:
                    skipped.append(
                        SkippedFolder(path=printable_path(full), reason="folder_name_not_utf8")
                    )
                continue
            if os.path.islink(full):
                if outside_scan(scan_dir, full):
                    found.extend(_cases_behind_link(scan_dir, full, marker))
                continue
            keep.append(d)
        dirnames[:] = keep
        if os.path.normpath(dirpath).count(os.sep) - base_depth >= max_depth:
            dirnames[:] = []
    return found


def check_candidates(scan_dir: str, paths: list[str], marker: str) -> list[FoundCase]:
    """Resolve changed paths to ready cases: the nearest case folder at or above each path,
    and, for folders, any case below them (inotify misses files made right after mkdir).
    A marker file counts as its folder: in the nested layout the study folders that it
    makes ready are below it, not above."""
    seen: dict[str, FoundCase] = {}
    for path in paths:
        if not _is_utf8(path):
            continue  # never storable; the next full scan lists it as skipped
        below = os.path.dirname(path) if os.path.basename(path) == marker else path
        if os.path.isdir(below) and not (below != path and is_scan_root_or_room(scan_dir, below)):
            for case in scan_tree(scan_dir, below, marker, max_depth=3):
                seen[case.case_path] = case
        current = os.path.normpath(path)
        stop = os.path.normpath(scan_dir)
        for _ in range(4):
            if current == stop or not current.startswith(stop):
                break
            found = check_case_dir(scan_dir, current, marker) if os.path.isdir(current) else None
            if found is not None:
                seen[found.case_path] = found
                break
            current = os.path.dirname(current)
    return list(seen.values())


def _escaping_links(scan_dir: str, case_path: str) -> list[str]:
    """Links in the case folder or its delivery folders that point out of the scan directory."""
    found: list[str] = []
    for folder in (case_path, *(os.path.join(case_path, d) for d in _listing(case_path)[1])):
        try:
            with os.scandir(folder) as it:
                found.extend(
                    os.path.relpath(entry.path, case_path)
                    for entry in it
                    if entry.is_symlink() and outside_scan(scan_dir, entry.path)
                )
        except OSError:
            continue
    return sorted(found)


def _header_modality(path: str) -> str | None:
    """The Modality of a DICOM file from its header alone (pixels and big values are never
    read), or None when the header cannot be read."""
    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, defer_size=_DEFER_BYTES, specific_tags=["Modality"]
        )
    except Exception:  # pydicom raises many types for a broken or foreign file
        return None
    value = ds.get("Modality")
    return str(value).strip() if value is not None else ""


def _plan_candidates(case_path: str, names: list[str], max_bytes: int) -> list[tuple[str, bytes]]:
    """The candidates select_rtplan looks at: every RTPLAN read whole, nothing else.

    A file whose header says another Modality (a CT or image series) is skipped after its
    header; one whose header is unreadable is passed on only when it is small, so that a
    broken plan is still reported as such.
    """
    candidates: list[tuple[str, bytes]] = []
    for name in find_rtplan_candidates(names):
        full = os.path.join(case_path, name)
        try:
            size = os.path.getsize(full)
        except OSError:
            continue
        modality = _header_modality(full)
        if modality is not None and modality != "RTPLAN":
            continue
        if size > max_bytes:
            if modality == "RTPLAN":
                raise IngestError(
                    "rtplan_too_large",
                    f"{name} is {size / 2**20:.1f} MiB, above the {max_bytes / 2**20:.0f} MiB"
                    " of ingest.max_rtplan_mb",
                )
            continue
        try:
            candidates.append((name, Path(full).read_bytes()))
        except OSError:
            continue
    return candidates


def _read_case_files(
    case_path: str, max_plan_bytes: int
) -> tuple[list[tuple[str, bytes]], list[DeliveryInput]]:
    files, dirs = _listing(case_path)
    names = list(files)
    for d in dirs:
        names.extend(f"{d}/{f}" for f in _listing(os.path.join(case_path, d))[0])
    candidates = _plan_candidates(case_path, names, max_plan_bytes)
    deliveries: list[DeliveryInput] = []
    for d in sorted(dirs):
        if is_staging_component(d):
            continue
        sub = os.path.join(case_path, d)
        sub_files = _listing(sub)[0]
        text: str | None = None
        if PLANINFO_NAME in sub_files:
            try:
                text = Path(sub, PLANINFO_NAME).read_bytes().decode("utf-8", "replace")
            except OSError:
                text = None
        deliveries.append(
            DeliveryInput(path=sub, planinfo_text=text, has_ptn=any(is_ptn(f) for f in sub_files))
        )
    return candidates, deliveries


class CaseReader:
    """The engine's CaseSource: reads a case folder in a worker thread, resolves it purely."""

    def __init__(
        self,
        *,
        scan_directory: Path,
        fraction_window: timedelta,
        max_plan_bytes: int = DEFAULT_MAX_PLAN_BYTES,
    ) -> None:
        self._scan = str(scan_directory)
        self._window = fraction_window
        self._max_plan_bytes = max_plan_bytes

    async def resolve(
        self, case_id: str, case_path: str, *, now: datetime
    ) -> ResolvedCase | Waiting:
        return await asyncio.to_thread(self._resolve_sync, case_path, now)

    def _resolve_sync(self, case_path: str, now: datetime) -> ResolvedCase | Waiting:
        plan, deliveries = self._read_sync(case_path)
        result = resolve_case(plan, deliveries, now=now, window=self._window)
        if isinstance(result, Waiting):
            return result
        return ResolvedCase(
            plan_path=os.path.join(case_path, plan.source), plan=plan, resolution=result
        )

    def _read_sync(self, case_path: str) -> tuple[Plan, list[DeliveryInput]]:
        """The case's plan and its delivery folders (the plan's own folder left out)."""
        if not os.path.isdir(case_path):
            raise IngestError("missing_rtplan", f"the case folder {case_path} is gone")
        if outside_scan(self._scan, case_path):
            raise IngestError(
                "symlink_outside_scan",
                f"{case_path} is reached through a link to {os.path.realpath(case_path)},"
                " outside the scan directory; nothing of it was read",
            )
        links = _escaping_links(self._scan, case_path)
        if links:
            shown = ", ".join(links[:5]) + (f" and {len(links) - 5} more" if len(links) > 5 else "")
            raise IngestError(
                "symlink_outside_scan",
                f"{case_path}: {shown} link(s) out of the scan directory; nothing was read",
            )
        candidates, deliveries = _read_case_files(case_path, self._max_plan_bytes)
        plan = select_rtplan(candidates)
        # the plan's own folder is never a delivery
        plan_dir = os.path.dirname(os.path.join(case_path, plan.source))
        return plan, [
            d for d in deliveries if os.path.normpath(d.path) != os.path.normpath(plan_dir)
        ]

    async def plan_uid(self, plan_path: str) -> str:
        def read() -> str:
            try:
                ds = pydicom.dcmread(plan_path, stop_before_pixels=True)
            except Exception as exc:  # pydicom raises many kinds for a damaged file
                raise IngestError("rtplan_parse_failed", f"{plan_path}: {exc}") from exc
            return str(ds.get("SOPInstanceUID", "") or "")

        return await asyncio.to_thread(read)

    async def tps_doses(self, case_path: str, plan_uid: str) -> TpsDoseFiles:
        from mqi_async.qa.rtdose import find_tps_doses

        found = await asyncio.to_thread(find_tps_doses, case_path, plan_uid)
        return TpsDoseFiles(beams=found.beams, plan=found.plan)

    async def list_deliveries(
        self, case_id: str, case_path: str, *, now: datetime
    ) -> tuple[tuple[DeliveryRecord, ...], tuple[str, ...]]:
        """Every delivery folder of a resolved case, fraction included, and the problems."""
        return await asyncio.to_thread(self._list_sync, case_path, now)

    def _list_sync(
        self, case_path: str, now: datetime
    ) -> tuple[tuple[DeliveryRecord, ...], tuple[str, ...]]:
        plan, deliveries = self._read_sync(case_path)
        return list_deliveries(plan, deliveries, now=now, window=self._window)
