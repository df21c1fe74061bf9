"""Real Redis for the test suite (a pytest plugin, loaded by tests/conftest.py as ``support.redis``).

Fixtures (keep these names stable, other test modules may use them):

``redis_url`` (session)
    ``$STOCKPYLE_REDIS_URL``, default ``redis://127.0.0.1:6379/0``.

``redis_prefix`` (function)
    A short unique string (``"t" + 12 hex digits``) for this test.  Put it in
    every key or collection name the test creates: the ``redis_client``
    fixture deletes the keys containing it afterwards.

``redis_client`` (function)
    A ``redis.Redis`` client on ``redis_url``.  Skips (or fails under
    ``CI=true`` / ``STOCKPYLE_REQUIRE_SERVICES=1``) when the redis package is
    missing or the server does not answer.  After the test it deletes the
    keys that contain ``redis_prefix`` -- never ``FLUSHDB``/``FLUSHALL``: the
    server may hold other data.

``redis_server_factory`` (function)
    Private ``redis-server`` processes for tests that stop the server:
    ``redis_server_factory.start()`` returns a :class:`RedisProcess` on a free
    loopback port (no persistence) with ``.url``, ``.stop()`` and
    ``.start()``.  Every process it started is stopped, by PID, after the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from .services import port_open, unavailable

__all__ = ["RedisProcess", "RedisServerFactory", "redis_url_from_env"]

ENV_URL = "STOCKPYLE_REDIS_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/0"


def redis_url_from_env() -> str:
    """The Redis URL the tests use."""
    return os.environ.get(ENV_URL) or DEFAULT_URL


def _connect(url: str) -> Any:
    try:
        import redis
    except ImportError:
        unavailable("the redis package is not installed: pip install stockpyle[redis]")
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=10)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        client.close()
        unavailable(f"Redis at {url} is unavailable ({exc}); start redis-server or set {ENV_URL}")
    return client


@pytest.fixture(scope="session")
def redis_url() -> str:
    return redis_url_from_env()


@pytest.fixture
def redis_prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def redis_client(redis_url: str, redis_prefix: str) -> Iterator[Any]:
    client = _connect(redis_url)
    try:
        yield client
    finally:
        # only this test's keys: the prefix holds no glob metacharacters
        keys = list(client.scan_iter(match=f"*{redis_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """One private ``redis-server`` on a loopback port, without persistence, controlled by PID."""

    host = "127.0.0.1"

    def __init__(self, binary: str, port: int | None = None) -> None:
        self.binary = binary
        self.port = port if port is not None else _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 5.0) -> RedisProcess:
        """Start (again, on the same port) and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        cmd = [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"redis-server on port {self.port} exited at start")
            if port_open(self.host, self.port, timeout=0.2):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not accept connections within {timeout}s")

    def stop(self) -> None:
        """Terminate the process (SIGTERM, SIGKILL after 5 s) and reap it; its data is lost."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def __repr__(self) -> str:
        state = f"pid={self.proc.pid}" if self.proc is not None else "stopped"
        return f"<RedisProcess {self.host}:{self.port} {state}>"


class RedisServerFactory:
    """Starts private Redis servers and stops them all at the end of the test."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.processes: list[RedisProcess] = []

    def start(self) -> RedisProcess:
        process = RedisProcess(self.binary)
        self.processes.append(process)
        return process.start()

    def close(self) -> None:
        for process in self.processes:
            process.stop()


@pytest.fixture
def redis_server_factory() -> Iterator[RedisServerFactory]:
    binary = os.environ.get("STOCKPYLE_REDIS_SERVER_BIN") or shutil.which("redis-server")
    if not binary:
        unavailable("redis-server binary not found; apt-get install redis-server")
    try:
        import redis  # noqa: F401
    except ImportError:
        unavailable("the redis package is not installed: pip install stockpyle[redis]")
    factory = RedisServerFactory(binary)
    try:
        yield factory
    finally:
        factory.close()
