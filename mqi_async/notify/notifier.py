"""The notifier: reads the store every few seconds, turns what changed into notices, and
delivers them per channel from a bounded queue, so a dead receiver never holds up anything
but its own delivery task."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

from mqi_async.config import NotifySettings
from mqi_async.domain.errors import MqiError, PermanentError, TransientError
from mqi_async.domain.notices import (
    CaseView,
    CheckPart,
    HostView,
    HostWatch,
    Message,
    Naming,
    Notice,
    NoticeCode,
    RateLimit,
    Throttle,
    case_notices,
    error_code,
    render,
    render_digest,
    retry_delay_s,
)
from mqi_async.domain.verdict import QaStatus
from mqi_async.store import CaseSnapshot
from mqi_async.store.hosts import HostRow
from mqi_async.store.snapshot import DashboardCounts

log = logging.getLogger(__name__)

#: cases read per poll: every unfinished one plus this many of the newest (as the dashboard)
RECENT_CASES = 200
#: the longest wait between two tries of one message
MAX_BACKOFF_S = 300.0


class NoticeSource(Protocol):
    """The store's read path, as far as the notifier uses it (`Store` satisfies it)."""

    async def dashboard(
        self, *, recent: int = ..., text: str = ...
    ) -> tuple[list[CaseSnapshot], DashboardCounts]: ...

    async def list_hosts(self) -> list[HostRow]: ...


class Channel(Protocol):
    """Where messages go (webhook, e-mail). `send` raises `TransientError` or
    `PermanentError` (`notify_delivery_failed`); the notifier bounds it by `timeout_s`."""

    name: str
    timeout_s: float

    async def send(self, message: Message) -> None: ...

    async def aclose(self) -> None: ...


def case_view(case: CaseSnapshot) -> CaseView:
    """A case as the notice rules see it; parts are named by number, never by id or folder."""
    parts = [
        CheckPart(
            key="plan",
            label="plan sum",
            status=case.plan_qa.status if case.plan_qa else QaStatus.PENDING,
        )
    ]
    for i, b in enumerate(case.beams, start=1):
        number = b.beam_number if b.beam_number is not None else f"#{i}"
        parts.append(
            CheckPart(
                key=f"beam:{b.beam_id}",
                label=f"beam {number}",
                status=b.qa.status if b.qa else QaStatus.PENDING,
            )
        )
    for i, d in enumerate(case.deliveries, start=1):
        fraction = d.fraction_index if d.fraction_index is not None else "?"
        beam = d.raw_beam_number if d.raw_beam_number is not None else "?"
        parts.append(
            CheckPart(
                key=f"delivery:{d.delivery_id}",
                label=f"delivery {i} (fraction {fraction}, beam {beam})",
                status=d.qa_status,
            )
        )
    return CaseView(
        case_id=case.case_id,
        status=case.status,
        error_code=error_code(case.error),
        verdict=case.qa.status,
        parts=tuple(parts),
    )


def host_view(row: HostRow) -> HostView:
    return HostView(name=row.name, state=row.state, error_code=error_code(row.error))


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelStats:
    """What one channel did since the service started."""

    sent: int
    failed: int
    #: notices waiting in the queue
    queued: int
    #: notices waiting for the next digest (rate limit, or dropped from a full queue)
    folded: int
    #: notices a full queue pushed out (they went into the digest)
    dropped: int


@dataclass(eq=False)
class _Outbox:
    """One channel's queue, rate limit and counters."""

    channel: Channel
    throttle: Throttle
    size: int
    queue: deque[Notice] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: the message being sent; kept if the task is cancelled mid-send, for `flush`
    inflight: Message | None = None
    sent: int = 0
    failed: int = 0
    dropped: int = 0

    def put(self, notice: Notice) -> None:
        if len(self.queue) >= self.size:
            # the receiver is slower than the news: the oldest goes into the digest
            self.throttle.fold(self.queue.popleft())
            self.dropped += 1
        self.queue.append(notice)
        self.wake.set()


