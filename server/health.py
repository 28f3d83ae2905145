"""grpc.health.v1 for the whole server ("") and for the cache service, driven by a background checker.

The database decides health: without it no miss can be answered, so the server is NOT_SERVING and a
load balancer should send calls elsewhere. Redis does not: without it reads still work (bypassing the
cache), so a Redis outage only shows in the metrics and the logs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from grpc_health.v1 import health, health_pb2
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from server.metrics import Metrics

_LOGGER = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# SERVING whenever the server answers at all: for a liveness probe, which must not restart every pod
# while the database is down (readiness already takes them out of the load balancer).
LIVENESS = "liveness"


class HealthChecker:
    """Checks the database and Redis every interval and publishes the result to the health service."""

    def __init__(
        self,
        *,
        services: tuple[str, ...],
        database: AsyncEngine,
        redis_url: str,
        timeout_s: float,
        redis_timeout_s: float,
        metrics: Metrics,
    ) -> None:
        # grpc_health's stubs omit its asyncio servicer.
        self.servicer: Any = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._services = ("", *services)
        self._database = database
        # Its own one-connection client: the check must not queue behind, or count against, the cache's.
        self._redis = Redis.from_url(
            redis_url,
            socket_timeout=redis_timeout_s,
            socket_connect_timeout=redis_timeout_s,
            retry=Retry(NoBackoff(), 0),
            max_connections=1,
        )
        self._timeout_s = timeout_s
        self._metrics = metrics
        self.database_ok: bool | None = None
        self.redis_ok: bool | None = None

    async def check(self) -> bool:
        """Check both now, publish the status, log changes; returns whether the database answered."""
        database_error, redis_error = await asyncio.gather(self._check_database(), self._check_redis())
        database_ok = database_error is None
        redis_ok = redis_error is None
        self._metrics.database_up.set(int(database_ok))
        self._metrics.redis_up.set(int(redis_ok))
        if database_ok != self.database_ok:
            if database_ok:
                _LOGGER.info("database reachable: health SERVING")
            else:
                _LOGGER.warning("database unreachable: health NOT_SERVING", extra={"error": database_error})
        if redis_ok != self.redis_ok:
            if redis_ok:
                _LOGGER.info("redis reachable")
            else:
                _LOGGER.warning(
                    "redis unreachable: reads bypass the cache; health stays SERVING",
                    extra={"error": redis_error},
                )
        self.database_ok, self.redis_ok = database_ok, redis_ok
        status = SERVING if database_ok else NOT_SERVING
        for service in self._services:
            await self.servicer.set(service, status)
        await self.servicer.set(LIVENESS, SERVING)
        return database_ok

    async def run_every(self, interval_s: float) -> None:
        """Check on an interval until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await self.check()

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for good: the server is about to stop."""
        await self.servicer.enter_graceful_shutdown()

    async def close(self) -> None:
        """Release the check's Redis connection."""
        await self._redis.aclose()

    async def _check_database(self) -> str | None:
        try:
            async with asyncio.timeout(self._timeout_s), self._database.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception as exc:  # any failure means "not reachable"; the message goes to the log
            return _describe(exc)
        return None

    async def _check_redis(self) -> str | None:
        try:
            await self._redis.ping()
        except Exception as exc:  # as above
            return _describe(exc)
        return None


def _describe(exc: BaseException) -> str:
    text_ = str(getattr(exc, "orig", None) or exc) or type(exc).__name__
    return text_.splitlines()[0][:200]
