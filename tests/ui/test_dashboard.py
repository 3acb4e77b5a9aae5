"""Pilot tests of the dashboard against a real, seeded SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mqi_async.domain.model import BeamStatus, CaseStatus
from mqi_async.domain.records import CommandKind, NewBeam, NewCase
from mqi_async.store import Store
from mqi_async.ui.app import DashboardApp


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "mqi.db")
    for i in (1, 2):
        await s.register_case(
            NewCase(
                case_id=f"case{i}", case_path=f"/scan/case{i}", safe_name=f"case{i}", room="G1"
            ),
            beams=[NewBeam(beam_index=k, beam_number=k + 1, beam_name=f"{k}G090") for k in (1, 2)],
        )
    await s.transition_case("case1", CaseStatus.INTERPRETING)
    await s.transition_case("case1", CaseStatus.PROCESSING)
    await s.transition_beam("case1_beam_1", BeamStatus.UPLOADING, changes={"progress": 5})
    try:
        yield s
    finally:
        await s.aclose()


def _app(store: Store, tmp_path: Path) -> DashboardApp:
    return DashboardApp(store=store, work_directory=tmp_path / "work", refresh_hz=20)


async def test_tables_show_seeded_cases_and_beams(store: Store, tmp_path: Path) -> None:
    app = _app(store, tmp_path)
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.pause()
        cases = app.query_one("#cases")
        assert cases.row_count == 2  # type: ignore[attr-defined]
        assert cases.get_cell("case1", "status") == "processing"  # type: ignore[attr-defined]
        assert cases.get_cell("case2", "beams") == "0/2"  # type: ignore[attr-defined]
        beams = app.query_one("#beams")
        assert beams.row_count == 2  # type: ignore[attr-defined]
        assert beams.get_cell("case1_beam_1", "status") == "uploading"  # type: ignore[attr-defined]
        assert beams.get_cell("case1_beam_2", "#") == "3"  # type: ignore[attr-defined]
        assert "case1" in app.export_screenshot()


async def test_r_and_c_create_commands(store: Store, tmp_path: Path) -> None:
    app = _app(store, tmp_path)
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.pause()
        await pilot.press("r")
        await pilot.press("c")
        await pilot.pause()
        await pilot.press("y")  # confirm the cancel
        await pilot.pause()
    pending = await store.pending_commands()
    assert [(c.kind, c.case_id) for c in pending] == [
        (CommandKind.RETRY, "case1"),
        (CommandKind.CANCEL, "case1"),
    ]


async def test_cancel_needs_confirmation(store: Store, tmp_path: Path) -> None:
    app = _app(store, tmp_path)
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.pause()
        await pilot.press("c")
        await pilot.pause()
        await pilot.press("n")
        await pilot.pause()
    assert await store.pending_commands() == []


async def test_view_refreshes_when_store_changes(store: Store, tmp_path: Path) -> None:
    app = _app(store, tmp_path)
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.pause()
        await store.transition_beam("case1_beam_1", BeamStatus.QUEUED, changes={"progress": 10})
        await store.register_case(
            NewCase(case_id="case3", case_path="/scan/case3", safe_name="case3")
        )
        beams = app.query_one("#beams")
        cases = app.query_one("#cases")
        for _ in range(100):
            await pilot.pause(0.05)
            if cases.row_count == 3 and beams.get_cell("case1_beam_1", "status") == "queued":  # type: ignore[attr-defined]
                break
        assert cases.row_count == 3  # type: ignore[attr-defined]
        assert beams.get_cell("case1_beam_1", "status") == "queued"  # type: ignore[attr-defined]


async def test_filter_narrows_cases(store: Store, tmp_path: Path) -> None:
    app = _app(store, tmp_path)
    async with app.run_test(size=(160, 40)) as pilot:
        await pilot.pause()
        await pilot.press("/")
        await pilot.pause()
        await pilot.press("c", "a", "s", "e", "2", "enter")
        await pilot.pause()
        cases = app.query_one("#cases")
        assert cases.row_count == 1  # type: ignore[attr-defined]
