"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium, against ``routemq-outbox dashboard`` served by uvicorn
in a process of its own, on SQLite and PostgreSQL. The browser clicks what an operator clicks;
the tables say whether it worked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from routemq_outbox import admin
from routemq_outbox.database import create_engine

from .conftest import DB_URL_FIXTURES, ROOT, free_port
from .test_dashboard import add_failed, add_jobs

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(DB_URL_FIXTURES[request.param]))


@pytest.fixture
async def engine(url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(url)
    yield engine
    await engine.dispose()


@pytest.fixture
def server(url: str, tmp_path: Path) -> Iterator[str]:
    """``routemq-outbox dashboard`` on a free port; its base URL once it answers."""
    port = free_port()
    log = (tmp_path / "dashboard.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "routemq_outbox", "dashboard", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "ROUTEMQ_OUTBOX_DATABASE_URL": url},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/queues", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "the dashboard did not start:\n" + (tmp_path / "dashboard.log").read_text()
                    ) from None
                time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        process.wait(30)
        log.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        how = "apt-get install -y chromium chromium-driver"
        if os.geteuid() == 0:  # CI runs as root, and installs them: never skip there
            pytest.fail(f"chromium or chromedriver is missing: {how}")
        pytest.skip(f"the browser tests need Debian's chromium and chromium-driver: {how}")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def css(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 30).until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, selector))
    )


def click(driver: Any, selector: str) -> None:
    """Click, and wait for the page the click leads to."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element("css selector", "html")
    driver.find_element("css selector", selector).click()

    def left(_: Any) -> bool:
        # The old page's root is gone. Chromedriver says so with a stale element error, or,
        # when it asks in the middle of the navigation, with "Node with given id does not
        # belong to the document": both mean the page was replaced.
        try:
            old.is_enabled()
        except WebDriverException:
            return True
        return False

    WebDriverWait(driver, 30).until(left)


async def test_the_overview_shows_the_queues_and_a_queue_is_paused_by_clicking(
    engine: AsyncEngine, server: str, browser: Any
) -> None:
    await add_jobs(engine, 2, "mail")
    await add_failed(engine, 1, "mail")
    browser.get(server + "/")
    row = css(browser, 'tr[data-queue="mail"]')
    cells = [cell.text for cell in row.find_elements("css selector", "td")]
    assert cells[:6] == ["mail", "active", "2", "0", "0", "1"]
    assert css(browser, "svg.chart").is_displayed()

    browser.find_element("link text", "Queues").click()
    css(browser, 'tr[data-queue="mail"] button[value="pause"]')
    click(browser, 'tr[data-queue="mail"] button[value="pause"]')
    assert css(browser, ".done").text == "Paused queue mail."
    assert browser.find_element("css selector", 'tr[data-queue="mail"] .paused').text == "paused"
    assert [q.paused for q in await admin.list_queues(engine)] == [True]


async def test_a_failed_job_is_retried_by_clicking(
    engine: AsyncEngine, server: str, browser: Any
) -> None:
    first, second = await add_failed(engine, 2, "mail", error="TimeoutError: smtp")
    browser.get(server + "/failed")
    assert "TimeoutError: smtp" in css(browser, f'tr[data-failed="{first}"]').text
    browser.find_element("css selector", f'input[name="id"][value="{first}"]').click()
    click(browser, 'button[value="retry"]')
    assert css(browser, ".done").text == "Retried 1 failed job."
    assert not browser.find_elements("css selector", f'tr[data-failed="{first}"]')
    assert browser.find_elements("css selector", f'tr[data-failed="{second}"]')
    remaining = await admin.list_failed(engine)
    assert [job.id for job in remaining.jobs] == [second]
    assert (await admin.list_jobs(engine, queue="mail")).jobs[0].state == "pending"

    # and from its own page, where the traceback is
    browser.get(f"{server}/failed/{second}")
    assert "Traceback (most recent call last)" in css(browser, "pre.exception").text
    click(browser, 'button[value="retry"]')
    assert css(browser, ".done").text == "Retried 1 failed job."
    assert (await admin.list_failed(engine)).total == 0


async def test_a_delayed_job_is_made_due_and_another_cancelled(
    engine: AsyncEngine, server: str, browser: Any
) -> None:
    soon, other = await add_jobs(engine, 2, "mail", delay=3600)
    browser.get(server + "/jobs?queue=mail&state=delayed")
    assert css(browser, f'tr[data-job="{soon}"]').get_attribute("data-state") == "delayed"
    browser.find_element("css selector", f'input[name="id"][value="{soon}"]').click()
    click(browser, 'button[value="run-now"]')
    assert css(browser, ".done").text == "Made 1 job due now."
    # The page keeps its filter: the job has moved out of the delayed ones ...
    assert not browser.find_elements("css selector", f'tr[data-job="{soon}"]')
    browser.get(server + "/jobs?queue=mail&state=pending")
    # ... into the pending ones.
    assert css(browser, f'tr[data-job="{soon}"]').get_attribute("data-state") == "pending"

    browser.get(f"{server}/jobs/{other}")
    click(browser, 'button[value="cancel"]')
    assert css(browser, ".done").text == "Cancelled 1 job."
    assert [job.id for job in (await admin.list_jobs(engine)).jobs] == [soon]
    assert (await admin.list_failed(engine)).jobs[0].job_id == other
