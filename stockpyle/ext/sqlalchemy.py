"""Keep a cache store in step with ORM sessions: :class:`StockpyleSessionExtension`.

SQLAlchemy 2 has no ``SessionExtension``; the extension listens to session
events instead.  Attach it to the sessions whose writes the cache must follow::

    from stockpyle.ext.sqlalchemy import StockpyleSessionExtension, sessionmaker

    ext = StockpyleSessionExtension(store=cache)
    Session = sessionmaker(extension=ext, bind=engine)   # drop-in for the 0.1 API
    # or: ext.attach(existing_sessionmaker / scoped_session / Session subclass / session)
    # asyncio: ext.attach(async_sessionmaker / async_scoped_session / AsyncSession subclass / session)

What it does, per session and per transaction (no state is shared between
sessions or threads):

* each flush records every row it inserted or updated -- the objects added
  or changed, children reached by cascades and merges, objects flushed by
  autoflush -- and reads them back from the database after the flush (one
  SELECT per class and chunk), so the cache gets the values the database
  stored;
* it records every row a flush deleted, delete-orphan cascades included,
  and, for rows whose key attributes changed (primary key too), the *old*
  key values;
* statements executed through the session -- ORM or Core ``update()``/
  ``delete()``, dialect upserts, ``bulk_update_mappings``,
  ``bulk_save_objects``, Core statements on ``session.connection()``,
  ``text()`` -- record the rows they touch by key when those can be known,
  and otherwise the whole class for invalidation (see docs/sqlalchemy.rst
  for the table of every write path);
* a released SAVEPOINT hands its records to the enclosing transaction; a
  rollback (of a savepoint, of the transaction, after a failed flush) drops them;
* only when the outermost COMMIT has succeeded does the cache change: whole
  classes are invalidated (``store.invalidate_class``), then one
  ``batch_delete`` (deleted rows, entries under old key values, rows hit by
  statements), then one ``batch_put`` of detached copies holding the
  committed column values (column state only: no relationships);
* a failing cache never breaks ``commit()``: the error is logged on the
  ``stockpyle.ext.sqlalchemy`` logger and counted in
  :attr:`~StockpyleSessionExtension.errors`; so is a store that cannot
  invalidate a whole class.

Writes that bypass attached sessions (Core ``connection.execute`` on
connections of your own, other applications, triggers) are invisible to it:
bound the staleness with cache lifetimes.

With ``read_through=True`` it also answers ``session.get(Model, pk)`` from
the cache layers when they hold the row (no SQL; the instance returned
belongs to the session), and fills them from the SELECT when they do not.
The identity map is asked first, as always; SQL is used for every get that
carries options (``with_for_update``, ``populate_existing``, ``options=``,
execution options, an identity token, bind arguments) and for every class
whose inheritance family the session has pending or uncommitted writes of
(see docs/sqlalchemy.rst, "Read-through").
"""

from __future__ import annotations

import copy
import inspect
import logging
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import ConfigurationError
from ..stores.chained import ChainedStore
from ._recorder import FlushOutcome, FlushRecorder, class_facts, column_copy, family_of, require_sqlalchemy

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.engine import Result
    from sqlalchemy.orm import Mapper, ORMExecuteState, Session
    from sqlalchemy.orm import sessionmaker as SessionMaker

__all__ = ["StockpyleSessionExtension", "sessionmaker"]

log = logging.getLogger("stockpyle.ext.sqlalchemy")

_OPERATIONS = ("batch_put", "batch_delete")

# The execution options and bind arguments a bare session.get() executes its
# SELECT with (SQLAlchemy 2.1.9: loading._load_on_pk_identity passes
# "_sa_orm_load_options", Session._execute_internal adds
# "_result_disable_adapt_to_context").  SQLAlchemy has no public way to tell a
# get() apart from other ORM SELECTs, so these private option names are the
# marker; anything beyond them is an option the caller asked for: SQL.
_GET_OPTIONS: Final = frozenset({"_sa_orm_load_options", "_result_disable_adapt_to_context"})
_GET_BIND_ARGUMENTS: Final = frozenset({"clause", "mapper"})

