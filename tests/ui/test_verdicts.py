"""The verdict column of the cases and beams tables: coloured, with the pass rate, live."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.text import Text
from textual.widgets import DataTable

from mqi_async.domain.verdict import QaStatus as Q
from mqi_async.store import Store
from mqi_async.ui.cells import percent_text, verdict_text
from tests.ui.seed import make_app


def cell(table: DataTable[Any], row: str, column: str) -> Text:
    value = table.get_cell(row, column)
    assert isinstance(value, Text), value
    return value


def test_verdict_text_colours_and_rates() -> None:
    assert verdict_text(Q.PASSED, {"pass_rate_percent": 99.14}) == Text(
        "passed 99.1%", style="bold green"
    )
    assert verdict_text("conditional", {"pass_rate_percent": 91.38}).style == "bold yellow"
    assert verdict_text(Q.FAILED, {"pass_rate_percent": 62.0}).plain == "failed 62.0%"
    assert verdict_text(Q.ERROR, None) == Text("error", style="red")
    # not judged: dim, and no rate even if one is there
    assert verdict_text(None) == Text("pending", style="dim")
    assert verdict_text(Q.SKIPPED, {"pass_rate_percent": 50}) == Text("skipped", style="dim")
    # rates that are not numbers are left out, an unknown status is shown as it is
    assert verdict_text(Q.PASSED, {"pass_rate_percent": "n/a"}).plain == "passed"
    assert verdict_text(Q.ERROR, {"pass_rate_percent": float("nan")}).plain == "error"
    assert verdict_text("weird").plain == "weird"
    # a conditional 94.96 % never reads as the 95.0 % that passes
    assert percent_text(94.96) == "94.9%"
    assert percent_text(100) == "100.0%"


async def test_cases_and_beams_show_their_verdicts(clinic: Store, tmp_path: Path) -> None:
    app = make_app(clinic, tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        cases = app.query_one("#cases", DataTable)
        assert cell(cases, "GOOD", "verdict") == Text("passed 98.8%", style="bold green")
        # the plan sum is conditional, a delivery failed: the case fails, without the plan's rate
        assert cell(cases, "MIXED", "verdict") == Text("failed", style="bold red")
        assert cell(cases, "RUN", "verdict") == Text("pending", style="dim")
        assert cell(cases, "SKIP", "verdict") == Text("skipped", style="dim")
        assert cell(cases, "FAIL", "verdict") == Text("error", style="red")
        assert cases.get_cell("GOOD", "status") == "completed"

        beams = app.query_one("#beams", DataTable)
        assert app.selected_case() == "GOOD"
        assert cell(beams, "GOOD_beam_1", "verdict").plain == "passed 99.1%"
        cases.move_cursor(row=cases.get_row_index("MIXED"))
        await pilot.pause()
        assert cell(beams, "MIXED_beam_2", "verdict") == Text(
            "conditional 91.3%", style="bold yellow"
        )
        cases.move_cursor(row=cases.get_row_index("RUN"))
        await pilot.pause()
        assert cell(beams, "RUN_beam_1", "verdict").plain == "pending"


async def test_a_verdict_fills_in_when_the_check_finishes(clinic: Store, tmp_path: Path) -> None:
    app = make_app(clinic, tmp_path)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        cases = app.query_one("#cases", DataTable)
        cases.move_cursor(row=cases.get_row_index("RUN"))
        await pilot.pause()
        beams = app.query_one("#beams", DataTable)
        await clinic.record_dose_check(
            "RUN", "RUN_beam_1", status=Q.CONDITIONAL, result={"pass_rate_percent": 88.04}
        )
        for _ in range(100):
            await pilot.pause(0.05)
            if cell(beams, "RUN_beam_1", "verdict").plain != "pending":
                break
        assert cell(beams, "RUN_beam_1", "verdict") == Text(
            "conditional 88.0%", style="bold yellow"
        )
        # the case waits for all its checks
        assert cell(cases, "RUN", "verdict").plain == "pending"
        assert cases.get_cell("RUN", "status") == "processing"
