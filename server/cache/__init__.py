"""The domain-free cache-aside engine: tiers, leases, fallback, invalidation."""

from server.cache.engine import CacheEngine
from server.cache.near import Answers
from server.cache.notify import FillNotifier
from server.cache.store import CacheUnavailable, RedisStore
from server.cache.types import (
    DatabaseSaturated,
    Family,
    Fetched,
    FlightTimeout,
    LoadTimeout,
    MissesSaturated,
    Outcome,
    RecentLoadFailure,
)

__all__ = [
    "Answers",
    "CacheEngine",
    "CacheUnavailable",
    "DatabaseSaturated",
    "Family",
    "Fetched",
    "FillNotifier",
    "FlightTimeout",
    "LoadTimeout",
    "MissesSaturated",
    "Outcome",
    "RecentLoadFailure",
    "RedisStore",
]
