"""Fault injection: memcached and Redis servers killed, restarted and frozen under a live workload.

The chain is [ProcessMemoryStore, cache layers, SqlAlchemyStore (PostgreSQL)]
where the cache layers are a MemcacheStore on 3 servers, a RedisStore on its
own server, or both.  Servers are SIGKILLed and restarted (they come back
empty) and SIGSTOPped/SIGCONTed (a partition-like freeze: the server comes
back with its old contents, which the chain's remembered invalidations must
clean).  Nothing may reach the caller, every acknowledged write must be in the
database, and once the background repair has run -- without any call
prompting it -- no layer may return a value older than the database's.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support.databases import create_tables, drop_tables, make_engine, table_name

from stockpyle import BaseDictionaryStore, ChainedStore, MemcacheStore, ProcessMemoryStore, SqlAlchemyStore
from stockpyle.exceptions import StoreUnavailableError
from stockpyle.testing import Item

pytestmark = [pytest.mark.memcache, pytest.mark.slow]

FAST = {"connect_timeout": 0.1, "timeout": 0.2}  # bounded waits keep the test fast


class FaultBase(DeclarativeBase):
    """Tables of this module only."""


class Account(FaultBase):
    __tablename__ = table_name("fault_account")

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    owner: Mapped[str] = mapped_column(sa.String(50), unique=True)  # an alternate key
    balance: Mapped[int] = mapped_column(sa.Integer)

    def __init__(self, id: int, owner: str, balance: int) -> None:
        self.id = id
        self.owner = owner
        self.balance = balance


# ---------------------------------------------------------------------------
# the circuit breaker against a real memcached


def test_breaker_opens_skips_and_rejoins_a_killed_server(memcached_factory: Any) -> None:
    server = memcached_factory.one()
    record = BaseDictionaryStore({})
    cache = MemcacheStore([server.address], namespace="breaker", **FAST)
    chain = ChainedStore([cache, record], failure_threshold=3, cooldown=0.5)
    chain.put(Item("a", 1, 2, "v1"))
    server.kill()
    started = time.monotonic()
    for n in range(20):
        chain.put(Item("a", 1, 2, f"v{n + 2}"))  # never raises: the database took it
        assert chain.get(Item, {"key": "a"}).payload == f"v{n + 2}"  # type: ignore[union-attr]
    assert time.monotonic() - started < 2  # skipped, not 40 timeouts
    layer = chain.stats()[0]
    assert layer.breaker_opens == 1
    assert layer.skipped >= 30
    assert layer.errors >= 3
    assert layer.pending_invalidations == 20  # every write made while it was skipped
    server.start()  # empty again, on the same port
    time.sleep(0.6)  # the cool-down ends; the next call probes and replays
    assert chain.get(Item, {"key": "a"}).payload == "v21"  # type: ignore[union-attr]
    assert chain.stats()[0].pending_invalidations == 0
    # the replayed invalidations left tombstones, which refuse back-fills for a moment (a miss);
    # or the restarted, empty server gave Item a new generation: the back-fill is the current value
    found = cache.get(Item, {"key": "a"})
    assert found is None or found.payload == "v21"
    chain.put(Item("a", 1, 2, "v22"))
    assert cache.get(Item, {"key": "a"}).payload == "v22"  # type: ignore[union-attr]
    cache.release()


def test_frozen_server_comes_back_with_old_contents_and_is_cleaned(memcached_factory: Any) -> None:
    """A SIGSTOP/SIGCONT partition: the server still holds v1 when it returns."""
    server = memcached_factory.one()
    record = BaseDictionaryStore({})
    cache = MemcacheStore([server.address], namespace="partition", **FAST)
    chain = ChainedStore([cache, record], failure_threshold=2, cooldown=0.5)
    for n in range(10):
        chain.put(Item(f"k{n}", n, 0, "v1"))
    server.pause()
    try:
        for _ in range(2):  # two timeouts open the breaker
            assert chain.get(Item, {"key": "k0"}).payload == "v1"  # type: ignore[union-attr]
        assert chain.stats()[0].breaker_opens == 1
        for n in range(10):  # written while the cache is unreachable: remembered
            if n % 2:
                chain.put(Item(f"k{n}", n, 0, "v2"))
            else:
                chain.delete(Item(f"k{n}", n, 0))
        assert chain.stats()[0].pending_invalidations == 10
    finally:
        server.resume()
    time.sleep(0.6)
    chain.get(Item, {"key": "k1"})  # the probe: invalidations are replayed first
    assert chain.stats()[0].pending_invalidations == 0
    for n in range(10):
        want = "v2" if n % 2 else None
        through_chain = chain.get(Item, {"key": f"k{n}"})
        assert (through_chain.payload if through_chain else None) == want
        direct = cache.get(Item, {"zap": n, "bar": 0})
        assert direct is None or direct.payload == want, f"memcached still holds {direct!r}"
    cache.release()


class FlakyMemcache(MemcacheStore):
    """A real MemcacheStore whose next ``fail`` writes fail as if the network dropped them."""

    fail = 0

    def _flaky(self) -> None:
        if self.fail:
            self.fail -= 1
            raise StoreUnavailableError("injected: the write never reached memcached")

    def put(self, obj: object) -> None:
        self._flaky()
        super().put(obj)

    def batch_delete(self, objs: Any) -> None:
        self._flaky()
        super().batch_delete(objs)


def test_invalidation_missed_without_opening_the_breaker_is_replayed(memcached_server: Any) -> None:
    namespace = "missed" + uuid.uuid4().hex[:8]
    record = BaseDictionaryStore({})
    flaky = FlakyMemcache([memcached_server.address], namespace=namespace)
    chain = ChainedStore([ProcessMemoryStore(), flaky, record], failure_threshold=3)
    chain.put(Item("m", 1, 2, "v1"))
    flaky.fail = 2  # the put and the chain's invalidation both get lost: two failures, breaker stays closed
    chain.put(Item("m", 1, 2, "v2"))
    assert chain.stats()[1].pending_invalidations == 1
    chain.get(Item, {"key": "other"})  # the layer answers again
    other = MemcacheStore([memcached_server.address], namespace=namespace)
    try:
        assert ChainedStore([other, record]).get(Item, {"key": "m"}).payload == "v2"  # type: ignore[union-attr]
    finally:
        other.release()
        flaky.release()


# ---------------------------------------------------------------------------
# the workload


@pytest.fixture
def fault_engine(postgres_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(postgres_url, pool_size=8)
    create_tables(engine, FaultBase.metadata)
    try:
        yield engine
    finally:
        drop_tables(engine, FaultBase.metadata)
        engine.dispose()


class Victim:
    """A server the chaos breaks: kill/start and pause/resume by PID."""

    def __init__(self, name: str, process: Any) -> None:
        self.name = name
        self.process = process

    def kill(self) -> None:
        self.process.kill()

    def start(self) -> None:
        self.process.start()

    def pause(self) -> None:
        self.process.pause()

    def resume(self) -> None:
        self.process.resume()


def cache_layers(kind: str, request: pytest.FixtureRequest) -> tuple[list[Any], list[Victim]]:
    """The cache layers of the workload's chain for ``kind``, and the servers under them."""
    namespace = "faults" + uuid.uuid4().hex[:8]
    layers: list[Any] = []
    victims: list[Victim] = []
    if kind in ("memcached", "both"):
        servers = request.getfixturevalue("memcached_factory").start(3)
        store = MemcacheStore([s.address for s in servers], namespace=namespace, **FAST)
        request.addfinalizer(store.release)
        layers.append(store)
        victims += [Victim(f"memcached {n}", server) for n, server in enumerate(servers)]
    if kind in ("redis", "both"):
        from stockpyle import RedisStore

        server = request.getfixturevalue("redis_server_factory").start()
        store = RedisStore(server.url, namespace=namespace, socket_timeout=0.2, connect_timeout=0.1)
        request.addfinalizer(store.release)
        layers.append(store)
        victims.append(Victim("redis", server))
    return layers, victims


