"""Stampede(serve_stale_for=..., refresh_ahead=...): one reader of the fleet reloads while the others are served.

Real processes (tests/support/stale_worker.py), real memcached and Redis, a
real PostgreSQL whose SELECTs are counted by a cursor listener in every
process; a read of the hot row takes 200 ms.  memcached's clock ticks once a
second, so lifetimes here are whole seconds and the waits leave a second of
slack.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support.databases import create_tables, drop_tables, make_engine, table_name

from stockpyle import AsyncChainedStore, ChainedStore, MemcacheStore, ProcessMemoryStore, RedisStore, Stampede
from stockpyle.exceptions import ConfigurationError
from stockpyle.stores.memcache import AsyncMemcacheStore
from stockpyle.stores.redis import AsyncRedisStore
from stockpyle.stores.sqlalchemy import SqlAlchemyStore

WORKER = Path(__file__).parent / "support" / "stale_worker.py"
ROOT = Path(__file__).resolve().parent.parent
# the SELECT's duration: the tests tell the reads that paid a load (>= 0.75 LOAD) from the others
# (< LOAD / 2); a loaded CI machine (two suites on two cores) delayed a plain read by 0.18 s
LOAD = 0.4
LIFETIME = 2


class StaleBase(DeclarativeBase):
    pass


class Product(StaleBase):
    __tablename__ = table_name("stale_herd")
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(40))


@pytest.fixture
def pg_engine(postgres_url: str) -> Any:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


@pytest.fixture
def rows(pg_engine: sa.Engine) -> Any:
    create_tables(pg_engine, StaleBase.metadata)
    with pg_engine.begin() as connection:
        connection.execute(sa.insert(Product), [{"id": 1, "name": "widget"}, {"id": 2, "name": "gadget"}])
    yield pg_engine
    drop_tables(pg_engine, StaleBase.metadata)


def rename(engine: sa.Engine, name: str) -> None:
    """Change row 1 in the database only (as another application would): the caches still hold the old name."""
    with engine.begin() as connection:
        connection.execute(sa.update(Product).where(Product.id == 1).values(name=name))


class Fleet:
    """Worker processes that obey JSON commands."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, count: int, **config: Any) -> list[subprocess.Popen[str]]:
        config.setdefault("database", self.database)
        config.setdefault("table", Product.__tablename__)
        config.setdefault("threads", 4)
        config.setdefault("load", LOAD)
        config.setdefault("lifetime", LIFETIME)
        started = []
        for _ in range(count):
            process = subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(config)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            self.processes.append(process)
            started.append(process)
        for process in started:
            assert json.loads(self.answer(process)) == {"ready": True}
        return started

    @staticmethod
    def send(processes: list[subprocess.Popen[str]], command: dict[str, Any]) -> None:
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(json.dumps(command) + "\n")
            process.stdin.flush()

    @staticmethod
    def answer(process: subprocess.Popen[str]) -> str:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, f"worker {process.pid} ended without answering (exit {process.wait()})"
        return line

    def ask(self, processes: list[subprocess.Popen[str]], command: dict[str, Any]) -> list[dict[str, Any]]:
        self.send(processes, command)
        return [json.loads(self.answer(process)) for process in processes]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    self.send([process], {"op": "quit"})
                    process.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()
            for pipe in (process.stdin, process.stdout):
                if pipe is not None and not pipe.closed:
                    pipe.close()


@pytest.fixture
def fleet(postgres_url: str) -> Any:
    processes = Fleet(postgres_url)
    yield processes
    processes.stop()


def _namespace() -> str:
    return "stale" + uuid.uuid4().hex[:10]


def _prime_and_expire(
    fleet: Fleet, primer: subprocess.Popen[str], engine: sa.Engine, lifetime: float = LIFETIME
) -> None:
    """Fill the caches with "widget", change the row to "widget v2", and wait until the lifetime ran out."""
    (primed,) = fleet.ask([primer], {"op": "prime"})
    filled = time.time()
    assert primed == {"value": "widget"}
    rename(engine, "widget v2")
    # past the lifetime (in process memory too), well inside the stale window
    time.sleep(max(0.0, filled + lifetime + 1.5 - time.time()))


