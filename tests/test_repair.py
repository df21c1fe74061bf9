"""Missed invalidations reach every layer (the last one too) and every process, in the background."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support.databases import create_tables, make_engine, table_name

from stockpyle import AsyncChainedStore, AsyncMemcacheStore, ChainedStore, MemcacheStore, ProcessMemoryStore
from stockpyle.exceptions import StoreError
from stockpyle.ext.sqlalchemy import StockpyleSessionExtension, sessionmaker
from stockpyle.stores._repair import RepairThread, repairs
from stockpyle.testing import Item

pytestmark = [pytest.mark.memcache, pytest.mark.slow]

QUICK = {"connect_timeout": 0.05, "timeout": 0.05}  # a frozen server costs 50 ms per call


class RepairBase(DeclarativeBase):
    pass


class Row(RepairBase):
    __tablename__ = table_name("repair_row")
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    value: Mapped[int] = mapped_column(sa.Integer)


def test_a_cache_that_is_the_last_layer_is_repaired_when_it_answers_again(
    memcached_factory: Any, tmp_path: Path
) -> None:
    """The documented setup: the session extension writes to ChainedStore([ProcessMemoryStore(), MemcacheStore()])."""
    server = memcached_factory.one()
    engine = make_engine(f"sqlite:///{tmp_path / 'repair.sqlite'}")
    create_tables(engine, RepairBase.metadata)
    memcache = MemcacheStore([server.address], namespace="last-layer", **QUICK)
    caches = ChainedStore([ProcessMemoryStore(), memcache], retry_interval=0.2)
    ext = StockpyleSessionExtension(store=caches)
    Session = sessionmaker(extension=ext, bind=engine)
    with Session() as session:
        session.add_all([Row(id=i, value=0) for i in range(10)])
        session.commit()
    assert memcache.get(Row, {"id": 3}).value == 0  # type: ignore[union-attr]
    server.pause()
    try:
        for n in range(1, 31):  # 30 commits during the partition
            with Session() as session:
                row = session.get(Row, n % 10)
                assert row is not None
                row.value = n
                session.commit()
        assert ext.errors >= 30  # every failed cache write was reported...
        assert caches.stats()[1].pending_invalidations > 0  # ...and remembered for the last layer
    finally:
        server.resume()
    time.sleep(0.2 + 0.5)  # one retry interval, and time for the frozen replies to drain
    with engine.connect() as connection:
        current = dict(connection.execute(sa.select(Row.id, Row.value)).all())  # type: ignore[arg-type]
    reader = MemcacheStore([server.address], namespace="last-layer")  # another process's view of memcached
    for ident, value in current.items():
        cached = reader.get(Row, {"id": ident})
        assert cached is None or cached.value == value, f"row {ident}: memcached {cached.value}, database {value}"
    # the readers' bound was checked above; the bookkeeping catches up with the repair thread's next passes
    # (under a loaded CI machine, two suites on two cores, one pass can take over a second)
    deadline = time.monotonic() + 30
    while caches.stats()[1].pending_invalidations:
        assert time.monotonic() < deadline, f"{caches.stats()[1].pending_invalidations} invalidations still pending"
        time.sleep(0.05)
    for store in (reader, memcache):
        store.release()
    engine.dispose()


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from stockpyle import ChainedStore, MemcacheStore, ProcessMemoryStore, ShoveStore
    from stockpyle.testing import Item

    address, uri, folder = sys.argv[1:4]
    folder = Path(folder)
    memcache = MemcacheStore([address], namespace="repair", connect_timeout=0.05, timeout=0.05)
    chain = ChainedStore([ProcessMemoryStore(), memcache, ShoveStore(uri=uri)], retry_interval=0.3)
    chain.batch_put([Item(f"k{i}", i, -i, "v1") for i in range(20)])
    (folder / "ready").touch()
    while not (folder / "go").exists():
        time.sleep(0.01)
    for i in range(20):
        chain.put(Item(f"k{i}", i, -i, "v2"))  # memcached is frozen: nothing reaches it
    (folder / "written").touch()
    time.sleep(30)  # idle: its in-process layer would answer every read, and it makes none
    """
)


