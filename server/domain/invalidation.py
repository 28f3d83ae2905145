"""The one map of what invalidates what. Invalidate and the automatic (outbox) path both use it.

A change is a table name and the row's key columns before and after (either may be missing: an
INSERT has no before, a DELETE no after, and an Invalidate call knows only the id). Each table names
the key families it clears, each built from one column of the row; the lists a row can appear in;
and, where a column the map needs is unknown, the tag that covers every key it could have named.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from server.domain import keys

Row = Mapping[str, object]


@dataclass(frozen=True, slots=True)
class Rule:
    """What a change to one table clears."""

    keys: tuple[tuple[str, str], ...]  # (key family prefix, the row column holding its id)
    lists: tuple[str, ...] = ()  # singleton list keys the row can appear in
    fallback_tags: Mapping[str, str] | None = None  # column -> tag to clear when that column is unknown


INVALIDATION_MAP: Mapping[str, Rule] = {
    "users": Rule(
        keys=(
            (keys.USER, "id"),
            (keys.USER_PROFILE, "id"),
            (keys.USER_SETTINGS, "id"),
            (keys.POSTS_BY_AUTHOR, "id"),
            (keys.COMMENTS_BY_AUTHOR, "id"),
        ),
    ),
    "profiles": Rule(keys=((keys.USER_PROFILE, "user_id"),)),
    "user_settings": Rule(keys=((keys.USER_SETTINGS, "user_id"),)),
    # Old and new rows both count, so a post moved between authors clears both authors' lists.
    "posts": Rule(
        keys=((keys.POST, "id"), (keys.POSTS_BY_AUTHOR, "author_id")),
        lists=(keys.TRENDING, keys.ARCHIVED),
        fallback_tags={"author_id": keys.POST_LISTS_TAG},
    ),
    "comments": Rule(
        keys=((keys.COMMENTS_BY_AUTHOR, "author_id"),),
        fallback_tags={"author_id": keys.COMMENT_LISTS_TAG},
    ),
}


@dataclass(slots=True)
class Targets:
    """Keys and tags to clear, each once, in first-seen order."""

    keys: dict[str, None]
    tags: dict[str, None]

    @classmethod
    def empty(cls) -> Targets:
        """Nothing to clear yet."""
        return cls({}, {})

    def add_change(self, table: str, rows: Iterable[Row | None]) -> None:
        """Add what a change to table clears; rows are its before and after images (None if absent)."""
        rule = INVALIDATION_MAP[table]
        self.keys.update(dict.fromkeys(rule.lists))
        for row in rows:
            if row is None:
                continue
            for family, column in rule.keys:
                value = row.get(column)
                if value is not None:
                    self.keys[family + str(value)] = None
                elif rule.fallback_tags and column in rule.fallback_tags:
                    self.tags[rule.fallback_tags[column]] = None


def for_ids(*, user_ids: Iterable[str] = (), post_ids: Iterable[str] = ()) -> Targets:
    """What Invalidate clears for users and posts known only by id."""
    targets = Targets.empty()
    for user_id in user_ids:
        targets.add_change("users", [{"id": user_id}])
    for post_id in post_ids:
        targets.add_change("posts", [{"id": post_id}])
    return targets
