"""Bearer tokens: Invalidate and Warm need the admin token when one is set; reads need the read token
(or the admin token) when one is set. Health and reflection stay open, for probes.

Tokens are compared in constant time and never logged; a rejection says what to send, not what was sent.
"""

from __future__ import annotations

import functools
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NoReturn

import grpc

from server.errors import Unauthenticated, to_status

_LOGGER = logging.getLogger(__name__)
_SCHEME = "bearer "
ADMIN_METHODS = frozenset({"Invalidate", "Warm", "WarmWithProgress"})

_Context = grpc.aio.ServicerContext[Any, Any]


class TokenCheck:
    """Checks the `authorization: Bearer <token>` metadata of the service's calls."""

    def __init__(self, *, admin_token: str, read_token: str) -> None:
        self._admin = [admin_token.encode()] if admin_token else []
        # The admin token may read too: an operator should not need two tokens.
        self._read = [read_token.encode(), *self._admin] if read_token else []

    def check_for(self, rpc: str) -> Callable[[_Context], Awaitable[None]] | None:
        """The check a call of method `rpc` must pass (it aborts with UNAUTHENTICATED), or None: no
        token is set for it."""
        accepted = self._admin if rpc in ADMIN_METHODS else self._read
        if not accepted:
            return None
        return functools.partial(_check, accepted=accepted)


async def _check(context: _Context, *, accepted: list[bytes]) -> None:
    token = _bearer(context.invocation_metadata() or ())
    if token is None:
        await _reject(context, "MISSING_TOKEN")
    # Compare with every accepted token, so the time taken does not say which one nearly matched.
    matches = [hmac.compare_digest(token, candidate) for candidate in accepted]
    if not any(matches):
        await _reject(context, "INVALID_TOKEN")


def _bearer(metadata: Iterable[tuple[str, str | bytes]]) -> bytes | None:
    # Exactly one authorization entry: with several, which one a proxy or a client meant is a guess,
    # and picking whichever is valid would let a forged header ride along with a real one.
    values = [value for key, value in metadata if key == "authorization"]
    if len(values) != 1:
        return b"" if values else None  # b"": present but unusable, so INVALID_TOKEN
    value = values[0]
    if isinstance(value, str) and value[: len(_SCHEME)].lower() == _SCHEME:
        # Only HTTP's optional whitespace (space, tab): str.strip() would also drop control
        # characters such as \x1c, and accept a token the caller never had.
        return value[len(_SCHEME) :].strip(" \t").encode()
    return None


_MESSAGES = {
    "MISSING_TOKEN": "this call needs metadata 'authorization: Bearer <token>'",
    "INVALID_TOKEN": "the bearer token is not valid for this call",
}


async def _reject(context: _Context, reason: str) -> NoReturn:
    message = _MESSAGES[reason]
    _LOGGER.warning("call rejected: %s", message, extra={"reason": reason, "peer": context.peer()})
    await context.abort_with_status(to_status(Unauthenticated(message, reason=reason)))  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")  # pragma: no cover
