"""Session fixtures shared by the test suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.sshd import SshdServer, start_sshd


@pytest.fixture(scope="session")
def sshd_server() -> Iterator[SshdServer]:
    """A real OpenSSH sshd on 127.0.0.1 (asyncssh stand-in without it), shared by the session."""
    try:
        server = start_sshd()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def sshd(sshd_server: SshdServer) -> SshdServer:
    """The session's sshd, started again if an earlier test left it stopped."""
    sshd_server.start()
    return sshd_server
