"""benchmarks/render_performance.py: docs/performance.rst's tables from a bench --json run, causes kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "render_performance.py"

DOCUMENT = """Performance
===========

Targets
~~~~~~~

1 of the 2 rows with a target met it in this run. Prose kept.

.. list-table:: Every target, this run
   :header-rows: 1
   :widths: 40 9 9 42

   * - row (against)
     - ratio
     - target
     - met / cause of the miss
   * - memcache: get (against raw get)
     - 1.30
     - <= 1.20
     - **missed**: the envelope check
   * - memcache: put (against raw set)
     - 1.00
     - <= 1.20
     - met

What the misses have in common: kept.

All rows
~~~~~~~~

.. list-table:: memcached (memcache)
   :header-rows: 1
   :widths: 34 10 30 10 7 12

   * - stockpyle
     - median
     - baseline
     - median
     - ratio
     - target
   * - old row
     - 1 us
     - raw
     - 1 us
     - 1.00
     - -

* an old note

A fleet missing one key
~~~~~~~~~~~~~~~~~~~~~~~

Kept too.
"""


def _row(name: str, baseline: str, ratio: float, target: str = "") -> dict[str, Any]:
    return {
        "suite": "memcache",
        "name": name,
        "median": 1500.0 * ratio,
        "baseline": baseline,
        "baseline_median": 1500.0,
        "ratio": ratio,
        "target": target,
        "unit": "ns",
        "note": "",
        "met": None if not target else ratio <= 1.2,
    }


def _run(tmp_path: Path, rows: list[dict[str, Any]], *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "bench.json").write_text(
        json.dumps({"rows": rows, "notes": ["pinning: one CPU"], "targets": "targets met: n"}), encoding="utf-8"
    )
    (tmp_path / "performance.rst").write_text(DOCUMENT, encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "bench.json"), str(tmp_path / "performance.rst"), *extra],
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_tables_are_rewritten_and_the_written_causes_kept(tmp_path: Path) -> None:
    rows = [
        _row("get", "raw get", 1.25, "<= 1.20"),
        _row("put", "raw set", 1.10, "<= 1.20"),
        _row("get", "dogpile get", 0.5),
    ]
    result = _run(tmp_path, rows)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "performance.rst").read_text(encoding="utf-8")
    assert "1 of the 2 rows with a target met it in this run. Prose kept." in text
    assert (
        "   * - memcache: get (against raw get)\n     - 1.25\n     - <= 1.20\n     - **missed**: the envelope check\n"
        in (text)
    )
    assert "     - <= 1.20 **MISSED**\n" in text and "     - <= 1.20 met\n" in text
    assert "     - 1.88 us\n" in text  # the median, formatted as the bench table does
    assert "old row" not in text and "an old note" not in text and "* pinning: one CPU\n\nA fleet" in text
    assert text.startswith("Performance\n") and text.endswith("Kept too.\n")
    assert "What the misses have in common: kept." in text


def test_a_new_miss_without_a_cause_writes_nothing(tmp_path: Path) -> None:
    rows = [_row("get", "raw get", 1.25, "<= 1.20"), _row("put", "raw set", 1.30, "<= 1.20")]
    result = _run(tmp_path, rows)
    assert result.returncode != 0
    assert "memcache: put (against raw set)" in result.stderr
    assert (tmp_path / "performance.rst").read_text(encoding="utf-8") == DOCUMENT
    causes = tmp_path / "causes.json"
    causes.write_text(json.dumps({"memcache: put (against raw set)": "the plan"}), encoding="utf-8")
    result = _run(tmp_path, rows, "--causes", str(causes))
    assert result.returncode == 0, result.stderr
    assert "**missed**: the plan" in (tmp_path / "performance.rst").read_text(encoding="utf-8")
    assert "0 of the 2 rows" in (tmp_path / "performance.rst").read_text(encoding="utf-8")
