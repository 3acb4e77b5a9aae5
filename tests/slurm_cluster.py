"""A real Slurm 22.05 cluster on this machine (munged, slurmctld, slurmd, 4 fake GPUs) plus an
OpenSSH login node, for the slurm host's integration tests.

How (../shared/docs/slurm.md): every daemon runs as a plain daemon out of a 0755 mkdtemp
directory, with its own config, state, logs and pid files; nothing under /etc is used and no
systemd. GPUs are GRES backed by mknod clones of /dev/null (plain files would leave
CUDA_VISIBLE_DEVICES unset). The node claims 8 CPUs (`SlurmdParameters=config_overrides`) so
four one-core jobs fit on a 2-core machine; `slurmd -N localhost` because the hostname differs;
`jobcomp/filetxt` so `sacct -c` works without slurmdbd. The login node is sshd on a loopback
port whose sessions get `SLURM_CONF` through `SetEnv`. Ports are picked free at start.

Needs root (slurmd runs jobs for any user, mknod) and the Debian packages
`slurmctld slurmd slurm-client munge` plus `openssh-server`. `cluster_or_skip()` skips with
the reason when they are missing, or fails under MQI_TEST_REQUIRE_SLURM=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import yaml

from mqi_async.config import load_settings
from mqi_async.demo.cases import CaseSpec, WrittenCase, write_case
from tests.sshd import SshdServer, find_sshd, free_port

REQUIRE_SLURM_ENV = "MQI_TEST_REQUIRE_SLURM"
PACKAGES = "slurmctld slurmd slurm-client munge openssh-server"
INSTALL_HINT = f"apt-get install -y --no-install-recommends {PACKAGES}"
GPUS = 4
_DAEMONS = ("slurmctld", "slurmd", "munged", "mungekey")
_CLIENTS = ("sbatch", "squeue", "sacct", "scancel", "sinfo", "scontrol")
_SFTP_SERVERS = ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")


def missing_requirements() -> str | None:
    """Why a cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "the Slurm fixture needs root (slurmd, mknod); run the tests as root"
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = [p for p in (*_DAEMONS, *_CLIENTS) if shutil.which(p, path=path) is None]
    if find_sshd() is None:
        missing.append("sshd")
    if missing:
        return f"Slurm packages missing ({', '.join(missing)}); install: {INSTALL_HINT}"
    return None


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError(f"{name} not found")
    return found


def _write_key(key: asyncssh.SSHKey, path: Path) -> str:
    key.write_private_key(str(path))
    path.chmod(0o600)
    return key.export_public_key("openssh").decode().strip()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still answers kill -0; it is gone for our purposes
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            return False
    return True


