"""The webhook channel: one JSON POST per message, with aiohttp."""

from __future__ import annotations

import aiohttp

from mqi_async.config import WebhookSettings
from mqi_async.domain.errors import PermanentError, TransientError
from mqi_async.domain.notices import Message

#: statuses worth another try; any other 4xx is a config error (URL, token)
_RETRY_STATUSES = frozenset({408, 425, 429})


class WebhookChannel:
    """POSTs `Message.data` as JSON. The URL is a secret and never appears in an error."""

    name = "webhook"

    def __init__(self, settings: WebhookSettings) -> None:
        self._url = settings.url.get_secret_value()
        self._headers = {k: v.get_secret_value() for k, v in settings.headers.items()}
        self.timeout_s = settings.timeout_seconds
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                headers=self._headers,
            )
        return self._session

    async def send(self, message: Message) -> None:
        """Raises:
        TransientError: `notify_delivery_failed` for network errors and 5xx, 408, 429.
        PermanentError: `notify_delivery_failed` for any other status that is not 2xx.
        """
        try:
            async with self._client().post(self._url, json=dict(message.data)) as response:
                status = response.status
                await response.read()
        except aiohttp.ClientError as exc:
            # str() of a response error names the URL, which holds the token
            raise TransientError("notify_delivery_failed", f"webhook: {_describe(exc)}") from None
        if 200 <= status < 300:
            return
        detail = f"webhook answered HTTP {status}"
        if status >= 500 or status in _RETRY_STATUSES:
            raise TransientError("notify_delivery_failed", detail)
        raise PermanentError("notify_delivery_failed", detail)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _describe(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or 'refused'})"
    return type(exc).__name__
