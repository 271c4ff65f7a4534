"""A real browser for the console's tests: Debian's Chromium, headless, driven by Selenium
through chromium-driver (skipped, saying how to install them, where they are missing)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.integration.platform_service import HANG

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip(
            "Chromium and chromium-driver are not installed (apt-get install chromium "
            "chromium-driver; .ci/run does)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(
        service=webdriver.ChromeService(executable_path=DRIVER), options=options
    )
    driver.set_page_load_timeout(HANG)
    yield driver
    driver.quit()


# chromedriver's answer when the element found was removed before it was read (the page
# re-rendered in between): not mapped to a stale element, but the same race
GONE = "Could not find object with given id"


def live(read, default=None):
    """``read()`` of elements on a page that re-renders as it is read: ``default`` where an
    element it found was replaced meanwhile (stale, or gone in chromedriver's words)."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException

    try:
        return read()
    except StaleElementReferenceException:
        return default
    except WebDriverException as exc:
        if GONE in str(exc):
            return default
        raise


def text_of(browser, element_id: str) -> str | None:
    """An element's text, or None while the page reloads."""
    from selenium.common.exceptions import NoSuchElementException

    try:
        return live(lambda: browser.find_element("id", element_id).text)
    except NoSuchElementException:
        return None


def errors(browser) -> list[str]:
    """The page's JavaScript errors (console messages at SEVERE)."""
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def shoot(browser, name: str) -> None:
    folder = os.environ.get("DATAFLOW_CONSOLE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / f"{name}.png"))


def accessibility_violations(browser) -> list[str]:
    """What axe-core (the engine of browsers' accessibility audits, shipped with the
    axe-selenium-python package) finds wrong in the page against WCAG 2 A and AA: contrast,
    names of controls and links, keyboard access, landmarks, tables. Each: the rule, its
    impact and the elements, as text."""
    axe = pytest.importorskip("axe_selenium_python").Axe(browser)
    axe.inject()
    results = axe.run(options="{runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa']}}")
    return [
        f"{v['id']} ({v['impact']}): {v['help']}: "
        + "; ".join(" ".join(node["target"]) for node in v["nodes"][:5])
        for v in results["violations"]
    ]


def overflowing(browser) -> list[str]:
    """The widest elements that stick out to the right of the window (empty: the page fits
    its width without scrolling sideways)."""
    return browser.execute_script("""
        const width = document.documentElement.clientWidth;
        return [...document.querySelectorAll("body *")]
          .filter((e) => e.getBoundingClientRect().right > width + 1)
          .slice(-5).map((e) => e.tagName + "." + e.className + "#" + e.id);
    """)
