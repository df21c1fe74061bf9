"""The store contract as a reusable pytest suite.

Every stockpyle store -- and any third-party store -- proves it honours the
contract by subclassing :class:`StoreContract` in a test module::

    from stockpyle.testing import StoreContract

    class TestMyStore(StoreContract):
        def make_store(self, **options):
            return MyStore(**options)

``make_store`` receives the store options a test needs (``polymorphic=``,
``lifetime_cb=``) and must return a store with an empty namespace of its own.
Class attributes describe capabilities so the suite asks only what applies:

* :attr:`~StoreContract.expires` -- the store honours lifetimes;
* :attr:`~StoreContract.short_lifetime` / :attr:`~StoreContract.expiry_wait` --
  how long the expiry tests let objects live and how long they wait (memcached
  works in whole seconds);
* :attr:`~StoreContract.type_faithful` -- ``123`` and ``"123"`` are different keys;
* :attr:`~StoreContract.polymorphic_always` -- the store always answers
  queries for a base class (SQL single-table inheritance does);
* :attr:`~StoreContract.models` -- the classes stored (SQL stores supply mapped
  versions with the same constructors and attributes);
* :attr:`~StoreContract.hostile_values` -- awkward key strings that must round-trip.

Stores that declare the back-fill capability (``supports_add``, see
:class:`~stockpyle.BaseStore`) also run :class:`ConsistencyContract`: the
consistency rules of :mod:`stockpyle.consistency` (add refused by a live key
and by a tombstone, a partial multi-key add undone, older versions refused,
version tokens and mismatched version types, versions compared within one
object only)::

    from stockpyle.testing import ConsistencyContract

    class TestMyStoreConsistency(ConsistencyContract):
        def make_store(self, **options):
            return MyStore(**options)

``make_store`` receives ``tombstone_lifetime=`` where a test needs one.

Asyncio stores (:class:`~stockpyle.stores.base.AsyncBaseStore`,
:class:`~stockpyle.AsyncChainedStore`) run the same suites through
:func:`sync_bridge`, which runs their coroutines on an event loop of its own
(in debug mode; ``slow_callback=`` also fails the test when a callback
blocked that loop for longer than that many seconds)::

    class TestMyAsyncStore(StoreContract):
        def make_store(self, **options):
            return sync_bridge(MyAsyncStore(**options))

Requires pytest (``pip install pytest``).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import inspect
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from .exceptions import (
    MissingKeyAttributeError,
    NotStorableError,
    StockpyleError,
    UnknownKeyError,
    UnsupportedKeyValueError,
)

__all__ = [
    "Automobile",
    "Car",
    "ConsistencyContract",
    "ContractModels",
    "DEFAULT_MODELS",
    "Falsy",
    "HOSTILE_VALUES",
    "Item",
    "StoreContract",
    "SyncBridge",
    "Truck",
    "Unkeyed",
    "Versioned",
    "sync_bridge",
]


class _Plain:
    """Equality by class and attributes, so copies from a backend compare equal."""

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash(type(self))

    def __repr__(self) -> str:
        attrs = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(self).items()))
        return f"{type(self).__name__}({attrs})"


class Item(_Plain):
    """Found by ``key`` and by the composite ``(zap, bar)``."""

    __stockpyle_keys__: ClassVar[list[Any]] = ["key", ("zap", "bar")]

    def __init__(self, key: Any, zap: Any, bar: Any, payload: Any = None) -> None:
        self.key = key
        self.zap = zap
        self.bar = bar
        self.payload = payload


class Automobile(_Plain):
    """A storable base class (for polymorphic storage)."""

    __stockpyle_keys__: ClassVar[list[Any]] = ["license_plate"]

    def __init__(self, license_plate: Any, color: Any = None) -> None:
        self.license_plate = license_plate
        self.color = color


class Car(Automobile):
    """Inherits its keys from :class:`Automobile`."""


class Truck(Automobile):
    """Inherits its keys from :class:`Automobile`."""


class Falsy(_Plain):
    """An object that is false in a boolean context; stores must still find it."""

    __stockpyle_keys__: ClassVar[list[Any]] = ["key"]

    def __init__(self, key: Any) -> None:
        self.key = key

    def __len__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return False


class Versioned(_Plain):
    """A versioned object found by ``key`` or by ``alias`` (two keys, one object)."""

    __stockpyle_keys__: ClassVar[list[Any]] = ["key", "alias"]
    __stockpyle_version__: ClassVar[str] = "version"

    def __init__(self, key: Any, alias: Any, version: Any, body: Any = "") -> None:
        self.key = key
        self.alias = alias
        self.version = version
        self.body = body


class Unkeyed:
    """A class without ``__stockpyle_keys__``: no store may accept it."""

    def __init__(self, key: Any) -> None:
        self.key = key


@dataclass(frozen=True)
class ContractModels:
    """The classes the contract stores; replace them with mapped classes for SQL stores."""

    Item: type[Any]
    Automobile: type[Any]
    Car: type[Any]
    Truck: type[Any]
    Falsy: type[Any]


DEFAULT_MODELS = ContractModels(Item=Item, Automobile=Automobile, Car=Car, Truck=Truck, Falsy=Falsy)

#: Key strings that must round-trip through every store (or be refused with a
#: clear error by a store that documents why).
HOSTILE_VALUES: tuple[str, ...] = (
    "with spaces in it",
    "line\r\nbreak",
    "nul\x00byte",
    "x" * 10_000,
    "unicod\u00e9 \u65e5\u672c \U0001f600",
    "../../etc/passwd",
    "/absolute/path",
    "get foo\r\nset evil 0 0 1\r\nX\r\n",
    "",
)


class StoreContract:
    """Base class of a pytest test class that checks one store against the contract."""

    expires: ClassVar[bool] = True
    short_lifetime: ClassVar[float] = 0.3
    expiry_wait: ClassVar[float] = 0.6
    type_faithful: ClassVar[bool] = True
    polymorphic_always: ClassVar[bool] = False
    same_instance: ClassVar[bool] = False
    models: ClassVar[ContractModels] = DEFAULT_MODELS
    hostile_values: ClassVar[tuple[str, ...]] = HOSTILE_VALUES

    _created: list[Any]

    def make_store(self, **options: Any) -> Any:
        """Return a fresh, empty store built with ``options``; subclasses implement this."""
        raise NotImplementedError("StoreContract subclasses implement make_store(**options)")

    @pytest.fixture(autouse=True)
    def _release_stores(self) -> Iterator[None]:
        self._created = []
        yield
        for store in reversed(self._created):
            store.release()

    def new_store(self, **options: Any) -> Any:
        """Build a store with :meth:`make_store`; it is released after the test."""
        store = self.make_store(**options)
        self._created.append(store)
        return store

    @pytest.fixture
    def store(self) -> Any:
        return self.new_store()

    # -- helpers ------------------------------------------------------------

    def item(self, key: Any = "k1", zap: Any = 1, bar: Any = 2, payload: Any = "p") -> Any:
        return self.models.Item(key, zap, bar, payload)

    def assert_item(self, found: Any, key: Any, zap: Any, bar: Any, payload: Any) -> None:
        assert found is not None, f"expected the item {key!r}, got a miss"
        assert isinstance(found, self.models.Item)
        assert (found.key, found.zap, found.bar, found.payload) == (key, zap, bar, payload)

    def _lifetime_store(self, lifetime_cb: Callable[[Any], Any]) -> Any:
        if not self.expires:
            pytest.skip("this store does not expire objects")
        return self.new_store(lifetime_cb=lifetime_cb)

    # -- the six operations -------------------------------------------------

    def test_put_then_get_by_primary_key(self, store: Any) -> None:
        obj = self.item("k1", 10, 20, "payload")
        store.put(obj)
        found = store.get(self.models.Item, {"key": "k1"})
        self.assert_item(found, "k1", 10, 20, "payload")
        if self.same_instance:
            assert found is obj

    def test_get_of_absent_object_is_none(self, store: Any) -> None:
        assert store.get(self.models.Item, {"key": "nowhere"}) is None
        assert store.get(self.models.Item, {"zap": 404, "bar": 404}) is None

    def test_alternate_and_composite_keys_find_the_same_object(self, store: Any) -> None:
        store.put(self.item("k1", 2, 3, "x"))
        by_key = store.get(self.models.Item, {"key": "k1"})
        by_pair = store.get(self.models.Item, {"zap": 2, "bar": 3})
        by_pair_reversed = store.get(self.models.Item, {"bar": 3, "zap": 2})
        for found in (by_key, by_pair, by_pair_reversed):
            self.assert_item(found, "k1", 2, 3, "x")
        assert store.get(self.models.Item, {"zap": 3, "bar": 2}) is None

    def test_put_replaces_the_previous_value(self, store: Any) -> None:
        store.put(self.item("k1", 1, 2, "old"))
        store.put(self.item("k1", 1, 2, "new"))
        self.assert_item(store.get(self.models.Item, {"key": "k1"}), "k1", 1, 2, "new")
        self.assert_item(store.get(self.models.Item, {"zap": 1, "bar": 2}), "k1", 1, 2, "new")

    def test_delete_removes_every_key(self, store: Any) -> None:
        obj = self.item("k1", 5, 6)
        store.put(obj)
        store.put(self.item("k2", 7, 8, "other"))
        store.delete(obj)
        assert store.get(self.models.Item, {"key": "k1"}) is None
        assert store.get(self.models.Item, {"zap": 5, "bar": 6}) is None
        self.assert_item(store.get(self.models.Item, {"key": "k2"}), "k2", 7, 8, "other")

    def test_delete_of_absent_object_is_harmless(self, store: Any) -> None:
        store.delete(self.item("never-stored", 1, 1))
        store.batch_delete([self.item("never-1", 2, 2), self.item("never-2", 3, 3)])
        assert store.get(self.models.Item, {"key": "never-stored"}) is None

    def test_batches_keep_request_order_and_report_misses_as_none(self, store: Any) -> None:
        objs = [self.item(f"k{i}", i, i * 10, f"p{i}") for i in range(5)]
        store.batch_put(objs)
        found = store.batch_get(
            self.models.Item,
            [{"key": "k3"}, {"key": "missing"}, {"zap": 1, "bar": 10}, {"key": "k0"}, {"key": "k3"}],
        )
        assert len(found) == 5
        self.assert_item(found[0], "k3", 3, 30, "p3")
        assert found[1] is None
        self.assert_item(found[2], "k1", 1, 10, "p1")
        self.assert_item(found[3], "k0", 0, 0, "p0")
        self.assert_item(found[4], "k3", 3, 30, "p3")
        store.batch_delete(objs[:3])
        remaining = store.batch_get(self.models.Item, [{"key": f"k{i}"} for i in range(5)])
        assert remaining[:3] == [None, None, None]
        self.assert_item(remaining[3], "k3", 3, 30, "p3")
        self.assert_item(remaining[4], "k4", 4, 40, "p4")

    def test_empty_batches(self, store: Any) -> None:
        store.batch_put([])
        store.batch_delete([])
        assert store.batch_get(self.models.Item, []) == []

    def test_batch_get_of_only_misses(self, store: Any) -> None:
        assert store.batch_get(self.models.Item, [{"key": "a"}, {"key": "b"}]) == [None, None]

    def test_release_is_not_terminal(self, store: Any) -> None:
        """release() frees connections and files; the store reconnects or reopens, and keeps its data."""
        store.put(self.item("kept", 1, 2, "before release"))
        store.release()
        self.assert_item(store.get(self.models.Item, {"key": "kept"}), "kept", 1, 2, "before release")
        store.put(self.item("after", 3, 4, "after release"))
        store.release()
        store.release()  # releasing twice is harmless
        found = store.batch_get(self.models.Item, [{"key": "kept"}, {"key": "after"}])
        self.assert_item(found[1], "after", 3, 4, "after release")

    def test_context_manager_returns_the_store(self) -> None:
        store = self.new_store()
        with store as entered:
            assert entered is store
            entered.put(self.item("ctx", 1, 1, "c"))
            self.assert_item(entered.get(self.models.Item, {"key": "ctx"}), "ctx", 1, 1, "c")

    # -- keys ---------------------------------------------------------------

    def test_keys_are_type_faithful(self, store: Any) -> None:
        if not self.type_faithful:
            pytest.skip("this store compares keys with the database's type coercion")
        store.put(self.item("123", 1, 2, "string key"))
        assert store.get(self.models.Item, {"key": 123}) is None
        self.assert_item(store.get(self.models.Item, {"key": "123"}), "123", 1, 2, "string key")
        assert store.get(self.models.Item, {"zap": 1.0, "bar": 2}) is None
        assert store.get(self.models.Item, {"zap": True, "bar": 2}) is None

    def test_changed_key_attribute_removes_the_old_entry(self, store: Any) -> None:
        obj = self.item("k1", 1, 2, "v")
        store.put(obj)
        obj.zap, obj.bar = 3, 4
        store.put(obj)
        assert store.get(self.models.Item, {"zap": 1, "bar": 2}) is None
        self.assert_item(store.get(self.models.Item, {"zap": 3, "bar": 4}), "k1", 3, 4, "v")
        self.assert_item(store.get(self.models.Item, {"key": "k1"}), "k1", 3, 4, "v")

    def test_new_copy_of_an_object_replaces_all_its_old_keys(self, store: Any) -> None:
        store.put(self.item("k1", 1, 2, "first"))
        store.put(self.item("k1", 8, 9, "second"))
        assert store.get(self.models.Item, {"zap": 1, "bar": 2}) is None
        self.assert_item(store.get(self.models.Item, {"zap": 8, "bar": 9}), "k1", 8, 9, "second")
        self.assert_item(store.get(self.models.Item, {"key": "k1"}), "k1", 8, 9, "second")

    def test_hostile_key_strings_round_trip(self, store: Any) -> None:
        objs = [self.item(value, i, -i, f"hostile-{i}") for i, value in enumerate(self.hostile_values)]
        store.batch_put(objs)
        for i, value in enumerate(self.hostile_values):
            self.assert_item(store.get(self.models.Item, {"key": value}), value, i, -i, f"hostile-{i}")
        store.put(self.item("plain", 999, 999, "untouched"))
        store.batch_delete(objs)
        assert store.batch_get(self.models.Item, [{"key": v} for v in self.hostile_values]) == [None] * len(objs)
        self.assert_item(store.get(self.models.Item, {"key": "plain"}), "plain", 999, 999, "untouched")

    def test_falsy_objects_are_hits(self, store: Any) -> None:
        store.put(self.models.Falsy("f1"))
        found = store.get(self.models.Falsy, {"key": "f1"})
        assert found is not None
        assert not found
        assert found.key == "f1"
        assert store.batch_get(self.models.Falsy, [{"key": "f1"}, {"key": "f2"}])[0] is not None

    # -- polymorphism -------------------------------------------------------

    def test_polymorphic_store_answers_for_base_classes(self) -> None:
        store = self.new_store(polymorphic=True)
        store.put(self.models.Car("1234 XYZ", "red"))
        as_car = store.get(self.models.Car, {"license_plate": "1234 XYZ"})
        as_automobile = store.get(self.models.Automobile, {"license_plate": "1234 XYZ"})
        for found in (as_car, as_automobile):
            assert isinstance(found, self.models.Car)
            assert (found.license_plate, found.color) == ("1234 XYZ", "red")
        assert store.get(self.models.Truck, {"license_plate": "1234 XYZ"}) is None
        store.delete(as_car)
        assert store.get(self.models.Automobile, {"license_plate": "1234 XYZ"}) is None
        assert store.get(self.models.Car, {"license_plate": "1234 XYZ"}) is None

    def test_plain_store_indexes_only_the_exact_class(self, store: Any) -> None:
        store.put(self.models.Car("5678 ABC", "blue"))
        found = store.get(self.models.Car, {"license_plate": "5678 ABC"})
        assert isinstance(found, self.models.Car)
        assert found.color == "blue"
        if not self.polymorphic_always:
            assert store.get(self.models.Automobile, {"license_plate": "5678 ABC"}) is None

    # -- lifetimes ----------------------------------------------------------

    def test_every_lifetime_form_expires(self) -> None:
        short = self.short_lifetime
        forms: dict[str, Any] = {}
        store = self._lifetime_store(lambda obj: forms[obj.payload])
        # The entries must all be alive right after the write; a loaded machine
        # can stall longer than a short lifetime between the write and the read,
        # and such an attempt proves nothing, so it is made again (three at most).
        for _attempt in range(3):
            now = time.time()
            forms.clear()
            forms.update(
                {
                    "seconds": short if short != int(short) else int(short),
                    "timedelta": _dt.timedelta(seconds=short),
                    "naive-datetime": _dt.datetime.fromtimestamp(now + short),
                    "aware-datetime": _dt.datetime.fromtimestamp(now + short, _dt.timezone(_dt.timedelta(hours=5))),
                    "never-none": None,
                    "never-zero": 0,
                }
            )
            store.batch_put([self.item(name, i, i, name) for i, name in enumerate(forms)])
            alive = store.batch_get(self.models.Item, [{"key": name} for name in forms])
            if time.time() - now < short / 2:
                break
        else:
            pytest.fail(f"the machine never wrote and read six entries within {short / 2} s; nothing was checked")
        assert [o.key if o is not None else None for o in alive] == list(forms)
        time.sleep(self.expiry_wait)
        after = {name: store.get(self.models.Item, {"key": name}) for name in forms}
        for name in ("seconds", "timedelta", "naive-datetime", "aware-datetime"):
            assert after[name] is None, f"lifetime form {name!r} did not expire"
        for name in ("never-none", "never-zero"):
            self.assert_item(after[name], name, list(forms).index(name), list(forms).index(name), name)

    def test_already_expired_lifetime_stores_nothing(self) -> None:
        store = self._lifetime_store(lambda obj: -1 if obj.payload == "dead" else None)
        store.put(self.item("k1", 1, 1, "alive"))
        store.put(self.item("k1", 1, 1, "dead"))
        assert store.get(self.models.Item, {"key": "k1"}) is None
        past = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
        store2 = self._lifetime_store(lambda obj: past)
        store2.put(self.item("k2", 2, 2))
        assert store2.get(self.models.Item, {"key": "k2"}) is None

    def test_configure_sets_lifetime_per_class_and_callback_wins(self) -> None:
        short = self.short_lifetime
        store = self._lifetime_store(lambda obj: 0 if getattr(obj, "payload", None) == "forever" else None)
        store.configure(classes=[self.models.Item], lifetime=short)
        store.configure(classes=[self.models.Automobile], lifetime=short)
        store.put(self.item("configured", 1, 1, "configured"))
        store.put(self.item("forever", 2, 2, "forever"))
        store.put(self.models.Car("CAR-1", "green"))  # inherits Automobile's lifetime
        store.put(self.models.Falsy("unconfigured"))
        time.sleep(self.expiry_wait)
        assert store.get(self.models.Item, {"key": "configured"}) is None
        self.assert_item(store.get(self.models.Item, {"key": "forever"}), "forever", 2, 2, "forever")
        assert store.get(self.models.Car, {"license_plate": "CAR-1"}) is None
        assert store.get(self.models.Falsy, {"key": "unconfigured"}) is not None

    # -- statistics ---------------------------------------------------------

    def test_stats_count_lookups_writes_and_reset(self, store: Any) -> None:
        store.reset_stats()
        store.batch_put([self.item("a", 1, 1), self.item("b", 2, 2)])
        store.put(self.item("c", 3, 3))
        assert store.get(self.models.Item, {"key": "a"}) is not None
        assert store.get(self.models.Item, {"key": "nowhere"}) is None
        found = store.batch_get(self.models.Item, [{"key": "b"}, {"key": "nowhere"}])
        assert [o is not None for o in found] == [True, False]
        store.delete(self.item("a", 1, 1))
        stats = store.stats()
        assert (stats.hits, stats.misses, stats.puts, stats.deletes) == (2, 2, 3, 1)
        assert stats.hit_ratio == 0.5
        assert stats.as_dict()["hits"] == 2
        store.reset_stats()
        stats = store.stats()
        assert (stats.hits, stats.misses, stats.puts, stats.deletes, stats.errors) == (0, 0, 0, 0, 0)

    # -- bad input ----------------------------------------------------------

    def test_unkeyed_objects_are_refused_and_nothing_is_written(self, store: Any) -> None:
        good = self.item("good", 1, 1)
        with pytest.raises(NotStorableError, match="__stockpyle_keys__"):
            store.put(Unkeyed("x"))
        with pytest.raises(NotStorableError):
            store.batch_put([good, Unkeyed("y")])
        assert store.get(self.models.Item, {"key": "good"}) is None
        with pytest.raises(NotStorableError):
            store.get(Unkeyed, {"key": "x"})

    def test_object_missing_a_key_attribute_is_refused(self, store: Any) -> None:
        broken = self.item("broken", 1, 1)
        del broken.bar
        with pytest.raises(MissingKeyAttributeError, match="bar"):
            store.put(broken)
        assert store.get(self.models.Item, {"key": "broken"}) is None
        with pytest.raises(MissingKeyAttributeError):
            store.batch_put([self.item("fine", 2, 2), broken])
        assert store.get(self.models.Item, {"key": "fine"}) is None

    def test_unsupported_key_values_are_refused(self, store: Any) -> None:
        with pytest.raises(UnsupportedKeyValueError, match="not supported"):
            store.get(self.models.Item, {"key": object()})
        with pytest.raises(UnsupportedKeyValueError):
            store.put(self.item(["a", "list"], 1, 1))
        assert store.get(self.models.Item, {"zap": 1, "bar": 1}) is None

    def test_unknown_key_names_are_a_clear_error(self, store: Any) -> None:
        with pytest.raises(UnknownKeyError, match="nonexistent"):
            store.get(self.models.Item, {"nonexistent": 1})
        with pytest.raises(UnknownKeyError):
            store.batch_get(self.models.Item, [{"key": "k"}, {"nonexistent": 1}])

    def test_errors_belong_to_the_stockpyle_tree(self, store: Any) -> None:
        with pytest.raises(StockpyleError):
            store.put(Unkeyed("z"))
        with pytest.raises(TypeError):  # also a TypeError for callers that expect one
            store.put(Unkeyed("z"))


class ConsistencyContract:
    """Base class of a pytest test class that checks a store's consistency rules.

    Runs against every store that declares ``supports_add``.  Objects are the
    contract's :class:`Item` (two keys: ``key`` and ``(zap, bar)``) and
    :class:`Versioned` (``key`` and ``alias``, version ``version``).

    :cvar checks_versions: the store compares versions (stores whose driver
        cannot compare-and-set write versioned objects like unversioned ones).
    """

    checks_versions: ClassVar[bool] = True

    _created: list[Any]

    def make_store(self, **options: Any) -> Any:
        """Return a fresh, empty store built with ``options``; subclasses implement this."""
        raise NotImplementedError("ConsistencyContract subclasses implement make_store(**options)")

    @pytest.fixture(autouse=True)
    def _release_stores(self) -> Iterator[None]:
        self._created = []
        yield
        for store in reversed(self._created):
            store.release()

    def new_store(self, **options: Any) -> Any:
        """Build a store with :meth:`make_store`; it is released after the test."""
        store = self.make_store(**options)
        self._created.append(store)
        return store

    @pytest.fixture
    def store(self) -> Any:
        return self.new_store()

    def _versions(self) -> None:
        if not self.checks_versions:
            pytest.skip("this store does not compare versions")

    @staticmethod
    def _found(store: Any, klass: type, keydict: dict[str, Any]) -> Any:
        found = store.get(klass, keydict)
        assert found is not None, f"expected a hit for {keydict!r}"
        return found

    # -- the capability -----------------------------------------------------

    def test_store_declares_add(self, store: Any) -> None:
        assert type(store).supports_add is True

    # -- add ----------------------------------------------------------------

    def test_add_stores_into_absent_keys_only(self, store: Any) -> None:
        assert store.add(Item("a", 1, 2, "first")) is True
        assert store.add(Item("a", 1, 2, "second")) is False  # a live entry refuses
        assert self._found(store, Item, {"zap": 1, "bar": 2}).payload == "first"
        assert store.batch_add([Item("a", 1, 2, "third"), Item("b", 3, 4, "new")]) == [False, True]
        assert [o.payload for o in store.batch_get(Item, [{"key": "a"}, {"key": "b"}])] == ["first", "new"]
        assert store.batch_add([]) == []

    def test_add_never_replaces_a_put(self, store: Any) -> None:
        store.put(Item("p", 1, 1, "written"))
        assert store.add(Item("p", 1, 1, "read earlier")) is False
        assert self._found(store, Item, {"key": "p"}).payload == "written"

    def test_a_tombstone_refuses_add(self) -> None:
        store = self.new_store(tombstone_lifetime=30)
        obj = Item("gone", 7, 8, "v1")
        store.put(obj)
        store.delete(obj)
        assert store.add(Item("gone", 7, 8, "v1 read before the delete")) is False
        assert store.get(Item, {"key": "gone"}) is None
        assert store.get(Item, {"zap": 7, "bar": 8}) is None
        store.put(Item("gone", 7, 8, "recreated"))  # an authoritative put goes through the tombstone
        assert self._found(store, Item, {"key": "gone"}).payload == "recreated"

    def test_a_partial_multi_key_add_is_undone(self, store: Any) -> None:
        store.put(Item("new-key", 1, 2, "newer"))  # the entity now lives under key "new-key"
        # a back-fill of an old copy still keyed "old-key" with the same (zap, bar)
        assert store.add(Item("old-key", 1, 2, "older")) is False
        assert store.get(Item, {"key": "old-key"}) is None  # never left half-present
        assert self._found(store, Item, {"zap": 1, "bar": 2}).payload == "newer"
        assert store.batch_add([Item("old-key", 1, 2, "older"), Item("free", 5, 5)]) == [False, True]
        assert store.get(Item, {"key": "old-key"}) is None

    # -- versions -----------------------------------------------------------

    def test_an_older_version_is_refused(self, store: Any) -> None:
        self._versions()
        store.put(Versioned("d", "d-alias", 3, "three"))
        store.put(Versioned("d", "d-alias", 2, "two"))  # a late writer
        found = self._found(store, Versioned, {"alias": "d-alias"})
        assert (found.version, found.body) == (3, "three")
        store.put(Versioned("d", "d-alias", 3, "three again"))  # the same version is not refused
        store.put(Versioned("d", "d-alias", 4, "four"))
        found = store.batch_get(Versioned, [{"key": "d"}, {"alias": "d-alias"}])
        assert [(o.version, o.body) for o in found] == [(4, "four"), (4, "four")]

    def test_a_tombstone_refuses_a_late_put_of_the_deleted_version(self) -> None:
        self._versions()
        store = self.new_store(tombstone_lifetime=30)
        store.put(Versioned("t", "t-alias", 2))
        store.delete(Versioned("t", "t-alias", 2))
        store.put(Versioned("t", "t-alias", 2, "late put of the deleted version"))
        assert store.get(Versioned, {"key": "t"}) is None
        store.put(Versioned("t", "t-alias", 3, "recreated"))
        assert self._found(store, Versioned, {"alias": "t-alias"}).body == "recreated"

    def test_version_tokens_are_equality_only(self) -> None:
        """Non-integer versions never order writes: a committed write is never refused by a cache."""
        self._versions()
        store = self.new_store(tombstone_lifetime=30)
        tokens = [uuid.UUID(int=n) for n in (9, 1, 5)]  # sort order unrelated to write order
        for n, token in enumerate(tokens):
            store.put(Versioned("u", "u-alias", token, f"write {n}"))
            found = self._found(store, Versioned, {"key": "u"})
            assert (found.version, found.body) == (token, f"write {n}")
        store.delete(Versioned("u", "u-alias", tokens[-1]))
        store.put(Versioned("u", "u-alias", tokens[-1], "late put of the deleted token"))
        assert store.get(Versioned, {"key": "u"}) is None
        store.put(Versioned("u", "u-alias", uuid.UUID(int=2), "a new token"))
        assert self._found(store, Versioned, {"alias": "u-alias"}).body == "a new token"

    def test_versions_of_different_types_are_not_ordered(self) -> None:
        self._versions()
        store = self.new_store(tombstone_lifetime=30)
        store.put(Versioned("m", "m-alias", 5, "int five"))
        store.put(Versioned("m", "m-alias", "2", "str two"))  # not older than 5: a different type
        assert self._found(store, Versioned, {"key": "m"}).body == "str two"
        store.put(Versioned("m", "m-alias", True, "bool"))  # bools are not ints here
        assert self._found(store, Versioned, {"key": "m"}).body == "bool"
        store.delete(Versioned("m", "m-alias", 1))
        store.put(Versioned("m", "m-alias", "2", "after a tombstone of int 1"))
        assert self._found(store, Versioned, {"alias": "m-alias"}).body == "after a tombstone of int 1"

    def test_versions_are_compared_within_one_object_only(self) -> None:
        """Another object may take a key value this one had, at its own (lower) version."""
        self._versions()
        store = self.new_store(tombstone_lifetime=30)
        store.put(Versioned(1, "shared", 5))
        store.delete(Versioned(1, "shared", 5))  # a tombstone of object 1 at version 5
        store.put(Versioned(2, "shared", 1, "object 2"))
        assert self._found(store, Versioned, {"alias": "shared"}).key == 2
        store.put(Versioned(3, "taken", 9))
        store.put(Versioned(4, "taken", 1, "object 4"))  # a live entry of object 3 at 9 does not block it
        assert self._found(store, Versioned, {"alias": "taken"}).key == 4

    # -- class invalidation (stores that declare supports_class_invalidation) ---

    def test_invalidate_class_drops_every_entry_of_the_class(self) -> None:
        store = self.new_store(tombstone_lifetime=30)
        if not type(store).supports_class_invalidation:
            pytest.skip("this store does not declare supports_class_invalidation")
        store.batch_put([Item("i1", 1, 1), Item("i2", 2, 2)])
        store.put(Versioned("v", "v-alias", 1))
        store.invalidate_class(Item)
        assert store.batch_get(Item, [{"key": "i1"}, {"zap": 2, "bar": 2}]) == [None, None]
        assert self._found(store, Versioned, {"key": "v"}).version == 1  # other classes are untouched
        # like a delete's tombstones, the invalidation refuses back-fills of copies read before it
        assert store.add(Item("i1", 1, 1, "read before the invalidation")) is False
        store.put(Item("i1", 1, 1, "written after"))  # an authoritative put goes through
        assert self._found(store, Item, {"key": "i1"}).payload == "written after"


# -- asyncio stores under the synchronous suites ---------------------------------

#: The shortest blocking of the bridges' event loop that asyncio's debug mode reports.
SLOW_CALLBACK = 0.05
_TOOK = re.compile(r"took (\d+(?:\.\d+)?) seconds")


class _BridgeLoop(logging.Handler):
    """The one event loop every :class:`SyncBridge` of a process runs on (a daemon thread, debug mode).

    It also collects asyncio's debug-mode "Executing ... took" warnings of
    its own thread, for the bridges to report.
    """

    _lock = threading.Lock()
    _instance: _BridgeLoop | None = None

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(True)
        self.loop.slow_callback_duration = SLOW_CALLBACK
        self.thread = threading.Thread(target=self.loop.run_forever, name="stockpyle-sync-bridge", daemon=True)
        self.slow: list[tuple[float, str]] = []
        self.thread.start()
        logging.getLogger("asyncio").addHandler(self)

    @classmethod
    def shared(cls) -> _BridgeLoop:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread.ident:
            message = record.getMessage()
            took = _TOOK.search(message)
            if took:
                self.slow.append((float(took.group(1)), message))

    def wait(self, awaitable: Any) -> Any:
        async def run() -> Any:
            return await awaitable

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result()


class SyncBridge:
    """A synchronous face of an asyncio store, for suites written for synchronous stores.

    Every operation is run to completion on one event loop shared by all
    bridges of the process (in a daemon thread, debug mode).  With
    ``slow_callback`` (seconds), ``release()`` raises ``AssertionError`` if a
    callback blocked that loop for longer since the last check: a sign of
    blocking I/O on the loop.  Leave it off on a loaded machine, where a
    garbage collection or the scheduler can stall any callback.  Create it
    with :func:`sync_bridge`, which also copies the store's capability flags
    onto the bridge's class.

    :ivar store: the asyncio store.
    """

    def __init__(self, store: Any, *, slow_callback: float | None = None) -> None:
        self.store = store
        self.slow_callback = slow_callback
        self._bridge = _BridgeLoop.shared()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the store's coroutines run on."""
        return self._bridge.loop

    def run(self, awaitable: Any) -> Any:
        """Run ``awaitable`` on the bridge's loop and return its result."""
        return self._bridge.wait(awaitable)

    def _call(self, name: str, *args: Any) -> Any:
        result = getattr(self.store, name)(*args)
        return self._bridge.wait(result) if inspect.isawaitable(result) else result

    def put(self, obj: object) -> None:
        self._call("put", obj)

    def get(self, klass: type, keydict: Any) -> Any:
        return self._call("get", klass, keydict)

    def delete(self, obj: object) -> None:
        self._call("delete", obj)

    def batch_put(self, objs: Any) -> None:
        self._call("batch_put", objs)

    def batch_get(self, klass: type, keydicts: Any) -> Any:
        return self._call("batch_get", klass, keydicts)

    def batch_delete(self, objs: Any) -> None:
        self._call("batch_delete", objs)

    def add(self, obj: object) -> Any:
        return self._call("add", obj)

    def batch_add(self, objs: Any) -> Any:
        return self._call("batch_add", objs)

    def invalidate_class(self, klass: type) -> None:
        self._call("invalidate_class", klass)

    def configure(self, classes: Any, lifetime: Any) -> None:
        self.store.configure(classes=classes, lifetime=lifetime)

    def stats(self) -> Any:
        return self.store.stats()

    def reset_stats(self) -> None:
        self.store.reset_stats()

    def release(self) -> None:
        """Release the store (never terminal: the bridge keeps working); check for slow callbacks."""
        self._call("release")
        slow = self._bridge.slow
        limit = self.slow_callback
        found = [message for took, message in slow if limit is not None and took > limit]
        slow.clear()
        if found:
            raise AssertionError(f"asyncio callbacks blocked the loop longer than {limit} s: {found}")

    def __enter__(self) -> SyncBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def __repr__(self) -> str:
        return f"<SyncBridge {self.store!r}>"


_FLAGS = ("supports_expiry", "supports_add", "supports_class_invalidation", "in_process", "is_cache")
_BRIDGES: dict[tuple[Any, ...], type[SyncBridge]] = {}


def sync_bridge(store: Any, *, slow_callback: float | None = None) -> SyncBridge:
    """A :class:`SyncBridge` for ``store`` whose class carries the store's capability flags."""
    flags = tuple(bool(getattr(type(store), flag, False)) for flag in _FLAGS)
    kind = _BRIDGES.get(flags)
    if kind is None:
        kind = _BRIDGES[flags] = type("SyncBridge", (SyncBridge,), dict(zip(_FLAGS, flags, strict=True)))
    return kind(store, slow_callback=slow_callback)
