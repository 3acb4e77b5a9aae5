"""Notifications (notify:): a read-only adapter on the store that tells people, by webhook
and e-mail, when a case or a check needs them; see `domain.notices` for the rules."""

from __future__ import annotations

from mqi_async.notify.marker import RunningMarker
from mqi_async.notify.notifier import Channel, NoticeSource, Notifier, build_notifier

__all__ = ["Channel", "NoticeSource", "Notifier", "RunningMarker", "build_notifier"]
