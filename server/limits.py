"""A bound on the service's calls in progress: past it, RESOURCE_EXHAUSTED at once, before any work.

grpc.aio's own `maximum_concurrent_rpcs` answers RESOURCE_EXHAUSTED too, but it counts every method,
so a saturated server would fail its health checks (and a liveness probe would restart it), and its
status carries no ErrorInfo. This interceptor counts only the cache service's calls: health and
reflection always answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from server.errors import Overloaded, to_status

if TYPE_CHECKING:  # generic in grpc-stubs only
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor

_Context = grpc.aio.ServicerContext[Any, Any]


class ConcurrencyLimitInterceptor(_Interceptor):
    """Lets at most `limit` calls of one service run at once in this process; 0 means no limit."""

    def __init__(self, *, service: str, limit: int) -> None:
        self._prefix = f"/{service}/"
        self.limit = limit
        self.active = 0
        self._message = (
            f"this server is already handling {limit} calls (CACHEASIDE_MAX_CONCURRENT_RPCS); "
            "retry with backoff, or call another instance"
        )
        # id of the handler -> (handler, wrapped): the handler is kept so its id stays unique.
        self._wrapped: dict[int, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not self.limit or not method.startswith(self._prefix):
            return handler
        cached = self._wrapped.get(id(handler))
        if cached is None:
            cached = self._wrapped[id(handler)] = (handler, self._wrap(handler))
        return cached[1]

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
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

            return grpc.unary_stream_rpc_method_handler(
                limited_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
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

        return grpc.unary_unary_rpc_method_handler(
            limited,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _refuse(self, context: _Context) -> NoReturn:
        # Built per refusal: the status carries this call's request id.
        # grpc-stubs predates abort_with_status on grpc.aio contexts; it exists since grpcio 1.38.
        await context.abort_with_status(to_status(Overloaded(self._message)))  # type: ignore[attr-defined]
        raise AssertionError("abort_with_status returned")  # pragma: no cover
