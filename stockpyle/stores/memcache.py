"""MemcacheStore: objects in memcached, through pymemcache (or a python-memcached-style client).

The store is the key-value engine (:class:`~stockpyle.stores.kv.KeyValueStore`:
key naming, envelopes and signing, stale-key cleanup, add with undo,
version-checked writes, tombstones, lifetime caps) on the pymemcache driver
(:mod:`stockpyle.stores.drivers.pymemcache`).  Its keys have the form
``{prefix}:{namespace}:{ClassName}.{generation}:{digest}`` and its entries are the engine's
envelopes; see :mod:`stockpyle.stores.kv` for both.  :class:`AsyncMemcacheStore`
is the same engine driven with ``await``, on stockpyle's own asyncio memcached
client (:mod:`stockpyle.stores.drivers.aiomemcache`) for ``servers=``, or on
the synchronous driver in worker threads for ``driver="pylibmc"`` and a
``client=`` passed in.

memcached specifics: lifetimes are whole seconds (rounded up; above 30 days
they are sent as absolute unix times, as memcached requires), tombstones live
at least 2 seconds because memcached's clock ticks once a second, and values
larger than the servers' item size (``-I``, 1 MiB by default) are refused
before anything is sent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..exceptions import ConfigurationError
from ..lifetimes import MEMCACHE_RELATIVE_LIMIT, LifetimeCallback
from ..serializers import Serializer, Signer
from .drivers.pylibmc import PylibmcDriver
from .drivers.pymemcache import (
    DEFAULT_MAX_ITEM_SIZE,
    INSTALL_HINT,
    PymemcacheDriver,
    build_client,
    normalize_servers,
)
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
    "DRIVERS",
    "INSTALL_HINT",
    "AsyncMemcacheStore",
    "MemcacheStore",
]

#: the values of ``MemcacheStore(driver=...)``
DRIVERS = ("pymemcache", "pylibmc")


def _server_names(servers: Sequence[str | tuple[str, int]] | str) -> list[str]:
    """``host:port`` names for the pylibmc driver (which needs no pymemcache to parse them)."""
    if isinstance(servers, str):
        servers = [servers]
    names = []
    for server in servers:
        if isinstance(server, tuple) and len(server) == 2 and isinstance(server[0], str) and isinstance(server[1], int):
            names.append(f"{server[0]}:{server[1]}")
        elif isinstance(server, str) and server.rpartition(":")[2].isdigit() and server.rpartition(":")[0]:
            names.append(server)
        else:
            raise ConfigurationError(
                f"MemcacheStore servers must be 'host:port' strings or (host, port) tuples; got {server!r}"
            )
    if not names:
        raise ConfigurationError("MemcacheStore(servers=...) needs at least one 'host:port'")
    return names


class _MemcacheOptions(KeyValueEngine):
    """The constructor :class:`MemcacheStore` and :class:`AsyncMemcacheStore` share (options checked once, here)."""

    store_name = "MemcacheStore"
    #: run the driver's calls in threads, for asyncio
    _asyncio: ClassVar[bool] = False

    def __init__(
        self,
        servers: Sequence[str | tuple[str, int]] | str | None = None,
        *,
        client: Any = None,
        polymorphic: bool = False,
        lifetime_cb: LifetimeCallback | None = None,
        prefix: str = "sp",
        namespace: str = "",
        serializer: Serializer | None = None,
        secret: bytes | str | Mapping[int, bytes | str] | None = None,
        signer: Signer | None = None,
        connect_timeout: float = 0.25,
        timeout: float = 0.5,
        max_pool_size: int | None = None,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
        driver: str = "pymemcache",
        cleanup_stale_keys: bool = True,
        tombstone_lifetime: float = 5.0,
        max_lifetime: Any = DEFAULT_MAX_LIFETIME,
        generation_check: float = DEFAULT_GENERATION_CHECK,
    ) -> None:
        if (servers is None) == (client is None):
            raise ConfigurationError(
                "MemcacheStore needs exactly one of servers=['host:port', ...] or client=<memcached client>"
            )
        for name, value in (("connect_timeout", connect_timeout), ("timeout", timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(f"MemcacheStore {name} must be a positive number of seconds; got {value!r}")
        if isinstance(max_item_size, bool) or not isinstance(max_item_size, int) or max_item_size <= ITEM_OVERHEAD:
            raise ConfigurationError(f"max_item_size must be a number of bytes; got {max_item_size!r}")
        self.max_item_size = max_item_size
        if driver not in DRIVERS:
            choices = ", ".join(map(repr, DRIVERS))
            raise ConfigurationError(f"MemcacheStore driver must be one of {choices}; got {driver!r}")
        if driver == "pylibmc" and client is not None:
            raise ConfigurationError(
                "MemcacheStore(driver='pylibmc') builds its own clients: pass servers=, not client="
            )
        if max_pool_size is not None and (
            isinstance(max_pool_size, bool) or not isinstance(max_pool_size, int) or max_pool_size < 1
        ):
            raise ConfigurationError(f"max_pool_size must be a positive number of connections; got {max_pool_size!r}")
        #: the ``host:port`` names (``None`` for a client passed in)
        self.servers: list[str] | None = None
        #: the driver's name: ``"pymemcache"`` or ``"pylibmc"``
        self.driver_name = driver
        kv_driver: PymemcacheDriver | PylibmcDriver
        engine_driver: Any = None
        if driver == "pylibmc":
            self.servers = _server_names(servers)  # type: ignore[arg-type]
            kv_driver = PylibmcDriver(
                self.servers,
                connect_timeout=connect_timeout,
                timeout=timeout,
                max_pool_size=max_pool_size,
                max_item_size=max_item_size,
            )
        else:
            if servers is not None:
                specs = normalize_servers(servers)
                self.servers = [s if isinstance(s, str) else f"{s[0]}:{s[1]}" for s in specs]
                if self._asyncio:
                    # the native asyncio client (asyncio is imported only by asyncio stores)
                    from .drivers.aiomemcache import AsyncMemcacheDriver

                    engine_driver = AsyncMemcacheDriver(
                        specs,
                        connect_timeout=connect_timeout,
                        timeout=timeout,
                        max_pool_size=max_pool_size,
                        max_item_size=max_item_size,
                    )
                else:
                    client = build_client(
                        specs, connect_timeout=connect_timeout, timeout=timeout, max_pool_size=max_pool_size
                    )
            if engine_driver is None:
                kv_driver = PymemcacheDriver(client, servers=self.servers, max_item_size=max_item_size)
        #: the memcached client (pymemcache; ``None`` with the pylibmc driver, which pools its own per server, and
        #: with :class:`AsyncMemcacheStore`'s own asyncio driver)
        self.client = client
        if engine_driver is None:
            engine_driver = kv_driver
            if self._asyncio:  # pylibmc, or a synchronous client passed in: its calls run in threads
                from .drivers.threaded import ThreadedDriver  # asyncio is imported only by asyncio stores

                engine_driver = ThreadedDriver(kv_driver)
        super().__init__(
            engine_driver,
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
            tombstone_limit=MEMCACHE_RELATIVE_LIMIT,
        )

    def memcache_key(self, key: Any) -> str:
        """The memcached key of one stockpyle key (see :mod:`stockpyle.stores.kv` for its form)."""
        return self.storage_key(key)


class MemcacheStore(_MemcacheOptions, KeyValueStore):
    """A store in memcached, usually a cache layer of a :class:`~stockpyle.ChainedStore`.

    ``MemcacheStore(servers=["127.0.0.1:11211"])`` creates a thread-safe
    pooled pymemcache client; several servers are combined with rendezvous
    (consistent) hashing, one connection pool per server, and a server that is
    down keeps its keys (they fail) rather than handing them to another server
    that would serve them stale when it returns.  Alternatively pass a ready
    ``client=``: a pymemcache ``Client``, ``PooledClient`` or ``HashClient``,
    or a python-memcached-style client.  The constructor never connects.

    Objects are pickled by default.  Anyone who can write to the memcached
    servers can make a pickle run code when it is read: in a cache shared
    with others, pass ``secret=`` (entries are then HMAC-signed and unsigned or
    forged entries are never deserialized) or use
    ``serializer=JSONSerializer()``.

    :param servers: ``"host:port"`` strings (or ``(host, port)`` tuples).
    :param client: a memcached client to use instead of ``servers``.
    :param polymorphic: also index objects under their storable base classes.
    :param lifetime_cb: ``obj -> lifetime`` in this store.
    :param prefix: first part of every memcached key (default ``"sp"``).
    :param namespace: second part, e.g. a code or schema version: stores with
        different namespaces never see each other's entries.
    :param serializer: a :class:`~stockpyle.serializers.Serializer`
        (default :class:`~stockpyle.serializers.PickleSerializer`).
    :param secret: sign entries with HMAC-SHA256 under this secret (``bytes``,
        ``str`` or a ``{key_id: secret}`` keyring, see
        :class:`~stockpyle.serializers.HMACSigner`).
    :param signer: a ready :class:`~stockpyle.serializers.Signer` instead of ``secret``.
    :param connect_timeout: seconds to wait for a connection (``servers=`` only).
    :param timeout: seconds to wait for each response (``servers=`` only).
    :param max_pool_size: connections per server (``servers=`` only; default unbounded;
        :class:`AsyncMemcacheStore`: per server and event loop, default 32).
    :param max_item_size: the servers' largest item (memcached ``-I``, 1 MiB by
        default); larger values raise :class:`~stockpyle.exceptions.ValueTooLargeError`
        before anything is sent.
    :param cleanup_stale_keys: on ``put``/``delete``, read the entries under the
        object's keys first and delete the keys they recorded that the object
        no longer has (one extra round trip, skipped for objects with a single
        key).  Turn off only if key attributes never change.
    :param tombstone_lifetime: seconds a deleted key keeps a tombstone that
        refuses back-fills (``add``), so a reader racing the delete cannot put
        the old object back (default 5; rounded up to whole seconds, at least
        2 because memcached's clock ticks once a second).  ``0`` deletes
        plainly (no protection against that race).
    :param max_lifetime: cap on the lifetime of every entry: objects whose
        lifetime is longer, or unset ("never expires"), get this one
        (default one day).  It bounds how long an entry can stay stale when an
        invalidation could not reach memcached.  ``None`` lets entries without
        a lifetime live until evicted.
    :param generation_check: seconds between two checks of the generations of
        the classes this store uses (see :meth:`invalidate_class`): how long
        another process's class-wide invalidation can take to reach this one.
    :param driver: the client library for ``servers=``: ``"pymemcache"`` (the
        default) or ``"pylibmc"`` (:mod:`stockpyle.stores.drivers.pylibmc`;
        C, faster, no leases; never mix the two drivers in one fleet of
        several servers, which the drivers check).
    :raises ConfigurationError: for none or both of ``servers``/``client``, both
        ``secret``/``signer``, or other invalid arguments.
    :raises ImportError: for ``servers=`` without pymemcache installed (or
        pylibmc, with ``driver="pylibmc"``).

    :ivar rejected: number of entries that failed verification or could not
        be decoded; each was treated as a miss and deleted.
    :ivar conflicts: version-checked writes that kept conflicting with other
        writers for :data:`CAS_ATTEMPTS` attempts and invalidated the object's
        keys instead.
    """

    store_name = "MemcacheStore"

    def release(self) -> None:
        """Close the client's connections (also a client passed in with ``client=``).

        The store stays usable: pymemcache reconnects on the next operation.
        """
        super().release()


class AsyncMemcacheStore(_MemcacheOptions, AsyncKeyValueStore):
    """:class:`MemcacheStore` for asyncio: every operation is a coroutine.

    The constructor is :class:`MemcacheStore`'s, with the same options and
    checks (``driver="pymemcache"`` or ``"pylibmc"``), and so are the keys,
    the entries, the placement of keys on the servers and the leases: a
    :class:`MemcacheStore` and an :class:`AsyncMemcacheStore` with the same
    servers, ``prefix``, ``namespace`` and ``secret`` share one cache.

    With ``servers=`` (and the default ``driver="pymemcache"``) the driver is
    stockpyle's own asyncio memcached client,
    :class:`~stockpyle.stores.drivers.aiomemcache.AsyncMemcacheDriver`: a
    pool of asyncio streams per server and per event loop (``max_pool_size``
    per server and loop, :data:`~stockpyle.stores.drivers.aiomemcache.DEFAULT_POOL_SIZE`
    when not given; a caller past it waits up to ``timeout``), the
    synchronous driver's commands, pinned placement and leases,
    ``connect_timeout`` on every connect and ``timeout`` on every exchange,
    and a cancelled or timed-out call closes its connection instead of
    pooling it with a reply unread.  No client from the package index was
    chosen: aiomcache 0.8 has no socket timeouts, fetches tokens one key at a
    time, and returns a cancelled call's connection to its pool with the
    reply still unread.

    With ``driver="pylibmc"`` or a synchronous ``client=``, the synchronous
    driver runs in worker threads
    (:class:`~stockpyle.stores.drivers.threaded.ThreadedDriver`): the event
    loop never waits for memcached, at the cost of a thread hand-off per call
    (tens of microseconds); a cancelled call stops waiting at once and its
    thread finishes the call, so the connection goes back to the pool clean.
    Either way, a lease the cancelled task held is released by
    :class:`~stockpyle.stores.achained.AsyncChainedStore`.

    .. versionadded:: 1.0
    """

    store_name = "AsyncMemcacheStore"
    _asyncio = True
