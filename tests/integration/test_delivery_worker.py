"""Delivery checks in the real warm worker and the engine's checker against a real database.

The worker is `python -m mqi_async.dose --serve`; a check that outlives
`qa.delivery.timeout_seconds` is stopped (its process group killed) and retried, and after
`retry.max_attempts` tries the delivery is a named `error`; a check that cannot be computed is
an `error` at once; a restart finds the same deliveries still pending.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mqi_async.config import QaSettings, ToolsSettings
from mqi_async.demo.cases import CaseSpec, WrittenCase, write_case
from mqi_async.domain.errors import PermanentError, TransientError
from mqi_async.domain.records import NewCase, NewDelivery
from mqi_async.domain.verdict import QaStatus
from mqi_async.engine.deliveries import DeliveryChecker, DeliveryCheckerSettings
from mqi_async.store import Store
from mqi_async.tools import DoseWorker, LocalToolRunner, Tools


def _runner(timeout_s: float) -> tuple[LocalToolRunner, DoseWorker]:
    worker = DoseWorker(
        timeout_s=timeout_s,
        failure_code="delivery_check_failed",
        timeout_code="delivery_check_timeout",
    )
    tools = ToolsSettings()
    runner = LocalToolRunner(Tools(tools), tools, {}, worker, qa_worker=worker, qa=QaSettings())
    return runner, worker


def _case(tmp_path: Path) -> WrittenCase:
    spec = CaseSpec(case_id="W1", beams=1, layers_per_beam=4, room="G2", nested=False)
    return write_case(tmp_path / "incoming", spec)


async def test_a_check_in_the_worker_returns_its_summary_and_writes_the_layer_table(
    tmp_path: Path,
) -> None:
    case = _case(tmp_path)
    assert case.rtplan_path is not None
    runner, worker = _runner(60)
    detail = tmp_path / "qa" / "d.json"
    try:
        result = await runner.check_delivery(
            folder=case.delivery_dirs[0],
            plan=case.rtplan_path,
            beam_number=case.beam_numbers[0],
            room="G2",
            detail_output=detail,
        )
        assert result["qa_status"] == "passed" and result["pass_rate_percent"] == 100.0
        table = json.loads(detail.read_text())
        assert [layer["layer"] for layer in table["layers"]] == [1, 2, 3, 4]
        assert table["criteria"]["dose_percent"] == 2.0
        # a record that cannot be read is the named, permanent error of the check
        next(case.delivery_dirs[0].glob("*.ptn")).write_bytes(b"\x00" * 15)
        with pytest.raises(PermanentError) as caught:
            await runner.check_delivery(
                folder=case.delivery_dirs[0],
                plan=case.rtplan_path,
                beam_number=case.beam_numbers[0],
                room="G2",
                detail_output=detail,
            )
        assert caught.value.code == "ptn_unreadable"
        with pytest.raises(PermanentError) as caught:
            await runner.check_delivery(
                folder=tmp_path / "gone",
                plan=case.rtplan_path,
                beam_number=1,
                room="G2",
                detail_output=detail,
            )
        assert caught.value.code == "delivery_folder_missing"
    finally:
        await worker.aclose()


async def test_a_check_past_its_timeout_is_stopped_retried_then_named(tmp_path: Path) -> None:
    case = _case(tmp_path)
    assert case.rtplan_path is not None
    # shorter than the worker's own start (importing numpy and pydicom)
    runner, worker = _runner(0.05)
    store = await Store.open(tmp_path / "mqi.db")
    try:
        await store.register_case(
            NewCase(case_id="W1", case_path=str(case.case_path), room="G2", safe_name="W1")
        )
        await store.attach_plan(
            "W1",
            beams=[],
            deliveries=[
                NewDelivery(
                    delivery_id="W1/d1",
                    delivery_path=str(case.delivery_dirs[0]),
                    delivered_at=datetime.now(UTC),
                    fraction_index=1,
                    raw_beam_number=case.beam_numbers[0],
                )
            ],
            plan_path=str(case.rtplan_path),
        )
        settings = DeliveryCheckerSettings(
            enabled=True,
            work_directory=tmp_path / "work",
            max_attempts=2,
            backoff_initial_s=0.01,
            backoff_max_s=0.01,
        )
        checker = DeliveryChecker(store=store, tools=runner, settings=settings)
        waiting = await checker.check_pending()
        assert waiting  # the first timeout is retried after a backoff
        (row,) = await store.list_deliveries("W1")
        assert row.qa_status is QaStatus.PENDING and row.qa_attempts == 1
        assert row.qa_reason is not None and row.qa_reason.startswith("delivery_check_timeout")
        # a restart: a new checker finds it still pending and tries once more
        checker = DeliveryChecker(store=store, tools=runner, settings=settings)
        assert await checker.check_pending() == []
        (row,) = await store.list_deliveries("W1")
        assert row.qa_status is QaStatus.ERROR and row.qa_attempts == 2
        assert row.qa_reason is not None and row.qa_reason.startswith("delivery_check_timeout")
        events = [e.message for e in await store.recent_events(case_id="W1")]
        assert any("error delivery_check_timeout" in m for m in events)
        with pytest.raises(TransientError):
            await runner.check_delivery(
                folder=case.delivery_dirs[0],
                plan=case.rtplan_path,
                beam_number=case.beam_numbers[0],
                room="G2",
                detail_output=tmp_path / "x.json",
            )
    finally:
        await worker.aclose()
        await store.aclose()
