"""Hostile input: odd key values, protocol injection, path escapes, unstorable objects, forged entries."""

from __future__ import annotations

import os
import pickle
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from pymemcache.client.base import Client
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from support.databases import (
    MYSQL_TABLE_ARGS,
    backend_of,
    create_tables,
    drop_tables,
    hostile_values_for,
    key_string,
    make_engine,
    table_name,
)

from stockpyle import (
    BaseDictionaryStore,
    ChainedStore,
    MemcacheStore,
    ProcessMemoryStore,
    ShoveStore,
    SqlAlchemyStore,
    ThreadLocalStore,
)
from stockpyle.exceptions import (
    MissingKeyAttributeError,
    NotStorableError,
    SerializationError,
    StockpyleError,
    ValueTooLargeError,
)
from stockpyle.testing import HOSTILE_VALUES, Item, Unkeyed

# ---------------------------------------------------------------------------
# models and stores


class HostileBase(DeclarativeBase):
    """Tables of this module only."""


class Row(HostileBase):
    """A mapped item: text primary key, composite unique (zap, bar), large payload."""

    __tablename__ = table_name("hostile_row")
    __table_args__ = (sa.UniqueConstraint("zap", "bar"), MYSQL_TABLE_ARGS)
    __stockpyle_keys__: ClassVar[list[Any]] = ["key", ("zap", "bar")]

    key: Mapped[str] = mapped_column(key_string(), primary_key=True)
    zap: Mapped[int] = mapped_column(sa.Integer)
    bar: Mapped[int] = mapped_column(sa.Integer)
    payload: Mapped[str | None] = mapped_column(sa.Text)

    def __init__(self, key: Any, zap: int, bar: int, payload: Any = None) -> None:
        self.key = key
        self.zap = zap
        self.bar = bar
        self.payload = payload


#: Extra key values for stores that keep any value type (not SQL text columns).
BYTES_VALUES: tuple[Any, ...] = (b"\x00\xff\r\n raw bytes", b"", "\x00" * 3, ("tuple", b"\n", 1))


class Exploit:
    """Unpickling this creates a directory: proof that attacker code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def fresh(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:10]


class Stores:
    """Builds each kind of store for one test and releases them afterwards."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request = request
        self.tmp_path = tmp_path
        self.made: list[Any] = []
        self.engines: list[sa.Engine] = []

    def memcache(self, **options: Any) -> MemcacheStore:
        server = self.request.getfixturevalue("memcached_server")
        options.setdefault("namespace", fresh("h"))
        return self.keep(MemcacheStore([server.address], **options))

    def sql(self, backend: str) -> SqlAlchemyStore:
        if backend == "sqlite":
            url = f"sqlite:///{self.tmp_path / 'hostile.sqlite'}"
        else:
            url = self.request.getfixturevalue(f"{backend}_url")
        engine = make_engine(url)
        create_tables(engine, HostileBase.metadata)
        self.engines.append(engine)
        return self.keep(SqlAlchemyStore(engine=engine))

    def shove(self) -> ShoveStore:
        return self.keep(ShoveStore(uri=f"file://{self.tmp_path}/shove"))

    def keep(self, store: Any) -> Any:
        self.made.append(store)
        return store

    def close(self) -> None:
        for store in self.made:
            store.release()
        for engine in self.engines:
            drop_tables(engine, HostileBase.metadata)
            engine.dispose()


@pytest.fixture
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    made = Stores(request, tmp_path)
    yield made
    made.close()


STORE_KINDS = [
    pytest.param("process", id="process-memory"),
    pytest.param("thread", id="thread-local"),
    pytest.param("dict", id="base-dictionary"),
    pytest.param("memcache", id="memcache", marks=pytest.mark.memcache),
    pytest.param("signed-memcache", id="signed-memcache", marks=pytest.mark.memcache),
    pytest.param("shove", id="shove-file"),
    pytest.param("sqlite", id="sqlalchemy-sqlite"),
    pytest.param("postgres", id="sqlalchemy-postgres", marks=pytest.mark.postgres),
    pytest.param("mariadb", id="sqlalchemy-mariadb", marks=pytest.mark.mariadb),
    pytest.param("chain-sql", id="chain-memory-memcache-sqlite", marks=pytest.mark.memcache),
    pytest.param("chain-shove", id="chain-threadlocal-memory-shove"),
]


def build(kind: str, stores: Stores) -> tuple[Any, type, tuple[Any, ...]]:
    """The store, the class to store and the key values it must round-trip."""
    if kind == "process":
        return ProcessMemoryStore(), Item, HOSTILE_VALUES + BYTES_VALUES
    if kind == "thread":
        return ThreadLocalStore(), Item, HOSTILE_VALUES + BYTES_VALUES
    if kind == "dict":
        return BaseDictionaryStore({}), Item, HOSTILE_VALUES + BYTES_VALUES
    if kind == "memcache":
        return stores.memcache(), Item, HOSTILE_VALUES + BYTES_VALUES
    if kind == "signed-memcache":
        return stores.memcache(secret=b"hostile-test-secret"), Item, HOSTILE_VALUES + BYTES_VALUES
    if kind == "shove":
        return stores.shove(), Item, HOSTILE_VALUES + BYTES_VALUES
    if kind in ("sqlite", "postgres", "mariadb"):
        store = stores.sql(kind)
        return store, Row, hostile_values_for(backend_of(str(store.engine.url)))
    if kind == "chain-sql":
        return ChainedStore([ProcessMemoryStore(), stores.memcache(), stores.sql("sqlite")]), Row, HOSTILE_VALUES
    assert kind == "chain-shove"
    return (
        ChainedStore([ThreadLocalStore(), ProcessMemoryStore(), stores.shove()]),
        Item,
        HOSTILE_VALUES + BYTES_VALUES,
    )


