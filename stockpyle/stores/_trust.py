"""The trust watch: chains stop reading their in-process layers when their bus falls silent.

A chain with an invalidation bus may serve an in-process entry only while
``time.monotonic() < bus.trusted_until``.  Comparing the clock on every hit
would cost the hit path a tenth of its time, so one daemon thread per process
(restarted after a fork) compares it instead, every ``granularity`` seconds,
and switches each watched chain between trusting and bypassing its in-process
layers.  It switches a chain off ``granularity`` seconds *before* the bus's
trust runs out, so the bound holds although the thread wakes at intervals.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from typing import Protocol

__all__ = ["TrustWatch", "Watched", "trust_watch"]

#: Shortest and longest pause between two looks at the buses (seconds).
MIN_GRANULARITY = 0.002
MAX_GRANULARITY = 0.02


class Watched(Protocol):
    """What the watch needs of a chain."""

    def trust_deadline(self) -> float:
        """The monotonic time until which the chain may serve in-process entries."""
        ...

    def trust_granularity(self) -> float:
        """How early before the deadline the chain must stop trusting."""
        ...

    def set_trusted(self, trusted: bool) -> None:
        """Start or stop serving in-process entries."""
        ...


class TrustWatch:
    """The process's trust-watch thread (started on first use, again in a forked child)."""

    def __init__(self) -> None:
        self._chains: weakref.WeakSet[Watched] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._pid = -1
        self._wake = threading.Event()

    def watch(self, chain: Watched) -> None:
        """Keep ``chain``'s trust up to date until it is garbage or :meth:`unwatch` ed."""
        with self._lock:
            self._chains.add(chain)
            if self._pid != os.getpid():
                self._pid = os.getpid()
                threading.Thread(target=self._serve, name="stockpyle-trust", daemon=True).start()
        self._wake.set()

    def unwatch(self, chain: Watched) -> None:
        with self._lock:
            self._chains.discard(chain)

    def check(self, chain: Watched) -> float:
        """Update one chain now; returns its granularity."""
        granularity = chain.trust_granularity()
        chain.set_trusted(time.monotonic() < chain.trust_deadline() - granularity)
        return granularity

    def _serve(self) -> None:
        me = os.getpid()
        while self._pid == me:
            with self._lock:
                chains = list(self._chains)
            if not chains:
                self._wake.wait()
                self._wake.clear()
                continue
            pause = MAX_GRANULARITY
            for chain in chains:
                pause = min(pause, self.check(chain))
            time.sleep(max(MIN_GRANULARITY, pause))


#: The trust watch of this process.
trust_watch = TrustWatch()
