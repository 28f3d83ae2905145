"""Request checks: every message tells the caller what to fix."""

from __future__ import annotations

import re
from collections.abc import Sequence

from google.protobuf.duration_pb2 import Duration

from server.errors import InvalidArgument

MAX_ID_LENGTH = 64
MAX_BATCH = 100
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DURATION_MAX_S = 315_576_000_000  # google.protobuf.Duration's own range: about 10,000 years
_NANOS_MAX = 999_999_999


def check_id(field: str, value: str) -> str:
    """The id, if it is 1 to 64 characters from [A-Za-z0-9_-]."""
    if _ID.fullmatch(value):
        return value
    if not value:
        raise InvalidArgument(f"{field} is required", reason="INVALID_ID")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(
            f"{field} is {len(value)} characters long; ids are at most {MAX_ID_LENGTH}", reason="INVALID_ID"
        )
    raise InvalidArgument(
        f"{field} {value[:MAX_ID_LENGTH]!r} has a character outside [A-Za-z0-9_-]", reason="INVALID_ID"
    )


def check_ids(field: str, values: Sequence[str], *, max_count: int = MAX_BATCH) -> list[str]:
    """1 to max_count valid ids."""
    if not values:
        raise InvalidArgument(f"{field} must name at least one id", reason="EMPTY_BATCH")
    if len(values) > max_count:
        raise InvalidArgument(
            f"{field} names {len(values)} ids; at most {max_count} per call, so split the batch",
            reason="BATCH_TOO_LARGE",
        )
    fullmatch = _ID.fullmatch
    for index, value in enumerate(values):
        if not fullmatch(value):
            check_id(f"{field}[{index}]", value)  # raises, naming the id at fault
    return list(values)


def check_limit(field: str, value: int, *, default: int, maximum: int) -> int:
    """The limit, with 0 meaning the default; negative or above maximum is refused."""
    if value == 0:
        return default
    if not 0 < value <= maximum:
        raise InvalidArgument(
            f"{field} is {value}; use 1 to {maximum}, or 0 for the default of {default}",
            reason="LIMIT_OUT_OF_RANGE",
        )
    return value


def check_duration_s(field: str, value: Duration, *, at_most_s: float) -> float:
    """A well-formed, non-negative Duration in seconds; longer than at_most_s counts as at_most_s."""
    seconds, nanos = value.seconds, value.nanos
    mixed_signs = (seconds < 0 < nanos) or (nanos < 0 < seconds)
    if abs(seconds) > _DURATION_MAX_S or abs(nanos) > _NANOS_MAX or mixed_signs:
        raise InvalidArgument(
            f"{field} is not a valid Duration: seconds within +-{_DURATION_MAX_S}, nanos within "
            f"+-{_NANOS_MAX} and of the same sign",
            reason="INVALID_DURATION",
        )
    total_s = seconds + nanos / 1e9
    if total_s < 0:
        raise InvalidArgument(f"{field} must not be negative", reason="INVALID_DURATION")
    return min(total_s, at_most_s)
