"""Fuzzed input over every RPC: never INTERNAL or UNKNOWN, never a crash, never a key outside the prefix.

The service runs on a private Redis, so the keyspace outside its prefix holds only the sentinel keys
planted here (other tenants: names that look like ours, globs, tags); after every example they must be
exactly as they were, and no new key may appear outside the prefix. Ids, limits, batches, enums,
durations, message sizes, tokens and raw metadata bytes are drawn by hypothesis, with the adversarial
cases listed explicitly so every run tries them.
"""

from __future__ import annotations

import asyncio
import operator
import string
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.config import Settings
from server.embedded_redis import EmbeddedRedis
from server.service import SERVICE_NAME
from tests.conftest import Running, start_service, stop_service
from tests.data import add_comment, add_post, add_user
from tests.raw_http2 import raw_unary_call

ADMIN_TOKEN = "admin-secret-0123"
ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
MAX_REQUEST_BYTES = 256 * 1024  # small, so oversized requests are cheap to make
# What a caller may be told about its own input. INTERNAL, UNKNOWN, UNAVAILABLE (nothing is down
# here) and DEADLINE_EXCEEDED would each mean the server failed on the input.
CALLER_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def fuzz(examples: int) -> hypothesis_settings:
    """Hypothesis settings for a property over one running server: bounded examples, no deadline."""
    return hypothesis_settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,  # one server for every example, on purpose
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# Ids --------------------------------------------------------------------------------------------

ADVERSARIAL_IDS = [
    *("*", "?", "[", "]", "[a-z]*", "p1*", "p?", "*:lease", "\\", "^", "!"),  # glob
    *("'", '"', "--", "[[", "]]", "--[[", "]]--", "')) redis.call('FLUSHALL') --", "#", "nil"),  # Lua
    *("%", "%s%n%x", "%00", "%2A", "{", "}", "{}", "{p1}", "{p1}:x"),  # format, hash tags
    *("\n", "\r\n", "p1\n", "\x00", "p1\x00", "\t", "\x1b[2J", "\x7f", " ", " p1", "p1 "),  # control
    *(":", "post:p1", "p1:lease", "generation", "tag:post_lists", "../..", "/", "p1/"),  # key-like
    *("🙂", "ünï", "\u202e", "\ufeff", "\uffff", "\U0001d52d\U0001d7cf", "p\u0301"),  # unicode
    *("a" * 64, "a" * 65, "é" * 64, "x" * 10_000),  # lengths at and past the bound
]
KNOWN_IDS = st.sampled_from(["u1", "u2", "p1", "p2", "c1", "ghost"])
VALID_IDS = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
LONG_IDS = st.builds(operator.mul, st.characters(), st.integers(65, 10_000))
IDS = st.one_of(KNOWN_IDS, VALID_IDS, st.sampled_from(ADVERSARIAL_IDS), st.text(max_size=80), LONG_IDS)


def batches(*sizes: int) -> st.SearchStrategy[list[str]]:
    """Short lists of any ids, and lists of exactly the given sizes (empty, at and past bounds, huge)."""
    repeated = st.builds(lambda item, n: [item] * n, st.one_of(KNOWN_IDS, VALID_IDS), st.sampled_from(sizes))
    return st.one_of(st.lists(IDS, max_size=6), repeated)


READ_BATCHES = batches(0, 1, 99, 100, 101, 1000, 100_000)
INVALIDATE_BATCHES = batches(0, 1, 999, 1000, 1001, 100_000)
INT32 = st.integers(-(2**31), 2**31 - 1)
LIMITS = st.one_of(
    st.sampled_from([-(2**31), -101, -1, 0, 1, 99, 100, 101, 10_000, 10_001, 2**31 - 1]), INT32
)
VIEWS = st.one_of(st.sampled_from([-1, 0, 1, 2, 3]), INT32)
DURATIONS = st.builds(
    Duration,
    seconds=st.one_of(
        st.sampled_from([-1, 0, 1, 86_400, 315_576_000_000, 315_576_000_001, -(2**63), 2**63 - 1]),
        st.integers(-(2**63), 2**63 - 1),
    ),
    nanos=st.one_of(st.sampled_from([0, -1, 999_999_999, 1_000_000_000]), INT32),
)
TAGS = st.lists(
    st.one_of(st.sampled_from(["post_lists", "comment_lists", "*", "tag:post_lists", ""]), IDS), max_size=3
)
WARM = st.builds(pb.WarmRequest, popular_posts=LIMITS, active_users=LIMITS, active_within=DURATIONS)

