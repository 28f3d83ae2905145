"""CacheClient and AsyncCacheClient: typed calls to cacheaside with the production defaults built in.

- every call has a deadline (`timeout_s`, 10 s unless said otherwise);
- UNAVAILABLE is retried with exponential backoff by gRPC itself, through the channel's service config,
  so a retry never outlives the call's deadline and a server's pushback is honoured;
- keepalive pings find a dead connection in about 40 s instead of at the next call's timeout;
- methods return the response messages; `call` also returns the metadata (x-cache, x-request-id, and
  x-cache-tier when asked for with CACHE_DEBUG_METADATA).

    with CacheClient("127.0.0.1:50051") as client:
        post = client.get_post("p0000001").post
        reply = client.call(GET_POST, pb.GetPostRequest(post_id="p0000001"), metadata=CACHE_DEBUG_METADATA)
        print(reply.cache, reply.tier, reply.request_id)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
import grpc.aio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from client.proto.cacheaside.v1 import cache_service_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_ATTEMPTS = 4
SERVICE = "cacheaside.v1.CacheService"
HEALTH_SERVICE = "grpc.health.v1.Health"
# Sent with a read, asks for x-cache-tier in its trailing metadata as well as x-cache.
CACHE_DEBUG_METADATA = (("x-cache-debug", "1"),)
KEEPALIVE_TIME_MS = 30_000  # the server accepts pings every 10 s or slower (server/app.py)
KEEPALIVE_TIMEOUT_MS = 10_000

RequestT = TypeVar("RequestT", bound=Message)
ResponseT = TypeVar("ResponseT", bound=Message)


@dataclass(frozen=True, slots=True)
class Rpc(Generic[RequestT, ResponseT]):
    """One method of a service, with its message types."""

    service: str
    name: str
    request_type: type[RequestT]
    response_type: type[ResponseT]

    @property
    def path(self) -> str:
        """The method's HTTP/2 path."""
        return f"/{self.service}/{self.name}"


GET_USER = Rpc(SERVICE, "GetUser", pb.GetUserRequest, pb.GetUserResponse)
GET_POST = Rpc(SERVICE, "GetPost", pb.GetPostRequest, pb.GetPostResponse)
GET_TRENDING = Rpc(SERVICE, "GetTrending", pb.GetTrendingRequest, pb.GetTrendingResponse)
GET_ARCHIVED = Rpc(SERVICE, "GetArchived", pb.GetArchivedRequest, pb.GetArchivedResponse)
LIST_POSTS_BY_AUTHOR = Rpc(
    SERVICE, "ListPostsByAuthor", pb.ListPostsByAuthorRequest, pb.ListPostsByAuthorResponse
)
LIST_COMMENTS_BY_AUTHOR = Rpc(
    SERVICE, "ListCommentsByAuthor", pb.ListCommentsByAuthorRequest, pb.ListCommentsByAuthorResponse
)
BATCH_GET_USERS = Rpc(SERVICE, "BatchGetUsers", pb.BatchGetUsersRequest, pb.BatchGetUsersResponse)
BATCH_GET_POSTS = Rpc(SERVICE, "BatchGetPosts", pb.BatchGetPostsRequest, pb.BatchGetPostsResponse)
INVALIDATE = Rpc(SERVICE, "Invalidate", pb.InvalidateRequest, pb.InvalidateResponse)
WARM = Rpc(SERVICE, "Warm", pb.WarmRequest, pb.WarmResponse)
HEALTH_CHECK = Rpc(HEALTH_SERVICE, "Check", health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse)


@dataclass(frozen=True, slots=True)
class Reply(Generic[ResponseT]):
    """A response with the metadata that came with it."""

    response: ResponseT
    initial_metadata: dict[str, str] = field(default_factory=dict)
    trailing_metadata: dict[str, str] = field(default_factory=dict)

    @property
    def cache(self) -> str | None:
        """x-cache: hit, miss, stale or bypass (reads only; trailing metadata)."""
        return self.trailing_metadata.get("x-cache")

    @property
    def tier(self) -> str | None:
        """x-cache-tier: hot, warm or cold (reads sent with CACHE_DEBUG_METADATA only; trailing metadata)."""
        return self.trailing_metadata.get("x-cache-tier")

    @property
    def request_id(self) -> str | None:
        """x-request-id: the id the server logged this call under; the one sent, else None (a successful
        call that sent none: the server logged nothing under it)."""
        return self.trailing_metadata.get("x-request-id")


