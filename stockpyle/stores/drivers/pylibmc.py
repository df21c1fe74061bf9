"""The memcached driver on pylibmc (libmemcached, in C).

:class:`PylibmcDriver` is what ``MemcacheStore(servers=[...], driver="pylibmc")``
uses.  It keeps one small pool of pylibmc clients *per server* and routes keys
itself, so that every multi-key operation is one round trip per server and a
server's failure is that server's error rather than a silent partial answer
(libmemcached's own multi-server ``get_multi`` skips a failed server without
saying so).

Placement
    Keys are spread over several servers by a consistent-hash ring on
    BLAKE2b (:class:`HashRing`), computed in C by :mod:`hashlib`.  That is
    *not* the placement of the pymemcache driver (rendezvous hashing on a
    pure-Python murmur3, about 70 µs a key for three servers): a fleet must
    never be used through both drivers at once, or each would read and write
    a different server for the same key and serve stale entries.  The driver
    therefore records its scheme on every server of a fleet of two or more
    under :data:`~stockpyle.stores.drivers.pymemcache.PLACEMENT_KEY` and
    checks it at first use of the server;
    :func:`~stockpyle.stores.drivers.pymemcache.check_placement` raises
    :class:`~stockpyle.exceptions.ConfigurationError` when a server already
    carries another scheme.  The pymemcache driver runs the same check.  One
    server has no placement to disagree on: both drivers may share it.

Failures
    libmemcached answers a read that timed out as a miss, and only the calls
    after it raise (the server is then "disabled until timed retry").  A read
    that comes back short after at least the response timeout is therefore
    raised here as the failure it was.  (The first read on a pooled
    connection that a stopped server closed can still come back as a miss, at
    once; writes, and reads after it, raise.)  A server stays marked failed for one
    second (``retry_timeout``) after a failure, and its keys fail meanwhile;
    they never move to another server.

Values are bytes as they are on the wire (flags are ignored on reads): pylibmc
never unpickles what it reads, so an entry planted in a shared memcached is
judged by the engine's signer like any other.  No leases (pylibmc has no meta
commands); the chain falls back to in-process single flight.
"""

from __future__ import annotations

import bisect
import collections
import hashlib
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Final

from ...errors import ErrorRule, ErrorTable
from ...exceptions import ConfigurationError, StoreError, StoreUnavailableError, ValueTooLargeError
from .pymemcache import DEFAULT_MAX_ITEM_SIZE, PLACEMENT_KEY, PLACEMENT_TTL, PymemcacheDriver, check_placement

__all__ = [
    "INSTALL_HINT",
    "PLACEMENT_SCHEME",
    "HashRing",
    "PylibmcDriver",
    "error_table",
    "import_pylibmc",
]

INSTALL_HINT: Final = "MemcacheStore(driver='pylibmc') requires pylibmc: pip install 'stockpyle[pylibmc]'"

#: this driver's placement scheme (the value under :data:`~stockpyle.stores.drivers.pymemcache.PLACEMENT_KEY`)
PLACEMENT_SCHEME: Final = b"pylibmc/blake2b-ring/1"
# points per server on the ring
_POINTS: Final = 160


def import_pylibmc() -> Any:
    """Import pylibmc, or raise an ImportError that names the extra to install."""
    try:
        import pylibmc
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return pylibmc


_TABLE: list[ErrorTable] = []


def _timed_out(exc: BaseException) -> bool:
    return "TIMEOUT" in str(exc).upper()


def error_table() -> ErrorTable:
    """How pylibmc and socket errors map into the stockpyle tree (pylibmc must be installed)."""
    if _TABLE:
        return _TABLE[0]
    pylibmc = import_pylibmc()
    down = (
        OSError,
        pylibmc.ServerDown,
        pylibmc.ServerDead,
        pylibmc.ConnectionError,
        pylibmc.ConnectionBindError,
        pylibmc.SocketCreateError,
        pylibmc.HostLookupError,
        pylibmc.WriteError,
        pylibmc.ReadError,
        pylibmc.UnknownReadFailure,
        pylibmc.SomeErrors,
        pylibmc.NoServers,
    )
    rules = [
        ErrorRule(down, StoreUnavailableError),
        # libmemcached reports a timeout as its generic error (code 31, "A TIMEOUT OCCURRED")
        ErrorRule(pylibmc.Error, StoreUnavailableError, when=_timed_out),
        ErrorRule(pylibmc.TooBig, ValueTooLargeError, message="the server refused a value as too large"),
        ErrorRule(pylibmc.Error, StoreError),
    ]
    # a connection the server closed fails once, at once; libmemcached reconnects on the next call
    table = ErrorTable("memcached", rules, retry=(pylibmc.WriteError, pylibmc.ConnectionError))
    _TABLE.append(table)
    return table


