"""Key declarations and canonical key encoding, shared by every store.

A class becomes storable by declaring ``__stockpyle_keys__``: a list of
alternate unique keys, each an attribute name or a tuple of attribute names
(a composite key, whose order does not matter)::

    class Foo:
        __stockpyle_keys__ = ["key", ("zap", "bar")]

Two representations of a key exist, and both are built here so no store
re-implements them:

* :data:`Key`, a hashable tuple ``(klass, key_id, value, ...)`` used as the
  identity of an entry inside one process (dictionary stores).  Values are
  canonicalised so that equality is *type-faithful*: ``123``, ``123.0``,
  ``True`` and ``"123"`` are four different keys even though Python considers
  the first three equal.
* :func:`encode_key`, the canonical text form
  ``"module.Class:bar=i:444,zap=i:888"``, identical in every process and on
  every machine (no ``hash()``, no memory addresses).  Network and file
  stores derive their backend keys from it.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import math
import re
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Final, TypeAlias

from .exceptions import (
    KeyDeclarationError,
    MissingKeyAttributeError,
    NotStorableError,
    UnknownKeyError,
    UnsupportedKeyValueError,
)

__all__ = [
    "Key",
    "KeyModel",
    "KeyNames",
    "KeyResolver",
    "canonical_value",
    "class_name",
    "encode_key",
    "encode_value",
    "key_model",
    "lookup_key",
    "lookup_keys",
    "object_keys",
    "register_key_resolver",
    "register_version_resolver",
    "version_of",
]

#: The sorted attribute names of one declared key, e.g. ``("bar", "zap")``.
KeyNames: TypeAlias = tuple[str, ...]
#: In-process identity of one entry: ``(klass, key_id, canonical values...)``
#: where ``key_id`` is the attribute name of a single-attribute key and the
#: sorted tuple of names of a composite key.
Key: TypeAlias = tuple[Any, ...]
#: A function that derives key declarations for classes without
#: ``__stockpyle_keys__`` (for example SQLAlchemy mapped classes), or ``None``.
KeyResolver: TypeAlias = Callable[[type], "Sequence[str | Sequence[str]] | None"]


SUPPORTED_TYPES: Final = "str, bytes, int, bool, float, Decimal, UUID, date, datetime, time, None and tuples of these"


# --------------------------------------------------------------------------
# value canonicalisation


def canonical_value(value: Any) -> Any:
    """Return the hashable, type-faithful in-process form of one key value.

    Strings, bytes, ints, ``None``, UUIDs and date/time values are used as they
    are.  Of the values equal to an int (``1 == 1.0 == True == Decimal(1)``),
    bools, floats and Decimals are tagged with their kind, so none of them can
    equal an int or each other; tuples are tagged so they never collide with a
    tagged number.  (Ints stay bare because they are the commonest key values
    after strings, and the in-process hit path can then skip this function.)

    :raises UnsupportedKeyValueError: for any other type, and for NaN.
    """
    cls = type(value)
    if cls is str:
        return value if value.isascii() else _checked_text(value)
    if cls is int or cls is bytes or value is None:
        return value
    if cls is bool:
        return ("b", value)
    if cls is tuple:
        return ("t", tuple([canonical_value(v) for v in value]))
    if cls is float:
        if math.isnan(value):
            raise UnsupportedKeyValueError("NaN cannot be used as a key value: it never equals itself")
        return ("f", value + 0.0)  # folds -0.0 into 0.0, as == does
    if cls is Decimal:
        if value.is_nan():
            raise UnsupportedKeyValueError("Decimal NaN cannot be used as a key value")
        return ("d", value)
    if cls is uuid.UUID or cls is _dt.date:
        return value
    if cls is _dt.datetime:
        if value.tzinfo is None:
            return value
        offset = value.utcoffset()
        if offset is None:  # a zone that gives no offset: the value is naive
            return value.replace(tzinfo=None)
        # the UTC instant: Python's own == ignores fold between two times of one
        # zone, so the two instants of a DST fold would otherwise be one key
        return ("dtz", (value - offset).replace(tzinfo=None))
    if cls is _dt.time:
        if value.tzinfo is None:
            return value
        offset = value.utcoffset()
        if offset is None:
            return value.replace(tzinfo=None)
        # microseconds after midnight UTC, not taken modulo a day (as Python compares them)
        since_midnight = _dt.timedelta(
            hours=value.hour, minutes=value.minute, seconds=value.second, microseconds=value.microsecond
        )
        return ("ttz", (since_midnight - offset) // _dt.timedelta(microseconds=1))
    return _canonical_subclass(value)


def _checked_text(value: str) -> str:
    """``value`` when it encodes to UTF-8; lone surrogates are refused (no database can store them)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UnsupportedKeyValueError(
            f"key value {_short_repr(value)} contains a lone surrogate ({value[exc.start]!r} at position "
            f"{exc.start}): it is not valid Unicode text and no database can store it; decode the text with "
            "errors='replace' or use bytes"
        ) from None
    return value