@dataclass
class SlurmCluster:
    """One single-node cluster under `root`; tests may stop and restart its controller."""

    root: Path
    ctld_port: int
    slurmd_port: int
    login: SshdServer | None = None
    _log_tail_at: dict[str, int] = field(default_factory=dict)

    # -- paths ----------------------------------------------------------------------------

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def shared(self) -> Path:
        """The 'shared filesystem' of the cluster: remote_root of tests lives below it."""
        return self.root / "shared"

    @property
    def jobcomp(self) -> Path:
        return self.root / "log" / "jobcomp.txt"

    def pidfile(self, daemon: str) -> Path:
        return {
            "munged": self.root / "munge" / "munged.pid",
            "slurmctld": self.root / "slurmctld.pid",
            "slurmd": self.root / "slurmd.pid",
        }[daemon]

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- client commands ------------------------------------------------------------------

    def cmd(self, *argv: str, timeout_s: float = 30.0, check: bool = True) -> str:
        """Run a Slurm client command here (as the login node would) and return stdout."""
        res = subprocess.run(
            list(argv), env=self.env(), capture_output=True, text=True, timeout=timeout_s
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"{argv} exited {res.returncode}: {res.stderr.strip()}")
        return res.stdout

    def running_jobs(self) -> list[str]:
        out = self.cmd("squeue", "-h", "-t", "RUNNING", "-o", "%i", check=False)
        return out.split()

    def active_jobs(self) -> list[str]:
        out = self.cmd("squeue", "-h", "-o", "%i", check=False)
        return out.split()

    def cancel_all(self) -> None:
        """Cancel every job of every user and wait until the queue is empty (test isolation)."""
        with contextlib.suppress(subprocess.SubprocessError, RuntimeError):
            self.cmd("scancel", "--full", "-u", getpass.getuser(), check=False)
            deadline = time.monotonic() + 60
            while self.active_jobs() and time.monotonic() < deadline:
                time.sleep(0.2)

    # -- daemons --------------------------------------------------------------------------

    def _daemon_pid(self, daemon: str) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(self.pidfile(daemon).read_text().split()[0])
            if _pid_alive(pid):
                return pid
        return None

    def _stop_daemon(self, daemon: str, timeout_s: float = 15.0) -> None:
        pid = self._daemon_pid(daemon)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.pidfile(daemon).unlink(missing_ok=True)

    def _run_daemon(self, argv: list[str], daemon: str) -> None:
        res = subprocess.run(
            argv, env=self.env(), capture_output=True, text=True, timeout=30, cwd=self.root
        )
        if res.returncode != 0:
            raise RuntimeError(f"{daemon} failed to start ({res.returncode}): {res.stderr}")
        deadline = time.monotonic() + 10
        while self._daemon_pid(daemon) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{daemon} did not write its pid file; see {self.root}/log")
            time.sleep(0.05)

    def start_controller(self, *, fresh: bool = False) -> None:
        argv = [_which("slurmctld")] + (["-i"] if fresh else [])
        self._run_daemon(argv, "slurmctld")
        self.wait_controller()

    def stop_controller(self) -> None:
        """SIGTERM slurmctld and wait until it has saved its state and exited."""
        self._stop_daemon("slurmctld")

    def restart_controller(self) -> None:
        self.stop_controller()
        self.start_controller()

    def wait_controller(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.SubprocessError):
                out = self.cmd("scontrol", "ping", timeout_s=5, check=False)
                if "UP" in out:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"slurmctld did not answer; see {self.root / 'log'}")

    def wait_idle_node(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.SubprocessError):
                state = self.cmd("sinfo", "-h", "-n", "localhost", "-o", "%t", check=False).strip()
                if state == "idle":
                    return
            time.sleep(0.1)
        raise RuntimeError(f"node not idle (state {state!r}); see {self.root / 'log'}")

    def start(self) -> None:
        self._run_daemon(
            [
                _which("munged"),
                "-S",
                str(self.munge_socket),
                f"--key-file={self.root / 'mungekey' / 'munge.key'}",
                f"--log-file={self.root / 'log' / 'munged.log'}",
                f"--pid-file={self.pidfile('munged')}",
                f"--seed-file={self.root / 'munge' / 'munged.seed'}",
            ],
            "munged",
        )
        self.start_controller(fresh=True)
        self._run_daemon([_which("slurmd"), "-N", "localhost"], "slurmd")
        self.wait_idle_node()
        if self.login is not None:
            self.login.start()

    def stop(self) -> None:
        """Stop everything by pid: jobs first, then sshd, slurmd, slurmctld, munged."""
        if self._daemon_pid("slurmctld") is not None:
            self.cancel_all()
        if self.login is not None:
            self.login.stop()
        for daemon in ("slurmd", "slurmctld", "munged"):
            self._stop_daemon(daemon)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_text(self, name: str) -> str:
        path = self.root / "log" / name
        return path.read_text(errors="replace") if path.exists() else ""


