"""In-process hit paths: stockpyle against a dict, cachetools and dogpile.cache.

Run: ``python benchmarks/bench_memory.py``.  Every row is measured in the same
run and reported as a median plus its ratio to the plain dict lookup and to
dogpile.cache's memory region.  Peers that are not installed are skipped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _timing import interleaved

from stockpyle import ChainedStore, ProcessMemoryStore


class User:
    __stockpyle_keys__: ClassVar[list[Any]] = ["id", "email"]

    def __init__(self, ident: str, email: str) -> None:
        self.id = ident
        self.email = email


def main() -> int:
    n = 10_000
    users = [User(f"user-{i}", f"u{i}@example.com") for i in range(n)]
    probe = users[n // 2]
    keydict = {"id": probe.id}
    rows: list[tuple[str, Callable[[], object]]] = []

    plain = {u.id: u for u in users}
    rows.append(("dict lookup", lambda: plain.get(probe.id)))

    store = ProcessMemoryStore()
    store.batch_put(users)
    assert store.get(User, keydict) is probe
    rows.append(("ProcessMemoryStore.get hit", lambda: store.get(User, keydict)))

    bounded = ProcessMemoryStore(maxsize=n, lifetime_cb=lambda obj: 300)
    bounded.batch_put(users)
    assert bounded.get(User, keydict) is probe
    rows.append(("ProcessMemoryStore(maxsize, lifetime).get hit", lambda: bounded.get(User, keydict)))

    chain = ChainedStore([ProcessMemoryStore(), ProcessMemoryStore()])
    chain.batch_put(users)
    assert chain.get(User, keydict) is probe
    rows.append(("ChainedStore([PM, PM]).get L1 hit", lambda: chain.get(User, keydict)))

    try:
        import cachetools

        ttl: Any = cachetools.TTLCache(maxsize=n * 2, ttl=300)
        for u in users:
            ttl[u.id] = u
        rows.append(("cachetools.TTLCache get", lambda: ttl.get(probe.id)))
    except ImportError:
        print("cachetools not installed: skipped")

    try:
        from dogpile.cache import make_region

        region = make_region().configure("dogpile.cache.memory", expiration_time=300)
        for u in users:
            region.set(u.id, u)
        assert region.get(probe.id) is probe
        rows.append(("dogpile.cache memory region get", lambda: region.get(probe.id)))
    except ImportError:
        print("dogpile.cache not installed: skipped")

    results = interleaved(rows)
    base = results["dict lookup"]
    dogpile = results.get("dogpile.cache memory region get")
    print(f"{'operation':48} {'median ns':>10} {'x dict':>8} {'x dogpile':>10}")
    for name, timing in results.items():
        vs_dogpile = f"{timing.ratio_to(dogpile):10.2f}" if dogpile else f"{'-':>10}"
        print(f"{name:48} {timing.median:10.0f} {timing.ratio_to(base):8.2f} {vs_dogpile}")
    pm = results["ProcessMemoryStore.get hit"]
    print()
    chain_ratio = results["ChainedStore([PM, PM]).get L1 hit"].ratio_to(pm)
    print(f"ChainedStore L1 hit / ProcessMemoryStore.get = {chain_ratio:.2f}  (target <= 1.25)")
    if dogpile:
        print(f"ProcessMemoryStore.get / dogpile memory get  = {pm.ratio_to(dogpile):.2f}  (target <= 0.50)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
