"""Pictures of the main screens at two terminal sizes, compared with the stored SVGs.

The data, the store's clock and the dashboard's clock are fixed (tests/ui/seed.py), so every
run draws the same picture. See tests/ui/snapshots.py to update them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import DataTable

from mqi_async.store import Store
from mqi_async.ui.detail import CaseDetailScreen
from tests.ui.seed import make_app
from tests.ui.snapshots import assert_snapshot, settled_screenshot

SIZES = [(120, 40), (80, 24)]


def size_id(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


@pytest.mark.parametrize("size", SIZES, ids=size_id)
async def test_cases_screen(clinic: Store, tmp_path: Path, size: tuple[int, int]) -> None:
    """The cases list with every verdict, the first case's beams, GPUs and events."""
    app = make_app(clinic, tmp_path)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        assert app.query_one("#cases", DataTable).row_count == 5
        assert_snapshot(await settled_screenshot(app, pilot), f"cases_{size_id(size)}")


@pytest.mark.parametrize("size", SIZES, ids=size_id)
async def test_detail_screen(clinic: Store, tmp_path: Path, size: tuple[int, int]) -> None:
    """MIXED: passed and conditional beams, a failed delivery in fraction 2."""
    app = make_app(clinic, tmp_path)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        cases = app.query_one("#cases", DataTable)
        cases.move_cursor(row=cases.get_row_index("MIXED"))
        await pilot.pause()
        await pilot.press("d")
        await pilot.pause()
        assert isinstance(app.screen, CaseDetailScreen)
        assert_snapshot(await settled_screenshot(app, pilot), f"detail_{size_id(size)}")


@pytest.mark.parametrize("size", SIZES, ids=size_id)
async def test_empty_screen(empty_store: Store, tmp_path: Path, size: tuple[int, int]) -> None:
    app = make_app(empty_store, tmp_path)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        assert_snapshot(await settled_screenshot(app, pilot), f"empty_{size_id(size)}")


def test_a_changed_picture_fails_and_is_kept_for_review(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MQI_UPDATE_SNAPSHOTS", raising=False)
    with pytest.raises(pytest.fail.Exception, match="no stored snapshot"):
        assert_snapshot("<svg>1</svg>", "x", tmp_path)
    monkeypatch.setenv("MQI_UPDATE_SNAPSHOTS", "1")
    assert_snapshot("<svg>1</svg>", "x", tmp_path)
    assert (tmp_path / "x.svg").read_text() == "<svg>1</svg>"
    assert not (tmp_path / "x.new.svg").exists()
    monkeypatch.delenv("MQI_UPDATE_SNAPSHOTS")
    assert_snapshot("<svg>1</svg>", "x", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="differs"):
        assert_snapshot("<svg>2</svg>", "x", tmp_path)
    assert (tmp_path / "x.new.svg").read_text() == "<svg>2</svg>"
    assert (tmp_path / "x.svg").read_text() == "<svg>1</svg>"
    assert_snapshot("<svg>1</svg>", "x", tmp_path)  # a match clears the stale new one
    assert not (tmp_path / "x.new.svg").exists()
