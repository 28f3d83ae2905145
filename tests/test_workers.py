"""`serve --workers N`: N processes share one port with SO_REUSEPORT; a single server never shares one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from client.proto.cacheaside.v1 import cache_service_pb2 as pb
from client.proto.cacheaside.v1 import cache_service_pb2_grpc as pb_grpc
from server.app import create_app
from server.config import Settings
from server.embedded_redis import free_port
from server.workers import _pin, worker_cpus
from tests.conftest import Running
from tests.data import add_post, add_user
from tests.processes import log_lines_until, reaped, server_env, spawn, terminate

WORKERS = 2
_ALLOWED = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
MAX_CONNECTIONS = 200  # SO_REUSEPORT spreads connections by hash: both workers are hit long before this


def _served(metrics_port: int) -> tuple[int, str]:
    """(GetPost calls answered, pid) of one worker, from its own /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    calls, pid = 0, ""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cacheaside_rpc_requests_total" and sample.labels["rpc"] == "GetPost":
                calls += int(sample.value)
            if sample.name == "cacheaside_worker":
                pid = sample.labels["pid"]
    return calls, pid


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_both_worker_processes_serve_calls_and_sigterm_stops_them_all(
    settings: Settings, db_engine: AsyncEngine
) -> None:
    await add_user(db_engine, "alice")
    await add_post(db_engine, "p1", "alice", title="shared")
    target = f"127.0.0.1:{free_port()}"
    env = server_env(settings, CACHEASIDE_LISTEN=target, CACHEASIDE_METRICS_LISTEN="127.0.0.1:0")
    async with reaped(await spawn("serve", "--workers", str(WORKERS), env=env)) as parent:
        started = await log_lines_until(parent, "cacheaside serving", count=WORKERS)
        workers = {int(line["pid"]): int(line["metrics_port"]) for line in started}
        assert len(workers) == WORKERS
        assert parent.pid not in workers, "the workers are processes of their own"

        calls = 0
        async with asyncio.timeout(60):
            while calls < MAX_CONNECTIONS:
                # A new channel is a new connection, which the kernel hands to one of the workers.
                async with grpc.aio.insecure_channel(target) as channel:
                    response = await pb_grpc.CacheServiceStub(channel).GetPost(
                        pb.GetPostRequest(post_id="p1")
                    )
                assert response.post.title == "shared"
                calls += 1
                served = [await asyncio.to_thread(_served, port) for port in workers.values()]
                if all(count for count, _ in served):
                    break
        assert all(count for count, _ in served), f"one worker served all {calls} calls"
        assert sum(count for count, _ in served) == calls
        assert {int(pid) for _, pid in served} == set(workers), "each worker reports its own pid"

        assert await terminate(parent) == 0
        for pid in workers:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def test_pinned_workers_take_the_allowed_cpus_in_turn() -> None:
    assert worker_cpus({3, 1}, 2) == [1, 3]
    assert worker_cpus([0, 1], 3) == [0, 1, 0]  # more workers than CPUs: they share, in turn
    assert worker_cpus([2], 1) == [2]


@pytest.mark.skipif(not _ALLOWED, reason="CPU affinity is Linux's")
def test_a_worker_that_cannot_take_its_cpu_says_so_and_floats() -> None:
    assert _pin(None) is None
    assert "could not pin this worker to CPU 4095" in str(_pin("4095"))  # no such CPU here
    assert os.sched_getaffinity(0) == _ALLOWED  # nothing changed


def _thread_cpus(pid: int) -> list[set[int]]:
    """The CPUs each thread of a process may run on (grpc's poller thread included)."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended since the listing
            found.append(os.sched_getaffinity(int(tid)))
    return found


@pytest.mark.skipif(len(_ALLOWED) < 2, reason="pinning to one CPU each needs two CPUs to tell apart")
@pytest.mark.parametrize("pinned", [True, False], ids=["pinned", "floating"])
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_pinned_workers_run_every_thread_on_a_cpu_of_their_own(
    settings: Settings, db_engine: AsyncEngine, pinned: bool
) -> None:
    env = server_env(
        settings, CACHEASIDE_LISTEN=f"127.0.0.1:{free_port()}", CACHEASIDE_PIN_WORKERS=str(pinned).lower()
    )
    async with reaped(await spawn("serve", "--workers", str(WORKERS), env=env)) as parent:
        started = await log_lines_until(parent, "cacheaside serving", count=WORKERS)
        threads = {int(line["pid"]): _thread_cpus(int(line["pid"])) for line in started}
        assert all(len(cpus) > 1 for cpus in threads.values()), "grpc's poller runs beside the loop"
        if pinned:
            for cpus in threads.values():
                assert len(cpus[0]) == 1, f"a worker on {cpus[0]}, not one CPU"
                assert all(thread == cpus[0] for thread in cpus), "a thread escaped its worker's CPU"
            worker_on = sorted(cpu for cpus in threads.values() for cpu in cpus[0])
            assert worker_on == sorted(worker_cpus(_ALLOWED, WORKERS))
        else:  # the service's own CPUs, inherited from this process
            assert all(thread == _ALLOWED for cpus in threads.values() for thread in cpus)
        assert await terminate(parent) == 0


async def test_a_single_server_does_not_share_its_port(service: Running, settings: Settings) -> None:
    with pytest.raises(RuntimeError, match="could not listen"):
        create_app(settings.model_copy(update={"listen": service.target}))
