"""The web view's cost to the engine (issue 21): beam overhead with and without 50 clients.

The same workload runs twice in one go, each time on a fresh installation with the web view
on: 28 cases x 4 beams on one host with 4 simulated GPUs (2 s MOQUI stand-in runs), through
the real OpenSSH sshd, the service a child process (`mqi-async run --no-ui`) as in
production. The second time, 50 HTTP clients on loopback fetch the pages in a loop (cases
list, case pages, their live fragments, hosts, /api/status, /metrics) for 60 s at most,
with no pause between requests. Beam overhead is as in test_bench_gpu.py: lease to
completed, less the simulator's own run and the download. Reported: the median overhead of
both runs and their ratio (goal: at most 1.10), and what the clients got.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.bench.test_bench_gpu import _read
from tests.e2e import make_rig, spawn_service, wait_beams
from tests.sshd import SshdServer

pytestmark = pytest.mark.timeout(900)

CASES = 28
BEAMS_PER_CASE = 4
GPUS = 4
RUN_SECONDS = 2.0
CLIENTS = 50
LOAD_S = 60.0
PAGES = ("/", "/fragments/cases", "/hosts", "/fragments/hosts", "/api/status", "/metrics")


@dataclass(frozen=True, slots=True)
class Load:
    requests: int
    errors: int
    by_status: dict[int, int]
    seconds: float
    latency_p50_ms: float
    latency_p95_ms: float


@dataclass(frozen=True, slots=True)
class Run:
    overhead_s: list[float]
    wall_s: float
    load: Load | None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _client(
    session: aiohttp.ClientSession,
    base: str,
    stop_at: float,
    statuses: dict[int, int],
    latencies: list[float],
) -> int:
    errors = 0
    rng = random.Random()
    while time.monotonic() < stop_at:
        case = f"BENCH{rng.randrange(CASES):02d}"
        path = rng.choice(
            (*PAGES, f"/case?id={case}", f"/fragments/case?id={case}", f"/api/case?id={case}")
        )
        started = time.perf_counter()
        try:
            async with session.get(base + path) as r:
                await r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
        except (aiohttp.ClientError, TimeoutError):
            errors += 1
            await asyncio.sleep(0.1)
        latencies.append(time.perf_counter() - started)
    return errors


async def _hammer(base: str, done: Callable[[], bool]) -> Load:
    """CLIENTS concurrent clients, each one request after another, until LOAD_S or `done()`."""
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    started = time.monotonic()
    stop_at = started + LOAD_S
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        clients = [
            asyncio.create_task(_client(session, base, stop_at, statuses, latencies))
            for _ in range(CLIENTS)
        ]
        while not all(c.done() for c in clients):
            if await asyncio.to_thread(done):
                stop_at = 0.0  # the workload is over: the clients stop after their request
            await asyncio.sleep(0.5)
        errors = sum(await asyncio.gather(*clients))
    ordered = sorted(latencies) or [float("nan")]
    return Load(
        requests=sum(statuses.values()),
        errors=errors,
        by_status=dict(sorted(statuses.items())),
        seconds=time.monotonic() - started,
        latency_p50_ms=ordered[len(ordered) // 2] * 1000,
        latency_p95_ms=ordered[int(len(ordered) * 0.95)] * 1000,
    )


def _workload(sshd: SshdServer, root: Path, *, with_clients: bool) -> Run:
    port = _free_port()
    rig = make_rig(
        root,
        sshd,
        gpus=GPUS,
        run_seconds=RUN_SECONDS,
        overrides={
            "gpu": {"poll_seconds": 1.0},
            "runs": {"poll_seconds": 0.3},
            "logging": {"level": "INFO"},
            "web": {"enabled": True, "port": port},
        },
    )
    config = yaml.safe_load(rig.config_path.read_text())
    for host in config["hosts"]:
        # the stand-in without numpy and pydicom (as test_bench_gpu.py)
        host["moqui_command"].insert(1, "MQI_SIM_NO_PYDICOM=1")
    rig.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    for i in range(CASES):
        rig.drop_case(f"BENCH{i:02d}", beams=BEAMS_PER_CASE, seed=i)
    n = CASES * BEAMS_PER_CASE

    def finished() -> bool:
        from tests.e2e import beam_statuses

        s = beam_statuses(rig)
        return len(s) == n and all(x in ("completed", "failed") for x in s)

    proc = spawn_service(rig)
    started = time.monotonic()
    load = None
    try:
        if with_clients:
            base = f"http://127.0.0.1:{port}"
            _wait_up(base)
            load = asyncio.run(_hammer(base, finished))
        wait_beams(rig, lambda s: len(s) == n and all(x in ("completed", "failed") for x in s),
                   timeout_s=400)  # fmt: skip
        wall_s = time.monotonic() - started
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    beams = _read(rig.db)
    assert len(beams) == n, "every beam must complete in one attempt"
    return Run(overhead_s=[b.overhead_s for b in beams], wall_s=wall_s, load=load)


def _wait_up(base: str) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{base} never answered")


def test_beam_overhead_under_fifty_web_clients(
    sshd_server: SshdServer, tmp_path: Path, report: Callable[..., str]
) -> None:
    sshd_server.start()
    if not sshd_server.is_openssh:
        pytest.fail("benchmarks need OpenSSH's sshd")
    quiet = _workload(sshd_server, tmp_path / "quiet", with_clients=False)
    loaded = _workload(sshd_server, tmp_path / "loaded", with_clients=True)
    assert loaded.load is not None
    base_ms = statistics.median(quiet.overhead_s) * 1000
    load_ms = statistics.median(loaded.overhead_s) * 1000
    load = loaded.load
    report(
        "web_beam_overhead_quiet",
        base_ms,
        "ms",
        f"{CASES * BEAMS_PER_CASE} beams, web on, no clients",
    )
    report(
        "web_beam_overhead_50_clients",
        load_ms,
        "ms",
        f"ratio {load_ms / base_ms:.3f} (goal<=1.10)",
        ratio=round(load_ms / base_ms, 3),
        p95_quiet=f"{statistics.quantiles(quiet.overhead_s, n=20)[-1] * 1000:.0f}ms",
        p95_loaded=f"{statistics.quantiles(loaded.overhead_s, n=20)[-1] * 1000:.0f}ms",
        wall_quiet=f"{quiet.wall_s:.1f}s",
        wall_loaded=f"{loaded.wall_s:.1f}s",
        requests=load.requests,
        per_s=f"{load.requests / load.seconds:.0f}",
        load_s=f"{load.seconds:.0f}",
        statuses=json.dumps(load.by_status),
        client_errors=load.errors,
        latency_p50=f"{load.latency_p50_ms:.0f}ms",
        latency_p95=f"{load.latency_p95_ms:.0f}ms",
    )
    assert load.requests > CLIENTS, "the clients never got through"
