"""Warming in a child process at idle CPU priority, so that it only ever uses CPU live calls leave.

Bounding a warm's rate is not enough inside the serving process: every batch it loads, encodes and
writes is event-loop time that a live call arriving meanwhile waits behind, and on a busy machine the
warm's database and Redis work competes for the same cores. The child runs the same Warmer over its
own engine and pools (warm_concurrency connections), at SCHED_IDLE (nice 19 where that is missing), so
the kernel gives it only cycles nothing else wants. The server's loop is left with a message per batch.

Messages on the pipe, parent to child: ("warm", id, posts, users, active_within_s), ("cancel", id),
("stop",). Child to parent: ("ready",), ("progress", id, WarmProgress), ("done", id, WarmResult),
("failed", id, exception), and ("load", family, ok, seconds) for each database load.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from server import warm_child
from server.config import Settings
from server.errors import CacheUnavailableForWrite
from server.warming import WarmProgress, WarmResult, Warms

_LOGGER = logging.getLogger(__name__)
_CONTEXT = multiprocessing.get_context("spawn")  # fork would copy grpcio's threads and open sockets
_READY_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 5.0
_Message = tuple[Any, ...]


class WarmWorkerExited(CacheUnavailableForWrite):
    """The warm worker process ended mid-warm; the next warm starts a new one."""

    default_reason = "WARM_WORKER_EXITED"


class WarmWorker(Warms):
    """Runs warms in one long-lived child process, started on the first warm."""

    def __init__(
        self,
        settings: Settings,
        redis_url: str,
        *,
        observe: Callable[[WarmResult | None, float], None] | None = None,
        load_observed: Callable[[str, bool, float], None] | None = None,
    ) -> None:
        """observe hears of each warm, load_observed of each load the child ran (family, ok, seconds)."""
        super().__init__(observe)
        # The child's pools need no more connections than the batches it runs at once.
        self._child_settings = settings.model_dump() | {
            "db_pool_size": settings.warm_concurrency,
            "redis_max_connections": 2 * settings.warm_concurrency + 2,
        }
        self._redis_url = redis_url
        self._load_observed = load_observed
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready: asyncio.Future[None] | None = None
        self._starting = asyncio.Lock()
        self._ids = itertools.count()
        self._replies: dict[int, asyncio.Queue[_Message]] = {}

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process is not None else None

    async def _warm(
        self,
        posts: int | None,
        users: int | None,
        active_within_s: float | None,
        on_progress: Callable[[WarmProgress], None] | None,
    ) -> WarmResult:
        conn = await self._started()
        request_id = next(self._ids)
        replies: asyncio.Queue[_Message] = asyncio.Queue()
        self._replies[request_id] = replies
        try:
            conn.send(("warm", request_id, posts, users, active_within_s))
            while True:
                kind, *payload = await replies.get()
                if kind == "progress":
                    if on_progress is not None:
                        on_progress(payload[0])
                elif kind == "done":
                    result: WarmResult = payload[0]
                    return result
                else:
                    raise payload[0]
        except asyncio.CancelledError:
            if self._conn is conn:
                with contextlib.suppress(OSError):
                    conn.send(("cancel", request_id))
            raise
        finally:
            del self._replies[request_id]

    async def _started(self) -> Connection:
        async with self._starting:
            if self._conn is None:
                self._spawn()
            conn, ready = self._conn, self._ready
            assert conn is not None
            assert ready is not None
            try:
                async with asyncio.timeout(_READY_TIMEOUT_S):
                    await asyncio.shield(ready)
            except TimeoutError:
                self._lost(f"did not start within {_READY_TIMEOUT_S:.0f} s")
                raise WarmWorkerExited("the warm worker did not start; nothing was warmed; retry") from None
            return conn

    def _spawn(self) -> None:
        parent_end, child_end = _CONTEXT.Pipe()
        process = _CONTEXT.Process(
            target=warm_child.main,
            args=(self._child_settings, self._redis_url, child_end),
            name="cacheaside-warm",
            daemon=True,  # ends with the server; a server killed outright closes the pipe, which ends it too
        )
        process.start()
        child_end.close()
        self._process, self._conn = process, parent_end
        self._ready = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().add_reader(parent_end.fileno(), self._readable, parent_end)
        _LOGGER.info("warm worker started (pid %s)", process.pid)

    def _readable(self, conn: Connection) -> None:
        if conn is not self._conn:
            return
        try:
            while conn.poll():
                self._dispatch(conn.recv())
        except (EOFError, OSError):
            self._lost("exited")
        except Exception:  # an unreadable message: nothing after it can be trusted
            _LOGGER.exception("warm worker sent a message the server cannot read")
            self._lost("sent an unreadable message")

    def _dispatch(self, message: _Message) -> None:
        if message[0] == "load":
            if self._load_observed is not None:
                self._load_observed(*message[1:])
            return
        if message[0] == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
            return
        replies = self._replies.get(message[1])
        if replies is not None:  # else its caller has gone: a late report of a cancelled warm
            replies.put_nowait((message[0], *message[2:]))

    def _lost(self, how: str) -> None:
        process = self._process
        if self._detach() is None:
            return
        if process is not None:
            if process.is_alive():  # hung, or sent garbage: a new warm gets a new worker, not this one
                process.kill()
            asyncio.get_running_loop().run_in_executor(None, process.join)  # reaped, never a zombie
        code = process.exitcode if process is not None else None
        _LOGGER.warning("warm worker %s (exit code %s); the next warm starts another", how, code)
        self._fail_waiting(
            WarmWorkerExited(
                f"the warm worker process {how} (exit code {code}) mid-warm; "
                "what it wrote stays cached; retry"
            )
        )

    def _detach(self) -> Connection | None:
        conn = self._conn
        if conn is None:
            return None
        self._conn, self._process = None, None
        asyncio.get_running_loop().remove_reader(conn.fileno())
        conn.close()
        return conn

    def _fail_waiting(self, error: Exception) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: no "never retrieved" warning when nobody waits
        for replies in self._replies.values():
            replies.put_nowait(("failed", error))

    async def close(self) -> None:
        """Ask the child to stop (it cancels warms in flight and closes its pools); kill it if it hangs."""
        conn, process = self._conn, self._process
        if conn is None or process is None:
            return
        with contextlib.suppress(OSError):
            conn.send(("stop",))
        self._detach()
        await asyncio.to_thread(process.join, _STOP_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join)
        self._fail_waiting(WarmWorkerExited("the server is stopping; nothing more is warmed"))
