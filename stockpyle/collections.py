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
import re
import secrets
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, ItemsView, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass, fields
from typing import Any, Final, Generic, NoReturn, TypeVar, overload

from .exceptions import (
    ConfigurationError,
    SerializationError,
    StoreError,
    StoreUnavailableError,
    ValueTooLargeError,
)
from .lifetimes import memcache_expire
from .serializers import Codec, HMACSigner, Serializer, Signer, fingerprint

__all__ = ["CachedMapping", "CachedMappingStats", "mapping_view"]

log = logging.getLogger("stockpyle.collections")

_K = TypeVar("_K")
_V = TypeVar("_V")
_T = TypeVar("_T")

#: Default seconds between two revision checks of one process.
DEFAULT_CHECK_INTERVAL: Final = 5.0
#: Default seconds a replaced snapshot stays readable.
DEFAULT_GRACE: Final = 300.0
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
    """What the pointer key holds: which snapshot is current."""

    revision: int
    nonce: str
    chunks: int = 1

    def dump(self) -> bytes:
        return f"{self.revision}.{self.nonce}.{self.chunks}".encode("ascii")

    @classmethod
    def parse(cls, raw: Any) -> _Pointer:
        """Parse a stored pointer.

        :raises SerializationError: when ``raw`` is not a pointer.
        """
        try:
            text = raw.decode("ascii") if isinstance(raw, bytes) else str(raw)
            revision, nonce, chunks = text.split(".")
            pointer = cls(int(revision), nonce, int(chunks))
        except (UnicodeDecodeError, ValueError) as exc:
            raise SerializationError(f"revision pointer {raw!r} is malformed") from exc
        if pointer.revision < 1 or pointer.chunks < 1 or not re.fullmatch(r"[0-9a-f]{8,64}", nonce):
            raise SerializationError(f"revision pointer {raw!r} is malformed")
        return pointer


# -- backends -----------------------------------------------------------------


class _Backend(abc.ABC):
    """The few operations a CachedMapping needs from a shared store."""

    client: Any
    #: whether the client was built here (from a URL) and is ours to close
    owned = False

    @abc.abstractmethod
    def read_pointer(self, ns: _Namespace) -> _Pointer | None:
        """The current pointer, or ``None`` when nothing is published."""

    @abc.abstractmethod
    def read_snapshot(self, ns: _Namespace, pointer: _Pointer) -> bytes | None:
        """The snapshot bytes of ``pointer``, or ``None`` when they are gone."""

    @abc.abstractmethod
    def publish(
        self, ns: _Namespace, nonce: str, blob: bytes, *, only_if_absent: bool, grace: float
    ) -> _Pointer | None:
        """Store ``blob`` and move the pointer to it with the next revision.

        :returns: the new pointer, or ``None`` when ``only_if_absent`` and a
            pointer already existed (nothing is left behind).
        """

    @abc.abstractmethod
    def purge(self, ns: _Namespace) -> int:
        """Delete the collection's keys; return how many were deleted."""

    def close(self) -> None:
        """Close the client when it was built from a URL."""
        if self.owned:
            self.client.close()


