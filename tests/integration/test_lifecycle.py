"""The service as systemd runs it: signals, restarts, a second instance, a damaged database."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e import (
    Rig,
    make_rig,
    running_service,
    spawn_service,
    statuses,
    wait_beams,
    wait_status,
    wait_until,
)
from tests.sshd import SshdServer

pytestmark = [pytest.mark.sshd, pytest.mark.slow]


def _beams(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [b for c in doc["cases"] for b in c["beams"]]


def _completed(doc: dict[str, Any], cases: int) -> bool:
    return len(doc["cases"]) == cases and all(c["status"] == "completed" for c in doc["cases"])


def _stop(proc: subprocess.Popen[bytes], sig: int) -> tuple[int, float]:
    started = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(timeout=30)
    return code, time.monotonic() - started


def _rig(tmp_path: Path, sshd: SshdServer, run_seconds: float) -> Rig:
    rig = make_rig(tmp_path / "rig", sshd, gpus=4, run_seconds=run_seconds)
    rig.drop_case("LIFE1", beams=2)
    rig.drop_case("LIFE2", beams=2)
    return rig


def test_sigterm_stops_gracefully_and_restart_reattaches(tmp_path: Path, sshd: SshdServer) -> None:
    rig = _rig(tmp_path, sshd, run_seconds=4)
    proc = spawn_service(rig)
    try:
        wait_beams(rig, lambda b: b.count("running") >= 2, timeout_s=90)
    finally:
        code, took_s = _stop(proc, signal.SIGTERM)
    assert code == 0
    assert took_s < 10
    proc = spawn_service(rig, "service2.out")
    try:
        doc = wait_status(rig, lambda d: _completed(d, 2), timeout_s=120)
    finally:
        _stop(proc, signal.SIGTERM)
    # the runs went on while the service was down and were re-attached, not launched again
    assert [b["attempts"] for b in _beams(doc)] == [1, 1, 1, 1]


def test_sigkill_mid_run_loses_nothing(tmp_path: Path, sshd: SshdServer) -> None:
    rig = _rig(tmp_path, sshd, run_seconds=3)
    proc = spawn_service(rig)
    try:
        wait_beams(rig, lambda b: "running" in b, timeout_s=90)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    proc = spawn_service(rig, "service2.out")
    try:
        doc = wait_status(rig, lambda d: _completed(d, 2), timeout_s=120)
    finally:
        code, _ = _stop(proc, signal.SIGTERM)
    assert code == 0
    assert all(b["attempts"] == 1 for b in _beams(doc))
    assert all(len(b["outputs"]) == 1 and Path(b["outputs"][0]).is_file() for b in _beams(doc))
    import sqlite3

    with sqlite3.connect(rig.db) as db:
        assert db.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0
        launches = db.execute("SELECT beam_id, COUNT(*) FROM runs GROUP BY beam_id").fetchall()
    assert all(n == 1 for _, n in launches) and len(launches) == 4


def test_second_instance_is_refused(tmp_path: Path, sshd: SshdServer) -> None:
    rig = make_rig(tmp_path / "rig", sshd)
    first = spawn_service(rig)
    try:
        wait_status(rig, lambda d: True, timeout_s=60)
        time.sleep(1.0)
        second = subprocess.run(
            [sys.executable, "-m", "mqi_async", "run", "--no-ui", "-c", str(rig.config_path)],
            capture_output=True, text=True, timeout=60, cwd=rig.root,
        )  # fmt: skip
    finally:
        code, _ = _stop(first, signal.SIGTERM)
    assert second.returncode == 2
    assert "already_running" in second.stderr or "in use" in second.stderr
    assert code == 0


def test_damaged_database_is_reported_and_left_alone(tmp_path: Path, sshd: SshdServer) -> None:
    rig = make_rig(tmp_path / "rig", sshd)
    rig.db.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    before = hashlib.sha256(rig.db.read_bytes()).hexdigest()
    res = subprocess.run(
        [sys.executable, "-m", "mqi_async", "run", "--no-ui", "-c", str(rig.config_path)],
        capture_output=True, text=True, timeout=60, cwd=rig.root,
    )  # fmt: skip
    assert res.returncode != 0
    assert "database_damaged" in res.stderr
    assert hashlib.sha256(rig.db.read_bytes()).hexdigest() == before
    assert not Path(str(rig.db) + "-wal").exists()


async def test_crashing_gpu_poller_is_restarted(
    tmp_path: Path, sshd: SshdServer, caplog: pytest.LogCaptureFixture
) -> None:
    rig = make_rig(tmp_path / "rig", sshd, gpus=2, run_seconds=0.2)
    async with running_service(rig.settings()) as svc:
        poller = svc.engine.pollers["gpu1"]
        real = poller._on_sample
        crashes = {"n": 0}

        def crash_twice(sample: object, polled_at: float) -> None:
            if crashes["n"] < 2:
                crashes["n"] += 1
                raise RuntimeError("injected poller crash")
            real(sample, polled_at)  # type: ignore[arg-type]

        poller._on_sample = crash_twice  # type: ignore[method-assign]
        poller.poll_now()
        rig.drop_case("AFTERCRASH", beams=2)

        async def done() -> bool:
            return (await statuses(svc)).get("AFTERCRASH") == "completed"

        await wait_until(done, timeout_s=120, what="the case to complete after poller crashes")
    assert crashes["n"] == 2
    assert "gpu poller gpu1 crashed; restarting" in caplog.text
