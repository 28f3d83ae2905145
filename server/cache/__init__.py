"""The domain-free cache-aside engine: tiers, fallback, invalidation."""

from server.cache.engine import CacheEngine, Family, Fetched, LoadTimeout, Outcome
from server.cache.store import CacheUnavailable, RedisStore

__all__ = ["CacheEngine", "CacheUnavailable", "Family", "Fetched", "LoadTimeout", "Outcome", "RedisStore"]
