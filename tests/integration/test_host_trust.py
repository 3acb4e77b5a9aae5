"""Hosts we cannot trust or talk to are named as such: unverified keys, failed negotiation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mqi_async.config import MAX_SESSIONS_CAP, load_settings
from mqi_async.domain.errors import ConfigError, HostUnavailableError, failure_info
from mqi_async.hpc.ssh import ConnectLimiter, SshPool
from mqi_async.store import Store
from tests.sshd import start_sshd

pytestmark = pytest.mark.sshd


async def test_no_common_key_exchange_is_ssh_negotiation_failed_not_a_wrong_key() -> None:
    server = start_sshd(extra_config=("KexAlgorithms diffie-hellman-group1-sha1",))
    try:
        if not server.is_openssh:
            pytest.skip("needs a real OpenSSH sshd to restrict its key exchange")
        pool = SshPool(server.endpoint(), limiter=ConnectLimiter())
        try:
            with pytest.raises(HostUnavailableError) as caught:
                await pool.start()
                await pool.run("true", timeout_s=5)
        finally:
            await pool.aclose()
    finally:
        server.close()
    assert caught.value.code == "ssh_negotiation_failed"
    assert "key exchange" in str(caught.value)
    assert failure_info("ssh_negotiation_failed").advice.startswith("The SSH client and server")


def _config(tmp_path: Path, known_hosts: str, max_sessions: int = 8) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        "database: mqi.db\n"
        "hosts:\n"
        f"  - {{name: gpu1, kind: ssh, address: 10.0.0.5, remote_root: /r,"
        f" known_hosts: {known_hosts}, max_sessions: {max_sessions}}}\n"
        "  - {name: gpu2, kind: ssh, address: 10.0.0.6, remote_root: /r}\n"
    )
    return path


async def test_status_marks_a_host_whose_key_is_not_checked(tmp_path: Path) -> None:
    config = _config(tmp_path, "ignore")
    store = await Store.open(tmp_path / "mqi.db")
    try:
        await store.record_host_state("gpu1", "connected", None)
        await store.record_host_state("gpu2", "connected", None)
    finally:
        await store.aclose()
    out = subprocess.run(
        [sys.executable, "-m", "mqi_async", "status", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    assert "host gpu1: connected [UNVERIFIED: host key not checked (known_hosts: ignore)]" in out
    assert "host gpu2: connected" in out


def test_max_sessions_is_capped_with_a_sentence(tmp_path: Path) -> None:
    assert load_settings(_config(tmp_path, "ignore", MAX_SESSIONS_CAP)).hosts
    with pytest.raises(ConfigError) as caught:
        load_settings(_config(tmp_path, "ignore", MAX_SESSIONS_CAP + 1))
    text = str(caught.value)
    assert "hosts[0].max_sessions" in text and "MaxSessions" in text
