"""Build the server from settings (construction), then serve it until a signal (serving)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from server import db
from server.cache import CacheEngine, FillNotifier, RedisStore
from server.config import Settings
from server.domain.catalog import build_catalog
from server.domain.keys import key_prefix
from server.domain.queries import Queries
from server.embedded_redis import EmbeddedRedis
from server.invalidator import OutboxInvalidator
from server.service import SERVICE_NAME, CacheService
from server.warming import Warmer

_LOGGER = logging.getLogger(__name__)


@dataclass
class App:
    """A built, bound server and everything it owns; `start` serves, `stop` releases it all."""

    server: grpc.aio.Server
    port: int
    engine: CacheEngine
    warmer: Warmer
    database: AsyncEngine
    settings: Settings
    invalidator: OutboxInvalidator | None = None
    startup_warm: asyncio.Task[None] | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def start(self) -> None:
        """Serve, and warm at startup and on the interval if the settings ask."""
        if self.engine.notifier is not None:
            self.engine.notifier.start()
        await self.server.start()
        if self.invalidator is not None:
            self._tasks.append(asyncio.create_task(self.invalidator.run()))
        if self.settings.warm_on_start:
            # In the background: the port is open and serving while warming runs.
            self.startup_warm = asyncio.create_task(self.warmer.warm_logged())
            self._tasks.append(self.startup_warm)
        if self.settings.warm_interval_s:
            self._tasks.append(asyncio.create_task(self.warmer.run_every(self.settings.warm_interval_s)))

    async def stop(self, grace_s: float | None = None) -> None:
        """Let in-flight calls finish for up to grace_s, then release Redis and the database."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self.server.stop(grace_s)
        await self.engine.close(grace_s)
        if self.engine.notifier is not None:
            await self.engine.notifier.close()
        await self.engine.store.close()
        await self.database.dispose()


def create_app(settings: Settings, *, redis_url: str | None = None) -> App:
    """Build the whole service and bind its port; nothing is served until `start`."""
    redis_url = redis_url or settings.redis_url
    store = RedisStore.connect(
        redis_url,
        prefix=key_prefix(settings.key_prefix),
        timeout_ms=settings.redis_timeout_ms,
        max_connections=settings.redis_max_connections,
        breaker_failures=settings.redis_breaker_failures,
        breaker_cooldown_ms=settings.redis_breaker_cooldown_ms,
    )
    notifier = (
        FillNotifier.connect(
            redis_url,
            channel=store.channel,
            prefix=store.prefix,
            connect_timeout_ms=settings.redis_timeout_ms,
        )
        if settings.leases
        else None
    )
    engine = CacheEngine(
        store,
        notifier=notifier,
        load_timeout_s=settings.db_timeout_ms / 1000,
        leases=settings.leases,
        lease_ttl_ms=settings.lease_ttl_ms,
        negative_ttl_s=settings.ttl_negative_s,
        max_stale_s=settings.max_stale_s,
        jitter_pct=settings.ttl_jitter_pct,
        error_backoff_ms=settings.db_error_backoff_ms,
    )
    database = db.create_engine(settings)
    queries = Queries(database)
    catalog = build_catalog(settings, queries)
    warmer = Warmer(
        engine,
        catalog,
        queries,
        default_posts=settings.warm_posts,
        default_users=settings.warm_users,
        default_active_within_s=settings.warm_active_within_s,
    )
    server = grpc.aio.server()
    # Registered methods skip grpcio's generic lookup per call; grpc-stubs predates the API.
    server.add_registered_method_handlers(  # type: ignore[attr-defined]
        SERVICE_NAME, CacheService(engine, catalog, warmer).method_handlers()
    )
    port = server.add_insecure_port(settings.listen)
    if port == 0:
        raise RuntimeError(f"could not listen on {settings.listen}")
    invalidator = None
    if settings.auto_invalidate and not db.is_sqlite(settings.database_url):
        invalidator = OutboxInvalidator(
            db.asyncpg_dsn(settings.database_url),
            schema=settings.database_schema or "public",
            engine=engine,
            poll_interval_s=settings.outbox_poll_ms / 1000,
            batch_size=settings.outbox_batch,
        )
    return App(
        server=server,
        port=port,
        engine=engine,
        warmer=warmer,
        database=database,
        settings=settings,
        invalidator=invalidator,
    )


async def serve(settings: Settings, *, demo: bool = False) -> None:
    """Serve until SIGINT or SIGTERM, with a private Redis when none is configured."""
    with contextlib.ExitStack() as stack:
        redis_url = settings.redis_url
        if not redis_url:
            redis_url = stack.enter_context(EmbeddedRedis()).url
            _LOGGER.info("no CACHEASIDE_REDIS_URL set: started a private redis-server at %s", redis_url)
        else:
            _LOGGER.info("using redis at %s", _without_password(redis_url))
        if demo:
            from server.demo import prepare_demo_database

            await prepare_demo_database(settings)
        app = create_app(settings, redis_url=redis_url)
        await app.start()
        _LOGGER.info(
            "cacheaside serving on port %d (database %s)", app.port, _without_password(settings.database_url)
        )
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await stopping.wait()
        _LOGGER.info("shutting down: in-flight calls get %.1fs", settings.shutdown_grace_s)
        await app.stop()


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
