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
    ``redis_server_factory.start(*args)`` returns a :class:`RedisProcess` on a
    free loopback port (no persistence; ``args`` are extra ``redis-server``
    options such as ``"--maxmemory", "1mb"``) with ``.url``, ``.port``,
    ``.stop()``, ``.start()``, ``.kill()`` (SIGKILL), ``.pause()`` (SIGSTOP)
    and ``.resume()`` (SIGCONT).  Every process it started is stopped, by PID,
    after the test.

``redis_cluster`` (session)
    A 3-primary Redis Cluster (no replicas) that the suite starts itself from
    the ``redis-server`` binary: three processes on free loopback ports (and
    free cluster-bus ports) with ``cluster-enabled yes``, their
    ``cluster-config-file`` and ``dir`` in a temporary directory and no
    persistence, joined with ``redis-cli --cluster create ... --cluster-yes``;
    ready once every node reports ``cluster_state:ok``.  A
    :class:`RedisClusterProcesses` with ``.nodes`` (one :class:`RedisProcess`
    each, which a fault test may kill, restart -- it rejoins from its config
    file, empty -- or pause), ``.url`` (a startup node), ``.startup_nodes``
    (``(host, port)`` pairs) and ``.wait_ok()``.  Shared by the session: use a
    fresh key prefix or namespace per test, and leave every node running
    (and ``cluster_state:ok``) at the end of a test that breaks one.  Skips
    (or fails under ``CI=true``) without ``redis-server``/``redis-cli`` or
    the redis package.  Stopped by PID at the end of the session.

``redis_cluster_client`` (function)
    A ``redis.cluster.RedisCluster`` on ``redis_cluster``.  After the test it
    deletes, on every primary, the keys that contain ``redis_prefix``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from .services import port_open, unavailable

__all__ = ["RedisClusterProcesses", "RedisProcess", "RedisServerFactory", "redis_url_from_env"]

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
    """One private ``redis-server`` on a loopback port, without persistence, controlled by PID.

    :param binary: the ``redis-server`` executable.
    :param port: the port (default: a free one).
    :param args: extra ``redis-server`` command-line options.
    :param cwd: the working directory of the process.
    """

    host = "127.0.0.1"

    def __init__(self, binary: str, port: int | None = None, args: Sequence[str] = (), cwd: str | None = None) -> None:
        self.binary = binary
        self.port = port if port is not None else _free_port()
        self.args = list(args)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("redis-server is not running")
        return self.proc.pid

    def start(self, timeout: float = 5.0) -> RedisProcess:
        """Start (again, on the same port) and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        cmd = [self.binary, "--port", str(self.port), "--bind", self.host, "--save", "", "--appendonly", "no"]
        cmd += self.args
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.cwd)
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

    def _signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP); returns once the kernel reports it stopped."""
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
        self.proc.wait(timeout=5)
        self.proc = None

    def stop(self) -> None:
        """Terminate the process (SIGTERM, SIGKILL after 5 s) and reap it; its data is lost."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
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

    def start(self, *args: str) -> RedisProcess:
        """Start one server on a free port; ``args`` are extra ``redis-server`` options."""
        process = RedisProcess(self.binary, args=args)
        self.processes.append(process)
        return process.start()

    def close(self) -> None:
        for process in self.processes:
            process.stop()


def _redis_server_binary() -> str:
    binary = os.environ.get("STOCKPYLE_REDIS_SERVER_BIN") or shutil.which("redis-server")
    if not binary:
        unavailable("redis-server binary not found; apt-get install redis-server")
    try:
        import redis  # noqa: F401
    except ImportError:
        unavailable("the redis package is not installed: pip install stockpyle[redis]")
    return binary


@pytest.fixture
def redis_server_factory() -> Iterator[RedisServerFactory]:
    factory = RedisServerFactory(_redis_server_binary())
    try:
        yield factory
    finally:
        factory.close()


# ---------------------------------------------------------------------------
# a Redis Cluster of our own


class RedisClusterProcesses:
    """Three ``redis-server`` primaries joined into one Redis Cluster (no replicas).

    :param binary: the ``redis-server`` executable.
    :param cli: the ``redis-cli`` executable (creates the cluster).
    :param directory: where the nodes keep their cluster config files.
    :param node_timeout: ``cluster-node-timeout`` in milliseconds: a node that
        is away for longer is marked failed and, as every slot must be served
        (``cluster-require-full-coverage``), the whole cluster refuses requests
        until it returns.
    """

    def __init__(self, binary: str, cli: str, directory: str, node_timeout: int = 5000) -> None:
        self.cli = cli
        self.nodes: list[RedisProcess] = []
        for _ in range(3):
            port = _free_port()
            args = [
                "--cluster-enabled", "yes",
                "--cluster-port", str(_free_port()),
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", str(node_timeout),
                "--dir", directory,
            ]  # fmt: skip
            self.nodes.append(RedisProcess(binary, port, args, cwd=directory))

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(node.host, node.port) for node in self.nodes]

    @property
    def url(self) -> str:
        """A ``redis://`` URL of one node (the client discovers the others)."""
        return self.nodes[0].url

    def start(self) -> RedisClusterProcesses:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [self.cli, "--cluster", "create", *(node.address for node in self.nodes), "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
        )  # fmt: skip
        self.wait_ok()
        return self

    def cluster_state(self, node: RedisProcess) -> str:
        """``cluster_state`` as ``node`` reports it (``"ok"``, ``"fail"``), or ``"down"``."""
        try:
            out = subprocess.run(
                [self.cli, "-h", node.host, "-p", str(node.port), "cluster", "info"],
                check=True, capture_output=True, text=True, timeout=5,
            )  # fmt: skip
        except (subprocess.SubprocessError, OSError):
            return "down"
        for line in out.stdout.splitlines():
            if line.startswith("cluster_state:"):
                return line.split(":", 1)[1].strip()
        return "unknown"

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every node reports ``cluster_state:ok``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.cluster_state(node) == "ok" for node in self.nodes):
                return
            time.sleep(0.1)
        states = {node.address: self.cluster_state(node) for node in self.nodes}
        raise RuntimeError(f"the Redis Cluster did not reach cluster_state:ok within {timeout}s: {states}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __repr__(self) -> str:
        return f"<RedisClusterProcesses {', '.join(node.address for node in self.nodes)}>"


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    binary = _redis_server_binary()
    cli = os.environ.get("STOCKPYLE_REDIS_CLI_BIN") or shutil.which("redis-cli")
    if not cli:
        unavailable("redis-cli binary not found; apt-get install redis-tools")
    with tempfile.TemporaryDirectory(prefix="stockpyle-redis-cluster-") as directory:
        cluster = RedisClusterProcesses(binary, cli, str(Path(directory)))
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        try:
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture
def redis_cluster_client(redis_cluster: RedisClusterProcesses, redis_prefix: str) -> Iterator[Any]:
    from redis.cluster import RedisCluster

    redis_cluster.wait_ok()  # a test before may have restarted a node
    client = RedisCluster.from_url(redis_cluster.url, socket_connect_timeout=2, socket_timeout=10)
    try:
        yield client
    finally:
        redis_cluster.wait_ok()
        client.nodes_manager.initialize()  # a node may have restarted during the test
        for node in client.get_primaries():
            connection = client.get_redis_connection(node)
            keys = list(connection.scan_iter(match=f"*{redis_prefix}*", count=1000))
            for key in keys:
                connection.delete(key)  # one key per command: the keys are in different slots
        client.close()
