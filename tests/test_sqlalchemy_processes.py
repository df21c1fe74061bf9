"""Lost updates between two real processes: PostgreSQL + memcached + process memory in each.

Process A (this test) and process B (a worker answering JSON commands) each
run ``ChainedStore([ProcessMemoryStore(), MemcacheStore, SqlAlchemyStore])``
on the same PostgreSQL database and memcached namespace.  B's process memory
goes stale when A writes -- nothing tells it -- and B then changes *another*
column through the documented pattern ``obj = get(); obj.x = ...; put(obj)``.
The database must keep A's change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support.databases import create_tables, drop_tables, make_engine, table_name
from support.orm_models import Account, Wallet, orm_metadata

from stockpyle import ChainedStore, ProcessMemoryStore
from stockpyle.exceptions import StaleVersionError
from stockpyle.stores.memcache import MemcacheStore
from stockpyle.stores.sqlalchemy import SqlAlchemyStore

pytestmark = [pytest.mark.postgres, pytest.mark.memcache]

TESTS = Path(__file__).parent
ROOT = TESTS.parent

WORKER = r"""
import json, sys
import sqlalchemy as sa
import support.orm_models as models
from stockpyle import ChainedStore, ProcessMemoryStore
from stockpyle.stores.memcache import MemcacheStore
from stockpyle.stores.sqlalchemy import SqlAlchemyStore

url, address, namespace = sys.argv[1:4]
engine = sa.create_engine(url)
memcache = MemcacheStore([address], namespace=namespace)
chain = ChainedStore([ProcessMemoryStore(), memcache, SqlAlchemyStore(engine=engine)])
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    command = json.loads(line)
    if command["op"] == "quit":
        break
    klass = getattr(models, command["class"])
    obj = chain.get(klass, {"id": command["id"]})
    answer = {"found": None if obj is None else {k: getattr(obj, k) for k in command["columns"]}}
    if command["op"] == "set":
        setattr(obj, command["column"], command["value"])
        try:
            chain.put(obj)
            answer["put"] = "ok"
        except Exception as exc:
            answer["put"] = type(exc).__name__
            answer["message"] = str(exc)
    print(json.dumps(answer), flush=True)
engine.dispose()
"""


class Worker:
    """Process B: its own process memory, the shared memcached and database."""

    def __init__(self, script: Path, url: str, address: str, namespace: str) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}
        env["STOCKPYLE_TEST_TABLE_SUFFIX"] = table_name("x").removeprefix("sp_x_")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), url, address, namespace],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert self._read() == {"ready": True}

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            raise AssertionError(f"worker died: {self.proc.stderr.read()}")
        return json.loads(line)

    def ask(self, **command: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def postgres(postgres_url: str) -> Iterator[sa.Engine]:
    engine = make_engine(postgres_url)
    create_tables(engine, orm_metadata)
    try:
        yield engine
    finally:
        drop_tables(engine, orm_metadata)
        engine.dispose()


@pytest.fixture
def setup(
    postgres: sa.Engine, postgres_url: str, memcached_server: Any, tmp_path: Path
) -> Iterator[tuple[ChainedStore, MemcacheStore, Worker]]:
    namespace = f"lost-{uuid.uuid4().hex[:12]}"
    memcache = MemcacheStore([memcached_server.address], namespace=namespace)
    chain = ChainedStore([ProcessMemoryStore(), memcache, SqlAlchemyStore(engine=postgres)])
    script = tmp_path / "lost_update_worker.py"
    script.write_text(WORKER)
    worker = Worker(script, postgres_url, memcached_server.address, namespace)
    try:
        yield chain, memcache, worker
    finally:
        worker.close()
        memcache.release()


def row(engine: sa.Engine, klass: type, *columns: str) -> tuple[Any, ...]:
    with sa.orm.Session(engine) as session:
        found = session.get(klass, 1)
        assert found is not None
        return tuple(getattr(found, c) for c in columns)


def test_a_stale_copy_in_another_process_never_reverts_a_committed_column(
    postgres: sa.Engine, setup: tuple[ChainedStore, MemcacheStore, Worker]
) -> None:
    chain, memcache, worker = setup
    chain.put(Account(id=1, name="ada", balance=100))
    columns = ["name", "balance"]
    assert worker.ask(op="get", **{"class": "Account"}, id=1, columns=columns)["found"] == {
        "name": "ada",
        "balance": 100,
    }
    mine = chain.get(Account, {"id": 1})  # process A renames
    assert mine is not None
    mine.name = "ada lovelace"
    chain.put(mine)
    # B's process memory still serves the old copy (no one told it) ...
    stale = worker.ask(op="get", **{"class": "Account"}, id=1, columns=columns)
    assert stale["found"] == {"name": "ada", "balance": 100}
    # ... and B changes the balance on that copy
    answer = worker.ask(op="set", **{"class": "Account"}, id=1, columns=columns, column="balance", value=50)
    assert answer["put"] == "ok"
    assert row(postgres, Account, "name", "balance") == ("ada lovelace", 50)
    # B's caches now hold what the database stored, not B's stale copy
    after = worker.ask(op="get", **{"class": "Account"}, id=1, columns=columns)
    assert after["found"] == {"name": "ada lovelace", "balance": 50}
    shared = memcache.get(Account, {"id": 1})
    assert shared is not None
    assert (shared.name, shared.balance) == ("ada lovelace", 50)


def test_a_stale_versioned_copy_in_another_process_is_refused(
    postgres: sa.Engine, setup: tuple[ChainedStore, MemcacheStore, Worker]
) -> None:
    chain, memcache, worker = setup
    chain.put(Wallet(id=1, owner="ada", balance=100))
    columns = ["owner", "balance", "version"]
    assert worker.ask(op="get", **{"class": "Wallet"}, id=1, columns=columns)["found"]["version"] == 1
    mine = chain.get(Wallet, {"id": 1})
    assert mine is not None
    mine.owner = "ada lovelace"
    chain.put(mine)
    answer = worker.ask(op="set", **{"class": "Wallet"}, id=1, columns=columns, column="balance", value=50)
    assert answer["put"] == StaleVersionError.__name__, answer
    assert "another writer" in answer["message"]
    assert row(postgres, Wallet, "owner", "balance", "version") == ("ada lovelace", 100, 2)
    # the refused put left no cache holding B's copy
    shared = memcache.get(Wallet, {"id": 1})
    assert shared is None or (shared.owner, shared.balance, shared.version) == ("ada lovelace", 100, 2)
    again = worker.ask(op="get", **{"class": "Wallet"}, id=1, columns=columns)
    assert again["found"] == {"owner": "ada lovelace", "balance": 100, "version": 2}
