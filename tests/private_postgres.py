"""A private PostgreSQL for the tests, where none is running: initdb into a temporary folder.

Like pytest-postgresql, it needs the server's binaries (Debian's postgresql package puts them under
/usr/lib/postgresql/<version>/bin). PostgreSQL refuses to run as root, so as root it runs as the
`postgres` user the package creates.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from server.embedded_redis import free_port


def _binaries() -> Path | None:
    # The real binaries first: on Debian, PATH holds wrappers that pick among the system's clusters.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@dataclass
class PrivatePostgres:
    """A running private server: its URL, and a restart (as an operator's would)."""

    url: str
    restart: Callable[[], None]


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """Start a throwaway server on a free loopback port; yields it, then removes it."""
    binaries = _binaries()
    if binaries is None:
        raise RuntimeError("no PostgreSQL binaries (initdb) found; install PostgreSQL or start one")
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
    with tempfile.TemporaryDirectory(prefix="cacheaside-pg-") as scratch:
        data = Path(scratch) / "data"
        if as_user:
            shutil.chown(scratch, "postgres")
        port = free_port()

        def run(*command: str) -> None:
            argv = [*as_user, *command]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
            if done.returncode:
                raise RuntimeError(f"{Path(command[0]).name} failed: {done.stderr.strip()[:300]}")

        run(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-p {port} -k {scratch} -c listen_addresses=127.0.0.1 -c fsync=off"
        run(str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l", f"{scratch}/log", "start")
        try:
            run(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "test")
            restart = functools.partial(
                # -l as at start: without it the server would hold pg_ctl's output pipes open.
                run,
                str(binaries / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                f"{scratch}/log",
                "-w",
                "-m",
                "fast",
                "restart",
            )
            yield PrivatePostgres(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/test", restart)
        finally:
            run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
