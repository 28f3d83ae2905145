"""The key schema: the seed's names, the tags, and the version of the cached layout.

Keys here are unprefixed; the store adds `{CACHEASIDE_KEY_PREFIX}:v{SCHEMA_VERSION}:`. Lists are cached
at full length (LIST_CAPACITY) under one key and cut to each caller's limit on the way out, so every
limit shares one key and one invalidation.
"""

from __future__ import annotations

# Bump when a cached message's layout changes, so a deploy never reads bytes written by another.
SCHEMA_VERSION = 2
LIST_CAPACITY = 100

USER = "user:"
USER_PROFILE = "user_profile:"
USER_SETTINGS = "user_settings:"
POST = "post:"
POSTS_BY_AUTHOR = "posts:author:"
COMMENTS_BY_AUTHOR = "comments:author:"
TRENDING = "posts:trending"
ARCHIVED = "posts:archived"

# Every cached post list joins this tag set, so one post change clears them all without KEYS or SCAN;
# the comment lists likewise. Invalidate's `tags` scope takes the names after "tag:".
POST_LISTS_TAG = "tag:post_lists"
COMMENT_LISTS_TAG = "tag:comment_lists"
TAGS = {"post_lists": POST_LISTS_TAG, "comment_lists": COMMENT_LISTS_TAG}


def key_prefix(configured: str) -> str:
    """The full prefix every key and tag of this deployment starts with."""
    return f"{configured}:v{SCHEMA_VERSION}:"
