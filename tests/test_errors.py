"""Bad input gets INVALID_ARGUMENT saying what to fix; unknown ids get NOT_FOUND naming them."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from tests.conftest import Running
from tests.data import add_post, add_user
from tests.helpers import call, error_of

BAD_REQUESTS: list[tuple[str, Any, str, str]] = [
    ("GetPost", pb.GetPostRequest(post_id=""), "INVALID_ID", "post_id is required"),
    ("GetPost", pb.GetPostRequest(post_id="x" * 65), "INVALID_ID", "at most 64"),
    ("GetPost", pb.GetPostRequest(post_id="p*"), "INVALID_ID", "outside [A-Za-z0-9_-]"),
    ("GetPost", pb.GetPostRequest(post_id="p:1"), "INVALID_ID", "outside"),
    ("GetUser", pb.GetUserRequest(user_id="ünï"), "INVALID_ID", "outside"),
    ("GetUser", pb.GetUserRequest(user_id="a", view=7), "INVALID_VIEW", "USER_VIEW_FULL"),
    ("GetTrending", pb.GetTrendingRequest(limit=101), "LIMIT_OUT_OF_RANGE", "1 to 100"),
    ("GetTrending", pb.GetTrendingRequest(limit=-1), "LIMIT_OUT_OF_RANGE", "default of 10"),
    ("GetArchived", pb.GetArchivedRequest(limit=1000), "LIMIT_OUT_OF_RANGE", "default of 20"),
    (
        "ListPostsByAuthor",
        pb.ListPostsByAuthorRequest(author_id="a", limit=101),
        "LIMIT_OUT_OF_RANGE",
        "1 to 100",
    ),
    ("ListCommentsByAuthor", pb.ListCommentsByAuthorRequest(author_id=""), "INVALID_ID", "author_id"),
    ("BatchGetPosts", pb.BatchGetPostsRequest(), "EMPTY_BATCH", "at least one"),
    ("BatchGetPosts", pb.BatchGetPostsRequest(post_ids=["p"] * 101), "BATCH_TOO_LARGE", "at most 100"),
    ("BatchGetPosts", pb.BatchGetPostsRequest(post_ids=["ok", "b d"]), "INVALID_ID", "post_ids[1]"),
    ("BatchGetUsers", pb.BatchGetUsersRequest(user_ids=[]), "EMPTY_BATCH", "user_ids"),
    ("BatchGetUsers", pb.BatchGetUsersRequest(user_ids=["u"] * 101), "BATCH_TOO_LARGE", "split"),
    ("Invalidate", pb.InvalidateRequest(), "EMPTY_BATCH", "at least one"),
    ("Invalidate", pb.InvalidateRequest(post_ids=["*"]), "INVALID_ID", "post_ids[0]"),
    ("Invalidate", pb.InvalidateRequest(user_ids=["u"] * 1001), "BATCH_TOO_LARGE", "at most 1000"),
    ("Warm", pb.WarmRequest(popular_posts=-5), "LIMIT_OUT_OF_RANGE", "popular_posts"),
    ("Warm", pb.WarmRequest(active_users=10_001), "LIMIT_OUT_OF_RANGE", "active_users"),
]


@pytest.mark.parametrize(("rpc", "request_message", "reason", "hint"), BAD_REQUESTS)
async def test_bad_input_is_invalid_argument_with_a_message_that_says_what_to_fix(
    service: Running, rpc: str, request_message: Any, reason: str, hint: str
) -> None:
    code, details, found_reason = await error_of(getattr(service.stub, rpc), request_message)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert found_reason == reason
    assert hint in details


async def test_a_negative_duration_for_warm_is_invalid(service: Running) -> None:
    request = pb.WarmRequest()
    request.active_within.seconds = -1
    code, details, _ = await error_of(service.stub.Warm, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "active_within" in details


async def test_unknown_ids_are_not_found_and_named(service: Running, db_engine: AsyncEngine) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")

    code, details, reason = await error_of(service.stub.GetPost, pb.GetPostRequest(post_id="nope"))
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    assert "'nope'" in details

    code, details, _ = await error_of(
        service.stub.BatchGetPosts, pb.BatchGetPostsRequest(post_ids=["p1", "gone", "p1", "lost"])
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert "'gone'" in details
    assert "'lost'" in details
    assert "'p1'" not in details

    for request in (
        pb.GetUserRequest(user_id="ghost", view=pb.USER_VIEW_FULL),
        pb.GetUserRequest(user_id="ghost"),
    ):
        code, details, _ = await error_of(service.stub.GetUser, request)
        assert code == grpc.StatusCode.NOT_FOUND
        assert "'ghost'" in details
    code, details, _ = await error_of(
        service.stub.ListPostsByAuthor, pb.ListPostsByAuthorRequest(author_id="ghost")
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert "author" in details


async def test_not_found_is_cached_briefly_and_cleared_by_invalidate(
    service: Running, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await error_of(service.stub.GetPost, pb.GetPostRequest(post_id="late"))
    loads = service.app.engine.stats.loads
    await error_of(service.stub.GetPost, pb.GetPostRequest(post_id="late"))
    assert service.app.engine.stats.loads == loads, "a cached NOT_FOUND spares the database"

    await add_post(db_engine, "late", "alice")
    await call(service.stub.Invalidate, pb.InvalidateRequest(post_ids=["late"]))
    found, meta = await call(service.stub.GetPost, pb.GetPostRequest(post_id="late"))
    assert (found.post.id, meta["x-cache"]) == ("late", "miss")


@pytest.mark.parametrize(
    ("seconds", "nanos", "code"),
    [
        (315_576_000_000, 0, grpc.StatusCode.OK),  # the longest Duration: everyone, not an overflow
        (315_576_000_001, 0, grpc.StatusCode.INVALID_ARGUMENT),
        (2**62, 0, grpc.StatusCode.INVALID_ARGUMENT),
        (1, -1, grpc.StatusCode.INVALID_ARGUMENT),
        (0, 1_000_000_000, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_warm_takes_any_valid_duration_and_refuses_malformed_ones(
    service: Running, seconds: int, nanos: int, code: grpc.StatusCode
) -> None:
    request = pb.WarmRequest()
    request.active_within.seconds, request.active_within.nanos = seconds, nanos
    try:
        await service.stub.Warm(request)
        found = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as error:
        found = error.code()
    assert found == code


async def test_request_bytes_that_are_not_the_message_are_invalid_argument(service: Running) -> None:
    raw = service.channel.unary_unary("/cacheaside.v1.CacheService/GetPost")  # bytes go as they are
    code, details, reason = await error_of(raw, b"\x0a\xff\xff\xff\xff\x0f")
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert "cacheaside.v1.GetPostRequest" in details


@pytest.mark.parametrize(
    ("method", "request_message", "details"),
    [
        ("GetPost", pb.GetPostRequest(post_id="nope"), "no post has id 'nope'"),
        ("GetUser", pb.GetUserRequest(user_id="ghost"), "no user has id 'ghost'"),
        ("GetUser", pb.GetUserRequest(user_id="ghost", view=pb.USER_VIEW_FULL), "no user has id 'ghost'"),
        ("ListPostsByAuthor", pb.ListPostsByAuthorRequest(author_id="ghost"), "no author has id 'ghost'"),
        (
            "ListCommentsByAuthor",
            pb.ListCommentsByAuthorRequest(author_id="ghost"),
            "no author has id 'ghost'",
        ),
        (
            "BatchGetUsers",
            pb.BatchGetUsersRequest(user_ids=["ghost", "gone"]),
            "no user has any of the ids 'ghost', 'gone'",
        ),
        (
            "BatchGetPosts",
            pb.BatchGetPostsRequest(post_ids=["nope", "gone", "nope"]),
            "no post has any of the ids 'nope', 'gone'",
        ),
    ],
)
async def test_not_found_names_what_each_read_looked_for(
    service: Running, method: str, request_message: Any, details: str
) -> None:
    code, found, reason = await error_of(getattr(service.stub, method), request_message)
    assert (code, reason, found) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND", details)


@pytest.mark.parametrize(
    ("method", "message_name"),
    [
        ("GetUser", "GetUserRequest"),
        ("GetPost", "GetPostRequest"),
        ("GetTrending", "GetTrendingRequest"),
        ("GetArchived", "GetArchivedRequest"),
        ("ListPostsByAuthor", "ListPostsByAuthorRequest"),
        ("ListCommentsByAuthor", "ListCommentsByAuthorRequest"),
        ("BatchGetUsers", "BatchGetUsersRequest"),
        ("BatchGetPosts", "BatchGetPostsRequest"),
        ("Invalidate", "InvalidateRequest"),
        ("Warm", "WarmRequest"),
    ],
)
async def test_every_rpc_answers_malformed_bytes_with_invalid_argument(
    service: Running, method: str, message_name: str
) -> None:
    raw = service.channel.unary_unary(f"/cacheaside.v1.CacheService/{method}")
    code, details, reason = await error_of(raw, b"\x0a\xff\xff\xff\xff\x0f")
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")
    assert f"cacheaside.v1.{message_name}" in details
