"""The key-value engine under every networked store: :class:`KeyValueStore`.

:class:`~stockpyle.stores.MemcacheStore` and :class:`~stockpyle.stores.RedisStore`
are this engine plus a driver (:mod:`stockpyle.stores.drivers`).  The engine
holds every algorithm; a driver only moves bytes.

Keys
    Every stockpyle key becomes one backend key of the form
    ``{prefix}:{namespace}:{ClassName}.{generation}:{digest}``, where
    ``digest`` is a 160-bit BLAKE2b hash of :func:`stockpyle.keys.encode_key`
    and ``generation`` is the class's generation token (8 hex digits, shared
    by every process through one generation key per class; see
    :meth:`KeyValueStore.invalidate_class`).  Keys are therefore always valid
    (at most ~230 ASCII characters, no whitespace or control characters)
    whatever the key values are, and stay readable in dumps of the backend.

Entries
    Each entry is an envelope from :class:`stockpyle.serializers.Codec` whose
    payload is::

        length of section (4 bytes) | section | serialized object
        section = backend keys of the object, space separated [ newline | version as JSON ]

    The key list lets a later ``put`` find and delete the entries an object
    occupied under key values that have since changed (stale alternate
    keys), without deserializing the old object.  The list is kept short, as
    it is in every entry of the object (a backend key is up to ~230 bytes,
    often more than a small object): when all the keys share the first one's
    part before its digest (one class, the usual case), each is written as
    its digest alone and read under the prefix of the key the entry is stored
    under; and an unversioned object with one key has nothing to find there,
    so its list is empty, read as the key the entry is stored under.

    The version (present when the object's class has one, see
    :func:`stockpyle.keys.version_of`) lets a ``put`` compare versions
    without deserializing the object; it is JSON, so reading it never runs
    code even in an unsigned store.

Lease stubs
    An empty value is never an entry: it is a lease stub (see
    :mod:`stockpyle.stores.drivers`, "Leases"), which every read treats as
    absent and leaves in place.

Tombstones
    A tombstone is an envelope whose payload is four 0xFF bytes (a section
    length no key list has) followed by the owner's first key and the JSON
    version, when there is one.  ``delete`` writes tombstones with a short
    lifetime (``tombstone_lifetime``) instead of deleting, so a reader that
    read the system of record before the delete cannot back-fill (``add``) the
    old object; reads treat a tombstone as a miss; ``put`` replaces it unless
    the consistency rules say otherwise.  Tombstones are signed like entries.

Consistency protocol (the rules are :mod:`stockpyle.consistency`; see ``docs/consistency.rst``)
    * ``add``/``batch_add`` (the back-fill of a :class:`~stockpyle.ChainedStore`)
      use the backend's atomic add for each key of an object, so they never
      replace a newer entry or a tombstone.  When some of an object's keys are
      added and another is refused, the added ones are deleted again.
    * ``put`` of a versioned object reads its keys with compare-and-set tokens
      and writes with compare-and-set (add for absent keys), retrying on
      conflicts, so an entry is never replaced by an older version; after
      :data:`CAS_ATTEMPTS` conflicting attempts the object's keys are
      invalidated instead (a miss is always safe).
    * Every entry's lifetime is capped by ``max_lifetime``, which bounds how
      long an invalidation that could not reach the backend can leave it stale.

Every multi-step operation is written once, as a *plan*: a generator that
yields the driver calls it needs (``("get_many", (keys,))``) and receives their
results, so the same algorithm can be driven by a synchronous executor (here)
or an asynchronous one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import math
import re
import secrets
import struct
import threading
import time
from collections.abc import Generator, Hashable, Iterable, Mapping, Sequence
from time import perf_counter
from typing import Any, ClassVar, Final, TypeVar

from ..consistency import ABSENT_SLOT, Slot, SlotKind, put_allowed
from ..exceptions import (
    ConfigurationError,
    ObjectError,
    SerializationError,
    SignatureError,
    StockpyleError,
    StoreError,
    StoreUnavailableError,
    ValueTooLargeError,
)
from ..keys import Key, class_name, encode_key, key_model, lookup_key, lookup_keys, object_keys, version_of
from ..lifetimes import LifetimeCallback, LifetimePolicy, seconds_remaining
from ..serializers import Codec, HMACSigner, JSONSerializer, Serializer, Signer
from ..stats import Latency, StoreStats
from .base import MISS, AsyncBaseStore, BaseStore, KeyDict, Lease, check_storable, check_tombstone_lifetime
from .drivers import AsyncKVDriver, KVDriver, LeaseRead, LeaseStatus, supports_leases, supports_recache

__all__ = [
    "CAS_ATTEMPTS",
    "DEFAULT_GENERATION_CHECK",
    "DEFAULT_MAX_LIFETIME",
    "ITEM_OVERHEAD",
    "REPLAY_TOLERANCE",
    "AsyncKeyValueStore",
    "KeyValueEngine",
    "KeyValueStore",
    "Op",
    "Plan",
]

T = TypeVar("T")
log = logging.getLogger("stockpyle.kv")

#: Default cap on entry lifetimes (one day): no entry lives forever unless asked.
DEFAULT_MAX_LIFETIME: Final = 86_400
#: Attempts of a version-checked put before it gives up and invalidates.
CAS_ATTEMPTS: Final = 8
#: Default seconds between two checks of the class generations a store uses.
DEFAULT_GENERATION_CHECK: Final = 1.0
#: Bytes of a backend's item size taken by its own header: memcached stores an
#: item header (and the key) in the same slab item as the value; measured on
#: memcached 1.6 the overhead is under 64 bytes.
ITEM_OVERHEAD: Final = 64

_SAFE_PART: Final = re.compile(r"[A-Za-z0-9_.\-]{0,64}\Z")
_CLASS_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_]")
_TOKEN: Final = re.compile(r"[0-9a-f]{8}")
_KEYS_LEN: Final = 4
_KEY_CACHE_LIMIT: Final = 20_000
#: Section length that marks a tombstone (no real key list is 4 GiB long).
_TOMB_MARK: Final = 0xFFFFFFFF
_TOMB_PREFIX: Final = _TOMB_MARK.to_bytes(_KEYS_LEN, "big")
#: First byte of the payload of every entry and tombstone written since stockpyle 1.0: a
#: stamp follows with the write time (ms) and the expiry (unix seconds, 0 = never).  Earlier
#: payloads start with a section length, whose first byte is 0x00 (or 0xFF for tombstones).
_LAYOUT: Final = 2
_STAMP: Final = struct.Struct(">BQI")
_STAMPED: Final = _STAMP.size
#: In an unsigned stamped entry (5 header bytes, the stamp): where the section
#: length is, how to read it, and where the section starts.
_SECTION: Final = 5 + _STAMPED
_LENGTH: Final = struct.Struct(">I").unpack_from
_LENGTH_BYTES: Final = struct.Struct(">I").pack
_BODY: Final = _SECTION + _KEYS_LEN
#: Clock difference tolerated between writers and readers when a signing store
#: checks the signed times of an entry (seconds).
REPLAY_TOLERANCE: Final = 2.0
#: Keys whose latest write time a signing store remembers (the most recent ones).
_SEEN_LIMIT: Final = 20_000
#: Lifetimes up to this long are relative in every backend (memcached reads
#: longer ones as absolute unix times, so those are converted per write).
_RELATIVE_EVERYWHERE: Final = 30 * 24 * 60 * 60
#: Versions are JSON (tagged types), never pickles: reading one cannot run code.
_VERSIONS: Final = JSONSerializer()

#: One driver call requested by a plan: (method name, arguments[, action for messages]).
Op = tuple[Any, ...]
#: A multi-step operation: yields driver calls, receives their results, returns ``T``.
Plan = Generator[Op, Any, T]


def encode_version(version: Any) -> bytes | None:
    """JSON bytes of a version, or ``None`` (unversioned, or a type JSON cannot carry)."""
    if version is None:
        return None
    try:
        return _VERSIONS.dumps(version)
    except (TypeError, ValueError):
        log.warning("stockpyle: version %r cannot be recorded in a key-value store; writes are not version-checked",
                    version)  # fmt: skip
        return None


def decode_version(data: bytes) -> Any:
    """The version recorded as JSON bytes (``None`` if empty or undecodable)."""
    if not data:
        return None
    try:
        return _VERSIONS.loads(data)
    except ValueError:
        return None


def key_part(text: Any, what: str, store_name: str) -> str:
    """A readable, backend-safe form of ``prefix``/``namespace`` (hashed if needed)."""
    if not isinstance(text, str):
        raise ConfigurationError(f"{store_name} {what} must be a str; got {text!r}")
    if _SAFE_PART.match(text):
        return text
    # "~" never appears in a readable part, so a hashed part cannot equal one
    return "~" + hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


def _owned(owner: str, version: bytes | None) -> bytes | None:
    """A tombstone's version record: the owner's first key and the version JSON (``None`` when unversioned)."""
    return None if version is None else owner.encode("ascii") + b"\n" + version


def _key_list(mkeys: list[str]) -> bytes:
    """An entry's list of its object's keys: digests alone when the keys share a prefix (see the module docs)."""
    first = mkeys[0]
    cut = first.rindex(":") + 1
    prefix = first[:cut]
    if all(mkey.startswith(prefix) for mkey in mkeys):
        return " ".join([mkey[cut:] for mkey in mkeys]).encode("ascii")
    return " ".join(mkeys).encode("ascii")


def _read_key_list(mkey: str, names: str) -> list[str]:
    """The keys an entry read under ``mkey`` records (:func:`_key_list`'s, or empty: ``mkey`` alone)."""
    if not names:
        return [mkey]
    prefix = mkey[: mkey.rindex(":") + 1]
    return [name if ":" in name else prefix + name for name in names.split(" ")]


def _payload(written: int, expires: int, section: bytes, body: bytes) -> bytes:
    """An entry before sealing: the stamp (layout, write time, expiry), the key record and the serialized object."""
    return b"".join((_STAMP.pack(_LAYOUT, written, expires), _LENGTH_BYTES(len(section)), section, body))


def check_max_lifetime(max_lifetime: Any) -> float | None:
    """Validate ``max_lifetime`` (seconds, a timedelta, or ``None``); return seconds or ``None``.

    :raises ConfigurationError: for anything else.
    """
    if max_lifetime is None:
        return None
    try:
        seconds = seconds_remaining(max_lifetime, 0.0)
    except Exception:  # noqa: BLE001 - reported as a configuration error below
        seconds = None
    if isinstance(max_lifetime, (bool, _dt.datetime)) or seconds is None or not seconds > 0:
        raise ConfigurationError(
            f"max_lifetime must be a positive number of seconds or a timedelta (or None); got {max_lifetime!r}"
        )
    return seconds


class _Prepared:
    """One object ready to be written: its keys, envelopes, lifetime and version."""

    __slots__ = ("mkeys", "ttl", "values", "vbytes", "version", "written")

    def __init__(self, mkeys: list[str], ttl: Hashable | None, version: Any, vbytes: bytes | None) -> None:
        self.mkeys = mkeys
        #: the write time (ms) stamped into its entries
        self.written = 0
        #: the driver's lifetime argument; None: already expired (store nothing)
        self.ttl = ttl
        self.version = version
        self.vbytes = vbytes
        #: envelope per key; None when the object is not to be written
        self.values: dict[str, bytes] | None = None


def _by_ttl(items: Iterable[_Prepared]) -> dict[Hashable, dict[str, bytes]]:
    """The envelopes of the storable ``items``, grouped by lifetime (one write per group)."""
    groups: dict[Hashable, dict[str, bytes]] = {}
    for it in items:
        if it.values is not None and it.ttl is not None:
            groups.setdefault(it.ttl, {}).update(it.values)
    return groups


class KeyValueEngine:
    """Everything a key-value store does but its I/O: keys, entries, rules, plans.

    :class:`KeyValueStore` drives the plans synchronously and
    :class:`AsyncKeyValueStore` with ``await``; both take the same arguments.

    :param driver: a :class:`~stockpyle.stores.drivers.KVDriver`.
    :param polymorphic: also index objects under their storable base classes.
    :param lifetime_cb: ``obj -> lifetime`` in this store.
    :param prefix: first part of every backend key (default ``"sp"``).
    :param namespace: second part, e.g. a code or schema version: stores with
        different namespaces never see each other's entries.
    :param serializer: a :class:`~stockpyle.serializers.Serializer`
        (default :class:`~stockpyle.serializers.PickleSerializer`).
    :param secret: sign entries with HMAC-SHA256 under this secret (``bytes``,
        ``str`` or a ``{key_id: secret}`` keyring).
    :param signer: a ready :class:`~stockpyle.serializers.Signer` instead of ``secret``.
    :param cleanup_stale_keys: on ``put``/``delete``, read the entries under the
        object's keys first and delete the keys they recorded that the object
        no longer has (one extra round trip, skipped for objects with a single
        key).  Turn off only if key attributes never change.
    :param tombstone_lifetime: seconds a deleted key keeps a tombstone that
        refuses back-fills; ``0`` deletes plainly.
    :param max_lifetime: cap on the lifetime of every entry (default one day);
        ``None`` lets entries without a lifetime live until evicted.
    :raises ConfigurationError: for invalid arguments.

    :ivar rejected: entries that failed verification or could not be decoded;
        each was treated as a miss and deleted.
    :ivar conflicts: version-checked writes that kept conflicting with other
        writers for :data:`CAS_ATTEMPTS` attempts and invalidated the object's
        keys instead.
    """

    # The attributes every get and put reads are slots.  A store has ~40
    # attributes, more than the 30 CPython keeps in an instance's shared-key
    # values; past that every attribute load goes through the instance's own
    # dict.  With these in slots the rest fit in the shared keys again.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "_cap_is_fixed",
        "_driver",
        "_errors",
        "_fast_stamped",
        "_fixed_cap",
        "_generations_due",
        "_get",
        "_guard_replays",
        "_item_limit",
        "_lease_ttls",
        "_leases",
        "_max_seconds",
        "_mkeys",
        "_raw_loads",
        "_seen",
        "_stale_window",
        "_stockpyle_stats",
        "_timers",
        "codec",
    )

    supports_expiry = True
    supports_add = True
    supports_class_invalidation = True
    supports_leases = True
    is_cache = True
    #: Name used in messages about this store's arguments.
    store_name: ClassVar[str] = "KeyValueStore"
    # set by the store base class (BaseStore or AsyncBaseStore) the engine is mixed with
    polymorphic: bool
    lifetimes: LifetimePolicy
    _stockpyle_stats: StoreStats

    def __init__(
        self,
        driver: KVDriver | AsyncKVDriver,
        *,
        polymorphic: bool = False,
        lifetime_cb: LifetimeCallback | None = None,
        prefix: str = "sp",
        namespace: str = "",
        serializer: Serializer | None = None,
        secret: bytes | str | Mapping[int, bytes | str] | None = None,
        signer: Signer | None = None,
        cleanup_stale_keys: bool = True,
        tombstone_lifetime: float = 5.0,
        max_lifetime: Any = DEFAULT_MAX_LIFETIME,
        generation_check: float = DEFAULT_GENERATION_CHECK,
        tombstone_limit: float = float("inf"),
    ) -> None:
        super().__init__(polymorphic=polymorphic, lifetime_cb=lifetime_cb)  # type: ignore[call-arg]
        if (
            isinstance(generation_check, bool)
            or not isinstance(generation_check, (int, float))
            or not 0 < generation_check < math.inf
        ):
            raise ConfigurationError(f"generation_check must be a positive number of seconds; got {generation_check!r}")
        self.generation_check = float(generation_check)
        if secret is not None and signer is not None:
            raise ConfigurationError(f"pass either secret= or signer= to {self.store_name}, not both")
        self.prefix = prefix
        self.namespace = namespace
        self._head = (
            f"{key_part(prefix, 'prefix', self.store_name)}:{key_part(namespace, 'namespace', self.store_name)}:"
        )
        if signer is None and secret is not None:
            signer = HMACSigner(secret)
        self.codec = Codec(serializer, signer)
        # inline decoding of unsigned stamped entries (see _decode): the codec's
        # 5-byte header and the layout byte; None for a signing store, whose
        # entries always go through the codec (an unsigned one is refused there)
        self._fast_stamped = None if self.codec.signed else self.codec.header + bytes((_LAYOUT,))
        # signed entries carry signed write times and expiries: replays of old ones are refused
        self._guard_replays = self.codec.signed
        self._raw_loads = self.codec.serializer.loads
        self.cleanup_stale_keys = bool(cleanup_stale_keys)
        self.tombstone_lifetime = check_tombstone_lifetime(tombstone_lifetime, tombstone_limit)
        self.max_lifetime = max_lifetime
        self._max_seconds = check_max_lifetime(max_lifetime)
        self.rejected = 0
        self.conflicts = 0
        self._counter_lock = threading.Lock()
        # backend key -> the latest write time (ms) of an entry or tombstone this
        # process wrote or read there: a signing store never goes back behind it
        self._seen: dict[str, int] = {}
        self._mkeys: dict[Key, str] = {}
        # the latency window of each operation (see KeyValueStore's operations)
        self._timers: dict[str, Latency] = {}
        self._class_parts: dict[type, str] = {}
        # class generations (see invalidate_class): each storable class has a
        # token in the backend; a key's class part carries the tokens of its
        # class and storable bases, so a new token hides every older entry
        self._tokens: dict[type, tuple[str, float]] = {}  # class -> (token, unix time it was set)
        self._effective: dict[type, str] = {}  # key class -> the class part used in keys
        # monotonic time of the next check of the known tokens (a class's first use reads its own)
        self._generations_due = time.monotonic() + self.generation_check
        self._generation_lock = threading.Lock()
        self._bad_generations: dict[str, Any] = {}
        self._driver: Any = driver
        self._errors = driver.errors
        self._get = driver.get
        self._leases = supports_leases(driver)
        self._tomb_ttl: Hashable | None = None
        if self.tombstone_lifetime:
            self._tomb_ttl = driver.ttl(max(driver.min_lifetime, self.tombstone_lifetime))
        # the capped lifetime of entries that have none, or a longer one: fixed
        # when it is short enough to be relative in every backend, else per write
        self._cap_is_fixed = self._max_seconds is None or self._max_seconds <= _RELATIVE_EVERYWHERE
        self._fixed_cap = driver.ttl(self._max_seconds) if self._cap_is_fixed else None
        self._item_limit = None if driver.max_item_size is None else driver.max_item_size - ITEM_OVERHEAD
        # seconds entries are kept past their lifetime as stale values (see keep_stale_for)
        self._stale_window = 0.0
        self._lease_ttls: dict[float, Hashable] = {}  # lease seconds -> the driver's lifetime for it

    @property
    def driver(self) -> Any:
        """The driver this store moves its bytes through."""
        return self._driver

    @property
    def can_refresh(self) -> bool:
        """Whether leases here can elect one refresher of a present value (``Stampede.refresh_ahead``,
        ``Stampede.serve_stale_for``): the driver takes ``lease_get(..., recache=...)``."""
        return supports_recache(self._driver)

    @property
    def stale_window(self) -> float:
        """Seconds entries written here are kept past their lifetime as stale values (see :meth:`keep_stale_for`)."""
        return self._stale_window

    def keep_stale_for(self, seconds: float) -> None:
        """Keep entries ``seconds`` past their lifetime, as stale values a lease read can serve.

        A :class:`~stockpyle.ChainedStore` calls this on its lease layer with
        its ``Stampede.serve_stale_for``; the window only grows (the longest
        one asked for wins).  Entries written from now on live that much
        longer in the backend; their envelope keeps the real lifetime, so
        :meth:`lease_get` tells a stale value from a current one.  Plain reads
        (``get``, ``batch_get``) keep serving such an entry until the window
        ends, as they would a current one.

        :raises ConfigurationError: for a negative or infinite window, or a
            backend whose leases cannot elect a refresher.
        """
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
            raise ConfigurationError(f"a stale window is a finite number of seconds >= 0; got {seconds!r}")
        if seconds and not self.can_refresh:
            raise ConfigurationError(
                f"{self.describe()} cannot keep stale values: its driver ({type(self._driver).__name__}) elects no "
                f"refresher of a present value (no lease_get recache)"
            )
        self._stale_window = max(self._stale_window, float(seconds))

    def describe(self) -> str:
        return str(self._driver.describe())

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.describe()} namespace={self.namespace!r} polymorphic={self.polymorphic}"
            f" signed={self.codec.signed}>"
        )

    # -- keys -----------------------------------------------------------

    def _readable(self, klass: type) -> str:
        part = self._class_parts.get(klass)
        if part is None:
            part = _CLASS_UNSAFE.sub("_", klass.__qualname__)[-48:]
            self._class_parts[klass] = part
        return part

    def _class_part(self, klass: type) -> str:
        """``ClassName.token`` for keys of ``klass``: the token reflects its generation and its bases'."""
        part = self._effective.get(klass)
        if part is None:
            bases = key_model(klass).bases
            tokens = self._tokens
            if any(base not in tokens for base in bases):
                self._learn(bases)
            joined = "".join(tokens[base][0] for base in bases)
            token = joined if len(bases) == 1 else hashlib.blake2b(joined.encode("ascii"), digest_size=4).hexdigest()
            part = self._effective[klass] = f"{self._readable(klass)}.{token}"
        return part

    def storage_key(self, key: Key) -> str:
        """The backend key of one stockpyle key (see the module docs for its form).

        The first key of a class a process uses costs one round trip, to learn
        the class's generation (see :meth:`invalidate_class`).
        """
        mkey = self._mkeys.get(key)
        if mkey is None:
            digest = hashlib.blake2b(encode_key(key).encode("utf-8", "surrogatepass"), digest_size=20).hexdigest()
            mkey = f"{self._head}{self._class_part(key[0])}:{digest}"
            mkeys = self._mkeys
            if len(mkeys) >= _KEY_CACHE_LIMIT:
                mkeys.clear()  # a plain bound: recomputing a key costs a few microseconds
            mkeys[key] = mkey
        return mkey

    # -- class generations ------------------------------------------------

    def _generation_key(self, klass: type) -> str:
        digest = hashlib.blake2b(class_name(klass).encode("utf-8"), digest_size=8).hexdigest()
        return f"{self._head}~gen:{self._readable(klass)}:{digest}"

    def _read_generation(self, gkey: str, data: Any) -> tuple[str, float] | None:
        """The token and change time a generation key holds; None if absent or not verifiable (counted)."""
        if data is None or data == b"":  # empty: a lease stub, i.e. absent
            return None
        try:
            if type(data) is not bytes:
                raise SerializationError(f"client returned {type(data).__name__}, not bytes")
            token, _sep, changed = self.codec.open(gkey, data).decode("ascii").partition(":")
            if _TOKEN.fullmatch(token):
                return token, float(changed)
            raise SerializationError(f"{token!r} is not a generation token")
        except (SerializationError, UnicodeDecodeError, ValueError) as exc:
            if self._bad_generations.get(gkey) != data:  # counted and logged once per value
                self._bad_generations[gkey] = data
                with self._counter_lock:
                    self.rejected += 1
                log.warning("stockpyle: rejected the class generation %s (its entries are unreachable here): %s",
                            gkey, exc)  # fmt: skip
            return None

    def _plan_generations(self, classes: Sequence[type], action: str) -> Plan[dict[type, tuple[str, float]]]:
        """The generation of each class; a class that has none (never used, or evicted) gets a new one."""
        keys = {self._generation_key(klass): klass for klass in classes}
        found = yield ("get_many", (list(keys),), action)
        out: dict[type, tuple[str, float]] = {}
        resealed: dict[str, bytes] = {}
        for gkey, klass in keys.items():
            data = found.get(gkey)
            known = self._read_generation(gkey, data)
            if known is not None:
                out[klass] = known
                if self.codec.sealed_with_old_key(data):
                    # keys are being rotated: re-sign, so that stores which know only
                    # the new key keep reading this generation once the old one is gone
                    resealed[gkey] = self.codec.seal(gkey, self.codec.open(gkey, data))
        if resealed:
            try:
                yield ("set_many", (resealed, self._fixed_generation_ttl()), action)
            except StoreError as exc:
                log.debug("stockpyle: could not re-sign class generations: %s", exc)
        missing = {gkey: klass for gkey, klass in keys.items() if klass not in out}
        if missing:
            # An absent generation means a fresh token, never the old one: after an
            # eviction every entry of the class is then unreachable, which is safe.
            fresh = {gkey: (secrets.token_hex(4), 0.0) for gkey in missing}
            values = {gkey: self.codec.seal(gkey, f"{token}:{changed}".encode("ascii")) for gkey, (token, changed)
                      in fresh.items()}  # fmt: skip
            if self._driver.can_add:
                stored, error = yield ("add_many", (values, self._fixed_generation_ttl()), action)
                if error is not None:
                    raise self._mapped(error, action)
            else:
                # a client without add: two processes may both create one; the
                # last write wins and the other's few entries become unreachable
                yield ("set_many", (values, self._fixed_generation_ttl()), action)
                stored = set(values)
            for gkey in stored:
                out[missing[gkey]] = fresh[gkey]
            lost = [gkey for gkey in missing if gkey not in stored]
            if lost:  # another process added first: take its token
                again = yield ("get_many", (lost,), action)
                for gkey in lost:
                    known = self._read_generation(gkey, again.get(gkey))
                    out[missing[gkey]] = known if known is not None else fresh[gkey]
        return out

    def _fixed_generation_ttl(self) -> Hashable:
        # a generation lives as long as the longest entry may: when it expires, a
        # fresh token replaces it, which only hides entries that are ending anyway
        return self._cap_ttl()

    def _adopt(self, found: Mapping[type, tuple[str, float]]) -> None:
        with self._generation_lock:
            changed = any(self._tokens.get(klass, (None,))[0] != token for klass, (token, _t) in found.items())
            self._tokens.update(found)
            if changed:
                self._effective.clear()
                self._mkeys.clear()

    def _learn(self, classes: Sequence[type]) -> None:
        """Learn the generations of ``classes`` (the synchronous store reads them on the spot)."""
        raise NotImplementedError  # each front defines it

    def _needed_classes(self, klasses: Iterable[type]) -> list[type]:
        """The classes whose generation a key of each of ``klasses`` needs and this process does not know."""
        tokens = self._tokens
        needed: dict[type, None] = {}
        for klass in klasses:
            for base in key_model(klass).bases:
                if base not in tokens:
                    needed[base] = None
        return list(needed)

    def _key_classes(self, objs: Iterable[object]) -> set[type]:
        """The classes of every key ``objs`` are stored under."""
        out: set[type] = set()
        for obj in objs:
            model = key_model(type(obj))
            out.update(model.bases if self.polymorphic else (model.klass,))
        return out

    def _new_generation(self, klass: type) -> tuple[str, dict[str, bytes], tuple[str, float]]:
        """The key, value and (token, time) of a fresh generation for ``klass``."""
        key_model(klass)  # refuses classes that cannot be stored
        gkey = self._generation_key(klass)
        token, changed = secrets.token_hex(4), time.time()
        return gkey, {gkey: self.codec.seal(gkey, f"{token}:{changed}".encode("ascii"))}, (token, changed)

    def _class_refused(self, obj: object, now: float) -> bool:
        """Whether an add of ``obj`` comes too soon after a class invalidation of its class or a base."""
        horizon = now - max(self.tombstone_lifetime, self._driver.min_lifetime)
        tokens = self._tokens
        return any(tokens.get(base, ("", 0.0))[1] > horizon for base in key_model(type(obj)).bases)

    def _object_mkeys(self, obj: object) -> list[str]:
        check_storable(obj)
        cached = self._mkeys.get
        mkey = self.storage_key
        out = [cached(k) or mkey(k) for k in object_keys(obj, self.polymorphic)]
        return out if len(out) == len(set(out)) else list(dict.fromkeys(out))

    # -- entries --------------------------------------------------------

    def _reject(self, mkey: str, exc: Exception, rejected: list[str]) -> Any:
        with self._counter_lock:
            self.rejected += 1
        log.warning("stockpyle: rejected %s entry %s (deleted, treated as a miss): %s", self._driver.backend, mkey, exc)
        rejected.append(mkey)
        return MISS

    def _decode(self, mkey: str, data: Any, rejected: list[str]) -> Any:
        """The object in an entry, or MISS (a tombstone, or an entry rejected: its key is added to ``rejected``)."""
        fast = self._fast_stamped
        if fast is not None and type(data) is bytes and data.startswith(fast):
            # an unsigned, stamped entry of our serializer: the common case, decoded inline
            length = _LENGTH(data, _SECTION)[0]
            if length == _TOMB_MARK:
                return MISS
            try:
                return self._raw_loads(data[_BODY + length :])
            except Exception as exc:  # noqa: BLE001 - corrupt data of any kind is a rejected entry
                return self._reject(mkey, SerializationError(f"cannot deserialize entry: {exc!r}"), rejected)
        if data == b"":
            # an empty value is a lease stub (see stockpyle.stores.drivers): absent, and left in place
            return MISS
        try:
            if type(data) is not bytes:
                raise SerializationError(f"client returned {type(data).__name__}, not bytes (is a serde configured?)")
            start, written, expires = self._open(mkey, data)
            length = int.from_bytes(data[start : start + _KEYS_LEN], "big")
            if length == _TOMB_MARK:
                self._saw(mkey, written)
                return MISS
            if self._guard_replays:
                self._check_fresh(mkey, written, expires)
            return self.codec.loads(data[start + _KEYS_LEN + length :])
        except SerializationError as exc:
            return self._reject(mkey, exc, rejected)

    def _open(self, mkey: str, data: bytes) -> tuple[int, int | None, int]:
        """Verify an envelope; return where its section length starts, its write time (ms) and expiry.

        Entries written before the stamp existed have no write time (``None``).

        :raises SerializationError: for an envelope that fails verification.
        """
        start = self.codec.payload_offset(mkey, data)
        if len(data) > start and data[start] == _LAYOUT:
            if len(data) < start + _STAMPED + _KEYS_LEN:
                raise SerializationError(f"entry for {mkey!r} is truncated")
            _layout, written, expires = _STAMP.unpack_from(data, start)
            return start + _STAMPED, written, expires
        return start, None, 0

    def _saw(self, mkey: str, written: int | None) -> None:
        """Remember the write time of an entry or tombstone read or written under ``mkey`` (signing stores)."""
        if written is None or not self._guard_replays:
            return
        seen = self._seen
        if seen.get(mkey, -1) < written:
            if len(seen) >= _SEEN_LIMIT:
                seen.clear()  # a plain bound: forgetting only weakens the check for a while
            seen[mkey] = written

    def _saw_written(self, items: Iterable[_Prepared]) -> None:
        if self._guard_replays:
            for it in items:
                if it.values is not None:
                    for mkey in it.mkeys:
                        self._saw(mkey, it.written)

    def _check_fresh(self, mkey: str, written: int | None, expires: int) -> None:
        """Refuse a signed entry that cannot be current: a replay of an old one.

        The signature covers the write time and the expiry, so they are the
        writer's.  Refused: entries without them (written by a release before
        stockpyle 1.0), expired ones, ones older than ``max_lifetime``, and ones
        written before an entry or a tombstone this process has seen under the
        same key (each with :data:`REPLAY_TOLERANCE` seconds of clock skew).

        :raises SignatureError: for such an entry.
        """
        if written is None:
            raise SignatureError(f"entry for {mkey!r} carries no signed write time (written before stockpyle 1.0)")
        now = time.time()
        if expires and expires + self._stale_window + REPLAY_TOLERANCE < now:
            raise SignatureError(f"entry for {mkey!r} expired at {expires}: a replayed entry")
        if self._max_seconds is not None and written / 1000 + self._max_seconds + REPLAY_TOLERANCE < now:
            raise SignatureError(f"entry for {mkey!r} is older than max_lifetime: a replayed entry")
        seen = self._seen.get(mkey)
        if seen is not None and written < seen - REPLAY_TOLERANCE * 1000:
            raise SignatureError(
                f"entry for {mkey!r} was written before a newer write or delete of that key: a replayed entry"
            )
        self._saw(mkey, written)

    def _inspect(self, mkey: str, data: Any) -> tuple[Slot, list[str]]:
        """The consistency state of an entry and the keys it records, without deserializing its object.

        The owner is the first backend key of the object the entry (or the
        tombstone) belongs to: versions are per object, so they are only ever
        compared with entries of the same owner.
        """
        if data is None or data == b"":  # empty: a lease stub, i.e. absent
            return ABSENT_SLOT, []
        if type(data) is not bytes:
            return Slot(SlotKind.UNREADABLE), []
        try:
            start, written, _expires = self._open(mkey, data)
        except SerializationError:
            return Slot(SlotKind.UNREADABLE), []
        self._saw(mkey, written)
        length = int.from_bytes(data[start : start + _KEYS_LEN], "big")
        start += _KEYS_LEN
        if length == _TOMB_MARK:
            owner, newline, version = data[start:].partition(b"\n")
            if not newline:
                return Slot(SlotKind.TOMBSTONE), []
            return Slot(SlotKind.TOMBSTONE, owner.decode("ascii", "replace"), decode_version(version)), []
        names, newline, version = data[start : start + length].partition(b"\n")
        try:
            recorded = _read_key_list(mkey, names.decode("ascii"))
        except UnicodeDecodeError:
            recorded = []
        first = recorded[0] if recorded else None
        return Slot(SlotKind.ENTRY, first, decode_version(version) if newline else None), recorded

    # -- lifetimes ------------------------------------------------------

    def _cap_ttl(self) -> Hashable:
        return self._fixed_cap if self._cap_is_fixed else self._driver.ttl(self._max_seconds)

    def _ttl_for(self, obj: object, now: float) -> tuple[Hashable | None, int]:
        """The driver's lifetime for ``obj`` and its expiry (unix seconds, 0: never).

        Its lifetime is capped at ``max_lifetime``; ``None`` means already expired.
        """
        cap = self._max_seconds
        remaining = None if self.lifetimes.trivial else seconds_remaining(self.lifetimes.lifetime_for(obj), now)
        window = self._stale_window  # the backend keeps the entry that much longer, as a stale value
        if remaining is None or (cap is not None and remaining > cap):
            if window and cap is not None:
                return self._driver.ttl(cap + window), math.ceil(now + cap)
            return self._cap_ttl(), 0 if cap is None else math.ceil(now + cap)
        if remaining <= 0:
            return None, 0
        return self._driver.ttl(remaining + window), math.ceil(now + remaining)

    def _stamp(self, now: float, expires: int) -> bytes:
        return _STAMP.pack(_LAYOUT, int(now * 1000), expires)

    # -- preparing writes (everything that can fail because of the caller, before any I/O)

    def _prepare(self, objs: list[object]) -> tuple[list[_Prepared], ObjectError | None]:
        """Encode every object.

        :returns: the prepared objects (``values`` is ``None`` for one that is
            not to be written: already expired, unserializable or too large)
            and the first error to report.
        """
        now = time.time()
        keyed = [(self._object_mkeys(obj), obj, self._ttl_for(obj, now)) for obj in objs]
        codec = self.codec
        limit = self._item_limit
        can_cas = self._driver.can_cas
        failure: ObjectError | None = None
        written = int(now * 1000)
        out = []
        for mkeys, obj, (ttl, expires) in keyed:
            version = version_of(obj) if can_cas else None
            vbytes = None if version is None else encode_version(version)
            item = _Prepared(mkeys, ttl, None if vbytes is None else version, vbytes)
            out.append(item)
            if ttl is None:  # already expired: store nothing, drop what is there
                continue
            try:
                body = codec.dumps(obj)
            except SerializationError as exc:
                exc.store, exc.action = self, "serialize"
                failure = failure or exc
                continue
            if vbytes is not None:
                section = _key_list(mkeys) + b"\n" + vbytes
            else:  # an unversioned object's one key is the key its entry is read under
                section = b"" if len(mkeys) == 1 else _key_list(mkeys)
            payload = _payload(written, expires, section, body)
            item.written = written
            values: dict[str, bytes] = {}
            for mkey in mkeys:
                value = codec.seal(mkey, payload)
                if limit is not None and len(value) + len(mkey) > limit:
                    failure = failure or ValueTooLargeError(
                        f"{type(obj).__qualname__} object is {len(value)} bytes serialized; {self._driver.backend}"
                        f" accepts at most about {limit} bytes per item (max_item_size="
                        f"{self._driver.max_item_size})",
                        store=self,
                        action="put",
                    )
                    break
                values[mkey] = value
            else:
                item.values = values
        return out, failure

    def _prepare_single(self, obj: object) -> tuple[str, bytes, Hashable, int] | None:
        """The one entry of the most common write, prepared without the general plan.

        The object has one key and no version the backend checks, and is to
        be stored (not yet expired, serializable, small enough): its entry is
        then the whole write, with no old keys to look for and nothing to
        bury.  The entry is exactly what :meth:`_prepare` builds.

        :returns: ``(backend key, envelope, driver lifetime, write time in
            ms)``, or ``None`` for any other object (:meth:`_prepare` and
            :meth:`_plan_put` handle it, including its errors).
        """
        if obj is None:
            return None
        model = key_model(type(obj))
        if len(model.specs) != 1 or (self.polymorphic and len(model.bases) > 1):
            return None
        if model.version_attr is not None and self._driver.can_cas:
            return None
        key = model.keys_of(obj)[0]
        mkey = self._mkeys.get(key) or self.storage_key(key)
        now = time.time()
        cap = self._max_seconds
        if self._cap_is_fixed and not self._stale_window and self.lifetimes.trivial:
            # every entry lives max_lifetime: _ttl_for's first answer, without the call
            ttl: Hashable | None = self._fixed_cap
            expires = 0 if cap is None else math.ceil(now + cap)
        else:
            ttl, expires = self._ttl_for(obj, now)
            if ttl is None:
                return None
        try:
            body = self.codec.dumps(obj)
        except SerializationError:
            return None
        written = int(now * 1000)
        value = self.codec.seal(mkey, _payload(written, expires, b"", body))  # one key, no version: no key list
        limit = self._item_limit
        if limit is not None and len(value) + len(mkey) > limit:
            return None
        return mkey, value, ttl, written

    def _prepare_add(self, objs: list[object]) -> list[_Prepared]:
        items, failure = self._prepare(objs)
        if failure is not None:
            log.warning("stockpyle: %s back-fill skipped an object: %s", self._driver.backend, failure)
        now = time.time()
        for obj, item in zip(objs, items, strict=True):
            if self._class_refused(obj, now):
                item.values = None  # its class was just invalidated: the copy may predate that
        return items

    def _mapped(self, exc: BaseException, action: str) -> BaseException:
        """A failure a driver returned (rather than raised), translated."""
        if isinstance(exc, StockpyleError):
            return exc
        return self._errors.map(exc, self, action) or exc

    # -- plans ----------------------------------------------------------

    def _plan_bury(self, burials: Sequence[tuple[str, bytes | None]], action: str) -> Plan[None]:
        """Replace keys by tombstones: ``(key, record or None)`` pairs, see :func:`_owned`.

        Without a tombstone lifetime the keys are simply deleted.
        """
        if not burials:
            return
        seal = self.codec.seal
        now = time.time()
        head = self._stamp(now, math.ceil(now + max(self.tombstone_lifetime, self._driver.min_lifetime)))
        values = {mkey: seal(mkey, head + _TOMB_PREFIX + (version or b"")) for mkey, version in burials}
        if self._tomb_ttl is None:
            yield ("delete_many", (list(values),), action)
        else:
            yield ("set_many", (values, self._tomb_ttl), action)
        for mkey in values:
            self._saw(mkey, int(now * 1000))

    def _plan_invalidate(self, mkeys: list[str], action: str) -> Plan[None]:
        """Tombstone (or delete) ``mkeys`` after a failed write, best effort: failures are logged."""
        doing = f"{action} (invalidating after a failed write)"
        try:
            yield from self._plan_bury([(k, None) for k in mkeys], doing)
        except StoreError as exc:
            log.warning("stockpyle: could not invalidate %d %s keys after a failed write: %s",
                        len(mkeys), self._driver.backend, exc)  # fmt: skip
            if not isinstance(exc, StoreUnavailableError):
                # e.g. a refused tombstone: fall back to deleting
                try:
                    yield ("delete_many", (mkeys,), doing)
                except StoreError:
                    pass

    def _plan_undo(self, mkeys: list[str], action: str) -> Plan[None]:
        """Delete keys an add wrote before another key was refused (best effort)."""
        if not mkeys:
            return
        try:
            yield ("delete_many", (mkeys,), f"{action} (undoing a partial add)")
        except StoreError as exc:
            log.warning("stockpyle: could not undo a partial %s add of %d keys: %s",
                        self._driver.backend, len(mkeys), exc)  # fmt: skip

    def _plan_stale(self, wanted: Sequence[list[str]], action: str) -> Plan[set[str]]:
        """Keys recorded by the entries now under the objects' keys, minus their current keys.

        :raises StoreError: when a server could not be read (its entries'
            records are then unknown).
        """
        probe = [mkeys for mkeys in wanted if len(mkeys) > 1]
        if not self.cleanup_stale_keys or not probe:
            return set()
        found = yield ("get_many", ([k for mkeys in probe for k in mkeys],), action)
        stale: set[str] = set()
        for mkeys in probe:
            current = set(mkeys)
            for mkey in mkeys:
                data = found.get(mkey)
                if data is not None:
                    stale.update(k for k in self._inspect(mkey, data)[1] if k not in current)
        return stale

    def _plan_write_failed(self, mkeys: list[str], exc: BaseException, action: str) -> Plan[None]:
        """After a write failed with ``exc``: a refused write (not an outage) must not leave older entries behind."""
        if not isinstance(exc, StoreUnavailableError):
            yield from self._plan_invalidate(mkeys, action)

    def _plan_put(self, items: list[_Prepared], failure: ObjectError | None, action: str) -> Plan[None]:
        plain: list[_Prepared] = []
        versioned: list[_Prepared] = []
        doomed: list[_Prepared] = []
        for it in items:
            (doomed if it.values is None else plain if it.version is None else versioned).append(it)
        everything = [k for it in items for k in it.mkeys]
        # 1. find keys the objects occupied under old key values (versioned
        # objects find them while reading their keys for the version check);
        # an object with one key has no other key to leave behind
        stale: set[str] = set()
        if self.cleanup_stale_keys and any(len(it.mkeys) > 1 for it in (*plain, *doomed)):
            try:
                stale = yield from self._plan_stale([it.mkeys for it in plain + doomed], action)
            except StoreError:
                # A server could not be read, so old keys may be unknown: don't
                # write, invalidate what can be reached and report the outage.
                yield from self._plan_invalidate(everything, action)
                raise
        burials: list[tuple[str, bytes | None]] = []
        if stale:
            written = {k for it in plain for k in it.mkeys}
            burials.extend((k, None) for k in stale if k not in written)
        burials.extend((k, None) for it in doomed for k in it.mkeys)
        # 2. tombstone stale and doomed entries (a racing back-fill must not
        # put an old copy there), then write
        try:
            if burials:
                yield from self._plan_bury(burials, action)
            if len(plain) == 1:
                one = plain[0]
                if one.ttl is not None and one.values:
                    yield ("set_many", (one.values, one.ttl), action)
            else:
                for ttl, values in _by_ttl(plain).items():
                    yield ("set_many", (values, ttl), action)
            self._saw_written(plain)
            if versioned:
                yield from self._plan_put_versioned(versioned, action)
        except (StoreError, ObjectError) as exc:
            yield from self._plan_write_failed(everything, exc, action)
            raise
        if failure is not None:
            raise failure

    def _plan_put_versioned(self, items: list[_Prepared], action: str) -> Plan[None]:
        """Write versioned objects with compare-and-set so no entry is replaced by an older version.

        Each attempt reads all keys of the pending objects (one ``gets_many``);
        an object the rules refuse is dropped (a newer writer owns the keys, or
        the version was deleted), the others are written key by key with
        ``cas`` (an add where the key is absent).  A ``cas`` that fails means
        another writer changed the key since it was read: the object is tried
        again.  Two writers of ordered versions therefore converge on the
        newer one: whichever writes second saw, or fails on, the other's write.
        """
        pending = items
        for _attempt in range(CAS_ATTEMPTS):
            keys = [k for it in pending for k in it.mkeys]
            try:
                seen: Mapping[str, tuple[Any, Any]] = yield ("gets_many", (keys,), action)
            except StoreError:
                yield from self._plan_invalidate(keys, action)
                raise
            retry = []
            for it in pending:
                states = [self._inspect(k, seen.get(k, (None, None))[0]) for k in it.mkeys]
                if not put_allowed(it.mkeys[0], it.version, [slot for slot, _recorded in states]):
                    continue  # a newer version is cached, or this one was deleted
                if self.cleanup_stale_keys:
                    stale = {k for _slot, recorded in states for k in recorded}.difference(it.mkeys)
                    if stale:
                        yield from self._plan_bury([(k, _owned(it.mkeys[0], it.vbytes)) for k in stale], action)
                values = it.values
                assert values is not None
                for mkey in it.mkeys:
                    token = seen.get(mkey, (None, None))[1]
                    done = yield ("cas", (mkey, values[mkey], token, it.ttl), action)
                    if not done:
                        retry.append(it)
                        break
                    self._saw(mkey, it.written)
            pending = retry
            if not pending:
                return
        with self._counter_lock:
            self.conflicts += len(pending)
        log.warning(
            "stockpyle: %d versioned %s writes kept conflicting with other writers; invalidated instead",
            len(pending),
            self._driver.backend,
        )
        yield from self._plan_bury([(k, None) for it in pending for k in it.mkeys], action)

    def _plan_add(self, items: list[_Prepared], action: str) -> Plan[list[bool]]:
        groups = _by_ttl(items)
        if not self._driver.can_add:
            # a client without add(): back-fill with plain writes (no race protection)
            for ttl, values in groups.items():
                yield ("set_many", (values, ttl), action)
            return [it.values is not None for it in items]
        # one pipelined add per server and lifetime for the whole batch
        stored: set[str] = set()
        failure: BaseException | None = None
        for ttl, values in groups.items():
            done, error = yield ("add_many", (values, ttl), action)
            stored |= done
            failure = failure or error
        results = []
        partial: list[str] = []
        for it in items:
            if it.values is None:
                results.append(False)
                continue
            added = [k for k in it.values if k in stored]
            if len(added) == len(it.values):
                results.append(True)
                self._saw_written([it])
            else:
                # A key was taken (a newer entry, a tombstone, or a concurrent
                # back-fill) or its server failed: don't leave the object under
                # only some keys.
                partial.extend(added)
                results.append(False)
        yield from self._plan_undo(partial, action)
        if failure is not None:
            mapped = self._mapped(failure, action)
            if mapped is failure:
                raise failure
            raise mapped from failure  # the driver's error stays the __cause__, as for raised errors
        return results

    def _plan_delete(self, prepared: list[list[str]], objs: list[object], action: str) -> Plan[None]:
        can_cas = self._driver.can_cas
        versions = [
            _owned(mkeys[0], encode_version(version_of(obj))) if can_cas and mkeys else None
            for mkeys, obj in zip(prepared, objs, strict=True)
        ]
        unreadable: StoreError | None = None
        try:
            stale = yield from self._plan_stale(prepared, action)
        except StoreError as exc:
            # every reachable server still writes its tombstones
            stale, unreadable = set(), exc
        burials: dict[str, bytes | None] = dict.fromkeys(stale)
        for mkeys, version in zip(prepared, versions, strict=True):
            for mkey in mkeys:
                burials[mkey] = version
        try:
            yield from self._plan_bury(list(burials.items()), action)
        except StoreError as exc:
            if self._tomb_ttl is None or isinstance(exc, StoreUnavailableError):
                raise  # an unreachable server is not asked again
            # The server answered but refused the tombstones (e.g. out of
            # memory): delete the keys plainly, so no old entry stays readable,
            # then report the refusal.
            try:
                yield ("delete_many", (list(burials),), f"{action} (deleting after refused tombstones)")
            except StoreError:
                pass
            raise
        if unreadable is not None:
            raise unreadable

    # -- the operations -------------------------------------------------

    def _lookup_keys(self, klass: type, keydicts: Iterable[KeyDict]) -> list[str]:
        cache = self._mkeys.get
        storage_key = self.storage_key
        return [cache(key) or storage_key(key) for key in lookup_keys(klass, keydicts)]

    # -- leases (one loader of a missing key across processes) ------------

    def _count_lookup(self, found: Lease) -> None:
        stats = self._stockpyle_stats
        if found.status == "hit":
            stats.hits += 1
        else:
            stats.misses += 1

    def _lease_ttl(self, lease: float) -> Hashable:
        # every lease_get asks: the answer for a float is kept (a policy has one or two lease lengths)
        known = self._lease_ttls.get(lease) if type(lease) is float else None
        if known is not None:
            return known
        if isinstance(lease, bool) or not isinstance(lease, (int, float)) or not 0 < lease < math.inf:
            raise ValueError(f"a lease lasts a positive number of seconds; got {lease!r}")
        ttl: Hashable = self._driver.ttl(max(float(lease), self._driver.min_lifetime))
        if type(lease) is float and len(self._lease_ttls) < 64:
            self._lease_ttls[lease] = ttl
        return ttl

    def _recache(self, refresh_ahead: float | None) -> Hashable | None:
        """The driver's recache threshold: a refresher is elected this long before the entry leaves the backend."""
        if refresh_ahead is None or not supports_recache(self._driver):
            return None
        if (
            isinstance(refresh_ahead, bool)
            or not isinstance(refresh_ahead, (int, float))
            or not 0 <= refresh_ahead < math.inf
        ):
            raise ValueError(f"refresh_ahead is a number of seconds >= 0; got {refresh_ahead!r}")
        ahead = self._stale_window + float(refresh_ahead)
        return self._driver.ttl(ahead) if ahead > 0 else None

    def _expiry(self, mkey: str, data: bytes) -> int:
        """The end of an entry's lifetime (unix seconds, 0: none) from its envelope."""
        try:
            return self._open(mkey, data)[2]
        except SerializationError:
            return 0

    def _plan_lease_get(
        self, klass: type, keydict: KeyDict, lease: float, refresh_ahead: float | None = None
    ) -> Plan[Lease]:
        """Read one key; on a miss take its lease in the backend (see :class:`~stockpyle.stores.base.Lease`).

        With ``refresh_ahead`` (seconds, ``0`` for none beyond the stale
        window), a present value within that long of its lifetime's end, or
        past it (in the stale window), elects one refresher across processes.
        """
        key = lookup_key(klass, keydict)
        mkey = self._mkeys.get(key) or self.storage_key(key)
        rejected: list[str] = []
        if not supports_leases(self._driver):
            data = yield ("get", (mkey,), "get")
            obj = MISS if data is None else self._decode(mkey, data, rejected)
            if rejected:
                yield from self._plan_discard(rejected)
            return Lease("absent") if obj is MISS else Lease("hit", obj)
        recache = self._recache(refresh_ahead)
        ttl = self._lease_ttl(lease)
        read = yield ("lease_get", (mkey, ttl) if recache is None else (mkey, ttl, recache), "lease_get")
        value = read.value
        obj = MISS if value is None else self._decode(mkey, value, rejected)
        return (yield from self._plan_lease_answer(mkey, read, obj, rejected, refresh_ahead))

    def _plan_lease_answer(
        self, mkey: str, read: LeaseRead, obj: Any, rejected: list[str], refresh_ahead: float | None
    ) -> Plan[Lease]:
        """:meth:`_plan_lease_get` after the read: ``obj`` is the decoded value (or MISS), ``rejected`` its refusals."""
        value = read.value
        if rejected:
            yield from self._plan_discard(rejected)
        stale, age = read.stale, 0.0
        if obj is not MISS and value is not None and refresh_ahead is not None:
            expires = self._expiry(mkey, value)
            now = time.time()
            if expires and expires <= now:
                stale, age = True, now - expires
        if read.status is LeaseStatus.HIT:
            # a tombstone (or an entry refused) is no lease: the caller loads and back-fills with add
            return Lease("absent") if obj is MISS else Lease("hit", obj, None, stale, age)
        previous = None if obj is MISS else obj
        if read.status is LeaseStatus.WON:
            if previous is None and read.value:
                # elected to refresh a tombstone (or an entry refused): no lease is needed for what
                # is not there; the caller loads and back-fills with add, which a tombstone refuses
                yield from self._plan_lease_release((mkey, read.token), "lease_get")
                return Lease("absent")
            return Lease("won", previous, (mkey, read.token), stale and previous is not None, age)
        return Lease("lost", previous, None, stale and previous is not None, age)

    def _plan_lease_fill(self, obj: object, token: Any, action: str) -> Plan[bool]:
        """Store ``obj`` under the leased key only while the lease holds, then under its other keys with add."""
        mkey, lease = token
        single = self._prepare_single(obj)
        if single is not None and single[0] == mkey and not self._class_refused(obj, time.time()):
            # the common fill (one key, the leased one): its entry is the whole write
            _, value, ttl, written = single
            filled = yield ("lease_fill", (mkey, value, lease, ttl), action)
            if filled and self._guard_replays:
                self._saw(mkey, written)
            return bool(filled)
        items = self._prepare_add([obj])
        item = items[0]
        if item.values is None or item.ttl is None or mkey not in item.values:
            # nothing to store (expired, refused, its class just invalidated) or the
            # object does not have the leased key (a lookup the database matched loosely)
            yield from self._plan_lease_release(token, action)
            if item.values is not None and item.ttl is not None:
                return bool((yield from self._plan_add(items, action))[0])
            return False
        filled = yield ("lease_fill", (mkey, item.values[mkey], lease, item.ttl), action)
        if not filled:
            return False  # a writer changed the key after the lease was taken: its value wins
        others = {k: v for k, v in item.values.items() if k != mkey}
        if others:
            done, error = yield ("add_many", (others, item.ttl), action)
            if len(done) != len(others) or error is not None:
                yield from self._plan_undo([mkey, *done], action)
                if error is not None:
                    mapped = self._mapped(error, action)
                    if mapped is error:
                        raise error
                    raise mapped from error
                return False
        self._saw_written(items)
        return True

    def _plan_lease_release(self, token: Any, action: str) -> Plan[None]:
        mkey, lease = token
        try:
            yield ("lease_release", (mkey, lease), f"{action} (releasing a lease)")
        except StoreError as exc:
            log.debug("stockpyle: could not release a %s lease on %s: %s", self._driver.backend, mkey, exc)

    def _plan_discard(self, rejected: list[str]) -> Plan[None]:
        try:
            yield ("delete_many", (rejected,), "delete a rejected entry")
        except StoreError as exc:
            log.debug("stockpyle: could not delete rejected entries %s: %s", rejected, exc)

    def _decode_found(
        self, mkeys: list[str], found: Mapping[str, Any], distinct: bool = False
    ) -> tuple[list[Any], list[str]]:
        """Decode a ``get_many`` result in request order; also the keys of rejected entries (to delete).

        ``distinct``: ``mkeys`` holds each key once, so the entries are decoded
        straight into the answer; otherwise each entry is decoded once and
        handed to every position that asked for it.  The unsigned fast path of
        :meth:`_decode` is inlined: this loop runs once per entry of every batch.
        """
        rejected: list[str] = []
        fast = self._fast_stamped
        loads = self._raw_loads
        order = mkeys if distinct else list(found)
        values: list[Any] = []
        append = values.append
        get = found.get
        for mkey in order:
            data = get(mkey)
            if data is None:
                append(None)
            elif fast is not None and type(data) is bytes and data.startswith(fast):
                length = _LENGTH(data, _SECTION)[0]
                if length == _TOMB_MARK:
                    append(None)
                    continue
                try:
                    append(loads(data[_BODY + length :]))
                except Exception as exc:  # noqa: BLE001 - corrupt data of any kind is a rejected entry
                    self._reject(mkey, SerializationError(f"cannot deserialize entry: {exc!r}"), rejected)
                    append(None)
            else:
                obj = self._decode(mkey, data, rejected)
                append(None if obj is MISS else obj)
        if distinct:
            return values, rejected
        table = dict(zip(order, values, strict=True))
        return [table.get(mkey) for mkey in mkeys], rejected


