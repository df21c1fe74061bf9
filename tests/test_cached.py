"""The @cached decorator against real memcached and Redis: hits, keys across processes, lifetimes, errors."""

from __future__ import annotations

import asyncio
import datetime as _dt
import functools
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from support import cached_worker
from support.memcached import fresh_namespace, remaining_ttl

from stockpyle import ChainedStore, ConfigurationError, MemcacheStore, ProcessMemoryStore, RedisStore, Stampede, cached
from stockpyle.caching import AsyncCachedFunction, CachedFunction, CachedResult
from stockpyle.exceptions import UnsupportedKeyValueError
from stockpyle.lifetimes import MEMCACHE_RELATIVE_LIMIT
from stockpyle.stores.achained import AsyncChainedStore
from stockpyle.stores.drivers.pymemcache import PymemcacheDriver, build_client, normalize_servers
from stockpyle.stores.drivers.threaded import ThreadedDriver
from stockpyle.stores.kv import AsyncKeyValueStore

WORKER = Path(__file__).resolve().parent / "support" / "cached_worker.py"


class Calls:
    """Counts the calls of a function under test (thread-safe)."""

    def __init__(self) -> None:
        self.args: list[Any] = []
        self._lock = threading.Lock()

    def __call__(self, *args: Any) -> None:
        with self._lock:
            self.args.append(args)

    @property
    def count(self) -> int:
        return len(self.args)


@pytest.fixture
def memcache(make_memcache_store: Any) -> MemcacheStore:
    store: MemcacheStore = make_memcache_store()
    return store


@pytest.fixture
def chain(memcache: MemcacheStore) -> Iterator[ChainedStore]:
    store = ChainedStore([ProcessMemoryStore(), memcache], bus=None)
    yield store
    store.release()


# ---------------------------------------------------------------------------
# hits, keys, defaults


@pytest.mark.memcache
def test_a_hit_does_not_call_the_function(chain: ChainedStore, memcache: MemcacheStore) -> None:
    calls = Calls()

    @cached(chain, lifetime=60)
    def square(x: int) -> int:
        calls(x)
        return x * x

    assert square(4) == 16
    assert square(4) == 16
    assert calls.args == [(4,)]
    assert square(5) == 25
    assert calls.count == 2
    # the shared layer holds it too: a fresh chain over the same memcached hits without calling
    other = ChainedStore([ProcessMemoryStore(), memcache], bus=None)
    assert cached(other, lifetime=60)(square.__wrapped__)(4) == 16
    assert calls.count == 2


