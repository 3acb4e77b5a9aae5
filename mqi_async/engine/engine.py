"""The engine: starts case and beam workflows from the store, applies commands, pauses hosts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from mqi_async.domain.errors import DatabaseError, MqiError, format_error
from mqi_async.domain.gpus import GpuSample
from mqi_async.domain.jobs import JobHandle
from mqi_async.domain.model import BeamStatus, CaseStatus, RunStatus
from mqi_async.domain.records import BeamRow, CaseRow, CommandStatus, NewCase, RunRow
from mqi_async.domain.scheduling import GpuPolicy
from mqi_async.engine.cases import CaseSettings, CaseWorkflow
from mqi_async.engine.deliveries import DeliveryChecker, DeliveryCheckerSettings
from mqi_async.engine.dose_checks import DoseChecker, DoseCheckSettings
from mqi_async.engine.pollers import GpuPoller, JobMonitor
from mqi_async.engine.ports import CaseSource, Clock, Host, LocalTools, Store
from mqi_async.engine.reports import ReportWriter, ReportWriterSettings
from mqi_async.engine.scheduler import GpuScheduler
from mqi_async.engine.workflow import BeamWorkflow, InputUploads, WorkflowSettings

log = logging.getLogger(__name__)

#: the store's code for a write the file system refused
UNWRITABLE = "database_unwritable"

B = BeamStatus
C = CaseStatus

#: beams whose workflow the engine drives (PENDING waits for its case, PAUSED for its host)
DRIVEN_BEAMS = (B.UPLOADING, B.QUEUED, B.LAUNCHING, B.RUNNING, B.DOWNLOADING, B.CONVERTING)
#: beams that may hold a GPU lease
LEASE_HOLDERS = frozenset({B.LAUNCHING, B.RUNNING})
DRIVEN_CASES = (C.PENDING, C.WAITING, C.INTERPRETING, C.PROCESSING, C.POSTPROCESSING)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSettings:
    workflow: WorkflowSettings
    cases: CaseSettings
    gpu_policies: Mapping[str, GpuPolicy]
    gpu_poll_s: float
    run_poll_s: float
    max_jobs: Mapping[str, int]
    deliveries: DeliveryCheckerSettings
    dose_checks: DoseCheckSettings
    #: None: no case reports (qa.report false)
    reports: ReportWriterSettings | None = None
    dispatch_interval_s: float = 1.0


class Engine:
    """Owns every workflow task; the database decides what runs, so a restart is a resume."""

    def __init__(
        self,
        *,
        store: Store,
        hosts: Mapping[str, Host],
        tools: LocalTools,
        source: CaseSource,
        clock: Clock,
        settings: EngineSettings,
    ) -> None:
        self._store = store
        self._hosts = hosts
        self._clock = clock
        self._s = settings
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: beam task key -> its case id, so a case's running beams are found by id, not prefix
        self._beam_task_case: dict[str, str] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._aggregate_locks: dict[str, asyncio.Lock] = {}
        #: cases being cancelled; dispatch leaves them alone meanwhile
        self._cancelling: set[str] = set()
        #: (case id, other folder) pairs already reported as duplicates
        self._duplicates: set[tuple[str, str]] = set()
        #: finished case -> delivery folders its folder held when last compared with the store
        self._deliveries_seen: dict[str, int] = {}
        #: set while the database refuses writes (disk full, read-only): nothing new starts
        self.database_error: str | None = None
        self.host_errors: dict[str, str | None] = dict.fromkeys(hosts)
        #: what the store last heard about each host, so only changes are written
        self._host_states: dict[str, tuple[str, str | None]] = {}
        self.pollers = {
            name: GpuPoller(
                host,
                store=store,
                interval_s=settings.gpu_poll_s,
                on_sample=self._on_sample,
                on_host_error=self._on_host_error,
            )
            for name, host in hosts.items()
        }
        self.monitors = {
            name: JobMonitor(
                host, interval_s=settings.run_poll_s, on_host_error=self._on_host_error
            )
            for name, host in hosts.items()
        }
        self.scheduler = GpuScheduler(
            store=store,
            hosts=hosts,
            policies=settings.gpu_policies,
            clock=clock,
            max_jobs=settings.max_jobs,
            request_sample=lambda h: self.pollers[h].poll_now(),
        )
        self.reports = (
            ReportWriter(store=store, tools=tools, settings=settings.reports)
            if settings.reports is not None
            else None
        )
        self.deliveries = DeliveryChecker(
            store=store,
            tools=tools,
            settings=settings.deliveries,
            on_checked=self._verdicts_changed,
        )
        self.dose_checks = DoseChecker(
            store=store,
            tools=tools,
            source=source,
            settings=settings.dose_checks,
            on_planned_case=lambda _case_id: self.wake(),
            on_checked=self._verdicts_changed,
        )
        self.cases = CaseWorkflow(
            store=store,
            source=source,
            tools=tools,
            clock=clock,
            settings=settings.cases,
            on_beams_ready=lambda _case_id: self.wake(),
            on_new_deliveries=lambda _case_id: self.deliveries.wake(),
            on_case_done=lambda _case_id: self.dose_checks.wake(),
        )
        self.beams = BeamWorkflow(
            store=store,
            hosts=hosts,
            monitors=self.monitors,
            scheduler=self.scheduler,
            tools=tools,
            clock=clock,
            settings=settings.workflow,
            uploads=InputUploads(settings.workflow.service_owner),
            on_terminal=self._on_beam_terminal,
        )
        self.ready = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    def _on_sample(self, sample: GpuSample, polled_at: float) -> None:
        self.host_errors[sample.host] = None
        self.scheduler.on_sample(sample, polled_at)

    def _on_host_error(self, host: str, exc: MqiError) -> None:
        if self.host_errors.get(host) != str(exc):
            log.warning(
                "host %s unavailable: %s", host, exc, extra={"host": host, "code": exc.code}
            )
        self.host_errors[host] = str(exc)
        self.wake()

    async def _on_beam_terminal(self, case_id: str) -> None:
        """Aggregate right away, in the beam's own task; one case at a time so none is missed."""
        lock = self._aggregate_locks.setdefault(case_id, asyncio.Lock())
        async with lock:
            await self.cases.aggregate(case_id)
        self.wake()

    # -- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        """Recover, then drive workflows until cancelled; remote jobs go on without us."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            await self._recover()
            for name in self._hosts:
                tg.create_task(self._supervise(f"gpu poller {name}", self.pollers[name].run))
                tg.create_task(self._supervise(f"job monitor {name}", self.monitors[name].run))
            tg.create_task(self._supervise("scheduler", self.scheduler.run))
            tg.create_task(self._supervise("delivery checks", self.deliveries.run))
            tg.create_task(self._supervise("dose checks", self.dose_checks.run))
            if self.reports is not None:
                tg.create_task(self._supervise("reports", self.reports.run))
            tg.create_task(self._supervise("commands", self._command_loop))
            self.ready.set()
            await self._dispatch_loop()

    async def _supervise(self, name: str, component: Callable[[], Awaitable[None]]) -> None:
        """Restart a crashed background component with backoff; one failure never stops the service."""
        delay = 1.0
        while True:
            try:
                await component()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, DatabaseError) and exc.code == UNWRITABLE:
                    self._database_unwritable(exc)
                    log.warning(
                        "%s stopped: database_unwritable; restarting in %.0f s", name, delay
                    )
                else:
                    log.exception(
                        "%s crashed; restarting in %.0f s", name, delay, extra={"component": name}
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    def _spawn_beam(self, beam: BeamRow) -> None:
        key = f"beam:{beam.beam_id}"
        self._spawn(key, self.beams.run(beam.beam_id))
        if key in self._tasks:
            self._beam_task_case[key] = beam.case_id

    def _spawn(self, key: str, coro: Awaitable[None]) -> None:
        if self._tg is None or key in self._tasks:
            if asyncio.iscoroutine(coro):
                coro.close()
            return
        task = self._tg.create_task(self._guard(key, coro))
        self._tasks[key] = task

    def _database_unwritable(self, exc: MqiError) -> None:
        if self.database_error is None:
            log.error(
                "%s; no new work starts until the database can be written again", exc,
                extra={"code": exc.code},
            )  # fmt: skip
        self.database_error = str(exc)

    async def _guard(self, key: str, coro: Awaitable[None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, DatabaseError) and exc.code == UNWRITABLE:
                # the row still says where the workflow was: it resumes from there once writes work
                self._database_unwritable(exc)
            else:
                log.exception("%s crashed", key)
                await self._fail_unexpected(key, exc)
        finally:
            self._tasks.pop(key, None)
            self._beam_task_case.pop(key, None)
            self.wake()

    async def _fail_unexpected(self, key: str, exc: Exception) -> None:
        error = format_error("internal_error", f"{type(exc).__name__}: {exc}")
        kind, _, ident = key.partition(":")
        with contextlib.suppress(MqiError):
            if kind == "beam":
                beam = await self._store.get_beam(ident)
                if beam and not beam.status.is_terminal:
                    await self.scheduler.release(ident)
                    await self._store.transition_beam(
                        ident, B.FAILED, changes={"error": error}, message=error
                    )
                    await self._on_beam_terminal(beam.case_id)
            elif kind == "case":
                case = await self._store.get_case(ident)
                if case and not case.status.is_terminal:
                    await self._store.transition_case(
                        ident, C.FAILED, changes={"error": error}, message=error
                    )

    async def _recover(self) -> None:
        """Reconcile the store with reality before anything runs."""
        live = {b.beam_id for b in await self._store.list_beams_in(LEASE_HOLDERS | {B.PAUSED})}
        # a cancelled beam whose kill is still pending keeps its GPUs until the kill lands
        live |= {r.beam_id for r in await self._store.list_open_runs()}
        for lease in await self._store.list_leases():
            if lease.beam_id not in live:
                log.info(
                    "released leaked lease %s on %s",
                    lease.uuid,
                    lease.host,
                    extra={"host": lease.host},
                )
                await self._store.release_leases(lease.beam_id)
        for beam in await self._store.list_beams_in(LEASE_HOLDERS | {B.PAUSED}):
            if beam.host:
                self.scheduler.adopt(beam.beam_id, beam.host, beam.gpu_uuids)
        for lease in await self._store.list_leases():
            if lease.beam_id in live:
                self.scheduler.adopt(lease.beam_id, lease.host, (lease.uuid,))
        for case in await self._store.list_cases([C.PROCESSING]):
            # a crash between interpretation and queueing leaves beams pending; move them on
            for beam in await self._store.list_beams(case.case_id):
                if beam.status == B.PENDING:
                    await self._store.transition_beam(
                        beam.beam_id, B.UPLOADING, message="resumed after restart"
                    )
            await self.cases.aggregate(case.case_id)
        n_beams = len(await self._store.list_beams_in(DRIVEN_BEAMS))
        n_cases = len(await self._store.list_cases(DRIVEN_CASES))
        log.info("recovery: %d active case(s), %d active beam(s) resume", n_cases, n_beams)

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                if self.database_error is None or await self._database_writable():
                    await self._dispatch()
            except DatabaseError as exc:
                if exc.code != UNWRITABLE:
                    raise
                self._database_unwritable(exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._s.dispatch_interval_s):
                    await self._wake.wait()

    async def _database_writable(self) -> bool:
        """Probe with a real write (an event) whether the database takes writes again."""
        try:
            await self._store.append_event(
                "database_writable", f"writes work again after: {self.database_error}"
            )
        except DatabaseError as exc:
            if exc.code != UNWRITABLE:
                raise
            return False
        log.info("database writable again; resuming")
        self.database_error = None
        return True

    def host_state(self, name: str) -> tuple[str, str | None]:
        """("connected" | "paused" | "connecting", error) of one host."""
        error = self.host_errors.get(name)
        if error:
            return "paused", error
        if self._hosts[name].is_available():
            return "connected", None
        return "connecting", None

    async def _record_host_states(self) -> None:
        for name in self._hosts:
            state = self.host_state(name)
            if self._host_states.get(name) != state:
                await self._store.record_host_state(name, state[0], state[1])
                self._host_states[name] = state

    async def _dispatch(self) -> None:
        await self._record_host_states()
        await self._reap_pending_kills()
        now = self._clock.now()
        for case in await self._store.list_cases(DRIVEN_CASES):
            if case.case_id in self._cancelling:
                continue
            if case.status == C.PROCESSING:
                if case.case_id not in self._beam_task_case.values():
                    await self._on_beam_terminal(case.case_id)
                continue
            if case.status == C.WAITING and case.recheck_at and case.recheck_at > now:
                continue
            self._spawn(f"case:{case.case_id}", self.cases.run(case.case_id))
        for beam in await self._store.list_beams_in([*DRIVEN_BEAMS, B.PAUSED]):
            if beam.case_id in self._cancelling:
                continue
            host = self._hosts.get(beam.host) if beam.host else None
            if beam.status == B.PAUSED:
                if (
                    host is not None
                    and host.is_available()
                    and self.host_errors.get(host.name) is None
                ):
                    resume = beam.resume_status or B.QUEUED
                    await self._store.transition_beam(
                        beam.beam_id,
                        resume,
                        changes={"resume_status": None, "error": None},
                        message=f"resumed on {host.name}",
                    )
                    self._spawn_beam(beam)
                continue
            if (
                host is not None
                and beam.status in (B.LAUNCHING, B.RUNNING, B.DOWNLOADING)
                and not host.is_available()
            ):
                if f"beam:{beam.beam_id}" not in self._tasks:
                    await self._store.transition_beam(
                        beam.beam_id,
                        B.PAUSED,
                        changes={
                            "resume_status": beam.status,
                            "error": format_error(
                                "host_unreachable", self.host_errors.get(host.name) or ""
                            ),
                        },
                        message=f"paused: host {host.name} unavailable",
                    )
                continue
            self._spawn_beam(beam)

    # -- commands -----------------------------------------------------------------------

    async def _command_loop(self) -> None:
        while True:
            for cmd in await self._store.pending_commands():
                try:
                    message = await self.apply(str(cmd.kind), cmd.case_id, cmd.payload)
                    await self._store.finish_command(cmd.command_id, CommandStatus.DONE, message)
                except MqiError as exc:
                    await self._store.finish_command(
                        cmd.command_id, CommandStatus.REJECTED, str(exc)
                    )
            await asyncio.sleep(1.0)

    async def apply(
        self, kind: str, case_id: str, payload: Mapping[str, object] | None = None
    ) -> str:
        """Carry out an operator request: retry, cancel, priority or recheck."""
        case = await self._store.get_case(case_id)
        if case is None:
            raise MqiError("internal_error", f"unknown case {case_id}")
        if kind == "cancel":
            return await self._cancel(case_id)
        if kind == "retry":
            return await self._retry(case_id)
        if kind == "recheck":
            return await self._recheck(case_id)
        if kind == "priority":
            # the value the operator asked for (dashboard dialog), else one step up
            value = (payload or {}).get("priority")
            priority = value if isinstance(value, int) else case.priority + 1
            await self._store.update_case(case_id, {"priority": priority})
            self.scheduler.wake()
            return f"priority of {case_id} is now {priority}"
        raise MqiError("internal_error", f"unknown command {kind}")

    def _verdicts_changed(self) -> None:
        """New verdicts: a report may be due now rather than at its next poll."""
        if self.reports is not None:
            self.reports.wake()

    async def _recheck(self, case_id: str) -> str:
        """The case's delivery and dose checks run again (the MC doses are kept); the report
        follows their new verdicts."""
        deliveries = await self._store.reset_delivery_checks(
            case_id, message="re-check requested: every delivery is checked again"
        )
        doses = await self._store.reset_dose_checks(
            case_id, message="re-check requested: the dose checks run again"
        )
        self.deliveries.wake()
        self.dose_checks.wake()
        return (
            f"checks of {case_id} run again: {deliveries} delivery check(s), {doses} dose check(s)"
        )

    async def _stop_task(self, key: str) -> None:
        task = self._tasks.get(key)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _cancel(self, case_id: str) -> str:
        case = await self._store.get_case(case_id)
        if case is None or case.status.is_terminal:
            return f"case {case_id} is already {case.status if case else 'gone'}"
        self._cancelling.add(case_id)
        try:
            return await self._cancel_beams(case_id)
        finally:
            self._cancelling.discard(case_id)

    async def _stop_run(self, run: RunRow) -> bool:
        """Make sure nothing of an open run goes on: kill its job, or fence a folder where a
        launch may still start one. False when the host could not be reached (try again)."""
        host = self._hosts.get(run.host)
        if host is None:
            return True  # a host no longer configured: nothing we can reach
        if not host.is_available():
            return False
        try:
            handle = (
                JobHandle(job_dir=run.job_dir, job_id=run.job_id)
                if run.job_id
                else await host.attach_job(run.job_dir, fence=True)
            )
            if handle is not None:
                await host.kill_job(handle)
        except MqiError as exc:
            log.warning(
                "kill of %s on %s failed: %s; trying again", run.job_dir, run.host, exc,
                extra={"beam_id": run.beam_id, "host": run.host},
            )  # fmt: skip
            return False
        await self._store.finish_run(run.run_id, RunStatus.KILLED, error=format_error("cancelled"))
        await self.scheduler.release(run.beam_id)
        return True

    async def _reap_pending_kills(self) -> None:
        """Runs of finished beams still open: a kill that could not be delivered, sent again."""
        for run in await self._store.list_open_runs():
            beam = await self._store.get_beam(run.beam_id)
            if beam is None or not beam.status.is_terminal:
                continue
            host = self._hosts.get(run.host)
            if host is not None and host.is_available() and await self._stop_run(run):
                await self._store.append_event(
                    "kill_delivered",
                    f"attempt {run.attempt} on {run.host} stopped after the host came back",
                    case_id=beam.case_id,
                    beam_id=run.beam_id,
                )

    async def _cancel_beams(self, case_id: str) -> str:
        await self._stop_task(f"case:{case_id}")
        killed = pending = 0
        for beam in await self._store.list_beams(case_id):
            if beam.status.is_terminal:
                continue
            await self._stop_task(f"beam:{beam.beam_id}")
            runs = await self._store.list_runs(beam.beam_id)
            run = max(runs, key=lambda r: r.attempt) if runs else None
            error = format_error("cancelled")
            if run and not run.status.is_terminal:
                if await self._stop_run(run):
                    killed += 1
                else:
                    # the lease stays until the kill lands; the reaper sends it again
                    pending += 1
                    error = format_error(
                        "cancelled", f"{format_error('kill_pending')} (host {run.host})"
                    )
            else:
                await self.scheduler.release(beam.beam_id)
            await self._store.transition_beam(
                beam.beam_id,
                B.CANCELLED,
                changes={"error": error},
                message="cancelled by operator",
            )
        await self._store.transition_case(
            case_id,
            C.CANCELLED,
            changes={"error": format_error("cancelled")},
            message="cancelled by operator",
        )
        later = f", {pending} kill(s) pending until the host is back" if pending else ""
        return f"cancelled {case_id} ({killed} running job(s) killed{later})"

    async def _retry(self, case_id: str) -> str:
        case = await self._store.get_case(case_id)
        if case is None:
            raise MqiError("internal_error", f"unknown case {case_id}")
        if case.status not in (C.FAILED, C.CANCELLED):
            return f"case {case_id} is {case.status}; only failed or cancelled cases are retried"
        beams = await self._store.list_beams(case_id)
        for beam in beams:
            if beam.status in (B.FAILED, B.CANCELLED):
                await self._store.transition_beam(
                    beam.beam_id,
                    B.PENDING,
                    changes={
                        "error": None,
                        "progress": 0,
                        "attempts_base": beam.attempts,
                        "not_before_at": None,
                        "host": None,
                        "gpu_uuids": [],
                        "gpu_indices": [],
                    },
                    message="retry requested",
                )
        self.beams.forget_uploads(case_id)
        await self._store.reset_delivery_checks(
            case_id, message="retry requested: every delivery is checked again"
        )
        self.deliveries.wake()
        await self._store.reset_dose_checks(
            case_id, message="retry requested: the dose checks run again"
        )
        if case.planned_case_id:
            planned = await self._store.get_case(case.planned_case_id)
            if planned is not None and planned.status in (C.FAILED, C.CANCELLED):
                await self._retry(planned.case_id)  # its failed planned runs, once more
        self.dose_checks.wake()
        # a case that never got beams (bad input) is resolved again from its files
        target = C.PENDING
        await self._store.transition_case(
            case_id,
            target,
            changes={"error": None, "progress": 0, "retry_count": case.retry_count + 1},
            message="retry requested",
        )
        self.wake()
        return f"retrying {case_id}"

    # -- intake -------------------------------------------------------------------------

    async def _duplicate_folder(self, case_id: str, registered: str, other: str) -> None:
        if (case_id, other) in self._duplicates:
            return
        self._duplicates.add((case_id, other))
        message = (
            f"folder {other} has the id of case {case_id} (registered from {registered}); "
            "it is not processed: rename it or remove the copy"
        )
        log.warning("%s", message, extra={"case_id": case_id, "code": "duplicate_case_folder"})
        await self._store.append_event("duplicate_case_folder", message, case_id=case_id)

    async def _unrecorded_deliveries(self, case: CaseRow, delivery_folders: int) -> bool:
        """A finished, resolved case whose folder holds more deliveries than are recorded."""
        if case.status not in (C.COMPLETED, C.FAILED) or not case.plan_path:
            return False
        if self._deliveries_seen.get(case.case_id) == delivery_folders:
            return False  # already looked at this many folders (some may match no beam)
        self._deliveries_seen[case.case_id] = delivery_folders
        return delivery_folders > await self._store.count_deliveries(case.case_id)

    async def register_case(
        self,
        *,
        case_id: str,
        case_path: str,
        room: str,
        safe_name: str,
        new_ptn: bool = False,
        study_case_id: str | None = None,
        study_safe_name: str | None = None,
        delivery_folders: int = 0,
    ) -> None:
        """A ready case folder was seen; register it once, or recheck a waiting one.

        A patient's further study (nested layout) becomes a case of its own under
        `study_case_id`; a folder that would reuse a registered case's id for another path is
        a duplicate, logged and recorded as an event once. A finished case whose folder
        holds more deliveries than are recorded (a later fraction, seen by a rescan) has them
        recorded, and checked, without running anything else again.
        """
        case, created = await self._store.register_case(
            NewCase(case_id=case_id, case_path=case_path, room=room or None, safe_name=safe_name)
        )
        if not created and case.case_path != case_path:
            if study_case_id and study_safe_name:
                await self.register_case(
                    case_id=study_case_id,
                    case_path=case_path,
                    room=room,
                    safe_name=study_safe_name,
                    new_ptn=new_ptn,
                    delivery_folders=delivery_folders,
                )
            else:
                await self._duplicate_folder(case.case_id, case.case_path, case_path)
            return
        if created:
            log.info("registered case %s", case_id, extra={"case_id": case_id})
        elif case.status == C.WAITING:
            await self._store.transition_case(
                case_id, C.PENDING, message="new files; checking the fraction again"
            )
        elif case.status == C.COMPLETED and new_ptn:
            await self._store.transition_case(
                case_id, C.POSTPROCESSING, message="new delivery log; post-processing again"
            )
        elif await self._unrecorded_deliveries(case, delivery_folders):
            self._spawn(f"deliveries:{case_id}", self.cases.refresh_deliveries(case))
        self.wake()
