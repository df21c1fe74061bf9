"""StockpyleSessionExtension: ORM writes reach the cache only after the outermost COMMIT."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy import delete, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, scoped_session
from sqlalchemy.orm import sessionmaker as sa_sessionmaker
from support.databases import MYSQL_TABLE_ARGS, create_tables, drop_tables, empty_tables, table_name

from stockpyle import ProcessMemoryStore
from stockpyle.exceptions import ConfigurationError
from stockpyle.ext.sqlalchemy import StockpyleSessionExtension, sessionmaker


class Base(DeclarativeBase):
    pass


class User(Base):
    """Keyed by ``id`` and by ``email`` (primary key and unique NOT NULL column)."""

    __tablename__ = table_name("ext_user")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(sa.String(80), unique=True)
    name: Mapped[str] = mapped_column(sa.String(80), default="")
    level: Mapped[str] = mapped_column(sa.String(20), server_default="basic")
    addresses: Mapped[list[Address]] = relationship(cascade="all, delete-orphan", back_populates="user")


class Address(Base):
    __tablename__ = table_name("ext_address")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey(User.id))
    city: Mapped[str] = mapped_column(sa.String(80))
    user: Mapped[User] = relationship(back_populates="addresses")


class Odd(Base):
    """A malformed key declaration: the extension skips the class instead of failing the flush."""

    __tablename__ = table_name("ext_odd")
    __table_args__ = (MYSQL_TABLE_ARGS,)
    __stockpyle_keys__: ClassVar[Any] = "id"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


class RecordingStore(ProcessMemoryStore):
    """A process-memory cache that also records the batch calls it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def batch_put(self, objs: Iterable[object]) -> None:
        items = list(objs)
        self.calls.append(("batch_put", len(items)))
        super().batch_put(items)

    def batch_delete(self, objs: Iterable[object]) -> None:
        items = list(objs)
        self.calls.append(("batch_delete", len(items)))
        super().batch_delete(items)


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
def cache() -> RecordingStore:
    return RecordingStore()


@pytest.fixture
def ext(cache: RecordingStore) -> StockpyleSessionExtension:
    return StockpyleSessionExtension(store=cache)


@pytest.fixture
def maker(db: sa.Engine, ext: StockpyleSessionExtension) -> sa_sessionmaker[Session]:
    return sessionmaker(extension=ext, bind=db)


def cached_user(cache: Any, **keydict: Any) -> Any:
    return cache.get(User, keydict)


def add_users(maker: Any, *ids: int) -> None:
    with maker() as session:
        session.add_all([User(id=i, email=f"u{i}@x", name=f"user {i}") for i in ids])
        session.commit()


def assert_cache_matches_database(cache: Any, db: sa.Engine) -> None:
    """Every cached user equals its row, and every row not cached is fine (a miss)."""
    with sa_sessionmaker(db)() as session:
        rows = {u.id: (u.email, u.name, u.level) for u in session.scalars(sa.select(User))}
    for user_id in range(1, 30):
        found = cached_user(cache, id=user_id)
        if found is not None:
            assert user_id in rows, f"user {user_id} is cached but not in the database"
            assert (found.email, found.name, found.level) == rows[user_id]
            assert cached_user(cache, email=found.email) is found


# ---------------------------------------------------------------------------
# construction and attaching


def test_a_store_is_required() -> None:
    with pytest.raises(ConfigurationError, match="needs the cache store"):
        StockpyleSessionExtension()
    with pytest.raises(ConfigurationError, match="is not a store"):
        StockpyleSessionExtension(store=object())
    with pytest.raises(ConfigurationError, match="must be a StockpyleSessionExtension"):
        sessionmaker(extension=[object()])  # type: ignore[list-item]


