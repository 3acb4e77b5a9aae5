"""CaseWatcher on a real directory with real watchfiles (inotify and polling); no engine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from mqi_async.config import IngestSettings, Settings, SimulatedHostSettings
from mqi_async.demo.cases import CaseSpec, WrittenCase, write_case
from mqi_async.domain.records import NewCase, SkippedFolder
from mqi_async.engine.engine import Engine
from mqi_async.ingest.layout import READY_MARKER, safe_name
from mqi_async.ingest.reader import CaseReader, FoundCase, printable_path
from mqi_async.ingest.watcher import CaseWatcher, OnSkipped
from mqi_async.service import SystemClock, engine_settings
from mqi_async.store import Store
from mqi_async.store.events import CASE_REGISTERED
from mqi_async.tools import DoseWorker, LocalToolRunner, Tools

#: generous: these only bound a wait, they are never what a test asserts
DEADLINE_S = 30.0
#: how long "nothing happened" is watched for; longer than the watcher's debounce (0.2 s)
QUIET_S = 1.0

MODES = [pytest.param(False, id="inotify"), pytest.param(True, id="polling")]


@dataclass
class Recorder:
    """The watcher's `on_case`: remembers every report, in order."""

    reports: list[tuple[float, FoundCase, bool]] = field(default_factory=list)
    forward: Callable[[FoundCase, bool], object] | None = None

    async def __call__(self, case: FoundCase, new_ptn: bool) -> None:
        self.reports.append((time.monotonic(), case, new_ptn))
        if self.forward is not None:
            result = self.forward(case, new_ptn)
            if asyncio.iscoroutine(result):
                await result

    @property
    def case_ids(self) -> set[str]:
        return {case.case_id for _, case, _ in self.reports}

    @property
    def case_paths(self) -> set[str]:
        return {case.case_path for _, case, _ in self.reports}

    def count(self, case_path: Path) -> int:
        return sum(1 for _, case, _ in self.reports if case.case_path == str(case_path))

    async def wait_for(self, *case_paths: Path, timeout_s: float = DEADLINE_S) -> None:
        wanted = {str(p) for p in case_paths}
        deadline = time.monotonic() + timeout_s
        while not wanted <= self.case_paths:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not reported within {timeout_s} s: {sorted(wanted - self.case_paths)};"
                    f" reported: {sorted(self.case_paths)}"
                )
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def watching(
    root: Path,
    recorder: Recorder,
    *,
    force_polling: bool = False,
    rescan_seconds: float = 3600,
    on_skipped: OnSkipped | None = None,
) -> AsyncIterator[CaseWatcher]:
    """A running CaseWatcher whose startup scan is done; the periodic rescan is out of reach."""
    settings = IngestSettings(
        force_polling=force_polling, rescan_seconds=rescan_seconds, poll_delay_ms=100
    )
    watcher = CaseWatcher(root, settings, recorder, on_skipped)
    task = asyncio.create_task(watcher.run())
    deadline = time.monotonic() + DEADLINE_S
    while watcher.last_scan_s is None:
        if task.done():
            task.result()
        assert time.monotonic() < deadline, "the startup scan did not finish"
        await asyncio.sleep(0.02)
    try:
        yield watcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def marker_of(case: WrittenCase) -> Path:
    return (case.case_dir.parent if case.spec.nested else case.case_dir) / READY_MARKER


def spec(case_id: str, **kw: Any) -> CaseSpec:
    """A small case (2 beams of 2 layers)."""
    small = CaseSpec(case_id=case_id, beams=2, layers_per_beam=2, samples_per_layer=8)
    return replace(small, **kw)


def template(tmp: Path, s: CaseSpec) -> tuple[WrittenCase, list[tuple[Path, bytes]]]:
    """A case written outside the scan dir without its marker, and its files in copy order:
    the RTPLAN first, then each delivery folder's files."""
    case = write_case(tmp, s)
    files = sorted(
        (p for p in tmp.rglob("*") if p.is_file()),
        key=lambda p: (p.suffix != ".dcm", str(p)),
    )
    return case, [(p.relative_to(tmp), p.read_bytes()) for p in files]


