"""Benchmark plumbing: the real OpenSSH sshd, the one-line result format, and a closing summary.

Every benchmark prints exactly one line, `name value unit  ratio-or-target`, as soon as it
has it, and the same lines are repeated together at the end of the run. `make bench` runs
this folder (it is outside `make test`: `norecursedirs` skips it).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from tests.sshd import SshdServer

#: where the figures of the last run are written as JSON (for the README table)
RESULTS_ENV = "MQI_BENCH_RESULTS"
_RESULTS: list[str] = []
_FIGURES: list[dict[str, object]] = []

Report = Callable[..., str]


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Also collect `bench_*.py` here (a colleague's `bench_ingest.py` runs under `make bench`)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        module: pytest.Module = pytest.Module.from_parent(parent, path=file_path)
        return module
    return None


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


@pytest.fixture(scope="session")
def report() -> Report:
    """Print one benchmark line now and keep it for the summary."""

    def emit(name: str, value: float, unit: str, target: str, **detail: object) -> str:
        shown = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        line = f"{name} {shown} {unit}  {target}"
        if detail:
            line += "  (" + ", ".join(f"{k}={v}" for k, v in detail.items()) + ")"
        print("\n" + line, flush=True)
        _RESULTS.append(line)
        _FIGURES.append({"name": name, "value": value, "unit": unit, "target": target, **detail})
        return line

    return emit


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _RESULTS:
        return
    terminalreporter.section("benchmark figures")
    for line in _RESULTS:
        terminalreporter.write_line(line)
    out = os.environ.get(RESULTS_ENV)
    if out:
        Path(out).write_text(json.dumps(_FIGURES, indent=2, default=str) + "\n")


@pytest.fixture
def openssh(sshd: SshdServer) -> Iterator[SshdServer]:
    """The session's sshd, which must be the real OpenSSH one: the figures are about it."""
    if not sshd.is_openssh:
        pytest.fail(
            "benchmarks need OpenSSH's sshd (tests/sshd.py found none): `make bench` installs"
            " openssh-server as root, else install it (apt-get install openssh-server)"
        )
    yield sshd
