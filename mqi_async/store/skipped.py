"""The `skipped_folders` table: what the last full scan could not take, for `status` and the UI."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from mqi_async.domain.records import SkippedFolder
from mqi_async.store.columns import decode_time, encode_time
from mqi_async.store.session import Session


@dataclass(frozen=True, slots=True, kw_only=True)
class SkippedFolderRow:
    path: str
    reason: str
    detail: str
    #: when a scan first found it skipped (kept while it stays skipped)
    since: datetime

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "reason": self.reason,
            "detail": self.detail,
            "since": self.since.isoformat(),
        }


class SkippedFolders:
    """Queries on `skipped_folders`."""

    __slots__ = ("_s",)

    def __init__(self, session: Session) -> None:
        self._s = session

    async def replace(self, folders: Sequence[SkippedFolder]) -> list[SkippedFolder]:
        """Make the table what one full scan found; returns the folders that are new in it.

        A folder renamed or fixed since the last scan drops out; one still skipped keeps
        its `since`.
        """
        self._s.require_writable()
        known = {r["path"] for r in await self._s.rows("SELECT path FROM skipped_folders")}
        wanted = {f.path: f for f in folders}
        gone = known - wanted.keys()
        for path in sorted(gone):
            await self._s.execute("DELETE FROM skipped_folders WHERE path = ?", (path,))
        for f in wanted.values():
            await self._s.execute(
                "INSERT INTO skipped_folders (path, reason, detail, since) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (path) DO UPDATE SET reason = excluded.reason,"
                " detail = excluded.detail",
                (f.path, f.reason, f.detail, encode_time(self._s.at)),
            )
        return [f for p, f in wanted.items() if p not in known]

    async def find(self) -> list[SkippedFolderRow]:
        rows = await self._s.rows(
            "SELECT path, reason, detail, since FROM skipped_folders ORDER BY path"
        )
        return [
            SkippedFolderRow(
                path=r["path"],
                reason=r["reason"],
                detail=r["detail"],
                since=decode_time(r["since"]),
            )
            for r in rows
        ]