def service_config(*, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> str:
    """The channel's service config: retry UNAVAILABLE up to max_attempts calls in all (1 = no retry)."""
    method: dict[str, Any] = {"name": [{"service": SERVICE}, {"service": HEALTH_SERVICE}]}
    if max_attempts > 1:
        method["retryPolicy"] = {
            "maxAttempts": max_attempts,  # gRPC caps this at 5
            "initialBackoff": "0.1s",
            "maxBackoff": "2s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"methodConfig": [method]})


def channel_options(*, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> list[tuple[str, Any]]:
    """Retries, keepalive: what every channel to cacheaside should have."""
    return [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", service_config(max_attempts=max_attempts)),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def tls_credentials(
    *, ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS to the server: its certificate checked against ca_file (system roots if None); with
    cert_file and key_file, this client's certificate for mutual TLS."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both cert_file and key_file")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )


class _Base:
    def __init__(self, *, timeout_s: float, token: str | None) -> None:
        self.timeout_s = timeout_s
        self._auth: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()

    def _metadata(self, extra: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        return (*self._auth, *extra)


class CacheClient(_Base):
    """A blocking client over one channel; thread-safe, reuse it. Raises grpc.RpcError on failures."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        super().__init__(timeout_s=timeout_s, token=token)
        options = channel_options(max_attempts=max_attempts)
        self.channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials is not None
            else grpc.insecure_channel(target, options)
        )

    def call(
        self,
        rpc: Rpc[RequestT, ResponseT],
        request: RequestT,
        *,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Reply[ResponseT]:
        """Call any method; the reply carries the response and its metadata."""
        method = self.channel.unary_unary(
            rpc.path,
            request_serializer=rpc.request_type.SerializeToString,
            response_deserializer=rpc.response_type.FromString,
        )
        response, call = method.with_call(
            request, timeout=timeout_s or self.timeout_s, metadata=self._metadata(metadata)
        )
        return Reply(
            response, metadata_dict(call.initial_metadata()), metadata_dict(call.trailing_metadata())
        )

    def get_user(self, user_id: str, *, full: bool = False) -> pb.GetUserResponse:
        """One user; full adds profile and settings."""
        return self.call(GET_USER, pb.GetUserRequest(user_id=user_id, view=_view(full))).response

    def get_post(self, post_id: str) -> pb.GetPostResponse:
        """One post."""
        return self.call(GET_POST, pb.GetPostRequest(post_id=post_id)).response

    def get_trending(self, limit: int = 0) -> pb.GetTrendingResponse:
        """The most viewed published posts; limit 0 means the server's default."""
        return self.call(GET_TRENDING, pb.GetTrendingRequest(limit=limit)).response

    def get_archived(self, limit: int = 0) -> pb.GetArchivedResponse:
        """The latest archived posts."""
        return self.call(GET_ARCHIVED, pb.GetArchivedRequest(limit=limit)).response

    def list_posts_by_author(self, author_id: str, limit: int = 0) -> pb.ListPostsByAuthorResponse:
        """An author's newest posts."""
        request = pb.ListPostsByAuthorRequest(author_id=author_id, limit=limit)
        return self.call(LIST_POSTS_BY_AUTHOR, request).response

    def list_comments_by_author(self, author_id: str, limit: int = 0) -> pb.ListCommentsByAuthorResponse:
        """An author's newest comments."""
        request = pb.ListCommentsByAuthorRequest(author_id=author_id, limit=limit)
        return self.call(LIST_COMMENTS_BY_AUTHOR, request).response

    def batch_get_users(self, user_ids: Sequence[str], *, full: bool = False) -> pb.BatchGetUsersResponse:
        """Up to 100 users, in request order."""
        request = pb.BatchGetUsersRequest(user_ids=user_ids, view=_view(full))
        return self.call(BATCH_GET_USERS, request).response

    def batch_get_posts(self, post_ids: Sequence[str]) -> pb.BatchGetPostsResponse:
        """Up to 100 posts, in request order."""
        return self.call(BATCH_GET_POSTS, pb.BatchGetPostsRequest(post_ids=post_ids)).response

    def invalidate(
        self,
        *,
        user_ids: Sequence[str] = (),
        post_ids: Sequence[str] = (),
        tags: Sequence[str] = (),
        everything: bool = False,
    ) -> pb.InvalidateResponse:
        """Drop every cached key of the users, posts and tags, or everything (needs the admin token
        when one is set)."""
        request = pb.InvalidateRequest(user_ids=user_ids, post_ids=post_ids, tags=tags, everything=everything)
        return self.call(INVALIDATE, request).response

    def warm(self, *, posts: int = 0, users: int = 0, active_within_s: float = 0) -> pb.WarmResponse:
        """Cache popular posts and active users now; zeros mean the server's defaults."""
        return self.call(WARM, _warm_request(posts, users, active_within_s)).response

    def warm_with_progress(
        self, *, posts: int = 0, users: int = 0, active_within_s: float = 0, timeout_s: float | None = None
    ) -> Iterator[pb.WarmWithProgressResponse]:
        """Warm, yielding progress after each batch; the last message has done set."""
        method = self.channel.unary_stream(
            f"/{SERVICE}/WarmWithProgress",
            request_serializer=pb.WarmWithProgressRequest.SerializeToString,
            response_deserializer=pb.WarmWithProgressResponse.FromString,
        )
        request = pb.WarmWithProgressRequest(warm=_warm_request(posts, users, active_within_s))
        # Warming is paced, so it may take longer than one read: no default deadline, unless given.
        yield from method(request, timeout=timeout_s, metadata=self._metadata(()))

    def health(self, service: str = "") -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        """grpc.health.v1 status of the server ("") or of a service."""
        return self.call(HEALTH_CHECK, health_pb2.HealthCheckRequest(service=service)).response.status

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def __enter__(self) -> CacheClient:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class AsyncCacheClient(_Base):
    """The asyncio client: the same methods, awaited. Raises grpc.aio.AioRpcError on failures."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        super().__init__(timeout_s=timeout_s, token=token)
        options = channel_options(max_attempts=max_attempts)
        self.channel = (
            grpc.aio.secure_channel(target, credentials, options)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options)
        )

    async def call(
        self,
        rpc: Rpc[RequestT, ResponseT],
        request: RequestT,
        *,
        timeout_s: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> Reply[ResponseT]:
        """Call any method; the reply carries the response and its metadata."""
        method = self.channel.unary_unary(
            rpc.path,
            request_serializer=rpc.request_type.SerializeToString,
            response_deserializer=rpc.response_type.FromString,
        )
        pending = method(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata(metadata))
        response = await pending
        return Reply(
            response,
            metadata_dict(await pending.initial_metadata()),
            metadata_dict(await pending.trailing_metadata()),
        )

    async def get_user(self, user_id: str, *, full: bool = False) -> pb.GetUserResponse:
        """One user; full adds profile and settings."""
        return (await self.call(GET_USER, pb.GetUserRequest(user_id=user_id, view=_view(full)))).response

    async def get_post(self, post_id: str) -> pb.GetPostResponse:
        """One post."""
        return (await self.call(GET_POST, pb.GetPostRequest(post_id=post_id))).response

    async def get_trending(self, limit: int = 0) -> pb.GetTrendingResponse:
        """The most viewed published posts; limit 0 means the server's default."""
        return (await self.call(GET_TRENDING, pb.GetTrendingRequest(limit=limit))).response

    async def get_archived(self, limit: int = 0) -> pb.GetArchivedResponse:
        """The latest archived posts."""
        return (await self.call(GET_ARCHIVED, pb.GetArchivedRequest(limit=limit))).response

    async def list_posts_by_author(self, author_id: str, limit: int = 0) -> pb.ListPostsByAuthorResponse:
        """An author's newest posts."""
        request = pb.ListPostsByAuthorRequest(author_id=author_id, limit=limit)
        return (await self.call(LIST_POSTS_BY_AUTHOR, request)).response

    async def list_comments_by_author(
        self, author_id: str, limit: int = 0
    ) -> pb.ListCommentsByAuthorResponse:
        """An author's newest comments."""
        request = pb.ListCommentsByAuthorRequest(author_id=author_id, limit=limit)
        return (await self.call(LIST_COMMENTS_BY_AUTHOR, request)).response

    async def batch_get_users(
        self, user_ids: Sequence[str], *, full: bool = False
    ) -> pb.BatchGetUsersResponse:
        """Up to 100 users, in request order."""
        request = pb.BatchGetUsersRequest(user_ids=user_ids, view=_view(full))
        return (await self.call(BATCH_GET_USERS, request)).response

    async def batch_get_posts(self, post_ids: Sequence[str]) -> pb.BatchGetPostsResponse:
        """Up to 100 posts, in request order."""
        return (await self.call(BATCH_GET_POSTS, pb.BatchGetPostsRequest(post_ids=post_ids))).response

    async def invalidate(
        self,
        *,
        user_ids: Sequence[str] = (),
        post_ids: Sequence[str] = (),
        tags: Sequence[str] = (),
        everything: bool = False,
    ) -> pb.InvalidateResponse:
        """Drop every cached key of the users, posts and tags, or everything (needs the admin token
        when one is set)."""
        request = pb.InvalidateRequest(user_ids=user_ids, post_ids=post_ids, tags=tags, everything=everything)
        return (await self.call(INVALIDATE, request)).response

    async def warm(self, *, posts: int = 0, users: int = 0, active_within_s: float = 0) -> pb.WarmResponse:
        """Cache popular posts and active users now; zeros mean the server's defaults."""
        return (await self.call(WARM, _warm_request(posts, users, active_within_s))).response

    async def health(self, service: str = "") -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        """grpc.health.v1 status of the server ("") or of a service."""
        request = health_pb2.HealthCheckRequest(service=service)
        return (await self.call(HEALTH_CHECK, request)).response.status

    async def close(self) -> None:
        """Close the channel."""
        await self.channel.close(None)

    async def __aenter__(self) -> AsyncCacheClient:
        return self

    async def __aexit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.close()


def _view(full: bool) -> pb.UserView.ValueType:
    return pb.USER_VIEW_FULL if full else pb.USER_VIEW_BASIC


def _warm_request(posts: int, users: int, active_within_s: float) -> pb.WarmRequest:
    request = pb.WarmRequest(popular_posts=posts, active_users=users)
    if active_within_s:
        within = Duration()
        within.FromNanoseconds(int(active_within_s * 1e9))
        request.active_within.CopyFrom(within)
    return request


def metadata_dict(metadata: Any) -> dict[str, str]:
    """Metadata as a dict of its text values; binary (-bin) ones are protocol details, left out."""
    return {key: value for key, value in (metadata or ()) if isinstance(value, str)}
