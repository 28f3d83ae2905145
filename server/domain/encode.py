"""Rows to serialized protobuf messages: the payloads the cache stores."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server import wire

USER_PROFILE_FIELD = pb.User.DESCRIPTOR.fields_by_name["profile"].number
USER_SETTINGS_FIELD = pb.User.DESCRIPTOR.fields_by_name["settings"].number
LIST_FIELD = 1  # `posts` or `comments` in every list response


def _timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite returns naive datetimes; we always write UTC
        value = value.replace(tzinfo=UTC)
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def user(row: Any) -> bytes:
    """A users row as a User, without profile and settings."""
    return pb.User(
        id=row.id,
        name=row.name,
        email=row.email,
        last_active_at=_timestamp(row.last_active_at),
        created_at=_timestamp(row.created_at),
    ).SerializeToString()


def profile_fragment(row: Any) -> bytes:
    """A profile as the User field record that merges into a User; empty if the user has none."""
    if row.bio is None and row.avatar_url is None:
        return b""
    message = pb.Profile(bio=row.bio or "", avatar_url=row.avatar_url or "")
    return wire.frame(USER_PROFILE_FIELD, message.SerializeToString())


def settings_fragment(row: Any) -> bytes:
    """Settings as the User field record that merges into a User; empty if the user has none."""
    if row.theme is None:
        return b""
    message = pb.UserSettings(theme=row.theme, locale=row.locale, email_notifications=row.email_notifications)
    return wire.frame(USER_SETTINGS_FIELD, message.SerializeToString())


def post(row: Any) -> bytes:
    """A posts row as a Post."""
    return pb.Post(
        id=row.id,
        author_id=row.author_id,
        title=row.title,
        body=row.body,
        published=row.published,
        views=row.views,
        archived=row.archived,
        archived_at=_timestamp(row.archived_at),
        created_at=_timestamp(row.created_at),
    ).SerializeToString()


def comment(row: Any) -> bytes:
    """A comments row as a Comment."""
    return pb.Comment(
        id=row.id,
        post_id=row.post_id,
        author_id=row.author_id,
        body=row.body,
        created_at=_timestamp(row.created_at),
    ).SerializeToString()
