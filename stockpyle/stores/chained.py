"""Write-through layering of stores: :class:`ChainedStore` (alias ``MultiStore``).

The chain's policy -- which layer to ask, what to back-fill, what to
invalidate, when a layer's circuit breaker lets a call through, what the
statistics count -- is written once, in :class:`ChainPolicy`, as *plans*:
generators that call in-process layers directly and yield a :class:`Call` for
every other layer, receiving its result (or having its exception thrown in).
:class:`ChainedStore` drives the plans synchronously; an asynchronous chain
drives the very same plans with ``await``.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from time import perf_counter
from typing import Any, Final, TypeVar

from ..bus import BusStats, InvalidationBus, class_digest, key_digest
from ..effects import WriteEffects
from ..exceptions import ConfigurationError, ObjectError, StoreError, UnknownKeyError
from ..keys import Key, canonical_value, lookup_key, object_keys
from ..stampede import DEFAULT_STAMPEDE, LeaseTimeoutError, SingleFlight, Stampede
from ..stats import SAMPLE_EVERY, Latency, StoreStats
from ._repair import repairs
from .base import BaseStore, DirectIndex, KeyDict, MemoryEntry

__all__ = ["BUS", "Call", "ChainPolicy", "ChainStats", "ChainedStore", "LayerStats", "MultiStore"]

T = TypeVar("T")
log = logging.getLogger("stockpyle.chained")
_monotonic = time.monotonic

_OPERATIONS = ("put", "get", "delete", "batch_put", "batch_get", "batch_delete")
#: Operations of the chain's own read path; everything else is a caller's write.
_READS = frozenset({"get", "batch_get", "backfill"})


class _Failed:
    """The type of :data:`_FAILED`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FAILED"


#: What a guarded call of a cache layer returns when the layer was skipped or failed.
_FAILED: Any = _Failed()
#: The default of a call's ``stampede=``: the chain's own policy.
_CHAIN_POLICY: Any = object()
#: A read not made yet (see ``_plan_leased_read``'s ``first``).
_UNASKED: Any = object()
#: The default of ``bus=``: no bus, and a warning when in-process layers sit above shared ones.
NO_BUS: Final[Any] = object()
#: Key names remembered for invalidations before the in-process layers are flushed and it starts afresh.
_DIGEST_LIMIT = 1_000_000


#: The index of a :class:`Call` addressed to the chain's invalidation bus rather than a layer.
BUS: Final = -1
#: A :class:`Call` index asking the executor to pause: ``Call(SLEEP, "sleep", (seconds,))``.
SLEEP: Final = -2
#: A :class:`Call` index asking the executor to run a creator: ``Call(CREATE, "create", (creator,))``
#: (its result is awaited when it is awaitable, in the asyncio chain).
CREATE: Final = -3


class Call:
    """One operation a plan asks of a layer that is not in process: ``stores[index].method(*args)``.

    An ``index`` of :data:`BUS` addresses the chain's invalidation bus,
    :data:`SLEEP` a pause and :data:`CREATE` the creator of ``get_or_create``.
    """

    __slots__ = ("args", "index", "method")

    def __init__(self, index: int, method: str, args: tuple[Any, ...]) -> None:
        self.index = index
        self.method = method
        self.args = args

    def __repr__(self) -> str:
        return f"Call({self.index}, {self.method!r})"


#: A plan: yields :class:`Call` objects, receives their results, returns ``T``.
Plan = Generator[Call, Any, T]


@dataclass
class LayerStats:
    """Counters of one layer of a :class:`ChainedStore`.

    :ivar hits: lookups this layer answered.
    :ivar misses: lookups it was asked and could not answer.
    :ivar errors: operations on it that failed and were absorbed (cache
        layers only; the last layer's errors propagate).
    :ivar backfills: objects written into it because a lower layer had them.
    :ivar skipped: operations not sent to it because its circuit breaker was open.
    :ivar breaker_opens: how many times its circuit breaker opened.
    :ivar pending_invalidations: objects written while it was unreachable,
        to be invalidated in it when it rejoins.
    :ivar latency: sampled durations of the lookups the chain made in this
        layer (``latency.summary()`` gives median and p99).
    """

    store: Any
    hits: int = 0
    misses: int = 0
    errors: int = 0
    backfills: int = 0
    skipped: int = 0
    breaker_opens: int = 0
    pending_invalidations: int = 0
    latency: Latency = field(default_factory=Latency, repr=False, compare=False)

    @property
    def hit_ratio(self) -> float:
        """``hits / (hits + misses)``, or 0.0 before any lookup."""
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict (plus ``store`` as its repr and ``hit_ratio``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("store", "latency")}
        out["store"] = repr(self.store)
        out["hit_ratio"] = self.hit_ratio
        out["latency"] = self.latency.summary().as_dict()
        return out

    def reset(self) -> None:
        """Set the counters back to zero (pending invalidations are kept: they are state)."""
        self.hits = self.misses = self.errors = self.backfills = self.skipped = self.breaker_opens = 0
        self.latency.clear()


@dataclass
class ChainStats(StoreStats):
    """A chain's statistics: its own totals plus one :class:`LayerStats` per layer.

    ``hits`` counts lookups answered by any layer and ``misses`` those no
    layer could answer; ``errors`` the cache failures the chain absorbed.
    It also behaves as the list of layer statistics (``stats[0].hits``).
    """

    layers: list[LayerStats] = field(default_factory=list)
    #: the invalidation bus's statistics in this process, or ``None`` without a bus
    bus: BusStats | None = None
    #: keys dropped from the in-process layers by invalidations from the bus
    invalidated: int = 0
    #: times the in-process layers were flushed because the bus lost messages
    flushes: int = 0
    #: back-fills of in-process layers skipped because an invalidation or a flush came in meanwhile
    fills_refused: int = 0
    #: whether in-process entries may be served now (the bus was heard within its max_staleness)
    trusted: bool = True
    #: misses of this process that took a shared layer's lease, and so loaded the key for everyone
    leases_won: int = 0
    #: misses that found another reader's lease and waited for its fill
    leases_lost: int = 0
    #: of those, the ones whose wait ended with the other reader's object
    lease_waits: int = 0
    #: waits that ran out (``Stampede.wait``) before the fill came
    lease_timeouts: int = 0
    #: reads answered at once with a stale value while another reader refreshed it (``Stampede.serve_stale_for``)
    stale_served: int = 0
    #: leases won on a present value, to reload it: ahead of its expiry (``Stampede.refresh_ahead``) or stale
    refreshes: int = 0

    def reset(self) -> None:
        """Set the chain's own counters back to zero (the layers' are reset by :meth:`ChainedStore.reset_stats`)."""
        super().reset()
        self.invalidated = self.flushes = self.fills_refused = 0
        self.leases_won = self.leases_lost = self.lease_waits = self.lease_timeouts = 0
        self.stale_served = self.refreshes = 0

    def __iter__(self) -> Iterator[LayerStats]:
        return iter(self.layers)

    def __getitem__(self, index: int) -> LayerStats:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def as_dict(self) -> dict[str, Any]:
        """Totals and per-layer statistics as plain data."""
        out = super().as_dict()
        out["layers"] = [layer.as_dict() for layer in self.layers]
        out["stampede"] = {
            name: getattr(self, name)
            for name in ("leases_won", "leases_lost", "lease_waits", "lease_timeouts", "stale_served", "refreshes")
        }
        if self.bus is not None:
            out["bus"] = {
                **self.bus.as_dict(),
                "invalidated": self.invalidated,
                "flushes": self.flushes,
                "fills_refused": self.fills_refused,
                "trusted": self.trusted,
            }
        return out


