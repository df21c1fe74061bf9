"""Keep a cache store in step with ORM sessions: :class:`StockpyleSessionExtension`.

SQLAlchemy 2 has no ``SessionExtension``; the extension listens to session
events instead.  Attach it to the sessions whose writes the cache must follow::

    from stockpyle.ext.sqlalchemy import StockpyleSessionExtension, sessionmaker

    ext = StockpyleSessionExtension(store=cache)
    Session = sessionmaker(extension=ext, bind=engine)   # drop-in for the 0.1 API
    # or: ext.attach(existing_sessionmaker / scoped_session / Session subclass / session)

What it does, per session and per transaction (no state is shared between
sessions or threads):

* each flush records the objects it inserted, updated or deleted -- including
  delete-orphan cascades -- and, for objects whose key attributes changed,
  the *old* key values;
* ORM ``update()``/``delete()`` statements executed through the session
  record the rows they touch (selected just before the statement runs) for
  invalidation;
* a released SAVEPOINT hands its records to the enclosing transaction; a
  rollback (of a savepoint, of the transaction, after a failed flush) drops them;
* only when the outermost COMMIT has succeeded does the cache change: one
  ``batch_delete`` (deleted objects, entries under old key values, rows hit
  by bulk statements) then one ``batch_put`` of detached copies holding the
  committed column values;
* a failing cache never breaks ``commit()``: the error is logged on the
  ``stockpyle.ext.sqlalchemy`` logger and counted in :attr:`~StockpyleSessionExtension.errors`.

Writes that bypass attached sessions (Core ``connection.execute``, raw SQL,
other applications, database-side cascades and triggers) are invisible to it:
bound the staleness with cache lifetimes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError, NotStorableError, StockpyleError
from ..keys import key_model
from ..stores.sqlalchemy import _mapper_of, _require_sqlalchemy

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction, UOWTransaction
    from sqlalchemy.orm import sessionmaker as SessionMaker
    from sqlalchemy.orm.state import InstanceState

__all__ = ["StockpyleSessionExtension", "sessionmaker"]

log = logging.getLogger("stockpyle.ext.sqlalchemy")

_OPERATIONS = ("batch_put", "batch_delete")

# (class, {column attribute: value}) -- enough to rebuild a detached copy
_Snapshot = tuple[type, dict[str, Any]]


class _Pending:
    """Cache changes recorded in one (sub)transaction, not yet committed.

    Puts are keyed by identity key, not by instance: the identity map holds
    objects weakly, so one row may be flushed through several instances.
    """

    __slots__ = ("deleted", "deletes", "old_values", "puts", "to_snapshot")

    def __init__(self) -> None:
        self.puts: dict[Any, _Snapshot] = {}
        self.deletes: list[_Snapshot] = []
        # identities whose earlier puts are void (deleted, or primary key changed)
        self.deleted: set[Any] = set()
        # the flushed objects themselves, until after_flush_postexec snapshots
        # them: an object nobody else references could be gone by then
        self.to_snapshot: list[Any] = []
        # state -> key values read from the database just before a flush
        self.old_values: dict[InstanceState[Any], dict[str, Any]] = {}

    def absorb(self, child: _Pending) -> None:
        """Take over the records of a released SAVEPOINT (later changes win)."""
        for identity in child.deleted:
            self.puts.pop(identity, None)
        self.deleted |= child.deleted
        self.deletes.extend(child.deletes)
        self.puts.update(child.puts)


class _ClassInfo:
    """Per mapped class: the column attributes and the key attribute names."""

    __slots__ = ("columns", "key_names", "klass")

    def __init__(self, klass: type, columns: tuple[str, ...], key_names: frozenset[str]) -> None:
        self.klass = klass
        self.columns = columns
        self.key_names = key_names


class StockpyleSessionExtension:
    """Apply the inserts, updates and deletes of attached sessions to a cache store.

    :param store: the cache to keep in step (any store, typically a
        :class:`~stockpyle.stores.MemcacheStore` or a
        :class:`~stockpyle.ChainedStore` of the cache layers -- not the
        :class:`~stockpyle.stores.SqlAlchemyStore` itself).
    :raises ConfigurationError: when ``store`` is missing or is not a store.
    :raises ImportError: when SQLAlchemy 2 is not installed.

    :ivar errors: how many cache operations failed after a commit (logged, never raised).
    """

    def __init__(self, store: Any = None) -> None:
        _require_sqlalchemy()
        if store is None:
            raise ConfigurationError(
                "StockpyleSessionExtension needs the cache store to keep in step, "
                "e.g. StockpyleSessionExtension(store=MemcacheStore(servers=[...]))"
            )
        missing = [op for op in _OPERATIONS if not callable(getattr(store, op, None))]
        if missing:
            raise ConfigurationError(f"{store!r} is not a store: it lacks {', '.join(missing)}")
        self.store = store
        self.errors = 0
        self._errors_lock = threading.Lock()
        self._info_key = ("stockpyle.pending", id(self))
        self._classes: dict[type, _ClassInfo | None] = {}
        self._listeners: dict[str, Callable[..., Any]] = {
            "before_flush": self._before_flush,
            "after_flush": self._after_flush,
            "after_flush_postexec": self._after_flush_postexec,
            "persistent_to_deleted": self._persistent_to_deleted,
            "do_orm_execute": self._do_orm_execute,
            "after_commit": self._after_commit,
            "after_transaction_end": self._after_transaction_end,
        }

    def __repr__(self) -> str:
        return f"<StockpyleSessionExtension store={self.store!r} errors={self.errors}>"

    # -- attaching ----------------------------------------------------------

    def attach(self, target: Any) -> Any:
        """Listen to the sessions of ``target``; returns ``target``.

        ``target`` is a ``sessionmaker`` (its sessions only), a
        ``scoped_session`` (its factory), a ``Session`` subclass (its
        instances) or one ``Session``.  Attaching twice is harmless.  Attaching
        to the ``Session`` base class itself would capture every session in
        the process, which is refused: use a subclass or a sessionmaker.

        :raises ConfigurationError: for anything else.
        """
        from sqlalchemy import event
        from sqlalchemy.orm import Session, scoped_session
        from sqlalchemy.orm import sessionmaker as sa_sessionmaker

        if target is Session:
            raise ConfigurationError(
                "attaching to sqlalchemy.orm.Session would affect every session in the process; "
                "attach to your sessionmaker, scoped_session, a Session subclass or one session"
            )
        valid = isinstance(target, (sa_sessionmaker, scoped_session, Session)) or (
            isinstance(target, type) and issubclass(target, Session)
        )
        if not valid:
            raise ConfigurationError(
                f"cannot attach to {target!r}: expected a sessionmaker, scoped_session, Session subclass or session"
            )
        for name, listener in self._listeners.items():
            if not event.contains(target, name, listener):
                event.listen(target, name, listener)
        return target

    def detach(self, target: Any) -> None:
        """Stop listening to ``target`` (the object given to :meth:`attach`)."""
        from sqlalchemy import event

        for name, listener in self._listeners.items():
            if event.contains(target, name, listener):
                event.remove(target, name, listener)

    # -- bookkeeping --------------------------------------------------------

    def _class_info(self, klass: type) -> _ClassInfo | None:
        try:
            return self._classes[klass]
        except KeyError:
            pass
        info: _ClassInfo | None = None
        mapper = _mapper_of(klass)
        if mapper is not None:
            try:
                model = key_model(klass)
            except NotStorableError:
                model = None
            except StockpyleError as exc:
                # a malformed __stockpyle_keys__ must not break the user's flush
                log.error("stockpyle: %s objects are not cached: %s", klass.__qualname__, exc)
                model = None
            if model is not None:
                names = {name for each in model.base_models() for spec in each.specs for name in spec}
                columns = tuple(prop.key for prop in mapper.column_attrs)
                info = _ClassInfo(klass, columns, frozenset(names))
        self._classes[klass] = info
        return info

    def _table(self, session: Session) -> dict[SessionTransaction, _Pending]:
        table: dict[SessionTransaction, _Pending] | None = session.info.get(self._info_key)
        if table is None:
            table = session.info[self._info_key] = {}
        return table

    def _owner(self, session: Session) -> SessionTransaction | None:
        return session.get_nested_transaction() or session.get_transaction()

    def _pending(self, session: Session) -> _Pending | None:
        owner = self._owner(session)
        if owner is None:  # pragma: no cover - flushes and statements always run in one
            return None
        table = self._table(session)
        pending = table.get(owner)
        if pending is None:
            pending = table[owner] = _Pending()
        return pending

    def _failed(self, action: str, exc: BaseException) -> None:
        with self._errors_lock:
            self.errors += 1
        log.error("stockpyle: the cache could not %s after a commit; it may be stale: %s", action, exc, exc_info=exc)

    # -- flush --------------------------------------------------------------

    def _before_flush(self, session: Session, flush_context: UOWTransaction, instances: Any) -> None:
        # A key attribute assigned while expired (e.g. after a commit) has no
        # old value in its history, yet the cache holds the object under that
        # old value.  The row still has it until this flush runs: read it now.
        from sqlalchemy import select
        from sqlalchemy.orm.attributes import instance_state

        pending: _Pending | None = None
        for obj in session.dirty:
            info = self._class_info(type(obj))
            if info is None:
                continue
            state = instance_state(obj)
            if state.key is None:
                continue
            unknown = []
            for name in info.key_names:
                if name in info.columns:
                    history = state.attrs[name].history
                    if history.added and not history.deleted and not history.unchanged:
                        unknown.append(name)
            if not unknown:
                continue
            pk_names = _pk_names(state)
            stmt = select(*[getattr(type(obj), n) for n in unknown]).where(
                *[getattr(type(obj), n) == v for n, v in zip(pk_names, state.key[1], strict=True)]
            )
            row = session.execute(stmt).first()
            if row is not None:
                if pending is None:
                    pending = self._pending(session)
                if pending is not None:
                    pending.old_values[state] = dict(zip(unknown, row, strict=True))
        for obj in session.deleted:
            info = self._class_info(type(obj))
            if info is None:
                continue
            state = instance_state(obj)
            if state.key is not None and not state.unloaded.isdisjoint(info.key_names):
                # the cache entry is keyed by these; load them while the row exists
                for name in info.key_names:
                    if name in state.unloaded and name in info.columns:
                        getattr(obj, name)
                        break

    def _after_flush(self, session: Session, flush_context: UOWTransaction) -> None:
        # SQL has run; session.new/dirty still list what this flush wrote and
        # attribute history still holds the values from before it.
        from sqlalchemy.orm.attributes import instance_state

        pending = self._pending(session)
        if pending is None:  # pragma: no cover
            return
        for obj in session.new:
            if self._class_info(type(obj)) is not None:
                pending.to_snapshot.append(obj)
        for obj in session.dirty:
            info = self._class_info(type(obj))
            if info is None or not session.is_modified(obj, include_collections=False):
                continue
            state = instance_state(obj)
            old = self._old_keys(state, info, pending.old_values.pop(state, None))
            if old is not None:
                pending.deletes.append((type(obj), old))
            if state.key is not None and state.mapper.identity_key_from_instance(obj) != state.key:
                # the primary key changed: a put recorded under the old identity is void
                pending.puts.pop(state.key, None)
                pending.deleted.add(state.key)
            pending.to_snapshot.append(obj)

    @staticmethod
    def _old_keys(
        state: InstanceState[Any], info: _ClassInfo, known: dict[str, Any] | None = None
    ) -> dict[str, Any] | None:
        """The key values the cache holds for ``state`` if a key attribute changed, else None."""
        changed = False
        old: dict[str, Any] = {}
        attrs = state.attrs
        for name in info.key_names:
            if name not in info.columns:
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

    def _after_flush_postexec(self, session: Session, flush_context: UOWTransaction) -> None:
        # The flush is complete: primary keys and foreign keys are final.  Take
        # the snapshot now, because a COMMIT may expire every attribute and no
        # SQL may run in after_commit.
        pending = self._pending(session)
        if pending is None or not pending.to_snapshot:
            return
        from sqlalchemy.orm.attributes import instance_state

        objs, pending.to_snapshot = pending.to_snapshot, []
        for obj in objs:
            state = instance_state(obj)
            if state.key is None or state.deleted or state.was_deleted:
                continue
            info = self._class_info(state.class_)
            if info is None:  # pragma: no cover - filtered in after_flush
                continue
            if not state.unloaded.isdisjoint(info.columns):
                # server defaults/onupdate values the flush could not return:
                # load them now, inside the transaction that wrote them
                try:
                    for name in info.columns:
                        if name in state.unloaded:
                            getattr(obj, name)  # loads every expired attribute at once
                            break
                except Exception as exc:  # noqa: BLE001 - fall back to invalidation
                    log.warning("stockpyle: could not load generated values of %r; invalidating it: %s", obj, exc)
            values = state.dict
            snapshot = {name: values[name] for name in info.columns if name in values}
            if len(snapshot) == len(info.columns):
                pending.puts[state.key] = (state.class_, snapshot)
            else:
                pending.puts.pop(state.key, None)
                pending.deletes.append((state.class_, snapshot))

    def _persistent_to_deleted(self, session: Session, instance: Any) -> None:
        # fires for every deleted row, delete-orphan cascades included
        from sqlalchemy.orm.attributes import instance_state

        info = self._class_info(type(instance))
        if info is None:
            return
        pending = self._pending(session)
        if pending is None:  # pragma: no cover
            return
        state = instance_state(instance)
        pending.puts.pop(state.key, None)
        pending.deleted.add(state.key)
        values = state.dict
        current = {name: values[name] for name in info.columns if name in values}
        if state.key is not None:
            # the identity holds the primary key the row was stored under
            for name, value in zip(_pk_names(state), state.key[1], strict=True):
                current.setdefault(name, value)
        pending.deletes.append((type(instance), current))
        old = self._old_keys(state, info)
        if old is not None:
            pending.deletes.append((type(instance), {**current, **old}))

    # -- bulk statements ----------------------------------------------------

    def _do_orm_execute(self, orm_execute_state: ORMExecuteState) -> Any:
        if not (orm_execute_state.is_update or orm_execute_state.is_delete):
            return None
        mapper = orm_execute_state.bind_mapper
        klass = mapper.class_ if mapper is not None else None
        if klass is None or self._class_info(klass) is None:
            return None
        session = orm_execute_state.session
        # The statement does not say which rows it touches: select them (their
        # key values as they are now) in the same transaction, then run it.
        touched = self._rows_touched(orm_execute_state, klass)
        result = orm_execute_state.invoke_statement()
        # a fresh session begins its transaction on the first statement, so
        # the owner is looked up only now
        pending = self._pending(session)
        if pending is not None:
            pending.deletes.extend(touched)
            # a snapshot taken at an earlier flush of these rows is out of date
            # now: it must not be put back after the invalidation
            assert mapper is not None  # klass came from it
            pk_names = [mapper.get_property_by_column(c).key for c in mapper.primary_key]
            for _klass, values in touched:
                if all(name in values for name in pk_names):
                    identity = mapper.identity_key_from_primary_key(tuple(values[name] for name in pk_names))
                    pending.puts.pop(identity, None)
                    pending.deleted.add(identity)
        return result

    def _rows_touched(self, orm_execute_state: ORMExecuteState, klass: type) -> list[_Snapshot]:
        from sqlalchemy import select, tuple_

        mapper = _mapper_of(klass)
        info = self._class_info(klass)
        if mapper is None or info is None:  # pragma: no cover - checked by the caller
            return []
        names = list(info.columns)
        columns = [getattr(klass, name) for name in names]
        stmt = select(*columns)
        parameters: Any = orm_execute_state.parameters
        statement: Any = orm_execute_state.statement
        if isinstance(parameters, Sequence) and parameters:
            # ORM bulk UPDATE by primary key: session.execute(update(Model), [{pk..., col...}, ...])
            pk_names = [mapper.get_property_by_column(c).key for c in mapper.primary_key]
            idents = [tuple(row.get(name) for name in pk_names) for row in parameters]
            if len(pk_names) == 1:
                stmt = stmt.where(getattr(klass, pk_names[0]).in_([i[0] for i in idents]))
            else:
                stmt = stmt.where(tuple_(*[getattr(klass, n) for n in pk_names]).in_(idents))
        elif statement.whereclause is not None:
            stmt = stmt.where(statement.whereclause)
        rows = orm_execute_state.session.execute(stmt).all()
        polymorphic_on = mapper.polymorphic_on
        discriminator = None
        if polymorphic_on is not None:
            try:
                discriminator = mapper.get_property_by_column(polymorphic_on).key
            except Exception:  # noqa: BLE001 - an expression, not a mapped column
                discriminator = None
        touched: list[_Snapshot] = []
        for row in rows:
            values = dict(zip(names, row, strict=True))
            target = klass
            if discriminator is not None and values.get(discriminator) in mapper.polymorphic_map:
                target = mapper.polymorphic_map[values[discriminator]].class_
            touched.append((target, values))
        return touched

    # -- transaction end ----------------------------------------------------

    def _after_commit(self, session: Session) -> None:
        table = session.info.get(self._info_key)
        if not table:
            return
        nested = session.get_nested_transaction()
        if nested is not None:
            # a SAVEPOINT was released: its changes now belong to the enclosing
            # transaction and stand or fall with it
            child = table.pop(nested, None)
            if child is not None:
                parent = nested.parent
                while parent is not None and not parent.nested and parent.parent is not None:
                    parent = parent.parent
                if parent is not None:
                    table.setdefault(parent, _Pending()).absorb(child)
            return
        root = session.get_transaction()
        pending = table.pop(root, None) if root is not None else None
        # whatever is left belongs to transactions that are ending with this one
        table.clear()
        if pending is not None:
            self._apply(pending)

    def _after_transaction_end(self, session: Session, transaction: SessionTransaction) -> None:
        # rolled back (or already applied): nothing recorded in it may reach the cache
        table = session.info.get(self._info_key)
        if table:
            table.pop(transaction, None)

    def _apply(self, pending: _Pending) -> None:
        deletes = [_copy_of(klass, values, complete=False) for klass, values in pending.deletes]
        puts = [_copy_of(snap[0], snap[1], complete=True) for snap in pending.puts.values() if snap is not None]
        if deletes:
            try:
                self.store.batch_delete(deletes)
            except Exception as exc:  # noqa: BLE001 - never break commit() for the cache
                self._failed(f"delete {len(deletes)} object(s)", exc)
        if puts:
            try:
                self.store.batch_put(puts)
            except Exception as exc:  # noqa: BLE001 - never break commit() for the cache
                self._failed(f"put {len(puts)} object(s)", exc)


def _pk_names(state: InstanceState[Any]) -> list[str]:
    mapper = state.mapper
    return [mapper.get_property_by_column(c).key for c in mapper.primary_key]


def _copy_of(klass: type, values: dict[str, Any], complete: bool) -> Any:
    """A new instance of ``klass`` holding ``values`` as committed state.

    Complete copies (every column known) become detached persistent
    instances, so readers of the cache can use them and merge them into their
    sessions; partial ones only carry key values for deletions.
    """
    from sqlalchemy import inspect
    from sqlalchemy.orm import make_transient_to_detached
    from sqlalchemy.orm.attributes import set_committed_value

    copy: Any = inspect(klass).class_manager.new_instance()
    for name, value in values.items():
        set_committed_value(copy, name, value)
    if complete:
        make_transient_to_detached(copy)
    return copy


def sessionmaker(
    extension: StockpyleSessionExtension | Iterable[StockpyleSessionExtension] | None = None, **kwargs: Any
) -> SessionMaker[Any]:
    """A :class:`sqlalchemy.orm.sessionmaker` with ``extension`` attached.

    The drop-in for the 0.1 spelling ``sessionmaker(extension=ext)``; every
    other keyword argument goes to SQLAlchemy's ``sessionmaker``.

    :param extension: one extension or several.
    :raises ConfigurationError: when ``extension`` is not an extension.
    """
    _require_sqlalchemy()
    from sqlalchemy import orm

    maker = orm.sessionmaker(**kwargs)
    extensions: list[Any]
    if extension is None:
        extensions = []
    elif isinstance(extension, StockpyleSessionExtension):
        extensions = [extension]
    else:
        extensions = list(extension)
    for ext in extensions:
        if not isinstance(ext, StockpyleSessionExtension):
            raise ConfigurationError(f"extension must be a StockpyleSessionExtension; got {ext!r}")
        ext.attach(maker)
    return maker
