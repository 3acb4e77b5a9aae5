"""The report's words and tables, shared by the PDF and the HTML (no plotting, no files)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from mqi_async.domain.records import DoseCheckRow
from mqi_async.report.model import ReportData

if TYPE_CHECKING:
    from mqi_async.report.figures import ReportFigure

Table = tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportDocument:
    """Everything one report shows, as both writers (PDF, HTML) lay it out."""

    title: str
    verdict: str
    #: which part decided the verdict, or the plan sum's numbers
    verdict_words: str
    generated_at: datetime
    #: when the store was read
    as_of: datetime
    sections: Sequence[Section]
    figures: Sequence[ReportFigure]


@dataclass(frozen=True, slots=True, kw_only=True)
class Section:
    title: str
    #: label/value pairs, or a table (header, rows)
    pairs: tuple[tuple[str, str], ...] = ()
    table: Table | None = None
    note: str = ""


def num(value: object, digits: int = 1, unit: str = "") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return f"{value:,.{digits}f}{unit}"


def local_time(value: datetime | None) -> str:
    return "–" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M")


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, Mapping) else {}


def verdict_line(check: DoseCheckRow | None) -> tuple[str, str]:
    """(status, the numbers in words) of one dose check."""
    if check is None:
        return "pending", "no verdict yet"
    r = check.result or {}
    if r.get("pass_rate_percent") is None:
        return str(check.status), check.reason or ""
    return str(check.status), (
        f"pass rate {num(r.get('pass_rate_percent'), 1, ' %')}, γ mean"
        f" {num(r.get('gamma_mean'), 2)}, γ max {num(r.get('gamma_max'), 2)},"
        f" {num(r.get('evaluated_points'), 0)} points"
    )


def summary_sections(data: ReportData) -> list[Section]:
    case, plan, s = data.case, data.plan, data.settings
    qa = _mapping(s.qa)
    g = _mapping(qa.get("gamma"))
    dg = _mapping(qa.get("delivery_gamma"))
    delivery = _mapping(qa.get("delivery"))
    fractions = sorted({d.row.fraction_index for d in data.deliveries if d.row.fraction_index})
    case_pairs = [
        ("Case", case.case_id),
        ("Patient ID", plan.patient_id if plan else "–"),
        ("Plan label", plan.label if plan else "–"),
        ("Plan UID", plan.uid if plan else "–"),
        ("Room / machine", f"{case.room or '–'} / {plan.machine if plan else '–'}"),
        (
            "Fractions",
            f"{len(fractions)} delivered"
            + (f" of {plan.fractions_planned} planned" if plan and plan.fractions_planned else "")
            + f", {len(data.deliveries)} delivery records",
        ),
        ("Pipeline status", str(case.status) + (f" — {case.error}" if case.error else "")),
    ]
    if data.plan_problem:
        case_pairs.append(("Plan", f"not read: {data.plan_problem}"))
    criteria = [
        ("Reference dose", str(qa.get("reference", "planned_mc"))),
        (
            "3-D gamma",
            f"{num(g.get('dose_percent'), 1)} % / {num(g.get('distance_mm'), 1)} mm,"
            f" {g.get('normalisation', 'global')}, cut-off {num(g.get('cutoff_percent'), 0)} %"
            f" of the reference maximum, γ capped at {num(g.get('max_gamma'), 1)}",
        ),
        (
            "Delivery (2-D fluence) gamma",
            f"{num(dg.get('dose_percent'), 1)} % / {num(dg.get('distance_mm'), 1)} mm,"
            f" cut-off {num(dg.get('cutoff_percent'), 0)} %; spot position tolerance"
            f" {num(delivery.get('position_tolerance_mm'), 1)} mm, meterset"
            f" ±{num(delivery.get('meterset_tolerance_percent'), 1)} %",
        ),
        (
            "Verdict thresholds",
            f"passed ≥ {num(qa.get('pass_percent'), 1)} %, conditional ≥"
            f" {num(qa.get('conditional_percent'), 1)} %, else failed",
        ),
    ]
    moqui = dict(s.moqui)
    runs = [b.run for b in data.beams if b.run is not None]
    models = sorted({m for b in data.beams for m in b.gpu_models})
    hosts = sorted({r.host for r in runs})
    engine = [
        ("MOQUI command", "; ".join(f"{h}: {s.engine_commands.get(h, '(default)')}" for h in hosts)
         or "–"),
        ("Random seed", str(moqui.get("RandomSeed", "–"))),
        ("Histories", _histories(moqui)),
        ("Scoring grid", _grid(moqui)),
        ("GPU model(s)", ", ".join(models) or "–"),
        ("mqi-async", s.version or "–"),
    ]  # fmt: skip
    beams_header = ("beam", "#", "run", "host / GPU", "verdict", "pass rate", "γ mean", "γ max",
                    "reason")  # fmt: skip
    beam_rows = []
    for b in data.beams:
        status, _ = verdict_line(b.qa)
        r = (b.qa.result if b.qa else None) or {}
        beam_rows.append(
            (
                b.beam.beam_name or b.beam.beam_id,
                str(b.beam.beam_number if b.beam.beam_number is not None else "–"),
                f"{b.beam.status}, {b.beam.attempts} attempt(s)",
                f"{b.beam.host or '–'} / {', '.join(b.gpu_models) or '–'}",
                status,
                num(r.get("pass_rate_percent"), 1, " %"),
                num(r.get("gamma_mean"), 2),
                num(r.get("gamma_max"), 2),
                (b.qa.reason if b.qa and b.qa.reason else ""),
            )
        )
    plan_status, plan_words = verdict_line(case.plan_qa)
    sections = [
        Section(title="Case", pairs=tuple(case_pairs)),
        Section(title="Criteria", pairs=tuple(criteria)),
        Section(title="Monte Carlo", pairs=tuple(engine)),
        Section(
            title="Beams: delivered dose against the reference (3-D gamma)",
            table=(beams_header, tuple(beam_rows)),
            note=f"Plan sum: {plan_status} — {plan_words}",
        ),
        delivery_section(data),
    ]
    return sections


def delivery_section(data: ReportData) -> Section:
    header = ("fraction", "folder", "beam #", "delivered", "verdict", "pass rate",
              "max pos. error", "meterset error", "deviations")  # fmt: skip
    rows = []
    for d in data.deliveries:
        r = d.row.qa_result or {}
        deviations = [
            str(x.get("code")) for x in _list(r.get("deviations")) if isinstance(x, Mapping)
        ]
        rows.append(
            (
                str(d.row.fraction_index or "–"),
                d.row.folder,
                str(d.row.raw_beam_number if d.row.raw_beam_number is not None else "–"),
                local_time(d.row.delivered_at),
                str(d.row.qa_status),
                num(r.get("pass_rate_percent"), 1, " %"),
                num(r.get("max_position_error_mm"), 2, " mm"),
                num(r.get("meterset_error_percent"), 2, " %"),
                ", ".join(deviations) or (d.row.qa_reason or ""),
            )
        )
    return Section(
        title="Deliveries by fraction (the daily record): delivered spots against the plan",
        table=(header, tuple(rows)),
        note="" if rows else "No delivery records.",
    )


def layer_table(detail: Mapping[str, object]) -> Table:
    header = ("layer", "energy (MeV)", "delivered", "planned MU", "delivered MU",
              "meterset err.", "mean pos. err.", "max pos. err.", "γ pass rate")  # fmt: skip
    rows = []
    for x in _list(detail.get("layers")):
        if not isinstance(x, Mapping):
            continue
        rows.append(
            (
                str(x.get("layer", "")),
                num(x.get("energy_mev"), 2),
                "yes" if x.get("delivered") else "NO",
                num(x.get("planned_mu"), 3),
                num(x.get("delivered_mu"), 3),
                num(x.get("meterset_error_percent"), 2, " %"),
                num(x.get("mean_position_error_mm"), 2, " mm"),
                num(x.get("max_position_error_mm"), 2, " mm"),
                num(x.get("pass_rate_percent"), 1, " %"),
            )
        )
    return header, tuple(rows)


def deviations_text(detail: Mapping[str, object]) -> list[str]:
    return [
        f"{x.get('code')}: {x.get('detail')}"
        for x in _list(detail.get("deviations"))
        if isinstance(x, Mapping)
    ]


def _list(value: object) -> Sequence[object]:
    return value if isinstance(value, list) else []


def _histories(moqui: Mapping[str, object]) -> str:
    keys = ("ParticlesPerHistory", "MaxHistoriesPerBatch", "TotalThreads")
    shown = [f"{k} {moqui[k]}" for k in keys if k in moqui]
    return ", ".join(shown) or "–"


def _grid(moqui: Mapping[str, object]) -> str:
    if not moqui.get("UsingPhantomGeo"):
        return "patient CT grid"
    dims = "×".join(str(moqui.get(f"PhantomDim{a}", "?")) for a in "XYZ")
    units = "×".join(str(moqui.get(f"PhantomUnit{a}", "?")) for a in "XYZ")
    return f"phantom {dims} voxels of {units} mm"
