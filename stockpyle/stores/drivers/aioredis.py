"""The asyncio Redis driver on ``redis.asyncio``: one Redis server, or a Redis Cluster.

:class:`AsyncRedisDriver` is the :class:`~stockpyle.stores.drivers.AsyncKVDriver`
twin of :class:`~stockpyle.stores.drivers.redis.RedisDriver` and keeps every
rule of it: the same commands and round trips (``MGET``, ``DEL`` with many
keys, a non-transactional pipeline per node on a cluster, primaries only), the
same Lua scripts for compare-and-set and leases, the same lease and stale
marks under the entry's own key, the same lifetimes in milliseconds and the
same error table.  The scripts, marks and pure helpers are imported from
:mod:`stockpyle.stores.drivers.redis`, so a synchronous and an asyncio store on
one server read and write each other's entries and leases.

Event loops
    An asyncio client belongs to the event loop it first runs on (its
    connections and locks do).  A driver built with ``connect=`` (what
    :class:`~stockpyle.stores.redis.AsyncRedisStore` does for ``url=``) therefore
    keeps one client, and so one connection pool, per running event loop; a
    loop's client is closed by :meth:`~AsyncRedisDriver.close` run in that
    loop, or when the loop shuts down (``asyncio.run`` ends: the driver
    registers an async generator that the loop finalizes).  A driver given a
    ready ``client=`` uses it in the first loop that calls it and raises
    :class:`~stockpyle.exceptions.ConfigurationError` when another loop calls
    it: pass a URL to share a store between loops.

Cancellation
    A call cancelled while it waits for the server leaves no half-read
    connection in the pool: redis-py disconnects a connection whose command
    was interrupted, and the pool reconnects it on its next use.  On a
    cluster the per-node requests of one batch run as child tasks of the
    call; cancelling the call cancels them too.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import math
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Hashable, Mapping, Sequence
from typing import Any, Final

from ...exceptions import ConfigurationError, StoreError
from . import LeaseRead
from .redis import (
    CAS_SCRIPT,
    DEFAULT_MAX_ITEM_SIZE,
    FILL_SCRIPT,
    MARK_STALE_SCRIPT,
    NO_EXPIRY,
    RELEASE_SCRIPT,
    TAKE_SCRIPT,
    check_client,
    check_fill,
    client_where,
    error_table,
    import_redis,
    lease_holder,
    lease_read,
    lease_taken,
    new_holder,
    no_retry,
    positive_ms,
    refuses_scripts,
    set_command,
    visible,
)

__all__ = ["INSTALL_HINT", "AsyncRedisDriver", "build_client", "import_aioredis"]

INSTALL_HINT: Final = 'AsyncRedisStore requires redis-py 5.0.1 or later: pip install "stockpyle[redis-asyncio]"'

log = logging.getLogger("stockpyle.redis")

_WHEREVER_USED = "a client passed with client= belongs to the event loop it was first used in"


def import_aioredis() -> Any:
    """Import redis-py with ``redis.asyncio``, or raise an ImportError that names the extra to install."""
    try:
        import_redis()
        import redis.asyncio
        import redis.asyncio.cluster
        import redis.asyncio.retry
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    if not hasattr(redis.asyncio.Redis, "aclose"):  # before 5.0.1, which also disconnects on cancellation
        raise ImportError(f"{INSTALL_HINT} (redis-py {redis.__version__} is installed)")
    return redis


def build_client(url: str, *, cluster: bool, socket_timeout: float, connect_timeout: float) -> Any:
    """A ``redis.asyncio.Redis`` (pooled) or, for ``cluster``, a ``redis.asyncio.cluster.RedisCluster``.

    Neither connects here (an asyncio ``RedisCluster`` reads the topology on
    its first command), and neither retries: the driver retries a dropped
    pooled connection once itself.  Options in the URL's query string win
    (redis-py's rule).
    """
    redis = import_aioredis()
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": no_retry(redis.asyncio.retry.Retry, redis),
    }
    if cluster:
        return redis.asyncio.cluster.RedisCluster.from_url(url, **options)
    return redis.asyncio.Redis.from_url(url, **options)


class _LoopClient:
    """One event loop's client and the scripts registered on it."""

    __slots__ = ("client", "closer", "owned", "scripts")

    def __init__(self, client: Any, owned: bool) -> None:
        self.client = client
        #: whether the driver made the client (and closes it) or was given it
        self.owned = owned
        self.scripts: dict[str, Any] = {}
        self.closer: Any = None


async def _close(client: Any, cluster: bool) -> None:
    """Close ``client``'s connections (it reconnects if used again)."""
    await client.aclose()
    if cluster:
        # RedisCluster.aclose() does nothing while the client is marked for
        # reinitialization, which redis-py does after any connection error:
        # the connections its nodes still hold are closed here
        nodes = {node.name: node for node in client.nodes_manager.startup_nodes.values()}
        nodes.update((node.name, node) for node in client.get_nodes())
        for node in nodes.values():
            try:
                await node.disconnect()
            except Exception as exc:  # noqa: BLE001 - closing the rest matters more
                log.debug("stockpyle: closing a Redis Cluster node's connections failed: %r", exc)


async def _close_at_shutdown(entry: _LoopClient, cluster: bool) -> AsyncGenerator[None, None]:
    """Suspended for the loop's lifetime; the loop's ``shutdown_asyncgens()`` closes the client."""
    try:
        yield
    finally:
        await _close(entry.client, cluster)


class AsyncRedisDriver:
    """Redis through ``redis.asyncio`` clients: standalone or ``RedisCluster``, one client per event loop.

    :param client: a ready ``redis.asyncio.Redis`` or
        ``redis.asyncio.cluster.RedisCluster``, used in one event loop; or
        ``None`` with ``connect``.
    :param connect: makes a new client (without connecting); called once per
        event loop that uses the driver.
    :param cluster: whether ``connect`` makes cluster clients.
    :param where: where the data lives, for messages (default: from the client).
    :param max_item_size: the largest value the server accepts (``proto-max-bulk-len``).
    :raises ConfigurationError: for a client the driver cannot use (not a
        ``redis.asyncio`` client, ``decode_responses=True``, reading from replicas).
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
        self._redis = redis = import_aioredis()
        if (client is None) == (connect is None):
            raise ConfigurationError("AsyncRedisDriver needs exactly one of client= and connect=")
        if client is not None:
            cluster = check_client(
                client,
                redis.asyncio.Redis,
                redis.asyncio.cluster.RedisCluster,
                store="AsyncRedisStore",
                wanted="redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster",
                wrong_kind="a synchronous client: AsyncRedisStore needs one from redis.asyncio",
            )
            where = where or client_where(client, cluster)
        self.cluster = cluster
        self.where = where or "Redis"
        self.max_item_size: int | None = max_item_size
        self.errors = error_table()
        self._retry = self.errors.retry
        errors = redis.exceptions
        self._lost = (errors.ConnectionError, errors.TimeoutError)
        self._refusals = errors.ResponseError
        self._connect = connect
        self._given = None if client is None else _LoopClient(client, owned=False)
        self._given_loop: weakref.ReferenceType[asyncio.AbstractEventLoop] | None = None
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopClient] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()  # the clients of loops running in different threads
        self._use_script = True
        self._refresh_options: dict[str, Any] = {}
        if cluster:
            initialize = redis.asyncio.cluster.NodesManager.initialize
            if "last_failed_node_name" in inspect.signature(initialize).parameters:
                self._refresh_options = {"last_failed_node_name": None}

    def describe(self) -> str:
        return self.where

    def __repr__(self) -> str:
        return f"<AsyncRedisDriver {'cluster ' if self.cluster else ''}{self.where}>"

    @staticmethod
    def ttl(seconds: float | None) -> int:
        """Milliseconds, rounded up (never 0, which means no expiry); ``None``: :data:`NO_EXPIRY`."""
        if seconds is None:
            return NO_EXPIRY
        return max(1, math.ceil(round(seconds * 1000, 6)))

    # -- one client per event loop ------------------------------------------

    async def _entry(self) -> _LoopClient:
        loop = asyncio.get_running_loop()
        given = self._given
        if given is not None:
            first = self._given_loop
            if first is None:
                self._given_loop = weakref.ref(loop)
            elif first() is not loop:
                raise ConfigurationError(
                    f"AsyncRedisStore: {_WHEREVER_USED}; it cannot be used in another one "
                    "(pass url= instead: the store then keeps a connection pool per event loop)"
                )
            return given
        entry = self._clients.get(loop)
        if entry is None:
            entry = await self._open(loop)
        return entry

    async def _open(self, loop: asyncio.AbstractEventLoop) -> _LoopClient:
        assert self._connect is not None
        entry = _LoopClient(self._connect(), owned=True)
        with self._lock:
            for other in [other for other in self._clients if other.is_closed()]:
                # a loop closed without shutting its async generators down: its client cannot be closed any more
                del self._clients[other]
            self._clients[loop] = entry
        # a suspended async generator: asyncio.run() (any runner) finalizes it at
        # shutdown, and its finally block closes this loop's connections in time
        closer = _close_at_shutdown(entry, self.cluster)
        await closer.asend(None)
        entry.closer = closer
        return entry

    async def client(self) -> Any:
        """The client the running event loop uses (created for it on first use)."""
        return (await self._entry()).client

    # -- routing and retries ----------------------------------------------

    async def _again(self, fn: Callable[..., Any], *args: Any) -> Any:
        # A pooled connection to a server that restarted (or one dropped by a
        # cancelled call) can fail on first use; every command here is safe to repeat.
        try:
            return await fn(*args)
        except self._retry:
            return await fn(*args)

    async def _refresh(self, client: Any, failed: str | None) -> None:
        """Have redis-py re-read the cluster's topology after a node failed (a failover moves slots)."""
        options = dict(self._refresh_options)
        if options:
            options["last_failed_node_name"] = failed
        try:
            await client.nodes_manager.initialize(**options)
        except Exception as exc:  # noqa: BLE001 - the node's own failure is what gets reported
            log.debug("stockpyle: Redis Cluster topology refresh failed: %r", exc)

    async def _send(self, client: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        """``commands`` in one round trip (to one node of a cluster); failed commands give their exception."""
        if len(commands) == 1:  # one command: a pipeline would only add redis-py's own cost
            try:
                return [await client.execute_command(*commands[0])]
            except self._refusals as exc:
                return [exc]
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        # a cluster pipeline follows MOVED/ASK redirections of single commands itself
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def _group(self, client: Any, name: str | None, commands: list[tuple[Any, ...]]) -> list[Any]:
        try:
            results: list[Any] = await self._again(self._send, client, commands)
        except self._lost:
            if self.cluster:
                await self._refresh(client, name)
            raise
        return results

    async def _each(
        self, keys: Sequence[str], command: Callable[[str], tuple[Any, ...]]
    ) -> tuple[list[tuple[str, Any]], BaseException | None]:
        """One command per key, one round trip per node (the nodes in parallel); every node is tried.

        :returns: ``(key, result)`` for the commands that succeeded, and the
            first failure (a node that failed, or a command it refused) or ``None``.
        """
        client = (await self._entry()).client
        if not self.cluster:
            groups: list[tuple[str | None, list[str]]] = [(None, list(keys))]
        else:
            await client.initialize()  # the slot table (a no-op once read)
            by_node: dict[str, list[str]] = {}
            node_for = client.get_node_from_key
            for key in keys:
                by_node.setdefault(node_for(key).name, []).append(key)
            groups = list(by_node.items())
        if len(groups) == 1:
            name, group = groups[0]
            outcomes: list[Any] = []
            try:
                outcomes.append(await self._group(client, name, [command(key) for key in group]))
            except Exception as exc:  # noqa: BLE001 - reported below, as with several nodes
                outcomes.append(exc)
        else:
            # the nodes answer in parallel; cancelling this call cancels them all
            outcomes = await asyncio.gather(
                *(self._group(client, name, [command(key) for key in group]) for name, group in groups),
                return_exceptions=True,
            )
        out: list[tuple[str, Any]] = []
        first: BaseException | None = None
        for (_name, group), results in zip(groups, outcomes, strict=True):
            if isinstance(results, BaseException):
                if not isinstance(results, Exception):  # a child task was cancelled on its own
                    raise results
                first = first or results
                continue
            for key, result in zip(group, results, strict=True):
                if isinstance(result, Exception):
                    first = first or result
                else:
                    out.append((key, result))
        return out, first

    async def _all(self, keys: Sequence[str], command: Callable[[str], tuple[Any, ...]]) -> list[tuple[str, Any]]:
        """:meth:`_each`, raising the first failure after every node was tried."""
        out, first = await self._each(keys, command)
        if first is not None:
            raise first
        return out

    # -- AsyncKVDriver -------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        client = (await self._entry()).client
        data: bytes | None = await self._again(client.get, key)
        if data is not None and data[:1] == b"\x00":
            return visible(data)
        return data

    async def _get_raw(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        if not self.cluster:
            client = (await self._entry()).client
            values = await self._again(client.mget, keys)
            return {key: value for key, value in zip(keys, values, strict=True) if value is not None}
        return {key: value for key, value in await self._all(keys, lambda key: ("GET", key)) if value is not None}

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, bytes]:
        found = await self._get_raw(keys)
        for key, value in found.items():
            if value[:1] == b"\x00":
                found[key] = visible(value)
        return found

    async def set_many(self, items: Mapping[str, bytes], ttl: Hashable) -> None:
        results = await self._all(list(items), lambda key: set_command(key, items[key], ttl))
        refused = [key for key, done in results if not done]
        if refused:
            raise StoreError(f"Redis did not store {len(refused)} of {len(items)} keys")

    async def add_many(self, items: Mapping[str, bytes], ttl: Hashable) -> tuple[set[str], BaseException | None]:
        # keys on a node that failed, or that it refused (OOM), count as not stored
        results, first = await self._each(list(items), lambda key: set_command(key, items[key], ttl, "NX"))
        return {key for key, done in results if done}, first

    async def delete_many(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        if not self.cluster:
            client = (await self._entry()).client
            await self._again(client.delete, *keys)
        else:
            await self._all(keys, lambda key: ("DEL", key))

    async def touch_many(self, keys: Sequence[str], ttl: Hashable) -> None:
        if keys:
            if ttl == NO_EXPIRY:
                await self._all(keys, lambda key: ("PERSIST", key))
            else:
                await self._all(keys, lambda key: ("PEXPIRE", key, ttl))

    async def gets_many(self, keys: Sequence[str]) -> Mapping[str, tuple[bytes, Any]]:
        # the token of a key is the value itself as stored (a lease or stale value included): cas compares values
        return {key: (visible(value), value) for key, value in (await self._get_raw(keys)).items()}

    async def cas(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        entry = await self._entry()
        client = entry.client
        if token is None:  # the key was absent: write only if it still is
            return bool(await self._again(client.execute_command, *set_command(key, value, ttl, "NX")))
        if self._use_script:
            digest = hashlib.sha1(token).hexdigest()
            try:
                return bool(await self._run(entry, CAS_SCRIPT, key, digest, value, ttl))
            except self._redis.exceptions.ResponseError as exc:  # NOPERM is one too
                if not refuses_scripts(self._redis, exc):
                    raise
                if self._use_script:
                    self._use_script = False
                    log.warning("stockpyle: %s refuses Lua scripts (%s); version-checked writes use WATCH/MULTI "
                                "instead", self.where, exc)  # fmt: skip
        return bool(await self._again(self._cas_watching, client, key, value, token, ttl))

    async def _cas_watching(self, client: Any, key: str, value: bytes, token: bytes, ttl: Hashable) -> bool:
        """Compare-and-set with ``WATCH``/``MULTI``/``EXEC``: the transaction fails if the key changes after WATCH."""
        async with client.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            if await pipe.get(key) != token:
                await pipe.unwatch()
                return False
            pipe.multi()
            pipe.execute_command(*set_command(key, value, ttl))
            try:
                await pipe.execute()
            except self._redis.exceptions.WatchError:
                return False
        return True

    # -- leases (LeaseDriver) -----------------------------------------------

    async def _run(self, entry: _LoopClient, source: str, key: str, *args: Any) -> Any:
        """Run the script ``source`` on ``key`` (EVALSHA, loading it when the server lacks it)."""
        script = entry.scripts.get(source)
        if script is None:
            script = entry.scripts[source] = entry.client.register_script(source)
        return await self._again(lambda: script(keys=[key], args=list(args)))

    async def lease_get(self, key: str, lease_ttl: Hashable, recache: Hashable | None = None) -> LeaseRead:
        ttl = positive_ms(lease_ttl, "lease lifetime")
        entry = await self._entry()
        if recache is not None:
            holder = new_holder()
            threshold = positive_ms(recache, "recache threshold")
            return lease_taken(await self._run(entry, TAKE_SCRIPT, key, holder, ttl, threshold), holder)
        # the hit path is one GET; only a miss or a stale value runs the script
        data = await self._again(entry.client.get, key)
        if data is not None:
            read = lease_read(data)
            if read is not None:
                return read
        holder = new_holder()
        return lease_taken(await self._run(entry, TAKE_SCRIPT, key, holder, ttl), holder)

    async def lease_fill(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        holder = lease_holder(token)
        check_fill(value, ttl)
        return bool(await self._run(await self._entry(), FILL_SCRIPT, key, holder, value, ttl))

    async def lease_release(self, key: str, token: Any) -> None:
        await self._run(await self._entry(), RELEASE_SCRIPT, key, lease_holder(token))

    async def mark_stale(self, keys: Sequence[str], ttl: Hashable) -> None:
        ms = positive_ms(ttl, "stale lifetime")
        if keys:
            # EVAL with the source: a pipeline per node needs no NOSCRIPT handling, and this path is rare
            await self._all(keys, lambda key: ("EVAL", MARK_STALE_SCRIPT, 1, key, ms))

    # -- lifecycle ----------------------------------------------------------

    async def close(self) -> None:
        """Close the running event loop's connections; the driver reconnects on its next call.

        A client made by the driver is closed and dropped (the next call in
        this loop makes a new one).  A client passed in stays open for reuse:
        a standalone client's pool is disconnected, a ``RedisCluster`` is
        closed, which redis-py reinitializes on its next command.  Clients of
        other event loops are closed when those loops shut down.
        """
        loop = asyncio.get_running_loop()
        given = self._given
        if given is not None:
            first = self._given_loop
            if first is not None and first() is not loop:
                return  # never touch a client from a loop it does not belong to
            if self.cluster:
                await _close(given.client, cluster=True)
            else:
                await given.client.connection_pool.disconnect()
            return
        with self._lock:
            entry = self._clients.pop(loop, None)
        if entry is not None and entry.closer is not None:
            await entry.closer.aclose()  # its finally block closes the client
