"""The stockpyle quickstart, in memory only: no server and no extra package needed.

Run it from a checkout, in the virtual environment that ``bash scripts/demo``
makes: ``.venv/bin/python examples/quickstart.py``.
It stores objects, reads them back through alternate keys and batches, layers
a per-thread cache over a process-wide one with different lifetimes, and ends
with the chain's per-layer statistics.  Every result is checked; the script
exits with status 0 when all checks pass.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from stockpyle import ChainedStore, ProcessMemoryStore, Storable, ThreadLocalStore


class Product:
    """Found by its stock-keeping number, or by vendor and the vendor's part code."""

    __stockpyle_keys__: ClassVar[list[Any]] = ["sku", ("vendor", "vendor_code")]

    def __init__(self, sku: str, vendor: str, vendor_code: str, name: str) -> None:
        self.sku = sku
        self.vendor = vendor
        self.vendor_code = vendor_code
        self.name = name

    def __repr__(self) -> str:
        return f"Product({self.sku!r}, {self.name!r})"


class Account(Storable):
    """A Storable class: the objects put and delete themselves."""

    __stockpyle_keys__: ClassVar[list[Any]] = [("region", "number")]

    def __init__(self, region: str, number: int, owner: str) -> None:
        self.region = region
        self.number = number
        self.owner = owner


def check(condition: bool, what: str) -> None:
    """Stop with a non-zero exit status when a result is not what the docs promise."""
    # not ``assert``: the checks must also run under ``python -O``
    if not condition:
        raise SystemExit(f"quickstart check failed: {what}")


def section(title: str) -> None:
    print(f"\n== {title}")


def show(label: str, value: object) -> None:
    print(f"  {label:<46} -> {value!r}")


def basics() -> None:
    section("ProcessMemoryStore: put, get by alternate keys, delete")
    store = ProcessMemoryStore()
    kettle = Product("K-100", "acme", "KT-1", "kettle")
    store.put(kettle)
    print(f"  stored {kettle!r} under 'sku' and ('vendor', 'vendor_code')")

    by_sku = store.get(Product, {"sku": "K-100"})
    by_vendor = store.get(Product, {"vendor": "acme", "vendor_code": "KT-1"})
    show("get(Product, {'sku': 'K-100'})", by_sku)
    show("get(Product, {'vendor': 'acme', ...'KT-1'})", by_vendor)
    check(by_sku is kettle and by_vendor is kettle, "both keys find the stored kettle")

    # the key types must match: the int 100 is not the string "100"
    typed = store.get(Product, {"sku": 100})
    show("get(Product, {'sku': 100})  (an int key)", typed)
    check(typed is None, "the int 100 is not the key 'K-100'")

    kettle.vendor_code = "KT-2"
    store.put(kettle)
    stale = store.get(Product, {"vendor": "acme", "vendor_code": "KT-1"})
    show("after the code changed, old key", stale)
    check(stale is None, "the old vendor code no longer finds the product")

    store.delete(kettle)
    gone = store.get(Product, {"sku": "K-100"})
    show("after delete, get by sku", gone)
    check(gone is None, "a deleted product is gone")


def batches() -> None:
    section("Batches: one call for many objects, None for each miss")
    store = ProcessMemoryStore()
    products = [
        Product("T-1", "acme", "TS-9", "toaster"),
        Product("M-7", "zeta", "MX-2", "mixer"),
    ]
    store.batch_put(products)
    print(f"  batch_put {products!r}")
    found = store.batch_get(Product, [{"sku": "M-7"}, {"sku": "missing"}, {"sku": "T-1"}])
    show("batch_get M-7, missing, T-1", found)
    check(found == [products[1], None, products[0]], "batch_get answers in request order")

    store.batch_delete(products)
    after = store.batch_get(Product, [{"sku": "T-1"}, {"sku": "M-7"}])
    show("after batch_delete", after)
    check(after == [None, None], "batch_delete removed both")


