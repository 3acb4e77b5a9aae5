"""Retention keeps a case's report: the work folder goes after `work_days`, the record stays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from mqi_async.domain.model import CaseStatus
from mqi_async.domain.privacy import case_key
from mqi_async.domain.retention import RetentionPolicy
from mqi_async.engine.retention import RetentionSettings, RetentionSweeper
from mqi_async.store import NewCase, Store


class Later:
    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(days=3)

    def monotonic(self) -> float:
        return 0.0


def _folder(root: Path, name: str, *, report: bool) -> Path:
    case = root / name
    (case / "dose").mkdir(parents=True)
    (case / "dose" / "beam_1.dcm").write_bytes(b"x" * 100)
    (case / "qa").mkdir()
    (case / "qa" / "plan_gamma.npy").write_bytes(b"y")
    if report:
        (case / "report.pdf").write_bytes(b"%PDF")
        (case / "report.html").write_text("<html></html>")
    return case


async def test_a_finished_cases_work_folder_goes_but_its_report_stays(tmp_path: Path) -> None:
    work, scan = tmp_path / "work", tmp_path / "scan"
    scan.mkdir()
    reported = _folder(work, "REPORTED", report=True)
    plain = _folder(work, "PLAIN", report=False)
    async with await Store.open(tmp_path / "mqi.db") as store:
        for name in ("REPORTED", "PLAIN"):
            await store.register_case(
                NewCase(case_id=name, case_path=str(scan / name), safe_name=name,
                        status=CaseStatus.COMPLETED),
            )  # fmt: skip
        sweeper = RetentionSweeper(
            store=store,
            hosts={},
            clock=Later(),  # type: ignore[arg-type]
            settings=RetentionSettings(
                policy=RetentionPolicy(remote_failed_days=1, work_days=1),
                sweep_s=3600,
                work_directory=work,
                scan_directory=scan,
            ),
            case_key=lambda case: case_key(b"k" * 32, case.case_id),
        )
        assert await sweeper.sweep() == 2
        assert await sweeper.sweep() == 0
        events = [e for e in await store.recent_events(50) if e.kind == "retention_removed"]
    assert sorted(p.name for p in reported.iterdir()) == ["report.html", "report.pdf"]
    assert not plain.exists()
    kept = {e.case_id: (e.data or {}).get("kept") for e in events}
    assert kept == {"REPORTED": ["report.pdf", "report.html"], "PLAIN": []}
