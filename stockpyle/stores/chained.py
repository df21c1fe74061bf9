"""Write-through layering of stores: :class:`ChainedStore` (alias ``MultiStore``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from ..exceptions import ConfigurationError, SerializationError, StoreError, UnknownKeyError
from ..keys import object_keys
from .base import BaseStore, KeyDict

__all__ = ["ChainedStore", "LayerStats", "MultiStore"]

T = TypeVar("T")
log = logging.getLogger("stockpyle.chained")
_monotonic = time.monotonic

_OPERATIONS = ("put", "get", "delete", "batch_put", "batch_get", "batch_delete")

#: Errors of a cache layer that the chain absorbs: the backend failed or an
#: entry could not be decoded.  Anything else (bad keys, bad objects) is a bug
#: in the caller and propagates.
_CACHE_FAILURES = (StoreError, SerializationError)


@dataclass
class LayerStats:
    """Counters of one layer of a :class:`ChainedStore`.

    :ivar hits: lookups this layer answered.
    :ivar misses: lookups it was asked and could not answer.
    :ivar errors: operations on it that failed and were absorbed (cache
        layers only; the last layer's errors propagate).
    :ivar backfills: objects written into it because a lower layer had them.
    """

    store: Any
    hits: int = 0
    misses: int = 0
    errors: int = 0
    backfills: int = 0

    @property
    def hit_ratio(self) -> float:
        """``hits / (hits + misses)``, or 0.0 before any lookup."""
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The counters as a plain dict (plus ``store`` as its repr and ``hit_ratio``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "store"}
        out["store"] = repr(self.store)
        out["hit_ratio"] = self.hit_ratio
        return out

    def reset(self) -> None:
        """Set the counters back to zero."""
        self.hits = self.misses = self.errors = self.backfills = 0


class ChainedStore(BaseStore):
    """Layers of stores used as a write-through cache, fastest first.

    * ``get`` asks the layers top-down; the first hit wins and every layer
      above it is back-filled with its own ``put`` (and so its own lifetime).
      Layers below the hit are not touched.
    * ``batch_get`` asks each layer once, for only the keys still missing, and
      back-fills the layers above with one ``batch_put`` each.
    * ``put``/``delete`` and their batch forms go to the last layer (the
      system of record) first, then up through the caches, so the caches hold
      what the database assigned (generated keys, defaults).

    A cache layer (every layer but the last) that fails with a
    :class:`~stockpyle.exceptions.StoreError` is treated as a miss for reads;
    for writes the chain tries to invalidate the object in that layer, logs the
    failure, counts it in :meth:`stats`, and carries on.  Errors of the last
    layer propagate: the caller must know when the system of record failed.
    When the last layer fails a write, the object is also invalidated in the
    caches, so no cache is left holding data the system of record lacks.

    :param stores: the layers, fastest first; any objects with the six store
        operations (they need not subclass :class:`BaseStore`).
    :raises ConfigurationError: for an empty chain or a layer that is not a store.
    """

    supports_expiry = True

    def __init__(self, stores: Sequence[Any]) -> None:
        super().__init__()
        if isinstance(stores, (str, bytes)) or not isinstance(stores, Iterable):
            raise ConfigurationError(f"ChainedStore takes a list of stores, fastest first; got {stores!r}")
        layers = list(stores)
        if not layers:
            raise ConfigurationError("ChainedStore needs at least one store, e.g. ChainedStore([ProcessMemoryStore()])")
        for layer in layers:
            missing = [op for op in _OPERATIONS if not callable(getattr(layer, op, None))]
            if missing:
                raise ConfigurationError(
                    f"{layer!r} cannot be a ChainedStore layer: it lacks {', '.join(missing)}"
                )
        self.stores: tuple[Any, ...] = tuple(layers)
        self._stats = [LayerStats(layer) for layer in layers]
        self._first_get = layers[0].get
        self._first_stats = self._stats[0]
        self._l1_hits = 0
        self._l1_index = getattr(layers[0], "_unbounded_index", None)
        self._single = len(layers) == 1

    # -- statistics ---------------------------------------------------------

    def stats(self) -> list[LayerStats]:
        """The per-layer counters, in layer order (live objects, updated by later calls to ``stats()``)."""
        self._fold_l1_hits()
        return list(self._stats)

    def _fold_l1_hits(self) -> None:
        hits, self._l1_hits = self._l1_hits, 0
        self._first_stats.hits += hits

    def reset_stats(self) -> None:
        """Set every layer's counters back to zero."""
        self._l1_hits = 0
        for stats in self._stats:
            stats.reset()

    def _failed(self, index: int, action: str, exc: BaseException) -> None:
        self._stats[index].errors += 1
        log.warning(
            "stockpyle: cache layer %d (%r) failed to %s; continuing without it: %s",
            index, self.stores[index], action, exc,
        )

    # -- reads --------------------------------------------------------------

    def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        # The L1 hit path is the library's second-hottest code.  When L1 is an
        # unbounded in-process store, its index is probed here directly for
        # the common lookup (one str-valued attribute): that saves a Python
        # frame, which is a quarter of the cost of the whole hit.  Anything
        # unusual falls through to L1's own get().
        index = self._l1_index
        if index is not None and len(keydict) == 1:
            (name,) = keydict
            value = keydict[name]
            if type(value) is str:
                rec = index.get((klass, name, value))
                if rec is not None and (rec.expires is None or rec.expires > _monotonic()):
                    self._l1_hits += 1
                    return rec.obj  # type: ignore[no-any-return]
        try:
            obj = self._first_get(klass, keydict)
        except UnknownKeyError:
            if self._single:
                raise
            return self._get_from(1, klass, keydict)
        except _CACHE_FAILURES as exc:
            if self._single:
                raise
            self._failed(0, "get", exc)
            return self._get_from(1, klass, keydict)
        if obj is not None:
            self._l1_hits += 1  # folded into stats() lazily: one attribute, not two
            return obj  # type: ignore[no-any-return]
        self._first_stats.misses += 1
        if self._single:
            return None
        return self._get_from(1, klass, keydict)

    def _get_from(self, start: int, klass: type[T], keydict: KeyDict) -> T | None:
        stores = self.stores
        last = len(stores) - 1
        for index in range(start, last + 1):
            stats = self._stats[index]
            try:
                obj = stores[index].get(klass, keydict)
            except UnknownKeyError:
                if index == last:
                    raise
                continue  # this cache can only look up declared keys; ask lower layers
            except _CACHE_FAILURES as exc:
                if index == last:
                    raise
                self._failed(index, "get", exc)
                continue
            if obj is None:
                stats.misses += 1
                continue
            stats.hits += 1
            self._backfill(index, [obj])
            return obj  # type: ignore[no-any-return]
        return None

    def _backfill(self, found_at: int, objs: list[Any]) -> None:
        """Write objects found at layer ``found_at`` into every layer above it."""
        for index in range(found_at - 1, -1, -1):
            layer = self.stores[index]
            try:
                if len(objs) == 1:
                    layer.put(objs[0])
                else:
                    layer.batch_put(objs)
            except _CACHE_FAILURES as exc:
                self._failed(index, "backfill", exc)
                continue
            self._stats[index].backfills += len(objs)

    def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        requests = list(keydicts)
        results: list[Any] = [None] * len(requests)
        missing = list(range(len(requests)))
        stores = self.stores
        last = len(stores) - 1
        found_by_layer: list[list[Any]] = [[] for _ in stores]
        for index, layer in enumerate(stores):
            if not missing:
                break
            stats = self._stats[index]
            try:
                answers = layer.batch_get(klass, [requests[i] for i in missing])
            except UnknownKeyError:
                if index == last:
                    raise
                continue
            except _CACHE_FAILURES as exc:
                if index == last:
                    raise
                self._failed(index, "batch_get", exc)
                continue
            still: list[int] = []
            for position, obj in zip(missing, answers, strict=True):
                if obj is None:
                    still.append(position)
                else:
                    results[position] = obj
                    found_by_layer[index].append(obj)
            stats.hits += len(missing) - len(still)
            stats.misses += len(still)
            missing = still
        # back-fill: each upper layer gets one batch_put of everything found below it
        below: list[Any] = []
        for index in range(last, 0, -1):
            below.extend(found_by_layer[index])
            if below:
                layer = stores[index - 1]
                try:
                    layer.batch_put(list(below))
                except _CACHE_FAILURES as exc:
                    self._failed(index - 1, "backfill", exc)
                else:
                    self._stats[index - 1].backfills += len(below)
        return results

    # -- writes -------------------------------------------------------------

    def _write(self, operation: str, argument: Any, objs: list[Any]) -> None:
        for obj in objs:
            # validate keys before anything is written anywhere
            object_keys(obj)
        stores = self.stores
        last = len(stores) - 1
        try:
            getattr(stores[last], operation)(argument)
        except BaseException:
            # the system of record may or may not have applied the write
            # (a timeout after commit): make sure no cache keeps the old value
            self._invalidate(range(last - 1, -1, -1), objs)
            raise
        for index in range(last - 1, -1, -1):
            try:
                getattr(stores[index], operation)(argument)
            except _CACHE_FAILURES as exc:
                self._failed(index, operation, exc)
                if operation not in ("delete", "batch_delete"):
                    self._invalidate([index], objs)
            except BaseException:
                # a bug-class error (e.g. an object this cache cannot serialize):
                # leave no layer from here up holding the old value, then report it
                self._invalidate(range(index, -1, -1), objs)
                raise

    def _invalidate(self, indexes: Iterable[int], objs: list[Any]) -> None:
        for index in indexes:
            try:
                self.stores[index].batch_delete(objs)
            except Exception as exc:  # noqa: BLE001 - best effort, already failing
                self._failed(index, "invalidate", exc)

    def put(self, obj: object) -> None:
        self._write("put", obj, [obj])

    def batch_put(self, objs: Iterable[object]) -> None:
        items = list(objs)
        if items:
            self._write("batch_put", items, items)

    def delete(self, obj: object) -> None:
        self._write("delete", obj, [obj])

    def batch_delete(self, objs: Iterable[object]) -> None:
        items = list(objs)
        if items:
            self._write("batch_delete", items, items)

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