# isolation levels under which every statement reads the latest committed rows
_STATEMENT_SNAPSHOTS: Final = frozenset({"READ COMMITTED", "READ UNCOMMITTED", "AUTOCOMMIT"})


class StockpyleSessionExtension:
    """Apply the inserts, updates and deletes of attached sessions to a cache store.

    :param store: the cache to keep in step (any store, typically a
        :class:`~stockpyle.stores.MemcacheStore` or a
        :class:`~stockpyle.ChainedStore` of the cache layers -- not the
        :class:`~stockpyle.stores.SqlAlchemyStore` itself).  Statements whose
        rows cannot be known invalidate whole classes through the store's
        ``invalidate_class(klass)``; a store without it is reported.  A store
        that is not a chain is used through a one-layer
        :class:`~stockpyle.ChainedStore`, so that the writes it could not take
        (its server down or frozen) are remembered and invalidated in it, in
        the background, as soon as it answers again.
    :param read_through: also answer ``session.get(Model, pk)`` of attached
        sessions from ``store`` when it holds the object, without SQL, and
        fill ``store`` from the SELECT when it does not (see
        docs/sqlalchemy.rst, "Read-through").  Every layer of ``store`` must
        be a cache (``is_cache``), never the database store.
    :raises ConfigurationError: when ``store`` is missing or is not a store,
        is an asyncio store (the cache writes are made inside ``commit()``,
        synchronously, also for an ``AsyncSession``: give it synchronous stores
        on the same caches), or ``read_through`` is asked of a store with a
        layer that is not a cache.
    :raises ImportError: when SQLAlchemy 2 is not installed.

    :ivar errors: how many cache operations failed after a commit, or could
        not be done (logged, never raised); read-through lookups and fills
        that failed count too (the get then uses SQL).
    :ivar read_hits: gets answered from the cache (read-through mode).
    :ivar read_misses: gets the cache did not have, answered by SQL (and filled).
    :ivar read_bypassed: gets answered by SQL because the session had pending
        or uncommitted writes of the class's family.
    """

    def __init__(self, store: Any = None, *, read_through: bool = False) -> None:
        require_sqlalchemy()
        if store is None:
            raise ConfigurationError(
                "StockpyleSessionExtension needs the cache store to keep in step, "
                "e.g. StockpyleSessionExtension(store=MemcacheStore(servers=[...]))"
            )
        missing = [op for op in _OPERATIONS if not callable(getattr(store, op, None))]
        if missing:
            raise ConfigurationError(f"{store!r} is not a store: it lacks {', '.join(missing)}")
        if any(inspect.iscoroutinefunction(getattr(type(store), op, None)) for op in _OPERATIONS):
            raise ConfigurationError(
                f"{store!r} is an asyncio store; the extension writes to the cache inside commit(), which "
                "SQLAlchemy runs as synchronous code (also for an AsyncSession): give it synchronous stores on "
                "the same caches, e.g. ChainedStore([the ProcessMemoryStore of your AsyncChainedStore, "
                "RedisStore(url, namespace=...)])"
            )
        self.store = store
        # what the commits are applied to: a chain remembers and repairs what a layer missed
        self._target: Any = store
        if not isinstance(store, ChainedStore):
            try:
                self._target = ChainedStore([store])
            except ConfigurationError:
                pass  # an object with only the two batch writes: used as it is
        self.read_through = bool(read_through)
        if self.read_through:
            layers = getattr(self._target, "stores", None)
            if not isinstance(self._target, ChainedStore) or layers is None:
                raise ConfigurationError(f"read_through=True needs a store stockpyle can chain; got {store!r}")
            not_caches = [layer for layer in layers if not getattr(type(layer), "is_cache", False)]
            if not_caches:
                raise ConfigurationError(
                    "read_through=True fills the store from the session's SELECTs, so every layer must be a "
                    f"cache; {', '.join(repr(layer) for layer in not_caches)} is not (give the extension the "
                    "cache layers only, never the SqlAlchemyStore)"
                )
        self.errors = 0
        self.read_hits = 0
        self.read_misses = 0
        self.read_bypassed = 0
        self._errors_lock = threading.Lock()
        self._recorder = FlushRecorder(self._apply, on_select=self._answer_get if self.read_through else None)

    def __repr__(self) -> str:
        mode = " read_through" if self.read_through else ""
        return f"<StockpyleSessionExtension store={self.store!r}{mode} errors={self.errors}>"

    # -- attaching ----------------------------------------------------------

    def attach(self, target: Any) -> Any:
        """Listen to the sessions of ``target``; returns ``target``.

        ``target`` is a ``sessionmaker`` (its sessions only), a
        ``scoped_session`` (its factory), a ``Session`` subclass (its
        instances) or one ``Session``.  Attaching twice is harmless.  Attaching
        to the ``Session`` base class itself would capture every session in
        the process, which is refused: use a subclass or a sessionmaker.

        asyncio: ``target`` may also be an ``async_sessionmaker`` (its
        sessions only: it is given a ``sync_session_class`` of its own, a
        subclass of the one it had, through ``async_sessionmaker.configure``),
        an ``async_scoped_session`` (its factory), an ``AsyncSession``
        subclass (its ``sync_session_class``) or one ``AsyncSession`` (its
        ``sync_session``).  The cache writes after a commit are then made
        from inside ``await session.commit()``, synchronously: the event loop
        waits for the cache round trip (nothing for process memory).

        :raises ConfigurationError: for anything else.
        """
        from sqlalchemy.orm import Session, scoped_session
        from sqlalchemy.orm import sessionmaker as sa_sessionmaker

        given = target
        target = _sync_target(target, create=True)
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
        self._recorder.attach(target)
        return given

    def detach(self, target: Any) -> None:
        """Stop listening to ``target`` (the object given to :meth:`attach`)."""
        self._recorder.detach(_sync_target(target, create=False))

    # -- after the commit ---------------------------------------------------

    # -- read-through --------------------------------------------------------

    def _count(self, name: str) -> None:
        with self._errors_lock:
            setattr(self, name, getattr(self, name) + 1)

    def _answer_get(self, state: ORMExecuteState) -> Result[Any] | None:
        """The ``do_orm_execute`` answer to a bare ``session.get()``: from the cache, or ``None`` (run the SQL)."""
        found = _plain_get(state)
        if found is None:
            return None
        mapper, ident = found
        klass = mapper.class_
        facts = class_facts(klass)
        if facts is None or not any(set(spec) == set(facts.pk_names) for spec in facts.key_specs):
            return None  # not cached, or not cached under its primary key
        session = state.session
        if self._family_written(session, family_of(klass)):
            self._count("read_bypassed")
            return None
        keydict = dict(zip(facts.pk_names, ident, strict=True))
        loaded: dict[str, Any] = {}
        current = _reads_latest(session, mapper)

        def load() -> Any:
            # the cache misses: run the get's own SELECT in the caller's session
            try:
                frozen = state.invoke_statement().freeze()
            except BaseException as exc:
                loaded["error"] = exc
                raise
            loaded["frozen"] = frozen
            # an older snapshot's row is answered, never cached
            return _filling_copy(klass, facts, frozen().all()) if current else None

        try:
            cached = self._target.get_or_create(klass, keydict, load)
        except Exception as exc:
            if loaded.get("error") is exc:
                raise  # the SELECT failed: the caller's error, not the cache's
            self._failed_read(klass, keydict, exc)
            cached = None
        if "frozen" in loaded:
            self._count("read_misses")
            return loaded["frozen"]()  # type: ignore[no-any-return]
        if cached is None or not isinstance(cached, klass):
            return None  # nobody filled it (another reader's load gave nothing): ask the database
        try:
            attached = session.merge(_private_copy(cached), load=False)
        except Exception as exc:  # noqa: BLE001 - a broken entry must not break the get
            self._failed_read(klass, keydict, exc)
            return None
        self._count("read_hits")
        return _one_object(attached)

    def _family_written(self, session: Session, family: type) -> bool:
        """Whether ``session`` holds pending writes of ``family`` or wrote it in its open transaction."""
        from sqlalchemy import inspect

        for pending in (session.new, session.dirty, session.deleted):
            for obj in pending:
                if inspect(obj).mapper.base_mapper.class_ is family:
                    return True
        return family in self._recorder.written_families(session)

    def _failed_read(self, klass: type, keydict: dict[str, Any], exc: BaseException) -> None:
        with self._errors_lock:
            self.errors += 1
        log.warning("stockpyle: read-through of %s %r failed, using SQL: %s", klass.__qualname__, keydict, exc,
                    exc_info=exc)  # fmt: skip

    def _failed(self, action: str, exc: BaseException | None) -> None:
        with self._errors_lock:
            self.errors += 1
        if exc is None:
            log.error("stockpyle: the cache could not %s after a commit; it may be stale", action)
        else:
            log.error("stockpyle: the cache could not %s after a commit; it may be stale: %s",
                      action, exc, exc_info=exc)  # fmt: skip

    def _apply(self, session: Session, outcome: FlushOutcome) -> None:
        try:
            effects = outcome.effects()
        except Exception as exc:  # noqa: BLE001 - never break commit() for the cache
            self._failed(f"build the copies of {len(outcome.stored)} object(s)", exc)
            return
        # declared by the store's type (BaseStore.supports_class_invalidation); a
        # duck-typed store without the flag has it if its type has the method
        declared = getattr(type(self.store), "supports_class_invalidation", None)
        can_invalidate = callable(getattr(type(self.store), "invalidate_class", None)) if declared is None else declared
        target = self._target
        for klass in sorted(effects.classes, key=lambda c: c.__qualname__):
            if not can_invalidate:
                self._failed(
                    f"invalidate every cached {klass.__qualname__} ({self.store!r} cannot invalidate every cached "
                    f"object of a class)",
                    None,
                )
                continue
            try:
                target.invalidate_class(klass)
            except Exception as exc:  # noqa: BLE001 - never break commit() for the cache
                self._failed(f"invalidate every cached {klass.__qualname__}", exc)
        if effects.removed:
            try:
                target.batch_delete(list(effects.removed))
            except Exception as exc:  # noqa: BLE001 - never break commit() for the cache
                self._failed(f"delete {len(effects.removed)} object(s)", exc)
        if effects.stored:
            try:
                target.batch_put(list(effects.stored))
            except Exception as exc:  # noqa: BLE001 - never break commit() for the cache
                self._failed(f"put {len(effects.stored)} object(s)", exc)


