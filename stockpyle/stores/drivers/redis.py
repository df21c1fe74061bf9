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

Leases (:class:`~stockpyle.stores.drivers.LeaseDriver`) live under the
entry's own key, as memcached's do: a lease is the value ``\\x00SPL`` +
a 16-character holder id, written with ``SET key ... NX PX <lease>``, so it
needs no second key (on a cluster it is in the entry's slot by
construction) and every writer's ``SET``, ``DEL``, tombstone or
compare-and-set of the key replaces it without knowing about leases.  The
fill is a Lua script that writes only while the key still holds that
holder's lease: the write in between makes it fail.  ``mark_stale`` (a
script) rewrites a value as ``\\x00SPS`` + holder (none yet) + the old
value with a new lifetime; the next ``lease_get`` claims it and refreshes.
``lease_get(..., recache=ms)`` runs the take script on every read: a value
whose remaining lifetime (``PTTL``) is below ``ms`` is rewritten as
``\\x00SPR`` + holder + the value, its lifetime cut to the lease, and that
caller refreshes it; the others read the value as it is.
The plain reads hide both forms: a lease reads as ``b""`` (absent, as a
memcached stub does), a stale value as the old value.  Values starting with
``\\x00SPL``, ``\\x00SPS`` or ``\\x00SPR`` are therefore reserved; stockpyle's own
envelopes start with ``SP``.  Leases need ``EVAL``; ``KEEPTTL`` needs Redis 6.

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
import secrets
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

from ...errors import ErrorRule, ErrorTable
from ...exceptions import ConfigurationError, StoreError, StoreUnavailableError, ValueTooLargeError
from . import LeaseRead, LeaseStatus

