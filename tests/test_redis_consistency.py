"""RedisStore's race protection: SET NX back-fills, tombstones, compare-and-set (Lua and WATCH/MULTI), the cluster.

The consistency contract runs on the shared server, signed, over RESP2, on a
private server that refuses Lua scripts (so versioned puts use WATCH/MULTI),
and on the suite's Redis Cluster, where one object's keys live on different
nodes and a partial add must be undone across them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import redis

from stockpyle import ChainedStore, ProcessMemoryStore, RedisStore
from stockpyle.exceptions import StoreError
from stockpyle.testing import ConsistencyContract, Item, Versioned

pytestmark = pytest.mark.redis

SIGNED = b"consistency-secret-01"


@pytest.fixture
def make_store(redis_client: Any, redis_prefix: str, redis_url: str) -> Iterator[Callable[..., RedisStore]]:
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
        options.setdefault("url", redis_cluster.url)
        options.setdefault("cluster", True)
        store = RedisStore(**options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.release()


def refuse_scripts(server: Any, how: str) -> str:
    """Make a private server refuse Lua scripts to a new user (ACL) or to everyone (renamed commands)."""
    if how == "acl":
        admin = redis.Redis(port=server.port)
        admin.execute_command("ACL", "SETUSER", "noscripts", "on", "nopass", "~*", "&*", "+@all", "-@scripting")
        admin.close()
        return f"redis://noscripts@127.0.0.1:{server.port}/0"
    return server.url


SCRIPTLESS = {"acl": (), "renamed": ("--rename-command", "EVALSHA", "", "--rename-command", "EVAL", "")}


# ---------------------------------------------------------------------------
# the shared consistency contract


class _RedisConsistency(ConsistencyContract):
    url_options: ClassVar[str] = ""
    store_options: ClassVar[dict[str, Any]] = {}

    @pytest.fixture(autouse=True)
    def _factory(self, make_store: Callable[..., RedisStore], redis_url: str) -> None:
        self.factory = make_store
        self.url = redis_url + self.url_options

    def make_store(self, **options: Any) -> Any:
        return self.factory(url=self.url, **self.store_options, **options)


class TestRedisConsistency(_RedisConsistency):
    pass


class TestSignedRedisConsistency(_RedisConsistency):
    store_options: ClassVar[dict[str, Any]] = {"secret": SIGNED}


class TestRedisResp2Consistency(_RedisConsistency):
    url_options: ClassVar[str] = "?protocol=2"


class TestScriptlessRedisConsistency(ConsistencyContract):
    """A server that refuses scripts to this user: versioned puts use WATCH/MULTI/EXEC."""

    @pytest.fixture(autouse=True)
    def _server(self, redis_server_factory: Any) -> None:
        self.url = refuse_scripts(redis_server_factory.start(), "acl")

    def make_store(self, **options: Any) -> Any:
        return RedisStore(self.url, namespace=uuid.uuid4().hex, **options)


class TestRedisClusterConsistency(ConsistencyContract):
    @pytest.fixture(autouse=True)
    def _factory(self, make_cluster_store: Callable[..., RedisStore]) -> None:
        self.factory = make_cluster_store

    def make_store(self, **options: Any) -> Any:
        return self.factory(**options)


# ---------------------------------------------------------------------------
# back-fill and tombstones


def test_chain_backfills_redis_through_set_nx(make_store: Callable[..., RedisStore]) -> None:
    l2 = make_store()
    record = ProcessMemoryStore()
    record.put(Item("x", 1, 2, "v1"))
    chain = ChainedStore([ProcessMemoryStore(), l2, record])
    assert chain.get(Item, {"key": "x"}).payload == "v1"  # type: ignore[union-attr]
    assert l2.get(Item, {"zap": 1, "bar": 2}).payload == "v1"  # type: ignore[union-attr]
    assert chain.stats()[1].backfills == 1


def test_delete_leaves_a_tombstone_for_tombstone_lifetime(
    make_store: Callable[..., RedisStore], redis_client: Any
) -> None:
    store = make_store(tombstone_lifetime=5)
    store.put(Item("t", 1, 2, "v1"))
    store.delete(Item("t", 1, 2))
    for keydict in ({"key": "t"}, {"zap": 1, "bar": 2}):
        mkey = store.key_for(Item, keydict)
        assert redis_client.get(mkey) is not None  # a tombstone...
        assert 4_000 <= redis_client.pttl(mkey) <= 5_000  # ...kept to the millisecond
        assert store.get(Item, keydict) is None  # ...read as a miss
    assert store.rejected == 0
    assert store.add(Item("t", 1, 2, "resurrected")) is False
    store.put(Item("t", 1, 2, "v2"))
    assert store.get(Item, {"key": "t"}).payload == "v2"  # type: ignore[union-attr]


def test_a_sub_second_tombstone_expires_on_time(make_store: Callable[..., RedisStore]) -> None:
    store = make_store(tombstone_lifetime=0.15)  # memcached could not keep less than 2 s
    store.put(Item("s", 1, 2))
    store.delete(Item("s", 1, 2))
    assert store.add(Item("s", 1, 2, "too early")) is False
    time.sleep(0.3)
    assert store.add(Item("s", 1, 2, "after the tombstone")) is True


def test_zero_tombstone_lifetime_deletes_plainly(make_store: Callable[..., RedisStore], redis_client: Any) -> None:
    store = make_store(tombstone_lifetime=0)
    store.put(Item("p", 1, 2))
    store.delete(Item("p", 1, 2))
    assert redis_client.exists(store.key_for(Item, {"key": "p"})) == 0
    assert store.add(Item("p", 1, 2)) is True


def test_a_forged_tombstone_is_rejected_in_a_signing_store(
    make_store: Callable[..., RedisStore], redis_client: Any
) -> None:
    store = make_store(secret=SIGNED)
    store.put(Item("s", 1, 2, "v1"))
    redis_client.set(store.key_for(Item, {"key": "s"}), b"SP\x01\x01\x00" + b"\xff\xff\xff\xff")
    assert store.get(Item, {"key": "s"}) is None
    assert store.rejected == 1


# ---------------------------------------------------------------------------
# compare-and-set: the Lua script, and WATCH/MULTI where scripts are refused


class MeddlingRedis(redis.Redis):
    """A real client that lets another writer change a key right before each compare-and-set reaches the server."""

    meddle: Callable[[], None] = staticmethod(lambda: None)
    times = 0

    def _interfere(self) -> None:
        if self.times > 0:
            self.times -= 1
            self.meddle()

    def evalsha(self, *args: Any) -> Any:  # type: ignore[override]  # the Lua compare-and-set
        self._interfere()
        return super().evalsha(*args)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        if transaction:  # WATCH ... MULTI: interfere after the WATCH, before EXEC
            multi = pipe.multi

            def meddling_multi() -> None:
                self._interfere()
                multi()

            pipe.multi = meddling_multi  # type: ignore[method-assign]
        return pipe


def warm_up(store: RedisStore) -> None:
    """Two versioned puts: the second compare-and-sets, so the store has found out whether scripts run."""
    store.put(Versioned("warm", "warm-alias", 1))
    store.put(Versioned("warm", "warm-alias", 2))


@pytest.fixture(params=["script", "watch"])
def cas_url(request: pytest.FixtureRequest) -> str:
    """A Redis URL where versioned puts run the Lua script, or (refused scripts) WATCH/MULTI."""
    if request.param == "script":
        request.getfixturevalue("redis_client")  # cleans this test's keys up
        return str(request.getfixturevalue("redis_url"))
    server = request.getfixturevalue("redis_server_factory").start()
    return refuse_scripts(server, "acl")


def test_cas_conflict_is_retried_and_the_newer_version_wins(cas_url: str, redis_prefix: str) -> None:
    namespace = f"{redis_prefix}-cas"
    other = RedisStore(cas_url, namespace=namespace)
    other.put(Versioned("r", "r-alias", 1))
    client = MeddlingRedis.from_url(cas_url)
    store = RedisStore(client=client, namespace=namespace)
    warm_up(store)
    client.meddle = lambda: other.put(Versioned("r", "r-alias", 5, "five"))  # type: ignore[method-assign]
    client.times = 1
    store.put(Versioned("r", "r-alias", 2, "two"))  # reads v1; v5 lands before its compare-and-set
    found = other.batch_get(Versioned, [{"key": "r"}, {"alias": "r-alias"}])
    assert [(v.version, v.body) for v in found] == [(5, "five"), (5, "five")]
    assert store.conflicts == 0
    store.release()
    other.release()


def test_endless_conflicts_invalidate_instead(cas_url: str, redis_prefix: str) -> None:
    namespace = f"{redis_prefix}-endless"
    other = RedisStore(cas_url, namespace=namespace, cleanup_stale_keys=False)
    other.put(Versioned("e", "e-alias", 1, "first"))  # the keys exist: every write of ours is a compare-and-set
    counter = iter(range(10**6))
    client = MeddlingRedis.from_url(cas_url)
    store = RedisStore(client=client, namespace=namespace)
    warm_up(store)
    # an equal version never stops our writer: it retries until it gives up
    client.meddle = lambda: other.put(Versioned("e", "e-alias", 1, f"other {next(counter)}"))  # type: ignore[method-assign]
    client.times = 10**6
    store.put(Versioned("e", "e-alias", 1, "mine"))
    assert store.conflicts == 1
    client.times = 0
    assert other.batch_get(Versioned, [{"key": "e"}, {"alias": "e-alias"}]) == [None, None]
    store.release()
    other.release()


@pytest.mark.parametrize("how", ["acl", "renamed"])
def test_refused_scripts_switch_to_watch_multi_and_log_once(
    how: str, redis_server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url = refuse_scripts(redis_server_factory.start(*SCRIPTLESS[how]), how)
    store = RedisStore(url, namespace="scriptless")
    with caplog.at_level(logging.WARNING, logger="stockpyle.redis"):
        for version in (1, 3, 2, 4):
            store.put(Versioned("w", "w-alias", version, f"v{version}"))
    found = store.batch_get(Versioned, [{"key": "w"}, {"alias": "w-alias"}])
    assert [(v.version, v.body) for v in found] == [(4, "v4"), (4, "v4")]  # version 2 was refused
    warnings = [r for r in caplog.records if "refuses Lua scripts" in r.getMessage()]
    assert len(warnings) == 1, warnings
    store.release()


# ---------------------------------------------------------------------------
# the cluster: an object's keys on different nodes


def split_item(store: RedisStore, tag: str) -> tuple[Item, Any, Any]:
    """An Item whose ``key`` and ``(zap, bar)`` keys are served by different primaries."""
    client = store.client
    for n in range(1000):
        item = Item(f"{tag}-{n}", n, 7, "v")
        first = client.get_node_from_key(store.key_for(Item, {"key": item.key}))
        second = client.get_node_from_key(store.key_for(Item, {"zap": n, "bar": 7}))
        if first.name != second.name:
            return item, first, second
    raise AssertionError("no item with keys on two nodes")


def test_cluster_partial_add_refused_on_one_node_is_undone_on_the_other(
    make_cluster_store: Callable[..., RedisStore],
) -> None:
    store = make_cluster_store()
    item, first, _second = split_item(store, "refused")
    store.put(Item("the owner now", item.zap, item.bar, "newer"))  # takes the (zap, bar) key on the second node
    assert store.add(item) is False
    key_node = store.client.get_redis_connection(first)
    assert key_node.exists(store.key_for(Item, {"key": item.key})) == 0  # added on the first node, then undone
    assert store.get(Item, {"zap": item.zap, "bar": item.bar}).payload == "newer"  # type: ignore[union-attr]


def test_cluster_partial_add_failed_on_one_node_is_undone_on_the_other(
    make_cluster_store: Callable[..., RedisStore],
) -> None:
    """One node refuses every write (out of memory): the add fails there, and the key written elsewhere is removed."""
    store = make_cluster_store()
    item, first, second = split_item(store, "failed")
    broken = redis.Redis(host=second.host, port=second.port)
    policy = broken.config_get("maxmemory-policy")["maxmemory-policy"]
    broken.config_set("maxmemory-policy", "noeviction")
    broken.config_set("maxmemory", 1)
    try:
        with pytest.raises(StoreError, match="out of memory"):
            store.add(item)
        key_node = store.client.get_redis_connection(first)
        assert key_node.exists(store.key_for(Item, {"key": item.key})) == 0  # never left half-present
    finally:
        broken.config_set("maxmemory", 0)
        broken.config_set("maxmemory-policy", policy)
        broken.close()
    assert store.add(item) is True  # the node accepts writes again
    assert store.batch_get(Item, [{"key": item.key}, {"zap": item.zap, "bar": item.bar}]) == [item, item]


def test_cluster_versioned_put_and_tombstones_span_nodes(make_cluster_store: Callable[..., RedisStore]) -> None:
    store = make_cluster_store(tombstone_lifetime=30)
    client = store.client
    owner = None
    for n in range(1000):
        candidate = Versioned(f"vk{n}", f"va{n}", 1)
        nodes = {
            client.get_node_from_key(store.key_for(Versioned, kd)).name
            for kd in ({"key": candidate.key}, {"alias": candidate.alias})
        }
        if len(nodes) == 2:
            owner = candidate
            break
    assert owner is not None
    store.put(Versioned(owner.key, owner.alias, 3, "three"))
    store.put(Versioned(owner.key, owner.alias, 2, "two"))  # refused on both nodes
    assert [v.body for v in store.batch_get(Versioned, [{"key": owner.key}, {"alias": owner.alias}])] == ["three"] * 2
    store.delete(Versioned(owner.key, owner.alias, 3))
    store.put(Versioned(owner.key, owner.alias, 3, "late put of the deleted version"))
    assert store.batch_get(Versioned, [{"key": owner.key}, {"alias": owner.alias}]) == [None, None]