REQUESTS = st.one_of(
    st.tuples(st.just("GetUser"), st.builds(pb.GetUserRequest, user_id=IDS, view=VIEWS)),
    st.tuples(st.just("GetPost"), st.builds(pb.GetPostRequest, post_id=IDS)),
    st.tuples(st.just("GetTrending"), st.builds(pb.GetTrendingRequest, limit=LIMITS)),
    st.tuples(st.just("GetArchived"), st.builds(pb.GetArchivedRequest, limit=LIMITS)),
    st.tuples(
        st.just("ListPostsByAuthor"), st.builds(pb.ListPostsByAuthorRequest, author_id=IDS, limit=LIMITS)
    ),
    st.tuples(
        st.just("ListCommentsByAuthor"),
        st.builds(pb.ListCommentsByAuthorRequest, author_id=IDS, limit=LIMITS),
    ),
    st.tuples(
        st.just("BatchGetUsers"), st.builds(pb.BatchGetUsersRequest, user_ids=READ_BATCHES, view=VIEWS)
    ),
    st.tuples(st.just("BatchGetPosts"), st.builds(pb.BatchGetPostsRequest, post_ids=READ_BATCHES)),
    st.tuples(
        st.just("Invalidate"),
        st.builds(
            pb.InvalidateRequest,
            user_ids=INVALIDATE_BATCHES,
            post_ids=INVALIDATE_BATCHES,
            tags=TAGS,
            everything=st.booleans(),
        ),
    ),
    st.tuples(st.just("Warm"), WARM),
    st.tuples(st.just("WarmWithProgress"), st.builds(pb.WarmWithProgressRequest, warm=WARM)),
)

# The keyspace outside the service's prefix -------------------------------------------------------


class Fuzzed:
    """The service under fuzz, a client of its private Redis, and the keys it must leave alone."""

    def __init__(self, running: Running, redis: aioredis.Redis) -> None:
        self.running = running
        self.redis = redis
        self.baseline: dict[bytes, tuple[bytes | None, bool]] = {}
        self.loop_errors: list[dict[str, Any]] = []

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"Fuzzed(port={self.running.app.port}, prefix={self.running.prefix!r})"

    async def outside(self) -> dict[bytes, tuple[bytes | None, bool]]:
        """Every key outside the prefix: its DUMP and whether it has a TTL."""
        found = {}
        async for key in self.redis.scan_iter(count=1000):
            if not key.startswith(self.running.prefix.encode()):
                found[key] = (await self.redis.dump(key), await self.redis.pttl(key) > 0)
        return found

    async def assert_keyspace_untouched(self) -> None:
        """No key outside the prefix was written, deleted, created or given a TTL."""
        assert await self.outside() == self.baseline


async def _plant_sentinels(redis: aioredis.Redis, prefix: str) -> None:
    # Other tenants of the same Redis, some named to catch a glob, a missing prefix or a lost colon.
    bare = prefix.rstrip(":")
    await redis.set("cacheaside:v2:post:p1", b"another deployment's value")
    await redis.set(f"{bare}x:post:p1", b"a prefix that only starts like ours")
    await redis.set(bare, b"our prefix without its colon")
    await redis.set("post:p1", b"an unprefixed key")
    await redis.set("generation", b"7")
    await redis.set("*", b"a key named like a glob")
    await redis.sadd("tag:post_lists", b"post:p1", b"posts:trending")
    await redis.hset("other:hash", mapping={"field": "value"})
    await redis.set("other:expiring", b"v", ex=3600)


@pytest.fixture(scope="module")
def private_redis() -> Iterator[str]:
    """A Redis for this module alone: its whole keyspace is known."""
    with EmbeddedRedis() as redis_server:
        yield redis_server.url


