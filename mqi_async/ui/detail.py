"""One case in full: its verdict, beams with their checks, the daily record and its events."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from itertools import groupby
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from mqi_async.domain.records import DeliveryRow
from mqi_async.store import CaseSnapshot, EventRow
from mqi_async.ui.cells import (
    case_verdict_text,
    check_text,
    clock,
    fixed,
    fraction_verdict,
    human_age,
    reason_text,
    verdict_text,
)
from mqi_async.ui.tables import Rows, cursor_key, sync_table
from mqi_async.ui.widgets import guarded

DETAIL_BEAM_COLUMNS = ("beam", "#", "status", "verdict", "γ mean", "γ max", "points", "reason")
DELIVERY_COLUMNS = (
    "fraction",
    "delivered",
    "folder",
    "beam",
    "verdict",
    "position",
    "meterset",
    "reason",
)
#: the plan-sum row of the beams table
PLAN_SUM_KEY = "plan-sum"


def summary_text(case: CaseSnapshot | None, case_id: str, now: datetime) -> Text:
    """The lines at the top: state, verdict and its reason, plan sum, report, error."""
    text = Text()
    if case is None:
        text.append(f"{case_id}: not in the database (or not readable just now)", style="bold")
        return text
    done = sum(1 for b in case.beams if b.status == "completed")
    text.append("case     ", style="bold")
    text.append(case.case_id, style="bold")
    text.append(
        f" · room {case.room or '-'} · {case.status} {case.progress}%"
        f" · {done}/{len(case.beams)} beams done · {human_age(case.created_at, now)} old\n"
    )
    verdict = case.qa
    text.append("verdict  ", style="bold")
    text.append_text(case_verdict_text(case))
    if verdict.reason:
        text.append(f"  {verdict.reason}")
    text.append("\n")
    plan = case.plan_qa
    text.append("plan sum ", style="bold")
    text.append_text(check_text(plan))
    if plan is not None and plan.result:
        result = plan.result
        text.append(
            f"  γ mean {fixed(result.get('gamma_mean'))}  γ max {fixed(result.get('gamma_max'))}"
        )
    if plan is not None and plan.reason:
        text.append(f"  {plan.reason}")
    text.append("\n")
    text.append("report   ", style="bold")
    if case.report:
        text.append(case.report)
    else:
        text.append("no report yet", style="dim")
    text.append("\n")
    text.append("folder   ", style="bold")
    text.append(case.case_path)
    if case.error:
        text.append("\nerror    ", style="bold red")
        text.append(case.error, style="red")
    return text


def detail_beam_rows(case: CaseSnapshot | None) -> Rows:
    if case is None:
        return {}
    rows: Rows = {}
    for b in case.beams:
        result = (b.qa.result if b.qa else None) or {}
        reason = (b.qa.reason if b.qa else None) or (b.error if b.status == "failed" else None)
        rows[b.beam_id] = (
            b.beam_name or b.beam_id,
            str(b.beam_number if b.beam_number is not None else "-"),
            str(b.status),
            check_text(b.qa),
            fixed(result.get("gamma_mean")),
            fixed(result.get("gamma_max")),
            _points(result.get("evaluated_points")),
            reason_text(reason),
        )
    plan = case.plan_qa
    result = (plan.result if plan else None) or {}
    rows[PLAN_SUM_KEY] = (
        Text("plan sum", style="italic"),
        "",
        "",
        check_text(plan),
        fixed(result.get("gamma_mean")),
        fixed(result.get("gamma_max")),
        _points(result.get("evaluated_points")),
        reason_text(plan.reason if plan else None),
    )
    return rows


def _points(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else "-"


def _fraction_of(d: DeliveryRow) -> int | None:
    return d.fraction_index


def delivery_rows(case: CaseSnapshot | None, now: datetime) -> Rows:
    """The daily record: a heading row per fraction (its day, count and worst verdict), then
    each of its deliveries with its delivery check."""
    if case is None:
        return {}
    rows: Rows = {}
    ordered = sorted(
        case.deliveries,
        key=lambda d: (
            d.fraction_index is None,
            d.fraction_index or 0,
            d.delivered_at is None,
            d.delivered_at or now,
            d.delivery_id,
        ),
    )
    for fraction, group in groupby(ordered, key=_fraction_of):
        deliveries = list(group)
        first = next((d.delivered_at for d in deliveries if d.delivered_at), None)
        name = "no fraction" if fraction is None else f"fraction {fraction}"
        if any(d.is_reference for d in deliveries):
            name += " (ref)"
        count = len(deliveries)
        rows[f"fraction:{fraction}"] = (
            Text(name, style="bold"),
            clock(first, now, "%Y-%m-%d"),
            Text(f"{count} deliver{'y' if count == 1 else 'ies'}", style="dim"),
            "",
            fraction_verdict(d.qa_status for d in deliveries),
            "",
            "",
            "",
        )
        for d in deliveries:
            result = d.qa_result or {}
            rows[f"delivery:{d.delivery_id}"] = (
                "",
                clock(d.delivered_at, now),
                d.folder,
                "-" if d.raw_beam_number is None else str(d.raw_beam_number),
                verdict_text(d.qa_status, result),
                fixed(result.get("max_position_error_mm"), 1, " mm"),
                fixed(result.get("meterset_error_percent"), 1, "%"),
                reason_text(d.qa_reason or _deviation_codes(result)),
            )
    return rows


def _deviation_codes(result: Mapping[str, object]) -> str | None:
    """What a judged delivery's check named (missing_layers, position_deviation, …)."""
    found = result.get("deviations")
    if not isinstance(found, list):
        return None
    codes = [str(d.get("code")) for d in found if isinstance(d, Mapping) and d.get("code")]
    return ", ".join(codes) or None


