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

Pinning (``--pin``, see :func:`set_pin`): a loopback round trip between two
vCPUs of this kind of VM costs ~100 us, most of it waking the idle vCPU; on
one vCPU it is ~15-20 us.  Unpinned runs flip between the two regimes, so by
default (``same``) the benchmark process measures on one CPU
(:func:`pinned_client`) and every server it starts runs on that same CPU
(:func:`server_command`, ``taskset -c``).  ``split`` puts the servers on
another CPU than the client, ``off`` pins nothing.

A row's target (``"<= 1.20"``, ``"<= 1/3"``) is checked against its ratio:
:attr:`Row.met` is True, False, or None for a row without a target.
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
# pinning

#: the ``--pin`` choices: client and servers on one CPU, on two different CPUs, or not pinned
PIN_MODES = ("same", "split", "off")
#: the CPU ``same`` prefers (CPU 0 takes most interrupts and housekeeping)
PREFERRED_CPU = 1
_pin = {"mode": "same"}
# the CPUs this process may use, as it started (before any pinning)
_START_CPUS: tuple[int, ...] = tuple(sorted(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ()


def set_pin(mode: str) -> None:
    """Choose the pinning of every benchmark run after this call (one of :data:`PIN_MODES`)."""
    if mode not in PIN_MODES:
        raise ValueError(f"--pin must be one of {', '.join(PIN_MODES)}; got {mode!r}")
    _pin["mode"] = mode


def pin_mode() -> str:
    """The pinning chosen with :func:`set_pin` (default ``"same"``)."""
    return _pin["mode"]


def pin_cpus() -> tuple[int | None, int | None]:
    """``(client CPU, server CPU)`` for the chosen mode; ``None`` where nothing is pinned.

    ``split`` on a machine with one usable CPU falls back to ``same``.
    """
    mode = pin_mode()
    if mode == "off" or not _START_CPUS:
        return None, None
    cpu = PREFERRED_CPU if PREFERRED_CPU in _START_CPUS else _START_CPUS[-1]
    if mode == "split" and len(_START_CPUS) > 1:
        other = next(c for c in _START_CPUS if c != cpu)
        return cpu, other
    return cpu, cpu


def pin_note() -> str:
    """How this run is pinned, for a suite's notes."""
    client, server = pin_cpus()
    if client is None:
        return "not pinned (--pin off): client and servers float over the CPUs; round trips mix two regimes"
    if server is not None and shutil.which("taskset") is None:
        return f"client pinned to CPU {client}; taskset not found, servers not pinned"
    if client == server:
        return f"client and servers pinned to CPU {client} (--pin same)"
    return f"client pinned to CPU {client}, servers to CPU {server} (--pin split)"


def server_command(cmd: list[str]) -> list[str]:
    """``cmd`` prefixed with ``taskset -c CPU`` for the chosen pinning (unchanged when nothing is pinned)."""
    _client, server = pin_cpus()
    if server is None or shutil.which("taskset") is None:
        return cmd
    return ["taskset", "-c", str(server), *cmd]


@contextlib.contextmanager
def pinned_client() -> Iterator[None]:
    """Run this process on the chosen client CPU while measuring, then restore its affinity."""
    client, _server = pin_cpus()
    if client is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {client})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


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
    #: whether ``ratio`` meets ``target`` (None without a target); computed when not given
    met: bool | None = None

    def __post_init__(self) -> None:
        if self.met is None:
            self.met = target_met(self.ratio, self.target)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_limit(target: str) -> float | None:
    """The bound of a target such as ``"<= 1.20"``, ``"<= 1.25x"`` or ``"<= 1/3"`` (None: no target).

    :raises ValueError: for a target in another form (a typo must not pass silently).
    """
    text = target.strip()
    if not text:
        return None
    if not text.startswith("<="):
        raise ValueError(f"a target reads '<= N' (N a number or a fraction like 1/3); got {target!r}")
    bound = text[2:].strip().removesuffix("x").strip()
    numerator, slash, denominator = bound.partition("/")
    try:
        return float(numerator) / float(denominator) if slash else float(bound)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"a target reads '<= N' (N a number or a fraction like 1/3); got {target!r}") from None


def target_met(ratio: float, target: str) -> bool | None:
    """Whether ``ratio`` meets ``target`` (None when the row has no target)."""
    limit = target_limit(target)
    if limit is None:
        return None
    return bool(ratio <= limit)


def verdict(row: Row | dict[str, Any]) -> str:
    """``"met"``/``"MISSED"`` for a row with a target, ``""`` without one."""
    met = row.met if isinstance(row, Row) else row.get("met")
    return "" if met is None else ("met" if met else "MISSED")


def target_summary(rows: Sequence[Row | dict[str, Any]]) -> str:
    """``"targets met: 5 of 6 (missed: ...)"`` for the rows that have a target."""
    judged = [r for r in rows if (r.met if isinstance(r, Row) else r.get("met")) is not None]
    missed = [r for r in judged if not (r.met if isinstance(r, Row) else r.get("met"))]
    text = f"targets met: {len(judged) - len(missed)} of {len(judged)}"
    if missed:
        names = "; ".join(f"{r.name if isinstance(r, Row) else r['name']}" for r in missed)
        text += f" (missed: {names})"
    return text


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
            f"{format_quantity(row.baseline_median, row.unit):>10}  {row.ratio:6.2f}  {row.target} {verdict(row)}"
        )
    print(target_summary(suite.rows))


def add_pin_option(parser: argparse.ArgumentParser) -> None:
    """The ``--pin same|split|off`` option (see "Pinning" in the module docs)."""
    parser.add_argument(
        "--pin",
        choices=PIN_MODES,
        default="same",
        help="same (default): the benchmark and the servers it starts on one CPU; split: on two different CPUs; "
        "off: not pinned",
    )


def standalone(run: Callable[..., Suite], description: str) -> int:
    """``main()`` of a benchmark script: parse ``--quick`` and ``--pin``, run, print the table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller sizes")
    add_pin_option(parser)
    args = parser.parse_args()
    set_pin(args.pin)
    with pinned_client():
        suite = run(quick=args.quick)
    suite.notes.append(pin_note())
    print_suite(suite)
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
def memcached(memory_mb: int = 64, threads: int | None = None) -> Iterator[str]:
    """A private memcached on a free loopback port, pinned as chosen; yields ``"127.0.0.1:PORT"``, stops it by PID.

    :raises MemcachedMissing: when the binary is missing or the server does not answer.
    """
    binary = shutil.which("memcached") or ("/usr/bin/memcached" if os.path.exists("/usr/bin/memcached") else None)
    if binary is None:
        raise MemcachedMissing("memcached binary not found (apt-get install memcached)")
    port = _free_port()
    cmd = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", str(memory_mb)]
    if threads is not None:
        cmd += ["-t", str(threads)]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd += ["-u", "root"]  # memcached refuses to run as root without it
    process = subprocess.Popen(server_command(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
