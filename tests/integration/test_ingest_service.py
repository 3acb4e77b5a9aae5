"""Ingest through the whole service (watcher → engine → simulated SSH host): broken cases
fail with their code, odd folder names run to an RT Dose, and the service keeps going."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
import pytest

from mqi_async.config import (
    GpuSettings,
    IngestSettings,
    LoggingSettings,
    QaSettings,
    RetrySettings,
    RunsSettings,
    Settings,
    SimulatedHostSettings,
    default_moqui,
)
from mqi_async.demo.cases import Breakage, CaseSpec, WrittenCase, write_case
from mqi_async.ingest.layout import READY_MARKER
from mqi_async.ingest.reader import scan_tree
from mqi_async.service import Service
from mqi_async.store.snapshot import CaseSnapshot
from tests.e2e import SMALL_PHANTOM, running_service, wait_until

#: an RT Dose
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"

#: every breakage the watcher can see: the generated folder is still a case folder (a
#: `.dcm` and a delivery folder). `missing_deliveries` leaves only an empty delivery
#: folder, so no case appears and nothing is registered (tested below).
VISIBLE = [b for b in Breakage if b not in (Breakage.NONE, Breakage.MISSING_DELIVERIES)]

#: a fresh tag per run, so a leftover from an earlier run cannot pass or fail this one
TAG = uuid.uuid4().hex[:10]
#: `cd` with no argument goes home; enough `cd ..` reach `/`; so this is `touch /tmp/…`
#: written without a slash, which no folder name can hold
TO_TMP = "cd;cd ..;cd ..;cd ..;cd ..;cd ..;cd tmp"
#: (layout, patient-or-case folder name, study folder name for the nested layout)
ODD_NAMES: list[tuple[str, str, str | None]] = [
    ("flat", "a b  'single' \"double\" ünï 환자 ✓", None),
    ("nested", f"$({TO_TMP};touch pwned_{TAG}_a)", f"study `{TO_TMP};touch pwned_{TAG}_b`"),
    ("flat", f"`{TO_TMP};touch pwned_{TAG}_c`; x && y | z > w", None),
    ("nested", f"$(touch pwned_{TAG}_d) ${{HOME}} %s \\n *?[]", f'it\'s "$(touch pwned_{TAG}_e)"'),
    ("flat", "-rf line\nbreak\ttab ..", None),
]
#: a folder named in a Windows code page (CP949), not UTF-8
NOT_UTF8 = os.fsdecode("환자 홍길동".encode("cp949"))


def service_settings(root: Path) -> Settings:
    return Settings(
        scan_directory=root / "incoming",
        work_directory=root / "work",
        database=root / "mqi.db",
        # the periodic rescan is out of reach: cases come in by events
        ingest=IngestSettings(rescan_seconds=3600, poll_delay_ms=100),
        hosts=[SimulatedHostSettings(kind="simulated", name="sim", gpus=4, run_seconds=0.3)],
        gpu=GpuSettings(poll_seconds=1),
        runs=RunsSettings(poll_seconds=0.3, timeout_seconds=120),
        retry=RetrySettings(max_attempts=2, backoff_initial_seconds=0.2, backoff_max_seconds=1),
        moqui={**default_moqui(), **SMALL_PHANTOM},
        logging=LoggingSettings(directory=root / "logs"),
        qa=QaSettings(reference="none", report=False),
        config_dir=root,
    )


def small(case_id: str, **kw: Any) -> CaseSpec:
    """A one-layer case delivered hours ago (its fraction window is closed)."""
    first = (datetime.now() - timedelta(hours=3)).replace(microsecond=0)
    spec = CaseSpec(
        case_id=case_id, beams=1, layers_per_beam=1, samples_per_layer=8, first_delivery_at=first
    )
    return replace(spec, **kw)


def drop_renamed(
    scan: Path, staging: Path, layout: str, name: str, study: str | None, seed: int
) -> Path:
    """Write a case in a staging folder outside the scan dir under a plain name, move it in
    under the odd name, then write its marker. Returns the case path (the study folder)."""
    nested = layout == "nested"
    case = write_case(
        staging, small(f"ODD{seed}", nested=nested, room="G2", write_marker=False, seed=seed)
    )
    (scan / "G2").mkdir(parents=True, exist_ok=True)
    if nested:
        assert study is not None
        patient = scan / "G2" / name
        os.rename(case.case_dir, case.case_dir.parent / study)
        os.rename(case.case_dir.parent, patient)
        (patient / READY_MARKER).write_text("")
        return patient / study
    target = scan / "G2" / name
    os.rename(case.case_dir, target)
    (target / READY_MARKER).write_text("")
    return target


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass(frozen=True)
class Outcome:
    not_utf8: CaseSnapshot | None
    broken: dict[Breakage, CaseSnapshot]
    odd: dict[str, CaseSnapshot]
    last: CaseSnapshot
    root: Path
    still_running: bool
    watcher_problems: list[str]
    registered: list[str]
    skipped: dict[str, str]
    not_utf8_path: str


def _terminal(case: CaseSnapshot | None) -> bool:
    return case is not None and str(case.status) in ("completed", "failed", "cancelled")


async def _scenario(root: Path) -> Outcome:
    settings = service_settings(root)
    scan = settings.scan_directory
    staging = root / "staging"
    records = Records()
    logging.getLogger("mqi_async").addHandler(records)
    try:
        async with running_service(settings) as service:

            async def cases() -> dict[str, CaseSnapshot]:
                return {c.case_path: c for c in await service.store.snapshot()}

            broken: dict[Breakage, WrittenCase] = {}
            for i, breakage in enumerate(VISIBLE):
                spec = small(
                    f"BRK{i:02d}_{breakage}",
                    beams=2,
                    breakage=breakage,
                    nested=i % 2 == 0,
                    room=("G1", "G2", "")[i % 3],
                    seed=i,
                )
                broken[breakage] = await asyncio.to_thread(write_case, scan, spec)
            # the case the watcher cannot see: it must not disturb anything
            await asyncio.to_thread(
                write_case, scan, small("NOCASE", beams=2, breakage=Breakage.MISSING_DELIVERIES)
            )
            odd: dict[str, Path] = {}
            for i, (layout, name, study) in enumerate(ODD_NAMES):
                odd[name] = await asyncio.to_thread(
                    drop_renamed, scan, staging / str(i), layout, name, study, 100 + i
                )
            not_utf8 = await asyncio.to_thread(
                drop_renamed, scan, staging / "cp949", "flat", NOT_UTF8, None, 200
            )

            async def all_settled() -> bool:
                now = await cases()
                paths = [str(c.case_dir) for c in broken.values()] + [str(p) for p in odd.values()]
                return all(_terminal(now.get(p)) for p in paths)

            await wait_until(all_settled, timeout_s=180, what="every dropped case to end")
            # a good case dropped afterwards still runs to the end
            last = await asyncio.to_thread(write_case, scan, small("LAST0001", beams=2, seed=999))

            async def last_done() -> bool:
                return _terminal((await cases()).get(str(last.case_dir)))

            await wait_until(last_done, timeout_s=120, what="the last case to end")
            still_running = service.state == "running" and await _alive(service)
            now = await cases()
            skipped = await service.store.list_skipped_folders()
            registered = sorted(c.case_id for c in now.values())
    finally:
        logging.getLogger("mqi_async").removeHandler(records)
    problems = [
        r.getMessage()
        for r in records.records
        if r.levelno >= logging.ERROR
        and ("watcher" in r.getMessage() or r.name.endswith("watcher"))
    ]
    return Outcome(
        not_utf8=now.get(str(not_utf8)),
        broken={b: now[str(c.case_dir)] for b, c in broken.items()},
        odd={name: now[str(path)] for name, path in odd.items()},
        last=now[str(last.case_dir)],
        root=root,
        still_running=still_running,
        watcher_problems=problems,
        registered=registered,
        skipped={f.path: f.reason for f in skipped},
        not_utf8_path=os.fsencode(not_utf8).decode("utf-8", "backslashreplace"),
    )


async def _alive(service: Service) -> bool:
    """The watcher still takes new cases: a full scan runs and reports without error."""
    found = await service.watcher.scan()
    return len(found) > 0


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    root = tmp_path_factory.mktemp("ingest-e2e")
    result = asyncio.run(_scenario(root))
    yield result
    for leftover in Path("/tmp").glob(f"pwned_{TAG}*"):
        leftover.unlink()


def test_each_visible_breakage_is_a_case_folder_and_missing_deliveries_is_not(
    tmp_path: Path,
) -> None:
    for i, breakage in enumerate([*VISIBLE, Breakage.MISSING_DELIVERIES]):
        root = tmp_path / str(breakage)
        write_case(root, small(f"C{i}", beams=2, breakage=breakage, seed=i))
        found = scan_tree(str(root), str(root), READY_MARKER)
        assert len(found) == (0 if breakage is Breakage.MISSING_DELIVERIES else 1), breakage


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("breakage", VISIBLE, ids=[str(b) for b in VISIBLE])
def test_broken_case_fails_with_its_code(outcome: Outcome, breakage: Breakage) -> None:
    case = outcome.broken[breakage]
    assert str(case.status) == "failed", case
    assert case.error is not None and case.error.startswith(str(breakage)), case.error
    assert case.error != str(breakage), "a code is followed by a human sentence"
    assert not case.beams or all(str(b.status) != "completed" for b in case.beams)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_service_keeps_running_after_broken_cases(outcome: Outcome) -> None:
    assert str(outcome.last.status) == "completed", outcome.last
    assert outcome.still_running
    assert "NOCASE" not in outcome.registered
    # one row per case folder; nothing registered twice, nothing extra
    others = sorted(set(outcome.registered) - {NOT_UTF8})
    assert len(others) == len(VISIBLE) + len(ODD_NAMES) + 1


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_folder_name_that_is_not_utf8_is_listed_as_skipped_and_stops_nothing(
    outcome: Outcome,
) -> None:
    """The store holds names as text, so such a folder is never a case: it is listed as
    skipped (with its bytes shown as `\\xNN`) and the watcher runs on."""
    assert outcome.not_utf8 is None
    assert "\\x" in outcome.not_utf8_path
    assert outcome.skipped == {outcome.not_utf8_path: "folder_name_not_utf8"}, outcome.skipped
    assert outcome.watcher_problems == []


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", [n for _, n, _ in ODD_NAMES])
def test_odd_folder_names_run_to_an_rt_dose(outcome: Outcome, name: str) -> None:
    case = outcome.odd[name]
    assert case.case_id == name
    assert str(case.status) == "completed", (case.error, case.beams)
    assert case.beams
    for beam in case.beams:
        assert beam.outputs, beam
        for output in beam.outputs:
            ds = pydicom.dcmread(output, stop_before_pixels=True)
            assert ds.SOPClassUID == RT_DOSE_STORAGE


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_no_command_in_a_folder_name_ran(outcome: Outcome) -> None:
    # `/tmp` is where the absolute ones would land, the others in some current folder
    ran = [p for place in (Path("/tmp"), Path.cwd(), Path.home()) for p in place.glob("pwned_*")]
    ran += list(outcome.root.rglob("pwned_*"))
    assert [p for p in ran if TAG in p.name] == []
    assert all(str(c.status) == "completed" for c in outcome.odd.values())
    shutil.rmtree(outcome.root / "staging", ignore_errors=True)
