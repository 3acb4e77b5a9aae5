"""The whole service with a `kind: slurm` host: a real Slurm cluster with 4 fake GPUs, its
login node an OpenSSH sshd, MOQUI the bundled simulator run by batch jobs."""

from __future__ import annotations

import asyncio
import shlex
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from mqi_async.config import Settings, load_settings
from mqi_async.domain.model import BeamStatus, CaseStatus, RunStatus
from mqi_async.domain.privacy import case_key
from mqi_async.domain.records import RunRow
from mqi_async.service import Service
from mqi_async.store.secret import secret_path
from tests.e2e import running_service, wait_until
from tests.slurm_cluster import (
    BIN,
    ConcurrencyProbe,
    SlurmCluster,
    drop_case,
    fresh,
    module_cluster,
    sim_env,
    slurm_host_config,
    tps_env_argv,
    write_config,
)

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

RT_DOSE = "1.2.840.10008.5.1.4.1.1.481.2"


@pytest.fixture(scope="module")
def cluster_once() -> Iterator[SlurmCluster]:
    with module_cluster() as cluster:
        yield cluster


@pytest.fixture
def cluster(cluster_once: SlurmCluster) -> Iterator[SlurmCluster]:
    yield fresh(cluster_once)
    fresh(cluster_once)


@dataclass
class Rig:
    root: Path
    config: Path
    state_dir: Path
    remote_root: Path

    @property
    def scan(self) -> Path:
        return self.root / "incoming"

    def settings(self) -> Settings:
        return load_settings(self.config)

    def fail_beams(self, mode: str | None) -> None:
        d = self.state_dir / "fail"
        d.mkdir(parents=True, exist_ok=True)
        if mode is None:
            (d / "all").unlink(missing_ok=True)
        else:
            (d / "all").write_text(mode)


def make_rig(
    tmp_path: Path,
    cluster: SlurmCluster,
    *,
    run_seconds: float,
    max_jobs: int = 16,
    moqui_env: tuple[str, ...] = (),
    extra_hosts: tuple[dict[str, Any], ...] = (),
    **overrides: Any,
) -> Rig:
    root = tmp_path / "rig"
    state = tmp_path / "sim-state"
    remote_root = cluster.shared / tmp_path.name
    argv = tps_env_argv(state, run_seconds=run_seconds)
    argv[1:1] = list(moqui_env)
    host = slurm_host_config(
        cluster, name="cluster", remote_root=remote_root, moqui_command=argv, max_jobs=max_jobs
    )
    config = write_config(root, [host, *extra_hosts], **overrides)
    return Rig(root=root, config=config, state_dir=state, remote_root=remote_root)


async def case_states(svc: Service) -> dict[str, CaseStatus]:
    return {c.case_id: c.status for c in await svc.store.snapshot()}


def all_done(n: int, status: CaseStatus = CaseStatus.COMPLETED) -> Any:
    async def check(svc: Service) -> bool:
        states = await case_states(svc)
        return len(states) == n and all(s == status for s in states.values())

    return check


async def all_runs(svc: Service) -> list[RunRow]:
    runs: list[RunRow] = []
    for case in await svc.store.snapshot():
        for beam in case.beams:
            runs.extend(await svc.store.list_runs(beam.beam_id))
    return runs


def submitted_job_ids(cluster: SlurmCluster, name_part: str) -> list[str]:
    """Job ids of every job ever submitted whose name contains name_part (jobcomp log)."""
    ids = []
    text = cluster.jobcomp.read_text() if cluster.jobcomp.exists() else ""
    for line in text.splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if name_part in fields.get("Name", ""):
            ids.append(fields["JobId"])
    active = cluster.cmd("squeue", "-h", "-o", "%i|%j", check=False)
    for line in active.splitlines():
        job_id, _, name = line.partition("|")
        if name_part in name:
            ids.append(job_id)
    return ids


def check_rt_dose(path: str) -> None:
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == RT_DOSE
    assert ds.pixel_array.shape == (10, 16, 20)


