"""Where Numba keeps compiled kernels on disk, so a second run loads them instead of compiling.

Numba compiles a kernel the first time it is called in a process (seconds per kernel). With
``cache=True`` it also writes the machine code to disk and later processes load it (milliseconds).
Caching is on by default; the directory is chosen here, once per process, before any kernel is
decorated:

1. ``NUMBA_CACHE_DIR`` when the user set it (and it is writable);
2. ``$XDG_CACHE_HOME/dataflow/numba`` (``~/.cache/dataflow/numba``), so it works when the package
   folder is read-only (a system install, a container image);
3. ``<tmp>/dataflow-numba-<user>``;
4. nothing writable: no cache (every process compiles, as before), never an error.

``DATAFLOW_NUMBA_CACHE=0`` turns caching off. The chosen directory is put into ``NUMBA_CACHE_DIR``
so worker processes inherit it.
"""

from __future__ import annotations

import getpass
import os
import sys
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path

__all__ = ["cache_dir_candidates", "configure_numba_cache", "select_cache_dir"]


def cache_dir_candidates(environ: Mapping[str, str]) -> list[Path]:
    """The directories tried, in order, for ``environ``."""
    user = environ.get("NUMBA_CACHE_DIR", "")
    if user:
        return [Path(user)]
    candidates = []
    xdg = environ.get("XDG_CACHE_HOME", "")
    home = environ.get("HOME", "")
    if xdg:
        candidates.append(Path(xdg) / "dataflow" / "numba")
    elif home:
        candidates.append(Path(home) / ".cache" / "dataflow" / "numba")
    try:
        name = getpass.getuser()
    except Exception:  # no user name (a uid without a passwd entry in a container)
        name = str(os.getuid()) if hasattr(os, "getuid") else "user"
    candidates.append(Path(tempfile.gettempdir()) / f"dataflow-numba-{name}")
    return candidates


def _writable(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            return True
    except OSError:
        return False


def select_cache_dir(environ: Mapping[str, str]) -> Path | None:
    """The first writable candidate for ``environ``, or None when caching is off or impossible."""
    if environ.get("DATAFLOW_NUMBA_CACHE", "") == "0":
        return None
    for path in cache_dir_candidates(environ):
        if _writable(path):
            return path
    return None


_CONFIGURED: Path | bool | None = False


def configure_numba_cache(environ: MutableMapping[str, str] | None = None) -> bool:
    """Choose the cache directory once per process and export it as ``NUMBA_CACHE_DIR``;
    returns whether kernels should be decorated with ``cache=True``."""
    global _CONFIGURED
    if environ is None:
        if _CONFIGURED is not False:
            return _CONFIGURED is not None
        environ = os.environ
    path = select_cache_dir(environ)
    if path is None:
        # a user-set directory that is not writable would make numba fail at decoration
        environ.pop("NUMBA_CACHE_DIR", None)
    else:
        environ["NUMBA_CACHE_DIR"] = str(path)
    if environ is os.environ:
        _CONFIGURED = path
        config = sys.modules.get("numba.core.config")
        if config is not None:  # numba already imported: it read the environment then
            config.reload_config()
    return path is not None
