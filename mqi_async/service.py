"""The composition root: builds every object once, runs them in one TaskGroup, stops cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mqi_async.config import (
    IGNORE_HOST_KEYS,
    LocalHostSettings,
    Settings,
    SimulatedHostSettings,
    SlurmHostSettings,
    SshHostSettings,
)
from mqi_async.domain.errors import format_error
from mqi_async.domain.privacy import case_key
from mqi_async.domain.records import SkippedFolder
from mqi_async.domain.retention import RetentionPolicy
from mqi_async.domain.scheduling import GpuPolicy
from mqi_async.domain.verdict import Thresholds
from mqi_async.engine.cases import CaseSettings
from mqi_async.engine.deliveries import DeliveryCheckerSettings
from mqi_async.engine.dose_checks import DoseCheckSettings
from mqi_async.engine.engine import Engine, EngineSettings
from mqi_async.engine.ports import Host
from mqi_async.engine.reports import ReportWriterSettings
from mqi_async.engine.retention import RetentionSettings, RetentionSweeper
from mqi_async.engine.workflow import WorkflowSettings
from mqi_async.folders import make_private_dirs
from mqi_async.ingest.reader import FoundCase
from mqi_async.ingest.watcher import CaseWatcher
from mqi_async.log import JsonFormatter, configure_logging, learn_patient_ids, remove_handlers
from mqi_async.notify import Notifier, RunningMarker, build_notifier
from mqi_async.report.model import report_settings
from mqi_async.store import Store
from mqi_async.store.secret import load_or_create_secret
from mqi_async.tools import DoseWorker, LocalToolRunner, Tools

if TYPE_CHECKING:
    from mqi_async.web import WebServer

log = logging.getLogger(__name__)

#: graceful stop must end well inside systemd's TimeoutStopSec and the 10 s contract
STOP_GRACE_S = 8.0
#: the longest a stopping service waits for its last notifications (clean stop, fatal error)
NOTIFY_FLUSH_S = 3.0


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return asyncio.get_running_loop().time()


def build_hosts(settings: Settings, work_root: Path) -> dict[str, Host]:
    """One Host per configured host, by kind; they share one limit on new SSH connections."""
    from mqi_async.hpc.local import LocalHost
    from mqi_async.hpc.simulated import SimulatedHost
    from mqi_async.hpc.ssh import ConnectLimiter
    from mqi_async.hpc.ssh_host import SshHost

    limiter = ConnectLimiter()
    hosts: dict[str, Host] = {}
    for h in settings.hosts:
        if isinstance(h, SimulatedHostSettings):
            hosts[h.name] = SimulatedHost(
                h, work_dir=work_root / "simulated" / h.name, limiter=limiter
            )
        elif isinstance(h, LocalHostSettings):
            hosts[h.name] = LocalHost.from_settings(h)
        elif isinstance(h, SshHostSettings):
            hosts[h.name] = SshHost.from_settings(h, limiter=limiter)
        elif isinstance(h, SlurmHostSettings):
            from mqi_async.hpc.slurm import SlurmHost

            hosts[h.name] = SlurmHost.from_settings(
                h, limiter=limiter, all_gpus=settings.gpu.allocation == "all_gpus"
            )
    return hosts


def service_owner(database: Path) -> str:
    """This installation's identity on hosts: a hash of the machine and the database path,
    then, for people, the host name and database it stands for."""
    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine = ""
    node = socket.gethostname()
    where = os.path.realpath(database)
    digest = hashlib.sha256(f"{machine or node}\0{where}".encode()).hexdigest()[:16]
    return f"{digest} {node}:{where}".replace("\n", " ")


def planned_inputs(settings: Settings) -> dict[str, object]:
    """What besides the plan makes a planned run's dose differ: reuse needs all of it equal."""
    return {
        "moqui": dict(sorted(settings.moqui.items())),
        "mu_per_count": dict(settings.qa.delivery.mu_per_count),
        "time_gain_ms": {r: c.time_gain_ms for r, c in settings.qa.delivery.calibration.items()},
    }


