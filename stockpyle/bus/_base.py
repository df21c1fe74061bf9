"""What every invalidation bus shares: listeners, the listener thread, trust, gaps, statistics.

:class:`ListeningBus` implements :class:`~stockpyle.bus.InvalidationBus` except
for the wire: a bus subclasses it and provides the connection of its listener
thread (:meth:`ListeningBus._connect_listener`, :meth:`ListeningBus._listen_once`,
:meth:`ListeningBus._close_listener`) and the sending of one message
(:meth:`ListeningBus._send`).  The base class holds the rules that must be the
same for every bus:

* **Trust.** :attr:`~ListeningBus.trusted_until` is the :func:`time.monotonic`
  time until which the chain may serve its in-process entries.  A bus calls
  :meth:`ListeningBus._heard` with *evidence*: a monotonic time ``t`` such
  that every message published before ``t`` has been delivered to the
  listeners.  ``trusted_until`` becomes ``t + max_staleness`` and never moves
  back (older evidence does not shorten it, and nothing but a release or a
  fork revokes it).  Evidence is either the send time of a message (the
  sender's wall clock converted to this process's monotonic clock, and never
  later than the moment the message was received) or the moment a request was
  sent to which the server's answer proves that nothing older is pending (an
  empty blocking read, a heartbeat that came back through the same ordered
  channel, a poll that found every slot).
* **Connections.** The first connection of the listener flushes the listeners
  once it is established and positioned (that drops whatever was cached
  before the bus listened).  A reconnection is counted as a gap and flushes
  too, unless the bus resumed at its old position and detects by itself what
  it missed meanwhile (:class:`~stockpyle.bus.MemcacheEpochBus` does).
* **Gaps.** A bus that detects lost messages calls :meth:`ListeningBus._gap`:
  the listeners are flushed before any later message is delivered.
* **Fork.** In a forked child (gunicorn ``--preload``) the inherited state is
  dropped: a new sender id, fresh statistics, no trust, the parent's
  connections abandoned without being closed (closing them would disturb the
  parent), and, when the parent was listening, a new listener thread.

Messages carry the sender id of the publishing bus (:attr:`ListeningBus.sender`,
one per bus object and process) and the publisher's wall-clock send time.  A
listener is called with the ``origin`` the publisher passed to
:meth:`~ListeningBus.publish` or, when it passed none, with the sender id of
the bus that published (so a process can recognise its own messages either
way); messages fed by a database trigger carry ``sql:<table>``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Final

from ..errors import ErrorTable
from ..exceptions import ConfigurationError, StockpyleError
from . import DIGEST_SIZE, BusListener, BusStats

__all__ = ["MAX_ORIGIN_LENGTH", "ListeningBus", "Message", "call_quietly", "check_digests", "positive_seconds"]

log = logging.getLogger("stockpyle.bus")

_HEX: Final = frozenset("0123456789abcdef")
_DIGEST_CHARS: Final = DIGEST_SIZE * 2
#: The longest ``origin`` a message may carry (characters).
MAX_ORIGIN_LENGTH: Final = 200
#: First wait before reconnecting the listener; doubled up to :data:`_BACKOFF_MAX`.
_BACKOFF_MIN: Final = 0.02
_BACKOFF_MAX: Final = 1.0
#: How long release() waits for the listener thread to stop.
_JOIN_TIMEOUT: Final = 5.0


def positive_seconds(owner: str, name: str, value: Any) -> float:
    """``value`` as a positive number of seconds, or a ConfigurationError naming ``owner(name=...)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{owner} {name} must be a positive number of seconds; got {value!r}")
    if value == float("inf"):
        raise ConfigurationError(f"{owner} {name} must be finite; got {value!r}")
    return float(value)


def check_digests(digests: Sequence[str]) -> tuple[str, ...]:
    """The digests as a tuple, each checked to be a :func:`~stockpyle.bus.key_digest` (32 lowercase hex digits).

    :raises TypeError: when ``digests`` is a single string or holds a non-string.
    :raises ValueError: for a string that is no digest.
    """
    if isinstance(digests, (str, bytes)):
        raise TypeError("publish() takes a sequence of key digests, not a single string: publish([digest])")
    out = tuple(digests)
    for digest in out:
        if type(digest) is not str:
            raise TypeError(f"a key digest is a str of {_DIGEST_CHARS} hex digits (key_digest(key)); got {digest!r}")
        if len(digest) != _DIGEST_CHARS or not _HEX.issuperset(digest):
            raise ValueError(f"not a key digest (32 lowercase hex digits from key_digest()): {digest!r}")
    return out


