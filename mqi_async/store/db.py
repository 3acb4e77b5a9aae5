"""The `Store`: the one SQLite connection, opened safely, and every write serialised through it."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

import aiosqlite

from mqi_async.domain.errors import DatabaseError, format_error
from mqi_async.domain.gpus import GpuSample
from mqi_async.domain.model import BeamStatus, CaseStatus, RunStatus
from mqi_async.domain.records import (
    BeamRow,
    CaseRow,
    CommandKind,
    CommandRow,
    CommandStatus,
    DeliveryRow,
    DeliveryToCheck,
    DoseCheckRow,
    LeaseRow,
    NewBeam,
    NewCase,
    NewDelivery,
    ReportRow,
    RunRow,
    SkippedFolder,
)
from mqi_async.domain.verdict import QaStatus
from mqi_async.store.beams import Beams
from mqi_async.store.cases import CASE_COLUMNS_AS_C, Cases, case_from_row
from mqi_async.store.commands import Commands
from mqi_async.store.deliveries import Deliveries
from mqi_async.store.dose_checks import DoseChecks
from mqi_async.store.events import EventRow, Events
from mqi_async.store.files import (
    absolute,
    connect,
    database_error,
    inspect_file,
    is_missing_or_empty,
    prepare_files,
    read_checked_version,
    readonly_uri,
    readwrite_uri,
)
from mqi_async.store.gpus import GpuRow, Gpus
from mqi_async.store.hosts import HostRow, Hosts
from mqi_async.store.leases import Leases
from mqi_async.store.metrics import MetricsSnapshot, read_metrics
from mqi_async.store.reports import Reports
from mqi_async.store.runs import Runs
from mqi_async.store.schema import migrate
from mqi_async.store.session import Session, is_corruption, is_unwritable, unwritable_error
from mqi_async.store.skipped import SkippedFolderRow, SkippedFolders
from mqi_async.store.snapshot import (
    CaseSnapshot,
    DashboardCounts,
    read_case_snapshot,
    read_dashboard_cases,
    read_snapshot,
    status_document,
)

log = logging.getLogger(__name__)

#: Where transactions get their timestamp; must return aware datetimes.
NowFunction = Callable[[], datetime]


async def _rollback_quietly(conn: aiosqlite.Connection) -> None:
    try:
        await conn.rollback()
    except sqlite3.Error as exc:
        log.debug("rollback after an interrupted BEGIN: %s", exc)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Transaction:
    """The query API inside one transaction (or one read), grouped by table.

    Every row written carries the same timestamp, `at`, taken when the transaction began.
    """

    __slots__ = (
        "_session",
        "beams",
        "cases",
        "commands",
        "deliveries",
        "dose_checks",
        "events",
        "gpus",
        "hosts",
        "leases",
        "reports",
        "runs",
        "skipped",
    )

    def __init__(self, session: Session) -> None:
        self._session = session
        self.cases = Cases(session)
        self.beams = Beams(session)
        self.deliveries = Deliveries(session)
        self.dose_checks = DoseChecks(session)
        self.runs = Runs(session)
        self.gpus = Gpus(session)
        self.hosts = Hosts(session)
        self.leases = Leases(session)
        self.events = Events(session)
        self.commands = Commands(session)
        self.skipped = SkippedFolders(session)
        self.reports = Reports(session)

    @property
    def at(self) -> datetime:
        return self._session.at

    async def dashboard(
        self, *, recent: int = 200, text: str = ""
    ) -> tuple[list[CaseSnapshot], DashboardCounts]:
        return await read_dashboard_cases(self._session, recent=recent, text=text)

    async def snapshot(self) -> list[CaseSnapshot]:
        """Every case with its beams, in creation order (see `snapshot.read_snapshot`)."""
        return await read_snapshot(self._session)

    async def case_snapshot(self, case_id: str) -> CaseSnapshot | None:
        """One treatment case as `status` shows it."""
        return await read_case_snapshot(self._session, case_id)


class Store:
    """The database of one service: one aiosqlite connection, transactions under one lock.

    `Store.open` is for the service: it checks the file read-only, takes the service lock,
    opens read-write and migrates. `Store.open_readonly`, `read_status_snapshot` and
    `submit_command` are for the CLI while the service runs. Close with `aclose()` or
    `async with`.
    """

    def __init__(
        self,
        conn: aiosqlite.Connection,
        *,
        path: Path,
        now: NowFunction,
        writable: bool,
        lock_fd: int | None,
        schema_version: int,
    ) -> None:
        self._conn: aiosqlite.Connection | None = conn
        self._path = path
        self._now = now
        self._writable = writable
        self._lock_fd = lock_fd
        self._schema_version = schema_version
        # aiosqlite runs one connection's calls on one thread; this lock keeps two tasks'
        # BEGIN … COMMIT from interleaving on it (platform.md §7)
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[object] | None = None

    # -- opening and closing ---------------------------------------------------------------

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, now: NowFunction | None = None) -> Store:
        """Open (or create) the service's database and bring its schema up to date.

        An existing file is first checked read-only with `PRAGMA integrity_check`, so a
        damaged file is left exactly as it was. A new file and any directory created for it
        are private (0600 / 0700). Only one service may hold a database at a time.

        Raises:
            DatabaseError: `database_damaged` (the file fails its check or is no mqi-async
                database), `database_version` (made by a newer mqi-async),
                `already_running` (another service holds it), `database_unavailable`.
        """
        db_path = absolute(path)
        if await asyncio.to_thread(db_path.exists):
            await inspect_file(db_path)
        lock_fd = await asyncio.to_thread(prepare_files, db_path)
        conn: aiosqlite.Connection | None = None
        try:
            conn = await connect(str(db_path), db_path, uri=False)
            await conn.execute("PRAGMA foreign_keys = ON")
            # damaged b-tree cells raise at read time instead of being trusted
            await conn.execute("PRAGMA cell_size_check = ON")
            mode = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))[0][0]
            if str(mode).lower() != "wal":
                log.warning("database %s: WAL mode refused (journal_mode=%s)", db_path, mode)
            # FULL: a launch intent must survive power loss once MOQUI may have been spawned
            await conn.execute("PRAGMA synchronous = FULL")
            version = await migrate(conn, path=str(db_path))
        except BaseException as exc:
            if conn is not None:
                await conn.close()
            os.close(lock_fd)
            if isinstance(exc, sqlite3.Error):
                raise database_error(db_path, exc) from exc
            raise
        log.info("database %s open (schema v%d)", db_path, version)
        return cls(
            conn,
            path=db_path,
            now=now or _utc_now,
            writable=True,
            lock_fd=lock_fd,
            schema_version=version,
        )

    @classmethod
    async def open_readonly(
        cls, path: str | os.PathLike[str], *, now: NowFunction | None = None
    ) -> Store:
        """Open the database for reading only, while the service may be writing it.

        Creates no file: with no `-wal` beside the database (no service running) it is
        opened immutable, otherwise read-only through the service's WAL.

        Raises:
            DatabaseError: `database_missing`, `database_version` (the schema is not the one
                this code reads), `database_damaged`, `database_unavailable`.
        """
        db_path = absolute(path)
        if not await asyncio.to_thread(db_path.exists):
            raise DatabaseError(
                "database_missing",
                f"{db_path}: no database here — start the service once, or check `database:`"
                " in the config",
            )
        conn = await connect(await readonly_uri(db_path), db_path, uri=True)
        try:
            version = await read_checked_version(conn, db_path)
        except BaseException:
            await conn.close()
            raise
        return cls(
            conn,
            path=db_path,
            now=now or _utc_now,
            writable=False,
            lock_fd=None,
            schema_version=version,
        )

    @classmethod
    async def _open_client(cls, db_path: Path) -> Store:
        """A short-lived writer beside the service (CLI commands); creates no database."""
        conn = await connect(readwrite_uri(db_path), db_path, uri=True)
        try:
            await conn.execute("PRAGMA foreign_keys = ON")
            version = await read_checked_version(conn, db_path)
        except BaseException:
            await conn.close()
            raise
        return cls(
            conn,
            path=db_path,
            now=_utc_now,
            writable=True,
            lock_fd=None,
            schema_version=version,
        )

    async def aclose(self) -> None:
        """Wait for the running transaction, then close the connection and drop the lock."""
        if self._conn is None:
            return
        async with self._lock:
            conn, self._conn = self._conn, None
            try:
                if self._writable and self._lock_fd is not None:
                    await conn.execute("PRAGMA optimize")
            except sqlite3.Error as exc:
                log.warning("database %s: PRAGMA optimize failed: %s", self._path, exc)
            finally:
                await conn.close()
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
                    self._lock_fd = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def schema_version(self) -> int:
        return self._schema_version

    @property
    def is_readonly(self) -> bool:
        return not self._writable

    # -- transactions ----------------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """`BEGIN IMMEDIATE` … `COMMIT`, or `ROLLBACK` if the block raises (or is cancelled).

        Transactions of all tasks run one at a time. Do not open one inside another in the
        same task (that would wait forever; it raises RuntimeError instead).
        """
        if not self._writable:
            raise RuntimeError(f"{self._path} is open read-only")
        async with self._scope(write=True) as tx:
            yield tx

    @asynccontextmanager
    async def read(self) -> AsyncIterator[Transaction]:
        """A consistent read: one deferred read transaction, always rolled back."""
        async with self._scope(write=False) as tx:
            yield tx

    @asynccontextmanager
    async def _scope(self, *, write: bool) -> AsyncIterator[Transaction]:
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"{self._path} is closed")
        task = asyncio.current_task()
        if task is not None and task is self._owner:
            raise RuntimeError(
                "a transaction was opened inside another one in the same task;"
                " use the open Transaction's methods instead"
            )
        async with self._lock:
            if self._conn is None:
                raise RuntimeError(f"{self._path} is closed")
            self._owner = task
            try:
                at = self._now()
                if at.tzinfo is None:
                    raise ValueError("the store's clock must return aware datetimes")
                session = Session(conn, path=str(self._path), at=at, writable=write)
                try:
                    await self._begin(conn, write)
                except BaseException:
                    # a cancel while BEGIN was queued still lets it run on the connection's
                    # thread: end that transaction too, or the next BEGIN fails
                    await asyncio.shield(_rollback_quietly(conn))
                    raise
                committed = False
                try:
                    yield Transaction(session)
                    if write:
                        await conn.commit()
                        committed = True
                except sqlite3.Error as exc:
                    # a full or read-only disk is the service's trouble, not the case's
                    if write and is_unwritable(exc):
                        raise unwritable_error(str(self._path), exc) from exc
                    raise
                finally:
                    if not committed:
                        # shielded so a second cancel cannot skip it; the connection's thread
                        # runs it before any later BEGIN, so the next transaction starts clean
                        await asyncio.shield(conn.rollback())
            finally:
                self._owner = None

    async def _begin(self, conn: aiosqlite.Connection, write: bool) -> None:
        try:
            await conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as exc:
            if is_corruption(exc):
                raise database_error(self._path, exc) from exc
            if write and is_unwritable(exc):
                raise unwritable_error(str(self._path), exc) from exc
            raise

    # -- cases -----------------------------------------------------------------------------

    async def register_case(
        self,
        case: NewCase,
        beams: Sequence[NewBeam] = (),
        deliveries: Sequence[NewDelivery] = (),
    ) -> tuple[CaseRow, bool]:
        """See `Cases.register`: idempotent; returns (row, is_new)."""
        async with self.transaction() as tx:
            return await tx.cases.register(case, beams, deliveries)

    async def attach_plan(
        self,
        case_id: str,
        *,
        beams: Sequence[NewBeam],
        deliveries: Sequence[NewDelivery] = (),
        plan_path: str | None = None,
        gantry: int | None = None,
        patient_id: str | None = None,
    ) -> list[BeamRow]:
        """See `Cases.attach_plan`."""
        async with self.transaction() as tx:
            return await tx.cases.attach_plan(
                case_id,
                beams=beams,
                deliveries=deliveries,
                plan_path=plan_path,
                gantry=gantry,
                patient_id=patient_id,
            )

    async def get_case(self, case_id: str) -> CaseRow | None:
        async with self.read() as tx:
            return await tx.cases.get(case_id)

    async def list_cases(self, statuses: Collection[CaseStatus] | None = None) -> list[CaseRow]:
        async with self.read() as tx:
            return await tx.cases.find(statuses)

    async def transition_case(
        self,
        case_id: str,
        status: CaseStatus,
        *,
        changes: Mapping[str, object] | None = None,
        message: str = "",
        data: Mapping[str, object] | None = None,
    ) -> CaseRow:
        """See `Cases.transition`: checked, and audited in the same transaction."""
        async with self.transaction() as tx:
            return await tx.cases.transition(
                case_id, status, changes=changes, message=message, data=data
            )

    async def update_case(self, case_id: str, changes: Mapping[str, object]) -> CaseRow:
        async with self.transaction() as tx:
            return await tx.cases.update(case_id, changes)

    async def list_deliveries(self, case_id: str) -> list[DeliveryRow]:
        async with self.read() as tx:
            return await tx.deliveries.of_case(case_id)

    # -- planned runs and dose checks ------------------------------------------------------

    async def link_planned_case(
        self, case_id: str, planned: NewCase, beams: Sequence[NewBeam]
    ) -> tuple[CaseRow, bool]:
        """The planned case of a treatment case: made (with its beams) unless a case of the same
        plan has made it already; the treatment case points at it. Returns (it, made now)."""
        async with self.transaction() as tx:
            row, created = await tx.cases.register(planned, beams)
            await tx.cases.update(case_id, {"planned_case_id": planned.case_id})
            await tx.events.append(
                "dose_check",
                (
                    f"planned run of the plan: {planned.case_id}"
                    + (" (new)" if created else f" (reused, {row.status})")
                ),
                case_id=case_id,
            )
            return row, created

    async def cases_to_dose_check(self, limit: int = 50) -> list[CaseRow]:
        """Treatment cases with a plan whose dose check has no verdict yet."""
        async with self.read() as tx:
            rows = await tx.dose_checks.unchecked_cases(CASE_COLUMNS_AS_C, limit)
            return [case_from_row(r) for r in rows]

    async def dose_checks(self, case_id: str) -> list[DoseCheckRow]:
        async with self.read() as tx:
            return await tx.dose_checks.of_case(case_id)

    async def record_dose_check(
        self,
        case_id: str,
        beam_id: str | None,
        *,
        status: QaStatus,
        reason: str | None = None,
        result: Mapping[str, object] | None = None,
    ) -> None:
        """A beam's (or, beam_id None, the plan sum's) verdict, with its event."""
        async with self.transaction() as tx:
            await tx.dose_checks.record(
                case_id, beam_id, status=status, reason=reason, result=result
            )
            rate = (result or {}).get("pass_rate_percent")
            what = beam_id or "plan sum"
            shown = f"{rate} %" if rate is not None else (reason or "")
            await tx.events.append(
                "dose_check",
                f"{what}: {status} {shown}".rstrip(),
                case_id=case_id,
                beam_id=beam_id,
                data={"status": str(status), "reason": reason},
            )

    async def reset_dose_checks(self, case_id: str, *, message: str) -> int:
        async with self.transaction() as tx:
            count = await tx.dose_checks.reset(case_id)
            if count:
                await tx.events.append("dose_check", message, case_id=case_id)
            return count

    # -- delivery checks -------------------------------------------------------------------

    async def add_deliveries(self, case_id: str, deliveries: Sequence[NewDelivery]) -> list[str]:
        """Record the deliveries the case does not have yet (each with an event); their ids."""
        async with self.transaction() as tx:
            known = await tx.deliveries.ids_of(case_id)
            new = [d for d in deliveries if d.delivery_id not in known]
            if not new:
                return []
            beams = {b.beam_index for b in await tx.beams.of_case(case_id)}
            await tx.deliveries.insert_many(case_id, new, beams, only_new=True)
            for d in new:
                await tx.events.append(
                    "delivery",
                    f"new delivery {d.delivery_path.rsplit('/', 1)[-1]}"
                    f" (fraction {d.fraction_index}, beam {d.raw_beam_number})",
                    case_id=case_id,
                )
            return [d.delivery_id for d in new]

    async def count_deliveries(self, case_id: str) -> int:
        async with self.read() as tx:
            return len(await tx.deliveries.ids_of(case_id))

    async def deliveries_to_check(self, limit: int = 20) -> list[DeliveryToCheck]:
        async with self.read() as tx:
            return await tx.deliveries.to_check(limit)

    async def record_delivery_check(
        self,
        delivery: DeliveryRow,
        *,
        status: QaStatus,
        reason: str | None = None,
        result: Mapping[str, object] | None = None,
        detail_path: str | None = None,
    ) -> None:
        """A delivery's verdict and numbers, with its event, in one transaction."""
        async with self.transaction() as tx:
            await tx.deliveries.record_check(
                delivery.delivery_id,
                status=status,
                reason=reason,
                result=result,
                detail_path=detail_path,
                at=tx.at,
            )
            rate = (result or {}).get("pass_rate_percent")
            shown = f"{rate} %" if rate is not None else (reason or "")
            await tx.events.append(
                "delivery_check",
                f"delivery {delivery.folder} (fraction {delivery.fraction_index}):"
                f" {status} {shown}".rstrip(),
                case_id=delivery.case_id,
                data={"delivery_id": delivery.delivery_id, "status": str(status), "reason": reason},
            )

    async def count_delivery_attempt(self, delivery_id: str, reason: str) -> int:
        async with self.transaction() as tx:
            return await tx.deliveries.count_attempt(delivery_id, reason)

    async def reset_delivery_checks(self, case_id: str, *, message: str) -> int:
        """Every delivery of the case checked again; an event says why."""
        async with self.transaction() as tx:
            count = await tx.deliveries.reset_checks(case_id)
            if count:
                await tx.events.append("delivery_check", message, case_id=case_id)
            return count

    # -- beams -----------------------------------------------------------------------------

    async def get_beam(self, beam_id: str) -> BeamRow | None:
        async with self.read() as tx:
            return await tx.beams.get(beam_id)

    async def list_beams(self, case_id: str) -> list[BeamRow]:
        async with self.read() as tx:
            return await tx.beams.of_case(case_id)

    async def list_active_beams(self) -> list[BeamRow]:
        """Non-terminal beams in scheduling order (see `Beams.active`)."""
        async with self.read() as tx:
            return await tx.beams.active()

    async def list_beams_in(self, statuses: Collection[BeamStatus]) -> list[BeamRow]:
        async with self.read() as tx:
            return await tx.beams.in_statuses(statuses)

    async def case_statuses(self) -> dict[str, CaseStatus]:
        """Every case id with its status (cheap: one column pair)."""
        async with self.read() as tx:
            return {c.case_id: c.status for c in await tx.cases.find(None)}

    async def transition_beam(
        self,
        beam_id: str,
        status: BeamStatus,
        *,
        changes: Mapping[str, object] | None = None,
        message: str = "",
        data: Mapping[str, object] | None = None,
    ) -> BeamRow:
        """See `Beams.transition`: checked, and audited in the same transaction."""
        async with self.transaction() as tx:
            return await tx.beams.transition(
                beam_id, status, changes=changes, message=message, data=data
            )

    async def update_beam(self, beam_id: str, changes: Mapping[str, object]) -> BeamRow:
        async with self.transaction() as tx:
            return await tx.beams.update(beam_id, changes)

    # -- runs ------------------------------------------------------------------------------

    async def start_run(
        self,
        beam_id: str,
        *,
        host: str,
        gpu_uuids: Sequence[str],
        job_dir_for: Callable[[int], str],
    ) -> RunRow:
        """See `Runs.start`: the runs row and the beam's attempt count in one transaction."""
        async with self.transaction() as tx:
            return await tx.runs.start(
                beam_id, host=host, gpu_uuids=gpu_uuids, job_dir_for=job_dir_for
            )

    async def set_run_job(self, run_id: int, job_id: str) -> RunRow:
        async with self.transaction() as tx:
            return await tx.runs.set_job(run_id, job_id)

    async def finish_run(
        self,
        run_id: int,
        status: RunStatus,
        *,
        exit_code: int | None = None,
        signal: str | None = None,
        error: str | None = None,
    ) -> RunRow:
        async with self.transaction() as tx:
            return await tx.runs.finish(
                run_id, status, exit_code=exit_code, signal=signal, error=error
            )

    async def list_runs(self, beam_id: str) -> list[RunRow]:
        async with self.read() as tx:
            return await tx.runs.of_beam(beam_id)

    async def list_open_runs(self) -> list[RunRow]:
        async with self.read() as tx:
            return await tx.runs.open()

    # -- GPUs and leases -------------------------------------------------------------------

    async def record_gpu_sample(self, sample: GpuSample) -> None:
        async with self.transaction() as tx:
            await tx.gpus.record_sample(sample)

    async def list_gpus(self, host: str | None = None) -> list[GpuRow]:
        async with self.read() as tx:
            return await tx.gpus.find(host)

    async def record_host_state(self, name: str, state: str, error: str | None) -> None:
        async with self.transaction() as tx:
            await tx.hosts.record(name, state, error)

    async def record_host_detail(self, name: str, detail: str | None) -> None:
        async with self.transaction() as tx:
            await tx.hosts.record_detail(name, detail)

    async def list_hosts(self) -> list[HostRow]:
        async with self.read() as tx:
            return await tx.hosts.find()

    async def replace_skipped_folders(
        self, folders: Sequence[SkippedFolder]
    ) -> list[SkippedFolder]:
        """Record what a full scan skipped (see `SkippedFolders.replace`); returns the new
        ones, each also written as a `folder_skipped` event."""
        async with self.transaction() as tx:
            new = await tx.skipped.replace(folders)
            for f in new:
                await tx.events.append(
                    "folder_skipped", f"{f.reason}: {f.path}", data={"path": f.path}
                )
            return new

    async def list_skipped_folders(self) -> list[SkippedFolderRow]:
        async with self.read() as tx:
            return await tx.skipped.find()

    async def lease_gpus(self, beam_id: str, host: str, uuids: Sequence[str]) -> bool:
        """See `Leases.take`: all or nothing; False when any GPU is held by another beam."""
        async with self.transaction() as tx:
            return await tx.leases.take(beam_id, host, uuids)

    async def release_leases(self, beam_id: str) -> int:
        async with self.transaction() as tx:
            return await tx.leases.release(beam_id)

    async def sweep_leases(self) -> list[LeaseRow]:
        """See `Leases.sweep`: release the leases of ended beams."""
        async with self.transaction() as tx:
            return await tx.leases.sweep()

    async def list_leases(self, *, beam_id: str | None = None) -> list[LeaseRow]:
        async with self.read() as tx:
            return await tx.leases.find(beam_id=beam_id)

    # -- events and commands ---------------------------------------------------------------

    async def append_event(
        self,
        kind: str,
        message: str,
        *,
        case_id: str | None = None,
        beam_id: str | None = None,
        data: Mapping[str, object] | None = None,
    ) -> EventRow:
        async with self.transaction() as tx:
            return await tx.events.append(
                kind, message, case_id=case_id, beam_id=beam_id, data=data
            )

    async def recent_events(
        self, limit: int = 100, *, case_id: str | None = None, beam_id: str | None = None
    ) -> list[EventRow]:
        async with self.read() as tx:
            return await tx.events.recent(limit, case_id=case_id, beam_id=beam_id)

    async def enqueue_command(
        self, kind: CommandKind, case_id: str, payload: Mapping[str, object] | None = None
    ) -> CommandRow | None:
        """See `Commands.enqueue`: None when the case is unknown."""
        async with self.transaction() as tx:
            return await tx.commands.enqueue(kind, case_id, payload)

    async def pending_commands(self, limit: int = 100) -> list[CommandRow]:
        async with self.read() as tx:
            return await tx.commands.pending(limit)

    async def finish_command(
        self, command_id: int, status: CommandStatus, result: str | None = None
    ) -> CommandRow:
        async with self.transaction() as tx:
            return await tx.commands.finish(command_id, status, result)

    # -- the status view -------------------------------------------------------------------

    async def dashboard(
        self, *, recent: int = 200, text: str = ""
    ) -> tuple[list[CaseSnapshot], DashboardCounts]:
        """The dashboard's bounded view (see `snapshot.read_dashboard_cases`)."""
        async with self.read() as tx:
            return await tx.dashboard(recent=recent, text=text)

    async def snapshot(self) -> list[CaseSnapshot]:
        """Every case with its beams in one consistent read (two queries)."""
        async with self.read() as tx:
            return await tx.snapshot()

    async def case_snapshot(self, case_id: str) -> tuple[CaseSnapshot | None, datetime]:
        """One treatment case as `status` shows it, and the moment of the read."""
        async with self.read() as tx:
            return await tx.case_snapshot(case_id), tx.at

    async def metrics(self) -> MetricsSnapshot:
        """Counts, verdicts and durations of the whole database for `/metrics`, in one read
        of aggregate queries (see `metrics.read_metrics`)."""
        async with self.read() as tx:
            return await read_metrics(tx._session)

    async def case_view(
        self, case_id: str, *, events: int = 50
    ) -> tuple[CaseSnapshot | None, list[EventRow], ReportRow | None]:
        """One case, its newest events and its report row, in one read (the web's case page)."""
        async with self.read() as tx:
            case = await tx.case_snapshot(case_id)
            if case is None:
                return None, [], None
            return (
                case,
                await tx.events.recent(events, case_id=case_id),
                await tx.reports.get(case_id),
            )

    async def hosts_view(self) -> tuple[list[HostRow], list[GpuRow], list[LeaseRow]]:
        """Hosts, GPU samples and leases in one read (the web's hosts page)."""
        async with self.read() as tx:
            return await tx.hosts.find(), await tx.gpus.find(None), await tx.leases.find()

    async def status_document(self) -> dict[str, object]:
        """The `status --json` document, `{"cases": [...]}`, from this store."""
        async with self.read() as tx:
            return status_document(await tx.snapshot())

    # -- reports ---------------------------------------------------------------------------

    async def cases_to_report(self, *, max_attempts: int, limit: int = 50) -> list[str]:
        """Finished cases whose report is missing, older than a verdict, or failed."""
        async with self.read() as tx:
            return await tx.reports.stale_cases(max_attempts, limit)

    async def get_report(self, case_id: str) -> ReportRow | None:
        async with self.read() as tx:
            return await tx.reports.get(case_id)

    async def record_report(
        self, case_id: str, *, pdf: str, html: str, verdict: str, as_of: datetime
    ) -> None:
        """A report built from the data read at `as_of`, with its event."""
        async with self.transaction() as tx:
            await tx.reports.record_built(case_id, pdf=pdf, html=html, verdict=verdict, as_of=as_of)
            await tx.events.append("report", f"report written ({verdict}): {pdf}", case_id=case_id)

    async def record_report_failure(self, case_id: str, *, error: str) -> int:
        """A failed report build, with its event; returns how many tries failed in a row."""
        async with self.transaction() as tx:
            tries = await tx.reports.record_failed(case_id, error=error)
            await tx.events.append("report", f"report failed: {error}", case_id=case_id)
            return tries


