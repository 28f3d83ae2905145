"""A circuit breaker: after repeated Redis failures, stop asking Redis until a background probe succeeds.

Without it an outage would add a full Redis timeout to every call. While open, callers skip Redis at
once; one probe task per outage asks Redis every cooldown and closes the breaker when it answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from enum import StrEnum

_LOGGER = logging.getLogger(__name__)


class BreakerState(StrEnum):
    """Closed: Redis is used. Open: Redis is skipped until the probe succeeds."""

    CLOSED = "closed"
    OPEN = "open"


class CircuitBreaker:
    """Counts consecutive failures; opens at a threshold; a background probe closes it again."""

    def __init__(
        self,
        *,
        failure_threshold: int,
        cooldown_s: float,
        probe: Callable[[], Awaitable[object]],
    ) -> None:
        self._failure_threshold = failure_threshold
        self._cooldown_s = cooldown_s
        self._probe = probe
        self._failures = 0
        self._state = BreakerState.CLOSED
        self._probe_task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._closed.set()
        self.opened_count = 0

    @property
    def state(self) -> BreakerState:
        """The current state."""
        return self._state

    def allows(self) -> bool:
        """Whether a caller may try Redis now."""
        return self._state is BreakerState.CLOSED

    def record_success(self) -> None:
        """A Redis call worked: the failure streak is over."""
        self._failures = 0

    def record_failure(self) -> None:
        """A Redis call failed or timed out; opens the breaker at the threshold."""
        self._failures += 1
        if self._state is BreakerState.CLOSED and self._failures >= self._failure_threshold:
            self._open()

    async def wait_closed(self) -> None:
        """Return once the breaker is closed (at once if it is)."""
        await self._closed.wait()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._closed.clear()
        self.opened_count += 1
        _LOGGER.warning(
            "redis breaker opened after %d failures; serving from the database, probing every %.2fs",
            self._failures,
            self._cooldown_s,
        )
        self._probe_task = asyncio.get_running_loop().create_task(self._probe_until_healthy())

    async def _probe_until_healthy(self) -> None:
        while True:
            await asyncio.sleep(self._cooldown_s)
            try:
                await self._probe()
            except Exception as exc:  # any failure keeps it open; the probe must never die
                _LOGGER.debug("redis probe failed: %r", exc)
                continue
            self._failures = 0
            self._state = BreakerState.CLOSED
            self._closed.set()
            _LOGGER.warning("redis breaker closed: redis answers again, caching resumes")
            return

    async def close(self) -> None:
        """Stop the probe task, if any (at shutdown)."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
