"""The case detail screen: verdicts, beams, the daily record, events, and its keys."""

from __future__ import annotations

import dataclasses
import logging
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import DataTable, Static

from mqi_async.domain.records import CommandKind
from mqi_async.domain.verdict import QaStatus as Q
from mqi_async.store import Store
from mqi_async.ui.app import DashboardApp
from mqi_async.ui.detail import PLAN_SUM_KEY, CaseDetailScreen, summary_text
from mqi_async.ui.widgets import ConfirmDialog
from tests.ui.seed import APP_TIME, SCAN, make_app, new_delivery


def detail(app: DashboardApp) -> CaseDetailScreen:
    screen = app.screen
    assert isinstance(screen, CaseDetailScreen), screen
    return screen


def summary(app: DashboardApp) -> str:
    return str(detail(app).query_one("#detail-summary", Static).render())


def events(app: DashboardApp) -> str:
    """The event log's text, wrapped lines joined again."""
    text = detail(app).query_one("#detail-events-text", Static).render()
    return re.sub(r"\s+", " ", str(text))


def plain(value: object) -> str:
    return value.plain if isinstance(value, Text) else str(value)


async def open_case(app: DashboardApp, pilot: Pilot[None], case_id: str, key: str = "d") -> None:
    cases = app.query_one("#cases", DataTable)
    cases.move_cursor(row=cases.get_row_index(case_id))
    await pilot.pause()
    await pilot.press(key)
    await pilot.pause()
    assert detail(app).case_id == case_id