async def read_status_document(path: str | os.PathLike[str]) -> dict[str, object]:
    """The cases (the `status --json` document) and the hosts' states, for the `status` command."""
    db_path = absolute(path)
    if await asyncio.to_thread(is_missing_or_empty, db_path):
        return {"cases": [], "hosts": [], "skipped_folders": []}
    async with await Store.open_readonly(db_path) as store:
        async with store.read() as tx:
            cases = await tx.snapshot()
            hosts = await tx.hosts.find()
            skipped = await tx.skipped.find()
    return {
        "cases": [c.as_dict() for c in cases],
        "hosts": [h.as_dict() for h in hosts],
        "skipped_folders": [f.as_dict() for f in skipped],
    }


#: below this much free space next to the database, `status` says writes will fail
LOW_SPACE_BYTES = 4 * 1024 * 1024


def database_health(path: str | os.PathLike[str]) -> str | None:
    """Why the service cannot write its database now (full or read-only file system), or None.

    Judged by `status` itself from the file system, since a service that cannot write cannot
    record that it cannot.
    """
    db_path = absolute(path)
    folder = db_path.parent
    try:
        fs = os.statvfs(folder)
    except OSError as exc:
        return format_error("database_unwritable", f"{folder}: {exc.strerror}")
    if fs.f_flag & os.ST_RDONLY:
        return format_error("database_unwritable", f"{folder} is on a read-only file system")
    free = fs.f_bavail * fs.f_frsize
    if free < LOW_SPACE_BYTES:
        return format_error(
            "database_unwritable", f"{folder} has {free // 1024} KiB free; free some space"
        )
    if db_path.exists() and not os.access(db_path, os.W_OK):
        return format_error("database_unwritable", f"{db_path} is not writable for this user")
    return None


