"""grpc.health.v1 follows the database, not Redis; reflection is on unless turned off."""

from __future__ import annotations

import asyncio
import logging
import re

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.config import Settings
from server.embedded_redis import free_port
from tests.conftest import Database, Running, start_service, stop_service
from tests.data import add_post, add_user
from tests.helpers import call, error_of
from tests.tcp_proxy import ProxyMode, TcpProxy

SERVICE = "cacheaside.v1.CacheService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(running: Running, service: str = "") -> int:
    """The status on the service's port, after checking the probe port (if any) says the same."""
    stub = health_pb2_grpc.HealthStub(running.channel)
    status = (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status
    if running.app.probe_port is not None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.app.probe_port}") as probes:
            probed = await health_pb2_grpc.HealthStub(probes).Check(
                health_pb2.HealthCheckRequest(service=service)
            )
        assert probed.status == status, "the probe port answers as the service's port does"
    return status


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_health_is_not_serving_while_the_database_is_down_and_comes_back(
    settings: Settings, database: Database, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    upstream = make_url(database.url)
    proxy = await TcpProxy(upstream.host or "127.0.0.1", upstream.port or 5432).start()
    through_proxy = upstream.set(port=proxy.port).render_as_string(hide_password=False)
    # No error backoff: the read after recovery must reach the database at once, for this test.
    running = await start_service(
        settings,
        database_url=through_proxy,
        health_interval_ms=50,
        db_timeout_ms=1000,
        db_error_backoff_ms=0,
        health_listen="127.0.0.1:0",
    )
    watch = health_pb2_grpc.HealthStub(running.channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
    try:
        async with asyncio.timeout(20):  # bounded: the checker runs every 50 ms
            assert (await watch.read()).status == SERVING
            assert await _status(running) == SERVING

            proxy.set_mode(ProxyMode.REFUSE)
            assert (await watch.read()).status == NOT_SERVING
            assert await _status(running) == NOT_SERVING, "the whole server follows the database"
            assert await _status(running, "liveness") == SERVING, "no restarts for a database outage"
            code, _, reason = await error_of(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
            assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
            assert running.app.metrics.database_up._value.get() == 0

            proxy.set_mode(ProxyMode.FORWARD)
            assert (await watch.read()).status == SERVING
            assert await _status(running) == SERVING
            response, _ = await call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
            assert response.post.id == "p1"
    finally:
        watch.cancel()
        await stop_service(running)
        await proxy.close()


async def test_a_failing_redis_keeps_serving_but_shows_in_metrics_and_logs(
    settings: Settings, db_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    caplog.set_level(logging.WARNING, logger="server.health")
    running = await start_service(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        assert await _status(running) == SERVING
        assert await _status(running, SERVICE) == SERVING
        _, meta = await call(running.stub.GetPost, pb.GetPostRequest(post_id="p1"))
        assert meta["x-cache"] == "bypass"
        metrics = running.app.metrics
        assert (metrics.redis_up._value.get(), metrics.database_up._value.get()) == (0, 1)
        assert any("redis unreachable" in r.getMessage() for r in caplog.records), caplog.text
    finally:
        await stop_service(running)


async def _reflection_services(running: Running) -> list[str]:
    stream = reflection_pb2_grpc.ServerReflectionStub(running.channel).ServerReflectionInfo()
    await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    await stream.done_writing()
    response = await stream.read()
    return [service.name for service in response.list_services_response.service]


async def test_reflection_lists_the_services_and_can_be_turned_off(
    settings: Settings, db_engine: AsyncEngine
) -> None:
    running = await start_service(settings)
    try:
        services = await _reflection_services(running)
        assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(services)
    finally:
        await stop_service(running)
    running = await start_service(settings, reflection=False)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _reflection_services(running)
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await stop_service(running)


async def test_a_health_check_of_an_unknown_service_is_not_found_with_a_request_id(
    settings: Settings,
) -> None:
    # grpc_health aborts on its own (a plain context.abort, which sends the status at once): the guard
    # puts health's made id in the trailing metadata before the handler runs, so the failure has one.
    running = await start_service(settings)
    try:
        stub = health_pb2_grpc.HealthStub(running.channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope"))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        ids = [value for key, value in raised.value.trailing_metadata() or () if key == "x-request-id"]
        assert len(ids) == 1, raised.value.trailing_metadata()
        assert re.fullmatch(r"[0-9a-f]{16}-[1-9][0-9]*", ids[0])
    finally:
        await stop_service(running)


def test_the_probe_port_must_differ_from_the_service_port() -> None:
    with pytest.raises(ValueError, match=r"CACHEASIDE_HEALTH_LISTEN .* must differ from CACHEASIDE_LISTEN"):
        Settings(listen="127.0.0.1:50051", health_listen="127.0.0.1:50051")
    assert Settings(listen="127.0.0.1:50051", health_listen="127.0.0.1:50052").health_listen
