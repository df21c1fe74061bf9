"""RedisStore against raw redis-py (and dogpile.cache's redis backend), measured in one run on one server.

Run: ``python benchmarks/bench_redis.py [--quick]``.  Starts its own
``redis-server`` on a free loopback port (needs the binary) and stops it by
PID at the end.  Following the benchmarking notes (a loopback round trip
between two vCPUs is dominated by waking the idle one), the server is pinned
with ``taskset`` and this process to the same CPU while it measures (its
previous affinity is restored afterwards); ``--pin split|off`` changes that
(see "Pinning" in ``_timing.py``).

The raw baselines are what hand-written code does -- ``pickle.loads(r.get(key))``,
``[pickle.loads(v) for v in r.mget(keys)]``, a pipeline of ``SET ... PX`` --
on a client built exactly like the store's (same pool class, socket timeouts
and retry policy), with keys of the same length as the store's.  Rows are
interleaved (see ``_timing.py``) and reported as stockpyle's median and the
median of per-round ratios.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import Suite, interleaved, pinned_client, server_command, standalone

SIZE = 100


class Item:
    """A typical small cached object with two alternate keys."""

    __stockpyle_keys__ = ["key", ("zap", "bar")]  # noqa: RUF012

    def __init__(self, key: str, zap: int, bar: int, payload: Any = None) -> None:
        self.key = key
        self.zap = zap
        self.bar = bar
        self.payload = payload


class Solo:
    """An object with a single key (its put needs no stale-key read)."""

    __stockpyle_keys__ = ["key"]  # noqa: RUF012

    def __init__(self, key: str, payload: Any) -> None:
        self.key = key
        self.payload = payload


GET = "RedisStore.get"
GET_SIGNED = "RedisStore(secret=...).get"
RAW_GET = "raw Redis.get + pickle.loads"
DOGPILE = "dogpile.cache redis region.get"
BATCH = f"RedisStore.batch_get({SIZE})"
BATCH_SIGNED = f"RedisStore(secret=...).batch_get({SIZE})"
RAW_MGET = f"raw Redis.mget({SIZE}) + unpickle"
DOGPILE_MANY = f"dogpile.cache redis region.get_multi({SIZE})"
PUT = "RedisStore.put (2 keys)"
PUT_ONE_KEY = "RedisStore.put (1 key)"
RAW_SET = "raw pipeline SET PX x2 + pickle.dumps"
RAW_SET_ONE = "raw Redis.set PX + pickle.dumps"


class RedisMissing(RuntimeError):
    """The ``redis-server`` binary is not installed, or it did not start."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def pinned_redis() -> Iterator[str]:
    """A private redis-server (no persistence) on a free loopback port, pinned as chosen; yields its URL."""
    binary = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
    )
    if binary is None:
        raise RedisMissing("redis-server binary not found (apt-get install redis-server)")
    port = free_port()
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(server_command(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        probe = redis.Redis(port=port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 5
        while True:
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RedisMissing(f"redis-server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.02)
        probe.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(10)


def run(*, quick: bool = False) -> Suite:
    """Start a private, pinned redis-server and measure; without redis-py or the binary, a note and no rows."""
    suite = Suite("redis")
    try:
        import redis  # noqa: F401
    except ImportError:
        suite.notes.append("redis-py not installed: redis rows skipped (pip install stockpyle[redis])")
        return suite
    try:
        with pinned_redis() as url, pinned_client():
            _measure(suite, url, quick)
    except RedisMissing as exc:
        suite.notes.append(f"{exc}: redis rows skipped")
    return suite


def _measure(suite: Suite, url: str, quick: bool) -> None:
    from stockpyle.stores.drivers.redis import build_client
    from stockpyle.stores.redis import RedisStore

    objs = [Item(f"key-{i}", i, -i, {"name": f"object {i}", "values": list(range(10))}) for i in range(SIZE)]
    keydicts = [{"key": o.key} for o in objs]
    store = RedisStore(url, namespace="bench")
    store.batch_put(objs)
    signed = RedisStore(url, namespace="bench-signed", secret=b"benchmark secret")
    signed.batch_put(objs)
    # the hand-written side: a client built like the store's, keys as long as the store's
    raw = build_client(url, cluster=False, socket_timeout=0.5, connect_timeout=0.25)
    raw_keys = ["rw" + store.key_for(Item, kd)[2:] for kd in keydicts]
    dumps = pickle.dumps
    raw.mset({k: dumps(o, pickle.HIGHEST_PROTOCOL) for k, o in zip(raw_keys, objs, strict=True)})
    put_keys = ["rw" + store.key_for(Item, kd)[2:] for kd in ({"key": "put"}, {"zap": 1, "bar": -1})]
    one_key_store = RedisStore(url, namespace="bench-one")

    solo = Solo("solo", objs[1].payload)
    ttl = 86_400_000  # the store caps entries at one day: the raw side sets the same lifetime

    def raw_put() -> None:
        value = dumps(objs[1], pickle.HIGHEST_PROTOCOL)
        pipe = raw.pipeline(transaction=False)
        for key in put_keys:
            pipe.set(key, value, px=ttl)
        pipe.execute()

    k0, rk0 = keydicts[0], raw_keys[0]
    assert store.get(Item, k0).key == "key-0"  # type: ignore[union-attr]
    assert all(o is not None for o in store.batch_get(Item, keydicts))
    assert len([v for v in raw.mget(raw_keys) if v is not None]) == SIZE

    singles: list[tuple[str, Callable[[], object]]] = [
        (GET, lambda: store.get(Item, k0)),
        (GET_SIGNED, lambda: signed.get(Item, k0)),
        (RAW_GET, lambda: pickle.loads(raw.get(rk0))),
        (PUT, lambda: store.put(objs[1])),
        (RAW_SET, raw_put),
        (PUT_ONE_KEY, lambda: one_key_store.put(solo)),
        (RAW_SET_ONE, lambda: raw.set(put_keys[0], dumps(solo, pickle.HIGHEST_PROTOCOL), px=ttl)),
    ]
    batches: list[tuple[str, Callable[[], object]]] = [
        (BATCH, lambda: store.batch_get(Item, keydicts)),
        (BATCH_SIGNED, lambda: signed.batch_get(Item, keydicts)),
        (RAW_MGET, lambda: [pickle.loads(v) for v in raw.mget(raw_keys)]),
    ]
    try:
        from dogpile.cache import make_region
    except ImportError:
        suite.notes.append("dogpile.cache not installed: its redis rows are skipped")
    else:
        region = make_region().configure("dogpile.cache.redis", arguments={"url": url, "socket_timeout": 0.5})
        dogpile_keys = [f"dp:{o.key}" for o in objs]
        region.set_multi(dict(zip(dogpile_keys, objs, strict=True)))
        assert region.get(dogpile_keys[0]).key == "key-0"
        singles.append((DOGPILE, lambda: region.get(dogpile_keys[0])))
        batches.append((DOGPILE_MANY, lambda: region.get_multi(dogpile_keys)))

    rounds = 7 if quick else 21
    one = interleaved(singles, number=100 if quick else 300, rounds=rounds)
    many = interleaved(batches, number=10 if quick else 30, rounds=rounds)
    suite.compare(one, GET, RAW_GET, target="<= 1.20")
    suite.compare(one, GET, DOGPILE)
    suite.compare(one, GET_SIGNED, RAW_GET, note="HMAC-SHA256 verified before unpickling")
    suite.compare(one, PUT, RAW_SET, note="stockpyle reads the old key list first (stale-key cleanup)")
    suite.compare(one, PUT_ONE_KEY, RAW_SET_ONE, target="<= 1.20", note="a single key has no stale keys: no read first")
    suite.compare(many, BATCH, RAW_MGET, target="<= 1.20")
    suite.compare(many, BATCH, DOGPILE_MANY)
    suite.compare(many, BATCH_SIGNED, RAW_MGET)
    suite.notes.append(f"redis-py {_redis_version()}, RESP3")
    store.release()
    signed.release()
    one_key_store.release()
    raw.close()


def _redis_version() -> str:
    import redis

    return str(redis.__version__)


if __name__ == "__main__":
    raise SystemExit(standalone(run, __doc__.splitlines()[0]))