def _canonical_subclass(value: Any) -> Any:
    # Subclasses of supported types (IntEnum, StrEnum, pendulum datetimes...)
    # are reduced to their supported base type so they key like the plain value.
    if isinstance(value, bool):
        return canonical_value(bool(value))
    if isinstance(value, int):
        return canonical_value(int(value))
    if isinstance(value, str):
        return canonical_value(str.__str__(value))
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, float):
        return canonical_value(float(value))
    if isinstance(value, Decimal):
        return canonical_value(Decimal(value))
    if isinstance(value, tuple):
        return canonical_value(tuple(value))
    if isinstance(value, uuid.UUID):
        return uuid.UUID(int=value.int)
    if isinstance(value, _dt.datetime):
        plain = _dt.datetime(
            value.year,
            value.month,
            value.day,
            value.hour,
            value.minute,
            value.second,
            value.microsecond,
            value.tzinfo,
            fold=value.fold,
        )
        return canonical_value(plain)
    if isinstance(value, _dt.date):
        return _dt.date(value.year, value.month, value.day)
    if isinstance(value, _dt.time):
        return _dt.time(value.hour, value.minute, value.second, value.microsecond, value.tzinfo)
    raise UnsupportedKeyValueError(
        f"key value {_short_repr(value)} of type {type(value).__qualname__} is not supported; use {SUPPORTED_TYPES}"
    )


# Characters escaped in the text form: the delimiters used by encode_key,
# "%" itself, whitespace, control characters and path separators.  Everything
# else (including non-ASCII letters) stays readable.
_ESCAPE_RE: Final = re.compile(r"[\x00-\x20\x7f-\x9f%,=()|:/\\\ud800-\udfff]")


def _escape(text: str) -> str:
    # lone surrogates (valid in a Python str, not in UTF-8) are escaped too, so
    # the text form always encodes to UTF-8
    return _ESCAPE_RE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8", "surrogatepass")), text)


def encode_value(value: Any) -> str:
    """Return the canonical text form of one key value.

    The form starts with a type tag (``s:`` for str, ``i:`` for int, ...), so
    ``encode_value(123) != encode_value("123")``.  It depends only on the value,
    never on the process.
    """
    return _encode_canonical(canonical_value(value))


def _encode_canonical(canon: Any) -> str:
    cls = type(canon)
    if cls is str:
        return "s:" + _escape(canon)
    if cls is int:
        return f"i:{canon}"
    if canon is None:
        return "n"
    if cls is bytes:
        return f"y:{canon.hex()}"
    if cls is tuple:
        tag, inner = canon
        if tag == "t":
            return "(" + ",".join(_encode_canonical(v) for v in inner) + ")"
        if tag == "b":
            return "b:1" if inner else "b:0"
        if tag == "f":
            return "f:" + repr(inner)
        if tag == "d":
            return "d:" + ("0" if inner == 0 else str(inner.normalize()))
        if tag == "dtz":
            return f"dtz:{inner.isoformat()}"
        if tag == "ttz":
            return f"ttz:{inner}"
    if cls is uuid.UUID:
        return "u:" + str(canon)
    if cls is _dt.datetime:
        return f"dt:{canon.isoformat()}"
    if cls is _dt.date:
        return f"da:{canon.isoformat()}"
    if cls is _dt.time:
        return f"t:{_escape(canon.isoformat())}"
    raise AssertionError(f"not a canonical key value: {canon!r}")  # pragma: no cover


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------
# per-class key models


def class_name(klass: type) -> str:
    """The stable, process-independent name of a class: ``module.QualName``."""
    return f"{klass.__module__}.{klass.__qualname__}"


_RESOLVERS: list[KeyResolver] = []
_VERSION_RESOLVERS: list[Callable[[type], str | None]] = []
# Integrations that register resolvers, by the module whose import means
# they may be needed: a process that only reads a cache (it never imported
# stockpyle's SQLAlchemy store) must key mapped classes the same way.
_INTEGRATIONS: dict[str, str] = {"sqlalchemy": "stockpyle.stores.sqlalchemy"}
_INTEGRATIONS_LOCK = threading.RLock()


