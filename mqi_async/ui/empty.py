"""What the cases area says before the first case: where cases go, and how to try the demo."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.widgets import Static

#: one line: what intake expects in a case folder (README "What it does with a case")
CASE_LAYOUT = (
    "<case>/ holding the RTPLAN (.dcm), one log folder per delivery (PlanInfo.txt, *.ptn)"
    " and, written last, an empty _CASE_READY file"
)


def empty_state_text(scan_directory: Path | None) -> Text:
    text = Text()
    text.append("No cases yet.\n\n", style="bold")
    text.append("Drop a case folder into ")
    if scan_directory is not None:
        text.append(str(scan_directory), style="bold cyan")
        text.append("\n(scan_directory in the config; it is watched, nothing there is written)")
    else:
        text.append("the folder named by scan_directory in the config")
        text.append("\n(it is watched, nothing there is written)")
    text.append("\n\n")
    text.append("Layout   ", style="bold")
    text.append(CASE_LAYOUT + "\n\n")
    text.append("Try it   ", style="bold")
    text.append("mqi-async demo", style="bold cyan")
    text.append(" (or ")
    text.append("make demo", style="bold cyan")
    text.append(" in the source folder): sample cases through every stage, with verdicts")
    return text


class EmptyState(Static):
    """Shown in place of the cases and beams tables while the database holds no case."""

    DEFAULT_CSS = """
    EmptyState {
        height: 1fr;
        border: round $primary;
        padding: 1 2;
        display: none;
    }
    EmptyState.visible { display: block; }
    """

    def __init__(self, scan_directory: Path | None, *, id: str | None = None) -> None:
        super().__init__(empty_state_text(scan_directory), id=id)
        self.border_title = "getting started"
