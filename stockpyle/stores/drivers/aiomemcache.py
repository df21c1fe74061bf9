"""The asyncio memcached driver: our own small client over asyncio streams.

:class:`AsyncMemcacheDriver` is the :class:`~stockpyle.stores.drivers.AsyncKVDriver`
(and :class:`~stockpyle.stores.drivers.LeaseDriver`) twin of
:class:`~stockpyle.stores.drivers.pymemcache.PymemcacheDriver` for a fleet given
as ``servers=``; :class:`~stockpyle.stores.memcache.AsyncMemcacheStore` uses it
by default.  It speaks memcached's protocol itself, over
:func:`asyncio.open_connection` (``TCP_NODELAY``) or a unix socket, one pool of
connections per server and per event loop.

Why a client of our own
    No asyncio memcached client on the package index fits: aiomcache 0.8 has
    no socket timeouts (a frozen server hangs a call for ever), fetches
    compare-and-set tokens one key per round trip, and returns a cancelled
    call's connection to its pool with the reply unread (after a cancelled
    ``get(a)``, ``get(b)`` returned ``None``).  The protocol is small, and the
    meta half is already a sans-IO codec here
    (:mod:`~stockpyle.stores.drivers.memcache_meta`).

The same cache as the synchronous store
    Every command is the one pymemcache sends for the synchronous driver, so
    the two read and write each other's entries: ``get``/``gets`` with many
    keys per server (one round trip), ``set``/``add``/``cas``/``delete``/
    ``touch`` pipelined per server, values stored with flags ``0`` and read
    whatever their flags.  Plain reads stay on the classic ``get`` on
    purpose: a meta ``mg`` of a value marked stale takes the key's refresh
    token (memcached answers ``X W`` to the first ``mg`` of any kind), so a
    plain read would steal the refresh from the lease reader that should do
    it.  Leases are the synchronous driver's meta commands, byte for byte
    (``mg <key> v c N<ttl>``, ``ms <key> <size> T<ttl> C<cas>``, ``md <key> [I]
    C<cas>``, ``md <key> I T<ttl>``), with the same detection (an ``mn`` at the
    first lease on a server) and the same add-based fallback on servers
    without meta commands.  Several servers are placed with the synchronous
    driver's :class:`~stockpyle.stores.drivers.pymemcache.PinnedRendezvousHash`
    under the same node names, so every key lives on the same server for
    both, and the fleet carries the same placement marker
    (:data:`~stockpyle.stores.drivers.pymemcache.PLACEMENT_KEY`): a fleet
    another driver (pylibmc) marked is refused.

Event loops and pools
    Connections belong to the event loop they were opened in: the driver
    keeps one set of pools per running loop, closed by :meth:`~AsyncMemcacheDriver.close`
    in that loop or when the loop shuts down (``asyncio.run`` ends).  Each
    pool lends at most ``max_pool_size`` connections (:data:`DEFAULT_POOL_SIZE`
    when ``None``); a caller past that waits for one, up to ``timeout``
    seconds, then gets :class:`~stockpyle.exceptions.StoreUnavailableError`.

Timeouts, cancellation, failures
    Opening a connection is bounded by ``connect_timeout``, every exchange
    (the request written and its whole answer read) by ``timeout``: a frozen
    server costs a caller at most that, and the event loop never waits.  A
    connection goes back to its pool only after a complete, clean exchange;
    one interrupted in any way -- cancelled, timed out, closed by the
    server, an error line, bytes out of step -- is closed, so no reply is
    ever left unread for the next caller.  A pooled connection the server
    closed (a restart) fails on first use: the pool's idle connections are
    dropped and the call is tried once more on a new one.  A server that
    comes back is simply connected to again.  Multi-key calls ask their
    servers in parallel, try every one, then raise the first failure (keys
    are never moved to another server).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Final

from ...errors import ErrorRule, ErrorTable
from ...exceptions import ConfigurationError, StoreError, StoreUnavailableError, ValueTooLargeError
from . import LeaseRead, LeaseStatus
from .memcache_meta import (
    MetaParser,
    MetaProtocolError,
    MetaResponse,
    check_key,
    meta_delete,
    meta_get,
    meta_noop,
    meta_set,
)
from .pymemcache import (
    DEFAULT_MAX_ITEM_SIZE,
    PLACEMENT_KEY,
    PLACEMENT_SCHEME,
    PLACEMENT_TTL,
    MemcacheLease,
    PinnedRendezvousHash,
    PymemcacheDriver,
    as_lease,
    check_fill_ttl,
    check_lease_ttl,
    check_placement,
    lease_get_flags,
    lease_read,
    refresh_cut,
)

__all__ = [
    "DEFAULT_POOL_SIZE",
    "AsyncMemcacheDriver",
    "MemcacheClientError",
    "MemcacheClosedError",
    "MemcacheServerError",
    "MemcacheUnknownCommandError",
    "PoolTimeoutError",
    "node_name",
]

log = logging.getLogger("stockpyle.memcache")

#: connections per server and event loop when ``max_pool_size`` is ``None``
DEFAULT_POOL_SIZE: Final = 32

_CRLF: Final = b"\r\n"
_END: Final = b"END\r\n"
_RECV_SIZE: Final = 65536
_STORE_REPLIES: Final = frozenset({b"STORED", b"NOT_STORED", b"EXISTS", b"NOT_FOUND"})
_DELETE_REPLIES: Final = frozenset({b"DELETED", b"NOT_FOUND"})
_TOUCH_REPLIES: Final = frozenset({b"TOUCHED", b"NOT_FOUND"})
_LOST: Final = LeaseRead(LeaseStatus.LOST)


class MemcacheClosedError(ConnectionError):
    """The server closed the connection (in the middle of an answer, or before one)."""


class MemcacheServerError(Exception):
    """A ``SERVER_ERROR`` line (out of memory, an object too large)."""


class MemcacheClientError(Exception):
    """A ``CLIENT_ERROR`` line: the server refused the request."""


class MemcacheUnknownCommandError(MemcacheClientError):
    """An ``ERROR`` line: the server does not know the command (meta commands before memcached 1.6)."""


class PoolTimeoutError(TimeoutError):
    """Every connection of the pool stayed in use for ``timeout`` seconds."""


def _too_large(exc: BaseException) -> bool:
    return "too large" in str(exc).lower()


ERRORS: Final = ErrorTable(
    "memcached",
    [
        ErrorRule(
            PoolTimeoutError,
            StoreUnavailableError,
            message="every pooled connection (max_pool_size) stayed in use for the timeout",
        ),
        ErrorRule(OSError, StoreUnavailableError),  # refused, reset, closed, timed out (TimeoutError)
        ErrorRule(
            MemcacheServerError,
            ValueTooLargeError,
            when=_too_large,
            message="the server refused a value as too large",
        ),
        ErrorRule((MemcacheServerError, MemcacheClientError, MetaProtocolError), StoreError),
    ],
    retry=(MemcacheClosedError, ConnectionResetError, BrokenPipeError),
)

if sys.version_info >= (3, 11):
    _deadline = asyncio.timeout
else:  # pragma: no cover - exercised on Python 3.10 only

    class _deadline:
        """``asyncio.timeout`` for Python 3.10: cancels the task at the deadline and raises TimeoutError."""

        def __init__(self, delay: float) -> None:
            self._delay = delay
            self._handle: asyncio.TimerHandle | None = None
            self._fired = False

        def _fire(self, task: asyncio.Task[Any]) -> None:
            self._fired = True
            task.cancel()

        async def __aenter__(self) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._handle = asyncio.get_running_loop().call_later(self._delay, self._fire, task)

        async def __aexit__(
            self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
        ) -> None:
            assert self._handle is not None
            self._handle.cancel()
            if self._fired and kind is asyncio.CancelledError:
                raise TimeoutError from exc


def node_name(spec: Any) -> str:
    """The name pymemcache's ``HashClient`` gives a server spec (``"host:port"``, or a unix socket's path).

    The pinned hash places keys by these names, so they must be the same for
    the synchronous and the asyncio driver.
    """
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        return f"{spec[0]}:{spec[1]}"
    return str(spec)


def _closed(exc: BaseException | None = None) -> MemcacheClosedError:
    return MemcacheClosedError("memcached closed the connection" + (f" ({exc})" if exc else ""))


def _error_line(line: bytes) -> Exception:
    """The exception for a response line no request expects (an error line, or garbage)."""
    text = line.rstrip(b"\r\n").decode("utf-8", "replace")
    if text == "ERROR" or text.startswith("ERROR "):
        return MemcacheUnknownCommandError(text)
    if text.startswith("CLIENT_ERROR"):
        return MemcacheClientError(text[13:])
    if text.startswith("SERVER_ERROR"):
        return MemcacheServerError(text[13:])
    return MetaProtocolError(f"unexpected response line {line[:80]!r}")


def _meta_error(response: MetaResponse) -> Exception:
    if response.status == "ERROR":
        return MemcacheUnknownCommandError(response.message or "ERROR")
    if response.status == "CLIENT_ERROR":
        return MemcacheClientError(response.message)
    return MemcacheServerError(response.message)


def _expire(ttl: Hashable) -> int:
    """A lifetime from :meth:`AsyncMemcacheDriver.ttl` (or ``-1``: already expired), as memcached's exptime."""
    if type(ttl) is not int:
        raise ValueError(f"a memcached lifetime must be a whole number of seconds (from driver.ttl()); got {ttl!r}")
    return ttl


