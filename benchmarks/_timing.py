"""Shared machinery of the benchmark scripts: interleaved timing, result rows, a private memcached.

The machine these run on is shared and noisy, so rows are never timed one
after the other: :func:`interleaved` times every row once per round, for many
rounds, and reports per-row medians and *medians of per-round ratios*.  A burst
of load from elsewhere then slows every row of that round alike and leaves the
ratios intact.

Every ``bench_*.py`` module exposes ``run(*, quick: bool = False) -> Suite``;
``python -m stockpyle bench`` imports them and aggregates their rows, and
each script still runs on its own (``python benchmarks/bench_memory.py``)
through :func:`standalone`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------
# timing


@dataclass
class Timing:
    """Per-call nanoseconds of one row, one sample per round."""

    name: str
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def ratio_to(self, other: Timing) -> float:
        """Median over rounds of ``self / other`` measured in the same round."""
        return statistics.median(a / b for a, b in zip(self.samples, other.samples, strict=True))


def _per_call_ns(operation: Callable[[], object], number: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(number):
        operation()
    return (time.perf_counter_ns() - start) / number


def interleaved(
    rows: Sequence[tuple[str, Callable[[], object]]],
    *,
    number: int = 5_000,
    rounds: int = 15,
    ops_per_call: int = 1,
    before: Callable[[], object] | None = None,
    warmup: bool = True,
) -> dict[str, Timing]:
    """Time every row ``number`` calls per round for ``rounds`` rounds, rows interleaved.

    :param ops_per_call: operations one call performs (a loop over 250 keys
        is 250); samples are nanoseconds per operation.
    :param before: called, untimed, before each row's sample (e.g. to empty
        the caches so that every sample measures the same depth).
    :param warmup: call every row a few times first (warms lazy paths).

    The garbage collector is paused while timing, as :mod:`timeit` does.
    """
    results = {name: Timing(name, []) for name, _ in rows}
    if warmup:
        for _, operation in rows:
            if before is not None:
                before()
            _per_call_ns(operation, max(1, number // 10))
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, operation in rows:
                if before is not None:
                    before()
                results[name].samples.append(_per_call_ns(operation, number) / ops_per_call)
    finally:
        if gc_was_enabled:
            gc.enable()
    return results


# ---------------------------------------------------------------------------
# results


@dataclass
class Row:
    """One comparison: a stockpyle operation against a peer or hand-written baseline.

    ``ratio`` is stockpyle / baseline (below 1.0: stockpyle is faster or
    smaller), the median of per-round ratios for timings.
    """

    suite: str
    name: str
    median: float
    baseline: str
    baseline_median: float
    ratio: float
    target: str = ""
    unit: str = "ns"
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Suite:
    """What one benchmark module measured: its rows and notes (skipped peers...)."""

    name: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def compare(
        self,
        results: dict[str, Timing],
        name: str,
        baseline: str,
        *,
        label: str | None = None,
        baseline_label: str | None = None,
        target: str = "",
        note: str = "",
    ) -> None:
        """Add the row ``results[name]`` against ``results[baseline]`` (if both were measured)."""
        if name not in results or baseline not in results:
            return
        ours, theirs = results[name], results[baseline]
        self.rows.append(
            Row(
                self.name,
                label or name,
                ours.median,
                baseline_label or baseline,
                theirs.median,
                ours.ratio_to(theirs),
                target,
                "ns",
                note,
            )
        )


def format_quantity(value: float, unit: str) -> str:
    """``1234.5, "ns"`` -> ``"1.23 us"``; bytes stay bytes."""
    if unit != "ns":
        return f"{value:,.0f} {unit}"
    if value >= 1_000_000:
        return f"{value / 1_000_000:.2f} ms"
    if value >= 1_000:
        return f"{value / 1_000:.2f} us"
    return f"{value:.0f} ns"


def print_suite(suite: Suite) -> None:
    """Plain-text table of a suite (the CLI draws its own)."""
    for note in suite.notes:
        print(f"note: {note}")
    if not suite.rows:
        print(f"{suite.name}: no rows measured")
        return
    width = max(len(row.name) for row in suite.rows)
    bwidth = max(len(row.baseline) for row in suite.rows)
    print(f"{'operation':{width}}  {'stockpyle':>10}  {'baseline':{bwidth}}  {'baseline':>10}  {'ratio':>6}  target")
    for row in suite.rows:
        print(
            f"{row.name:{width}}  {format_quantity(row.median, row.unit):>10}  {row.baseline:{bwidth}}  "
            f"{format_quantity(row.baseline_median, row.unit):>10}  {row.ratio:6.2f}  {row.target}"
        )


def standalone(run: Callable[..., Suite], description: str) -> int:
    """``main()`` of a benchmark script: parse ``--quick``, run, print the table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller sizes")
    args = parser.parse_args()
    print_suite(run(quick=args.quick))
    return 0


# ---------------------------------------------------------------------------
# services


class MemcachedMissing(RuntimeError):
    """The ``memcached`` binary is not installed, or it did not start."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def memcached(memory_mb: int = 64) -> Iterator[str]:
    """A private memcached on a free loopback port; yields ``"127.0.0.1:PORT"``, stops it by PID.

    :raises MemcachedMissing: when the binary is missing or the server does not answer.
    """
    binary = shutil.which("memcached") or ("/usr/bin/memcached" if os.path.exists("/usr/bin/memcached") else None)
    if binary is None:
        raise MemcachedMissing("memcached binary not found (apt-get install memcached)")
    port = _free_port()
    cmd = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", str(memory_mb)]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd += ["-u", "root"]  # memcached refuses to run as root without it
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise MemcachedMissing(f"memcached did not start on 127.0.0.1:{port}") from None
                time.sleep(0.02)
        yield f"127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
        process.wait(10)


def postgres_url() -> str:
    """The PostgreSQL URL the benchmarks use (``STOCKPYLE_POSTGRES_URL`` or the loopback default)."""
    return os.environ.get("STOCKPYLE_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
