"""The `web:` section: off by default, strictly checked, hashes only, masked by check-config."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqi_async.config import effective_config, load_settings
from mqi_async.domain.errors import ConfigError
from mqi_async.web.auth import make_hash

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_off_by_default_and_on_this_machine_only() -> None:
    web = load_settings(REPO / "config.yaml").web
    assert web.enabled is False
    assert web.bind == "127.0.0.1" and web.port == 8470
    assert web.tokens == [] and web.users == []


def test_hashes_are_checked_and_masked(tmp_path: Path) -> None:
    token_hash, user_hash = make_hash("t"), make_hash("p")
    s = load_settings(
        _write(
            tmp_path,
            "web:\n  enabled: true\n  port: 9000\n  refresh_seconds: 2\n"
            f"  tokens: [{{name: robot, hash: '{token_hash}'}}]\n"
            f"  users: [{{name: alice, password_hash: '{user_hash}'}}]\n",
        )
    )
    assert s.web.enabled and s.web.port == 9000 and s.web.refresh_seconds == 2
    dumped = repr(effective_config(s))
    assert token_hash not in dumped and user_hash not in dumped
    assert effective_config(s)["web"]["tokens"] == [{"name": "robot", "hash": "********"}]


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("web:\n  tokens: [{name: robot, hash: my-plain-token}]\n", "web.tokens[0].hash"),
        ("web:\n  users: [{name: alice, password_hash: hunter2}]\n", "web.users[0].password_hash"),
        ("web:\n  port: 0\n", "web.port"),
        ("web:\n  refresh_seconds: 0\n", "web.refresh_seconds"),
        ("web:\n  bind_address: 0.0.0.0\n", "web.bind_address"),
        ("web:\n  users: [{name: 'a b', password_hash: x}]\n", "web.users[0].name"),
    ],
    ids=["plain-token", "plain-password", "port", "refresh", "unknown-key", "bad-name"],
)
def test_bad_web_settings_name_their_key(tmp_path: Path, text: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text))
    assert any(p.startswith(f"{path}:") for p in info.value.problems), info.value.problems


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    h = make_hash("x")
    text = (
        f"web:\n  tokens: [{{name: alice, hash: '{h}'}}]\n"
        f"  users: [{{name: alice, password_hash: '{h}'}}]\n"
    )
    with pytest.raises(ConfigError, match="unique"):
        load_settings(_write(tmp_path, text))


def test_environment_turns_it_on_for_a_container(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what the Dockerfile sets: bind all interfaces inside the container, still off
    monkeypatch.setenv("MQI_WEB__BIND", "0.0.0.0")
    s = load_settings(REPO / "config.yaml")
    assert s.web.bind == "0.0.0.0" and s.web.enabled is False
    monkeypatch.setenv("MQI_WEB__ENABLED", "true")
    assert load_settings(REPO / "config.yaml").web.enabled is True
