"""The empty state: before the first case, the cases area says where cases go."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from textual.widgets import DataTable

from mqi_async.domain.records import NewCase
from mqi_async.store import Store
from mqi_async.ui.app import DashboardApp
from mqi_async.ui.empty import EmptyState
from tests.ui.seed import SCAN, make_app


def empty_panel_text(app: DashboardApp) -> str:
    return str(app.query_one("#empty", EmptyState).render())


async def test_no_cases_shows_where_to_drop_them_until_the_first_arrives(
    empty_store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mqi_async")
    app = make_app(empty_store, tmp_path)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await pilot.pause()
        panel = app.query_one("#empty", EmptyState)
        cases = app.query_one("#cases", DataTable)
        assert panel.display and not cases.display
        text = " ".join(empty_panel_text(app).split())
        assert f"Drop a case folder into {SCAN}" in text
        assert "RTPLAN (.dcm), one log folder per delivery (PlanInfo.txt, *.ptn)" in text
        assert "_CASE_READY" in text
        assert "mqi-async demo" in text and "make demo" in text
        # every key does nothing harmful here
        for key in ("d", "enter", "r", "k", "c", "p", "l", "slash", "escape"):
            await pilot.press(key)
            assert app.is_running and len(app.screen_stack) == 1, key

        await empty_store.register_case(
            NewCase(case_id="FIRST", case_path=f"{SCAN}/FIRST", safe_name="FIRST")
        )
        for _ in range(100):
            await pilot.pause(0.05)
            if cases.row_count == 1 and cases.display:
                break
        assert cases.display and cases.row_count == 1
        assert not panel.display
        assert app.selected_case() == "FIRST"
        assert cases.has_focus  # ready for the keys
        await pilot.press("k", "y")
        await pilot.pause()
    assert [(c.kind, c.case_id) for c in await empty_store.pending_commands()] == [
        ("recheck", "FIRST")
    ]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_filter_matching_nothing_is_not_the_empty_state(
    clinic: Store, tmp_path: Path
) -> None:
    app = make_app(clinic, tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        await pilot.press("slash", "z", "z", "z", "enter")
        await pilot.pause()
        cases = app.query_one("#cases", DataTable)
        assert cases.row_count == 0 and cases.display
        assert not app.query_one("#empty", EmptyState).display


async def test_without_a_scan_directory_it_names_the_setting(
    empty_store: Store, tmp_path: Path
) -> None:
    app = DashboardApp(store=empty_store, work_directory=tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        assert "Drop a case folder into the folder named by scan_directory" in empty_panel_text(app)
