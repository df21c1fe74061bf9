"""The store contract against SqlAlchemyStore on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from support.databases import (
    MAPPED_MODELS,
    contract_metadata,
    create_tables,
    drop_tables,
    hostile_values_for,
    make_engine,
)

from stockpyle.stores.sqlalchemy import SqlAlchemyStore
from stockpyle.testing import ContractModels, StoreContract


class _SqlContract(StoreContract):
    """SqlAlchemyStore on one backend: rows never expire; inheritance answers for base classes."""

    expires: ClassVar[bool] = False
    polymorphic_always: ClassVar[bool] = True
    models: ClassVar[ContractModels] = MAPPED_MODELS
    backend: ClassVar[str] = "sqlite"
    engine: sa.Engine

    @pytest.fixture(autouse=True)
    def _database(self, request: pytest.FixtureRequest) -> Iterator[None]:
        url = request.getfixturevalue(f"{self.backend}_url")
        self.engine = make_engine(url)
        create_tables(self.engine, contract_metadata)
        try:
            yield
        finally:
            drop_tables(self.engine, contract_metadata)
            self.engine.dispose()

    def make_store(self, **options: Any) -> Any:
        # a fresh namespace: every contract table emptied
        with self.engine.begin() as connection:
            for table in reversed(contract_metadata.sorted_tables):
                connection.execute(table.delete())
        return SqlAlchemyStore(engine=self.engine, **options)


class TestSqliteContract(_SqlContract):
    backend: ClassVar[str] = "sqlite"


@pytest.mark.postgres
class TestPostgresContract(_SqlContract):
    backend: ClassVar[str] = "postgres"
    hostile_values: ClassVar[tuple[str, ...]] = hostile_values_for("postgres")


@pytest.mark.mariadb
class TestMariadbContract(_SqlContract):
    backend: ClassVar[str] = "mariadb"
    hostile_values: ClassVar[tuple[str, ...]] = hostile_values_for("mariadb")


# ---------------------------------------------------------------------------
# the whole stack: process memory over memcached (or Redis) over the database


class _ChainContract(_SqlContract):
    """ChainedStore([ProcessMemoryStore, MemcacheStore, SqlAlchemyStore]) passes the same contract."""

    address: str

    @pytest.fixture(autouse=True)
    def _memcached(self, memcached_server: Any) -> None:
        self.address = memcached_server.address

    def make_store(self, **options: Any) -> Any:
        from stockpyle import ChainedStore, ProcessMemoryStore
        from stockpyle.stores.memcache import MemcacheStore

        database = super().make_store(**options)
        namespace = f"sqlchain-{secrets.token_hex(6)}"
        return ChainedStore(
            [ProcessMemoryStore(**options), MemcacheStore([self.address], namespace=namespace, **options), database]
        )


@pytest.mark.memcache
class TestSqliteChainContract(_ChainContract):
    backend: ClassVar[str] = "sqlite"


@pytest.mark.memcache
@pytest.mark.postgres
class TestPostgresChainContract(_ChainContract):
    backend: ClassVar[str] = "postgres"
    hostile_values: ClassVar[tuple[str, ...]] = hostile_values_for("postgres")


class _RedisChainContract(_SqlContract):
    """ChainedStore([ProcessMemoryStore, RedisStore, SqlAlchemyStore]) passes the same contract."""

    redis_url: str
    redis_prefix: str

    @pytest.fixture(autouse=True)
    def _redis(self, redis_client: Any, redis_url: str, redis_prefix: str) -> None:
        # redis_client deletes this test's keys (those containing redis_prefix) afterwards
        self.redis_url, self.redis_prefix = redis_url, redis_prefix

    def make_store(self, **options: Any) -> Any:
        from stockpyle import ChainedStore, ProcessMemoryStore
        from stockpyle.stores.redis import RedisStore

        database = super().make_store(**options)
        namespace = f"{self.redis_prefix}-{secrets.token_hex(4)}"
        return ChainedStore(
            [ProcessMemoryStore(**options), RedisStore(self.redis_url, namespace=namespace, **options), database]
        )


@pytest.mark.redis
class TestSqliteRedisChainContract(_RedisChainContract):
    backend: ClassVar[str] = "sqlite"


@pytest.mark.redis
@pytest.mark.postgres
class TestPostgresRedisChainContract(_RedisChainContract):
    backend: ClassVar[str] = "postgres"
    hostile_values: ClassVar[tuple[str, ...]] = hostile_values_for("postgres")
