"""ORM read-through: ``session.get()`` of an attached session answered by the cache layers.

Real databases (SQLite, PostgreSQL, MariaDB through ``module_engine``) and real
caches (process memory, memcached); SQL is counted with a cursor listener.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy import insert, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload
from sqlalchemy.orm import sessionmaker as sa_sessionmaker
from support.databases import MYSQL_TABLE_ARGS, TABLE_SUFFIX, QueryCounter, create_tables, drop_tables, table_name
from support.memcached import fresh_namespace

from stockpyle import ChainedStore, MemcacheStore, ProcessMemoryStore, SqlAlchemyStore
from stockpyle.exceptions import ConfigurationError
from stockpyle.ext.sqlalchemy import StockpyleSessionExtension, sessionmaker

TESTS = Path(__file__).resolve().parent


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = table_name("rt_author")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(80))
    tags: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")


class Book(Base):
    __tablename__ = table_name("rt_book")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    author_id: Mapped[int] = mapped_column(sa.ForeignKey(Author.id))
    title: Mapped[str] = mapped_column(sa.String(80))
    author: Mapped[Author] = relationship(back_populates="books")


class Vehicle(Base):
    """Single-table inheritance: Car and Truck are one family."""

    __tablename__ = table_name("rt_vehicle")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(sa.String(20))
    color: Mapped[str] = mapped_column(sa.String(20), default="grey")
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_on": "kind", "polymorphic_identity": "vehicle"}


class Car(Vehicle):
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "car"}


class Truck(Vehicle):
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "truck"}


@pytest.fixture(scope="module")
def tables(module_engine: sa.Engine) -> Iterator[sa.Engine]:
    create_tables(module_engine, Base.metadata)
    yield module_engine
    drop_tables(module_engine, Base.metadata)


@pytest.fixture
def db(tables: sa.Engine) -> sa.Engine:
    with tables.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            connection.execute(table.delete())
    return tables


@pytest.fixture(params=["memory", "memcached"])
def cache(request: pytest.FixtureRequest) -> Any:
    if request.param == "memory":
        return ProcessMemoryStore()
    return request.getfixturevalue("make_memcache_store")()


@pytest.fixture
def ext(cache: Any) -> StockpyleSessionExtension:
    return StockpyleSessionExtension(store=cache, read_through=True)


@pytest.fixture
def maker(db: sa.Engine, ext: StockpyleSessionExtension) -> sa_sessionmaker[Session]:
    return sessionmaker(extension=ext, bind=db)


def seed(maker: Any) -> None:
    """Two authors with books and two vehicles, committed through the extension (so they are cached)."""
    with maker() as session:
        session.add_all(
            [
                Author(id=1, name="Ann", tags=["a"], books=[Book(id=10, title="First"), Book(id=11, title="Second")]),
                Author(id=2, name="Bob", books=[Book(id=20, title="Third")]),
                Car(id=1, color="red"),
                Truck(id=2, color="blue"),
            ]
        )
        session.commit()


def selects(db: sa.Engine) -> QueryCounter:
    return QueryCounter(db, selects_only=True)


def database_name(db: sa.Engine, author_id: int) -> str | None:
    with sa_sessionmaker(db)() as session:
        return session.scalar(select(Author.name).where(Author.id == author_id))


# ---------------------------------------------------------------------------
# hits


def test_a_cached_object_is_answered_without_sql_and_belongs_to_the_session(
    maker: Any, cache: Any, db: sa.Engine, ext: StockpyleSessionExtension
) -> None:
    seed(maker)
    assert cache.get(Author, {"id": 1}).name == "Ann"
    with maker() as session:
        with selects(db) as queries:
            author = session.get(Author, 1)
        assert queries.count == 0
        assert ext.read_hits == 1
        assert author is not None and author.name == "Ann" and author.tags == ["a"]
        assert author in session
        assert sa.inspect(author).persistent
        assert not session.is_modified(author)
        assert author is not cache.get(Author, {"id": 1})
        # the session's instance shares nothing mutable with the cache entry
        author.tags.append("changed in place")
        assert cache.get(Author, {"id": 1}).tags == ["a"]
        author.name = "Annie"
        author.tags = ["b"]
        session.commit()
    assert database_name(db, 1) == "Annie"
    assert cache.get(Author, {"id": 1}).name == "Annie"  # re-cached by the commit
    with maker() as session, selects(db) as queries:
        again = session.get(Author, 1)
        assert again is not None and (again.name, again.tags) == ("Annie", ["b"])
    assert queries.count == 0
    assert ext.read_hits == 2


def test_dict_keys_get_one_and_subclass_lookups(maker: Any, db: sa.Engine, ext: StockpyleSessionExtension) -> None:
    seed(maker)
    with maker() as session, selects(db) as queries:
        assert session.get(Author, {"id": 2}).name == "Bob"  # type: ignore[union-attr]
        assert session.get_one(Book, 10).title == "First"
        car = session.get(Car, 1)
        assert isinstance(car, Car) and car.color == "red"
    assert queries.count == 0
    assert ext.read_hits == 3


def test_the_identity_map_comes_first(maker: Any, db: sa.Engine, ext: StockpyleSessionExtension) -> None:
    seed(maker)
    with maker() as session:
        first = session.get(Author, 1)
        with selects(db) as queries:
            assert session.get(Author, 1) is first
        assert queries.count == 0
        assert ext.read_hits == 1  # the second get never reached the cache
        loaded = session.scalars(select(Author).where(Author.id == 2)).one()
        assert session.get(Author, 2) is loaded
        assert ext.read_hits == 1
        # a changed, unflushed instance is returned as it is, change included
        first.name = "pending"  # type: ignore[union-attr]
        assert session.get(Author, 1) is first
        assert first.name == "pending"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------
# misses


def test_a_miss_runs_one_select_and_fills_the_cache(
    db: sa.Engine, cache: Any, ext: StockpyleSessionExtension, maker: Any
) -> None:
    with sa_sessionmaker(db)() as plain:  # not attached: the cache does not know these rows
        plain.add_all([Author(id=1, name="Ann"), Author(id=2, name="Bob")])
        plain.commit()
    assert cache.get(Author, {"id": 1}) is None
    with maker() as session:
        with selects(db) as queries:
            author = session.get(Author, 1)
        assert queries.count == 1
        assert author is not None and author.name == "Ann" and author in session
        assert ext.read_misses == 1
        assert session.get(Author, 1) is author
    filled = cache.get(Author, {"id": 1})
    assert filled is not None and filled.name == "Ann"
    assert filled is not author
    with maker() as session, selects(db) as queries:
        assert session.get(Author, 1).name == "Ann"  # type: ignore[union-attr]
    assert queries.count == 0
    assert ext.read_hits == 1
    # a row that does not exist: SQL every time, nothing cached
    with maker() as session, selects(db) as queries:
        assert session.get(Author, 999) is None
        session.expunge_all()
        assert session.get(Author, 999) is None
    assert queries.count == 2
    assert cache.get(Author, {"id": 999}) is None


def test_a_miss_inside_an_older_snapshot_is_answered_but_not_cached(
    db: sa.Engine, cache: Any, ext: StockpyleSessionExtension, maker: Any
) -> None:
    """Under REPEATABLE READ (MariaDB) or SERIALIZABLE (SQLite) a transaction under way may read an old row."""
    with sa_sessionmaker(db)() as plain:
        plain.add_all([Author(id=1, name="Ann"), Author(id=2, name="Bob")])
        plain.commit()
    with maker() as session:
        session.execute(select(Author.name).where(Author.id == 2)).all()  # the transaction is under way
        with selects(db) as queries:
            assert session.get(Author, 1).name == "Ann"  # type: ignore[union-attr]
        assert queries.count == 1
    read_committed = db.dialect.name == "postgresql"  # PostgreSQL's default: every statement reads the latest
    assert (cache.get(Author, {"id": 1}) is not None) is read_committed
    assert ext.read_misses == 1
    if db.dialect.name == "sqlite":
        return  # no READ COMMITTED level in SQLite
    with maker() as session:  # a transaction under way at READ COMMITTED: filled
        session.connection(execution_options={"isolation_level": "READ COMMITTED"})
        session.execute(select(Author.name).where(Author.id == 1)).all()
        session.get(Author, 2)
    assert cache.get(Author, {"id": 2}).name == "Bob"


def test_a_base_class_lookup_of_a_subclass_row_is_answered_but_not_filled(
    db: sa.Engine, cache: Any, ext: StockpyleSessionExtension, maker: Any
) -> None:
    with sa_sessionmaker(db)() as plain:
        plain.add(Car(id=1, color="red"))
        plain.commit()
    with maker() as session, selects(db) as queries:
        vehicle = session.get(Vehicle, 1)
        assert isinstance(vehicle, Car)
    assert queries.count == 1
    assert cache.get(Vehicle, {"id": 1}) is None
    assert cache.get(Car, {"id": 1}) is None  # cached when read as a Car
    with maker() as session:
        assert isinstance(session.get(Car, 1), Car)
    assert cache.get(Car, {"id": 1}).color == "red"


# ---------------------------------------------------------------------------
# pending and uncommitted writes


def test_flushed_writes_of_the_class_make_gets_use_sql(
    maker: Any, cache: Any, db: sa.Engine, ext: StockpyleSessionExtension
) -> None:
    seed(maker)
    with maker() as session:
        session.get(Author, 1).name = "uncommitted"  # type: ignore[union-attr]
        session.flush()
        session.expunge_all()  # out of the identity map, still written in the transaction
        with selects(db) as queries:
            assert session.get(Author, 1).name == "uncommitted"  # type: ignore[union-attr]
            assert session.get(Author, 2).name == "Bob"  # type: ignore[union-attr]
        assert queries.count == 2
        assert ext.read_bypassed == 2
        # another class is not affected
        with selects(db) as queries:
            assert session.get(Book, 10).title == "First"  # type: ignore[union-attr]
        assert queries.count == 0
        session.rollback()
    assert cache.get(Author, {"id": 1}).name == "Ann"
    with maker() as session, selects(db) as queries:  # the transaction ended: read-through again
        assert session.get(Author, 1).name == "Ann"  # type: ignore[union-attr]
    assert queries.count == 0


def test_statements_and_inserts_of_the_class_make_gets_use_sql(
    maker: Any, db: sa.Engine, ext: StockpyleSessionExtension
) -> None:
    seed(maker)
    with maker() as session:
        session.execute(update(Author).where(Author.id == 2).values(name="bulk"))
        with selects(db) as queries:
            assert session.get(Author, 2).name == "bulk"  # type: ignore[union-attr]
        assert queries.count == 1
        session.rollback()
    with maker() as session:
        # a plain INSERT changes no cache entry, yet the class was written
        session.execute(insert(Author).values(id=3, name="new"))
        with selects(db) as queries:
            assert session.get(Author, 3).name == "new"  # type: ignore[union-attr]
            assert session.get(Author, 1).name == "Ann"  # type: ignore[union-attr]
        assert queries.count == 2
        session.commit()
    with maker() as session:
        session.connection().execute(update(Author.__table__).where(Author.__table__.c.id == 1).values(name="core"))
        with selects(db) as queries:
            assert session.get(Author, 1).name == "core"  # type: ignore[union-attr]
        assert queries.count == 1
        session.rollback()
    assert ext.read_bypassed == 4
    assert ext.read_hits == 0


def test_unflushed_writes_of_the_family_make_gets_use_sql(
    maker: Any, db: sa.Engine, ext: StockpyleSessionExtension
) -> None:
    seed(maker)
    with maker(autoflush=False) as session:
        session.get(Truck, 2).color = "green"  # type: ignore[union-attr]
        assert ext.read_hits == 1
        with selects(db) as queries:
            car = session.get(Car, 1)  # same family as the dirty truck
        assert queries.count == 1
        assert car is not None and car.color == "red"
        session.add(Author(id=5, name="pending"))  # a new, unflushed author
        with selects(db) as queries:
            session.get(Author, 2)
        assert queries.count == 1
        assert ext.read_bypassed == 2
        session.rollback()
    with maker(autoflush=False) as session:
        session.delete(session.get(Book, 20))  # deleted, not flushed
        with selects(db) as queries:
            assert session.get(Book, 10).title == "First"  # type: ignore[union-attr]
        assert queries.count == 1
        assert ext.read_bypassed == 3
        session.rollback()


def test_a_rolled_back_savepoint_leaves_no_pending_write(
    maker: Any, db: sa.Engine, ext: StockpyleSessionExtension
) -> None:
    seed(maker)
    with maker() as session:
        savepoint = session.begin_nested()
        session.get(Author, 1).name = "inner"  # type: ignore[union-attr]
        session.flush()
        savepoint.rollback()
        session.expunge_all()
        hits = ext.read_hits
        with selects(db) as queries:
            assert session.get(Author, 1).name == "Ann"  # type: ignore[union-attr]
        assert queries.count == 0
        assert ext.read_hits == hits + 1
        with session.begin_nested():  # released: the write stands in the transaction
            session.get(Author, 1).name = "released"  # type: ignore[union-attr]
        session.expunge_all()
        with selects(db) as queries:
            assert session.get(Author, 1).name == "released"  # type: ignore[union-attr]
        assert queries.count == 1
        session.commit()


# ---------------------------------------------------------------------------
# what always uses SQL


def test_options_locks_and_statements_use_sql(maker: Any, db: sa.Engine, ext: StockpyleSessionExtension) -> None:
    seed(maker)
    with maker() as session:
        with selects(db) as queries:
            locked = session.get(Author, 1, with_for_update=True)
        assert locked is not None and queries.count == 1
        if db.dialect.name != "sqlite":  # SQLite has no row locks
            assert "FOR UPDATE" in queries.statements[0].upper()
        session.rollback()
        session.expunge_all()
        calls: list[dict[str, Any]] = [
            {"populate_existing": True},
            {"options": [selectinload(Author.books)]},
            {"execution_options": {"stockpyle_test": True}},
        ]
        for call in calls:
            with selects(db) as queries:
                assert session.get(Author, 1, **call).name == "Ann"  # type: ignore[union-attr]
            assert queries.count >= 1, call
            session.expunge_all()
        with selects(db) as queries:
            assert session.scalars(select(Author).where(Author.id == 1)).one().name == "Ann"
        assert queries.count == 1
        session.expunge_all()
    assert ext.read_hits == 0
    with maker() as session:
        author = session.get(Author, 1)  # a hit
        session.expire(author)
        with selects(db) as queries:
            session.refresh(author)
            assert author.name == "Ann"  # type: ignore[union-attr]
        assert queries.count == 1
    assert ext.read_hits == 1


def test_lazy_relationships_of_a_cached_answer_load_through_the_session(
    maker: Any, db: sa.Engine, ext: StockpyleSessionExtension
) -> None:
    seed(maker)
    with maker() as session:
        with selects(db) as queries:
            book = session.get(Book, 11)
        assert queries.count == 0
        with selects(db) as queries:
            author = book.author  # type: ignore[union-attr]  (many-to-one lazy load: SQL, never the cache)
            titles = [b.title for b in author.books]
        assert queries.count == 2
        assert author.name == "Ann" and titles == ["First", "Second"]
        assert author in session and book in author.books
        assert session.get(Author, 1) is author
    assert ext.read_hits == 1


# ---------------------------------------------------------------------------
# configuration, default mode, failures


def test_default_mode_does_not_read_through(db: sa.Engine, cache: Any) -> None:
    ext = StockpyleSessionExtension(store=cache)
    assert not ext.read_through
    maker = sessionmaker(extension=ext, bind=db)
    seed(maker)
    with sa_sessionmaker(db)() as plain:
        plain.add(Author(id=7, name="uncached"))
        plain.commit()
    with maker() as session, selects(db) as queries:
        assert session.get(Author, 1).name == "Ann"  # type: ignore[union-attr]
        assert session.get(Author, 7).name == "uncached"  # type: ignore[union-attr]
    assert queries.count == 2
    assert cache.get(Author, {"id": 7}) is None  # gets fill nothing
    assert (ext.read_hits, ext.read_misses, ext.read_bypassed) == (0, 0, 0)


def test_read_through_needs_cache_layers_only(db: sa.Engine) -> None:
    database = SqlAlchemyStore(engine=db)
    with pytest.raises(ConfigurationError, match="every layer must be a cache"):
        StockpyleSessionExtension(store=ChainedStore([ProcessMemoryStore(), database]), read_through=True)
    with pytest.raises(ConfigurationError, match="every layer must be a cache"):
        StockpyleSessionExtension(store=database, read_through=True)
    database.release()
    assert StockpyleSessionExtension(store=ProcessMemoryStore(), read_through=True).read_through


def test_an_unreachable_cache_falls_back_to_sql(db: sa.Engine, memcached_factory: Any) -> None:
    dead = MemcacheStore([memcached_factory.free_address()], namespace=fresh_namespace())
    ext = StockpyleSessionExtension(store=dead, read_through=True)
    maker = sessionmaker(extension=ext, bind=db)
    with sa_sessionmaker(db)() as plain:
        plain.add(Author(id=1, name="Ann"))
        plain.commit()
    with maker() as session, selects(db) as queries:
        author = session.get(Author, 1)
        assert author is not None and author.name == "Ann" and author in session
    assert queries.count == 1
    assert ext.read_hits == 0
    dead.release()


def test_threads_missing_the_same_row_each_get_their_own_instance(
    db: sa.Engine, cache: Any, ext: StockpyleSessionExtension, maker: Any
) -> None:
    if db.dialect.name == "sqlite":
        pytest.skip("the server databases exercise concurrency")
    with sa_sessionmaker(db)() as plain:
        plain.add(Author(id=1, name="Ann"))
        plain.commit()
    barrier = threading.Barrier(4)
    found: list[tuple[int, bool, str]] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with maker() as session:
                barrier.wait()
                author = session.get(Author, 1)
                assert author is not None
                found.append((id(author), author in session, author.name))
                barrier.wait()  # every instance is alive until all were compared
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    with selects(db) as queries:
        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert not errors, errors
    assert len({ident for ident, _, _ in found}) == 4
    assert all(in_session and name == "Ann" for _, in_session, name in found)
    assert 1 <= queries.count <= 4
    assert ext.read_hits + ext.read_misses == 4
    assert cache.get(Author, {"id": 1}).name == "Ann"


# ---------------------------------------------------------------------------
# across processes


_CHILD = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, os.environ["RT_TESTS"])
    from support.databases import QueryCounter, make_engine
    from test_read_through import Author
    from stockpyle import MemcacheStore
    from stockpyle.ext.sqlalchemy import StockpyleSessionExtension, sessionmaker

    engine = make_engine(os.environ["RT_URL"])
    store = MemcacheStore([os.environ["RT_MEMCACHED"]], namespace=os.environ["RT_NAMESPACE"])
    ext = StockpyleSessionExtension(store=store, read_through=True)
    with sessionmaker(extension=ext, bind=engine)() as session:
        with QueryCounter(engine, selects_only=True) as queries:
            author = session.get(Author, int(sys.argv[1]))
        print(json.dumps({"name": author.name, "selects": queries.count, "in_session": author in session,
                          "hits": ext.read_hits}))
    store.release()
    engine.dispose()
    """
)


def test_another_process_reads_what_this_one_cached(db: sa.Engine, memcached_server: Any) -> None:
    namespace = fresh_namespace()
    store = MemcacheStore([memcached_server.address], namespace=namespace)
    ext = StockpyleSessionExtension(store=store, read_through=True)
    maker = sessionmaker(extension=ext, bind=db)
    with sa_sessionmaker(db)() as plain:
        plain.add(Author(id=1, name="Ann"))
        plain.commit()
    with maker() as session:
        assert session.get(Author, 1).name == "Ann"  # type: ignore[union-attr]  (a miss: fills memcached)
    assert ext.read_misses == 1
    env = {
        **os.environ,
        "RT_TESTS": str(TESTS),
        "RT_URL": db.url.render_as_string(hide_password=False),
        "RT_MEMCACHED": memcached_server.address,
        "RT_NAMESPACE": namespace,
        "STOCKPYLE_TEST_TABLE_SUFFIX": TABLE_SUFFIX,
    }
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, "1"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "name": "Ann",
        "selects": 0,
        "in_session": True,
        "hits": 1,
    }
    store.release()