class _RedisBackend(_Backend):
    #: optimistic-transaction attempts when other pushes keep moving the pointer
    publish_attempts = 50

    def __init__(self, client: Any, *, owned: bool = False) -> None:
        import redis.exceptions

        self.client = client
        self.owned = owned
        self._errors = redis.exceptions

    def __repr__(self) -> str:
        return f"redis {self.client!r}"

    def _fail(self, action: str, exc: BaseException) -> NoReturn:
        errors = self._errors
        if isinstance(exc, (errors.ConnectionError, errors.TimeoutError, OSError)):
            raise StoreUnavailableError(f"Redis unavailable while trying to {action}: {_describe(exc)}") from exc
        raise StoreError(f"Redis failed to {action}: {_describe(exc)}") from exc

    def read_pointer(self, ns: _Namespace) -> _Pointer | None:
        try:
            raw = self.client.get(ns.pointer)
        except (self._errors.RedisError, OSError) as exc:
            self._fail("read the revision", exc)
        return None if raw is None else _Pointer.parse(raw)

    def read_snapshot(self, ns: _Namespace, pointer: _Pointer) -> bytes | None:
        try:
            raw = self.client.get(ns.snapshot(pointer.nonce))
        except (self._errors.RedisError, OSError) as exc:
            self._fail("read a snapshot", exc)
        return None if raw is None else bytes(raw)

    def publish(
        self, ns: _Namespace, nonce: str, blob: bytes, *, only_if_absent: bool, grace: float
    ) -> _Pointer | None:
        errors = self._errors
        try:
            with self.client.pipeline() as pipe:
                for _attempt in range(self.publish_attempts):
                    try:
                        # optimistic transaction: EXEC fails if the pointer moved meanwhile
                        pipe.watch(ns.pointer)
                        raw = pipe.get(ns.pointer)
                        if raw is not None and only_if_absent:
                            pipe.unwatch()
                            return None
                        old = _parse_or_none(raw)
                        new = _Pointer((old.revision if old else 0) + 1, nonce)
                        pipe.multi()
                        pipe.set(ns.snapshot(nonce), blob)
                        pipe.set(ns.pointer, new.dump())
                        if old is not None:
                            _retire_redis(pipe, ns.snapshot(old.nonce), grace)
                        pipe.execute()
                        return new
                    except errors.WatchError:
                        continue
        except (errors.RedisError, OSError) as exc:
            self._fail("publish a snapshot", exc)
        raise StoreError(
            f"could not move the CachedMapping pointer {ns.pointer!r} after {self.publish_attempts} attempts: "
            "other pushes kept changing it"
        )

    def purge(self, ns: _Namespace) -> int:
        deleted = 0
        try:
            batch: list[Any] = []
            # The prefix holds only [A-Za-z0-9_.@:{}-]: nothing Redis's glob treats specially.
            for key in self.client.scan_iter(match=f"{ns.prefix}:*", count=500):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(self.client.delete(*batch))
                    batch.clear()
            if batch:
                deleted += int(self.client.delete(*batch))
        except (self._errors.RedisError, OSError) as exc:
            self._fail("purge a collection", exc)
        return deleted


def _retire_redis(pipe: Any, key: str, grace: float) -> None:
    if grace > 0:
        pipe.expire(key, max(1, math.ceil(grace)))
    else:
        pipe.delete(key)


def _parse_or_none(raw: Any) -> _Pointer | None:
    # A pointer nobody can parse is overwritten by the next push instead of blocking it.
    if raw is None:
        return None
    try:
        return _Pointer.parse(raw)
    except SerializationError:
        log.warning("stockpyle: replacing a malformed CachedMapping revision pointer %r", raw)
        return None