class KeyValueStore(KeyValueEngine, BaseStore):
    """Objects in a key-value backend reached through a driver (see the module docs).

    Most users create a :class:`~stockpyle.stores.MemcacheStore` or a
    :class:`~stockpyle.stores.RedisStore`; this class is the engine they share,
    and the base class for a store on another backend (see
    ``docs/custom_stores.rst``).  It takes the arguments of :class:`KeyValueEngine`.
    """

    # -- the executor ---------------------------------------------------

    def _run(self, plan: Plan[T], action: str) -> T:
        """Drive ``plan`` against the driver synchronously; driver errors are translated and thrown into it."""
        driver = self._driver
        table = self._errors
        try:
            op = next(plan)
            catches = table.catches
            while True:
                try:
                    result = getattr(driver, op[0])(*op[1])
                except StockpyleError as exc:  # first: a driver's own stockpyle error is never re-mapped
                    op = plan.throw(exc)
                except catches as exc:
                    mapped = table.map(exc, self, op[2] if len(op) > 2 else action)
                    if mapped is None:
                        raise
                    try:
                        raise mapped from exc
                    except StockpyleError as error:
                        op = plan.throw(error)
                else:
                    op = plan.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    # -- class generations ------------------------------------------------

    def _learn(self, classes: Sequence[type]) -> None:
        self._adopt(self._run(self._plan_generations(list(classes), "learn a class generation"), "get"))

    def _check_generations(self) -> None:
        """Re-read the generations of the classes in use, at most every ``generation_check`` seconds."""
        self._generations_due = time.monotonic() + self.generation_check
        classes = list(self._tokens)
        if classes:
            try:
                self._learn(classes)
            except StockpyleError as exc:
                log.warning("stockpyle: could not check class generations in %s: %s", self._driver.backend, exc)
                self._generations_due = time.monotonic() + min(self.generation_check, 0.1)

    def invalidate_class(self, klass: type) -> None:
        """Make every entry of ``klass`` (and of its subclasses) unreachable, in every process.

        The class gets a new generation token in the backend; the keys of the
        class (and of classes that have it as a storable base) carry it, so
        entries written before are never read again and expire with their
        lifetime.  This process sees the change at once; other processes
        within ``generation_check`` seconds.  For ``tombstone_lifetime``
        seconds afterwards, :meth:`add` refuses objects of the class, as a
        delete's tombstones would refuse them.

        :raises StoreError: when the backend fails (the class is then unchanged).
        """
        _gkey, value, generation = self._new_generation(klass)
        self._errors.call(self, "invalidate_class", self._driver.set_many, value, self._fixed_generation_ttl())
        self._adopt({klass: generation})

    def key_for(self, klass: type, keydict: KeyDict) -> str:
        """The backend key ``get(klass, keydict)`` reads."""
        return self.storage_key(lookup_key(klass, keydict))

    def lease_get(self, klass: type, keydict: KeyDict, lease: float, refresh_ahead: float | None = None) -> Lease:
        """Read one object; when its key is empty, take the key's lease for ``lease`` seconds.

        Exactly one caller of all processes wins the lease of an empty key;
        see :class:`~stockpyle.stores.base.Lease` for what each answer means.
        A backend without leases answers ``"hit"`` or ``"absent"`` only.

        :param refresh_ahead: seconds before the end of an entry's lifetime
            from which one reader of all processes wins the key's lease to
            refresh it (``"won"`` with the current value) while the others hit;
            also past that end, while the entry is kept stale (see
            :meth:`keep_stale_for`).  ``None``: only empty keys are leased, and
            no answer is marked stale for having outlived its lifetime.
        :raises StoreError: when the backend fails.
        """
        if time.monotonic() >= self._generations_due:
            self._check_generations()
        if refresh_ahead is not None or not self._leases:
            found = self._run(self._plan_lease_get(klass, keydict, lease, refresh_ahead), "lease_get")
        else:
            # The read of every chain's L2 miss: the driver is called here,
            # and only an answer other than a plain hit goes through the plan
            # (_plan_lease_get's second half), which this saves a hit.
            key = lookup_key(klass, keydict)
            mkey = self._mkeys.get(key) or self.storage_key(key)
            ttl = self._lease_ttl(lease)
            try:
                read = self._driver.lease_get(mkey, ttl)
            except StockpyleError:
                raise  # a driver's own stockpyle error is never re-mapped (as in _run)
            except self._errors.catches as exc:
                self._errors.raise_for(exc, self, "lease_get")
            rejected: list[str] = []
            value = read.value
            obj = MISS if value is None else self._decode(mkey, value, rejected)
            if obj is not MISS and read.status is LeaseStatus.HIT and not rejected:
                self._stockpyle_stats.hits += 1
                return Lease("hit", obj, None, read.stale, 0.0)
            found = self._run(self._plan_lease_answer(mkey, read, obj, rejected, None), "lease_get")
        self._count_lookup(found)
        return found

    def lease_fill(self, obj: object, token: Any) -> bool:
        """Store ``obj``, loaded under a lease that ``lease_get`` won, unless a writer touched the key since.

        :returns: whether it was stored (``False``: a newer write or delete
            won, or the object could not be stored).
        :raises StoreError: when the backend fails.
        """
        check_storable(obj)
        return self._run(self._plan_lease_fill(obj, token, "lease_fill"), "lease_fill")

    def lease_release(self, token: Any) -> None:
        """Give up a lease ``lease_get`` won (nothing to store); the next reader takes it (best effort)."""
        self._run(self._plan_lease_release(token, "lease_release"), "lease_release")

    def _discard_rejected(self, rejected: list[str]) -> None:
        # if the delete fails the entry stays unusable and is rejected again
        try:
            self._errors.call(self, "delete a rejected entry", self._driver.delete_many, rejected)
        except StockpyleError as exc:
            log.debug("stockpyle: could not delete rejected entries %s: %s", rejected, exc)

    # -- the operations -------------------------------------------------
    #
    # Counted and timed inline (``_auto_stats = False``): the generic wrapper
    # of BaseStore costs ~0.7 us per call, a measurable share of a pinned
    # memcached round trip.  Each operation counts exactly what the wrapper
    # would: errors are the StoreErrors it raises, lookups count hits and
    # misses per key, writes count objects.

    _auto_stats = False

    def _timer(self, operation: str) -> Latency:
        """The latency window of ``operation`` (kept by the store's statistics, remembered here)."""
        timer = self._timers[operation] = self._stockpyle_stats.timer(operation)
        return timer

    def _timed(self, operation: str, start: float) -> None:
        timer = self._timers.get(operation)
        if timer is None:
            timer = self._timer(operation)
        timer.add(perf_counter() - start)

    def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        start = perf_counter()
        stats = self._stockpyle_stats
        if time.monotonic() >= self._generations_due:
            self._check_generations()
        key = lookup_key(klass, keydict)
        mkey = self._mkeys.get(key) or self.storage_key(key)
        try:
            try:
                data = self._get(mkey)
            except self._errors.catches as exc:  # (the error table inline: a frame less on every get)
                self._errors.raise_for(exc, self, "get")
        except StoreError:
            stats.errors += 1
            raise
        obj: Any = MISS
        if data is not None:
            rejected: list[str] = []
            obj = self._decode(mkey, data, rejected)
            if rejected:
                self._discard_rejected(rejected)
        timer = self._timers.get("get")  # (_timed inline, as on put)
        if timer is None:
            timer = self._timer("get")
        timer.add(perf_counter() - start)
        if obj is MISS:
            stats.misses += 1
            return None
        stats.hits += 1
        return obj  # type: ignore[no-any-return]

    def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        start = perf_counter()
        stats = self._stockpyle_stats
        if time.monotonic() >= self._generations_due:
            self._check_generations()
        mkeys = self._lookup_keys(klass, keydicts)
        if not mkeys:
            self._timed("batch_get", start)
            return []
        unique = list(dict.fromkeys(mkeys))
        try:
            found = self._errors.call(self, "batch_get", self._driver.get_many, unique)
        except StoreError:
            stats.errors += 1
            raise
        decoded, rejected = self._decode_found(mkeys, found, len(unique) == len(mkeys))
        if rejected:
            self._discard_rejected(rejected)
        self._timed("batch_get", start)
        hits = len(decoded) - decoded.count(None)
        stats.hits += hits
        stats.misses += len(decoded) - hits
        return decoded

    def _put_many(self, objs: list[object], action: str) -> None:
        start = perf_counter()
        if objs:
            if time.monotonic() >= self._generations_due:
                self._check_generations()
            items, failure = self._prepare(objs)
            try:
                self._run(self._plan_put(items, failure, action), action)
            except StoreError:
                self._stockpyle_stats.errors += 1
                raise
        self._timed(action, start)
        self._stockpyle_stats.puts += len(objs)

    def put(self, obj: object) -> None:
        # the most common write (see _prepare_single) is one driver call, here; every other goes through the plan
        start = perf_counter()
        if time.monotonic() >= self._generations_due:
            self._check_generations()
        single = self._prepare_single(obj)
        if single is None:
            self._put_many([obj], "put")
            return
        mkey, value, ttl, written = single
        try:
            try:
                self._driver.set_many({mkey: value}, ttl)
            except self._errors.catches as exc:
                self._errors.raise_for(exc, self, "put")
        except (StoreError, ObjectError) as exc:
            self._run(self._plan_write_failed([mkey], exc, "put"), "put")
            if isinstance(exc, StoreError):
                self._stockpyle_stats.errors += 1
            raise
        if self._guard_replays:
            self._saw(mkey, written)
        timer = self._timers.get("put")  # (_timed inline: a frame less on every put)
        if timer is None:
            timer = self._timer("put")
        timer.add(perf_counter() - start)
        self._stockpyle_stats.puts += 1

    def batch_put(self, objs: Iterable[object]) -> None:
        self._put_many(list(objs), "batch_put")

    def _delete_many(self, objs: list[object], action: str) -> None:
        start = perf_counter()
        if objs:
            if time.monotonic() >= self._generations_due:
                self._check_generations()
            prepared = [self._object_mkeys(obj) for obj in objs]
            try:
                self._run(self._plan_delete(prepared, objs, action), action)
            except StoreError:
                self._stockpyle_stats.errors += 1
                raise
        self._timed(action, start)
        self._stockpyle_stats.deletes += len(objs)

    def delete(self, obj: object) -> None:
        self._delete_many([obj], "delete")

    def batch_delete(self, objs: Iterable[object]) -> None:
        self._delete_many(list(objs), "batch_delete")

    def _add_many(self, objs: list[object], action: str) -> list[bool]:
        if not objs:
            return []
        if time.monotonic() >= self._generations_due:
            self._check_generations()
        return self._run(self._plan_add(self._prepare_add(objs), action), action)

    def add(self, obj: object) -> bool:
        """Store ``obj`` only where none of its keys holds an entry or a tombstone.

        This is how a :class:`~stockpyle.ChainedStore` back-fills: a value read
        from a lower layer must never replace a newer one written meanwhile, nor
        bring back an object deleted meanwhile.  Each key is written with the
        backend's atomic add; if any key is refused, the keys already added are
        deleted again, so the object is never left under only some of its keys.
        An object that cannot be serialized or is too large is not stored
        (logged, ``False``): a back-fill is an optimisation, not a write.

        :returns: whether the object was stored.
        :raises StoreError: when the backend fails (keys added before the
            failure are deleted again where possible).
        """
        return self._add_many([obj], "add")[0]

    def batch_add(self, objs: Iterable[object]) -> list[bool]:
        """:meth:`add` for many objects; returns which were stored.

        :raises StoreError: when the backend fails.
        """
        return self._add_many(list(objs), "batch_add")

    # -- lifecycle ------------------------------------------------------

    def release(self) -> None:
        """Close the driver's connections; the store reconnects on its next operation."""
        try:
            with self._errors.translating(self, "close"):
                self._driver.close()
        except StockpyleError as exc:
            log.debug("stockpyle: error while closing %s: %r", self._driver.backend, exc)


