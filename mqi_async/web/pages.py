"""The web view's HTML, rendered on the server from store snapshots; every value is escaped.

Pure functions (no I/O): a page is a layout around parts, and each live part is also served
alone as a fragment that the page's script swaps in every `refresh_seconds`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from urllib.parse import quote, urlencode

from mqi_async.domain.model import CaseStatus
from mqi_async.domain.records import CommandRow, DeliveryRow, DoseCheckRow, LeaseRow
from mqi_async.domain.verdict import QaStatus
from mqi_async.store.events import EventRow
from mqi_async.store.gpus import GpuRow
from mqi_async.store.hosts import HostRow
from mqi_async.store.snapshot import BeamSnapshot, CaseSnapshot, DashboardCounts

#: the actions a signed-in person may ask for, with their button labels
ACTIONS: dict[str, str] = {"retry": "Retry", "cancel": "Cancel", "recheck": "Re-run checks"}


def e(value: object) -> str:
    """Escaped text for HTML content and quoted attributes."""
    return escape("" if value is None else str(value), quote=True)


def case_url(case_id: str, path: str = "/case") -> str:
    return f"{path}?{urlencode({'id': case_id}, quote_via=quote)}"


def local_time(at: datetime | None) -> str:
    if at is None:
        return "–"
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _age(at: datetime, now: datetime) -> str:
    seconds = max(0, int((now - at).total_seconds()))
    if seconds < 90:
        return f"{seconds} s ago"
    if seconds < 90 * 60:
        return f"{seconds // 60} min ago"
    if seconds < 36 * 3600:
        return f"{seconds // 3600} h ago"
    return f"{seconds // 86400} d ago"


def _num(value: object, unit: str = "", digits: int = 2) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "–"
    return f"{value:.{digits}f}{unit}"


def badge(status: object, family: str) -> str:
    """A coloured status word; `family` is "st" (pipeline) or "v" (verdict)."""
    text = str(status)
    return f'<span class="badge {family}-{e(text)}">{e(text)}</span>'


def _verdict(check: DoseCheckRow | None) -> str:
    status = check.status if check is not None else QaStatus.PENDING
    title = f' title="{e(check.reason)}"' if check is not None and check.reason else ""
    return f"<span{title}>{badge(status, 'v')}</span>"


def _progress(value: int) -> str:
    return f'<progress max="100" value="{int(value)}">{int(value)} %</progress> {int(value)} %'


@dataclass(frozen=True, slots=True, kw_only=True)
class Viewer:
    """Who looks at a page: their name when signed in, and their forms' CSRF token."""

    name: str | None = None
    csrf: str = ""
    #: false when no token or user is configured: nobody can act
    can_sign_in: bool = False


def layout(
    title: str, main: str, *, viewer: Viewer, refresh_s: float, active: str = "", notice: str = ""
) -> str:
    """The page around `main`: header, navigation, who is signed in, the live indicator."""
    nav = "".join(
        f'<a href="{href}"{" class=active" if key == active else ""}>{label}</a>'
        for key, href, label in (
            ("cases", "/", "Cases"),
            ("hosts", "/hosts", "Hosts &amp; GPUs"),
            ("status", "/api/status", "status JSON"),
            ("metrics", "/metrics", "metrics"),
        )
    )
    if viewer.name is not None:
        who = (
            f'<span class="who">signed in as <b>{e(viewer.name)}</b></span>'
            '<form method="post" action="/logout" class="inline">'
            f'<input type="hidden" name="csrf" value="{e(viewer.csrf)}">'
            '<button type="submit" class="link">sign out</button></form>'
        )
    elif viewer.can_sign_in:
        who = '<span class="who">read-only</span> <a href="/login">sign in</a>'
    else:
        who = '<span class="who">read-only</span>'
    banner = f'<p class="notice">{e(notice)}</p>' if notice else ""
    return (
        "<!DOCTYPE html>"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} · mqi-async</title>"
        '<link rel="stylesheet" href="/static/app.css">'
        '<script src="/static/app.js" defer></script>'
        f'</head><body data-refresh="{refresh_s:g}">'
        f'<header><a class="brand" href="/">mqi-async</a><nav>{nav}</nav>'
        f'<div class="right">{who}<span id="live-state" class="live">live</span></div></header>'
        f"<main>{banner}{main}</main></body></html>"
    )


