"""The consistency rules every store applies: pure functions, no I/O.

A cache is only as good as the rules that decide when it may write.  They live
here, once, and every store that keeps entries -- the in-process table of
:class:`~stockpyle.ProcessMemoryStore` and :class:`~stockpyle.ThreadLocalStore`,
the key-value engine under :class:`~stockpyle.stores.MemcacheStore` and
:class:`~stockpyle.stores.RedisStore`, :class:`~stockpyle.BaseDictionaryStore`
-- asks them the same questions and gets the same answers.

**Versions.** An object may carry a version (``__stockpyle_version__``, or an
SQLAlchemy ``version_id_col``).  Only versions known to increase with every
committed change order writes: values whose type is exactly :class:`int` (not
``bool``).  Any other version -- a UUID, a timestamp string, a hash -- is an
*equality token*: two writes with the same token are the same version, two
writes with different tokens are not ordered, and a cache then accepts the
write, because refusing a write the database committed would freeze the cache
on an old value.  Versions of different types are never ordered either.

**Owners.** Versions count the changes of one object, so they are compared only
between entries of the same object: the *owner* of an entry is the first key
of the object that wrote it.  Another object may hold, or have held, a key
value this one takes now (an e-mail address that moved), and its version says
nothing about this one.

**Entries, tombstones and add.**

* A put is refused only when an entry of the same owner holds a newer
  (ordered) version: concurrent writers then converge on the newest one.
* A delete leaves a *tombstone* for a short time.  It refuses add-only writes
  (the back-fill of a :class:`~stockpyle.ChainedStore`), so a reader that read
  the system of record before the delete cannot put the old object back; and
  when it records a version, it refuses a late put of that version or an older
  one of the same owner.
* An add-only write stores an object only when none of its keys holds a live
  entry or a live tombstone, and an object is stored under all of its keys or
  none (an object present under only some keys could serve an old value under
  the others).
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable
from typing import Any

__all__ = [
    "ABSENT_SLOT",
    "Order",
    "Slot",
    "SlotKind",
    "add_allowed",
    "compare_versions",
    "entry_refuses",
    "is_ordered",
    "put_allowed",
    "tombstone_refuses",
]


class Order(enum.Enum):
    """How a candidate version relates to a stored one."""

    OLDER = "older"
    SAME = "same"
    NEWER = "newer"
    #: not comparable: either is unknown, or they are tokens that differ, or of different types
    UNORDERED = "unordered"


def is_ordered(version: Any) -> bool:
    """Whether ``version`` orders writes: exactly an :class:`int` (``bool`` is not)."""
    return type(version) is int


def compare_versions(candidate: Any, stored: Any) -> Order:
    """Compare two versions of one object under the rules above.

    :param candidate: the version being written.
    :param stored: the version recorded in the store.
    """
    if candidate is None or stored is None:
        return Order.UNORDERED
    if type(candidate) is int and type(stored) is int:
        if candidate < stored:
            return Order.OLDER
        return Order.SAME if candidate == stored else Order.NEWER
    if type(candidate) is not type(stored):
        return Order.UNORDERED
    try:
        same = bool(candidate == stored)
    except Exception:  # noqa: BLE001 - a user type whose __eq__ fails is not comparable
        return Order.UNORDERED
    return Order.SAME if same else Order.UNORDERED


def entry_refuses(candidate: Any, stored: Any) -> bool:
    """Whether an entry of the same owner at version ``stored`` refuses a put at ``candidate``.

    Only a strictly newer ordered version refuses; an equal one does not (a
    re-put of the same version is harmless), nor does an unordered one.
    """
    return compare_versions(candidate, stored) is Order.OLDER


def tombstone_refuses(candidate: Any, deleted: Any) -> bool:
    """Whether a tombstone of the same owner, recording version ``deleted``, refuses a put at ``candidate``.

    The put of the deleted version itself (or an older one) arrives late and
    must not bring the object back.  An unversioned put, or one whose version
    cannot be compared, is an authoritative write and goes through.
    """
    return compare_versions(candidate, deleted) in (Order.OLDER, Order.SAME)


class SlotKind(enum.Enum):
    """What one key holds, as far as the rules care."""

    ABSENT = "absent"
    ENTRY = "entry"
    TOMBSTONE = "tombstone"
    #: something that could not be read (foreign, corrupt, forged): treated as absent by puts
    UNREADABLE = "unreadable"


class Slot:
    """The state of one key: its kind, and the owner and version recorded there.

    :param kind: see :class:`SlotKind`.
    :param owner: the first key of the object the entry or tombstone belongs to.
    :param version: the version recorded, or ``None``.
    """

    __slots__ = ("kind", "owner", "version")

    def __init__(self, kind: SlotKind, owner: Hashable | None = None, version: Any = None) -> None:
        self.kind = kind
        self.owner = owner
        self.version = version

    def __repr__(self) -> str:
        return f"Slot({self.kind.value}, owner={self.owner!r}, version={self.version!r})"


ABSENT_SLOT = Slot(SlotKind.ABSENT)


def put_allowed(owner: Hashable, version: Any, slots: Iterable[Slot]) -> bool:
    """Whether an object (``owner``, ``version``) may be written over ``slots``, the states of its keys.

    Unversioned objects are always written.  Slots of other owners never refuse.
    """
    if version is None:
        return True
    for slot in slots:
        if slot.version is None or slot.owner != owner:
            continue
        if slot.kind is SlotKind.ENTRY and entry_refuses(version, slot.version):
            return False
        if slot.kind is SlotKind.TOMBSTONE and tombstone_refuses(version, slot.version):
            return False
    return True


def add_allowed(slots: Iterable[Slot]) -> bool:
    """Whether an add-only write may store an object whose keys are in ``slots``: only if every one is absent.

    An unreadable entry refuses too, as memcached's and Redis's own add do for
    any value present: the next authoritative put replaces it.
    """
    return all(slot.kind is SlotKind.ABSENT for slot in slots)