@pytest.fixture
async def fuzzed(settings: Settings, db_engine: AsyncEngine, private_redis: str) -> AsyncIterator[Fuzzed]:
    """The service on the private Redis with an admin token, a few rows, and the sentinels planted."""
    for user_id in ("u1", "u2"):
        await add_user(db_engine, user_id)
    for n, author in ((1, "u1"), (2, "u2"), (3, "u1")):
        await add_post(db_engine, f"p{n}", author, views=n, archived=n == 3)
    await add_comment(db_engine, "c1", "p1", "u2")
    running = await start_service(
        settings,
        redis_url=private_redis,
        admin_token=SecretStr(ADMIN_TOKEN),
        max_receive_message_bytes=MAX_REQUEST_BYTES,
        warm_rate_per_s=1_000_000,  # the pacer is not under test; keep warming quick
    )
    redis = aioredis.Redis.from_url(private_redis)
    await _plant_sentinels(redis, running.prefix)
    state = Fuzzed(running, redis)
    state.baseline = await state.outside()
    loop = asyncio.get_running_loop()
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: state.loop_errors.append(context))
    try:
        yield state
        # The server is still up and still right after everything it was sent.
        health = health_pb2_grpc.HealthStub(running.channel)
        answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        response = await running.stub.GetPost(pb.GetPostRequest(post_id="p1"), timeout=5)
        assert response.post.id == "p1"
        await state.assert_keyspace_untouched()
        assert not state.loop_errors, f"unhandled errors in the server's tasks: {state.loop_errors}"
    finally:
        loop.set_exception_handler(previous_handler)
        await stop_service(running)
        await redis.flushdb()
        await redis.aclose()


async def _code_of(
    running: Running, rpc: str, request: Any, metadata: Any = ()
) -> tuple[grpc.StatusCode, str]:
    method = getattr(running.stub, rpc)
    try:
        if rpc == "WarmWithProgress":
            async for _ in method(request, metadata=metadata, timeout=10):
                pass
        else:
            await method(request, metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


# The properties ---------------------------------------------------------------------------------


@fuzz(150)
@given(rpc_request=REQUESTS)
async def test_fuzzed_requests_get_a_caller_error_or_an_answer_and_touch_no_other_key(
    fuzzed: Fuzzed, rpc_request: tuple[str, Any]
) -> None:
    rpc, request = rpc_request
    code, details = await _code_of(fuzzed.running, rpc, request, ADMIN)
    assert code in CALLER_ERRORS, (rpc, code, details)
    await fuzzed.assert_keyspace_untouched()


PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
AUTHORIZATION = st.one_of(
    st.sampled_from(
        [
            "",
            "Bearer",
            "Bearer ",
            "bearer " + ADMIN_TOKEN,  # the scheme is case-insensitive: accepted
            "BEARER " + ADMIN_TOKEN,
            "Bearer  " + ADMIN_TOKEN,
            "Basic " + ADMIN_TOKEN,
            "Token " + ADMIN_TOKEN,
            ADMIN_TOKEN,
            "Bearer " + ADMIN_TOKEN + "x",
            "Bearer " + ADMIN_TOKEN[:-1],
            "Bearer " + ADMIN_TOKEN + " " + ADMIN_TOKEN,
            "Bearer " + ADMIN_TOKEN.upper(),
        ]
    ),
    st.text(PRINTABLE, max_size=64),
    st.text(PRINTABLE, max_size=64).map("Bearer ".__add__),
    st.builds(lambda c, n: "Bearer " + c * n, PRINTABLE, st.integers(1_000, 20_000)),
)


@fuzz(60)
@given(authorization=AUTHORIZATION, request_id=st.text(PRINTABLE, max_size=300))
async def test_malformed_tokens_are_unauthenticated_and_only_the_right_one_is_accepted(
    fuzzed: Fuzzed, authorization: str, request_id: str
) -> None:
    metadata = (("authorization", authorization), ("x-request-id", request_id))
    code, details = await _code_of(
        fuzzed.running, "Invalidate", pb.InvalidateRequest(post_ids=["p1"]), metadata
    )
    right = authorization[:7].lower() == "bearer " and authorization[7:].strip(" \t") == ADMIN_TOKEN
    if right:
        assert code == grpc.StatusCode.OK, details
    else:
        # Past 8 KiB of metadata gRPC itself may refuse the call; that is a caller error too.
        assert code in {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}, (code, details)
    await fuzzed.assert_keyspace_untouched()


RAW_VALUES = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=32).map(str.encode),
    st.sampled_from([b"Bearer \xff\xfe", b"Bearer \x00", "Bearer ünï".encode(), b"Bearer \r\n", b"\x80"]),
    st.binary(max_size=16).map(lambda tail: ("Bearer " + ADMIN_TOKEN).encode() + tail),
)
RAW_KEYS = st.one_of(
    st.sampled_from([b"authorization", b"x-request-id", b"x-cache", b"grpc-timeout-x"]),
    st.text(string.ascii_lowercase + string.digits + "-_.", min_size=1, max_size=20).map(str.encode),
).filter(lambda key: not key.endswith(b"-bin") and not key.startswith(b"grpc-"))


