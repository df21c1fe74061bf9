"""In-process stores: :class:`ProcessMemoryStore` and :class:`ThreadLocalStore`.

Both keep the objects themselves (not copies): a ``get`` returns the very
instance that was ``put``.  Lifetimes are measured on the monotonic clock with
sub-second precision; an expired object is never returned, and expired
entries are reclaimed as writes happen (a heap ordered by expiry time), so
entries that are never read again do not accumulate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from time import perf_counter
from typing import Any, TypeVar

from ..exceptions import ConfigurationError
from ..keys import Key, lookup_key, object_keys, version_of
from ..lifetimes import LifetimeCallback
from ..stats import SAMPLE_EVERY, StoreStats
from ._memtable import MemoryTable
from .base import BaseStore, DirectIndex, KeyDict, check_storable, check_tombstone_lifetime

__all__ = ["ProcessMemoryStore", "ThreadLocalStore"]

T = TypeVar("T")
_monotonic = time.monotonic


def _check_maxsize(maxsize: Any) -> int | None:
    if maxsize is None:
        return None
    if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
        raise ConfigurationError(f"maxsize must be a positive int (number of objects) or None; got {maxsize!r}")
    return maxsize


class _Guard:
    """``with guard as table``: hold the store's lock around one write (cheaper than a generator-based manager)."""

    __slots__ = ("_lock", "_table")

    def __init__(self, lock: threading.RLock, table: MemoryTable) -> None:
        self._lock = lock
        self._table = table

    def __enter__(self) -> MemoryTable:
        self._lock.acquire()
        return self._table

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class _InProcessStore(BaseStore):
    """Shared write path of the two in-process stores.

    They count in :meth:`stats` inline rather than through BaseStore's
    wrappers, which would cost more than a hit itself; ``get`` latency is
    sampled (one call in :data:`~stockpyle.stats.SAMPLE_EVERY`).  Hits that a
    :class:`~stockpyle.ChainedStore` serves from this store's
    :meth:`direct_index` are counted here too.
    """

    _auto_stats = False
    supports_add = True
    supports_class_invalidation = True
    in_process = True
    is_cache = True

    def __init__(
        self,
        *,
        polymorphic: bool = False,
        lifetime_cb: LifetimeCallback | None = None,
        maxsize: int | None = None,
        tombstone_lifetime: float = 5.0,
    ) -> None:
        super().__init__(polymorphic=polymorphic, lifetime_cb=lifetime_cb)
        self.maxsize = _check_maxsize(maxsize)
        self.tombstone_lifetime = check_tombstone_lifetime(tombstone_lifetime)
        self._counters = super().stats()
        self._direct: DirectIndex | None = None
        self._direct_base = 0
        # get() does not count hits: the sampling countdown already counts
        # calls, and hits = calls - misses (see stats())
        self._countdown = SAMPLE_EVERY
        self._cycles = 0

    def stats(self) -> StoreStats:
        """This store's counters and sampled ``get`` latency.

        Counts are exact for a single thread and approximate under heavy
        concurrent use (the counters are not locked, to keep ``get`` fast).
        """
        counters = self._counters
        # every cycle is SAMPLE_EVERY calls, whose last one re-enters get()
        # once more (see _sampled_get): calls = N + cycles - (16*cycles - 16 + countdown)
        calls = SAMPLE_EVERY + (SAMPLE_EVERY - 1) * self._cycles - self._countdown
        direct = 0 if self._direct is None else self._direct.served() - self._direct_base
        counters.hits = max(0, calls - counters.misses) + direct
        return counters

    def reset_stats(self) -> None:
        self._countdown = SAMPLE_EVERY
        self._cycles = 0
        if self._direct is not None:
            self._direct_base = self._direct.served()
        self._counters.reset()

    def _sampled_get(self, klass: type[T], keydict: KeyDict) -> T | None:
        # called by get() once every SAMPLE_EVERY calls: time one real get
        self._countdown = SAMPLE_EVERY
        self._cycles += 1
        start = perf_counter()
        try:
            return self.get(klass, keydict)
        finally:
            self._counters.timer("get").add(perf_counter() - start)

    def get(self, klass: type[T], keydict: KeyDict) -> T | None:  # pragma: no cover - both subclasses define it
        raise NotImplementedError

    def _new_table(self) -> MemoryTable:
        return MemoryTable(self.maxsize, _monotonic, self.tombstone_lifetime)

    def _locked_table(self) -> AbstractContextManager[MemoryTable]:
        raise NotImplementedError

    def _prepare(self, obj: object) -> tuple[object, list[Key], float | None, Any]:
        check_storable(obj)
        keys = object_keys(obj, self.polymorphic)
        lifetimes = self.lifetimes
        expires = None if lifetimes.trivial else lifetimes.expires_at(obj, _monotonic)
        return obj, keys, expires, version_of(obj)

    def _keys(self, obj: object) -> tuple[object, list[Key], Any]:
        check_storable(obj)
        return obj, object_keys(obj, self.polymorphic), version_of(obj)

    def put(self, obj: object) -> None:
        prepared = self._prepare(obj)
        with self._locked_table() as table:
            table.put(*prepared)
        self._counters.puts += 1

    def batch_put(self, objs: Iterable[object]) -> None:
        prepared = [self._prepare(obj) for obj in objs]
        with self._locked_table() as table:
            for item in prepared:
                table.put(*item)
        self._counters.puts += len(prepared)

    def delete(self, obj: object) -> None:
        prepared = self._keys(obj)
        with self._locked_table() as table:
            table.delete(*prepared)
        self._counters.deletes += 1

    def batch_delete(self, objs: Iterable[object]) -> None:
        prepared = [self._keys(obj) for obj in objs]
        with self._locked_table() as table:
            for item in prepared:
                table.delete(*item)
        self._counters.deletes += len(prepared)

    def add(self, obj: object) -> bool:
        """Store ``obj`` only if none of its keys is in use or was deleted moments ago.

        This is how a :class:`~stockpyle.ChainedStore` back-fills: a value read
        from a lower layer must never replace a newer one written meanwhile, nor
        bring back an object deleted meanwhile (deletes leave a tombstone for
        ``tombstone_lifetime`` seconds).

        :returns: whether the object was stored.
        """
        prepared = self._prepare(obj)
        with self._locked_table() as table:
            return table.add(*prepared)

    def batch_add(self, objs: Iterable[object]) -> list[bool]:
        """:meth:`add` for many objects; returns which were stored."""
        prepared = [self._prepare(obj) for obj in objs]
        with self._locked_table() as table:
            return [table.add(*item) for item in prepared]

    def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        get = self.get
        return [get(klass, kd) for kd in keydicts]

    def invalidate_class(self, klass: type) -> None:
        """Drop every stored instance of ``klass`` (subclasses included).

        For ``tombstone_lifetime`` seconds afterwards, :meth:`add` refuses such
        objects, as a delete's tombstones would.  For a ThreadLocalStore this
        reaches the calling thread's contents only.
        """
        with self._locked_table() as table:
            table.invalidate_class(klass)

    def clear(self) -> None:
        """Remove every object (for ThreadLocalStore: of the calling thread)."""
        with self._locked_table() as table:
            table.clear()

    def reclaim_expired(self) -> int:
        """Remove expired objects now; returns how many were removed."""
        with self._locked_table() as table:
            before = table.expirations
            table.reclaim()
            return table.expirations - before

    def release(self) -> None:
        """Nothing to release: the store holds no connections or files, and keeps its contents."""


