"""The shipped systemd unit keeps local MOQUI runs alive across a service stop or crash."""

from __future__ import annotations

import configparser
from pathlib import Path

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "mqi-async.service"


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNIT)
    return parser["Service"]


def test_a_stop_signals_only_the_service_not_its_detached_runs() -> None:
    service = _service()
    # mixed/control-group would SIGKILL every process of the cgroup, setsid'd runs included
    assert service["KillMode"] == "process"
    assert service["KillSignal"] == "SIGTERM"


def test_the_unit_gives_the_graceful_stop_time_and_keeps_files_private() -> None:
    service = _service()
    assert int(service["TimeoutStopSec"]) >= 15  # the service stops within 10 s
    assert service["UMask"] == "0077"
    assert service["Restart"] == "on-failure"
