"""Whole answers above the near cache: held by request bytes, never past their entries by either
clock, cleared by any change to an entry they were built from, and bounded in bytes. The store
itself, on clocks the tests move."""

from __future__ import annotations

from typing import Any

from server.cache.envelope import Envelope
from server.cache.near import _ANSWER_OVERHEAD, Answers, NearCache


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


FAR = 10.0**12  # a wall-clock deadline that never comes in these tests


def _near(
    clock: _Clock, *, answer_bytes: int = 100_000, max_entries: int = 10, wall: _Clock | None = None
) -> NearCache:
    return NearCache(
        max_entries=max_entries,
        ttl_s=1.0,
        answer_bytes=answer_bytes,
        clock=clock,
        wall_clock=wall or _Clock(1_000.0),
    )


def _entry(payload: bytes, *, expires_at_ms: int = 10**15) -> Envelope:
    return Envelope(payload=payload, generation=0, load_ms=1, expires_at_ms=expires_at_ms)


def _admit(near: NearCache, key: str, payload: bytes = b"x") -> None:
    near.admit(key, _entry(payload), (), read_at_version=near.version)


def _put(answers: Answers[Any], request: bytes, response: bytes, detail: object, **when: Any) -> None:
    answers.put(request, response, detail, **when)  # offered once: only remembered
    answers.put(request, response, detail, **when)  # offered again: held


def _hold(
    answers: Answers[object], request: bytes, response: bytes = b"response", *, keys: tuple[str, ...] = ("a",)
) -> None:
    _put(answers, request, response, None, keys=keys, until=200.0, wall_until=FAR)


def test_an_answer_is_served_until_either_clock_reaches_its_deadline() -> None:
    clock, wall = _Clock(100.0), _Clock(1_000.0)
    near = _near(clock, wall=wall)
    answers = near.answers()
    _put(answers, b"request", b"response", "detail", keys=("a",), until=100.5, wall_until=1_000.25)
    assert answers.get(b"request") == (100.5, 1_000.25, b"response", "detail")
    assert answers.get(b"other request") is None
    clock.now, wall.now = 100.4999, 1_000.2499
    assert answers.get(b"request") is not None
    wall.now = 1_000.25  # the wall clock stepped: the entries' freshness (or XFetch's window) is over
    assert answers.get(b"request") is None
    assert (len(answers), near.answer_bytes) == (0, 0), "an ended answer is forgotten"
    _put(answers, b"request", b"response", "detail", keys=("a",), until=100.5, wall_until=FAR)
    clock.now = 100.5
    assert answers.get(b"request") is None
    assert near.stats.answered == 2


def test_the_engines_clock_is_the_wall_clock_answers_end_on() -> None:
    wall = _Clock(5_000.0)
    near = _near(_Clock(100.0))
    answers = near.answers()
    near.set_wall_clock(wall)
    _put(answers, b"request", b"response", None, keys=("a",), until=200.0, wall_until=5_001.0)
    assert answers.get(b"request") is not None
    wall.now = 5_001.0
    assert answers.get(b"request") is None
    assert near.answers().wall_clock is wall, "answers made later use it too"


def test_an_answer_already_past_its_time_is_not_held() -> None:
    near = _near(_Clock(100.0))
    answers = near.answers()
    _put(answers, b"request", b"response", None, keys=("a",), until=100.0, wall_until=FAR)
    assert (len(answers), near.answer_bytes) == (0, 0)


def test_the_time_given_is_when_the_first_entry_would_stop_being_served() -> None:
    clock = _Clock(100.0)
    near = _near(clock)
    now_ms = 50_000
    near.admit("a", _entry(b"A", expires_at_ms=now_ms + 10_000), (), read_at_version=0)
    clock.now = 100.25
    near.admit("b", _entry(b"B", expires_at_ms=now_ms + 10_000), (), read_at_version=0)
    found = near.get_all_until(["a", "b"], now_ms)
    assert found is not None
    assert found[1] == 101.0, "a's near-cache TTL ends first"
    near.admit("c", _entry(b"C", expires_at_ms=now_ms + 300), (), read_at_version=0)
    found = near.get_all_until(["b", "c"], now_ms)
    assert found is not None
    assert found[1] == 100.25 + 0.3, "c's freshness ends before any TTL here"