def _sync_target(target: Any, *, create: bool) -> Any:
    """What to listen to for an asyncio ``target`` (see :meth:`StockpyleSessionExtension.attach`); others as given."""
    try:
        from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker
    except ImportError:  # pragma: no cover - part of SQLAlchemy 2
        return target
    if isinstance(target, AsyncSession):
        return target.sync_session
    if isinstance(target, type) and issubclass(target, AsyncSession):
        return target.sync_session_class
    if isinstance(target, async_scoped_session):
        target = target.session_factory
    if not isinstance(target, async_sessionmaker):
        return target
    current = target.kw.get("sync_session_class") or target.class_.sync_session_class
    if getattr(current, "_stockpyle_session_of", None) is target or not create:
        return current
    # the maker's own session class, as sessionmaker makes one for its sessions:
    # listening to it reaches this maker's sessions only
    own = type(current.__name__, (current,), {"__module__": current.__module__, "_stockpyle_session_of": target})
    target.configure(sync_session_class=own)
    return own


def _plain_get(state: ORMExecuteState) -> tuple[Mapper[Any], tuple[Any, ...]] | None:
    """``(mapper, primary key)`` when ``state`` is the SELECT of a ``session.get()`` without options, else ``None``."""
    from sqlalchemy import Select
    from sqlalchemy.orm.context import QueryContext
    from sqlalchemy.sql import operators
    from sqlalchemy.sql.elements import BinaryExpression, BindParameter, BooleanClauseList

    if state.is_column_load or state.is_relationship_load or state.is_from_statement or state.is_executemany:
        return None  # refreshes, expired attributes, lazy loads, text
    local = state.local_execution_options
    if "_sa_orm_load_options" not in local or not set(local) <= _GET_OPTIONS:
        return None
    if not set(state.execution_options) <= _GET_OPTIONS or not set(state.bind_arguments) <= _GET_BIND_ARGUMENTS:
        return None  # execution options (populate_existing, ...), also the session's; bind arguments
    if state.load_options is not QueryContext.default_load_options:
        return None  # with_for_update (version check), populate_existing, identity_token, refresh, no autoflush
    statement: Any = state.statement
    mapper = state.bind_mapper
    if not isinstance(statement, Select) or mapper is None or list(state.all_mappers) != [mapper]:
        return None
    described = statement.column_descriptions
    if len(described) != 1 or described[0].get("expr") is not mapper.class_:
        return None
    # loader options and FOR UPDATE live on the statement, where SQLAlchemy
    # (2.1.9) offers no public accessor for them
    if statement._with_options or statement._for_update_arg is not None:
        return None
    where = statement.whereclause
    parameters: Any = state.parameters
    if where is None or not isinstance(parameters, dict):
        return None
    conjunction = isinstance(where, BooleanClauseList) and where.operator is operators.and_
    terms = list(where.clauses) if conjunction else [where]
    primary_key = list(mapper.primary_key)
    values: dict[int, Any] = {}
    for term in terms:
        if not (isinstance(term, BinaryExpression) and term.operator is operators.eq):
            return None
        bind = term.right
        if not isinstance(bind, BindParameter) or bind.key not in parameters:
            return None
        position = next((i for i, column in enumerate(primary_key) if term.left.compare(column)), None)
        if position is None or position in values:
            return None
        values[position] = parameters[bind.key]
    if len(values) != len(primary_key):
        return None
    return mapper, tuple(values[i] for i in range(len(primary_key)))


