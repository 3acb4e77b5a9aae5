"""Notifications as pure logic: events found between two reads of the store, their text
without patient data, and the rate limit that folds an excess into one digest."""

from __future__ import annotations

import re
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from mqi_async.domain.errors import failure_info
from mqi_async.domain.model import CaseStatus
from mqi_async.domain.privacy import case_key
from mqi_async.domain.verdict import QaStatus


class NoticeCode(StrEnum):
    """What a notice is about; each is a code in `errors.FAILURES` with what to do."""

    CASE_FAILED = "case_failed"
    CHECK_CONDITIONAL = "check_conditional"
    CHECK_FAILED = "check_failed"
    HOST_PAUSED = "host_paused_long"
    HOST_RESUMED = "host_resumed"
    SERVICE_UNEXPECTED_STOP = "service_unexpected_stop"
    SERVICE_FATAL_ERROR = "service_fatal_error"
    #: the digest of notices the rate limit held back
    FOLDED = "notices_folded"


#: how loud each notice is, for receivers that sort by it
LEVELS: dict[NoticeCode, str] = {
    NoticeCode.CASE_FAILED: "error",
    NoticeCode.CHECK_CONDITIONAL: "warning",
    NoticeCode.CHECK_FAILED: "error",
    NoticeCode.HOST_PAUSED: "warning",
    NoticeCode.HOST_RESUMED: "info",
    NoticeCode.SERVICE_UNEXPECTED_STOP: "error",
    NoticeCode.SERVICE_FATAL_ERROR: "critical",
    NoticeCode.FOLDED: "warning",
}

#: check statuses somebody must look at
ALARMING = frozenset({QaStatus.CONDITIONAL, QaStatus.FAILED})
#: notices listed one by one in a digest; the rest are counted
DIGEST_LISTED = 20

_CODE = re.compile(r"[a-z][a-z0-9_]*")


def error_code(error: str | None) -> str | None:
    """The named code at the head of a stored `code: sentence` error, never its detail
    (details may name folders or files)."""
    if not error:
        return None
    head = error.split(":", 1)[0].strip()
    return head if _CODE.fullmatch(head) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckPart:
    """One check of a case (its plan sum, a beam, a delivery)."""

    #: identity between two reads (a beam or delivery id); never shown, it may hold the case id
    key: str
    #: what a message calls it: "plan sum", "beam 2", "delivery 3 (fraction 1, beam 2)"
    label: str
    status: QaStatus


