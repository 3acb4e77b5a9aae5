"""LocalHost: the same Host protocol on this machine (subprocesses and verified copies)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mqi_async.config import LocalHostSettings
from mqi_async.domain.errors import TransientError
from mqi_async.domain.gpus import busy_uuids
from mqi_async.domain.jobs import JobHandle, JobSpec, JobState, JobStatus
from mqi_async.hpc.local import LocalHost
from mqi_async.hpc.transfer import PART_SUFFIX

DEMO_SMI = Path(__file__).resolve().parents[2] / "mqi_async" / "demo" / "bin" / "nvidia-smi"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if fields[0] != "Z" and fields[2] == str(pgid):
                return True
    return False


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[LocalHost]:
    h = LocalHost(name="here", remote_root=tmp_path / "runs", kill_grace_s=1.0)
    await h.start()
    assert h.is_available() and h.kind == "local"
    yield h
    await h.aclose()


async def wait_for(host: LocalHost, handle: JobHandle, state: JobState) -> JobStatus:
    deadline = time.monotonic() + 15
    while True:
        status = (await host.poll_jobs([handle]))[handle.job_dir]
        if status.state is state or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.1)


def test_from_settings(tmp_path: Path) -> None:
    settings = LocalHostSettings(
        kind="local", name="here", remote_root=tmp_path, nvidia_smi_command="smi --x 'a b'"
    )
    host = LocalHost.from_settings(settings)
    assert (host.name, host.remote_root, host.moqui_command) == (
        "here",
        str(tmp_path),
        ("tps_env",),
    )


async def test_run_collects_output_and_status(host: LocalHost) -> None:
    result = await host.run(["sh", "-c", "echo out; echo err >&2; exit 4"], timeout_s=10)
    assert (result.exit_status, result.stdout, result.stderr) == (4, "out\n", "err\n")
    missing = await host.run(["/nonexistent/tool"], timeout_s=10)
    assert missing.exit_status == 127


async def test_run_timeout_kills_the_whole_group(host: LocalHost, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    with pytest.raises(TransientError) as err:
        await host.run(["sh", "-c", f"sleep 30 & echo $$ > '{pid_file}'; sleep 30"], timeout_s=3)
    assert err.value.code == "remote_timeout"
    assert not _group_alive(int(pid_file.read_text()))


async def test_tree_round_trip_skip_and_progress(host: LocalHost, tmp_path: Path) -> None:
    src = tmp_path / "case $(touch CANARY)"
    (src / "sub dir").mkdir(parents=True)
    names = ["a b.csv", "q'uote.in", "sub dir/$(x).raw"]
    for i, name in enumerate(names):
        (src / name).write_bytes(os.urandom(100_000 * (i + 1)))
    target = f"{host.remote_root}/case 'one'"
    seen: list[int] = []
    report = await host.put_tree(src, target, progress=lambda done, total: seen.append(done))
    assert (report.files_sent, report.files_skipped) == (3, 0)
    assert seen[-1] == 600_000
    for name in names:
        assert report.sha256[name] == _sha(src / name) == _sha(Path(target) / name)
    assert (await host.put_tree(src, target)).files_skipped == 3
    back = tmp_path / "back"
    got = await host.get_files(target, names, back)
    assert got.files_sent == 3 and all(_sha(back / n) == report.sha256[n] for n in names)
    assert (await host.get_files(target, names, back)).files_skipped == 3
    assert await host.list_dir(target) == {"a b.csv": 100_000, "q'uote.in": 200_000}
    assert await host.list_dir(f"{target}/missing") == {}
    assert not list(Path(target).rglob("*" + PART_SUFFIX))
    assert not (Path.cwd() / "CANARY").exists()


@pytest.fixture
def tiny_disk() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="mqi-tiny-"))
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], capture_output=True
        ).returncode
    ):
        path.rmdir()
        pytest.skip("needs root to mount a small tmpfs")
    yield path
    subprocess.run(["umount", str(path)], check=False)
    path.rmdir()


async def test_disk_full_is_named_and_leaves_no_part(
    host: LocalHost, tmp_path: Path, tiny_disk: Path
) -> None:
    src = tmp_path / "case"
    src.mkdir()
    (src / "dose.raw").write_bytes(os.urandom(3 * 2**20))
    with pytest.raises(TransientError) as err:
        await host.put_tree(src, str(tiny_disk / "case"))
    assert err.value.code == "disk_full"
    assert list((tiny_disk / "case").iterdir()) == []


async def test_job_lifecycle(host: LocalHost) -> None:
    root = host.remote_root
    done = await host.spawn_job(
        JobSpec(
            job_dir=f"{root}/c/b/1",
            argv=("sh", "-c", 'echo "gpu=$CUDA_VISIBLE_DEVICES"; exit 3'),
            env=(("CUDA_VISIBLE_DEVICES", "0"),),
        )
    )
    status = await wait_for(host, done, JobState.EXITED)
    assert (status.exit_code, status.log_tail) == (3, "gpu=0\n")
    assert await host.attach_job(f"{root}/c/b/1") == done
    assert await host.attach_job(f"{root}/never") is None

    running = await host.spawn_job(
        JobSpec(job_dir=f"{root}/c/b/2", argv=("sh", "-c", "sleep 300 & sleep 300; wait"))
    )
    assert (await host.poll_jobs([running]))[running.job_dir].state is JobState.RUNNING
    await host.kill_job(running)
    assert not _group_alive(int(running.job_id))
    assert (await wait_for(host, running, JobState.EXITED)).signal == "TERM"

    lost = await host.spawn_job(JobSpec(job_dir=f"{root}/c/b/3", argv=("sleep", "300")))
    os.killpg(int(lost.job_id), signal.SIGKILL)
    assert (await wait_for(host, lost, JobState.LOST)).state is JobState.LOST


async def test_sample_gpus_with_the_bundled_simulator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not DEMO_SMI.exists():
        pytest.skip("the nvidia-smi simulator is not there yet")
    monkeypatch.setenv("MQI_SIM_GPUS", "3")
    monkeypatch.setenv("MQI_SIM_STATE_DIR", str(tmp_path / "state"))
    (tmp_path / "state" / "foreign").mkdir(parents=True)
    (tmp_path / "state" / "foreign" / "x.json").write_text(
        '{"gpu_index": 2, "pid": 4242, "used_memory_mb": 1000, "process_name": "python"}'
    )
    host = LocalHost(
        name="here",
        remote_root=tmp_path / "runs",
        nvidia_smi_argv=(sys.executable, str(DEMO_SMI)),
        gpu_indices=(1, 2),
    )
    await host.start()
    sample = await host.sample_gpus()
    assert [g.index for g in sample.gpus] == [1, 2]
    assert sample.gpus[0].name == "H200" and not sample.skipped_rows
    assert busy_uuids(sample.apps) == {sample.gpus[1].uuid}
