"""AsyncMemcacheStore: MemcacheStore's constructor, keys, placement and leases, driven with await.

The contract and consistency suites run against it in tests/test_async_stores.py;
this file covers what is specific: one cache shared with the synchronous store
across several servers (the native asyncio driver, and the synchronous drivers
run in threads), cancellation against a frozen server, the constructor's
checks, and leases through an asyncio chain.  The native driver's own faults,
pools and event loops are in tests/test_aiomemcache.py.
"""

from __future__ import annotations

import asyncio
import importlib.util
import uuid
from typing import Any

import pytest

from stockpyle import AsyncChainedStore, AsyncMemcacheStore, MemcacheStore, ProcessMemoryStore
from stockpyle.exceptions import ConfigurationError
from stockpyle.stores.drivers.aiomemcache import AsyncMemcacheDriver
from stockpyle.stores.drivers.pymemcache import build_client, normalize_servers
from stockpyle.stores.drivers.threaded import ThreadedDriver
from stockpyle.testing import Item

pytestmark = pytest.mark.memcache

#: how the asyncio store reaches memcached: its own asyncio client (the default for servers=),
#: pymemcache's client passed in (run in threads), or pylibmc (run in threads)
DRIVERS = [
    "asyncio",
    "pymemcache-threads",
    pytest.param(
        "pylibmc",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("pylibmc") is None, reason="pylibmc has wheels for CPython 3.10 and 3.11 only"
        ),
    ),
]


def async_store(addresses: list[str], driver: str, **options: Any) -> AsyncMemcacheStore:
    """An AsyncMemcacheStore on ``addresses`` through ``driver`` (one of :data:`DRIVERS`)."""
    if driver == "asyncio":
        store = AsyncMemcacheStore(addresses, **options)
        assert isinstance(store._driver, AsyncMemcacheDriver)
        return store
    if driver == "pymemcache-threads":
        timeouts = {name: options.pop(name) for name in ("timeout", "connect_timeout") if name in options}
        client = build_client(
            normalize_servers(addresses),
            connect_timeout=timeouts.get("connect_timeout", 0.25),
            timeout=timeouts.get("timeout", 0.5),
            max_pool_size=options.pop("max_pool_size", None),
        )
        store = AsyncMemcacheStore(client=client, **options)
    else:
        store = AsyncMemcacheStore(addresses, driver=driver, **options)
    assert isinstance(store._driver, ThreadedDriver)
    return store


@pytest.mark.parametrize("driver", DRIVERS)
def test_sync_and_async_stores_place_every_key_on_the_same_server(memcached_factory: Any, driver: str) -> None:
    """Written by the asyncio store over three servers, every object is found by the synchronous one, and back."""
    servers = memcached_factory.start(3)
    addresses = [server.address for server in servers]
    namespace = "place" + uuid.uuid4().hex[:8]
    sync_store = MemcacheStore(
        addresses, namespace=namespace, driver="pylibmc" if driver == "pylibmc" else "pymemcache"
    )
    store = async_store(addresses, driver, namespace=namespace)

    async def write_and_read(objs: list[Item], wanted: list[str]) -> list[Any]:
        await store.batch_put(objs)
        found = await store.batch_get(Item, [{"key": key} for key in wanted])
        await store.release()
        return found

    written = [Item(f"a{i}", i, -i, f"async {i}") for i in range(300)]
    sync_store.batch_put([Item(f"s{i}", 1000 + i, -i, f"sync {i}") for i in range(300)])
    from_sync = asyncio.run(write_and_read(written, [f"s{i}" for i in range(300)]))
    assert [obj.payload for obj in from_sync] == [f"sync {i}" for i in range(300)]
    from_async = sync_store.batch_get(Item, [{"key": f"a{i}"} for i in range(300)])
    assert [obj.payload for obj in from_async] == [f"async {i}" for i in range(300)]  # type: ignore[union-attr]
    # the objects really are spread: every server holds a share of the 600 objects' keys
    from pymemcache.client.base import Client

    counts = []
    for server in servers:
        host, _, port = server.address.rpartition(":")
        client = Client((host, int(port)))
        counts.append(int(client.stats()[b"curr_items"]))
        client.close()
    assert all(count > 100 for count in counts), counts
    sync_store.release()


@pytest.mark.parametrize("driver", DRIVERS[:2])
def test_a_call_cancelled_on_a_frozen_server_leaves_the_connections_clean(memcached_factory: Any, driver: str) -> None:
    """A get cancelled while memcached is frozen: once it thaws, every answer is the right key's.

    One pooled connection: a reply left unread on it would answer the next
    call.  The native driver closes the interrupted connection at once; the
    threaded one lets its thread finish the read before the connection goes back.
    """
    (server,) = memcached_factory.start(1)
    store = async_store([server.address], driver, namespace="cancel" + uuid.uuid4().hex[:8], max_pool_size=1, timeout=2)

    async def scenario() -> list[Any]:
        await store.batch_put([Item("a", 1, 1, "value a"), Item("b", 2, 2, "value b")])
        server.pause()
        try:
            task = asyncio.ensure_future(store.get(Item, {"key": "a"}))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            server.resume()
        if driver != "asyncio":
            await asyncio.sleep(0.5)  # the cancelled call's thread finishes its read and returns the connection
        found = [await store.get(Item, {"key": key}) for key in ("b", "a", "b")]
        await store.release()
        return found

    found = asyncio.run(scenario())
    assert [obj.payload for obj in found] == ["value b", "value a", "value b"]


def test_the_constructor_checks_what_memcache_store_checks() -> None:
    for bad in (
        {"timeout": 0},
        {"connect_timeout": -1},
        {"driver": "libmc"},
        {"max_item_size": 10},
        {"max_pool_size": 0},
    ):
        with pytest.raises(ConfigurationError) as sync_error:
            MemcacheStore(["127.0.0.1:11211"], **bad)
        with pytest.raises(ConfigurationError) as async_error:
            AsyncMemcacheStore(["127.0.0.1:11211"], **bad)
        assert str(async_error.value) == str(sync_error.value)
    with pytest.raises(ConfigurationError, match="exactly one of servers"):
        AsyncMemcacheStore()


@pytest.mark.parametrize("driver", DRIVERS[:2])
def test_a_thousand_tasks_on_one_cold_key_create_it_once_across_chains(memcached_server: Any, driver: str) -> None:
    """Four asyncio chains (as four processes would) share memcached's lease: the creator runs once."""
    namespace = "alease" + uuid.uuid4().hex[:8]
    chains = [
        AsyncChainedStore([ProcessMemoryStore(), async_store([memcached_server.address], driver, namespace=namespace)])
        for _ in range(4)
    ]
    calls: list[int] = []

    async def create() -> Item:
        calls.append(1)
        await asyncio.sleep(0.2)
        return Item("cold", 5, 5, "made once")

    async def scenario() -> list[Any]:
        return await asyncio.gather(*(chains[n % 4].get_or_create(Item, {"key": "cold"}, create) for n in range(1000)))

    found = asyncio.run(scenario())
    assert {obj.payload for obj in found} == {"made once"}
    assert len(calls) == 1
    assert sum(chain.stats().leases_won for chain in chains) == 1
