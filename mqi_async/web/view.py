"""The web view's routes: pages and fragments, downloads, the JSON API, actions, /metrics and
/healthz, with sign-in, CSRF checks and security headers on every answer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

from aiohttp import web

from mqi_async.config import WebSettings
from mqi_async.domain.records import CommandKind, ReportRow
from mqi_async.store import CaseSnapshot, Store
from mqi_async.store.metrics import MetricsSnapshot
from mqi_async.web import metrics, pages
from mqi_async.web.auth import (
    COOKIE,
    Authenticator,
    Credential,
    Session,
    SessionSigner,
    derive_key,
)
from mqi_async.web.downloads import allowed_file, disposition, stream_zip
from mqi_async.web.pacing import Pacer
from mqi_async.web.reads import ReadCache

log = logging.getLogger(__name__)

#: every page and fragment; the report's HTML gets its own, stricter one
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self';"
    " object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
#: the case report's HTML is one self-contained file: inline style and pictures, nothing else
REPORT_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none';"
    " form-action 'none'; frame-ancestors 'none'; sandbox"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
#: how long one store read answers the same question (pages, fragments, /metrics)
READ_MAX_AGE_S = 2.0
#: events shown on a case's page
CASE_EVENTS = 50
#: a request waits this long at most for its turn (web.max_requests_per_second), then 503
MAX_WAIT_S = 5.0
#: a failed sign-in answers after this long (slows guessing)
FAILED_LOGIN_DELAY_S = 1.0
_STATIC = {"app.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8"}
_ACTION_KINDS = {
    "retry": CommandKind.RETRY,
    "cancel": CommandKind.CANCEL,
    "recheck": CommandKind.RECHECK,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    """The service's own word on itself, for `/healthz`."""

    #: "starting", "running" or "stopping"
    service: str
    #: the engine's database error while writes fail (the engine waits), else None
    database_error: str | None

    @property
    def is_ok(self) -> bool:
        return self.service == "running" and self.database_error is None