# -- cases ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseFilter:
    """What the cases list shows: a pipeline status, a verdict, and text in id, room or status."""

    status: str = ""
    verdict: str = ""
    text: str = ""

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> CaseFilter:
        status = query.get("status", "")
        verdict = query.get("verdict", "")
        return cls(
            status=status if status in {str(s) for s in CaseStatus} else "",
            verdict=verdict if verdict in {str(v) for v in QaStatus} else "",
            text=query.get("q", "").strip()[:100],
        )

    def query(self) -> str:
        params = {"status": self.status, "verdict": self.verdict, "q": self.text}
        return urlencode({k: v for k, v in params.items() if v}, quote_via=quote)

    def keep(self, case: CaseSnapshot) -> bool:
        if self.status and str(case.status) != self.status:
            return False
        return not self.verdict or str(case.qa.status) == self.verdict


def _options(values: Iterable[str], chosen: str, everything: str) -> str:
    out = [f'<option value="">{e(everything)}</option>']
    for v in values:
        selected = " selected" if v == chosen else ""
        out.append(f'<option value="{e(v)}"{selected}>{e(v)}</option>')
    return "".join(out)


def cases_page(filt: CaseFilter, rows_html: str) -> str:
    """The cases list: the filter form and the live table (`rows_html`, a `cases_fragment`)."""
    fragment_url = "/fragments/cases" + (f"?{filt.query()}" if filt.query() else "")
    return (
        "<h1>Cases</h1>"
        '<form method="get" action="/" class="filters">'
        '<label>Status <select name="status">'
        f"{_options((str(s) for s in CaseStatus), filt.status, 'any')}</select></label>"
        '<label>Verdict <select name="verdict">'
        f"{_options((str(v) for v in QaStatus), filt.verdict, 'any')}</select></label>"
        f'<label>Search <input type="search" name="q" value="{e(filt.text)}"'
        ' placeholder="case id, room or status" maxlength="100"></label>'
        '<button type="submit">Show</button> <a href="/">clear</a></form>'
        f'<div id="cases" data-live="{e(fragment_url)}">{rows_html}</div>'
    )


def _counts_line(label: str, counts: Mapping[str, int]) -> str:
    total = sum(counts.values())
    parts = " · ".join(
        f"{badge(k, 'st')} {v}" for k, v in sorted(counts.items(), key=lambda kv: kv[0])
    )
    return f'<p class="counts"><b>{total}</b> {label}{": " + parts if parts else ""}</p>'


def _deliveries_summary(deliveries: Sequence[DeliveryRow]) -> str:
    if not deliveries:
        return "–"
    by: dict[str, int] = {}
    for d in deliveries:
        by[str(d.qa_status)] = by.get(str(d.qa_status), 0) + 1
    return " ".join(f"{badge(k, 'v')}&nbsp;{v}" for k, v in sorted(by.items()))


