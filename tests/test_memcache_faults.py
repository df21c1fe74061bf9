"""MemcacheStore when servers are refused, killed or frozen; several servers never remap keys."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from pymemcache.client.base import Client

from stockpyle import ChainedStore, MemcacheStore, ProcessMemoryStore
from stockpyle.exceptions import StoreUnavailableError
from stockpyle.stores.base import BaseDictionaryStore
from stockpyle.testing import Item

pytestmark = [pytest.mark.memcache, pytest.mark.slow]


def items(count: int, tag: str = "v1") -> list[Item]:
    return [Item(f"k{i}", i, -i, tag) for i in range(count)]


def test_refused_connection(memcached_factory: Any) -> None:
    store = MemcacheStore([memcached_factory.free_address()])
    for call in (
        lambda: store.get(Item, {"key": "a"}),
        lambda: store.batch_get(Item, [{"key": "a"}, {"key": "b"}]),
        lambda: store.put(Item("a", 1, 2)),
        lambda: store.delete(Item("a", 1, 2)),
    ):
        with pytest.raises(StoreUnavailableError, match="unavailable") as caught:
            call()
        assert isinstance(caught.value.__cause__, ConnectionRefusedError)


def test_server_killed_mid_test_then_restarted(memcached_factory: Any) -> None:
    server = memcached_factory.one()
    store = MemcacheStore([server.address], namespace="kill")
    store.put(Item("a", 1, 2, "before"))
    assert store.get(Item, {"key": "a"}).payload == "before"  # type: ignore[union-attr]
    server.kill()  # SIGKILL by PID: pooled connections are now dead
    with pytest.raises(StoreUnavailableError):
        store.get(Item, {"key": "a"})
    with pytest.raises(StoreUnavailableError):
        store.put(Item("a", 1, 2, "during"))
    server.start()  # same port, empty cache
    assert store.get(Item, {"key": "a"}) is None
    store.put(Item("a", 1, 2, "after"))
    assert store.get(Item, {"zap": 1, "bar": 2}).payload == "after"  # type: ignore[union-attr]
    store.release()


def test_restart_between_operations_is_invisible(memcached_factory: Any) -> None:
    # the first use of a pooled connection to a restarted server is retried once
    server = memcached_factory.one()
    store = MemcacheStore([server.address], namespace="restart")
    store.put(Item("a", 1, 2))
    server.restart()
    assert store.get(Item, {"key": "a"}) is None
    store.release()


def test_frozen_server_times_out_then_recovers(memcached_factory: Any) -> None:
    server = memcached_factory.one()
    store = MemcacheStore([server.address], namespace="freeze", timeout=0.3)
    store.put(Item("a", 1, 2, "kept"))
    server.pause()  # SIGSTOP: the connection accepts bytes but nothing answers
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as caught:
            store.get(Item, {"key": "a"})
        assert time.monotonic() - started < 2
        assert isinstance(caught.value.__cause__, TimeoutError)
    finally:
        server.resume()
    assert store.get(Item, {"key": "a"}).payload == "kept"  # type: ignore[union-attr]
    store.release()


def test_chain_treats_a_dead_memcached_as_a_miss(memcached_factory: Any) -> None:
    server = memcached_factory.one()
    record = BaseDictionaryStore({})
    store = ChainedStore([ProcessMemoryStore(), MemcacheStore([server.address]), record])
    store.put(Item("a", 1, 2, "v1"))
    server.kill()
    store.put(Item("a", 1, 2, "v2"))  # the system of record takes it; the dead cache is skipped
    fresh_chain = ChainedStore([MemcacheStore([server.address]), record])
    assert fresh_chain.get(Item, {"key": "a"}).payload == "v2"  # type: ignore[union-attr]
    assert fresh_chain.stats()[0].errors == 2  # the read and the backfill


# ---------------------------------------------------------------------------
# several servers


def keys_per_server(store: MemcacheStore, cluster: list[Any], found: list[str]) -> dict[str, int]:
    counts = {}
    for server in cluster:
        client = Client(server.address, timeout=2)
        counts[server.address] = len(client.get_many(found))
        client.close()
    return counts


def test_keys_spread_over_all_servers(memcached_factory: Any) -> None:
    cluster = memcached_factory.start(3)
    store = MemcacheStore([s.address for s in cluster], namespace="spread")
    stored = items(60)
    store.batch_put(stored)
    mkeys = [store.key_for(Item, {"key": it.key}) for it in stored]
    counts = keys_per_server(store, cluster, mkeys)
    assert sum(counts.values()) == 60  # each key on exactly one server
    assert all(n >= 5 for n in counts.values()), counts
    store.release()


def test_a_dead_server_keys_are_not_remapped(memcached_factory: Any) -> None:
    cluster = memcached_factory.start(3)
    store = MemcacheStore([s.address for s in cluster], namespace="noremap" + uuid.uuid4().hex[:6], timeout=0.3)
    stored = items(30)
    store.batch_put(stored)
    victim = cluster[0]
    node_of = {it.key: store.client.hasher.get_node(store.key_for(Item, {"key": it.key})) for it in stored}
    on_victim = [it for it in stored if node_of[it.key] == victim.address]
    elsewhere = [it for it in stored if node_of[it.key] != victim.address]
    assert on_victim
    assert elsewhere

    victim.kill()
    for item in on_victim[:3]:
        with pytest.raises(StoreUnavailableError):
            store.get(Item, {"key": item.key})
        with pytest.raises(StoreUnavailableError):
            store.put(Item(item.key, item.zap, item.bar, "v2"))  # not written anywhere else
    assert store.client.hasher.get_node(store.key_for(Item, {"key": on_victim[0].key})) == victim.address
    assert len(store.client.hasher.nodes) == 3
    for item in elsewhere:
        assert store.get(Item, {"key": item.key}) == item
    with pytest.raises(StoreUnavailableError):
        store.batch_get(Item, [{"key": it.key} for it in stored])

    victim.start()  # back, empty: its keys miss, nothing stale was written elsewhere
    found = store.batch_get(Item, [{"key": it.key} for it in stored])
    assert found == [None if node_of[it.key] == victim.address else it for it in stored]
    store.batch_put(items(30, "v3"))
    assert store.batch_get(Item, [{"zap": i, "bar": -i} for i in range(30)]) == items(30, "v3")
    store.release()


def test_writes_reach_the_live_servers_when_one_is_down(memcached_factory: Any) -> None:
    cluster = memcached_factory.start(3)
    store = MemcacheStore([s.address for s in cluster], namespace="partial", timeout=0.3)
    stored = items(30)
    store.batch_put(stored)
    cluster[1].kill()
    with pytest.raises(StoreUnavailableError):
        store.batch_delete(stored)  # deletes on the live servers still happen
    cluster[1].start()
    assert store.batch_get(Item, [{"key": it.key} for it in stored]) == [None] * 30
    store.release()


@pytest.mark.memcache
def test_a_full_pool_is_an_unavailable_layer_not_a_runtime_error(memcached_factory: Any) -> None:
    """pymemcache's pool raises RuntimeError past max_pool_size instead of waiting: the store says unavailable."""
    import threading

    (server,) = memcached_factory.start(1)
    store = MemcacheStore([server.address], namespace="pool" + uuid.uuid4().hex[:8], max_pool_size=1, timeout=1)
    store.put(Item("p1", 1, 1, "v"))
    server.pause()
    try:
        errors: list[BaseException] = []

        def hold() -> None:
            try:
                store.get(Item, {"key": "p1"})
            except StoreUnavailableError as exc:
                errors.append(exc)

        holder = threading.Thread(target=hold)
        holder.start()  # takes the only connection and waits on the frozen server
        time.sleep(0.2)
        with pytest.raises(StoreUnavailableError, match="max_pool_size"):
            store.get(Item, {"key": "p1"})
    finally:
        server.resume()
        holder.join()
    assert not holder.is_alive()  # the holder got its answer (or its timeout) once the server thawed
    assert store.get(Item, {"key": "p1"}).payload == "v"  # type: ignore[union-attr]
    chain = ChainedStore([ProcessMemoryStore(), store, BaseDictionaryStore({})], bus=None)
    assert chain.get(Item, {"key": "p1"}) is not None
