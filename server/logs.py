"""Structured logs: one JSON object per line, carrying the request id of the call that logged it.

The request id lives in a context variable that the guard's first step (observability.py) sets for
each call, so every line logged while serving that call, at any depth, says which call it belongs to.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Literal

REQUEST_ID: ContextVar[str | int | None] = ContextVar("cacheaside_request_id", default=None)
"""The id of the call being served in this task: the caller's, or a call number this process made (see
`request_id`); None outside a call."""

# Ids for calls that bring none: 16 random hex digits per process, then a call number. Unique across
# processes (64 random bits each, from os.urandom) and within one (the count, shared by every server in
# it; workers are fresh interpreters, and nothing forks after startup). The number is what a call
# stores; the text is made only when something shows it (a log line, a failure's metadata), which
# most calls never do. Ids are for correlating logs, not secrets: callers who want opaque ones send
# their own.
_MADE_ID_PREFIX = f"{secrets.token_hex(8)}-"
CALL_NUMBERS = itertools.count(1)
"""The next call number: `next(CALL_NUMBERS)`, stored in REQUEST_ID for a call that sent no id."""


def request_id(stored: str | int | None = None) -> str | None:
    """The text of a request id as REQUEST_ID stores it (the current call's when not given):
    `3f9c0a7e15d2b864-1`, `3f9c0a7e15d2b864-2`, ... for the ones made here."""
    if stored is None:
        stored = REQUEST_ID.get()
    return f"{_MADE_ID_PREFIX}{stored}" if isinstance(stored, int) else stored


# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def cached_levels(logger: logging.Logger) -> Callable[[int], bool | None]:
    """The answers logger.isEnabledFor has cached, by level (None where it has none), for the hot path:
    `cached(level) is not False and logger.isEnabledFor(level)`.

    isEnabledFor is a Python method: 1.6k instructions of a held near-cache answer's 356k (`make
    bench-instructions`), where a lookup in the dictionary it caches its answers in is a C call. The
    logging module clears that dictionary whenever any level changes (setLevel, logging.disable), so a
    False found there is current. On a Python without that cache the lookup always says None.
    """
    cache = getattr(logger, "_cache", None)
    if isinstance(cache, dict):
        found: Callable[[int], bool | None] = cache.get
        return found
    return lambda _level: None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request id, pid and any extras."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        current = request_id()
        if current is not None:
            line["request_id"] = current
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def configure_logging(level: str, fmt: Literal["json", "text"] = "json") -> None:
    """Send the root logger to stderr in the given format, replacing any handler set before."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def _iso_time(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"
