"""The Redis driver on redis-py: one Redis server, or a Redis Cluster.

:class:`RedisDriver` adapts a ``redis.Redis`` or ``redis.cluster.RedisCluster``
client to :class:`~stockpyle.stores.drivers.KVDriver`; :func:`build_client`
makes the client :class:`~stockpyle.stores.RedisStore` uses for ``url=``.

Standalone, every batch is one round trip: ``MGET``, ``DEL`` with many keys,
or a non-transactional pipeline of ``SET``.  On a cluster, keys are grouped by
the primary that serves their slot (redis-py's slot table) and each group is
one pipeline on that node's own connection pool, so a batch costs one round
trip per node, and a node that fails fails only its own keys.  A command the
node answers with a redirection (``MOVED``/``ASK``: its slot is migrating) is
sent again through ``RedisCluster``, which follows the redirection and updates
its slot table.  Replicas are never read: an add-only back-fill must see every
acknowledged write, and a replica may not have it yet.

Compare-and-set compares values: the token of a key is the value read, and
``cas`` writes only while the key still holds it (a Lua script comparing SHA-1
digests; ``WATCH``/``MULTI``/``EXEC`` where scripts are refused).  Lifetimes
are integer milliseconds (``PX``); ``0`` means "no expiry".
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import re
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Final

from ...errors import ErrorRule, ErrorTable
from ...exceptions import ConfigurationError, StoreError, StoreUnavailableError, ValueTooLargeError

__all__ = [
    "CAS_SCRIPT",
    "DEFAULT_MAX_ITEM_SIZE",
    "INSTALL_HINT",
    "NO_EXPIRY",
    "RedisDriver",
    "build_client",
    "error_table",
    "import_redis",
]

log = logging.getLogger("stockpyle.redis")

INSTALL_HINT: Final = "RedisStore requires redis-py: pip install stockpyle[redis]"
#: Redis refuses larger values (``proto-max-bulk-len``, 512 MiB by default) by
#: closing the connection, which looks like an outage: sizes are checked first.
DEFAULT_MAX_ITEM_SIZE: Final = 512 * 1024 * 1024
#: The lifetime argument meaning "never expires" (Redis: a key without a TTL).
NO_EXPIRY: Final = 0

#: ``KEYS[1]``: the key; ``ARGV``: SHA-1 hex digest of the value it must still
#: hold, the new value, its lifetime in milliseconds (0: none).
CAS_SCRIPT: Final = """
local current = redis.call('GET', KEYS[1])
if not current or redis.sha1hex(current) ~= ARGV[1] then
  return 0
end
if ARGV[3] == '0' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""


def import_redis() -> Any:
    """Import redis-py, or raise an ImportError that names the extra to install."""
    try:
        import redis
        import redis.backoff
        import redis.cluster
        import redis.exceptions
        import redis.retry
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return redis