def _key(key: str) -> bytes:
    try:
        return check_key(key.encode("ascii"))
    except UnicodeEncodeError:
        raise ValueError(f"memcached keys must be ASCII; got {key!r}") from None


class _Connection:
    """One stream to one server."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, data: bytes) -> None:
        # a request is small next to the transport's buffer; a large one is
        # flushed by the read that follows (the transport writes in the background)
        self.writer.write(data)

    async def line(self) -> bytes:
        try:
            return await self.reader.readuntil(_CRLF)
        except asyncio.IncompleteReadError as exc:
            raise _closed() from exc
        except asyncio.LimitOverrunError as exc:
            raise MetaProtocolError("a response line longer than the stream's limit") from exc

    async def block(self, size: int) -> bytes:
        """A data block of ``size`` bytes and its CRLF."""
        try:
            data = await self.reader.readexactly(size + 2)
        except asyncio.IncompleteReadError as exc:
            raise _closed() from exc
        if data[-2:] != _CRLF:
            raise MetaProtocolError(f"a {size}-byte value block does not end with CRLF where its size says")
        return data[:-2]

    async def values(self, cas: bool) -> dict[str, tuple[bytes, bytes | None]]:
        """The ``VALUE`` blocks of a ``get``/``gets`` answer, up to its ``END``."""
        found: dict[str, tuple[bytes, bytes | None]] = {}
        while True:
            line = await self.line()
            if line == _END:
                return found
            parts = line.split()
            if parts[:1] != [b"VALUE"] or len(parts) != (5 if cas else 4) or not parts[3].isdigit():
                raise _error_line(line)
            found[parts[1].decode("ascii")] = (await self.block(int(parts[3])), parts[4] if cas else None)

    async def replies(self, count: int, expected: frozenset[bytes]) -> list[bytes]:
        """``count`` one-line replies, each one of ``expected`` (``STORED``, ``NOT_FOUND``, ...)."""
        out = []
        for _ in range(count):
            line = await self.line()
            reply = line[:-2]
            if reply not in expected:
                raise _error_line(line)
            out.append(reply)
        return out

    async def meta(self, count: int) -> list[MetaResponse]:
        """``count`` meta responses, through the sans-IO parser."""
        parser = MetaParser()
        out: list[MetaResponse] = []
        reader = self.reader
        while len(out) < count:
            response = parser.next_response()
            if response is None:
                chunk = await reader.read(max(_RECV_SIZE, parser.needed()))
                if not chunk:
                    raise _closed()
                parser.feed(chunk)
                continue
            if response.is_error:
                raise _meta_error(response)
            out.append(response)
        if parser.buffered():
            raise MetaProtocolError(f"{parser.buffered()} bytes arrived after the last expected response")
        return out

    def abort(self) -> None:
        self.writer.transport.abort()


class _Pool:
    """The connections of one server in one event loop: at most ``size`` lent, the idle ones kept."""

    __slots__ = ("driver", "idle", "server", "slots", "spec")

    def __init__(self, driver: AsyncMemcacheDriver, server: str, spec: Any, size: int) -> None:
        self.driver = driver
        self.server = server
        self.spec = spec
        self.idle: list[_Connection] = []
        self.slots = asyncio.Semaphore(size)

    async def _open(self) -> _Connection:
        spec = self.spec
        async with _deadline(self.driver.connect_timeout):
            if isinstance(spec, tuple):
                reader, writer = await asyncio.open_connection(spec[0], spec[1])
            else:
                reader, writer = await asyncio.open_unix_connection(spec)
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # asyncio sets it too (3.7+); memcached traffic is small request/response, never wait for Nagle
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _Connection(reader, writer)

    async def acquire(self) -> tuple[_Connection, bool]:
        """A connection and whether it was opened for this call (rather than reused)."""
        slots = self.slots
        if slots.locked():
            try:
                async with _deadline(self.driver.timeout):
                    await slots.acquire()
            except TimeoutError:
                raise PoolTimeoutError(f"no connection to {self.server} became free in time") from None
        else:
            await slots.acquire()  # returns at once
        if self.idle:
            return self.idle.pop(), False
        try:
            return await self._open(), True
        except BaseException:
            slots.release()
            raise

    def release(self, conn: _Connection) -> None:
        self.idle.append(conn)
        self.slots.release()

    def discard(self, conn: _Connection, *, idle_too: bool = False) -> None:
        """Close ``conn`` (and, after a server restart, every idle connection) instead of returning it."""
        conn.abort()
        if idle_too:
            idle, self.idle = self.idle, []
            for other in idle:
                other.abort()
        self.slots.release()

    def close(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.abort()


class _LoopState:
    """One event loop's pools."""

    __slots__ = ("closer", "placing", "pools")

    def __init__(self) -> None:
        self.pools: dict[str, _Pool] = {}
        self.placing: asyncio.Lock | None = None
        self.closer: Any = None

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()


