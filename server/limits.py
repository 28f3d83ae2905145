"""A bound on the service's calls in progress: past it, RESOURCE_EXHAUSTED at once, before any work.

grpc.aio's own `maximum_concurrent_rpcs` answers RESOURCE_EXHAUSTED too, but it counts every method,
so a saturated server would fail its health checks (and a liveness probe would restart it), and its
status carries no ErrorInfo. This wraps only the cache service's handlers: health and reflection
always answer.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

import grpc

from server.errors import Overloaded, to_status

_Context = grpc.aio.ServicerContext[Any, Any]


class ConcurrencyLimit:
    """At most `limit` calls of the methods it guards run at once in this process; 0 means no limit.

    The guard (guard.py) refuses a call when `active` has reached `bound` (`limit`, or infinity for
    none), and counts `active` up for the time a call runs.
    """

    def __init__(self, *, limit: int) -> None:
        self.bound = limit or math.inf  # what `active` is compared with: no limit never refuses
        self.active = 0
        self._message = (
            f"this server is already handling {limit} calls (CACHEASIDE_MAX_CONCURRENT_RPCS); "
            "retry with backoff, or call another instance"
        )

    async def refuse(self, context: _Context) -> NoReturn:
        """Answer RESOURCE_EXHAUSTED: the guard calls this when `active` has reached `bound`."""
        # Built per refusal: the status carries this call's request id.
        # grpc-stubs predates abort_with_status on grpc.aio contexts; it exists since grpcio 1.38.
        await context.abort_with_status(to_status(Overloaded(self._message)))  # type: ignore[attr-defined]
        raise AssertionError("abort_with_status returned")  # pragma: no cover