class AsyncKeyValueStore(KeyValueEngine, AsyncBaseStore):
    """:class:`KeyValueStore` for asyncio: the same engine and plans, driven with ``await``.

    Its driver is an :class:`~stockpyle.stores.drivers.AsyncKVDriver`; it takes
    the arguments of :class:`KeyValueEngine`.  Every operation is a coroutine.
    """

    # -- the executor ---------------------------------------------------

    async def _run(self, plan: Plan[T], action: str) -> T:
        """Drive ``plan`` against the driver with ``await``; driver errors are translated and thrown into it."""
        driver = self._driver
        table = self._errors
        try:
            op = next(plan)
            while True:
                try:
                    with table.translating(self, op[2] if len(op) > 2 else action):
                        result = await getattr(driver, op[0])(*op[1])
                except StockpyleError as exc:
                    op = plan.throw(exc)
                else:
                    op = plan.send(result)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _call(self, action: str, method: str, *args: Any) -> Any:
        with self._errors.translating(self, action):
            return await getattr(self._driver, method)(*args)

    # -- class generations ------------------------------------------------

    def _learn(self, classes: Sequence[type]) -> None:
        raise RuntimeError(  # pragma: no cover - every operation learns its classes first
            f"{type(self).__name__} computed a key of a class whose generation it had not learnt"
        )

    async def _ready(self, klasses: Iterable[type]) -> None:
        """Learn what the keys of ``klasses`` need (and re-check the known generations when due)."""
        if time.monotonic() >= self._generations_due:
            self._generations_due = time.monotonic() + self.generation_check
            known = list(self._tokens)
            if known:
                try:
                    self._adopt(await self._run(self._plan_generations(known, "check class generations"), "get"))
                except StockpyleError as exc:
                    log.warning("stockpyle: could not check class generations in %s: %s", self._driver.backend, exc)
                    self._generations_due = time.monotonic() + min(self.generation_check, 0.1)
        needed = self._needed_classes(klasses)
        if needed:
            self._adopt(await self._run(self._plan_generations(needed, "learn a class generation"), "get"))

    async def invalidate_class(self, klass: type) -> None:
        """:meth:`KeyValueStore.invalidate_class`."""
        _gkey, value, generation = self._new_generation(klass)
        await self._call("invalidate_class", "set_many", value, self._fixed_generation_ttl())
        self._adopt({klass: generation})

    async def key_for(self, klass: type, keydict: KeyDict) -> str:
        """The backend key ``get(klass, keydict)`` reads."""
        await self._ready([klass])
        return self.storage_key(lookup_key(klass, keydict))

    async def lease_get(self, klass: type, keydict: KeyDict, lease: float, refresh_ahead: float | None = None) -> Lease:
        """:meth:`KeyValueStore.lease_get`."""
        await self._ready([klass])
        found = await self._run(self._plan_lease_get(klass, keydict, lease, refresh_ahead), "lease_get")
        self._count_lookup(found)
        return found

    async def lease_fill(self, obj: object, token: Any) -> bool:
        """:meth:`KeyValueStore.lease_fill`."""
        check_storable(obj)
        await self._ready(self._key_classes([obj]))
        return await self._run(self._plan_lease_fill(obj, token, "lease_fill"), "lease_fill")

    async def lease_release(self, token: Any) -> None:
        """:meth:`KeyValueStore.lease_release`."""
        await self._run(self._plan_lease_release(token, "lease_release"), "lease_release")

    async def _discard_rejected(self, rejected: list[str]) -> None:
        try:
            await self._call("delete a rejected entry", "delete_many", rejected)
        except StockpyleError as exc:
            log.debug("stockpyle: could not delete rejected entries %s: %s", rejected, exc)

    # -- the operations -------------------------------------------------

    async def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        await self._ready([klass])
        key = lookup_key(klass, keydict)
        mkey = self._mkeys.get(key) or self.storage_key(key)
        data = await self._call("get", "get", mkey)
        if data is None:
            return None
        rejected: list[str] = []
        obj = self._decode(mkey, data, rejected)
        if rejected:
            await self._discard_rejected(rejected)
        return None if obj is MISS else obj

    async def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        await self._ready([klass])
        mkeys = self._lookup_keys(klass, keydicts)
        if not mkeys:
            return []
        unique = list(dict.fromkeys(mkeys))
        found = await self._call("batch_get", "get_many", unique)
        decoded, rejected = self._decode_found(mkeys, found, len(unique) == len(mkeys))
        if rejected:
            await self._discard_rejected(rejected)
        return decoded

    async def _put_many(self, objs: list[object], action: str) -> None:
        if objs:
            for obj in objs:
                check_storable(obj)
            await self._ready(self._key_classes(objs))
            items, failure = self._prepare(objs)
            await self._run(self._plan_put(items, failure, action), action)

    async def put(self, obj: object) -> None:
        # as KeyValueStore.put: the most common write is one driver call
        check_storable(obj)
        await self._ready(self._key_classes([obj]))
        single = self._prepare_single(obj)
        if single is None:
            await self._put_many([obj], "put")
            return
        mkey, value, ttl, written = single
        try:
            await self._call("put", "set_many", {mkey: value}, ttl)
        except (StoreError, ObjectError) as exc:
            await self._run(self._plan_write_failed([mkey], exc, "put"), "put")
            raise
        if self._guard_replays:
            self._saw(mkey, written)

    async def batch_put(self, objs: Iterable[object]) -> None:
        await self._put_many(list(objs), "batch_put")

    async def _delete_many(self, objs: list[object], action: str) -> None:
        if objs:
            for obj in objs:
                check_storable(obj)
            await self._ready(self._key_classes(objs))
            prepared = [self._object_mkeys(obj) for obj in objs]
            await self._run(self._plan_delete(prepared, objs, action), action)

    async def delete(self, obj: object) -> None:
        await self._delete_many([obj], "delete")

    async def batch_delete(self, objs: Iterable[object]) -> None:
        await self._delete_many(list(objs), "batch_delete")

    async def _add_many(self, objs: list[object], action: str) -> list[bool]:
        if not objs:
            return []
        for obj in objs:
            check_storable(obj)
        await self._ready(self._key_classes(objs))
        return await self._run(self._plan_add(self._prepare_add(objs), action), action)

    async def add(self, obj: object) -> bool:
        """:meth:`KeyValueStore.add`."""
        return (await self._add_many([obj], "add"))[0]

    async def batch_add(self, objs: Iterable[object]) -> list[bool]:
        """:meth:`KeyValueStore.batch_add`."""
        return await self._add_many(list(objs), "batch_add")

    async def release(self) -> None:
        """Close the driver's connections; the store reconnects on its next operation."""
        try:
            with self._errors.translating(self, "close"):
                await self._driver.close()
        except StockpyleError as exc:
            log.debug("stockpyle: error while closing %s: %r", self._driver.backend, exc)
