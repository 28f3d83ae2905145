"""A request id for every call, its status and latency in the metrics, and a log line for the calls that
failed on the server's side: the first and last steps of the guard (guard.py) around every handler.

A cache hit passes through here too, so the per-call work is small: each method's steps are built
once, not per call, and nothing is logged for a successful call unless DEBUG is on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any, NamedTuple

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

_Context = grpc.aio.ServicerContext[Any, Any]


class Observer(NamedTuple):
    """One method's per-call steps, run by the guard around its handler (guard.py)."""

    begin: Callable[[_Context], float]
    """Sets the call's request id (log context, trailing metadata); returns its start time."""
    succeeded: Callable[[float], None]
    """Counts and times a call that returned."""
    failed: Callable[[_Context, float, BaseException], None]
    """Counts and times a call that raised (aborted, failed or left), and logs the server-side ones."""


class Observability:
    """Request ids for every call, its status and latency in the metrics, logs of server-side failures."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._ids = RequestIds()

    def observer(self, rpc: str, *, callers_ids: bool = True) -> Observer:
        """The steps observing calls of method `rpc`: its metric children resolved once, here.

        With callers_ids, a call's request id is the one in its metadata when valid (else a new one);
        without, always a new one: for calls known to carry none (guard.GuardedService), which then
        skip decoding their metadata again (13k instructions of a near-cache hit's 389k, measured with
        `make bench-instructions`).
        """
        duration = self._metrics.rpc_duration.labels(rpc)
        requests = self._metrics.rpc_requests
        ok = requests.labels(rpc, grpc.StatusCode.OK.name)
        made = self._ids.new

        def begin(context: _Context) -> float:
            request_id = _request_id(context, made) if callers_ids else made()
            REQUEST_ID.set(request_id)
            context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
            return time.perf_counter()

        def succeeded(started: float) -> None:
            ok.inc()
            duration.observe(time.perf_counter() - started)
            if _LOGGER.isEnabledFor(logging.DEBUG):
                _LOGGER.debug("rpc ok", extra={"rpc": rpc, "code": "OK", "ms": _ms_since(started)})

        def failed(context: _Context, started: float, exc: BaseException) -> None:
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):  # the caller left
                code = grpc.StatusCode.CANCELLED
            else:
                # An abort has set the code; anything else reaches the caller as UNKNOWN.
                aborted = context.code() if isinstance(exc, grpc.aio.AbortError) else None
                code = aborted or grpc.StatusCode.UNKNOWN
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

        return Observer(begin, succeeded, failed)


class RequestIds:
    """Request ids for calls that bring none: 16 random hex digits per server, then a call number.

    One per Observability, so one per server process (workers are fresh interpreters, and nothing
    forks after startup). Unique across processes (64 random bits each, from os.urandom) and within
    one (the count), for a third of the cost of a uuid4 or 128 random bits formatted on every call.
    An id says which process answered and how many calls without an id it had made up before: ids
    are for correlating logs, not secrets, and callers who want opaque ones send their own.
    """

    def __init__(self) -> None:
        self._prefix = f"{secrets.token_hex(8)}-"
        self._count = itertools.count(1)

    def new(self) -> str:
        """The next id: `3f9c0a7e15d2b864-1`, `3f9c0a7e15d2b864-2`, ..."""
        return f"{self._prefix}{next(self._count)}"


def _request_id(context: grpc.aio.ServicerContext[Any, Any], made: Callable[[], str]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _VALID_REQUEST_ID.match(value):
            return value
    return made()


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
