"""Retention rules: what may go, when, and nothing outside a case folder under remote_root."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mqi_async.domain.model import BeamStatus, CaseStatus, RunStatus
from mqi_async.domain.privacy import case_key
from mqi_async.domain.records import BeamRow, CaseRow, RunRow
from mqi_async.domain.retention import (
    RetentionPolicy,
    attempt_due,
    case_folder_due,
    parse_removed,
    removable_remote,
    remove_script,
    work_folder_due,
)

NOW = datetime(2026, 1, 10, 12, tzinfo=UTC)
POLICY = RetentionPolicy(remote_failed_days=7, work_days=30)
KEY = case_key(b"k" * 32, "P1")


def run(status: RunStatus, *, ended_days_ago: float = 0) -> RunRow:
    ended = NOW - timedelta(days=ended_days_ago)
    return RunRow(
        run_id=1,
        beam_id="P1_beam_1",
        attempt=1,
        host="gpu1",
        gpu_uuids=(),
        job_dir=f"/runs/{KEY}/beam_1/1-abcd",
        job_id="123",
        status=status,
        exit_code=None,
        signal=None,
        error=None,
        started_at=ended - timedelta(minutes=5),
        ended_at=ended if status.is_terminal else None,
    )


def _beam(status: BeamStatus) -> BeamRow:
    fields = dict.fromkeys(BeamRow.__dataclass_fields__)
    fields.update(beam_id="P1_beam_1", case_id="P1", beam_index=1, status=status)
    return BeamRow(**fields)  # type: ignore[arg-type]


def _case(status: CaseStatus, *, updated_days_ago: float = 0) -> CaseRow:
    fields = dict.fromkeys(CaseRow.__dataclass_fields__)
    fields.update(
        case_id="P1",
        safe_name="P1",
        status=status,
        updated_at=NOW - timedelta(days=updated_days_ago),
    )
    return CaseRow(**fields)  # type: ignore[arg-type]


def test_a_completed_beams_attempt_goes_at_once() -> None:
    assert attempt_due(run(RunStatus.SUCCEEDED), _beam(BeamStatus.COMPLETED), NOW, POLICY)


def test_a_succeeded_run_not_yet_downloaded_stays() -> None:
    for status in (BeamStatus.DOWNLOADING, BeamStatus.CONVERTING):
        assert not attempt_due(run(RunStatus.SUCCEEDED), _beam(status), NOW, POLICY)


@pytest.mark.parametrize("status", [RunStatus.FAILED, RunStatus.LOST, RunStatus.KILLED])
def test_a_failed_attempt_stays_for_the_configured_days(status: RunStatus) -> None:
    beam = _beam(BeamStatus.FAILED)
    assert not attempt_due(run(status, ended_days_ago=6.9), beam, NOW, POLICY)
    assert attempt_due(run(status, ended_days_ago=7), beam, NOW, POLICY)


def test_a_running_attempt_never_goes() -> None:
    assert not attempt_due(
        run(RunStatus.RUNNING, ended_days_ago=100), _beam(BeamStatus.RUNNING), NOW, POLICY
    )


def test_the_case_folder_goes_only_when_the_case_ended_and_every_attempt_may_go() -> None:
    beams = [_beam(BeamStatus.COMPLETED)]
    ok = [run(RunStatus.SUCCEEDED)]
    assert case_folder_due(_case(CaseStatus.COMPLETED), beams, ok, NOW, POLICY)
    assert not case_folder_due(_case(CaseStatus.PROCESSING), beams, ok, NOW, POLICY)
    fresh_failure = [run(RunStatus.FAILED, ended_days_ago=1), *ok]
    assert not case_folder_due(_case(CaseStatus.COMPLETED), beams, fresh_failure, NOW, POLICY)


def test_work_folders_follow_work_days_and_none_keeps_them() -> None:
    assert work_folder_due(_case(CaseStatus.COMPLETED, updated_days_ago=30), NOW, POLICY)
    assert not work_folder_due(_case(CaseStatus.COMPLETED, updated_days_ago=29), NOW, POLICY)
    assert not work_folder_due(_case(CaseStatus.WAITING, updated_days_ago=99), NOW, POLICY)
    forever = replace(POLICY, work_days=None)
    assert not work_folder_due(_case(CaseStatus.FAILED, updated_days_ago=999), NOW, forever)


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        (f"/runs/{KEY}", True),
        (f"/runs/{KEY}/beam_1/1-abcd", True),
        ("/runs", False),
        ("/runs/", False),
        ("/runs/P1", False),
        ("/", False),
        ("/home/mqi", False),
        (f"/runs/{KEY}/../other", False),
        (f"/runsX/{KEY}", False),
        (f"/other/{KEY}", False),
    ],
)
def test_only_case_folders_under_remote_root_are_removable(path: str, ok: bool) -> None:
    assert removable_remote("/runs", path) is ok


def test_remove_script_removes_what_exists_and_says_so(tmp_path: Path) -> None:
    there = tmp_path / "a b;$(touch pwned)"
    there.mkdir()
    (there / "f").write_text("x")
    missing = tmp_path / "missing"
    paths = [str(there), str(missing)]
    out = subprocess.run(
        ["/bin/sh", "-c", remove_script(paths)], capture_output=True, text=True, check=True
    )
    assert parse_removed(out.stdout, paths) == [str(there)]
    assert not there.exists() and not (tmp_path / "pwned").exists()
