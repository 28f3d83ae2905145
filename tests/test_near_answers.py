"""Whole answers above the near cache: held by request bytes, never past their entries, cleared by any
change the near cache hears, and bounded in bytes. The store itself, on a clock the tests move."""

from __future__ import annotations

from server.cache.envelope import Envelope
from server.cache.near import NearCache


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _near(clock: _Clock, *, answer_bytes: int = 1000, ttl_s: float = 1.0) -> NearCache:
    return NearCache(max_entries=10, ttl_s=ttl_s, answer_bytes=answer_bytes, clock=clock)


def _entry(payload: bytes, *, expires_at_ms: int) -> Envelope:
    return Envelope(payload=payload, generation=0, load_ms=1, expires_at_ms=expires_at_ms)


def test_an_answer_is_served_until_the_time_given_and_not_after() -> None:
    clock = _Clock()
    answers = _near(clock).answers()
    answers.put(b"request", b"response", "detail", until=100.5)
    assert answers.get(b"request") == (100.5, b"response", "detail")
    assert answers.get(b"other request") is None
    clock.now = 100.4999
    assert answers.get(b"request") == (100.5, b"response", "detail")
    clock.now = 100.5
    assert answers.get(b"request") is None


def test_an_answer_already_past_its_time_is_not_held() -> None:
    clock = _Clock()
    near = _near(clock)
    answers = near.answers()
    answers.put(b"request", b"response", None, until=100.0)
    assert (len(answers), near.answer_bytes) == (0, 0)


def test_the_time_given_is_when_the_first_entry_would_stop_being_served() -> None:
    clock = _Clock()
    near = _near(clock, ttl_s=1.0)
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
    clock = _Clock()
    near = _near(clock)
    posts, users = near.answers(), near.answers()
    near.admit("a", _entry(b"A", expires_at_ms=10**15), (), read_at_version=0)

    def hold() -> None:
        posts.put(b"p", b"post", None, until=200.0)
        users.put(b"u", b"user", None, until=200.0)

    hold()
    near.admit("new", _entry(b"N", expires_at_ms=10**15), (), read_at_version=near.version)
    assert (len(posts), len(users)) == (1, 1), "a new entry changes no answer"
    near.drop(["unrelated"])
    assert (len(posts), len(users), near.answer_bytes) == (0, 0, 0), "a drop may be of an answer's entry"
    hold()
    near.flush()
    assert (len(posts), len(users), near.answer_bytes) == (0, 0, 0)
    near.admit("a", _entry(b"A", expires_at_ms=10**15), (), read_at_version=near.version)
    hold()
    near.admit("a", _entry(b"A2", expires_at_ms=10**15), (), read_at_version=near.version)
    assert (len(posts), len(users), near.answer_bytes) == (0, 0, 0), "an answer may hold the entry replaced"


def test_answers_hold_at_most_their_bytes_oldest_out_first() -> None:
    clock = _Clock()
    near = _near(clock, answer_bytes=30)
    posts, users = near.answers(), near.answers()
    posts.put(b"1", b"x" * 9, None, until=200.0)  # 10 bytes with its request
    posts.put(b"2", b"x" * 9, None, until=200.0)
    posts.put(b"3", b"x" * 9, None, until=200.0)
    assert near.answer_bytes == 30
    posts.put(b"4", b"x" * 9, None, until=200.0)
    assert [posts.get(r) is not None for r in (b"1", b"2", b"3", b"4")] == [False, True, True, True]
    assert near.answer_bytes == 30
    posts.put(b"4", b"x" * 4, None, until=200.0)  # held again, smaller: counted once
    assert near.answer_bytes == 25
    posts.put(b"big", b"x" * 40, None, until=200.0)
    assert posts.get(b"big") is None, "larger than the whole budget: never held"
    users.put(b"u", b"x" * 19, None, until=200.0)  # the posts hold the budget: everything starts over
    assert (len(posts), len(users), near.answer_bytes) == (0, 1, 20)


def test_without_a_budget_nothing_is_held() -> None:
    near = _near(_Clock(), answer_bytes=0)
    answers = near.answers()
    answers.put(b"request", b"response", None, until=200.0)
    assert answers.get(b"request") is None
