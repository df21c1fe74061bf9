"""Serializers and signed envelopes for entries kept outside the process.

Network and file stores (memcached, :mod:`stockpyle.collections` snapshots)
turn objects into bytes with a :class:`Codec`.  A codec combines

* a :class:`Serializer` -- :class:`PickleSerializer` (the default: any
  picklable object) or :class:`JSONSerializer` (plain data, with tagged
  ``datetime``/``Decimal``/``UUID``/``bytes``/``tuple``/``set`` values);
* an optional :class:`HMACSigner`, which authenticates every entry with
  HMAC-SHA256 under a keyring that supports rotation.

Every encoded entry is an *envelope*::

    b"SP" | format (1 byte) | serializer id (1) | key id (1) | [MAC (32)] | payload

The format byte says whether a MAC follows.  The MAC covers the five header
bytes, the *logical key* the entry is stored under and the payload, so a
signed entry copied to another key (a replay) fails verification just like a
forged or corrupted one.  A codec with a signer verifies before it
deserializes: unverified bytes are never unpickled.

.. warning::
   Unpickling data an attacker can write runs the attacker's code.  Anyone
   who can write to a shared memcached can poison unsigned pickle entries.
   Give stores that share a cache server with untrusted parties a secret
   (``MemcacheStore(..., secret=...)``) or use :class:`JSONSerializer`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import hashlib
import hmac
import json
import pickle
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Final, Protocol, runtime_checkable

from .exceptions import ConfigurationError, SerializationError, SignatureError

__all__ = [
    "Codec",
    "HMACSigner",
    "JSONSerializer",
    "PickleSerializer",
    "Reducer",
    "Serializer",
    "Signer",
    "register_reducer",
]

MAGIC: Final = b"SP"
#: Envelope format byte: payload follows the header directly.
FORMAT_PLAIN: Final = 1
#: Envelope format byte: a 32-byte HMAC-SHA256 follows the header.
FORMAT_SIGNED: Final = 2
HEADER_SIZE: Final = 5
MAC_SIZE: Final = 32


@runtime_checkable
class Serializer(Protocol):
    """Turns objects into bytes and back.

    :ivar name: a short stable name (``"pickle"``, ``"json"``).  A serializer
        may also define an integer ``id`` (1-255) recorded in each envelope;
        entries written by a serializer with another id are refused.
    """

    name: str

    def dumps(self, obj: Any) -> bytes:
        """Serialize ``obj``; raise any exception on failure (the codec wraps it)."""
        ...

    def loads(self, data: bytes) -> Any:
        """Deserialize bytes produced by :meth:`dumps`."""
        ...


class PickleSerializer:
    """Pickle, at protocol 5 (or the highest available) by default.

    Stores any picklable object.  Only read pickles you or a verified signer
    wrote: see the module warning.

    :param protocol: the pickle protocol to write.
    """

    name = "pickle"
    id = 1

    def __init__(self, protocol: int | None = None) -> None:
        self.protocol = pickle.HIGHEST_PROTOCOL if protocol is None else protocol
        if not 0 <= self.protocol <= pickle.HIGHEST_PROTOCOL:
            raise ConfigurationError(f"pickle protocol must be 0..{pickle.HIGHEST_PROTOCOL}; got {protocol!r}")

    def dumps(self, obj: Any) -> bytes:
        return pickle.dumps(obj, self.protocol)

    #: ``pickle.loads`` itself rather than a method calling it: one Python call
    #: less per entry read (a store's hottest path after the round trip).
    loads = staticmethod(pickle.loads)

    def __repr__(self) -> str:
        return f"PickleSerializer(protocol={self.protocol})"


#: ``reducer(obj)`` returns a pickle reduction (``(callable, args)``) for the
#: objects it knows, ``None`` for every other object.
Reducer = Callable[[object], "tuple[Any, ...] | None"]
_REDUCERS: list[Reducer] = []


def register_reducer(reducer: Reducer) -> None:
    """Let an integration decide how the objects it knows are pickled into cache entries.

    A :class:`Codec` with a :class:`PickleSerializer` offers each object it
    is asked to serialize (the entry itself, not the objects inside it) to
    the registered reducers; the first that returns a reduction
    ``(callable, args)`` wins: the entry holds that, and unpickling it calls
    ``callable(*args)``.  The SQLAlchemy integration registers one that
    stores a mapped instance as its class and column values, so entries never
    carry ORM session state.  Registering the same reducer twice is harmless.
    """
    if reducer not in _REDUCERS:
        _REDUCERS.append(reducer)


class _Reduced:
    """Pickles as the reduction a reducer chose for the object it stands for."""

    __slots__ = ("reduction",)

    def __init__(self, reduction: tuple[Any, ...]) -> None:
        self.reduction = reduction

    def __reduce__(self) -> tuple[Any, ...]:
        return self.reduction


def _reduce(obj: Any) -> Any:
    for reducer in _REDUCERS:
        reduction = reducer(obj)
        if reduction is not None:
            return _Reduced(reduction)
    return obj


_TAG: Final = "__sp__"


def _pack(obj: Any) -> Any:
    """Convert ``obj`` into plain JSON values, tagging types JSON lacks."""
    cls = type(obj)
    if cls is str or cls is int or cls is float or cls is bool or obj is None:
        return obj
    if cls is list:
        return [_pack(v) for v in obj]
    if cls is dict:
        if _TAG not in obj and all(type(k) is str for k in obj):
            return {k: _pack(v) for k, v in obj.items()}
        return {_TAG: "map", "v": [[_pack(k), _pack(v)] for k, v in obj.items()]}
    if cls is tuple:
        return {_TAG: "tuple", "v": [_pack(v) for v in obj]}
    if cls is bytes or cls is bytearray:
        return {_TAG: "bytes", "v": base64.b64encode(obj).decode("ascii")}
    if cls is _dt.datetime:
        return {_TAG: "datetime", "v": obj.isoformat()}
    if cls is _dt.date:
        return {_TAG: "date", "v": obj.isoformat()}
    if cls is _dt.time:
        return {_TAG: "time", "v": obj.isoformat()}
    if cls is _dt.timedelta:
        return {_TAG: "timedelta", "v": [obj.days, obj.seconds, obj.microseconds]}
    if cls is Decimal:
        return {_TAG: "decimal", "v": str(obj)}
    if cls is uuid.UUID:
        return {_TAG: "uuid", "v": str(obj)}
    if cls is set or cls is frozenset:
        return {_TAG: cls.__name__, "v": [_pack(v) for v in obj]}
    raise TypeError(f"JSONSerializer cannot encode {cls.__qualname__} values; use PickleSerializer for objects")


def _unpack_tagged(tag: str, value: Any) -> Any:
    if tag == "tuple":
        return tuple(value)
    if tag == "map":
        return {_freeze(k): v for k, v in value}
    if tag == "bytes":
        return base64.b64decode(value)
    if tag == "datetime":
        return _dt.datetime.fromisoformat(value)
    if tag == "date":
        return _dt.date.fromisoformat(value)
    if tag == "time":
        return _dt.time.fromisoformat(value)
    if tag == "timedelta":
        return _dt.timedelta(days=value[0], seconds=value[1], microseconds=value[2])
    if tag == "decimal":
        return Decimal(value)
    if tag == "uuid":
        return uuid.UUID(value)
    if tag == "set":
        return {_freeze(v) for v in value}
    if tag == "frozenset":
        return frozenset(_freeze(v) for v in value)
    raise ValueError(f"unknown JSON type tag {tag!r}")


def _freeze(value: Any) -> Any:
    # dict keys and set members were tuples when written; lists are unhashable
    return tuple(_freeze(v) for v in value) if type(value) is list else value


def _object_hook(obj: dict[str, Any]) -> Any:
    tag = obj.get(_TAG)
    if tag is None or len(obj) != 2 or "v" not in obj:
        return obj
    return _unpack_tagged(tag, obj["v"])


class JSONSerializer:
    """JSON with tagged types: safe to read whatever is stored.

    Encodes ``str``, ``int``, ``float``, ``bool``, ``None``, lists and dicts,
    plus (tagged) tuples, bytes, sets, ``datetime``/``date``/``time``/
    ``timedelta``, ``Decimal``, ``UUID`` and dicts with non-string keys.
    Arbitrary objects are refused with :class:`~stockpyle.exceptions.SerializationError`;
    objects that are stored through a :class:`Codec` must be made of these
    values (or use :class:`PickleSerializer`).
    """

    name = "json"
    id = 2

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(_pack(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode("utf-8")

    def loads(self, data: bytes) -> Any:
        return json.loads(data, object_hook=_object_hook)

    def __repr__(self) -> str:
        return "JSONSerializer()"


@runtime_checkable
class Signer(Protocol):
    """Authenticates envelopes (see :class:`HMACSigner`).

    :ivar key_id: id of the key new entries are signed with (0-255).
    :ivar digest_size: length of a MAC in bytes.
    """

    key_id: int
    digest_size: int

    def sign(self, message: bytes) -> bytes:
        """The MAC of ``message`` under the current key."""
        ...

    def verify(self, key_id: int, message: bytes, mac: bytes) -> bool:
        """True when ``mac`` authenticates ``message`` under key ``key_id``."""
        ...


class HMACSigner:
    """HMAC-SHA256 signatures with a rotatable keyring.

    ``HMACSigner(b"secret")`` uses one key (id 0).  ``HMACSigner({1: old, 2: new},
    current=2)`` signs with key 2 and still accepts entries signed with key 1,
    so secrets can be rotated without invalidating the cache at once; drop the
    old key once its entries have expired.

    :param secret_or_keys: a secret (``bytes`` or ``str``, at least 16 bytes
        recommended) or a mapping ``{key_id: secret}`` with ids 0-255.
    :param current: the id to sign with (default: the highest id).
    :raises ConfigurationError: for empty secrets, bad ids or an unknown ``current``.
    """

    digest_size = MAC_SIZE

    def __init__(self, secret_or_keys: bytes | str | Mapping[int, bytes | str], current: int | None = None) -> None:
        if isinstance(secret_or_keys, (bytes, str)):
            raw: dict[int, bytes | str] = {0: secret_or_keys}
        elif isinstance(secret_or_keys, Mapping):
            raw = dict(secret_or_keys)
        else:
            raise ConfigurationError(
                f"HMACSigner takes a secret (bytes or str) or a mapping {{key_id: secret}}; got {secret_or_keys!r}"
            )
        if not raw:
            raise ConfigurationError("HMACSigner needs at least one key")
        keys: dict[int, bytes] = {}
        for key_id, secret in raw.items():
            if isinstance(key_id, bool) or not isinstance(key_id, int) or not 0 <= key_id <= 255:
                raise ConfigurationError(f"HMACSigner key ids must be integers 0..255; got {key_id!r}")
            secret_bytes = secret.encode("utf-8") if isinstance(secret, str) else secret
            if not isinstance(secret_bytes, bytes) or not secret_bytes:
                raise ConfigurationError(f"HMACSigner key {key_id} must be a non-empty bytes or str secret")
            keys[key_id] = secret_bytes
        self._keys = keys
        self.key_id: int = max(keys) if current is None else current
        if self.key_id not in keys:
            raise ConfigurationError(f"HMACSigner current={current!r} is not one of the key ids {sorted(keys)}")
        self._current = keys[self.key_id]

    @property
    def key_ids(self) -> list[int]:
        """The ids of every key that verifies."""
        return sorted(self._keys)

    def sign(self, message: bytes) -> bytes:
        return hmac.digest(self._current, message, "sha256")

    def verify(self, key_id: int, message: bytes, mac: bytes) -> bool:
        secret = self._keys.get(key_id)
        if secret is None:
            return False
        return hmac.compare_digest(hmac.digest(secret, message, "sha256"), mac)

    def __repr__(self) -> str:
        # never show the secrets
        return f"HMACSigner(key_ids={self.key_ids}, current={self.key_id})"


def _serializer_id(serializer: Any) -> int:
    sid = getattr(serializer, "id", 0)
    if isinstance(sid, bool) or not isinstance(sid, int) or not 0 <= sid <= 255:
        raise ConfigurationError(f"serializer id must be an integer 0..255; got {sid!r}")
    return sid


class Codec:
    """Builds and opens envelopes: serialization plus optional signing.

    :param serializer: the :class:`Serializer` (default :class:`PickleSerializer`).
    :param signer: a :class:`Signer` such as :class:`HMACSigner`; when given,
        only entries with a valid MAC for their logical key are deserialized.
    :raises ConfigurationError: when ``serializer`` or ``signer`` lack the protocol.
    """

    __slots__ = ("_dumps", "_loads", "_plain_header", "_sid", "_signed_header", "serializer", "signer")

    def __init__(self, serializer: Serializer | None = None, signer: Signer | None = None) -> None:
        if serializer is None:
            serializer = PickleSerializer()
        if not (callable(getattr(serializer, "dumps", None)) and callable(getattr(serializer, "loads", None))):
            raise ConfigurationError(f"serializer must have dumps(obj) -> bytes and loads(bytes); got {serializer!r}")
        if signer is not None and not (
            callable(getattr(signer, "sign", None)) and callable(getattr(signer, "verify", None))
        ):
            raise ConfigurationError(f"signer must have sign() and verify() like HMACSigner; got {signer!r}")
        self.serializer = serializer
        self.signer = signer
        # pickle.dumps with the protocol bound in C: one Python call less per write
        self._dumps: Callable[[Any], bytes] = (
            functools.partial(pickle.dumps, protocol=serializer.protocol)
            if type(serializer) is PickleSerializer
            else serializer.dumps
        )
        self._loads = serializer.loads
        self._sid = _serializer_id(serializer)
        self._plain_header = MAGIC + bytes((FORMAT_PLAIN, self._sid, 0))
        self._signed_header = b""
        if signer is not None:
            self._signed_header = MAGIC + bytes((FORMAT_SIGNED, self._sid, signer.key_id))

    @property
    def header(self) -> bytes:
        """The first bytes of every unsigned envelope this codec writes."""
        return self._plain_header

    @property
    def signed(self) -> bool:
        """True when entries are signed and verified."""
        return self.signer is not None

    def __repr__(self) -> str:
        return f"Codec(serializer={self.serializer!r}, signer={self.signer!r})"

    # -- encoding -----------------------------------------------------------

    def dumps(self, obj: Any) -> bytes:
        """Serialize ``obj`` (the payload of an envelope).

        With a :class:`PickleSerializer`, ``obj`` is first offered to the
        reducers registered with :func:`register_reducer`.

        :raises SerializationError: when the serializer fails (e.g. an unpicklable object).
        """
        try:
            if _REDUCERS and type(self.serializer) is PickleSerializer:
                return self._dumps(_reduce(obj))
            return self._dumps(obj)
        except Exception as exc:
            name = getattr(self.serializer, "name", self.serializer)
            raise SerializationError(
                f"cannot serialize {type(obj).__qualname__} object with the {name!r} serializer: {exc}"
            ) from exc

    def seal(self, logical_key: str, payload: bytes) -> bytes:
        """Wrap an already serialized ``payload`` in an envelope for ``logical_key``."""
        signer = self.signer
        if signer is None:
            return self._plain_header + payload
        header = self._signed_header
        return header + signer.sign(header + _key_bytes(logical_key) + payload) + payload

    def encode(self, logical_key: str, obj: Any) -> bytes:
        """Serialize ``obj`` and seal it for ``logical_key``.

        :raises SerializationError: when ``obj`` cannot be serialized.
        """
        return self.seal(logical_key, self.dumps(obj))

    # -- decoding -----------------------------------------------------------

    def payload_offset(self, logical_key: str, data: bytes) -> int:
        """Check an envelope and return the index where its payload starts.

        Lets callers slice the payload once (or read only part of it).

        :raises SignatureError: bad MAC, unknown key id, unsigned entry for a
            signing codec, or an entry sealed for another logical key.
        :raises SerializationError: not an envelope, or another serializer's.
        """
        if data[:2] != MAGIC or len(data) < HEADER_SIZE:
            raise SerializationError(f"entry for {logical_key!r} is not a stockpyle envelope (bad magic)")
        fmt = data[2]
        if data[3] != self._sid:
            raise SerializationError(
                f"entry for {logical_key!r} was written with serializer id {data[3]}, this codec reads id {self._sid}"
            )
        signer = self.signer
        if fmt == FORMAT_PLAIN:
            if signer is not None:
                raise SignatureError(f"entry for {logical_key!r} is unsigned; this codec requires signed entries")
            return HEADER_SIZE
        if fmt == FORMAT_SIGNED:
            end = HEADER_SIZE + MAC_SIZE
            if len(data) < end:
                raise SignatureError(f"signed entry for {logical_key!r} is truncated")
            # A codec without a signer trusts its cache: the MAC is skipped.
            if signer is not None and not signer.verify(
                data[4], data[:HEADER_SIZE] + _key_bytes(logical_key) + data[end:], data[HEADER_SIZE:end]
            ):
                raise SignatureError(
                    f"entry for {logical_key!r} failed verification (forged, corrupted, copied from "
                    f"another key, or signed with unknown key id {data[4]})"
                )
            return end
        raise SerializationError(f"entry for {logical_key!r} has unknown envelope format {fmt}")

    def sealed_with_old_key(self, data: bytes) -> bool:
        """Whether ``data`` is a signed envelope whose key id is not the one this codec signs with now."""
        signer = self.signer
        return signer is not None and len(data) >= HEADER_SIZE and data[2] == FORMAT_SIGNED and data[4] != signer.key_id

    def open(self, logical_key: str, data: bytes) -> bytes:
        """Check an envelope and return its payload, still serialized.

        :raises SignatureError: see :meth:`payload_offset`.
        :raises SerializationError: see :meth:`payload_offset`.
        """
        return data[self.payload_offset(logical_key, data) :]

    def loads(self, payload: bytes) -> Any:
        """Deserialize a payload returned by :meth:`open`.

        :raises SerializationError: when the serializer fails.
        """
        try:
            return self._loads(payload)
        except Exception as exc:
            raise SerializationError(f"cannot deserialize entry: {type(exc).__name__}: {exc}") from exc

    def decode(self, logical_key: str, data: bytes) -> Any:
        """Verify and deserialize an envelope written by :meth:`encode` for ``logical_key``.

        :raises SignatureError: see :meth:`open`.
        :raises SerializationError: see :meth:`open` and :meth:`loads`.
        """
        return self.loads(self.open(logical_key, data))


def _key_bytes(logical_key: str) -> bytes:
    # length-prefixed, so key and payload boundaries cannot be shifted
    raw = logical_key.encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(4, "big") + raw


def fingerprint(data: bytes, size: int = 16) -> str:
    """Hex BLAKE2b digest of ``data`` (``size`` bytes): a short, collision-resistant name."""
    return hashlib.blake2b(data, digest_size=size).hexdigest()
