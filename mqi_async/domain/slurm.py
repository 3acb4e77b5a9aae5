"""Slurm's words as data: job states, sbatch/squeue/sacct/sinfo output parsing, named failures,
and the rule that turns an attempt's exit file plus Slurm's view into one JobStatus."""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from datetime import datetime

from mqi_async.domain.jobs import JobState, JobStatus

#: waiting for resources, priority, a dependency, a hold, ...
PENDING_STATES = frozenset(
    {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
)
#: allocated and not yet finished (a suspended or completing job still holds its GPUs)
ACTIVE_STATES = frozenset(
    {
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "SUSPENDED",
    }
)
TERMINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
    }
)
#: final states that say why an attempt ended, with the failure code the engine should record
#: (FAILED is named in `detail` too, but its exit code says more: moqui_exit_<N>)
NAMED_FAILURES: dict[str, str] = {
    "TIMEOUT": "slurm_timeout",
    "CANCELLED": "slurm_cancelled",
    "NODE_FAIL": "slurm_node_fail",
    "PREEMPTED": "slurm_preempted",
    "OUT_OF_MEMORY": "slurm_out_of_memory",
    "BOOT_FAIL": "slurm_boot_fail",
    "DEADLINE": "slurm_deadline",
}

#: what client commands print when slurmctld is down or does not answer in time
_UNREACHABLE = (
    "unable to contact slurm controller",
    "connect failure",
    "socket timed out",
    "connection refused",
    "slurm_receive_msg",
    "zero bytes were transmitted or received",
    "communication connection failure",
)
_JOB_ID = re.compile(r"[0-9]+")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]")
_TIME_PART = re.compile(r"[0-9]+")


def failure_code(detail: str) -> str | None:
    """The named failure code of a final Slurm state in JobStatus.detail (None if not named)."""
    return NAMED_FAILURES.get(detail.split(" ", 1)[0].upper()) if detail else None


def base_state(text: str) -> str:
    """`CANCELLED by 0` -> `CANCELLED`; `cancelled+` -> `CANCELLED`."""
    word = text.strip().split(" ", 1)[0] if text.strip() else ""
    return word.rstrip("+").upper()


def is_job_id(text: str) -> bool:
    return bool(text) and text.isascii() and _JOB_ID.fullmatch(text) is not None


def controller_unreachable(text: str) -> bool:
    """True when a client command's output says slurmctld could not be reached."""
    low = text.lower()
    return any(marker in low for marker in _UNREACHABLE)


def job_name(name: str, *, max_chars: int = 100) -> str:
    """A job name Slurm tools show unmangled: safe characters only, bounded length."""
    return _SAFE_NAME.sub("_", name)[:max_chars] or "mqi"


# -- command output -----------------------------------------------------------------------


def parse_sbatch_output(stdout: str) -> str | None:
    """The job id of `sbatch --parsable` (`<id>` or `<id>;<cluster>`), or None."""
    for line in stdout.splitlines():
        head = line.strip().split(";", 1)[0]
        if is_job_id(head):
            return head
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueRow:
    """One job as `squeue -o '%i|%T|%r'` shows it."""

    job_id: str
    state: str
    reason: str = ""


def parse_squeue(text: str) -> dict[str, QueueRow]:
    """Rows of `squeue -h -o '%i|%T|%r'` by job id; other lines (errors) are ignored."""
    rows: dict[str, QueueRow] = {}
    for line in text.splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) < 2 or not is_job_id(parts[0]):
            continue
        reason = parts[2].strip() if len(parts) > 2 else ""
        rows[parts[0]] = QueueRow(
            job_id=parts[0],
            state=base_state(parts[1]),
            reason="" if reason in ("None", "(null)") else reason,
        )
    return rows


@dataclass(frozen=True, slots=True, kw_only=True)
class AcctRow:
    """One job's final record from `sacct -P -o jobid,state,exitcode` (or `sacct -c`)."""

    job_id: str
    state: str
    exit_code: int | None
    #: the signal that ended the batch script, when Slurm recorded one
    signal: str | None = None


def parse_exit_pair(text: str) -> tuple[int, int] | None:
    """Slurm's `exit:signal` pair, e.g. `3:0` or `0:15`."""
    head, sep, tail = text.strip().partition(":")
    if not sep or not head.isdigit() or not tail.isdigit():
        return None
    return int(head), int(tail)


def signal_name(number: int) -> str | None:
    try:
        return signal.Signals(number).name.removeprefix("SIG")
    except ValueError:
        return None


def parse_sacct(text: str) -> dict[str, AcctRow]:
    """Rows of `sacct -n -P -o jobid,state,exitcode` by job id (allocation lines only)."""
    rows: dict[str, AcctRow] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not is_job_id(parts[0]):
            continue
        pair = parse_exit_pair(parts[2])
        code: int | None = None
        sig: str | None = None
        if pair is not None:
            status, signum = pair
            if status:
                code = status
            elif signum:
                code, sig = 128 + signum, signal_name(signum)
            else:
                code = 0
        # a job that was requeued shows up more than once; the last line is the newest
        rows[parts[0]] = AcctRow(
            job_id=parts[0], state=base_state(parts[1]), exit_code=code, signal=sig
        )
    return rows


