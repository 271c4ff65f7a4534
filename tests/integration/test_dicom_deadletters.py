"""A result dead-lettered after its deadline is visible and can be re-sent (issue 9, item 6):
the DICOM connector reports each destination's state to the service (``export_progress``), its
admin lists dead letters and re-sends one from another process (``dataflow exports``), and its
health says so (metrics, a destination down)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from deadlines import HANG, wait_until
from dicom_peers import free_port
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from connectors.dicom.service import DicomConnector
from operators.dicom.phantom import write_ct_series
from operators.register import register_files

pytestmark = pytest.mark.integration

ADMIN = """
import json, sys
from pathlib import Path
from connectors.dicom.service import DicomConnector
from dataflow.errors import DataflowError
section, state, config, action, arg = sys.argv[1:]
admin = DicomConnector.admin(json.loads(Path(section).read_text()), Path(state), Path(config))
try:
    out = admin.exports(state=arg) if action == "exports" else admin.resend(arg)
except DataflowError as exc:
    print(exc, file=sys.stderr)
    sys.exit(1)
print(json.dumps(out))
"""


class Host:
    """What the service gives a connector (dataflow.service.ServiceHost), recording the
    export progress it hears; the whole service runs in test_service_exports.py."""

    def __init__(self, state_dir: Path, config_path: Path) -> None:
        self.pipelines, self.state_dir, self.config_path = ("p",), state_dir, config_path
        self.progress: list[tuple[str, str, str, str]] = []
        self._lock = threading.Lock()

    def submit(self, *args, **kwargs):
        raise AssertionError("no study is sent in these tests")

    def export_progress(self, task_id: str, destination: str, state: str, detail: str = ""):
        with self._lock:
            self.progress.append((task_id, destination, state, detail))

    def states(self, task_id: str) -> list[str]:
        with self._lock:
            return [state for task, _, state, _ in self.progress if task == task_id]


class Peer:
    """A pynetdicom storage SCP on 127.0.0.1:``port`` counting the instances it receives."""

    def __init__(self, port: int) -> None:
        self.received: Counter = Counter()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        handlers = [(evt.EVT_C_STORE, self._store)]
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)

    def _store(self, event) -> int:
        self.received[event.request.AffectedSOPInstanceUID] += 1
        return 0x0000


def section(port: int, **export) -> dict:
    return {
        "receivers": [{"name": "plain", "host": "127.0.0.1", "port": 0}],
        "ae-titles": {"DATAFLOW": {"pipelines": ["p"]}},
        "destinations": {"PACS": {"ae": "PACS", "host": "127.0.0.1", "port": port}},
        "export": {"retry-initial": 0.05, "retry-max": 0.05, **export},
    }


def connector_for(tmp_path, config: dict) -> tuple[DicomConnector, Host]:
    (tmp_path / "section.json").write_text(json.dumps(config))
    host = Host(tmp_path / "state" / "dicom", tmp_path / "service.yaml")
    host.state_dir.mkdir(parents=True)
    return DicomConnector(config, host), host


def registered(tmp_path, slices: int = 3):
    series = write_ct_series(tmp_path / "seg", slices=slices, size=16, seed=5)
    task_dir = tmp_path / "job" / "register" / "task"
    record = register_files(
        tmp_path / "seg", task_dir, agent="ClaraSCU", destinations=["PACS"], job_id="job-1"
    )
    return series, task_dir, f"{record['taskId']}-PACS"


def admin(tmp_path, action: str, arg: str) -> subprocess.CompletedProcess:
    """``DicomConnector.admin(...)`` in another process, as ``dataflow exports`` calls it."""
    args = [tmp_path / "section.json", tmp_path / "state" / "dicom", tmp_path / "service.yaml"]
    return subprocess.run(
        [sys.executable, "-c", ADMIN, *map(str, args), action, arg],
        capture_output=True, text=True, timeout=HANG, check=False,
    )  # fmt: skip


def test_a_dead_letter_is_listed_and_resent_from_another_process(tmp_path):
    port = free_port()  # the PACS is down: nobody listens there yet
    connector, host = connector_for(tmp_path, section(port, deadline=1))
    series, task_dir, task_id = registered(tmp_path)
    connector.start()
    peer = None
    try:
        connector.export(task_dir, {}, SimpleNamespace(id="job-1"))
        wait_until(lambda: host.states(task_id)[-1:] == ["dead"], "the dead letter")
        assert "deadline passed" in host.progress[-1][3]
        listed = admin(tmp_path, "exports", "dead")
        assert listed.returncode == 0, listed.stderr
        (dead,) = json.loads(listed.stdout)
        assert (dead["task_id"], dead["job_id"], dead["destination"]) == (task_id, "job-1", "PACS")
        assert dead["instances"] == 3 and "deadline passed" in dead["last_error"]
        metrics = {(m["name"], m["labels"].get("state")): m["value"]
                   for m in connector.health()["metrics"]}  # fmt: skip
        assert metrics["dataflow_dicom_outbox_tasks", "dead"] == 1
        refused = admin(tmp_path, "resend", "no-such-task")
        assert refused.returncode == 1 and "no export task 'no-such-task'" in refused.stderr
        peer = Peer(port)  # the PACS is back
        resent = admin(tmp_path, "resend", task_id)
        assert resent.returncode == 0, resent.stderr
        assert "asked of the running service" in resent.stdout
        wait_until(lambda: host.states(task_id)[-1:] == ["sent"], "the re-sent result")
        assert host.states(task_id) == ["pending", "dead", "pending", "sent"]
        assert peer.received == Counter(series.sop_instance_uids)  # each instance once
        again = admin(tmp_path, "resend", task_id)
        assert again.returncode == 1 and "is sent: only a dead letter" in again.stderr
        assert json.loads(admin(tmp_path, "exports", "dead").stdout) == []
    finally:
        connector.stop()
        if peer is not None:
            peer.server.shutdown()


def test_a_destination_that_keeps_failing_is_down_in_health_until_it_is_back(tmp_path):
    port = free_port()
    connector, host = connector_for(tmp_path, section(port, **{"max-attempts": 3}))
    _, task_dir, task_id = registered(tmp_path, slices=1)
    connector.start()
    peer = None
    try:
        connector.export(task_dir, {}, SimpleNamespace(id="job-1"))
        wait_until(lambda: host.states(task_id)[-1:] == ["dead"], "the dead letter")
        health = connector.health()
        (problem,) = health["problems"]
        assert problem.startswith("destination PACS is down: 3 failed attempts in a row since")
        up = {m["name"]: m["value"] for m in health["metrics"] if m["name"].endswith("_up")}
        assert up == {"dataflow_dicom_destination_up": 0.0}
        peer = Peer(port)
        connector.outbox.requeue(task_id)  # the owner itself acts at once
        wait_until(lambda: connector.outbox.get(task_id).state == "succeeded", "the delivery")
        assert connector.health()["problems"] == []
    finally:
        connector.stop()
        if peer is not None:
            peer.server.shutdown()
