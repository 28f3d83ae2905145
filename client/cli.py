"""The `cacheaside` command line: run the server, manage its database, and call every RPC."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import json_format, text_format
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from tqdm import tqdm

from client import stats
from client.client import (
    BATCH_GET_POSTS,
    BATCH_GET_USERS,
    CACHE_DEBUG_METADATA,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    GET_ARCHIVED,
    GET_POST,
    GET_TRENDING,
    GET_USER,
    INVALIDATE,
    LIST_COMMENTS_BY_AUTHOR,
    LIST_POSTS_BY_AUTHOR,
    CacheClient,
    Rpc,
    metadata_dict,
    tls_credentials,
)
from client.proto.cacheaside.v1 import cache_service_pb2 as pb


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheaside", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server (settings from CACHEASIDE_*)")
    serve.add_argument("--demo", action="store_true", help="migrate and seed an empty database first")
    serve.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes sharing the port with SO_REUSEPORT (default CACHEASIDE_WORKERS, 1)",
    )
    serve.set_defaults(run=_serve)

    database = commands.add_parser("db", help="manage the database named by CACHEASIDE_DATABASE_URL")
    db_commands = database.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply the migrations").set_defaults(run=_db_upgrade)
    seed = db_commands.add_parser("seed", help="insert deterministic demo data")
    seed.add_argument("--users", type=int, default=1000)
    seed.add_argument("--posts", type=int, default=10_000)
    seed.add_argument("--comments", type=int, default=20_000)
    seed.set_defaults(run=_db_seed)

    def rpc(
        name: str, help_text: str, call: Callable[[argparse.Namespace], Message], method: Rpc[Any, Any]
    ) -> Any:
        command = commands.add_parser(name, help=help_text)
        _connection_options(command)
        command.add_argument("--json", action="store_true", help="print the response as JSON")
        command.set_defaults(run=lambda args: _call(args, method, call(args)))
        return command

    rpc(
        "get-user", "one user", lambda a: pb.GetUserRequest(user_id=a.id, view=_view(a)), GET_USER
    ).add_argument("id")
    rpc("get-post", "one post", lambda a: pb.GetPostRequest(post_id=a.id), GET_POST).add_argument("id")
    rpc(
        "trending",
        "most viewed published posts",
        lambda a: pb.GetTrendingRequest(limit=a.limit),
        GET_TRENDING,
    )
    rpc("archived", "latest archived posts", lambda a: pb.GetArchivedRequest(limit=a.limit), GET_ARCHIVED)
    rpc(
        "posts-by-author",
        "an author's newest posts",
        lambda a: pb.ListPostsByAuthorRequest(author_id=a.id, limit=a.limit),
        LIST_POSTS_BY_AUTHOR,
    ).add_argument("id")
    rpc(
        "comments-by-author",
        "an author's newest comments",
        lambda a: pb.ListCommentsByAuthorRequest(author_id=a.id, limit=a.limit),
        LIST_COMMENTS_BY_AUTHOR,
    ).add_argument("id")
    rpc(
        "batch-get-posts",
        "up to 100 posts",
        lambda a: pb.BatchGetPostsRequest(post_ids=a.ids),
        BATCH_GET_POSTS,
    ).add_argument("ids", nargs="+")
    rpc(
        "batch-get-users",
        "up to 100 users",
        lambda a: pb.BatchGetUsersRequest(user_ids=a.ids, view=_view(a)),
        BATCH_GET_USERS,
    ).add_argument("ids", nargs="+")
    invalidate = rpc(
        "invalidate",
        "drop every cached key of the named users, posts and tags, or of everything",
        lambda a: pb.InvalidateRequest(user_ids=a.user, post_ids=a.post, tags=a.tag, everything=a.everything),
        INVALIDATE,
    )
    invalidate.add_argument("--user", action="append", default=[], help="a user id (repeatable)")
    invalidate.add_argument("--post", action="append", default=[], help="a post id (repeatable)")
    invalidate.add_argument(
        "--tag", action="append", default=[], help="post_lists or comment_lists (repeatable)"
    )
    invalidate.add_argument("--everything", action="store_true", help="every key of this deployment")
    warm = commands.add_parser(
        "warm", help="cache the popular posts and active users now, with a progress bar"
    )
    _connection_options(warm)
    warm.add_argument("--json", action="store_true", help="print the final counts as JSON, no bar")
    warm.set_defaults(run=_warm)
    warm.add_argument("--posts", type=int, default=0, help="how many posts (0: the server's default)")
    warm.add_argument("--users", type=int, default=0, help="how many users (0: the server's default)")
    for name in ("trending", "archived", "posts-by-author", "comments-by-author"):
        commands.choices[name].add_argument("--limit", type=int, default=0, help="0 means the RPC's default")
    for name in ("get-user", "batch-get-users"):
        commands.choices[name].add_argument(
            "--full", action="store_true", help="include profile and settings"
        )

    health = commands.add_parser(
        "health", help="grpc.health.v1 check; exit 0 when SERVING (the container's HEALTHCHECK)"
    )
    _connection_options(health, timeout_s=3.0)
    health.add_argument("--service", default="", help='"" (the server) or cacheaside.v1.CacheService')
    health.add_argument("--json", action="store_true", help="print the status as JSON")
    # The server's probe port (CACHEASIDE_HEALTH_LISTEN, plaintext) where the container names one.
    health.set_defaults(run=_health, target=os.environ.get("CACHEASIDE_HEALTH_TARGET") or _default_target())

    stats_command = commands.add_parser(
        "stats", help="a summary of one server's metrics: calls, cache outcomes, Redis, database, warming"
    )
    stats_command.add_argument(
        "--metrics-url",
        default=os.environ.get("CACHEASIDE_METRICS_URL", stats.DEFAULT_METRICS_URL),
        help="the server's /metrics (default CACHEASIDE_METRICS_URL or %(default)s)",
    )
    stats_command.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")
    stats_command.add_argument("--json", action="store_true", help="print the summary as JSON")
    stats_command.set_defaults(run=_stats)
    return parser


def _connection_options(command: argparse.ArgumentParser, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    env = os.environ.get
    command.add_argument("--target", default=_default_target(), help="host:port")
    command.add_argument("--timeout", type=float, default=timeout_s, help="deadline in seconds")
    command.add_argument(
        "--token", default=env("CACHEASIDE_TOKEN", ""), help="bearer token (default CACHEASIDE_TOKEN)"
    )
    command.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs or --ca-file")
    command.add_argument(
        "--ca-file", default=env("CACHEASIDE_CLIENT_CA_FILE", ""), help="CA of the server's certificate"
    )
    command.add_argument(
        "--cert-file", default=env("CACHEASIDE_CLIENT_CERT_FILE", ""), help="client certificate (mTLS)"
    )
    command.add_argument(
        "--key-file", default=env("CACHEASIDE_CLIENT_KEY_FILE", ""), help="client private key (mTLS)"
    )


def _default_target() -> str:
    return os.environ.get("CACHEASIDE_TARGET", DEFAULT_TARGET)


def _client(args: argparse.Namespace, *, max_attempts: int | None = None) -> CacheClient:
    credentials = None
    if args.tls or args.ca_file or args.cert_file:
        credentials = tls_credentials(
            ca_file=args.ca_file or None, cert_file=args.cert_file or None, key_file=args.key_file or None
        )
    extra = {} if max_attempts is None else {"max_attempts": max_attempts}
    return CacheClient(
        args.target, timeout_s=args.timeout, token=args.token or None, credentials=credentials, **extra
    )


def _view(args: argparse.Namespace) -> pb.UserView.ValueType:
    return pb.USER_VIEW_FULL if getattr(args, "full", False) else pb.USER_VIEW_BASIC


def _call(args: argparse.Namespace, method: Rpc[Any, Any], request: Message) -> int:
    with _client(args) as client:
        try:
            # A person reading the answer is debugging: ask for the tier too.
            reply = client.call(method, request, metadata=CACHE_DEBUG_METADATA)
        except grpc.RpcError as error:
            trailers = metadata_dict(error.trailing_metadata())
            request_id = f" (request id {trailers['x-request-id']})" if "x-request-id" in trailers else ""
            print(f"error: {error.code().name}: {error.details()}{request_id}", file=sys.stderr)
            return 1
    if args.json:
        body = json_format.MessageToDict(reply.response, preserving_proto_field_name=True)
        print(json.dumps({"cache": reply.cache, "tier": reply.tier, **body}, indent=2))
    else:
        if reply.cache is not None:
            print(f"# x-cache: {reply.cache}  x-cache-tier: {reply.tier}")
        print(text_format.MessageToString(reply.response), end="")
    return 0


def _warm(args: argparse.Namespace) -> int:
    last = pb.WarmWithProgressResponse()
    with _client(args) as client, tqdm(unit="keys", desc="warming", disable=args.json) as bar:
        try:
            for progress in client.warm_with_progress(posts=args.posts, users=args.users):
                bar.total = progress.posts_total + progress.users_total
                bar.update(progress.posts_done + progress.users_done - bar.n)
                last = progress
        except grpc.RpcError as error:
            bar.close()
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    counts = {"posts_warmed": last.posts_warmed, "users_warmed": last.users_warmed}
    print(
        json.dumps(counts) if args.json else f"warmed {last.posts_warmed} posts and {last.users_warmed} users"
    )
    return 0


def _health(args: argparse.Namespace) -> int:
    # A probe answers now or fails: no retries stretching it past the orchestrator's own timeout.
    probe_port = args.target == os.environ.get("CACHEASIDE_HEALTH_TARGET")
    # The probe port speaks plaintext and needs no token (server/app.py's _probe_server): none is sent.
    connect = CacheClient(args.target, timeout_s=args.timeout, max_attempts=1) if probe_port else None
    with connect or _client(args, max_attempts=1) as client:
        try:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(client.health(args.service))
        except grpc.RpcError as error:
            status = f"{error.code().name}: {error.details()}"
    print(json.dumps({"service": args.service, "status": status}) if args.json else status)
    return 0 if status == "SERVING" else 1


def _stats(args: argparse.Namespace) -> int:
    try:
        text = stats.scrape(args.metrics_url, timeout_s=args.timeout)
    except OSError as exc:
        print(f"error: cannot read {args.metrics_url}: {exc}", file=sys.stderr)
        return 1
    summary = stats.summarize(text)
    print(json.dumps(summary, indent=2) if args.json else stats.render(summary))
    return 0


def _settings() -> Any:
    from server.config import Settings

    return Settings()


def _serve(args: argparse.Namespace) -> int:
    from server.logs import configure_logging

    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
    workers = args.workers or settings.workers
    if workers > 1:
        from server.workers import run_workers

        return run_workers(settings, workers, demo=args.demo)
    from server.app import run, serve

    run(serve(settings, demo=args.demo), settings.event_loop)
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


_STOPPED_BY_SIGPIPE = 128 + signal.SIGPIPE  # the status a shell reports for a process SIGPIPE ended


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cacheaside` console script."""
    logging.basicConfig(
        level=os.environ.get("CACHEASIDE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args = _build_parser().parse_args(argv)
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # here, where a reader gone away can be caught, not at the interpreter's exit
    except BrokenPipeError:
        # The output's reader stopped early (`| head`): end quietly, as the shell's own tools do, with
        # the status of a process ended by SIGPIPE. stdout goes to /dev/null so that the flush at exit
        # does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _STOPPED_BY_SIGPIPE
    return code


if __name__ == "__main__":
    raise SystemExit(main())
