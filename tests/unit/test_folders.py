"""Folders the service creates are 0700; folders that exist keep their mode."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from mqi_async.folders import make_private_dirs
from mqi_async.log import configure_logging, remove_handlers


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_missing_levels_are_made_0700_under_any_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        created = make_private_dirs(tmp_path / "a" / "b" / "c")
    finally:
        os.umask(old)
    assert created == [tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "c"]
    assert [mode(p) for p in created] == [0o700, 0o700, 0o700]


def test_an_existing_folder_is_never_changed(tmp_path: Path) -> None:
    shared = tmp_path / "var-lib"
    shared.mkdir()
    shared.chmod(0o755)
    assert make_private_dirs(shared) == []
    assert mode(shared) == 0o755
    make_private_dirs(shared / "mqi")
    assert mode(shared) == 0o755 and mode(shared / "mqi") == 0o700


def test_a_file_in_the_way_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(NotADirectoryError):
        make_private_dirs(tmp_path / "f")


def test_logging_into_an_existing_shared_folder_leaves_it_alone(tmp_path: Path) -> None:
    shared = tmp_path / "log"
    shared.mkdir()
    shared.chmod(0o755)
    handlers = configure_logging(level="INFO", directory=shared)
    try:
        logging.getLogger("mqi_async.test").info("hello")
    finally:
        remove_handlers(handlers)
    assert mode(shared) == 0o755
    assert mode(shared / "mqi-async.log") == 0o600


async def test_the_service_makes_its_folders_private_and_leaves_their_parents(
    tmp_path: Path,
) -> None:
    from mqi_async.config import load_settings
    from mqi_async.service import open_service

    shared = tmp_path / "var-lib"
    shared.mkdir()
    shared.chmod(0o755)
    config = tmp_path / "config.yaml"
    config.write_text(
        "scan_directory: incoming\n"
        f"work_directory: {shared}/mqi/work\n"
        f"database: {shared}/mqi.db\n"
        "logging: {directory: logs}\n"
    )
    async with open_service(load_settings(config)):
        pass
    assert mode(shared) == 0o755
    assert mode(shared / "mqi") == 0o700 and mode(shared / "mqi" / "work") == 0o700
    assert mode(shared / "mqi.db.key") == 0o600
