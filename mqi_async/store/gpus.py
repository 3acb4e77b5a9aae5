"""The `gpus` table: the latest nvidia-smi sample of each host."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime

from mqi_async.domain.gpus import GpuSample
from mqi_async.store.columns import decode_time, encode_time
from mqi_async.store.session import Session


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuRow:
    """One GPU of a host as last sampled."""

    host: str
    uuid: str
    index: int
    name: str
    memory_total_mb: int
    memory_used_mb: int
    memory_free_mb: int
    temperature_c: int
    utilization_pct: int
    clock_mhz: int
    #: a compute process ran on this GPU while no lease held it (someone else's job, or a leak)
    has_foreign_process: bool
    sampled_at: datetime


_COLUMNS = (
    "host, uuid, gpu_index, name, memory_total_mb, memory_used_mb, memory_free_mb,"
    " temperature_c, utilization_pct, clock_mhz, has_foreign_process, sampled_at"
)


def _gpu_from(row: sqlite3.Row) -> GpuRow:
    return GpuRow(
        host=row["host"],
        uuid=row["uuid"],
        index=row["gpu_index"],
        name=row["name"],
        memory_total_mb=row["memory_total_mb"],
        memory_used_mb=row["memory_used_mb"],
        memory_free_mb=row["memory_free_mb"],
        temperature_c=row["temperature_c"],
        utilization_pct=row["utilization_pct"],
        clock_mhz=row["clock_mhz"],
        has_foreign_process=bool(row["has_foreign_process"]),
        sampled_at=decode_time(row["sampled_at"]),
    )


class Gpus:
    """Queries on `gpus`."""

    __slots__ = ("_s",)

    def __init__(self, session: Session) -> None:
        self._s = session

    async def record_sample(self, sample: GpuSample) -> None:
        """Replace the host's rows with this sample; GPUs that vanished from it are dropped.

        A GPU has a foreign process when the sample shows a compute process on it and no
        lease holds it: a leased GPU's processes are taken to be the lease owner's.
        """
        self._s.require_writable()
        leased = {
            r["uuid"]
            for r in await self._s.rows("SELECT uuid FROM leases WHERE host = ?", (sample.host,))
        }
        busy = {app.gpu_uuid for app in sample.apps}
        sampled_at = encode_time(sample.taken_at)
        await self._s.execute("DELETE FROM gpus WHERE host = ?", (sample.host,))
        await self._s.execute_many(
            f"INSERT OR REPLACE INTO gpus ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    sample.host,
                    g.uuid,
                    g.index,
                    g.name,
                    g.memory_total_mb,
                    g.memory_used_mb,
                    g.memory_free_mb,
                    g.temperature_c,
                    g.utilization_pct,
                    g.clock_mhz,
                    int(g.uuid in busy and g.uuid not in leased),
                    sampled_at,
                )
                for g in sample.gpus
            ],
        )

    async def find(self, host: str | None = None) -> list[GpuRow]:
        """GPUs by host and index, optionally of one host only."""
        if host is None:
            rows = await self._s.rows(f"SELECT {_COLUMNS} FROM gpus ORDER BY host, gpu_index")
        else:
            rows = await self._s.rows(
                f"SELECT {_COLUMNS} FROM gpus WHERE host = ? ORDER BY gpu_index", (host,)
            )
        return [_gpu_from(r) for r in rows]
