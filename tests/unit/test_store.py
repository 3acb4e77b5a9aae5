"""The store's transactions, case and beam queries, events and commands, on a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mqi_async.domain.errors import IllegalTransitionError
from mqi_async.domain.model import BeamStatus, CaseStatus
from mqi_async.store import (
    CommandKind,
    CommandStatus,
    NewBeam,
    NewCase,
    NewDelivery,
    Store,
)


class SteppingClock:
    """Aware UTC time that moves one second per call, so every transaction has its own time."""

    def __init__(self) -> None:
        self.now_at = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.now_at += timedelta(seconds=1)
        return self.now_at


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with await Store.open(tmp_path / "mqi.db", now=SteppingClock()) as opened:
        yield opened


def _case(
    case_id: str,
    *,
    room: str | None = None,
    status: CaseStatus = CaseStatus.PENDING,
    priority: int = 0,
) -> NewCase:
    return NewCase(
        case_id=case_id,
        case_path=f"/data/{case_id}",
        safe_name=case_id,
        room=room,
        status=status,
        priority=priority,
    )


def _beams(count: int) -> list[NewBeam]:
    return [
        NewBeam(beam_index=k, beam_number=10 + k, beam_name=f"B{k}", delivery_path=f"/d/{k}")
        for k in range(1, count + 1)
    ]


async def test_register_case_with_beams_and_deliveries(store: Store) -> None:
    case_id = "a b;$(rm -rf ~)"
    deliveries = [
        NewDelivery(
            delivery_id=f"{case_id}/2026{k}",
            delivery_path=f"/data/{case_id}/2026{k}",
            delivered_at=datetime(2026, 3, 1, 7, k, tzinfo=UTC),
            fraction_index=1,
            raw_beam_number=10 + k,
            treatment_beam_index=k,
            is_reference=True,
        )
        for k in (1, 2)
    ] + [NewDelivery(delivery_id="stray", delivery_path="/stray", treatment_beam_index=9)]
    row, is_new = await store.register_case(_case(case_id, room="G2"), _beams(2), deliveries)

    assert is_new
    assert (row.case_id, row.room, row.status, row.progress) == (
        case_id,
        "G2",
        CaseStatus.PENDING,
        0,
    )
    assert row.created_at.tzinfo is not None and row.created_at.utcoffset() == timedelta(0)
    beams = await store.list_beams(case_id)
    assert [b.beam_id for b in beams] == [f"{case_id}_beam_1", f"{case_id}_beam_2"]
    assert [b.beam_number for b in beams] == [11, 12]
    assert all(b.status == BeamStatus.PENDING and b.attempts == 0 for b in beams)
    stored = await store.list_deliveries(case_id)
    assert [d.beam_id for d in stored] == [f"{case_id}_beam_1", f"{case_id}_beam_2", None]
    assert stored[0].delivered_at == datetime(2026, 3, 1, 7, 1, tzinfo=UTC)
    assert stored[0].is_reference and not stored[2].is_reference


async def test_registering_twice_is_a_no_op(store: Store) -> None:
    first, is_new = await store.register_case(_case("c1"), _beams(2))
    again, again_new = await store.register_case(
        _case("c1", room="G1", priority=9),
        _beams(4),
        [NewDelivery(delivery_id="x", delivery_path="/x")],
    )
    assert is_new and not again_new
    assert again == first
    assert len(await store.list_beams("c1")) == 2
    assert await store.list_deliveries("c1") == []
    kinds = [e.kind for e in await store.recent_events(case_id="c1")]
    assert kinds == ["case_registered"]


async def test_a_taken_safe_name_is_refused_and_nothing_is_written(store: Store) -> None:
    await store.register_case(_case("c1"))
    with pytest.raises(ValueError, match="already used by case 'c1'"):
        await store.register_case(NewCase(case_id="c1 ", case_path="/x", safe_name="c1"), _beams(1))
    assert await store.get_case("c1 ") is None
    assert await store.get_beam("c1 _beam_1") is None


async def test_attach_plan_to_a_case_registered_without_beams(store: Store) -> None:
    await store.register_case(_case("c1", status=CaseStatus.WAITING))
    beams = await store.attach_plan(
        "c1",
        beams=_beams(3),
        deliveries=[NewDelivery(delivery_id="d", delivery_path="/d", treatment_beam_index=2)],
        plan_path="/data/c1/RP.dcm",
        gantry=2,
        patient_id="P1",
    )
    assert [b.beam_index for b in beams] == [1, 2, 3]
    case = await store.get_case("c1")
    assert case is not None
    assert (case.plan_path, case.gantry, case.patient_id) == ("/data/c1/RP.dcm", 2, "P1")
    assert [d.beam_id for d in await store.list_deliveries("c1")] == ["c1_beam_2"]
    # a second resolution (e.g. after a retry) keeps the beams it has
    assert await store.attach_plan("c1", beams=_beams(1)) == beams
    with pytest.raises(LookupError):
        await store.attach_plan("nope", beams=_beams(1))


async def test_transition_beam_writes_the_row_and_its_event_together(store: Store) -> None:
    await store.register_case(_case("c1"), _beams(1))
    beam = await store.transition_beam(
        "c1_beam_1",
        BeamStatus.UPLOADING,
        changes={"transfer_total_bytes": 1000, "progress": 5},
        message="uploading to gpu1",
        data={"host": "gpu1"},
    )
    assert (beam.status, beam.transfer_total_bytes, beam.progress) == (
        BeamStatus.UPLOADING,
        1000,
        5,
    )
    event = (await store.recent_events(limit=1))[0]
    assert (event.kind, event.case_id, event.beam_id, event.message) == (
        "beam_status",
        "c1",
        "c1_beam_1",
        "uploading to gpu1",
    )
    assert event.data == {"from": "pending", "to": "uploading", "host": "gpu1"}
    assert event.at == beam.updated_at


async def test_illegal_beam_transition_writes_nothing(store: Store) -> None:
    await store.register_case(_case("c1"), _beams(1))
    before = await store.get_beam("c1_beam_1")
    events_before = await store.recent_events()

    with pytest.raises(IllegalTransitionError):
        await store.transition_beam(
            "c1_beam_1", BeamStatus.RUNNING, changes={"host": "gpu1"}, message="skip ahead"
        )

    assert await store.get_beam("c1_beam_1") == before
    assert await store.recent_events() == events_before


async def test_unknown_or_protected_columns_are_refused(store: Store) -> None:
    await store.register_case(_case("c1"), _beams(1))
    for changes in ({"status": "running"}, {"attempts": 3}, {"beam_id": "x"}, {"nope; --": 1}):
        with pytest.raises(ValueError, match="cannot change"):
            await store.transition_beam("c1_beam_1", BeamStatus.UPLOADING, changes=changes)
    with pytest.raises(TypeError):
        await store.update_beam("c1_beam_1", {"not_before_at": "tomorrow"})
    with pytest.raises(ValueError, match="naive"):
        await store.update_beam("c1_beam_1", {"not_before_at": datetime(2026, 1, 1)})
    beam = await store.get_beam("c1_beam_1")
    assert beam is not None and beam.status == BeamStatus.PENDING
    with pytest.raises(LookupError):
        await store.transition_beam("nope", BeamStatus.UPLOADING)


async def test_update_beam_changes_values_without_an_event(store: Store) -> None:
    await store.register_case(_case("c1"), _beams(1))
    retry_at = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
    beam = await store.update_beam(
        "c1_beam_1",
        {
            "progress": 140,
            "outputs": ["/w/c1/dose/b1.dcm"],
            "gpu_uuids": ["GPU-1"],
            "not_before_at": retry_at,
        },
    )
    assert beam.progress == 100  # clamped
    assert beam.outputs == ("/w/c1/dose/b1.dcm",)
    assert beam.gpu_uuids == ("GPU-1",)
    assert beam.not_before_at == retry_at
    assert [e.kind for e in await store.recent_events()] == ["case_registered"]


async def test_pause_remembers_where_to_resume(store: Store) -> None:
    await store.register_case(_case("c1"), _beams(1))
    await store.transition_beam("c1_beam_1", BeamStatus.UPLOADING)
    paused = await store.transition_beam("c1_beam_1", BeamStatus.PAUSED, changes={"error": "h"})
    assert (paused.status, paused.resume_status) == (BeamStatus.PAUSED, BeamStatus.UPLOADING)
    still = await store.transition_beam("c1_beam_1", BeamStatus.PAUSED)
    assert still.resume_status == BeamStatus.UPLOADING
    for wrong in (BeamStatus.COMPLETED, BeamStatus.PAUSED):
        with pytest.raises(ValueError, match="cannot resume"):
            await store.transition_beam(
                "c1_beam_1", BeamStatus.PAUSED, changes={"resume_status": wrong}
            )
    with pytest.raises(ValueError, match="only by a transition to PAUSED"):
        await store.transition_beam(
            "c1_beam_1", BeamStatus.UPLOADING, changes={"resume_status": BeamStatus.QUEUED}
        )
    resumed = await store.transition_beam(
        "c1_beam_1", BeamStatus.UPLOADING, changes={"error": None}
    )
    assert (resumed.status, resumed.resume_status, resumed.error) == (
        BeamStatus.UPLOADING,
        None,
        None,
    )


async def test_case_transitions_are_checked_and_audited(store: Store) -> None:
    await store.register_case(_case("c1"))
    case = await store.transition_case(
        "c1", CaseStatus.FAILED, changes={"error": "missing_rtplan: no plan"}
    )
    assert (case.status, case.error) == (CaseStatus.FAILED, "missing_rtplan: no plan")
    with pytest.raises(IllegalTransitionError):
        await store.transition_case("c1", CaseStatus.COMPLETED)
    retried = await store.transition_case(
        "c1", CaseStatus.PENDING, changes={"error": None, "retry_count": 1}, message="retry"
    )
    assert (retried.status, retried.retry_count, retried.error) == (CaseStatus.PENDING, 1, None)
    messages = [e.message for e in await store.recent_events(case_id="c1")]
    assert messages == ["retry", "pending -> failed", "registered (0 beams, 0 deliveries)"]


async def test_list_cases_and_active_beams(store: Store) -> None:
    await store.register_case(_case("old"), _beams(2))
    await store.register_case(_case("new", priority=3), _beams(1))
    await store.register_case(_case("done"), _beams(1))
    await store.transition_beam("done_beam_1", BeamStatus.CANCELLED)
    await store.transition_beam("old_beam_2", BeamStatus.UPLOADING)
    await store.transition_beam("old_beam_2", BeamStatus.PAUSED)

    active = [b.beam_id for b in await store.list_active_beams()]
    assert active == ["new_beam_1", "old_beam_1", "old_beam_2"]  # priority, then age
    assert [c.case_id for c in await store.list_cases()] == ["old", "new", "done"]
    await store.transition_case("done", CaseStatus.CANCELLED)
    pending = await store.list_cases([CaseStatus.PENDING, CaseStatus.WAITING])
    assert [c.case_id for c in pending] == ["old", "new"]


async def test_a_failing_transaction_leaves_nothing(store: Store) -> None:
    await store.register_case(_case("c1"), _beams(2))
    with pytest.raises(RuntimeError, match="boom"):
        async with store.transaction() as tx:
            await tx.beams.transition("c1_beam_1", BeamStatus.UPLOADING)
            await tx.cases.transition("c1", CaseStatus.PROCESSING)
            raise RuntimeError("boom")
    beam = await store.get_beam("c1_beam_1")
    case = await store.get_case("c1")
    assert beam is not None and beam.status == BeamStatus.PENDING
    assert case is not None and case.status == CaseStatus.PENDING
    assert len(await store.recent_events()) == 1


async def test_a_cancelled_transaction_rolls_back_and_the_store_goes_on(store: Store) -> None:
    await store.register_case(_case("c1"), _beams(1))
    entered = asyncio.Event()

    async def stuck() -> None:
        async with store.transaction() as tx:
            await tx.beams.transition("c1_beam_1", BeamStatus.UPLOADING)
            entered.set()
            await asyncio.sleep(3600)

    task = asyncio.create_task(stuck())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    beam = await store.get_beam("c1_beam_1")
    assert beam is not None and beam.status == BeamStatus.PENDING
    assert (await store.transition_beam("c1_beam_1", BeamStatus.UPLOADING)).status == "uploading"


async def test_a_nested_transaction_in_one_task_is_refused(store: Store) -> None:
    async with store.transaction():
        with pytest.raises(RuntimeError, match="inside another"):
            async with store.transaction():
                pass


async def test_twenty_tasks_share_the_one_connection(store: Store) -> None:
    async def worker(n: int) -> None:
        async with store.transaction() as tx:
            await tx.cases.register(_case(f"c{n:02}"), _beams(2))
            await asyncio.sleep(0)  # let the other tasks try to interleave
            await tx.events.append("note", f"worker {n}", case_id=f"c{n:02}")
            await asyncio.sleep(0)
            await tx.beams.transition(f"c{n:02}_beam_1", BeamStatus.UPLOADING)

    async with asyncio.TaskGroup() as tg:
        for n in range(20):
            tg.create_task(worker(n))

    assert len(await store.list_cases()) == 20
    assert len(await store.list_active_beams()) == 40
    assert len(await store.recent_events(limit=1000)) == 60


async def test_a_clock_without_timezone_is_refused(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "mqi.db", now=lambda: datetime(2026, 1, 1)) as naive:
        with pytest.raises(ValueError, match="aware"):
            await naive.register_case(_case("c1"))


async def test_events_are_append_only_and_filtered(tmp_path: Path) -> None:
    path = tmp_path / "mqi.db"
    async with await Store.open(path) as store:
        await store.register_case(_case("c1"), _beams(2))
        for k in range(5):
            await store.append_event(
                "note", f"n{k}", case_id="c1", beam_id="c1_beam_2", data={"k": k}
            )
        recent = await store.recent_events(limit=3)
        assert [e.message for e in recent] == ["n4", "n3", "n2"]
        assert recent[0].data == {"k": 4}
        assert len(await store.recent_events(beam_id="c1_beam_2")) == 5
        assert await store.recent_events(beam_id="c1_beam_1") == []
    with sqlite3.connect(path) as raw, pytest.raises(sqlite3.IntegrityError, match="append-only"):
        raw.execute("UPDATE events SET message = 'rewritten'")
    raw.close()


async def test_command_lifecycle(store: Store) -> None:
    await store.register_case(_case("c1"))
    assert await store.enqueue_command(CommandKind.RETRY, "unknown") is None
    retry = await store.enqueue_command(CommandKind.RETRY, "c1")
    priority = await store.enqueue_command(CommandKind.PRIORITY, "c1", {"priority": 7})
    assert retry is not None and priority is not None
    assert retry.status == CommandStatus.PENDING and retry.payload == {}
    with pytest.raises(ValueError, match="priority"):
        await store.enqueue_command(CommandKind.PRIORITY, "c1", {"priority": "high"})

    pending = await store.pending_commands()
    assert [(c.kind, c.payload) for c in pending] == [
        (CommandKind.RETRY, {}),
        (CommandKind.PRIORITY, {"priority": 7}),
    ]
    done = await store.finish_command(retry.command_id, CommandStatus.DONE, "case queued again")
    assert (done.status, done.result) == (CommandStatus.DONE, "case queued again")
    assert done.done_at is not None and done.done_at > done.requested_at
    rejected = await store.finish_command(priority.command_id, CommandStatus.REJECTED, "no")
    assert rejected.status == CommandStatus.REJECTED
    assert await store.pending_commands() == []
    with pytest.raises(IllegalTransitionError):
        await store.finish_command(retry.command_id, CommandStatus.REJECTED, "again")
    with pytest.raises(ValueError):
        await store.finish_command(retry.command_id, CommandStatus.PENDING, "back")
    kinds = [e.kind for e in await store.recent_events(case_id="c1")]
    assert kinds.count("command_enqueued") == 2 and kinds.count("command_finished") == 2


async def test_cancel_at_any_point_leaves_the_connection_usable(tmp_path: Path) -> None:
    import asyncio
    import contextlib

    async with await Store.open(tmp_path / "cancel.db") as store:
        for yields in range(12):
            for _ in range(5):
                task = asyncio.create_task(store.pending_commands())
                for _ in range(yields):
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        assert await store.pending_commands() == []
        async with store.transaction() as tx:
            assert await tx.commands.pending() == []