def event_line(ev: EventRow, now: datetime) -> str:
    who = f"{ev.beam_id} " if ev.beam_id else ""
    return f"{clock(ev.at, now, '%Y-%m-%d %H:%M:%S')} {who}{ev.kind}: {ev.message}"


class CaseDetailScreen(Screen[None]):
    """A case's detail; the dashboard refreshes it with everything else (`show`).

    Retry, cancel, re-run checks, priority and log are the dashboard's own keys, acting on
    this screen's case; escape (or q) goes back.
    """

    DEFAULT_CSS = """
    CaseDetailScreen { layout: vertical; }
    #detail-title { height: 1; background: $primary; color: $text; padding: 0 1; }
    #detail-summary { height: auto; padding: 0 1; }
    .detail-heading { height: 1; padding: 0 1; color: $text-muted; text-style: bold; }
    #detail-beams { height: auto; max-height: 10; }
    #detail-deliveries { height: 2fr; min-height: 3; }
    #detail-events { height: 1fr; min-height: 3; border-top: solid $primary; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "back", "Back")]

    class Opened(Message):
        """The screen is up: the dashboard fills it in at once instead of at its next tick."""

    def __init__(self, case_id: str) -> None:
        super().__init__()
        self.case_id = case_id
        self._beam_rows: Rows = {}
        self._delivery_rows: Rows = {}
        #: the newest event shown
        self._last_event_id: int | None = None
        #: the last summary shown, so an unchanged one is not drawn again
        self._summary: Text | None = None

    def compose(self) -> ComposeResult:
        yield Static(f"case {self.case_id}", id="detail-title", markup=False)
        yield Static("", id="detail-summary", markup=False)
        yield Static("beams: dose check against the plan", classes="detail-heading")
        yield DataTable(id="detail-beams", cursor_type="row", zebra_stripes=True)
        yield Static("daily record: deliveries by fraction", classes="detail-heading")
        yield DataTable(id="detail-deliveries", cursor_type="row")
        with VerticalScroll(id="detail-events"):
            yield Static("", id="detail-events-text", markup=False)
        yield Footer()

    @guarded("opening the case")
    def on_mount(self) -> None:
        for table_id, columns in (
            ("#detail-beams", DETAIL_BEAM_COLUMNS),
            ("#detail-deliveries", DELIVERY_COLUMNS),
        ):
            table = self.query_one(table_id, DataTable)
            for col in columns:
                table.add_column(col, key=col)
        self.query_one("#detail-events", VerticalScroll).border_title = "events"
        self.query_one("#detail-beams", DataTable).focus()
        self.post_message(self.Opened())

    def show(self, case: CaseSnapshot | None, events: Sequence[EventRow], now: datetime) -> None:
        """Update from a fresh read (the case None: it could not be found)."""
        summary = summary_text(case, self.case_id, now)
        if summary != self._summary:
            self._summary = summary
            self.query_one("#detail-summary", Static).update(summary)
        beams: DataTable[Any] = self.query_one("#detail-beams", DataTable)
        sync_table(beams, self._beam_rows, detail_beam_rows(case), DETAIL_BEAM_COLUMNS)
        deliveries: DataTable[Any] = self.query_one("#detail-deliveries", DataTable)
        new = delivery_rows(case, now)
        if not new:
            new = {"none": ("", "", Text("no deliveries recorded", style="dim"), *[""] * 5)}
        sync_table(deliveries, self._delivery_rows, new, DELIVERY_COLUMNS)
        newest = max((ev.event_id for ev in events), default=0)
        if newest != self._last_event_id:
            # drawn whole (it wraps to the width it has, also after a resize)
            self._last_event_id = newest
            lines = [event_line(ev, now) for ev in sorted(events, key=lambda e: e.event_id)]
            self.query_one("#detail-events-text", Static).update(
                "\n".join(lines) or "no events yet"
            )
            scroll = self.query_one("#detail-events", VerticalScroll)
            self.call_after_refresh(scroll.scroll_end, animate=False)

    def selected_beam(self) -> str | None:
        key = cursor_key(self.query_one("#detail-beams", DataTable))
        return None if key == PLAN_SUM_KEY else key

    @guarded("back")
    def action_back(self) -> None:
        self.dismiss(None)
