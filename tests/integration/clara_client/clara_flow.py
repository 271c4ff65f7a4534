"""A script written for Clara Deploy's Python client (nvidia-clara-client 0.8.1.7), run
unchanged against dataflow serve by tests/integration/test_clara_grpc.py in the client's own
venv: create a pipeline, create a job, upload its input, start it, poll its status until it
stops, list its payload and download every operator output. Prints one JSON line."""

import json
import sys
import time
from pathlib import Path

import nvidia_clara.job_types as job_types
import nvidia_clara.pipeline_types as pipeline_types
from nvidia_clara.jobs_client import JobsClient
from nvidia_clara.payloads_client import PayloadsClient
from nvidia_clara.pipelines_client import PipelinesClient

target, port, pipeline_file, input_file, out = sys.argv[1:6]
pipelines = PipelinesClient(target=target, port=port)
jobs = JobsClient(target=target, port=port)
payloads = PayloadsClient(target=target, port=port)

text = Path(pipeline_file).read_text()
definition = pipeline_types.PipelineDefinition(name=Path(pipeline_file).name, content=text)
pipeline_id = pipelines.create_pipeline(definition=[definition])
names = [p.name for p in pipelines.list_pipelines()]

job = jobs.create_job(job_name="from-claras-client", pipeline_id=pipeline_id)
with open(input_file, "rb") as handle:
    payloads.upload(payload_id=job.payload_id, blob_name="volume.npy", file_object=handle)
jobs.start_job(job_id=job.job_id)
deadline = time.monotonic() + float(sys.argv[6])
while True:
    status = jobs.get_status(job_id=job.job_id)
    if job_types.JobState(status.job_state) == job_types.JobState.Stopped:  # an int, here
        break
    if time.monotonic() > deadline:
        sys.exit("the job did not stop")
    time.sleep(0.2)

files = [f.name for f in payloads.get_details(payload_id=job.payload_id).file_details]
downloaded = {}
for name in files:
    if name.startswith("/operators/"):
        target_file = Path(out) / name.lstrip("/")
        target_file.parent.mkdir(parents=True, exist_ok=True)
        with open(target_file, "wb") as handle:
            payloads.download_from(payload_id=job.payload_id, blob_name=name, dest_obj=handle)
        downloaded[name] = target_file.stat().st_size
logs = jobs.job_logs(job_id=job.job_id, operator_name="npy-to-array")
print(
    json.dumps(
        {
            "pipeline_id": pipeline_id.value,
            "pipelines": names,
            "job_id": job.job_id.value,
            "payload_id": job.payload_id.value,
            "state": job_types.JobState(status.job_state).name,
            "status": job_types.JobStatus(status.job_status).name,
            "files": files,
            "downloaded": downloaded,
            "logs": logs,
            "created": str(status.date_created),
        }
    )
)
