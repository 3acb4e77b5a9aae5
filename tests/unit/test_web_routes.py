"""The web view's routes on a real store, through aiohttp's test client: pages, downloads (no
traversal), actions (refused without a sign-in or token, recorded with one), /metrics
against `status --json`, /healthz, security headers."""

from __future__ import annotations

import asyncio
import io
import re
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from mqi_async.config import WebSettings, WebTokenSettings, WebUserSettings
from mqi_async.domain.model import BeamStatus, CaseStatus, RunStatus
from mqi_async.domain.records import NewDelivery
from mqi_async.domain.verdict import QaStatus
from mqi_async.store import NewBeam, NewCase, Store
from mqi_async.web import Health, WebView
from mqi_async.web.auth import make_hash

Client = TestClient[web.Request, web.Application]
TOKEN = "robot-token-0123456789"
PASSWORD = "alice-password"
NESTED = "P0042/1.2.826.0.1.3680043.2"
PIPELINE = [
    BeamStatus.UPLOADING,
    BeamStatus.QUEUED,
    BeamStatus.LAUNCHING,
    BeamStatus.RUNNING,
    BeamStatus.DOWNLOADING,
    BeamStatus.CONVERTING,
    BeamStatus.COMPLETED,
]


@dataclass
class Site:
    store: Store
    work: Path
    outside: Path
    health: list[Health]


async def _completed_beam(store: Store, beam_id: str, outputs: list[str]) -> None:
    for status in PIPELINE[:3]:
        await store.transition_beam(beam_id, status)
    run = await store.start_run(
        beam_id, host="gpu1", gpu_uuids=["GPU-1"], job_dir_for=lambda a: f"/r/{a}"
    )
    await store.transition_beam(beam_id, BeamStatus.RUNNING)
    await store.finish_run(run.run_id, RunStatus.SUCCEEDED, exit_code=0)
    for status in PIPELINE[4:]:
        await store.transition_beam(beam_id, status)
    await store.update_beam(beam_id, {"outputs": outputs, "progress": 100})


async def _seed(store: Store, work: Path, outside: Path) -> None:
    """C1: completed, checked, report written; NESTED: pending; F1: failed; EVIL: rows that
    point outside the work folder (as a damaged or forged database would)."""
    day = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
    await store.register_case(
        NewCase(case_id="C1", case_path="/in/C1", safe_name="C1", room="G2"),
        [NewBeam(beam_index=1, beam_number=2, beam_name="1G090"), NewBeam(beam_index=2, beam_number=3)],
        [
            NewDelivery(delivery_id="d1", delivery_path="/in/C1/2026120108", delivered_at=day,
                        fraction_index=1, raw_beam_number=2, treatment_beam_index=1),
            NewDelivery(delivery_id="d2", delivery_path="/in/C1/2026120208",
                        delivered_at=day + timedelta(days=1), fraction_index=2, raw_beam_number=2,
                        treatment_beam_index=1),
        ],
    )  # fmt: skip
    (work / "C1" / "dose").mkdir(parents=True)
    doses = []
    for k in (1, 2):
        path = work / "C1" / "dose" / f"beam_{k}.dcm"
        path.write_bytes(b"DICM" + bytes([k]) * 1000)
        doses.append(str(path))
        await _completed_beam(store, f"C1_beam_{k}", [str(path)])
    await store.transition_case("C1", CaseStatus.PROCESSING)
    await store.transition_case("C1", CaseStatus.COMPLETED)
    await store.record_dose_check(
        "C1",
        "C1_beam_1",
        status=QaStatus.PASSED,
        result={"pass_rate_percent": 99.1, "gamma_mean": 0.2},
    )
    await store.record_dose_check(
        "C1", "C1_beam_2", status=QaStatus.CONDITIONAL, result={"pass_rate_percent": 88.0}
    )
    await store.record_dose_check("C1", None, status=QaStatus.PASSED,
                                  result={"pass_rate_percent": 97.5})  # fmt: skip
    for d, status in zip(
        await store.list_deliveries("C1"), (QaStatus.PASSED, QaStatus.FAILED), strict=True
    ):
        await store.record_delivery_check(d, status=status, result={"pass_rate_percent": 70.0})  # fmt: skip
    (work / "C1" / "report.pdf").write_bytes(b"%PDF-1.4 report of C1")
    (work / "C1" / "report.html").write_text("<!DOCTYPE html><p>report of C1</p>")
    await store.record_report("C1", pdf=str(work / "C1" / "report.pdf"),
                              html=str(work / "C1" / "report.html"), verdict="failed",
                              as_of=datetime.now(UTC))  # fmt: skip

    await store.register_case(
        NewCase(case_id=NESTED, case_path="/in/G1/P0042/1.2", safe_name="P0042_x", room="G1"),
        [NewBeam(beam_index=1, beam_number=1)],
    )
    await store.register_case(NewCase(case_id="F1", case_path="/in/F1", safe_name="F1"))
    await store.transition_case(
        "F1", CaseStatus.FAILED, changes={"error": "missing_rtplan: Put the RTPLAN in the folder"}
    )
    await store.register_case(
        NewCase(case_id="EVIL", case_path="/in/EVIL", safe_name="EVIL"),
        [NewBeam(beam_index=1, beam_number=1)],
    )
    await store.update_beam("EVIL_beam_1", {"outputs": ["/etc/passwd", str(outside), f"{work}/../outside.txt"]})  # fmt: skip
    await store.record_report("EVIL", pdf=str(outside), html="/etc/passwd", verdict="passed",
                              as_of=datetime.now(UTC))  # fmt: skip


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    work = tmp_path / "work"
    work.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("SECRET outside the work folder")
    async with await Store.open(tmp_path / "mqi.db") as store:
        await _seed(store, work, outside)
        yield Site(store=store, work=work, outside=outside,
                   health=[Health(service="running", database_error=None)])  # fmt: skip