class Notifier:
    """Watches the store (read only) and notifies people; see README "Notifications".

    `publish` never waits: it appends to each channel's bounded queue. One task per channel
    drains its queue under the channel's rate limit, every try under a timeout, with retries
    and backoff. `service.open_service` builds it (`build_notifier`) when notify is on.
    """

    def __init__(
        self,
        *,
        store: NoticeSource,
        channels: Sequence[Channel],
        settings: NotifySettings,
        naming: Naming,
        service_name: str,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._settings = settings
        self._naming = naming
        self._service = service_name
        self._now = now
        self._monotonic = monotonic
        limit = RateLimit(settings.rate_limit.max_messages, settings.rate_limit.per_minutes * 60)
        self._boxes = [
            _Outbox(channel=c, throttle=Throttle(limit), size=settings.queue_size) for c in channels
        ]
        self._hosts = HostWatch(timedelta(minutes=settings.host_paused_minutes))
        #: the last read; None until the baseline is taken
        self._cases: dict[str, CaseView] | None = None
        #: set once the baseline is taken: from then on, changes are told
        self.watching = asyncio.Event()

    # --- the producer side ---------------------------------------------------------------

    def publish(self, notice: Notice) -> None:
        """Queue a notice on every channel; returns at once, whatever the receivers do."""
        log.info(
            "notice %s",
            notice.code,
            extra={"case_id": notice.case_id, "host": notice.host, "code": str(notice.code)},
        )
        for box in self._boxes:
            box.put(notice)

    def unexpected_stop(self) -> None:
        """The last run left its marker (`RunningMarker`): it did not stop cleanly."""
        self.publish(Notice(code=NoticeCode.SERVICE_UNEXPECTED_STOP, at=self._now()))

    def fatal_error(self, exc: BaseException) -> None:
        """The service is going down on `exc`: named by its code or class, never its text."""
        while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        reason = exc.code if isinstance(exc, MqiError) else type(exc).__name__
        self.publish(Notice(code=NoticeCode.SERVICE_FATAL_ERROR, at=self._now(), reason=reason))

    def stats(self) -> dict[str, ChannelStats]:
        return {
            box.channel.name: ChannelStats(
                sent=box.sent,
                failed=box.failed,
                queued=len(box.queue),
                folded=box.throttle.folded,
                dropped=box.dropped,
            )
            for box in self._boxes
        }

    def has_pending(self) -> bool:
        """Whether anything is still to be sent (queued, folded or cut off mid-send)."""
        return any(b.queue or b.throttle.folded or b.inflight for b in self._boxes)

    # --- the loops -------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver on every channel and watch the store until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for box in self._boxes:
                tg.create_task(self._deliver(box))
            await self._watch()

    async def _read(self) -> tuple[dict[str, CaseView], list[HostView]]:
        cases, _ = await self._store.dashboard(recent=RECENT_CASES)
        hosts = await self._store.list_hosts()
        return {c.case_id: case_view(c) for c in cases}, [host_view(h) for h in hosts]

    async def _watch(self) -> None:
        if self._cases is None:
            # what is already failed or paused at the start was told before (or is old)
            self._cases, hosts = await self._read()
            self._hosts.observe(hosts, self._now())
            log.info(
                "notifier: %d case(s) in the baseline; channels %s",
                len(self._cases),
                ", ".join(b.channel.name for b in self._boxes),
            )
        self.watching.set()
        while True:
            await asyncio.sleep(self._settings.poll_seconds)
            cases, hosts = await self._read()
            now = self._now()
            for notice in case_notices(self._cases, cases.values(), now):
                self.publish(notice)
            for notice in self._hosts.observe(hosts, now):
                self.publish(notice)
            self._cases = cases

    async def _deliver(self, box: _Outbox) -> None:
        """Drain one channel: a due digest first, then the queue in order."""
        if box.inflight is not None:  # cut off by a crash of `run` (restarted by its supervisor)
            await self._send(box, box.inflight)
        while True:
            now = self._monotonic()
            digest = box.throttle.take_digest(now)
            if digest is not None:
                await self._send(box, render_digest(digest, self._naming, self._service))
                continue
            if box.queue:
                notice = box.queue.popleft()
                if box.throttle.admit(notice, now):
                    await self._send(box, render(notice, self._naming, self._service))
                continue
            box.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(box.throttle.seconds_until_digest(now)):
                    await box.wake.wait()

    async def _send(self, box: _Outbox, message: Message) -> bool:
        """Send with retries and backoff; a failure is logged once, never raised."""
        box.inflight = message
        tries = self._settings.retries + 1
        for attempt in range(1, tries + 1):
            error = await self._try(box, message)
            if error is None:
                box.sent += 1
                box.inflight = None
                return True
            if isinstance(error, PermanentError) or attempt == tries:
                box.failed += 1
                box.inflight = None
                log.warning(
                    "notification via %s not delivered after %d tr%s: %s",
                    box.channel.name,
                    attempt,
                    "y" if attempt == 1 else "ies",
                    error,
                    extra={"code": "notify_delivery_failed"},
                )
                return False
            await asyncio.sleep(
                retry_delay_s(
                    attempt, initial_s=self._settings.retry_backoff_seconds, max_s=MAX_BACKOFF_S
                )
            )
        return False  # unreachable: the last try returns above

    async def _try(self, box: _Outbox, message: Message) -> MqiError | None:
        """One try under the channel's timeout; the error, or None when delivered."""
        try:
            async with asyncio.timeout(box.channel.timeout_s):
                await box.channel.send(message)
        except MqiError as exc:
            return exc
        except TimeoutError:
            return TransientError(
                "notify_delivery_failed",
                f"{box.channel.name}: no answer within {box.channel.timeout_s:g} s",
            )
        return None

    # --- the end -----------------------------------------------------------------------------

    async def flush(self, timeout_s: float) -> bool:
        """Send what is left, once and within `timeout_s`, after `run` has ended (the last
        notices of a stopping service); what the rate limit holds goes as one digest. True
        when everything was delivered."""

        async def drain(box: _Outbox) -> bool:
            messages = [box.inflight] if box.inflight is not None else []
            box.inflight = None
            now = self._monotonic()
            while box.queue:
                notice = box.queue.popleft()
                if box.throttle.admit(notice, now):
                    messages.append(render(notice, self._naming, self._service))
            digest = box.throttle.take_digest(now, force=True)
            if digest is not None:
                messages.append(render_digest(digest, self._naming, self._service))
            delivered = True
            for message in messages:
                error = await self._try(box, message)
                if error is None:
                    box.sent += 1
                else:
                    box.failed += 1
                    delivered = False
                    log.warning(
                        "notification via %s not delivered while stopping: %s",
                        box.channel.name,
                        error,
                        extra={"code": "notify_delivery_failed"},
                    )
            return delivered

        try:
            async with asyncio.timeout(timeout_s):
                results = await asyncio.gather(*(drain(b) for b in self._boxes))
        except TimeoutError:
            log.warning("notifications not delivered within %.0f s of stopping", timeout_s)
            return False
        return all(results)

    async def aclose(self) -> None:
        for box in self._boxes:
            try:
                async with asyncio.timeout(5):
                    await box.channel.aclose()
            except Exception as exc:  # closing must not stop the service's own shutdown
                log.warning("closing the %s channel: %r", box.channel.name, exc)


def build_notifier(
    settings: NotifySettings, *, store: NoticeSource, secret: bytes, service_name: str
) -> Notifier:
    """The notifier with the channels `settings` names (webhook, e-mail or both)."""
    from mqi_async.notify.email import EmailChannel
    from mqi_async.notify.webhook import WebhookChannel

    channels: list[Channel] = []
    if settings.webhook is not None:
        channels.append(WebhookChannel(settings.webhook))
    if settings.email is not None:
        channels.append(EmailChannel(settings.email))
    return Notifier(
        store=store,
        channels=channels,
        settings=settings,
        naming=Naming(secret=secret, include_patient_id=settings.include_patient_id),
        service_name=service_name,
    )
