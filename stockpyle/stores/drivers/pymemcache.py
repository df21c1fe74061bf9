"""The memcached driver on pymemcache (and python-memcached-style clients).

:func:`build_client` makes the client :class:`~stockpyle.stores.MemcacheStore`
uses for ``servers=[...]``: a thread-safe ``PooledClient`` for one server, or a
``HashClient`` with one pool per server and *pinned* rendezvous hashing for
several (see :class:`PinnedRendezvousHash`).  :class:`PymemcacheDriver` adapts
that client, or one passed in, to :class:`~stockpyle.stores.drivers.KVDriver`
and :class:`~stockpyle.stores.drivers.LeaseDriver`.

Leases use memcached's meta commands (:mod:`~stockpyle.stores.drivers.memcache_meta`)
over pymemcache's own pooled connections, on the server the key's entry
lives on:

* ``lease_get``: ``mg <key> v c N<lease>``.  A hit is returned as it is; on
  a miss memcached creates an empty stub under the key and answers ``W`` to
  exactly one caller (:attr:`~stockpyle.stores.drivers.LeaseStatus.WON`)
  and ``Z`` to the others (``LOST``).  A value marked stale (``X``) is
  returned with ``W`` to one caller, who refreshes it, and with ``Z`` to the others.
* ``lease_fill``: ``ms <key> <size> T<ttl> C<cas>`` with the stub's
  compare-and-set token: any write to the key since (a set, a delete, a
  tombstone, ``mark_stale``, an expiry and a new stub) changed or removed
  it, and the fill answers ``EX``/``NF``.
* ``lease_release``: ``md <key> C<cas>`` removes the stub if it is still
  the one won; on a stale value, ``md <key> I C<cas>`` marks it stale again
  so that the next reader wins the refresh.
* ``mark_stale``: ``md <key> I T<ttl>`` for each key, pipelined per server.
* ``lease_get(..., recache=N)``: ``mg <key> v c t N<lease> R<N>``: of the
  readers of a value whose remaining TTL is below ``N`` seconds, exactly one
  gets ``W`` (it refreshes), the others ``Z`` with the value.  The winner then
  cuts the item's TTL to the lease (``mg <key> T<lease>``): memcached keeps
  the "won" flag until the item is replaced or expires, so a refresher that
  dies blocks the refresh for one lease at most.

Meta support is detected per server at first use (an ``mn``; later an
``mg`` answered with ``ERROR`` counts too).  A server without meta commands
(memcached before 1.6, some proxies) gets the fallback, logged once as a
warning: the lease is an empty value ``add``-ed under the entry's key, read
back with ``gets`` for its token and filled with ``cas``, so a writer's
delete or set in between still makes the fill fail; ``mark_stale`` then
deletes the keys (such servers cannot keep stale values), and ``recache``
elects nobody (a value is a hit until it expires).  Clients that are
not pymemcache's (python-memcached style) offer no leases.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

from ...errors import ErrorRule, ErrorTable
from ...exceptions import ConfigurationError, StoreError, StoreUnavailableError, ValueTooLargeError
from ...lifetimes import memcache_expire
from . import LeaseRead, LeaseStatus
from .memcache_meta import MetaParser, MetaProtocolError, MetaResponse, meta_delete, meta_get, meta_noop, meta_set

__all__ = [
    "DEFAULT_MAX_ITEM_SIZE",
    "INSTALL_HINT",
    "MemcacheLease",
    "PLACEMENT_KEY",
    "PLACEMENT_SCHEME",
    "PinnedRendezvousHash",
    "PymemcacheDriver",
    "as_lease",
    "build_client",
    "check_fill_ttl",
    "check_lease_ttl",
    "check_placement",
    "error_table",
    "import_pymemcache",
    "lease_get_flags",
    "lease_read",
    "refresh_cut",
]

INSTALL_HINT: Final = "MemcacheStore requires pymemcache: pip install stockpyle[memcache]"

#: memcached's default largest item (``-I 1m``).
DEFAULT_MAX_ITEM_SIZE: Final = 1024 * 1024

log = logging.getLogger("stockpyle.memcache")

#: the key under which every server of a fleet of two or more records the placement scheme it is used with
PLACEMENT_KEY: Final = "stockpyle:placement"
#: this driver's placement scheme for the fleets :func:`build_client` makes (the value under :data:`PLACEMENT_KEY`)
PLACEMENT_SCHEME: Final = b"pymemcache/rendezvous-murmur3/1"
#: how long a placement marker lives; every process renews it at first use of the server
PLACEMENT_TTL: Final = 30 * 24 * 3600


def check_placement(found: bytes | None, scheme: bytes, server: str) -> None:
    """Refuse a server that carries another driver's placement scheme.

    Drivers place keys over several servers differently (pymemcache:
    rendezvous hashing, pylibmc: a hash ring): a fleet used through both
    would have each look for the same key on a different server and serve
    stale entries.  Each driver records its scheme on every server of a
    fleet of two or more at first use and checks what it finds with this.

    :param found: the value under :data:`PLACEMENT_KEY` on ``server`` (``None``: unmarked).
    :raises ConfigurationError: when ``found`` is another scheme.
    """
    if found is not None and found != scheme:
        raise ConfigurationError(
            f"memcached at {server} is used by a fleet placed with {found.decode('ascii', 'replace')!r}, this store"
            f" places keys with {scheme.decode('ascii')!r}: never mix memcached drivers (pymemcache, pylibmc) in one"
            f" fleet of several servers, each would look for the same key on a different server"
        )


# bytes asked of the socket per read (more when a value's remaining size is known)
_RECV_SIZE: Final = 65536
_LOST: Final = LeaseRead(LeaseStatus.LOST)


class MemcacheLease(NamedTuple):
    """The token of a memcached lease (opaque to callers: pass it back to the driver).

    :ivar cas: the compare-and-set token of the stub (or of the stale value) won.
    :ivar stale: the lease was won on a stale value, which a release keeps
        (marked stale again) instead of deleting.
    """

    cas: bytes
    stale: bool = False
    #: the lease was won on a present value (``recache``): a release leaves it
    #: to expire at the end of the lease, which ``lease_get`` cut its lifetime to
    refresh: bool = False


def import_pymemcache() -> Any:
    """Import pymemcache, or raise an ImportError that names the extra to install."""
    try:
        import pymemcache
        import pymemcache.client.base
        import pymemcache.client.hash
        import pymemcache.exceptions
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return pymemcache


def _too_large(exc: BaseException) -> bool:
    return "too large" in str(exc).lower()


_TABLES: dict[bool, ErrorTable] = {}


def _pool_exhausted(exc: BaseException) -> bool:
    return "Too many objects" in str(exc)  # pymemcache.pool.ObjectPool's message (4.0)


def error_table() -> ErrorTable:
    """How pymemcache and socket errors map into the stockpyle tree (pymemcache installed or not)."""
    installed = True
    try:
        exceptions = import_pymemcache().exceptions
    except ImportError:
        installed = False
    table = _TABLES.get(installed)
    if table is not None:
        return table
    closed: tuple[type[BaseException], ...] = (ConnectionResetError, BrokenPipeError)
    garbled = ErrorRule(MetaProtocolError, StoreError)  # the connection was out of step (and is closed)
    rules = [ErrorRule(OSError, StoreUnavailableError), garbled]
    if installed:
        closed = (*closed, exceptions.MemcacheUnexpectedCloseError)
        rules = [
            # a closed connection is a MemcacheServerError too: it comes first
            ErrorRule((OSError, exceptions.MemcacheUnexpectedCloseError), StoreUnavailableError),
            ErrorRule(
                exceptions.MemcacheServerError,
                ValueTooLargeError,
                when=_too_large,
                message="the server refused a value as too large",
            ),
            ErrorRule(exceptions.MemcacheError, StoreError),
            garbled,
            # pymemcache's pool does not wait for a connection: past max_pool_size it raises
            ErrorRule(
                RuntimeError,
                StoreUnavailableError,
                when=_pool_exhausted,
                message="every pooled connection (max_pool_size) is in use",
            ),
        ]
    table = _TABLES[installed] = ErrorTable("memcached", rules, retry=closed)
    return table


class PinnedRendezvousHash:
    """Rendezvous hashing whose node set never shrinks.

    pymemcache's HashClient removes a node it considers dead, which sends that
    node's keys to other servers; when the node comes back, readers see the
    entries it held before the outage (stale reads).  Pinning the node set
    keeps every key on its own server: while that server is down its keys fail
    (:class:`~stockpyle.exceptions.StoreUnavailableError`) instead of moving.
    """

    def __init__(self) -> None:
        from pymemcache.client.rendezvous import RendezvousHash

        self._hash = RendezvousHash()

    @property
    def nodes(self) -> list[Any]:
        return self._hash.nodes  # type: ignore[no-any-return]

    def add_node(self, node: Any) -> None:
        self._hash.add_node(node)  # idempotent

    def remove_node(self, node: Any) -> None:
        """Deliberately a no-op: see the class docstring."""

    def get_node(self, key: Any) -> Any:
        return self._hash.get_node(key)


def normalize_servers(servers: Sequence[str | tuple[str, int]] | str) -> list[Any]:
    """pymemcache server specs for ``servers``.

    :raises ConfigurationError: for a malformed entry or an empty list.
    """
    pymemcache = import_pymemcache()
    if isinstance(servers, str):
        servers = [servers]
    specs = []
    for server in servers:
        try:
            specs.append(pymemcache.client.base.normalize_server_spec(server))
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"MemcacheStore servers must be 'host:port' strings or (host, port) tuples; got {server!r}"
            ) from None
    if not specs:
        raise ConfigurationError("MemcacheStore(servers=...) needs at least one 'host:port'")
    return specs


def build_client(specs: list[Any], *, connect_timeout: float, timeout: float, max_pool_size: int | None) -> Any:
    """The client for ``servers=``: pooled, acknowledged, TCP_NODELAY, pinned hashing for several servers."""
    pymemcache = import_pymemcache()
    options: dict[str, Any] = {
        "connect_timeout": connect_timeout,
        "timeout": timeout,
        # Without TCP_NODELAY a set followed by a get waits ~40 ms for
        # delayed ACKs (Nagle); memcached traffic is small request/response.
        "no_delay": True,
        # Acknowledged writes, so a refused or failed write raises.
        "default_noreply": False,
        "max_pool_size": max_pool_size,
    }
    if len(specs) == 1:
        return pymemcache.client.base.PooledClient(specs[0], **options)
    return pymemcache.client.hash.HashClient(
        specs,
        hasher=PinnedRendezvousHash,
        use_pooling=True,
        # fail fast and never mark servers dead: errors reach the store
        retry_attempts=0,
        **options,
    )


def _is_hash_client(client: Any) -> bool:
    return callable(getattr(getattr(client, "hasher", None), "get_node", None)) and isinstance(
        getattr(client, "clients", None), dict
    )


def _is_legacy_client(client: Any) -> bool:
    return all(callable(getattr(client, name, None)) for name in ("get", "get_multi", "set_multi", "delete_multi"))


def _is_pymemcache_like(client: Any) -> bool:
    return all(callable(getattr(client, name, None)) for name in ("get", "get_many", "set_many", "delete_many"))


def _has_pool(node: Any) -> bool:
    """Whether ``node`` is a ``PooledClient``-like client whose pool lends raw connections."""
    pool = getattr(node, "client_pool", None)
    return all(callable(getattr(pool, name, None)) for name in ("get", "release", "destroy"))


def _is_connection(node: Any) -> bool:
    """Whether ``node`` is a pymemcache ``Client``: one connection (``sock``) that connects itself."""
    return hasattr(node, "sock") and all(callable(getattr(node, name, None)) for name in ("_connect", "close"))


def _server_name(node: Any) -> str:
    server = getattr(node, "server", None)
    if isinstance(server, tuple) and len(server) == 2:
        return f"{server[0]}:{server[1]}"
    return str(server) if server is not None else type(node).__name__


def check_lease_ttl(lease_ttl: Any) -> int:
    """A lease's lifetime as memcached takes it (whole seconds from ``driver.ttl()``, at least 1).

    :raises ValueError: for anything else.
    """
    if type(lease_ttl) is not int or lease_ttl < 1:
        raise ValueError(
            f"a memcached lease lifetime must be a positive whole number of seconds (from driver.ttl()); got"
            f" {lease_ttl!r}"
        )
    return lease_ttl


def check_fill_ttl(ttl: Any) -> int:
    """A fill's lifetime as memcached takes it (whole seconds from ``driver.ttl()``, 0: none).

    :raises ValueError: for anything else.
    """
    if type(ttl) is not int or ttl < 0:
        raise ValueError(f"a memcached lifetime must be a whole number of seconds (from driver.ttl()); got {ttl!r}")
    return ttl


def as_lease(token: Any) -> MemcacheLease:
    """The token, checked to be the :class:`MemcacheLease` that ``lease_get`` returned.

    :raises TypeError: for anything else.
    """
    if not isinstance(token, MemcacheLease):
        raise TypeError(f"expected the MemcacheLease token lease_get returned; got {type(token).__name__}")
    return token


def lease_get_flags(ttl: int, recache: Hashable | None) -> bytes:
    """The ``mg`` flags of a lease read: ``N<ttl>``, and with ``recache`` one refresher of a present value.

    ``R<recache>``: one caller wins the refresh of a value whose remaining
    lifetime is below ``recache`` seconds (``t`` returns that lifetime, for
    :func:`refresh_cut`).
    """
    return b"v c N%d" % ttl if recache is None else b"v c t N%d R%d" % (ttl, check_lease_ttl(recache))


def refresh_cut(read: LeaseRead, response: MetaResponse, ttl: int) -> bytes | None:
    """The ``mg`` flags that cut a value whose refresh ``read`` won to ``ttl`` seconds, or None when none is needed.

    memcached keeps the "won" flag on the item until it is replaced or
    expires: a refresher that dies would otherwise leave every later reader
    told "someone refreshes" until the item's end.  The cut makes the item
    expire when the lease would have; the next reader then wins the miss.
    """
    if not (read.won and read.value and not read.stale):
        return None
    remaining = response.flags.get("t", b"-1")
    if remaining == b"-1" or not remaining.lstrip(b"-").isdigit() or int(remaining) > ttl:
        return b"T%d" % ttl
    return None


def lease_read(response: MetaResponse) -> LeaseRead:
    """What an ``mg <key> v c N<ttl>`` answer means."""
    if response.status != "VA":
        if response.status == "EN":
            # the stub could not be created (the server is out of memory): nobody holds a lease,
            # but none can be had either; the caller waits or loads as its policy says
            return _LOST
        raise MetaProtocolError(f"unexpected {response.status} answer to a lease read")
    flags = response.flags
    value = response.value
    cas = flags.get("c")
    if cas is None:
        raise MetaProtocolError("a lease read was answered without the cas token it asked for")
    if "W" in flags:
        if value and "X" in flags:
            return LeaseRead(LeaseStatus.WON, value, True, MemcacheLease(cas, True), cas)
        if value:  # R<recache>: this caller refreshes a present value
            return LeaseRead(LeaseStatus.WON, value, False, MemcacheLease(cas, False, True), cas)
        return LeaseRead(LeaseStatus.WON, None, False, MemcacheLease(cas, False))
    if not value:
        return _LOST  # another client's stub
    if "X" in flags:
        return LeaseRead(LeaseStatus.LOST, value, True, None, cas)
    return LeaseRead(LeaseStatus.HIT, value, False, None, cas)


class PymemcacheDriver:
    """memcached through a pymemcache ``Client``/``PooledClient``/``HashClient`` or a python-memcached-style client.

    A ``HashClient``'s keys are routed to its per-server clients directly:
    that gives one round trip per server for every multi-key operation (its
    own ``delete_many`` deletes key by key) and skips its dead-server
    bookkeeping, which would silently turn failures into misses and dropped
    writes.

    :param client: the client.
    :param servers: the ``host:port`` names, for messages (``None`` for a client passed in).
    :param max_item_size: the servers' largest item (memcached ``-I``).
    :raises ConfigurationError: for an object that is no memcached client.
    """

    backend = "memcached"
    min_lifetime = 2.0

    def __init__(self, client: Any, *, servers: list[str] | None = None, max_item_size: int = DEFAULT_MAX_ITEM_SIZE):
        self.client = client
        self.servers = servers
        self.max_item_size: int | None = max_item_size
        self.errors = error_table()
        self._retry = self.errors.retry
        self._legacy = False
        # nodes whose placement marker is still to be checked (fleets of several servers from servers= only)
        self._unplaced: set[int] = set()
        if _is_hash_client(client):
            self._nodes = list(client.clients.values())
            self._hasher = client.hasher
            self._by_name = client.clients
            if servers is not None and len(servers) > 1 and isinstance(client.hasher, PinnedRendezvousHash):
                self._unplaced = {id(node) for node in self._nodes}
        elif _is_pymemcache_like(client):
            self._nodes = [client]
            self._hasher = None
        elif _is_legacy_client(client):
            self._nodes = [client]
            self._hasher = None
            self._legacy = True
        else:
            raise ConfigurationError(
                f"MemcacheStore(client=...) needs a pymemcache Client/PooledClient/HashClient or a python-memcached-"
                f"style client with get, get_multi, set_multi and delete_multi; got {type(client).__name__}"
            )
        first = self._nodes[0] if self._nodes else None
        self.can_add = callable(getattr(first, "add", None))
        # python-memcached's gets/cas need cache_cas=True and keep per-client
        # state; version-checked writes are offered on pymemcache clients only
        self.can_cas = (
            not self._legacy and callable(getattr(first, "gets_many", None)) and callable(getattr(first, "cas", None))
        )
        # leases need gets/add/cas (the fallback) on pymemcache clients; meta commands also need raw connections
        self.can_lease = self.can_cas and self.can_add and callable(getattr(first, "gets", None))
        # refreshers are elected with mg's R flag (servers without meta commands elect none, see lease_get)
        self.can_recache = self.can_lease
        exceptions = import_pymemcache().exceptions if self.can_lease else None
        self._closed_error: type[Exception] = exceptions.MemcacheUnexpectedCloseError if exceptions else OSError
        self._unknown_command: type[Exception] = exceptions.MemcacheUnknownCommandError if exceptions else OSError
        self._client_error: type[Exception] = exceptions.MemcacheClientError if exceptions else OSError
        self._server_error: type[Exception] = exceptions.MemcacheServerError if exceptions else OSError
        # id(node) -> whether that server speaks meta commands (absent: not asked yet)
        self._meta: dict[int, bool] = {}
        self._key_parts: dict[int, tuple[bytes, str]] = {}
        self._meta_lock = threading.Lock()

    def describe(self) -> str:
        return ", ".join(self.servers) if self.servers else type(self.client).__name__

    def __repr__(self) -> str:
        return f"<PymemcacheDriver {self.describe()}>"

    @staticmethod
    def ttl(seconds: float | None) -> int:
        # memcached reads exptimes above 30 days as absolute unix times
        expire = memcache_expire(seconds)
        return 1 if expire is None else expire

    # -- routing and retries ----------------------------------------------

    def _node(self, key: str) -> Any:
        if self._hasher is None:
            return self.client
        name = self._hasher.get_node(key)
        if name is None:
            raise StoreUnavailableError("no memcached servers configured in the HashClient")
        node = self._by_name[name]
        if self._unplaced and id(node) in self._unplaced:
            self._check_placement(node)
        return node

    def _check_placement(self, node: Any) -> None:
        """Mark every server of the fleet with this driver's placement scheme, or refuse one that carries another.

        Called at the first use of ``node``; all servers are checked at once,
        so that a fleet another driver marked on one server only is refused
        whichever server this store touches first.  A server that does not
        answer is checked again at its next use (the operation itself then
        fails as it would have).
        """
        for other in self._nodes:
            if id(other) not in self._unplaced:
                continue
            try:
                other.add(PLACEMENT_KEY, PLACEMENT_SCHEME, expire=PLACEMENT_TTL, noreply=False)
                found = other.get(PLACEMENT_KEY)
            except Exception:  # noqa: BLE001 - the operation on this server reports the failure
                continue
            check_placement(found, PLACEMENT_SCHEME, _server_name(other))
            self._unplaced.discard(id(other))

    def _route(self, keys: Iterable[str]) -> list[tuple[Any, list[str]]]:
        if self._hasher is None:
            return [(self.client, list(keys))]
        get_node = self._hasher.get_node
        groups: dict[Any, list[str]] = {}
        for key in keys:
            name = get_node(key)
            if name is None:
                raise StoreUnavailableError("no memcached servers configured in the HashClient")
            groups.setdefault(name, []).append(key)
        routed = [(self._by_name[name], group) for name, group in groups.items()]
        if self._unplaced:
            for node, _group in routed:
                if id(node) in self._unplaced:
                    self._check_placement(node)
        return routed

    def _once_more(self, fn: Callable[..., Any], *args: Any) -> Any:
        # A pooled connection to a server that restarted fails on first use;
        # every memcached operation here is safe to repeat.
        try:
            return fn(*args)
        except self._retry:
            return fn(*args)

    def _each(self, keys: Iterable[str], fn: Callable[[Any, list[str]], Any]) -> list[tuple[list[str], Any]]:
        """``fn(node, keys)`` once per server; every server is tried before the first failure is raised."""
        results = []
        first: BaseException | None = None
        for node, group in self._route(keys):
            try:
                results.append((group, self._once_more(fn, node, group)))
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other servers
                first = first or exc
        if first is not None:
            raise first
        return results

    # -- KVDriver -----------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        node = self._node(key)
        try:
            return node.get(key)  # type: ignore[no-any-return]
        except self._retry:
            return node.get(key)  # type: ignore[no-any-return]

    def _get_group(self, node: Any, keys: list[str]) -> Mapping[str, bytes]:
        return node.get_multi(keys) if self._legacy else node.get_many(keys)  # type: ignore[no-any-return]

    def get_many(self, keys: Sequence[str]) -> Mapping[str, bytes]:
        if not keys:
            return {}
        if self._hasher is None:  # one server: no routing, its answer as it is
            return self._once_more(self._get_group, self.client, list(keys))  # type: ignore[no-any-return]
        found: dict[str, bytes] = {}
        for _group, result in self._each(keys, self._get_group):
            found.update(result)
        return found

    def set_many(self, items: Mapping[str, bytes], ttl: Hashable) -> None:
        if len(items) == 1 and not self._legacy:
            # one key (the most common write): a plain set on its server, without the multi-key result list
            ((key, value),) = items.items()
            node = self.client if self._hasher is None else self._node(key)
            try:  # (_once_more inline, as in get: a frame less on every put)
                stored = node.set(key, value, ttl, False)
            except self._retry:
                stored = node.set(key, value, ttl, False)
            if not stored:
                raise StoreError("memcached did not store 1 of 1 keys")
            return

        def write(node: Any, group: list[str] | None) -> list[str]:
            values = items if group is None else {k: items[k] for k in group}
            if self._legacy:
                return list(node.set_multi(values, ttl) or ())
            return node.set_many(values, expire=ttl, noreply=False)  # type: ignore[no-any-return]

        if self._hasher is None:  # one server: every item goes to it, unrouted
            failed = self._once_more(write, self.client, None)
        else:
            failed = [key for _group, result in self._each(items, write) for key in result]
        if failed:
            raise StoreError(f"memcached did not store {len(failed)} of {len(items)} keys")

    def _add_group(self, node: Any, values: dict[str, bytes], expire: Hashable) -> dict[str, bool]:
        """``add`` every key in one round trip; returns which keys were stored.

        pymemcache has no public multi-key ``add``, but its ``set_many`` is a
        pipelined ``_store_cmd(b"set", ...)``; the same private method sends
        ``add`` commands (pymemcache 4.x, pinned in the ``memcache`` extra).
        Any other client falls back to one ``add`` per key.
        """
        store = getattr(node, "_store_cmd", None)
        if callable(store):
            return {key: bool(done) for key, done in store(b"add", values, expire, False).items()}
        pool = getattr(node, "client_pool", None)
        if pool is not None and callable(getattr(pool, "get_and_release", None)):
            with pool.get_and_release(destroy_on_fail=True) as client:
                if callable(getattr(client, "_store_cmd", None)):
                    results = client._store_cmd(b"add", values, expire, False)
                    return {key: bool(done) for key, done in results.items()}
        if self._legacy:
            return {key: bool(node.add(key, value, expire)) for key, value in values.items()}
        return {key: bool(node.add(key, value, expire=expire, noreply=False)) for key, value in values.items()}

    def add_many(self, items: Mapping[str, bytes], ttl: Hashable) -> tuple[set[str], BaseException | None]:
        stored: set[str] = set()
        first: BaseException | None = None
        for node, group in self._route(items):
            try:
                result = self._once_more(self._add_group, node, {k: items[k] for k in group}, ttl)
            except Exception as exc:  # noqa: BLE001 - returned to the engine, which undoes the rest
                first = first or exc
                continue
            stored.update(key for key, done in result.items() if done)
        return stored, first

    def delete_many(self, keys: Sequence[str]) -> None:
        def delete(node: Any, group: list[str]) -> None:
            if self._legacy:
                # python-memcached answers 1 on success and 0 when a server failed
                if node.delete_multi(group) in (0, False):
                    raise StoreUnavailableError(f"memcached did not acknowledge deleting {len(group)} keys")
            else:
                node.delete_many(group, noreply=False)

        if keys:
            self._each(keys, delete)

    def touch_many(self, keys: Sequence[str], ttl: Hashable) -> None:
        def touch(node: Any, group: list[str]) -> None:
            for key in group:  # memcached has no multi-key touch
                if self._legacy:
                    node.touch(key, ttl)
                else:
                    node.touch(key, ttl, noreply=False)

        if keys:
            self._each(keys, touch)

    def gets_many(self, keys: Sequence[str]) -> Mapping[str, tuple[bytes, Any]]:
        seen: dict[str, tuple[bytes, Any]] = {}
        for _group, result in self._each(keys, lambda node, group: node.gets_many(group)):
            seen.update(result)
        return seen

    def cas(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        node = self._node(key)
        if token is None:
            return bool(self._once_more(lambda: node.add(key, value, expire=ttl, noreply=False)))
        # None (key gone) and False (changed since gets) are both conflicts
        return bool(self._once_more(lambda: node.cas(key, value, token, expire=ttl, noreply=False)))

    # -- counters: not part of KVDriver (used by stockpyle.bus.MemcacheEpochBus) --

    def incr(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta`` to the decimal counter under ``key`` (memcached ``incr``, atomic on the server).

        :returns: the new value, or ``None`` when the key holds nothing
            (create it with :meth:`add_many`).  memcached wraps at 2**64.
        """
        node = self._node(key)
        if self._legacy:
            result = self._once_more(lambda: node.incr(key, delta))
        else:
            result = self._once_more(lambda: node.incr(key, delta, noreply=False))
        return None if result is None else int(result)

    # -- leases (LeaseDriver) -----------------------------------------------

    @property
    def lease_modes(self) -> dict[str, str]:
        """How leases work on each server asked so far: ``"meta"`` or ``"add"`` (the fallback), by ``host:port``."""
        nodes = self._nodes
        return {_server_name(n): "meta" if self._meta[id(n)] else "add" for n in nodes if id(n) in self._meta}

    def _require_leases(self) -> None:
        if not self.can_lease:
            raise ConfigurationError(
                f"leases need a pymemcache client (Client, PooledClient or HashClient); {self.describe()} is "
                f"{type(self.client).__name__}"
            )

    def _no_meta(self, node: Any, why: object) -> bool:
        with self._meta_lock:
            known = self._meta.get(id(node))
            self._meta[id(node)] = False
        if known is not False:
            log.warning(
                "stockpyle: memcached at %s does not take meta commands (%s); its leases fall back to add-based "
                "locks (no stale values: mark_stale deletes; Stampede.refresh_ahead and serve_stale_for elect no "
                "refresher there: a value is served until it expires)",
                _server_name(node),
                why,
            )
        return False

    def _uses_meta(self, node: Any) -> bool:
        """Whether leases on ``node`` use meta commands: asked once per server with ``mn``."""
        state = self._meta.get(id(node))
        if state is not None:
            return state
        if not _has_pool(node) and not _is_connection(node):
            return self._no_meta(node, f"{type(node).__name__} lends no raw connections")
        try:
            self._once_more(self._meta_call, node, [meta_noop()])
        except self._client_error as exc:  # ERROR (no such command) or CLIENT_ERROR
            return self._no_meta(node, f"{type(exc).__name__}: {exc}")
        self._meta[id(node)] = True
        return True

    def _meta_call(self, node: Any, requests: list[bytes]) -> list[MetaResponse]:
        """Send ``requests`` on one of ``node``'s own connections; their responses, in order.

        The connection is borrowed from the node's pool and returned only
        after a clean exchange; after anything else (a timeout, a closed or
        garbled stream, an error line) it is closed and dropped from the pool.
        """
        data = b"".join(requests)
        pool = getattr(node, "client_pool", None)
        if pool is None:
            return self._exchange(node, data, len(requests))
        conn = pool.get()
        try:
            responses = self._exchange(conn, data, len(requests))
        except BaseException:
            pool.destroy(conn)
            raise
        pool.release(conn)
        return responses

    def _exchange(self, conn: Any, data: bytes, count: int) -> list[MetaResponse]:
        try:
            sock = conn.sock
            if sock is None:
                # pymemcache 4.x (pinned in the memcache extra): connects with the client's
                # own options (timeouts, TCP_NODELAY, keepalive, TLS)
                conn._connect()
                sock = conn.sock
            sock.sendall(data)
            parser = MetaParser()
            out: list[MetaResponse] = []
            response = None
            while True:
                if response is None:  # nothing complete buffered: wait for more
                    chunk = sock.recv(max(_RECV_SIZE, parser.needed()))
                    if not chunk:
                        raise self._closed_error()
                    parser.feed(chunk)
                response = parser.next_response()
                if response is None:
                    continue
                if response.is_error:
                    raise self._error_line(response)
                out.append(response)
                if len(out) == count:
                    break
            if parser.buffered():
                raise MetaProtocolError(f"{parser.buffered()} bytes arrived after the last expected response")
            return out
        except BaseException:
            conn.close()
            raise

    def _error_line(self, response: MetaResponse) -> Exception:
        if response.status == "ERROR":
            return self._unknown_command(response.message or "ERROR")
        if response.status == "CLIENT_ERROR":
            return self._client_error(response.message)
        return self._server_error(response.message)

    def _key(self, node: Any, key: str) -> bytes:
        """The key as the node's classic commands send it (its ``key_prefix`` first)."""
        parts = self._key_parts.get(id(node))
        if parts is None:
            prefix = getattr(node, "key_prefix", b"") or b""
            encoding = "utf-8" if getattr(node, "allow_unicode_keys", False) else "ascii"
            parts = self._key_parts[id(node)] = (prefix, encoding)
        try:
            return parts[0] + key.encode(parts[1])
        except UnicodeEncodeError:
            raise ValueError(f"memcached keys must be ASCII (allow_unicode_keys is off); got {key!r}") from None

    def lease_get(self, key: str, lease_ttl: Hashable, recache: Hashable | None = None) -> LeaseRead:
        if not self.can_lease:
            self._require_leases()
        ttl = check_lease_ttl(lease_ttl)
        node = self._node(key)
        if self._meta.get(id(node)) or self._uses_meta(node):
            mkey = self._key(node, key)
            try:
                response = self._once_more(self._meta_call, node, [meta_get(mkey, lease_get_flags(ttl, recache))])[0]
                read = lease_read(response)
                cut = refresh_cut(read, response, ttl)
                if cut is not None:
                    self._once_more(self._meta_call, node, [meta_get(mkey, cut)])
                return read
            except self._unknown_command as exc:  # e.g. a proxy that knows mn but not mg
                self._no_meta(node, f"mg answered {exc}")
        # the fallback elects no refreshers: a present value is a hit until it expires
        return self._once_more(self._add_lease_get, node, key, ttl)  # type: ignore[no-any-return]

    def _add_lease_get(self, node: Any, key: str, ttl: int) -> LeaseRead:
        """The fallback: an empty value ``add``-ed under the key is the lease; ``gets`` gives its token."""
        value, cas = node.gets(key)
        if value is None and node.add(key, b"", expire=ttl, noreply=False):
            value, cas = node.gets(key)
            if value == b"" and cas is not None:
                return LeaseRead(LeaseStatus.WON, token=MemcacheLease(cas))
        elif value is None:
            value, cas = node.gets(key)  # another client added first: its stub, or already its value
        if value:
            return LeaseRead(LeaseStatus.HIT, value, False, None, cas)
        return _LOST

    def lease_fill(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        self._require_leases()
        lease = as_lease(token)
        expire = check_fill_ttl(ttl)
        if not isinstance(value, bytes):
            raise TypeError(f"a memcached value must be bytes; got {type(value).__name__}")
        node = self._node(key)
        if self._uses_meta(node):
            request = meta_set(self._key(node, key), value, b"T%d C%s" % (expire, lease.cas))
            try:
                response: MetaResponse = self._once_more(self._meta_call, node, [request])[0]
                return response.status == "HD"
            except self._unknown_command as exc:
                self._no_meta(node, f"ms answered {exc}")
        return bool(self._once_more(lambda: node.cas(key, value, lease.cas, expire=expire, noreply=False)))

    def lease_release(self, key: str, token: Any) -> None:
        self._require_leases()
        lease = as_lease(token)
        if lease.refresh:
            return  # the value stays, told "being refreshed", until the end of the lease its lifetime was cut to
        node = self._node(key)
        if self._uses_meta(node):
            # a stub is deleted; a stale value is kept and marked stale again, so the next reader refreshes it
            flags = b"I C%s" % lease.cas if lease.stale else b"C%s" % lease.cas
            try:
                self._once_more(self._meta_call, node, [meta_delete(self._key(node, key), flags)])
                return
            except self._unknown_command as exc:
                self._no_meta(node, f"md answered {exc}")
        # replace the stub, if it is still ours, by an item that has already expired
        self._once_more(lambda: node.cas(key, b"", lease.cas, expire=-1, noreply=False))

    def mark_stale(self, keys: Sequence[str], ttl: Hashable) -> None:
        self._require_leases()
        expire = check_lease_ttl(ttl)

        def mark(node: Any, group: list[str]) -> None:
            if self._uses_meta(node):
                flags = b"I T%d" % expire
                try:
                    self._meta_call(node, [meta_delete(self._key(node, key), flags) for key in group])
                    return
                except self._unknown_command as exc:
                    self._no_meta(node, f"md answered {exc}")
            node.delete_many(group, noreply=False)  # no stale values without meta commands

        if keys:
            self._each(keys, mark)

    def close(self) -> None:
        if self._legacy:
            self.client.disconnect_all()
        else:
            self.client.close()
