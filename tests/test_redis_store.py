"""RedisStore against real Redis servers (the shared one, private ones, a 3-primary cluster).

Contract, construction, URL forms, keys, round trips per node, lifetimes in
milliseconds, sizes, RESP2 and RESP3.
"""

from __future__ import annotations

import datetime as _dt
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
from redis.cluster import RedisCluster
from support.redis import redis_url_from_env

from stockpyle import ChainedStore, ProcessMemoryStore, RedisStore
from stockpyle.exceptions import (
    ConfigurationError,
    SerializationError,
    StoreError,
    StoreUnavailableError,
    ValueTooLargeError,
)
from stockpyle.keys import lookup_key
from stockpyle.serializers import HMACSigner
from stockpyle.stores.drivers.redis import NO_EXPIRY, RedisDriver
from stockpyle.testing import Automobile, Car, Item, StoreContract

pytestmark = pytest.mark.redis

# ---------------------------------------------------------------------------
# helpers

SENT: Counter[str] = Counter()


class CountingConnection(redis.connection.Connection):
    """A real connection that counts the requests it writes (one per round trip, pipelines included)."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        SENT[f"{self.host}:{self.port}"] += 1
        super().send_packed_command(command, check_health)


def counting_client(url: str) -> redis.Redis:
    return redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, connection_class=CountingConnection))


def counting_cluster(url: str) -> RedisCluster:
    return RedisCluster.from_url(url, connection_class=CountingConnection)


@pytest.fixture
def make_store(redis_client: Any, redis_prefix: str, redis_url: str) -> Iterator[Callable[..., RedisStore]]:
    """RedisStores on the shared server, each in a namespace holding this test's prefix (cleaned up after)."""
    made: list[RedisStore] = []

    def make(**options: Any) -> RedisStore:
        options.setdefault("namespace", f"{redis_prefix}-{len(made)}")
        if "client" not in options:
            options.setdefault("url", redis_url)
        store = RedisStore(**options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.release()


@pytest.fixture
def make_cluster_store(
    redis_cluster: Any, redis_cluster_client: Any, redis_prefix: str
) -> Iterator[Callable[..., RedisStore]]:
    made: list[RedisStore] = []

    def make(**options: Any) -> RedisStore:
        options.setdefault("namespace", f"{redis_prefix}-{len(made)}")
        if "client" not in options:
            options.setdefault("url", redis_cluster.url)
            options.setdefault("cluster", True)
        store = RedisStore(**options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.release()


# ---------------------------------------------------------------------------
# the contract: standalone (RESP3, RESP2, signed, chained) and on the cluster


class _RedisContract(StoreContract):
    url_options: ClassVar[str] = ""
    store_options: ClassVar[dict[str, Any]] = {}

    @pytest.fixture(autouse=True)
    def _server(self, redis_client: Any, redis_prefix: str, redis_url: str) -> None:
        self.url = redis_url + self.url_options
        self.prefix = redis_prefix
        self.count = 0

    def make_store(self, **options: Any) -> Any:
        self.count += 1
        return RedisStore(self.url, namespace=f"{self.prefix}-{self.count}", **self.store_options, **options)


class TestRedisContract(_RedisContract):
    """redis-py's default protocol (RESP3 since redis-py 5)."""


class TestRedisResp2Contract(_RedisContract):
    url_options: ClassVar[str] = "?protocol=2"


class TestSignedRedisContract(_RedisContract):
    store_options: ClassVar[dict[str, Any]] = {"secret": b"contract-secret-0123"}


class TestChainedRedisContract(_RedisContract):
    def make_store(self, **options: Any) -> Any:
        return ChainedStore([ProcessMemoryStore(**options), super().make_store(**options)])


class TestRedisClusterContract(StoreContract):
    @pytest.fixture(autouse=True)
    def _cluster(self, make_cluster_store: Callable[..., RedisStore]) -> None:
        self.factory = make_cluster_store

    def make_store(self, **options: Any) -> Any:
        return self.factory(**options)


def test_the_default_protocol_is_resp3_and_both_are_tested(make_store: Callable[..., RedisStore]) -> None:
    resp3, resp2 = make_store(), make_store(url=redis_url_from_env() + "?protocol=2")
    resp3.put(Item("p", 1, 2))
    resp2.put(Item("p", 1, 2))
    for store, protocol in ((resp3, 3), (resp2, 2)):
        pool = store.client.connection_pool
        connection = pool.get_connection()
        try:
            assert int(connection.protocol) == protocol
        finally:
            pool.release(connection)


# ---------------------------------------------------------------------------
# construction


def test_needs_exactly_one_of_url_and_client(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="exactly one of url="):
        RedisStore()
    client = redis.Redis.from_url(redis_url)
    with pytest.raises(ConfigurationError, match="exactly one of url="):
        RedisStore(redis_url, client=client)
    with pytest.raises(TypeError):
        RedisStore(redis_url, None)  # type: ignore[misc]  # everything after url is keyword-only


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"url": "http://127.0.0.1:6379"}, "must look like redis://"),
        ({"url": "127.0.0.1:6379"}, "must look like redis://"),
        ({"url": 6379}, "must look like redis://"),
        ({"url": "redis://127.0.0.1:notaport/0"}, "cannot be used"),
        ({"url": "redis://127.0.0.1:6379/zero"}, "database number"),
        ({"url": "redis://127.0.0.1:6379/0/1"}, "database number"),
        ({"url": "redis://127.0.0.1:6379/2", "cluster": True}, "only database 0"),
        ({"url": "unix:///tmp/redis.sock", "cluster": True}, "over TCP"),
        ({"url": "redis://127.0.0.1:6379", "cluster": "yes"}, "cluster must be"),
        ({"url": "redis://127.0.0.1:6379", "socket_timeout": 0}, "socket_timeout"),
        ({"url": "redis://127.0.0.1:6379", "connect_timeout": -1}, "connect_timeout"),
        ({"url": "redis://127.0.0.1:6379", "connect_timeout": True}, "connect_timeout"),
        ({"url": "redis://127.0.0.1:6379", "max_item_size": 10}, "max_item_size"),
        ({"url": "redis://127.0.0.1:6379", "max_lifetime": 0}, "max_lifetime"),
        ({"url": "redis://127.0.0.1:6379", "tombstone_lifetime": -1}, "tombstone_lifetime"),
        ({"url": "redis://127.0.0.1:6379", "namespace": 5}, "namespace must be a str"),
        ({"url": "redis://127.0.0.1:6379", "secret": b"x" * 16, "signer": HMACSigner(b"y" * 16)}, "secret= or signer="),
        ({"client": object()}, r"needs a redis\.Redis or redis\.cluster\.RedisCluster"),
        ({"client": redis.Redis(decode_responses=True)}, "returns bytes"),
        ({"client": redis.Redis(), "cluster": True}, r"needs a redis\.cluster\.RedisCluster client"),
    ],
)
def test_invalid_arguments_say_what_to_do(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        RedisStore(**options)


def test_async_and_replica_clients_are_refused(redis_cluster: Any, redis_url: str) -> None:
    import redis.asyncio

    with pytest.raises(ConfigurationError, match=r"not redis\.asyncio"):
        RedisStore(client=redis.asyncio.Redis.from_url(redis_url))
    from redis.cluster import LoadBalancingStrategy

    balanced = RedisCluster.from_url(redis_cluster.url, load_balancing_strategy=LoadBalancingStrategy.ROUND_ROBIN)
    with pytest.warns(DeprecationWarning, match="read_from_replicas"):
        replicas = RedisCluster.from_url(redis_cluster.url, read_from_replicas=True)
    plain = RedisCluster.from_url(redis_cluster.url)
    try:
        for client in (balanced, replicas):
            with pytest.raises(ConfigurationError, match="primaries only"):
                RedisStore(client=client)
        with pytest.raises(ConfigurationError, match=r"needs a redis\.Redis client"):
            RedisStore(client=plain, cluster=False)
        assert RedisStore(client=plain, cluster=True).cluster is True
    finally:
        for client in (balanced, replicas, plain):
            client.close()
    sentinel_pool = redis.sentinel.SentinelConnectionPool("mymaster", redis.sentinel.Sentinel([]), is_master=False)
    with pytest.raises(ConfigurationError, match="master_for"):
        RedisStore(client=redis.Redis(connection_pool=sentinel_pool))


def test_constructor_never_connects(redis_server_factory: Any) -> None:
    free = redis_server_factory.start()
    free.stop()  # a port where nothing listens now
    standalone = RedisStore(free.url, connect_timeout=0.2)
    cluster = RedisStore(f"redis://127.0.0.1:{free.port}", cluster=True, connect_timeout=0.2)
    assert cluster.cluster is True
    for store in (standalone, cluster):
        with pytest.raises(StoreUnavailableError, match="unavailable") as caught:
            store.get(Item, {"key": "k"})
        assert caught.value.store is store
        # the first operation is the first I/O: learning Item's generation, for the get
        assert caught.value.action in ("get", "learn a class generation")
        store.release()
    free.start()  # the server comes up: the same store now works
    standalone.put(Item("k", 1, 2))
    assert standalone.get(Item, {"key": "k"}) == Item("k", 1, 2)


def test_missing_redis_names_the_extra(monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(ImportError, match=r"pip install stockpyle\[redis\]"):
        RedisStore(redis_url)


def test_import_of_the_module_does_not_import_redis() -> None:
    code = (
        "import sys; import stockpyle, stockpyle.stores.redis; from stockpyle import *; "
        "assert 'redis' not in sys.modules, 'imported the driver'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_built_client_has_short_timeouts_and_no_retries(redis_url: str) -> None:
    store = RedisStore(redis_url, socket_timeout=0.3, connect_timeout=0.1)
    kwargs = store.client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.3, 0.1)
    assert kwargs["retry"].get_retries() == 0  # redis-py's default would retry ten times
    assert store.describe() == redis_url
    secret = RedisStore("redis://:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in repr(secret) and "***" in secret.describe()


def test_url_forms(redis_server_factory: Any, tmp_path: Path, make_store: Callable[..., RedisStore]) -> None:
    # a database number selects the database
    server = redis_server_factory.start("--unixsocket", str(tmp_path / "redis.sock"), "--unixsocketperm", "700")
    on_db3 = RedisStore(f"redis://127.0.0.1:{server.port}/3", namespace="forms")
    on_db3.put(Item("db", 1, 2))
    raw3 = redis.Redis(port=server.port, db=3)
    assert raw3.exists(on_db3.key_for(Item, {"key": "db"})) == 1
    assert redis.Redis(port=server.port, db=0).dbsize() == 0
    # a unix socket reaches the same server
    on_socket = RedisStore(f"unix://{tmp_path / 'redis.sock'}?db=3", namespace="forms")
    assert on_socket.get(Item, {"key": "db"}) == Item("db", 1, 2)
    # rediss:// builds a TLS client (not connected here: the test servers have no TLS)
    tls = RedisStore("rediss://127.0.0.1:6380/0")
    assert tls.client.connection_pool.connection_class is redis.connection.SSLConnection
    # query-string options go to redis-py
    resp2 = make_store(url=redis_url_from_env() + "?protocol=2&health_check_interval=5")
    assert resp2.client.connection_pool.connection_kwargs["health_check_interval"] == 5
    for store in (on_db3, on_socket, tls):
        store.release()
    raw3.close()


def test_every_client_kind_works(redis_url: str, make_store: Callable[..., RedisStore]) -> None:
    pool = redis.ConnectionPool.from_url(redis_url, max_connections=4)
    for client in (
        redis.Redis.from_url(redis_url),
        redis.Redis(connection_pool=pool),
        redis.StrictRedis.from_url(redis_url),
    ):
        store = make_store(client=client)
        assert store.cluster is False
        assert store.client is client
        first, second = Item("a", 1, 2, "one"), Item("b", 3, 4, "two")
        store.put(first)
        store.batch_put([second])
        assert store.batch_get(Item, [{"key": "b"}, {"key": "zz"}, {"zap": 1, "bar": 2}]) == [second, None, first]
        store.batch_delete([first, second])
        assert store.batch_get(Item, [{"key": "a"}, {"key": "b"}]) == [None, None]
        store.release()  # disconnects the pool, also a pool passed in; it reconnects on use
        assert store.get(Item, {"key": "a"}) is None


def test_release_keeps_the_store_usable(make_store: Callable[..., RedisStore]) -> None:
    store = make_store()
    store.put(Item("k", 1, 2))
    store.release()
    assert store.get(Item, {"key": "k"}) == Item("k", 1, 2)
    store.release()
    store.release()
    assert store.batch_get(Item, [{"zap": 1, "bar": 2}]) == [Item("k", 1, 2)]


def test_a_cluster_store_is_usable_after_release(make_cluster_store: Callable[..., RedisStore]) -> None:
    store = make_cluster_store()
    items = [Item(f"r{i}", i, 0) for i in range(10)]
    store.batch_put(items)
    store.release()  # disconnects every node's pool; the slot table is kept
    assert store.batch_get(Item, [{"key": f"r{i}"} for i in range(10)]) == items
    store.release()
    assert store.get(Item, {"zap": 3, "bar": 0}) == items[3]
    store.batch_delete(items)


# ---------------------------------------------------------------------------
# keys


def test_keys_are_readable_and_type_faithful(make_store: Callable[..., RedisStore]) -> None:
    store = make_store(prefix="app", namespace=make_store().namespace + "-v2")
    mkey = store.key_for(Item, {"key": 123})
    assert re.match(rf"app:{re.escape(store.namespace)}:Item\.[0-9a-f]{{8}}:[0-9a-f]{{40}}\Z", mkey), mkey
    assert mkey == store.redis_key(lookup_key(Item, {"key": 123}))
    assert mkey != store.key_for(Item, {"key": "123"})
    store.put(Item(123, 1, 2, "int"))
    store.put(Item("123", 3, 4, "str"))
    assert store.get(Item, {"key": 123}).payload == "int"  # type: ignore[union-attr]
    assert store.get(Item, {"key": "123"}).payload == "str"  # type: ignore[union-attr]
    store.batch_delete([Item(123, 1, 2), Item("123", 3, 4)])


def test_namespaces_never_read_each_others_entries(make_store: Callable[..., RedisStore]) -> None:
    v1, v2 = make_store(), make_store()
    v1.put(Item("shared", 1, 2, "from v1"))
    assert v2.get(Item, {"key": "shared"}) is None
    v2.put(Item("shared", 1, 2, "from v2"))
    assert v1.get(Item, {"key": "shared"}).payload == "from v1"  # type: ignore[union-attr]


def test_an_entry_copied_to_another_key_is_rejected_when_signed(
    make_store: Callable[..., RedisStore], redis_client: Any
) -> None:
    store = make_store(secret=b"signing-secret-0123")
    store.put(Item("a", 1, 2, "a's"))
    forged_key = store.key_for(Item, {"key": "b"})
    redis_client.set(forged_key, redis_client.get(store.key_for(Item, {"key": "a"})))
    assert store.get(Item, {"key": "b"}) is None
    assert store.rejected == 1
    assert redis_client.exists(forged_key) == 0  # rejected entries are deleted


def test_a_foreign_value_under_a_key_is_a_rejected_miss(
    make_store: Callable[..., RedisStore], redis_client: Any
) -> None:
    store = make_store()
    redis_client.set(store.key_for(Item, {"key": "x"}), b"not an envelope")
    assert store.get(Item, {"key": "x"}) is None
    assert store.rejected == 1
    redis_client.hset(store.key_for(Item, {"key": "h"}), "field", "a hash, not a string")
    with pytest.raises(StoreError, match="WRONGTYPE"):  # GET on a hash: the server refuses
        store.get(Item, {"key": "h"})
    assert store.batch_get(Item, [{"key": "h"}]) == [None]  # MGET reports it as missing


def test_a_corrupt_entry_in_a_batch_is_rejected_and_deleted(
    make_store: Callable[..., RedisStore], redis_client: Any
) -> None:
    store = make_store()
    store.batch_put([Item("good", 1, 1), Item("bad", 2, 2)])
    bad_key = store.key_for(Item, {"key": "bad"})
    entry = redis_client.get(bad_key)
    redis_client.set(bad_key, entry[:-12] + b"\x00" * 12)  # a valid envelope around a broken pickle
    assert store.batch_get(Item, [{"key": "good"}, {"key": "bad"}, {"zap": 2, "bar": 2}]) == [
        Item("good", 1, 1),
        None,
        Item("bad", 2, 2),
    ]
    assert store.rejected == 1
    assert redis_client.exists(bad_key) == 0


# ---------------------------------------------------------------------------
# round trips


def test_standalone_batches_are_one_round_trip(redis_url: str, make_store: Callable[..., RedisStore]) -> None:
    store = make_store(client=counting_client(redis_url), polymorphic=True, generation_check=60)
    items = [Item(f"k{i}", i, -i, f"p{i}") for i in range(100)]
    store.get(Item, {"key": "warm-up"})  # the connection is made (HELLO/CLIENT SETINFO) here
    store.key_for(Car, {"license_plate": "warm-up"})  # the class generations are learnt once per process
    SENT.clear()
    store.batch_put(items)
    assert sum(SENT.values()) == 2  # stale-key probe (MGET) and one pipeline of SETs
    SENT.clear()
    assert store.batch_get(Item, [{"key": f"k{i}"} for i in range(100)] + [{"key": "missing"}]) == [*items, None]
    assert sum(SENT.values()) == 1  # MGET
    SENT.clear()
    assert store.batch_add([Item(f"n{i}", 1000 + i, 0) for i in range(50)]) == [True] * 50
    assert sum(SENT.values()) == 1  # one pipeline of SET NX
    SENT.clear()
    store.batch_delete(items)
    assert sum(SENT.values()) == 2  # stale-key probe and one pipeline of tombstones
    SENT.clear()
    assert store.get(Automobile, {"license_plate": "none"}) is None
    assert sum(SENT.values()) == 1
    SENT.clear()
    store.put(Car("C-1", "red"))  # one object, two classes' keys: still one read and one write
    assert sum(SENT.values()) == 2


def test_cluster_batches_are_one_round_trip_per_node(
    redis_cluster: Any, make_cluster_store: Callable[..., RedisStore]
) -> None:
    store = make_cluster_store(client=counting_cluster(redis_cluster.url), generation_check=60)
    items = [Item(f"k{i}", i, -i, f"p{i}") for i in range(100)]
    nodes = {node.address for node in redis_cluster.nodes}
    store.batch_get(Item, [{"key": f"warm-{i}"} for i in range(30)])  # connect to every node first
    SENT.clear()
    store.batch_put(items)
    assert set(SENT) == nodes
    assert list(SENT.values()) == [2, 2, 2]  # per node: stale-key probe and one pipeline of SETs
    SENT.clear()
    assert store.batch_get(Item, [{"key": f"k{i}"} for i in range(100)]) == items
    assert list(SENT.values()) == [1, 1, 1]
    SENT.clear()
    store.batch_delete(items)
    assert list(SENT.values()) == [2, 2, 2]
    SENT.clear()
    assert store.batch_add([Item(f"n{i}", 1000 + i, 0) for i in range(100)]) == [True] * 100
    assert list(SENT.values()) == [1, 1, 1]


def test_cluster_spreads_one_objects_keys_over_nodes(make_cluster_store: Callable[..., RedisStore]) -> None:
    store = make_cluster_store()
    client = store.client
    spread = 0
    for i in range(20):
        nodes = {
            client.get_node_from_key(store.key_for(Item, kd)).name for kd in ({"key": f"o{i}"}, {"zap": i, "bar": 0})
        }
        spread += len(nodes) > 1
        store.put(Item(f"o{i}", i, 0, i))
    assert spread >= 5  # the test below relies on objects whose keys live on different nodes
    assert store.batch_get(Item, [{"zap": i, "bar": 0} for i in range(20)]) == [
        Item(f"o{i}", i, 0, i) for i in range(20)
    ]


def test_cluster_follows_a_slot_that_moved(redis_cluster: Any, make_cluster_store: Callable[..., RedisStore]) -> None:
    """A slot migrates to another node after the store read the slot table: MOVED is followed, nothing fails."""
    store = make_cluster_store()
    item = Item("mover", 1, 2, "before the move")
    store.put(item)
    client = store.client
    mkey = store.key_for(Item, {"key": "mover"})
    slot = client.keyslot(mkey)
    source = client.get_node_from_key(mkey)
    target = next(n for n in client.get_primaries() if n.name != source.name)
    admin = {n.name: redis.Redis(host=n.host, port=n.port) for n in client.get_primaries()}
    ids = {name: conn.execute_command("CLUSTER MYID").decode() for name, conn in admin.items()}

    def move(slot: int, src: Any, dst: Any) -> None:
        admin[dst.name].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[src.name])
        admin[src.name].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[dst.name])
        while keys := admin[src.name].execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            admin[src.name].execute_command("MIGRATE", dst.host, dst.port, "", 0, 5000, "KEYS", *keys)
        for conn in admin.values():
            conn.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[dst.name])

    move(slot, source, target)
    try:
        assert client.get_node_from_key(mkey).name == source.name  # the store's slot table is now stale
        assert store.batch_get(Item, [{"key": "mover"}]) == [item]  # MOVED, followed through RedisCluster
        item.payload = "after the move"
        store.batch_put([item])
        assert store.get(Item, {"key": "mover"}) == item
        assert admin[target.name].exists(mkey) == 1
        assert client.get_node_from_key(mkey).name == target.name  # and redis-py updated its table
    finally:
        move(slot, target, source)
        for conn in admin.values():
            conn.close()
    store.delete(item)


