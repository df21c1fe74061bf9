"""Drivers: the small adapters between the key-value engine and one client library.

:class:`~stockpyle.stores.kv.KeyValueStore` holds every algorithm a networked
store needs (key naming, envelopes and signing, stale-key cleanup, add with
undo, versioned writes, tombstones, lifetime caps).  A driver only moves bytes:
it is an object with the methods of :class:`KVDriver`, usually 150-250 lines
over one client library.  ``docs/custom_stores.rst`` walks through writing one.

Rules every driver follows:

* Keys are ``str`` (the engine makes them valid for every backend: ASCII, no
  whitespace, at most ~220 characters); values are ``bytes``.
* Multi-key methods make one round trip per server where the backend allows
  it, try every server even when one fails, and then raise the first failure
  (``add_many`` instead *returns* it beside what was stored, because the
  engine must undo a partial add).
* A driver raises its client library's own exceptions; the engine translates
  them with the driver's :attr:`KVDriver.errors` table.  A driver retries an
  operation once itself when a pooled connection turns out to have been closed
  by the server (every operation here is safe to repeat).
* Lifetimes reach a driver already converted by :meth:`KVDriver.ttl`.
* The constructor never connects.

The drivers shipped: :mod:`stockpyle.stores.drivers.pymemcache` (memcached
through pymemcache, and python-memcached-style clients),
:mod:`stockpyle.stores.drivers.pylibmc` (memcached through pylibmc, no leases)
and :mod:`stockpyle.stores.drivers.redis` (Redis and Redis Cluster through redis-py); for
asyncio, :mod:`stockpyle.stores.drivers.aiomemcache` (memcached, stockpyle's own
asyncio client), :mod:`stockpyle.stores.drivers.aioredis` (``redis.asyncio``) and
:mod:`stockpyle.stores.drivers.threaded` (any synchronous driver, in threads).

Leases (optional)
    A driver may also offer *leases*, the cross-process half of stampede
    protection (:class:`LeaseDriver`; :func:`supports_leases` tells whether a
    driver does).  A reader that misses takes the lease of the key; exactly
    one caller in the fleet wins it and loads the value from the system of
    record, then fills the key with :meth:`~LeaseDriver.lease_fill`, which
    stores only while the lease is still the one won: a writer's set,
    delete, tombstone or :meth:`~LeaseDriver.mark_stale` of the key in
    between makes the fill fail, so a value loaded before a write can never
    land after it.  The lease lives under the entry's own key; read through
    the plain methods (``get``, ``get_many``, ``gets_many``) a key under a
    lease holds the empty value ``b""``, which is therefore reserved: no
    entry is ever empty, and an empty value means "absent".
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

from ...errors import ErrorTable

__all__ = [
    "AsyncKVDriver",
    "KVDriver",
    "LeaseDriver",
    "LeaseRead",
    "LeaseStatus",
    "supports_leases",
    "supports_recache",
]


@runtime_checkable
class KVDriver(Protocol):
    """What the key-value engine needs from a backend.

    :ivar backend: the backend's name in messages (``"memcached"``, ``"Redis"``).
    :ivar errors: how the client library's exceptions map into the stockpyle tree.
    :ivar can_add: ``add_many`` is an atomic add-only write per key.
    :ivar can_cas: ``gets_many`` and ``cas`` are available (compare-and-set).
    :ivar max_item_size: the largest value (plus key) the server accepts, in
        bytes, or ``None`` when there is no practical limit.
    :ivar min_lifetime: the shortest lifetime the backend keeps reliably, in
        seconds (memcached's clock ticks once a second: 2).
    """

    backend: str
    errors: ErrorTable
    can_add: bool
    can_cas: bool
    max_item_size: int | None
    min_lifetime: float

    def describe(self) -> str:
        """Where the data lives (servers, URL), for messages."""
        ...

    def ttl(self, seconds: float | None) -> Hashable:
        """The backend's lifetime argument for ``seconds`` from now (``None``: never expires).

        Only positive durations are passed; the result is handed back to the
        write methods unchanged, must be hashable (writes are grouped by it)
        and is never ``None``.
        """
        ...

    def get(self, key: str) -> bytes | None:
        """The value of one key, or ``None``."""
        ...

    def get_many(self, keys: Sequence[str]) -> Mapping[str, bytes]:
        """The values of the keys that have one (one round trip per server)."""
        ...

    def set_many(self, items: Mapping[str, bytes], ttl: Hashable) -> None:
        """Store every item unconditionally; raise when any was not stored."""
        ...

    def add_many(self, items: Mapping[str, bytes], ttl: Hashable) -> tuple[set[str], BaseException | None]:
        """Store each item only if its key holds nothing.

        :returns: the keys that were stored, and the first failure of a server
            (or ``None``): keys on a server that failed count as not stored.
        """
        ...

    def delete_many(self, keys: Sequence[str]) -> None:
        """Delete the keys (absent ones are fine); raise when a server failed."""
        ...

    def gets_many(self, keys: Sequence[str]) -> Mapping[str, tuple[bytes, Any]]:
        """Values and compare-and-set tokens of the keys that have one."""
        ...

    def cas(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        """Store ``value`` only if ``key`` still holds the value ``token`` was read with.

        :returns: False when it changed or vanished meanwhile.
        """
        ...

    def touch_many(self, keys: Sequence[str], ttl: Hashable) -> None:
        """Give existing keys a new lifetime (absent ones are fine); used by
        :class:`~stockpyle.collections.CachedMapping` to retire old snapshots."""
        ...

    def close(self) -> None:
        """Close connections; the driver reconnects on its next call."""
        ...


class LeaseStatus(enum.Enum):
    """What :meth:`LeaseDriver.lease_get` found."""

    #: the key holds a current value: no lease is involved
    HIT = "hit"
    #: this caller holds the lease: load the value, then :meth:`~LeaseDriver.lease_fill`
    #: (or :meth:`~LeaseDriver.lease_release` when the load failed)
    WON = "won"
    #: another caller holds the lease: wait and read again (or serve the stale value, if there is one)
    LOST = "lost"


class LeaseRead(NamedTuple):
    """The answer of :meth:`LeaseDriver.lease_get`.

    :ivar status: see :class:`LeaseStatus`.
    :ivar value: the value under the key: current for :attr:`~LeaseStatus.HIT`,
        the stale value when :attr:`stale` is true, otherwise ``None``.
    :ivar stale: the value was marked stale (:meth:`LeaseDriver.mark_stale`)
        and someone -- this caller when the status is
        :attr:`~LeaseStatus.WON` -- is to refresh it.  A :attr:`~LeaseStatus.WON`
        read with a value that is not stale won the refresh of a present
        value (``recache``).
    :ivar token: for :attr:`~LeaseStatus.WON` only: the opaque lease token to
        pass to :meth:`~LeaseDriver.lease_fill` or :meth:`~LeaseDriver.lease_release`.
    :ivar cas: the compare-and-set token of the value read (the same kind of
        token :meth:`KVDriver.gets_many` returns, usable with
        :meth:`KVDriver.cas`), or ``None`` without a value.
    """

    status: LeaseStatus
    value: bytes | None = None
    stale: bool = False
    token: Any = None
    cas: Any = None

    @property
    def won(self) -> bool:
        """Whether this caller holds the lease."""
        return self.status is LeaseStatus.WON


@runtime_checkable
class LeaseDriver(KVDriver, Protocol):
    """A :class:`KVDriver` that also offers leases (see "Leases" in the module docs).

    The methods are plain calls like the rest of the protocol, so the engine's
    plans can yield them as ``(method, args)``.  Lifetimes are the driver's
    own (:meth:`KVDriver.ttl`); a lease lifetime must be positive (a lease
    that never expires would block its key for good if its holder died).

    :ivar can_lease: whether this driver instance offers leases at all (a
        driver class may implement the methods yet not support them for some
        clients).  Check it with :func:`supports_leases`.
    :ivar can_recache: whether :meth:`lease_get` takes ``recache`` (optional:
        a driver without the attribute does not; see :func:`supports_recache`).
    """

    can_lease: bool

    def lease_get(self, key: str, lease_ttl: Hashable, recache: Hashable | None = None) -> LeaseRead:
        """Read ``key``; on a miss (or a stale value nobody refreshes yet) try to take its lease.

        Exactly one of any number of concurrent callers, in every process, wins
        the lease of an absent key; it expires after ``lease_ttl`` unless filled.

        :param lease_ttl: the lease's lifetime (from :meth:`KVDriver.ttl`).
        :param recache: drivers with ``can_recache`` only: also elect a
            *refresher* of a present value whose remaining lifetime in the
            backend is below ``recache`` (from :meth:`KVDriver.ttl`).  Exactly
            one caller wins: :attr:`~LeaseStatus.WON` with the value (``stale``
            false) and a token to fill with; the key's remaining lifetime is
            then cut to ``lease_ttl`` at most, so a refresher that dies leaves
            it to expire when its lease would have.  The others get
            :attr:`~LeaseStatus.HIT` with the value.  A writer's change of the
            key makes the refresher's fill fail, as for any lease.
        """
        ...

    def lease_fill(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        """Store ``value`` under ``key`` only while the lease ``token`` is still the one on the key.

        :returns: False when the lease is gone: expired, or ended by a writer's
            set, delete or tombstone, or by :meth:`mark_stale`.  Nothing is
            stored then.
        """
        ...

    def lease_release(self, key: str, token: Any) -> None:
        """Give the lease up (the load failed or was cancelled) so that the next reader wins it.

        A lease no longer on the key (filled, expired, ended by a writer) is left alone.
        """
        ...

    def mark_stale(self, keys: Sequence[str], ttl: Hashable) -> None:
        """Mark the values of ``keys`` stale; each may still be read for ``ttl``.

        The next :meth:`lease_get` of a stale key wins its lease and gets the
        stale value to serve while it refreshes; concurrent ones lose and get
        the stale value too.  Plain reads keep returning the value as it is.
        A lease being held on one of the keys is ended (its fill fails).
        Absent keys are fine; raises when a server failed.
        """
        ...


def supports_leases(driver: object) -> bool:
    """Whether ``driver`` offers leases (:class:`LeaseDriver` with ``can_lease`` true)."""
    return getattr(driver, "can_lease", False) is True and callable(getattr(driver, "lease_get", None))


def supports_recache(driver: object) -> bool:
    """Whether ``driver`` elects refreshers of present values (``lease_get(..., recache=...)``)."""
    return supports_leases(driver) and getattr(driver, "can_recache", False) is True


@runtime_checkable
class AsyncKVDriver(Protocol):
    """The asyncio twin of :class:`KVDriver`: the same attributes and methods, as coroutines.

    ``ttl()`` and ``describe()`` stay plain methods (no I/O).  The engine drives
    the very same plans through either kind (see :mod:`stockpyle.stores.kv`);
    every rule of :class:`KVDriver` holds, and one more: a call cancelled while
    it holds a pooled connection closes or returns that connection before the
    cancellation propagates, so no connection is left half-read.
    """

    backend: str
    errors: ErrorTable
    can_add: bool
    can_cas: bool
    max_item_size: int | None
    min_lifetime: float

    def describe(self) -> str:
        """Where the data lives (servers, URL), for messages."""
        ...

    def ttl(self, seconds: float | None) -> Hashable:
        """The backend's lifetime argument, as :meth:`KVDriver.ttl`."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The value of one key, or ``None``."""
        ...

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, bytes]:
        """The values of the keys that have one (one round trip per server)."""
        ...

    async def set_many(self, items: Mapping[str, bytes], ttl: Hashable) -> None:
        """Store every item unconditionally; raise when any was not stored."""
        ...

    async def add_many(self, items: Mapping[str, bytes], ttl: Hashable) -> tuple[set[str], BaseException | None]:
        """Store each item only if its key holds nothing (see :meth:`KVDriver.add_many`)."""
        ...

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Delete the keys (absent ones are fine); raise when a server failed."""
        ...

    async def gets_many(self, keys: Sequence[str]) -> Mapping[str, tuple[bytes, Any]]:
        """Values and compare-and-set tokens of the keys that have one."""
        ...

    async def cas(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        """Store ``value`` only if ``key`` still holds the value ``token`` was read with."""
        ...

    async def touch_many(self, keys: Sequence[str], ttl: Hashable) -> None:
        """Give existing keys a new lifetime (absent ones are fine)."""
        ...

    async def close(self) -> None:
        """Close connections; the driver reconnects on its next call."""
        ...
