"""SIGTERM: health goes NOT_SERVING, calls in flight finish, new calls are refused, the process exits 0.

The probe port (CACHEASIDE_HEALTH_LISTEN) answers NOT_SERVING until the calls in flight are done."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from client.proto.cacheaside.v1 import cache_service_pb2_grpc as pb_grpc
from server.config import Settings
from server.embedded_redis import free_port
from tests.conftest import Database
from tests.data import add_post, add_user
from tests.processes import health_status, log_lines_until, reaped, server_env, spawn, terminate


async def _wait_for_a_call_blocked_on_the_lock(engine: AsyncEngine) -> None:
    # Bounded poll: the server's query shows in pg_stat_activity once it waits for the test's lock.
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        " AND query ILIKE '%posts%'"
    )
    async with asyncio.timeout(30):
        while True:
            async with engine.connect() as connection:
                if (await connection.execute(query)).scalar_one():
                    return
            await asyncio.sleep(0.02)


async def _wait_until_refused(target: str) -> None:
    # Bounded poll: between the "shutting down" log line and server.stop there are a few statements,
    # and a connection accepted just before the listener closed has its call cancelled, not served.
    async with asyncio.timeout(10):
        while True:
            try:
                await health_status(target, timeout_s=1)
            except grpc.aio.AioRpcError as error:
                code = error.code()
            else:
                code = grpc.StatusCode.OK
            assert code in {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
            if code == grpc.StatusCode.UNAVAILABLE:
                return
            await asyncio.sleep(0.02)


# PostgreSQL only: a table lock is what holds a call in flight for as long as the test wants.
@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
async def test_sigterm_lets_calls_in_flight_finish_and_refuses_new_ones(
    settings: Settings, database: Database, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", title="in flight")
    port = free_port()
    target, probe_target = f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"
    env = server_env(
        settings,
        CACHEASIDE_LISTEN=target,
        CACHEASIDE_HEALTH_LISTEN=probe_target,
        CACHEASIDE_SHUTDOWN_GRACE_S="30",
        CACHEASIDE_DB_TIMEOUT_MS="30000",
        CACHEASIDE_LEASE_TTL_MS="31000",
    )
    async with reaped(await spawn("serve", env=env)) as process:
        await log_lines_until(process, "cacheaside serving")
        async with db_engine.connect() as locker, grpc.aio.insecure_channel(target) as channel:
            transaction = await locker.begin()
            await locker.execute(text(f'LOCK TABLE "{database.schema}".posts IN ACCESS EXCLUSIVE MODE'))
            in_flight = asyncio.ensure_future(
                pb_grpc.CacheServiceStub(channel).GetPost(pb.GetPostRequest(post_id="p1"), timeout=60)
            )
            await _wait_for_a_call_blocked_on_the_lock(db_engine)

            process.send_signal(signal.SIGTERM)
            await log_lines_until(process, "shutting down")
            await _wait_until_refused(target)
            assert not in_flight.done(), "the call in flight is still waiting for its row"
            probed = await health_status(probe_target, timeout_s=5)
            assert probed == health_pb2.HealthCheckResponse.NOT_SERVING, "the probe port says so"

            await transaction.rollback()
            response = await asyncio.wait_for(in_flight, 30)
            assert response.post.title == "in flight", "the call in flight completed"
        async with asyncio.timeout(30):
            await log_lines_until(process, "stopped")
            assert await process.wait() == 0


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_a_sigterm_sent_the_moment_it_says_it_serves_stops_it_gracefully(
    settings: Settings, db_engine: AsyncEngine
) -> None:
    # Its handler is in place before the line is written, so no SIGTERM after it can kill it outright
    # (exit -15, nothing drained), as an orchestrator's right after readiness once did to a worker.
    env = server_env(settings, CACHEASIDE_LISTEN=f"127.0.0.1:{free_port()}")
    async with reaped(await spawn("serve", env=env)) as server:
        await log_lines_until(server, "cacheaside serving")
        assert await terminate(server) == 0
        await log_lines_until(server, "stopped")
