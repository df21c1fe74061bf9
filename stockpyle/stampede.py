"""Stampede protection: one read of the system of record per cold key, in a process and across a fleet.

When a popular entry is missing (it expired, it was invalidated, the cache
restarted), every request for it misses at once and every one of them reads
the database -- a *stampede*.  A :class:`~stockpyle.ChainedStore` prevents it
at two levels:

* **in process** (always, unless ``stampede=None``): concurrent misses of one
  key in one process wait for a single read of the lower layers, the
  *flight*, and share its result;
* **across processes** (where a shared layer supports leases, see
  :mod:`stockpyle.stores.drivers`): the first process to miss takes a short
  *lease* on the key in the shared layer, reads the system of record and
  fills the key; the others are told a lease is held and wait for the fill,
  polling with jittered backoff.  A writer that changes the key meanwhile
  voids the lease, so the winner's fill of the value it read is refused.

:class:`Stampede` is the policy: how long a lease lasts, how long a loser
waits, what a loser does when the wait runs out, and -- with
``serve_stale_for`` and ``refresh_ahead`` -- whether readers are answered
with the value already cached while one reader of the fleet reloads it, so a
popular key never makes anyone wait.
"""

from __future__ import annotations

import os
import random
import threading
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from threading import get_ident
from typing import Any, Final, Literal, TypeVar

from .exceptions import ConfigurationError, StockpyleError

__all__ = ["DEFAULT_STAMPEDE", "LeaseTimeoutError", "SingleFlight", "Stampede"]

T = TypeVar("T")

OnTimeout = Literal["load", "miss", "raise"]


class LeaseTimeoutError(StockpyleError, TimeoutError):
    """A read waited ``Stampede.wait`` seconds for another reader's load and ``on_timeout="raise"``."""