class ProcessMemoryStore(_InProcessStore):
    """A thread-safe store in this process's memory; the fastest layer.

    :param polymorphic: also index objects under their storable base classes.
    :param lifetime_cb: ``obj -> lifetime``; see :mod:`stockpyle.lifetimes`.
    :param maxsize: keep at most this many objects, evicting the least
        recently used; ``None`` (default) for no bound.
    :param tombstone_lifetime: seconds a deleted key refuses back-fills
        (:meth:`add`), so a reader racing the delete cannot resurrect the object.
    """

    def __init__(
        self,
        *,
        polymorphic: bool = False,
        lifetime_cb: LifetimeCallback | None = None,
        maxsize: int | None = None,
        tombstone_lifetime: float = 5.0,
    ) -> None:
        super().__init__(
            polymorphic=polymorphic, lifetime_cb=lifetime_cb, maxsize=maxsize, tombstone_lifetime=tombstone_lifetime
        )
        self._table = self._new_table()
        self._index = self._table.index
        self._lock = threading.RLock()
        self._guard = _Guard(self._lock, self._table)

    def _locked_table(self) -> AbstractContextManager[MemoryTable]:
        return self._guard

    def direct_index(self) -> DirectIndex | None:
        """The index, for a :class:`~stockpyle.ChainedStore` with this store on top to probe on its hit path.

        Offered only when every hit needs no bookkeeping: a bounded store must
        record each use for its LRU order, and a subclass that overrides
        :meth:`get` must be called, so neither offers it.
        """
        if self.maxsize is not None or type(self).get is not ProcessMemoryStore.get:
            return None
        if self._direct is None:
            self._direct = DirectIndex(self._index)
        return self._direct

    def __len__(self) -> int:
        """Number of objects stored (expired ones may be counted until reclaimed)."""
        return len(self._table)

    @property
    def evictions(self) -> int:
        """Objects evicted so far because of ``maxsize``."""
        return self._table.evictions

    def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        # The hit path is the hottest code in stockpyle.  A single-attribute
        # lookup with a str or int value is tried directly as (klass, name, value): only
        # declared keys are ever stored, so a hit needs no validation; anything
        # else, and every miss, goes through lookup_key(), which validates.
        self._countdown -= 1
        if self._countdown <= 0:  # <=: concurrent decrements may skip zero
            return self._sampled_get(klass, keydict)
        rec = None
        try:
            if len(keydict) == 1:
                (name,) = keydict
                value = keydict[name]
                if type(value) is str or type(value) is int:
                    rec = self._index.get((klass, name, value))
        except TypeError:
            pass  # not a dict (get(Foo, 1)): lookup_key() below explains what a lookup is
        if rec is None:
            rec = self._index.get(lookup_key(klass, keydict))
            if rec is None:
                self._counters.misses += 1
                return None
        expires = rec.expires
        if expires is not None and expires <= _monotonic():
            with self._lock:
                self._table.expire(rec)
            self._counters.misses += 1
            return None
        if self.maxsize is not None:
            self._table.touch(rec)
        return rec.obj  # type: ignore[return-value]


