"""The `runs` table: one row per MOQUI launch of a beam, recorded before the launch happens."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from mqi_async.domain.errors import IllegalTransitionError
from mqi_async.domain.model import RunStatus
from mqi_async.domain.records import RunRow
from mqi_async.store import events
from mqi_async.store.beams import Beams, placeholders
from mqi_async.store.columns import (
    decode_optional_time,
    decode_str_list,
    decode_time,
    encode_str_list,
)
from mqi_async.store.session import Session

_COLUMNS = (
    "run_id, beam_id, attempt, host, gpu_uuids, job_dir, job_id, status, exit_code, signal,"
    " error, started_at, ended_at"
)
_OPEN_STATUSES = tuple(str(s) for s in RunStatus if not s.is_terminal)


def _run_from(row: sqlite3.Row) -> RunRow:
    return RunRow(
        run_id=row["run_id"],
        beam_id=row["beam_id"],
        attempt=row["attempt"],
        host=row["host"],
        gpu_uuids=decode_str_list(row["gpu_uuids"]),
        job_dir=row["job_dir"],
        job_id=row["job_id"],
        status=RunStatus(row["status"]),
        exit_code=row["exit_code"],
        signal=row["signal"],
        error=row["error"],
        started_at=decode_time(row["started_at"]),
        ended_at=decode_optional_time(row["ended_at"]),
    )


class Runs:
    """Queries on `runs`."""

    __slots__ = ("_beams", "_events", "_s")

    def __init__(self, session: Session) -> None:
        self._s = session
        self._beams = Beams(session)
        self._events = events.Events(session)

    async def start(
        self,
        beam_id: str,
        *,
        host: str,
        gpu_uuids: Sequence[str],
        job_dir_for: Callable[[int], str],
    ) -> RunRow:
        """Record a new attempt (status LAUNCHING) before the job is spawned.

        The attempt number is the beam's `attempts + 1`; `job_dir_for(attempt)` names the
        remote attempt directory. The beam's `attempts`, `host` and `gpu_uuids` are updated
        in the same transaction.

        Raises:
            IllegalTransitionError: the beam still has an open (launching/running) run.
            LookupError: no such beam.
        """
        self._s.require_writable()
        beam = await self._beams.require(beam_id)
        open_runs = [r for r in await self.of_beam(beam_id) if not r.status.is_terminal]
        if open_runs:
            last = open_runs[-1]
            raise IllegalTransitionError(
                "run", f"attempt {last.attempt} of {beam_id} is {last.status}", "a new attempt"
            )
        attempt = beam.attempts + 1
        uuids = encode_str_list(gpu_uuids)
        job_dir = job_dir_for(attempt)
        run_id = await self._s.insert(
            "INSERT INTO runs (beam_id, attempt, host, gpu_uuids, job_dir, status, started_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (beam_id, attempt, host, uuids, job_dir, str(RunStatus.LAUNCHING), self._s.at_text),
        )
        await self._s.execute(
            "UPDATE beams SET attempts = ?, host = ?, gpu_uuids = ?, updated_at = ?"
            " WHERE beam_id = ?",
            (attempt, host, uuids, self._s.at_text, beam_id),
        )
        await self._events.append(
            events.RUN_STARTED,
            f"attempt {attempt} on {host}",
            case_id=beam.case_id,
            beam_id=beam_id,
            data={"run_id": run_id, "attempt": attempt, "host": host, "job_dir": job_dir},
        )
        return await self.require(run_id)

    async def set_job(self, run_id: int, job_id: str) -> RunRow:
        """The job was spawned: record its id and mark the run RUNNING.

        Raises:
            IllegalTransitionError: the run has already ended.
        """
        self._s.require_writable()
        run = await self.require(run_id)
        if run.status.is_terminal:
            raise IllegalTransitionError("run", str(run.status), str(RunStatus.RUNNING))
        await self._s.execute(
            "UPDATE runs SET job_id = ?, status = ? WHERE run_id = ?",
            (job_id, str(RunStatus.RUNNING), run_id),
        )
        return await self.require(run_id)

    async def finish(
        self,
        run_id: int,
        status: RunStatus,
        *,
        exit_code: int | None = None,
        signal: str | None = None,
        error: str | None = None,
    ) -> RunRow:
        """Record how an attempt ended. Finishing again with the same status changes nothing.

        Raises:
            ValueError: `status` is not a terminal run status.
            IllegalTransitionError: the run already ended with another status.
        """
        self._s.require_writable()
        if not status.is_terminal:
            raise ValueError(f"{status} is not an end status of a run")
        run = await self.require(run_id)
        if run.status.is_terminal:
            if run.status == status:
                return run
            raise IllegalTransitionError("run", str(run.status), str(status))
        await self._s.execute(
            "UPDATE runs SET status = ?, exit_code = ?, signal = ?, error = ?, ended_at = ?"
            " WHERE run_id = ?",
            (str(status), exit_code, signal, error, self._s.at_text, run_id),
        )
        beam = await self._beams.require(run.beam_id)
        await self._events.append(
            events.RUN_FINISHED,
            f"attempt {run.attempt} {status}" + (f": {error}" if error else ""),
            case_id=beam.case_id,
            beam_id=run.beam_id,
            data={"run_id": run_id, "attempt": run.attempt, "exit_code": exit_code},
        )
        return await self.require(run_id)

    async def get(self, run_id: int) -> RunRow | None:
        row = await self._s.row(f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
        return None if row is None else _run_from(row)

    async def require(self, run_id: int) -> RunRow:
        run = await self.get(run_id)
        if run is None:
            raise LookupError(f"unknown run {run_id}")
        return run

    async def of_beam(self, beam_id: str) -> list[RunRow]:
        """Every attempt of a beam, oldest first."""
        rows = await self._s.rows(
            f"SELECT {_COLUMNS} FROM runs WHERE beam_id = ? ORDER BY attempt", (beam_id,)
        )
        return [_run_from(r) for r in rows]

    async def open(self) -> list[RunRow]:
        """Runs that have not ended (launching or running), for recovery after a restart."""
        rows = await self._s.rows(
            f"SELECT {_COLUMNS} FROM runs WHERE status IN ({placeholders(len(_OPEN_STATUSES))})"
            " ORDER BY run_id",
            _OPEN_STATUSES,
        )
        return [_run_from(r) for r in rows]
