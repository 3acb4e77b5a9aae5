"""The web server's life in the service's loop: bind, serve until cancelled, close in bounded time."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from mqi_async.config import WebSettings
from mqi_async.web.view import WebView

log = logging.getLogger(__name__)

#: open requests get this long to finish when the service stops
SHUTDOWN_S = 2.0


class WebServer:
    """Serves a `WebView` on `web.bind`:`web.port`; `run()` until cancelled (by the service)."""

    def __init__(self, settings: WebSettings, view: WebView) -> None:
        self._settings = settings
        self.view = view

    async def run(self) -> None:
        """Bind and serve. A port in use raises OSError (the service logs it and tries again).

        Raises:
            OSError: the address cannot be bound.
        """
        runner = web.AppRunner(
            self.view.app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_S
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._settings.bind, self._settings.port)
            await site.start()
            log.info(
                "web view on http://%s:%d/ (metrics at /metrics, health at /healthz)",
                self._settings.bind,
                self._settings.port,
                extra={"component": "web"},
            )
            await asyncio.Event().wait()
        finally:
            try:
                async with asyncio.timeout(SHUTDOWN_S + 1):
                    await runner.cleanup()
            except TimeoutError:
                log.warning("web server: connections still open after %.0f s", SHUTDOWN_S + 1)
