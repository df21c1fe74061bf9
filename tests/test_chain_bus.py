"""ChainedStore(bus=...): in-process layers follow other processes' writes, on a real Redis stream bus.

Two chains with a bus each stand for two processes (each bus has its own
sender id and listener thread); they share a memcached layer.  The
multi-process proof with real processes is tests/test_bus_coherence.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.buses import RecordingListener, wait_trusted, wait_until

from stockpyle import ChainedStore, ProcessMemoryStore
from stockpyle.exceptions import ConfigurationError
from stockpyle.stores.achained import AsyncChainedStore
from stockpyle.testing import Item

pytestmark = [pytest.mark.redis, pytest.mark.memcache]


@pytest.fixture
def make_bus(redis_url: str, redis_prefix: str, redis_client: Any) -> Iterator[Callable[..., Any]]:
    """Buses on one stream of this test (its key contains redis_prefix, so it is deleted afterwards)."""
    from stockpyle.bus.redis import RedisStreamBus

    made: list[Any] = []

    def make(**options: Any) -> Any:
        options.setdefault("stream", f"{redis_prefix}:bus")
        bus = RedisStreamBus(redis_url, **options)
        made.append(bus)
        return bus

    yield make
    for bus in made:
        bus.release()


@pytest.fixture
def pair(make_bus: Callable[..., Any], make_memcache_store: Callable[..., Any]) -> Iterator[tuple[Any, Any]]:
    """Two chains ("processes"), each [ProcessMemoryStore, shared memcached] with its own bus."""
    shared_namespace = "bus" + str(time.monotonic_ns())
    chains = []
    for _ in range(2):
        bus = make_bus()
        chain = ChainedStore([ProcessMemoryStore(), make_memcache_store(namespace=shared_namespace)], bus=bus)
        assert wait_trusted(bus)
        chains.append(chain)
    yield chains[0], chains[1]
    for chain in chains:
        chain.release()


def l1_has(chain: Any, key: str) -> bool:
    return chain.stores[0].get(Item, {"key": key}) is not None


def test_another_processs_write_drops_the_copy_in_process_memory(pair: tuple[Any, Any]) -> None:
    writer, reader = pair
    writer.put(Item("k1", 1, 2, "v1"))
    assert reader.get(Item, {"key": "k1"}).payload == "v1"  # now cached in the reader's process memory
    assert l1_has(reader, "k1")
    writer.put(Item("k1", 1, 2, "v2"))
    assert wait_until(lambda: not l1_has(reader, "k1"), timeout=2)
    assert reader.get(Item, {"key": "k1"}).payload == "v2"
    assert reader.get(Item, {"zap": 1, "bar": 2}).payload == "v2"  # every key of the object
    assert reader.stats().invalidated >= 1


def test_deletes_and_alternate_keys_are_invalidated_too(pair: tuple[Any, Any]) -> None:
    writer, reader = pair
    writer.put(Item("k2", 3, 4, "v1"))
    assert reader.get(Item, {"zap": 3, "bar": 4}).payload == "v1"
    writer.delete(Item("k2", 3, 4))
    assert wait_until(lambda: reader.stores[0].get(Item, {"zap": 3, "bar": 4}) is None, timeout=2)
    assert reader.get(Item, {"key": "k2"}) is None


def test_a_chain_keeps_its_own_writes(pair: tuple[Any, Any]) -> None:
    writer, _reader = pair
    writer.put(Item("k3", 5, 6, "mine"))
    before = writer.stats().invalidated
    time.sleep(0.3)  # its own message has come back by now
    assert l1_has(writer, "k3")
    assert writer.stats().invalidated == before


def test_class_invalidation_reaches_the_other_process(pair: tuple[Any, Any]) -> None:
    writer, reader = pair
    writer.batch_put([Item(f"c{i}", i, i, "v") for i in range(5)])
    assert all(reader.get(Item, {"key": f"c{i}"}) is not None for i in range(5))
    writer.invalidate_class(Item)
    assert wait_until(lambda: not any(l1_has(reader, f"c{i}") for i in range(5)), timeout=2)


def test_a_silent_bus_is_bypassed_within_its_bound(
    make_bus: Callable[..., Any], make_memcache_store: Callable[..., Any]
) -> None:
    """The bus's listener thread stands still (a listener blocks it): the chain stops serving process memory."""
    bus = make_bus(max_staleness=0.1)
    chain = ChainedStore([ProcessMemoryStore(), make_memcache_store()], bus=bus)
    try:
        assert wait_trusted(bus)
        chain.put(Item("s1", 1, 1, "v"))
        assert chain.get(Item, {"key": "s1"}) is not None
        blocker = RecordingListener()
        bus.subscribe(blocker)
        blocker.block()
        bus.publish(["0" * 32])  # the bus thread delivers it to the blocker and stands still
        assert blocker.entered.wait(2)
        stalled_at = time.monotonic()
        # from the moment the bus can no longer vouch for process memory, reads skip it
        while time.monotonic() < bus.trusted_until:
            time.sleep(0.005)
        bypassed_after = time.monotonic() - stalled_at
        before = chain.stats()
        l1_hits, l2_hits = before[0].hits, before[1].hits
        for _ in range(50):
            assert chain.get(Item, {"key": "s1"}).payload == "v"  # from memcached
        stats = chain.stats()
        assert stats[0].hits == l1_hits
        assert stats[1].hits == l2_hits + 50
        assert stats.trusted is False
        assert bypassed_after <= bus.max_staleness + 0.05
        blocker.unblock()
        assert wait_trusted(bus)
        assert chain.stats().trusted is True
    finally:
        chain.release()


