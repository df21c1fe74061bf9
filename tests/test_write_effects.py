"""The pieces issue 11 added around the SQLAlchemy integration, one by one.

* :class:`~stockpyle.effects.WriteEffects` as a chain applies it (order,
  failures of a cache layer, objects a layer cannot hold);
* ``invalidate_class`` of the in-process stores and of a chain;
* the version rule: only ``int`` versions order writes;
* :func:`stockpyle.serializers.register_reducer` and the cached form of ORM
  objects in serialized layers;
* rows the database itself changes (``ON DELETE CASCADE``) and children whose
  foreign key a flush sets.
"""

from __future__ import annotations

import datetime as dt
import logging
import pickle
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, undefer
from sqlalchemy.orm import sessionmaker as sa_sessionmaker
from support.databases import MYSQL_TABLE_ARGS, create_tables, drop_tables, empty_tables, table_name
from support.orm_models import Account, Author, Book, orm_metadata

from stockpyle import BaseDictionaryStore, ChainedStore, ProcessMemoryStore, ThreadLocalStore
from stockpyle.consistency import entry_refuses
from stockpyle.effects import WriteEffects
from stockpyle.exceptions import RelationshipNotCachedError, ValueTooLargeError
from stockpyle.ext.sqlalchemy import StockpyleSessionExtension, sessionmaker
from stockpyle.serializers import Codec, JSONSerializer, PickleSerializer
from stockpyle.stores.memcache import MemcacheStore
from stockpyle.stores.sqlalchemy import SqlAlchemyStore


class Item:
    __stockpyle_keys__: ClassVar[list[str]] = ["key"]

    def __init__(self, key: str, value: Any = None) -> None:
        self.key = key
        self.value = value


class Special(Item):
    """A subclass: invalidating ``Item`` drops it too."""


class Other:
    __stockpyle_keys__: ClassVar[list[str]] = ["key"]

    def __init__(self, key: str) -> None:
        self.key = key


class Recorder(ProcessMemoryStore):
    """Process memory that also records the calls it receives, in order."""

    def __init__(self, calls: list[str], name: str, **options: Any) -> None:
        super().__init__(**options)
        self.calls = calls
        self.name = name

    def invalidate_class(self, klass: type) -> None:
        self.calls.append(f"{self.name} invalidate_class {klass.__name__}")
        super().invalidate_class(klass)

    def batch_delete(self, objs: Any) -> None:
        items = list(objs)
        self.calls.append(f"{self.name} batch_delete {[o.key for o in items]}")
        super().batch_delete(items)

    def batch_put(self, objs: Any) -> None:
        items = list(objs)
        self.calls.append(f"{self.name} batch_put {[o.key for o in items]}")
        super().batch_put(items)


class Ledger(ProcessMemoryStore):
    """A system of record that reports the effects of its writes (a store of the reporting kind).

    A put of ``Item("parent")`` also "cascades" to ``Item("child")``; a delete
    of anything removes ``Item("old")`` and invalidates every ``Other``.
    """

    reports_effects: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, action: Any, objs: Sequence[object]) -> WriteEffects:
        self.writes.append(action)
        items = list(objs)
        if action == "put":
            super().batch_put(items)
            extra = [Item("child", "from the cascade")] if any(getattr(o, "key", "") == "parent" for o in items) else []
            return WriteEffects(stored=(*items, *extra), removed=())
        super().batch_delete(items)
        return WriteEffects(stored=(), removed=(*items, Item("old")), classes=frozenset({Other}))


# ---------------------------------------------------------------------------
# the chain applies reported effects


