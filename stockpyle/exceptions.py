"""The stockpyle exception tree.

Every error stockpyle raises on purpose derives from :class:`StockpyleError`.
Errors that describe misuse also derive from the matching built-in
(``ValueError``, ``TypeError``, ``KeyError``), so existing ``except`` clauses
keep working::

    StockpyleError
    ├── ConfigurationError (ValueError)       bad constructor arguments, empty chain
    │   └── SchemaError (also a StoreError)   the database lacks a mapped table or column
    ├── KeyDeclarationError (TypeError)       malformed ``__stockpyle_keys__``
    ├── NotStorableError (TypeError)          object/class without ``__stockpyle_keys__``
    ├── MissingKeyAttributeError (AttributeError)  object lacks a declared key attribute
    ├── UnsupportedKeyValueError (TypeError)  key value of a type that cannot be encoded
    ├── UnknownKeyError (KeyError)            lookup dict matches no declared key
    ├── NonUniqueKeyError                     a lookup matched more than one object
    ├── StoreNotBoundError                    Storable class used before bind_store()
    ├── RelationshipNotCachedError            relationship read on a cached ORM copy
    ├── ObjectError                           one object or entry cannot be handled; the layer is fine
    │   ├── SerializationError                value could not be (de)serialized
    │   │   └── SignatureError                signed entry failed verification
    │   └── ValueTooLargeError (ValueError)   the backend refuses values of that size
    └── StoreError                            a backend failed: the layer itself is in trouble
        ├── StoreUnavailableError             server down, refused, timed out
        ├── StaleVersionError                 a put of an out-of-date versioned copy
        └── SchemaError (ConfigurationError)  a table or column the mapping needs is missing

The split between :class:`ObjectError` and :class:`StoreError` is what a
:class:`~stockpyle.ChainedStore` decides by: an object error concerns one
object (it cannot be pickled, it is too large, its entry is corrupt) and never
counts against the layer's health, while a store error does (see
:ref:`failures`).  Both carry the store that raised them (``.store``) and the
operation it was carrying out (``.action``) when a store raised them.

Driver exceptions (pymemcache, redis-py, sockets, SQLAlchemy) are mapped into
this tree by :mod:`stockpyle.errors`, always with ``raise ... from exc`` so the
original is kept as ``__cause__``.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigurationError",
    "KeyDeclarationError",
    "MissingKeyAttributeError",
    "NonUniqueKeyError",
    "NotStorableError",
    "ObjectError",
    "RelationshipNotCachedError",
    "SchemaError",
    "SerializationError",
    "SignatureError",
    "StaleVersionError",
    "StockpyleError",
    "StoreError",
    "StoreNotBoundError",
    "StoreUnavailableError",
    "UnknownKeyError",
    "UnsupportedKeyValueError",
    "ValueTooLargeError",
]


class StockpyleError(Exception):
    """Base class of every error raised by stockpyle."""


class ConfigurationError(StockpyleError, ValueError):
    """A store or helper was constructed or configured with invalid arguments."""


class KeyDeclarationError(StockpyleError, TypeError):
    """A class declares ``__stockpyle_keys__`` in a form stockpyle cannot use."""


class NotStorableError(StockpyleError, TypeError):
    """The object or class has no ``__stockpyle_keys__`` declaration."""


class MissingKeyAttributeError(StockpyleError, AttributeError):
    """An object lacks an attribute named in its class's ``__stockpyle_keys__``."""


class UnsupportedKeyValueError(StockpyleError, TypeError):
    """A key value has a type that has no canonical encoding."""


class UnknownKeyError(StockpyleError, KeyError):
    """A lookup dictionary does not match any key declared by the class."""

    def __str__(self) -> str:
        # KeyError.__str__ repr()s its argument; we want the readable message.
        return str(self.args[0]) if self.args else ""


class NonUniqueKeyError(StockpyleError):
    """A lookup matched more than one stored object.

    :param klass: the class that was queried.
    :param key: the lookup dictionary that matched several rows.
    """

    def __init__(self, klass: type, key: Any, message: str | None = None) -> None:
        self.klass = klass
        self.key = key
        if message is None:
            name = getattr(klass, "__qualname__", repr(klass))
            message = f"more than one {name} matches {key!r}; look it up by a key declared unique in __stockpyle_keys__"
        super().__init__(message)


class StoreNotBoundError(StockpyleError):
    """A :class:`~stockpyle.Storable` class was used before ``bind_store()``."""


class ObjectError(StockpyleError):
    """One object (or one stored entry) cannot be handled by a store; the store itself is healthy.

    :param message: the explanation.
    :param store: the store that raised it, when a store did (``.store``).
    :param action: what that store was doing, e.g. ``"put"`` (``.action``).
    """

    def __init__(self, message: str = "", *, store: Any = None, action: str | None = None) -> None:
        super().__init__(message)
        self.store = store
        self.action = action


class SerializationError(ObjectError):
    """A value could not be serialized, or a stored entry could not be decoded."""


class SignatureError(SerializationError):
    """A signed entry failed verification (forged, corrupted, replayed or for another key)."""


class ValueTooLargeError(ObjectError, ValueError):
    """The backend refuses a value because of its size."""


class StoreError(StockpyleError):
    """A storage backend failed while carrying out an operation.

    :param message: the explanation.
    :param store: the store that raised it, when a store did (``.store``).
    :param action: what that store was doing, e.g. ``"get"`` (``.action``).
    """

    def __init__(self, message: str = "", *, store: Any = None, action: str | None = None) -> None:
        super().__init__(message)
        self.store = store
        self.action = action


class StoreUnavailableError(StoreError):
    """The backend could not be reached: refused, timed out, or connection lost."""


class SchemaError(StoreError, ConfigurationError):
    """The database lacks a table or column that the mapping needs.

    A configuration problem rather than an outage (create the tables or
    migrate the schema), so it is also a :class:`ConfigurationError`; the
    same error is raised on every database.
    """


class StaleVersionError(StoreError):
    """A put was refused: the object carries a version older than the one stored.

    Another writer changed the object since this copy was read.  Read it
    again, reapply the change and put it again.
    """


class RelationshipNotCachedError(StockpyleError):
    """A relationship was read on a cached ORM copy, which holds column values only.

    Load it through a session of yours: ``obj = session.merge(obj, load=False)``,
    then read the relationship on the returned object.
    """
