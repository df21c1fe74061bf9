"""The store contract: :class:`BaseStore` and :class:`BaseDictionaryStore`."""

from __future__ import annotations

import abc
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from time import perf_counter
from types import TracebackType
from typing import Any, ClassVar, Final, TypeVar

from ..exceptions import ConfigurationError, NotStorableError, SerializationError, StoreError
from ..keys import Key, encode_key, is_older, lookup_key, object_keys
from ..lifetimes import LifetimeCallback, LifetimePolicy
from ..stats import StoreStats

__all__ = ["MISS", "BaseDictionaryStore", "BaseStore", "KeyDict"]

log = logging.getLogger("stockpyle.stores")

T = TypeVar("T")
KeyDict = Mapping[str, Any]


class _Miss:
    """The type of :data:`MISS`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "MISS"


#: Internal "nothing stored here" marker.  Stores never use ``None`` or
#: truthiness for this: an object whose ``__bool__``/``__len__`` is false is a hit.
MISS: Final = _Miss()


def _check_storable(obj: object) -> None:
    if obj is None:
        raise NotStorableError("None cannot be stored: it has no __stockpyle_keys__")


_OPERATIONS: Final = ("get", "batch_get", "put", "batch_put", "delete", "batch_delete")
# ids of the stores whose counted operation is running in this thread: an
# operation implemented with other operations (batch_get looping over get, a
# subclass calling super()) is counted once, as the operation the caller made
_counting = threading.local()


def _counted(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap one of the six operations so it is counted and timed in ``store.stats()``."""
    batch = name.startswith("batch_")
    lookup = name.endswith("get")

    @functools.wraps(method)
    def operation(self: BaseStore, *args: Any) -> Any:
        active: set[int] = _counting.__dict__.setdefault("ids", set())
        if id(self) in active:
            return method(self, *args)
        if batch:
            # materialise iterables once, so they can be counted afterwards
            args = (*args[:-1], list(args[-1]))
        stats = self.stats()
        active.add(id(self))
        start = perf_counter()
        try:
            result = method(self, *args)
        except StoreError:
            stats.errors += 1
            raise
        finally:
            active.discard(id(self))
        stats.timer(name).add(perf_counter() - start)
        if lookup:
            if batch:
                found = sum(obj is not None for obj in result)
                stats.hits += found
                stats.misses += len(result) - found
            elif result is None:
                stats.misses += 1
            else:
                stats.hits += 1
        elif name.endswith("put"):
            stats.puts += len(args[-1]) if batch else 1
        else:
            stats.deletes += len(args[-1]) if batch else 1
        return result

    operation._stockpyle_counted = True  # type: ignore[attr-defined]
    return operation


