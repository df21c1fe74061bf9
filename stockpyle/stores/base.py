"""The store contract: :class:`BaseStore` and :class:`BaseDictionaryStore`."""

from __future__ import annotations

import abc
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, MutableMapping, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar

from ..exceptions import ConfigurationError, NotStorableError
from ..keys import Key, encode_key, lookup_key, object_keys
from ..lifetimes import LifetimeCallback, LifetimePolicy

__all__ = ["MISS", "BaseDictionaryStore", "BaseStore", "KeyDict"]

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


class BaseStore(abc.ABC):
    """The abstract store contract.

    Subclasses implement :meth:`put`, :meth:`get` and :meth:`delete`; the batch
    operations default to looping over them and should be overridden where the
    backend has native multi-key calls.  Every store is a context manager whose
    exit calls :meth:`release`.

    :param polymorphic: also index objects under their storable base classes.
    :param lifetime_cb: ``obj -> lifetime`` for this store (see
        :mod:`stockpyle.lifetimes`).
    """

    #: True when the store can expire entries (lifetimes apply).
    supports_expiry: bool = True

    def __init__(self, *, polymorphic: bool = False, lifetime_cb: LifetimeCallback | None = None) -> None:
        if not isinstance(polymorphic, bool):
            raise ConfigurationError(f"polymorphic must be True or False; got {polymorphic!r}")
        self.polymorphic = polymorphic
        self.lifetimes = LifetimePolicy(lifetime_cb)

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


# ----------------------------------------------------------------------------
# in-process record table (ProcessMemoryStore, ThreadLocalStore)


class _Record:
    """One stored object and every key it occupies (shared by those keys)."""

    __slots__ = ("obj", "expires", "keys")

    def __init__(self, obj: object, expires: float | None, keys: tuple[Key, ...]) -> None:
        self.obj = obj
        self.expires = expires
        self.keys = keys


class MemoryTable:
    """The in-process storage engine: key -> record, and object identity -> record.

    The table holds a strong reference to every stored object, so ``id(obj)``
    identifies a stored object for as long as it is stored; that is how a
    re-put finds and removes the keys an object occupied before one of its key
    attributes changed.  Not thread-safe by itself.
    """

    __slots__ = ("index", "records", "maxsize", "clock", "evictions", "expirations")

    def __init__(self, maxsize: int | None, clock: Callable[[], float]) -> None:
        self.index: dict[Key, _Record] = {}
        # insertion/recency order doubles as the LRU order
        self.records: OrderedDict[int, _Record] = OrderedDict()
        self.maxsize = maxsize
        self.clock = clock
        self.evictions = 0
        self.expirations = 0

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

    def put(self, obj: object, keys: list[Key], expires: float | None) -> None:
        old = self.records.get(id(obj))
        if old is not None:
            self.drop(old)
        index = self.index
        for key in keys:
            other = index.get(key)
            if other is not None:
                # another object held this key: it is an older copy of the same
                # entity, so every key it occupied is stale now
                self.drop(other)
        if expires is not None and expires <= self.clock():
            return
        rec = _Record(obj, expires, tuple(keys))
        for key in keys:
            index[key] = rec
        self.records[id(obj)] = rec
        if self.maxsize is not None:
            while len(self.records) > self.maxsize:
                self.drop(self.records.popitem(last=False)[1])
                self.evictions += 1

    def delete(self, obj: object, keys: list[Key]) -> None:
        old = self.records.get(id(obj))
        if old is not None:
            self.drop(old)
        index = self.index
        for key in keys:
            other = index.get(key)
            if other is not None:
                self.drop(other)

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
    (needed for mappings that persist or pickle their keys).  Subclasses may
    override :meth:`map_key` for another key form.

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

    def map_key(self, key: Key) -> Hashable:
        """The mapping key used for one stockpyle key."""
        return encode_key(key) if self.string_keys else key

    def _expires(self, obj: object) -> float | None:
        if self.lifetimes.trivial:
            return None
        return self.lifetimes.expires_at(obj, self.clock)

    def _read(self, mkey: Hashable) -> Any:
        try:
            entry = self.mapping[mkey]
        except KeyError:
            return MISS
        obj, expires, _keys = entry
        if expires is not None and expires <= self.clock():
            self._discard(mkey, entry)
            return MISS
        return obj

    def _discard(self, mkey: Hashable, entry: Any) -> None:
        with self._lock:
            try:
                if self.mapping[mkey] is entry or self.mapping[mkey] == entry:
                    del self.mapping[mkey]
            except KeyError:
                pass
            except Exception:  # noqa: BLE001 - objects with odd __eq__: just remove
                self.mapping.pop(mkey, None)

    def _stale_keys(self, mkeys: Sequence[Hashable]) -> set[Hashable]:
        stale: set[Hashable] = set()
        for mkey in mkeys:
            try:
                entry = self.mapping[mkey]
            except KeyError:
                continue
            stale.update(entry[2])
        return stale

    def _put_many(self, objs: Iterable[object]) -> None:
        prepared = []
        for obj in objs:
            _check_storable(obj)
            mkeys = tuple(self.map_key(k) for k in object_keys(obj, self.polymorphic))
            prepared.append((obj, mkeys, self._expires(obj)))
        with self._lock:
            now = self.clock()
            for obj, mkeys, expires in prepared:
                for mkey in self._stale_keys(mkeys).difference(mkeys):
                    self.mapping.pop(mkey, None)
                if expires is not None and expires <= now:
                    for mkey in mkeys:
                        self.mapping.pop(mkey, None)
                    continue
                entry = (obj, expires, mkeys)
                for mkey in mkeys:
                    self.mapping[mkey] = entry

    def _delete_many(self, objs: Iterable[object]) -> None:
        prepared = []
        for obj in objs:
            _check_storable(obj)
            prepared.append(tuple(self.map_key(k) for k in object_keys(obj, self.polymorphic)))
        with self._lock:
            for mkeys in prepared:
                for mkey in self._stale_keys(mkeys).union(mkeys):
                    self.mapping.pop(mkey, None)

    def put(self, obj: object) -> None:
        self._put_many((obj,))

    def batch_put(self, objs: Iterable[object]) -> None:
        self._put_many(list(objs))

    def delete(self, obj: object) -> None:
        self._delete_many((obj,))

    def batch_delete(self, objs: Iterable[object]) -> None:
        self._delete_many(list(objs))

    def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        found = self._read(self.map_key(lookup_key(klass, keydict)))
        return None if found is MISS else found

    def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        mkeys = [self.map_key(lookup_key(klass, kd)) for kd in keydicts]
        out: list[T | None] = []
        for mkey in mkeys:
            found = self._read(mkey)
            out.append(None if found is MISS else found)
        return out

    def release(self) -> None:
        closer = getattr(self.mapping, "close", None)
        if callable(closer):
            closer()
