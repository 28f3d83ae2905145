"""gRPC unary calls through h2load (Debian's nghttp2-client): one request body, sent over and over.

h2load speaks HTTP/2 over cleartext with prior knowledge; with gRPC's headers and a data file holding
the length-prefixed request it sends real gRPC calls. It checks only the HTTP status, so the suite
checks grpc-status on the server's own counters and with one real gRPC call per run. Latency
percentiles come from h2load's per-request log.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.keyed_load import grpc_message
from benchmarks.stats import percentile

MISSING = (
    "h2load not found: the benchmark's load generator is Debian's nghttp2-client. "
    "Install it with `apt-get install -y nghttp2-client` (or `make bench-deps`)."
)
_GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


class H2loadMissing(RuntimeError):
    """h2load is not on PATH."""


def binary() -> str:
    """The h2load on PATH, or H2loadMissing with how to install it."""
    found = shutil.which("h2load")
    if found is None:
        raise H2loadMissing(MISSING)
    return found


def run(
    target: str,
    path: str,
    body: bytes,
    *,
    duration_s: float,
    connections: int = 16,
    streams: int = 4,
    cpus: str = "0",
    calls: int = 0,
) -> dict[str, float]:
    """Keep connections x streams calls in flight for duration_s; counts, req/s, p50 and p99 in ms.

    With calls, send exactly that many instead, taking as long as they take (duration_s bounds it).
    """
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "request.bin"
        data.write_bytes(grpc_message(body))
        log = Path(scratch) / "requests.log"
        argv = [
            "taskset", "-c", cpus, binary(),
            f"--clients={connections}", f"--max-concurrent-streams={streams}", "--threads=1",
            f"-n{calls}" if calls else f"--duration={round(duration_s * 1000)}ms",
            f"--data={data}", f"--log-file={log}",
            *(arg for header in _GRPC_HEADERS for arg in ("-H", header)),
            f"http://{target}{path}",
        ]  # fmt: skip
        output = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=duration_s + 60)
        if output.returncode:
            raise RuntimeError(f"h2load failed ({output.returncode}): {output.stdout}{output.stderr}")
        latencies_us = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line)
    return _parse(output.stdout) | {
        "p50_ms": percentile(latencies_us, 50) / 1000,
        "p99_ms": percentile(latencies_us, 99) / 1000,
    }


def _parse(text: str) -> dict[str, float]:
    finished = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", text)
    statuses = re.search(r"status codes: (\d+) 2xx, \d+ 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if not (finished and counts and statuses):
        raise RuntimeError(f"could not read h2load's output:\n{text}")
    return {
        "seconds": float(finished[1]) / (1000 if finished[2] == "ms" else 1),
        "req_per_s": float(finished[3]),
        "requests": int(counts[2]),
        "succeeded": int(counts[3]),
        "failed": int(counts[4]),
        "http_2xx": int(statuses[1]),
        "http_errors": int(statuses[2]) + int(statuses[3]),
    }
