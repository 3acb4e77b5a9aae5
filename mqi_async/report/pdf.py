"""The PDF: a summary page with the verdict and a signature line, then one page per figure."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from mqi_async.report.content import ReportDocument, Table, local_time
from mqi_async.report.figures import PAGE, VERDICT_COLOURS

#: table rows on one page
ROWS_PER_PAGE = 38


class _Page:
    """A text page filled top to bottom; `full()` when the next block would not fit."""

    def __init__(self, title: str) -> None:
        self.fig = Figure(figsize=PAGE)
        self.y = 0.96
        self.fig.text(0.06, self.y, title, fontsize=9, color="#555555")
        self.y -= 0.03

    def text(self, s: str, *, size: float = 8, bold: bool = False, colour: str = "black") -> None:
        for line in textwrap.wrap(s, 120 if size <= 8 else 90) or [""]:
            self.fig.text(
                0.06, self.y, line, fontsize=size, color=colour,
                fontweight="bold" if bold else "normal", va="top",
            )  # fmt: skip
            self.y -= 0.016 * size / 8

    def pairs(self, pairs: Sequence[tuple[str, str]]) -> None:
        for label, value in pairs:
            lines = textwrap.wrap(value, 95) or ["–"]
            self.fig.text(0.06, self.y, label, fontsize=7.5, fontweight="bold", va="top")
            for line in lines:
                self.fig.text(0.28, self.y, line, fontsize=7.5, va="top")
                self.y -= 0.0145

    def table(self, table: Table, rows: Sequence[tuple[str, ...]]) -> None:
        header, _ = table
        height = 0.017 * (len(rows) + 1)
        ax = self.fig.add_axes((0.05, self.y - height, 0.9, height))
        ax.set_axis_off()
        cells = [[_clip(c) for c in r] for r in rows] or [["–"] * len(header)]
        t = ax.table(cellText=cells, colLabels=list(header), loc="upper center", cellLoc="left")
        t.auto_set_font_size(False)
        t.set_fontsize(6)
        t.auto_set_column_width(list(range(len(header))))
        for (r, _c), cell in t.get_celld().items():
            cell.set_height(1.0 / (len(cells) + 1))
            cell.set_linewidth(0.3)
            if r == 0:
                cell.set_facecolor("#e8e8e8")
            elif cell.get_text().get_text() in VERDICT_COLOURS:
                cell.get_text().set_color(VERDICT_COLOURS[cell.get_text().get_text()])
                cell.get_text().set_fontweight("bold")
        self.y -= height + 0.015


def _clip(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def write_pdf(target: str, doc: ReportDocument) -> int:
    """Write the PDF (summary, then each figure and its layer table); returns the page count."""
    title, verdict = doc.title, doc.verdict
    pages: list[Figure] = []
    page = _Page(f"{title} — generated {local_time(doc.generated_at)}")
    page.text(title, size=15, bold=True)
    page.y -= 0.01
    colour = VERDICT_COLOURS.get(verdict, "black")
    page.fig.add_artist(_banner(page.fig, page.y, colour))
    page.text(f"Verdict: {verdict.upper()}", size=14, bold=True, colour="white")
    page.text(doc.verdict_words, size=8, colour="white")
    page.y -= 0.015
    page.text(
        f"Data as of {local_time(doc.as_of)}. Verdicts are computed by mqi-async; this report"
        " must be reviewed and signed by a qualified medical physicist.",
        size=7,
        colour="#555555",
    )
    for section in doc.sections:
        rows = section.table[1] if section.table else ()
        need = 0.03 + 0.015 * len(section.pairs) + (0.017 * (min(len(rows), 12) + 1))
        if page.y - need < 0.12:
            pages.append(page.fig)
            page = _Page(title)
        page.text(section.title, size=10, bold=True)
        page.y -= 0.004
        if section.pairs:
            page.pairs(section.pairs)
        if section.table is not None:
            for start in range(0, max(len(rows), 1), ROWS_PER_PAGE):
                chunk = rows[start : start + ROWS_PER_PAGE]
                if page.y - 0.017 * (len(chunk) + 1) < 0.1:
                    pages.append(page.fig)
                    page = _Page(f"{title} — {section.title} (continued)")
                page.table(section.table, chunk)
        if section.note:
            page.text(section.note, size=7.5)
        page.y -= 0.012
    if page.y < 0.16:
        pages.append(page.fig)
        page = _Page(title)
    _signature(page)
    pages.append(page.fig)
    for item in doc.figures:
        pages.append(item.figure)
        if item.layers is not None:
            rows = item.layers[1]
            for start in range(0, max(len(rows), 1), ROWS_PER_PAGE):
                extra = _Page(f"{item.title} — layers")
                if start == 0:
                    for line in item.deviations or ("No deviation named.",):
                        extra.text(line, size=7.5)
                    extra.y -= 0.01
                extra.table(item.layers, rows[start : start + ROWS_PER_PAGE])
                pages.append(extra.fig)
    with PdfPages(target, metadata={"Title": title, "Creator": "mqi-async"}) as pdf:
        for number, fig in enumerate(pages, start=1):
            fig.text(0.94, 0.015, f"page {number} of {len(pages)}", ha="right", fontsize=6)
            pdf.savefig(fig)
    return len(pages)


def _banner(fig: Figure, y: float, colour: str) -> Rectangle:
    return Rectangle(
        (0.05, y - 0.045), 0.9, 0.052, transform=fig.transFigure, color=colour, zorder=-1
    )


def _signature(page: _Page) -> None:
    page.y = min(page.y, 0.14)
    page.text("Review", size=10, bold=True)
    page.y -= 0.02
    for label in ("Reviewed by (name)", "Signature", "Date"):
        page.fig.text(0.06, page.y, label, fontsize=8, va="bottom")
        page.fig.add_artist(_line(page.fig, page.y))
        page.y -= 0.028


def _line(fig: Figure, y: float) -> Line2D:
    return Line2D([0.28, 0.75], [y, y], transform=fig.transFigure, color="black", lw=0.6)
