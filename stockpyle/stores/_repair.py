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
    """The process's repair thread (started on first use, again in a forked child)."""

    def __init__(self) -> None:
        # chain -> how many times it was scheduled: a chain scheduled again
        # while its repair ran (a write failed meanwhile) is kept
        self._chains: weakref.WeakKeyDictionary[Repairable, int] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pid = -1

    def schedule(self, chain: Repairable) -> None:
        """Retry ``chain``'s pending invalidations until none are left."""
        with self._lock:
            requests = self._chains.get(chain)
            new = requests is None
            self._chains[chain] = (requests or 0) + 1
            if self._pid != os.getpid():
                self._pid = os.getpid()
                new = True
                threading.Thread(target=self._serve, name="stockpyle-repair", daemon=True).start()
        if new:
            # a chain already scheduled waits for its next interval (a failed
            # retry re-schedules it: waking for that would spin)
            self._wake.set()

    def _serve(self) -> None:
        me = os.getpid()
        while self._pid == me:
            with self._lock:
                chains = list(self._chains)
            if not chains:
                self._wake.wait()
                self._wake.clear()
                continue
            # wait one interval first: the call that failed has just been made
            self._wake.wait(min(chain.retry_interval for chain in chains))
            self._wake.clear()
            with self._lock:  # the counts as the repairs begin (schedule() may have run while we waited)
                counted = [(chain, self._chains.get(chain, 0)) for chain in chains]
            for chain, requests in counted:
                try:
                    still = chain.repair()
                except Exception:  # a bug must not end the thread
                    log.exception("stockpyle: repairing %r failed", chain)
                    still = True
                if not still:
                    with self._lock:
                        if self._chains.get(chain) == requests:
                            del self._chains[chain]


#: The repair thread of this process.
repairs = RepairThread()
