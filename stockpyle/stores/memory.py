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
import weakref
from collections.abc import Iterable
from contextlib import AbstractContextManager
from time import perf_counter
from typing import Any, ClassVar, TypeVar

from ..exceptions import ConfigurationError
from ..keys import Key, key_model, lookup_key, object_keys, version_of
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
    #: one table per thread (see ThreadLocalStore)
    per_thread: ClassVar[bool] = False
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
        # what object_keys() and version_of() compute, from one key model lookup
        check_storable(obj)
        model = key_model(type(obj))
        keys = model.keys_of(obj) if not self.polymorphic or len(model.bases) == 1 else object_keys(obj, True)
        attr = model.version_attr
        lifetimes = self.lifetimes
        expires = None if lifetimes.trivial else lifetimes.expires_at(obj, _monotonic)
        return obj, keys, expires, None if attr is None else getattr(obj, attr, None)

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

    def _all_tables(self) -> list[MemoryTable]:
        """Every table of the store (one; a ThreadLocalStore has one per thread)."""
        raise NotImplementedError  # pragma: no cover - both subclasses define it

    def invalidate_class(self, klass: type) -> None:
        """Drop every stored instance of ``klass`` (subclasses included), in every thread's contents.

        For ``tombstone_lifetime`` seconds afterwards, :meth:`add` refuses such
        objects, as a delete's tombstones would.
        """
        for table in self._all_tables():
            with table.lock:
                table.invalidate_class(klass)

    def invalidate_keys(self, keys: Iterable[Key]) -> int:
        """Drop the objects stored under any of ``keys``, in every thread's contents; tombstone the keys.

        This is how an invalidation bus (and a chain's own writes) keeps an
        in-process layer coherent: the tombstones refuse back-fills of copies
        read before the invalidation for ``tombstone_lifetime`` seconds.

        :returns: how many objects were dropped.
        """
        keys = list(keys)
        dropped = 0
        for table in self._all_tables():
            with table.lock:
                dropped += table.invalidate_keys(keys)
        return dropped

    def invalidate_all(self) -> None:
        """Drop every object, in every thread's contents (an invalidation bus lost messages)."""
        for table in self._all_tables():
            with table.lock:
                table.clear()

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
        self._lock = self._table.lock
        self._guard = _Guard(self._lock, self._table)

    def _locked_table(self) -> AbstractContextManager[MemoryTable]:
        return self._guard

    def _all_tables(self) -> list[MemoryTable]:
        return [self._table]

    def put(self, obj: object) -> None:
        # _InProcessStore.put with _prepare() and the guard inlined: the
        # single-object write is the commonest one, and each Python-level call
        # saved here is a sizeable share of its cost (the same steps, in the
        # same order: refuse None, keys, lifetime, version, write under the lock)
        if obj is None:
            check_storable(obj)
        model = key_model(type(obj))
        keys = model.keys_of(obj) if not self.polymorphic or len(model.bases) == 1 else object_keys(obj, True)
        lifetimes = self.lifetimes
        expires = None if lifetimes.trivial else lifetimes.expires_at(obj, _monotonic)
        attr = model.version_attr
        version = None if attr is None else getattr(obj, attr, None)
        with self._lock:
            self._table.put(obj, keys, expires, version)
        self._counters.puts += 1

    def add(self, obj: object) -> bool:
        # _InProcessStore.add without the guard object (every back-fill of a chain's L2 hit)
        prepared = self._prepare(obj)
        with self._lock:
            return self._table.add(*prepared)

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

    #: one table per thread: a chain's writes reach the other threads' copies through invalidate_keys()
    per_thread = True

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
        # every thread's table, weakly: invalidations from other threads reach them all
        self._tables: weakref.WeakSet[MemoryTable] = weakref.WeakSet()
        self._tables_lock = threading.Lock()

    def _table(self) -> MemoryTable:
        try:
            return self._local.table  # type: ignore[no-any-return]
        except AttributeError:
            table = self._local.table = self._new_table()
            with self._tables_lock:
                self._tables.add(table)
            return table

    def _locked_table(self) -> _Guard:
        # the owning thread writes its table; invalidations may come from others
        table = self._table()
        return _Guard(table.lock, table)

    def _all_tables(self) -> list[MemoryTable]:
        with self._tables_lock:
            return list(self._tables)

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
