"""A real local Redis Cluster for tests: three masters with a replica each, on spare loopback ports."""

from __future__ import annotations

import random
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import redis

from server.embedded_redis import find_redis_server

_NODES = 6
_NODE_TIMEOUT_MS = 1000


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(count: int) -> list[int]:
    # Each node also listens on its port + 10000 (the cluster bus), so both must be free.
    chosen: list[int] = []
    rng = random.Random()
    while len(chosen) < count:
        port = rng.randrange(20000, 40000)
        if port not in chosen and _free(port) and _free(port + 10000):
            chosen.append(port)
    return chosen


@dataclass
class Cluster:
    """The running nodes: their ports and processes."""

    ports: list[int]
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    folder: Path = Path()

    @property
    def url(self) -> str:
        """A URL naming one node (the first master); the client discovers the rest."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def client(self, port: int) -> redis.Redis:
        """A plain client to one node."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)

    def masters(self) -> list[int]:
        """Ports of the nodes that are masters now."""
        found = []
        for port in self.ports:
            with suppress(redis.RedisError), self.client(port) as node:
                if node.info("replication")["role"] == "master":
                    found.append(port)
        return found

    def node_id(self, port: int) -> str:
        """The cluster node id of the node on port."""
        with self.client(port) as node:
            reply = node.execute_command("CLUSTER MYID")
            return reply.decode() if isinstance(reply, bytes) else str(reply)

    def start_node(self, port: int) -> None:
        """Start (or restart) the node on port."""
        args = [
            find_redis_server(),
            "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.folder / f"nodes-{port}.conf"),
            "--cluster-node-timeout", str(_NODE_TIMEOUT_MS), "--save", "", "--appendonly", "no",
            "--dir", str(self.folder),
            # A replica's first sync starts at once, not 5 s later: killed before it, a master would
            # leave a replica that never synced and so never takes over.
            "--repl-diskless-sync-delay", "0",
            # A cache's replica takes over however long it was cut off: stale beats down.
            "--cluster-replica-validity-factor", "0",
        ]  # fmt: skip
        self.processes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self, port: int) -> None:
        """SIGKILL the node on port, as a crash would."""
        process = self.processes.pop(port)
        process.kill()
        process.wait(10)

    def wait_ok(self, timeout_s: float = 30) -> None:
        """Until every live node says the cluster is ok, every slot is served by a live master, and
        every replica has synced with its master (so it can take over when the master dies)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self._ok(port) for port in self.processes):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not become ok")

    def _ok(self, port: int) -> bool:
        # cluster_state stays ok for node-timeout after a master dies, so the slot owners are checked.
        with suppress(redis.RedisError), self.client(port) as node:
            info = node.cluster("info")
            if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != 16384:
                return False
            owners = {int(slot_range[2][1]) for slot_range in node.execute_command("CLUSTER SLOTS")}
            replication = node.info("replication")
            synced = replication["role"] == "master" or replication.get("master_link_status") == "up"
            return owners <= set(self.processes) and synced
        return False


@contextmanager
def redis_cluster() -> Iterator[Cluster]:
    """Start six nodes, join them with redis-cli --cluster create, and stop them all at the end."""
    with tempfile.TemporaryDirectory(prefix="cacheaside-cluster-") as folder:
        cluster = Cluster(_ports(_NODES), folder=Path(folder))
        try:
            for port in cluster.ports:
                cluster.start_node(port)
            for port in cluster.ports:
                _wait_for_port(port)
            nodes = [f"127.0.0.1:{port}" for port in cluster.ports]
            subprocess.run(
                ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
                check=True,
                capture_output=True,
                timeout=60,
            )
            cluster.wait_ok()
            yield cluster
        finally:
            for process in cluster.processes.values():
                process.kill()
                process.wait(10)


def _wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"redis-server did not start on port {port}")
