"""Transfer throughput (issue 7, item 3): `hpc/transfer.py` against `scp` and `sftp -b`.

A 256 MiB random file goes up and comes back through the same OpenSSH sshd, in interleaved
rounds (ours, scp, sftp -b, ours, ...), so the machine's noise hits every contender alike;
the medians are compared. Ours is the service's own path: the long-lived pool connection
(the service keeps it open), `upload_tree`/`download_files` with their SHA-256 checks on
both ends and the atomic rename. The OpenSSH tools run as an operator would type them
(default cipher, a fresh connection each time, no verification), and once more with
aes128-gcm, the cipher the pool prefers. `ssh host true` in the same rounds gives their
connection cost, so a ratio without it is shown as well.

The headline ratio pairs each round's transfers (ours against scp, and against sftp -b, in
the same round) and takes the median over rounds, then the lower of the two tools.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from mqi_async.hpc.ssh import ConnectLimiter, SshPool
from mqi_async.hpc.transfer import download_files, upload_tree
from tests.sshd import SshdServer

pytestmark = pytest.mark.timeout(400)

SIZE = 256 * 2**20
ROUNDS = 4
NAME = "blob.bin"
AES = "aes128-gcm@openssh.com"


def _write_random(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 8 * 2**20)
            f.write(os.urandom(n))
            left -= n


def _ssh_options(sshd: SshdServer) -> list[str]:
    return [
        "-i",
        str(sshd.key_path),
        "-o",
        f"UserKnownHostsFile={sshd.known_hosts_path}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-F",
        "/dev/null",
    ]


async def _cli(argv: Sequence[str], stdin: bytes | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate(stdin)
    if proc.returncode != 0:
        raise AssertionError(f"{argv[0]} failed ({proc.returncode}): {err.decode()[-500:]}")


async def _timed(action: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


def _mb_s(seconds: list[float]) -> float:
    return SIZE / 1e6 / statistics.median(seconds)


async def test_transfer_throughput(
    openssh: SshdServer, tmp_path: Path, report: Callable[..., str]
) -> None:
    sshd = openssh
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    source = src_dir / NAME
    await asyncio.to_thread(_write_random, source, SIZE)
    remote_src = sshd.work_dir / "bench-src"
    remote_src.mkdir(exist_ok=True)
    await asyncio.to_thread(shutil.copyfile, source, remote_src / NAME)
    target = f"{sshd.user}@{sshd.host}"
    opts = _ssh_options(sshd)
    port = str(sshd.port)
    times: dict[str, list[float]] = {}
    load: list[float] = []

    def add(key: str, seconds: float) -> None:
        times.setdefault(key, []).append(seconds)

    async with SshPool(sshd.endpoint(), limiter=ConnectLimiter()) as pool:
        await pool.connect()
        for rnd in range(ROUNDS):
            load.append(os.getloadavg()[0])
            up = sshd.work_dir / f"bench-up-{rnd}"
            down = tmp_path / f"down-{rnd}"
            for d in (up, down):
                d.mkdir()

            async def ours_put(up: Path = up) -> None:
                rep = await upload_tree(pool, src_dir, str(up / "ours"))
                assert rep.files_sent == 1 and rep.bytes_sent == SIZE

            async def ours_get(down: Path = down) -> None:
                rep = await download_files(pool, str(remote_src), [NAME], down / "ours")
                assert rep.files_sent == 1 and rep.bytes_sent == SIZE

            def scp(src: str, dst: str, *extra: str) -> Callable[[], Awaitable[None]]:
                return lambda: _cli(["scp", "-q", *opts, *extra, "-P", port, src, dst])

            def sftp(batch: str, *extra: str) -> Callable[[], Awaitable[None]]:
                return lambda: _cli(
                    ["sftp", "-q", *opts, *extra, "-P", port, "-b", "-", target],
                    stdin=batch.encode(),
                )

            (down / "sftp").mkdir()
            (down / "sftp-aes").mkdir()
            steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                ("connect", lambda: _cli(["ssh", *opts, "-p", port, target, "true"])),
                ("ours_put", ours_put),
                ("scp_put", scp(str(source), f"{target}:{up}/scp.bin")),
                ("sftp_put", sftp(f"put {source} {up}/sftp.bin\n")),
                ("scp_aes_put", scp(str(source), f"{target}:{up}/scp-aes.bin", "-c", AES)),
                ("sftp_aes_put", sftp(f"put {source} {up}/sftp-aes.bin\n", "-c", AES)),
                ("ours_get", ours_get),
                ("scp_get", scp(f"{target}:{remote_src / NAME}", str(down / "scp.bin"))),
                ("sftp_get", sftp(f"get {remote_src / NAME} {down / 'sftp' / NAME}\n")),
                (
                    "scp_aes_get",
                    scp(f"{target}:{remote_src / NAME}", str(down / "scp-aes.bin"), "-c", AES),
                ),
                (
                    "sftp_aes_get",
                    sftp(f"get {remote_src / NAME} {down / 'sftp-aes' / NAME}\n", "-c", AES),
                ),
            ]
            # rotate the order each round so no contender always goes first after a cleanup
            k = rnd % (len(steps) - 1)
            for key, action in [steps[0], *steps[1 + k :], *steps[1 : 1 + k]]:
                add(key, await _timed(action))
            for p in (up / "ours" / NAME, down / "ours" / NAME, down / "sftp" / NAME):
                assert p.stat().st_size == SIZE, p
            await asyncio.to_thread(shutil.rmtree, up)
            await asyncio.to_thread(shutil.rmtree, down)

    connect_s = statistics.median(times["connect"])

    def paired(tool: str, way: str, minus_s: float = 0.0) -> float:
        """Median over rounds of (tool's time - minus_s) / our time: >1 means ours is faster."""
        ours = times[f"ours_{way}"]
        theirs = times[f"{tool}_{way}"]
        return statistics.median((t - minus_s) / o for t, o in zip(theirs, ours, strict=True))

    for way in ("put", "get"):
        rates = {
            tool: f"{_mb_s(times[f'{tool}_{way}']):.0f}"
            for tool in ("ours", "scp", "sftp", "scp_aes", "sftp_aes")
        }
        report(
            f"transfer_{way}_ratio",
            min(paired("scp", way), paired("sftp", way)),
            "x (ours/min(scp,sftp -b))",
            "goal>=1.0",
            vs_scp=f"{paired('scp', way):.2f}",
            vs_sftp_b=f"{paired('sftp', way):.2f}",
            vs_scp_aes128gcm=f"{paired('scp_aes', way):.2f}",
            vs_sftp_aes128gcm=f"{paired('sftp_aes', way):.2f}",
            vs_cli_minus_connect=f"{min(paired('scp', way, connect_s), paired('sftp', way, connect_s)):.2f}",
            mb_s="/".join(f"{k}={v}" for k, v in rates.items()),
            cli_connect=f"{connect_s * 1000:.0f}ms",
            rounds=ROUNDS,
            load1=f"{statistics.median(load):.1f}",
        )
