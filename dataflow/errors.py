"""The exception tree of the engine.

::

    DataflowError                      anything dataflow raises on purpose
    ├── StoreError                     the shared-memory object store
    │   ├── StoreNotRunning            no store listens at that address (or it stopped)
    │   ├── ObjectNotFound             unknown ID (also: still unsealed when get timed out)
    │   ├── ObjectExists               create/put with an ID already in the store
    │   ├── ObjectSealed               writing to, or sealing, an object already sealed
    │   ├── StoreFull                  budget exhausted and nothing freed within the timeout
    │   └── StoreValueError            bad size, shape, element type or metadata (also a ValueError)
    ├── StageError                     a stage's own code failed (dataflow.stage)
    ├── PortError, ParameterError      a port or stage parameter is wrong (dataflow.stage)
    ├── PipelineError                  a pipeline definition is wrong (dataflow.pipeline)
    ├── KernelValueError               bad arguments to operators.kernels (also a ValueError)
    └── SchedulerError                 dataflow.scheduler
        ├── SchedulerValueError        a bad inventory declaration (DATAFLOW_GPUS...)
        └── PlacementError             replicas that cannot be placed, each with the reason

Internal bugs are not ``DataflowError``: they surface as the builtin exception that
revealed them.
"""

from __future__ import annotations

__all__ = [
    "DataflowError",
    "ObjectExists",
    "ObjectNotFound",
    "ObjectSealed",
    "StoreError",
    "StoreFull",
    "StoreNotRunning",
    "StoreValueError",
]


class DataflowError(Exception):
    """Base of every error dataflow raises on purpose."""


class StoreError(DataflowError):
    """Something went wrong in the shared-memory object store."""


class StoreNotRunning(StoreError):
    """No store is listening at the address, or it stopped while we talked to it."""


class ObjectNotFound(StoreError, KeyError):
    """The object ID is not in the store (or was not sealed before the timeout)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ObjectExists(StoreError):
    """An object with this ID already exists."""


class ObjectSealed(StoreError):
    """The object is sealed: it is immutable and cannot be sealed again."""


class StoreFull(StoreError):
    """The store's byte budget is exhausted and nothing could be freed in time."""


class StoreValueError(StoreError, ValueError):
    """A bad argument: size, shape, element type, metadata or ID."""


# Error codes carried over the store's socket, mapped back to classes in one place.
STORE_ERRORS: dict[str, type[StoreError]] = {
    cls.__name__: cls
    for cls in (
        StoreError,
        StoreNotRunning,
        ObjectNotFound,
        ObjectExists,
        ObjectSealed,
        StoreFull,
        StoreValueError,
    )
}
