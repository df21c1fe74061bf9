"""examples/prometheus_export.py: run it, scrape it over HTTP, and parse what Prometheus would read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "prometheus_export.py"


def example(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLE), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``(sample name, sorted labels) -> value`` of every sample, checking each family's type."""
    out = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    for name in ("stockpyle_hits", "stockpyle_misses", "stockpyle_layer_hits", "stockpyle_layer_backfills"):
        assert types[name] == "counter", name
    for name in (
        "stockpyle_latency_seconds",
        "stockpyle_layer_latency_seconds",
        "stockpyle_layer_pending_invalidations",
    ):
        assert types[name] == "gauge", name
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def check_consistent(found: dict[Any, float]) -> None:
    layers = {"0": "ThreadLocalStore", "1": "ProcessMemoryStore"}
    hits = [
        value(found, "stockpyle_layer_hits_total", store="catalog", layer=i, layer_store=s) for i, s in layers.items()
    ]
    assert all(h > 0 for h in hits)
    # the chain's hits are its layers' hits; its misses are those of the last layer
    assert value(found, "stockpyle_hits_total", store="catalog") == sum(hits)
    assert value(found, "stockpyle_misses_total", store="catalog") == value(
        found, "stockpyle_layer_misses_total", store="catalog", layer="1", layer_store="ProcessMemoryStore"
    )
    # every object the bottom layer answered was back-filled into the top one
    assert (
        value(found, "stockpyle_layer_backfills_total", store="catalog", layer="0", layer_store="ThreadLocalStore") > 0
    )
    for labels in (
        {"layer": "0", "layer_store": "ThreadLocalStore"},
        {"layer": "1", "layer_store": "ProcessMemoryStore"},
    ):
        median = value(found, "stockpyle_layer_latency_seconds", store="catalog", quantile="0.5", **labels)
        p99 = value(found, "stockpyle_layer_latency_seconds", store="catalog", quantile="0.99", **labels)
        assert 0 < median <= p99 < 1
    # a plain store: its own counters and its sampled get latency
    assert value(found, "stockpyle_puts_total", store="sessions") == 200
    median = value(found, "stockpyle_latency_seconds", store="sessions", operation="get", quantile="0.5")
    assert 0 < median <= value(found, "stockpyle_latency_seconds", store="sessions", operation="get", quantile="0.99")


@pytest.fixture
def served() -> Iterator[tuple[subprocess.Popen[str], str]]:
    process = example("--port", "0", "--products", "300", "--operations", "3000")
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # printed once the server listens
        assert line.startswith("serving metrics on http://127.0.0.1:"), line + (
            process.stderr.read() if process.stderr else ""
        )
        yield process, line.split()[3]
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)  # also closes the pipes


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return str(response.read().decode("utf-8"))


def test_scraped_metrics_describe_the_chain_and_its_layers(served: tuple[subprocess.Popen[str], str]) -> None:
    process, url = served
    first = samples(scrape(url))
    check_consistent(first)
    # the example keeps the stores busy: a later scrape sees the counters grow
    deadline = time.monotonic() + 15
    while True:
        later = samples(scrape(url))
        if value(later, "stockpyle_hits_total", store="catalog") > value(
            first, "stockpyle_hits_total", store="catalog"
        ):
            break
        assert time.monotonic() < deadline, "the counters did not move between scrapes"
        time.sleep(0.3)
    check_consistent(later)
    process.send_signal(signal.SIGINT)  # Ctrl-C stops it cleanly
    assert process.wait(timeout=15) == 0


def test_print_writes_one_exposition() -> None:
    process = example("--print", "--products", "300", "--operations", "3000")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    check_consistent(samples(out))


def test_the_collector_refuses_nothing_the_registry_checks() -> None:
    # registering validates the names describe() announces; a second collector
    # with the same namespace clashes, one with another namespace does not
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import prometheus_export
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    from prometheus_client import CollectorRegistry

    from stockpyle import ProcessMemoryStore

    registry = CollectorRegistry()
    registry.register(prometheus_export.StockpyleCollector({"a": ProcessMemoryStore()}))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(prometheus_export.StockpyleCollector({"b": ProcessMemoryStore()}))
    registry.register(prometheus_export.StockpyleCollector({"b": ProcessMemoryStore()}, namespace="other"))
    assert "other_hits_total" in prometheus_client.generate_latest(registry).decode()
