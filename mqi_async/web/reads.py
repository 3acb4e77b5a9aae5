"""The web's reads of the store: coalesced, reused for a moment, one at a time.

However many browsers and scrapers ask, the service's one database connection sees at most
one web read waiting beside the engine's transactions, and the same question is answered
from one read for `max_age_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

#: answers kept at most; the oldest go first
MAX_ENTRIES = 256


class ReadCache:
    """Single-flight, briefly cached reads keyed by what was asked."""

    def __init__(self, *, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_age_s = max_age_s
        self._clock = clock
        self._answers: dict[Hashable, tuple[float, Any]] = {}
        self._inflight: dict[Hashable, asyncio.Task[Any]] = {}
        self._gate = asyncio.Semaphore(1)

    async def get(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        """The answer to `key`: a fresh one from `load()`, or one read less than `max_age_s` ago."""
        hit = self._answers.get(key)
        if hit is not None and self._clock() - hit[0] < self._max_age_s:
            value: T = hit[1]
            return value
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(key, load))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        # a client that goes away does not cancel the read others wait for
        result: T = await asyncio.shield(task)
        return result

    async def _load(self, key: Hashable, load: Callable[[], Awaitable[T]]) -> T:
        async with self._gate:
            value = await load()
        now = self._clock()
        if len(self._answers) >= MAX_ENTRIES:
            stale = [k for k, (at, _) in self._answers.items() if now - at >= self._max_age_s]
            for k in stale or list(self._answers)[: MAX_ENTRIES // 4]:
                del self._answers[k]
        self._answers[key] = (now, value)
        return value

    def forget(self) -> None:
        """Drop every kept answer (after an action, so the next page shows its effect)."""
        self._answers.clear()

    async def aclose(self) -> None:
        tasks = list(self._inflight.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