def _reads_latest(session: Session, mapper: Mapper[Any]) -> bool:
    """Whether a SELECT run now in ``session`` reads the latest committed row (so its row may be cached).

    True when the session has no transaction yet (the SELECT begins one: its
    snapshot is taken now) or when its connection reads the latest committed
    rows at every statement (READ COMMITTED and below).  Under REPEATABLE READ
    or SERIALIZABLE, a transaction already under way may read a row older than
    the caches hold.
    """
    if not session.in_transaction():
        return True
    connection = session.connection(bind_arguments={"mapper": mapper})
    level = connection.get_execution_options().get("isolation_level") or connection.default_isolation_level
    return level is None or str(level).upper().replace("_", " ") in _STATEMENT_SNAPSHOTS


def _filling_copy(klass: type, facts: Any, rows: Sequence[Any]) -> Any:
    """The copy to cache of the one object a get's SELECT loaded; ``None`` when it must not be cached.

    Only a clean object of exactly ``klass`` with every column loaded is
    cached: cache entries hold every column, and a subclass found by a lookup
    of its base is cached when it is read as itself.
    """
    from sqlalchemy.orm.attributes import instance_state

    if len(rows) != 1:
        return None
    obj = rows[0][0]
    if type(obj) is not klass:
        return None
    state = instance_state(obj)
    values = state.dict
    if state.modified or any(name not in values for name in facts.columns):
        return None
    return column_copy(klass, copy.deepcopy({name: values[name] for name in facts.columns}))