def test_hits_while_trusted_never_outlive_the_deadline(
    make_bus: Callable[..., Any], make_memcache_store: Callable[..., Any]
) -> None:
    """Every process-memory hit happened before the bus's deadline: compared on each read, not by a thread."""
    bus = make_bus(max_staleness=0.1)
    chain = ChainedStore([ProcessMemoryStore(), make_memcache_store()], bus=bus)
    try:
        assert wait_trusted(bus)
        chain.put(Item("d1", 1, 1, "v"))
        chain.get(Item, {"key": "d1"})
        blocker = RecordingListener()
        bus.subscribe(blocker)
        blocker.block()
        bus.publish(["1" * 32])
        assert blocker.entered.wait(2)
        deadline = bus.trusted_until  # frozen now: only the (blocked) bus thread may extend it
        l1_hits = chain.stats()[0].hits
        late = 0
        end = time.monotonic() + 0.3
        while time.monotonic() < end:  # spin without sleeping, as a busy reader does
            asked_at = time.monotonic()  # the chain compares its clock after this
            chain.get(Item, {"key": "d1"})
            hits = chain.stats()[0].hits
            if hits > l1_hits and asked_at >= deadline:
                late += hits - l1_hits
            l1_hits = hits
        assert late == 0
        blocker.unblock()
    finally:
        chain.release()


def test_release_stops_listening_and_the_chain_keeps_working(pair: tuple[Any, Any]) -> None:
    writer, reader = pair
    writer.put(Item("r1", 1, 1, "v"))
    reader.get(Item, {"key": "r1"})
    reader.release()
    assert reader.stats().trusted is False
    assert reader.get(Item, {"key": "r1"}).payload == "v"  # from memcached
    assert reader.stats()[1].hits >= 1


def test_bus_argument_is_checked() -> None:
    with pytest.raises(ConfigurationError, match="bus= takes an invalidation bus"):
        ChainedStore([ProcessMemoryStore(), ProcessMemoryStore()], bus=object())


def test_a_chain_without_bus_says_once_it_is_not_coherent(
    make_memcache_store: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="stockpyle.chained"):
        ChainedStore([ProcessMemoryStore(), make_memcache_store()])
    assert "not kept coherent across processes" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stockpyle.chained"):
        ChainedStore([ProcessMemoryStore(), make_memcache_store()], bus=None)
        ChainedStore([ProcessMemoryStore()])  # nothing shared below: nothing to say
    assert caplog.text == ""


def test_the_async_chain_follows_the_bus_too(
    make_bus: Callable[..., Any], make_memcache_store: Callable[..., Any]
) -> None:
    namespace = "abus" + str(time.monotonic_ns())
    writer = ChainedStore([ProcessMemoryStore(), make_memcache_store(namespace=namespace)], bus=make_bus())
    bus = make_bus()
    reader = AsyncChainedStore([ProcessMemoryStore(), make_memcache_store(namespace=namespace)], bus=bus)
    assert wait_trusted(bus)

    async def scenario() -> str:
        writer.put(Item("a1", 1, 1, "v1"))
        assert (await reader.get(Item, {"key": "a1"})).payload == "v1"
        writer.put(Item("a1", 1, 1, "v2"))
        for _ in range(200):
            if reader.stores[0].get(Item, {"key": "a1"}) is None:
                break
            await asyncio.sleep(0.01)
        found = await reader.get(Item, {"key": "a1"})
        return str(found.payload)

    try:
        assert asyncio.run(scenario()) == "v2"
    finally:
        writer.release()
        asyncio.run(reader.release())
