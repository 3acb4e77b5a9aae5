"""Retention: removes finished attempt and case folders on hosts and old local work folders."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mqi_async.domain.errors import MqiError
from mqi_async.domain.records import CaseRow
from mqi_async.domain.retention import (
    PATHS_PER_SCRIPT,
    RetentionPolicy,
    attempt_due,
    case_folder,
    case_folder_due,
    parse_removed,
    removable_remote,
    remove_script,
    work_folder_due,
)
from mqi_async.engine.layout import CaseDirs
from mqi_async.engine.ports import Clock, Host, Store

log = logging.getLogger(__name__)

#: the event kind of every removal
RETENTION_REMOVED = "retention_removed"
_COMMAND_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionSettings:
    policy: RetentionPolicy
    sweep_s: float
    work_directory: Path
    scan_directory: Path


@dataclass(frozen=True, slots=True)
class _Target:
    path: str
    case_id: str
    beam_id: str | None


class RetentionSweeper:
    """Every `sweep_s`, removes what the policy says may go; each removal is an event."""

    def __init__(
        self,
        *,
        store: Store,
        hosts: Mapping[str, Host],
        clock: Clock,
        settings: RetentionSettings,
        case_key: Callable[[CaseRow], str],
    ) -> None:
        self._store = store
        self._hosts = hosts
        self._clock = clock
        self._s = settings
        self._case_key = case_key
        #: (host or "", path) already removed by this process: never asked about again
        self._gone: set[tuple[str, str]] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._s.sweep_s)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention sweep failed; trying again in %.0f s", self._s.sweep_s)

    async def sweep(self) -> int:
        """One pass; returns how many folders were removed."""
        now = self._clock.now()
        policy = self._s.policy
        remote: dict[str, list[_Target]] = {name: [] for name in self._hosts}
        local: list[tuple[Path, str]] = []
        for case in await self._store.list_cases():
            beams = await self._store.list_beams(case.case_id)
            runs = [r for b in beams for r in await self._store.list_runs(b.beam_id)]
            key = self._case_key(case)
            if case_folder_due(case, beams, runs, now, policy):
                for name, host in self._hosts.items():
                    remote[name].append(
                        _Target(case_folder(host.remote_root, key), case.case_id, None)
                    )
            else:
                by_id = {b.beam_id: b for b in beams}
                for run in runs:
                    beam = by_id.get(run.beam_id)
                    if (
                        beam is not None
                        and run.host in remote
                        and attempt_due(run, beam, now, policy)
                    ):
                        remote[run.host].append(_Target(run.job_dir, case.case_id, beam.beam_id))
            if work_folder_due(case, now, policy):
                local.append((CaseDirs.of(self._s.work_directory, case).root, case.case_id))
        removed = 0
        for name, targets in remote.items():
            removed += await self._remove_remote(self._hosts[name], targets)
        for path, case_id in local:
            removed += await self._remove_local(path, case_id)
        return removed

    async def _remove_remote(self, host: Host, targets: list[_Target]) -> int:
        todo = [
            t
            for t in targets
            if (host.name, t.path) not in self._gone and removable_remote(host.remote_root, t.path)
        ]
        if not todo or not host.is_available():
            return 0
        removed = 0
        for start in range(0, len(todo), PATHS_PER_SCRIPT):
            part = todo[start : start + PATHS_PER_SCRIPT]
            paths = [t.path for t in part]
            try:
                result = await host.run(
                    ["/bin/sh", "-c", remove_script(paths)], timeout_s=_COMMAND_TIMEOUT_S
                )
            except MqiError as exc:
                log.warning("retention on %s: %s", host.name, exc, extra={"host": host.name})
                return removed
            gone = set(parse_removed(result.stdout, paths))
            if not result.ok:
                log.warning(
                    "retention on %s: rm failed: %s",
                    host.name,
                    result.stderr.strip()[-300:],
                    extra={"host": host.name},
                )
            for t in part:
                if t.path in gone:
                    removed += 1
                    await self._store.append_event(
                        RETENTION_REMOVED,
                        f"removed {t.path} on {host.name}",
                        case_id=t.case_id,
                        beam_id=t.beam_id,
                        data={"host": host.name, "path": t.path},
                    )
                if result.ok:
                    self._gone.add((host.name, t.path))
        return removed

    async def _remove_local(self, path: Path, case_id: str) -> int:
        if ("", str(path)) in self._gone:
            return 0
        work = self._s.work_directory.resolve()
        scan = self._s.scan_directory.resolve()
        target = path.resolve()
        # never the scan directory, nothing outside the work directory, never through a link
        if (
            target.parent != work
            or path.is_symlink()
            or target == scan
            or scan.is_relative_to(target)
            or target.is_relative_to(scan)
        ):
            log.error("retention refused to remove %s", path, extra={"case_id": case_id})
            self._gone.add(("", str(path)))
            return 0
        if not target.exists():
            self._gone.add(("", str(path)))
            return 0
        try:
            kept = await asyncio.to_thread(_remove_keeping_reports, target)
        except OSError as exc:
            log.warning("retention: cannot remove %s: %s", path, exc, extra={"case_id": case_id})
            return 0
        self._gone.add(("", str(path)))
        await self._store.append_event(
            RETENTION_REMOVED,
            f"removed the work folder {path}"
            + (f" (kept the signed-off record: {', '.join(kept)})" if kept else ""),
            case_id=case_id,
            data={"host": None, "path": str(path), "kept": kept},
        )
        return 1


#: what retention leaves in a case's work folder: the case report is the record people sign
KEPT_FILES = ("report.pdf", "report.html")


def _remove_keeping_reports(folder: Path) -> list[str]:
    """Remove `folder` but its case report; the names kept (the folder goes when none)."""
    kept = [name for name in KEPT_FILES if (folder / name).is_file()]
    if not kept:
        shutil.rmtree(folder)
        return []
    for child in folder.iterdir():
        if child.name in kept:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    return kept
