"""Lifetimes: how long an object lives in one store.

A lifetime is one of

* ``None`` or ``0`` -- the object never expires;
* an ``int`` or ``float`` number of seconds from now (fractions are kept by
  in-process stores; memcached rounds *up* to whole seconds);
* a :class:`datetime.timedelta` from now;
* a :class:`datetime.datetime`, an absolute expiry time.  A naive datetime is
  local time (as :meth:`datetime.datetime.timestamp` reads it); an aware one is
  honoured in its own zone.

A negative duration or a datetime in the past means "already expired": the
store keeps nothing for that object (and drops what it held under its keys).

Each store owns a :class:`LifetimePolicy`.  Precedence, highest first:

1. ``lifetime_cb(obj)`` given to the store, when it returns anything other
   than ``None`` (return ``0`` to force "never expires");
2. ``store.configure(classes=[Foo], lifetime=...)`` for the object's class or
   its nearest configured base class;
3. no expiry.
"""

from __future__ import annotations

import datetime as _dt
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeAlias

from .exceptions import ConfigurationError

__all__ = [
    "Lifetime",
    "LifetimeCallback",
    "LifetimePolicy",
    "NEVER",
    "expiry_timestamp",
    "memcache_expire",
    "seconds_remaining",
    "validate_lifetime",
]

Lifetime: TypeAlias = "int | float | _dt.timedelta | _dt.datetime | None"
LifetimeCallback: TypeAlias = Callable[[Any], "int | float | _dt.timedelta | _dt.datetime | None"]

#: Returned by :func:`seconds_remaining` for "never expires".
NEVER: Final = None

#: memcached reads expiration values above 30 days as absolute unix times.
MEMCACHE_RELATIVE_LIMIT: Final = 30 * 24 * 60 * 60


def validate_lifetime(lifetime: Any) -> None:
    """Raise :class:`ConfigurationError` unless ``lifetime`` is a valid lifetime value."""
    if lifetime is None or isinstance(lifetime, (_dt.timedelta, _dt.datetime)):
        return
    if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)):
        raise ConfigurationError(
            f"a lifetime must be seconds (int or float), a timedelta, a datetime or None; got {lifetime!r}"
        )
    if isinstance(lifetime, float) and not math.isfinite(lifetime):
        raise ConfigurationError(f"a lifetime must be finite; got {lifetime!r}")


def seconds_remaining(lifetime: Any, now: float | None = None) -> float | None:
    """Convert a lifetime to seconds from ``now`` (wall clock).

    :returns: ``None`` for "never expires"; otherwise the number of seconds the
        object has left, which is ``<= 0`` for an already expired lifetime.
    :raises ConfigurationError: for a value that is not a lifetime.
    """
    if lifetime is None:
        return None
    cls = type(lifetime)
    if cls is int or cls is float:
        return None if lifetime == 0 else float(lifetime) if math.isfinite(lifetime) else _bad(lifetime)
    if isinstance(lifetime, _dt.timedelta):
        seconds = lifetime.total_seconds()
        return None if seconds == 0 else seconds
    if isinstance(lifetime, _dt.datetime):
        # naive datetimes are local time: datetime.timestamp() reads them so
        return lifetime.timestamp() - (time.time() if now is None else now)
    validate_lifetime(lifetime)
    return None if lifetime == 0 else float(lifetime)  # int/float subclasses


def _bad(lifetime: Any) -> float:
    validate_lifetime(lifetime)
    raise AssertionError  # pragma: no cover - validate_lifetime raised


def expiry_timestamp(lifetime: Any, now: float | None = None) -> float | None:
    """Absolute wall-clock expiry (unix time) of a lifetime, ``None`` for never."""
    now = time.time() if now is None else now
    remaining = seconds_remaining(lifetime, now)
    return None if remaining is None else now + remaining


def memcache_expire(lifetime: Any, now: float | None = None) -> int | None:
    """Convert a lifetime to memcached's ``exptime`` argument.

    :returns: ``0`` for never; a relative whole number of seconds (rounded up,
        never down to 0) up to 30 days; an absolute unix time beyond that;
        ``None`` when the lifetime has already run out (store nothing).
    """
    now = time.time() if now is None else now
    remaining = seconds_remaining(lifetime, now)
    if remaining is None:
        return 0
    if remaining <= 0:
        return None
    whole = math.ceil(remaining)
    if whole <= MEMCACHE_RELATIVE_LIMIT:
        return whole
    return math.ceil(now + remaining)


class LifetimePolicy:
    """Decides the lifetime of each object in one store (see module docs for precedence)."""

    __slots__ = ("lifetime_cb", "_by_class", "_resolved", "_lock")

    def __init__(self, lifetime_cb: LifetimeCallback | None = None) -> None:
        if lifetime_cb is not None and not callable(lifetime_cb):
            raise ConfigurationError(f"lifetime_cb must be callable (obj -> lifetime); got {lifetime_cb!r}")
        self.lifetime_cb = lifetime_cb
        self._by_class: dict[type, Any] = {}
        self._resolved: dict[type, Any] = {}
        self._lock = threading.Lock()

    @property
    def trivial(self) -> bool:
        """True when no object can ever expire (no callback, nothing configured)."""
        return self.lifetime_cb is None and not self._by_class

    def configure(self, classes: Iterable[type], lifetime: Any) -> None:
        """Set the lifetime of instances of ``classes`` (and their subclasses)."""
        validate_lifetime(lifetime)
        if isinstance(classes, type):
            classes = [classes]
        classes = list(classes)
        for klass in classes:
            if not isinstance(klass, type):
                raise ConfigurationError(f"configure(classes=...) takes classes; got {klass!r}")
        with self._lock:
            for klass in classes:
                self._by_class[klass] = lifetime
            self._resolved = {}

    def lifetime_for(self, obj: object) -> Any:
        """The lifetime value that applies to ``obj`` (``None``: never expires)."""
        if self.lifetime_cb is not None:
            chosen = self.lifetime_cb(obj)
            if chosen is not None:
                validate_lifetime(chosen)
                return chosen
        if not self._by_class:
            return None
        klass = type(obj)
        try:
            return self._resolved[klass]
        except KeyError:
            pass
        found = None
        for base in klass.__mro__:
            if base in self._by_class:
                found = self._by_class[base]
                break
        self._resolved[klass] = found
        return found

    def expires_at(self, obj: object, clock: Callable[[], float] = time.monotonic) -> float | None:
        """Expiry of ``obj`` on ``clock`` (monotonic by default), ``None`` for never.

        Absolute datetimes are converted through the wall clock once, at put time.
        """
        lifetime = self.lifetime_for(obj)
        if lifetime is None:
            return None
        remaining = seconds_remaining(lifetime)
        return None if remaining is None else clock() + remaining
