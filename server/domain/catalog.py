"""The key families the service caches: key, tier, TTL, tags and loader of each."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from server.cache import Family
from server.cache.types import Loader
from server.config import Settings
from server.domain import keys
from server.domain.queries import Queries


@dataclass(frozen=True, slots=True)
class Catalog:
    """Every key family, built from the settings' tiers and the loaders."""

    user: Family
    user_profile: Family
    user_settings: Family
    post: Family
    trending: Family
    archived: Family
    posts_by_author: Family
    comments_by_author: Family


def families(catalog: Catalog) -> list[Family]:
    """Every family of the catalog."""
    return [getattr(catalog, field.name) for field in dataclasses.fields(catalog)]


def with_load_reports(catalog: Catalog, report: Callable[[str, bool, float], None]) -> Catalog:
    """The same catalog, each load reported as (family, ok, seconds): to metrics, or across a pipe.

    A load the engine's timeout cancels is reported too, as failed.
    """
    changes = {
        field.name: dataclasses.replace(family, load=_reporting(family.name, family.load, report))
        for field, family in zip(dataclasses.fields(catalog), families(catalog), strict=True)
    }
    return dataclasses.replace(catalog, **changes)


def _reporting(family: str, load: Loader, report: Callable[[str, bool, float], None]) -> Loader:
    async def reported(ids: Sequence[str]) -> Mapping[str, bytes]:
        started, ok = time.perf_counter(), False
        try:
            loaded = await load(ids)
            ok = True
            return loaded
        finally:
            report(family, ok, time.perf_counter() - started)

    return reported


def build_catalog(settings: Settings, queries: Queries) -> Catalog:
    """Families whose tiers come from CACHEASIDE_FAMILY_TIERS."""

    def family(name: str, prefix: str, load: Loader, tags: tuple[str, ...] = ()) -> Family:
        tier = settings.tier_of(name)
        return Family(
            name=prefix.rstrip(":"),
            tier=tier.value,
            ttl_s=settings.ttl_s(tier),
            key=lambda item_id: prefix + item_id,
            load=load,
            tags=tags,
            xfetch_beta=settings.xfetch_beta(tier),
            key_prefix=prefix,
        )

    lists = (keys.POST_LISTS_TAG,)
    return Catalog(
        user=family("user", keys.USER, queries.users),
        user_profile=family("user", keys.USER_PROFILE, queries.profile_fragments),
        user_settings=family("user", keys.USER_SETTINGS, queries.settings_fragments),
        post=family("post", keys.POST, queries.posts),
        trending=family("trending", keys.TRENDING, queries.trending, lists),
        archived=family("archived", keys.ARCHIVED, queries.archived, lists),
        posts_by_author=family("posts_by_author", keys.POSTS_BY_AUTHOR, queries.posts_by_author, lists),
        comments_by_author=family(
            "comments_by_author",
            keys.COMMENTS_BY_AUTHOR,
            queries.comments_by_author,
            (keys.COMMENT_LISTS_TAG,),
        ),
    )
