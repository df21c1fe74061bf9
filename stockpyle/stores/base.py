"""The store contract: :class:`BaseStore` and :class:`BaseDictionaryStore`.

A store has six operations -- ``put``, ``get``, ``delete`` and their batch
forms -- plus the *back-fill protocol* a :class:`~stockpyle.ChainedStore`
relies on (``add``/``batch_add``) and a few optional, declared capabilities.
Everything the chain or the other parts of stockpyle rely on is declared here,
as class attributes and methods with documented defaults, so that a store
written by somebody else works the same way (see ``docs/custom_stores.rst``):

================================  ==========================================================
``supports_expiry``               the store honours lifetimes (default ``True``)
``supports_add``                  ``add``/``batch_add`` are atomic add-only writes (default
                                  ``False``: ``add`` falls back to ``put``)
``supports_class_invalidation``   ``invalidate_class`` drops every entry of a class
``in_process``                    the store keeps objects in this process's memory and does
                                  no I/O: a chain calls it directly, and the invalidation bus
                                  keeps it coherent with other processes
``is_cache``                      the store holds copies only: a chain may invalidate its
                                  entries, also when it is the chain's last layer
``supports_leases``               ``lease_get``/``lease_fill``/``lease_release``: one reader
                                  of all processes loads a missing key (see :class:`Lease`)
``direct_index()``                read access to the store's index for a chain's hit path
================================  ==========================================================
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from time import perf_counter
from types import TracebackType
from typing import Any, ClassVar, Final, TypeVar

from ..consistency import ABSENT_SLOT, Slot, SlotKind, add_allowed, put_allowed
from ..exceptions import ConfigurationError, NotStorableError, ObjectError, StoreError
from ..keys import Key, encode_key, lookup_key, object_keys, version_of
from ..lifetimes import LifetimeCallback, LifetimePolicy
from ..stats import StoreStats

__all__ = [
    "MISS",
    "AsyncBaseStore",
    "BaseDictionaryStore",
    "BaseStore",
    "DirectIndex",
    "KeyDict",
    "Lease",
    "MemoryEntry",
    "Tombstone",
    "check_tombstone_lifetime",
]

log = logging.getLogger("stockpyle.stores")

T = TypeVar("T")
KeyDict = Mapping[str, Any]


class Lease:
    """What a store's ``lease_get(klass, keydict, lease)`` found (stores that declare ``supports_leases``).

    ``status`` is one of:

    ``"hit"``
        the key holds the object (``obj``).
    ``"won"``
        the key holds nothing and this caller now holds its lease, for
        ``lease`` seconds: load the object, then ``lease_fill(obj, token)``
        (which stores it only if no writer touched the key meanwhile), or
        ``lease_release(token)`` if there is nothing to store.  ``obj`` is the
        previous value when the key held one marked stale, else ``None``.
    ``"lost"``
        another caller (in this or another process) holds the lease and is
        loading the object: wait for its fill.  ``obj`` is the stale previous
        value, if the key keeps one, else ``None``.
    ``"absent"``
        the key holds nothing and no lease was taken (a tombstone is there,
        or the backend offers no leases): load, then back-fill with ``add``
        as usual.

    :ivar token: what :meth:`lease_fill` and :meth:`lease_release` need
        (``"won"`` only).
    :ivar stale: ``obj`` is a stale value: its lifetime ran out (it is kept
        for ``Stampede.serve_stale_for``) or it was marked stale.  A ``"won"``
        answer with an ``obj`` that is not stale won the refresh of a current
        value (``Stampede.refresh_ahead``); a ``"hit"`` may be stale when
        another reader is refreshing it.
    :ivar age: for a stale ``obj``: the seconds since its lifetime ran out
        (``0.0`` for a value marked stale before that).
    """

    __slots__ = ("age", "obj", "stale", "status", "token")

    def __init__(self, status: str, obj: Any = None, token: Any = None, stale: bool = False, age: float = 0.0) -> None:
        self.status = status
        self.obj = obj
        self.token = token
        self.stale = stale
        self.age = age

    def __repr__(self) -> str:
        return f"Lease({self.status!r}, obj={self.obj!r})"


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


def check_storable(obj: object) -> None:
    """Refuse ``None`` (it has no keys) before anything else looks at it.

    :raises NotStorableError: for ``None``.
    """
    if obj is None:
        raise NotStorableError("None cannot be stored: it has no __stockpyle_keys__")


def check_tombstone_lifetime(value: Any, limit: float = math.inf) -> float:
    """Validate a ``tombstone_lifetime`` argument: finite seconds, ``0 <= value <= limit``.

    :returns: the value as a float.
    :raises ConfigurationError: for anything else.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= limit
    ):
        bound = f"between 0 and {limit:g}" if math.isfinite(limit) else ">= 0"
        raise ConfigurationError(f"tombstone_lifetime must be seconds {bound}; got {value!r}")
    return float(value)


