"""Lifetime values, memcached conversion and per-store precedence."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any, ClassVar

import pytest

from stockpyle import ProcessMemoryStore
from stockpyle.exceptions import ConfigurationError
from stockpyle.lifetimes import (
    MEMCACHE_RELATIVE_LIMIT,
    LifetimePolicy,
    expiry_timestamp,
    memcache_expire,
    seconds_remaining,
)


class Base:
    __stockpyle_keys__: ClassVar[list[Any]] = ["key"]

    def __init__(self, key: Any) -> None:
        self.key = key


class Child(Base):
    pass


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("lifetime", "expected"),
    [
        (None, None),
        (0, None),
        (0.0, None),
        (dt.timedelta(0), None),
        (5, 5.0),
        (0.25, 0.25),
        (dt.timedelta(minutes=2), 120.0),
        (-3, -3.0),
        (dt.datetime.fromtimestamp(NOW + 30, dt.timezone.utc), 30.0),
        (dt.datetime.fromtimestamp(NOW + 30), 30.0),  # naive = local time
        (dt.datetime.fromtimestamp(NOW - 30, dt.timezone(dt.timedelta(hours=-7))), -30.0),
    ],
)
def test_seconds_remaining(lifetime: Any, expected: float | None) -> None:
    got = seconds_remaining(lifetime, now=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


@pytest.mark.parametrize("bad", ["60", True, [1], float("inf"), float("nan"), object()])
def test_invalid_lifetimes_are_rejected(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="lifetime"):
        seconds_remaining(bad, now=NOW)


def test_expiry_timestamp() -> None:
    assert expiry_timestamp(10, now=NOW) == NOW + 10
    assert expiry_timestamp(None, now=NOW) is None


@pytest.mark.parametrize(
    ("lifetime", "expected"),
    [
        (None, 0),
        (0, 0),
        (0.2, 1),  # fractions round up, never down to "no expiry"
        (1.5, 2),
        (60, 60),
        (MEMCACHE_RELATIVE_LIMIT, MEMCACHE_RELATIVE_LIMIT),
        (MEMCACHE_RELATIVE_LIMIT + 1, int(NOW) + MEMCACHE_RELATIVE_LIMIT + 1),  # absolute beyond 30 days
        (dt.timedelta(days=40), int(NOW) + 40 * 86400),
        (-1, None),
        (dt.datetime.fromtimestamp(NOW - 1, dt.timezone.utc), None),
    ],
)
def test_memcache_expire(lifetime: Any, expected: int | None) -> None:
    assert memcache_expire(lifetime, now=NOW) == expected


def test_precedence_callback_then_class_then_never() -> None:
    policy = LifetimePolicy(lambda obj: 5 if obj.key == "cb" else 0 if obj.key == "forever" else None)
    assert policy.lifetime_for(Base("x")) is None
    policy.configure(classes=[Base], lifetime=60)
    assert policy.lifetime_for(Base("x")) == 60
    assert policy.lifetime_for(Child("x")) == 60  # subclasses inherit
    policy.configure(classes=[Child], lifetime=10)
    assert policy.lifetime_for(Child("x")) == 10  # nearest configured class wins
    assert policy.lifetime_for(Base("x")) == 60
    assert policy.lifetime_for(Base("cb")) == 5  # an explicit callback result wins
    assert policy.lifetime_for(Base("forever")) == 0  # 0 from the callback forces "never"


def test_policy_rejects_bad_configuration() -> None:
    with pytest.raises(ConfigurationError, match="callable"):
        LifetimePolicy("60")  # type: ignore[arg-type]
    policy = LifetimePolicy()
    with pytest.raises(ConfigurationError):
        policy.configure(classes=[Base], lifetime="soon")
    with pytest.raises(ConfigurationError, match="takes classes"):
        policy.configure(classes=[Base("x")], lifetime=1)  # type: ignore[list-item]
    bad_cb = LifetimePolicy(lambda obj: "tomorrow")
    with pytest.raises(ConfigurationError):
        bad_cb.lifetime_for(Base("x"))


def test_memory_stores_keep_sub_second_precision() -> None:
    store = ProcessMemoryStore(lifetime_cb=lambda obj: 0.5)
    store.put(Base("a"))
    time.sleep(0.05)
    assert store.get(Base, {"key": "a"}) is not None
    time.sleep(0.5)
    assert store.get(Base, {"key": "a"}) is None  # gone well before a whole second


def test_expired_entries_are_reclaimed_without_being_read() -> None:
    # lifetimes long enough that a loaded machine cannot expire them mid-batch
    store = ProcessMemoryStore(lifetime_cb=lambda obj: 0.5)
    store.batch_put([Base(i) for i in range(1000)])
    assert len(store) == 1000
    time.sleep(0.6)
    store.put(Base("trigger"))  # writes reclaim whatever has expired
    assert len(store) == 1
    assert store.reclaim_expired() == 0
    store.put(Base("late"))
    time.sleep(0.6)
    assert store.reclaim_expired() == 2
    assert len(store) == 0
