"""Statistics: latency windows, automatic counting of backend stores, chain layers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from stockpyle import BaseDictionaryStore, BaseStore, ChainedStore, ProcessMemoryStore
from stockpyle.exceptions import StoreUnavailableError
from stockpyle.stats import SAMPLE_EVERY, Latency, StoreStats


class Foo:
    __stockpyle_keys__: ClassVar[list[Any]] = ["key"]

    def __init__(self, key: str) -> None:
        self.key = key


def test_latency_summary_median_and_p99() -> None:
    window = Latency()
    assert window.summary().samples == 0
    for ms in range(1, 101):
        window.add(ms / 1000)
    summary = window.summary()
    assert summary.samples == 100
    assert summary.median == pytest.approx(0.0505)
    assert summary.p99 == pytest.approx(0.100)
    assert summary.mean == pytest.approx(0.0505)
    window.clear()
    assert window.summary().samples == 0


def test_process_memory_get_latency_is_sampled() -> None:
    store = ProcessMemoryStore()
    store.put(Foo("a"))
    for _ in range(SAMPLE_EVERY * 10):
        store.get(Foo, {"key": "a"})
    stats = store.stats()
    assert stats.hits == SAMPLE_EVERY * 10
    assert stats.latency["get"].summary().samples == 10
    assert 0 < stats.latency["get"].summary().median < 0.01


class CountingStore(BaseStore):
    """A minimal third-party store: counted automatically, batch defaults included."""

    def __init__(self) -> None:  # deliberately skips BaseStore.__init__
        self.data: dict[str, Foo] = {}
        self.down = False

    def put(self, obj: object) -> None:
        assert isinstance(obj, Foo)
        self.data[obj.key] = obj

    def get(self, klass: type, keydict: Any) -> Any:
        if self.down:
            raise StoreUnavailableError("down")
        return self.data.get(keydict["key"])

    def delete(self, obj: object) -> None:
        assert isinstance(obj, Foo)
        self.data.pop(obj.key, None)


def test_third_party_stores_are_counted_once_per_call() -> None:
    store = CountingStore()
    store.batch_put(iter([Foo("a"), Foo("b")]))  # an iterator: counted and still consumed once
    assert sorted(store.data) == ["a", "b"]
    store.get(Foo, {"key": "a"})
    store.batch_get(Foo, ({"key": k} for k in ("a", "x", "b")))
    store.batch_delete([Foo("a")])
    stats = store.stats()
    # batch_get is implemented with get(): counted once, as the batch the caller made
    assert (stats.hits, stats.misses, stats.puts, stats.deletes) == (3, 1, 2, 1)
    assert set(stats.latency) == {"batch_put", "get", "batch_get", "batch_delete"}
    store.down = True
    with pytest.raises(StoreUnavailableError):
        store.get(Foo, {"key": "a"})
    assert store.stats().errors == 1


def test_dictionary_store_counts() -> None:
    store = BaseDictionaryStore({})
    store.put(Foo("a"))
    store.get(Foo, {"key": "a"})
    assert store.stats().as_dict()["latency"]["get"]["samples"] == 1


def test_chain_stats_totals_layers_and_latency() -> None:
    top, bottom = ProcessMemoryStore(maxsize=100), BaseDictionaryStore({})
    chain = ChainedStore([top, bottom])
    bottom.put(Foo("a"))
    for _ in range(SAMPLE_EVERY * 2):
        chain.get(Foo, {"key": "a"})
    chain.get(Foo, {"key": "none"})
    stats = chain.stats()
    assert len(stats) == 2
    assert [layer.hits for layer in stats] == [SAMPLE_EVERY * 2 - 1, 1]
    assert (stats.hits, stats.misses) == (SAMPLE_EVERY * 2, 1)
    assert stats.layers[1].latency.summary().samples == 2  # every lookup that reached the lower layer
    assert stats.layers[0].latency.summary().samples >= 2  # sampled top-layer lookups
    data = stats.as_dict()
    assert data["layers"][0]["hits"] == SAMPLE_EVERY * 2 - 1
    assert data["layers"][1]["latency"]["samples"] == 2
    chain.reset_stats()
    assert chain.stats().hits == 0
    assert chain.stats().layers[1].latency.summary().samples == 0


def test_chain_reset_stats_zeroes_every_chain_counter() -> None:
    """reset_stats() left the lease, bus and fill counters running: a warm-up's lease was counted in a herd's."""
    chain = ChainedStore([ProcessMemoryStore(), BaseDictionaryStore({})], bus=None)
    totals = chain.stats()
    counters = [
        name
        for name, value in vars(totals).items()
        if isinstance(value, int) and not isinstance(value, bool) and name not in ("layers",)
    ]
    assert {"leases_won", "leases_lost", "lease_waits", "lease_timeouts", "fills_refused", "invalidated"} <= set(
        counters
    )
    for name in counters:
        setattr(totals, name, 7)
    chain.reset_stats()
    assert {name: getattr(chain.stats(), name) for name in counters} == dict.fromkeys(counters, 0)


def test_store_stats_reset_keeps_windows() -> None:
    stats = StoreStats()
    stats.timer("get").add(0.5)
    stats.hits = 3
    stats.reset()
    assert stats.hits == 0
    assert stats.latency["get"].summary().samples == 0


def test_chain_records_the_latency_its_callers_see() -> None:
    """ChainedStore.stats().latency was always empty: end-to-end latency is sampled like the layers'."""
    chain = ChainedStore([ProcessMemoryStore(), BaseDictionaryStore({})], bus=None)
    chain.put(Foo("a"))
    chain.batch_put([Foo("b"), Foo("c")])
    for _ in range(SAMPLE_EVERY * 3):
        chain.get(Foo, {"key": "a"})
    chain.batch_get(Foo, [{"key": "a"}, {"key": "b"}])
    chain.delete(Foo("c"))
    latency = chain.stats().latency
    assert latency["get"].summary().samples == 3  # one call in SAMPLE_EVERY
    assert (latency["put"].summary().samples, latency["batch_put"].summary().samples) == (1, 1)
    assert (latency["batch_get"].summary().samples, latency["delete"].summary().samples) == (1, 1)
    exported = chain.stats().as_dict()["latency"]
    assert exported["get"]["samples"] == 3 and exported["get"]["median"] > 0


