"""Deterministic race interleavings through [process memory, memcached, PostgreSQL].

Each test forces one interleaving with :class:`threading.Event` gates inside a
thin subclass of the real :class:`~stockpyle.SqlAlchemyStore` (it pauses a
named thread right after its database read or write), then checks that every
cache layer ends up agreeing with the database.  Real memcached and real
PostgreSQL; no sleeps deciding the order.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support.databases import create_tables, drop_tables, make_engine, table_name

from stockpyle import ChainedStore, MemcacheStore, ProcessMemoryStore, SqlAlchemyStore
from stockpyle.keys import version_of

pytestmark = [pytest.mark.memcache, pytest.mark.postgres]

WAIT = 10.0  # seconds any gate may wait before the test fails instead of hanging


class RaceBase(DeclarativeBase):
    """Tables of this module only."""


class Article(RaceBase):
    """An unversioned row: keyed by its primary key (resolver)."""

    __tablename__ = table_name("race_article")

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    payload: Mapped[str] = mapped_column(sa.String(200))

    def __init__(self, id: str, payload: str) -> None:
        self.id = id
        self.payload = payload


class VersionedArticle(RaceBase):
    """A row with an SQLAlchemy version counter: versioned in every store through the resolver."""

    __tablename__ = table_name("race_versioned")

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    payload: Mapped[str] = mapped_column(sa.String(200))
    version: Mapped[int] = mapped_column(sa.Integer, nullable=False)

    __mapper_args__: ClassVar[dict[str, Any]] = {"version_id_col": version}

    def __init__(self, id: str, payload: str) -> None:
        self.id = id
        self.payload = payload


class Gate:
    """Pauses one thread at one point until the test lets it go."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()

    def pause(self) -> None:
        self.reached.set()
        if not self.go.wait(WAIT):
            raise AssertionError("gate was never opened")

    def wait_reached(self) -> None:
        assert self.reached.wait(WAIT), "the paused thread never reached its gate"


class GatedSqlStore(SqlAlchemyStore):
    """The real SqlAlchemyStore, pausing chosen threads right after a database read or write."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.gates: dict[tuple[str, str], Gate] = {}

    def gate(self, thread_name: str, operation: str) -> Gate:
        gate = self.gates[(thread_name, operation)] = Gate()
        return gate

    def _after(self, operation: str) -> None:
        gate = self.gates.pop((threading.current_thread().name, operation), None)
        if gate is not None:
            gate.pause()

    def get(self, klass: Any, keydict: Any) -> Any:
        found = super().get(klass, keydict)
        self._after("get")
        return found

    def batch_get(self, klass: Any, keydicts: Any) -> Any:
        found = super().batch_get(klass, keydicts)
        self._after("batch_get")
        return found

    def put(self, obj: object) -> None:
        super().put(obj)  # committed: the caches have not been written yet
        self._after("put")

    def write(self, action: Any, objs: Any) -> Any:
        # what a ChainedStore calls (the store reports its effects)
        effects = super().write(action, objs)  # committed: the caches have not been written yet
        if action == "put":
            self._after("put")
        return effects


@pytest.fixture(scope="module")
def race_engine(postgres_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(postgres_url)
    create_tables(engine, RaceBase.metadata)
    try:
        yield engine
    finally:
        drop_tables(engine, RaceBase.metadata)
        engine.dispose()


class Layers:
    """One chain plus direct handles on its layers."""

    def __init__(self, engine: sa.Engine, address: str) -> None:
        self.namespace = "race" + uuid.uuid4().hex[:10]
        self.address = address
        self.l1 = ProcessMemoryStore()
        self.l2 = MemcacheStore([address], namespace=self.namespace)
        self.sor = GatedSqlStore(engine=engine)
        self.chain = ChainedStore([self.l1, self.l2, self.sor])
        self.others: list[MemcacheStore] = []

    def other_process(self) -> ChainedStore:
        """The same memcached and database seen from a process with an empty L1."""
        other = MemcacheStore([self.address], namespace=self.namespace)
        self.others.append(other)
        return ChainedStore([ProcessMemoryStore(), other, self.sor])

    def release(self) -> None:
        for store in [self.l2, *self.others]:
            store.release()

    def assert_caches_match_database(self, klass: type, ident: str) -> None:
        truth = self.sor.get(klass, {"id": ident})
        for name, layer in (("process memory", self.l1), ("memcached", self.l2)):
            cached = layer.get(klass, {"id": ident})
            if truth is None:
                assert cached is None, f"{name} holds {cached.payload!r}; the database has no row"
            elif cached is not None:  # a miss is always consistent
                assert (cached.payload, version_of(cached)) == (truth.payload, version_of(truth)), name
        seen = self.other_process().get(klass, {"id": ident})
        assert (None if seen is None else seen.payload) == (None if truth is None else truth.payload)


@pytest.fixture
def layers(race_engine: sa.Engine, memcached_server: Any) -> Iterator[Layers]:
    made = Layers(race_engine, memcached_server.address)
    yield made
    made.release()


def run_in_thread(name: str, target: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Start ``target`` in a thread called ``name``; its result (or exception) lands in the list."""
    out: list[Any] = []

    def body() -> None:
        try:
            out.append(target())
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            out.append(exc)

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    return thread, out


def finish(thread: threading.Thread, out: list[Any]) -> Any:
    thread.join(WAIT)
    assert not thread.is_alive(), "thread did not finish"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def reader(layers: Layers, klass: type, ident: str, batch: bool) -> Callable[[], Any]:
    if batch:
        return lambda: layers.chain.batch_get(klass, [{"id": ident}])[0]
    return lambda: layers.chain.get(klass, {"id": ident})


