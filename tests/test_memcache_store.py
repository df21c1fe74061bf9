"""MemcacheStore against real memcached processes: contract, clients, keys, batches, lifetimes, sizes."""

from __future__ import annotations

import datetime as _dt
import pickle
import re
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any, ClassVar

import pytest
from pymemcache.client.base import Client, PooledClient
from pymemcache.client.hash import HashClient
from support.memcached import fresh_namespace, remaining_ttl

from stockpyle import ChainedStore, MemcacheStore, ProcessMemoryStore
from stockpyle.exceptions import (
    ConfigurationError,
    NotStorableError,
    SerializationError,
    StoreError,
    StoreUnavailableError,
    ValueTooLargeError,
)
from stockpyle.keys import lookup_key
from stockpyle.serializers import HMACSigner
from stockpyle.testing import Automobile, Car, Item, StoreContract

pytestmark = pytest.mark.memcache

# ---------------------------------------------------------------------------
# helpers


class CountingProxy:
    """Wraps a client and counts calls of its methods (the server is real)."""

    def __init__(self, target: Any) -> None:
        self._target = target
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attr(*args, **kwargs)

        return counted


class PythonMemcachedStyleClient:
    """A python-memcached-style API (get/get_multi/set_multi/delete_multi/disconnect_all) over pymemcache."""

    def __init__(self, address: str) -> None:
        self._client = Client(address, default_noreply=False, no_delay=True, timeout=1, connect_timeout=1)
        self.disconnected = 0

    def get(self, key: str) -> Any:
        return self._client.get(key)

    def get_multi(self, keys: list[str]) -> dict[str, Any]:
        return self._client.get_many(keys)  # type: ignore[no-any-return]

    def set_multi(self, mapping: dict[str, bytes], time: int = 0) -> list[str]:
        return self._client.set_many(mapping, expire=time)  # type: ignore[no-any-return]

    def delete_multi(self, keys: list[str]) -> int:
        self._client.delete_many(keys)
        return 1

    def disconnect_all(self) -> None:
        self.disconnected += 1
        self._client.close()


@pytest.fixture
def address(memcached_server: Any) -> str:
    return str(memcached_server.address)


@pytest.fixture
def make_store(make_memcache_store: Callable[..., MemcacheStore]) -> Callable[..., MemcacheStore]:
    return make_memcache_store


@pytest.fixture
def raw(address: str) -> Iterator[Client]:
    client = Client(address, default_noreply=False, timeout=2, connect_timeout=2)
    yield client
    client.close()


# ---------------------------------------------------------------------------
# the contract


class TestMemcacheContract(StoreContract):
    short_lifetime: ClassVar[float] = 2
    expiry_wait: ClassVar[float] = 3.2

    @pytest.fixture(autouse=True)
    def _server(self, memcached_server: Any) -> None:
        self.address = memcached_server.address

    def make_store(self, **options: Any) -> Any:
        return MemcacheStore([self.address], namespace=fresh_namespace(), **options)


class TestSignedMemcacheContract(TestMemcacheContract):
    def make_store(self, **options: Any) -> Any:
        return MemcacheStore([self.address], namespace=fresh_namespace(), secret=b"contract-secret-0123", **options)


class TestChainedMemcacheContract(StoreContract):
    short_lifetime: ClassVar[float] = 2
    expiry_wait: ClassVar[float] = 3.2

    @pytest.fixture(autouse=True)
    def _server(self, memcached_server: Any) -> None:
        self.address = memcached_server.address

    def make_store(self, **options: Any) -> Any:
        return ChainedStore(
            [ProcessMemoryStore(**options), MemcacheStore([self.address], namespace=fresh_namespace(), **options)]
        )


# ---------------------------------------------------------------------------
# construction


def test_needs_exactly_one_of_servers_and_client(address: str) -> None:
    with pytest.raises(ConfigurationError, match="exactly one of servers"):
        MemcacheStore()
    client = Client(address)
    with pytest.raises(ConfigurationError, match="exactly one of servers"):
        MemcacheStore([address], client=client)
    with pytest.raises(ValueError, match="exactly one"):  # ConfigurationError is a ValueError
        MemcacheStore(servers=[address], client=client)


def test_arguments_after_servers_are_keyword_only(address: str) -> None:
    with pytest.raises(TypeError):
        MemcacheStore([address], None)  # type: ignore[misc]


