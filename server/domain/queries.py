"""The SQL the service runs: one query per call, each a loader for a key family or a warming query."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from server import wire
from server.db import database_errors
from server.domain import encode
from server.domain.keys import LIST_CAPACITY
from server.domain.models import comments, posts, profiles, user_settings, users


class Queries:
    """Loaders over one async engine. Every method is one round trip to the database."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def _rows(self, statement: Select[Any]) -> Sequence[Any]:
        with database_errors():
            async with self._engine.connect() as connection:
                return list((await connection.execute(statement)).all())

    async def users(self, ids: Sequence[str]) -> Mapping[str, bytes]:
        """Users by id, without profile and settings."""
        rows = await self._rows(select(users).where(users.c.id.in_(ids)))
        return {row.id: encode.user(row) for row in rows}

    async def profile_fragments(self, ids: Sequence[str]) -> Mapping[str, bytes]:
        """Each existing user's profile as a User field record (empty when it has none)."""
        statement = (
            select(users.c.id, profiles.c.bio, profiles.c.avatar_url)
            .select_from(users.outerjoin(profiles, profiles.c.user_id == users.c.id))
            .where(users.c.id.in_(ids))
        )
        return {row.id: encode.profile_fragment(row) for row in await self._rows(statement)}

    async def settings_fragments(self, ids: Sequence[str]) -> Mapping[str, bytes]:
        """Each existing user's settings as a User field record (empty when it has none)."""
        statement = (
            select(
                users.c.id,
                user_settings.c.theme,
                user_settings.c.locale,
                user_settings.c.email_notifications,
            )
            .select_from(users.outerjoin(user_settings, user_settings.c.user_id == users.c.id))
            .where(users.c.id.in_(ids))
        )
        return {row.id: encode.settings_fragment(row) for row in await self._rows(statement)}

    async def posts(self, ids: Sequence[str]) -> Mapping[str, bytes]:
        """Posts by id."""
        rows = await self._rows(select(posts).where(posts.c.id.in_(ids)))
        return {row.id: encode.post(row) for row in rows}

    async def trending(self, _ids: Sequence[str]) -> Mapping[str, bytes]:
        """The published posts with most views, as list records under the singleton id ''."""
        statement = (
            select(posts)
            .where(posts.c.published)
            .order_by(posts.c.views.desc(), posts.c.id)
            .limit(LIST_CAPACITY)
        )
        return {"": wire.frame_all(encode.LIST_FIELD, [encode.post(r) for r in await self._rows(statement)])}

    async def archived(self, _ids: Sequence[str]) -> Mapping[str, bytes]:
        """Archived posts, latest archived_at first, as list records under the singleton id ''."""
        statement = (
            select(posts)
            .where(posts.c.archived)
            .order_by(posts.c.archived_at.desc(), posts.c.id)
            .limit(LIST_CAPACITY)
        )
        return {"": wire.frame_all(encode.LIST_FIELD, [encode.post(r) for r in await self._rows(statement)])}

    async def posts_by_author(self, author_ids: Sequence[str]) -> Mapping[str, bytes]:
        """Each existing author's newest posts as list records; unknown authors are absent."""
        return await self._newest_by_author(posts, author_ids, encode.post)

    async def comments_by_author(self, author_ids: Sequence[str]) -> Mapping[str, bytes]:
        """Each existing author's newest comments as list records; unknown authors are absent."""
        return await self._newest_by_author(comments, author_ids, encode.comment)

    async def _newest_by_author(
        self, table: Table, author_ids: Sequence[str], encoder: Callable[[Any], bytes]
    ) -> Mapping[str, bytes]:
        # One query for every author: rank each author's rows and keep the first LIST_CAPACITY.
        # The users outer join keeps authors with no rows, so they answer an empty list, not NOT_FOUND.
        rank: ColumnElement[int] = (
            func.row_number()
            .over(partition_by=table.c.author_id, order_by=(table.c.created_at.desc(), table.c.id))
            .label("rank")
        )
        ranked = select(table, rank).where(table.c.author_id.in_(author_ids)).subquery()
        statement = (
            select(users.c.id.label("requested_author"), ranked)
            .select_from(
                users.outerjoin(ranked, (ranked.c.author_id == users.c.id) & (ranked.c.rank <= LIST_CAPACITY))
            )
            .where(users.c.id.in_(author_ids))
            .order_by(users.c.id, ranked.c.rank)
        )
        records: dict[str, list[bytes]] = {}
        for row in await self._rows(statement):
            items = records.setdefault(row.requested_author, [])
            if row.id is not None:
                items.append(encoder(row))
        return {author: wire.frame_all(encode.LIST_FIELD, items) for author, items in records.items()}

    # Warming selects ids only: the rows are then loaded under leases, like any miss, so a write
    # committed between this query and the fill cannot leave an old row in the cache.

    async def popular_post_ids(self, limit: int) -> list[str]:
        """The seed's warming query: the published posts with the most views."""
        statement = (
            select(posts.c.id)
            .where(posts.c.published)
            .order_by(posts.c.views.desc(), posts.c.id)
            .limit(limit)
        )
        return [row.id for row in await self._rows(statement)]

    async def active_user_ids(self, limit: int, since: datetime) -> list[str]:
        """The seed's warming query: users active since a moment, most recently active first."""
        statement = (
            select(users.c.id)
            .where(users.c.last_active_at >= since)
            .order_by(users.c.last_active_at.desc(), users.c.id)
            .limit(limit)
        )
        return [row.id for row in await self._rows(statement)]
