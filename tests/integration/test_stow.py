"""STOW-RS in (issue 16 §2): a real ``dataflow serve`` takes studies over HTTP on its REST
port, behind its tokens, from dicomweb-client and from Orthanc's DICOMweb plugin, and they
become the same jobs as a study sent with dcmtk's storescu; each instance's outcome is in the
response (Referenced / Failed SOP sequences); a wrong media type, a body over the limit, a
malformed body and the disk reserve are refused with nothing half-stored; an instance
answered as stored survives kill -9."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pydicom
import pytest
from cli import dataflow, serve, wait_serving
from deadlines import HANG, LONG_HANG
from dicom_peers import free_port, start_orthanc, storescu, wait_for_port

from operators.dicom.phantom import write_ct_series

pytestmark = pytest.mark.integration

DATA = Path(__file__).parent / "service_data"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
BOUNDARY = "dataflow-stow-test"
RELATED = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
REFERENCED, FAILED, REASON = "00081199", "00081198", "00081197"
SOP_INSTANCE = "00081155"


def config_file(tmp: Path, port: int) -> Path:
    path = tmp / "service.yaml"
    path.write_text(f"""
state: {tmp / "state"}
pipelines:
  inventory: {DATA / "inventory.yaml"}
api: {{rest-port: 0, grpc-port: null, tokens: true}}
dicom:
  receivers:
  - {{name: plain, host: 127.0.0.1, port: {port}}}
  ae-titles:
    DATAFLOW: {{pipelines: [inventory], group-by: study, timeout: 1}}
    HOLD: {{pipelines: [inventory], group-by: study, timeout: 100000}}
  allow:
  - {{ae: STORESCU}}
  stow: {{ae-title: DATAFLOW, max-request-size: 2MiB}}
