"""SshHost: the Host protocol over one SshPool (exec, SFTP transfers, detached jobs, nvidia-smi)."""

from __future__ import annotations

import asyncio
import logging
import shlex
import stat
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncssh

from mqi_async.config import SlurmHostSettings, SshHostSettings
from mqi_async.domain.errors import PermanentError, TransientError
from mqi_async.domain.gpus import GpuSample, build_sample, gpu_query_script, split_gpu_query_output
from mqi_async.domain.jobs import (
    CommandResult,
    JobHandle,
    JobSpec,
    JobStatus,
    ProgressCallback,
    TransferReport,
)
from mqi_async.hpc import jobs, transfer
from mqi_async.hpc.ssh import ConnectLimiter, SshEndpoint, SshPool

log = logging.getLogger(__name__)

#: seconds each nvidia-smi query may take on the host (it can hang, lessons.md §4.5)
GPU_QUERY_TIMEOUT_S = 20.0
#: seconds a batched poll or a launch may take
SCRIPT_TIMEOUT_S = 30.0
#: seconds between TERM and KILL when stopping a job
KILL_GRACE_S = 10.0
#: the local deadline fires first; the host's `timeout` then reaps what is left
_REMOTE_SLACK_S = 2.0


def utc_now() -> datetime:
    return datetime.now(UTC)


def filter_gpus(sample: GpuSample, gpu_indices: Sequence[int] | None) -> GpuSample:
    """Keep only the GPUs this service may use (by index); all when gpu_indices is None."""
    if gpu_indices is None:
        return sample
    allowed = set(gpu_indices)
    gpus = tuple(g for g in sample.gpus if g.index in allowed)
    uuids = {g.uuid for g in gpus}
    return GpuSample(
        host=sample.host,
        taken_at=sample.taken_at,
        gpus=gpus,
        apps=tuple(a for a in sample.apps if a.gpu_uuid in uuids),
        skipped_rows=sample.skipped_rows,
    )


def gpu_sample_from_output(
    host: str, taken_at: datetime, result: CommandResult, gpu_indices: Sequence[int] | None
) -> GpuSample:
    """Parse the combined nvidia-smi script's result; a failed query is an error, not 'idle'."""
    parts = split_gpu_query_output(result.stdout)
    if parts is None or parts.inventory_rc != 0 or parts.apps_rc != 0:
        why = (
            "output cut off"
            if parts is None
            else (f"exit statuses {parts.inventory_rc} and {parts.apps_rc}")
        )
        raise TransientError(
            "remote_command_failed",
            f"host {host}: nvidia-smi failed ({why}): {result.stderr.strip()[-500:]}",
        )
    sample = build_sample(host, taken_at, parts.inventory_text, parts.apps_text)
    if sample.skipped_rows:
        log.warning("host %s: skipped nvidia-smi rows: %s", host, list(sample.skipped_rows))
    return filter_gpus(sample, gpu_indices)


def _spec_error(exc: ValueError) -> PermanentError:
    # a spec the wrapper cannot carry (NUL byte, bad variable name) is a service bug
    return PermanentError("internal_error", f"cannot build the job command: {exc}")


