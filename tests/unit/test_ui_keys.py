"""Every dashboard key in every state, at two terminal sizes: the app never dies of a key.

The dashboard runs in the service's process, so an exception out of a key handler used to end
Textual and take the engine with it (`p` did: `store/commands.py` rejected its empty payload).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Label

from mqi_async.domain.errors import DatabaseError
from mqi_async.domain.gpus import GpuInfo, GpuSample
from mqi_async.domain.model import BeamStatus as B
from mqi_async.domain.model import CaseStatus as C
from mqi_async.domain.records import CommandKind, NewBeam, NewCase
from mqi_async.store import Store
from mqi_async.ui.app import DashboardApp
from mqi_async.ui.widgets import ConfirmDialog, LogScreen, PriorityDialog

SIZES = [(80, 24), (160, 50)]

#: every binding the dashboard and its dialogs have, Textual's own (palette, help-quit),
#: focus movement, and what a person types into the priority box or the filter
KEYS = [
    "r", "c", "p", "slash", "l", "q",
    "y", "n", "escape", "enter", "tab",
    "ctrl+p", "ctrl+c",
    "x", "5", "backspace",
]  # fmt: skip

#: the case each state selects (None: the empty store)
STATES: dict[str, str | None] = {
    "running": "RUN",
    "completed": "DONE",
    "failed": "FAIL",
    "paused host": "PAUSE",
}
#: what can be open on top of a state (Textual's command palette opens from each by ctrl+p)
OVERLAYS = ("main", "cancel dialog", "priority dialog", "log", "filter")


async def _walk(store: Store, beam_id: str, *path: B, **changes: Any) -> None:
    for status in path:
        await store.transition_beam(beam_id, status, changes=changes if status == path[-1] else {})


async def seed(store: Store, work: Path) -> None:
    """One case per state; the sim host's GPUs; a MOQUI log for the running beam."""
    for case_id in STATES.values():
        assert case_id is not None
        await store.register_case(
            NewCase(case_id=case_id, case_path=f"/scan/{case_id}", safe_name=case_id, room="G1"),
            beams=[NewBeam(beam_index=k, beam_number=k, beam_name=f"{k}G090") for k in (1, 2)],
        )
        await store.transition_case(case_id, C.INTERPRETING)
        await store.transition_case(case_id, C.PROCESSING)
    to_running = (B.UPLOADING, B.QUEUED, B.LAUNCHING, B.RUNNING)
    await _walk(store, "RUN_beam_1", *to_running, host="sim", progress=40)
    await _walk(store, "RUN_beam_2", B.UPLOADING, B.QUEUED)
    for k in (1, 2):
        await _walk(store, f"DONE_beam_{k}", *to_running, B.DOWNLOADING, B.CONVERTING, B.COMPLETED)
    await store.transition_case("DONE", C.POSTPROCESSING)
    await store.transition_case("DONE", C.COMPLETED)
    for k in (1, 2):
        await _walk(store, f"FAIL_beam_{k}", B.UPLOADING, B.FAILED, error="moqui_crashed: 134")
    await store.transition_case("FAIL", C.FAILED, changes={"error": "moqui_crashed: beam 1"})
    for k in (1, 2):
        await _walk(
            store, f"PAUSE_beam_{k}", *to_running, B.PAUSED, resume_status="running", host="sim"
        )
    await store.record_gpu_sample(
        GpuSample(
            host="sim",
            taken_at=datetime.now(UTC),
            gpus=tuple(
                GpuInfo(
                    index=i,
                    uuid=f"GPU-{i}",
                    name="H200",
                    memory_total_mb=143771,
                    memory_used_mb=1024,
                    memory_free_mb=142747,
                    temperature_c=34,
                    utilization_pct=3,
                )
                for i in range(2)
            ),
        )
    )
    log_dir = work / "RUN" / "runs" / "beam_1" / "attempt_1"
    log_dir.mkdir(parents=True)
    (log_dir / "moqui.log").write_text("Generating particles for (1 of 1) field\n" * 50)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(tmp_path / "mqi.db")
    try:
        yield s
    finally:
        await s.aclose()


class Recorder:
    """The app's notifications and quit requests, as a person would see them."""

    def __init__(self) -> None:
        self.notes: list[tuple[str, str]] = []
        self.quits = 0

    def quit(self) -> None:
        self.quits += 1


def make_app(
    store: Store, tmp_path: Path, paused: bool = False, refresh_hz: float = 4
) -> tuple[DashboardApp, Recorder]:
    rec = Recorder()
    app = DashboardApp(
        store=store,
        work_directory=tmp_path / "work",
        refresh_hz=refresh_hz,
        hosts_state=lambda: {"sim": "paused (host_unreachable)" if paused else "connected"},
        on_quit=rec.quit,
    )
    original = app.notify

    def notify(message: str, **kw: Any) -> None:
        rec.notes.append((message, str(kw.get("severity", "information"))))
        original(message, **kw)

    app.notify = notify  # type: ignore[method-assign]
    return app, rec


