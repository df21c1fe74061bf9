"""SqlAlchemyStore and the full chain against the hand-written code they replace.

Run from the repository root::

    python benchmarks/bench_sqlalchemy.py            # SQLite and PostgreSQL
    python benchmarks/bench_sqlalchemy.py --quick    # fewer rounds

Every row times stockpyle and the equivalent hand-written code in the same
run, interleaved, and reports medians per lookup and the median of per-round
ratios stockpyle / hand-written:

* ``get``: ``SqlAlchemyStore.get`` by primary key vs ``with Session() as s: s.get(Model, pk)``;
* ``batch_get(100)``: vs one hand-written ``SELECT ... WHERE id IN (...)`` put
  back in request order (the number of statements stockpyle sent is noted);
* ``put`` (a changed copy read from the store) and ``batch_put(100)`` vs
  hand-written ``Session.merge`` + commit: the cost of what stockpyle adds to
  a write -- reading the written rows back so the caches hold the stored
  values, recording the flush for the caches, writing only changed columns;
* ``chain ... hit``: ``ChainedStore([ProcessMemoryStore(), MemcacheStore,
  SqlAlchemyStore])`` when the object is in process memory, only in
  memcached, or only in the database, vs hand-written cache-aside code (a
  dict in front of a pymemcache client in front of a session) doing the same;
  the same chain with ``stampede=None`` is reported beside it, without a
  target: the difference is what the default stampede protection costs a
  read (in-process single flight, memcached leases on the L2 read).

PostgreSQL comes from ``STOCKPYLE_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and is skipped with a
note when unreachable.  A private memcached is started from the ``memcached``
binary on a free loopback port and stopped by PID; without it the chain rows
are skipped with a note.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import MemcachedMissing, Suite, interleaved, memcached, postgres_url, standalone

ROWS = 2000


try:
    import sqlalchemy as sa
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
except ImportError:  # reported by run(); the rows are skipped
    sa = None  # type: ignore[assignment]

if sa is not None:
    # module level: the hand-written cache-aside code and MemcacheStore pickle these rows

    class Base(DeclarativeBase):
        pass

    class Row(Base):
        __tablename__ = f"bench_sqla_{os.getpid()}"

        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(sa.String(40))
        value: Mapped[int]
        note: Mapped[str] = mapped_column(sa.String(40), server_default="benchmark")


def run(*, quick: bool = False) -> Suite:
    """Measure on SQLite and, when reachable, PostgreSQL."""
    suite = Suite("sqlalchemy")
    if sa is None:
        suite.notes.append("SQLAlchemy not installed: sqlalchemy rows skipped (pip install stockpyle[sqlalchemy])")
        return suite
    model = Row
    with contextlib.ExitStack() as stack:
        address: str | None
        try:
            import pymemcache  # noqa: F401

            address = stack.enter_context(memcached())
        except (MemcachedMissing, ImportError) as exc:
            suite.notes.append(f"{exc}: the chain rows (memcached layer) are skipped")
            address = None
        with tempfile.TemporaryDirectory() as tmp:
            _backend(suite, model, "sqlite", url=f"sqlite:///{tmp}/bench.sqlite", address=address, quick=quick)
        url = postgres_url()
        try:
            probe = sa.create_engine(url, connect_args={"connect_timeout": 3})
            with probe.connect():
                pass
            probe.dispose()
        except Exception as exc:  # noqa: BLE001 - any failure means: no PostgreSQL rows
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            suite.notes.append(f"PostgreSQL not reachable at STOCKPYLE_POSTGRES_URL ({first}): its rows are skipped")
        else:
            _backend(suite, model, "postgres", url=url, address=address, quick=quick)
    return suite


@contextlib.contextmanager
def _table(url: str, model: Any) -> Iterator[Any]:
    engine = sa.create_engine(url)
    model.metadata.drop_all(engine)
    model.metadata.create_all(engine)
    try:
        yield engine
    finally:
        model.metadata.drop_all(engine)
        engine.dispose()


def _backend(suite: Suite, model: Any, label: str, *, url: str, address: str | None, quick: bool) -> None:
    from sqlalchemy import event, select
    from sqlalchemy.orm import sessionmaker

    from stockpyle.stores.sqlalchemy import SqlAlchemyStore

    rounds = 5 if quick else 11
    with _table(url, model) as engine:
        maker = sessionmaker(engine, expire_on_commit=False)
        with maker() as session:
            session.add_all([model(id=i, name=f"row {i}", value=i * 7) for i in range(ROWS)])
            session.commit()
        store = SqlAlchemyStore(engine=engine)
        pks = list(range(0, ROWS, 7))[: 60 if quick else 250]

        # -- get by primary key ----------------------------------------------
        def ours_get() -> None:
            get = store.get
            for pk in pks:
                get(model, {"id": pk})

        def theirs_get() -> None:
            for pk in pks:
                with maker() as s:
                    s.get(model, pk)

        results = interleaved(
            [("ours", ours_get), ("theirs", theirs_get)], number=1, rounds=rounds, ops_per_call=len(pks)
        )
        suite.compare(
            results,
            "ours",
            "theirs",
            label=f"[{label}] SqlAlchemyStore.get by primary key",
            baseline_label="hand-written Session.get",
            target="<= 1.10",
        )

        # -- batch_get(100) ----------------------------------------------------
        batch_ids = list(range(5, 5 + 200, 2))
        batch_keys = [{"id": i} for i in batch_ids]

        def ours_batch() -> None:
            store.batch_get(model, batch_keys)

        def theirs_batch() -> None:
            with maker() as s:
                rows = s.scalars(select(model).where(model.id.in_(batch_ids))).all()
            by_id = {r.id: r for r in rows}
            [by_id.get(i) for i in batch_ids]

        statements: list[str] = []

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            statements.append(statement)

        event.listen(engine, "before_cursor_execute", count)
        found = store.batch_get(model, batch_keys)
        event.remove(engine, "before_cursor_execute", count)
        assert [r.id for r in found if r] == batch_ids
        results = interleaved(
            [("ours", ours_batch), ("theirs", theirs_batch)], number=5 if quick else 20, rounds=rounds
        )
        suite.compare(
            results,
            "ours",
            "theirs",
            label=f"[{label}] SqlAlchemyStore.batch_get(100)",
            baseline_label="hand-written SELECT ... IN (...)",
            target="<= 1.10",
            note=f"{len(statements)} SQL statement(s) per batch_get(100)",
        )
        _puts(suite, model, label, store=store, maker=maker, pks=pks, batch_ids=batch_ids, rounds=rounds)
        if address is not None:
            _chain(suite, model, label, store=store, maker=maker, address=address, pks=pks, rounds=rounds)


def _puts(
    suite: Suite, model: Any, label: str, *, store: Any, maker: Any, pks: list[int], batch_ids: list[int], rounds: int
) -> None:
    """put and batch_put of changed rows vs hand-written merge + commit."""
    singles = [store.get(model, {"id": pk}) for pk in pks[:50]]
    batch = store.batch_get(model, [{"id": i} for i in batch_ids])
    counter = [0]

    def ours_put() -> None:
        counter[0] += 1
        for obj in singles:
            obj.value = counter[0]
            store.put(obj)

    def theirs_put() -> None:
        counter[0] += 1
        for obj in singles:
            with maker.begin() as s:
                s.merge(model(id=obj.id, name=obj.name, value=counter[0], note=obj.note))

    results = interleaved(
        [("ours", ours_put), ("theirs", theirs_put)], number=1, rounds=rounds, ops_per_call=len(singles)
    )
    suite.compare(
        results,
        "ours",
        "theirs",
        label=f"[{label}] SqlAlchemyStore.put (update of a changed copy)",
        baseline_label="hand-written merge + commit",
    )

    def ours_batch_put() -> None:
        counter[0] += 1
        for obj in batch:
            obj.value = counter[0]
        store.batch_put(batch)

    def theirs_batch_put() -> None:
        counter[0] += 1
        with maker.begin() as s:
            for obj in batch:
                s.merge(model(id=obj.id, name=obj.name, value=counter[0], note=obj.note))

    results = interleaved([("ours", ours_batch_put), ("theirs", theirs_batch_put)], number=1, rounds=rounds)
    suite.compare(
        results,
        "ours",
        "theirs",
        label=f"[{label}] SqlAlchemyStore.batch_put(100) (updates)",
        baseline_label="hand-written merges + one commit",
    )


def _chain(
    suite: Suite, model: Any, label: str, *, store: Any, maker: Any, address: str, pks: list[int], rounds: int
) -> None:
    from pymemcache.client.base import Client, PooledClient

    from stockpyle import ChainedStore, ProcessMemoryStore
    from stockpyle.stores.memcache import MemcacheStore

    memory = ProcessMemoryStore()
    cache = MemcacheStore([address], namespace=f"bench-{os.getpid()}-{label}")
    chain = ChainedStore([memory, cache, store], bus=None)  # one process: no bus
    # the same layers without stampede protection: what single flight and leases cost a read
    unprotected = ChainedStore([memory, cache, store], bus=None, stampede=None)
    host, port = address.split(":")
    # The hand-written code gets the client configuration a service needs and
    # MemcacheStore uses: thread-safe (pooled), with timeouts. A pooled client
    # with socket timeouts is itself ~10-15% slower per round trip than one bare
    # connection (timeouts make every recv poll first), so comparing against a
    # bare Client would measure the client choice, not stockpyle. The bare
    # client is reported too, as an extra row.
    pooled = PooledClient((host, int(port)), no_delay=True, default_noreply=False, connect_timeout=0.25, timeout=0.5)
    bare = Client((host, int(port)), no_delay=True, default_noreply=False)
    local: dict[str, Any] = {}

    def cache_aside(client: Any, pk: int) -> Any:
        # the cache-aside routine of shared/seeds/004, with a process-local dict on top
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
            obj = s.get(model, pk)
        if obj is not None:
            client.set(key, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
            local[key] = obj
        return obj

    def ours() -> None:
        get = chain.get
        for pk in pks:
            get(model, {"id": pk})

    def ours_unprotected() -> None:
        get = unprotected.get
        for pk in pks:
            get(model, {"id": pk})

    def theirs() -> None:
        for pk in pks:
            cache_aside(pooled, pk)

    def theirs_bare() -> None:
        for pk in pks:
            cache_aside(bare, pk)

    def empty_all() -> None:
        memory.clear()
        local.clear()
        bare.flush_all(noreply=False)

    def empty_memory() -> None:
        memory.clear()
        local.clear()

    rows = [
        ("ours", ours),
        ("ours, stampede=None", ours_unprotected),
        ("theirs", theirs),
        ("theirs, bare client", theirs_bare),
    ]
    depths = (
        ("database", empty_all, 1, "<= 1.10"),
        ("L2 (memcached)", empty_memory, 1, "<= 1.10"),
        ("L1 (process memory)", None, 40, "<= 3.50"),
    )
    for depth, before, spins, target in depths:
        ours()  # fill every layer for the shallower depths
        theirs()
        results = interleaved(rows, number=spins, rounds=rounds, ops_per_call=len(pks), before=before)
        suite.compare(
            results,
            "ours",
            "theirs",
            label=f"[{label}] chain get, {depth} hit",
            baseline_label="hand-written cache-aside (pooled client, timeouts)",
            target=target,
        )
        suite.compare(
            results,
            "ours",
            "theirs, bare client",
            label=f"[{label}] chain get, {depth} hit",
            baseline_label="hand-written cache-aside (one bare connection)",
        )
        suite.compare(
            results,
            "ours, stampede=None",
            "theirs",
            label=f"[{label}] chain get (stampede=None), {depth} hit",
            baseline_label="hand-written cache-aside (pooled client, timeouts)",
        )
    # -- a write through every layer ------------------------------------------
    copies = [chain.get(model, {"id": pk}) for pk in pks[:50]]
    counter = [0]

    def ours_put() -> None:
        counter[0] += 1
        for obj in copies:
            obj.value = counter[0]
            chain.put(obj)

    def theirs_put() -> None:
        # write-through by hand: merge + commit, then memcached and the dict
        counter[0] += 1
        for obj in copies:
            with maker.begin() as s:
                merged = s.merge(model(id=obj.id, name=obj.name, value=counter[0], note=obj.note))
            key = f"hand:{label}:Row:{obj.id}"
            pooled.set(key, pickle.dumps(merged, protocol=pickle.HIGHEST_PROTOCOL))
            local[key] = merged

    results = interleaved(
        [("ours", ours_put), ("theirs", theirs_put)], number=1, rounds=rounds, ops_per_call=len(copies)
    )
    suite.compare(
        results,
        "ours",
        "theirs",
        label=f"[{label}] chain put (changed copy, every layer)",
        baseline_label="hand-written merge + commit + set + dict",
        target="<= 1.10",
        note="stockpyle reads the row back in the writing transaction (one SELECT more): the caches get what "
        "the database stored",
    )
    cache.release()
    pooled.close()
    bare.close()


if __name__ == "__main__":
    raise SystemExit(standalone(run, __doc__.splitlines()[0]))
