"""One process of a fleet reading a key around the end of its lifetime, for tests/test_stale.py.

Run as ``python tests/support/stale_worker.py CONFIG`` where CONFIG is a JSON
object:

``kind``
    ``"memcache"`` (``address`` ``host:port``) or ``"redis"`` (``address`` a URL).
``database``, ``table``
    the SQLAlchemy URL and the table of the ``Product`` rows.
``namespace``
    the shared layer's namespace (the same in every process of one fleet).
``threads``, ``load``
    how many threads read, and how long one read of row 1 from the database
    takes (not while priming).
``lifetime``, ``l1_lifetime``
    the entries' lifetime in seconds in the shared layer, and in process
    memory (by default the same).
``stampede``
    keyword arguments of :class:`stockpyle.Stampede`.

The chain is ProcessMemoryStore -> the shared layer -> the (slow) database.
The process connects, warms up and prints ``{"ready": true}``, then obeys one
JSON command per line on stdin and answers each with one JSON line:

``{"op": "prime"}``
    read row 1 once, without the slow load (fills the caches); answers ``value``.
``{"op": "read", "at": T}``
    every thread reads row 1 once, at UNIX time ``T``.
``{"op": "steady", "at": T, "until": T2, "interval": S}``
    every thread reads row 1 from ``T`` to ``T2``, one read every ``S`` seconds.
``{"op": "quit"}``

``read`` and ``steady`` answer ``selects`` (SELECT statements sent meanwhile,
counted by a cursor listener), ``reads`` (one ``[thread, started, latency,
value]`` per read, times relative to ``T``), ``stats`` (the chain's lease and
refresh counters) and ``slow`` (reads the database took ``load`` for).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

# the script's own directory holds redis.py and memcached.py (fixtures), which would
# shadow the client libraries: run from the checkout's root instead
sys.path[0] = str(Path(__file__).resolve().parent.parent.parent)
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column  # noqa: E402

from stockpyle import ChainedStore, MemcacheStore, ProcessMemoryStore, RedisStore, Stampede  # noqa: E402
from stockpyle.stores.sqlalchemy import SqlAlchemyStore  # noqa: E402

CONFIG: dict[str, Any] = json.loads(sys.argv[1])
COUNTERS = ("leases_won", "leases_lost", "lease_waits", "lease_timeouts", "stale_served", "refreshes")


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = CONFIG["table"]
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(40))


SLOW = threading.Event()
SLOW_READS: list[float] = []


class SlowStore(SqlAlchemyStore):
    """The real database, each read of row 1 taking ``load`` seconds more (a heavy query) once SLOW is set."""

    def get(self, klass: Any, keydict: Any) -> Any:
        if keydict == {"id": 1} and SLOW.is_set():
            SLOW_READS.append(time.time())
            time.sleep(CONFIG["load"])
        return super().get(klass, keydict)


def shared_layer() -> Any:
    if CONFIG["kind"] == "memcache":
        return MemcacheStore([CONFIG["address"]], namespace=CONFIG["namespace"], connect_timeout=0.3, timeout=1.0)
    return RedisStore(CONFIG["address"], namespace=CONFIG["namespace"], connect_timeout=0.3, socket_timeout=1.0)


def run(chain: Any, command: dict[str, Any], selects: list[str]) -> dict[str, Any]:
    """One ``read`` or ``steady`` command: what the threads read."""
    op = command["op"]
    SLOW.set()
    selects.clear()
    SLOW_READS.clear()
    chain.reset_stats()
    at = float(command["at"])
    reads: list[list[Any]] = []
    lock = threading.Lock()

    def read(thread: int) -> None:
        began = time.time()
        try:
            found: Any = chain.get(Product, {"id": 1})
            value: Any = None if found is None else found.name
        except Exception as exc:  # noqa: BLE001  # reported: the test fails on it
            value = f"error: {exc!r}"
        ended = time.time()
        with lock:
            reads.append([thread, began - at, ended - began, value])

    def until(moment: float) -> None:
        while time.time() < moment:
            time.sleep(min(0.0005, max(0.0, moment - time.time())))

    def one(thread: int) -> None:
        until(at)
        if op == "read":
            read(thread)
            return
        interval = float(command["interval"])
        step = at
        while step < float(command["until"]):
            until(step)
            read(thread)
            step += interval

    workers = [threading.Thread(target=one, args=(n,)) for n in range(CONFIG["threads"])]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stats = chain.stats()
    return {
        "selects": len(selects),
        "slow": [moment - at for moment in SLOW_READS],
        "reads": reads,
        "stats": {name: getattr(stats, name) for name in COUNTERS},
    }


def main() -> None:
    engine = sa.create_engine(CONFIG["database"], pool_size=CONFIG["threads"] + 2)
    selects: list[str] = []
    memory, shared = ProcessMemoryStore(), shared_layer()
    chain = ChainedStore([memory, shared, SlowStore(engine=engine)], stampede=Stampede(**CONFIG["stampede"]), bus=None)
    memory.configure([Product], CONFIG.get("l1_lifetime", CONFIG["lifetime"]))
    shared.configure([Product], CONFIG["lifetime"])
    chain.get(Product, {"id": 2})  # warm-up: connections, class generations

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        op = command["op"]
        if op == "quit":
            break
        if op == "prime":
            SLOW.clear()
            found = chain.get(Product, {"id": 1})
            print(json.dumps({"value": None if found is None else found.name}), flush=True)
            continue
        answer = run(chain, command, selects)
        print(json.dumps(answer), flush=True)
    chain.release()
    engine.dispose()


if __name__ == "__main__":
    main()
