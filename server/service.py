"""RPC handlers: validate, plan the lookups, run the one generic cache-aside path, map errors.

Each read RPC is a plan: which (family, id) lookups it needs and how their cached payloads frame into
the response bytes. One handler runs every plan, so caching, metadata and errors behave the same for
all of them. Responses are bytes: cached payloads go to the wire without a decode and re-encode.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, NoReturn, Protocol, TypeAlias, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server import wire
from server.audit import RecentReads
from server.cache import (
    Answers,
    CacheEngine,
    CacheUnavailable,
    DatabaseSaturated,
    Family,
    FlightTimeout,
    LoadTimeout,
    MissesSaturated,
    Outcome,
    RecentLoadFailure,
)
from server.config import Tier
from server.domain import invalidation
from server.domain.catalog import Catalog
from server.domain.keys import TAGS
from server.errors import (
    CacheUnavailableForWrite,
    DatabaseUnavailable,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ServiceError,
    to_status,
)
from server.handlers import answering_now
from server.validation import check_duration_s, check_id, check_ids, check_limit
from server.warming import WarmProgress, Warms

_LOGGER = logging.getLogger(__name__)
SERVICE_NAME = "cacheaside.v1.CacheService"
MAX_INVALIDATE_IDS = 1000
MAX_WARM_ITEMS = 10_000
MAX_ACTIVE_WITHIN_S = 1000 * 365 * 86_400
_DEADLINE_MARGIN_S = 0.005  # answer DEADLINE_EXCEEDED ourselves, just before gRPC cancels the call
_T = TypeVar("_T")
_RESPONSE_FIELD = 1  # the single field of every read response: user(s), post(s) or comments
_HIT = Outcome.HIT
CACHE_DEBUG_HEADER = "x-cache-debug"
"""Request metadata (any value) that asks a read for x-cache-tier as well as x-cache."""


ReadPlan: TypeAlias = "tuple[Sequence[tuple[Family, str]], Callable[[list[bytes]], bytes]]"
"""The lookups one read needs, and how their cached payloads become the response bytes.

A plain tuple, made on every read: building a named tuple costs thirty times as much.
"""
Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]
RawHandler = Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]
StreamHandler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[bytes]]
Metadata = tuple[tuple[str, str | bytes], ...]


class Tally(Protocol):
    """A counter added to in place: `value += 1` costs a held answer half what a method call does."""

    value: int


class ServiceObserver(Protocol):
    """What the handlers report as they serve (the metrics implement it)."""

    def read_recorder(self, rpc: str) -> Callable[[Outcome, str], None]:
        """A function called once per read of `rpc` with its outcome and tier; built once per RPC."""
        ...

    def read_counter(self, rpc: str, outcome: Outcome, tier: str) -> Tally:
        """The counter of reads of `rpc` with this outcome and tier that `read_recorder`'s adds to."""
        ...

    def invalidated(self, keys: int) -> None:
        """An Invalidate call deleted `keys` cached keys."""
        ...