@pytest.mark.memcache
def test_keys_and_values_are_shared_by_two_processes(memcached_server: Any) -> None:
    namespace = fresh_namespace()
    store = cached_worker.make_store(memcached_server.address, namespace)
    fn = cached_worker.cached_price(store)
    env = {**os.environ, "PYTHONHASHSEED": "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "54321"}

    def worker(*args: str, must_hit: bool = False) -> Any:
        run_env = {**env, "CACHED_WORKER_MUST_HIT": "1" if must_hit else "0"}
        out = subprocess.run(
            [sys.executable, str(WORKER), *args], capture_output=True, text=True, env=run_env, timeout=60, check=False
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    try:
        keys = [fn.key_for(*args, **kwargs) for args, kwargs in cached_worker.KEY_CALLS]
        assert worker("keys", memcached_server.address, namespace) == keys
        assert keys[0] == keys[1] and len(set(keys)) == 3  # defaults normalised; 'fig' in USD is another call
        # the parent computes, the worker reads it without calling the function
        before = len(cached_worker.COMPUTED)
        mine = fn("apple", 3)
        assert mine["pid"] == os.getpid()
        assert worker("call", memcached_server.address, namespace, "apple", must_hit=True) == mine
        # the worker computes, the parent reads it without calling
        theirs = worker("call", memcached_server.address, namespace, "kiwi")
        assert theirs["pid"] != os.getpid()
        assert fn("kiwi", 3) == theirs
        assert fn(item="kiwi", qty=3, currency="EUR") == theirs
        assert len(cached_worker.COMPUTED) == before + 1
    finally:
        store.release()


@pytest.mark.memcache
def test_processes_missing_one_key_at_once_run_the_function_once(memcached_server: Any) -> None:
    # the leases of the shared layer: one process computes, the others wait for its fill
    namespace, start = fresh_namespace(), time.time() + 4.0
    command = [sys.executable, str(WORKER), "herd", memcached_server.address, namespace, "plum", str(start)]
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = []
    for proc in workers:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outputs.append(json.loads(out))
    assert not any(o["late"] for o in outputs), "the workers took too long to start: raise the head start"
    assert [o["computed"] for o in outputs].count(True) == 1
    assert len({o["value"]["pid"] for o in outputs}) == 1


@pytest.mark.memcache
def test_defaults_are_normalised(chain: ChainedStore) -> None:
    calls = Calls()

    @cached(chain, lifetime=60)
    def add(a: int, b: int = 2, *rest: int, scale: int = 1, **extra: int) -> int:
        calls(a, b, rest, scale, extra)
        return (a + b + sum(rest) + sum(extra.values())) * scale

    assert add(1) == 3
    assert add(1, 2) == 3
    assert add(1, b=2) == 3
    assert add(a=1, b=2, scale=1) == 3
    assert calls.count == 1
    assert add(1, 3) == 4
    assert add(1, 2, 5) == 8
    assert add(1, extra=4) == 7
    assert add(1, z=1, y=2) == add(1, y=2, z=1) == 6  # keyword order does not matter
    assert calls.count == 5


def test_arguments_are_keyed_type_faithfully() -> None:
    store = ChainedStore([ProcessMemoryStore()])
    calls = Calls()

    @cached(store)
    def echo(x: Any) -> str:
        calls(x)
        return repr(x)

    values: list[Any] = [1, 1.0, True, "1", b"1", Decimal(1), (1,), [1], {1}, {1: 1}, None, 0, False]
    assert [echo(v) for v in values] == [repr(v) for v in values]
    assert [echo(v) for v in values] == [repr(v) for v in values]
    assert calls.count == len(values)
    # containers are compared by content; dicts and sets regardless of order
    assert echo({"b": [1, (2, 3)], "a": {"x"}}) == echo({"a": {"x"}, "b": [1, (2, 3)]})
    assert echo(frozenset({1, 2})) == echo({2, 1})  # a set and an equal frozenset: one entry
    assert calls.count == len(values) + 2
    stamp = _dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=_dt.timezone.utc)
    assert echo(stamp) == repr(stamp)
    assert echo(uuid.UUID(int=7)) == repr(uuid.UUID(int=7))


# ---------------------------------------------------------------------------
# methods


@pytest.mark.memcache
def test_methods_leave_self_out_of_the_key(chain: ChainedStore) -> None:
    calls = Calls()

    class Rates:
        def __init__(self, name: str) -> None:
            self.name = name

        @cached(chain, lifetime=60)
        def rate(self, currency: str) -> str:
            calls(self.name, currency)
            return f"{currency} by {self.name}"

    first, second = Rates("first"), Rates("second")
    assert first.rate("USD") == "USD by first"
    assert second.rate("USD") == "USD by first"  # the same entry: self is not part of the key
    assert second.rate(currency="USD") == "USD by first"
    assert calls.count == 1
    assert first.rate.key_for("USD") == second.rate.key_for("USD") == Rates.rate.key_for(first, "USD")
    second.rate.invalidate("USD")
    assert first.rate("USD") == "USD by first"
    assert calls.count == 2
    assert second.rate.refresh("USD") == "USD by second"
    assert first.rate("USD") == "USD by second"
    assert calls.count == 3


@pytest.mark.memcache
def test_a_key_callable_decides_what_the_result_depends_on(chain: ChainedStore) -> None:
    calls = Calls()

    class Account:
        def __init__(self, account_id: int) -> None:
            self.account_id = account_id

        @cached(chain, lifetime=60, key=lambda self, day: (self.account_id, day.isoformat()))
        def balance(self, day: _dt.date) -> int:
            calls(self.account_id, day)
            return self.account_id * 100 + day.day

    day = _dt.date(2026, 3, 4)
    assert Account(1).balance(day) == 104
    assert Account(1).balance(day) == 104
    assert Account(2).balance(day) == 204
    assert calls.count == 2
    Account(2).balance.invalidate(day)
    assert Account(1).balance(day) == 104
    assert Account(2).balance(day) == 204
    assert calls.count == 3


def test_static_and_class_methods() -> None:
    store = ChainedStore([ProcessMemoryStore()])
    calls = Calls()

    class Tools:
        @staticmethod
        @cached(store)
        def double(x: int) -> int:
            calls("double", x)
            return 2 * x

        @classmethod
        @cached(store)
        def triple(cls, x: int) -> int:
            calls("triple", x)
            return 3 * x

    assert Tools.double(2) == Tools().double(2) == 4
    assert Tools.triple(2) == Tools().triple(2) == 6
    assert calls.count == 2


# ---------------------------------------------------------------------------
# invalidate, refresh, lifetimes


@pytest.mark.memcache
def test_invalidate_reaches_every_layer_and_refresh_replaces(chain: ChainedStore, memcache: MemcacheStore) -> None:
    version = [1]
    calls = Calls()

    @cached(chain, lifetime=60)
    def page(name: str) -> str:
        calls(name)
        return f"{name} v{version[0]}"

    assert page("home") == "home v1"
    record = page.record_class
    keydict = {"key": page.key_for("home")}
    assert memcache.get(record, keydict) is not None
    assert chain.stores[0].get(record, keydict) is not None
    page.invalidate("home")
    for layer in (chain.stores[0], memcache):
        marker = layer.get(record, keydict)
        assert marker is not None and marker.invalidated is not None and not marker.is_fresh(time.time())
    version[0] = 2
    assert page("home") == "home v2"
    assert page("home") == "home v2"  # stored at once: no tombstone refuses the fill
    assert calls.count == 2
    # another process's chain (fresh in-process layer) reads the new result from memcached
    other = ChainedStore([ProcessMemoryStore(), memcache], bus=None)
    assert cached(other, lifetime=60)(page.__wrapped__)("home") == "home v2"
    assert calls.count == 2
    version[0] = 3
    assert page.refresh("home") == "home v3"  # unconditionally, although the entry is fresh
    assert calls.count == 3
    assert page("home") == "home v3"
    assert calls.count == 3
    found = memcache.get(record, keydict)
    assert isinstance(found, CachedResult) and found.value == "home v3"
    page.invalidate("never computed")  # invalidating a missing entry is fine


@pytest.mark.memcache
def test_an_invalidated_result_is_never_served_stale(chain: ChainedStore) -> None:
    fail = [False]

    @cached(chain, lifetime=60, stale_on_error=60)
    def answer() -> int:
        if fail[0]:
            raise LookupError("gone")
        return 42

    assert answer() == 42
    answer.invalidate()
    fail[0] = True
    with pytest.raises(LookupError):
        answer()
    fail[0] = False
    assert answer() == 42


@pytest.mark.memcache
def test_lifetime_is_exact_and_set_in_every_layer(chain: ChainedStore, memcache: MemcacheStore) -> None:
    calls = Calls()

    @cached(chain, lifetime=0.4)
    def short(x: int) -> int:
        calls(x)
        return x

    assert short(1) == short(1) == 1
    assert calls.count == 1
    time.sleep(0.5)  # memcached keeps the entry a whole second; the record's own time says stale
    assert short(1) == 1
    assert calls.count == 2

    @cached(chain, lifetime=_dt.timedelta(seconds=30), stale_on_error=10)
    def long(x: int) -> int:
        return x

    long(1)
    ttl = remaining_ttl(memcache.driver.servers[0], memcache.key_for(long.record_class, {"key": long.key_for(1)}))
    assert ttl is not None and 38 <= ttl <= 40  # lifetime + stale_on_error


@pytest.mark.memcache
def test_none_is_cached_only_with_a_negative_lifetime(chain: ChainedStore) -> None:
    calls = Calls()

    @cached(chain, lifetime=60)
    def lookup(name: str) -> str | None:
        calls(name)
        return None

    assert lookup("x") is None
    assert lookup("x") is None
    assert calls.count == 2  # not cached

    found: dict[str, str | None] = {"x": None}

    @cached(chain, lifetime=60, negative_lifetime=1.0)
    def lookup_negative(name: str) -> str | None:
        calls(name)
        return found[name]

    calls.args.clear()
    assert lookup_negative("x") is None
    assert lookup_negative("x") is None
    assert calls.count == 1  # the None is cached
    found["x"] = "now here"
    assert lookup_negative("x") is None  # still the cached None
    time.sleep(1.1)
    assert lookup_negative("x") == "now here"  # the negative entry ran out; a value lives `lifetime`
    assert lookup_negative("x") == "now here"
    assert calls.count == 2


@pytest.mark.memcache
def test_stale_on_error_serves_the_previous_result(chain: ChainedStore, caplog: pytest.LogCaptureFixture) -> None:
    state: dict[str, Any] = {"fail": False, "version": 1}
    calls = Calls()

    @cached(chain, lifetime=0.3, stale_on_error=1.2)
    def quote(symbol: str) -> str:
        calls(symbol)
        if state["fail"]:
            raise ConnectionError("the quote service is down")
        return f"{symbol}@{state['version']}"

    assert quote("ACME") == "ACME@1"
    time.sleep(0.35)
    state["fail"] = True
    with caplog.at_level(logging.WARNING, logger="stockpyle.caching"):
        assert quote("ACME") == "ACME@1"  # recomputed, failed, served stale
    assert "ConnectionError" in caplog.text and "quote" in caplog.text
    assert quote("ACME") == "ACME@1"  # every call retries while it fails
    assert calls.count == 3
    state.update(fail=False, version=2)
    assert quote("ACME") == "ACME@2"  # recovered: stored fresh again
    assert quote("ACME") == "ACME@2"
    assert calls.count == 4
    time.sleep(1.6)  # past lifetime + stale_on_error
    state["fail"] = True
    with pytest.raises(ConnectionError):
        quote("ACME")
    # nothing to fall back on: a failing first call propagates
    with pytest.raises(ConnectionError):
        quote("OTHER")


@pytest.mark.memcache
def test_without_stale_on_error_a_failing_recomputation_propagates(chain: ChainedStore) -> None:
    fail = [False]

    @cached(chain, lifetime=0.2)
    def flaky() -> int:
        if fail[0]:
            raise RuntimeError("down")
        return 1

    assert flaky() == 1
    time.sleep(0.3)
    fail[0] = True
    with pytest.raises(RuntimeError):
        flaky()


# ---------------------------------------------------------------------------
# stampedes


@pytest.mark.memcache
@pytest.mark.parametrize("kind", ["chain", "plain"])
def test_32_threads_on_a_cold_key_run_the_function_once(
    kind: str, chain: ChainedStore, memcache: MemcacheStore
) -> None:
    store = chain if kind == "chain" else memcache
    calls = Calls()

    @cached(store, lifetime=60)
    def slow(x: int) -> int:
        calls(x)
        time.sleep(0.3)
        return x + 1

    barrier = threading.Barrier(32)
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            barrier.wait()
            results.append(slow(41))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert results == [42] * 32
    assert calls.count == 1


@pytest.mark.memcache
def test_stampede_none_turns_the_protection_off(chain: ChainedStore) -> None:
    calls = Calls()

    @cached(chain, lifetime=60, stampede=None)
    def slow() -> int:
        calls()
        time.sleep(0.2)
        return 1

    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        slow()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert calls.count > 1  # every concurrent miss computes
    assert slow() == 1
    assert calls.count < 5


def test_a_stampede_policy_is_passed_to_the_chain() -> None:
    store = ChainedStore([ProcessMemoryStore()])

    @cached(store, stampede=Stampede(wait=0.05, on_timeout="load"))
    def slow() -> int:
        time.sleep(0.1)
        return 1

    assert slow() == 1


# ---------------------------------------------------------------------------
# Redis


@pytest.mark.redis
def test_over_redis(redis_client: Any, redis_url: str, redis_prefix: str) -> None:
    redis = RedisStore(redis_url, namespace=redis_prefix)
    store = ChainedStore([ProcessMemoryStore(), redis], bus=None)
    calls = Calls()

    @cached(store, lifetime=60)
    def cube(x: int) -> int:
        calls(x)
        return x**3

    try:
        assert cube(3) == cube(3) == 27
        assert calls.count == 1
        fresh = ChainedStore([ProcessMemoryStore(), redis], bus=None)
        assert cached(fresh, lifetime=60)(cube.__wrapped__)(3) == 27  # read from Redis
        assert calls.count == 1
        ttl = redis_client.pttl(redis.key_for(cube.record_class, {"key": cube.key_for(3)}))
        assert 55_000 < ttl <= 60_000
        cube.invalidate(3)
        assert cube(3) == 27
        assert calls.count == 2
    finally:
        store.release()


# ---------------------------------------------------------------------------
# asyncio


def async_memcache(address: str) -> AsyncKeyValueStore:
    client = build_client(normalize_servers([address]), connect_timeout=0.25, timeout=0.5, max_pool_size=None)
    return AsyncKeyValueStore(
        ThreadedDriver(PymemcacheDriver(client, servers=[address])),
        namespace=fresh_namespace(),
        tombstone_limit=MEMCACHE_RELATIVE_LIMIT,
    )


@pytest.mark.memcache
def test_async_functions_over_an_async_chain(memcached_server: Any) -> None:
    shared = async_memcache(memcached_server.address)
    chain = AsyncChainedStore([ProcessMemoryStore(), shared], bus=None)
    calls = Calls()
    state = {"fail": False}

    @cached(chain, lifetime=2, stale_on_error=5)
    async def fetch(name: str, page: int = 1) -> str:
        calls(name, page)
        await asyncio.sleep(0.1)
        if state["fail"]:
            raise OSError("upstream down")
        return f"{name}:{page}:{calls.count}"

    class Client:
        @cached(chain, lifetime=60)
        async def get(self, path: str) -> str:
            calls("get", path)
            return path.upper()

    async def scenario() -> None:
        assert isinstance(fetch, AsyncCachedFunction)
        first = await fetch("a")
        assert first == "a:1:1"
        assert await fetch("a", page=1) == first
        # concurrent awaits of a cold key: one call
        assert await asyncio.gather(*[fetch("b") for _ in range(20)]) == ["b:1:2"] * 20
        assert calls.count == 2
        # the shared layer holds it: a fresh chain over it hits
        other = AsyncChainedStore([ProcessMemoryStore(), shared], bus=None)
        assert await cached(other, lifetime=2, stale_on_error=5)(fetch.__wrapped__)("a") == first
        assert calls.count == 2
        await fetch.invalidate("a")
        assert await fetch("a") == "a:1:3"
        assert await fetch.refresh("a") == "a:1:4"
        assert await fetch("a") == "a:1:4"
        await asyncio.sleep(2.1)  # past the lifetime (2 s: a loaded machine must not cross it earlier)
        state["fail"] = True
        assert await fetch("a") == "a:1:4"  # stale on error
        with pytest.raises(OSError, match="upstream down"):
            await fetch("never")
        assert await Client().get("/x") == await Client().get("/x") == "/X"
        await Client().get.invalidate("/x")
        assert await Client().get("/x") == "/X"
        assert [c for c in calls.args if c[0] == "get"] == [("get", "/x"), ("get", "/x")]

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(chain.release())


@pytest.mark.memcache
def test_async_functions_over_a_plain_async_store(memcached_server: Any) -> None:
    store = async_memcache(memcached_server.address)
    calls = Calls()

    @cached(store, lifetime=60)
    async def slow(x: int) -> int:
        calls(x)
        await asyncio.sleep(0.2)
        return -x

    async def scenario() -> None:
        assert await asyncio.gather(*[slow(5) for _ in range(16)]) == [-5] * 16
        assert await slow(5) == -5
        assert calls.count == 1
        await slow.invalidate(5)
        assert await slow(5) == -5
        assert calls.count == 2
        # a leader that fails or is cancelled leaves its followers to load for themselves
        attempts = [0]

        @cached(store, lifetime=60)
        async def first_fails(x: int) -> int:
            attempts[0] += 1
            await asyncio.sleep(0.05)
            if attempts[0] == 1:
                raise ValueError("the first attempt fails")
            return x

        results = await asyncio.gather(*[first_fails(1) for _ in range(5)], return_exceptions=True)
        # (whichever call reaches the flight first leads: its get is answered first)
        assert sum(isinstance(r, ValueError) for r in results) == 1
        assert [r for r in results if not isinstance(r, ValueError)] == [1] * 4
        leader = asyncio.create_task(slow(6))
        await asyncio.sleep(0.02)
        follower = asyncio.create_task(slow(6))
        await asyncio.sleep(0.02)
        leader.cancel()
        assert await follower == -6
        with pytest.raises(asyncio.CancelledError):
            await leader

    try:
        asyncio.run(scenario())
    finally:
        asyncio.run(store.release())


# ---------------------------------------------------------------------------
# errors


class Opaque:
    """An argument type with no canonical encoding."""


def test_arguments_that_cannot_be_keyed_say_to_pass_key() -> None:
    store = ChainedStore([ProcessMemoryStore()])

    @cached(store)
    def f(x: Any) -> int:
        return 1

    for bad in (Opaque(), [Opaque()], {"k": object()}, float("nan"), {Opaque(): 1}):
        with pytest.raises(UnsupportedKeyValueError, match="key=") as info:
            f(bad)
        assert isinstance(info.value, TypeError)
        assert "argument 'x'" in str(info.value)

    @cached(store, key=lambda x: x)
    def g(x: Any) -> int:
        return 1

    with pytest.raises(UnsupportedKeyValueError, match="the value key= returned"):
        g(Opaque())

    @cached(store, key=lambda x: id(x) % 1)  # the user said what matters: any argument is fine
    def h(x: Any) -> int:
        return 2

    assert h(Opaque()) == 2


def test_wrong_arguments_are_a_type_error_naming_the_function() -> None:
    store = ChainedStore([ProcessMemoryStore()])

    @cached(store)
    def f(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"test_cached\..*f\(\)"):
        f(1, 2)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="missing a required argument"):
        f()  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values"):
        f(1, x=1)  # type: ignore[misc]
    with pytest.raises(TypeError, match="unexpected keyword"):
        f(1, y=1)  # type: ignore[call-arg]


