"""RedisStore and AsyncRedisStore: objects in Redis or a Redis Cluster, through redis-py.

The store is the key-value engine (:class:`~stockpyle.stores.kv.KeyValueStore`:
key naming, envelopes and signing, stale-key cleanup, add with undo,
version-checked writes, tombstones, lifetime caps) on the redis driver
(:mod:`stockpyle.stores.drivers.redis`).  Its keys have the form
``{prefix}:{namespace}:{ClassName}.{generation}:{digest}`` and its entries are the engine's
envelopes; see :mod:`stockpyle.stores.kv` for both.

Redis specifics: lifetimes are milliseconds (``PX``); back-fills are
``SET NX``; version-checked writes compare-and-set through one Lua script;
batches are one round trip (one per node on a cluster); only primaries are
read.  On a Redis Cluster the keys of one object live in different slots, so
an object is never written atomically: each key is written on its own node,
and an add that fails on one node is undone on the others.

:class:`AsyncRedisStore` is the same store for asyncio, on ``redis.asyncio``
(:mod:`stockpyle.stores.drivers.aioredis`): the same constructor, keys,
entries, scripts and leases, so both kinds read each other's entries.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Mapping
from typing import Any, ClassVar

from ..exceptions import ConfigurationError
from ..lifetimes import LifetimeCallback
from ..serializers import Serializer, Signer
from .drivers.redis import DEFAULT_MAX_ITEM_SIZE, INSTALL_HINT, RedisDriver, build_client, import_redis
from .kv import (
    CAS_ATTEMPTS,
    DEFAULT_GENERATION_CHECK,
    DEFAULT_MAX_LIFETIME,
    ITEM_OVERHEAD,
    AsyncKeyValueStore,
    KeyValueEngine,
    KeyValueStore,
)

__all__ = [
    "CAS_ATTEMPTS",
    "DEFAULT_MAX_ITEM_SIZE",
    "DEFAULT_MAX_LIFETIME",
    "INSTALL_HINT",
    "AsyncRedisStore",
    "RedisStore",
]

_SCHEMES = ("redis", "rediss", "unix")


def _positive(store: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigurationError(f"{store} {name} must be a positive number of seconds; got {value!r}")
    return float(value)


def _shown(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


def _check_url(store: str, redis: Any, url: Any, cluster: bool) -> None:
    if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in _SCHEMES:
        raise ConfigurationError(
            f"{store} url must look like redis://host:6379/0 (rediss:// for TLS, unix:///path/to/socket); got {url!r}"
        )
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "unix" and parts.path.strip("/") and not parts.path.strip("/").isdigit():
        # redis-py would silently use database 0
        raise ConfigurationError(
            f"{store} url {_shown(url)!r}: the path must be a database number, as in redis://host:6379/0"
        )
    try:
        options = redis.connection.parse_url(url)
    except ValueError as exc:
        raise ConfigurationError(f"{store} url {_shown(url)!r} cannot be used: {exc}") from None
    if cluster and "path" in options:
        raise ConfigurationError("a Redis Cluster is reached over TCP: use url='redis://host:port', not unix://")
    if cluster and options.get("db", 0) != 0:
        raise ConfigurationError(
            f"a Redis Cluster has only database 0; got {_shown(url)!r}: use redis://host:port or redis://host:port/0"
        )


def _redis_driver(
    store: str,
    redis: Any,
    *,
    url: Any,
    client: Any,
    cluster: Any,
    socket_timeout: Any,
    connect_timeout: Any,
    max_item_size: Any,
    asyncio: bool,
) -> Any:
    """The checked options of :class:`RedisStore` or :class:`AsyncRedisStore` as their driver.

    :param asyncio: build an :class:`~stockpyle.stores.drivers.aioredis.AsyncRedisDriver`
        (one client per event loop for ``url``) instead of a
        :class:`~stockpyle.stores.drivers.redis.RedisDriver`.
    """
    if asyncio:  # imported here: a synchronous program never imports asyncio for RedisStore
        from .drivers import aioredis
    kinds = "redis.asyncio.Redis or RedisCluster" if asyncio else "redis.Redis or RedisCluster"
    if (url is None) == (client is None):
        raise ConfigurationError(f"{store} needs exactly one of url='redis://host:6379/0' or client=<{kinds}>")
    if cluster is not None and not isinstance(cluster, bool):
        raise ConfigurationError(f"{store} cluster must be True, False or None; got {cluster!r}")
    socket_timeout = _positive(store, "socket_timeout", socket_timeout)
    connect_timeout = _positive(store, "connect_timeout", connect_timeout)
    if isinstance(max_item_size, bool) or not isinstance(max_item_size, int) or max_item_size <= ITEM_OVERHEAD:
        raise ConfigurationError(f"max_item_size must be a number of bytes; got {max_item_size!r}")
    driver: Any
    if url is not None:
        cluster = bool(cluster)
        _check_url(store, redis, url, cluster)
        build = aioredis.build_client if asyncio else build_client

        def connect() -> Any:
            return build(url, cluster=cluster, socket_timeout=socket_timeout, connect_timeout=connect_timeout)

        if asyncio:  # a client per event loop, made on first use in each
            driver = aioredis.AsyncRedisDriver(
                connect=connect, cluster=cluster, where=_shown(url), max_item_size=max_item_size
            )
        elif cluster:  # a RedisCluster connects as it is created: on first use
            driver = RedisDriver(connect=connect, cluster=True, where=_shown(url), max_item_size=max_item_size)
        else:
            driver = RedisDriver(connect(), where=_shown(url), max_item_size=max_item_size)
        return driver
    driver = (aioredis.AsyncRedisDriver if asyncio else RedisDriver)(client, max_item_size=max_item_size)
    if cluster is not None and cluster != driver.cluster:
        if asyncio:
            wanted = "a redis.asyncio.cluster.RedisCluster" if cluster else "a redis.asyncio.Redis"
        else:
            wanted = "a redis.cluster.RedisCluster" if cluster else "a redis.Redis"
        raise ConfigurationError(f"{store}(cluster={cluster}) needs {wanted} client; got {type(client).__name__}")
    return driver


class _RedisOptions(KeyValueEngine):
    """The constructor :class:`RedisStore` and :class:`AsyncRedisStore` share (options checked once, here)."""

    #: build the asyncio driver
    _asyncio: ClassVar[bool] = False

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        cluster: bool | None = None,
        polymorphic: bool = False,
        lifetime_cb: LifetimeCallback | None = None,
        prefix: str = "sp",
        namespace: str = "",
        serializer: Serializer | None = None,
        secret: bytes | str | Mapping[int, bytes | str] | None = None,
        signer: Signer | None = None,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.25,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
        cleanup_stale_keys: bool = True,
        tombstone_lifetime: float = 5.0,
        max_lifetime: Any = DEFAULT_MAX_LIFETIME,
        generation_check: float = DEFAULT_GENERATION_CHECK,
    ) -> None:
        if self._asyncio:
            from .drivers.aioredis import import_aioredis

            redis = import_aioredis()
        else:
            redis = import_redis()
        driver = _redis_driver(
            self.store_name,
            redis,
            url=url,
            client=client,
            cluster=cluster,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_item_size=max_item_size,
            asyncio=self._asyncio,
        )
        self.max_item_size = max_item_size
        #: the URL given (``None`` for a client passed in)
        self.url = url
        #: whether the store talks to a Redis Cluster
        self.cluster = driver.cluster
        super().__init__(
            driver,
            polymorphic=polymorphic,
            lifetime_cb=lifetime_cb,
            prefix=prefix,
            namespace=namespace,
            serializer=serializer,
            secret=secret,
            signer=signer,
            cleanup_stale_keys=cleanup_stale_keys,
            tombstone_lifetime=tombstone_lifetime,
            max_lifetime=max_lifetime,
            generation_check=generation_check,
        )

    def redis_key(self, key: Any) -> str:
        """The Redis key of one stockpyle key (see :mod:`stockpyle.stores.kv` for its form)."""
        return self.storage_key(key)


class RedisStore(_RedisOptions, KeyValueStore):
    """A store in Redis or a Redis Cluster, usually a cache layer of a :class:`~stockpyle.ChainedStore`.

    ``RedisStore("redis://127.0.0.1:6379/0")`` creates a thread-safe pooled
    ``redis.Redis`` client; ``RedisStore("redis://node1:7000", cluster=True)``
    a ``redis.cluster.RedisCluster``, which discovers the other nodes.  Both
    get short socket timeouts and no client-side retries (redis-py's default
    retries a frozen server for seconds; the store retries a dropped pooled
    connection once itself).  Alternatively pass a ready ``client=``: a
    ``redis.Redis`` (for example ``Sentinel.master_for(...)``) or a
    ``RedisCluster``.  The constructor never connects: a cluster given by URL
    is contacted on first use.  RESP2 and RESP3 both work (redis-py 5+ speaks
    RESP3 by default).

    Objects are pickled by default.  Anyone who can write to the Redis server
    can make a pickle run code when it is read: in a Redis shared with
    others, pass ``secret=`` (entries are then HMAC-signed and unsigned or
    forged entries are never deserialized) or use
    ``serializer=JSONSerializer()``.

    On a Redis Cluster every key of an object hashes to its own slot, so one
    object's keys usually live on different nodes and are never written
    atomically: each is written on its node, an ``add`` refused or failed on
    one node is undone (deleted) on the others, and a failed ``put`` leaves
    the reachable nodes written and raises.  Replicas are never read.

    :param url: ``redis://[user:password@]host:port/db``, ``rediss://...``
        (TLS) or ``unix:///path/to/socket?db=0``; query-string options are
        passed to redis-py and win over the store's (e.g. ``?protocol=2``).
    :param client: a ``redis.Redis`` or ``redis.cluster.RedisCluster`` to use
        instead of ``url`` (not created with ``decode_responses=True``, and a
        cluster client not reading from replicas).
    :param cluster: ``True`` when ``url`` names a node of a Redis Cluster;
        by default inferred from ``client`` (``False`` for a URL).
    :param socket_timeout: seconds to wait for each response (``url=`` only).
    :param connect_timeout: seconds to wait for a connection (``url=`` only).
    :param max_item_size: the largest value the server accepts, in bytes
        (Redis's ``proto-max-bulk-len``, 512 MiB by default); larger values
        raise :class:`~stockpyle.exceptions.ValueTooLargeError` before
        anything is sent (Redis would drop the connection instead).
    :param tombstone_lifetime: seconds a deleted key keeps a tombstone that
        refuses back-fills (default 5, kept to the millisecond; ``0`` deletes
        plainly).

    The other options -- ``polymorphic``, ``lifetime_cb``, ``prefix``,
    ``namespace``, ``serializer``, ``secret``, ``signer``,
    ``cleanup_stale_keys``, ``max_lifetime`` (one day by default) and
    ``generation_check`` -- are
    the key-value engine's, described in :class:`~stockpyle.stores.kv.KeyValueStore`.

    :raises ConfigurationError: for none or both of ``url``/``client``, both
        ``secret``/``signer``, a malformed URL, a client the store cannot use,
        or other invalid arguments.
    :raises ImportError: without redis-py installed.

    ``store.rejected`` and ``store.conflicts`` count rejected entries and
    versioned writes that gave up after :data:`CAS_ATTEMPTS` conflicts.
    """

    store_name = "RedisStore"

    @property
    def client(self) -> Any:
        """The redis-py client (for a cluster given by URL, building it on first access connects)."""
        return self._redis_driver.client

    @property
    def _redis_driver(self) -> RedisDriver:
        driver = self.driver
        assert isinstance(driver, RedisDriver)
        return driver

    def release(self) -> None:
        """Disconnect the client's pooled connections (also a client passed in with ``client=``).

        The store stays usable: the pools reconnect on the next operation.
        """
        super().release()


class AsyncRedisStore(_RedisOptions, AsyncKeyValueStore):
    """:class:`RedisStore` for asyncio, on ``redis.asyncio``: every operation is a coroutine.

    The constructor is :class:`RedisStore`'s, with the same options and
    checks; ``client=`` takes a ``redis.asyncio.Redis`` or
    ``redis.asyncio.cluster.RedisCluster``.  Keys, entries, scripts and
    leases are the synchronous store's, so a :class:`RedisStore` and an
    :class:`AsyncRedisStore` with the same ``prefix``, ``namespace`` and
    ``secret`` share one cache.

    ``AsyncRedisStore(url)`` keeps one client, and so one connection pool,
    per event loop that uses it (an asyncio connection cannot move between
    loops); a loop's pool is closed by ``await store.release()`` in that
    loop or when the loop shuts down.  A ``client=`` passed in is used only
    in the event loop that first calls the store; another loop gets a
    :class:`~stockpyle.exceptions.ConfigurationError`.

    A cancelled operation leaves no half-read connection behind: redis-py
    disconnects an interrupted connection and the pool reconnects it on its
    next use.  A lease the cancelled task held is released by
    :class:`~stockpyle.stores.achained.AsyncChainedStore`.

    .. versionadded:: 1.0
    """

    store_name = "AsyncRedisStore"
    _asyncio = True

    async def client(self) -> Any:
        """The ``redis.asyncio`` client of the running event loop (made on first use in each loop)."""
        return await self.driver.client()

    async def release(self) -> None:
        """Close the running event loop's connections (a client passed in: disconnect its pool).

        The store stays usable: the next operation reconnects.
        """
        await super().release()
