"""`cacheaside serve --workers N`: N server processes sharing one port through SO_REUSEPORT.

The parent owns what must be shared (a chosen port when the setting says 0, the private Redis, the demo
database), starts the workers as fresh interpreters (grpcio does not survive a fork once it has run),
and forwards SIGTERM and SIGINT to them. A worker that dies on its own takes the others down with it,
so the orchestrator sees one failed service instead of a silently shrunken one.

Each worker serves its metrics on the configured port plus its index, since a scrape must reach one
process to get one process's counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterable

from server.config import Settings
from server.embedded_redis import EmbeddedRedis

_LOGGER = logging.getLogger(__name__)
_WORKER_INDEX_ENV = "CACHEASIDE_WORKER_INDEX"
_WORKER_CPU_ENV = "CACHEASIDE_WORKER_CPU"  # set for pinned workers only


def run_workers(settings: Settings, count: int, *, demo: bool = False) -> int:
    """Run `count` workers until a signal; returns the exit code for the parent."""
    host, port = split_listen(settings.listen)
    if port == 0:
        port = _free_port(host)  # every worker must bind the same, concrete port
    with contextlib.ExitStack() as stack:
        redis_url = settings.redis_url
        if not redis_url:
            # One Redis for all: workers with private caches would not see each other's invalidations.
            redis_url = stack.enter_context(EmbeddedRedis()).url
            _LOGGER.info("no CACHEASIDE_REDIS_URL set: started a private redis-server at %s", redis_url)
        if demo:
            from server.demo import prepare_demo_database

            asyncio.run(prepare_demo_database(settings))
        env = {**os.environ, "CACHEASIDE_LISTEN": f"{host}:{port}", "CACHEASIDE_REDIS_URL": redis_url}
        return asyncio.run(_supervise(settings, count, env))


def worker_cpus(allowed: Iterable[int], count: int) -> list[int]:
    """The one logical CPU each of `count` pinned workers runs on: the allowed CPUs in order,
    round-robin."""
    cpus = sorted(allowed)
    return [cpus[index % len(cpus)] for index in range(count)]


def _pinned_cpus(settings: Settings, count: int) -> list[int] | None:
    if not settings.pin_workers:
        return None
    if not hasattr(os, "sched_setaffinity"):
        _LOGGER.warning("CACHEASIDE_PIN_WORKERS is set but this platform cannot pin: workers float")
        return None
    allowed = os.sched_getaffinity(0)
    if count > len(allowed):
        _LOGGER.warning(
            "%d workers pinned to %d CPUs: some share a CPU; run as many workers as CPUs",
            count,
            len(allowed),
        )
    return worker_cpus(allowed, count)


async def _supervise(settings: Settings, count: int, env: dict[str, str]) -> int:
    children = []
    cpus = _pinned_cpus(settings, count)
    for index in range(count):
        child_env = {**env, _WORKER_INDEX_ENV: str(index)}
        if cpus is not None:
            child_env[_WORKER_CPU_ENV] = str(cpus[index])
        if settings.metrics_listen:
            metrics_host, metrics_port = split_listen(settings.metrics_listen)
            offset = metrics_port + index if metrics_port else 0
            child_env["CACHEASIDE_METRICS_LISTEN"] = f"{metrics_host}:{offset}"
        children.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.workers", env=child_env, preexec_fn=_die_with_parent
            )
        )
    _LOGGER.info(
        "started %d workers on %s",
        count,
        env["CACHEASIDE_LISTEN"],
        extra={"pids": [c.pid for c in children]} | ({"cpus": cpus} if cpus is not None else {}),
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    stop_wait = asyncio.ensure_future(stopping.wait())
    exits = [asyncio.ensure_future(child.wait()) for child in children]
    await asyncio.wait([stop_wait, *exits], return_when=asyncio.FIRST_COMPLETED)
    failed = not stopping.is_set()
    if failed:
        dead = [c.pid for c in children if c.returncode is not None]
        _LOGGER.error("worker exited unexpectedly: stopping the others", extra={"pids": dead})
    else:
        _LOGGER.info("stopping %d workers", count)
    for child in children:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
    # Each worker bounds its own shutdown by the grace period; past it and a margin, stop waiting.
    await asyncio.wait(exits, timeout=settings.shutdown_grace_s + 10)
    for child in children:
        if child.returncode is None:
            _LOGGER.error("worker did not stop in time: killing it", extra={"worker_pid": child.pid})
            child.kill()
    await asyncio.gather(*exits)
    stop_wait.cancel()
    codes = [child.returncode for child in children]
    _LOGGER.info("workers stopped", extra={"exit_codes": codes})
    return 1 if failed or any(codes) else 0


def split_listen(listen: str) -> tuple[str, int]:
    """("host", port) of a `host:port` setting; IPv6 hosts keep their brackets."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen address {listen!r} must look like host:port")
    return host, int(port)


def _free_port(host: str) -> int:
    bind_host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((bind_host, 0))
        return int(probe.getsockname()[1])


def _die_with_parent() -> None:
    # Linux: a parent killed outright (SIGKILL, OOM) cannot forward SIGTERM; the kernel sends it instead,
    # so no worker lives on holding the port. Elsewhere this is a no-op.
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _pin(cpu: str | None) -> str | None:
    """Run this process on one CPU, before it has any thread but this one, so every thread it starts
    inherits it. Pinned, grpc's poller thread and the event loop wake each other on one core: on a
    virtual machine a wake-up sent to another core is an interrupt through the hypervisor. Returns why
    it could not (a sandbox that forbids it, a CPU gone since the parent chose it), or None."""
    if cpu is None:
        return None
    try:
        os.sched_setaffinity(0, {int(cpu)})
    except OSError as exc:
        return f"could not pin this worker to CPU {cpu} ({exc}): it floats"
    return None


def _run_worker() -> int:
    # A worker: the parent has set the shared port, the Redis URL, this worker's index and its CPU.
    unpinned = _pin(os.environ.get(_WORKER_CPU_ENV))  # before the imports below start any thread
    from server.app import run, serve
    from server.logs import configure_logging

    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    if unpinned:
        _LOGGER.warning(unpinned)
    run(serve(settings, reuse_port=True, worker=int(os.environ[_WORKER_INDEX_ENV])), settings.event_loop)
    return 0


if __name__ == "__main__":
    raise SystemExit(_run_worker())