def engine_settings(
    settings: Settings, hosts: dict[str, Host], case_key_secret: bytes
) -> EngineSettings:
    stale_s = settings.gpu.poll_seconds * settings.gpu.stale_after_polls
    policies = {
        h.name: GpuPolicy(
            min_free_memory_mb=settings.gpu.min_free_memory_mb,
            max_sample_age_s=stale_s,
            allocation=settings.gpu.allocation,
            allowed_indices=frozenset(h.gpu_indices) if h.gpu_indices is not None else None,
        )
        for h in settings.hosts
    }
    max_jobs = {
        h.name: (h.max_jobs if isinstance(h, SlurmHostSettings) else 1) for h in settings.hosts
    }
    return EngineSettings(
        workflow=WorkflowSettings(
            moqui_static=dict(settings.moqui),
            moqui_argv={name: tuple(host.moqui_command) for name, host in hosts.items()},
            run_timeout_s=settings.runs.timeout_seconds,
            max_attempts=settings.retry.max_attempts,
            backoff_initial_s=settings.retry.backoff_initial_seconds,
            backoff_max_s=settings.retry.backoff_max_seconds,
            step_timeout_s=max(600.0, settings.runs.timeout_seconds),
            work_directory=settings.work_directory,
            service_owner=service_owner(settings.database),
            case_key_secret=case_key_secret,
        ),
        cases=CaseSettings(
            work_directory=settings.work_directory,
            max_attempts=settings.retry.max_attempts,
            backoff_initial_s=settings.retry.backoff_initial_seconds,
            backoff_max_s=settings.retry.backoff_max_seconds,
        ),
        dose_checks=DoseCheckSettings(
            reference=settings.qa.reference,
            thresholds=Thresholds(
                pass_percent=settings.qa.pass_percent,
                conditional_percent=settings.qa.conditional_percent,
            ),
            work_directory=settings.work_directory,
            planned_inputs=planned_inputs(settings),
            max_attempts=settings.retry.max_attempts,
            backoff_initial_s=settings.retry.backoff_initial_seconds,
            backoff_max_s=settings.retry.backoff_max_seconds,
        ),
        deliveries=DeliveryCheckerSettings(
            enabled=settings.qa.delivery.enabled,
            work_directory=settings.work_directory,
            max_attempts=settings.retry.max_attempts,
            backoff_initial_s=settings.retry.backoff_initial_seconds,
            backoff_max_s=settings.retry.backoff_max_seconds,
        ),
        reports=(
            ReportWriterSettings(
                work_directory=settings.work_directory, max_attempts=settings.retry.max_attempts
            )
            if settings.qa.report
            else None
        ),
        gpu_policies=policies,
        gpu_poll_s=settings.gpu.poll_seconds,
        run_poll_s=settings.runs.poll_seconds,
        max_jobs=max_jobs,
    )


@dataclass
class Service:
    """Everything the running service owns; the UI reads `store` and calls `engine.apply`."""

    settings: Settings
    store: Store
    engine: Engine
    watcher: CaseWatcher
    hosts: dict[str, Host]
    started_at: datetime
    state: str = "starting"
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    retention: RetentionSweeper | None = None
    notifier: Notifier | None = None
    #: the web view and /metrics (web.enabled)
    web: WebServer | None = None

    def request_stop(self) -> None:
        self.state = "stopping"
        self.stopping.set()


def host_states(service: Service) -> dict[str, str]:
    """Each host as the engine sees it now, in the dashboard's words: "connected", or
    "paused (<error>)"; "UNVERIFIED" where host keys are not checked (known_hosts: ignore)."""
    unverified = {
        h.name
        for h in service.settings.hosts
        if getattr(h, "known_hosts", None) == IGNORE_HOST_KEYS
    }
    out = {}
    for name, host in service.hosts.items():
        err = service.engine.host_errors.get(name)
        state = (
            "connected"
            if host.is_available() and not err
            else f"paused ({(err or 'connecting')[:40]})"
        )
        out[name] = f"{state} UNVERIFIED" if name in unverified else state
    return out


def build_web(service: Service, secret: bytes) -> WebServer:
    """The web view over the service's store, with the engine's live view of hosts and health."""
    from mqi_async.web import Health, WebServer, WebView

    settings = service.settings
    view = WebView(
        settings.web,
        store=service.store,
        secret=secret,
        work_directory=settings.work_directory,
        hosts_state=lambda: host_states(service),
        health=lambda: Health(service=service.state, database_error=service.engine.database_error),
        started_at=service.started_at,
    )
    return WebServer(settings.web, view)


async def _start_hosts(hosts: dict[str, Host]) -> None:
    async def start(host: Host) -> None:
        try:
            async with asyncio.timeout(30):
                await host.start()
        except Exception as exc:  # a host that fails to start is paused, the service runs on
            log.warning("host %s did not start: %s", host.name, exc, extra={"host": host.name})

    async with asyncio.TaskGroup() as tg:
        for host in hosts.values():
            tg.create_task(start(host))


