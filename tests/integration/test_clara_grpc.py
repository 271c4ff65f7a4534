"""Clara's gRPC API against the real service, with a client generated from our own .proto
files (the same wire as Clara's client): a pipeline created from a streamed definition, a job
created, its files uploaded, started, followed to STOPPED/HEALTHY, its outputs listed and
downloaded, its logs read; a job cancelled; models; and every bad id or call answered with
Clara's negative code, never a crash."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from dataflow.platform.clara.gen.nvidia.clara.platform import (
    clara_pb2,
    clara_pb2_grpc,
    common_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    models_pb2,
    models_pb2_grpc,
    payloads_pb2,
    payloads_pb2_grpc,
    pipelines_pb2,
    pipelines_pb2_grpc,
)
from dataflow.platform.clara.gen.nvidia.clara.platform.node_monitor import (
    metrics_pb2,
    metrics_pb2_grpc,
)
from tests.deadlines import LONG_HANG
from tests.integration.platform_service import HANG, api_client, platform_service

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
PASSTHROUGH = ROOT / "pipelines" / "passthrough.yaml"
VOLUME = ROOT / "pipelines" / "samples" / "volumes" / "study-a" / "volume.npy"
HEAD = common_pb2.RequestHeader(
    api_version=common_pb2.Version(major=0, minor=6), user_agent="Nvidia.Clara.Platform"
)
EPOCH_0001 = 62135596800


def ident(value: str) -> common_pb2.Identifier:
    return common_pb2.Identifier(value=value)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with platform_service(
        tmp_path_factory.mktemp("clara"), {"passthrough": PASSTHROUGH}, grpc=True
    ) as service:
        yield service


@pytest.fixture(scope="module")
def stubs(service):
    channel = grpc.insecure_channel(service.platform.urls["grpc"])
    grpc.channel_ready_future(channel).result(timeout=HANG)
    yield {
        "clara": clara_pb2_grpc.ClaraStub(channel),
        "pipelines": pipelines_pb2_grpc.PipelinesStub(channel),
        "jobs": jobs_pb2_grpc.JobsStub(channel),
        "payloads": payloads_pb2_grpc.PayloadsStub(channel),
        "models": models_pb2_grpc.ModelsStub(channel),
        "monitor": metrics_pb2_grpc.MonitorStub(channel),
    }
    channel.close()


def definition_chunks(text: str, pieces: int = 3):
    size = len(text) // pieces + 1
    for start in range(0, len(text), size):
        yield pipelines_pb2.PipelinesCreateRequest(
            header=HEAD,
            definition=pipelines_pb2.PipelineDefinitionFile(
                path="copy.yaml", content=text[start : start + size]
            ),
        )


def upload(stubs, payload_id: str, name: str, data: bytes):
    def requests():
        details = payloads_pb2.PayloadFileDetails(name=name, mode=0o644)
        for start in range(0, len(data), 64 * 1024):
            yield payloads_pb2.PayloadsUploadRequest(
                header=HEAD,
                payload_id=ident(payload_id),
                details=details,
                data=data[start : start + 64 * 1024],
            )

    return stubs["payloads"].Upload(requests())


def wait_stopped(stubs, job_id: str) -> jobs_pb2.JobsStatusResponse:
    deadline = time.monotonic() + HANG
    while True:
        status = stubs["jobs"].Status(jobs_pb2.JobsStatusRequest(header=HEAD, job_id=ident(job_id)))
        assert status.header.code == 0, status.header.messages
        if status.state == jobs_pb2.JOB_STATE_STOPPED:
            return status
        assert time.monotonic() < deadline, "the job did not stop"
        time.sleep(0.1)


def test_the_clara_flow_from_pipeline_to_download(service, stubs):
    version = stubs["clara"].Version(clara_pb2.ClaraVersionRequest(header=HEAD))
    assert version.header.code == 0 and version.version.label == "dataflow"

    text = PASSTHROUGH.read_text().replace("name: passthrough", "name: copy", 1)
    created = stubs["pipelines"].Create(definition_chunks(text))
    assert created.header.code == 0, created.header.messages
    pipeline_id = created.pipeline_id.value
    assert len(pipeline_id) == 32
    again = stubs["pipelines"].Create(definition_chunks(text))  # a script run twice
    assert again.header.code == 0 and again.pipeline_id.value == pipeline_id
    listed = {
        r.details.name: r.details.pipeline_id.value
        for r in stubs["pipelines"].List(pipelines_pb2.PipelinesListRequest(header=HEAD))
    }
    assert listed["copy"] == pipeline_id and "passthrough" in listed
    (details,) = stubs["pipelines"].Details(
        pipelines_pb2.PipelinesDetailsRequest(header=HEAD, pipeline_id=ident(pipeline_id))
    )
    assert details.header.code == 0 and details.definition.content == text
    assert [node.name for node in details.dag] == ["npy-to-array"]  # the root
    assert details.dag[0].next[0].name == "array-to-npz"

    job = stubs["jobs"].Create(
        jobs_pb2.JobsCreateRequest(
            header=HEAD,
            pipeline_id=ident(pipeline_id),
            name="clara-job",
            priority=jobs_pb2.JOB_PRIORITY_HIGHER,
            metadata={"ris": "order-1"},
        )
    )
    assert job.header.code == 0, job.header.messages
    job_id, payload_id = job.job_id.value, job.payload_id.value
    data = VOLUME.read_bytes()
    sent = upload(stubs, payload_id, "/volume.npy", data)
    assert sent.header.code == 0 and sent.details.size == len(data), sent.header.messages
    assert sent.details.name == "/input/volume.npy"

    started = stubs["jobs"].Start(jobs_pb2.JobsStartRequest(header=HEAD, job_id=ident(job_id)))
    assert started.header.code == 0 and started.priority == jobs_pb2.JOB_PRIORITY_HIGHER
    twice = stubs["jobs"].Start(jobs_pb2.JobsStartRequest(header=HEAD, job_id=ident(job_id)))
    assert twice.header.code == -0x2101 and "started once" in twice.header.messages[0]
    status = wait_stopped(stubs, job_id)
    assert status.status == jobs_pb2.JOB_STATUS_HEALTHY, status.messages
    assert status.name == "clara-job" and status.metadata["ris"] == "order-1"
    assert status.pipeline_id.value == pipeline_id and status.payload_id.value == payload_id
    assert {op.status for op in status.operator_details} == {jobs_pb2.JOB_OPERATOR_STATUS_COMPLETED}
    assert status.created.value - EPOCH_0001 <= status.stopped.value - EPOCH_0001 <= time.time()
    assert status.timestamp_stopped.endswith("Z")

    files = [
        r.file.name
        for r in stubs["payloads"].Details(
            payloads_pb2.PayloadsDetailsRequest(header=HEAD, payload_id=ident(payload_id))
        )
    ]
    assert "/input/volume.npy" in files
    outputs = [name for name in files if name.startswith("/operators/")]
    assert outputs, files
    got = b"".join(
        r.data
        for r in stubs["payloads"].Download(
            payloads_pb2.PayloadsDownloadRequest(
                header=HEAD, payload_id=ident(payload_id), name=outputs[0]
            )
        )
    )
    with api_client(service) as client:
        assert got == client.get(f"/api/v1/jobs/{job_id}/files{outputs[0]}").content

    logs = [
        line
        for r in stubs["jobs"].ReadLogs(
            jobs_pb2.JobsReadLogsRequest(header=HEAD, job_id=ident(job_id))
        )
        for line in r.logs
    ]
    assert any("created (copy)" in line for line in logs), logs
    stopped = [
        r.job_details.job_id.value
        for r in stubs["jobs"].List(
            jobs_pb2.JobsListRequest(
                header=HEAD,
                filter=jobs_pb2.JobsListRequest.JobFilter(
                    has_state=[jobs_pb2.JOB_STATE_STOPPED], pipeline_id=[ident(pipeline_id)]
                ),
            )
        )
    ]
    assert stopped == [job_id]
    faulted = list(
        stubs["jobs"].List(
            jobs_pb2.JobsListRequest(
                header=HEAD,
                filter=jobs_pb2.JobsListRequest.JobFilter(has_status=[jobs_pb2.JOB_STATUS_FAULTED]),
            )
        )
    )
    assert faulted == []

    other = stubs["jobs"].Create(
        jobs_pb2.JobsCreateRequest(header=HEAD, pipeline_id=ident(pipeline_id))
    )
    cancelled = stubs["jobs"].Cancel(
        jobs_pb2.JobsCancelRequest(header=HEAD, job_id=other.job_id, reason="wrong patient")
    )
    assert cancelled.header.code == 0
    assert (cancelled.job_state, cancelled.job_status) == (
        jobs_pb2.JOB_STATE_STOPPED,
        jobs_pb2.JOB_STATUS_CANCELED,
    )
    meta = stubs["jobs"].AddMetadata(
        jobs_pb2.JobsAddMetadataRequest(header=HEAD, job_id=ident(job_id), metadata={"seen": "yes"})
    )
    assert dict(meta.metadata) == {"ris": "order-1", "seen": "yes"}
    meta = stubs["jobs"].RemoveMetadata(
        jobs_pb2.JobsRemoveMetadataRequest(header=HEAD, job_id=ident(job_id), keys=["ris"])
    )
    assert dict(meta.metadata) == {"seen": "yes"}
    removed = stubs["pipelines"].Remove(
        pipelines_pb2.PipelinesRemoveRequest(header=HEAD, pipeline_id=ident(pipeline_id))
    )
    assert removed.header.code == 0, removed.header.messages


def test_bad_ids_and_calls_get_claras_codes_not_crashes(stubs):
    jobs, payloads, pipelines = stubs["jobs"], stubs["payloads"], stubs["pipelines"]
    for value, code in (("nope", -0x2000), ("0" * 32, -0x2001), ("", -0x2002)):
        status = jobs.Status(jobs_pb2.JobsStatusRequest(header=HEAD, job_id=ident(value)))
        assert status.header.code == code, (value, status.header)
        assert status.header.messages and status.header.messages[0]
    (missing,) = payloads.Download(
        payloads_pb2.PayloadsDownloadRequest(
            header=HEAD, payload_id=ident("f" * 32), name="/input/x"
        )
    )
    assert missing.header.code == -0x3001 and "f" * 32 in missing.header.messages[0]
    (unknown,) = pipelines.Details(
        pipelines_pb2.PipelinesDetailsRequest(header=HEAD, pipeline_id=ident("e" * 32))
    )
    assert unknown.header.code < 0
    broken = PASSTHROUGH.read_text().replace("from: npy-to-array\n", "from: npy-to-arary\n", 1)
    refused = pipelines.Create(definition_chunks(broken.replace("name: passthrough", "name: b")))
    assert refused.header.code == -0x1101 and "npy-to-arary" in refused.header.messages[0]
    assert "pipeline.yaml:" in refused.header.messages[0]  # with its line
    empty = pipelines.Create(iter([pipelines_pb2.PipelinesCreateRequest(header=HEAD)]))
    assert empty.header.code == -0x1100
    outside = upload(
        stubs,
        payloads.Create(payloads_pb2.PayloadsCreateRequest(header=HEAD)).payload_id.value,
        "../escape.npy",
        b"x",
    )
    assert outside.header.code == -0x3004 and "'..'" in outside.header.messages[0]
    stop = stubs["clara"].Stop(clara_pb2.ClaraStopRequest(header=HEAD))
    assert stop.header.code < 0 and "service manager" in stop.header.messages[0]
    (use,) = stubs["clara"].Utilization(clara_pb2.ClaraUtilizationRequest(header=HEAD))
    assert use.header.code == 0 and list(use.gpu_metrics) == []  # no GPU here
    (gpus,) = stubs["monitor"].GpuMetrics(metrics_pb2.MonitorGpuMetricsRequest(header=HEAD))
    assert gpus.header.code == 0 and list(gpus.gpu_details) == []


def test_models_over_claras_model_service(stubs, tmp_path):
    models = stubs["models"]
    data = b"not really onnx, but a file all the same" * 100

    def chunks():
        details = models_pb2.ModelDetails(name="spleen", metadata={"owner": "radiology"})
        yield models_pb2.ModelsUploadModelRequest(header=HEAD, details=details, data=data[:1000])
        yield models_pb2.ModelsUploadModelRequest(header=HEAD, details=details, data=data[1000:])

    up = models.UploadModel(chunks())
    assert up.header.code == 0, up.header.messages
    model_id = up.details.model_id.value
    assert up.details.metadata["version"] == "1" and up.details.metadata["owner"] == "radiology"
    (listed,) = models.ListModels(models_pb2.ModelsListModelsRequest(header=HEAD))
    assert [m.model_id.value for m in listed.models] == [model_id]
    got = b"".join(
        r.data
        for r in models.DownloadModel(
            models_pb2.ModelsDownloadModelRequest(header=HEAD, model_id=ident(model_id))
        )
    )
    assert got == data
    (catalogs,) = models.ListCatalogs(models_pb2.ModelsListCatalogsRequest(header=HEAD))
    assert catalogs.header.code == -0x5100 and "models:/NAME/VERSION" in catalogs.header.messages[0]
    gone = models.DeleteModel(
        models_pb2.ModelsDeleteModelRequest(header=HEAD, model_id=ident(model_id))
    )
    assert gone.header.code == 0
    again = models.DeleteModel(
        models_pb2.ModelsDeleteModelRequest(header=HEAD, model_id=ident(model_id))
    )
    assert again.header.code == -0x5001


# Clara's own client, 0.8.1.7, in a venv of its own: its 2021 generated code needs protobuf
# 3.20, and it registers the same .proto file names as ours (one process cannot hold both)
CLARA_CLIENT = ('"nvidia-clara-client==0.8.1.7"', '"protobuf<3.21"', "grpcio")
SCRIPT = Path(__file__).with_name("clara_client") / "clara_flow.py"


CLARA_VENV = ROOT / ".clara-client"


@pytest.fixture(scope="session")
def clara_python() -> Path:
    """Clara's Python client, in the venv .ci/run builds (the tests run where pip cannot
    reach the index); skipped, saying how to build it, without it."""
    python = CLARA_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(
            f"Clara's Python client is not installed in {CLARA_VENV}: python3 -m venv "
            f".clara-client && .clara-client/bin/pip install {' '.join(CLARA_CLIENT)}"
        )
    return python


def test_a_script_written_for_claras_python_client_runs_unchanged(service, clara_python, tmp_path):
    import json
    import subprocess

    host, port = service.platform.urls["grpc"].rsplit(":", 1)
    text = PASSTHROUGH.read_text().replace("name: passthrough", "name: clara-copy", 1)
    (tmp_path / "clara-copy.yaml").write_text(text)
    done = subprocess.run(
        [
            str(clara_python),
            str(SCRIPT),
            host,
            port,
            str(tmp_path / "clara-copy.yaml"),
            str(VOLUME),
            str(tmp_path / "out"),
            str(HANG),
        ],
        capture_output=True,
        text=True,
        timeout=LONG_HANG,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["state"], result["status"]) == ("Stopped", "Healthy"), result
    assert "clara-copy" in result["pipelines"] and len(result["job_id"]) == 32
    assert "/input/volume.npy" in result["files"]
    assert result["downloaded"] and all(size > 0 for size in result["downloaded"].values())
    for name, size in result["downloaded"].items():  # the same bytes as the REST API serves
        with api_client(service) as client:
            body = client.get(f"/api/v1/jobs/{result['job_id']}/files{name}").content
        assert (tmp_path / "out" / name.lstrip("/")).read_bytes() == body and len(body) == size
    assert any("created (clara-copy)" in line for line in result["logs"]), result["logs"]