@dataclass(frozen=True, slots=True, kw_only=True)
class SlurmJob:
    """One job of the service's user in the queue (`squeue -o '%i|%T|%r|%b|%N|%M|%j'`)."""

    job_id: str
    state: str
    reason: str
    gres: str
    nodes: str
    elapsed: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SlurmNode:
    """One node as `sinfo -N -O NodeHost,StateCompact,Gres,GresUsed` shows it."""

    name: str
    state: str
    gpus_total: int
    gpus_used: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SlurmQueue:
    """What the GPU panel shows for a cluster: our jobs, and the nodes' GPU use."""

    host: str
    taken_at: datetime
    jobs: tuple[SlurmJob, ...]
    nodes: tuple[SlurmNode, ...]

    @property
    def pending(self) -> tuple[SlurmJob, ...]:
        return tuple(j for j in self.jobs if j.state in PENDING_STATES)

    @property
    def running(self) -> tuple[SlurmJob, ...]:
        return tuple(j for j in self.jobs if j.state in ACTIVE_STATES)

    @property
    def gpus_total(self) -> int:
        return sum(n.gpus_total for n in self.nodes)

    @property
    def gpus_used(self) -> int:
        return sum(n.gpus_used for n in self.nodes)


def gpu_count(gres: str) -> int:
    """GPUs in a GRES string: `gpu:4`, `gpu:a100:2(IDX:0-1),gpu:v100:1`, `gpu:0`, `(null)`."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres):
        head = item.split("(", 1)[0].strip()
        fields = head.split(":")
        if len(fields) >= 2 and fields[0] == "gpu" and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def parse_queue_jobs(text: str) -> tuple[SlurmJob, ...]:
    jobs: list[SlurmJob] = []
    for line in text.splitlines():
        parts = line.strip().split("|", 6)
        if len(parts) != 7 or not is_job_id(parts[0]):
            continue
        reason = parts[2].strip()
        jobs.append(
            SlurmJob(
                job_id=parts[0],
                state=base_state(parts[1]),
                reason="" if reason in ("None", "(null)") else reason,
                gres=parts[3].strip(),
                nodes=parts[4].strip(),
                elapsed=parts[5].strip(),
                name=parts[6].strip(),
            )
        )
    return tuple(jobs)


def parse_sinfo_nodes(text: str) -> tuple[SlurmNode, ...]:
    nodes: dict[str, SlurmNode] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) < 4 or not parts[0]:
            continue
        # a node in several partitions is listed once per partition
        nodes[parts[0]] = SlurmNode(
            name=parts[0],
            state=parts[1],
            gpus_total=gpu_count(parts[2]),
            gpus_used=gpu_count(parts[3]),
        )
    return tuple(nodes.values())


# -- time limits --------------------------------------------------------------------------


def parse_time_limit(text: str) -> int | None:
    """Seconds of a Slurm time limit (`minutes`, `m:s`, `h:m:s`, `d-h`, `d-h:m`, `d-h:m:s`);
    None for UNLIMITED/INFINITE. Raises ValueError for anything else."""
    t = text.strip()
    if t.upper() in ("UNLIMITED", "INFINITE", "-1"):
        return None
    days = 0
    rest = t
    if "-" in t:
        d, rest = t.split("-", 1)
        if not _TIME_PART.fullmatch(d):
            raise ValueError(f"not a Slurm time limit: {text!r}")
        days = int(d)
    parts = rest.split(":")
    if not parts or len(parts) > 3 or not all(_TIME_PART.fullmatch(p) for p in parts):
        raise ValueError(f"not a Slurm time limit: {text!r}")
    n = [int(p) for p in parts]
    if "-" in t:
        # days-hours[:minutes[:seconds]]
        h, m, s = (n + [0, 0])[:3]
    elif len(n) == 1:
        h, m, s = 0, n[0], 0
    elif len(n) == 2:
        h, m, s = 0, n[0], n[1]
    else:
        h, m, s = n
    seconds = ((days * 24 + h) * 60 + m) * 60 + s
    if seconds <= 0:
        raise ValueError(f"a time limit must be positive: {text!r}")
    return seconds


def format_time_limit(seconds: float) -> str:
    """`--time` for a limit in seconds; Slurm counts whole minutes, so it is rounded up."""
    minutes = max(1, -(-int(seconds) // 60))
    days, rem = divmod(minutes, 24 * 60)
    hours, mins = divmod(rem, 60)
    return f"{days}-{hours:02d}:{mins:02d}:00" if days else f"{hours:02d}:{mins:02d}:00"


# -- one attempt's status -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """Everything one poll learned about one attempt."""

    job_dir: str
    #: the exit file of the detached-run protocol (written by the batch script), if present
    exit_code: int | None = None
    exit_signal: str | None = None
    log_tail: str = ""
    #: False when squeue could not be asked (controller down): absence then means nothing
    queue_known: bool = False
    queue: QueueRow | None = None
    #: sacct's final record, when it was consulted
    acct: AcctRow | None = None
    acct_known: bool = False
    #: seconds since the batch script started on a node (host clock), None before it starts
    run_seconds: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """A status to report now (or None: unknown this tick), and whether sacct would help."""

    status: JobStatus | None
    needs_acct: bool = False


def _from_final(obs: Observation, state: str, code: int | None, sig: str | None) -> JobStatus:
    """A finished job: a named failure with exit 0 (or none) is LOST, else EXITED."""
    if code is None or (code == 0 and state in NAMED_FAILURES):
        return JobStatus(
            job_dir=obs.job_dir,
            state=JobState.LOST,
            log_tail=obs.log_tail,
            detail=state or "no exit code and not known to Slurm",
        )
    if code == 0 and state not in ("", "COMPLETED"):
        # exit 0 from a job Slurm calls FAILED: trust Slurm, never a false success
        return JobStatus(
            job_dir=obs.job_dir, state=JobState.LOST, log_tail=obs.log_tail, detail=state
        )
    return JobStatus(
        job_dir=obs.job_dir,
        state=JobState.EXITED,
        exit_code=code,
        signal=sig,
        log_tail=obs.log_tail,
        detail=state,
    )


def judge(obs: Observation, *, settled: bool) -> Verdict:
    """Combine the exit file with Slurm's view; `settled` once the same undecided picture has
    lasted past the grace time (a shared filesystem may show the exit file late, and
    Slurm needs a moment to move a job from COMPLETING to its final state).

    - exit file + final Slurm state: EXITED with the file's code, the state in `detail`;
    - exit file + still active in Slurm: wait until settled, then the file decides;
    - exit file + Slurm unreachable or the job purged: the file decides (sacct adds the
      state of a failed job);
    - no exit file: PENDING is QUEUED (reason in `detail`), active is RUNNING; a final
      state or a job Slurm forgot is decided by sacct once settled.
    """
    q = obs.queue if obs.queue_known else None
    if obs.exit_code is not None:
        if q is not None and q.state not in TERMINAL_STATES and not settled:
            return Verdict(status=None)
        state = q.state if q is not None and q.state in TERMINAL_STATES else ""
        if not state and obs.acct is not None:
            state = obs.acct.state
        if obs.queue_known and q is None and obs.exit_code != 0 and not obs.acct_known:
            return Verdict(status=None, needs_acct=True)
        return Verdict(status=_from_final(obs, state, obs.exit_code, obs.exit_signal))
    if not obs.queue_known:
        return Verdict(status=None)
    if q is not None and q.state in PENDING_STATES:
        return Verdict(
            status=JobStatus(
                job_dir=obs.job_dir, state=JobState.QUEUED, log_tail=obs.log_tail, detail=q.reason
            )
        )
    if q is not None and q.state not in TERMINAL_STATES:
        return Verdict(
            status=JobStatus(
                job_dir=obs.job_dir,
                state=JobState.RUNNING,
                log_tail=obs.log_tail,
                detail="" if q.state == "RUNNING" else q.state,
                run_seconds=obs.run_seconds,
            )
        )
    # final in Slurm (or forgotten by it) and no exit file yet
    if not settled:
        return Verdict(status=None)
    if not obs.acct_known:
        return Verdict(status=None, needs_acct=True)
    acct = obs.acct
    state = q.state if q is not None else (acct.state if acct is not None else "")
    if acct is not None and acct.state in TERMINAL_STATES:
        state = acct.state
    if state == "COMPLETED" and (acct is None or acct.exit_code in (None, 0)):
        # Slurm says fine, but the batch script never wrote its exit file
        return Verdict(
            status=JobStatus(
                job_dir=obs.job_dir,
                state=JobState.LOST,
                log_tail=obs.log_tail,
                detail="COMPLETED without an exit_code file",
            )
        )
    code = acct.exit_code if acct is not None else None
    sig = acct.signal if acct is not None else None
    return Verdict(status=_from_final(obs, state, code, sig))


def queue_line(queue: SlurmQueue) -> str:
    """The cluster's state in one line for the dashboard's GPU panel."""
    reasons = sorted({j.reason for j in queue.pending if j.reason and j.reason != "None"})
    pending = f"{len(queue.pending)} pending" + (f" ({', '.join(reasons)})" if reasons else "")
    nodes = ", ".join(f"{n.name} {n.gpus_used}/{n.gpus_total} GPUs {n.state}" for n in queue.nodes)
    return f"{len(queue.running)} running, {pending}; {nodes or 'no nodes'}"
