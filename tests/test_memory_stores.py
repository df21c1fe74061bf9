"""ProcessMemoryStore and ThreadLocalStore beyond the contract: threads, bounds."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from stockpyle import ProcessMemoryStore, ThreadLocalStore
from stockpyle.exceptions import ConfigurationError


class Obj:
    __stockpyle_keys__: ClassVar[list[Any]] = ["ident", "name"]

    def __init__(self, ident: int, name: str, version: int = 0) -> None:
        self.ident, self.name, self.version = ident, name, version


def run_threads(count: int, target: Callable[[int], None]) -> None:
    """Run ``target(i)`` in ``count`` threads; an exception in any thread fails the test."""
    errors: list[BaseException] = []

    def wrapper(i: int) -> None:
        try:
            target(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=wrapper, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def test_run_threads_reports_failures_from_worker_threads() -> None:
    def boom(i: int) -> None:
        assert i != 3, "worker 3 failed"

    with pytest.raises(AssertionError, match="worker 3 failed"):
        run_threads(5, boom)


@pytest.mark.parametrize("maxsize", [None, 64])
def test_process_memory_store_is_thread_safe(maxsize: int | None) -> None:
    store = ProcessMemoryStore(maxsize=maxsize)

    def worker(t: int) -> None:
        rng = random.Random(t)
        for n in range(3000):
            ident = rng.randrange(200)
            op = rng.random()
            if op < 0.4:
                store.put(Obj(ident, f"name-{ident}", version=n))
            elif op < 0.5:
                store.delete(Obj(ident, f"name-{ident}"))
            elif op < 0.6:
                store.batch_put([Obj(i, f"name-{i}") for i in range(ident, ident + 5)])
            else:
                found = store.get(Obj, {"ident": ident})
                if found is not None:
                    assert found.ident == ident and found.name == f"name-{ident}"
                by_name = store.get(Obj, {"name": f"name-{ident}"})
                if by_name is not None:
                    assert by_name.ident == ident

    run_threads(8, worker)
    # internal consistency: every index entry points at a live record holding that key
    table = store._table
    for key, rec in table.index.items():
        assert key in rec.keys
        assert table.records[id(rec.obj)] is rec
    if maxsize is not None:
        assert len(store) <= maxsize


def test_lru_bound_evicts_least_recently_used() -> None:
    store = ProcessMemoryStore(maxsize=3)
    objs = [Obj(i, f"n{i}") for i in range(3)]
    store.batch_put(objs)
    assert store.get(Obj, {"ident": 0}) is objs[0]  # 0 becomes most recent
    store.put(Obj(3, "n3"))
    assert store.get(Obj, {"ident": 1}) is None  # 1 was least recently used
    assert store.get(Obj, {"name": "n1"}) is None  # every key of the evicted object is gone
    assert [store.get(Obj, {"ident": i}) is not None for i in (0, 2, 3)] == [True, True, True]
    assert len(store) == 3
    assert store.evictions == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10", True])
def test_maxsize_must_be_positive_int(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="maxsize"):
        ProcessMemoryStore(maxsize=bad)


def test_polymorphic_flag_must_be_bool() -> None:
    with pytest.raises(ConfigurationError, match="polymorphic"):
        ProcessMemoryStore(polymorphic="yes")  # type: ignore[arg-type]


def test_thread_local_contents_are_private_to_each_thread() -> None:
    store = ThreadLocalStore()
    store.put(Obj(0, "main"))
    barrier = threading.Barrier(4)

    def worker(t: int) -> None:
        assert store.get(Obj, {"ident": 0}) is None  # the main thread's object is invisible
        store.put(Obj(100 + t, f"t{t}"))
        barrier.wait()  # every thread has written before anyone reads
        for other in range(4):
            found = store.get(Obj, {"ident": 100 + other})
            if other == t:
                assert found is not None and found.name == f"t{t}"
            else:
                assert found is None
        assert len(store) == 1

    run_threads(4, worker)
    assert store.get(Obj, {"ident": 0}) is not None
    assert [store.get(Obj, {"ident": 100 + t}) for t in range(4)] == [None] * 4


@pytest.mark.parametrize("kind", [ProcessMemoryStore, ThreadLocalStore])
def test_release_keeps_the_contents_and_clear_empties(kind: type[Any]) -> None:
    """release() frees connections and files, never data (as in stockpyle 0.1); clear() empties."""
    store = kind()
    store.put(Obj(1, "a"))
    store.release()
    assert store.get(Obj, {"ident": 1}) is not None
    store.put(Obj(2, "b"))  # still usable
    store.clear()
    assert len(store) == 0


class Versioned:
    __stockpyle_keys__: ClassVar[list[Any]] = ["ident", "name"]
    __stockpyle_version__ = "version"

    def __init__(self, ident: int, name: str, version: int) -> None:
        self.ident, self.name, self.version = ident, name, version


def _check_table(store: Any) -> None:
    """Every index entry points at the live record holding that key, and every record's keys point back."""
    tables = store._all_tables()
    for table in tables:
        for key, rec in table.index.items():
            assert key in rec.keys
            assert table.records[id(rec.obj)] is rec
        for rec in table.records.values():
            assert all(table.index[key] is rec for key in rec.keys)