def _wait_for(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"the writer process never created {path.name}"
        time.sleep(0.01)


def test_an_idle_writer_repairs_memcached_for_every_other_process(memcached_factory: Any, tmp_path: Path) -> None:
    """A writer and a separate reader process around a SIGSTOP/SIGCONT partition of memcached."""
    server = memcached_factory.one()
    uri = f"lite://{tmp_path / 'record.sqlite'}"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, server.address, uri, str(tmp_path)])
    try:
        _wait_for(tmp_path / "ready")
        reader = MemcacheStore([server.address], namespace="repair")
        assert [o.payload for o in reader.batch_get(Item, [{"key": f"k{i}"} for i in range(20)])] == ["v1"] * 20
        server.pause()
        (tmp_path / "go").touch()
        try:
            _wait_for(tmp_path / "written")
        finally:
            server.resume()
        resumed = time.monotonic()
        while True:
            found = reader.batch_get(Item, [{"key": f"k{i}"} for i in range(20)])
            stale = [o.key for o in found if o is not None and o.payload == "v1"]
            if not stale:
                break
            assert time.monotonic() - resumed < 0.3 + 1.0, f"{len(stale)} keys still stale: {stale[:5]}"
            time.sleep(0.02)
        # and it stays that way: nothing brings v1 back
        time.sleep(0.5)
        found = reader.batch_get(Item, [{"key": f"k{i}"} for i in range(20)])
        assert all(o is None or o.payload == "v2" for o in found)
        reader.release()
    finally:
        writer.kill()
        writer.wait()


class _RescheduledWhileRepairing:
    """A chain whose first repair pass overlaps a failed write: it is scheduled again while it runs.

    That pass saw nothing pending (the write's replay had taken the list) and
    reports none; the write then failed and remembered its invalidation.  The
    thread must repair the chain again rather than forget it.
    """

    retry_interval = 0.01

    def __init__(self, thread: RepairThread) -> None:
        self.thread = thread
        self.passes = 0
        self.repaired = threading.Event()

    def repair(self) -> bool:
        self.passes += 1
        if self.passes == 1:
            self.thread.schedule(self)  # the failed write, concurrent with this pass
            return False
        self.repaired.set()
        return False


def test_a_chain_scheduled_again_during_its_repair_is_repaired_again() -> None:
    thread = RepairThread()
    chain = _RescheduledWhileRepairing(thread)
    thread.schedule(chain)
    assert chain.repaired.wait(10), f"the chain was dropped after {chain.passes} pass(es)"
    time.sleep(0.1)
    assert chain.passes == 2  # then it is done: nothing more was scheduled


def _stale_after_a_partition(server: Any, namespace: str, retry_interval: float) -> tuple[ChainedStore, MemcacheStore]:
    """A chain whose memcached layer missed the write of v2 (remembered), and v1 there (another process's write)."""
    memcache = MemcacheStore([server.address], namespace=namespace, **QUICK)
    chain = ChainedStore([ProcessMemoryStore(), memcache], retry_interval=retry_interval)
    chain.put(Item("r", 1, 2, "v1"))
    server.pause()
    try:
        with pytest.raises(StoreError):
            chain.put(Item("r", 1, 2, "v2"))
    finally:
        server.resume()
    assert chain.stats()[1].pending_invalidations == 1
    reader = MemcacheStore([server.address], namespace=namespace)
    time.sleep(0.2)  # memcached works off the frozen requests first
    reader.put(Item("r", 1, 2, "v1"))
    return chain, reader


def test_release_applies_the_pending_invalidations_once_more_and_ends_the_repairs(memcached_factory: Any) -> None:
    server = memcached_factory.one()
    # the repair thread would wait a minute: only release() can have applied the invalidation
    chain, reader = _stale_after_a_partition(server, "release-repairs", retry_interval=60)
    assert repairs.scheduled(chain)
    chain.release()
    assert reader.get(Item, {"key": "r"}) is None
    assert chain.stats()[1].pending_invalidations == 0
    assert not repairs.scheduled(chain)
    reader.release()


def test_a_chain_released_during_an_outage_says_what_it_leaves_and_is_no_longer_retried(
    memcached_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = memcached_factory.one()
    chain, reader = _stale_after_a_partition(server, "release-outage", retry_interval=60)
    server.pause()
    try:
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="stockpyle.chained"):
            chain.release()
        assert time.monotonic() - began < 2  # one attempt, bounded by the layer's timeouts
    finally:
        server.resume()
    assert "released with 1 invalidation still pending" in caplog.text
    assert not repairs.scheduled(chain)
    reader.release()


def test_an_asyncio_chain_applies_the_pending_invalidations_on_release(memcached_factory: Any) -> None:
    server = memcached_factory.one()
    reader = MemcacheStore([server.address], namespace="release-async")

    async def scenario() -> None:
        memcache = AsyncMemcacheStore([server.address], namespace="release-async", **QUICK)
        chain = AsyncChainedStore([ProcessMemoryStore(), memcache], retry_interval=60)
        await chain.put(Item("r", 1, 2, "v1"))
        server.pause()
        try:
            with pytest.raises(StoreError):
                await chain.put(Item("r", 1, 2, "v2"))
        finally:
            server.resume()
        assert chain.stats()[1].pending_invalidations == 1
        await asyncio.sleep(0.2)  # memcached works off the frozen requests first
        reader.put(Item("r", 1, 2, "v1"))  # another process's write of the old value
        await chain.release()  # the repair task would wait a minute
        assert chain.stats()[1].pending_invalidations == 0

    asyncio.run(scenario())
    assert reader.get(Item, {"key": "r"}) is None
    reader.release()
