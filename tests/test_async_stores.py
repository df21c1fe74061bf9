"""asyncio stores through the shared contract: the key-value engine and the chain, driven with await.

The synchronous suites run against them through :func:`stockpyle.testing.sync_bridge`
(one event loop in debug mode: a callback that blocks it fails the test).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support.databases import QueryCounter, create_tables, drop_tables, table_name

from stockpyle import ChainedStore, ProcessMemoryStore
from stockpyle.exceptions import StoreUnavailableError
from stockpyle.stores.achained import AsyncChainedStore
from stockpyle.stores.memcache import AsyncMemcacheStore
from stockpyle.stores.sqlalchemy import SqlAlchemyStore
from stockpyle.testing import ConsistencyContract, Item, StoreContract, sync_bridge


def async_memcache(address: str, **options: Any) -> AsyncMemcacheStore:
    """An AsyncMemcacheStore: the key-value engine driven with await, on the native asyncio memcached driver."""
    options.setdefault("namespace", "a" + uuid.uuid4().hex[:12])
    return AsyncMemcacheStore([address], connect_timeout=2.0, timeout=2.0, **options)


@pytest.mark.memcache
class TestAsyncKeyValueContract(StoreContract):
    short_lifetime: ClassVar[float] = 2
    expiry_wait: ClassVar[float] = 3.2

    @pytest.fixture(autouse=True)
    def _server(self, memcached_server: Any) -> None:
        self.address = memcached_server.address

    def make_store(self, **options: Any) -> Any:
        return sync_bridge(async_memcache(self.address, **options))


@pytest.mark.memcache
class TestAsyncKeyValueConsistency(ConsistencyContract):
    @pytest.fixture(autouse=True)
    def _server(self, memcached_server: Any) -> None:
        self.address = memcached_server.address

    def make_store(self, **options: Any) -> Any:
        return sync_bridge(async_memcache(self.address, **options))


@pytest.mark.memcache
class TestSignedAsyncKeyValueConsistency(TestAsyncKeyValueConsistency):
    def make_store(self, **options: Any) -> Any:
        return sync_bridge(async_memcache(self.address, secret=b"async-consistency-01", **options))


@pytest.mark.memcache
class TestAsyncChainContract(StoreContract):
    short_lifetime: ClassVar[float] = 2
    expiry_wait: ClassVar[float] = 3.2

    @pytest.fixture(autouse=True)
    def _server(self, memcached_server: Any) -> None:
        self.address = memcached_server.address

    def make_store(self, **options: Any) -> Any:
        return sync_bridge(AsyncChainedStore([ProcessMemoryStore(**options), async_memcache(self.address, **options)]))


class TestAsyncChainOnShoveContract(StoreContract):
    """A synchronous system of record below an asyncio chain runs in worker threads."""

    @pytest.fixture(autouse=True)
    def _database(self, tmp_path: Any) -> None:
        self.uri = f"lite://{tmp_path}/async-chain.sqlite"

    def make_store(self, **options: Any) -> Any:
        from stockpyle.stores.shove import ShoveStore

        return sync_bridge(AsyncChainedStore([ProcessMemoryStore(**options), ShoveStore(uri=self.uri, **options)]))


# ---------------------------------------------------------------------------
# the cost of a hit, and one read per cold key


class HerdBase(DeclarativeBase):
    pass


class Part(HerdBase):
    __tablename__ = table_name("async_herd_part")
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(40))


def test_a_thousand_tasks_reading_one_cold_key_send_one_select(engine: sa.Engine) -> None:
    create_tables(engine, HerdBase.metadata)
    try:
        with engine.begin() as connection:
            connection.execute(sa.insert(Part), [{"id": 7, "name": "gear"}])
        chain = AsyncChainedStore([ProcessMemoryStore(), SqlAlchemyStore(engine=engine)])

        async def herd() -> list[Any]:
            return await asyncio.gather(*(chain.get(Part, {"id": 7}) for _ in range(1000)))

        with QueryCounter(engine, selects_only=True) as counter:
            found = asyncio.run(herd())
        assert counter.count == 1
        assert all(obj is not None and obj.name == "gear" for obj in found)
        assert len({id(obj) for obj in found}) == 1  # every task got the one object read
        with QueryCounter(engine, selects_only=True) as counter:
            assert asyncio.run(herd())[0].name == "gear"
        assert counter.count == 0  # then served by process memory
    finally:
        drop_tables(engine, HerdBase.metadata)


def test_a_top_layer_hit_does_not_suspend_the_caller() -> None:
    chain = AsyncChainedStore([ProcessMemoryStore(), ProcessMemoryStore()])

    async def scenario() -> list[str]:
        order: list[str] = []
        await chain.put(Item("k1", 1, 2, "p"))

        async def other() -> None:
            order.append("other task")

        task = asyncio.ensure_future(other())
        for _ in range(100):
            found = await chain.get(Item, {"key": "k1"})
            assert found is not None
        order.append("hundred hits")
        await task
        return order

    # a suspension would have let the other task run between the hits
    assert asyncio.run(scenario()) == ["hundred hits", "other task"]


def test_the_async_chain_and_the_sync_chain_share_one_policy() -> None:
    """Same capabilities, same statistics fields: the async chain runs ChainedStore's plans."""
    sync_chain = ChainedStore([ProcessMemoryStore(), ProcessMemoryStore()])
    async_chain = AsyncChainedStore([ProcessMemoryStore(), ProcessMemoryStore()])

    async def scenario() -> None:
        await async_chain.put(Item("k", 1, 2))
        await async_chain.get(Item, {"key": "k"})
        await async_chain.get(Item, {"key": "absent"})

    asyncio.run(scenario())
    sync_chain.put(Item("k", 1, 2))
    sync_chain.get(Item, {"key": "k"})
    sync_chain.get(Item, {"key": "absent"})
    sync_stats, async_stats = sync_chain.stats(), async_chain.stats()
    assert [layer.hits for layer in sync_stats.layers] == [layer.hits for layer in async_stats.layers]
    assert [layer.misses for layer in sync_stats.layers] == [layer.misses for layer in async_stats.layers]
    assert [layer.backfills for layer in sync_stats.layers] == [layer.backfills for layer in async_stats.layers]


@pytest.mark.memcache
def test_a_frozen_server_never_blocks_the_event_loop(memcached_factory: Any) -> None:
    """While a read waits for a frozen (SIGSTOP) memcached, other tasks keep running."""
    (server,) = memcached_factory.start(1)
    store = async_memcache(server.address)

    async def scenario() -> tuple[type[BaseException] | None, float, float]:
        await store.put(Item("f1", 1, 1, "v"))
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.ensure_future(ticker())
        server.pause()
        began = time.monotonic()
        error: type[BaseException] | None = None
        try:
            await store.get(Item, {"key": "f1"})
        except StoreUnavailableError as exc:
            error = type(exc)
        finally:
            waited = time.monotonic() - began
            server.resume()
            done.set()
            await tick
        return error, waited, max(gaps)

    error, waited, worst_gap = asyncio.run(scenario())
    assert error is StoreUnavailableError
    assert waited >= 0.4  # the read really waited for the client's timeout (0.5 s)
    assert worst_gap < 0.25, f"the event loop stood still for {worst_gap * 1000:.0f} ms"
    asyncio.run(store.release())
