"""A request id for every call, its status and latency in the metrics, and a log line for the calls that
failed on the server's side: the first and last steps of the guard (guard.py) around every handler.

The request id comes back in the trailing metadata `x-request-id` whenever it names something: the
caller's own, always; one made here, with a failure (the log line of a server-side failure carries it),
with every health call (grpc_health aborts on its own, before the last step could add one) and with
every call while DEBUG logs each. A read that sent none and succeeded gets none: nothing was logged
under it (but a rate-limited warning of a Redis fault it survived), and a made id on every answer cost
a near-cache hit 2.5% of its instructions (a new metadata value to encode and frame each time;
`make bench-instructions`).

A cache hit passes through here too, so the per-call work is small: each method's steps are built
once, not per call, and nothing is logged for a successful call unless DEBUG is on.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc

from server.logs import CALL_NUMBERS, REQUEST_ID, cached_levels, request_id
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
    """Sets the call's request id (log context; trailing metadata if the caller's); returns its start."""
    succeeded: Callable[[_Context, float], None]
    """Counts and times a call that returned (under DEBUG, logs it and returns a made id)."""
    failed: Callable[[_Context, float, BaseException], None]
    """Counts and times a call that raised (aborted, failed or left), logs the server-side ones, and
    returns a made id."""


class Observability:
    """Request ids for every call, its status and latency in the metrics, logs of server-side failures."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def observer(self, rpc: str, *, callers_ids: bool = True, ids_up_front: bool = False) -> Observer:
        """The steps observing calls of method `rpc`: its metric children resolved once, here.

        ids_up_front: a made id goes into the trailing metadata at once, for handlers that abort on
        their own (grpc_health's Check): a plain `context.abort` sends the status before the guard's
        last step could add it. The service's own errors bring it in their status (errors.to_status).

        With callers_ids, a call's request id is the one in its metadata when valid (else a new one);
        without, always a new one: for calls known to carry none (guard.GuardedService), which then
        skip decoding their metadata again (13k instructions of a near-cache hit's 389k, measured with
        `make bench-instructions`).
        """
        duration = self._metrics.rpc_duration.labels(rpc)
        requests = self._metrics.rpc_requests
        ok = requests.labels(rpc, grpc.StatusCode.OK.name)
        numbers = CALL_NUMBERS
        # A successful call's steps, in a hit's instructions (callgrind): a Python method call costs
        # 700, `ok.inc()` twice what `ok.value += 1` does, and a search through the buckets 1.4k more
        # than a comparison with the first bound, where nearly every hit lands.
        fastest, first, observe = duration.bounds[0], duration.counts, duration.observe
        debugging, debug, perf_counter = _LOGGER.isEnabledFor, logging.DEBUG, time.perf_counter
        debug_cached = cached_levels(_LOGGER)

        def begin(context: _Context) -> float:
            callers = _callers_id(context) if callers_ids else None
            if callers is None:
                number = next(numbers)
                REQUEST_ID.set(number)  # its text is made if it is ever shown
                if ids_up_front:
                    context.set_trailing_metadata(((REQUEST_ID_HEADER, f"{request_id(number)}"),))
            else:
                REQUEST_ID.set(callers)
                context.set_trailing_metadata(((REQUEST_ID_HEADER, callers),))
            return perf_counter()

        def succeeded(context: _Context, started: float) -> None:
            seconds = perf_counter() - started
            ok.value += 1
            if seconds <= fastest:
                first[0] += 1
                duration.sum += seconds
            else:
                observe(seconds)
            if debug_cached(debug) is not False and debugging(debug):
                if REQUEST_ID.get() is None:  # answered at once, before any id (guard.py)
                    REQUEST_ID.set(next(numbers))
                _LOGGER.debug("rpc ok", extra={"rpc": rpc, "code": "OK", "ms": _ms_since(started)})
                _return_made_id(context)

        def failed(context: _Context, started: float, exc: BaseException) -> None:
            if isinstance(exc, asyncio.CancelledError | GeneratorExit):  # the caller left
                code = grpc.StatusCode.CANCELLED
            else:
                # An abort has set the code; anything else reaches the caller as UNKNOWN.
                aborted = context.code() if isinstance(exc, grpc.aio.AbortError) else None
                code = aborted or grpc.StatusCode.UNKNOWN
            requests.labels(rpc, code.name).inc()
            observe(perf_counter() - started)
            _return_made_id(context)
            if code in _SERVER_SIDE:
                _LOGGER.warning(
                    "rpc failed",
                    extra={"rpc": rpc, "code": code.name, "ms": _ms_since(started)},
                    exc_info=exc if code is grpc.StatusCode.UNKNOWN else None,
                )
            elif _LOGGER.isEnabledFor(logging.DEBUG):
                _LOGGER.debug("rpc failed", extra={"rpc": rpc, "code": code.name, "ms": _ms_since(started)})

        return Observer(begin, succeeded, failed)


def _callers_id(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER and isinstance(value, str) and _VALID_REQUEST_ID.match(value):
            return value
    return None


def _return_made_id(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Add the call's id to its trailing metadata if it was made here and is not there yet (the
    caller's is there from the start, and an error's status may have brought it: errors.to_status)."""
    stored = REQUEST_ID.get()
    if not isinstance(stored, int):
        return
    trailing = context.trailing_metadata() or ()
    if all(key != REQUEST_ID_HEADER for key, _ in trailing):
        context.set_trailing_metadata((*trailing, (REQUEST_ID_HEADER, f"{request_id(stored)}")))


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