def _seconds(name: str, value: Any, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 if positive else value >= 0):
        bound = "> 0" if positive else ">= 0"
        raise ConfigurationError(f"Stampede {name} must be a number of seconds {bound}; got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Stampede:
    """How a chain protects a cold key from a stampede.

    :param lease: seconds a cross-process lease lasts: the longest one load of
        the system of record may take.  A holder that dies loses it after this.
    :param wait: seconds a reader waits for another reader's load (in process
        or in another process) before ``on_timeout`` applies.
    :param on_timeout: what a reader does when the wait runs out: ``"load"``
        reads the system of record itself (without filling the caches),
        ``"miss"`` returns ``None``, ``"raise"`` raises
        :class:`LeaseTimeoutError`.
    :param max_poll: the longest pause between two looks of a waiting reader
        at the shared layer (pauses start short and grow, with jitter).
    :param leases: use cross-process leases where a shared layer supports
        them; ``False`` keeps the in-process protection only.
    :param refresh_ahead: seconds before an entry's lifetime in the lease
        layer ends at which its reload begins (``None``: off).  The first
        reader of the fleet that finds the entry that close to its end wins
        the key's lease and reloads it (its own call pays the load); every
        other reader keeps getting the current value at once.  A key under
        steady reads is thus reloaded once per lifetime and never goes cold.
    :param serve_stale_for: seconds an entry is kept in the lease layer after
        its lifetime ran out, as a *stale* value (``0``: off).  During that
        window the first reader of the fleet wins the key's lease and reloads
        it, and every other reader is answered at once with the stale value
        instead of waiting.  After the window the entry is gone and readers
        wait for one load as usual.  The window is written with the entries:
        the chain's policy sets it on its lease layer; a per-call policy may
        shorten it (accept less staleness) but not lengthen it.  Writes never
        leave a stale value behind: a ``put`` replaces the entry and a
        ``delete`` or an invalidation ends it for good.
    :raises ConfigurationError: for invalid values.
    """

    lease: float = 5.0
    wait: float = 2.0
    on_timeout: OnTimeout = "load"
    max_poll: float = 0.05
    leases: bool = True
    refresh_ahead: float | None = None
    serve_stale_for: float = 0.0

    def __post_init__(self) -> None:
        _seconds("lease", self.lease)
        _seconds("wait", self.wait, positive=False)
        _seconds("max_poll", self.max_poll)
        if self.on_timeout not in ("load", "miss", "raise"):
            raise ConfigurationError(f"Stampede on_timeout must be 'load', 'miss' or 'raise'; got {self.on_timeout!r}")
        if not isinstance(self.leases, bool):
            raise ConfigurationError(f"Stampede leases must be True or False; got {self.leases!r}")
        if self.refresh_ahead is not None:
            _seconds("refresh_ahead", self.refresh_ahead)
            if self.refresh_ahead == float("inf"):
                raise ConfigurationError(f"Stampede refresh_ahead must be finite; got {self.refresh_ahead!r}")
        _seconds("serve_stale_for", self.serve_stale_for, positive=False)
        if self.serve_stale_for == float("inf"):
            raise ConfigurationError(f"Stampede serve_stale_for must be finite; got {self.serve_stale_for!r}")
        if not self.leases and (self.refresh_ahead is not None or self.serve_stale_for):
            raise ConfigurationError(
                "Stampede refresh_ahead and serve_stale_for need leases=True: one reader of the fleet reloads "
                "while the others are served, and that reader is the one that wins the key's lease"
            )

    @property
    def refreshes(self) -> bool:
        """Whether this policy reloads entries before readers would wait (``refresh_ahead`` or ``serve_stale_for``)."""
        return self.refresh_ahead is not None or self.serve_stale_for > 0

    def pauses(self) -> Any:
        """A waiting reader's pauses: from 2 ms growing to ``max_poll``, each with +-50% jitter, never above it."""
        pause = min(0.002, self.max_poll)
        while True:
            yield min(self.max_poll, pause * random.uniform(0.5, 1.5))  # jitter, not cryptography
            pause = min(self.max_poll, pause * 2)


#: The chain's default: in-process single flight, and leases where a layer has them.
DEFAULT_STAMPEDE: Final = Stampede()


class _Flight:
    """One read in progress, shared by the readers of one key.

    ``done`` is created by the first caller that waits (under the table's
    lock): most flights have no follower, and an Event per read would cost
    more than the rest of an L2 hit's bookkeeping.
    """

    __slots__ = ("done", "error", "leader", "published", "result")

    def __init__(self, leader: int) -> None:
        self.done: threading.Event | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.leader = leader
        # the leader handed its waiting followers a result before its load ended (see SingleFlight.publish)
        self.published = False


class SingleFlight:
    """Concurrent calls for one key in this process wait for one of them (reset in a forked child)."""

    def __init__(self) -> None:
        self._flights: dict[Hashable, _Flight] = {}
        self._lock = threading.Lock()
        #: calls that waited for another and took its result
        self.shared = 0
        _EVERY_TABLE.add(self)

    def _after_fork(self) -> None:
        """In a forked child: the parent's flights are not ours (their threads are gone), nor is its lock's state."""
        self._flights = {}
        self._lock = threading.Lock()

    def run(self, key: Hashable, load: Callable[[], T], wait: float, on_timeout: Callable[[], T]) -> T:
        """``load()`` once for all concurrent callers of ``key``.

        A caller that finds a flight under way waits up to ``wait`` seconds
        for it and takes its result; when the flight failed it loads itself,
        and when the wait runs out it returns ``on_timeout()``.
        """
        flights = self._flights
        flight = _Flight(get_ident())
        # setdefault is one atomic step: exactly one caller of a key leads, and
        # the leader (the only caller of most flights) takes no lock
        found = flights.setdefault(key, flight)
        if found is flight:
            try:
                result = load()
                if not flight.published:
                    flight.result = result
                return result
            except BaseException as exc:
                if not flight.published:
                    flight.error = exc
                raise
            finally:
                # The flight leaves the table, its result set, before its Event
                # is read: a follower that makes the Event after this read finds
                # the flight gone and takes the result without waiting.
                if flights.get(key) is flight:
                    del flights[key]
                done = flight.done
                if done is not None:
                    done.set()
        flight = found
        with self._lock:  # followers only: one Event per flight, made by the first of them
            done = flight.done
            if done is None:
                done = flight.done = threading.Event()
        if flights.get(key) is flight and not done.wait(wait):  # still under way, and it took too long
            return on_timeout()
        if flight.error is not None:
            return load()  # the leader failed: try for ourselves
        self.shared += 1
        return flight.result  # type: ignore[no-any-return]

    def publish(self, key: Hashable, result: Any) -> None:
        """Answer the followers of this thread's flight of ``key`` now, while its load goes on.

        The followers take ``result``; later callers of ``key`` start a new
        flight.  Used by a reader that refreshes an entry: the value it already
        has is good enough for the others, who need not wait for the reload.
        Nothing happens when this thread leads no flight of ``key``.
        """
        flights = self._flights
        with self._lock:
            flight = flights.get(key)
            if flight is None or flight.leader != get_ident() or flight.published:
                return
            flight.result = result
            flight.published = True
            del flights[key]  # after the result: a follower that finds the flight gone takes it (see run)
            done = flight.done  # None: nobody waits yet (see _Flight)
        if done is not None:
            done.set()


#: every single-flight table of the process, reset in a forked child
_EVERY_TABLE: weakref.WeakSet[SingleFlight] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for table in list(_EVERY_TABLE):
        table._after_fork()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_reset_after_fork)