def cases_fragment(
    cases: Sequence[CaseSnapshot], counts: DashboardCounts, filt: CaseFilter, now: datetime
) -> str:
    """The live part of the cases list: whole-database counts and the matching cases."""
    shown = [c for c in reversed(cases) if filt.keep(c)]
    head = _counts_line("cases", counts.cases_by_status) + _counts_line(
        "beams", counts.beams_by_status
    )
    if not shown:
        if not any(counts.cases_by_status.values()):
            empty = (
                "No cases yet. A case appears here once its folder, with its "
                "<code>_CASE_READY</code> marker, is in the scan directory."
            )
        else:
            empty = "No case matches this filter."
        return f'{head}<p class="empty">{empty}</p>'
    rows = []
    for c in shown:
        done = sum(1 for b in c.beams if str(b.status) == "completed")
        qa = c.qa
        title = f' title="{e(qa.reason)}"' if qa.reason else ""
        rows.append(
            f'<tr data-case="{e(c.case_id)}">'
            f'<td><a href="{e(case_url(c.case_id))}">{e(c.case_id)}</a></td>'
            f"<td>{e(c.room or '–')}</td>"
            f'<td class="status">{badge(c.status, "st")}</td>'
            f'<td class="verdict"><span{title}>{badge(qa.status, "v")}</span></td>'
            f"<td>{_progress(c.progress)}</td>"
            f"<td>{done}/{len(c.beams)}</td>"
            f"<td>{_deliveries_summary(c.deliveries)}</td>"
            f'<td title="{e(local_time(c.updated_at))}">{e(_age(c.updated_at, now))}</td>'
            f'<td class="error">{e(c.error or "")}</td></tr>'
        )
    return (
        f'{head}<table class="cases"><thead><tr><th>Case</th><th>Room</th><th>Status</th>'
        "<th>Verdict</th><th>Progress</th><th>Beams</th><th>Deliveries</th><th>Updated</th>"
        f"<th>Error</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


# -- one case ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseFiles:
    """What can be downloaded for a case (only files the store names, and that exist)."""

    report_pdf: bool = False
    report_html: bool = False
    dose_files: int = 0


def case_page(case: CaseSnapshot, live_html: str, actions_html: str) -> str:
    qa = case.qa
    return (
        f'<p class="crumbs"><a href="/">Cases</a> › {e(case.case_id)}</p>'
        f"<h1>Case {e(case.case_id)}</h1>"
        f'<section class="actions">{actions_html}</section>'
        f'<div id="case" data-live="{e(case_url(case.case_id, "/fragments/case"))}"'
        f' data-verdict="{e(qa.status)}">{live_html}</div>'
    )


def actions_part(case: CaseSnapshot, viewer: Viewer, pending: Sequence[CommandRow]) -> str:
    """The retry, cancel and re-run buttons for a signed-in person; a hint for others."""
    waiting = "".join(
        f"<li>{e(c.kind)} asked {e(local_time(c.requested_at))}"
        f"{' by ' + e(c.payload.get('by')) if c.payload.get('by') else ''} — waiting for the"
        " service</li>"
        for c in pending
    )
    listed = f'<ul class="pending">{waiting}</ul>' if waiting else ""
    if viewer.name is None:
        if viewer.can_sign_in:
            return (
                f'{listed}<p class="muted"><a href="/login?next={e(quote(case_url(case.case_id), safe=""))}">'
                "Sign in</a> to retry, cancel or re-run the checks of this case.</p>"
            )
        return (
            f'{listed}<p class="muted">Actions are off: no web token or user is configured'
            " (<code>web.tokens</code>, <code>web.users</code>). <code>mqi-async retry|cancel|"
            "recheck CASE_ID</code> on the server does the same.</p>"
        )
    forms = []
    for action, label in ACTIONS.items():
        confirm = (
            f' data-confirm="Cancel case {e(case.case_id)}? Running MOQUI jobs are killed."'
            if action == "cancel"
            else ""
        )
        forms.append(
            f'<form method="post" action="/case/action" class="inline"{confirm}>'
            f'<input type="hidden" name="csrf" value="{e(viewer.csrf)}">'
            f'<input type="hidden" name="id" value="{e(case.case_id)}">'
            f'<input type="hidden" name="action" value="{e(action)}">'
            f'<button type="submit" name="do" value="{e(action)}" id="action-{e(action)}">'
            f"{e(label)}</button></form>"
        )
    return f'{listed}<div class="buttons">{"".join(forms)}</div>'


def _summary(case: CaseSnapshot, files: CaseFiles) -> str:
    qa = case.qa
    plan = case.plan_qa.result if case.plan_qa and case.plan_qa.result else {}
    links = []
    if files.report_pdf:
        links.append(
            f'<a href="{e(case_url(case.case_id, "/download/report.pdf"))}" id="report-pdf">'
            "report (PDF)</a>"
        )
    if files.report_html:
        links.append(
            f'<a href="{e(case_url(case.case_id, "/download/report.html"))}" id="report-html">'
            "report (HTML)</a>"
        )
    if files.dose_files:
        links.append(
            f'<a href="{e(case_url(case.case_id, "/download/dose.zip"))}" id="dose-zip"'
            f" download>RT Dose files ({files.dose_files}, zip)</a>"
        )
    downloads = " · ".join(links) if links else '<span class="muted">none yet</span>'
    pairs = [
        ("Status", badge(case.status, "st")),
        (
            "Verdict",
            f'<span id="case-verdict">{badge(qa.status, "v")}</span>'
            + (f' <span class="muted">{e(qa.reason)}</span>' if qa.reason else ""),
        ),
        (
            "Plan sum",
            f"gamma pass rate {_num(plan.get('pass_rate_percent'), ' %')},"
            f" mean {_num(plan.get('gamma_mean'), digits=3)},"
            f" max {_num(plan.get('gamma_max'), digits=3)}"
            if plan
            else '<span class="muted">no result yet</span>',
        ),
        ("Progress", _progress(case.progress)),
        ("Room", e(case.room or "–")),
        ("Case folder", f"<code>{e(case.case_path)}</code>"),
        ("Registered", e(local_time(case.created_at))),
        ("Updated", e(local_time(case.updated_at))),
        ("Downloads", downloads),
    ]
    if case.error:
        pairs.insert(2, ("Error", f'<span class="error">{e(case.error)}</span>'))
    rows = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in pairs)
    return f'<dl class="summary">{rows}</dl>'


