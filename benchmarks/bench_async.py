"""The asyncio stores against the sync chain, aiocache, cashews and raw redis.asyncio, measured in one run.

Run: ``python benchmarks/bench_async.py [--quick] [--pin same|split|off]``.
Starts its own ``redis-server`` (and ``memcached`` for the optional memcached
rows) on free loopback ports, pinned with ``taskset`` to the benchmark's CPU
by default (see "Pinning" in ``_timing.py``), and stops them by PID.

The rows, each a ratio to a baseline measured in the same run, interleaved:

* **L1 hit**: ``await AsyncChainedStore([ProcessMemoryStore(), shared]).get``
  of a hot key against ``ChainedStore([ProcessMemoryStore(), shared]).get``,
  ``shared`` being a Redis layer (a second ProcessMemoryStore without
  redis-server); issue 16's target is <= 1.3x.
* **memory get / batch_get(100)**: what an asyncio user calls for an
  in-process hit -- the chain's L1 hit, or ``ProcessMemoryStore.get`` called
  directly (it is not a coroutine) -- against aiocache's ``SimpleMemoryCache``
  and cashews' ``mem://`` backend, all three at their defaults; none pickles
  in memory, a get returns a stored reference (aiocache and stockpyle store
  the object itself, cashews a shallow copy made by ``set``).
* **Redis get / batch_get(100)**: ``AsyncRedisStore`` against aiocache's
  ``RedisCache(serializer=PickleSerializer())``, cashews' ``redis://`` and the
  hand-written ``pickle.loads(await r.get(key))`` /
  ``[pickle.loads(v) for v in await r.mget(keys)]`` on a client built exactly
  like the store's.  Every side reads keys of the store's key length; socket
  timeouts are 0.5 s and connect timeouts 0.25 s wherever the peer lets them
  be set.
* **memcached get / batch_get(100)** (when ``memcached`` and aiomcache are
  there): ``AsyncMemcacheStore`` against aiocache's ``MemcachedCache``
  (aiomcache) with ``PickleSerializer`` and raw aiomcache + ``pickle.loads``.

Every asyncio row is timed as ``number`` awaits in one coroutine run by
``loop.run_until_complete`` (the default asyncio event loop), so the cost of
entering the loop is spread over the ``number`` operations; the sync L1 row is
the same loop without ``await``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import pickle
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import MemcachedMissing, Suite, Timing, interleaved, memcached, pinned_client, standalone
from bench_redis import Item, RedisMissing, pinned_redis

SIZE = 100
SECRET = b"benchmark secret"

# L1 hit
ASYNC_L1 = "AsyncChainedStore([PM, {shared}]).get L1 hit"
SYNC_L1 = "ChainedStore([PM, {shared}]).get L1 hit"
# memory
PM_DIRECT = "ProcessMemoryStore.get (called in a coroutine)"
AIOCACHE_MEM = "aiocache SimpleMemoryCache(timeout=None).get"
AIOCACHE_MEM_DEFAULT = "aiocache SimpleMemoryCache().get (timeout=5 default)"
CASHEWS_MEM = "cashews mem:// get"
ASYNC_L1_BATCH = f"AsyncChainedStore([PM, {{shared}}]).batch_get({SIZE}) L1 hits"
SYNC_L1_BATCH = f"ChainedStore([PM, {{shared}}]).batch_get({SIZE}) L1 hits"
AIOCACHE_MEM_BATCH = f"aiocache SimpleMemoryCache(timeout=None).multi_get({SIZE})"
CASHEWS_MEM_BATCH = f"cashews mem:// get_many({SIZE})"
# redis
GET = "AsyncRedisStore.get"
GET_SIGNED = "AsyncRedisStore(secret=...).get"
RAW_GET = "raw redis.asyncio get + pickle.loads"
AIOCACHE_GET = "aiocache RedisCache(PickleSerializer, timeout=None).get"
AIOCACHE_GET_DEFAULT = "aiocache RedisCache(PickleSerializer).get (timeout=5 default)"
CASHEWS_GET = "cashews redis:// get"
CASHEWS_GET_SIGNED = "cashews redis://?secret=...&digestmod=sha256 get"
BATCH = f"AsyncRedisStore.batch_get({SIZE})"
BATCH_SIGNED = f"AsyncRedisStore(secret=...).batch_get({SIZE})"
RAW_MGET = f"raw redis.asyncio mget({SIZE}) + unpickle"
AIOCACHE_MULTI = f"aiocache RedisCache(PickleSerializer, timeout=None).multi_get({SIZE})"
CASHEWS_MANY = f"cashews redis:// get_many({SIZE})"
CASHEWS_MANY_SIGNED = f"cashews redis://?secret=...&digestmod=sha256 get_many({SIZE})"
# memcached
MC_GET = "AsyncMemcacheStore.get"
MC_RAW_GET = "raw aiomcache get + pickle.loads"
MC_AIOCACHE_GET = "aiocache MemcachedCache(PickleSerializer, timeout=None).get"
MC_BATCH = f"AsyncMemcacheStore.batch_get({SIZE})"
MC_RAW_MULTI = f"raw aiomcache multi_get({SIZE}) + unpickle"
MC_AIOCACHE_MULTI = f"aiocache MemcachedCache(PickleSerializer, timeout=None).multi_get({SIZE})"

#: a body runs its operation ``n`` times: ``async def body(n)`` or, for sync baselines, ``def body(n)``
Body = Callable[[int], "Awaitable[None] | None"]


def timed(
    loop: asyncio.AbstractEventLoop, rows: list[tuple[str, Body]], *, number: int, rounds: int
) -> dict[str, Timing]:
    """Interleave ``rows`` (see ``_timing.interleaved``); a coroutine body runs its ``number`` awaits in ``loop``."""

    def wrap(body: Body) -> Callable[[], object]:
        if inspect.iscoroutinefunction(body):
            return lambda: loop.run_until_complete(body(number))
        return lambda: body(number)

    return interleaved([(name, wrap(body)) for name, body in rows], number=1, rounds=rounds, ops_per_call=number)


def _peer(name: str) -> Any:
    """The module ``name``, or None when that peer is not installed."""
    try:
        return __import__(name)
    except ImportError:
        return None


def run(*, quick: bool = False) -> Suite:
    """Measure the asyncio rows; peers or servers that are missing are skipped with a note."""
    suite = Suite("async")
    loop = asyncio.new_event_loop()
    try:
        with contextlib.ExitStack() as servers:
            url: str | None = None
            if _peer("redis") is None:
                suite.notes.append("redis-py not installed: the Redis rows are skipped and the L1 chains use [PM, PM]")
            else:
                try:
                    url = servers.enter_context(pinned_redis())
                except RedisMissing as exc:
                    suite.notes.append(f"{exc}: the Redis rows are skipped and the L1 chains use [PM, PM]")
            with pinned_client():
                _memory(suite, loop, url, quick)
                if url is not None:
                    _redis(suite, loop, url, quick)
                _memcached(suite, loop, quick)
        suite.notes.append(
            f"asyncio default event loop ({type(loop).__name__}); aiocache {_version('aiocache')}, "
            f"cashews {_version('cashews')}, redis-py {_version('redis')}, aiomcache {_version('aiomcache')}"
        )
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    return suite


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _objects() -> list[Item]:
    return [Item(f"key-{i}", i, -i, {"name": f"object {i}", "values": list(range(10))}) for i in range(SIZE)]


def _same_length(prefix: str, keys: list[str]) -> list[str]:
    """Peer keys as long as the store's: its keys with the first two characters replaced by ``prefix``."""
    assert len(prefix) == 2
    return [prefix + key[2:] for key in keys]