def test_invalid_arguments_are_configuration_errors(address: str) -> None:
    with pytest.raises(ConfigurationError, match="'host:port'"):
        MemcacheStore([])
    with pytest.raises(ConfigurationError, match="host:port"):
        MemcacheStore([12345])  # type: ignore[list-item]
    signer = HMACSigner(b"y" * 16)
    with pytest.raises(ConfigurationError, match="secret= or signer="):
        MemcacheStore([address], secret=b"x" * 16, signer=signer)
    with pytest.raises(ConfigurationError, match="timeout"):
        MemcacheStore([address], timeout=0)
    with pytest.raises(ConfigurationError, match="needs a pymemcache"):
        MemcacheStore(client=object())


def test_constructor_never_connects(memcached_factory: Any) -> None:
    nowhere = memcached_factory.free_address()
    store = MemcacheStore([nowhere])  # nothing listens there: still constructs
    hashed = MemcacheStore([nowhere, memcached_factory.free_address()])
    with pytest.raises(StoreUnavailableError):
        store.get(Item, {"key": "k"})
    store.release()
    hashed.release()


def test_servers_give_pooled_and_hashing_clients(address: str, memcached_cluster: Any) -> None:
    single = MemcacheStore([address])
    assert isinstance(single.client, PooledClient)
    several = MemcacheStore(memcached_cluster.addresses)
    assert isinstance(several.client, HashClient)
    assert several.client.use_pooling is True
    pooled = [single.client, *several.client.clients.values()]
    assert len(pooled) == 4
    for client in pooled:
        assert isinstance(client, PooledClient)
        assert client.no_delay is True
        assert client.default_noreply is False
        assert client.timeout == 0.5
        assert client.connect_timeout == 0.25
    single.release()
    several.release()


def test_a_single_server_string_is_accepted(address: str) -> None:
    store = MemcacheStore(address, namespace=fresh_namespace())
    store.put(Item("k", 1, 2))
    assert store.get(Item, {"key": "k"}) == Item("k", 1, 2)
    store.release()


