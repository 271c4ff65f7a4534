"""How worker processes start: forked from a preloaded fork server, or spawned fresh.

A spawned worker is a new interpreter that imports NumPy, Numba, PyArrow, pydicom and the
stage's module before it can run ``prepare`` — about a second of CPU each, twelve times over for
ct-segmentation, on a machine that may have two cores. So CPU workers are forked from a *fork
server* (``multiprocessing``'s ``forkserver``): one clean process, started once per coordinator,
that imports those modules once; each worker is a fork of it and finds them already loaded.

What must still differ per worker does:

- the environment: the worker sets ``os.environ`` to what a spawned worker would have inherited
  (the coordinator's environment now, plus the stage's variables) and re-reads Numba's
  configuration from it; its Numba thread count is set from ``NUMBA_NUM_THREADS``;
- random state: NumPy's global generator is re-seeded (Python's ``random`` is by ``os.fork``).

The fork server runs no kernel and touches no GPU: it only imports. BLAS threads are 1 in it
(NumPy's BLAS reads that once, at import); a worker that asks for more is spawned, as is every
GPU worker (CUDA state must begin in the process that uses it), a worker of a stage that sets
variables of its own (a library may read them at import), and every worker when
``DATAFLOW_WORKER_START=spawn``.

A module that fails to import in the fork server is skipped there (the worker imports it again
and reports the error as before); the server never dies of a stage's import.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "BASE_PRELOAD",
    "Inherit",
    "after_fork",
    "context_for",
    "forkable",
    "preload_from_env",
    "server_pid",
    "want",
]

#: imported once in the fork server (a stage's own module is added by the executor)
BASE_PRELOAD = (
    "numpy",
    "pyarrow",
    "numba",
    "pydicom",
    "structlog",
    "dataflow.logs",
    "dataflow.store",
    "dataflow.stage",
    "dataflow.execution.worker",
)
_ENV = "DATAFLOW_FORKSERVER_PRELOAD"  # how the module list reaches the server
#: set in the fork server before NumPy loads its BLAS; a worker wanting other values is spawned
_SERVER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
#: per-worker variables the executor sets that a forked worker can apply after the fork
_APPLIED_AFTER_FORK = {"NUMBA_NUM_THREADS", "CUDA_VISIBLE_DEVICES"}

_lock = threading.Lock()
_wanted: dict[str, None] = {}  # modules executors built so far will need (an ordered set)


def want(modules: Iterable[str]) -> None:
    """Ask for ``modules`` to be preloaded when the fork server starts (an executor, when it
    is built: ``dataflow serve`` builds every pipeline's before starting any, so the server
    preloads them all)."""
    with _lock:
        _wanted.update(dict.fromkeys(modules))


def _mode() -> str:
    mode = os.environ.get("DATAFLOW_WORKER_START", "forkserver")
    return mode if mode in ("forkserver", "spawn") else "forkserver"


def forkable(env: Mapping[str, str], device: int | None) -> bool:
    """Whether a worker with these per-worker variables and device may be forked."""
    if device is not None or _mode() == "spawn" or sys.platform != "linux":
        return False
    if env.get("CUDA_VISIBLE_DEVICES", ""):
        return False
    for key, value in env.items():
        if key in _APPLIED_AFTER_FORK:
            continue
        if _SERVER_ENV.get(key) != value:
            return False
    return True


def context_for(env: Mapping[str, str], device: int | None, modules: Iterable[str] = ()):
    """The multiprocessing context to start a worker with (the fork server, started now with
    ``modules`` preloaded if it is not running yet, or spawn)."""
    if not forkable(env, device):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    _ensure_server(ctx, modules)
    return ctx


def _ensure_server(ctx, modules: Iterable[str]) -> None:
    """Start the fork server if it is not running, with the base modules and ``modules`` to
    preload. A server already running keeps its list (a later pipeline's stages import their
    own modules); one that died is started again."""
    from multiprocessing import forkserver

    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main is not None and main.name != "__main__" and not main.name.endswith(".__main__"):
        # ``python -m dataflow.cli``: each worker runs the main module again (as __mp_main__);
        # with its imports loaded here that costs nothing (a script's path the server imports
        # itself)
        modules = [*modules, main.name]
    with _lock:
        ctx.set_forkserver_preload([__name__])
        saved = os.environ.get(_ENV)
        os.environ[_ENV] = ",".join(dict.fromkeys([*BASE_PRELOAD, *_wanted, *modules]))
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                os.environ.pop(_ENV, None)
            else:
                os.environ[_ENV] = saved


def server_pid() -> int | None:
    """The fork server's process ID, if one was started by this process (it lives as long as
    this process does, so that restarted workers start fast too, and exits with it)."""
    from multiprocessing import forkserver

    return forkserver._forkserver._forkserver_pid


def preload_from_env() -> list[str]:
    """In the fork server: import the modules named by the executor, skipping any that fails
    (returns those imported)."""
    names = [n for n in os.environ.pop(_ENV, "").split(",") if n]
    if not names:
        return []
    os.environ.update(_SERVER_ENV)
    if any(n == "numba" or n.startswith("operators.") for n in names):
        from dataflow.execution.jitcache import configure_numba_cache

        configure_numba_cache()  # before numba reads NUMBA_CACHE_DIR
    done = []
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException:  # the worker imports it again and says why
            continue
        done.append(name)
    return done


class Inherit:
    """What a spawned worker would inherit from the coordinator at its start and a worker
    forked from the fork server must take over: the environment, the working directory and
    the current stdout and stderr (a test's capture, a redirected log). Pickled to the worker
    with the two descriptors passed alongside (like a ``multiprocessing`` pipe)."""

    def __init__(self, environ: Mapping[str, str], cwd: str, stdio: tuple[int, int] = (1, 2)):
        self.environ, self.cwd, self.stdio = dict(environ), cwd, stdio

    @classmethod
    def now(cls, env: Mapping[str, str]) -> Inherit:
        """The coordinator's now, with a worker's own variables over it."""
        return cls({**os.environ, **env}, os.getcwd())

    def __reduce__(self):
        from multiprocessing import reduction

        fds = tuple(reduction.DupFd(fd) for fd in self.stdio)
        return _rebuild, (self.environ, self.cwd, fds)


def _rebuild(environ, cwd, fds) -> Inherit:
    inherit = Inherit(environ, cwd)
    inherit.stdio = tuple(fd.detach() for fd in fds)
    return inherit


def after_fork(inherit: Inherit) -> None:
    """In a forked worker, first thing: take what a spawned worker would have inherited and
    make the preloaded modules honour it."""
    for target, fd in zip((1, 2), inherit.stdio, strict=True):
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
    try:
        os.chdir(inherit.cwd)
    except OSError:  # the coordinator's folder is gone: stay where the server is
        pass
    if os.environ != inherit.environ:
        os.environ.clear()
        os.environ.update(inherit.environ)
    jitcache = sys.modules.get("dataflow.execution.jitcache")
    if jitcache is not None:  # chosen in the server: choose again from this environment
        jitcache._CONFIGURED = False
        jitcache.configure_numba_cache()
    config = sys.modules.get("numba.core.config")
    if config is not None:
        config.reload_config()  # NUMBA_CACHE_DIR, NUMBA_NUM_THREADS, NUMBA_DISABLE_JIT...
        parallel = sys.modules.get("numba.np.ufunc.parallel")
        if parallel is not None and not parallel._is_initialized:
            parallel.NUM_THREADS = parallel.get_thread_count()  # the pool this worker launches
    numpy: Any = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()  # the fork copied the server's state: each worker its own


if os.environ.get(_ENV):  # imported as the fork server's preload module
    import signal

    # systemd's SIGTERM (or a terminal's Ctrl-C) reaches every process of the service at
    # once: the server lives as long as its coordinator (it exits when the coordinator's end
    # of its pipe closes), or the coordinator would read its workers' exit codes as 255 and
    # take them for dead while they finish their jobs within the shutdown grace
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    preload_from_env()