async def _close_at_shutdown(driver: AsyncMemcacheDriver, state: _LoopState) -> AsyncGenerator[None, None]:
    """Suspended for the loop's lifetime; the loop's ``shutdown_asyncgens()`` closes its connections.

    The state is also forgotten then: its pools refer to the loop, which would
    otherwise keep the loop (the weak key) alive for as long as the driver.
    """
    try:
        yield
    finally:
        state.close()
        driver._forget(state)


Exchange = Callable[[_Connection], Awaitable[Any]]


class AsyncMemcacheDriver:
    """memcached for asyncio: a pool of asyncio streams per server and event loop, pinned rendezvous placement.

    :param servers: pymemcache server specs (``(host, port)`` tuples or unix
        socket paths; :func:`~stockpyle.stores.drivers.pymemcache.normalize_servers`
        makes them from ``"host:port"`` strings).
    :param connect_timeout: seconds to wait for a connection.
    :param timeout: seconds to wait for each exchange (and for a free pooled connection).
    :param max_pool_size: connections per server and event loop (``None``: :data:`DEFAULT_POOL_SIZE`).
    :param max_item_size: the servers' largest item (memcached ``-I``).
    :raises ConfigurationError: for no servers, a spec it cannot use, or a pool size below 1.
    """

    backend = "memcached"
    min_lifetime = PymemcacheDriver.min_lifetime
    can_add = True
    can_cas = True
    can_lease = True
    #: refreshers are elected with mg's R flag, as by the sync driver (none without meta commands)
    can_recache = True
    ttl = staticmethod(PymemcacheDriver.ttl)

    def __init__(
        self,
        servers: Sequence[Any],
        *,
        connect_timeout: float = 0.25,
        timeout: float = 0.5,
        max_pool_size: int | None = None,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
    ) -> None:
        specs = list(servers)
        if not specs:
            raise ConfigurationError("AsyncMemcacheDriver needs at least one server")
        for spec in specs:
            if not (
                (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], int))
                or isinstance(spec, str)
            ):
                raise ConfigurationError(f"a memcached server must be (host, port) or a unix socket path; got {spec!r}")
        if max_pool_size is None:
            max_pool_size = DEFAULT_POOL_SIZE
        if isinstance(max_pool_size, bool) or not isinstance(max_pool_size, int) or max_pool_size < 1:
            raise ConfigurationError(f"max_pool_size must be a positive number of connections; got {max_pool_size!r}")
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_pool_size = max_pool_size
        self.max_item_size: int | None = max_item_size
        self.errors = ERRORS
        self._retry = ERRORS.retry
        #: the servers' names (``host:port``), in the order given
        self.servers = [node_name(spec) for spec in specs]
        self._specs = dict(zip(self.servers, specs, strict=True))
        self._hasher: PinnedRendezvousHash | None = None
        # servers whose placement marker is still to be checked (fleets of two or more)
        self._unplaced: set[str] = set()
        if len(specs) > 1:
            self._hasher = PinnedRendezvousHash()
            for name in self.servers:
                self._hasher.add_node(name)
            self._unplaced = set(self.servers)
        self._single = self.servers[0] if self._hasher is None else None
        # server -> whether it speaks meta commands (absent: not asked yet)
        self._meta: dict[str, bool] = {}
        self._lock = threading.Lock()
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = weakref.WeakKeyDictionary()

    def describe(self) -> str:
        return ", ".join(self.servers)

    def __repr__(self) -> str:
        return f"<AsyncMemcacheDriver {self.describe()}>"

    # -- pools, one set per event loop ----------------------------------

    async def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            state = _LoopState()
            with self._lock:
                for other in [other for other in self._states if other.is_closed()]:
                    del self._states[other]  # a loop closed without shutting its async generators down
                self._states[loop] = state
            # a suspended async generator: asyncio.run() (any runner) finalizes it at shutdown
            closer = _close_at_shutdown(self, state)
            await closer.asend(None)
            state.closer = closer
        return state

    def _forget(self, state: _LoopState) -> None:
        with self._lock:
            for loop in [loop for loop, known in self._states.items() if known is state]:
                del self._states[loop]

    async def _pool(self, server: str) -> _Pool:
        state = await self._state()
        pool = state.pools.get(server)
        if pool is None:
            pool = state.pools[server] = _Pool(self, server, self._specs[server], self.max_pool_size)
        if self._unplaced and server in self._unplaced:
            await self._check_placement(state)
        return pool

    async def _call(self, server: str, exchange: Exchange) -> Any:
        """``exchange(connection)`` on a pooled connection of ``server``, bounded by the timeout.

        The connection returns to the pool only after a clean exchange; after
        anything else it is closed.  A reused connection the server closed
        meanwhile (a restart) drops the pool's idle connections and the call
        runs once more on a new one.
        """
        pool = await self._pool(server)
        conn, fresh = await pool.acquire()
        try:
            async with _deadline(self.timeout):
                result = await exchange(conn)
        except self._retry:
            pool.discard(conn, idle_too=True)
            if fresh:
                raise
        except BaseException:
            pool.discard(conn)
            raise
        else:
            pool.release(conn)
            return result
        return await self._on(pool, exchange)  # once more, on a new connection

    async def _check_placement(self, state: _LoopState) -> None:
        """Mark every server of the fleet with the pinned scheme, or refuse one another driver marked.

        The synchronous driver's rule (:meth:`PymemcacheDriver._check_placement`):
        all servers at once, at first use; a server that does not answer is
        checked again at its next use.
        """
        if state.placing is None:
            state.placing = asyncio.Lock()
        async with state.placing:
            marker = b"add %s 0 %d %d\r\n%s\r\nget %s\r\n" % (
                PLACEMENT_KEY.encode(),
                PLACEMENT_TTL,
                len(PLACEMENT_SCHEME),
                PLACEMENT_SCHEME,
                PLACEMENT_KEY.encode(),
            )

            async def mark(conn: _Connection) -> bytes | None:
                conn.send(marker)
                await conn.replies(1, _STORE_REPLIES)
                value = (await conn.values(False)).get(PLACEMENT_KEY)
                return None if value is None else value[0]

            for server in [s for s in self.servers if s in self._unplaced]:
                pool = state.pools.get(server)
                if pool is None:
                    pool = state.pools[server] = _Pool(self, server, self._specs[server], self.max_pool_size)
                try:
                    found = await self._on(pool, mark)
                except Exception:  # noqa: BLE001 - the operation on this server reports the failure
                    continue
                check_placement(found, PLACEMENT_SCHEME, server)
                self._unplaced.discard(server)

    async def _on(self, pool: _Pool, exchange: Exchange) -> Any:
        """One exchange on ``pool`` without the placement check (the check itself uses it)."""
        conn, _fresh = await pool.acquire()
        try:
            async with _deadline(self.timeout):
                result = await exchange(conn)
        except BaseException:
            pool.discard(conn)
            raise
        pool.release(conn)
        return result

    # -- routing ---------------------------------------------------------

    def server_for(self, key: str) -> str:
        """The server (``host:port``) that holds ``key``: the synchronous driver's pinned rendezvous choice."""
        return self._server(key)

    def _server(self, key: str) -> str:
        if self._hasher is None:
            return self._single  # type: ignore[return-value]
        return self._hasher.get_node(key)  # type: ignore[no-any-return]

    def _route(self, keys: Iterable[str]) -> dict[str, list[str]]:
        if self._hasher is None:
            return {self._single: list(keys)}  # type: ignore[dict-item]
        get_node = self._hasher.get_node
        groups: dict[str, list[str]] = {}
        for key in keys:
            groups.setdefault(get_node(key), []).append(key)
        return groups

    async def _each(
        self, keys: Iterable[str], exchange: Callable[[list[str]], Exchange]
    ) -> tuple[list[tuple[list[str], Any]], BaseException | None]:
        """``exchange(group)`` once per server, the servers in parallel; every one is tried.

        :returns: ``(group, result)`` of the servers that answered, and the first failure (or ``None``).
        """
        groups = self._route(keys)
        if len(groups) == 1:
            ((server, group),) = groups.items()
            try:
                return [(group, await self._call(server, exchange(group)))], None
            except Exception as exc:  # noqa: BLE001 - reported as with several servers
                return [], exc
        outcomes = await asyncio.gather(
            *(self._call(server, exchange(group)) for server, group in groups.items()), return_exceptions=True
        )
        out: list[tuple[list[str], Any]] = []
        first: BaseException | None = None
        for group, outcome in zip(groups.values(), outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):  # a child cancelled on its own
                    raise outcome
                first = first or outcome
            else:
                out.append((group, outcome))
        return out, first

    async def _all(self, keys: Iterable[str], exchange: Callable[[list[str]], Exchange]) -> list[tuple[list[str], Any]]:
        out, first = await self._each(keys, exchange)
        if first is not None:
            raise first
        return out

    # -- AsyncKVDriver ---------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        request = b"get " + _key(key) + _CRLF

        async def exchange(conn: _Connection) -> bytes | None:
            conn.send(request)
            found = await conn.values(False)
            value = found.get(key)
            return None if value is None else value[0]

        return await self._call(self._server(key), exchange)  # type: ignore[no-any-return]

    @staticmethod
    def _reading(cas: bool) -> Callable[[list[str]], Exchange]:
        def for_group(group: list[str]) -> Exchange:
            request = (b"gets " if cas else b"get ") + b" ".join(map(_key, group)) + _CRLF

            async def exchange(conn: _Connection) -> dict[str, tuple[bytes, bytes | None]]:
                conn.send(request)
                return await conn.values(cas)

            return exchange

        return for_group

    async def get_many(self, keys: Sequence[str]) -> Mapping[str, bytes]:
        if not keys:
            return {}
        found: dict[str, bytes] = {}
        for _group, result in await self._all(keys, self._reading(False)):
            for key, (value, _cas) in result.items():
                found[key] = value
        return found

    async def gets_many(self, keys: Sequence[str]) -> Mapping[str, tuple[bytes, Any]]:
        if not keys:
            return {}
        seen: dict[str, tuple[bytes, Any]] = {}
        for _group, result in await self._all(keys, self._reading(True)):
            seen.update(result)
        return seen

    @staticmethod
    def _storing(command: bytes, items: Mapping[str, bytes], ttl: Hashable) -> Callable[[list[str]], Exchange]:
        expire = _expire(ttl)

        def for_group(group: list[str]) -> Exchange:
            parts = []
            for key in group:
                value = items[key]
                if not isinstance(value, bytes):
                    raise TypeError(f"a memcached value must be bytes; got {type(value).__name__}")
                parts.append(b"%s %s 0 %d %d\r\n%s\r\n" % (command, _key(key), expire, len(value), value))
            request = b"".join(parts)

            async def exchange(conn: _Connection) -> list[bytes]:
                conn.send(request)
                return await conn.replies(len(group), _STORE_REPLIES)

            return exchange

        return for_group

    async def set_many(self, items: Mapping[str, bytes], ttl: Hashable) -> None:
        if not items:
            return
        results = await self._all(items, self._storing(b"set", items, ttl))
        failed = sum(1 for _group, replies in results for reply in replies if reply != b"STORED")
        if failed:
            raise StoreError(f"memcached did not store {failed} of {len(items)} keys")

    async def add_many(self, items: Mapping[str, bytes], ttl: Hashable) -> tuple[set[str], BaseException | None]:
        if not items:
            return set(), None
        results, first = await self._each(items, self._storing(b"add", items, ttl))
        stored = {
            key for group, replies in results for key, reply in zip(group, replies, strict=True) if reply == b"STORED"
        }
        return stored, first

    @staticmethod
    def _keyed(make: Callable[[bytes], bytes], expected: frozenset[bytes]) -> Callable[[list[str]], Exchange]:
        def for_group(group: list[str]) -> Exchange:
            request = b"".join(make(_key(key)) for key in group)

            async def exchange(conn: _Connection) -> list[bytes]:
                conn.send(request)
                return await conn.replies(len(group), expected)

            return exchange

        return for_group

    async def delete_many(self, keys: Sequence[str]) -> None:
        if keys:
            await self._all(keys, self._keyed(lambda key: b"delete " + key + _CRLF, _DELETE_REPLIES))

    async def touch_many(self, keys: Sequence[str], ttl: Hashable) -> None:
        if keys:
            expire = check_fill_ttl(ttl)
            await self._all(keys, self._keyed(lambda key: b"touch %s %d\r\n" % (key, expire), _TOUCH_REPLIES))

    async def _store_one(self, key: str, request: bytes) -> bytes:
        async def exchange(conn: _Connection) -> bytes:
            conn.send(request)
            return (await conn.replies(1, _STORE_REPLIES))[0]

        return await self._call(self._server(key), exchange)  # type: ignore[no-any-return]

    async def cas(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        if not isinstance(value, bytes):
            raise TypeError(f"a memcached value must be bytes; got {type(value).__name__}")
        expire = _expire(ttl)
        name = _key(key)
        if token is None:  # the key was absent: write only if it still is
            request = b"add %s 0 %d %d\r\n%s\r\n" % (name, expire, len(value), value)
        else:
            request = b"cas %s 0 %d %d %s\r\n%s\r\n" % (name, expire, len(value), self._cas_token(token), value)
        # EXISTS (changed since gets) and NOT_FOUND (gone) are both conflicts
        return await self._store_one(key, request) == b"STORED"

    @staticmethod
    def _cas_token(token: Any) -> bytes:
        if isinstance(token, int) and not isinstance(token, bool):
            token = str(token).encode("ascii")
        if not isinstance(token, bytes) or not token.isdigit():
            raise TypeError(f"expected the cas token gets_many returned; got {token!r}")
        return token

    # -- leases (LeaseDriver) --------------------------------------------

    @property
    def lease_modes(self) -> dict[str, str]:
        """How leases work on each server asked so far: ``"meta"`` or ``"add"`` (the fallback), by ``host:port``."""
        return {server: "meta" if meta else "add" for server, meta in self._meta.items()}

    def _no_meta(self, server: str, why: object) -> bool:
        with self._lock:
            known = self._meta.get(server)
            self._meta[server] = False
        if known is not False:
            log.warning(
                "stockpyle: memcached at %s does not take meta commands (%s); its leases fall back to add-based "
                "locks (no stale values: mark_stale deletes)",
                server,
                why,
            )
        return False

    async def _uses_meta(self, server: str) -> bool:
        """Whether leases on ``server`` use meta commands: asked once per server with ``mn``."""
        state = self._meta.get(server)
        if state is not None:
            return state
        try:
            await self._meta_call(server, [meta_noop()])
        except MemcacheClientError as exc:  # ERROR (no such command) or CLIENT_ERROR
            return self._no_meta(server, f"{type(exc).__name__}: {exc}")
        self._meta[server] = True
        return True

    async def _meta_call(self, server: str, requests: list[bytes]) -> list[MetaResponse]:
        data = b"".join(requests)

        async def exchange(conn: _Connection) -> list[MetaResponse]:
            conn.send(data)
            return await conn.meta(len(requests))

        return await self._call(server, exchange)  # type: ignore[no-any-return]

    async def lease_get(self, key: str, lease_ttl: Hashable, recache: Hashable | None = None) -> LeaseRead:
        ttl = check_lease_ttl(lease_ttl)
        server = self._server(key)
        if self._meta.get(server) or await self._uses_meta(server):
            mkey = _key(key)
            try:
                response = (await self._meta_call(server, [meta_get(mkey, lease_get_flags(ttl, recache))]))[0]
                read = lease_read(response)
                cut = refresh_cut(read, response, ttl)
                if cut is not None:
                    await self._meta_call(server, [meta_get(mkey, cut)])
                return read
            except MemcacheUnknownCommandError as exc:  # e.g. a proxy that knows mn but not mg
                self._no_meta(server, f"mg answered {exc}")
        # the fallback elects no refreshers: a present value is a hit until it expires
        return await self._add_lease_get(key, ttl)

    async def _gets(self, key: str) -> tuple[bytes | None, bytes | None]:
        found = (await self.gets_many([key])).get(key)
        return (None, None) if found is None else found

    async def _add_lease_get(self, key: str, ttl: int) -> LeaseRead:
        """The fallback: an empty value ``add``-ed under the key is the lease; ``gets`` gives its token."""
        value, cas = await self._gets(key)
        if value is None and await self.cas(key, b"", None, ttl):
            value, cas = await self._gets(key)
            if value == b"" and cas is not None:
                return LeaseRead(LeaseStatus.WON, token=MemcacheLease(cas))
        elif value is None:
            value, cas = await self._gets(key)  # another client added first: its stub, or already its value
        if value:
            return LeaseRead(LeaseStatus.HIT, value, False, None, cas)
        return _LOST

    async def lease_fill(self, key: str, value: bytes, token: Any, ttl: Hashable) -> bool:
        lease = as_lease(token)
        expire = check_fill_ttl(ttl)
        if not isinstance(value, bytes):
            raise TypeError(f"a memcached value must be bytes; got {type(value).__name__}")
        server = self._server(key)
        if await self._uses_meta(server):
            request = meta_set(_key(key), value, b"T%d C%s" % (expire, lease.cas))
            try:
                return (await self._meta_call(server, [request]))[0].status == "HD"
            except MemcacheUnknownCommandError as exc:
                self._no_meta(server, f"ms answered {exc}")
        return await self.cas(key, value, lease.cas, expire)

    async def lease_release(self, key: str, token: Any) -> None:
        lease = as_lease(token)
        if lease.refresh:
            return  # the value stays, told "being refreshed", until the end of the lease its lifetime was cut to
        server = self._server(key)
        if await self._uses_meta(server):
            # a stub is deleted; a stale value is kept and marked stale again, so the next reader refreshes it
            flags = b"I C%s" % lease.cas if lease.stale else b"C%s" % lease.cas
            try:
                await self._meta_call(server, [meta_delete(_key(key), flags)])
                return
            except MemcacheUnknownCommandError as exc:
                self._no_meta(server, f"md answered {exc}")
        # replace the stub, if it is still ours, by an item that has already expired
        await self.cas(key, b"", lease.cas, -1)

    async def mark_stale(self, keys: Sequence[str], ttl: Hashable) -> None:
        expire = check_lease_ttl(ttl)
        if not keys:
            return
        flags = b"I T%d" % expire
        groups = self._route(keys)
        first: BaseException | None = None
        for server, group in groups.items():
            try:
                if await self._uses_meta(server):
                    try:
                        await self._meta_call(server, [meta_delete(_key(key), flags) for key in group])
                        continue
                    except MemcacheUnknownCommandError as exc:
                        self._no_meta(server, f"md answered {exc}")
                # no stale values without meta commands
                await self._call(server, self._keyed(lambda key: b"delete " + key + _CRLF, _DELETE_REPLIES)(group))
            except Exception as exc:  # noqa: BLE001 - raised after the other servers
                first = first or exc
        if first is not None:
            raise first

    # -- lifecycle -------------------------------------------------------

    async def close(self) -> None:
        """Close the running event loop's connections; the driver reconnects on its next call.

        Connections of other event loops are closed when those loops shut down.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            state = self._states.pop(loop, None)
        if state is not None:
            if state.closer is not None:
                await state.closer.aclose()  # its finally block closes the connections
            else:
                state.close()