class HashRing:
    """Consistent hashing on BLAKE2b: each server holds points on a 64-bit ring; a key goes to the next point.

    The server set is fixed at construction: a server that fails keeps its
    keys (they fail) instead of handing them to another.
    """

    def __init__(self, servers: Sequence[str]) -> None:
        points: list[tuple[int, int]] = []
        for index, server in enumerate(servers):
            for i in range(_POINTS):
                points.append((self._hash(f"{server}#{i}".encode()), index))
        points.sort()
        self._points = [p for p, _ in points]
        self._owners = [owner for _, owner in points]

    @staticmethod
    def _hash(data: bytes) -> int:
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")

    def index(self, key: str) -> int:
        """The index of the server that holds ``key``."""
        at = bisect.bisect(self._points, self._hash(key.encode()))
        return self._owners[at if at < len(self._owners) else 0]


class _Server:
    """One server: a template client and the idle clones lent to threads (a pylibmc client is not thread-safe)."""

    def __init__(self, client_class: type, address: str, behaviors: dict[str, Any], keep: int | None) -> None:
        self.address = address
        self.template = client_class([address], behaviors=behaviors)
        self.idle: collections.deque[Any] = collections.deque()
        self.keep = keep
        self.placement_checked = False

    def acquire(self) -> Any:
        try:
            return self.idle.pop()
        except IndexError:
            return self.template.clone()

    def release(self, client: Any) -> None:
        if self.keep is None or len(self.idle) < self.keep:
            self.idle.append(client)
        else:
            client.disconnect_all()

    def close(self) -> None:
        while self.idle:
            self.idle.pop().disconnect_all()
        self.template.disconnect_all()


def _raw_client_class(pylibmc: Any) -> type:
    class RawBytesClient(pylibmc.Client):  # type: ignore[misc]
        """A pylibmc client that stores and returns bytes only: flags never make it unpickle a value."""

        def serialize(self, value: Any) -> tuple[bytes, int]:
            if not isinstance(value, bytes):
                raise TypeError(f"a memcached value must be bytes; got {type(value).__name__}")
            return value, 0

        def deserialize(self, data: bytes, flags: int) -> bytes:
            return data

    return RawBytesClient


