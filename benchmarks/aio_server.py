"""Bench-only grpc.aio servers: the no-op ceiling, and a bare Redis hit for the server-mode comparison.

Same grpcio, same event-loop choice, same generic-handler dispatch as server/app.py, but no
interceptors and no engine. `--mode noop`: GetPost returns a constant, what grpc.aio alone costs per
call (the ceiling the product's cache hit is held to). `--mode redis`: GetPost and BatchGetPosts do
the product's one MGET (namespace generation and keys) through redis.asyncio and frame the cached
payloads, the twin of benchmarks/sync_server.py, so the two server modes do identical work. `--mode
near`: GetPost answers from a dictionary filled from Redis on a post's first call, the least a
near-cache hit can do (parse, look up, frame). Prints its port on stdout, then serves until SIGTERM.

Each runs with the product's own process tuning (its cyclic collector's settings, applied once it
serves), so a ceiling is what grpc.aio allows the product's process, not one handicapped by Python's
default collector.

    python -m benchmarks.aio_server --loop uvloop --mode noop
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

import grpc
import redis.asyncio as aioredis

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server import wire
from server.app import run
from server.cache import envelope
from server.cache.layout import KeyLayout
from server.collector import freeze_startup_heap
from server.domain.keys import POST, key_prefix

SERVICE = "cacheaside.v1.CacheService"
# A post of the seed's size, serialized once: the handler allocates nothing per call.
RESPONSE = pb.GetPostResponse(
    post=pb.Post(id="p0000000", author_id="u0000000", title="Cache lease tier warm", body="cache " * 30)
).SerializeToString()


async def _noop(_request: bytes, _context: Any) -> bytes:
    return RESPONSE


class _RedisHandlers:
    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._redis = client
        self._layout = KeyLayout(prefix, cluster=False)

    async def _payloads(self, ids: list[str], context: Any) -> list[bytes]:
        values = await self._redis.mget(
            [self._layout.generation(), *(self._layout.value(POST + post_id) for post_id in ids)]
        )
        payloads = []
        for raw in values[1:]:
            entry = envelope.unpack(raw) if isinstance(raw, bytes) else None
            if entry is None or entry.payload is None:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "not cached: the bench server only hits")
                raise AssertionError("abort raised")  # pragma: no cover
            payloads.append(entry.payload)
        return payloads

    async def get_post(self, request: pb.GetPostRequest, context: Any) -> bytes:
        return wire.frame(1, (await self._payloads([request.post_id], context))[0])

    async def batch_get_posts(self, request: pb.BatchGetPostsRequest, context: Any) -> bytes:
        return wire.frame_all(1, await self._payloads(list(request.post_ids), context))


class _NearHandlers(_RedisHandlers):
    """The least any near-cache hit does: parse the request, one dictionary lookup, frame the payload.

    A post is read from Redis once, on its first call, and kept for good: no TTL, no coherence, no
    metrics, no request id. What grpc.aio allows a handler that does a cache hit's minimum.
    """

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        super().__init__(client, prefix)
        self._near: dict[str, bytes] = {}

    async def get_post(self, request: pb.GetPostRequest, context: Any) -> bytes:
        payload = self._near.get(request.post_id)
        if payload is None:
            payload = self._near[request.post_id] = (await self._payloads([request.post_id], context))[0]
        return wire.frame(1, payload)


def _handlers(args: argparse.Namespace) -> dict[str, grpc.RpcMethodHandler[Any, bytes]]:
    if args.mode == "noop":
        return {"GetPost": grpc.unary_unary_rpc_method_handler(_noop)}
    client = aioredis.Redis.from_url(args.redis_url, max_connections=64)
    serve = (_NearHandlers if args.mode == "near" else _RedisHandlers)(client, key_prefix(args.key_prefix))
    return {
        "GetPost": grpc.unary_unary_rpc_method_handler(
            serve.get_post, request_deserializer=pb.GetPostRequest.FromString
        ),
        "BatchGetPosts": grpc.unary_unary_rpc_method_handler(
            serve.batch_get_posts, request_deserializer=pb.BatchGetPostsRequest.FromString
        ),
    }


async def _serve(args: argparse.Namespace) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, _handlers(args)),))
    port = server.add_insecure_port(args.listen)
    await server.start()
    freeze_startup_heap()
    print(port, flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(0)


def main(argv: list[str] | None = None) -> int:
    """Serve until a signal."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--mode", choices=("noop", "redis", "near"), default="noop")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--key-prefix", default="cacheaside", help="the product's CACHEASIDE_KEY_PREFIX")
    args = parser.parse_args(argv)
    run(_serve(args), args.loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
