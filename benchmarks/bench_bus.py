"""Invalidation buses: the staleness window per bus, and the chain's hit path with and without a bus.

Run: ``python benchmarks/bench_bus.py [--quick] [--plot PATH]``.  Needs
Redis (``STOCKPYLE_REDIS_URL``, default ``redis://127.0.0.1:6379/0``; a
private stream, deleted afterwards), PostgreSQL (``STOCKPYLE_POSTGRES_URL``)
and the memcached binary (a private server); a bus whose server is missing is
skipped with a note.

**Staleness.** A writer bus and a reader bus (one process, two connections
each, the reader's own listener thread) exchange ``writes`` invalidations.
For each one, the staleness window is the time from the moment the writer's
``publish`` returned -- the moment a chain's ``put`` returns -- until the
reader can no longer serve its old copy: the delivery of the invalidation, or
the end of the reader's trust if that came first.  The suite reports its
median, p99 and maximum against ``max_staleness``.

**Hit path.** ``ChainedStore([ProcessMemoryStore(), shared], bus=bus).get`` of
an in-process hit against the same chain without a bus, interleaved (see
``_timing.py``); the issue's target is a ratio of at most 1.05.  Measured only
once ``ChainedStore`` takes ``bus=``.

``--plot PATH`` draws the staleness distributions (a CDF per bus) with
matplotlib (``pip install stockpyle[bench]``).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import MemcachedMissing, Row, Suite, interleaved, memcached, postgres_url, print_suite

REDIS_URL = os.environ.get("STOCKPYLE_REDIS_URL", "redis://127.0.0.1:6379/0")


class Item:
    __stockpyle_keys__ = ("id",)

    def __init__(self, id: int) -> None:
        self.id = id


class _Watcher:
    """A reader's listener: when each digest arrived."""

    def __init__(self) -> None:
        self.arrived: dict[str, float] = {}
        self.event = threading.Event()

    def invalidate(self, digests: Sequence[str], origin: str | None = None) -> None:
        now = time.monotonic()
        for digest in digests:
            self.arrived.setdefault(digest, now)
        self.event.set()

    def flush(self) -> None:
        pass


def staleness_windows(make: Callable[[], Any], writes: int, pause: float) -> tuple[list[float], Any]:
    """Seconds each write could still be served stale by the reader (see the module docs)."""
    import hashlib

    writer, reader = make(), make()
    watcher = _Watcher()
    reader.subscribe(watcher)
    try:
        deadline = time.monotonic() + 10
        while reader.trusted_until <= time.monotonic():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{reader!r} was never trusted")
            time.sleep(0.01)
        sent: list[tuple[str, float, float]] = []
        for n in range(writes):
            digest = hashlib.blake2b(f"bench:{n}".encode(), digest_size=16).hexdigest()
            writer.publish([digest])
            sent.append((digest, time.monotonic(), reader.trusted_until))
            time.sleep(random.uniform(0, 2 * pause))  # an open loop: writes are not aligned with polls
        limit = time.monotonic() + 5
        while len(watcher.arrived) < writes and time.monotonic() < limit:
            watcher.event.wait(0.05)
            watcher.event.clear()
        windows = []
        for digest, returned, trusted_then in sent:
            arrived = watcher.arrived.get(digest, limit)
            # served stale until the delivery, or until the trust held at publication ran out
            windows.append(max(0.0, min(arrived, max(trusted_then, returned)) - returned))
        return windows, reader.stats()
    finally:
        writer.release()
        reader.release()


def percentile(data: Sequence[float], share: float) -> float:
    ordered = sorted(data)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


@contextlib.contextmanager
def buses(suite: Suite) -> Iterator[dict[str, Callable[[], Any]]]:
    """Factories of the buses whose servers are reachable (notes for the others)."""
    from stockpyle.bus import MemcacheEpochBus, PostgresNotifyBus, RedisStreamBus

    tag = "bench" + uuid.uuid4().hex[:8]
    found: dict[str, Callable[[], Any]] = {}
    stack = contextlib.ExitStack()
    with stack:
        try:
            import redis

            client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
            client.ping()
            stack.callback(client.close)
            stack.callback(client.delete, f"{tag}:bus")
            found["RedisStreamBus"] = lambda: RedisStreamBus(REDIS_URL, stream=f"{tag}:bus")
        except Exception as exc:  # noqa: BLE001 - no Redis: a note
            suite.notes.append(f"Redis unreachable ({exc}): RedisStreamBus skipped")
        try:
            import psycopg

            psycopg.connect(postgres_url().replace("+psycopg", ""), connect_timeout=2).close()
            found["PostgresNotifyBus"] = lambda: PostgresNotifyBus(postgres_url(), channel=f"stockpyle_{tag}")
        except Exception as exc:  # noqa: BLE001 - no PostgreSQL: a note
            suite.notes.append(f"PostgreSQL unreachable ({exc}): PostgresNotifyBus skipped")
        try:
            address = stack.enter_context(memcached())
            found["MemcacheEpochBus"] = lambda: MemcacheEpochBus(address, namespace=tag)
        except MemcachedMissing as exc:
            suite.notes.append(f"{exc}: MemcacheEpochBus skipped")
        yield found


