"""One read of the system of record per cold key: single flight in process, get_or_create."""

from __future__ import annotations

import itertools
import os
import threading
import time
import warnings
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support.databases import QueryCounter, create_tables, drop_tables, table_name
from support.memcached import fresh_namespace

from stockpyle import ChainedStore, LeaseTimeoutError, MemcacheStore, ProcessMemoryStore, Stampede
from stockpyle.exceptions import ConfigurationError
from stockpyle.stampede import SingleFlight
from stockpyle.stores.sqlalchemy import SqlAlchemyStore
from stockpyle.testing import Item


class HerdBase(DeclarativeBase):
    pass


class Product(HerdBase):
    __tablename__ = table_name("herd_product")
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(40))


class SlowStore(SqlAlchemyStore):
    """A real database whose reads take 200 ms (a heavy query)."""

    def get(self, klass: Any, keydict: Any) -> Any:
        time.sleep(0.2)
        return super().get(klass, keydict)


def _herd(chain: ChainedStore, threads: int) -> list[Any]:
    barrier = threading.Barrier(threads)
    results: list[Any] = []

    def read() -> None:
        barrier.wait()
        results.append(chain.get(Product, {"id": 1}))

    workers = [threading.Thread(target=read) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


@pytest.mark.memcache
def test_thirty_two_cold_reads_send_one_select(engine: sa.Engine, make_memcache_store: Any) -> None:
    create_tables(engine, HerdBase.metadata)
    try:
        with engine.begin() as connection:
            connection.execute(sa.insert(Product), [{"id": 1, "name": "widget"}])
        memcache = make_memcache_store()
        chain = ChainedStore([ProcessMemoryStore(), memcache, SlowStore(engine=engine)], bus=None)
        with QueryCounter(engine, selects_only=True) as queries:
            results = _herd(chain, 32)
        assert [r.name for r in results] == ["widget"] * 32
        assert queries.count == 1
        stats = chain.stats()
        assert (stats[0].backfills, stats[1].backfills) == (1, 1)  # one back-fill per cache layer
        assert chain._flights.shared == 31
    finally:
        drop_tables(engine, HerdBase.metadata)


def test_without_protection_every_reader_reads(engine: sa.Engine) -> None:
    create_tables(engine, HerdBase.metadata)
    try:
        with engine.begin() as connection:
            connection.execute(sa.insert(Product), [{"id": 1, "name": "widget"}])
        chain = ChainedStore([ProcessMemoryStore(), SlowStore(engine=engine)], bus=None, stampede=None)
        with QueryCounter(engine, selects_only=True) as queries:
            _herd(chain, 8)
        assert queries.count == 8
    finally:
        drop_tables(engine, HerdBase.metadata)


class Gated(ProcessMemoryStore):
    """A system of record whose reads wait for the test to open a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.reads = 0

    def get(self, klass: Any, keydict: Any) -> Any:
        self.reads += 1
        self.gate.wait(5)
        return super().get(klass, keydict)


@pytest.mark.parametrize(("on_timeout", "expected"), [("miss", None), ("load", "v1")])
def test_a_reader_that_waits_too_long_follows_on_timeout(on_timeout: str, expected: Any) -> None:
    sor = Gated()
    sor.put(Item("k", 1, 1, "v1"))
    chain = ChainedStore(
        [ProcessMemoryStore(), sor],
        bus=None,
        stampede=Stampede(wait=0.1, on_timeout=on_timeout),  # type: ignore[arg-type]
    )
    leader = threading.Thread(target=lambda: chain.get(Item, {"key": "k"}))
    leader.start()
    time.sleep(0.05)
    if on_timeout == "load":
        threading.Timer(0.3, sor.gate.set).start()  # the follower's own read finishes later
    found = chain.get(Item, {"key": "k"})
    assert (found.payload if found is not None else None) == expected
    sor.gate.set()
    leader.join()


def test_on_timeout_raise() -> None:
    sor = Gated()
    sor.put(Item("k", 1, 1, "v1"))
    chain = ChainedStore([ProcessMemoryStore(), sor], bus=None, stampede=Stampede(wait=0.05, on_timeout="raise"))
    leader = threading.Thread(target=lambda: chain.get(Item, {"key": "k"}))
    leader.start()
    time.sleep(0.05)
    with pytest.raises(LeaseTimeoutError, match=r"waited 0\.05s"):
        chain.get(Item, {"key": "k"})
    sor.gate.set()
    leader.join()
    assert isinstance(LeaseTimeoutError("x"), TimeoutError)


def test_a_failed_flight_lets_every_reader_try_for_itself() -> None:
    class Flaky(ProcessMemoryStore):
        calls = 0

        def get(self, klass: Any, keydict: Any) -> Any:
            type(self).calls += 1
            if type(self).calls == 1:
                time.sleep(0.1)
                raise RuntimeError("the database hiccuped")
            return super().get(klass, keydict)

    sor = Flaky()
    sor.put(Item("k", 1, 1, "v1"))
    chain = ChainedStore([ProcessMemoryStore(), sor], bus=None)
    errors: list[BaseException] = []

    def lead() -> None:
        try:
            chain.get(Item, {"key": "k"})
        except RuntimeError as exc:
            errors.append(exc)

    leader = threading.Thread(target=lead)
    leader.start()
    time.sleep(0.02)
    assert chain.get(Item, {"key": "k"}).payload == "v1"  # type: ignore[union-attr]
    leader.join()
    assert len(errors) == 1


def test_a_forked_child_does_not_wait_for_a_flight_of_its_parent() -> None:
    """gunicorn --preload: a flight under way in the parent has no thread in the child to finish it."""
    flights = SingleFlight()
    inside, release = threading.Event(), threading.Event()

    def slow() -> str:
        inside.set()
        release.wait(10)
        return "the parent's"

    leader = threading.Thread(target=lambda: flights.run("k", slow, 10.0, lambda: "timed out"))
    leader.start()
    try:
        assert inside.wait(5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork() of a process with threads
            pid = os.fork()
        if pid == 0:  # the child: its own flight, at once, then leave
            code = 3
            try:
                began = time.monotonic()
                found = flights.run("k", lambda: "the child's", 5.0, lambda: "timed out")
                code = 0 if found == "the child's" and time.monotonic() - began < 1.0 else 1
            finally:
                os._exit(code)
        _pid, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        leader.join()


def test_followers_joining_as_flights_end_take_their_result_and_never_wait_out_the_timeout() -> None:
    """Many threads on a few keys, flights of microseconds: followers keep arriving just as leaders finish.

    A follower that makes its Event after the leader looked for one must find
    the flight gone and take its result; were it to wait, it would wait the
    whole timeout and be answered "timed out".
    """
    flights = SingleFlight()
    counter = itertools.count()
    threads, rounds = 8, 3000
    barrier = threading.Barrier(threads)
    wrong: list[Any] = []

    def load(key: int) -> tuple[int, int]:
        n = next(counter)
        if n % 2:
            time.sleep(0)  # let other threads in while this flight is under way
        return key, n

    def reader(n: int) -> None:
        barrier.wait()
        for i in range(rounds):
            key = i % 3
            found = flights.run(key, lambda key=key: load(key), 5.0, lambda: "timed out")
            if not (isinstance(found, tuple) and found[0] == key):
                wrong.append(found)

    workers = [threading.Thread(target=reader, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert wrong == []  # not one caller sat out a timeout ("timed out") or took another key's result
    assert flights.shared > 0  # followers did join flights under way
    assert next(counter) + flights.shared == threads * rounds  # every call loaded or shared, once


def test_get_or_create_calls_the_creator_once_for_a_herd() -> None:
    cache = ProcessMemoryStore()
    shared = ProcessMemoryStore()
    chain = ChainedStore([cache, shared], bus=None)
    calls: list[int] = []

    def create() -> Item:
        calls.append(1)
        time.sleep(0.2)
        return Item("k", 1, 2, "computed")

    barrier = threading.Barrier(16)
    results: list[Any] = []

    def read() -> None:
        barrier.wait()
        results.append(chain.get_or_create(Item, {"key": "k"}, create))

    workers = [threading.Thread(target=read) for _ in range(16)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(calls) == 1
    assert [r.payload for r in results] == ["computed"] * 16
    assert shared.get(Item, {"zap": 1, "bar": 2}).payload == "computed"  # type: ignore[union-attr]  # stored in every layer
    assert chain.get_or_create(Item, {"key": "k"}, create).payload == "computed"  # type: ignore[union-attr]
    assert len(calls) == 1
    assert chain.get_or_create(Item, {"key": "none"}, lambda: None) is None  # not stored


def test_get_or_create_refuses_an_object_the_lookup_does_not_find() -> None:
    chain = ChainedStore([ProcessMemoryStore()], bus=None)
    with pytest.raises(ConfigurationError, match="does not find"):
        chain.get_or_create(Item, {"key": "a"}, lambda: Item("b", 1, 1))
    assert chain.get(Item, {"key": "b"}) is None  # nothing stored


def test_get_or_create_over_a_system_of_record_puts(tmp_path: Any) -> None:
    from stockpyle import ShoveStore

    record = ShoveStore(uri=f"file://{tmp_path}/record")
    chain = ChainedStore([ProcessMemoryStore(), record], bus=None)
    chain.get_or_create(Item, {"key": "n"}, lambda: Item("n", 5, 5, "new"))
    assert record.get(Item, {"key": "n"}).payload == "new"  # type: ignore[union-attr]


def test_stampede_settings_are_validated() -> None:
    for bad in ({"lease": 0}, {"wait": -1}, {"on_timeout": "ignore"}, {"max_poll": 0}, {"leases": "yes"}):
        with pytest.raises(ConfigurationError, match="Stampede"):
            Stampede(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="stampede="):
        ChainedStore([ProcessMemoryStore()], stampede=5.0)  # type: ignore[arg-type]


def test_a_waiting_reader_never_pauses_longer_than_max_poll() -> None:
    """The jitter (+-50%) used to stretch a pause to 1.5 x max_poll once the pauses had grown to it."""
    policy = Stampede(max_poll=0.05)
    pauses = policy.pauses()
    seen = [next(pauses) for _ in range(2000)]
    assert max(seen) <= policy.max_poll
    assert min(seen) >= 0.001  # the first pause, 2 ms, less half of it
    assert max(seen) > 0.04  # they do grow to the cap


class CountingMemcacheStore(MemcacheStore):
    """A real MemcacheStore that counts the lease reads the chain makes of it."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.lease_reads = 0

    def lease_get(self, *args: Any, **kwargs: Any) -> Any:
        self.lease_reads += 1
        return super().lease_get(*args, **kwargs)


@pytest.mark.memcache
def test_an_l1_miss_reads_the_shared_layer_once_whatever_it_answers(engine: sa.Engine, memcached_factory: Any) -> None:
    # The chain's common read ([memory, memcached, database]) makes its first
    # lease_get outside the plan; the plan must take that answer over, never
    # read again: a second lease_get after a lease won would find the
    # reader's own lease and wait for itself.
    create_tables(engine, HerdBase.metadata)
    server = memcached_factory.one()
    try:
        with engine.begin() as connection:
            connection.execute(sa.insert(Product), [{"id": 1, "name": "widget"}])
        memory = ProcessMemoryStore()
        shared = CountingMemcacheStore(servers=[server.address], namespace=fresh_namespace())
        chain = ChainedStore([memory, shared, SqlAlchemyStore(engine=engine)], bus=None)
        with QueryCounter(engine, selects_only=True) as queries:
            # absent: the lease is won, the database read, memcached filled through the lease
            started = time.monotonic()
            assert chain.get(Product, {"id": 1}).name == "widget"
            assert time.monotonic() - started < 1.0  # it did not wait for its own lease
            assert (shared.lease_reads, queries.count) == (1, 1)
            stats = chain.stats()
            assert (stats.leases_won, stats.leases_lost, stats[1].misses) == (1, 0, 1)
            assert (stats[0].backfills, stats[1].backfills) == (1, 1)
            # a plain hit: counted in layer 1, back-filled into memory
            memory.clear()
            assert chain.get(Product, {"id": 1}).name == "widget"
            assert (shared.lease_reads, queries.count) == (2, 1)
            stats = chain.stats()
            assert (stats[1].hits, stats[0].backfills, stats[1].backfills) == (1, 2, 1)
            assert memory.get(Product, {"id": 1}) is not None
            # a failure: absorbed by the layer's breaker, the database answers
            memory.clear()
            server.stop()
            assert chain.get(Product, {"id": 1}).name == "widget"
            assert (shared.lease_reads, queries.count) == (3, 2)
            assert chain.stats()[1].errors == 2  # the read, and the back-fill after the database's answer
        shared.release()
    finally:
        drop_tables(engine, HerdBase.metadata)