class MemoryEntry:
    """One object held by an in-process store, as its :class:`DirectIndex` shows it.

    :ivar obj: the stored object itself.
    :ivar expires: its expiry on :func:`time.monotonic`, or ``None`` for never.
    :ivar keys: every in-process key it is stored under (shared by those keys).
    :ivar version: its version when it was stored, or ``None``.
    """

    __slots__ = ("expires", "keys", "obj", "seq", "version")

    def __init__(self, obj: object, expires: float | None, keys: tuple[Key, ...], version: Any, seq: int) -> None:
        self.obj = obj
        self.expires = expires
        self.keys = keys
        self.version = version
        #: write sequence number (tells an entry apart from a later one of the same object)
        self.seq = seq

    def __repr__(self) -> str:
        return f"<MemoryEntry {type(self.obj).__qualname__} keys={len(self.keys)} expires={self.expires}>"


class DirectIndex:
    """Read access to an in-process store's index: what a chain's hit path probes directly.

    A :class:`~stockpyle.ChainedStore` whose top layer offers one looks the
    commonest lookups (one ``str`` or ``int`` key attribute) up in
    :attr:`index` itself, saving a call.  The hits it serves that way are
    still the store's hits: a reader either adds them to :attr:`hits`, or --
    to keep its hit path as short as possible -- counts them itself and
    registers a function returning its count with :meth:`count_with`.  The
    store's statistics include both (:meth:`served`).

    :ivar index: maps in-process keys (``(klass, attribute, value)``) to
        :class:`MemoryEntry` objects.  Read it only; an entry whose
        ``expires`` has passed must be treated as a miss.
    :ivar hits: hits served from the index by readers that count here.
    """

    __slots__ = ("_counters", "hits", "index")

    def __init__(self, index: Mapping[Key, MemoryEntry]) -> None:
        self.index = index
        self.hits = 0
        self._counters: list[weakref.WeakMethod[Callable[[], int]]] = []

    def count_with(self, counter: Callable[[], int]) -> None:
        """Register a bound method returning the (ever-growing) number of hits its object served.

        Held weakly: a reader that goes away stops counting, and what it
        counted stops being included.
        """
        self._counters.append(weakref.WeakMethod(counter))

    def served(self) -> int:
        """Every hit served from the index so far."""
        total = self.hits
        for ref in list(self._counters):
            counter = ref()
            if counter is None:
                self._counters.remove(ref)
            else:
                total += counter()
        return total


class Tombstone:
    """The marker a dictionary store leaves under a deleted object's keys for a short time.

    :ivar owner: the first mapping key of the deleted object.
    :ivar version: the deleted object's version, or ``None``.
    """

    __slots__ = ("owner", "version")

    def __init__(self, owner: Hashable, version: Any = None) -> None:
        self.owner = owner
        self.version = version

    def __reduce__(self) -> tuple[Any, ...]:
        return (Tombstone, (self.owner, self.version))

    def __repr__(self) -> str:
        return f"Tombstone(owner={self.owner!r}, version={self.version!r})"


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


