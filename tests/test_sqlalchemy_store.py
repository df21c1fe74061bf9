"""SqlAlchemyStore beyond the contract: lookups, batches, upserts, detached objects, errors, threads."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker
from support.databases import (
    MYSQL_TABLE_ARGS,
    QueryCounter,
    backend_of,
    create_tables,
    drop_tables,
    empty_tables,
    key_string,
    table_name,
)

from stockpyle import ChainedStore, ProcessMemoryStore
from stockpyle.exceptions import (
    ConfigurationError,
    NonUniqueKeyError,
    NotStorableError,
    StoreError,
    StoreUnavailableError,
    UnknownKeyError,
)
from stockpyle.keys import encode_key, key_model, object_keys
from stockpyle.stores.sqlalchemy import SqlAlchemyStore, mapped_key_specs

TESTS = Path(__file__).parent
ROOT = TESTS.parent


class Base(DeclarativeBase):
    pass


class Widget(Base):
    """Keyed by its primary key and unique NOT NULL ``sku`` (no __stockpyle_keys__)."""

    __tablename__ = table_name("widget")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    sku: Mapped[str] = mapped_column(sa.String(64), unique=True)
    name: Mapped[str] = mapped_column(sa.String(64))
    color: Mapped[str | None] = mapped_column(sa.String(20))
    nickname: Mapped[str | None] = mapped_column(sa.String(20), unique=True)  # nullable: not a key
    status: Mapped[str] = mapped_column(sa.String(20), server_default="fresh")


class Late(Base):
    """Server default the flush does not return (eager_defaults off): the store reloads it."""

    __tablename__ = table_name("late")
    __table_args__ = (MYSQL_TABLE_ARGS,)
    __mapper_args__: ClassVar[dict[str, Any]] = {"eager_defaults": False}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    label: Mapped[str] = mapped_column(sa.String(20), server_default="from-server")


class Pair(Base):
    """A composite primary key."""

    __tablename__ = table_name("pair")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    shop: Mapped[str] = mapped_column(sa.String(20), primary_key=True)
    sku: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    price: Mapped[int] = mapped_column(default=0)


class Parent(Base):
    __tablename__ = table_name("parent")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    children: Mapped[list[Child]] = relationship(cascade="all, delete-orphan", back_populates="parent")


class Child(Base):
    __tablename__ = table_name("child")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(sa.ForeignKey(Parent.id))
    parent: Mapped[Parent] = relationship(back_populates="children")


class Vehicle(Base):
    """Joined-table inheritance root."""

    __tablename__ = table_name("vehicle")
    __table_args__ = (MYSQL_TABLE_ARGS,)
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_on": "kind", "polymorphic_identity": "vehicle"}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(sa.String(20))
    wheels: Mapped[int] = mapped_column(default=4)


class Boat(Vehicle):
    __tablename__ = table_name("boat")
    __table_args__ = (MYSQL_TABLE_ARGS,)
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "boat"}

    id: Mapped[int] = mapped_column(sa.ForeignKey(Vehicle.id), primary_key=True)
    sails: Mapped[int] = mapped_column(default=1)


class Note:
    """A plain (unmapped) storable class."""

    __stockpyle_keys__: ClassVar[list[str]] = ["key"]

    def __init__(self, key: str) -> None:
        self.key = key


@pytest.fixture(scope="module")
def tables(module_engine: sa.Engine) -> Iterator[sa.Engine]:
    create_tables(module_engine, Base.metadata)
    yield module_engine
    drop_tables(module_engine, Base.metadata)


@pytest.fixture
def db(tables: sa.Engine) -> sa.Engine:
    empty_tables(tables, Base.metadata)
    return tables


@pytest.fixture
def store(db: sa.Engine) -> Iterator[SqlAlchemyStore]:
    with SqlAlchemyStore(engine=db) as built:
        yield built
    assert db.pool.checkedout() == 0, "the store left connections checked out"


def widget(sku: str, name: str = "w", **extra: Any) -> Widget:
    return Widget(sku=sku, name=name, **extra)


# ---------------------------------------------------------------------------
# construction


def test_exactly_one_source(tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'x.sqlite'}")
    with pytest.raises(ConfigurationError, match="exactly one of uri=, engine= or sessionmaker=; got none"):
        SqlAlchemyStore()
    with pytest.raises(ValueError, match="got uri and engine"):
        SqlAlchemyStore(uri="sqlite://", engine=engine)
    with pytest.raises(ConfigurationError, match="engine and sessionmaker"):
        SqlAlchemyStore(engine=engine, sessionmaker=sessionmaker(engine))
    with pytest.raises(TypeError):
        SqlAlchemyStore(uri="sqlite://", servers=["x"])  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        SqlAlchemyStore("sqlite://")  # type: ignore[misc]
    with pytest.raises(ConfigurationError, match="engine_options"):
        SqlAlchemyStore(engine=engine, engine_options={"echo": True})
    with pytest.raises(ConfigurationError, match="chunk_size"):
        SqlAlchemyStore(engine=engine, chunk_size=0)
    with pytest.raises(ConfigurationError, match="Engine"):
        SqlAlchemyStore(engine="sqlite://")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cannot use uri"):
        SqlAlchemyStore(uri="nosuchdialect://x")
    engine.dispose()


def test_seed_uri_form_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = SqlAlchemyStore(uri="sqlite:///data.sqlite")
    assert store.engine is not None
    Base.metadata.create_all(store.engine)
    obj = widget("seed-1", "from the seed")
    store.put(obj)
    found = store.get(Widget, {"sku": "seed-1"})
    assert found is not None
    assert (found.id, found.name, found.status) == (obj.id, "from the seed", "fresh")
    assert "sqlite:///data.sqlite" in repr(store)
    store.release()
    assert (tmp_path / "data.sqlite").exists()


def test_sessionmaker_and_scoped_session_sources(db: sa.Engine) -> None:
    maker = sessionmaker(db, expire_on_commit=True)
    from_maker = SqlAlchemyStore(sessionmaker=maker)
    obj = widget("m-1")
    from_maker.put(obj)
    # expire_on_commit=True in the user's factory does not expire returned objects
    assert obj.status == "fresh"
    scoped = sa.orm.scoped_session(maker)
    from_scoped = SqlAlchemyStore(sessionmaker=scoped)
    found = from_scoped.get(Widget, {"id": obj.id})
    assert found is not None
    assert found.sku == "m-1"
    assert from_scoped.engine is db
    scoped.remove()


def test_import_error_without_sqlalchemy() -> None:
    code = """
