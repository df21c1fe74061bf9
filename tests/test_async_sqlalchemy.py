"""AsyncSqlAlchemyStore against real databases: SQLite (aiosqlite), PostgreSQL (psycopg async), MariaDB (aiomysql).

The store contract runs through :func:`stockpyle.testing.sync_bridge`, on the
store alone and under an :class:`~stockpyle.AsyncChainedStore`; then write
effects through the asyncio chain, cancellation while a query waits, the
errors for synchronous engines and URLs, and the session extension attached to
AsyncSessions.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.orm import sessionmaker as sa_sessionmaker
from support.databases import (
    contract_metadata,
    create_tables,
    drop_tables,
    empty_tables,
    hostile_values_for,
    make_engine,
    table_name,
)
from support.orm_models import Author, Book, orm_metadata
from test_sqlalchemy_contract import _SqlContract

from stockpyle import ProcessMemoryStore
from stockpyle.exceptions import ConfigurationError, StoreError
from stockpyle.stores.achained import AsyncChainedStore
from stockpyle.stores.sqlalchemy import ASYNC_INSTALL_HINT, AsyncSqlAlchemyStore, SqlAlchemyStore
from stockpyle.testing import sync_bridge

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+psycopg_async", "mysql": "mysql+aiomysql"}


def async_url(url: str | sa.URL) -> sa.URL:
    """The same database as ``url`` through its asyncio driver."""
    parsed = sa.make_url(url)
    return parsed.set(drivername=_ASYNC_DRIVERS[parsed.get_backend_name()])


# ---------------------------------------------------------------------------
# the contract, on the store and under the asyncio chain


class _AsyncSqlContract(_SqlContract):
    """The contract _SqlContract runs against SqlAlchemyStore, against AsyncSqlAlchemyStore."""

    def make_store(self, **options: Any) -> Any:
        empty_tables(self.engine, contract_metadata)
        return sync_bridge(AsyncSqlAlchemyStore(uri=async_url(self.engine.url), **options))


class TestAsyncSqliteContract(_AsyncSqlContract):
    backend: ClassVar[str] = "sqlite"


@pytest.mark.postgres
class TestAsyncPostgresContract(_AsyncSqlContract):
    backend: ClassVar[str] = "postgres"
    hostile_values: ClassVar[tuple[str, ...]] = hostile_values_for("postgres")


@pytest.mark.mariadb
class TestAsyncMariadbContract(_AsyncSqlContract):
    backend: ClassVar[str] = "mariadb"
    hostile_values: ClassVar[tuple[str, ...]] = hostile_values_for("mariadb")


class _AsyncChainContract(_SqlContract):
    """AsyncChainedStore([ProcessMemoryStore, AsyncSqlAlchemyStore]) passes the same contract."""

    def make_store(self, **options: Any) -> Any:
        empty_tables(self.engine, contract_metadata)
        database = AsyncSqlAlchemyStore(uri=async_url(self.engine.url), **options)
        return sync_bridge(AsyncChainedStore([ProcessMemoryStore(**options), database]))


class TestAsyncSqliteChainContract(_AsyncChainContract):
    backend: ClassVar[str] = "sqlite"


@pytest.mark.postgres
class TestAsyncPostgresChainContract(_AsyncChainContract):
    backend: ClassVar[str] = "postgres"
    hostile_values: ClassVar[tuple[str, ...]] = hostile_values_for("postgres")


@pytest.mark.mariadb
class TestAsyncMariadbChainContract(_AsyncChainContract):
    backend: ClassVar[str] = "mariadb"
    hostile_values: ClassVar[tuple[str, ...]] = hostile_values_for("mariadb")


# ---------------------------------------------------------------------------
# the asyncio chain: writes, reads, write effects


@pytest.fixture
def orm_engine(engine: sa.Engine) -> Iterator[sa.Engine]:
    """The ORM test models' tables on each backend (sync engine, for setup and checks)."""
    create_tables(engine, orm_metadata)
    try:
        yield engine
    finally:
        drop_tables(engine, orm_metadata)


def test_the_async_chain_writes_reads_and_follows_cascades(orm_engine: sa.Engine) -> None:
    memory = ProcessMemoryStore()
    database = AsyncSqlAlchemyStore(uri=async_url(orm_engine.url))
    chain = AsyncChainedStore([memory, database])

    async def scenario() -> None:
        await chain.put(Author(id=1, email="ada@x", name="ada", books=[Book(id=10, title="one"), Book(id=11)]))
        # the children the merge cascade wrote are cached from the write's effects
        cached = memory.get(Book, {"id": 10})
        assert cached is not None and cached.title == "one"
        found = await chain.get(Author, {"email": "ada@x"})
        assert found is not None and found.name == "ada"
        # a delete cascades (delete-orphan) to the books: their cache entries go too
        await chain.delete(found)
        assert memory.get(Book, {"id": 10}) is None and memory.get(Book, {"id": 11}) is None
        assert memory.get(Author, {"id": 1}) is None
        assert await chain.get(Book, {"id": 11}) is None
        await chain.release()

    asyncio.run(scenario())
    with sa_sessionmaker(orm_engine)() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(Book)) == 0


