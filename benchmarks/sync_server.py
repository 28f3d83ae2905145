"""The synchronous grpcio server on the product's hit paths, for the server-mode comparison only.

A thread pool serves GetPost and BatchGetPosts from the entries the product cached: one MGET of the
namespace generation and the keys through redis-py (sync), the 13-byte envelope stripped, the
payloads framed into the response as the product does: the twin of `benchmarks.aio_server --mode
redis`. A miss answers UNAVAILABLE: this is no cache-aside server, only the cost of the same Redis
round trip under grpcio's thread-pool server.
`--mode noop` answers a constant instead (this mode's ceiling). Prints its port, serves until SIGTERM.

    python -m benchmarks.sync_server --redis-url redis://127.0.0.1:6379/0 --key-prefix bench-1234
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from concurrent import futures
from typing import Any

import grpc
import redis

from benchmarks.aio_server import RESPONSE, SERVICE
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server import wire
from server.cache import envelope
from server.cache.layout import KeyLayout
from server.collector import freeze_startup_heap
from server.domain.keys import POST, key_prefix


class _Handlers:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._redis = client
        self._layout = KeyLayout(prefix, cluster=False)

    def _payloads(self, ids: list[str], context: Any) -> list[bytes]:
        values = self._redis.mget(
            [self._layout.generation(), *(self._layout.value(POST + post_id) for post_id in ids)]
        )
        payloads = []
        for raw in values[1:]:
            entry = envelope.unpack(raw) if isinstance(raw, bytes) else None
            if entry is None or entry.payload is None:
                context.abort(grpc.StatusCode.UNAVAILABLE, "not cached: the sync bench server only hits")
                raise AssertionError("abort raised")  # pragma: no cover
            payloads.append(entry.payload)
        return payloads

    def get_post(self, request: pb.GetPostRequest, context: Any) -> bytes:
        return wire.frame(1, self._payloads([request.post_id], context)[0])

    def batch_get_posts(self, request: pb.BatchGetPostsRequest, context: Any) -> bytes:
        return wire.frame_all(1, self._payloads(list(request.post_ids), context))


def _noop(_request: bytes, _context: Any) -> bytes:
    return RESPONSE


def main(argv: list[str] | None = None) -> int:
    """Serve until a signal."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--mode", choices=("redis", "noop"), default="redis")
    parser.add_argument("--threads", type=int, default=8, help="the server's thread pool")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--key-prefix", default="cacheaside", help="the product's CACHEASIDE_KEY_PREFIX")
    args = parser.parse_args(argv)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.threads), options=[("grpc.so_reuseport", 0)]
    )
    if args.mode == "noop":
        handlers = {"GetPost": grpc.unary_unary_rpc_method_handler(_noop)}
    else:
        pool = redis.BlockingConnectionPool.from_url(args.redis_url, max_connections=args.threads)
        serve = _Handlers(redis.Redis(connection_pool=pool), key_prefix(args.key_prefix))
        handlers = {
            "GetPost": grpc.unary_unary_rpc_method_handler(
                serve.get_post, request_deserializer=pb.GetPostRequest.FromString
            ),
            "BatchGetPosts": grpc.unary_unary_rpc_method_handler(
                serve.batch_get_posts, request_deserializer=pb.BatchGetPostsRequest.FromString
            ),
        }
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]
    port = server.add_insecure_port(args.listen)
    server.start()
    freeze_startup_heap()  # the product's collector settings, as every bench server has them
    print(port, flush=True)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    stopping.wait()
    server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