def assert_alive(app: DashboardApp, where: str) -> None:
    assert app.is_running, f"the dashboard ended ({where})"
    assert app.return_code is None, f"the dashboard exited with {app.return_code} ({where})"


async def back_to_main(app: DashboardApp, pilot: Pilot[None]) -> None:
    while len(app.screen_stack) > 1:
        app.pop_screen()
        await pilot.pause()
    box = app.query_one("#filter", Input)
    if box.has_class("visible"):
        await pilot.press("slash")
        await pilot.press("escape")
    cases = app.query_one("#cases", DataTable)
    if not cases.has_focus:
        cases.focus()
        await pilot.pause()


async def enter_state(app: DashboardApp, pilot: Pilot[None], case_id: str | None) -> None:
    await back_to_main(app, pilot)
    if case_id is not None and app.selected_case() != case_id:
        cases = app.query_one("#cases", DataTable)
        cases.move_cursor(row=cases.get_row_index(case_id))
        await pilot.pause()
    assert app.selected_case() == case_id


#: the screen each overlay shows (None: the dashboard itself)
_SCREENS: dict[str, type[Any] | None] = {
    "main": None,
    "cancel dialog": ConfirmDialog,
    "priority dialog": PriorityDialog,
    "log": LogScreen,
    "filter": None,
}
_OPEN = {
    "cancel dialog": "c",
    "priority dialog": "p",
    "log": "l",
    "filter": "slash",
}


def in_place(app: DashboardApp, case_id: str | None, overlay: str) -> bool:
    """Whether the app still shows `overlay` with `case_id` selected."""
    if app.selected_case() != case_id:
        return False
    expected = _SCREENS[overlay]
    if expected is None:
        if len(app.screen_stack) != 1:
            return False
        box = app.query_one("#filter", Input)
        return box.has_focus if overlay == "filter" else not box.has_class("visible")
    return len(app.screen_stack) == 2 and isinstance(app.screen, expected)


async def establish(
    app: DashboardApp, pilot: Pilot[None], case_id: str | None, overlay: str
) -> bool:
    """Select the state's case and open `overlay`; False where it cannot open (no case)."""
    await enter_state(app, pilot, case_id)
    if overlay in ("cancel dialog", "priority dialog", "log") and case_id is None:
        return False
    if overlay != "main":
        await pilot.press(_OPEN[overlay])
    assert in_place(app, case_id, overlay), f"could not open the {overlay} in {case_id}"
    return True


async def key_storm(app: DashboardApp, pilot: Pilot[None], states: dict[str, str | None]) -> int:
    """Press every key in every state and overlay; returns how many presses were made."""
    pressed = 0
    for state, case_id in states.items():
        for overlay in OVERLAYS:
            if not await establish(app, pilot, case_id, overlay):
                continue
            for key in KEYS:
                if overlay == "main" and key == "q":
                    continue  # quits, by design: tested on its own below
                if not in_place(app, case_id, overlay):
                    await establish(app, pilot, case_id, overlay)
                await pilot.press(key)  # waits until the app has handled it
                assert_alive(app, f"{key!r} in state {state!r}, {overlay}")
                pressed += 1
    return pressed


def ui_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("mqi_async.ui") and r.levelno >= logging.ERROR
    ]


