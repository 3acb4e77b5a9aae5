"""SlurmHost against a real Slurm 22.05 cluster (4 fake GPUs) and an OpenSSH login node."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import pytest

from mqi_async.domain.errors import HostUnavailableError
from mqi_async.domain.jobs import JobHandle, JobSpec, JobState, JobStatus
from mqi_async.hpc.slurm import SlurmHost
from mqi_async.hpc.ssh import ConnectLimiter, SshPool
from mqi_async.hpc.ssh_host import SshHost
from tests.e2e import wait_until
from tests.slurm_cluster import SlurmCluster, fresh, module_cluster

pytestmark = [pytest.mark.sshd, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster_once() -> Iterator[SlurmCluster]:
    with module_cluster() as cluster:
        yield cluster


@pytest.fixture
def cluster(cluster_once: SlurmCluster) -> Iterator[SlurmCluster]:
    yield fresh(cluster_once)
    fresh(cluster_once)


def make_host(cluster: SlurmCluster, root: Path, **kw: object) -> SlurmHost:
    assert cluster.login is not None
    pool = SshPool(cluster.login.endpoint("cluster"), limiter=ConnectLimiter(min_interval_s=0))
    ssh = SshHost(pool, remote_root=str(root), kind="slurm")
    options: dict[str, object] = {"settle_s": 3.0, "partition": "gpu", **kw}
    return SlurmHost(ssh, **options)  # type: ignore[arg-type]


@pytest.fixture
async def host(cluster: SlurmCluster) -> AsyncIterator[SlurmHost]:
    root = cluster.shared / f"runs-{time.monotonic_ns()}"
    h = make_host(cluster, root)
    await h.start()
    try:
        yield h
    finally:
        await h.aclose()


def spec(host: SlurmHost, name: str, script: str, **kw: object) -> JobSpec:
    return JobSpec(
        job_dir=f"{host.remote_root}/{name}/1",
        argv=("sh", "-c", script),
        name=f"mqi-{name}-b1",
        files=(("moqui_tps.in", "GPUID 0\n"),),
        **kw,  # type: ignore[arg-type]
    )


async def wait_final(
    host: SlurmHost, handles: Sequence[JobHandle], *, timeout_s: float = 60, interval_s: float = 0.3
) -> dict[str, JobStatus]:
    done: dict[str, JobStatus] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(handles):
        assert time.monotonic() < deadline, (
            f"jobs not final: {sorted({h.job_dir for h in handles} - set(done))}"
        )
        statuses = await host.poll_jobs([h for h in handles if h.job_dir not in done])
        done.update(
            {d: s for d, s in statuses.items() if s.state in (JobState.EXITED, JobState.LOST)}
        )
        await asyncio.sleep(interval_s)
    return done


async def test_jobs_run_with_their_own_gpu_and_report_exit_codes(
    cluster: SlurmCluster, host: SlurmHost
) -> None:
    assert host.kind == "slurm" and not host.leases_gpus and host.is_available()
    specs = [
        spec(host, f"case {i};$(x)", f'echo "gpu=$CUDA_VISIBLE_DEVICES"; sleep 2; exit {i}')
        for i in range(4)
    ]
    handles = [await host.spawn_job(s) for s in specs]
    assert all(h.job_id.isdigit() for h in handles)
    # the same attempt directory is never submitted twice
    assert await host.spawn_job(specs[0]) == handles[0]
    names = cluster.cmd("squeue", "-h", "-t", "all", "-o", "%j").split()
    assert "mqi-case_0___x_-b1" in names
    done = await wait_final(host, handles)
    gpus = set()
    for i, (s, h) in enumerate(zip(specs, handles, strict=True)):
        st = done[h.job_dir]
        assert st.state == JobState.EXITED and st.exit_code == i
        assert st.detail == ("COMPLETED" if i == 0 else "FAILED")
        gpus.add(st.log_tail.strip())
        assert (Path(s.job_dir) / "moqui_tps.in").read_text() == "GPUID 0\n"
    # four concurrent jobs, four different GPUs
    assert gpus == {"gpu=0", "gpu=1", "gpu=2", "gpu=3"}
    assert sum(line.startswith("JobId=") for line in cluster.jobcomp.read_text().splitlines()) >= 4


async def test_queue_shows_pending_reason_and_gpu_use(
    cluster: SlurmCluster, host: SlurmHost
) -> None:
    handles = [await host.spawn_job(spec(host, f"q{i}", "sleep 30")) for i in range(6)]
    await wait_until(lambda: len(cluster.running_jobs()) == 4, timeout_s=30, what="4 running")
    queue = await host.queue_summary()
    assert len(queue.running) == 4 and len(queue.pending) == 2
    assert {j.reason for j in queue.pending} <= {"Resources", "Priority"}
    assert (queue.gpus_total, queue.gpus_used) == (4, 4)
    statuses = await host.poll_jobs(handles)
    states = sorted(s.state for s in statuses.values())
    assert states.count(JobState.RUNNING) == 4 and states.count(JobState.QUEUED) == 2
    sample = await host.sample_gpus()
    assert sample.host == host.name and sample.gpus == ()


async def test_cancel_of_a_running_job_is_scancel(cluster: SlurmCluster, host: SlurmHost) -> None:
    h = await host.spawn_job(spec(host, "cancel", "echo started; sleep 120"))
    await wait_until(lambda: h.job_id in cluster.running_jobs(), timeout_s=30, what="running")
    await host.kill_job(h)
    state = cluster.cmd("squeue", "-h", "-t", "all", "-j", f"{h.job_id},{h.job_id}", "-o", "%T")
    assert state.strip() == "CANCELLED"
    st = (await wait_final(host, [h]))[h.job_dir]
    assert st.detail == "CANCELLED"
    assert st.state == JobState.EXITED and st.exit_code == 143 and st.signal == "TERM"
    # a stale handle (its job long gone) is cancelled quietly
    await host.kill_job(h)


async def test_cancel_of_a_pending_job(cluster: SlurmCluster, host: SlurmHost) -> None:
    hs = [await host.spawn_job(spec(host, f"p{i}", "sleep 60")) for i in range(5)]
    await wait_until(lambda: len(cluster.running_jobs()) == 4, timeout_s=30, what="4 running")
    pending = next(h for h in hs if h.job_id not in cluster.running_jobs())
    await host.kill_job(pending)
    st = (await wait_final(host, [pending]))[pending.job_dir]
    # never started: no exit file; sacct -c supplies the state
    assert st.detail == "CANCELLED" and st.state in (JobState.EXITED, JobState.LOST)
    assert not (Path(pending.job_dir) / "exit_code").exists()


@pytest.mark.timeout(240)
async def test_time_limit_is_named_timeout(cluster: SlurmCluster) -> None:
    root = cluster.shared / "timeout"
    host = make_host(cluster, root, time_limit="1")
    await host.start()
    try:
        h = await host.spawn_job(spec(host, "slow", "echo started; sleep 600"))
        st = (await wait_final(host, [h], timeout_s=180, interval_s=1))[h.job_dir]
    finally:
        await host.aclose()
    assert st.detail == "TIMEOUT"
    assert st.state == JobState.EXITED and st.exit_code == 143
    assert "DUE TO TIME LIMIT" in (Path(h.job_dir) / "slurm.out").read_text()


async def test_failure_exit_code_and_named_state(cluster: SlurmCluster, host: SlurmHost) -> None:
    h = await host.spawn_job(spec(host, "fail", "echo 'CUDA error: out of memory' >&2; exit 7"))
    st = (await wait_final(host, [h]))[h.job_dir]
    assert (st.state, st.exit_code, st.detail) == (JobState.EXITED, 7, "FAILED")
    assert "CUDA error" in st.log_tail


async def test_controller_down_pauses_the_host_and_jobs_go_on(
    cluster: SlurmCluster, host: SlurmHost
) -> None:
    h = await host.spawn_job(spec(host, "outage", "sleep 6; exit 4"))
    await wait_until(lambda: h.job_id in cluster.running_jobs(), timeout_s=30, what="running")
    cluster.stop_controller()
    try:
        started = time.monotonic()
        with pytest.raises(HostUnavailableError) as err:
            await host.spawn_job(spec(host, "during", "true"))
        assert time.monotonic() - started < 40
        assert "controller" in str(err.value)
        assert not host.is_available()
        # the exit file is read from the shared filesystem while the controller is away
        st = (await wait_final(host, [h], timeout_s=60, interval_s=1))[h.job_dir]
        assert st.exit_code == 4
        assert not (Path(host.remote_root) / "during" / "1" / "job_id").exists()
    finally:
        cluster.start_controller()
    await wait_until(host.is_available, timeout_s=60, what="the probe to see the controller")
    h2 = await host.spawn_job(spec(host, "after", "exit 0"))
    assert (await wait_final(host, [h2]))[h2.job_dir].exit_code == 0


async def test_polls_raise_after_the_grace_time(cluster: SlurmCluster) -> None:
    host = make_host(cluster, cluster.shared / "grace", controller_grace_s=0.0, command_timeout_s=5)
    await host.start()
    try:
        h = await host.spawn_job(spec(host, "g", "sleep 30"))
        cluster.stop_controller()
        with pytest.raises(HostUnavailableError):
            await host.poll_jobs([h])
    finally:
        cluster.start_controller()
        await host.aclose()


async def test_duplicate_submission_runs_moqui_once(cluster: SlurmCluster, host: SlurmHost) -> None:
    # a resubmit after a lost sbatch reply: the second job finds the directory claimed
    marker = Path(host.remote_root) / "ran"
    s = spec(host, "dup", f"echo x >> '{marker}'; sleep 1")
    h = await host.spawn_job(s)
    dup = cluster.cmd("sbatch", "--parsable", f"--chdir={s.job_dir}",
                      f"--output={s.job_dir}/dup.out", f"{s.job_dir}/job.sbatch").strip()  # fmt: skip
    st = (await wait_final(host, [h]))[h.job_dir]
    await wait_until(lambda: dup not in cluster.active_jobs(), timeout_s=30, what="the duplicate")
    assert st.exit_code == 0
    assert marker.read_text() == "x\n"
    # whichever job started second found the directory claimed and did nothing
    outputs = [(Path(s.job_dir) / n).read_text() for n in ("slurm.out", "dup.out")]
    assert sum("does nothing" in text for text in outputs) == 1
    claimed = (Path(s.job_dir) / "slurm.claim" / "job_id").read_text().strip()
    assert claimed in (h.job_id, dup)


async def test_reattach_by_directory(cluster: SlurmCluster, host: SlurmHost) -> None:
    h = await host.spawn_job(spec(host, "attach", "sleep 1"))
    assert await host.attach_job(h.job_dir) == h
    assert await host.attach_job(f"{host.remote_root}/nothing/1") is None
    # a handle whose id was lost (crash between sbatch and the database) still polls
    st = (await wait_final(host, [JobHandle(job_dir=h.job_dir, job_id="unknown")]))[h.job_dir]
    assert st.exit_code == 0 and st.detail == "COMPLETED"


async def test_latency_sbatch_to_start_and_exit_to_noticed(
    cluster: SlurmCluster, host: SlurmHost, record_property: Callable[[str, object], None]
) -> None:
    """Median of 10 sequential jobs: sbatch call -> first line of the batch script (the claim
    file's mtime), and the exit file's mtime -> the poll that reports it (0.5 s polling)."""
    start_lat: list[float] = []
    notice_lat: list[float] = []
    for i in range(10):
        s = spec(host, f"lat{i}", "sleep 0.5")
        t0 = time.time()
        h = await host.spawn_job(s)
        while True:
            statuses = await host.poll_jobs([h])
            now = time.time()
            if statuses.get(h.job_dir) and statuses[h.job_dir].state == JobState.EXITED:
                break
            await asyncio.sleep(0.5)
        started = (Path(s.job_dir) / "slurm.claim" / "job_id").stat().st_mtime
        exited = (Path(s.job_dir) / "exit_code").stat().st_mtime
        start_lat.append(started - t0)
        notice_lat.append(now - exited)
    med_start, med_notice = statistics.median(start_lat), statistics.median(notice_lat)
    line = (
        f"slurm latency (median of 10): sbatch->start {med_start:.2f} s "
        f"[{min(start_lat):.2f}..{max(start_lat):.2f}], exit->noticed {med_notice:.2f} s "
        f"[{min(notice_lat):.2f}..{max(notice_lat):.2f}] (poll every 0.5 s)"
    )
    print(line)
    record_property("sbatch_to_start_median_s", round(med_start, 3))
    record_property("exit_to_noticed_median_s", round(med_notice, 3))
    assert med_start < 10 and med_notice < 5


def test_fixture_cleans_up_after_itself(cluster: SlurmCluster) -> None:
    out = subprocess.run(
        ["sinfo", "-h", "-o", "%t %G"],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.split() == ["idle", "gpu:4"]
