"""Bearer tokens on admin calls and, when configured, on reads; TLS and mutual TLS with made certificates."""

from __future__ import annotations

import io
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from client.client import CACHE_DEBUG_METADATA, GET_POST, AsyncCacheClient, tls_credentials
from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from server.config import Settings
from server.logs import JsonFormatter
from tests.certs import Certificates, make_certificates
from tests.conftest import Running, start_service, stop_service
from tests.data import add_post, add_user

ADMIN = "admin-7f3c9a1d2e"
READER = "reader-51b0e6c4aa"


async def _code(client: AsyncCacheClient, action: str) -> tuple[grpc.StatusCode, str]:
    calls = {
        "read": lambda: client.get_post("p1"),
        "debug read": lambda: client.call(
            GET_POST, pb.GetPostRequest(post_id="p1"), metadata=CACHE_DEBUG_METADATA
        ),
        "invalidate": lambda: client.invalidate(post_ids=["p1"]),
        "warm": lambda: client.warm(posts=1, users=1),
        "health": lambda: client.health(),
    }
    try:
        await calls[action]()
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture
async def seeded(db_engine: AsyncEngine) -> AsyncEngine:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice")
    return db_engine


@pytest.fixture
async def guarded(settings: Settings, seeded: AsyncEngine) -> AsyncIterator[Running]:
    running = await start_service(settings, admin_token=SecretStr(ADMIN))
    yield running
    await stop_service(running)


def _client(running: Running, token: str | None) -> AsyncCacheClient:
    return AsyncCacheClient(running.target, token=token, max_attempts=1)


async def test_admin_calls_need_the_admin_token_and_reads_stay_open(guarded: Running) -> None:
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    try:
        for action in ("invalidate", "warm"):
            async with _client(guarded, None) as client:
                code, details = await _code(client, action)
                assert code == grpc.StatusCode.UNAUTHENTICATED, action
                assert "authorization: Bearer" in details
            async with _client(guarded, "wrong-token") as client:
                code, details = await _code(client, action)
                assert code == grpc.StatusCode.UNAUTHENTICATED, action
                assert "not valid" in details
            async with _client(guarded, ADMIN) as client:
                assert (await _code(client, action))[0] == grpc.StatusCode.OK, action
        async with _client(guarded, None) as client:
            assert (await _code(client, "read"))[0] == grpc.StatusCode.OK
            assert (await _code(client, "health"))[0] == grpc.StatusCode.OK
    finally:
        logging.getLogger().removeHandler(handler)
    assert "call rejected" in log.getvalue(), "rejections are logged"
    assert ADMIN not in log.getvalue(), "tokens are never logged"
    assert "wrong-token" not in log.getvalue(), "not even wrong ones"
    rejected = guarded.app.metrics.rpc_requests.labels("Invalidate", "UNAUTHENTICATED").value
    assert rejected == 2


async def test_reads_need_the_read_or_admin_token_when_a_read_token_is_set(
    settings: Settings, seeded: AsyncEngine
) -> None:
    running = await start_service(settings, admin_token=SecretStr(ADMIN), read_token=SecretStr(READER))
    try:
        for token, read, invalidate in (
            (None, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
            ("wrong", grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED),
            (READER, grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED),
            (ADMIN, grpc.StatusCode.OK, grpc.StatusCode.OK),
        ):
            async with _client(running, token) as client:
                assert (await _code(client, "read"))[0] == read, token
                assert (await _code(client, "debug read"))[0] == read, ("asking for the tier", token)
                assert (await _code(client, "invalidate"))[0] == invalidate, token
                assert (await _code(client, "health"))[0] == grpc.StatusCode.OK, "probes need no token"
    finally:
        await stop_service(running)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


async def _tls_code(running: Running, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    if credentials is None:
        client = AsyncCacheClient(running.target, max_attempts=1, timeout_s=5)
    else:
        client = AsyncCacheClient(running.target, credentials=credentials, max_attempts=1, timeout_s=5)
    async with client:
        try:
            response = await client.get_post("p1")
        except grpc.aio.AioRpcError as error:
            return error.code()
        assert response.post.id == "p1"
        assert await client.health() == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_tls_connects_with_the_right_ca_and_refuses_the_wrong_one_and_plaintext(
    settings: Settings, seeded: AsyncEngine, certs: Certificates
) -> None:
    running = await start_service(settings, tls_cert_file=certs.server.cert, tls_key_file=certs.server.key)
    try:
        assert await _tls_code(running, tls_credentials(ca_file=certs.ca)) == grpc.StatusCode.OK
        assert (
            await _tls_code(running, tls_credentials(ca_file=certs.rogue_ca)) == grpc.StatusCode.UNAVAILABLE
        )
        assert await _tls_code(running, None) == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_service(running)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_mutual_tls_needs_a_client_certificate_from_the_configured_ca(
    settings: Settings, seeded: AsyncEngine, certs: Certificates
) -> None:
    running = await start_service(
        settings,
        tls_cert_file=certs.server.cert,
        tls_key_file=certs.server.key,
        tls_client_ca_file=certs.ca,
    )
    try:
        right = tls_credentials(ca_file=certs.ca, cert_file=certs.client.cert, key_file=certs.client.key)
        assert await _tls_code(running, right) == grpc.StatusCode.OK
        assert await _tls_code(running, tls_credentials(ca_file=certs.ca)) == grpc.StatusCode.UNAVAILABLE
        rogue = tls_credentials(
            ca_file=certs.ca, cert_file=certs.rogue_client.cert, key_file=certs.rogue_client.key
        )
        assert await _tls_code(running, rogue) == grpc.StatusCode.UNAVAILABLE
    finally:
        await stop_service(running)


def test_tls_settings_must_come_in_pairs(settings: Settings, certs: Certificates, tmp_path: Path) -> None:
    from server.tls import server_credentials

    with pytest.raises(ValueError, match="both"):
        server_credentials(settings.model_copy(update={"tls_cert_file": certs.server.cert}))
    with pytest.raises(ValueError, match="needs"):
        server_credentials(settings.model_copy(update={"tls_client_ca_file": certs.ca}))
    with pytest.raises(ValueError, match="cannot be read"):
        server_credentials(
            settings.model_copy(
                update={"tls_cert_file": str(tmp_path / "none.pem"), "tls_key_file": certs.server.key}
            )
        )


async def test_a_rejected_stream_and_a_health_check_carry_a_request_id_and_are_counted(
    guarded: Running,
) -> None:
    stream = guarded.stub.WarmWithProgress(pb.WarmWithProgressRequest(), metadata=(("x-request-id", "w-1"),))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stream:
            pass
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(raised.value.trailing_metadata() or ())["x-request-id"] == "w-1"
    requests = guarded.app.metrics.rpc_requests
    assert requests.labels("WarmWithProgress", "UNAUTHENTICATED").value == 1

    check = health_pb2_grpc.HealthStub(guarded.channel).Check(
        health_pb2.HealthCheckRequest(), metadata=(("x-request-id", "h-1"),)
    )
    assert (await check).status == health_pb2.HealthCheckResponse.SERVING, "probes need no token"
    assert dict(await check.trailing_metadata())["x-request-id"] == "h-1"
    assert requests.labels("Check", "OK").value >= 1
