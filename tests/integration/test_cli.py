"""The command line as users and supervisors drive it (CONTRACT.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def mqi(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqi_async", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_check_config_on_shipped_config() -> None:
    res = mqi("check-config", "-c", str(REPO / "config.yaml"))
    assert res.returncode == 0, res.stderr
    assert "scan_directory:" in res.stdout and "kind: simulated" in res.stdout


def test_check_config_names_every_bad_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "scan_directroy: x\nhosts:\n  - name: gpu1\n    kind: ssh\n    port: 99999\n"
        "    remote_root: /srv/runs\n"
    )
    res = mqi("check-config", "-c", str(cfg))
    assert res.returncode == 2
    out = res.stdout + res.stderr
    for path in ("scan_directroy", "hosts[0].port", "hosts[0].address"):
        assert path in out
    assert len([line for line in res.stdout.splitlines() if line.strip()]) == 3


def test_check_config_masks_secrets_and_warns_unread_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "hosts:\n  - {name: g, kind: ssh, address: h, remote_root: /r, passphrase: s3cret-pp}\n"
        "moqui:\n  Scorer: Dose\n  Verbosity: 0\n  ROIName: External\n"
    )
    res = mqi("check-config", "-c", str(cfg))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "s3cret-pp" not in res.stdout + res.stderr
    assert "Verbosity" in res.stderr and "ROIName" in res.stderr


def test_env_override_shows_in_effective_config() -> None:
    res = mqi("check-config", "-c", str(REPO / "config.yaml"), env={"MQI_GPU__POLL_SECONDS": "2"})
    assert res.returncode == 0
    assert "poll_seconds: 2.0" in res.stdout


def test_status_json_on_empty_database(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("database: data/mqi.db\n")
    res = mqi("status", "--json", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"cases": []}
    assert not (tmp_path / "data" / "mqi.db").exists()


def test_status_with_config_error_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("gpu:\n  allocation: nope\n")
    res = mqi("status", "-c", str(cfg))
    assert res.returncode == 2
    assert "gpu.allocation" in res.stderr


@pytest.mark.parametrize("command", ["retry", "cancel", "recheck"])
def test_request_for_unknown_case_exits_1(tmp_path: Path, command: str) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("database: mqi.db\n")
    res = mqi(command, "nope", "-c", str(cfg))
    assert res.returncode == 1
    assert "unknown case" in res.stderr


def test_python_m_and_console_script_agree() -> None:
    script = Path(sys.executable).parent / "mqi-async"
    res = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "mqi-async" in res.stdout
