"""Fault injection against real Redis processes: refused, killed, restarted and frozen servers and cluster nodes.

A private standalone server is refused, killed and frozen (SIGSTOP/SIGCONT:
it comes back with its old contents, which the chain's remembered
invalidations must clean).  On the suite's Redis Cluster a primary is killed
and restarted (it rejoins from its config file, empty) and another frozen,
under a live workload through ``ChainedStore([ProcessMemoryStore,
RedisStore(cluster), SqlAlchemyStore(PostgreSQL)])``: nothing may reach the
caller, every acknowledged write must be in the database, and after recovery
no layer may return a value older than the database's.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support.databases import create_tables, drop_tables, make_engine, table_name

from stockpyle import BaseDictionaryStore, ChainedStore, ProcessMemoryStore, RedisStore, SqlAlchemyStore
from stockpyle.exceptions import StoreUnavailableError
from stockpyle.testing import Item, Versioned

pytestmark = [pytest.mark.redis, pytest.mark.slow]

FAST = {"connect_timeout": 0.1, "socket_timeout": 0.2}  # bounded waits keep the tests fast


class FaultBase(DeclarativeBase):
    """Tables of this module only."""


class Account(FaultBase):
    __tablename__ = table_name("redis_fault_account")

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    owner: Mapped[str] = mapped_column(sa.String(50), unique=True)  # an alternate key
    balance: Mapped[int] = mapped_column(sa.Integer)

    def __init__(self, id: int, owner: str, balance: int) -> None:
        self.id = id
        self.owner = owner
        self.balance = balance


# ---------------------------------------------------------------------------
# one server


def test_refused_connection(redis_server_factory: Any) -> None:
    server = redis_server_factory.start()
    server.stop()
    store = RedisStore(server.url, **FAST)
    for call in (
        lambda: store.get(Item, {"key": "a"}),
        lambda: store.batch_get(Item, [{"key": "a"}, {"key": "b"}]),
        lambda: store.put(Item("a", 1, 2)),
        lambda: store.delete(Item("a", 1, 2)),
        lambda: store.add(Item("a", 1, 2)),
    ):
        with pytest.raises(StoreUnavailableError, match="unavailable") as caught:
            call()
        assert isinstance(caught.value.__cause__, redis.ConnectionError)


def test_restart_between_operations_is_invisible(redis_server_factory: Any) -> None:
    """Pooled connections to a server that restarted are replaced without an error."""
    server = redis_server_factory.start()
    store = RedisStore(server.url, namespace="restart", **FAST)
    store.batch_put([Item(f"k{i}", i, 0) for i in range(5)])
    server.stop()
    server.start()  # same port, empty
    assert store.get(Item, {"key": "k1"}) is None
    assert store.batch_get(Item, [{"key": "k2"}]) == [None]
    store.put(Item("k1", 1, 0, "again"))
    assert store.get(Item, {"zap": 1, "bar": 0}).payload == "again"  # type: ignore[union-attr]


class KilledOnSend(redis.connection.Connection):
    """A real pooled connection that the server closes (CLIENT KILL) right before the next request goes out."""

    admin: redis.Redis | None = None
    armed = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if KilledOnSend.armed and KilledOnSend.admin is not None:
            KilledOnSend.armed -= 1
            KilledOnSend.admin.client_kill_filter(_type="normal", skipme=True)  # every client but the admin
            time.sleep(0.05)  # the server has closed this socket: the request will fail on it
        super().send_packed_command(command, check_health)


@pytest.mark.parametrize("operation", ["get", "batch_get", "put", "add"])
def test_a_connection_closed_by_the_server_mid_use_is_retried_once(operation: str, redis_server_factory: Any) -> None:
    server = redis_server_factory.start()
    KilledOnSend.admin = redis.Redis(port=server.port)
    pool = redis.ConnectionPool.from_url(server.url, connection_class=KilledOnSend)
    store = RedisStore(client=redis.Redis(connection_pool=pool), namespace="killed")
    store.put(Item("k", 1, 2, "v1"))
    calls = {
        "get": lambda: store.get(Item, {"key": "k"}),
        "batch_get": lambda: store.batch_get(Item, [{"key": "k"}]),
        "put": lambda: store.put(Item("k", 1, 2, "v2")),
        "add": lambda: store.add(Item("n", 3, 4)),
    }
    try:
        KilledOnSend.armed = 1
        calls[operation]()  # no error: the request is sent again on a new connection
        assert KilledOnSend.armed == 0
        assert store.get(Item, {"zap": 1, "bar": 2}) is not None
        KilledOnSend.armed = 2  # closed twice in a row: that is an outage, reported
        with pytest.raises(StoreUnavailableError):
            calls[operation]()
    finally:
        KilledOnSend.armed = 0
        KilledOnSend.admin.close()
        KilledOnSend.admin = None
        store.release()


def test_killed_server_then_restarted(redis_server_factory: Any) -> None:
    server = redis_server_factory.start()
    store = RedisStore(server.url, namespace="kill", **FAST)
    store.put(Item("a", 1, 2, "before"))
    server.kill()
    with pytest.raises(StoreUnavailableError):
        store.get(Item, {"key": "a"})
    with pytest.raises(StoreUnavailableError):
        store.put(Item("a", 1, 2, "during"))
    server.start()
    assert store.get(Item, {"key": "a"}) is None  # no persistence: it came back empty
    store.put(Item("a", 1, 2, "after"))
    assert store.get(Item, {"zap": 1, "bar": 2}).payload == "after"  # type: ignore[union-attr]


def test_frozen_server_times_out_fast_then_recovers(redis_server_factory: Any) -> None:
    server = redis_server_factory.start()
    store = RedisStore(server.url, namespace="freeze", **FAST)
    store.put(Item("a", 1, 2, "kept"))
    server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as caught:
            store.get(Item, {"key": "a"})
        assert time.monotonic() - started < 1  # one timeout: redis-py's own retries are off
        assert isinstance(caught.value.__cause__, redis.TimeoutError)
        with pytest.raises(StoreUnavailableError):
            store.batch_get(Item, [{"key": "a"}])
    finally:
        server.resume()
    assert store.get(Item, {"key": "a"}).payload == "kept"  # type: ignore[union-attr]


def test_frozen_server_comes_back_with_old_contents_and_is_cleaned(redis_server_factory: Any) -> None:
    """SIGSTOP/SIGCONT through a chain: the server still holds v1 when it returns; the chain cleans it."""
    server = redis_server_factory.start()
    record = BaseDictionaryStore({})
    cache = RedisStore(server.url, namespace="partition", **FAST)
    chain = ChainedStore([cache, record], failure_threshold=2, cooldown=0.5)
    for n in range(10):
        chain.put(Item(f"k{n}", n, 0, "v1"))
    server.pause()
    try:
        for _ in range(2):  # two timeouts open the breaker; the caller sees none of them
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
    chain.get(Item, {"key": "k1"})  # the probe: the invalidations are replayed first
    assert chain.stats()[0].pending_invalidations == 0
    for n in range(10):
        want = "v2" if n % 2 else None
        through_chain = chain.get(Item, {"key": f"k{n}"})
        assert (through_chain.payload if through_chain else None) == want
        direct = cache.get(Item, {"zap": n, "bar": 0})
        assert direct is None or direct.payload == want, f"Redis still holds {direct!r}"


# ---------------------------------------------------------------------------
# the cluster under a workload


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
def test_cluster_workload_survives_a_killed_and_a_frozen_primary(
    redis_cluster: Any, redis_cluster_client: Any, redis_prefix: str, fault_engine: sa.Engine
) -> None:
    l1 = ProcessMemoryStore()
    l2 = RedisStore(redis_cluster.url, cluster=True, namespace=f"{redis_prefix}-faults", **FAST)
    sor = SqlAlchemyStore(engine=fault_engine)
    chain = ChainedStore([l1, l2, sor], failure_threshold=3, cooldown=0.3)
    objects, workers = 150, 4
    acked: dict[int, int | None] = {}  # id -> balance of the last acknowledged write (None: deleted)
    errors: list[BaseException] = []
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
                    chain.get(Account, {"owner": f"owner-{i}"} if roll < 0.8 else {"id": i})
                ops[0] += 1
            except BaseException as exc:  # noqa: BLE001 - nothing may reach the caller
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,), name=f"worker{w}") for w in range(workers)]
    for thread in threads:
        thread.start()
    killed, frozen = redis_cluster.nodes[0], redis_cluster.nodes[1]
    try:
        time.sleep(0.5)
        killed.kill()  # its slots fail (nothing else serves them) until it is back
        time.sleep(0.8)
        killed.start()  # rejoins from its config file, empty; reports the cluster down for a moment
        time.sleep(0.8)
        frozen.pause()  # shorter than cluster-node-timeout: a partition, not a failure
        time.sleep(0.8)
        frozen.resume()
        redis_cluster.wait_ok()
        time.sleep(0.5)
    finally:
        stop.set()
        frozen.resume()
        for thread in threads:
            thread.join(30)
        if not killed.proc:
            killed.start()
        redis_cluster.wait_ok()
    assert not errors, f"{len(errors)} exceptions reached the caller, e.g. {errors[0]!r}"
    assert ops[0] > 200
    layer = chain.stats()[1]
    assert layer.errors > 0 and layer.breaker_opens > 0  # the faults really happened

    # recovery: once the cool-down is over, the first call replays the missed invalidations
    time.sleep(0.4)
    chain.get(Account, {"id": -1})
    assert chain.stats()[1].pending_invalidations == 0
    keydicts = [{"id": i} for i in range(objects)]
    truth = sor.batch_get(Account, keydicts)
    for i, row in enumerate(truth):
        if i in acked:  # every acknowledged write is in the database
            assert (None if row is None else row.balance) == acked[i], f"account {i}"
    for name, answers in (
        ("chain", [chain.get(Account, kd) for kd in keydicts]),
        ("chain batch", chain.batch_get(Account, [{"owner": f"owner-{i}"} for i in range(objects)])),
        ("Redis", l2.batch_get(Account, keydicts)),
        ("Redis by owner", l2.batch_get(Account, [{"owner": f"owner-{i}"} for i in range(objects)])),
    ):
        stale = [
            (i, None if got is None else got.balance, None if row is None else row.balance)
            for i, (got, row) in enumerate(zip(answers, truth, strict=True))
            if (got is not None and (row is None or got.balance != row.balance))
            or (got is None and row is not None and name.startswith("chain"))
        ]
        assert not stale, f"{name} disagrees with the database for {len(stale)} accounts: {stale[:5]}"
    # the restarted primary lost its script cache: version-checked writes load the script there again
    pairs = [Versioned(f"v{n}", f"va{n}", 1) for n in range(30)]
    l2.batch_put(pairs)  # empty keys: SET NX
    for obj in pairs:
        obj.version = 2
        l2.put(obj)  # compare-and-set: EVALSHA on every primary
    assert {found.version for found in l2.batch_get(Versioned, [{"alias": f"va{n}"} for n in range(30)])} == {2}
    print(
        f"\ncluster fault workload: {ops[0]} operations, 0 errors, {layer.errors} absorbed cache errors, "
        f"{layer.breaker_opens} breaker opens, {layer.skipped} skipped calls"
    )
    l2.release()
