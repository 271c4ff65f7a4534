"""What a Python stage needs installed, found without importing it.

A stage declares the modules it imports beyond dataflow's own dependencies and what installs
each (``Stage.requires``, or ``Stage.requirements(parameters)`` when the parameters decide:
the inference stage needs onnxruntime for ``backend: onnx``, tritonclient for ``triton``).
:func:`missing` looks each module up with :func:`importlib.util.find_spec`, which reads no
module's code (a dotted name imports its parent packages only), so validating stays quick.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from dataflow.errors import DataflowError
from dataflow.stage import Stage

__all__ = ["RequirementError", "installed", "missing", "missing_message"]


class RequirementError(DataflowError, TypeError):
    """A stage's ``requires`` / ``requirements()`` is not a mapping of module -> install."""


def installed(module: str) -> bool:
    """Whether ``module`` can be imported here (its code is not run)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or a bad name
        return False


def missing(cls: type[Stage], parameters: Mapping[str, Any]) -> dict[str, list[str]]:
    """What installs the modules ``cls`` needs with ``parameters`` and lacks here:
    install -> its missing modules, in declaration order (empty when all are there)."""
    needs = cls.requirements(parameters) if hasattr(cls, "requirements") else {}
    if not isinstance(needs, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in needs.items()
    ):
        raise RequirementError(
            f"{cls.__module__}:{cls.__qualname__}: requires must map module names to what "
            f"installs them, e.g. {{'nibabel': 'dataflow[research]'}}; got {needs!r}"
        )
    out: dict[str, list[str]] = {}
    for module, install in needs.items():
        if not installed(module):
            out.setdefault(install, []).append(module)
    return out


def missing_message(absent: Mapping[str, list[str]]) -> str:
    """``needs onnxruntime and onnx, not installed here: pip install 'dataflow[onnx]'``."""
    parts = []
    for install, modules in absent.items():
        names = " and ".join(
            [", ".join(modules[:-1]), modules[-1]] if len(modules) > 1 else modules
        )
        parts.append(f"{names}, not installed here: pip install '{install}'")
    return "needs " + "; and ".join(parts)
