"""The `cacheaside` command line: run the server, manage its database, and call every RPC."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format, text_format
from google.protobuf.message import Message

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from client.proto.cacheaside.v1 import cache_service_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 10.0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheaside", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server (settings from CACHEASIDE_*)")
    serve.add_argument("--demo", action="store_true", help="migrate and seed an empty database first")
    serve.set_defaults(run=_serve)

    database = commands.add_parser("db", help="manage the database named by CACHEASIDE_DATABASE_URL")
    db_commands = database.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply the migrations").set_defaults(run=_db_upgrade)
    seed = db_commands.add_parser("seed", help="insert deterministic demo data")
    seed.add_argument("--users", type=int, default=1000)
    seed.add_argument("--posts", type=int, default=10_000)
    seed.add_argument("--comments", type=int, default=20_000)
    seed.set_defaults(run=_db_seed)

    def rpc(name: str, help_text: str, call: Callable[[argparse.Namespace], Message], method: str) -> Any:
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--target", default=os.environ.get("CACHEASIDE_TARGET", DEFAULT_TARGET))
        command.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="deadline in seconds")
        command.add_argument("--json", action="store_true", help="print the response as JSON")
        command.set_defaults(run=lambda args: _call(args, method, call(args)))
        return command

    rpc(
        "get-user", "one user", lambda a: pb.GetUserRequest(user_id=a.id, view=_view(a)), "GetUser"
    ).add_argument("id")
    rpc("get-post", "one post", lambda a: pb.GetPostRequest(post_id=a.id), "GetPost").add_argument("id")
    rpc(
        "trending",
        "most viewed published posts",
        lambda a: pb.GetTrendingRequest(limit=a.limit),
        "GetTrending",
    )
    rpc("archived", "latest archived posts", lambda a: pb.GetArchivedRequest(limit=a.limit), "GetArchived")
    rpc(
        "posts-by-author",
        "an author's newest posts",
        lambda a: pb.ListPostsByAuthorRequest(author_id=a.id, limit=a.limit),
        "ListPostsByAuthor",
    ).add_argument("id")
    rpc(
        "comments-by-author",
        "an author's newest comments",
        lambda a: pb.ListCommentsByAuthorRequest(author_id=a.id, limit=a.limit),
        "ListCommentsByAuthor",
    ).add_argument("id")
    rpc(
        "batch-get-posts",
        "up to 100 posts",
        lambda a: pb.BatchGetPostsRequest(post_ids=a.ids),
        "BatchGetPosts",
    ).add_argument("ids", nargs="+")
    rpc(
        "batch-get-users",
        "up to 100 users",
        lambda a: pb.BatchGetUsersRequest(user_ids=a.ids, view=_view(a)),
        "BatchGetUsers",
    ).add_argument("ids", nargs="+")
    invalidate = rpc(
        "invalidate",
        "drop every cached key of the named users and posts",
        lambda a: pb.InvalidateRequest(user_ids=a.user, post_ids=a.post),
        "Invalidate",
    )
    invalidate.add_argument("--user", action="append", default=[], help="a user id (repeatable)")
    invalidate.add_argument("--post", action="append", default=[], help="a post id (repeatable)")
    warm = rpc(
        "warm",
        "cache the popular posts and active users now",
        lambda a: pb.WarmRequest(popular_posts=a.posts, active_users=a.users),
        "Warm",
    )
    warm.add_argument("--posts", type=int, default=0, help="how many posts (0: the server's default)")
    warm.add_argument("--users", type=int, default=0, help="how many users (0: the server's default)")
    for name in ("trending", "archived", "posts-by-author", "comments-by-author"):
        commands.choices[name].add_argument("--limit", type=int, default=0, help="0 means the RPC's default")
    for name in ("get-user", "batch-get-users"):
        commands.choices[name].add_argument(
            "--full", action="store_true", help="include profile and settings"
        )
    return parser


def _view(args: argparse.Namespace) -> pb.UserView.ValueType:
    return pb.USER_VIEW_FULL if getattr(args, "full", False) else pb.USER_VIEW_BASIC


def _call(args: argparse.Namespace, method: str, request: Message) -> int:
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.CacheServiceStub(channel)
        try:
            response, call = getattr(stub, method).with_call(request, timeout=args.timeout)
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    metadata = dict(call.initial_metadata() or ())
    if args.json:
        body = json_format.MessageToDict(response, preserving_proto_field_name=True)
        print(
            json.dumps(
                {"cache": metadata.get("x-cache"), "tier": metadata.get("x-cache-tier"), **body}, indent=2
            )
        )
    else:
        if "x-cache" in metadata:
            print(f"# x-cache: {metadata['x-cache']}  x-cache-tier: {metadata.get('x-cache-tier')}")
        print(text_format.MessageToString(response), end="")
    return 0


def _settings() -> Any:
    from server.config import Settings

    return Settings()


def _serve(args: argparse.Namespace) -> int:
    from server.app import serve

    asyncio.run(serve(_settings(), demo=args.demo))
    return 0


def _db_upgrade(_args: argparse.Namespace) -> int:
    from server.migrate import upgrade_sync

    upgrade_sync(_settings())
    print("database is at the latest migration")
    return 0


def _db_seed(args: argparse.Namespace) -> int:
    from server import db
    from server.seed import SeedCounts, seed

    async def run() -> int:
        engine = db.create_engine(_settings())
        try:
            return await seed(engine, SeedCounts(args.users, args.posts, args.comments))
        finally:
            await engine.dispose()

    rows = asyncio.run(run())
    print(f"seeded {rows} rows")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cacheaside` console script."""
    logging.basicConfig(
        level=os.environ.get("CACHEASIDE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args = _build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