# ---------------------------------------------------------------------------
# key values


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_hostile_key_values_round_trip_everywhere(kind: str, stores: Stores) -> None:
    store, klass, values = build(kind, stores)
    objs = [klass(value, n, -n, f"payload {n}") for n, value in enumerate(values)]
    for obj in objs:
        store.put(obj)
    for n, value in enumerate(values):
        found = store.get(klass, {"key": value})
        assert found is not None, f"{value!r} was not found by its key"
        assert (found.key, found.payload) == (value, f"payload {n}")
        assert store.get(klass, {"zap": n, "bar": -n}).key == value
    assert [o.key for o in store.batch_get(klass, [{"key": v} for v in values])] == list(values)
    # a value that is a prefix or an escape of another never finds the other
    assert store.get(klass, {"key": "line\r"}) is None
    assert store.get(klass, {"key": "nul"}) is None
    store.batch_delete(objs)
    assert store.batch_get(klass, [{"key": v} for v in values]) == [None] * len(values)


@pytest.mark.memcache
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_no_key_value_can_inject_a_memcached_command(signed: bool, stores: Stores) -> None:
    server = stores.request.getfixturevalue("memcached_server")
    raw = Client(server.address, default_noreply=False, timeout=2)
    try:
        raw.set("hostile-sentinel", b"still here")
        raw.delete("evil")
        store = stores.memcache(secret=b"hostile-test-secret" if signed else None)
        attacks = [
            "\r\nflush_all\r\n",
            "set evil 0 0 1",
            "x\r\nset evil 0 0 1\r\nX\r\n",
            "get foo\r\nset evil 0 0 1\r\nX\r\n",
            "\r\ndelete hostile-sentinel\r\n",
            "k" * 300 + "\r\nflush_all",
        ]
        for n, attack in enumerate(attacks):
            store.put(Item(attack, n, 0, attack))
            store.put(Item(f"payload{n}", n, 1, f"\r\nset evil 0 0 1\r\nX\r\nflush_all\r\n{attack}"))
        for attack in attacks:
            assert store.get(Item, {"key": attack}).payload == attack  # type: ignore[union-attr]
        store.batch_delete([Item(a, n, 0) for n, a in enumerate(attacks)])
        assert raw.get("hostile-sentinel") == b"still here"  # nothing was flushed or deleted
        assert raw.get("evil") is None  # and no command was smuggled in
    finally:
        raw.delete("hostile-sentinel")
        raw.close()


def test_no_key_value_escapes_the_shove_directory(tmp_path: Path) -> None:
    inside = tmp_path / "jail"
    store = ShoveStore(uri=f"file://{inside}")
    attacks = ["../escaped", "../../escaped", "/tmp/escaped", "..", ".", "a/../../b", "~/x", "\x00/..", "C:\\x"]
    for n, attack in enumerate(attacks):
        store.put(Item(attack, n, 0, "x"))
    for n, attack in enumerate(attacks):
        assert store.get(Item, {"key": attack}).zap == n  # type: ignore[union-attr]
    store.release()
    outside = [p for p in tmp_path.rglob("*") if inside not in p.parents and p != inside]
    assert outside == []
    assert not Path("/tmp/escaped").exists()


# ---------------------------------------------------------------------------
# unstorable objects through the full chain


@pytest.fixture
def full_chain(stores: Stores) -> tuple[ChainedStore, ProcessMemoryStore, MemcacheStore, SqlAlchemyStore]:
    stores.request.getfixturevalue("memcached_server")
    l1, l2, sor = ProcessMemoryStore(), stores.memcache(max_item_size=256 * 1024), stores.sql("sqlite")
    return ChainedStore([l1, l2, sor]), l1, l2, sor


