"""CachedMapping under a frozen backend, replayed pointers and forks (issue: fail fast, never move back)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from stockpyle.collections import CachedMapping


class Items(CachedMapping[str, int]):
    def __init__(self, backend: Any, name: str, data: dict[str, int], **options: Any) -> None:
        self.data = data
        super().__init__(backend, name, "v1", **options)

    def load(self) -> dict[str, int]:
        return dict(self.data)


Frozen = tuple[Any, Callable[[], Any]]  # (server process with pause/resume, make a slow client for it)


@pytest.fixture(
    params=[pytest.param("memcached", marks=pytest.mark.memcache), pytest.param("redis", marks=pytest.mark.redis)]
)
def frozen(request: pytest.FixtureRequest) -> Iterator[Frozen]:
    """A private server and a client with the long timeouts a user might choose (10 s)."""
    if request.param == "memcached":
        server = request.getfixturevalue("memcached_factory").one()
        from pymemcache.client.base import PooledClient

        yield server, lambda: PooledClient(server.address, default_noreply=False, connect_timeout=10, timeout=10)
    else:
        import redis

        server = request.getfixturevalue("redis_server_factory").start()
        yield server, lambda: redis.Redis.from_url(server.url, socket_timeout=10, socket_connect_timeout=10)


def test_a_frozen_backend_never_blocks_a_read_beyond_check_timeout(frozen: Frozen) -> None:
    server, make_client = frozen
    writer = Items(make_client(), "fast", {"a": 1})
    writer.push()
    reader = Items(make_client(), "fast", {}, check_interval=0, check_timeout=0.2)
    assert reader["a"] == 1
    server.pause()
    try:
        for _ in range(5):
            started = time.monotonic()
            assert reader["a"] == 1  # the copy it has
            assert time.monotonic() - started < 0.2 + 0.15
        assert reader.stats().timeouts == 1  # one check is still waiting; reads did not wait for it
        fresh = Items(make_client(), "fast", {"a": 100}, check_interval=0, check_timeout=0.2)
        started = time.monotonic()
        assert fresh["a"] == 100  # no copy yet: load() instead of waiting for the server
        assert time.monotonic() - started < 0.2 + 0.15
    finally:
        server.resume()
    writer.data = {"a": 2}
    writer.push()
    deadline = time.monotonic() + 15
    while reader["a"] != 2:  # the check that was waiting finishes, then the next one sees revision 2
        assert time.monotonic() < deadline, "the reader never caught up after the server resumed"
        time.sleep(0.05)
    writer.close()
    reader.close()


@pytest.mark.redis
def test_a_replayed_signed_pointer_never_moves_a_reader_back(redis_client: Any, redis_prefix: str) -> None:
    writer = Items(redis_client, f"{redis_prefix}-replay", {"role": 1}, secret=b"p" * 32)
    writer.push()
    pointer_key = writer._ns.pointer
    old_pointer = redis_client.get(pointer_key)  # signed, revision 1
    writer.data = {"role": 2}
    writer.push()
    reader = Items(redis_client, f"{redis_prefix}-replay", {}, secret=b"p" * 32, check_interval=0, grace=3600)
    assert reader["role"] == 2
    redis_client.set(pointer_key, old_pointer)  # the attacker points everyone back at revision 1
    assert reader["role"] == 2
    assert reader.stats().rollbacks >= 1
    assert reader.revision == 2
    writer.purge()


@pytest.mark.redis
def test_an_unsigned_pointer_is_refused_by_a_signing_mapping(redis_client: Any, redis_prefix: str) -> None:
    writer = Items(redis_client, f"{redis_prefix}-plain", {"a": 1}, secret=b"q" * 32)
    writer.push()
    reader = Items(redis_client, f"{redis_prefix}-plain", {}, secret=b"q" * 32, check_interval=0)
    assert reader["a"] == 1
    nonce = reader._current.pointer.nonce  # type: ignore[union-attr]
    redis_client.set(writer._ns.pointer, f"9.{nonce}.1".encode())  # forged: revision 9, unsigned (0.2 layout)
    assert reader["a"] == 1
    assert reader.revision == 1
    assert reader.stats().corrupt >= 1
    writer.purge()


@pytest.mark.redis
def test_a_forked_child_checks_with_a_thread_of_its_own(redis_client: Any, redis_prefix: str) -> None:
    writer = Items(redis_client, f"{redis_prefix}-fork", {"a": 1})
    writer.push()
    reader = Items(redis_client.__class__(connection_pool=redis_client.connection_pool), f"{redis_prefix}-fork", {},
                   check_interval=0)  # fmt: skip
    assert reader["a"] == 1  # the checker thread of the parent exists now
    writer.data = {"a": 2}
    writer.push()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            reader._backend.driver.client.connection_pool.reset()  # type: ignore[attr-defined]
            code = 0 if reader["a"] == 2 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    writer.purge()
