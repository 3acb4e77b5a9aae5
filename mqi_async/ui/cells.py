"""What the dashboard's table cells say: progress, ages, sizes and QA verdicts, as text."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime

from rich.text import Text

from mqi_async.domain.records import DoseCheckRow
from mqi_async.domain.verdict import QaStatus, worst
from mqi_async.store import BeamSnapshot, CaseSnapshot, GpuRow

#: a table cell: plain text, or Rich text with a style (the verdicts)
Cell = str | Text

#: passed green, conditional yellow, failed and error red, not judged (yet) dim
QA_STYLES: dict[QaStatus, str] = {
    QaStatus.PASSED: "bold green",
    QaStatus.CONDITIONAL: "bold yellow",
    QaStatus.FAILED: "bold red",
    QaStatus.ERROR: "red",
    QaStatus.PENDING: "dim",
    QaStatus.SKIPPED: "dim",
}


def progress_bar(percent: int, width: int = 10) -> str:
    filled = max(0, min(width, round(width * percent / 100)))
    return "█" * filled + "░" * (width - filled) + f" {percent:3d}%"


def human_age(then: datetime, now: datetime) -> str:
    s = max(0, int((now - then).total_seconds()))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def clock(at: datetime | None, now: datetime, fmt: str = "%H:%M:%S") -> str:
    """A stored (UTC) time in the dashboard clock's zone (the local one, unless a test pins it)."""
    if at is None:
        return "-"
    return at.astimezone(now.tzinfo).strftime(fmt)


def number(value: object) -> float | None:
    """A finite number from a check's result mapping; None for anything else (missing, NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def pass_rate(result: Mapping[str, object] | None) -> float | None:
    return number((result or {}).get("pass_rate_percent"))


def percent_text(rate: float) -> str:
    """One decimal, rounded down: 94.96 % reads 94.9 %, never a "95.0 %" that did not pass."""
    return f"{math.floor(rate * 10 + 1e-9) / 10:.1f}%"


def qa_status(value: object) -> QaStatus | None:
    try:
        return QaStatus(str(value))
    except ValueError:
        return None


def verdict_text(status: QaStatus | str | None, result: Mapping[str, object] | None = None) -> Text:
    """ "passed 99.1%", coloured by the verdict; pending and skipped dim, without a rate."""
    known = QaStatus.PENDING if status is None else qa_status(status)
    if known is None:
        return Text(str(status))
    rate = pass_rate(result)
    label = str(known)
    if rate is not None and known not in (QaStatus.PENDING, QaStatus.SKIPPED):
        label = f"{known} {percent_text(rate)}"
    return Text(label, style=QA_STYLES[known])


def check_text(check: DoseCheckRow | None) -> Text:
    """A beam's (or the plan sum's) dose check; None is a check still pending."""
    if check is None:
        return verdict_text(QaStatus.PENDING)
    return verdict_text(check.status, check.result)


def case_verdict_text(case: CaseSnapshot) -> Text:
    """The case's verdict. Its pass rate is the plan sum's, so it is shown only where the plan
    sum decides the verdict (a failed delivery under a passed plan sum reads plain "failed")."""
    verdict = case.qa
    plan = case.plan_qa
    if plan is not None and plan.status == verdict.status:
        return verdict_text(verdict.status, plan.result)
    return verdict_text(verdict.status)


def fraction_verdict(statuses: Iterable[QaStatus]) -> Text:
    """One fraction's deliveries: the worst of them (a failure shows while others are pending)."""
    return verdict_text(worst(statuses))


def fixed(value: object, digits: int = 2, unit: str = "") -> str:
    n = number(value)
    return "-" if n is None else f"{n:.{digits}f}{unit}"


def reason_text(reason: str | None, limit: int = 80) -> str:
    return (reason or "")[:limit]


def case_cells(case: CaseSnapshot, now: datetime) -> tuple[Cell, ...]:
    done = sum(1 for b in case.beams if b.status == "completed")
    return (
        case.case_id,
        case.room or "-",
        str(case.status),
        case_verdict_text(case),
        progress_bar(case.progress),
        f"{done}/{len(case.beams)}",
        human_age(case.created_at, now),
        (case.error or "")[:80],
    )


def beam_cells(
    beam: BeamSnapshot, gpu_index: Mapping[str, int], now: datetime, updated: datetime
) -> tuple[Cell, ...]:
    gpus = ",".join(str(gpu_index.get(u, "?")) for u in beam.gpus) or "-"
    transfer = "-"
    if beam.transfer_total_bytes:
        transfer = (
            f"{human_bytes(beam.transfer_done_bytes)}/{human_bytes(beam.transfer_total_bytes)}"
        )
    status = str(beam.status)
    if beam.status == "paused" and beam.resume_status:
        status = f"paused ({beam.resume_status})"
    return (
        beam.beam_name or beam.beam_id,
        str(beam.beam_number if beam.beam_number is not None else "-"),
        status,
        check_text(beam.qa),
        beam.host or "-",
        gpus,
        str(beam.attempts),
        progress_bar(beam.progress),
        transfer,
        human_age(updated, now),
    )


def gpu_cells(gpu: GpuRow, owner: str | None) -> tuple[Cell, ...]:
    who = owner or ("foreign" if gpu.has_foreign_process else "-")
    return (
        gpu.host,
        str(gpu.index),
        gpu.name,
        f"{gpu.utilization_pct}%",
        f"{gpu.memory_used_mb}/{gpu.memory_total_mb} MiB",
        f"{gpu.temperature_c}°C",
        who,
    )
