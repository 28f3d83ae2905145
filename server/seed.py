"""`cacheaside db seed`: deterministic demo data, inserted in batches with a progress bar.

The same arguments give the same rows (ids, names, views, flags), except that activity times are
relative to now, so that warming's "active within 24 hours" finds users. Existing ids are kept.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from tqdm import tqdm

from server.domain.models import comments, posts, profiles, user_settings, users

BATCH_ROWS = 5000
_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
_THEMES = ("light", "dark", "solarized")
_LOCALES = ("en-US", "en-GB", "de-DE", "fr-FR", "ja-JP", "pt-BR")
_WORDS = [
    "cache",
    "redis",
    "lease",
    "stampede",
    "tier",
    "warm",
    "cold",
    "hot",
    "invalidate",
    "fallback",
    "query",
    "index",
]


@dataclass(frozen=True, slots=True)
class SeedCounts:
    """How many rows of each kind to create."""

    users: int
    posts: int
    comments: int


def user_id(n: int) -> str:
    """The id of the n-th seeded user."""
    return f"u{n:07d}"


def post_id(n: int) -> str:
    """The id of the n-th seeded post."""
    return f"p{n:07d}"


def _users(rng: random.Random, count: int, now: datetime) -> Iterator[dict[str, Any]]:
    for n in range(count):
        yield {
            "id": user_id(n),
            "name": f"User {n}",
            "email": f"user{n}@example.com",
            "last_active_at": now - timedelta(seconds=rng.uniform(0, 72 * 3600)),
            "created_at": _EPOCH + timedelta(minutes=n),
        }


def _profiles(rng: random.Random, count: int) -> Iterator[dict[str, Any]]:
    for n in range(count):
        yield {
            "user_id": user_id(n),
            "bio": f"I like {rng.choice(_WORDS)}.",
            "avatar_url": f"https://a.example/{n}.png",
        }


def _settings(rng: random.Random, count: int) -> Iterator[dict[str, Any]]:
    for n in range(count):
        yield {
            "user_id": user_id(n),
            "theme": rng.choice(_THEMES),
            "locale": rng.choice(_LOCALES),
            "email_notifications": rng.random() < 0.7,
        }


def _posts(rng: random.Random, count: int, user_count: int) -> Iterator[dict[str, Any]]:
    for n in range(count):
        archived = rng.random() < 0.1
        created = _EPOCH + timedelta(minutes=n)
        yield {
            "id": post_id(n),
            "author_id": user_id(rng.randrange(user_count)),
            "title": " ".join(rng.choice(_WORDS) for _ in range(4)).capitalize(),
            "body": " ".join(rng.choice(_WORDS) for _ in range(30)),
            "published": rng.random() < 0.85,
            "views": int(rng.paretovariate(1.1) * 10),
            "archived": archived,
            "archived_at": created + timedelta(days=rng.uniform(1, 300)) if archived else None,
            "created_at": created,
        }


def _comments(rng: random.Random, count: int, user_count: int, post_count: int) -> Iterator[dict[str, Any]]:
    for n in range(count):
        yield {
            "id": f"c{n:07d}",
            "post_id": post_id(rng.randrange(post_count)),
            "author_id": user_id(rng.randrange(user_count)),
            "body": " ".join(rng.choice(_WORDS) for _ in range(12)),
            "created_at": _EPOCH + timedelta(minutes=n, seconds=30),
        }


async def seed(
    engine: AsyncEngine, counts: SeedCounts, *, progress: bool = True, seed_value: int = 42
) -> int:
    """Insert the demo rows in batches; returns how many rows were offered (existing ids are kept)."""
    if counts.users <= 0 and (counts.posts > 0 or counts.comments > 0):
        raise ValueError("posts and comments need at least one user")
    if counts.posts <= 0 and counts.comments > 0:
        raise ValueError("comments need at least one post")
    rng = random.Random(seed_value)
    now = datetime.now(UTC)
    plan: list[tuple[Table, int, Callable[[], Iterator[dict[str, Any]]]]] = [
        (users, counts.users, lambda: _users(rng, counts.users, now)),
        (profiles, counts.users, lambda: _profiles(rng, counts.users)),
        (user_settings, counts.users, lambda: _settings(rng, counts.users)),
        (posts, counts.posts, lambda: _posts(rng, counts.posts, counts.users)),
        (comments, counts.comments, lambda: _comments(rng, counts.comments, counts.users, counts.posts)),
    ]
    total = sum(count for _, count, _ in plan)
    with tqdm(total=total, unit="rows", disable=not progress, desc="seeding") as bar:
        async with engine.begin() as connection:
            for table, _count, rows in plan:
                await _insert_batches(connection, table, rows(), bar)
    return total


async def _insert_batches(
    connection: AsyncConnection, table: Table, rows: Iterator[dict[str, Any]], bar: tqdm[Any]
) -> None:
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(table).on_conflict_do_nothing()
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == BATCH_ROWS:
            await connection.execute(statement, batch)
            bar.update(len(batch))
            batch = []
    if batch:
        await connection.execute(statement, batch)
        bar.update(len(batch))


async def is_empty(engine: AsyncEngine) -> bool:
    """Whether the users table has no rows."""
    async with engine.connect() as connection:
        return int((await connection.execute(select(func.count()).select_from(users))).scalar_one()) == 0