def _too_large(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "too large" in text or "invalid bulk length" in text or "too big" in text


def _unreachable_cluster(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "connect" in text or "covered" in text or "reachable" in text


_TABLES: dict[bool, ErrorTable] = {}


def error_table() -> ErrorTable:
    """How redis-py and socket errors map into the stockpyle tree (redis-py installed or not)."""
    installed = True
    try:
        redis = import_redis()
    except ImportError:
        installed = False
    table = _TABLES.get(installed)
    if table is not None:
        return table
    rules = [ErrorRule(OSError, StoreUnavailableError)]
    retry: tuple[type[BaseException], ...] = (ConnectionResetError, BrokenPipeError)
    if installed:
        errors = redis.exceptions
        rules = [
            # a wrong password or missing permission is not an outage: it comes first
            ErrorRule((errors.AuthenticationError, errors.AuthorizationError, errors.NoPermissionError), StoreError),
            ErrorRule((errors.ConnectionError, errors.TimeoutError, OSError), StoreUnavailableError),
            # cluster down, a slot without a node, redirections exhausted ("TTL exhausted")
            ErrorRule((errors.ClusterError, errors.TryAgainError, errors.SlotNotCoveredError), StoreUnavailableError),
            ErrorRule(errors.RedisClusterException, StoreUnavailableError, when=_unreachable_cluster),
            ErrorRule(
                errors.OutOfMemoryError,
                StoreError,
                message="Redis is out of memory (maxmemory reached under a noeviction policy): writes are refused",
            ),
            ErrorRule(
                errors.ResponseError, ValueTooLargeError, when=_too_large, message="Redis refused a value as too large"
            ),
            ErrorRule((errors.RedisError, errors.RedisClusterException), StoreError),
        ]
        retry = (errors.ConnectionError,)
    table = _TABLES[installed] = ErrorTable("Redis", rules, retry=retry)
    return table


def _no_retry(redis: Any) -> Any:
    # redis-py 6+ retries ten times with back-off by default: a frozen server
    # would hold a request for seconds.  The driver retries once itself.
    return redis.retry.Retry(redis.backoff.NoBackoff(), 0)


def build_client(url: str, *, cluster: bool, socket_timeout: float, connect_timeout: float) -> Any:
    """The client for ``url=``: ``redis.Redis`` (pooled) or, for ``cluster``, a ``RedisCluster``.

    Neither connects here except ``RedisCluster``, which reads the cluster's
    topology as it is created: :class:`RedisDriver` therefore calls this for a
    cluster only on first use.  Options in the URL's query string win over
    these (redis-py's rule), e.g. ``?protocol=2``.
    """
    redis = import_redis()
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": _no_retry(redis),
    }
    if cluster:
        return redis.cluster.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def _check_client(redis: Any, client: Any) -> bool:
    """Whether ``client`` is a cluster client; raises ConfigurationError for one the store cannot use."""
    cluster = isinstance(client, redis.cluster.RedisCluster)
    if not cluster and not isinstance(client, redis.Redis):
        hint = " (a synchronous client, not redis.asyncio)" if type(client).__module__.startswith("redis.") else ""
        raise ConfigurationError(
            f"RedisStore(client=...) needs a redis.Redis or redis.cluster.RedisCluster client{hint}; "
            f"got {type(client).__name__}"
        )
    if client.get_encoder().decode_responses:
        raise ConfigurationError(
            "RedisStore(client=...) needs a client that returns bytes: create it without decode_responses=True"
        )
    if cluster and (client.read_from_replicas or getattr(client, "load_balancing_strategy", None) is not None):
        raise ConfigurationError(
            "RedisStore reads from primaries only (a replica may lag behind the writes that add-only back-fills "
            "must see): create the RedisCluster without read_from_replicas or load_balancing_strategy"
        )
    if not cluster and getattr(client.connection_pool, "is_master", True) is False:
        raise ConfigurationError(
            "RedisStore reads from primaries only: pass Sentinel.master_for(...), not slave_for(...)"
        )
    return cluster


def _client_where(client: Any, cluster: bool) -> str:
    if cluster:
        return ", ".join(node.name for node in client.startup_nodes) or "RedisCluster"
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


class RedisDriver:
    """Redis through a ``redis.Redis`` or ``redis.cluster.RedisCluster`` client.

    :param client: the client; or ``None`` with ``connect``.
    :param connect: builds the client on first use (a ``RedisCluster``
        connects as it is created).
    :param cluster: whether ``connect`` builds a cluster client.
    :param where: where the data lives, for messages (default: from the client).
    :param max_item_size: the largest value the server accepts
        (``proto-max-bulk-len``).
    :raises ConfigurationError: for a client the driver cannot use (not a
        redis-py client, ``decode_responses=True``, reading from replicas).
    """

    backend = "Redis"
    min_lifetime = 0.001
    can_add = True
    can_cas = True

    def __init__(
        self,
        client: Any = None,
        *,
        connect: Callable[[], Any] | None = None,
        cluster: bool = False,
        where: str | None = None,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
    ) -> None:
        self._redis = import_redis()
        if (client is None) == (connect is None):
            raise ConfigurationError("RedisDriver needs exactly one of client= and connect=")
        if client is not None:
            cluster = _check_client(self._redis, client)
            where = where or _client_where(client, cluster)
        self.cluster = cluster
        self.where = where or "Redis"
        self.max_item_size: int | None = max_item_size
        self.errors = error_table()
        self._retry = self.errors.retry
        errors = self._redis.exceptions
        self._redirects = (errors.MovedError, errors.AskError, errors.TryAgainError)
        self._lost = (errors.ConnectionError, errors.TimeoutError)
        #: a command the server answered with an error (a pipeline returns it as the command's result)
        self._refusals = errors.ResponseError
        self._connect = connect
        self._lock = threading.Lock()
        self._client = client
        self._script: Any = None
        self._use_script = True
        self._refresh_options: dict[str, Any] = {}
        if cluster:
            initialize = self._redis.cluster.NodesManager.initialize
            if "last_failed_node_name" in inspect.signature(initialize).parameters:
                self._refresh_options = {"last_failed_node_name": None}

    @property
    def client(self) -> Any:
        """The redis-py client (built on first use for a cluster given by URL: that connects)."""
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    assert self._connect is not None
                    self._client = self._connect()
                client = self._client
        return client

    def describe(self) -> str:
        return self.where

    def __repr__(self) -> str:
        return f"<RedisDriver {'cluster ' if self.cluster else ''}{self.where}>"

    @staticmethod
    def ttl(seconds: float | None) -> int:
        """Milliseconds, rounded up (never 0, which means no expiry); ``None``: :data:`NO_EXPIRY`."""
        if seconds is None:
            return NO_EXPIRY
        return max(1, math.ceil(round(seconds * 1000, 6)))

    # -- routing and retries ----------------------------------------------

    def _groups(self, keys: Sequence[str]) -> list[tuple[Any, Any, list[str]]]:
        """``(node name, node client, keys)`` per primary (one group on a standalone server)."""
        client = self.client
        if not self.cluster:
            return [(None, client, list(keys))]
        groups: dict[str, tuple[Any, Any, list[str]]] = {}
        node_for = client.get_node_from_key
        for key in keys:
            node = node_for(key)
            group = groups.get(node.name)
            if group is None:
                group = groups[node.name] = (node.name, client.get_redis_connection(node), [])
            group[2].append(key)
        return list(groups.values())

    def _refresh(self, failed: str | None) -> None:
        """Have redis-py re-read the cluster's topology after a node failed (a failover moves slots)."""
        options = dict(self._refresh_options)
        if options:
            options["last_failed_node_name"] = failed
        try:
            self.client.nodes_manager.initialize(**options)
        except Exception as exc:  # noqa: BLE001 - the node's own failure is what gets reported
            log.debug("stockpyle: Redis Cluster topology refresh failed: %r", exc)

    def _pipeline(self, name: str | None, node: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` to one node in one round trip; results in order (failed commands: their exception).

        :raises: the client's error when the node cannot be reached (after one retry).
        """

        def send() -> list[Any]:
            if len(commands) == 1:  # one command: a pipeline would only add redis-py's own cost
                try:
                    return [node.execute_command(*commands[0])]
                except self._refusals as exc:
                    return [exc]
            pipe = node.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return pipe.execute(raise_on_error=False)  # type: ignore[no-any-return]

        try:
            try:
                results = send()
            except self._retry:
                results = send()
        except self._lost:
            if self.cluster:
                self._refresh(name)
            raise
        if self.cluster:
            for i, result in enumerate(results):
                if isinstance(result, self._redirects):
                    # the slot is migrating: RedisCluster follows MOVED/ASK and updates its slot table
                    try:
                        results[i] = self.client.execute_command(*commands[i])
                    except self._redis.exceptions.RedisError as exc:
                        results[i] = exc
        return results

    def _each(
        self, keys: Sequence[str], command: Callable[[str], tuple[Any, ...]]
    ) -> tuple[list[tuple[str, Any]], BaseException | None]:
        """One command per key, one pipeline per node; every node is tried.

        :returns: ``(key, result)`` for the commands that succeeded, and the
            first failure (a node that failed, or a command it refused) or ``None``.
        """
        out: list[tuple[str, Any]] = []
        first: BaseException | None = None
        for name, node, group in self._groups(keys):
            try:
                results = self._pipeline(name, node, [command(key) for key in group])
            except Exception as exc:  # noqa: BLE001 - reported after the other nodes were tried
                first = first or exc
                continue
            for key, result in zip(group, results, strict=True):
                if isinstance(result, Exception):
                    first = first or result
                else:
                    out.append((key, result))
        return out, first

    def _all(self, keys: Sequence[str], command: Callable[[str], tuple[Any, ...]]) -> list[tuple[str, Any]]:
        """:meth:`_each`, raising the first failure after every node was tried."""
        out, first = self._each(keys, command)
        if first is not None:
            raise first
        return out

    def _once_more(self, fn: Callable[..., Any], *args: Any) -> Any:
        # A pooled connection to a server that restarted can fail on first
        # use; every command here is safe to repeat.
        try:
            return fn(*args)
        except self._retry:
            return fn(*args)

    # -- KVDriver -----------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        client = self._client or self.client
        try:
            return client.get(key)  # type: ignore[no-any-return]
        except self._retry:
            return client.get(key)  # type: ignore[no-any-return]

    def get_many(self, keys: Sequence[str]) -> Mapping[str, bytes]:
        if not keys:
            return {}
        if not self.cluster:
            values = self._once_more(self.client.mget, keys)
            return {key: value for key, value in zip(keys, values, strict=True) if value is not None}
        return {key: value for key, value in self._all(keys, lambda key: ("GET", key)) if value is not None}

    @staticmethod
    def _set(key: str, value: bytes, ttl: Hashable, *flags: str) -> tuple[Any, ...]:
        if ttl == NO_EXPIRY:
            return ("SET", key, value, *flags)
        return ("SET", key, value, *flags, "PX", ttl)

    def set_many(self, items: Mapping[str, bytes], ttl: Hashable) -> None:
        results = self._all(list(items), lambda key: self._set(key, items[key], ttl))
        refused = [key for key, done in results if not done]
        if refused:
            raise StoreError(f"Redis did not store {len(refused)} of {len(items)} keys")

    def add_many(self, items: Mapping[str, bytes], ttl: Hashable) -> tuple[set[str], BaseException | None]:
        # keys on a node that failed, or that it refused (OOM), count as not stored
        results, first = self._each(list(items), lambda key: self._set(key, items[key], ttl, "NX"))
        return {key for key, done in results if done}, first

    def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        if not self.cluster:
            self._once_more(self.client.delete, *keys)
        else:
            self._all(keys, lambda key: ("DEL", key))

    def touch_many(self, keys: Sequence[str], ttl: Hashable) -> None:
        if keys:
            command = ("PERSIST",) if ttl == NO_EXPIRY else ("PEXPIRE",)
            self._all(keys, lambda key: (*command, key) if ttl == NO_EXPIRY else (*command, key, ttl))

    def keys_with_prefix(self, prefix: str) -> list[str]:
        """Every key that starts with ``prefix`` (SCAN, on every primary of a cluster).

        Not part of :class:`~stockpyle.stores.drivers.KVDriver` (memcached cannot
        list keys); :meth:`~stockpyle.collections.CachedMapping.purge` uses it when a driver has it.
        """
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
        found = self._once_more(lambda: list(self.client.scan_iter(match=pattern, count=500)))
        return [key.decode() if isinstance(key, bytes) else key for key in found]

    def gets_many(self, keys: Sequence[str]) -> Mapping[str, tuple[bytes, Any]]:
        # the token of a key is the value itself: cas compares values
        return {key: (value, value) for key, value in self.get_many(keys).items()}

    def cas(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        client = self.client
        if token is None:  # the key was absent: write only if it still is
            return bool(self._once_more(lambda: client.execute_command(*self._set(key, value, ttl, "NX"))))
        if self._use_script:
            digest = hashlib.sha1(token).hexdigest()
            try:
                return bool(self._once_more(self._run_script, client, key, digest, value, ttl))
            except self._redis.exceptions.ResponseError as exc:  # NOPERM is one too
                if not self._refuses_scripts(exc):
                    raise
        return bool(self._once_more(self._cas_watching, client, key, value, token, ttl))

    def _run_script(self, client: Any, key: str, digest: str, value: bytes, ttl: Hashable) -> Any:
        script = self._script
        if script is None:
            script = self._script = client.register_script(CAS_SCRIPT)
        return script(keys=[key], args=[digest, value, ttl])

    def _refuses_scripts(self, exc: BaseException) -> bool:
        """Whether ``exc`` says this server does not run scripts (then switch to WATCH/MULTI for good)."""
        text = str(exc).lower()
        refused = isinstance(exc, self._redis.exceptions.NoPermissionError) or "unknown command" in text
        if refused and self._use_script:
            self._use_script = False
            log.warning("stockpyle: %s refuses Lua scripts (%s); version-checked writes use WATCH/MULTI instead",
                        self.where, exc)  # fmt: skip
        return refused

    def _cas_watching(self, client: Any, key: str, value: bytes, token: bytes, ttl: Hashable) -> bool:
        """Compare-and-set with ``WATCH``/``MULTI``/``EXEC``: the transaction fails if the key changes after WATCH."""
        with client.pipeline(transaction=True) as pipe:
            pipe.watch(key)
            if pipe.get(key) != token:
                pipe.unwatch()
                return False
            pipe.multi()
            pipe.execute_command(*self._set(key, value, ttl))
            try:
                pipe.execute()
            except self._redis.exceptions.WatchError:
                return False
        return True

    def close(self) -> None:
        """Disconnect every pooled connection; the pools reconnect on their next use.

        A ``RedisCluster`` is not closed (redis-py's ``close()`` drops the
        default node, and a later redirection then fails); its node pools are
        disconnected instead, keeping the topology.
        """
        client = self._client
        if client is None:
            return
        if not self.cluster:
            client.connection_pool.disconnect()
            return
        for node in client.get_nodes():
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()
