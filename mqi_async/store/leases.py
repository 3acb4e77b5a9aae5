"""The `leases` table: which beam holds which GPU; taken all-or-nothing with the owner set."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from mqi_async.domain.records import LeaseRow
from mqi_async.store import events
from mqi_async.store.beams import TERMINAL_STATUSES, Beams, placeholders
from mqi_async.store.columns import decode_time
from mqi_async.store.session import Session

_NAMES = ("host", "uuid", "beam_id", "attempt", "leased_at")
_COLUMNS = ", ".join(_NAMES)


def _lease_from(row: sqlite3.Row) -> LeaseRow:
    return LeaseRow(
        host=row["host"],
        uuid=row["uuid"],
        beam_id=row["beam_id"],
        attempt=row["attempt"],
        leased_at=decode_time(row["leased_at"]),
    )


class Leases:
    """Queries on `leases`."""

    __slots__ = ("_beams", "_events", "_s")

    def __init__(self, session: Session) -> None:
        self._s = session
        self._beams = Beams(session)
        self._events = events.Events(session)

    async def take(self, beam_id: str, host: str, uuids: Sequence[str]) -> bool:
        """Lease every GPU in `uuids` on `host` to `beam_id`, or none of them.

        Returns False, writing nothing, when any of them is held by another beam. GPUs the
        beam already holds count as taken by it.

        Raises:
            ValueError: `uuids` is empty or repeats a GPU.
            LookupError: no such beam.
        """
        self._s.require_writable()
        if not uuids or len(set(uuids)) != len(uuids):
            raise ValueError(f"a lease needs distinct GPU uuids, got {list(uuids)}")
        beam = await self._beams.require(beam_id)
        held = await self._s.rows(
            f"SELECT uuid, beam_id FROM leases WHERE host = ? AND uuid IN"
            f" ({placeholders(len(uuids))})",
            (host, *uuids),
        )
        if any(r["beam_id"] != beam_id for r in held):
            return False
        mine = {r["uuid"] for r in held}
        await self._s.execute_many(
            f"INSERT INTO leases ({_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
            [
                (host, uuid, beam_id, beam.attempts + 1, self._s.at_text)
                for uuid in uuids
                if uuid not in mine
            ],
        )
        return True

    async def release(self, beam_id: str) -> int:
        """Give back every GPU the beam holds; returns how many."""
        return await self._s.execute("DELETE FROM leases WHERE beam_id = ?", (beam_id,))

    async def sweep(self) -> list[LeaseRow]:
        """Release leases whose owner beam has ended (completed, failed, cancelled).

        Each released lease is logged as a `lease_swept` event; they are leaks of a step
        that did not release its GPUs.
        """
        self._s.require_writable()
        rows = await self._s.rows(
            f"SELECT {', '.join('l.' + c for c in _NAMES)}, b.case_id,"
            " b.status FROM leases AS l JOIN beams AS b ON b.beam_id = l.beam_id"
            f" WHERE b.status IN ({placeholders(len(TERMINAL_STATUSES))})"
            " ORDER BY l.host, l.uuid",
            TERMINAL_STATUSES,
        )
        swept: list[LeaseRow] = []
        for row in rows:
            lease = _lease_from(row)
            await self._s.execute(
                "DELETE FROM leases WHERE host = ? AND uuid = ?", (lease.host, lease.uuid)
            )
            await self._events.append(
                events.LEASE_SWEPT,
                f"released GPU {lease.uuid} on {lease.host} held by a {row['status']} beam",
                case_id=row["case_id"],
                beam_id=lease.beam_id,
                data={"host": lease.host, "uuid": lease.uuid, "attempt": lease.attempt},
            )
            swept.append(lease)
        return swept

    async def find(self, *, beam_id: str | None = None) -> list[LeaseRow]:
        """Every lease, or those of one beam, by host and GPU."""
        if beam_id is None:
            rows = await self._s.rows(f"SELECT {_COLUMNS} FROM leases ORDER BY host, uuid")
        else:
            rows = await self._s.rows(
                f"SELECT {_COLUMNS} FROM leases WHERE beam_id = ? ORDER BY host, uuid", (beam_id,)
            )
        return [_lease_from(r) for r in rows]
