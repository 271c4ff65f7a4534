"""Runs docs/stages.md, the stage author's guide, as a user would follow it.

Fenced blocks run in order in an empty folder: ```python file=NAME and ```yaml file=NAME are
written to NAME; other ```python blocks are executed (with the folder as the working directory
and on sys.path); each `$ command` line of a ```console block runs and must succeed.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

GUIDE = Path(__file__).parents[2] / "docs" / "stages.md"
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks():
    return [(m[1], m[2].strip(), m[3]) for m in BLOCK.finditer(GUIDE.read_text())]


def test_the_guide_has_every_kind_of_block():
    kinds = {(lang, bool(info)) for lang, info, _ in blocks()}
    assert {("python", True), ("python", False), ("yaml", True), ("console", False)} <= kinds


def test_the_stage_authors_guide_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = {**os.environ, "DATAFLOW_CONTAINER_ENGINE": "none", "DATAFLOW_GPUS": "none"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for number, (lang, info, text) in enumerate(blocks(), 1):
        where = f"docs/stages.md block {number} ({lang} {info})".strip()
        if info.startswith("file="):
            Path(info.removeprefix("file=")).write_text(text)
        elif lang == "python":
            exec(compile(text, where, "exec"), {"__name__": f"guide_block_{number}"})
        elif lang == "console":
            for line in text.splitlines():
                if not line.startswith("$ "):
                    continue
                done = subprocess.run(
                    shlex.split(line[2:]), capture_output=True, text=True, env=env, timeout=300
                )
                assert done.returncode == 0, f"{where}: {line}\n{done.stdout}\n{done.stderr}"
