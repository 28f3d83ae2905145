"""The warm worker's child process: lowers its own CPU priority, then warms what the server asks.

Only the standard library is imported at the top, so the priority drops before the heavy imports
(SQLAlchemy, redis-py) spend their CPU. The parent's side and the messages are in warm_worker.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import pickle
from multiprocessing.connection import Connection
from typing import Any


def lower_priority() -> str:
    """SCHED_IDLE: run only when a core would otherwise idle. Falls back to nice 19. Returns which.

    Also on any core: a server pinned to one core (taskset) must not confine its warming to that
    core's idle time when another core idles.
    """
    with contextlib.suppress(AttributeError, OSError, ValueError):  # not Linux, or a narrower cpuset
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (AttributeError, OSError):  # not Linux, or not permitted
        with contextlib.suppress(OSError):
            os.nice(19)
        return "nice 19"


def main(settings: dict[str, Any], redis_url: str, conn: Connection) -> None:
    """The child's entry point (multiprocessing spawn)."""
    lower_priority()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C reaches the whole group; the parent stops us
        asyncio.run(_serve(settings, redis_url, conn))


async def _serve(settings_values: dict[str, Any], redis_url: str, conn: Connection) -> None:
    from server.building import build_cache, close_cache
    from server.config import Settings
    from server.domain.catalog import with_load_reports
    from server.warming import Warmer

    settings = Settings(**settings_values)
    # Waiting here costs no live call anything; the live timeout would count this process's own
    # starvation at idle priority as Redis failing.
    patient = max(settings.redis_timeout_ms, settings.warm_redis_timeout_ms)
    settings = settings.model_copy(update={"redis_timeout_ms": patient})
    cache = build_cache(settings, redis_url, events=False)
    # Each load crosses the pipe, so the server's metrics count the database work done on its behalf.
    catalog = with_load_reports(cache.catalog, lambda *load: send(("load", *load)))
    warmer = Warmer.from_settings(settings, cache.engine, catalog, cache.queries)
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def readable() -> None:
        try:
            while conn.poll():
                inbox.put_nowait(conn.recv())
        except (EOFError, OSError):  # the server has gone
            loop.remove_reader(conn.fileno())
            inbox.put_nowait(("stop",))

    def send(message: tuple[Any, ...]) -> None:
        with contextlib.suppress(OSError):  # the server has gone; the inbox hears of it
            conn.send(message)

    async def run(request_id: int, posts: int | None, users: int | None, within_s: float | None) -> None:
        try:
            result = await warmer.warm(
                posts=posts,
                users=users,
                active_within_s=within_s,
                on_progress=lambda progress: send(("progress", request_id, progress)),
            )
        except asyncio.CancelledError:
            return  # the caller went away, or the server is stopping: nobody waits for an answer
        except Exception as exc:
            send(("failed", request_id, _portable(exc)))
        else:
            send(("done", request_id, result))

    loop.add_reader(conn.fileno(), readable)
    send(("ready",))
    running: dict[int, asyncio.Task[None]] = {}
    try:
        while True:
            kind, *args = await inbox.get()
            if kind == "warm":
                task = asyncio.create_task(run(*args))
                running[args[0]] = task
                # Popped when done, even if cancelled before its first step (its finally never runs).
                task.add_done_callback(functools.partial(_forget, running, args[0]))
            elif kind == "cancel":
                if (cancelled := running.get(args[0])) is not None:
                    cancelled.cancel()
            else:
                break
    finally:
        for task in list(running.values()):
            task.cancel()
        await asyncio.gather(*running.values(), return_exceptions=True)
        await close_cache(cache)


def _forget(running: dict[int, asyncio.Task[None]], request_id: int, _task: asyncio.Task[None]) -> None:
    running.pop(request_id, None)


def _portable(exc: Exception) -> Exception:
    # The server re-raises what crossed the pipe, so the caller sees the status an inline warm gives.
    # The engine's own errors (LoadTimeout, DatabaseSaturated...) take arguments pickle cannot give
    # back: they cross as the ServiceError the service would have made of them.
    from server.cache import CacheUnavailable
    from server.errors import ServiceError
    from server.service import service_error

    if not isinstance(exc, CacheUnavailable | ServiceError):
        exc = service_error(exc)
    try:
        copy: Exception = pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return copy
