"""The public surface: exported names, lazy backends, the exception tree."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import stockpyle
import stockpyle.bus
import stockpyle.stores
from stockpyle import exceptions
from stockpyle.exceptions import NonUniqueKeyError, StockpyleError

PUBLIC = {
    "AsyncBaseStore", "AsyncChainedStore", "AsyncMemcacheStore", "AsyncRedisStore", "AsyncSqlAlchemyStore",
    "BaseDictionaryStore",
    "BaseStore", "ChainedStore", "ConfigurationError",
    "LeaseTimeoutError", "MemcacheEpochBus", "MemcacheStore", "MultiStore", "NonUniqueKeyError", "NotStorableError",
    "PostgresNotifyBus", "ProcessMemoryStore", "RedisStore", "RedisStreamBus", "ShoveStore", "SqlAlchemyStore",
    "Stampede", "StockpyleError", "Storable", "StoreError",
    "StoreNotBoundError", "StoreUnavailableError", "ThreadLocalStore", "UnknownKeyError", "cached", "exceptions",
}  # fmt: skip
# the errors a newcomer meets first, importable as `from stockpyle import ...`
TOP_LEVEL_ERRORS = (
    "ConfigurationError", "NonUniqueKeyError", "NotStorableError", "StockpyleError", "StoreError",
    "StoreNotBoundError", "StoreUnavailableError", "UnknownKeyError",
)  # fmt: skip
BUS_PUBLIC = {
    "BusListener", "BusStats", "InvalidationBus", "MemcacheEpochBus", "PostgresNotifyBus", "RedisStreamBus",
    "class_digest", "key_digest",
}  # fmt: skip
STORES_PUBLIC = {
    "AsyncBaseStore", "AsyncChainedStore", "AsyncKeyValueStore", "AsyncMemcacheStore", "AsyncRedisStore",
    "AsyncSqlAlchemyStore",
    "BaseDictionaryStore", "BaseStore", "ChainedStore",
    "KeyValueStore", "LayerStats", "MemcacheStore", "MultiStore", "ProcessMemoryStore", "RedisStore", "ShoveStore",
    "SqlAlchemyStore", "ThreadLocalStore",
}  # fmt: skip


def test_all_lists_exactly_the_public_names() -> None:
    assert set(stockpyle.__all__) == PUBLIC
    assert sorted(stockpyle.__all__) == stockpyle.__all__
    assert set(stockpyle.stores.__all__) == STORES_PUBLIC
    assert sorted(stockpyle.stores.__all__) == stockpyle.stores.__all__
    assert set(stockpyle.bus.__all__) == BUS_PUBLIC
    assert sorted(stockpyle.bus.__all__) == stockpyle.bus.__all__
    public_modules = {n for n in vars(stockpyle) if not n.startswith("_")} - PUBLIC
    # whatever else is visible at top level is a submodule, not an undeclared name
    assert all(isinstance(getattr(stockpyle, n), type(stockpyle)) for n in public_modules), public_modules


def test_exception_module_exports_its_whole_tree() -> None:
    declared = {
        name for name, value in vars(exceptions).items()
        if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == exceptions.__name__
    }  # fmt: skip
    assert declared == set(exceptions.__all__)
    for name in exceptions.__all__:
        assert issubclass(getattr(exceptions, name), StockpyleError)
        assert name in (exceptions.__doc__ or ""), f"{name} missing from the drawn tree"


@pytest.mark.parametrize("name", TOP_LEVEL_ERRORS)
def test_top_level_errors_are_the_exception_classes(name: str) -> None:
    assert getattr(stockpyle, name) is getattr(exceptions, name)


def test_the_errors_of_a_first_session_can_be_caught_from_the_top_level() -> None:
    from stockpyle import NotStorableError, ProcessMemoryStore, Storable, StoreNotBoundError, UnknownKeyError

    class Keyed:
        __stockpyle_keys__ = ("id",)

    class Unbound(Storable):
        __stockpyle_keys__ = ("id",)

    store = ProcessMemoryStore()
    with pytest.raises(NotStorableError):
        store.put(object())
    with pytest.raises(UnknownKeyError):
        store.get(Keyed, {"name": "x"})
    with pytest.raises(StoreNotBoundError):
        Unbound.get({"id": 1})


def test_non_unique_key_error_carries_class_and_key() -> None:
    class Thing:
        pass

    err = NonUniqueKeyError(Thing, {"name": "x"})
    assert err.klass is Thing
    assert err.key == {"name": "x"}
    assert "Thing" in str(err) and "'name': 'x'" in str(err)


@pytest.mark.parametrize("name", ["Storable", "ChainedStore", "MultiStore", "ProcessMemoryStore", "ThreadLocalStore"])
def test_top_level_imports(name: str) -> None:
    assert getattr(stockpyle, name) is getattr(stockpyle.stores, name, getattr(stockpyle, name))


def test_importing_stockpyle_never_imports_an_optional_backend() -> None:
    # nor asyncio: synchronous programs do not pay for the asyncio stores' import
    script = textwrap.dedent(
        """
        import sys
        import stockpyle, stockpyle.stores, stockpyle.keys, stockpyle.lifetimes, stockpyle.storable, stockpyle.bus
        optional = {'pymemcache', 'sqlalchemy', 'shove', 'stuf', 'redis', 'memcache', 'rich', 'asyncio', 'psycopg'}
        loaded = sorted(m for m in sys.modules if m.split('.')[0] in optional)
        print(','.join(loaded))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = stockpyle.NoSuchStore  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        _ = stockpyle.stores.NoSuchStore  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        _ = stockpyle.bus.NoSuchBus  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("name", "module"),
    [("RedisStreamBus", "redis"), ("PostgresNotifyBus", "postgres"), ("MemcacheEpochBus", "memcache")],
)
def test_buses_are_lazy_exports_of_the_bus_package_and_the_top_level(name: str, module: str) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        import stockpyle.bus
        assert 'stockpyle.bus.{module}' not in sys.modules
        from stockpyle.bus import {name} as from_bus
        from stockpyle import {name} as from_top
        import stockpyle.bus.{module} as defining
        assert from_bus is from_top is defining.{name}
        from stockpyle.bus import InvalidationBus
        assert issubclass(from_bus, object) and 'publish' in dir(from_bus)
        print('ok')
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
