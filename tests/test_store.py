"""The Redis store on its own, against a real Redis."""

from __future__ import annotations

import asyncio
import uuid

from server.cache import RedisStore
from server.cache.breaker import BreakerState
from server.cache.scripts import AWAITED_MARK, WEAK_LEASE_PREFIX
from server.cache.store import Fill, LeaseKind, LeaseRequest


def _store(redis_url: str, name: str) -> RedisStore:
    return RedisStore.connect(
        redis_url,
        prefix=f"test-{name}-{uuid.uuid4().hex[:8]}:",
        timeout_ms=2000,
        max_connections=4,
        breaker_failures=3,
        breaker_cooldown_ms=1000,
    )


async def test_a_burst_beyond_the_pool_waits_for_connections_instead_of_failing(redis_url: str) -> None:
    store = _store(redis_url, "burst")
    try:
        results = await asyncio.gather(*(store.mget(["a", "b"]) for _ in range(200)), return_exceptions=True)
        assert not [r for r in results if isinstance(r, BaseException)]
        assert store.stats.failures == 0
        assert store.breaker_state is BreakerState.CLOSED, "a busy pool is not a failing Redis"
    finally:
        await store.redis.delete(store.prefix + "generation")
        await store.close()


async def test_only_the_fill_of_an_awaited_lease_is_published(redis_url: str) -> None:
    store = _store(redis_url, "awaited")
    subscriber = store.redis.pubsub()
    await subscriber.subscribe(store.channel)
    lease = {"lease_ms": 5000, "now_ms": 0, "generation": 0}
    try:
        granted = await store.lease([LeaseRequest("quiet", "t1"), LeaseRequest("wanted", "t2")], **lease)
        assert [result.kind for result in granted] == [LeaseKind.GRANTED, LeaseKind.GRANTED]
        # Another caller is told to wait for "wanted": its lease is marked, its token still holds.
        waiting = await store.lease([LeaseRequest("wanted", "t3")], **lease)
        assert waiting[0].kind is LeaseKind.WAIT
        assert await store.redis.get(store.layout.lease("wanted")) == b"t2" + AWAITED_MARK.encode()
        assert await store.fill([Fill("quiet", b"v", 5000, token="t1")]) == [True]
        assert await store.fill([Fill("wanted", b"v", 5000, token="t2")]) == [True]
        await store.invalidate(["quiet"], [])  # a last event: everything before it has arrived
        heard: list[list[str]] = []
        async with asyncio.timeout(10):
            while not heard or heard[-1][2] != "i":
                message = await subscriber.get_message(timeout=1)
                if message is not None and message["type"] == "message":
                    heard.append(message["data"].decode().split(" "))
    finally:
        await subscriber.aclose()
        await store.redis.delete(*(await store.redis.keys(store.prefix + "*")))
        await store.close()
    assert [(kind, key) for _counter, _seq, kind, key in heard] == [
        ("f", store.layout.value("wanted")),
        ("i", store.layout.value("quiet")),
    ], "the fill nobody waited for sent no message"
    numbers = [int(seq) for _counter, seq, _kind, _key in heard]
    assert numbers == [1, 2], "no gap: the quiet fill took no number"


async def test_a_repeated_lease_request_gets_its_own_lease_back(redis_url: str) -> None:
    # A retry on a new connection may repeat a request whose first reply was lost.
    store = _store(redis_url, "repeat")
    lease = {"lease_ms": 5000, "now_ms": 0, "generation": 0}
    try:
        first = await store.lease([LeaseRequest("k", "t1")], **lease)
        waiting = await store.lease([LeaseRequest("k", "t2")], **lease)  # marks it awaited
        again = await store.lease([LeaseRequest("k", "t1")], **lease)
    finally:
        await store.redis.delete(*(await store.redis.keys(store.prefix + "*")))
        await store.close()
    assert [first[0].kind, waiting[0].kind, again[0].kind] == [
        LeaseKind.GRANTED,
        LeaseKind.WAIT,
        LeaseKind.GRANTED,
    ]


async def test_a_live_request_takes_a_refreshs_weak_lease_over(redis_url: str) -> None:
    # A warm starved of CPU must never make a live read wait: its lease gives way, its fill is refused.
    store = _store(redis_url, "weak")
    lease = {"lease_ms": 5000, "now_ms": 0, "generation": 0}
    weak = WEAK_LEASE_PREFIX + "t1"
    try:
        warm = await store.lease([LeaseRequest("k", weak, force=True)], **lease)
        other_warm = await store.lease([LeaseRequest("k", WEAK_LEASE_PREFIX + "t2", force=True)], **lease)
        live = await store.lease([LeaseRequest("k", "t3")], **lease)
        filled = await store.fill([Fill("k", b"old", 5000, token=weak), Fill("k", b"new", 5000, token="t3")])
        value = await store.redis.get(store.layout.value("k"))
    finally:
        await store.redis.delete(*(await store.redis.keys(store.prefix + "*")))
        await store.close()
    kinds = [warm[0].kind, other_warm[0].kind, live[0].kind]
    assert kinds == [LeaseKind.GRANTED, LeaseKind.WAIT, LeaseKind.GRANTED]
    assert filled == [False, True]
    assert value == b"new"
