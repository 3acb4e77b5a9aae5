"""Which cases need their report written: every check final, and the report missing or older."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from mqi_async.domain.model import CaseStatus
from mqi_async.domain.records import NewDelivery
from mqi_async.domain.verdict import QaStatus
from mqi_async.store import NewBeam, NewCase, Store


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


async def _finished_case(store: Store, case_id: str) -> None:
    await store.register_case(
        NewCase(case_id=case_id, case_path=f"/s/{case_id}", safe_name=case_id, plan_path="/p",
                status=CaseStatus.COMPLETED),
        [NewBeam(beam_index=1, beam_number=1)],
        [NewDelivery(delivery_id=f"{case_id}-d1", delivery_path=f"/s/{case_id}/d1",
                     fraction_index=1, raw_beam_number=1, treatment_beam_index=1)],
    )  # fmt: skip


async def test_a_report_is_due_once_every_check_is_final_and_again_after_a_new_verdict(
    tmp_path: Path,
) -> None:
    clock = Clock()
    async with await Store.open(tmp_path / "mqi.db", now=clock) as store:
        await _finished_case(store, "C1")
        assert await store.cases_to_report(max_attempts=3) == []  # nothing judged yet
        await store.record_dose_check("C1", "C1_beam_1", status=QaStatus.PASSED)
        await store.record_dose_check("C1", None, status=QaStatus.PASSED)
        assert await store.cases_to_report(max_attempts=3) == []  # the delivery is pending
        (delivery,) = await store.list_deliveries("C1")
        await store.record_delivery_check(delivery, status=QaStatus.FAILED, result={})
        assert await store.cases_to_report(max_attempts=3) == ["C1"]

        snapshot, as_of = await store.case_snapshot("C1")
        assert snapshot is not None and snapshot.qa.status == QaStatus.FAILED
        await store.record_report("C1", pdf="/w/C1/report.pdf", html="/w/C1/report.html",
                                  verdict="failed", as_of=as_of)  # fmt: skip
        assert await store.cases_to_report(max_attempts=3) == []
        assert (await store.case_snapshot("C1"))[0].report == "/w/C1/report.pdf"  # type: ignore[union-attr]

        # a re-check: pending again (not due), then a new verdict after the report (due)
        await store.reset_delivery_checks("C1", message="re-check")
        assert await store.cases_to_report(max_attempts=3) == []
        (delivery,) = await store.list_deliveries("C1")
        await store.record_delivery_check(delivery, status=QaStatus.PASSED, result={})
        assert await store.cases_to_report(max_attempts=3) == ["C1"]


async def test_a_failing_report_is_tried_max_attempts_times_and_keeps_the_last_files(
    tmp_path: Path,
) -> None:
    async with await Store.open(tmp_path / "mqi.db", now=Clock()) as store:
        await _finished_case(store, "C2")
        for beam in ("C2_beam_1", None):
            await store.record_dose_check("C2", beam, status=QaStatus.PASSED)
        (delivery,) = await store.list_deliveries("C2")
        await store.record_delivery_check(delivery, status=QaStatus.PASSED, result={})
        assert await store.record_report_failure("C2", error="report_failed: boom") == 1
        assert await store.cases_to_report(max_attempts=2) == ["C2"]
        assert await store.record_report_failure("C2", error="report_failed: boom") == 2
        assert await store.cases_to_report(max_attempts=2) == []
        row = await store.get_report("C2")
        assert row is not None and row.pdf is None and row.error == "report_failed: boom"
        # `status` shows no report while none was ever written
        assert (await store.case_snapshot("C2"))[0].report is None  # type: ignore[union-attr]