class ThreadLocalStore(_InProcessStore):
    """A store whose contents are private to each thread.

    Objects put by one thread are invisible to every other thread; a thread's
    contents are freed when the thread ends.

    :param polymorphic: also index objects under their storable base classes.
    :param lifetime_cb: ``obj -> lifetime``; see :mod:`stockpyle.lifetimes`.
    :param maxsize: per-thread bound on the number of objects (LRU), or ``None``.
    :param tombstone_lifetime: seconds a deleted key refuses back-fills (see
        :meth:`ProcessMemoryStore.add`).
    """

    def __init__(
        self,
        *,
        polymorphic: bool = False,
        lifetime_cb: LifetimeCallback | None = None,
        maxsize: int | None = None,
        tombstone_lifetime: float = 5.0,
    ) -> None:
        super().__init__(
            polymorphic=polymorphic, lifetime_cb=lifetime_cb, maxsize=maxsize, tombstone_lifetime=tombstone_lifetime
        )
        # threading.local frees a thread's __dict__ (and so its table) when the thread ends
        self._local = threading.local()

    def _table(self) -> MemoryTable:
        try:
            return self._local.table  # type: ignore[no-any-return]
        except AttributeError:
            table = self._local.table = self._new_table()
            return table

    def _locked_table(self) -> AbstractContextManager[MemoryTable]:
        # only the owning thread ever sees its table: no lock needed
        return nullcontext(self._table())

    def __len__(self) -> int:
        """Number of objects stored for the calling thread."""
        return len(self._table())

    def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        self._countdown -= 1
        if self._countdown <= 0:
            return self._sampled_get(klass, keydict)
        table = self._table()
        rec = table.index.get(lookup_key(klass, keydict))
        if rec is None or (rec.expires is not None and rec.expires <= _monotonic()):
            if rec is not None:
                table.expire(rec)
            self._counters.misses += 1
            return None
        if self.maxsize is not None:
            table.touch(rec)
        return rec.obj  # type: ignore[return-value]
