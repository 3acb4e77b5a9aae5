"""Delivery checks: every delivery of every fraction judged against the plan, one at a time.

Pending deliveries are taken from the store oldest first and checked in the QA worker (never on
the event loop); each verdict and its numbers are stored with an event. A check that cannot be
computed (a damaged record, a layer the plan lacks) is the named `error` of that delivery and
never touches the case's pipeline status. A worker failure or timeout is retried with backoff,
at most `max_attempts` times. A restart simply finds the same deliveries still pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mqi_async.domain.errors import FailureKind, MqiError, format_error
from mqi_async.domain.records import DeliveryToCheck
from mqi_async.domain.verdict import QaStatus
from mqi_async.engine.ports import LocalTools, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeliveryCheckerSettings:
    enabled: bool
    work_directory: Path
    max_attempts: int = 3
    backoff_initial_s: float = 5.0
    backoff_max_s: float = 300.0
    #: how often pending checks are looked for when nothing wakes the checker
    idle_poll_s: float = 30.0


def detail_path(work_directory: Path, item: DeliveryToCheck) -> Path:
    """The layer table of one delivery: `<work>/<case>/qa/deliveries/<folder>.json`."""
    return (
        work_directory / item.case_safe_name / "qa" / "deliveries" / f"{item.delivery.folder}.json"
    )


class DeliveryChecker:
    """Runs the pending delivery checks; `wake()` when new deliveries were recorded."""

    def __init__(
        self,
        *,
        store: Store,
        tools: LocalTools,
        settings: DeliveryCheckerSettings,
        on_checked: Callable[[], None] = lambda: None,
    ) -> None:
        self._store = store
        self._tools = tools
        self._s = settings
        #: told after a pass that judged at least one delivery (the report follows)
        self._on_checked = on_checked
        self._wake = asyncio.Event()
        #: delivery id -> loop time before which a failed check is not tried again
        self._not_before: dict[str, float] = {}

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            waiting = await self.check_pending()
            delay = self._s.idle_poll_s
            if waiting:
                delay = max(0.05, min(waiting) - loop.time())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def check_pending(self) -> list[float]:
        """Check every pending delivery now due; returns the times of those backing off."""
        loop = asyncio.get_running_loop()
        done: set[str] = set()
        while True:
            rows = await self._store.deliveries_to_check(limit=200)
            due = [
                i
                for i in rows
                if i.delivery.delivery_id not in done
                and self._not_before.get(i.delivery.delivery_id, 0.0) <= loop.time()
            ]
            if not due:
                if done:
                    self._on_checked()
                pending = {i.delivery.delivery_id for i in rows}
                return [t for key, t in self._not_before.items() if key in pending]
            for item in due:
                done.add(item.delivery.delivery_id)
                await self._check(item)

    async def _check(self, item: DeliveryToCheck) -> None:
        d = item.delivery
        if not self._s.enabled:
            await self._store.record_delivery_check(
                d, status=QaStatus.SKIPPED, reason=format_error("delivery_check_off")
            )
            return
        if d.raw_beam_number is None:
            await self._store.record_delivery_check(
                d,
                status=QaStatus.ERROR,
                reason=format_error(
                    "delivery_plan_unreadable", "the delivery names no DICOM beam number"
                ),
            )
            return
        target = detail_path(self._s.work_directory, item)
        try:
            result = await self._tools.check_delivery(
                folder=Path(d.delivery_path),
                plan=Path(item.plan_path),
                beam_number=d.raw_beam_number,
                room=item.room,
                detail_output=target,
            )
        except MqiError as exc:
            await self._failed(item, exc)
            return
        self._not_before.pop(d.delivery_id, None)
        status = QaStatus(str(result.get("qa_status", QaStatus.ERROR)))
        await self._store.record_delivery_check(
            d, status=status, result=result, detail_path=str(target)
        )
        log.info(
            "delivery %s of case %s: %s (pass rate %s %%)",
            d.folder,
            d.case_id,
            status,
            result.get("pass_rate_percent"),
            extra={"case_id": d.case_id, "code": "delivery_check"},
        )

    async def _failed(self, item: DeliveryToCheck, exc: MqiError) -> None:
        d = item.delivery
        if exc.kind is FailureKind.PERMANENT:
            self._not_before.pop(d.delivery_id, None)
            await self._store.record_delivery_check(d, status=QaStatus.ERROR, reason=str(exc))
            log.warning(
                "delivery %s of case %s cannot be checked: %s",
                d.folder,
                d.case_id,
                exc,
                extra={"case_id": d.case_id, "code": exc.code},
            )
            return
        tries = await self._store.count_delivery_attempt(d.delivery_id, str(exc))
        if tries >= self._s.max_attempts:
            self._not_before.pop(d.delivery_id, None)
            await self._store.record_delivery_check(d, status=QaStatus.ERROR, reason=str(exc))
            return
        delay = min(self._s.backoff_max_s, self._s.backoff_initial_s * 2 ** (tries - 1))
        self._not_before[d.delivery_id] = asyncio.get_running_loop().time() + delay
        log.warning(
            "delivery %s of case %s: %s; tried again in %.3g s",
            d.folder,
            d.case_id,
            exc,
            delay,
            extra={"case_id": d.case_id, "code": exc.code},
        )
