"""kill -9 of `dataflow serve` in the middle of a storescu transfer: after a restart, every
instance storescu saw acknowledged is in the spool and is processed by a job."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli import serve
from deadlines import HANG, LONG_HANG
from dicom_peers import DCMTK_ENV, dcmtk, free_port, wait_for_port

from operators.dicom.phantom import write_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
DATA = Path(__file__).parent / "service_data"


def processed(state: Path) -> set[str]:
    uids: set[str] = set()
    for path in state.glob("jobs/*/inventory/inventory/uids.json"):
        uids.update(json.loads(path.read_text()))
    return uids


def test_kill_9_mid_transfer_loses_no_acknowledged_instance(tmp_path):
    port = free_port()
    series = write_ct_series(tmp_path / "ct", slices=150, size=64, seed=31)
    config = tmp_path / "service.yaml"
    config.write_text(f"""
state: {tmp_path / "state"}
pipelines:
  inventory: {DATA / "inventory.yaml"}
dicom:
  receivers: [{{name: plain, host: 127.0.0.1, port: {port}}}]
  ae-titles:
    INVENTORY: {{pipelines: [inventory], group-by: series, timeout: 1}}
  allow-unknown-peers: true
""")
    log = tmp_path / "serve.log"
    proc = serve(config, log)
    try:
        wait_for_port(port, proc=proc, timeout=LONG_HANG)
        args = [dcmtk("storescu"), "-v", "-aet", "SCANNER", "-aec", "INVENTORY",
                "127.0.0.1", str(port)]  # fmt: skip
        scu = subprocess.Popen([*args, *map(str, series.files)], env=DCMTK_ENV, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
        sending: dict[str, str] = {
            str(f): uid for f, uid in zip(series.files, series.sop_instance_uids)
        }
        acked, current = [], None
        for line in scu.stdout:
            if line.startswith("I: Sending file: "):
                current = line.split(": ", 2)[2].strip()
            elif "Received Store Response (Success)" in line:
                acked.append(sending[current])
                if len(acked) == 50:
                    proc.send_signal(signal.SIGKILL)
        scu.wait(timeout=HANG)
        scu.stdout.close()
        assert proc.wait(timeout=HANG) == -signal.SIGKILL
        assert 50 <= len(acked) < len(series.files), "the service died in the middle"
        proc = serve(config, log)  # the restart
        deadline = time.monotonic() + LONG_HANG
        while not set(acked) <= processed(tmp_path / "state"):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "acknowledged instances never processed"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=HANG)
    spooled = {p.name for p in (tmp_path / "state" / "dicom" / "spool").rglob("*.dcm")}
    assert len(spooled) >= len(acked)
