"""The dashboard inside the real service (simulated GPU host): keys and a crash never stop it."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable

from mqi_async.config import Settings
from mqi_async.demo.cases import CaseSpec, write_case
from mqi_async.demo.runner import DemoOptions, demo_settings
from mqi_async.domain.model import CaseStatus
from mqi_async.domain.records import CommandKind, CommandStatus
from mqi_async.service import Service, open_service, run_until_stopped
from mqi_async.ui.app import DashboardApp, DashboardCrashed, dashboard_for, run_dashboard
from mqi_async.ui.widgets import ConfirmDialog, PriorityDialog
from tests.e2e import running_service, wait_until

pytestmark = pytest.mark.slow


def settings_in(root: Path) -> Settings:
    options = DemoOptions(
        workdir=root, cases=0, beams=1, gpus=2, headless=True, exit_when_done=False,
        run_seconds=1.0,
    )  # fmt: skip
    return demo_settings(root, options)


def drop_case(settings: Settings, case_id: str) -> None:
    first = (datetime.now() - timedelta(hours=2)).replace(microsecond=0)
    spec = CaseSpec(
        case_id=case_id, beams=1, layers_per_beam=1, samples_per_layer=8, first_delivery_at=first
    )
    write_case(settings.scan_directory, spec, marker_last=True)


async def status_of(service: Service, case_id: str) -> CaseStatus | None:
    return (await service.store.case_statuses()).get(case_id)


async def test_every_key_on_a_live_service_leaves_the_engine_running(tmp_path: Path) -> None:
    settings = settings_in(tmp_path / "svc")
    async with running_service(settings) as service:
        app = dashboard_for(service)
        async with app.run_test(size=(80, 24)) as pilot:
            # no case yet: every dashboard key, nothing breaks, nothing is sent
            for key in ("r", "c", "p", "l", "slash", "escape", "ctrl+p", "escape", "ctrl+c"):
                await pilot.press(key)
                assert app.is_running, key
            drop_case(settings, "KEEP")
            drop_case(settings, "STOP")
            cases = app.query_one("#cases", DataTable)
            await wait_until(lambda: cases.row_count == 2, what="both cases on screen")
            # KEEP: a retry, a priority, a declined cancel, its log, the filter
            cases.move_cursor(row=cases.get_row_index("KEEP"))
            await pilot.pause()
            assert app.selected_case() == "KEEP"
            await pilot.press("r", "p")
            assert isinstance(app.screen, PriorityDialog)
            await pilot.press("backspace", "5", "enter", "c")
            assert isinstance(app.screen, ConfirmDialog)
            await pilot.press("q", "r", "p", "n")  # keys meant for the dashboard do nothing here
            assert len(app.screen_stack) == 1
            await pilot.press("l", "escape", "slash", "K", "E", "enter", "slash", "escape")
            # STOP: cancelled after the confirmation
            cases.move_cursor(row=cases.get_row_index("STOP"))
            await pilot.pause()
            await pilot.press("c", "y")
            assert app.is_running and app.return_code is None
            # the engine carried on: it handled every command, and both cases ended
            await wait_until(lambda: _all_handled(service), timeout_s=60, what="commands handled")
            await wait_until(
                lambda: _is(service, "KEEP", CaseStatus.COMPLETED), timeout_s=120, what="KEEP done"
            )
            await wait_until(
                lambda: _is(service, "STOP", CaseStatus.CANCELLED, CaseStatus.COMPLETED),
                timeout_s=60,
                what="STOP ended",
            )
            assert not service.stopping.is_set()
            await pilot.press("q")
            await pilot.pause()
        assert app.return_code == 0
        assert service.stopping.is_set()  # q asked the service to stop, gracefully
        handled = await _commands(service)
    # exactly what was asked for, each handled by the engine (none left pending)
    assert sorted((kind, case) for kind, case, _ in handled) == [
        (str(CommandKind.CANCEL), "STOP"),
        (str(CommandKind.PRIORITY), "KEEP"),
        (str(CommandKind.RETRY), "KEEP"),
    ]
    assert str(CommandStatus.PENDING) not in {status for _, _, status in handled}


async def _all_handled(service: Service) -> bool:
    return await service.store.pending_commands() == []


async def _is(service: Service, case_id: str, *wanted: CaseStatus) -> bool:
    return await status_of(service, case_id) in wanted


async def _commands(service: Service) -> list[tuple[str, str, str]]:
    """Every command the dashboard sent, with what the engine made of it."""
    out = []
    async with service.store.read() as tx:
        for command_id in range(1, 100):
            c = await tx.commands.get(command_id)
            if c is not None:
                out.append((str(c.kind), c.case_id, str(c.status)))
    return out


def _broken_compose(self: DashboardApp) -> Any:
    raise RuntimeError("the dashboard broke while drawing")


async def test_a_crashed_dashboard_leaves_the_service_running_headless(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The crash is logged with its traceback; the engine runs on until SIGTERM/SIGINT."""
    caplog.set_level(logging.INFO, logger="mqi_async")
    monkeypatch.setattr(DashboardApp, "compose", _broken_compose)
    settings = settings_in(tmp_path / "svc")
    async with open_service(settings) as service:
        task = asyncio.create_task(
            run_until_stopped(service, functools.partial(run_dashboard, headless=True))
        )

        def crash_records() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "dashboard crashed" in r.getMessage()]

        [record] = await wait_until(crash_records, timeout_s=30, what="the crash logged")
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], DashboardCrashed)
        assert "the dashboard broke while drawing" in str(record.exc_info[1].__cause__)
        assert not task.done() and not service.stopping.is_set()
        # the engine still takes and finishes cases
        await asyncio.wait_for(service.engine.ready.wait(), 30)
        drop_case(settings, "AFTER")
        await wait_until(
            lambda: _is(service, "AFTER", CaseStatus.COMPLETED), timeout_s=120, what="AFTER done"
        )
        assert not task.done()
        # SIGTERM's handler: a graceful stop
        service.request_stop()
        await asyncio.wait_for(task, 30)
    # headless from then on: JSON log lines on stdout, the crash first, with its traceback
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert "dashboard crashed" in lines[0]["message"]
    assert "the dashboard broke while drawing" in lines[0]["exc"]
    assert any("AFTER" in str(line) for line in lines[1:])


async def test_quitting_the_dashboard_stops_the_service_gracefully(tmp_path: Path) -> None:
    settings = settings_in(tmp_path / "svc")

    async def quits_at_once(service: Service) -> None:
        await asyncio.wait_for(service.engine.ready.wait(), 30)

    async with open_service(settings) as service:
        await asyncio.wait_for(run_until_stopped(service, quits_at_once), 30)
        assert service.stopping.is_set()
