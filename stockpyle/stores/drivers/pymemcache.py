"""The memcached driver on pymemcache (and python-memcached-style clients).

:func:`build_client` makes the client :class:`~stockpyle.stores.MemcacheStore`
uses for ``servers=[...]``: a thread-safe ``PooledClient`` for one server, or a
``HashClient`` with one pool per server and *pinned* rendezvous hashing for
several (see :class:`PinnedRendezvousHash`).  :class:`PymemcacheDriver` adapts
that client, or one passed in, to :class:`~stockpyle.stores.drivers.KVDriver`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Final

from ...errors import ErrorRule, ErrorTable
from ...exceptions import ConfigurationError, StoreError, StoreUnavailableError, ValueTooLargeError
from ...lifetimes import memcache_expire

__all__ = [
    "DEFAULT_MAX_ITEM_SIZE",
    "INSTALL_HINT",
    "PinnedRendezvousHash",
    "PymemcacheDriver",
    "build_client",
    "error_table",
    "import_pymemcache",
]

INSTALL_HINT: Final = "MemcacheStore requires pymemcache: pip install stockpyle[memcache]"

#: memcached's default largest item (``-I 1m``).
DEFAULT_MAX_ITEM_SIZE: Final = 1024 * 1024


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
    rules = [ErrorRule(OSError, StoreUnavailableError)]
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
        if _is_hash_client(client):
            self._nodes = list(client.clients.values())
            self._hasher = client.hasher
            self._by_name = client.clients
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
        return self._by_name[name]

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
        return [(self._by_name[name], group) for name, group in groups.items()]

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
        found: dict[str, bytes] = {}
        for _group, result in self._each(keys, self._get_group):
            found.update(result)
        return found

    def set_many(self, items: Mapping[str, bytes], ttl: Hashable) -> None:
        def write(node: Any, group: list[str]) -> list[str]:
            values = {k: items[k] for k in group}
            if self._legacy:
                return list(node.set_multi(values, ttl) or ())
            return node.set_many(values, expire=ttl, noreply=False)  # type: ignore[no-any-return]

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

    def close(self) -> None:
        if self._legacy:
            self.client.disconnect_all()
        else:
            self.client.close()
