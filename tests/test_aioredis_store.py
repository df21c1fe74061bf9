"""AsyncRedisStore against real Redis servers (the shared one, private ones, the suite's 3-primary cluster).

The synchronous contract and consistency suites run through
:func:`stockpyle.testing.sync_bridge`; the rest is asyncio-specific: entries
and leases shared with RedisStore, one pool per event loop, cancellation,
a frozen server, and no slow callbacks.
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import redis
import redis.asyncio
import redis.asyncio.cluster
from support.asyncio_debug import slow_callbacks

from stockpyle import AsyncChainedStore, AsyncRedisStore, ProcessMemoryStore, RedisStore, Stampede
from stockpyle.exceptions import ConfigurationError, StoreError, StoreUnavailableError
from stockpyle.stores.drivers import LeaseStatus
from stockpyle.stores.drivers.aioredis import AsyncRedisDriver
from stockpyle.stores.drivers.aioredis import build_client as async_client
from stockpyle.stores.drivers.redis import RedisDriver
from stockpyle.stores.drivers.redis import build_client as sync_client
from stockpyle.testing import Automobile, ConsistencyContract, Item, StoreContract, Versioned, sync_bridge

pytestmark = pytest.mark.redis

SIGNED = b"async-redis-secret-01"


def run(coroutine: Any) -> Any:
    """Run ``coroutine`` in a new event loop (``asyncio.run``: the loop's pools close at its end)."""
    return asyncio.run(coroutine)


@pytest.fixture
def make_pair(
    redis_client: Any, redis_prefix: str, redis_url: str
) -> Iterator[Callable[..., tuple[RedisStore, AsyncRedisStore]]]:
    """A RedisStore and an AsyncRedisStore on the shared server, in one namespace holding this test's prefix."""
    made: list[RedisStore] = []

    def make(url: str = redis_url, **options: Any) -> tuple[RedisStore, AsyncRedisStore]:
        options.setdefault("namespace", f"{redis_prefix}-{len(made)}")
        cluster = options.get("cluster", False)
        sync = RedisStore(url, **options)
        made.append(sync)
        assert sync.cluster is cluster
        return sync, AsyncRedisStore(url, **options)

    yield make
    for store in made:
        store.release()


# ---------------------------------------------------------------------------
# the contracts: standalone (RESP3, RESP2, signed, chained, scriptless) and on the cluster


class _AsyncRedisBase:
    url_options: ClassVar[str] = ""
    store_options: ClassVar[dict[str, Any]] = {}

    @pytest.fixture(autouse=True)
    def _server(self, redis_client: Any, redis_prefix: str, redis_url: str) -> None:
        self.url = redis_url + self.url_options
        self.prefix = redis_prefix
        self.count = 0

    def async_store(self, **options: Any) -> AsyncRedisStore:
        self.count += 1
        return AsyncRedisStore(self.url, namespace=f"{self.prefix}-{self.count}", **self.store_options, **options)

    def make_store(self, **options: Any) -> Any:
        return sync_bridge(self.async_store(**options))


class TestAsyncRedisContract(_AsyncRedisBase, StoreContract):
    """redis-py's default protocol (RESP3)."""


class TestAsyncRedisResp2Contract(_AsyncRedisBase, StoreContract):
    url_options: ClassVar[str] = "?protocol=2"


class TestSignedAsyncRedisContract(_AsyncRedisBase, StoreContract):
    store_options: ClassVar[dict[str, Any]] = {"secret": SIGNED}


class TestAsyncChainOnRedisContract(_AsyncRedisBase, StoreContract):
    def make_store(self, **options: Any) -> Any:
        return sync_bridge(AsyncChainedStore([ProcessMemoryStore(**options), self.async_store(**options)]))


class TestAsyncRedisConsistency(_AsyncRedisBase, ConsistencyContract):
    pass


class TestSignedAsyncRedisConsistency(_AsyncRedisBase, ConsistencyContract):
    store_options: ClassVar[dict[str, Any]] = {"secret": SIGNED}


class TestScriptlessAsyncRedisConsistency(ConsistencyContract):
    """A user who may not run scripts: versioned puts use WATCH/MULTI/EXEC, as in the sync driver."""

    @pytest.fixture(autouse=True)
    def _server(self, redis_server_factory: Any) -> None:
        server = redis_server_factory.start()
        admin = redis.Redis(port=server.port)
        admin.execute_command("ACL", "SETUSER", "noscripts", "on", "nopass", "~*", "&*", "+@all", "-@scripting")
        admin.close()
        self.url = f"redis://noscripts@127.0.0.1:{server.port}/0"

    def make_store(self, **options: Any) -> Any:
        return sync_bridge(AsyncRedisStore(self.url, namespace=uuid.uuid4().hex, **options))


class _AsyncClusterBase:
    @pytest.fixture(autouse=True)
    def _cluster(self, redis_cluster: Any, redis_cluster_client: Any, redis_prefix: str) -> None:
        self.url = redis_cluster.url
        self.prefix = redis_prefix
        self.count = 0

    def make_store(self, **options: Any) -> Any:
        self.count += 1
        # 2 s timeouts: a new client's COMMAND-table parse holds the loop ~0.3 s, and with two suites
        # on two cores the cluster's connects outlasted the default 0.25 s (these tests check the
        # contract; the frozen-server tests below check the timeouts)
        options = {"socket_timeout": 2.0, "connect_timeout": 2.0, **options}
        store = AsyncRedisStore(self.url, cluster=True, namespace=f"{self.prefix}-{self.count}", **options)
        return sync_bridge(store)


class TestAsyncRedisClusterContract(_AsyncClusterBase, StoreContract):
    # a new asyncio RedisCluster client reads the topology and parses the COMMAND table on
    # its first command (~0.3 s on a loaded machine), inside the contract's 0.3 s lifetimes
    short_lifetime: ClassVar[float] = 1.0
    expiry_wait: ClassVar[float] = 1.6


class TestAsyncRedisClusterConsistency(_AsyncClusterBase, ConsistencyContract):
    pass


# ---------------------------------------------------------------------------
# construction


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({}, "exactly one of url="),
        ({"url": "http://127.0.0.1:6379"}, "AsyncRedisStore url must look like redis://"),
        ({"url": "redis://127.0.0.1:6379/zero"}, "database number"),
        ({"url": "redis://127.0.0.1:6379/2", "cluster": True}, "only database 0"),
        ({"url": "redis://127.0.0.1:6379", "cluster": "yes"}, "cluster must be"),
        ({"url": "redis://127.0.0.1:6379", "socket_timeout": 0}, "AsyncRedisStore socket_timeout"),
        ({"url": "redis://127.0.0.1:6379", "max_item_size": 10}, "max_item_size"),
        ({"url": "redis://127.0.0.1:6379", "tombstone_lifetime": -1}, "tombstone_lifetime"),
        ({"url": "redis://127.0.0.1:6379", "secret": b"x" * 16, "signer": object()}, "secret= or signer="),
        ({"client": object()}, r"needs a redis\.asyncio\.Redis or redis\.asyncio\.cluster\.RedisCluster"),
        ({"client": redis.Redis()}, r"synchronous client: AsyncRedisStore needs one from redis\.asyncio"),
        ({"client": redis.asyncio.Redis(decode_responses=True)}, "returns bytes"),
        ({"client": redis.asyncio.Redis(), "cluster": True}, r"needs a redis\.asyncio\.cluster\.RedisCluster client"),
    ],
)
def test_invalid_arguments_are_checked_as_for_redis_store(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        AsyncRedisStore(**options)


def test_the_constructor_is_redis_stores() -> None:
    import inspect

    assert inspect.signature(AsyncRedisStore) == inspect.signature(RedisStore)
    assert AsyncRedisStore.store_name == "AsyncRedisStore"


def test_constructor_never_connects_and_a_server_coming_up_is_used(redis_server_factory: Any) -> None:
    free = redis_server_factory.start()
    free.stop()
    store = AsyncRedisStore(free.url, connect_timeout=0.2)

    async def down() -> None:
        with pytest.raises(StoreUnavailableError, match="unavailable") as caught:
            await store.get(Item, {"key": "k"})
        assert caught.value.store is store

    run(down())
    free.start()

    async def up() -> Any:
        await store.put(Item("k", 1, 2))
        return await store.get(Item, {"key": "k"})

    assert run(up()) == Item("k", 1, 2)


def test_a_cluster_client_passed_in_is_recognised(redis_cluster: Any, redis_cluster_client: Any) -> None:
    async def scenario() -> None:
        client = redis.asyncio.cluster.RedisCluster.from_url(redis_cluster.url)
        try:
            store = AsyncRedisStore(client=client, namespace=uuid.uuid4().hex)
            assert store.cluster is True
            await store.put(Item("c", 1, 2, "in the cluster"))
            assert (await store.get(Item, {"zap": 1, "bar": 2})).payload == "in the cluster"  # type: ignore[union-attr]
            await store.delete(Item("c", 1, 2))
            await store.release()  # closes the cluster client, which reinitializes on its next command
            assert await store.get(Item, {"key": "c"}) is None
        finally:
            await client.aclose()

    run(scenario())


# ---------------------------------------------------------------------------
# one cache: RedisStore and AsyncRedisStore read each other's entries and leases


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_sync_and_async_stores_share_keys_entries_tombstones_and_leases(
    where: str, request: pytest.FixtureRequest, make_pair: Callable[..., tuple[RedisStore, AsyncRedisStore]]
) -> None:
    if where == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        request.getfixturevalue("redis_cluster_client")  # deletes this test's keys afterwards
        sync, store = make_pair(cluster.url, cluster=True, secret=SIGNED)
    else:
        sync, store = make_pair(secret=SIGNED)

    sync.put(Item("s", 1, 2, "written by RedisStore"))
    sync.put(Versioned("v", "alias", 5, "version 5"))

    async def scenario() -> None:
        for keydict in ({"key": "s"}, {"zap": 1, "bar": 2}):
            assert await store.key_for(Item, keydict) == sync.key_for(Item, keydict)
            assert (await store.get(Item, keydict)).payload == "written by RedisStore"  # type: ignore[union-attr]
        await store.batch_put([Item("a", 3, 4, "written by AsyncRedisStore"), Item("b", 5, 6, "too")])
        await store.delete(Item("s", 1, 2))  # leaves tombstones
        await store.put(Versioned("v", "alias", 4, "version 4"))  # older than the sync store's: refused
        assert (await store.lease_get(Item, {"key": "leased"}, 5.0)).status == "won"

    run(scenario())
    found = sync.batch_get(Item, [{"key": "a"}, {"zap": 5, "bar": 6}])
    assert [obj.payload for obj in found] == ["written by AsyncRedisStore", "too"]  # type: ignore[union-attr]
    assert sync.get(Item, {"key": "s"}) is None
    assert sync.add(Item("s", 1, 2, "back-fill after the delete")) is False  # the async store's tombstone
    assert sync.get(Versioned, {"alias": "alias"}).body == "version 5"  # type: ignore[union-attr]
    assert sync.lease_get(Item, {"key": "leased"}, 5.0).status != "won"  # the async store holds it
    assert sync.rejected == 0 and store.rejected == 0


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_the_drivers_leases_and_compare_and_set_interoperate(
    where: str, request: pytest.FixtureRequest, redis_client: Any, redis_prefix: str, redis_url: str
) -> None:
    """Driver level: a lease, a stale mark or a cas token taken by one kind is honoured by the other."""
    url, cluster = redis_url, False
    if where == "cluster":
        url, cluster = request.getfixturevalue("redis_cluster").url, True
        request.getfixturevalue("redis_cluster_client")
    options = {"cluster": cluster, "socket_timeout": 2.0, "connect_timeout": 2.0}
    sync = RedisDriver(connect=lambda: sync_client(url, **options), cluster=cluster)
    key, other = f"{redis_prefix}:doc", f"{redis_prefix}:other"

    async def scenario() -> None:
        driver = AsyncRedisDriver(connect=lambda: async_client(url, **options), cluster=cluster)
        lease, life = driver.ttl(30), driver.ttl(60)
        won = await driver.lease_get(key, lease)
        assert won.status is LeaseStatus.WON
        assert sync.lease_get(key, lease).status is LeaseStatus.LOST  # the async lease is on the key
        assert await driver.get(key) == b"" and sync.get(key) == b""  # read as absent by both
        sync.set_many({key: b"written"}, life)  # a writer in between ends the lease
        assert await driver.lease_fill(key, b"loaded before the write", won.token, life) is False
        assert await driver.get_many([key]) == {key: b"written"}

        await driver.mark_stale([key], lease)  # one refresher; the others serve the stale value
        refresh = await driver.lease_get(key, lease)
        assert (refresh.status, refresh.value, refresh.stale) == (LeaseStatus.WON, b"written", True)
        waiting = sync.lease_get(key, lease)
        assert (waiting.status, waiting.value, waiting.stale) == (LeaseStatus.LOST, b"written", True)
        assert await driver.lease_fill(key, b"refreshed", refresh.token, life) is True
        assert sync.get(key) == b"refreshed"

        held = sync.lease_get(other, lease)
        assert held.status is LeaseStatus.WON
        assert (await driver.lease_get(other, lease)).status is LeaseStatus.LOST
        await driver.lease_release(other, held.token)  # a token of the sync driver
        assert (await driver.lease_get(other, lease)).status is LeaseStatus.WON

        value, token = (await driver.gets_many([key]))[key]
        assert value == b"refreshed"
        assert sync.cas(key, b"by the sync driver", token, life) is True
        assert await driver.cas(key, b"too late", token, life) is False
        assert await driver.cas(key, b"first", None, life) is False  # None: only while absent
        with pytest.raises(TypeError, match="RedisLease"):
            await driver.lease_fill(key, b"x", "not a token", life)
        with pytest.raises(ValueError, match="positive number of milliseconds"):
            await driver.lease_get(key, 0)
        await driver.close()

    try:
        run(scenario())
    finally:
        sync.close()


# ---------------------------------------------------------------------------
# leases through AsyncChainedStore


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_a_thousand_tasks_on_one_cold_key_load_it_once(
    where: str, request: pytest.FixtureRequest, redis_client: Any, redis_prefix: str, redis_url: str
) -> None:
    """Four chains (as four processes would have) and 250 tasks each: the Redis lease lets one load."""
    url, cluster = redis_url, False
    if where == "cluster":
        url, cluster = request.getfixturevalue("redis_cluster").url, True
        request.getfixturevalue("redis_cluster_client")
    # timeouts well above a loaded machine's stalls: the test is about the lease, and a
    # connect that timed out would let that chain load on its own, as it should
    stores = [
        AsyncRedisStore(url, cluster=cluster, namespace=redis_prefix, connect_timeout=5, socket_timeout=5)
        for _ in range(4)
    ]
    chains = [AsyncChainedStore([ProcessMemoryStore(), store], stampede=Stampede(lease=5, wait=5)) for store in stores]
    loads = 0

    async def load() -> Item:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.2)  # a slow system of record
        return Item("hot", 1, 2, "loaded once")

    async def herd() -> list[Any]:
        # each client's first command before the herd, one after the other: a new asyncio
        # RedisCluster parses the COMMAND table on the loop (~0.3 s of CPU), long enough for
        # the connect timeout (0.25 s) of clients initializing at the same time to expire
        for store in stores:
            await store.get(Item, {"key": "warm"})
        return await asyncio.gather(*(chains[i % 4].get_or_create(Item, {"key": "hot"}, load) for i in range(1000)))

    found = run(herd())
    assert loads == 1
    assert all(obj is not None and obj.payload == "loaded once" for obj in found)
    assert sum(chain.stats().leases_lost for chain in chains) >= 3  # the other chains waited for the lease
    assert sync_get(url, cluster, redis_prefix) == "loaded once"