class WebView:
    """Builds the aiohttp application over the service's store; reads, and writes commands."""

    def __init__(
        self,
        settings: WebSettings,
        *,
        store: Store,
        secret: bytes,
        work_directory: Path,
        hosts_state: Callable[[], dict[str, str]],
        health: Callable[[], Health],
        started_at: datetime,
    ) -> None:
        self._settings = settings
        self._store = store
        self._root = work_directory
        self._hosts_state = hosts_state
        self._health = health
        self._started_at = started_at
        credentials = [
            Credential(name=t.name, hash=t.hash.get_secret_value(), is_token=True)
            for t in settings.tokens
        ] + [
            Credential(name=u.name, hash=u.password_hash.get_secret_value(), is_token=False)
            for u in settings.users
        ]
        self._auth = Authenticator(credentials, key=derive_key(secret, "token cache"))
        self._signer = SessionSigner(
            derive_key(secret, "session"), lifetime_s=settings.session_hours * 3600
        )
        self._reads = ReadCache(max_age_s=READ_MAX_AGE_S)
        rate = settings.max_requests_per_second
        self._pacer = Pacer(rate_per_s=rate, burst=max(10.0, rate), max_wait_s=MAX_WAIT_S)
        folder = resources.files("mqi_async.web") / "static"
        self._static = {name: (folder / name).read_bytes() for name in _STATIC}
        self.app = web.Application(
            middlewares=[self._headers_middleware], client_max_size=64 * 1024
        )
        self.app.on_cleanup.append(self._on_cleanup)
        self.app.add_routes(
            [
                web.get("/", self.cases),
                web.get("/fragments/cases", self.cases_fragment),
                web.get("/case", self.case),
                web.get("/fragments/case", self.case_fragment),
                web.post("/case/action", self.case_action),
                web.get("/hosts", self.hosts),
                web.get("/fragments/hosts", self.hosts_fragment),
                web.get("/download/report.pdf", self.report_pdf),
                web.get("/download/report.html", self.report_html),
                web.get("/download/dose.zip", self.dose_zip),
                web.get("/api/status", self.api_status),
                web.get("/api/case", self.api_case),
                web.post("/api/case/action", self.api_action),
                web.get("/metrics", self.metrics),
                web.get("/healthz", self.healthz),
                web.get("/login", self.login_form),
                web.post("/login", self.login),
                web.post("/logout", self.logout),
                web.get("/static/{name}", self.static),
            ]
        )

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self._reads.aclose()

    # -- plumbing -----------------------------------------------------------------------------

    @web.middleware
    async def _headers_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            if request.path != "/healthz" and not await self._pacer.admit():
                raise web.HTTPServiceUnavailable(
                    text="too many requests; try again shortly", headers={"Retry-After": "2"}
                )
            if self._settings.login_to_view and not await self._may_view(request):
                raise self._sign_in_first(request)
            response = await handler(request)
        except web.HTTPException as exc:
            _secure(exc)
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("web: %s %s failed", request.method, request.path)
            response = self._html(
                pages.message_page("Something went wrong", "The error is in the service's log."),
                "Error",
                None,
                status=500,
            )
        _secure(response)
        return response

    async def _may_view(self, request: web.Request) -> bool:
        if request.path in ("/login", "/healthz", "/metrics") or request.path.startswith(
            "/static/"
        ):
            return True
        return self._session(request) is not None or await self._bearer(request) is not None

    def _sign_in_first(self, request: web.Request) -> web.HTTPException:
        if request.path.startswith(("/api/", "/fragments/", "/download/")):
            return web.HTTPUnauthorized(
                text="sign in first", headers={"WWW-Authenticate": 'Bearer realm="mqi-async"'}
            )
        return web.HTTPSeeOther(f"/login?{_query({'next': request.path_qs})}")

    def _session(self, request: web.Request) -> Session | None:
        session = self._signer.read(request.cookies.get(COOKIE))
        if session is None or session.name not in self._auth.names():
            return None
        return session

    async def _bearer(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return await self._auth.token(token.strip())

    def _viewer(self, session: Session | None) -> pages.Viewer:
        return pages.Viewer(
            name=session.name if session else None,
            csrf=self._signer.csrf_token(session) if session else "",
            can_sign_in=self._auth.is_enabled,
        )

    def _html(
        self,
        main: str,
        title: str,
        session: Session | None,
        *,
        status: int = 200,
        active: str = "",
        notice: str = "",
    ) -> web.Response:
        body = pages.layout(
            title,
            main,
            viewer=self._viewer(session),
            refresh_s=self._settings.refresh_seconds,
            active=active,
            notice=notice,
        )
        return web.Response(
            text=body,
            status=status,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )

    @staticmethod
    def _fragment(text: str) -> web.Response:
        return web.Response(
            text=text,
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-store"},
        )

    def _same_origin(self, request: web.Request) -> bool:
        """A form post comes from this site's own pages (with the CSRF token as the real check).

        A foreign Origin, Referer or Sec-Fetch-Site is refused. `Origin: null` is what browsers
        send for a form on a page with `Referrer-Policy: no-referrer`; it passes only with the
        session's CSRF token (checked by the caller) and the SameSite=Strict cookie.
        """
        expected = self._settings.public_origin.rstrip("/") or f"{request.scheme}://{request.host}"
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("Origin")
        if origin is not None and origin != "null" and origin != expected:
            return False
        referer = request.headers.get("Referer")
        if referer is not None:
            parts = urlsplit(referer)
            if f"{parts.scheme}://{parts.netloc}" != expected:
                return False
        return True

    async def _case(self, case_id: str) -> tuple[CaseSnapshot | None, str, int]:
        """The case, its live part rendered, and its dose files (shared by every viewer)."""

        async def load() -> tuple[CaseSnapshot | None, str, int]:
            case, events, report = await self._store.case_view(case_id, events=CASE_EVENTS)
            if case is None:
                return None, "", 0
            pdf, html, doses = await self._case_files(case, report)
            files = pages.CaseFiles(
                report_pdf=pdf is not None, report_html=html is not None, dose_files=len(doses)
            )
            return case, pages.case_fragment(case, files, events), len(doses)

        return await self._reads.get(("case", case_id), load)

    async def _case_files(
        self, case: CaseSnapshot, report: ReportRow | None
    ) -> tuple[Path | None, Path | None, list[Path]]:
        """The case's report PDF and HTML and its beams' RT Doses: only what the store names
        for this case, and only where it exists under the work folder."""
        html_path: str | None = None
        if case.report:
            html_path = (report.html if report and report.html else None) or str(
                Path(case.report).with_suffix(".html")
            )
        paths = [o for b in case.beams for o in b.outputs]

        def check() -> tuple[Path | None, Path | None, list[Path]]:
            found = [allowed_file(p, self._root) for p in paths]
            return (
                allowed_file(case.report, self._root),
                allowed_file(html_path, self._root),
                [p for p in found if p is not None],
            )

        return await asyncio.to_thread(check)

    # -- pages ----------------------------------------------------------------------------------

    async def _cases_part(self, filt: pages.CaseFilter) -> str:
        async def load() -> str:
            cases, counts = await self._store.dashboard(recent=200, text=filt.text)
            return pages.cases_fragment(cases, counts, filt, datetime.now(UTC))

        return await self._reads.get(("cases", filt), load)

    async def cases(self, request: web.Request) -> web.Response:
        filt = pages.CaseFilter.from_query(request.query)
        main = pages.cases_page(filt, await self._cases_part(filt))
        return self._html(main, "Cases", self._session(request), active="cases")

    async def cases_fragment(self, request: web.Request) -> web.Response:
        return self._fragment(await self._cases_part(pages.CaseFilter.from_query(request.query)))

    async def case(self, request: web.Request) -> web.Response:
        case_id = request.query.get("id", "")
        session = self._session(request)
        case, live, _ = await self._case(case_id) if case_id else (None, "", 0)
        if case is None:
            return self._html(
                pages.message_page("No such case", f"There is no case {case_id!r}."),
                "No such case",
                session,
                status=404,
            )
        pending = (
            [c for c in await self._store.pending_commands() if c.case_id == case_id]
            if session is not None
            else []
        )
        actions = pages.actions_part(case, self._viewer(session), pending)
        return self._html(
            pages.case_page(case, live, actions),
            f"Case {case_id}",
            session,
            active="cases",
            notice=_done_notice(request.query),
        )

    async def case_fragment(self, request: web.Request) -> web.Response:
        case, live, _ = await self._case(request.query.get("id", ""))
        if case is None:
            raise web.HTTPNotFound(text="no such case")
        return self._fragment(live)

    async def _hosts_part(self) -> str:
        async def load() -> str:
            hosts, gpus, leases = await self._store.hosts_view()
            return pages.hosts_fragment(hosts, self._hosts_state(), gpus, leases, datetime.now(UTC))

        return await self._reads.get(("hosts",), load)

    async def hosts(self, request: web.Request) -> web.Response:
        main = pages.hosts_page(await self._hosts_part())
        return self._html(main, "Hosts and GPUs", self._session(request), active="hosts")

    async def hosts_fragment(self, request: web.Request) -> web.Response:
        return self._fragment(await self._hosts_part())

    # -- downloads ------------------------------------------------------------------------------

    async def _download(
        self, request: web.Request
    ) -> tuple[CaseSnapshot, Path | None, Path | None, list[Path]]:
        """The case a download names by id, and the files the store names for it."""
        case_id = request.query.get("id", "")
        case, _, report = (
            await self._store.case_view(case_id, events=0) if case_id else (None, [], None)
        )
        if case is None:
            raise web.HTTPNotFound(text="no such case")
        return (case, *await self._case_files(case, report))

    async def report_pdf(self, request: web.Request) -> web.StreamResponse:
        case, pdf, _, _ = await self._download(request)
        if pdf is None:
            raise web.HTTPNotFound(text="this case has no report yet")
        return web.FileResponse(
            pdf,
            headers={
                "Content-Type": "application/pdf",
                "Content-Disposition": disposition("attachment", f"{case.case_id} report.pdf"),
                "Cache-Control": "no-store",
            },
        )

    async def report_html(self, request: web.Request) -> web.StreamResponse:
        case, _, html, _ = await self._download(request)
        if html is None:
            raise web.HTTPNotFound(text="this case has no report yet")
        kind = "attachment" if request.query.get("download") else "inline"
        return web.FileResponse(
            html,
            headers={
                "Content-Type": "text/html; charset=utf-8",
                "Content-Disposition": disposition(kind, f"{case.case_id} report.html"),
                "Content-Security-Policy": REPORT_CSP,
                "Cache-Control": "no-store",
            },
        )

    async def dose_zip(self, request: web.Request) -> web.StreamResponse:
        case, _, _, doses = await self._download(request)
        if not doses:
            raise web.HTTPNotFound(text="this case has no RT Dose files yet")
        return await stream_zip(request, doses, f"{case.case_id} rtdose.zip")

    # -- the JSON API, /metrics and /healthz ------------------------------------------------------

    async def api_status(self, request: web.Request) -> web.Response:
        async def load() -> bytes:
            return json.dumps(await self._store.status_document(), ensure_ascii=False).encode()

        body = await self._reads.get(("status",), load)
        return web.Response(
            body=body, content_type="application/json", headers={"Cache-Control": "no-store"}
        )

    async def api_case(self, request: web.Request) -> web.Response:
        case, _, _ = await self._case(request.query.get("id", ""))
        if case is None:
            raise web.HTTPNotFound(text="no such case")
        return web.json_response(case.as_dict(), dumps=_dumps)

    async def metrics(self, request: web.Request) -> web.Response:
        async def load() -> tuple[MetricsSnapshot, float]:
            started = time.perf_counter()
            snap = await self._store.metrics()
            return snap, time.perf_counter() - started

        snap, read_s = await self._reads.get(("metrics",), load)
        health = self._health()
        live = metrics.LiveState(
            service=health.service,
            database_error=health.database_error,
            hosts=self._hosts_state(),
            uptime_s=(datetime.now(UTC) - self._started_at).total_seconds(),
            read_s=read_s,
        )
        body = metrics.render(snap, live)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.Response:
        health = self._health()
        doc = {
            "status": "ok" if health.is_ok else "unavailable",
            "service": health.service,
            "database": "writable" if health.database_error is None else health.database_error,
            "hosts": self._hosts_state(),
            "uptime_s": round((datetime.now(UTC) - self._started_at).total_seconds(), 1),
        }
        return web.json_response(
            doc, status=200 if health.is_ok else 503, headers={"Cache-Control": "no-store"}
        )

    # -- actions --------------------------------------------------------------------------------

    async def _enqueue(self, action: str, case_id: str, who: str, via: str) -> int:
        """Record the command for the engine; raises 400/404 for a bad action or case."""
        kind = _ACTION_KINDS.get(action)
        if kind is None or not case_id:
            raise web.HTTPBadRequest(text="action must be retry, cancel or recheck, with a case id")
        row = await self._store.enqueue_command(kind, case_id, {"by": who, "via": via})
        if row is None:
            raise web.HTTPNotFound(text="no such case")
        self._reads.forget()
        log.info(
            "web: %s of case %s requested by %s (command %d, %s)",
            action,
            case_id,
            who,
            row.command_id,
            via,
            extra={"case_id": case_id, "component": "web"},
        )
        return row.command_id

    async def case_action(self, request: web.Request) -> web.Response:
        session = self._session(request)
        form = await request.post()
        if session is None:
            raise web.HTTPForbidden(text="sign in to retry, cancel or re-run checks")
        if not self._same_origin(request) or not self._signer.check_csrf(
            session, _field(form, "csrf")
        ):
            log.warning("web: refused a cross-site or stale form post by %s", session.name)
            raise web.HTTPForbidden(text="this form is stale or came from another site; reload")
        case_id, action = _field(form, "id"), _field(form, "action")
        command_id = await self._enqueue(action, case_id, session.name, "web form")
        location = pages.case_url(case_id) + f"&{_query({'done': action, 'command': command_id})}"
        raise web.HTTPSeeOther(location)

    async def api_action(self, request: web.Request) -> web.Response:
        who = await self._bearer(request)
        if who is None:
            raise web.HTTPUnauthorized(
                text="a bearer token is needed",
                headers={"WWW-Authenticate": 'Bearer realm="mqi-async"'},
            )
        try:
            data = await request.json() if request.content_type == "application/json" else {}
        except ValueError as exc:
            raise web.HTTPBadRequest(text="the body is not JSON") from exc
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="the body must be a JSON object")
        case_id = str(data.get("case_id") or request.query.get("id", ""))
        action = str(data.get("action") or request.query.get("action", ""))
        command_id = await self._enqueue(action, case_id, who, "api")
        return web.json_response(
            {"command_id": command_id, "case_id": case_id, "action": action, "by": who},
            status=202,
            dumps=_dumps,
        )

    # -- sign-in --------------------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.Response:
        if not self._auth.is_enabled:
            raise web.HTTPNotFound(text="no web token or user is configured")
        main = pages.login_page(next_url=_local_next(request.query.get("next")), failed=False)
        return self._html(main, "Sign in", self._session(request))

    async def login(self, request: web.Request) -> web.Response:
        if not self._auth.is_enabled:
            raise web.HTTPNotFound(text="no web token or user is configured")
        if not self._same_origin(request):
            raise web.HTTPForbidden(text="this form came from another site")
        form = await request.post()
        user, secret = _field(form, "user").strip(), _field(form, "password")
        next_url = _local_next(_field(form, "next"))
        name = await self._auth.password(user, secret) if user else await self._auth.token(secret)
        if name is None:
            log.warning("web: failed sign-in%s", f" as {user}" if user else " with a token")
            await asyncio.sleep(FAILED_LOGIN_DELAY_S)
            main = pages.login_page(next_url=next_url, failed=True)
            return self._html(main, "Sign in", None, status=401)
        cookie, _session = self._signer.issue(name)
        log.info("web: %s signed in", name, extra={"component": "web"})
        response = web.HTTPSeeOther(next_url)
        response.set_cookie(
            COOKIE,
            cookie,
            max_age=int(self._signer.lifetime_s),
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self._settings.cookie_secure,
        )
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        session = self._session(request)
        form = await request.post()
        if session is not None and (
            not self._same_origin(request)
            or not self._signer.check_csrf(session, _field(form, "csrf"))
        ):
            raise web.HTTPForbidden(text="this form is stale or came from another site")
        response = web.HTTPSeeOther("/")
        response.del_cookie(COOKIE, path="/")
        raise response

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._static:
            raise web.HTTPNotFound()
        return web.Response(
            body=self._static[name],
            headers={"Content-Type": _STATIC[name], "Cache-Control": "max-age=300"},
        )


def _secure(response: web.StreamResponse) -> None:
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)


def _field(form: Mapping[str, object], name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _query(params: Mapping[str, object]) -> str:
    return urlencode({k: str(v) for k, v in params.items()}, quote_via=quote)


def _local_next(value: str | None) -> str:
    """Where to go after signing in: a path on this site only (no open redirect)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _done_notice(query: Mapping[str, str]) -> str:
    action, command = query.get("done", ""), query.get("command", "")
    if action not in _ACTION_KINDS or not command.isdigit():
        return ""
    label = pages.ACTIONS[action].lower()
    return (
        f"{label.capitalize()} requested (command {command}); the service carries it out shortly."
    )


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)