class BaseStore:
    """The store contract.

    Subclasses implement :meth:`put`, :meth:`get` and :meth:`delete`; the
    batch operations default to looping over them and should be overridden
    where the backend has native multi-key calls.  An operation a subclass
    does not implement raises :class:`NotImplementedError` when called, so a
    read-only or write-only store is a few lines.  Every store is a context
    manager whose exit calls :meth:`release`.

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
    supports_expiry: ClassVar[bool] = True
    #: True when :meth:`add`/:meth:`batch_add` are add-only writes that never
    #: replace a live entry or a tombstone.  False: they fall back to :meth:`put`.
    supports_add: ClassVar[bool] = False
    #: True when :meth:`invalidate_class` is implemented.
    supports_class_invalidation: ClassVar[bool] = False
    #: True for stores that keep objects in this process's memory and do no I/O.
    in_process: ClassVar[bool] = False
    #: True for stores that only hold copies of objects whose system of record
    #: is elsewhere: a chain may invalidate (delete) their entries freely.
    is_cache: ClassVar[bool] = False
    #: True when ``lease_get``/``lease_fill``/``lease_release`` are implemented (see :class:`Lease`).
    supports_leases: ClassVar[bool] = False
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

    def describe(self) -> str:
        """Where the store keeps its data (servers, a URL, a path), for messages."""
        return type(self).__name__

    def _unimplemented(self, operation: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__qualname__} does not implement {operation}()")

    # -- the six operations -------------------------------------------------

    def put(self, obj: object) -> None:
        """Store ``obj`` under every one of its keys (replacing older entries)."""
        raise self._unimplemented("put")

    def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        """Return the stored ``klass`` instance matching ``keydict``, or ``None``."""
        raise self._unimplemented("get")

    def delete(self, obj: object) -> None:
        """Remove ``obj`` from the store under every one of its keys."""
        raise self._unimplemented("delete")

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

    # -- the back-fill protocol ---------------------------------------------

    def add(self, obj: object) -> bool:
        """Store ``obj`` only if none of its keys holds a live entry or a tombstone.

        This is how a :class:`~stockpyle.ChainedStore` back-fills a layer with an
        object it found below: the object must never replace a newer one written
        meanwhile, nor bring back one deleted meanwhile.  Stores that can do
        this atomically set :attr:`supports_add` and override it.

        The default -- for stores that cannot -- writes with :meth:`put` and
        returns ``True``.  A chain back-filling such a store cannot protect it
        against a writer racing the back-fill: a reader that read the old value
        just before a write may put it back, and it stays there until it
        expires or is written again.

        :returns: whether the object was stored.
        """
        self.put(obj)
        return True

    def batch_add(self, objs: Iterable[object]) -> list[bool]:
        """:meth:`add` for many objects; returns which were stored."""
        return [self.add(obj) for obj in objs]

    # -- optional capabilities ----------------------------------------------

    def invalidate_class(self, klass: type) -> None:
        """Drop every entry of ``klass`` (and of its subclasses) from the store.

        Used when a write touched rows that cannot be known one by one.
        Stores that implement it set :attr:`supports_class_invalidation`.
        """
        raise self._unimplemented("invalidate_class")

    def direct_index(self) -> DirectIndex | None:
        """The store's index for a chain's hit path to probe directly, or ``None`` (the default).

        Only an in-process store whose ``get`` needs no bookkeeping per hit
        (no LRU order to maintain, no subclass override) offers one.
        """
        return None

    # -- lifecycle ----------------------------------------------------------

    def release(self) -> None:
        """Release connections, files and other resources held by the store.

        Releasing is never terminal: the store reconnects or reopens what it
        needs on its next operation, and in-process stores keep their contents.
        """

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
# the asyncio contract


def _acounted(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """:func:`_counted` for the coroutine operations of an :class:`AsyncBaseStore`."""
    batch = name.startswith("batch_")
    lookup = name.endswith("get")

    @functools.wraps(method)
    async def operation(self: AsyncBaseStore, *args: Any) -> Any:
        if batch:
            args = (*args[:-1], list(args[-1]))
        stats = self.stats()
        start = perf_counter()
        try:
            result = await method(self, *args)
        except StoreError:
            stats.errors += 1
            raise
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


class AsyncBaseStore:
    """The store contract for asyncio: :class:`BaseStore`'s operations as coroutines.

    The same capability flags apply (``supports_expiry``, ``supports_add``,
    ``supports_class_invalidation``, ``is_cache``); an asyncio store is never
    ``in_process`` (an in-process store needs no ``await``: an
    :class:`~stockpyle.AsyncChainedStore` calls a :class:`ProcessMemoryStore`
    directly).  ``release()`` is a coroutine, and ``async with store`` calls it.

    :param polymorphic: also index objects under their storable base classes.
    :param lifetime_cb: ``obj -> lifetime`` for this store.
    """

    supports_expiry: ClassVar[bool] = True
    supports_add: ClassVar[bool] = False
    supports_class_invalidation: ClassVar[bool] = False
    in_process: ClassVar[bool] = False
    is_cache: ClassVar[bool] = False
    supports_leases: ClassVar[bool] = False
    _auto_stats: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls._auto_stats:
            return
        for name in _OPERATIONS:
            method = cls.__dict__.get(name)
            if callable(method) and not getattr(method, "_stockpyle_counted", False):
                setattr(cls, name, _acounted(name, method))

    def __init__(self, *, polymorphic: bool = False, lifetime_cb: LifetimeCallback | None = None) -> None:
        if not isinstance(polymorphic, bool):
            raise ConfigurationError(f"polymorphic must be True or False; got {polymorphic!r}")
        self.polymorphic = polymorphic
        self.lifetimes = LifetimePolicy(lifetime_cb)
        self._stockpyle_stats = StoreStats()

    def stats(self) -> StoreStats:
        """This store's counters and sampled latencies (the live object)."""
        return self._stockpyle_stats

    def reset_stats(self) -> None:
        """Set the counters back to zero and forget the latency samples."""
        self._stockpyle_stats.reset()

    def configure(self, classes: Iterable[type], lifetime: Any) -> None:
        """Set the lifetime of instances of ``classes`` (and subclasses) in this store."""
        self.lifetimes.configure(classes, lifetime)

    def describe(self) -> str:
        """Where the store keeps its data, for messages."""
        return type(self).__name__

    def _unimplemented(self, operation: str) -> NotImplementedError:
        return NotImplementedError(f"{type(self).__qualname__} does not implement {operation}()")

    async def put(self, obj: object) -> None:
        """Store ``obj`` under every one of its keys."""
        raise self._unimplemented("put")

    async def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        """The stored ``klass`` instance matching ``keydict``, or ``None``."""
        raise self._unimplemented("get")

    async def delete(self, obj: object) -> None:
        """Remove ``obj`` under every one of its keys."""
        raise self._unimplemented("delete")

    async def batch_put(self, objs: Iterable[object]) -> None:
        """Store every object of ``objs``."""
        for obj in objs:
            await self.put(obj)

    async def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        """Look up many objects; request order, ``None`` per miss."""
        return [await self.get(klass, kd) for kd in keydicts]

    async def batch_delete(self, objs: Iterable[object]) -> None:
        """Remove every object of ``objs``."""
        for obj in objs:
            await self.delete(obj)

    async def add(self, obj: object) -> bool:
        """Add-only write (see :meth:`BaseStore.add`); the default writes with :meth:`put`."""
        await self.put(obj)
        return True

    async def batch_add(self, objs: Iterable[object]) -> list[bool]:
        """:meth:`add` for many objects."""
        return [await self.add(obj) for obj in objs]

    async def invalidate_class(self, klass: type) -> None:
        """Drop every entry of ``klass`` (see :meth:`BaseStore.invalidate_class`)."""
        raise self._unimplemented("invalidate_class")

    async def release(self) -> None:
        """Release connections; the store reconnects on its next operation."""

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} polymorphic={self.polymorphic}>"


