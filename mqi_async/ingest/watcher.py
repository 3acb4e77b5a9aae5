"""Watches the scan directory (inotify or polling), plus a startup scan and periodic rescans."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path

from watchfiles import Change, awatch

from mqi_async.config import IngestSettings
from mqi_async.domain.records import SkippedFolder
from mqi_async.ingest.layout import ROOMS, PathKind, classify_event_path
from mqi_async.ingest.reader import FoundCase, check_candidates, scan_tree

log = logging.getLogger(__name__)

#: file systems where inotify sees nothing written by other machines
_NETWORK_FS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "fuse.sshfs",
        "9p",
        "afs",
        "glusterfs",
        "ceph",
        "fuse.rclone",
        "davfs",
    }
)

#: a failed polling watch starts again after this pause, doubling while failures repeat
_RESTART_FIRST_S = 1.0
_RESTART_MAX_S = 30.0
#: failures further apart than this do not lengthen the pause
_FAILURE_MEMORY_S = 300.0

#: called once per ready case found; `new_ptn` when a *.ptn file was just added to it
OnCase = Callable[[FoundCase, bool], Awaitable[None]]
#: called after every full scan with the folders it could not take (possibly none)
OnSkipped = Callable[[list[SkippedFolder]], Awaitable[None]]


def filesystem_type(path: Path) -> str:
    """The mount's file-system type for `path`, from /proc/mounts ("" when unknown)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return ""
    target = os.path.realpath(path)
    best, fstype = "", ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) > len(
            best
        ):
            best, fstype = mount, parts[2]
    return fstype


class _WatchLost(Exception):
    """The watchfiles watch failed (its cause is attached); a new one is needed."""


async def _next_changes(
    watcher: AsyncGenerator[set[tuple[Change, str]], None],
) -> set[tuple[Change, str]]:
    try:
        return await anext(watcher)
    except Exception as exc:  # anything the watch raises (groups included) ends this watch
        raise _WatchLost(str(exc)) from exc


