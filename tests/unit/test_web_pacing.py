"""The web's share of the loop: requests over the rate wait their turn, in order, or get 503."""

from __future__ import annotations

import asyncio

from mqi_async.web.pacing import Pacer


async def test_a_burst_passes_then_requests_are_paced() -> None:
    pacer = Pacer(rate_per_s=50, burst=5, max_wait_s=1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert all([await pacer.admit() for _ in range(5)])
    assert loop.time() - started < 0.05  # the burst
    results = await asyncio.gather(*(pacer.admit() for _ in range(10)))
    took = loop.time() - started
    assert all(results)
    assert 0.15 <= took < 0.6  # 10 more at 50 a second


async def test_past_the_longest_wait_a_request_is_turned_away() -> None:
    pacer = Pacer(rate_per_s=10, burst=1, max_wait_s=0.25)
    answers = await asyncio.gather(*(pacer.admit() for _ in range(6)))
    # one from the bucket, two within 0.25 s at 10 a second, the rest refused at once
    assert answers.count(True) == 3 and answers.count(False) == 3
