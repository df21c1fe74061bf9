"""SqlAlchemyStore and the full chain against the hand-written code they replace.

Run from the repository root::

    python benchmarks/bench_sqlalchemy.py            # SQLite and PostgreSQL
    python benchmarks/bench_sqlalchemy.py --quick    # fewer repetitions

Every row times stockpyle and the equivalent hand-written code in the same run,
interleaved (A, B, A, B, ...) so that machine noise hits both alike, and
reports medians in microseconds per lookup and the ratio stockpyle / hand-written:

* ``get``: ``SqlAlchemyStore.get`` by primary key vs ``with Session() as s: s.get(Model, pk)``;
* ``batch_get(100)``: vs one hand-written ``SELECT ... WHERE id IN (...)`` put
  back in request order (the number of statements stockpyle sent is shown);
* ``chain L1`` / ``chain L2`` / ``chain db``: ``ChainedStore([ProcessMemoryStore(),
  MemcacheStore, SqlAlchemyStore])`` when the object is in process memory, only
  in memcached, or only in the database, vs hand-written cache-aside code (a
  dict in front of a pymemcache client in front of a session) doing the same.

PostgreSQL comes from ``STOCKPYLE_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and is skipped when
unreachable.  A private memcached is started from the ``memcached`` binary on
a free loopback port and stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pymemcache.client.base import Client
from sqlalchemy import event, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stockpyle import ChainedStore, ProcessMemoryStore  # noqa: E402
from stockpyle.stores.memcache import MemcacheStore  # noqa: E402
from stockpyle.stores.sqlalchemy import SqlAlchemyStore  # noqa: E402

ROWS = 2000
TABLE = f"bench_sqla_{os.getpid()}"


class Base(DeclarativeBase):
    pass


class Row(Base):
    __tablename__ = TABLE

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(40))
    value: Mapped[int]
    note: Mapped[str] = mapped_column(sa.String(40), server_default="benchmark")


# ---------------------------------------------------------------------------
# timing


def per_op_us(fn: Callable[[], Any], ops: int) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / ops / 1000


def compare(
    ours: Callable[[], Any], theirs: Callable[[], Any], ops: int, repeats: int, before: Callable[[], None] | None = None
) -> tuple[float, float]:
    """Median microseconds per op of ``ours`` and ``theirs``, interleaved."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        for fn, out in ((ours, a), (theirs, b)):
            if before is not None:
                before()
            out.append(per_op_us(fn, ops))
    return statistics.median(a), statistics.median(b)


