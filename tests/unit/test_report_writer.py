"""The engine's report loop: which cases it hands to the report tool, and its backing off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mqi_async.domain.errors import TransientError
from mqi_async.domain.model import CaseStatus
from mqi_async.domain.records import NewDelivery
from mqi_async.domain.verdict import QaStatus
from mqi_async.engine.reports import ReportWriter, ReportWriterSettings
from mqi_async.store import NewBeam, NewCase, Store


class ReportTool:
    """The LocalTools report step: records its calls, fails while told to (the real one runs
    `python -m mqi_async.report`, covered by tests/integration/test_reports.py)."""

    def __init__(self, store: Store, failures: int) -> None:
        self.store = store
        self.failures = failures
        self.calls: list[tuple[str, Path]] = []

    async def build_report(self, *, case_id: str, log_dir: Path) -> dict[str, object]:
        self.calls.append((case_id, log_dir))
        if self.failures:
            self.failures -= 1
            raise TransientError("report_failed", "exit 1: boom")
        _, as_of = await self.store.case_snapshot(case_id)
        await self.store.record_report(
            case_id, pdf=f"/w/{case_id}.pdf", html=f"/w/{case_id}.html", verdict="passed",
            as_of=as_of,
        )  # fmt: skip
        return {"ok": True, "pdf": f"/w/{case_id}.pdf", "verdict": "passed"}


async def _judged_case(store: Store, case_id: str) -> None:
    await store.register_case(
        NewCase(case_id=case_id, case_path=f"/s/{case_id}", safe_name=f"safe_{case_id}",
                plan_path="/p", status=CaseStatus.COMPLETED),
        [NewBeam(beam_index=1, beam_number=1)],
        [NewDelivery(delivery_id=f"{case_id}-d", delivery_path="/s/d", fraction_index=1)],
    )  # fmt: skip
    for beam in (f"{case_id}_beam_1", None):
        await store.record_dose_check(case_id, beam, status=QaStatus.PASSED)
    (delivery,) = await store.list_deliveries(case_id)
    await store.record_delivery_check(delivery, status=QaStatus.PASSED, result={})


async def test_writer_builds_due_reports_once_and_backs_off_after_a_failure(
    tmp_path: Path,
) -> None:
    async with await Store.open(tmp_path / "mqi.db") as store:
        await _judged_case(store, "C1")
        tool = ReportTool(store, failures=1)
        writer = ReportWriter(
            store=store,
            tools=tool,  # type: ignore[arg-type]
            settings=ReportWriterSettings(work_directory=tmp_path / "work", backoff_initial_s=60),
        )
        await writer.write_due()
        assert tool.calls == [("C1", tmp_path / "work" / "safe_C1" / "logs")]
        failed: Any = await store.get_report("C1")
        assert failed.error == "report_failed: exit 1: boom" and failed.attempts == 1
        await writer.write_due()  # backing off: not tried again yet
        assert len(tool.calls) == 1

        fresh = ReportWriter(
            store=store, tools=tool,  # type: ignore[arg-type]
            settings=ReportWriterSettings(work_directory=tmp_path / "work"),
        )  # fmt: skip
        await fresh.write_due()  # after a restart the case is due again, and now it works
        await fresh.write_due()
        assert len(tool.calls) == 2
        built: Any = await store.get_report("C1")
        assert built.pdf == "/w/C1.pdf" and built.error is None and built.attempts == 0
