"""Counters and latency summaries, cheap enough to stay on.

Every store counts its operations (:class:`StoreStats`, from
``store.stats()``) and a :class:`~stockpyle.ChainedStore` additionally counts
what each of its layers did for it (:class:`~stockpyle.stores.chained.LayerStats`).

Counting is a few integer increments.  Timing every call would cost more than
an in-process hit itself, so latencies are *sampled*: one call in
:data:`SAMPLE_EVERY` is timed with :func:`time.perf_counter` and kept in a
bounded window of recent samples, from which :class:`Latency` computes the
median and the 99th percentile on demand.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ["SAMPLE_EVERY", "Latency", "LatencySummary", "StoreStats"]

#: One call in this many is timed (a power of two: the check is a bit mask).
SAMPLE_EVERY: Final = 64
_SAMPLE_MASK: Final = SAMPLE_EVERY - 1
#: Samples kept per operation (a sliding window of the most recent ones).
WINDOW: Final = 4096


@dataclass(frozen=True)
class LatencySummary:
    """Latency of one operation, in seconds, from the recent samples.

    :ivar samples: how many timed calls the figures are drawn from.
    :ivar median: the median call time.
    :ivar p99: the 99th percentile call time.
    :ivar mean: the mean call time.
    """

    samples: int
    median: float
    p99: float
    mean: float

    def as_dict(self) -> dict[str, float]:
        """The summary as a plain dict."""
        return {"samples": self.samples, "median": self.median, "p99": self.p99, "mean": self.mean}


_EMPTY = LatencySummary(0, 0.0, 0.0, 0.0)


class Latency:
    """A bounded window of sampled call durations for one operation."""

    __slots__ = ("_lock", "_samples", "add")

    #: ``add(seconds)`` records one timed call.  It is the window's own
    #: ``deque.append`` (atomic: no lock needed), so timing a call on a hot
    #: path costs no Python frame.
    add: Callable[[float], None]

    def __init__(self) -> None:
        self._samples: deque[float] = deque(maxlen=WINDOW)
        self._lock = threading.Lock()
        self.add = self._samples.append

    def summary(self) -> LatencySummary:
        """Median, p99 and mean of the samples in the window."""
        with self._lock:
            data = sorted(self._samples)
        if not data:
            return _EMPTY
        p99 = data[min(len(data) - 1, int(len(data) * 0.99))]
        return LatencySummary(len(data), statistics.median(data), p99, statistics.fmean(data))

    def clear(self) -> None:
        """Forget every sample."""
        self._samples.clear()


def should_sample(counter: int) -> bool:
    """Whether the call numbered ``counter`` is one of the timed ones."""
    return not counter & _SAMPLE_MASK


@dataclass
class StoreStats:
    """What one store did since it was created or :meth:`reset`.

    :ivar hits: lookups that found an object (``batch_get`` counts each key).
    :ivar misses: lookups that found nothing.
    :ivar puts: objects written (``batch_put`` counts each object).
    :ivar deletes: objects deleted.
    :ivar errors: operations that raised a backend error.
    :ivar ignored: objects a write left alone because the store does not
        handle their class (:class:`~stockpyle.stores.sqlalchemy.SqlAlchemyStore`
        and classes it does not map).
    :ivar latency: per operation name (``"get"``, ``"batch_get"``, ``"put"``...),
        the sampled latency window.
    """

    hits: int = 0
    misses: int = 0
    puts: int = 0
    deletes: int = 0
    errors: int = 0
    ignored: int = 0
    latency: dict[str, Latency] = field(default_factory=dict)

    @property
    def hit_ratio(self) -> float:
        """``hits / (hits + misses)``, or 0.0 before any lookup."""
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0

    def timer(self, operation: str) -> Latency:
        """The latency window of ``operation`` (created on first use)."""
        window = self.latency.get(operation)
        if window is None:
            window = self.latency.setdefault(operation, Latency())
        return window

    def as_dict(self) -> dict[str, Any]:
        """Counters, hit ratio and latency summaries as plain data."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": self.hit_ratio,
            "puts": self.puts,
            "deletes": self.deletes,
            "errors": self.errors,
            "ignored": self.ignored,
            "latency": {op: window.summary().as_dict() for op, window in sorted(self.latency.items())},
        }

    def reset(self) -> None:
        """Set the counters back to zero and forget the latency samples."""
        self.hits = self.misses = self.puts = self.deletes = self.errors = self.ignored = 0
        for window in self.latency.values():
            window.clear()
