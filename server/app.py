"""Build the server from settings (construction), then serve it until a signal (serving)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from server import db, tls
from server.audit import ConsistencyAuditor, RecentReads, loaders_by_family
from server.auth import TokenCheck
from server.building import Cache, build_cache, close_cache
from server.cache import CacheEngine
from server.collector import freeze_startup_heap
from server.config import Settings
from server.domain.catalog import families
from server.embedded_redis import EmbeddedRedis
from server.guard import Guard, GuardedService
from server.health import HealthChecker
from server.invalidator import OutboxInvalidator
from server.limits import ConcurrencyLimit
from server.metrics import Metrics, MetricsServer
from server.observability import Observability
from server.service import CACHE_DEBUG_HEADER, SERVICE_NAME, CacheService
from server.warm_worker import WarmWorker
from server.warming import Warmer, Warms, warm_every, warm_logged

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")
# Clients ping every 30 s (client/client.py); grpcio's default would answer pings more often than every
# 5 minutes with GOAWAY "too_many_pings". The server pings idle clients to drop dead connections.
_KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)


@dataclass
class App:
    """A built, bound server and everything it owns; `start` serves, `stop` releases it all."""

    server: grpc.aio.Server
    port: int
    cache: Cache
    warmer: Warms
    settings: Settings
    health: HealthChecker
    metrics: Metrics
    metrics_server: MetricsServer | None = None
    probe_server: grpc.aio.Server | None = None
    """Health alone on CACHEASIDE_HEALTH_LISTEN, where set (`create_app` says why)."""
    probe_port: int | None = None
    invalidator: OutboxInvalidator | None = None
    auditor: ConsistencyAuditor | None = None
    startup_warm: asyncio.Task[None] | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def engine(self) -> CacheEngine:
        """The cache engine every RPC reads through."""
        return self.cache.engine

    @property
    def database(self) -> AsyncEngine:
        """The database engine the loaders query."""
        return self.cache.database

    async def start(self) -> None:
        """Serve, check health on the interval, serve metrics, warm if the settings ask."""
        # The first check comes before the port serves, so no probe ever sees a status nobody checked.
        await self.health.check()
        if self.engine.notifier is not None:
            self.engine.notifier.start()
        await self.server.start()
        if self.probe_server is not None:
            await self.probe_server.start()
        self._tasks.append(
            asyncio.create_task(self.health.run_every(self.settings.health_interval_ms / 1000))
        )
        if self.settings.metrics_listen:
            self.metrics_server = self.metrics.serve_http(self.settings.metrics_listen)
        if self.invalidator is not None:
            self._tasks.append(asyncio.create_task(self.invalidator.run()))
        if self.settings.warm_on_start:
            # In the background: the port is open and serving while warming runs.
            self.startup_warm = asyncio.create_task(warm_logged(self.warmer))
            self._tasks.append(self.startup_warm)
        if self.auditor is not None:
            self._tasks.append(asyncio.create_task(self.auditor.run_every(self.settings.audit_interval_s)))
        if self.settings.warm_interval_s:
            self._tasks.append(asyncio.create_task(warm_every(self.warmer, self.settings.warm_interval_s)))

    async def shutdown(self) -> None:
        """The graceful stop, on SIGTERM: health NOT_SERVING, then in-flight calls finish, new ones fail."""
        await self.health.enter_graceful_shutdown()
        await self.stop()

    async def stop(self, grace_s: float | None = None) -> None:
        """Let in-flight calls finish for up to grace_s, then release Redis and the database."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        grace_s = self.settings.shutdown_grace_s if grace_s is None else grace_s
        try:
            await self.server.stop(grace_s)
        finally:
            if self.probe_server is not None:  # after the calls' grace: probes saw NOT_SERVING through it
                await self.probe_server.stop(0)
        if self.metrics_server is not None:
            # A thread join; quick, since the server's loop wakes every half second at most.
            await asyncio.to_thread(self.metrics_server.stop)
        await self.health.close()
        await self.warmer.close()
        await close_cache(self.cache, grace_s)


