"""The one wrapper around every call of the service: request id and metrics, token check, call limit.

Each part keeps its own rules in its own module (observability.py, auth.py, limits.py) and gives the
guard its per-call steps; the guard runs them around the handler in one coroutine per method, built
once. One coroutine, not one per part: on a near-cache hit each layer of coroutines costs about what a
part's own work does. The order is the parts' contract: observed first, so a refused call is counted
and carries a request id too; the token before the limit, so a call refused for its token never
takes a place.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.handlers import AnswerNow, answer_now_of, like
from server.limits import ConcurrencyLimit
from server.observability import REQUEST_ID_HEADER, Observability, Observer

_Context = grpc.aio.ServicerContext[Any, Any]
_Check = Callable[[_Context], Awaitable[None]]
Unary = Callable[[Any, _Context], Awaitable[Any]]
Stream = Callable[[Any, _Context], AsyncIterator[Any]]


class Guard:
    """Wraps handlers with observability, and where given, a token check and a call limit."""

    def __init__(
        self,
        observability: Observability,
        *,
        check_for: Callable[[str], _Check | None] | None = None,
        limit: ConcurrencyLimit | None = None,
    ) -> None:
        self._observability = observability
        self._check_for = check_for
        self._limit = limit if limit is not None else ConcurrencyLimit(limit=0)

    def generic_handler(
        self,
        name: str,
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]],
        *,
        asked: tuple[str, dict[str, grpc.RpcMethodHandler[Any, Any]]] | None = None,
    ) -> GuardedService:
        """A generic handler serving service `name`'s methods, guarded.

        Each method is guarded twice, and each call routed to one of the two by the metadata grpc
        decoded to route it: a call that sends an x-request-id to the guard that reads it again at call
        time, any other (nearly all) to the one that makes an id without decoding the metadata again
        (where read tokens are set, the token check still decodes it). With `asked` (a header and
        other handlers for the same methods), a call that sends that header is served by those,
        guarded a third time as for a call with a request id, whatever else it sends.
        """
        header, asked_handlers = asked if asked is not None else (None, {})
        return GuardedService(
            name,
            {rpc: self.wrap(rpc, handler, callers_ids=False) for rpc, handler in handlers.items()},
            {rpc: self.wrap(rpc, handler) for rpc, handler in handlers.items()},
            asked_header=header,
            asked={rpc: self.wrap(rpc, handler) for rpc, handler in asked_handlers.items()},
        )

    def wrap(
        self,
        rpc: str,
        handler: grpc.RpcMethodHandler[Any, Any],
        *,
        callers_ids: bool = True,
        ids_up_front: bool = False,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """Method `rpc`'s unary or server-streaming handler, guarded (any other kind as it is).

        Without callers_ids, for calls known to send no request id (see `generic_handler`);
        ids_up_front for handlers that abort on their own (Observability.observer).
        """
        observer = self._observability.observer(rpc, callers_ids=callers_ids, ids_up_front=ids_up_front)
        check = self._check_for(rpc) if self._check_for is not None else None
        if handler.unary_unary is not None:
            # An answer given at once needs no request id (nothing it does can log), but a caller's
            # id must come back, and a token must be checked first: then it is asked for later.
            now = answer_now_of(handler.unary_unary)
            first = check is None and not callers_ids
            guarded = _guarded_unary(handler.unary_unary, observer, check, self._limit, now, first=first)  # type: ignore[arg-type]
            return like(handler, guarded)
        if handler.unary_stream is not None and not inspect.isasyncgenfunction(handler.unary_stream):
            # A streaming handler that writes with context.write() (grpc_health's Watch) is a coroutine.
            writer: Unary = handler.unary_stream  # type: ignore[assignment]
            return like(handler, _guarded_unary(writer, observer, check, self._limit, None, first=False))
        if handler.unary_stream is not None:
            stream: Stream = handler.unary_stream  # type: ignore[assignment]
            return like(handler, _guarded_stream(stream, observer, check, self._limit))
        return handler  # client and bidirectional streams (reflection) pass as they are


class GuardedService(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # generic in grpc-stubs only
    """Routes a service's calls to their method's guarded handler: the one that makes a request id,
    or, for a call that sends one, the one that reads it; for a call that sends `asked_header`, the
    asked handler (Guard.generic_handler)."""

    def __init__(
        self,
        name: str,
        making_ids: dict[str, grpc.RpcMethodHandler[Any, Any]],
        reading_ids: dict[str, grpc.RpcMethodHandler[Any, Any]],
        *,
        asked_header: str | None = None,
        asked: dict[str, grpc.RpcMethodHandler[Any, Any]] | None = None,
    ) -> None:
        self._making_ids = {f"/{name}/{rpc}": handler for rpc, handler in making_ids.items()}
        self._reading_ids = {f"/{name}/{rpc}": handler for rpc, handler in reading_ids.items()}
        self._asked_header = asked_header
        self._asked = {f"/{name}/{rpc}": handler for rpc, handler in (asked or {}).items()}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The handler for this call, or None: not a method of this service."""
        # Runs for every call: a plain loop, as cheap as a scan of two or three entries can be.
        handlers, asked_header = self._making_ids, self._asked_header
        for key, _ in handler_call_details.invocation_metadata or ():
            if key == asked_header:
                handlers = self._asked
                break
            if key == REQUEST_ID_HEADER:  # a header asked for may follow: the scan goes on
                handlers = self._reading_ids
        return handlers.get(handler_call_details.method)


# The unary and the streaming guard run the same steps; they differ in how the handler is awaited,
# and an async generator cannot be wrapped by a coroutine (nor the hot unary path by a generator).
def _guarded_unary(
    inner: Unary,
    observer: Observer,
    check: _Check | None,
    limit: ConcurrencyLimit,
    now: AnswerNow | None,
    *,
    first: bool,
) -> Unary:
    """inner, guarded, `now`'s answer (where given) served instead when it has one. Asked `first`, a
    call it answers is only counted and timed: it has no request id (nothing it does can log) and takes
    no place under the limit (it awaits nothing, so it is never in flight beside another); 1% of a held
    near-cache answer's instructions. Otherwise it is asked after the token check and the limit."""
    begin, succeeded, failed = observer
    perf_counter = time.perf_counter
    early = now if first else None
    late = None if first else now

    async def guarded(request: Any, context: _Context) -> Any:
        if early is not None:
            started = perf_counter()
            try:
                answered = early(request, context)
            except BaseException as exc:
                begin(context)  # the id the failure's log line and metadata carry
                failed(context, started, exc)
                raise
            if answered is not None:
                succeeded(context, started)
                return answered
        started = begin(context)
        try:
            if check is not None:
                await check(context)
            if limit.active >= limit.bound:
                await limit.refuse(context)
            limit.active += 1
            try:
                response = late(request, context) if late is not None else None
                if response is None:
                    response = await inner(request, context)
            finally:
                limit.active -= 1
        except BaseException as exc:
            failed(context, started, exc)
            raise
        succeeded(context, started)
        return response

    return guarded


def _guarded_stream(
    inner: Stream, observer: Observer, check: _Check | None, limit: ConcurrencyLimit
) -> Stream:
    begin, succeeded, failed = observer

    async def guarded(request: Any, context: _Context) -> AsyncIterator[Any]:
        started = begin(context)
        try:
            if check is not None:
                await check(context)
            if limit.active >= limit.bound:
                await limit.refuse(context)
            limit.active += 1
            try:
                async for message in inner(request, context):
                    yield message
            finally:
                limit.active -= 1
        except BaseException as exc:
            failed(context, started, exc)
            raise
        succeeded(context, started)

    return guarded
