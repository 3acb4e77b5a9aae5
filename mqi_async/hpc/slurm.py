"""SlurmHost: the Host protocol on a Slurm cluster, driven over SSH on its login node.

Commands, files and SFTP go through a composed SshHost (one pooled asyncssh connection);
MOQUI runs as one batch job per attempt. The batch script is the detached-run wrapper: it
runs MOQUI in the attempt directory (on the cluster's shared filesystem) and writes the same
`exit_code` file, so the exit file is the first source of truth and Slurm (`squeue`, then
`sacct`/`sacct -c`) the second. Files in an attempt directory:

    job.sbatch      the batch script           moqui.log    MOQUI's output
    job_id          sbatch's job id            slurm.out    the batch script's own output
    slurm.claim/    made by the job that runs MOQUI (with its job_id): a second job for
                    the same directory (a resubmit after a lost sbatch reply) does nothing
    exit_code       `<status>\\n<signal name>\\n`, written last (temp name, then rename)

Every Slurm client command runs under the host's `timeout`, inside a local deadline. A
controller that does not answer marks the host unavailable (no new launches; `spawn_job`,
`kill_job` and `queue_summary` raise HostUnavailableError) and a background probe
(`scontrol ping`) marks it available again. Polls keep reading exit files meanwhile and
raise HostUnavailableError only once the outage has lasted `controller_grace_s`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import logging
import math
import re
import shlex
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

from mqi_async.config import SlurmHostSettings
from mqi_async.domain import slurm
from mqi_async.domain.errors import (
    ConfigError,
    HostUnavailableError,
    MqiError,
    PermanentError,
    TransientError,
)
from mqi_async.domain.gpus import GpuSample
from mqi_async.domain.jobs import (
    CommandResult,
    JobHandle,
    JobSpec,
    JobStatus,
    ProgressCallback,
    TransferReport,
)
from mqi_async.hpc import jobs
from mqi_async.hpc.ssh import ConnectLimiter, SshEndpoint, SshPool
from mqi_async.hpc.ssh_host import SshHost, utc_now

log = logging.getLogger(__name__)

JOB_ID_FILE = "job_id"
CLAIM_DIR = "slurm.claim"
SCRIPT_FILE = "job.sbatch"
SLURM_OUT_FILE = "slurm.out"
#: seconds one Slurm client command may take (they hang 9-19 s when slurmctld is down)
SLURM_COMMAND_TIMEOUT_S = 25.0
#: extra seconds the SSH call may take beyond the commands it wraps
_SSH_SLACK_S = 10.0
#: how long an undecided picture (exit file but job still active, or a final job without
#: exit file) may last before it is decided anyway
SETTLE_S = 15.0
#: how long the controller may be unreachable before polls pause the host's beams
CONTROLLER_GRACE_S = 60.0
#: seconds between probes of an unreachable controller (doubling up to the maximum)
PROBE_INITIAL_S = 1.0
PROBE_MAX_S = 15.0
#: seconds start() waits for the first `scontrol ping` (the service gives a host 30 s to start)
START_PING_S = 10.0
#: seconds kill_job waits for a cancelled job to leave the running states
CANCEL_WAIT_S = 15.0
_DEFAULT_GRES = "gpu:1"
_RECORD = "MQISLURM"
_SQ = "MQISQ"
_SQ_RC = "MQISQUEUE"
_SUBMITTED = "MQISLURMJOB"
_SBATCH_RC = "MQISBATCHRC"

# The batch script. It claims the attempt directory (mkdir is atomic on every shared
# filesystem), records its job id, runs MOQUI in the background and waits, because a trapped
# TERM (scancel, time limit) must not stop it before it writes the exit status.
_BATCH = (
    """\
#!/bin/sh
# mqi-async: one MOQUI attempt as a Slurm batch job; writes exit_code like a detached run
umask 077
d=JOB_DIR
cd -- "$d" || exit 126
if ! mkdir CLAIM 2>/dev/null; then
  echo "mqi: $d is already run by job $(cat CLAIM/job_id 2>/dev/null);" \\
    "job ${SLURM_JOB_ID:-?} does nothing" >&2
  exit 0