@pytest.mark.memcache
@pytest.mark.parametrize(
    "poison",
    [threading.Lock(), lambda: None, (x for x in ())],
    ids=["lock", "lambda", "generator"],
)
def test_unpicklable_object_is_a_clear_error_and_no_cache_keeps_the_old_value(poison: Any, full_chain: Any) -> None:
    chain, l1, l2, sor = full_chain
    chain.put(Row("u", 1, 2, "v1"))
    assert l2.get(Row, {"key": "u"}).payload == "v1"
    changed = Row("u", 1, 2, "v2")
    changed.helper = poison  # not a column: the database accepts the row, pickle cannot
    with pytest.raises(SerializationError, match="cannot serialize Row"):
        l2.put(changed)  # the store on its own: a clear error
    errors: list[Exception] = []
    try:
        chain.put(changed)
    except SerializationError as exc:  # a chain may report it...
        errors.append(exc)
    if errors:
        assert "cannot serialize Row" in str(errors[0])
    elif l2.get(Row, {"key": "u"}) is None:  # ...or absorb it like any cache failure: logged and counted
        assert chain.stats()[1].errors == 1
    # ...or, for a mapped class, cache the stored row (column values only,
    # never the caller's extra attributes): checked below like the others
    assert sor.get(Row, {"key": "u"}).payload == "v2"  # the system of record took it first
    for layer in (l1, l2):
        for keydict in ({"key": "u"}, {"zap": 1, "bar": 2}):
            cached = layer.get(Row, keydict)
            assert cached is None or cached.payload == "v2", f"{layer!r} kept {cached!r}"
    assert chain.get(Row, {"key": "u"}).payload == "v2"


@pytest.mark.memcache
def test_object_too_large_for_memcached(full_chain: Any) -> None:
    chain, _l1, l2, sor = full_chain
    chain.put(Row("big", 1, 2, "small"))
    huge = Row("big", 1, 2, "x" * 400_000)
    with pytest.raises(ValueTooLargeError, match="bytes serialized"):
        l2.put(huge)  # the store on its own: a clear error
    assert l2.get(Row, {"key": "big"}) is None  # and no old entry left
    chain.put(Row("big", 1, 2, "small again"))
    with pytest.raises(ValueTooLargeError, match="the system of record stored the object"):
        chain.put(huge)  # the chain: the database took it; memcached could not, and says so
    assert chain.stats()[1].errors == 1
    assert chain.stats()[1].breaker_opens == 0  # one object never takes the layer out
    assert sor.get(Row, {"key": "big"}).payload == huge.payload
    assert l2.batch_get(Row, [{"key": "big"}, {"zap": 1, "bar": 2}]) == [None, None]
    assert chain.get(Row, {"key": "big"}).payload == huge.payload


@pytest.mark.memcache
def test_objects_missing_keys_are_refused_before_anything_is_written(full_chain: Any) -> None:
    chain, l1, _l2, sor = full_chain
    incomplete = Item("m", 1, 2)
    del incomplete.zap
    with pytest.raises(MissingKeyAttributeError):
        chain.put(incomplete)
    with pytest.raises(NotStorableError):
        chain.put(Unkeyed("x"))
    with pytest.raises(NotStorableError):
        chain.put(None)
    with pytest.raises(StockpyleError):
        chain.put(Row("bad", [1], 2))  # an unsupported key value type
    assert sor.get(Row, {"key": "bad"}) is None
    assert len(l1) == 0
    assert chain.get(Item, {"key": "m"}) is None


# ---------------------------------------------------------------------------
# forged and corrupted memcached entries, through a chain


def forged_values(marker: Path, key: str, genuine: bytes) -> list[bytes]:
    evil = pickle.dumps(Exploit(marker))
    names = key.encode()
    frame = len(names).to_bytes(4, "big") + names + evil
    flipped = bytearray(genuine)
    flipped[-1] ^= 0x01
    return [
        evil,  # a bare pickle
        b"SP\x01\x01\x00" + frame,  # an unsigned envelope
        b"SP\x02\x01\x00" + b"\x00" * 32 + frame,  # a signed envelope with a made-up MAC
        bytes(flipped),  # a genuine entry, corrupted
        genuine[: len(genuine) // 2],  # truncated
    ]


@pytest.mark.memcache
def test_forged_entries_are_never_unpickled_through_a_chain(stores: Stores, tmp_path: Path) -> None:
    server = stores.request.getfixturevalue("memcached_server")
    raw = Client(server.address, default_noreply=False, timeout=2)
    marker = tmp_path / "pwned"
    try:
        l2 = stores.memcache(secret=b"chain-secret-for-tests")
        record = BaseDictionaryStore({})
        record.put(Item("victim", 1, 2, "the truth"))
        l2.put(Item("victim", 1, 2, "the truth"))
        key = l2.key_for(Item, {"key": "victim"})
        genuine = raw.get(key)
        attacks = forged_values(marker, key, genuine)
        for n, value in enumerate(attacks, start=1):
            raw.set(key, value)
            chain = ChainedStore([ProcessMemoryStore(), l2, record])  # a fresh process each time
            assert chain.get(Item, {"key": "victim"}).payload == "the truth"  # type: ignore[union-attr]
            assert not marker.exists(), "attacker code ran"
            assert l2.rejected == n  # counted...
            assert chain.stats()[1].misses == 1  # ...and treated as a miss
            refilled = l2.get(Item, {"key": "victim"})  # the add-only back-fill may or may not fill it
            assert refilled is None or refilled.payload == "the truth"
            raw.set(key, value)
            assert chain.batch_get(Item, [{"key": "victim"}, {"zap": 1, "bar": 2}])[0].payload == "the truth"
            assert not marker.exists()
    finally:
        raw.close()