def job_name_part(rig: Rig, case_id: str) -> str:
    """What a case's Slurm job names hold: its opaque key, never its id."""
    return f"mqi-{case_key(secret_path(rig.root / 'mqi.db').read_bytes(), case_id)}-b"


async def sample_queue_names(cluster: SlurmCluster, seen: list[str]) -> None:
    """`squeue`'s job names, as every user of the cluster sees them, until cancelled."""
    while True:
        out = await asyncio.to_thread(cluster.cmd, "squeue", "-h", "-o", "%j", check=False)
        seen.extend(out.split())
        await asyncio.sleep(0.2)


async def test_twelve_beams_on_four_gpus(tmp_path: Path, cluster: SlurmCluster) -> None:
    rig = make_rig(tmp_path, cluster, run_seconds=3, max_jobs=16)
    for i in range(3):
        drop_case(rig.scan, f"SL{i}", beams=4)
    queue_names: list[str] = []
    async with running_service(rig.settings()) as svc:
        sampler = asyncio.create_task(sample_queue_names(cluster, queue_names))
        async with ConcurrencyProbe(cluster, rig.state_dir) as probe:
            await wait_until(lambda: all_done(3)(svc), timeout_s=240, what="12 beams")
        sampler.cancel()
        snapshot = await svc.store.snapshot()
        runs = await all_runs(svc)
        slots = svc.engine.scheduler._slots["cluster"]  # the queue slots the engine holds
        hosts = {h.name: h for h in await svc.store.list_hosts()}
    # the dashboard's GPU panel shows the cluster's queue and its nodes' GPUs
    assert hosts["cluster"].detail is not None and "/4 GPUs" in hosts["cluster"].detail
    # Slurm, not the service (max_jobs 16), kept it at 4 running: one per fake GPU
    assert probe.samples > 20
    assert probe.max_running == 4 and probe.max_procs == 4
    assert probe.gpu_clash == []
    assert slots == set()
    beams = [b for c in snapshot for b in c.beams]
    assert len(beams) == 12
    for beam in beams:
        assert beam.status == BeamStatus.COMPLETED and beam.attempts == 1
        assert beam.host == "cluster" and beam.gpus == ()
        assert len(beam.outputs) == 1
        check_rt_dose(beam.outputs[0])
    assert len(runs) == 12 and all(r.status == RunStatus.SUCCEEDED for r in runs)
    # one sbatch per beam; the recorded job ids are Slurm's
    job_ids = sorted(r.job_id or "" for r in runs)
    assert (
        sorted(
            j for i in range(3) for j in submitted_job_ids(cluster, job_name_part(rig, f"SL{i}"))
        )
        == job_ids
    )
    # squeue (cluster-wide) showed our jobs during the run, and never a patient id
    assert len(queue_names) > 10 and all(n.startswith("mqi-c") for n in queue_names)
    assert not [n for n in queue_names if "SL" in n]
    for r in runs:
        tps = (Path(r.job_dir) / "moqui_tps.in").read_text()
        assert "GPUID 0" in tps