def test_a_chain_applies_effects_bottom_up_classes_then_removed_then_stored() -> None:
    calls: list[str] = []
    top, middle = Recorder(calls, "L1"), Recorder(calls, "L2")
    ledger = Ledger()
    chain = ChainedStore([top, middle, ledger])
    chain.put(Item("parent", 1))
    assert ledger.writes == ["put"]
    assert calls == ["L2 batch_put ['parent', 'child']", "L1 batch_put ['parent', 'child']"]
    assert top.get(Item, {"key": "child"}).value == "from the cascade"  # type: ignore[union-attr]
    calls.clear()
    top.put(Other("o"))
    top.put(Item("old"))
    chain.delete(Item("parent"))
    assert calls == [
        "L1 invalidate_class Other",
        "L2 invalidate_class Other",
        "L2 batch_delete ['parent', 'old']",
        "L1 batch_delete ['parent', 'old']",
    ]
    assert top.get(Other, {"key": "o"}) is None
    assert top.get(Item, {"key": "old"}) is None
    assert chain.stats().puts == 1 and chain.stats().deletes == 1


def test_a_failing_layer_gets_what_it_missed_when_it_answers_again(memcached_factory: Any) -> None:
    server = memcached_factory.one()
    memcache = MemcacheStore([server.address], namespace="effects")
    memory = ProcessMemoryStore()
    chain = ChainedStore([memory, memcache, Ledger()], cooldown=0.0)
    memcache.put(Item("old", "stale"))
    server.pause()  # frozen: every call times out
    try:
        chain.delete(Item("parent"))  # the layer misses the delete of "old" ...
    finally:
        server.resume()
    assert chain.stats()[1].errors >= 1
    chain.get(Item, {"key": "anything"})  # ... and gets it before it serves anything again
    assert memcache.get(Item, {"key": "old"}) is None
    memcache.release()


def test_an_object_a_layer_cannot_hold_is_invalidated_there_and_reported(memcached_server: Any) -> None:
    memcache = MemcacheStore([memcached_server.address], namespace=f"big-{uuid.uuid4().hex[:8]}", max_item_size=2048)
    memory = ProcessMemoryStore()
    chain = ChainedStore([memory, memcache, Ledger()])
    memory.put(Item("parent", "old"))
    memcache.put(Item("parent", "old"))
    with pytest.raises(ValueTooLargeError, match="cache layer 1"):
        chain.put(Item("parent", "x" * 10_000))
    assert memory.get(Item, {"key": "parent"}) is None
    assert memcache.get(Item, {"key": "parent"}) is None
    memcache.release()


# ---------------------------------------------------------------------------
# invalidate_class


@pytest.mark.parametrize("make", [ProcessMemoryStore, ThreadLocalStore, lambda: ProcessMemoryStore(polymorphic=True)])
def test_invalidate_class_drops_the_class_and_its_subclasses_only(make: Any) -> None:
    store = make()
    store.batch_put([Item("a"), Special("b"), Other("c")])
    store.invalidate_class(Item)
    assert store.get(Item, {"key": "a"}) is None
    assert store.get(Special, {"key": "b"}) is None
    if store.polymorphic:
        assert store.get(Item, {"key": "b"}) is None  # the base-class index went too
    assert store.get(Other, {"key": "c"}) is not None
    store.put(Item("a"))
    assert store.get(Item, {"key": "a"}) is not None


def test_thread_local_store_invalidates_the_class_in_every_thread() -> None:
    """A class-wide invalidation must reach every thread's copies, not only the caller's."""
    store = ThreadLocalStore()
    store.put(Item("mine"))
    seen: list[Any] = []

    def other() -> None:
        store.put(Item("theirs"))
        store.invalidate_class(Item)
        seen.append(store.get(Item, {"key": "theirs"}))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [None]
    assert store.get(Item, {"key": "mine"}) is None


def test_chain_invalidate_class_reports_layers_that_cannot(caplog: pytest.LogCaptureFixture) -> None:
    memory = ProcessMemoryStore()
    dictionary = BaseDictionaryStore({})  # declares no supports_class_invalidation
    chain = ChainedStore([memory, dictionary])
    chain.put(Item("a"))
    with caplog.at_level(logging.ERROR, logger="stockpyle.chained"):
        chain.invalidate_class(Item)
    assert memory.get(Item, {"key": "a"}) is None
    assert chain.stats()[1].errors == 1
    assert "cannot invalidate every cached Item" in caplog.text