def test_attach_targets(db: sa.Engine, cache: RecordingStore, ext: StockpyleSessionExtension) -> None:
    class MySession(Session):
        pass

    plain = sa_sessionmaker(db)
    scoped = scoped_session(sa_sessionmaker(db))
    assert ext.attach(scoped) is scoped
    ext.attach(MySession)
    ext.attach(MySession)  # twice: still one set of listeners
    with pytest.raises(ConfigurationError, match="every session"):
        ext.attach(Session)
    with pytest.raises(ConfigurationError, match="cannot attach"):
        ext.attach("nope")

    scoped.add(User(id=1, email="scoped@x"))
    scoped.commit()
    scoped.remove()
    with MySession(bind=db) as session:
        session.add(User(id=2, email="subclass@x"))
        session.commit()
    one = plain()
    ext.attach(one)
    one.add(User(id=3, email="one@x"))
    one.commit()
    one.close()
    with plain() as other:  # not attached: invisible to the cache
        other.add(User(id=4, email="plain@x"))
        other.commit()
    assert [u.email if u else None for u in cache.batch_get(User, [{"id": i} for i in (1, 2, 3, 4)])] == [
        "scoped@x",
        "subclass@x",
        "one@x",
        None,
    ]
    assert cache.calls.count(("batch_put", 1)) == 3
    ext.detach(MySession)
    with MySession(bind=db) as session:
        session.add(User(id=5, email="detached@x"))
        session.commit()
    assert cached_user(cache, id=5) is None


# ---------------------------------------------------------------------------
# what reaches the cache, and when


def test_commit_puts_detached_copies_with_committed_values(maker: Any, cache: RecordingStore, db: sa.Engine) -> None:
    with maker() as session:
        user = User(id=1, email="a@x", name="Ann")
        session.add(user)
        session.flush()
        assert cached_user(cache, id=1) is None  # flushed is not committed
        session.commit()
        found = cached_user(cache, id=1)
        assert found is not None
        assert found is not user  # never the live, session-bound instance
        assert sa.inspect(found).detached
    # readable after every session is gone, server default included
    assert (found.id, found.email, found.name, found.level) == (1, "a@x", "Ann", "basic")
    assert cached_user(cache, email="a@x") is found
    assert cache.calls == [("batch_put", 1)]
    # and usable in a new session: merge without SQL-level surprises
    with sa_sessionmaker(db)() as session:
        merged = session.merge(found)
        merged.name = "Annie"
        session.commit()
        assert merged.name == "Annie"


def test_one_batch_delete_then_one_batch_put_per_commit(maker: Any, cache: RecordingStore) -> None:
    add_users(maker, 1, 2, 3)
    cache.calls.clear()
    with maker() as session:
        session.get(User, 1).name = "changed"  # type: ignore[union-attr]
        session.delete(session.get(User, 2))
        session.add(User(id=4, email="u4@x"))
        session.flush()
        session.get(User, 3).email = "moved@x"  # type: ignore[union-attr]
        session.commit()
    assert cache.calls == [("batch_delete", 2), ("batch_put", 3)]
    assert cached_user(cache, id=2) is None
    assert cached_user(cache, id=1).name == "changed"


def test_rollback_after_flush_changes_nothing(maker: Any, cache: RecordingStore, db: sa.Engine) -> None:
    add_users(maker, 1)
    cache.calls.clear()
    with maker() as session:
        session.get(User, 1).name = "rolled back"  # type: ignore[union-attr]
        session.add(User(id=2, email="u2@x"))
        session.flush()
        session.rollback()
    assert cache.calls == []
    assert cached_user(cache, id=1).name == "user 1"
    assert cached_user(cache, id=2) is None
    assert_cache_matches_database(cache, db)


def test_failed_flush_changes_nothing(maker: Any, cache: RecordingStore, db: sa.Engine) -> None:
    add_users(maker, 1)
    cache.calls.clear()
    with maker() as session:
        session.add(User(id=2, email="u2@x"))
        session.flush()
        session.add(User(id=3, email="u1@x"))  # duplicate email
        with pytest.raises(sa.exc.IntegrityError):
            session.commit()
        session.rollback()
        session.add(User(id=5, email="u5@x"))
        session.commit()
    assert cache.calls == [("batch_put", 1)]
    assert [cached_user(cache, id=i) is not None for i in (1, 2, 3, 5)] == [True, False, False, True]
    assert_cache_matches_database(cache, db)


