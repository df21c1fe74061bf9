"""The command line: ``python -m stockpyle demo`` and ``python -m stockpyle bench``.

Every test runs the real command in a subprocess, as a user would.
"""

from __future__ import annotations

import io
import json
import os
import re
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
    for option in ("--quick", "--only", "--json", "--plot", "--pin"):
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
    bus_line = next(line for line in result.stdout.splitlines() if line.startswith("Invalidation bus"))
    assert "RedisStreamBus" in bus_line and " 0 gaps" in bus_line, bus_line
    published = int(bus_line.split(" messages published")[0].rsplit(" ", 1)[1].replace(",", ""))
    assert published > 0  # the demo's writes were published for the other processes' in-process layers
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


@pytest.mark.redis
def test_bench_async_rows_compare_with_the_sync_chain_and_the_peers(redis_server_factory: Any, tmp_path: Path) -> None:
    redis_server_factory.start()  # skips (fails under CI=true) without redis-server; the suite starts its own
    target = tmp_path / "bench.json"
    result = stockpyle("bench", "--quick", "--only", "async", "--json", str(target), timeout=180)
    assert result.returncode == 0, result.stderr
    document = json.loads(target.read_text(encoding="utf-8"))
    assert document["suites"] == ["async"]
    rows = document["rows"]
    pairs = {(row["name"], row["baseline"]): row for row in rows}
    l1 = pairs[("AsyncChainedStore([PM, AsyncRedisStore]).get L1 hit", "ChainedStore([PM, RedisStore]).get L1 hit")]
    assert l1["target"] == "<= 1.3"
    assert isinstance(l1["met"], bool)
    expected = [
        ("AsyncRedisStore.get", "raw redis.asyncio get + pickle.loads"),
        ("AsyncRedisStore.batch_get(100)", "raw redis.asyncio mget(100) + unpickle"),
    ]
    for peer, name in (("aiocache", "aiocache SimpleMemoryCache(timeout=None).get"), ("cashews", "cashews mem:// get")):
        if peer_installed(peer):
            expected.append(("ProcessMemoryStore.get (called in a coroutine)", name))
    if peer_installed("aiocache"):
        expected.append(("AsyncRedisStore.get", "aiocache RedisCache(PickleSerializer, timeout=None).get"))
    if peer_installed("cashews"):
        expected.append(("AsyncRedisStore.batch_get(100)", "cashews redis:// get_many(100)"))
    for pair in expected:
        row = pairs[pair]
        assert row["suite"] == "async"
        assert row["median"] > 0 and row["baseline_median"] > 0
        assert 0 < row["ratio"] < 1000
    for row in rows:
        assert row["met"] is None or row["target"]


def peer_installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.parametrize(("pin", "said"), [("off", "not pinned"), ("split", "--pin split"), ("same", "--pin same")])
def test_bench_pin_is_applied_and_reported(tmp_path: Path, pin: str, said: str) -> None:
    if pin != "off" and not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    if pin == "split" and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("split pinning needs two CPUs")
    target = tmp_path / "bench.json"
    result = stockpyle("bench", "--quick", "--only", "memory", "--pin", pin, "--json", str(target))
    assert result.returncode == 0, result.stderr
    document = json.loads(target.read_text(encoding="utf-8"))
    assert document["pin"] == pin
    assert ("--pin " + pin in document["command"]) == (pin != "same")
    assert any(said in note for note in document["notes"]), document["notes"]
    judged = [row for row in document["rows"] if row["target"]]
    assert judged, "the memory suite has rows with targets"
    for row in document["rows"]:
        if not row["target"]:
            assert row["met"] is None
    met = sum(bool(row["met"]) for row in judged)
    assert document["targets"].startswith(f"targets met: {met} of {len(judged)}")
    assert f"targets met: {met} of {len(judged)}" in result.stdout
    for row in judged:
        assert isinstance(row["met"], bool)


def test_bench_pinning_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _timing

    before = os.sched_getaffinity(0)
    monkeypatch.setattr(_timing.shutil, "which", lambda name: f"/usr/bin/{name}")
    try:
        _timing.set_pin("same")
        client, server = _timing.pin_cpus()
        assert client == server and client in before
        assert _timing.server_command(["memcached"]) == ["taskset", "-c", str(client), "memcached"]
        with _timing.pinned_client():
            assert os.sched_getaffinity(0) == {client}
        assert os.sched_getaffinity(0) == before
        _timing.set_pin("off")
        assert _timing.pin_cpus() == (None, None)
        assert _timing.server_command(["memcached"]) == ["memcached"]
        with _timing.pinned_client():
            assert os.sched_getaffinity(0) == before
        if len(before) > 1:
            _timing.set_pin("split")
            client, server = _timing.pin_cpus()
            assert client != server
            assert _timing.server_command(["redis-server"]) == ["taskset", "-c", str(server), "redis-server"]
        with pytest.raises(ValueError, match="--pin must be one of"):
            _timing.set_pin("both")
    finally:
        _timing.set_pin("same")


