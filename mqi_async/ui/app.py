"""The Textual dashboard: cases, beams, GPUs and events, refreshed from a store snapshot."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.events import Key
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Input, RichLog, Static

from mqi_async.config import IGNORE_HOST_KEYS
from mqi_async.domain.model import CaseStatus
from mqi_async.domain.records import CommandKind
from mqi_async.store import CaseSnapshot, EventRow, GpuRow, LeaseRow, Store
from mqi_async.store.skipped import SkippedFolderRow
from mqi_async.store.snapshot import DashboardCounts
from mqi_async.ui.cells import beam_cells, case_cells, clock, gpu_cells
from mqi_async.ui.detail import CaseDetailScreen
from mqi_async.ui.empty import EmptyState
from mqi_async.ui.tables import Rows, cursor_key, row_value, sync_table
from mqi_async.ui.widgets import ConfirmDialog, LogScreen, PriorityDialog, guarded, report_failure

log = logging.getLogger(__name__)

CASE_COLUMNS = ("case", "room", "status", "verdict", "progress", "beams", "age", "error")
BEAM_COLUMNS = (
    "beam",
    "#",
    "status",
    "verdict",
    "host",
    "gpu",
    "attempt",
    "progress",
    "transfer",
    "elapsed",
)
GPU_COLUMNS = ("host", "gpu", "name", "util", "memory", "temp", "owner")


def local_now() -> datetime:
    """The dashboard's clock: now, in the local zone (times are shown in its zone)."""
    return datetime.now(UTC).astimezone()


@dataclass(frozen=True, slots=True, kw_only=True)
class Dashboard:
    """Everything one refresh shows, read from the store in one go."""

    cases: Sequence[CaseSnapshot]
    counts: DashboardCounts
    gpus: Sequence[GpuRow]
    leases: Sequence[LeaseRow]
    events: Sequence[EventRow]
    clusters: Mapping[str, str] = field(default_factory=dict)
    hosts: Mapping[str, str] = field(default_factory=dict)
    state: str = "running"
    #: folders the last scan could not take (names not UTF-8, unreadable)
    skipped: Sequence[SkippedFolderRow] = ()

    @property
    def no_cases(self) -> bool:
        """The database holds no case at all (not: the filter matches none)."""
        return not self.cases and not any(self.counts.cases_by_status.values())


def newest_log_text(runs_dir: Path, limit_bytes: int = 20000) -> str:
    """The end of the newest attempt's MOQUI log (downloaded, or the live tail the engine keeps)."""
    candidates = [p for p in runs_dir.glob("attempt_*/moqui.log*") if p.is_file()]
    if not candidates:
        return ""
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    try:
        with newest.open("rb") as fh:
            fh.seek(max(0, newest.stat().st_size - limit_bytes))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


