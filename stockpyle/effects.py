"""What a write to the system of record did, for the cache layers above it: :class:`WriteEffects`.

A cache layer must end up holding what the system of record holds, and a
write can change more than the objects it was given: an ORM flush cascades
deletes to children, merges changes into children, moves primary keys, and
the database stores a value in its own form (``Numeric(10, 2)`` rounds,
``CHAR`` pads).  A store that can tell what really happened declares it::

    class MyDatabaseStore(BaseStore):
        reports_effects: ClassVar[bool] = True

        def write(self, action, objs) -> WriteEffects: ...

and its ``put``/``batch_put``/``delete``/``batch_delete`` are built on
``write``.  When such a store is the last layer of a
:class:`~stockpyle.ChainedStore`, the chain applies the effects to every
cache layer instead of repeating the caller's operation there: first every
class in :attr:`~WriteEffects.classes` is invalidated, then the objects in
:attr:`~WriteEffects.removed` are deleted, then the objects in
:attr:`~WriteEffects.stored` are put.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, TypeAlias

__all__ = ["EffectsReporter", "WriteAction", "WriteEffects"]

#: The two kinds of write a store reports effects for.
WriteAction: TypeAlias = Literal["put", "delete"]


@dataclass(frozen=True)
class WriteEffects:
    """The cache changes one write to the system of record calls for.

    :ivar stored: every object to (re)cache, holding exactly the values the
        system of record stored (the objects written, and everything the
        write changed besides them, such as children updated by a cascade).
    :ivar removed: objects whose cache entries must go: deleted rows
        (cascades included), the old identity of an object whose primary key
        moved, the old values of changed unique keys.  They may be partial
        copies that carry only key attributes.
    :ivar classes: classes whose every cached entry must go, because the
        rows a write touched cannot be known.
    """

    stored: tuple[object, ...]
    removed: tuple[object, ...]
    classes: frozenset[type] = frozenset()


class EffectsReporter(Protocol):
    """A store that reports what its writes did (see the module docstring)."""

    reports_effects: ClassVar[bool]

    def write(self, action: WriteAction, objs: Sequence[object]) -> WriteEffects:
        """Carry out ``action`` on ``objs`` and return what the caches must do."""
        ...
