"""MemcacheStore against raw pymemcache, raw pylibmc and dogpile.cache, measured in one run on one server.

Run: ``python benchmarks/bench_memcache.py [--quick] [--pin same|split|off]``.
Starts its own memcached on a free loopback port (needs the ``memcached``
binary), pinned with this process to one CPU by default (see "Pinning" in
``_timing.py``), and stops it by PID at the end.  Rows are interleaved (see
``_timing.py``) and each is reported as stockpyle's median and its ratio to
the peer.  The raw baseline is what hand-written code does:
``pickle.loads(client.get(key))``, on a pool with the store's timeouts and
with keys as long as the store's.  The pylibmc rows (when pylibmc is
installed) compare ``MemcacheStore(driver="pylibmc")`` with raw pylibmc and
with dogpile.cache's pylibmc backend.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import MemcachedMissing, Suite, interleaved, memcached, standalone

SIZE = 100


class Item:
    """A typical small cached object with two alternate keys."""

    __stockpyle_keys__ = ["key", ("zap", "bar")]  # noqa: RUF012

    def __init__(self, key: str, zap: int, bar: int, payload: Any = None) -> None:
        self.key = key
        self.zap = zap
        self.bar = bar
        self.payload = payload


class Single:
    """An object with one key (no alternate keys to clean up)."""

    __stockpyle_keys__ = ["key"]  # noqa: RUF012

    def __init__(self, key: str, payload: Any = None) -> None:
        self.key = key
        self.payload = payload


GET = "MemcacheStore.get"
GET_SIGNED = "MemcacheStore(secret=...).get"
RAW_POOLED = "raw PooledClient.get + pickle.loads"
RAW_PLAIN = "raw Client.get + pickle.loads"
DOGPILE = "dogpile.cache pymemcache region.get"
BATCH = f"MemcacheStore.batch_get({SIZE})"
BATCH_SIGNED = f"MemcacheStore(secret=...).batch_get({SIZE})"
RAW_MANY = f"raw PooledClient.get_many({SIZE}) + unpickle"
RAW_MANY_PLAIN = f"raw Client.get_many({SIZE}) + unpickle"
DOGPILE_MANY = f"dogpile.cache pymemcache region.get_multi({SIZE})"
PUT = "MemcacheStore.put (2 keys)"
RAW_SET = "raw PooledClient.set x2 + pickle.dumps"
PUT_ONE = "MemcacheStore.put (1 key)"
RAW_SET_ONE = "raw PooledClient.set + pickle.dumps"
LIB_GET = 'MemcacheStore(driver="pylibmc").get'
LIB_RAW = "raw pylibmc Client.get + pickle.loads"
LIB_DOGPILE = "dogpile.cache pylibmc region.get"
LIB_BATCH = f'MemcacheStore(driver="pylibmc").batch_get({SIZE})'
LIB_RAW_MANY = f"raw pylibmc Client.get_multi({SIZE}) + unpickle"
LIB_DOGPILE_MANY = f"dogpile.cache pylibmc region.get_multi({SIZE})"
LIB_PUT = 'MemcacheStore(driver="pylibmc").put (2 keys)'
LIB_RAW_SET = "raw pylibmc Client.set_multi x2 + pickle.dumps"


def run(*, quick: bool = False) -> Suite:
    """Start a private memcached and measure; without the binary, a note and no rows."""
    suite = Suite("memcache")
    try:
        import pymemcache  # noqa: F401
    except ImportError:
        suite.notes.append("pymemcache not installed: memcache rows skipped (pip install stockpyle[memcache])")
        return suite
    try:
        with memcached() as address:
            _measure(suite, address, quick)
    except MemcachedMissing as exc:
        suite.notes.append(f"{exc}: memcache rows skipped")
    return suite


def _measure(suite: Suite, address: str, quick: bool) -> None:
    from pymemcache.client.base import Client, PooledClient

    from stockpyle.stores.memcache import MemcacheStore

    objs = [Item(f"key-{i}", i, -i, {"name": f"object {i}", "values": list(range(10))}) for i in range(SIZE)]
    keydicts = [{"key": o.key} for o in objs]
    store = MemcacheStore([address], namespace="bench")
    store.batch_put(objs)
    signed = MemcacheStore([address], namespace="bench-signed", secret=b"benchmark secret")
    signed.batch_put(objs)

    single = Single("single-0", {"name": "object 0", "values": list(range(10))})
    store.put(single)

    host, port = address.split(":")
    # the hand-written side: a pool with the store's timeouts, and keys as long as the store's
    pooled = PooledClient((host, int(port)), no_delay=True, default_noreply=False, connect_timeout=0.25, timeout=0.5)
    plain = Client((host, int(port)), no_delay=True, default_noreply=False)
    raw_keys = ["rw" + store.key_for(Item, {"key": o.key})[2:] for o in objs]
    raw_single = "rw" + store.key_for(Single, {"key": single.key})[2:]
    pooled.set_many({k: pickle.dumps(o, pickle.HIGHEST_PROTOCOL) for k, o in zip(raw_keys, objs, strict=True)})

    k0, rk0 = keydicts[0], raw_keys[0]
    assert store.get(Item, k0).key == "key-0"  # type: ignore[union-attr]
    assert all(o is not None for o in store.batch_get(Item, keydicts))
    assert len(pooled.get_many(raw_keys)) == SIZE

    singles: list[tuple[str, Callable[[], object]]] = [
        (GET, lambda: store.get(Item, k0)),
        (GET_SIGNED, lambda: signed.get(Item, k0)),
        (RAW_POOLED, lambda: pickle.loads(pooled.get(rk0))),
        (RAW_PLAIN, lambda: pickle.loads(plain.get(rk0))),
        (PUT, lambda: store.put(objs[1])),
        (
            RAW_SET,
            lambda: pooled.set_many(dict.fromkeys(raw_keys[1:3], pickle.dumps(objs[1], pickle.HIGHEST_PROTOCOL))),
        ),
        (PUT_ONE, lambda: store.put(single)),
        (RAW_SET_ONE, lambda: pooled.set(raw_single, pickle.dumps(single, pickle.HIGHEST_PROTOCOL))),
    ]
    batches: list[tuple[str, Callable[[], object]]] = [
        (BATCH, lambda: store.batch_get(Item, keydicts)),
        (BATCH_SIGNED, lambda: signed.batch_get(Item, keydicts)),
        (RAW_MANY, lambda: [pickle.loads(v) for v in pooled.get_many(raw_keys).values()]),
        (RAW_MANY_PLAIN, lambda: [pickle.loads(v) for v in plain.get_many(raw_keys).values()]),
    ]
    try:
        from dogpile.cache import make_region
    except ImportError:
        suite.notes.append("dogpile.cache not installed: its memcache rows are skipped")
    else:
        region = make_region().configure(
            "dogpile.cache.pymemcache",
            arguments={"url": [address], "memcached_expire_time": 0, "no_delay": True},
        )
        dogpile_keys = [f"dp:{o.key}" for o in objs]
        region.set_multi(dict(zip(dogpile_keys, objs, strict=True)))
        assert region.get(dogpile_keys[0]).key == "key-0"
        singles.append((DOGPILE, lambda: region.get(dogpile_keys[0])))
        batches.append((DOGPILE_MANY, lambda: region.get_multi(dogpile_keys)))

    lib = _pylibmc_rows(suite, address=address, objs=objs, keydicts=keydicts, singles=singles, batches=batches)

    rounds = 7 if quick else 21
    one = interleaved(singles, number=100 if quick else 300, rounds=rounds)
    many = interleaved(batches, number=10 if quick else 30, rounds=rounds)
    suite.compare(one, GET, RAW_POOLED, target="<= 1.20")
    suite.compare(one, GET, RAW_PLAIN)
    suite.compare(one, GET, DOGPILE)
    suite.compare(one, GET_SIGNED, RAW_POOLED, note="HMAC-SHA256 verified before unpickling")
    suite.compare(one, PUT_ONE, RAW_SET_ONE, target="<= 1.20")
    suite.compare(one, PUT, RAW_SET, note="stockpyle reads the old key list first (stale-key cleanup)")
    suite.compare(many, BATCH, RAW_MANY, target="<= 1.20")
    suite.compare(many, BATCH, RAW_MANY_PLAIN)
    suite.compare(many, BATCH, DOGPILE_MANY, note="raw pymemcache is itself only ~2.3x faster than dogpile here")
    suite.compare(many, BATCH_SIGNED, RAW_MANY)
    if lib is not None:
        suite.compare(one, LIB_GET, LIB_RAW, target="<= 1.10")
        suite.compare(one, LIB_GET, LIB_DOGPILE)
        suite.compare(one, LIB_GET, GET, note="the pymemcache driver's get")
        suite.compare(one, LIB_PUT, LIB_RAW_SET, note="stockpyle reads the old key list first (stale-key cleanup)")
        suite.compare(
            many,
            LIB_BATCH,
            LIB_DOGPILE_MANY,
            target="<= 1/3",
            note="like for like: dogpile on pylibmc too; raw pylibmc + unpickle is itself ~0.65x of it",
        )
        suite.compare(many, LIB_BATCH, DOGPILE_MANY, note="dogpile on pymemcache (the memcache rows' peer)")
        suite.compare(many, LIB_BATCH, LIB_RAW_MANY)
        suite.compare(many, LIB_BATCH, BATCH, note="the pymemcache driver's batch_get")
        lib.release()
    store.release()
    signed.release()
    pooled.close()
    plain.close()


def _pylibmc_rows(
    suite: Suite,
    *,
    address: str,
    objs: list[Item],
    keydicts: list[dict[str, str]],
    singles: list[tuple[str, Callable[[], object]]],
    batches: list[tuple[str, Callable[[], object]]],
) -> Any:
    """Add the pylibmc rows to ``singles``/``batches``; returns the store (None without pylibmc)."""
    try:
        import pylibmc
    except ImportError:
        suite.notes.append("pylibmc not installed: its rows are skipped (pip install 'stockpyle[pylibmc]')")
        return None
    from stockpyle.stores.memcache import MemcacheStore

    store = MemcacheStore([address], namespace="bench-pylibmc", driver="pylibmc")
    store.batch_put(objs)
    raw = pylibmc.Client([address], behaviors={"tcp_nodelay": True})
    raw_keys = ["rl" + store.key_for(Item, {"key": o.key})[2:] for o in objs]  # keys as long as the store's
    raw.set_multi({k: pickle.dumps(o, pickle.HIGHEST_PROTOCOL) for k, o in zip(raw_keys, objs, strict=True)})
    rk0, k0 = raw_keys[0], keydicts[0]
    assert store.get(Item, k0).key == "key-0"  # type: ignore[union-attr]
    assert all(o is not None for o in store.batch_get(Item, keydicts))
    assert pickle.loads(raw.get(rk0)).key == "key-0"
    two = tuple(raw_keys[1:3])
    singles += [
        (LIB_GET, lambda: store.get(Item, k0)),
        (LIB_RAW, lambda: pickle.loads(raw.get(rk0))),
        (LIB_PUT, lambda: store.put(objs[1])),
        (LIB_RAW_SET, lambda: raw.set_multi(dict.fromkeys(two, pickle.dumps(objs[1], pickle.HIGHEST_PROTOCOL)))),
    ]
    batches += [
        (LIB_BATCH, lambda: store.batch_get(Item, keydicts)),
        (LIB_RAW_MANY, lambda: [pickle.loads(v) for v in raw.get_multi(raw_keys).values()]),
    ]
    try:
        from dogpile.cache import make_region
    except ImportError:
        suite.notes.append("dogpile.cache not installed: its pylibmc rows are skipped")
        return store
    region = make_region().configure(
        "dogpile.cache.pylibmc",
        arguments={"url": [address], "memcached_expire_time": 0, "behaviors": {"tcp_nodelay": True}},
    )
    dogpile_keys = [f"dplib:{o.key}" for o in objs]
    region.set_multi(dict(zip(dogpile_keys, objs, strict=True)))
    assert region.get(dogpile_keys[0]).key == "key-0"
    assert all(o.key == f"key-{i}" for i, o in enumerate(region.get_multi(dogpile_keys)))
    singles.append((LIB_DOGPILE, lambda: region.get(dogpile_keys[0])))
    batches.append((LIB_DOGPILE_MANY, lambda: region.get_multi(dogpile_keys)))
    return store


if __name__ == "__main__":
    raise SystemExit(standalone(run, __doc__.splitlines()[0]))