def _load_integrations() -> None:
    with _INTEGRATIONS_LOCK:  # other threads wait until the resolvers are registered
        for trigger in [t for t in _INTEGRATIONS if sys.modules.get(t) is not None]:
            importlib.import_module(_INTEGRATIONS[trigger])
            del _INTEGRATIONS[trigger]


def register_version_resolver(resolver: Callable[[type], str | None]) -> None:
    """Register a function naming the version attribute of classes without ``__stockpyle_version__``.

    The SQLAlchemy integration registers one that returns the attribute of a
    mapper's ``version_id_col``.
    """
    if resolver not in _VERSION_RESOLVERS:
        _VERSION_RESOLVERS.append(resolver)
        _MODELS.clear()


def _version_attribute(klass: type) -> str | None:
    declared = getattr(klass, "__stockpyle_version__", None)
    if declared is not None:
        if not isinstance(declared, str) or not declared.isidentifier():
            raise KeyDeclarationError(
                f"{klass.__qualname__}.__stockpyle_version__ must name an attribute, e.g. 'version'; got {declared!r}"
            )
        return declared
    for resolver in _VERSION_RESOLVERS:
        found = resolver(klass)
        if found:
            return found
    return None


def register_key_resolver(resolver: KeyResolver) -> None:
    """Register a function that supplies keys for classes lacking ``__stockpyle_keys__``.

    The SQLAlchemy integration registers one so that mapped classes are keyed by
    their primary key and unique constraints.  An explicit ``__stockpyle_keys__``
    always wins over a resolver.
    """
    if resolver not in _RESOLVERS:
        _RESOLVERS.append(resolver)
        _MODELS.clear()


class KeyModel:
    """Everything stockpyle derives from one class's key declaration (cached).

    :ivar klass: the class.
    :ivar name: its stable name, see :func:`class_name`.
    :ivar specs: the declared keys, each a sorted tuple of attribute names.
    :ivar bases: the classes an instance is indexed under when stored
        polymorphically: the class itself, then every base that is storable.
    :ivar version_attr: the attribute holding the object's version (from
        ``__stockpyle_version__``), or ``None``: stores never replace a stored
        object by one with a lower version.
    """

    __slots__ = ("klass", "name", "specs", "bases", "version_attr", "_by_names", "_base_models", "_plan")

    def __init__(self, klass: type, specs: tuple[KeyNames, ...]) -> None:
        self.klass = klass
        self.name = class_name(klass)
        self.specs = specs
        # names as given in a lookup dict -> key id (the name of a single
        # attribute key, the sorted names of a composite one); grows as new
        # orderings of composite names are seen
        self._by_names: dict[tuple[str, ...], str | KeyNames] = {}
        for spec in specs:
            self._by_names[spec] = _key_id(spec)
        # (key id, names) per declared key, in declaration order: what keys_of() walks
        self._plan: tuple[tuple[str | KeyNames, KeyNames], ...] = tuple((_key_id(spec), spec) for spec in specs)
        self.bases: tuple[type, ...] = tuple(
            base for base in klass.__mro__ if base is klass or _declared_specs(base) is not None
        )
        self._base_models: tuple[KeyModel, ...] | None = None
        self.version_attr = _version_attribute(klass)

    def base_models(self) -> tuple[KeyModel, ...]:
        """Key models of :attr:`bases` (the class first)."""
        if self._base_models is None:
            self._base_models = tuple(key_model(b) for b in self.bases)
        return self._base_models

    def spec_for(self, names: tuple[str, ...]) -> str | KeyNames:
        """Return the key id of the declared key matching ``names`` (in any order).

        :raises UnknownKeyError: when no declared key has exactly these names.
        """
        key_id = self._by_names.get(names)
        if key_id is not None:
            return key_id
        wanted = tuple(sorted(names))
        if len(set(wanted)) == len(wanted) and wanted in self.specs:
            key_id = self._by_names[names] = _key_id(wanted)
            return key_id
        declared = ", ".join(_describe_spec(s) for s in self.specs)
        raise UnknownKeyError(
            f"{self.klass.__qualname__} has no key {_describe_spec(wanted)}; its declared keys are: {declared}"
        )

    def keys_of(self, obj: object) -> list[Key]:
        """All in-process keys of ``obj`` under this model's class."""
        klass = self.klass
        out: list[Key] = []
        try:
            for key_id, spec in self._plan:
                if type(key_id) is str:
                    raw = getattr(obj, key_id)
                    kind = type(raw)
                    if (kind is str and raw.isascii()) or kind is int:
                        out.append((klass, key_id, raw))
                    else:
                        out.append((klass, key_id, canonical_value(raw)))
                else:
                    out.append((klass, key_id, *[canonical_value(getattr(obj, name)) for name in spec]))
        except AttributeError:
            self._missing_attribute(obj)
            raise
        return out

    def _missing_attribute(self, obj: object) -> None:
        for spec in self.specs:
            for name in spec:
                if not hasattr(obj, name):
                    raise MissingKeyAttributeError(
                        f"{type(obj).__qualname__} object has no attribute {name!r}, "
                        f"which {self.klass.__qualname__}.__stockpyle_keys__ declares "
                        f"(key {_describe_spec(spec)})"
                    ) from None

    def __repr__(self) -> str:
        return f"<KeyModel {self.name} {list(self.specs)}>"