# ---------------------------------------------------------------------------
# L1 hit and in-process get


def _memory(suite: Suite, loop: asyncio.AbstractEventLoop, url: str | None, quick: bool) -> None:
    from stockpyle import AsyncChainedStore, ChainedStore, ProcessMemoryStore

    objs = _objects()
    keydicts = [{"key": o.key} for o in objs]
    k0 = keydicts[0]
    if url is not None:
        from stockpyle import AsyncRedisStore, RedisStore

        shared_name = "AsyncRedisStore|RedisStore"
        async_shared: Any = AsyncRedisStore(url, namespace="bench-l1-async")
        sync_shared: Any = RedisStore(url, namespace="bench-l1-sync")
    else:
        shared_name = "PM"
        async_shared = ProcessMemoryStore()
        sync_shared = ProcessMemoryStore()
    achain = AsyncChainedStore([ProcessMemoryStore(), async_shared], bus=None)
    chain = ChainedStore([ProcessMemoryStore(), sync_shared], bus=None)
    loop.run_until_complete(achain.batch_put(objs))
    chain.batch_put(objs)
    direct = ProcessMemoryStore()
    direct.batch_put(objs)

    async def check() -> None:
        assert (await achain.get(Item, k0)).key == "key-0"
        assert all(o is not None for o in await achain.batch_get(Item, keydicts))

    loop.run_until_complete(check())
    assert chain.get(Item, k0).key == "key-0"  # type: ignore[union-attr]

    async def async_l1(n: int) -> None:
        get = achain.get
        for _ in range(n):
            await get(Item, k0)

    def sync_l1(n: int) -> None:
        get = chain.get
        for _ in range(n):
            get(Item, k0)

    async def pm_direct(n: int) -> None:
        get = direct.get
        for _ in range(n):
            get(Item, k0)

    async def async_l1_batch(n: int) -> None:
        batch_get = achain.batch_get
        for _ in range(n):
            await batch_get(Item, keydicts)

    singles: list[tuple[str, Body]] = [
        (ASYNC_L1, async_l1),
        (SYNC_L1, sync_l1),
        (PM_DIRECT, pm_direct),
    ]

    def sync_l1_batch(n: int) -> None:
        batch_get = chain.batch_get
        for _ in range(n):
            batch_get(Item, keydicts)

    batches: list[tuple[str, Body]] = [(ASYNC_L1_BATCH, async_l1_batch), (SYNC_L1_BATCH, sync_l1_batch)]
    keys = [f"Item:key={o.key}" for o in objs]  # the peers' memory caches take one string key
    peers: list[Any] = []

    aiocache = _peer("aiocache")
    if aiocache is None:
        suite.notes.append("aiocache not installed: its rows are skipped (pip install aiocache)")
    else:
        # timeout=None: no asyncio.wait_for around each call (stockpyle's in-process get has no timeout);
        # the default (timeout=5) is measured too
        mem = aiocache.SimpleMemoryCache(timeout=None)
        mem_default = aiocache.SimpleMemoryCache()
        for cache in (mem, mem_default):
            loop.run_until_complete(cache.multi_set(list(zip(keys, objs, strict=True))))
            assert loop.run_until_complete(cache.get(keys[0])) is objs[0]
            peers.append(cache)

        async def aiocache_mem(n: int) -> None:
            get = mem.get
            key = keys[0]
            for _ in range(n):
                await get(key)

        async def aiocache_mem_default(n: int) -> None:
            get = mem_default.get
            key = keys[0]
            for _ in range(n):
                await get(key)

        async def aiocache_mem_batch(n: int) -> None:
            multi_get = mem.multi_get
            for _ in range(n):
                await multi_get(keys)

        singles += [(AIOCACHE_MEM, aiocache_mem), (AIOCACHE_MEM_DEFAULT, aiocache_mem_default)]
        batches.append((AIOCACHE_MEM_BATCH, aiocache_mem_batch))

    cashews = _peer("cashews")
    if cashews is None:
        suite.notes.append("cashews not installed: its rows are skipped (pip install cashews)")
    else:
        ccache = cashews.Cache()
        ccache.setup("mem://", size=10 * SIZE)

        async def fill() -> None:
            await ccache.set_many(dict(zip(keys, objs, strict=True)))
            assert (await ccache.get(keys[0])).key == "key-0"  # a shallow copy made by set

        loop.run_until_complete(fill())
        peers.append(ccache)

        async def cashews_mem(n: int) -> None:
            get = ccache.get
            key = keys[0]
            for _ in range(n):
                await get(key)

        async def cashews_mem_batch(n: int) -> None:
            get_many = ccache.get_many
            for _ in range(n):
                await get_many(*keys)

        singles.append((CASHEWS_MEM, cashews_mem))
        batches.append((CASHEWS_MEM_BATCH, cashews_mem_batch))

    rounds = 7 if quick else 21
    one = timed(loop, singles, number=2_000 if quick else 20_000, rounds=rounds)
    many = timed(loop, batches, number=50 if quick else 500, rounds=rounds)
    label = ASYNC_L1.format(shared=shared_name.split("|")[0])
    sync_label = SYNC_L1.format(shared=shared_name.split("|")[-1])
    batch_label = ASYNC_L1_BATCH.format(shared=shared_name.split("|")[0])
    sync_batch_label = SYNC_L1_BATCH.format(shared=shared_name.split("|")[-1])
    suite.compare(
        one,
        ASYNC_L1,
        SYNC_L1,
        label=label,
        baseline_label=sync_label,
        target="<= 1.3",
        note="issue 16: the same hot key, bus=None on both; the awaited hit returns an already-finished coroutine",
    )
    reference_note = (
        "no side pickles in memory: get returns a stored reference (cashews stores a shallow copy made at set "
        "time); defaults otherwise"
    )
    suite.compare(one, ASYNC_L1, AIOCACHE_MEM, label=label, note=reference_note)
    suite.compare(
        one,
        ASYNC_L1,
        AIOCACHE_MEM_DEFAULT,
        label=label,
        note="aiocache at its defaults: every call wrapped in asyncio.wait_for(..., 5), a task per call",
    )
    suite.compare(one, ASYNC_L1, CASHEWS_MEM, label=label, note=reference_note + "; cashews mem:// is an LRU with TTL")
    suite.compare(one, PM_DIRECT, AIOCACHE_MEM, note="ProcessMemoryStore is not a coroutine: called without await")
    suite.compare(one, PM_DIRECT, CASHEWS_MEM, note="ProcessMemoryStore is not a coroutine: called without await")
    suite.compare(
        many,
        ASYNC_L1_BATCH,
        SYNC_L1_BATCH,
        label=batch_label,
        baseline_label=sync_batch_label,
        note="100 hot keys, bus=None on both: the executors' batch paths compared",
    )
    suite.compare(many, ASYNC_L1_BATCH, AIOCACHE_MEM_BATCH, label=batch_label, note=reference_note)
    suite.compare(many, ASYNC_L1_BATCH, CASHEWS_MEM_BATCH, label=batch_label, note=reference_note)

    async def close() -> None:
        await achain.release()
        for peer in peers:
            await peer.close()

    loop.run_until_complete(close())
    chain.release()