class SshHost:
    """A GPU server reached over SSH: exec and SFTP over one pooled connection.

    `start()` never raises for a host that is down: the host stays unavailable and its pool
    keeps trying in the background. Every other method raises `HostUnavailableError` while
    the host is down.
    """

    def __init__(
        self,
        pool: SshPool,
        *,
        remote_root: str,
        kind: str = "ssh",
        nvidia_smi_argv: Sequence[str] = ("nvidia-smi",),
        moqui_command: Sequence[str] | None = None,
        gpu_indices: Sequence[int] | None = None,
        kill_grace_s: float = KILL_GRACE_S,
        max_parallel_files: int = transfer.DEFAULT_PARALLEL_FILES,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self._pool = pool
        self._remote_root = remote_root
        self._kind = kind
        self._nvidia_smi_argv = tuple(nvidia_smi_argv)
        self._moqui_command = tuple(moqui_command) if moqui_command else ("tps_env",)
        self._gpu_indices = tuple(gpu_indices) if gpu_indices is not None else None
        self._kill_grace_s = kill_grace_s
        self._max_parallel_files = max_parallel_files
        self._now = now

    @classmethod
    def from_settings(
        cls, settings: SshHostSettings | SlurmHostSettings, *, limiter: ConnectLimiter
    ) -> SshHost:
        pool = SshPool(SshEndpoint.from_settings(settings), limiter=limiter)
        return cls(
            pool,
            remote_root=settings.remote_root,
            nvidia_smi_argv=shlex.split(settings.nvidia_smi_command),
            moqui_command=settings.moqui_command,
            gpu_indices=settings.gpu_indices,
        )

    # -- identity -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._pool.name

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def leases_gpus(self) -> bool:
        return True

    @property
    def remote_root(self) -> str:
        return self._remote_root

    @property
    def moqui_command(self) -> tuple[str, ...]:
        """The argv prefix that starts MOQUI on this host (the input file is appended)."""
        return self._moqui_command

    @property
    def pool(self) -> SshPool:
        return self._pool

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await self._pool.start()
        if not self._pool.is_connected:
            log.warning("host %s: not reachable at start; its beams wait", self.name)

    async def aclose(self) -> None:
        await self._pool.aclose()

    def is_available(self) -> bool:
        return self._pool.is_connected

    # -- commands -----------------------------------------------------------------------

    async def run(self, argv: Sequence[str], *, timeout_s: float) -> CommandResult:
        try:
            command = jobs.timed_command(argv, timeout_s=timeout_s + _REMOTE_SLACK_S)
        except ValueError as exc:
            raise _spec_error(exc) from exc
        return await self._pool.run(command, timeout_s=timeout_s)

    async def _script(self, script: str, *, timeout_s: float) -> CommandResult:
        command = jobs.timed_command(["/bin/sh", "-c", script], timeout_s=timeout_s + 2)
        return await self._pool.run(command, timeout_s=timeout_s)

    # -- files --------------------------------------------------------------------------

    async def put_tree(
        self, local_dir: Path, remote_dir: str, *, progress: ProgressCallback | None = None
    ) -> TransferReport:
        return await transfer.upload_tree(
            self._pool,
            local_dir,
            remote_dir,
            progress=progress,
            max_parallel=self._max_parallel_files,
        )

    async def get_files(
        self,
        remote_dir: str,
        names: Sequence[str],
        local_dir: Path,
        *,
        progress: ProgressCallback | None = None,
    ) -> TransferReport:
        return await transfer.download_files(
            self._pool,
            remote_dir,
            names,
            local_dir,
            progress=progress,
            max_parallel=self._max_parallel_files,
        )

    async def list_dir(self, remote_dir: str) -> dict[str, int]:
        sizes: dict[str, int] = {}
        try:
            async with asyncio.timeout(SCRIPT_TIMEOUT_S):
                async with self._pool.sftp() as sftp:
                    try:
                        async for entry in sftp.scandir(transfer.sftp_path(remote_dir)):
                            attrs = entry.attrs
                            name = entry.filename
                            if (
                                isinstance(name, str)
                                and attrs.permissions is not None
                                and stat.S_ISREG(attrs.permissions)
                            ):
                                sizes[name] = attrs.size or 0
                    except asyncssh.SFTPNoSuchFile:
                        return {}
                    except asyncssh.SFTPConnectionLost:
                        raise
                    except asyncssh.SFTPError as exc:
                        raise TransientError(
                            "remote_command_failed",
                            f"host {self.name}: cannot list {remote_dir}: {exc.reason}",
                        ) from exc
        except TimeoutError as exc:
            raise TransientError(
                "remote_timeout", f"host {self.name}: listing {remote_dir} timed out"
            ) from exc
        return sizes

    # -- detached jobs ------------------------------------------------------------------

    async def spawn_job(self, spec: JobSpec) -> JobHandle:
        try:
            script = jobs.launch_script(spec)
        except ValueError as exc:
            raise _spec_error(exc) from exc
        result = await self._script(script, timeout_s=jobs.LAUNCH_WAIT_S + SCRIPT_TIMEOUT_S)
        pgid = jobs.parse_launch_output(result.stdout)
        if pgid is None:
            raise TransientError(
                "launch_failed",
                f"host {self.name}: exit {result.exit_status}: {result.stderr.strip()[-500:]}",
            )
        log.info("host %s: job started in %s (pgid %s)", self.name, spec.job_dir, pgid)
        return JobHandle(job_dir=spec.job_dir, job_id=pgid)

    async def attach_job(self, job_dir: str, *, fence: bool = False) -> JobHandle | None:
        """The handle of a job launched earlier in job_dir (after a restart), or None."""
        try:
            script = jobs.attach_script(job_dir, fence=fence)
        except ValueError as exc:
            raise _spec_error(exc) from exc
        result = await self._script(script, timeout_s=SCRIPT_TIMEOUT_S + jobs.LAUNCH_WAIT_S)
        if fence and not result.ok:
            raise TransientError(
                "remote_command_failed",
                f"host {self.name}: could not fence {job_dir}: {result.stderr.strip()[-300:]}",
            )
        pgid = jobs.parse_launch_output(result.stdout)
        return JobHandle(job_dir=job_dir, job_id=pgid) if pgid else None

    async def poll_jobs(self, handles: Sequence[JobHandle]) -> dict[str, JobStatus]:
        dirs = list(dict.fromkeys(h.job_dir for h in handles))
        statuses: dict[str, JobStatus] = {}
        try:
            for part in jobs.chunks(dirs):
                result = await self._script(jobs.poll_script(part), timeout_s=SCRIPT_TIMEOUT_S)
                statuses.update(jobs.parse_poll_output(result.stdout, part))
        except ValueError as exc:
            raise _spec_error(exc) from exc
        return statuses

    async def kill_job(self, handle: JobHandle) -> None:
        try:
            script = jobs.kill_script(handle.job_dir, handle.job_id, grace_s=self._kill_grace_s)
        except ValueError as exc:
            raise _spec_error(exc) from exc
        result = await self._script(script, timeout_s=jobs.kill_timeout_s(self._kill_grace_s))
        if not result.ok:
            raise TransientError(
                "remote_command_failed",
                f"host {self.name}: kill of {handle.job_dir} exited {result.exit_status}: "
                f"{result.stderr.strip()[-500:]}",
            )
        log.info("host %s: job in %s stopped (pgid %s)", self.name, handle.job_dir, handle.job_id)

    # -- GPUs ---------------------------------------------------------------------------

    async def queue_summary(self) -> None:
        """A GPU server has no batch queue; its GPUs are sampled instead."""
        return None

    async def sample_gpus(self) -> GpuSample:
        script = gpu_query_script(self._nvidia_smi_argv, timeout_s=GPU_QUERY_TIMEOUT_S)
        taken_at = self._now()
        result = await self._script(script, timeout_s=2 * GPU_QUERY_TIMEOUT_S + 10)
        return gpu_sample_from_output(self.name, taken_at, result, self._gpu_indices)
