"""The cache-aside pattern of shared/seeds/004, done with stockpyle.

The seed hand-writes ``MemcachedORMObject``: fetch by primary key through
memcached, and keep memcached in step on update, refresh and delete.  Here the
same behaviour is configuration: a Storable mapped class bound to
``ChainedStore([ProcessMemoryStore, MemcacheStore, SqlAlchemyStore])`` plus a
StockpyleSessionExtension on the application's sessions.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support.databases import MYSQL_TABLE_ARGS, QueryCounter, create_tables, drop_tables, table_name

from stockpyle import ChainedStore, ProcessMemoryStore, Storable
from stockpyle.ext.sqlalchemy import StockpyleSessionExtension, sessionmaker
from stockpyle.stores.sqlalchemy import SqlAlchemyStore

pytestmark = pytest.mark.memcache


class Base(DeclarativeBase):
    pass


class Account(Storable, Base):
    """A mapped, Storable class: keyed by its primary key (no __stockpyle_keys__ needed)."""

    __tablename__ = table_name("seed_account")
    __table_args__ = (MYSQL_TABLE_ARGS,)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(sa.String(50))
    balance: Mapped[int] = mapped_column(default=0)
    plan: Mapped[str] = mapped_column(sa.String(20), server_default="free")


class Setup:
    def __init__(self, engine: sa.Engine, address: str) -> None:
        from stockpyle.stores.memcache import MemcacheStore

        self.engine = engine
        self.namespace = f"seed004-{secrets.token_hex(6)}"
        self.memory = ProcessMemoryStore()
        self.memcache = MemcacheStore([address], namespace=self.namespace)
        self.database = SqlAlchemyStore(engine=engine)
        # reads and Storable writes go through every layer
        self.chain = ChainedStore([self.memory, self.memcache, self.database])
        Account.bind_store(self.chain)
        # the application's own sessions keep the two cache layers in step
        self.ext = StockpyleSessionExtension(store=ChainedStore([self.memory, self.memcache]))
        self.Session = sessionmaker(extension=self.ext, bind=engine)


@pytest.fixture
def setup(module_engine: sa.Engine, memcached_server: Any) -> Iterator[Setup]:
    create_tables(module_engine, Base.metadata)
    built = Setup(module_engine, memcached_server.address)
    try:
        yield built
    finally:
        Account.unbind_store()
        built.memcache.release()
        drop_tables(module_engine, Base.metadata)


def test_seed_004_pattern(setup: Setup, memcached_server: Any) -> None:
    from stockpyle.stores.memcache import MemcacheStore

    shared = MemcacheStore([memcached_server.address], namespace=setup.namespace)
    engine = setup.engine

    # create: the database assigns the id and the plan; every layer holds the complete row
    account = Account(name="ada", balance=5)
    account.put()
    assert isinstance(account.id, int)
    assert account.plan == "free"
    from_memcached = shared.get(Account, {"id": account.id})
    assert (from_memcached.name, from_memcached.balance, from_memcached.plan) == ("ada", 5, "free")

    # fetch by primary key through the cache: no SQL at all
    with QueryCounter(engine) as queries:
        fetched = Account.get({"id": account.id})
    assert queries.count == 0
    assert fetched is not None
    assert (fetched.name, fetched.balance) == ("ada", 5)

    # update through the application's own session: both cache layers follow the commit
    with setup.Session() as session:
        row = session.get(Account, account.id)
        assert row is not None
        row.balance = 50
        session.commit()
    with QueryCounter(engine) as queries:
        assert Account.get({"id": account.id}).balance == 50  # type: ignore[union-attr]
    assert queries.count == 0
    assert shared.get(Account, {"id": account.id}).balance == 50

    # update through Storable on an object read from the cache (merge happens inside the store)
    cached = Account.get({"id": account.id})
    assert cached is not None
    cached.name = "ada lovelace"
    cached.put()
    with setup.Session() as session:
        assert session.get(Account, account.id).name == "ada lovelace"  # type: ignore[union-attr]
    assert shared.get(Account, {"id": account.id}).name == "ada lovelace"

    # refresh: a write that bypassed the hooks (raw SQL) is re-read from the
    # database and written back through the chain
    with engine.begin() as connection:
        connection.execute(sa.update(Account).where(Account.id == account.id).values(balance=77))
    assert Account.get({"id": account.id}).balance == 50  # type: ignore[union-attr]  # stale, as expected
    fresh = setup.database.get(Account, {"id": account.id})
    assert fresh is not None
    setup.chain.put(fresh)
    assert Account.get({"id": account.id}).balance == 77  # type: ignore[union-attr]
    assert shared.get(Account, {"id": account.id}).balance == 77

    # a rolled-back change never reaches the cache
    with setup.Session() as session:
        session.get(Account, account.id).balance = -1  # type: ignore[union-attr]
        session.flush()
        session.rollback()
    assert Account.get({"id": account.id}).balance == 77  # type: ignore[union-attr]

    # delete through the session: gone from every layer
    with setup.Session() as session:
        session.delete(session.get(Account, account.id))
        session.commit()
    assert shared.get(Account, {"id": account.id}) is None
    assert setup.memory.get(Account, {"id": account.id}) is None
    assert Account.get({"id": account.id}) is None

    # delete through Storable
    other = Account(name="bob")
    other.put()
    other.delete()
    assert shared.get(Account, {"id": other.id}) is None
    assert Account.get({"id": other.id}) is None
    assert setup.ext.errors == 0
    shared.release()