def test_write_reports_the_same_effects_as_the_sync_store(orm_engine: sa.Engine) -> None:
    sync_store = SqlAlchemyStore(engine=orm_engine)
    sync_store.put(Author(id=2, email="bob@x", books=[Book(id=20), Book(id=21)]))
    expected = sync_store.write("delete", [Author(id=2, email="bob@x")])
    store = AsyncSqlAlchemyStore(uri=async_url(orm_engine.url))

    async def scenario() -> Any:
        await store.write("put", [Author(id=2, email="bob@x", books=[Book(id=20), Book(id=21)])])
        effects = await store.write("delete", [Author(id=2, email="bob@x")])
        await store.release()
        return effects

    effects = asyncio.run(scenario())

    def shape(objs: Any) -> list[tuple[str, Any]]:
        return sorted((type(obj).__name__, obj.id) for obj in objs)

    removed = [("Author", 2), ("Author", 2), ("Book", 20), ("Book", 21)]  # as given, and as the database held it
    assert shape(effects.removed) == shape(expected.removed) == removed
    assert effects.classes == expected.classes
    assert store.stats().puts == 1 and store.stats().deletes == 1


def test_concurrent_tasks_share_the_store_and_are_all_counted(orm_engine: sa.Engine) -> None:
    store = AsyncSqlAlchemyStore(uri=async_url(orm_engine.url), engine_options={"pool_size": 2, "max_overflow": 0})

    async def scenario() -> list[Any]:
        await asyncio.gather(*(store.put(Author(id=i, email=f"{i}@x", name=str(i))) for i in range(30)))
        found = await asyncio.gather(*(store.get(Author, {"id": i}) for i in range(40)))
        await store.release()
        return found

    found = asyncio.run(scenario())
    assert [obj.name if obj is not None else None for obj in found] == [str(i) for i in range(30)] + [None] * 10
    stats = store.stats()
    assert (stats.puts, stats.hits, stats.misses) == (30, 30, 10)


def test_objects_of_unmapped_classes_are_ignored_and_counted(orm_engine: sa.Engine) -> None:
    from stockpyle.testing import Item

    store = AsyncSqlAlchemyStore(uri=async_url(orm_engine.url))

    async def scenario() -> None:
        await store.batch_put([Item("k", 1, 2), Author(id=5, email="e@x")])
        assert await store.get(Item, {"key": "k"}) is None
        assert (await store.get(Author, {"id": 5})) is not None
        await store.release()

    asyncio.run(scenario())
    assert store.stats().ignored == 1
    assert store.maps(Author) and not store.maps(Item)


def test_an_async_sessionmaker_gives_its_options_and_sync_session_class(orm_engine: sa.Engine) -> None:
    opened: list[Session] = []

    class TracingSession(Session):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            opened.append(self)

    engine = create_async_engine(async_url(orm_engine.url))
    store = AsyncSqlAlchemyStore(sessionmaker=async_sessionmaker(engine, sync_session_class=TracingSession))

    async def scenario() -> Any:
        await store.put(Author(id=7, email="s@x"))
        found = await store.get(Author, {"id": 7})
        await store.release()  # not the store's engine: left open
        await engine.dispose()
        return found

    assert asyncio.run(scenario()) is not None
    assert len(opened) == 2
    assert store.engine is engine


# ---------------------------------------------------------------------------
# cancellation: a query waiting on a lock held by another connection


class LockBase(DeclarativeBase):
    pass


class Gadget(LockBase):
    __tablename__ = table_name("async_gadget")
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(40))


_LOCKS = {"postgres": "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", "mariadb": "LOCK TABLES {} WRITE"}


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ]
)
def locking(request: pytest.FixtureRequest) -> Iterator[tuple[sa.Engine, str]]:
    """A server database with the Gadget table, and the statement that locks it against readers."""
    engine = make_engine(request.getfixturevalue(f"{request.param}_url"))
    create_tables(engine, LockBase.metadata)
    try:
        yield engine, _LOCKS[request.param].format(Gadget.__tablename__)
    finally:
        drop_tables(engine, LockBase.metadata)
        engine.dispose()


def _locked(engine: sa.Engine, statement: str) -> sa.Connection:
    connection = engine.connect()
    connection.exec_driver_sql(statement)
    return connection


