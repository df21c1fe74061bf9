"""Driver-level leases (stampede protection across processes) against real servers.

Every test runs on four backends: memcached with meta commands, memcached
behind a proxy that refuses meta commands (the add-based fallback), Redis,
and the suite's three-node Redis Cluster.  They prove that exactly one
caller among 16 processes x 8 threads wins the lease of a cold key, that a
lease whose holder was killed expires, that a writer's set, delete,
tombstone or mark_stale between ``lease_get`` and ``lease_fill`` makes the
fill fail (10,000 randomised interleavings through the key-value engine,
with a control run showing the same loop catches an unguarded fill), and
what ``mark_stale`` and ``lease_release`` do.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.memcached_proxy import ProxyProcess

from stockpyle.stores.drivers import LeaseRead, LeaseStatus, supports_leases
from stockpyle.stores.kv import KeyValueStore

WORKER = Path(__file__).resolve().parent / "support" / "lease_worker.py"
BACKENDS = [
    pytest.param("memcached", marks=pytest.mark.memcache),
    pytest.param("memcached-no-meta", marks=pytest.mark.memcache),
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("redis-cluster", marks=pytest.mark.redis),
]
HIT, WON, LOST = LeaseStatus.HIT, LeaseStatus.WON, LeaseStatus.LOST


class Doc:
    """The object of the interleaving runs: one key, a value that says which version it is."""

    __stockpyle_keys__ = ("id",)

    def __init__(self, id: int, version: int) -> None:
        self.id = id
        self.version = version


class VersionedDoc(Doc):
    """The same with a version the engine orders writes by (compare-and-set puts)."""

    __stockpyle_version__ = "version"


@dataclass
class Env:
    """One backend: stores and drivers on it, and how a worker process reaches it."""

    name: str
    kind: str  # for tests/support/lease_worker.py
    address: str
    prefix: str
    make: Callable[..., KeyValueStore]
    #: lease lifetime, in seconds, of the expiry tests (memcached counts whole seconds)
    short_lease: float
    stores: list[KeyValueStore] = field(default_factory=list)

    def store(self, **options: Any) -> KeyValueStore:
        options.setdefault("namespace", f"{self.prefix}-{len(self.stores)}")
        store = self.make(**options)
        self.stores.append(store)
        return store

    @property
    def driver(self) -> Any:
        if not self.stores:
            self.store()
        return self.stores[0].driver

    def key(self, name: str = "k") -> str:
        return f"{self.prefix}:{name}:{uuid.uuid4().hex[:10]}"

    @property
    def stale_values(self) -> bool:
        """Whether the backend keeps stale values (the add-based fallback cannot)."""
        return self.name != "memcached-no-meta"


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    from stockpyle import MemcacheStore, RedisStore

    name = request.param
    proxy = None
    if name.startswith("memcached"):
        server = request.getfixturevalue("memcached_server")
        address = server.address
        if name == "memcached-no-meta":
            proxy = ProxyProcess(address, meta="refuse")
            address = proxy.address
        prefix = "t" + uuid.uuid4().hex[:12]

        def make(**options: Any) -> KeyValueStore:
            return MemcacheStore(servers=[address], **options)

        result = Env(name, "memcache", address, prefix, make, short_lease=2.0)
    else:
        cluster = name == "redis-cluster"
        if cluster:
            url = request.getfixturevalue("redis_cluster").url
            request.getfixturevalue("redis_cluster_client")  # deletes this test's keys afterwards
        else:
            url = request.getfixturevalue("redis_url")
            request.getfixturevalue("redis_client")
        prefix = request.getfixturevalue("redis_prefix")

        def make(**options: Any) -> KeyValueStore:
            # nothing here is about timeouts: under a loaded CI machine (two suites on two
            # cores) the default 0.5 s socket timeout was once too short for a plain GET
            options.setdefault("socket_timeout", 5.0)
            return RedisStore(url=url, cluster=cluster, **options)

        result = Env(name, "redis-cluster" if cluster else "redis", url, prefix, make, short_lease=2.0)
    try:
        yield result
    finally:
        for store in result.stores:
            store.release()
        if proxy is not None:
            proxy.stop()


# ---------------------------------------------------------------------------
# worker processes


class Worker:
    """A process of its own with a driver on the backend (tests/support/lease_worker.py)."""

    def __init__(self, env: Env) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), env.kind, env.address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            raise AssertionError(f"lease worker died: {self.proc.stderr.read()}")
        return json.loads(line)

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def workers() -> Iterator[Callable[[Env, int], list[Worker]]]:
    started: list[Worker] = []

    def start(env: Env, count: int) -> list[Worker]:
        batch = [Worker(env) for _ in range(count)]
        started.extend(batch)
        for worker in batch:
            assert worker.read() == {"ready": True}
        return batch

    yield start
    for worker in started:
        worker.kill()


# ---------------------------------------------------------------------------
# one winner


@pytest.mark.slow
def test_exactly_one_winner_among_16_processes_of_8_threads(env: Env, workers: Any) -> None:
    driver = env.driver
    lease = driver.ttl(30)
    herd = workers(env, 16)
    for trial in range(5):
        key = env.key(f"herd{trial}")
        at = time.time() + 1.0
        for worker in herd:
            worker.send(op="herd", key=key, ttl=lease, threads=8, at=at)
        statuses = [status for worker in herd for status in worker.read()]
        assert len(statuses) == 128
        assert statuses.count("won") == 1, (trial, sorted(set(statuses)))
        assert statuses.count("lost") == 127
        # the lease is held: this process loses too, and plain reads see an absent (empty) value
        assert driver.lease_get(key, lease).status is LOST
        assert driver.get(key) == b""


def test_a_lease_whose_holder_was_killed_expires_and_the_next_reader_wins(env: Env, workers: Any) -> None:
    driver = env.driver
    key = env.key("killed")
    (holder,) = workers(env, 1)
    holder.send(op="take", key=key, ttl=driver.ttl(env.short_lease))
    assert holder.read() == "won"
    holder.kill()
    lease = driver.ttl(30)
    assert driver.lease_get(key, lease).status is LOST
    deadline = time.monotonic() + env.short_lease + 3  # memcached's clock is good to a second
    while True:
        read = driver.lease_get(key, lease)
        if read.status is not LOST or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert read.status is WON
    assert driver.lease_fill(key, b"filled", read.token, driver.ttl(60))
    assert driver.lease_get(key, lease) == LeaseRead(HIT, b"filled", False, None, read_cas(driver, key))


def read_cas(driver: Any, key: str) -> Any:
    return driver.gets_many([key])[key][1]


def test_threads_of_one_process_share_one_winner_and_then_all_hit(env: Env) -> None:
    driver = env.driver
    key = env.key("threads")
    lease = driver.ttl(30)
    barrier = threading.Barrier(16)
    reads: list[LeaseRead] = []

    def read() -> None:
        barrier.wait()
        reads.append(driver.lease_get(key, lease))

    threads = [threading.Thread(target=read) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r for r in reads if r.status is WON]
    assert len(winners) == 1
    assert all(r == LeaseRead(LOST) for r in reads if r.status is not WON)
    assert driver.lease_fill(key, b"value", winners[0].token, driver.ttl(60))
    assert not driver.lease_fill(key, b"again", winners[0].token, driver.ttl(60))  # the lease is used up
    hit = driver.lease_get(key, lease)
    assert (hit.status, hit.value, hit.stale, hit.token) == (HIT, b"value", False, None)
    assert driver.get(key) == b"value"


# ---------------------------------------------------------------------------
# writes between lease_get and lease_fill


WRITES: dict[str, Callable[[Any, str], None]] = {
    "set": lambda driver, key: driver.set_many({key: b"v2"}, driver.ttl(60)),
    "delete": lambda driver, key: driver.delete_many([key]),
    "cas": lambda driver, key: driver.cas(key, b"v2", read_cas(driver, key), driver.ttl(60)),
    "mark_stale": lambda driver, key: driver.mark_stale([key], driver.ttl(30)),
}


@pytest.mark.parametrize("write", sorted(WRITES))
def test_a_write_between_lease_and_fill_makes_the_fill_fail(env: Env, write: str) -> None:
    driver = env.driver
    key = env.key(write)
    read = driver.lease_get(key, driver.ttl(30))
    assert read.status is WON
    WRITES[write](driver, key)
    assert driver.lease_fill(key, b"v1", read.token, driver.ttl(60)) is False
    assert driver.get(key) != b"v1"
    if write in ("set", "cas"):
        assert driver.get(key) == b"v2"


def test_a_refilled_lease_fails_after_it_expired_and_another_reader_won(env: Env) -> None:
    driver = env.driver
    key = env.key("expired")
    first = driver.lease_get(key, driver.ttl(env.short_lease))
    assert first.status is WON
    time.sleep(env.short_lease + (1.5 if env.name.startswith("memcached") else 0.1))
    second = driver.lease_get(key, driver.ttl(30))
    assert second.status is WON
    assert driver.lease_fill(key, b"late", first.token, driver.ttl(60)) is False
    assert driver.lease_fill(key, b"current", second.token, driver.ttl(60)) is True
    assert driver.get(key) == b"current"


def test_engine_writes_end_a_lease_and_reads_leave_it_in_place(env: Env) -> None:
    """The engine reads a key under a lease as a miss, never rejects or deletes it, and its writes end it."""
    store = env.store(namespace=env.prefix)
    plain = env.store(namespace=env.prefix, tombstone_lifetime=0)
    driver = store.driver
    lease = driver.ttl(30)
    for writer, action in ((store, "put"), (store, "delete"), (plain, "delete"), (store, "put versioned")):
        doc = (VersionedDoc if "versioned" in action else Doc)(random.randrange(1 << 30), 2)
        mkey = store.key_for(type(doc), {"id": doc.id})
        assert mkey == plain.key_for(type(doc), {"id": doc.id})
        read = driver.lease_get(mkey, lease)
        assert read.status is WON
        for _ in range(3):  # reads: a miss, nothing rejected, the lease still held
            assert store.get(type(doc), {"id": doc.id}) is None
            assert store.batch_get(type(doc), [{"id": doc.id}]) == [None]
        assert store.rejected == 0
        assert driver.lease_get(mkey, lease).status is LOST
        # a back-fill (add) is refused while the lease is held, like memcached's own add on a stub
        assert store.add(doc) is False
        if action.startswith("put"):
            writer.put(doc)
        else:
            writer.delete(doc)
        assert driver.lease_fill(mkey, b"stale copy", read.token, driver.ttl(60)) is False, action
        found = store.get(type(doc), {"id": doc.id})
        assert (found.version if found else None) == (2 if action.startswith("put") else None), action
    assert store.rejected == 0


def test_the_async_engine_reads_a_key_under_a_lease_as_a_miss_too(env: Env) -> None:
    import asyncio

    from stockpyle.stores.drivers.threaded import ThreadedDriver
    from stockpyle.stores.kv import AsyncKeyValueStore

    sync = env.store(namespace=env.prefix)
    store = AsyncKeyValueStore(ThreadedDriver(sync.driver), namespace=env.prefix)
    doc = Doc(random.randrange(1 << 30), 2)
    mkey = sync.key_for(Doc, {"id": doc.id})
    read = sync.driver.lease_get(mkey, sync.driver.ttl(30))
    assert read.status is WON

    async def reads() -> list[Any]:
        assert await store.key_for(Doc, {"id": doc.id}) == mkey
        return [await store.get(Doc, {"id": doc.id}), await store.batch_get(Doc, [{"id": doc.id}])]

    assert asyncio.run(reads()) == [None, [None]]
    assert store.rejected == 0
    assert sync.driver.lease_get(mkey, sync.driver.ttl(30)).status is LOST  # still held


# ---------------------------------------------------------------------------
# the randomised interleavings

EVENTS = ("lease", "load", "fill", "commit", "invalidate")


def random_order(rng: random.Random) -> list[str]:
    """A random order of the five events with lease < load < fill and commit < invalidate."""
    while True:
        order = list(EVENTS)
        rng.shuffle(order)
        at = order.index
        if at("lease") < at("load") < at("fill") and at("commit") < at("invalidate"):
            return order


def run_interleavings(env: Env, runs: int, *, guarded: bool, seed: int) -> dict[str, int]:
    """``runs`` randomised "reader takes the lease, writer commits v2, reader fills what it loaded" runs.

    The writer invalidates by a write-through put, a versioned put, a delete
    that leaves a tombstone, or a plain delete (tombstone_lifetime=0).  The
    reader fills through ``lease_fill`` (or, for the control run, through an
    unguarded ``set_many``).  Returns how often each outcome happened; raises
    AssertionError when v1 ends in the cache after v2 was committed.
    """
    rng = random.Random(seed)
    tomb = env.store(namespace=env.prefix)
    plain = env.store(namespace=env.prefix, tombstone_lifetime=0)
    driver = tomb.driver
    lease, life = driver.ttl(30), driver.ttl(300)
    ident = rng.randrange(1 << 30)
    envelopes = {}
    for klass in (Doc, VersionedDoc):
        tomb.put(klass(ident, 1))  # the envelope a reader that loaded v1 would fill with
        envelopes[klass] = driver.get(tomb.key_for(klass, {"id": ident}))
        assert envelopes[klass]
    counts = {"v1 loaded": 0, "fill refused": 0, "filled": 0, "hit": 0, "won": 0, "lost": 0}
    for run in range(runs):
        klass = rng.choice((Doc, VersionedDoc))
        how = rng.choice(("put", "delete", "plain delete")) if klass is Doc else "put"
        store = plain if how == "plain delete" else tomb
        mkey = store.key_for(klass, {"id": ident})
        driver.delete_many([mkey])  # cold: evicted
        database = 1
        loaded = token = None
        for event in random_order(rng):
            if event == "lease":
                read = driver.lease_get(mkey, lease)
                token = read.token if read.status is WON else None
                counts[read.status.value] += 1
            elif event == "load":
                loaded = database
            elif event == "commit":
                database = 2
            elif event == "invalidate":
                if how == "put":
                    store.put(klass(ident, 2))
                else:
                    store.delete(klass(ident, 2))
            elif event == "fill" and token is not None:
                if loaded == 1:
                    counts["v1 loaded"] += 1
                data = envelopes[klass] if loaded == 1 else None
                if data is None:  # it loaded v2: the fill is right whatever happens
                    continue
                if guarded:
                    done = driver.lease_fill(mkey, data, token, life)
                else:
                    driver.set_many({mkey: data}, life)
                    done = True
                counts["filled" if done else "fill refused"] += 1
        found = store.get(klass, {"id": ident})
        assert found is None or found.version == 2, f"run {run}: v1 in the cache after v2 was committed ({how})"
    return counts


@pytest.mark.slow
def test_ten_thousand_interleavings_never_leave_v1_in_the_cache(env: Env) -> None:
    runs = 10_000 if env.name in ("memcached", "redis") else 2_000
    counts = run_interleavings(env, runs, guarded=True, seed=15)
    # every kind of run happened: fills refused (a write came between), fills that went through first
    assert counts["fill refused"] > runs // 20
    assert counts["filled"] > runs // 20
    assert counts["won"] > runs // 2


def test_the_interleaving_loop_catches_an_unguarded_fill(env: Env) -> None:
    """The control: the same runs with a plain set as the fill do end with v1 in the cache."""
    with pytest.raises(AssertionError, match="v1 in the cache"):
        run_interleavings(env, 300, guarded=False, seed=15)


# ---------------------------------------------------------------------------
# stale values and releases


def test_mark_stale_then_exactly_one_refresher(env: Env) -> None:
    driver = env.driver
    key = env.key("stale")
    lease = driver.ttl(30)
    driver.set_many({key: b"old"}, driver.ttl(60))
    driver.mark_stale([key, env.key("absent")], driver.ttl(30))
    barrier = threading.Barrier(12)
    reads: list[LeaseRead] = []

    def read() -> None:
        barrier.wait()
        reads.append(driver.lease_get(key, lease))

    threads = [threading.Thread(target=read) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (winner,) = [r for r in reads if r.status is WON]
    losers = [r for r in reads if r.status is not WON]
    if env.stale_values:
        assert (winner.value, winner.stale) == (b"old", True)
        assert all((r.status, r.value, r.stale) == (LOST, b"old", True) for r in losers)
        assert driver.get(key) == b"old"  # plain reads serve it as it is
    else:  # the fallback deletes: one reader takes the lease, nobody is served the old value
        assert (winner.value, winner.stale) == (None, False)
        assert all(r == LeaseRead(LOST) for r in losers)
    assert driver.lease_fill(key, b"new", winner.token, driver.ttl(60))
    hit = driver.lease_get(key, lease)
    assert (hit.status, hit.value, hit.stale) == (HIT, b"new", False)


def test_mark_stale_ends_a_lease_being_held_and_a_refresh_being_made(env: Env) -> None:
    driver = env.driver
    lease = driver.ttl(30)
    key = env.key("held")
    held = driver.lease_get(key, lease)
    driver.mark_stale([key], driver.ttl(30))
    assert driver.lease_fill(key, b"v1", held.token, driver.ttl(60)) is False
    again = driver.lease_get(key, lease)
    assert again.status is WON and again.value is None  # a stub has no stale value to serve
    if env.stale_values:
        key = env.key("refresh")
        driver.set_many({key: b"old"}, driver.ttl(60))
        driver.mark_stale([key], driver.ttl(30))
        refresher = driver.lease_get(key, lease)
        assert refresher.status is WON and refresher.stale
        driver.mark_stale([key], driver.ttl(30))  # another write came in
        assert driver.lease_fill(key, b"v1", refresher.token, driver.ttl(60)) is False
        assert driver.lease_get(key, lease).status is WON  # the next reader refreshes


def test_release_lets_the_next_reader_win(env: Env) -> None:
    driver = env.driver
    lease = driver.ttl(30)
    key = env.key("release")
    read = driver.lease_get(key, lease)
    assert driver.lease_get(key, lease).status is LOST
    driver.lease_release(key, read.token)
    nxt = driver.lease_get(key, lease)
    assert nxt.status is WON
    driver.lease_release(key, read.token)  # an old token no longer on the key changes nothing
    assert driver.lease_get(key, lease).status is LOST
    assert driver.lease_fill(key, b"v", nxt.token, driver.ttl(60))
    if env.stale_values:
        driver.mark_stale([key], driver.ttl(30))
        refresher = driver.lease_get(key, lease)
        driver.lease_release(key, refresher.token)  # the stale value stays; the next reader refreshes
        again = driver.lease_get(key, lease)
        assert (again.status, again.value, again.stale) == (WON, b"v", True)


def test_bad_lease_arguments_are_refused_clearly(env: Env) -> None:
    driver = env.driver
    key = env.key("bad")
    for ttl in (0, -1, 1.5, None, "5"):
        with pytest.raises(ValueError, match="lease lifetime"):
            driver.lease_get(key, ttl)
    read = driver.lease_get(key, driver.ttl(30))
    with pytest.raises(TypeError, match="token"):
        driver.lease_fill(key, b"v", "not a token", driver.ttl(60))
    with pytest.raises(TypeError, match="token"):
        driver.lease_release(key, object())
    with pytest.raises(TypeError, match="bytes"):
        driver.lease_fill(key, "text", read.token, driver.ttl(60))
    with pytest.raises(ValueError, match="lifetime"):
        driver.mark_stale([key], 0)
    assert supports_leases(driver)
