"""The web view in a real headless browser (Debian's chromium through chromedriver and Selenium)
against the real service on the demo's simulated host: the case list updates while cases
arrive and run, the case page shows the verdicts of `status --json`, downloads work, an
action without a sign-in is refused and one with a token is recorded; /metrics agrees with
`status --json`; a web server that cannot bind never stops the engine.

Skipped when chromium, chromedriver or selenium are missing, unless MQI_TEST_REQUIRE_BROWSER=1
(set by .ci/run as root, which installs them), which turns the skip into a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from mqi_async.config import Settings, WebSettings, WebTokenSettings
from mqi_async.demo.runner import DemoOptions, demo_settings, feed_cases
from mqi_async.domain.verdict import QaStatus
from mqi_async.service import Service
from mqi_async.web.auth import make_hash
from tests.e2e import running_service, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REQUIRE_BROWSER_ENV = "MQI_TEST_REQUIRE_BROWSER"
TOKEN = "web-test-token-5f0c2d"
T = TypeVar("T")


def _browser_parts() -> tuple[str, str]:
    """chromium and chromedriver, or skip (fail under MQI_TEST_REQUIRE_BROWSER=1)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if os.access("/usr/bin/chromedriver", os.X_OK) else None
    )
    missing = [
        name for name, found in (("chromium", chromium), ("chromedriver", driver)) if not found
    ]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        why = f"needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get(REQUIRE_BROWSER_ENV) == "1":
            pytest.fail(f"{REQUIRE_BROWSER_ENV}=1 but the browser test {why}")
        pytest.skip(why)
    assert chromium is not None and driver is not None
    return chromium, driver


