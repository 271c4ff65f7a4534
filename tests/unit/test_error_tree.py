"""The tree drawn in ``dataflow/errors.py`` is the whole tree: every ``DataflowError`` subclass
of dataflow/, connectors/ and operators/ is drawn, under its real parent, and nothing drawn
is gone."""

from __future__ import annotations

import importlib
import pkgutil
import re
import warnings

import dataflow.errors
from dataflow.errors import DataflowError

PACKAGES = ("dataflow", "connectors", "operators")
# A module may need what only a GPU machine installs; it is skipped, with the reason, only
# when the module missing is not ours.
LINE = re.compile(r"^    ((?:[│ ]   )*)[├└]── (\w+)\b")


def _import_all() -> dict[str, str]:
    """Import every module of the three packages; {module: why skipped}."""
    skipped = {}
    for package in PACKAGES:
        root = importlib.import_module(package)
        for info in pkgutil.walk_packages(root.__path__, f"{package}."):
            try:
                importlib.import_module(info.name)
            except ModuleNotFoundError as exc:
                if (exc.name or "").split(".")[0] in PACKAGES:
                    raise
                skipped[info.name] = f"needs {exc.name}, not installed here"
    return skipped


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        if sub.__module__.split(".")[0] in PACKAGES:  # not the tests' own
            found.add(sub)
        found |= _subclasses(sub)
    return found


def _drawn() -> dict[str, str]:
    """{class name: its parent's name} as ``dataflow/errors.py``'s docstring draws them."""
    parents = {}
    stack = ["DataflowError"]
    for line in (dataflow.errors.__doc__ or "").splitlines():
        found = LINE.match(line)
        if not found:
            continue
        depth = len(found.group(1)) // 4
        del stack[depth + 1 :]
        name = found.group(2)
        assert name not in parents, f"{name} is drawn twice"
        parents[name] = stack[-1]
        stack.append(name)
    return parents


def _parent(cls: type) -> str:
    return next(b for b in cls.__bases__ if issubclass(b, DataflowError)).__name__


def test_every_dataflow_error_is_drawn_under_its_parent() -> None:
    skipped = _import_all()
    for module, why in skipped.items():
        warnings.warn(f"{module} not imported: {why}", stacklevel=1)
    real = _subclasses(DataflowError)
    names = [cls.__name__ for cls in real]
    assert len(names) == len(set(names)), "two DataflowError classes share a name"
    drawn = _drawn()

    missing = sorted(f"{c.__module__}.{c.__name__}" for c in real if c.__name__ not in drawn)
    assert not missing, f"not drawn in dataflow/errors.py: {', '.join(missing)}"
    gone = sorted(set(drawn) - set(names))
    assert skipped or not gone, f"drawn in dataflow/errors.py but gone: {', '.join(gone)}"
    wrong = sorted(
        f"{c.__name__} is drawn under {drawn[c.__name__]}, derives from {_parent(c)}"
        for c in real
        if drawn[c.__name__] != _parent(c)
    )
    assert not wrong, "; ".join(wrong)


def test_the_drawing_is_read_as_a_tree() -> None:
    """The parser above sees nesting (a test that cannot pass on a flat reading)."""
    drawn = _drawn()
    assert drawn["StoreError"] == "DataflowError"
    assert drawn["ObjectNotFound"] == "StoreError"
    assert drawn["Forbidden"] == "PlatformError"
    assert drawn["SlidingWindowError"] == "DataflowError"