class BaseStore(abc.ABC):
    """The abstract store contract.

    Subclasses implement :meth:`put`, :meth:`get` and :meth:`delete`; the batch
    operations default to looping over them and should be overridden where the
    backend has native multi-key calls.  Every store is a context manager whose
    exit calls :meth:`release`.

    Every store counts and times its operations (:meth:`stats`): the six
    operations of a subclass are wrapped automatically, which costs well under
    a microsecond per call -- nothing next to a network round trip.  Stores
    whose calls take less than that (the in-process ones) set
    ``_auto_stats = False`` and count inline.

    :param polymorphic: also index objects under their storable base classes.
    :param lifetime_cb: ``obj -> lifetime`` for this store (see
        :mod:`stockpyle.lifetimes`).
    """

    #: True when the store can expire entries (lifetimes apply).
    supports_expiry: bool = True
    #: Whether the six operations are wrapped to maintain :meth:`stats`.
    _auto_stats: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls._auto_stats:
            return
        for name in _OPERATIONS:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "_stockpyle_counted", False):
                setattr(cls, name, _counted(name, method))

    def __init__(self, *, polymorphic: bool = False, lifetime_cb: LifetimeCallback | None = None) -> None:
        if not isinstance(polymorphic, bool):
            raise ConfigurationError(f"polymorphic must be True or False; got {polymorphic!r}")
        self.polymorphic = polymorphic
        self.lifetimes = LifetimePolicy(lifetime_cb)
        self._stockpyle_stats: StoreStats = StoreStats()

    def stats(self) -> StoreStats:
        """This store's counters and sampled latencies (the live object).

        :returns: a :class:`~stockpyle.stats.StoreStats`; ``.as_dict()`` gives plain data.
        """
        # created on first use, so subclasses that skip BaseStore.__init__
        # still count (never through self.__dict__: touching it makes every
        # attribute access of the instance slower in CPython 3.11+)
        try:
            return self._stockpyle_stats
        except AttributeError:
            self._stockpyle_stats = StoreStats()
            return self._stockpyle_stats

    def reset_stats(self) -> None:
        """Set the counters back to zero and forget the latency samples."""
        self.stats().reset()

    @property
    def lifetime_cb(self) -> LifetimeCallback | None:
        """The lifetime callback given to the constructor."""
        return self.lifetimes.lifetime_cb

    def configure(self, classes: Iterable[type], lifetime: Any) -> None:
        """Set the lifetime of instances of ``classes`` (and subclasses) in this store.

        A ``lifetime_cb`` result other than ``None`` takes precedence.
        """
        self.lifetimes.configure(classes, lifetime)

    # -- the six operations -------------------------------------------------

    @abc.abstractmethod
    def put(self, obj: object) -> None:
        """Store ``obj`` under every one of its keys (replacing older entries)."""

    @abc.abstractmethod
    def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        """Return the stored ``klass`` instance matching ``keydict``, or ``None``."""

    @abc.abstractmethod
    def delete(self, obj: object) -> None:
        """Remove ``obj`` from the store under every one of its keys."""

    def batch_put(self, objs: Iterable[object]) -> None:
        """Store every object of ``objs``."""
        for obj in objs:
            self.put(obj)

    def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        """Look up many objects; the result is in request order with ``None`` per miss."""
        return [self.get(klass, kd) for kd in keydicts]

    def batch_delete(self, objs: Iterable[object]) -> None:
        """Remove every object of ``objs``."""
        for obj in objs:
            self.delete(obj)

    # -- lifecycle ----------------------------------------------------------

    def release(self) -> None:  # noqa: B027 - optional hook with a no-op default
        """Release connections, files and other resources held by the store."""

    def __enter__(self: T) -> T:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} polymorphic={self.polymorphic}>"


# BaseStore's own batch defaults are counted too (subclasses' are wrapped by
# __init_subclass__)
for _name in ("batch_get", "batch_put", "batch_delete"):
    setattr(BaseStore, _name, _counted(_name, BaseStore.__dict__[_name]))
del _name


# ----------------------------------------------------------------------------
# in-process record table (ProcessMemoryStore, ThreadLocalStore)


class _Record:
    """One stored object, every key it occupies (shared by those keys), and its version when stored."""

    __slots__ = ("obj", "expires", "keys", "version")

    def __init__(self, obj: object, expires: float | None, keys: tuple[Key, ...], version: Any = None) -> None:
        self.obj = obj
        self.expires = expires
        self.keys = keys
        self.version = version


