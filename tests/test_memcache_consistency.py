"""MemcacheStore's race protection: add-only back-fill, tombstones, version-checked puts, lifetime cap."""

from __future__ import annotations

import datetime as _dt
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from pymemcache.client.base import Client
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support.memcached import remaining_ttl

from stockpyle import ChainedStore, MemcacheStore, ProcessMemoryStore
from stockpyle.exceptions import ConfigurationError
from stockpyle.keys import version_of
from stockpyle.stores import memcache as memcache_module
from stockpyle.stores import sqlalchemy as sql_module
from stockpyle.testing import ConsistencyContract, Item

pytestmark = pytest.mark.memcache


class Doc:
    """A versioned object with two keys."""

    __stockpyle_keys__: ClassVar[list[Any]] = ["key", "slug"]
    __stockpyle_version__ = "rev"

    def __init__(self, key: str, slug: str, rev: int, body: Any = "") -> None:
        self.key = key
        self.slug = slug
        self.rev = rev
        self.body = body


@pytest.fixture
def address(memcached_server: Any) -> str:
    return str(memcached_server.address)


@pytest.fixture
def make_store(make_memcache_store: Callable[..., MemcacheStore]) -> Callable[..., MemcacheStore]:
    return make_memcache_store


@pytest.fixture
def raw(address: str) -> Iterator[Client]:
    client = Client(address, default_noreply=False, timeout=2)
    yield client
    client.close()


# ---------------------------------------------------------------------------
# the shared consistency contract


class TestMemcacheConsistency(ConsistencyContract):
    @pytest.fixture(autouse=True)
    def _factory(self, make_memcache_store: Callable[..., MemcacheStore]) -> None:
        self.factory = make_memcache_store

    def make_store(self, **options: Any) -> Any:
        return self.factory(**options)


class TestSignedMemcacheConsistency(TestMemcacheConsistency):
    def make_store(self, **options: Any) -> Any:
        return self.factory(secret=b"consistency-secret-01", **options)


# ---------------------------------------------------------------------------
# add-only back-fill