def _beam_row(b: BeamSnapshot) -> str:
    result = b.qa.result if b.qa and b.qa.result else {}
    note = b.error or (b.qa.reason if b.qa else None) or ""
    return (
        f'<tr data-beam="{e(b.beam_id)}"><td>{e(b.beam_id)}</td><td>{e(b.beam_number)}</td>'
        f"<td>{e(b.beam_name or '–')}</td><td>{badge(b.status, 'st')}</td>"
        f'<td>{e(b.host or "–")}</td><td class="gpus">{e(", ".join(b.gpus) or "–")}</td>'
        f"<td>{b.attempts}</td><td>{_progress(b.progress)}</td>"
        f'<td class="verdict">{_verdict(b.qa)}</td>'
        f"<td>{_num(result.get('pass_rate_percent'), ' %')}</td>"
        f"<td>{_num(result.get('gamma_mean'), digits=3)}</td>"
        f"<td>{_num(result.get('gamma_max'), digits=3)}</td>"
        f'<td class="error">{e(note)}</td></tr>'
    )


def _beams(case: CaseSnapshot) -> str:
    if not case.beams:
        return '<h2>Beams</h2><p class="empty">No beams yet: the plan is not resolved.</p>'
    plan = case.plan_qa
    result = plan.result if plan and plan.result else {}
    plan_row = (
        '<tr class="plan-sum"><td>plan sum</td><td></td><td></td><td></td><td></td><td></td>'
        f'<td></td><td></td><td class="verdict">{_verdict(plan)}</td>'
        f"<td>{_num(result.get('pass_rate_percent'), ' %')}</td>"
        f"<td>{_num(result.get('gamma_mean'), digits=3)}</td>"
        f"<td>{_num(result.get('gamma_max'), digits=3)}</td>"
        f'<td class="error">{e(plan.reason if plan and plan.reason else "")}</td></tr>'
    )
    return (
        '<h2>Beams and their dose checks</h2><table class="beams"><thead><tr><th>Beam</th>'
        "<th>#</th><th>Name</th><th>Status</th><th>Host</th><th>GPUs</th><th>Attempts</th>"
        "<th>Progress</th><th>Dose check</th><th>Pass rate</th><th>γ mean</th><th>γ max</th>"
        f"<th>Error / reason</th></tr></thead><tbody>{''.join(_beam_row(b) for b in case.beams)}"
        f"{plan_row}</tbody></table>"
    )


def _daily_record(deliveries: Sequence[DeliveryRow]) -> str:
    """Every delivery, grouped by fraction (the clinic's daily record)."""
    if not deliveries:
        return '<h2>Daily record</h2><p class="empty">No deliveries recorded.</p>'
    fractions: dict[int | None, list[DeliveryRow]] = {}
    for d in deliveries:
        fractions.setdefault(d.fraction_index, []).append(d)
    parts = ["<h2>Daily record</h2>"]
    for index, rows in fractions.items():
        days = sorted({local_time(d.delivered_at)[:10] for d in rows if d.delivered_at})
        title = f"Fraction {index}" if index is not None else "Not in a fraction"
        parts.append(f'<h3>{e(title)} <span class="muted">{e(", ".join(days))}</span></h3>')
        body = []
        for d in rows:
            s = d.as_status()
            deviations = s["deviations"] if isinstance(s["deviations"], list) else []
            body.append(
                f'<tr data-delivery="{e(d.folder)}"><td>{e(d.folder)}</td>'
                f"<td>{e(d.raw_beam_number)}</td><td>{e(local_time(d.delivered_at))}</td>"
                f'<td class="verdict">{badge(d.qa_status, "v")}</td>'
                f"<td>{_num(s['pass_rate_percent'], ' %')}</td>"
                f"<td>{_num(s['gamma_mean'], digits=3)}</td>"
                f"<td>{_num(s['gamma_max'], digits=3)}</td>"
                f"<td>{_num(s['max_position_error_mm'], ' mm', 3)}</td>"
                f"<td>{_num(s['meterset_error_percent'], ' %', 1)}</td>"
                f"<td>{e(', '.join(str(x) for x in deviations))}</td>"
                f'<td class="error">{e(d.qa_reason or "")}</td></tr>'
            )
        parts.append(
            '<table class="deliveries"><thead><tr><th>Delivery</th><th>Beam #</th>'
            "<th>Delivered</th><th>Verdict</th><th>Pass rate</th><th>γ mean</th><th>γ max</th>"
            "<th>Max position error</th><th>Meterset error</th><th>Deviations</th>"
            f"<th>Reason</th></tr></thead><tbody>{''.join(body)}</tbody></table>"
        )
    return "".join(parts)