# ---------------------------------------------------------------------------
# Redis


def _redis(suite: Suite, loop: asyncio.AbstractEventLoop, url: str, quick: bool) -> None:
    from stockpyle import AsyncRedisStore
    from stockpyle.stores.drivers.aioredis import build_client

    objs = _objects()
    keydicts = [{"key": o.key} for o in objs]
    k0 = keydicts[0]
    store = AsyncRedisStore(url, namespace="bench")
    signed = AsyncRedisStore(url, namespace="bench-signed", secret=SECRET)
    # the hand-written side: a client built like the store's (same pool class, timeouts, no retries)
    raw = build_client(url, cluster=False, socket_timeout=0.5, connect_timeout=0.25)
    dumps, loads = pickle.dumps, pickle.loads
    closers: list[Callable[[], Awaitable[Any]]] = [store.release, signed.release, raw.aclose]

    async def setup() -> list[str]:
        await store.batch_put(objs)
        await signed.batch_put(objs)
        store_keys = [await store.key_for(Item, kd) for kd in keydicts]
        raw_keys = _same_length("rw", store_keys)
        await raw.mset({k: dumps(o, pickle.HIGHEST_PROTOCOL) for k, o in zip(raw_keys, objs, strict=True)})
        assert getattr(await store.get(Item, k0), "key", None) == "key-0"
        assert getattr(await signed.get(Item, k0), "key", None) == "key-0"
        assert all(o is not None for o in await store.batch_get(Item, keydicts))
        assert len([v for v in await raw.mget(raw_keys) if v is not None]) == SIZE
        return store_keys

    store_keys = loop.run_until_complete(setup())
    raw_keys = _same_length("rw", store_keys)
    rk0 = raw_keys[0]

    async def get(n: int) -> None:
        for _ in range(n):
            await store.get(Item, k0)

    async def get_signed(n: int) -> None:
        for _ in range(n):
            await signed.get(Item, k0)

    async def raw_get(n: int) -> None:
        for _ in range(n):
            loads(await raw.get(rk0))

    async def batch(n: int) -> None:
        for _ in range(n):
            await store.batch_get(Item, keydicts)

    async def batch_signed(n: int) -> None:
        for _ in range(n):
            await signed.batch_get(Item, keydicts)

    async def raw_mget(n: int) -> None:
        for _ in range(n):
            [loads(v) for v in await raw.mget(raw_keys)]

    singles: list[tuple[str, Body]] = [(GET, get), (GET_SIGNED, get_signed), (RAW_GET, raw_get)]
    batches: list[tuple[str, Body]] = [(BATCH, batch), (BATCH_SIGNED, batch_signed), (RAW_MGET, raw_mget)]

    aiocache = _peer("aiocache")
    if aiocache is not None:
        from aiocache.serializers import PickleSerializer
        from redis.asyncio.connection import parse_url

        port = int(parse_url(url)["port"])

        # the same timeouts as the store's; aiocache's own per-call asyncio.wait_for timeout is
        # turned off (timeout=None) because the socket timeout already bounds every call
        def redis_cache(**timeout: Any) -> Any:
            return aiocache.RedisCache(
                serializer=PickleSerializer(),
                endpoint="127.0.0.1",
                port=port,
                create_connection_timeout=0.25,
                connection_pool_kwargs={"socket_timeout": 0.5},
                **timeout,
            )

        acache = redis_cache(timeout=None)
        acache_default = redis_cache()
        ac_keys = _same_length("ac", store_keys)
        loop.run_until_complete(acache.multi_set(list(zip(ac_keys, objs, strict=True))))
        assert loop.run_until_complete(acache.get(ac_keys[0])).key == "key-0"
        assert loop.run_until_complete(acache_default.get(ac_keys[0])).key == "key-0"
        closers += [acache.close, acache_default.close]
        ack0 = ac_keys[0]

        async def aiocache_get(n: int) -> None:
            for _ in range(n):
                await acache.get(ack0)

        async def aiocache_get_default(n: int) -> None:
            for _ in range(n):
                await acache_default.get(ack0)

        async def aiocache_multi(n: int) -> None:
            for _ in range(n):
                await acache.multi_get(ac_keys)

        singles += [(AIOCACHE_GET, aiocache_get), (AIOCACHE_GET_DEFAULT, aiocache_get_default)]
        batches.append((AIOCACHE_MULTI, aiocache_multi))

    cashews = _peer("cashews")
    if cashews is not None:
        options = {"socket_timeout": 0.5, "socket_connect_timeout": 0.25}
        ccache = cashews.Cache()
        ccache.setup(url, **options)
        csigned = cashews.Cache()
        csigned.setup(url, secret=SECRET.decode(), digestmod="sha256", **options)
        cw_keys = _same_length("cw", store_keys)
        cs_keys = _same_length("cs", store_keys)

        async def fill() -> None:
            await ccache.set_many(dict(zip(cw_keys, objs, strict=True)))
            await csigned.set_many(dict(zip(cs_keys, objs, strict=True)))
            assert (await ccache.get(cw_keys[0])).key == "key-0"
            assert (await csigned.get(cs_keys[0])).key == "key-0"

        loop.run_until_complete(fill())
        closers += [ccache.close, csigned.close]
        cwk0, csk0 = cw_keys[0], cs_keys[0]

        async def cashews_get(n: int) -> None:
            for _ in range(n):
                await ccache.get(cwk0)

        async def cashews_get_signed(n: int) -> None:
            for _ in range(n):
                await csigned.get(csk0)

        async def cashews_many(n: int) -> None:
            for _ in range(n):
                await ccache.get_many(*cw_keys)

        async def cashews_many_signed(n: int) -> None:
            for _ in range(n):
                await csigned.get_many(*cs_keys)

        singles += [(CASHEWS_GET, cashews_get), (CASHEWS_GET_SIGNED, cashews_get_signed)]
        batches += [(CASHEWS_MANY, cashews_many), (CASHEWS_MANY_SIGNED, cashews_many_signed)]

    rounds = 7 if quick else 21
    one = timed(loop, singles, number=100 if quick else 300, rounds=rounds)
    many = timed(loop, batches, number=10 if quick else 30, rounds=rounds)
    unsigned = "stockpyle unsigned (its default); pickle on every side"
    aiocache_note = (
        "aiocache: PickleSerializer (its Redis default is JSON), timeout=None (its asyncio.wait_for per call off), "
        "socket timeouts as the store's"
    )
    cashews_note = (
        "cashews defaults: pickle, unsigned, repr() of each loaded value (check_repr), BlockingConnectionPool; "
        "socket timeouts as the store's"
    )
    signed_note = "both HMAC-SHA256-signed, verified before unpickling"
    suite.compare(one, GET, RAW_GET, target="<= 1.20", note="issue 17's target for the sync store, applied here")
    suite.compare(one, GET, AIOCACHE_GET, note=f"{unsigned}; {aiocache_note}")
    suite.compare(
        one, GET, AIOCACHE_GET_DEFAULT, note=f"{unsigned}; aiocache's default asyncio.wait_for(..., 5) per call on"
    )
    suite.compare(one, GET, CASHEWS_GET, note=f"{unsigned}; {cashews_note}")
    suite.compare(one, GET_SIGNED, CASHEWS_GET_SIGNED, note=signed_note)
    suite.compare(one, GET_SIGNED, RAW_GET, note="HMAC-SHA256 verified before unpickling")
    suite.compare(many, BATCH, RAW_MGET, target="<= 1.20", note="issue 17's target for the sync store, applied here")
    suite.compare(many, BATCH, AIOCACHE_MULTI, note=f"{unsigned}; {aiocache_note}")
    suite.compare(many, BATCH, CASHEWS_MANY, note=f"{unsigned}; {cashews_note}")
    suite.compare(many, BATCH_SIGNED, CASHEWS_MANY_SIGNED, note=signed_note)
    protocol = raw.connection_pool.connection_kwargs.get("protocol") or 2
    suite.notes.append(f"redis: RESP{protocol} on the raw client; keys of the store's key length on every side")

    async def close() -> None:
        for closer in closers:
            await closer()

    loop.run_until_complete(close())


