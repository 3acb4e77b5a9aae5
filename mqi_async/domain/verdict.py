"""QA verdicts: the statuses of a dose or delivery check and how a pass rate maps to one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class QaStatus(StrEnum):
    """The state of one check (beam, delivery or case), as `status --json` shows it."""

    PENDING = "pending"
    PASSED = "passed"
    CONDITIONAL = "conditional"
    FAILED = "failed"
    SKIPPED = "skipped"  # with a named reason (no_tps_dose, checks off, …)
    ERROR = "error"  # the check itself could not be computed; with a named reason


#: worst first: a case's verdict is the worst of its parts; a part that was not checked
#: (skipped) keeps the whole from reading "passed", but never hides a failure
_SEVERITY: dict[QaStatus, int] = {
    QaStatus.ERROR: 0,
    QaStatus.FAILED: 1,
    QaStatus.CONDITIONAL: 2,
    QaStatus.PENDING: 3,
    QaStatus.SKIPPED: 4,
    QaStatus.PASSED: 5,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """qa.pass_percent and qa.conditional_percent."""

    pass_percent: float = 95.0
    conditional_percent: float = 80.0

    def __post_init__(self) -> None:
        if not 0 <= self.conditional_percent <= self.pass_percent <= 100:
            raise ValueError("need 0 <= conditional_percent <= pass_percent <= 100")


def classify(pass_rate_percent: float, thresholds: Thresholds) -> QaStatus:
    """passed at or above pass_percent, conditional at or above conditional_percent, else failed."""
    if pass_rate_percent != pass_rate_percent:  # NaN: nothing was evaluated
        return QaStatus.ERROR
    if pass_rate_percent >= thresholds.pass_percent:
        return QaStatus.PASSED
    if pass_rate_percent >= thresholds.conditional_percent:
        return QaStatus.CONDITIONAL
    return QaStatus.FAILED


def worst(statuses: Iterable[QaStatus]) -> QaStatus:
    """The case's verdict from its parts: the worst one (skipped only above passed).

    A case with nothing to judge yet is pending.
    """
    parts = list(statuses)
    if not parts:
        return QaStatus.PENDING
    return min(parts, key=_SEVERITY.__getitem__)
