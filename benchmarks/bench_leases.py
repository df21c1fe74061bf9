"""Leases: the cost of a lease read on a hit against a plain get, and stockpyle's meta codec against meta-memcache.

Run: ``python benchmarks/bench_leases.py [--quick]``.  Starts its own
memcached and redis-server on free loopback ports and stops them by PID.
Following the benchmarking notes, the servers are pinned with ``taskset``
and this process to the same CPU while it measures (``--pin split|off``
changes that, see "Pinning" in ``_timing.py``).  Rows are
interleaved (see ``_timing.py``) and reported as medians and medians of
per-round ratios.

Rows, all on one key holding a 200-byte value:

* the hit path: ``lease_get`` of a present key (memcached: ``mg <key> v c
  N<ttl>`` through stockpyle's sans-IO codec on pymemcache's pooled
  connections; Redis: one ``GET``) against the plain driver ``get``
  (memcached: pymemcache's classic ``get``), target at most 1.25x;
* the codec against meta-memcache (a maintained pure-Python meta client,
  with its compiled response reader), the same ``mg`` with the same flags
  on the same server, and a whole lease round: ``mg ... N`` on a cold key
  (won), ``ms ... C<cas>`` (the fill), ``md`` (to make the key cold again).

meta-memcache is optional (``pip install meta-memcache``); without it its
rows are skipped with a note.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import MemcachedMissing, Suite, interleaved, pinned_client, server_command, standalone

VALUE = bytes(range(200))

PLAIN_GET = "PymemcacheDriver.get (classic get)"
LEASE_GET = "PymemcacheDriver.lease_get, hit (mg v c N)"
PEER_GET = "meta-memcache meta_get, hit (mg v c N)"
LEASE_ROUND = "PymemcacheDriver lease round (mg N, ms C, md)"
PEER_ROUND = "meta-memcache lease round (mg N, ms C, md)"
REDIS_GET = "RedisDriver.get"
REDIS_LEASE_GET = "RedisDriver.lease_get, hit"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _server(cmd: list[str], port: int) -> Iterator[None]:
    process = subprocess.Popen(server_command(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise MemcachedMissing(f"{cmd[0]} did not start on 127.0.0.1:{port}") from None
                time.sleep(0.02)
        yield
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(10)


@contextlib.contextmanager
def pinned_memcached() -> Iterator[str]:
    """A private memcached on a free loopback port, pinned as chosen (``--pin``); yields ``host:port``."""
    binary = shutil.which("memcached") or ("/usr/bin/memcached" if os.path.exists("/usr/bin/memcached") else None)
    if binary is None:
        raise MemcachedMissing("memcached binary not found (apt-get install memcached)")
    port = _free_port()
    cmd = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64", "-t", "1"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd += ["-u", "root"]
    with _server(cmd, port):
        yield f"127.0.0.1:{port}"


@contextlib.contextmanager
def pinned_redis() -> Iterator[str | None]:
    """A private redis-server pinned as chosen (``--pin``); yields its URL (``None`` without the binary)."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = _free_port()
    with _server([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], port):
        yield f"redis://127.0.0.1:{port}/0"


def run(*, quick: bool = False) -> Suite:
    """Start pinned servers and measure; without pymemcache or the binaries, a note and no rows."""
    suite = Suite("leases")
    try:
        import pymemcache  # noqa: F401
    except ImportError:
        suite.notes.append("pymemcache not installed: memcached rows skipped (pip install stockpyle[memcache])")
        return suite
    try:
        with pinned_memcached() as address, pinned_redis() as redis_url, pinned_client():
            _measure_memcached(suite, address, quick)
            if redis_url is None:
                suite.notes.append("redis-server not found: Redis rows skipped")
            else:
                _measure_redis(suite, redis_url, quick)
    except MemcachedMissing as exc:
        suite.notes.append(f"{exc}: lease rows skipped")
    return suite


def _meta_memcache(address: str) -> Any:
    """A meta-memcache client on ``address`` passing bytes through unchanged, or ``None`` when not installed."""
    try:
        from meta_memcache import CacheClient, ServerAddress, connection_pool_factory_builder
        from meta_memcache.base.base_serializer import BaseSerializer, EncodedValue
    except ImportError:
        return None

    class Raw(BaseSerializer):
        def serialize(self, key: Any, value: Any) -> Any:
            return EncodedValue(data=value, encoding_id=0)

        def unserialize(self, data: Any, encoding_id: int) -> Any:
            return bytes(data)

    host, _, port = address.rpartition(":")
    return CacheClient.cache_client_from_servers(
        servers=[ServerAddress(host, int(port))],
        connection_pool_factory_fn=connection_pool_factory_builder(recv_timeout=0.5, connection_timeout=0.25),
        serializer=Raw(),
    )


