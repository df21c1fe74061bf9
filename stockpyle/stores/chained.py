"""Write-through layering of stores: :class:`ChainedStore` (alias ``MultiStore``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from time import perf_counter
from typing import Any, TypeVar

from ..effects import WriteEffects
from ..exceptions import ConfigurationError, SerializationError, StoreError, UnknownKeyError, ValueTooLargeError
from ..keys import object_keys
from ..stats import SAMPLE_EVERY, Latency, StoreStats
from .base import BaseStore, KeyDict

__all__ = ["ChainStats", "ChainedStore", "LayerStats", "MultiStore"]

T = TypeVar("T")
log = logging.getLogger("stockpyle.chained")
_monotonic = time.monotonic

_OPERATIONS = ("put", "get", "delete", "batch_put", "batch_get", "batch_delete")

#: Errors of a cache layer that the chain absorbs: the backend failed or an
#: entry could not be decoded.  Anything else (bad keys, bad objects) is a bug
#: in the caller and propagates.
_CACHE_FAILURES = (StoreError, SerializationError)
#: Of those, the ones that concern one object rather than the layer's health
#: (it cannot be pickled, it is too large): they never count toward the
#: breaker, are misses when reading, and are reported when writing.
_OBJECT_FAULTS = (SerializationError, ValueTooLargeError)
#: Operations of the chain's own read path; everything else is a caller's write.
_READS = frozenset({"get", "batch_get", "backfill"})

#: Sentinel returned by :meth:`ChainedStore._call` when a layer was skipped or failed.
_FAILED: Any = object()


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

    __slots__ = ("threshold", "cooldown", "failures", "open_until", "pending", "overflowed", "lock", "max_pending")

    def __init__(self, threshold: int, cooldown: float, max_pending: int) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = 0.0  # 0.0: closed
        self.pending: list[Any] = []
        self.overflowed = False
        self.max_pending = max_pending
        self.lock = threading.Lock()

    def remember(self, objs: Iterable[Any]) -> None:
        with self.lock:
            for obj in objs:
                if len(self.pending) >= self.max_pending:
                    self.overflowed = True
                    return
                self.pending.append(obj)


class ChainedStore(BaseStore):
    """Layers of stores used as a write-through cache, fastest first.

    * ``get`` asks the layers top-down; the first hit wins and every layer
      above it is back-filled (and so gets its own lifetime).  Layers below the
      hit are not touched.
    * ``batch_get`` asks each layer once, for only the keys still missing, and
      back-fills the layers above with one call each.
    * ``put``/``delete`` and their batch forms go to the last layer (the
      system of record) first, then up through the caches, so the caches hold
      what the database assigned (generated keys, defaults).
    * Back-fills use a layer's ``batch_add`` when it has one: an add-only
      write that never replaces a newer value or resurrects a deleted object
      (deletes leave short tombstones); otherwise ``batch_put``.

    A cache layer (every layer but the last) that fails with a
    :class:`~stockpyle.exceptions.StoreError` is treated as a miss for reads;
    for writes the chain tries to invalidate the object in that layer, logs
    the failure, counts it in :meth:`stats`, and carries on.  After
    ``failure_threshold`` consecutive failures the layer's circuit breaker
    opens: for ``cooldown`` seconds the layer is skipped instead of making
    every request wait for a timeout, and the objects written meanwhile are
    remembered; the next call after the cool-down probes the layer, and when
    it answers, those objects are invalidated in it before it rejoins.

    Errors of the last layer propagate: the caller must know when the system
    of record failed.  When the last layer fails a write, the object is also
    invalidated in the caches, so no cache is left holding data the system of
    record lacks.

    :param stores: the layers, fastest first; any objects with the six store
        operations (they need not subclass :class:`BaseStore`).
    :param failure_threshold: consecutive failures that open a layer's breaker.
    :param cooldown: seconds an open breaker skips its layer before probing it.
    :param max_pending_invalidations: objects remembered per layer while its
        breaker is open; beyond that, staleness is bounded by the layer's
        lifetimes only (a warning is logged).
    :raises ConfigurationError: for an empty chain, a layer that is not a
        store, or invalid breaker settings.
    """

    supports_expiry = True
    _auto_stats = False  # the chain keeps ChainStats itself

    def __init__(
        self,
        stores: Sequence[Any],
        *,
        failure_threshold: int = 3,
        cooldown: float = 5.0,
        max_pending_invalidations: int = 10_000,
    ) -> None:
        super().__init__()
        if isinstance(stores, (str, bytes)) or not isinstance(stores, Iterable):
            raise ConfigurationError(f"ChainedStore takes a list of stores, fastest first; got {stores!r}")
        layers = list(stores)
        if not layers:
            raise ConfigurationError("ChainedStore needs at least one store, e.g. ChainedStore([ProcessMemoryStore()])")
        for layer in layers:
            missing = [op for op in _OPERATIONS if not callable(getattr(layer, op, None))]
            if missing:
                raise ConfigurationError(f"{layer!r} cannot be a ChainedStore layer: it lacks {', '.join(missing)}")
        if isinstance(failure_threshold, bool) or not isinstance(failure_threshold, int) or failure_threshold < 1:
            raise ConfigurationError(f"failure_threshold must be a positive int; got {failure_threshold!r}")
        if isinstance(cooldown, bool) or not isinstance(cooldown, (int, float)) or not cooldown >= 0:
            raise ConfigurationError(f"cooldown must be a number of seconds >= 0; got {cooldown!r}")
        if isinstance(max_pending_invalidations, bool) or not isinstance(max_pending_invalidations, int):
            raise ConfigurationError(f"max_pending_invalidations must be an int; got {max_pending_invalidations!r}")
        self.stores: tuple[Any, ...] = tuple(layers)
        self._layer_stats = [LayerStats(layer) for layer in layers]
        self._breakers = [_Breaker(failure_threshold, float(cooldown), max_pending_invalidations) for _ in layers]
        self._last = len(layers) - 1
        self._first_get = layers[0].get
        self._first_stats = self._layer_stats[0]
        self._first_breaker = self._breakers[0]
        self._l1_hits = 0
        self._l1_index = getattr(layers[0], "_unbounded_index", None)
        # how each layer is back-filled: add-only when it can, else a plain put
        self._adders = [getattr(layer, "add", None) or layer.put for layer in layers]
        self._batch_adders = [getattr(layer, "batch_add", None) or layer.batch_put for layer in layers]
        self._countdown = SAMPLE_EVERY
        self._totals = ChainStats(layers=self._layer_stats)
        self._single = len(layers) == 1

    # -- statistics ---------------------------------------------------------

    def stats(self) -> ChainStats:
        """The chain's totals and per-layer counters (brought up to date by each call).

        ``chain.stats()[i]`` (or ``.layers[i]``) is the :class:`LayerStats` of layer ``i``.
        """
        hits, self._l1_hits = self._l1_hits, 0
        self._first_stats.hits += hits
        for layer, breaker in zip(self._layer_stats, self._breakers, strict=True):
            layer.pending_invalidations = len(breaker.pending)
        totals = self._totals
        totals.hits = sum(layer.hits for layer in self._layer_stats)
        totals.misses = self._layer_stats[-1].misses
        totals.errors = sum(layer.errors for layer in self._layer_stats)
        return totals

    def reset_stats(self) -> None:
        """Set the chain's and every layer's counters back to zero."""
        self._l1_hits = 0
        self._totals.reset()
        for stats in self._layer_stats:
            stats.reset()

    # -- guarded calls to cache layers --------------------------------------

    def _call(self, index: int, action: str, method: Callable[..., Any], *args: Any) -> Any:
        """Call ``method`` of cache layer ``index`` through its breaker.

        :returns: the method's result, or :data:`_FAILED` when the layer was
            skipped or failed (the failure is counted and logged).
        """
        breaker = self._breakers[index]
        if breaker.open_until:
            now = _monotonic()
            if now < breaker.open_until:
                self._layer_stats[index].skipped += 1
                return _FAILED
            # half-open: this call probes; concurrent callers keep skipping
            breaker.open_until = now + breaker.cooldown
        # writes this layer missed (while unreachable, or in a single failed
        # call) are invalidated before it serves anything again
        if breaker.pending and not self._replay(index):
            return _FAILED
        try:
            result = method(*args)
        except _OBJECT_FAULTS as exc:
            self._layer_stats[index].errors += 1
            if action not in _READS:
                raise
            log.warning("stockpyle: cache layer %d (%r) could not %s an object: %s",
                        index, self.stores[index], action, exc)  # fmt: skip
            return _FAILED
        except _CACHE_FAILURES as exc:
            self._failed(index, action, exc)
            return _FAILED
        if breaker.failures:
            self._recovered(index)
        return result

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
        if breaker.open_until:
            log.warning("stockpyle: cache layer %d (%r) answers again; it rejoins the chain", index, self.stores[index])
        breaker.failures = 0
        breaker.open_until = 0.0

    def _replay(self, index: int) -> bool:
        """Invalidate in layer ``index`` what was written while it was unreachable."""
        breaker = self._breakers[index]
        with breaker.lock:
            pending, breaker.pending = breaker.pending, []
            overflowed, breaker.overflowed = breaker.overflowed, False
        if overflowed:
            log.warning(
                "stockpyle: cache layer %d (%r) missed more than %d writes while unreachable; entries it still "
                "holds for the others stay stale until their lifetime ends",
                index, self.stores[index], breaker.max_pending,
            )  # fmt: skip
        if not pending:
            return True
        try:
            self.stores[index].batch_delete(pending)
        except _CACHE_FAILURES as exc:
            breaker.remember(pending)
            self._failed(index, "invalidate missed writes", exc)
            return False
        log.info("stockpyle: invalidated %d missed writes in cache layer %d", len(pending), index)
        return True

    # -- reads --------------------------------------------------------------

    def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        # The L1 hit path is the library's second-hottest code.  When L1 is an
        # unbounded in-process store, its index is probed here directly for
        # the common lookup (one str- or int-valued attribute): that saves a Python
        # frame, which is a quarter of the cost of the whole hit.  Anything
        # unusual falls through to L1's own get().
        self._countdown -= 1
        if self._countdown <= 0:  # one call in SAMPLE_EVERY is timed, layer by layer
            self._countdown = SAMPLE_EVERY
            return self._get_from(0, klass, keydict, timed=True)
        index = self._l1_index
        if index is not None and len(keydict) == 1:
            (name,) = keydict
            value = keydict[name]
            if type(value) is str or type(value) is int:
                rec = index.get((klass, name, value))
                if rec is not None and (rec.expires is None or rec.expires > _monotonic()):
                    self._l1_hits += 1
                    return rec.obj  # type: ignore[no-any-return]
                if not self._single:
                    # L1 does not have it (its get() would probe the same index
                    # again): ask the layers below, which also validate the lookup
                    self._first_stats.misses += 1
                    return self._get_from(1, klass, keydict)
        if self._single:
            obj = self._first_get(klass, keydict)
        elif self._first_breaker.open_until or self._first_breaker.failures:
            return self._get_from(0, klass, keydict)
        else:
            try:
                obj = self._first_get(klass, keydict)
            except UnknownKeyError:
                return self._get_from(1, klass, keydict)
            except _CACHE_FAILURES as exc:
                self._failed(0, "get", exc)
                return self._get_from(1, klass, keydict)
        if obj is not None:
            self._l1_hits += 1
            return obj  # type: ignore[no-any-return]
        self._first_stats.misses += 1
        if self._single:
            return None
        return self._get_from(1, klass, keydict)

    def _get_from(self, start: int, klass: type[T], keydict: KeyDict, timed: bool = False) -> T | None:
        stores = self.stores
        last = self._last
        for index in range(start, last + 1):
            stats = self._layer_stats[index]
            # in-process layers are timed when sampled, the others (I/O) always
            clock = timed or index > 0
            began = perf_counter() if clock else 0.0
            try:
                if index == last:
                    obj = stores[index].get(klass, keydict)
                else:
                    obj = self._call(index, "get", stores[index].get, klass, keydict)
                    if obj is _FAILED:
                        continue
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
            if index:
                self._backfill(index, obj)
            return obj  # type: ignore[no-any-return]
        return None

    def _backfill(self, found_at: int, obj: Any) -> None:
        """Add an object found at layer ``found_at`` to every layer above it."""
        for index in range(found_at - 1, -1, -1):
            if self._call(index, "backfill", self._adders[index], obj) is not _FAILED:
                self._layer_stats[index].backfills += 1

    def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        requests = list(keydicts)
        results: list[Any] = [None] * len(requests)
        missing = list(range(len(requests)))
        stores = self.stores
        last = self._last
        found_by_layer: list[list[Any]] = [[] for _ in stores]
        for index, layer in enumerate(stores):
            if not missing:
                break
            asked = [requests[i] for i in missing]
            began = perf_counter()
            try:
                if index == last:
                    answers = layer.batch_get(klass, asked)
                else:
                    answers = self._call(index, "batch_get", layer.batch_get, klass, asked)
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
            if below and self._call(index - 1, "backfill", self._batch_adders[index - 1], list(below)) is not _FAILED:
                self._layer_stats[index - 1].backfills += len(below)
        return results

    # -- writes -------------------------------------------------------------

    def _write(self, operation: str, argument: Any, objs: list[Any]) -> None:
        for obj in objs:
            # validate keys before anything is written anywhere
            object_keys(obj)
        stores = self.stores
        last = self._last
        effects: WriteEffects | None = None
        try:
            if getattr(type(stores[last]), "reports_effects", False):
                effects = stores[last].write("put" if operation.endswith("put") else "delete", objs)
            else:
                getattr(stores[last], operation)(argument)
        except BaseException:
            # the system of record may or may not have applied the write
            # (a timeout after commit): make sure no cache keeps the old value
            self._invalidate(range(last - 1, -1, -1), objs)
            raise
        if effects is not None:
            self._apply_effects(effects)
            return
        for index in range(last - 1, -1, -1):
            try:
                done = self._call(index, operation, getattr(stores[index], operation), argument)
            except _OBJECT_FAULTS as exc:
                # this cache cannot hold the object (unpicklable, too large): leave
                # no layer from here up holding the old value, then report it
                self._invalidate(range(index, -1, -1), objs)
                raise type(exc)(
                    f"the system of record stored the object, but cache layer {index} ({stores[index]!r}) "
                    f"could not ({exc}); it was invalidated in that layer and the ones above"
                ) from exc
            except BaseException:
                # a bug-class error: leave no layer from here up holding the old value
                self._invalidate(range(index, -1, -1), objs)
                raise
            if done is _FAILED:
                # the layer may still hold the old value: invalidate it now if
                # it answers, or when it rejoins
                if operation in ("put", "batch_put"):
                    self._invalidate([index], objs)
                else:
                    self._breakers[index].remember(objs)

    def _apply_effects(self, effects: WriteEffects) -> None:
        """Bring every cache layer in line with what the system of record reports a write did.

        Used instead of repeating the caller's operation when the last layer
        declares ``reports_effects`` (see :class:`~stockpyle.effects.WriteEffects`):
        first every class in ``effects.classes`` is invalidated, then, layer
        by layer from the bottom up, ``effects.removed`` is deleted and
        ``effects.stored`` is put.  Failures are handled as for any write: a
        layer that misses a delete gets it when it answers again, a layer that
        fails a put has those objects invalidated, and an object a layer
        cannot hold is invalidated there and above and reported.
        """
        for klass in effects.classes:
            self.invalidate_class(klass)
        removed, stored = list(effects.removed), list(effects.stored)
        for index in range(self._last - 1, -1, -1):
            layer = self.stores[index]
            if removed and self._call(index, "batch_delete", layer.batch_delete, removed) is _FAILED:
                self._breakers[index].remember(removed)
            if not stored:
                continue
            try:
                done = self._call(index, "batch_put", layer.batch_put, stored)
            except _OBJECT_FAULTS as exc:
                self._invalidate(range(index, -1, -1), stored)
                raise type(exc)(
                    f"the system of record stored the object, but cache layer {index} ({layer!r}) "
                    f"could not ({exc}); it was invalidated in that layer and the ones above"
                ) from exc
            except BaseException:
                self._invalidate(range(index, -1, -1), stored)
                raise
            if done is _FAILED:
                self._invalidate([index], stored)

    def invalidate_class(self, klass: type) -> None:
        """Drop every cached ``klass`` instance (subclasses included) from every cache layer.

        For writes whose rows cannot be known.  The system of record (a last
        layer that reports effects) is left alone.  A cache layer without
        ``invalidate_class`` may keep serving stale objects of the class
        until their lifetime ends: that is logged and counted in its errors.
        """
        for index, layer in enumerate(self.stores):
            if index == self._last and getattr(type(layer), "reports_effects", False):
                continue
            invalidate = getattr(layer, "invalidate_class", None)
            if invalidate is None:
                self._layer_stats[index].errors += 1
                log.error("stockpyle: cache layer %d (%r) cannot invalidate every cached %s; they may be stale "
                          "until their lifetime ends", index, layer, klass.__qualname__)  # fmt: skip
            elif index == self._last:
                invalidate(klass)
            else:
                self._call(index, "invalidate_class", invalidate, klass)

    def _invalidate(self, indexes: Iterable[int], objs: list[Any]) -> None:
        for index in indexes:
            if index == self._last:
                continue
            breaker = self._breakers[index]
            if breaker.open_until and _monotonic() < breaker.open_until:
                breaker.remember(objs)
                continue
            try:
                self.stores[index].batch_delete(objs)
            except Exception as exc:  # noqa: BLE001 - best effort while already failing
                breaker.remember(objs)
                self._failed(index, "invalidate", exc)

    def put(self, obj: object) -> None:
        self._write("put", obj, [obj])
        self._totals.puts += 1

    def batch_put(self, objs: Iterable[object]) -> None:
        items = list(objs)
        if items:
            self._write("batch_put", items, items)
            self._totals.puts += len(items)

    def delete(self, obj: object) -> None:
        self._write("delete", obj, [obj])
        self._totals.deletes += 1

    def batch_delete(self, objs: Iterable[object]) -> None:
        items = list(objs)
        if items:
            self._write("batch_delete", items, items)
            self._totals.deletes += len(items)

    def configure(self, classes: Iterable[type], lifetime: Any) -> None:
        """Configure the lifetime in every layer that supports it."""
        classes = list(classes) if not isinstance(classes, type) else [classes]
        for layer in self.stores:
            configure = getattr(layer, "configure", None)
            if callable(configure) and getattr(layer, "supports_expiry", True):
                configure(classes=classes, lifetime=lifetime)

    def release(self) -> None:
        """Release every layer (all are attempted; the first error is re-raised)."""
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