@contextlib.asynccontextmanager
async def open_service(settings: Settings) -> AsyncIterator[Service]:
    """Build the service's objects; close hosts and the database on the way out."""
    for d in (settings.work_directory, settings.database.parent):
        make_private_dirs(d)
    store = await Store.open(settings.database)
    hosts: dict[str, Host] = {}
    dose_worker: DoseWorker | None = None
    qa_worker: DoseWorker | None = None
    notifier: Notifier | None = None
    try:
        hosts = build_hosts(settings, settings.work_directory)
        dose_worker = DoseWorker(timeout_s=settings.tools.raw_to_dicom_timeout_seconds)
        qa_worker = DoseWorker(
            timeout_s=settings.qa.delivery.timeout_seconds,
            failure_code="delivery_check_failed",
            timeout_code="delivery_check_timeout",
        )
        tools = LocalToolRunner(
            Tools(settings.tools),
            settings.tools,
            dict(settings.moqui),
            dose_worker,
            qa_worker=qa_worker,
            qa=settings.qa,
            report_base=report_settings(
                settings,
                "",
                {name: " ".join(host.moqui_command) for name, host in hosts.items()},
            ).to_json(),
        )
        problems = tools.check()
        for p in problems:
            log.error("tool check: %s", p)
        from mqi_async.ingest.reader import CaseReader

        secret = load_or_create_secret(settings.database)

        engine = Engine(
            store=store,
            hosts=hosts,
            tools=tools,
            source=CaseReader(
                scan_directory=settings.scan_directory,
                max_plan_bytes=settings.ingest.max_rtplan_mb * 1024 * 1024,
                fraction_window=timedelta(minutes=settings.ingest.fraction_window_minutes),
            ),
            clock=SystemClock(),
            settings=engine_settings(settings, hosts, secret),
        )
        retention = RetentionSweeper(
            store=store,
            hosts=hosts,
            clock=SystemClock(),
            settings=RetentionSettings(
                policy=RetentionPolicy(
                    remote_failed_days=settings.retention.remote_failed_days,
                    work_days=settings.retention.work_days,
                ),
                sweep_s=settings.retention.sweep_seconds,
                work_directory=settings.work_directory,
                scan_directory=settings.scan_directory,
            ),
            case_key=lambda case: case_key(secret, case.case_id),
        )

        if settings.notify.enabled:
            notifier = build_notifier(
                settings.notify, store=store, secret=secret, service_name=socket.gethostname()
            )

        # ids the redactor (logging.redact_patient_ids) must know before they are logged
        learn_patient_ids(*(i for c in await store.list_cases() for i in (c.case_id, c.patient_id)))

        async def on_case(case: FoundCase, new_ptn: bool) -> None:
            learn_patient_ids(case.case_id)
            await engine.register_case(
                case_id=case.case_id,
                case_path=case.case_path,
                room=case.room,
                safe_name=case.safe_name,
                new_ptn=new_ptn,
                study_case_id=case.study_case_id,
                study_safe_name=case.study_safe_name,
                delivery_folders=case.delivery_folders,
            )

        async def on_skipped(folders: list[SkippedFolder]) -> None:
            for folder in await store.replace_skipped_folders(folders):
                log.warning(
                    "skipping folder %s: %s",
                    folder.path,
                    format_error(folder.reason, folder.detail),
                    extra={"component": "watcher"},
                )

        watcher = CaseWatcher(settings.scan_directory, settings.ingest, on_case, on_skipped)
        service = Service(
            settings=settings,
            store=store,
            engine=engine,
            watcher=watcher,
            hosts=hosts,
            started_at=datetime.now(UTC),
            retention=retention,
            notifier=notifier,
        )
        if settings.web.enabled:
            service.web = build_web(service, secret)
        yield service
    finally:
        if notifier is not None:
            await notifier.aclose()
        for worker in (dose_worker, qa_worker):
            if worker is not None:
                await worker.aclose()
        for host in hosts.values():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await host.aclose()
        await store.aclose()