class _MemcacheBackend(_Backend):
    """memcached through a pymemcache client (``Client``, ``PooledClient``, ``HashClient``)."""

    #: attempts at moving the pointer when other pushes keep winning the race
    publish_attempts = 20

    def __init__(self, client: Any, *, owned: bool = False, chunk_size: int = _MEMCACHE_CHUNK) -> None:
        self.client = client
        self.owned = owned
        self.chunk_size = chunk_size

    def __repr__(self) -> str:
        return f"memcached {self.client!r}"

    def _fail(self, action: str, exc: BaseException) -> NoReturn:
        from pymemcache.exceptions import MemcacheServerError, MemcacheUnexpectedCloseError

        if isinstance(exc, (OSError, MemcacheUnexpectedCloseError)):
            raise StoreUnavailableError(f"memcached unavailable while trying to {action}: {_describe(exc)}") from exc
        if isinstance(exc, MemcacheServerError) and "too large" in str(exc).lower():
            raise ValueTooLargeError(
                f"memcached refused a snapshot chunk as too large while trying to {action}: {exc}"
            ) from exc
        raise StoreError(f"memcached failed to {action}: {_describe(exc)}") from exc

    def _errors(self) -> tuple[type[BaseException], ...]:
        from pymemcache.exceptions import MemcacheError

        return (MemcacheError, OSError)

    def read_pointer(self, ns: _Namespace) -> _Pointer | None:
        try:
            raw = self.client.get(ns.pointer)
        except self._errors() as exc:
            self._fail("read the revision", exc)
        return None if raw is None else _Pointer.parse(raw)

    def read_snapshot(self, ns: _Namespace, pointer: _Pointer) -> bytes | None:
        keys = [ns.chunk(pointer.nonce, i) for i in range(pointer.chunks)]
        try:
            found = self.client.get_many(keys)
        except self._errors() as exc:
            self._fail("read a snapshot", exc)
        if any(found.get(key) is None for key in keys):
            return None  # evicted, expired or purged: a partial snapshot is no snapshot
        return b"".join(bytes(found[key]) for key in keys)

    def publish(
        self, ns: _Namespace, nonce: str, blob: bytes, *, only_if_absent: bool, grace: float
    ) -> _Pointer | None:
        try:
            return self._publish(ns, nonce, blob, only_if_absent, grace)
        except StoreUnavailableError as exc:
            # A pooled connection to a restarted server fails once, then the
            # pool reconnects: retry that case, once; a refused one is final.
            if not isinstance(exc.__cause__, _stale_connection_errors()):
                raise
            return self._publish(ns, nonce, blob, only_if_absent, grace)

    def _publish(self, ns: _Namespace, nonce: str, blob: bytes, only_if_absent: bool, grace: float) -> _Pointer | None:
        client = self.client
        size = self.chunk_size
        parts = [blob[i : i + size] for i in range(0, len(blob), size)] or [b""]
        chunks = {ns.chunk(nonce, i): part for i, part in enumerate(parts)}
        try:
            # acknowledged writes: under noreply a refused value would look stored
            failed = client.set_many(chunks, expire=0, noreply=False)
            if failed:
                raise StoreError(f"memcached did not store snapshot chunks {failed!r}")
            new = self._move_pointer(ns, nonce, len(parts), only_if_absent, grace)
            if new is None:
                client.delete_many(list(chunks), noreply=False)
                return None
            return new
        except StoreError:
            self._abandon(chunks, grace)
            raise
        except self._errors() as exc:
            self._abandon(chunks, grace)
            self._fail("publish a snapshot", exc)

    def _move_pointer(
        self, ns: _Namespace, nonce: str, count: int, only_if_absent: bool, grace: float
    ) -> _Pointer | None:
        client = self.client
        for _attempt in range(self.publish_attempts):
            raw, cas_token = client.gets(ns.pointer)
            if raw is None:
                new = _Pointer(1, nonce, count)
                if client.add(ns.pointer, new.dump(), expire=0, noreply=False):
                    return new
                if only_if_absent:
                    return None
                continue  # someone published first: move forward from theirs
            if only_if_absent:
                return None
            old = _parse_or_none(raw)
            new = _Pointer((old.revision if old else 0) + 1, nonce, count)
            # cas: False when the pointer changed since gets, None when it vanished
            if client.cas(ns.pointer, new.dump(), cas_token, expire=0, noreply=False):
                if old is not None:
                    self._retire(ns, old, _grace_expire(grace))
                return new
        raise StoreError(
            f"could not move the CachedMapping pointer {ns.pointer!r} after {self.publish_attempts} attempts: "
            "other pushes kept changing it"
        )

    def _retire(self, ns: _Namespace, old: _Pointer, expire: int | None) -> None:
        keys = [ns.chunk(old.nonce, i) for i in range(old.chunks)]
        try:
            if expire is None:
                self.client.delete_many(keys, noreply=False)
            else:
                for key in keys:
                    self.client.touch(key, expire, noreply=False)
        except self._errors() as exc:
            # the new revision is published; the old snapshot merely lingers
            log.warning("stockpyle: could not expire the replaced snapshot %s: %s", ns.snapshot(old.nonce), exc)

    def _abandon(self, chunks: Mapping[str, bytes], grace: float) -> None:
        # Not a delete: a cas that timed out may still have moved the pointer
        # to these chunks, so they stay readable for a while, then expire.
        expire = memcache_expire(max(grace, 60.0))
        try:
            for key in chunks:
                self.client.touch(key, expire, noreply=False)
        except self._errors() as exc:
            log.warning("stockpyle: could not expire unpublished snapshot chunks: %s", exc)

    def purge(self, ns: _Namespace) -> int:
        # memcached cannot list keys: delete the pointer and the snapshot it
        # names; snapshots replaced earlier expire after their grace period.
        try:
            raw = self.client.get(ns.pointer)
            keys = [ns.pointer]
            pointer = _parse_or_none(raw)
            if pointer is not None:
                keys += [ns.chunk(pointer.nonce, i) for i in range(pointer.chunks)]
            deleted = 0
            for key in keys:
                if self.client.delete(key, noreply=False):
                    deleted += 1
        except self._errors() as exc:
            self._fail("purge a collection", exc)
        return deleted


def _stale_connection_errors() -> tuple[type[BaseException], ...]:
    from pymemcache.exceptions import MemcacheUnexpectedCloseError

    return (MemcacheUnexpectedCloseError, BrokenPipeError, ConnectionResetError)


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _grace_expire(grace: float) -> int | None:
    """memcached ``exptime`` for a replaced snapshot; ``None`` means delete now."""
    return memcache_expire(grace) if grace > 0 else None


_MEMCACHE_METHODS = ("get", "get_many", "set_many", "gets", "cas", "add", "touch", "delete", "delete_many")