def test_savepoint_rolled_back_inside_committed_transaction(maker: Any, cache: RecordingStore, db: sa.Engine) -> None:
    add_users(maker, 1, 2)
    with maker() as session:
        session.get(User, 1).name = "outer"  # type: ignore[union-attr]
        savepoint = session.begin_nested()
        session.get(User, 2).name = "inner"  # type: ignore[union-attr]
        session.add(User(id=3, email="u3@x"))
        session.delete(session.get(User, 1))
        session.flush()
        savepoint.rollback()
        session.commit()
    assert cached_user(cache, id=1).name == "outer"
    assert cached_user(cache, id=2).name == "user 2"
    assert cached_user(cache, id=3) is None
    assert_cache_matches_database(cache, db)


def test_savepoint_released_then_outer_rollback(maker: Any, cache: RecordingStore, db: sa.Engine) -> None:
    add_users(maker, 1)
    cache.calls.clear()
    with maker() as session:
        with session.begin_nested():
            session.get(User, 1).name = "released"  # type: ignore[union-attr]
            session.add(User(id=2, email="u2@x"))
        with session.begin_nested():
            session.delete(session.get(User, 1))
        session.rollback()
    assert cache.calls == []
    assert cached_user(cache, id=1).name == "user 1"
    assert_cache_matches_database(cache, db)


def test_released_savepoints_apply_at_the_outer_commit(maker: Any, cache: RecordingStore, db: sa.Engine) -> None:
    add_users(maker, 1, 2)
    cache.calls.clear()
    with maker() as session:
        with session.begin_nested():
            session.get(User, 1).name = "first"  # type: ignore[union-attr]
            with session.begin_nested():
                session.get(User, 1).name = "second"  # type: ignore[union-attr]
        assert cache.calls == []
        with session.begin_nested():
            session.delete(session.get(User, 2))
        session.commit()
    assert cached_user(cache, id=1).name == "second"
    assert cached_user(cache, id=2) is None
    assert cache.calls == [("batch_delete", 1), ("batch_put", 1)]
    assert_cache_matches_database(cache, db)


def test_delete_orphan_cascade_invalidates_children(maker: Any, cache: RecordingStore) -> None:
    with maker() as session:
        user = User(id=1, email="u1@x", addresses=[Address(id=10, city="Oslo"), Address(id=11, city="Rome")])
        session.add(user)
        session.commit()
        assert cache.get(Address, {"id": 10}).city == "Oslo"
        user.addresses.remove(next(a for a in user.addresses if a.id == 10))  # orphaned
        session.commit()
        assert cache.get(Address, {"id": 10}) is None
        assert cache.get(Address, {"id": 11}).city == "Rome"
        session.delete(user)  # cascades to the remaining address
        session.commit()
    assert cache.get(Address, {"id": 11}) is None
    assert cached_user(cache, id=1) is None


def test_changed_key_attribute_removes_the_old_entries(maker: Any, cache: RecordingStore, db: sa.Engine) -> None:
    add_users(maker, 1, 2)
    with maker() as session:
        user = session.get(User, 1)
        user.email = "new1@x"  # type: ignore[union-attr]
        session.commit()
        # after the commit every attribute is expired: history cannot know the
        # old value, so the extension reads it before the flush
        user2 = session.get(User, 2)
        session.expire(user2)
        user2.email = "new2@x"  # type: ignore[union-attr]
        session.commit()
    assert cached_user(cache, email="u1@x") is None
    assert cached_user(cache, email="u2@x") is None
    assert cached_user(cache, email="new1@x").id == 1
    assert cached_user(cache, email="new2@x").id == 2
    assert_cache_matches_database(cache, db)


