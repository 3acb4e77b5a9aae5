"""SimulatedHost: an in-process SSH server on 127.0.0.1 whose shell runs the bundled simulators."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import posixpath
import shlex
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import asyncssh

from mqi_async.config import SimulatedHostSettings
from mqi_async.domain.errors import HostUnavailableError
from mqi_async.domain.gpus import GpuSample
from mqi_async.domain.jobs import (
    CommandResult,
    JobHandle,
    JobSpec,
    JobStatus,
    ProgressCallback,
    TransferReport,
)
from mqi_async.hpc.ssh import ConnectLimiter, SshEndpoint, SshPool
from mqi_async.hpc.ssh_host import KILL_GRACE_S, SshHost

log = logging.getLogger(__name__)

#: the bundled MOQUI and nvidia-smi simulators (mqi_async/demo/bin)
DEMO_BIN = Path(__file__).resolve().parent.parent / "demo" / "bin"
_HANDLER_WAIT_S = 5.0


class _RootedSFTPServer(asyncssh.SFTPServer):
    """SFTP limited to one directory, but with the same absolute paths the shell sees.

    A plain asyncssh chroot would show the root as `/`, so paths built for exec commands
    would not match SFTP paths; here a path is used as it is when it lies under the root,
    relative paths start at the root, and anything else is refused.
    """

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], *, root: bytes) -> None:
        super().__init__(chan)
        self._root = root

    def map_path(self, path: bytes) -> bytes:
        full = posixpath.normpath(posixpath.join(self._root, path))
        if full != self._root and not full.startswith(self._root.rstrip(b"/") + b"/"):
            raise asyncssh.SFTPPermissionDenied("outside the simulated host's directory")
        return full

    def reverse_map_path(self, path: bytes) -> bytes:
        return path


class _ServerConnections(asyncssh.SSHServer):
    """Tracks open connections so the server can close them (asyncssh leaves them open)."""

    def __init__(self, live: set[asyncssh.SSHServerConnection]) -> None:
        self._live = live
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._live.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._live.discard(self._conn)


class LocalSshServer:
    """An asyncssh server on loopback: exec runs in a real local shell, SFTP under `root`.

    Like OpenSSH with default settings it drops environment variables sent by clients; the
    variables in `env` are set for every command instead.
    """

    def __init__(
        self,
        *,
        root: Path,
        host_key: asyncssh.SSHKey,
        client_public_key: str,
        env: Mapping[str, str] | None = None,
        address: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._root = root.resolve()
        self._host_key = host_key
        self._client_public_key = client_public_key
        self._env = dict(env or {})
        self._address = address
        self._port = port
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._handlers: set[asyncio.Task[object]] = set()

    @property
    def port(self) -> int:
        if self._acceptor is None:
            raise RuntimeError("the server is not started")
        return self._acceptor.get_port()

    def known_hosts_line(self) -> str:
        key = self._host_key.export_public_key("openssh").decode().strip()
        return f"[{self._address}]:{self.port} {key}"

    async def start(self) -> None:
        root = os.fsencode(self._root)
        self._acceptor = await asyncssh.listen(
            self._address,
            self._port,
            server_host_keys=[self._host_key],
            authorized_client_keys=asyncssh.import_authorized_keys(self._client_public_key),
            server_factory=lambda: _ServerConnections(self._connections),
            process_factory=self._handle,
            sftp_factory=functools.partial(_RootedSFTPServer, root=root),
            encoding=None,
            allow_scp=False,
            keepalive_interval=30,
        )

    async def aclose(self) -> None:
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.close()
            await acceptor.wait_closed()
        for conn in list(self._connections):
            conn.close()
        handlers = list(self._handlers)
        if handlers:
            _done, pending = await asyncio.wait(handlers, timeout=_HANDLER_WAIT_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=_HANDLER_WAIT_S)

    async def _handle(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await self._run(process)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _run(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        command = process.command
        if not command:
            process.stderr.write(b"this server runs commands only, no shells\n")
            process.exit(1)
            await process.wait_closed()
            return
        proc = await asyncio.create_subprocess_shell(
            command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **self._env},
            cwd=self._root,
            start_new_session=True,
        )
        assert proc.stdout is not None and proc.stderr is not None

        async def watch_channel() -> None:
            # the client went away: its command goes too, as when sshd closes the pipes
            await process.channel.wait_closed()
            _kill_group(proc)

        watcher = asyncio.ensure_future(watch_channel())
        try:
            await process.redirect(stdin=proc.stdin)
            # stdout and stderr are copied by hand: asyncssh's redirect sends EOF on the
            # channel when stdout ends, and stderr written after that is lost with an error
            sent = await asyncio.gather(
                _pump(proc.stdout, process.stdout), _pump(proc.stderr, process.stderr)
            )
            rc = await proc.wait()
            if all(sent):
                process.exit(rc if rc >= 0 else 128 - rc)
        finally:
            watcher.cancel()
            if proc.returncode is None:
                _kill_group(proc)
                await proc.wait()
        await process.wait_closed()


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _pump(source: asyncio.StreamReader, target: asyncssh.SSHWriter[bytes]) -> bool:
    """Copy until EOF; False when the channel closed first (the rest is read and dropped)."""
    is_open = True
    while data := await source.read(65536):
        if not is_open:
            continue
        try:
            target.write(data)
            await target.drain()
        except (BrokenPipeError, ConnectionError, asyncssh.Error):
            is_open = False
    return is_open


def _argv(value: str, default: Sequence[str]) -> list[str]:
    return list(default) if value == "nvidia-smi" else shlex.split(value)


class SimulatedHost:
    """The embedded default GPU host: real SSH and SFTP to an in-process server.

    Its shell runs the bundled simulators of MOQUI (`tps_env`) and `nvidia-smi`, which read
    MQI_SIM_GPUS, MQI_SIM_GPU_MEMORY_MB, MQI_SIM_RUN_SECONDS and MQI_SIM_STATE_DIR.
    Everything lives under work_dir: `runs/` is the remote root, `state/` the simulator's.
    """

    def __init__(
        self,
        settings: SimulatedHostSettings,
        *,
        work_dir: Path,
        limiter: ConnectLimiter | None = None,
        kill_grace_s: float = KILL_GRACE_S,
    ) -> None:
        self._settings = settings
        self._work_dir = work_dir.expanduser().absolute()
        self._limiter = limiter or ConnectLimiter(min_interval_s=0.0)
        self._kill_grace_s = kill_grace_s
        self._server: LocalSshServer | None = None
        self._host: SshHost | None = None
        python = sys.executable
        moqui = settings.moqui_command
        if isinstance(moqui, str):
            moqui = [moqui]
        self._moqui_command = tuple(moqui or [python, str(DEMO_BIN / "tps_env")])
        self._nvidia_smi_argv = tuple(
            _argv(settings.nvidia_smi_command, [python, str(DEMO_BIN / "nvidia-smi")])
        )

    @property
    def name(self) -> str:
        return self._settings.name

    @property
    def kind(self) -> str:
        return "simulated"

    @property
    def leases_gpus(self) -> bool:
        return True

    @property
    def remote_root(self) -> str:
        return str(self._work_dir / "runs")

    @property
    def state_dir(self) -> Path:
        return self._work_dir / "state"

    @property
    def moqui_command(self) -> tuple[str, ...]:
        return self._moqui_command

    @property
    def ssh_host(self) -> SshHost:
        """The SshHost that talks to the simulated server (once started)."""
        if self._host is None:
            raise HostUnavailableError(
                self.name, "host_unreachable", "the simulator is not started"
            )
        return self._host

    def simulator_env(self) -> dict[str, str]:
        s = self._settings
        return {
            "MQI_SIM_GPUS": str(s.gpus),
            "MQI_SIM_GPU_MEMORY_MB": str(s.gpu_memory_mb),
            "MQI_SIM_RUN_SECONDS": str(s.run_seconds),
            "MQI_SIM_STATE_DIR": str(self.state_dir),
        }

    async def start(self) -> None:
        await asyncio.to_thread(self._prepare_dirs)
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        client_key = asyncssh.generate_private_key("ssh-ed25519")
        server = LocalSshServer(
            root=self._work_dir,
            host_key=host_key,
            client_public_key=client_key.export_public_key("openssh").decode(),
            env=self.simulator_env(),
        )
        await server.start()
        self._server = server
        endpoint = SshEndpoint(
            name=self.name,
            address="127.0.0.1",
            port=server.port,
            client_keys=(client_key,),
            known_hosts=asyncssh.import_known_hosts(server.known_hosts_line()),
            connect_timeout_s=10.0,
            keepalive_s=30.0,
        )
        pool = SshPool(endpoint, limiter=self._limiter, backoff_initial_s=0.2, backoff_max_s=5.0)
        self._host = SshHost(
            pool,
            remote_root=self.remote_root,
            kind="simulated",
            nvidia_smi_argv=self._nvidia_smi_argv,
            moqui_command=self._moqui_command,
            gpu_indices=self._settings.gpu_indices,
            kill_grace_s=self._kill_grace_s,
        )
        await self._host.start()
        log.info("simulated host %s: SSH server on 127.0.0.1:%d", self.name, server.port)

    def _prepare_dirs(self) -> None:
        for d in (self._work_dir, self._work_dir / "runs", self.state_dir):
            d.mkdir(parents=True, exist_ok=True)

    async def aclose(self) -> None:
        host, self._host = self._host, None
        if host is not None:
            await host.aclose()
        server, self._server = self._server, None
        if server is not None:
            await server.aclose()

    def is_available(self) -> bool:
        return self._host is not None and self._host.is_available()

    async def run(self, argv: Sequence[str], *, timeout_s: float) -> CommandResult:
        return await self.ssh_host.run(argv, timeout_s=timeout_s)

    async def put_tree(
        self, local_dir: Path, remote_dir: str, *, progress: ProgressCallback | None = None
    ) -> TransferReport:
        return await self.ssh_host.put_tree(local_dir, remote_dir, progress=progress)

    async def get_files(
        self,
        remote_dir: str,
        names: Sequence[str],
        local_dir: Path,
        *,
        progress: ProgressCallback | None = None,
    ) -> TransferReport:
        return await self.ssh_host.get_files(remote_dir, names, local_dir, progress=progress)

    async def list_dir(self, remote_dir: str) -> dict[str, int]:
        return await self.ssh_host.list_dir(remote_dir)

    async def spawn_job(self, spec: JobSpec) -> JobHandle:
        return await self.ssh_host.spawn_job(spec)

    async def attach_job(self, job_dir: str, *, fence: bool = False) -> JobHandle | None:
        return await self.ssh_host.attach_job(job_dir, fence=fence)

    async def poll_jobs(self, handles: Sequence[JobHandle]) -> dict[str, JobStatus]:
        return await self.ssh_host.poll_jobs(handles)

    async def kill_job(self, handle: JobHandle) -> None:
        await self.ssh_host.kill_job(handle)

    async def queue_summary(self) -> None:
        """A GPU server has no batch queue; its GPUs are sampled instead."""
        return None

    async def sample_gpus(self) -> GpuSample:
        return await self.ssh_host.sample_gpus()
