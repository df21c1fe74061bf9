"""Soak test: 2 processes x 8 threads of random put/get/delete on 10,000 objects.

The chain in each process is [ProcessMemoryStore(maxsize=500, lifetime 2 s),
cache, SqlAlchemyStore(PostgreSQL)], the cache a MemcacheStore or a
RedisStore (one run each).  Every object is written by one
owner thread only, with a version that grows by one on every put or delete,
so each owner can check that its own reads never go backwards: a read after
an acknowledged put returns that version or a newer one, and a read after an
acknowledged delete returns nothing.  Other threads read everything (and so
back-fill the caches concurrently with the owners' writes).  At the end every
cache entry is compared with the database, and each process reports its
memory: the bounded L1 never exceeds ``maxsize`` and RSS growth stays bounded.

Duration: ``STOCKPYLE_SOAK_SECONDS`` (default 8, so CI runs it); run longer by
hand, e.g. ``STOCKPYLE_SOAK_SECONDS=60 python -m pytest tests/test_soak.py -s``.
The figures are printed (``-s`` shows them).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support.databases import TABLE_SUFFIX, create_tables, drop_tables, make_engine, table_name

from stockpyle import ChainedStore, MemcacheStore, ProcessMemoryStore, SqlAlchemyStore

pytestmark = [pytest.mark.soak, pytest.mark.slow, pytest.mark.memcache, pytest.mark.postgres]

OBJECTS = 10_000
PROCESSES = 2
THREADS = 8
L1_MAXSIZE = 500
L1_LIFETIME = 2.0
RSS_GROWTH_LIMIT_MB = 64


class SoakBase(DeclarativeBase):
    """Tables of this module only."""


class SoakItem(SoakBase):
    __tablename__ = table_name("soak_item")
    __stockpyle_version__ = "version"
    __stockpyle_keys__: ClassVar[list[Any]] = ["id", "name"]

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(40), unique=True)
    version: Mapped[int] = mapped_column(sa.Integer)
    payload: Mapped[str] = mapped_column(sa.String(200))

    def __init__(self, id: int, version: int, payload: str = "") -> None:
        self.id = id
        self.name = f"item-{id}"
        self.version = version
        self.payload = payload


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0  # pragma: no cover - not Linux


def make_chain(cache: str, namespace: str, url: str) -> tuple[ChainedStore, ProcessMemoryStore, Any]:
    """The soak's chain; ``cache`` is ``memcached=HOST:PORT`` or ``redis=URL``."""
    kind, _, where = cache.partition("=")
    l1 = ProcessMemoryStore(maxsize=L1_MAXSIZE, lifetime_cb=lambda obj: L1_LIFETIME)
    l2: Any
    if kind == "memcached":
        l2 = MemcacheStore([where], namespace=namespace, lifetime_cb=lambda obj: 300)
    else:
        from stockpyle import RedisStore

        l2 = RedisStore(where, namespace=namespace, lifetime_cb=lambda obj: 300)
    sor = SqlAlchemyStore(engine=make_engine(url, pool_size=THREADS, max_overflow=THREADS))
    # no bus: the L1 lifetime (2 s) bounds what another process's writes leave stale,
    # and each owner checks only its own objects
    return ChainedStore([l1, l2, sor], bus=None), l1, l2


def worker(process: int, cache: str, namespace: str, url: str, seconds: float) -> dict[str, Any]:
    """One process of the soak: THREADS threads until ``seconds`` have passed; returns its figures."""
    chain, l1, l2 = make_chain(cache, namespace, url)
    figures = {"ops": 0, "puts": 0, "deletes": 0, "gets": 0, "batch_gets": 0, "errors": 0, "stale": 0, "lost": 0}
    examples: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    rss = {"start": rss_mb()}

    def run(thread: int) -> None:
        owner = process * THREADS + thread
        rng = random.Random(owner)
        mine = list(range(owner, OBJECTS, PROCESSES * THREADS))
        # the owner's view of its objects: last acknowledged version, and whether it was a delete
        last: dict[int, tuple[int, bool]] = {}
        counts = dict.fromkeys(figures, 0)

        def check(i: int, found: Any) -> None:
            if i not in last:
                return
            version, deleted = last[i]
            if found is None:
                if not deleted:
                    counts["lost"] += 1
                    examples.append(f"{i}: acknowledged v{version}, read nothing")
            elif deleted or found.version < version:
                counts["stale"] += 1
                examples.append(f"{i}: acknowledged {'delete' if deleted else 'put'} v{version}, read v{found.version}")

        while time.monotonic() < deadline:
            roll = rng.random()
            try:
                if roll < 0.25:
                    i = rng.choice(mine)
                    version = last.get(i, (0, False))[0] + 1
                    chain.put(SoakItem(i, version, f"p{owner}-{version}"))
                    last[i] = (version, False)
                    counts["puts"] += 1
                elif roll < 0.30:
                    i = rng.choice(mine)
                    version = last.get(i, (0, False))[0] + 1
                    chain.delete(SoakItem(i, version))
                    last[i] = (version, True)
                    counts["deletes"] += 1
                elif roll < 0.40:
                    ids = [rng.randrange(OBJECTS) for _ in range(10)]
                    for i, found in zip(ids, chain.batch_get(SoakItem, [{"id": i} for i in ids]), strict=True):
                        if i % (PROCESSES * THREADS) == owner:
                            check(i, found)
                    counts["batch_gets"] += 1
                else:
                    # owners re-read their own objects half of the time
                    i = rng.choice(mine) if roll < 0.7 else rng.randrange(OBJECTS)
                    found = chain.get(SoakItem, {"name": f"item-{i}"} if roll < 0.85 else {"id": i})
                    if i % (PROCESSES * THREADS) == owner:
                        check(i, found)
                    counts["gets"] += 1
                counts["ops"] += 1
            except Exception as exc:  # noqa: BLE001 - every exception reaching the caller is a failure
                counts["errors"] += 1
                examples.append(repr(exc))
        with lock:
            for name, value in counts.items():
                figures[name] += value

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    time.sleep(min(1.0, seconds / 4))
    rss["warm"] = rss_mb()
    largest = 0
    while any(thread.is_alive() for thread in threads):
        largest = max(largest, len(l1))  # the bound holds throughout, not just at the end
        time.sleep(0.05)
    rss["end"] = rss_mb()
    layer_errors = chain.stats()[1].errors
    size = len(l1)
    chain.release()
    return {
        **figures,
        "cache_errors": layer_errors,
        "conflicts": l2.conflicts,
        "l1_size": size,
        "l1_largest": largest,
        "l1_evictions": l1.evictions,
        "rss_warm_mb": round(rss["warm"], 1),
        "rss_end_mb": round(rss["end"], 1),
        "examples": examples[:5],
    }


