"""Numba's on-disk cache: where it goes, that a second process loads from it, and that nothing
writable means no cache rather than a crash.

Root ignores permission bits, so "not writable" is made by pointing a directory below a plain file
(mkdir fails for every user)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from dataflow.execution.jitcache import configure_numba_cache, select_cache_dir

REPO = Path(__file__).resolve().parents[2]


def _blocked(tmp_path: Path) -> Path:
    plain = tmp_path / "a-file"
    plain.write_text("not a directory")
    return plain / "cache"


def test_per_user_dir_when_nothing_is_set(tmp_path):
    home = tmp_path / "home"
    assert select_cache_dir({"HOME": str(home)}) == home / ".cache" / "dataflow" / "numba"
    xdg = tmp_path / "xdg"
    assert select_cache_dir({"HOME": str(home), "XDG_CACHE_HOME": str(xdg)}) == (
        xdg / "dataflow" / "numba"
    )
    assert (xdg / "dataflow" / "numba").is_dir()


def test_user_setting_wins_and_off_switch(tmp_path):
    mine = tmp_path / "mine"
    assert select_cache_dir({"NUMBA_CACHE_DIR": str(mine), "HOME": str(tmp_path)}) == mine
    assert select_cache_dir({"DATAFLOW_NUMBA_CACHE": "0", "HOME": str(tmp_path)}) is None


def test_unwritable_home_falls_back_to_temp_then_to_no_cache(tmp_path, monkeypatch):
    blocked = _blocked(tmp_path)
    chosen = select_cache_dir({"XDG_CACHE_HOME": str(blocked)})
    assert chosen is not None and chosen.parent == Path(tempfile.gettempdir())
    monkeypatch.setattr(tempfile, "tempdir", str(blocked))
    assert select_cache_dir({"XDG_CACHE_HOME": str(blocked)}) is None
    environ = {"NUMBA_CACHE_DIR": str(blocked)}
    assert configure_numba_cache(environ) is False
    assert "NUMBA_CACHE_DIR" not in environ  # numba would fail at decoration on that path


_PROBE = """
import json
from operators.kernels import cpu, warmup
warmup("threshold")
print(json.dumps({"cache": cpu.CACHE,
                  "hits": sum(cpu.threshold.stats.cache_hits.values()),
                  "misses": sum(cpu.threshold.stats.cache_misses.values())}))
"""


def _probe(environ: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(environ)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_kernel_from_the_cache(tmp_path):
    environ = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    first = _probe(environ)
    assert first["cache"] is True and first["misses"] >= 1 and first["hits"] == 0
    assert any((tmp_path / "xdg" / "dataflow" / "numba").rglob("*.nbi"))
    second = _probe(environ)
    assert second["hits"] >= 1 and second["misses"] == 0


def test_nothing_writable_runs_without_cache(tmp_path):
    blocked = str(_blocked(tmp_path))
    out = _probe({"NUMBA_CACHE_DIR": blocked, "XDG_CACHE_HOME": blocked, "TMPDIR": blocked})
    assert out["cache"] is False and out["hits"] == 0


_PROBE_ALL = """
import json, warnings
from numba.core.errors import NumbaWarning
warnings.simplefilter("error", NumbaWarning)  # "Cannot cache compiled function ..." fails here
from numba.core.registry import CPUDispatcher
from operators.kernels import cpu, warmup
warmup()
kernels = {n: f for n, f in vars(cpu).items() if isinstance(f, CPUDispatcher)}
print(json.dumps({"misses": {n: sum(f.stats.cache_misses.values()) for n, f in kernels.items()},
                  "hits": {n: sum(f.stats.cache_hits.values()) for n, f in kernels.items()}}))
"""


def test_every_cpu_kernel_warmup_compiles_is_cached(tmp_path):
    """A kernel Numba cannot cache (e.g. one calling numba.get_num_threads() inside) is
    recompiled by every worker process and warns on every compile; CI caught one that way."""
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME",)}
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "cache")

    def probe() -> dict:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE_ALL],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = probe()
    compiled = sorted(n for n, m in first["misses"].items() if m)
    assert "_union_slabs" in compiled and "threshold" in compiled
    second = probe()
    assert {n: second["misses"][n] for n in compiled} == dict.fromkeys(compiled, 0)
    # a helper that only other kernels call (cpu._union_plane) is loaded within its callers'
    # cache entries: it is not recompiled (no miss above) but has no hit of its own
    assert all(second["hits"][n] >= 1 for n in compiled if n != "_union_plane")
