"""The five tables and the indexes behind the trending, archived and by-author queries.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.String(64)


def _created_at() -> sa.Column[Any]:
    return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("email", sa.String(320), nullable=False, unique=True),
        sa.Column("last_active_at", sa.DateTime(timezone=True), nullable=True),
        _created_at(),
    )
    op.create_index("ix_users_last_active_at", "users", [sa.text("last_active_at DESC")])
    op.create_table(
        "profiles",
        sa.Column("user_id", _ID, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("bio", sa.Text, nullable=False, server_default=""),
        sa.Column("avatar_url", sa.String(2048), nullable=False, server_default=""),
    )
    op.create_table(
        "user_settings",
        sa.Column("user_id", _ID, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("theme", sa.String(32), nullable=False, server_default="light"),
        sa.Column("locale", sa.String(35), nullable=False, server_default="en-US"),
        sa.Column("email_notifications", sa.Boolean, nullable=False, server_default=sa.text("true")),
    )
    op.create_table(
        "posts",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("author_id", _ID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("title", sa.String(500), nullable=False),
        sa.Column("body", sa.Text, nullable=False, server_default=""),
        sa.Column("published", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("views", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("archived", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
        _created_at(),
    )
    op.create_index(
        "ix_posts_trending",
        "posts",
        [sa.text("views DESC"), sa.text("id")],
        postgresql_where=sa.text("published"),
        sqlite_where=sa.text("published"),
    )
    op.create_index(
        "ix_posts_archived",
        "posts",
        [sa.text("archived_at DESC"), sa.text("id")],
        postgresql_where=sa.text("archived"),
        sqlite_where=sa.text("archived"),
    )
    op.create_index(
        "ix_posts_author_created", "posts", ["author_id", sa.text("created_at DESC"), sa.text("id")]
    )
    op.create_table(
        "comments",
        sa.Column("id", _ID, primary_key=True),
        sa.Column("post_id", _ID, sa.ForeignKey("posts.id", ondelete="CASCADE"), nullable=False),
        sa.Column("author_id", _ID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        _created_at(),
    )
    op.create_index(
        "ix_comments_author_created", "comments", ["author_id", sa.text("created_at DESC"), sa.text("id")]
    )
    op.create_index("ix_comments_post", "comments", ["post_id"])


def downgrade() -> None:
    for table in ("comments", "posts", "user_settings", "profiles", "users"):
        op.drop_table(table)