class CaseWatcher:
    """Finds ready cases; each is reported (idempotently downstream) however many events it makes."""

    def __init__(
        self,
        scan_directory: Path,
        settings: IngestSettings,
        on_case: OnCase,
        on_skipped: OnSkipped | None = None,
    ) -> None:
        self._dir = scan_directory
        self._s = settings
        self._on_case = on_case
        self._on_skipped = on_skipped
        fstype = filesystem_type(scan_directory) if scan_directory.exists() else ""
        self.force_polling = settings.force_polling or fstype in _NETWORK_FS
        if self.force_polling and not settings.force_polling:
            log.warning("scan directory is on %s; watching by polling", fstype)
        self.last_scan_s: float | None = None

    async def run(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        listening = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._watch(listening))
            # start scanning only once events are being captured, so no case slips between
            await listening.wait()
            await self.scan()
            tg.create_task(self._rescan_loop())

    async def scan(self) -> list[FoundCase]:
        """Scan the whole tree once and report every ready case."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        skipped: list[SkippedFolder] = []
        found = await asyncio.to_thread(
            scan_tree,
            str(self._dir),
            str(self._dir),
            self._s.ready_marker,
            max_depth=8,
            skipped=skipped,
        )
        for case in found:
            await self._report(case, False)
        if self._on_skipped is not None:
            try:
                await self._on_skipped(skipped)
            except Exception:  # a list for people to read must never stop intake
                log.exception(
                    "could not record the skipped folders", extra={"component": "watcher"}
                )
        self.last_scan_s = loop.time() - started
        log.info("scan found %d ready case(s) in %.2f s", len(found), self.last_scan_s)
        return found

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(self._s.rescan_seconds)
            await self.scan()

    async def _report(self, case: FoundCase, new_ptn: bool) -> None:
        # one case that cannot be registered (say, a name the database refuses) must not
        # stop the watcher, nor keep the cases after it in the scan from being registered
        try:
            await self._on_case(case, new_ptn)
        except Exception:
            log.exception(
                "could not register case %r at %s",
                case.case_id,
                case.case_path,
                extra={"component": "watcher"},
            )

    async def _watch(self, listening: asyncio.Event) -> None:
        """Watch until cancelled. A watch that fails is never the end of intake: inotify
        gives way to polling, a failed polling watch starts again after a pause, and each
        new watch is followed by a full scan for what the failed one may have missed."""
        failures = 0
        last_failure = -math.inf
        rescan = False
        while True:
            started = asyncio.Event()
            polling = self.force_polling
            try:
                await self._watch_with(listening, started, force_polling=polling, rescan=rescan)
                return
            except _WatchLost as lost:
                # watchfiles cannot watch: inotify limits reached, or a path that is not
                # UTF-8 (a folder name from a Windows code page), which fails every batch
                # that holds it, and inotify's setup whenever such a folder exists
                if not polling:
                    log.warning(
                        "inotify watch of %s failed (%s); watching by polling from now on",
                        self._dir,
                        lost.__cause__,
                        extra={"component": "watcher"},
                    )
                    self.force_polling = True
                elif not started.is_set():
                    raise
                else:
                    now = asyncio.get_running_loop().time()
                    failures = failures + 1 if now - last_failure < _FAILURE_MEMORY_S else 1
                    last_failure = now
                    delay = min(_RESTART_MAX_S, _RESTART_FIRST_S * 2 ** (failures - 1))
                    log.warning(
                        "watch of %s failed (%s); watching again in %.1f s",
                        self._dir,
                        lost.__cause__,
                        delay,
                        extra={"component": "watcher"},
                    )
                    await asyncio.sleep(delay)
                rescan = listening.is_set()

    async def _watch_with(
        self,
        listening: asyncio.Event,
        started: asyncio.Event,
        *,
        force_polling: bool,
        rescan: bool,
    ) -> None:
        stop = asyncio.Event()
        watcher = awatch(
            self._dir,
            recursive=True,
            force_polling=force_polling,
            poll_delay_ms=self._s.poll_delay_ms,
            debounce=200,
            step=20,
            stop_event=stop,
            ignore_permission_denied=True,
            # the default filter drops names like `x~`, `.#x` or anything below a `.git`
            # folder; every name on disk may be a case, and the layout rules filter here
            watch_filter=None,
        )
        first = asyncio.ensure_future(_next_changes(watcher))
        try:
            # awatch sets up its watch on the first step; give it that step before scanning
            await asyncio.sleep(0.2)
            if first.done() and first.exception() is not None:
                # the watch could not be set up; nothing is listening
                await first
            started.set()
            listening.set()
            if rescan:
                await self.scan()
            changes = await first
            while True:
                await self._handle(changes)
                changes = await _next_changes(watcher)
        finally:
            stop.set()
            first.cancel()
            await asyncio.wait({first})
            if not first.cancelled():
                first.exception()  # retrieved, so it is never logged as unhandled
            with contextlib.suppress(Exception):
                await watcher.aclose()

    async def _handle(self, changes: set[tuple[Change, str]]) -> None:
        paths: list[str] = []
        new_ptn_paths: list[str] = []
        for change, path in changes:
            if change == Change.deleted:
                continue
            event = classify_event_path(str(self._dir), path, marker=self._s.ready_marker)
            if event.kind == PathKind.IGNORED:
                if change == Change.added and self._is_room_folder(path):
                    # a new room folder: what was made inside it before its watch was
                    # added gives no event of its own, so look below it once
                    paths.append(path)
                continue
            if event.kind == PathKind.PTN and change == Change.added:
                new_ptn_paths.append(path)
            paths.append(path)
        if not paths:
            return
        found = await asyncio.to_thread(
            check_candidates, str(self._dir), sorted(set(paths)), self._s.ready_marker
        )
        for case in found:
            new_ptn = any(p.startswith(case.case_path + os.sep) for p in new_ptn_paths)
            await self._report(case, new_ptn)

    def _is_room_folder(self, path: str) -> bool:
        relative = os.path.relpath(os.path.normpath(path), os.path.normpath(self._dir))
        return relative in ROOMS
