"""A 3 MB Deflated Explicit VR Little Endian instance that inflates to 3 GiB must not take the
host's memory (issue 9): headers are read by a bounded inflate, the decoded size is checked
from Rows x Columns x frames x bits before anything is decoded, and a dataset is inflated no
further than its header's pixels allow.

Every read runs in a child process under RLIMIT_AS = 1 GiB, so that a regression fails (a
MemoryError, a wrong message) instead of eating the machine running the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from hostile_dicom import MIB, deflated_bomb, limit_address_space

from operators.dicom import phantom

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]
ADDRESS_SPACE = 1 << 30  # the child's RLIMIT_AS


CHILD = """
import json, sys
from pathlib import Path
from dataflow.stage import StageContext
from operators.dicom import SeriesToVolume, load_series, split_series
case, study = sys.argv[1], Path(sys.argv[2])
try:
    if case == "split":
        result = {k: [p.name for p in v] for k, v in split_series(study).items()}
    elif case == "stage":
        ctx = StageContext(stage="load", memory_limit=512 << 20)
        SeriesToVolume(modality="CT").execute(ctx, study=study)
        result = "read"
    else:
        load_series(study)
        result = "read"
    print(json.dumps({"result": result}))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
"""


def read_in_child(case: str, study: Path) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, case, str(study)],
        cwd=ROOT, env=env, preexec_fn=limit_address_space(ADDRESS_SPACE),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    series = phantom.write_ct_series(tmp_path_factory.mktemp("template"), slices=1, size=8)
    return series.files[0]


def test_a_bomb_whose_header_claims_3_gib_is_refused_before_decoding(tmp_path, template):
    (tmp_path / "study").mkdir()
    bomb = deflated_bomb(
        tmp_path / "study" / "bomb.dcm", template, rows=40000, columns=40000,
        pixel_bytes=40000 * 40000 * 2,
    )  # fmt: skip
    assert bomb.stat().st_size < 4 * MIB
    (uid,) = read_in_child("split", tmp_path / "study")["result"]  # the header: bounded
    assert uid == str(pydicom.dcmread(template).SeriesInstanceUID)
    outcome = read_in_child("stage", tmp_path / "study")
    assert outcome["error"] == "MemoryLimitError", outcome
    assert outcome["message"] == (
        "instance bomb.dcm would decode to 3.0 GiB, more than the 512.0 MiB this stage may use"
    )


def test_a_bomb_whose_header_claims_little_is_inflated_no_further(tmp_path, template):
    """Rows x Columns 64 x 64 (8 KiB of pixels), 3 GiB of pixel data: the inflate stops at
    the header's size plus the header allowance, with no memory limit set at all."""
    (tmp_path / "study").mkdir()
    deflated_bomb(
        tmp_path / "study" / "bomb.dcm", template, rows=64, columns=64, pixel_bytes=3 << 30
    )
    outcome = read_in_child("load", tmp_path / "study")
    assert outcome["error"] == "ReadError", outcome
    assert outcome["message"] == (
        "bomb.dcm inflates to more than 32.0 MiB though its header describes 8.0 KiB of "
        "pixels; refused"
    )