fi
printf '%s\\n' "${SLURM_JOB_ID:-}" > CLAIM/job_id.tmp && mv -f CLAIM/job_id.tmp CLAIM/job_id
date +%s > CLAIM/started
trap 'mqi_term=1' TERM INT HUP
ENV_EXPORTS
mqi_child=
cd -- CWD && { COMMAND </dev/null >>"$d"/LOG 2>&1 & mqi_child=$!; }
"""
    + jobs.WAIT_AND_RECORD_EXIT
    + """\
exit "$rc"
"""
)


def _spec_error(exc: ValueError) -> PermanentError:
    return PermanentError("internal_error", f"cannot build the batch job: {exc}")


def batch_script(spec: JobSpec) -> str:
    """The batch script of one attempt (see `_BATCH`); raises ValueError for a bad spec."""
    if not spec.argv:
        raise ValueError("a job needs a command")
    jobs.check_text(spec.job_dir, "job_dir")
    for a in spec.argv:
        jobs.check_text(a, "argument")
    exports: list[str] = []
    for key, value in spec.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"not a valid environment variable name: {key!r}")
        jobs.check_text(value, f"value of {key}")
        exports.append(f"export {key}={shlex.quote(value)}")
    if spec.cwd:
        jobs.check_text(spec.cwd, "cwd")
    replacements = {
        "JOB_DIR": jobs.quote_path(spec.job_dir),
        "CLAIM": CLAIM_DIR,
        "ENV_EXPORTS": "\n".join(exports) or ":",
        "CWD": jobs.quote_path(spec.cwd) if spec.cwd else '"$d"',
        "COMMAND": jobs.quote_argv(spec.argv),
        "LOG": jobs.LOG_FILE,
        "EXIT": jobs.EXIT_FILE,
    }
    return re.sub(r"\b(" + "|".join(replacements) + r")\b", lambda m: replacements[m[1]], _BATCH)


def _read_id_lines(d: str = '"$d"') -> str:
    """Shell that sets $jid to the job id recorded in directory $d (claim first), or `-`."""
    return (
        "jid=-\n"
        f"for f in {d}/{CLAIM_DIR}/{JOB_ID_FILE} {d}/{JOB_ID_FILE}; do\n"
        '  if [ -s "$f" ]; then jid=$(sed -n 1p "$f"); break; fi\n'
        "done\n"
        "case $jid in ''|*[!0-9]*) jid=-;; esac\n"
    )


class SlurmHost:
    """A Slurm cluster: its login node over SSH, GPUs allocated by Slurm (GRES)."""

    def __init__(
        self,
        ssh: SshHost,
        *,
        partition: str | None = None,
        gres: str | None = _DEFAULT_GRES,
        sbatch_args: Sequence[str] = (),
        time_limit: str | None = "02:00:00",
        exclusive: bool = False,
        command_timeout_s: float = SLURM_COMMAND_TIMEOUT_S,
        settle_s: float = SETTLE_S,
        controller_grace_s: float = CONTROLLER_GRACE_S,
        probe_initial_s: float = PROBE_INITIAL_S,
        probe_max_s: float = PROBE_MAX_S,
        cancel_wait_s: float = CANCEL_WAIT_S,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        for arg in sbatch_args:
            jobs.check_text(arg, "sbatch argument")
        if time_limit:
            slurm.parse_time_limit(time_limit)  # raises ValueError
        self._ssh = ssh
        self._partition = partition or None
        self._gres = gres or None
        self._sbatch_args = tuple(sbatch_args)
        self._time_limit = time_limit or None
        self._exclusive = exclusive
        self._command_timeout_s = command_timeout_s
        self._settle_s = settle_s
        self._controller_grace_s = controller_grace_s
        self._probe_initial_s = probe_initial_s
        self._probe_max_s = probe_max_s
        self._cancel_wait_s = cancel_wait_s
        self._now = now
        #: monotonic time the controller stopped answering, None while it answers
        self._down_since: float | None = None
        self._down_reason = ""
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        #: (job_dir, picture) -> monotonic time the undecided picture was first seen
        self._undecided: dict[tuple[str, str], float] = {}

    @classmethod
    def from_settings(
        cls, settings: SlurmHostSettings, *, limiter: ConnectLimiter, all_gpus: bool = False
    ) -> SlurmHost:
        """Build from a `kind: slurm` host entry; all_gpus asks for whole nodes (--exclusive)."""
        ssh = SshHost(
            SshPool(SshEndpoint.from_settings(settings), limiter=limiter),
            remote_root=settings.remote_root,
            kind="slurm",
            moqui_command=settings.moqui_command,
        )
        try:
            return cls(
                ssh,
                partition=settings.partition,
                gres=settings.gres or _DEFAULT_GRES,
                sbatch_args=settings.sbatch_args,
                time_limit=settings.time_limit,
                exclusive=all_gpus,
            )
        except ValueError as exc:
            raise ConfigError([f"hosts: {settings.name}: {exc}"]) from exc

    # -- identity -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._ssh.name

    @property
    def kind(self) -> str:
        return "slurm"

    @property
    def leases_gpus(self) -> bool:
        return False

    @property
    def remote_root(self) -> str:
        return self._ssh.remote_root

    @property
    def moqui_command(self) -> tuple[str, ...]:
        return self._ssh.moqui_command

    @property
    def ssh(self) -> SshHost:
        return self._ssh

    @property
    def controller_down_s(self) -> float | None:
        """Seconds the controller has not answered, None while it answers."""
        return None if self._down_since is None else time.monotonic() - self._down_since

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self._ssh.start()
        if not self._ssh.is_available():
            return
        try:
            async with asyncio.timeout(START_PING_S):
                await self._ping()
        except TimeoutError:
            self._controller_failed(f"scontrol ping did not answer in {START_PING_S:g} s")
        except MqiError as exc:
            log.warning("slurm host %s: %s", self.name, exc, extra={"host": self.name})

    async def aclose(self) -> None:
        self._closed = True
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        await self._ssh.aclose()

    def is_available(self) -> bool:
        return self._ssh.is_available() and self._down_since is None

    # -- plain commands and files (the login node) --------------------------------------

    async def run(self, argv: Sequence[str], *, timeout_s: float) -> CommandResult:
        return await self._ssh.run(argv, timeout_s=timeout_s)

    async def put_tree(
        self, local_dir: Path, remote_dir: str, *, progress: ProgressCallback | None = None
    ) -> TransferReport:
        return await self._ssh.put_tree(local_dir, remote_dir, progress=progress)

    async def get_files(
        self,
        remote_dir: str,
        names: Sequence[str],
        local_dir: Path,
        *,
        progress: ProgressCallback | None = None,
    ) -> TransferReport:
        return await self._ssh.get_files(remote_dir, names, local_dir, progress=progress)

    async def list_dir(self, remote_dir: str) -> dict[str, int]:
        return await self._ssh.list_dir(remote_dir)

    # -- the controller -------------------------------------------------------------------

    def _timed(self, argv: Sequence[str]) -> str:
        """A Slurm client command line under the host's `timeout`."""
        limit = max(1, math.ceil(self._command_timeout_s))
        return f"timeout -k 2 {limit} {jobs.quote_argv(argv)}"

    async def _script(self, script: str, *, commands: int = 1) -> CommandResult:
        timeout_s = commands * (self._command_timeout_s + 3) + _SSH_SLACK_S
        command = jobs.timed_command(["/bin/sh", "-c", script], timeout_s=timeout_s + 2)
        try:
            return await self._ssh.pool.run(command, timeout_s=timeout_s)
        except TransientError as exc:
            if exc.code == "remote_timeout":
                self._controller_failed(f"a Slurm command did not finish in {timeout_s:g} s")
            raise

    def _check_answer(self, rc: int, output: str, what: str) -> None:
        """Record whether a Slurm command reached the controller; raise if it did not."""
        if rc in (124, 137) or slurm.controller_unreachable(output):
            why = (
                f"{what} timed out after {self._command_timeout_s:g} s"
                if rc in (124, 137)
                else f"{what}: {_last_line(output)}"
            )
            self._controller_failed(why)
            raise HostUnavailableError(
                self.name, "host_unreachable", f"the Slurm controller does not answer ({why})"
            )
        self._controller_ok()

    def _controller_failed(self, why: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "slurm host %s: the controller does not answer (%s); no new jobs until it does",
                self.name,
                why,
                extra={"host": self.name},
            )
        self._down_reason = why
        if (self._probe is None or self._probe.done()) and not self._closed:
            self._probe = asyncio.get_running_loop().create_task(
                self._probe_until_up(), name=f"slurm-probe-{self.name}"
            )

    def _controller_ok(self) -> None:
        if self._down_since is not None:
            log.info(
                "slurm host %s: the controller answers again after %.1f s",
                self.name,
                time.monotonic() - self._down_since,
                extra={"host": self.name},
            )
        self._down_since = None
        self._down_reason = ""

    async def _ping(self) -> None:
        script = self._timed(["scontrol", "ping"]) + " 2>&1"
        res = await self._script(script)
        if res.exit_status == 0 and " is UP" in res.stdout:
            self._controller_ok()
            return
        why = _last_line(res.stdout) or f"scontrol ping exited {res.exit_status}"
        self._controller_failed(why)
        raise HostUnavailableError(
            self.name, "host_unreachable", f"the Slurm controller does not answer ({why})"
        )

    async def _probe_until_up(self) -> None:
        delay = self._probe_initial_s
        while self._down_since is not None and not self._closed:
            await asyncio.sleep(delay)
            delay = min(self._probe_max_s, delay * 2)
            try:
                await self._ping()
            except MqiError:
                continue

    # -- jobs -----------------------------------------------------------------------------

    def _sbatch_argv(self, spec: JobSpec) -> list[str]:
        time_limit = self._time_limit
        if time_limit is None and spec.time_limit_s is not None:
            time_limit = slurm.format_time_limit(spec.time_limit_s)
        argv = [
            "sbatch",
            "--parsable",
            f"--job-name={slurm.job_name(spec.name)}",
            "--open-mode=append",
            # the engine retries failed attempts itself, in a fresh directory
            "--no-requeue",
        ]
        if time_limit:
            argv.append(f"--time={time_limit}")
        if self._partition:
            argv.append(f"--partition={self._partition}")
        if self._gres:
            argv.append(f"--gres={self._gres}")
        if self._exclusive:
            argv.append("--exclusive")
        argv.extend(self._sbatch_args)
        return argv

    def submit_script(self, spec: JobSpec) -> str:
        """Create the attempt directory, write its files and submit it, once.

        Idempotent: a directory that already has a job id (or a claim) is not submitted
        again; its id is printed instead. Prints `MQISLURMJOB <id>`.
        """
        text = batch_script(spec)
        d = jobs.quote_path(spec.job_dir)
        lines = [
            jobs.PRIVATE_UMASK,
            f"d={d}",
            'mkdir -p -- "$d" || exit 3',
            _read_id_lines(),
            f'if [ "$jid" != - ]; then printf "{_SUBMITTED} %s\\n" "$jid"; exit 0; fi',
        ]
        embedded = len(text)
        for name, body in (*spec.files, (SCRIPT_FILE, text)):
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"job file names are plain names: {name!r}")
            jobs.check_text(body, f"file {name}")
            if name != SCRIPT_FILE:
                embedded += len(body)
            tmp = shlex.quote(name + ".tmp")
            lines.append(
                f'printf %s {shlex.quote(body)} > "$d"/{tmp} && '
                f'mv -f "$d"/{tmp} "$d"/{shlex.quote(name)} || exit 3'
            )
        if embedded > jobs.MAX_EMBEDDED_FILE_CHARS:
            raise ValueError(f"job files are too large to embed ({embedded} characters)")
        sbatch = self._timed(self._sbatch_argv(spec))
        lines += [
            f'out=$({sbatch} "--chdir=$d" "--output=$d/{SLURM_OUT_FILE}" '
            f'"$d/{SCRIPT_FILE}" 2>"$d/sbatch.err"); rc=$?',
            f'if [ "$rc" -ne 0 ]; then cat "$d/sbatch.err" >&2; '
            f'printf "{_SBATCH_RC} %s\\n" "$rc"; exit 5; fi',
            "jid=$(printf '%s\\n' \"$out\" | sed -n 1p); jid=${jid%%;*}",
            "case $jid in ''|*[!0-9]*) "
            'echo "sbatch printed no job id: $out" >&2; cat "$d/sbatch.err" >&2; exit 6;; esac',
            f'printf "%s\\n" "$jid" > "$d/{JOB_ID_FILE}.tmp" && '
            f'mv -f "$d/{JOB_ID_FILE}.tmp" "$d/{JOB_ID_FILE}"',
            f'printf "{_SUBMITTED} %s\\n" "$jid"',
        ]
        return "\n".join(lines) + "\n"

    async def spawn_job(self, spec: JobSpec) -> JobHandle:
        """Submit the attempt; returns once sbatch has answered with the job id."""
        if self._down_since is not None:
            raise HostUnavailableError(
                self.name,
                "host_unreachable",
                f"the Slurm controller does not answer ({self._down_reason})",
            )
        try:
            script = self.submit_script(spec)
        except ValueError as exc:
            raise _spec_error(exc) from exc
        res = await self._script(script)
        job_id = _record(res.stdout, _SUBMITTED)
        if job_id is not None and slurm.is_job_id(job_id):
            self._controller_ok()
            log.info(
                "host %s: submitted %s as job %s", self.name, spec.job_dir, job_id,
                extra={"host": self.name},
            )  # fmt: skip
            return JobHandle(job_dir=spec.job_dir, job_id=job_id)
        sbatch_rc = _record(res.stdout, _SBATCH_RC)
        if sbatch_rc is not None and sbatch_rc.isdigit():
            self._check_answer(int(sbatch_rc), res.stderr, "sbatch")
        raise TransientError(
            "launch_failed",
            f"host {self.name}: sbatch failed (exit {res.exit_status}): "
            f"{res.stderr.strip()[-500:]}",
        )

    async def attach_job(self, job_dir: str, *, fence: bool = False) -> JobHandle | None:
        """The handle of a job submitted earlier for job_dir (after a restart), or None.

        With `fence` and no recorded job id, the claim folder is made, so a job that sbatch
        queued after all (its reply lost) does nothing when it starts.
        """
        try:
            jobs.check_text(job_dir, "job_dir")
        except ValueError as exc:
            raise _spec_error(exc) from exc
        close = (
            f'[ "$jid" = - ] && mkdir -p -- "$d" && mkdir "$d/{CLAIM_DIR}" 2>/dev/null\n'
            if fence
            else ""
        )
        script = (
            f"d={jobs.quote_path(job_dir)}\n{_read_id_lines()}{close}"
            f"printf '{_SUBMITTED} %s\\n' \"$jid\"\n"
        )
        res = await self._script(script)
        job_id = _record(res.stdout, _SUBMITTED)
        return JobHandle(job_dir=job_dir, job_id=job_id) if job_id and job_id != "-" else None

    def poll_script(self, handles: Sequence[JobHandle], *, with_queue: bool = True) -> str:
        """Exit file, recorded job id and log tail of every attempt, then one squeue for all.

        Lines: `MQINOW <epoch>`, then per attempt
        `MQISLURM <index> <exit|-> <signal|-> <job id|-> <start epoch|-> <base64 log tail|->`
        (start: when the batch script began on a node, so queue time never counts), then
        `MQISQUEUE <squeue's exit status>` and squeue's lines prefixed with `MQISQ `
        (without_queue, while the controller is known to be down, only the first part).
        """
        calls: list[str] = []
        for i, h in enumerate(handles):
            jobs.check_text(h.job_dir, "job_dir")
            hint = h.job_id if slurm.is_job_id(h.job_id) else "-"
            calls.append(f"mqi_job {i} {jobs.quote_path(h.job_dir)} {hint}")
        squeue = self._timed(["squeue", "-h", "-t", "all", "-o", "%i|%T|%r", "-j"])
        id_lines = _read_id_lines().replace("\n", "\n  ")
        return f"""\
ids=
printf 'MQINOW %s\\n' "$(date +%s)"
mqi_job() {{
  i=$1; d=$2
  ec=-; sig=-
  if [ -f "$d/{jobs.EXIT_FILE}" ]; then
    ec=$(sed -n 1p "$d/{jobs.EXIT_FILE}"); sig=$(sed -n 2p "$d/{jobs.EXIT_FILE}")
    case $ec in ''|*[!0-9]*) ec=-;; esac
    case $sig in ''|*[!A-Z0-9+]*) sig=-;; esac
  fi
  {id_lines}[ "$jid" = - ] && jid=$3
  st=$(sed -n 1p "$d/{CLAIM_DIR}/started" 2>/dev/null); case $st in ''|*[!0-9]*) st=-;; esac
  t=$(tail -c {jobs.LOG_TAIL_BYTES} "$d/{jobs.LOG_FILE}" 2>/dev/null | base64 | tr -d '\\n')
  printf '{_RECORD} %s %s %s %s %s %s\\n' "$i" "$ec" "$sig" "$jid" "$st" "${{t:--}}"
  if [ "$jid" != - ]; then ids="$ids,$jid"; fi
}}
{chr(10).join(calls)}
ids=${{ids#,}}
if [ -n "$ids" ] && [ {int(with_queue)} = 1 ]; then
  case $ids in *,*) ;; *) ids="$ids,$ids";; esac
  q=$({squeue} "$ids" 2>&1); rc=$?
  printf '{_SQ_RC} %s\\n' "$rc"
  printf '%s\\n' "$q" | sed 's/^/{_SQ} /'
fi
"""

    async def poll_jobs(self, handles: Sequence[JobHandle]) -> dict[str, JobStatus]:
        """One batched read per chunk: exit files and log tails, plus one squeue for all jobs;
        sacct only for jobs Slurm reports final (or forgot) without an exit file."""
        unique = list({h.job_dir: h for h in handles}.values())
        if not unique:
            return {}
        observations: dict[str, slurm.Observation] = {}
        job_ids: dict[str, str] = {}
        queue_ok = True
        try:
            # while the controller is known to be down only the exit files are read; the
            # probe notices when it is back
            with_queue = self._down_since is None
            for part in _chunks(unique):
                res = await self._script(self.poll_script(part, with_queue=with_queue))
                obs, ids, ok = self._parse_poll(res, part)
                observations.update(obs)
                job_ids.update(ids)
                queue_ok = queue_ok and ok
        except ValueError as exc:
            raise _spec_error(exc) from exc
        if not queue_ok:
            down = self.controller_down_s
            if down is not None and down >= self._controller_grace_s:
                raise HostUnavailableError(
                    self.name,
                    "host_unreachable",
                    f"the Slurm controller has not answered for {down:.0f} s ({self._down_reason})",
                )
        statuses, need_acct = self._judge_all(observations)
        if need_acct:
            # a failed sacct counts as "no record": the verdict then rests on squeue alone
            acct = await self._sacct([job_ids[d] for d in need_acct if d in job_ids]) or {}
            for d in need_acct:
                observations[d] = dataclasses.replace(
                    observations[d], acct=acct.get(job_ids.get(d, "")), acct_known=True
                )
            more, _ = self._judge_all({d: observations[d] for d in need_acct})
            statuses.update(more)
        live = set(observations)
        for key in [k for k in self._undecided if k[0] not in live]:
            del self._undecided[key]
        return statuses

    def _parse_poll(
        self, res: CommandResult, part: Sequence[JobHandle]
    ) -> tuple[dict[str, slurm.Observation], dict[str, str], bool]:
        records: dict[int, list[str]] = {}
        queue_lines: list[str] = []
        queue_rc: int | None = None
        host_now: int | None = None
        for line in res.stdout.splitlines():
            if line.startswith("MQINOW "):
                value = line.split(" ", 1)[1].strip()
                host_now = int(value) if value.isdigit() else None
            elif line.startswith(_RECORD + " "):
                fields = line.split(" ")
                if len(fields) == 7 and fields[1].isdigit() and int(fields[1]) < len(part):
                    records[int(fields[1])] = fields[2:]
            elif line.startswith(_SQ_RC + " "):
                value = line.split(" ", 1)[1].strip()
                queue_rc = int(value) if value.isdigit() else 1
            elif line.startswith(_SQ + " "):
                queue_lines.append(line[len(_SQ) + 1 :])
        queue_text = "\n".join(queue_lines)
        queue_ok = queue_rc is not None
        if queue_rc is not None:
            try:
                self._check_answer(queue_rc, queue_text, "squeue")
            except HostUnavailableError:
                queue_ok = False
        rows = slurm.parse_squeue(queue_text) if queue_ok else {}
        if queue_ok and queue_rc not in (None, 0):
            log.warning(
                "host %s: squeue exited %s: %s", self.name, queue_rc, _last_line(queue_text),
                extra={"host": self.name},
            )  # fmt: skip
            queue_ok = False
        observations: dict[str, slurm.Observation] = {}
        ids: dict[str, str] = {}
        for i, h in enumerate(part):
            rec = records.get(i)
            if rec is None:
                continue  # cut off: unknown this tick, never read as an exit
            ec, sig, jid, start, tail = rec
            if slurm.is_job_id(jid):
                ids[h.job_dir] = jid
            code = int(ec) if ec.isdigit() and len(ec) <= 5 else None
            started = int(start) if start.isdigit() and len(start) <= 12 else None
            run_s = float(max(0, host_now - started)) if host_now and started else None
            observations[h.job_dir] = slurm.Observation(
                job_dir=h.job_dir,
                exit_code=code,
                exit_signal=None if code is None or sig == "-" else sig.removeprefix("SIG"),
                log_tail=_decode_tail(tail),
                queue_known=queue_ok and slurm.is_job_id(jid),
                queue=rows.get(jid),
                run_seconds=run_s,
            )
        return observations, ids, queue_ok

    def _judge_all(
        self, observations: dict[str, slurm.Observation]
    ) -> tuple[dict[str, JobStatus], list[str]]:
        statuses: dict[str, JobStatus] = {}
        need_acct: list[str] = []
        now = time.monotonic()
        for d, obs in observations.items():
            picture = _picture(obs)
            first = self._undecided.setdefault((d, picture), now)
            verdict = slurm.judge(obs, settled=now - first >= self._settle_s)
            if verdict.needs_acct:
                need_acct.append(d)
            if verdict.status is not None:
                statuses[d] = verdict.status
        return statuses, need_acct

    async def _sacct(self, ids: Sequence[str]) -> dict[str, slurm.AcctRow] | None:
        """Final records from the accounting database, else from the job-completion log."""
        if not ids:
            return {}
        joined = ",".join(dict.fromkeys(ids))
        fields = ["-n", "-P", "-j", joined, "-o", "jobid,state,exitcode"]
        plain = self._timed(["sacct", "-X", *fields])
        completion = self._timed(["sacct", "-c", *fields])
        script = f"{plain} 2>/dev/null || {completion} 2>&1"
        try:
            res = await self._script(script, commands=2)
        except MqiError as exc:
            log.warning("host %s: sacct failed: %s", self.name, exc, extra={"host": self.name})
            return None
        if res.exit_status != 0:
            with contextlib.suppress(HostUnavailableError):
                self._check_answer(res.exit_status, res.stdout, "sacct")
            log.warning(
                "host %s: sacct exited %d: %s", self.name, res.exit_status,
                _last_line(res.stdout), extra={"host": self.name},
            )  # fmt: skip
            return None
        return slurm.parse_sacct(res.stdout)

    async def kill_job(self, handle: JobHandle) -> None:
        """scancel the attempt's job(s) and wait (bounded) until Slurm has ended them."""
        try:
            jobs.check_text(handle.job_dir, "job_dir")
        except ValueError as exc:
            raise _spec_error(exc) from exc
        hint = handle.job_id if slurm.is_job_id(handle.job_id) else ""
        scancel = self._timed(["scancel"])
        squeue = self._timed(["squeue", "-h", "-o", "%i|%T", "-j"])
        ticks = max(1, math.ceil(self._cancel_wait_s * 5))
        script = f"""\
d={jobs.quote_path(handle.job_dir)}
ids=
for f in "$d/{CLAIM_DIR}/{JOB_ID_FILE}" "$d/{JOB_ID_FILE}"; do
  j=$(sed -n 1p "$f" 2>/dev/null)
  case $j in ''|*[!0-9]*) ;; *) case " $ids " in *" $j "*) ;; *) ids="$ids $j";; esac;; esac
done
[ -n "$ids" ] || ids={shlex.quote(hint)}
[ -n "$ids" ] || exit 0
out=$({scancel} $ids 2>&1); rc=$?
if [ "$rc" -ne 0 ]; then printf '%s\\n' "$out" >&2; exit "$rc"; fi
list=$(echo $ids | tr ' ' ','),$(echo $ids | tr ' ' ',')
i=0
while [ "$i" -lt {ticks} ]; do
  left=$({squeue} "$list" 2>/dev/null | grep -E '[|](PENDING|CONFIGURING|RUNNING|COMPLETING|SUSPENDED)') || break
  sleep 0.2; i=$((i+1))
done
echo "MQICANCELLED $ids"
"""
        res = await self._script(script, commands=2 + ticks // 25)
        if res.exit_status != 0:
            self._check_answer(res.exit_status, res.stderr, "scancel")
            raise TransientError(
                "remote_command_failed",
                f"host {self.name}: scancel for {handle.job_dir} exited {res.exit_status}: "
                f"{res.stderr.strip()[-500:]}",
            )
        log.info(
            "host %s: cancelled job(s) %s of %s", self.name,
            (_record(res.stdout, "MQICANCELLED") or hint or "-").strip(), handle.job_dir,
            extra={"host": self.name},
        )  # fmt: skip

    # -- GPUs and the queue ---------------------------------------------------------------

    async def sample_gpus(self) -> GpuSample:
        """No GPUs to lease here (Slurm allocates them): an empty sample once the controller
        answers `scontrol ping`; HostUnavailableError when it does not."""
        taken_at = self._now()
        await self._ping()
        return GpuSample(host=self.name, taken_at=taken_at, gpus=())

    async def queue_summary(self) -> slurm.SlurmQueue:
        """Our jobs in the queue (pending with Slurm's reason, running) and the nodes' GPUs."""
        part = ["-p", self._partition] if self._partition else []
        sinfo = self._timed(
            ["sinfo", "-h", "-N", *part, "-O", "NodeHost:|,StateCompact:|,Gres:|,GresUsed:|"]
        )
        squeue = self._timed(["squeue", "-h", *part, "-o", "%i|%T|%r|%b|%N|%M|%j", "-u"])
        script = (
            f'n=$({sinfo} 2>&1); nrc=$?\nq=$({squeue} "$(id -un)" 2>&1); qrc=$?\n'
            'printf "MQISINFO %s\\n" "$nrc"; printf "%s\\n" "$n"\n'
            'printf "MQIQUEUE %s\\n" "$qrc"; printf "%s\\n" "$q"\n'
        )
        taken_at = self._now()
        res = await self._script(script, commands=2)
        head, _, rest = res.stdout.partition("MQIQUEUE ")
        nodes_rc, _, nodes_text = head.removeprefix("MQISINFO ").partition("\n")
        queue_rc, _, queue_text = rest.partition("\n")
        for rc, text, what in ((nodes_rc, nodes_text, "sinfo"), (queue_rc, queue_text, "squeue")):
            status = int(rc) if rc.strip().isdigit() else 1
            self._check_answer(status, text, what)
            if status != 0:
                raise TransientError(
                    "remote_command_failed",
                    f"host {self.name}: {what} exited {status}: {_last_line(text)}",
                )
        return slurm.SlurmQueue(
            host=self.name,
            taken_at=taken_at,
            jobs=slurm.parse_queue_jobs(queue_text),
            nodes=slurm.parse_sinfo_nodes(nodes_text),
        )


def _picture(obs: slurm.Observation) -> str:
    """What an undecided poll saw; the settle clock runs while this stays the same."""
    state = obs.queue.state if obs.queue is not None else ("gone" if obs.queue_known else "?")
    return f"{'exit' if obs.exit_code is not None else 'noexit'}:{state}"


def _decode_tail(text: str) -> str:
    if text == "-":
        return ""
    try:
        return base64.b64decode(text, validate=True).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        return ""


def _record(stdout: str, tag: str) -> str | None:
    for line in stdout.splitlines():
        head, _, rest = line.partition(" ")
        if head == tag:
            return rest.strip()
    return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _chunks(handles: Sequence[JobHandle]) -> list[list[JobHandle]]:
    by_dir = {h.job_dir: h for h in handles}
    return [[by_dir[d] for d in part] for part in jobs.chunks(list(by_dir))]