def chained() -> ChainedStore:
    section("ChainedStore: a per-thread cache over a process-wide cache")
    thread_cache = ThreadLocalStore()
    process_cache = ProcessMemoryStore()
    # each layer has its own lifetime: the top forgets quickly, the lower one later
    thread_cache.configure(classes=[Product], lifetime=0.2)
    process_cache.configure(classes=[Product], lifetime=60)
    chain = ChainedStore([thread_cache, process_cache])

    lamp = Product("L-3", "acme", "LP-3", "lamp")
    chain.put(lamp)  # written to the process cache first, then the thread cache
    print(f"  put {lamp!r} through the chain (bottom layer first)")
    show("thread layer holds it", thread_cache.get(Product, {"sku": "L-3"}))
    show("process layer holds it", process_cache.get(Product, {"sku": "L-3"}))
    check(thread_cache.get(Product, {"sku": "L-3"}) is lamp, "the put reached the thread layer")
    check(process_cache.get(Product, {"sku": "L-3"}) is lamp, "the put reached the process layer")

    first = chain.get(Product, {"sku": "L-3"})
    show("get L-3 (answered by the thread layer)", first)
    check(first is lamp, "the chain returns the lamp")

    time.sleep(0.3)  # past the thread layer's 0.2 s lifetime, well within 60 s
    expired = thread_cache.get(Product, {"sku": "L-3"})
    show("0.3 s later, thread layer alone", expired)
    check(expired is None, "the thread layer forgot the lamp after 0.2 s")

    again = chain.get(Product, {"sku": "L-3"})
    show("get L-3 (process layer answers, backfills)", again)
    check(again is lamp, "the process layer still has the lamp")
    refilled = thread_cache.get(Product, {"sku": "L-3"})
    show("thread layer after the backfill", refilled)
    check(refilled is lamp, "the get backfilled the thread layer")

    fan = Product("F-9", "zeta", "FN-1", "fan")
    process_cache.put(fan)  # only the lower layer has it
    both = chain.batch_get(Product, [{"sku": "L-3"}, {"vendor": "zeta", "vendor_code": "FN-1"}, {"sku": "nope"}])
    show("batch_get L-3, (zeta, FN-1), nope", both)
    check(both == [lamp, fan, None], "batch_get through the chain")
    return chain


def storable() -> None:
    section("Storable: objects that store themselves")
    Account.bind_store(ProcessMemoryStore())
    Account("eu", 1, "Ada").put()
    Account.batch_put([Account("us", 2, "Grace"), Account("eu", 3, "Edsger")])

    ada = Account.get({"region": "eu", "number": 1})
    show("Account.get(eu, 1).owner", ada.owner if ada else None)
    check(ada is not None and ada.owner == "Ada", "Account.get finds Ada")

    found = Account.batched_get([{"region": "us", "number": 2}, {"region": "us", "number": 9}])
    owners = [a.owner if a else None for a in found]
    show("Account.batched_get(us 2, us 9) owners", owners)
    check(owners == ["Grace", None], "batched_get answers in order")

    if ada is not None:
        ada.delete()
    show("after ada.delete(), Account.get(eu, 1)", Account.get({"region": "eu", "number": 1}))
    check(Account.get({"region": "eu", "number": 1}) is None, "a deleted account is gone")
    Account.unbind_store()


def report(chain: ChainedStore) -> None:
    section("Per-layer statistics of the chain")
    print(f"  {'layer':<20}{'hits':>6}{'misses':>8}{'errors':>8}{'backfills':>11}{'hit ratio':>11}")
    for layer in chain.stats():
        print(
            f"  {type(layer.store).__name__:<20}{layer.hits:>6}{layer.misses:>8}"
            f"{layer.errors:>8}{layer.backfills:>11}{layer.hit_ratio:>11.2f}"
        )
    top, bottom = chain.stats()
    # top: hit on the first get, missed after expiry, then in the batch hit L-3
    # and missed the other two; bottom: answered the expired L-3 and the fan
    check((top.hits, top.misses, top.backfills, top.errors) == (2, 3, 2, 0), "thread layer counters")
    check((bottom.hits, bottom.misses, bottom.backfills, bottom.errors) == (2, 1, 0, 0), "process layer counters")


def main() -> None:
    basics()
    batches()
    chain = chained()
    storable()
    report(chain)
    chain.release()
    print("\nAll quickstart checks passed.")


if __name__ == "__main__":
    main()