def _events(events: Sequence[EventRow]) -> str:
    if not events:
        return '<h2>Recent events</h2><p class="empty">No events.</p>'
    rows = "".join(
        f"<tr><td>{e(local_time(ev.at))}</td><td>{e(ev.kind)}</td><td>{e(ev.beam_id or '')}</td>"
        f"<td>{e(ev.message)}</td></tr>"
        for ev in events
    )
    return (
        '<h2>Recent events</h2><table class="events"><thead><tr><th>Time</th><th>Kind</th>'
        f"<th>Beam</th><th>Message</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def case_fragment(case: CaseSnapshot, files: CaseFiles, events: Sequence[EventRow]) -> str:
    """The live part of a case's page: summary, beams, daily record and events."""
    return _summary(case, files) + _beams(case) + _daily_record(case.deliveries) + _events(events)


# -- hosts and GPUs ---------------------------------------------------------------------------


def hosts_page(live_html: str) -> str:
    return f'<h1>Hosts and GPUs</h1><div id="hosts" data-live="/fragments/hosts">{live_html}</div>'


def hosts_fragment(
    hosts: Sequence[HostRow],
    live: Mapping[str, str],
    gpus: Sequence[GpuRow],
    leases: Sequence[LeaseRow],
    now: datetime,
) -> str:
    stored = {h.name: h for h in hosts}
    names = list(live) + [n for n in stored if n not in live]
    host_rows = []
    for name in names:
        row = stored.get(name)
        state = live.get(name) or (row.state if row else "unknown")
        family = "up" if state.startswith("connected") else "down"
        host_rows.append(
            f'<tr data-host="{e(name)}"><td>{e(name)}</td>'
            f'<td><span class="badge h-{family}">{e(state)}</span></td>'
            f"<td>{e(row.error if row and row.error else '')}</td>"
            f"<td>{e(row.detail if row and row.detail else '')}</td>"
            f"<td>{e(local_time(row.updated_at) if row else '–')}</td></tr>"
        )
    owner = {(le.host, le.uuid): le for le in leases}
    gpu_rows = []
    for g in gpus:
        lease = owner.get((g.host, g.uuid))
        gpu_rows.append(
            f'<tr data-gpu="{e(g.uuid)}"><td>{e(g.host)}</td><td>{g.index}</td>'
            f"<td>{e(g.name)}</td>"
            f'<td><meter min="0" max="100" value="{g.utilization_pct}"></meter>'
            f" {g.utilization_pct} %</td>"
            f"<td>{g.memory_used_mb:,} / {g.memory_total_mb:,} MiB</td>"
            f"<td>{g.temperature_c} °C</td>"
            f"<td>{e(lease.beam_id) if lease else '–'}</td>"
            f"<td>{'yes' if g.has_foreign_process else ''}</td>"
            f"<td>{e(_age(g.sampled_at, now))}</td></tr>"
        )
    hosts_table = (
        '<table class="hosts"><thead><tr><th>Host</th><th>State</th><th>Error</th>'
        f"<th>Queue</th><th>Recorded</th></tr></thead><tbody>{''.join(host_rows)}</tbody></table>"
        if host_rows
        else '<p class="empty">No hosts.</p>'
    )
    gpu_table = (
        '<table class="gpus"><thead><tr><th>Host</th><th>GPU</th><th>Model</th>'
        "<th>Utilisation</th><th>Memory</th><th>Temperature</th><th>Leased to</th>"
        f"<th>Foreign process</th><th>Sampled</th></tr></thead><tbody>{''.join(gpu_rows)}"
        "</tbody></table>"
        if gpu_rows
        else '<p class="empty">No GPU sample yet.</p>'
    )
    return f"<h2>Hosts</h2>{hosts_table}<h2>GPUs</h2>{gpu_table}"


# -- sign-in and errors -------------------------------------------------------------------------


def login_page(*, next_url: str, failed: bool) -> str:
    message = (
        '<p class="error" id="login-failed">That name and password, or token, is not right.</p>'
        if failed
        else ""
    )
    return (
        "<h1>Sign in</h1>"
        f"{message}"
        '<form method="post" action="/login" class="login">'
        f'<input type="hidden" name="next" value="{e(next_url)}">'
        '<label>User <input name="user" autocomplete="username" maxlength="64"></label>'
        '<label>Password or token <input type="password" name="password"'
        ' autocomplete="current-password" maxlength="512" required></label>'
        '<p class="muted">Leave the user empty to sign in with a token.</p>'
        '<button type="submit" id="sign-in">Sign in</button></form>'
    )


def message_page(title: str, text: str) -> str:
    return f'<h1>{e(title)}</h1><p>{e(text)}</p><p><a href="/">Back to the cases</a></p>'


def now_utc() -> datetime:
    return datetime.now(UTC)