async def test_latency_through_the_service(
    tmp_path: Path, cluster: SlurmCluster, record_property: Any
) -> None:
    """Median over 10 beams: sbatch (the run row, written just before) -> the batch script's
    first line, and MOQUI's exit (exit file) -> the beam completed (RT Dose written)."""
    rig = make_rig(tmp_path, cluster, run_seconds=1, max_jobs=4, runs={"poll_seconds": 0.5})
    drop_case(rig.scan, "LAT", beams=10)
    async with running_service(rig.settings()) as svc:
        await wait_until(lambda: all_done(1)(svc), timeout_s=240, what="10 beams")
        beams = await svc.store.list_beams("LAT")
        runs = {b.beam_id: (await svc.store.list_runs(b.beam_id))[-1] for b in beams}
        # the last status event of a beam is its transition to COMPLETED
        done_at = {
            b.beam_id: max(
                e.at
                for e in await svc.store.recent_events(100, beam_id=b.beam_id)
                if e.kind == "beam_status"
            )
            for b in beams
        }
    to_start, to_noticed, to_completed = [], [], []
    for beam in beams:
        run = runs[beam.beam_id]
        d = Path(run.job_dir)
        started = (d / "slurm.claim" / "job_id").stat().st_mtime
        exited = (d / "exit_code").stat().st_mtime
        assert run.ended_at is not None
        to_start.append(started - run.started_at.timestamp())
        to_noticed.append(run.ended_at.timestamp() - exited)
        to_completed.append(done_at[beam.beam_id].timestamp() - exited)
    result = {
        "sbatch_to_start_s": statistics.median(to_start),
        "exit_to_run_noticed_s": statistics.median(to_noticed),
        "exit_to_beam_completed_s": statistics.median(to_completed),
    }
    print(
        "slurm service latency (median of 10, runs.poll_seconds 0.5): "
        + ", ".join(f"{k} {v:.2f}" for k, v in result.items())
    )
    for key, value in result.items():
        record_property(key, round(value, 3))
    assert result["sbatch_to_start_s"] < 10 and result["exit_to_beam_completed_s"] < 10


async def test_cancel_while_running_is_scancel_and_frees_slots(
    tmp_path: Path, cluster: SlurmCluster
) -> None:
    rig = make_rig(tmp_path, cluster, run_seconds=120, max_jobs=4)
    drop_case(rig.scan, "CANC", beams=4)
    async with running_service(rig.settings()) as svc:

        async def running() -> bool:
            beams = await svc.store.list_beams("CANC")
            return (
                len(beams) == 4
                and all(b.status == BeamStatus.RUNNING for b in beams)
                and len(cluster.running_jobs()) == 4
            )

        await wait_until(running, timeout_s=90, what="4 beams running")
        runs = await all_runs(svc)
        ids = [r.job_id or "" for r in runs]
        message = await svc.engine.apply("cancel", "CANC")
        assert "4 running job(s) killed" in message
        states = cluster.cmd("squeue", "-h", "-t", "all", "-j", ",".join(ids), "-o", "%i %T")
        assert sorted(states.split()[1::2]) == ["CANCELLED"] * 4
        await wait_until(
            lambda: not any((rig.state_dir / "procs").glob("*.json")), timeout_s=30, what="no MOQUI"
        )
        assert svc.engine.scheduler._slots["cluster"] == set()
        beams = await svc.store.list_beams("CANC")
        assert all(b.status == BeamStatus.CANCELLED for b in beams)
        assert all(r.status == RunStatus.KILLED for r in await all_runs(svc))
    # the freed queue slots take the next case
    rig2 = make_rig(tmp_path / "again", cluster, run_seconds=1, max_jobs=4)
    drop_case(rig2.scan, "NEXT", beams=4)
    async with running_service(rig2.settings()) as svc:
        await wait_until(lambda: all_done(1)(svc), timeout_s=120, what="the next case")


