"""The `deliveries` table: a case's delivery folders, grouped into fractions, linked to beams."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime

from mqi_async.domain.records import DeliveryRow, DeliveryToCheck, NewDelivery
from mqi_async.domain.verdict import QaStatus
from mqi_async.store.beams import beam_id_for
from mqi_async.store.columns import decode_optional_time, encode_time
from mqi_async.store.session import Session

DELIVERY_COLUMNS = (
    "delivery_id, case_id, beam_id, delivery_path, delivered_at, fraction_index,"
    " raw_beam_number, treatment_beam_index, is_reference, qa_status, qa_reason, qa_result,"
    " qa_detail_path, qa_checked_at, qa_attempts"
)


def delivery_from_row(row: sqlite3.Row) -> DeliveryRow:
    result = row["qa_result"]
    return DeliveryRow(
        delivery_id=row["delivery_id"],
        case_id=row["case_id"],
        beam_id=row["beam_id"],
        delivery_path=row["delivery_path"],
        delivered_at=decode_optional_time(row["delivered_at"]),
        fraction_index=row["fraction_index"],
        raw_beam_number=row["raw_beam_number"],
        treatment_beam_index=row["treatment_beam_index"],
        is_reference=bool(row["is_reference"]),
        qa_status=QaStatus(row["qa_status"]),
        qa_reason=row["qa_reason"],
        qa_result=json.loads(result) if result else None,
        qa_detail_path=row["qa_detail_path"],
        qa_checked_at=decode_optional_time(row["qa_checked_at"]),
        qa_attempts=row["qa_attempts"],
    )


def _beam_of(case_id: str, index: int | None, beam_indexes: Collection[int]) -> str | None:
    if index is None or index not in beam_indexes:
        return None
    return beam_id_for(case_id, index)


class Deliveries:
    """Queries on `deliveries`."""

    __slots__ = ("_s",)

    def __init__(self, session: Session) -> None:
        self._s = session

    async def insert_many(
        self,
        case_id: str,
        deliveries: Sequence[NewDelivery],
        beam_indexes: Collection[int],
        *,
        only_new: bool = False,
    ) -> None:
        """Add deliveries; each is linked to its beam when `beam_indexes` has that beam.

        With `only_new`, deliveries already recorded are left as they are.
        """
        verb = "INSERT OR IGNORE" if only_new else "INSERT"
        await self._s.execute_many(
            f"{verb} INTO deliveries (delivery_id, case_id, beam_id, delivery_path, delivered_at,"
            " fraction_index, raw_beam_number, treatment_beam_index, is_reference)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    d.delivery_id,
                    case_id,
                    _beam_of(case_id, d.treatment_beam_index, beam_indexes),
                    d.delivery_path,
                    None if d.delivered_at is None else encode_time(d.delivered_at),
                    d.fraction_index,
                    d.raw_beam_number,
                    d.treatment_beam_index,
                    int(d.is_reference),
                )
                for d in deliveries
            ],
        )

    async def of_case(self, case_id: str) -> list[DeliveryRow]:
        """The deliveries of one case, by fraction (unassigned last), then time, then id."""
        rows = await self._s.rows(
            f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE case_id = ?"
            " ORDER BY fraction_index IS NULL, fraction_index, delivered_at, delivery_id",
            (case_id,),
        )
        return [delivery_from_row(r) for r in rows]

    async def ids_of(self, case_id: str) -> set[str]:
        rows = await self._s.rows(
            "SELECT delivery_id FROM deliveries WHERE case_id = ?", (case_id,)
        )
        return {r["delivery_id"] for r in rows}

    async def to_check(self, limit: int) -> list[DeliveryToCheck]:
        """Pending deliveries of cases with a plan that were not cancelled, oldest first."""
        columns = ", ".join(f"d.{c.strip()}" for c in DELIVERY_COLUMNS.split(","))
        rows = await self._s.rows(
            f"SELECT {columns}, c.room AS case_room, c.plan_path AS case_plan,"
            " c.safe_name AS case_safe_name FROM deliveries d"
            " JOIN cases c ON c.case_id = d.case_id"
            " WHERE d.qa_status = ? AND c.plan_path IS NOT NULL AND c.status != 'cancelled'"
            " ORDER BY d.delivered_at IS NULL, d.delivered_at, d.delivery_id LIMIT ?",
            (str(QaStatus.PENDING), limit),
        )
        return [
            DeliveryToCheck(
                delivery=delivery_from_row(r),
                room=r["case_room"],
                plan_path=r["case_plan"],
                case_safe_name=r["case_safe_name"],
            )
            for r in rows
        ]

    async def record_check(
        self,
        delivery_id: str,
        *,
        status: QaStatus,
        reason: str | None,
        result: Mapping[str, object] | None,
        detail_path: str | None,
        at: datetime,
    ) -> None:
        await self._s.execute(
            "UPDATE deliveries SET qa_status = ?, qa_reason = ?, qa_result = ?,"
            " qa_detail_path = ?, qa_checked_at = ? WHERE delivery_id = ?",
            (
                str(status),
                reason,
                None if result is None else json.dumps(result, separators=(",", ":")),
                detail_path,
                encode_time(at),
                delivery_id,
            ),
        )

    async def count_attempt(self, delivery_id: str, reason: str) -> int:
        """One more failed try of a delivery's check; returns the tries so far."""
        await self._s.execute(
            "UPDATE deliveries SET qa_attempts = qa_attempts + 1, qa_reason = ?"
            " WHERE delivery_id = ?",
            (reason, delivery_id),
        )
        rows = await self._s.rows(
            "SELECT qa_attempts FROM deliveries WHERE delivery_id = ?", (delivery_id,)
        )
        return int(rows[0]["qa_attempts"]) if rows else 0

    async def reset_checks(self, case_id: str) -> int:
        """Every delivery of a case back to pending (a retry or a re-run of the checks)."""
        return await self._s.execute(
            "UPDATE deliveries SET qa_status = ?, qa_reason = NULL, qa_result = NULL,"
            " qa_detail_path = NULL, qa_checked_at = NULL, qa_attempts = 0 WHERE case_id = ?",
            (str(QaStatus.PENDING), case_id),
        )
