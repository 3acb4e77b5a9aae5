"""Opening the database: new files, migrations, damaged and foreign files, locks, read-only use."""

from __future__ import annotations

import hashlib
import os
import random
import sqlite3
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import aiosqlite
import pytest

from mqi_async.domain.errors import DatabaseError
from mqi_async.domain.model import BeamStatus, CaseStatus
from mqi_async.store import (
    SCHEMA_VERSION,
    CommandKind,
    NewBeam,
    NewCase,
    Store,
    read_status_snapshot,
    submit_command,
)
from mqi_async.store.schema import APPLICATION_ID, MIGRATIONS, migrate


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sidecars(path: Path) -> list[str]:
    return sorted(
        p.name for p in path.parent.iterdir() if p.name in (f"{path.name}-wal", f"{path.name}-shm")
    )


def _case(case_id: str) -> NewCase:
    return NewCase(case_id=case_id, case_path=f"/data/{case_id}", safe_name=case_id)


async def _filled_db(path: Path, cases: int = 300) -> None:
    """A real database with enough rows to span many pages, closed cleanly."""
    async with await Store.open(path) as store, store.transaction() as tx:
        for i in range(cases):
            await tx.cases.register(
                _case(f"case{i:05}"), [NewBeam(beam_index=k, beam_number=k) for k in (1, 2, 3)]
            )


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """Modes must not depend on the umask: run with the most permissive one."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("umask_zero")
async def test_new_database_and_its_directories_are_private(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "mqi.db"
    async with await Store.open(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        await store.register_case(_case("c1"))
        for directory in (tmp_path / "a", tmp_path / "a" / "b"):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        for name in ("mqi.db", "mqi.db-wal", "mqi.db-shm"):
            assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
    assert _sidecars(path) == []  # a clean close checkpoints and removes the WAL


async def test_connection_pragmas(tmp_path: Path) -> None:
    async with await Store.open(tmp_path / "mqi.db") as store:
        conn = store._conn  # the settings are only visible on the connection itself
        assert conn is not None
        values = {}
        for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys"):
            values[name] = list(await conn.execute_fetchall(f"PRAGMA {name}"))[0][0]
    assert values == {
        "journal_mode": "wal",
        "synchronous": 2,  # FULL: a recorded launch survives power loss
        "busy_timeout": 5000,
        "foreign_keys": 1,
    }


async def test_fresh_database_is_at_current_version(tmp_path: Path) -> None:
    path = tmp_path / "mqi.db"
    async with await Store.open(path):
        pass
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert {
        "cases",
        "beams",
        "deliveries",
        "runs",
        "gpus",
        "leases",
        "events",
        "commands",
    } <= tables


async def test_migration_from_v1_keeps_data(tmp_path: Path) -> None:
    path = tmp_path / "mqi.db"
    # build a database exactly as the v1 code left it, with data in it
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        assert await migrate(conn, path=str(path), target_version=1) == 1
        at = "2026-01-02T03:04:05.000000Z"
        await conn.execute(
            "INSERT INTO cases (case_id, safe_name, case_path, room, status, progress,"
            " created_at, updated_at) VALUES ('old', 'old', '/data/old', 'G1', 'processing', 40,"
            " ?, ?)",
            (at, at),
        )
        await conn.execute(
            "INSERT INTO beams (beam_id, case_id, beam_index, beam_number, status, progress,"
            " attempts, created_at, updated_at)"
            " VALUES ('old_beam_1', 'old', 1, 7, 'running', 40, 1, ?, ?)",
            (at, at),
        )
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 1
        columns = {r[1] for r in raw.execute("PRAGMA table_info(cases)")}
    raw.close()
    assert "priority" not in columns

    async with await Store.open(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        case = await store.get_case("old")
        assert case is not None
        assert (case.status, case.progress, case.priority, case.room) == (
            CaseStatus.PROCESSING,
            40,
            0,
            "G1",
        )
        beam = await store.get_beam("old_beam_1")
        assert beam is not None
        assert (beam.status, beam.beam_number, beam.attempts) == (BeamStatus.RUNNING, 7, 1)
        assert (beam.gpu_indices, beam.attempts_base) == ((), 0)
        await store.update_case("old", {"priority": 5})
        assert [c.priority for c in await store.list_cases()] == [5]
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    raw.close()
    assert "idx_cases_queue" in indexes


def test_migrations_are_numbered_in_order() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    assert len(MIGRATIONS) == SCHEMA_VERSION


async def test_newer_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "mqi.db"
    async with await Store.open(path):
        pass
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 7}")
    raw.close()
    before = _sha256(path)
    with pytest.raises(DatabaseError) as caught:
        await Store.open(path)
    assert caught.value.code == "database_version"
    assert f"v{SCHEMA_VERSION + 7}" in caught.value.detail
    assert "newer" in caught.value.detail
    with pytest.raises(DatabaseError):
        await Store.open_readonly(path)
    assert _sha256(path) == before
    assert _sidecars(path) == []


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(1).randbytes(64 * 1024))


def _text_file(path: Path) -> None:
    path.write_text("scan_directory: data/incoming\n" * 100)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage_page(path: Path) -> None:
    # garbage from the middle of page 3 over the header of page 4 (4096-byte pages)
    data = path.read_bytes()
    start = 2 * 4096 + 2048
    path.write_bytes(data[:start] + random.Random(2).randbytes(4096) + data[start + 4096 :])


def _foreign_sqlite(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE cases (case_id TEXT PRIMARY KEY, status TEXT)")
        raw.execute("INSERT INTO cases VALUES ('x', 'PENDING')")
    raw.close()


@pytest.mark.parametrize(
    "damage",
    [_random_bytes, _text_file, _truncated, _garbage_page, _foreign_sqlite],
    ids=["random-bytes", "text-file", "truncated", "garbage-page", "foreign-sqlite"],
)
async def test_damaged_file_is_refused_and_left_byte_for_byte(
    tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    path = tmp_path / "mqi.db"
    await _filled_db(path)
    damage(path)
    before = _sha256(path)
    listing = sorted(p.name for p in tmp_path.iterdir())

    with pytest.raises(DatabaseError) as caught:
        await Store.open(path)

    assert caught.value.code == "database_damaged"
    assert str(path) in caught.value.detail
    assert "restore a backup or move the file aside" in caught.value.detail
    assert _sha256(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no -wal, -shm or lock


async def test_damaged_file_read_by_the_cli_is_a_named_error(tmp_path: Path) -> None:
    path = tmp_path / "mqi.db"
    _random_bytes(path)
    before = _sha256(path)
    with pytest.raises(DatabaseError) as caught:
        await read_status_snapshot(path)
    assert caught.value.code == "database_damaged"
    assert _sha256(path) == before
    assert _sidecars(path) == []


async def test_empty_file_becomes_a_new_database(tmp_path: Path) -> None:
    path = tmp_path / "mqi.db"
    path.touch()
    async with await Store.open(path) as store:
        assert store.schema_version == SCHEMA_VERSION


async def test_second_service_on_the_same_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "mqi.db"
    first = await Store.open(path)
    try:
        with pytest.raises(DatabaseError) as caught:
            await Store.open(path)
        assert caught.value.code == "already_running"
    finally:
        await first.aclose()
    async with await Store.open(path) as again:
        assert again.schema_version == SCHEMA_VERSION


async def test_cli_reads_of_a_missing_database_create_nothing(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "mqi.db"
    assert await read_status_snapshot(path) == []
    assert await submit_command(path, CommandKind.RETRY, "c1") is None
    with pytest.raises(DatabaseError) as caught:
        await Store.open_readonly(path)
    assert caught.value.code == "database_missing"
    assert not (tmp_path / "nowhere").exists()


async def test_cli_reads_and_writes_while_the_service_runs(tmp_path: Path) -> None:
    path = tmp_path / "mqi.db"
    async with await Store.open(path) as service:
        await service.register_case(_case("c1"), [NewBeam(beam_index=1, beam_number=3)])

        cases = await read_status_snapshot(path)
        assert [c.case_id for c in cases] == ["c1"]
        assert [b.beam_number for b in cases[0].beams] == [3]

        command = await submit_command(path, CommandKind.CANCEL, "c1")
        assert command is not None
        assert await submit_command(path, CommandKind.CANCEL, "unknown") is None
        assert [c.command_id for c in await service.pending_commands()] == [command.command_id]

        async with await Store.open_readonly(path) as reader:
            assert reader.is_readonly
            assert len(await reader.snapshot()) == 1
            with pytest.raises(RuntimeError, match="read-only"):
                async with reader.transaction():
                    pass
            async with reader.read() as tx:
                with pytest.raises(RuntimeError):
                    await tx.events.append("note", "a read cannot write")


async def test_cli_read_of_a_closed_database_leaves_no_files(tmp_path: Path) -> None:
    path = tmp_path / "mqi.db"
    async with await Store.open(path) as service:
        await service.register_case(_case("c1"))
    before = _sha256(path)
    assert [c.case_id for c in await read_status_snapshot(path)] == ["c1"]
    assert _sha256(path) == before
    assert _sidecars(path) == []


async def test_cli_refuses_a_database_the_service_has_not_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "mqi.db"
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        await migrate(conn, path=str(path), target_version=1)
    with pytest.raises(DatabaseError) as caught:
        await read_status_snapshot(path)
    assert caught.value.code == "database_version"
    assert "start the service" in caught.value.detail
    with pytest.raises(DatabaseError):
        await submit_command(path, CommandKind.RETRY, "c1")