def test_bench_targets_are_judged() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _timing

    assert _timing.target_met(0.33, "<= 1/3") is True
    assert _timing.target_met(0.34, "<= 1/3") is False
    assert _timing.target_met(1.25, "<= 1.25x") is True
    assert _timing.target_met(1.21, "<= 1.20") is False
    assert _timing.target_met(5.0, "") is None
    with pytest.raises(ValueError, match="a target reads"):
        _timing.target_met(1.0, "< 1.2")
    row = _timing.Row("memcache", "a", 2.0, "b", 1.0, 2.0, "<= 1.10")
    assert row.met is False
    assert _timing.verdict(row) == "MISSED"
    assert _timing.target_summary([row, _timing.Row("memcache", "c", 1.0, "d", 1.0, 1.0)]) == (
        "targets met: 0 of 1 (missed: a)"
    )


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


def in_terminal(*args: str, columns: int, timeout: float = 60) -> tuple[int, str]:
    """Run ``python -m stockpyle ARGS`` in a pseudo-terminal ``columns`` wide: (status, text without colours)."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR")}
    env.update(PYTHONPATH=str(ROOT), TERM="xterm")
    process = subprocess.Popen(
        [sys.executable, "-m", "stockpyle", *args], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, env=env
    )
    os.close(slave)
    output = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closes when the process ends
                break
            if not chunk:
                break
            output += chunk
        status = process.wait(timeout=timeout)
    finally:
        os.close(master)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode("utf-8", "replace")).replace("\r", "")
    return status, text


def test_demo_help_shows_the_mix_with_plain_percent_signs() -> None:
    result = stockpyle("demo", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "72% reads by id, 18% reads by email, 6% updates, 2% inserts, 2% deletes" in text
    assert "%%" not in result.stdout


def test_demo_help_states_each_default_once() -> None:
    text = " ".join(stockpyle("demo", "--help").stdout.split())
    options = re.split(r" (?=--[a-z])", text.split("show this help message and exit", 1)[1])
    for option in options:
        assert option.count("(default:") <= 1, option
    assert "(default: None)" not in text
    assert "(default: False)" not in text
    for expected in ("(default: 20000)", "(default: 5000)", "(default: 7)", "(default: 1.1)", "(default: a temporary"):
        assert expected in text


def test_an_uninstalled_driver_is_named_with_its_own_package() -> None:
    import importlib.util

    if any(importlib.util.find_spec(name) is not None for name in ("oracledb", "cx_Oracle")):
        pytest.skip("an Oracle driver is installed here")
    line = one_line_error(stockpyle("demo", "--database-url", "oracle://scott@127.0.0.1/db", "--operations", "10"))
    # SQLAlchemy 2.1's default Oracle driver is oracledb, 2.0's cx_Oracle
    found = re.search(r"No module named '(oracledb|cx_Oracle)'", line)
    assert found, line
    assert f'pip install "{found[1]}"' in line
    assert "psycopg" not in line
    assert "PyMySQL" not in line


@pytest.mark.parametrize("command", ["demo", "bench"])
def test_an_unknown_option_shows_the_subcommand_usage(command: str) -> None:
    result = stockpyle(command, "--bogus")
    assert result.returncode == 2
    assert result.stderr.startswith(f"usage: stockpyle {command} ")
    assert f"stockpyle {command}: error: unrecognized arguments: --bogus" in result.stderr


def test_an_unknown_top_level_option_shows_the_top_level_usage() -> None:
    result = stockpyle("--bogus")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: stockpyle [-h]")


def test_demo_table_fits_an_80_column_terminal(tmp_path: Path) -> None:
    status, text = in_terminal(
        "demo", "--operations", "600", "--users", "200", "--dir", str(tmp_path), "--no-progress", columns=80
    )
    assert status == 0, text
    lines = text.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= 80, text
    assert "…" not in text, text  # nothing truncated
    for layer in ("ThreadLocalStore", "ProcessMemoryStore", "SqlAlchemyStore"):
        # each layer is one row: the name, then its seven figures, on one line
        row = next(line for line in lines if line.startswith(layer))
        assert len(row.split()) == 1 + 5 + 2 * 2, row  # latencies are "2.4 us"
    assert "agree with the database" in text


def test_demo_table_keeps_the_boxed_layout_when_there_is_room(tmp_path: Path) -> None:
    status, text = in_terminal(
        "demo", "--operations", "300", "--users", "100", "--dir", str(tmp_path), "--no-progress", columns=160
    )
    assert status == 0, text
    assert "│ 3. SqlAlchemyStore (sqlite)" in text


BENCH_ROWS: list[dict[str, Any]] = [
    {
        "suite": "memory",
        "name": "ChainedStore([PM, PM]).get L1 hit",
        "median": 123.4,
        "unit": "ns",
        "baseline": "ProcessMemoryStore.get hit",
        "baseline_median": 100.2,
        "ratio": 1.23,
        "target": "<= 1.3x",
        "note": "interleaved over 30 rounds",
    },
    {
        "suite": "sqlalchemy",
        "name": "ChainedStore([PM, Memcache, SqlAlchemy]).batch_get(100) postgres cold",
        "median": 1234567.0,
        "unit": "ns",
        "baseline": "hand-written cache-aside with pymemcache and SQLAlchemy",
        "baseline_median": 1200000.0,
        "ratio": 1.03,
        "target": "",
        "note": "",
    },
]


@pytest.mark.parametrize("columns", [80, 100])
def test_bench_table_fits_the_terminal(columns: int) -> None:
    from rich.console import Console

    sys.path.insert(0, str(ROOT / "benchmarks"))  # the table formats quantities with benchmarks/_timing.py
    from stockpyle._cli import bench

    out = io.StringIO()
    console = Console(width=columns, file=out, force_terminal=True, color_system=None)
    bench._print_table(BENCH_ROWS, ["memory: a note"], console=console)
    text = out.getvalue()
    assert max(len(line.rstrip()) for line in text.splitlines()) <= columns, text
    assert "…" not in text
    words = text.split()
    for row in BENCH_ROWS:
        # a long name may wrap within its cell, but every word of it is shown whole
        for value in (row["name"], row["baseline"], f"{row['ratio']:.2f}x"):
            assert all(word in words for word in value.split()), value
    assert "note: memory: a note" in text
    # the row with a target says whether it met it, and the summary counts
    assert "met" in words
    assert "targets met: 1 of 1" in text


def test_plot_keeps_title_labels_and_legend_inside_the_image() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from stockpyle._cli import bench

    rows = [*BENCH_ROWS, {**BENCH_ROWS[0], "name": "ProcessMemoryStore.get hit", "baseline": "dict.get", "ratio": 0.6}]
    figure = bench._figure(rows)
    try:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
        bounds = figure.bbox
        (axes,) = figure.axes
        legend = axes.get_legend()
        assert legend is not None
        assert len(legend.get_texts()) == 2
        texts = [figure._suptitle, axes.xaxis.label, legend, *axes.get_yticklabels()]
        assert len(texts) == 3 + len(rows)
        for text in texts:
            box = text.get_window_extent(renderer)
            inside = box.x0 >= bounds.x0 - 1 and box.x1 <= bounds.x1 + 1 and box.y0 >= bounds.y0 - 1
            assert inside and box.y1 <= bounds.y1 + 1, (getattr(text, "get_text", lambda: "legend")(), box, bounds)
    finally:
        plt.close(figure)


def installed_copy(tmp_path: Path) -> Path:
    """The package alone, as a wheel installs it: no benchmarks/ beside it."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(ROOT / "stockpyle", site / "stockpyle", ignore=shutil.ignore_patterns("__pycache__"))
    return site