def _reads(results: list[dict[str, Any]]) -> list[list[Any]]:
    return [read for result in results for read in result["reads"]]


def _total(results: list[dict[str, Any]], name: str) -> int:
    return sum(result["stats"][name] for result in results)


def _check_stale_herd(herd: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> None:
    results, after = herd
    assert sum(result["selects"] for result in results) == 1  # one reload in the whole fleet
    assert _total(results, "refreshes") == 1
    assert _total(results, "leases_won") == 1
    assert _total(results, "lease_waits") == 0  # nobody waited for the reload
    first = _reads(results)
    assert len(first) == 8 * 4
    assert {read[3] for read in first} <= {"widget", "widget v2"}, first
    # the refresher paid the load; every other reader was answered at once with the stale value
    paying = [read for read in first if read[2] >= LOAD * 0.9]
    assert len(paying) == 1 and paying[0][3] == "widget v2", paying
    others = sorted(read[2] for read in first if read is not paying[0])
    assert others[-1] < LOAD * 0.75, others[-5:]
    assert others[int(len(others) * 0.99) - 1] < LOAD / 2, others[-5:]
    assert sum(1 for read in first if read[3] == "widget") >= len(first) - 2  # served stale, not reloaded
    # once the refresh is done (every worker answered, the refresher too), everyone sees the new value
    second = _reads(after)
    assert [read[3] for read in second] == ["widget v2"] * len(first), second
    assert sum(result["selects"] for result in after) == 0
    assert _total(after, "leases_won") == _total(after, "stale_served") == 0


def _stale_herd(
    fleet: Fleet, engine: sa.Engine, kind: str, address: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The fleet's reads in the stale window, then its reads after the refresh ended."""
    policy = {"serve_stale_for": 10, "max_poll": 0.05}
    workers = fleet.start(8, kind=kind, address=address, namespace=_namespace(), stampede=policy)
    _prime_and_expire(fleet, workers[0], engine)
    during = fleet.ask(workers, {"op": "read", "at": time.time() + 0.5})
    # a second command, sent only when the first was answered: ordered after the refresh by causality, not by a
    # timer (a fixed second read 0.6 s after the load met a refresh still running on a loaded CI machine)
    return during, fleet.ask(workers, {"op": "read", "at": time.time() + 0.1})


@pytest.mark.memcache
@pytest.mark.slow
def test_eight_processes_in_the_stale_window_send_one_select_and_nobody_waits(
    rows: Any, fleet: Fleet, memcached_server: Any
) -> None:
    _check_stale_herd(_stale_herd(fleet, rows, "memcache", memcached_server.address))


@pytest.mark.redis
@pytest.mark.slow
def test_the_stale_window_on_redis(rows: Any, fleet: Fleet, redis_url: str) -> None:
    _check_stale_herd(_stale_herd(fleet, rows, "redis", redis_url))


def _check_steady(results: list[dict[str, Any]], duration: float, lifetime: int, ahead: float) -> None:
    reads = _reads(results)
    assert reads and all(read[3] in ("widget", "widget v2") for read in reads), [r for r in reads if r[3] is None]
    selects = sum(result["selects"] for result in results)
    # every reload was a refresh of a current value: no miss, no wait, nothing served stale
    assert _total(results, "refreshes") == _total(results, "leases_won") == selects
    for name in ("leases_lost", "lease_waits", "lease_timeouts", "stale_served"):
        assert _total(results, name) == 0, name
    # exactly one reload per lifetime: at least one each time the entry neared its end, never two for one entry
    moments = sorted(moment for result in results for moment in result["slow"])
    assert len(moments) == selects
    # (at least one per whole lifetime the run spans: a loaded machine may push the last refresh past its end)
    assert duration // lifetime <= selects <= duration / (lifetime - ahead - 1) + 1, moments
    assert all(b - a >= lifetime - ahead - 1 for a, b in itertools.pairwise(moments)), moments
    # only the refreshers paid a load; no other read ever waited for one
    slow_reads = [read for read in reads if read[2] >= LOAD * 0.75]
    assert len(slow_reads) == selects, slow_reads
    assert max(read[2] for read in reads if read not in slow_reads) < LOAD / 2


# lifetime 6 s, refreshed 3 s ahead: memcached's clock has whole seconds (an entry may live up to 1 s
# less than asked), and a loaded CI machine (two suites on two cores) once let a 4 s entry refreshed
# 2 s ahead expire before any reader reached it
STEADY_LIFETIME = 6
STEADY_AHEAD = 3.0
STEADY_DURATION = 13.0


def _steady(fleet: Fleet, engine: sa.Engine, kind: str, address: str) -> list[dict[str, Any]]:
    policy = {"refresh_ahead": STEADY_AHEAD, "max_poll": 0.05}
    # process memory keeps entries for less than lifetime - refresh_ahead, so that reads reach the lease layer in time
    workers = fleet.start(
        4,
        kind=kind,
        address=address,
        namespace=_namespace(),
        stampede=policy,
        lifetime=STEADY_LIFETIME,
        l1_lifetime=1,
        threads=2,
    )
    (primed,) = fleet.ask([workers[0]], {"op": "prime"})
    assert primed == {"value": "widget"}
    rename(engine, "widget v2")
    at = time.time() + 0.3
    return fleet.ask(workers, {"op": "steady", "at": at, "until": at + STEADY_DURATION, "interval": 0.05})


@pytest.mark.memcache
@pytest.mark.slow
def test_refresh_ahead_keeps_a_hot_key_warm_with_one_reload_per_lifetime(
    rows: Any, fleet: Fleet, memcached_server: Any
) -> None:
    _check_steady(
        _steady(fleet, rows, "memcache", memcached_server.address), STEADY_DURATION, STEADY_LIFETIME, STEADY_AHEAD
    )


@pytest.mark.redis
@pytest.mark.slow
def test_refresh_ahead_on_redis(rows: Any, fleet: Fleet, redis_url: str) -> None:
    _check_steady(_steady(fleet, rows, "redis", redis_url), STEADY_DURATION, STEADY_LIFETIME, STEADY_AHEAD)


@pytest.mark.parametrize("kind", ["memcache", "redis"])
@pytest.mark.slow
def test_a_refresher_killed_mid_load_is_replaced_after_its_lease(
    rows: Any, fleet: Fleet, kind: str, request: pytest.FixtureRequest
) -> None:
    address = (
        request.getfixturevalue("memcached_server").address
        if kind == "memcache"
        else request.getfixturevalue("redis_url")
    )
    namespace = _namespace()
    policy = {"serve_stale_for": 20, "lease": 2.0, "wait": 5.0, "max_poll": 0.05}
    common = {"kind": kind, "address": address, "namespace": namespace, "stampede": policy, "lifetime": 3}
    (holder,) = fleet.start(1, threads=1, load=30.0, **common)
    others = fleet.start(6, threads=2, **common)
    _prime_and_expire(fleet, others[0], rows, lifetime=3)
    at = time.time() + 0.2
    fleet.send([holder], {"op": "read", "at": at})  # it wins the refresh and never finishes its load
    time.sleep(max(0.0, at + 0.4 - time.time()))
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    start = time.time() + 0.1
    # the lease (2 s) ends; the reload's entry lives 3 s more: the reads end before that
    results = fleet.ask(others, {"op": "steady", "at": start, "until": start + 4.0, "interval": 0.1})
    reads = _reads(results)
    assert {read[3] for read in reads} <= {"widget", "widget v2"}, [read for read in reads if read[3] is None][:3]
    assert any(read[3] == "widget" for read in reads)  # served stale while the dead refresher held the lease
    # after its lease ended one reader of the others reloaded, once
    assert sum(result["selects"] for result in results) == 1
    assert _total(results, "leases_won") == 1
    last = {}
    for result in results:
        for thread, began, _latency, value in result["reads"]:
            last[(id(result), thread)] = (began, value)
    assert {value for _began, value in last.values()} == {"widget v2"}


# -- writes during the window (one process, threads, real servers) ---------------------------------------------


class BlockingStore(SqlAlchemyStore):
    """The real database; once armed, a read of row 1 returns what it read only after ``proceed`` is set."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.armed = threading.Event()
        self.entered = threading.Event()
        self.proceed = threading.Event()
        self.reads = 0

    def get(self, klass: Any, keydict: Any) -> Any:
        found = super().get(klass, keydict)
        self.reads += 1
        if self.armed.is_set() and keydict == {"id": 1}:
            self.armed.clear()
            self.entered.set()
            assert self.proceed.wait(10)
        return found


def _shared(kind: str, request: pytest.FixtureRequest, namespace: str) -> Any:
    if kind == "memcache":
        return MemcacheStore([request.getfixturevalue("memcached_server").address], namespace=namespace)
    return RedisStore(request.getfixturevalue("redis_url"), namespace=namespace)


def _expired_chain(kind: str, request: pytest.FixtureRequest, engine: sa.Engine) -> tuple[Any, Any, BlockingStore]:
    shared = _shared(kind, request, _namespace())
    shared.configure([Product], LIFETIME)
    database = BlockingStore(engine=engine)
    chain = ChainedStore([shared, database], stampede=Stampede(serve_stale_for=10, max_poll=0.05), bus=None)
    assert chain.get(Product, {"id": 1}).name == "widget"  # type: ignore[union-attr]
    time.sleep(LIFETIME + 1.5)
    return chain, shared, database


def _refresh_in_background(chain: Any, database: BlockingStore) -> tuple[threading.Thread, list[Any]]:
    got: list[Any] = []
    database.armed.set()
    refresher = threading.Thread(target=lambda: got.append(chain.get(Product, {"id": 1})))
    refresher.start()
    assert database.entered.wait(10)  # it won the refresh and read the row: "widget"
    return refresher, got


@pytest.mark.parametrize("kind", ["memcache", "redis"])
def test_a_put_during_the_refresh_wins_and_the_refreshers_older_fill_is_refused(
    rows: Any, kind: str, request: pytest.FixtureRequest
) -> None:
    chain, shared, database = _expired_chain(kind, request, rows)
    refresher, got = _refresh_in_background(chain, database)
    # meanwhile the others are served the stale value at once
    began = time.monotonic()
    assert chain.get(Product, {"id": 1}).name == "widget"
    assert time.monotonic() - began < 0.1
    writer = ChainedStore([shared, SqlAlchemyStore(engine=rows)], bus=None)
    writer.put(Product(id=1, name="written"))
    database.proceed.set()
    refresher.join(10)
    assert got and got[0].name == "widget"  # what it read before the write
    assert shared.get(Product, {"id": 1}).name == "written"  # its fill was refused
    assert chain.get(Product, {"id": 1}).name == "written"
    chain.release()
    writer.release()


@pytest.mark.parametrize("kind", ["memcache", "redis"])
def test_a_delete_during_the_window_is_never_served_afterwards(
    rows: Any, kind: str, request: pytest.FixtureRequest
) -> None:
    chain, shared, database = _expired_chain(kind, request, rows)
    refresher, _got = _refresh_in_background(chain, database)
    writer = ChainedStore([shared, SqlAlchemyStore(engine=rows)], bus=None)
    writer.delete(writer.get(Product, {"id": 1}, stampede=None))
    assert chain.get(Product, {"id": 1}) is None  # not the stale value: a delete ends the window for good
    database.proceed.set()
    refresher.join(10)
    assert shared.get(Product, {"id": 1}) is None
    for _ in range(3):
        assert chain.get(Product, {"id": 1}) is None
    chain.release()
    writer.release()


@pytest.mark.parametrize("kind", ["memcache", "redis"])
def test_a_per_call_policy_without_stale_values_waits_for_the_refresh(
    rows: Any, kind: str, request: pytest.FixtureRequest
) -> None:
    chain, _shared_layer, database = _expired_chain(kind, request, rows)
    rename(rows, "widget v2")
    refresher, got = _refresh_in_background(chain, database)
    waited: list[Any] = []
    strict = threading.Thread(
        target=lambda: waited.append(chain.get(Product, {"id": 1}, stampede=Stampede(max_poll=0.05, wait=5.0)))
    )
    strict.start()
    time.sleep(0.3)
    assert not waited  # it does not take the stale value
    database.proceed.set()
    refresher.join(10)
    strict.join(10)
    assert got[0].name == "widget v2" and waited[0].name == "widget v2"
    chain.release()


def test_statistics_count_stale_serves_and_refreshes_and_reset_zeroes_them(
    rows: Any, request: pytest.FixtureRequest
) -> None:
    chain, _shared_layer, database = _expired_chain("memcache", request, rows)
    refresher, _got = _refresh_in_background(chain, database)
    chain.get(Product, {"id": 1})
    chain.get(Product, {"id": 1})
    database.proceed.set()
    refresher.join(10)
    stats = chain.stats()
    assert (stats.refreshes, stats.stale_served) == (1, 2)
    assert stats.as_dict()["stampede"]["stale_served"] == 2
    chain.reset_stats()
    assert (chain.stats().refreshes, chain.stats().stale_served) == (0, 0)
    chain.release()


# -- asyncio ------------------------------------------------------------------------------------------------------


class SlowDatabase(SqlAlchemyStore):
    """The real database (run in a worker thread by the asyncio chain), a read of row 1 taking LOAD seconds."""

    def __init__(self, selects: list[str], **options: Any) -> None:
        super().__init__(**options)
        self.selects = selects

    def get(self, klass: Any, keydict: Any) -> Any:
        if keydict == {"id": 1}:
            self.selects.append("row 1")
            time.sleep(LOAD)
        return super().get(klass, keydict)


@pytest.mark.parametrize("kind", ["memcache", "redis"])
def test_async_chain_serves_stale_to_every_task_but_one(rows: Any, kind: str, request: pytest.FixtureRequest) -> None:
    namespace = _namespace()
    address = (
        request.getfixturevalue("memcached_server").address
        if kind == "memcache"
        else request.getfixturevalue("redis_url")
    )

    async def main() -> None:
        loads: list[str] = []
        shared = (
            AsyncMemcacheStore([address], namespace=namespace)
            if kind == "memcache"
            else AsyncRedisStore(address, namespace=namespace)
        )
        shared.configure([Product], LIFETIME)
        chain = AsyncChainedStore(
            [shared, SlowDatabase(loads, engine=rows)], stampede=Stampede(serve_stale_for=10), bus=None
        )
        assert (await chain.get(Product, {"id": 1})).name == "widget"
        rename(rows, "widget v2")
        await asyncio.sleep(LIFETIME + 1.5)
        loads.clear()

        async def timed() -> tuple[float, str]:
            began = time.monotonic()
            found = await chain.get(Product, {"id": 1})
            return time.monotonic() - began, found.name

        answers = await asyncio.gather(*(timed() for _ in range(32)))
        assert loads == ["row 1"]
        slow = [answer for answer in answers if answer[0] >= LOAD * 0.9]
        assert slow == [(slow[0][0], "widget v2")] if slow else False
        fast = [answer for answer in answers if answer[0] < LOAD * 0.9]
        assert len(fast) == 31 and {name for _t, name in fast} == {"widget"}
        assert max(t for t, _name in fast) < LOAD / 2
        assert (await chain.get(Product, {"id": 1})).name == "widget v2"
        assert chain.stats().refreshes == 1
        await chain.release()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["memcache", "redis"])
@pytest.mark.slow
def test_async_chain_refreshes_ahead_under_steady_reads(rows: Any, kind: str, request: pytest.FixtureRequest) -> None:
    namespace = _namespace()
    address = (
        request.getfixturevalue("memcached_server").address
        if kind == "memcache"
        else request.getfixturevalue("redis_url")
    )

    async def main() -> None:
        loads: list[str] = []
        shared = (
            AsyncMemcacheStore([address], namespace=namespace)
            if kind == "memcache"
            else AsyncRedisStore(address, namespace=namespace)
        )
        shared.configure([Product], 3)
        chain = AsyncChainedStore(
            [shared, SlowDatabase(loads, engine=rows)], stampede=Stampede(refresh_ahead=1.5), bus=None
        )
        await chain.get(Product, {"id": 1})
        loads.clear()
        chain.reset_stats()  # the priming miss is no refresh
        latencies: list[tuple[float, Any]] = []
        end = time.monotonic() + 6.5

        async def reader() -> None:
            while time.monotonic() < end:
                began = time.monotonic()
                found = await chain.get(Product, {"id": 1})
                latencies.append((time.monotonic() - began, found))
                await asyncio.sleep(0.03)

        await asyncio.gather(*(reader() for _ in range(8)))
        assert all(found is not None for _t, found in latencies)
        stats = chain.stats()
        assert 2 <= len(loads) == stats.refreshes == stats.leases_won
        assert (stats.leases_lost, stats.lease_waits, stats.stale_served) == (0, 0, 0)
        slow = [t for t, _found in latencies if t >= LOAD * 0.75]
        assert len(slow) == len(loads)  # only the refreshing task's own call paid the load
        await chain.release()

    asyncio.run(main())


# -- configuration --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"refresh_ahead": 0}, "refresh_ahead must be a number of seconds > 0"),
        ({"refresh_ahead": -1.0}, "refresh_ahead"),
        ({"refresh_ahead": True}, "refresh_ahead"),
        ({"refresh_ahead": "5"}, "refresh_ahead"),
        ({"refresh_ahead": float("inf")}, "refresh_ahead must be finite"),
        ({"refresh_ahead": float("nan")}, "refresh_ahead"),
        ({"serve_stale_for": -1}, "serve_stale_for must be a number of seconds >= 0"),
        ({"serve_stale_for": None}, "serve_stale_for"),
        ({"serve_stale_for": float("inf")}, "serve_stale_for must be finite"),
        ({"serve_stale_for": 5, "leases": False}, "need leases=True"),
        ({"refresh_ahead": 1.0, "leases": False}, "need leases=True"),
    ],
)
def test_invalid_refresh_parameters_are_configuration_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        Stampede(**options)


def test_the_defaults_refresh_nothing() -> None:
    assert Stampede().refresh_ahead is None and Stampede().serve_stale_for == 0.0
    assert not Stampede().refreshes and Stampede(serve_stale_for=1).refreshes and Stampede(refresh_ahead=1).refreshes


def test_a_chain_without_a_lease_layer_refuses_a_refreshing_policy() -> None:
    with pytest.raises(ConfigurationError, match="needs a shared cache layer with leases"):
        ChainedStore([ProcessMemoryStore(), ProcessMemoryStore()], stampede=Stampede(serve_stale_for=5))
    with pytest.raises(ConfigurationError, match="needs a shared cache layer with leases"):
        AsyncChainedStore([ProcessMemoryStore(), ProcessMemoryStore()], stampede=Stampede(refresh_ahead=5))
    chain = ChainedStore([ProcessMemoryStore(), ProcessMemoryStore()], bus=None)
    with pytest.raises(ConfigurationError, match="needs a shared cache layer with leases"):
        chain.get(Product, {"id": 1}, stampede=Stampede(refresh_ahead=1))
    with pytest.raises(ConfigurationError, match=r"takes a stockpyle\.Stampede"):
        chain.get(Product, {"id": 1}, stampede="fast")


@pytest.mark.memcache
def test_pylibmc_offers_no_leases_so_a_refreshing_policy_is_refused(memcached_server: Any) -> None:
    pytest.importorskip("pylibmc")
    shared = MemcacheStore([memcached_server.address], driver="pylibmc", namespace=_namespace())
    with pytest.raises(ConfigurationError, match="needs leases that elect one refresher"):
        ChainedStore([shared, ProcessMemoryStore()], stampede=Stampede(serve_stale_for=5))
    ChainedStore([shared, ProcessMemoryStore()], stampede=Stampede())  # leases off there, as before


@pytest.mark.memcache
def test_the_chain_sets_the_stale_window_on_its_lease_layer(memcached_server: Any) -> None:
    shared = MemcacheStore([memcached_server.address], namespace=_namespace())
    ChainedStore([ProcessMemoryStore(), shared, ProcessMemoryStore()], stampede=Stampede(serve_stale_for=7))
    assert shared.stale_window == 7.0
    ChainedStore([shared, ProcessMemoryStore()], stampede=Stampede(serve_stale_for=3))
    assert shared.stale_window == 7.0  # the longest window asked for
    with pytest.raises(ConfigurationError):
        shared.keep_stale_for(-1)
