"""Real memcached servers for the test suite (a pytest plugin, loaded by tests/conftest.py).

The suite starts its own ``memcached`` processes from the binary on free
loopback ports (``memcached -l 127.0.0.1 -p PORT -U 0 -m 16``) and stops them
by PID.  Fixtures (keep these names stable, other test modules use them):

``memcached_binary`` (session)
    Path of the ``memcached`` executable; skips (or fails under ``CI=true`` /
    ``STOCKPYLE_REQUIRE_SERVICES=1``) with "memcached binary not found; apt-get
    install memcached" when it is missing.

``memcached_server`` (session)
    One shared server: an object with ``.address`` (``"127.0.0.1:PORT"``),
    ``.host``, ``.port``.  Shared by every test of the session, so each test
    must use its own namespace/prefix; never stop or kill it.  When
    ``STOCKPYLE_MEMCACHE_SERVERS`` is set (comma-separated ``host:port``), its
    first entry is used instead of a started process.

``memcached_cluster`` (session)
    Three shared servers: ``.servers`` (the server objects) and
    ``.addresses`` (their ``host:port`` strings).  Same rules as above; uses the
    first three ``STOCKPYLE_MEMCACHE_SERVERS`` entries when three are given.

``memcached_factory`` (function)
    Starts private servers for tests that break them:
    ``memcached_factory.start(count=1, memory_mb=16, item_size=None)`` returns a
    list of :class:`MemcachedProcess`, each of which can :meth:`~MemcachedProcess.stop`,
    :meth:`~MemcachedProcess.kill` (SIGKILL), :meth:`~MemcachedProcess.pause`
    (SIGSTOP), :meth:`~MemcachedProcess.resume` (SIGCONT) and
    :meth:`~MemcachedProcess.restart` on the same port.  Every process it
    started is stopped after the test.  Also ``memcached_factory.free_address()``
    gives an address where nothing listens (for "connection refused" tests).

``make_memcache_store`` (function)
    ``make_memcache_store(**options)`` builds a ``MemcacheStore`` on the shared
    server in a fresh namespace and releases it after the test.

Helpers: :func:`fresh_namespace` and :func:`remaining_ttl` (a key's TTL as the
server reports it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .services import port_open, unavailable

__all__ = [
    "ExternalMemcached",
    "MemcachedCluster",
    "MemcachedFactory",
    "MemcachedProcess",
    "find_memcached",
    "free_port",
    "fresh_namespace",
    "remaining_ttl",
]

MISSING_REASON = "memcached binary not found; apt-get install memcached"
ENV_SERVERS = "STOCKPYLE_MEMCACHE_SERVERS"


def find_memcached() -> str | None:
    """Path of the memcached executable (``$STOCKPYLE_MEMCACHED_BIN`` or on ``$PATH``)."""
    explicit = os.environ.get("STOCKPYLE_MEMCACHED_BIN")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("memcached") or next(
        (p for p in ("/usr/bin/memcached", "/usr/local/bin/memcached") if os.access(p, os.X_OK)), None
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MemcachedProcess:
    """One memcached process on a loopback port, controlled by its PID.

    :param binary: the memcached executable.
    :param port: the port (default: a free one).
    :param memory_mb: ``-m``, the cache size.
    :param item_size: ``-I``, the largest item (e.g. ``"1m"``), or memcached's default.
    """

    host = "127.0.0.1"

    def __init__(self, binary: str, port: int | None = None, memory_mb: int = 16, item_size: str | None = None):
        self.binary = binary
        self.port = port if port is not None else free_port()
        self.memory_mb = memory_mb
        self.item_size = item_size
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        """PID of the running process."""
        if self.proc is None:
            raise RuntimeError("memcached is not running")
        return self.proc.pid

    def command(self) -> list[str]:
        cmd = [self.binary, "-l", self.host, "-p", str(self.port), "-U", "0", "-m", str(self.memory_mb), "-t", "2"]
        if self.item_size:
            cmd += ["-I", self.item_size]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd += ["-u", "root"]  # memcached refuses to run as root without -u
        return cmd

    def start(self, timeout: float = 5.0) -> MemcachedProcess:
        """Start the process and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.proc = None
                raise RuntimeError(f"memcached on port {self.port} exited at start: {err.strip()}")
            if port_open(self.host, self.port, timeout=0.2):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"memcached on port {self.port} did not accept connections within {timeout}s")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections hang until :meth:`resume`.

        Returns once the kernel reports the process stopped: the signal is
        delivered asynchronously, and a request sent before that is answered.
        """
        self._signal(signal.SIGSTOP)
        if self.proc is None:
            return
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            with open(f"/proc/{self.proc.pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    return
            time.sleep(0.005)

    def resume(self) -> None:
        """Thaw a paused process (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the process (its data is lost) and reap it."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self._reap()

    def stop(self) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after 2 s) and reap it."""
        if self.proc is None:
            return
        self._signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        assert self.proc is not None
        self.proc.wait(timeout=5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def restart(self) -> MemcachedProcess:
        """Stop if running, then start again on the same port (empty cache)."""
        self.stop()
        return self.start()

    def __repr__(self) -> str:
        state = f"pid={self.proc.pid}" if self.proc is not None else "stopped"
        return f"<MemcachedProcess {self.address} {state}>"


class ExternalMemcached:
    """A server given by ``STOCKPYLE_MEMCACHE_SERVERS`` (not controlled by the suite)."""

    def __init__(self, address: str) -> None:
        host, _, port = address.strip().rpartition(":")
        self.host = host or "127.0.0.1"
        self.port = int(port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def __repr__(self) -> str:
        return f"<ExternalMemcached {self.address}>"


class MemcachedCluster:
    """Several servers: ``.servers`` and ``.addresses``."""

    def __init__(self, servers: list[MemcachedProcess] | list[ExternalMemcached]) -> None:
        self.servers = servers

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]


class MemcachedFactory:
    """Starts private memcached processes and stops all of them on :meth:`close`."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.started: list[MemcachedProcess] = []

    def start(self, count: int = 1, memory_mb: int = 16, item_size: str | None = None) -> list[MemcachedProcess]:
        """Start ``count`` servers, each on its own free port."""
        out = []
        for _ in range(count):
            for attempt in range(3):
                proc = MemcachedProcess(self.binary, memory_mb=memory_mb, item_size=item_size)
                try:
                    proc.start()
                    break
                except RuntimeError:
                    if attempt == 2:  # the free port was taken in between three times
                        raise
            self.started.append(proc)
            out.append(proc)
        return out

    def one(self, **options: object) -> MemcachedProcess:
        """Start one server (same options as :meth:`start`)."""
        return self.start(1, **options)[0]  # type: ignore[arg-type]

    @staticmethod
    def free_address() -> str:
        """A loopback address where nothing listens (connections are refused)."""
        return f"127.0.0.1:{free_port()}"

    def close(self) -> None:
        # SIGKILL: test data is disposable and memcached's graceful exit is slow
        for proc in self.started:
            proc.kill()
        self.started.clear()


