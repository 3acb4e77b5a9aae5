"""SshPool against a real OpenSSH sshd: commands, MaxSessions, host keys, outages."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from mqi_async.domain.errors import HostUnavailableError, TransientError
from mqi_async.hpc.ssh import ConnectLimiter, SshEndpoint, SshPool
from mqi_async.hpc.ssh_host import SshHost
from tests.sshd import SshdServer, free_port

pytestmark = pytest.mark.sshd


@pytest.fixture
async def pool(sshd: SshdServer) -> AsyncIterator[SshPool]:
    async with SshPool(sshd.endpoint(), limiter=ConnectLimiter(min_interval_s=0.0)) as p:
        yield p


async def test_run_returns_output_and_status(pool: SshPool) -> None:
    result = await pool.run("echo out; echo err >&2; exit 3", timeout_s=10)
    assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")


async def test_fifty_concurrent_commands_fit_default_max_sessions(
    sshd: SshdServer, pool: SshPool
) -> None:
    # an open SFTP session takes one of the server's 10 sessions for the whole time
    async with pool.sftp() as sftp:
        await sftp.listdir(str(sshd.work_dir))
        results = await asyncio.gather(
            *(pool.run(f"sleep 0.05; echo {i}", timeout_s=30) for i in range(50))
        )
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(50)]
    assert all(r.ok for r in results)


async def test_timeout_is_a_named_error_and_the_pool_survives(pool: SshPool) -> None:
    started = time.monotonic()
    with pytest.raises(TransientError) as err:
        await pool.run("sleep 20", timeout_s=0.5)
    assert err.value.code == "remote_timeout"
    assert time.monotonic() - started < 5
    assert (await pool.run("echo ok", timeout_s=10)).stdout == "ok\n"


async def test_wrong_host_key_is_host_key_mismatch_and_nothing_is_uploaded(
    sshd: SshdServer, tmp_path: Path
) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other}")
    pool = SshPool(
        sshd.endpoint(known_hosts=str(known_hosts)), limiter=ConnectLimiter(min_interval_s=0)
    )
    remote_root = sshd.work_dir / f"runs-{tmp_path.name}"
    host = SshHost(pool, remote_root=str(remote_root))
    await host.start()  # must not raise: the host is paused, not broken
    try:
        assert not host.is_available()
        assert pool.last_error is not None and pool.last_error.code == "host_key_mismatch"
        src = tmp_path / "case"
        src.mkdir()
        (src / "plan.dcm").write_bytes(b"x" * 100)
        with pytest.raises(HostUnavailableError) as err:
            await host.put_tree(src, str(remote_root / "case"))
        assert err.value.code == "host_key_mismatch"
        assert not remote_root.exists()
    finally:
        await host.aclose()


async def test_refused_key_is_auth_failed(sshd: SshdServer, tmp_path: Path) -> None:
    stranger = asyncssh.generate_private_key("ssh-ed25519")
    async with SshPool(
        sshd.endpoint(client_keys=(stranger,)), limiter=ConnectLimiter(min_interval_s=0)
    ) as pool:
        with pytest.raises(HostUnavailableError) as err:
            await pool.run("true", timeout_s=5)
    assert err.value.code == "auth_failed"


async def test_known_hosts_ignore_is_logged_loudly(
    sshd: SshdServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mqi_async.hpc.ssh"):
        async with SshPool(
            sshd.endpoint(known_hosts="ignore"), limiter=ConnectLimiter(min_interval_s=0)
        ) as pool:
            assert (await pool.run("echo ok", timeout_s=10)).ok
    assert any("HOST KEY CHECKING IS OFF" in r.getMessage() for r in caplog.records)


async def test_unreachable_host_fails_fast_and_typed() -> None:
    endpoint = SshEndpoint(
        name="nowhere", address="127.0.0.1", port=free_port(), known_hosts="ignore"
    )
    async with SshPool(endpoint, limiter=ConnectLimiter(min_interval_s=0)) as pool:
        assert not pool.is_connected
        started = time.monotonic()
        with pytest.raises(HostUnavailableError) as err:
            await pool.run("true", timeout_s=5)
        assert err.value.code == "host_unreachable"
        assert time.monotonic() - started < 1


@pytest.mark.slow
async def test_outage_pauses_callers_and_the_pool_reconnects_by_itself(sshd: SshdServer) -> None:
    pool = SshPool(
        sshd.endpoint(),
        limiter=ConnectLimiter(min_interval_s=0),
        backoff_initial_s=0.2,
        backoff_max_s=1.0,
    )
    async with pool:
        assert (await pool.run("echo before", timeout_s=10)).ok
        sshd.stop()
        errors: list[str] = []
        outage_started = time.monotonic()
        while time.monotonic() - outage_started < 6:
            call_started = time.monotonic()
            try:
                await pool.run("echo during", timeout_s=5)
            except HostUnavailableError as exc:
                errors.append(exc.code)
            # a caller learns at once that the host is down; it never hangs
            assert time.monotonic() - call_started < 2
            await asyncio.sleep(0.3)
        assert errors and set(errors) == {"host_unreachable"}
        assert not pool.is_connected
        sshd.start()
        deadline = time.monotonic() + 15
        while not pool.is_connected and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # nobody calls: the pool's own task reconnects
        assert pool.is_connected
        assert (await pool.run("echo after", timeout_s=10)).stdout == "after\n"
