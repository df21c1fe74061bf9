"""The caches follow everything the ORM writes, through the chain and through attached sessions.

Every test runs on SQLite, PostgreSQL and MariaDB against the realistic model
of :mod:`support.orm_models`, with the two cache layers an application
really has -- process memory over memcached -- and checks each layer on its
own against a fresh read of the database.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy import insert, select, text, update
from sqlalchemy.orm import Session, lazyload, undefer
from sqlalchemy.orm import sessionmaker as sa_sessionmaker
from support.databases import QueryCounter, backend_of, create_tables, drop_tables, empty_tables, table_name
from support.orm_models import (
    Account,
    Author,
    Book,
    Document,
    Event,
    Missing,
    Tag,
    Wallet,
    column_values,
    orm_metadata,
)

from stockpyle import ChainedStore, ProcessMemoryStore
from stockpyle.exceptions import (
    ConfigurationError,
    RelationshipNotCachedError,
    SchemaError,
    StaleVersionError,
    StoreError,
    StoreUnavailableError,
)
from stockpyle.ext.sqlalchemy import StockpyleSessionExtension, sessionmaker
from stockpyle.stores.memcache import MemcacheStore
from stockpyle.stores.sqlalchemy import SqlAlchemyStore

pytestmark = pytest.mark.memcache

TESTS = Path(__file__).parent
ROOT = TESTS.parent
TZ = dt.timezone(dt.timedelta(hours=2))


class Note:
    """A plain (unmapped) storable class that shares a chain with the mapped ones."""

    __stockpyle_keys__: ClassVar[list[str]] = ["key"]

    def __init__(self, key: str) -> None:
        self.key = key


class Stack:
    """What one application process has: process memory over memcached over the database.

    ``chain`` is the whole stack (``Storable``-style writes), ``Session`` a
    session factory whose commits reach the two cache layers through the
    extension.
    """

    def __init__(self, engine: sa.Engine, address: str, namespace: str) -> None:
        self.engine = engine
        self.address = address
        self.namespace = namespace
        self.memory = ProcessMemoryStore()
        self.memcache = MemcacheStore([address], namespace=namespace)
        self.database = SqlAlchemyStore(engine=engine)
        self.chain = ChainedStore([self.memory, self.memcache, self.database])
        self.caches = ChainedStore([self.memory, self.memcache])
        self.ext = StockpyleSessionExtension(store=self.caches)
        self.Session = sessionmaker(extension=self.ext, bind=engine)

    @property
    def layers(self) -> list[tuple[str, Any]]:
        return [("process memory", self.memory), ("memcached", self.memcache)]

    def release(self) -> None:
        self.memcache.release()


@pytest.fixture(scope="module")
def orm_engine(module_engine: sa.Engine) -> Iterator[sa.Engine]:
    create_tables(module_engine, orm_metadata)
    yield module_engine
    drop_tables(module_engine, orm_metadata)


@pytest.fixture
def db(orm_engine: sa.Engine) -> sa.Engine:
    empty_tables(orm_engine, orm_metadata)
    return orm_engine


@pytest.fixture
def stack(db: sa.Engine, memcached_server: Any) -> Iterator[Stack]:
    built = Stack(db, memcached_server.address, f"orm-{uuid.uuid4().hex[:12]}")
    yield built
    built.release()
    assert db.pool.checkedout() == 0, "a session was left open"


@pytest.fixture(params=["chain", "session"])
def path(request: pytest.FixtureRequest) -> str:
    """How the application writes: through the chain, or through an attached session."""
    return str(request.param)


def plain_session(engine: sa.Engine) -> Session:
    """A session no extension listens to (seeding rows, reading the truth)."""
    return sa_sessionmaker(engine)()


def seed(engine: sa.Engine, *objs: Any) -> None:
    with plain_session(engine) as session:
        session.add_all(objs)
        session.commit()


def truth(engine: sa.Engine, klass: type, ident: Any) -> dict[str, str] | None:
    """The row as a fresh session reads it (every column), or None."""
    with plain_session(engine) as session:
        found = session.get(klass, ident, options=[undefer("*"), lazyload("*")])
        return None if found is None else column_values(found)


def assert_layers_match(stack: Stack, klass: type, keydicts: Sequence[dict[str, Any]]) -> None:
    """Each cache layer holds, for every lookup, the row as stored or nothing."""
    mapper = sa.inspect(klass)
    pk_names = [mapper.get_property_by_column(c).key for c in mapper.primary_key]
    for keydict in keydicts:
        with plain_session(stack.engine) as session:
            stmt = select(klass).filter_by(**keydict).options(undefer("*"), lazyload("*"))
            row = session.scalars(stmt).one_or_none()
            expected = None if row is None else column_values(row)
            ident = None if row is None else tuple(getattr(row, n) for n in pk_names)
        for name, layer in stack.layers:
            found = layer.get(klass, keydict)
            if expected is None:
                assert found is None, f"{name} still holds {klass.__name__} {keydict} which the database lacks"
            elif found is not None:
                assert column_values(found) == expected, f"{name} holds a stale {klass.__name__} {keydict} ({ident})"


def warm(stack: Stack, klass: type, keydicts: Sequence[dict[str, Any]]) -> None:
    """Read through the chain so that both cache layers hold the objects."""
    for keydict in keydicts:
        assert stack.chain.get(klass, keydict) is not None
    for name, layer in stack.layers:
        assert all(layer.get(klass, kd) is not None for kd in keydicts), f"{name} was not filled"


def author(author_id: int = 1, *book_ids: int, **values: Any) -> Author:
    values.setdefault("email", f"a{author_id}@x")
    values.setdefault("name", f"author {author_id}")
    if book_ids:
        values["books"] = [Book(id=i, title=f"book {i}") for i in book_ids]
    return Author(id=author_id, **values)


# ---------------------------------------------------------------------------
# 1. every row a flush deleted leaves every cache: cascades and orphans


def test_cascaded_delete_removes_the_children_everywhere(stack: Stack, path: str) -> None:
    seed(stack.engine, author(1, 10, 11))
    warm(stack, Book, [{"id": 10}, {"id": 11}])
    warm(stack, Author, [{"id": 1}, {"email": "a1@x"}])
    if path == "chain":
        stack.chain.delete(stack.chain.get(Author, {"id": 1}))
    else:
        with stack.Session() as session:
            session.delete(session.get(Author, 1))
            session.commit()
    for name, layer in stack.layers:
        assert layer.get(Book, {"id": 10}) is None, name
        assert layer.get(Book, {"id": 11}) is None, name
        assert layer.get(Author, {"email": "a1@x"}) is None, name
    assert stack.chain.get(Book, {"id": 10}) is None


def test_delete_orphan_through_a_merged_graph(stack: Stack, path: str) -> None:
    seed(stack.engine, author(1, 10, 11))
    warm(stack, Book, [{"id": 10}, {"id": 11}])
    replacement = author(1, 10)  # the graph as the application now wants it: book 11 is gone
    if path == "chain":
        stack.chain.put(replacement)
    else:
        with stack.Session() as session:
            session.merge(replacement)
            session.commit()
    assert truth(stack.engine, Book, 11) is None
    assert_layers_match(stack, Book, [{"id": 10}, {"id": 11}])
    assert stack.memory.get(Book, {"id": 11}) is None


# ---------------------------------------------------------------------------
# 2. children changed by a merge cascade (and by autoflush) are re-cached


def test_children_updated_by_a_merge_cascade(stack: Stack, path: str) -> None:
    seed(stack.engine, author(1, 10, 11))
    warm(stack, Book, [{"id": 10}, {"id": 11}])
    changed = author(1)
    changed.books = [Book(id=10, title="new title"), Book(id=11, title="book 11")]
    if path == "chain":
        stack.chain.put(changed)
    else:
        with stack.Session() as session:
            session.merge(changed)
            session.commit()
    assert truth(stack.engine, Book, 10)["title"] == repr("new title")  # type: ignore[index]
    assert_layers_match(stack, Book, [{"id": 10}, {"id": 11}])
    assert stack.chain.get(Book, {"id": 10}).title == "new title"  # type: ignore[union-attr]


def test_objects_written_by_autoflush(stack: Stack) -> None:
    seed(stack.engine, author(1, 10))
    warm(stack, Book, [{"id": 10}])
    with stack.Session() as session:
        session.get(Book, 10).title = "autoflushed"  # type: ignore[union-attr]
        assert session.scalars(select(Book).where(Book.title == "autoflushed")).one().id == 10
        session.commit()
    assert_layers_match(stack, Book, [{"id": 10}])


# ---------------------------------------------------------------------------
# 3. cached ORM entries hold column state only, on every fill path


def assert_column_state_only(obj: Any, relationship: str) -> None:
    state = sa.inspect(obj)
    assert state.detached, "a cached copy must be detached"
    assert not state.modified
    mapper = state.mapper
    assert {p.key for p in mapper.column_attrs} <= set(state.dict), "every column is loaded"
    assert not {r.key for r in mapper.relationships} & set(state.dict), "no relationship inside a cached entry"
    with pytest.raises(RelationshipNotCachedError, match=r"session\.merge\(obj, load=False\)"):
        getattr(obj, relationship)


def test_cached_entries_hold_column_state_on_every_fill_path(stack: Stack) -> None:
    seed(stack.engine, author(1, 10, 11, bio="long"), Tag(id=1, label="t1"))
    copies: dict[str, Any] = {}
    copies["get by primary key"] = stack.database.get(Author, {"id": 1})
    copies["get by a unique column"] = stack.database.get(Author, {"email": "a1@x"})
    copies["get by any column"] = stack.database.get(Author, {"name": "author 1"})
    copies["batch_get"] = stack.database.batch_get(Author, [{"id": 1}])[0]
    stack.chain.get(Author, {"id": 1})
    copies["filled from the database"] = stack.memory.get(Author, {"id": 1})
    copies["read back from memcached"] = stack.memcache.get(Author, {"id": 1})
    stack.chain.put(author(1, name="renamed"))
    copies["re-cached after a put"] = stack.memory.get(Author, {"id": 1})
    copies["memcached after a put"] = stack.memcache.get(Author, {"id": 1})
    with stack.Session() as session:
        session.get(Author, 1).name = "by session"  # type: ignore[union-attr]
        session.commit()
    copies["re-cached after a commit"] = stack.memory.get(Author, {"id": 1})
    copies["memcached after a commit"] = stack.memcache.get(Author, {"id": 1})
    for how, copy in copies.items():
        assert copy is not None, how
        try:
            assert_column_state_only(copy, "books")
            assert_column_state_only(copy, "tags")
        except AssertionError as exc:
            raise AssertionError(f"{how}: {exc}") from exc
    for how, copy in [
        ("book from the database", stack.database.get(Book, {"id": 10})),
        ("book batch_get", stack.database.batch_get(Book, [{"id": 10}, {"id": 11}])[1]),
    ]:
        try:
            assert_column_state_only(copy, "author")
        except AssertionError as exc:
            raise AssertionError(f"{how}: {exc}") from exc


def test_relationships_of_a_cached_copy_load_through_the_users_session(stack: Stack) -> None:
    seed(stack.engine, author(1, 10, 11), Tag(id=1, label="t1"))
    cached = stack.chain.get(Author, {"id": 1})
    with stack.Session() as session:
        session.get(Book, 11).title = "changed after caching"  # type: ignore[union-attr]
        writer = session.get(Author, 1)
        assert writer is not None
        writer.tags.append(session.get(Tag, 1))  # type: ignore[arg-type]
        session.commit()
    for copy in (cached, stack.memcache.get(Author, {"id": 1})):
        with plain_session(stack.engine) as session:
            attached = session.merge(copy, load=False)
            assert [(b.id, b.title) for b in attached.books] == [(10, "book 10"), (11, "changed after caching")]
            assert attached.books[0].author is attached
            assert [t.label for t in attached.tags] == ["t1"]
    with plain_session(stack.engine) as session:  # session.add() works too
        copy = stack.memcache.get(Author, {"id": 1})
        session.add(copy)
        assert [b.id for b in copy.books] == [10, 11]


# ---------------------------------------------------------------------------
# 4. bulk and Core writes through attached sessions


def upsert(engine: sa.Engine, **values: Any) -> Any:
    backend = backend_of(engine.url)
    if backend == "postgres":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt = pg_insert(Account).values(**values)
        return stmt.on_conflict_do_update(index_elements=[Account.id], set_={"balance": stmt.excluded.balance})
    if backend == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(Account).values(**values)
        return stmt.on_conflict_do_update(index_elements=[Account.id], set_={"balance": stmt.excluded.balance})
    from sqlalchemy.dialects.mysql import insert as mysql_insert

    stmt = mysql_insert(Account).values(**values)
    return stmt.on_duplicate_key_update(balance=stmt.inserted.balance)


BULK_WRITES: dict[str, Callable[[Session, Stack], None]] = {
    "dialect upsert": lambda s, st: s.execute(upsert(st.engine, id=1, name="a", balance=2)),  # type: ignore[dict-item]
    "bulk_update_mappings": lambda s, st: s.bulk_update_mappings(Account, [{"id": 1, "balance": 2}]),  # type: ignore[arg-type]
    "bulk_save_objects": lambda s, st: s.bulk_save_objects([_changed_copy(st)]),
    "update of a Core table": lambda s, st: s.execute(
        update(Account.__table__).where(Account.__table__.c.id == 1).values(balance=2)  # type: ignore[attr-defined]
    ),
    "Core update by another column": lambda s, st: s.execute(
        update(Account.__table__).where(Account.__table__.c.name == "a").values(balance=2)  # type: ignore[attr-defined]
    ),
    "ORM bulk update by primary key": lambda s, st: s.execute(update(Account), [{"id": 1, "balance": 2}]),  # type: ignore[dict-item]
    "Core executemany by primary key": lambda s, st: s.execute(
        update(Account.__table__)  # type: ignore[attr-defined]
        .where(Account.__table__.c.id == sa.bindparam("ident"))  # type: ignore[attr-defined]
        .values(balance=sa.bindparam("amount")),
        [{"ident": 1, "amount": 2}, {"ident": 3, "amount": 2}],
    ),
}


def _changed_copy(stack: Stack) -> Account:
    copy = stack.database.get(Account, {"id": 1})  # a detached copy of the application's
    assert copy is not None
    copy.balance = 2
    return copy


@pytest.mark.parametrize("how", list(BULK_WRITES))
def test_bulk_writes_through_a_session_reach_the_caches(stack: Stack, how: str) -> None:
    seed(stack.engine, Account(id=1, name="a", balance=1), Account(id=2, name="b", balance=1))
    warm(stack, Account, [{"id": 1}, {"id": 2}])
    with stack.Session() as session:
        BULK_WRITES[how](session, stack)
        session.commit()
    assert truth(stack.engine, Account, 1)["balance"] == "2"  # type: ignore[index]
    assert_layers_match(stack, Account, [{"id": 1}, {"id": 2}])
    assert stack.memory.get(Account, {"id": 2}) is not None, "a row the statement did not touch stays cached"
    assert stack.chain.get(Account, {"id": 1}).balance == 2  # type: ignore[union-attr]
    assert stack.ext.errors == 0


def test_unknown_rows_invalidate_the_whole_class(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    seed(stack.engine, Account(id=1, name="a", balance=1), Author(id=1, email="a1@x"))
    warm(stack, Account, [{"id": 1}])
    warm(stack, Author, [{"id": 1}])
    table = Account.__tablename__
    with caplog.at_level(logging.ERROR), stack.Session() as session:
        session.execute(text(f"UPDATE {table} SET balance = 2"))
        session.commit()
    assert stack.memory.get(Account, {"id": 1}) is None, "process memory dropped every Account"
    assert stack.memory.get(Author, {"id": 1}) is not None, "other classes are untouched"
    # memcached too: the class has a new generation, so its old entries are unreachable
    assert stack.memcache.get(Account, {"id": 1}) is None
    assert stack.memcache.get(Author, {"id": 1}) is not None
    assert stack.caches.stats()[1].errors == 0
    assert "cannot invalidate" not in caplog.text
    fresh = stack.chain.get(Account, {"id": 1})
    assert fresh is not None and fresh.balance == 2


def test_core_statement_on_a_session_connection(stack: Stack) -> None:
    seed(stack.engine, Account(id=1, name="a", balance=1))
    warm(stack, Account, [{"id": 1}])
    with stack.Session() as session:
        session.connection().execute(
            update(Account.__table__).where(Account.__table__.c.id == 1).values(balance=5)  # type: ignore[attr-defined]
        )
        session.commit()
    assert_layers_match(stack, Account, [{"id": 1}])


def test_bulk_insert_mappings_and_plain_inserts_are_harmless(stack: Stack) -> None:
    with stack.Session() as session:
        session.bulk_insert_mappings(Account, [{"id": 1, "name": "a"}])  # type: ignore[arg-type]
        session.execute(insert(Account).values(id=2, name="b"))
        session.commit()
    assert stack.chain.get(Account, {"id": 1}).name == "a"  # type: ignore[union-attr]
    assert stack.chain.get(Account, {"id": 2}).name == "b"  # type: ignore[union-attr]
    assert stack.ext.errors == 0


# ---------------------------------------------------------------------------
# 5. a put writes only what the caller changed (in-process form; the
#    two-process form is in test_sqlalchemy_processes.py)


def test_a_stale_copy_never_reverts_another_writers_columns(stack: Stack) -> None:
    seed(stack.engine, Account(id=1, name="ada", balance=100))
    other = Stack(stack.engine, stack.address, stack.namespace)  # process B: its own process memory
    try:
        stale = other.chain.get(Account, {"id": 1})  # process B caches its copy
        renamed = stack.chain.get(Account, {"id": 1})  # process A renames
        assert renamed is not None and stale is not None
        renamed.name = "ada lovelace"
        stack.chain.put(renamed)
        stale.balance = 50
        other.chain.put(stale)
        assert truth(stack.engine, Account, 1) == {"id": "1", "name": repr("ada lovelace"), "balance": "50"}
        assert other.chain.get(Account, {"id": 1}).name == "ada lovelace"  # type: ignore[union-attr]
        # an unmodified stale copy writes nothing
        untouched = other.database.get(Account, {"id": 1})
        with plain_session(stack.engine) as session:
            session.get(Account, 1).name = "third"  # type: ignore[union-attr]
            session.commit()
        other.chain.put(untouched)
        assert truth(stack.engine, Account, 1)["name"] == repr("third")  # type: ignore[index]
        assert other.memory.get(Account, {"id": 1}).name == "third"  # type: ignore[union-attr]
    finally:
        other.release()


def test_a_stale_versioned_copy_is_refused(stack: Stack) -> None:
    seed(stack.engine, Wallet(id=1, owner="ada", balance=100))
    stale = stack.database.get(Wallet, {"id": 1})
    fresh = stack.chain.get(Wallet, {"id": 1})
    assert stale is not None and fresh is not None
    fresh.owner = "ada lovelace"
    stack.chain.put(fresh)
    stale.balance = 50
    with pytest.raises(StaleVersionError, match="another writer"):
        stack.chain.put(stale)
    assert truth(stack.engine, Wallet, 1) == {
        "id": "1",
        "owner": repr("ada lovelace"),
        "balance": "100",
        "version": "2",
    }
    assert_layers_match(stack, Wallet, [{"id": 1}])


# ---------------------------------------------------------------------------
# 6. versions that do not order are equality tokens


def test_uuid_versions_never_freeze_the_cache(stack: Stack, path: str) -> None:
    seed(stack.engine, Document(id=1, body="v0"))
    stack.chain.get(Document, {"id": 1})
    for round_ in range(1, 41):
        if path == "chain":
            doc = stack.chain.get(Document, {"id": 1})
            assert doc is not None
            doc.body = f"v{round_}"
            stack.chain.put(doc)
        else:
            with stack.Session() as session:
                session.get(Document, 1).body = f"v{round_}"  # type: ignore[union-attr]
                session.commit()
        for name, layer in stack.layers:
            found = layer.get(Document, {"id": 1})
            assert found is not None and found.body == f"v{round_}", f"{name} froze before update {round_}"
    assert stack.caches.stats().errors == 0


def test_integer_versions_still_order_the_caches(stack: Stack) -> None:
    seed(stack.engine, Wallet(id=1, owner="ada"))
    old = stack.chain.get(Wallet, {"id": 1})
    new = stack.database.get(Wallet, {"id": 1})
    assert old is not None and new is not None
    new.balance = 7
    stack.chain.put(new)
    for _name, layer in stack.layers:
        layer.put(old)  # a late write of version 1 ...
        assert layer.get(Wallet, {"id": 1}).version == 2  # type: ignore[union-attr]  # ... never wins


# ---------------------------------------------------------------------------
# 7. the caches hold what the database stored


def test_caches_hold_the_stored_values(stack: Stack, path: str) -> None:
    seed(stack.engine, author(1))
    assigned: dict[str, Any] = {"price": Decimal("1.005"), "code": "ab", "published": dt.datetime(2024, 1, 2, 13, 45)}
    book = Book(id=10, author_id=1, **assigned)
    moment = dt.datetime(2024, 1, 2, 13, 45, tzinfo=TZ)
    event = Event(id=1, starts_at=moment, ends_at=moment)
    if path == "chain":
        stack.chain.batch_put([book, event])
        assert column_values(book) == truth(stack.engine, Book, 10), "the caller's object holds the stored values"
    else:
        with stack.Session() as session:
            session.add_all([book, event])
            session.commit()
    for name, layer in stack.layers:
        assert column_values(layer.get(Book, {"id": 10})) == truth(stack.engine, Book, 10), name
        assert column_values(layer.get(Event, {"id": 1})) == truth(stack.engine, Event, 1), name


def reads_after_first_write(statements: list[str]) -> int:
    """SELECTs sent after the first INSERT/UPDATE: the cost of reading stored values back."""
    verbs = [s.lstrip().split(None, 1)[0].upper() for s in statements]
    first = next(i for i, verb in enumerate(verbs) if verb in ("INSERT", "UPDATE"))
    return sum(verb == "SELECT" for verb in verbs[first:])


def test_reading_stored_values_back_costs_one_select_per_chunk(db: sa.Engine) -> None:
    store = SqlAlchemyStore(engine=db, chunk_size=500)
    with QueryCounter(db) as queries:
        store.batch_put([Account(id=i, name=f"n{i}") for i in range(1, 1201)])
    assert reads_after_first_write(queries.statements) == 3  # 1200 rows, 500 per SELECT
    with QueryCounter(db) as queries:
        store.batch_put([Account(id=i, name=f"again {i}") for i in range(1, 1201)])
    assert reads_after_first_write(queries.statements) == 3
    assert (
        sum(s.lstrip().upper().startswith("SELECT") for s in queries.statements) == 6
    )  # the rows are loaded per chunk too
    with QueryCounter(db) as queries:
        store.put(Account(id=1, name="renamed"))
    assert reads_after_first_write(queries.statements) == 1
    assert store.get(Account, {"id": 1}).name == "renamed"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------
# 8. deferred columns are loaded in every copy, and such classes are cached


def test_deferred_columns_are_loaded_everywhere(stack: Stack, path: str) -> None:
    if path == "chain":
        stack.chain.put(author(1, bio="a long text"))
    else:
        with stack.Session() as session:
            session.add(author(1, bio="a long text"))
            session.commit()
        assert stack.memory.get(Author, {"id": 1}) is not None, "the extension caches classes with deferred columns"
    copies = [
        stack.database.get(Author, {"id": 1}),
        stack.database.get(Author, {"email": "a1@x"}),
        stack.database.batch_get(Author, [{"id": 1}, {"email": "a1@x"}])[1],
        stack.chain.get(Author, {"id": 1}),
        stack.memory.get(Author, {"email": "a1@x"}),
        stack.memcache.get(Author, {"email": "a1@x"}),
    ]
    assert [c.bio if c is not None else None for c in copies] == ["a long text"] * len(copies)


# ---------------------------------------------------------------------------
# 9. primary-key and unique-key moves leave no ghost


def test_primary_key_move_leaves_no_ghost(stack: Stack, path: str) -> None:
    seed(stack.engine, Account(id=1, name="a", balance=1))
    warm(stack, Account, [{"id": 1}])
    if path == "chain":
        moved = stack.chain.get(Account, {"id": 1})
        assert moved is not None
        moved.id = 2
        stack.chain.put(moved)
    else:
        with stack.Session() as session:
            session.get(Account, 1).id = 2  # type: ignore[union-attr]
            session.commit()
    assert truth(stack.engine, Account, 1) is None
    assert_layers_match(stack, Account, [{"id": 1}, {"id": 2}])
    assert stack.chain.get(Account, {"id": 1}) is None
    # another process, reading through memcached, sees no ghost either
    code = (
        "import support.orm_models as m\n"
        "from stockpyle.stores.memcache import MemcacheStore\n"
        f"store = MemcacheStore([{stack.address!r}], namespace={stack.namespace!r})\n"
        "print(store.get(m.Account, {'id': 1}))\n"
    )
    assert run_python(code) == "None"


def test_unique_key_move_leaves_no_ghost(stack: Stack, path: str) -> None:
    seed(stack.engine, author(1))
    warm(stack, Author, [{"email": "a1@x"}])
    if path == "chain":
        moved = stack.chain.get(Author, {"email": "a1@x"})
        assert moved is not None
        moved.email = "moved@x"
        stack.chain.put(moved)
    else:
        with stack.Session() as session:
            session.get(Author, 1).email = "moved@x"  # type: ignore[union-attr]
            session.commit()
    assert_layers_match(stack, Author, [{"email": "a1@x"}, {"email": "moved@x"}])


# ---------------------------------------------------------------------------
# 10. keys of mapped classes do not depend on what was imported


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
    env["STOCKPYLE_TEST_TABLE_SUFFIX"] = table_name("x").removeprefix("sp_x_")
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_a_cache_only_reader_keys_mapped_classes(stack: Stack) -> None:
    stack.chain.put(author(1, bio="bio"))
    code = (
        "import sys\n"
        "import support.orm_models as m\n"
        "from stockpyle.stores.memcache import MemcacheStore\n"
        "assert 'stockpyle.stores.sqlalchemy' not in sys.modules\n"
        f"store = MemcacheStore([{stack.address!r}], namespace={stack.namespace!r})\n"
        "found = store.get(m.Author, {'email': 'a1@x'})\n"
        "print(found.id, found.name, found.bio)\n"
    )
    assert run_python(code) == "1 author 1 bio"


# ---------------------------------------------------------------------------
# 11. objects the store does not map are counted and reported once per class


def test_unmapped_objects_are_logged_once_and_counted(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="stockpyle.stores.sqlalchemy"):
        stack.chain.put(Note("a"))
        stack.chain.batch_put([Note("b"), Account(id=1, name="mapped")])
        stack.chain.delete(Note("a"))
    warnings = [r for r in caplog.records if "Note" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert warnings[0].levelno == logging.WARNING
    assert "only in the cache layers" in warnings[0].getMessage()
    stats = stack.database.stats()
    assert stats.ignored == 3
    assert stats.as_dict()["ignored"] == 3
    assert stack.chain.get(Note, {"key": "b"}).key == "b"  # type: ignore[union-attr]  # still cached: the chain keeps plain classes


# ---------------------------------------------------------------------------
# 12. a missing table or column is the same configuration error everywhere


def test_missing_table_is_a_schema_error(db: sa.Engine) -> None:
    store = SqlAlchemyStore(engine=db)
    operations: list[Callable[[], Any]] = [
        lambda: store.get(Missing, {"id": 1}),
        lambda: store.get(Missing, {"label": "x"}),
        lambda: store.batch_get(Missing, [{"id": 1}, {"id": 2}]),
        lambda: store.put(Missing(id=1)),
        lambda: store.delete(Missing(id=1)),
    ]
    for operation in operations:
        with pytest.raises(SchemaError, match="create_all") as caught:
            operation()
        assert isinstance(caught.value, ConfigurationError)
        assert isinstance(caught.value, StoreError)
        assert not isinstance(caught.value, StoreUnavailableError)
        assert caught.value.__cause__ is not None


def test_missing_column_is_a_schema_error(db: sa.Engine) -> None:
    narrow = sa.MetaData()
    sa.Table(Missing.__tablename__, narrow, sa.Column("id", sa.Integer, primary_key=True, autoincrement=False))
    narrow.create_all(db)
    try:
        store = SqlAlchemyStore(engine=db)
        with pytest.raises(SchemaError):
            store.get(Missing, {"id": 1})
        with pytest.raises(SchemaError):
            store.put(Missing(id=1, label="x"))
    finally:
        narrow.drop_all(db)