# ---------------------------------------------------------------------------
# memcached (optional)


def _memcached(suite: Suite, loop: asyncio.AbstractEventLoop, quick: bool) -> None:
    aiomcache = _peer("aiomcache")
    if aiomcache is None:
        suite.notes.append("aiomcache not installed: the memcached rows are skipped (pip install aiomcache)")
        return
    try:
        with memcached() as address:
            _measure_memcached(suite, loop, address, quick)
    except MemcachedMissing as exc:
        suite.notes.append(f"{exc}: the memcached rows are skipped")


def _measure_memcached(suite: Suite, loop: asyncio.AbstractEventLoop, address: str, quick: bool) -> None:
    import aiomcache

    from stockpyle import AsyncMemcacheStore

    host, _, port_text = address.rpartition(":")
    port = int(port_text)
    objs = _objects()
    keydicts = [{"key": o.key} for o in objs]
    k0 = keydicts[0]
    store = AsyncMemcacheStore([address], namespace="bench")
    raw = aiomcache.Client(host, port, pool_size=2)
    dumps, loads = pickle.dumps, pickle.loads
    closers: list[Callable[[], Awaitable[Any]]] = [store.release, raw.close]

    async def setup() -> list[str]:
        await store.batch_put(objs)
        store_keys = [await store.key_for(Item, kd) for kd in keydicts]
        for key, obj in zip(_same_length("rw", store_keys), objs, strict=True):
            await raw.set(key.encode(), dumps(obj, pickle.HIGHEST_PROTOCOL))
        assert getattr(await store.get(Item, k0), "key", None) == "key-0"
        assert all(o is not None for o in await store.batch_get(Item, keydicts))
        return store_keys

    store_keys = loop.run_until_complete(setup())
    raw_keys = [key.encode() for key in _same_length("rw", store_keys)]
    rk0 = raw_keys[0]

    async def get(n: int) -> None:
        for _ in range(n):
            await store.get(Item, k0)

    async def raw_get(n: int) -> None:
        for _ in range(n):
            loads(await raw.get(rk0))  # type: ignore[arg-type]

    async def batch(n: int) -> None:
        for _ in range(n):
            await store.batch_get(Item, keydicts)

    async def raw_multi(n: int) -> None:
        for _ in range(n):
            [loads(v) for v in await raw.multi_get(*raw_keys)]  # type: ignore[arg-type]

    singles: list[tuple[str, Body]] = [(MC_GET, get), (MC_RAW_GET, raw_get)]
    batches: list[tuple[str, Body]] = [(MC_BATCH, batch), (MC_RAW_MULTI, raw_multi)]
    aiocache = _peer("aiocache")
    if aiocache is not None:
        from aiocache.serializers import PickleSerializer

        acache = aiocache.MemcachedCache(
            serializer=PickleSerializer(), endpoint=host, port=port, pool_size=2, timeout=None
        )
        ac_keys = _same_length("ac", store_keys)
        loop.run_until_complete(acache.multi_set(list(zip(ac_keys, objs, strict=True))))
        assert loop.run_until_complete(acache.get(ac_keys[0])).key == "key-0"
        closers.append(acache.close)
        ack0 = ac_keys[0]

        async def aiocache_get(n: int) -> None:
            for _ in range(n):
                await acache.get(ack0)

        async def aiocache_multi(n: int) -> None:
            for _ in range(n):
                await acache.multi_get(ac_keys)

        singles.append((MC_AIOCACHE_GET, aiocache_get))
        batches.append((MC_AIOCACHE_MULTI, aiocache_multi))

    rounds = 7 if quick else 21
    one = timed(loop, singles, number=100 if quick else 300, rounds=rounds)
    many = timed(loop, batches, number=10 if quick else 30, rounds=rounds)
    driver = type(store.driver).__name__
    driver_note = f"stockpyle's driver: {driver}"
    if driver == "ThreadedDriver":
        driver_note += " (the sync pymemcache client in a worker thread: a thread hand-off per call)"
    driver_note += "; aiomcache has no socket timeouts; its pool: 2 connections (aiocache's default)"
    suite.compare(one, MC_GET, MC_RAW_GET, note=driver_note)
    suite.compare(one, MC_GET, MC_AIOCACHE_GET, note=f"{driver_note}; aiocache PickleSerializer, timeout=None")
    suite.compare(many, MC_BATCH, MC_RAW_MULTI, note=driver_note)
    suite.compare(many, MC_BATCH, MC_AIOCACHE_MULTI, note=f"{driver_note}; aiocache PickleSerializer, timeout=None")

    async def close() -> None:
        for closer in closers:
            await closer()

    loop.run_until_complete(close())


if __name__ == "__main__":
    raise SystemExit(standalone(run, __doc__.splitlines()[0]))
