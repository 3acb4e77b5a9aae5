"""The `dose_checks` table: each beam's planned-vs-delivered verdict and each case's plan sum."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping

from mqi_async.domain.records import DoseCheckRow
from mqi_async.domain.verdict import QaStatus
from mqi_async.store.columns import decode_optional_time
from mqi_async.store.session import Session

DOSE_CHECK_COLUMNS = "case_id, beam_id, status, reason, result, checked_at"


def dose_check_from_row(row: sqlite3.Row) -> DoseCheckRow:
    result = row["result"]
    return DoseCheckRow(
        case_id=row["case_id"],
        beam_id=row["beam_id"],
        status=QaStatus(row["status"]),
        reason=row["reason"],
        result=json.loads(result) if result else None,
        checked_at=decode_optional_time(row["checked_at"]),
    )


class DoseChecks:
    """Queries on `dose_checks`; a subject without a row is still pending."""

    __slots__ = ("_s",)

    def __init__(self, session: Session) -> None:
        self._s = session

    async def of_case(self, case_id: str) -> list[DoseCheckRow]:
        rows = await self._s.rows(
            f"SELECT {DOSE_CHECK_COLUMNS} FROM dose_checks WHERE case_id = ?", (case_id,)
        )
        return [dose_check_from_row(r) for r in rows]

    async def record(
        self,
        case_id: str,
        beam_id: str | None,
        *,
        status: QaStatus,
        reason: str | None,
        result: Mapping[str, object] | None,
    ) -> None:
        await self._s.execute(
            "INSERT INTO dose_checks (subject_id, case_id, beam_id, status, reason, result,"
            " checked_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (subject_id) DO UPDATE SET"
            " status = excluded.status, reason = excluded.reason, result = excluded.result,"
            " checked_at = excluded.checked_at",
            (
                beam_id or case_id,
                case_id,
                beam_id,
                str(status),
                reason,
                None if result is None else json.dumps(result, separators=(",", ":")),
                self._s.at_text,
            ),
        )

    async def reset(self, case_id: str) -> int:
        """The case's checks are pending again (a retry or a re-run)."""
        return await self._s.execute("DELETE FROM dose_checks WHERE case_id = ?", (case_id,))

    async def unchecked_cases(self, columns: str, limit: int) -> list[sqlite3.Row]:
        """Treatment cases with a plan whose plan-sum check has no verdict yet, oldest first."""
        return await self._s.rows(
            f"SELECT {columns} FROM cases c WHERE c.kind = 'treatment'"
            " AND c.plan_path IS NOT NULL AND NOT EXISTS"
            " (SELECT 1 FROM dose_checks d WHERE d.subject_id = c.case_id)"
            " ORDER BY c.created_at, c.rowid LIMIT ?",
            (limit,),
        )
