"""SIGKILL the service at random moments across a run: nothing is lost, nothing runs twice."""

from __future__ import annotations

import collections
import json
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from mqi_async.domain.model import BEAM_TRANSITIONS, BeamStatus
from tests.e2e import beam_statuses, make_rig, spawn_service, wait_for_log, wait_status
from tests.sshd import SshdServer

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

KILLS = 10


def test_sigkill_at_ten_random_moments(tmp_path: Path, sshd: SshdServer) -> None:
    rng = random.Random(20261129)
    rig = make_rig(tmp_path / "rig", sshd, gpus=4, run_seconds=2.5)
    for i in range(4):
        rig.drop_case(f"CHAOS{i}", beams=2)
    hit: collections.Counter[str] = collections.Counter()
    for k in range(KILLS):
        proc = spawn_service(rig, f"service{k}.out")
        # early kills land in start-up and ingest, later ones in runs and downloads
        time.sleep(rng.uniform(0.5, 2.0) if k < 3 else rng.uniform(2.0, 6.0))
        phases = set(beam_statuses(rig)) or {"ingest"}
        hit.update(phases)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    proc = spawn_service(rig, "service-final.out")
    try:
        doc = wait_status(
            rig,
            lambda d: len(d["cases"]) == 4 and all(c["status"] == "completed" for c in d["cases"]),
            timeout_s=240,
        )
        # a SIGTERM before Python has even started would not reach the service's handler
        wait_for_log(rig.root / "service-final.out", "mqi-async running")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    beams = [b for c in doc["cases"] for b in c["beams"]]
    assert len(beams) == 8
    assert all(b["status"] == "completed" and len(b["outputs"]) == 1 for b in beams)
    with sqlite3.connect(rig.db) as db:
        assert db.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0
        runs = db.execute(
            "SELECT beam_id, attempt, status, error FROM runs ORDER BY beam_id, attempt"
        ).fetchall()
        events = db.execute(
            "SELECT beam_id, data FROM events WHERE kind = 'beam_status' ORDER BY event_id"
        ).fetchall()
    # every launch is accounted for: one run per beam unless an earlier attempt really died
    per_beam = collections.defaultdict(list)
    for beam_id, attempt, status, error in runs:
        per_beam[beam_id].append((attempt, status, error))
    for beam_id, attempts in per_beam.items():
        *earlier, last = attempts
        assert last[1] == "succeeded", (beam_id, attempts)
        assert all(st in ("lost", "failed", "killed") for _, st, _ in earlier), (beam_id, attempts)
    # the audit trail of each beam is one connected path through the transition table
    trail = collections.defaultdict(list)
    for beam_id, data in events:
        d = json.loads(data)
        trail[beam_id].append((BeamStatus(d["from"]), BeamStatus(d["to"])))
    for beam_id, steps in trail.items():
        assert steps[0][0] == BeamStatus.PENDING, beam_id
        assert steps[-1][1] == BeamStatus.COMPLETED, beam_id
        for (_, b), (c, _) in zip(steps, steps[1:], strict=False):
            assert b == c, (beam_id, steps)
        for a, b in steps:
            assert b == a or b in BEAM_TRANSITIONS[a], (beam_id, a, b)
    total_launches = sum(len(v) for v in per_beam.values())
    print(
        f"\nchaos: {KILLS} SIGKILLs; phases hit {dict(hit)}; 4 cases, 8 beams, {total_launches} launches"
    )
    assert total_launches == 8


async def test_sshd_down_for_thirty_seconds(tmp_path: Path, sshd: SshdServer) -> None:
    from tests.e2e import running_service, statuses, wait_until

    rig = make_rig(tmp_path / "rig", sshd, gpus=4, run_seconds=6)
    rig.drop_case("OUTAGE1", beams=2)
    rig.drop_case("OUTAGE2", beams=2)
    async with running_service(rig.settings()) as svc:

        async def running() -> bool:
            return (
                sum(1 for c in await svc.store.snapshot() for b in c.beams if b.status == "running")
                >= 2
            )

        await wait_until(running, timeout_s=90, what="beams running")
        sshd.stop()
        down_at = time.monotonic()
        try:

            async def paused() -> bool:
                beams = [b for c in await svc.store.snapshot() for b in c.beams]
                return any(b.status == "paused" for b in beams)

            await wait_until(paused, timeout_s=30, what="beams paused")
            remaining = 30 - (time.monotonic() - down_at)
            if remaining > 0:
                import asyncio

                await asyncio.sleep(remaining)
            beams = [b for c in await svc.store.snapshot() for b in c.beams]
            assert not any(b.status in ("failed", "cancelled") for b in beams)
        finally:
            sshd.start()

        async def done() -> bool:
            st = await statuses(svc)
            return len(st) == 2 and all(v == "completed" for v in st.values())

        await wait_until(done, timeout_s=180, what="completion after the outage")
        beams = [b for c in await svc.store.snapshot() for b in c.beams]
        assert await svc.store.list_leases() == []
    # runs that were going when the host vanished finished on their own and were collected
    assert sum(b.attempts for b in beams) == 4