def _make_backend(backend: Any) -> _Backend:
    """Wrap a client, a store or a URL in a :class:`_Backend`.

    :raises ConfigurationError: for anything else.
    :raises ImportError: when a URL needs a driver that is not installed.
    """
    if isinstance(backend, _Backend):
        return backend
    if isinstance(backend, str):
        return _backend_from_url(backend)
    module = type(backend).__module__
    if module.startswith("redis.asyncio"):
        raise ConfigurationError("CachedMapping needs a synchronous client: pass redis.Redis, not redis.asyncio.Redis")
    memcache_module = sys.modules.get("stockpyle.stores.memcache")  # imported if a MemcacheStore exists
    if memcache_module is not None and isinstance(backend, memcache_module.MemcacheStore):
        if not _is_pymemcache(backend.client):
            raise ConfigurationError(
                f"CachedMapping needs a MemcacheStore built on pymemcache; this one uses {backend.client!r}"
            )
        return _MemcacheBackend(backend.client)
    if _is_pymemcache(backend):
        return _MemcacheBackend(backend)
    if module.startswith("redis") or _is_redis(backend):
        return _RedisBackend(backend)
    raise ConfigurationError(
        f"CachedMapping backend must be a redis.Redis client, a pymemcache client, a MemcacheStore, "
        f"or a URL such as 'redis://127.0.0.1:6379/0' or 'memcache://127.0.0.1:11211'; got {backend!r}"
    )


def _is_pymemcache(client: Any) -> bool:
    module = type(client).__module__
    return module.startswith("pymemcache") or all(callable(getattr(client, m, None)) for m in _MEMCACHE_METHODS)


def _is_redis(backend: Any) -> bool:
    try:
        import redis
    except ImportError:
        return False
    return isinstance(backend, redis.Redis)


def _backend_from_url(url: str) -> _Backend:
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme in ("redis", "rediss", "unix"):
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise ImportError(
                "CachedMapping with a redis:// URL requires redis: pip install stockpyle[redis]"
            ) from None
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=_CONNECT_TIMEOUT,
            socket_timeout=_SOCKET_TIMEOUT,
            retry=Retry(NoBackoff(), 1),
        )
        return _RedisBackend(client, owned=True)
    if scheme in ("memcache", "memcached") or not sep:
        servers = _parse_servers(rest if sep else url)
        try:
            from pymemcache.client.base import PooledClient
            from pymemcache.client.hash import HashClient
        except ImportError:
            raise ImportError(
                "CachedMapping with a memcached address requires pymemcache: pip install stockpyle[memcache]"
            ) from None
        options: dict[str, Any] = {
            "connect_timeout": _CONNECT_TIMEOUT,
            "timeout": _SOCKET_TIMEOUT,
            "default_noreply": False,
        }
        if len(servers) == 1:
            return _MemcacheBackend(PooledClient(servers[0], **options), owned=True)
        return _MemcacheBackend(HashClient(servers, use_pooling=True, **options), owned=True)
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
    """

    checks: int = 0
    swaps: int = 0
    loads: int = 0
    pushes: int = 0
    views: int = 0
    errors: int = 0
    corrupt: int = 0
    missing: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def reset(self) -> None:
        """Set every counter back to zero."""
        for f in fields(self):
            setattr(self, f.name, 0)


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
        for label, value in (("check_interval", check_interval), ("grace", grace)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ConfigurationError(f"CachedMapping {label} must be a number of seconds >= 0; got {value!r}")
        if secret is not None and signer is not None:
            raise ConfigurationError("pass either secret= or signer=, not both")
        if secret is not None:
            signer = HMACSigner(secret)
        self._codec = Codec(serializer=serializer, signer=signer)
        self._backend = _make_backend(backend)
        self.name = name
        self.version = str(version)
        self.check_interval = float(check_interval)
        self.grace = float(grace)
        self.publish_missing = publish_missing
        self._ns = _Namespace.of(name, self.version)
        self._stats = CachedMappingStats()
        self._lock = threading.Lock()
        self._current: _State | None = None
        self._next_check = -math.inf

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
            state, recheck = self._check(current)
            self._current = state
            self._next_check = -math.inf if recheck else time.monotonic() + self.check_interval
            return state
        finally:
            self._lock.release()

    def _check(self, current: _State | None) -> tuple[_State, bool]:
        """Compare the published revision with ours; return the state to serve and whether to recheck at once."""
        self._stats.checks += 1
        doing = "serving its current copy" if current is not None else "loading locally"
        try:
            pointer = self._backend.read_pointer(self._ns)
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
            self._current = state
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
        """Close the backend client if this mapping created it from a URL."""
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
