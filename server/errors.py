"""One table from the service's errors to gRPC status codes, each with a reason a caller can act on.

Statuses follow google.rpc.Status with an ErrorInfo (domain "cacheaside"), sent with grpcio-status.
An error's trailing metadata also carries the call's `x-request-id`, since aborting replaces whatever
trailing metadata was set before, and a failed call is the one a caller most needs to quote.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.logs import request_id as current_request_id

ERROR_DOMAIN = "cacheaside"


class ServiceError(Exception):
    """An error with a gRPC status code and an UPPER_SNAKE reason."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason


class InvalidArgument(ServiceError):
    """The request is malformed: an id, a limit or a batch the caller must fix."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    """No row has the requested id."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class DatabaseUnavailable(ServiceError):
    """The database is unreachable or too slow; retrying later may succeed."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "DATABASE_UNAVAILABLE"


class CacheUnavailableForWrite(ServiceError):
    """Redis is unreachable, so an operation that must write to it (Invalidate, Warm) did nothing."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "CACHE_UNAVAILABLE"


class Overloaded(ServiceError):
    """The server is already handling as many calls as it may; retrying with backoff may succeed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "CONCURRENCY_LIMIT"


class Unauthenticated(ServiceError):
    """The call needs a bearer token it did not carry, or carried one that is not valid for it."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the answer was ready."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


def to_status(error: ServiceError) -> grpc.Status:
    """The rich status (code, message, ErrorInfo) for an error."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail])
    converted = rpc_status.to_status(status)
    request_id = current_request_id()
    if request_id is None:
        return converted
    return _Status(
        converted.code, converted.details, (*converted.trailing_metadata, ("x-request-id", request_id))
    )


class _Status(grpc.Status):
    # grpc.Status is an abstract interface; grpcio-status builds its own the same way.
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[Any, ...]) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata
