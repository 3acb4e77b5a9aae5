"""SshPool: one long-lived, self-healing asyncssh connection per host, with bounded channels."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import asyncssh

from mqi_async.config import SlurmHostSettings, SshHostSettings
from mqi_async.domain.errors import HostUnavailableError, TransientError
from mqi_async.domain.jobs import CommandResult

log = logging.getLogger(__name__)

#: AES-GCM first: asyncssh runs it on AES-NI, 1.5-2x faster than chacha20 (platform.md §4)
ENCRYPTION_ALGS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)
#: OpenSSH's sftp-server drops the session on writes above 255 KiB (platform.md §4)
SFTP_MAX_BLOCK_SIZE = 261_120
#: the known_hosts value that switches host key checks off
IGNORE_HOST_KEYS = "ignore"
#: bounded wait for a channel or connection to finish closing
_CLOSE_WAIT_S = 5.0
#: longest wait for the server to close an abandoned session (its remote `timeout` fires first)
_REAP_WAIT_S = 120.0
#: a connection that dies sooner than this counts as a failed attempt (no reconnect storms)
_STABLE_AFTER_S = 30.0
#: consecutive channel-open refusals after which the connection is recycled
_MAX_OPEN_FAILURES = 3


class Secret(Protocol):
    """A secret that only says its value when asked (pydantic's SecretStr is one)."""

    def get_secret_value(self) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SshEndpoint:
    """Where and how to connect to one host; secrets stay in SecretStr and out of repr."""

    name: str
    address: str
    port: int = 22
    username: str | None = None
    #: key files or in-memory keys; None = asyncssh's defaults (~/.ssh keys, agent, ssh config)
    client_keys: tuple[str | asyncssh.SSHKey, ...] | None = None
    passphrase: Secret | None = field(default=None, repr=False)
    password: Secret | None = field(default=None, repr=False)
    #: a known_hosts path, "ignore", or an in-memory SSHKnownHosts (the simulated host)
    known_hosts: str | asyncssh.SSHKnownHosts = "~/.ssh/known_hosts"
    #: channels used at once: exec channels get all but one, which the SFTP session keeps
    max_sessions: int = 8
    connect_timeout_s: float = 15.0
    keepalive_s: float = 15.0
    command_timeout_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: SshHostSettings | SlurmHostSettings) -> SshEndpoint:
        keys = None
        if settings.client_keys is not None:
            keys = tuple(str(Path(k).expanduser()) for k in settings.client_keys)
        return cls(
            name=settings.name,
            address=settings.address,
            port=settings.port,
            username=settings.username,
            client_keys=keys,
            passphrase=settings.passphrase,
            password=settings.password,
            known_hosts=settings.known_hosts or "~/.ssh/known_hosts",
            max_sessions=settings.max_sessions,
            connect_timeout_s=settings.connect_timeout_seconds,
            keepalive_s=settings.keepalive_seconds,
            command_timeout_s=settings.command_timeout_seconds,
        )


