"""What the chain relies on is declared in the store contract, and the chain relies on nothing else."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from stockpyle import BaseStore, ChainedStore, ProcessMemoryStore, ThreadLocalStore
from stockpyle.exceptions import ConfigurationError
from stockpyle.stores.base import DirectIndex, MemoryEntry


class Foo:
    __stockpyle_keys__: ClassVar[list[Any]] = ["key"]

    def __init__(self, key: Any, payload: Any = None) -> None:
        self.key, self.payload = key, payload


class Counting:
    """A proxy layer that counts every attribute access made on it (the chain may only call operations)."""

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "accesses", [])

    def __getattribute__(self, name: str) -> Any:
        if name in ("_inner", "accesses", "__class__", "__dict__"):
            return object.__getattribute__(self, name)
        object.__getattribute__(self, "accesses").append(name)
        return getattr(object.__getattribute__(self, "_inner"), name)

    def __getattr__(self, name: str) -> Any:  # pragma: no cover - __getattribute__ answers everything
        raise AttributeError(name)


def test_an_empty_chain_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="at least one store") as caught:
        ChainedStore()
    assert isinstance(caught.value, ConfigurationError)


def test_a_store_that_implements_nothing_raises_not_implemented_per_operation() -> None:
    class Nothing(BaseStore):
        pass

    store = Nothing()  # instantiable, as in stockpyle 0.1 and dogpile.cache's backend API
    for call in (
        lambda: store.put(Foo("a")),
        lambda: store.get(Foo, {"key": "a"}),
        lambda: store.delete(Foo("a")),
        lambda: store.batch_put([Foo("a")]),
        lambda: store.batch_get(Foo, [{"key": "a"}]),
        lambda: store.batch_delete([Foo("a")]),
        lambda: store.invalidate_class(Foo),
    ):
        with pytest.raises(NotImplementedError, match="Nothing does not implement"):
            call()
    assert store.direct_index() is None
    assert (Nothing.supports_add, Nothing.in_process, Nothing.supports_class_invalidation) == (False, False, False)
    store.release()  # never terminal, never required


def test_the_default_add_writes_with_put_and_says_so() -> None:
    class Writes(BaseStore):
        def __init__(self) -> None:
            super().__init__()
            self.written: list[Any] = []

        def put(self, obj: object) -> None:
            self.written.append(obj)

    store = Writes()
    objs = [Foo("a"), Foo("b")]
    assert store.add(objs[0]) is True
    assert store.batch_add(objs[1:]) == [True]
    assert store.written == objs
    assert BaseStore.add.__doc__ is not None and "cannot protect" in BaseStore.add.__doc__


def test_the_chain_touches_a_layer_only_through_the_operations_it_performs() -> None:
    top = Counting(ProcessMemoryStore())
    bottom = Counting(ProcessMemoryStore())
    chain = ChainedStore([top, bottom])
    assert (top.accesses, bottom.accesses) == ([], [])  # nothing at construction
    chain.put(Foo("a", 1))
    assert (top.accesses, bottom.accesses) == (["put"], ["put"])
    top.accesses.clear(), bottom.accesses.clear()
    assert chain.get(Foo, {"key": "a"}).payload == 1  # type: ignore[union-attr]
    assert (top.accesses, bottom.accesses) == (["get"], [])
    top.accesses.clear()
    top._inner.clear()
    assert chain.get(Foo, {"key": "a"}) is not None  # a miss on top, a hit below, then a back-fill
    # a duck-typed proxy declares no supports_add: the back-fill is a put (documented)
    assert (top.accesses, bottom.accesses) == (["get", "put"], ["get"])
    top.accesses.clear(), bottom.accesses.clear()
    assert chain.batch_get(Foo, [{"key": "a"}]) is not None
    assert (top.accesses, bottom.accesses) == (["batch_get"], [])
    top.accesses.clear()
    chain.batch_delete([Foo("a")])
    assert (top.accesses, bottom.accesses) == (["batch_delete"], ["batch_delete"])


def test_layers_are_validated_through_their_type() -> None:
    class NotAStore:
        def __init__(self) -> None:
            self.get = lambda *a: None  # instance attributes do not make a store

    with pytest.raises(ConfigurationError, match="lacks put, get, delete, batch_put, batch_get, batch_delete"):
        ChainedStore([NotAStore()])


@pytest.mark.parametrize("maxsize", [None, 100], ids=["unbounded", "bounded"])
def test_hits_the_chain_serves_from_the_top_layer_are_that_layers_hits(maxsize: int | None) -> None:
    top = ProcessMemoryStore(maxsize=maxsize)
    chain = ChainedStore([top, ProcessMemoryStore()])
    chain.put(Foo("a"))
    top.reset_stats()
    for _ in range(1000):
        assert chain.get(Foo, {"key": "a"}) is not None
    assert top.stats().hits == 1000
    assert chain.stats()[0].hits == 1000
    chain.reset_stats()
    assert chain.stats()[0].hits == 0
    assert top.stats().hits == 1000  # the layer's own count is the layer's
    top.reset_stats()
    chain.get(Foo, {"key": "a"})
    assert (top.stats().hits, chain.stats()[0].hits) == (1, 1)


def test_only_an_unbounded_store_with_its_own_get_offers_its_index() -> None:
    class Audited(ProcessMemoryStore):
        def get(self, klass: Any, keydict: Any) -> Any:
            return super().get(klass, keydict)

    store = ProcessMemoryStore()
    store.put(Foo("a"))
    direct = store.direct_index()
    assert isinstance(direct, DirectIndex)
    entry = direct.index[(Foo, "key", "a")]
    assert isinstance(entry, MemoryEntry) and entry.obj.key == "a" and entry.expires is None
    assert ProcessMemoryStore(maxsize=5).direct_index() is None
    assert Audited().direct_index() is None
    assert ThreadLocalStore().direct_index() is None