class MemoryTable:
    """The in-process storage engine: key -> record, and object identity -> record.

    The table holds a strong reference to every stored object, so ``id(obj)``
    identifies a stored object for as long as it is stored; that is how a
    re-put finds and removes the keys an object occupied before one of its key
    attributes changed.  Not thread-safe by itself.
    """

    __slots__ = (
        "index", "records", "maxsize", "clock", "evictions", "expirations",
        "tombstones", "tombstone_lifetime", "_tombstone_purge_at",
    )  # fmt: skip

    def __init__(self, maxsize: int | None, clock: Callable[[], float], tombstone_lifetime: float = 0.0) -> None:
        self.index: dict[Key, _Record] = {}
        # insertion/recency order doubles as the LRU order
        self.records: OrderedDict[int, _Record] = OrderedDict()
        self.maxsize = maxsize
        self.clock = clock
        self.evictions = 0
        self.expirations = 0
        # key -> (clock time until which add() must not fill that key, the
        # version deleted, the deleted object's first key): a back-fill racing
        # a delete would otherwise resurrect the object, and so would a late
        # put of the deleted version
        self.tombstones: dict[Key, tuple[float, Any, Key | None]] = {}
        self.tombstone_lifetime = tombstone_lifetime
        self._tombstone_purge_at = 1024

    def __len__(self) -> int:
        return len(self.records)

    def drop(self, rec: _Record) -> None:
        records = self.records
        if records.get(id(rec.obj)) is rec:
            del records[id(rec.obj)]
        index = self.index
        for key in rec.keys:
            if index.get(key) is rec:
                del index[key]

    def put(self, obj: object, keys: list[Key], expires: float | None, version: Any = None) -> bool:
        """Store ``obj`` under ``keys``; returns False when a newer version is stored."""
        index = self.index
        owner = keys[0] if keys else None
        if version is not None:
            # Versions count the changes of one object, so they are compared only
            # with records and tombstones of the same object (same first key):
            # another object may hold, or have held, a key value this one takes.
            for key in keys:
                other = index.get(key)
                if other is not None and other.keys[0] == owner and is_older(version, other.version):
                    return False  # concurrent writers converge on the newest version
        tombstones = self.tombstones
        if tombstones:
            if version is not None:
                now = self.clock()
                for key in keys:
                    stone = tombstones.get(key)
                    # a late write of this object's deleted version (or an older one)
                    if stone is not None and stone[0] > now and stone[2] == owner and stone[1] is not None:  # noqa: SIM102
                        if not is_older(stone[1], version):
                            return False
            for key in keys:
                tombstones.pop(key, None)
        old = self.records.get(id(obj))
        if old is not None:
            self.drop(old)
        for key in keys:
            other = index.get(key)
            if other is not None:
                # another object held this key: it is an older copy of the same
                # entity, so every key it occupied is stale now
                self.drop(other)
        if expires is not None and expires <= self.clock():
            return True
        rec = _Record(obj, expires, tuple(keys), version)
        for key in keys:
            index[key] = rec
        self.records[id(obj)] = rec
        if self.maxsize is not None:
            while len(self.records) > self.maxsize:
                self.drop(self.records.popitem(last=False)[1])
                self.evictions += 1
        return True

    def delete(self, obj: object, keys: list[Key], version: Any = None) -> None:
        old = self.records.get(id(obj))
        if old is not None:
            self.drop(old)
        index = self.index
        for key in keys:
            other = index.get(key)
            if other is not None:
                self.drop(other)
        if self.tombstone_lifetime:
            stone = (self.clock() + self.tombstone_lifetime, version, keys[0] if keys else None)
            tombstones = self.tombstones
            for key in keys:
                tombstones[key] = stone
            if len(tombstones) > self._tombstone_purge_at:
                now = self.clock()
                for key in [k for k, (until, _, _) in tombstones.items() if until <= now]:
                    del tombstones[key]
                self._tombstone_purge_at = max(1024, 2 * len(tombstones))

    def add(self, obj: object, keys: list[Key], expires: float | None, version: Any = None) -> bool:
        """Put ``obj`` only if none of its keys holds a live object or a tombstone.

        :returns: whether the object was stored.
        """
        now = self.clock()
        index, tombstones = self.index, self.tombstones
        for key in keys:
            rec = index.get(key)
            if rec is not None and (rec.expires is None or rec.expires > now):
                return False
            if tombstones:
                stone = tombstones.get(key)
                if stone is not None and stone[0] > now:
                    return False
        return self.put(obj, keys, expires, version)

    def touch(self, rec: _Record) -> None:
        """Mark ``rec`` most recently used (bounded tables only).

        Safe without the store's lock: ``move_to_end`` is a single C-level
        operation, and a record removed meanwhile simply is not found.
        """
        try:
            self.records.move_to_end(id(rec.obj))
        except KeyError:
            pass

    def purge_expired(self) -> int:
        now = self.clock()
        dead = [rec for rec in self.records.values() if rec.expires is not None and rec.expires <= now]
        for rec in dead:
            self.drop(rec)
        self.expirations += len(dead)
        return len(dead)

    def clear(self) -> None:
        self.index.clear()
        self.records.clear()
        self.tombstones.clear()


