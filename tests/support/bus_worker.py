"""A writer or reader process of the cross-process coherence tests (``python -m support.bus_worker SPEC``).

``SPEC`` is JSON: ``{"role": "writer"|"reader", "bus": {"cls": ..., "kwargs": ...},
"shared": {"servers": [...], "namespace": ...}, "impl": "mini"|"chain",
"key": int, "writes": int, "interval": float}``.

Both build the same two-layer cache: an in-process layer above a shared
:class:`~stockpyle.stores.MemcacheStore`, kept coherent by the bus -- either
``ChainedStore([ProcessMemoryStore(), shared], bus=bus)`` (``impl="chain"``)
or :class:`MiniChain` (``impl="mini"``), the smallest cache that follows the
bus contract (serve the in-process copy only while ``now < bus.trusted_until``,
drop keys on ``invalidate``, everything on ``flush``, never install a fill
that an invalidation overtook).

The writer puts ``BusCounter(key, v)`` for ``v = 1..writes`` and prints, per
write, ``W v t`` with the :func:`time.monotonic` time its put returned (the
system-wide clock on Linux: comparable between processes).  A reader prints
``READY <bus.sender> <connection name>`` once its bus is trusted, then reads
the key in a loop until its standard input closes, and prints its reads as
``R [[t, v], ...]`` (``t``: when the read started) and its bus statistics as
``S {...}``.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

import stockpyle.bus
from stockpyle.bus import key_digest
from stockpyle.keys import lookup_key, object_keys
from support.buses import BusCounter


class MiniChain:
    """An in-process dict above a shared store, coherent through a bus (see the module docs)."""

    def __init__(self, shared: Any, bus: Any) -> None:
        self.shared = shared
        self.bus = bus
        self.local: dict[str, Any] = {}
        self.generation = 0
        self.lock = threading.Lock()
        bus.subscribe(self)

    def invalidate(self, digests: Any, origin: str | None = None) -> None:
        with self.lock:
            self.generation += 1
            for digest in digests:
                self.local.pop(digest, None)

    def flush(self) -> None:
        with self.lock:
            self.generation += 1
            self.local.clear()

    def get(self, klass: type, keydict: dict[str, Any]) -> Any:
        digest = key_digest(lookup_key(klass, keydict))
        if time.monotonic() < self.bus.trusted_until:
            hit = self.local.get(digest)
            if hit is not None:
                return hit
        generation = self.generation
        obj = self.shared.get(klass, keydict)
        with self.lock:
            if obj is not None and generation == self.generation:
                self.local[digest] = obj
        return obj

    def put(self, obj: Any) -> None:
        self.shared.put(obj)
        self.bus.publish([key_digest(key) for key in object_keys(obj)])

    def release(self) -> None:
        self.bus.release()
        self.shared.release()


def build(spec: dict[str, Any]) -> tuple[Any, Any]:
    from stockpyle.stores import MemcacheStore

    bus = getattr(stockpyle.bus, spec["bus"]["cls"])(**spec["bus"]["kwargs"])
    shared = MemcacheStore(**spec["shared"])
    if spec["impl"] == "chain":
        from stockpyle import ChainedStore, ProcessMemoryStore

        return ChainedStore([ProcessMemoryStore(), shared], bus=bus), bus  # type: ignore[call-arg]
    return MiniChain(shared, bus), bus


def retry(fn: Any, *args: Any) -> None:
    """``fn(*args)`` until it succeeds (the servers may be frozen or restarting)."""
    while True:
        try:
            fn(*args)
            return
        except Exception:  # noqa: BLE001 - an outage: try again
            time.sleep(0.01)


def writer(spec: dict[str, Any]) -> None:
    cache, _bus = build(spec)
    for value in range(1, spec["writes"] + 1):
        retry(cache.put, BusCounter(spec["key"], value))
        print("W", value, repr(time.monotonic()), flush=True)
        time.sleep(spec["interval"])
    cache.release()
    print("DONE", flush=True)


def reader(spec: dict[str, Any]) -> None:
    cache, bus = build(spec)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    while not bus.trusted_until > time.monotonic():
        cache.get(BusCounter, {"id": spec["key"]})
        time.sleep(0.005)
    name = getattr(bus, "client_name", None) or getattr(bus, "application_name", None) or "-"
    print("READY", bus.sender, name, flush=True)
    reads: list[tuple[float, int]] = []
    while not stop.is_set():
        started = time.monotonic()
        try:
            obj = cache.get(BusCounter, {"id": spec["key"]})
        except Exception:  # noqa: BLE001 - a frozen shared layer: no read to judge
            continue
        if obj is not None:
            reads.append((started, obj.value))
        time.sleep(0.001)
    stats = bus.stats()
    cache.release()
    print("R", json.dumps(reads), flush=True)
    print("S", json.dumps({"gaps": stats.gaps, "flushes": stats.flushes, "messages": stats.messages,
                           "trusted_share": stats.trusted_share}), flush=True)  # fmt: skip


if __name__ == "__main__":
    SPEC = json.loads(sys.argv[1])
    (writer if SPEC["role"] == "writer" else reader)(SPEC)