@pytest.mark.parametrize("batch", [False, True], ids=["get", "batch_get"])
def test_reader_misses_writer_writes_reader_backfills_old_value(layers: Layers, batch: bool) -> None:
    ident = uuid.uuid4().hex
    layers.sor.put(Article(ident, "v1"))  # in the database only
    gate = layers.sor.gate("reader", "batch_get" if batch else "get")
    thread, out = run_in_thread("reader", reader(layers, Article, ident, batch))
    gate.wait_reached()  # the reader holds v1 from the database and has not back-filled
    layers.chain.put(Article(ident, "v2"))  # database, memcached, process memory
    gate.go.set()
    assert finish(thread, out).payload == "v1"  # the reader returns what it read...
    # ...but its back-fill lost: every layer holds v2, like the database
    assert layers.l2.get(Article, {"id": ident}).payload == "v2"  # type: ignore[union-attr]
    assert layers.l1.get(Article, {"id": ident}).payload == "v2"  # type: ignore[union-attr]
    layers.assert_caches_match_database(Article, ident)


@pytest.mark.parametrize("batch", [False, True], ids=["get", "batch_get"])
def test_reader_misses_writer_deletes_reader_backfills(layers: Layers, batch: bool) -> None:
    ident = uuid.uuid4().hex
    layers.sor.put(Article(ident, "v1"))
    gate = layers.sor.gate("reader", "batch_get" if batch else "get")
    thread, out = run_in_thread("reader", reader(layers, Article, ident, batch))
    gate.wait_reached()
    layers.chain.delete(layers.sor.get(Article, {"id": ident}))  # tombstones in both caches
    gate.go.set()
    assert finish(thread, out).payload == "v1"
    # the back-fill did not resurrect the deleted row, in either cache
    assert layers.l2.get(Article, {"id": ident}) is None
    assert layers.l1.get(Article, {"id": ident}) is None
    assert layers.chain.get(Article, {"id": ident}) is None
    layers.assert_caches_match_database(Article, ident)


def test_two_writers_cache_updates_arrive_in_opposite_order(layers: Layers) -> None:
    ident = uuid.uuid4().hex
    layers.sor.put(VersionedArticle(ident, "v1"))
    assert version_of(layers.sor.get(VersionedArticle, {"id": ident})) == 1
    gate = layers.sor.gate("writer-a", "put")

    def write_a() -> None:
        mine = layers.sor.get(VersionedArticle, {"id": ident})
        mine.payload = "from A"
        layers.chain.put(mine)  # commits version 2, then pauses before the caches

    thread, out = run_in_thread("writer-a", write_a)
    gate.wait_reached()
    # writer B reads A's committed version 2, writes version 3 and updates the caches first
    theirs = layers.sor.get(VersionedArticle, {"id": ident})
    assert (theirs.payload, theirs.version) == ("from A", 2)
    theirs.payload = "from B"
    layers.chain.put(theirs)
    assert theirs.version == 3
    gate.go.set()  # A's cache updates (version 2) arrive last
    finish(thread, out)
    for layer in (layers.l1, layers.l2):
        cached = layer.get(VersionedArticle, {"id": ident})
        assert (cached.payload, cached.version) == ("from B", 3)  # type: ignore[union-attr]
    layers.assert_caches_match_database(VersionedArticle, ident)


def test_late_versioned_put_after_a_delete_is_refused_by_the_tombstone(layers: Layers) -> None:
    """Writer A commits v2; B deletes the row (tombstone records v2); A's memcached update comes last."""
    ident = uuid.uuid4().hex
    layers.sor.put(VersionedArticle(ident, "v1"))
    gate = layers.sor.gate("writer-a", "put")

    def write_a() -> None:
        mine = layers.sor.get(VersionedArticle, {"id": ident})
        mine.payload = "from A"
        # memcached only: see the report about process-memory tombstones and versions
        ChainedStore([layers.l2, layers.sor]).put(mine)

    thread, out = run_in_thread("writer-a", write_a)
    gate.wait_reached()
    ChainedStore([layers.l2, layers.sor]).delete(layers.sor.get(VersionedArticle, {"id": ident}))
    gate.go.set()
    finish(thread, out)
    assert layers.sor.get(VersionedArticle, {"id": ident}) is None
    assert layers.l2.get(VersionedArticle, {"id": ident}) is None


def test_many_interleaved_versioned_writers_converge_on_the_database(layers: Layers) -> None:
    """Eight threads race read-modify-write through the chain; losers get the database's refusal."""
    from stockpyle.exceptions import StoreError

    ident = uuid.uuid4().hex
    layers.sor.put(VersionedArticle(ident, "start"))
    start = threading.Barrier(8)
    refused: list[int] = []

    def work(n: int) -> None:
        start.wait(WAIT)
        for step in range(10):
            obj = layers.sor.get(VersionedArticle, {"id": ident})
            obj.payload = f"w{n}s{step}"
            try:
                layers.chain.put(obj)
            except StoreError:  # optimistic concurrency: another writer committed first
                refused.append(n)

    threads = [threading.Thread(target=work, args=(n,), name=f"w{n}") for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    truth = layers.sor.get(VersionedArticle, {"id": ident})
    assert truth.version == 1 + 80 - len(refused)
    for layer in (layers.l1, layers.l2):
        cached = layer.get(VersionedArticle, {"id": ident})
        assert cached is None or (cached.payload, cached.version) == (truth.payload, truth.version)
    layers.assert_caches_match_database(VersionedArticle, ident)