def create_app(
    settings: Settings,
    *,
    redis_url: str | None = None,
    reuse_port: bool = False,
    worker: int | None = None,
) -> App:
    """Build the whole service and bind its port; nothing is served until `start`.

    reuse_port lets several processes bind the same port (`serve --workers`); otherwise a port another
    server holds is an error, not a silent share.
    """
    metrics = Metrics(worker=worker)
    # The port first: a server that cannot listen fails before it opens any pool.
    server, port = _bound_server(settings, reuse_port=reuse_port)
    probe_server, probe_port = None, None
    if settings.health_listen:
        probe_server, probe_port = _probe_server(settings, reuse_port=reuse_port)
    redis_url = redis_url or settings.redis_url
    cache = build_cache(settings, redis_url)
    engine, database, queries, untimed_catalog = cache.engine, cache.database, cache.queries, cache.catalog
    store = engine.store
    catalog = metrics.timed_catalog(untimed_catalog)
    metrics.watch_engine(engine)
    recent_reads, auditor = None, None
    if settings.audit_interval_s:
        recent_reads = RecentReads()
        tiers = (settings.ttl_hot_s, settings.ttl_warm_s, settings.ttl_cold_s)
        auditor = ConsistencyAuditor(
            store,
            recent_reads,
            # Untimed: the audit's queries are not loads of misses, and must not count as such.
            loaders_by_family(families(untimed_catalog)),
            samples=settings.audit_samples,
            grace_s=settings.audit_grace_ms / 1000,
            longest_ttl_s=max(tiers) * (1 + settings.ttl_jitter_pct / 100),
            load_timeout_s=settings.db_timeout_ms / 1000,
        )
        metrics.watch_audit(auditor.stats)
    warmer: Warms
    if settings.warm_worker and db.shareable(settings.database_url):
        warmer = WarmWorker(settings, redis_url, observe=metrics.warmed, load_observed=metrics.load_observed)
    else:
        warmer = Warmer.from_settings(settings, engine, catalog, queries, observe=metrics.warmed)
    checker = HealthChecker(
        services=(SERVICE_NAME,),
        database=database,
        redis_url=redis_url,
        timeout_s=settings.db_timeout_ms / 1000,
        redis_timeout_s=settings.redis_timeout_ms / 1000,
        metrics=metrics,
    )
    service = CacheService(engine, catalog, warmer, observer=metrics, recent_reads=recent_reads)
    observability = Observability(metrics)
    # Health calls are observed (request id, metrics), never token-checked or limited: probes answer.
    health_handlers = _captured_handlers(health_pb2_grpc.add_HealthServicer_to_server, checker.servicer)
    observed = Guard(observability)
    observed_health = {
        rpc: observed.wrap(rpc, handler, ids_up_front=True) for rpc, handler in health_handlers.items()
    }
    # Generic handlers only: grpc.aio's serving loop keeps one pending request-call future per
    # registered method (and one for all generic ones) and runs asyncio.wait over all of them for every
    # call it takes in, adding and removing a done callback on each. With the service's 11 and health's
    # 3 registered, that was 15% of a near-cache hit's instructions; with health's Check alone, 1.5%
    # (`make bench-instructions`). Probes that must not queue behind reads go to the probe port.
    server.add_generic_rpc_handlers(
        (
            _guarded_service(service, settings, observability),
            grpc.method_handlers_generic_handler(health.SERVICE_NAME, observed_health),
        )
    )
    if settings.reflection:
        # Served as a generic handler too (its generated code would register its method).
        reflection_handlers = _captured_handlers(
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
            # grpc_reflection exports aio in an if-branch, which mypy does not follow.
            reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
            ),
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(reflection.SERVICE_NAME, reflection_handlers),)
        )
    if probe_server is not None:
        probe_server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(health.SERVICE_NAME, observed_health),)
        )
    invalidator = None
    if settings.auto_invalidate and not db.is_sqlite(settings.database_url):
        invalidator = OutboxInvalidator(
            db.asyncpg_dsn(settings.database_url),
            schema=settings.database_schema or "public",
            engine=engine,
            poll_interval_s=settings.outbox_poll_ms / 1000,
            batch_size=settings.outbox_batch,
        )
        metrics.watch_invalidator(invalidator)
    return App(
        server=server,
        port=port,
        cache=cache,
        warmer=warmer,
        settings=settings,
        health=checker,
        metrics=metrics,
        probe_server=probe_server,
        probe_port=probe_port,
        invalidator=invalidator,
        auditor=auditor,
    )


def _guarded_service(
    service: CacheService, settings: Settings, observability: Observability
) -> GuardedService:
    """The service's handlers, guarded: observed, then the token check, then the call limit.

    Outermost first, so rejected calls are counted and carry a request id too, and a call refused for
    its token never takes a slot. Each method is wrapped twice, once for calls that send a request id
    and once for those that do not (guard.py), and its debug twin once more; none is a server
    interceptor: grpc.aio runs an interceptor chain on every call of every method, which was 57 us of a
    near-cache hit's 314 us of CPU; a wrapper built once costs a call only its own work. Health is
    only observed and reflection not wrapped at all: both always open, never limited. Calls that send
    x-cache-debug are served by the service's debug handlers (guarded as calls with a request id are).
    """
    tokens = TokenCheck(
        admin_token=settings.admin_token.get_secret_value(), read_token=settings.read_token.get_secret_value()
    )
    guard = Guard(
        observability,
        check_for=tokens.check_for,
        limit=ConcurrencyLimit(limit=settings.max_concurrent_rpcs),
    )
    return guard.generic_handler(
        SERVICE_NAME,
        service.method_handlers(),
        asked=(CACHE_DEBUG_HEADER, service.method_handlers(debug=True)),
    )


