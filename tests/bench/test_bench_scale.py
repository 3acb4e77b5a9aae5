"""Scale (issue 7, item 5): a store holding years of history, 10,000 cases and 40,000 beams.

The store is built once for the module. Cases and their beams are registered through the
store's own transaction API (`tx.cases.register`, 500 cases per transaction); the history
the engine would have written over the years (statuses, one run per beam, about 400,000
audit events) is then added in bulk with sqlite3, because the store deliberately has no
bulk path for audited transitions. Mix: 9,880 completed cases, 100 failed (3 failed runs
per beam), 20 cancelled; nothing active, so the figures show what history alone costs.

Each figure is printed beside the same measurement on an empty store, taken in the same
run: the ratio shows what the history adds, the target is the issue's absolute bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mqi_async.domain.records import NewBeam, NewCase
from mqi_async.service import open_service, run_until_stopped
from mqi_async.store import Store
from mqi_async.store.columns import encode_time
from mqi_async.ui.app import DashboardApp
from tests.e2e import Rig, make_rig, spawn_service
from tests.sshd import SshdServer

pytestmark = pytest.mark.timeout(600)

CASES = 10_000
BEAMS_PER_CASE = 4
BATCH = 500
FAILED = 100
CANCELLED = 20
REPEATS = 3
#: how long the service runs on the big store before its peak RSS is read
RSS_WINDOW_S = 10.0


@dataclass(frozen=True, slots=True)
class Stores:
    big: Rig
    empty: Rig
    build_s: float
    db_mb: float
    events: int


def _case_status(i: int) -> str:
    if i % 100 == 7:
        return "failed"
    if i % 500 == 11:
        return "cancelled"
    return "completed"


async def _register(db: Path) -> None:
    """Cases and beams through the store's API, in batches."""
    async with await Store.open(db) as store:
        for start in range(0, CASES, BATCH):
            async with store.transaction() as tx:
                for i in range(start, min(start + BATCH, CASES)):
                    cid = f"P{i:06d}"
                    room = "G1" if i % 2 else "G2"
                    study = f"/data/incoming/{room}/{cid}/1.2.840.{i}"
                    await tx.cases.register(
                        NewCase(
                            case_id=cid,
                            case_path=study,
                            safe_name=cid,
                            room=room,
                            plan_path=f"{study}/RP.{i}.dcm",
                            gantry=1 if room == "G1" else 2,
                            patient_id=cid,
                        ),
                        beams=[
                            NewBeam(
                                beam_index=k,
                                beam_number=k + 1,
                                beam_name=f"{k}G{(k * 90) % 360:03d}",
                                delivery_path=f"{study}/field{k}",
                            )
                            for k in range(1, BEAMS_PER_CASE + 1)
                        ],
                    )