# ---------------------------------------------------------------------------
# lifetimes in milliseconds


def pttl(client: Any, key: str) -> int:
    return int(client.pttl(key))


@pytest.mark.parametrize(
    ("lifetime", "low", "high"),
    [
        (0.25, 150, 250),  # milliseconds are kept, not rounded to seconds
        (0.0001, 0, 1),  # rounded up, never to "no expiry"
        (90, 89_000, 90_000),
        (_dt.timedelta(minutes=5), 299_000, 300_000),
        (_dt.timedelta(days=40), 40 * 86_400_000 - 5_000, 40 * 86_400_000),  # no 30-day rule in Redis
        (None, -1, -1),  # never expires (max_lifetime=None)
        (0, -1, -1),
    ],
)
def test_lifetimes_are_milliseconds(
    lifetime: Any, low: int, high: int, make_store: Callable[..., RedisStore], redis_client: Any
) -> None:
    store = make_store(lifetime_cb=lambda obj: lifetime, max_lifetime=None)
    store.put(Item("t", 1, 2))
    store.add(Item("t2", 3, 4))
    for key in (
        store.key_for(Item, {"key": "t"}),
        store.key_for(Item, {"zap": 1, "bar": 2}),
        store.key_for(Item, {"key": "t2"}),
    ):
        if lifetime == 0.0001:
            assert pttl(redis_client, key) in (-2, 0, 1)  # gone already, or about to be
        else:
            assert low <= pttl(redis_client, key) <= high, key


