"""A second process for tests/test_cached.py: the same ``@cached`` function over the same memcached namespace.

Run as ``python tests/support/cached_worker.py OP ADDRESS NAMESPACE [ITEM]``;
it prints one JSON line.  ``OP`` is

``keys``
    the keys of the calls in :data:`KEY_CALLS`, in order;
``call``
    the result of ``price(ITEM, 3)`` through the cache.  With
    ``CACHED_WORKER_MUST_HIT=1`` in the environment the function raises if it
    is called: the value must come from the cache.
``herd``
    at unix time ``AT`` (the 5th argument; every worker is given the same),
    ``slow_price(ITEM)`` through the cache: its result, whether this process
    ran the function, and whether it was ready only after ``AT``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

#: calls whose keys both processes compute: (args, kwargs)
KEY_CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    (("apple",), {}),
    (("apple", 1), {"currency": "EUR"}),
    ((), {"item": "pear", "qty": 2}),
    (("fig", 1), {"currency": "USD"}),
]

#: (item, qty, currency) of every call of price() in this process
COMPUTED: list[tuple[str, int, str]] = []


def price(item: str, qty: int = 1, *, currency: str = "EUR") -> dict[str, Any]:
    """The function both processes cache: its result says which process computed it."""
    if os.environ.get("CACHED_WORKER_MUST_HIT") == "1":
        raise AssertionError(f"price({item!r}) was computed in the worker: the cache should have had it")
    COMPUTED.append((item, qty, currency))
    return {"item": item, "qty": qty, "currency": currency, "pid": os.getpid()}


def slow_price(item: str) -> dict[str, Any]:
    """A function that takes a while: long enough for other processes to miss the same key meanwhile."""
    COMPUTED.append((item, 1, "slow"))
    time.sleep(1.0)
    return {"item": item, "pid": os.getpid()}


def make_store(address: str, namespace: str) -> Any:
    from stockpyle import ChainedStore, MemcacheStore, ProcessMemoryStore

    return ChainedStore([ProcessMemoryStore(), MemcacheStore(servers=[address], namespace=namespace)], bus=None)


def cached_price(store: Any) -> Any:
    from stockpyle import cached

    return cached(store, lifetime=60)(price)


def main(argv: list[str]) -> None:
    op, address, namespace = argv[:3]
    store = make_store(address, namespace)
    fn = cached_price(store)
    try:
        if op == "keys":
            print(json.dumps([fn.key_for(*args, **kwargs) for args, kwargs in KEY_CALLS]))
        elif op == "call":
            print(json.dumps(fn(argv[3], 3)))
        elif op == "herd":
            from stockpyle import cached

            slow = cached(store, lifetime=60)(slow_price)
            slow.key_for(argv[3])  # imports and first-use costs before the start line
            late = time.time() > float(argv[4])
            time.sleep(max(0.0, float(argv[4]) - time.time()))
            print(json.dumps({"value": slow(argv[3]), "computed": bool(COMPUTED), "late": late}))
        else:
            raise SystemExit(f"unknown op {op!r}")
    finally:
        store.release()


if __name__ == "__main__":
    # run from tests/, not tests/support/ (whose redis.py and memcached.py would shadow
    # the client libraries), and import this file as support.cached_worker: the cached
    # function's name (module + qualname) is part of its keys, so it must be the parent's
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from support.cached_worker import main as imported_main

    imported_main(sys.argv[1:])
