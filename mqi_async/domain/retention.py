"""What retention may remove, and when: remote attempt and case folders, local work folders."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import PurePosixPath

from mqi_async.domain.model import BeamStatus, RunStatus
from mqi_async.domain.privacy import is_case_key
from mqi_async.domain.records import BeamRow, CaseRow, RunRow

#: the tag of one line of `remove_script` output
_RECORD = "MQIRM"
#: remote paths per removal script (each is quoted into one `sh -c` argument)
PATHS_PER_SCRIPT = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class RetentionPolicy:
    #: days a failed attempt's remote folder is kept for diagnosis
    remote_failed_days: float
    #: days a finished case's local work folder is kept; None keeps it forever
    work_days: float | None


def attempt_due(run: RunRow, beam: BeamRow, now: datetime, policy: RetentionPolicy) -> bool:
    """Whether a run's remote attempt folder may go now.

    A run whose beam completed (its dose downloaded and converted) may go at once; any other
    ended run of a finished or retried beam stays `remote_failed_days` after it ended.
    """
    if not run.status.is_terminal:
        return False
    if run.status == RunStatus.SUCCEEDED and beam.status == BeamStatus.COMPLETED:
        return True
    if run.status == RunStatus.SUCCEEDED and not beam.status.is_terminal:
        # downloading or converting right now, or about to be
        return False
    ended = run.ended_at or run.started_at
    return now - ended >= timedelta(days=policy.remote_failed_days)


def case_folder_due(
    case: CaseRow,
    beams: Sequence[BeamRow],
    runs: Sequence[RunRow],
    now: datetime,
    policy: RetentionPolicy,
) -> bool:
    """Whether a case's whole remote folder (its inputs: the RTPLAN and CSVs) may go.

    Only when the case is finished and every attempt folder in it may go too.
    """
    if not case.status.is_terminal:
        return False
    by_id = {b.beam_id: b for b in beams}
    return all(r.beam_id in by_id and attempt_due(r, by_id[r.beam_id], now, policy) for r in runs)


def work_folder_due(case: CaseRow, now: datetime, policy: RetentionPolicy) -> bool:
    """Whether a finished case's local work folder is older than `work_days`."""
    if policy.work_days is None or not case.status.is_terminal:
        return False
    return now - case.updated_at >= timedelta(days=policy.work_days)


def case_folder(remote_root: str, case_key: str) -> str:
    return str(PurePosixPath(remote_root) / case_key)


def removable_remote(remote_root: str, path: str) -> bool:
    """Whether `path` is a case folder or something inside one, under remote_root.

    Retention removes nothing else on a host: not remote_root, not a folder it did not name.
    """
    root = PurePosixPath(remote_root)
    target = PurePosixPath(path)
    if ".." in target.parts or "\0" in path:
        return False
    try:
        relative = target.relative_to(root)
    except ValueError:
        return False
    return bool(relative.parts) and is_case_key(relative.parts[0])


def _quote(path: str) -> str:
    """A host path as one shell word; a leading `~` stays the login's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def remove_script(paths: Sequence[str]) -> str:
    """Remove each path that exists; print `MQIRM <index>` for each one removed."""
    words = " ".join(_quote(p) for p in paths)
    return (
        "i=0\n"
        f"for p in {words}; do\n"
        '  if [ -e "$p" ] || [ -L "$p" ]; then\n'
        f'    rm -rf -- "$p" && printf \'{_RECORD} %s\\n\' "$i"\n'
        "  fi\n"
        "  i=$((i+1))\n"
        "done\n"
    )


def parse_removed(stdout: str, paths: Sequence[str]) -> list[str]:
    """The paths `remove_script` reported removed."""
    removed: list[str] = []
    for line in stdout.splitlines():
        head, _, index = line.partition(" ")
        if head == _RECORD and index.isascii() and index.isdigit() and int(index) < len(paths):
            removed.append(paths[int(index)])
    return removed
