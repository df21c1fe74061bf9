"""Rewrite the measured tables of docs/performance.rst from ``python -m stockpyle bench --json``.

Usage, from the repository root::

    python -m stockpyle bench --json /tmp/bench.json
    python benchmarks/render_performance.py /tmp/bench.json docs/performance.rst [--causes causes.json]

What it rewrites: the count of targets met, the table of every target and
the "All rows" section (one table per suite, then the run's notes).  What it
keeps: everything else, and the cause written beside every missed target,
matched by the row's text (``suite: name (against baseline)``).  A missed
target without a cause, neither in the document nor in ``--causes`` (a JSON
object from that text to the cause), stops it before anything is written:
the causes are written by people, never generated.  The prose of "Measured
figures" (run time, load, versions) is also left to be updated by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import format_quantity, target_met

#: the title of each suite's table in "All rows", in the document's order
TITLES = {
    "memory": "In-process hits",
    "scaling": "Size and memory",
    "memcache": "memcached",
    "redis": "Redis",
    "sqlalchemy": "SQLAlchemy and the chain",
    "leases": "Leases",
    "bus": "Invalidation buses",
    "async": "asyncio",
}

TARGETS_TABLE = ".. list-table:: Every target, this run"
ALL_ROWS = "All rows\n~~~~~~~~\n"
AFTER_ALL_ROWS = "A fleet missing one key\n"
COUNT = re.compile(r"\d+ of the \d+ rows with a target met it in this run\.")
MISSED = "**missed**: "


def row_text(row: dict[str, Any]) -> str:
    """The text that names a row in the table of targets (and keys its cause)."""
    return f"{row['suite']}: {row['name']} (against {row['baseline']})"


def is_met(row: dict[str, Any]) -> bool | None:
    met = row.get("met")
    if met is None and row.get("target"):
        met = target_met(row["ratio"], row["target"])
    return None if met is None else bool(met)


def written_causes(document: str) -> dict[str, str]:
    """The causes of the document's table of targets, by row text."""
    causes: dict[str, str] = {}
    start = document.find(TARGETS_TABLE)
    if start < 0:
        return causes
    lines = document[start:].splitlines()
    for number, line in enumerate(lines):
        if line.startswith("   * - ") and number + 3 < len(lines):
            cell = lines[number + 3].strip()
            if cell.startswith("- " + MISSED):
                causes[line[len("   * - ") :]] = cell[len("- " + MISSED) :]
    return causes


def _list_table(title: str, widths: str, header: list[str], body: list[list[str]]) -> list[str]:
    lines = [f".. list-table:: {title}".rstrip(), "   :header-rows: 1", f"   :widths: {widths}", ""]
    for cells in [header, *body]:
        lines.append(f"   * - {cells[0]}")
        lines += [f"     - {cell}" for cell in cells[1:]]
    return [*lines, ""]


def targets_table(rows: list[dict[str, Any]], causes: dict[str, str]) -> list[str]:
    body = []
    for row in rows:
        met = is_met(row)
        if met is None:
            continue
        verdict = "met" if met else MISSED + causes[row_text(row)]
        body.append([row_text(row), f"{row['ratio']:.2f}", row["target"], verdict])
    return _list_table(
        "Every target, this run", "40 9 9 42", ["row (against)", "ratio", "target", "met / cause of the miss"], body
    )


def all_rows(rows: list[dict[str, Any]], notes: list[str]) -> list[str]:
    lines: list[str] = []
    suites = [suite for suite in TITLES if any(row["suite"] == suite for row in rows)]
    suites += sorted({row["suite"] for row in rows} - set(suites))
    for suite in suites:
        body = []
        for row in rows:
            if row["suite"] != suite:
                continue
            met = is_met(row)
            target = "-" if met is None else f"{row['target']} {'met' if met else '**MISSED**'}"
            body.append(
                [
                    row["name"],
                    format_quantity(row["median"], row["unit"]),
                    row["baseline"],
                    format_quantity(row["baseline_median"], row["unit"]),
                    f"{row['ratio']:.2f}",
                    target,
                ]
            )
        header = ["stockpyle", "median", "baseline", "median", "ratio", "target"]
        lines += _list_table(f"{TITLES.get(suite, suite)} ({suite})", "34 10 30 10 7 12", header, body)
    lines += [f"* {note}" for note in notes]
    return [*lines, ""]


def render(document: str, results: dict[str, Any], causes: dict[str, str]) -> str:
    """The document with its measured parts rewritten from ``results``.

    :raises SystemExit: naming every missed target without a cause.
    """
    rows = results["rows"]
    judged = [row for row in rows if is_met(row) is not None]
    missing = [row_text(row) for row in judged if not is_met(row) and row_text(row) not in causes]
    if missing:
        raise SystemExit("no cause written for these missed targets (add them to --causes):\n" + "\n".join(missing))
    met = sum(1 for row in judged if is_met(row))
    document, found = COUNT.subn(f"{met} of the {len(judged)} rows with a target met it in this run.", document)
    if found != 1:
        raise SystemExit("the sentence counting the targets met was not found once")
    start = document.index(TARGETS_TABLE)
    end = _table_end(document, start)
    document = document[:start] + "\n".join(targets_table(rows, causes)) + document[end:]
    first = document.index(ALL_ROWS) + len(ALL_ROWS)
    last = document.index(AFTER_ALL_ROWS)
    return document[:first] + "\n" + "\n".join(all_rows(rows, results["notes"])) + "\n" + document[last:]


def _table_end(document: str, start: int) -> int:
    """Where the list-table beginning at ``start`` ends (the blank line after its last cell)."""
    position = start
    lines = document[start:].split("\n")
    in_body = False
    for line in lines:
        if line.startswith("   * - "):
            in_body = True
        elif in_body and not line.startswith("     - ") and line.strip():
            return position - 1  # keep the blank line before the next paragraph
        position += len(line) + 1
    return len(document)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="the JSON written by python -m stockpyle bench --json")
    parser.add_argument("document", type=Path, help="docs/performance.rst, rewritten in place")
    parser.add_argument("--causes", type=Path, help="a JSON object: row text -> cause of its miss")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text(encoding="utf-8"))
    document = args.document.read_text(encoding="utf-8")
    causes = written_causes(document)
    if args.causes is not None:
        causes.update(json.loads(args.causes.read_text(encoding="utf-8")))
    args.document.write_text(render(document, results, causes), encoding="utf-8")
    for row in results["rows"]:
        if is_met(row) is False:
            print(f"missed: {row_text(row)}: {row['ratio']:.2f} vs {row['target']}")
    print(f"rewrote {args.document}: {results['targets']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
