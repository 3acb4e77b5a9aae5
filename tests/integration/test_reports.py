"""Case reports: a demo run with passed, conditional and failed cases, read as a person would.

The PDF's text (pdftotext) carries the verdicts and numbers of `status --json`; its pages render
(pdftoppm); the HTML is one file that fetches nothing; `mqi-async report` rebuilds on demand.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

_NEED_POPPLER = os.environ.get("MQI_TEST_REQUIRE_POPPLER") == "1"


def _poppler() -> None:
    if shutil.which("pdftotext") and shutil.which("pdftoppm"):
        return
    if _NEED_POPPLER:
        pytest.fail("pdftotext/pdftoppm (poppler-utils) are required here")
    pytest.skip("poppler-utils (pdftotext, pdftoppm) not installed")


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqi_async", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Three demo cases of two beams: a faithful one, a shifted layer, and one with a +15 %
    meterset on beam 1 and a missing layer on beam 2."""
    workdir = tmp_path_factory.mktemp("reports") / "demo"
    res = _cli(
        "demo", "--no-ui", "--exit-when-done", "--cases", "3", "--beams", "2",
        "--workdir", str(workdir), timeout=420,
    )  # fmt: skip
    # exit 1 only says not every case completed; the verdicts are what is judged here
    assert res.returncode in (0, 1), res.stdout[-3000:] + res.stderr[-3000:]
    cfg = workdir / "c.yaml"
    cfg.write_text(
        f"database: {workdir / 'mqi.db'}\nwork_directory: {workdir / 'work'}\n"
        f"scan_directory: {workdir / 'incoming'}\n"
    )
    status = _cli("status", "--json", "-c", str(cfg))
    assert status.returncode == 0, status.stderr
    return cfg, json.loads(status.stdout)["cases"]


def _pdf_text(path: str) -> str:
    return subprocess.run(
        ["pdftotext", "-layout", path, "-"], capture_output=True, text=True, check=True
    ).stdout


def _rate(value: float) -> str:
    return f"{value:,.1f} %"


def test_every_finished_case_has_a_report_with_its_verdicts(
    demo: tuple[Path, list[dict[str, Any]]],
) -> None:
    _poppler()
    _, cases = demo
    verdicts = {c["qa"]["status"] for c in cases}
    assert {"passed", "conditional", "failed"} <= verdicts, verdicts
    mixed = [b["qa"]["status"] for b in cases[2]["beams"]]
    assert mixed == ["conditional", "failed"], mixed
    for case in cases:
        pdf = case["qa"]["report"]
        assert pdf and Path(pdf).is_file(), case["case_id"]
        assert Path(pdf).with_suffix(".html").is_file()
        text = _pdf_text(pdf)
        assert f"Verdict: {case['qa']['status'].upper()}" in text
        assert case["case_id"] in text
        for beam in case["beams"]:
            qa = beam["qa"]
            if qa["pass_rate_percent"] is not None:
                assert f"{qa['status']}" in text
                assert _rate(qa["pass_rate_percent"]) in text, (beam["beam_id"], qa)
        for d in case["deliveries"]:
            assert d["folder"] in text
            if d["pass_rate_percent"] is not None:
                assert _rate(d["pass_rate_percent"]) in text, d
            for code in d["deviations"]:
                assert code in text
        assert "Reviewed by (name)" in text and "Signature" in text


def test_report_pages_render_and_every_figure_has_axes_units_and_legends(
    demo: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    _poppler()
    _, cases = demo
    failed = next(c for c in cases if c["qa"]["status"] == "failed")
    pdf = failed["qa"]["report"]
    subprocess.run(["pdftoppm", "-r", "40", "-png", pdf, str(tmp_path / "p")], check=True)
    pngs = sorted(tmp_path.glob("p-*.png"))
    info = subprocess.run(["pdfinfo", pdf], capture_output=True, text=True, check=True).stdout
    pages = int(next(line.split()[-1] for line in info.splitlines() if line.startswith("Pages:")))
    assert len(pngs) == pages >= 2 + len(failed["beams"])
    assert all(p.stat().st_size > 2000 for p in pngs)
    text = _pdf_text(pdf)
    # dose maps: mm axes, colour bars in Gy and in gamma; the histogram's legend
    for words in ("x (mm)", "z (mm)", "(Gy)", "γ (1 = criterion)", "criterion γ = 1",
                  "γ (dimensionless)", "% of max)"):  # fmt: skip
        assert words in text, words
    # delivery pages: deviations by layer with tolerances, the worst layer's fluence
    for words in ("layer (delivery order)", "position error (mm)", "meterset error (%)",
                  "tolerance", "MU/mm²", "layer not delivered"):  # fmt: skip
        assert words in text, words


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.images = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.images += tag == "img"
        self.urls += [v or "" for k, v in attrs if k in ("src", "href", "action", "srcset")]


def test_html_report_is_one_file_that_fetches_nothing(
    demo: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, cases = demo
    for case in cases:
        html = Path(case["qa"]["report"]).with_suffix(".html").read_text(encoding="utf-8")
        links = _Links()
        links.feed(html)
        assert links.images >= len(case["beams"])
        assert all(u.startswith("data:") for u in links.urls), links.urls[:5]
        assert "http://" not in html and "https://" not in html
        assert "default-src 'none'" in html
        assert f"Verdict: {case['qa']['status'].upper()}" in html


def test_report_command_rebuilds_and_names_an_unknown_case(
    demo: tuple[Path, list[dict[str, Any]]],
) -> None:
    cfg, cases = demo
    case = cases[0]
    pdf = Path(case["qa"]["report"])
    before = pdf.stat().st_mtime_ns
    res = _cli("report", case["case_id"], "-c", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    built = json.loads(res.stdout)
    assert built["pdf"] == str(pdf) and built["verdict"] == case["qa"]["status"]
    assert pdf.stat().st_mtime_ns > before
    assert oct(pdf.stat().st_mode & 0o777) == "0o600"
    plain = _cli("report", case["case_id"], "-c", str(cfg))
    assert plain.stdout.splitlines() == [str(pdf), str(pdf.with_suffix(".html"))]
    unknown = _cli("report", "NO_SUCH_CASE", "-c", str(cfg))
    assert unknown.returncode == 1
    assert "unknown_case" in unknown.stderr


def test_html_report_renders_in_a_browser_with_the_network_cut_off(
    demo: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("MQI_TEST_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is required here")
        pytest.skip("chromium not installed")
    _, cases = demo
    html = Path(cases[2]["qa"]["report"]).with_suffix(".html")
    shot = tmp_path / "report.png"
    res = subprocess.run(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu",
         # every name resolves nowhere and no proxy answers: the page must not need either
         "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
         f"--screenshot={shot}", "--dump-dom", html.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert "Verdict: FAILED" in dom and dom.count("<img") >= len(cases[2]["beams"])
    assert shot.is_file() and shot.stat().st_size > 20_000
