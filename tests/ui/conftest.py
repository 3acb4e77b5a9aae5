"""Stores for the dashboard tests: empty, or the fixed clinic day of `seed`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mqi_async.store import Store
from tests.ui.seed import open_store, seed_clinic


@pytest.fixture
async def empty_store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await open_store(tmp_path / "mqi.db")
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
async def clinic(empty_store: Store) -> Store:
    await seed_clinic(empty_store)
    return empty_store
