"""The inspector in a real headless browser (Debian's chromium and chromium-driver).

What only a browser shows: the page lists the runs, a click opens a run with its graph,
a failed node shows its error and traceback (real time and batch), a running run's
statuses change on the page without a reload, and map, loop and wait nodes show their
counts, with a waiting run signalled from the page finishing on it.

The tests take screenshots into a temporary directory.  ``FLOWDSL_UPDATE_SCREENSHOTS=1``
makes them write the ones docs/inspector.md shows instead (``docs/_static/inspector-*.png``),
which is done on purpose, when the page changed.

A missing chromium or chromedriver skips these tests on a developer's machine and fails
them on CI (``CI=true``), as a missing redis-server does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from _servers import is_ci, require_binary

if not is_ci():
    pytest.importorskip("selenium")
    pytest.importorskip("starlette")

from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from flowdsl.ui import create_app

import ui_flows
from _ui_server import PARSE_RAISES, HeldRun, ServedApp, fail_in_batch, leave_waiting, populate

pytestmark = pytest.mark.slow

DOCS_SHOTS = Path(__file__).resolve().parent.parent / "docs" / "_static"
WAIT = 20.0  # seconds a condition on the page gets before the test fails

Screenshot = Callable[[WebDriver, str], None]


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: the docs' own only when asked (FLOWDSL_UPDATE_SCREENSHOTS=1),
    so that running the tests never changes tracked files."""
    if os.environ.get("FLOWDSL_UPDATE_SCREENSHOTS", "").strip() in {"1", "true", "yes"}:
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        return DOCS_SHOTS
    return tmp_path_factory.mktemp("screenshots")


@pytest.fixture
def screenshot(shots: Path) -> Screenshot:
    def take(browser: WebDriver, name: str) -> None:
        assert browser.save_screenshot(str(shots / f"inspector-{name}.png"))

    return take


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium = require_binary("chromium")
    chromedriver = require_binary("chromedriver")
    options = Options()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1360,1000",
        "--force-device-scale-factor=1",
        "--lang=en-US",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(chromedriver))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def inspector(sqlite_url: str) -> Iterator[tuple[ServedApp, str]]:
    ui_flows.GATE.clear()
    anyio.run(populate, sqlite_url)
    served = ServedApp(create_app(sqlite_url, flows=[ui_flows], poll_interval=0.1)).start()
    try:
        yield served, sqlite_url
    finally:
        ui_flows.GATE.set()
        served.stop()


def wait(browser: WebDriver, condition: Any, what: str) -> Any:
    # The page redraws what changes (the list every few seconds, the graph on updates):
    # an element found a moment ago may be gone, so a condition is simply tried again.
    waiting = WebDriverWait(
        browser, WAIT, ignored_exceptions=(StaleElementReferenceException, NoSuchElementException)
    )
    return waiting.until(condition, message=f"waiting for {what}")


def click(browser: WebDriver, css: str) -> None:
    wait(browser, lambda b: b.find_element(By.CSS_SELECTOR, css).click() or True, f"click {css}")


def node_css(node_id: str) -> str:
    return f'g.node[data-node-id="{node_id}"]'


def node_status(browser: WebDriver, node_id: str) -> str | None:
    status: str | None = browser.execute_script(
        "const n = document.querySelector(arguments[0]);"
        "return n ? n.getAttribute('data-status') : null;",
        node_css(node_id),
    )
    return status


def rows(browser: WebDriver) -> list[list[str]]:
    """The run list's rows as (run id, status), read in one go."""
    found: list[list[str]] = browser.execute_script(
        "return Array.from(document.querySelectorAll('tr[data-run-id]'))"
        ".map(r => [r.dataset.runId, r.dataset.status]);"
    )
    return found


def node_attribute(browser: WebDriver, node_id: str, name: str) -> str | None:
    value: str | None = browser.execute_script(
        "const n = document.querySelector(arguments[0]);"
        "return n ? n.getAttribute(arguments[1]) : null;",
        node_css(node_id),
        name,
    )
    return value


def shown_text(browser: WebDriver, element_id: str) -> str:
    """The text of a shown element (waited for)."""
    found = wait(
        browser,
        lambda b: (e := b.find_element(By.ID, element_id)).is_displayed() and e,
        f"#{element_id} shown",
    )
    text: str = found.text
    return text


def test_the_run_list_shows_the_runs(
    browser: WebDriver, inspector: tuple[ServedApp, str], screenshot: Screenshot
) -> None:
    served, _ = inspector
    browser.get(served.url + "/")
    wait(browser, lambda b: len(rows(b)) == 3, "three runs in the list")
    assert rows(browser) == [
        ["t-failed", "failed"],
        ["t-urgent", "finished"],
        ["t-finished", "finished"],
    ]
    # Filtering by status narrows the list.
    status = Select(browser.find_element(By.ID, "filter-status"))
    status.select_by_value("failed")
    wait(browser, lambda b: rows(b) == [["t-failed", "failed"]], "the failed run alone")
    status.select_by_value("")
    wait(browser, lambda b: len(rows(b)) == 3, "all runs again")
    screenshot(browser, "runs")


