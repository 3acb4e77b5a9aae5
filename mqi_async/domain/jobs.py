"""Value types shared by the engine and the hosts: commands, detached jobs, transfers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

#: called with (bytes_done, bytes_total) as a transfer progresses
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandResult:
    """What a finished command returned (mirrors subprocess.CompletedProcess)."""

    exit_status: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


@dataclass(frozen=True, slots=True, kw_only=True)
class JobSpec:
    """One detached MOQUI launch in its own attempt directory on a host."""

    #: absolute attempt directory on the host; created by spawn_job (parents too)
    job_dir: str
    #: the command, as an argv list; quoted by the host, never passed through a shell as text
    argv: tuple[str, ...]
    #: working directory of the command (absolute); defaults to job_dir
    cwd: str | None = None
    #: variables set inline on the command line (sshd drops client-sent env)
    env: tuple[tuple[str, str], ...] = ()
    #: files to write into job_dir before launch: name -> text (e.g. moqui_tps.in)
    files: tuple[tuple[str, str], ...] = ()
    #: a label for schedulers and `ps` (case and beam), never used in paths
    name: str = "mqi"
    #: wall-clock limit for schedulers that enforce one (slurm); the engine also enforces it
    time_limit_s: float | None = None


class JobState(StrEnum):
    RUNNING = "running"
    #: pending in a batch queue (slurm)
    QUEUED = "queued"
    EXITED = "exited"
    #: no exit code and no live process: it died without the wrapper noticing
    LOST = "lost"


@dataclass(frozen=True, slots=True, kw_only=True)
class JobStatus:
    """One job's state as read by a batched poll."""

    job_dir: str
    state: JobState
    exit_code: int | None = None
    #: set when the process ended by a signal (e.g. "KILL", "ABRT")
    signal: str | None = None
    #: last lines of the job's log, for progress and error messages
    log_tail: str = ""
    #: a scheduler's own word for the state (slurm: PENDING reason, TIMEOUT, ...)
    detail: str = ""
    #: seconds the command has run, measured on the host from the start its wrapper recorded
    #: (queue time, outages and our own restarts never count); None when unknown
    run_seconds: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JobHandle:
    """What spawn_job recorded; enough to poll, kill or re-attach after a restart."""

    job_dir: str
    #: process-group id on the host, or the scheduler's job id
    job_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferReport:
    """What one upload or download did."""

    files_sent: int = 0
    #: files that were already present and verified, so not sent again
    files_skipped: int = 0
    bytes_sent: int = 0
    sha256: dict[str, str] = field(default_factory=dict)
