"""The cache engine and the domain over it, built from settings: shared by the server and the warm worker."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from server import db
from server.cache import CacheEngine, FillNotifier, RedisStore
from server.cache.near import NearCache
from server.config import Settings
from server.domain.catalog import Catalog, build_catalog, families
from server.domain.keys import key_prefix
from server.domain.queries import Queries


@dataclass(frozen=True, slots=True)
class Cache:
    """An engine over Redis, and the database, queries and key families it loads through."""

    engine: CacheEngine
    database: AsyncEngine
    queries: Queries
    catalog: Catalog


def build_cache(settings: Settings, redis_url: str, *, events: bool = True) -> Cache:
    """Connect nothing yet; every pool opens on first use.

    events=False builds an engine that hears no cache events (no pub/sub connection, no near cache):
    for a process that only writes, such as the warm worker.
    """
    store = RedisStore.connect(
        redis_url,
        prefix=key_prefix(settings.key_prefix),
        timeout_ms=settings.redis_timeout_ms,
        max_connections=settings.redis_max_connections,
        breaker_failures=settings.redis_breaker_failures,
        breaker_cooldown_ms=settings.redis_breaker_cooldown_ms,
        cluster=settings.redis_cluster,
    )
    notifier = (
        FillNotifier.connect(
            redis_url,
            channel=store.channel,
            layout=store.layout,
            connect_timeout_ms=settings.redis_timeout_ms,
            sequences=store.event_sequences,
        )
        if settings.leases and events
        else None
    )
    near = (
        NearCache(
            max_entries=settings.near_cache_entries,
            ttl_s=settings.near_cache_ttl_ms / 1000,
            answer_bytes=settings.near_cache_answer_bytes,
        )
        if settings.near_cache_entries and events
        else None
    )
    engine = CacheEngine(
        store,
        notifier=notifier,
        near=near,
        load_timeout_s=settings.db_timeout_ms / 1000,
        leases=settings.leases,
        lease_ttl_ms=settings.lease_ttl_ms,
        negative_ttl_s=settings.ttl_negative_s,
        max_stale_s=settings.max_stale_s,
        jitter_pct=settings.ttl_jitter_pct,
        error_backoff_ms=settings.db_error_backoff_ms,
        max_concurrent_loads=settings.max_concurrent_loads,
        load_queue_ms=settings.load_queue_ms,
        max_waiting_misses=settings.max_waiting_misses,
    )
    database = db.create_engine(settings, reads_only=True)  # the service only reads
    queries = Queries(database)
    catalog = build_catalog(settings, queries)
    for family in families(catalog):
        store.layout.register(family.key_prefix, family.tags)
    return Cache(engine=engine, database=database, queries=queries, catalog=catalog)


async def close_cache(cache: Cache, grace_s: float = 0) -> None:
    """Let loads in flight finish for up to grace_s, then close Redis and the database."""
    await cache.engine.close(grace_s)
    if cache.engine.notifier is not None:
        await cache.engine.notifier.close()
    await cache.engine.store.close()
    await cache.database.dispose()