__all__ = [
    "CAS_SCRIPT",
    "DEFAULT_MAX_ITEM_SIZE",
    "FILL_SCRIPT",
    "INSTALL_HINT",
    "LEASE_MARK",
    "MARK_STALE_SCRIPT",
    "NO_EXPIRY",
    "REFRESH_MARK",
    "RELEASE_SCRIPT",
    "RedisDriver",
    "RedisLease",
    "STALE_MARK",
    "TAKE_SCRIPT",
    "build_client",
    "check_client",
    "check_fill",
    "client_where",
    "error_table",
    "import_redis",
    "lease_holder",
    "lease_read",
    "lease_taken",
    "new_holder",
    "no_retry",
    "positive_ms",
    "refuses_scripts",
    "set_command",
    "visible",
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


#: The value of a key under a lease starts with this, then the 16-byte holder id.
LEASE_MARK: Final = b"\x00SPL"
#: A stale value starts with this, then the holder id of its refresher (or
#: :data:`_NO_HOLDER`), then the old value.
STALE_MARK: Final = b"\x00SPS"
#: A value being refreshed (``lease_get(..., recache=...)``) starts with this,
#: then the holder id of its refresher, then the value, which stays current.
REFRESH_MARK: Final = b"\x00SPR"
_HOLDER_SIZE: Final = 16
_HEAD: Final = len(LEASE_MARK) + _HOLDER_SIZE
_NO_HOLDER: Final = b"-" * _HOLDER_SIZE
_LOST: Final = LeaseRead(LeaseStatus.LOST)

# In the scripts, '\0SPL' and '\0SPS' are LEASE_MARK and STALE_MARK (Lua's \0 is a NUL byte);
# a head is the mark and a holder: 20 bytes.

#: ``KEYS[1]``: the key; ``ARGV``: a new holder id, the lease's lifetime in
#: milliseconds, and optionally the recache threshold in milliseconds.  An
#: absent key gets a lease for the holder (``{1}``); a stale value nobody
#: refreshes yet gets the holder as its refresher (``{1, value}``); a plain
#: value whose remaining lifetime is below the threshold gets the holder as
#: its refresher and a lifetime cut to the lease (``{2, value}``); otherwise
#: ``{0, value}`` (the value may be a lease).
TAKE_SCRIPT: Final = r"""
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], '\0SPL' .. ARGV[1], 'PX', ARGV[2])
  return {1}
end
if string.sub(v, 1, 20) == '\0SPS----------------' then
  redis.call('SET', KEYS[1], '\0SPS' .. ARGV[1] .. string.sub(v, 21), 'KEEPTTL')
  return {1, v}
end
local mark = string.sub(v, 1, 4)
if ARGV[3] and mark ~= '\0SPL' and mark ~= '\0SPS' and mark ~= '\0SPR' then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 and ttl < tonumber(ARGV[3]) then
    local keep = math.min(ttl, tonumber(ARGV[2]))
    redis.call('SET', KEYS[1], '\0SPR' .. ARGV[1] .. v, 'PX', keep)
    return {2, v}
  end
end
return {0, v}
"""

#: ``KEYS[1]``: the key; ``ARGV``: the holder id, the value, its lifetime in
#: milliseconds (0: none).  Writes only while the key holds that holder's
#: lease or stale value.
FILL_SCRIPT: Final = r"""
local v = redis.call('GET', KEYS[1])
if not v then
  return 0
end
local head = string.sub(v, 1, 20)
if head ~= '\0SPL' .. ARGV[1] and head ~= '\0SPS' .. ARGV[1] and head ~= '\0SPR' .. ARGV[1] then
  return 0
end
if ARGV[3] == '0' then
  redis.call('SET', KEYS[1], ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""

#: ``KEYS[1]``: the key; ``ARGV[1]``: the holder id.  Deletes the holder's
#: lease, or makes its stale value refreshable by the next reader again, or
#: gives a value it was refreshing back (keeping the lifetime cut to the lease).
RELEASE_SCRIPT: Final = r"""
local v = redis.call('GET', KEYS[1])
if not v then
  return 0
end
if v == '\0SPL' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
if string.sub(v, 1, 20) == '\0SPS' .. ARGV[1] then
  redis.call('SET', KEYS[1], '\0SPS----------------' .. string.sub(v, 21), 'KEEPTTL')
  return 1
end
if string.sub(v, 1, 20) == '\0SPR' .. ARGV[1] then
  redis.call('SET', KEYS[1], string.sub(v, 21), 'KEEPTTL')
  return 1
end
return 0
"""

#: ``KEYS[1]``: the key; ``ARGV[1]``: how long the stale value lives, in
#: milliseconds.  A lease being held is deleted (its fill fails, the next
#: reader takes a new one); a value becomes stale without a refresher.
MARK_STALE_SCRIPT: Final = r"""
local v = redis.call('GET', KEYS[1])
if not v then
  return 0
end
local mark = string.sub(v, 1, 4)
if mark == '\0SPL' then
  redis.call('DEL', KEYS[1])
  return 1
end
if mark == '\0SPS' or mark == '\0SPR' then
  v = string.sub(v, 21)
end
redis.call('SET', KEYS[1], '\0SPS----------------' .. v, 'PX', ARGV[1])
return 1
"""


class RedisLease(NamedTuple):
    """The token of a Redis lease (opaque to callers: pass it back to the driver).

    :ivar holder: the 16-character holder id written into the key.
    :ivar stale: the lease was won on a stale value.
    """

    holder: bytes
    stale: bool = False
    #: the lease was won on a present value (``recache``)
    refresh: bool = False


# -- the pure rules shared with the asyncio driver (stockpyle.stores.drivers.aioredis) --


def visible(data: bytes) -> bytes:
    """What a plain read returns for a stored value: a lease reads as ``b""``, a stale value as the old value."""
    mark = data[:4]
    if mark == LEASE_MARK:
        return b""
    if mark in (STALE_MARK, REFRESH_MARK):
        return data[_HEAD:]
    return data


def positive_ms(ttl: Any, what: str) -> int:
    """``ttl`` checked to be a positive number of milliseconds (a lease or stale lifetime)."""
    if type(ttl) is not int or ttl < 1:
        raise ValueError(f"a Redis {what} must be a positive number of milliseconds (from driver.ttl()); got {ttl!r}")
    return ttl


def set_command(key: str, value: bytes, ttl: Hashable, *flags: str) -> tuple[Any, ...]:
    """The ``SET`` of ``value`` for ``ttl`` milliseconds (:data:`NO_EXPIRY`: none), with ``flags`` (``NX``)."""
    if ttl == NO_EXPIRY:
        return ("SET", key, value, *flags)
    return ("SET", key, value, *flags, "PX", ttl)


def new_holder() -> bytes:
    """A fresh lease holder id (16 ASCII characters)."""
    return secrets.token_hex(_HOLDER_SIZE // 2).encode("ascii")


def lease_read(data: bytes) -> LeaseRead | None:
    """A stored value as a lease read; ``None`` when the caller should try to take the lease (:data:`TAKE_SCRIPT`)."""
    if data[:1] != b"\x00":
        return LeaseRead(LeaseStatus.HIT, data, False, None, data)
    mark = data[:4]
    if mark == LEASE_MARK:
        return _LOST
    if mark == STALE_MARK:
        if data[4:_HEAD] == _NO_HOLDER:
            return None
        return LeaseRead(LeaseStatus.LOST, data[_HEAD:], True, None, data)
    if mark == REFRESH_MARK:  # another caller refreshes it: the value is served meanwhile
        return LeaseRead(LeaseStatus.HIT, data[_HEAD:], False, None, data)
    return LeaseRead(LeaseStatus.HIT, data, False, None, data)


def lease_taken(answer: Sequence[Any], holder: bytes) -> LeaseRead:
    """The lease read for :data:`TAKE_SCRIPT`'s ``answer`` to ``holder``."""
    won = int(answer[0])
    if won == 2:  # the refresh of a present value
        value = bytes(answer[1])
        return LeaseRead(LeaseStatus.WON, value, False, RedisLease(holder, False, True), REFRESH_MARK + holder + value)
    if won == 1:
        if len(answer) == 1:
            return LeaseRead(LeaseStatus.WON, token=RedisLease(holder))
        old = bytes(answer[1])[_HEAD:]
        # the token of a stale value for cas is the value as it is stored now
        raw = STALE_MARK + holder + old
        return LeaseRead(LeaseStatus.WON, old, True, RedisLease(holder, True), raw)
    return lease_read(bytes(answer[1])) or _LOST


def lease_holder(token: Any) -> bytes:
    """The holder id of a :class:`RedisLease` token (``TypeError`` for anything else)."""
    if not isinstance(token, RedisLease):
        raise TypeError(f"expected the RedisLease token lease_get returned; got {type(token).__name__}")
    return token.holder


def check_fill(value: Any, ttl: Any) -> None:
    """Refuse a lease fill's arguments that the script would misread."""
    if type(ttl) is not int or ttl < 0:
        raise ValueError(f"a Redis lifetime must be a number of milliseconds (from driver.ttl()); got {ttl!r}")
    if not isinstance(value, bytes):
        raise TypeError(f"a Redis value must be bytes; got {type(value).__name__}")


def refuses_scripts(redis: Any, exc: BaseException) -> bool:
    """Whether the server error ``exc`` says scripts are refused here (ACL ``NOPERM`` or a renamed ``EVALSHA``)."""
    return isinstance(exc, redis.exceptions.NoPermissionError) or "unknown command" in str(exc).lower()


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


def no_retry(retry_class: Any, redis: Any) -> Any:
    """A ``retry_class`` (redis-py's sync or asyncio ``Retry``) that never retries.

    redis-py 6+ retries ten times with back-off by default: a frozen server
    would hold a request for seconds.  The drivers retry once themselves.
    """
    return retry_class(redis.backoff.NoBackoff(), 0)


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
        "retry": no_retry(redis.retry.Retry, redis),
    }
    if cluster:
        return redis.cluster.RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def check_client(
    client: Any, redis_class: type, cluster_class: type, *, store: str, wanted: str, wrong_kind: str
) -> bool:
    """Whether ``client`` is a cluster client; raises ConfigurationError for one the store cannot use.

    :param redis_class: the standalone client class the store takes
        (``redis.Redis`` or ``redis.asyncio.Redis``).
    :param cluster_class: the cluster client class it takes.
    :param store: the store's name, for messages.
    :param wanted: the client classes' names, for messages.
    :param wrong_kind: the hint for a redis-py client of the other kind
        (synchronous for an asyncio store and vice versa).
    """
    cluster = isinstance(client, cluster_class)
    if not cluster and not isinstance(client, redis_class):
        hint = f" ({wrong_kind})" if type(client).__module__.startswith("redis.") else ""
        raise ConfigurationError(f"{store}(client=...) needs a {wanted} client{hint}; got {type(client).__name__}")
    if client.get_encoder().decode_responses:
        raise ConfigurationError(
            f"{store}(client=...) needs a client that returns bytes: create it without decode_responses=True"
        )
    if cluster and (client.read_from_replicas or getattr(client, "load_balancing_strategy", None) is not None):
        raise ConfigurationError(
            f"{store} reads from primaries only (a replica may lag behind the writes that add-only back-fills "
            "must see): create the RedisCluster without read_from_replicas or load_balancing_strategy"
        )
    if not cluster and getattr(client.connection_pool, "is_master", True) is False:
        raise ConfigurationError(
            f"{store} reads from primaries only: pass Sentinel.master_for(...), not slave_for(...)"
        )
    return cluster