class DashboardApp(App[None]):
    """Live view of the service; it reads the store and writes commands, nothing else."""

    TITLE = "mqi-async"
    CSS = """
    #header { height: 1; background: $primary; color: $text; padding: 0 1; }
    #left { width: 3fr; }
    #right { width: 2fr; }
    #cases { height: 2fr; }
    #beams { height: 1fr; }
    #left.empty #cases, #left.empty #beams { display: none; }
    #gpus { height: 1fr; }
    #events { height: 1fr; border-top: solid $primary; }
    #skipped { height: auto; max-height: 4; background: $warning 30%; padding: 0 1; }
    #skipped.empty { display: none; }
    #filter { display: none; }
    #filter.visible { display: block; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("d", "detail", "Detail"),
        Binding("r", "retry", "Retry"),
        Binding("c", "cancel", "Cancel"),
        Binding("k", "recheck", "Re-run checks"),
        Binding("p", "priority", "Priority"),
        Binding("/", "filter", "Filter"),
        Binding("l", "log", "Log"),
        Binding("q", "quit_service", "Quit"),
    ]

    def __init__(
        self,
        *,
        store: Store,
        work_directory: Path,
        refresh_hz: float = 2.0,
        hosts_state: Callable[[], Mapping[str, str]] = dict,
        service_state: Callable[[], str] = lambda: "running",
        on_quit: Callable[[], None] | None = None,
        scan_directory: Path | None = None,
        now: Callable[[], datetime] = local_now,
    ) -> None:
        """`scan_directory` is named by the empty state; `now` is the clock for ages, and its
        zone the one times are shown in (tests pin both)."""
        super().__init__()
        self._store = store
        self._work = work_directory
        self._scan = scan_directory
        self._now = now
        self._interval_s = 1.0 / refresh_hz
        self._hosts_state = hosts_state
        self._service_state = service_state
        self._on_quit = on_quit
        self._filter = ""
        self._selected_case: str | None = None
        self._case_rows: Rows = {}
        self._beam_rows: Rows = {}
        self._gpu_rows: Rows = {}
        self._last: Dashboard | None = None
        self._last_event_id = 0
        self._refreshing = False
        #: the last refresh failure shown (None while refreshes work)
        self._refresh_error: str | None = None
        #: the commands this app sent, for tests and the footer
        self.sent: list[tuple[str, str]] = []

    def compose(self) -> ComposeResult:
        yield Static("mqi-async", id="header")
        yield Static("", id="skipped", classes="empty", markup=False)
        yield Input(
            placeholder="filter cases (enter to apply, escape to clear)", id="filter", disabled=True
        )
        with Horizontal():
            with Vertical(id="left"):
                yield EmptyState(self._scan, id="empty")
                yield DataTable(id="cases", cursor_type="row", zebra_stripes=True)
                yield DataTable(id="beams", cursor_type="row")
            with Vertical(id="right"):
                yield DataTable(id="gpus", cursor_type="row")
                yield RichLog(id="events", max_lines=500, wrap=True, markup=False, min_width=20)
        yield Footer()

    @guarded("starting the dashboard")
    async def on_mount(self) -> None:
        for table_id, columns in (
            ("cases", CASE_COLUMNS),
            ("beams", BEAM_COLUMNS),
            ("gpus", GPU_COLUMNS),
        ):
            table = self.query_one(f"#{table_id}", DataTable)
            for col in columns:
                table.add_column(col, key=col)
        self.query_one("#cases", DataTable).focus()
        self.set_interval(self._interval_s, self._tick)
        await self._refresh_guarded()

    def _tick(self) -> None:
        if not self._refreshing:
            self._refresh_worker()

    @work(exclusive=True, group="refresh", exit_on_error=False)
    async def _refresh_worker(self) -> None:
        await self._refresh_guarded()

    async def _refresh_guarded(self) -> None:
        """Refresh; a failure (database busy or unreadable) is shown once, the next tick retries."""
        try:
            await self.refresh_view()
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            if text != self._refresh_error:
                self._refresh_error = text
                report_failure(self, "refreshing the view", exc)
            return
        if self._refresh_error is not None:
            self._refresh_error = None
            self.notify("the view is up to date again")
            log.info("dashboard: refresh works again", extra={"component": "ui"})

    async def read_dashboard(self) -> Dashboard:
        """One bounded read: unfinished and recent cases (or the filter's), GPUs, events."""
        cases, counts = await self._store.dashboard(recent=200, text=self._filter)
        return Dashboard(
            cases=cases,
            counts=counts,
            gpus=await self._store.list_gpus(),
            leases=await self._store.list_leases(),
            events=await self._store.recent_events(100),
            clusters={h.name: h.detail for h in await self._store.list_hosts() if h.detail},
            hosts=self._hosts_state(),
            state=self._service_state(),
            skipped=await self._store.list_skipped_folders(),
        )

    async def read_case(
        self, case_id: str, dash: Dashboard | None
    ) -> tuple[CaseSnapshot | None, list[EventRow]]:
        """One case for its detail screen (from the refresh's read when it is there) and its
        newest events."""
        case = next((c for c in dash.cases if c.case_id == case_id), None) if dash else None
        if case is None:
            # not among the dashboard's cases (aged out, or hidden by the filter)
            found, _ = await self._store.dashboard(recent=20, text=case_id)
            case = next((c for c in found if c.case_id == case_id), None)
        return case, await self._store.recent_events(200, case_id=case_id)

    def _detail_screens(self) -> list[CaseDetailScreen]:
        return [s for s in self.screen_stack if isinstance(s, CaseDetailScreen)]

    async def refresh_view(self) -> None:
        """Read a snapshot and update only the cells that changed."""
        self._refreshing = True
        try:
            dash = await self.read_dashboard()
            details = [(s, *await self.read_case(s.case_id, dash)) for s in self._detail_screens()]
            self._last = dash
            now = self._now()
            self._render_header(dash)
            self._render_skipped(dash)
            self._render_empty(dash)
            self._render_cases(dash, now)
            self._render_beams(dash, now)
            self._render_gpus(dash)
            self._render_events(dash, now)
            for screen, case, events in details:
                if screen in self.screen_stack:  # not closed while reading
                    screen.show(case, events, now)
        finally:
            self._refreshing = False

    def _render_header(self, dash: Dashboard) -> None:
        hosts = "  ".join(f"{name}: {state}" for name, state in dash.hosts.items()) or "no hosts"
        busy = {lease.uuid for lease in dash.leases}
        total = len(dash.gpus)
        by_case = dash.counts.cases_by_status
        active = sum(n for status, n in by_case.items() if not CaseStatus(status).is_terminal)
        queued = dash.counts.beams_by_status.get("queued", 0)
        self.query_one("#header", Static).update(
            f"mqi-async · {dash.state} · {hosts} · GPUs {len(busy)}/{total} leased · "
            f"{active} active · {by_case.get('completed', 0)} completed · "
            f"{by_case.get('failed', 0)} failed · {queued} beam(s) waiting for a GPU"
        )

    def _render_skipped(self, dash: Dashboard) -> None:
        widget = self.query_one("#skipped", Static)
        widget.set_class(not dash.skipped, "empty")
        if not dash.skipped:
            return
        shown = [f"skipped {f.path}: {f.reason}" for f in dash.skipped[:3]]
        if len(dash.skipped) > 3:
            shown.append(f"… and {len(dash.skipped) - 3} more (mqi-async status lists them)")
        widget.update("\n".join(shown))

    def _render_empty(self, dash: Dashboard) -> None:
        """No case in the database: say where cases go instead of two empty tables."""
        left = self.query_one("#left", Vertical)
        empty = dash.no_cases
        if empty == left.has_class("empty"):
            return
        left.set_class(empty, "empty")
        self.query_one("#empty", EmptyState).set_class(empty, "visible")
        if not empty and not self.query_one("#filter", Input).has_focus:
            # hidden, the table lost the focus: the first case is ready for the keys
            self.query_one("#cases", DataTable).focus()

    @staticmethod
    def _sync(table: DataTable[Any], rows: Rows, new: Rows, columns: Sequence[str]) -> None:
        sync_table(table, rows, new, columns)

    def _visible_cases(self, dash: Dashboard) -> list[CaseSnapshot]:
        f = self._filter.casefold()
        if not f:
            return list(dash.cases)
        return [
            c
            for c in dash.cases
            if f in c.case_id.casefold() or f in str(c.status) or f in (c.room or "").casefold()
        ]

    def _render_cases(self, dash: Dashboard, now: datetime) -> None:
        table = self.query_one("#cases", DataTable)
        new = {c.case_id: case_cells(c, now) for c in self._visible_cases(dash)}
        self._sync(table, self._case_rows, new, CASE_COLUMNS)
        if self._selected_case not in new:
            # nothing selected yet, or the selected case left the view (filter, aged out)
            self._selected_case = None
            if new:
                key = cursor_key(table)
                self._selected_case = key if key in new else next(iter(new))

    def _render_beams(self, dash: Dashboard, now: datetime) -> None:
        table = self.query_one("#beams", DataTable)
        gpu_index = {g.uuid: g.index for g in dash.gpus}
        case = next((c for c in dash.cases if c.case_id == self._selected_case), None)
        new: Rows = {}
        if case is not None:
            new = {
                b.beam_id: beam_cells(b, gpu_index, now, b.updated_at or case.updated_at)
                for b in case.beams
            }
        self._sync(table, self._beam_rows, new, BEAM_COLUMNS)

    def _render_gpus(self, dash: Dashboard) -> None:
        table = self.query_one("#gpus", DataTable)
        owners = {lease.uuid: lease.beam_id for lease in dash.leases}
        new: Rows = {f"{g.host}/{g.uuid}": gpu_cells(g, owners.get(g.uuid)) for g in dash.gpus}
        for host, line in dash.clusters.items():
            # a Slurm cluster allocates its own GPUs: show its queue instead
            new[f"{host}/queue"] = (host, "-", "slurm queue", "", "", "", line)
        self._sync(table, self._gpu_rows, new, GPU_COLUMNS)

    def _render_events(self, dash: Dashboard, now: datetime) -> None:
        log = self.query_one("#events", RichLog)
        for ev in sorted(dash.events, key=lambda e: e.event_id):
            if ev.event_id <= self._last_event_id:
                continue
            who = ev.beam_id or ev.case_id or ""
            log.write(f"{clock(ev.at, now)} {who} {ev.kind}: {ev.message}")
            self._last_event_id = ev.event_id

    @on(DataTable.RowHighlighted, "#cases")
    @guarded("selecting a case")
    async def _case_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = row_value(event.row_key)
        if key is not None and key != self._selected_case:
            self._selected_case = key
            if self._last is not None:
                self._render_beams(self._last, self._now())

    @on(DataTable.RowSelected, "#cases")
    @guarded("opening a case")
    async def _case_selected(self, event: DataTable.RowSelected) -> None:
        """Enter (or a click on the highlighted row) opens the case's detail."""
        key = row_value(event.row_key)
        if key is not None:
            self._selected_case = key
            await self._open_detail(key)

    def selected_case(self) -> str | None:
        return self._selected_case

    def _detail_on_top(self) -> CaseDetailScreen | None:
        screen = self.screen
        return screen if isinstance(screen, CaseDetailScreen) else None

    def selected_beam(self) -> str | None:
        detail = self._detail_on_top()
        if detail is not None:
            return detail.selected_beam()
        return cursor_key(self.query_one("#beams", DataTable))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """While a dialog is open only its own keys work (and quitting); a case's detail takes
        the case keys, not the ones of the cases list."""
        if action not in _MAIN_SCREEN_ACTIONS:
            return True
        if isinstance(self.screen, ModalScreen):
            return False
        return not (self._detail_on_top() is not None and action in _CASE_LIST_ACTIONS)

    def _case_or_hint(self) -> str | None:
        """The case a key acts on: the detail's case, else the one selected in the list."""
        detail = self._detail_on_top()
        case_id = detail.case_id if detail is not None else self._selected_case
        if case_id is None:
            self.notify("no case selected", severity="warning")
        return case_id

    async def _open_detail(self, case_id: str) -> None:
        if self.screen is not self.default_screen:
            return  # a dialog or a detail is open already
        self.push_screen(CaseDetailScreen(case_id))

    @on(CaseDetailScreen.Opened)
    @guarded("showing the case")
    async def _detail_opened(self, event: CaseDetailScreen.Opened) -> None:
        await self._refresh_guarded()

    async def _send(
        self, kind: CommandKind, case_id: str, payload: Mapping[str, object] | None = None
    ) -> None:
        row = await self._store.enqueue_command(kind, case_id, payload)
        if row is None:
            self.notify(f"unknown case {case_id}", severity="error")
            return
        self.sent.append((str(kind), case_id))
        what = f"{kind} {payload['priority']}" if kind == CommandKind.PRIORITY and payload else kind
        self.notify(f"{what} of {case_id} requested")
        log.info("dashboard: %s of %s requested", what, case_id, extra={"component": "ui"})

    @guarded("detail")
    async def action_detail(self) -> None:
        case_id = self._case_or_hint()
        if case_id is not None:
            await self._open_detail(case_id)

    @guarded("retry")
    async def action_retry(self) -> None:
        case_id = self._case_or_hint()
        if case_id is not None:
            await self._send(CommandKind.RETRY, case_id)

    @guarded("priority")
    def action_priority(self) -> None:
        case_id = self._case_or_hint()
        if case_id is None:
            return
        case = (
            next((c for c in self._last.cases if c.case_id == case_id), None)
            if self._last
            else None
        )

        @guarded("priority")
        async def answered(app: DashboardApp, value: int | None) -> None:
            if value is not None:
                await app._send(CommandKind.PRIORITY, case_id, {"priority": value})

        self.push_screen(
            PriorityDialog(case_id, case.priority if case is not None else 0),
            functools.partial(answered, self),
        )

    @guarded("cancel")
    def action_cancel(self) -> None:
        case_id = self._case_or_hint()
        if case_id is None:
            return

        @guarded("cancel")
        async def answered(app: DashboardApp, yes: bool | None) -> None:
            if yes:
                await app._send(CommandKind.CANCEL, case_id)

        self.push_screen(
            ConfirmDialog(
                f"Cancel {case_id}", "Cancel this case? Its running MOQUI jobs are killed."
            ),
            functools.partial(answered, self),
        )

    @guarded("re-run checks")
    def action_recheck(self) -> None:
        case_id = self._case_or_hint()
        if case_id is None:
            return

        @guarded("re-run checks")
        async def answered(app: DashboardApp, yes: bool | None) -> None:
            if yes:
                await app._send(CommandKind.RECHECK, case_id)

        self.push_screen(
            ConfirmDialog(
                f"Re-run checks of {case_id}",
                "Run its dose and delivery checks again and rebuild its report?",
            ),
            functools.partial(answered, self),
        )

    @guarded("filter")
    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.disabled = False
        box.add_class("visible")
        box.focus()

    @on(Input.Submitted, "#filter")
    @guarded("filter")
    async def _filter_submitted(self, event: Input.Submitted) -> None:
        self._filter = event.value.strip()
        event.input.disabled = True
        self.query_one("#cases", DataTable).focus()
        await self._refresh_guarded()

    @guarded("clearing the filter")
    async def on_key(self, event: Key) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_focus:
            box.value = ""
            box.remove_class("visible")
            box.disabled = True
            self._filter = ""
            self.query_one("#cases", DataTable).focus()
            await self._refresh_guarded()

    @guarded("log")
    async def action_log(self) -> None:
        beam_id = self.selected_beam()
        if beam_id is None:
            self.notify("no beam selected", severity="warning")
            return
        beam = await self._store.get_beam(beam_id)
        case = await self._store.get_case(beam.case_id) if beam else None
        text = ""
        if beam is not None and case is not None:
            runs = self._work / case.safe_name / "runs" / f"beam_{beam.beam_index}"
            text = await asyncio.to_thread(newest_log_text, runs)
        if not text:
            events = await self._store.recent_events(200, beam_id=beam_id)
            text = "\n".join(f"{e.at:%H:%M:%S} {e.kind}: {e.message}" for e in reversed(events))
        self.push_screen(LogScreen(f"log of {beam_id}", text or "(nothing yet)"))

    @guarded("quit")
    def action_quit_service(self) -> None:
        try:
            if self._on_quit is not None:
                self._on_quit()
        finally:
            self.exit()


#: the dashboard's own keys: off while a dialog is open, so a key meant for it does nothing else
_MAIN_SCREEN_ACTIONS = frozenset(
    {"detail", "retry", "cancel", "recheck", "priority", "filter", "log", "quit_service"}
)
#: keys of the cases list, off on a case's detail screen
_CASE_LIST_ACTIONS = frozenset({"detail", "filter"})


class DashboardCrashed(Exception):
    """The Textual app ended on an unhandled exception (its traceback is the cause)."""


def dashboard_for(service: Any) -> DashboardApp:
    """The dashboard of a running `service.Service`: its store, hosts and stop request."""
    engine = service.engine
    unverified = {
        h.name
        for h in service.settings.hosts
        if getattr(h, "known_hosts", None) == IGNORE_HOST_KEYS
    }

    def hosts_state() -> dict[str, str]:
        out = {}
        for name, host in service.hosts.items():
            err = engine.host_errors.get(name)
            state = (
                "connected"
                if host.is_available() and not err
                else f"paused ({(err or 'connecting')[:40]})"
            )
            # known_hosts: ignore — anyone on the path could be this host
            out[name] = f"{state} UNVERIFIED" if name in unverified else state
        return out

    return DashboardApp(
        store=service.store,
        work_directory=service.settings.work_directory,
        refresh_hz=service.settings.ui.refresh_hz,
        hosts_state=hosts_state,
        # a database that refuses writes pauses the engine; say so where everyone looks
        service_state=lambda: (
            "PAUSED: database_unwritable (free space)" if engine.database_error else service.state
        ),
        on_quit=service.request_stop,
        scan_directory=service.settings.scan_directory,
    )


async def run_dashboard(service: Any, *, headless: bool = False) -> None:
    """Run the TUI in the service's loop; leaving it (`q`) stops the service gracefully.

    Raises:
        DashboardCrashed: the app ended on an unhandled exception; the service is not
            stopped here (`service.run_until_stopped` decides what happens then).
    """
    app = dashboard_for(service)
    await app.run_async(headless=headless)
    if app.return_code:
        # Textual keeps the exception that ended the app on the app itself
        cause = getattr(app, "_exception", None)
        raise DashboardCrashed(f"the dashboard ended on {cause!r}") from cause
    service.request_stop()
