"""Cache warming: the seed's popular posts and recently active users, by RPC, at startup, on an interval."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from server.cache import CacheEngine, CacheUnavailable
from server.domain.catalog import Catalog
from server.domain.queries import Queries
from server.errors import DatabaseUnavailable

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WarmResult:
    """How many posts and users were written to the cache."""

    posts: int
    users: int


class Warmer:
    """Loads what the seed's queries select and writes it with each family's tier TTL."""

    def __init__(
        self,
        engine: CacheEngine,
        catalog: Catalog,
        queries: Queries,
        *,
        default_posts: int,
        default_users: int,
        default_active_within_s: float,
        observe: Callable[[WarmResult | None, float], None] | None = None,
    ) -> None:
        self._engine = engine
        self._catalog = catalog
        self._queries = queries
        self._default_posts = default_posts
        self._default_users = default_users
        self._default_active_within_s = default_active_within_s
        self._observe = observe

    async def warm(
        self, *, posts: int | None = None, users: int | None = None, active_within_s: float | None = None
    ) -> WarmResult:
        """Warm now; None means the configured default. Raises CacheUnavailable if Redis is down."""
        started = time.monotonic()
        try:
            result = await self._warm(posts, users, active_within_s)
        except BaseException:
            if self._observe is not None:
                self._observe(None, time.monotonic() - started)
            raise
        if self._observe is not None:
            self._observe(result, time.monotonic() - started)
        return result

    async def _warm(self, posts: int | None, users: int | None, active_within_s: float | None) -> WarmResult:
        within = timedelta(seconds=active_within_s or self._default_active_within_s)
        popular = await self._queries.popular_post_ids(posts or self._default_posts)
        active = await self._queries.active_user_ids(users or self._default_users, datetime.now(UTC) - within)
        posts_warmed = await self._engine.refresh(self._catalog.post, popular) if popular else 0
        users_warmed = await self._engine.refresh(self._catalog.user, active) if active else 0
        return WarmResult(posts_warmed, users_warmed)

    async def warm_logged(self) -> None:
        """Warm with the defaults, logging instead of raising: for startup and the interval."""
        try:
            result = await self.warm()
        except (CacheUnavailable, DatabaseUnavailable) as exc:
            _LOGGER.warning("cache warming skipped: %s", exc)
            return
        _LOGGER.info("cache warmed: %d posts, %d users", result.posts, result.users)

    async def run_every(self, interval_s: float) -> None:
        """Warm on an interval until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await self.warm_logged()