def sync_get(url: str, cluster: bool, namespace: str) -> str:
    store = RedisStore(url, cluster=cluster, namespace=namespace)
    try:
        return store.get(Item, {"key": "hot"}).payload  # type: ignore[union-attr, no-any-return]
    finally:
        store.release()


def test_a_task_cancelled_while_holding_a_lease_releases_it(
    redis_client: Any, redis_prefix: str, redis_url: str
) -> None:
    store = AsyncRedisStore(redis_url, namespace=redis_prefix)
    chain = AsyncChainedStore([ProcessMemoryStore(), store], stampede=Stampede(lease=30, wait=30))
    other = AsyncRedisStore(redis_url, namespace=redis_prefix)

    async def scenario() -> None:
        loading = asyncio.Event()

        async def never() -> Item:
            loading.set()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        task = asyncio.ensure_future(chain.get_or_create(Item, {"key": "slow"}, never))
        await asyncio.wait_for(loading.wait(), 5)  # the task won the lease and is loading
        assert (await other.lease_get(Item, {"key": "slow"}, 30.0)).status != "won"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # released at once, not after its 30 s lifetime: the next reader wins it
        assert (await other.lease_get(Item, {"key": "slow"}, 30.0)).status == "won"

    run(scenario())


# ---------------------------------------------------------------------------
# event loops, pools, cancellation, a frozen server


