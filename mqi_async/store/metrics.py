"""What `/metrics` shows, read in one transaction with aggregate queries (never row by row)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from mqi_async.domain.model import BeamStatus
from mqi_async.domain.verdict import QaStatus, worst
from mqi_async.store.gpus import GpuRow, Gpus
from mqi_async.store.hosts import HostRow, Hosts
from mqi_async.store.session import Session

#: upper bounds (seconds) of the MOQUI run-time histogram: a simulator's second to a long plan
RUN_BUCKETS_S: tuple[float, ...] = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
#: upper bounds (seconds) of a beam's whole time, registration to its end
BEAM_BUCKETS_S: tuple[float, ...] = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600)


@dataclass(frozen=True, slots=True, kw_only=True)
class Histogram:
    """A Prometheus histogram from the database: cumulative counts per upper bound."""

    #: (upper bound, observations at or below it), ascending; +Inf is `count`
    buckets: tuple[tuple[float, int], ...]
    count: int
    sum_s: float


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSnapshot:
    """Counts and durations of the whole database, as of one read."""

    #: treatment cases by pipeline status (as `status --json` counts them)
    cases_by_status: dict[str, int]
    #: beams by (case kind, status); kind is "treatment" or "planned"
    beams_by_status: dict[tuple[str, str], int]
    #: treatment cases by verdict (`CaseSnapshot.qa.status`)
    case_verdicts: dict[str, int]
    #: treatment beams by dose-check verdict (pending where none yet)
    beam_verdicts: dict[str, int]
    #: deliveries of treatment cases by delivery-check verdict
    delivery_verdicts: dict[str, int]
    #: MOQUI runs that ended, by (host, run status)
    run_durations: dict[tuple[str, str], Histogram]
    #: beams that ended, by status: registration to the end
    beam_durations: dict[str, Histogram]
    gpus: tuple[GpuRow, ...]
    #: (host, uuid) of every leased GPU
    leased: frozenset[tuple[str, str]]
    leases_by_host: dict[str, int]
    hosts: tuple[HostRow, ...]
    #: beams waiting for a GPU (status queued)
    queued_beams: int
    #: (what: "case" or "beam", code) -> rows whose error starts with `code:`
    errors: dict[tuple[str, str], int]
    commands_pending: int


def _histogram(row: sqlite3.Row, bounds: Sequence[float], first: int) -> Histogram:
    count = int(row[first])
    total = float(row[first + 1] or 0.0)
    cumulative = tuple((b, int(row[first + 2 + i] or 0)) for i, b in enumerate(bounds))
    return Histogram(buckets=cumulative, count=count, sum_s=total)


def _bucket_sql(expr: str, bounds: Sequence[float]) -> str:
    return ", ".join(f"SUM({expr} <= {float(b)!r})" for b in bounds)


#: seconds between two stored timestamps (ISO text, UTC)
_RUN_SECONDS = "((julianday(ended_at) - julianday(started_at)) * 86400.0)"
_BEAM_SECONDS = "((julianday(b.updated_at) - julianday(b.created_at)) * 86400.0)"

_CASE_PARTS = """
SELECT case_id, GROUP_CONCAT(DISTINCT s) FROM (
    SELECT c.case_id AS case_id, COALESCE(d.status, 'pending') AS s
      FROM cases c LEFT JOIN dose_checks d ON d.subject_id = c.case_id
     WHERE c.kind = 'treatment'
    UNION ALL
    SELECT b.case_id, COALESCE(d.status, 'pending')
      FROM beams b JOIN cases c ON c.case_id = b.case_id
      LEFT JOIN dose_checks d ON d.subject_id = b.beam_id
     WHERE c.kind = 'treatment'
    UNION ALL
    SELECT dl.case_id, dl.qa_status
      FROM deliveries dl JOIN cases c ON c.case_id = dl.case_id
     WHERE c.kind = 'treatment'
) GROUP BY case_id
"""


def case_verdict(parts: Sequence[QaStatus]) -> QaStatus:
    """The rule of `CaseSnapshot.qa`: pending while any part is, else the worst part."""
    return QaStatus.PENDING if QaStatus.PENDING in parts else worst(parts)


async def read_metrics(session: Session) -> MetricsSnapshot:
    """Everything `/metrics` shows, in one read: about a dozen aggregate queries."""
    cases = {
        r[0]: r[1]
        for r in await session.rows(
            "SELECT status, COUNT(*) FROM cases WHERE kind = 'treatment' GROUP BY status"
        )
    }
    beams = {
        (r[0], r[1]): r[2]
        for r in await session.rows(
            "SELECT c.kind, b.status, COUNT(*) FROM beams b JOIN cases c ON c.case_id = b.case_id"
            " GROUP BY c.kind, b.status"
        )
    }
    case_verdicts: dict[str, int] = {}
    for r in await session.rows(_CASE_PARTS):
        parts = [QaStatus(s) for s in str(r[1]).split(",")]
        verdict = str(case_verdict(parts))
        case_verdicts[verdict] = case_verdicts.get(verdict, 0) + 1
    beam_verdicts = {
        r[0]: r[1]
        for r in await session.rows(
            "SELECT COALESCE(d.status, 'pending'), COUNT(*) FROM beams b"
            " JOIN cases c ON c.case_id = b.case_id"
            " LEFT JOIN dose_checks d ON d.subject_id = b.beam_id"
            " WHERE c.kind = 'treatment' GROUP BY 1"
        )
    }
    deliveries = {
        r[0]: r[1]
        for r in await session.rows(
            "SELECT dl.qa_status, COUNT(*) FROM deliveries dl"
            " JOIN cases c ON c.case_id = dl.case_id WHERE c.kind = 'treatment' GROUP BY 1"
        )
    }
    runs = {
        (r[0], r[1]): _histogram(r, RUN_BUCKETS_S, 2)
        for r in await session.rows(
            f"SELECT host, status, COUNT(*), SUM({_RUN_SECONDS}),"
            f" {_bucket_sql(_RUN_SECONDS, RUN_BUCKETS_S)}"
            " FROM runs WHERE ended_at IS NOT NULL GROUP BY host, status"
        )
    }
    terminal = tuple(str(s) for s in BeamStatus if s.is_terminal)
    beam_times = {
        r[0]: _histogram(r, BEAM_BUCKETS_S, 1)
        for r in await session.rows(
            f"SELECT b.status, COUNT(*), SUM({_BEAM_SECONDS}),"
            f" {_bucket_sql(_BEAM_SECONDS, BEAM_BUCKETS_S)}"
            " FROM beams b JOIN cases c ON c.case_id = b.case_id"
            f" WHERE c.kind = 'treatment' AND b.status IN ({', '.join('?' * len(terminal))})"
            " GROUP BY b.status",
            terminal,
        )
    }
    gpus = tuple(await Gpus(session).find(None))
    leases = await session.rows("SELECT host, uuid FROM leases")
    by_host: dict[str, int] = {}
    for r in leases:
        by_host[r[0]] = by_host.get(r[0], 0) + 1
    queued = await session.row(
        "SELECT COUNT(*) FROM beams WHERE status = ?", (str(BeamStatus.QUEUED),)
    )
    errors: dict[tuple[str, str], int] = {}
    for what, table in (("case", "cases"), ("beam", "beams")):
        for r in await session.rows(
            "SELECT CASE WHEN instr(error, ':') > 0 THEN substr(error, 1, instr(error, ':') - 1)"
            f" ELSE error END AS code, COUNT(*) FROM {table} WHERE error IS NOT NULL"
            " AND error != '' GROUP BY code"
        ):
            code = _code(r[0])
            errors[(what, code)] = errors.get((what, code), 0) + int(r[1])
    pending = await session.row("SELECT COUNT(*) FROM commands WHERE status = 'pending'")
    return MetricsSnapshot(
        cases_by_status=cases,
        beams_by_status=beams,
        case_verdicts=case_verdicts,
        beam_verdicts=beam_verdicts,
        delivery_verdicts=deliveries,
        run_durations=runs,
        beam_durations=beam_times,
        gpus=gpus,
        leased=frozenset((r[0], r[1]) for r in leases),
        leases_by_host=by_host,
        hosts=tuple(await Hosts(session).find()),
        queued_beams=int(queued[0]) if queued else 0,
        errors=errors,
        commands_pending=int(pending[0]) if pending else 0,
    )


def _code(text: object) -> str:
    """An error's named code: one word of at most 64 characters, else `other`."""
    code = str(text or "").strip()
    if not code or len(code) > 64 or not code.replace("_", "").replace("-", "").isalnum():
        return "other"
    return code
