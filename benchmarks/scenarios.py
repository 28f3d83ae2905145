"""What the suite runs: its server configurations, its scenarios, and how each run is prepared.

Every preparation ends with one real gRPC call that must come back OK with the expected `x-cache`,
since h2load checks only the HTTP status. Where the server is the product, the suite also checks the
server's own status counters after the run.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from benchmarks.servers import ServerSpec, module, product
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.config import Settings
from server.seed import post_id

GET_POST = "/cacheaside.v1.CacheService/GetPost"
BATCH_GET_POSTS = "/cacheaside.v1.CacheService/BatchGetPosts"
ZIPF_S = 1.1
WARM_KEYS = 10_000  # the Warm RPC's maximum
HOT_POST = post_id(1)
BATCH_IDS = [post_id(n) for n in range(100, 200)]
SERVER_CPU = "1"  # the server's core; the load generator gets core 0
LOAD_CPU = "0"
# The product rows run its default event loop; the `-{OTHER_LOOP}` rows the other one, for comparison.
LOOP: str = Settings.model_fields["event_loop"].default
OTHER_LOOP = "asyncio" if LOOP == "uvloop" else "uvloop"


class CheckFailed(RuntimeError):
    """A verification call did not answer as the scenario requires."""


@dataclass(frozen=True)
class Scenario:
    """One measured configuration: a server, a request (or a sequence of them), a preparation."""

    name: str
    server: str
    what: str  # one line for the table
    path: str = GET_POST
    body: bytes = b""  # the one request h2load repeats
    keyed: str = ""  # or: a request sequence for benchmarks.keyed_load ("miss", "zipf", "hit")
    prepare: str = "hit"  # a key of PREPARES
    items: int = 1  # items per call (100 for a batch)
    compare_to: str = ""  # the product server whose cache a bench-only server reads


def _get(post: str) -> bytes:
    return pb.GetPostRequest(post_id=post).SerializeToString()


HIT_REQUEST = _get(HOT_POST)
"""GetPost of the hot post: the body every single-key hit scenario sends."""
_BATCH = pb.BatchGetPostsRequest(post_ids=BATCH_IDS).SerializeToString()


def scenarios() -> list[Scenario]:
    """Every scenario, in the order of one round."""
    return [
        Scenario("hit", "aio", "GetPost, warmed key (near cache)", body=HIT_REQUEST),
        Scenario("hit-redis", "aio-l2", "GetPost, warmed key, near cache off", body=HIT_REQUEST),
        Scenario("miss", "aio", "GetPost, a new key each call", keyed="miss", prepare="miss"),
        Scenario(
            "zipf", "aio", f"GetPost, Zipf s={ZIPF_S}, top {WARM_KEYS} warmed", keyed="zipf", prepare="zipf"
        ),
        Scenario(
            "batch100", "aio", "BatchGetPosts(100), warmed", path=BATCH_GET_POSTS, body=_BATCH, items=100
        ),
        Scenario(
            "redis-down", "aio-redis-down", "the Zipf GetPosts, breaker open", keyed="zipf", prepare="bypass"
        ),
        Scenario("noop", "noop-aio", "no-op handler (ceiling)", body=HIT_REQUEST, prepare="noop"),
        Scenario("noop-keyed", "noop-aio", "no-op, keyed generator", keyed="hit", prepare="noop"),
        Scenario(
            f"hit-{OTHER_LOOP}", f"aio-{OTHER_LOOP}", "GetPost, warmed key (near cache)", body=HIT_REQUEST
        ),
        Scenario(
            f"miss-{OTHER_LOOP}",
            f"aio-{OTHER_LOOP}",
            "GetPost, new key each call",
            keyed="miss",
            prepare="miss",
        ),
        Scenario(
            f"batch100-{OTHER_LOOP}",
            f"aio-{OTHER_LOOP}",
            "BatchGetPosts(100)",
            path=BATCH_GET_POSTS,
            body=_BATCH,
            items=100,
        ),
        Scenario(
            f"noop-{OTHER_LOOP}",
            f"noop-{OTHER_LOOP}",
            "no-op handler (ceiling)",
            body=HIT_REQUEST,
            prepare="noop",
        ),
        Scenario(
            "hit-bare-aio",
            "bare-aio",
            "GetPost, one Redis MGET",
            body=HIT_REQUEST,
            prepare="twin",
            compare_to="aio",
        ),
        Scenario(
            "batch100-bare-aio",
            "bare-aio",
            "BatchGetPosts(100), one MGET",
            path=BATCH_GET_POSTS,
            body=_BATCH,
            items=100,
            prepare="twin",
            compare_to="aio",
        ),
        Scenario(
            "hit-bare-near",
            "bare-near",
            "GetPost, a dictionary hit (parse, look up, frame)",
            body=HIT_REQUEST,
            prepare="twin",
            compare_to="aio",
        ),
        Scenario(
            "hit-sync", "sync", "GetPost, one Redis MGET", body=HIT_REQUEST, prepare="twin", compare_to="aio"
        ),
        Scenario(
            "batch100-sync",
            "sync",
            "BatchGetPosts(100), one MGET",
            path=BATCH_GET_POSTS,
            body=_BATCH,
            items=100,
            prepare="twin",
            compare_to="aio",
        ),
        Scenario("noop-sync", "noop-sync", "no-op handler (ceiling)", body=HIT_REQUEST, prepare="noop"),
        Scenario("hit-2w-1cpu", "aio-2w-1cpu", "GetPost, warmed key", body=HIT_REQUEST),
        Scenario("hit-1w-2cpu", "aio-1w-2cpu", "GetPost, warmed key", body=HIT_REQUEST),
        Scenario("hit-2w-2cpu", "aio-2w-2cpu", "GetPost, warmed key, workers float", body=HIT_REQUEST),
        Scenario("hit-2w-2cpu-pin", "aio-2w-2cpu-pin", "GetPost, warmed key, a core each", body=HIT_REQUEST),
    ]


def server_specs(env: Mapping[str, str], run_id: str, down_redis_url: str) -> dict[str, ServerSpec]:
    """Every server configuration; `env` holds the database, Redis and warming settings."""

    def aio(
        name: str, *, loop: str = LOOP, cpus: str = SERVER_CPU, workers: int = 1, **more: str
    ) -> ServerSpec:
        own = {**env, "CACHEASIDE_KEY_PREFIX": f"bench-{run_id}-{name}", "CACHEASIDE_EVENT_LOOP": loop}
        return product(name, own | more, cpus=cpus, workers=workers)

    sync_args = ("--redis-url", env["CACHEASIDE_REDIS_URL"], "--key-prefix", f"bench-{run_id}-aio")
    specs = [
        aio("aio"),
        aio("aio-l2", CACHEASIDE_NEAR_CACHE_ENTRIES="0"),  # every hit reads Redis
        aio(f"aio-{OTHER_LOOP}", loop=OTHER_LOOP),
        aio("aio-redis-down", CACHEASIDE_REDIS_URL=down_redis_url),
        module("noop-aio", "benchmarks.aio_server", "--loop", LOOP, cpus=SERVER_CPU),
        module(f"noop-{OTHER_LOOP}", "benchmarks.aio_server", "--loop", OTHER_LOOP, cpus=SERVER_CPU),
        module(
            "bare-aio",
            "benchmarks.aio_server",
            "--loop",
            LOOP,
            "--mode",
            "redis",
            *sync_args,
            cpus=SERVER_CPU,
        ),
        module(
            "bare-near",
            "benchmarks.aio_server",
            "--loop",
            LOOP,
            "--mode",
            "near",
            *sync_args,
            cpus=SERVER_CPU,
        ),
        module("sync", "benchmarks.sync_server", *sync_args, cpus=SERVER_CPU),
        module("noop-sync", "benchmarks.sync_server", "--mode", "noop", cpus=SERVER_CPU),
        aio("aio-2w-1cpu", workers=2),
        aio("aio-1w-2cpu", cpus="0,1"),
        aio("aio-2w-2cpu", cpus="0,1", workers=2),
        aio("aio-2w-2cpu-pin", cpus="0,1", workers=2, CACHEASIDE_PIN_WORKERS="true"),
    ]
    return {spec.name: spec for spec in specs}


def request_sequences(popularity: Sequence[str], *, calls: int = 200_000) -> dict[str, list[bytes]]:
    """The keyed generator's requests: every post once, shuffled (miss); Zipf over popularity rank."""
    shuffled = list(popularity)
    random.Random(12).shuffle(shuffled)
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(len(popularity))]
    zipf = random.Random(11).choices(popularity, weights=weights, k=calls)
    return {
        "miss": [_get(post) for post in shuffled[:-1]],  # the last one is kept for the check
        "zipf": [_get(post) for post in zipf],
        "hit": [_get(post) for post in popularity[:1000]],
        "miss-check": [_get(shuffled[-1])],
    }