def connections_named(redis_client: Any, name: str) -> int:
    """How many connections the server has with the client name ``name`` (polled: closing takes a moment)."""
    count = -1
    for _ in range(50):
        count = sum(1 for client in redis_client.client_list() if client.get("name") == name)
        if count == 0:
            return 0
        time.sleep(0.02)
    return count


def test_each_event_loop_has_its_own_pool_closed_with_the_loop(
    redis_client: Any, redis_prefix: str, redis_url: str
) -> None:
    name = f"{redis_prefix}-pool"
    store = AsyncRedisStore(f"{redis_url}?client_name={name}", namespace=redis_prefix)

    async def use(n: int) -> Any:
        await store.put(Item(f"k{n}", n, n))
        assert (await store.get(Item, {"key": "k0"})) == Item("k0", 0, 0)
        return await store.client()

    first = run(use(0))
    assert connections_named(redis_client, name) == 0  # the loop's shutdown closed its pool
    second = run(use(1))
    assert second is not first
    assert connections_named(redis_client, name) == 0
    bridge = sync_bridge(store)  # a long-lived loop in another thread
    bridge.put(Item("k2", 2, 2))
    assert bridge.run(store.client()) not in (first, second)
    assert sum(1 for c in redis_client.client_list() if c.get("name") == name) >= 1
    bridge.release()  # closes that loop's pool; the store stays usable
    assert connections_named(redis_client, name) == 0
    assert bridge.get(Item, {"key": "k1"}) == Item("k1", 1, 1)
    bridge.release()


