"""The in-memory examples of the original documentation, as tests (our wording)."""

from __future__ import annotations

from typing import Any, ClassVar

from stockpyle import ChainedStore, MultiStore, ProcessMemoryStore, Storable, ThreadLocalStore
from stockpyle.stores import ProcessMemoryStore as StoresProcessMemoryStore


class Note:
    __stockpyle_keys__: ClassVar[list[Any]] = ["key"]

    def __init__(self, key: str) -> None:
        self.key = key


class Pair:
    __stockpyle_keys__: ClassVar[list[Any]] = [("bar", "zap")]

    def __init__(self, bar: int, zap: int) -> None:
        self.bar, self.zap = bar, zap


class Tagged:
    __stockpyle_keys__: ClassVar[list[Any]] = ["key", ("zap", "bar")]

    def __init__(self, key: int, zap: int, bar: int) -> None:
        self.key, self.zap, self.bar = key, zap, bar


class Vehicle:
    __stockpyle_keys__: ClassVar[list[Any]] = ["license_plate"]

    def __init__(self, license_plate: str) -> None:
        self.license_plate = license_plate


class Sedan(Vehicle):
    pass


class Lorry(Vehicle):
    pass


def test_basics_put_get_delete_and_batches() -> None:
    store = StoresProcessMemoryStore()
    note = Note("my_unique_key_123")
    store.put(note)
    assert store.get(Note, {"key": "my_unique_key_123"}).key == "my_unique_key_123"  # type: ignore[union-attr]
    store.delete(note)
    assert store.get(Note, {"key": "my_unique_key_123"}) is None

    n1, n2, n3 = Note("my_key_1"), Note("my_key_2"), Note("my_key_3")
    store.batch_put([n1, n2, n3])
    o1, o2, o3 = store.batch_get(Note, [{"key": "my_key_1"}, {"key": "my_key_2"}, {"key": "my_key_3"}])
    assert (o1, o2, o3) == (n1, n2, n3)
    assert [o.key for o in (o1, o2, o3)] == ["my_key_1", "my_key_2", "my_key_3"]  # type: ignore[union-attr]
    # a key that matches nothing still occupies its place in the result, as None
    p1, p2, p3 = store.batch_get(Note, [{"key": "my_key_1"}, {"key": "nonexistent_key"}, {"key": "my_key_3"}])
    assert p2 is None
    assert (p1, p3) == (n1, n3)
    store.batch_delete([n1, n2, n3])
    assert store.batch_get(Note, [{"key": "my_key_1"}, {"key": "my_key_3"}]) == [None, None]


def test_alternate_keys_reach_the_same_object() -> None:
    store = ProcessMemoryStore()
    tagged = Tagged(key=1, zap=2, bar=3)
    store.put(tagged)
    by_key = store.get(Tagged, {"key": 1})
    by_pair = store.get(Tagged, {"zap": 2, "bar": 3})
    assert by_key is by_pair is tagged
    assert (by_key.key, by_key.zap, by_key.bar) == (1, 2, 3)  # type: ignore[union-attr]


def test_two_level_multistore_serves_from_the_top_layer() -> None:
    top, below = ProcessMemoryStore(), ThreadLocalStore()
    store = MultiStore([top, below])
    obj = Pair(bar=444, zap=888)
    store.put(obj)
    assert below.get(Pair, {"bar": 444, "zap": 888}) is obj
    assert store.get(Pair, {"bar": 444, "zap": 888}) is obj
    assert store.stats()[0].hits == 1 and store.stats()[1].hits == 0


def test_different_lifetimes_per_layer_with_configure() -> None:
    pm, tl = ProcessMemoryStore(), ThreadLocalStore()
    chain = ChainedStore([pm, tl])
    pm.configure(classes=[Pair], lifetime=60)
    tl.configure(classes=[Pair], lifetime=5 * 60)
    assert pm.lifetimes.lifetime_for(Pair(1, 2)) == 60
    assert tl.lifetimes.lifetime_for(Pair(1, 2)) == 300
    chain.put(Pair(1, 2))
    assert chain.get(Pair, {"bar": 1, "zap": 2}) is not None


def test_lifetime_callback_per_class() -> None:
    def lifetime_for(obj: Any) -> int | None:
        if isinstance(obj, Note):
            return 20
        if isinstance(obj, Pair):
            return 5 * 60
        return None

    store = ProcessMemoryStore(lifetime_cb=lifetime_for)
    store.put(Note("n"))
    store.put(Pair(1, 1))
    assert store.lifetimes.lifetime_for(Note("n")) == 20
    assert store.get(Note, {"key": "n"}) is not None


def test_polymorphic_storage_finds_subclasses_through_the_base() -> None:
    store = ProcessMemoryStore(polymorphic=True)
    sedan = Sedan(license_plate="1234 XYZ")
    store.put(sedan)
    as_sedan = store.get(Sedan, {"license_plate": "1234 XYZ"})
    as_vehicle = store.get(Vehicle, {"license_plate": "1234 XYZ"})
    assert as_sedan is as_vehicle is sedan
    assert store.get(Lorry, {"license_plate": "1234 XYZ"}) is None


class Bar(Storable):
    __stockpyle_keys__: ClassVar[list[Any]] = [("foo", "bar")]

    def __init__(self, foo: int, bar: int) -> None:
        self.foo, self.bar = foo, bar


def test_storable_base_class_from_002() -> None:
    Bar.bind_store(ProcessMemoryStore())
    try:
        obj = Bar(111, 777)
        obj.put()
        fetched = Bar.get({"foo": 111, "bar": 777})
        assert fetched is obj and (fetched.foo, fetched.bar) == (111, 777)
        Bar(222, 888).put()
        first, second = Bar.batched_get([{"foo": 111, "bar": 777}, {"foo": 222, "bar": 888}])
        assert (first.foo, second.foo) == (111, 222)  # type: ignore[union-attr]
        obj.delete()
        assert Bar.get({"foo": 111, "bar": 777}) is None
    finally:
        Bar.unbind_store()