def test_absolute_datetimes(make_store: Callable[..., RedisStore], redis_client: Any) -> None:
    aware = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(minutes=10)
    naive_local = _dt.datetime.now() + _dt.timedelta(minutes=20)
    for when, expected in ((aware, 600_000), (naive_local, 1_200_000)):
        store = make_store(lifetime_cb=lambda obj, when=when: when)
        store.put(Item("dt", 1, 2))
        assert expected - 3_000 <= pttl(redis_client, store.key_for(Item, {"key": "dt"})) <= expected


def test_a_quarter_second_lifetime_expires_to_the_millisecond(make_store: Callable[..., RedisStore]) -> None:
    import time

    store = make_store(lifetime_cb=lambda obj: 0.25)
    store.put(Item("q", 1, 2))
    assert store.get(Item, {"key": "q"}) is not None
    time.sleep(0.4)  # memcached would keep it up to a second longer
    assert store.batch_get(Item, [{"key": "q"}, {"zap": 1, "bar": 2}]) == [None, None]


@pytest.mark.parametrize(
    ("max_lifetime", "lifetime", "low", "high"),
    [
        (60, None, 59_000, 60_000),  # no lifetime: the cap
        (60, 300, 59_000, 60_000),  # longer: capped
        (60, 10, 9_000, 10_000),  # shorter: kept
        (_dt.timedelta(minutes=2), _dt.timedelta(days=40), 119_000, 120_000),
        (40 * 86_400, None, 40 * 86_400_000 - 5_000, 40 * 86_400_000),
        (None, None, -1, -1),
    ],
)
def test_max_lifetime_caps_every_entry(
    max_lifetime: Any, lifetime: Any, low: int, high: int, *, make_store: Callable[..., RedisStore], redis_client: Any
) -> None:
    callback = None if lifetime is None else (lambda obj: lifetime)
    store = make_store(max_lifetime=max_lifetime, lifetime_cb=callback)
    store.put(Item("c", 1, 2))
    store.add(Item("c2", 3, 4))
    for key in (store.key_for(Item, {"key": "c"}), store.key_for(Item, {"key": "c2"})):
        assert low <= pttl(redis_client, key) <= high, key