# Preparations --------------------------------------------------------------------------------


@dataclass
class Target:
    """What a preparation can reach: the server under test and, for bench-only servers, the product."""

    stub: Any
    product_stub: Any | None
    sequences: Mapping[str, list[bytes]]


def probe_hit(target: str, *, timeout_s: float = 10) -> tuple[bytes, str]:
    """One real GetPost of the hot post, outside any event loop: the response bytes and x-cache (empty
    from the bench-only servers, which send none). For the benchmarks that drive h2load themselves."""
    with grpc.insecure_channel(target) as channel:
        response, answered = channel.unary_unary(GET_POST).with_call(HIT_REQUEST, timeout=timeout_s)
        return response, str(dict(answered.trailing_metadata() or ()).get("x-cache", ""))


async def _call(stub: Any, scenario: Scenario, body: bytes) -> tuple[bytes, str]:
    method = stub.BatchGetPosts if scenario.path == BATCH_GET_POSTS else stub.GetPost
    request_type = pb.BatchGetPostsRequest if scenario.path == BATCH_GET_POSTS else pb.GetPostRequest
    call = method(request_type.FromString(body), timeout=10)
    try:
        response = await call
    except grpc.aio.AioRpcError as exc:
        raise CheckFailed(f"{scenario.name}: {exc.code().name} {exc.details()}") from exc
    metadata = dict(await call.trailing_metadata())
    return response.SerializeToString(), str(metadata.get("x-cache", ""))


