"""The platform API of ``dataflow serve``: pipelines, jobs, payloads and metadata over REST
(:mod:`dataflow.platform.rest`) and Clara-compatible gRPC, on one core
(:class:`dataflow.platform.core.Platform`). See docs/platform.md."""

from dataflow.platform.core import Platform, Subscription, pipeline_id
from dataflow.platform.errors import Conflict, Invalid, NotFound, PlatformError, Refused

__all__ = [
    "Conflict",
    "Invalid",
    "NotFound",
    "Platform",
    "PlatformError",
    "Refused",
    "Subscription",
    "pipeline_id",
]