def client_where(client: Any, cluster: bool) -> str:
    """Where ``client`` (sync or asyncio) sends its commands, for messages."""
    if cluster:
        nodes = getattr(client, "startup_nodes", None)
        if nodes is None:  # redis.asyncio's RedisCluster keeps them in its nodes manager
            nodes = client.nodes_manager.startup_nodes.values()
        return ", ".join(node.name for node in nodes) or "RedisCluster"
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
    can_lease = True
    can_recache = True

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
            cluster = check_client(
                client,
                self._redis.Redis,
                self._redis.cluster.RedisCluster,
                store="RedisStore",
                wanted="redis.Redis or redis.cluster.RedisCluster",
                wrong_kind="a synchronous client, not redis.asyncio",
            )
            where = where or client_where(client, cluster)
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
        self._lease_scripts: dict[str, Any] = {}
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
            data: bytes | None = client.get(key)
        except self._retry:
            data = client.get(key)
        if data is not None and data[:1] == b"\x00":
            return visible(data)
        return data

    def _get_raw(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        if not self.cluster:
            values = self._once_more(self.client.mget, keys)
            return {key: value for key, value in zip(keys, values, strict=True) if value is not None}
        return {key: value for key, value in self._all(keys, lambda key: ("GET", key)) if value is not None}

    def get_many(self, keys: Sequence[str]) -> Mapping[str, bytes]:
        if not keys:
            return {}
        pairs: Iterable[tuple[str, Any]]
        if not self.cluster:
            pairs = zip(keys, self._once_more(self.client.mget, keys), strict=True)
        else:
            pairs = self._all(keys, lambda key: ("GET", key))
        # _get_raw's answer with stubs and marks read as visible() does, in the same pass
        return {key: value if value[:1] != b"\x00" else visible(value) for key, value in pairs if value is not None}

    def set_many(self, items: Mapping[str, bytes], ttl: Hashable) -> None:
        if len(items) == 1 and not self.cluster:
            # one key on one server: a plain SET, without building a pipeline
            ((key, value),) = items.items()
            client = self._client or self.client
            if not self._once_more(client.execute_command, *set_command(key, value, ttl)):
                raise StoreError("Redis did not store 1 of 1 keys")
            return
        results = self._all(list(items), lambda key: set_command(key, items[key], ttl))
        refused = [key for key, done in results if not done]
        if refused:
            raise StoreError(f"Redis did not store {len(refused)} of {len(items)} keys")

    def add_many(self, items: Mapping[str, bytes], ttl: Hashable) -> tuple[set[str], BaseException | None]:
        # keys on a node that failed, or that it refused (OOM), count as not stored
        results, first = self._each(list(items), lambda key: set_command(key, items[key], ttl, "NX"))
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
        # the token of a key is the value itself as stored (a lease or stale
        # value included): cas compares values
        return {key: (visible(value), value) for key, value in self._get_raw(keys).items()}

    def cas(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        client = self.client
        if token is None:  # the key was absent: write only if it still is
            return bool(self._once_more(lambda: client.execute_command(*set_command(key, value, ttl, "NX"))))
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
        refused = refuses_scripts(self._redis, exc)
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
            pipe.execute_command(*set_command(key, value, ttl))
            try:
                pipe.execute()
            except self._redis.exceptions.WatchError:
                return False
        return True

    # -- leases (LeaseDriver) -----------------------------------------------

    def _lease_script(self, source: str) -> Any:
        script = self._lease_scripts.get(source)
        if script is None:
            script = self._lease_scripts[source] = self.client.register_script(source)
        return script

    def _run(self, source: str, key: str, *args: Any) -> Any:
        script = self._lease_script(source)
        return self._once_more(lambda: script(keys=[key], args=list(args)))

    def lease_get(self, key: str, lease_ttl: Hashable, recache: Hashable | None = None) -> LeaseRead:
        ttl = positive_ms(lease_ttl, "lease lifetime")
        if recache is not None:
            # the remaining lifetime decides: one script reads it with the value
            holder = new_holder()
            answer = self._run(TAKE_SCRIPT, key, holder, ttl, positive_ms(recache, "recache threshold"))
            return lease_taken(answer, holder)
        # the hit path is one GET; only a miss or a stale value runs the script
        client = self._client or self.client
        data = self._once_more(client.get, key)
        if data is not None:
            read = lease_read(data)
            if read is not None:
                return read
        holder = new_holder()
        return lease_taken(self._run(TAKE_SCRIPT, key, holder, ttl), holder)

    def lease_fill(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        holder = lease_holder(token)
        check_fill(value, ttl)
        return bool(self._run(FILL_SCRIPT, key, holder, value, ttl))

    def lease_release(self, key: str, token: Any) -> None:
        self._run(RELEASE_SCRIPT, key, lease_holder(token))

    def mark_stale(self, keys: Sequence[str], ttl: Hashable) -> None:
        ms = positive_ms(ttl, "stale lifetime")
        if keys:
            # EVAL with the source: a pipeline per node needs no NOSCRIPT handling, and this path is rare
            self._all(keys, lambda key: ("EVAL", MARK_STALE_SCRIPT, 1, key, ms))

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
