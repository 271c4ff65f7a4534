"""Where the CLI client looks for the service: --api, DATAFLOW_API, the client file
($XDG_CONFIG_HOME/dataflow/client.yaml), the default; a malformed client file is named."""

from __future__ import annotations

import pytest

from dataflow.platform.client import ApiClient, ApiError, configured_api


def _base(api: str | None = None) -> str:
    client = ApiClient(api)
    client.close()
    return client.base


def test_the_target_comes_from_the_option_the_environment_the_file_or_the_default(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("DATAFLOW_API", raising=False)
    assert _base() == "http://127.0.0.1:8080"
    (tmp_path / "dataflow").mkdir()
    (tmp_path / "dataflow" / "client.yaml").write_text("api: http://10.0.0.5:8080/\n")
    assert _base() == "http://10.0.0.5:8080"
    monkeypatch.setenv("DATAFLOW_API", "http://127.0.0.1:7")
    assert _base() == "http://127.0.0.1:7"
    assert _base("http://127.0.0.1:5") == "http://127.0.0.1:5"


def test_a_malformed_client_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "dataflow").mkdir()
    (tmp_path / "dataflow" / "client.yaml").write_text("api: [1, 2]\n")
    with pytest.raises(ApiError, match=r"client.yaml: expected a mapping with api: URL"):
        configured_api()
