"""Read-mostly mappings shared by many processes: :class:`CachedMapping` and :func:`mapping_view`.

A :class:`CachedMapping` holds a whole, small-to-medium data set (a few
thousand rows of reference data, a tree of categories, feature settings) in
every process's memory, and keeps the processes in step through a shared
backend -- Redis or memcached:

* a subclass implements :meth:`CachedMapping.load`, which builds the data
  (typically one query);
* :meth:`CachedMapping.push` calls ``load()``, publishes the result as a
  *snapshot* and bumps the collection's *revision*;
* every process checks the revision at most every ``check_interval`` seconds
  while it is being read, and swaps in the new snapshot when it changed.
  Between checks a read is a dictionary lookup plus one clock comparison;
* :func:`mapping_view` properties (derived indexes such as "children by
  parent id") are computed lazily, once per revision per process, and always
  from the revision they are served with.

How a snapshot is published: the snapshot is written under a key that names
it uniquely, and a small *pointer* key (``revision.nonce.chunks``) is then
moved to it -- on Redis both writes happen in one ``WATCH``/``MULTI``/``EXEC``
transaction; on memcached the snapshot (split into chunks below the item size
limit) is written with acknowledged writes first and the pointer is moved
with ``add``/``cas``.  A reader therefore never sees a revision without its
data, nor half of a snapshot.  The snapshot a pointer leaves behind stays
readable for ``grace`` seconds, for readers that read the old pointer a
moment ago.

Snapshots are namespaced by ``name`` and ``version`` (for example the
application's release), so two versions of the code never read each other's
data, and :meth:`CachedMapping.purge` removes one version's keys only.

Failures: when the backend cannot be reached, readers keep serving the copy
they have (the failure is logged and counted in :meth:`CachedMapping.stats`);
a snapshot that fails verification or decoding is never used (logged and
counted the same way).  :meth:`CachedMapping.push` and
:meth:`CachedMapping.purge` raise
:class:`~stockpyle.exceptions.StoreUnavailableError` instead.
"""

from __future__ import annotations

import abc
import collections.abc
import functools
import logging
import math
import os
import queue
import re
import secrets
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass, fields
from typing import Any, Final, Generic, TypeVar, overload

from .exceptions import (
    ConfigurationError,
    SerializationError,
    SignatureError,
    StockpyleError,
    StoreError,
)
from .serializers import MAGIC, Codec, HMACSigner, Serializer, Signer, fingerprint
from .stores.drivers import KVDriver

__all__ = ["CachedMapping", "CachedMappingStats", "mapping_view"]

log = logging.getLogger("stockpyle.collections")

_K = TypeVar("_K")
_V = TypeVar("_V")
_T = TypeVar("_T")

#: Default seconds between two revision checks of one process.
DEFAULT_CHECK_INTERVAL: Final = 5.0
#: Default seconds a replaced snapshot stays readable.
DEFAULT_GRACE: Final = 300.0
#: Default longest wait of a read for a revision check (seconds).
DEFAULT_CHECK_TIMEOUT: Final = 0.25
#: Seconds between looks at a revision check that outlived its reader's wait.
_INFLIGHT_RECHECK: Final = 0.1
#: Version of the snapshot payload layout.
_PAYLOAD_FORMAT: Final = 1
#: Largest memcached value written per chunk: below the default 1 MiB item
#: limit with room for the key and item header.
_MEMCACHE_CHUNK: Final = 1_000_000
#: Connection settings for clients built from a URL: fail fast, so a reader
#: falls back to its copy instead of waiting out a long retry schedule.
_CONNECT_TIMEOUT: Final = 2.0
_SOCKET_TIMEOUT: Final = 10.0

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


# -- names and pointers -------------------------------------------------------


@dataclass(frozen=True)
class _Namespace:
    """The key names of one ``(name, version)`` collection."""

    prefix: str

    @classmethod
    def of(cls, name: str, version: str) -> _Namespace:
        # The readable part helps operators; the digest keeps names that
        # sanitize alike (or contain ':'/'@') apart and bounds the length.
        digest = fingerprint(f"{len(name)}:{name}:{version}".encode("utf-8", "surrogatepass"), 10)
        readable = f"{_UNSAFE.sub('_', name)[:48]}@{_UNSAFE.sub('_', version)[:32]}"
        # {...} is a Redis hash tag: every key of a collection maps to one slot
        return cls(f"stockpyle:cm:{{{readable}:{digest}}}")

    @property
    def pointer(self) -> str:
        return f"{self.prefix}:ptr"

    def snapshot(self, nonce: str) -> str:
        return f"{self.prefix}:snap:{nonce}"

    def chunk(self, nonce: str, index: int) -> str:
        return f"{self.prefix}:snap:{nonce}:{index}"