import sys
sys.modules['sqlalchemy'] = None
from stockpyle import *
import stockpyle, stockpyle.stores.sqlalchemy, stockpyle.ext.sqlalchemy
assert stockpyle.SqlAlchemyStore is stockpyle.stores.sqlalchemy.SqlAlchemyStore
for build in (lambda: stockpyle.SqlAlchemyStore(uri='sqlite://'),
              lambda: stockpyle.ext.sqlalchemy.StockpyleSessionExtension(store=ProcessMemoryStore())):
    try:
        build()
    except ImportError as exc:
        assert 'pip install stockpyle[sqlalchemy]' in str(exc), exc
    else:
        raise SystemExit('no ImportError')
print('ok')
"""
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_importing_stockpyle_does_not_import_sqlalchemy() -> None:
    code = "import sys\nfrom stockpyle import *\nimport stockpyle.stores.sqlalchemy\nprint('sqlalchemy' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# ---------------------------------------------------------------------------
# lookups


def test_primary_key_lookup_is_one_query(store: SqlAlchemyStore, db: sa.Engine) -> None:
    obj = widget("pk-1")
    store.put(obj)
    with QueryCounter(db, selects_only=True) as queries:
        found = store.get(Widget, {"id": obj.id})
    assert queries.count == 1
    assert found is not None
    assert (found.sku, found.status) == ("pk-1", "fresh")
    assert store.get(Widget, {"id": obj.id + 1000}) is None
    assert store.get(Widget, {"id": None}) is None


def test_any_combination_of_columns(store: SqlAlchemyStore, db: sa.Engine) -> None:
    store.batch_put([widget("a", "same", color="red"), widget("b", "same", color="blue")])
    with QueryCounter(db) as queries:
        found = store.get(Widget, {"name": "same", "color": "blue"})
    assert found is not None
    assert found.sku == "b"
    assert "LIMIT" in queries.statements[0].upper()
    assert store.get(Widget, {"name": "same", "color": "green"}) is None
    assert store.get(Widget, {"nickname": None, "sku": "a"}).sku == "a"  # type: ignore[union-attr]


def test_two_rows_raise_non_unique_key_error(store: SqlAlchemyStore) -> None:
    store.batch_put([widget("a", "same"), widget("b", "same")])
    with pytest.raises(NonUniqueKeyError) as caught:
        store.get(Widget, {"name": "same"})
    assert caught.value.klass is Widget
    assert caught.value.key == {"name": "same"}
    with pytest.raises(NonUniqueKeyError) as caught_batch:
        store.batch_get(Widget, [{"sku": "a"}, {"name": "same"}])
    assert caught_batch.value.klass is Widget
    assert caught_batch.value.key == {"name": "same"}


def test_unknown_column_is_a_clear_error(store: SqlAlchemyStore) -> None:
    with pytest.raises(UnknownKeyError, match=r"'colour'.*columns are: id, sku, name, color") as caught:
        store.get(Widget, {"colour": "red"})
    assert isinstance(caught.value, KeyError)
    with pytest.raises(UnknownKeyError, match="empty lookup"):
        store.get(Widget, {})
    with pytest.raises(TypeError, match="dict of column values"):
        store.get(Widget, ["id"])  # type: ignore[arg-type]


def test_lookups_are_type_faithful_without_database_errors(store: SqlAlchemyStore) -> None:
    obj = widget("42")
    store.put(obj)
    assert store.get(Widget, {"id": str(obj.id)}) is None  # a text value for an integer column
    assert store.get(Widget, {"sku": 42}) is None
    assert store.get(Widget, {"id": True}) is None
    assert store.get(Widget, {"id": float(obj.id)}) is None
    assert store.batch_get(Widget, [{"sku": 42}, {"sku": "42"}])[0] is None
    assert store.get(Widget, {"sku": "42"}) is not None


def test_composite_primary_key(store: SqlAlchemyStore, db: sa.Engine) -> None:
    store.batch_put([Pair(shop="a", sku=1, price=10), Pair(shop="a", sku=2, price=20), Pair(shop="b", sku=1)])
    found = store.get(Pair, {"sku": 2, "shop": "a"})
    assert found is not None
    assert found.price == 20
    with QueryCounter(db, selects_only=True) as queries:
        rows = store.batch_get(Pair, [{"shop": "b", "sku": 1}, {"shop": "z", "sku": 1}, {"sku": 1, "shop": "a"}])
    assert queries.count == 1
    assert [(r.shop, r.sku, r.price) if r else None for r in rows] == [("b", 1, 0), None, ("a", 1, 10)]


# ---------------------------------------------------------------------------
# batches


def test_batch_get_one_query_per_chunk(db: sa.Engine) -> None:
    store = SqlAlchemyStore(engine=db, chunk_size=500)
    store.batch_put([Pair(shop="s", sku=i, price=i) for i in range(1200)])
    keys = [{"shop": "s", "sku": i} for i in range(1199, -1, -1)] + [{"shop": "s", "sku": 5000}]
    with QueryCounter(db) as queries:
        rows = store.batch_get(Pair, keys)
    assert queries.count == 3  # 1201 lookups, 500 per SELECT
    assert [r.sku if r else None for r in rows] == [*range(1199, -1, -1), None]


def test_batch_get_mixed_key_sets_in_one_query(store: SqlAlchemyStore, db: sa.Engine) -> None:
    objs = [widget(f"s{i}", f"n{i}") for i in range(5)]
    store.batch_put(objs)
    requests: list[dict[str, Any]] = [
        {"sku": "s3"},
        {"id": objs[1].id},
        {"name": "n4", "color": None},
        {"sku": "missing"},
        {"id": objs[1].id},
        {"id": None},
    ]
    with QueryCounter(db) as queries:
        rows = store.batch_get(Widget, requests)
    assert queries.count == 1
    assert [r.sku if r else None for r in rows] == ["s3", "s1", "s4", None, "s1", None]
    assert rows[1] is rows[4]


def test_batch_get_of_unmapped_class_is_all_misses(store: SqlAlchemyStore, db: sa.Engine) -> None:
    with QueryCounter(db) as queries:
        assert store.batch_get(Note, [{"key": "a"}, {"key": "b"}]) == [None, None]
        assert store.get(Note, {"key": "a"}) is None
        store.put(Note("a"))
        store.batch_put([Note("b"), widget("mixed")])
        store.delete(Note("a"))
    assert all("note" not in s.lower() for s in queries.statements)
    assert store.get(Widget, {"sku": "mixed"}) is not None


def test_unkeyed_classes_are_refused(store: SqlAlchemyStore) -> None:
    class Loose:
        pass

    with pytest.raises(NotStorableError):
        store.put(Loose())
    with pytest.raises(NotStorableError):
        store.get(Loose, {"x": 1})
    with pytest.raises(NotStorableError):
        store.put(None)


# ---------------------------------------------------------------------------
# writes


def test_put_loads_generated_values_onto_the_callers_object(store: SqlAlchemyStore, db: sa.Engine) -> None:
    obj = widget("gen-1")
    assert obj.id is None
    store.put(obj)
    assert isinstance(obj.id, int)
    assert obj.status == "fresh"
    state = sa.inspect(obj)
    assert state.detached
    assert state.identity == (obj.id,)
    assert not state.modified
    late = Late()
    store.put(late)  # the server default is not in the INSERT's result: the store reloads it
    assert isinstance(late.id, int)
    assert late.label == "from-server"
    # the object is a detached persistent instance: adding it emits no INSERT
    with QueryCounter(db) as queries, sessionmaker(db)() as session:
        session.add(obj)
        session.commit()
    assert not any(s.lstrip().upper().startswith(("INSERT", "UPDATE")) for s in queries.statements)


def test_put_is_insert_or_update(store: SqlAlchemyStore) -> None:
    first = widget("up-1", "first")
    store.put(first)
    again = Widget(id=first.id, sku="up-1", name="second")  # a new transient copy of the row
    store.put(again)
    found = store.get(Widget, {"id": first.id})
    assert found is not None
    assert (found.name, found.status) == ("second", "fresh")
    found.name = "third"
    store.put(found)
    assert store.get(Widget, {"sku": "up-1"}).name == "third"  # type: ignore[union-attr]


def test_changed_primary_key_moves_the_row(store: SqlAlchemyStore) -> None:
    store.put(Pair(shop="a", sku=1, price=5))
    found = store.get(Pair, {"shop": "a", "sku": 1})
    assert found is not None
    found.sku = 2
    store.put(found)
    assert store.get(Pair, {"shop": "a", "sku": 1}) is None
    moved = store.get(Pair, {"shop": "a", "sku": 2})
    assert moved is not None
    assert moved.price == 5
    assert sa.inspect(found).identity == ("a", 2)


def test_put_of_an_object_in_the_users_session(store: SqlAlchemyStore, db: sa.Engine) -> None:
    maker = sessionmaker(db)
    with maker() as session:
        obj = widget("mine")
        session.add(obj)
        session.commit()
        obj.name = "changed"
        session.commit()  # the user's transaction is finished; obj stays attached
        obj.color = "green"
        store.put(obj)
        assert sa.inspect(obj).session is session
        session.commit()
    found = store.get(Widget, {"sku": "mine"})
    assert found is not None
    assert (found.name, found.color) == ("changed", "green")


def test_batch_put_is_all_or_nothing(store: SqlAlchemyStore) -> None:
    store.put(widget("taken"))
    with pytest.raises(StoreError) as caught:
        store.batch_put([widget("new-1"), widget("taken"), widget("new-2")])  # duplicate unique sku
    assert isinstance(caught.value.__cause__, sa.exc.IntegrityError)
    assert not isinstance(caught.value, StoreUnavailableError)
    assert store.batch_get(Widget, [{"sku": "new-1"}, {"sku": "new-2"}]) == [None, None]


def test_delete_runs_cascades_and_ignores_absent_rows(store: SqlAlchemyStore, db: sa.Engine) -> None:
    parent = Parent(id=1, children=[Child(id=1), Child(id=2)])
    store.put(parent)
    assert store.get(Child, {"parent_id": 1, "id": 2}) is not None
    store.delete(store.get(Parent, {"id": 1}))
    assert store.batch_get(Child, [{"id": 1}, {"id": 2}]) == [None, None]
    store.delete(Parent(id=99))
    store.batch_delete([Widget(sku="never"), Note("x")])
    objs = [widget(f"d{i}") for i in range(4)]
    store.batch_put(objs)
    with QueryCounter(db, selects_only=True) as queries:
        store.batch_delete(objs[:3])
    assert queries.count == 1
    assert [w.sku if w else None for w in store.batch_get(Widget, [{"sku": f"d{i}"} for i in range(4)])] == [
        None,
        None,
        None,
        "d3",
    ]


def test_returned_objects_are_detached_and_usable(store: SqlAlchemyStore, db: sa.Engine) -> None:
    store.put(widget("det", "detached"))
    found = store.get(Widget, {"sku": "det"})
    assert found is not None
    assert sa.inspect(found).detached
    assert (found.name, found.status, found.color) == ("detached", "fresh", None)
    maker = sessionmaker(db)
    with maker() as session:
        merged = session.merge(found)
        merged.name = "merged"
        session.commit()
    again = store.get(Widget, {"sku": "det"})
    assert again is not None
    with maker() as session:
        session.add(again)
        again.color = "added"
        session.commit()
    final = store.get(Widget, {"sku": "det"})
    assert final is not None
    assert (final.name, final.color) == ("merged", "added")


def test_joined_inheritance_loads_every_column(store: SqlAlchemyStore) -> None:
    store.put(Boat(id=1, wheels=0, sails=3))
    for found in (
        store.get(Vehicle, {"id": 1}),
        store.get(Vehicle, {"wheels": 0}),
        store.batch_get(Vehicle, [{"id": 1}])[0],
    ):
        assert isinstance(found, Boat)
        assert sa.inspect(found).detached
        assert (found.wheels, found.sails) == (0, 3)


# ---------------------------------------------------------------------------
# keys for mapped classes without __stockpyle_keys__


def test_mapped_classes_are_keyed_by_primary_key_and_unique_columns() -> None:
    assert mapped_key_specs(Widget) == [("id",), ("sku",)]  # nickname is nullable: not a key
    assert mapped_key_specs(Pair) == [("shop", "sku")]
    assert mapped_key_specs(Note) is None
    assert key_model(Widget).specs == (("id",), ("sku",))
    keys = [encode_key(k) for k in object_keys(Widget(id=5, sku="k", name="n"))]
    assert keys == ["test_sqlalchemy_store.Widget:id=i:5", "test_sqlalchemy_store.Widget:sku=s:k"]


def test_chain_holds_mapped_and_plain_classes(store: SqlAlchemyStore, db: sa.Engine) -> None:
    memory = ProcessMemoryStore()
    chain = ChainedStore([memory, store])
    obj = widget("chained")
    chain.put(obj)
    chain.put(Note("plain"))
    cached = memory.get(Widget, {"id": obj.id})  # keyed by the generated primary key
    assert cached is not None
    assert cached is not obj  # a detached copy of the stored row, never the caller's own instance
    assert (cached.sku, cached.status) == ("chained", "fresh")
    assert memory.get(Widget, {"sku": "chained"}) is cached
    fresh = ChainedStore([ProcessMemoryStore(), store])
    with QueryCounter(db) as queries:
        first = fresh.get(Widget, {"sku": "chained"})
        second = fresh.get(Widget, {"id": obj.id})
    assert queries.count == 1
    assert first is second
    assert chain.get(Note, {"key": "plain"}).key == "plain"  # type: ignore[union-attr]
    assert fresh.get(Note, {"key": "plain"}) is None


# ---------------------------------------------------------------------------
# errors


def test_unreachable_database_is_store_unavailable(tmp_path: Path) -> None:
    with SqlAlchemyStore(uri="postgresql+psycopg://nobody@127.0.0.1:1/none") as store:
        with pytest.raises(StoreUnavailableError) as caught:
            store.get(Widget, {"id": 1})
        assert isinstance(caught.value.__cause__, sa.exc.OperationalError)
        with pytest.raises(StoreUnavailableError):
            store.put(widget("x"))
        with pytest.raises(StoreUnavailableError):
            store.batch_get(Widget, [{"sku": "x"}])
        assert "nobody@127.0.0.1:1" in str(caught.value)


def test_missing_table_is_store_error(tmp_path: Path) -> None:
    with SqlAlchemyStore(uri=f"sqlite:///{tmp_path / 'empty.sqlite'}") as store:
        with pytest.raises(StoreError):
            store.get(Widget, {"sku": "x"})
        with pytest.raises(StoreError):
            store.put(widget("x"))


# ---------------------------------------------------------------------------
# threads


def test_threads_share_one_store_without_leaking_connections(store: SqlAlchemyStore, db: sa.Engine) -> None:
    if backend_of(db.url) == "sqlite":
        pytest.skip("SQLite serialises writers; the server databases exercise concurrency")
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def work(worker: int) -> None:
        try:
            barrier.wait()
            for i in range(15):
                obj = widget(f"t{worker}-{i}", f"worker {worker}")
                store.put(obj)
                assert store.get(Widget, {"id": obj.id}).sku == obj.sku  # type: ignore[union-attr]
                store.put(Pair(shop="race", sku=i, price=worker))  # same new rows from every thread
            found = store.batch_get(Widget, [{"sku": f"t{worker}-{i}"} for i in range(15)])
            assert [w.name for w in found if w] == [f"worker {worker}"] * 15
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert db.pool.checkedout() == 0
    assert len([r for r in store.batch_get(Pair, [{"shop": "race", "sku": i} for i in range(15)]) if r]) == 15


# ---------------------------------------------------------------------------
# several processes: put through the chain here, read from memcached there


class Stamped(Base):
    __tablename__ = table_name("stamped")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    code: Mapped[str] = mapped_column(key_string(), primary_key=True)
    created: Mapped[dt.datetime] = mapped_column(server_default=sa.func.current_timestamp())
    tier: Mapped[str] = mapped_column(sa.String(10), server_default="gold")


@pytest.mark.memcache
def test_other_process_reads_the_complete_object_from_memcached(store: SqlAlchemyStore, memcached_server: Any) -> None:
    from stockpyle.stores.memcache import MemcacheStore

    namespace = f"sqlproc-{os.getpid()}-{threading.get_ident()}"
    memcache = MemcacheStore([memcached_server.address], namespace=namespace)
    chain = ChainedStore([ProcessMemoryStore(), memcache, store])
    obj = Stamped(code="shared")
    chain.put(obj)
    assert obj.tier == "gold"
    code = f"""
import sys
from stockpyle.stores.memcache import MemcacheStore
import test_sqlalchemy_store as models
found = MemcacheStore([{memcached_server.address!r}], namespace={namespace!r}).get(models.Stamped, {{"code": "shared"}})
print(found.code, found.tier, found.created.isoformat())
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    env["STOCKPYLE_TEST_TABLE_SUFFIX"] = table_name("x").removeprefix("sp_x_")
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["shared", "gold", obj.created.isoformat()]
    memcache.release()