@pytest.mark.slow
@pytest.mark.timeout(600)  # some 350 key presses, each waiting until the app is idle
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_every_key_in_every_state_keeps_the_app_alive(
    store: Store, tmp_path: Path, size: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mqi_async")
    # no case at all (and a paused host, the first thing a fresh install may show)
    app, rec = make_app(store, tmp_path, paused=True, refresh_hz=1)
    async with app.run_test(size=size, notifications=True) as pilot:
        await pilot.pause()
        pressed = await key_storm(app, pilot, {"no case": None})
        assert ("no case selected", "warning") in rec.notes
    assert pressed > 0
    assert await store.pending_commands() == []

    await seed(store, tmp_path / "work")
    for paused in (False, True):
        states = {k: v for k, v in STATES.items() if (k == "paused host") == paused}
        app, rec = make_app(store, tmp_path, paused=paused, refresh_hz=1)
        async with app.run_test(size=size, notifications=True) as pilot:
            await pilot.pause()
            assert app.query_one("#cases", DataTable).row_count == len(STATES)
            pressed += await key_storm(app, pilot, states)
            assert_alive(app, "after the storm")
            assert rec.quits == 0
            # the log dialog showed the running beam's MOQUI log
            await enter_state(app, pilot, "RUN")
            await pilot.press("l")
            await pilot.pause()
            assert isinstance(app.screen, LogScreen)
            assert "Generating particles" in str(app.screen.query_one("Static").render())
            await back_to_main(app, pilot)
            # and q still quits: once, cleanly, telling the service
            await pilot.press("q")
            await pilot.pause()
        assert app.return_code == 0
        assert rec.quits == 1
    print(f"{pressed} key presses")
    assert pressed > 2 * len(KEYS) * len(OVERLAYS)
    assert ui_failures(caplog) == []
    # what the storm asked for reached the store as well-formed commands
    commands = await store.pending_commands(limit=10_000)
    kinds = {c.kind for c in commands}
    assert kinds == {CommandKind.RETRY, CommandKind.CANCEL, CommandKind.PRIORITY}
    assert {c.case_id for c in commands} <= set(STATES.values())
    for c in commands:
        if c.kind == CommandKind.PRIORITY:
            assert isinstance(c.payload["priority"], int)


async def test_priority_asks_for_a_value_and_checks_it(store: Store, tmp_path: Path) -> None:
    await seed(store, tmp_path / "work")
    app, rec = make_app(store, tmp_path)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await pilot.pause()
        await enter_state(app, pilot, "FAIL")
        await pilot.press("p")
        await pilot.pause()
        dialog = app.screen
        assert isinstance(dialog, PriorityDialog)
        box = dialog.query_one("#priority-value", Input)
        assert box.value == "1"  # the case's priority (0) plus one
        problem = dialog.query_one("#priority-problem", Label)
        for bad, why in (("high", "whole number"), ("5000", "from -999 to 999"), ("", "whole")):
            box.value = bad
            await pilot.press("enter")
            await pilot.pause()
            assert app.screen is dialog, f"{bad!r} was accepted"
            assert why in str(problem.render())
        assert await store.pending_commands() == []
        box.value = ""
        await pilot.press("minus", "7", "enter")
        await pilot.pause()
        assert not isinstance(app.screen, PriorityDialog)
        assert ("priority -7 of FAIL requested", "information") in rec.notes
        # escape asks nothing
        await pilot.press("p")
        await pilot.pause()
        await pilot.press("escape")
        await pilot.pause()
    [command] = await store.pending_commands()
    assert (command.kind, command.case_id, command.payload) == (
        CommandKind.PRIORITY,
        "FAIL",
        {"priority": -7},
    )


async def test_a_failing_action_is_a_notification_and_a_log_line(
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mqi_async")
    await seed(store, tmp_path / "work")

    async def unwritable(*args: object, **kw: object) -> None:
        raise DatabaseError("database_unwritable", "disk full")

    monkeypatch.setattr(store, "enqueue_command", unwritable)
    monkeypatch.setattr(store, "get_beam", unwritable)
    app, rec = make_app(store, tmp_path)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await pilot.pause()
        await enter_state(app, pilot, "RUN")
        await pilot.press("r")
        await pilot.press("c", "y")
        await pilot.press("p", "enter")
        await pilot.press("l")
        await pilot.pause()
        assert_alive(app, "after failing actions")
    errors = [n for n, severity in rec.notes if severity == "error"]
    assert errors == [
        "retry failed: database_unwritable: disk full",
        "cancel failed: database_unwritable: disk full",
        "priority failed: database_unwritable: disk full",
        "log failed: database_unwritable: disk full",
    ]
    failures = [r for r in caplog.records if r.name == "mqi_async.ui.widgets"]
    assert [r.getMessage() for r in failures] == [
        f"dashboard: {what} failed: database_unwritable: disk full"
        for what in ("retry", "cancel", "priority", "log")
    ]
    assert all(r.exc_info is not None for r in failures)


async def test_a_failing_refresh_is_shown_once_and_recovers(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await seed(store, tmp_path / "work")
    app, rec = make_app(store, tmp_path)
    real = store.dashboard
    broken = {"on": True}

    async def flaky(*args: Any, **kw: Any) -> Any:
        if broken["on"]:
            raise DatabaseError("database_unavailable", "locked")
        return await real(*args, **kw)

    monkeypatch.setattr(store, "dashboard", flaky)
    async with app.run_test(size=(80, 24), notifications=True) as pilot:
        await pilot.pause(0.6)  # several refresh ticks
        assert_alive(app, "while refreshes fail")
        broken["on"] = False
        for _ in range(40):
            await pilot.pause(0.05)
            if app.query_one("#cases", DataTable).row_count == len(STATES):
                break
        assert app.query_one("#cases", DataTable).row_count == len(STATES)
    failed = [n for n, s in rec.notes if s == "error"]
    assert failed == ["refreshing the view failed: database_unavailable: locked"]
    assert ("the view is up to date again", "information") in rec.notes


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_dialogs_are_small_and_centred(
    store: Store, tmp_path: Path, size: tuple[int, int]
) -> None:
    await seed(store, tmp_path / "work")
    app, _ = make_app(store, tmp_path)
    width, height = size
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        for key, dialog_id, max_height in (
            ("c", "#confirm-dialog", 4),
            ("p", "#priority-dialog", 7),
        ):
            await enter_state(app, pilot, "RUN")
            await pilot.press(key)
            await pilot.pause()
            region = app.screen.query_one(dialog_id).region
            assert region.height <= max_height, (dialog_id, region)
            assert region.width <= 70, (dialog_id, region)
            assert abs(region.x + region.width / 2 - width / 2) <= 1, (dialog_id, region)
            assert abs(region.y + region.height / 2 - height / 2) <= 1, (dialog_id, region)
        await back_to_main(app, pilot)
