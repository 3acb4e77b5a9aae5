"""The web view and /metrics (web:): an aiohttp server in the service's own loop that reads
the store and writes only `commands` rows; see README "Web view and metrics"."""

from __future__ import annotations

from mqi_async.web.server import WebServer
from mqi_async.web.view import Health, WebView

__all__ = ["Health", "WebServer", "WebView"]
