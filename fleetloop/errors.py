"""One error hierarchy for fleetloop.

Code raises these; only the boundaries (gRPC servicers, REST handlers) translate them into
status codes, with :func:`grpc_status_name` / :data:`HTTP_STATUS`. Every message names the
offending field and value. Only :class:`Unavailable` (and gRPC DEADLINE_EXCEEDED) is retryable.
"""

from __future__ import annotations


class FleetloopError(Exception):
    """Base class. ``code`` is the gRPC status name used at the boundary."""

    code: str = "INTERNAL"
    http_status: int = 500
    retryable: bool = False

    def __init__(self, message: str, *, field: str | None = None, value: object = None) -> None:
        self.field = field
        self.value = value
        if field is not None and field not in message:
            message = f"{field}: {message}"
        super().__init__(message)


class InvalidArgument(FleetloopError):
    """Malformed input: wrong shape or dtype, NaN/inf, missing field, oversized tensor."""

    code = "INVALID_ARGUMENT"
    http_status = 422


class Unauthenticated(FleetloopError):
    """Missing, unknown or revoked credential."""

    code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(FleetloopError):
    """Valid credential, but not allowed to do this (wrong job, wrong role)."""

    code = "PERMISSION_DENIED"
    http_status = 403


class NotFound(FleetloopError):
    """Unknown job, version, actor."""

    code = "NOT_FOUND"
    http_status = 404


class FailedPrecondition(FleetloopError):
    """Request is well formed but does not fit the current state (protocol or spec mismatch)."""

    code = "FAILED_PRECONDITION"
    http_status = 409


class ResourceExhausted(FleetloopError):
    """Too large, too many, or over budget (message size, rate limit, memory budget)."""

    code = "RESOURCE_EXHAUSTED"
    http_status = 429


class Unavailable(FleetloopError):
    """Transient: the peer is down or restarting. The only class clients retry."""

    code = "UNAVAILABLE"
    http_status = 503
    retryable = True


class IntegrityError(FleetloopError):
    """Data failed verification (weight digest mismatch, torn checkpoint)."""

    code = "DATA_LOSS"
    http_status = 500


HTTP_STATUS = {cls.code: cls.http_status for cls in FleetloopError.__subclasses__()}


def grpc_status_name(exc: BaseException) -> str:
    """Name of the ``grpc.StatusCode`` for ``exc`` (INTERNAL for anything not ours)."""
    return exc.code if isinstance(exc, FleetloopError) else "INTERNAL"
