"""The screening page in a real browser: EHR launch and consent against a real authorization
server (oidc-provider), every fixture patient rendered, the sweep's report.html, screenshots."""

from __future__ import annotations

import base64
import json
import re
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from cds.criteria import load_trials
from cds.fhir.loader import FIXTURES_DIR
from cds.fhir.queries import build_patient_queries
from cds.sweep.runner import sweep_ndjson
from cds.synthetic import Population, write_population
from tests.helpers import sweep_options
from tests.hooks_data.support import dev_app, fixture_resources, full_prefetch, hook_body, post
from tests.plugins.browser import CdsService, SmartAS

pytestmark = pytest.mark.integration

_REF = re.compile(r"\b(Observation|Condition|Procedure|Medication\w*|Patient)/[A-Za-z0-9.-]+")


def _fixture_patients() -> list[str]:
    """Every Patient of the fixtures the local server was loaded with."""
    ids: list[str] = []
    for path in sorted(FIXTURES_DIR.glob("*.json")):
        bundle = json.loads(path.read_text())
        for entry in bundle.get("entry") or []:
            resource = entry.get("resource") or {}
            if resource.get("resourceType") == "Patient" and resource.get("id"):
                ids.append(resource["id"])
    return ids


def _wait(browser: Any, css: str, timeout: float = 30) -> Any:
    return WebDriverWait(browser, timeout).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, css))
    )


def _sign_in(browser: Any, until: str) -> None:
    """Through the authorization server's own login and consent pages (oidc-provider
    devInteractions) until the app shows ``until``."""
    login, consent = "input[name=prompt][value=login]", "input[name=prompt][value=consent]"
    for _ in range(4):
        _wait(browser, f"{login}, {consent}, {until}")
        if browser.find_elements(By.CSS_SELECTOR, until):
            return
        if browser.find_elements(By.CSS_SELECTOR, login):
            browser.find_element(By.CSS_SELECTOR, "input[name=login]").send_keys("dr-test")
            browser.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys("secret")
        form = browser.find_element(By.CSS_SELECTOR, "form")
        browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        WebDriverWait(browser, 30).until(ec.staleness_of(form))
    raise AssertionError(f"never reached {until}: {browser.current_url}")


def _full_page(browser: Any, path: Path) -> None:
    """A screenshot of the whole page (Chromium's DevTools capture beyond the viewport)."""
    width, height = browser.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 8000), "scale": 1},
        },
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def _text(browser: Any) -> str:
    return str(browser.find_element(By.TAG_NAME, "body").text)


def test_ehr_launch_end_to_end(
    browser: Any, smart_as: SmartAS, cds_service: CdsService, artifacts: Path
) -> None:
    launch = smart_as.launch("labs-stale")
    query = urlencode({"iss": smart_as.fhir_base, "launch": launch})
    browser.get(f"{cds_service.base}/smart/launch?{query}")
    _sign_in(browser, "article.trial")
    assert browser.current_url == f"{cds_service.base}/smart/page"  # no code or token in it
    text = _text(browser)
    assert "Needs review" in text
    assert "Repeat labs (results dated 2026-10-02 or later; last drawn 2026-08-01)" in text
    assert "Registry status WITHDRAWN: not enrolling" in text
    version = load_trials()["NCT04339036"].version  # the definitions' version, not a constant
    assert f"Criteria version {version}" in text and "as of 2026-11-01" in text
    # the token went to the server-side session only: the browser holds an opaque cookie
    cookies = browser.get_cookies()
    (session,) = [c for c in cookies if c["name"] == "cds_smart_session"]
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "None"
    assert browser.execute_script("return window.localStorage.length") == 0
    # the narrowest scopes: launch plus read/search of the types the trials' queries read
    types = sorted({q.resource_type for q in build_patient_queries(load_trials())})
    granted = smart_as.issued()[-1]
    assert granted["patient"] == "labs-stale"
    assert set(granted["requested"].split()) == {"launch", *(f"patient/{t}.rs" for t in types)}
    assert set(granted["scope"].split()) == {f"patient/{t}.rs" for t in types}
    # evidence one click away: the source resource, read with the session's token
    link = browser.find_element(By.CSS_SELECTOR, "table.evidence a")
    link.click()
    _wait(browser, "pre.source")
    assert '"resourceType"' in _text(browser)
    browser.back()
    _wait(browser, "article.trial")
    _full_page(browser, artifacts / "smart-ehr-launch-labs-stale.png")


def test_state_mismatch_is_refused(
    browser: Any, smart_as: SmartAS, cds_service: CdsService
) -> None:
    browser.get(f"{cds_service.base}/smart/callback?code=forged&state=forged")
    assert "not one this page started" in _text(browser) or "does not match" in _text(browser)