def run_installed(site: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stockpyle", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=site.parent,
        env={**os.environ, "PYTHONPATH": str(site), "COLUMNS": "200"},
        check=False,
    )


def test_bench_from_an_installed_package_says_how_to_get_the_benchmarks(tmp_path: Path) -> None:
    import stockpyle

    site = installed_copy(tmp_path)
    line = one_line_error(run_installed(site, "bench", "--quick"))
    version = stockpyle.__version__
    assert "the benchmarks are not part of the installed package" in line
    assert f"python -m pip download --no-deps --no-binary stockpyle stockpyle=={version}" in line
    assert f"stockpyle bench --benchmarks stockpyle-{version}/benchmarks" in line


def test_bench_from_an_installed_package_runs_the_benchmarks_it_is_given(tmp_path: Path) -> None:
    site = installed_copy(tmp_path)
    target = tmp_path / "bench.json"
    result = run_installed(
        site, "bench", "--benchmarks", str(ROOT / "benchmarks"), "--quick", "--only", "memory", "--json", str(target)
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(target.read_text(encoding="utf-8"))
    assert document["rows"]
    assert f"--benchmarks {ROOT / 'benchmarks'}" in document["command"]


def test_bench_with_a_directory_that_holds_no_benchmarks(tmp_path: Path) -> None:
    line = one_line_error(stockpyle("bench", "--benchmarks", str(tmp_path)))
    assert "holds no benchmarks" in line
