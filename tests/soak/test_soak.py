"""Soak (`make soak`, outside `make test`): 200 cases / 800 beams through the real sshd with 10 %
random MOQUI failures, 5 SIGKILLs of the service at random moments and one host outage.

Every beam must end completed or failed with a named code; the MOQUI starts counted on the host
must equal the launched run rows (each a beam's first run or a retry); no lease may be left.
"""

from __future__ import annotations

import collections
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from mqi_async.domain.errors import FAILURES
from tests.e2e import make_rig, spawn_service, wait_status
from tests.sshd import SshdServer

CASES = 200
BEAMS = 4
KILLS = 5


def _known_code(error: str) -> bool:
    code = error.split(":", 1)[0]
    return code in FAILURES or code.startswith(("moqui_exit_", "moqui_signal_"))


@pytest.mark.timeout(3600)
def test_soak(tmp_path: Path, sshd: SshdServer) -> None:
    rng = random.Random(20261204)
    rig = make_rig(
        tmp_path / "rig", sshd, gpus=4, run_seconds=0.2,
        overrides={
            "ingest": {"rescan_seconds": 10},
            "gpu": {"poll_seconds": 1},
            "retry": {"max_attempts": 3, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 2},
            "logging": {"directory": "logs", "level": "INFO"},
        },
        sim_env={"MQI_SIM_FAIL_RATE": "0.1"},
    )  # fmt: skip
    started = time.monotonic()
    for i in range(CASES):
        rig.drop_case(f"SOAK{i:03d}", beams=BEAMS, seed=i)
    print(f"soak: {CASES} cases written in {time.monotonic() - started:.0f} s")
    outage_after = rng.randrange(KILLS)
    started = time.monotonic()
    for k in range(KILLS):
        proc = spawn_service(rig, f"service{k}.out")
        time.sleep(rng.uniform(15, 40))
        if k == outage_after:
            sshd.stop()
            time.sleep(10)
            sshd.start()
            time.sleep(rng.uniform(2, 8))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    proc = spawn_service(rig, "service-final.out")
    try:
        doc = wait_status(
            rig,
            lambda d: (
                len(d["cases"]) == CASES
                and all(c["status"] in ("completed", "failed") for c in d["cases"])
            ),
            timeout_s=3000,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    took_s = time.monotonic() - started
    beams = [b for c in doc["cases"] for b in c["beams"]]
    statuses = collections.Counter(b["status"] for b in beams)
    assert len(beams) == CASES * BEAMS
    assert set(statuses) <= {"completed", "failed"}
    failed = [b for b in beams if b["status"] == "failed"]
    assert all(b["error"] and _known_code(b["error"]) for b in failed)
    codes = collections.Counter(b["error"].split(":", 1)[0] for b in failed)
    starts = len((rig.state_dir / "starts.log").read_text().splitlines())
    with sqlite3.connect(rig.db) as db:
        leases = db.execute("SELECT COUNT(*) FROM leases").fetchone()[0]
        runs = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        launched = db.execute("SELECT COUNT(*) FROM runs WHERE job_id IS NOT NULL").fetchone()[0]
        open_runs = db.execute(
            "SELECT COUNT(*) FROM runs WHERE status IN ('launching', 'running')"
        ).fetchone()[0]
    retries = runs - len(beams)
    print(
        f"soak: {len(beams)} beams in {took_s:.0f} s: {dict(statuses)}; failed by code {dict(codes)}; "
        f"MOQUI starts on the host {starts}, run rows {runs} (= {len(beams)} beams + {retries} "
        f"retries), launched {launched}, open {open_runs}, leases left {leases}"
    )
    assert leases == 0 and open_runs == 0
    assert starts == launched == runs