def test_misses_back_fills_and_breaker_transitions_log_at_debug(caplog: Any) -> None:
    import logging

    from stockpyle.exceptions import StoreUnavailableError

    class Down(ProcessMemoryStore):
        in_process = False  # a shared layer, as far as the chain knows
        failing = True

        def get(self, klass: Any, keydict: Any) -> Any:
            if self.failing:
                raise StoreUnavailableError("down")
            return super().get(klass, keydict)

    down = Down()
    bottom = BaseDictionaryStore({})
    bottom.put(Foo("a"))
    chain = ChainedStore([ProcessMemoryStore(), down, bottom], bus=None, failure_threshold=1, cooldown=0)
    with caplog.at_level(logging.DEBUG, logger="stockpyle.chained"):
        chain.get(Foo, {"key": "none"})
        chain.get(Foo, {"key": "a"})
        down.failing = False
        chain.get(Foo, {"key": "x"})
    text = caplog.text
    assert "no layer has Foo" in text
    assert "back-filled layer 0" in text
    assert "probed after its cool-down" in text and "its breaker closes" in text


class Pair:
    """Two alternate keys: batch lookups through either must count per key."""

    __stockpyle_keys__: ClassVar[list[Any]] = ["key", "alias"]

    def __init__(self, key: str, alias: str) -> None:
        self.key = key
        self.alias = alias