def _private_copy(cached: Any) -> Any:
    """A copy of a cached object sharing no mutable value with the cache entry (other readers hold it)."""
    from sqlalchemy.orm.attributes import instance_state

    facts = class_facts(type(cached))
    values = instance_state(cached).dict
    names = facts.columns if facts is not None else ()
    return column_copy(type(cached), copy.deepcopy({name: values[name] for name in names if name in values}))


def _one_object(obj: Any) -> Result[Any]:
    """A result of one row holding ``obj``: what ``session.get()`` reads its answer from."""
    from sqlalchemy.engine import IteratorResult
    from sqlalchemy.engine.result import SimpleResultMetaData

    return IteratorResult(SimpleResultMetaData([type(obj).__name__]), iter([(obj,)]))


def sessionmaker(
    extension: StockpyleSessionExtension | Iterable[StockpyleSessionExtension] | None = None, **kwargs: Any
) -> SessionMaker[Any]:
    """A :class:`sqlalchemy.orm.sessionmaker` with ``extension`` attached.

    The drop-in for the 0.1 spelling ``sessionmaker(extension=ext)``; every
    other keyword argument goes to SQLAlchemy's ``sessionmaker``.

    :param extension: one extension or several.
    :raises ConfigurationError: when ``extension`` is not an extension.
    """
    require_sqlalchemy()
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
