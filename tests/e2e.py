"""Helpers for end-to-end tests: a config pointing at the test sshd with the bundled simulators."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from mqi_async.config import Settings, default_moqui, load_settings
from mqi_async.demo.cases import CaseSpec, WrittenCase, write_case
from mqi_async.service import Service, open_service, run_until_stopped
from tests.sshd import SshdServer

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / "mqi_async" / "demo" / "bin"

#: small phantom so raw files stay tiny and runs fast
SMALL_PHANTOM: dict[str, Any] = {
    "PhantomDimX": 20,
    "PhantomDimY": 16,
    "PhantomDimZ": 10,
    "PhantomPositionX": -10,
    "PhantomPositionY": -8,
    "PhantomPositionZ": -5,
}


@dataclass
class Rig:
    """One test installation: folders, the simulator state and the config file."""

    root: Path
    config_path: Path
    state_dir: Path

    @property
    def scan(self) -> Path:
        return self.root / "incoming"

    @property
    def db(self) -> Path:
        return self.root / "mqi.db"

    def settings(self) -> Settings:
        return load_settings(self.config_path)

    def fail_beams(self, mode: str | None, which: str = "all") -> None:
        """Steer the MOQUI simulator: every beam (or one beam name/number) fails with `mode`."""
        d = self.state_dir / "fail"
        d.mkdir(parents=True, exist_ok=True)
        if mode is None:
            (d / which).unlink(missing_ok=True)
        else:
            (d / which).write_text(mode)

    def add_foreign_process(self, gpu_index: int, name: str = "python") -> Path:
        d = self.state_dir / "foreign"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"gpu{gpu_index}.json"
        p.write_text(
            json.dumps(
                {
                    "gpu_index": gpu_index,
                    "pid": 4242 + gpu_index,
                    "used_memory_mb": 30000,
                    "process_name": name,
                }
            )
        )
        return p

    def drop_case(self, case_id: str, *, beams: int = 2, **kw: Any) -> WrittenCase:
        first = (datetime.now() - timedelta(hours=3)).replace(microsecond=0)
        spec = CaseSpec(
            case_id=case_id,
            beams=beams,
            layers_per_beam=1,
            samples_per_layer=8,
            first_delivery_at=first,
            **kw,
        )
        return write_case(self.scan, spec, marker_last=True)


def make_rig(
    root: Path,
    sshd: SshdServer,
    *,
    gpus: int = 2,
    run_seconds: float = 0.5,
    overrides: Mapping[str, Any] | None = None,
    sim_env: Mapping[str, str] | None = None,
) -> Rig:
    """Write a config whose one host is the test sshd running the bundled simulators."""
    root.mkdir(parents=True, exist_ok=True)
    state = root / "sim-state"
    remote_root = sshd.work_dir / "runs" / f"{root.parent.name}-{root.name}"
    env = [
        "env",
        f"MQI_SIM_STATE_DIR={state}",
        f"MQI_SIM_GPUS={gpus}",
        f"MQI_SIM_RUN_SECONDS={run_seconds}",
        "MQI_SIM_GPU_MEMORY_MB=24576",
        *(f"{k}={v}" for k, v in (sim_env or {}).items()),
    ]
    config: dict[str, Any] = {
        "scan_directory": "incoming",
        "work_directory": "work",
        "database": "mqi.db",
        "ingest": {"rescan_seconds": 5},
        "hosts": [
            {
                "name": "gpu1",
                "kind": "ssh",
                "address": sshd.host,
                "port": sshd.port,
                "username": sshd.user,
                "client_keys": [str(sshd.key_path)],
                "known_hosts": str(sshd.known_hosts_path),
                "remote_root": str(remote_root),
                "moqui_command": [*env, sys.executable, str(BIN / "tps_env")],
                "nvidia_smi_command": shlex.join([*env, sys.executable, str(BIN / "nvidia-smi")]),
                "connect_timeout_seconds": 5,
                "keepalive_seconds": 5,
            }
        ],
        "gpu": {"poll_seconds": 1, "min_free_memory_mb": 1000},
        "runs": {"poll_seconds": 0.3, "timeout_seconds": 120},
        "retry": {"max_attempts": 3, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 1},
        "moqui": {**default_moqui(), **SMALL_PHANTOM},
        "logging": {"directory": "logs", "level": "DEBUG"},
        # one MOQUI run per beam, so launch counts mean what these tests say; the dose-check
        # tests ask for planned_mc (a second run per beam) themselves
        "qa": {"reference": "none", "report": False},
    }
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Rig(root=root, config_path=path, state_dir=state)


@contextlib.asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[Service]:
    """The whole service in this event loop (no UI), stopped gracefully on exit."""
    async with open_service(settings) as service:
        task = asyncio.create_task(run_until_stopped(service, None))
        try:
            # generous: a loaded 2-core machine starts slowly
            await asyncio.wait_for(service.engine.ready.wait(), 60)
            yield service
        finally:
            service.request_stop()
            await asyncio.wait_for(task, 30)


async def wait_until(
    check: Callable[[], Any],
    *,
    timeout_s: float = 60.0,
    interval_s: float = 0.2,
    what: str = "condition",
) -> Any:
    """Poll an async or sync predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


async def wait_all_running(service: Service, case_id: str, beams: int) -> None:
    """Wait until all `beams` beams of a case are RUNNING (a run is in flight on the host)."""
    from mqi_async.domain.model import BeamStatus

    async def running() -> bool:
        rows = await service.store.list_beams(case_id)
        return len(rows) == beams and all(b.status == BeamStatus.RUNNING for b in rows)

    await wait_until(running, timeout_s=60, what=f"beams of {case_id} running")


async def statuses(service: Service) -> dict[str, str]:
    return {c.case_id: str(c.status) for c in await service.store.snapshot()}


def status_json(rig: Rig) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-m", "mqi_async", "status", "--json", "-c", str(rig.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data: dict[str, Any] = json.loads(res.stdout)
    return data


def spawn_service(rig: Rig, log_name: str = "service.out") -> subprocess.Popen[bytes]:
    """`mqi-async run --no-ui` as a child process, its output in a file under the rig."""
    with (rig.root / log_name).open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mqi_async", "run", "--no-ui", "-c", str(rig.config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=rig.root,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def wait_status(
    rig: Rig, ok: Callable[[dict[str, Any]], bool], timeout_s: float = 90.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.CalledProcessError, json.JSONDecodeError):
            last = status_json(rig)
            if ok(last):
                return last
        time.sleep(0.5)
    raise AssertionError(f"status never matched; last: {json.dumps(last)[:2000]}")


def beam_statuses(rig: Rig) -> list[str]:
    """Beam statuses read straight from the database (fast, for mid-run gates)."""
    import sqlite3

    if not rig.db.exists():
        return []
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{rig.db}?mode=ro", uri=True, timeout=5)
        ) as db:
            return [row[0] for row in db.execute("SELECT status FROM beams")]
    except sqlite3.Error:
        return []


def wait_beams(rig: Rig, ok: Callable[[list[str]], bool], timeout_s: float = 90.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    last: list[str] = []
    while time.monotonic() < deadline:
        last = beam_statuses(rig)
        if ok(last):
            return last
        time.sleep(0.1)
    raise AssertionError(f"beam statuses never matched; last: {last}")


def wait_for_log(path: Path, text: str, timeout_s: float = 60.0) -> None:
    """Wait until a service's output file contains `text`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared in {path}")