@pytest.fixture
def soak_url(postgres_url: str) -> Any:
    engine = make_engine(postgres_url)
    create_tables(engine, SoakBase.metadata)
    try:
        yield postgres_url
    finally:
        drop_tables(engine, SoakBase.metadata)
        engine.dispose()


@pytest.mark.parametrize("kind", ["memcached", pytest.param("redis", marks=pytest.mark.redis)])
def test_soak(kind: str, soak_url: str, request: pytest.FixtureRequest) -> None:
    seconds = float(os.environ.get("STOCKPYLE_SOAK_SECONDS") or 8)
    if kind == "memcached":
        cache = f"memcached={request.getfixturevalue('memcached_server').address}"
        namespace = "soak" + uuid.uuid4().hex[:8]
    else:
        request.getfixturevalue("redis_client")  # deletes this test's keys (they contain redis_prefix) afterwards
        cache = f"redis={request.getfixturevalue('redis_url')}"
        namespace = "soak" + request.getfixturevalue("redis_prefix")
    env = {**os.environ, "STOCKPYLE_TEST_TABLE_SUFFIX": TABLE_SUFFIX}
    here = Path(__file__)
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(here), str(n), cache, namespace, soak_url, str(seconds)],
            cwd=here.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(PROCESSES)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 120)
        assert proc.returncode == 0, f"soak worker failed:\n{err[-3000:]}"
        results.append(json.loads(out.strip().splitlines()[-1]))
    elapsed = time.monotonic() - started

    # after both processes stopped: the cache must agree with the database
    chain, _l1, l2 = make_chain(cache, namespace, soak_url)
    sor = chain.stores[-1]
    keydicts = [{"id": i} for i in range(OBJECTS)]
    truth = sor.batch_get(SoakItem, keydicts)
    disagreements = []
    for cached_list in (
        l2.batch_get(SoakItem, keydicts),
        l2.batch_get(SoakItem, [{"name": f"item-{i}"} for i in range(OBJECTS)]),
    ):
        for i, (cached, row) in enumerate(zip(cached_list, truth, strict=True)):
            if cached is not None and (row is None or (cached.version, cached.payload) != (row.version, row.payload)):
                disagreements.append((i, cached.version, None if row is None else row.version))
    chain.release()
    sor.engine.dispose()

    total = {name: sum(r[name] for r in results) for name in ("ops", "puts", "deletes", "gets", "batch_gets")}
    errors = sum(r["errors"] for r in results)
    stale = sum(r["stale"] for r in results)
    lost = sum(r["lost"] for r in results)
    print(
        f"\nsoak [{kind}]: {PROCESSES} processes x {THREADS} threads, {OBJECTS} objects, {seconds:.0f} s "
        f"({elapsed:.1f} s wall): {total['ops']} operations ({total['ops'] / seconds:.0f}/s; "
        f"{total['puts']} puts, {total['deletes']} deletes, {total['gets']} gets, {total['batch_gets']} batch_gets "
        f"of 10), {errors} errors, {stale} stale reads, {lost} lost writes, "
        f"{len(disagreements)} {kind} entries differing from the database, "
        f"{sum(r['cache_errors'] for r in results)} absorbed cache errors, "
        f"{sum(r['conflicts'] for r in results)} cas give-ups; per process: "
        + "; ".join(
            f"L1 {r['l1_size']} (largest {r['l1_largest']}) of maxsize {L1_MAXSIZE}, {r['l1_evictions']} evictions, "
            f"RSS {r['rss_warm_mb']} -> {r['rss_end_mb']} MiB"
            for r in results
        )
    )
    examples = [e for r in results for e in r["examples"]]
    assert errors == 0, examples
    assert stale == 0, examples
    assert lost == 0, examples
    assert disagreements == [], disagreements[:10]
    for r in results:
        assert r["l1_largest"] <= L1_MAXSIZE
        assert r["rss_end_mb"] - r["rss_warm_mb"] < RSS_GROWTH_LIMIT_MB
    assert total["ops"] > 100 * seconds


if __name__ == "__main__":
    # a soak worker process: test_soak.py PROCESS CACHE NAMESPACE URL SECONDS
    process_, cache_, namespace_, url_, seconds_ = sys.argv[1:6]
    print(json.dumps(worker(int(process_), cache_, namespace_, url_, float(seconds_))))