def _external() -> list[ExternalMemcached]:
    spec = os.environ.get(ENV_SERVERS, "")
    return [ExternalMemcached(part) for part in spec.split(",") if part.strip()]


@pytest.fixture(scope="session")
def memcached_binary() -> str:
    """Path of the memcached executable, or skip/fail with the install hint."""
    binary = find_memcached()
    if binary is None:
        unavailable(MISSING_REASON)
    return binary


def _check_external(servers: list[ExternalMemcached]) -> None:
    for server in servers:
        if not port_open(server.host, server.port):
            pytest.fail(f"{ENV_SERVERS} names {server.address}, but nothing accepts connections there", pytrace=False)


@pytest.fixture(scope="session")
def memcached_server() -> Iterator[MemcachedProcess | ExternalMemcached]:
    """One memcached shared by the session (``.address`` is ``"127.0.0.1:PORT"``)."""
    external = _external()
    if external:
        _check_external(external[:1])
        yield external[0]
        return
    binary = find_memcached()
    if binary is None:
        unavailable(MISSING_REASON)
    factory = MemcachedFactory(binary)
    try:
        yield factory.one(memory_mb=64)
    finally:
        factory.close()


@pytest.fixture(scope="session")
def memcached_cluster() -> Iterator[MemcachedCluster]:
    """Three memcached servers shared by the session."""
    external = _external()
    if len(external) >= 3:
        _check_external(external[:3])
        yield MemcachedCluster(external[:3])
        return
    binary = find_memcached()
    if binary is None:
        unavailable(MISSING_REASON)
    factory = MemcachedFactory(binary)
    try:
        yield MemcachedCluster(factory.start(3))
    finally:
        factory.close()


@pytest.fixture
def memcached_factory() -> Iterator[MemcachedFactory]:
    """Private memcached processes for one test (stopped afterwards)."""
    binary = find_memcached()
    if binary is None:
        unavailable(MISSING_REASON)
    factory = MemcachedFactory(binary)
    try:
        yield factory
    finally:
        factory.close()


def remaining_ttl(address: str, key: str) -> int | None:
    """Seconds ``key`` has left on the server (-1: never expires; None: absent), read with meta-get."""
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=2) as sock:
        sock.sendall(f"mg {key} t\r\n".encode())
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    if reply.startswith(b"EN"):
        return None
    if not reply.startswith(b"HD"):
        raise AssertionError(f"unexpected meta-get reply: {reply!r}")
    flags = {tok[:1]: tok[1:] for tok in reply.split()[1:]}
    return int(flags[b"t"])


def fresh_namespace() -> str:
    """A MemcacheStore namespace no other test uses (tests share session servers)."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def make_memcache_store(memcached_server: Any) -> Iterator[Callable[..., Any]]:
    """Build MemcacheStores on the session server, each in a fresh namespace; released after the test.

    ``make_memcache_store(**options)`` passes ``options`` to ``MemcacheStore``
    (``servers`` defaults to the session server unless ``client=`` is given).
    """
    from stockpyle import MemcacheStore

    made: list[Any] = []

    def make(**options: Any) -> Any:
        options.setdefault("namespace", fresh_namespace())
        if "client" not in options:
            options.setdefault("servers", [memcached_server.address])
        store = MemcacheStore(**options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.release()
