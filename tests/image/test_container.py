"""The container image, run for real: `make image-test` (after `make image`).

Skipped unless MQI_IMAGE_TEST=1 (set by `make image-test`), so `make test` never builds or runs
containers; skipped with a one-line reason when no container engine answers or the image is
missing. Environment: MQI_IMAGE (default mqi-async:latest), MQI_ENGINE (docker | podman).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(600)

IMAGE = os.environ.get("MQI_IMAGE", "mqi-async:latest")
CONFIG = "/config/config.yaml"
CASES = 3
BEAMS = 2
#: `docker stop`'s grace period in the test; the service must exit well within it
GRACE_S = 30
TERMINAL = {"completed", "failed", "cancelled"}

# the demo's own case generator, run inside the container: sample cases delivered two hours ago
FEED = f"""
import asyncio
from pathlib import Path
from mqi_async.demo.runner import DemoOptions, feed_cases
asyncio.run(feed_cases(Path("/data/incoming"), DemoOptions(
    workdir=None, cases={CASES}, beams={BEAMS}, gpus=4, headless=True, exit_when_done=False,
    arrival_gap_s=0.5)))
"""

# one more case, fed after the demo cases, to stop the container while its beams run
LATE = "LATE0001"
FEED_LATE = f"""
from datetime import datetime, timedelta
from pathlib import Path
from mqi_async.demo.cases import CaseSpec, write_case
write_case(Path("/data/incoming"), CaseSpec(
    case_id="{LATE}", beams={BEAMS}, layers_per_beam=2, nested=False, seed=99,
    first_delivery_at=(datetime.now() - timedelta(hours=2)).replace(microsecond=0)))