# ---------------------------------------------------------------------------
# memcached


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_memcached() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("memcached")
    if binary is None:
        raise SystemExit("memcached binary not found; apt-get install memcached")
    port = free_port()
    args = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64"]
    if os.geteuid() == 0:
        args += ["-u", "root"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("memcached did not start")


# ---------------------------------------------------------------------------
# one backend


def bench_backend(label: str, url: str, address: str, repeats: int) -> list[tuple[str, str, float, float, str]]:
    engine = sa.create_engine(url)
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    results: list[tuple[str, str, float, float, str]] = []
    try:
        maker = sessionmaker(engine, expire_on_commit=False)
        with maker() as session:
            session.add_all([Row(id=i, name=f"row {i}", value=i * 7) for i in range(ROWS)])
            session.commit()
        store = SqlAlchemyStore(engine=engine)
        pks = list(range(0, ROWS, 7))[:250]

        # -- get by primary key --------------------------------------------
        def ours_get() -> None:
            get = store.get
            for pk in pks:
                get(Row, {"id": pk})

        def theirs_get() -> None:
            for pk in pks:
                with maker() as s:
                    s.get(Row, pk)

        ours_get()
        theirs_get()  # warm both paths
        a, b = compare(ours_get, theirs_get, len(pks), repeats)
        results.append((label, "get by primary key", a, b, "target <= 1.10x"))

        # -- batch_get(100) --------------------------------------------------
        batch_ids = list(range(5, 5 + 200, 2))
        batch_keys = [{"id": i} for i in batch_ids]
        loops = 30

        def ours_batch() -> None:
            for _ in range(loops):
                store.batch_get(Row, batch_keys)

        def theirs_batch() -> None:
            for _ in range(loops):
                with maker() as s:
                    rows = s.scalars(select(Row).where(Row.id.in_(batch_ids))).all()
                by_id = {r.id: r for r in rows}
                [by_id.get(i) for i in batch_ids]

        statements: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)

        event.listen(engine, "before_cursor_execute", count)
        found = store.batch_get(Row, batch_keys)
        event.remove(engine, "before_cursor_execute", count)
        assert [r.id for r in found if r] == batch_ids
        theirs_batch()
        a, b = compare(ours_batch, theirs_batch, loops, repeats)
        results.append((label, "batch_get(100)", a, b, f"{len(statements)} query; target <= 1.10x"))

        # -- the chain ---------------------------------------------------------
        namespace = f"bench-{os.getpid()}-{label}"
        memory = ProcessMemoryStore()
        memcache = MemcacheStore([address], namespace=namespace)
        chain = ChainedStore([memory, memcache, store])
        host, port = address.split(":")
        client = Client((host, int(port)), no_delay=True, default_noreply=False)
        local: dict[str, Any] = {}

        def handwritten(pk: int) -> Any:
            key = f"hand:{label}:Row:{pk}"
            obj = local.get(key)
            if obj is not None:
                return obj
            data = client.get(key)
            if data is not None:
                obj = pickle.loads(data)
                local[key] = obj
                return obj
            with maker() as s:
                obj = s.get(Row, pk)
            if obj is not None:
                client.set(key, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
                local[key] = obj
            return obj

        def flush_memcached() -> None:
            client.flush_all(noreply=False)

        def ours_chain() -> None:
            get = chain.get
            for pk in pks:
                get(Row, {"id": pk})

        def theirs_chain() -> None:
            for pk in pks:
                handwritten(pk)

        # database depth: nothing cached anywhere (each repeat starts empty)
        def empty_all() -> None:
            memory.clear()
            local.clear()
            flush_memcached()

        a, b = compare(ours_chain, theirs_chain, len(pks), repeats, before=empty_all)
        results.append((label, "chain get, database hit", a, b, "target <= 1.10x"))

        # memcached depth: in memcached only
        ours_chain()
        theirs_chain()

        def empty_memory() -> None:
            memory.clear()
            local.clear()

        a, b = compare(ours_chain, theirs_chain, len(pks), repeats, before=empty_memory)
        results.append((label, "chain get, L2 (memcached) hit", a, b, "target <= 1.10x"))

        # process-memory depth
        ours_chain()
        theirs_chain()
        spins = 40

        def ours_l1() -> None:
            get = chain.get
            for _ in range(spins):
                for pk in pks:
                    get(Row, {"id": pk})

        def theirs_l1() -> None:
            for _ in range(spins):
                for pk in pks:
                    handwritten(pk)

        a, b = compare(ours_l1, theirs_l1, len(pks) * spins, repeats)
        results.append((label, "chain get, L1 (process memory) hit", a, b, "target <= 3.50x"))
        memcache.release()
        client.close()
    finally:
        Base.metadata.drop_all(engine)
        engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    repeats = 5 if args.quick else 11
    process, address = start_memcached()
    rows: list[tuple[str, str, float, float, str]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows += bench_backend("sqlite", f"sqlite:///{tmp}/bench.sqlite", address, repeats)
        pg_url = os.environ.get("STOCKPYLE_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
        try:
            probe = sa.create_engine(pg_url, connect_args={"connect_timeout": 3})
            with probe.connect():
                pass
            probe.dispose()
        except Exception as exc:  # noqa: BLE001 - report and carry on with SQLite only
            print(f"PostgreSQL skipped: {exc}")
        else:
            rows += bench_backend("postgres", pg_url, address, repeats)
    finally:
        process.terminate()
        process.wait(10)
    print(f"{'backend':9} {'operation':36} {'stockpyle us':>13} {'hand-written us':>16} {'ratio':>7}  note")
    for backend, name, ours, theirs, note in rows:
        print(f"{backend:9} {name:36} {ours:13.2f} {theirs:16.2f} {ours / theirs:6.2f}x  {note}")


if __name__ == "__main__":
    main()
