"""Background repair of chains: the invalidations a layer missed are retried until it answers.

A :class:`~stockpyle.ChainedStore` remembers every write it could not apply
to a cache layer (the layer was down, frozen, or its breaker open) as a
pending invalidation.  Applying them only on the chain's next call of that
layer would leave the layer stale for as long as the chain happens not to
call it -- forever, when an in-process layer above answers every read -- and
other processes read the stale entries meanwhile.  So one daemon thread per
process retries every chain's pending invalidations, every
``retry_interval`` seconds of the chain, until none are left.  After a fork
the child starts its own thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Protocol

__all__ = ["Repairable", "RepairThread", "repairs"]

log = logging.getLogger("stockpyle.chained")


class Repairable(Protocol):
    """What the repair thread needs of a chain."""

    retry_interval: float

    def repair(self) -> bool:
        """Apply pending invalidations where the layers answer; True when some are still pending."""
        ...


class RepairThread:
    """The process's repair thread (started on first use, again in a forked child).

    Each chain is retried on its own clock: first one ``retry_interval``
    after it was scheduled (the call that failed has just been made), then
    one interval after each attempt that left something pending.
    """

    def __init__(self) -> None:
        # chain -> [how many times it was scheduled, when it is due]: a chain
        # scheduled again while its repair ran (a write failed meanwhile) is kept
        self._chains: weakref.WeakKeyDictionary[Repairable, list[float]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = -1

    def schedule(self, chain: Repairable) -> None:
        """Retry ``chain``'s pending invalidations until none are left."""
        with self._lock:
            entry = self._chains.get(chain)
            new = entry is None
            if entry is None:
                self._chains[chain] = [1, time.monotonic() + chain.retry_interval]
            else:
                # an already scheduled chain keeps its clock (a failed retry
                # re-schedules it: moving it sooner would spin)
                entry[0] += 1
            if self._pid != os.getpid():
                self._pid = os.getpid()
                new = True
                threading.Thread(target=self._serve, name="stockpyle-repair", daemon=True).start()
        if new:  # the thread may be waiting for a later chain, or for none
            self._wake.set()

    def scheduled(self, chain: Repairable) -> bool:
        """Whether ``chain`` is retried by this thread (it has, or recently had, pending invalidations)."""
        with self._lock:
            return chain in self._chains

    def cancel(self, chain: Repairable) -> None:
        """Retry ``chain`` no more (a released chain); a later :meth:`schedule` brings it back."""
        with self._lock:
            self._chains.pop(chain, None)

    def _serve(self) -> None:
        me = os.getpid()
        while self._pid == me:
            with self._lock:
                now = time.monotonic()
                # the counts as the repairs begin (schedule() may run while they do)
                due = [(chain, entry[0]) for chain, entry in self._chains.items() if entry[1] <= now]
                soonest = min((entry[1] for entry in self._chains.values()), default=None)
            if not due:
                self._wake.wait(None if soonest is None else soonest - now)
                self._wake.clear()  # a schedule() from here on is seen: the loop looks again
                continue
            for chain, requests in due:
                try:
                    still = chain.repair()
                except Exception:  # a bug must not end the thread
                    log.exception("stockpyle: repairing %r failed", chain)
                    still = True
                with self._lock:
                    entry = self._chains.get(chain)
                    if entry is None:  # cancelled meanwhile
                        continue
                    if not still and entry[0] == requests:
                        del self._chains[chain]
                    else:
                        entry[1] = time.monotonic() + chain.retry_interval


#: The repair thread of this process.
repairs = RepairThread()
