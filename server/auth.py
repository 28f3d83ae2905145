"""Bearer tokens: Invalidate and Warm need the admin token when one is set; reads need the read token
(or the admin token) when one is set. Health and reflection stay open, for probes.

Tokens are compared in constant time and never logged; a rejection says what to send, not what was sent.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from server.errors import Unauthenticated, to_status

_LOGGER = logging.getLogger(__name__)
_SCHEME = "bearer "
ADMIN_METHODS = frozenset({"Invalidate", "Warm", "WarmWithProgress"})

if TYPE_CHECKING:  # generic in grpc-stubs only
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class AuthInterceptor(_Interceptor):
    """Checks the `authorization: Bearer <token>` metadata of the service's calls."""

    def __init__(self, *, service: str, admin_token: str, read_token: str) -> None:
        self._prefix = f"/{service}/"
        self._admin = [admin_token.encode()] if admin_token else []
        # The admin token may read too: an operator should not need two tokens.
        self._read = [read_token.encode(), *self._admin] if read_token else []
        self._missing = _rejecting("MISSING_TOKEN")
        self._invalid = _rejecting("INVALID_TOKEN")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = handler_call_details.method
        if not method.startswith(self._prefix):
            return await continuation(handler_call_details)
        accepted = self._admin if method[len(self._prefix) :] in ADMIN_METHODS else self._read
        if not accepted:
            return await continuation(handler_call_details)
        token = _bearer(handler_call_details.invocation_metadata or ())
        if token is None:
            return self._missing
        # Compare with every accepted token, so the time taken does not say which one nearly matched.
        matches = [hmac.compare_digest(token, candidate) for candidate in accepted]
        if not any(matches):
            return self._invalid
        return await continuation(handler_call_details)


def _bearer(metadata: Sequence[tuple[str, str | bytes]]) -> bytes | None:
    # Exactly one authorization entry: with several, which one a proxy or a client meant is a guess,
    # and picking whichever is valid would let a forged header ride along with a real one.
    values = [value for key, value in metadata if key == "authorization"]
    if len(values) != 1:
        return b"" if values else None  # b"": present but unusable, so INVALID_TOKEN
    value = values[0]
    if isinstance(value, str) and value[: len(_SCHEME)].lower() == _SCHEME:
        return value[len(_SCHEME) :].strip().encode()
    return None


_MESSAGES = {
    "MISSING_TOKEN": "this call needs metadata 'authorization: Bearer <token>'",
    "INVALID_TOKEN": "the bearer token is not valid for this call",
}


def _rejecting(reason: str) -> grpc.RpcMethodHandler[Any, Any]:
    message = _MESSAGES[reason]

    async def reject(_request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        _LOGGER.warning("call rejected: %s", message, extra={"reason": reason, "peer": context.peer()})
        await context.abort_with_status(to_status(Unauthenticated(message, reason=reason)))  # type: ignore[attr-defined]
        raise AssertionError("abort_with_status returned")  # pragma: no cover

    # No deserializer: a rejected request is never parsed.
    return grpc.unary_unary_rpc_method_handler(reject)
