"""Any synchronous driver as an :class:`~stockpyle.stores.drivers.AsyncKVDriver`, its calls run in threads.

For a client library without an asyncio twin (pylibmc, a custom driver):
``AsyncKeyValueStore(ThreadedDriver(PymemcacheDriver(client)))`` never blocks
the event loop, at the cost of a thread hand-off per call (tens of
microseconds).  The drivers written for asyncio are faster and cancel cleanly;
a cancelled call here stops waiting at once, while the thread finishes the
call it started (the sync driver's own timeouts bound it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from . import KVDriver, LeaseRead, supports_leases, supports_recache

__all__ = ["ThreadedDriver"]


class ThreadedDriver:
    """An AsyncKVDriver that runs a :class:`~stockpyle.stores.drivers.KVDriver`'s calls with :func:`asyncio.to_thread`.

    :param driver: the synchronous driver (thread-safe, as every stockpyle driver is).
    """

    def __init__(self, driver: KVDriver) -> None:
        self.sync = driver
        self.backend = driver.backend
        self.errors = driver.errors
        self.can_add = driver.can_add
        self.can_cas = driver.can_cas
        self.max_item_size = driver.max_item_size
        self.min_lifetime = driver.min_lifetime
        #: leases are forwarded when the synchronous driver offers them
        self.can_lease = supports_leases(driver)
        self.can_recache = supports_recache(driver)

    def describe(self) -> str:
        return self.sync.describe()

    def __repr__(self) -> str:
        return f"<ThreadedDriver {self.sync!r}>"

    def ttl(self, seconds: float | None) -> Hashable:
        return self.sync.ttl(seconds)

    async def get(self, key: str) -> bytes | None:
        return await asyncio.to_thread(self.sync.get, key)

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, bytes]:
        return await asyncio.to_thread(self.sync.get_many, keys)

    async def set_many(self, items: Mapping[str, bytes], ttl: Hashable) -> None:
        await asyncio.to_thread(self.sync.set_many, items, ttl)

    async def add_many(self, items: Mapping[str, bytes], ttl: Hashable) -> tuple[set[str], BaseException | None]:
        return await asyncio.to_thread(self.sync.add_many, items, ttl)

    async def delete_many(self, keys: Sequence[str]) -> None:
        await asyncio.to_thread(self.sync.delete_many, keys)

    async def gets_many(self, keys: Sequence[str]) -> Mapping[str, tuple[bytes, Any]]:
        return await asyncio.to_thread(self.sync.gets_many, keys)

    async def cas(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        return await asyncio.to_thread(self.sync.cas, key, value, token, ttl)

    async def touch_many(self, keys: Sequence[str], ttl: Hashable) -> None:
        await asyncio.to_thread(self.sync.touch_many, keys, ttl)

    # -- leases (when the synchronous driver is a LeaseDriver) ---------------

    async def lease_get(self, key: str, lease_ttl: Hashable, recache: Hashable | None = None) -> LeaseRead:
        if recache is None:
            return await asyncio.to_thread(self.sync.lease_get, key, lease_ttl)  # type: ignore[attr-defined]
        return await asyncio.to_thread(self.sync.lease_get, key, lease_ttl, recache)  # type: ignore[attr-defined]

    async def lease_fill(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        return await asyncio.to_thread(self.sync.lease_fill, key, value, token, ttl)  # type: ignore[attr-defined]

    async def lease_release(self, key: str, token: Any) -> None:
        await asyncio.to_thread(self.sync.lease_release, key, token)  # type: ignore[attr-defined]

    async def mark_stale(self, keys: Sequence[str], ttl: Hashable) -> None:
        await asyncio.to_thread(self.sync.mark_stale, keys, ttl)  # type: ignore[attr-defined]

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)
