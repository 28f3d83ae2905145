"""The tables. Their names and columns are shared with the services that write them: a contract."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    Text,
    text,
)

ID_LENGTH = 64

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("email", String(320), nullable=False, unique=True),
    Column("last_active_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_users_last_active_at", text("last_active_at DESC")),
)

profiles = Table(
    "profiles",
    metadata,
    Column("user_id", String(ID_LENGTH), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("bio", Text, nullable=False, server_default=""),
    Column("avatar_url", String(2048), nullable=False, server_default=""),
)

user_settings = Table(
    "user_settings",
    metadata,
    Column("user_id", String(ID_LENGTH), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("theme", String(32), nullable=False, server_default="light"),
    Column("locale", String(35), nullable=False, server_default="en-US"),
    Column("email_notifications", Boolean, nullable=False, server_default=text("true")),
)

posts = Table(
    "posts",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("author_id", String(ID_LENGTH), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("title", String(500), nullable=False),
    Column("body", Text, nullable=False, server_default=""),
    Column("published", Boolean, nullable=False, server_default=text("false")),
    Column("views", BigInteger, nullable=False, server_default="0"),
    Column("archived", Boolean, nullable=False, server_default=text("false")),
    Column("archived_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Partial indexes: trending reads only published posts, archived only archived ones.
    Index(
        "ix_posts_trending",
        text("views DESC"),
        text("id"),
        postgresql_where=text("published"),
        sqlite_where=text("published"),
    ),
    Index(
        "ix_posts_archived",
        text("archived_at DESC"),
        text("id"),
        postgresql_where=text("archived"),
        sqlite_where=text("archived"),
    ),
    Index("ix_posts_author_created", "author_id", text("created_at DESC"), text("id")),
)

comments = Table(
    "comments",
    metadata,
    Column("id", String(ID_LENGTH), primary_key=True),
    Column("post_id", String(ID_LENGTH), ForeignKey("posts.id", ondelete="CASCADE"), nullable=False),
    Column("author_id", String(ID_LENGTH), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_comments_author_created", "author_id", text("created_at DESC"), text("id")),
    Index("ix_comments_post", "post_id"),
)
