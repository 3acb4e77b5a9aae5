"""Config loading: strict keys, key paths in errors, env overrides, path resolution, masking."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqi_async.config import SshHostSettings, effective_config, load_settings
from mqi_async.domain.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_shipped_config_is_valid() -> None:
    s = load_settings(REPO / "config.yaml")
    assert s.hosts[0].kind == "simulated"
    assert s.scan_directory == REPO / "data" / "incoming"
    assert s.database.is_absolute()


def test_problems_name_every_key_path(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path,
        """
scan_directroy: x
hosts:
  - name: gpu1
    kind: ssh
    port: 70000
    remote_root: /r
""",
    )
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    problems = "\n".join(info.value.problems)
    assert "scan_directroy: unknown key" in problems
    assert "hosts[0].port" in problems
    assert "hosts[0].address: required key is missing" in problems


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("gpu:\n  allocation: round_robin\n", "gpu.allocation"),
        ("gpu:\n  poll_seconds: 0\n", "gpu.poll_seconds"),
        ("runs:\n  timeout_seconds: -1\n", "runs.timeout_seconds"),
        ("hosts:\n  - name: a\n    kind: teleport\n", "hosts[0]"),
        ("hosts: []\n", "hosts"),
        ("moqui:\n  GPUID: 3\n", "moqui"),
        ("moqui:\n  ParentDir: /x\n", "moqui"),
        ("moqui:\n  Scorer: ''\n", "moqui"),
        ("moqui:\n  Scorer: 'Dose # x'\n", "moqui"),
        ("ingest:\n  ready_markr: X\n", "ingest.ready_markr: unknown key"),
        ("retry:\n  backoff_initial_seconds: 10\n  backoff_max_seconds: 1\n", "backoff_max"),
        ("- just\n- a list\n", "top level"),
        ("key: [unclosed\n", "not valid YAML"),
    ],
)
def test_invalid_values_are_refused(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text))
    assert fragment in "\n".join(info.value.problems)


def test_duplicate_host_names_refused(tmp_path: Path) -> None:
    text = "hosts:\n  - {name: a, kind: simulated}\n  - {name: a, kind: simulated}\n"
    with pytest.raises(ConfigError, match="unique"):
        load_settings(_write(tmp_path, text))


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _write(tmp_path, "gpu:\n  poll_seconds: 5\n")
    monkeypatch.setenv("MQI_GPU__POLL_SECONDS", "2")
    monkeypatch.setenv("MQI_RUNS__TIMEOUT_SECONDS", "30")
    s = load_settings(cfg)
    assert s.gpu.poll_seconds == 2
    assert s.runs.timeout_seconds == 30


def test_bad_environment_override_names_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MQI_GPU__POLL_SECONDS", "soon")
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, ""))
    assert "gpu.poll_seconds" in "\n".join(info.value.problems)


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    text = """
scan_directory: in
database: ../db/m.db
hosts:
  - name: g
    kind: ssh
    address: h
    remote_root: /srv/runs
    client_keys: [keys/id]
    known_hosts: kh
"""
    s = load_settings(_write(sub, text))
    assert s.scan_directory == sub / "in"
    assert s.database == tmp_path / "db" / "m.db"
    host = s.hosts[0]
    assert isinstance(host, SshHostSettings)
    assert host.client_keys == [sub / "keys" / "id"]
    assert host.known_hosts == str(sub / "kh")


def test_known_hosts_ignore_is_kept_literally(tmp_path: Path) -> None:
    text = "hosts:\n  - {name: g, kind: ssh, address: h, remote_root: /r, known_hosts: ignore}\n"
    host = load_settings(_write(tmp_path, text)).hosts[0]
    assert isinstance(host, SshHostSettings)
    assert host.known_hosts == "ignore"


def test_remote_root_must_be_absolute(tmp_path: Path) -> None:
    text = "hosts:\n  - {name: g, kind: ssh, address: h, remote_root: runs}\n"
    with pytest.raises(ConfigError, match=r"hosts\[0\]\.remote_root"):
        load_settings(_write(tmp_path, text))


def test_secrets_are_masked(tmp_path: Path) -> None:
    text = (
        "hosts:\n  - {name: g, kind: ssh, address: h, remote_root: /r,"
        " passphrase: hunter2, password: swordfish}\n"
    )
    s = load_settings(_write(tmp_path, text))
    dumped = repr(effective_config(s))
    assert "hunter2" not in dumped and "swordfish" not in dumped
    assert "********" in dumped
    assert "hunter2" not in repr(s)


def test_notify_section_is_checked_and_its_secrets_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = (
        "notify:\n"
        "  webhook: {url: 'https://hooks.example/T0KEN', headers: {Authorization: Bearer tok3n}}\n"
        "  email: {host: smtp.example, username: mqi, password: swordfish,"
        " sender: mqi@clinic.example, recipients: [it@clinic.example]}\n"
    )
    s = load_settings(_write(tmp_path, text))
    assert s.notify.enabled is False and s.notify.include_patient_id is False
    assert s.notify.email is not None and s.notify.email.starttls and s.notify.email.port == 587
    dumped = repr(effective_config(s))
    for secret in ("T0KEN", "tok3n", "swordfish"):
        assert secret not in dumped and secret not in repr(s)
    monkeypatch.setenv("MQI_NOTIFY__ENABLED", "true")
    assert load_settings(_write(tmp_path, text)).notify.enabled is True
    bad = (
        "notify:\n  enabled: true\n  webhook: {url: 'ftp://x'}\n"
        "  email: {host: h, starttls: false, username: u, sender: nobody, recipients: []}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings(_write(tmp_path, bad))
    problems = "\n".join(err.value.problems)
    for path in ("notify.webhook.url", "notify.email.sender", "notify.email.recipients"):
        assert path in problems
