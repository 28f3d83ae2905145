"""Cache events over Redis pub/sub: fills wake lease waiters, invalidations reach every process.

One subscriber connection per process reads "<counter> <seq> <kind> <key>" messages (scripts.py
publishes them:
f fill, r released lease, i invalidated, g new generation). Only the fill of a lease someone was told
to wait for is published: a waiter registers interest in a key *before* its lease check marks the
lease awaited, so the fill that follows always wakes it. Messages can be
lost (a dropped connection, a subscriber too slow for Redis's output buffer): the sequence numbers
show a gap, and a reconnect shows the connection was lost, and either way every listener is told to
assume it missed everything (waiters check again; the near cache flushes). Each connection reads every
counter's number *before* it subscribes, so even the first event it hears on a counter shows a gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from server.cache.layout import KeyLayout

_LOGGER = logging.getLogger(__name__)
_RECONNECT_S = 1.0
_CLOSE_RETRY_S = 0.1

FILLED = "f"
RELEASED = "r"
INVALIDATED = "i"
NEW_GENERATION = "g"


class EventListener:
    """What other parts of the engine do with events: per key, and when events may have been missed."""

    def __init__(self, on_event: Callable[[str, str], None], on_missed: Callable[[], None]) -> None:
        self.on_event = on_event
        self.on_missed = on_missed


class FillNotifier:
    """Wakes local waiters and informs listeners of every cache event, from any process."""

    def __init__(
        self,
        redis: Redis,
        *,
        channel: str,
        layout: KeyLayout,
        sequences: Callable[[], Awaitable[dict[str, int]]],
    ) -> None:
        self._redis = redis
        self._sequences = sequences
        self._channel = channel
        self._layout = layout
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listeners: list[EventListener] = []
        self._task: asyncio.Task[None] | None = None
        self._last_seq: dict[str, int] = {}  # per counter: one on a single Redis, per slot on a cluster
        self.connected = asyncio.Event()
        self.gaps = 0
        self._closing = False

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        channel: str,
        layout: KeyLayout,
        connect_timeout_ms: int,
        sequences: Callable[[], Awaitable[dict[str, int]]],
    ) -> FillNotifier:
        """A notifier on its own connection: pub/sub reads block, so no command timeout applies.

        On a cluster it subscribes at the node the URL names: classic pub/sub reaches every node.
        sequences reads every event counter's number (RedisStore.event_sequences).
        """
        redis = Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_ms / 1000,
            socket_timeout=None,  # a subscriber waits for messages without limit ...
            socket_keepalive=True,
            health_check_interval=5,  # ... but a half-open connection is noticed
            client_name=f"cacheaside-events:{layout.prefix}"[:128],  # so an operator can tell it apart
        )
        return cls(redis, channel=channel, layout=layout, sequences=sequences)

    def listen(self, listener: EventListener) -> None:
        """Tell listener of every event, and whenever events may have been missed."""
        self._listeners.append(listener)

    def start(self) -> None:
        """Begin listening in the background (reconnecting as needed)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen_forever())

    def expect(self, key: str) -> asyncio.Event:
        """An event set when key (unprefixed) next changes or its lease ends; `forget` it after."""
        event = asyncio.Event()
        self._waiters.setdefault(key, set()).add(event)
        return event

    def forget(self, key: str, event: asyncio.Event) -> None:
        """Stop waiting on key with this event."""
        events = self._waiters.get(key)
        if events is not None:
            events.discard(event)
            if not events:
                del self._waiters[key]

    def _missed(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()
        for listener in self._listeners:
            listener.on_missed()

    def _handle(self, data: bytes) -> None:
        counter, seq_text, kind, redis_key = data.decode().split(" ", 3)
        seq = int(seq_text)
        last = self._last_seq.get(counter)
        if last is not None and seq != last + 1:
            self.gaps += 1
            _LOGGER.warning(
                "cache events %d..%d of %s were missed; near caches flush", last + 1, seq - 1, counter
            )
            self._missed()
        self._last_seq[counter] = seq
        key = self._layout.key_of(redis_key) if redis_key else ""
        for listener in self._listeners:
            listener.on_event(kind, key)
        for event in self._waiters.get(key, ()):
            event.set()

    async def _listen_forever(self) -> None:
        while not self._closing:
            try:
                await self._listen()
            except Exception as exc:  # the listener must outlive any failure
                _LOGGER.debug("cache events lost (%r); reconnecting", exc)
            self.connected.clear()
            self._last_seq.clear()
            self._missed()
            await asyncio.sleep(_RECONNECT_S)

    async def _listen(self) -> None:
        # Before subscribing: an event published between the two is missed, and shows as a gap.
        self._last_seq = await self._sequences()
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(self._channel)
            self._missed()  # whatever happened before the subscription took effect
            self.connected.set()
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    self._handle(message["data"])

    async def close(self) -> None:
        """Stop listening and close the connection."""
        self._closing = True
        if self._task is not None:
            # A cancel can land inside redis-py's own error handling and come out as a Redis error,
            # which the reconnect loop outlives (seen: close hung in one test run in three). So cancel
            # until the task has ended; the loop also stops on _closing at its next turn.
            while not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task}, timeout=_CLOSE_RETRY_S)
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._redis.aclose()