@pytest.mark.memcache
def test_sync_and_async_stores_must_match_the_function(memcached_server: Any) -> None:
    sync_store = ChainedStore([ProcessMemoryStore()])
    async_store = AsyncChainedStore([ProcessMemoryStore(), async_memcache(memcached_server.address)], bus=None)
    try:
        with pytest.raises(ConfigurationError, match=r"async function .* synchronous store"):

            @cached(sync_store)
            async def a() -> int:
                return 1

        with pytest.raises(ConfigurationError, match=r"synchronous function .* asyncio store"):

            @cached(async_store)
            def s() -> int:
                return 1

    finally:
        asyncio.run(async_store.release())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lifetime": "60"}, "lifetime= takes seconds"),
        ({"lifetime": True}, "lifetime= takes seconds"),
        ({"lifetime": -1}, "lifetime= must be a finite duration > 0"),
        ({"lifetime": 0}, "lifetime= must be a finite duration > 0"),
        ({"lifetime": float("inf")}, "finite"),
        ({"lifetime": _dt.datetime(2030, 1, 1)}, "lifetime= takes seconds"),
        ({"lifetime": _dt.timedelta(0)}, "> 0"),
        ({"negative_lifetime": "x"}, "negative_lifetime= takes seconds"),
        ({"stale_on_error": 5}, "stale_on_error= needs a lifetime"),
        ({"lifetime": 5, "stale_on_error": -5}, "stale_on_error= must be"),
        ({"key": "id"}, "key= takes a callable"),
        ({"stampede": 5}, "stampede= takes a stockpyle.Stampede"),
    ],
)
def test_bad_settings_are_configuration_errors(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        cached(ChainedStore([ProcessMemoryStore()]), **options)


def test_only_stores_and_functions_are_accepted() -> None:
    with pytest.raises(ConfigurationError, match="lacks get, put, delete"):
        cached(object())
    decorate = cached(ProcessMemoryStore())
    with pytest.raises(ConfigurationError, match="decorates a function"):
        decorate(42)  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="above @cached"):
        decorate(staticmethod(len))  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="lambdas share one name"):
        decorate(lambda x: x)
    with pytest.raises(ConfigurationError, match="a function with a name"):
        decorate(functools.partial(int, base=2))


def test_the_wrapper_looks_like_the_function() -> None:
    store = ProcessMemoryStore()

    @cached(store, lifetime=5)
    def documented(x: int, y: int = 2) -> int:
        """Adds."""
        return x + y

    assert isinstance(documented, CachedFunction)
    assert documented.__name__ == "documented"
    assert documented.__doc__ == "Adds."
    assert str(__import__("inspect").signature(documented)) == "(x: 'int', y: 'int' = 2) -> 'int'"
    assert documented.store is store
    assert documented.record_class.__qualname__ == f"CachedResult[{__name__}.{documented.__qualname__}]"
    assert documented(1) == documented(1, 2) == 3
