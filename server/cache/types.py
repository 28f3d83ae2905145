"""The engine's vocabulary: key families, outcomes, counters and test hooks."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

Loader = Callable[[Sequence[str]], Awaitable[Mapping[str, bytes]]]
"""Loads the payloads of many ids in one query; ids missing from the result do not exist."""


class Outcome(StrEnum):
    """How a response was obtained; sent to callers as `x-cache`. Later members win when combined."""

    HIT = "hit"
    MISS = "miss"
    STALE = "stale"
    BYPASS = "bypass"

    # Enum's own __hash__ is Python code (hash of the member's name), run for every (outcome, tier)
    # lookup on a read's path; a str's is C, and agrees with == as Enum's does not ("hit" == HIT).
    __hash__ = str.__hash__


_RANK = {outcome: rank for rank, outcome in enumerate(Outcome)}


def combine(outcomes: Sequence[Outcome]) -> Outcome:
    """The outcome of a response built from several keys: the worst of theirs."""
    return max(outcomes, key=_RANK.__getitem__)


class LoadTimeout(Exception):
    """A loader did not answer within the load timeout."""

    def __init__(self, family: str, timeout_s: float) -> None:
        super().__init__(f"loading {family} took longer than {timeout_s * 1000:.0f} ms")
        self.family = family
        self.timeout_s = timeout_s


class FlightTimeout(Exception):
    """A shared load (with any waiting for another instance's lease) ran past its own time limit."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the load did not finish within {timeout_s:.1f} s")
        self.timeout_s = timeout_s


class DatabaseSaturated(Exception):
    """Every database load slot of this process is taken: the miss is refused at once, not queued."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"all {limit} database load slots of this process are in use")
        self.limit = limit


class MissesSaturated(DatabaseSaturated):
    """As many callers as allowed already wait on database loads: another miss is refused at once."""

    def __init__(self, limit: int) -> None:
        Exception.__init__(self, f"{limit} misses of this process already wait on database loads")
        self.limit = limit


class RecentLoadFailure(Exception):
    """Another caller's load of this key failed moments ago; we back off instead of piling on."""

    def __init__(self, key: str, retry_in_ms: int) -> None:
        super().__init__(f"loading {key} failed moments ago; retry in {retry_in_ms} ms")
        self.key = key
        self.retry_in_ms = retry_in_ms


@dataclass(frozen=True, slots=True, eq=False)
class Family:
    """A kind of cached value: how its keys are named, how long they live, and how to load them."""

    name: str
    tier: str
    ttl_s: int
    key: Callable[[str], str]
    load: Loader
    tags: tuple[str, ...] = ()
    xfetch_beta: float = 1.0
    key_prefix: str = ""  # what every key of the family starts with: where the layout puts them


@dataclass(frozen=True, slots=True)
class Resolved:
    """One key's answer: its payload (None: the row does not exist) and how it was obtained."""

    payload: bytes | None
    outcome: Outcome


class Fetched(NamedTuple):
    """Payloads in lookup order (None where the row does not exist) and the overall outcome.

    What a read past the near cache gets (a near-cache answer is its payloads alone, all hits).
    """

    payloads: list[bytes | None]
    outcome: Outcome


@dataclass(slots=True)
class EngineStats:
    """Counters for tests and metrics."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    bypasses: int = 0
    loads: int = 0
    load_failures: int = 0
    loads_refused: int = 0  # misses refused because every load slot was taken (DatabaseSaturated)
    # Misses refused because the most callers allowed already waited on loads (MissesSaturated).
    misses_refused: int = 0
    loads_by_family: dict[str, int] = field(default_factory=dict)
    flight_callers: int = 0  # callers that needed a missing key, each counted once per key
    coalesced: int = 0  # of those, callers that joined a load already in flight in this process
    lease_waits: int = 0  # flights that waited for another caller's fill
    fills_refused: int = 0  # fills whose lease had been voided by an invalidation
    early_refreshes: int = 0


@dataclass(slots=True)
class EngineHooks:
    """Injection points for deterministic tests; all None in production."""

    after_load: Callable[[Sequence[str]], Awaitable[None]] | None = None
    """Runs after a load returned and before its fill: pause here to force a race."""