class Browser:
    """Headless chromium; every Selenium call runs in a thread so the service's loop runs on."""

    def __init__(self, chromium: str, driver: str, downloads: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service as DriverService

        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu",
                    "--disable-dev-shm-usage", "--window-size=1400,1000"):  # fmt: skip
            options.add_argument(arg)
        options.add_experimental_option(
            "prefs",
            {
                "download.default_directory": str(downloads),
                "download.prompt_for_download": False,
                "safebrowsing.enabled": False,
            },
        )
        self.driver = webdriver.Chrome(
            service=DriverService(executable_path=driver), options=options
        )
        self.driver.set_page_load_timeout(60)
        # headless chromium saves downloads only when told where
        self.driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def get(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def js(self, script: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, script, *args)

    async def text_of(self, css: str) -> list[str]:
        """The text of every element matching `css`, read in one go (the live refresh may
        replace them between two WebDriver calls)."""
        texts = await self.js(
            "return Array.from(document.querySelectorAll(arguments[0]), e => e.innerText.trim());",
            css,
        )
        return [str(t) for t in texts]

    async def click(self, css: str) -> None:
        from selenium.webdriver.common.by import By

        await self.call(lambda: self.driver.find_element(By.CSS_SELECTOR, css).click())

    async def type_into(self, css: str, text: str) -> None:
        from selenium.webdriver.common.by import By

        await self.call(lambda: self.driver.find_element(By.CSS_SELECTOR, css).send_keys(text))

    def close(self) -> None:
        self.driver.quit()


async def until(check: Callable[[], Any], what: str, timeout_s: float = 120.0) -> Any:
    """`wait_until` with the browser tests' longer default and a slower poll."""
    return await wait_until(check, timeout_s=timeout_s, interval_s=0.3, what=what)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _settings(root: Path, port: int, *, cases: int) -> tuple[Settings, DemoOptions]:
    options = DemoOptions(
        workdir=root, cases=cases, beams=2, gpus=4, headless=True, exit_when_done=False,
        arrival_gap_s=4.0, run_seconds=0.5,
    )  # fmt: skip
    base = demo_settings(root, options)
    web = WebSettings(
        enabled=True,
        port=port,
        refresh_seconds=1,
        tokens=[WebTokenSettings(name="physicist", hash=SecretStr(make_hash(TOKEN)))],
    )
    return base.model_copy(update={"web": web}), options


async def _status_json(settings: Settings) -> dict[str, Any]:
    """`mqi-async status --json`, the command itself, beside the running service."""
    config = settings.database.parent / "status.yaml"
    config.write_text(f"database: {settings.database}\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mqi_async", "status", "--json", "-c", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    document: dict[str, Any] = json.loads(out)
    return document


async def _all_checked(service: Service, cases: int) -> bool:
    snapshot = await service.store.snapshot()
    return len(snapshot) == cases and all(
        c.status.is_terminal and c.qa.status != QaStatus.PENDING and c.report for c in snapshot
    )


def _counts(values: list[str]) -> dict[str, float]:
    return {v: float(values.count(v)) for v in set(values)}


async def test_the_web_view_in_a_real_browser_while_the_demo_runs(tmp_path: Path) -> None:
    chromium, driver = _browser_parts()
    port = _free_port()
    settings, options = _settings(tmp_path / "demo", port, cases=2)
    base = f"http://127.0.0.1:{port}"
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser = await asyncio.to_thread(Browser, chromium, driver, downloads)
    try:
        async with running_service(settings) as service:
            await until(lambda: _up(base), "the web server")

            # 1. the list, empty, then filling and changing without a reload
            await browser.get(base + "/")
            assert "No cases yet" in (await browser.text_of("#cases"))[0]
            await browser.js("window.__notReloaded = true;")
            feeder = asyncio.create_task(feed_cases(settings.scan_directory, options))
            await until(lambda: browser.text_of('tr[data-case="DEMO0001"]'), "DEMO0001 listed")
            await until(lambda: browser.text_of('tr[data-case="DEMO0002"]'), "DEMO0002 listed")
            await feeder

            async def first_completed() -> bool:
                cells = await browser.text_of('tr[data-case="DEMO0001"] td.status')
                return cells == ["completed"]

            await until(first_completed, "DEMO0001 shown completed", timeout_s=180)
            assert await browser.js("return window.__notReloaded === true;"), "the page reloaded"
            await until(lambda: _all_checked(service, 2), "every verdict and report", 240)

            # 2. the case page shows the verdicts of `status --json`
            status = await _status_json(settings)
            case = next(c for c in status["cases"] if c["case_id"] == "DEMO0002")
            await browser.get(f"{base}/case?id=DEMO0002")
            assert await browser.text_of("#case-verdict") == [case["qa"]["status"]]
            for beam in case["beams"]:
                cell = await browser.text_of(f'tr[data-beam="{beam["beam_id"]}"] td.verdict')
                assert cell == [beam["qa"]["status"]], beam["beam_id"]
            assert len(case["deliveries"]) == 4
            for d in case["deliveries"]:
                cell = await browser.text_of(f'tr[data-delivery="{d["folder"]}"] td.verdict')
                assert cell == [d["qa_status"]], d["folder"]
            # the demo's case 2 has a shifted layer in fraction 2: not all passed
            assert {d["qa_status"] for d in case["deliveries"]} != {"passed"}

            # 3. downloads: the RT Dose zip and the report PDF, saved by the browser
            await browser.click("#dose-zip")
            zipped = await until(lambda: _downloaded(downloads, ".zip"), "the dose zip")
            outputs = sorted(Path(o).name for b in case["beams"] for o in b["outputs"])
            with zipfile.ZipFile(zipped) as zf:
                assert sorted(zf.namelist()) == outputs
            await browser.click("#report-pdf")
            pdf = await until(lambda: _downloaded(downloads, ".pdf"), "the report PDF")
            assert pdf.read_bytes().startswith(b"%PDF")

            # 4. /metrics agrees with `status --json` (nothing changes now: all is checked)
            await _metrics_match(base, status)

            # 5. no sign-in: no buttons, and a hand-made post is refused, nothing recorded
            assert await browser.text_of("#action-retry") == []
            refused = await browser.js(
                "return Promise.all(["
                " fetch('/case/action', {method: 'POST', body: new URLSearchParams("
                "   {id: 'DEMO0002', action: 'retry'})}).then(r => r.status),"
                " fetch('/api/case/action', {method: 'POST', headers: {'Content-Type':"
                "   'application/json'}, body: JSON.stringify({case_id: 'DEMO0002',"
                "   action: 'retry'})}).then(r => r.status)]);"
            )
            assert refused == [403, 401]
            assert await service.store.pending_commands() == []
            assert not await _requests(service, "DEMO0002")

            # 6. signed in with the token: re-run checks is recorded, by that name
            await browser.get(f"{base}/login?next=%2Fcase%3Fid%3DDEMO0002")
            await browser.type_into('input[name="password"]', TOKEN)
            await browser.click("#sign-in")
            await until(lambda: browser.text_of("#action-recheck"), "the action buttons")
            await browser.click("#action-recheck")
            notice = await until(lambda: browser.text_of("p.notice"), "the notice")
            assert notice[0].startswith("Re-run checks requested (command")
            [request] = await _requests(service, "DEMO0002")
            assert request == {"by": "physicist", "via": "web form"}
            await until(
                lambda: _finished(service, "DEMO0002"), "the engine to carry out the command"
            )
            await browser.call(browser.driver.save_screenshot, str(tmp_path / "case.png"))
    finally:
        await asyncio.to_thread(browser.close)


async def _up(base: str) -> bool:
    try:
        async with aiohttp.ClientSession() as s, s.get(base + "/healthz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


def _downloaded(folder: Path, suffix: str) -> Path | None:
    done = [p for p in folder.iterdir() if p.suffix == suffix]
    return done[0] if done else None


async def _requests(service: Service, case_id: str) -> list[Any]:
    events = await service.store.recent_events(200, case_id=case_id)
    return [
        e.data["payload"] for e in events if e.kind == "command_enqueued" and e.data is not None
    ]


async def _finished(service: Service, case_id: str) -> bool:
    events = await service.store.recent_events(200, case_id=case_id)
    return any(e.kind == "command_finished" for e in events)


async def _metrics_match(base: str, status: dict[str, Any]) -> None:
    async with aiohttp.ClientSession() as s, s.get(base + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    samples: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if family.name == "mqi_beams" and labels.get("kind") != "treatment":
                continue
            key = labels.get("status") or labels.get("verdict") or ""
            if sample.value:
                samples.setdefault(sample.name, {})[key] = sample.value
    cases = status["cases"]
    assert samples["mqi_cases"] == _counts([c["status"] for c in cases])
    assert samples["mqi_case_verdicts"] == _counts([c["qa"]["status"] for c in cases])
    assert samples["mqi_beams"] == _counts([b["status"] for c in cases for b in c["beams"]])
    assert samples["mqi_beam_verdicts"] == _counts(
        [b["qa"]["status"] for c in cases for b in c["beams"]]
    )
    assert samples["mqi_delivery_verdicts"] == _counts(
        [d["qa_status"] for c in cases for d in c["deliveries"]]
    )
    # the demo's runs: planned and delivered, every one succeeded on the simulated host
    assert samples["mqi_run_duration_seconds_count"] == {"succeeded": 8.0}


async def test_a_web_server_that_cannot_bind_never_stops_the_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = _free_port()
    settings, options = _settings(tmp_path / "demo", port, cases=1)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", port))
    blocker.listen()
    try:
        async with running_service(settings) as service:
            await feed_cases(settings.scan_directory, options)

            async def case_done() -> bool:
                cases = await service.store.snapshot()
                return bool(cases) and all(c.status.is_terminal for c in cases)

            await until(case_done, "the case to finish while the port is taken", 180)
            assert service.state == "running"
            assert any("web server crashed" in r.getMessage() for r in caplog.records)
            blocker.close()
            # the supervisor tries again (1 s, 2 s, 4 s, … apart) and the server comes up
            await until(lambda: _up(f"http://127.0.0.1:{port}"), "the web server", 60)
    finally:
        blocker.close()