def test_the_default_cap_is_one_day(make_store: Callable[..., RedisStore], redis_client: Any) -> None:
    store = make_store()
    store.put(Item("cap", 1, 2))
    assert store.max_lifetime == 86_400
    assert 86_399_000 <= pttl(redis_client, store.key_for(Item, {"key": "cap"})) <= 86_400_000


def test_ttl_conversion() -> None:
    assert RedisDriver.ttl(None) == NO_EXPIRY == 0
    assert [RedisDriver.ttl(s) for s in (0.3, 0.0001, 1, 2.0005, 40 * 86_400)] == [300, 1, 1000, 2001, 3_456_000_000]


# ---------------------------------------------------------------------------
# sizes, serialization and server refusals


def test_values_over_max_item_size_are_refused_before_sending(make_store: Callable[..., RedisStore]) -> None:
    store = make_store(max_item_size=64 * 1024)
    store.put(Item("big", 1, 2, "small at first"))
    with pytest.raises(ValueTooLargeError, match="bytes serialized"):
        store.put(Item("big", 1, 2, "x" * 100_000))
    assert store.batch_get(Item, [{"key": "big"}, {"zap": 1, "bar": 2}]) == [None, None]  # no stale copy left
    store.batch_put([Item("a", 5, 5, "fits")])
    assert store.add(Item("huge", 6, 6, "y" * 100_000)) is False  # a back-fill just skips it


