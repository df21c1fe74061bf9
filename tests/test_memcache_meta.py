"""The meta-protocol codec and the memcached lease transport: large values, connection hygiene, the fallback.

The codec is checked on its own (framing rules, pieces of any size) and on
the bytes a real memcached sends; the transport against real servers: 1 MB
values through leases, a timeout in the middle of a response (the connection
is dropped, never handed out again), and a server without meta commands (a
proxy in front of memcached that answers them with ``ERROR``; see
tests/support/memcached_proxy.py), which gets the add-based fallback with
one warning.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from support.memcached_proxy import ProxyProcess

from stockpyle.exceptions import StoreUnavailableError
from stockpyle.stores.drivers import LeaseStatus
from stockpyle.stores.drivers.memcache_meta import (
    MetaParser,
    MetaProtocolError,
    MetaResponse,
    check_key,
    meta_delete,
    meta_get,
    meta_noop,
    meta_set,
)
from stockpyle.stores.drivers.pymemcache import PymemcacheDriver, build_client, normalize_servers

pytestmark = pytest.mark.memcache

MB = 1024 * 1024


def make_driver(address: str, *, timeout: float = 2.0, max_pool_size: int | None = None) -> PymemcacheDriver:
    client = build_client(
        normalize_servers([address]), connect_timeout=2.0, timeout=timeout, max_pool_size=max_pool_size
    )
    return PymemcacheDriver(client, servers=[address], max_item_size=4 * MB)


@pytest.fixture
def drivers() -> Iterator[list[PymemcacheDriver]]:
    made: list[PymemcacheDriver] = []
    yield made
    for driver in made:
        driver.close()


def key(name: str = "k") -> str:
    return f"meta:{name}:{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------------------
# the codec


def parse_all(data: bytes, pieces: list[int]) -> list[MetaResponse]:
    parser = MetaParser()
    out = []
    at = 0
    for size in [*pieces, len(data)]:
        parser.feed(data[at : at + size])
        at += size
        while (response := parser.next_response()) is not None:
            out.append(response)
        if at >= len(data):
            break
    assert parser.buffered() == 0
    return out


def test_requests_are_encoded_as_the_protocol_says() -> None:
    assert meta_get(b"k", b"v c N30") == b"mg k v c N30\r\n"
    assert meta_get(b"k") == b"mg k\r\n"
    assert meta_set(b"k", b"a\r\nb", b"T60 C42") == b"ms k 4 T60 C42\r\na\r\nb\r\n"
    assert meta_set(b"k", b"") == b"ms k 0\r\n\r\n"
    assert meta_delete(b"k", b"I T30") == b"md k I T30\r\n"
    assert meta_noop() == b"mn\r\n"


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (b"", ValueError, "1 to 250"),
        (b"x" * 251, ValueError, "1 to 250"),
        (b"a b", ValueError, "whitespace"),
        (b"a\r\nmg b", ValueError, "whitespace"),
        (b"a\x00", ValueError, "control"),
        ("text", TypeError, "bytes"),
    ],
)
def test_bad_keys_are_refused_before_anything_is_sent(bad: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        check_key(bad)
    with pytest.raises(error, match=match):
        meta_get(bad, b"v")


@pytest.mark.parametrize("flags", [b"v\r\nmg other", b" v", b"v  c", b"1", b"v c ", "v"])
def test_bad_flags_are_refused(flags: Any) -> None:
    with pytest.raises(ValueError, match="meta flags"):
        meta_get(b"k", flags)
    with pytest.raises(TypeError, match="bytes"):
        meta_set(b"k", "text")  # type: ignore[arg-type]


def test_responses_parse_from_pieces_of_any_size() -> None:
    value = bytes(range(256)) * 40 + b"\r\nEND\r\nVA 3\r\n"
    stream = (
        b"VA %d c42 W\r\n" % len(value) + value + b"\r\nHD\r\nEN\r\nVA 0 c7 Z\r\n\r\nNF\r\nEX\r\nNS\r\nMN\r\n"
        b"SERVER_ERROR out of memory storing object\r\nCLIENT_ERROR bad data chunk\r\nERROR\r\n"
    )
    expected = [
        MetaResponse("VA", {"c": b"42", "W": b""}, value),
        MetaResponse("HD", {}),
        MetaResponse("EN", {}),
        MetaResponse("VA", {"c": b"7", "Z": b""}, b""),
        MetaResponse("NF", {}),
        MetaResponse("EX", {}),
        MetaResponse("NS", {}),
        MetaResponse("MN", {}),
        MetaResponse("SERVER_ERROR", {}, None, "out of memory storing object"),
        MetaResponse("CLIENT_ERROR", {}, None, "bad data chunk"),
        MetaResponse("ERROR", {}, None, ""),
    ]
    assert parse_all(stream, []) == expected
    assert parse_all(stream, [1] * len(stream)) == expected
    rng = random.Random(7)
    for _ in range(50):
        assert parse_all(stream, [rng.randint(1, 40) for _ in range(len(stream))]) == expected
    assert [r.is_error for r in expected[-3:]] == [True, True, True]


def test_needed_says_how_much_of_a_value_is_missing() -> None:
    parser = MetaParser()
    parser.feed(b"VA 10 c1\r\n0123")
    assert parser.next_response() is None
    assert parser.needed() == 8  # six bytes and the CRLF
    parser.feed(b"456789\r\n")
    assert parser.next_response() == MetaResponse("VA", {"c": b"1"}, b"0123456789")
    assert parser.needed() == 0


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        (b"VA 3\r\nabcd\r\n", "does not end with CRLF"),
        (b"VA x\r\nabc\r\n", "malformed value line"),
        (b"VALUE k 0 3\r\nabc\r\nEND\r\n", "unexpected response line"),
        (b"HDX\r\n", "unexpected response line"),
        (b"STORED\r\n", "unexpected response line"),
        (b"X" * 9000, "longer than"),
    ],
)
def test_anything_but_a_response_is_a_protocol_error(stream: bytes, match: str) -> None:
    parser = MetaParser()
    parser.feed(stream)
    with pytest.raises(MetaProtocolError, match=match):
        parser.next_response()


def raw_exchange(address: str, request: bytes, until: bytes) -> bytes:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        data = b""
        while not data.endswith(until):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
    return data


def test_a_real_servers_bytes_parse_in_small_pieces(memcached_factory: Any) -> None:
    (server,) = memcached_factory.start(1, memory_mb=32, item_size="2m")
    value = os.urandom(MB) + b"\r\nVA 1\r\n"
    stored = raw_exchange(server.address, meta_set(b"big", value, b"T60"), b"\r\n")
    assert stored == b"HD\r\n"
    data = raw_exchange(server.address, meta_get(b"big", b"v c s") + meta_noop(), b"MN\r\n")
    rng = random.Random(3)
    pieces = [rng.randint(1, 9) for _ in range(300)] + [rng.randint(1, 70_000) for _ in range(200)]
    first, noop = parse_all(data, pieces)
    assert (first.status, first.value, first.flags["s"]) == ("VA", value, str(len(value)).encode())
    assert noop.status == "MN"


# ---------------------------------------------------------------------------
# the transport


def test_one_megabyte_values_go_through_leases(memcached_factory: Any, drivers: list[PymemcacheDriver]) -> None:
    (server,) = memcached_factory.start(1, memory_mb=32, item_size="2m")
    driver = make_driver(server.address)
    drivers.append(driver)
    lease = driver.ttl(30)
    for size in (MB, MB + 1, 65535, 65536, 65537, 1):
        k = key(f"big{size}")
        value = os.urandom(size - 2) + b"\r\n" if size > 2 else b"\n"
        read = driver.lease_get(k, lease)
        assert read.status is LeaseStatus.WON
        assert driver.lease_fill(k, value, read.token, driver.ttl(60))
        hit = driver.lease_get(k, lease)
        assert (hit.status, hit.value) == (LeaseStatus.HIT, value)
        assert driver.get(k) == value  # pymemcache's classic get on the same pool
        driver.mark_stale([k], driver.ttl(30))
        stale = driver.lease_get(k, lease)
        assert (stale.status, stale.value, stale.stale) == (LeaseStatus.WON, value, True)
    assert driver.lease_modes == {server.address: "meta"}


def test_too_large_a_fill_is_refused_and_the_pool_stays_usable(
    memcached_factory: Any, drivers: list[PymemcacheDriver]
) -> None:
    (server,) = memcached_factory.start(1, memory_mb=32, item_size="1m")
    driver = make_driver(server.address)
    drivers.append(driver)
    k = key("huge")
    read = driver.lease_get(k, driver.ttl(30))
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the driver's own exception, mapped below
        driver.lease_fill(k, b"x" * (2 * MB), read.token, driver.ttl(60))
    mapped = driver.errors.map(caught.value)
    assert type(mapped).__name__ == "ValueTooLargeError", caught.value
    # memcached drops the item a refused store was for (here the stub): the lease is over,
    # and the connection that saw the error was dropped, so the pool's next one is in step
    assert not driver.lease_fill(k, b"small", read.token, driver.ttl(60))
    again = driver.lease_get(k, driver.ttl(30))
    assert again.status is LeaseStatus.WON
    assert driver.lease_fill(k, b"small", again.token, driver.ttl(60))
    assert driver.lease_get(k, driver.ttl(30)).value == b"small"
    assert driver.get(k) == b"small"


def test_a_timeout_mid_response_drops_the_connection(memcached_factory: Any, drivers: list[PymemcacheDriver]) -> None:
    (server,) = memcached_factory.start(1, memory_mb=32, item_size="2m")
    # a proxy that passes meta commands but holds back the second half of responses to "stall" keys for 0.6 s
    proxy = ProxyProcess(server.address, meta="pass", stall=0.6)
    try:
        direct = make_driver(server.address)
        driver = make_driver(proxy.address, timeout=0.25, max_pool_size=1)
        drivers.extend((direct, driver))
        stall, other = key("stall"), key("other")
        direct.set_many({stall: os.urandom(300_000), other: b"the other value"}, direct.ttl(60))
        assert driver.lease_get(other, driver.ttl(30)).value == b"the other value"
        with pytest.raises(TimeoutError) as caught:
            driver.lease_get(stall, driver.ttl(30))
        assert isinstance(driver.errors.map(caught.value), StoreUnavailableError)
        time.sleep(0.8)  # the rest of the stalled response has reached the old connection by now
        pool = driver.client.client_pool
        assert (len(pool.used), len(pool.free)) == (0, 0)  # dropped, not returned
        for _ in range(3):
            read = driver.lease_get(other, driver.ttl(30))
            assert (read.status, read.value) == (LeaseStatus.HIT, b"the other value")
            assert driver.get(other) == b"the other value"
        assert (len(pool.used), len(pool.free)) == (0, 1)
    finally:
        proxy.stop()


def test_a_restarted_server_is_reached_again_after_one_retry(
    memcached_factory: Any, drivers: list[PymemcacheDriver]
) -> None:
    (server,) = memcached_factory.start(1)
    driver = make_driver(server.address)
    drivers.append(driver)
    assert driver.lease_get(key(), driver.ttl(30)).status is LeaseStatus.WON
    server.restart()  # the pooled connection is now closed by the server
    assert driver.lease_get(key(), driver.ttl(30)).status is LeaseStatus.WON
    server.stop()
    with pytest.raises(ConnectionRefusedError) as caught:
        driver.lease_get(key(), driver.ttl(30))
    assert isinstance(driver.errors.map(caught.value), StoreUnavailableError)


# ---------------------------------------------------------------------------
# servers without meta commands


def test_a_server_without_meta_commands_gets_the_add_lock_with_one_warning(
    memcached_server: Any, drivers: list[PymemcacheDriver], caplog: pytest.LogCaptureFixture
) -> None:
    proxy = ProxyProcess(memcached_server.address, meta="refuse")
    try:
        driver = make_driver(proxy.address)
        drivers.append(driver)
        with caplog.at_level(logging.INFO, logger="stockpyle.memcache"):
            k = key("fallback")
            read = driver.lease_get(k, driver.ttl(30))
            assert read.status is LeaseStatus.WON
            assert driver.lease_get(k, driver.ttl(30)).status is LeaseStatus.LOST
            assert driver.get(k) == b""  # the same empty stub a meta lease leaves
            driver.set_many({k: b"v2"}, driver.ttl(60))
            assert not driver.lease_fill(k, b"v1", read.token, driver.ttl(60))
            driver.mark_stale([k], driver.ttl(30))
            assert driver.get(k) is None  # no stale values here: marked stale is deleted
            for _ in range(5):
                driver.lease_get(key(), driver.ttl(30))
        warnings = [r for r in caplog.records if "does not take meta commands" in r.getMessage()]
        assert len(warnings) == 1
        assert warnings[0].levelno == logging.WARNING
        assert proxy.address in warnings[0].getMessage()
        assert driver.lease_modes == {proxy.address: "add"}
    finally:
        proxy.stop()


def test_meta_servers_are_asked_once_and_not_logged(
    memcached_server: Any, drivers: list[PymemcacheDriver], caplog: pytest.LogCaptureFixture
) -> None:
    driver = make_driver(memcached_server.address)
    drivers.append(driver)
    assert driver.lease_modes == {}
    with caplog.at_level(logging.INFO, logger="stockpyle.memcache"):
        for _ in range(3):
            driver.lease_get(key(), driver.ttl(30))
    assert not [r for r in caplog.records if r.name == "stockpyle.memcache"]
    assert driver.lease_modes == {memcached_server.address: "meta"}


def test_leases_route_to_the_entrys_server_in_a_cluster(
    memcached_cluster: Any, drivers: list[PymemcacheDriver]
) -> None:
    client = build_client(
        normalize_servers(memcached_cluster.addresses), connect_timeout=2, timeout=2, max_pool_size=None
    )
    driver = PymemcacheDriver(client, servers=memcached_cluster.addresses)
    drivers.append(driver)
    keys = [key(f"c{i}") for i in range(30)]
    reads = {k: driver.lease_get(k, driver.ttl(30)) for k in keys}
    assert all(r.status is LeaseStatus.WON for r in reads.values())
    for k in keys:  # each stub is on the server that pymemcache's classic commands use for the key
        assert client.clients[client.hasher.get_node(k)].get(k) == b""
        assert driver.lease_fill(k, k.encode(), reads[k].token, driver.ttl(60))
    assert driver.get_many(keys) == {k: k.encode() for k in keys}
    driver.mark_stale(keys, driver.ttl(30))
    assert all(driver.lease_get(k, driver.ttl(30)).stale for k in keys)
    assert set(driver.lease_modes) == set(memcached_cluster.addresses)


def test_a_client_key_prefix_applies_to_lease_commands_too(
    memcached_server: Any, drivers: list[PymemcacheDriver]
) -> None:
    from pymemcache.client.base import PooledClient

    host, _, port = memcached_server.address.rpartition(":")
    prefixed = PooledClient((host, int(port)), key_prefix=b"pfx:", default_noreply=False, timeout=2)
    bare = PooledClient((host, int(port)), default_noreply=False, timeout=2)
    driver = PymemcacheDriver(prefixed)
    drivers.append(driver)
    k = key("prefixed")
    read = driver.lease_get(k, driver.ttl(30))
    assert read.status is LeaseStatus.WON
    assert bare.get("pfx:" + k) == b""  # the stub is under the prefixed key, where classic commands look
    assert bare.get(k) is None
    assert driver.lease_fill(k, b"v", read.token, driver.ttl(60))
    assert prefixed.get(k) == b"v"
    bare.close()