def test_chain_invalidate_class_reaches_memcached_in_every_process(memcached_server: Any) -> None:
    namespace = f"ic-{uuid.uuid4().hex[:8]}"
    memcache = MemcacheStore([memcached_server.address], namespace=namespace, generation_check=0.2)
    other = MemcacheStore([memcached_server.address], namespace=namespace, generation_check=0.2)
    chain = ChainedStore([ProcessMemoryStore(), memcache])
    chain.put(Item("a"))
    assert other.get(Item, {"key": "a"}) is not None
    chain.invalidate_class(Item)
    assert memcache.get(Item, {"key": "a"}) is None  # at once in this process
    time.sleep(0.3)
    assert other.get(Item, {"key": "a"}) is None  # within generation_check in another
    assert chain.stats()[1].errors == 0
    memcache.release()
    other.release()


# ---------------------------------------------------------------------------
# the version rule


def test_only_int_versions_order() -> None:
    assert entry_refuses(1, 2)
    assert not entry_refuses(2, 1)
    assert not entry_refuses(2, 2)
    first, second = sorted([uuid.uuid4(), uuid.uuid4()])
    assert not entry_refuses(first, second) and not entry_refuses(second, first)
    assert not entry_refuses(dt.datetime(2020, 1, 1), dt.datetime(2021, 1, 1))
    assert not entry_refuses(Decimal(1), Decimal(2))
    assert not entry_refuses(False, True)
    assert not entry_refuses(1, True) and not entry_refuses(True, 2)
    assert not entry_refuses("a", "b")
    assert not entry_refuses(None, 1) and not entry_refuses(1, None)


# ---------------------------------------------------------------------------
# ORM objects in serialized layers


@pytest.fixture
def orm_db(sqlite_url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sqlite_url)
    create_tables(engine, orm_metadata)
    yield engine
    drop_tables(engine, orm_metadata)
    engine.dispose()


def test_serialized_orm_entries_hold_class_and_columns_only(orm_db: sa.Engine) -> None:
    store = SqlAlchemyStore(engine=orm_db)
    store.put(Author(id=1, email="a@x", name="ada", bio="b", books=[Book(id=1, title="t")]))
    with sa_sessionmaker(orm_db)() as session:
        loaded = session.get(Author, 1, options=[undefer(Author.bio)])
        assert loaded is not None
        assert [b.id for b in loaded.books] == [1]  # eagerly loaded into the instance
    codec = Codec()
    data = codec.dumps(loaded)
    assert b"_sa_instance_state" not in data
    assert b"book" not in data.lower()
    copy = codec.loads(data)
    state = sa.inspect(copy)
    assert state.detached and not state.modified
    assert (copy.id, copy.email, copy.name, copy.bio) == (1, "a@x", "ada", "b")
    with pytest.raises(RelationshipNotCachedError):
        copy.books
    # a plain pickle of a cached copy works too (the guard pickles)
    again = pickle.loads(pickle.dumps(store.get(Author, {"id": 1})))
    with pytest.raises(RelationshipNotCachedError):
        again.books
    # modified or new objects pickle as SQLAlchemy does; other serializers are untouched
    loaded.name = "changed"
    assert b"_sa_instance_state" in codec.dumps(loaded)
    assert codec.loads(codec.dumps(Item("k", 1))).value == 1
    assert Codec(JSONSerializer()).loads(Codec(JSONSerializer()).dumps({"a": 1})) == {"a": 1}
    assert Codec(PickleSerializer(protocol=2)).loads(Codec(PickleSerializer(protocol=2)).dumps(copy)).id == 1


# ---------------------------------------------------------------------------
# rows the database changes itself, children whose foreign key a flush sets


class CascadeBase(DeclarativeBase):
    pass


class Shelf(CascadeBase):
    __tablename__ = table_name("fx_shelf")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    # a one-directional collection: appending sets the child's key during the flush
    slots: Mapped[list[Slot]] = relationship()
    # rows the database deletes by itself
    labels: Mapped[list[Label]] = relationship(cascade="all", passive_deletes=True)


