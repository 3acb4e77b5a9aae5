"""The web view's secrets: scrypt hashes for config.yaml, signed sessions, CSRF tokens."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from mqi_async.config import load_settings
from mqi_async.web.auth import (
    Authenticator,
    Credential,
    SessionSigner,
    derive_key,
    make_hash,
    verify_hash,
)
from mqi_async.web.hash_token import main as hash_token_main

KEY = derive_key(b"k" * 32, "session")


def test_a_hash_verifies_its_secret_only() -> None:
    stored = make_hash("correct horse")
    assert stored.startswith("scrypt$14$8$1$")
    assert verify_hash("correct horse", stored)
    assert not verify_hash("correct hors", stored)
    # a new salt every time: the same secret never hashes the same
    assert make_hash("correct horse") != stored


@pytest.mark.parametrize(
    "stored",
    ["", "plain", "scrypt$14$8$1$salt", "md5$1$2$3$abc$def", "scrypt$99$8$1$AAAA$BBBB"],
    ids=["empty", "plain", "short", "other-scheme", "absurd-cost"],
)
def test_a_malformed_hash_never_verifies(stored: str) -> None:
    assert not verify_hash("anything", stored)


def test_sessions_are_signed_and_expire() -> None:
    signer = SessionSigner(KEY, lifetime_s=60)
    cookie, session = signer.issue("alice", now=1000.0)
    assert signer.read(cookie, now=1001.0) == session
    assert signer.read(cookie, now=1061.0) is None  # expired
    payload, signature = cookie.split(".")
    forged = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
    assert signer.read(f"{forged}.{signature}", now=1001.0) is None
    assert SessionSigner(derive_key(b"x" * 32, "session"), lifetime_s=60).read(cookie) is None
    for junk in (None, "", "no-dot", "a.b.c", "x" * 5000):
        assert signer.read(junk) is None


def test_csrf_token_belongs_to_its_session() -> None:
    signer = SessionSigner(KEY, lifetime_s=60)
    _, one = signer.issue("alice")
    _, two = signer.issue("alice")
    assert signer.check_csrf(one, signer.csrf_token(one))
    assert not signer.check_csrf(one, signer.csrf_token(two))
    assert not signer.check_csrf(one, "")
    assert not signer.check_csrf(one, None)


async def test_authenticator_checks_tokens_and_passwords() -> None:
    auth = Authenticator(
        [
            Credential(name="robot", hash=make_hash("tok-1"), is_token=True),
            Credential(name="alice", hash=make_hash("pw"), is_token=False),
        ],
        key=KEY,
    )
    assert auth.is_enabled and auth.names() == {"robot", "alice"}
    assert await auth.token("tok-1") == "robot"
    assert await auth.token("tok-1") == "robot"  # remembered
    assert await auth.token("pw") is None  # a password is no token
    assert await auth.password("alice", "pw") == "alice"
    assert await auth.password("robot", "tok-1") is None  # a token is no password
    assert await auth.password("alice", "") is None
    assert not Authenticator([], key=KEY).is_enabled


def test_hash_token_prints_a_hash_that_config_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret\n"))
    assert hash_token_main(["--stdin"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("hash: scrypt$")
    stored = line.removeprefix("hash: ")
    assert verify_hash("s3cret", stored)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"web:\n  enabled: true\n  users:\n    - name: alice\n      password_hash: '{stored}'\n"
    )
    settings = load_settings(config)
    assert settings.web.users[0].password_hash.get_secret_value() == stored


def test_hash_token_new_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mqi_async.web.hash_token", "--new"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    token_line, hash_line = done.stdout.strip().splitlines()
    token = token_line.removeprefix("token: ")
    assert len(token) >= 40
    assert verify_hash(token, hash_line.removeprefix("hash: "))