# -- a case arriving slowly -----------------------------------------------------------------


@pytest.mark.slow
async def test_case_copied_file_by_file_is_taken_only_after_its_marker(tmp_path: Path) -> None:
    root = tmp_path / "incoming"
    root.mkdir()
    flat, flat_files = template(
        tmp_path / "t1", spec("FLAT01", nested=False, room="G2", write_marker=False, seed=1)
    )
    nested, nested_files = template(
        tmp_path / "t2", spec("NEST01", nested=True, room="G1", write_marker=False, seed=2)
    )
    recorder = Recorder()

    async def copy_slowly(files: list[tuple[Path, bytes]], over_s: float) -> None:
        pause = over_s / len(files)
        for relative, data in files:
            target = root / relative
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(target.write_bytes, data)
            await asyncio.sleep(pause)
            assert not recorder.reports, f"taken before its marker: {recorder.reports}"

    async with watching(root, recorder):
        await asyncio.gather(copy_slowly(flat_files, 5.0), copy_slowly(nested_files, 5.0))
        # the whole case is there, a case folder by the layout rules, but not marked
        await asyncio.sleep(QUIET_S)
        assert not recorder.reports
        flat_case_dir = root / flat.case_dir.relative_to(tmp_path / "t1")
        nested_case_dir = root / nested.case_dir.relative_to(tmp_path / "t2")
        (root / marker_of(flat).relative_to(tmp_path / "t1")).write_text("")
        await recorder.wait_for(flat_case_dir)
        assert recorder.case_paths == {str(flat_case_dir)}
        (root / marker_of(nested).relative_to(tmp_path / "t2")).write_text("")
        await recorder.wait_for(nested_case_dir)

    by_path = {case.case_path: case for _, case, _ in recorder.reports}
    assert by_path[str(flat_case_dir)] == FoundCase(
        case_id="FLAT01",
        case_path=str(flat_case_dir),
        room="G2",
        safe_name="FLAT01",
        delivery_folders=len(flat.delivery_dirs),
    )
    # nested: the case is the patient, the case path the study folder
    study = nested_case_dir.name
    assert by_path[str(nested_case_dir)] == FoundCase(
        case_id="NEST01",
        case_path=str(nested_case_dir),
        room="G1",
        safe_name="NEST01",
        study_case_id=f"NEST01/{study}",
        study_safe_name=safe_name(f"NEST01/{study}"),
        delivery_folders=len(nested.delivery_dirs),
    )


@pytest.mark.parametrize("force_polling", MODES)
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
async def test_marker_written_last_makes_the_case(
    tmp_path: Path, force_polling: bool, nested: bool
) -> None:
    root = tmp_path / "incoming"
    recorder = Recorder()
    async with watching(root, recorder, force_polling=force_polling):
        case = await asyncio.to_thread(
            write_case, root, spec("P0001", nested=nested, write_marker=False)
        )
        await asyncio.sleep(QUIET_S)
        assert not recorder.reports
        marker_of(case).write_text("")
        await recorder.wait_for(case.case_dir)
    assert recorder.case_ids == {"P0001"}


# -- many events, one registration ----------------------------------------------------------


