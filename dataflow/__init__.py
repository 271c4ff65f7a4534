"""dataflow: medical-imaging AI pipelines as warm streaming stages over a shared-memory store.

The stage author's API is importable from here: ``Stage``, ``Port``, ``Tensor``, the ``stage``
decorator and ``StageContext`` (see docs/stages.md). (``dataflow.stage`` is both the module
and, as an attribute of this package, the decorator; ``import dataflow.stage`` still gives
the module.)
"""

from dataflow.stage import Port, Stage, StageContext, StageError, Tensor, stage

__version__ = "0.1.0"
__all__ = ["Port", "Stage", "StageContext", "StageError", "Tensor", "__version__", "stage"]
