"""The pure parts of ``dataflow load``: the percentiles and the summary that the results file
ends with (computed again from its study lines), and cpload's payloads (--input, --sequence)."""

from __future__ import annotations

import pytest

from dataflow.errors import UsageError
from dataflow.load import Study, api_inputs, percentiles, summarize


def test_percentiles_interpolate_between_closest_ranks():
    got = percentiles([4.0, 1.0, 3.0, 2.0])
    assert got == {"p50": 2.5, "p90": 3.7, "p95": 3.85, "p99": 3.97, "max": 4.0,
                   "mean": 2.5, "n": 4}  # fmt: skip
    assert percentiles([7.0])["p99"] == 7.0
    assert percentiles([]) == {}


def study(index: int, sent: float, pacs: float | None, reason: str | None = None) -> dict:
    s = Study(index, "LOAD1", offered=0.0, began=sent - 0.5, sent=sent, instances=10, bytes=100)
    s.created, s.started, s.finished, s.pacs = sent + 1, sent + 1, sent + 2, pacs
    s.done, s.reason = True, reason
    return s.record()


def test_the_summary_counts_failures_by_reason_and_measures_what_succeeded():
    records = [
        study(0, 10.0, 13.0),
        study(1, 11.0, 15.0),
        study(2, 12.0, None, "export dead"),
        study(3, 13.0, None, "export dead"),
        study(4, 14.0, None, "job failed in seg"),
    ]
    summary = summarize(records)
    assert (summary["studies"], summary["done"], summary["failed"]) == (5, 2, 3)
    assert summary["failures"] == {"export dead": 2, "job failed in seg": 1}
    assert summary["instances"] == 50 and summary["bytes"] == 500
    assert summary["seconds"] == 5.5  # the first send began at 9.5, the last result at 15
    assert summary["studies_per_hour"] == pytest.approx(2 / 5.5 * 3600, abs=1e-3)
    assert summary["latency"]["latency"] == percentiles([3.0, 4.0])
    assert summary["latency"]["grouping_wait"]["max"] == 1.0
    assert summary["latency"]["export"]["p50"] == 1.5


def test_a_study_not_finished_when_the_run_stopped_is_a_failure():
    s = Study(0, "api", offered=0.0, sent=1.0)
    record = s.record()
    assert not record["ok"] and record["reason"] == "not finished"
    assert "key" not in record  # the study UID the follower searched by
    assert summarize([record])["failures"] == {"not finished": 1}


def test_cpload_payloads(tmp_path):
    assert api_inputs(None, sequence=False) == []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.dcm").write_bytes(b"x")
    (tmp_path / "b.dcm").write_bytes(b"y")
    whole = api_inputs(tmp_path, sequence=False)
    assert [name for name, _ in whole[0]] == ["a/1.dcm", "b.dcm"] and len(whole) == 1
    each = api_inputs(tmp_path, sequence=True)
    assert [[name for name, _ in files] for files in each] == [["1.dcm"], ["b.dcm"]]
    with pytest.raises(UsageError, match="--sequence needs a folder"):
        api_inputs(tmp_path / "b.dcm", sequence=True)
