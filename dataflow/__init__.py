"""dataflow: medical-imaging AI pipelines as warm streaming stages over a shared-memory store.

The stage author's API is importable from here: ``Stage``, ``Port``, ``Tensor``, the
``function_stage`` decorator and ``StageContext`` (see docs/stages.md). ``dataflow.stage`` is
the module that defines them.
"""

from dataflow.stage import Port, Stage, StageContext, StageError, Tensor, function_stage

__version__ = "0.1.0"
__all__ = [
    "Port",
    "Stage",
    "StageContext",
    "StageError",
    "Tensor",
    "__version__",
    "function_stage",
]