""")
    return path


class Served:
    """``dataflow serve`` of :func:`config_file`, with an operator token."""

    def __init__(self, tmp: Path, *args: str) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp, self.port = tmp, free_port()
        self.config = config_file(tmp, self.port)
        made = dataflow("tokens", "create", "stow-robot", str(self.config), "--role", "operator")
        assert made.returncode == 0, made.stderr
        self.token = made.stdout.strip().splitlines()[-1]
        self.args = args
        self.start()

    def start(self, *more: str) -> None:
        api = self.tmp / "state" / "api.json"
        api.unlink(missing_ok=True)
        self.proc = serve(self.config, self.tmp / "serve.log", *self.args, *more)
        wait_for_port(self.port, proc=self.proc, timeout=LONG_HANG)
        wait_serving(api.exists, HANG, "api.json", self.proc)
        self.url = json.loads(api.read_text())["rest"]
        self.client = httpx.Client(base_url=self.url, timeout=HANG,
                                   headers={"Authorization": f"Bearer {self.token}"})  # fmt: skip

    def studies(self, **params) -> list[dict]:
        return self.client.get("/api/v1/dicom/studies", params=params).json()

    def stop(self) -> str:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=HANG) == 0
        return (self.tmp / "serve.log").read_text()

    @property
    def incoming(self) -> list[Path]:
        return list((self.tmp / "state" / "dicom" / "spool" / "plain" / ".incoming").iterdir())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    service = Served(tmp_path_factory.mktemp("stow"))
    yield service
    log = service.stop()
    for name in ("Phantom^Synthetic", "PHANTOM-"):
        assert name not in log  # no patient identifiers in the logs


def multipart(*parts: tuple[str, bytes]) -> bytes:
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: {kind}\r\n\r\n".encode() + data + b"\r\n"
                    for kind, data in parts)  # fmt: skip
    return body + f"--{BOUNDARY}--\r\n".encode()


def sop_uids(items: list[dict]) -> list[str]:
    return [item[SOP_INSTANCE]["Value"][0] for item in items if SOP_INSTANCE in item]


def finished_jobs(served: Served, count: int):
    def done():
        studies = served.studies(state="dispatched")
        jobs = [job for s in studies for job in s["jobs"]]
        ok = len(jobs) == count and all(j["state"] == "succeeded" for j in jobs)
        return studies if ok else None

    return wait_serving(done, LONG_HANG, f"{count} jobs to succeed", served.proc)


def inventories(tmp: Path) -> list[set[str]]:
    found = (tmp / "state" / "jobs").glob("*/**/uids.json")
    return [set(json.loads(p.read_text())) for p in found]


def test_dicomweb_client_and_storescu_make_the_same_job(served, tmp_path):
    from dicomweb_client.api import DICOMwebClient

    web = write_ct_series(tmp_path / "web", slices=5, size=16, seed=161)
    dimse = write_ct_series(tmp_path / "dimse", slices=3, size=16, seed=162)
    client = DICOMwebClient(served.url + "/dicom-web",
                            headers={"Authorization": f"Bearer {served.token}"})  # fmt: skip
    answer = client.store_instances([pydicom.dcmread(p) for p in web.files])
    assert sorted(i.ReferencedSOPInstanceUID for i in answer.ReferencedSOPSequence) == sorted(
        web.sop_instance_uids
    )
    assert "FailedSOPSequence" not in answer
    sent = storescu("127.0.0.1", served.port, dimse.files, called="DATAFLOW")
    assert sent.returncode == 0, sent.stdout + sent.stderr

    studies = finished_jobs(served, 2)
    by_uid = {s["uid"]: s for s in studies}
    over_web, over_dimse = by_uid[web.study_instance_uid], by_uid[dimse.study_instance_uid]
    for study in (over_web, over_dimse):
        assert (study["called_ae"], study["group_by"], study["pipelines"]) == (
            "DATAFLOW", "study", ["inventory"],
        )  # fmt: skip
    assert (over_web["calling_ae"], over_web["instances"]) == ("STOW-RS", 5)
    assert (over_dimse["calling_ae"], over_dimse["instances"]) == ("STORESCU", 3)
    assert set(map(frozenset, inventories(served.tmp))) >= {
        frozenset(web.sop_instance_uids), frozenset(dimse.sop_instance_uids),
    }  # fmt: skip
    history = served.client.get("/api/v1/dicom/associations").json()
    stow = [a for a in history if a["outcome"] == "stow"]
    assert [(a["called_ae"], a["stored"], a["failed"]) for a in stow] == [("DATAFLOW", 5, 0)]


def test_each_part_has_its_outcome(served, tmp_path):
    study = write_ct_series(tmp_path / "study", slices=3, size=16, seed=163)
    good = [p.read_bytes() for p in study.files]
    uid = study.sop_instance_uids[2].encode()
    other = uid[:-1] + (b"1" if uid[-1:] != b"1" else b"2")
    mismatched = good[2].replace(uid, other, 1)  # the file meta's UID only
    body = multipart(
        ("application/dicom", good[0]),
        ("application/dicom", b"this is not DICOM at all" * 10),
        ("text/plain", b"neither is this"),
        ("application/dicom", mismatched),
        ("application/dicom; transfer-syntax=1.2.840.10008.1.2.1", good[1]),
    )
    answer = served.client.post("/dicom-web/HOLD/studies", content=body,
                                headers={"Content-Type": RELATED})  # fmt: skip
    assert answer.status_code == 202, answer.text
    assert answer.headers["content-type"] == "application/dicom+json"
    result = answer.json()
    assert sop_uids(result[REFERENCED]["Value"]) == list(study.sop_instance_uids[:2])
    failed = result[FAILED]["Value"]
    assert [f[REASON]["Value"][0] for f in failed] == [0xC000, 0xC000, 0xA900]
    assert sop_uids(failed) == [other.decode()]
    (held,) = served.studies(state="pending")
    assert (held["uid"], held["called_ae"], held["instances"]) == (
        study.study_instance_uid, "HOLD", 2,
    )  # fmt: skip
    # the study of the URL is not the instance's: 409, nothing of it stored
    elsewhere = served.client.post(f"/dicom-web/HOLD/studies/1.2.3.{study.study_instance_uid[-6:]}",
                                   content=multipart(("application/dicom", good[2])),
                                   headers={"Content-Type": RELATED})  # fmt: skip
    assert elsewhere.status_code == 409, elsewhere.text
    assert elsewhere.json()[FAILED]["Value"][0][REASON]["Value"] == [0xA900]
    # nothing DICOM at all: 400, with the failed parts
    junk = served.client.post("/dicom-web/studies", content=multipart(("application/dicom", b"x")),
                              headers={"Content-Type": RELATED, "X-Called-AE": "HOLD"})  # fmt: skip
    assert junk.status_code == 400 and junk.json()[FAILED]["Value"][0][REASON]["Value"] == [0xC000]
    assert served.studies(state="pending")[0]["instances"] == 2
    assert served.incoming == []


def test_refusals_store_nothing(served, tmp_path):
    study = write_ct_series(tmp_path / "study", slices=2, size=16, seed=164)
    body = multipart(*[("application/dicom", p.read_bytes()) for p in study.files])
    before = served.studies()

    def post(path="/dicom-web/studies", content=body, **headers):
        return served.client.post(path, content=content, headers={"Content-Type": RELATED,
                                                                  **headers})  # fmt: skip

    anonymous = httpx.post(served.url + "/dicom-web/studies", content=body,
                           headers={"Content-Type": RELATED}, timeout=HANG)  # fmt: skip
    assert anonymous.status_code == 401
    wrong = post(**{"Content-Type": "application/dicom"})
    assert wrong.status_code == 415 and "multipart/related" in wrong.json()["message"]
    json_parts = post(
        **{"Content-Type": RELATED.replace("application/dicom", "application/dicom+json")}
    )
    assert json_parts.status_code == 415
    unknown = post("/dicom-web/NOBODY/studies")
    assert unknown.status_code == 404 and "NOBODY" in unknown.json()["message"]
    both = post("/dicom-web/HOLD/studies", **{"X-Called-AE": "DATAFLOW"})
    assert both.status_code == 400
    no_boundary = post(**{"Content-Type": 'multipart/related; type="application/dicom"'})
    assert no_boundary.status_code == 400 and "boundary" in no_boundary.json()["message"]
    cut = post(content=body[: len(body) // 2])  # no closing boundary: nothing placed
    assert cut.status_code == 400 and "ends inside a part" in cut.json()["message"]

    big = multipart(*[("application/dicom", study.files[0].read_bytes())] * 2,
                    ("application/dicom", b"\0" * 3 * 2**20))  # fmt: skip
    over = post(content=big)  # with a Content-Length over the limit
    assert over.status_code == 413 and "max-request-size" in over.json()["message"]
    chunked = post(content=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]))
    assert chunked.status_code == 413  # found out while reading: the parts so far removed
    assert served.studies() == before
    assert served.incoming == []


def test_kill_9_after_the_answer_and_the_disk_reserve(private_network, tmp_path):
    study = write_ct_series(tmp_path / "study", slices=4, size=16, seed=165)
    body = multipart(*[("application/dicom", p.read_bytes()) for p in study.files])
    served = Served(tmp_path / "service")
    try:
        answer = served.client.post("/dicom-web/HOLD/studies", content=body,
                                    headers={"Content-Type": RELATED})  # fmt: skip
        assert answer.status_code == 200, answer.text
        served.proc.send_signal(signal.SIGKILL)
        served.proc.wait(timeout=HANG)
        served.client.close()
        served.start("--set", "dicom.limits.disk-reserve=1000000GiB")
        (held,) = served.studies(state="pending")
        assert (held["uid"], held["instances"]) == (study.study_instance_uid, 4)
        spool = tmp_path / "service" / "state" / "dicom" / "spool" / "plain"
        stored = {pydicom.dcmread(p).SOPInstanceUID for p in spool.glob("HOLD/*/*/*.dcm")}
        assert stored == set(study.sop_instance_uids)
        # below the disk reserve now: every instance refused (Out of Resources), none stored
        more = write_ct_series(tmp_path / "more", slices=2, size=16, seed=166)
        refused = served.client.post("/dicom-web/studies", headers={"Content-Type": RELATED},
                                     content=multipart(*[("application/dicom", p.read_bytes())
                                                         for p in more.files]))  # fmt: skip
        assert refused.status_code == 409, refused.text
        assert [f[REASON]["Value"][0] for f in refused.json()[FAILED]["Value"]] == [0xA700] * 2
        assert len(served.studies()) == 1 and served.incoming == []
    finally:
        served.stop()


def test_orthanc_sends_a_study_over_dicomweb(private_network, tmp_path):
    if not DICOMWEB_PLUGIN.exists():
        pytest.skip("Orthanc's DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)")
    study = write_ct_series(tmp_path / "study", slices=4, size=16, seed=167)
    served = Served(tmp_path / "service")
    try:
        settings = {
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {"dataflow": {
                "Url": f"{served.url}/dicom-web/DATAFLOW/",
                "HttpHeaders": {"Authorization": f"Bearer {served.token}"},
            }}},
        }  # fmt: skip
        with start_orthanc(tmp_path / "orthanc", config=settings) as orthanc:
            ids = {orthanc.upload(p)["ParentStudy"] for p in study.files}
            orthanc.rest("POST", "/dicom-web/servers/dataflow/stow", {"Resources": list(ids)})
            (listed,) = finished_jobs(served, 1)
        assert (listed["uid"], listed["instances"]) == (study.study_instance_uid, 4)
        assert (listed["called_ae"], listed["calling_ae"]) == ("DATAFLOW", "STOW-RS")
        assert inventories(served.tmp) == [set(study.sop_instance_uids)]
    finally:
        served.stop()


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far, in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_large_body_is_streamed_not_held(tmp_path):
    """256 MiB in one part (chunked): the service's peak memory grows by far less."""
    study = write_ct_series(tmp_path / "study", slices=1, size=16, seed=168)
    served = Served(tmp_path / "service", "--set", "dicom.stow.max-request-size=1GiB")
    try:
        before = peak_rss(served.proc.pid)

        def body():
            yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            block = b"\x01" * 2**20
            for _ in range(256):
                yield block
            yield (f"\r\n--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                   + study.files[0].read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode())  # fmt: skip

        answer = served.client.post("/dicom-web/HOLD/studies", content=body(),
                                    headers={"Content-Type": RELATED})  # fmt: skip
        assert answer.status_code == 202, answer.text
        assert sop_uids(answer.json()[REFERENCED]["Value"]) == list(study.sop_instance_uids)
        assert answer.json()[FAILED]["Value"][0][REASON]["Value"] == [0xC000]
        assert peak_rss(served.proc.pid) - before < 64 * 2**20
        assert served.incoming == []
    finally:
        served.stop()


def test_stow_without_an_api_section_is_refused_at_start(tmp_path):
    """STOW-RS is served on the API's REST port: a service file that asks for it without an
    ``api`` section would have it silently do nothing, so the start is refused, naming both."""
    path = config_file(tmp_path, free_port())
    path.write_text(
        path.read_text().replace("api: {rest-port: 0, grpc-port: null, tokens: true}\n", "")
    )
    out = dataflow("serve", str(path))
    assert out.returncode != 0
    assert (
        "section 'dicom' serves HTTP routes (e.g. STOW-RS) on the API's REST port, and there"
        " is no 'api' section" in out.stderr
    ), out.stderr