@pytest.mark.postgres
@pytest.mark.parametrize(
    "kind", ["memcached", pytest.param("redis", marks=pytest.mark.redis), pytest.param("both", marks=pytest.mark.redis)]
)
def test_workload_survives_kills_restarts_and_freezes(
    kind: str, fault_engine: sa.Engine, request: pytest.FixtureRequest
) -> None:
    caches, victims = cache_layers(kind, request)
    l1 = ProcessMemoryStore()
    sor = SqlAlchemyStore(engine=fault_engine)
    chain = ChainedStore([l1, *caches, sor], failure_threshold=3, cooldown=0.3, retry_interval=0.5, bus=None)
    request.addfinalizer(chain.release)
    objects = 200
    workers = 4
    acked: dict[int, int | None] = {}  # id -> balance of the last acknowledged write (None: deleted)
    errors: list[BaseException] = []
    own_stale: list[tuple[int, Any, Any]] = []
    ops = [0]
    stop = threading.Event()

    def work(worker: int) -> None:
        rng = random.Random(worker)
        mine = [i for i in range(objects) if i % workers == worker]  # one writer per object
        counter = 0
        while not stop.is_set():
            i = rng.choice(mine)
            roll = rng.random()
            try:
                if roll < 0.45:
                    counter += 1
                    chain.put(Account(i, f"owner-{i}", counter))
                    acked[i] = counter
                elif roll < 0.55:
                    chain.delete(Account(i, f"owner-{i}", 0))
                    acked[i] = None
                else:
                    found = chain.get(Account, {"owner": f"owner-{i}"} if roll < 0.8 else {"id": i})
                    seen = None if found is None else found.balance
                    if i in acked and seen != acked[i]:
                        own_stale.append((i, acked[i], seen))
                ops[0] += 1
            except BaseException as exc:  # noqa: BLE001 - nothing may reach the caller
                errors.append(exc)

    peak = [0]

    def sample() -> None:  # the invalidations remembered for the broken layers, at their peak
        while not stop.is_set():
            peak[0] = max(peak[0], sum(s.pending_invalidations for s in chain.stats().layers[1:-1]))
            time.sleep(0.05)

    threads = [threading.Thread(target=work, args=(w,), name=f"worker{w}") for w in range(workers)]
    threads.append(threading.Thread(target=sample, name="sampler"))
    for thread in threads:
        thread.start()
    # the chaos: kills and restarts (empty servers), then freezes (old contents)
    schedule = [victims[n % len(victims)] for n in range(4)]
    frozen = [victims[(n + 1) % len(victims)] for n in range(2)]
    try:
        for victim in schedule:
            time.sleep(0.6)
            victim.kill()
            time.sleep(0.8)
            victim.start()
        for victim, seconds in zip(frozen, (1.2, 0.8), strict=True):
            time.sleep(0.5)
            victim.pause()
            time.sleep(seconds)
            victim.resume()
        time.sleep(0.6)
    finally:
        stop.set()
        for victim in victims:
            victim.resume()
        for thread in threads:
            thread.join(30)
    assert not errors, f"{len(errors)} exceptions reached the caller, e.g. {errors[0]!r}"
    assert ops[0] > 300
    layer_stats = chain.stats().layers[1:-1]
    assert sum(s.errors for s in layer_stats) > 0 and sum(s.breaker_opens for s in layer_stats) > 0

    # recovery: the background repair replays what was missed, with no call to prompt it
    began = time.monotonic()
    while any(s.pending_invalidations for s in chain.stats().layers[1:-1]) and time.monotonic() - began < 5:
        time.sleep(0.05)
    repaired_in = time.monotonic() - began
    pending = sum(s.pending_invalidations for s in chain.stats().layers[1:-1])
    assert pending == 0, f"{pending} invalidations still pending {repaired_in:.1f} s after the chaos"
    keydicts = [{"id": i} for i in range(objects)]
    by_owner = [{"owner": f"owner-{i}"} for i in range(objects)]
    truth = sor.batch_get(Account, keydicts)
    lost = [i for i, row in enumerate(truth) if i in acked and (None if row is None else row.balance) != acked[i]]
    assert not lost, f"acknowledged writes missing from the database: {lost[:5]}"
    answers: list[tuple[str, list[Any]]] = [
        ("chain", [chain.get(Account, kd) for kd in keydicts]),
        ("chain batch", chain.batch_get(Account, by_owner)),
    ]
    for cache in caches:
        answers.append((cache.store_name, cache.batch_get(Account, keydicts)))
        answers.append((f"{cache.store_name} by owner", cache.batch_get(Account, by_owner)))
    for name, found in answers:
        stale = [
            (i, None if got is None else got.balance, None if row is None else row.balance)
            for i, (got, row) in enumerate(zip(found, truth, strict=True))
            if (got is not None and (row is None or got.balance != row.balance))
            or (got is None and row is not None and name.startswith("chain"))
        ]
        assert not stale, f"{name} disagrees with the database for {len(stale)} accounts: {stale[:5]}"
    print(
        f"\nfault workload [{kind}]: {ops[0]} operations, 0 caller-visible errors, 0 lost writes, "
        f"{sum(s.errors for s in layer_stats)} absorbed cache errors, "
        f"{sum(s.breaker_opens for s in layer_stats)} breaker opens, {sum(s.skipped for s in layer_stats)} skipped "
        f"calls, {len(own_stale)} reads during the chaos that differed from the reader's own last write, "
        f"{peak[0]} invalidations remembered at the peak, repaired {repaired_in:.2f} s after the chaos, "
        "0 stale entries after recovery"
    )