async def test_marked_case_with_hundreds_of_events_is_registered_once(tmp_path: Path) -> None:
    root = tmp_path / "incoming"
    store = await Store.open(tmp_path / "db" / "mqi.db")
    try:
        settings = Settings(
            scan_directory=root,
            work_directory=tmp_path / "work",
            database=tmp_path / "db" / "mqi.db",
            hosts=[SimulatedHostSettings(kind="simulated", name="sim")],
        )
        engine = Engine(
            store=store,
            hosts={},
            tools=LocalToolRunner(
                Tools(settings.tools),
                settings.tools,
                dict(settings.moqui),
                DoseWorker(timeout_s=60),
            ),
            source=CaseReader(
                scan_directory=settings.scan_directory, fraction_window=timedelta(minutes=60)
            ),
            clock=SystemClock(),
            settings=engine_settings(settings, {}, bytes(32)),
        )

        async def register(case: FoundCase, new_ptn: bool) -> None:
            await engine.register_case(
                case_id=case.case_id,
                case_path=case.case_path,
                room=case.room,
                safe_name=case.safe_name,
                new_ptn=new_ptn,
            )

        recorder = Recorder(forward=register)
        async with watching(root, recorder) as watcher:
            case = await asyncio.to_thread(write_case, root, spec("00000042", beams=3))
            await recorder.wait_for(case.case_dir)

            def storm() -> int:
                events = 0
                for round_ in range(10):
                    for delivery in case.delivery_dirs:
                        for ptn in sorted(delivery.glob("*.ptn")):
                            ptn.write_bytes(ptn.read_bytes())
                            events += 1
                        (delivery / "PlanInfo.txt").write_bytes(
                            (delivery / "PlanInfo.txt").read_bytes()
                        )
                        (delivery / f"extra_{round_:02d}.ptn").write_bytes(b"\0" * 64)
                        events += 2
                    assert case.rtplan_path is not None
                    os.utime(case.rtplan_path)
                    marker_of(case).write_text("")
                    events += 2
                    time.sleep(0.05)
                return events

            events = await asyncio.to_thread(storm)
            assert events >= 200
            # every event is in by the time a file written after them all is reported
            last = case.delivery_dirs[0] / "last.ptn"
            reports = len(recorder.reports)
            last.write_bytes(b"\0" * 64)
            deadline = time.monotonic() + DEADLINE_S
            while not any(new for _, _, new in recorder.reports[reports:]):
                assert time.monotonic() < deadline, "the last new .ptn was not reported"
                await asyncio.sleep(0.05)
            # and full scans report it again
            for _ in range(3):
                await watcher.scan()

        assert recorder.count(case.case_dir) >= 5
        assert any(new for _, _, new in recorder.reports), "a new .ptn is flagged as new_ptn"
        rows = await store.list_cases()
        assert [(r.case_id, r.case_path, r.room) for r in rows] == [
            ("00000042", str(case.case_dir), "G1")
        ]
        registered = [
            e
            for e in await store.recent_events(1000, case_id="00000042")
            if e.kind == CASE_REGISTERED
        ]
        assert len(registered) == 1
        # the store's own answer to a repeat
        found = recorder.reports[0][1]
        again = NewCase(
            case_id=found.case_id,
            case_path=found.case_path,
            room=found.room,
            safe_name=found.safe_name,
        )
        for _ in range(3):
            row, created = await store.register_case(again)
            assert created is False and row.case_id == "00000042"
    finally:
        await store.aclose()


# -- what is never a case -------------------------------------------------------------------

STAGING_NAMES = ("x.extracting", "extract_1.tmp", "a.zip.tmp", "b.backup.20250106")


@pytest.mark.parametrize("force_polling", MODES)
async def test_staging_folders_are_ignored(tmp_path: Path, force_polling: bool) -> None:
    root = tmp_path / "incoming"
    # before the start (startup scan): a staging folder as the case folder, and above it
    for i, name in enumerate(STAGING_NAMES):
        write_case(root, spec(name, nested=False, room="", seed=i))
        write_case(root / name, spec(f"PAT{i}", nested=True, room="G1", seed=10 + i))
    recorder = Recorder()
    async with watching(root, recorder, force_polling=force_polling):
        assert not recorder.reports
        # while running (events): the same again, in a room folder
        for i, name in enumerate(STAGING_NAMES):
            await asyncio.to_thread(
                write_case, root, spec(name, nested=False, room="G2", seed=20 + i)
            )
            await asyncio.to_thread(
                write_case, root / "G1" / name, spec(f"PAT{i}", nested=False, room="", seed=30 + i)
            )
        good = await asyncio.to_thread(write_case, root, spec("GOOD", room="G2", seed=99))
        await recorder.wait_for(good.case_dir)
        await asyncio.sleep(QUIET_S)
        assert recorder.case_ids == {"GOOD"}
        # the transfer publishes by renaming the staging folder: now it is a case
        os.rename(root / "G2" / "x.extracting", root / "G2" / "x")
        await recorder.wait_for(root / "G2" / "x")
    assert recorder.case_ids == {"GOOD", "x"}