@dataclass(frozen=True, slots=True, kw_only=True)
class CaseView:
    """What the notifier needs of one case from one read."""

    case_id: str
    status: CaseStatus
    #: the named code of the case's error (see `error_code`)
    error_code: str | None = None
    #: the case's verdict (worst of its checks once none is pending)
    verdict: QaStatus = QaStatus.PENDING
    parts: tuple[CheckPart, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HostView:
    """A host's state from one read of the hosts table."""

    name: str
    #: "connected", "paused", "connecting" or "starting"
    state: str
    error_code: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    """One thing to tell people. `case_id` is only ever shown through `Naming`."""

    code: NoticeCode
    at: datetime
    case_id: str | None = None
    host: str | None = None
    #: a named code: the case's failure, the host's error, or the fatal exception's class
    reason: str | None = None
    verdict: QaStatus | None = None
    #: the checks that turned conditional or failed, as "label: status"
    parts: tuple[str, ...] = ()
    #: how long a host has been paused
    minutes: float | None = None


def case_notices(
    before: Mapping[str, CaseView], after: Iterable[CaseView], at: datetime
) -> list[Notice]:
    """What changed from one read to the next: cases that became failed, checks that
    became conditional or failed. A case absent from `before` is new (or back in view after
    a retry): everything alarming about it is news."""
    notices: list[Notice] = []
    for case in after:
        prev = before.get(case.case_id)
        if case.status == CaseStatus.FAILED and (prev is None or prev.status != case.status):
            notices.append(
                Notice(
                    code=NoticeCode.CASE_FAILED,
                    at=at,
                    case_id=case.case_id,
                    reason=case.error_code,
                )
            )
        check = _check_notice(prev, case, at)
        if check is not None:
            notices.append(check)
    return notices


def _check_notice(prev: CaseView | None, case: CaseView, at: datetime) -> Notice | None:
    """One notice per case and read for its checks, however many turned at once."""
    was = {p.key: p.status for p in prev.parts} if prev is not None else {}
    turned = [p for p in case.parts if p.status in ALARMING and was.get(p.key) != p.status]
    verdict_turned = case.verdict in ALARMING and (prev is None or prev.verdict != case.verdict)
    if not turned and not verdict_turned:
        return None
    statuses = {p.status for p in turned} | ({case.verdict} if verdict_turned else set())
    return Notice(
        code=NoticeCode.CHECK_FAILED
        if QaStatus.FAILED in statuses
        else NoticeCode.CHECK_CONDITIONAL,
        at=at,
        case_id=case.case_id,
        verdict=case.verdict,
        parts=tuple(f"{p.label}: {p.status}" for p in turned),
    )


class HostWatch:
    """Hosts paused longer than a threshold, from successive reads of their states.

    A pause is timed from the first read that shows it (the hosts table is rewritten when a
    host's state or error changes and at every start, so its time is no pause start). A
    pause is announced once, and its end once, if it was announced.
    """

    def __init__(self, threshold: timedelta) -> None:
        self._threshold = threshold
        self._since: dict[str, datetime] = {}
        self._announced: set[str] = set()

    def observe(self, hosts: Iterable[HostView], now: datetime) -> list[Notice]:
        notices: list[Notice] = []
        seen: set[str] = set()
        for host in hosts:
            seen.add(host.name)
            if host.state != "paused":
                since = self._since.pop(host.name, None)
                if host.name in self._announced:
                    self._announced.discard(host.name)
                    notices.append(
                        Notice(
                            code=NoticeCode.HOST_RESUMED,
                            at=now,
                            host=host.name,
                            minutes=_minutes(now - since) if since is not None else None,
                        )
                    )
                continue
            since = self._since.setdefault(host.name, now)
            if host.name not in self._announced and now - since >= self._threshold:
                self._announced.add(host.name)
                notices.append(
                    Notice(
                        code=NoticeCode.HOST_PAUSED,
                        at=now,
                        host=host.name,
                        reason=host.error_code,
                        minutes=_minutes(now - since),
                    )
                )
        for gone in set(self._since) - seen:  # a host taken out of the config
            del self._since[gone]
            self._announced.discard(gone)
        return notices


def _minutes(span: timedelta) -> float:
    return round(span.total_seconds() / 60, 1)


# --- text -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Naming:
    """How a message names a case: by its case key (`privacy.case_key`, the name it has on
    every host), plus its id only with `notify.include_patient_id` (case ids are patient
    ids in most clinics)."""

    secret: bytes = field(repr=False)
    include_patient_id: bool = False

    def key(self, case_id: str) -> str:
        return case_key(self.secret, case_id)

    def name(self, case_id: str) -> str:
        key = self.key(case_id)
        return f"{case_id} ({key})" if self.include_patient_id else key

    def fields(self, case_id: str | None) -> dict[str, object]:
        if case_id is None:
            return {}
        out: dict[str, object] = {"case_key": self.key(case_id)}
        if self.include_patient_id:
            out["case_id"] = case_id
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """A rendered notice: an e-mail's subject and text, a webhook's JSON object."""

    subject: str
    text: str
    #: the webhook's body; holds `text` too (what Slack, Mattermost and Teams show)
    data: Mapping[str, object]


def _advice(code: str) -> str:
    return failure_info(code).advice


def _sentence(notice: Notice, naming: Naming, service: str) -> str:
    code = notice.code
    case = naming.name(notice.case_id) if notice.case_id is not None else "?"
    if code == NoticeCode.CASE_FAILED:
        reason = notice.reason or "internal_error"
        return f"Case {case} failed: {reason}. {_advice(reason)}"
    if code in (NoticeCode.CHECK_CONDITIONAL, NoticeCode.CHECK_FAILED):
        verdict = f"case verdict {notice.verdict}" if notice.verdict in ALARMING else ""
        what = "; ".join(w for w in (verdict, *notice.parts) if w)
        return f"Case {case}: {what}. {_advice(code)}"
    if code == NoticeCode.HOST_PAUSED:
        why = f": {notice.reason}" if notice.reason else ""
        return f"Host {notice.host} has been paused for {notice.minutes} min{why}. {_advice(code)}"
    if code == NoticeCode.HOST_RESUMED:
        after = f" after {notice.minutes} min" if notice.minutes is not None else ""
        return f"Host {notice.host} is connected again{after}. {_advice(code)}"
    if code == NoticeCode.SERVICE_FATAL_ERROR:
        return (
            f"The service on {service} is stopping on a fatal error ({notice.reason})."
            f" {_advice(code)}"
        )
    if code == NoticeCode.SERVICE_UNEXPECTED_STOP:
        return f"The service on {service} did not stop cleanly last time. {_advice(code)}"
    return f"The service on {service}: {code}. {_advice(code)}"


def _about(notice: Notice, naming: Naming, service: str) -> str:
    if notice.case_id is not None:
        return f"case {naming.name(notice.case_id)}"
    if notice.host is not None:
        return f"host {notice.host}"
    return service


def _fields(notice: Notice, naming: Naming) -> dict[str, object]:
    data: dict[str, object] = {"code": str(notice.code), "level": LEVELS[notice.code]}
    data.update(naming.fields(notice.case_id))
    optional = {
        "host": notice.host,
        "reason": notice.reason,
        "verdict": None if notice.verdict is None else str(notice.verdict),
        "minutes": notice.minutes,
    }
    data.update({k: v for k, v in optional.items() if v is not None})
    if notice.parts:
        data["parts"] = list(notice.parts)
    data["at"] = notice.at.isoformat(timespec="seconds")
    return data


def render(notice: Notice, naming: Naming, service: str) -> Message:
    """The message for one notice: a case by its key, codes and what to do, no patient data."""
    text = _sentence(notice, naming, service)
    subject = f"[mqi-async] {notice.code}: {_about(notice, naming, service)}"
    data = {**_fields(notice, naming), "service": service, "subject": subject, "text": text}
    return Message(subject=subject, text=text, data=data)


@dataclass(frozen=True, slots=True, kw_only=True)
class Digest:
    """The notices the rate limit held back: the first `DIGEST_LISTED`, and how many in all."""

    notices: tuple[Notice, ...]
    count: int


def render_digest(digest: Digest, naming: Naming, service: str) -> Message:
    """One message for all held-back notices ("and K more"); a digest of one is that notice."""
    if digest.count == 1 and len(digest.notices) == 1:
        return render(digest.notices[0], naming, service)
    by_code = Counter(str(n.code) for n in digest.notices)
    lines = [
        f"and {digest.count} more notices, held back by the rate limit:",
        *(f"- {n.code}: {_about(n, naming, service)}" for n in digest.notices),
    ]
    unlisted = digest.count - len(digest.notices)
    if unlisted > 0:
        lines.append(f"- and {unlisted} more not listed (the service's log has them)")
    lines.append(_advice(NoticeCode.FOLDED))
    text = "\n".join(lines)
    subject = f"[mqi-async] {NoticeCode.FOLDED}: and {digest.count} more on {service}"
    data: dict[str, object] = {
        "code": str(NoticeCode.FOLDED),
        "level": LEVELS[NoticeCode.FOLDED],
        "count": digest.count,
        "codes": dict(sorted(by_code.items())),
        "notices": [_fields(n, naming) for n in digest.notices],
        "service": service,
        "subject": subject,
        "text": text,
    }
    return Message(subject=subject, text=text, data=data)


# --- rate limit -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `max_messages` per sliding `window_s` seconds, on one channel."""

    max_messages: int
    window_s: float

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.window_s <= 0:
            raise ValueError("need max_messages >= 1 and window_s > 0")


class Throttle:
    """One channel's rate limit, on an injected monotonic clock (seconds).

    `admit` says whether a notice may go now; one that may not is folded, and so is every
    later one until `take_digest` hands them all over as one message, once the window has
    room. So a burst costs at most `max_messages` messages per window, and nothing is lost.
    """

    def __init__(self, limit: RateLimit) -> None:
        self._limit = limit
        self._sent: deque[float] = deque()
        self._folded: list[Notice] = []
        self._folded_count = 0

    @property
    def folded(self) -> int:
        """Notices waiting for the next digest."""
        return self._folded_count

    def _expire(self, now: float) -> None:
        while self._sent and self._sent[0] <= now - self._limit.window_s:
            self._sent.popleft()

    def _has_room(self, now: float) -> bool:
        self._expire(now)
        return len(self._sent) < self._limit.max_messages

    def admit(self, notice: Notice, now: float) -> bool:
        """True: send it now (it counts against the limit). False: it was folded."""
        if self._folded_count or not self._has_room(now):
            self.fold(notice)
            return False
        self._sent.append(now)
        return True

    def fold(self, notice: Notice) -> None:
        """Hold a notice for the next digest (also one a full queue had to drop)."""
        self._folded_count += 1
        if len(self._folded) < DIGEST_LISTED:
            self._folded.append(notice)

    def take_digest(self, now: float, *, force: bool = False) -> Digest | None:
        """The folded notices as one digest, when the window has room (or `force`, for the
        last message before the service stops); None when nothing is folded or no room."""
        if not self._folded_count or not (self._has_room(now) or force):
            return None
        self._sent.append(now)
        digest = Digest(notices=tuple(self._folded), count=self._folded_count)
        self._folded = []
        self._folded_count = 0
        return digest

    def seconds_until_digest(self, now: float) -> float | None:
        """How long until `take_digest` can succeed; None when nothing is folded."""
        if not self._folded_count:
            return None
        if self._has_room(now):
            return 0.0
        return max(0.0, self._sent[0] + self._limit.window_s - now)


def retry_delay_s(attempt: int, *, initial_s: float, max_s: float) -> float:
    """Seconds to wait after failed try number `attempt` (1, 2, …): doubling, capped."""
    return float(min(max_s, initial_s * 2 ** max(0, attempt - 1)))


def views_by_id(views: Sequence[CaseView]) -> dict[str, CaseView]:
    return {v.case_id: v for v in views}
