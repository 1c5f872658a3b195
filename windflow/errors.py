"""The one error hierarchy of Windflow.

Every error a core, actor or model raises on purpose is a ``WindflowError``. Each subclass
names one gRPC status code (by name, so this module stays free of grpc) and says whether a
caller may retry. The servicers never build status codes themselves: one interceptor
(``windflow.common.grpc_errors``) maps these types to statuses at the boundary.
"""

from __future__ import annotations


class WindflowError(Exception):
    """Base of every deliberate Windflow error."""

    code: str = "INTERNAL"
    retryable: bool = False

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidArgument(WindflowError):
    """The request is malformed or names something out of range for its schema."""

    code = "INVALID_ARGUMENT"


class NotFound(WindflowError):
    """A named model, session or worker does not exist."""

    code = "NOT_FOUND"


class AlreadyExists(WindflowError):
    code = "ALREADY_EXISTS"


class OutOfRange(WindflowError):
    """A frame index or position lies outside what the session holds."""

    code = "OUT_OF_RANGE"


class FailedPrecondition(WindflowError):
    """The system is not in a state where the request can run (e.g. a foreign snapshot)."""

    code = "FAILED_PRECONDITION"


class ResourceExhausted(WindflowError):
    """No capacity, or a payload over its limit. ``retry_after_s`` hints when to retry."""

    code = "RESOURCE_EXHAUSTED"
    retryable = True


class Unavailable(WindflowError):
    """A dependency (worker, etcd, NATS) cannot be reached right now."""

    code = "UNAVAILABLE"
    retryable = True


class Unauthenticated(WindflowError):
    code = "UNAUTHENTICATED"


class PermissionDenied(WindflowError):
    code = "PERMISSION_DENIED"


class DataLoss(WindflowError):
    """Stored bytes (a snapshot, a log entry) are corrupted or truncated."""

    code = "DATA_LOSS"


class Internal(WindflowError):
    code = "INTERNAL"


# Model-level errors: raised by WorldModel implementations, mapped like their bases.


class InvalidControl(InvalidArgument):
    """A control names an action outside the model's action space or an axis out of range."""


class SnapshotError(DataLoss):
    """Snapshot bytes are corrupted, truncated or not a snapshot at all."""


class SnapshotVersionMismatch(FailedPrecondition):
    """A well-formed snapshot made by another model or model version."""


class CheckpointError(InvalidArgument):
    """Model weights on disk do not match the architecture (missing/unexpected keys, shapes)."""
