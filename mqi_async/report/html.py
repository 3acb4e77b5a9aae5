"""The HTML: one self-contained file (inline CSS and PNG figures), readable with no network."""

from __future__ import annotations

import base64
import io
from html import escape

from matplotlib.figure import Figure

from mqi_async.report.content import ReportDocument, Table, local_time
from mqi_async.report.figures import VERDICT_COLOURS

_CSS = """
body{font-family:DejaVu Sans,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#111}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}th{background:#eee}
.pairs th{background:none;width:14em}.banner{color:#fff;padding:.8em 1em;border-radius:4px}
.verdict{font-weight:bold}img{max-width:100%;border:1px solid #ddd}
.sign td{border:none;padding:1.2em .5em 0 0}.sign span{display:inline-block;width:22em;
border-bottom:1px solid #000}.muted{color:#555;font-size:.85em}
"""


def _cell(text: str) -> str:
    colour = VERDICT_COLOURS.get(text)
    if colour:
        return f'<td class="verdict" style="color:{colour}">{escape(text)}</td>'
    return f"<td>{escape(text)}</td>"


def _table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_html(target: str, doc: ReportDocument) -> None:
    title, verdict = doc.title, doc.verdict
    colour = VERDICT_COLOURS.get(verdict, "#000")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        # nothing is fetched: the page is one file, pictures inline
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none';"
        " img-src data:; style-src 'unsafe-inline'\">",
        f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f"<p class='muted'>Generated {escape(local_time(doc.generated_at))}, data as of"
        f" {escape(local_time(doc.as_of))}.</p>",
        f"<div class='banner' style='background:{colour}'><b>Verdict: {escape(verdict.upper())}"
        f"</b><br>{escape(doc.verdict_words)}</div>",
    ]
    for section in doc.sections:
        parts.append(f"<h2>{escape(section.title)}</h2>")
        if section.pairs:
            rows = "".join(
                f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in section.pairs
            )
            parts.append(f"<table class='pairs'>{rows}</table>")
        if section.table is not None and section.table[1]:
            parts.append(_table(section.table))
        if section.note:
            parts.append(f"<p>{escape(section.note)}</p>")
    for item in doc.figures:
        parts.append(f"<h2>{escape(item.title)}</h2>")
        parts.append(
            f"<img alt='{escape(item.title)}' src='data:image/png;base64,{_png(item.figure)}'>"
        )
        if item.deviations:
            parts.append(
                "<ul>" + "".join(f"<li>{escape(d)}</li>" for d in item.deviations) + "</ul>"
            )
        if item.layers is not None and item.layers[1]:
            parts.append(_table(item.layers))
    parts.append(
        "<h2>Review</h2><table class='sign'>"
        + "".join(
            f"<tr><td>{label}</td><td><span>&nbsp;</span></td></tr>"
            for label in ("Reviewed by (name)", "Signature", "Date")
        )
        + "</table><p class='muted'>Verdicts are computed by mqi-async; this report must be"
        " reviewed and signed by a qualified medical physicist.</p></body></html>"
    )
    with open(target, "w", encoding="utf-8") as fh:
        fh.write("".join(parts))
