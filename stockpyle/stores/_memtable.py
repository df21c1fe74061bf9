"""The in-process storage engine under :class:`~stockpyle.ProcessMemoryStore` and :class:`~stockpyle.ThreadLocalStore`.

A :class:`MemoryTable` maps every in-process key to a
:class:`~stockpyle.stores.base.MemoryEntry` (one per stored object, shared by
all of its keys) and object identity to the same entry, so a re-put after a key
attribute changed finds and removes the keys the object occupied before.

Memory stays proportional to the live entries:

* entries with a lifetime are also recorded in a heap ordered by expiry time,
  from which expired entries are reclaimed as writes happen -- entries that
  are never read again do not accumulate.  The heap holds ``(expires, seq,
  id)`` triples, never the objects, so a replaced object is freed at once; a
  triple whose entry was replaced meanwhile is recognised by its sequence
  number and skipped, and the heap is rebuilt from the live entries whenever
  dead triples outnumber them;
* tombstones (see :mod:`stockpyle.consistency`) are purged once they have
  expired, whenever their number doubles.

Every decision about whether a write may happen is taken by the rules in
:mod:`stockpyle.consistency`.  The table is not thread-safe by itself: its
store holds a lock around writes (or, for thread-local tables, needs none).
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Final

from ..consistency import ABSENT_SLOT, Slot, SlotKind, add_allowed, put_allowed
from ..keys import Key
from .base import MemoryEntry

__all__ = ["MemoryTable"]

#: Dead heap triples tolerated beyond twice the live entries before a rebuild.
_HEAP_SLACK: Final = 64
#: Tombstones kept before the first purge of expired ones.
_TOMBSTONE_PURGE_AT: Final = 1024


class MemoryTable:
    """Key -> entry and object identity -> entry, with expiry, LRU bound and tombstones.

    :param maxsize: keep at most this many objects (least recently used go
        first), or ``None``.
    :param clock: the clock expiry times are measured on (monotonic).
    :param tombstone_lifetime: seconds a deleted key refuses add-only writes.
    """

    __slots__ = (
        "clock", "class_stones", "evictions", "expirations", "heap", "index", "lock", "maxsize", "records",
        "seq", "tombstone_lifetime", "tombstones", "_purge_at", "__weakref__",
    )  # fmt: skip

    def __init__(self, maxsize: int | None, clock: Callable[[], float], tombstone_lifetime: float = 0.0) -> None:
        self.index: dict[Key, MemoryEntry] = {}
        # object id -> entry; for bounded tables insertion/recency order is the LRU order
        self.records: dict[int, MemoryEntry] = OrderedDict() if maxsize is not None else {}
        self.maxsize = maxsize
        self.clock = clock
        self.evictions = 0
        self.expirations = 0
        self.seq = 0
        self.heap: list[tuple[float, int, int]] = []
        # key -> (clock time until which it refuses add-only writes, the version
        # deleted, the deleted object's first key)
        self.tombstones: dict[Key, tuple[float, Any, Key | None]] = {}
        # class -> clock time until which add-only writes of its instances are
        # refused (after every entry of the class was invalidated at once)
        self.class_stones: dict[type, float] = {}
        self.tombstone_lifetime = tombstone_lifetime
        self._purge_at = _TOMBSTONE_PURGE_AT
        #: guards writes when more than one thread may write (the owning store decides)
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return len(self.records)

    # -- the consistency rules' view of the table -------------------------------

    def _slots(self, keys: list[Key], now: float) -> list[Slot]:
        """The state of each of ``keys`` (expired entries and tombstones are absent)."""
        index, tombstones = self.index, self.tombstones
        slots = []
        for key in keys:
            rec = index.get(key)
            if rec is not None and (rec.expires is None or rec.expires > now):
                slots.append(Slot(SlotKind.ENTRY, rec.keys[0], rec.version))
                continue
            stone = tombstones.get(key) if tombstones else None
            if stone is not None and stone[0] > now:
                slots.append(Slot(SlotKind.TOMBSTONE, stone[2], stone[1]))
            else:
                slots.append(ABSENT_SLOT)
        return slots

    def _class_refused(self, obj: object, now: float) -> bool:
        stones = self.class_stones
        return any(stones.get(base, 0.0) > now for base in type(obj).__mro__)

    # -- writes -----------------------------------------------------------------

    def drop(self, rec: MemoryEntry) -> None:
        """Remove ``rec`` from the table under every key it holds."""
        records = self.records
        oid = id(rec.obj)
        if records.get(oid) is rec:
            del records[oid]
        index = self.index
        for key in rec.keys:
            if index.get(key) is rec:
                del index[key]

    def put(self, obj: object, keys: list[Key], expires: float | None, version: Any = None) -> bool:
        """Store ``obj`` under ``keys``.

        :returns: False when the consistency rules refuse the write (a newer
            version of the object is stored, or this version was deleted).
        """
        tombstones = self.tombstones
        if version is not None and not put_allowed(keys[0], version, self._slots(keys, self.clock())):
            return False
        if tombstones:
            for key in keys:
                tombstones.pop(key, None)
        held = tuple(keys)
        old = self.records.get(id(obj))
        if old is not None and expires is None and old.expires is None and old.version is version and old.keys == held:
            # the object is stored again under the very keys it holds, with the
            # same version and no lifetime: a new entry would equal this one
            # field for field (the heap holds nothing for either), and every one
            # of these keys already maps to it, so no other object holds them.
            # Only its LRU position changes.
            if self.maxsize is not None:
                self.records.move_to_end(id(obj))  # type: ignore[attr-defined]
            return True
        self._install(obj, held, expires, version, old)
        return True

    def _install(
        self, obj: object, held: tuple[Key, ...], expires: float | None, version: Any, old: MemoryEntry | None
    ) -> None:
        """Store ``obj`` under the keys ``held``, replacing ``old`` (its entry, or None) and older copies."""
        index = self.index
        records = self.records
        oid = id(obj)
        if expires is not None and expires <= self.clock():
            # stored already expired: nothing is installed, but the copies it
            # replaces are stale all the same
            if old is not None:
                self.drop(old)
            for key in held:
                other = index.get(key)
                if other is not None:
                    self.drop(other)
            return
        # Every entry this one replaces leaves the table under all of its keys:
        # the object's own earlier entry (its key attributes may have changed
        # since), and any other object holding one of these keys (an older copy
        # of the same entity, so every key it occupied is stale now).  Their
        # keys that the new entry holds too are overwritten below rather than
        # deleted and inserted again, which would leave dead slots behind (and
        # an entry holding exactly the new keys needs no key-by-key look).
        if old is not None and old.keys != held:
            for key in old.keys:
                if key not in held and index.get(key) is old:
                    del index[key]
        displaced = old
        for key in held:
            other = index.get(key)
            if other is not None and other is not displaced:
                displaced = other
                other_id = id(other.obj)
                if records.get(other_id) is other:
                    del records[other_id]
                if other.keys == held:
                    continue
                for other_key in other.keys:
                    if other_key not in held and index.get(other_key) is other:
                        del index[other_key]
        self.seq = seq = self.seq + 1
        rec = MemoryEntry(obj, expires, held, version, seq)
        for key in held:
            index[key] = rec
        records[oid] = rec
        if old is not None and self.maxsize is not None:
            records.move_to_end(oid)  # type: ignore[attr-defined]
        if expires is not None:
            heap = self.heap
            heapq.heappush(heap, (expires, seq, oid))
            if heap[0][0] <= self.clock():
                self.reclaim()
            elif len(heap) > 2 * len(records) + _HEAP_SLACK:
                self._rebuild_heap()
        if self.maxsize is not None:
            while len(records) > self.maxsize:
                self.drop(records.popitem(last=False)[1])  # type: ignore[call-arg]
                self.evictions += 1

    def add(self, obj: object, keys: list[Key], expires: float | None, version: Any = None) -> bool:
        """Put ``obj`` only if none of its keys holds a live object or a tombstone.

        :returns: whether the object was stored.
        """
        now = self.clock()
        index, tombstones = self.index, self.tombstones
        # when no key holds an entry or a tombstone every slot is absent, which
        # the rule always allows: only otherwise are the slots worth building
        if len(keys) == 1:  # the common case, without the generators
            (key,) = keys
            taken = key in index or (bool(tombstones) and key in tombstones)
        else:
            taken = any(key in index for key in keys) or (bool(tombstones) and any(key in tombstones for key in keys))
        if taken and not add_allowed(self._slots(keys, now)):
            return False
        if self.class_stones and self._class_refused(obj, now):
            return False
        self._install(obj, tuple(keys), expires, version, self.records.get(id(obj)))
        return expires is None or expires > now

    def delete(self, obj: object, keys: list[Key], version: Any = None) -> None:
        """Remove ``obj`` under ``keys`` (and every key its stored copies held); leave tombstones."""
        old = self.records.get(id(obj))
        if old is not None:
            self.drop(old)
        index = self.index
        for key in keys:
            other = index.get(key)
            if other is not None:
                self.drop(other)
        if not self.tombstone_lifetime:
            return
        now = self.clock()
        stone = (now + self.tombstone_lifetime, version, keys[0] if keys else None)
        tombstones = self.tombstones
        for key in keys:
            tombstones[key] = stone
        if len(tombstones) > self._purge_at:
            for key in [k for k, (until, _, _) in tombstones.items() if until <= now]:
                del tombstones[key]
            self._purge_at = max(_TOMBSTONE_PURGE_AT, 2 * len(tombstones))

    def invalidate_keys(self, keys: Iterable[Key]) -> int:
        """Drop the objects stored under any of ``keys`` (under all their keys) and tombstone ``keys``.

        The tombstones refuse add-only writes for ``tombstone_lifetime``
        seconds, so a fill that read a lower layer before this invalidation
        cannot install the old value.

        :returns: how many objects were dropped.
        """
        index = self.index
        dropped = 0
        keys = list(keys)
        for key in keys:
            rec = index.get(key)
            if rec is not None:
                self.drop(rec)
                dropped += 1
        if self.tombstone_lifetime and keys:
            stone = (self.clock() + self.tombstone_lifetime, None, None)
            tombstones = self.tombstones
            for key in keys:
                tombstones[key] = stone
        return dropped

    def invalidate_class(self, klass: type) -> int:
        """Drop every object that is an instance of ``klass``; returns how many.

        For ``tombstone_lifetime`` seconds afterwards, add-only writes of such
        objects are refused, as a delete's tombstone would refuse them.
        """
        dead = [rec for rec in self.records.values() if isinstance(rec.obj, klass)]
        for rec in dead:
            self.drop(rec)
        if self.tombstone_lifetime:
            now = self.clock()
            stones = self.class_stones
            for key in [k for k, until in stones.items() if until <= now]:
                del stones[key]
            stones[klass] = now + self.tombstone_lifetime
        return len(dead)

    # -- upkeep -----------------------------------------------------------------

    def touch(self, rec: MemoryEntry) -> None:
        """Mark ``rec`` most recently used (bounded tables only).

        Safe without the store's lock: ``move_to_end`` is a single C-level
        operation, and a record removed meanwhile simply is not found.
        """
        try:
            self.records.move_to_end(id(rec.obj))  # type: ignore[attr-defined]
        except KeyError:
            pass

    def expire(self, rec: MemoryEntry) -> None:
        """Remove ``rec``, found expired by a reader, unless it was replaced meanwhile."""
        if self.index.get(rec.keys[0]) is rec:
            self.drop(rec)
            self.expirations += 1

    def reclaim(self) -> None:
        """Remove every entry whose lifetime has ended."""
        now = self.clock()
        heap, records = self.heap, self.records
        while heap and heap[0][0] <= now:
            _expires, seq, oid = heapq.heappop(heap)
            rec = records.get(oid)
            if rec is not None and rec.seq == seq:
                self.drop(rec)
                self.expirations += 1

    def _rebuild_heap(self) -> None:
        # dead triples (entries replaced or deleted since) outnumber the live
        # ones: keep only the triples of live entries
        self.heap = [(rec.expires, rec.seq, oid) for oid, rec in self.records.items() if rec.expires is not None]
        heapq.heapify(self.heap)

    def clear(self) -> None:
        """Forget every entry and tombstone."""
        self.index.clear()
        self.records.clear()
        self.tombstones.clear()
        self.class_stones.clear()
        self.heap.clear()
