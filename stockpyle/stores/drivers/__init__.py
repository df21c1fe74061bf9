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
through pymemcache, and python-memcached-style clients) and
:mod:`stockpyle.stores.drivers.redis` (Redis and Redis Cluster through redis-py).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ...errors import ErrorTable

__all__ = ["AsyncKVDriver", "KVDriver"]


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
