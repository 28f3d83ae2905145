"""Single-flight in front of Redis leases: one load per key across every process and instance.

In a process, callers of a missing key share one flight (an asyncio task). The flight asks Redis for
the key's lease: the holder loads from the database and fills with a compare-and-set on its token;
the others wait for that fill (woken by pub/sub, bounded by a back-off) and read it. A flight runs in
its own task with its own timeout, so a caller that gives up (its deadline) never cancels the load
the others are waiting for. A flight is joinable only until its own key is answered or invalidated,
so a read that starts after an invalidation never receives a value loaded before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any

from server.cache import envelope
from server.cache.loading import Loading, Lookup, TtlPolicy
from server.cache.notify import INVALIDATED, EventListener, FillNotifier
from server.cache.store import CacheUnavailable, LeaseKind, LeaseRequest, LeaseResult, RedisStore
from server.cache.types import (
    DatabaseSaturated,
    EngineStats,
    FlightTimeout,
    MissesSaturated,
    Outcome,
    RecentLoadFailure,
    Resolved,
)

_LOGGER = logging.getLogger(__name__)
_FIRST_WAIT_S = 0.02
_MAX_WAIT_S = 0.25
_MIN_WAIT_S = 0.001  # never a zero wait: a lease in its last millisecond reports a PTTL of 0
BYPASS = -1  # the generation of flights that skip Redis: single-flight still applies

Result = Resolved | BaseException
_Entry = tuple[asyncio.Future[Resolved], Lookup]


def _consume(future: asyncio.Future[Resolved]) -> None:
    # A flight's result may go unread (every caller hit its deadline); that is not an error.
    if not future.cancelled():
        future.exception()


class LeaseFlights:
    """Resolves missing keys through in-process single-flight and Redis leases."""

    def __init__(
        self,
        store: RedisStore,
        notifier: FillNotifier | None,
        loading: Loading,
        ttl: TtlPolicy,
        stats: EngineStats,
        *,
        lease_ms: int,
        error_backoff_ms: int,
        now_ms: Callable[[], int],
        max_waiting: int = 0,
    ) -> None:
        self._store = store
        self._notifier = notifier
        self._loading = loading
        self._ttl = ttl
        self._stats = stats
        self._lease_ms = lease_ms
        self._error_backoff_ms = error_backoff_ms
        self._now_ms = now_ms
        # Callers in resolve, each waiting on loads (its own flights or joined ones). A slow database
        # makes them pile up; past max_waiting a miss is refused, so they never crowd out the hits.
        self.max_waiting = max_waiting
        self.waiting = 0
        # A waiter may wait out a dead holder's lease, then load itself.
        self._flight_timeout_s = lease_ms / 1000 + loading.timeout_s + 1.0
        # Keyed by generation too: a read after invalidate-everything never joins an older load.
        self._flights: dict[tuple[str, int], _Entry] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        if notifier is not None:
            notifier.listen(EventListener(on_event=self._on_event, on_missed=self._on_missed))

    def _on_event(self, kind: str, key: str) -> None:
        if kind == INVALIDATED:
            self.forget([key], ())

    def _on_missed(self) -> None:
        # An invalidation may have been among the missed events: no flight under way may be joined.
        self._flights.clear()

    def in_flight(self, key: str, generation: int) -> bool:
        """Whether this process is already resolving key in this generation."""
        return (key, generation) in self._flights

    def forget(self, keys: Iterable[str], tags: Iterable[str]) -> None:
        """Invalidated: later callers of these keys (or keys in these tags) start a new flight."""
        keys, tags = set(keys), set(tags)
        for flight_key, (_, lookup) in list(self._flights.items()):
            if lookup.key in keys or tags.intersection(lookup.family.tags):
                del self._flights[flight_key]

    async def resolve(self, lookups: Sequence[Lookup], generation: int) -> dict[str, Result]:
        """Each key's answer, or the exception its load ended with; joins flights already under way.

        With generation BYPASS (Redis is down) the flight loads straight from the database. Past
        max_waiting callers already here, every key's answer is MissesSaturated, at once.
        """
        if self.max_waiting and self.waiting >= self.max_waiting:
            self._stats.misses_refused += 1
            refusal = MissesSaturated(self.max_waiting)
            return {lookup.key: refusal for lookup in lookups}
        self.waiting += 1
        try:
            return await self._resolve(lookups, generation)
        finally:
            self.waiting -= 1

    async def _resolve(self, lookups: Sequence[Lookup], generation: int) -> dict[str, Result]:
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[Resolved]] = {}
        new: list[Lookup] = []
        for lookup in lookups:
            self._stats.flight_callers += 1
            flight_key = (lookup.key, generation)
            entry = self._flights.get(flight_key)
            if entry is None:
                future = loop.create_future()
                future.add_done_callback(_consume)
                future.add_done_callback(functools.partial(self._settled, flight_key))
                self._flights[flight_key] = (future, lookup)
                new.append(lookup)
            else:
                future = entry[0]
                self._stats.coalesced += 1
            futures[lookup.key] = future
        if new:
            self.spawn(self._fly(new, {lookup.key: futures[lookup.key] for lookup in new}, generation))
        # shield: a caller's cancellation (deadline) must not cancel the shared flight.
        results = await asyncio.gather(*(asyncio.shield(f) for f in futures.values()), return_exceptions=True)
        return dict(zip(futures, results, strict=True))

    def _settled(self, flight_key: tuple[str, int], future: asyncio.Future[Resolved]) -> None:
        # Answered: later callers must look at Redis again, not reuse this answer.
        entry = self._flights.get(flight_key)
        if entry is not None and entry[0] is future:
            del self._flights[flight_key]

    async def load_and_fill(
        self,
        lookups: Sequence[Lookup],
        tokens: dict[str, str],
        generation: int,
        *,
        wait_for_slot: bool = False,
    ) -> tuple[dict[str, Resolved], int]:
        """Load keys whose leases we hold and fill them under their tokens; returns answers, fills written."""
        if not lookups:
            return {}, 0
        held = [(lookup.key, tokens[lookup.key]) for lookup in lookups]
        try:
            loaded, load_ms = await self._loading.load(lookups, wait_for_slot=wait_for_slot)
        except DatabaseSaturated:
            # This process is busy, not the key's load failing: no error mark, another instance may load it.
            await self._release_quietly(held, error_ms=0)
            raise
        except Exception:
            await self._release_quietly(held, error_ms=self._error_backoff_ms)
            raise
        except BaseException:  # cancelled (shutdown): free the leases so others need not wait them out
            await asyncio.shield(self._release_quietly(held, error_ms=0))
            raise
        now_ms = self._now_ms()
        answers: dict[str, Resolved] = {}
        fills = []
        unfilled = []
        for lookup in lookups:
            payload = loaded[lookup.family].get(lookup.item_id)
            answers[lookup.key] = Resolved(payload, Outcome.MISS)
            token = tokens[lookup.key]
            fill = self._ttl.fill(
                lookup, payload, generation=generation, load_ms=max(load_ms, 1), now_ms=now_ms, token=token
            )
            if fill is None:
                unfilled.append((lookup.key, token))
            else:
                fills.append(fill)
        try:
            accepted = await self._store.fill(fills)
            await self._store.release(unfilled, error_ms=0)
        except CacheUnavailable:
            return answers, 0
        refused = accepted.count(False)
        self._stats.fills_refused += refused
        return answers, len(accepted) - refused

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a background task that outlives its caller; kept referenced until done."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Wait for every flight and refresh under way (tests; graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self, grace_s: float) -> None:
        """Let flights finish for up to grace_s (their leases are released either way), then cancel."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                await self.drain()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _fly(
        self, lookups: list[Lookup], futures: dict[str, asyncio.Future[Resolved]], generation: int
    ) -> None:
        events = {}
        if self._notifier is not None and generation != BYPASS:
            events = {lookup.key: self._notifier.expect(lookup.key) for lookup in lookups}
        try:
            async with asyncio.timeout(self._flight_timeout_s):
                if generation == BYPASS:
                    await self._bypass(lookups, futures)
                else:
                    await self._lead(lookups, futures, events, generation)
        except TimeoutError:
            _settle(futures, FlightTimeout(self._flight_timeout_s))
        except Exception as exc:
            _settle(futures, exc)
        except BaseException:  # cancelled at shutdown: nobody may wait forever
            _settle(futures, CacheUnavailable("the service is shutting down"))
            raise
        finally:
            for key, event in events.items():
                self._notifier.forget(key, event)  # type: ignore[union-attr]  # events imply a notifier

    async def _lead(
        self,
        lookups: list[Lookup],
        futures: dict[str, asyncio.Future[Resolved]],
        events: dict[str, asyncio.Event],
        generation: int,
    ) -> None:
        tokens = {lookup.key: secrets.token_hex(8) for lookup in lookups}
        requests = [LeaseRequest(lk.key, tokens[lk.key], lk.family.tags) for lk in lookups]
        try:
            leases = await self._lease(requests, generation)
        except CacheUnavailable:
            await self._bypass(lookups, futures)
            return
        granted: list[Lookup] = []
        waits = []
        for lookup, lease in zip(lookups, leases, strict=True):
            future = futures[lookup.key]
            if lease.kind is LeaseKind.GRANTED:
                granted.append(lookup)
            elif lease.kind is LeaseKind.WAIT:
                waits.append(self._wait(lookup, future, events.get(lookup.key), lease.pttl_ms, generation))
            else:
                _answer(future, lookup, lease, Outcome.HIT)
        await asyncio.gather(self._load_for(granted, tokens, futures, generation), *waits)

    async def _lease(self, requests: list[LeaseRequest], generation: int) -> list[LeaseResult]:
        try:
            return await self._store.lease(
                requests, lease_ms=self._lease_ms, now_ms=self._now_ms(), generation=generation
            )
        except CacheUnavailable:
            # The reply may have timed out after Redis granted the leases: give them back, or other
            # instances would wait a whole lease TTL for a fill that never comes.
            held = [(request.key, request.token) for request in requests]
            self.spawn(self._release_quietly(held, error_ms=0))
            raise

    async def _load_for(
        self,
        lookups: list[Lookup],
        tokens: dict[str, str],
        futures: dict[str, asyncio.Future[Resolved]],
        generation: int,
    ) -> None:
        try:
            answers, _ = await self.load_and_fill(lookups, tokens, generation)
        except Exception as exc:
            _settle({lookup.key: futures[lookup.key] for lookup in lookups}, exc)
            return
        for lookup in lookups:
            futures[lookup.key].set_result(answers[lookup.key])

    async def _wait(
        self,
        lookup: Lookup,
        future: asyncio.Future[Resolved],
        event: asyncio.Event | None,
        pttl_ms: int,
        generation: int,
    ) -> None:
        # Another caller holds the lease. Wait for its fill (the event was registered before the
        # lease check, so a fill in between still wakes us), check again, and take the lease over
        # if the holder died and its lease expired.
        self._stats.lease_waits += 1
        token = secrets.token_hex(8)
        wait_s = max(_MIN_WAIT_S, min(_FIRST_WAIT_S, pttl_ms / 1000))
        while True:
            if event is None:
                await asyncio.sleep(wait_s)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await event.wait()
                event.clear()
            try:
                [lease] = await self._lease([LeaseRequest(lookup.key, token, lookup.family.tags)], generation)
            except CacheUnavailable:
                await self._bypass([lookup], {lookup.key: future})
                return
            if lease.kind is LeaseKind.GRANTED:
                await self._load_for([lookup], {lookup.key: token}, {lookup.key: future}, generation)
                return
            if lease.kind is not LeaseKind.WAIT:
                _answer(future, lookup, lease, Outcome.MISS)  # the fill we waited for, or its failure
                return
            wait_s = max(_MIN_WAIT_S, min(wait_s * 2, _MAX_WAIT_S, lease.pttl_ms / 1000))

    async def _bypass(self, lookups: list[Lookup], futures: dict[str, asyncio.Future[Resolved]]) -> None:
        # Redis is down or failed mid-flight: answer from the database without caching.
        try:
            loaded, _ = await self._loading.load(lookups)
        except Exception as exc:
            _settle({lookup.key: futures[lookup.key] for lookup in lookups}, exc)
            return
        for lookup in lookups:
            futures[lookup.key].set_result(
                Resolved(loaded[lookup.family].get(lookup.item_id), Outcome.BYPASS)
            )

    async def _release_quietly(self, leases: list[tuple[str, str]], *, error_ms: int) -> None:
        with contextlib.suppress(CacheUnavailable):  # if Redis is down, the leases expire on their own
            await self._store.release(leases, error_ms=error_ms)


def _answer(future: asyncio.Future[Resolved], lookup: Lookup, lease: LeaseResult, outcome: Outcome) -> None:
    """Settle a future from a VALUE or ERROR lease reply."""
    if lease.kind is LeaseKind.ERROR:
        future.set_exception(RecentLoadFailure(lookup.key, lease.pttl_ms))
        return
    entry = envelope.unpack(lease.value) if lease.value is not None else None
    if entry is None:
        future.set_exception(
            CacheUnavailable(f"the cache holds bytes this version cannot read at {lookup.key}")
        )
    else:
        future.set_result(Resolved(entry.payload, outcome))


def _settle(futures: dict[str, asyncio.Future[Resolved]], failure: BaseException) -> None:
    for future in futures.values():
        if not future.done():
            future.set_exception(failure)