def _check_origin(origin: str | None) -> None:
    if origin is None:
        return
    if type(origin) is not str:
        raise TypeError(f"origin must be a str or None; got {origin!r}")
    if not origin or len(origin) > MAX_ORIGIN_LENGTH:
        raise ValueError(f"origin must be 1 to {MAX_ORIGIN_LENGTH} characters; got {len(origin)}")


@dataclass(frozen=True)
class Message:
    """One invalidation as received.

    :ivar digests: the key digests to drop (none: the message only proves the bus alive).
    :ivar origin: what the publisher passed as ``origin`` (``None``: nothing).
    :ivar sender: the sender id of the publishing bus (``sql:<table>`` for a trigger).
    :ivar sent: the sender's wall-clock time (:func:`time.time`) when it published.
    """

    digests: tuple[str, ...]
    origin: str | None
    sender: str
    sent: float


_BUSES: weakref.WeakSet[ListeningBus] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for bus in list(_BUSES):
        try:
            bus._after_fork()
        except Exception:  # a fork must never fail because of a bus
            log.exception("stockpyle: %r could not restart listening in the forked child", bus)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Ref:
    """A strong reference with the interface of :class:`weakref.ref`, for listeners that refuse weak references."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj


class ListeningBus:
    """The shared machinery of the buses (see the module documentation).

    :param max_staleness: seconds an in-process entry may be served after the
        last evidence that every earlier message was delivered.
    """

    # trusted_until is read by every L1 hit of a chain with a bus: a slot, since
    # a bus has more attributes than CPython keeps in an instance's shared-key
    # values (30), past which each one is looked up in the instance's own dict
    __slots__ = ("__dict__", "__weakref__", "trusted_until")

    #: The bus's name in messages and thread names.
    kind: ClassVar[str] = "bus"
    #: How the bus's driver exceptions map into the stockpyle tree.
    errors: ErrorTable

    def __init__(self, *, max_staleness: float) -> None:
        self.max_staleness = positive_seconds(type(self).__name__, "max_staleness", max_staleness)
        #: :func:`time.monotonic` time until which in-process entries may be served.
        self.trusted_until = 0.0
        self._listeners: tuple[Any, ...] = ()  # weak references (or _Ref)
        self._process_state()
        _BUSES.add(self)

    def _process_state(self) -> None:
        """The state that belongs to one process (set again in a forked child)."""
        #: This bus's id on the wire (new in every process).
        self.sender = uuid.uuid4().hex
        self._lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = BusStats()
        self._observed = 0.0  # observed seconds of earlier listening periods
        self._listening_since: float | None = None
        self._credited_at = 0.0  # trust has been credited up to this monotonic time
        self._connections = 0  # connections of the current listening period
        self._warned = False

    # -- describing ---------------------------------------------------------

    def describe(self) -> str:
        """Where the bus lives (server, channel), for messages."""
        return self.kind

    def __repr__(self) -> str:
        state = "listening" if self._thread is not None else "idle"
        return f"<{type(self).__name__} {self.describe()} ({state})>"

    # -- InvalidationBus ----------------------------------------------------

    def publish(self, digests: Sequence[str], origin: str | None = None) -> None:
        """Send one invalidation of these key digests to every subscribed process.

        Large lists are split into several messages where the channel limits
        a message's size.  An empty list sends nothing.

        :param digests: :func:`~stockpyle.bus.key_digest` (or
            :func:`~stockpyle.bus.class_digest`) values.
        :param origin: an id of the publisher (at most 200 characters), handed
            to every listener with the message; ``None``: the listeners get
            this bus's :attr:`sender`.
        :raises StoreError: when the bus cannot be reached
            (:class:`~stockpyle.exceptions.StoreUnavailableError` for an outage).
        :raises TypeError: for digests that are not strings.
        :raises ValueError: for a string that is no digest, or an overlong origin.
        """
        checked = check_digests(digests)
        _check_origin(origin)
        if not checked:
            return
        try:
            self.errors.call(self, "publish an invalidation", self._send, checked, origin, time.time())
        except StockpyleError:
            with self._stats_lock:
                self._stats.publish_errors += 1
            raise
        with self._stats_lock:
            self._stats.published += 1

    def subscribe(self, listener: BusListener) -> None:
        """Deliver every invalidation heard to ``listener``; starts the listener thread if it is not running.

        A listener is held by a weak reference where it allows one (a
        listener that is garbage collected stops receiving).  Subscribing a
        listener twice delivers to it once; subscribing after
        :meth:`release` starts listening again.

        :raises TypeError: for an object without ``invalidate`` and ``flush``.
        """
        if not isinstance(listener, BusListener):
            raise TypeError(
                f"a bus listener needs invalidate(digests, origin) and flush() methods; got {type(listener).__name__}"
            )
        with self._lock:
            if all(ref() is not listener for ref in self._listeners):
                try:
                    ref: Any = weakref.ref(listener)
                except TypeError:
                    ref = _Ref(listener)
                self._listeners = (*[r for r in self._listeners if r() is not None], ref)
            self._start_locked()

    def unsubscribe(self, listener: BusListener) -> None:
        """Stop delivering to ``listener``; the thread stops with the last listener (unknown ones are ignored)."""
        with self._lock:
            self._listeners = tuple(r for r in self._listeners if r() is not None and r() is not listener)
            last = not self._listeners
        if last:
            self._stop_listening()

    def stats(self) -> BusStats:
        """A snapshot of this process's counters of the bus (``lag`` is the live window)."""
        with self._stats_lock:
            now = time.monotonic()
            self._credit(now)
            observed = self._observed
            if self._listening_since is not None:
                observed += now - self._listening_since
            return replace(self._stats, observed_seconds=observed)

    def release(self) -> None:
        """Stop the listener thread, revoke trust and close every connection.

        Never terminal: the listeners stay subscribed but hear nothing until
        the next :meth:`subscribe` (of any listener) starts listening again;
        :meth:`publish` reconnects on its own.
        """
        self._stop_listening()
        self._close_publisher()

    @property
    def listening(self) -> bool:
        """Whether this process's listener thread is running."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    # -- the listener thread ------------------------------------------------

    def _start_locked(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive() and not self._stop.is_set():
            return
        self._stop = stop = threading.Event()
        self._thread = thread = threading.Thread(
            target=self._run, args=(stop,), name=f"stockpyle-bus-{self.kind}", daemon=True
        )
        with self._stats_lock:
            now = time.monotonic()
            self._listening_since = now
            self._credited_at = now
        self._connections = 0
        thread.start()

    def _stop_listening(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
            self._stop.set()
            with self._stats_lock:
                now = time.monotonic()
                self._credit(now)
                self.trusted_until = 0.0
                if self._listening_since is not None:
                    self._observed += now - self._listening_since
                    self._listening_since = None
        if thread is None:
            return
        self._interrupt()
        if thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("stockpyle: the listener thread of %r did not stop within %.0fs", self, _JOIN_TIMEOUT)

    def _run(self, stop: threading.Event) -> None:
        backoff = _BACKOFF_MIN
        while not stop.is_set():
            try:
                resumed = self._connect_listener()
            except Exception as exc:  # noqa: BLE001 - an outage: retried with back-off
                self._close_listener()
                self._outage(exc, "connect")
                stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
                continue
            if stop.is_set():
                self._close_listener()
                break
            self._connections += 1
            if self._connections == 1:
                self._flush()  # whatever was cached before the bus listened
            elif not resumed:
                self._gap("the listener reconnected: messages may have been lost meanwhile")
            if self._warned:
                log.warning("stockpyle: %r is listening again", self)
                self._warned = False
            try:
                while not stop.is_set():
                    self._listen_once(stop)
                    backoff = _BACKOFF_MIN
            except Exception as exc:  # noqa: BLE001 - the connection failed: reconnect
                if not stop.is_set():
                    self._outage(exc, "listen")
            finally:
                self._close_listener()
            stop.wait(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _outage(self, exc: BaseException, action: str) -> None:
        error = self.errors.error_for(exc, self, f"{action} for invalidations")
        if not self._warned:
            log.warning("stockpyle: %s; in-process layers are bypassed until it is heard from again", error)
            self._warned = True
        else:
            log.debug("stockpyle: %s", error)

    # -- what the listener thread reports -----------------------------------

    def _heard(self, messages: Sequence[Message], evidence: float | None) -> None:
        """Deliver ``messages`` in order, then extend trust to ``evidence + max_staleness``.

        :param evidence: a monotonic time before which every message was
            delivered (``None``: the send time of the last message).
        """
        if messages:
            wall = time.time()
            now = time.monotonic()
            for message in messages:
                self._deliver(message)
                self._stats.lag.add(max(0.0, wall - message.sent))
            with self._stats_lock:
                self._stats.messages += len(messages)
            if evidence is None:
                # the sender's clock, converted; never later than the reception
                evidence = now - max(0.0, wall - messages[-1].sent)
        elif evidence is not None:
            with self._stats_lock:
                self._stats.heartbeats += 1
        if evidence is not None:
            self._trust(evidence)

    def _trust(self, evidence: float) -> None:
        until = evidence + self.max_staleness
        with self._stats_lock:
            self._credit(time.monotonic())
            # a thread of an earlier listening period (stopping) never extends trust
            if until > self.trusted_until and threading.current_thread() is self._thread:
                self.trusted_until = until

    def _credit(self, now: float) -> None:
        """Add the trusted time since the last credit (``_stats_lock`` held)."""
        if self._listening_since is None:
            return
        start = self._credited_at
        if now > start:
            self._stats.trusted_seconds += max(0.0, min(self.trusted_until, now) - start)
            self._credited_at = now

    def _gap(self, why: str) -> None:
        """Messages were lost: count the gap and flush the listeners."""
        log.info("stockpyle: %r: %s; flushing the in-process layers", self, why)
        with self._stats_lock:
            self._stats.gaps += 1
        self._flush()

    def _flush(self) -> None:
        with self._stats_lock:
            self._stats.flushes += 1
        for listener in self._current_listeners():
            try:
                listener.flush()
            except Exception:
                log.exception("stockpyle: bus listener %r failed to flush", listener)

    def _deliver(self, message: Message) -> None:
        origin = message.origin if message.origin is not None else message.sender
        for listener in self._current_listeners():
            try:
                listener.invalidate(message.digests, origin)
            except Exception:
                log.exception("stockpyle: bus listener %r failed to invalidate; flushing it instead", listener)
                try:
                    listener.flush()
                except Exception:
                    log.exception("stockpyle: bus listener %r failed to flush", listener)

    def _current_listeners(self) -> list[Any]:
        return [listener for listener in (ref() for ref in self._listeners) if listener is not None]

    # -- fork ---------------------------------------------------------------

    def _after_fork(self) -> None:
        was_listening = self._thread is not None
        self._abandon_connections()
        self.trusted_until = 0.0
        self._process_state()
        if was_listening and self._current_listeners():
            with self._lock:
                self._start_locked()

    # -- what a bus provides ------------------------------------------------

    def _send(self, digests: tuple[str, ...], origin: str | None, sent: float) -> None:
        """Publish one invalidation (split as the channel needs); raise the driver's exception on failure."""
        raise NotImplementedError

    def _connect_listener(self) -> bool:
        """Open the listener's connection and position it (called on the listener thread).

        :returns: True when the listener resumed where it was and will detect
            anything lost meanwhile (no flush needed); False when it was
            positioned anew (a reconnection then counts as a gap).
        """
        raise NotImplementedError

    def _listen_once(self, stop: threading.Event) -> None:
        """Wait for messages for a while (at most about ``max_staleness / 2``); report them with :meth:`_heard`.

        Raises the driver's exception when the connection failed.
        """
        raise NotImplementedError

    def _close_listener(self) -> None:
        """Close the listener's connection (idempotent; on the listener thread)."""

    def _interrupt(self) -> None:
        """Wake a listener thread blocked in a read, from :meth:`release` (optional)."""

    def _close_publisher(self) -> None:
        """Close the connections :meth:`publish` uses (they reopen on demand)."""

    def _abandon_connections(self) -> None:
        """In a forked child: forget the inherited connections without closing them for the parent."""


def call_quietly(fn: Callable[[], Any]) -> None:
    """``fn()``, logging instead of raising (closing a connection that already failed)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - closing a broken connection
        log.debug("stockpyle: closing a bus connection failed: %r", exc)
