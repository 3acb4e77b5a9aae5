"""The layering of ARCHITECTURE.md, checked in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("textual", "asyncssh", "aiosqlite", "watchfiles")


def _loaded(module: str) -> set[str]:
    code = (
        f"import json, sys; import {module}; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {list(HEAVY)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return {m.split(".")[0] for m in json.loads(out.stdout)}


@pytest.mark.parametrize(
    "module",
    [
        "mqi_async.domain.model",
        "mqi_async.domain.plan",
        "mqi_async.domain.fractions",
        "mqi_async.domain.tps",
        "mqi_async.domain.gpus",
        "mqi_async.domain.scheduling",
        "mqi_async.engine.engine",
    ],
)
def test_domain_and_engine_load_no_adapters(module: str) -> None:
    assert _loaded(module) == set()


def test_headless_service_never_loads_textual() -> None:
    assert "textual" not in _loaded("mqi_async.service")


def test_domain_imports_no_asyncio() -> None:
    code = (
        "import sys; import mqi_async.domain.model, mqi_async.domain.fractions, "
        "mqi_async.domain.tps, mqi_async.domain.scheduling, mqi_async.domain.plan; "
        "print('asyncio' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
