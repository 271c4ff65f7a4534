"""The DICOM path with pynetdicom's fast path on and off (issue 13): ``dataflow serve`` with
``DATAFLOW_DICOM_FASTNET=0`` receives a study from dcmtk's storescu and runs its job as it
does with the fast path on; with it off the service says so (``dicom_fast_path_off`` at
WARNING with the reason, ``dataflow_dicom_receiver_fast_path 0`` in its metrics), with it on
it does not."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cli import study_sent, wait_serving
from deadlines import LONG_HANG
from dicom_peers import free_port

from operators.dicom.phantom import write_ct_series

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = Path(__file__).parent / "service_data"


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path-on", "fast-path-off"])
def test_a_study_is_received_and_run_with_the_fast_path_on_and_off(private_network, tmp_path,
                                                                    fast):  # fmt: skip
    study = write_ct_series(tmp_path / "study", slices=4, size=16, seed=9)
    port = free_port()
    config = tmp_path / "service.yaml"
    config.write_text(f"""
state: {tmp_path / "state"}
pipelines:
  hang: {DATA / "hang.yaml"}
dicom:
  receivers:
  - {{name: plain, host: 127.0.0.1, port: {port}, processes: 2}}
  ae-titles:
    HANG: {{pipelines: [hang], timeout: 1}}
  allow:
  - {{ae: STORESCU, host: 127.0.0.1}}
""")
    env = {"DATAFLOW_DICOM_FASTNET": "1" if fast else "0"}
    with study_sent(config, study.files, port, "HANG", "succeeded", env) as (proc, record):
        assert record["source"]["instances"] == len(study.files)
        metrics = tmp_path / "state" / "metrics.prom"
        figures = wait_serving(
            lambda: re.findall(r"^dataflow_dicom_receiver_fast_path\{[^}]*\} (\S+)$",
                               metrics.read_text() if metrics.exists() else "", re.M),
            LONG_HANG, "the receiver's fast-path figure in the metrics", proc,
        )  # fmt: skip
    log = tmp_path / "serve.log"
    assert {float(v) for v in figures} == {1.0 if fast else 0.0}
    said = log.read_text()
    assert ("dicom_fast_path_off" in said) is not fast
    if not fast:
        assert "DATAFLOW_DICOM_FASTNET=0" in said