def _view(site: Site, **options: bool) -> WebView:
    settings = WebSettings(
        enabled=True,
        tokens=[WebTokenSettings(name="robot", hash=SecretStr(make_hash(TOKEN)))],
        users=[WebUserSettings(name="alice", password_hash=SecretStr(make_hash(PASSWORD)))],
        **options,
    )
    return WebView(
        settings,
        store=site.store,
        secret=b"s" * 32,
        work_directory=site.work,
        hosts_state=lambda: {"gpu1": "connected", "gpu2": "paused (host_unreachable: no route)"},
        health=lambda: site.health[-1],
        started_at=datetime.now(UTC) - timedelta(seconds=30),
    )


@pytest.fixture
async def client(site: Site) -> AsyncIterator[Client]:
    async with TestClient(TestServer(_view(site).app)) as c:
        yield c


async def _raw_get(client: Client, raw_target: str) -> tuple[int, bytes]:
    """GET `raw_target` byte for byte over a plain socket: no client normalises `..` or escapes."""
    url = client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            f"GET {raw_target} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def _sign_in(client: Client, user: str = "alice", password: str = PASSWORD) -> str:
    """Sign in through the form; returns the CSRF token of the case page's forms."""
    r = await client.post("/login", data={"user": user, "password": password, "next": "/"},
                          allow_redirects=False)  # fmt: skip
    assert r.status == 303, await r.text()
    cookie = r.cookies["mqi_session"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict"
    page = await (await client.get("/case", params={"id": "C1"})).text()
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


# -- pages ------------------------------------------------------------------------------------


async def test_every_page_carries_the_security_headers(client: Client) -> None:
    for path in ("/", "/case?id=C1", "/hosts", "/api/status", "/metrics", "/healthz", "/nope",
                 "/static/app.js", "/fragments/cases"):  # fmt: skip
        r = await client.get(path)
        assert r.headers["Content-Security-Policy"].startswith("default-src 'self'"), path
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["Referrer-Policy"] == "no-referrer"
    page = await (await client.get("/")).text()
    # no CDN: every script and style is the service's own
    assert not re.search(r'(src|href)="(https?:)?//', page)


async def test_cases_list_filters_and_searches(client: Client) -> None:
    page = await (await client.get("/")).text()
    for case_id in ("C1", NESTED, "F1", "EVIL"):
        assert f'data-case="{case_id}"' in page
    assert 'class="badge v-failed">failed' in page  # C1's verdict: a delivery failed
    failed = await (await client.get("/fragments/cases", params={"status": "failed"})).text()
    assert 'data-case="F1"' in failed and 'data-case="C1"' not in failed
    by_verdict = await (await client.get("/fragments/cases", params={"verdict": "failed"})).text()
    assert 'data-case="C1"' in by_verdict and 'data-case="F1"' not in by_verdict
    search = await (await client.get("/fragments/cases", params={"q": "P004"})).text()
    assert f'data-case="{NESTED}"' in search and 'data-case="C1"' not in search
    none = await (await client.get("/fragments/cases", params={"q": "zzz"})).text()
    assert "No case matches" in none


async def test_case_page_shows_beams_daily_record_and_downloads(client: Client) -> None:
    page = await (await client.get("/case", params={"id": "C1"})).text()
    assert 'data-beam="C1_beam_1"' in page and 'data-beam="C1_beam_2"' in page
    assert "Fraction 1" in page and "Fraction 2" in page
    assert 'id="report-pdf"' in page and 'id="dose-zip"' in page
    assert "Sign in</a> to retry" in page  # read-only without a sign-in
    nested = await client.get("/case", params={"id": NESTED})
    assert nested.status == 200 and NESTED in await nested.text()
    missing = await client.get("/case", params={"id": "nope"})
    assert missing.status == 404


async def test_api_status_is_the_status_json_document(client: Client, site: Site) -> None:
    got = await (await client.get("/api/status")).json()
    assert got == await site.store.status_document()
    assert [c["case_id"] for c in got["cases"]] == ["C1", NESTED, "F1", "EVIL"]
    one = await (await client.get("/api/case", params={"id": "C1"})).json()
    assert one == got["cases"][0]


async def test_hosts_page_shows_the_engines_view(client: Client) -> None:
    page = await (await client.get("/hosts")).text()
    assert 'data-host="gpu1"' in page and "paused (host_unreachable" in page


async def test_login_to_view_hides_everything_but_metrics_and_health(site: Site) -> None:
    async with TestClient(TestServer(_view(site, login_to_view=True).app)) as c:
        r = await c.get("/case?id=C1", allow_redirects=False)
        assert r.status == 303 and r.headers["Location"].startswith("/login?next=")
        assert (await c.get("/api/status")).status == 401
        assert (await c.get("/fragments/cases")).status == 401
        assert (await c.get("/metrics")).status == 200
        assert (await c.get("/healthz")).status == 200
        ok = await c.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status == 200
        await _sign_in(c)
        assert (await c.get("/")).status == 200


# -- downloads ------------------------------------------------------------------------------


async def test_downloads_serve_the_files_the_store_names(client: Client, site: Site) -> None:
    pdf = await client.get("/download/report.pdf", params={"id": "C1"})
    assert pdf.status == 200 and (await pdf.read()).startswith(b"%PDF")
    assert pdf.headers["Content-Disposition"].startswith("attachment;")
    html = await client.get("/download/report.html", params={"id": "C1"})
    assert html.status == 200 and "report of C1" in await html.text()
    assert html.headers["Content-Security-Policy"].startswith("default-src 'none'")
    z = await client.get("/download/dose.zip", params={"id": "C1"})
    assert z.status == 200 and z.headers["Content-Type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(await z.read())) as zf:
        assert sorted(zf.namelist()) == ["beam_1.dcm", "beam_2.dcm"]
        assert zf.read("beam_2.dcm") == b"DICM" + b"\x02" * 1000
    # a case with nothing to download yet
    assert (await client.get("/download/report.pdf", params={"id": NESTED})).status == 404
    assert (await client.get("/download/dose.zip", params={"id": NESTED})).status == 404


@pytest.mark.parametrize(
    "raw",
    [
        "/download/report.pdf?id=../../../../etc/passwd",
        "/download/report.pdf?id=..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/download/report.pdf?id=%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/download/report.pdf?id=..%252F..%252Fetc%252Fpasswd",
        "/download/report.pdf?id=%2Fetc%2Fpasswd",
        "/download/report.html?id=..%5C..%5Cetc%5Cpasswd",
        "/download/dose.zip?id=C1%2F..%2F..%2Fetc",
        "/download/../../../../etc/passwd",
        "/download/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/download/..%2f..%2f..%2fetc%2fpasswd",
        "/static/..%2fview.py",
        "/static/%2e%2e%2fview.py",
        "/static/../view.py",
        "/download/report.pdf?id=EVIL",
        "/download/report.html?id=EVIL",
        "/download/dose.zip?id=EVIL",
    ],
)
async def test_no_path_from_a_request_is_ever_served(
    client: Client,
    raw: str,
) -> None:
    status, body = await _raw_get(client, raw)
    assert status in (400, 404), (status, body[:200])
    assert b"root:" not in body and b"SECRET" not in body and b"class WebView" not in body


async def test_a_request_path_parameter_is_ignored(client: Client) -> None:
    r = await client.get("/download/report.pdf", params={"id": "C1", "path": "/etc/passwd"})
    assert (await r.read()).startswith(b"%PDF-1.4 report of C1")


# -- actions ----------------------------------------------------------------------------------


async def test_actions_without_a_sign_in_or_token_are_refused(client: Client, site: Site) -> None:
    form = await client.post("/case/action", data={"id": "C1", "action": "retry"},
                             allow_redirects=False)  # fmt: skip
    assert form.status == 403
    api = await client.post("/api/case/action", json={"case_id": "C1", "action": "retry"})
    assert api.status == 401 and api.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = await client.post("/api/case/action", json={"case_id": "C1", "action": "retry"},
                              headers={"Authorization": "Bearer not-the-token"})  # fmt: skip
    assert wrong.status == 401
    # a session cookie is no API credential (the API has no CSRF token)
    await _sign_in(client)
    cookie_only = await client.post("/api/case/action", json={"case_id": "C1", "action": "retry"})
    assert cookie_only.status == 401
    assert await site.store.pending_commands() == []


async def test_an_api_token_records_the_command_and_who(client: Client, site: Site) -> None:
    r = await client.post("/api/case/action", json={"case_id": NESTED, "action": "cancel"},
                          headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert r.status == 202, await r.text()
    assert (await r.json())["by"] == "robot"
    [cmd] = await site.store.pending_commands()
    assert (cmd.kind, cmd.case_id, cmd.payload) == ("cancel", NESTED, {"by": "robot", "via": "api"})
    [event] = await site.store.recent_events(1, case_id=NESTED)
    assert event.kind == "command_enqueued" and event.data and event.data["payload"] == {
        "by": "robot", "via": "api"
    }  # fmt: skip
    bad = await client.post("/api/case/action", json={"case_id": "C1", "action": "delete"},
                            headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert bad.status == 400
    unknown = await client.post("/api/case/action", json={"case_id": "nope", "action": "retry"},
                                headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert unknown.status == 404


async def test_a_signed_in_form_records_the_command(client: Client, site: Site) -> None:
    csrf = await _sign_in(client)
    r = await client.post("/case/action", data={"id": "C1", "action": "recheck", "csrf": csrf},
                          headers={"Origin": "null"}, allow_redirects=False)  # fmt: skip
    assert r.status == 303, await r.text()
    assert "done=recheck" in r.headers["Location"]
    [cmd] = await site.store.pending_commands()
    assert (cmd.kind, cmd.case_id, cmd.payload["by"]) == ("recheck", "C1", "alice")
    page = await (await client.get(r.headers["Location"])).text()
    assert "Re-run checks requested (command" in page
    assert "recheck asked" in page and "by alice" in page


@pytest.mark.parametrize(
    ("headers", "with_csrf"),
    [
        ({}, False),
        ({"Origin": "http://evil.example"}, True),
        ({"Sec-Fetch-Site": "cross-site"}, True),
        ({"Referer": "http://evil.example/page"}, True),
    ],
    ids=["no-csrf-token", "foreign-origin", "cross-site-fetch", "foreign-referer"],
)
async def test_cross_site_form_posts_are_refused(
    client: Client,
    site: Site,
    headers: dict[str, str],
    with_csrf: bool,
) -> None:
    csrf = await _sign_in(client)
    data = {"id": "C1", "action": "cancel", **({"csrf": csrf} if with_csrf else {})}
    r = await client.post("/case/action", data=data, headers=headers, allow_redirects=False)
    assert r.status == 403
    assert await site.store.pending_commands() == []


async def test_a_wrong_password_is_refused(client: Client) -> None:
    r = await client.post(
        "/login", data={"user": "alice", "password": "nope"}, allow_redirects=False
    )
    assert r.status == 401 and 'id="login-failed"' in await r.text()
    assert "mqi_session" not in r.cookies
    evil = await client.post("/login", data={"user": "", "password": TOKEN, "next": "//evil.example"},
                             allow_redirects=False)  # fmt: skip
    assert evil.status == 303 and evil.headers["Location"] == "/"  # no open redirect


async def test_read_only_when_no_one_is_configured(site: Site) -> None:
    view = WebView(
        WebSettings(enabled=True), store=site.store, secret=b"s" * 32, work_directory=site.work,
        hosts_state=dict, health=lambda: site.health[-1], started_at=datetime.now(UTC),
    )  # fmt: skip
    async with TestClient(TestServer(view.app)) as c:
        page = await (await c.get("/case", params={"id": "C1"})).text()
        assert "Actions are off" in page
        assert (await c.get("/login")).status == 404
        r = await c.post("/api/case/action", json={"case_id": "C1", "action": "retry"},
                         headers={"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
        assert r.status == 401


# -- /metrics and /healthz ------------------------------------------------------------------


def _samples(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_metrics_match_the_status_document(client: Client, site: Site) -> None:
    text = await (await client.get("/metrics")).text()
    samples = _samples(text)
    doc = await site.store.status_document()
    cases = doc["cases"]
    assert isinstance(cases, list)

    def count(values: list[str]) -> dict[str, int]:
        return {v: values.count(v) for v in set(values)}

    by_status = count([c["status"] for c in cases])
    got = {dict(k)["status"]: v for k, v in samples["mqi_cases"].items() if v}
    assert got == by_status == {"completed": 1, "pending": 2, "failed": 1}
    verdicts = count([c["qa"]["status"] for c in cases])
    got = {dict(k)["verdict"]: v for k, v in samples["mqi_case_verdicts"].items() if v}
    assert got == verdicts
    deliveries = count([d["qa_status"] for c in cases for d in c["deliveries"]])
    got = {dict(k)["verdict"]: v for k, v in samples["mqi_delivery_verdicts"].items() if v}
    assert got == deliveries == {"passed": 1, "failed": 1}
    beams = count([b["status"] for c in cases for b in c["beams"]])
    got = {
        dict(k)["status"]: v
        for k, v in samples["mqi_beams"].items()
        if v and dict(k)["kind"] == "treatment"
    }
    assert got == beams
    beam_verdicts = count([b["qa"]["status"] for c in cases for b in c["beams"]])
    got = {dict(k)["verdict"]: v for k, v in samples["mqi_beam_verdicts"].items() if v}
    assert got == beam_verdicts
    # two succeeded runs on gpu1, each well under a second
    runs = samples["mqi_run_duration_seconds_count"]
    assert runs == {(("host", "gpu1"), ("status", "succeeded")): 2.0}
    bucket = samples["mqi_run_duration_seconds_bucket"]
    assert bucket[(("host", "gpu1"), ("le", "1.0"), ("status", "succeeded"))] == 2.0
    assert samples["mqi_errors"] == {(("code", "missing_rtplan"), ("subject", "case")): 1.0}
    assert samples["mqi_host_up"] == {(("host", "gpu1"),): 1.0, (("host", "gpu2"),): 0.0}
    assert samples["mqi_service_running"] == {(): 1.0}
    assert samples["mqi_database_writable"] == {(): 1.0}
    assert samples["mqi_queue_beams"] == {(): 0.0}


async def test_healthz_follows_the_service(client: Client, site: Site) -> None:
    r = await client.get("/healthz")
    assert r.status == 200 and (await r.json())["status"] == "ok"
    site.health.append(Health(service="running", database_error="database_unwritable: full"))
    r = await client.get("/healthz")
    assert r.status == 503
    assert (await r.json())["database"] == "database_unwritable: full"
    site.health.append(Health(service="stopping", database_error=None))
    assert (await client.get("/healthz")).status == 503
