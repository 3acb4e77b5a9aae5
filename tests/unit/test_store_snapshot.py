"""The snapshot behind `status --json` and the TUI: its exact shape, its order, its size."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mqi_async.domain.model import BeamStatus, CaseStatus
from mqi_async.store import NewBeam, NewCase, Store, read_status_snapshot, status_document

CASE_KEYS = [
    "case_id", "room", "status", "progress", "error", "case_path", "beams", "qa", "deliveries"
]  # fmt: skip
PENDING_QA = {
    "status": "pending",
    "pass_rate_percent": None,
    "gamma_mean": None,
    "gamma_max": None,
    "evaluated_points": None,
    "reason": None,
    "report": None,
}
BEAM_KEYS = [
    "beam_id",
    "beam_number",
    "status",
    "host",
    "gpus",
    "attempts",
    "progress",
    "outputs",
    "error",
    "qa",
]


async def test_snapshot_has_the_contract_shape(tmp_path: Path) -> None:
    path = tmp_path / "mqi.db"
    async with await Store.open(path) as store:
        await store.register_case(
            NewCase(case_id="00000001", case_path="/abs/study", safe_name="00000001", room="G1"),
            [NewBeam(beam_index=1, beam_number=2), NewBeam(beam_index=2, beam_number=4)],
        )
        await store.register_case(NewCase(case_id="later", case_path="/x", safe_name="later"))
        await store.transition_case(
            "later", CaseStatus.FAILED, changes={"error": "missing_rtplan: …"}
        )
        await store.lease_gpus("00000001_beam_1", "gpu1", ["GPU-1"])
        await store.start_run(
            "00000001_beam_1", host="gpu1", gpu_uuids=["GPU-1"], job_dir_for=lambda a: f"/r/{a}"
        )
        await store.update_beam(
            "00000001_beam_1", {"outputs": ["/abs/work/dose/b1.dcm"], "progress": 100}
        )

        document = status_document(await store.snapshot())

    assert json.loads(json.dumps(document)) == document
    cases = document["cases"]
    assert isinstance(cases, list)
    assert [list(c) for c in cases] == [CASE_KEYS, CASE_KEYS]
    first, second = cases
    assert [list(b) for b in first["beams"]] == [BEAM_KEYS, BEAM_KEYS]
    assert {k: v for k, v in first.items() if k != "beams"} == {
        "case_id": "00000001",
        "room": "G1",
        "status": "pending",
        "progress": 0,
        "error": None,
        "case_path": "/abs/study",
        "qa": PENDING_QA,
        "deliveries": [],
    }
    assert first["beams"][0] == {
        "beam_id": "00000001_beam_1",
        "beam_number": 2,
        "status": "pending",
        "host": "gpu1",
        "gpus": ["GPU-1"],
        "attempts": 1,
        "progress": 100,
        "outputs": ["/abs/work/dose/b1.dcm"],
        "error": None,
        "qa": PENDING_QA,
    }
    assert first["beams"][1]["beam_number"] == 4
    assert second["case_id"] == "later" and second["beams"] == []
    assert second["status"] == "failed" and second["error"] == "missing_rtplan: …"


async def test_snapshot_is_ordered_by_creation_time(tmp_path: Path) -> None:
    times = iter(datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=m) for m in range(100))
    async with await Store.open(tmp_path / "mqi.db", now=lambda: next(times)) as store:
        for case_id in ("zz", "aa", "mm"):
            await store.register_case(
                NewCase(case_id=case_id, case_path="/p", safe_name=case_id),
                [NewBeam(beam_index=k, beam_number=9 - k) for k in (3, 1, 2)],
            )
        cases = await store.snapshot()
    assert [c.case_id for c in cases] == ["zz", "aa", "mm"]
    assert [b.beam_id for b in cases[0].beams] == ["zz_beam_1", "zz_beam_2", "zz_beam_3"]
    assert cases[0].created_at < cases[1].created_at < cases[2].created_at


async def test_ten_thousand_cases_load(tmp_path: Path) -> None:
    path = tmp_path / "mqi.db"
    async with await Store.open(path):
        pass
    # bulk rows straight into the schema the store made; registering them one by one
    # would time aiosqlite, not the snapshot
    base = datetime(2026, 1, 1, tzinfo=UTC)
    cases: list[tuple[object, ...]] = []
    beams: list[tuple[object, ...]] = []
    for n in range(10_000):
        case_id = f"{n:08d}"
        at = (base + timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        cases.append((case_id, case_id, f"/data/{case_id}", "G1", "processing", at, at))
        beams.extend(
            (f"{case_id}_beam_{k}", case_id, k, k + 1, "running", '["GPU-1"]', 1, at, at)
            for k in range(1, 5)
        )
    with sqlite3.connect(path) as raw:
        raw.executemany(
            "INSERT INTO cases (case_id, safe_name, case_path, room, status, created_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            cases,
        )
        raw.executemany(
            "INSERT INTO beams (beam_id, case_id, beam_index, beam_number, status, gpu_uuids,"
            " attempts, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            beams,
        )
    raw.close()

    async with await Store.open(path) as store:
        snapshot = await store.snapshot()
    from_cli = await read_status_snapshot(path)

    for loaded in (snapshot, from_cli):
        assert len(loaded) == 10_000
        assert sum(len(c.beams) for c in loaded) == 40_000
        assert loaded[0].case_id == "00000000" and loaded[-1].case_id == "00009999"
        last = loaded[-1]
        assert [b.beam_id for b in last.beams] == [f"00009999_beam_{k}" for k in range(1, 5)]
        assert all(b.status == BeamStatus.RUNNING and b.gpus == ("GPU-1",) for b in last.beams)
