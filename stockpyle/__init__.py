"""stockpyle: layered, write-through object storage and caching.

Declare which attributes identify your objects, then store them through a
chain of layers -- thread-local memory, process memory, memcached, Redis, any shove
backend, an SQL database -- and read them back through the fastest layer that
has them::

    from stockpyle import ChainedStore, ProcessMemoryStore

    class Foo:
        __stockpyle_keys__ = ["key"]
        def __init__(self, key):
            self.key = key

    store = ChainedStore([ProcessMemoryStore()])
    store.put(Foo("k1"))
    assert store.get(Foo, {"key": "k1"}).key == "k1"
"""

import typing as _typing

from . import exceptions
from .caching import cached
from .exceptions import (
    ConfigurationError,
    NonUniqueKeyError,
    NotStorableError,
    StockpyleError,
    StoreError,
    StoreNotBoundError,
    StoreUnavailableError,
    UnknownKeyError,
)
from .stampede import LeaseTimeoutError, Stampede
from .storable import Storable
from .stores.base import AsyncBaseStore, BaseDictionaryStore, BaseStore
from .stores.chained import ChainedStore, MultiStore
from .stores.memory import ProcessMemoryStore, ThreadLocalStore

if _typing.TYPE_CHECKING:  # pragma: no cover
    from .bus.memcache import MemcacheEpochBus
    from .bus.postgres import PostgresNotifyBus
    from .bus.redis import RedisStreamBus
    from .stores.achained import AsyncChainedStore
    from .stores.memcache import AsyncMemcacheStore, MemcacheStore
    from .stores.redis import AsyncRedisStore, RedisStore
    from .stores.shove import ShoveStore
    from .stores.sqlalchemy import AsyncSqlAlchemyStore, SqlAlchemyStore

__version__ = "1.0.0rc1"

__all__ = [
    "AsyncBaseStore",
    "AsyncChainedStore",
    "AsyncMemcacheStore",
    "AsyncRedisStore",
    "AsyncSqlAlchemyStore",
    "BaseDictionaryStore",
    "BaseStore",
    "ChainedStore",
    "ConfigurationError",
    "LeaseTimeoutError",
    "MemcacheEpochBus",
    "MemcacheStore",
    "MultiStore",
    "NonUniqueKeyError",
    "NotStorableError",
    "PostgresNotifyBus",
    "ProcessMemoryStore",
    "RedisStore",
    "RedisStreamBus",
    "ShoveStore",
    "SqlAlchemyStore",
    "Stampede",
    "StockpyleError",
    "Storable",
    "StoreError",
    "StoreNotBoundError",
    "StoreUnavailableError",
    "ThreadLocalStore",
    "UnknownKeyError",
    "cached",
    "exceptions",
]


def __getattr__(name: str) -> _typing.Any:
    # backend stores live in modules that import optional drivers, the asyncio
    # chain in one that imports asyncio: load on first use
    if name in (
        "AsyncChainedStore",
        "AsyncMemcacheStore",
        "AsyncRedisStore",
        "AsyncSqlAlchemyStore",
        "MemcacheStore",
        "RedisStore",
        "ShoveStore",
        "SqlAlchemyStore",
    ):
        from . import stores

        value = getattr(stores, name)
        globals()[name] = value
        return value
    if name in ("MemcacheEpochBus", "PostgresNotifyBus", "RedisStreamBus"):
        from . import bus

        value = getattr(bus, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