@pytest.fixture(params=["memcached", "redis"])
def kv_store(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A key-value store on a real server (they count inline, not through the generic wrapper)."""
    if request.param == "memcached":
        yield request.getfixturevalue("make_memcache_store")()
        return
    from stockpyle import RedisStore

    store = RedisStore(request.getfixturevalue("redis_url"), namespace=request.getfixturevalue("redis_prefix"))
    yield store
    store.release()


def test_key_value_stores_count_every_operation_like_the_generic_wrapper(kv_store: Any) -> None:
    store = kv_store
    store.put(Pair("a", "x"))
    store.batch_put(iter([Pair("b", "y"), Pair("c", "z")]))  # an iterator: counted and still written
    assert store.get(Pair, {"key": "a"}).alias == "x"
    assert store.get(Pair, {"key": "nope"}) is None
    # a repeated key and a miss: counted per position asked, as the caller sees the answer
    found = store.batch_get(Pair, iter([{"key": "b"}, {"alias": "z"}, {"key": "b"}, {"key": "nope"}]))
    assert [obj and obj.key for obj in found] == ["b", "c", "b", None]
    assert store.batch_get(Pair, []) == []
    store.delete(Pair("a", "x"))
    store.batch_delete(iter([Pair("b", "y")]))
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.puts, stats.deletes, stats.errors) == (4, 2, 3, 2, 0)
    assert set(stats.latency) == {"put", "batch_put", "get", "batch_get", "delete", "batch_delete"}
    assert stats.latency["get"].summary().samples == 2  # every call of a networked store is timed
    store.reset_stats()
    assert (store.stats().hits, store.stats().puts) == (0, 0)
    assert store.stats().latency["get"].summary().samples == 0
    store.get(Pair, {"key": "c"})
    assert store.stats().hits == 1
    assert store.stats().latency["get"].summary().samples == 1  # the window survives a reset


def test_a_key_value_store_counts_a_failed_operation_as_an_error(memcached_factory: Any) -> None:
    from stockpyle import MemcacheStore
    from stockpyle.exceptions import StoreError

    server = memcached_factory.one()
    store = MemcacheStore([server.address], connect_timeout=0.5, timeout=0.5)
    store.put(Pair("a", "x"))
    server.stop()
    for operation in (
        lambda: store.get(Pair, {"key": "a"}),
        lambda: store.batch_get(Pair, [{"key": "a"}]),
        lambda: store.put(Pair("a", "x")),
        lambda: store.delete(Pair("a", "x")),
    ):
        with pytest.raises(StoreError):
            operation()
    stats = store.stats()
    assert (stats.errors, stats.hits, stats.puts, stats.deletes) == (4, 0, 1, 0)
    store.release()


def test_a_key_value_store_subclass_calling_super_is_counted_once(make_memcache_store: Any) -> None:
    from stockpyle import MemcacheStore

    class Logged(MemcacheStore):
        def get(self, klass: type, keydict: Any) -> Any:
            return super().get(klass, keydict)

    base = make_memcache_store()
    store = Logged(servers=base.servers, namespace=base.namespace)
    store.put(Pair("a", "x"))
    assert store.get(Pair, {"key": "a"}) is not None
    assert (store.stats().hits, store.stats().puts) == (1, 1)
    store.release()


def test_chain_counts_index_hits_exactly_across_sampling_cycles() -> None:
    """Hits from the top layer's index are derived from the call countdown: exact for one thread."""
    import asyncio

    from stockpyle import AsyncChainedStore

    for chain_class in (ChainedStore, AsyncChainedStore):
        top, below = ProcessMemoryStore(), ProcessMemoryStore()
        chain = chain_class([top, below])
        below.put(Foo("deep"))
        top.put(Foo("a"))

        def get(key: str, chain: Any = chain, asynchronous: bool = chain_class is AsyncChainedStore) -> Any:
            found = chain.get(Foo, {"key": key})
            return asyncio.run(_awaited(found)) if asynchronous else found

        for _ in range(3 * SAMPLE_EVERY + 7):  # three timed calls among them
            assert get("a") is not None
        assert get("missing") is None
        assert get("deep") is not None  # an L1 miss, then an L2 hit (back-filled)
        assert get("deep") is not None  # now an L1 hit
        stats = chain.stats()
        assert (stats.layers[0].hits, stats.layers[0].misses) == (3 * SAMPLE_EVERY + 8, 2), chain_class
        assert stats.layers[1].hits == 1
        chain.reset_stats()
        for _ in range(5):
            get("a")
        assert chain.stats().layers[0].hits == 5, chain_class


async def _awaited(found: Any) -> Any:
    return await found
