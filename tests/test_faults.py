"""Fault injection: memcached servers killed, restarted and frozen under a live workload.

The chain is [ProcessMemoryStore, MemcacheStore (3 servers), SqlAlchemyStore
(PostgreSQL)].  Servers are SIGKILLed and restarted (they come back empty)
and SIGSTOPped/SIGCONTed (a partition-like freeze: the server comes back with
its old contents, which the circuit breaker's remembered invalidations must
clean).  Nothing may reach the caller, every acknowledged write must be in the
database, and after recovery no layer may return a value older than the
database's.
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


@pytest.mark.postgres
def test_workload_survives_kills_restarts_and_freezes(
    memcached_factory: Any, fault_engine: sa.Engine, request: pytest.FixtureRequest
) -> None:
    servers = memcached_factory.start(3)
    namespace = "faults" + uuid.uuid4().hex[:8]
    l1 = ProcessMemoryStore()
    l2 = MemcacheStore([s.address for s in servers], namespace=namespace, **FAST)
    request.addfinalizer(l2.release)
    sor = SqlAlchemyStore(engine=fault_engine)
    chain = ChainedStore([l1, l2, sor], failure_threshold=3, cooldown=0.3)
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

    threads = [threading.Thread(target=work, args=(w,), name=f"worker{w}") for w in range(workers)]
    for thread in threads:
        thread.start()
    try:
        # the chaos: kills and restarts (empty servers), then a freeze (old contents)
        for victim in (0, 1, 2, 0):
            time.sleep(0.6)
            servers[victim].kill()
            time.sleep(0.8)
            servers[victim].start()
        time.sleep(0.4)
        servers[1].pause()
        time.sleep(1.2)
        servers[1].resume()
        time.sleep(0.6)
        servers[2].pause()
        time.sleep(0.8)
        servers[2].resume()
        time.sleep(0.6)
    finally:
        stop.set()
        for server in servers:
            server.resume()
        for thread in threads:
            thread.join(30)
    assert not errors, f"{len(errors)} exceptions reached the caller, e.g. {errors[0]!r}"
    assert ops[0] > 500
    layer = chain.stats()[1]
    assert layer.errors > 0 and layer.breaker_opens > 0  # the faults really happened

    # recovery: once the cool-down is over, the first call replays the missed invalidations
    time.sleep(0.4)
    chain.get(Account, {"id": -1})
    pending = chain.stats()[1].pending_invalidations
    keydicts = [{"id": i} for i in range(objects)]
    truth = sor.batch_get(Account, keydicts)
    for i, row in enumerate(truth):
        if i in acked:  # every acknowledged write is in the database
            assert (None if row is None else row.balance) == acked[i], f"account {i}"
    for name, answers in (
        ("chain", [chain.get(Account, kd) for kd in keydicts]),
        ("chain batch", chain.batch_get(Account, [{"owner": f"owner-{i}"} for i in range(objects)])),
        ("memcached", l2.batch_get(Account, keydicts)),
        ("memcached by owner", l2.batch_get(Account, [{"owner": f"owner-{i}"} for i in range(objects)])),
    ):
        stale = [
            (i, None if got is None else got.balance, None if row is None else row.balance)
            for i, (got, row) in enumerate(zip(answers, truth, strict=True))
            if (got is not None and (row is None or got.balance != row.balance))
            or (got is None and row is not None and name.startswith("chain"))
        ]
        assert not stale, f"{name} disagrees with the database for {len(stale)} accounts: {stale[:5]}"
    print(
        f"\nfault workload: {ops[0]} operations, 0 errors, {layer.errors} absorbed cache errors, "
        f"{layer.breaker_opens} breaker opens, {layer.skipped} skipped calls, "
        f"{len(own_stale)} reads during the chaos that differed from the reader's own last write, "
        f"{pending} invalidations still pending after recovery"
    )
