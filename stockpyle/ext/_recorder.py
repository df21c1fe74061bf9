"""What an ORM session really wrote: the flush recorder shared by the SQLAlchemy integration.

:class:`~stockpyle.stores.sqlalchemy.SqlAlchemyStore` (whose writes run in
sessions of its own) and
:class:`~stockpyle.ext.sqlalchemy.StockpyleSessionExtension` (attached to the
application's sessions) both learn what a write did from :class:`FlushRecorder`,
so both see the same things:

* every row a flush inserted or updated -- the objects handed in, children
  reached by a merge cascade, objects flushed by autoflush -- read back from
  the database after the flush (one SELECT per class and chunk), so the
  caches get the values the database stored (``Numeric`` rounding, ``CHAR``
  padding, a ``Date`` given a ``datetime``, time zones);
* every row a flush deleted, delete-orphan cascades included, and the old
  key values of rows whose primary key or unique key changed;
* rows written by statements: ``session.execute()`` of ORM or Core
  ``update``/``delete``/upserts, ``bulk_update_mappings``,
  ``bulk_save_objects``, Core statements on the session's connection and
  ``text()`` -- by key when the rows can be known (a WHERE on a key, the
  parameters, a SELECT with the same WHERE before the statement runs),
  otherwise as whole classes to invalidate;
* classes whose rows the database itself may change behind the ORM's back
  (``ON DELETE CASCADE`` / ``SET NULL`` foreign keys the ORM does not handle).

The records of a transaction are handed over, as a :class:`FlushOutcome`,
only when the outermost COMMIT succeeded; a rollback (also of a SAVEPOINT)
drops them, a released SAVEPOINT hands them to its parent.

It also builds the cached form of ORM objects: :func:`column_copy` makes a
detached, clean instance holding column values only, whose relationships
raise :class:`~stockpyle.exceptions.RelationshipNotCachedError` (or load
through a session once the copy is attached to one), and :func:`reduce_mapped`
pickles such instances as ``(class, column values)``.

Importing this module does not import SQLAlchemy.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from ..effects import WriteEffects
from ..exceptions import NotStorableError, RelationshipNotCachedError, StockpyleError
from ..keys import key_model
from ..serializers import register_reducer

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Mapper, ORMExecuteState, Session, SessionTransaction, UOWTransaction
    from sqlalchemy.orm.state import InstanceState

__all__ = [
    "INSTALL_HINT",
    "ClassFacts",
    "FlushOutcome",
    "FlushRecorder",
    "RelationshipGuard",
    "class_facts",
    "column_copy",
    "family_of",
    "guard_relationships",
    "mapper_of",
    "partial_copy",
    "rebuild_mapped",
    "reduce_mapped",
    "require_sqlalchemy",
]

log = logging.getLogger("stockpyle.ext.sqlalchemy")

INSTALL_HINT: Final = "SqlAlchemyStore requires SQLAlchemy 2: pip install stockpyle[sqlalchemy]"

#: Rows per SELECT when the recorder reads rows back or looks rows up.
CHUNK_SIZE: Final = 500

# (class, {attribute: value}): enough to build a copy of one row
Snapshot = tuple[type, dict[str, Any]]

# text() statements that change rows (a WITH is checked for a data-changing part)
_SQL_WRITES: Final = frozenset(
    {"INSERT", "UPDATE", "DELETE", "REPLACE", "MERGE", "UPSERT", "TRUNCATE", "DROP", "ALTER"}
)
_CTE_WRITE: Final = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE)\b", re.IGNORECASE)
_DATABASE_ACTIONS: Final = frozenset({"CASCADE", "SET NULL", "SET DEFAULT"})


def require_sqlalchemy() -> None:
    """Raise an ``ImportError`` that says how to install SQLAlchemy 2 when it is missing."""
    try:
        import sqlalchemy
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    if int(sqlalchemy.__version__.split(".")[0]) < 2:
        raise ImportError(f"{INSTALL_HINT} (found SQLAlchemy {sqlalchemy.__version__})")


def family_of(klass: type) -> type:
    """The root class of ``klass``'s inheritance hierarchy (its base mapper's class); ``klass`` if unmapped.

    A row known only by its primary key may belong to any class of the family,
    so pending writes are tracked per family.
    """
    from sqlalchemy import inspect

    mapper: Any = inspect(klass, raiseerr=False)
    base = getattr(mapper, "base_mapper", None)
    return base.class_ if base is not None else klass


def mapper_of(klass: type) -> Mapper[Any] | None:
    """The mapper of ``klass`` when it is an ORM-mapped class, else ``None``."""
    if sys.modules.get("sqlalchemy") is None:
        # nothing can be mapped before SQLAlchemy was imported by someone
        return None
    from sqlalchemy import inspect
    from sqlalchemy.orm import Mapper

    mapper: Any = inspect(klass, raiseerr=False)
    if isinstance(mapper, Mapper) and mapper.class_ is klass:
        return mapper
    return None


# ----------------------------------------------------------------------------
# per mapped class


class ClassFacts:
    """What the recorder needs to know about one mapped class (computed once).

    :ivar klass: the class.
    :ivar mapper: its mapper.
    :ivar columns: the column attribute names (deferred ones included).
    :ivar pk_names: the primary-key attribute names.
    :ivar key_names: the attribute names its stockpyle keys use.
    :ivar key_specs: its stockpyle keys (tuples of attribute names), polymorphic bases included.
    :ivar guards: relationship name -> :class:`RelationshipGuard`.
    :ivar hierarchy: the class and its mapped subclasses (a row known only
        by its primary key may be any of them).
    """

    __slots__ = (
        "_database_cascades",
        "_new",
        "_read_back",
        "_unhandled_cascades",
        "columns",
        "guards",
        "hierarchy",
        "key_names",
        "key_specs",
        "klass",
        "make_detached",
        "mapper",
        "pk_names",
    )

    def __init__(self, klass: type, mapper: Mapper[Any], key_specs: tuple[tuple[str, ...], ...]) -> None:
        if not mapper.configured:
            from sqlalchemy.orm import configure_mappers

            configure_mappers()  # relationships get their loaders only now
        from sqlalchemy.orm import make_transient_to_detached

        self.klass = klass
        self.mapper = mapper
        self._new = mapper.class_manager.new_instance
        #: SQLAlchemy's make_transient_to_detached (bound here: a cached copy is built on every cache hit)
        self.make_detached: Callable[[Any], None] = make_transient_to_detached
        self.columns: tuple[str, ...] = tuple(prop.key for prop in mapper.column_attrs)
        self.pk_names: tuple[str, ...] = tuple(mapper.get_property_by_column(c).key for c in mapper.primary_key)
        self.key_specs = key_specs
        self.key_names: frozenset[str] = frozenset(name for spec in key_specs for name in spec)
        self.guards: dict[str, RelationshipGuard] = {}
        for rel in mapper.relationships:
            impl = getattr(mapper.class_manager.get(rel.key), "impl", None)
            if impl is not None and getattr(impl, "callable_", None) is not None:
                # an ordinary (lazy-loading) relationship: dynamic and
                # write-only relationships never hold data in the instance
                self.guards[rel.key] = RelationshipGuard(rel.key)
        self.hierarchy: tuple[type, ...] = tuple(m.class_ for m in mapper.self_and_descendants)
        self._database_cascades: frozenset[type] | None = None
        self._unhandled_cascades: frozenset[type] | None = None
        self._read_back: Any = None

    def new_instance(self) -> Any:
        """A new, empty instance of the class (no constructor call), mappers configured first."""
        if not self.mapper.configured:
            from sqlalchemy.orm import configure_mappers

            configure_mappers()  # e.g. a cache reader unpickling before its first query
        return self._new()

    def read_back(self, condition: Any = None) -> Any:
        """``SELECT`` of every column; by ``condition``, or by a single primary key in ``:stockpyle_idents``.

        The statement without a condition is built once, so SQLAlchemy's
        compiled cache serves it.
        """
        from sqlalchemy import bindparam, select

        columns = [getattr(self.klass, name) for name in self.columns]
        if condition is not None:
            return select(*columns).where(condition)
        if self._read_back is None:
            pk = getattr(self.klass, self.pk_names[0])
            self._read_back = select(*columns).where(pk.in_(bindparam("stockpyle_idents", expanding=True)))
        return self._read_back

    def database_cascades(self, orm_handles_loaded: bool) -> frozenset[type]:
        """Classes whose rows the database changes when a row of this class is deleted.

        Those are mapped classes with a foreign key to this class's tables
        declared ``ondelete="CASCADE"`` (or ``SET NULL`` / ``SET DEFAULT``).
        With ``orm_handles_loaded`` (a flush deleting the row) the classes that a
        relationship of this class loads and handles itself (no
        ``passive_deletes``) are left out: the ORM deletes or updates those
        rows, and the flush records them.
        """
        if self._database_cascades is None:
            everything = _referencing_classes(self.mapper)
            handled = {
                m.class_
                for rel in self.mapper.relationships
                if rel.direction.name == "ONETOMANY" and not rel.passive_deletes
                for m in rel.mapper.self_and_descendants
            }
            self._unhandled_cascades = frozenset(c for c in everything if c not in handled)
            self._database_cascades = everything
        return self._unhandled_cascades if orm_handles_loaded else self._database_cascades  # type: ignore[return-value]


def _referencing_classes(mapper: Mapper[Any]) -> frozenset[type]:
    tables = set(mapper.tables)
    found: set[type] = set()
    for other in mapper.registry.mappers:
        for table in other.tables:
            for fk in getattr(table, "foreign_keys", ()):
                action = (fk.ondelete or "").upper()
                if action in _DATABASE_ACTIONS and fk.column.table in tables:
                    found.add(other.class_)
    return frozenset(found)


_FACTS: dict[type, ClassFacts | None] = {}
_FACTS_LOCK = threading.Lock()
_REGISTRIES: weakref.WeakSet[Any] = weakref.WeakSet()


def class_facts(klass: type) -> ClassFacts | None:
    """The :class:`ClassFacts` of a mapped, storable class; ``None`` for any other class.

    A mapped class whose ``__stockpyle_keys__`` is malformed is logged once and
    treated as not storable: it must never break an application's flush.
    """
    try:
        return _FACTS[klass]
    except KeyError:
        pass
    except TypeError:  # an unhashable "class"
        return None
    facts: ClassFacts | None = None
    mapper = mapper_of(klass)
    if mapper is not None:
        try:
            model = key_model(klass)
        except NotStorableError:
            model = None
        except StockpyleError as exc:
            log.error("stockpyle: %s objects are not cached: %s", klass.__qualname__, exc)
            model = None
        if model is not None:
            specs = tuple(spec for each in model.base_models() for spec in each.specs)
            facts = ClassFacts(klass, mapper, specs)
            _REGISTRIES.add(mapper.registry)
    with _FACTS_LOCK:
        return _FACTS.setdefault(klass, facts)


_TABLES: dict[Any, dict[str, list[ClassFacts]]] = {}


def _mapped_tables() -> dict[str, list[ClassFacts]]:
    """Lower-case table name -> facts of the storable classes mapped to it (registries seen so far)."""
    registries = list(_REGISTRIES)
    mappers = [mapper for registry in registries for mapper in registry.mappers]
    signature = frozenset(id(m) for m in mappers)
    cached = _TABLES.get(signature)
    if cached is not None:
        return cached
    out: dict[str, list[ClassFacts]] = {}
    for mapper in mappers:
        facts = class_facts(mapper.class_)
        if facts is not None:
            for table in mapper.tables:
                name = getattr(table, "name", None)
                if name:
                    out.setdefault(name.lower(), []).append(facts)
    _TABLES.clear()
    _TABLES[signature] = out
    return out


def _classes_of_table(table: Any) -> list[ClassFacts]:
    """Facts of the storable classes whose rows live (at least partly) in ``table``."""
    name = getattr(table, "name", None)
    if not name:
        return []
    found = _mapped_tables().get(name.lower(), [])
    return [f for f in found if any(t is table or getattr(t, "name", None) == name for t in f.mapper.tables)]


# ----------------------------------------------------------------------------
# the cached form of ORM objects


class RelationshipGuard:
    """The per-instance loader of a relationship on a cached copy.

    While the copy is detached, reading the relationship raises
    :class:`~stockpyle.exceptions.RelationshipNotCachedError` (instead of
    SQLAlchemy's ``DetachedInstanceError``); once the copy belongs to a
    session (``session.add``), it loads as usual.
    """

    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, state: InstanceState[Any], passive: Any) -> Any:
        from sqlalchemy.orm.exc import DetachedInstanceError

        loader: Any = state.manager[self.key].impl.callable_
        try:
            return loader(state, passive)
        except DetachedInstanceError:
            name = state.class_.__qualname__
            raise RelationshipNotCachedError(
                f"{name}.{self.key} is not part of cached {name} objects: stockpyle caches column values "
                f"only, so that no cache entry holds a stale relationship. Load it through a session of "
                f"yours: obj = session.merge(obj, load=False); obj.{self.key}"
            ) from None

    def __reduce__(self) -> tuple[Any, ...]:
        return (RelationshipGuard, (self.key,))

    def __repr__(self) -> str:
        return f"RelationshipGuard({self.key!r})"


def guard_relationships(obj: Any, facts: ClassFacts | None = None) -> Any:
    """Make the relationships of ``obj`` raise a clear error while it is detached; returns ``obj``."""
    if facts is None:
        facts = class_facts(type(obj))
    if facts is not None and facts.guards:
        from sqlalchemy.orm.attributes import instance_state

        state = instance_state(obj)
        if "callables" not in state.__dict__:
            state.callables = {}
        state.callables.update(facts.guards)
    return obj


def _new_instance(klass: type) -> Any:
    from sqlalchemy import inspect
    from sqlalchemy.orm import configure_mappers

    mapper: Mapper[Any] = inspect(klass)
    if not mapper.configured:
        # e.g. a cache reader unpickling before its first query
        configure_mappers()
    return mapper.class_manager.new_instance()


def column_copy(klass: type, values: Mapping[str, Any]) -> Any:
    """A new detached, clean ``klass`` instance holding ``values`` as its committed column state.

    Adding it to a session emits no SQL, ``session.merge(copy, load=False)``
    attaches it without a query, and its relationships raise
    :class:`~stockpyle.exceptions.RelationshipNotCachedError` while detached.
    """
    facts = _FACTS.get(klass) or class_facts(klass)
    if facts is None:  # a mapped class without stockpyle keys (e.g. inside another object's entry)
        from sqlalchemy.orm import make_transient_to_detached

        copy = _new_instance(klass)
        detach: Callable[[Any], None] = make_transient_to_detached
    else:
        copy = facts.new_instance()
        detach = facts.make_detached
    # what set_committed_value() does per attribute, at once: the values go
    # into the instance dictionary and make_transient_to_detached() commits
    # them all (no history, nothing modified)
    copy.__dict__.update(values)
    detach(copy)
    return guard_relationships(copy, facts)


def partial_copy(klass: type, values: Mapping[str, Any]) -> Any:
    """A transient ``klass`` instance carrying ``values`` (key attributes): enough to delete its entries."""
    from sqlalchemy.orm.attributes import set_committed_value

    copy = _new_instance(klass)
    for name, value in values.items():
        set_committed_value(copy, name, value)
    return copy


def rebuild_mapped(klass: type, values: dict[str, Any]) -> Any:
    """Unpickle an ORM instance reduced by :func:`reduce_mapped` (see :func:`column_copy`)."""
    return column_copy(klass, values)


def reduce_mapped(obj: object) -> tuple[Any, ...] | None:
    """Pickle a clean, persistent ORM instance as ``(class, column values)``; ``None`` for anything else.

    Registered with :func:`stockpyle.serializers.register_reducer`: serialized
    cache entries then never carry SQLAlchemy's instance state (loaded
    relationships, pending changes, loader options), and they unpickle into
    the same kind of detached copy as every other cached entry.
    """
    klass = type(obj)
    facts = _FACTS.get(klass)
    if facts is None:
        if klass in _FACTS or "_sa_instance_state" not in getattr(obj, "__dict__", ()):
            return None
        facts = class_facts(klass)
        if facts is None:
            return None
    from sqlalchemy.orm.attributes import instance_state

    state = instance_state(obj)
    if state.key is None or state.modified:
        return None
    values = state.dict
    return (rebuild_mapped, (klass, {name: values[name] for name in facts.columns if name in values}))


register_reducer(reduce_mapped)


# ----------------------------------------------------------------------------
# records


class FlushOutcome:
    """The records of one committed transaction.

    :ivar stored: identity key -> snapshot of the row as the database stored it.
    :ivar removed: snapshots (key attributes at least) of rows whose entries must go.
    :ivar classes: classes whose every cached entry must go.
    :ivar written: inheritance families (root classes) the transaction wrote
        rows of, however it wrote them -- also plain INSERT statements, which
        need no cache change (see :meth:`families`).
    """

    __slots__ = ("classes", "deleted", "old_values", "removed", "stored", "to_refresh", "written")

    def __init__(self) -> None:
        self.stored: dict[Any, Snapshot] = {}
        self.removed: list[Snapshot] = []
        self.classes: set[type] = set()
        # identities whose earlier snapshots are void (deleted, moved, rewritten by a statement)
        self.deleted: set[Any] = set()
        # the states a flush wrote, until after_flush_postexec reads them back
        self.to_refresh: list[Any] = []
        # state -> key values read from the database just before a flush
        self.old_values: dict[Any, dict[str, Any]] = {}
        self.written: set[type] = set()

    def absorb(self, child: FlushOutcome) -> None:
        """Take over the records of a released SAVEPOINT (later changes win)."""
        for identity in child.deleted:
            self.stored.pop(identity, None)
        self.deleted |= child.deleted
        self.removed.extend(child.removed)
        self.classes |= child.classes
        self._forget_classes(child.classes)
        self.stored.update(child.stored)
        self.written |= child.written

    def families(self) -> set[type]:
        """Every inheritance family (root class) this transaction wrote or must invalidate rows of."""
        found = set(self.written)
        found.update(family_of(klass) for klass, _values in self.stored.values())
        found.update(family_of(klass) for klass, _values in self.removed)
        found.update(family_of(klass) for klass in self.classes)
        found.update(family_of(identity[0]) for identity in self.deleted)
        return found

    def void(self, identity: Any) -> None:
        """A snapshot taken of ``identity`` so far is out of date."""
        self.stored.pop(identity, None)
        self.deleted.add(identity)

    def invalidate_classes(self, classes: Iterable[type]) -> None:
        """Every cached entry of ``classes`` must go (snapshots taken so far too)."""
        added = set(classes) - self.classes
        if added:
            self.classes |= added
            self._forget_classes(added)

    def _forget_classes(self, classes: set[type]) -> None:
        if classes:
            for identity, (klass, _values) in list(self.stored.items()):
                if issubclass(klass, tuple(classes)):
                    del self.stored[identity]

    def effects(self) -> WriteEffects:
        """The cache changes: copies of every stored row, partial copies of the removed ones."""
        return WriteEffects(
            stored=tuple(column_copy(klass, values) for klass, values in self.stored.values()),
            removed=tuple(partial_copy(klass, values) for klass, values in self.removed),
            classes=frozenset(self.classes),
        )


class _SessionRecords:
    """Per session: the outcome of each open (sub)transaction, and what the session is doing."""

    __slots__ = ("by_transaction", "connections", "executing", "flushing")

    def __init__(self) -> None:
        self.by_transaction: dict[Any, FlushOutcome] = {}
        self.connections: list[Any] = []  # registered for Core statements until the transaction ends
        self.flushing = False  # between before_flush and after_flush: the ORM's own statements
        self.executing = 0  # inside session.execute() of a statement recorded at the ORM level


def _textual(statement: Any) -> bool:
    """Whether ``statement`` is SQL text (``text()``), whose tables only its wording names."""
    from sqlalchemy import TextClause

    return isinstance(statement, TextClause)


def _text_writes(sql: str) -> bool:
    """Whether a textual statement may change rows (its first keyword says so)."""
    match = re.match(r"\s*(?:\(\s*)*([A-Za-z]+)", sql)
    verb = match.group(1).upper() if match else ""
    if verb == "WITH":
        return _CTE_WRITE.search(sql) is not None
    return verb in _SQL_WRITES


def _mentioned_tables(sql: str) -> list[ClassFacts]:
    words = {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_$]*", sql)}
    return [facts for name, found in _mapped_tables().items() if name in words for facts in found]


# ----------------------------------------------------------------------------
# the recorder


class FlushRecorder:
    """Collect, per session and transaction, what flushes and statements wrote.

    :param deliver: called with ``(session, outcome)`` after the outermost
        COMMIT of a transaction that recorded something.  It runs inside
        ``commit()``: it must not raise.
    :param opt_in: record only sessions whose ``session.info`` was marked with
        :meth:`mark` (the store attaches the recorder to whole session
        classes); otherwise record every session of the attached targets.
    :param statements: also record Core statements on the sessions'
        connections (``bulk_update_mappings``, ``bulk_save_objects``,
        ``session.connection().execute()``).  This listens to the engines the
        sessions use.
    :param on_select: called with the ``ORMExecuteState`` of every ORM SELECT
        the recorded sessions execute; what it returns is the answer of the
        ``do_orm_execute`` event (``None``: run the statement).  The
        extension's read-through mode answers ``session.get()`` this way.
    """

    def __init__(
        self,
        deliver: Callable[[Session, FlushOutcome], None],
        *,
        opt_in: bool = False,
        statements: bool = True,
        on_select: Callable[[ORMExecuteState], Any] | None = None,
    ) -> None:
        self._deliver = deliver
        self._on_select = on_select
        self._opt_in = opt_in
        self._statements = statements
        self.info_key = ("stockpyle.flush_records", id(self))
        self._connections: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._connections_lock = threading.Lock()
        self._engines: weakref.WeakSet[Any] = weakref.WeakSet()
        self._listening: weakref.WeakSet[Any] = weakref.WeakSet()
        self._listening_lock = threading.Lock()
        self.listeners: dict[str, Callable[..., Any]] = {
            "before_flush": self._before_flush,
            "after_flush": self._after_flush,
            "after_flush_postexec": self._after_flush_postexec,
            "persistent_to_deleted": self._persistent_to_deleted,
            "do_orm_execute": self._do_orm_execute,
            "after_commit": self._after_commit,
            "after_transaction_end": self._after_transaction_end,
        }
        if statements:
            self.listeners["after_begin"] = self._after_begin

    # -- attaching ----------------------------------------------------------

    @staticmethod
    def _event_target(target: Any) -> Any:
        """What listening to ``target`` really listens to (a factory's session class)."""
        from sqlalchemy.orm import scoped_session
        from sqlalchemy.orm import sessionmaker as sa_sessionmaker

        if isinstance(target, scoped_session):
            target = target.session_factory
        if isinstance(target, sa_sessionmaker):
            target = target.class_
        return target

    def attach(self, target: Any) -> None:
        """Listen to the session events of ``target`` (idempotent).

        Whether a target is attached is remembered here, by weak reference:
        SQLAlchemy's ``event.contains`` keys its records by ``id()``, so it can
        mistake a new session class for a collected one and skip listening.
        """
        from sqlalchemy import event

        resolved = self._event_target(target)
        with self._listening_lock:
            if resolved in self._listening:
                return
            for name, listener in self.listeners.items():
                event.listen(resolved, name, listener)
            self._listening.add(resolved)

    def detach(self, target: Any) -> None:
        """Stop listening to ``target``."""
        from sqlalchemy import event

        resolved = self._event_target(target)
        with self._listening_lock:
            if resolved not in self._listening:
                return
            self._listening.discard(resolved)
            for name, listener in self.listeners.items():
                if event.contains(resolved, name, listener):
                    event.remove(resolved, name, listener)

    def mark(self, session: Session) -> None:
        """Record ``session`` (``opt_in`` recorders), listening to its class once.

        Listening per class costs nothing per session; a plain
        :class:`~sqlalchemy.orm.Session` (whose class every session in the
        process shares) is listened to per instance instead.
        """
        from sqlalchemy.orm import Session as BaseSession

        session.info[self.info_key] = _SessionRecords()
        klass = type(session)
        self.attach(session if klass is BaseSession else klass)

    def _records(self, session: Session) -> _SessionRecords | None:
        records: _SessionRecords | None = session.info.get(self.info_key)
        if records is None and not self._opt_in:
            records = session.info[self.info_key] = _SessionRecords()
        return records

    def written_families(self, session: Session) -> frozenset[type]:
        """The inheritance families (root classes) ``session`` wrote in its open transaction.

        Flushed writes and recorded statements of the transaction and of its
        open or released SAVEPOINTs count; those of a rolled-back SAVEPOINT
        (undone in the database) no longer do.  Objects that are pending in
        the session but not yet flushed are not included (see
        ``session.new``/``dirty``/``deleted``).
        """
        records: _SessionRecords | None = session.info.get(self.info_key)
        if records is None or not records.by_transaction:
            return frozenset()
        found: set[type] = set()
        for outcome in list(records.by_transaction.values()):
            found |= outcome.families()
        return frozenset(found)

    def _outcome(self, session: Session, records: _SessionRecords) -> FlushOutcome | None:
        owner = session.get_nested_transaction() or session.get_transaction()
        if owner is None:  # pragma: no cover - flushes and statements always run in one
            return None
        outcome = records.by_transaction.get(owner)
        if outcome is None:
            outcome = records.by_transaction[owner] = FlushOutcome()
        return outcome

    # -- flush --------------------------------------------------------------

    def _before_flush(self, session: Session, flush_context: UOWTransaction, instances: Any) -> None:
        records = self._records(session)
        if records is None:
            return
        records.flushing = True
        # A key attribute assigned while expired (e.g. after a commit) has no
        # old value in its history, yet the caches hold the object under that
        # old value.  The row still has it until this flush runs: read it now.
        from sqlalchemy import select
        from sqlalchemy.orm.attributes import instance_state

        for obj in session.dirty:
            facts = class_facts(type(obj))
            if facts is None:
                continue
            state = instance_state(obj)
            if state.key is None:
                continue
            unknown = []
            for name in facts.key_names:
                if name in facts.columns:
                    history = state.attrs[name].history
                    if history.added and not history.deleted and not history.unchanged:
                        unknown.append(name)
            if not unknown:
                continue
            klass = type(obj)
            stmt = select(*[getattr(klass, n) for n in unknown]).where(
                *[getattr(klass, n) == v for n, v in zip(facts.pk_names, state.key[1], strict=True)]
            )
            row = session.execute(stmt).first()
            outcome = self._outcome(session, records) if row is not None else None
            if outcome is not None and row is not None:
                outcome.old_values[state] = dict(zip(unknown, row, strict=True))
        for obj in session.deleted:
            facts = class_facts(type(obj))
            if facts is None:
                continue
            state = instance_state(obj)
            if state.key is not None and not state.unloaded.isdisjoint(facts.key_names):
                # the cache entry is keyed by these; load them while the row exists
                for name in facts.key_names:
                    if name in state.unloaded and name in facts.columns:
                        getattr(obj, name)
                        break

    def _after_flush(self, session: Session, flush_context: UOWTransaction) -> None:
        # SQL has run; session.new/dirty still list what this flush wrote and
        # attribute history still holds the values from before it.
        records = self._records(session)
        if records is None:
            return
        records.flushing = False
        from sqlalchemy.orm.attributes import instance_state

        outcome = self._outcome(session, records)
        if outcome is None:  # pragma: no cover
            return
        for obj in session.new:
            if class_facts(type(obj)) is not None:
                outcome.to_refresh.append(instance_state(obj))
                outcome.written.add(family_of(type(obj)))
        for obj in session.dirty:
            facts = class_facts(type(obj))
            if facts is None or not session.is_modified(obj, include_collections=False):
                continue
            state = instance_state(obj)
            outcome.written.add(family_of(type(obj)))
            old = _old_keys(state, facts, outcome.old_values.pop(state, None))
            if old is not None:
                outcome.removed.append((type(obj), old))
            if state.key is not None and state.mapper.identity_key_from_instance(obj) != state.key:
                # the primary key moved: a snapshot under the old identity is void
                outcome.void(state.key)
            outcome.to_refresh.append(state)

    def _after_flush_postexec(self, session: Session, flush_context: UOWTransaction) -> None:
        # The flush is complete: primary keys and defaults are final.  Read the
        # rows back now, in the transaction that wrote them (no SQL may run in
        # after_commit, and a COMMIT may expire every attribute).
        records = self._records(session)
        if records is None:
            return
        outcome = self._outcome(session, records)
        if outcome is None or not outcome.to_refresh:
            return
        states, outcome.to_refresh = outcome.to_refresh, []
        by_class: dict[type, dict[Any, Any]] = {}
        for state in states:
            if state.key is None or state.deleted or state.was_deleted:
                continue
            by_class.setdefault(state.class_, {})[state.key] = state
        for klass, wanted in by_class.items():
            facts = class_facts(klass)
            if facts is None:  # pragma: no cover - filtered in after_flush
                continue
            try:
                found = _read_rows(session.execute, facts, [identity[1] for identity in wanted])
            except Exception as exc:  # noqa: BLE001 - fall back to invalidation
                log.warning("stockpyle: could not read back %d %s row(s); invalidating them: %s",
                            len(wanted), klass.__qualname__, exc)  # fmt: skip
                found = {}
            for identity, state in wanted.items():
                values = found.get(tuple(identity[1]))
                if values is not None:
                    outcome.stored[identity] = (klass, values)
                else:
                    outcome.void(identity)
                    outcome.removed.append((klass, _key_values(state, facts)))

    def _persistent_to_deleted(self, session: Session, instance: Any) -> None:
        # fires for every deleted row, delete-orphan cascades included
        records = self._records(session)
        if records is None:
            return
        facts = class_facts(type(instance))
        if facts is None:
            return
        outcome = self._outcome(session, records)
        if outcome is None:  # pragma: no cover
            return
        from sqlalchemy.orm.attributes import instance_state

        state = instance_state(instance)
        outcome.void(state.key)
        current = _key_values(state, facts)
        outcome.removed.append((type(instance), current))
        old = _old_keys(state, facts)
        if old is not None:
            outcome.removed.append((type(instance), {**current, **old}))
        outcome.invalidate_classes(facts.database_cascades(orm_handles_loaded=True))

    # -- statements ---------------------------------------------------------

    def _do_orm_execute(self, orm_execute_state: ORMExecuteState) -> Any:
        statement: Any = orm_execute_state.statement
        textual = _textual(statement)
        if not (textual or getattr(statement, "is_dml", False)):
            if (
                self._on_select is not None
                and orm_execute_state.is_select
                and self._records(orm_execute_state.session) is not None
            ):
                return self._on_select(orm_execute_state)
            return None
        session = orm_execute_state.session
        records = self._records(session)
        if records is None:
            return None
        if textual and not _text_writes(statement.text):
            return None
        parameters: Any = orm_execute_state.parameters
        param_sets: list[Mapping[str, Any]]
        if isinstance(parameters, Sequence) and not isinstance(parameters, (str, bytes)):
            param_sets = list(parameters)
        else:
            param_sets = [parameters] if parameters else []
        mapper = orm_execute_state.bind_mapper
        found = self._statement_rows(
            session, statement, param_sets, mapper, lambda stmt, params=None: session.execute(stmt, params)
        )
        records.executing += 1
        try:
            result = orm_execute_state.invoke_statement()
        finally:
            records.executing -= 1
        # a fresh session begins its transaction on the first statement: the
        # owner is looked up only now
        outcome = self._outcome(session, records)
        if outcome is not None:
            _record_rows(outcome, *found)
        return result

    def _after_begin(self, session: Session, transaction: SessionTransaction, connection: Connection) -> None:
        records = self._records(session)
        if records is None:
            return
        from sqlalchemy import event

        engine = connection.engine
        records.connections.append(connection)
        with self._connections_lock:
            self._connections[connection] = weakref.ref(session)
            if engine not in self._engines:
                event.listen(engine, "before_execute", self._before_execute)
                self._engines.add(engine)

    def _before_execute(self, conn: Any, clauseelement: Any, multiparams: Any, params: Any, options: Any) -> None:
        # Core statements sent on a recorded session's connection without
        # going through the flush or session.execute(): bulk_update_mappings,
        # bulk_save_objects, session.connection().execute(...)
        ref = self._connections.get(conn)
        if ref is None:
            return
        session = ref()
        if session is None:
            return
        records: _SessionRecords | None = session.info.get(self.info_key)
        if records is None or records.flushing or records.executing:
            return
        if isinstance(clauseelement, str):
            from sqlalchemy import text

            clauseelement = text(clauseelement)
        textual = _textual(clauseelement)
        if not (textual or getattr(clauseelement, "is_dml", False)):
            return
        if textual and not _text_writes(clauseelement.text):
            return
        param_sets = list(multiparams) if multiparams else ([params] if params else [])
        found = self._statement_rows(session, clauseelement, param_sets, None, conn.execute)
        outcome = self._outcome(session, records)
        if outcome is not None:
            _record_rows(outcome, *found)

    def _statement_rows(
        self, session: Session, statement: Any, param_sets: list[Mapping[str, Any]], mapper: Any, run: Any
    ) -> tuple[list[Snapshot], set[type], set[type]]:
        """Key snapshots of the rows ``statement`` writes, classes to invalidate instead, families it writes."""
        if _textual(statement):
            mentioned = _mentioned_tables(statement.text)
            named = {c for facts in mentioned for c in facts.hierarchy}
            return [], named, {family_of(c) for c in named}
        table = getattr(statement, "table", None)
        if mapper is not None:
            facts = class_facts(mapper.class_)
            targets = [facts] if facts is not None else []
        else:
            targets = _classes_of_table(table)
        if not targets:
            return [], set(), set()
        snapshots: list[Snapshot] = []
        classes: set[type] = set()
        # an INSERT needs no cache change, yet the transaction wrote the class
        families = {family_of(facts.klass) for facts in targets}
        for facts in targets:
            try:
                rows, whole = _rows_written(session, facts, statement, param_sets, run)
            except Exception as exc:  # noqa: BLE001 - fall back to the whole class
                log.warning("stockpyle: could not tell which %s rows a statement writes; invalidating the class: %s",
                            facts.klass.__qualname__, exc)  # fmt: skip
                rows, whole = [], True
            snapshots.extend(rows)
            if whole:
                classes.update(facts.hierarchy)
            if statement.is_delete:
                classes.update(facts.database_cascades(orm_handles_loaded=False))
        return snapshots, classes, families

    # -- transaction end ----------------------------------------------------

    def _after_commit(self, session: Session) -> None:
        records: _SessionRecords | None = session.info.get(self.info_key)
        if records is None or not records.by_transaction:
            return
        table = records.by_transaction
        nested = session.get_nested_transaction()
        if nested is not None:
            # a SAVEPOINT was released: its records now belong to the enclosing
            # transaction and stand or fall with it
            child = table.pop(nested, None)
            if child is not None:
                parent = nested.parent
                while parent is not None and not parent.nested and parent.parent is not None:
                    parent = parent.parent
                if parent is not None:
                    table.setdefault(parent, FlushOutcome()).absorb(child)
            return
        root = session.get_transaction()
        outcome = table.pop(root, None) if root is not None else None
        # whatever is left belongs to transactions that are ending with this one
        table.clear()
        if outcome is not None and (outcome.stored or outcome.removed or outcome.classes):
            self._deliver(session, outcome)

    def _after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        # rolled back (or already delivered): nothing recorded in it may reach the cache
        records: _SessionRecords | None = session.info.get(self.info_key)
        if records is None:
            return
        records.flushing = False
        records.by_transaction.pop(transaction, None)
        if transaction.parent is None and records.connections:
            with self._connections_lock:
                for conn in records.connections:
                    self._connections.pop(conn, None)
            records.connections.clear()


# ----------------------------------------------------------------------------
# helpers


def _key_values(state: InstanceState[Any], facts: ClassFacts) -> dict[str, Any]:
    """The loaded column values of ``state``, and the primary key it was stored under."""
    values = state.dict
    current = {name: values[name] for name in facts.columns if name in values}
    if state.key is not None:
        for name, value in zip(facts.pk_names, state.key[1], strict=True):
            current.setdefault(name, value)
    return current


def _old_keys(
    state: InstanceState[Any], facts: ClassFacts, known: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The key values the caches hold for ``state`` if a key attribute changed, else None."""
    changed = False
    old: dict[str, Any] = {}
    attrs = state.attrs
    for name in facts.key_names:
        if name not in facts.columns:
            continue
        history = attrs[name].history
        if known is not None and name in known:
            old[name] = known[name]
            changed = changed or not history.added or known[name] != history.added[0]
        elif history.deleted:
            old[name] = history.deleted[0]
            changed = True
        elif history.unchanged:
            old[name] = history.unchanged[0]
        elif history.added:
            old[name] = history.added[0]
    return old if changed else None


def _chunks(items: Sequence[Any], size: int = CHUNK_SIZE) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _read_rows(execute: Any, facts: ClassFacts, idents: Sequence[Any]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Every column of the rows with primary keys ``idents``, as the database stores them (one SELECT per chunk)."""
    names = facts.columns
    positions = [names.index(n) for n in facts.pk_names]
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    for chunk in _chunks(list(idents)):
        if len(facts.pk_names) == 1:
            rows = execute(facts.read_back(), {"stockpyle_idents": [ident[0] for ident in chunk]}).all()
        else:
            rows = execute(facts.read_back(_values_condition(facts, facts.pk_names, chunk))).all()
        for row in rows:
            found[tuple(row[p] for p in positions)] = dict(zip(names, row, strict=True))
    return found


def _record_rows(outcome: FlushOutcome, snapshots: list[Snapshot], classes: set[type], families: set[type]) -> None:
    """Record rows a statement wrote: their entries go, and snapshots taken earlier are void."""
    outcome.written |= families
    outcome.removed.extend(snapshots)
    for klass, values in snapshots:
        facts = class_facts(klass)
        if facts is not None and all(name in values for name in facts.pk_names):
            identity = facts.mapper.identity_key_from_primary_key(tuple(values[n] for n in facts.pk_names))
            outcome.void(identity)
    outcome.invalidate_classes(classes)


def _attribute_of_column(facts: ClassFacts, column: Any) -> str | None:
    from sqlalchemy.orm.exc import UnmappedColumnError

    try:
        return facts.mapper.get_property_by_column(column).key
    except (UnmappedColumnError, KeyError):
        return None


def _table_columns(facts: ClassFacts, table: Any) -> dict[str, str]:
    """Column key of ``table`` -> attribute name, for the columns ``facts`` maps."""
    out: dict[str, str] = {}
    for column in getattr(table, "columns", ()):
        name = _attribute_of_column(facts, column)
        if name is not None:
            out[column.key] = name
    return out


def _equality_bindings(whereclause: Any, table: Any) -> dict[str, Any]:
    """``column key -> BindParameter`` for the ``column == :param`` terms ANDed in ``whereclause``."""
    from sqlalchemy.sql import operators
    from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList

    found: dict[str, Any] = {}
    terms = [whereclause]
    while terms:
        term = terms.pop()
        if isinstance(term, BooleanClauseList) and term.operator is operators.and_:
            terms.extend(term.clauses)
        elif isinstance(term, BinaryExpression) and term.operator is operators.eq:
            for column, value in ((term.left, term.right), (term.right, term.left)):
                if (
                    isinstance(value, BindParameter)
                    and getattr(column, "table", None) is not None
                    and getattr(column.table, "name", None) == getattr(table, "name", None)
                ):
                    found[str(column.key)] = value
    return found


def _complete_keys(facts: ClassFacts, values: Mapping[str, Any]) -> bool:
    """Whether ``values`` holds every attribute of at least one stockpyle key of the class."""
    return any(all(name in values for name in spec) for spec in facts.key_specs)


def _expand(facts: ClassFacts, values: dict[str, Any]) -> list[Snapshot]:
    """Key snapshots for a row whose class within the hierarchy is unknown."""
    return [(klass, values) for klass in facts.hierarchy]


def _rows_written(
    session: Session, facts: ClassFacts, statement: Any, param_sets: list[Mapping[str, Any]], run: Any
) -> tuple[list[Snapshot], bool]:
    """Key snapshots of the rows ``statement`` writes, or ``([], True)`` when they cannot be known."""
    table = statement.table
    by_column = _table_columns(facts, table)
    if statement.is_insert:
        return _rows_upserted(session, facts, statement, param_sets, by_column)
    whereclause = statement.whereclause
    if whereclause is None:
        if not (param_sets and all(_complete_keys(facts, p) for p in param_sets)):
            return [], True  # every row of the table
        # ORM bulk UPDATE by primary key: the parameters name the rows
        pinned = [{k: v for k, v in p.items() if k in facts.columns} for p in param_sets]
    else:
        bound = _equality_bindings(whereclause, table)
        named = {by_column[key]: bind for key, bind in bound.items() if key in by_column}
        if not _complete_keys(facts, named):
            if len(param_sets) > 1:
                return [], True  # executemany with a WHERE that names no row
            # one statement: the rows it will touch, as they are now
            return _select_keys(facts, whereclause, param_sets[0] if param_sets else None, run), False
        pinned = [
            {name: p.get(bind.key, bind.effective_value) for name, bind in named.items()} for p in param_sets or [{}]
        ]
    if len(facts.key_specs) == 1:
        return [s for values in pinned for s in _expand(facts, values)], False
    # the rows are known by one key; the caches may hold them under the
    # others too, and those values are in the database: read them (one
    # SELECT per chunk) before the statement changes them
    spec = next(spec for spec in facts.key_specs if all(name in pinned[0] for name in spec))
    rows: list[Snapshot] = [s for values in pinned for s in _expand(facts, values)]
    for chunk in _chunks([tuple(values[name] for name in spec) for values in pinned]):
        rows.extend(_select_keys(facts, _values_condition(facts, spec, chunk), None, run))
    return rows, False


def _values_condition(facts: ClassFacts, names: Sequence[str], values: Sequence[tuple[Any, ...]]) -> Any:
    from sqlalchemy import tuple_

    klass = facts.klass
    if len(names) == 1:
        return getattr(klass, names[0]).in_([v[0] for v in values])
    return tuple_(*[getattr(klass, n) for n in names]).in_([tuple(v) for v in values])


def _select_keys(facts: ClassFacts, whereclause: Any, params: Any, run: Any) -> list[Snapshot]:
    from sqlalchemy import select

    mapper = facts.mapper
    names = sorted(facts.key_names & set(facts.columns))
    discriminator = None
    if mapper.polymorphic_on is not None:
        discriminator = _attribute_of_column(facts, mapper.polymorphic_on)
        if discriminator is not None and discriminator not in names:
            names.append(discriminator)
    columns = [getattr(facts.klass, name) for name in names]
    stmt = select(*columns).where(whereclause)
    result = run(stmt, params) if params else run(stmt)
    snapshots: list[Snapshot] = []
    for row in result.all():
        values = dict(zip(names, row, strict=True))
        target = facts.klass
        if discriminator is not None and values.get(discriminator) in mapper.polymorphic_map:
            target = mapper.polymorphic_map[values[discriminator]].class_
        snapshots.append((target, values))
    return snapshots


def _rows_upserted(
    session: Session, facts: ClassFacts, statement: Any, param_sets: list[Mapping[str, Any]], by_column: dict[str, str]
) -> tuple[list[Snapshot], bool]:
    """Rows an INSERT may overwrite: none for a plain INSERT (new rows), the keys given for an upsert."""
    upsert = any(klass.__module__.startswith("sqlalchemy.dialects.") for klass in type(statement).__mro__)
    if not upsert:
        return [], False  # new rows: no cache can hold them yet
    value_sets: list[dict[str, Any]] = []
    for params in param_sets:
        values = {by_column.get(k, k): v for k, v in params.items()}
        value_sets.append({k: v for k, v in values.items() if k in facts.columns})
    if not value_sets:
        bind = session.get_bind(mapper=facts.mapper)
        compiled = statement.compile(dialect=bind.dialect)
        params = compiled.params
        value_sets = [{by_column[k]: v for k, v in params.items() if k in by_column}]
    if value_sets and all(_complete_keys(facts, values) for values in value_sets):
        return [s for values in value_sets for s in _expand(facts, values)], False
    return [], True
