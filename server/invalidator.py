"""Automatic invalidation on PostgreSQL: drain the outbox the triggers fill, through the one map.

A dedicated connection LISTENs on `cacheaside_changes`; each notification (and a poll, in case one is
lost) drains the outbox in batches: lock rows (SKIP LOCKED, so several instances share the work),
invalidate their keys in Redis, delete them, commit. Rows are deleted only after Redis has
invalidated them, so a crash, a dropped connection or a Redis outage loses nothing: the rows are
replayed. The lag from each write to its invalidation is measured by PostgreSQL's own clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from server.cache import CacheEngine, CacheUnavailable
from server.domain.invalidation import INVALIDATION_MAP, Targets

_LOGGER = logging.getLogger(__name__)
CHANNEL = "cacheaside_changes"
_LAG_SAMPLES = 4096


@dataclass(slots=True)
class InvalidatorStats:
    """What the invalidator did, and how far behind the writes it ran."""

    changes: int = 0
    batches: int = 0
    connects: int = 0
    failures: int = 0
    lags_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_LAG_SAMPLES))

    def lag_percentile_ms(self, percentile: float) -> float | None:
        """A percentile of the recent commit-to-invalidation lags, None before any change."""
        if not self.lags_ms:
            return None
        ordered = sorted(self.lags_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * percentile / 100))]


class OutboxInvalidator:
    """Listens for committed changes and invalidates their keys; reconnects and replays on failure."""

    def __init__(
        self,
        dsn: str,
        *,
        schema: str,
        engine: CacheEngine,
        poll_interval_s: float,
        batch_size: int,
        retry_s: float = 0.5,
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._engine = engine
        self._poll_interval_s = poll_interval_s
        self._batch_size = batch_size
        self._retry_s = retry_s
        self._wake = asyncio.Event()
        self.stats = InvalidatorStats()
        self.connected = asyncio.Event()
        self.caught_up = asyncio.Event()  # set whenever the outbox has been drained empty

    async def run(self) -> None:
        """Until cancelled: connect, listen, drain; on any failure wait a moment and start over."""
        while True:
            try:
                await self._session()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, CacheUnavailable) as exc:
                self.stats.failures += 1
                _LOGGER.warning("automatic invalidation interrupted (%r); reconnecting and replaying", exc)
            self.connected.clear()
            self.caught_up.clear()
            await asyncio.sleep(self._retry_s)

    async def _session(self) -> None:
        connection = await asyncpg.connect(
            self._dsn,
            timeout=10,
            server_settings={
                "search_path": self._schema,
                "application_name": f"cacheaside-invalidator:{self._schema}"[:63],
            },
        )
        lost = asyncio.Event()

        def on_lost(_connection: Any) -> None:
            lost.set()
            self._wake.set()

        try:
            await connection.add_listener(CHANNEL, self._on_notify)
            connection.add_termination_listener(on_lost)
            self.stats.connects += 1
            self.connected.set()
            while not lost.is_set():
                await self._drain(connection)  # first pass replays whatever was missed
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._poll_interval_s):
                        await self._wake.wait()
                self._wake.clear()
            raise asyncpg.InterfaceError("the listener's connection was closed")
        finally:
            with contextlib.suppress(Exception):
                await connection.close(timeout=1)

    def _on_notify(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        if payload == self._schema:  # other schemas in the same database have their own outbox
            self._wake.set()

    async def _drain(self, connection: asyncpg.Connection) -> None:
        while True:
            async with connection.transaction():
                rows = await connection.fetch(
                    "SELECT id, table_name, old_keys, new_keys FROM cacheaside_changes "
                    "ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                    self._batch_size,
                )
                if not rows:
                    self.caught_up.set()
                    return
                targets = Targets.empty()
                for row in rows:
                    if row["table_name"] in INVALIDATION_MAP:
                        images = [_keys(row["old_keys"]), _keys(row["new_keys"])]
                        targets.add_change(row["table_name"], images)
                await self._engine.invalidate(list(targets.keys), list(targets.tags))
                lags = await connection.fetch(
                    "DELETE FROM cacheaside_changes WHERE id = ANY($1::bigint[]) "
                    "RETURNING extract(epoch FROM clock_timestamp() - changed_at) * 1000 AS lag_ms",
                    [row["id"] for row in rows],
                )
            self.stats.changes += len(rows)
            self.stats.batches += 1
            self.stats.lags_ms.extend(float(lag["lag_ms"]) for lag in lags)


def _keys(value: str | None) -> dict[str, object] | None:
    return None if value is None else dict(json.loads(value))