def _history(db: Path) -> int:
    """Statuses, runs and audit events as the engine leaves them; returns the event count."""
    base = datetime(2024, 1, 1, tzinfo=UTC)
    cases: list[tuple[object, ...]] = []
    beams: list[tuple[object, ...]] = []
    runs: list[tuple[object, ...]] = []
    events: list[tuple[object, ...]] = []
    beam_path = ("pending", "uploading", "queued", "launching", "running", "downloading")
    for i in range(CASES):
        cid = f"P{i:06d}"
        status = _case_status(i)
        t0 = base + timedelta(minutes=6 * i)
        at = encode_time(t0)
        end = encode_time(t0 + timedelta(minutes=20))
        error = {"failed": "moqui_exit_134: MOQUI ended with exit 134", "cancelled": "cancelled"}
        cases.append((status, 100, error.get(status), at, end, at, cid))
        events.extend(
            (at, cid, None, "case_status", f"-> {to}", json.dumps({"to": to}))
            for to in ("interpreting", "processing", "postprocessing", status)
        )
        for k in range(1, BEAMS_PER_CASE + 1):
            bid = f"{cid}_beam_{k}"
            uuid = f"GPU-{k % 4:08d}-0000-0000-0000-000000000000"
            beam_status = {"completed": "completed", "failed": "failed"}.get(status, "cancelled")
            attempts = 3 if beam_status == "failed" else 1
            out = f"/data/work/{cid}/dose/beam_{k}_{k}G_1_Dose.dcm"
            beams.append(
                (
                    beam_status,
                    100 if beam_status == "completed" else 60,
                    error.get(status),
                    attempts,
                    "gpu1",
                    json.dumps([uuid]),
                    json.dumps([out] if beam_status == "completed" else []),
                    json.dumps([k % 4]),
                    2_000_000,
                    2_000_000,
                    at,
                    end,
                    bid,
                )
            )
            for attempt in range(1, attempts + 1):
                ok = beam_status == "completed"
                runs.append(
                    (
                        bid,
                        attempt,
                        "gpu1",
                        json.dumps([uuid]),
                        f"/home/mqi/runs/{cid}/beam_{k}/{attempt}",
                        str(40000 + i),
                        "succeeded" if ok else "failed",
                        0 if ok else 134,
                        None if ok else "ABRT",
                        None if ok else error["failed"],
                        at,
                        end,
                    )
                )
                events.append((at, cid, bid, "run_started", f"attempt {attempt}", None))
                events.append((end, cid, bid, "run_finished", f"attempt {attempt}", None))
            for frm, to in zip(beam_path, (*beam_path[1:], beam_status), strict=True):
                events.append(
                    (at, cid, bid, "beam_status", f"{frm} -> {to}", json.dumps({"to": to}))
                )
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.executemany(
            "UPDATE cases SET status = ?, progress = ?, error = ?, created_at = ?,"
            " updated_at = ?, interpreted_at = ? WHERE case_id = ?",
            cases,
        )
        conn.executemany(
            "UPDATE beams SET status = ?, progress = ?, error = ?, attempts = ?, host = ?,"
            " gpu_uuids = ?, outputs = ?, gpu_indices = ?, transfer_done_bytes = ?,"
            " transfer_total_bytes = ?, created_at = ?, updated_at = ? WHERE beam_id = ?",
            beams,
        )
        conn.executemany(
            "INSERT INTO runs (beam_id, attempt, host, gpu_uuids, job_dir, job_id, status,"
            " exit_code, signal, error, started_at, ended_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            runs,
        )
        conn.executemany(
            "INSERT INTO events (at, case_id, beam_id, kind, message, data)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            events,
        )
    with contextlib.closing(sqlite3.connect(db)) as conn:
        # fresh statistics, as the service's `PRAGMA optimize` at each stop would leave them
        conn.execute("ANALYZE")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (count,) = conn.execute("SELECT count(*) FROM events").fetchone()
    return int(count)


@pytest.fixture(scope="module")
def stores(sshd_server: SshdServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    sshd_server.start()
    root = tmp_path_factory.mktemp("bench-scale")
    overrides = {"logging": {"level": "INFO"}, "gpu": {"poll_seconds": 10}}
    big = make_rig(root / "big", sshd_server, gpus=4, overrides=overrides)
    empty = make_rig(root / "empty", sshd_server, gpus=4, overrides=overrides)
    started = time.perf_counter()
    asyncio.run(_register(big.db))
    asyncio.run(_register_nothing(empty.db))
    n_events = _history(big.db)
    build_s = time.perf_counter() - started
    with contextlib.closing(sqlite3.connect(f"file:{big.db}?mode=ro", uri=True)) as conn:
        (n_beams,) = conn.execute("SELECT count(*) FROM beams").fetchone()
    assert n_beams == CASES * BEAMS_PER_CASE
    yield Stores(
        big=big,
        empty=empty,
        build_s=build_s,
        db_mb=big.db.stat().st_size / 1e6,
        events=n_events,
    )


async def _register_nothing(db: Path) -> None:
    async with await Store.open(db):
        pass


def _status_s(rig: Rig) -> float:
    started = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "mqi_async", "status", "--json", "-c", str(rig.config_path)],
        capture_output=True,
        timeout=120,
        check=True,
    )
    elapsed = time.perf_counter() - started
    json.loads(res.stdout)
    return elapsed


