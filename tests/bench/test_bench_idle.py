"""Idle cost (issue 7, item 6): the service with 4 GPUs polled and nothing to do, for 60 s.

`mqi-async run --no-ui` runs as a child on an empty store and scan folder, its one host the
real OpenSSH sshd with the nvidia-smi simulator showing 4 GPUs. Every interval is the
shipped default (gpu.poll_seconds 10, runs.poll_seconds 1, ingest.rescan_seconds 60, SSH
keepalive 15 s). The child's utime+stime from /proc/<pid>/stat before and after the
window, divided by the window, is its share of one core. The nvidia-smi runs are the
host's cost, not the service's; they are counted (GPU samples written) but not timed.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.e2e import make_rig, spawn_service
from tests.sshd import SshdServer

pytestmark = pytest.mark.timeout(300)

WINDOW_S = 60.0
SETTLE_S = 3.0


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _gpu_rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute("SELECT count(*) FROM gpus").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_idle_cpu(openssh: SshdServer, tmp_path: Path, report: Callable[..., str]) -> None:
    rig = make_rig(tmp_path / "rig", openssh, gpus=4, overrides={"logging": {"level": "INFO"}})
    config = yaml.safe_load(rig.config_path.read_text())
    # back to the shipped defaults: make_rig tunes these for fast tests
    for key in ("gpu", "runs", "retry", "ingest"):
        config.pop(key, None)
    for host in config["hosts"]:
        host.pop("keepalive_seconds", None)
        host.pop("connect_timeout_seconds", None)
    rig.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    settings = rig.settings()
    proc = spawn_service(rig)
    try:
        deadline = time.monotonic() + 60
        while _gpu_rows(rig.db) < 4:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = (rig.root / "service.out").read_text()[-2000:]
                raise AssertionError(f"no GPU sample from the service: {out}")
            time.sleep(0.2)
        time.sleep(SETTLE_S)
        cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
        load0 = os.getloadavg()[0]
        time.sleep(WINDOW_S)
        cpu1, t1 = _cpu_s(proc.pid), time.monotonic()
        load1 = os.getloadavg()[0]
        assert proc.poll() is None, "the service stopped during the window"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    share = (cpu1 - cpu0) / (t1 - t0)
    report(
        "idle_cpu_share",
        share * 100,
        "% of one core",
        "goal<=2",
        cpu=f"{cpu1 - cpu0:.2f}s/{t1 - t0:.0f}s",
        gpu_poll=f"{settings.gpu.poll_seconds:g}s",
        run_poll=f"{settings.runs.poll_seconds:g}s",
        rescan=f"{settings.ingest.rescan_seconds:g}s",
        gpus=4,
        load1=f"{(load0 + load1) / 2:.1f}",
    )
