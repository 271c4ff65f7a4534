"""The exception tree: every ``DataflowError`` subclass in dataflow/, connectors/ and operators/,
drawn here and nowhere else (``tests/unit/test_error_tree.py`` fails when a class is missing
from the drawing, or drawn but gone). Where callers catch a builtin too, it is a second base.

::

    DataflowError                    anything dataflow raises on purpose; the CLI prints its
    │                                message and exits 2 (dataflow.cli)
    ├── StoreError                   the shared-memory object store (dataflow.errors)
    │   ├── StoreNotRunning          no store listens at that address (or it stopped)
    │   ├── ObjectNotFound           unknown ID, or still unsealed when get timed out (KeyError)
    │   ├── ObjectExists             create/put with an ID already in the store
    │   ├── ObjectSealed             writing to, or sealing, an object already sealed
    │   ├── StoreFull                budget exhausted and nothing freed within the timeout
    │   └── StoreValueError          bad size, shape, element type or metadata (ValueError)
    ├── ConfigError                  a service file is wrong: the file and key are named
    │                                (ValueError; dataflow.errors, also dataflow.service.config,
    │                                connectors.dicom.config's ReceiverConfigError and
    │                                connectors.dicom.service's DicomConfigError)
    ├── UsageError                   a command-line option is wrong (ValueError; dataflow.errors)
    ├── MissingFile                  a file or folder named on the command line is missing or
    │                                holds nothing (FileNotFoundError; dataflow.errors)
    ├── PipelineError                a pipeline file cannot be used (dataflow.pipeline)
    ├── StageImportError             a stage: import path that leads to no Stage
    │                                (dataflow.pipeline.stages)
    ├── RequirementError             a stage's requirements() is not module -> install
    │                                (TypeError; dataflow.pipeline.requirements)
    ├── StageError                   a stage's own code failed (dataflow.stage)
    │   ├── SelectionError           no series matched the selection (ValueError;
    │   │                            operators.dicom.selector)
    │   └── EmptySegmentError        a segment the pipeline expects has no voxel
    │                                (operators.dicom.seg)
    ├── PortError                    a stage's port is wrong (ValueError; dataflow.stage)
    ├── ParameterError               a stage parameter is wrong (ValueError; dataflow.stage)
    ├── OutputError                  --output cannot take the results (ValueError;
    │                                dataflow.output)
    ├── ModelError                   a model that cannot be stored, found or read
    │                                (dataflow.models)
    ├── RegistrationError            a registered result's task.json that cannot be used
    │                                (ValueError; dataflow.registered)
    ├── SchedulerError               dataflow.machine (PlacementError: dataflow.scheduler)
    │   ├── SchedulerValueError      a bad inventory declaration (DATAFLOW_GPUS...; ValueError)
    │   └── PlacementError           replicas that cannot be placed, each with the reason
    ├── ServiceError                 the service cannot start or do what was asked
    │                                (dataflow.service.service)
    ├── JobNotFound                  no job has this id (KeyError; dataflow.service.jobs)
    ├── RetryRefused                 a job that cannot be retried (dataflow.service.jobs)
    ├── PlatformError                a request the platform cannot do; HTTP status and Clara
    │   │                            code (dataflow.platform.errors)
    │   ├── NotFound                 404
    │   ├── Invalid                  422
    │   ├── Conflict                 409
    │   ├── Refused                  403 (413, 507)
    │   ├── Unauthorized             401: no or unknown token (dataflow.platform.auth)
    │   └── Forbidden                403: the token's role may not (dataflow.platform.auth)
    ├── ApiError                     the service's API refused or did not answer
    │                                (dataflow.platform.client)
    ├── PreviewError                 a job's file the console cannot draw (ValueError;
    │                                dataflow.platform.console.preview)
    ├── BadInstance                  a received dataset refused, with its C-STORE status
    │                                (connectors.dicom.receive.spool)
    ├── AssociationFailed            no association: rejected, aborted, no context accepted
    │                                (connectors.dicom.net.association)
    ├── ExportError                  sending results (connectors.dicom.export.transport)
    │   ├── DestinationError         a destination is configured wrong (ValueError)
    │   ├── TransientExportError     the destination was away or dropped: retry later
    │   ├── OutboxBusy               another process holds the outbox
    │   │                            (connectors.dicom.export.outbox)
    │   └── ResendRefused            a dead letter that cannot be sent again
    │                                (connectors.dicom.export.exporter)
    ├── QueryError                   a query or retrieve from a PACS failed
    │   │                            (connectors.dicom.query.scu)
    │   ├── PacsUnavailableError     the PACS could not be reached or let go: retried
    │   ├── NotFoundError            the study or series is not on the PACS
    │   └── RetrieveError            a C-GET/C-MOVE refused or partial, with its counts
    ├── PriorError                   a study whose priors cannot be looked for, or a wrong
    │                                argument of FetchPriors/FetchStudy (operators.dicom.priors)
    ├── SeriesError                  a series cannot be made a volume (ValueError;
    │   │                            operators.dicom.frames)
    │   ├── ReadError                a file not readable within its bounds
    │   │                            (operators.dicom.reading)
    │   └── MemoryLimitError         a series over the memory limit (operators.dicom.series)
    ├── GeometryError                a tensor without a usable geometry (ValueError;
    │                                operators.dicom.geometry)
    ├── RuleError                    a selection rule is malformed (ValueError;
    │                                operators.dicom.selector_rules)
    ├── KernelValueError             bad arguments to operators.kernels (ValueError)
    ├── InferenceError               a model not loadable or reachable, or a batch
    │                                that does not fit it (ValueError;
    │                                operators.inference.backends)
    └── SlidingWindowError           bad sliding-window arguments (ValueError;
                                     operators.inference.sliding_window)

Internal bugs are not ``DataflowError``: they surface as the builtin exception that revealed
them, with their traceback. Signals that never leave a module (``connectors.dicom.receive.intake``'s
``_GiveBack``, ``_Malformed``, ``_Stop``; ``connectors.dicom.export.direct.ProtocolSurprise``, which
hands a response back to pynetdicom) are plain exceptions and not drawn.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataflowError",
    "MissingFile",
    "ObjectExists",
    "ObjectNotFound",
    "ObjectSealed",
    "StoreError",
    "StoreFull",
    "StoreNotRunning",
    "StoreValueError",
    "UsageError",
]


class DataflowError(Exception):
    """Base of every error dataflow raises on purpose."""


class ConfigError(DataflowError, ValueError):
    """A service configuration is malformed (the message names the file and key)."""


class UsageError(DataflowError, ValueError):
    """A command-line argument or option is wrong (the message names it)."""


class MissingFile(DataflowError, FileNotFoundError):
    """A file or folder the user named is missing, or holds nothing to work on."""


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