def test_status_json(stores: Stores, report: Callable[..., str]) -> None:
    big: list[float] = []
    empty: list[float] = []
    for _ in range(REPEATS):
        big.append(_status_s(stores.big))
        empty.append(_status_s(stores.empty))
    b, e = statistics.median(big), statistics.median(empty)
    report(
        "status_json_10k",
        b,
        "s",
        "target<=2",
        empty_store=f"{e:.2f}s",
        ratio_to_empty=f"{b / e:.1f}",
        db=f"{stores.db_mb:.0f}MB",
        events=stores.events,
        store_build=f"{stores.build_s:.0f}s",
        load1=f"{os.getloadavg()[0]:.1f}",
    )


async def _dashboard_s(rig: Rig) -> list[float]:
    async with await Store.open(rig.db) as store:
        app = DashboardApp(store=store, work_directory=rig.root / "work")
        out = []
        for _ in range(REPEATS + 2):
            started = time.perf_counter()
            dash = await app.read_dashboard()
            out.append(time.perf_counter() - started)
        if rig.db.stat().st_size > 10**7:
            # the dashboard reads every unfinished case plus the 200 newest, not all history
            assert 200 <= len(dash.cases) < CASES
            assert sum(dash.counts.cases_by_status.values()) == CASES
        return out


async def test_tui_snapshot(stores: Stores, report: Callable[..., str]) -> None:
    big = await _dashboard_s(stores.big)
    empty = await _dashboard_s(stores.empty)
    b, e = statistics.median(big), statistics.median(empty)
    report(
        "tui_snapshot_10k",
        b * 1000,
        "ms",
        "target<=50",
        empty_store=f"{e * 1000:.1f}ms",
        min=f"{min(big) * 1000:.0f}ms",
        what="DashboardApp.read_dashboard()",
        load1=f"{os.getloadavg()[0]:.1f}",
    )


async def _recovery_s(rig: Rig) -> float:
    """open_service (database check, migrations, hosts) until the engine's recovery is done."""
    started = time.perf_counter()
    async with open_service(rig.settings()) as service:
        task = asyncio.create_task(run_until_stopped(service, None))
        await asyncio.wait_for(service.engine.ready.wait(), 60)
        elapsed = time.perf_counter() - started
        service.request_stop()
        await asyncio.wait_for(task, 30)
    return elapsed


async def test_startup_recovery(stores: Stores, report: Callable[..., str]) -> None:
    big: list[float] = []
    empty: list[float] = []
    for _ in range(REPEATS):
        big.append(await _recovery_s(stores.big))
        empty.append(await _recovery_s(stores.empty))
    b, e = statistics.median(big), statistics.median(empty)
    report(
        "startup_recovery_10k",
        b,
        "s",
        "target<=5",
        empty_store=f"{e:.2f}s",
        ratio_to_empty=f"{b / e:.1f}",
        load1=f"{os.getloadavg()[0]:.1f}",
    )


def _proc_status(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    assert m, text
    return int(m.group(1)) * 1024


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _service_peak(rig: Rig) -> tuple[int, float]:
    """Peak RSS (VmHWM) and CPU share of `mqi-async run --no-ui` after RSS_WINDOW_S of running."""
    log = rig.root / "service.out"
    log.unlink(missing_ok=True)
    proc = spawn_service(rig)
    try:
        deadline = time.monotonic() + 60
        while "recovery:" not in (log.read_text() if log.exists() else ""):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the service did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        cpu0, t0 = _cpu_s(proc.pid), time.monotonic()
        time.sleep(RSS_WINDOW_S)
        cpu = (_cpu_s(proc.pid) - cpu0) / (time.monotonic() - t0)
        return _proc_status(proc.pid, "VmHWM"), cpu
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_peak_rss(stores: Stores, report: Callable[..., str]) -> None:
    big, big_cpu = _service_peak(stores.big)
    empty, empty_cpu = _service_peak(stores.empty)
    report(
        "service_peak_rss_10k",
        big / 1e6,
        "MB",
        "target<=300",
        empty_store=f"{empty / 1e6:.0f}MB",
        cpu_while_idle=f"{big_cpu * 100:.1f}%",
        cpu_empty=f"{empty_cpu * 100:.1f}%",
        window=f"{RSS_WINDOW_S:g}s",
        how="VmHWM of mqi-async run --no-ui",
    )