def _measure_memcached(suite: Suite, address: str, quick: bool) -> None:
    from stockpyle.stores.drivers import LeaseStatus
    from stockpyle.stores.drivers.pymemcache import PymemcacheDriver, build_client, normalize_servers

    client = build_client(normalize_servers([address]), connect_timeout=0.25, timeout=0.5, max_pool_size=None)
    driver = PymemcacheDriver(client, servers=[address])
    hot = "sp:bench:Item.0000:" + "a" * 40
    driver.set_many({hot: VALUE}, driver.ttl(3600))
    lease = driver.ttl(30)
    assert driver.get(hot) == VALUE
    assert driver.lease_get(hot, lease).value == VALUE

    def our_round() -> None:
        read = driver.lease_get(cold, lease)
        if read.status is not LeaseStatus.WON or not driver.lease_fill(cold, VALUE, read.token, 60):
            raise AssertionError(f"lease round failed: {read}")
        driver.delete_many([cold])

    cold = "sp:bench:Item.0000:" + "c" * 40
    rows: list[tuple[str, Callable[[], object]]] = [
        (PLAIN_GET, lambda: driver.get(hot)),
        (LEASE_GET, lambda: driver.lease_get(hot, lease)),
    ]
    rounds: list[tuple[str, Callable[[], object]]] = [(LEASE_ROUND, our_round)]
    peer = _meta_memcache(address)
    if peer is None:
        suite.notes.append("meta-memcache not installed: its rows skipped (pip install meta-memcache)")
    else:
        from meta_memcache import Key, RequestFlags

        hot_key, cold_key = Key(hot), Key("sp:bench:Item.0000:" + "d" * 40)
        get_flags = RequestFlags(return_value=True, return_cas_token=True, vivify_on_miss_ttl=30)
        found = peer.meta_get(hot_key, flags=get_flags)
        assert found.value == VALUE, found

        def peer_round() -> None:
            read = peer.meta_get(cold_key, flags=get_flags)
            if not read.flags.win:
                raise AssertionError(f"meta-memcache lease round failed: {read}")
            done = peer.meta_set(cold_key, VALUE, flags=RequestFlags(cas_token=read.flags.cas_token, cache_ttl=60))
            if type(done).__name__ != "Success":
                raise AssertionError(f"meta-memcache fill failed: {done}")
            peer.meta_delete(cold_key)

        rows.append((PEER_GET, lambda: peer.meta_get(hot_key, flags=get_flags)))
        rounds.append((PEER_ROUND, peer_round))
    number, count = (1_000, 7) if quick else (5_000, 21)
    results = interleaved(rows, number=number, rounds=count)
    results.update(interleaved(rounds, number=number // 4, rounds=count))
    suite.compare(results, LEASE_GET, PLAIN_GET, target="<= 1.25x")
    suite.compare(results, LEASE_GET, PEER_GET, label="stockpyle codec mg hit")
    suite.compare(results, LEASE_ROUND, PEER_ROUND, label="stockpyle codec lease round")
    if PEER_GET in results:
        suite.compare(results, PEER_GET, PLAIN_GET, label="meta-memcache mg hit")
    driver.close()


def _measure_redis(suite: Suite, url: str, quick: bool) -> None:
    from stockpyle.stores.drivers.redis import RedisDriver, build_client

    driver = RedisDriver(build_client(url, cluster=False, socket_timeout=0.5, connect_timeout=0.25))
    hot = "sp:bench:Item.0000:" + "a" * 40
    driver.set_many({hot: VALUE}, driver.ttl(3600))
    lease = driver.ttl(30)
    assert driver.lease_get(hot, lease).value == VALUE
    number, count = (1_000, 7) if quick else (5_000, 21)
    results = interleaved(
        [(REDIS_GET, lambda: driver.get(hot)), (REDIS_LEASE_GET, lambda: driver.lease_get(hot, lease))],
        number=number,
        rounds=count,
    )
    suite.compare(results, REDIS_LEASE_GET, REDIS_GET, target="<= 1.25x")
    driver.close()


if __name__ == "__main__":
    raise SystemExit(standalone(run, "Leases: the hit path and the meta codec against meta-memcache."))
