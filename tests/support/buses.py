"""Helpers for the invalidation bus tests: recording listeners and waiting.

``RecordingListener``
    Records every ``invalidate(digests, origin)`` and ``flush()`` a bus
    delivers, with the wall-clock time of each, and lets a test wait for them.
    ``block()`` makes the next delivery wait until ``unblock()``: the bus's
    listener thread then stands still, so a test can make it fall behind.

``wait_until(predicate, timeout)``
    Polls ``predicate`` until it is true; returns its last value.

``bus_threads()``
    The live threads of buses (``stockpyle-bus-*``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["BusCounter", "RecordingListener", "bus_threads", "digests_for", "wait_trusted", "wait_until"]


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.005) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_trusted(bus: Any, timeout: float = 5.0) -> bool:
    """Wait until the bus is trusted (it heard from its server)."""
    return bool(wait_until(lambda: bus.trusted_until > time.monotonic(), timeout))


def bus_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("stockpyle-bus-") and t.is_alive()]


def digests_for(prefix: str, count: int) -> list[str]:
    """``count`` distinct valid digests (32 hex digits) derived from ``prefix``."""
    import hashlib

    return [hashlib.blake2b(f"{prefix}:{i}".encode(), digest_size=16).hexdigest() for i in range(count)]


class RecordingListener:
    """A bus listener that records what it is told."""

    def __init__(self) -> None:
        self.invalidations: list[tuple[tuple[str, ...], str | None, float]] = []
        self.flushes: list[float] = []
        self._cond = threading.Condition()
        self._gate: threading.Event | None = None
        self.entered = threading.Event()

    # -- BusListener -------------------------------------------------------

    def invalidate(self, digests: Sequence[str], origin: str | None = None) -> None:
        gate = self._gate
        if gate is not None:
            self.entered.set()
            gate.wait(30)
        with self._cond:
            self.invalidations.append((tuple(digests), origin, time.time()))
            self._cond.notify_all()

    def flush(self) -> None:
        with self._cond:
            self.flushes.append(time.time())
            self._cond.notify_all()

    # -- for tests -----------------------------------------------------------

    @property
    def digests(self) -> list[str]:
        with self._cond:
            return [d for digests, _origin, _at in self.invalidations for d in digests]

    @property
    def origins(self) -> list[str | None]:
        with self._cond:
            return [origin for _digests, origin, _at in self.invalidations]

    def wait_digests(self, wanted: Sequence[str], timeout: float = 5.0) -> bool:
        """Wait until every digest in ``wanted`` was delivered."""
        want = set(wanted)
        return bool(wait_until(lambda: want <= set(self.digests), timeout))

    def wait_flushes(self, count: int, timeout: float = 5.0) -> bool:
        return bool(wait_until(lambda: len(self.flushes) >= count, timeout))

    def block(self) -> None:
        """Make the next ``invalidate`` wait until :meth:`unblock`."""
        self.entered.clear()
        self._gate = threading.Event()

    def unblock(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.set()


class BusCounter:
    """A storable counter for the coherence tests (importable by their worker processes)."""

    __stockpyle_keys__ = ("id",)

    def __init__(self, id: int, value: int) -> None:
        self.id = id
        self.value = value