class CacheService:
    """The handlers of cacheaside.v1.CacheService over an engine, a catalog and a warmer."""

    def __init__(
        self,
        engine: CacheEngine,
        catalog: Catalog,
        warmer: Warms,
        *,
        observer: ServiceObserver | None = None,
        recent_reads: RecentReads | None = None,
    ) -> None:
        self._engine = engine
        self._catalog = catalog
        self._warmer = warmer
        self._observer = observer
        self._recent_reads = recent_reads

    def method_handlers(self, *, debug: bool = False) -> dict[str, grpc.RpcMethodHandler[Any, bytes]]:
        """Every RPC of the service, by method name; with debug, reads answer with x-cache-tier too
        (for calls that send CACHE_DEBUG_HEADER)."""
        # Per read: its request, what a missing id names (a user, a post...), and its plan.
        reads: dict[str, tuple[type[Message], str, Callable[[Any], ReadPlan]]] = {
            "GetUser": (pb.GetUserRequest, "user", self._plan_get_user),
            "GetPost": (pb.GetPostRequest, "post", self._plan_get_post),
            "GetTrending": (pb.GetTrendingRequest, "list", self._plan_trending),
            "GetArchived": (pb.GetArchivedRequest, "list", self._plan_archived),
            "ListPostsByAuthor": (pb.ListPostsByAuthorRequest, "author", self._plan_posts_by_author),
            "ListCommentsByAuthor": (pb.ListCommentsByAuthorRequest, "author", self._plan_comments_by_author),
            "BatchGetUsers": (pb.BatchGetUsersRequest, "user", self._plan_batch_users),
            "BatchGetPosts": (pb.BatchGetPostsRequest, "post", self._plan_batch_posts),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(self._read(name, request, subject, plan, debug=debug))
            for name, (request, subject, plan) in reads.items()
        }
        handlers["Invalidate"] = _unary(pb.InvalidateRequest, self._invalidate)
        handlers["Warm"] = _unary(pb.WarmRequest, self._warm)
        handlers["WarmWithProgress"] = _stream(pb.WarmWithProgressRequest, self._warm_with_progress)
        return handlers

    # The generic cache-aside path -------------------------------------------------------------

    def _read(
        self,
        rpc: str,
        request_type: type[Message],
        subject: str,
        plan_of: Callable[[Any], ReadPlan],
        *,
        debug: bool,
    ) -> RawHandler:
        """The one handler of every read: parse, plan, near cache or shared path, metadata, frame.

        It parses the request bytes itself and maps errors as `_unary` does, in one coroutine: on a
        near-cache hit every layer of coroutines is a cost. A response built from the near cache is
        held by its request bytes (the engine's `answers`), so the same request again skips the parse,
        the plan, the lookups and the framing, until the near cache would have stopped serving them.
        With debug, the metadata has x-cache-tier too, and nothing is held (debug calls are few).
        """
        parse, malformed = request_type.FromString, _malformed(request_type)
        cache_metadata = _DEBUG_CACHE_METADATA if debug else _CACHE_METADATA
        record = self._observer.read_recorder(rpc) if self._observer is not None else None
        note = self._recent_reads.note if self._recent_reads is not None else None
        engine = self._engine
        # A held answer's detail: its lookups (for the audit), its hit counter, its cache metadata, all
        # resolved when it is held: reporting it through `record` and the metadata table, as the read
        # that built it was, cost 5k more instructions per hit (`make bench-instructions`, 1.3%).
        answers: Answers[tuple[Sequence[tuple[Family, str]], Tally | None, Metadata]] | None
        answers = engine.answers() if not debug else None
        count_hit = self._observer.read_counter if self._observer is not None else None
        held_details: dict[str, tuple[Tally | None, Metadata]] = {}  # by tier, made once

        async def handle(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            # Held answers are asked for by the guard, which is how every call reaches this.
            try:
                request = parse(raw)
            except DecodeError:
                await _abort(context, malformed)
            try:
                lookups, build = plan_of(request)
                # A near-cache hit needs no I/O, hence no deadline timer either.
                near = engine.fetch_near(lookups)
                if near is not None:
                    payloads, outcome = near[0], _HIT
                else:
                    payloads, outcome = await _within_deadline(context, engine.fetch_shared(lookups))
                tier = _reported(lookups, outcome, record, note)
                if None in payloads:
                    missing = [
                        item_id for (_, item_id), p in zip(lookups, payloads, strict=True) if p is None
                    ]
                    raise NotFound(_not_found_message(subject, missing))
                # Trailing metadata leaves with the response and status in one batch; initial metadata
                # would be a batch of its own, 15% of a near-cache hit's CPU. Appended to the request id.
                context.set_trailing_metadata(context.trailing_metadata() + cache_metadata[outcome, tier])
                response = build(payloads)  # type: ignore[arg-type]  # no None left: checked above
                if near is not None and answers is not None:
                    detail = held_details.get(tier)
                    if detail is None:
                        hits = count_hit(rpc, _HIT, tier) if count_hit is not None else None
                        detail = held_details[tier] = (hits, cache_metadata[_HIT, tier])
                    _, until, wall_until, keys = near
                    answers.put(
                        raw, response, (lookups, *detail), keys=keys, until=until, wall_until=wall_until
                    )
                return response
            except _UNAVAILABLE_ERRORS as exc:
                await _abort(context, exc)

        if answers is None:
            return handle

        def answer_now(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes | None:
            held = answers.get(raw)
            if held is None:
                return None
            _, _, response, (lookups, hits, held_metadata) = held
            if hits is not None:
                hits.value += 1
            if note is not None:
                note(lookups)
            # Tuple concatenation returns held_metadata itself when nothing is there yet (no caller's id).
            context.set_trailing_metadata(context.trailing_metadata() + held_metadata)
            return response

        return answering_now(handle, answer_now)

    # Plans -----------------------------------------------------------------------------------

    def _user_lookups(self, user_id: str, view: int) -> list[tuple[Family, str]]:
        catalog = self._catalog
        if view == pb.USER_VIEW_FULL:
            return [
                (catalog.user, user_id),
                (catalog.user_profile, user_id),
                (catalog.user_settings, user_id),
            ]
        if view in (pb.USER_VIEW_UNSPECIFIED, pb.USER_VIEW_BASIC):
            return [(catalog.user, user_id)]
        raise InvalidArgument(
            f"view {view} is not a UserView; use USER_VIEW_BASIC or USER_VIEW_FULL", reason="INVALID_VIEW"
        )

    def _plan_get_user(self, request: pb.GetUserRequest) -> ReadPlan:
        return self._user_lookups(check_id("user_id", request.user_id), request.view), _frame_joined

    def _plan_batch_users(self, request: pb.BatchGetUsersRequest) -> ReadPlan:
        ids = check_ids("user_ids", request.user_ids)
        per_user = len(self._user_lookups(ids[0], request.view))
        lookups = [lookup for user_id in ids for lookup in self._user_lookups(user_id, request.view)]

        def build(parts: list[bytes]) -> bytes:
            users = [b"".join(parts[i : i + per_user]) for i in range(0, len(parts), per_user)]
            return wire.frame_all(_RESPONSE_FIELD, users)

        return lookups, build

    def _plan_get_post(self, request: pb.GetPostRequest) -> ReadPlan:
        return [(self._catalog.post, check_id("post_id", request.post_id))], _frame_one

    def _plan_batch_posts(self, request: pb.BatchGetPostsRequest) -> ReadPlan:
        ids = check_ids("post_ids", request.post_ids)
        post = self._catalog.post
        return [(post, post_id) for post_id in ids], _frame_each

    def _plan_trending(self, request: pb.GetTrendingRequest) -> ReadPlan:
        limit = check_limit("limit", request.limit, default=10, maximum=100)
        return _list_plan(self._catalog.trending, "", limit)

    def _plan_archived(self, request: pb.GetArchivedRequest) -> ReadPlan:
        limit = check_limit("limit", request.limit, default=20, maximum=100)
        return _list_plan(self._catalog.archived, "", limit)

    def _plan_posts_by_author(self, request: pb.ListPostsByAuthorRequest) -> ReadPlan:
        author_id = check_id("author_id", request.author_id)
        limit = check_limit("limit", request.limit, default=20, maximum=100)
        return _list_plan(self._catalog.posts_by_author, author_id, limit)

    def _plan_comments_by_author(self, request: pb.ListCommentsByAuthorRequest) -> ReadPlan:
        author_id = check_id("author_id", request.author_id)
        limit = check_limit("limit", request.limit, default=20, maximum=100)
        return _list_plan(self._catalog.comments_by_author, author_id, limit)

    # Admin -----------------------------------------------------------------------------------

    async def _invalidate(self, request: pb.InvalidateRequest, context: Any) -> bytes:
        user_ids = [check_id(f"user_ids[{i}]", v) for i, v in enumerate(request.user_ids)]
        post_ids = [check_id(f"post_ids[{i}]", v) for i, v in enumerate(request.post_ids)]
        if not (user_ids or post_ids or request.tags or request.everything):
            raise InvalidArgument(
                "name at least one of user_ids, post_ids, tags, or everything", reason="EMPTY_BATCH"
            )
        if len(user_ids) + len(post_ids) > MAX_INVALIDATE_IDS:
            raise InvalidArgument(
                f"at most {MAX_INVALIDATE_IDS} ids per Invalidate; split the request",
                reason="BATCH_TOO_LARGE",
            )
        targets = invalidation.for_ids(user_ids=user_ids, post_ids=post_ids)
        for tag in request.tags:
            if tag not in TAGS:
                raise InvalidArgument(
                    f"unknown tag {tag[:64]!r}; the tags are {', '.join(sorted(TAGS))}", reason="UNKNOWN_TAG"
                )
            targets.tags[TAGS[tag]] = None
        try:
            deleted = await self._engine.invalidate(list(targets.keys), list(targets.tags))
            if request.everything:
                generation = await self._engine.invalidate_everything()
            else:
                generation = await self._engine.store.generation()
        except CacheUnavailable as exc:
            raise CacheUnavailableForWrite(
                f"redis is unreachable ({exc}), so nothing was invalidated; retry when it is back"
            ) from exc
        if self._observer is not None:
            self._observer.invalidated(deleted)
        return pb.InvalidateResponse(keys_invalidated=deleted, generation=generation).SerializeToString()

    def _warm_choices(self, request: pb.WarmRequest) -> dict[str, Any]:
        posts = check_limit("popular_posts", request.popular_posts, default=0, maximum=MAX_WARM_ITEMS)
        users = check_limit("active_users", request.active_users, default=0, maximum=MAX_WARM_ITEMS)
        # Longer than the clock can go back means everyone: the window is cut to MAX_ACTIVE_WITHIN_S.
        within_s = check_duration_s("active_within", request.active_within, at_most_s=MAX_ACTIVE_WITHIN_S)
        return {"posts": posts or None, "users": users or None, "active_within_s": within_s or None}

    async def _warm(self, request: pb.WarmRequest, context: Any) -> bytes:
        choices = self._warm_choices(request)
        with _nothing_warmed_without_redis():
            result = await self._warmer.warm(**choices)
        return pb.WarmResponse(posts_warmed=result.posts, users_warmed=result.users).SerializeToString()

    async def _warm_with_progress(
        self, request: pb.WarmWithProgressRequest, context: Any
    ) -> AsyncIterator[bytes]:
        choices = self._warm_choices(request.warm)
        reports: asyncio.Queue[WarmProgress] = asyncio.Queue()
        warming = asyncio.create_task(self._warmer.warm(**choices, on_progress=reports.put_nowait))
        try:
            while True:
                report = asyncio.ensure_future(reports.get())
                await asyncio.wait({report, warming}, return_when=asyncio.FIRST_COMPLETED)
                if not report.done():
                    report.cancel()
                    if reports.empty():
                        break  # warming ended without its last report: it failed, raised below
                    continue
                progress = report.result()
                yield pb.WarmWithProgressResponse(**dataclasses.asdict(progress)).SerializeToString()
                if progress.done:
                    break
        except BaseException:
            warming.cancel()  # the caller went away: stop warming on its behalf
            raise
        # After the last report the warm may still be returning (from the warm worker, a message later).
        with _nothing_warmed_without_redis():
            await warming


@contextlib.contextmanager
def _nothing_warmed_without_redis() -> Iterator[None]:
    try:
        yield
    except CacheUnavailable as exc:
        raise CacheUnavailableForWrite(
            f"redis is unreachable ({exc}), so nothing more was warmed; retry when it is back"
        ) from exc


def _list_plan(family: Family, item_id: str, limit: int) -> ReadPlan:
    # Lists are cached at full length; the caller's limit cuts the records on the way out.
    return [(family, item_id)], lambda parts: wire.take_records(parts[0], limit)


# How payloads become the response where the request does not shape it: made once, not per call.
def _frame_one(parts: list[bytes]) -> bytes:
    return wire.frame(_RESPONSE_FIELD, parts[0])


def _frame_joined(parts: list[bytes]) -> bytes:
    # The FULL view's profile and settings are User field records: concatenated, they merge.
    return wire.frame(_RESPONSE_FIELD, b"".join(parts))


def _frame_each(parts: list[bytes]) -> bytes:
    return wire.frame_all(_RESPONSE_FIELD, parts)


def _not_found_message(subject: str, ids: list[str]) -> str:
    unique = list(dict.fromkeys(ids))
    if len(unique) == 1:
        return f"no {subject} has id {unique[0]!r}"
    return f"no {subject} has any of the ids {', '.join(repr(i) for i in unique)}"


async def _within_deadline(context: grpc.aio.ServicerContext[Any, Any], work: Awaitable[_T]) -> _T:
    # The shared load goes on in its own task; only this caller's wait ends at its deadline.
    remaining = context.time_remaining()
    if remaining is None:
        return await work
    try:
        async with asyncio.timeout(max(remaining - _DEADLINE_MARGIN_S, 0)):
            return await work
    except TimeoutError as exc:
        raise DeadlineExceeded(
            "the answer was not ready within your deadline; the load goes on, so a retry may hit the cache"
        ) from exc


def _reported(
    lookups: Sequence[tuple[Family, str]],
    outcome: Outcome,
    record: Callable[[Outcome, str], None] | None,
    note: Callable[[Sequence[tuple[Family, str]]], None] | None,
) -> str:
    # What every read reports, found or not: its outcome and tier to the metrics, its lookups to the
    # consistency audit (one append, no copy). Returns the tier, for the trailing metadata.
    tier = lookups[0][0].tier
    if record is not None:
        record(outcome, tier)
    if note is not None:
        note(lookups)
    return tier


# (outcome, tier) -> a read's cache entries of trailing metadata, built once. Values as bytes: grpc
# sends them as they are, where a str is encoded again on every call. x-cache-tier only when asked:
# each entry costs a call about 1% of a near-cache hit's instructions in grpc's Cython and core, and a
# key family's tier is the same for every read under one configuration.
_DEBUG_CACHE_METADATA: dict[tuple[Outcome, str], Metadata] = {
    (outcome, tier.value): (("x-cache", outcome.value.encode()), ("x-cache-tier", tier.value.encode()))
    for outcome in Outcome
    for tier in Tier
}
_CACHE_METADATA = {key: entries[:1] for key, entries in _DEBUG_CACHE_METADATA.items()}  # x-cache alone

_UNAVAILABLE_ERRORS = (
    ServiceError,
    LoadTimeout,
    FlightTimeout,
    CacheUnavailable,
    RecentLoadFailure,
    DatabaseSaturated,
)


def service_error(exc: Exception) -> ServiceError:
    """The status for what stopped a call: the table from the engine's failures to ours."""
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, LoadTimeout):
        return DatabaseUnavailable(
            f"the database did not answer within {exc.timeout_s * 1000:.0f} ms; retry later",
            reason="DATABASE_TIMEOUT",
        )
    if isinstance(exc, FlightTimeout):
        return DatabaseUnavailable(
            f"the shared load did not finish within {exc.timeout_s:.1f} s; retry later", reason="LOAD_TIMEOUT"
        )
    if isinstance(exc, MissesSaturated):
        return DatabaseUnavailable(
            f"the database is slow: {exc.limit} misses already wait on loads in this server "
            "(CACHEASIDE_MAX_WAITING_MISSES), so this miss was refused rather than queued; retry shortly",
            reason="DATABASE_SATURATED",
        )
    if isinstance(exc, DatabaseSaturated):
        return DatabaseUnavailable(
            f"the database is saturated: this server already runs {exc.limit} loads "
            "(CACHEASIDE_MAX_CONCURRENT_LOADS), so this miss was refused rather than queued; retry shortly",
            reason="DATABASE_SATURATED",
        )
    if isinstance(exc, RecentLoadFailure):
        return DatabaseUnavailable(
            f"the database failed moments ago and no stale copy is cached; retry in {exc.retry_in_ms} ms",
            reason="DATABASE_BACKOFF",
        )
    # Reached only where the cache itself was needed (shutdown, unreadable bytes).
    return CacheUnavailableForWrite(f"the cache cannot answer: {exc}; retry later")


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> NoReturn:
    # grpc-stubs predates abort_with_status on grpc.aio contexts; it exists since grpcio 1.38.
    await context.abort_with_status(to_status(service_error(exc)))  # type: ignore[attr-defined]
    raise AssertionError("abort_with_status returned")  # pragma: no cover


def _unary(request_type: type[Message], handler: Handler) -> grpc.RpcMethodHandler[Any, bytes]:
    parse, malformed = request_type.FromString, _malformed(request_type)

    async def parsed(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        # The admin RPCs' parsing and error table; reads do the same in their own handler (_read).
        try:
            request = parse(raw)
        except DecodeError:
            await _abort(context, malformed)
        try:
            return await handler(request, context)
        except _UNAVAILABLE_ERRORS as exc:
            await _abort(context, exc)

    # Requests are parsed here, not by grpcio, whose deserializer turns bad bytes into UNKNOWN. No
    # response serializer: handlers return serialized responses already, and grpc sends bytes as they are.
    return grpc.unary_unary_rpc_method_handler(parsed)


def _stream(request_type: type[Message], handler: StreamHandler) -> grpc.RpcMethodHandler[Any, bytes]:
    parse, malformed = request_type.FromString, _malformed(request_type)

    async def parsed(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        try:
            request = parse(raw)
        except DecodeError:
            await _abort(context, malformed)
        try:
            async for message in handler(request, context):
                yield message
        except _UNAVAILABLE_ERRORS as exc:
            await _abort(context, exc)

    return grpc.unary_stream_rpc_method_handler(parsed)


def _malformed(request_type: type[Message]) -> InvalidArgument:
    return InvalidArgument(
        f"the request is not a valid {request_type.DESCRIPTOR.full_name} message", reason="MALFORMED_REQUEST"
    )