for _name in ("batch_get", "batch_put", "batch_delete"):
    setattr(AsyncBaseStore, _name, _acounted(_name, AsyncBaseStore.__dict__[_name]))
del _name


# ----------------------------------------------------------------------------
# generic dictionary store


class BaseDictionaryStore(BaseStore):
    """Turn any :class:`~collections.abc.MutableMapping` into a complete store.

    Each of an object's keys maps to an entry ``(obj, expires_at, keys)``, where
    ``expires_at`` is a unix time (or ``None``) and ``keys`` are the mapping keys
    the object occupies, so a re-put after a key attribute changed removes the
    entries under the old values.  Expired entries are removed when they are read.

    It honours the consistency rules of :mod:`stockpyle.consistency`: a delete
    leaves a :class:`Tombstone` under the object's keys for
    ``tombstone_lifetime`` seconds, :meth:`add` stores an object only where
    none of its keys holds a live entry or a tombstone, and a versioned object
    never replaces a newer version of itself.  Writes hold the store's lock, so
    these are atomic among the threads of one process -- not among processes
    sharing one persistent mapping.

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
    :param tombstone_lifetime: seconds a deleted key refuses back-fills
        (``0``: deletes remove entries and leave nothing).
    """

    supports_add = True

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
        tombstone_lifetime: float = 5.0,
    ) -> None:
        super().__init__(polymorphic=polymorphic, lifetime_cb=lifetime_cb)
        candidate: object = mapping
        if not isinstance(candidate, MutableMapping) and not all(
            hasattr(candidate, name) for name in ("__getitem__", "__setitem__", "__delitem__")
        ):
            raise ConfigurationError(f"BaseDictionaryStore needs a MutableMapping; got {type(mapping).__name__}")
        self.mapping = mapping
        self.string_keys = string_keys
        self.tombstone_lifetime = check_tombstone_lifetime(tombstone_lifetime)
        self._lock = threading.RLock()

    # -- hooks ----------------------------------------------------------------

    def map_key(self, key: Key) -> Hashable:
        """The mapping key used for one stockpyle key."""
        return encode_key(key) if self.string_keys else key

    def _make_entry(self, obj: object, expires: float | None, mkeys: tuple[Hashable, ...]) -> Any:
        """The value stored under each of an object's mapping keys (also for a :class:`Tombstone`)."""
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
        if type(obj) is Tombstone:
            return MISS
        return obj if self._owns(key, obj) else MISS

    def _discard(self, mkey: Hashable) -> None:
        # remove an expired entry unless a put replaced it meanwhile; compare
        # expiry times, not objects: backends return fresh copies, and user
        # objects need not define __eq__
        with self._writing("remove an expired entry"):
            try:
                current = self._load(mkey)
            except ObjectError:
                return
            if current is not MISS and current[1] is not None and current[1] <= self.clock():
                self._remove(mkey)

    def _remove(self, mkey: Hashable) -> None:
        # del, not pop(): pop() reads (and may have to decode) the value first
        try:
            del self.mapping[mkey]
        except KeyError:
            pass

    def _slot(self, mkey: Hashable, now: float) -> tuple[Slot, Any]:
        """The state of ``mkey`` for the consistency rules, and the entry read (or MISS)."""
        try:
            entry = self._load(mkey)
        except ObjectError as exc:
            # it is being overwritten or removed anyway
            log.warning("stockpyle: ignoring an undecodable entry while replacing it: %s", exc)
            return Slot(SlotKind.UNREADABLE), MISS
        if entry is MISS or (entry[1] is not None and entry[1] <= now):
            return ABSENT_SLOT, MISS
        obj = entry[0]
        if type(obj) is Tombstone:
            return Slot(SlotKind.TOMBSTONE, obj.owner, obj.version), entry
        return Slot(SlotKind.ENTRY, self._owner_of(obj), version_of(obj)), entry

    def _owner_of(self, obj: object) -> Hashable | None:
        try:
            keys = object_keys(obj)
        except Exception:  # noqa: BLE001 - the class's key declaration changed since it was stored
            return None
        return self.map_key(keys[0]) if keys else None

    def _mapping_keys(self, obj: object) -> tuple[Hashable, ...]:
        check_storable(obj)
        return tuple(dict.fromkeys(self.map_key(k) for k in object_keys(obj, self.polymorphic)))

    def _prepare(self, objs: Iterable[object]) -> list[tuple[object, tuple[Hashable, ...], float | None, Any]]:
        prepared = []
        for obj in objs:
            mkeys = self._mapping_keys(obj)
            expires = self._expires(obj)
            self._check_value(obj, expires)
            prepared.append((obj, mkeys, expires, version_of(obj)))
        return prepared

    def _write_entry(
        self, obj: object, mkeys: tuple[Hashable, ...], expires: float | None, entries: Sequence[Any]
    ) -> None:
        """Write ``obj`` under ``mkeys``, first removing the keys its old copies occupied."""
        stale: set[Hashable] = set()
        for entry in entries:
            if entry is not MISS:
                stale.update(self._entry_keys(entry))
        for mkey in stale.difference(mkeys):
            self._remove(mkey)
        if expires is not None and expires <= self.clock():
            for mkey in mkeys:
                self._remove(mkey)
            return
        entry = self._make_entry(obj, expires, mkeys)
        for mkey in mkeys:
            self.mapping[mkey] = entry

    def _put_many(self, objs: Iterable[object]) -> None:
        prepared = self._prepare(objs)
        with self._writing("write"):
            now = self.clock()
            for obj, mkeys, expires, version in prepared:
                states = [self._slot(mkey, now) for mkey in mkeys]
                if not put_allowed(mkeys[0], version, [slot for slot, _entry in states]):
                    continue  # a newer version is stored, or this one was deleted
                self._write_entry(obj, mkeys, expires, [entry for _slot, entry in states])

    def _delete_many(self, objs: Iterable[object]) -> None:
        prepared = [(self._mapping_keys(obj), version_of(obj)) for obj in objs]
        with self._writing("delete"):
            now = self.clock()
            for mkeys, version in prepared:
                stale: set[Hashable] = set(mkeys)
                for mkey in mkeys:
                    _slot, entry = self._slot(mkey, now)
                    if entry is not MISS:
                        stale.update(self._entry_keys(entry))
                if not self.tombstone_lifetime:
                    for mkey in stale:
                        self._remove(mkey)
                    continue
                stone = self._make_entry(Tombstone(mkeys[0], version), now + self.tombstone_lifetime, ())
                for mkey in stale:
                    self.mapping[mkey] = stone

    def _add_many(self, objs: Iterable[object]) -> list[bool]:
        prepared = self._prepare(objs)
        done: list[bool] = []
        with self._writing("add"):
            now = self.clock()
            for obj, mkeys, expires, _version in prepared:
                states = [self._slot(mkey, now) for mkey in mkeys]
                if not add_allowed(slot for slot, _entry in states):
                    done.append(False)
                    continue
                self._write_entry(obj, mkeys, expires, [entry for _slot, entry in states])
                done.append(expires is None or expires > now)
        return done

    # -- the operations -------------------------------------------------------

    def put(self, obj: object) -> None:
        self._put_many((obj,))

    def batch_put(self, objs: Iterable[object]) -> None:
        self._put_many(list(objs))

    def delete(self, obj: object) -> None:
        self._delete_many((obj,))

    def batch_delete(self, objs: Iterable[object]) -> None:
        self._delete_many(list(objs))

    def add(self, obj: object) -> bool:
        """Store ``obj`` only where none of its keys holds a live entry or a tombstone.

        :returns: whether the object was stored.
        """
        return self._add_many((obj,))[0]

    def batch_add(self, objs: Iterable[object]) -> list[bool]:
        """:meth:`add` for many objects; returns which were stored."""
        return self._add_many(list(objs))

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
