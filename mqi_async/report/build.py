"""Build one case's report: read, draw, write both files atomically, record them in the store."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np

from mqi_async.check_criteria import delivery_calibration, delivery_criteria
from mqi_async.config import QaSettings
from mqi_async.domain.errors import PermanentError
from mqi_async.qa.delivery import DeliveryCheckError, LayerCheck, LayerMaps, check_delivery
from mqi_async.qa.rtdose import read_summed
from mqi_async.qa.worker import delivery_options
from mqi_async.report.content import (
    ReportDocument,
    Section,
    deviations_text,
    layer_table,
    local_time,
    num,
    summary_sections,
    verdict_line,
)
from mqi_async.report.figures import ReportFigure, delivery_figure, dose_figure
from mqi_async.report.html import write_html
from mqi_async.report.model import DeliveryReport, ReportData, ReportSettings, read_report_data
from mqi_async.report.pdf import write_pdf
from mqi_async.report.planes import planes_through_max

log = logging.getLogger(__name__)

PDF_NAME = "report.pdf"
HTML_NAME = "report.html"


@dataclass(frozen=True, slots=True, kw_only=True)
class BuiltReport:
    case_id: str
    pdf: str
    html: str
    verdict: str
    pages: int
    as_of: datetime

    def to_json(self) -> dict[str, object]:
        return {
            "case_id": self.case_id,
            "pdf": self.pdf,
            "html": self.html,
            "verdict": self.verdict,
            "pages": self.pages,
            "as_of": self.as_of.isoformat(),
        }


def _gamma_values(path: str | None) -> np.ndarray | None:
    if not path:
        return None
    try:
        g = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return np.asarray(g, dtype=np.float64)


def _dose_page(
    title: str,
    reference: object,
    evaluated: object,
    gamma_path: str | None,
    qa: QaSettings,
    verdict_words: str,
) -> ReportFigure:
    if not isinstance(reference, list) or not isinstance(evaluated, list):
        raise PermanentError("report_dose_missing", "the check names no dose files")
    ref = read_summed([str(p) for p in reference])
    ev = read_summed([str(p) for p in evaluated])
    gamma = _gamma_values(gamma_path)
    values = None if gamma is None else gamma[np.isfinite(gamma)]
    name = {"planned_mc": "planned (MC)", "tps_dose": "planned (TPS)"}.get(
        qa.reference, "reference"
    )
    figure = dose_figure(
        title,
        verdict_words,
        planes_through_max(ref, ev, gamma),
        reference_name=name,
        max_gamma=qa.gamma.max_gamma,
        gamma_values=values,
    )
    return ReportFigure(title=title, figure=figure)


def num_value(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) else float("inf")


def _layer_rows(detail: Mapping[str, object]) -> list[Mapping[str, object]]:
    rows = detail.get("layers")
    return [x for x in rows if isinstance(x, Mapping)] if isinstance(rows, list) else []


def _worst_layer(
    delivery: DeliveryReport, plan_path: str, room: str | None, qa: QaSettings
) -> Mapping[str, object] | None:
    """The fluence maps of the layer with the lowest gamma pass rate (the check run again)."""
    layers = [
        x
        for x in _layer_rows(delivery.detail)
        if isinstance(x.get("pass_rate_percent"), (int, float))
    ]
    if not layers or delivery.row.raw_beam_number is None:
        return None
    worst = min(layers, key=lambda x: num_value(x.get("pass_rate_percent")))
    captured: dict[str, object] = {}

    def keep(layer: LayerCheck, maps: LayerMaps) -> None:
        if layer.layer == worst.get("layer"):
            captured.update(
                layer=layer.layer, y=maps.y_mm, x=maps.x_mm, planned=maps.planned,
                delivered=maps.delivered, gamma=maps.gamma,
            )  # fmt: skip

    request: dict[str, object] = {
        **delivery_criteria(qa, room),
        "calibration": delivery_calibration(qa, room),
    }
    try:
        check_delivery(
            delivery.row.delivery_path,
            plan_path,
            delivery.row.raw_beam_number,
            delivery_options(request),
            room=room,
            on_layer=keep,
        )
    except (DeliveryCheckError, OSError, ValueError) as exc:
        log.warning("report: layer maps of %s not drawn: %s", delivery.row.folder, exc)
        return None
    return captured or None


def _delivery_page(data: ReportData, d: DeliveryReport, qa: QaSettings) -> ReportFigure:
    r = d.row.qa_result or {}
    title = (
        f"Fraction {d.row.fraction_index or '–'}, beam {d.row.raw_beam_number}, delivery"
        f" {d.row.folder}: {d.row.qa_status}"
    )
    words = (
        f"delivered {local_time(d.row.delivered_at)}; 2-D fluence γ pass rate"
        f" {num(r.get('pass_rate_percent'), 1, ' %')}; largest spot position error"
        f" {num(r.get('max_position_error_mm'), 2, ' mm')}; meterset"
        f" {num(r.get('meterset_error_percent'), 2, ' %')}"
        + (f"; {d.row.qa_reason}" if d.row.qa_reason else "")
    )
    layers = _layer_rows(d.detail)
    worst = _worst_layer(d, data.plan_path, data.case.room, qa) if data.plan_path else None
    figure = delivery_figure(
        title,
        words,
        layers,
        position_tolerance_mm=qa.delivery.position_tolerance_mm,
        meterset_tolerance_percent=qa.delivery.meterset_tolerance_percent,
        worst_layer=worst,
    )
    return ReportFigure(
        title=title,
        figure=figure,
        layers=layer_table(d.detail),
        deviations=tuple(deviations_text(d.detail)),
    )


def _figures(data: ReportData, qa: QaSettings, problems: list[str]) -> list[ReportFigure]:
    out: list[ReportFigure] = []

    def attempt(what: str, make: Callable[[], ReportFigure]) -> None:
        # one picture that cannot be drawn is named on the summary, never the whole report
        try:
            out.append(make())
        except Exception as exc:
            log.warning("report: %s not drawn: %s", what, exc)
            problems.append(f"{what}: not drawn ({exc})")

    dose_pages = [
        (f"Beam {b.beam.beam_name or b.beam.beam_id} (#{b.beam.beam_number})", b.qa, b.gamma_map)
        for b in data.beams
    ]
    dose_pages.append(("Plan sum", data.case.plan_qa, data.plan_gamma_map))
    for name, check, gamma_map in dose_pages:
        if check is None or not check.result:
            continue
        status, words = verdict_line(check)
        title = f"{name}: {status}"
        result = check.result
        attempt(
            title,
            partial(
                _dose_page, title, result.get("reference"), result.get("evaluated"), gamma_map,
                qa, words,
            ),
        )  # fmt: skip
    for d in data.deliveries:
        if d.row.qa_result:
            attempt(f"delivery {d.row.folder}", partial(_delivery_page, data, d, qa))
    return out


def _replace_atomically(target: Path, write: Callable[[str], object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def render_report(data: ReportData) -> BuiltReport:
    """Draw and write the PDF and the HTML of `data` into its output folder."""
    import matplotlib

    matplotlib.use("Agg")
    qa = QaSettings.model_validate(dict(data.settings.qa))
    verdict_row = data.case.qa
    verdict = str(verdict_row.status)
    _, numbers = verdict_line(data.case.plan_qa)
    words = (verdict_row.reason or numbers) if verdict_row.status != "passed" else numbers
    problems: list[str] = []
    figures = _figures(data, qa, problems)
    sections = summary_sections(data)
    if problems:
        sections.append(Section(title="Pictures not drawn", pairs=tuple(("", p) for p in problems)))
    out = data.output_dir
    out.mkdir(parents=True, exist_ok=True)
    doc = ReportDocument(
        title=f"Dose check report — case {data.case.case_id}",
        verdict=verdict,
        verdict_words=words,
        generated_at=datetime.now(UTC),
        as_of=data.as_of,
        sections=sections,
        figures=figures,
    )
    pages = 0

    def pdf(path: str) -> None:
        nonlocal pages
        pages = write_pdf(path, doc)

    _replace_atomically(out / PDF_NAME, pdf)
    _replace_atomically(out / HTML_NAME, lambda path: write_html(path, doc))
    return BuiltReport(
        case_id=data.case.case_id,
        pdf=str((out / PDF_NAME).resolve()),
        html=str((out / HTML_NAME).resolve()),
        verdict=verdict,
        pages=pages,
        as_of=data.as_of,
    )


async def build_report(settings: ReportSettings) -> BuiltReport:
    """Read the case, write its report and record it (beside a running service, or alone).

    Raises:
        PermanentError: `unknown_case`, or a file the report needs is unreadable.
    """
    import asyncio

    from mqi_async.store.db import record_report_files

    data = await read_report_data(settings)
    if data is None:
        raise PermanentError("unknown_case", f"no treatment case {settings.case_id!r}")
    built = await asyncio.to_thread(render_report, data)
    await record_report_files(
        settings.database,
        built.case_id,
        pdf=built.pdf,
        html=built.html,
        verdict=built.verdict,
        as_of=built.as_of,
    )
    return built
