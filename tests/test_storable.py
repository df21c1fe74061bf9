"""The Storable mixin (0.0.2 API)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from stockpyle import ChainedStore, ProcessMemoryStore, Storable, ThreadLocalStore
from stockpyle.exceptions import ConfigurationError, StoreNotBoundError


class Bar(Storable):
    __stockpyle_keys__: ClassVar[list[Any]] = [("foo", "bar")]

    def __init__(self, foo: int, bar: int) -> None:
        self.foo, self.bar = foo, bar


class SubBar(Bar):
    pass


@pytest.fixture(autouse=True)
def unbind() -> Any:
    yield
    SubBar.unbind_store()
    Bar.unbind_store()


def test_instance_and_class_operations() -> None:
    Bar.bind_store(ProcessMemoryStore())
    first, second = Bar(111, 777), Bar(222, 888)
    first.put()
    assert Bar.get({"foo": 111, "bar": 777}) is first
    Bar.batch_put([second])
    assert Bar.batch_get([{"foo": 111, "bar": 777}, {"foo": 1, "bar": 1}, {"bar": 888, "foo": 222}]) == [
        first, None, second,
    ]  # fmt: skip
    assert Bar.batched_get([{"foo": 222, "bar": 888}]) == [second]
    first.delete()
    assert Bar.get({"foo": 111, "bar": 777}) is None
    Bar.batch_delete([second])
    assert Bar.get({"foo": 222, "bar": 888}) is None


def test_unbound_class_is_a_clear_error() -> None:
    with pytest.raises(StoreNotBoundError, match=r"Bar.bind_store\(store\)"):
        Bar.get({"foo": 1, "bar": 2})
    with pytest.raises(StoreNotBoundError):
        Bar(1, 2).put()


def test_subclass_uses_its_base_store_unless_it_binds_its_own() -> None:
    base_store, sub_store = ProcessMemoryStore(), ThreadLocalStore()
    Bar.bind_store(base_store)
    SubBar(1, 1).put()
    assert base_store.get(SubBar, {"foo": 1, "bar": 1}) is not None
    SubBar.bind_store(sub_store)
    SubBar(2, 2).put()
    assert sub_store.get(SubBar, {"foo": 2, "bar": 2}) is not None
    assert base_store.get(SubBar, {"foo": 2, "bar": 2}) is None
    SubBar.unbind_store()
    assert SubBar.bound_store() is base_store


def test_bind_store_rejects_non_stores() -> None:
    with pytest.raises(ConfigurationError, match="not a store"):
        Bar.bind_store(object())


def test_works_with_a_chain() -> None:
    chain = ChainedStore([ThreadLocalStore(), ProcessMemoryStore()])
    Bar.bind_store(chain)
    Bar(5, 6).put()
    found = Bar.get({"foo": 5, "bar": 6})
    assert found is not None and (found.foo, found.bar) == (5, 6)
