"""Dashboard dialogs, and the guard that keeps a failing action from taking the app down."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.message_pump import MessagePump
from textual.screen import ModalScreen
from textual.widgets import Input, Label, Static

from mqi_async.store.commands import PRIORITY_MAX, PRIORITY_MIN, priority_value

log = logging.getLogger(__name__)

P = ParamSpec("P")
N = TypeVar("N", bound=MessagePump)


def report_failure(node: MessagePump, what: str, exc: BaseException) -> None:
    """A dashboard action failed: one log line with the traceback, one notification."""
    log.error("dashboard: %s failed: %s", what, exc, exc_info=exc, extra={"component": "ui"})
    with contextlib.suppress(Exception):  # the app may be shutting down
        node.app.notify(f"{what} failed: {exc}", title="mqi-async", severity="error", timeout=10)


def guarded(
    what: str,
) -> Callable[
    [Callable[Concatenate[N, P], object]], Callable[Concatenate[N, P], Coroutine[Any, Any, None]]
]:
    """Run a handler (sync or async); an exception becomes a notification and a log line.

    Textual ends the whole app on an exception that leaves a handler, and the service's
    engine runs in the same process, so no dashboard key may ever let one out.
    """

    def wrap(
        fn: Callable[Concatenate[N, P], object],
    ) -> Callable[Concatenate[N, P], Coroutine[Any, Any, None]]:
        @functools.wraps(fn)
        async def run(node: N, /, *args: P.args, **kwargs: P.kwargs) -> None:
            try:
                result = fn(node, *args, **kwargs)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                report_failure(node, what, exc)

        return run

    return wrap


DIALOG_CSS = """
ConfirmDialog, PriorityDialog, LogScreen { align: center middle; }
.dialog {
    width: auto; height: auto; max-width: 90%; max-height: 90%;
    background: $panel; border: round $primary; padding: 0 1;
}
.dialog .hint { color: $text-muted; }
.dialog .problem { color: $error; display: none; }
#priority-value { width: 24; }
#log-dialog { width: 90%; height: auto; }
"""


class ConfirmDialog(ModalScreen[bool]):
    """A yes/no question in a small box; `y` confirms, `n` or escape declines."""

    DEFAULT_CSS = DIALOG_CSS
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "No", show=False),
    ]

    def __init__(self, title: str, question: str) -> None:
        super().__init__()
        self._title = title
        self._question = question

    def compose(self) -> ComposeResult:
        box = Vertical(classes="dialog", id="confirm-dialog")
        box.border_title = self._title
        with box:
            yield Label(self._question)
            yield Label("[b]y[/b] yes   [b]n[/b] / escape no", classes="hint")

    @guarded("answer")
    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class PriorityDialog(ModalScreen[int | None]):
    """Asks for a case's new priority; only a whole number in range is accepted."""

    DEFAULT_CSS = DIALOG_CSS
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Cancel")]

    def __init__(self, case_id: str, current: int) -> None:
        super().__init__()
        self._case_id = case_id
        self._current = current

    def compose(self) -> ComposeResult:
        box = Vertical(classes="dialog", id="priority-dialog")
        box.border_title = f"Priority of {self._case_id}"
        with box:
            yield Label(
                f"now {self._current}; higher runs first ({PRIORITY_MIN} to {PRIORITY_MAX})"
            )
            yield Input(value=str(self._current + 1), id="priority-value")
            yield Label("", id="priority-problem", classes="problem")
            yield Label("[b]enter[/b] set   [b]escape[/b] cancel", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#priority-value", Input).focus()

    def _problem(self, text: str) -> None:
        label = self.query_one("#priority-problem", Label)
        label.update(text)
        label.display = bool(text)

    @guarded("priority input")
    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        try:
            value = priority_value(event.value)
        except ValueError as exc:
            self._problem(str(exc))
            return
        self.dismiss(value)

    @guarded("priority input")
    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._problem("")

    @guarded("close")
    def action_close(self) -> None:
        self.dismiss(None)


class LogScreen(ModalScreen[None]):
    """Shows a beam's MOQUI log (or its events while the log is still on the host)."""

    DEFAULT_CSS = DIALOG_CSS
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,l", "close", "Close")]

    def __init__(self, title: str, text: str) -> None:
        super().__init__()
        self._title = title
        self._text = text

    def compose(self) -> ComposeResult:
        box = VerticalScroll(classes="dialog", id="log-dialog")
        box.border_title = self._title
        box.border_subtitle = "escape to close"
        with box:
            yield Static(self._text, markup=False)

    @guarded("close")
    def action_close(self) -> None:
        self.dismiss(None)
