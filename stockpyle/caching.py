"""Cache function results in a stockpyle store: the :func:`cached` decorator.

::

    store = ChainedStore([ProcessMemoryStore(), MemcacheStore(servers=["127.0.0.1:11211"])])

    @cached(store, lifetime=300)
    def exchange_rate(base: str, quote: str = "EUR") -> Decimal:
        return fetch_rate(base, quote)

    exchange_rate("USD")                 # computed and stored
    exchange_rate("USD", quote="EUR")    # the same entry: defaults are normalised
    exchange_rate.invalidate("USD")      # a marker in every layer: the next call recomputes
    exchange_rate.refresh("USD")         # recomputed and stored unconditionally

How it works
------------

* Each result is stored as a :class:`CachedResult` record, under one key: a
  digest (BLAKE2b, 160 bits) of the function's ``module.qualname`` and of its
  arguments as bound by :func:`inspect.signature` with the defaults applied,
  each encoded canonically and type-faithfully (``1``, ``1.0``, ``True`` and
  ``"1"`` are different arguments).  The key is the same in every process and
  on every machine; it never depends on ``hash()`` or on memory addresses.
* Arguments may be ``str``, ``bytes``, ``int``, ``bool``, ``float``,
  ``Decimal``, ``UUID``, ``date``/``datetime``/``time``, ``None``, and tuples,
  lists, dicts, sets and frozensets of these.  Anything else raises
  :class:`~stockpyle.exceptions.UnsupportedKeyValueError` (a ``TypeError``)
  telling you to pass ``key=``.
* A first parameter named ``self`` or ``cls`` is left out of the key, so
  every instance of a class shares one entry per argument list.  When the
  result depends on the instance, pass ``key=``: a callable that receives the
  function's arguments (``self`` included) and returns the value to key by,
  e.g. ``key=lambda self, day: (self.account_id, day)``.
* Functions are told apart by ``module.qualname`` alone: two functions with
  the same name (the inner functions of a factory, a function redefined) share
  their entries, so give them a ``key=`` that tells them apart.  Lambdas,
  which all share one name, are refused.
* Each decorated function has its own record class, named after it (its
  ``__qualname__`` is ``CachedResult[module.qualname]``).  ``lifetime`` is set
  on the store for that class with ``store.configure()`` (every layer of a
  chain), and is also written into each record as its *fresh-until* time: a
  record read after that time is never served as fresh, whatever the layer's
  expiry granularity.  A ``lifetime_cb`` of the store that returns a lifetime
  for the record wins over the configured one for the entry's expiry in that
  layer (see :mod:`stockpyle.lifetimes`); the fresh-until time still applies.

The exact rules
---------------

* Every call starts with one ``get`` of the store.
* **Hit**: a record whose fresh-until time (wall clock, ``time.time()``) lies
  in the future is returned without calling the function.
* **Miss** (no record): over a store with ``get_or_create`` (a
  :class:`~stockpyle.ChainedStore` or
  :class:`~stockpyle.stores.achained.AsyncChainedStore`) the function runs
  inside ``get_or_create``, so concurrent misses of one key run it once per
  process and, where the shared layer supports leases, once across processes
  (see :class:`~stockpyle.Stampede`); an all-cache chain stores the result
  with add-only writes.  Over another store: the function runs once per
  process at a time (single flight), and its result is stored with ``put``.
* **Expired**: a record past its fresh-until time that a layer still holds
  is recomputed once per process at a time (without the cross-process lease
  of a miss) and replaced with ``put``.
* **None**: a function that returns ``None`` is not cached, unless
  ``negative_lifetime`` is given: then a negative record keeps the ``None``
  for that many seconds.  (When a recomputation returns an uncached ``None``,
  the old result is replaced by an invalidation marker, see below.)
* **stale_on_error=N**: the entry's lifetime in the store is ``lifetime + N``
  seconds, and the record stays fresh for ``lifetime`` seconds.  A call after
  that recomputes (once per process at a time); when the function raises and
  the old record is less than ``N`` seconds past its fresh-until time, the
  old value is returned (and the error logged at WARNING on the
  ``stockpyle.caching`` logger).  Every later call retries the function until
  one succeeds or the ``N`` seconds are over; then the error propagates.  A
  function that raises on a miss (nothing stored) always propagates.
* ``.invalidate(*args, **kw)`` replaces the entry, in every layer of the
  store, by an *invalidation marker*: a record that is never fresh and never
  served stale.  The next call recomputes (once per process at a time) and
  stores the new result with ``put``.  It is not a delete on purpose: a
  delete leaves a tombstone in the layers that keep them, which refuses the
  chain's add-only fills of a miss for the layer's ``tombstone_lifetime``
  (5 s by default), so every call in that time would run the function.
  A miss already computing when the marker is written cannot fill over it
  (its fill is add-only); a recomputation of an expired or invalidated entry
  already under way stores what it computed, as any two racing puts.  Other
  processes' in-process layers drop the old result only through the chain's
  invalidation bus (see :doc:`/bus`) or when it expires.
* ``.refresh(*args, **kw)`` calls the function and stores its result with
  ``put`` (replacing any entry and any tombstone), and returns it.  It never
  serves a stale value: errors propagate.

Freshness is judged on the wall clock of the reading process: machines whose
clocks disagree by more than a small fraction of ``lifetime`` see entries
expire early or late by that much.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import inspect
import json
import logging
import math
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Concatenate, Final, Generic, ParamSpec, TypeVar, overload

from .exceptions import ConfigurationError, UnsupportedKeyValueError
from .keys import SUPPORTED_TYPES, encode_value
from .stampede import DEFAULT_STAMPEDE, SingleFlight, Stampede

if TYPE_CHECKING:  # pragma: no cover
    import asyncio

__all__ = ["AsyncCachedFunction", "CachedDecorator", "CachedFunction", "CachedResult", "cached", "record_class"]

log = logging.getLogger("stockpyle.caching")

P = ParamSpec("P")
P2 = ParamSpec("P2")
R = TypeVar("R")
S = TypeVar("S")

_STORE_POLICY: Final[Any] = object()  # "use the store's own Stampede policy"


# --------------------------------------------------------------------------
# records


class CachedResult:
    """One stored function result (the base class of every decorated function's record class).

    :ivar key: the digest of the function's name and arguments.
    :ivar value: the result; ``None`` in a negative (``None``) record and in
        an invalidation marker.
    :ivar fresh_until: unix time after which the record is not served as
        fresh, or ``None`` (fresh until the store drops it).
    :ivar invalidated: for an invalidation marker (what ``invalidate()``
        stores), the unix time of the invalidation; ``None`` for a result.
    """

    __stockpyle_keys__: ClassVar[tuple[str, ...]] = ("key",)
    __slots__ = ("fresh_until", "invalidated", "key", "value")
    #: the ``module.qualname`` of the function whose results the class holds
    function_name: ClassVar[str] = ""

    def __init__(self, key: str, value: Any, fresh_until: float | None, invalidated: float | None = None) -> None:
        self.key = key
        self.value = value
        self.fresh_until = fresh_until
        self.invalidated = invalidated

    def is_fresh(self, now: float) -> bool:
        """Whether the record may be served without recomputing, at unix time ``now``."""
        return self.invalidated is None and (self.fresh_until is None or now < self.fresh_until)

    def __reduce__(self) -> tuple[Any, ...]:
        # the record classes are made at run time: pickle the function name and
        # rebuild the class from it in the reading process
        return (_restore_record, (self.function_name, self.key, self.value, self.fresh_until, self.invalidated))

    def __repr__(self) -> str:
        state = (
            f"invalidated={self.invalidated!r}" if self.invalidated is not None else f"fresh_until={self.fresh_until!r}"
        )
        return f"<{type(self).__qualname__} key={self.key!r} {state}>"


_RECORD_CLASSES: dict[str, type[CachedResult]] = {}
_RECORD_LOCK = threading.Lock()


def record_class(function_name: str) -> type[CachedResult]:
    """The record class of the function named ``function_name`` (``module.qualname``), made once per process.

    Its stable name, ``stockpyle.caching.CachedResult[module.qualname]``, is
    what stores key its entries by, so every process that decorates the same
    function reads the same entries.
    """
    with _RECORD_LOCK:
        klass = _RECORD_CLASSES.get(function_name)
        if klass is None:
            klass = type(
                "CachedResult",
                (CachedResult,),
                {
                    "__slots__": (),
                    "__module__": __name__,
                    "__qualname__": f"CachedResult[{function_name}]",
                    "function_name": function_name,
                    "__doc__": f"Stored results of {function_name}.",
                },
            )
            _RECORD_CLASSES[function_name] = klass
        return klass


def _restore_record(
    function_name: str, key: str, value: Any, fresh_until: float | None, invalidated: float | None = None
) -> CachedResult:
    return record_class(function_name)(key, value, fresh_until, invalidated)


# --------------------------------------------------------------------------
# argument keys


def _canonical(value: Any) -> Any:
    """A JSON-able, type-tagged, canonical form of one argument value."""
    # (subclasses -- namedtuples, OrderedDicts -- key like their base type, as in stockpyle.keys)
    if isinstance(value, (str, bytes, int, float)):
        return encode_value(value)
    if isinstance(value, list):
        return ["list", [_canonical(v) for v in value]]
    if isinstance(value, tuple):
        return ["tuple", [_canonical(v) for v in value]]
    if isinstance(value, Mapping):
        items = [[_canonical(k), _canonical(v)] for k, v in value.items()]
        items.sort(key=lambda kv: json.dumps(kv[0]))  # dict order does not matter, as for ==
        return ["dict", items]
    if isinstance(value, (set, frozenset)):
        return ["set", sorted((_canonical(v) for v in value), key=json.dumps)]
    return encode_value(value)  # the other scalars; UnsupportedKeyValueError for the rest


def _unsupported(function_name: str, where: str, exc: UnsupportedKeyValueError) -> UnsupportedKeyValueError:
    return UnsupportedKeyValueError(
        f"@cached {function_name}: cannot key {where}: {exc}.  Arguments must be {SUPPORTED_TYPES}, or lists, "
        "dicts, sets and frozensets of these; pass key=<callable> to @cached to say what the result depends on, "
        "e.g. key=lambda user, day: (user.id, day)"
    )


# --------------------------------------------------------------------------
# settings


def _duration(name: str, value: Any) -> float | None:
    """Seconds of a decorator duration argument (``None`` stays ``None``)."""
    if value is None:
        return None
    if isinstance(value, _dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise ConfigurationError(f"@cached {name}= takes seconds (int or float) or a timedelta, or None; got {value!r}")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ConfigurationError(f"@cached {name}= must be a finite duration > 0 (None: off); got {value!r}")
    return seconds


def _is_async_store(store: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(type(store), "put", None))


def _check_store(store: Any) -> None:
    missing = [op for op in ("get", "put", "delete") if not callable(getattr(store, op, None))]
    if missing:
        raise ConfigurationError(f"@cached takes a stockpyle store; {store!r} lacks {', '.join(missing)}")


class _Core:
    """What a decorated function and its bound forms share: settings, key building, flights."""

    def __init__(
        self,
        func: Callable[..., Any],
        store: Any,
        *,
        name: str,
        lifetime: float | None,
        key: Callable[..., Any] | None,
        stampede: Any,
        negative_lifetime: float | None,
        stale_on_error: float | None,
    ) -> None:
        self.func = func
        self.store = store
        self.lifetime = lifetime
        self.key_func = key
        self.negative_lifetime = negative_lifetime
        self.stale_on_error = stale_on_error
        self.name = name
        self.record_class = record_class(self.name)
        self.signature = inspect.signature(func)
        params = list(self.signature.parameters.values())
        # a method's instance (or class) is not part of the key
        self.skip_first = (
            bool(params)
            and params[0].name in ("self", "cls")
            and params[0].kind
            in (
                inspect.Parameter.POSITIONAL_ONLY,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
            )
        )
        # the fast binding of the common call (no *args, **kwargs or positional-only
        # parameters): the same arguments, in the same order, as Signature.bind
        kinds = {p.kind for p in params}
        self.simple = kinds <= {inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY}
        self.names = [p.name for p in params]
        self.known = frozenset(self.names)
        self.positional = sum(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.has_get_or_create = callable(getattr(type(store), "get_or_create", None))
        self.stampede_kw: dict[str, Any] = {} if stampede is _STORE_POLICY else {"stampede": stampede}
        #: a chain's get takes the policy too (its misses may take a lease)
        self.get_kw = self.stampede_kw if self.has_get_or_create else {}
        policy = getattr(store, "stampede", DEFAULT_STAMPEDE) if stampede is _STORE_POLICY else stampede
        #: the in-process single-flight wait (None: no single flight of our own)
        self.wait: float | None = policy.wait if isinstance(policy, Stampede) else None
        # the entry's real lifetime in the store: fresh time plus the stale window
        if lifetime is not None and callable(getattr(store, "configure", None)):
            hard = max(lifetime, negative_lifetime or 0.0) + (stale_on_error or 0.0)
            store.configure(classes=[self.record_class], lifetime=hard)

    def key_for(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if self.key_func is not None:
            chosen = self.key_func(*args, **kwargs)
            try:
                parts: Any = ["key", _canonical(chosen)]
            except UnsupportedKeyValueError as exc:
                raise _unsupported(self.name, "the value key= returned", exc) from None
        else:
            items = self.arguments(args, kwargs)
            if self.skip_first:
                items = items[1:]
            parts = []
            for name, value in items:
                try:
                    parts.append([name, _canonical(value)])
                except UnsupportedKeyValueError as exc:
                    raise _unsupported(self.name, f"argument {name!r}", exc) from None
        # (json's default settings: its cached C encoder, several times faster than custom separators)
        text = json.dumps([self.name, parts])
        return hashlib.blake2b(text.encode("ascii"), digest_size=20).hexdigest()

    def arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
        """``(name, value)`` of every parameter, in signature order, defaults applied."""
        if self.simple and len(args) <= self.positional:
            values = dict(zip(self.names, args, strict=False))
            fast = True
            for name, value in kwargs.items():
                if name in values or name not in self.known:
                    fast = False  # given twice, or unknown: Signature.bind says what is wrong
                    break
                values[name] = value
            if fast and len(values) < len(self.names):
                for name in self.names:
                    if name not in values:
                        if name not in self.defaults:
                            fast = False  # missing
                            break
                        values[name] = self.defaults[name]
            if fast:
                return [(name, values[name]) for name in self.names]
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}(): {exc}") from None
        bound.apply_defaults()
        return list(bound.arguments.items())

    def marker(self, key: str) -> CachedResult:
        """The invalidation marker of ``key``: a record that is never fresh and never served stale."""
        return self.record_class(key, None, None, time.time())

    def make_record(self, key: str, value: Any, now: float) -> CachedResult | None:
        """The record to store for ``value`` (``None``: a ``None`` result that is not cached)."""
        if value is None:
            if self.negative_lifetime is None:
                return None
            return self.record_class(key, None, now + self.negative_lifetime)
        return self.record_class(key, value, None if self.lifetime is None else now + self.lifetime)

    def stale_usable(self, record: CachedResult, now: float) -> bool:
        """Whether ``record`` (past its fresh time) may be served because the recomputation failed."""
        if not self.stale_on_error or record.fresh_until is None or record.invalidated is not None:
            return False  # an invalidated result is never served
        return now < record.fresh_until + self.stale_on_error

    def serve_stale(self, record: CachedResult, exc: BaseException) -> Any:
        log.warning(
            "stockpyle: %s raised %s: serving the previous result (%.1fs past its lifetime)",
            self.name,
            type(exc).__name__,
            time.time() - (record.fresh_until or 0.0),
            exc_info=exc,
        )
        return record.value


# --------------------------------------------------------------------------
# the synchronous wrapper


class CachedFunction(Generic[P, R]):
    """A function whose results are kept in a store; made by :func:`cached`.

    Calling it returns the cached result or computes it.  Accessed through an
    instance (a decorated method), it is bound to that instance like a method,
    and so are :meth:`invalidate`, :meth:`refresh` and :meth:`key_for`.
    """

    __slots__ = ("__dict__", "__weakref__", "_bound", "_core", "_flights")

    def __init__(self, core: _Core, bound: tuple[Any, ...] = (), flights: SingleFlight | None = None) -> None:
        self._core = core
        self._bound = bound
        self._flights = flights if flights is not None else SingleFlight()
        functools.update_wrapper(self, core.func)

    @property
    def store(self) -> Any:
        """The store the results are kept in."""
        return self._core.store

    @property
    def record_class(self) -> type[CachedResult]:
        """The class of this function's records (for ``store.configure()`` or ``invalidate_class()``)."""
        return self._core.record_class

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The key (a hex digest) the result of this call is stored under; the same in every process.

        :raises UnsupportedKeyValueError: for an argument that cannot be encoded.
        """
        return self._core.key_for(self._bound + args, kwargs)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        core = self._core
        full = self._bound + args
        key = core.key_for(full, kwargs)
        keydict = {"key": key}
        store = core.store

        def compute() -> CachedResult | None:
            return core.make_record(key, core.func(*full, **kwargs), time.time())

        # a hit costs one get (the chain's in-process fast path); only a miss pays for get_or_create
        record: CachedResult | None = store.get(core.record_class, keydict, **core.get_kw)
        if record is None:
            if core.has_get_or_create:
                record = store.get_or_create(core.record_class, keydict, compute, **core.stampede_kw)
            else:
                record = self._single(("miss", key), lambda: self._fill(keydict, compute))
        if record is None:
            return None  # type: ignore[return-value]  # the function returned None, not cached
        if record.is_fresh(time.time()):
            return record.value  # type: ignore[no-any-return]
        stale = record
        return self._single(("renew", key), lambda: self._renew(keydict, stale, full, kwargs))  # type: ignore[no-any-return]

    def _single(self, flight_key: tuple[str, str], load: Callable[[], Any]) -> Any:
        wait = self._core.wait
        if wait is None:
            return load()
        return self._flights.run(flight_key, load, wait, load)

    def _fill(self, keydict: dict[str, str], compute: Callable[[], CachedResult | None]) -> CachedResult | None:
        """A plain store's miss: look again (another thread may have filled it), compute, put."""
        store = self._core.store
        found: CachedResult | None = store.get(self._core.record_class, keydict)
        if found is not None:
            return found
        made = compute()
        if made is not None:
            store.put(made)
        return made

    def _renew(
        self, keydict: dict[str, str], stale: CachedResult, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Recompute a record past its fresh time; serve it if that fails and stale_on_error allows."""
        core = self._core
        again: CachedResult | None = core.store.get(core.record_class, keydict)
        if again is not None and again.is_fresh(time.time()):
            return again.value  # renewed meanwhile (by another thread or process)
        try:
            value = core.func(*args, **kwargs)
        except Exception as exc:
            # the latest record seen: an invalidation meanwhile must not be served around
            latest = stale if again is None else again
            if core.stale_usable(latest, time.time()):
                return core.serve_stale(latest, exc)
            raise
        self._store(keydict["key"], value)
        return value

    def _store(self, key: str, value: Any) -> None:
        core = self._core
        record = core.make_record(key, value, time.time())
        if record is None:
            core.store.put(core.marker(key))  # the result is now None (and not cached): the old one must go
        else:
            core.store.put(record)

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Make the next call with these arguments recompute: replace the result by a marker in every layer.

        (Not a delete: see the module docs, "The exact rules".)
        """
        core = self._core
        core.store.put(core.marker(core.key_for(self._bound + args, kwargs)))

    def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the function, store its result unconditionally (``put``) and return it."""
        core = self._core
        full = self._bound + args
        key = core.key_for(full, kwargs)
        value = core.func(*full, **kwargs)
        self._store(key, value)
        return value  # type: ignore[no-any-return]

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> CachedFunction[P, R]: ...

    @overload
    def __get__(
        self: CachedFunction[Concatenate[S, P2], R], instance: S, owner: type[Any] | None = None
    ) -> CachedFunction[P2, R]: ...

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        if instance is None:
            return self
        return CachedFunction(self._core, (*self._bound, instance), self._flights)

    def __repr__(self) -> str:
        return f"<cached {self._core.name} in {self._core.store!r}>"


# --------------------------------------------------------------------------
# the asyncio wrapper


_FAILED: Final[Any] = object()  # what a failed (or cancelled) leader leaves its followers


class _AsyncFlights:
    """Concurrent awaits of one key in one event loop share one load (as :class:`SingleFlight` per process)."""

    def __init__(self) -> None:
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Any, asyncio.Future[Any]]] = (
            weakref.WeakKeyDictionary()
        )

    async def run(self, key: Any, load: Callable[[], Awaitable[Any]], wait: float) -> Any:
        import asyncio

        loop = asyncio.get_running_loop()
        flights = self._loops.setdefault(loop, {})
        flight = flights.get(key)
        if flight is None:
            flight = flights[key] = loop.create_future()
            result = _FAILED
            try:
                result = await load()
                return result
            finally:
                # the leader's error (or cancellation) is its own: followers load for themselves
                if flights.get(key) is flight:
                    del flights[key]
                flight.set_result(result)
        try:
            result = await asyncio.wait_for(asyncio.shield(flight), wait)
        except asyncio.TimeoutError:
            return await load()
        return await load() if result is _FAILED else result


class AsyncCachedFunction(Generic[P, R]):
    """An ``async def`` function whose results are kept in an asyncio store; made by :func:`cached`.

    The same as :class:`CachedFunction`, with every operation awaited:
    ``await f(x)``, ``await f.invalidate(x)``, ``await f.refresh(x)``.
    """

    __slots__ = ("__dict__", "__weakref__", "_bound", "_core", "_flights")

    def __init__(self, core: _Core, bound: tuple[Any, ...] = (), flights: _AsyncFlights | None = None) -> None:
        self._core = core
        self._bound = bound
        self._flights = flights if flights is not None else _AsyncFlights()
        functools.update_wrapper(self, core.func)
        mark = getattr(inspect, "markcoroutinefunction", None)
        if mark is not None:  # Python 3.12+: inspect.iscoroutinefunction(wrapper) stays true
            mark(self)

    @property
    def store(self) -> Any:
        """The store the results are kept in."""
        return self._core.store

    @property
    def record_class(self) -> type[CachedResult]:
        """The class of this function's records."""
        return self._core.record_class

    def key_for(self, *args: P.args, **kwargs: P.kwargs) -> str:
        """The key the result of this call is stored under (see :meth:`CachedFunction.key_for`)."""
        return self._core.key_for(self._bound + args, kwargs)

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        core = self._core
        full = self._bound + args
        key = core.key_for(full, kwargs)
        keydict = {"key": key}
        store = core.store

        async def compute() -> CachedResult | None:
            value = await core.func(*full, **kwargs)
            return core.make_record(key, value, time.time())

        record: CachedResult | None = await store.get(core.record_class, keydict, **core.get_kw)
        if record is None:
            if core.has_get_or_create:
                record = await store.get_or_create(core.record_class, keydict, compute, **core.stampede_kw)
            else:
                record = await self._single(("miss", key), lambda: self._fill(keydict, compute))
        if record is None:
            return None  # type: ignore[return-value]
        if record.is_fresh(time.time()):
            return record.value  # type: ignore[no-any-return]
        stale = record
        return await self._single(("renew", key), lambda: self._renew(keydict, stale, full, kwargs))  # type: ignore[no-any-return]

    async def _single(self, flight_key: tuple[str, str], load: Callable[[], Awaitable[Any]]) -> Any:
        wait = self._core.wait
        if wait is None:
            return await load()
        return await self._flights.run(flight_key, load, wait)

    async def _fill(
        self, keydict: dict[str, str], compute: Callable[[], Awaitable[CachedResult | None]]
    ) -> CachedResult | None:
        store = self._core.store
        found: CachedResult | None = await store.get(self._core.record_class, keydict)
        if found is not None:
            return found
        made = await compute()
        if made is not None:
            await store.put(made)
        return made

    async def _renew(
        self, keydict: dict[str, str], stale: CachedResult, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        core = self._core
        again: CachedResult | None = await core.store.get(core.record_class, keydict)
        if again is not None and again.is_fresh(time.time()):
            return again.value
        try:
            value = await core.func(*args, **kwargs)
        except Exception as exc:
            # the latest record seen: an invalidation meanwhile must not be served around
            latest = stale if again is None else again
            if core.stale_usable(latest, time.time()):
                return core.serve_stale(latest, exc)
            raise
        await self._store(keydict["key"], value)
        return value

    async def _store(self, key: str, value: Any) -> None:
        core = self._core
        record = core.make_record(key, value, time.time())
        if record is None:
            await core.store.put(core.marker(key))
        else:
            await core.store.put(record)

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Make the next call with these arguments recompute (see :meth:`CachedFunction.invalidate`)."""
        core = self._core
        await core.store.put(core.marker(core.key_for(self._bound + args, kwargs)))

    async def refresh(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Await the function, store its result unconditionally (``put``) and return it."""
        core = self._core
        full = self._bound + args
        key = core.key_for(full, kwargs)
        value = await core.func(*full, **kwargs)
        await self._store(key, value)
        return value  # type: ignore[no-any-return]

    @overload
    def __get__(self, instance: None, owner: type[Any] | None = None) -> AsyncCachedFunction[P, R]: ...

    @overload
    def __get__(
        self: AsyncCachedFunction[Concatenate[S, P2], R], instance: S, owner: type[Any] | None = None
    ) -> AsyncCachedFunction[P2, R]: ...

    def __get__(self, instance: Any, owner: type[Any] | None = None) -> Any:
        if instance is None:
            return self
        return AsyncCachedFunction(self._core, (*self._bound, instance), self._flights)

    def __repr__(self) -> str:
        return f"<cached async {self._core.name} in {self._core.store!r}>"


# --------------------------------------------------------------------------
# the decorator


class CachedDecorator:
    """What ``cached(store, ...)`` returns: apply it to a function (``def`` or ``async def``)."""

    __slots__ = ("_options", "store")

    def __init__(self, store: Any, options: dict[str, Any]) -> None:
        self.store = store
        self._options = options

    @overload
    def __call__(self, func: Callable[P, Coroutine[Any, Any, R]]) -> AsyncCachedFunction[P, R]: ...  # type: ignore[overload-overlap]

    @overload
    def __call__(self, func: Callable[P, R]) -> CachedFunction[P, R]: ...

    def __call__(self, func: Callable[..., Any]) -> Any:
        if isinstance(func, (staticmethod, classmethod)):
            raise ConfigurationError(
                "@cached must be applied to the function itself: put @staticmethod/@classmethod above @cached"
            )
        if not callable(func):
            raise ConfigurationError(f"@cached decorates a function; got {func!r}")
        module, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
        if not isinstance(qualname, str):
            raise ConfigurationError(f"@cached needs a function with a name (it makes its keys); got {func!r}")
        if not isinstance(module, str):
            module = "__main__"  # code run by exec() without a __name__ (doctests, notebooks)
        name = f"{module}.{qualname}"
        if qualname.rpartition(".")[2] == "<lambda>":
            # every lambda of a scope has the same qualname: two would read each other's results
            raise ConfigurationError(f"@cached cannot key {name}: lambdas share one name; define the function with def")
        is_async = inspect.iscoroutinefunction(func)
        if is_async != _is_async_store(self.store):
            if is_async:
                raise ConfigurationError(
                    f"@cached {name} is an async function but {self.store!r} is a synchronous store: use an "
                    "asyncio store (AsyncChainedStore, AsyncKeyValueStore ...)"
                )
            raise ConfigurationError(
                f"@cached {name} is a synchronous function but {self.store!r} is an asyncio store: use a "
                "synchronous store (ChainedStore, MemcacheStore ...) or make the function async"
            )
        core = _Core(func, self.store, name=name, **self._options)
        return AsyncCachedFunction(core) if is_async else CachedFunction(core)


def cached(
    store: Any,
    *,
    lifetime: float | _dt.timedelta | None = None,
    key: Callable[..., Any] | None = None,
    stampede: Stampede | None = _STORE_POLICY,
    negative_lifetime: float | _dt.timedelta | None = None,
    stale_on_error: float | _dt.timedelta | None = None,
) -> CachedDecorator:
    """Keep the results of the decorated function in ``store`` (see the module docs for the rules).

    ::

        @cached(store, lifetime=60)
        def report(day: date, region: str = "eu") -> Report: ...

    :param store: any stockpyle store, typically a :class:`~stockpyle.ChainedStore`
        of caches; an asyncio store (:class:`~stockpyle.stores.achained.AsyncChainedStore`,
        :class:`~stockpyle.stores.kv.AsyncKeyValueStore`) for an ``async def``.
    :param lifetime: seconds (or a timedelta) a result stays fresh; ``None``:
        until the store drops it (a network store's ``max_lifetime`` caps it).
    :param key: ``(*args, **kwargs) -> value``: what the result depends on,
        instead of the bound arguments (``self`` included when it matters).
    :param stampede: the :class:`~stockpyle.Stampede` policy of a miss; by
        default the store's; ``None``: no protection (every miss computes).
    :param negative_lifetime: seconds a ``None`` result is cached; ``None``
        (the default): ``None`` results are not cached.
    :param stale_on_error: seconds past ``lifetime`` during which the previous
        result is returned when recomputing it raises; needs ``lifetime``.
    :raises ConfigurationError: for invalid settings, for a synchronous store
        given an ``async def`` (or the reverse), and for an object that is
        not a store.
    """
    _check_store(store)
    if key is not None and not callable(key):
        raise ConfigurationError(f"@cached key= takes a callable (the function's arguments -> key value); got {key!r}")
    if stampede is not _STORE_POLICY and stampede is not None and not isinstance(stampede, Stampede):
        raise ConfigurationError(f"@cached stampede= takes a stockpyle.Stampede or None; got {stampede!r}")
    life = _duration("lifetime", lifetime)
    negative = _duration("negative_lifetime", negative_lifetime)
    stale = _duration("stale_on_error", stale_on_error)
    if stale is not None and life is None:
        raise ConfigurationError(
            "@cached stale_on_error= needs a lifetime=: a result is served stale only after its lifetime ends"
        )
    options = {
        "lifetime": life,
        "key": key,
        "stampede": stampede,
        "negative_lifetime": negative,
        "stale_on_error": stale,
    }
    return CachedDecorator(store, options)
