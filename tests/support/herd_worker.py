"""One process of a fleet missing one cold key at once, for tests/test_chain_leases.py.

Run as ``python tests/support/herd_worker.py CONFIG`` where CONFIG is a JSON
object:

``kind``
    ``"memcache"`` (``address`` ``host:port``) or ``"redis"`` (``address`` a URL).
``database``, ``table``
    the SQLAlchemy URL and the table of the ``Product`` rows (``get`` mode).
``namespace``
    the shared layer's namespace (the same in every process of one fleet).
``threads``, ``load``
    how many threads miss the key, and how long one read of the database takes.
``stampede``
    keyword arguments of :class:`stockpyle.Stampede`.
``mode``
    ``"get"``: ``chain.get(Product, {"id": 1})`` over ProcessMemoryStore,
    the shared layer and the (slow) database; ``"create"``:
    ``chain.get_or_create(Product, {"id": 1}, creator)`` over the two caches,
    the creator taking ``load`` seconds.

The process connects and warms up (class generations learnt, one read of
another row), prints ``{"ready": true}``, then reads one line from stdin: the
UNIX time at which every thread of every process misses the key.  It answers
one JSON line: ``selects`` (SELECT statements this process sent, counted by a
cursor listener), ``created`` (creator calls), ``latencies`` (seconds from
the common start to each thread's answer), ``values`` (what each thread got)
and ``stats`` (the chain's lease counters).
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


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = CONFIG["table"]
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(40))


class SlowStore(SqlAlchemyStore):
    """The real database, each read taking ``load`` seconds more (a heavy query)."""

    def get(self, klass: Any, keydict: Any) -> Any:
        if keydict == {"id": 1}:
            time.sleep(CONFIG["load"])
        return super().get(klass, keydict)


def shared_layer() -> Any:
    if CONFIG["kind"] == "memcache":
        return MemcacheStore([CONFIG["address"]], namespace=CONFIG["namespace"], connect_timeout=0.3, timeout=1.0)
    return RedisStore(CONFIG["address"], namespace=CONFIG["namespace"], connect_timeout=0.3, socket_timeout=1.0)


def main() -> None:
    engine = sa.create_engine(CONFIG["database"], pool_size=CONFIG["threads"] + 2)
    selects: list[str] = []
    created: list[int] = []
    policy = Stampede(**CONFIG["stampede"])

    def creator() -> Product:
        created.append(1)
        time.sleep(CONFIG["load"])
        return Product(id=1, name="made")

    if CONFIG["mode"] == "get":
        chain = ChainedStore(
            [ProcessMemoryStore(), shared_layer(), SlowStore(engine=engine)], stampede=policy, bus=None
        )
        chain.get(Product, {"id": 2})  # warm-up: connections, class generations
    else:
        chain = ChainedStore([ProcessMemoryStore(), shared_layer()], stampede=policy, bus=None)
        chain.get(Product, {"id": 2})

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            selects.append(statement)

    sa.event.listen(engine, "before_cursor_execute", count)
    chain.reset_stats()  # the warm-up's counters are not the herd's
    print(json.dumps({"ready": True}), flush=True)
    at = float(sys.stdin.readline())
    latencies: list[float] = []
    values: list[Any] = []
    lock = threading.Lock()

    def one() -> None:
        while time.time() < at:
            time.sleep(0.0005)
        try:
            if CONFIG["mode"] == "get":
                found: Any = chain.get(Product, {"id": 1})
            else:
                found = chain.get_or_create(Product, {"id": 1}, creator)
            value: Any = None if found is None else found.name
        except Exception as exc:  # noqa: BLE001  # reported: the test fails on it
            value = f"error: {exc!r}"
        with lock:
            latencies.append(time.time() - at)
            values.append(value)

    workers = [threading.Thread(target=one) for _ in range(CONFIG["threads"])]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stats = chain.stats()
    print(
        json.dumps(
            {
                "selects": len(selects),
                "created": len(created),
                "latencies": latencies,
                "values": values,
                "stats": {
                    name: getattr(stats, name)
                    for name in ("leases_won", "leases_lost", "lease_waits", "lease_timeouts")
                },
            }
        ),
        flush=True,
    )
    chain.release()
    engine.dispose()


if __name__ == "__main__":
    main()
