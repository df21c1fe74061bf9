"""The :class:`Storable` mixin: store operations on the objects themselves."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from .exceptions import ConfigurationError, StoreNotBoundError
from .stores.base import KeyDict

__all__ = ["Storable"]

S = TypeVar("S", bound="Storable")

_ATTR = "_stockpyle_store_"
_OPERATIONS = ("put", "get", "delete", "batch_put", "batch_get", "batch_delete")


class Storable:
    """Mixin giving a class and its instances direct access to a bound store.

    ::

        class Bar(Storable):
            __stockpyle_keys__ = [("foo", "bar")]

        Bar.bind_store(ProcessMemoryStore())
        Bar(111, 777).put()
        obj = Bar.get({"foo": 111, "bar": 777})

    A subclass uses its nearest base's store unless it binds its own.
    """

    __slots__ = ()

    @classmethod
    def bind_store(cls, store: Any) -> None:
        """Bind ``store`` to this class (and subclasses that bind none of their own)."""
        missing = [op for op in _OPERATIONS if not callable(getattr(store, op, None))]
        if missing:
            raise ConfigurationError(f"{store!r} is not a store: it lacks {', '.join(missing)}")
        setattr(cls, _ATTR, store)

    @classmethod
    def unbind_store(cls) -> None:
        """Remove the store bound to this very class (a base's binding applies again)."""
        if _ATTR in cls.__dict__:
            delattr(cls, _ATTR)

    @classmethod
    def bound_store(cls) -> Any:
        """The store this class uses.

        :raises StoreNotBoundError: if neither the class nor a base bound one.
        """
        store = getattr(cls, _ATTR, None)
        if store is None:
            raise StoreNotBoundError(
                f"{cls.__qualname__} has no store; call {cls.__qualname__}.bind_store(store) first"
            )
        return store

    def put(self) -> None:
        """Store this object in the class's store."""
        type(self).bound_store().put(self)

    def delete(self) -> None:
        """Remove this object from the class's store."""
        type(self).bound_store().delete(self)

    @classmethod
    def get(cls: type[S], keydict: KeyDict) -> S | None:
        """Look up an instance by one of its keys; ``None`` when absent."""
        return cls.bound_store().get(cls, keydict)  # type: ignore[no-any-return]

    @classmethod
    def batch_get(cls: type[S], keydicts: Iterable[KeyDict]) -> list[S | None]:
        """Look up many instances; request order, ``None`` per miss."""
        return cls.bound_store().batch_get(cls, keydicts)  # type: ignore[no-any-return]

    #: The 0.0.2 spelling of :meth:`batch_get`.
    batched_get = batch_get

    @classmethod
    def batch_put(cls, objs: Iterable[Storable]) -> None:
        """Store many instances."""
        cls.bound_store().batch_put(list(objs))

    @classmethod
    def batch_delete(cls, objs: Iterable[Storable]) -> None:
        """Remove many instances."""
        cls.bound_store().batch_delete(list(objs))
