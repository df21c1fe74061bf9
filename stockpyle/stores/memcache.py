"""MemcacheStore: objects in memcached, through pymemcache (or a python-memcached-style client).

Every stockpyle key becomes one memcached key of the form
``{prefix}:{namespace}:{ClassName}:{digest}``, where ``digest`` is a 160-bit
BLAKE2b hash of :func:`stockpyle.keys.encode_key`.  Keys are therefore always
valid (at most ~220 ASCII characters, no whitespace or control characters)
whatever the key values are, and stay readable in ``memcached`` dumps.

Each entry is an envelope from :class:`stockpyle.serializers.Codec` whose
payload is::

    length of section (4 bytes) | section | serialized object
    section = memcached keys of the object, space separated [ newline | version as JSON ]

The key list lets a later ``put`` find and delete the entries an object
occupied under key values that have since changed (stale alternate keys),
without deserializing the old object.  The version (present when the object's
class has one, see :func:`stockpyle.keys.version_of`) lets a ``put`` compare
versions without deserializing the object; it is JSON, so reading it never
runs code even in an unsigned store.

A *tombstone* is an envelope whose payload is four 0xFF bytes (a section
length no key list has) followed by an optional JSON version.  ``delete`` writes tombstones with a
short lifetime (``tombstone_lifetime``) instead of deleting, so a reader that
read the database before the delete cannot back-fill (``add``) the old object;
reads treat a tombstone as a miss, ``put`` replaces it (unless it records a
version at least as new as the object's).  Tombstones are signed like entries.

Consistency protocol (see ``docs/consistency.rst``):

* ``add``/``batch_add`` (the back-fill of a :class:`~stockpyle.ChainedStore`)
  use memcached ``add`` for each key of an object, so they never replace a
  newer entry or a tombstone.  When some of an object's keys are added and
  another is refused, the added ones are deleted again: the refusal means a
  writer got there first (or the object was deleted), and an object present
  under only some of its keys could serve the old value under those keys.
* ``put`` of a versioned object reads its keys with ``gets`` and writes with
  ``cas`` (``add`` for absent keys), retrying on conflicts, so an entry is
  never replaced by an older version; after ``CAS_ATTEMPTS`` conflicting
  attempts the object's keys are invalidated instead (a miss is always safe).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar

from ..exceptions import (
    ConfigurationError,
    SerializationError,
    StoreError,
    StoreUnavailableError,
    ValueTooLargeError,
)
from ..keys import Key, encode_key, is_older, lookup_key, object_keys, version_of
from ..lifetimes import MEMCACHE_RELATIVE_LIMIT, LifetimeCallback, memcache_expire, seconds_remaining
from ..serializers import Codec, HMACSigner, JSONSerializer, Serializer, Signer
from .base import MISS, BaseStore, KeyDict

__all__ = ["MemcacheStore"]

T = TypeVar("T")
log = logging.getLogger("stockpyle.memcache")

INSTALL_HINT: Final = "MemcacheStore requires pymemcache: pip install stockpyle[memcache]"

#: memcached's default largest item (``-I 1m``).
DEFAULT_MAX_ITEM_SIZE: Final = 1024 * 1024
# memcached stores an item header (and the key) in the same slab item as the
# value; measured on memcached 1.6 the overhead is under 64 bytes.
_ITEM_OVERHEAD: Final = 64

_SAFE_PART: Final = re.compile(r"[A-Za-z0-9_.\-]{0,64}\Z")
_CLASS_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_.]")
_KEYS_LEN: Final = 4
_MKEY_CACHE_LIMIT: Final = 20_000
#: Section length that marks a tombstone (no real key list is 4 GiB long).
_TOMB_MARK: Final = 0xFFFFFFFF
_TOMB_PREFIX: Final = _TOMB_MARK.to_bytes(_KEYS_LEN, "big")
#: Versions are JSON (tagged types), never pickles: reading one cannot run code.
_VERSIONS: Final = JSONSerializer()
#: Default cap on entry lifetimes (one day): no entry lives forever unless asked.
DEFAULT_MAX_LIFETIME: Final = 86_400
#: Attempts of a version-checked put before it gives up and invalidates.
CAS_ATTEMPTS: Final = 8
# states of an entry read back from memcached
_ABSENT, _ENTRY, _TOMBSTONE, _UNREADABLE = range(4)


def _encode_version(version: Any) -> bytes | None:
    """JSON bytes of a version, or ``None`` (unversioned, or a type JSON cannot carry)."""
    if version is None:
        return None
    try:
        return _VERSIONS.dumps(version)
    except (TypeError, ValueError):
        log.warning("stockpyle: version %r cannot be recorded in memcached; writes are not version-checked", version)
        return None


def _decode_version(data: bytes) -> Any:
    if not data:
        return None
    try:
        return _VERSIONS.loads(data)
    except ValueError:
        return None


def _by_expiry(items: Iterable[_Prepared]) -> dict[int, dict[str, bytes]]:
    """The encoded values of the storable ``items``, grouped by memcached expiry (one write per group)."""
    groups: dict[int, dict[str, bytes]] = {}
    for it in items:
        if it.values is not None and it.expire is not None:
            groups.setdefault(it.expire, {}).update(it.values)
    return groups


def _owned(owner: str, version: bytes | None) -> bytes | None:
    """A tombstone's version record: the owner's first key and the version JSON (``None`` when unversioned)."""
    return None if version is None else owner.encode("ascii") + b"\n" + version


def _not_newer(candidate: Any, stored: Any) -> bool:
    """True when ``candidate`` is older than or equal to ``stored`` (incomparable: False)."""
    try:
        return bool(candidate == stored) or is_older(candidate, stored)
    except Exception:  # noqa: BLE001 - a user type with a failing __eq__ is incomparable
        return False


def _key_part(text: Any, what: str) -> str:
    """A readable, memcached-safe form of ``prefix``/``namespace`` (hashed if needed)."""
    if not isinstance(text, str):
        raise ConfigurationError(f"MemcacheStore {what} must be a str; got {text!r}")
    if _SAFE_PART.match(text):
        return text
    # "~" never appears in a readable part, so a hashed part cannot equal one
    return "~" + hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


def _import_pymemcache() -> Any:
    try:
        import pymemcache
        import pymemcache.client.base
        import pymemcache.client.hash
        import pymemcache.exceptions
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return pymemcache


class _PinnedRendezvousHash:
    """Rendezvous hashing whose node set never shrinks.

    pymemcache's HashClient removes a node it considers dead, which sends that
    node's keys to other servers; when the node comes back, readers see the
    entries it held before the outage (stale reads).  Pinning the node set
    keeps every key on its own server: while that server is down its keys fail
    (:class:`~stockpyle.exceptions.StoreUnavailableError`) instead of moving.
    """

    def __init__(self) -> None:
        from pymemcache.client.rendezvous import RendezvousHash

        self._hash = RendezvousHash()

    @property
    def nodes(self) -> list[Any]:
        return self._hash.nodes  # type: ignore[no-any-return]

    def add_node(self, node: Any) -> None:
        self._hash.add_node(node)  # idempotent

    def remove_node(self, node: Any) -> None:
        """Deliberately a no-op: see the class docstring."""

    def get_node(self, key: Any) -> Any:
        return self._hash.get_node(key)


# --------------------------------------------------------------------------
# client adapters: one interface over the three kinds of client


class _Backend:
    """Uniform access to a memcached client; one call per server for batches."""

    __slots__ = ("client", "nodes", "can_add", "can_cas")

    def __init__(self, client: Any) -> None:
        self.client = client
        #: the per-server clients, for error messages and close()
        self.nodes: list[Any] = [client]
        self.can_add = callable(getattr(client, "add", None))
        self.can_cas = callable(getattr(client, "gets_many", None)) and callable(getattr(client, "cas", None))

    def route(self, keys: Iterable[str]) -> list[tuple[Any, list[str]]]:
        """Group ``keys`` by the client that serves them."""
        return [(self.client, list(keys))]

    def node_for(self, key: str) -> Any:
        """The client that serves ``key``."""
        return self.client

    def get(self, key: str) -> Any:
        return self.client.get(key)

    def gets_many(self, node: Any, keys: list[str]) -> Mapping[str, tuple[Any, Any]]:
        return node.gets_many(keys)  # type: ignore[no-any-return]

    def add(self, node: Any, key: str, value: bytes, expire: int) -> bool:
        return bool(node.add(key, value, expire=expire, noreply=False))

    def add_many(self, node: Any, values: dict[str, bytes], expire: int) -> dict[str, bool]:
        """``add`` every key in one round trip; returns which keys were stored.

        pymemcache has no public multi-key ``add``, but its ``set_many`` is a
        pipelined ``_store_cmd(b"set", ...)``; the same private method sends
        ``add`` commands (pymemcache 4.x, pinned in the ``memcache`` extra).
        Any other client falls back to one ``add`` per key.
        """
        store = getattr(node, "_store_cmd", None)
        if callable(store):
            return {key: bool(done) for key, done in store(b"add", values, expire, False).items()}
        pool = getattr(node, "client_pool", None)
        if pool is not None and callable(getattr(pool, "get_and_release", None)):
            with pool.get_and_release(destroy_on_fail=True) as client:
                if callable(getattr(client, "_store_cmd", None)):
                    results = client._store_cmd(b"add", values, expire, False)
                    return {key: bool(done) for key, done in results.items()}
        return {key: self.add(node, key, value, expire) for key, value in values.items()}

    def cas(self, node: Any, key: str, value: bytes, token: Any, expire: int) -> bool:
        # None (key gone) and False (changed since gets) are both conflicts
        return bool(node.cas(key, value, token, expire=expire, noreply=False))

    def get_many(self, node: Any, keys: list[str]) -> Mapping[str, Any]:
        return node.get_many(keys)  # type: ignore[no-any-return]

    def set_many(self, node: Any, values: dict[str, bytes], expire: int) -> list[str]:
        return node.set_many(values, expire=expire, noreply=False)  # type: ignore[no-any-return]

    def delete_many(self, node: Any, keys: list[str]) -> None:
        node.delete_many(keys, noreply=False)

    def close(self) -> None:
        self.client.close()


class _HashBackend(_Backend):
    """A pymemcache HashClient: keys are routed to the per-server clients directly.

    Going around HashClient's own multi-key methods gives one round trip per
    server for deletes too (its ``delete_many`` deletes key by key), and skips
    its dead-server bookkeeping, which would silently turn failures into
    misses and dropped writes.
    """

    __slots__ = ()

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.nodes = list(client.clients.values())
        first = self.nodes[0] if self.nodes else None
        self.can_add = callable(getattr(first, "add", None))
        self.can_cas = callable(getattr(first, "gets_many", None)) and callable(getattr(first, "cas", None))

    def _node(self, key: str) -> Any:
        name = self.client.hasher.get_node(key)
        if name is None:
            raise StoreUnavailableError("no memcached servers configured in the HashClient")
        return self.client.clients[name]

    def route(self, keys: Iterable[str]) -> list[tuple[Any, list[str]]]:
        get_node = self.client.hasher.get_node
        clients = self.client.clients
        groups: dict[Any, list[str]] = {}
        for key in keys:
            name = get_node(key)
            if name is None:
                raise StoreUnavailableError("no memcached servers configured in the HashClient")
            groups.setdefault(name, []).append(key)
        return [(clients[name], group) for name, group in groups.items()]

    def node_for(self, key: str) -> Any:
        return self._node(key)

    def get(self, key: str) -> Any:
        return self._node(key).get(key)


class _LegacyBackend(_Backend):
    """A python-memcached-style client (``get_multi``/``set_multi``/``delete_multi``)."""

    __slots__ = ()

    def __init__(self, client: Any) -> None:
        super().__init__(client)
        # python-memcached's gets/cas need cache_cas=True and keep per-client
        # state; version-checked puts are offered on pymemcache clients only
        self.can_cas = False

    def get_many(self, node: Any, keys: list[str]) -> Mapping[str, Any]:
        return node.get_multi(keys)  # type: ignore[no-any-return]

    def add(self, node: Any, key: str, value: bytes, expire: int) -> bool:
        return bool(node.add(key, value, expire))

    def set_many(self, node: Any, values: dict[str, bytes], expire: int) -> list[str]:
        failed = node.set_multi(values, expire)
        return list(failed or ())

    def delete_many(self, node: Any, keys: list[str]) -> None:
        # python-memcached answers 1 on success and 0 when a server failed
        if node.delete_multi(keys) in (0, False):
            raise StoreUnavailableError(f"memcached did not acknowledge deleting {len(keys)} keys")

    def close(self) -> None:
        self.client.disconnect_all()


def _is_legacy_client(client: Any) -> bool:
    return all(callable(getattr(client, name, None)) for name in ("get", "get_multi", "set_multi", "delete_multi"))


def _is_pymemcache_like(client: Any) -> bool:
    return all(callable(getattr(client, name, None)) for name in ("get", "get_many", "set_many", "delete_many"))


class _Prepared:
    """One object ready to be written: its keys, envelopes, exptime and version."""

    __slots__ = ("mkeys", "expire", "version", "vbytes", "values")

    def __init__(self, mkeys: list[str], expire: int | None, version: Any, vbytes: bytes | None) -> None:
        self.mkeys = mkeys
        self.expire = expire
        self.version = version
        self.vbytes = vbytes
        #: envelope per key; None when the object is not to be written
        self.values: dict[str, bytes] | None = None


# --------------------------------------------------------------------------
# the store


class MemcacheStore(BaseStore):
    """A store in memcached, usually a cache layer of a :class:`~stockpyle.ChainedStore`.

    ``MemcacheStore(servers=["127.0.0.1:11211"])`` creates a thread-safe
    pooled pymemcache client; several servers are combined with rendezvous
    (consistent) hashing, one connection pool per server.  Alternatively pass a
    ready ``client=``: a pymemcache ``Client``, ``PooledClient`` or
    ``HashClient``, or a python-memcached-style client.  The constructor never
    connects.

    Objects are pickled by default.  Anyone who can write to the memcached
    servers can make a pickle run code when it is read: in a cache shared
    with others, pass ``secret=`` (entries are then HMAC-signed and unsigned or
    forged entries are never deserialized) or use
    ``serializer=JSONSerializer()``.

    :param servers: ``"host:port"`` strings (or ``(host, port)`` tuples).
    :param client: a memcached client to use instead of ``servers``.
    :param polymorphic: also index objects under their storable base classes.
    :param lifetime_cb: ``obj -> lifetime`` in this store.
    :param prefix: first part of every memcached key (default ``"sp"``).
    :param namespace: second part, e.g. a code or schema version: stores with
        different namespaces never see each other's entries.
    :param serializer: a :class:`~stockpyle.serializers.Serializer`
        (default :class:`~stockpyle.serializers.PickleSerializer`).
    :param secret: sign entries with HMAC-SHA256 under this secret (``bytes``,
        ``str`` or a ``{key_id: secret}`` keyring, see
        :class:`~stockpyle.serializers.HMACSigner`).
    :param signer: a ready :class:`~stockpyle.serializers.Signer` instead of ``secret``.
    :param connect_timeout: seconds to wait for a connection (``servers=`` only).
    :param timeout: seconds to wait for each response (``servers=`` only).
    :param max_pool_size: connections per server (``servers=`` only; default unbounded).
    :param max_item_size: the servers' largest item (memcached ``-I``, 1 MiB by
        default); larger values raise :class:`~stockpyle.exceptions.ValueTooLargeError`
        before anything is sent.
    :param cleanup_stale_keys: on ``put``/``delete``, read the entries under the
        object's keys first and delete the keys they recorded that the object
        no longer has (one extra round trip, skipped for objects with a single
        key).  Turn off only if key attributes never change.
    :param tombstone_lifetime: seconds a deleted key keeps a tombstone that
        refuses back-fills (``add``), so a reader racing the delete cannot put
        the old object back (default 5; rounded up to whole seconds, at least
        2 because memcached's clock ticks once a second).  ``0`` deletes
        plainly (no protection against that race).
    :param max_lifetime: cap on the lifetime of every entry: objects whose
        lifetime is longer, or unset ("never expires"), get this one
        (default one day).  It bounds how long an entry can stay stale when an
        invalidation could not reach memcached.  ``None`` lets entries without
        a lifetime live until evicted.
    :raises ConfigurationError: for none or both of ``servers``/``client``, both
        ``secret``/``signer``, or other invalid arguments.
    :raises ImportError: for ``servers=`` without pymemcache installed.

    :ivar rejected: number of entries that failed verification or could not
        be decoded; each was treated as a miss and deleted.
    :ivar conflicts: version-checked writes that kept conflicting with other
        writers for :data:`CAS_ATTEMPTS` attempts and invalidated the object's
        keys instead.
    """

    supports_expiry = True

    def __init__(
        self,
        servers: Sequence[str | tuple[str, int]] | str | None = None,
        *,
        client: Any = None,
        polymorphic: bool = False,
        lifetime_cb: LifetimeCallback | None = None,
        prefix: str = "sp",
        namespace: str = "",
        serializer: Serializer | None = None,
        secret: bytes | str | Mapping[int, bytes | str] | None = None,
        signer: Signer | None = None,
        connect_timeout: float = 0.25,
        timeout: float = 0.5,
        max_pool_size: int | None = None,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
        cleanup_stale_keys: bool = True,
        tombstone_lifetime: float = 5.0,
        max_lifetime: Any = DEFAULT_MAX_LIFETIME,
    ) -> None:
        super().__init__(polymorphic=polymorphic, lifetime_cb=lifetime_cb)
        if (servers is None) == (client is None):
            raise ConfigurationError(
                "MemcacheStore needs exactly one of servers=['host:port', ...] or client=<memcached client>"
            )
        if secret is not None and signer is not None:
            raise ConfigurationError("pass either secret= or signer= to MemcacheStore, not both")
        for name, value in (("connect_timeout", connect_timeout), ("timeout", timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigurationError(f"MemcacheStore {name} must be a positive number of seconds; got {value!r}")
        if isinstance(max_item_size, bool) or not isinstance(max_item_size, int) or max_item_size <= _ITEM_OVERHEAD:
            raise ConfigurationError(f"max_item_size must be a number of bytes; got {max_item_size!r}")
        self.prefix = prefix
        self.namespace = namespace
        self._head = f"{_key_part(prefix, 'prefix')}:{_key_part(namespace, 'namespace')}:"
        if signer is None and secret is not None:
            signer = HMACSigner(secret)
        self.codec = Codec(serializer, signer)
        # inline decoding of unsigned entries (see get/batch_get); a signing
        # store never matches this header, so everything goes through the codec
        self._fast_header = None if self.codec.signed else self.codec.header
        self._raw_loads = self.codec.serializer.loads
        self.max_item_size = max_item_size
        self.cleanup_stale_keys = bool(cleanup_stale_keys)
        if (
            isinstance(tombstone_lifetime, bool)
            or not isinstance(tombstone_lifetime, (int, float))
            or not (0 <= tombstone_lifetime <= MEMCACHE_RELATIVE_LIMIT)
        ):
            raise ConfigurationError(
                f"tombstone_lifetime must be seconds between 0 and 30 days; got {tombstone_lifetime!r}"
            )
        self.tombstone_lifetime = float(tombstone_lifetime)
        self._tomb_expire = max(2, math.ceil(tombstone_lifetime)) if tombstone_lifetime else 0
        self.max_lifetime = max_lifetime
        self._max_seconds: float | None = None
        if max_lifetime is not None:
            try:
                seconds = seconds_remaining(max_lifetime, 0.0)
            except Exception:  # noqa: BLE001 - reported as a configuration error below
                seconds = None
            if isinstance(max_lifetime, (bool, _dt.datetime)) or seconds is None or not seconds > 0:
                raise ConfigurationError(
                    f"max_lifetime must be a positive number of seconds or a timedelta (or None); got {max_lifetime!r}"
                )
            self._max_seconds = seconds
        #: memcached exptime of entries that get the cap (relative when it fits)
        # (-1: the cap exceeds 30 days, so it is converted to an absolute time per write)
        self._cap_expire = 0 if self._max_seconds is None else math.ceil(self._max_seconds)
        if self._cap_expire > MEMCACHE_RELATIVE_LIMIT:
            self._cap_expire = -1
        self.rejected = 0
        self.conflicts = 0
        self._counter_lock = threading.Lock()
        self._mkeys: dict[Key, str] = {}
        self._class_parts: dict[type, str] = {}
        self._driver_errors: tuple[type[BaseException], ...] = (OSError,)
        self._closed_errors: tuple[type[BaseException], ...] = (ConnectionResetError, BrokenPipeError)
        self._server_error: type[BaseException] | None = None
        self.servers: list[str] | None = None

        if servers is not None:
            pymemcache = _import_pymemcache()
            self._note_driver(pymemcache)
            self.client = self._make_client(pymemcache, servers, connect_timeout, timeout, max_pool_size)
        else:
            self.client = client
            try:
                pymemcache = _import_pymemcache()
            except ImportError:
                pymemcache = None
            if pymemcache is not None:
                self._note_driver(pymemcache)
        self._backend = self._make_backend(self.client)

    # -- construction helpers -------------------------------------------

    def _note_driver(self, pymemcache: Any) -> None:
        exc = pymemcache.exceptions
        self._driver_errors = (OSError, exc.MemcacheError)
        self._closed_errors = (ConnectionResetError, BrokenPipeError, exc.MemcacheUnexpectedCloseError)
        self._server_error = exc.MemcacheServerError

    def _make_client(
        self,
        pymemcache: Any,
        servers: Sequence[str | tuple[str, int]] | str,
        connect_timeout: float,
        timeout: float,
        max_pool_size: int | None,
    ) -> Any:
        if isinstance(servers, str):
            servers = [servers]
        specs = []
        for server in servers:
            try:
                specs.append(pymemcache.client.base.normalize_server_spec(server))
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"MemcacheStore servers must be 'host:port' strings or (host, port) tuples; got {server!r}"
                ) from None
        if not specs:
            raise ConfigurationError("MemcacheStore(servers=...) needs at least one 'host:port'")
        self.servers = [s if isinstance(s, str) else f"{s[0]}:{s[1]}" for s in specs]
        options: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "timeout": timeout,
            # Without TCP_NODELAY a set followed by a get waits ~40 ms for
            # delayed ACKs (Nagle); memcached traffic is small request/response.
            "no_delay": True,
            # Acknowledged writes, so a refused or failed write raises.
            "default_noreply": False,
            "max_pool_size": max_pool_size,
        }
        if len(specs) == 1:
            return pymemcache.client.base.PooledClient(specs[0], **options)
        return pymemcache.client.hash.HashClient(
            specs,
            hasher=_PinnedRendezvousHash,
            use_pooling=True,
            # fail fast and never mark servers dead: errors reach the store
            retry_attempts=0,
            **options,
        )

    @staticmethod
    def _make_backend(client: Any) -> _Backend:
        if callable(getattr(getattr(client, "hasher", None), "get_node", None)) and isinstance(
            getattr(client, "clients", None), dict
        ):
            return _HashBackend(client)
        if _is_pymemcache_like(client):
            return _Backend(client)
        if _is_legacy_client(client):
            return _LegacyBackend(client)
        raise ConfigurationError(
            f"MemcacheStore(client=...) needs a pymemcache Client/PooledClient/HashClient or a python-memcached-"
            f"style client with get, get_multi, set_multi and delete_multi; got {type(client).__name__}"
        )

    def __repr__(self) -> str:
        where = self.servers if self.servers is not None else type(self.client).__name__
        return (
            f"<MemcacheStore {where} namespace={self.namespace!r} polymorphic={self.polymorphic}"
            f" signed={self.codec.signed}>"
        )

    # -- keys -----------------------------------------------------------

    def _class_part(self, klass: type) -> str:
        part = self._class_parts.get(klass)
        if part is None:
            part = _CLASS_UNSAFE.sub("_", klass.__qualname__)[-48:]
            self._class_parts[klass] = part
        return part

    def memcache_key(self, key: Key) -> str:
        """The memcached key of one stockpyle key (see the module docs for its form)."""
        mkey = self._mkeys.get(key)
        if mkey is None:
            digest = hashlib.blake2b(encode_key(key).encode("utf-8", "surrogatepass"), digest_size=20).hexdigest()
            mkey = f"{self._head}{self._class_part(key[0])}:{digest}"
            mkeys = self._mkeys
            if len(mkeys) >= _MKEY_CACHE_LIMIT:
                mkeys.clear()  # a plain bound: recomputing a key costs a few microseconds
            mkeys[key] = mkey
        return mkey

    def key_for(self, klass: type, keydict: KeyDict) -> str:
        """The memcached key ``get(klass, keydict)`` reads."""
        return self.memcache_key(lookup_key(klass, keydict))

    def _object_mkeys(self, obj: object) -> list[str]:
        if obj is None:
            from ..exceptions import NotStorableError

            raise NotStorableError("None cannot be stored: it has no __stockpyle_keys__")
        mkey = self.memcache_key
        out = [mkey(k) for k in object_keys(obj, self.polymorphic)]
        return out if len(out) == len(set(out)) else list(dict.fromkeys(out))

    # -- errors ---------------------------------------------------------

    def _map_error(self, exc: BaseException, action: str) -> StoreError:
        where = ", ".join(self.servers) if self.servers else "memcached"
        server_error = self._server_error
        if server_error is not None and isinstance(exc, server_error) and not isinstance(exc, self._closed_errors):
            text = str(exc.args[0] if exc.args else exc)
            if "too large" in text:
                return ValueTooLargeError(f"memcached ({where}) refused a value as too large while trying to {action}")
            return StoreError(f"memcached ({where}) failed to {action}: {text}")
        if isinstance(exc, (OSError, *self._closed_errors)):
            return StoreUnavailableError(f"memcached ({where}) unavailable while trying to {action}: {exc!r}")
        return StoreError(f"memcached ({where}) failed to {action}: {exc!r}")

    def _call(self, action: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run one client call, retrying once on a connection the server closed."""
        try:
            return fn(*args)
        except self._closed_errors:
            # A pooled connection to a server that restarted fails on first use;
            # memcached get/set/delete are idempotent, so trying again is safe.
            pass
        except self._driver_errors as exc:
            raise self._map_error(exc, action) from exc
        try:
            return fn(*args)
        except self._driver_errors as exc:
            raise self._map_error(exc, action) from exc

    def _each_node(
        self, action: str, keys: Iterable[str], fn: Callable[[Any, list[str]], Any]
    ) -> list[tuple[Any, list[str], Any]]:
        """Call ``fn(node, keys)`` once per server; every server is tried before an error is raised."""
        results = []
        first: StoreError | None = None
        for node, group in self._backend.route(keys):
            try:
                results.append((node, group, self._call(action, fn, node, group)))
            except StoreError as exc:
                if first is None:
                    first = exc
        if first is not None:
            raise first
        return results

    def _fetch(self, keys: list[str], action: str) -> dict[str, Any]:
        if not keys:
            return {}
        found: dict[str, Any] = {}
        for _node, _group, result in self._each_node(action, keys, self._backend.get_many):
            found.update(result)
        return found

    def _remove(self, keys: Iterable[str], action: str) -> None:
        keys = list(keys)
        if keys:
            self._each_node(action, keys, self._backend.delete_many)

    def _store(self, values: dict[str, bytes], expire: int, action: str) -> None:
        backend = self._backend

        def write(node: Any, group: list[str]) -> list[str]:
            return backend.set_many(node, {k: values[k] for k in group}, expire)

        failed: list[str] = []
        for _node, _group, result in self._each_node(action, values, write):
            failed.extend(result)
        if failed:
            raise StoreError(f"memcached did not store {len(failed)} of {len(values)} keys while trying to {action}")

    # -- entries --------------------------------------------------------

    def _reject(self, mkey: str, exc: Exception) -> None:
        with self._counter_lock:
            self.rejected += 1
        log.warning("stockpyle: rejected memcached entry %s (deleted, treated as a miss): %s", mkey, exc)
        # if the delete fails the entry stays unusable and is rejected again
        with contextlib.suppress(StoreError):
            self._remove([mkey], "delete a rejected entry")

    def _decode(self, mkey: str, data: Any) -> Any:
        """The object in an entry, or MISS (a tombstone, or an entry rejected and deleted)."""
        try:
            if type(data) is not bytes:
                raise SerializationError(f"client returned {type(data).__name__}, not bytes (is a serde configured?)")
            start = self.codec.payload_offset(mkey, data)
            length = int.from_bytes(data[start : start + _KEYS_LEN], "big")
            if length == _TOMB_MARK:
                return MISS
            return self.codec.loads(data[start + _KEYS_LEN + length :])
        except SerializationError as exc:
            self._reject(mkey, exc)
            return MISS

    def _inspect(self, mkey: str, data: Any) -> tuple[int, Any, list[str], str | None]:
        """State, version, recorded keys and owner of an entry, without deserializing its object.

        The owner is the first memcached key of the object the entry (or the
        tombstone) belongs to: versions are per object, so they are only ever
        compared with entries of the same owner.

        :returns: ``(_ABSENT | _ENTRY | _TOMBSTONE | _UNREADABLE, version or None, keys, owner or None)``.
        """
        if data is None:
            return _ABSENT, None, [], None
        if type(data) is not bytes:
            return _UNREADABLE, None, [], None
        try:
            start = self.codec.payload_offset(mkey, data) + _KEYS_LEN
        except SerializationError:
            return _UNREADABLE, None, [], None
        length = int.from_bytes(data[start - _KEYS_LEN : start], "big")
        if length == _TOMB_MARK:
            owner, newline, version = data[start:].partition(b"\n")
            if not newline:
                return _TOMBSTONE, None, [], None
            return _TOMBSTONE, _decode_version(version), [], owner.decode("ascii", "replace")
        names, newline, version = data[start : start + length].partition(b"\n")
        try:
            recorded = names.decode("ascii").split(" ")
        except UnicodeDecodeError:
            recorded = []
        return _ENTRY, (_decode_version(version) if newline else None), recorded, (recorded[0] if recorded else None)

    def _recorded_keys(self, mkey: str, data: Any) -> list[str]:
        """The memcached keys an entry's object occupied ([] if unreadable or a tombstone)."""
        return self._inspect(mkey, data)[2]

    def _stale(self, wanted: Sequence[list[str]], action: str) -> tuple[set[str], StoreError | None]:
        """Keys recorded by the entries now under the objects' keys, minus their current keys.

        :returns: the stale keys, and the error of a server that could not be
            read (its entries' records are then unknown).
        """
        probe = [mkeys for mkeys in wanted if len(mkeys) > 1]
        if not self.cleanup_stale_keys or not probe:
            return set(), None
        error: StoreError | None = None
        found: dict[str, Any] = {}
        for node, group in self._backend.route(k for mkeys in probe for k in mkeys):
            try:
                found.update(self._call(action, self._backend.get_many, node, group))
            except StoreError as exc:
                error = error or exc
        stale: set[str] = set()
        for mkeys in probe:
            current = set(mkeys)
            for mkey in mkeys:
                data = found.get(mkey)
                if data is not None:
                    stale.update(k for k in self._recorded_keys(mkey, data) if k not in current)
        return stale, error

    def _bury(self, burials: Iterable[tuple[str, bytes | None]], action: str) -> None:
        """Replace keys by tombstones: ``(key, record or None)`` pairs, see :func:`_owned`.

        Without a tombstone lifetime the keys are simply deleted.
        """
        seal = self.codec.seal
        values = {mkey: seal(mkey, _TOMB_PREFIX + (version or b"")) for mkey, version in burials}
        if not values:
            return
        if not self._tomb_expire:
            self._remove(values, action)
            return
        self._store(values, self._tomb_expire, action)

    # -- the operations -------------------------------------------------

    def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        key = lookup_key(klass, keydict)
        mkey = self._mkeys.get(key) or self.memcache_key(key)
        data = self._call("get", self._backend.get, mkey)
        if data is None:
            return None
        if type(data) is bytes and data[:5] == self._fast_header:
            length = int.from_bytes(data[5:9], "big")
            if length == _TOMB_MARK:
                return None
            try:
                return self._raw_loads(data[9 + length :])  # type: ignore[no-any-return]
            except Exception as exc:  # noqa: BLE001 - corrupt data of any kind is a rejected entry
                self._reject(mkey, SerializationError(f"cannot deserialize entry: {exc!r}"))
                return None
        obj = self._decode(mkey, data)
        return None if obj is MISS else obj

    def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        cache = self._mkeys
        memcache_key = self.memcache_key
        mkeys = []
        for keydict in keydicts:
            key = lookup_key(klass, keydict)
            mkeys.append(cache.get(key) or memcache_key(key))
        found = self._fetch(list(dict.fromkeys(mkeys)), "batch_get")
        decoded: dict[str, Any] = {}
        # The common entry (unsigned, our serializer) is decoded inline: this
        # loop runs once per key and dominates batch_get after the round trip.
        fast_header = self._fast_header
        loads = self._raw_loads
        for mkey, data in found.items():
            if type(data) is bytes and data[:5] == fast_header:
                length = int.from_bytes(data[5:9], "big")
                if length == _TOMB_MARK:
                    continue
                try:
                    decoded[mkey] = loads(data[9 + length :])
                except Exception as exc:  # noqa: BLE001 - corrupt data of any kind is a rejected entry
                    self._reject(mkey, SerializationError(f"cannot deserialize entry: {exc!r}"))
            elif data is not None:
                obj = self._decode(mkey, data)
                if obj is not MISS:
                    decoded[mkey] = obj
        get = decoded.get
        return [get(mkey) for mkey in mkeys]

    def put(self, obj: object) -> None:
        self._put_many([obj], "put")

    def batch_put(self, objs: Iterable[object]) -> None:
        self._put_many(list(objs), "batch_put")

    def delete(self, obj: object) -> None:
        self._delete_many([obj], "delete")

    def batch_delete(self, objs: Iterable[object]) -> None:
        self._delete_many(list(objs), "batch_delete")

    def add(self, obj: object) -> bool:
        """Store ``obj`` only where none of its keys holds an entry or a tombstone.

        This is how a :class:`~stockpyle.ChainedStore` back-fills: a value read
        from a lower layer must never replace a newer one written meanwhile, nor
        bring back an object deleted meanwhile.  Each key is written with
        memcached ``add``; if any key is refused, the keys already added are
        deleted again, so the object is never left under only some of its keys.
        An object that cannot be serialized or is too large is not stored
        (logged, ``False``): a back-fill is an optimisation, not a write.

        :returns: whether the object was stored.
        :raises StoreError: when memcached fails (keys added before the failure
            are deleted again where possible).
        """
        return self._add_many([obj], "add")[0]

    def batch_add(self, objs: Iterable[object]) -> list[bool]:
        """:meth:`add` for many objects; returns which were stored.

        :raises StoreError: when memcached fails.
        """
        return self._add_many(list(objs), "batch_add")

    def _expire_for(self, obj: object) -> int | None:
        """memcached exptime for ``obj``: its lifetime capped at ``max_lifetime`` (None: already expired)."""
        cap = self._max_seconds
        if self.lifetimes.trivial:
            return self._cap_expire if self._cap_expire >= 0 else memcache_expire(cap)
        lifetime = self.lifetimes.lifetime_for(obj)
        if cap is None:
            return memcache_expire(lifetime)
        now = time.time()
        remaining = seconds_remaining(lifetime, now)
        if remaining is None or remaining > cap:
            return memcache_expire(cap, now)
        return memcache_expire(lifetime, now)

    def _prepare(self, objs: list[object]) -> tuple[list[_Prepared], Exception | None]:
        """Encode every object (all checks that depend on the caller happen here, before any I/O).

        :returns: the prepared objects (``values`` is ``None`` for one that is
            not to be written: already expired, unserializable or too large)
            and the first error to report.
        """
        keyed = [(self._object_mkeys(obj), obj, self._expire_for(obj)) for obj in objs]
        codec = self.codec
        limit = self.max_item_size - _ITEM_OVERHEAD
        can_cas = self._backend.can_cas
        failure: Exception | None = None
        out = []
        for mkeys, obj, expire in keyed:
            version = version_of(obj) if can_cas else None
            vbytes = _encode_version(version)
            item = _Prepared(mkeys, expire, None if vbytes is None else version, vbytes)
            out.append(item)
            if expire is None:  # already expired: store nothing, drop what is there
                continue
            try:
                body = codec.dumps(obj)
            except SerializationError as exc:
                failure = failure or exc
                continue
            section = " ".join(mkeys).encode("ascii")
            if vbytes is not None:
                section += b"\n" + vbytes
            payload = len(section).to_bytes(_KEYS_LEN, "big") + section + body
            values: dict[str, bytes] = {}
            for mkey in mkeys:
                value = codec.seal(mkey, payload)
                if len(value) + len(mkey) > limit:
                    failure = failure or ValueTooLargeError(
                        f"{type(obj).__qualname__} object is {len(value)} bytes serialized; memcached accepts at"
                        f" most about {limit} bytes per item (max_item_size={self.max_item_size}, memcached -I)"
                    )
                    break
                values[mkey] = value
            else:
                item.values = values
        return out, failure

    def _put_many(self, objs: list[object], action: str) -> None:
        if not objs:
            return
        # 1. everything that can fail because of the caller, before any I/O
        items, failure = self._prepare(objs)
        plain = [it for it in items if it.values is not None and it.version is None]
        versioned = [it for it in items if it.values is not None and it.version is not None]
        doomed = [it for it in items if it.values is None]
        # 2. find keys the objects occupied under old key values (versioned
        # objects find them while reading their keys for the version check)
        stale, unreadable = self._stale([it.mkeys for it in plain + doomed], action)
        if unreadable is not None:
            # A server could not be read, so old keys may be unknown: don't
            # write, invalidate what can be reached and report the outage.
            self._invalidate([k for it in items for k in it.mkeys] + list(stale), action)
            raise unreadable
        written = {k for it in plain for k in it.mkeys}
        burials = [(k, None) for k in stale if k not in written]
        burials.extend((k, None) for it in doomed for k in it.mkeys)
        # 3. tombstone stale and doomed entries (a racing back-fill must not
        # put an old copy there), then write
        try:
            self._bury(burials, action)
            for expire, values in _by_expiry(plain).items():
                self._store(values, expire, action)
            if versioned:
                self._put_versioned(versioned, action)
        except StoreError as exc:
            if isinstance(exc, ValueTooLargeError) or (type(exc) is StoreError and self._server_error is not None):
                # The server refused a write: don't leave older entries behind.
                self._invalidate([k for it in items for k in it.mkeys], action)
            raise
        if failure is not None:
            raise failure

    def _outdated(self, version: Any, owner: str, states: Iterable[tuple[int, Any, list[str], str | None]]) -> bool:
        """True when an entry of the same object holds a newer version, or its tombstone this version or newer.

        Entries and tombstones of other objects (which may hold a key value this
        object now takes, such as an email address) are never compared with it.
        """
        for state, stored, _recorded, stored_owner in states:
            if stored is None or stored_owner != owner:
                continue
            if state == _ENTRY and is_older(version, stored):
                return True
            if state == _TOMBSTONE and _not_newer(version, stored):
                return True
        return False

    def _put_versioned(self, items: list[_Prepared], action: str) -> None:
        """Write versioned objects with gets/cas so no entry is replaced by an older version.

        Each attempt reads all keys of the pending objects (one ``gets`` per
        server); an object older than what a key holds is dropped (a newer
        writer owns the keys), the others are written key by key with ``cas``
        (``add`` where the key is absent).  A ``cas`` that fails means another
        writer changed the key since it was read: the object is tried again.
        Two writers of different versions therefore converge on the newer one:
        whichever writes second saw, or fails on, the other's write.
        """
        backend = self._backend
        pending = items
        for _attempt in range(CAS_ATTEMPTS):
            keys = [k for it in pending for k in it.mkeys]
            try:
                seen: dict[str, tuple[Any, Any]] = {}
                for _node, _group, result in self._each_node(action, keys, backend.gets_many):
                    seen.update(result)
            except StoreError:
                self._invalidate(keys, action)
                raise
            retry = []
            for it in pending:
                states = [self._inspect(k, seen.get(k, (None, None))[0]) for k in it.mkeys]
                if self._outdated(it.version, it.mkeys[0], states):
                    continue  # a newer version is cached, or this one was deleted
                if self.cleanup_stale_keys:
                    stale = {k for _state, _v, recorded, _owner in states for k in recorded}.difference(it.mkeys)
                    if stale:
                        self._bury([(k, _owned(it.mkeys[0], it.vbytes)) for k in stale], action)
                values = it.values
                assert values is not None
                for mkey in it.mkeys:
                    token = seen.get(mkey, (None, None))[1]
                    node = backend.node_for(mkey)
                    if token is None:
                        done = self._call(action, backend.add, node, mkey, values[mkey], it.expire)
                    else:
                        done = self._call(action, backend.cas, node, mkey, values[mkey], token, it.expire)
                    if not done:
                        retry.append(it)
                        break
            pending = retry
            if not pending:
                return
        with self._counter_lock:
            self.conflicts += len(pending)
        log.warning(
            "stockpyle: %d versioned memcached writes kept conflicting with other writers; invalidated instead",
            len(pending),
        )
        self._bury([(k, None) for it in pending for k in it.mkeys], action)

    def _add_many(self, objs: list[object], action: str) -> list[bool]:
        if not objs:
            return []
        items, failure = self._prepare(objs)
        if failure is not None:
            log.warning("stockpyle: memcached back-fill skipped an object: %s", failure)
        backend = self._backend
        groups = _by_expiry(items)
        if not backend.can_add:
            # a client without add(): back-fill with plain writes (no race protection)
            for expire, values in groups.items():
                self._store(values, expire, action)
            return [it.values is not None for it in items]
        # one pipelined add per server and expiry time for the whole batch
        stored: dict[str, bool] = {}

        def add_group(values: dict[str, bytes], expire: int) -> Callable[[Any, list[str]], dict[str, bool]]:
            return lambda node, group: backend.add_many(node, {k: values[k] for k in group}, expire)

        try:
            for expire, values in groups.items():
                for _node, _group, result in self._each_node(action, values, add_group(values, expire)):
                    stored.update(result)
        except StoreError:
            self._undo([k for k, done in stored.items() if done], action)
            raise
        results = []
        partial: list[str] = []
        for it in items:
            if it.values is None:
                results.append(False)
                continue
            added = [k for k in it.values if stored.get(k)]
            if len(added) == len(it.values):
                results.append(True)
            else:
                # A key was taken (a newer entry, a tombstone, or a concurrent
                # back-fill): don't leave the object under only some keys.
                partial.extend(added)
                results.append(False)
        self._undo(partial, action)
        return results

    def _undo(self, mkeys: list[str], action: str) -> None:
        """Delete keys an add wrote before another key was refused (best effort)."""
        if mkeys:
            try:
                self._remove(mkeys, f"{action} (undoing a partial add)")
            except StoreError as exc:
                log.warning("stockpyle: could not undo a partial memcached add of %d keys: %s", len(mkeys), exc)

    def _invalidate(self, mkeys: list[str], action: str) -> None:
        try:
            self._bury([(k, None) for k in mkeys], f"{action} (invalidating after a failed write)")
        except StoreError as exc:
            log.warning("stockpyle: could not invalidate %d memcached keys after a failed write: %s", len(mkeys), exc)
            if not isinstance(exc, StoreUnavailableError):
                # e.g. a refused tombstone: fall back to deleting
                with contextlib.suppress(StoreError):
                    self._remove(mkeys, f"{action} (invalidating after a failed write)")

    def _delete_many(self, objs: list[object], action: str) -> None:
        if not objs:
            return
        prepared = [self._object_mkeys(obj) for obj in objs]
        versions = [
            _owned(mkeys[0], _encode_version(version_of(obj))) if self._backend.can_cas and mkeys else None
            for mkeys, obj in zip(prepared, objs, strict=True)
        ]
        stale, unreadable = self._stale(prepared, action)
        burials: dict[str, bytes | None] = dict.fromkeys(stale)
        for mkeys, version in zip(prepared, versions, strict=True):
            for mkey in mkeys:
                burials[mkey] = version
        # every reachable server writes its tombstones even when another could not be read
        self._bury(burials.items(), action)
        if unreadable is not None:
            raise unreadable

    # -- lifecycle ------------------------------------------------------

    def release(self) -> None:
        """Close the client's connections (also a client passed in with ``client=``).

        The store stays usable: pymemcache reconnects on the next operation.
        """
        try:
            self._backend.close()
        except self._driver_errors as exc:
            log.debug("stockpyle: error while closing memcached client: %r", exc)
