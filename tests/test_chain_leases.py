"""A fleet missing one cold key sends one query: the chain's leases across real processes.

16 processes of 8 threads each (tests/support/herd_worker.py) miss one key
at the same instant; a read of the database takes 200 ms.  SELECTs are
counted by a cursor listener in every process and summed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support.databases import create_tables, drop_tables, make_engine, table_name

WORKER = Path(__file__).parent / "support" / "herd_worker.py"
ROOT = Path(__file__).resolve().parent.parent
LOAD = 0.2
MAX_POLL = 0.05


class HerdBase(DeclarativeBase):
    pass


class Product(HerdBase):
    __tablename__ = table_name("lease_herd")
    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(sa.String(40))


@pytest.fixture
def rows(pg_engine: sa.Engine) -> Any:
    create_tables(pg_engine, HerdBase.metadata)
    with pg_engine.begin() as connection:
        connection.execute(sa.insert(Product), [{"id": 1, "name": "widget"}, {"id": 2, "name": "gadget"}])
    yield pg_engine
    drop_tables(pg_engine, HerdBase.metadata)


@pytest.fixture
def pg_engine(postgres_url: str) -> Any:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


class Fleet:
    """Worker processes, started together, released at one instant."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, count: int, **config: Any) -> list[subprocess.Popen[str]]:
        config.setdefault("database", self.database)
        config.setdefault("table", Product.__tablename__)
        config.setdefault("threads", 8)
        config.setdefault("load", LOAD)
        config.setdefault("mode", "get")
        config.setdefault("stampede", {"max_poll": MAX_POLL})
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
            assert process.stdout is not None
            line = process.stdout.readline()
            assert json.loads(line) == {"ready": True}, line
        return started

    @staticmethod
    def release(processes: list[subprocess.Popen[str]], delay: float = 0.5) -> float:
        at = time.time() + delay
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(f"{at}\n")
            process.stdin.flush()
        return at

    @staticmethod
    def results(processes: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
        out = []
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line, f"worker {process.pid} ended without answering (exit {process.wait()})"
            out.append(json.loads(line))
            process.wait(timeout=30)
            process.stdout.close()
            assert process.stdin is not None
            process.stdin.close()
        return out

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
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


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _herd(fleet: Fleet, kind: str, address: str, processes: int = 16, **config: Any) -> list[dict[str, Any]]:
    workers = fleet.start(processes, kind=kind, address=address, namespace="herd" + uuid.uuid4().hex[:10], **config)
    fleet.release(workers)
    return fleet.results(workers)


def _check_one_select(results: list[dict[str, Any]]) -> None:
    values = [value for result in results for value in result["values"]]
    assert values == ["widget"] * len(values)
    assert sum(result["selects"] for result in results) == 1
    assert sum(result["stats"]["leases_won"] for result in results) == 1
    # the readers of the other processes waited for the winner's fill: its load, then at most two polls
    # (measured here: p99 within 0.05-0.08 s of the load; 0.05 s more is allowed for a loaded CI machine)
    (winner,) = [result for result in results if result["selects"]]
    load = min(winner["latencies"])  # the winner's own read: the 200 ms query and its round trips
    latencies = sorted(latency for result in results if result is not winner for latency in result["latencies"])
    assert _p99(latencies) <= load + 2 * MAX_POLL + 0.05, (load, latencies[-5:])


@pytest.mark.memcache
@pytest.mark.slow
def test_sixteen_processes_of_eight_threads_send_one_select(rows: Any, fleet: Fleet, memcached_server: Any) -> None:
    _check_one_select(_herd(fleet, "memcache", memcached_server.address))


@pytest.mark.redis
@pytest.mark.slow
def test_the_same_herd_on_redis_sends_one_select(rows: Any, fleet: Fleet, redis_url: str) -> None:
    _check_one_select(_herd(fleet, "redis", redis_url))


@pytest.mark.memcache
@pytest.mark.slow
def test_with_memcached_down_each_process_reads_once(rows: Any, fleet: Fleet, memcached_factory: Any) -> None:
    results = _herd(fleet, "memcache", memcached_factory.free_address())
    values = [value for result in results for value in result["values"]]
    assert values == ["widget"] * len(values)
    assert [result["selects"] for result in results] == [1] * 16  # single flight in each process, no lease to take


@pytest.mark.memcache
@pytest.mark.slow
def test_a_lease_holder_killed_mid_load_costs_at_most_one_more_select(
    rows: Any, fleet: Fleet, memcached_server: Any
) -> None:
    namespace = "herd" + uuid.uuid4().hex[:10]
    policy = {"lease": 2.0, "wait": 5.0, "max_poll": MAX_POLL}
    common = {"kind": "memcache", "address": memcached_server.address, "namespace": namespace, "stampede": policy}
    (holder,) = fleet.start(1, threads=1, load=30.0, **common)  # its load never ends: it is killed holding the lease
    others = fleet.start(15, **common)
    at = fleet.release([holder], delay=0.1)
    time.sleep(max(0.0, at - time.time()) + 0.3)
    os.kill(holder.pid, signal.SIGKILL)  # mid-load, holding the lease
    holder.wait()
    fleet.release(others, delay=0.2)
    results = fleet.results(others)
    values = [value for result in results for value in result["values"]]
    assert values == ["widget"] * len(values)
    assert sum(result["selects"] for result in results) <= 1  # the holder's never finished: at most 2 in all
    assert sum(result["stats"]["leases_won"] for result in results) == 1  # the next one after the lease expired


@pytest.mark.memcache
@pytest.mark.slow
def test_get_or_create_across_processes_calls_the_creator_once(rows: Any, fleet: Fleet, memcached_server: Any) -> None:
    results = _herd(fleet, "memcache", memcached_server.address, processes=8, mode="create")
    values = [value for result in results for value in result["values"]]
    assert values == ["made"] * len(values)
    assert sum(result["created"] for result in results) == 1
