"""The platform's errors: one kind per way a request can be wrong, each mapped once to an
HTTP status (``status``) and carrying the Clara code of the resource (``code``, §6.5 of
Clara's error codes) so that the REST and gRPC layers translate without guessing::

    PlatformError (DataflowError)
    ├── NotFound   404  no such pipeline, job, payload or file (the message names the id)
    ├── Invalid    422  malformed input: an id, a path, metadata, a pipeline definition
    ├── Conflict   409  not now: a job started twice, a pipeline that exists, a payload in use
    └── Refused    403  never, as configured: over a size limit or the free disk (413/507)

Messages name the id, path or value and never hold patient data.
"""

from __future__ import annotations

from dataflow.errors import DataflowError

__all__ = ["Conflict", "Invalid", "NotFound", "PlatformError", "Refused"]


class PlatformError(DataflowError):
    """A request the platform cannot do; ``status``: the HTTP status; ``code``: Clara's
    (negative) error code for it, 0 when Clara has none."""

    status = 500
    kind = "error"

    def __init__(self, message: str, *, code: int = 0, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        if status is not None:
            self.status = status


class NotFound(PlatformError):
    status, kind = 404, "not-found"


class Invalid(PlatformError):
    status, kind = 422, "invalid"


class Conflict(PlatformError):
    status, kind = 409, "conflict"


class Refused(PlatformError):
    status, kind = 403, "refused"


# Clara's codes (ResponseHeader.code), by resource; those Clara names without a number are
# given the next free one in its range.
PIPELINE_INVALID_ID = -0x1000
PIPELINE_MISSING = -0x1001
PIPELINE_STORE = -0x1002
PIPELINE_DEFINITION = -0x1100
PIPELINE_LOAD = -0x1101
JOB_INVALID_ID = -0x2000
JOB_MISSING = -0x2001
JOB_STORE = -0x2002
JOB_INVALID_NAME = -0x2100
JOB_START = -0x2101
JOB_CANCEL = -0x2102
PAYLOAD_INVALID_ID = -0x3000
PAYLOAD_MISSING = -0x3001
PAYLOAD_MISSING_FILE = -0x3002
PAYLOAD_DELETE = -0x3003
PAYLOAD_UPLOAD = -0x3004
METADATA_INVALID = -0x4000
# models (Clara documents no codes for its Model Repository: ours, in the next free range)
MODEL_INVALID_ID = -0x5000
MODEL_MISSING = -0x5001
MODEL_UPLOAD = -0x5004
MODEL_DELETE = -0x5003
MODEL_UNSUPPORTED = -0x5100
