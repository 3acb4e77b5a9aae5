"""Every study is a case: a patient's second study is kept, a duplicate folder is reported."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mqi_async.ingest.layout import READY_MARKER
from tests.e2e import make_rig, running_service, statuses, wait_until
from tests.sshd import SshdServer

pytestmark = [pytest.mark.sshd, pytest.mark.slow]


async def test_a_patients_second_study_becomes_its_own_case(
    tmp_path: Path, sshd: SshdServer
) -> None:
    rig = make_rig(tmp_path / "rig", sshd, gpus=2, run_seconds=0.2)
    first = rig.drop_case("PAT1", beams=1, study_uid="1.2.3.100")
    async with running_service(rig.settings()) as svc:

        async def done(ids: set[str]) -> bool:
            st = await statuses(svc)
            return all(st.get(i) == "completed" for i in ids)

        await wait_until(lambda: done({"PAT1"}), timeout_s=60, what="the first study")
        # a re-plan arrives later: a second study folder under the same patient
        second = rig.drop_case("PAT1", beams=2, study_uid="1.2.3.200", seed=7)
        await wait_until(
            lambda: done({"PAT1", "PAT1/1.2.3.200"}), timeout_s=90, what="the second study"
        )
        cases = {c.case_id: c for c in await svc.store.snapshot()}
        beams = await svc.store.list_beams("PAT1/1.2.3.200")
    assert cases["PAT1"].case_path == str(first.case_dir)
    assert cases["PAT1/1.2.3.200"].case_path == str(second.case_dir)
    assert [b.beam_id for b in beams] == ["PAT1/1.2.3.200_beam_1", "PAT1/1.2.3.200_beam_2"]
    assert all(b.outputs for b in beams)


async def test_a_copy_of_a_registered_case_is_a_visible_event(
    tmp_path: Path, sshd: SshdServer
) -> None:
    rig = make_rig(tmp_path / "rig", sshd, gpus=2, run_seconds=0.2)
    case = rig.drop_case("FLAT9", beams=1, nested=False, room="G1")
    async with running_service(rig.settings()) as svc:
        await wait_until(
            lambda: _status_is(svc, "FLAT9", "completed"), timeout_s=60, what="the case"
        )
        # the same case folder sent again into the other room
        copy = rig.scan / "G2" / "FLAT9"
        shutil.copytree(case.case_dir, copy)
        (copy / READY_MARKER).touch()

        async def reported() -> list[object]:
            events = await svc.store.recent_events(100, case_id="FLAT9")
            return [e for e in events if e.kind == "duplicate_case_folder"]

        found = await wait_until(reported, timeout_s=30, what="the duplicate event")
        cases = [c.case_id for c in await svc.store.snapshot()]
    assert cases == ["FLAT9"]
    assert len(found) == 1 and str(copy) in found[0].message  # type: ignore[attr-defined]


async def _status_is(svc: object, case_id: str, want: str) -> bool:
    return (await statuses(svc)).get(case_id) == want  # type: ignore[arg-type]


async def test_a_priority_command_sets_the_value_the_operator_asked_for(
    tmp_path: Path, sshd: SshdServer
) -> None:
    from mqi_async.domain.records import CommandKind

    rig = make_rig(tmp_path / "rig", sshd, gpus=1, run_seconds=0.2)
    rig.drop_case("PRIO", beams=1)
    async with running_service(rig.settings()) as svc:
        await wait_until(lambda: _status_is(svc, "PRIO", "completed"), timeout_s=60, what="case")
        await svc.store.enqueue_command(CommandKind.PRIORITY, "PRIO", {"priority": 7})

        async def seven() -> bool:
            case = await svc.store.get_case("PRIO")
            return case is not None and case.priority == 7

        await wait_until(seven, timeout_s=20, what="priority 7")