def test_add_fills_absent_keys_only(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store()
    assert store.add(Item("a", 1, 2, "first")) is True
    assert store.add(Item("a", 1, 2, "second")) is False
    assert store.get(Item, {"zap": 1, "bar": 2}).payload == "first"  # type: ignore[union-attr]
    assert store.batch_add([Item("a", 1, 2, "third"), Item("b", 3, 4, "new")]) == [False, True]
    assert store.batch_get(Item, [{"key": "a"}, {"key": "b"}]) == [Item("a", 1, 2, "first"), Item("b", 3, 4, "new")]
    assert store.batch_add([]) == []


def test_partial_add_leaves_no_key_behind(make_store: Callable[..., MemcacheStore]) -> None:
    """One of the object's keys is taken by a newer entry: the keys already added are removed again."""
    store = make_store()
    store.put(Item("new-key", 1, 2, "newer"))  # the entity now lives under key "new-key"
    # a back-fill of an old copy still keyed "old-key" but with the same (zap, bar)
    assert store.add(Item("old-key", 1, 2, "older")) is False
    assert store.get(Item, {"key": "old-key"}) is None  # not left half-present
    assert store.get(Item, {"zap": 1, "bar": 2}).payload == "newer"  # type: ignore[union-attr]


def test_add_refuses_unstorable_objects_without_raising(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store(max_item_size=64 * 1024)
    assert store.add(Item("lock", 1, 2, threading.Lock())) is False
    assert store.batch_add([Item("big", 3, 4, "x" * 100_000), Item("ok", 5, 6, "fine")]) == [False, True]
    assert store.batch_get(Item, [{"key": "lock"}, {"key": "big"}, {"key": "ok"}]) == [
        None,
        None,
        Item("ok", 5, 6, "fine"),
    ]


def test_chain_backfills_memcached_through_add(make_store: Callable[..., MemcacheStore]) -> None:
    l2 = make_store()
    record = ProcessMemoryStore()
    record.put(Item("x", 1, 2, "v1"))
    chain = ChainedStore([ProcessMemoryStore(), l2, record])
    assert chain.get(Item, {"key": "x"}).payload == "v1"  # type: ignore[union-attr]
    assert l2.get(Item, {"zap": 1, "bar": 2}).payload == "v1"  # type: ignore[union-attr]
    assert chain.stats()[1].backfills == 1


# ---------------------------------------------------------------------------
# tombstones


def test_delete_leaves_a_short_tombstone(make_store: Callable[..., MemcacheStore], address: str, raw: Client) -> None:
    store = make_store(tombstone_lifetime=5)
    store.put(Item("t", 1, 2, "v1"))
    store.delete(Item("t", 1, 2))
    for keydict in ({"key": "t"}, {"zap": 1, "bar": 2}):
        mkey = store.key_for(Item, keydict)
        assert raw.get(mkey) is not None  # a tombstone...
        assert 3 <= (remaining_ttl(address, mkey) or 0) <= 5  # ...that expires soon
        assert store.get(Item, keydict) is None  # ...read as a miss
    assert store.batch_get(Item, [{"key": "t"}, {"zap": 1, "bar": 2}]) == [None, None]
    assert store.rejected == 0  # a tombstone is not a bad entry
    assert store.add(Item("t", 1, 2, "resurrected")) is False  # a racing back-fill loses
    store.put(Item("t", 1, 2, "v2"))  # a write replaces it
    assert store.get(Item, {"key": "t"}).payload == "v2"  # type: ignore[union-attr]


def test_tombstones_are_signed_in_a_signing_store(make_store: Callable[..., MemcacheStore], raw: Client) -> None:
    store = make_store(secret=b"tombstone-secret-123")
    store.put(Item("s", 1, 2, "v1"))
    store.delete(Item("s", 1, 2))
    assert store.get(Item, {"key": "s"}) is None
    assert store.rejected == 0
    assert store.add(Item("s", 1, 2, "old")) is False
    # a tombstone forged without the secret is rejected (and removed), not obeyed
    mkey = store.key_for(Item, {"key": "s"})
    raw.set(mkey, b"SP\x01\x01\x00" + b"\xff\xff\xff\xff")
    assert store.get(Item, {"key": "s"}) is None
    assert store.rejected == 1


def test_zero_tombstone_lifetime_deletes_plainly(make_store: Callable[..., MemcacheStore], raw: Client) -> None:
    store = make_store(tombstone_lifetime=0)
    store.put(Item("p", 1, 2))
    store.delete(Item("p", 1, 2))
    assert raw.get(store.key_for(Item, {"key": "p"})) is None
    assert store.add(Item("p", 1, 2)) is True


def test_changed_key_attribute_tombstones_the_old_key(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store()
    store.put(Item("before", 1, 2, "v1"))
    store.put(Item("after", 1, 2, "v2"))
    assert store.get(Item, {"key": "before"}) is None
    # a back-fill of the old copy cannot repopulate the old key either
    assert store.add(Item("before", 1, 2, "v1")) is False
    assert store.get(Item, {"key": "before"}) is None


# ---------------------------------------------------------------------------
# version-checked puts


def test_put_never_replaces_a_newer_version(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store()
    store.put(Doc("d", "slug-d", 3, "three"))
    store.put(Doc("d", "slug-d", 2, "two"))  # late writer: ignored
    found = store.get(Doc, {"key": "d"})
    assert (found.rev, found.body) == (3, "three")  # type: ignore[union-attr]
    store.put(Doc("d", "slug-d", 3, "three again"))  # same version: replaced
    store.put(Doc("d", "slug-d", 4, "four"))
    assert [(d.rev, d.body) for d in store.batch_get(Doc, [{"key": "d"}, {"slug": "slug-d"}])] == [
        (4, "four"),
        (4, "four"),
    ]
    assert store.conflicts == 0


def test_tombstone_records_the_deleted_version(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store()
    store.put(Doc("d", "s", 2))
    store.delete(Doc("d", "s", 2))
    store.put(Doc("d", "s", 2, "late put of the deleted version"))
    assert store.get(Doc, {"key": "d"}) is None
    store.put(Doc("d", "s", 3, "recreated"))
    assert store.get(Doc, {"slug": "s"}).body == "recreated"  # type: ignore[union-attr]


class Interfering:
    """A client proxy that lets another writer change a key right before each of our cas/add calls."""

    def __init__(self, target: Any, meddle: Callable[[], None], times: int) -> None:
        self._target = target
        self._meddle = meddle
        self.times = times

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if name in ("cas", "add") and self.times > 0:

            def interfered(*args: Any, **kwargs: Any) -> Any:
                self.times -= 1
                self._meddle()
                return attr(*args, **kwargs)

            return interfered
        return attr


def test_cas_conflict_is_retried_and_the_newer_version_wins(
    make_store: Callable[..., MemcacheStore], address: str
) -> None:
    namespace = "c" + uuid.uuid4().hex[:12]
    other = make_store(namespace=namespace)
    other.put(Doc("r", "slug-r", 1))

    def newer_writer() -> None:
        other.put(Doc("r", "slug-r", 5, "five"))

    proxy = Interfering(Client(address, default_noreply=False, timeout=2), newer_writer, times=1)
    store = make_store(namespace=namespace, client=proxy)
    store.put(Doc("r", "slug-r", 2, "two"))  # gets sees v1; v5 lands before our cas
    found = [(d.rev, d.body) for d in other.batch_get(Doc, [{"key": "r"}, {"slug": "slug-r"}])]
    assert found == [(5, "five"), (5, "five")]
    assert store.conflicts == 0


def test_endless_conflicts_invalidate_instead(make_store: Callable[..., MemcacheStore], address: str) -> None:
    namespace = "c" + uuid.uuid4().hex[:12]
    other = make_store(namespace=namespace, cleanup_stale_keys=False)
    counter = iter(range(10**6))

    def same_version_writer() -> None:  # equal versions never stop our writer: it retries
        other.put(Doc("e", "slug-e", 1, f"other {next(counter)}"))

    proxy = Interfering(Client(address, default_noreply=False, timeout=2), same_version_writer, times=10**6)
    store = make_store(namespace=namespace, client=proxy)
    store.put(Doc("e", "slug-e", 1, "mine"))
    assert store.conflicts == 1
    proxy.times = 0
    assert other.batch_get(Doc, [{"key": "e"}, {"slug": "slug-e"}]) == [None, None]


def test_unversioned_objects_use_plain_writes(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store()
    store.put(Item("u", 1, 2, "v2"))
    store.put(Item("u", 1, 2, "v1"))  # no version: last write wins
    assert store.get(Item, {"key": "u"}).payload == "v1"  # type: ignore[union-attr]


class ProbeBase(DeclarativeBase):
    """Mapped classes for the version resolver (never given tables)."""


class VersionedRow(ProbeBase):
    __tablename__ = "versioned_row_probe"
    id: Mapped[int] = mapped_column(primary_key=True)
    counter: Mapped[int] = mapped_column(sa.Integer)
    __mapper_args__: ClassVar[dict[str, Any]] = {"version_id_col": counter}


class PlainRow(ProbeBase):
    __tablename__ = "plain_row_probe"
    id: Mapped[int] = mapped_column(primary_key=True)


def test_sqlalchemy_version_id_col_is_the_version() -> None:
    Row, Plain = VersionedRow, PlainRow
    assert sql_module.mapped_version_attribute(Row) == "counter"
    assert sql_module.mapped_version_attribute(Plain) is None
    assert sql_module.mapped_version_attribute(Item) is None
    row = Row(id=1, counter=7)
    assert version_of(row) == 7
    assert version_of(Plain(id=1)) is None


# ---------------------------------------------------------------------------
# lifetime cap


def test_entries_without_a_lifetime_get_the_cap(make_store: Callable[..., MemcacheStore], address: str) -> None:
    store = make_store()
    store.put(Item("cap", 1, 2))
    assert store.max_lifetime == memcache_module.DEFAULT_MAX_LIFETIME == 86_400
    ttl = remaining_ttl(address, store.key_for(Item, {"key": "cap"}))
    assert ttl is not None and 86_398 <= ttl <= 86_400


@pytest.mark.parametrize(
    ("max_lifetime", "lifetime", "low", "high"),
    [
        (60, None, 58, 60),  # no lifetime: the cap
        (60, 300, 58, 60),  # longer: capped
        (60, 10, 8, 10),  # shorter: kept
        (_dt.timedelta(minutes=2), _dt.timedelta(days=40), 118, 120),
        (40 * 86_400, None, 40 * 86_400 - 5, 40 * 86_400 + 3),  # over 30 days: absolute time
        (None, None, -1, -1),  # asked for: never expires
    ],
)
def test_max_lifetime_caps_every_entry(
    max_lifetime: Any, lifetime: Any, low: int, high: int, *, make_store: Callable[..., MemcacheStore], address: str
) -> None:
    callback = None if lifetime is None else (lambda obj: lifetime)
    store = make_store(max_lifetime=max_lifetime, lifetime_cb=callback)
    store.put(Item("c", 1, 2))
    store.add(Item("c2", 3, 4))
    for key in (store.key_for(Item, {"key": "c"}), store.key_for(Item, {"key": "c2"})):
        ttl = remaining_ttl(address, key)
        assert ttl is not None and low <= ttl <= high, ttl


@pytest.mark.parametrize("bad", [0, -1, True, "1h", float("inf"), _dt.datetime(2030, 1, 1)])
def test_invalid_max_lifetime(bad: Any, address: str) -> None:
    with pytest.raises(ConfigurationError, match="max_lifetime"):
        MemcacheStore([address], max_lifetime=bad)


@pytest.mark.parametrize("bad", [-1, True, "5", float("nan"), 31 * 86_400])
def test_invalid_tombstone_lifetime(bad: Any, address: str) -> None:
    with pytest.raises(ConfigurationError, match="tombstone_lifetime"):
        MemcacheStore([address], tombstone_lifetime=bad)


class Member:
    """Versioned, found by id or email: two members may hold one email address at different times."""

    __stockpyle_keys__: ClassVar[list[Any]] = ["id", "email"]
    __stockpyle_version__ = "version"

    def __init__(self, ident: int, email: str, version: int) -> None:
        self.id, self.email, self.version = ident, email, version


def test_versions_are_only_compared_within_one_object(make_store: Callable[..., MemcacheStore]) -> None:
    store = make_store()
    store.put(Member(1, "a@x", 5))
    store.put(Member(2, "b@x", 1))
    store.delete(Member(1, "a@x", 5))  # a tombstone recording member 1 at version 5
    store.put(Member(2, "a@x", 2))  # member 2 takes the address at its own version 2
    found = store.get(Member, {"id": 2})
    assert found is not None
    assert (found.email, found.version) == ("a@x", 2)
    assert store.get(Member, {"email": "a@x"}).id == 2  # type: ignore[union-attr]
    assert store.get(Member, {"email": "b@x"}) is None

    store.put(Member(3, "c@x", 6))
    store.put(Member(3, "d@x", 7))  # member 3 moves on: its old address is buried with its version
    store.put(Member(4, "c@x", 1))  # member 4 takes the old address right away
    assert store.get(Member, {"email": "c@x"}).id == 4  # type: ignore[union-attr]
    assert store.get(Member, {"id": 3}).email == "d@x"  # type: ignore[union-attr]
