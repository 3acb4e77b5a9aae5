"""Verified, resumable SFTP transfers against a real OpenSSH sshd."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mqi_async.domain.errors import TransientError
from mqi_async.hpc.ssh import ConnectLimiter, SshPool
from mqi_async.hpc.ssh_host import SshHost
from mqi_async.hpc.transfer import PART_SUFFIX
from tests.sshd import SshdServer

pytestmark = pytest.mark.sshd

#: names that break naive quoting; a canary proves nothing in them was executed
ODD_NAMES = [
    "plain.txt",
    "with space.csv",
    "quote'single.in",
    'quote"double.in',
    "$(touch CANARY).raw",
    "`touch CANARY`.raw",
    "semi;colon & amp|pipe.dat",
    "new\nline.txt",
    "-leading-dash",
    "ünïcode dose.raw",
]


def _sha(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture
def remote_dir() -> Iterator[Path]:
    # sshd's login user must reach it, and pytest's tmp dirs are 0700 (platform.md §2)
    path = Path(tempfile.mkdtemp(prefix="mqi-remote-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def host(sshd: SshdServer, remote_dir: Path) -> AsyncIterator[SshHost]:
    pool = SshPool(sshd.endpoint(), limiter=ConnectLimiter(min_interval_s=0))
    h = SshHost(pool, remote_root=str(remote_dir))
    await h.start()
    assert h.is_available()
    yield h
    await h.aclose()


def _make_tree(root: Path, names: list[str], size: int = 3000) -> None:
    for i, name in enumerate(names):
        sub = root / ("sub dir $(x)" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / name).write_bytes(os.urandom(size + i))


async def test_odd_names_round_trip_literally(
    host: SshHost, tmp_path: Path, remote_dir: Path
) -> None:
    src = tmp_path / "case a b;$(rm -rf ~)"
    _make_tree(src, ODD_NAMES)
    target = f"{remote_dir}/case 'x' $(touch CANARY) `y`"
    seen: list[tuple[int, int]] = []
    report = await host.put_tree(src, target, progress=lambda d, t: seen.append((d, t)))
    assert report.files_sent == len(ODD_NAMES) and report.files_skipped == 0
    for rel, digest in report.sha256.items():
        assert _sha(Path(target) / rel) == digest == _sha(src / rel)
    assert (
        seen[-1][0] == seen[-1][1] == sum(f.stat().st_size for f in src.rglob("*") if f.is_file())
    )
    assert not list(Path(target).rglob("*" + PART_SUFFIX))

    names = sorted(report.sha256)
    back = tmp_path / "back"
    got = await host.get_files(target, names, back)
    assert got.files_sent == len(names)
    for rel in names:
        assert _sha(back / rel) == report.sha256[rel]
    listing = await host.list_dir(target)
    assert set(listing) == {n for n in ODD_NAMES if (src / n).exists()}

    again = await host.put_tree(src, target)
    assert (again.files_sent, again.files_skipped) == (0, len(ODD_NAMES))
    again_back = await host.get_files(target, names, back)
    assert (again_back.files_sent, again_back.files_skipped) == (0, len(names))
    # nothing in any name or path was run by a shell
    for where in (Path.home(), remote_dir, Path(target), Path.cwd(), tmp_path):
        assert not (where / "CANARY").exists()


async def test_list_dir_of_missing_directory_is_empty(host: SshHost, remote_dir: Path) -> None:
    assert await host.list_dir(f"{remote_dir}/nope") == {}


async def test_missing_remote_file_is_a_named_error(
    host: SshHost, tmp_path: Path, remote_dir: Path
) -> None:
    with pytest.raises(TransientError) as err:
        await host.get_files(str(remote_dir), ["absent.raw"], tmp_path)
    assert err.value.code == "transfer_failed"
    assert not list(tmp_path.iterdir())


async def test_cancelled_upload_resumes_without_resending_verified_files(
    host: SshHost, tmp_path: Path, remote_dir: Path
) -> None:
    src = tmp_path / "big"
    src.mkdir()
    for i in range(8):
        (src / f"beam_{i}.csv").write_bytes(os.urandom(6 * 2**20))
    total = 8 * 6 * 2**20
    target = f"{remote_dir}/case"
    halfway = asyncio.Event()

    def progress(done: int, _total: int) -> None:
        if done >= 0.7 * total:
            halfway.set()

    task = asyncio.create_task(host.put_tree(src, target, progress=progress))
    await asyncio.wait_for(halfway.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    finished = [p for p in Path(target).iterdir() if not p.name.endswith(PART_SUFFIX)]
    assert 0 < len(finished) < 8
    for p in finished:  # a name without .part is always complete and verified
        assert _sha(p) == _sha(src / p.name)

    report = await host.put_tree(src, target)
    assert report.files_skipped == len(finished)
    assert report.files_sent == 8 - len(finished)
    assert report.bytes_sent < total
    for i in range(8):
        assert _sha(Path(target) / f"beam_{i}.csv") == _sha(src / f"beam_{i}.csv")
    assert await host.pool.run("true", timeout_s=10)  # the pool is intact after the cancel


@pytest.fixture
def tiny_disk() -> Iterator[Path]:
    """A 1 MiB tmpfs, where root may mount one."""
    path = Path(tempfile.mkdtemp(prefix="mqi-tiny-"))
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,mode=755", "tmpfs", str(path)],
            capture_output=True,
        ).returncode
    ):
        path.rmdir()
        pytest.skip("needs root to mount a small tmpfs")
    yield path
    subprocess.run(["umount", str(path)], check=False)
    path.rmdir()


async def test_remote_disk_full_is_named_and_nothing_half_written_stays(
    host: SshHost, tmp_path: Path, tiny_disk: Path
) -> None:
    src = tmp_path / "case"
    src.mkdir()
    (src / "dose.raw").write_bytes(os.urandom(3 * 2**20))
    with pytest.raises(TransientError) as err:
        await host.put_tree(src, str(tiny_disk / "case"))
    assert err.value.code == "disk_full"
    assert not (tiny_disk / "case" / "dose.raw").exists()


async def test_local_disk_full_on_download_is_named(
    host: SshHost, remote_dir: Path, tiny_disk: Path
) -> None:
    (remote_dir / "dose.raw").write_bytes(os.urandom(3 * 2**20))
    with pytest.raises(TransientError) as err:
        await host.get_files(str(remote_dir), ["dose.raw"], tiny_disk)
    assert err.value.code == "disk_full"
    assert list(tiny_disk.iterdir()) == []


@pytest.mark.slow
async def test_256_mib_round_trip_verified_by_hash(
    host: SshHost, sshd: SshdServer, tmp_path: Path, remote_dir: Path
) -> None:
    src = tmp_path / "case"
    src.mkdir()
    big = src / "dose.raw"
    with big.open("wb") as f:
        for _ in range(256):
            f.write(os.urandom(2**20))
    digest = _sha(big)
    started = time.monotonic()
    up = await host.put_tree(src, f"{remote_dir}/case")
    put_s = time.monotonic() - started
    assert up.sha256 == {"dose.raw": digest} and up.bytes_sent == 256 * 2**20
    started = time.monotonic()
    down = await host.get_files(f"{remote_dir}/case", ["dose.raw"], tmp_path / "back")
    get_s = time.monotonic() - started
    assert down.sha256 == {"dose.raw": digest}
    assert _sha(tmp_path / "back" / "dose.raw") == digest
    mb = 256 * 2**20 / 1e6
    print(
        f"\nSFTP 256 MiB incl. verification: put {mb / put_s:.0f} MB/s, get {mb / get_s:.0f} MB/s"
    )
