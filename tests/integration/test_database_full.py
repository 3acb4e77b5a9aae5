"""A database that cannot be written pauses the service; nothing fails for it, and it resumes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from mqi_async.domain.model import BeamStatus, RunStatus
from tests.e2e import make_rig, running_service, statuses, wait_all_running, wait_until
from tests.sshd import SshdServer

pytestmark = [
    pytest.mark.sshd,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root"),
]


def _fill(folder: Path) -> Path:
    """Fill the file system under `folder` to the last byte."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def _checkpoint(db: Path) -> None:
    # the WAL is reset to empty, so the next write needs new space on the full disk
    with contextlib.closing(sqlite3.connect(db, timeout=10)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


async def test_a_full_disk_under_the_database_pauses_and_resumes(
    tmp_path: Path, sshd: SshdServer
) -> None:
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(db_dir)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {mounted.stderr.decode().strip()}")
    try:
        rig = make_rig(
            tmp_path / "rig", sshd, gpus=2, run_seconds=3,
            overrides={"database": str(db_dir / "mqi.db")},
        )  # fmt: skip
        rig.drop_case("DBFULL", beams=2)
        async with running_service(rig.settings()) as svc:
            await wait_all_running(svc, "DBFULL", 2)
            await asyncio.to_thread(_checkpoint, db_dir / "mqi.db")
            filler = await asyncio.to_thread(_fill, db_dir)
            try:
                await wait_until(
                    lambda: svc.engine.database_error, timeout_s=60, what="database_unwritable"
                )
                assert svc.engine.database_error.startswith("database_unwritable")
                # runs end meanwhile; nothing is failed for it, and the service keeps going
                await asyncio.sleep(4)
                assert all(not t.done() for t in asyncio.all_tasks() if t.get_name() == "engine")
                beams = await svc.store.list_beams("DBFULL")
                assert not any(b.status == BeamStatus.FAILED for b in beams)
                plain = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "mqi_async", "status", "-c", str(rig.config_path)],
                    capture_output=True, text=True, timeout=60,
                )  # fmt: skip
                assert "database_unwritable" in plain.stdout, plain.stdout + plain.stderr
            finally:
                filler.unlink()

            async def completed() -> bool:
                return (await statuses(svc)).get("DBFULL") == "completed"

            await wait_until(completed, timeout_s=90, what="completion after space came back")
            assert svc.engine.database_error is None
            beams = await svc.store.list_beams("DBFULL")
            runs = [r for b in beams for r in await svc.store.list_runs(b.beam_id)]
        assert [b.attempts for b in beams] == [1, 1]
        assert {r.status for r in runs} == {RunStatus.SUCCEEDED}
    finally:
        subprocess.run(["umount", "-l", str(db_dir)], check=False)