class Slot(CascadeBase):
    __tablename__ = table_name("fx_slot")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    shelf_id: Mapped[int | None] = mapped_column(sa.ForeignKey(Shelf.id))


class Label(CascadeBase):
    __tablename__ = table_name("fx_label")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    shelf_id: Mapped[int] = mapped_column(sa.ForeignKey(Shelf.id, ondelete="CASCADE"))


@pytest.fixture(scope="module")
def cascade_engine(module_engine: sa.Engine) -> Iterator[sa.Engine]:
    if module_engine.dialect.name == "sqlite":

        @sa.event.listens_for(module_engine, "connect")
        def _foreign_keys(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.execute("PRAGMA foreign_keys=ON")

        module_engine.dispose()  # new connections get the pragma
    create_tables(module_engine, CascadeBase.metadata)
    yield module_engine
    drop_tables(module_engine, CascadeBase.metadata)


@pytest.fixture
def cascade_db(cascade_engine: sa.Engine) -> sa.Engine:
    empty_tables(cascade_engine, CascadeBase.metadata)
    return cascade_engine


def test_on_delete_cascade_invalidates_the_children_class(cascade_db: sa.Engine) -> None:
    with sa_sessionmaker(cascade_db)() as session:
        session.add_all([Shelf(id=1), Shelf(id=2)])
        session.flush()
        session.add_all([Label(id=1, shelf_id=1), Label(id=2, shelf_id=2)])
        session.commit()
    memory = ProcessMemoryStore()
    chain = ChainedStore([memory, SqlAlchemyStore(engine=cascade_db)])
    assert chain.get(Label, {"id": 1}) is not None
    chain.delete(chain.get(Shelf, {"id": 1}))  # the database deletes label 1 by itself
    with sa_sessionmaker(cascade_db)() as session:
        assert session.get(Label, 1) is None
    assert memory.get(Label, {"id": 1}) is None
    # and through a session
    assert chain.get(Label, {"id": 2}) is not None
    ext = StockpyleSessionExtension(store=memory)
    with sessionmaker(extension=ext, bind=cascade_db)() as session:
        session.execute(sa.delete(Shelf).where(Shelf.id == 2))
        session.commit()
    assert memory.get(Label, {"id": 2}) is None
    assert ext.errors == 0


def test_children_whose_key_a_flush_sets_are_re_cached(cascade_db: sa.Engine) -> None:
    with sa_sessionmaker(cascade_db)() as session:
        session.add_all([Shelf(id=1), Slot(id=1)])
        session.commit()
    memory = ProcessMemoryStore()
    chain = ChainedStore([memory, SqlAlchemyStore(engine=cascade_db)])
    assert chain.get(Slot, {"id": 1}).shelf_id is None  # type: ignore[union-attr]
    ext = StockpyleSessionExtension(store=memory)
    with sessionmaker(extension=ext, bind=cascade_db)() as session:
        shelf = session.get(Shelf, 1)
        assert shelf is not None
        shelf.slots.append(session.get(Slot, 1))  # type: ignore[arg-type]
        session.commit()
    cached = memory.get(Slot, {"id": 1})
    assert cached is None or cached.shelf_id == 1


def test_a_store_without_invalidate_class_is_reported_by_the_extension(
    orm_db: sa.Engine, memcached_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    memcache = BaseDictionaryStore({})  # declares no supports_class_invalidation
    ext = StockpyleSessionExtension(store=memcache)
    with (
        caplog.at_level(logging.ERROR, logger="stockpyle.ext.sqlalchemy"),
        sessionmaker(extension=ext, bind=orm_db)() as session,
    ):
        session.add(Account(id=1, name="a"))
        session.commit()
        session.execute(sa.text(f"UPDATE {Account.__tablename__} SET balance = 3"))
        session.commit()
    assert ext.errors == 1
    assert "invalidate every cached Account" in caplog.text
    memcache.release()
