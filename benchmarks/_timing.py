"""Shared timing helpers for the benchmark scripts.

The machine these run on is shared and noisy, so rows are never timed one
after the other: :func:`interleaved` times every row once per round, for many
rounds, and reports per-row medians and *medians of per-round ratios*.  A burst
of load from elsewhere then slows every row of that round alike and leaves the
ratios intact.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass
class Timing:
    """Per-call nanoseconds of one row, one sample per round."""

    name: str
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def ratio_to(self, other: Timing) -> float:
        """Median over rounds of ``self / other`` measured in the same round."""
        return statistics.median(a / b for a, b in zip(self.samples, other.samples, strict=True))


def _per_call_ns(operation: Callable[[], object], number: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(number):
        operation()
    return (time.perf_counter_ns() - start) / number


def interleaved(
    rows: Sequence[tuple[str, Callable[[], object]]], *, number: int = 5_000, rounds: int = 15
) -> dict[str, Timing]:
    """Time every row ``number`` calls per round for ``rounds`` rounds, rows interleaved.

    The garbage collector is paused while timing, as :mod:`timeit` does.
    """
    results = {name: Timing(name, []) for name, _ in rows}
    for _, operation in rows:  # warm up caches and lazy paths
        _per_call_ns(operation, max(1, number // 10))
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, operation in rows:
                results[name].samples.append(_per_call_ns(operation, number))
    finally:
        if gc_was_enabled:
            gc.enable()
    return results