class _Breaker:
    """Circuit breaker of one cache layer.

    Closed: calls go through.  After ``threshold`` consecutive failures it
    opens for ``cooldown`` seconds, during which the layer is skipped (reads
    are misses, writes are remembered as pending invalidations).  The first
    call after the cool-down probes the layer (half-open); success closes the
    breaker, after the pending invalidations have been applied, and failure
    opens it again.
    """

    __slots__ = (
        "threshold", "cooldown", "failures", "open_until", "pending", "overflowed", "lock", "max_pending", "on_pending",
        "replaying",
    )  # fmt: skip

    def __init__(
        self, threshold: int, cooldown: float, max_pending: int, on_pending: Callable[[], None] | None = None
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = 0.0  # 0.0: closed
        self.pending: list[Any] = []
        #: objects taken from ``pending`` by a replay still under way
        self.replaying = 0
        self.overflowed = False
        self.max_pending = max_pending
        self.lock = threading.Lock()
        #: called after objects were remembered (the chain schedules its repair)
        self.on_pending = on_pending

    def remember(self, objs: Iterable[Any]) -> None:
        with self.lock:
            for obj in objs:
                if len(self.pending) >= self.max_pending:
                    self.overflowed = True
                    break
                self.pending.append(obj)
        if self.on_pending is not None:
            self.on_pending()


def _finish(plan: Plan[T]) -> T:
    """The result of a plan that makes no :class:`Call` (every layer it touches is in process)."""
    try:
        call = plan.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    plan.close()
    raise AssertionError(f"a plan meant for in-process layers yielded {call!r}")  # pragma: no cover


def _layer_type_has(layer: Any, name: str) -> bool:
    """Whether ``layer``'s type offers ``name`` -- checked on the type, never on the instance.

    A type that forwards attributes dynamically (``__getattr__``) is taken at its word.
    """
    kind = type(layer)
    return callable(getattr(kind, name, None)) or callable(getattr(kind, "__getattr__", None))


def _declares(layer: Any, flag: str, method: str) -> bool:
    """A capability flag of ``layer``'s type; a duck-typed layer without the flag has it if its type has ``method``."""
    declared = getattr(type(layer), flag, None)
    if declared is not None:
        return bool(declared)
    return callable(getattr(type(layer), method, None))


class ChainPolicy:
    """The chain's policy as plans, shared by the synchronous and asynchronous chains.

    Subclasses provide an executor that runs plans: calls every :class:`Call`
    a plan yields on ``self.stores[call.index]`` and sends the result back (or
    throws the exception in).  Everything else -- the layers' order, circuit
    breakers, back-fills, invalidations and statistics -- is here.
    """

    # The attributes the hit path reads are slots: a chain has more attributes
    # than CPython keeps in an instance's shared-key values (30), and past
    # that every attribute is looked up in a dict of its own, ~5 ns a load
    # more on a hit made of a dozen loads.  The rest live in the dict.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "_countdown",
        "_cycles",
        "_fast_index",
        "_first_stats",
        "_others",
        "_single",
        "bus",
        "stores",
    )

    stores: tuple[Any, ...]

    def _setup_policy(
        self,
        layers: list[Any],
        failure_threshold: int,
        cooldown: float,
        max_pending_invalidations: int,
        retry_interval: float,
        *,
        bus: Any = NO_BUS,
    ) -> None:
        if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int) or failure_threshold < 1:
            raise ConfigurationError(f"failure_threshold must be a positive int; got {failure_threshold!r}")
        if isinstance(cooldown, bool) or not isinstance(cooldown, (int, float)) or not cooldown >= 0:
            raise ConfigurationError(f"cooldown must be a number of seconds >= 0; got {cooldown!r}")
        if isinstance(max_pending_invalidations, bool) or not isinstance(max_pending_invalidations, int):
            raise ConfigurationError(f"max_pending_invalidations must be an int; got {max_pending_invalidations!r}")
        if isinstance(retry_interval, bool) or not isinstance(retry_interval, (int, float)) or not retry_interval > 0:
            raise ConfigurationError(f"retry_interval must be a positive number of seconds; got {retry_interval!r}")
        self.retry_interval = float(retry_interval)
        self.stores = tuple(layers)
        self._layer_stats = [LayerStats(layer) for layer in layers]
        # weakly: breakers must not keep their chain alive (the repair thread holds chains weakly too)
        schedule = weakref.WeakMethod(self._schedule_repair)

        def on_pending() -> None:
            method = schedule()
            if method is not None:
                method()

        self._breakers = [
            _Breaker(failure_threshold, float(cooldown), max_pending_invalidations, on_pending) for _ in layers
        ]
        # a last layer that only caches (memcached under a session extension's
        # chain) is repaired like the others; a system of record never is
        self._last_is_cache = bool(getattr(type(layers[-1]), "is_cache", False))
        # the shared cache layer that takes leases on misses: the first one that declares them
        leasing = [
            i
            for i, layer in enumerate(layers)
            if not getattr(type(layer), "in_process", False) and _declares(layer, "supports_leases", "lease_get")
        ]
        last = len(layers) - 1
        self._lease_layer: int | None = next((i for i in leasing if i != last), None)
        # get_or_create over caches only: the last layer may hold the lease too
        self._create_lease_layer: int | None = next((i for i in leasing if i != last or self._last_is_cache), None)
        self._last = len(layers) - 1
        # capabilities, read from each layer's type once
        self._in_process = [bool(getattr(type(layer), "in_process", False)) for layer in layers]
        # how each layer is back-filled: add-only when it can, else a plain put
        self._add = ["add" if _declares(layer, "supports_add", "add") else "put" for layer in layers]
        self._batch_add = [
            "batch_add" if _declares(layer, "supports_add", "batch_add") else "batch_put" for layer in layers
        ]
        self._class_invalidation = [
            _declares(layer, "supports_class_invalidation", "invalidate_class") for layer in layers
        ]
        # the last layer reports what its writes really did (SqlAlchemyStore)
        self._reports_effects = bool(getattr(type(layers[-1]), "reports_effects", False))
        # in-process layers that keep one table per thread: a write reaches the others through invalidate_keys
        self._per_thread = [bool(getattr(type(layer), "per_thread", False)) for layer in layers]
        self._totals = ChainStats(layers=self._layer_stats)
        self._setup_coherence(bus)

    def _check_policy(self, policy: Any) -> None:
        """A per-call ``stampede=``: a :class:`Stampede` this chain can honour."""
        if not isinstance(policy, Stampede):
            raise ConfigurationError(f"stampede= takes a stockpyle.Stampede or None; got {policy!r}")
        if policy.refreshes:
            self._check_stampede(policy)

    def _check_stampede(self, policy: Stampede | None, *, configure: bool = False) -> None:
        """Refuse a policy with ``refresh_ahead``/``serve_stale_for`` this chain cannot honour.

        Both need a shared layer whose leases elect one refresher of a present
        value; with ``configure``, the lease layer is told to keep stale values
        for ``serve_stale_for``.

        :raises ConfigurationError: naming what is missing.
        """
        if policy is None or not policy.refreshes:
            return
        index = self._lease_layer
        if index is None:
            raise ConfigurationError(
                "Stampede(refresh_ahead=..., serve_stale_for=...) needs a shared cache layer with leases above the "
                "last layer (MemcacheStore, RedisStore, or their asyncio twins): one reader of the fleet reloads "
                f"under the key's lease while the others are served; this chain has none "
                f"({' -> '.join(type(layer).__name__ for layer in self.stores)})"
            )
        layer = self.stores[index]
        if not getattr(layer, "can_refresh", False):
            raise ConfigurationError(
                f"Stampede(refresh_ahead=..., serve_stale_for=...) needs leases that elect one refresher of a "
                f"present value; the lease layer {index} ({layer!r}) cannot (pylibmc offers no leases; a driver "
                f"must take lease_get(..., recache=...))"
            )
        if configure and policy.serve_stale_for:
            layer.keep_stale_for(policy.serve_stale_for)

    # -- coherence of in-process layers (the invalidation bus) ---------------

    def _setup_coherence(self, bus: Any) -> None:
        coherent = [i for i, in_process in enumerate(self._in_process) if in_process]
        shared_below = any(not in_process for in_process in self._in_process[1:])
        self.bus: InvalidationBus | None = None if bus is NO_BUS else bus
        #: whether in-process entries may be served (always, without a bus)
        self._trusted = True
        self._flushes = 0
        self._digests: dict[str, Key] = {}  # bus name -> key, for keys the in-process layers may hold
        self._class_digests: dict[str, type] = {}
        self._unpublished: list[str] = []
        self._origin = f"{os.getpid()}:{id(self):x}:{secrets.token_hex(4)}"
        self._coherent = coherent
        if self.bus is None:
            if bus is NO_BUS and coherent and shared_below:
                log.warning(
                    "stockpyle: this chain's in-process layers are not kept coherent across processes: another "
                    "process's writes reach them only when their entries expire.  Pass bus= (see stockpyle.bus), "
                    "or give them a short lifetime with configure(); pass bus=None to silence this"
                )
            return
        missing = [name for name in ("publish", "subscribe", "unsubscribe", "stats") if not _layer_type_has(bus, name)]
        if missing or not isinstance(getattr(bus, "max_staleness", None), (int, float)):
            raise ConfigurationError(
                f"bus= takes an invalidation bus (see stockpyle.bus), e.g. RedisStreamBus(url); {bus!r} lacks "
                + (", ".join(missing) if missing else "max_staleness")
            )
        self.bus.subscribe(self)

    def _trust(self) -> bool:
        """Whether in-process entries may be served now: the bus's deadline, compared on every read.

        Comparing the clock on the read (rather than in a thread that
        switches the chain at intervals) keeps the bound whatever the
        scheduler does to the process's threads.  ``_trusted`` is false once
        the chain stopped listening (:meth:`release`).
        """
        if not self._trusted:
            return False
        bus = self.bus
        return bus is None or _monotonic() < bus.trusted_until

    def _digest_keys(self, objs: Iterable[Any]) -> list[str]:
        """The bus names of every key of ``objs`` (under every storable base), remembered for invalidations."""
        digests = []
        index = self._digests
        if len(index) > _DIGEST_LIMIT:
            # a plain bound: forgetting names would miss invalidations, so the layers go too
            index.clear()
            self.flush()
        for obj in objs:
            for key in object_keys(obj, True):
                digest = key_digest(key)
                index[digest] = key
                digests.append(digest)
            klass = type(obj)
            self._class_digests[class_digest(klass)] = klass
        return digests

    def invalidate(self, digests: Sequence[str], origin: str | None = None) -> None:
        """:class:`~stockpyle.bus.BusListener`: drop these keys from the in-process layers (another writer's)."""
        if origin == self._origin:
            return  # this chain's own write: its layers are up to date
        keys = [key for key in map(self._digests.pop, digests, [None] * len(digests)) if key is not None]
        classes = [klass for klass in map(self._class_digests.get, digests) if klass is not None]
        for index in self._coherent:
            layer = self.stores[index]
            if keys:
                layer.invalidate_keys(keys)
            for klass in classes:
                layer.invalidate_class(klass)
        self._totals.invalidated += len(keys)

    def flush(self) -> None:
        """:class:`~stockpyle.bus.BusListener`: messages were lost: drop everything from the in-process layers."""
        self._flushes += 1
        self._totals.flushes += 1
        for index in self._coherent:
            self.stores[index].invalidate_all()

    def _plan_publish(self, digests: list[str]) -> Plan[None]:
        """Tell the other processes, through the bus, which keys changed; retried in the background when it fails.

        The bus is called like a layer (a :class:`Call` with index
        :data:`BUS`), so an asynchronous chain does not block its event loop.
        """
        bus = self.bus
        if bus is None or not digests:
            return
        pending = self._unpublished
        if pending:
            digests, self._unpublished = pending + digests, []
        try:
            yield Call(BUS, "publish", (digests, self._origin))
        except (StoreError, OSError) as exc:
            log.warning("stockpyle: could not publish %d invalidations on %r (retried): %s", len(digests), bus, exc)
            self._unpublished = digests[-_DIGEST_LIMIT:]
            self._schedule_repair()

    def _other_threads(self, objs: list[Any]) -> None:
        """Drop other threads' copies of ``objs`` from per-thread in-process layers (before this thread writes)."""
        keys = [key for obj in objs for key in object_keys(obj, True)]
        for index in self._coherent:
            if self._per_thread[index]:
                self.stores[index].invalidate_keys(keys)

    # -- calling layers -----------------------------------------------------

    def _ask(self, index: int, method: str, *args: Any) -> Plan[Any]:
        """``stores[index].method(*args)``: directly for in-process layers, through the executor otherwise."""
        if self._in_process[index]:
            return getattr(self.stores[index], method)(*args)
        return (yield Call(index, method, args))

    def _admit(self, index: int) -> bool:
        """Whether layer ``index``'s breaker lets a call through now (counted when it does not)."""
        breaker = self._breakers[index]
        if breaker.open_until:
            now = _monotonic()
            if now < breaker.open_until:
                self._layer_stats[index].skipped += 1
                return False
            # half-open: this call probes; concurrent callers keep skipping
            breaker.open_until = now + breaker.cooldown
            log.debug("stockpyle: cache layer %d (%r) is probed after its cool-down", index, self.stores[index])
        return True

    def _absorb(self, index: int, action: str, exc: BaseException) -> Any:
        """Count and log a cache layer's failure; :data:`_FAILED`, or the object fault re-raised on writes."""
        if isinstance(exc, ObjectError):
            self._layer_stats[index].errors += 1
            if action not in _READS:
                raise exc
            log.warning("stockpyle: cache layer %d (%r) could not %s an object: %s",
                        index, self.stores[index], action, exc)  # fmt: skip
        else:
            self._failed(index, action, exc)
        return _FAILED

    def _in_process_call(self, index: int, action: str, method: str, *args: Any) -> Any:
        """:meth:`_guarded` for an in-process layer: the same rules, without a plan."""
        breaker = self._breakers[index]
        if breaker.open_until and not self._admit(index):
            return _FAILED
        if breaker.pending and not _finish(self._replay(index)):
            return _FAILED
        try:
            result = getattr(self.stores[index], method)(*args)
        except (ObjectError, StoreError) as exc:
            return self._absorb(index, action, exc)
        if breaker.failures:
            self._recovered(index)
        return result

    def _guarded(self, index: int, action: str, method: str, *args: Any) -> Plan[Any]:
        """Call a cache layer through its breaker.

        Writes this layer missed (while unreachable, or in a single failed
        call) are invalidated in it before it serves anything again.

        :returns: the method's result, or :data:`_FAILED` when the layer was
            skipped or failed (the failure is counted and logged).
        :raises ObjectError: when the layer refuses one object on a write.
        """
        if self._in_process[index]:
            return self._in_process_call(index, action, method, *args)
        breaker = self._breakers[index]
        if breaker.open_until and not self._admit(index):
            return _FAILED
        if breaker.pending:
            replayed = yield from self._replay(index)
            if not replayed:
                return _FAILED
        try:
            result = yield Call(index, method, args)
        except (ObjectError, StoreError) as exc:
            return self._absorb(index, action, exc)
        if breaker.failures:
            self._recovered(index)
        return result

    def _take_answer(self, index: int, action: str, answer: Any) -> Any:
        """:meth:`_guarded`'s rules for a call already made (its result, or the exception it raised).

        The caller checked the breaker before the call (closed, nothing to
        replay), as :meth:`_guarded` does.
        """
        if isinstance(answer, BaseException):
            if isinstance(answer, (ObjectError, StoreError)):
                return self._absorb(index, action, answer)
            raise answer
        if self._breakers[index].failures:
            self._recovered(index)
        return answer

    def _failed(self, index: int, action: str, exc: BaseException) -> None:
        self._layer_stats[index].errors += 1
        breaker = self._breakers[index]
        breaker.failures += 1
        if breaker.failures >= breaker.threshold:
            was_open = bool(breaker.open_until)
            breaker.open_until = _monotonic() + breaker.cooldown
            if not was_open:
                self._layer_stats[index].breaker_opens += 1
                log.error(
                    "stockpyle: cache layer %d (%r) failed %d times in a row; skipping it for %.1fs: %s",
                    index,
                    self.stores[index],
                    breaker.failures,
                    breaker.cooldown,
                    exc,
                )
                return
        log.warning("stockpyle: cache layer %d (%r) failed to %s; continuing without it: %s",
                    index, self.stores[index], action, exc)  # fmt: skip

    def _recovered(self, index: int) -> None:
        breaker = self._breakers[index]
        log.debug("stockpyle: cache layer %d (%r) succeeded; its breaker closes", index, self.stores[index])
        if breaker.open_until:
            log.warning("stockpyle: cache layer %d (%r) answers again; it rejoins the chain", index, self.stores[index])
        breaker.failures = 0
        breaker.open_until = 0.0

    def _replay(self, index: int, background: bool = False) -> Plan[bool]:
        """Invalidate in layer ``index`` what was written while it was unreachable.

        A background attempt that fails is not counted against the layer (the
        calls that failed were) and logs at DEBUG only: it repeats every
        ``retry_interval`` seconds while the layer is down.
        """
        breaker = self._breakers[index]
        with breaker.lock:
            pending, breaker.pending = breaker.pending, []
            overflowed, breaker.overflowed = breaker.overflowed, False
            breaker.replaying += len(pending)
        if overflowed:
            log.warning(
                "stockpyle: cache layer %d (%r) missed more than %d writes while unreachable; entries it still "
                "holds for the others stay stale until their lifetime ends",
                index, self.stores[index], breaker.max_pending,
            )  # fmt: skip
        if not pending:
            return True
        try:
            yield from self._ask(index, "batch_delete", pending)
        except (StoreError, ObjectError) as exc:
            with breaker.lock:
                breaker.replaying -= len(pending)
            breaker.remember(pending)
            if background:
                log.debug("stockpyle: cache layer %d (%r) still cannot take its missed invalidations: %s",
                          index, self.stores[index], exc)  # fmt: skip
            else:
                self._failed(index, "invalidate missed writes", exc)
            return False
        except BaseException:
            with breaker.lock:
                breaker.replaying -= len(pending)
            breaker.remember(pending)
            raise
        with breaker.lock:
            breaker.replaying -= len(pending)
        log.info("stockpyle: invalidated %d missed writes in cache layer %d", len(pending), index)
        if breaker.failures or breaker.open_until:
            self._recovered(index)  # it answered: it rejoins
        return True

    # -- background repair ----------------------------------------------------

    def _schedule_repair(self) -> None:
        """Have the pending invalidations retried in the background (each executor knows how)."""
        raise NotImplementedError

    def _plan_repair(self) -> Plan[bool]:
        """Replay every layer's pending invalidations; True when some are still pending."""
        still = False
        for index, breaker in enumerate(self._breakers):
            if breaker.pending:
                replayed = yield from self._replay(index, background=True)
                still = still or not replayed
        if self._unpublished and self.bus is not None:
            digests, self._unpublished = self._unpublished, []
            try:
                yield Call(BUS, "publish", (digests, self._origin))
            except (StoreError, OSError) as exc:
                log.debug("stockpyle: still cannot publish %d invalidations: %s", len(digests), exc)
                self._unpublished = digests + self._unpublished
                still = True
        return still

    # -- reads --------------------------------------------------------------

    def _plan_get(
        self,
        start: int,
        klass: type[T],
        keydict: KeyDict,
        timed: bool,
        *,
        fill: bool = True,
        policy: Stampede | None = None,
        creator: Callable[[], Any] | None = None,
        publish: Callable[[Any], None] | None = None,
        answered: tuple[int, float, Any] | None = None,
    ) -> Plan[T | None]:
        """Ask the layers from ``start`` down; back-fill the layers above the hit (unless ``fill`` is false).

        With a ``policy`` that uses leases, the first shared layer that offers
        them is read with ``lease_get``: one reader of all processes loads a
        missing key, the others wait for its fill (see :mod:`stockpyle.stampede`).
        With a ``creator`` (``get_or_create``), a miss in every layer calls it
        and stores its object in every layer.

        With a policy that refreshes (``refresh_ahead``, ``serve_stale_for``),
        a reader served a stale value returns it at once, filling nothing; the
        reader elected to refresh hands the value it found to ``publish`` (the
        followers of its single flight), then reloads inline and fills through
        its lease.  A refresh that finds the object gone removes it from the
        lease layer and those above; one whose load fails returns the value it
        found (logged).

        ``answered``: ``start`` is the lease layer and its first ``lease_get``
        was already made (see :meth:`ChainedStore._read_shared`): the flush
        count and the clock when that read began, and its answer.
        """
        last = self._last
        in_process = self._in_process
        flushes = self._flushes  # a fill is skipped if the in-process layers were flushed meanwhile
        if answered is not None:
            flushes = answered[0]
        leased = None
        if policy is not None and policy.leases and fill:
            leased = self._create_lease_layer if creator is not None else self._lease_layer
        token: Any = None  # the lease this read holds in layer ``leased``
        previous: Any = None  # the value this reader was elected to refresh
        try:
            for index in range(start, last + 1):
                stats = self._layer_stats[index]
                # in-process layers are timed when sampled, the others (I/O) always
                clock = timed or not in_process[index]
                began = perf_counter() if clock else 0.0
                try:
                    if index == leased:
                        assert policy is not None
                        first: Any = _UNASKED
                        if answered is not None:
                            _, began, first = answered
                        elif index == last and self._breakers[index].pending:
                            yield from self._replay(index)
                        obj, token, outcome = yield from self._plan_leased_read(
                            index, klass, keydict, policy, creator is None, first=first
                        )
                        if outcome == "stale":  # another reader refreshes it: served as it is, filling nothing
                            stats.hits += 1
                            if clock:
                                stats.latency.add(perf_counter() - began)
                            return obj  # type: ignore[no-any-return]
                        if outcome == "refresh":  # this reader reloads it; its followers take what it found
                            previous = obj
                            stats.hits += 1
                            if publish is not None:
                                publish(obj)
                            continue
                        if outcome == "timeout":
                            if policy.on_timeout == "miss":
                                return None
                            if policy.on_timeout == "raise":
                                raise LeaseTimeoutError(
                                    f"waited {policy.wait}s for another process's load of {klass.__qualname__} "
                                    f"{dict(keydict)!r}"
                                )
                            fill, leased = False, None  # load for ourselves, filling nothing
                            continue
                        if obj is _FAILED:
                            continue
                    elif index != last:
                        if in_process[index]:
                            if not self._trust():
                                continue  # the bus fell silent: in-process entries may be stale
                            obj = self._in_process_call(index, "get", "get", klass, keydict)
                        else:
                            obj = yield from self._guarded(index, "get", "get", klass, keydict)
                        if obj is _FAILED:
                            continue
                    else:
                        if self._breakers[index].pending:  # a last layer that is a cache missed writes
                            yield from self._replay(index)
                        if in_process[index]:
                            obj = self.stores[index].get(klass, keydict)
                        else:
                            obj = yield Call(index, "get", (klass, keydict))
                except UnknownKeyError:
                    if index == last:
                        raise
                    continue  # this cache can only look up declared keys; ask lower layers
                if clock:
                    stats.latency.add(perf_counter() - began)
                if obj is None:
                    stats.misses += 1
                    continue
                stats.hits += 1
                token = yield from self._backfill(index - 1 if fill else -1, obj, flushes, leased, token)
                return obj  # type: ignore[no-any-return]
            made = None
            if creator is not None:
                made = yield Call(CREATE, "create", (creator,))
                if made is not None:
                    self._check_created(klass, keydict, made)
                    token = yield from self._backfill(last, made, flushes, leased, token)
            else:
                log.debug("stockpyle: no layer has %s %r", klass.__qualname__, keydict)
            if previous is not None and made is None and leased is not None:
                # the refresh found the object gone: no cache may serve it any longer (this also ends the lease)
                token = None
                yield from self._plan_invalidate(range(leased, -1, -1), [previous])
                return None
            if token is not None and leased is not None:  # nothing to fill the lease with: the next reader tries
                yield from self._guarded(leased, "release a lease", "lease_release", token)
            return made
        except GeneratorExit:
            raise
        except BaseException as exc:
            if token is not None and leased is not None:  # the load failed: let the next reader try
                yield from self._guarded(leased, "release a lease", "lease_release", token)
            if previous is not None and isinstance(exc, StoreError):
                # a refresh that failed: the value found is still the best answer (others are served it too)
                log.warning("stockpyle: could not refresh %s %r; serving the value cached: %s",
                            klass.__qualname__, keydict, exc)  # fmt: skip
                return previous  # type: ignore[no-any-return]
            raise

    def _follower_wait(self, policy: Stampede) -> float:
        """How long a reader waits for its process's leader of the same key.

        Where the leader may itself wait for another process's lease (up to
        ``wait``) and then load (up to ``lease``), followers wait for both, so
        they do not give up while the leader is still within its bounds.
        """
        if policy.leases and self._lease_layer is not None:
            return policy.wait + policy.lease
        return policy.wait

    def _plan_leased_read(
        self,
        index: int,
        klass: type,
        keydict: KeyDict,
        policy: Stampede,
        refresh: bool = True,
        *,
        first: Any = _UNASKED,
    ) -> Plan[tuple[Any, Any, str]]:
        """``lease_get`` on layer ``index``, waiting while another reader holds the lease.

        :returns: ``(obj, token, outcome)``: ``outcome`` is ``"read"`` (``obj``
            is the object, ``None`` for a miss -- with ``token`` when this
            reader won the lease and is to load -- or :data:`_FAILED`),
            ``"stale"`` (``obj`` is a stale value another reader refreshes:
            serve it as it is), ``"refresh"`` (``obj`` is the value found,
            current or stale, and this reader won the lease to reload it) or
            ``"timeout"``.  Without ``serve_stale_for`` a reader is never
            served a stale value: it waits for the load.

        ``first``: the answer of a first ``lease_get`` already made with these
        arguments (see :meth:`ChainedStore._read_shared`), or the exception it raised.
        """
        stats = self._totals
        deadline = _monotonic() + policy.wait
        pauses = policy.pauses()
        waited = False
        args: tuple[Any, ...] = (klass, keydict, policy.lease)
        if refresh:
            ahead = policy.refresh_ahead
            if ahead is None and (policy.serve_stale_for or getattr(self.stores[index], "stale_window", 0.0)):
                ahead = 0.0  # stale values are told apart (and one refresher elected) even when not served
            if ahead is not None:
                args = (klass, keydict, policy.lease, ahead)
        tolerance = policy.serve_stale_for
        while True:
            if first is _UNASKED:
                found = yield from self._guarded(index, "get", "lease_get", *args)
            else:
                found, first = self._take_answer(index, "get", first), _UNASKED
            if found is _FAILED:
                return _FAILED, None, "read"
            status = found.status
            if status == "hit":
                if not found.stale:
                    if waited:
                        stats.lease_waits += 1
                    return found.obj, None, "read"
                if tolerance and found.age <= tolerance:
                    stats.stale_served += 1
                    return found.obj, None, "stale"
                # staler than this reader accepts: wait for its refresher's fill, as for a lost lease
            elif status == "absent":
                return None, None, "read"
            elif status == "won":
                stats.leases_won += 1
                if found.obj is not None and (not found.stale or (tolerance and found.age <= tolerance)):
                    stats.refreshes += 1
                    return found.obj, found.token, "refresh"
                return None, found.token, "read"
            elif found.obj is not None and found.stale and tolerance and found.age <= tolerance:
                stats.stale_served += 1  # lost, but a stale value is there to serve
                return found.obj, None, "stale"
            # lost: another reader is loading it
            if not waited:
                stats.leases_lost += 1
                waited = True
            now = _monotonic()
            if now >= deadline:
                stats.lease_timeouts += 1
                return None, None, "timeout"
            yield Call(SLEEP, "sleep", (min(next(pauses), deadline - now),))

    def _backfill(self, top: int, obj: Any, flushes: int, leased: int | None, token: Any) -> Plan[Any]:
        """Back-fill layers ``top`` .. 0 with ``obj`` (a lease held in ``leased`` is filled); returns the token left."""
        in_process = self._in_process
        for above in range(top, -1, -1):
            if in_process[above]:
                self._fill_in_process(above, obj, flushes)
                continue
            if above == leased and token is not None:
                done = yield from self._guarded(above, "backfill", "lease_fill", obj, token)
                token = None
                if done is False:
                    # a writer changed the key after the lease was taken: obj is older than its
                    # write, and no layer above gets it either
                    log.debug("stockpyle: lease fill of layer %d refused; layers above not back-filled", above)
                    return None
            else:
                done = yield from self._guarded(above, "backfill", self._add[above], obj)
            if done is not _FAILED:
                self._layer_stats[above].backfills += 1
                log.debug("stockpyle: back-filled layer %d with %s", above, type(obj).__qualname__)
        return token

    def _fill_in_process(self, index: int, obj: Any, flushes: int) -> None:
        """Back-fill in-process layer ``index`` with ``obj`` (add-only), read by a read that began at ``flushes``."""
        if not self._fill_allowed(flushes):
            return
        if self.bus is not None:
            self._digest_keys([obj])
        if self._in_process_call(index, "backfill", self._add[index], obj) is not _FAILED:
            self._layer_stats[index].backfills += 1
            log.debug("stockpyle: back-filled layer %d with %s", index, type(obj).__qualname__)

    def _check_created(self, klass: type, keydict: KeyDict, made: Any) -> None:
        if lookup_key(klass, keydict) not in object_keys(made, True):
            raise ConfigurationError(
                f"get_or_create({klass.__qualname__}, {dict(keydict)!r}): the creator returned a "
                f"{type(made).__qualname__} object that this lookup does not find"
            )

    def _fill_allowed(self, flushes: int) -> bool:
        """Whether an in-process layer may be back-filled by a read that began at flush count ``flushes``.

        Invalidations of single keys leave tombstones that refuse the fill
        themselves; a flush (lost messages) leaves none, hence the count.
        """
        if flushes == self._flushes and self._trust():
            return True
        self._totals.fills_refused += 1
        return False

    def _plan_batch_get(self, klass: type[T], requests: list[KeyDict]) -> Plan[list[T | None]]:
        results: list[Any] = [None] * len(requests)
        missing = list(range(len(requests)))
        last = self._last
        found_by_layer: list[list[Any]] = [[] for _ in self.stores]
        flushes = self._flushes
        for index in range(last + 1):
            if not missing:
                break
            if self._in_process[index] and index != last and not self._trust():
                continue  # the bus fell silent: in-process entries may be stale
            asked = [requests[i] for i in missing]
            began = perf_counter()
            try:
                if index == last:
                    if self._breakers[index].pending:  # a last layer that is a cache missed writes
                        yield from self._replay(index)
                    answers = yield from self._ask(index, "batch_get", klass, asked)
                else:
                    answers = yield from self._guarded(index, "batch_get", "batch_get", klass, asked)
                    if answers is _FAILED:
                        continue
            except UnknownKeyError:
                if index == last:
                    raise
                continue
            self._layer_stats[index].latency.add(perf_counter() - began)
            still: list[int] = []
            for position, obj in zip(missing, answers, strict=True):
                if obj is None:
                    still.append(position)
                else:
                    results[position] = obj
                    found_by_layer[index].append(obj)
            stats = self._layer_stats[index]
            stats.hits += len(missing) - len(still)
            stats.misses += len(still)
            missing = still
        # back-fill: each upper layer gets one call with everything found below it
        below: list[Any] = []
        for index in range(last, 0, -1):
            below.extend(found_by_layer[index])
            if not below:
                continue
            if self._in_process[index - 1]:
                if not self._fill_allowed(flushes):
                    continue
                if self.bus is not None:
                    self._digest_keys(below)
            done = yield from self._guarded(index - 1, "backfill", self._batch_add[index - 1], list(below))
            if done is not _FAILED:
                self._layer_stats[index - 1].backfills += len(below)
        return results

    # -- writes -------------------------------------------------------------

    def _plan_write(self, operation: str, argument: Any, objs: list[Any]) -> Plan[None]:
        for obj in objs:
            # validate keys before anything is written anywhere
            object_keys(obj)
        last = self._last
        in_process = self._in_process
        effects: WriteEffects | None = None
        if not self._reports_effects:
            # other threads' copies go first: a per-thread layer may be the last one, written next
            self._before_in_process_writes(objs)
        try:
            if self._reports_effects:
                # the system of record says what the write really did (cascades,
                # merged children, moved keys): the caches follow that instead
                kind = "put" if operation.endswith("put") else "delete"
                if in_process[last]:
                    effects = self.stores[last].write(kind, objs)
                else:
                    effects = yield Call(last, "write", (kind, objs))
            elif in_process[last]:
                getattr(self.stores[last], operation)(argument)
            else:
                yield Call(last, operation, (argument,))
        except BaseException as exc:
            # the system of record may or may not have applied the write
            # (a timeout after commit): make sure no cache keeps the old value
            if self._last_is_cache and isinstance(exc, StoreError):
                # a last layer that is a cache is invalidated when it answers again
                self._layer_stats[last].errors += 1
                self._breakers[last].remember(objs)
            yield from self._plan_invalidate(range(last - 1, -1, -1), objs)
            raise
        if effects is not None:
            yield from self._plan_apply_effects(effects)
            return
        for index in range(last - 1, -1, -1):
            yield from self._plan_layer_write(index, operation, argument, objs)
        yield from self._plan_publish(self._digest_keys(objs) if self.bus is not None else [])

    def _before_in_process_writes(self, objs: list[Any]) -> None:
        if any(self._per_thread):
            self._other_threads(objs)

    def _plan_layer_write(self, index: int, operation: str, argument: Any, objs: list[Any]) -> Plan[None]:
        """Write to cache layer ``index``; on failure leave it (and, for a bug, those above) without old values."""
        try:
            if self._in_process[index]:
                done = self._in_process_call(index, operation, operation, argument)
            else:
                done = yield from self._guarded(index, operation, operation, argument)
        except ObjectError as exc:
            # this cache cannot hold the object (unpicklable, too large): leave
            # no layer from here up holding the old value, then report it
            yield from self._plan_invalidate(range(index, -1, -1), objs)
            raise type(exc)(
                f"the system of record stored the object, but cache layer {index} ({self.stores[index]!r}) "
                f"could not ({exc}); it was invalidated in that layer and the ones above",
                store=exc.store,
                action=exc.action,
            ) from exc
        except BaseException:
            # a bug-class error: leave no layer from here up holding the old value
            yield from self._plan_invalidate(range(index, -1, -1), objs)
            raise
        if done is _FAILED:
            # the layer may still hold the old value: invalidate it now if
            # it answers, or when it rejoins
            if operation in ("put", "batch_put"):
                yield from self._plan_invalidate([index], objs)
            else:
                self._breakers[index].remember(objs)

    def _plan_apply_effects(self, effects: WriteEffects) -> Plan[None]:
        """Bring every cache layer in line with what the system of record reports a write did.

        First every class in ``effects.classes`` is invalidated, then, layer by
        layer from the bottom up, ``effects.removed`` is deleted and
        ``effects.stored`` is put, with the failure handling of any write.
        """
        for klass in effects.classes:
            yield from self._plan_invalidate_class(klass)
        removed, stored = list(effects.removed), list(effects.stored)
        self._before_in_process_writes(removed + stored)
        for index in range(self._last - 1, -1, -1):
            if removed:
                yield from self._plan_layer_write(index, "batch_delete", removed, removed)
            if stored:
                yield from self._plan_layer_write(index, "batch_put", stored, stored)
        yield from self._plan_publish(self._digest_keys(removed + stored) if self.bus is not None else [])

    def _plan_invalidate_class(self, klass: type) -> Plan[None]:
        """Drop every ``klass`` instance from the cache layers (and a last layer that is not the system of record)."""
        for index, layer in enumerate(self.stores):
            if index == self._last and self._reports_effects:
                continue
            if not self._class_invalidation[index]:
                self._layer_stats[index].errors += 1
                log.error("stockpyle: cache layer %d (%r) cannot invalidate every cached %s; they may be stale "
                          "until their lifetime ends", index, layer, klass.__qualname__)  # fmt: skip
            elif index == self._last:
                if self._in_process[index]:
                    layer.invalidate_class(klass)
                else:
                    yield Call(index, "invalidate_class", (klass,))
            elif self._in_process[index]:
                self._in_process_call(index, "invalidate_class", "invalidate_class", klass)
            else:
                yield from self._guarded(index, "invalidate_class", "invalidate_class", klass)
        yield from self._plan_publish([class_digest(klass)] if self.bus is not None else [])

    def _plan_invalidate(self, indexes: Iterable[int], objs: list[Any]) -> Plan[None]:
        """Remove ``objs`` from the cache layers ``indexes``, best effort: a layer that fails remembers them."""
        for index in indexes:
            if index == self._last:
                continue
            breaker = self._breakers[index]
            if breaker.open_until and _monotonic() < breaker.open_until:
                breaker.remember(objs)
                continue
            try:
                yield from self._ask(index, "batch_delete", objs)
            except Exception as exc:  # noqa: BLE001 - best effort while already failing
                breaker.remember(objs)
                self._failed(index, "invalidate", exc)

    # -- statistics ---------------------------------------------------------

    def _setup_hit_path(self, layers: Sequence[Any]) -> None:
        """The state both executors' ``get`` reads first: the top layer, its breaker, its index."""
        self._first_stats = self._layer_stats[0]
        self._first_breaker = self._breakers[0]
        self._first_in_process = self._in_process[0]
        self._single = len(layers) == 1
        # hits the top layer served through its get(), and from its index (a
        # total the top layer counts as its own, see DirectIndex.count_with)
        self._l1_hits = 0
        self._fast_hits_seen = 0
        # Hits served from the index are not counted one by one (that is a
        # tenth of a hit's cost): get() counts its calls anyway, through the
        # sampling countdown and the cycles it completed, and counts every
        # call that is not such a hit in _others; see _fast_hit_count().
        self._cycles = 0
        self._others = 0
        # the top layer's index, probed directly on the hit path when it offers (and the bus trusts) it
        self._fast_index: Mapping[Key, MemoryEntry] | None = None
        if self._first_in_process and callable(getattr(type(layers[0]), "direct_index", None)):
            direct: DirectIndex | None = layers[0].direct_index()
            if direct is not None:
                direct.count_with(self._fast_hit_count)
                self._fast_index = direct.index
        self._countdown = SAMPLE_EVERY

    def stats(self) -> ChainStats:
        """The chain's totals and per-layer counters (brought up to date by each call).

        ``chain.stats()[i]`` (or ``.layers[i]``) is the :class:`LayerStats` of layer ``i``.
        """
        hits, self._l1_hits = self._l1_hits, 0
        fast = self._fast_hit_count()
        hits += fast - self._fast_hits_seen
        self._fast_hits_seen = fast
        self._first_stats.hits += hits
        totals = self._refresh_totals()
        totals.trusted = self._trust()
        if self.bus is not None:
            totals.bus = self.bus.stats()
        return totals

    def _fast_hit_count(self) -> int:
        """Hits served from the top layer's index since the chain was built (never reset)."""
        # calls = SAMPLE_EVERY per completed cycle plus the current one's;
        # one call per cycle (the timed one) and every counted other were not such hits
        calls = SAMPLE_EVERY * self._cycles + SAMPLE_EVERY - self._countdown
        return max(0, calls - self._cycles - self._others)

    def reset_stats(self) -> None:
        """Set the chain's and every layer's counters back to zero."""
        self._l1_hits = 0
        self._fast_hits_seen = self._fast_hit_count()
        self._totals.reset()
        for stats in self._layer_stats:
            stats.reset()

    def _pending_count(self) -> int:
        """Pending invalidations of every layer (remembered, or taken by a replay under way)."""
        return sum(len(breaker.pending) + breaker.replaying for breaker in self._breakers)

    def _report_unrepaired(self) -> None:
        left = self._pending_count()
        if left:
            log.warning(
                "stockpyle: %r released with %d invalidation%s still pending (a layer did not answer): those"
                " entries may be served stale until they expire",
                self,
                left,
                "" if left == 1 else "s",
            )

    def _refresh_totals(self) -> ChainStats:
        for layer, breaker in zip(self._layer_stats, self._breakers, strict=True):
            layer.pending_invalidations = len(breaker.pending) + breaker.replaying
        totals = self._totals
        totals.hits = sum(layer.hits for layer in self._layer_stats)
        totals.misses = self._layer_stats[-1].misses
        totals.errors = sum(layer.errors for layer in self._layer_stats)
        return totals