def _unlock(connection: sa.Connection) -> None:
    if connection.dialect.name in ("mysql", "mariadb"):
        connection.exec_driver_sql("UNLOCK TABLES")
    connection.rollback()
    connection.close()


@pytest.mark.parametrize("operation", ["get", "batch_get", "put"])
def test_cancelling_an_operation_while_its_query_waits_returns_the_connection(
    locking: tuple[sa.Engine, str], operation: str
) -> None:
    engine, lock = locking
    store = AsyncSqlAlchemyStore(uri=async_url(engine.url), engine_options={"pool_size": 1, "max_overflow": 0})
    pool = store.engine.sync_engine.pool

    def call() -> Any:
        if operation == "get":
            return store.get(Gadget, {"id": 1})
        if operation == "batch_get":
            return store.batch_get(Gadget, [{"id": 1}, {"id": 2}])
        return store.put(Gadget(id=2, name="late"))

    async def scenario() -> tuple[float, int, Any]:
        await store.put(Gadget(id=1, name="gear"))
        holder = _locked(engine, lock)
        began = time.monotonic()
        try:
            with pytest.raises(asyncio.TimeoutError):  # TimeoutError from Python 3.11
                await asyncio.wait_for(call(), 0.5)
            waited = time.monotonic() - began
            checked_out = pool.checkedout()
        finally:
            _unlock(holder)
        # the store goes on working on its one pooled connection
        found = await asyncio.wait_for(store.batch_get(Gadget, [{"id": 1}, {"id": 2}]), 10)
        await store.release()
        return waited, checked_out, found

    waited, checked_out, found = asyncio.run(scenario())
    assert waited >= 0.45  # the query really waited on the lock
    assert checked_out == 0
    assert [obj.name if obj is not None else None for obj in found] == ["gear", None]  # the cancelled put wrote nothing
    assert store.stats().errors == 0


def test_a_waiting_query_never_blocks_the_event_loop(locking: tuple[sa.Engine, str]) -> None:
    engine, lock = locking
    store = AsyncSqlAlchemyStore(uri=async_url(engine.url))

    async def scenario() -> float:
        await store.put(Gadget(id=1, name="gear"))
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
        holder = _locked(engine, lock)
        read = asyncio.ensure_future(store.get(Gadget, {"id": 1}))
        await asyncio.sleep(0.4)
        assert not read.done()  # still waiting on the lock
        _unlock(holder)
        found = await read
        assert found is not None and found.name == "gear"
        done.set()
        await tick
        await store.release()
        return max(gaps)

    worst_gap = asyncio.run(scenario())
    # the main thread's own lock release is the only blocking call here
    assert worst_gap < 0.25, f"the event loop stood still for {worst_gap * 1000:.0f} ms"


# ---------------------------------------------------------------------------
# configuration errors


def test_a_synchronous_engine_is_refused_with_a_pointer_to_sqlalchemystore(sqlite_url: str) -> None:
    engine = sa.create_engine(sqlite_url)
    with pytest.raises(ConfigurationError, match=r"synchronous Engine: use SqlAlchemyStore\(engine=...\)"):
        AsyncSqlAlchemyStore(engine=engine)  # type: ignore[arg-type]
    engine.dispose()


@pytest.mark.parametrize(
    "url", ["sqlite:///x.sqlite", "postgresql+psycopg://postgres@127.0.0.1/test", "mysql+pymysql://root@127.0.0.1/test"]
)
def test_a_url_of_a_synchronous_driver_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"needs a URL with an asyncio driver \(postgresql\+psycopg_async://"):
        AsyncSqlAlchemyStore(uri=url)


def test_other_bad_arguments_are_clear_errors(sqlite_url: str) -> None:
    engine = create_async_engine(async_url(sqlite_url))
    with pytest.raises(ConfigurationError, match="exactly one of uri=, engine= or sessionmaker=; got none"):
        AsyncSqlAlchemyStore()
    with pytest.raises(ConfigurationError, match="got uri and engine"):
        AsyncSqlAlchemyStore(uri="sqlite+aiosqlite://", engine=engine)
    with pytest.raises(ConfigurationError, match="engine_options= only applies with uri="):
        AsyncSqlAlchemyStore(engine=engine, engine_options={"echo": True})
    with pytest.raises(ConfigurationError, match="makes synchronous sessions: use SqlAlchemyStore"):
        AsyncSqlAlchemyStore(sessionmaker=sa_sessionmaker(sa.create_engine(sqlite_url)))
    with pytest.raises(ConfigurationError, match="bound to one AsyncEngine"):
        AsyncSqlAlchemyStore(sessionmaker=async_sessionmaker())
    with pytest.raises(ConfigurationError, match="cannot use uri="):
        AsyncSqlAlchemyStore(uri="nosuchdialect+x://")
    with pytest.raises(ConfigurationError, match="chunk_size must be a positive int"):
        AsyncSqlAlchemyStore(engine=engine, chunk_size=0)
    with pytest.raises(ConfigurationError, match="AsyncEngine"):
        AsyncSqlAlchemyStore(engine="sqlite+aiosqlite://")  # type: ignore[arg-type]
    asyncio.run(engine.dispose())


