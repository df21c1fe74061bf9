"""Invalidation buses: in-process layers kept coherent across processes.

A :class:`~stockpyle.ChainedStore` with ``bus=`` publishes, after every write
has reached its shared layers, the digests of the keys it wrote
(:func:`key_digest`); every process subscribed to the same bus drops those
keys from its in-process layers.  The guarantee does not rest on messages
arriving: an in-process entry is served only while the bus is *trusted*, that
is while the process heard from it (a message or a heartbeat) within
``max_staleness`` seconds -- :attr:`InvalidationBus.trusted_until`.  When the
bus falls silent (partition, frozen server, lost connection) the chain stops
reading its in-process layers; when a bus detects that it lost messages (a
sequence gap, a new epoch), it asks its listeners to flush them.

This module holds what every bus shares: the protocol a chain relies on
(:class:`InvalidationBus`, :class:`BusListener`), the key digests, and the
statistics.  The buses themselves are :class:`RedisStreamBus`,
:class:`PostgresNotifyBus` and :class:`MemcacheEpochBus`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..keys import Key, class_name, encode_key
from ..stats import Latency

__all__ = ["BusListener", "BusStats", "InvalidationBus", "class_digest", "key_digest"]

#: Hex digits of a key digest (16 bytes: collisions are negligible, and a
#: collision only invalidates one more entry).
DIGEST_SIZE = 16


def key_digest(key: Key) -> str:
    """The process-independent name of one stockpyle key on a bus (32 hex digits)."""
    return hashlib.blake2b(encode_key(key).encode("utf-8"), digest_size=DIGEST_SIZE).hexdigest()


def class_digest(klass: type) -> str:
    """The name on a bus of "every entry of this class" (for class-wide invalidations)."""
    return hashlib.blake2b(f"class:{class_name(klass)}".encode(), digest_size=DIGEST_SIZE).hexdigest()


@runtime_checkable
class BusListener(Protocol):
    """What a bus calls in each subscribed process (from its listener thread)."""

    def invalidate(self, digests: Sequence[str], origin: str | None = None) -> None:
        """Drop the entries under these key digests from the in-process layers.

        :param origin: the ``origin`` the message was published with (a
            publisher that already brought its own layers up to date skips its
            own messages), or ``None`` when unknown.
        """
        ...

    def flush(self) -> None:
        """Drop every entry of the in-process layers: messages were lost."""
        ...


@dataclass
class BusStats:
    """What one bus did in this process.

    :ivar published: messages this process published.
    :ivar publish_errors: publications that failed (the bus could not be reached).
    :ivar messages: messages heard (this process's own included).
    :ivar heartbeats: signs of life heard without a message.
    :ivar gaps: times lost messages were detected (each flushed the listeners).
    :ivar flushes: flushes asked of the listeners (gaps, reconnections).
    :ivar trusted_seconds: time the bus was trusted, of ``observed_seconds``.
    :ivar observed_seconds: time since the bus started listening.
    :ivar lag: sampled delay between a message's send time and its delivery here.
    """

    published: int = 0
    publish_errors: int = 0
    messages: int = 0
    heartbeats: int = 0
    gaps: int = 0
    flushes: int = 0
    trusted_seconds: float = 0.0
    observed_seconds: float = 0.0
    lag: Latency = field(default_factory=Latency, repr=False, compare=False)

    @property
    def trusted_share(self) -> float:
        """The share of the observed time the bus was trusted (1.0 before any observation)."""
        return self.trusted_seconds / self.observed_seconds if self.observed_seconds else 1.0

    def as_dict(self) -> dict[str, Any]:
        """The counters as plain data (``lag`` as its summary)."""
        return {
            "published": self.published,
            "publish_errors": self.publish_errors,
            "messages": self.messages,
            "heartbeats": self.heartbeats,
            "gaps": self.gaps,
            "flushes": self.flushes,
            "trusted_share": self.trusted_share,
            "lag": self.lag.summary().as_dict(),
        }


@runtime_checkable
class InvalidationBus(Protocol):
    """What a :class:`~stockpyle.ChainedStore` needs of a bus.

    :ivar max_staleness: seconds an in-process entry may be served after the
        process last heard from the bus.
    :ivar trusted_until: :func:`time.monotonic` time until which in-process
        entries may be served (the chain compares it on its hit path).  It is
        ``0.0`` until the bus first hears from its server.
    """

    max_staleness: float
    trusted_until: float

    def publish(self, digests: Sequence[str], origin: str | None = None) -> None:
        """Send one invalidation of these key digests to every subscribed process.

        Called after the shared layers were written, so that a process that
        drops its copy and reads again finds the new value.

        :param origin: an id of the publisher, handed back to every listener
            with the message.
        :raises StoreError: when the bus cannot be reached (the chain retries).
        """
        ...

    def subscribe(self, listener: BusListener) -> None:
        """Deliver every invalidation heard to ``listener``; starts listening (again after a fork)."""
        ...

    def unsubscribe(self, listener: BusListener) -> None:
        """Stop delivering to ``listener``."""
        ...

    def stats(self) -> BusStats:
        """This process's counters of the bus."""
        ...

    def release(self) -> None:
        """Stop listening and close connections (listening starts again on the next subscribe)."""
        ...
