"""Stores close every connection they opened when released."""

from __future__ import annotations

import gc
import threading
import warnings
from typing import Any

import pytest

from stockpyle import ChainedStore, MemcacheStore, ProcessMemoryStore, SqlAlchemyStore
from stockpyle.testing import Item


def _work(store: Any, threads: int = 4) -> None:
    def run(t: int) -> None:
        for i in range(25):
            store.put(Item(f"k{t}-{i}", t, i))
            store.get(Item, {"key": f"k{t}-{i}"})
        store.batch_get(Item, [{"key": f"k{t}-{i}"} for i in range(25)])

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def _assert_no_resource_warnings(build: Any, servers: list[str], *, sqlite: bool = False) -> None:
    """Nothing ``build()``'s store opened on ``servers`` (or, with ``sqlite``, any SQLite database) is left open.

    Earlier tests' stores are collected first, and a warning about another
    test's socket (its store collected while this one runs) is not this store's
    leak: only sockets to this test's servers count.  The earlier tests'
    garbage is collected with ResourceWarning ignored: a connection another
    test dropped (a socket, an SQLite connection) would otherwise warn here,
    under the suite's "error" filter, and fail this test for that test's leak.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    ports = [f"'{address.rpartition(':')[0]}', {address.rpartition(':')[2]})" for address in servers]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        store = build()
        _work(store)
        store.release()
        del store
        gc.collect()
    leaks = [
        str(w.message)
        for w in caught
        if issubclass(w.category, ResourceWarning)
        and (any(port in str(w.message) for port in ports) or (sqlite and "database" in str(w.message)))
    ]
    assert leaks == []


@pytest.mark.memcache
def test_memcache_release_closes_every_socket(memcached_server: Any, memcached_cluster: Any) -> None:
    _assert_no_resource_warnings(
        lambda: MemcacheStore([memcached_server.address], namespace="res1"), [memcached_server.address]
    )
    _assert_no_resource_warnings(
        lambda: MemcacheStore(memcached_cluster.addresses, namespace="res2"), list(memcached_cluster.addresses)
    )


@pytest.mark.memcache
def test_chain_release_closes_every_layer(memcached_server: Any, tmp_path: Any) -> None:
    _assert_no_resource_warnings(
        lambda: ChainedStore([ProcessMemoryStore(), MemcacheStore([memcached_server.address], namespace="res3")]),
        [memcached_server.address],
    )
    _assert_no_resource_warnings(
        lambda: ChainedStore(
            [
                MemcacheStore([memcached_server.address], namespace="res4"),
                SqlAlchemyStore(uri=f"sqlite:///{tmp_path}/r.db"),  # Item is unmapped: the SQL layer ignores it
            ]
        ),
        [memcached_server.address],
        sqlite=True,
    )
