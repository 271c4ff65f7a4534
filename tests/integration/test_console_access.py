"""The console with ``api: {tokens: true}``, in a real browser (Debian's Chromium): a page asked
for without a token leads to the sign-in page and back; a wrong token is refused there; a read
token shows the pages but its buttons are disabled, and the API refuses the change even when
the page's own script asks for it; patient details are shown to the role the service file
allows (here operator; the showing audited), to no other; an operator token retries a failed
job from its page;
signing out ends it. A change asked with the console's cookie from another site is refused."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from dataflow.platform.auth import COOKIE, TokenStore
from tests.deadlines import wait_until
from tests.integration.browser import accessibility_violations, errors, shoot, text_of
from tests.integration.platform_service import HANG, platform_service

pytestmark = pytest.mark.integration

DATA = Path(__file__).parent / "service_data"


def until(predicate, what: str):
    return wait_until(predicate, what, HANG, 0.1)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console-access")
    api = "tokens: true, patient-details: operator"
    with platform_service(tmp, {"hang": DATA / "hang.yaml"}, api) as service:
        yield service


@pytest.fixture(scope="module")
def secrets(service):
    tokens = TokenStore(Path(service.config.state))
    return {role: tokens.create(f"{role}-person", role)[1] for role in ("read", "operator")}


@pytest.fixture(scope="module")
def failed_job(service, secrets):
    """A job of the hang pipeline that failed (its input holds ``fail``), and the client that
    made it (an operator's)."""
    headers = {"Authorization": f"Bearer {secrets['operator']}"}
    with httpx.Client(base_url=service.platform.urls["rest"], timeout=HANG, headers=headers) as c:
        made = c.post("/api/v1/jobs", json={"pipeline": "hang"}).json()
        payload = f"/api/v1/payloads/{made['payload_id']}/files/input"
        c.put(f"{payload}/fail", content=b"").raise_for_status()
        c.put(f"{payload}/ct.dcm", content=a_ct_slice()).raise_for_status()
        c.post(f"/api/v1/jobs/{made['job_id']}/start").raise_for_status()
        until(lambda: c.get(f"/api/v1/jobs/{made['job_id']}").json()["state"] == "failed",
              "the job to fail")  # fmt: skip
        yield made["job_id"], c, payload


def a_ct_slice() -> bytes:
    """One phantom CT slice of a patient with a name, ID, birth date and accession number."""
    import io
    import tempfile

    import pydicom

    from operators.dicom.phantom import write_ct_series

    with tempfile.TemporaryDirectory() as folder:
        path = write_ct_series(folder, slices=1, size=16).files[0]
        ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JANE", "PAT-0042", "19610203"
    ds.AccessionNumber = "ACC-1234"
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def sign_in(browser, base: str, secret: str) -> None:
    browser.find_element("id", "token").send_keys(secret)
    browser.find_element("css selector", "form.login button").click()


def test_a_page_without_a_token_leads_to_sign_in_and_back(service, browser, secrets):
    base = service.platform.urls["rest"]
    browser.get(f"{base}/console/jobs?state=failed")
    until(lambda: "/console/login" in browser.current_url, "the sign-in page")
    assert browser.find_element("css selector", "h1").text == "Sign in"
    shoot(browser, "login")
    assert accessibility_violations(browser) == []
    sign_in(browser, base, "dft_" + "x" * 43)  # well formed, unknown
    until(lambda: text_of(browser, "login-error"), "the refusal on the sign-in page")
    assert "unknown or revoked" in text_of(browser, "login-error")
    assert "x" * 43 not in browser.page_source  # the secret is not shown back
    errors(browser)  # the refusal's 401 is logged by the browser: not a script error
    sign_in(browser, base, secrets["read"])
    until(lambda: browser.current_url.endswith("/console/jobs?state=failed"), "the jobs page")
    assert "read-person" in browser.find_element("css selector", "form.who").text
    # the cookie is out of the page scripts' reach
    assert COOKIE not in browser.execute_script("return document.cookie")
    assert errors(browser) == []


def test_a_read_token_cannot_press_the_buttons(service, browser, secrets, failed_job):
    job_id, client, _ = failed_job
    base = service.platform.urls["rest"]
    browser.get(f"{base}/console/jobs/{job_id}")
    if "/console/login" in browser.current_url:  # this test alone: sign in first
        sign_in(browser, base, secrets["read"])
        until(lambda: f"/console/jobs/{job_id}" in browser.current_url, "the job's page")
    retry = browser.find_element("css selector", 'button[data-action="retry"]')
    assert not retry.is_enabled()
    # patient details are for operators here (api.patient-details: operator)
    assert browser.find_elements("id", "patient") == []
    for identifier in ("DOE", "PAT-0042", "1961", "ACC-1234"):
        assert identifier not in browser.page_source
    assert "operator role" in browser.find_element("id", "why-locked").text
    # even the page's own script, with the cookie, is refused by the API
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        f"fetch('/api/v1/jobs/{job_id}/retry', {{method: 'POST'}}).then(r => done(r.status));"
    )
    assert status == 403
    assert client.get(f"/api/v1/jobs/{job_id}").json()["state"] == "failed"
    errors(browser)  # the refused fetch is logged by the browser: not a script error