async def run_until_stopped(
    service: Service, ui: Callable[[Service], Coroutine[Any, Any, None]] | None
) -> None:
    """Run engine, watcher (and UI) until a signal, `q`, or a fatal error."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)
    marker = _mark_running(service)
    try:
        await _start_hosts(service.hosts)
        async with asyncio.TaskGroup() as tg:
            engine_task = tg.create_task(service.engine.run())
            watcher_task = tg.create_task(_supervised_watcher(service))
            ui_task = tg.create_task(_isolated_ui(service, ui)) if ui is not None else None
            retention_task = (
                tg.create_task(_supervised("retention", service.retention.run))
                if service.retention is not None
                else None
            )
            notifier_task = (
                tg.create_task(_supervised("notifier", service.notifier.run))
                if service.notifier is not None
                else None
            )
            web_task = (
                tg.create_task(_supervised("web server", service.web.run))
                if service.web is not None
                else None
            )
            service.state = "running"
            log.info(
                "mqi-async running: %d host(s), scan %s",
                len(service.hosts),
                service.settings.scan_directory,
            )
            await service.stopping.wait()
            log.info(
                "stopping: intake closed, remote runs continue and are re-attached at the next start"
            )
            for task in (
                watcher_task,
                engine_task,
                ui_task,
                retention_task,
                notifier_task,
                web_task,
            ):
                if task is not None:
                    task.cancel()
    except Exception as exc:
        if service.notifier is not None:
            service.notifier.fatal_error(exc)
            # told now, so the next start need not tell again; if not, the marker stays
            if await service.notifier.flush(NOTIFY_FLUSH_S) and marker is not None:
                marker.remove()
        raise
    else:
        if service.notifier is not None and service.notifier.has_pending():
            await service.notifier.flush(NOTIFY_FLUSH_S)
        if marker is not None:
            marker.remove()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def _mark_running(service: Service) -> RunningMarker | None:
    """With notifications on: tell about a last run that did not stop cleanly (its marker is
    still there), then mark this one as running."""
    if service.notifier is None:
        return None
    marker = RunningMarker(service.settings.database)
    if marker.was_left():
        service.notifier.unexpected_stop()
    try:
        marker.write()
    except OSError as exc:
        log.warning("cannot write %s: %s; an unexpected stop goes untold", marker.path, exc)
        return None
    return marker


async def _supervised(what: str, run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a background loop; a crash is logged and the loop restarted, never fatal."""
    delay = 1.0
    while True:
        try:
            await run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s crashed; restarting in %.0f s", what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)


async def _isolated_ui(
    service: Service, ui: Callable[[Service], Coroutine[Any, Any, None]]
) -> None:
    """Run the dashboard; closing it stops the service, its crash does not.

    A crashed dashboard is logged with its traceback and the service goes on headless, with
    JSON log lines on stdout as with `--no-ui`, until SIGTERM or SIGINT: the runs in flight
    and the cases still arriving must not wait for someone to notice and restart it.
    """
    try:
        await ui(service)
    except Exception:
        out = logging.StreamHandler(sys.stdout)
        out.setFormatter(JsonFormatter())
        root = logging.getLogger("mqi_async")
        for redacting in root.filters:  # logging.redact_patient_ids holds on stdout too
            out.addFilter(redacting)
        root.addHandler(out)
        try:
            log.exception(
                "the dashboard crashed; the service keeps running headless until SIGTERM or"
                " SIGINT (Ctrl+C)",
                extra={"component": "ui"},
            )
            await service.stopping.wait()
        finally:
            root.removeHandler(out)
        return
    service.request_stop()


async def _supervised_watcher(service: Service) -> None:
    delay = 1.0
    while True:
        try:
            await service.watcher.run()
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "case watcher crashed; restarting in %.0f s", delay, extra={"component": "watcher"}
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)


class StopBeforeStart(Exception):
    """SIGTERM or SIGINT arrived before the service's loop installed its own handlers."""


def _stop_during_startup(signum: int, frame: object) -> None:
    raise StopBeforeStart(signal.Signals(signum).name)


def run_service(settings: Settings, *, headless: bool) -> int:
    """`mqi-async run`: 0 after a graceful stop, 2 when another instance holds the database."""
    # everything the service creates (database, logs, work files) is private to its user
    os.umask(0o077)
    redact_secret = None
    if settings.logging.redact_patient_ids:
        make_private_dirs(settings.database.parent)
        redact_secret = load_or_create_secret(settings.database)
    handlers = configure_logging(
        level=settings.logging.level,
        directory=settings.logging.directory,
        stdout=sys.stdout if headless else None,
        max_file_mb=settings.logging.max_file_mb,
        backup_count=settings.logging.backup_count,
        redact_secret=redact_secret,
    )
    # a stop request before the event loop takes over the signals still ends cleanly
    previous = {
        sig: signal.signal(sig, _stop_during_startup) for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        ui = None
        if not headless:
            from mqi_async.ui.app import run_dashboard

            ui = run_dashboard
        asyncio.run(_main(settings, ui))
        return 0
    except StopBeforeStart:
        log.info("stopped while starting")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        remove_handlers(handlers)


async def _main(
    settings: Settings, ui: Callable[[Service], Coroutine[Any, Any, None]] | None
) -> None:
    async with open_service(settings) as service:
        await run_until_stopped(service, ui)