@fuzz(60)
@given(metadata=st.lists(st.tuples(RAW_KEYS, RAW_VALUES), max_size=4))
@example(metadata=[(b"authorization", b""), (b"authorization", b"Bearer " + ADMIN_TOKEN.encode())])
@example(metadata=[(b"authorization", ("Bearer " + ADMIN_TOKEN).encode() + b"\x1c")])  # str.strip() ate it
async def test_raw_metadata_bytes_no_grpc_client_would_send_are_refused_cleanly(
    fuzzed: Fuzzed, metadata: list[tuple[bytes, bytes]]
) -> None:
    request = pb.InvalidateRequest(post_ids=["p1"]).SerializeToString()
    path = f"/{SERVICE_NAME}/Invalidate"
    answer = await raw_unary_call(fuzzed.running.app.port, path, request, metadata)
    ok_values = [value for key, value in metadata if key == b"authorization"]
    if answer.status == grpc.StatusCode.OK.value[0]:
        assert len(ok_values) == 1, answer  # several authorization entries are never accepted
        token = ok_values[0]
        assert token[:7].lower() == b"bearer ", answer
        assert token[7:].strip(b" \t") == ADMIN_TOKEN.encode(), answer
    else:
        assert answer.status == grpc.StatusCode.UNAUTHENTICATED.value[0], answer
    await fuzzed.assert_keyspace_untouched()


async def test_transport_level_garbage_is_refused_by_grpc_before_the_service_and_it_stays_up(
    fuzzed: Fuzzed,
) -> None:
    # grpc-core refuses headers HTTP/2 or gRPC forbid (an upper-case name, bad base64 in a -bin
    # header) with INTERNAL before any handler runs: the one INTERNAL the service cannot own.
    path = f"/{SERVICE_NAME}/GetPost"
    request = pb.GetPostRequest(post_id="p1").SerializeToString()
    for metadata in ([(b"Authorization", b"x")], [(b"x-id-bin", b"!!not base64")]):
        answer = await raw_unary_call(fuzzed.running.app.port, path, request, metadata)
        assert answer.status == grpc.StatusCode.INTERNAL.value[0], answer
    answer = await raw_unary_call(fuzzed.running.app.port, path, request, [])
    assert answer.status == grpc.StatusCode.OK.value[0], answer


@fuzz(60)
@given(
    rpc=st.sampled_from(["GetUser", "GetPost", "GetTrending", "BatchGetPosts", "Invalidate", "Warm"]),
    body=st.one_of(
        st.binary(max_size=200),
        st.sampled_from([b"\x0a\xff\xff\xff\xff\x0f", b"\x0a\x05ab", b"\x08" * 50, b"\x0b" * 100]),
    ),
)
async def test_request_bytes_that_are_not_the_message_are_invalid_argument(
    fuzzed: Fuzzed, rpc: str, body: bytes
) -> None:
    metadata = [(b"authorization", f"Bearer {ADMIN_TOKEN}".encode())]
    answer = await raw_unary_call(fuzzed.running.app.port, f"/{SERVICE_NAME}/{rpc}", body, metadata)
    assert answer.status in {code.value[0] for code in CALLER_ERRORS}, answer
    await fuzzed.assert_keyspace_untouched()
