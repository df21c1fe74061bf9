"""The command line: ``python -m stockpyle demo`` and ``python -m stockpyle bench``.

Every test runs the real command in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def stockpyle(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "stockpyle", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (no traceback)."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_help_lists_the_commands_and_demo_options() -> None:
    top = stockpyle("--help")
    assert top.returncode == 0
    assert "demo" in top.stdout
    assert "bench" in top.stdout
    demo = stockpyle("demo", "--help")
    assert demo.returncode == 0
    for option in ("--operations", "--users", "--seed", "--dir", "--database-url", "--memcache", "--redis", "--skew"):
        assert option in demo.stdout
    bench = stockpyle("bench", "--help")
    for option in ("--quick", "--only", "--json", "--plot"):
        assert option in bench.stdout


def test_demo_runs_end_to_end_on_sqlite(tmp_path: Path) -> None:
    result = stockpyle("demo", "--operations", "1500", "--users", "400", "--dir", str(tmp_path), "--no-progress")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "1,500 operations" in out
    for column in ("Hits", "Misses", "Hit ratio", "Errors", "Median", "p99"):
        assert column in out
    for layer in ("1. ThreadLocalStore", "2. ProcessMemoryStore", "3. SqlAlchemyStore (sqlite)"):
        assert layer in out
    assert "the caches saved" in out
    assert "agree with the database" in out
    assert (tmp_path / "stockpyle-demo.sqlite").is_file()


def test_demo_saved_queries_add_up(tmp_path: Path) -> None:
    result = stockpyle("demo", "--operations", "800", "--users", "200", "--dir", str(tmp_path), "--no-progress")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("Database queries:"))
    numbers = [int(word.replace(",", "")) for word in line.replace("(", " ").split() if word.replace(",", "").isdigit()]
    lookups, queries, saved = numbers[:3]
    assert lookups - queries == saved
    assert 0 < queries < lookups


def test_demo_with_memcached_layer(memcached_server: object, tmp_path: Path) -> None:
    address = memcached_server.address  # type: ignore[attr-defined]
    result = stockpyle(
        "demo", "--operations", "600", "--users", "200", "--dir", str(tmp_path), "--memcache", address, "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    assert f"3. MemcacheStore ({address})" in result.stdout
    assert "4. SqlAlchemyStore (sqlite)" in result.stdout


@pytest.mark.redis
def test_demo_with_redis_layer(redis_server_factory: Any, tmp_path: Path) -> None:
    server = redis_server_factory.start()  # a private server: the test may look at every key
    result = stockpyle(
        "demo", "--operations", "600", "--users", "200", "--dir", str(tmp_path), "--redis", server.url, "--no-progress"
    )
    assert result.returncode == 0, result.stderr
    assert f"3. RedisStore ({server.url})" in result.stdout
    assert "4. SqlAlchemyStore (sqlite)" in result.stdout
    assert "agree with the database" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "3. RedisStore" in line)
    hits, backfills = (int(cell.strip().replace(",", "")) for cell in (row.split("│")[2], row.split("│")[5]))
    assert hits > 0 and backfills > 0  # the layer was filled from the database and answered lookups
    import redis

    client = redis.Redis.from_url(server.url)
    try:
        keys = list(client.scan_iter(count=1000))
        assert keys and all(key.startswith(b"sp:demo-") for key in keys)
        assert all(0 < client.pttl(key) <= 300_000 for key in keys)  # they expire within 5 minutes
    finally:
        client.close()


@pytest.mark.redis
def test_unreachable_or_malformed_redis_is_one_line_and_exit_2(redis_server_factory: Any) -> None:
    server = redis_server_factory.start()
    server.stop()
    line = one_line_error(stockpyle("demo", "--redis", server.url, "--operations", "10"))
    assert f"cannot reach Redis at {server.url}" in line
    line = one_line_error(stockpyle("demo", "--redis", "localhost:6379", "--operations", "10"))
    assert "must look like redis://" in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "is not a database URL"),
        ("nosuchdialect://user@host/db", "has no dialect 'nosuchdialect'"),
        ("postgresql+psycopg://postgres@127.0.0.1:1/test", "cannot connect to the database"),
    ],
)
def test_bad_database_url_is_one_line_and_exit_2(url: str, expected: str) -> None:
    line = one_line_error(stockpyle("demo", "--database-url", url, "--operations", "10"))
    assert expected in line
    assert line.startswith("stockpyle demo: error:")


def test_unreachable_memcache_is_one_line_and_exit_2(memcached_factory: object) -> None:
    address = memcached_factory.free_address()  # type: ignore[attr-defined]
    line = one_line_error(stockpyle("demo", "--memcache", address, "--operations", "10"))
    assert f"cannot reach memcached at {address}" in line


def test_malformed_memcache_address_is_one_line_and_exit_2() -> None:
    line = one_line_error(stockpyle("demo", "--memcache", "localhost", "--operations", "10"))
    assert "is not host:port" in line


def test_bench_quick_json_has_ratio_rows(tmp_path: Path) -> None:
    target = tmp_path / "bench.json"
    result = stockpyle("bench", "--quick", "--only", "memory", "--json", str(target))
    assert result.returncode == 0, result.stderr
    document = json.loads(target.read_text(encoding="utf-8"))
    assert document["suites"] == ["memory"]
    rows = document["rows"]
    names = {(row["name"], row["baseline"]) for row in rows}
    assert ("ChainedStore([PM, PM]).get L1 hit", "ProcessMemoryStore.get hit") in names
    assert ("ProcessMemoryStore.get hit", "dict.get") in names
    for row in rows:
        assert row["suite"] == "memory"
        assert row["median"] > 0
        assert row["baseline_median"] > 0
        assert 0 < row["ratio"] < 1000
    assert "ProcessMemoryStore.get hit" in result.stdout


@pytest.mark.redis
def test_bench_redis_rows_compare_with_raw_redis_py(redis_server_factory: Any, tmp_path: Path) -> None:
    redis_server_factory.start()  # skips (fails under CI=true) without redis-server; the suite starts its own
    target = tmp_path / "bench.json"
    result = stockpyle("bench", "--quick", "--only", "redis", "--json", str(target), timeout=180)
    assert result.returncode == 0, result.stderr
    rows = json.loads(target.read_text(encoding="utf-8"))["rows"]
    pairs = {(row["name"], row["baseline"]): row for row in rows}
    for pair in (
        ("RedisStore.get", "raw Redis.get + pickle.loads"),
        ("RedisStore.batch_get(100)", "raw Redis.mget(100) + unpickle"),
        ("RedisStore.put (2 keys)", "raw pipeline SET PX x2 + pickle.dumps"),
    ):
        row = pairs[pair]
        assert row["suite"] == "redis"
        assert row["median"] > 0 and row["baseline_median"] > 0
        assert 0.5 < row["ratio"] < 20
    assert pairs[("RedisStore.get", "raw Redis.get + pickle.loads")]["target"] == "<= 1.20"


def test_bench_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "ratios.png"
    result = stockpyle("bench", "--quick", "--only", "memory", "--plot", str(target))
    assert result.returncode == 0, result.stderr
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_an_unknown_suite() -> None:
    result = stockpyle("bench", "--only", "nonsense")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_no_command_prints_help_and_exits_2() -> None:
    result = stockpyle()
    assert result.returncode == 2
    assert "demo" in result.stdout


def test_demo_without_rich_names_the_extra(tmp_path: Path) -> None:
    # a package that fails to import stands in for rich not being installed
    (tmp_path / "rich").mkdir()
    (tmp_path / "rich" / "__init__.py").write_text("raise ImportError('No module named rich')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    result = subprocess.run(
        [sys.executable, "-m", "stockpyle", "demo", "--operations", "10"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    line = one_line_error(result)
    assert "rich not installed" in line
    assert 'pip install "stockpyle[sqlalchemy,cli]"' in line
