"""The `hosts` table: each GPU host's last known state, so `status` shows a paused host."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from mqi_async.store.columns import decode_time, encode_time
from mqi_async.store.session import Session


@dataclass(frozen=True, slots=True, kw_only=True)
class HostRow:
    name: str
    #: "connected", "paused" or "starting"
    state: str
    #: the named error that paused it (e.g. `host_key_mismatch: …`), None when connected
    error: str | None
    updated_at: datetime
    #: a batch cluster's queue in one line (slurm); None for GPU servers
    detail: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "state": self.state, "error": self.error}


class Hosts:
    """Queries on `hosts`."""

    __slots__ = ("_s",)

    def __init__(self, session: Session) -> None:
        self._s = session

    async def record(self, name: str, state: str, error: str | None) -> None:
        self._s.require_writable()
        await self._s.execute(
            "INSERT INTO hosts (name, state, error, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET state = excluded.state, error = excluded.error,"
            " updated_at = excluded.updated_at",
            (name, state, error, encode_time(self._s.at)),
        )

    async def record_detail(self, name: str, detail: str | None) -> None:
        self._s.require_writable()
        await self._s.execute(
            "INSERT INTO hosts (name, state, error, updated_at, detail)"
            " VALUES (?, 'connected', NULL, ?, ?)"
            " ON CONFLICT (name) DO UPDATE SET detail = excluded.detail",
            (name, encode_time(self._s.at), detail),
        )

    async def find(self) -> list[HostRow]:
        rows = await self._s.rows(
            "SELECT name, state, error, updated_at, detail FROM hosts ORDER BY name"
        )
        return [
            HostRow(
                name=r["name"],
                state=r["state"],
                error=r["error"],
                updated_at=decode_time(r["updated_at"]),
                detail=r["detail"],
            )
            for r in rows
        ]
