"""Cache warming: the seed's popular posts and recently active users, by RPC, at startup, on an interval."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from server.cache import CacheEngine, CacheUnavailable, Family
from server.config import Settings
from server.domain.catalog import Catalog
from server.domain.queries import Queries
from server.errors import ServiceError

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WarmResult:
    """How many posts and users were written to the cache."""

    posts: int
    users: int


@dataclass(slots=True)
class WarmProgress:
    """How far a warm has come; reported after each batch."""

    posts_total: int = 0
    users_total: int = 0
    posts_done: int = 0
    users_done: int = 0
    posts_warmed: int = 0
    users_warmed: int = 0
    done: bool = False


class Warms:
    """What runs a warm: a Warmer in this process, or a WarmWorker beside it.

    observe hears of each warm: its result (None when it failed) and how long it took.
    """

    def __init__(self, observe: Callable[[WarmResult | None, float], None] | None) -> None:
        self._observe = observe

    async def warm(
        self,
        *,
        posts: int | None = None,
        users: int | None = None,
        active_within_s: float | None = None,
        on_progress: Callable[[WarmProgress], None] | None = None,
    ) -> WarmResult:
        """Warm now; None means the configured default. Raises CacheUnavailable if Redis is down."""
        started = time.monotonic()
        try:
            result = await self._warm(posts, users, active_within_s, on_progress)
        except BaseException:
            if self._observe is not None:
                self._observe(None, time.monotonic() - started)
            raise
        if self._observe is not None:
            self._observe(result, time.monotonic() - started)
        return result

    async def _warm(
        self,
        posts: int | None,
        users: int | None,
        active_within_s: float | None,
        on_progress: Callable[[WarmProgress], None] | None,
    ) -> WarmResult:
        raise NotImplementedError

    async def close(self) -> None:
        """Release what warming holds beyond the cache (the warm worker's process); nothing here."""


async def warm_logged(warmer: Warms) -> None:
    """Warm with the defaults, logging instead of raising: for startup and the interval."""
    try:
        result = await warmer.warm()
    except (CacheUnavailable, ServiceError) as exc:
        _LOGGER.warning("cache warming skipped: %s", exc)
        return
    except Exception:  # a bug must not end warming on the interval for good
        _LOGGER.exception("cache warming failed")
        return
    _LOGGER.info("cache warmed: %d posts, %d users", result.posts, result.users)


async def warm_every(warmer: Warms, interval_s: float) -> None:
    """Warm on an interval until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        await warm_logged(warmer)


class _Pacer:
    """Spaces batches so that all warming together stays under a rate of keys per second."""

    def __init__(self, keys_per_s: float) -> None:
        self._seconds_per_key = 1 / keys_per_s
        self._next = 0.0

    async def wait_for(self, keys: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._next)
        self._next = start + keys * self._seconds_per_key
        if start > now:
            await asyncio.sleep(start - now)


class Warmer(Warms):
    """Loads what the seed's queries select and writes it with each family's tier TTL.

    Warming goes in batches through the same leases as any miss, at most `concurrency` batches at
    once and `rate_per_s` keys a second across every warm in the process, so it never starves live
    reads of the database, Redis or the event loop.
    """

    def __init__(
        self,
        engine: CacheEngine,
        catalog: Catalog,
        queries: Queries,
        *,
        default_posts: int,
        default_users: int,
        default_active_within_s: float,
        batch_size: int = 50,
        concurrency: int = 2,
        rate_per_s: float = 2000,
        observe: Callable[[WarmResult | None, float], None] | None = None,
    ) -> None:
        super().__init__(observe)
        self._engine = engine
        self._catalog = catalog
        self._queries = queries
        self._default_posts = default_posts
        self._default_users = default_users
        self._default_active_within_s = default_active_within_s
        self._batch_size = batch_size
        self._slots = asyncio.Semaphore(concurrency)
        self._pacer = _Pacer(rate_per_s)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        engine: CacheEngine,
        catalog: Catalog,
        queries: Queries,
        *,
        observe: Callable[[WarmResult | None, float], None] | None = None,
    ) -> Warmer:
        """A warmer with the CACHEASIDE_WARM_* defaults and bounds."""
        return cls(
            engine,
            catalog,
            queries,
            default_posts=settings.warm_posts,
            default_users=settings.warm_users,
            default_active_within_s=settings.warm_active_within_s,
            batch_size=settings.warm_batch,
            concurrency=settings.warm_concurrency,
            rate_per_s=settings.warm_rate_per_s,
            observe=observe,
        )

    async def _warm(
        self,
        posts: int | None,
        users: int | None,
        active_within_s: float | None,
        on_progress: Callable[[WarmProgress], None] | None,
    ) -> WarmResult:
        within = timedelta(seconds=active_within_s or self._default_active_within_s)
        popular = await self._queries.popular_post_ids(posts or self._default_posts)
        active = await self._queries.active_user_ids(users or self._default_users, datetime.now(UTC) - within)
        progress = WarmProgress(posts_total=len(popular), users_total=len(active))
        report = on_progress or (lambda _progress: None)
        report(dataclasses.replace(progress))

        async def batch(family: Family, ids: list[str], is_post: bool) -> None:
            async with self._slots:
                await self._pacer.wait_for(len(ids))
                # Warming waits for a database load slot where a live miss would be refused.
                written = await self._engine.refresh(family, ids, wait_for_slot=True)
            if is_post:
                progress.posts_done += len(ids)
                progress.posts_warmed += written
            else:
                progress.users_done += len(ids)
                progress.users_warmed += written
            report(dataclasses.replace(progress))

        size = self._batch_size
        try:
            async with asyncio.TaskGroup() as group:  # one failed batch stops the others
                for i in range(0, len(popular), size):
                    group.create_task(batch(self._catalog.post, popular[i : i + size], True))
                for i in range(0, len(active), size):
                    group.create_task(batch(self._catalog.user, active[i : i + size], False))
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        progress.done = True
        report(dataclasses.replace(progress))
        return WarmResult(progress.posts_warmed, progress.users_warmed)
