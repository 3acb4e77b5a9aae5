"""SimulatedHost: real SSH and SFTP to an in-process server running the bundled simulators."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mqi_async.config import SimulatedHostSettings
from mqi_async.domain.errors import HostUnavailableError, TransientError
from mqi_async.domain.gpus import busy_uuids
from mqi_async.domain.jobs import JobSpec, JobState
from mqi_async.hpc.simulated import DEMO_BIN, SimulatedHost


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[SimulatedHost]:
    settings = SimulatedHostSettings(kind="simulated", name="sim", gpus=3, run_seconds=0.2)
    host = SimulatedHost(settings, work_dir=tmp_path / "sim", kill_grace_s=1.0)
    await host.start()
    yield host
    await host.aclose()


async def test_not_started_is_unavailable(tmp_path: Path) -> None:
    host = SimulatedHost(SimulatedHostSettings(kind="simulated", name="s"), work_dir=tmp_path)
    assert not host.is_available()
    with pytest.raises(HostUnavailableError):
        await host.run(["true"], timeout_s=5)


async def test_commands_and_files_go_through_ssh(sim: SimulatedHost, tmp_path: Path) -> None:
    assert sim.is_available() and sim.kind == "simulated" and sim.leases_gpus
    result = await sim.run(["sh", "-c", 'echo "$MQI_SIM_GPUS $0"', "it's"], timeout_s=10)
    assert result.stdout == "3 it's\n"
    src = tmp_path / "in"
    src.mkdir()
    (src / "a b.csv").write_text("1,2\n")
    remote = f"{sim.remote_root}/case 1"
    assert (await sim.put_tree(src, remote)).files_sent == 1
    assert await sim.list_dir(remote) == {"a b.csv": 4}
    got = await sim.get_files(remote, ["a b.csv"], tmp_path / "out")
    assert got.files_sent == 1 and (tmp_path / "out" / "a b.csv").read_text() == "1,2\n"


async def test_sftp_stays_inside_the_work_dir(sim: SimulatedHost) -> None:
    with pytest.raises(TransientError, match="outside"):
        await sim.list_dir("/etc")


async def test_sample_gpus_sees_simulated_and_foreign_processes(sim: SimulatedHost) -> None:
    if not (DEMO_BIN / "nvidia-smi").exists():
        pytest.skip("the nvidia-smi simulator is not there yet")
    foreign = sim.state_dir / "foreign"
    foreign.mkdir(parents=True, exist_ok=True)
    (foreign / "other.json").write_text(json.dumps({"gpu_index": 1, "pid": 4242}))
    sample = await sim.sample_gpus()
    assert [g.index for g in sample.gpus] == [0, 1, 2]
    assert not sample.skipped_rows
    assert busy_uuids(sample.apps) == {sample.gpus[1].uuid}


async def test_detached_simulator_run(sim: SimulatedHost) -> None:
    if not (DEMO_BIN / "tps_env").exists():
        pytest.skip("the MOQUI simulator is not there yet")
    job_dir = f"{sim.remote_root}/case/beam_1/1"
    # no valid input: the simulator must fail like MOQUI does, and the wrapper must say so
    handle = await sim.spawn_job(
        JobSpec(
            job_dir=job_dir,
            argv=(*sim.moqui_command, "moqui_tps.in"),
            env=(("CUDA_VISIBLE_DEVICES", "0"),),
            files=(("moqui_tps.in", "GPUID 0\n"),),
        )
    )
    deadline = time.monotonic() + 20
    while (status := (await sim.poll_jobs([handle]))[job_dir]).state is not JobState.EXITED:
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.1)
    assert status.exit_code != 0 and status.log_tail


def test_every_host_kind_satisfies_the_engine_protocol(tmp_path: Path) -> None:
    from mqi_async.engine.ports import Host
    from mqi_async.hpc.local import LocalHost
    from mqi_async.hpc.ssh import ConnectLimiter, SshEndpoint, SshPool
    from mqi_async.hpc.ssh_host import SshHost

    pool = SshPool(SshEndpoint(name="r", address="127.0.0.1"), limiter=ConnectLimiter())
    hosts: list[Host] = [  # mypy checks the structural match; pytest checks the kinds
        SimulatedHost(SimulatedHostSettings(kind="simulated", name="s"), work_dir=tmp_path),
        LocalHost(name="l", remote_root=tmp_path),
        SshHost(pool, remote_root="/srv/mqi"),
    ]
    assert [h.kind for h in hosts] == ["simulated", "local", "ssh"]
    assert all(h.leases_gpus and not h.is_available() for h in hosts)
