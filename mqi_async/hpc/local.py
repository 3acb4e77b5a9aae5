"""LocalHost: the Host protocol on this machine (subprocesses, verified file copies)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shlex
import signal
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from mqi_async.config import LocalHostSettings
from mqi_async.domain.errors import PermanentError, TransientError
from mqi_async.domain.gpus import GpuSample, gpu_query_script
from mqi_async.domain.jobs import (
    CommandResult,
    JobHandle,
    JobSpec,
    JobStatus,
    ProgressCallback,
    TransferReport,
)
from mqi_async.hpc import jobs
from mqi_async.hpc.ssh_host import (
    GPU_QUERY_TIMEOUT_S,
    KILL_GRACE_S,
    SCRIPT_TIMEOUT_S,
    gpu_sample_from_output,
    utc_now,
)
from mqi_async.hpc.transfer import (
    DEFAULT_PARALLEL_FILES,
    PART_SUFFIX,
    check_relative,
    first_error,
    sha256_file,
    transfer_timeout_s,
)

log = logging.getLogger(__name__)

#: bytes copied per thread hop, so progress moves and cancellation is prompt
_CHUNK_BYTES = 8 * 2**20
_KILL_WAIT_S = 5.0


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _open_pair(source: Path, part: Path) -> tuple[BinaryIO, BinaryIO]:
    part.parent.mkdir(parents=True, exist_ok=True)
    src = source.open("rb")
    try:
        return src, part.open("wb")
    except BaseException:
        src.close()
        raise


def _copy_chunk(src: BinaryIO, dst: BinaryIO, update: Callable[[bytes], object]) -> int:
    """One chunk from src to dst, hashed on the way; blocking."""
    data = src.read(_CHUNK_BYTES)
    if data:
        update(data)
        dst.write(data)
    return len(data)


def _finish(dst: BinaryIO) -> None:
    dst.flush()
    os.fsync(dst.fileno())


def _close(*files: BinaryIO) -> None:
    for f in files:
        f.close()


def _state(path: Path) -> tuple[int, str] | None:
    try:
        if not path.is_file():
            return None
        return path.stat().st_size, sha256_file(path)
    except FileNotFoundError:
        return None


def _scan(local_dir: Path) -> list[str]:
    if not local_dir.is_dir():
        raise FileNotFoundError(f"{local_dir} is not a directory")
    rels: list[str] = []
    for root, dirs, files in os.walk(local_dir):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            if path.is_file() and not name.endswith(PART_SUFFIX):
                rels.append(path.relative_to(local_dir).as_posix())
    return rels


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.debug("could not remove %s: %s", path, exc)


def _sizes(source: Path, target: Path) -> tuple[int, int | None]:
    """(source size, target size or None); blocking."""
    size = source.stat().st_size
    try:
        return size, target.stat().st_size if target.is_file() else None
    except FileNotFoundError:
        return size, None


async def copy_verified(
    source: Path, target: Path, *, on_bytes: Callable[[int], None] | None = None
) -> tuple[bool, int, str]:
    """Copy source to target via `target.part`, verified by SHA-256, then renamed.

    Returns (copied, size, sha256); copied is False when target already had the content.

    Raises:
        TransientError: `disk_full` on ENOSPC, `transfer_failed` or
            `transfer_verify_failed` otherwise.
    """
    try:
        size, target_size = await asyncio.to_thread(_sizes, source, target)
        if target_size == size:
            # only a target of the right size can already be the same file
            before = await asyncio.to_thread(_state, source)
            if before is not None and await asyncio.to_thread(_state, target) == before:
                if on_bytes is not None:
                    on_bytes(size)
                return False, size, before[1]
    except OSError as exc:
        raise TransientError("transfer_failed", f"cannot read {source}: {exc}") from exc
    part = target.with_name(target.name + PART_SUFFIX)
    hasher = hashlib.sha256()
    renamed = False
    try:
        async with asyncio.timeout(transfer_timeout_s(size)):
            src, dst = await asyncio.to_thread(_open_pair, source, part)
            try:
                while n := await asyncio.to_thread(_copy_chunk, src, dst, hasher.update):
                    if on_bytes is not None:
                        on_bytes(n)
                await asyncio.to_thread(_finish, dst)
            finally:
                await asyncio.shield(asyncio.to_thread(_close, src, dst))
        # the source was hashed as it was read; the part is read back from the disk
        digest = hasher.hexdigest()
        written = await asyncio.to_thread(_state, part)
        if written is None or written[1] != digest:
            raise TransientError(
                "transfer_verify_failed",
                f"{target} was written as {written}, expected sha256 {digest}",
            )
        await asyncio.to_thread(os.replace, part, target)
        renamed = True
    except TimeoutError as exc:
        raise TransientError("transfer_failed", f"copying {source} timed out") from exc
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TransientError("disk_full", f"no space left writing {target}") from exc
        raise TransientError("transfer_failed", f"copying {source}: {exc}") from exc
    finally:
        if not renamed:
            await asyncio.shield(asyncio.to_thread(_unlink_quietly, part))
    return True, written[0], digest


class LocalHost:
    """This machine as a GPU host: the same scripts as over SSH, run with /bin/sh here."""

    def __init__(
        self,
        *,
        name: str,
        remote_root: Path,
        nvidia_smi_argv: Sequence[str] = ("nvidia-smi",),
        moqui_command: Sequence[str] | None = None,
        gpu_indices: Sequence[int] | None = None,
        kill_grace_s: float = KILL_GRACE_S,
        max_parallel_files: int = DEFAULT_PARALLEL_FILES,
        now: Callable[[], datetime] = utc_now,
    ) -> None:
        self._name = name
        self._root = remote_root.expanduser().absolute()
        self._nvidia_smi_argv = tuple(nvidia_smi_argv)
        self._moqui_command = tuple(moqui_command) if moqui_command else ("tps_env",)
        self._gpu_indices = tuple(gpu_indices) if gpu_indices is not None else None
        self._kill_grace_s = kill_grace_s
        self._max_parallel_files = max_parallel_files
        self._now = now
        self._started = False

    @classmethod
    def from_settings(cls, settings: LocalHostSettings) -> LocalHost:
        return cls(
            name=settings.name,
            remote_root=settings.remote_root,
            nvidia_smi_argv=shlex.split(settings.nvidia_smi_command),
            moqui_command=settings.moqui_command,
            gpu_indices=settings.gpu_indices,
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> str:
        return "local"

    @property
    def leases_gpus(self) -> bool:
        return True

    @property
    def remote_root(self) -> str:
        return str(self._root)

    @property
    def moqui_command(self) -> tuple[str, ...]:
        return self._moqui_command

    async def start(self) -> None:
        try:
            await asyncio.to_thread(self._root.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            log.error("host %s: cannot create %s: %s", self.name, self._root, exc)
            return
        self._started = True

    async def aclose(self) -> None:
        self._started = False

    def is_available(self) -> bool:
        return self._started

    # -- commands -----------------------------------------------------------------------

    async def run(self, argv: Sequence[str], *, timeout_s: float) -> CommandResult:
        """Run argv here in its own process group; the whole group dies on timeout or cancel.

        Raises:
            TransientError: `remote_timeout` when it did not finish in time.
        """
        if not argv:
            raise PermanentError("internal_error", "empty argv")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except (FileNotFoundError, PermissionError) as exc:
            # what a shell would say, so ssh and local hosts report alike
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            return CommandResult(exit_status=code, stdout="", stderr=f"{argv[0]}: {exc}")
        except ValueError as exc:
            raise PermanentError("internal_error", f"bad argv: {exc}") from exc
        try:
            async with asyncio.timeout(timeout_s):
                out, err = await proc.communicate()
        except TimeoutError as exc:
            raise TransientError(
                "remote_timeout", f"host {self.name}: {argv[0]} did not finish in {timeout_s:g} s"
            ) from exc
        finally:
            if proc.returncode is None:
                await self._kill_group(proc)
        rc = proc.returncode if proc.returncode is not None else -int(signal.SIGKILL)
        # like a shell: a signal N reads as 128+N
        status = rc if rc >= 0 else 128 - rc
        return CommandResult(exit_status=status, stdout=_text(out), stderr=_text(err))

    async def _kill_group(self, proc: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_KILL_WAIT_S):
                await asyncio.shield(proc.wait())

    async def _script(self, script: str, *, timeout_s: float) -> CommandResult:
        return await self.run(["/bin/sh", "-c", script], timeout_s=timeout_s)

    # -- files --------------------------------------------------------------------------

    async def _copy_many(
        self,
        pairs: Sequence[tuple[str, Path, Path]],
        progress: ProgressCallback | None,
    ) -> TransferReport:
        try:
            sizes = await asyncio.to_thread(lambda: [src.stat().st_size for _, src, _ in pairs])
        except OSError as exc:
            raise TransientError("transfer_failed", f"cannot read a source file: {exc}") from exc
        total = sum(sizes)
        done = 0

        def on_bytes(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        slots = asyncio.Semaphore(max(1, self._max_parallel_files))
        results: dict[str, tuple[bool, int, str]] = {}

        async def one(rel: str, src: Path, dst: Path) -> None:
            async with slots:
                results[rel] = await copy_verified(src, dst, on_bytes=on_bytes)

        try:
            async with asyncio.TaskGroup() as tg:
                for rel, src, dst in pairs:
                    tg.create_task(one(rel, src, dst))
        except BaseExceptionGroup as group:
            raise first_error(group) from group
        sent = [r for r in results.values() if r[0]]
        return TransferReport(
            files_sent=len(sent),
            files_skipped=len(results) - len(sent),
            bytes_sent=sum(r[1] for r in sent),
            sha256={rel: r[2] for rel, r in results.items()},
        )

    async def put_tree(
        self, local_dir: Path, remote_dir: str, *, progress: ProgressCallback | None = None
    ) -> TransferReport:
        try:
            rels = await asyncio.to_thread(_scan, local_dir)
        except OSError as exc:
            raise TransientError("transfer_failed", f"cannot read {local_dir}: {exc}") from exc
        target = Path(remote_dir)
        try:
            await asyncio.to_thread(target.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            raise TransientError("transfer_failed", f"cannot create {target}: {exc}") from exc
        return await self._copy_many([(r, local_dir / r, target / r) for r in rels], progress)

    async def get_files(
        self,
        remote_dir: str,
        names: Sequence[str],
        local_dir: Path,
        *,
        progress: ProgressCallback | None = None,
    ) -> TransferReport:
        for name in names:
            check_relative(name)
        source = Path(remote_dir)
        unique = list(dict.fromkeys(names))
        missing = await asyncio.to_thread(lambda: [n for n in unique if not (source / n).is_file()])
        if missing:
            raise TransientError(
                "transfer_failed", f"missing in {remote_dir}: {', '.join(missing[:5])}"
            )
        return await self._copy_many([(n, source / n, local_dir / n) for n in unique], progress)

    async def list_dir(self, remote_dir: str) -> dict[str, int]:
        def scan() -> dict[str, int]:
            try:
                with os.scandir(remote_dir) as entries:
                    return {
                        e.name: e.stat().st_size
                        for e in entries
                        if e.is_file(follow_symlinks=False)
                    }
            except (FileNotFoundError, NotADirectoryError):
                return {}

        return await asyncio.to_thread(scan)

    # -- detached jobs ------------------------------------------------------------------

    async def spawn_job(self, spec: JobSpec) -> JobHandle:
        try:
            script = jobs.launch_script(spec)
        except ValueError as exc:
            raise PermanentError("internal_error", f"cannot build the job command: {exc}") from exc
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
        result = await self._script(
            jobs.attach_script(job_dir, fence=fence),
            timeout_s=SCRIPT_TIMEOUT_S + jobs.LAUNCH_WAIT_S,
        )
        pgid = jobs.parse_launch_output(result.stdout)
        return JobHandle(job_dir=job_dir, job_id=pgid) if pgid else None

    async def poll_jobs(self, handles: Sequence[JobHandle]) -> dict[str, JobStatus]:
        dirs = list(dict.fromkeys(h.job_dir for h in handles))
        statuses: dict[str, JobStatus] = {}
        for part in jobs.chunks(dirs):
            result = await self._script(jobs.poll_script(part), timeout_s=SCRIPT_TIMEOUT_S)
            statuses.update(jobs.parse_poll_output(result.stdout, part))
        return statuses

    async def kill_job(self, handle: JobHandle) -> None:
        try:
            script = jobs.kill_script(handle.job_dir, handle.job_id, grace_s=self._kill_grace_s)
        except ValueError as exc:
            raise PermanentError("internal_error", str(exc)) from exc
        result = await self._script(script, timeout_s=jobs.kill_timeout_s(self._kill_grace_s))
        if not result.ok:
            raise TransientError(
                "remote_command_failed",
                f"host {self.name}: kill of {handle.job_dir} exited {result.exit_status}",
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
