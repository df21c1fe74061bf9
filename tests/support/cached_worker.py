"""A second process for tests/test_cached.py: the same ``@cached`` function over the same memcached namespace.

Run as ``python tests/support/cached_worker.py OP ADDRESS NAMESPACE [ITEM]``;
it prints one JSON line.  ``OP`` is

``keys``
    the keys of the calls in :data:`KEY_CALLS`, in order;
``call``
    the result of ``price(ITEM, 3)`` through the cache.  With
    ``CACHED_WORKER_MUST_HIT=1`` in the environment the function raises if it
    is called: the value must come from the cache.
"""

from __future__ import annotations

import json
import os
import sys
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
