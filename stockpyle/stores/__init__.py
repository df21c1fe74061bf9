"""The stores.  Backend stores (memcached, Redis, shove, SQLAlchemy) are imported lazily:
importing this package never imports an optional driver."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import AsyncBaseStore, BaseDictionaryStore, BaseStore
from .chained import ChainedStore, LayerStats, MultiStore
from .memory import ProcessMemoryStore, ThreadLocalStore

if TYPE_CHECKING:  # pragma: no cover
    from .achained import AsyncChainedStore
    from .kv import AsyncKeyValueStore, KeyValueStore
    from .memcache import AsyncMemcacheStore, MemcacheStore
    from .redis import AsyncRedisStore, RedisStore
    from .shove import ShoveStore
    from .sqlalchemy import AsyncSqlAlchemyStore, SqlAlchemyStore

__all__ = [
    "AsyncBaseStore",
    "AsyncChainedStore",
    "AsyncKeyValueStore",
    "AsyncMemcacheStore",
    "AsyncRedisStore",
    "AsyncSqlAlchemyStore",
    "BaseDictionaryStore",
    "BaseStore",
    "ChainedStore",
    "KeyValueStore",
    "LayerStats",
    "MemcacheStore",
    "MultiStore",
    "ProcessMemoryStore",
    "RedisStore",
    "ShoveStore",
    "SqlAlchemyStore",
    "ThreadLocalStore",
]

_LAZY = {
    "AsyncChainedStore": ".achained",
    "AsyncKeyValueStore": ".kv",
    "AsyncMemcacheStore": ".memcache",
    "AsyncRedisStore": ".redis",
    "AsyncSqlAlchemyStore": ".sqlalchemy",
    "KeyValueStore": ".kv",
    "MemcacheStore": ".memcache",
    "RedisStore": ".redis",
    "ShoveStore": ".shove",
    "SqlAlchemyStore": ".sqlalchemy",
}


def __getattr__(name: str) -> Any:
    # PEP 562: the module that defines a backend store is imported on first use
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
