"""The service file's ``executor:`` key: where the pipelines run (local or a Ray cluster),
and a clear error naming the file and the key for what is wrong."""

from __future__ import annotations

import pytest

from dataflow.errors import ConfigError
from dataflow.service.config import ExecutorConfig, load_config


def config(tmp_path, executor: str | None):
    (tmp_path / "p.yaml").write_text("")  # the file is only checked to exist here
    path = tmp_path / "service.yaml"
    text = f"state: {tmp_path / 'state'}\npipelines: {{p: p.yaml}}\n"
    path.write_text(text + (f"executor: {executor}\n" if executor is not None else ""))
    return path


@pytest.mark.parametrize(
    ("executor", "expected"),
    [(None, ExecutorConfig()), ("{kind: local}", ExecutorConfig()),
     ("{kind: ray}", ExecutorConfig("ray")),
     ("{kind: ray, address: '10.0.0.5:6379'}", ExecutorConfig("ray", "10.0.0.5:6379")),
     ("{kind: ray, address: auto}", ExecutorConfig("ray", "auto")),
     ("{kind: ray, address: 'ray://head:10001'}", ExecutorConfig("ray", "ray://head:10001")),
     ("{kind: ray, placement: strict-spread}", ExecutorConfig("ray", None, "strict-spread"))],
)  # fmt: skip
def test_the_executor_key(tmp_path, executor, expected):
    assert load_config(config(tmp_path, executor)).executor == expected


@pytest.mark.parametrize(
    ("executor", "message"),
    [("{kind: rey}", "executor.kind: 'rey': expected local (worker processes on this machine) "
                     "or ray (a Ray cluster: docs/ray.md)"),
     ("{kind: ray, address: 'head'}", "executor.address: 'head': expected auto, HOST:PORT (the "
                                      "head's GCS port) or ray://HOST:PORT (Ray Client)"),
     ("{kind: ray, address: 'http://head:6379'}", "executor.address: 'http://head:6379': "),
     ("{address: '127.0.0.1:6379'}", "executor.address: the Ray cluster's address: give it "
                                     "with kind: ray"),
     ("{kind: ray, adress: x}", "executor: unknown key 'adress'"),
     ("{kind: ray, placement: spred}", "executor.placement: 'spred': expected pack, spread, "
                                       "strict-pack, strict-spread (a Ray placement group's "
                                       "strategy); did you mean 'spread'?"),
     ("{placement: pack}", "executor.placement: the Ray cluster's placement: give it with "
                           "kind: ray"),
     ("ray", "executor: must be a mapping (kind: local or ray; address)")],
)  # fmt: skip
def test_a_wrong_executor_key_names_the_file_and_the_key(tmp_path, executor, message):
    path = config(tmp_path, executor)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert str(refused.value).startswith(f"{path}: {message}"), str(refused.value)


def test_set_overrides_the_executor(tmp_path):
    path = config(tmp_path, None)
    loaded = load_config(path, ["executor.kind=ray", "executor.address=127.0.0.1:6379"])
    assert loaded.executor == ExecutorConfig("ray", "127.0.0.1:6379")
