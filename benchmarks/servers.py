"""Server processes under test, pinned to CPUs, with their CPU time and their own counters.

The product runs as it ships (`python -m server`, settings from CACHEASIDE_*), so the benchmark
measures the real server: interceptors, metrics, health checker and all. Its counters come from its
Prometheus endpoint (each worker's on its own port), its CPU time from /proc over the process tree.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from server.embedded_redis import free_port

_START_TIMEOUT_S = 60.0
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server configuration."""

    name: str
    argv: Sequence[str]  # the command; `{listen}` is replaced by host:port
    cpus: str  # taskset's CPU list: "1", "0,1"
    env: Mapping[str, str] = field(default_factory=dict)
    workers: int = 1
    metrics: bool = False  # the product: serve /metrics on a port per worker
    start_timeout_s: float = _START_TIMEOUT_S  # longer under valgrind


def product(name: str, env: Mapping[str, str], *, cpus: str, workers: int = 1) -> ServerSpec:
    """The real service, `python -m server [--workers N]`, configured by environment."""
    argv = [sys.executable, "-m", "server", *(["--workers", str(workers)] if workers > 1 else [])]
    return ServerSpec(name, argv, cpus, env, workers=workers, metrics=True)


def module(name: str, module_name: str, *args: str, cpus: str) -> ServerSpec:
    """A bench-only server (benchmarks.aio_server, benchmarks.sync_server) taking --listen."""
    return ServerSpec(name, [sys.executable, "-m", module_name, "--listen", "{listen}", *args], cpus)


class RunningServer:
    """One server configuration, started at once; wait_listening() before use, stop() after."""

    def __init__(self, spec: ServerSpec, log_dir: Path) -> None:
        self.spec = spec
        self.log = log_dir / f"{spec.name}.log"
        self._launch()

    def _launch(self) -> None:
        spec = self.spec
        self.port = _unpromised_port()
        self.metrics_ports = _consecutive_free_ports(spec.workers) if spec.metrics else []
        listen = f"127.0.0.1:{self.port}"
        env = {**os.environ, **spec.env, "CACHEASIDE_LISTEN": listen}
        if self.metrics_ports:  # the product: with metrics, and health on a probe port as the image has it
            env["CACHEASIDE_METRICS_LISTEN"] = f"127.0.0.1:{self.metrics_ports[0]}"
            env["CACHEASIDE_HEALTH_LISTEN"] = f"127.0.0.1:{_unpromised_port()}"
        argv = [arg.replace("{listen}", listen) for arg in spec.argv]
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                ["taskset", "-c", spec.cpus, *argv],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches the workers too
            )

    @property
    def target(self) -> str:
        """host:port of the server."""
        return f"127.0.0.1:{self.port}"

    def wait_listening(self) -> None:
        """Return once the gRPC port (and each metrics port) accepts connections. A server whose port
        was taken before it could bind it (a port found free is in the range every process's outgoing
        connections draw from) is started again on other ports, twice at most."""
        for attempt in range(3):
            deadline = time.monotonic() + self.spec.start_timeout_s
            ports = [self.port, *self.metrics_ports]
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    if "already in use" in tail and attempt < 2:
                        print(f"{self.spec.name}: a port was taken before it bound it; starting it again")
                        self._launch()
                        break
                    raise RuntimeError(f"{self.spec.name} exited with {self._process.returncode}:\n{tail}")
                if all(_accepts(port) for port in ports):
                    return
                time.sleep(0.1)
            else:
                self.stop()
                raise RuntimeError(
                    f"{self.spec.name} did not listen within {self.spec.start_timeout_s:.0f}s: see {self.log}"
                )

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the server and all its descendants so far."""
        return sum(_cpu_ticks(pid) for pid in _tree(self._process.pid)) / _CLOCK_TICKS

    def counters(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every counter sample of every worker, summed: {(name, sorted labels): value}."""
        totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for port in self.metrics_ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                text = response.read().decode()
            for family in text_string_to_metric_families(text):
                if family.type != "counter":
                    continue
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        key = (sample.name, tuple(sorted(sample.labels.items())))
                        totals[key] = totals.get(key, 0.0) + sample.value
        return totals

    @property
    def pid(self) -> int:
        """The process started (taskset execs the command, so the command's pid)."""
        return self._process.pid

    def stop(self) -> None:
        """SIGTERM to the whole group, then SIGKILL if it lingers."""
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# Every port handed to a server of this process: servers start together and bind later, so a port the
# OS calls free may already be promised to another (a worker's metrics port is the first one plus its
# index, which the OS knows nothing of).
_PROMISED: set[int] = set()


def _unpromised_port() -> int:
    for _ in range(50):
        port = free_port()
        if port not in _PROMISED:
            _PROMISED.add(port)
            return port
    raise RuntimeError("no free port that is not promised to another server")


def _consecutive_free_ports(count: int) -> list[int]:
    # Workers serve metrics on the configured port plus their index.
    for _ in range(50):
        first = free_port()
        ports = list(range(first, first + count))
        if not _PROMISED.intersection(ports) and all(not _accepts(port) for port in ports[1:]):
            _PROMISED.update(ports)
            return ports
    raise RuntimeError(f"no {count} consecutive free ports")


def _tree(pid: int) -> list[int]:
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        pids.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


def _cpu_ticks(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat(5))