@pytest.mark.timeout(300)
async def test_controller_restart_and_service_restart_reattach(
    tmp_path: Path, cluster: SlurmCluster
) -> None:
    rig = make_rig(tmp_path, cluster, run_seconds=8, max_jobs=16)
    for i in range(2):
        drop_case(rig.scan, f"RST{i}", beams=4)
    settings = rig.settings()
    async with running_service(settings) as svc:
        await wait_until(
            lambda: len(cluster.running_jobs()) == 4, timeout_s=90, what="4 jobs running"
        )
        running_before = cluster.running_jobs()
        # slurmctld restarted while the service polls: the jobs go on, nothing is resubmitted
        await asyncio.to_thread(cluster.restart_controller)
        states = cluster.cmd(
            "squeue", "-h", "-t", "all", "-o", "%T", "-j", ",".join(running_before * 2)
        )
        assert set(states.split()) <= {"RUNNING", "COMPLETING", "COMPLETED"}, states
        await asyncio.sleep(2)
        unfinished = [
            b
            for c in await svc.store.snapshot()
            for b in c.beams
            if b.status != BeamStatus.COMPLETED
        ]
        assert len(unfinished) >= 4  # the service stops with jobs still queued or running
    # the service is down; the controller restarts again meanwhile
    await asyncio.to_thread(cluster.restart_controller)
    async with running_service(settings) as svc:
        await wait_until(lambda: all_done(2)(svc), timeout_s=240, what="8 beams after restarts")
        beams = [b for c in await svc.store.snapshot() for b in c.beams]
        runs = await all_runs(svc)
    assert len(beams) == 8 and all(b.attempts == 1 for b in beams)
    assert len(runs) == 8 and all(r.status == RunStatus.SUCCEEDED for r in runs)
    # nothing was submitted twice: 8 jobs in Slurm's completion log, one per attempt directory
    assert sum(len(submitted_job_ids(cluster, job_name_part(rig, f"RST{i}"))) for i in (0, 1)) == 8
    for r in runs:
        assert (Path(r.job_dir) / "slurm.claim" / "job_id").read_text().strip() == r.job_id


async def test_failed_job_is_retried_and_completes(tmp_path: Path, cluster: SlurmCluster) -> None:
    once = tmp_path / "fail-once"
    rig = make_rig(tmp_path, cluster, run_seconds=0.5, moqui_env=(f"MQI_SIM_FAIL_ONCE_DIR={once}",))
    rig.fail_beams("abort")
    drop_case(rig.scan, "RETRY", beams=2)
    async with running_service(rig.settings()) as svc:
        await wait_until(lambda: all_done(1)(svc), timeout_s=120, what="completion after retry")
        beams = await svc.store.list_beams("RETRY")
        runs = {b.beam_id: await svc.store.list_runs(b.beam_id) for b in beams}
    for beam in beams:
        first, last = runs[beam.beam_id][0], runs[beam.beam_id][-1]
        assert beam.attempts == 2
        assert first.status == RunStatus.FAILED and first.exit_code == 134
        assert first.error is not None and first.error.startswith("moqui_exit_134")
        assert last.status == RunStatus.SUCCEEDED
        assert first.job_id != last.job_id


async def test_ssh_server_and_slurm_cluster_share_the_beams(
    tmp_path: Path, cluster: SlurmCluster
) -> None:
    login = cluster.login
    assert login is not None
    gpu_state = tmp_path / "ssh-gpu-state"
    env = sim_env(gpu_state, run_seconds=2, gpus=2)
    ssh_host = {
        "name": "gpu1",
        "kind": "ssh",
        "address": login.host,
        "port": login.port,
        "username": login.user,
        "client_keys": [str(login.key_path)],
        "known_hosts": str(login.known_hosts_path),
        "remote_root": str(cluster.shared / tmp_path.name / "gpu1"),
        "moqui_command": [*env, sys.executable, str(BIN / "tps_env")],
        "nvidia_smi_command": shlex.join([*env, sys.executable, str(BIN / "nvidia-smi")]),
    }
    rig = make_rig(tmp_path, cluster, run_seconds=2, max_jobs=4, extra_hosts=(ssh_host,))
    for i in range(2):
        drop_case(rig.scan, f"MIX{i}", beams=5)
    async with running_service(rig.settings()) as svc:
        await wait_until(lambda: all_done(2)(svc), timeout_s=240, what="10 beams on two hosts")
        beams = [b for c in await svc.store.snapshot() for b in c.beams]
    hosts = [b.host for b in beams]
    assert hosts.count("cluster") >= 2 and hosts.count("gpu1") >= 2, hosts
    for beam in beams:
        assert beam.status == BeamStatus.COMPLETED
        check_rt_dose(beam.outputs[0])
        # GPUs are leased on the ssh server only
        assert (len(beam.gpus) == 1) == (beam.host == "gpu1")