def test_a_server_limit_below_max_item_size_looks_like_an_outage(redis_server_factory: Any) -> None:
    """Redis drops the connection for a value over proto-max-bulk-len: match max_item_size to it."""
    server = redis_server_factory.start("--proto-max-bulk-len", str(1024 * 1024))
    loose = RedisStore(server.url, namespace="sizes")
    with pytest.raises(StoreUnavailableError):
        loose.put(Item("s", 1, 2, b"z" * (2 * 1024 * 1024)))
    matched = RedisStore(server.url, namespace="sizes", max_item_size=1024 * 1024)
    with pytest.raises(ValueTooLargeError):
        matched.put(Item("s", 1, 2, b"z" * (2 * 1024 * 1024)))
    matched.put(Item("s", 1, 2, b"z" * (1024 * 1024 - 4096)))
    assert matched.get(Item, {"key": "s"}) is not None


def test_out_of_memory_is_a_store_error_and_never_leaves_a_stale_entry(redis_server_factory: Any) -> None:
    server = redis_server_factory.start("--maxmemory-policy", "noeviction")
    store = RedisStore(server.url, namespace="oom")
    store.batch_put([Item("o", 1, 2, "before"), Item("d", 3, 4, "doomed")])
    store.put(Automobile("ONE-1", "before"))
    admin = redis.Redis(port=server.port)
    admin.config_set("maxmemory", 1)  # every write that adds data is refused from now on
    try:
        with pytest.raises(StoreError, match="out of memory") as caught:
            store.put(Item("o", 1, 2, "after"))
        assert not isinstance(caught.value, StoreUnavailableError)  # the layer answers; it refuses writes
        assert store.batch_get(Item, [{"key": "o"}, {"zap": 1, "bar": 2}]) == [None, None]  # invalidated by DEL
        with pytest.raises(StoreError, match="out of memory"):
            store.put(Automobile("ONE-1", "after"))  # a one-key object: one write, the same rule
        assert store.get(Automobile, {"license_plate": "ONE-1"}) is None
        with pytest.raises(StoreError, match="out of memory"):
            store.delete(Item("d", 3, 4))  # its tombstones are refused: the keys are deleted plainly
        assert store.batch_get(Item, [{"key": "d"}, {"zap": 3, "bar": 4}]) == [None, None]
        with pytest.raises(StoreError, match="out of memory"):
            store.add(Item("d", 3, 4, "back-fill"))  # refused too
        assert store.get(Item, {"key": "d"}) is None
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
    store.release()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (redis.ConnectionError("Error 111 connecting"), StoreUnavailableError),
        (redis.TimeoutError("Timeout reading from socket"), StoreUnavailableError),
        (redis.exceptions.ClusterDownError("The cluster is down"), StoreUnavailableError),
        (redis.exceptions.MasterDownError("Link with MASTER is down"), StoreUnavailableError),
        (redis.exceptions.ClusterError("TTL exhausted."), StoreUnavailableError),  # MOVED/ASK without end
        (redis.exceptions.SlotNotCoveredError('Slot "7" is not covered by the cluster.'), StoreUnavailableError),
        (redis.exceptions.RedisClusterException("Redis Cluster cannot be connected."), StoreUnavailableError),
        (redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), StoreError),
        (redis.exceptions.AuthenticationError("invalid username-password pair"), StoreError),
        (redis.exceptions.NoPermissionError("this user has no permissions"), StoreError),
        (redis.exceptions.ResponseError("WRONGTYPE Operation against a key"), StoreError),
        (redis.exceptions.ResponseError("Protocol error: invalid bulk length"), ValueTooLargeError),
    ],
    ids=lambda v: type(v).__name__,
)
def test_the_error_table_maps_redis_errors(error: Exception, expected: type[Exception], redis_url: str) -> None:
    store = RedisStore(redis_url)
    mapped = store.driver.errors.map(error, store, "get")
    assert type(mapped) is expected, mapped
    assert mapped.store is store and mapped.action == "get"  # type: ignore[union-attr]
    assert store.describe() in str(mapped)
    assert store.driver.errors.map(KeyError("a bug"), store, "get") is None  # not a driver error: passes through


