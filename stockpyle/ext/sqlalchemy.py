"""Keep a cache store in step with ORM sessions: :class:`StockpyleSessionExtension`.

SQLAlchemy 2 has no ``SessionExtension``; the extension listens to session
events instead.  Attach it to the sessions whose writes the cache must follow::

    from stockpyle.ext.sqlalchemy import StockpyleSessionExtension, sessionmaker

    ext = StockpyleSessionExtension(store=cache)
    Session = sessionmaker(extension=ext, bind=engine)   # drop-in for the 0.1 API
    # or: ext.attach(existing_sessionmaker / scoped_session / Session subclass / session)

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
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..exceptions import ConfigurationError
from ..stores.chained import ChainedStore
from ._recorder import FlushOutcome, FlushRecorder, require_sqlalchemy

if TYPE_CHECKING:  # pragma: no cover
    from sqlalchemy.orm import Session
    from sqlalchemy.orm import sessionmaker as SessionMaker

__all__ = ["StockpyleSessionExtension", "sessionmaker"]

log = logging.getLogger("stockpyle.ext.sqlalchemy")

_OPERATIONS = ("batch_put", "batch_delete")


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
    :raises ConfigurationError: when ``store`` is missing or is not a store.
    :raises ImportError: when SQLAlchemy 2 is not installed.

    :ivar errors: how many cache operations failed after a commit, or could
        not be done (logged, never raised).
    """

    def __init__(self, store: Any = None) -> None:
        require_sqlalchemy()
        if store is None:
            raise ConfigurationError(
                "StockpyleSessionExtension needs the cache store to keep in step, "
                "e.g. StockpyleSessionExtension(store=MemcacheStore(servers=[...]))"
            )
        missing = [op for op in _OPERATIONS if not callable(getattr(store, op, None))]
        if missing:
            raise ConfigurationError(f"{store!r} is not a store: it lacks {', '.join(missing)}")
        self.store = store
        # what the commits are applied to: a chain remembers and repairs what a layer missed
        self._target: Any = store
        if not isinstance(store, ChainedStore):
            try:
                self._target = ChainedStore([store])
            except ConfigurationError:
                pass  # an object with only the two batch writes: used as it is
        self.errors = 0
        self._errors_lock = threading.Lock()
        self._recorder = FlushRecorder(self._apply)

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
        self._recorder.attach(target)
        return target

    def detach(self, target: Any) -> None:
        """Stop listening to ``target`` (the object given to :meth:`attach`)."""
        self._recorder.detach(target)

    # -- after the commit ---------------------------------------------------

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