@pytest.mark.parametrize("force_polling", MODES)
async def test_startup_scan_finds_ready_cases_and_never_a_room_or_the_scan_dir(
    tmp_path: Path, force_polling: bool
) -> None:
    root = tmp_path / "incoming"
    cases = [
        write_case(root, spec("N1", nested=True, room="G1", seed=1)),
        write_case(root, spec("N2", nested=True, room="G2", seed=2)),
        write_case(root, spec("N3", nested=True, room="", seed=3)),
        write_case(root, spec("F1", nested=False, room="G1", seed=4)),
        write_case(root, spec("F2", nested=False, room="", seed=5)),
        # a patient who is called G1, in room G2
        write_case(root, spec("G1", nested=True, room="G2", seed=6)),
    ]
    # two studies of one patient: two folders, one case id
    second_study = write_case(root, spec("N1", nested=True, room="G1", seed=7))
    not_ready = write_case(root, spec("U1", nested=True, write_marker=False, seed=8))
    # a bare room folder that looks like a flat case (plan, delivery folder, marker) ...
    write_case(root, spec("G1", nested=False, room="", seed=9))
    # ... and the scan dir itself looking like one
    write_case(tmp_path, spec("incoming", nested=False, room="", seed=10))
    assert (root / "G1" / READY_MARKER).is_file() and (root / READY_MARKER).is_file()

    recorder = Recorder()
    async with watching(root, recorder, force_polling=force_polling) as watcher:
        expected = {str(c.case_dir) for c in [*cases, second_study]}
        assert recorder.case_paths == expected
        assert len(recorder.reports) == len(expected)
        by_path = {c.case_path: c for _, c, _ in recorder.reports}
        assert by_path[str(second_study.case_dir)].case_id == "N1"
        assert by_path[str(cases[5].case_dir)].case_id == "G1"
        assert by_path[str(cases[5].case_dir)].room == "G2"
        assert {c.room for c in by_path.values()} == {"G1", "G2", ""}
        # touching the room's and the scan dir's markers marks nothing new
        (root / "G1" / READY_MARKER).write_text("again")
        (root / READY_MARKER).write_text("again")
        # the not-ready case is taken once marked (nothing else new appears)
        marker_of(not_ready).write_text("")
        await recorder.wait_for(not_ready.case_dir)
        await asyncio.sleep(QUIET_S)
        assert recorder.case_paths == expected | {str(not_ready.case_dir)}
        assert watcher.last_scan_s is not None


# -- files made right after mkdir -p --------------------------------------------------------