def test_unpicklable_object_drops_the_old_entry(make_store: Callable[..., RedisStore]) -> None:
    store = make_store()
    store.put(Item("u", 1, 2, "picklable"))
    with pytest.raises(SerializationError, match="cannot serialize Item"):
        store.put(Item("u", 1, 2, threading.Lock()))
    assert store.get(Item, {"zap": 1, "bar": 2}) is None


# ---------------------------------------------------------------------------
# threads


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_sixteen_threads_share_one_store(where: str, request: pytest.FixtureRequest) -> None:
    factory = request.getfixturevalue("make_store" if where == "standalone" else "make_cluster_store")
    store = factory()
    shared = [Item(f"shared{i}", 1000 + i, 0, i) for i in range(20)]
    store.batch_put(shared)
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for round_ in range(12):
                mine = Item(f"t{thread}", thread, round_, (thread, round_))
                store.put(mine)
                assert store.get(Item, {"key": f"t{thread}"}) == mine
                assert store.get(Item, {"zap": thread, "bar": round_ - 1}) is None  # old key cleaned up
                assert store.batch_get(Item, [{"key": f"shared{i}"} for i in range(20)]) == shared
            store.delete(mine)
            assert store.get(Item, {"key": f"t{thread}"}) is None
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]


# ---------------------------------------------------------------------------
# the documented example


@pytest.mark.parametrize("where", ["standalone", "cluster"])
def test_the_redis_example_runs(where: str, request: pytest.FixtureRequest) -> None:
    root = Path(__file__).resolve().parent.parent
    if where == "cluster":
        arguments = [request.getfixturevalue("redis_cluster").url, "--cluster"]
    else:
        request.getfixturevalue("redis_client")
        arguments = [request.getfixturevalue("redis_url")]
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "redis_cache.py"), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("ok")
    assert "the tombstone refused a late back-fill" in result.stdout
