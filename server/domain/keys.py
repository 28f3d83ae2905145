"""The key schema (the seed's names) and the one map of what invalidates what.

Keys here are unprefixed; the store adds `{CACHEASIDE_KEY_PREFIX}:v{SCHEMA_VERSION}:`. Lists are cached
at full length (LIST_CAPACITY) under one key and cut to each caller's limit on the way out, so every
limit shares one key and one invalidation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Bump when a cached message's layout changes, so a deploy never reads bytes written by another.
SCHEMA_VERSION = 1
LIST_CAPACITY = 100

USER = "user:"
USER_PROFILE = "user_profile:"
USER_SETTINGS = "user_settings:"
POST = "post:"
POSTS_BY_AUTHOR = "posts:author:"
COMMENTS_BY_AUTHOR = "comments:author:"
TRENDING = "posts:trending"
ARCHIVED = "posts:archived"

# Every cached post list joins this tag set, so one post change clears them all without KEYS or SCAN.
POST_LISTS_TAG = "tag:post_lists"


def key_prefix(configured: str) -> str:
    """The full prefix every key and tag of this deployment starts with."""
    return f"{configured}:v{SCHEMA_VERSION}:"


@dataclass(frozen=True, slots=True)
class Invalidation:
    """What a change to one entity clears: keys made from its id, and whole tag sets."""

    key_families: tuple[str, ...]
    tags: tuple[str, ...] = ()


# The map. A user: every key family of that user. A post: the post, and every cached post list
# (trending, archived, and each author's list, which covers the post's own author) through the tag.
INVALIDATES = {
    "user": Invalidation(
        key_families=(USER, USER_PROFILE, USER_SETTINGS, POSTS_BY_AUTHOR, COMMENTS_BY_AUTHOR),
    ),
    "post": Invalidation(key_families=(POST,), tags=(POST_LISTS_TAG,)),
}


def invalidation_targets(
    *, user_ids: Iterable[str] = (), post_ids: Iterable[str] = ()
) -> tuple[list[str], list[str]]:
    """The keys and tags to clear for these entities, each once."""
    keys: dict[str, None] = {}
    tags: dict[str, None] = {}
    for entity, ids in (("user", user_ids), ("post", post_ids)):
        rule = INVALIDATES[entity]
        for entity_id in ids:
            keys.update(dict.fromkeys(family + entity_id for family in rule.key_families))
            tags.update(dict.fromkeys(rule.tags))
    return list(keys), list(tags)