def test_missing_pymemcache_names_the_extra(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    monkeypatch.setitem(sys.modules, "pymemcache", None)
    with pytest.raises(ImportError, match=r"pip install stockpyle\[memcache\]"):
        MemcacheStore([address])


def test_import_of_the_module_does_not_import_pymemcache() -> None:
    import subprocess

    code = (
        "import sys; import stockpyle, stockpyle.stores.memcache; from stockpyle import *; "
        "assert 'pymemcache' not in sys.modules, 'imported the driver'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------
# clients


@pytest.mark.parametrize("kind", ["Client", "PooledClient", "HashClient", "python-memcached"])
def test_every_client_kind_works(kind: str, address: str, make_store: Callable[..., MemcacheStore]) -> None:
    if kind == "Client":
        client: Any = Client(address)  # default_noreply=True: the store asks for replies anyway
    elif kind == "PooledClient":
        client = PooledClient(address)
    elif kind == "HashClient":
        client = HashClient([address], use_pooling=True)
    else:
        client = PythonMemcachedStyleClient(address)
    store = make_store(client=client)
    first, second = Item("a", 1, 2, "one"), Item("b", 3, 4, "two")
    store.put(first)
    assert store.get(Item, {"zap": 1, "bar": 2}) == first
    store.batch_put([second])
    assert store.batch_get(Item, [{"key": "b"}, {"key": "zz"}, {"key": "a"}]) == [second, None, first]
    first.key = "a2"
    store.put(first)
    assert store.get(Item, {"key": "a"}) is None
    store.batch_delete([first, second])
    assert store.batch_get(Item, [{"key": "a2"}, {"zap": 3, "bar": 4}]) == [None, None]
    store.release()
    if kind == "python-memcached":
        assert client.disconnected == 1


def test_release_closes_the_client_and_the_store_reconnects(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store()
    store.put(Item("k", 1, 2))
    store.release()
    assert store.get(Item, {"key": "k"}) == Item("k", 1, 2)


def test_user_client_with_a_serde_is_refused_as_entries_not_crashes(
    address: str, make_store: Callable[..., MemcacheStore]
) -> None:
    from pymemcache import serde

    # a client whose serde turns values into str: entries are rejected as misses
    class StrSerde:
        def serialize(self, key: Any, value: Any) -> tuple[bytes, int]:
            return serde.python_memcache_serializer(key, value)

        def deserialize(self, key: Any, value: bytes, flags: int) -> Any:
            return value.decode("latin-1")

    store = make_store(client=Client(address, serde=StrSerde()))
    store.put(Item("k", 1, 2))
    assert store.get(Item, {"key": "k"}) is None
    assert store.rejected == 1


# ---------------------------------------------------------------------------
# keys


HOSTILE: list[Any] = [
    "with spaces",
    "cr\rlf\n",
    "nul\x00",
    "tab\tand\x7f\x1b",
    "x" * 10_000,
    "unicod\u00e9 \u65e5\u672c \U0001f600",
    b"raw\x00bytes\r\n \xff",
    b"",
    "",
    "get foo\r\nset evil 0 0 1\r\nX\r\n",
    ("tuple", 1, b"\x00"),
    Decimal("1.50"),
    uuid.UUID(int=7),
    _dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=_dt.timezone.utc),
    None,
    -(10**40),
]


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: type(v).__name__ + str(len(repr(v))))
def test_every_key_value_gives_a_valid_memcached_key(value: Any, make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store(namespace="ns with spaces\r\n\u00e9" * 20)
    mkey = store.key_for(Item, {"key": value})
    assert len(mkey) <= 250
    assert mkey.isascii()
    assert all(0x21 <= ord(c) <= 0x7E for c in mkey), mkey
    assert ":Item." in mkey  # the class, then its generation token
    store.put(Item(value, 1, 2, "payload"))
    assert store.get(Item, {"key": value}) == Item(value, 1, 2, "payload")
    assert store.get(Item, {"zap": 1, "bar": 2}) == Item(value, 1, 2, "payload")


def test_keys_are_readable_and_type_faithful(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store(prefix="app", namespace="v2")
    mkey = store.key_for(Item, {"key": 123})
    assert re.match(r"app:v2:Item\.[0-9a-f]{8}:[0-9a-f]{40}\Z", mkey), mkey
    assert mkey != store.key_for(Item, {"key": "123"})
    assert mkey == store.memcache_key(lookup_key(Item, {"key": 123}))
    store.put(Item(123, 1, 2, "int"))
    store.put(Item("123", 3, 4, "str"))
    assert store.get(Item, {"key": 123}).payload == "int"  # type: ignore[union-attr]
    assert store.get(Item, {"key": "123"}).payload == "str"  # type: ignore[union-attr]


class Outer:
    class A_really_long_nested_class_name_that_goes_on_and_on_and_on_and_on_and_on_and_on:
        __stockpyle_keys__: ClassVar[list[str]] = ["k"]

        def __init__(self, k: Any) -> None:
            self.k = k


def test_long_class_names_and_nested_classes_stay_short(make_store: Callable[..., MemcacheStore]) -> None:
    Inner = Outer.A_really_long_nested_class_name_that_goes_on_and_on_and_on_and_on_and_on_and_on
    store = make_store(prefix="p" * 64, namespace="n" * 64)
    mkey = store.key_for(Inner, {"k": "v" * 5000})
    assert len(mkey) <= 250
    store.put(Inner("v" * 5000))
    assert store.get(Inner, {"k": "v" * 5000}).k == "v" * 5000  # type: ignore[union-attr]


def test_namespaces_never_read_each_others_entries(make_store: Callable[..., MemcacheStore]) -> None:
    v1 = make_store(namespace="release-1")
    v2 = make_store(namespace="release-2")
    v1.put(Item("shared", 1, 2, "from v1"))
    assert v2.get(Item, {"key": "shared"}) is None
    v2.put(Item("shared", 1, 2, "from v2"))
    assert v1.get(Item, {"key": "shared"}).payload == "from v1"  # type: ignore[union-attr]
    v1.delete(Item("shared", 1, 2))
    assert v2.get(Item, {"key": "shared"}).payload == "from v2"  # type: ignore[union-attr]
    v2.delete(Item("shared", 1, 2))


def test_none_and_unkeyed_objects_are_refused_before_io(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store()
    with pytest.raises(NotStorableError):
        store.put(None)
    with pytest.raises(NotStorableError):
        store.batch_put([Item("ok", 1, 2), object()])
    assert store.get(Item, {"key": "ok"}) is None  # nothing of the batch was written


# ---------------------------------------------------------------------------
# batches and round trips


def test_one_object_with_alternate_keys_is_one_multi_key_write(
    address: str, make_store: Callable[..., MemcacheStore]
) -> None:
    proxy = CountingProxy(PooledClient(address, default_noreply=False))
    store = make_store(client=proxy, polymorphic=True, generation_check=60)
    store.key_for(Car, {"license_plate": "x"})  # learns the generations of Car and Automobile
    proxy.calls.clear()
    store.put(Car("ABC-1", "red"))
    # one read (stale-key check over both keys) and one write for Car and Automobile keys
    assert proxy.calls == ["get_many", "set_many"]
    proxy.calls.clear()
    assert store.get(Automobile, {"license_plate": "ABC-1"}) == Car("ABC-1", "red")
    assert proxy.calls == ["get"]


def test_batches_are_one_round_trip_per_server(memcached_cluster: Any) -> None:
    store = MemcacheStore(memcached_cluster.addresses, namespace=fresh_namespace(), generation_check=60)
    store.key_for(Item, {"key": "x"})  # learns Item's generation
    proxies = {name: CountingProxy(node) for name, node in store.client.clients.items()}
    store.client.clients.update(proxies)
    items = [Item(f"k{i}", i, -i, f"p{i}") for i in range(100)]
    store.batch_put(items)
    for proxy in proxies.values():
        assert proxy.calls == ["get_many", "set_many"]
        proxy.calls.clear()
    found = store.batch_get(Item, [{"key": f"k{i}"} for i in range(100)] + [{"key": "missing"}])
    assert found == [*items, None]
    assert [p.calls for p in proxies.values()] == [["get_many"]] * 3
    for proxy in proxies.values():
        proxy.calls.clear()
    store.batch_delete(items)
    for proxy in proxies.values():
        assert proxy.calls == ["get_many", "set_many"]  # stale-key probe, then tombstones
    assert store.batch_get(Item, [{"zap": i, "bar": -i} for i in range(100)]) == [None] * 100
    store.release()


def test_batch_get_of_duplicates_and_empty_batches(make_store: Callable[..., MemcacheStore]) -> None:
    proxy_store = make_store()
    proxy_store.put(Item("d", 1, 2))
    assert proxy_store.batch_get(Item, [{"key": "d"}, {"zap": 1, "bar": 2}, {"key": "d"}]) == [Item("d", 1, 2)] * 3
    assert proxy_store.batch_get(Item, []) == []
    proxy_store.batch_put([])
    proxy_store.batch_delete([])


# ---------------------------------------------------------------------------
# stale alternate keys


def test_changed_key_is_cleaned_up_by_another_process(make_store: Callable[..., MemcacheStore]) -> None:
    namespace = fresh_namespace()
    writer_a = make_store(namespace=namespace)
    writer_b = make_store(namespace=namespace)  # another process: no shared memory
    writer_a.put(Item("old-key", 1, 2, "v1"))
    writer_b.put(Item("new-key", 1, 2, "v2"))  # same entity, its "key" attribute changed
    assert writer_a.get(Item, {"key": "old-key"}) is None
    assert writer_a.get(Item, {"key": "new-key"}).payload == "v2"  # type: ignore[union-attr]
    # and a delete after another change removes every key it ever recorded
    writer_a.put(Item("new-key", 5, 6, "v3"))
    assert writer_b.get(Item, {"zap": 1, "bar": 2}) is None
    writer_b.delete(Item("new-key", 7, 8))
    assert writer_a.batch_get(Item, [{"key": "new-key"}, {"zap": 5, "bar": 6}, {"zap": 7, "bar": 8}]) == [None] * 3


def test_stale_key_cleanup_can_be_turned_off(make_store: Callable[..., MemcacheStore], address: str) -> None:
    proxy = CountingProxy(PooledClient(address, default_noreply=False))
    store = make_store(client=proxy, cleanup_stale_keys=False, generation_check=60)
    store.key_for(Item, {"key": "x"})
    proxy.calls.clear()
    store.put(Item("a", 1, 2))
    assert proxy.calls == ["set_many"]


# ---------------------------------------------------------------------------
# lifetimes


def test_forty_day_lifetime_is_stored_as_absolute_time(make_store: Callable[..., MemcacheStore], address: str) -> None:
    store = make_store(lifetime_cb=lambda obj: _dt.timedelta(days=40), max_lifetime=None)
    store.put(Item("long", 1, 2))
    assert store.get(Item, {"key": "long"}) == Item("long", 1, 2)
    ttl = remaining_ttl(address, store.key_for(Item, {"key": "long"}))
    assert ttl is not None
    # Sent as relative seconds the entry would be gone at once (memcached would read 3,456,000 as a
    # time in 1970).  The server reports what is left from its own "now": the wall clock at its start
    # plus its monotonic clock since, which a step of the machine's clock or a late clock tick shifts
    # (a loaded CI run once reported 8 s more than 40 days), hence a minute's slack either way.
    assert 40 * 86400 - 60 <= ttl <= 40 * 86400 + 60, ttl


@pytest.mark.parametrize(
    ("lifetime", "low", "high"),
    [
        (0.2, 0, 1),  # fractions round up, never to "no expiry"
        (1.0001, 1, 2),
        (90, 88, 90),
        (_dt.timedelta(minutes=5), 298, 300),
        (_dt.timedelta(days=30), 30 * 86400 - 2, 30 * 86400),
        (None, -1, -1),  # never expires
        (0, -1, -1),
    ],
)
def test_lifetimes_are_converted_for_memcached(
    lifetime: Any, low: int, high: int, make_store: Callable[..., MemcacheStore], address: str
) -> None:
    store = make_store(lifetime_cb=lambda obj: lifetime, max_lifetime=None)
    store.put(Item("t", 1, 2))
    for keydict in ({"key": "t"}, {"zap": 1, "bar": 2}):
        ttl = remaining_ttl(address, store.key_for(Item, keydict))
        assert ttl is not None
        assert low <= ttl <= high, ttl


def test_absolute_datetimes_naive_and_aware(make_store: Callable[..., MemcacheStore], address: str) -> None:
    aware = _dt.datetime.now(_dt.timezone.utc) + _dt.timedelta(minutes=10)
    naive_local = _dt.datetime.now() + _dt.timedelta(minutes=20)
    for when, expected in ((aware, 600), (naive_local, 1200)):
        store = make_store(lifetime_cb=lambda obj, when=when: when)
        store.put(Item("dt", 1, 2))
        ttl = remaining_ttl(address, store.key_for(Item, {"key": "dt"}))
        assert ttl is not None
        assert expected - 3 <= ttl <= expected + 1


def test_already_expired_lifetime_removes_existing_entries(make_store: Callable[..., MemcacheStore]) -> None:
    expired = {"now": False}
    store = make_store(lifetime_cb=lambda obj: _dt.timedelta(seconds=-1) if expired["now"] else 600)
    store.put(Item("gone", 1, 2))
    expired["now"] = True
    store.put(Item("gone", 1, 2))
    assert store.batch_get(Item, [{"key": "gone"}, {"zap": 1, "bar": 2}]) == [None, None]
    store.put(Item("never", 3, 4))
    assert store.get(Item, {"key": "never"}) is None


def test_configure_per_class_and_per_store(make_store: Callable[..., MemcacheStore], address: str) -> None:
    store = make_store(max_lifetime=None)
    store.configure(classes=[Automobile], lifetime=300)
    store.put(Car("C1"))
    store.put(Item("i", 1, 2))
    assert 298 <= (remaining_ttl(address, store.key_for(Car, {"license_plate": "C1"})) or 0) <= 300
    assert remaining_ttl(address, store.key_for(Item, {"key": "i"})) == -1


def test_objects_with_different_lifetimes_in_one_batch(make_store: Callable[..., MemcacheStore], address: str) -> None:
    store = make_store(lifetime_cb=lambda obj: 100 if obj.zap % 2 else 200)
    store.batch_put([Item(f"b{i}", i, i) for i in range(6)])
    for i in range(6):
        ttl = remaining_ttl(address, store.key_for(Item, {"key": f"b{i}"}))
        expected = 100 if i % 2 else 200
        assert ttl is not None
        assert expected - 2 <= ttl <= expected


# ---------------------------------------------------------------------------
# sizes and serialization failures


def test_oversized_value_is_refused_and_leaves_no_stale_entry(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store()
    store.put(Item("big", 1, 2, "small at first"))
    with pytest.raises(ValueTooLargeError, match="bytes serialized"):
        store.put(Item("big", 1, 2, "x" * (2 * 1024 * 1024)))
    assert store.batch_get(Item, [{"key": "big"}, {"zap": 1, "bar": 2}]) == [None, None]


def test_oversized_value_in_a_batch_spares_the_others(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store()
    store.batch_put([Item("a", 1, 1, "old"), Item("b", 2, 2, "old")])
    with pytest.raises(ValueTooLargeError):
        store.batch_put([Item("a", 1, 1, "new"), Item("b", 2, 2, b"\x00" * (1024 * 1024))])
    found = store.batch_get(Item, [{"key": "a"}, {"key": "b"}, {"zap": 2, "bar": 2}])
    assert found == [Item("a", 1, 1, "new"), None, None]


def test_server_side_size_refusal_is_mapped(memcached_factory: Any) -> None:
    server = memcached_factory.one(item_size="1m")
    # the store believes the server takes 4 MiB items: the server refuses instead
    store = MemcacheStore([server.address], max_item_size=4 * 1024 * 1024)
    store.put(Item("s", 1, 2, "old"))
    with pytest.raises(ValueTooLargeError) as caught:
        store.put(Item("s", 1, 2, "y" * (2 * 1024 * 1024)))
    assert caught.value.__cause__ is not None
    assert store.batch_get(Item, [{"key": "s"}, {"zap": 1, "bar": 2}]) == [None, None]
    store.release()


def test_a_refused_write_of_a_one_key_object_drops_its_old_entry(memcached_factory: Any) -> None:
    # a one-key object's put is one write with no plan around it: its failure rules are the same
    server = memcached_factory.one(item_size="1m")
    store = MemcacheStore([server.address], max_item_size=4 * 1024 * 1024)
    store.put(Automobile("ONE-1", "red"))
    with pytest.raises(ValueTooLargeError) as caught:
        store.put(Automobile("ONE-1", "y" * (2 * 1024 * 1024)))
    assert caught.value.__cause__ is not None
    assert store.get(Automobile, {"license_plate": "ONE-1"}) is None
    assert store.stats().errors == 0  # the server answered: a refused object, not an outage
    store.put(Automobile("ONE-1", "blue"))
    assert store.get(Automobile, {"license_plate": "ONE-1"}) == Automobile("ONE-1", "blue")
    store.release()


def test_oversized_or_unpicklable_one_key_objects_drop_their_old_entry(
    make_store: Callable[..., MemcacheStore],
) -> None:
    store = make_store()
    store.put(Automobile("ONE-2", "red"))
    with pytest.raises(ValueTooLargeError, match="bytes serialized"):
        store.put(Automobile("ONE-2", "x" * (2 * 1024 * 1024)))
    assert store.get(Automobile, {"license_plate": "ONE-2"}) is None
    store.put(Automobile("ONE-2", "red"))
    with pytest.raises(SerializationError, match="cannot serialize Automobile"):
        store.put(Automobile("ONE-2", threading.Lock()))
    assert store.get(Automobile, {"license_plate": "ONE-2"}) is None


def test_value_just_under_the_limit_is_stored(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store()
    item = Item("fits", 1, 2, b"z" * (1024 * 1024 - 2048))
    store.put(item)
    assert store.get(Item, {"key": "fits"}) == item


def test_unpicklable_object_is_a_serialization_error_and_drops_the_old_entry(
    make_store: Callable[..., MemcacheStore],
) -> None:
    store = make_store()
    store.put(Item("u", 1, 2, "picklable"))
    with pytest.raises(SerializationError, match="cannot serialize Item"):
        store.put(Item("u", 1, 2, threading.Lock()))
    assert store.get(Item, {"zap": 1, "bar": 2}) is None


# ---------------------------------------------------------------------------
# threads


def test_sixteen_threads_share_one_store(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store()
    shared = [Item(f"shared{i}", 1000 + i, 0, i) for i in range(20)]
    store.batch_put(shared)
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for round_ in range(40):
                mine = Item(f"t{thread}", thread, round_, (thread, round_))
                store.put(mine)
                got = store.get(Item, {"key": f"t{thread}"})
                assert got == mine, (got, mine)
                assert store.get(Item, {"zap": thread, "bar": round_ - 1}) is None  # old key cleaned up
                batch = store.batch_get(Item, [{"key": f"shared{i}"} for i in range(20)])
                assert batch == shared
            store.delete(mine)
            assert store.get(Item, {"key": f"t{thread}"}) is None
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]


# ---------------------------------------------------------------------------
# errors stay in the tree


def test_store_errors_are_stockpyle_errors(memcached_factory: Any) -> None:
    store = MemcacheStore([memcached_factory.free_address()])
    with pytest.raises(StoreError) as caught:
        store.batch_get(Item, [{"key": "a"}])
    assert isinstance(caught.value, StoreUnavailableError)
    assert isinstance(caught.value.__cause__, OSError)


def test_batch_add_is_one_round_trip_and_never_leaves_half_an_object(
    address: str, make_store: Callable[..., MemcacheStore]
) -> None:
    proxy = CountingProxy(Client(address, default_noreply=False, no_delay=True))
    store = make_store(client=proxy, generation_check=60)
    store.key_for(Item, {"key": "x"})
    proxy.calls.clear()
    objs = [Item(f"b{i}", i, -i, "first") for i in range(50)]  # two keys each: 100 adds
    assert store.batch_add(objs) == [True] * 50
    assert proxy.calls == ["_store_cmd"]  # one pipelined round trip for the whole batch
    proxy.calls.clear()
    taken = Item("p", 3, -3, "would share b3's composite key")
    assert store.batch_add([Item("b1", 1, -1, "second"), taken, Item("fresh", 100, 100)]) == [False, False, True]
    assert proxy.calls.count("_store_cmd") == 1
    assert store.get(Item, {"key": "b1"}).payload == "first"  # type: ignore[union-attr]  # add never replaces
    assert store.get(Item, {"key": "p"}) is None  # its free key was added, then undone
    assert store.get(Item, {"zap": 3, "bar": -3}).key == "b3"  # type: ignore[union-attr]
    assert store.get(Item, {"key": "fresh"}) is not None


def test_entries_keep_their_key_lists_short_and_older_full_lists_still_read(
    make_store: Callable[..., MemcacheStore], raw: Client
) -> None:
    store = make_store()
    car = Automobile("SMALL-1", "red")
    store.put(car)
    mkey = store.key_for(Automobile, {"license_plate": "SMALL-1"})
    entry = raw.get(mkey)
    assert entry is not None and mkey.encode() not in entry
    body = pickle.dumps(car, pickle.HIGHEST_PROTOCOL)
    assert entry.endswith(b"\x00\x00\x00\x00" + body)  # an empty key list, then the object
    # objects with several keys keep the list (a later put deletes the keys it no longer has)
    store.put(Item("multi", 1, 2))
    first, second = (store.key_for(Item, keydict) for keydict in ({"key": "multi"}, {"zap": 1, "bar": 2}))
    digests = f"{first.rsplit(':', 1)[1]} {second.rsplit(':', 1)[1]}".encode()
    assert digests in raw.get(first) and first.encode() not in raw.get(first)  # one class: digests suffice
    polymorphic = make_store(polymorphic=True)
    polymorphic.put(Car("POLY-1", "red"))
    car_keys = [polymorphic.key_for(klass, {"license_plate": "POLY-1"}) for klass in (Car, Automobile)]
    assert " ".join(car_keys).encode() in raw.get(car_keys[0])  # two classes: the keys in full
    store.put(Item("multi", 3, 4))
    assert store.get(Item, {"zap": 1, "bar": 2}) is None  # the old alternate key was found and buried
    # a list of full keys (as stockpyle 1.0.0rc1 wrote them) is read the same
    third = store.key_for(Item, {"zap": 3, "bar": 4})
    entry3 = raw.get(first)
    short = f"{first.rsplit(':', 1)[1]} {third.rsplit(':', 1)[1]}".encode()
    full = f"{first} {third}".encode()
    at = entry3.index(short)
    raw.set(first, entry3[: at - 4] + len(full).to_bytes(4, "big") + full + entry3[at + len(short) :])
    assert store.get(Item, {"key": "multi"}).zap == 3  # type: ignore[union-attr]
    store.put(Item("multi", 5, 6))
    assert store.get(Item, {"zap": 3, "bar": 4}) is None
    # an entry written with the key in its list (stockpyle 1.0rc1) reads the same, and is replaced
    cut = len(entry) - len(body) - 4
    raw.set(mkey, entry[:cut] + len(mkey).to_bytes(4, "big") + mkey.encode() + body)
    assert store.get(Automobile, {"license_plate": "SMALL-1"}) == car
    store.put(Automobile("SMALL-1", "blue"))
    assert store.get(Automobile, {"license_plate": "SMALL-1"}) == Automobile("SMALL-1", "blue")
