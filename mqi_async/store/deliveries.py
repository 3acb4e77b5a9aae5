"""The `deliveries` table: a case's delivery folders, grouped into fractions, linked to beams."""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

from mqi_async.domain.records import NewDelivery
from mqi_async.store.beams import beam_id_for
from mqi_async.store.columns import decode_optional_time, encode_time
from mqi_async.store.session import Session


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryRow:
    delivery_id: str
    case_id: str
    beam_id: str | None
    delivery_path: str
    delivered_at: datetime | None
    fraction_index: int | None
    raw_beam_number: int | None
    treatment_beam_index: int | None
    is_reference: bool


_COLUMNS = (
    "delivery_id, case_id, beam_id, delivery_path, delivered_at, fraction_index,"
    " raw_beam_number, treatment_beam_index, is_reference"
)


def _delivery_from(row: sqlite3.Row) -> DeliveryRow:
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
        self, case_id: str, deliveries: Sequence[NewDelivery], beam_indexes: Collection[int]
    ) -> None:
        """Add deliveries; each is linked to its beam when `beam_indexes` has that beam."""
        await self._s.execute_many(
            "INSERT INTO deliveries (delivery_id, case_id, beam_id, delivery_path, delivered_at,"
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
            f"SELECT {_COLUMNS} FROM deliveries WHERE case_id = ?"
            " ORDER BY fraction_index IS NULL, fraction_index, delivered_at, delivery_id",
            (case_id,),
        )
        return [_delivery_from(r) for r in rows]
