"""`mqi-async demo`: the real service on a simulated GPU host, fed generated sample cases."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import SecretStr

from mqi_async.config import (
    GpuSettings,
    IngestSettings,
    LoggingSettings,
    RetrySettings,
    RunsSettings,
    Settings,
    SimulatedHostSettings,
    WebSettings,
    WebTokenSettings,
)
from mqi_async.demo.cases import CaseSpec, DeliveryError, DeliveryErrorKind, write_case
from mqi_async.domain.model import CaseStatus
from mqi_async.domain.verdict import QaStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    workdir: Path | None
    cases: int
    beams: int
    gpus: int
    headless: bool
    exit_when_done: bool
    #: seconds between two sample cases arriving
    arrival_gap_s: float = 2.0
    #: seconds the MOQUI simulator runs per beam
    run_seconds: float = 2.0
    #: write every delivery faithfully (no injected delivery errors)
    clean: bool = False
    #: serve the web view on 127.0.0.1:<port>
    web_port: int | None = None
    #: the sign-in token for the web view's actions (`run_demo` makes one)
    web_token: str | None = None


def demo_settings(workdir: Path, options: DemoOptions) -> Settings:
    """A complete config for the demo: everything under `workdir`, one simulated host."""
    return Settings(
        scan_directory=workdir / "incoming",
        work_directory=workdir / "work",
        database=workdir / "mqi.db",
        ingest=IngestSettings(rescan_seconds=10),
        hosts=[
            SimulatedHostSettings(
                kind="simulated", name="sim", gpus=options.gpus, run_seconds=options.run_seconds
            )
        ],
        gpu=GpuSettings(poll_seconds=2),
        runs=RunsSettings(poll_seconds=0.5, timeout_seconds=300),
        retry=RetrySettings(max_attempts=3, backoff_initial_seconds=1, backoff_max_seconds=10),
        logging=LoggingSettings(directory=workdir / "logs"),
        web=_web(options),
        config_dir=workdir,
    )


def _web(options: DemoOptions) -> WebSettings:
    if options.web_port is None:
        return WebSettings()
    from mqi_async.web.auth import make_hash

    tokens = (
        [WebTokenSettings(name="demo", hash=SecretStr(make_hash(options.web_token)))]
        if options.web_token
        else []
    )
    return WebSettings(enabled=True, port=options.web_port, refresh_seconds=2, tokens=tokens)


#: the delivery errors of the demo's mix, by case number modulo 4 (case 1 delivers faithfully)
_DEMO_ERRORS: dict[int, tuple[DeliveryError, ...]] = {
    1: (),
    2: (DeliveryError(kind=DeliveryErrorKind.SHIFT, layer=2, value=3.0, beam=1, fraction=2),),
    # one case whose report shows a passed, a conditional and a failed beam
    3: (
        DeliveryError(kind=DeliveryErrorKind.MISSING_LAYER, layer=3, beam=2, fraction=1),
        DeliveryError(kind=DeliveryErrorKind.METERSET, layer=None, value=15.0, beam=1, fraction=1),
    ),
    0: (
        DeliveryError(kind=DeliveryErrorKind.METERSET, layer=None, value=15.0, beam=1, fraction=1),
    ),
}


def _spec(i: int, options: DemoOptions, now: datetime) -> CaseSpec:
    return CaseSpec(
        case_id=f"DEMO{i:04d}",
        beams=options.beams,
        layers_per_beam=4,
        fractions=2,
        room="G1" if i % 2 else "G2",
        nested=i % 2 == 1,
        # delivered days ago, so every fraction window is closed and the case runs now
        first_delivery_at=(now - timedelta(days=2)).replace(tzinfo=None, microsecond=0),
        seed=i,
        delivery_errors=() if options.clean else _DEMO_ERRORS[i % 4],
    )


async def feed_cases(scan_directory: Path, options: DemoOptions) -> None:
    """Drop the sample cases into the scan directory one by one, marker last."""
    now = datetime.now().astimezone()
    for i in range(1, options.cases + 1):
        await asyncio.to_thread(
            write_case, scan_directory, _spec(i, options, now), marker_last=True
        )
        log.info("demo: case %d of %d arrived", i, options.cases)
        if i < options.cases:
            await asyncio.sleep(options.arrival_gap_s)


async def _run(settings: Settings, options: DemoOptions) -> int:
    from mqi_async.service import open_service, run_until_stopped

    outcome = {"all_completed": False}
    async with open_service(settings) as service:

        async def driver() -> None:
            await service.engine.ready.wait()
            await feed_cases(settings.scan_directory, options)
            if not options.exit_when_done:
                return
            while True:
                await asyncio.sleep(0.5)
                # done when every case finished, every check has its verdict and every
                # report is written
                cases = await service.store.snapshot()
                finished = [c for c in cases if c.status.is_terminal]
                if len(finished) >= options.cases and all(
                    c.qa.status != QaStatus.PENDING and (c.report or not settings.qa.report)
                    for c in cases
                ):
                    for c in cases:
                        log.info("demo: case %s: %s; report %s", c.case_id, c.qa.status, c.report)
                    outcome["all_completed"] = all(c.status == CaseStatus.COMPLETED for c in cases)
                    service.request_stop()
                    return

        ui = None
        if not options.headless:
            from mqi_async.ui.app import run_dashboard

            ui = run_dashboard

        async def with_driver(svc: object) -> None:
            task = asyncio.create_task(driver())
            try:
                if ui is not None:
                    await ui(service)
                else:
                    await asyncio.Event().wait()
            finally:
                task.cancel()

        await run_until_stopped(service, with_driver)
    if options.exit_when_done:
        return 0 if outcome["all_completed"] else 1
    return 0


def run_demo(options: DemoOptions) -> int:
    from mqi_async.log import configure_logging, remove_handlers

    os.umask(0o077)
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="mqi-demo-"))
    workdir = workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if options.web_port is not None and options.web_token is None:
        token = secrets.token_urlsafe(24)
        (workdir / "web-token").write_text(token + "\n")
        options = replace(options, web_token=token)
    settings = demo_settings(workdir, options)
    handlers = configure_logging(
        level="INFO",
        directory=settings.logging.directory,
        stdout=sys.stdout if options.headless else None,
    )
    try:
        started = datetime.now(UTC)
        if options.web_port is not None:
            log.info(
                "demo: web view on http://127.0.0.1:%d/ (sign in with the token in %s)",
                options.web_port,
                workdir / "web-token",
            )
        code = asyncio.run(_run(settings, options))
        log.info(
            "demo finished in %.1f s; data in %s",
            (datetime.now(UTC) - started).total_seconds(),
            workdir,
        )
        return code
    finally:
        remove_handlers(handlers)