@dataclass(frozen=True)
class _Pointer:
    """What the pointer key holds: which snapshot is current.

    Pointers are ordered by ``(epoch, revision)``: revisions count the pushes
    of one epoch, and an epoch (the millisecond the first pointer of a chain
    was published) starts when a pointer is published where none exists (the
    first push, after a purge or an eviction), so a new epoch always orders
    after the ones before it.  Readers never move back to an older pointer.
    """

    revision: int
    nonce: str
    chunks: int = 1
    epoch: int = 0

    @property
    def order(self) -> tuple[int, int]:
        return (self.epoch, self.revision)

    def dump(self) -> bytes:
        return f"{self.epoch}.{self.revision}.{self.nonce}.{self.chunks}".encode("ascii")

    def successor(self, nonce: str, chunks: int) -> _Pointer:
        return _Pointer(self.revision + 1, nonce, chunks, self.epoch)

    @classmethod
    def first(cls, nonce: str, chunks: int) -> _Pointer:
        return cls(1, nonce, chunks, time.time_ns() // 1_000_000)

    @classmethod
    def parse(cls, raw: bytes) -> _Pointer:
        """Parse a pointer's text (``epoch.revision.nonce.chunks``; 0.2 wrote ``revision.nonce.chunks``).

        :raises SerializationError: when ``raw`` is not a pointer.
        """
        try:
            parts = raw.decode("ascii").split(".")
            if len(parts) == 3:
                parts.insert(0, "0")
            epoch, revision, nonce, chunks = parts
            pointer = cls(int(revision), nonce, int(chunks), int(epoch))
        except (UnicodeDecodeError, ValueError) as exc:
            raise SerializationError(f"revision pointer {raw!r} is malformed") from exc
        if (
            pointer.revision < 1
            or pointer.chunks < 1
            or pointer.epoch < 0
            or not re.fullmatch(r"[0-9a-f]{8,64}", nonce)
        ):
            raise SerializationError(f"revision pointer {raw!r} is malformed")
        return pointer


# -- the backend -----------------------------------------------------------------


class _Backend:
    """The few operations a CachedMapping needs, over a key-value driver (memcached or Redis).

    Publishing: the snapshot's chunks are written first, then the pointer is
    moved to them with compare-and-set (an add where there is none), then the
    replaced snapshot is given ``grace`` seconds to live.  The pointer is
    sealed like an entry: signed when the mapping signs.
    """

    #: attempts at moving the pointer when other pushes keep winning the race
    publish_attempts = 50

    def __init__(self, driver: KVDriver, codec: Codec, *, owned: bool = False) -> None:
        self.driver = driver
        self.codec = codec
        #: whether the client was built here (from a URL) and is ours to close
        self.owned = owned
        self.errors = driver.errors
        limit = driver.max_item_size
        self.chunk_size = _MEMCACHE_CHUNK if limit is None else min(_MEMCACHE_CHUNK, limit - 1024)

    def __repr__(self) -> str:
        return f"{self.driver.backend} {self.driver.describe()}"

    def describe(self) -> str:
        return self.driver.describe()

    def _call(self, action: str, method: str, *args: Any) -> Any:
        return self.errors.call(self, action, getattr(self.driver, method), *args)

    # -- pointers ---------------------------------------------------------

    def _seal(self, ns: _Namespace, pointer: _Pointer) -> bytes:
        return self.codec.seal(ns.pointer, pointer.dump())

    def _open(self, ns: _Namespace, raw: Any) -> _Pointer:
        """The pointer a stored value holds.

        :raises SignatureError: when the mapping signs and the value is not
            a pointer it signed (forged, or written unsigned).
        :raises SerializationError: when the value is no pointer.
        """
        if type(raw) is not bytes:
            raise SerializationError(f"revision pointer {raw!r} is not bytes")
        if raw[:2] == MAGIC:
            return _Pointer.parse(self.codec.open(ns.pointer, raw))
        if self.codec.signed:
            raise SignatureError(f"revision pointer {raw!r} is unsigned; this mapping requires signed pointers")
        return _Pointer.parse(raw)  # written by stockpyle 0.2

    def read_pointer(self, ns: _Namespace) -> _Pointer | None:
        """The current pointer, or ``None`` when nothing is published."""
        raw = self._call("read the revision", "get", ns.pointer)
        return None if raw is None else self._open(ns, raw)

    def _open_or_none(self, ns: _Namespace, raw: Any) -> _Pointer | None:
        # a pointer nobody can read is overwritten by the next push instead of blocking it
        if raw is None:
            return None
        try:
            return self._open(ns, raw)
        except SerializationError as exc:
            log.warning("stockpyle: replacing an unusable CachedMapping revision pointer: %s", exc)
            return None

    # -- snapshots --------------------------------------------------------

    def read_snapshot(self, ns: _Namespace, pointer: _Pointer) -> bytes | None:
        """The snapshot bytes of ``pointer``, or ``None`` when they are gone."""
        keys = [ns.chunk(pointer.nonce, i) for i in range(pointer.chunks)]
        found = self._call("read a snapshot", "get_many", keys)
        if any(found.get(key) is None for key in keys):
            return None  # evicted, expired or purged: a partial snapshot is no snapshot
        return b"".join(bytes(found[key]) for key in keys)

    def publish(
        self, ns: _Namespace, nonce: str, blob: bytes, *, only_if_absent: bool, grace: float
    ) -> _Pointer | None:
        """Store ``blob`` and move the pointer to it with the next revision.

        :returns: the new pointer, or ``None`` when ``only_if_absent`` and a
            pointer already existed (nothing is left behind).
        """
        size = self.chunk_size
        parts = [blob[i : i + size] for i in range(0, len(blob), size)] or [b""]
        chunks = {ns.chunk(nonce, i): part for i, part in enumerate(parts)}
        never = self.driver.ttl(None)
        self._call("publish a snapshot", "set_many", chunks, never)
        try:
            new = self._move_pointer(ns, nonce, len(parts), only_if_absent, grace)
        except StockpyleError:
            # Not a delete: a cas that timed out may still have moved the pointer
            # to these chunks, so they stay readable for a while, then expire.
            self._retire(list(chunks), max(grace, 60.0))
            raise
        if new is None:
            self._call("publish a snapshot", "delete_many", list(chunks))
        return new

    def _move_pointer(
        self, ns: _Namespace, nonce: str, count: int, only_if_absent: bool, grace: float
    ) -> _Pointer | None:
        never = self.driver.ttl(None)
        for _attempt in range(self.publish_attempts):
            seen = self._call("publish a snapshot", "gets_many", [ns.pointer])
            raw, token = seen.get(ns.pointer, (None, None))
            if raw is not None and only_if_absent:
                return None
            old = self._open_or_none(ns, raw)
            new = _Pointer.first(nonce, count) if old is None else old.successor(nonce, count)
            if self._call("publish a snapshot", "cas", ns.pointer, self._seal(ns, new), token, never):
                if old is not None:
                    self._retire([ns.chunk(old.nonce, i) for i in range(old.chunks)], grace)
                return new
            if raw is None and only_if_absent:
                return None  # someone else published first
        raise StoreError(
            f"could not move the CachedMapping pointer {ns.pointer!r} after {self.publish_attempts} attempts: "
            "other pushes kept changing it",
            store=self,
            action="publish a snapshot",
        )

    def _retire(self, keys: list[str], grace: float) -> None:
        """Let replaced (or abandoned) snapshot chunks live ``grace`` more seconds; delete them without grace."""
        try:
            if grace > 0:
                self._call("expire a replaced snapshot", "touch_many", keys, self.driver.ttl(grace))
            else:
                self._call("delete a replaced snapshot", "delete_many", keys)
        except StockpyleError as exc:
            # the new revision is published; the old snapshot merely lingers
            log.warning("stockpyle: could not expire the replaced snapshot chunks %s: %s", keys, exc)

    def purge(self, ns: _Namespace) -> int:
        """Delete the collection's keys; return how many were deleted.

        On a backend that can list keys (Redis) that is every key of the
        collection.  memcached cannot list keys: the pointer and the snapshot
        it names are deleted, and snapshots replaced earlier expire after their
        grace period.
        """
        lister = getattr(self.driver, "keys_with_prefix", None)
        if callable(lister):  # a backend that can list keys (Redis): every snapshot goes, replaced ones too
            keys = self._call("purge a collection", "keys_with_prefix", f"{ns.prefix}:")
            if keys:
                self._call("purge a collection", "delete_many", keys)
            return len(keys)
        raw = self._call("purge a collection", "get", ns.pointer)
        if raw is None:
            return 0
        keys = [ns.pointer]
        pointer = self._open_or_none(ns, raw)
        if pointer is not None:
            keys += [ns.chunk(pointer.nonce, i) for i in range(pointer.chunks)]
        present = self._call("purge a collection", "get_many", keys)
        self._call("purge a collection", "delete_many", keys)
        return len(present)

    def close(self) -> None:
        """Close the client when it was built from a URL."""
        if self.owned:
            self.driver.close()


def _make_backend(backend: Any, codec: Codec) -> _Backend:
    """A :class:`_Backend` for a client, a store or a URL.

    :raises ConfigurationError: for anything else.
    :raises ImportError: when a URL needs a driver that is not installed.
    """
    if isinstance(backend, str):
        return _backend_from_url(backend, codec)
    module = type(backend).__module__
    if module.startswith("redis.asyncio"):
        raise ConfigurationError("CachedMapping needs a synchronous client: pass redis.Redis, not redis.asyncio.Redis")
    kv_module = sys.modules.get("stockpyle.stores.kv")  # imported if a KeyValueStore exists
    if kv_module is not None and isinstance(backend, kv_module.KeyValueStore):
        return _Backend(backend.driver, codec)
    if module.startswith("redis"):
        from .stores.drivers.redis import RedisDriver

        return _Backend(RedisDriver(backend), codec)
    if module.startswith("pymemcache") or all(callable(getattr(backend, m, None)) for m in _MEMCACHE_METHODS):
        from .stores.drivers.pymemcache import PymemcacheDriver

        driver = PymemcacheDriver(backend)
        if not driver.can_cas:
            raise ConfigurationError(f"CachedMapping needs a memcached client with gets/cas; got {backend!r}")
        return _Backend(driver, codec)
    raise ConfigurationError(
        f"CachedMapping backend must be a redis.Redis or RedisCluster client, a pymemcache client, a "
        f"MemcacheStore or RedisStore, or a URL such as 'redis://127.0.0.1:6379/0' or "
        f"'memcache://127.0.0.1:11211'; got {backend!r}"
    )


_MEMCACHE_METHODS = ("get", "get_many", "set_many", "gets_many", "cas", "add", "touch", "delete_many")


def _backend_from_url(url: str, codec: Codec) -> _Backend:
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme in ("redis", "rediss", "unix"):
        try:
            from .stores.drivers.redis import RedisDriver, build_client
        except ImportError:  # pragma: no cover - the module imports redis lazily
            raise
        try:
            client = build_client(url, cluster=False, socket_timeout=_SOCKET_TIMEOUT, connect_timeout=_CONNECT_TIMEOUT)
        except ImportError:
            raise ImportError(
                "CachedMapping with a redis:// URL requires redis: pip install stockpyle[redis]"
            ) from None
        return _Backend(RedisDriver(client), codec, owned=True)
    if scheme in ("memcache", "memcached") or not sep:
        servers = _parse_servers(rest if sep else url)
        try:
            from .stores.drivers import pymemcache as memcache_driver

            memcache_driver.import_pymemcache()
        except ImportError:
            raise ImportError(
                "CachedMapping with a memcached address requires pymemcache: pip install stockpyle[memcache]"
            ) from None
        # pinned hashing, as MemcacheStore: a returning node must not serve stale snapshots
        client = memcache_driver.build_client(
            servers, connect_timeout=_CONNECT_TIMEOUT, timeout=_SOCKET_TIMEOUT, max_pool_size=None
        )
        names = [f"{host}:{port}" for host, port in servers]
        return _Backend(memcache_driver.PymemcacheDriver(client, servers=names), codec, owned=True)
    raise ConfigurationError(
        f"unsupported CachedMapping URL {url!r}: use redis://, rediss://, unix:// or memcache://host:port"
    )


def _parse_servers(text: str) -> list[tuple[str, int]]:
    servers = []
    for item in filter(None, (part.strip() for part in text.strip("/").split(","))):
        try:
            parts = urllib.parse.urlsplit(f"//{item}")  # handles [::1]:11211
            host, port = parts.hostname, parts.port
        except ValueError:
            host = None
        if not host:
            raise ConfigurationError(f"bad memcached address {item!r}: expected host:port")
        servers.append((host, port or 11211))
    if not servers:
        raise ConfigurationError(f"no memcached server in {text!r}: expected host:port")
    return servers


# -- the mapping --------------------------------------------------------------


@dataclass
class CachedMappingStats:
    """Counters of one :class:`CachedMapping` in this process.

    :ivar checks: revision checks made against the backend.
    :ivar swaps: snapshots fetched from the backend and swapped in.
    :ivar loads: calls of :meth:`CachedMapping.load`.
    :ivar pushes: snapshots published by this process.
    :ivar views: :func:`mapping_view` values computed.
    :ivar errors: backend failures absorbed by readers (the copy was kept).
    :ivar corrupt: snapshots or pointers refused as undecodable or unverified.
    :ivar missing: published snapshots that were no longer in the backend.
    :ivar timeouts: revision checks that outlived ``check_timeout`` (readers
        kept their copy and did not wait longer).
    :ivar rollbacks: published pointers refused because they named a revision
        older than one this process had seen (a replayed pointer).
    """

    checks: int = 0
    swaps: int = 0
    loads: int = 0
    pushes: int = 0
    views: int = 0
    errors: int = 0
    corrupt: int = 0
    missing: int = 0
    timeouts: int = 0
    rollbacks: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def reset(self) -> None:
        """Set every counter back to zero."""
        for f in fields(self):
            setattr(self, f.name, 0)


class _Job:
    """One revision check handed to a :class:`_Checker`."""

    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _Checker:
    """A daemon thread that runs a mapping's revision checks, so no read waits on the backend for long.

    It belongs to the process that started it: after a fork, the child starts its own.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._jobs: queue.SimpleQueue[tuple[_Job, Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="stockpyle-cachedmapping-check", daemon=True).start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> _Job:
        job = _Job()
        self._jobs.put((job, fn, args))
        return job

    def stop(self) -> None:
        self._jobs.put(None)

    def _serve(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, fn, args = item
            try:
                job.result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the reader that waits for it
                job.error = exc
            finally:
                job.done.set()


class _State:
    """One revision as held in this process; never mutated after creation (but for its views)."""

    __slots__ = ("data", "lock", "pointer", "views")

    def __init__(self, data: dict[Any, Any], pointer: _Pointer | None) -> None:
        self.data = data
        self.pointer = pointer
        self.views: dict[mapping_view[Any], Any] = {}
        # re-entrant: a view may read another view of the same revision
        self.lock = threading.RLock()


class CachedMapping(collections.abc.Mapping[_K, _V], Generic[_K, _V]):
    """A read-only mapping loaded once, shared through Redis or memcached, refreshed by revision.

    Subclass it, implement :meth:`load`, and optionally add
    :func:`mapping_view` properties::

        class Countries(CachedMapping[str, Country]):
            def load(self):
                return {c.code: c for c in query_all_countries()}

        countries = Countries(redis.Redis(), "countries", APP_VERSION)
        countries.push()          # after the data changed, or at deploy time
        countries["NO"].name      # in every process

    Reading: the first access in a process fetches the published snapshot
    (it does not call ``load()``).  Afterwards the process checks the
    revision when ``check_interval`` seconds have passed since its last check
    and swaps in a newer snapshot; reads in between touch nothing but memory.
    When nothing has been published yet, the first access calls ``load()``
    and, with ``publish_missing=True`` (the default), publishes the result as
    revision 1 unless another process did so first.  When the backend is
    unreachable or its snapshot is unusable, the process keeps its copy (or,
    having none yet, calls ``load()`` itself and serves that).

    The mapping is safe to read from many threads: a revision check runs in
    one thread at a time while the others keep reading the current copy.

    :param backend: a ``redis.Redis`` client, a pymemcache client (create it
        with ``default_noreply=False``; stockpyle asks for replies anyway), a
        :class:`~stockpyle.stores.memcache.MemcacheStore` (its client is
        used), or a URL: ``redis://host:6379/0`` (needs ``stockpyle[redis]``)
        or ``memcache://host:11211[,host2:11211]`` (needs ``stockpyle[memcache]``).
    :param name: the collection's name, shared by every process that reads it.
    :param version: the code or data-format version (e.g. the release); two
        versions never read each other's snapshots.
    :param check_interval: seconds between two revision checks of a process
        (0 checks on every access).
    :param check_timeout: the longest a read waits for a revision check
        (default 0.25 s), whatever the client's own timeouts: checks run on a
        thread of the mapping's, and a read that would wait longer serves the
        current copy (or, having none, calls ``load()``) and lets the check
        finish in the background.
    :param grace: seconds a replaced snapshot stays readable for readers
        that are just switching to it (0 deletes it at once).
    :param serializer: a :mod:`stockpyle.serializers` serializer; default
        :class:`~stockpyle.serializers.PickleSerializer`.
    :param secret: a secret (or keyring mapping) for an
        :class:`~stockpyle.serializers.HMACSigner`: snapshots are signed, and
        unsigned or forged snapshots are refused before anything is unpickled.
    :param signer: a signer object, instead of ``secret``.
    :param publish_missing: publish the first ``load()`` when nothing is published.
    :raises ConfigurationError: for bad arguments or an unknown backend.
    :raises ImportError: when a URL needs a driver that is not installed.
    """

    def __init__(
        self,
        backend: Any,
        name: str,
        version: str | int,
        *,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        check_timeout: float = DEFAULT_CHECK_TIMEOUT,
        grace: float = DEFAULT_GRACE,
        serializer: Serializer | None = None,
        secret: bytes | str | Mapping[int, bytes | str] | None = None,
        signer: Signer | None = None,
        publish_missing: bool = True,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(f"CachedMapping name must be a non-empty string; got {name!r}")
        if isinstance(version, bool) or not isinstance(version, (str, int)) or version == "":
            raise ConfigurationError(f"CachedMapping version must be a non-empty string or an int; got {version!r}")
        if isinstance(check_timeout, bool) or not isinstance(check_timeout, (int, float)) or not check_timeout > 0:
            raise ConfigurationError(
                f"CachedMapping check_timeout must be a positive number of seconds; got {check_timeout!r}"
            )
        for label, value in (("check_interval", check_interval), ("grace", grace)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigurationError(f"CachedMapping {label} must be a number of seconds >= 0; got {value!r}")
        if secret is not None and signer is not None:
            raise ConfigurationError("pass either secret= or signer=, not both")
        if secret is not None:
            signer = HMACSigner(secret)
        self._codec = Codec(serializer=serializer, signer=signer)
        self._backend = _make_backend(backend, self._codec)
        self.name = name
        self.version = str(version)
        self.check_interval = float(check_interval)
        self.check_timeout = float(check_timeout)
        self.grace = float(grace)
        self.publish_missing = publish_missing
        self._ns = _Namespace.of(name, self.version)
        self._stats = CachedMappingStats()
        self._lock = threading.Lock()
        self._current: _State | None = None
        self._next_check = -math.inf
        # the newest (epoch, revision) this process served: it never moves back behind it
        self._newest: tuple[int, int] = (-1, -1)
        self._checker: _Checker | None = None
        self._job: _Job | None = None

    # -- what subclasses provide --------------------------------------------

    @abc.abstractmethod
    def load(self) -> Mapping[_K, _V]:
        """Build the data from the source of truth (e.g. one database query).

        Called by :meth:`push`, and by a process that finds no usable
        snapshot.  Must return a mapping; its keys and values must be
        serializable by the configured serializer.
        """

    # -- the read path (hot) ------------------------------------------------

    def _state(self) -> _State:
        state = self._current
        if state is not None and time.monotonic() < self._next_check:
            return state
        return self._refresh(force=False)

    # The three lookups inline _state(): they are the hot path, and a call costs
    # about as much as the lookup itself.

    def __getitem__(self, key: _K) -> _V:
        state = self._current
        if state is None or time.monotonic() >= self._next_check:
            state = self._refresh(force=False)
        return state.data[key]  # type: ignore[no-any-return]

    def get(self, key: _K, default: Any = None) -> Any:
        """The value for ``key``, or ``default``."""
        state = self._current
        if state is None or time.monotonic() >= self._next_check:
            state = self._refresh(force=False)
        return state.data.get(key, default)

    def __contains__(self, key: object) -> bool:
        state = self._current
        if state is None or time.monotonic() >= self._next_check:
            state = self._refresh(force=False)
        return key in state.data

    def __iter__(self) -> Iterator[_K]:
        # a snapshot's dict is never mutated, so this iterator survives swaps
        return iter(self._state().data)

    def __len__(self) -> int:
        return len(self._state().data)

    def keys(self) -> KeysView[_K]:
        return self._state().data.keys()

    def values(self) -> ValuesView[_V]:
        return self._state().data.values()

    def items(self) -> ItemsView[_K, _V]:
        return self._state().data.items()

    def __repr__(self) -> str:
        state = self._current
        held = "not loaded" if state is None else f"revision {self._revision_of(state)}, {len(state.data)} items"
        return f"<{type(self).__name__} {self.name!r} version {self.version!r} ({held}) on {self._backend!r}>"

    # -- revision checks ----------------------------------------------------

    @staticmethod
    def _revision_of(state: _State) -> int | None:
        return None if state.pointer is None else state.pointer.revision

    @property
    def revision(self) -> int | None:
        """The revision this process serves: ``None`` before the first access or for a local, unpublished load."""
        state = self._current
        return None if state is None else self._revision_of(state)

    def refresh(self) -> bool:
        """Check the revision now instead of waiting for ``check_interval``.

        :returns: True when a different revision was swapped in (or loaded).
        """
        before = self._current
        return self._refresh(force=True) is not before

    def _refresh(self, *, force: bool) -> _State:
        current = self._current
        # Only one thread checks; others keep reading the copy they have.  A
        # process without a copy yet waits for the first one.
        if not self._lock.acquire(blocking=current is None or force):
            return current  # type: ignore[return-value]
        try:
            current = self._current
            if current is not None and not force and time.monotonic() < self._next_check:
                return current  # another thread checked while we waited
            state, delay = self._bounded_check(current)
            state = self._adopt(state)
            self._next_check = time.monotonic() + delay
            return state
        finally:
            self._lock.release()

    def _adopt(self, state: _State) -> _State:
        """Serve ``state`` unless it is older than the current one (a check that started before a push)."""
        current = self._current
        if state is not current and state.pointer is not None:
            if current is not None and current.pointer is not None and state.pointer.order < current.pointer.order:
                return current
            self._newest = max(self._newest, state.pointer.order)
        self._current = state
        return state

    def _bounded_check(self, current: _State | None) -> tuple[_State, float]:
        """Check the revision on the checker thread, waiting at most ``check_timeout``.

        :returns: the state to serve and the seconds until the next check.
        """
        job = self._job
        checker = self._checker
        if checker is None or checker.pid != os.getpid():  # first use, or a forked child
            checker = self._checker = _Checker()
            job = None
        fresh = job is None
        if job is None:
            job = self._job = checker.submit(self._check, current)
        # a new check may take check_timeout; one still running from before is not waited for
        if not job.done.wait(self.check_timeout if fresh else 0):
            if fresh:
                self._stats.timeouts += 1
                log.warning(
                    "stockpyle: CachedMapping %r (version %r): the revision check takes longer than %.2fs; %s",
                    self.name,
                    self.version,
                    self.check_timeout,
                    "serving the current copy" if current is not None else "loading locally",
                )
            if current is not None:
                return current, min(self.check_interval, _INFLIGHT_RECHECK)
            state, _recheck = self._load_local(publish=False)
            return state, min(self.check_interval, _INFLIGHT_RECHECK)
        self._job = None
        if job.error is not None:
            raise job.error
        state, recheck = job.result
        return state, 0.0 if recheck else self.check_interval

    def _check(self, current: _State | None) -> tuple[_State, bool]:
        """Compare the published revision with ours; return the state to serve and whether to recheck at once."""
        self._stats.checks += 1
        doing = "serving its current copy" if current is not None else "loading locally"
        try:
            pointer = self._backend.read_pointer(self._ns)
            if pointer is not None and pointer.order < self._newest:
                self._stats.rollbacks += 1
                log.error(
                    "stockpyle: CachedMapping %r (version %r) refused a published revision older than one it "
                    "served (%s < %s): a replayed pointer; %s",
                    self.name,
                    self.version,
                    pointer.order,
                    self._newest,
                    doing,
                )
                pointer = None if current is None else current.pointer
            if pointer is not None and (current is None or current.pointer != pointer):
                state = self._fetch(pointer)
                if state is not None:
                    self._stats.swaps += 1
                    return state, False
                self._stats.missing += 1
                log.warning(
                    "stockpyle: CachedMapping %r (version %r) revision %d has no snapshot in the backend "
                    "(evicted, expired or purged); %s; push() publishes a new one",
                    self.name,
                    self.version,
                    pointer.revision,
                    doing,
                )
            elif current is not None:
                return current, False  # unchanged, or nothing published (never, or purged)
            elif pointer is None:
                return self._load_local(publish=self.publish_missing)
        except StoreError as exc:
            self._stats.errors += 1
            log.warning(
                "stockpyle: CachedMapping %r (version %r) cannot reach its backend; %s: %s",
                self.name,
                self.version,
                doing,
                exc,
            )
        except SerializationError as exc:
            self._stats.corrupt += 1
            log.error(
                "stockpyle: CachedMapping %r (version %r) refused a published snapshot; %s: %s",
                self.name,
                self.version,
                doing,
                exc,
            )
        if current is not None:
            return current, False
        return self._load_local(publish=False)

    def _fetch(self, pointer: _Pointer) -> _State | None:
        blob = self._backend.read_snapshot(self._ns, pointer)
        if blob is None:
            return None
        key = self._ns.snapshot(pointer.nonce)
        payload = self._codec.decode(key, blob)
        # The nonce inside the payload ties it to the pointer even when unsigned.
        if not (
            isinstance(payload, dict)
            and payload.get("format") == _PAYLOAD_FORMAT
            and payload.get("nonce") == pointer.nonce
            and isinstance(payload.get("data"), dict)
        ):
            raise SerializationError(f"snapshot {key!r} does not hold a CachedMapping payload for its revision")
        return _State(payload["data"], pointer)

    def _load(self) -> dict[Any, Any]:
        self._stats.loads += 1
        data = self.load()
        if not isinstance(data, Mapping):
            raise TypeError(f"{type(self).__qualname__}.load() must return a mapping; got {type(data).__qualname__}")
        # a private copy: nobody else can change the snapshot under the readers
        return dict(data)

    def _load_local(self, *, publish: bool) -> tuple[_State, bool]:
        data = self._load()
        if not publish:
            return _State(data, None), False
        try:
            pointer = self._publish(data, only_if_absent=True)
        except (StoreError, SerializationError) as exc:
            self._stats.errors += 1
            log.warning("stockpyle: CachedMapping %r could not publish its first load: %s", self.name, exc)
            return _State(data, None), False
        if pointer is None:
            # another process published first: adopt its snapshot at the next access
            return _State(data, None), True
        return _State(data, pointer), False

    # -- writing --------------------------------------------------------------

    def _publish(self, data: dict[Any, Any], *, only_if_absent: bool) -> _Pointer | None:
        nonce = secrets.token_hex(8)
        blob = self._codec.encode(self._ns.snapshot(nonce), {"format": _PAYLOAD_FORMAT, "nonce": nonce, "data": data})
        pointer = self._backend.publish(self._ns, nonce, blob, only_if_absent=only_if_absent, grace=self.grace)
        if pointer is not None:
            self._stats.pushes += 1
        return pointer

    def push(self) -> int:
        """Call :meth:`load`, publish the result and bump the revision.

        Every process swaps the new snapshot in within ``check_interval``
        seconds of its next access; this process serves it at once.  When
        several processes push at the same moment, revisions still increase
        one by one and the last to commit is current.

        :returns: the new revision number.
        :raises StoreUnavailableError: when the backend cannot be reached.
        :raises StoreError: when the backend refused the snapshot.
        :raises SerializationError: when the data cannot be serialized.
        """
        data = self._load()
        pointer = self._publish(data, only_if_absent=False)
        if pointer is None:  # pragma: no cover - only_if_absent=False always publishes
            raise StoreError(f"CachedMapping {self.name!r}: the backend did not publish the snapshot")
        state = _State(data, pointer)
        with self._lock:
            self._adopt(state)
            self._next_check = time.monotonic() + self.check_interval
        return pointer.revision

    def purge(self) -> int:
        """Delete this ``name`` and ``version``'s snapshots and revision from the backend.

        Other versions are untouched.  Processes still running this version
        keep serving their copy (and ``load()`` afresh when they start).  On
        memcached, which cannot list keys, snapshots replaced less than
        ``grace`` seconds ago are left to expire.

        :returns: the number of keys deleted.
        :raises StoreUnavailableError: when the backend cannot be reached.
        """
        return self._backend.purge(self._ns)

    def snapshot(self) -> CachedMapping[_K, _V]:
        """A copy of this mapping pinned to the current revision: it never swaps.

        Use it for several reads that must agree with each other, e.g. a
        value and a view computed from the same data.
        """
        return self._pinned(self._state())

    def _pinned(self, state: _State) -> CachedMapping[_K, _V]:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone._current = state
        clone._next_check = math.inf  # never checks again
        return clone

    def stats(self) -> CachedMappingStats:
        """The live counters of this mapping in this process."""
        return self._stats

    def close(self) -> None:
        """Stop this mapping's revision-check thread and close the backend client if it was built from a URL.

        Reads keep serving the current copy; the next check starts a new thread.
        """
        checker, self._checker, self._job = self._checker, None, None
        if checker is not None:
            checker.stop()
        self._backend.close()


class mapping_view(Generic[_T]):
    """Decorate a :class:`CachedMapping` method as a lazily computed, per-revision property.

    The method runs at most once per revision in each process, the first
    time the property is read after a swap, and sees the revision it is
    computed for: inside it, ``self`` reads that revision even if another
    one is swapped in meanwhile.  The value is shared by all threads; treat
    it as read-only.

    :param func: the method computing the view from ``self``.
    """

    def __init__(self, func: Callable[[Any], _T]) -> None:
        self.func = func
        self.name = func.__name__
        functools.update_wrapper(self, func)  # type: ignore[arg-type]

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> mapping_view[_T]: ...

    @overload
    def __get__(self, instance: object, owner: type | None = None) -> _T: ...

    def __get__(self, instance: object | None, owner: type | None = None) -> _T | mapping_view[_T]:
        if instance is None:
            return self
        if not isinstance(instance, CachedMapping):
            raise TypeError(f"@mapping_view {self.name!r} works on CachedMapping subclasses only")
        state = instance._state()
        try:
            return state.views[self]  # type: ignore[no-any-return]
        except KeyError:
            pass
        with state.lock:
            if self not in state.views:
                state.views[self] = self.func(instance._pinned(state))
                instance._stats.views += 1
            return state.views[self]  # type: ignore[no-any-return]

    def __set__(self, instance: object, value: Any) -> None:
        raise AttributeError(f"mapping view {self.name!r} is read-only; it is computed from the mapping")

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other