def hit_path(suite: Suite, make_bus: Callable[[], Any], quick: bool) -> None:
    from stockpyle import ChainedStore, ProcessMemoryStore

    if "bus" not in inspect.signature(ChainedStore).parameters:
        suite.notes.append("ChainedStore does not take bus= yet: the hit-path row is not measured")
        return
    bus = make_bus()
    try:
        shared = ProcessMemoryStore()  # the shared layer is never reached by a hit
        plain = ChainedStore([ProcessMemoryStore(), shared])
        with_bus = ChainedStore([ProcessMemoryStore(), shared], bus=bus)  # type: ignore[call-arg]
        deadline = time.monotonic() + 10
        while bus.trusted_until <= time.monotonic() and time.monotonic() < deadline:
            time.sleep(0.01)
        # only now: a bus flushes the in-process layers when it starts listening (it cannot know what it
        # missed before), and the "shared" layer here is in-process too, so an earlier put would be gone
        flushes = with_bus.stats().flushes
        for chain in (plain, with_bus):
            chain.put(Item(1))
        key = {"id": 1}
        results = interleaved(
            [("get, chain without a bus", lambda: plain.get(Item, key)),
             ("get, chain with a bus", lambda: with_bus.get(Item, key))],
            number=2_000 if quick else 20_000, rounds=5 if quick else 15,
        )  # fmt: skip
        refused = with_bus.stats().fills_refused
        if with_bus.stats().flushes != flushes or not with_bus.stats()[0].hits:
            suite.notes.append("L1 hit with a bus: the bus flushed process memory during the run: not a hit path")
        suite.compare(results, "get, chain with a bus", "get, chain without a bus", label="L1 hit with a bus",
                      target="<= 1.05")  # fmt: skip
        if refused:
            # the bus was not trusted for part of the run: those gets bypassed process memory
            suite.notes.append(f"L1 hit with a bus: {refused} gets found the bus untrusted and read the shared layer")
        with_bus.release()
        plain.release()
    finally:
        bus.release()


def run(*, quick: bool = False, plot: str | None = None) -> Suite:
    suite = Suite("bus")
    writes = 100 if quick else 1000
    distributions: dict[str, list[float]] = {}
    with buses(suite) as found:
        for name, make in found.items():
            windows, stats = staleness_windows(make, writes, pause=0.002)
            distributions[name] = windows
            probe = make()
            bound = probe.max_staleness
            probe.release()
            for label, value in (("median", statistics.median(windows)), ("p99", percentile(windows, 0.99)),
                                 ("max", max(windows))):  # fmt: skip
                suite.rows.append(Row(suite.name, f"{name} staleness {label}", value * 1e9, "max_staleness",
                                      bound * 1e9, value / bound, "<= 1.0"))  # fmt: skip
            suite.notes.append(
                f"{name}: {writes} writes, gaps {stats.gaps}, trusted {stats.trusted_share:.3f} of the time, "
                f"{stats.heartbeats} heartbeats"
            )
        first = next(iter(found.values()), None)
        if first is not None:
            hit_path(suite, first, quick)
    if plot and distributions:
        draw(distributions, plot)
        suite.notes.append(f"plot written to {plot}")
    return suite


def draw(distributions: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, windows in distributions.items():
        ordered = sorted(w * 1000 for w in windows)
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("staleness window after put returned (ms)")
    ax.set_ylabel("share of writes")
    ax.set_title("Invalidation buses: how long a stale in-process copy can be served")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="100 writes per bus instead of 1,000")
    parser.add_argument("--plot", metavar="PATH", help="write a CDF of the staleness windows (PNG)")
    args = parser.parse_args()
    print_suite(run(quick=args.quick, plot=args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
