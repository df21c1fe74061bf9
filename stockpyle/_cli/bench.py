"""``stockpyle bench``: run the benchmark suites of ``benchmarks/`` and report ratios to peers.

The suites live in the source checkout, next to the package
(``benchmarks/bench_<suite>.py``, each exposing ``run(quick=...)``); this
command imports them, prints one table of every row -- stockpyle's median
and its ratio to the peer or hand-written baseline measured in the same run
-- and optionally writes the rows as JSON and a chart of the ratios as PNG.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import CLIError

__all__ = ["SUITES", "add_parser", "benchmarks_dir", "run"]

#: The suites, in the order they run: name -> what it measures.
SUITES: dict[str, str] = {
    "memory": "in-process hits: ProcessMemoryStore, ThreadLocalStore and ChainedStore L1 vs dict, cachetools, dogpile",
    "scaling": "get cost from 1,000 to 1,000,000 stored objects; memory per stored object (tracemalloc)",
    "memcache": "MemcacheStore get/batch_get(100)/put vs raw pymemcache and dogpile.cache (private memcached)",
    "redis": "RedisStore get/batch_get(100)/put vs raw redis-py and dogpile.cache (private redis-server, pinned to "
    "one CPU with the benchmark)",
    "sqlalchemy": "SqlAlchemyStore get/batch_get(100) vs hand-written SQLAlchemy; the chain at each depth vs "
    "hand-written cache-aside (SQLite, and PostgreSQL when reachable)",
}

PLOT_HINT = 'pip install "stockpyle[bench]"'


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``bench`` and its options."""
    parser = commands.add_parser(
        "bench",
        help="run the benchmarks and report ratios to peers measured in the same run",
        description=(
            "Run the benchmark suites in benchmarks/ (a source checkout is needed) and print, for every row, "
            "stockpyle's median and its ratio to the peer or hand-written baseline measured in the same run "
            "(interleaved; the ratio is the median of per-round ratios, below 1.0 means stockpyle is faster). "
            "Suites: " + "; ".join(f"{name}: {what}" for name, what in SUITES.items()) + ". "
            "Peers that are not installed are skipped with a note; the memcache rows start a private memcached "
            "from the memcached binary, the redis rows a private redis-server; PostgreSQL rows need "
            "STOCKPYLE_POSTGRES_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test) to be reachable."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller sizes (about a minute)")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SUITES),
        metavar="SUITE",
        help=f"run only this suite (repeatable): {', '.join(SUITES)}",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the rows and notes as JSON to PATH")
    parser.add_argument(
        "--plot", type=Path, metavar="PATH", help=f"write a PNG chart of the ratios to PATH (needs {PLOT_HINT})"
    )
    parser.set_defaults(handler=run)


def benchmarks_dir() -> Path:
    """The checkout's ``benchmarks/`` directory.

    :raises CLIError: when stockpyle was not installed from a checkout.
    """
    from .. import __file__ as package_file

    directory = Path(package_file).resolve().parent.parent / "benchmarks"
    if not (directory / "_timing.py").is_file():
        raise CLIError(
            f"the benchmarks are not installed (no {directory}); they live in the source checkout: "
            "clone the repository, pip install -e . there and run python -m stockpyle bench from it"
        )
    return directory


def _check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError(f"--plot needs matplotlib: {PLOT_HINT}") from None


def _run_suites(directory: Path, names: Sequence[str], quick: bool) -> tuple[list[dict[str, Any]], list[str]]:
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for name in names:
        print(f"running {name}: {SUITES[name]} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        module: Any = importlib.import_module(f"bench_{name}")
        suite = module.run(quick=quick)
        rows += [row.as_dict() for row in suite.rows]
        notes += [f"{name}: {note}" for note in suite.notes]
        print(f"  {len(suite.rows)} rows in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return rows, notes


def _quantity(value: float, unit: str) -> str:
    # the benchmarks' own formatter (benchmarks/ is on sys.path once suites ran)
    timing: Any = importlib.import_module("_timing")
    return str(timing.format_quantity(value, unit))


def _print_table(rows: list[dict[str, Any]], notes: list[str]) -> None:
    headers = ("suite", "operation", "stockpyle", "baseline", "baseline median", "ratio", "target", "note")
    cells = [
        (
            row["suite"],
            row["name"],
            _quantity(row["median"], row["unit"]),
            row["baseline"],
            _quantity(row["baseline_median"], row["unit"]),
            f"{row['ratio']:.2f}x",
            row["target"],
            row["note"],
        )
        for row in rows
    ]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for cell in cells:
            print("  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)))
    else:
        console = Console(highlight=False)
        if not console.is_terminal:
            console = Console(highlight=False, width=200)
        table = Table(title="stockpyle / baseline, measured in the same run", title_justify="left")
        for header in headers:
            table.add_column(header, justify="right" if header in ("stockpyle", "baseline median", "ratio") else "left")
        for cell in cells:
            table.add_row(*cell)
        console.print(table)
    for note in notes:
        print(f"note: {note}")


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    labels = [f"{row['name']}  /  {row['baseline']}" for row in rows]
    ratios = [float(row["ratio"]) for row in rows]
    figure, axes = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.4))
    colours = ["tab:green" if r <= 1.0 else "tab:orange" for r in ratios]
    axes.barh(range(len(rows)), ratios, color=colours)
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xscale("log")  # 0.5x and 2x are equally far from 1
    axes.set_xlabel("stockpyle / baseline (below 1: stockpyle is faster or smaller)")
    axes.set_title("stockpyle benchmarks: ratio to the baseline measured in the same run")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=110)
    except OSError as exc:
        raise CLIError(f"cannot write --plot {str(path)!r}: {exc.strerror or exc}") from None
    finally:
        plt.close(figure)


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, rebuilt from the parsed options (not ``sys.argv``)."""
    parts = ["python", "-m", "stockpyle", "bench"]
    if args.quick:
        parts.append("--quick")
    for name in args.only or ():
        parts += ["--only", name]
    if args.json is not None:
        parts += ["--json", str(args.json)]
    if args.plot is not None:
        parts += ["--plot", str(args.plot)]
    return " ".join(shlex.quote(part) for part in parts)


def run(args: argparse.Namespace) -> int:
    """Run the selected suites; returns 0."""
    directory = benchmarks_dir()
    if args.plot is not None:
        _check_plotting()
    names = [name for name in SUITES if not args.only or name in args.only]
    command = _command_line(args)
    started = time.perf_counter()
    rows, notes = _run_suites(directory, names, args.quick)
    elapsed = time.perf_counter() - started
    _print_table(rows, notes)
    if args.json is not None:
        document = {
            "command": command.strip(),
            "quick": bool(args.quick),
            "suites": names,
            "seconds": round(elapsed, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": _cpu_count(),
            "rows": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows],
            "notes": notes,
        }
        try:
            args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise CLIError(f"cannot write --json {str(args.json)!r}: {exc.strerror or exc}") from None
        print(f"wrote {len(rows)} rows to {args.json}")
    if args.plot is not None:
        _plot(rows, args.plot)
        print(f"wrote the chart to {args.plot}")
    return 0


def _cpu_count() -> int | None:
    import os

    return os.cpu_count()