def test_bulk_update_and_delete_statements_invalidate(maker: Any, cache: RecordingStore, db: sa.Engine) -> None:
    add_users(maker, 1, 2, 3, 4, 5)
    with maker() as session:
        session.execute(update(User).where(User.id >= 4).values(name="bulk"))
        session.commit()
    assert [cached_user(cache, id=i) is not None for i in range(1, 6)] == [True, True, True, False, False]
    assert cached_user(cache, email="u4@x") is None
    with maker() as session:
        session.execute(delete(User).where(User.id == 1))
        session.commit()
    assert cached_user(cache, id=1) is None
    assert cached_user(cache, email="u1@x") is None
    with maker() as session:  # rolled back: nothing invalidated
        session.execute(delete(User).where(User.id == 2))
        session.rollback()
    assert cached_user(cache, id=2) is not None
    with maker() as session:  # ORM bulk UPDATE by primary key (executemany)
        session.execute(update(User), [{"id": 2, "name": "by pk"}, {"id": 3, "name": "by pk"}])
        session.commit()
    assert cached_user(cache, id=2) is None
    assert cached_user(cache, id=3) is None
    with maker() as session:  # legacy Query.update goes through the same event
        session.query(User).filter(User.id == 5).update({"name": "legacy"})
        session.commit()
    assert_cache_matches_database(cache, db)


def test_bulk_statements_after_a_flush_win_over_the_flushed_snapshot(
    maker: Any, cache: RecordingStore, db: sa.Engine
) -> None:
    with maker() as session:
        session.add_all([User(id=1, email="u1@x", name="a"), User(id=2, email="u2@x", name="x")])
        session.flush()  # snapshots of both rows are taken here...
        session.execute(update(User).where(User.id == 1).values(name="b"))  # ...then changed in SQL
        session.execute(delete(User).where(User.id == 2))
        session.commit()
    assert cached_user(cache, id=1) is None or cached_user(cache, id=1).name == "b"
    assert cached_user(cache, id=2) is None
    assert cached_user(cache, email="u2@x") is None
    assert_cache_matches_database(cache, db)


def test_objects_without_usable_keys_never_break_a_commit(maker: Any, cache: RecordingStore) -> None:
    with maker() as session:
        session.add_all([Odd(id=1), User(id=1, email="u1@x")])
        session.commit()
    assert cached_user(cache, id=1) is not None
    with sa_sessionmaker(maker.kw["bind"])() as session:
        assert session.get(Odd, 1) is not None


# ---------------------------------------------------------------------------
# failures of the cache


def test_cache_failure_never_escapes_commit(
    db: sa.Engine, memcached_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from stockpyle.stores.memcache import MemcacheStore

    dead = MemcacheStore([memcached_factory.free_address()], namespace="ext-dead")
    ext = StockpyleSessionExtension(store=dead)
    maker = sessionmaker(extension=ext, bind=db)
    with caplog.at_level(logging.ERROR, logger="stockpyle.ext.sqlalchemy"), maker() as session:
        session.add(User(id=1, email="u1@x"))
        session.commit()  # the row is committed although the cache is down
        session.delete(session.get(User, 1))
        session.commit()
    assert ext.errors == 2
    assert "could not put 1 object(s)" in caplog.text
    assert "could not delete" in caplog.text
    with sa_sessionmaker(db)() as session:
        assert session.get(User, 1) is None
    dead.release()


# ---------------------------------------------------------------------------
# sessions and threads


def test_sessions_and_threads_do_not_share_state(maker: Any, cache: RecordingStore, db: sa.Engine) -> None:
    if db.dialect.name == "sqlite":
        pytest.skip("SQLite allows one writer at a time; the server databases exercise concurrency")
    add_users(maker, *range(1, 9))
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def work(worker: int) -> None:
        try:
            barrier.wait()
            for round_ in range(5):
                with maker() as committed, maker() as abandoned:
                    committed.get(User, worker).name = f"w{worker} r{round_}"  # type: ignore[union-attr]
                    abandoned.get(User, worker + 4).name = "never"  # type: ignore[union-attr]
                    abandoned.flush()
                    committed.commit()
                    abandoned.rollback()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    for worker in range(1, 5):
        assert cached_user(cache, id=worker).name == f"w{worker} r4"
        assert cached_user(cache, id=worker + 4).name == f"user {worker + 4}"
    assert_cache_matches_database(cache, db)
    assert db.pool.checkedout() == 0