def _slurm_conf(d: Path, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=mqitest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={d}/log/jobcomp.txt
MinJobAge=3600
KillWait=5
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerParameters=sched_interval=1,sched_min_interval=0,batch_sched_delay=0,bf_interval=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 RealMemory=2000 Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=gpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _login_sshd(d: Path, conf: Path) -> SshdServer:
    ssh = d / "ssh"
    host_public = _write_key(asyncssh.generate_private_key("ssh-ed25519"), ssh / "host_ed25519")
    client_public = _write_key(asyncssh.generate_private_key("ssh-ed25519"), ssh / "client_ed25519")
    (ssh / "authorized_keys").write_text(client_public + "\n")
    (ssh / "authorized_keys").chmod(0o644)
    port = free_port()
    (ssh / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_public}\n")
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    sftp = next((p for p in _SFTP_SERVERS if Path(p).exists()), "internal-sftp")
    lines = [
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {ssh / 'host_ed25519'}",
        f"PidFile {ssh / 'sshd.pid'}",
        f"AuthorizedKeysFile {ssh / 'authorized_keys'}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        f"Subsystem sftp {sftp}",
        # a login node has /etc/slurm; here the sessions are told where the config is
        f"SetEnv SLURM_CONF={conf}",
        "LogLevel INFO",
    ]
    (ssh / "sshd_config").write_text("\n".join(lines) + "\n")
    sshd = find_sshd()
    assert sshd is not None
    return SshdServer(
        host="127.0.0.1",
        port=port,
        user=getpass.getuser(),
        key_path=ssh / "client_ed25519",
        known_hosts_path=ssh / "known_hosts",
        work_dir=ssh,
        host_public_key=host_public,
        is_openssh=True,
        argv=[sshd, "-D", "-e", "-f", str(ssh / "sshd_config")],
        log_path=d / "log" / "sshd.log",
    )


def start_cluster() -> SlurmCluster:
    """Write the configs, start munged, slurmctld, slurmd and the login sshd; wait for idle."""
    d = Path(tempfile.mkdtemp(prefix="mqi-slurm-"))
    d.chmod(0o755)
    for sub, mode in (
        ("etc", 0o755),
        ("state", 0o755),
        ("spool", 0o755),
        ("log", 0o755),
        ("fakegpu", 0o755),
        ("munge", 0o755),
        ("mungekey", 0o700),
        ("ssh", 0o755),
        ("shared", 0o755),
    ):
        (d / sub).mkdir(mode=mode)
        (d / sub).chmod(mode)
    cluster = SlurmCluster(root=d, ctld_port=free_port(), slurmd_port=free_port())
    try:
        for i in range(GPUS):
            os.mknod(d / "fakegpu" / f"nvidia{i}", 0o666 | 0o020000, os.makedev(1, 3))
        (d / "etc" / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName=localhost Name=gpu File={d}/fakegpu/nvidia[0-{GPUS - 1}]\n"
        )
        cluster.conf.write_text(_slurm_conf(d, cluster.ctld_port, cluster.slurmd_port))
        subprocess.run(
            [_which("mungekey"), "--create", f"--keyfile={d / 'mungekey' / 'munge.key'}"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        (d / "mungekey" / "munge.key").chmod(0o600)
        cluster.login = _login_sshd(d, cluster.conf)
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    return cluster


def cluster_or_skip() -> SlurmCluster:
    """A started cluster; skip (or fail under MQI_TEST_REQUIRE_SLURM=1) when it cannot run."""
    required = os.environ.get(REQUIRE_SLURM_ENV) == "1"
    why = missing_requirements()
    if why is not None:
        if required:
            pytest.fail(f"{why} ({REQUIRE_SLURM_ENV}=1)")
        pytest.skip(why)
    try:
        return start_cluster()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.fail(f"the Slurm test cluster did not start: {exc}")


@contextlib.contextmanager
def module_cluster() -> Iterator[SlurmCluster]:
    """Body of a module-scoped fixture: one cluster for the module, stopped at its end."""
    cluster = cluster_or_skip()
    try:
        yield cluster
    finally:
        cluster.close()


def fresh(cluster: SlurmCluster) -> SlurmCluster:
    """The cluster with its controller and login node up and no job left from earlier tests."""
    if cluster._daemon_pid("slurmctld") is None:
        cluster.start_controller()
    if cluster.login is not None:
        cluster.login.start()
    cluster.cancel_all()
    return cluster


# -- building hosts and configs against the cluster ---------------------------------------

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / "mqi_async" / "demo" / "bin"

#: small phantom so raw files stay tiny and runs fast
SMALL_PHANTOM: dict[str, Any] = {
    "PhantomDimX": 20,
    "PhantomDimY": 16,
    "PhantomDimZ": 10,
    "PhantomPositionX": -10,
    "PhantomPositionY": -8,
    "PhantomPositionZ": -5,
}


def sim_env(state_dir: Path, *, run_seconds: float, gpus: int = GPUS) -> list[str]:
    """An `env` argv prefix steering the MOQUI simulator."""
    return [
        "env",
        f"MQI_SIM_STATE_DIR={state_dir}",
        f"MQI_SIM_GPUS={gpus}",
        f"MQI_SIM_RUN_SECONDS={run_seconds}",
    ]


def tps_env_argv(state_dir: Path, *, run_seconds: float) -> list[str]:
    return [*sim_env(state_dir, run_seconds=run_seconds), sys.executable, str(BIN / "tps_env")]


def slurm_host_config(
    cluster: SlurmCluster,
    *,
    name: str,
    remote_root: Path,
    moqui_command: Sequence[str],
    **extra: Any,
) -> dict[str, Any]:
    """A `kind: slurm` entry of config.yaml whose login node is the cluster's sshd."""
    login = cluster.login
    assert login is not None
    return {
        "name": name,
        "kind": "slurm",
        "address": login.host,
        "port": login.port,
        "username": login.user,
        "client_keys": [str(login.key_path)],
        "known_hosts": str(login.known_hosts_path),
        "remote_root": str(remote_root),
        "moqui_command": list(moqui_command),
        "connect_timeout_seconds": 5,
        "keepalive_seconds": 5,
        "partition": "gpu",
        "gres": "gpu:1",
        **extra,
    }


def write_config(root: Path, hosts: list[dict[str, Any]], **overrides: Any) -> Path:
    """A config.yaml under root (scan, work, database relative to it)."""
    root.mkdir(parents=True, exist_ok=True)
    defaults = dict(load_settings(None).moqui)
    config: dict[str, Any] = {
        "scan_directory": "incoming",
        "work_directory": "work",
        "database": "mqi.db",
        "ingest": {"rescan_seconds": 5},
        "hosts": hosts,
        "gpu": {"poll_seconds": 1, "min_free_memory_mb": 1000},
        "runs": {"poll_seconds": 0.5, "timeout_seconds": 300},
        "retry": {"max_attempts": 3, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 1},
        "moqui": {**defaults, **SMALL_PHANTOM},
        "logging": {"directory": "logs", "level": "DEBUG"},
        # one job per beam, so slot and job counts mean what the tests say
        "qa": {"reference": "none", "report": False},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def drop_case(scan: Path, case_id: str, *, beams: int) -> WrittenCase:
    first = (datetime.now() - timedelta(hours=3)).replace(microsecond=0)
    spec = CaseSpec(
        case_id=case_id, beams=beams, layers_per_beam=1, samples_per_layer=8,
        first_delivery_at=first,
    )  # fmt: skip
    return write_case(scan, spec, marker_last=True)


class ConcurrencyProbe:
    """Samples, in the background, how many simulator processes hold a (fake) GPU and how
    many jobs Slurm runs; records the maxima and any GPU used twice at once."""

    def __init__(self, cluster: SlurmCluster, state_dir: Path, interval_s: float = 0.1) -> None:
        self._cluster = cluster
        self._procs = state_dir / "procs"
        self._interval_s = interval_s
        self.max_procs = 0
        self.max_running = 0
        self.gpu_clash: list[list[int]] = []
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def _sample(self) -> tuple[list[int], int]:
        indices: list[int] = []
        for path in self._procs.glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                indices.append(int(json.loads(path.read_text())["gpu_index"]))
        return indices, len(self._cluster.running_jobs())

    async def _run(self) -> None:
        while True:
            indices, running = await asyncio.to_thread(self._sample)
            self.samples += 1
            self.max_procs = max(self.max_procs, len(indices))
            self.max_running = max(self.max_running, running)
            if len(set(indices)) != len(indices):
                self.gpu_clash.append(sorted(indices))
            await asyncio.sleep(self._interval_s)

    async def __aenter__(self) -> ConcurrencyProbe:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