@pytest.mark.parametrize("kind", [ProcessMemoryStore, ThreadLocalStore])
@pytest.mark.parametrize("renamed", [False, True], ids=["unchanged", "renamed"])
def test_re_putting_a_stored_object_makes_it_most_recently_used(kind: type[Any], renamed: bool) -> None:
    """A put of the object already stored (under the same keys or not) counts as a use for the LRU bound."""
    store = kind(maxsize=2)
    first, second = Obj(1, "a"), Obj(2, "b")
    store.put(first)
    store.put(second)
    if renamed:
        first.name = "a2"
    store.put(first)  # first becomes the most recent
    store.put(Obj(3, "c"))
    assert store.get(Obj, {"ident": 1}) is first
    assert store.get(Obj, {"ident": 2}) is None
    assert len(store) == 2
    _check_table(store)


@pytest.mark.parametrize("kind", [ProcessMemoryStore, ThreadLocalStore])
def test_re_putting_after_a_key_attribute_changed_drops_the_old_key(kind: type[Any]) -> None:
    store = kind()
    obj = Obj(1, "old")
    store.put(obj)
    obj.name = "new"
    store.put(obj)
    assert store.get(Obj, {"name": "old"}) is None
    assert store.get(Obj, {"name": "new"}) is obj
    assert store.get(Obj, {"ident": 1}) is obj
    assert len(store) == 1
    _check_table(store)


@pytest.mark.parametrize("kind", [ProcessMemoryStore, ThreadLocalStore])
def test_a_new_copy_replaces_the_stored_one_under_every_key(kind: type[Any]) -> None:
    """A copy sharing one key with the stored object replaces it under all of its keys (the others are stale)."""
    store = kind(maxsize=10)
    stored = Obj(1, "old")
    store.put(stored)
    store.put(Obj(2, "other"))
    same_keys = Obj(1, "old")
    store.put(same_keys)
    assert store.get(Obj, {"ident": 1}) is same_keys
    assert store.get(Obj, {"name": "old"}) is same_keys
    renamed = Obj(1, "renamed")
    store.put(renamed)
    assert store.get(Obj, {"name": "old"}) is None
    assert store.get(Obj, {"ident": 1}) is renamed
    assert store.get(Obj, {"name": "renamed"}) is renamed
    # a copy holding keys of two stored objects replaces both
    both = Obj(2, "renamed")
    store.put(both)
    assert store.get(Obj, {"ident": 1}) is None
    assert store.get(Obj, {"name": "other"}) is None
    assert store.get(Obj, {"ident": 2}) is both
    assert len(store) == 1
    _check_table(store)


@pytest.mark.parametrize("kind", [ProcessMemoryStore, ThreadLocalStore])
def test_re_putting_picks_up_a_lifetime_configured_since(kind: type[Any]) -> None:
    store = kind()
    obj = Obj(1, "a")
    store.put(obj)
    store.configure([Obj], 0.05)
    store.put(obj)  # unchanged object, but it now has a lifetime
    assert store.get(Obj, {"ident": 1}) is obj
    time.sleep(0.1)
    assert store.get(Obj, {"ident": 1}) is None
    assert store.reclaim_expired() + len(store) <= 1
    _check_table(store)


@pytest.mark.parametrize("kind", [ProcessMemoryStore, ThreadLocalStore])
def test_re_putting_a_stored_object_with_a_new_version_records_that_version(kind: type[Any]) -> None:
    """The entry's version follows the object: an older copy written afterwards is refused."""
    store = kind()
    obj = Versioned(1, "a", 1)
    store.put(obj)
    obj.version = 2
    store.put(obj)
    store.put(Versioned(1, "a", 1))  # a copy read before the update
    assert store.get(Versioned, {"ident": 1}) is obj
    _check_table(store)