def _key_id(spec: KeyNames) -> str | KeyNames:
    return spec[0] if len(spec) == 1 else spec


def _describe_spec(spec: Sequence[str]) -> str:
    return repr(spec[0]) if len(spec) == 1 else "(" + ", ".join(repr(n) for n in spec) + ")"


def _declared_specs(klass: type) -> Sequence[Any] | None:
    declared = getattr(klass, "__stockpyle_keys__", None)
    if declared is not None:
        return declared  # type: ignore[no-any-return]
    for resolver in _RESOLVERS:
        found = resolver(klass)
        if found:
            return found
    return None


def _parse_specs(klass: type, declared: Any) -> tuple[KeyNames, ...]:
    where = f"{klass.__qualname__}.__stockpyle_keys__"
    if isinstance(declared, (str, bytes)) or not isinstance(declared, Iterable):
        raise KeyDeclarationError(
            f"{where} must be a list of attribute names or tuples of names, "
            f"e.g. ['id', ('zap', 'bar')]; got {declared!r}"
        )
    specs: list[KeyNames] = []
    for item in declared:
        names = (item,) if isinstance(item, str) else item
        if isinstance(names, (bytes, Mapping)) or not isinstance(names, Iterable):
            raise KeyDeclarationError(f"{where}: {item!r} is neither an attribute name nor a tuple of names")
        names = tuple(names)
        if not names or not all(isinstance(n, str) and n.isidentifier() for n in names):
            raise KeyDeclarationError(f"{where}: {item!r} must contain one or more attribute names")
        if len(set(names)) != len(names):
            raise KeyDeclarationError(f"{where}: {item!r} names an attribute twice")
        spec = tuple(sorted(names))
        if spec not in specs:
            specs.append(spec)
    if not specs:
        raise KeyDeclarationError(f"{where} is empty; declare at least one key")
    return tuple(specs)


_MODELS: dict[type, KeyModel] = {}
_MODELS_LOCK = threading.Lock()


def key_model(klass: type) -> KeyModel:
    """Return the (cached) :class:`KeyModel` of ``klass``.

    :raises NotStorableError: if the class declares no keys.
    :raises KeyDeclarationError: if its declaration is malformed.
    """
    model = _MODELS.get(klass)
    if model is not None:
        return model
    if not isinstance(klass, type):
        raise NotStorableError(f"expected a class, got {_short_repr(klass)}")
    if _INTEGRATIONS:
        _load_integrations()
    declared = _declared_specs(klass)
    if declared is None:
        raise NotStorableError(
            f"{klass.__qualname__} cannot be stored: declare __stockpyle_keys__ on it, e.g. __stockpyle_keys__ = ['id']"
        )
    model = KeyModel(klass, _parse_specs(klass, declared))
    with _MODELS_LOCK:
        return _MODELS.setdefault(klass, model)


def lookup_key(klass: type, keydict: Mapping[str, Any]) -> Key:
    """Return the in-process key that ``get(klass, keydict)`` looks up.

    :raises UnknownKeyError: if ``keydict`` matches no declared key.
    :raises UnsupportedKeyValueError: if a value has an unsupported type.
    """
    model = _MODELS.get(klass) or key_model(klass)
    try:
        key_id = model._by_names[tuple(keydict)]
    except (KeyError, TypeError):
        if not isinstance(keydict, Mapping):
            raise TypeError(_not_a_lookup(model, keydict)) from None
        key_id = model.spec_for(tuple(keydict))
    try:
        if type(key_id) is str:
            value = keydict[key_id]
            kind = type(value)
            if (kind is str and value.isascii()) or kind is int:
                return (klass, key_id, value)
            return (klass, key_id, canonical_value(value))
        return (klass, key_id, *[canonical_value(keydict[name]) for name in key_id])
    except TypeError:
        if isinstance(keydict, Mapping):
            raise
        # a sequence of the key's names, e.g. get(Foo, ["id"])
        raise TypeError(_not_a_lookup(model, keydict)) from None


