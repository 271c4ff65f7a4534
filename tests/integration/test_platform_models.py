"""Models over the platform's REST API and the CLI, against the real service: an ONNX model
uploaded, named by a pipeline registered at run time as ``models:/NAME/VERSION``, a job run
with it, deletion refused while the pipeline names it; a Triton model folder as a tar archive;
every bad upload refused with nothing left behind."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.integration.platform_service import HANG, api_client, platform_service
from tests.integration.test_platform_rest import wait_state

pytestmark = pytest.mark.integration
pytest.importorskip("onnxruntime", reason="the inference stage needs onnxruntime (test extra)")

ROOT = Path(__file__).parents[2]
PASSTHROUGH = ROOT / "pipelines" / "passthrough.yaml"
INFERENCE = ROOT / "pipelines" / "ct-inference.yaml"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    with platform_service(tmp, {"passthrough": PASSTHROUGH}, "max-upload: 1MiB") as service:
        yield service


@pytest.fixture
def client(service):
    with api_client(service) as client:
        yield client


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> bytes:
    from operators.inference.demo_model import save_demo_model

    return save_demo_model(tmp_path_factory.mktemp("onnx") / "demo.onnx").read_bytes()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("study") / "ct"
    command = [sys.executable, "-m", "operators.dicom.phantom", str(folder), "--slices", "12",
               "--size", "48"]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return folder


def _leftovers(service) -> list[str]:
    staging = service.config.state / "models" / ".staging"
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


def test_a_pipeline_names_an_uploaded_model_and_runs_with_it(service, client, onnx_model, study):
    up = client.post("/api/v1/models/lung", params={"file": "lung.onnx"}, content=onnx_model)
    assert up.status_code == 201, up.text
    record = up.json()
    assert (record["name"], record["version"], record["type"]) == ("lung", 1, "onnx")
    assert record["size"] == len(onnx_model) and len(record["id"]) == 32
    assert [m["id"] for m in client.get("/api/v1/models").json()] == [record["id"]]
    got = client.get("/api/v1/models/lung/1/download")
    assert got.status_code == 200 and got.content == onnx_model
    assert 'filename="lung.onnx"' in got.headers["content-disposition"]

    missing = INFERENCE.read_text().replace("  model: demo", "  model: models:/lung/9", 1)
    refused = client.post("/api/v1/pipelines", json={"definition": missing, "name": "lung-ai"})
    assert refused.status_code == 422
    assert "no model 'lung' version 9" in refused.json()["message"]
    assert "versions: 1" in refused.json()["message"]

    named = INFERENCE.read_text().replace("  model: demo", "  model: models:/lung/1", 1)
    created = client.post("/api/v1/pipelines", json={"definition": named, "name": "lung-ai"})
    assert created.status_code == 201, created.text
    job = client.post("/api/v1/jobs", json={"pipeline": "lung-ai"}).json()
    for path in sorted(study.iterdir()):
        client.put(f"/api/v1/payloads/{job['payload_id']}/files/input/ct/{path.name}",
                   content=path.read_bytes()).raise_for_status()  # fmt: skip
    client.post(f"/api/v1/jobs/{job['job_id']}/start").raise_for_status()
    status = wait_state(client, job["job_id"])
    assert status["state"] == "succeeded", status
    files = [f["name"] for f in client.get(f"/api/v1/jobs/{job['job_id']}/files").json()]
    assert any(n.startswith("/operators/write-seg/") and n.endswith(".dcm") for n in files), files

    described = client.get("/api/v1/models/lung/latest").json()
    assert described["version"] == 1 and described["used_by"] == ["lung-ai"]
    in_use = client.delete("/api/v1/models/lung/1")
    assert in_use.status_code == 409 and "lung-ai" in in_use.json()["message"]
    assert client.get("/api/v1/models/lung/1").status_code == 200
    assert client.delete("/api/v1/pipelines/lung-ai").status_code == 204
    assert client.delete("/api/v1/models/lung/1").status_code == 204
    gone = client.get("/api/v1/models/lung/1")
    assert gone.status_code == 404 and gone.json()["code"] < 0
    assert client.get("/api/v1/models").json() == []
    audit = [entry["what"] for entry in client.get("/api/v1/audit").json()]
    assert "model_added" in audit and "model_deleted" in audit


def _tar(members: dict[str, bytes], *, link: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def test_a_triton_model_folder_travels_as_a_tar_archive(client, onnx_model):
    folder = {"config.pbtxt": b'name: "seg"\nplatform: "onnxruntime_onnx"\n',
              "1/model.onnx": onnx_model}  # fmt: skip
    up = client.put("/api/v1/models/seg/3", params={"format": "tar"}, content=_tar(folder))
    assert up.status_code == 201, up.text
    assert (up.json()["type"], up.json()["version"], up.json()["files"]) == ("triton", 3, 2)
    again = client.put("/api/v1/models/seg/3", params={"format": "tar"}, content=_tar(folder))
    assert again.status_code == 409
    nxt = client.post("/api/v1/models/seg", content=onnx_model)  # the next version: 4
    assert nxt.status_code == 201 and nxt.json()["version"] == 4
    got = client.get("/api/v1/models/seg/3/download")
    with tarfile.open(fileobj=io.BytesIO(got.content)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    assert members == folder
    assert client.get("/api/v1/models/seg/latest").json()["version"] == 4
    for version in (3, 4):
        assert client.delete(f"/api/v1/models/seg/{version}").status_code == 204


@pytest.mark.parametrize(
    ("path", "params", "body", "status", "words"),
    [
        ("/api/v1/models/a%20b", {}, b"x", 422, "model name"),
        ("/api/v1/models/.hidden", {}, b"x", 422, "model name"),
        ("/api/v1/models/m/0", {}, b"x", 422, "a positive integer"),
        ("/api/v1/models/m/x1", {}, b"x", 422, "a positive integer"),
        ("/api/v1/models/m", {"file": "../m.onnx"}, b"x", 422, "inside the model's folder"),
        ("/api/v1/models/m", {"file": "a/m.onnx"}, b"x", 422, "a file name, not a path"),
        ("/api/v1/models/m", {"format": "zip"}, b"x", 422, ""),
        ("/api/v1/models/m", {"format": "tar"}, b"not a tar", 422, "cannot be read as tar"),
        ("/api/v1/models/m", {"format": "tar"}, _tar({"../evil": b"x"}), 422, "inside"),
        ("/api/v1/models/m", {"format": "tar"}, _tar({"a": b"x"}, link="b"), 422, "links"),
        ("/api/v1/models/m", {"format": "tar"}, _tar({}), 422, "holds no file"),
        ("/api/v1/models/m", {}, b"\0" * (2 << 20), 413, "over the limit"),
    ],
)
def test_bad_uploads_are_refused_and_leave_nothing(service, client, path, params, body, status,
                                                   words):  # fmt: skip
    method = "PUT" if path.count("/") == 5 else "POST"  # .../models/NAME/VERSION: PUT
    response = client.request(method, path, params=params, content=body)
    assert response.status_code == status, response.text
    assert words in response.json().get("message", str(response.json()))
    assert client.get("/api/v1/models").json() == []
    assert _leftovers(service) == []


def test_unknown_models_are_not_found(client):
    for path in ("/api/v1/models/nope/1", "/api/v1/models/nope/latest",
                 "/api/v1/models/nope/1/download"):  # fmt: skip
        response = client.get(path)
        assert response.status_code == 404 and "no model 'nope'" in response.json()["message"]
    assert client.delete("/api/v1/models/nope/latest").status_code == 422
    assert client.delete("/api/v1/models/nope/2").status_code == 404


def test_the_cli_uploads_lists_downloads_and_deletes(service, onnx_model, tmp_path):
    model = tmp_path / "net.onnx"
    model.write_bytes(onnx_model)
    folder = tmp_path / "triton"
    (folder / "1").mkdir(parents=True)
    (folder / "1" / "model.onnx").write_bytes(onnx_model)
    (folder / "config.pbtxt").write_text('name: "net"\n')
    env = {**os.environ, "DATAFLOW_API": service.platform.urls["rest"]}
    dataflow = str(Path(sys.executable).with_name("dataflow"))

    def cli(*args: str) -> str:
        done = subprocess.run([dataflow, "models", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=HANG)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "name it models:/net/1" in cli("upload", "net", str(model))
    assert "name it models:/net/2" in cli("upload", "net", str(folder))
    listing = cli("list")
    assert "net" in listing and " onnx " in listing and " triton " in listing
    cli("download", "net/1", "-o", "back.onnx")
    assert (tmp_path / "back.onnx").read_bytes() == onnx_model
    cli("download", "net")  # the highest: a tar of the folder, named after the model
    with tarfile.open(tmp_path / "net-2.tar") as tar:
        assert sorted(tar.getnames()) == ["1/model.onnx", "config.pbtxt"]
    cli("delete", "net/1")
    cli("delete", "net/2")
    refused = subprocess.run([dataflow, "models", "delete", "net/2"], env=env,
                             capture_output=True, text=True, timeout=HANG)  # fmt: skip
    assert refused.returncode == 2 and "no model 'net'" in refused.stderr


def test_dataflow_run_reads_a_model_of_the_local_repository(onnx_model, study, tmp_path):
    """A researcher's loop without a service: `dataflow models upload --local`, then a
    pipeline run naming models:/NAME/VERSION; a missing version fails validation by name."""
    model = tmp_path / "net.onnx"
    model.write_bytes(onnx_model)
    env = {**os.environ, "DATAFLOW_MODELS": str(tmp_path / "repository")}
    dataflow = str(Path(sys.executable).with_name("dataflow"))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([dataflow, *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=HANG)  # fmt: skip

    added = run("models", "upload", "lung", str(model), "--local")
    assert added.returncode == 0 and "models:/lung/1" in added.stdout, added.stderr
    assert (tmp_path / "repository" / "lung" / "1" / "net.onnx").read_bytes() == onnx_model
    bad = run("validate", str(INFERENCE), "--param", "model=models:/lung/2")
    assert bad.returncode != 0
    assert "ct-inference.yaml:" in bad.stdout + bad.stderr
    assert "no model 'lung' version 2" in bad.stdout + bad.stderr
    done = run("run", str(INFERENCE), "--input", str(study.parent), "--output", "out",
               "--param", "model=models:/lung/1")  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert list((tmp_path / "out").rglob("*.dcm")), "no SEG written"