class PylibmcDriver:
    """memcached through pylibmc, one pool of clients per server (see the module docs).

    :param servers: ``host:port`` names.
    :param connect_timeout: seconds to wait for a connection.
    :param timeout: seconds to wait for each response.
    :param max_pool_size: idle connections kept per server (default: as many as threads used them).
    :param max_item_size: the servers' largest item (memcached ``-I``).
    :raises ImportError: without pylibmc installed.
    """

    backend = "memcached"
    min_lifetime = 2.0
    can_add = True
    can_cas = True
    #: no meta commands in libmemcached: no leases (the chain uses in-process single flight)
    can_lease = False
    placement_scheme = PLACEMENT_SCHEME

    def __init__(
        self,
        servers: Sequence[str],
        *,
        connect_timeout: float = 0.25,
        timeout: float = 0.5,
        max_pool_size: int | None = None,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
    ) -> None:
        pylibmc = import_pylibmc()
        if not servers:
            raise ConfigurationError("MemcacheStore(servers=...) needs at least one 'host:port'")
        self.servers = list(servers)
        self.max_item_size: int | None = max_item_size
        self.errors = error_table()
        self._retry = self.errors.retry
        self._not_found: type[Exception] = pylibmc.NotFound
        self.timeout = timeout
        # a short answer that took this long was a timeout libmemcached reported as a miss
        self._slow = timeout * 0.9
        behaviors = {
            "tcp_nodelay": True,
            "cas": True,
            "connect_timeout": max(1, round(connect_timeout * 1000)),  # ms
            "send_timeout": max(1, round(timeout * 1_000_000)),  # µs
            "receive_timeout": max(1, round(timeout * 1_000_000)),  # µs
            "_poll_timeout": max(1, round(timeout * 1000)),  # ms
            "retry_timeout": 1,  # s a failed server is skipped (its keys fail, they never move)
        }
        client_class = _raw_client_class(pylibmc)
        self._servers = [_Server(client_class, address, behaviors, max_pool_size) for address in self.servers]
        self._ring = HashRing(self.servers) if len(self.servers) > 1 else None

    def describe(self) -> str:
        return ", ".join(self.servers)

    def __repr__(self) -> str:
        return f"<PylibmcDriver {self.describe()}>"

    ttl = staticmethod(PymemcacheDriver.ttl)

    # -- routing, pooling, failures ------------------------------------------

    def _server(self, key: str) -> _Server:
        ring = self._ring
        return self._servers[0] if ring is None else self._servers[ring.index(key)]

    def _route(self, keys: Iterable[str]) -> list[tuple[_Server, list[str]]]:
        ring = self._ring
        if ring is None:
            return [(self._servers[0], list(keys))]
        groups: dict[int, list[str]] = {}
        index = ring.index
        for key in keys:
            groups.setdefault(index(key), []).append(key)
        return [(self._servers[i], group) for i, group in groups.items()]

    def _call(self, server: _Server, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(client, *args)`` on a pooled client of ``server``, once more when the connection was stale."""
        if self._ring is not None and not server.placement_checked:
            self._check_placement(server)
        client = server.acquire()
        try:
            try:
                result = fn(client, *args)
            except self._retry:
                result = fn(client, *args)
        except BaseException:
            client.disconnect_all()
            server.release(client)
            raise
        server.release(client)
        return result

    def _check_placement(self, server: _Server) -> None:
        """Mark every server of the fleet with this driver's scheme, or refuse one that carries another.

        Called at the first use of ``server``; all servers are checked at
        once, so that a fleet another driver marked on one server only is
        refused whichever server this store touches first.  A server that
        does not answer is checked again at its next use (the operation
        itself then fails as it would have).
        """
        for other in self._servers:
            if other.placement_checked:
                continue
            client = other.acquire()
            try:
                client.add(PLACEMENT_KEY, self.placement_scheme, time=PLACEMENT_TTL)
                found = client.get(PLACEMENT_KEY)
            except Exception:  # noqa: BLE001 - the operation on this server reports the failure
                continue
            finally:
                other.release(client)
            check_placement(found, self.placement_scheme, other.address)
            other.placement_checked = True

    def _timed_out(self, server: _Server, started: float) -> None:
        if time.monotonic() - started >= self._slow:
            raise StoreUnavailableError(f"memcached at {server.address} did not answer within {self.timeout} s")

    def _each(self, keys: Iterable[str], fn: Callable[[_Server, list[str]], Any]) -> list[Any]:
        """``fn(server, keys)`` once per server; every server is tried before the first failure is raised."""
        results = []
        first: BaseException | None = None
        for server, group in self._route(keys):
            try:
                results.append(fn(server, group))
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other servers
                first = first or exc
        if first is not None:
            raise first
        return results

    # -- KVDriver --------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        # the hot path: _call inlined (one lookup, one pooled client, one C call)
        ring = self._ring
        server = self._servers[0] if ring is None else self._servers[ring.index(key)]
        if ring is not None and not server.placement_checked:
            self._check_placement(server)
        try:
            client = server.idle.pop()
        except IndexError:
            client = server.template.clone()
        started = time.monotonic()
        try:
            try:
                value: bytes | None = client.get(key)
            except self._retry:
                value = client.get(key)
        except BaseException:
            client.disconnect_all()
            server.release(client)
            raise
        server.release(client)
        if value is None:
            self._timed_out(server, started)
        return value

    def _get_group(self, server: _Server, keys: list[str]) -> Mapping[str, bytes]:
        started = time.monotonic()
        found: dict[str, bytes] = self._call(server, _get_multi, keys)
        if len(found) < len(keys):
            self._timed_out(server, started)
        return found

    def get_many(self, keys: Sequence[str]) -> Mapping[str, bytes]:
        if not keys:
            return {}
        if self._ring is None:
            return self._get_group(self._servers[0], list(keys))
        found: dict[str, bytes] = {}
        for result in self._each(keys, self._get_group):
            found.update(result)
        return found

    def set_many(self, items: Mapping[str, bytes], ttl: Hashable) -> None:
        def write(server: _Server, group: list[str]) -> list[str]:
            return list(self._call(server, _set_multi, {k: items[k] for k in group}, ttl) or ())

        failed = [key for result in self._each(items, write) for key in result]
        if failed:
            raise StoreError(f"memcached did not store {len(failed)} of {len(items)} keys")

    def add_many(self, items: Mapping[str, bytes], ttl: Hashable) -> tuple[set[str], BaseException | None]:
        stored: set[str] = set()
        first: BaseException | None = None
        for server, group in self._route(items):
            try:
                refused = self._call(server, _add_multi, {k: items[k] for k in group}, ttl)
            except Exception as exc:  # noqa: BLE001 - returned to the engine, which undoes the rest
                first = first or exc
                continue
            stored.update(set(group).difference(refused or ()))
        return stored, first

    def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            # delete_multi answers False when a key was absent; failures raise
            self._each(keys, lambda server, group: self._call(server, _delete_multi, group))

    def touch_many(self, keys: Sequence[str], ttl: Hashable) -> None:
        def touch(client: Any, group: list[str], ttl: Hashable) -> None:
            for key in group:  # memcached has no multi-key touch
                try:
                    client.touch(key, ttl)
                except self._not_found:
                    pass

        if keys:
            self._each(keys, lambda server, group: self._call(server, touch, group, ttl))

    def gets_many(self, keys: Sequence[str]) -> Mapping[str, tuple[bytes, Any]]:
        def gets(client: Any, group: list[str]) -> dict[str, tuple[bytes, Any]]:
            seen = {}
            for key in group:  # pylibmc has no multi-key gets
                value, token = client.gets(key)
                if value is not None:
                    seen[key] = (value, token)
            return seen

        found: dict[str, tuple[bytes, Any]] = {}
        for result in self._each(keys, lambda server, group: self._call(server, gets, group)):
            found.update(result)
        return found

    def cas(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        server = self._server(key)
        if token is None:
            return bool(self._call(server, _add, key, value, ttl))
        # False when the value changed since gets, or vanished
        try:
            return bool(self._call(server, _cas, key, value, token, ttl))
        except self._not_found:
            return False

    # -- counters: not part of KVDriver (used by stockpyle.bus.MemcacheEpochBus) --

    def incr(self, key: str, delta: int = 1) -> int | None:
        """Add ``delta`` to the decimal counter under ``key`` (memcached ``incr``, atomic on the server).

        :returns: the new value, or ``None`` when the key holds nothing.
        """
        try:
            return int(self._call(self._server(key), _incr, key, delta))
        except self._not_found:
            return None

    def close(self) -> None:
        for server in self._servers:
            server.close()


# the client calls, as plain functions: _call lends them a pooled client


def _get_multi(client: Any, keys: list[str]) -> Any:
    return client.get_multi(keys)


def _set_multi(client: Any, values: dict[str, bytes], ttl: Any) -> Any:
    return client.set_multi(values, time=ttl)


def _add_multi(client: Any, values: dict[str, bytes], ttl: Any) -> Any:
    return client.add_multi(values, time=ttl)


def _delete_multi(client: Any, keys: list[str]) -> Any:
    return client.delete_multi(keys)


def _add(client: Any, key: str, value: bytes, ttl: Any) -> Any:
    return client.add(key, value, time=ttl)


def _cas(client: Any, key: str, value: bytes, token: Any, ttl: Any) -> Any:
    return client.cas(key, value, token, time=ttl)


def _incr(client: Any, key: str, delta: int) -> Any:
    return client.incr(key, delta)
