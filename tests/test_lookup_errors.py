"""A lookup that is not a dict (``store.get(Foo, 1)``) says what a lookup is, in every store.

Each store turns the lookup into a key in its own place (the in-process hot
paths, the chain's L1 probe, keys.lookup_key for the dictionary and
memcached stores, SqlAlchemyStore's column check), so each is tried.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stockpyle import ChainedStore, ProcessMemoryStore, ThreadLocalStore
from stockpyle.testing import Item

sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column  # noqa: E402


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "sp_lookup_errors_account"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(unique=True)


NOT_DICTS = [1, "abc", [("key", "k")], ("key",), None]


def _shove() -> Any:
    if importlib.util.find_spec("shove") is None:  # not importorskip: shove imports only through stockpyle
        pytest.skip("shove is not installed: pip install stockpyle[shove]")
    from stockpyle import ShoveStore

    return ShoveStore(uri="simple://")


STORES: dict[str, Callable[[], Any]] = {
    "ProcessMemoryStore": ProcessMemoryStore,
    "ProcessMemoryStore(maxsize)": lambda: ProcessMemoryStore(maxsize=10),
    "ThreadLocalStore": ThreadLocalStore,
    "ShoveStore": _shove,
    "ChainedStore([PM])": lambda: ChainedStore([ProcessMemoryStore()]),
    "ChainedStore([PM, TL])": lambda: ChainedStore([ProcessMemoryStore(), ThreadLocalStore()]),
    "ChainedStore([TL, PM])": lambda: ChainedStore([ThreadLocalStore(), ProcessMemoryStore()]),
}


@pytest.fixture(params=list(STORES))
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    made = STORES[request.param]()
    made.put(Item("k", 1, 2))
    yield made
    made.release()


@pytest.mark.parametrize("lookup", NOT_DICTS, ids=repr)
def test_get_with_a_non_dict_says_a_key_dict_is_needed(store: Any, lookup: object) -> None:
    with pytest.raises(TypeError, match=r"a lookup is a dict of key attribute values, e\.g\. \{'key': ") as info:
        store.get(Item, lookup)
    assert "the keys of Item: key or (bar, zap)" in str(info.value)
    with pytest.raises(TypeError, match="a lookup is a dict of key attribute values"):
        store.batch_get(Item, [{"key": "k"}, lookup])


def test_the_message_shows_the_dict_that_was_meant(store: Any) -> None:
    with pytest.raises(TypeError, match=r"e\.g\. \{'key': 'k'\}, not 'k'"):
        store.get(Item, "k")
    with pytest.raises(TypeError, match=r"e\.g\. \{'key': 7\}, not 7"):
        store.get(Item, 7)
    assert store.get(Item, {"key": "k"}) == Item("k", 1, 2)  # the store still works


def test_batch_get_given_one_dict_says_it_takes_a_list(store: Any) -> None:
    with pytest.raises(TypeError, match=r"not 'key' .*; batch_get\(\) takes a list of such dicts"):
        store.batch_get(Item, {"key": "k"})


@pytest.mark.memcache
def test_memcache_store(make_memcache_store: Callable[..., Any]) -> None:
    memcache = make_memcache_store()
    with pytest.raises(TypeError, match=r"e\.g\. \{'key': 1\}, not 1"):
        memcache.get(Item, 1)
    chain = ChainedStore([ProcessMemoryStore(), memcache])
    with pytest.raises(TypeError, match=r"e\.g\. \{'key': 1\}, not 1"):
        chain.batch_get(Item, [1])


def test_sqlalchemy_store_and_a_chain_over_it(tmp_path: Path) -> None:
    from stockpyle.stores.sqlalchemy import SqlAlchemyStore

    database = SqlAlchemyStore(uri=f"sqlite:///{tmp_path}/lookups.sqlite")
    Base.metadata.create_all(database.engine)
    try:
        for target in (database, ChainedStore([ProcessMemoryStore(), database])):
            for lookup in (1, "a@example.com", [("id", 1)]):
                with pytest.raises(TypeError, match=r"a lookup (is|must be) a dict"):
                    target.get(Account, lookup)
                with pytest.raises(TypeError, match=r"a lookup (is|must be) a dict"):
                    target.batch_get(Account, [lookup])
    finally:
        database.release()
