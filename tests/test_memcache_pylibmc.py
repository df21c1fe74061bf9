"""MemcacheStore(driver="pylibmc") against real memcached: contracts, several servers, failures, mixed drivers."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from pymemcache.client.base import Client
from support.memcached import fresh_namespace
from support.services import services_required

from stockpyle import ChainedStore, MemcacheStore, ProcessMemoryStore
from stockpyle.exceptions import ConfigurationError, StoreUnavailableError
from stockpyle.keys import lookup_key
from stockpyle.stores.drivers import supports_leases
from stockpyle.stores.drivers.pylibmc import HashRing
from stockpyle.stores.drivers.pymemcache import PLACEMENT_KEY
from stockpyle.testing import ConsistencyContract, Item, StoreContract

pytestmark = pytest.mark.memcache

# pylibmc publishes wheels for CPython 3.10 and 3.11 only (the extra has the same marker);
# where a wheel exists a missing pylibmc is a broken environment, never a skip.
NO_WHEEL = sys.version_info >= (3, 12)
try:
    import pylibmc  # noqa: F401
except ImportError:
    if not NO_WHEEL and services_required():
        raise
    pytest.skip(
        "pylibmc is not installed"
        + (" (no wheel for CPython 3.12+, the sdist needs libmemcached headers)" if NO_WHEEL else ""),
        allow_module_level=True,
    )


class TestPylibmcContract(StoreContract):
    short_lifetime: ClassVar[float] = 2
    expiry_wait: ClassVar[float] = 3.2

    @pytest.fixture(autouse=True)
    def _server(self, memcached_server: Any) -> None:
        self.address = memcached_server.address

    def make_store(self, **options: Any) -> Any:
        return MemcacheStore([self.address], driver="pylibmc", namespace=fresh_namespace(), **options)


class TestPylibmcClusterContract(StoreContract):
    short_lifetime: ClassVar[float] = 2
    expiry_wait: ClassVar[float] = 3.2

    @pytest.fixture(autouse=True)
    def _cluster(self, memcached_factory: Any) -> None:
        self.addresses = [p.address for p in memcached_factory.start(count=3)]

    def make_store(self, **options: Any) -> Any:
        return MemcacheStore(self.addresses, driver="pylibmc", namespace=fresh_namespace(), **options)


class TestChainedPylibmcContract(StoreContract):
    short_lifetime: ClassVar[float] = 2
    expiry_wait: ClassVar[float] = 3.2

    @pytest.fixture(autouse=True)
    def _server(self, memcached_server: Any) -> None:
        self.address = memcached_server.address

    def make_store(self, **options: Any) -> Any:
        memcache = MemcacheStore([self.address], driver="pylibmc", namespace=fresh_namespace(), **options)
        return ChainedStore([ProcessMemoryStore(**options), memcache])


class TestPylibmcConsistency(ConsistencyContract):
    @pytest.fixture(autouse=True)
    def _server(self, memcached_server: Any) -> Iterator[None]:
        self.address = memcached_server.address
        self.stores: list[MemcacheStore] = []
        yield
        for store in self.stores:
            store.release()

    def make_store(self, **options: Any) -> Any:
        store = MemcacheStore([self.address], driver="pylibmc", namespace=fresh_namespace(), **options)
        self.stores.append(store)
        return store


class TestSignedPylibmcConsistency(TestPylibmcConsistency):
    def make_store(self, **options: Any) -> Any:
        return super().make_store(secret=b"pylibmc-consistency-secret", **options)


# ---------------------------------------------------------------------------
# construction


def test_bad_driver_name_is_a_configuration_error(memcached_server: Any) -> None:
    with pytest.raises(ConfigurationError, match="driver must be one of 'pymemcache', 'pylibmc'"):
        MemcacheStore([memcached_server.address], driver="libmemcached")


def test_pylibmc_refuses_a_client_and_bad_servers(memcached_server: Any) -> None:
    with pytest.raises(ConfigurationError, match="pass servers="):
        MemcacheStore(client=Client(memcached_server.address), driver="pylibmc")
    with pytest.raises(ConfigurationError, match="host:port"):
        MemcacheStore(["no-port"], driver="pylibmc")
    with pytest.raises(ConfigurationError, match="at least one"):
        MemcacheStore([], driver="pylibmc")


def test_missing_pylibmc_names_the_extra(memcached_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pylibmc", None)  # an import of it now fails
    with pytest.raises(ImportError, match=r"pip install 'stockpyle\[pylibmc\]'"):
        MemcacheStore([memcached_server.address], driver="pylibmc")


def test_no_leases_so_the_chain_falls_back_to_single_flight(memcached_server: Any) -> None:
    store = MemcacheStore([memcached_server.address], driver="pylibmc", namespace=fresh_namespace())
    assert not supports_leases(store._driver)
    assert store.driver_name == "pylibmc"
    assert store.client is None


# ---------------------------------------------------------------------------
# the same keys and envelopes as the pymemcache driver


def test_entries_are_shared_with_the_pymemcache_driver_on_one_server(memcached_server: Any) -> None:
    namespace = fresh_namespace()
    fast = MemcacheStore([memcached_server.address], driver="pylibmc", namespace=namespace, secret=b"s" * 16)
    plain = MemcacheStore([memcached_server.address], namespace=namespace, secret=b"s" * 16)
    try:
        fast.put(Item("k1", 1, 2, "written by pylibmc"))
        plain.put(Item("k2", 3, 4, "written by pymemcache"))
        assert fast.memcache_key(lookup_key(Item, {"key": "k1"})) == plain.memcache_key(lookup_key(Item, {"key": "k1"}))
        assert plain.get(Item, {"key": "k1"}).payload == "written by pylibmc"
        assert fast.get(Item, {"zap": 3, "bar": 4}).payload == "written by pymemcache"
        fast.delete(Item("k2", 3, 4))
        assert plain.get(Item, {"key": "k2"}) is None
    finally:
        fast.release()
        plain.release()


def test_flags_never_make_pylibmc_unpickle_a_planted_value(memcached_server: Any) -> None:
    store = MemcacheStore([memcached_server.address], driver="pylibmc", namespace=fresh_namespace())
    raw = Client(memcached_server.address, default_noreply=False)
    key = store.memcache_key(lookup_key(Item, {"key": "planted"}))
    try:
        # flags 1 is pylibmc's own "pickled" flag; a stock pylibmc client would unpickle this
        assert raw.set(key, b"\x80\x04K\x01.", flags=1)
        assert store._driver.get(key) == b"\x80\x04K\x01."
        assert store.get(Item, {"key": "planted"}) is None  # not an envelope: rejected
        assert store.rejected == 1
    finally:
        raw.close()
        store.release()


# ---------------------------------------------------------------------------
# several servers


def test_keys_spread_over_every_server_and_batches_find_them(memcached_factory: Any) -> None:
    servers = memcached_factory.start(count=3)
    store = MemcacheStore([s.address for s in servers], driver="pylibmc", namespace=fresh_namespace())
    try:
        items = [Item(f"k{i}", i, -i, f"v{i}") for i in range(60)]
        store.batch_put(items)
        holders = []
        for server in servers:
            raw = Client(server.address, default_noreply=False)
            holders.append(
                sum(raw.get(store.memcache_key(lookup_key(Item, {"key": f"k{i}"}))) is not None for i in range(60))
            )
            raw.close()
        assert sum(holders) == 60
        assert all(count > 5 for count in holders), holders
        found = store.batch_get(Item, [{"key": f"k{i}"} for i in range(60)])
        assert [f.payload for f in found] == [f"v{i}" for i in range(60)]
    finally:
        store.release()


def test_a_paused_server_fails_its_keys_within_the_timeout_and_loses_nothing(memcached_factory: Any) -> None:
    servers = memcached_factory.start(count=2)
    store = MemcacheStore([s.address for s in servers], driver="pylibmc", namespace=fresh_namespace(), timeout=0.3)
    try:
        items = [Item(f"k{i}", i, -i, f"v{i}") for i in range(40)]
        store.batch_put(items)
        paused = servers[1]
        raw = Client(servers[0].address, default_noreply=False)
        on_live = {i for i in range(40) if raw.get(store.memcache_key(lookup_key(Item, {"key": f"k{i}"}))) is not None}
        raw.close()
        on_paused = set(range(40)) - on_live
        assert on_live
        assert on_paused
        paused.pause()
        try:
            # the first read of a paused server: libmemcached calls the timeout a miss, the driver does not
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                store.get(Item, {"key": f"k{min(on_paused)}"})
            assert time.monotonic() - started < 1.5
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError):
                store.batch_get(Item, [{"key": f"k{i}"} for i in range(40)])
            assert time.monotonic() - started < 1.5
            # a new object whose key lives on the paused server: its write fails (and is
            # invalidated); SIGCONT may still apply what the kernel buffered, so it is not checked
            ring = HashRing([s.address for s in servers])
            fresh = next(
                f"fresh-{n}"
                for n in range(1000)
                if ring.index(store.memcache_key(lookup_key(Item, {"key": f"fresh-{n}"}))) == 1
            )
            with pytest.raises(StoreUnavailableError):
                store.put(Item(fresh, 1000, 1000, "while paused"))
            # the other server keeps serving its keys
            assert store.get(Item, {"key": f"k{min(on_live)}"}).payload == f"v{min(on_live)}"
        finally:
            paused.resume()
        deadline = time.monotonic() + 5
        while True:  # libmemcached retries a failed server after retry_timeout (1 s)
            try:
                found = store.batch_get(Item, [{"key": f"k{i}"} for i in range(40)])
                break
            except StoreUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        # nothing lost: every entry is back on its server, none moved
        assert [f.payload for f in found] == [f"v{i}" for i in range(40)]
    finally:
        store.release()


def test_a_stopped_server_is_unavailable_not_a_miss(memcached_factory: Any) -> None:
    (server,) = memcached_factory.start(count=1)
    store = MemcacheStore([server.address], driver="pylibmc", namespace=fresh_namespace(), timeout=0.3)
    try:
        store.put(Item("k1", 1, 2, "v"))
        server.stop()
        with pytest.raises(StoreUnavailableError):
            store.put(Item("k2", 1, 2, "v"))
        # libmemcached may report the first read on a connection the server closed as a
        # miss (documented); from then on the server is marked failed and reads raise
        try:
            assert store.get(Item, {"key": "k1"}) is None
        except StoreUnavailableError:
            pass
        with pytest.raises(StoreUnavailableError):
            store.get(Item, {"key": "k1"})
    finally:
        store.release()


# ---------------------------------------------------------------------------
# mixed drivers


def test_a_fleet_used_by_one_driver_is_refused_by_the_other(memcached_factory: Any) -> None:
    addresses = [s.address for s in memcached_factory.start(count=2)]
    namespace = fresh_namespace()
    plain = MemcacheStore(addresses, namespace=namespace)
    fast = MemcacheStore(addresses, driver="pylibmc", namespace=namespace)
    try:
        plain.put(Item("k1", 1, 2, "v"))  # marks both servers, whichever its keys went to
        for address in addresses:
            raw = Client(address, default_noreply=False)
            assert raw.get(PLACEMENT_KEY) == b"pymemcache/rendezvous-murmur3/1"
            raw.close()
        with pytest.raises(ConfigurationError, match="never mix memcached drivers"):
            fast.get(Item, {"key": "k1"})
    finally:
        plain.release()
        fast.release()

    other = [s.address for s in memcached_factory.start(count=2)]
    fast = MemcacheStore(other, driver="pylibmc", namespace=namespace)
    plain = MemcacheStore(other, namespace=namespace)
    try:
        fast.batch_put([Item(f"k{i}", i, i, "v") for i in range(10)])
        with pytest.raises(ConfigurationError, match="pylibmc/blake2b-ring/1"):
            plain.batch_get(Item, [{"key": f"k{i}"} for i in range(10)])
    finally:
        plain.release()
        fast.release()


def test_one_server_may_be_shared_by_both_drivers(memcached_factory: Any) -> None:
    (server,) = memcached_factory.start(count=1)
    namespace = fresh_namespace()
    plain = MemcacheStore([server.address], namespace=namespace)
    fast = MemcacheStore([server.address], driver="pylibmc", namespace=namespace)
    try:
        plain.put(Item("k1", 1, 2, "v"))
        assert fast.get(Item, {"key": "k1"}).payload == "v"
        raw = Client(server.address, default_noreply=False)
        assert raw.get(PLACEMENT_KEY) is None  # one server: nothing to disagree on, no marker
        raw.close()
    finally:
        plain.release()
        fast.release()