def lookup_keys(klass: type, keydicts: Iterable[Mapping[str, Any]]) -> list[Key]:
    """:func:`lookup_key` for many lookups of one class, as batch reads need them.

    The class's model is found once and the common lookup (one attribute
    holding an ASCII string or an int) is resolved inline; every other
    lookup goes through :func:`lookup_key`, errors included.
    """
    model = _MODELS.get(klass) or key_model(klass)
    by_names = model._by_names
    keys: list[Key] = []
    append = keys.append
    for keydict in keydicts:
        try:
            key_id = by_names[tuple(keydict)]
            if type(key_id) is str:
                value = keydict[key_id]
                kind = type(value)
                if (kind is str and value.isascii()) or kind is int:
                    append((klass, key_id, value))
                    continue
        except (KeyError, TypeError):
            pass
        append(lookup_key(klass, keydict))
    return keys


def _not_a_lookup(model: KeyModel, keydict: object) -> str:
    # get(Foo, 1) is the natural mistake: show the dict that was meant
    names = model.specs[0]
    attributes = {name for spec in model.specs for name in spec}
    if len(names) == 1 and type(keydict) in (int, str) and keydict not in attributes:
        example = f"{{{names[0]!r}: {_short_repr(keydict)}}}"
    else:
        example = "{" + ", ".join(f"{name!r}: ..." for name in names) + "}"
    declared = " or ".join(spec[0] if len(spec) == 1 else "(" + ", ".join(spec) + ")" for spec in model.specs)
    message = (
        f"a lookup is a dict of key attribute values, e.g. {example}, not {_short_repr(keydict)} "
        f"(the keys of {model.klass.__name__}: {declared})"
    )
    if isinstance(keydict, str) and keydict in attributes:
        # batch_get(Foo, {"id": 1}) iterates the dict: its keys arrive here
        message += "; batch_get() takes a list of such dicts"
    return message


def object_keys(obj: object, polymorphic: bool = False) -> list[Key]:
    """Every in-process key ``obj`` is stored under.

    One key per declared alternate key of its class; with ``polymorphic=True``
    also the keys of every storable base class, so the object can be found
    through a base class.

    :raises NotStorableError: if the object's class declares no keys.
    :raises MissingKeyAttributeError: if the object lacks a key attribute.
    :raises UnsupportedKeyValueError: if a key value has an unsupported type.
    """
    klass = type(obj)
    model = _MODELS.get(klass) or key_model(klass)
    if not polymorphic or len(model.bases) == 1:
        return model.keys_of(obj)
    out: list[Key] = []
    for base_model in model.base_models():
        out.extend(base_model.keys_of(obj))
    return out


def version_of(obj: object) -> Any:
    """The version of ``obj`` (see ``__stockpyle_version__``), or ``None`` when unversioned.

    A class opts in with ``__stockpyle_version__ = "version"``: the named
    attribute changes with every change committed to the system of record
    (an SQLAlchemy ``version_id_col`` does).  Stores use it to let
    concurrent writers converge: a write never replaces a newer version.
    Integer versions are ordered; other versions only tell versions apart
    (the rules are :mod:`stockpyle.consistency`).
    """
    klass = type(obj)
    model = _MODELS.get(klass) or key_model(klass)
    attr = model.version_attr
    return None if attr is None else getattr(obj, attr, None)


def encode_key(key: Key) -> str:
    """The canonical, process-independent text of a key.

    ``encode_key(lookup_key(Foo, {"zap": 2, "bar": 3}))`` is
    ``"mymodule.Foo:bar=i:3,zap=i:2"``.  Attribute names are sorted; values are
    tagged with their type and escaped (see :func:`encode_value`).
    """
    klass, key_id = key[0], key[1]
    names = (key_id,) if type(key_id) is str else key_id
    parts = [f"{name}={_encode_canonical(value)}" for name, value in zip(names, key[2:], strict=True)]
    return f"{class_name(klass)}:{','.join(parts)}"