def test_a_failed_run_shows_its_nodes_the_error_and_the_traceback(
    browser: WebDriver, inspector: tuple[ServedApp, str], screenshot: Screenshot
) -> None:
    served, _ = inspector
    browser.get(served.url + "/")
    click(browser, 'tr[data-run-id="t-failed"]')
    wait(browser, lambda b: node_status(b, "parse") == "failed", "the failed node")
    assert node_status(browser, "load") == "finished"
    assert node_status(browser, "summarize") == "not run"
    assert browser.find_element(By.ID, "run-status").text == "failed"
    assert browser.find_element(By.ID, "act-resume").is_displayed()
    click(browser, node_css("parse"))
    error = wait(
        browser,
        lambda b: (e := b.find_element(By.ID, "node-error")).is_displayed() and e,
        "the node's error",
    )
    assert "ValueError: cannot parse 'data.txt:1'" in error.text
    assert '"data.txt:1"' in browser.find_element(By.ID, "node-args").text
    assert PARSE_RAISES in shown_text(browser, "node-traceback")
    screenshot(browser, "failed")


def test_a_batch_runs_failed_node_shows_the_workers_traceback(
    browser: WebDriver, inspector: tuple[ServedApp, str]
) -> None:
    served, url = inspector
    anyio.run(fail_in_batch, url, "t-batch-failed")
    browser.get(served.url + "/#/runs/t-batch-failed")
    wait(browser, lambda b: node_status(b, "parse") == "failed", "the failed node")
    click(browser, node_css("parse"))
    assert PARSE_RAISES in shown_text(browser, "node-traceback")


def test_map_loop_and_wait_nodes_and_a_signal_from_the_page(
    browser: WebDriver, inspector: tuple[ServedApp, str], screenshot: Screenshot
) -> None:
    served, url = inspector
    anyio.run(leave_waiting, url, "t-campaign", "make some noise now")
    browser.get(served.url + "/#/runs/t-campaign")
    wait(browser, lambda b: node_status(b, "approve") == "waiting", "the wait, waiting")
    browser.execute_script("window.__sameDocument = 'yes';")
    assert node_attribute(browser, "shout", "data-label") == "map 4/4"
    assert node_attribute(browser, "settle", "data-label") == "loop: 4 iterations"
    assert node_attribute(browser, "approve", "data-label") == "waiting for signal 'approve'"
    assert node_status(browser, "announce") == "pending"
    assert browser.find_element(By.ID, "run-status").text == "waiting"
    # The map's items in its panel.
    click(browser, node_css("shout"))
    wait(browser, lambda b: len(b.find_elements(By.CSS_SELECTOR, "#node-items tr")) == 4, "items")
    assert "NOISE" in browser.find_element(By.CSS_SELECTOR, '[data-item="shout[2]"]').text
    screenshot(browser, "dynamic")
    click(browser, node_css("settle"))
    wait(
        browser,
        lambda b: (
            [
                r.get_attribute("data-item")
                for r in b.find_elements(By.CSS_SELECTOR, "#node-items tr")
            ]
            == [f"settle@{i}" for i in range(4)]
        ),
        "the loop's iterations",
    )
    # The form names the signal the run waits for; the page sends it, and the run ends.
    assert browser.find_element(By.ID, "signal-name").get_attribute("value") == "approve"
    browser.find_element(By.ID, "signal-value").send_keys("true")
    click(browser, '#signal-form button[type="submit"]')
    wait(browser, lambda b: b.find_element(By.ID, "run-status").text == "finished", "the run")
    wait(browser, lambda b: node_status(b, "announce") == "finished", "the last node")
    assert node_attribute(browser, "approve", "data-label") == "signal 'approve' received"
    assert browser.execute_script("return window.__sameDocument;") == "yes"  # no reload
    assert "approved" in browser.find_element(By.ID, "run-result").text


def test_a_running_runs_statuses_change_without_a_reload(
    browser: WebDriver, inspector: tuple[ServedApp, str], screenshot: Screenshot
) -> None:
    served, url = inspector
    held = HeldRun(url, "t-live").start()
    try:
        browser.get(served.url + "/#/runs/t-live")
        # The run may not exist yet when the page first asks: reload until it shows.
        wait(
            browser,
            lambda b: node_status(b, "hold") == "running" or b.refresh(),
            "the held node running",
        )
        browser.execute_script("window.__sameDocument = 'yes';")
        assert node_status(browser, "prepare") == "finished"
        assert node_status(browser, "publish") == "pending"
        assert browser.find_element(By.ID, "run-status").text == "running"
        click(browser, node_css("hold"))
        screenshot(browser, "live")
        ui_flows.GATE.set()
        wait(browser, lambda b: node_status(b, "publish") == "finished", "the last node finished")
        wait(browser, lambda b: b.find_element(By.ID, "run-status").text == "finished", "the run")
        assert node_status(browser, "hold") == "finished"
        assert browser.execute_script("return window.__sameDocument;") == "yes"  # no reload
        assert held.finish() == "published 41"
    finally:
        ui_flows.GATE.set()


def test_a_finished_run_with_a_node_selected(
    browser: WebDriver, inspector: tuple[ServedApp, str], screenshot: Screenshot
) -> None:
    served, _ = inspector
    browser.get(served.url + "/#/runs/t-finished")
    wait(browser, lambda b: node_status(b, "route.join") == "finished", "the graph")
    assert node_status(browser, "route.escalate/escalate") == "skipped"
    click(browser, node_css("route.auto/draft_reply"))
    facts = wait(
        browser,
        lambda b: (
            (f := b.find_element(By.CSS_SELECTOR, '#node-facts [data-fact="tokens and cost"]'))
            and f
        ),
        "the node's tokens",
    )
    assert "tokens" in facts.text
    assert "$" in facts.text
    assert "[billing] Thanks" in browser.find_element(By.ID, "node-result").text
    bars = browser.find_elements(By.CSS_SELECTOR, "#timeline rect.bar")
    assert len(bars) == 4
    screenshot(browser, "run")
