"""Clara pipeline definitions (PDL api-version 0.4.0/0.5.0) as specs and a validated DAG.

::

    from dataflow.pipeline import check_pipeline, load_graph, load_pipeline, validate

    spec = load_pipeline("pipelines/x.yaml", {"organ": "liver"})  # PipelineError on errors
    report = validate(spec, gpus_available=1)                     # errors, warnings, notes
    print(report.format())                                        # FILE:LINE:COL: ...
    graph = load_graph("pipelines/x.yaml")                        # both, raising on errors
    for name in graph.order: ...

Modules: ``spec`` (frozen dataclasses), ``load`` (YAML -> spec: schema, imports,
placeholders), ``stages`` (Python stages by import path, port binding), ``graph`` (edges,
order), ``validate`` (the whole check), ``diagnostics`` (locations, messages, the error).
The language as implemented is described in docs/pipelines.md.
"""

from dataflow.pipeline.diagnostics import SEVERITIES, Diagnostic, Location, PipelineError, Report
from dataflow.pipeline.graph import Edge, Graph, OperatorNode, compatible, topological_order
from dataflow.pipeline.load import load_pipeline
from dataflow.pipeline.spec import (
    ContainerSpec,
    InputSpec,
    OperatorSpec,
    OutputSpec,
    PipelineSpec,
    Requests,
)
from dataflow.pipeline.stages import StageImportError, import_stage, stage_search_path
from dataflow.pipeline.validate import (
    GPUS_ENV,
    check_pipeline,
    load_graph,
    validate,
)

__all__ = [
    "GPUS_ENV",
    "SEVERITIES",
    "ContainerSpec",
    "Diagnostic",
    "Edge",
    "Graph",
    "InputSpec",
    "Location",
    "OperatorNode",
    "OperatorSpec",
    "OutputSpec",
    "PipelineError",
    "PipelineSpec",
    "Report",
    "Requests",
    "StageImportError",
    "check_pipeline",
    "compatible",
    "import_stage",
    "load_graph",
    "load_pipeline",
    "stage_search_path",
    "topological_order",
    "validate",
]
