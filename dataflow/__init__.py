"""dataflow: medical-imaging AI pipelines as warm streaming stages over a shared-memory store."""

__version__ = "0.1.0"
