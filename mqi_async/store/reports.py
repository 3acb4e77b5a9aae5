"""The `reports` table: each case's report files and the verdict state they show."""

from __future__ import annotations

import sqlite3
from datetime import datetime

from mqi_async.domain.records import ReportRow
from mqi_async.store.columns import decode_time, encode_time
from mqi_async.store.session import Session

REPORT_COLUMNS = "case_id, pdf, html, verdict, error, attempts, built_at"


def report_from_row(row: sqlite3.Row) -> ReportRow:
    return ReportRow(
        case_id=row["case_id"],
        pdf=row["pdf"],
        html=row["html"],
        verdict=row["verdict"],
        error=row["error"],
        attempts=row["attempts"],
        built_at=decode_time(row["built_at"]),
    )


class Reports:
    """Queries on `reports`; a case without a row has no report yet."""

    __slots__ = ("_s",)

    def __init__(self, session: Session) -> None:
        self._s = session

    async def get(self, case_id: str) -> ReportRow | None:
        rows = await self._s.rows(
            f"SELECT {REPORT_COLUMNS} FROM reports WHERE case_id = ?", (case_id,)
        )
        return report_from_row(rows[0]) if rows else None

    async def record_built(
        self, case_id: str, *, pdf: str, html: str, verdict: str, as_of: datetime
    ) -> None:
        """A built report; `as_of` is when its data was read (a verdict after it rebuilds)."""
        await self._s.execute(
            "INSERT INTO reports (case_id, pdf, html, verdict, error, attempts, built_at)"
            " VALUES (?, ?, ?, ?, NULL, 0, ?) ON CONFLICT (case_id) DO UPDATE SET"
            " pdf = excluded.pdf, html = excluded.html, verdict = excluded.verdict,"
            " error = NULL, attempts = 0, built_at = excluded.built_at",
            (case_id, pdf, html, verdict, encode_time(as_of)),
        )

    async def record_failed(self, case_id: str, *, error: str) -> int:
        """A failed build (the files of an earlier one stay listed); returns the tries."""
        await self._s.execute(
            "INSERT INTO reports (case_id, error, attempts, built_at)"
            " VALUES (?, ?, 1, ?) ON CONFLICT (case_id) DO UPDATE SET"
            " error = excluded.error, built_at = excluded.built_at,"
            " attempts = reports.attempts + 1",
            (case_id, error, self._s.at_text),
        )
        rows = await self._s.rows("SELECT attempts FROM reports WHERE case_id = ?", (case_id,))
        return int(rows[0][0]) if rows else 0

    async def stale_cases(self, max_attempts: int, limit: int) -> list[str]:
        """Finished treatment cases whose every check has its verdict, and whose report is
        missing, older than a verdict, or failed fewer than `max_attempts` times; oldest first.
        """
        rows = await self._s.rows(
            "SELECT c.case_id FROM cases c LEFT JOIN reports r ON r.case_id = c.case_id"
            " WHERE c.kind = 'treatment' AND c.status IN ('completed', 'failed', 'cancelled')"
            # every check final: the plan sum and each beam, and every delivery
            " AND (SELECT COUNT(*) FROM dose_checks d WHERE d.case_id = c.case_id"
            "  AND d.status != 'pending')"
            "  > (SELECT COUNT(*) FROM beams b WHERE b.case_id = c.case_id)"
            " AND NOT EXISTS (SELECT 1 FROM deliveries v WHERE v.case_id = c.case_id"
            "  AND v.qa_status = 'pending')"
            " AND (r.case_id IS NULL"
            "  OR (r.error IS NOT NULL AND r.attempts < ?)"
            "  OR r.built_at < (SELECT MAX(d.checked_at) FROM dose_checks d"
            "   WHERE d.case_id = c.case_id)"
            "  OR r.built_at < (SELECT MAX(v.qa_checked_at) FROM deliveries v"
            "   WHERE v.case_id = c.case_id))"
            " ORDER BY c.updated_at, c.rowid LIMIT ?",
            (max_attempts, limit),
        )
        return [r[0] for r in rows]