def test_an_operator_retries_from_the_page_and_signs_out(service, browser, secrets, failed_job):
    job_id, client, payload = failed_job
    base = service.platform.urls["rest"]
    browser.get(f"{base}/console/")
    if "/console/login" not in browser.current_url:
        browser.find_element("css selector", "form.who button").click()  # sign the reader out
        until(lambda: "/console/login" in browser.current_url, "the sign-in page")
    browser.get(f"{base}/console/jobs/{job_id}")
    until(lambda: "/console/login" in browser.current_url, "signed out: the sign-in page")
    sign_in(browser, base, secrets["operator"])
    until(lambda: f"/console/jobs/{job_id}" in browser.current_url, "the job's page")
    facts = browser.find_element("id", "patient").text
    for shown in ("DOE, JANE", "PAT-0042", "1961-02-03", "ACC-1234"):
        assert shown in facts
    audit = (Path(service.config.state) / "platform" / "audit.log").read_text().splitlines()
    shown_to = [json.loads(line) for line in audit if "patient_details_shown" in line]
    assert [(e["who"], e["job"]) for e in shown_to] == [("operator-person", job_id)]
    assert accessibility_violations(browser) == []
    client.delete(f"{payload}/fail").raise_for_status()
    retry = browser.find_element("css selector", 'button[data-action="retry"]')
    assert retry.is_enabled()
    retry.click()
    until(lambda: text_of(browser, "job-state") == "succeeded", "the retried job to succeed")
    assert errors(browser) == []
    browser.find_element("css selector", "form.who button").click()
    until(lambda: "/console/login" in browser.current_url, "the sign-in page after signing out")
    browser.get(f"{base}/console/jobs")
    assert "/console/login" in browser.current_url


def test_a_change_with_the_cookie_from_another_site_is_refused(service, secrets, failed_job):
    job_id, _, _ = failed_job
    base = service.platform.urls["rest"]
    cookies = {COOKIE: secrets["operator"]}
    with httpx.Client(base_url=base, timeout=HANG, cookies=cookies) as browserlike:
        assert browserlike.get(f"/api/v1/jobs/{job_id}").status_code == 200
        refused = browserlike.post(
            f"/api/v1/jobs/{job_id}/cancel", headers={"Origin": "https://elsewhere.example"}
        )
        assert refused.status_code == 403 and "console" in refused.json()["message"]
        # a page asked for without a token: the sign-in page, not a 401
        anonymous = httpx.get(f"{base}/console/models", timeout=HANG)
        assert anonymous.status_code == 303
        assert anonymous.headers["location"] == "/console/login?next=%2Fconsole%2Fmodels"
        # the API itself still answers 401 to a call without a token
        assert httpx.get(f"{base}/api/v1/jobs", timeout=HANG).status_code == 401