def test_a_store_error_names_the_database_and_counts(sqlite_url: str) -> None:
    store = AsyncSqlAlchemyStore(uri=async_url(sqlite_url))  # no tables created

    async def scenario() -> None:
        with pytest.raises(StoreError, match=r"sqlite\+aiosqlite://"):
            await store.get(Gadget, {"id": 1})
        await store.release()

    asyncio.run(scenario())
    assert store.stats().errors == 1


@pytest.mark.parametrize("missing", ["greenlet", "aiosqlite"])
def test_missing_greenlet_or_driver_names_the_extra(missing: str) -> None:
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"
        "from stockpyle.stores.sqlalchemy import AsyncSqlAlchemyStore\n"
        "try:\n"
        "    AsyncSqlAlchemyStore(uri='sqlite+aiosqlite://')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert ASYNC_INSTALL_HINT in result.stdout
    assert "pip install 'stockpyle[sqlalchemy-asyncio]'" in result.stdout
    assert missing in result.stdout


# ---------------------------------------------------------------------------
# the session extension on AsyncSession


def test_the_extension_follows_async_sessions_of_an_async_sessionmaker(orm_engine: sa.Engine) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    from stockpyle.ext.sqlalchemy import StockpyleSessionExtension

    memory = ProcessMemoryStore()
    ext = StockpyleSessionExtension(store=memory)
    engine = create_async_engine(async_url(orm_engine.url))
    maker = ext.attach(async_sessionmaker(engine, expire_on_commit=False))
    ext.attach(maker)  # twice: harmless
    other = async_sessionmaker(engine)  # not attached

    async def scenario() -> None:
        async with maker() as session:
            session.add(Author(id=1, email="ada@x", name="ada", books=[Book(id=10, title="one")]))
            await session.commit()
        cached = memory.get(Book, {"id": 10})
        assert cached is not None and cached.title == "one"
        assert memory.get(Author, {"email": "ada@x"}) is not None
        async with maker() as session:  # a rollback changes nothing
            author = await session.get(Author, 1)
            assert author is not None
            author.name = "changed"
            await session.flush()
            await session.rollback()
        assert memory.get(Author, {"id": 1}).name == "ada"  # type: ignore[union-attr]
        async with other() as session:  # another maker's sessions are not followed
            session.add(Author(id=2, email="bob@x"))
            await session.commit()
        assert memory.get(Author, {"id": 2}) is None
        async with AsyncSession(engine) as session:  # one session attached by itself
            ext.attach(session)
            author = await session.get(Author, 1)
            assert author is not None
            await session.delete(author)  # cascades to the books
            await session.commit()
        assert memory.get(Author, {"id": 1}) is None and memory.get(Book, {"id": 10}) is None
        ext.detach(maker)
        async with maker() as session:
            session.add(Author(id=3, email="cy@x"))
            await session.commit()
        assert memory.get(Author, {"id": 3}) is None
        await engine.dispose()

    asyncio.run(scenario())
    assert ext.errors == 0


def test_the_extension_refuses_an_asyncio_store() -> None:
    from stockpyle.ext.sqlalchemy import StockpyleSessionExtension

    with pytest.raises(
        ConfigurationError, match="is an asyncio store; the extension writes to the cache inside commit"
    ):
        StockpyleSessionExtension(store=AsyncChainedStore([ProcessMemoryStore()]))


def test_read_through_answers_an_async_session_get_from_the_cache(orm_engine: sa.Engine) -> None:
    from stockpyle.ext.sqlalchemy import StockpyleSessionExtension

    memory = ProcessMemoryStore()
    ext = StockpyleSessionExtension(store=memory, read_through=True)
    engine = create_async_engine(async_url(orm_engine.url))
    maker = ext.attach(async_sessionmaker(engine))

    async def scenario() -> None:
        async with maker() as session:
            session.add(Author(id=4, email="dee@x", name="dee"))
            await session.commit()
        async with maker() as session:
            found = await session.get(Author, 4)
            assert found is not None and found.name == "dee"
        await engine.dispose()

    asyncio.run(scenario())
    assert (ext.read_hits, ext.read_misses, ext.errors) == (1, 0, 0)