def test_every_drop_flush_or_replaced_entry_clears_every_kind_of_answer() -> None:
    near = _near(_Clock(100.0))
    posts, users = near.answers(), near.answers()
    _admit(near, "a")

    def hold() -> None:
        _hold(posts, b"p")
        _hold(users, b"u")

    hold()
    _admit(near, "new")
    assert (len(posts), len(users)) == (1, 1), "a new entry changes no answer"
    near.drop(["unrelated"])
    assert (len(posts), len(users), near.answer_bytes) == (0, 0, 0), "a drop may be of an answer's entry"
    hold()
    near.flush()
    assert (len(posts), len(users), near.answer_bytes) == (0, 0, 0)
    _admit(near, "a")
    hold()
    _admit(near, "a", b"A2")
    assert (len(posts), len(users), near.answer_bytes) == (0, 0, 0), "an answer may hold the entry replaced"


def test_empty_requests_and_responses_are_cleared_too() -> None:
    # GetTrending() with its defaults is b"", and an empty list's response is b"" too.
    near = _near(_Clock(100.0))
    answers = near.answers()
    _hold(answers, b"", b"")
    assert answers.get(b"") is not None
    assert near.answer_bytes == _ANSWER_OVERHEAD
    near.drop(["a"])
    assert answers.get(b"") is None


def test_evicting_an_entry_an_answer_was_built_from_clears_the_answers() -> None:
    # Read again after its eviction, the key may bring a newer value than the answer holds.
    near = _near(_Clock(100.0), max_entries=2)
    answers = near.answers()
    _admit(near, "a")
    _admit(near, "b")
    _hold(answers, b"from b", keys=("b",))
    _admit(near, "c")  # evicts a: no answer was built from it
    assert answers.get(b"from b") is not None
    _admit(near, "d")  # evicts b
    assert answers.get(b"from b") is None
    assert near.answer_bytes == 0


def test_an_entry_found_stale_clears_the_answers_built_from_it() -> None:
    clock = _Clock(100.0)
    near = _near(clock)
    answers = near.answers()
    near.admit("a", _entry(b"A", expires_at_ms=50_000), (), read_at_version=0)
    _hold(answers, b"from a", keys=("a",))
    assert near.get_all_until(["a"], 50_000) is None, "stale by the wall clock the engine passed"
    assert (len(answers), near.answer_bytes) == (0, 0)


def test_answers_hold_at_most_their_bytes_oldest_out_first() -> None:
    size = _ANSWER_OVERHEAD + 10  # a one-byte request and a nine-byte response
    near = _near(_Clock(100.0), answer_bytes=16 * size)  # sixteen of them
    posts, users = near.answers(), near.answers()
    requests = [bytes([n]) for n in range(17)]
    for request in requests[:16]:
        _hold(posts, request, b"x" * 9)
    assert near.answer_bytes == 16 * size
    _hold(posts, requests[16], b"x" * 9)
    assert [posts.get(r) is not None for r in requests[:3]] == [False, True, True]
    assert near.answer_bytes == 16 * size
    _hold(posts, requests[16], b"x" * 4)  # held again, smaller: counted once
    assert near.answer_bytes == 16 * size - 5
    _hold(users, b"u", b"x" * 9)  # no room in its own kind: the oldest of the others leaves
    assert [posts.get(r) is not None for r in requests[1:3]] == [False, True]
    assert users.get(b"u") is not None
    assert near.answer_bytes == 16 * size - 5


def test_no_answer_takes_more_than_a_sixteenth_of_the_budget() -> None:
    near = _near(_Clock(100.0), answer_bytes=16 * (_ANSWER_OVERHEAD + 100))
    answers = near.answers()
    _hold(answers, b"", b"x" * 100)
    _hold(answers, b"big", b"x" * 101)
    assert answers.get(b"") is not None
    assert answers.get(b"big") is None


def test_without_a_budget_nothing_is_held() -> None:
    near = _near(_Clock(100.0), answer_bytes=0)
    answers = near.answers()
    _hold(answers, b"", b"")
    assert answers.get(b"") is None


def test_a_request_is_held_the_second_time_it_is_offered_so_one_offs_take_no_room() -> None:
    near = _near(_Clock(100.0), max_entries=3)
    answers = near.answers()
    answers.put(b"again", b"response", None, keys=("a",), until=200.0, wall_until=FAR)
    assert answers.get(b"again") is None, "offered once: only remembered"
    for one_off in (b"x", b"y"):
        answers.put(one_off, b"response", None, keys=("a",), until=200.0, wall_until=FAR)
    answers.put(b"again", b"response", None, keys=("a",), until=200.0, wall_until=FAR)
    assert answers.get(b"again") is not None
    assert (len(answers), answers.get(b"x"), answers.get(b"y")) == (1, None, None)
    # Remembered among the last max_entries offers only.
    for one_off in (b"1", b"2", b"3", b"4"):
        answers.put(one_off, b"response", None, keys=("a",), until=200.0, wall_until=FAR)
    answers.put(b"x", b"response", None, keys=("a",), until=200.0, wall_until=FAR)
    assert answers.get(b"x") is None