class ConnectLimiter:
    """Paces new SSH connections across all hosts (sshd MaxStartups, fail2ban, HPC bans).

    One object is built by the composition root and handed to every pool.
    """

    def __init__(self, *, min_interval_s: float = 0.5, max_concurrent: int = 2) -> None:
        self._min_interval_s = min_interval_s
        self._slots = asyncio.Semaphore(max_concurrent)
        self._lock = asyncio.Lock()
        self._next_at = 0.0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold this while opening one connection."""
        async with self._slots:
            async with self._lock:
                wait_s = self._next_at - time.monotonic()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                self._next_at = time.monotonic() + self._min_interval_s
            yield


class _Client(asyncssh.SSHClient):
    """Tells the pool the moment its connection goes away."""

    def __init__(self, pool: SshPool) -> None:
        self._pool = pool
        self._conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conn = conn

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._pool._on_connection_lost(self._conn, exc)


def _signal_number(name: str) -> int:
    try:
        return int(signal.Signals["SIG" + name.removeprefix("SIG")])
    except KeyError:
        return 0


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


class SshPool:
    """One connection to one host, reconnected in the background with backoff and jitter.

    Every call has a deadline; while the host is down callers get `HostUnavailableError` at
    once (never a hang). Exec channels are capped below the server's MaxSessions and one
    SFTP session is shared by all transfers.
    """

    def __init__(
        self,
        endpoint: SshEndpoint,
        *,
        limiter: ConnectLimiter,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.endpoint = endpoint
        self._limiter = limiter
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._rng = rng or random.Random()
        self._channels = asyncio.Semaphore(max(1, endpoint.max_sessions - 1))
        self._connect_lock = asyncio.Lock()
        self._sftp_lock = asyncio.Lock()
        self._lost = asyncio.Event()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._connected_at = 0.0
        self._sftp: asyncssh.SFTPClient | None = None
        self._failures = 0
        self._open_failures = 0
        self._retry_at = 0.0
        self._last_error: HostUnavailableError | None = None
        self._last_reason = ""
        self._closed = False
        self._supervisor: asyncio.Task[None] | None = None
        #: closers of abandoned channels; owned here, cancelled by aclose
        self._reapers: set[asyncio.Task[None]] = set()
        if endpoint.known_hosts == IGNORE_HOST_KEYS:
            log.warning(
                "HOST KEY CHECKING IS OFF for host %s (known_hosts: ignore): "
                "anyone able to intercept %s:%d can impersonate it",
                endpoint.name,
                endpoint.address,
                endpoint.port,
            )

    @property
    def name(self) -> str:
        return self.endpoint.name

    @property
    def is_connected(self) -> bool:
        return self._conn is not None

    @property
    def last_error(self) -> HostUnavailableError | None:
        """Why the last connection attempt failed (None after a success)."""
        return self._last_error

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Try to connect once, then keep the connection up in the background.

        A failed first attempt is logged, not raised: the host stays unavailable and the
        background task retries with backoff.
        """
        if self._supervisor is None and not self._closed:
            with contextlib.suppress(HostUnavailableError):
                await self.connect()
            self._supervisor = asyncio.create_task(self._supervise(), name=f"ssh-pool-{self.name}")

    async def aclose(self) -> None:
        """Stop reconnecting and close the connection (bounded)."""
        self._closed = True
        tasks = [t for t in (self._supervisor, *self._reapers) if t is not None]
        self._supervisor = None
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        conn, self._conn = self._conn, None
        self._sftp = None
        if conn is not None:
            await self._close_connection(conn)

    async def connect(self) -> None:
        """Connect now unless connected; raises HostUnavailableError (also during backoff)."""
        await self._connection()

    async def run(
        self, command: str, *, timeout_s: float | None = None, stdin: bytes | None = None
    ) -> CommandResult:
        """Run one command line (already quoted) and collect its output.

        Raises:
            HostUnavailableError: not connected, or the connection broke.
            TransientError: `remote_timeout` when it did not finish in time,
                `remote_command_failed` when no channel could be opened.
        """
        limit_s = timeout_s if timeout_s is not None else self.endpoint.command_timeout_s
        conn = await self._connection()
        try:
            async with asyncio.timeout(limit_s):
                await self._channels.acquire()
                with self._translate(conn):
                    return await self._exec(conn, command, stdin)
        except TimeoutError as exc:
            raise TransientError(
                "remote_timeout", f"host {self.name}: a command did not finish in {limit_s:g} s"
            ) from exc

    @contextlib.asynccontextmanager
    async def sftp(self) -> AsyncIterator[asyncssh.SFTPClient]:
        """The shared SFTP session; errors inside are translated like those of `run`."""
        conn = await self._connection()
        with self._translate(conn):
            client = await self._sftp_client(conn)
            try:
                yield client
            except asyncssh.SFTPConnectionLost:
                if self._sftp is client:
                    self._sftp = None
                raise

    # -- connection lifecycle -------------------------------------------------------------

    async def _connection(self) -> asyncssh.SSHClientConnection:
        conn = self._conn
        if conn is not None:
            return conn
        if self._closed:
            raise HostUnavailableError(self.name, "host_unreachable", "the pool is closed")
        async with self._connect_lock:
            if self._conn is not None:
                return self._conn
            err = self._last_error
            if err is not None and time.monotonic() < self._retry_at:
                # a fresh exception per caller; the stored one keeps its first traceback
                raise HostUnavailableError(self.name, err.code, self._last_reason)
            return await self._open()

    async def _open(self) -> asyncssh.SSHClientConnection:
        ep = self.endpoint
        try:
            async with self._limiter.slot():
                async with asyncio.timeout(ep.connect_timeout_s + 1):
                    conn = await asyncssh.connect(
                        ep.address,
                        ep.port,
                        client_factory=lambda: _Client(self),
                        **self._options(),
                    )
        except HostUnavailableError as exc:
            self._fail(exc)
            raise
        except asyncssh.HostKeyNotVerifiable as exc:
            raise self._fail(self._error("host_key_mismatch", exc)) from exc
        except asyncssh.KeyExchangeFailed as exc:
            # no algorithm in common: not a wrong key, and no reason to distrust the server
            raise self._fail(self._error("ssh_negotiation_failed", exc)) from exc
        except (
            asyncssh.PermissionDenied,
            asyncssh.KeyImportError,
            asyncssh.KeyEncryptionError,
        ) as exc:
            raise self._fail(self._error("auth_failed", exc)) from exc
        except (TimeoutError, OSError, asyncssh.Error) as exc:
            raise self._fail(self._error("host_unreachable", exc)) from exc
        except Exception as exc:
            # asyncssh raises plain ValueError/TypeError for unusable options; the host is
            # then as good as unreachable, and the traceback helps whoever fixes the config
            log.exception("ssh host %s: unexpected error while connecting", self.name)
            raise self._fail(self._error("host_unreachable", exc)) from exc
        self._conn = conn
        self._connected_at = time.monotonic()
        self._last_error = None
        self._open_failures = 0
        self._lost.clear()
        log.info("ssh host %s: connected to %s:%d", self.name, ep.address, ep.port)
        return conn

    def _options(self) -> dict[str, object]:
        ep = self.endpoint
        options: dict[str, object] = {
            "connect_timeout": ep.connect_timeout_s,
            "login_timeout": ep.connect_timeout_s,
            "keepalive_interval": ep.keepalive_s,
            "keepalive_count_max": 3,
            "encryption_algs": list(ENCRYPTION_ALGS),
        }
        if ep.username:
            options["username"] = ep.username
        if ep.client_keys is not None:
            for key in ep.client_keys:
                if isinstance(key, str) and not Path(key).expanduser().is_file():
                    raise HostUnavailableError(
                        self.name, "auth_failed", f"client key {key} does not exist"
                    )
            options["client_keys"] = list(ep.client_keys)
        if ep.passphrase is not None:
            options["passphrase"] = ep.passphrase.get_secret_value()
        if ep.password is not None:
            options["password"] = ep.password.get_secret_value()
        if isinstance(ep.known_hosts, asyncssh.SSHKnownHosts):
            options["known_hosts"] = ep.known_hosts
        elif ep.known_hosts == IGNORE_HOST_KEYS:
            log.warning("ssh host %s: connecting WITHOUT host key verification", self.name)
            options["known_hosts"] = None
        else:
            path = Path(ep.known_hosts).expanduser()
            if not path.is_file():
                raise HostUnavailableError(
                    self.name, "host_key_mismatch", f"known_hosts file {path} does not exist"
                )
            options["known_hosts"] = str(path)
        return options

    def _error(self, code: str, exc: BaseException) -> HostUnavailableError:
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            reason = f"the server's host key is not the one in known_hosts ({reason})"
        return HostUnavailableError(self.name, code, reason)

    def _fail(self, err: HostUnavailableError) -> HostUnavailableError:
        """Record a failed attempt and schedule the next one; returns err for raising."""
        self._failures += 1
        if err.code == "host_unreachable":
            base_s = self._backoff_initial_s * 2 ** min(self._failures - 1, 30)
        else:
            # a wrong key or a refused login will not fix itself quickly; retrying fast
            # only trips intrusion detection on the server
            base_s = self._backoff_max_s
        delay_s = min(self._backoff_max_s, base_s) * (0.5 + 0.5 * self._rng.random())
        self._retry_at = time.monotonic() + delay_s
        self._last_error = err
        self._last_reason = err.detail.removeprefix(f"host {self.name}: ")
        log.warning("ssh host %s: %s; next attempt in %.1f s", self.name, err, delay_s)
        return err

    def _on_connection_lost(
        self, conn: asyncssh.SSHClientConnection, exc: Exception | None
    ) -> None:
        if self._conn is not conn:
            return
        self._conn = None
        self._sftp = None
        if self._closed:
            return
        lived_s = time.monotonic() - self._connected_at
        detail = f"connection lost after {lived_s:.1f} s" + (f": {exc}" if exc else "")
        err = HostUnavailableError(self.name, "host_unreachable", detail)
        if lived_s >= _STABLE_AFTER_S:
            # a long-lived connection is replaced at once; the backoff is for flapping ones
            self._failures = 0
            self._retry_at = time.monotonic()
            self._last_error = err
            self._last_reason = detail
            log.warning("ssh host %s: %s; reconnecting", self.name, detail)
        else:
            self._fail(err)
        self._lost.set()

    def _drop(self, conn: asyncssh.SSHClientConnection, why: str) -> None:
        """Forget a connection that misbehaves, so the next call starts a fresh one."""
        if self._conn is conn:
            log.warning("ssh host %s: dropping the connection: %s", self.name, why)
            self._on_connection_lost(conn, None)
            conn.abort()

    async def _supervise(self) -> None:
        while not self._closed:
            if self._conn is not None:
                await self._lost.wait()
                self._lost.clear()
                continue
            wait_s = self._retry_at - time.monotonic()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            with contextlib.suppress(HostUnavailableError):
                await self._connection()

    async def _close_connection(self, conn: asyncssh.SSHClientConnection) -> None:
        conn.close()
        try:
            async with asyncio.timeout(_CLOSE_WAIT_S):
                await conn.wait_closed()
        except TimeoutError:
            conn.abort()

    # -- channels ---------------------------------------------------------------------------

    async def _exec(
        self, conn: asyncssh.SSHClientConnection, command: str, stdin: bytes | None
    ) -> CommandResult:
        """Run on an acquired channel slot; the slot is released here or by a reaper."""
        try:
            process = await conn.create_process(
                command,
                encoding=None,
                input=stdin,
                stdin=asyncssh.DEVNULL if stdin is None else asyncssh.PIPE,
            )
        except BaseException:
            self._channels.release()
            raise
        try:
            done = await process.wait(check=False)
        except BaseException:
            # timed out or cancelled: the caller leaves now, the slot stays taken until the
            # server has really closed the session (it counts against MaxSessions till then)
            self._reap(process)
            raise
        try:
            await self._close_process(process, _CLOSE_WAIT_S)
        finally:
            self._channels.release()
        self._open_failures = 0
        status = done.exit_status
        if done.exit_signal is not None:
            status = 128 + _signal_number(done.exit_signal[0])
        if status is None or status < 0:
            if conn.is_closed():
                raise HostUnavailableError(self.name, "host_unreachable", "connection closed")
            raise TransientError(
                "remote_command_failed", f"host {self.name}: the command ended without a status"
            )
        return CommandResult(
            exit_status=status, stdout=_text(done.stdout), stderr=_text(done.stderr)
        )

    @staticmethod
    async def _close_process(process: asyncssh.SSHClientProcess[bytes], wait_s: float) -> None:
        process.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await process.wait_closed()

    def _reap(self, process: asyncssh.SSHClientProcess[bytes]) -> None:
        """Stop an abandoned command and free its slot once its session is gone."""
        # sshd refuses signals for root logins (no privilege separation); the host's own
        # `timeout` wrapper then ends the command, and the session with it
        with contextlib.suppress(OSError, asyncssh.Error):
            process.send_signal("TERM")

        async def reap() -> None:
            try:
                await self._close_process(process, _REAP_WAIT_S)
            finally:
                self._channels.release()

        task = asyncio.get_running_loop().create_task(reap(), name=f"ssh-reap-{self.name}")
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    async def _sftp_client(self, conn: asyncssh.SSHClientConnection) -> asyncssh.SFTPClient:
        async with self._sftp_lock:
            if self._sftp is not None and self._conn is conn:
                return self._sftp
            try:
                async with asyncio.timeout(self.endpoint.connect_timeout_s):
                    client = await conn.start_sftp_client()
            except TimeoutError as exc:
                raise TransientError(
                    "remote_timeout", f"host {self.name}: the SFTP session did not start"
                ) from exc
            except (asyncssh.SFTPError, asyncssh.ProcessError) as exc:
                if isinstance(exc, asyncssh.SFTPConnectionLost):
                    raise
                raise TransientError(
                    "transfer_failed", f"host {self.name}: no SFTP subsystem: {exc}"
                ) from exc
            if self._conn is conn:
                self._sftp = client
            return client

    @contextlib.contextmanager
    def _translate(self, conn: asyncssh.SSHClientConnection) -> Iterator[None]:
        """Map asyncssh's failures to the host's named errors at this boundary."""
        try:
            yield
        except asyncssh.ChannelOpenError as exc:
            if conn.is_closed():
                self._drop(conn, f"channel open failed: {exc.reason}")
                raise HostUnavailableError(
                    self.name, "host_unreachable", "connection closed"
                ) from exc
            self._open_failures += 1
            if self._open_failures >= _MAX_OPEN_FAILURES:
                # sessions leaked by cancelled opens still count against MaxSessions
                self._drop(conn, f"{self._open_failures} channel opens refused")
            raise TransientError(
                "remote_command_failed", f"host {self.name}: no channel: {exc.reason}"
            ) from exc
        except (asyncssh.SFTPConnectionLost, asyncssh.DisconnectError, ConnectionError) as exc:
            if conn.is_closed() or not isinstance(exc, asyncssh.SFTPConnectionLost):
                self._drop(conn, str(exc) or type(exc).__name__)
                raise HostUnavailableError(
                    self.name, "host_unreachable", f"connection lost: {exc}"
                ) from exc
            raise TransientError(
                "transfer_failed", f"host {self.name}: the SFTP session ended: {exc}"
            ) from exc
