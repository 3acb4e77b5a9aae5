"""Ingest figures: marker written → case registered (inotify and polling), and the startup
scan of 2,000 existing case folders. `make bench` runs it; it is not part of `make test`."""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mqi_async.config import IngestSettings
from mqi_async.demo.cases import CaseSpec, write_case, write_cases
from mqi_async.domain.records import NewCase
from mqi_async.ingest.layout import READY_MARKER
from mqi_async.ingest.reader import FoundCase
from mqi_async.ingest.watcher import CaseWatcher
from mqi_async.store import Store
from tests.bench.conftest import Report, percentile

CASES = 20
SCAN_CASES = 2000


class Registrar:
    """The watcher's `on_case`: registers in the real store, and notes when each case
    folder was first registered."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.registered_at: dict[str, float] = {}

    async def __call__(self, case: FoundCase, new_ptn: bool) -> None:
        _, created = await self.store.register_case(
            NewCase(
                case_id=case.case_id,
                case_path=case.case_path,
                room=case.room,
                safe_name=case.safe_name,
            )
        )
        if created:
            self.registered_at.setdefault(case.case_path, time.monotonic())


@contextlib.asynccontextmanager
async def watching(watcher: CaseWatcher) -> AsyncIterator[None]:
    task = asyncio.create_task(watcher.run())
    while watcher.last_scan_s is None:
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _marker_latencies(tmp_path: Path, *, force_polling: bool) -> list[float]:
    root = tmp_path / "incoming"
    async with await Store.open(tmp_path / "mqi.db") as store:
        registrar = Registrar(store)
        # the service's defaults, but no periodic rescan inside the measurement
        settings = IngestSettings(force_polling=force_polling, rescan_seconds=3600)
        watcher = CaseWatcher(root, settings, registrar)
        latencies: list[float] = []
        jitter = random.Random(7)
        async with watching(watcher):
            for i in range(1, CASES + 1):
                spec = CaseSpec(
                    case_id=f"{i:08d}",
                    beams=2,
                    layers_per_beam=2,
                    nested=i % 2 == 1,
                    room=("G1", "G2")[i % 2],
                    write_marker=False,
                    seed=i,
                )
                case = await asyncio.to_thread(write_case, root, spec)
                # let the events of the copy pass, so only the marker is measured; the
                # jitter keeps the marker from landing at one phase of the poll cycle
                await asyncio.sleep(0.8 + jitter.uniform(0, 0.3))
                marker = (case.case_dir.parent if spec.nested else case.case_dir) / READY_MARKER
                written = time.monotonic()
                await asyncio.to_thread(marker.write_text, "")
                deadline = written + 30
                while str(case.case_dir) not in registrar.registered_at:
                    assert time.monotonic() < deadline, f"case {i} was never registered"
                    await asyncio.sleep(0.002)
                latencies.append(registrar.registered_at[str(case.case_dir)] - written)
        assert watcher.force_polling is force_polling
        return latencies


@pytest.mark.parametrize("force_polling", [False, True], ids=["inotify", "polling"])
async def test_marker_to_registered(tmp_path: Path, report: Report, force_polling: bool) -> None:
    latencies = await _marker_latencies(tmp_path, force_polling=force_polling)
    mode = "polling" if force_polling else "inotify"
    ms = [s * 1000 for s in latencies]
    goal = "goal: median <= 500 ms" if not force_polling else "no goal (poll_delay_ms=300)"
    report(
        f"ingest.marker_to_registered.{mode}.median",
        statistics.median(ms),
        "ms",
        goal,
        cases=len(ms),
    )
    report(
        f"ingest.marker_to_registered.{mode}.p95",
        percentile(ms, 95),
        "ms",
        "no goal",
        cases=len(ms),
        max_ms=round(max(ms)),
    )


async def test_startup_scan_of_2000_cases(tmp_path: Path, report: Report) -> None:
    root = tmp_path / "incoming"
    started = time.monotonic()
    await asyncio.to_thread(write_cases, root, SCAN_CASES)
    written_s = time.monotonic() - started
    found: list[FoundCase] = []

    async def record(case: FoundCase, new_ptn: bool) -> None:
        found.append(case)

    # the scan alone (cold: nothing registered yet)
    watcher = CaseWatcher(root, IngestSettings(rescan_seconds=3600), record)
    started = time.monotonic()
    await watcher.scan()
    scan_s = time.monotonic() - started
    assert len(found) == SCAN_CASES
    report(
        "ingest.startup_scan_2000.scan_only",
        scan_s,
        "s",
        "goal: <= 10 s",
        cases=len(found),
        write_cases_s=round(written_s, 1),
    )

    # the scan as the service runs it at its first start: every case registered in SQLite
    async with await Store.open(tmp_path / "mqi.db") as store:
        registrar = Registrar(store)
        watcher = CaseWatcher(root, IngestSettings(rescan_seconds=3600), registrar)
        started = time.monotonic()
        await watcher.scan()
        first_s = time.monotonic() - started
        assert len(registrar.registered_at) == SCAN_CASES
        report("ingest.startup_scan_2000.registering", first_s, "s", "goal: <= 10 s")
        # a restart (or the periodic rescan): every case is already there
        started = time.monotonic()
        await watcher.scan()
        again_s = time.monotonic() - started
        report("ingest.startup_scan_2000.all_known", again_s, "s", "goal: <= 10 s")
