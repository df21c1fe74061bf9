"""``stockpyle bench``: run the benchmark suites of ``benchmarks/`` and report ratios to peers.

The suites live in the repository and the source distribution, next to the
package (``benchmarks/bench_<suite>.py``, each exposing ``run(quick=...)``),
not in the wheel: an installed stockpyle is pointed at them with
``--benchmarks DIR``.  This command imports them, prints one table of every row -- stockpyle's median
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
    "leases": "lease reads on a hit vs the plain get (memcached meta commands, Redis); the meta codec vs "
    "meta-memcache when installed",
    "bus": "invalidation buses: staleness window per bus (Redis stream, PostgreSQL NOTIFY, memcached epochs) and "
    "the chain's L1 hit with a bus vs without",
    "async": "asyncio: AsyncChainedStore L1 hit vs the sync chain's; in-process, AsyncRedisStore and "
    "AsyncMemcacheStore get/batch_get(100) vs aiocache, cashews and raw redis.asyncio/aiomcache (private servers)",
}

PLOT_HINT = 'pip install "stockpyle[bench]"'

#: the ``--pin`` choices (benchmarks/_timing.py checks the same names)
PIN_MODES = ("same", "split", "off")


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``bench`` and its options."""
    parser = commands.add_parser(
        "bench",
        help="run the benchmarks and report ratios to peers measured in the same run",
        description=(
            "Run the benchmark suites in benchmarks/ (in a checkout or the source distribution, not in the "
            "installed package: see --benchmarks) and print, for every row, "
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
    parser.add_argument(
        "--pin",
        choices=PIN_MODES,
        default="same",
        help="same (default): run the benchmark on one CPU and pin the servers it starts (memcached, "
        "redis-server) to that CPU with taskset; split: servers on another CPU than the benchmark; off: no pinning "
        "(loopback round trips then mix the same-CPU and cross-CPU regimes)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the rows and notes as JSON to PATH")
    parser.add_argument(
        "--benchmarks",
        type=Path,
        metavar="DIR",
        help="the benchmarks/ directory of a checkout or an unpacked source distribution "
        "(default: the one beside the stockpyle package, in a checkout)",
    )
    parser.add_argument(
        "--plot", type=Path, metavar="PATH", help=f"write a PNG chart of the ratios to PATH (needs {PLOT_HINT})"
    )
    parser.set_defaults(handler=run)


def benchmarks_dir(explicit: Path | None = None) -> Path:
    """The ``benchmarks/`` directory to run: ``explicit``, or the checkout's.

    The benchmarks are not part of the installed package: they live in the
    repository and the source distribution, beside ``stockpyle/``.

    :param explicit: a directory given with ``--benchmarks``.
    :raises CLIError: when there are no benchmarks there, saying how to get them.
    """
    from .. import __file__ as package_file
    from .. import __version__

    if explicit is not None:
        if not (explicit / "_timing.py").is_file():
            raise CLIError(
                f"--benchmarks {str(explicit)!r} holds no benchmarks (no _timing.py); "
                "give the benchmarks/ directory of a stockpyle checkout or source distribution"
            )
        return explicit
    directory = Path(package_file).resolve().parent.parent / "benchmarks"
    if not (directory / "_timing.py").is_file():
        sdist = f"stockpyle-{__version__}"
        raise CLIError(
            "the benchmarks are not part of the installed package; they ship in the source distribution: "
            f"python -m pip download --no-deps --no-binary stockpyle stockpyle=={__version__} && "
            f"tar xzf {sdist}.tar.gz && stockpyle bench --benchmarks {sdist}/benchmarks "
            "(or pass --benchmarks the benchmarks/ directory of a checkout)"
        )
    return directory


def _check_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError(f"--plot needs matplotlib: {PLOT_HINT}") from None


def _run_suites(
    directory: Path, names: Sequence[str], quick: bool, pin: str = "same"
) -> tuple[list[dict[str, Any]], list[str]]:
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    timing: Any = importlib.import_module("_timing")
    timing.set_pin(pin)
    rows: list[dict[str, Any]] = []
    notes: list[str] = [f"pinning: {timing.pin_note()}"]
    for name in names:
        print(f"running {name}: {SUITES[name]} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        module: Any = importlib.import_module(f"bench_{name}")
        with timing.pinned_client():
            suite = module.run(quick=quick)
        rows += [row.as_dict() for row in suite.rows]
        notes += [f"{name}: {note}" for note in suite.notes]
        print(f"  {len(suite.rows)} rows in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return rows, notes


def _quantity(value: float, unit: str) -> str:
    # the benchmarks' own formatter (benchmarks/ is on sys.path once suites ran)
    timing: Any = importlib.import_module("_timing")
    return str(timing.format_quantity(value, unit))


def _met(row: dict[str, Any]) -> bool | None:
    """Whether the row met its target (None without one); rows without ``met`` are judged here."""
    met = row.get("met")
    if met is None and row.get("target"):
        timing: Any = importlib.import_module("_timing")
        met = timing.target_met(row["ratio"], row["target"])
    return None if met is None else bool(met)


def _target_cell(row: dict[str, Any]) -> str:
    """The target and whether the ratio met it: ``"<= 1.20 met"``, ``"<= 1/3 MISSED"``, ``""``."""
    met = _met(row)
    if met is None:
        return str(row.get("target") or "")
    return f"{row['target']} {'met' if met else 'MISSED'}"


def _target_summary(rows: list[dict[str, Any]]) -> str:
    """How many rows with a target met it, naming those that did not."""
    judged = [row for row in rows if _met(row) is not None]
    missed = [f"{row['suite']}: {row['name']} vs {row['baseline']}" for row in judged if not _met(row)]
    text = f"targets met: {len(judged) - len(missed)} of {len(judged)}"
    return text + (f" (missed: {'; '.join(missed)})" if missed else "")


HEADERS = ("suite", "operation", "stockpyle", "baseline", "baseline median", "ratio", "target", "note")


def _print_table(rows: list[dict[str, Any]], notes: list[str], console: Any = None) -> None:
    """Print the rows as a table that fits the terminal, then the notes.

    :param console: a ``rich.console.Console`` to print to (default: a new one
        on standard output); without rich, plain aligned text is printed.
    """
    cells = [
        (
            row["suite"],
            row["name"],
            _quantity(row["median"], row["unit"]),
            row["baseline"],
            _quantity(row["baseline_median"], row["unit"]),
            f"{row['ratio']:.2f}x",
            _target_cell(row),
            row["note"],
        )
        for row in rows
    ]
    notes = [*notes, _target_summary(rows)]
    try:
        from rich.console import Console
    except ImportError:
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(HEADERS)]
        print("  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True)))
        for cell in cells:
            print("  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)))
    else:
        if console is None:
            console = Console(highlight=False)
            if not console.is_terminal:
                console = Console(highlight=False, width=200)
        console.print(_rich_table(console, cells))
    for note in notes:
        print(f"note: {note}", file=console.file if console is not None else None)


def _rich_table(console: Any, cells: Sequence[Sequence[str]]) -> Any:
    """One row per line when the terminal is wide enough, else three lines per row.

    The one-line table needs about 170 columns; the stacked one puts the
    operation over its baseline, stockpyle's median over the baseline's, the
    ratio over the target, and fits in 80.
    """
    from rich import box
    from rich.table import Table
    from rich.text import Text  # cells are plain text: names such as "ChainedStore([PM, PM])" are not markup

    title = "stockpyle / baseline, measured in the same run"
    full = Table(title=title, title_justify="left")
    for header in HEADERS:
        full.add_column(
            header, justify="right" if header in ("stockpyle", "baseline median", "ratio") else "left", no_wrap=True
        )
    for cell in cells:
        full.add_row(*(Text(c) for c in cell))
    if console.measure(full, options=console.options.update_width(1_000)).maximum <= console.width:
        return full
    stacked = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    stacked.add_column("suite: operation\n  vs baseline (note)", overflow="fold")
    stacked.add_column("stockpyle\nbaseline", justify="right", no_wrap=True)
    stacked.add_column("ratio\ntarget", justify="right", no_wrap=True)
    for suite, name, median, baseline, baseline_median, ratio, target, note in cells:
        what = f"{suite}: {name}\n  vs {baseline}" + (f"\n  ({note})" if note else "")
        stacked.add_row(Text(what), Text(f"{median}\n{baseline_median}"), Text(f"{ratio}\n{target or '-'}"))
    return stacked


FASTER_COLOUR = "tab:green"
SLOWER_COLOUR = "tab:orange"


def _figure(rows: list[dict[str, Any]]) -> Any:
    """A horizontal bar chart of the ratios, sized so that no label or title is cut off.

    :returns: the matplotlib ``Figure`` (the caller saves and closes it).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib.patches import Patch
    from matplotlib.pyplot import figure as new_figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    labels = [f"{row['name']}  /  {row['baseline']}" for row in rows]
    ratios = [float(row["ratio"]) for row in rows]
    # constrained layout reserves room for the tick labels, the title and the
    # legend, whatever their length (tight_layout cut the longest label off)
    # wide enough for the longest label (about 0.06 in per character at 7 pt) beside a 6 in plot
    width = 6 + 0.06 * max((len(label) for label in labels), default=0)
    figure = new_figure(figsize=(width, 0.32 * len(rows) + 2.2), layout="constrained")
    axes = figure.add_subplot()
    colours = [FASTER_COLOUR if r <= 1.0 else SLOWER_COLOUR for r in ratios]
    axes.barh(range(len(rows)), ratios, color=colours)
    axes.set_yticks(range(len(rows)), labels, fontsize=7)
    axes.invert_yaxis()
    axes.axvline(1.0, color="black", linewidth=0.8)
    axes.set_xscale("log", base=2)  # 0.5x and 2x are equally far from 1
    axes.xaxis.set_major_locator(LogLocator(base=2))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}x"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("stockpyle / baseline, log scale (below 1: stockpyle is faster or smaller)")
    # the figure's title spans the whole image, not just the axes beside the labels
    figure.suptitle("stockpyle benchmarks: ratio to the baseline measured in the same run", fontsize=11)
    axes.legend(
        handles=[
            Patch(color=FASTER_COLOUR, label="stockpyle faster or smaller (ratio <= 1)"),
            Patch(color=SLOWER_COLOUR, label="baseline faster or smaller (ratio > 1)"),
        ],
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncols=2,
        fontsize=8,
        frameon=False,
    )
    return figure


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    figure = _figure(rows)
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
    if getattr(args, "pin", "same") != "same":
        parts += ["--pin", args.pin]
    for name in args.only or ():
        parts += ["--only", name]
    if args.json is not None:
        parts += ["--json", str(args.json)]
    if args.plot is not None:
        parts += ["--plot", str(args.plot)]
    if args.benchmarks is not None:
        parts += ["--benchmarks", str(args.benchmarks)]
    return " ".join(shlex.quote(part) for part in parts)


def run(args: argparse.Namespace) -> int:
    """Run the selected suites; returns 0."""
    directory = benchmarks_dir(args.benchmarks)
    if args.plot is not None:
        _check_plotting()
    names = [name for name in SUITES if not args.only or name in args.only]
    command = _command_line(args)
    started = time.perf_counter()
    pin = getattr(args, "pin", "same")
    rows, notes = _run_suites(directory, names, args.quick, pin)
    elapsed = time.perf_counter() - started
    _print_table(rows, notes)
    if args.json is not None:
        document = {
            "command": command.strip(),
            "quick": bool(args.quick),
            "suites": names,
            "pin": pin,
            "targets": _target_summary(rows),
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