async def test_detail_shows_verdicts_daily_record_and_events(clinic: Store, tmp_path: Path) -> None:
    app = make_app(clinic, tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await open_case(app, pilot, "MIXED")
        text = summary(app)
        assert "room G2 · completed 100% · 2/2 beams done · 1h12m old" in text
        assert "verdict  failed  delivery 2026030207360000: failed (meterset_deviation" in text
        assert "plan sum conditional 93.2%  γ mean 0.50  γ max 2.00" in text
        assert "report   no report yet" in text
        assert f"folder   {SCAN}/MIXED" in text

        beams = detail(app).query_one("#detail-beams", DataTable)
        assert [plain(beams.get_cell(k, "verdict")) for k in ("MIXED_beam_1", "MIXED_beam_2")] == [
            "passed 97.0%",
            "conditional 91.3%",
        ]
        assert beams.get_cell("MIXED_beam_2", "γ mean") == "0.62"
        assert beams.get_cell("MIXED_beam_2", "points") == "812,345"
        assert plain(beams.get_cell(PLAN_SUM_KEY, "verdict")) == "conditional 93.2%"

        # the daily record: a heading per fraction (its day and worst verdict), then its deliveries
        record = detail(app).query_one("#detail-deliveries", DataTable)
        rows = [[plain(c) for c in record.get_row_at(i)] for i in range(record.row_count)]
        assert [r[0] for r in rows if r[0]] == ["fraction 1 (ref)", "fraction 2", "fraction 3"]
        assert rows[0][:5] == ["fraction 1 (ref)", "2026-03-01", "2 deliveries", "", "passed"]
        assert rows[3][:5] == ["fraction 2", "2026-03-02", "2 deliveries", "", "failed"]
        assert rows[5] == [
            "",
            "07:36:00",
            "2026030207360000",
            "2",
            "failed 62.0%",
            "0.6 mm",
            "15.1%",
            "meterset_deviation: 15.1 % more than planned",
        ]
        failed = record.get_cell("delivery:MIXED/2026030207360000", "verdict")
        assert failed == Text("failed 62.0%", style="bold red")

        # the case's own events only, oldest first
        log = events(app)
        assert "case_registered" in log
        assert "delivery 2026030207360000 (fraction 2): failed 62.04 %" in log
        assert "GOOD" not in log
        assert log.index("case_registered") < log.index("delivery_check")

        await pilot.press("escape")
        await pilot.pause()
        assert len(app.screen_stack) == 1
        assert app.selected_case() == "MIXED"


async def test_enter_opens_and_q_only_closes_the_detail(clinic: Store, tmp_path: Path) -> None:
    quits: list[int] = []
    app = make_app(clinic, tmp_path, on_quit=lambda: quits.append(1))
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await open_case(app, pilot, "GOOD", key="enter")
        assert "verdict  passed 98.8%" in summary(app)
        await pilot.press("d")  # the detail of a detail: nothing
        await pilot.pause()
        assert len(app.screen_stack) == 2
        await pilot.press("q")
        await pilot.pause()
        assert len(app.screen_stack) == 1
        assert app.is_running and quits == []


async def test_k_asks_then_requests_a_recheck_from_the_detail_and_the_list(
    clinic: Store, tmp_path: Path
) -> None:
    app = make_app(clinic, tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await open_case(app, pilot, "MIXED")
        await pilot.press("k")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmDialog)
        await pilot.press("n")  # declined: nothing sent
        await pilot.pause()
        assert await clinic.pending_commands() == []
        await pilot.press("k")
        await pilot.pause()
        await pilot.press("y")
        await pilot.pause()
        assert detail(app).case_id == "MIXED"  # still on the detail
        await pilot.press("r")
        await pilot.pause()
        await pilot.press("escape")
        await pilot.pause()
        # on the list, the selected case
        cases = app.query_one("#cases", DataTable)
        cases.move_cursor(row=cases.get_row_index("FAIL"))
        await pilot.pause()
        await pilot.press("k", "y")
        await pilot.pause()
    assert [(c.kind, c.case_id) for c in await clinic.pending_commands()] == [
        (CommandKind.RECHECK, "MIXED"),
        (CommandKind.RETRY, "MIXED"),
        (CommandKind.RECHECK, "FAIL"),
    ]
    assert app.sent == [("recheck", "MIXED"), ("retry", "MIXED"), ("recheck", "FAIL")]


async def test_the_detail_follows_the_store(clinic: Store, tmp_path: Path) -> None:
    """A late delivery of fraction 1 lands under fraction 1; its check and event show up."""
    app = make_app(clinic, tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await open_case(app, pilot, "MIXED")
        late = new_delivery("MIXED", 1, 2, APP_TIME - timedelta(days=1, hours=-2))
        await clinic.add_deliveries("MIXED", [late])
        [row] = [
            d for d in await clinic.list_deliveries("MIXED") if d.delivery_id == late.delivery_id
        ]
        await clinic.record_delivery_check(
            row, status=Q.CONDITIONAL, result={"pass_rate_percent": 90.0}
        )
        record = detail(app).query_one("#detail-deliveries", DataTable)
        key = f"delivery:{late.delivery_id}"
        # until a refresh after the check (one between the two writes shows it pending)
        for _ in range(200):
            await pilot.pause(0.05)
            if (
                key in record.rows
                and "conditional 90.0 %" in events(app)
                and plain(record.get_cell("fraction:1", "verdict")) == "conditional"
            ):
                break
        keys = [str(k.value) for k in record.rows]
        assert keys.index(key) < keys.index("fraction:2")
        assert plain(record.get_cell("fraction:1", "folder")) == "3 deliveries"
        assert plain(record.get_cell("fraction:1", "verdict")) == "conditional"
        assert plain(record.get_cell(key, "verdict")) == "conditional 90.0%"
        assert "conditional 90.0 %" in events(app)


async def test_summary_names_the_report_path(clinic: Store) -> None:
    [case] = [c for c in await clinic.snapshot() if c.case_id == "GOOD"]
    text = summary_text(
        dataclasses.replace(case, report="/srv/work/GOOD/report.pdf"), "GOOD", APP_TIME
    )
    assert "report   /srv/work/GOOD/report.pdf" in text.plain
    assert "not in the database" in summary_text(None, "GONE", APP_TIME).plain


#: every key, on the detail screen and what it opens
DETAIL_KEYS = [
    "r", "k", "n", "k", "y", "c", "n", "p", "enter", "l", "escape",
    "d", "slash", "enter", "tab", "down", "up", "x", "5", "ctrl+p", "escape",
]  # fmt: skip


@pytest.mark.slow
async def test_every_key_on_the_detail_of_every_case(
    clinic: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mqi_async")
    notes: list[tuple[str, str]] = []
    app = make_app(clinic, tmp_path, refresh_hz=2)
    original = app.notify

    def notify(message: str, **kw: Any) -> None:
        notes.append((message, str(kw.get("severity", "information"))))
        original(message, **kw)

    app.notify = notify  # type: ignore[method-assign]
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        for case_id in ("GOOD", "MIXED", "RUN", "SKIP", "FAIL"):
            while len(app.screen_stack) > 1:
                app.pop_screen()
                await pilot.pause()
            await open_case(app, pilot, case_id)
            for key in DETAIL_KEYS:
                await pilot.press(key)
                assert app.is_running and app.return_code is None, (case_id, key)
            while len(app.screen_stack) > 1:
                app.pop_screen()
                await pilot.pause()
        # a detail whose case is not (or no longer) in the database
        await app.push_screen(CaseDetailScreen("GONE"))
        await pilot.pause(0.2)
        assert "GONE: not in the database" in summary(app)
        await pilot.press("r", "k", "y", "l", "escape")
        await pilot.pause()
        assert app.is_running and app.return_code is None
    assert ("unknown case GONE", "error") in notes
    assert [n for n, severity in notes if severity == "error"] == [
        "unknown case GONE",
        "unknown case GONE",
    ]
    failures = [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("mqi_async.ui") and r.levelno >= logging.ERROR
    ]
    assert failures == []
    commands = await clinic.pending_commands(limit=1000)
    assert {c.kind for c in commands} == {
        CommandKind.RETRY,
        CommandKind.RECHECK,
        CommandKind.PRIORITY,
    }
    assert {c.case_id for c in commands} == {"GOOD", "MIXED", "RUN", "SKIP", "FAIL"}
