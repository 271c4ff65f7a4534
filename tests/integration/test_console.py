"""The console in a real browser: Debian's Chromium, headless, driven by Selenium through
chromium-driver, against the real service. A job started through the API appears on the jobs
page without a reload and ends succeeded there; a job's page shows its operators, files and
log; a failed job is retried from its page and succeeds; every page renders with no
JavaScript error. With ``DATAFLOW_CONSOLE_SCREENSHOTS=DIR`` each page's screenshot is written
there (``docs/console/`` holds the committed ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deadlines import wait_until
from tests.integration.browser import (
    accessibility_violations,
    errors,
    live,
    overflowing,
    shoot,
    text_of,
)
from tests.integration.platform_service import HANG, api_client, platform_service, start_job

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
DATA = Path(__file__).parent / "service_data"
PASSTHROUGH = ROOT / "pipelines" / "passthrough.yaml"
VOLUME = ROOT / "pipelines" / "samples" / "volumes" / "study-a" / "volume.npy"


def until(predicate, what: str):
    return wait_until(predicate, what, HANG, 0.1)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    pipelines = {"passthrough": PASSTHROUGH, "hang": DATA / "hang.yaml"}
    with platform_service(tmp_path_factory.mktemp("console"), pipelines) as service:
        yield service


def test_a_job_appears_and_ends_on_the_jobs_page_without_a_reload(service, browser):
    base = service.platform.urls["rest"]
    browser.get(f"{base}/")  # the console is the root of the REST port
    assert browser.current_url.endswith("/console/") and "Needs a person" in browser.page_source
    browser.get(f"{base}/console/jobs")
    browser.execute_script("window.__same_page = true")
    until(lambda: text_of(browser, "live") == "live", "the event stream open")
    with api_client(service) as client:
        job_id = start_job(client, "passthrough", {"volume.npy": VOLUME.read_bytes()})

    def row_state():
        def read():
            rows = browser.find_elements("css selector", f'tr[data-job="{job_id}"]')
            return rows and rows[0].find_element("css selector", ".chip").text == "succeeded"

        return live(read, False)  # False: the rows were replaced as they were read

    until(row_state, "the job's row to show it succeeded")
    assert browser.execute_script("return window.__same_page === true")  # no reload
    shoot(browser, "jobs")
    assert errors(browser) == []

    browser.find_element("css selector", f'tr[data-job="{job_id}"] a').click()
    until(lambda: "/console/jobs/" in browser.current_url, "the job's page")
    operators = [
        li.get_attribute("data-operator")
        for li in browser.find_elements("css selector", ".graph li")
    ]
    assert operators == ["npy-to-array", "array-to-npz", "compare"]
    assert all("completed" in li.text for li in browser.find_elements("css selector", ".graph li"))
    links = [a.text for a in browser.find_elements("css selector", "table a")]
    assert "/input/volume.npy" in links and any(t.startswith("/operators/") for t in links)
    assert "created (passthrough)" in browser.find_element("css selector", "pre.log").text
    rows = browser.find_elements("css selector", "svg.gantt g")  # the timeline
    assert [g.get_attribute("data-operator") for g in rows] == operators
    assert all(len(g.find_elements("css selector", "rect.ok")) == 1 for g in rows)
    shoot(browser, "job")
    assert errors(browser) == []


def test_a_failed_job_is_retried_from_its_page(service, browser, tmp_path):
    with api_client(service) as client:
        job_id = start_job(client, "hang", {"fail": b""})
        until(
            lambda: client.get(f"/api/v1/jobs/{job_id}").json()["state"] == "failed",
            "the job to fail",
        )
        browser.get(f"{service.platform.urls['rest']}/console/jobs/{job_id}")
        assert "DOE^JANE" not in browser.page_source and "PAT-0042" not in browser.page_source
        payload = client.get(f"/api/v1/jobs/{job_id}").json()["payload_id"]
        client.delete(f"/api/v1/payloads/{payload}/files/input/fail").raise_for_status()
    browser.find_element("css selector", 'button[data-action="retry"]').click()
    until(
        lambda: text_of(browser, "job-state") == "succeeded",
        "the retried job to succeed on its page (reloaded by its events)",
    )
    assert errors(browser) == []


def test_a_pipeline_is_uploaded_from_the_page_diagnostics_beside_its_lines(service, browser):
    base = service.platform.urls["rest"]
    text = PASSTHROUGH.read_text()
    # a typo'd stage class and an unknown key: the lines they are on, counted here
    broken = text.replace("operators.passthrough:ArrayToNpz", "operators.passthrough:ArrayToNpx")
    broken = broken.replace("  description: Checks the announced", "  colour: blue\n  description: "
                            "Checks the announced")  # fmt: skip
    lines = broken.splitlines()
    stage_line = next(n for n, line in enumerate(lines, 1) if "ArrayToNpx" in line)
    key_line = next(n for n, line in enumerate(lines, 1) if "colour: blue" in line)
    browser.get(f"{base}/console/pipelines")
    before = [r.get_attribute("data-pipeline") for r in
              browser.find_elements("css selector", "tr[data-pipeline]")]  # fmt: skip
    assert "passthrough" in before
    area = browser.find_element("css selector", 'textarea[name="definition"]')
    browser.execute_script("arguments[0].value = arguments[1]", area, broken)
    browser.find_element("css selector", "form.upload button").click()
    until(lambda: text_of(browser, "upload-error"), "the refusal on the page")
    assert "does not validate" in text_of(browser, "upload-error")
    errors_at = {d.get_attribute("data-line"): d.text for d in
                 browser.find_elements("css selector", ".yaml .diag.error")}  # fmt: skip
    assert list(errors_at) == [str(stage_line)] and "ArrayToNpx" in errors_at[str(stage_line)]
    warned = browser.find_elements("css selector", f"#L{key_line} .diag.warning")
    assert warned and "colour" in warned[0].text
    shoot(browser, "pipelines-upload-refused")
    errors(browser)  # the page's 422 is logged by the browser: not a script error
    with api_client(service) as client:
        assert [p["name"] for p in client.get("/api/v1/pipelines").json()] == before

    browser.get(f"{base}/console/pipelines")  # this time as a file chosen in the form
    browser.find_element("css selector", 'input[name="file"]').send_keys(str(PASSTHROUGH))
    browser.find_element("css selector", 'input[name="name"]').send_keys("passthrough-copy")
    browser.find_element("css selector", "form.upload button").click()
    until(lambda: browser.current_url.endswith("/console/pipelines/passthrough-copy"),
          "the new pipeline's page")  # fmt: skip
    boxes = browser.find_elements("css selector", "#graph svg g.operator")
    assert [b.get_attribute("data-operator") for b in boxes] == [
        "npy-to-array", "array-to-npz", "compare"]  # fmt: skip
    assert browser.find_elements("css selector", ".yaml .diag.error") == []
    shoot(browser, "pipeline")
    with api_client(service) as client:
        job_id = start_job(client, "passthrough-copy", {"volume.npy": VOLUME.read_bytes()})
        until(lambda: client.get(f"/api/v1/jobs/{job_id}").json()["state"] == "succeeded",
              "a job of the uploaded pipeline to succeed")  # fmt: skip
    browser.get(f"{base}/console/pipelines")
    shoot(browser, "pipelines")
    assert errors(browser) == []


def test_an_empty_or_oversized_upload_is_refused_saying_why(service):
    from dataflow.platform.console.pipelines import MAX_DEFINITION

    with api_client(service) as client:
        before = client.get("/api/v1/pipelines").json()
        empty = client.post("/console/pipelines", data={"definition": "  "},
                            files={"file": ("", b"")})  # fmt: skip
        assert empty.status_code == 422 and "Choose a YAML file" in empty.text
        huge = client.post("/console/pipelines",
                           files={"file": ("big.yaml", b"#" * (MAX_DEFINITION + 1))})  # fmt: skip
        assert huge.status_code == 413 and "larger than 1024 KiB" in huge.text
        assert client.get("/api/v1/pipelines").json() == before  # nothing registered


@pytest.mark.parametrize(
    ("page", "heading", "nav"),
    [
        ("", "Overview", "Overview"),
        ("jobs?state=failed", "Jobs", "Jobs"),
        ("pipelines", "Pipelines", "Pipelines"),
        ("pipelines/passthrough", "Pipeline passthrough", "Pipelines"),
        ("dicom", "DICOM", "DICOM"),
        ("exports", "Export", "Export"),
        ("models", "Models", "Models"),
    ],
)
def test_every_page_renders_without_a_javascript_error_and_passes_axe(
    service, browser, page, heading, nav
):
    errors(browser)  # what earlier pages logged
    browser.get(f"{service.platform.urls['rest']}/console/{page}")
    assert browser.find_element("css selector", "h1").text.startswith(heading)
    assert browser.find_element("css selector", 'nav a[aria-current="page"]').text == nav
    if "/" not in page:  # a pipeline's page is shot by the upload test
        shoot(browser, page.split("?")[0] or "overview")
    assert errors(browser) == []
    # fits 1280x800 and a 4K wall screen: nothing wider than the window
    for width, height in ((1280, 800), (3840, 2160)):
        browser.set_window_size(width, height)
        assert overflowing(browser) == [], width
    browser.set_window_size(1280, 800)
    # keyboard, names, contrast (WCAG 2 AA) checked by axe-core in the page
    found = accessibility_violations(browser)
    assert found == [], found


def test_pages_left_close_their_event_streams(service, browser):
    """A live page left for another closes its event stream: a browser keeps left pages (the
    back-forward cache) and, with their streams open, six of them used every connection it
    allows to the server (HTTP/1.1), so the next page waited a minute to load."""
    base = service.platform.urls["rest"]
    with api_client(service) as client:
        job_id = client.get("/api/v1/jobs").json()[0]["id"]

        def streams() -> float:
            text = client.get("/metrics").text
            return float(text.split("\ndataflow_api_event_streams ")[1].split()[0])

        for page in ("jobs", f"jobs/{job_id}", "jobs?state=failed", "jobs?since=3600",
                     f"jobs/{job_id}", "jobs?find=nothing", "jobs"):  # fmt: skip
            browser.get(f"{base}/console/{page}")
            until(lambda: text_of(browser, "live") in ("live", None) and
                  browser.execute_script("return document.readyState") == "complete",
                  f"{page} loaded")  # fmt: skip
        until(lambda: streams() <= 1, "the streams of the pages left closed")
    assert errors(browser) == []


def test_an_unknown_job_is_a_page_that_says_so(service, browser):
    browser.get(f"{service.platform.urls['rest']}/console/jobs/{'0' * 32}")
    assert "no job" in browser.find_element("css selector", "[role=alert]").text.lower()
    errors(browser)  # the 404 itself is logged by the browser: not a script error
