"""How much of the service's loop the web may take: a token bucket over all requests.

The engine shares the event loop with the web server, so a flood of requests (a stuck
browser, an aggressive scraper, fifty dashboards) must never slow beams down. Requests over
the rate wait their turn, which costs the loop nothing; past a bounded wait they get 503.
"""

from __future__ import annotations

import asyncio


class Pacer:
    """At most `rate_per_s` requests a second on average, `burst` at once."""

    def __init__(self, *, rate_per_s: float, burst: float, max_wait_s: float) -> None:
        self._rate = rate_per_s
        self._burst = burst
        self._max_wait_s = max_wait_s
        self._tokens = burst
        self._last: float | None = None

    async def admit(self) -> bool:
        """Wait for this request's turn; False (do not serve it) when that would take longer
        than `max_wait_s`."""
        now = asyncio.get_running_loop().time()
        if self._last is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        wait_s = (1.0 - self._tokens) / self._rate if self._tokens < 1.0 else 0.0
        if wait_s > self._max_wait_s:
            return False
        # the token is taken now: later requests queue behind this one, in order
        self._tokens -= 1.0
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        return True
