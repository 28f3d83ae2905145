"""A bound on the service's calls in progress: past it, RESOURCE_EXHAUSTED at once, before any work.

grpc.aio's own `maximum_concurrent_rpcs` answers RESOURCE_EXHAUSTED too, but it counts every method,
so a saturated server would fail its health checks (and a liveness probe would restart it), and its
status carries no ErrorInfo. This wraps only the cache service's handlers: health and reflection
always answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc

from server.errors import Overloaded, to_status
from server.handlers import like

_Context = grpc.aio.ServicerContext[Any, Any]


class ConcurrencyLimit:
    """Lets at most `limit` calls of the methods it wraps run at once in this process; 0 means no limit."""

    def __init__(self, *, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._message = (
            f"this server is already handling {limit} calls (CACHEASIDE_MAX_CONCURRENT_RPCS); "
            "retry with backoff, or call another instance"
        )

    def wrap(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler, counted against the limit (no limit: the handler itself)."""
        if not self.limit:
            return handler
        if handler.unary_stream is not None:
            stream: Callable[[Any, _Context], AsyncIterator[Any]] = handler.unary_stream  # type: ignore[assignment]

            async def limited_stream(request: Any, context: _Context) -> AsyncIterator[Any]:
                if self.active >= self.limit:
                    await self._refuse(context)
                self.active += 1
                try:
                    async for message in stream(request, context):
                        yield message
                finally:
                    self.active -= 1

            return like(handler, limited_stream)
        if handler.unary_unary is None:
            return handler  # the service has unary and server-streaming methods only
        unary: Callable[[Any, _Context], Awaitable[Any]] = handler.unary_unary  # type: ignore[assignment]

        async def limited(request: Any, context: _Context) -> Any:
            if self.active >= self.limit:
                await self._refuse(context)
            self.active += 1
            try:
                return await unary(request, context)
            finally:
                self.active -= 1

        return like(handler, limited)

    async def _refuse(self, context: _Context) -> NoReturn:
        # Built per refusal: the status carries this call's request id.
        # grpc-stubs predates abort_with_status on grpc.aio contexts; it exists since grpcio 1.38.
        await context.abort_with_status(to_status(Overloaded(self._message)))  # type: ignore[attr-defined]
        raise AssertionError("abort_with_status returned")  # pragma: no cover
