"""The outermost wrapper of the service's handlers: a request id for every call, its status and latency in
the metrics, and a log line for the calls that failed on the server's side.

A cache hit passes through here too, so the per-call work is small: the wrapped handler is built once
per method, not per call, and nothing is logged for a successful call unless DEBUG is on.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.logs import REQUEST_ID
from server.metrics import Metrics

_LOGGER = logging.getLogger(__name__)
REQUEST_ID_HEADER = "x-request-id"
# A caller's id is echoed into logs and metadata: accept only short, printable, unambiguous ids.
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")
# Failures that say the server (or what it depends on) is in trouble, not that the caller erred.
_SERVER_SIDE = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.DATA_LOSS,
    }
)

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class Observability:
    """Sets the request id, counts and times every unary call, and logs server-side failures."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def wrap(self, rpc: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """The unary handler of method `rpc`, observed (streams as they are)."""
        if handler.unary_unary is None:
            return handler
        inner: Behavior = handler.unary_unary  # type: ignore[assignment]  # checked by the caller
        duration = self._metrics.rpc_duration.labels(rpc)
        requests = self._metrics.rpc_requests
        ok = requests.labels(rpc, grpc.StatusCode.OK.name)

        async def observed(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            request_id = _request_id(context)
            REQUEST_ID.set(request_id)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
            started = time.perf_counter()
            try:
                response = await inner(request, context)
            except asyncio.CancelledError:
                _finished(rpc, grpc.StatusCode.CANCELLED, started)
                raise
            except BaseException as exc:
                # An abort has set the code; anything else reaches the caller as UNKNOWN.
                code = context.code() if isinstance(exc, grpc.aio.AbortError) else None
                _finished(rpc, code or grpc.StatusCode.UNKNOWN, started, exc)
                raise
            ok.inc()
            duration.observe(time.perf_counter() - started)
            if _LOGGER.isEnabledFor(logging.DEBUG):
                _LOGGER.debug("rpc ok", extra={"rpc": rpc, "code": "OK", "ms": _ms_since(started)})
            return response

        def _finished(
            rpc: str, code: grpc.StatusCode, started: float, exc: BaseException | None = None
        ) -> None:
            requests.labels(rpc, code.name).inc()
            duration.observe(time.perf_counter() - started)
            if code in _SERVER_SIDE:
                _LOGGER.warning(
                    "rpc failed",
                    extra={"rpc": rpc, "code": code.name, "ms": _ms_since(started)},
                    exc_info=exc if code is grpc.StatusCode.UNKNOWN else None,
                )
            elif _LOGGER.isEnabledFor(logging.DEBUG):
                _LOGGER.debug("rpc failed", extra={"rpc": rpc, "code": code.name, "ms": _ms_since(started)})

        return grpc.unary_unary_rpc_method_handler(
            observed,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _VALID_REQUEST_ID.match(value):
            return value
    # 128 random bits from the process's Mersenne Twister (seeded from os.urandom, and again in a forked
    # child): as unique as a uuid4, without a system call and a UUID object on every cache hit.
    return f"{random.getrandbits(128):032x}"


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