def test_a_client_passed_in_belongs_to_one_event_loop(redis_client: Any, redis_prefix: str, redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    store = AsyncRedisStore(client=client, namespace=redis_prefix)

    async def first() -> None:
        await store.put(Item("k", 1, 2))
        assert await store.client() is client
        await store.release()

    async def second() -> None:
        with pytest.raises(ConfigurationError, match="event loop it was first used in"):
            await store.get(Item, {"key": "k"})
        await store.release()  # never touches the other loop's client

    run(first())
    run(second())
    run(client.aclose())


def test_a_refused_put_never_leaves_the_old_entry(redis_server_factory: Any) -> None:
    """As RedisStore: a write the server refuses (out of memory) invalidates the keys; one key or several."""
    server = redis_server_factory.start("--maxmemory-policy", "noeviction")
    store = AsyncRedisStore(server.url, namespace="oom")
    admin = redis.Redis(port=server.port)

    async def scenario() -> None:
        await store.batch_put([Item("o", 1, 2, "before"), Automobile("ONE-1", "before")])
        admin.config_set("maxmemory", 1)  # every write that adds data is refused from now on
        try:
            for obj in (Item("o", 1, 2, "after"), Automobile("ONE-1", "after")):
                with pytest.raises(StoreError, match="out of memory") as caught:
                    await store.put(obj)
                assert not isinstance(caught.value, StoreUnavailableError)
            assert await store.batch_get(Item, [{"key": "o"}, {"zap": 1, "bar": 2}]) == [None, None]
            assert await store.get(Automobile, {"license_plate": "ONE-1"}) is None
        finally:
            admin.config_set("maxmemory", 0)
            admin.close()
        await store.release()

    run(scenario())


def test_a_call_cancelled_mid_request_leaves_no_broken_connection(redis_server_factory: Any) -> None:
    """A GET cancelled while a frozen server holds its reply must not leave that reply for the next command."""
    server = redis_server_factory.start()
    # one connection in the pool: the next command has to reuse the cancelled call's connection
    store = AsyncRedisStore(f"{server.url}?max_connections=1", namespace="cancel", socket_timeout=10)

    async def scenario() -> None:
        await store.batch_put([Item("a", 1, 1, "A"), Item("b", 2, 2, "B")])
        for _ in range(3):
            server.pause()
            task = asyncio.ensure_future(store.get(Item, {"key": "a"}))
            await asyncio.sleep(0.2)  # the GET is sent and waits for its reply
            assert not task.done()
            task.cancel()
            began = time.monotonic()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert time.monotonic() - began < 0.1  # cancelled at once, not after the 10 s timeout
            server.resume()
            for _ in range(5):
                found = await store.batch_get(Item, [{"key": "b"}, {"zap": 1, "bar": 1}])
                assert [obj.payload for obj in found] == ["B", "A"]
        await store.release()

    run(scenario())
    assert store.rejected == 0


def test_a_cancelled_cluster_batch_leaves_every_node_usable(
    redis_cluster: Any, redis_cluster_client: Any, redis_prefix: str
) -> None:
    store = AsyncRedisStore(redis_cluster.url, cluster=True, namespace=redis_prefix, socket_timeout=10)
    items = [Item(f"k{i}", i, i, f"v{i}") for i in range(30)]

    async def scenario() -> None:
        await store.batch_put(items)
        key = await store.key_for(Item, {"key": "k0"})
        port = redis_cluster_client.get_node_from_key(key).port
        (frozen,) = [node for node in redis_cluster.nodes if node.port == port]
        frozen.pause()
        try:
            task = asyncio.ensure_future(store.batch_get(Item, [{"key": item.key} for item in items]))
            await asyncio.sleep(0.3)  # the other nodes answered; the frozen one holds its reply
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            frozen.resume()
        for _ in range(3):
            found = await store.batch_get(Item, [{"key": item.key} for item in items])
            assert found == items
        await store.release()

    run(scenario())
    redis_cluster.wait_ok()


def test_release_closes_a_cluster_client_redis_py_marked_for_reinitialization(
    redis_cluster: Any, redis_cluster_client: Any, redis_prefix: str
) -> None:
    """After a node timed out, redis-py's RedisCluster.aclose() is a no-op; release() still closes the nodes.

    Connections whose last command was ``CLUSTER SLOTS`` are left out of the
    count: after the timeout redis-py drops a topology connection of its own
    without closing it (it does so without stockpyle too); the garbage
    collector closes it, with a ResourceWarning this test silences.
    """
    name = f"{redis_prefix}-nodes"
    store = AsyncRedisStore(
        f"{redis_cluster.url}?client_name={name}", cluster=True, namespace=redis_prefix, socket_timeout=0.3
    )
    items = [Item(f"k{i}", i, i) for i in range(30)]

    async def scenario() -> None:
        await store.batch_put(items)  # a connection to every node
        key = await store.key_for(Item, {"key": "k0"})
        port = redis_cluster_client.get_node_from_key(key).port
        (frozen,) = [node for node in redis_cluster.nodes if node.port == port]
        frozen.pause()
        try:
            with pytest.raises(StoreUnavailableError):
                await store.get(Item, {"key": "k0"})
        finally:
            frozen.resume()
        await store.release()

    def named() -> int:
        count = 0
        for node in redis_cluster.nodes:
            admin = redis.Redis(port=node.port)
            count += sum(1 for c in admin.client_list() if c.get("name") == name and c["cmd"] != "cluster|slots")
            admin.close()
        return count

    run(scenario())
    for _ in range(50):
        if named() == 0:
            break
        time.sleep(0.02)
    assert named() == 0
    redis_cluster.wait_ok()
    with warnings.catch_warnings():  # the connection redis-py dropped (see above) is collected here
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_a_frozen_server_raises_within_the_timeout_and_the_loop_keeps_ticking(redis_server_factory: Any) -> None:
    server = redis_server_factory.start()
    store = AsyncRedisStore(server.url, namespace="frozen")

    async def scenario() -> tuple[type[BaseException] | None, float, float]:
        await store.put(Item("f1", 1, 1, "v"))
        gaps: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not done.is_set():
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.ensure_future(ticker())
        server.pause()
        began = time.monotonic()
        error: type[BaseException] | None = None
        try:
            await store.get(Item, {"key": "f1"})
        except StoreUnavailableError as exc:
            error = type(exc)
        finally:
            waited = time.monotonic() - began
            server.resume()
            done.set()
            await tick
        # and the store recovers
        assert (await store.get(Item, {"key": "f1"})).payload == "v"  # type: ignore[union-attr]
        await store.release()
        return error, waited, max(gaps)

    error, waited, worst_gap = run(scenario())
    assert error is StoreUnavailableError
    assert 0.4 <= waited < 2.0  # the socket timeout (0.5 s), not redis-py's retries
    assert worst_gap < 0.25, f"the event loop stood still for {worst_gap * 1000:.0f} ms"


# ---------------------------------------------------------------------------
# no blocking calls on the event loop


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_no_callback_blocks_the_loop_for_10_ms(
    where: str, request: pytest.FixtureRequest, redis_client: Any, redis_prefix: str, redis_url: str
) -> None:
    """Every operation, leases included, in asyncio debug mode with a 10 ms slow-callback threshold.

    A blocking call (socket I/O, a sleep, a lock held across a request) would
    show up in every round; on a machine shared with other test runs a
    round may be stalled by the scheduler (a callback using 2 ms of CPU was
    seen taking 28 ms), so one clean round of five passes.
    """
    url, cluster = redis_url, False
    if where == "cluster":
        url, cluster = request.getfixturevalue("redis_cluster").url, True
        request.getfixturevalue("redis_cluster_client")
    store = AsyncRedisStore(url, cluster=cluster, namespace=redis_prefix, secret=SIGNED)
    chain = AsyncChainedStore([ProcessMemoryStore(), store])
    items = [Item(f"k{i}", i, i, "x" * 200) for i in range(10)]  # 20 keys a batch

    async def workload() -> None:
        # the first command of a client: redis-py's asyncio RedisCluster reads the topology and
        # parses the server's COMMAND table on the loop (~0.1-0.3 s of CPU, once per client)
        await store.get(Item, {"key": "warm"})
        asyncio.get_running_loop().slow_callback_duration = 0.01
        for _ in range(5):
            await chain.batch_put(items)
            assert await chain.batch_get(Item, [{"key": item.key} for item in items]) == items
            assert await store.batch_get(Item, [{"zap": item.zap, "bar": item.bar} for item in items]) == items
            await asyncio.gather(*(store.get(Item, {"key": item.key}) for item in items[:5]))
            await store.put(Versioned("v", "alias", 1))
            await store.batch_add(items)
            await chain.get_or_create(Item, {"key": "created"}, lambda: Item("created", 0, -1))
            await chain.batch_delete(items[:5])
            await store.invalidate_class(Versioned)
        await store.release()

    run(workload())  # warm up: the first key of a process imports stockpyle's integrations (once, ~30 ms)
    rounds = []
    for _ in range(5):
        rounds.append(slow_callbacks(workload))
        if not rounds[-1]:
            break
    assert rounds[-1] == [], rounds


def test_the_driver_keeps_the_sync_drivers_rules() -> None:
    """Same lifetimes, limits and capabilities as RedisDriver: the engine treats both alike."""
    for seconds in (None, 0.0001, 0.25, 1, 86400.0004):
        assert AsyncRedisDriver.ttl(seconds) == RedisDriver.ttl(seconds)
    for flag in ("backend", "min_lifetime", "can_add", "can_cas", "can_lease"):
        assert getattr(AsyncRedisDriver, flag) == getattr(RedisDriver, flag)


def test_missing_redis_names_the_extra(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match=r'pip install "stockpyle\[redis-asyncio\]"'):
        AsyncRedisStore(redis_url)
