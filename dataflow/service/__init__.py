"""The long-running service (``dataflow serve``): warm pipelines, connectors, job records.

See docs/service.md. :class:`Service` runs it; :func:`load_config` reads its configuration;
:class:`JobStore` holds the job records that ``dataflow jobs`` lists.
"""

from dataflow.service.config import ConfigError, ServiceConfig, load_config
from dataflow.service.jobs import JobRecord, JobStore
from dataflow.service.service import Connector, Service, ServiceError, ServiceHost

__all__ = [
    "ConfigError",
    "Connector",
    "JobRecord",
    "JobStore",
    "Service",
    "ServiceConfig",
    "ServiceError",
    "ServiceHost",
    "load_config",
]
