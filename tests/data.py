"""Rows for tests, written straight to the database the way another service would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from server.domain.models import comments, posts, profiles, user_settings, users

BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)


async def add_user(engine: AsyncEngine, user_id: str, *, full: bool = True, **columns: Any) -> dict[str, Any]:
    """A user (with profile and settings unless full=False)."""
    row = {
        "id": user_id,
        "name": f"Name {user_id}",
        "email": f"{user_id}@example.com",
        "last_active_at": datetime.now(UTC) - timedelta(minutes=5),
        "created_at": BASE_TIME,
        **columns,
    }
    async with engine.begin() as connection:
        await connection.execute(users.insert(), row)
        if full:
            await connection.execute(
                profiles.insert(),
                {"user_id": user_id, "bio": f"bio of {user_id}", "avatar_url": "https://a/x.png"},
            )
            await connection.execute(
                user_settings.insert(),
                {"user_id": user_id, "theme": "dark", "locale": "de-DE", "email_notifications": False},
            )
    return row


async def add_post(engine: AsyncEngine, post_id: str, author_id: str, **columns: Any) -> dict[str, Any]:
    """A published, unarchived post unless columns say otherwise."""
    row = {
        "id": post_id,
        "author_id": author_id,
        "title": f"Title {post_id}",
        "body": f"Body {post_id}",
        "published": True,
        "views": 0,
        "archived": False,
        "archived_at": None,
        "created_at": BASE_TIME,
        **columns,
    }
    async with engine.begin() as connection:
        await connection.execute(posts.insert(), row)
    return row


async def add_comment(
    engine: AsyncEngine, comment_id: str, post_id: str, author_id: str, **columns: Any
) -> dict[str, Any]:
    """A comment."""
    row = {
        "id": comment_id,
        "post_id": post_id,
        "author_id": author_id,
        "body": f"Comment {comment_id}",
        "created_at": BASE_TIME,
        **columns,
    }
    async with engine.begin() as connection:
        await connection.execute(comments.insert(), row)
    return row


async def set_post(engine: AsyncEngine, post_id: str, **columns: Any) -> None:
    """Change a post behind the cache's back."""
    async with engine.begin() as connection:
        await connection.execute(update(posts).where(posts.c.id == post_id).values(**columns))


async def set_user(engine: AsyncEngine, user_id: str, **columns: Any) -> None:
    """Change a user behind the cache's back."""
    async with engine.begin() as connection:
        await connection.execute(update(users).where(users.c.id == user_id).values(**columns))


async def set_profile(engine: AsyncEngine, user_id: str, **columns: Any) -> None:
    """Change a profile behind the cache's back."""
    async with engine.begin() as connection:
        await connection.execute(update(profiles).where(profiles.c.user_id == user_id).values(**columns))