# ----------------------------------------------------------------------------
# generic dictionary store


class BaseDictionaryStore(BaseStore):
    """Turn any :class:`~collections.abc.MutableMapping` into a complete store.

    Each of an object's keys maps to an entry ``(obj, expires_at, keys)``, where
    ``expires_at`` is a unix time (or ``None``) and ``keys`` are the mapping keys
    the object occupies, so a re-put after a key attribute changed removes the
    entries under the old values.  Expired entries are removed when they are read.

    Mapping keys are the in-process :data:`~stockpyle.keys.Key` tuples unless
    ``string_keys=True``, which uses :func:`~stockpyle.keys.encode_key` text
    (needed for mappings that persist or pickle their keys).

    Subclasses adapt it to a backend by overriding a few hooks rather than the
    operations: :meth:`map_key` (key form), :meth:`_make_entry`,
    :meth:`_entry_keys` and :meth:`_load` (entry form and decoding),
    :meth:`_owns` (a check that a read entry really belongs to the key),
    :meth:`_check_value` (validation before anything is written) and the
    :meth:`_reading` / :meth:`_writing` guards (locking, error mapping, sync).

    :param mapping: the mapping that holds the entries.
    :param string_keys: use canonical text keys instead of tuples.
    """

    #: The clock entries' expiry times are measured on: wall-clock unix time,
    #: because a mapping may outlive the process (and be shared with others).
    clock: Callable[[], float] = staticmethod(time.time)

    def __init__(
        self,
        mapping: MutableMapping[Any, Any],
        *,
        polymorphic: bool = False,
        lifetime_cb: LifetimeCallback | None = None,
        string_keys: bool = False,
    ) -> None:
        super().__init__(polymorphic=polymorphic, lifetime_cb=lifetime_cb)
        candidate: object = mapping
        if not isinstance(candidate, MutableMapping) and not all(
            hasattr(candidate, name) for name in ("__getitem__", "__setitem__", "__delitem__")
        ):
            raise ConfigurationError(f"BaseDictionaryStore needs a MutableMapping; got {type(mapping).__name__}")
        self.mapping = mapping
        self.string_keys = string_keys
        self._lock = threading.RLock()

    # -- hooks ----------------------------------------------------------------

    def map_key(self, key: Key) -> Hashable:
        """The mapping key used for one stockpyle key."""
        return encode_key(key) if self.string_keys else key

    def _make_entry(self, obj: object, expires: float | None, mkeys: tuple[Hashable, ...]) -> Any:
        """The value stored under each of an object's mapping keys."""
        return (obj, expires, mkeys)

    def _entry_keys(self, entry: Any) -> Iterable[Hashable]:
        """The mapping keys the object of a stored entry occupies."""
        return entry[2]  # type: ignore[no-any-return]

    def _load(self, mkey: Hashable) -> Any:
        """The entry at ``mkey`` (a tuple whose first two items are the object and its expiry), or :data:`MISS`."""
        try:
            return self.mapping[mkey]
        except KeyError:
            return MISS

    def _owns(self, key: Key, obj: object) -> bool:
        """Whether ``obj``, read under ``key``, really is stored under that key."""
        return True

    def _check_value(self, obj: object, expires: float | None) -> None:
        """Refuse, before anything is written, an object the mapping could not hold."""

    def _reading(self) -> AbstractContextManager[Any]:
        """Guard around one read (no lock by default: mappings read atomically)."""
        return nullcontext()

    def _writing(self, action: str) -> AbstractContextManager[Any]:
        """Guard around one write operation."""
        return self._lock

    # -- shared machinery -----------------------------------------------------

    def _expires(self, obj: object) -> float | None:
        if self.lifetimes.trivial:
            return None
        return self.lifetimes.expires_at(obj, self.clock)

    def _read(self, key: Key) -> Any:
        mkey = self.map_key(key)
        with self._reading():
            entry = self._load(mkey)
            if entry is MISS:
                return MISS
            obj, expires = entry[0], entry[1]
            if expires is not None and expires <= self.clock():
                self._discard(mkey)
                return MISS
        return obj if self._owns(key, obj) else MISS

    def _discard(self, mkey: Hashable) -> None:
        # remove an expired entry unless a put replaced it meanwhile; compare
        # expiry times, not objects: backends return fresh copies, and user
        # objects need not define __eq__
        with self._writing("remove an expired entry"):
            try:
                current = self._load(mkey)
            except SerializationError:
                return
            if current is not MISS and current[1] is not None and current[1] <= self.clock():
                self._remove(mkey)

    def _remove(self, mkey: Hashable) -> None:
        # del, not pop(): pop() reads (and may have to decode) the value first
        try:
            del self.mapping[mkey]
        except KeyError:
            pass

    def _stale_keys(self, mkeys: Sequence[Hashable]) -> set[Hashable]:
        stale: set[Hashable] = set()
        for mkey in mkeys:
            try:
                entry = self._load(mkey)
            except SerializationError as exc:
                # it is being overwritten or removed anyway
                log.warning("stockpyle: ignoring an undecodable entry while replacing it: %s", exc)
                continue
            if entry is not MISS:
                stale.update(self._entry_keys(entry))
        return stale

    def _mapping_keys(self, obj: object) -> tuple[Hashable, ...]:
        _check_storable(obj)
        return tuple(dict.fromkeys(self.map_key(k) for k in object_keys(obj, self.polymorphic)))

    def _put_many(self, objs: Iterable[object]) -> None:
        prepared = []
        for obj in objs:
            mkeys = self._mapping_keys(obj)
            expires = self._expires(obj)
            self._check_value(obj, expires)
            prepared.append((obj, mkeys, expires))
        with self._writing("write"):
            now = self.clock()
            for obj, mkeys, expires in prepared:
                for mkey in self._stale_keys(mkeys).difference(mkeys):
                    self._remove(mkey)
                if expires is not None and expires <= now:
                    for mkey in mkeys:
                        self._remove(mkey)
                    continue
                entry = self._make_entry(obj, expires, mkeys)
                for mkey in mkeys:
                    self.mapping[mkey] = entry

    def _delete_many(self, objs: Iterable[object]) -> None:
        prepared = [self._mapping_keys(obj) for obj in objs]
        with self._writing("delete"):
            for mkeys in prepared:
                for mkey in self._stale_keys(mkeys).union(mkeys):
                    self._remove(mkey)

    # -- the operations -------------------------------------------------------

    def put(self, obj: object) -> None:
        self._put_many((obj,))

    def batch_put(self, objs: Iterable[object]) -> None:
        self._put_many(list(objs))

    def delete(self, obj: object) -> None:
        self._delete_many((obj,))

    def batch_delete(self, objs: Iterable[object]) -> None:
        self._delete_many(list(objs))

    def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        found = self._read(lookup_key(klass, keydict))
        return None if found is MISS else found

    def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        keys = [lookup_key(klass, kd) for kd in keydicts]
        out: list[T | None] = []
        for key in keys:
            found = self._read(key)
            out.append(None if found is MISS else found)
        return out

    def release(self) -> None:
        closer = getattr(self.mapping, "close", None)
        if callable(closer):
            closer()
