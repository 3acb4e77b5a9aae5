"""One link policy for the scan directory: start-up scan and live events alike, folders and files."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from mqi_async.demo.cases import WrittenCase, write_case
from mqi_async.domain.errors import IngestError
from mqi_async.domain.records import ResolvedCase
from mqi_async.ingest.reader import CaseReader
from tests.integration.test_ingest_watcher import QUIET_S, Recorder, spec, watching

TIMING = [pytest.param(True, id="present-at-start"), pytest.param(False, id="created-live")]


def _reader(scan: Path) -> CaseReader:
    return CaseReader(scan_directory=scan, fraction_window=timedelta(minutes=60))


async def _resolve(scan: Path, case_path: str) -> ResolvedCase | object:
    return await _reader(scan).resolve("x", case_path, now=datetime.now())


async def _expect_refused(scan: Path, case_path: str) -> IngestError:
    with pytest.raises(IngestError) as caught:
        await _resolve(scan, case_path)
    assert caught.value.code == "symlink_outside_scan", caught.value
    return caught.value


@pytest.mark.parametrize("at_start", TIMING)
async def test_a_folder_link_out_of_the_scan_dir_is_reported_and_never_read(
    tmp_path: Path, at_start: bool
) -> None:
    scan = tmp_path / "incoming"
    (scan / "G1").mkdir(parents=True)
    outside = write_case(tmp_path / "elsewhere" / "G1", spec("OUT1", room=""))
    link = scan / "G1" / "OUT1"

    def make_link() -> None:
        link.symlink_to(outside.case_dir.parent, target_is_directory=True)

    if at_start:
        make_link()
    recorder = Recorder()
    async with watching(scan, recorder):
        if not at_start:
            make_link()
        seen = link / outside.case_dir.name
        await recorder.wait_for(seen)
        await asyncio.sleep(QUIET_S)
    # reported once, under its name in the scan dir; the target's own path never appears
    assert recorder.case_paths == {str(seen)}
    err = await _expect_refused(scan, str(seen))
    assert str(outside.case_dir) in str(err)


@pytest.mark.parametrize("at_start", TIMING)
async def test_a_folder_link_inside_the_scan_dir_is_not_a_second_case(
    tmp_path: Path, at_start: bool
) -> None:
    scan = tmp_path / "incoming"
    real = write_case(scan / "G1", spec("REAL1", room=""))
    alias = scan / "G2" / "ALIAS1"

    def make_link() -> None:
        alias.parent.mkdir(parents=True, exist_ok=True)
        alias.symlink_to(real.case_dir.parent, target_is_directory=True)

    if at_start:
        make_link()
    recorder = Recorder()
    async with watching(scan, recorder):
        if not at_start:
            make_link()
        await recorder.wait_for(real.case_dir)
        await asyncio.sleep(QUIET_S)
    assert recorder.case_paths == {str(real.case_dir)}


def _link_file(case: WrittenCase, name: str, target: Path) -> Path:
    link = case.case_dir / name
    link.symlink_to(target)
    return link


@pytest.mark.parametrize("at_start", TIMING)
async def test_a_file_link_out_of_the_scan_dir_fails_its_case(
    tmp_path: Path, at_start: bool
) -> None:
    scan = tmp_path / "incoming"
    foreign = write_case(tmp_path / "elsewhere", spec("OTHER", room="", seed=3))
    assert foreign.rtplan_path is not None
    recorder = Recorder()
    case: WrittenCase | None = None

    def make_case() -> WrittenCase:
        written = write_case(scan / "G1", spec("FILE1", room=""), marker_last=True)
        # the sender's plan was replaced by a link to another patient's plan
        assert written.rtplan_path is not None
        written.rtplan_path.unlink()
        _link_file(written, written.rtplan_path.name, foreign.rtplan_path)  # type: ignore[arg-type]
        return written

    if at_start:
        case = make_case()
    async with watching(scan, recorder):
        if case is None:
            case = make_case()
        await recorder.wait_for(case.case_dir)
    err = await _expect_refused(scan, str(case.case_dir))
    assert case.rtplan_path is not None and case.rtplan_path.name in str(err)


async def test_a_file_link_that_stays_inside_the_scan_dir_is_read(tmp_path: Path) -> None:
    scan = tmp_path / "incoming"
    case = write_case(scan / "G1", spec("INSIDE1", room=""))
    assert case.rtplan_path is not None
    kept = scan / "plans" / case.rtplan_path.name
    kept.parent.mkdir()
    os.replace(case.rtplan_path, kept)
    _link_file(case, case.rtplan_path.name, kept)
    result = await _resolve(scan, str(case.case_dir))
    assert isinstance(result, ResolvedCase)


async def test_a_delivery_folder_link_out_of_the_scan_dir_fails_its_case(tmp_path: Path) -> None:
    scan = tmp_path / "incoming"
    case = write_case(scan / "G1", spec("DEL1", room=""))
    delivery = case.delivery_dirs[0]
    moved = tmp_path / "elsewhere" / delivery.name
    moved.parent.mkdir()
    os.replace(delivery, moved)
    delivery.symlink_to(moved, target_is_directory=True)
    err = await _expect_refused(scan, str(case.case_dir))
    assert delivery.name in str(err)


@pytest.mark.parametrize("at_start", TIMING)
async def test_a_link_to_the_root_of_the_disk_is_not_walked(tmp_path: Path, at_start: bool) -> None:
    scan = tmp_path / "incoming"
    real = write_case(scan / "G1", spec("ROOT1", room=""))
    link = scan / "G2" / "everything"

    def make_link() -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/", target_is_directory=True)

    if at_start:
        make_link()
    recorder = Recorder()
    started = time.monotonic()
    async with watching(scan, recorder) as watcher:
        if not at_start:
            make_link()
        await recorder.wait_for(real.case_dir)
        await asyncio.sleep(QUIET_S)
        assert watcher.last_scan_s is not None and watcher.last_scan_s < 5
    assert time.monotonic() - started < 15
    assert recorder.case_paths == {str(real.case_dir)}