async def read_status_snapshot(path: str | os.PathLike[str]) -> list[CaseSnapshot]:
    """The `status` view for the CLI; [] when there is no database yet (nothing is created).

    Raises:
        DatabaseError: as `Store.open_readonly`.
    """
    db_path = absolute(path)
    if await asyncio.to_thread(is_missing_or_empty, db_path):
        return []
    async with await Store.open_readonly(db_path) as store:
        return await store.snapshot()


async def submit_command(
    path: str | os.PathLike[str],
    kind: CommandKind,
    case_id: str,
    payload: Mapping[str, object] | None = None,
) -> CommandRow | None:
    """Record a command for the running (or next) service; None when the case is unknown.

    Works beside a running service (its own short connection, waiting up to
    `files.BUSY_TIMEOUT_S` for the write lock); creates no database.

    Raises:
        DatabaseError: `database_version`, `database_damaged`, `database_unavailable`.
    """
    db_path = absolute(path)
    if await asyncio.to_thread(is_missing_or_empty, db_path):
        return None
    async with await Store._open_client(db_path) as store:
        return await store.enqueue_command(kind, case_id, payload)


async def record_report_files(
    path: str | os.PathLike[str],
    case_id: str,
    *,
    pdf: str,
    html: str,
    verdict: str,
    as_of: datetime,
) -> None:
    """Record a case report written by the report process, beside the service or alone."""
    async with await Store._open_client(absolute(path)) as store:
        await store.record_report(case_id, pdf=pdf, html=html, verdict=verdict, as_of=as_of)
