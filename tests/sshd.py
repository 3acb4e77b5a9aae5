"""A real OpenSSH sshd on 127.0.0.1 for integration tests (asyncssh stand-in when it is missing)."""

# How (docs/platform.md §2): a foreground `sshd -D -e` child, keys and config in a 0755
# mkdtemp directory, default MaxSessions/MaxStartups so concurrency limits are real.

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from mqi_async.hpc.ssh import SshEndpoint

REQUIRE_OPENSSH_ENV = "MQI_TEST_REQUIRE_OPENSSH"
#: set to 1 to use the asyncssh stand-in even where sshd is installed
FORCE_FALLBACK_ENV = "MQI_TEST_SSHD_FALLBACK"
_SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/libexec/sftp-server",
)
_REPO_ROOT = Path(__file__).resolve().parent.parent


def find_sshd() -> str | None:
    found = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin:/sbin")
    return str(Path(found).resolve()) if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_key(key: asyncssh.SSHKey, path: Path) -> str:
    key.write_private_key(str(path))
    path.chmod(0o600)
    public = key.export_public_key("openssh").decode().strip()
    path.with_name(path.name + ".pub").write_text(public + "\n")
    return public


def _children(pid: int) -> list[int]:
    """Direct children of pid (sshd's per-connection processes), from /proc."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found


@dataclass
class SshdServer:
    """One sshd on a fixed loopback port that tests may stop and start again."""

    host: str
    port: int
    user: str
    key_path: Path
    known_hosts_path: Path
    work_dir: Path
    host_public_key: str
    is_openssh: bool
    argv: list[str]
    log_path: Path
    #: the umask sessions get (sshd passes its own on; UsePAM is off): None = this process's
    login_umask: int | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def endpoint(self, name: str = "test", **overrides: object) -> SshEndpoint:
        values: dict[str, object] = {
            "name": name,
            "address": self.host,
            "port": self.port,
            "username": self.user,
            "client_keys": (str(self.key_path),),
            "known_hosts": str(self.known_hosts_path),
            "connect_timeout_s": 5.0,
            "keepalive_s": 5.0,
        }
        values.update(overrides)
        return SshEndpoint(**values)  # type: ignore[arg-type]

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        if self.is_running:
            return
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=_REPO_ROOT,
                umask=-1 if self.login_umask is None else self.login_umask,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sshd exited at start; see {self.log_path}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.5),
            ):
                return
            time.sleep(0.02)
        raise RuntimeError(f"sshd did not listen on {self.port}; see {self.log_path}")

    def stop(self) -> None:
        """Stop the listener and drop every open connection, like a host going away."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        children = _children(proc.pid)
        proc.terminate()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)


def start_sshd(*, login_umask: int | None = None, extra_config: tuple[str, ...] = ()) -> SshdServer:
    """Generate keys and config, start sshd (or the asyncssh stand-in) and wait for its port.

    `login_umask` is the umask of every login session (a server's `UMASK` in login.defs);
    `extra_config` lines are appended to sshd_config (OpenSSH only).
    """
    work = Path(tempfile.mkdtemp(prefix="mqi-sshd-"))
    # sshd reads authorized_keys as the login user; pytest's 0700 tmp dirs would block it
    work.chmod(0o755)
    host_public = _write_key(asyncssh.generate_private_key("ssh-ed25519"), work / "host_ed25519")
    client_public = _write_key(
        asyncssh.generate_private_key("ssh-ed25519"), work / "client_ed25519"
    )
    (work / "authorized_keys").write_text(client_public + "\n")
    (work / "authorized_keys").chmod(0o644)
    port = free_port()
    (work / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_public}\n")
    sshd = None if os.environ.get(FORCE_FALLBACK_ENV) == "1" else find_sshd()
    if sshd is None and os.environ.get(REQUIRE_OPENSSH_ENV) == "1":
        shutil.rmtree(work, ignore_errors=True)
        raise RuntimeError(f"sshd is not installed and {REQUIRE_OPENSSH_ENV}=1")
    if sshd is not None:
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        sftp = next((p for p in _SFTP_SERVERS if Path(p).exists()), "internal-sftp")
        lines = [
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {work / 'host_ed25519'}",
            f"PidFile {work / 'sshd.pid'}",
            f"AuthorizedKeysFile {work / 'authorized_keys'}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            f"Subsystem sftp {sftp}",
            "LogLevel INFO",
            # MaxSessions and MaxStartups stay at their defaults (10, 10:30:100) on purpose
            *extra_config,
        ]
        if os.geteuid() == 0:
            lines.append("PermitRootLogin prohibit-password")
        (work / "sshd_config").write_text("\n".join(lines) + "\n")
        argv = [sshd, "-D", "-e", "-f", str(work / "sshd_config")]
    else:
        argv = [
            sys.executable,
            "-m",
            "tests.sshd_fallback",
            "--port",
            str(port),
            "--host-key",
            str(work / "host_ed25519"),
            "--authorized-keys",
            str(work / "authorized_keys"),
        ]
    server = SshdServer(
        host="127.0.0.1",
        port=port,
        user=getpass.getuser(),
        key_path=work / "client_ed25519",
        known_hosts_path=work / "known_hosts",
        work_dir=work,
        host_public_key=host_public,
        is_openssh=sshd is not None,
        argv=argv,
        log_path=work / "sshd.log",
        login_umask=login_umask,
    )
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    return server
