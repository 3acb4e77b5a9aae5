"""Patient data on a host: private modes under a login umask of 022, no patient ID in shared places."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
import yaml

from mqi_async.domain.privacy import case_key, is_case_key
from mqi_async.domain.retention import RetentionPolicy
from mqi_async.engine.retention import RetentionSettings, RetentionSweeper
from mqi_async.service import open_service
from mqi_async.store import Store
from mqi_async.store.secret import secret_path
from tests.e2e import (
    Rig,
    make_rig,
    running_service,
    spawn_service,
    status_json,
    statuses,
    wait_status,
    wait_until,
)
from tests.sshd import SshdServer, start_sshd

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

PATIENT = "PRIV4711"


@pytest.fixture(scope="module")
def sshd_022() -> Iterator[SshdServer]:
    """A real OpenSSH sshd whose sessions run under umask 022, as most servers' logins do."""
    server = start_sshd(login_umask=0o022)
    try:
        if not server.is_openssh:
            pytest.skip("needs a real OpenSSH sshd: the stand-in runs under the test's umask")
        yield server
    finally:
        server.close()


def _remote_root(sshd: SshdServer, rig_root: Path) -> Path:
    return sshd.work_dir / "runs" / f"{rig_root.parent.name}-{rig_root.name}"


def _not_private(root: Path) -> list[str]:
    """What `find root -perm /077` lists."""
    out = subprocess.run(
        ["find", str(root), "-perm", "/077"], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


async def _watch_ps(seen: list[str], remote_root: Path, stop: asyncio.Event) -> None:
    """Every command line of the host's side (scripts under sshd, MOQUI) while the run goes."""
    while not stop.is_set():
        out = await asyncio.to_thread(
            subprocess.run, ["ps", "-ww", "-eo", "args"], capture_output=True, text=True
        )
        seen.extend(
            line
            for line in out.stdout.splitlines()
            if str(remote_root) in line or "umask 077" in line
        )
        await asyncio.sleep(0.05)


async def test_full_run_leaves_nothing_readable_and_no_patient_id_in_shared_places(
    tmp_path: Path, sshd_022: SshdServer
) -> None:
    rig_root = tmp_path / "rig"
    rig = make_rig(rig_root, sshd_022, gpus=2, run_seconds=1.5)
    remote_root = _remote_root(sshd_022, rig_root)
    assert not remote_root.exists()
    written = rig.drop_case(PATIENT, beams=2)
    assert PATIENT in str(written.case_dir)
    seen: list[str] = []
    stop = asyncio.Event()
    async with running_service(rig.settings()) as svc:
        watcher = asyncio.create_task(_watch_ps(seen, remote_root, stop))
        try:
            await wait_until(lambda: _completed(svc), timeout_s=120, what="the case to complete")
        finally:
            stop.set()
            await watcher
    key = case_key(secret_path(rig.db).read_bytes(), PATIENT)
    # what another user of the host sees: modes, names, command lines
    assert _not_private(remote_root) == []
    assert stat.S_IMODE(remote_root.stat().st_mode) == 0o700
    names = [p.name for p in remote_root.rglob("*")]
    assert names and not [n for n in names if PATIENT in n]
    assert [p.name for p in remote_root.iterdir() if p.name != ".mqi-claims"] == [
        key
    ] and is_case_key(key)
    moqui_lines = [line for line in seen if "tps_env" in line and key in line]
    assert moqui_lines, "MOQUI's command line was never seen; the ps check proves nothing"
    assert [line for line in seen if f"mqi-{key}-b" in line]
    assert [line for line in seen if PATIENT in line] == []
    # the mapping stays local: the secret is private to the service
    assert stat.S_IMODE(os.stat(secret_path(rig.db)).st_mode) == 0o600


async def _completed(svc: object) -> bool:
    return await statuses(svc) == {PATIENT: "completed"}  # type: ignore[arg-type]


HOSTILE_NAMES = {
    "HOST0001": "../../../../escape_dotdot",
    "HOST0002": "sub/escape_slash",
    "HOST0003": "bell\x07name",
    "HOST0004": "x" * 300,
    "HOST0005": "Strahl-\u00e4",
}


def _set_beam_name(plan: Path, name: str) -> None:
    ds = pydicom.dcmread(plan)
    if not name.isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"
    with warnings.catch_warnings():
        # a hostile TPS does not care that LO allows 64 characters; pydicom warns
        warnings.simplefilter("ignore", UserWarning)
        next(b for b in ds.IonBeamSequence if b.BeamName != "SETUP").BeamName = name
        ds.save_as(plan, enforce_file_format=True)


# as in production, pydicom's complaint about a value longer than its VR allows stays a warning
@pytest.mark.filterwarnings("ignore:The value length:UserWarning")
async def test_hostile_beam_names_fail_at_ingest_and_nothing_runs(
    tmp_path: Path, sshd_022: SshdServer
) -> None:
    rig_root = tmp_path / "rig"
    rig = make_rig(rig_root, sshd_022)
    remote_root = _remote_root(sshd_022, rig_root)
    for case_id, name in HOSTILE_NAMES.items():
        plan = rig.drop_case(case_id, beams=1).rtplan_path
        assert plan is not None
        _set_beam_name(plan, name)
    rig.drop_case("GOOD0001", beams=1)
    async with running_service(rig.settings()) as svc:
        done = set(HOSTILE_NAMES) | {"GOOD0001"}
        await wait_until(lambda: _all_terminal(svc, done), timeout_s=90, what="every case to end")
        cases = {c.case_id: c for c in await svc.store.snapshot()}
    assert cases["GOOD0001"].status == "completed"
    for case_id in HOSTILE_NAMES:
        case = cases[case_id]
        assert case.status == "failed" and not case.beams
        error = case.error or ""
        assert error.startswith("invalid_beam_name: "), error
        assert error.isascii() and all(ch.isprintable() for ch in error)
        assert len(error) < 400
    # nothing of theirs reached the host, nothing was written beside the roots
    assert [p.name for p in remote_root.iterdir() if p.name != ".mqi-claims"] == [
        case_key(secret_path(rig.db).read_bytes(), "GOOD0001")
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rig"]
    assert not list(tmp_path.rglob("escape_*"))
    assert not list(sshd_022.work_dir.rglob("escape_*"))


async def _all_terminal(svc: object, ids: set[str]) -> bool:
    got = await statuses(svc)  # type: ignore[arg-type]
    return set(got) == ids and all(s in ("completed", "failed") for s in got.values())


def _tree(root: Path) -> list[str]:
    """Every path under root, relative, sorted (the before/after listings retention is judged by)."""
    # the case claims (.mqi-claims, hashed names) stay: they say which service owns a case
    if not root.exists():
        return []
    paths = (p.relative_to(root) for p in root.rglob("*"))
    return sorted(str(p) for p in paths if p.parts[0] != ".mqi-claims")


class _Later:
    """A clock `days` ahead of the wall clock."""

    def __init__(self, days: float) -> None:
        self._ahead = timedelta(days=days)

    def now(self) -> datetime:
        return datetime.now(UTC) + self._ahead

    def monotonic(self) -> float:
        return time.monotonic()


async def test_retention_removes_what_it_should_and_nothing_else(
    tmp_path: Path, sshd_022: SshdServer
) -> None:
    rig_root = tmp_path / "rig"
    rig = make_rig(
        rig_root,
        sshd_022,
        overrides={"retention": {"sweep_seconds": 0.3, "remote_failed_days": 1, "work_days": 1}},
    )
    remote_root = _remote_root(sshd_022, rig_root)
    work = rig_root / "work"
    rig.drop_case("RETOK001", beams=2)
    async with running_service(rig.settings()) as svc:
        secret = secret_path(rig.db).read_bytes()
        ok_key, fail_key = case_key(secret, "RETOK001"), case_key(secret, "RETFAIL1")
        await wait_until(
            lambda: _all_terminal(svc, {"RETOK001"}), timeout_s=90, what="RETOK001 to end"
        )
        # downloaded and converted: its folder (inputs with the RTPLAN, attempts) goes
        await wait_until(
            lambda: not (remote_root / ok_key).exists(), timeout_s=30, what="the sweep"
        )
        rig.fail_beams("abort")
        rig.drop_case("RETFAIL1", beams=1)
        await wait_until(
            lambda: _all_terminal(svc, {"RETOK001", "RETFAIL1"}), timeout_s=90, what="RETFAIL1"
        )
        await asyncio.sleep(1.5)  # several sweeps: a fresh failure is kept for diagnosis
        remote_kept = _tree(remote_root)
        work_kept = _tree(work)
        scan_before = _tree(rig.scan)
        events = [e for e in await svc.store.recent_events(1000) if e.kind == "retention_removed"]
    print("remote after the run:", remote_kept)
    assert (await _case_status(rig, "RETFAIL1")) == "failed"
    assert remote_kept[0] == fail_key and f"{fail_key}/inputs" in remote_kept
    attempts = [p for p in remote_kept if p.count("/") == 2 and "/beam_1/" in p]
    assert len(attempts) == 3, remote_kept
    assert not [p for p in remote_kept if p.startswith(ok_key)]
    # the finished case's folder is removed (its completed attempt may go first, on its own
    # sweep); nothing of the failed case is, and every removal is an event
    removed = [e.data for e in events]
    assert {"host": "gpu1", "path": str(remote_root / ok_key)} in removed, removed
    assert all(
        d is not None and str(d["path"]).startswith(str(remote_root / ok_key)) for d in removed
    ), removed
    # all the work folders are there (work_days not reached)
    assert {p for p in work_kept if "/" not in p} >= {"RETOK001", "RETFAIL1"}

    # two days on: the failure's folder and both work folders go; nothing else does
    async with open_service(rig.settings()) as svc:
        for host in svc.hosts.values():
            await host.start()
        sweeper = RetentionSweeper(
            store=svc.store,
            hosts=svc.hosts,
            clock=_Later(days=2),
            settings=RetentionSettings(
                policy=RetentionPolicy(remote_failed_days=1, work_days=1),
                sweep_s=3600,
                work_directory=work,
                scan_directory=rig.scan,
            ),
            case_key=lambda case: case_key(secret, case.case_id),
        )
        assert await sweeper.sweep() == 3
        assert await sweeper.sweep() == 0
        first_run = {str((e.data or {}).get("path")) for e in events}
        events = [
            e
            for e in await svc.store.recent_events(1000)
            if e.kind == "retention_removed" and str((e.data or {}).get("path")) not in first_run
        ]
    print("remote after two days:", _tree(remote_root), "work:", _tree(work))
    assert _tree(remote_root) == []
    assert remote_root.is_dir()
    assert [p for p in _tree(work) if "/" not in p and p.startswith("RET")] == []
    # the scan directory is never touched
    assert _tree(rig.scan) == scan_before and len(scan_before) > 10
    assert sorted(str((e.data or {}).get("path")) for e in events) == sorted(
        [
            str(remote_root / fail_key),
            str(work / "RETOK001"),
            str(work / "RETFAIL1"),
        ]
    )


async def _case_status(rig: Rig, case_id: str) -> str:
    async with await Store.open_readonly(rig.db) as store:
        case = await store.get_case(case_id)
    return str(case.status) if case else "-"


def test_redacted_logs_carry_case_keys_and_no_patient_id(
    tmp_path: Path, sshd_022: SshdServer
) -> None:
    rig = make_rig(tmp_path / "rig", sshd_022, overrides={"logging": {"redact_patient_ids": True}})
    rig.drop_case(PATIENT, beams=2)
    proc = spawn_service(rig)
    try:
        wait_status(rig, lambda s: [c["status"] for c in s["cases"]] == ["completed"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0
    key = case_key(secret_path(rig.db).read_bytes(), PATIENT)
    file_log = (rig.root / "logs" / "mqi-async.log").read_text()
    stdout_log = (rig.root / "service.out").read_text()
    for text in (file_log, stdout_log):
        assert len(text.splitlines()) > 20
        assert PATIENT not in text
        assert key in text
    # the local status (the hospital's own view) still names the patient
    assert status_json(rig)["cases"][0]["case_id"] == PATIENT


async def test_with_two_hosts_a_case_goes_only_to_the_host_that_runs_it(
    tmp_path: Path, sshd_022: SshdServer
) -> None:
    rig_root = tmp_path / "rig"
    rig = make_rig(rig_root, sshd_022, gpus=1)
    config = yaml.safe_load(rig.config_path.read_text())
    other_root = _remote_root(sshd_022, rig_root).with_name("second-host")
    config["hosts"].append({**config["hosts"][0], "name": "gpu2", "remote_root": str(other_root)})
    rig.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    rig.drop_case("TWOHOST1", beams=1)
    async with running_service(rig.settings()) as svc:
        await wait_until(
            lambda: _all_terminal(svc, {"TWOHOST1"}), timeout_s=90, what="the case to end"
        )
        (case,) = await svc.store.snapshot()
    assert case.status == "completed"
    key = case_key(secret_path(rig.db).read_bytes(), "TWOHOST1")
    ran_on = case.beams[0].host
    assert ran_on is not None
    roots = {"gpu1": _remote_root(sshd_022, rig_root), "gpu2": other_root}
    assert (roots[ran_on] / key / "inputs").is_dir()
    idle = next(r for name, r in roots.items() if name != ran_on)
    assert not (idle / key).exists()
