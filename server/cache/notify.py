"""Fill notifications over Redis pub/sub, so lease waiters wake when a value lands, not on a poll.

One subscriber connection per process. A waiter registers interest in a key *before* it checks
Redis, so a fill between the check and the wait still wakes it. Messages can be lost (a dropped
connection), so every wait is also bounded by a short back-off after which the waiter checks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

_LOGGER = logging.getLogger(__name__)
_RECONNECT_S = 1.0


class FillNotifier:
    """Wakes local waiters when any process fills, releases or invalidates a key under lease."""

    def __init__(self, redis: Redis, *, channel: str, prefix: str) -> None:
        self._redis = redis
        self._channel = channel
        self._prefix = prefix
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    @classmethod
    def connect(cls, url: str, *, channel: str, prefix: str, connect_timeout_ms: int) -> FillNotifier:
        """A notifier on its own connection: pub/sub reads block, so no command timeout applies."""
        redis = Redis.from_url(url, socket_connect_timeout=connect_timeout_ms / 1000, socket_timeout=None)
        return cls(redis, channel=channel, prefix=prefix)

    def start(self) -> None:
        """Begin listening in the background (reconnecting as needed)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen_forever())

    def expect(self, key: str) -> asyncio.Event:
        """An event set when key (unprefixed) is next filled or its lease ends; `forget` it after."""
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

    def _wake(self, key: str) -> None:
        for event in self._waiters.get(key, ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()

    async def _listen_forever(self) -> None:
        while True:
            try:
                await self._listen()
            except (RedisError, OSError) as exc:
                _LOGGER.debug("fill notifications lost (%r); reconnecting", exc)
            self.connected.clear()
            self._wake_all()  # anything may have been missed: every waiter checks again
            await asyncio.sleep(_RECONNECT_S)

    async def _listen(self) -> None:
        async with self._redis.pubsub() as pubsub:
            await pubsub.subscribe(self._channel)
            self.connected.set()
            async for message in pubsub.listen():
                if message.get("type") == "message":
                    self._wake(message["data"].decode()[len(self._prefix) :])

    async def close(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._redis.aclose()
