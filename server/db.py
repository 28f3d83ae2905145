"""The SQL database: engine construction, and the translation of its failures into DatabaseUnavailable."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from server.config import Settings
from server.errors import DatabaseUnavailable

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def is_sqlite(url: str) -> bool:
    """Whether the URL names SQLite (the embedded default)."""
    return make_url(url).get_backend_name() == "sqlite"


def shareable(url: str) -> bool:
    """Whether another process opening the URL sees the same data (not so for SQLite in memory)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return True
    return parsed.database not in (None, "", ":memory:") and parsed.query.get("mode") != "memory"


def create_engine(settings: Settings, *, reads_only: bool = False) -> AsyncEngine:
    """An async engine for CACHEASIDE_DATABASE_URL, pooled and bounded by the settings.

    reads_only: every statement runs on its own (AUTOCOMMIT), for the service's loads. Each load is
    one SELECT, which at READ COMMITTED sees a snapshot of its own anyway, so the transaction around
    it bought nothing and cost two round trips (BEGIN, ROLLBACK), four with the checkout's ping:
    a load is two round trips instead of six, which is what it waits on a distant database.
    """
    url = settings.database_url
    timeout_s = settings.db_timeout_ms / 1000
    # A fixed pool: a burst waits at most the timeout for a connection, and never opens more.
    pool: dict[str, Any] = {"pool_size": settings.db_pool_size, "max_overflow": 0, "pool_timeout": timeout_s}
    if is_sqlite(url):
        engine = create_async_engine(url, connect_args={"timeout": timeout_s}, **pool)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {"timeout": timeout_s, "command_timeout": timeout_s}
    if settings.database_schema:
        connect_args["server_settings"] = {"search_path": _checked_schema(settings.database_schema)}
    if reads_only:
        pool["isolation_level"] = "AUTOCOMMIT"
    return create_async_engine(url, connect_args=connect_args, pool_pre_ping=True, **pool)


def asyncpg_dsn(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as a plain libpq DSN, for connections outside SQLAlchemy."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _checked_schema(name: str) -> str:
    if not _SCHEMA_NAME.match(name):
        raise ValueError(f"CACHEASIDE_DATABASE_SCHEMA {name!r} must be a plain SQL identifier")
    return name


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside a writer; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Translate a database that cannot answer into DatabaseUnavailable, with what an operator can do."""
    try:
        yield
    except ProgrammingError as exc:
        raise DatabaseUnavailable(
            "the database schema is missing or outdated; run `cacheaside db upgrade`",
            reason="DATABASE_SCHEMA_MISSING",
        ) from exc
    except PoolTimeout as exc:
        raise DatabaseUnavailable(
            "every database connection of this server stayed busy past the timeout "
            "(CACHEASIDE_DB_POOL_SIZE, CACHEASIDE_DB_TIMEOUT_MS); retry later",
            reason="DATABASE_POOL_EXHAUSTED",
        ) from exc
    except (OperationalError, InterfaceError, OSError) as exc:
        raise DatabaseUnavailable(f"the database is unreachable: {_first_line(exc)}") from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise DatabaseUnavailable(f"the database connection was lost: {_first_line(exc)}") from exc
        if _sqlstate(exc)[:2] in _UNAVAILABLE_SQLSTATE_CLASSES:
            raise DatabaseUnavailable(f"the database cannot answer now: {_first_line(exc)}") from exc
        raise


# SQLSTATE classes that say the database, not the query, is the trouble: 08 connection exception,
# 53 insufficient resources (too many connections), 57 operator intervention (shutting down, starting
# up, query cancelled), 58 system error. asyncpg raises "the database system is shutting down" (57P03)
# as a plain DBAPIError, which would otherwise reach the caller as UNKNOWN.
_UNAVAILABLE_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "58"})


def _sqlstate(exc: DBAPIError) -> str:
    return str(getattr(exc.orig, "sqlstate", None) or "")


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc) or type(exc).__name__
    return text.splitlines()[0][:200]
