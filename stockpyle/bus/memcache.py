"""An invalidation bus for memcached-only deployments: :class:`MemcacheEpochBus`.

memcached pushes nothing, so every process polls.  The bus keeps, in
memcached, a *sequence counter* and a *ring* of ``ring`` slots:

* publishing takes the next sequence number with ``incr`` (the counter is
  created with ``add``, at a random starting value, by the first listener or
  publisher that finds it missing) and
  writes the message into slot ``seq % ring``: the sequence number, the sender
  id, the send time and the key digests;
* every process polls once per ``interval`` with one multi-get of the counter
  and of the slots it has not seen yet, and delivers the messages in order.

Lost messages are detected, never guessed: a slot that holds a *later*
sequence number was overwritten (the process fell ``ring`` messages behind), a
slot that stays missing or old for longer than ``max_staleness`` was evicted
or its publisher died between ``incr`` and ``set``, a counter that vanished or
went back means memcached restarted or evicted it (a new epoch: the random
starting value makes an old sequence number meaningless).  Each of these is a
gap: the listeners are flushed.

Staleness: a poll sent at ``t`` that found every slot up to the counter proves
that every message published before ``t`` was delivered, so trust runs until
``t + max_staleness`` with::

    max_staleness = interval + timeout

where ``timeout`` is the socket timeout of one poll (default: ``interval``;
publications use connections of their own, with a timeout of at least 0.5 s).
A poll is sent every ``interval``; as long as each one is answered within
``timeout`` the bus stays trusted without a gap, and a frozen server stops
the trust ``max_staleness`` after the last answered poll.  The cost is one
multi-get per process per ``interval`` (ten a second at the default 0.1 s),
whether or not anything is published, plus an ``incr`` and a ``set`` per
publication.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any, Final

from ..exceptions import ConfigurationError, StoreError
from ..stores.drivers.pymemcache import (
    PymemcacheDriver,
    build_client,
    error_table,
    import_pymemcache,
    normalize_servers,
)
from ._base import ListeningBus, Message, call_quietly, positive_seconds

__all__ = ["DEFAULT_SERVER", "MemcacheEpochBus"]

DEFAULT_SERVER: Final = "127.0.0.1:11211"
#: Digests per slot (a larger publication takes several sequence numbers).
_DIGESTS_PER_SLOT: Final = 8192
#: Slots read speculatively with the counter, at least and at most.
_WINDOW_MIN: Final = 8
_WINDOW_MAX: Final = 512
_NAMESPACE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
#: The shortest socket timeout of a publication, seconds.
_PUBLISH_TIMEOUT: Final = 0.5
#: Counters start at a random value below this (memcached counters are 64-bit).
_START_LIMIT: Final = 2**62


class MemcacheEpochBus(ListeningBus):
    """Invalidations through a counter and a ring of slots in memcached, polled by every process.

    :param servers: ``"host:port"`` or a list of them (default
        ``127.0.0.1:11211``); several servers use pinned rendezvous hashing,
        like :class:`~stockpyle.stores.MemcacheStore`.
    :param store: a :class:`~stockpyle.stores.MemcacheStore` whose servers the
        bus uses (with connections of its own, so that polls keep their own
        timeout; a store built with ``client=`` lends its driver instead).
    :param interval: seconds between two polls of one process.
    :param ring: slots in the ring: a process that falls this many messages
        behind detects a gap.
    :param namespace: prefix of the bus's memcached keys (processes that share
        it share the bus).
    :param timeout: socket timeout of one poll (default: ``interval``);
        ``max_staleness`` is ``interval + timeout``.
    :param connect_timeout: timeout of connecting.
    :raises ConfigurationError: for bad arguments.
    :raises ImportError: without pymemcache (``pip install stockpyle[memcache]``).
    """

    kind = "memcache"

    def __init__(
        self,
        servers: Sequence[str | tuple[str, int]] | str | None = None,
        *,
        store: Any = None,
        interval: float = 0.1,
        ring: int = 4096,
        namespace: str = "stockpyle",
        timeout: float | None = None,
        connect_timeout: float = 0.25,
    ) -> None:
        import_pymemcache()
        owner = type(self).__name__
        if servers is not None and store is not None:
            raise ConfigurationError(f"{owner} takes servers= or store=, not both")
        interval = positive_seconds(owner, "interval", interval)
        timeout = interval if timeout is None else positive_seconds(owner, "timeout", timeout)
        connect_timeout = positive_seconds(owner, "connect_timeout", connect_timeout)
        if isinstance(ring, bool) or not isinstance(ring, int) or ring < 2:
            raise ConfigurationError(f"{owner} ring must be a number of slots of at least 2; got {ring!r}")
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ConfigurationError(
                f"{owner} namespace must be 1-100 characters of letters, digits and _.:-; got {namespace!r}"
            )
        driver: PymemcacheDriver | None = None
        if store is not None:
            from ..stores.memcache import MemcacheStore

            if not isinstance(store, MemcacheStore):
                raise ConfigurationError(f"{owner}(store=...) needs a MemcacheStore; got {type(store).__name__}")
            if store.servers is not None:
                servers = store.servers
            else:
                lent = store.driver
                if not isinstance(lent, PymemcacheDriver):  # pragma: no cover - MemcacheStore always has one
                    raise ConfigurationError(f"{owner}(store=...) needs a store on the pymemcache driver")
                driver = lent
                timeout = float(getattr(store.client, "timeout", None) or timeout)
        super().__init__(max_staleness=interval + timeout)
        self.errors = error_table()
        self.interval = interval
        self.timeout = timeout
        self.ring = ring
        self.namespace = namespace
        self._owns_driver = driver is None
        if driver is None:
            specs = normalize_servers(servers if servers is not None else DEFAULT_SERVER)
            names = [s if isinstance(s, str) else f"{s[0]}:{s[1]}" for s in specs]
            client = build_client(specs, connect_timeout=connect_timeout, timeout=timeout, max_pool_size=None)
            driver = PymemcacheDriver(client, servers=names)
            # publications are writes the chain waits for: they keep a timeout of their own
            sender = build_client(specs, connect_timeout=connect_timeout, timeout=max(timeout, _PUBLISH_TIMEOUT),
                                  max_pool_size=None)  # fmt: skip
            self._sender: PymemcacheDriver = PymemcacheDriver(sender, servers=names)
        else:
            self._sender = driver
        #: the driver of the polls (``timeout`` bounds each of their round trips)
        self.driver: PymemcacheDriver = driver
        self._counter_key = f"{namespace}:bus:n"
        self._forever = driver.ttl(None)
        self._expected: int | None = None  # the next sequence number to deliver
        self._pending: dict[int, float] = {}  # missing slots: when first seen missing
        self._window = _WINDOW_MIN
        self._next_poll = 0.0

    def describe(self) -> str:
        return f"memcached {self.driver.describe()} namespace {self.namespace!r}"

    def slot_key(self, seq: int) -> str:
        """The memcached key of the slot that holds message ``seq``."""
        return f"{self.namespace}:bus:{seq % self.ring}"

    @property
    def counter_key(self) -> str:
        """The memcached key of the sequence counter."""
        return self._counter_key

    # -- publishing ---------------------------------------------------------

    def _send(self, digests: tuple[str, ...], origin: str | None, sent: float) -> None:
        chunks = [digests[i : i + _DIGESTS_PER_SLOT] for i in range(0, len(digests), _DIGESTS_PER_SLOT)]
        last = self._sender.incr(self._counter_key, len(chunks))
        if last is None:
            self._create_counter(self._sender)
            last = self._sender.incr(self._counter_key, len(chunks))
            if last is None:
                raise StoreError(f"memcached ({self._sender.describe()}) keeps no counter under {self._counter_key!r}")
        first = last - len(chunks) + 1
        items = {}
        for seq, chunk in enumerate(chunks, first):
            body = {"s": seq, "p": self.sender, "o": origin, "t": sent, "d": "".join(chunk)}
            items[self.slot_key(seq)] = json.dumps(body, separators=(",", ":")).encode()
        self._sender.set_many(items, self._forever)

    def _close_publisher(self) -> None:
        if self._owns_driver:
            call_quietly(self._sender.close)
            call_quietly(self.driver.close)

    # -- listening ----------------------------------------------------------

    def _counter(self, found: dict[str, bytes] | Any) -> int | None:
        raw = found.get(self._counter_key)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            raise StoreError(f"memcached key {self._counter_key!r} holds no counter: {raw[:40]!r}") from None

    def _connect_listener(self) -> bool:
        self._next_poll = time.monotonic()
        if self._expected is not None and self._connections:
            return True  # a failed poll loses nothing: the ring tells what was missed
        self._pending.clear()
        counter = self._counter(self.driver.get_many([self._counter_key]))
        if counter is None:  # no message yet: start the counter, so that the first one is no gap
            self._create_counter()
            counter = self._counter(self.driver.get_many([self._counter_key]))
        self._expected = None if counter is None else counter + 1
        return False

    def _create_counter(self, driver: PymemcacheDriver | None = None) -> None:
        """Create the counter at a random value (a no-op when another process was first)."""
        start = str(secrets.randbelow(_START_LIMIT)).encode()
        (driver or self.driver).add_many({self._counter_key: start}, self._forever)

    def _listen_once(self, stop: threading.Event) -> None:
        delay = self._next_poll - time.monotonic()
        if delay > 0 and stop.wait(delay):
            return
        polled_at = time.monotonic()
        self._next_poll = polled_at + self.interval
        self._poll(polled_at)

    def _poll(self, polled_at: float) -> None:
        expected = self._expected
        window = range(expected, expected + self._window) if expected is not None else range(0)
        keys = [self._counter_key, *(self.slot_key(seq) for seq in window)]
        found = dict(self.driver.get_many(keys))
        counter = self._counter(found)
        if counter is None:
            if expected is not None:
                self._restart(None, "the sequence counter vanished (memcached restarted or evicted it)")
            self._create_counter()  # and start from it, so that the next message is no gap
            created = self._counter(self.driver.get_many([self._counter_key]))
            self._expected = None if created is None else created + 1
            self._heard((), polled_at)  # nothing was published since: a publisher would have created it
            return
        if expected is None:
            self._restart(counter, "the sequence counter appeared: messages before it are unknown")
            self._heard((), polled_at)
            return
        if counter < expected - 1:
            self._restart(counter, f"the sequence counter went back from {expected - 1} to {counter} (a new epoch)")
            self._heard((), polled_at)
            return
        if counter - expected + 1 > self.ring:
            self._restart(counter, f"{counter - expected + 1} messages arrived, more than the ring holds")
            self._heard((), polled_at)
            return
        if counter >= expected + self._window:
            rest = [self.slot_key(seq) for seq in range(expected + self._window, counter + 1)]
            found.update(self.driver.get_many(rest))
        messages: list[Message] = []
        for seq in range(expected, counter + 1):
            message, later = self._slot(found.get(self.slot_key(seq)), seq)
            if message is not None:
                messages.append(message)
                continue
            if later:
                self._restart(counter, f"slot of message {seq} was overwritten: more than {self.ring} behind")
                self._heard((), polled_at)
                return
            first_seen = self._pending.setdefault(seq, polled_at)
            if polled_at - first_seen > self.max_staleness:
                self._restart(counter, f"message {seq} is missing from its slot (evicted, or its publisher failed)")
                self._heard((), polled_at)
                return
            # not written yet (its publisher is between incr and set): deliver up to it, no evidence past it
            self._expected = seq
            self._heard(messages, None)
            return
        self._pending.clear()
        self._expected = counter + 1
        self._window = max(_WINDOW_MIN, min(_WINDOW_MAX, 2 * len(messages)))
        self._heard(messages, polled_at)

    def _slot(self, raw: bytes | None, seq: int) -> tuple[Message | None, bool]:
        """The message in a slot if it is message ``seq``; else whether the slot holds a later one."""
        if raw is None:
            return None, False
        try:
            body = json.loads(raw)
            found = int(body["s"])
        except (ValueError, KeyError, TypeError):
            return None, True  # not ours: treat as overwritten
        if found != seq:
            return None, found > seq
        digests_text = str(body.get("d") or "")
        digests = tuple(digests_text[i : i + 32] for i in range(0, len(digests_text), 32))
        origin = body.get("o")
        sender, sent = str(body.get("p")), float(body["t"])
        return Message(digests, origin if isinstance(origin, str) else None, sender, sent), False

    def _restart(self, counter: int | None, why: str) -> None:
        self._gap(why)
        self._pending.clear()
        self._expected = None if counter is None else counter + 1

    def _abandon_connections(self) -> None:
        # pymemcache is not fork-aware: the child closes its copies of the
        # sockets (a plain close, nothing is sent) and reconnects on use
        call_quietly(self.driver.close)
        if self._sender is not self.driver:
            call_quietly(self._sender.close)
