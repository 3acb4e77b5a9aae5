"""SVG snapshots of dashboard screens, compared with files kept in tests/ui/snapshots/.

pytest-textual-snapshot cannot be installed with pytest 9 (it pins syrupy 4.8), so this is its
small core: `app.export_screenshot()` once the screen has settled, compared byte for byte.

- `MQI_UPDATE_SNAPSHOTS=1 pytest tests/ui` (re)writes the stored files.
- On a mismatch the test fails and the new picture is written next to the stored one as
  `<name>.new.svg`, to be looked at (a browser shows both) and, if right, accepted with the
  variable above.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from textual.app import App
from textual.pilot import Pilot

SNAPSHOT_DIR = Path(__file__).parent / "snapshots"
UPDATE_ENV = "MQI_UPDATE_SNAPSHOTS"


async def settled_screenshot(app: App[Any], pilot: Pilot[Any]) -> str:
    """The SVG of the current screen once pending messages, refreshes and animations are done."""
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()
    return app.export_screenshot()


def assert_snapshot(svg: str, name: str, directory: Path = SNAPSHOT_DIR) -> None:
    stored = directory / f"{name}.svg"
    fresh = directory / f"{name}.new.svg"
    if os.environ.get(UPDATE_ENV) == "1":
        directory.mkdir(parents=True, exist_ok=True)
        stored.write_text(svg, encoding="utf-8")
        fresh.unlink(missing_ok=True)
        return
    if not stored.exists():
        directory.mkdir(parents=True, exist_ok=True)
        fresh.write_text(svg, encoding="utf-8")
        pytest.fail(
            f"no stored snapshot {stored.name}: look at {fresh}, then run with {UPDATE_ENV}=1"
        )
    if stored.read_text(encoding="utf-8") != svg:
        fresh.write_text(svg, encoding="utf-8")
        pytest.fail(
            f"{name} differs from {stored}: the new one is {fresh}; if it is right, accept it"
            f" with {UPDATE_ENV}=1"
        )
    fresh.unlink(missing_ok=True)