def test_every_fixture_patient_renders(
    browser: Any, smart_as: SmartAS, cds_service: CdsService, artifacts: Path
) -> None:
    # Standalone launch: sign in, pick from the list, then each fixture patient in turn.
    browser.get(f"{cds_service.base}/smart/launch?{urlencode({'iss': smart_as.fhir_base})}")
    _sign_in(browser, "table.picker")
    assert browser.find_elements(By.CSS_SELECTOR, "a[data-patient=both-candidate]")
    out = artifacts / "smart-page"
    out.mkdir(exist_ok=True)
    patients = _fixture_patients()
    assert len(patients) >= 38
    for pid in patients:
        browser.get(f"{cds_service.base}/smart/page?patient={pid}")
        _wait(browser, "main h1")
        text = _text(browser)
        assert "Trial screening" in text, pid
        articles = browser.find_elements(By.CSS_SELECTOR, "article.trial")
        assert len(articles) == 2, pid
        assert not _REF.search(text.split("Criteria met")[0]), (pid, text[:500])
        # the first screen (status, what would settle it, open items); full pages cost ~0.7 s each
        browser.save_screenshot(str(out / f"{pid}.png"))


def test_open_server_is_read_without_oauth_in_development(
    browser: Any, cds_service: CdsService, artifacts: Path
) -> None:
    query = urlencode({"iss": cds_service.fhir_open, "patient": "both-candidate"})
    browser.get(f"{cds_service.base}/smart/launch?{query}")
    _wait(browser, "article.trial")
    statuses = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "p.status strong")]
    assert statuses == ["Possible candidate", "Possible candidate"]
    _full_page(browser, artifacts / "smart-page-both-candidate.png")
    browser.set_window_size(390, 1400)  # a phone
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 400
    browser.save_screenshot(str(artifacts / "smart-page-narrow-both-candidate.png"))
    browser.set_window_size(1100, 1400)


def _card_html(card: dict[str, Any]) -> str:
    """A plain rendering of a card (summary, detail, links, suggestion) for a screenshot: only
    the Markdown the cards use (paragraphs, "- " items, **bold**, backslash escapes). Test-only."""

    def inline(text: str) -> str:
        text = escape(text.replace("&amp;", "&").replace("&lt;", "<"))
        text = re.sub(r"\\(.)", r"\1", text)
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)

    blocks = []
    for block in card["detail"].split("\n\n"):
        lines = block.split("\n")
        items = [f"<li>{inline(li[2:])}</li>" for li in lines if li.startswith("- ")]
        head = [inline(li) for li in lines if not li.startswith("- ")]
        blocks.append(
            "<p>" + "<br>".join(head) + "</p>" + (f"<ul>{''.join(items)}</ul>" if items else "")
        )
    links = " · ".join(f"<a href='#'>{escape(link['label'])}</a>" for link in card["links"])
    buttons = "".join(f"<button>{escape(s['label'])}</button>" for s in card["suggestions"])
    return (
        "<div style='font:14px system-ui;border:1px solid #ccc;border-left:6px solid "
        f"{'#e0a000' if card['indicator'] == 'warning' else '#2a6ebb'};padding:8px 12px;"
        f"margin:8px;width:560px'><div style='font-weight:600'>{escape(card['summary'])}</div>"
        f"{''.join(blocks)}<div>{links}</div><div style='margin-top:6px'>{buttons}"
        "<button>Dismiss</button></div></div>"
    )


@pytest.mark.parametrize("fixture", ["both-candidate", "labs-stale", "provisional-exclusions"])
def test_card_screenshots(browser: Any, artifacts: Path, tmp_path: Path, fixture: str) -> None:
    client = dev_app().test_client()
    body = hook_body(
        patient_id=fixture, prefetch=full_prefetch(fixture_resources(f"{fixture}.json"), fixture)
    )
    cards = post(client, "/cds-services/trial-screening", body).get_json()["cards"]
    assert cards
    page = tmp_path / f"{fixture}.html"
    page.write_text(
        "<!doctype html><meta charset=utf-8><body>" + "".join(_card_html(c) for c in cards),
        encoding="utf-8",
    )
    browser.get(page.as_uri())
    heights = browser.execute_script(
        "return [...document.querySelectorAll('body > div')].map(d => d.offsetHeight)"
    )
    assert len(heights) == len(cards)
    assert max(heights) < 400, heights  # a short block each (they were 2,000-2,700 px)
    browser.save_screenshot(str(artifacts / f"cards-{fixture}.png"))


def test_sweep_report_in_the_browser(browser: Any, tmp_path: Path, artifacts: Path) -> None:
    population = Population(30, seed=5, net_every=2)
    write_population(population, tmp_path / "ndjson", "ndjson")
    out = tmp_path / "out"
    summary = sweep_ndjson(tmp_path / "ndjson", sweep_options(out))
    browser.get_log("browser")  # drain what earlier pages logged
    browser.get((out / "report.html").as_uri())
    _wait(browser, "h1")
    text = _text(browser)
    assert "2026-11-01" in text
    for trial in summary["trials"]:
        assert trial in text
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    browser.save_screenshot(str(artifacts / "sweep-report.png"))