@pytest.mark.parametrize("force_polling", MODES)
async def test_files_written_right_after_mkdir_p_are_found(
    tmp_path: Path, force_polling: bool
) -> None:
    """inotify misses files made in a folder before its watch is added (platform.md §5):
    a new folder is scanned when it appears. Odd names too: the default watchfiles filter
    would drop the folder events of names like `p~` or `.#q`."""
    root = tmp_path / "incoming"
    layouts = [
        # (relative target of the template's top folder, template spec)
        ("G2", spec("P1", nested=True, room="G2", seed=1)),  # a new room folder
        ("G1", spec("P2", nested=True, room="G1", seed=2)),
        ("a/b/c", spec("F3", nested=False, room="", seed=3)),
        ("d/G1", spec("p~", nested=True, room="G1", seed=4)),
        ("e", spec(".#q", nested=False, room="", seed=5)),
        ("f", spec("x.swp", nested=True, room="", seed=6)),
    ]
    blobs: list[tuple[list[tuple[Path, bytes]], Path]] = []
    for i, (target, s) in enumerate(layouts):
        src = tmp_path / f"t{i}"
        case, files = template(src, s)
        top = src / s.room if s.room else src
        case_dir = root / target / case.case_dir.relative_to(top)
        marker = root / target / marker_of(case).relative_to(top)
        moved = [(root / target / rel.relative_to(top.relative_to(src)), d) for rel, d in files]
        moved.append((marker, b""))
        blobs.append(([(p.relative_to(root), d) for p, d in moved], case_dir))

    def burst(files: list[tuple[Path, bytes]]) -> None:
        for relative, data in files:
            os.makedirs(root / relative.parent, exist_ok=True)
            (root / relative).write_bytes(data)

    recorder = Recorder()
    async with watching(root, recorder, force_polling=force_polling):
        for files, _ in blobs:
            await asyncio.to_thread(burst, files)
        await recorder.wait_for(*(case_dir for _, case_dir in blobs))
    assert recorder.case_ids == {"P1", "P2", "F3", "p~", ".#q", "x.swp"}


@pytest.mark.parametrize("bad_first", [True, False], ids=["bad-at-start", "bad-later"])
async def test_a_folder_name_that_is_not_utf8_stops_nothing(
    tmp_path: Path, bad_first: bool
) -> None:
    """A case folder named in a Windows code page (not UTF-8) breaks watchfiles (every
    batch holding it fails; inotify cannot even start while it exists) and cannot go into
    SQLite. It is never reported as a case: every full scan lists it as skipped
    (`folder_name_not_utf8`), the watcher goes on by polling, events inside it are passed
    over, and every other case is registered, by the startup scan and by events."""
    root = tmp_path / "incoming"
    bad_name = os.fsdecode("환자-a".encode("cp949"))
    bad_dir = root / "G1" / bad_name

    def write_bad() -> None:
        write_case(tmp_path / "t", spec("tmp-name", nested=False, room="G1", seed=1))
        (root / "G1").mkdir(parents=True, exist_ok=True)
        os.rename(tmp_path / "t" / "G1" / "tmp-name", bad_dir)

    if bad_first:
        write_bad()
    write_case(root, spec("b-good", nested=False, room="G1", seed=2))
    store = await Store.open(tmp_path / "mqi.db")
    skipped_lists: list[list[SkippedFolder]] = []
    try:

        async def register(case: FoundCase, new_ptn: bool) -> None:
            await store.register_case(
                NewCase(
                    case_id=case.case_id,
                    case_path=case.case_path,
                    room=case.room,
                    safe_name=case.safe_name,
                )
            )

        async def on_skipped(folders: list[SkippedFolder]) -> None:
            skipped_lists.append(folders)

        recorder = Recorder(forward=register)
        async with watching(root, recorder, on_skipped=on_skipped) as watcher:
            assert recorder.case_ids == {"b-good"}
            startup = skipped_lists[-1]
            if bad_first:
                assert [(f.path, f.reason) for f in startup] == [
                    (printable_path(str(bad_dir)), "folder_name_not_utf8")
                ]
                assert "\\x" in startup[0].path  # printable: the cp949 bytes escaped
            else:
                assert startup == []
                await asyncio.to_thread(write_bad)
            # an event inside the bad folder is passed over; the watcher goes on
            (bad_dir / "transfer.log").write_text("again")
            late = await asyncio.to_thread(
                write_case, root, spec("c-late", nested=False, room="G1", seed=3)
            )
            await recorder.wait_for(late.case_dir)
            assert recorder.count(bad_dir) == 0
            # the next full scan lists it, whenever it arrived
            await watcher.scan()
            assert [f.reason for f in skipped_lists[-1]] == ["folder_name_not_utf8"]
            assert watcher.force_polling
        assert sorted(r.case_id for r in await store.list_cases()) == ["b-good", "c-late"]
        assert safe_name(bad_name) != bad_name
    finally:
        await store.aclose()