async def _expect(stub: Any, scenario: Scenario, body: bytes, cache: str) -> bytes:
    response, seen = await _call(stub, scenario, body)
    if seen != cache:
        raise CheckFailed(f"{scenario.name}: x-cache {seen!r}, expected {cache!r}")
    return response


async def _hit(target: Target, scenario: Scenario) -> None:
    await _call(target.stub, scenario, scenario.body)
    await _expect(target.stub, scenario, scenario.body, "hit")


async def _miss(target: Target, scenario: Scenario) -> None:
    await target.stub.Invalidate(pb.InvalidateRequest(everything=True), timeout=10)
    await _expect(target.stub, scenario, target.sequences["miss-check"][0], "miss")


async def _zipf(target: Target, scenario: Scenario) -> None:
    await target.stub.Invalidate(pb.InvalidateRequest(everything=True), timeout=10)
    warmed = await target.stub.Warm(pb.WarmRequest(popular_posts=WARM_KEYS, active_users=1), timeout=120)
    if not warmed.posts_warmed:
        raise CheckFailed("zipf: Warm warmed no post")
    await _expect(target.stub, scenario, target.sequences["hit"][0], "hit")  # the most popular


async def _bypass(target: Target, scenario: Scenario) -> None:
    for _ in range(10):  # the first calls open the breaker
        _, seen = await _call(target.stub, scenario, scenario.body or target.sequences["hit"][0])
        if seen == "bypass":
            return
    raise CheckFailed(f"{scenario.name}: x-cache {seen!r}, expected 'bypass' with Redis down")


async def _noop(target: Target, scenario: Scenario) -> None:
    response, _ = await _call(target.stub, scenario, scenario.body or target.sequences["hit"][0])
    if not pb.GetPostResponse.FromString(response).post.id:
        raise CheckFailed(f"{scenario.name}: empty response")


async def _twin(target: Target, scenario: Scenario) -> None:
    assert target.product_stub is not None
    await _hit(Target(target.product_stub, None, target.sequences), scenario)  # cached, this generation
    expected, _ = await _call(target.product_stub, scenario, scenario.body)
    response, _ = await _call(target.stub, scenario, scenario.body)
    if response != expected:
        raise CheckFailed(f"{scenario.name}: the bench server's answer differs from the product's")


PREPARES: dict[str, Callable[[Target, Scenario], Awaitable[None]]] = {
    "hit": _hit,
    "miss": _miss,
    "zipf": _zipf,
    "bypass": _bypass,
    "noop": _noop,
    "twin": _twin,
}
