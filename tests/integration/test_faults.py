"""Faults a clinic meets: bad host keys, broken tools, crashing MOQUI, full disks, operators."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mqi_async.domain.model import BeamStatus, RunStatus
from tests.e2e import BIN, make_rig, running_service, statuses, wait_all_running, wait_until
from tests.sshd import SshdServer

pytestmark = [pytest.mark.sshd, pytest.mark.slow]


async def _case_status(svc: object, case_id: str) -> str | None:
    return (await statuses(svc)).get(case_id)  # type: ignore[arg-type]


async def test_wrong_host_key_pauses_host_and_uploads_nothing(
    tmp_path: Path, sshd: SshdServer
) -> None:
    import asyncssh

    wrong = tmp_path / "known_hosts"
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()
    wrong.write_text(f"[{sshd.host}]:{sshd.port} {other}\n")
    rig = make_rig(tmp_path / "rig", sshd, overrides={})
    text = rig.config_path.read_text().replace(str(sshd.known_hosts_path), str(wrong))
    rig.config_path.write_text(text)
    rig.drop_case("KEY", beams=1)
    settings = rig.settings()
    remote_root = Path(settings.hosts[0].remote_root)  # type: ignore[union-attr]
    async with running_service(settings) as svc:

        async def paused() -> bool:
            hosts = await svc.store.list_hosts()
            return (
                bool(hosts)
                and hosts[0].state == "paused"
                and "host_key_mismatch" in (hosts[0].error or "")
            )

        await wait_until(paused, timeout_s=60, what="the host paused for its key")
        await wait_until(lambda: _case_status(svc, "KEY"), timeout_s=30, what="the case")
        await asyncio.sleep(2)
        beams = await svc.store.list_beams("KEY")
        assert all(
            b.status in (BeamStatus.PENDING, BeamStatus.UPLOADING, BeamStatus.QUEUED) for b in beams
        )
        assert all(b.attempts == 0 for b in beams)
    assert not remote_root.exists()
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mqi_async", "status", "-c", str(rig.config_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "host gpu1: paused (host_key_mismatch" in out.stdout


def _interpreter_wrapper(tmp_path: Path) -> Path:
    script = tmp_path / "interpreter.sh"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  *BADEXIT*) echo "Error: Invalid data or configuration." >&2; exit 1 ;;\n'
        "  *HANG*) sleep 600 ;;\n"
        "  *EMPTY*) exit 0 ;;\n"
        "esac\n"
        f'exec {sys.executable} {BIN / "mqi_interpreter"} --logdir "$1" --outputdir "$2"\n'
    )
    script.chmod(0o755)
    return script


async def test_interpreter_failures_are_named_and_isolated(
    tmp_path: Path, sshd: SshdServer
) -> None:
    wrapper = _interpreter_wrapper(tmp_path)
    rig = make_rig(
        tmp_path / "rig", sshd, run_seconds=0.2,
        overrides={
            "tools": {"interpreter": [str(wrapper), "{case_dir}", "{csv_dir}"], "interpreter_timeout_seconds": 3},
            "retry": {"max_attempts": 2, "backoff_initial_seconds": 0.1},
        },
    )  # fmt: skip
    for case_id in ("BADEXIT", "HANG", "EMPTY", "GOOD"):
        rig.drop_case(case_id, beams=1)
    async with running_service(rig.settings()) as svc:

        async def settled() -> bool:
            st = await statuses(svc)
            return len(st) == 4 and all(v in ("completed", "failed") for v in st.values())

        await wait_until(settled, timeout_s=120, what="all four cases to settle")
        snap = {c.case_id: c for c in await svc.store.snapshot()}
    assert snap["GOOD"].status == "completed"
    assert snap["BADEXIT"].error is not None and snap["BADEXIT"].error.startswith(
        "interpreter_failed"
    )
    assert "Invalid data" in snap["BADEXIT"].error
    assert snap["HANG"].error is not None and snap["HANG"].error.startswith("interpreter_timeout")
    assert snap["EMPTY"].error is not None and snap["EMPTY"].error.startswith(
        "interpreter_no_output"
    )
    # nothing of a failed case ever reached the GPU host
    assert all(b.attempts == 0 for c in ("BADEXIT", "HANG", "EMPTY") for b in snap[c].beams)


@pytest.mark.parametrize(
    ("mode", "code"),
    [("segv", "moqui_exit_139"), ("silent", "missing_output"), ("cuda", "moqui_exit_255")],
)
async def test_moqui_failures_are_named_and_retried(
    tmp_path: Path, sshd: SshdServer, mode: str, code: str
) -> None:
    rig = make_rig(
        tmp_path / "rig", sshd, gpus=1, run_seconds=0.1, overrides={"retry": {"max_attempts": 2}}
    )
    rig.fail_beams(mode)
    rig.drop_case("FAIL", beams=1)
    async with running_service(rig.settings()) as svc:
        await wait_until(lambda: _case_status(svc, "FAIL"), timeout_s=30, what="the case")

        async def failed() -> bool:
            return await _case_status(svc, "FAIL") == "failed"

        await wait_until(failed, timeout_s=90, what="the case to fail")
        runs = await svc.store.list_runs("FAIL_beam_1")
        beam = await svc.store.get_beam("FAIL_beam_1")
        assert await svc.store.list_leases() == []
    assert [r.status for r in runs] == [RunStatus.FAILED, RunStatus.FAILED]
    assert all(r.error and r.error.startswith(code) for r in runs)
    assert beam is not None and beam.attempts == 2 and beam.error and beam.error.startswith(code)


async def test_cancel_kills_jobs_and_retry_completes(tmp_path: Path, sshd: SshdServer) -> None:
    rig = make_rig(tmp_path / "rig", sshd, gpus=2, run_seconds=0.3)
    rig.fail_beams("hang")
    rig.drop_case("CANCEL", beams=2)
    async with running_service(rig.settings()) as svc:
        await wait_all_running(svc, "CANCEL", 2)
        res = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "mqi_async", "cancel", "CANCEL", "-c", str(rig.config_path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr

        async def cancelled() -> bool:
            return await _case_status(svc, "CANCEL") == "cancelled"

        await wait_until(cancelled, timeout_s=30, what="the case cancelled")
        assert await svc.store.list_leases() == []
        # the simulators are gone from the (simulated) GPUs: their process groups were killed
        await wait_until(
            lambda: not any((rig.state_dir / "procs").glob("*.json")),
            timeout_s=20,
            what="jobs killed",
        )
        runs = [
            r
            for b in await svc.store.list_beams("CANCEL")
            for r in await svc.store.list_runs(b.beam_id)
        ]
        assert {r.status for r in runs} == {RunStatus.KILLED}

        rig.fail_beams(None)
        res = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "mqi_async", "retry", "CANCEL", "-c", str(rig.config_path)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr

        async def completed() -> bool:
            return await _case_status(svc, "CANCEL") == "completed"

        await wait_until(completed, timeout_s=120, what="the retried case to complete")
        beams = await svc.store.list_beams("CANCEL")
    assert [b.attempts for b in beams] == [2, 2]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_full_disk_while_downloading_publishes_no_partial_file(
    tmp_path: Path, sshd: SshdServer
) -> None:
    rig = make_rig(
        tmp_path / "rig", sshd, gpus=1, run_seconds=0.1,
        overrides={
            "moqui": {"PhantomDimX": 100, "PhantomDimY": 100, "PhantomDimZ": 40},
            "retry": {"max_attempts": 2, "backoff_initial_seconds": 0.1},
        },
    )  # fmt: skip
    work = rig.root / "work"
    work.mkdir()
    # 3 MiB: room for the inputs, not for the 3.2 MB raw dose
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(work)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {mounted.stderr.decode().strip()}")
    try:
        rig.drop_case("FULL", beams=1)
        async with running_service(rig.settings()) as svc:

            async def failed() -> bool:
                return await _case_status(svc, "FULL") == "failed"

            await wait_until(failed, timeout_s=120, what="the case to fail on the full disk")
            beam = await svc.store.get_beam("FULL_beam_1")
        assert beam is not None and beam.error is not None and beam.error.startswith("disk_full")
        assert beam.outputs == ()
        case_dir = work / "FULL"
        assert not list((case_dir / "dose").glob("*")) if (case_dir / "dose").exists() else True
        assert not list((case_dir / "runs").rglob("*.raw"))
        assert not list(work.rglob("*.part"))
    finally:
        subprocess.run(["umount", "-l", str(work)], check=False)


async def test_secrets_never_appear_and_files_are_private(tmp_path: Path, sshd: SshdServer) -> None:
    rig = make_rig(tmp_path / "rig", sshd, run_seconds=0.1)
    config = yaml.safe_load(rig.config_path.read_text())
    config["hosts"][0].update(password="pw-hunter2-XYZ", passphrase="pp-swordfish-XYZ")
    rig.config_path.write_text(yaml.safe_dump(config))
    rig.drop_case("SECRET", beams=1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mqi_async", "run", "--no-ui", "-c", str(rig.config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=rig.root,
    )  # fmt: skip
    try:

        async def done() -> bool:
            res = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "mqi_async", "status", "--json", "-c", str(rig.config_path)],
                capture_output=True, text=True,
            )  # fmt: skip
            return '"completed"' in res.stdout

        await wait_until(done, timeout_s=120, interval_s=1, what="the case to complete")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    check = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mqi_async", "check-config", "-c", str(rig.config_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    status = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mqi_async", "status", "--json", "-c", str(rig.config_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    logs = "".join(p.read_text(errors="replace") for p in (rig.root / "logs").glob("*"))
    for secret in ("pw-hunter2-XYZ", "pp-swordfish-XYZ"):
        for where in (
            out.decode(errors="replace"),
            check.stdout + check.stderr,
            status.stdout,
            logs,
        ):
            assert secret not in where
    assert "********" in check.stdout
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(rig.db) == 0o600
    assert mode(rig.root / "logs") == 0o700
    assert mode(rig.root / "logs" / "mqi-async.log") == 0o600
    assert mode(rig.root / "work") == 0o700
    for path in (rig.root / "work").rglob("*"):
        assert mode(path) & 0o077 == 0, path


def test_interpreter_wrapper_is_executable(tmp_path: Path) -> None:
    # guards the test above against a broken fixture rather than a broken service
    wrapper = _interpreter_wrapper(tmp_path)
    assert os.access(wrapper, os.X_OK) and shutil.which(str(wrapper))