"""


def _engine() -> str:
    if os.environ.get("MQI_IMAGE_TEST") != "1":
        pytest.skip("container image test: run it with `make image-test`")
    wanted = os.environ.get("MQI_ENGINE")
    reasons = []
    for name in [wanted] if wanted else ["docker", "podman"]:
        if shutil.which(name) is None:
            reasons.append(f"{name}: not installed")
            continue
        info = subprocess.run([name, "info"], capture_output=True, text=True, timeout=60)
        if info.returncode == 0:
            return name
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        reasons.append(f"{name} info: {last}")
    pytest.skip("no container engine can start here (" + "; ".join(reasons) + ")")


def _sh(*argv: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {done.returncode}\n{done.stdout}{done.stderr}")
    return done


@pytest.fixture
def engine() -> str:
    name = _engine()
    if subprocess.run([name, "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        pytest.skip(f"image {IMAGE} is not built: run `make image` first")
    return name


@pytest.fixture
def volume(engine: str) -> Iterator[str]:
    name = f"mqi-image-test-{uuid.uuid4().hex[:8]}"
    _sh(engine, "volume", "create", name)
    try:
        yield name
    finally:
        _sh(engine, "volume", "rm", "-f", name, check=False)


def _status(engine: str, container: str) -> list[dict[str, Any]]:
    out = _sh(engine, "exec", container, "mqi-async", "status", "--json", "-c", CONFIG).stdout
    cases: list[dict[str, Any]] = json.loads(out)["cases"]
    return cases


def _wait_cases(
    engine: str,
    container: str,
    count: int,
    done: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 300,
) -> list[dict[str, Any]]:
    """Poll `status --json` inside the container until `done(cases)` (and `count` cases)."""
    deadline = time.monotonic() + timeout
    cases: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        cases = _status(engine, container)
        if len(cases) == count and done(cases):
            return cases
        time.sleep(1)
    raise AssertionError(f"timed out waiting for the cases: {json.dumps(cases)[:3000]}")


def _stop(engine: str, container: str) -> float:
    """`docker stop` (SIGTERM, then SIGKILL after GRACE_S); asserts exit 0 within the grace."""
    started = time.monotonic()
    _sh(engine, "stop", "--time", str(GRACE_S), container, timeout=GRACE_S + 30)
    stopped_in = time.monotonic() - started
    state = json.loads(_sh(engine, "inspect", "-f", "{{json .State}}", container).stdout)
    assert state["ExitCode"] == 0, state
    assert stopped_in < GRACE_S, f"took {stopped_in:.1f} s: SIGKILLed after the grace period"
    return stopped_in


def _all_terminal(cases: list[dict[str, Any]]) -> bool:
    return all(c["status"] in TERMINAL for c in cases)


def test_container_runs_demo_cases_stops_on_sigterm_and_keeps_the_database(
    engine: str, volume: str, tmp_path: Path
) -> None:
    # an SSH client key and known_hosts, mounted read-only where the config's ~/.ssh points
    ssh_dir = tmp_path / "ssh"
    ssh_dir.mkdir()
    (ssh_dir / "known_hosts").write_text("gpu1.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI\n")
    (ssh_dir / "id_ed25519").write_text("not a real key\n")
    for p in (ssh_dir, *ssh_dir.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)

    container = f"mqi-image-test-{uuid.uuid4().hex[:8]}"
    _sh(
        engine, "run", "--detach", "--name", container,
        "--volume", f"{volume}:/data",
        "--volume", f"{ssh_dir}:/home/mqi/.ssh:ro",
        # the image's HEALTHCHECK command, checked every 2 s here instead of 30 s
        "--health-interval", "2s", "--health-start-period", "0s",
        "--env", "MQI_GPU__POLL_SECONDS=2",
        "--env", "MQI_INGEST__RESCAN_SECONDS=5",
        IMAGE,
    )  # fmt: skip
    try:
        assert _sh(engine, "exec", container, "id", "-u").stdout.strip() == "10001"
        ro = _sh(engine, "exec", container, "touch", "/home/mqi/.ssh/x", check=False)
        assert ro.returncode != 0, "the SSH folder must be mounted read-only"
        _sh(engine, "exec", container, "test", "-r", "/home/mqi/.ssh/known_hosts")

        _sh(engine, "exec", container, "python", "-c", FEED)
        cases = _wait_cases(engine, container, CASES, _all_terminal)
        assert all(c["status"] == "completed" for c in cases), cases
        for case in cases:
            beams = case["beams"]
            assert isinstance(beams, list) and len(beams) == BEAMS
            for beam in beams:
                assert beam["status"] == "completed" and beam["outputs"], beam

        if engine == "docker":
            deadline = time.monotonic() + 60
            health = "starting"
            while time.monotonic() < deadline and health == "starting":
                time.sleep(1)
                health = _sh(
                    engine, "inspect", "-f", "{{.State.Health.Status}}", container
                ).stdout.strip()
            assert health == "healthy", _sh(engine, "inspect", container).stdout[-2000:]
        else:
            _sh(engine, "healthcheck", "run", container)

        stopped_in = _stop(engine, container)

        # again, stopped while a beam of one more case runs, then started on the same volume
        _sh(engine, "start", container)
        _sh(engine, "exec", container, "python", "-c", FEED_LATE)

        def late_running(cases: list[dict[str, Any]]) -> bool:
            late = [c for c in cases if c["case_id"] == LATE]
            return bool(late) and any(b["status"] == "running" for b in late[0]["beams"])

        _wait_cases(engine, container, CASES + 1, late_running, timeout=120)
        stopped_mid_run_in = _stop(engine, container)
        _sh(engine, "start", container)
        cases = _wait_cases(engine, container, CASES + 1, _all_terminal)
        assert all(c["status"] == "completed" for c in cases), cases
        late_attempts = [b["attempts"] for c in cases if c["case_id"] == LATE for b in c["beams"]]
        _stop(engine, container)

        # stdout: JSON lines only
        logs = _sh(engine, "logs", container)
        lines = [line for line in logs.stdout.splitlines() if line.strip()]
        assert lines, "no log lines on stdout"
        records = [json.loads(line) for line in lines]
        assert all(isinstance(r, dict) for r in records)
        print(
            f"\n{engine}: {CASES} demo cases completed; SIGTERM: exit 0 in {stopped_in:.1f} s, "
            f"{stopped_mid_run_in:.1f} s with a beam running; after a restart {LATE} completed "
            f"(MOQUI attempts per beam: {late_attempts}); "
            f"{len(lines)} JSON log lines"
        )
    finally:
        # --volumes: also the anonymous volume made for the image's VOLUME /config (the named
        # data volume is removed by its fixture)
        _sh(engine, "rm", "--force", "--volumes", container, check=False)

    # the database outlived the container on the volume: a fresh container reads it
    out = _sh(
        engine,
        "run",
        "--rm",
        "--volume",
        f"{volume}:/data",
        IMAGE,
        "status",
        "--json",
        "-c",
        CONFIG,
    ).stdout
    again = json.loads(out)["cases"]
    assert sorted(c["case_id"] for c in again) == sorted(c["case_id"] for c in cases)
    assert all(c["status"] == "completed" for c in again), again
