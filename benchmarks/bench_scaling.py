"""How ProcessMemoryStore scales: get cost from 1,000 to 1,000,000 objects, and memory per object.

Run: ``python benchmarks/bench_scaling.py [--quick]`` (``--quick`` stops at
100,000 objects).  Lookups cycle through 1,000 random keys, so larger tables
also pay for the cache misses a real workload has.  Each size is compared
with a dict of the same size (both keys indexed) and with the store at 1,000
objects, all interleaved in one run.  Memory is what :mod:`tracemalloc` sees
allocated by filing objects that already exist (the objects themselves are
not counted), per object, against a dict, cachetools and dogpile.cache
holding the same objects under the same two keys.
"""

from __future__ import annotations

import gc
import random
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Row, Suite, interleaved, standalone

from stockpyle import ProcessMemoryStore


class User:
    __stockpyle_keys__: ClassVar[list[Any]] = ["id", "email"]

    def __init__(self, ident: int, email: str) -> None:
        self.id = ident
        self.email = email


def _users(n: int) -> list[User]:
    return [User(i, f"user{i}@example.com") for i in range(n)]


def _lookups(getter: Callable[[int], object], probes: list[int]) -> Callable[[], object]:
    def cycle() -> None:
        for key in probes:
            getter(key)

    return cycle


def _traced_bytes(fill: Callable[[], object]) -> int:
    """Bytes still allocated after ``fill()`` (what the container keeps)."""
    gc.collect()
    tracemalloc.start()
    try:
        keep = fill()
        current, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del keep
    return current


def _memory_rows(suite: Suite, n: int) -> None:
    users = _users(n)

    def pm() -> object:
        store = ProcessMemoryStore()
        store.batch_put(users)
        return store

    def bounded() -> object:
        store = ProcessMemoryStore(maxsize=n, lifetime_cb=lambda obj: 300)
        store.batch_put(users)
        return store

    def plain() -> object:
        table: dict[Any, User] = {}
        for u in users:
            table[("id", u.id)] = u
            table[("email", u.email)] = u
        return table

    ours = {"ProcessMemoryStore": pm, "ProcessMemoryStore(maxsize, lifetime)": bounded}
    peers: dict[str, Callable[[], object]] = {"dict (both keys)": plain}
    try:
        import cachetools
    except ImportError:
        suite.notes.append("cachetools not installed: its memory rows are skipped")
    else:

        def ttl() -> object:
            cache: Any = cachetools.TTLCache(maxsize=2 * n, ttl=300)
            for u in users:
                cache[("id", u.id)] = u
                cache[("email", u.email)] = u
            return cache

        peers["cachetools.TTLCache (both keys)"] = ttl
    try:
        from dogpile.cache import make_region
    except ImportError:
        suite.notes.append("dogpile.cache not installed: its memory rows are skipped")
    else:

        def dogpile() -> object:
            region = make_region().configure("dogpile.cache.memory", expiration_time=300)
            region.set_multi({f"id:{u.id}": u for u in users})
            region.set_multi({f"email:{u.email}": u for u in users})
            return region

        peers["dogpile.cache memory region (both keys)"] = dogpile

    measured = {name: _traced_bytes(fill) / n for name, fill in {**ours, **peers}.items()}
    for name in ours:
        for peer in peers:
            suite.rows.append(
                Row(
                    suite.name,
                    f"{name} bytes/object ({n:,} objects)",
                    measured[name],
                    peer,
                    measured[peer],
                    measured[name] / measured[peer],
                    unit="B",
                )
            )


def run(*, quick: bool = False) -> Suite:
    """Measure get cost at growing sizes, then memory per stored object."""
    suite = Suite("scaling")
    sizes = [1_000, 10_000, 100_000] if quick else [1_000, 10_000, 100_000, 1_000_000]
    rng = random.Random(1)
    rows: list[tuple[str, Callable[[], object]]] = []
    keep: list[object] = []
    for n in sizes:
        users = _users(n)
        store = ProcessMemoryStore()
        store.batch_put(users)
        table = {u.id: u for u in users} | {u.email: u for u in users}
        probes = [rng.randrange(n) for _ in range(1_000)]
        keep += [users, store, table]
        get = store.get

        def ours(key: int, get: Any = get) -> object:
            return get(User, {"id": key})

        assert ours(probes[0]) is users[probes[0]]
        rows.append((f"ProcessMemoryStore.get, {n:,} objects", _lookups(ours, probes)))
        rows.append((f"dict.get, {n:,} objects", _lookups(table.get, probes)))
    results = interleaved(rows, number=3 if quick else 5, rounds=7 if quick else 15, ops_per_call=1_000)
    smallest = f"ProcessMemoryStore.get, {sizes[0]:,} objects"
    for n in sizes:
        name = f"ProcessMemoryStore.get, {n:,} objects"
        suite.compare(results, name, f"dict.get, {n:,} objects")
        if n != sizes[0]:
            suite.compare(results, name, smallest, note="growth of get cost with the table size")
    del keep, rows
    gc.collect()
    _memory_rows(suite, 20_000 if quick else 100_000)
    return suite


if __name__ == "__main__":
    raise SystemExit(standalone(run, __doc__.splitlines()[0]))
