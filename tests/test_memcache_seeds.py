"""The seed documents' MemcacheStore examples (000 and 002), retold against a real memcached."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest

from stockpyle import ChainedStore, MemcacheStore, MultiStore, ProcessMemoryStore

pytestmark = pytest.mark.memcache


class Foo:
    """Unique for each (bar, zap) pair, as in the 0.0.2 page."""

    __stockpyle_keys__: ClassVar[list[Any]] = [("bar", "zap")]

    def __init__(self, bar: Any, zap: Any) -> None:
        self.bar = bar
        self.zap = zap


class Ticket:
    """Found by ``key`` or by the pair (zap, bar), as in the 0.1.8 README."""

    __stockpyle_keys__: ClassVar[list[Any]] = ["key", ("zap", "bar")]

    def __init__(self, key: Any, zap: Any, bar: Any) -> None:
        self.key = key
        self.zap = zap
        self.bar = bar


class Vehicle:
    __stockpyle_keys__: ClassVar[list[Any]] = ["license_plate"]

    def __init__(self, license_plate: str, color: str = "") -> None:
        self.license_plate = license_plate
        self.color = color


class Sedan(Vehicle):
    pass


try:
    from sqlalchemy import Column, Integer, String
    from sqlalchemy.orm import DeclarativeBase

    class _Base(DeclarativeBase):
        pass

    class _Record(_Base):
        """A mapped class keyed by its primary key and a unique column."""

        __tablename__ = "records"
        __stockpyle_keys__: ClassVar[list[Any]] = ["id", "foobar"]
        id = Column(Integer, primary_key=True)
        foobar = Column(Integer, unique=True)
        note = Column(String(50), default="")

    Record: Any = _Record
except ImportError:  # pragma: no cover - the SQL example is skipped
    Record = None


def ttl(address: str, key: str) -> int | None:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(f"mg {key} t\r\n".encode())
        reply = sock.recv(4096)
    return None if reply.startswith(b"EN") else int(reply.split()[1][1:])


_made: list[MemcacheStore] = []


@pytest.fixture(autouse=True)
def _release_stores() -> Iterator[None]:
    yield
    while _made:
        _made.pop().release()


def memcache(memcached_server: Any, **options: Any) -> MemcacheStore:
    options.setdefault("namespace", "seed" + uuid.uuid4().hex[:8])
    store = MemcacheStore(servers=[memcached_server.address], **options)
    _made.append(store)
    return store


def test_two_level_cache_from_the_0_0_2_page(memcached_server: Any) -> None:
    pm = ProcessMemoryStore()
    mc = memcache(memcached_server)
    store = MultiStore([pm, mc])
    obj = Foo(bar=444, zap=888)
    store.put(obj)
    # the object went through to memcached, and a read is answered from memory
    assert mc.get(Foo, {"bar": 444, "zap": 888}).zap == 888  # type: ignore[union-attr]
    assert store.get(Foo, {"bar": 444, "zap": 888}) is obj
    # a second process (empty memory) finds it in memcached
    other = MultiStore([ProcessMemoryStore(), memcache(memcached_server, namespace=mc.namespace)])
    found = other.get(Foo, {"zap": 888, "bar": 444})
    assert (found.bar, found.zap) == (444, 888)  # type: ignore[union-attr]


def test_different_lifetimes_per_layer(memcached_server: Any) -> None:
    pm = ProcessMemoryStore()
    mc = memcache(memcached_server)
    store = MultiStore([pm, mc])
    pm.configure(classes=[Foo], lifetime=60)
    mc.configure(classes=[Foo], lifetime=5 * 60)
    store.put(Foo(1, 2))
    remaining = ttl(memcached_server.address, mc.key_for(Foo, {"bar": 1, "zap": 2}))
    assert remaining is not None
    assert 297 <= remaining <= 300


def test_batches_from_the_0_0_2_page(memcached_server: Any) -> None:
    store = MultiStore([ProcessMemoryStore(), memcache(memcached_server)])
    store.batch_put([Foo(111, 777), Foo(222, 888), Foo(333, 999)])
    fresh = MultiStore([ProcessMemoryStore(), store.stores[1]])
    obj1, obj2, obj3 = fresh.batch_get(
        Foo, [{"bar": 111, "zap": 777}, {"bar": 222, "zap": 888}, {"bar": 333, "zap": 999}]
    )
    assert [(o.bar, o.zap) for o in (obj1, obj2, obj3)] == [(111, 777), (222, 888), (333, 999)]  # type: ignore[union-attr]


def test_alternate_keys_and_polymorphism_through_memcached(memcached_server: Any) -> None:
    mc = memcache(memcached_server, polymorphic=True)
    mc.put(Ticket("abc", 1, 2))
    assert mc.get(Ticket, {"key": "abc"}).bar == 2  # type: ignore[union-attr]
    assert mc.get(Ticket, {"zap": 1, "bar": 2}).key == "abc"  # type: ignore[union-attr]
    mc.put(Sedan("XYZ-9", "blue"))
    car, automobile = mc.get(Sedan, {"license_plate": "XYZ-9"}), mc.get(Vehicle, {"license_plate": "XYZ-9"})
    assert isinstance(automobile, Sedan)
    assert (car.color, automobile.color) == ("blue", "blue")  # type: ignore[union-attr]


def test_chained_store_with_a_database_from_the_0_1_8_readme(memcached_server: Any, tmp_path: Path) -> None:
    if Record is None:
        pytest.skip("SQLAlchemy is not installed")
    from stockpyle.stores.sqlalchemy import SqlAlchemyStore

    sa = SqlAlchemyStore(uri=f"sqlite:///{tmp_path / 'data.sqlite'}")
    try:
        Record.metadata.create_all(sa.engine)
        mc = memcache(memcached_server)
        store = ChainedStore([ProcessMemoryStore(), mc, sa])
        obj = Record(foobar=123, note="hello")
        store.put(obj)
        assert obj.id is not None  # the database assigned the key and the caches hold it
        cached = mc.get(Record, {"id": obj.id})
        assert cached is not None
        assert (cached.foobar, cached.note) == (123, "hello")
        from_cache = ChainedStore([mc, sa]).get(Record, {"foobar": 123})
        assert from_cache.note == "hello"  # type: ignore[union-attr]
        store.delete(obj)
        assert mc.get(Record, {"id": obj.id}) is None
    finally:
        sa.release()
