import math

import pytest

from mqi_async.domain.verdict import QaStatus, Thresholds, classify, worst


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        (100.0, QaStatus.PASSED),
        (95.0, QaStatus.PASSED),
        (94.99, QaStatus.CONDITIONAL),
        (80.0, QaStatus.CONDITIONAL),
        (79.99, QaStatus.FAILED),
        (0.0, QaStatus.FAILED),
        (math.nan, QaStatus.ERROR),
    ],
)
def test_classify_uses_the_thresholds_inclusively(rate: float, expected: QaStatus) -> None:
    assert classify(rate, Thresholds()) is expected


def test_thresholds_must_be_ordered() -> None:
    with pytest.raises(ValueError):
        Thresholds(pass_percent=80, conditional_percent=90)


def test_worst_part_decides_and_skips_do_not_hide_failures() -> None:
    assert worst([]) is QaStatus.PENDING
    assert worst([QaStatus.SKIPPED, QaStatus.SKIPPED]) is QaStatus.SKIPPED
    # what was not checked keeps the whole from reading passed
    assert worst([QaStatus.PASSED, QaStatus.SKIPPED]) is QaStatus.SKIPPED
    assert worst([QaStatus.SKIPPED, QaStatus.CONDITIONAL]) is QaStatus.CONDITIONAL
    assert worst([QaStatus.PASSED, QaStatus.CONDITIONAL]) is QaStatus.CONDITIONAL
    assert worst([QaStatus.PENDING, QaStatus.PASSED]) is QaStatus.PENDING
    assert worst([QaStatus.CONDITIONAL, QaStatus.FAILED, QaStatus.ERROR]) is QaStatus.ERROR