def check_layers(stores: Any, what: str) -> list[Any]:
    """The layers of a chain, validated through their types.

    :raises ConfigurationError: for an empty list or an object that is not a store.
    """
    if isinstance(stores, (str, bytes)) or not isinstance(stores, Iterable):
        raise ConfigurationError(f"{what} takes a list of stores, fastest first; got {stores!r}")
    layers = list(stores)
    if not layers:
        raise ConfigurationError(f"{what} needs at least one store, e.g. {what}([ProcessMemoryStore()])")
    for layer in layers:
        missing = [op for op in _OPERATIONS if not _layer_type_has(layer, op)]
        if missing:
            raise ConfigurationError(f"{layer!r} cannot be a {what} layer: it lacks {', '.join(missing)}")
    return layers


class ChainedStore(ChainPolicy, BaseStore):
    """Layers of stores used as a write-through cache, fastest first.

    * ``get`` asks the layers top-down; the first hit wins and every layer
      above it is back-filled (and so gets its own lifetime).  Layers below the
      hit are not touched.
    * ``batch_get`` asks each layer once, for only the keys still missing, and
      back-fills the layers above with one call each.
    * ``put``/``delete`` and their batch forms go to the last layer (the
      system of record) first, then up through the caches, so the caches hold
      what the database assigned (generated keys, defaults).
    * Back-fills use a layer's ``add``/``batch_add`` when the layer declares
      ``supports_add`` (see :class:`~stockpyle.BaseStore`): an add-only write
      that never replaces a newer value or resurrects a deleted object
      (deletes leave short tombstones).  A layer that cannot add is
      back-filled with ``put``/``batch_put``; a writer racing the back-fill may
      then see its value replaced by the older one the reader found, until
      that entry expires or is written again.

    A cache layer (every layer but the last) that fails with a
    :class:`~stockpyle.exceptions.StoreError` is treated as a miss for reads;
    for writes the chain tries to invalidate the object in that layer, logs
    the failure, counts it in :meth:`stats`, and carries on.  After
    ``failure_threshold`` consecutive failures the layer's circuit breaker
    opens: for ``cooldown`` seconds the layer is skipped instead of making
    every request wait for a timeout, and the objects written meanwhile are
    remembered; the next call after the cool-down probes the layer, and when
    it answers, those objects are invalidated in it before it rejoins.  An
    :class:`~stockpyle.exceptions.ObjectError` (one object cannot be
    serialized or is too large) never counts against the layer.

    Pending invalidations are not left for the next call that happens to
    reach the layer: a background thread retries them every
    ``retry_interval`` seconds until the layer answers (and then closes its
    breaker).  A last layer that is a cache (``is_cache``, e.g. memcached
    under a session extension) is repaired the same way: the writes it
    failed are remembered, then invalidated when it answers again.

    Errors of the last layer propagate: the caller must know when the system
    of record failed.  When the last layer fails a write, the object is also
    invalidated in the caches, so no cache is left holding data the system of
    record lacks.

    Layers are used only through their public operations, looked up when
    they are called; capabilities are read from the layers' types.

    :param stores: the layers, fastest first; any objects with the six store
        operations (they need not subclass :class:`BaseStore`).
    :param failure_threshold: consecutive failures that open a layer's breaker.
    :param cooldown: seconds an open breaker skips its layer before probing it.
    :param max_pending_invalidations: objects remembered per layer while its
        breaker is open; beyond that, staleness is bounded by the layer's
        lifetimes only (a warning is logged).
    :param retry_interval: seconds between two background attempts to apply
        the invalidations a layer missed (default 0.5).  Within that time of a
        layer answering again, no process reads a value from it whose
        invalidation this chain missed.
    :raises ConfigurationError: for an empty chain, a layer that is not a
        store, or invalid breaker settings.
    """

    supports_expiry = True
    supports_class_invalidation = True
    _auto_stats = False  # the chain keeps ChainStats itself

    def __init__(
        self,
        stores: Sequence[Any] | None = None,
        *,
        failure_threshold: int = 3,
        cooldown: float = 5.0,
        max_pending_invalidations: int = 10_000,
        retry_interval: float = 0.5,
        bus: Any = NO_BUS,
        stampede: Stampede | None = DEFAULT_STAMPEDE,
    ) -> None:
        super().__init__()
        if stampede is not None and not isinstance(stampede, Stampede):
            raise ConfigurationError(f"stampede= takes a stockpyle.Stampede or None; got {stampede!r}")
        #: the chain's stampede protection (``None``: none; see :class:`~stockpyle.Stampede`)
        self.stampede = stampede
        self._flights = SingleFlight()
        layers = check_layers(stores if stores is not None else [], "ChainedStore")
        self._setup_policy(layers, failure_threshold, cooldown, max_pending_invalidations, retry_interval, bus=bus)
        self._check_stampede(stampede, configure=True)
        self._setup_hit_path(layers)
        # the common chain: [in-process, the lease layer, ...] (see _read_shared)
        self._shared_second = self._first_in_process and self._lease_layer == 1

    # -- the executor -------------------------------------------------------

    def _run(self, plan: Plan[T]) -> T:
        """Run a plan synchronously: each :class:`Call` it yields is made here, its outcome sent back."""
        stores = self.stores
        try:
            call = plan.send(None)
            while True:
                try:
                    index = call.index
                    if index >= 0:
                        result = getattr(stores[index], call.method)(*call.args)
                    elif index == BUS:
                        result = getattr(self.bus, call.method)(*call.args)
                    elif index == SLEEP:
                        time.sleep(call.args[0])
                        result = None
                    else:  # CREATE
                        result = call.args[0]()
                except BaseException as exc:  # noqa: BLE001 - the plan decides what a failure means
                    call = plan.throw(exc)
                else:
                    call = plan.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    # -- statistics ---------------------------------------------------------

    # -- reads --------------------------------------------------------------

    def get(self, klass: type[T], keydict: KeyDict, stampede: Any = _CHAIN_POLICY) -> T | None:
        """The object, from the fastest layer that has it (see the class docs).

        :param stampede: the :class:`~stockpyle.Stampede` policy for this call
            (``None``: no protection); by default the chain's.  Pass it by
            keyword: its place in the arguments is not part of the API.
        """
        # (stampede is not keyword-only because CPython (3.11, 3.13 measured) does not
        # specialize calls to functions with keyword-only parameters: a
        # keyword-only one costs ~200 instructions on every hit, 4% of it)
        # The L1 hit path is the library's second-hottest code.  When L1 offers
        # its index (an unbounded in-process store), it is probed here directly
        # for the common lookup (one str- or int-valued attribute): that saves
        # a Python frame, which is a quarter of the cost of the whole hit.
        # Anything unusual falls through to L1's own get().
        self._countdown -= 1
        if self._countdown <= 0:  # one call in SAMPLE_EVERY is timed, layer by layer
            self._countdown = SAMPLE_EVERY
            self._cycles += 1
            began = perf_counter()
            found = self._get(klass, keydict, stampede, timed=True)
            self._totals.timer("get").add(perf_counter() - began)  # what the caller waited, end to end
            return found
        index = self._fast_index
        # (anything but a dict, e.g. get(Foo, 1), goes to L1's get(), which says what a lookup is)
        if index is not None and type(keydict) is dict and len(keydict) == 1:
            (name,) = keydict
            value = keydict[name]
            if type(value) is str or type(value) is int:
                rec = index.get((klass, name, value))
                if rec is not None:
                    bus = self.bus
                    if bus is None:
                        if rec.expires is None or rec.expires > _monotonic():
                            return rec.obj  # type: ignore[return-value]  # counted by the countdown
                    else:
                        # the bus's deadline is compared on every hit (one clock read),
                        # so the staleness bound holds whatever the scheduler does
                        now = _monotonic()
                        if now < bus.trusted_until and (rec.expires is None or rec.expires > now):
                            return rec.obj  # type: ignore[return-value]
                        if now >= bus.trusted_until:
                            self._others += 1
                            return self._miss(0, klass, keydict, stampede)
                if not self._single:
                    # L1 does not have it (its get() would probe the same index
                    # again): refuse a value no layer could take, then ask below
                    self._others += 1
                    canonical_value(value)
                    self._first_stats.misses += 1
                    return self._miss(1, klass, keydict, stampede)
        self._others += 1
        return self._get(klass, keydict, stampede)

    def _get(self, klass: type[T], keydict: KeyDict, stampede: Any, timed: bool = False) -> T | None:
        """:meth:`get` without the index probe: an in-process top layer is asked outside the flight.

        An object the top layer has is returned without joining a flight
        (single flight is for reads of the layers below); ``timed`` samples
        every layer's latency.
        """
        if (
            not self._first_in_process
            or not self._trust()
            or self._first_breaker.open_until
            or self._first_breaker.failures
        ):
            return self._miss(0, klass, keydict, stampede, timed)
        began = perf_counter() if timed else 0.0
        try:
            obj = self.stores[0].get(klass, keydict)
        except UnknownKeyError:
            if self._single:
                raise
            return self._miss(1, klass, keydict, stampede, timed)
        except StoreError as exc:
            self._failed(0, "get", exc)
            return self._miss(1, klass, keydict, stampede, timed)
        if timed:
            self._first_stats.latency.add(perf_counter() - began)
        if obj is not None:
            self._l1_hits += 1
            return obj  # type: ignore[no-any-return]
        self._first_stats.misses += 1
        if self._single:
            return None
        return self._miss(1, klass, keydict, stampede, timed)

    def _miss(self, start: int, klass: type[T], keydict: KeyDict, stampede: Any, timed: bool = False) -> T | None:
        """Read the layers from ``start``, once for all threads of this process missing the same key."""
        policy: Stampede | None = self.stampede if stampede is _CHAIN_POLICY else stampede
        if policy is None:
            return self._run(self._plan_get(start, klass, keydict, timed))
        if policy is not self.stampede:
            self._check_policy(policy)
        try:
            key: Any = lookup_key(klass, keydict)  # hashable: declared keys hold canonical values
        except UnknownKeyError:
            # a lookup only the system of record can answer (any mapped columns)
            key = (klass, tuple(sorted(keydict.items())))
            try:
                hash(key)
            except TypeError:
                return self._run(self._plan_get(start, klass, keydict, timed, policy=policy))
        flights = self._flights
        publish: Callable[[Any], None] | None = None
        if policy.refreshes:  # only a refreshing reader hands its followers a value early

            def publish(found: Any) -> None:
                flights.publish(key, found)

        load: Callable[[], T | None]
        if start == 1 and self._shared_second and not timed and policy.leases and publish is None:
            # (partial objects, not closures: calling one adds no Python frame to every L1 miss)
            load = partial(self._read_shared, klass, keydict, policy)
        else:

            def load() -> T | None:
                return self._run(self._plan_get(start, klass, keydict, timed, policy=policy, publish=publish))

        waited_too_long = partial(self._after_timeout, policy, start, klass, keydict)
        return self._flights.run(key, load, self._follower_wait(policy), waited_too_long)

    def _read_shared(self, klass: type[T], keydict: KeyDict, policy: Stampede) -> T | None:
        """:meth:`_plan_get` from layer 1, the lease layer under an in-process top, for the common read.

        The read of every L1 miss.  Its first ``lease_get`` is made here,
        without the plan, and a current hit is counted and back-filled here
        (into layer 0, add-only, as :meth:`_backfill` does); every other answer
        (a miss, a lease won or lost, a failure) goes on in the plan, which
        takes the answer instead of reading again.  Any state the plan would
        handle differently -- the layer's breaker open or failing, writes to
        replay, stale values told apart -- takes the plan from the start.
        """
        store = self.stores[1]
        breaker = self._breakers[1]
        if (
            breaker.open_until
            or breaker.pending
            or breaker.failures
            or policy.serve_stale_for
            or getattr(store, "stale_window", 0.0)
        ):
            return self._run(self._plan_get(1, klass, keydict, False, policy=policy))
        flushes = self._flushes
        began = perf_counter()
        answer: Any
        try:
            answer = store.lease_get(klass, keydict, policy.lease)
        except BaseException as exc:  # noqa: BLE001 - the plan decides what a failure means
            answer = exc
        else:
            if answer.status == "hit" and not answer.stale and answer.obj is not None:
                stats = self._layer_stats[1]
                stats.latency.add(perf_counter() - began)
                stats.hits += 1
                obj = answer.obj
                self._fill_in_process(0, obj, flushes)
                return obj  # type: ignore[no-any-return]
        return self._run(self._plan_get(1, klass, keydict, False, policy=policy, answered=(flushes, began, answer)))

    def _after_timeout(self, policy: Stampede, start: int, klass: type[T], keydict: KeyDict) -> T | None:
        if policy.on_timeout == "miss":
            return None
        if policy.on_timeout == "raise":
            raise LeaseTimeoutError(
                f"waited {policy.wait}s for another reader's load of {klass.__qualname__} {dict(keydict)!r}"
            )
        # "load": read for ourselves, without filling (the load we waited for will)
        return self._run(self._plan_get(start, klass, keydict, False, fill=False))

    def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        return self._timed("batch_get", self._plan_batch_get(klass, list(keydicts)))

    def get_or_create(
        self, klass: type[T], keydict: KeyDict, creator: Callable[[], T | None], *, stampede: Any = _CHAIN_POLICY
    ) -> T | None:
        """The object from the layers, or ``creator()``'s, stored for the next reader.

        For objects whose system of record is not a stockpyle store (a remote
        API, a computation): ``creator`` is called only when no layer has the
        object, once for all threads of the process missing it at the same
        time (and, where a shared layer supports leases, once across
        processes).  A ``None`` result is returned and not stored.  The object
        is stored with add-only writes in every layer when every layer is a
        cache, and with :meth:`put` otherwise (the system of record creates it).

        :param creator: builds the object; it must have the keys ``keydict`` names.
        :param stampede: the :class:`~stockpyle.Stampede` policy for this call.
        :raises ConfigurationError: when ``creator`` returns an object that ``keydict`` does not find.
        """
        policy: Stampede | None = self.stampede if stampede is _CHAIN_POLICY else stampede
        if not self._last_is_cache:
            return self._create_through(klass, keydict, creator, stampede, policy)

        def load() -> T | None:
            # every layer is a cache: the creator is the system of record of this read
            return self._run(self._plan_get(0, klass, keydict, False, policy=policy, creator=creator))

        if policy is None:
            return load()
        return self._flights.run(("create", lookup_key(klass, keydict)), load, self._follower_wait(policy), load)

    def _create_through(
        self, klass: type[T], keydict: KeyDict, creator: Callable[[], T | None], stampede: Any, policy: Stampede | None
    ) -> T | None:
        """get_or_create over a system of record: a missing object is created with :meth:`put`."""
        found = self.get(klass, keydict, stampede=stampede)
        if found is not None:
            return found

        def create() -> T | None:
            again = self.get(klass, keydict, stampede=None)  # another caller may have created it meanwhile
            if again is not None:
                return again
            made = creator()
            if made is None:
                return None
            self._check_created(klass, keydict, made)
            self.put(made)
            return made

        if policy is None:
            return create()
        return self._flights.run(("create", lookup_key(klass, keydict)), create, self._follower_wait(policy), create)

    # -- writes -------------------------------------------------------------

    def _timed(self, operation: str, plan: Plan[T]) -> T:
        """Run ``plan`` and record its duration as the end-to-end latency of ``operation``."""
        began = perf_counter()
        try:
            return self._run(plan)
        finally:
            self._totals.timer(operation).add(perf_counter() - began)

    def put(self, obj: object) -> None:
        self._timed("put", self._plan_write("put", obj, [obj]))
        self._totals.puts += 1

    def batch_put(self, objs: Iterable[object]) -> None:
        items = list(objs)
        if items:
            self._timed("batch_put", self._plan_write("batch_put", items, items))
            self._totals.puts += len(items)

    def delete(self, obj: object) -> None:
        self._timed("delete", self._plan_write("delete", obj, [obj]))
        self._totals.deletes += 1

    def batch_delete(self, objs: Iterable[object]) -> None:
        items = list(objs)
        if items:
            self._timed("batch_delete", self._plan_write("batch_delete", items, items))
            self._totals.deletes += len(items)

    def _schedule_repair(self) -> None:
        repairs.schedule(self)

    def _repair_before_release(self) -> None:
        """release()'s last attempt at the pending invalidations; the repair thread retries this chain no more."""
        if self._pending_count():
            try:
                self.repair()
            except Exception as exc:  # noqa: BLE001 - the release goes on; what is left is reported
                log.debug("stockpyle: the last repair of %r failed: %s", self, exc)
            self._report_unrepaired()
        repairs.cancel(self)

    def repair(self) -> bool:
        """Invalidate, in every layer that answers, the writes it missed; True when some are still pending.

        The chain's background repair calls this every ``retry_interval``
        seconds while invalidations are pending; calling it yourself is harmless.
        """
        return self._run(self._plan_repair())

    def invalidate_class(self, klass: type) -> None:
        """Drop every cached ``klass`` instance (subclasses included) from every cache layer.

        For writes whose rows cannot be known.  A system of record (a last
        layer that reports its write effects) is left alone.  A cache layer
        that cannot invalidate a class may serve stale objects of it until
        their lifetime ends: that is logged and counted in its errors.
        """
        self._run(self._plan_invalidate_class(klass))

    # -- the rest -----------------------------------------------------------

    def configure(self, classes: Iterable[type], lifetime: Any) -> None:
        """Configure the lifetime in every layer that supports it."""
        classes = list(classes) if not isinstance(classes, type) else [classes]
        for layer in self.stores:
            if getattr(type(layer), "supports_expiry", True) and _layer_type_has(layer, "configure"):
                layer.configure(classes=classes, lifetime=lifetime)

    def describe(self) -> str:
        return " -> ".join(type(layer).__name__ for layer in self.stores)

    def release(self) -> None:
        """Release every layer (all are attempted; the first error is re-raised).

        A chain with a bus stops listening to it: it keeps working, reading
        its shared layers only (its in-process layers are no longer trusted).
        Pending invalidations (writes a layer missed) are tried once more,
        and the background repair of this chain ends: what is still pending
        then is logged as a warning (those entries may be served stale until
        they expire).  A chain used again after release() schedules its
        repair again when a write fails.
        """
        if self.bus is not None:
            self._trusted = False
            self._fast_index = None
            self.bus.unsubscribe(self)
        self._repair_before_release()
        first_error: BaseException | None = None
        for layer in self.stores:
            try:
                layer.release()
            except Exception as exc:  # noqa: BLE001 - release the others first
                first_error = first_error or exc
        if first_error is not None:
            raise first_error

    def __repr__(self) -> str:
        return f"<ChainedStore {list(self.stores)!r}>"


#: The 0.0.2 name of :class:`ChainedStore`.
MultiStore = ChainedStore