class _HandlerCapture:
    """Stands in for a server to an add_*Servicer_to_server function, keeping the handlers it adds."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, _handlers: object) -> None:
        pass

    def add_registered_method_handlers(self, _service: str, handlers: dict[str, Any]) -> None:
        self.handlers = handlers


def _captured_handlers(add_to_server: Callable[[Any, Any], None], servicer: Any) -> dict[str, Any]:
    """A service's handlers as its generated add_*Servicer_to_server builds them, to wrap or serve."""
    capture = _HandlerCapture()
    add_to_server(servicer, capture)
    return capture.handlers


def _probe_server(settings: Settings, *, reuse_port: bool) -> tuple[grpc.aio.Server, int]:
    """A second server, bound to CACHEASIDE_HEALTH_LISTEN, for health alone (create_app adds it): for
    probes that must answer when the service's port is swamped.

    grpc core queues per server the calls the event loop has not taken up yet, and the service's server
    sheds past CACHEASIDE_MAX_PENDING_RPCS: on a server of its own a probe never waits behind, or is shed
    with, a backlog of reads, and costs the reads nothing (as a registered method on the service's
    port, it cost each of them 1.5%). Plaintext whatever the service's TLS, as Kubernetes' gRPC probes
    speak no TLS: bind it where only probes reach.
    """
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port)), *_KEEPALIVE_OPTIONS])
    return server, _listen(server, settings.health_listen, None)


def _bound_server(settings: Settings, *, reuse_port: bool) -> tuple[grpc.aio.Server, int]:
    """The gRPC server with its options, bound to CACHEASIDE_LISTEN; returns the port."""
    server = grpc.aio.server(
        # grpcio sets SO_REUSEPORT by default, which would let two servers share a port by accident.
        options=[
            ("grpc.so_reuseport", int(reuse_port)),
            ("grpc.max_receive_message_length", settings.max_receive_message_bytes),
            ("grpc.max_send_message_length", settings.max_send_message_bytes),
            # Calls arrived but not yet taken up by the event loop: grpc core sheds new ones at random
            # past this many (every one past three times as many), with CANCELLED, before any handler.
            ("grpc.server.max_pending_requests", settings.max_pending_rpcs),
            ("grpc.server.max_pending_requests_hard_limit", 3 * settings.max_pending_rpcs),
            *_KEEPALIVE_OPTIONS,
        ],
    )
    return server, _listen(server, settings.listen, tls.server_credentials(settings))


def _listen(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind server to address, with TLS where credentials are given; returns the port."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpcio raises where it used to return 0
        raise RuntimeError(f"could not listen on {address}: {exc}") from exc
    if port == 0:
        raise RuntimeError(f"could not listen on {address}")
    return port


async def serve(
    settings: Settings, *, demo: bool = False, reuse_port: bool = False, worker: int | None = None
) -> None:
    """Serve until SIGINT or SIGTERM, with a private Redis when none is configured."""
    with contextlib.ExitStack() as stack:
        redis_url = settings.redis_url
        if not redis_url:
            redis_url = stack.enter_context(EmbeddedRedis()).url
            _LOGGER.info("no CACHEASIDE_REDIS_URL set: started a private redis-server at %s", redis_url)
        else:
            _LOGGER.info("using redis at %s", _without_password(redis_url))
        if demo:
            from server.demo import prepare_demo_database

            await prepare_demo_database(settings)
        app = create_app(settings, redis_url=redis_url, reuse_port=reuse_port, worker=worker)
        # Handled before "serving" is logged: a SIGTERM sent as soon as the service says it serves
        # (an orchestrator's, or a test's) must shut it down gracefully, not kill it outright.
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await app.start()
        freeze_startup_heap()
        _LOGGER.info(
            "cacheaside serving on port %d (database %s)",
            app.port,
            _without_password(settings.database_url),
            extra={
                "tls": bool(settings.tls_cert_file),
                "mtls": bool(settings.tls_client_ca_file),
                "metrics_port": app.metrics_server.port if app.metrics_server else None,
                "health_port": app.probe_port,
                "admin_token": bool(settings.admin_token.get_secret_value()),
                "read_token": bool(settings.read_token.get_secret_value()),
                "worker": worker,
            },
        )
        await stopping.wait()
        _LOGGER.info("shutting down: in-flight calls get %.1fs", settings.shutdown_grace_s)
        await app.shutdown()
        _LOGGER.info("stopped")


def run(main: Coroutine[Any, Any, _T], event_loop: str = "asyncio") -> _T:
    """asyncio.run on the configured event loop: `asyncio` or `uvloop` (CACHEASIDE_EVENT_LOOP)."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if event_loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def _without_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
