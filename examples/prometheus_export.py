"""Export stockpyle's statistics to Prometheus with the official client library.

A custom collector (:class:`StockpyleCollector`) reads ``store.stats()`` --
and, for a :class:`~stockpyle.ChainedStore`, the per-layer statistics in
``chain.stats().layers`` -- each time Prometheus scrapes, and turns them into
metric families of ``prometheus_client``; the library writes the exposition
format. Nothing is counted twice and nothing runs between scrapes.

Run it (needs ``pip install prometheus-client``)::

    python examples/prometheus_export.py               # serves http://127.0.0.1:8000/metrics
    python examples/prometheus_export.py --port 0      # any free port (printed)
    python examples/prometheus_export.py --print       # one exposition to stdout, then exit

It keeps a small catalogue in ``ChainedStore([ThreadLocalStore,
ProcessMemoryStore])`` and a plain session store busy while it serves, so the
numbers move.
In an application, register the collector once, next to the stores::

    registry.register(StockpyleCollector({"catalog": chain, "sessions": memcache_store}))
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from stockpyle import ChainedStore, ProcessMemoryStore, ThreadLocalStore

#: Counters of every store: StoreStats attribute -> what the metric counts.
STORE_COUNTERS = {
    "hits": "lookups that found an object",
    "misses": "lookups that found nothing",
    "puts": "objects written",
    "deletes": "objects deleted",
    "errors": "operations that raised a backend error",
}
#: Counters of each layer of a chain: LayerStats attribute -> what the metric counts.
LAYER_COUNTERS = {
    "hits": "lookups this layer answered",
    "misses": "lookups this layer was asked and could not answer",
    "errors": "failures of this layer that the chain absorbed",
    "backfills": "objects written into this layer because a lower layer had them",
    "skipped": "operations not sent to this layer because its circuit breaker was open",
    "breaker_opens": "times this layer's circuit breaker opened",
}
#: Quantile label -> LatencySummary attribute.
QUANTILES = {"0.5": "median", "0.99": "p99"}


class StockpyleCollector:
    """A Prometheus collector for the statistics of named stockpyle stores.

    Every scrape calls ``stats()`` on each store. Counters are exported as
    Prometheus counters (``_total``); a store's ``reset_stats()`` looks like a
    counter reset, which ``rate()`` and ``increase()`` handle. Latencies are
    the median and 99th percentile of a window of recent sampled calls, so
    they are gauges with a ``quantile`` label, not a Prometheus summary
    (which would need a cumulative count and sum).

    :param stores: label value -> store (any store, or a ChainedStore).
    :param namespace: the prefix of every metric name.
    """

    def __init__(self, stores: Mapping[str, Any], namespace: str = "stockpyle") -> None:
        self.stores = dict(stores)
        self.namespace = namespace

    def describe(self) -> Iterable[Metric]:
        # the same families without samples: lets the registry check for name clashes
        # without calling stats() at registration
        return self._families()

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        by_name = {family.name: family for family in families}
        ns = self.namespace
        for name, store in self.stores.items():
            stats = store.stats()
            for attribute in STORE_COUNTERS:
                by_name[f"{ns}_{attribute}"].add_metric([name], getattr(stats, attribute))
            for operation, window in sorted(stats.latency.items()):
                summary = window.summary()
                by_name[f"{ns}_latency_samples"].add_metric([name, operation], summary.samples)
                for quantile, attribute in QUANTILES.items():
                    by_name[f"{ns}_latency_seconds"].add_metric(
                        [name, operation, quantile], getattr(summary, attribute)
                    )
            # a ChainedStore's stats() also holds one LayerStats per layer
            for index, layer in enumerate(getattr(stats, "layers", ())):
                labels = [name, str(index), type(layer.store).__name__]
                for attribute in LAYER_COUNTERS:
                    by_name[f"{ns}_layer_{attribute}"].add_metric(labels, getattr(layer, attribute))
                by_name[f"{ns}_layer_pending_invalidations"].add_metric(labels, layer.pending_invalidations)
                summary = layer.latency.summary()
                by_name[f"{ns}_layer_latency_samples"].add_metric(labels, summary.samples)
                for quantile, attribute in QUANTILES.items():
                    by_name[f"{ns}_layer_latency_seconds"].add_metric([*labels, quantile], getattr(summary, attribute))
        yield from families

    def _families(self) -> list[Metric]:
        ns = self.namespace
        layer_labels = ["store", "layer", "layer_store"]
        families: list[Metric] = [
            CounterMetricFamily(f"{ns}_{attribute}", f"stockpyle: {text}", labels=["store"])
            for attribute, text in STORE_COUNTERS.items()
        ]
        families += [
            GaugeMetricFamily(
                f"{ns}_latency_seconds",
                "stockpyle: call duration over recent sampled calls (median and p99)",
                labels=["store", "operation", "quantile"],
            ),
            GaugeMetricFamily(
                f"{ns}_latency_samples",
                "stockpyle: sampled calls the latency figures come from",
                labels=["store", "operation"],
            ),
        ]
        families += [
            CounterMetricFamily(f"{ns}_layer_{attribute}", f"stockpyle chain layer: {text}", labels=layer_labels)
            for attribute, text in LAYER_COUNTERS.items()
        ]
        families += [
            GaugeMetricFamily(
                f"{ns}_layer_pending_invalidations",
                "stockpyle chain layer: objects to invalidate in it when it is reachable again",
                labels=layer_labels,
            ),
            GaugeMetricFamily(
                f"{ns}_layer_latency_seconds",
                "stockpyle chain layer: lookup duration over recent sampled lookups (median and p99)",
                labels=[*layer_labels, "quantile"],
            ),
            GaugeMetricFamily(
                f"{ns}_layer_latency_samples",
                "stockpyle chain layer: sampled lookups the latency figures come from",
                labels=layer_labels,
            ),
        ]
        return families


# ---------------------------------------------------------------------------
# a small workload to export


class Product:
    __stockpyle_keys__ = ("sku",)

    def __init__(self, sku: str, price: int) -> None:
        self.sku = sku
        self.price = price


class Session:
    __stockpyle_keys__ = ("token",)

    def __init__(self, token: str) -> None:
        self.token = token


def make_stores(products: int) -> dict[str, Any]:
    """The stores to export: a two-layer chain holding the catalogue, and a plain session store."""
    local = ThreadLocalStore(maxsize=max(1, products // 20))
    shared = ProcessMemoryStore()
    shared.batch_put([Product(f"P-{n}", n) for n in range(products)])  # the lower layer has them all
    sessions = ProcessMemoryStore(lifetime_cb=lambda session: 1800)
    return {"catalog": ChainedStore([local, shared]), "sessions": sessions}


def run_workload(stores: Mapping[str, Any], products: int, operations: int, seed: int = 1) -> None:
    """Look products up (a few very often, most rarely), change some of them, and touch sessions."""
    rng = random.Random(seed)
    catalog, sessions = stores["catalog"], stores["sessions"]
    weights = [1.0 / (rank + 1) for rank in range(products)]
    for n in rng.choices(range(products), weights=weights, k=operations):
        if rng.random() < 0.05:
            catalog.put(Product(f"P-{n}", rng.randrange(1000)))
        else:
            catalog.get(Product, {"sku": f"P-{n}"})
        if rng.random() < 0.01:
            catalog.get(Product, {"sku": "no-such-product"})
        token = f"s{rng.randrange(200)}"
        if sessions.get(Session, {"token": token}) is None:
            sessions.put(Session(token))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve stockpyle's statistics as Prometheus metrics.")
    parser.add_argument("--port", type=int, default=8000, help="port to serve /metrics on, 0 = any (default: 8000)")
    parser.add_argument("--print", action="store_true", help="print one exposition to stdout and exit")
    parser.add_argument("--products", type=int, default=500, help="products in the catalogue (default: 500)")
    parser.add_argument(
        "--operations", type=int, default=5_000, help="operations per burst of the workload (default: 5000)"
    )
    args = parser.parse_args(argv)

    stores = make_stores(args.products)
    registry = CollectorRegistry()
    registry.register(StockpyleCollector(stores))
    run_workload(stores, args.products, args.operations)
    if args.print:
        sys.stdout.write(generate_latest(registry).decode("utf-8"))
        return 0

    server, _thread = start_http_server(args.port, addr="127.0.0.1", registry=registry)
    print(f"serving metrics on http://127.0.0.1:{server.server_port}/metrics (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    try:
        burst = 1
        while not stop.wait(1.0):  # a burst of traffic every second, so the numbers move
            run_workload(stores, args.products, args.operations // 10, seed=burst)
            burst += 1
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        for store in stores.values():
            store.release()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
