"""SQL databases through SQLAlchemy 2: :class:`SqlAlchemyStore`.

The store is the *system of record* layer of a chain: it keeps mapped objects
in their tables, and because it sits last in a :class:`~stockpyle.ChainedStore`
the objects it returns and the objects it writes (with the primary keys and
server defaults the database assigned) are what the cache layers above hold.

The store reports what each write really did (``reports_effects``, see
:class:`~stockpyle.effects.WriteEffects`): rows reached by cascades, old
identities of moved primary keys, and every written row as the database
stored it, so a chain can bring its caches in line with all of it.

Importing this module does not import SQLAlchemy; the constructor does, so
``from stockpyle import *`` works without the driver installed.  Importing it
registers a key resolver (:func:`mapped_key_specs`) with
:func:`stockpyle.keys.register_key_resolver`: mapped classes without
``__stockpyle_keys__`` are keyed by their primary key and their NOT NULL
unique constraints in every store, so cache layers can hold them too
(:mod:`stockpyle.keys` imports this module by itself as soon as SQLAlchemy
is imported, so this holds even in a process that never uses the store).  It
also registers :func:`mapped_version_attribute` with
:func:`stockpyle.keys.register_version_resolver`: a mapper's
``version_id_col`` becomes the objects' version.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any, ClassVar, Final, NoReturn, TypeVar, cast

from ..effects import WriteAction, WriteEffects
from ..exceptions import (
    ConfigurationError,
    MissingKeyAttributeError,
    NonUniqueKeyError,
    NotStorableError,
    SchemaError,
    StaleVersionError,
    StoreError,
    StoreUnavailableError,
    UnknownKeyError,
)
from ..ext._recorder import (
    FlushOutcome,
    FlushRecorder,
    guard_relationships,
    mapper_of,
    require_sqlalchemy,
)
from ..keys import canonical_value, key_model, register_key_resolver, register_version_resolver
from ..lifetimes import LifetimeCallback
from .base import AsyncBaseStore, BaseStore, KeyDict

if TYPE_CHECKING:  # pragma: no cover
    import sqlalchemy as sa
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine
    from sqlalchemy.orm import Mapper, Session

__all__ = [
    "ASYNC_INSTALL_HINT",
    "AsyncSqlAlchemyStore",
    "SqlAlchemyStore",
    "mapped_key_specs",
    "mapped_version_attribute",
]

log = logging.getLogger("stockpyle.stores.sqlalchemy")

T = TypeVar("T")

#: Lookups per SELECT in :meth:`SqlAlchemyStore.batch_get` and ``batch_delete``.
#: Bind-parameter limits differ per database and build (SQLite 999 or 32766,
#: PostgreSQL 65535), so a batch is sent in chunks of this many lookups.
DEFAULT_CHUNK_SIZE = 500

_UNSEEN: Final[Any] = object()

# Value types whose key form needs no check: a value of exactly the column's
# own type among these is always a supported, matchable key value.
_PLAIN_TYPES: Final = frozenset({str, int, bytes})

_NO_EFFECTS: Final = WriteEffects(stored=(), removed=())
# where a store session's recorder leaves the outcome of its commit
_OUTCOME: Final = "stockpyle.store_outcome"


# ----------------------------------------------------------------------------
# mapped classes


def mapped_key_specs(klass: type) -> list[tuple[str, ...]] | None:
    """Key declarations for a mapped class without ``__stockpyle_keys__``.

    The primary key comes first, then every unique constraint (or unique
    index) whose columns are all mapped and NOT NULL.  Nullable unique columns
    are left out on purpose: many rows may hold NULL there, so it does not
    identify one object.  Returns ``None`` for classes that are not mapped.
    This is the resolver registered with
    :func:`stockpyle.keys.register_key_resolver`.

    :param klass: any class.
    :returns: a list of attribute-name tuples, or ``None``.
    """
    mapper = mapper_of(klass)
    if mapper is None:
        return None
    from sqlalchemy import UniqueConstraint
    from sqlalchemy.orm.exc import UnmappedColumnError

    def attribute_names(columns: Iterable[Any]) -> tuple[str, ...] | None:
        names = []
        for column in columns:
            try:
                prop = mapper.get_property_by_column(column)
            except UnmappedColumnError:
                return None
            names.append(prop.key)
        return tuple(names) if names else None

    specs: list[tuple[str, ...]] = []
    primary = attribute_names(mapper.primary_key)
    if primary is None:  # pragma: no cover - every mapper has a primary key
        return None
    specs.append(primary)
    for table in mapper.tables:
        table = cast("sa.Table", table)
        groups: list[list[Any]] = [list(c.columns) for c in table.constraints if isinstance(c, UniqueConstraint)]
        groups.extend(list(index.columns) for index in table.indexes if index.unique)
        for columns in groups:
            if not columns or any(getattr(column, "nullable", True) for column in columns):
                continue
            names = attribute_names(columns)
            if names is not None and sorted(names) not in (sorted(s) for s in specs):
                specs.append(names)
    return specs


register_key_resolver(mapped_key_specs)


def mapped_version_attribute(klass: type) -> str | None:
    """The attribute of a mapped class's ``version_id_col``, or ``None``.

    Registered with :func:`stockpyle.keys.register_version_resolver`, so the
    objects of a mapped class with a version counter (``__mapper_args__ =
    {"version_id_col": ...}``) are versioned in every store without declaring
    ``__stockpyle_version__``: caches then never replace such an object by an
    older version (integer counters order; other versions, such as a UUID
    ``version_id_generator``, only tell versions apart -- see
    :func:`stockpyle.consistency.compare_versions`).  An explicit ``__stockpyle_version__`` wins.

    :param klass: any class.
    :returns: the attribute name, or ``None`` for unmapped or unversioned classes.
    """
    mapper = mapper_of(klass)
    if mapper is None or mapper.version_id_col is None:
        return None
    from sqlalchemy.orm.exc import UnmappedColumnError

    try:
        return mapper.get_property_by_column(mapper.version_id_col).key
    except UnmappedColumnError:  # pragma: no cover - SQLAlchemy requires the column to be mapped
        return None


register_version_resolver(mapped_version_attribute)


def _python_type(column: Any) -> type | None:
    try:
        ptype = column.type.python_type
    except (NotImplementedError, AttributeError):
        return None
    return ptype if isinstance(ptype, type) else None


class _Mapped:
    """What the store needs to know about one mapped class (computed once)."""

    __slots__ = (
        "attrs",
        "column_keys",
        "entity",
        "fast_get",
        "generated",
        "klass",
        "mapper",
        "merge_relationships",
        "options",
        "pk_names",
        "pk_set",
        "preload",
        "types",
        "unique_rows",
        "version_attr",
    )

    def __init__(self, klass: type, mapper: Mapper[Any]) -> None:
        from sqlalchemy.orm import lazyload, undefer, with_polymorphic

        self.klass = klass
        self.mapper = mapper
        self.attrs: dict[str, Any] = {}
        self.types: dict[str, type | None] = {}
        generated: set[str] = set()
        for prop in mapper.column_attrs:
            self.attrs[prop.key] = getattr(klass, prop.key)
            column = prop.columns[0]
            self.types[prop.key] = _python_type(column)
            if (
                getattr(column, "default", None) is not None
                or getattr(column, "server_default", None) is not None
                or (column.primary_key and getattr(column, "autoincrement", False) in (True, "auto"))
            ):
                generated.add(prop.key)
        self.generated = frozenset(generated)
        self.column_keys = tuple(self.attrs)
        self.pk_names = tuple(mapper.get_property_by_column(c).key for c in mapper.primary_key)
        self.pk_set = frozenset(self.pk_names)
        # Subclasses with tables of their own (joined inheritance) would come
        # back with unloaded attributes, which a detached object cannot load
        # later: load those classes through one polymorphic SELECT instead of
        # Session.get.
        joined = any(m.local_table is not mapper.local_table for m in mapper.self_and_descendants)
        self.entity: Any = with_polymorphic(klass, "*") if joined else klass
        self.fast_get = not joined
        # Returned (and so cached) objects hold every column and no
        # relationship: deferred columns are undeferred, eager relationships
        # are not loaded (their rows would go stale inside the entry).
        options: list[Any] = []
        if any(getattr(prop, "deferred", False) for prop in mapper.column_attrs):
            options.append(undefer("*"))
        if mapper.relationships:
            options.append(lazyload("*"))
        self.options: tuple[Any, ...] = tuple(options)
        # Deletes load with the mapper's own strategies (eager collections help
        # the cascade); joined eager loading of collections repeats parent
        # rows, and only then must those results be de-duplicated.
        self.unique_rows = any(rel.lazy == "joined" and rel.uselist for rel in mapper.relationships)
        # relationships a merge follows: an object carrying one of them must be merged
        self.merge_relationships = tuple(rel.key for rel in mapper.relationships if "merge" in rel.cascade)
        # the rows of a chunk of single-column primary keys, built once (compiled cache)
        self.preload: Any = None
        if len(self.pk_names) == 1:
            from sqlalchemy import bindparam, select

            where = self.attrs[self.pk_names[0]].in_(bindparam("stockpyle_idents", expanding=True))
            self.preload = select(self.entity).where(where).options(*self.options)
        self.version_attr: str | None = None
        if mapper.version_id_col is not None:
            self.version_attr = mapper.get_property_by_column(mapper.version_id_col).key

    def matchable(self, name: str, value: Any) -> bool:
        """False when no row can match ``value`` type-faithfully (e.g. ``123`` for a text column)."""
        ptype = self.types[name]
        if value is None or ptype is None or type(value) is ptype:
            return True
        if isinstance(value, bool) and ptype is not bool:
            return False
        return isinstance(value, ptype)


def _unknown(klass: type, name: str, info: _Mapped) -> UnknownKeyError:
    return UnknownKeyError(
        f"{klass.__qualname__} has no mapped column {name!r} to look up; its columns are: {', '.join(info.column_keys)}"
    )


# ----------------------------------------------------------------------------
# errors


# what the drivers say when a table or column does not exist
_UNDEFINED_SQLSTATES: Final = frozenset({"42P01", "42703"})  # PostgreSQL: undefined table / column
_UNDEFINED_MYSQL_ERRORS: Final = frozenset({1146, 1054})  # MySQL/MariaDB: no such table / unknown column
_UNDEFINED_SQLITE: Final = ("no such table", "no such column", "has no column named")


def _schema_missing(orig: BaseException | None) -> bool:
    """Whether a driver error says that a table or a column does not exist."""
    if orig is None:
        return False
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if code in _UNDEFINED_SQLSTATES:
        return True
    args = getattr(orig, "args", ())
    if args and type(args[0]) is int and args[0] in _UNDEFINED_MYSQL_ERRORS:
        return True
    text = str(orig).lower()
    return type(orig).__module__.startswith("sqlite3") and any(marker in text for marker in _UNDEFINED_SQLITE)


def _map_error(exc: BaseException, action: str, store: SqlAlchemyStore) -> StoreError | None:
    """The stockpyle error for a driver/SQLAlchemy error, or ``None`` to re-raise it as is."""
    from sqlalchemy import exc as sa_exc
    from sqlalchemy.orm.exc import StaleDataError

    where = f"SqlAlchemyStore ({store.describe()}) failed to {action}"
    if isinstance(exc, StaleDataError):
        return StaleVersionError(
            f"{where}: the object was changed or deleted by another writer since this copy was read "
            f"({exc}); read it again, reapply the change and put it again"
        )
    if isinstance(exc, sa_exc.DBAPIError):
        if _schema_missing(exc.orig):
            return SchemaError(
                f"{where}: the database lacks a table or column of the mapping ({exc.orig}); create the "
                f"tables with metadata.create_all(engine) or migrate the schema"
            )
        if exc.connection_invalidated or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return StoreUnavailableError(f"{where}: database unavailable: {exc.orig}")
        return StoreError(f"{where}: {exc.orig}")
    if isinstance(exc, (sa_exc.DisconnectionError, sa_exc.TimeoutError)):
        return StoreUnavailableError(f"{where}: {exc}")
    if isinstance(exc, sa_exc.SQLAlchemyError):
        return StoreError(f"{where}: {exc}")
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return StoreUnavailableError(f"{where}: {exc}")
    return None


# ----------------------------------------------------------------------------
# the store


def _check_sources(owner: str, uri: Any, engine: Any, sessionmaker: Any, engine_options: Any) -> None:
    """Exactly one of ``uri``/``engine``/``sessionmaker``; ``engine_options`` only with ``uri``."""
    given = [
        name for name, value in (("uri", uri), ("engine", engine), ("sessionmaker", sessionmaker)) if value is not None
    ]
    if len(given) != 1:
        raise ConfigurationError(
            f"{owner} takes exactly one of uri=, engine= or sessionmaker=; "
            + (f"got {' and '.join(given)}" if given else "got none")
        )
    if engine_options is not None and uri is None:
        raise ConfigurationError("engine_options= only applies with uri=; configure your engine yourself")


class SqlAlchemyStore(BaseStore):
    """A relational database, through the SQLAlchemy 2 ORM, as a stockpyle store.

    ::

        store = SqlAlchemyStore(uri="sqlite:///data.sqlite")
        Base.metadata.create_all(store.engine)
        store.put(obj)
        store.get(MyMappedObject, {"foobar": 123})

    * Every operation runs in a short-lived session of its own (thread-safe;
      the connection goes back to the pool before the call returns).
    * ``get`` answers any combination of mapped columns: a primary-key lookup
      uses ``Session.get``; other lookups run one query and raise
      :class:`~stockpyle.exceptions.NonUniqueKeyError` when two rows match.
      Lookups compare type-faithfully, like every store: ``{"id": "1"}``
      matches nothing in an integer column.
    * ``batch_get`` sends one SELECT per chunk of ``chunk_size`` lookups
      (composite keys use a row-value ``IN``).
    * ``put``/``batch_put`` insert or update in one transaction per call
      (``Session.merge``).  An object read from the store (or a cache above
      it) writes only the columns changed since it was read, so a stale copy
      never reverts another writer's columns; with a ``version_id_col`` a
      stale copy is refused (:class:`~stockpyle.exceptions.StaleVersionError`).
      Every written row is then read back, and the caller's own object gets
      the values the database stored (generated keys, defaults, rounding) and
      becomes a detached persistent instance (unless it belongs to a session
      of yours, in which case only its column values are refreshed).
    * ``delete``/``batch_delete`` load the rows and delete them through the
      ORM (so cascades run) in one transaction per call.
    * :meth:`write` is what the four write operations are built on: it also
      reports every row the ORM wrote or deleted besides the objects given
      (cascades, merged children, old identities of moved primary keys), as a
      :class:`~stockpyle.effects.WriteEffects` that a
      :class:`~stockpyle.ChainedStore` applies to its caches.
    * Returned objects are detached, with every column loaded (deferred ones
      too) and no relationship: reading one raises
      :class:`~stockpyle.exceptions.RelationshipNotCachedError` until the
      object is attached to a session (``session.merge(obj, load=False)``).
    * Instances of classes that are not mapped (plain ``__stockpyle_keys__``
      classes) are ignored, so one chain can hold mapped and plain classes;
      each such class is logged once at WARNING and every ignored object is
      counted in ``stats().ignored``.

    Driver errors become :class:`~stockpyle.exceptions.StoreUnavailableError`
    (connection lost, database down, locked),
    :class:`~stockpyle.exceptions.SchemaError` (a missing table or column, on
    every database) or :class:`~stockpyle.exceptions.StoreError` (constraint
    violations...), raised ``from`` the original; the transaction is rolled back.

    Tables are not created by the store: call ``metadata.create_all(store.engine)``.

    :param uri: a database URL for :func:`sqlalchemy.create_engine`.
    :param engine: an existing :class:`~sqlalchemy.engine.Engine`.
    :param sessionmaker: a :class:`~sqlalchemy.orm.sessionmaker` (or
        ``scoped_session``, whose factory is used); its sessions are created
        per operation and never shared.
    :param engine_options: keyword arguments for ``create_engine`` (``uri`` only).
    :param chunk_size: lookups per SELECT in batch operations.
    :param polymorphic: accepted for symmetry with the other stores; SQL
        inheritance always answers queries for a base class.
    :param lifetime_cb: accepted and ignored: rows do not expire.
    :raises ConfigurationError: unless exactly one of ``uri``, ``engine`` and
        ``sessionmaker`` is given, or for invalid options.
    :raises ImportError: when SQLAlchemy 2 is not installed.
    """

    supports_expiry = False
    #: :meth:`write` reports what each write did (see :class:`~stockpyle.effects.WriteEffects`).
    reports_effects: ClassVar[bool] = True

    def __init__(
        self,
        *,
        uri: Any = None,
        engine: Engine | None = None,
        sessionmaker: Callable[..., Session] | None = None,
        engine_options: Mapping[str, Any] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        polymorphic: bool = False,
        lifetime_cb: LifetimeCallback | None = None,
    ) -> None:
        require_sqlalchemy()
        import sqlalchemy as sa
        from sqlalchemy import orm

        super().__init__(polymorphic=polymorphic, lifetime_cb=lifetime_cb)
        _check_sources("SqlAlchemyStore", uri, engine, sessionmaker, engine_options)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ConfigurationError(f"chunk_size must be a positive int; got {chunk_size!r}")
        self.chunk_size = chunk_size
        self._owns_engine = False
        maker: Callable[..., Session]
        if uri is not None:
            if not isinstance(uri, (str, sa.URL)):
                raise ConfigurationError(f"uri must be a database URL string; got {uri!r}")
            try:
                engine = sa.create_engine(uri, **dict(engine_options or {}))
            except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, TypeError) as exc:
                raise ConfigurationError(f"SqlAlchemyStore cannot use uri={uri!r}: {exc}") from exc
            self._owns_engine = True
        if engine is not None:
            if not isinstance(engine, sa.Engine):
                raise ConfigurationError(f"engine must be a sqlalchemy Engine; got {engine!r}")
            maker = orm.sessionmaker(bind=engine)
            # Reads get a session class of their own: the write sessions'
            # class carries the recorder's listeners once a write has been
            # made, and every session event would dispatch to them (~5% of a
            # Session.get), although they record only the sessions a write
            # marked. A user's sessionmaker is used as given, for both.
            reader: Callable[..., Session] = orm.sessionmaker(bind=engine)
        else:
            if isinstance(sessionmaker, orm.scoped_session):
                # a scoped_session hands out one shared session per thread; the
                # store needs fresh ones, so it uses the underlying factory
                sessionmaker = sessionmaker.session_factory
            if not callable(sessionmaker):
                raise ConfigurationError(f"sessionmaker must be a sqlalchemy sessionmaker; got {sessionmaker!r}")
            maker = reader = sessionmaker
            bind = getattr(sessionmaker, "kw", {}).get("bind")
            engine = bind if isinstance(bind, sa.Engine) else None
        self.engine: Engine | None = engine
        self.sessionmaker: Callable[..., Session] = maker
        self._reader = reader
        self._infos: dict[type, _Mapped | None] = {}
        self._infos_lock = threading.Lock()
        self._warned: set[type] = set()

    # -- helpers ------------------------------------------------------------

    def describe(self) -> str:
        """The database URL (password hidden), for messages and ``repr``."""
        if self.engine is None:
            return repr(self.sessionmaker)
        return self.engine.url.render_as_string(hide_password=True)

    def __repr__(self) -> str:
        return f"<SqlAlchemyStore {self.describe()}>"

    def maps(self, klass: type) -> bool:
        """Whether ``klass`` is a mapped class, whose objects this store keeps in a table.

        Objects of other (plain ``__stockpyle_keys__``) classes are ignored by
        writes and never found by reads.

        :raises NotStorableError: when ``klass`` is not a class.
        """
        return self._info(klass) is not None

    def _info(self, klass: type) -> _Mapped | None:
        try:
            return self._infos[klass]
        except KeyError:
            pass
        except TypeError:
            raise NotStorableError(f"expected a class, got {klass!r}") from None
        mapper = mapper_of(klass)
        info = _Mapped(klass, mapper) if mapper is not None else None
        with self._infos_lock:
            return self._infos.setdefault(klass, info)

    def _unmapped(self, klass: type) -> None:
        """Accept a class this store does not map only if some store could key it."""
        key_model(klass)  # raises NotStorableError for classes without keys

    def _ignore(self, klass: type, count: int) -> None:
        """Count objects of an unmapped class left alone by a write; warn once per class."""
        self.stats().ignored += count
        with self._infos_lock:
            warned = klass in self._warned
            self._warned.add(klass)
        if not warned:
            log.warning(
                "stockpyle: %r ignores %s objects: the class is not mapped, so they are kept only in the "
                "cache layers above it and vanish when evicted or expired; map the class, or store it "
                "through a chain without this store",
                self, klass.__qualname__,
            )  # fmt: skip

    def _session(self) -> Session:
        """A short-lived session of this store whose writes the recorder follows."""
        session = self.sessionmaker(expire_on_commit=False)
        _RECORDER.mark(session)
        return session

    def _raise_mapped(self, exc: Exception, action: str) -> NoReturn:
        mapped = _map_error(exc, action, self)
        if mapped is None:
            raise exc
        raise mapped from exc

    # -- reads --------------------------------------------------------------

    def _check_lookup(self, klass: type, info: _Mapped, keydict: KeyDict) -> bool:
        """Validate one lookup; False when it can match no row (e.g. a wrongly typed value)."""
        if not isinstance(keydict, Mapping):
            raise TypeError(f"a lookup must be a dict of column values, e.g. {{'id': 1}}; got {keydict!r}")
        if not keydict:
            raise UnknownKeyError(f"an empty lookup cannot find a {klass.__qualname__}; give column values")
        matchable = True
        types = info.types
        for name, value in keydict.items():
            if name not in types:
                raise _unknown(klass, name, info)
            canonical_value(value)  # unsupported key types are refused, as in every store
            if matchable and not info.matchable(name, value):
                matchable = False
        return matchable

    def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        """Return the ``klass`` row matching ``keydict`` (any mapped columns), or ``None``.

        :raises UnknownKeyError: when a name is not a mapped column.
        :raises NonUniqueKeyError: when more than one row matches.
        :raises StoreError: when the database fails.
        """
        info = self._infos.get(klass, _UNSEEN)
        if info is _UNSEEN:
            info = self._info(klass)
        if info is None:
            self._unmapped(klass)
            return None
        if not self._check_lookup(klass, info, keydict):
            return None
        try:
            if info.fast_get and len(keydict) == len(info.pk_names) and info.pk_set.issuperset(keydict):
                if len(info.pk_names) == 1:
                    ident: Any = keydict[info.pk_names[0]]
                    if ident is None:
                        return None
                else:
                    ident = tuple([keydict[name] for name in info.pk_names])
                    if None in ident:
                        return None
                with self._reader() as session:
                    found = session.get(klass, ident, options=info.options)
                return None if found is None else guard_relationships(found)
            return self._select_one(klass, info, keydict)
        except Exception as exc:  # noqa: BLE001 - mapped into the stockpyle tree or re-raised
            self._raise_mapped(exc, "get")

    def _select_one(self, klass: type[T], info: _Mapped, keydict: KeyDict) -> T | None:
        from sqlalchemy import select

        attrs = info.attrs
        stmt = select(info.entity).where(*[attrs[name] == value for name, value in keydict.items()])
        with self._reader() as session:
            rows = session.scalars(stmt.options(*info.options).limit(2)).all()
        if len(rows) > 1:
            raise NonUniqueKeyError(klass, dict(keydict))
        return guard_relationships(rows[0]) if rows else None

    def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        """Look up many rows in one SELECT per chunk; request order, ``None`` per miss.

        Requests may mix key sets (``{"id": 1}`` and ``{"email": "x"}``).

        :raises UnknownKeyError: when a name is not a mapped column.
        :raises NonUniqueKeyError: when a lookup matches more than one row.
        :raises StoreError: when the database fails.
        """
        requests = list(keydicts)
        results: list[Any] = [None] * len(requests)
        info = self._info(klass)
        if info is None:
            self._unmapped(klass)
            for keydict in requests:
                if not isinstance(keydict, Mapping):
                    raise TypeError(f"a lookup must be a dict of column values; got {keydict!r}")
            return results
        # distinct lookups per key set: names -> values -> request positions
        groups: dict[tuple[str, ...], dict[tuple[Any, ...], list[int]]] = {}
        types = info.types
        single_pk = info.pk_names[0] if len(info.pk_names) == 1 else None
        last_name: Any = _UNSEEN
        last_type: Any = None
        last_group: dict[tuple[Any, ...], list[int]] = {}
        for position, keydict in enumerate(requests):
            if type(keydict) is dict and len(keydict) == 1:
                # the common case, kept cheap: one column, a value of its own type
                [(name, value)] = keydict.items()
                if name != last_name:
                    ptype = types.get(name, _UNSEEN)
                    if ptype is _UNSEEN:
                        raise _unknown(klass, name, info)
                    last_name = name
                    last_type = ptype if ptype in _PLAIN_TYPES else _UNSEEN
                    last_group = groups.setdefault((name,), {})
                if type(value) is not last_type:
                    canonical_value(value)
                    if not info.matchable(name, value) or (value is None and name == single_pk):
                        continue
                found = last_group.get((value,))
                if found is None:
                    last_group[(value,)] = [position]
                else:
                    found.append(position)
                continue
            if not self._check_lookup(klass, info, keydict):
                continue
            names = tuple(sorted(keydict))
            values = tuple([keydict[name] for name in names])
            if len(names) == len(info.pk_names) and info.pk_set.issuperset(names) and None in values:
                continue  # no row has a NULL primary key
            groups.setdefault(names, {}).setdefault(values, []).append(position)
        if len(groups) == 1:
            [(names, group)] = groups.items()
            if len(names) == 1 and 0 < len(group) <= self.chunk_size:
                return self._batch_one_column(klass, info, names[0], group, results)
        return self._batch_general(klass, info, groups, results)

    def _batch_one_column(
        self, klass: type, info: _Mapped, name: str, group: dict[tuple[Any, ...], list[int]], results: list[Any]
    ) -> list[Any]:
        """``batch_get`` when every lookup names the same single column (the usual case)."""
        from sqlalchemy import select

        wanted = [values[0] for values in group]
        if None in wanted:
            return self._batch_general(klass, info, {(name,): group}, results)
        try:
            with self._reader() as session:
                stmt = select(info.entity).where(info.attrs[name].in_(wanted)).options(*info.options)
                rows = session.scalars(stmt).all()
        except Exception as exc:  # noqa: BLE001 - mapped into the stockpyle tree or re-raised
            self._raise_mapped(exc, "batch_get")
        index: dict[Any, Any] = {}
        for row in rows:
            guard_relationships(row)
            value = row.__dict__.get(name)
            if value in index and index[value] is not row:
                raise NonUniqueKeyError(klass, {name: value})
            index[value] = row
        for (value,), positions in group.items():
            row = index.get(value)
            if row is not None:
                for position in positions:
                    results[position] = row
        return results

    def _batch_general(
        self,
        klass: type,
        info: _Mapped,
        groups: dict[tuple[str, ...], dict[tuple[Any, ...], list[int]]],
        results: list[Any],
    ) -> list[Any]:
        """``batch_get`` for any mix of key sets: one SELECT per chunk of lookups."""
        lookups = [(names, values) for names, group in groups.items() for values in group]
        if not lookups:
            return results
        try:
            with self._reader() as session:
                for start in range(0, len(lookups), self.chunk_size):
                    chunk = lookups[start : start + self.chunk_size]
                    for names, values, row in self._select_many(session, klass, info, chunk):
                        for position in groups[names][values]:
                            results[position] = row
        except Exception as exc:  # noqa: BLE001 - mapped into the stockpyle tree or re-raised
            self._raise_mapped(exc, "batch_get")
        return results

    def _select_many(
        self, session: Session, klass: type, info: _Mapped, chunk: list[tuple[tuple[str, ...], tuple[Any, ...]]]
    ) -> list[tuple[tuple[str, ...], tuple[Any, ...], Any]]:
        """Run one SELECT for ``chunk`` and pair each found lookup with its row."""
        from sqlalchemy import and_, or_, select, tuple_

        attrs = info.attrs
        by_names: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for names, values in chunk:
            by_names.setdefault(names, []).append(values)
        conditions: list[Any] = []
        for names, value_list in by_names.items():
            plain = [v for v in value_list if None not in v]
            if plain:
                if len(names) == 1:
                    conditions.append(attrs[names[0]].in_([v[0] for v in plain]))
                else:
                    conditions.append(tuple_(*[attrs[n] for n in names]).in_(plain))
            if len(plain) != len(value_list):
                for values in value_list:
                    if None in values:  # IN never matches NULL: spell these out
                        conditions.append(and_(*[attrs[n] == v for n, v in zip(names, values, strict=True)]))
        stmt = select(info.entity).where(conditions[0] if len(conditions) == 1 else or_(*conditions))
        rows = session.scalars(stmt.options(*info.options)).all()
        for row in rows:
            guard_relationships(row)
        found: list[tuple[tuple[str, ...], tuple[Any, ...], Any]] = []
        for names, value_list in by_names.items():
            # index the rows by this key set's values; a value seen twice is not unique
            index: dict[tuple[Any, ...], Any] = {}
            duplicates: set[tuple[Any, ...]] = set()
            if len(names) == 1:
                name = names[0]
                for row in rows:
                    values = (row.__dict__.get(name),)
                    if values in index and index[values] is not row:
                        duplicates.add(values)
                    index[values] = row
            else:
                for row in rows:
                    row_dict = row.__dict__
                    values = tuple([row_dict.get(n) for n in names])
                    if values in index and index[values] is not row:
                        duplicates.add(values)
                    index[values] = row
            for values in value_list:
                row = index.get(values)
                if row is not None:
                    if duplicates and values in duplicates:
                        raise NonUniqueKeyError(klass, dict(zip(names, values, strict=True)))
                    found.append((names, values, row))
        return found

    # -- writes -------------------------------------------------------------

    def _partition(self, objs: Iterable[object], check_keys: bool) -> tuple[list[tuple[Any, _Mapped]], list[object]]:
        """Validate every object before anything is written: (mapped objects, objects of unmapped classes)."""
        items: list[tuple[Any, _Mapped]] = []
        ignored: list[object] = []
        for obj in objs:
            if obj is None:
                raise NotStorableError("None cannot be stored: it has no __stockpyle_keys__")
            info = self._info(type(obj))
            if info is None:
                self._unmapped(type(obj))
                ignored.append(obj)
                continue
            if check_keys:
                self._check_object_keys(obj, info)
            items.append((obj, info))
        return items, ignored

    def _check_object_keys(self, obj: Any, info: _Mapped) -> None:
        """Refuse objects whose key attributes are missing or of unsupported types.

        A mapped attribute that was never set reads as ``None`` rather than
        raising, so this checks the instance dictionary itself.  A missing
        column is allowed when the database can generate it (autoincrement
        primary key, default, server default).
        """
        from sqlalchemy.orm.attributes import instance_state

        state = instance_state(obj)
        values = state.dict
        klass = type(obj)
        model = key_model(klass)
        models = model.base_models() if self.polymorphic else (model,)
        for each in models:
            for spec in each.specs:
                for name in spec:
                    if name in values:
                        canonical_value(values[name])
                    elif name in info.types:
                        if state.key is None and name not in info.generated:
                            raise MissingKeyAttributeError(
                                f"{klass.__qualname__} object has no value for {name!r}, which its keys "
                                f"declare (key {spec!r}); set it before storing the object"
                            )
                    else:
                        try:
                            canonical_value(getattr(obj, name))
                        except AttributeError:
                            raise MissingKeyAttributeError(
                                f"{klass.__qualname__} object has no attribute {name!r}, which its keys "
                                f"declare (key {spec!r})"
                            ) from None

    def put(self, obj: object) -> None:
        """Insert or update ``obj`` (one transaction) and load the stored values onto it.

        An object read from a store writes only the columns changed since
        it was read.

        :raises NotStorableError: for objects of classes without keys.
        :raises MissingKeyAttributeError: when a key column has no value and
            the database would not generate one.
        :raises StaleVersionError: when the object has a ``version_id_col``
            and another writer changed the row since the object was read.
        :raises StoreError: when the database refuses the write (nothing is written).
        """
        self._write("put", [obj])

    def batch_put(self, objs: Iterable[object]) -> None:
        """Insert or update every mapped object of ``objs`` in one transaction.

        :raises StoreError: when the database refuses any of them (nothing is written).
        """
        self._write("put", list(objs))

    def delete(self, obj: object) -> None:
        """Delete ``obj``'s row (ORM cascades apply); absent rows are ignored.

        :raises StoreError: when the database refuses (nothing is deleted).
        """
        self._write("delete", [obj])

    def batch_delete(self, objs: Iterable[object]) -> None:
        """Delete the rows of every mapped object of ``objs`` in one transaction.

        :raises StoreError: when the database refuses any of them (nothing is deleted).
        """
        self._write("delete", list(objs))

    def write(self, action: WriteAction, objs: Sequence[object]) -> WriteEffects:
        """Put or delete ``objs`` (one transaction) and report what the caches must do.

        This is ``batch_put`` (``action="put"``) or ``batch_delete``
        (``"delete"``) that also returns a :class:`~stockpyle.effects.WriteEffects`:

        * ``stored``: a copy of every row the transaction inserted or
          updated -- the objects given, children reached by a merge cascade
          -- read back after the flush, so it holds the values the database
          stored; objects of classes this store does not map, as given;
        * ``removed``: the objects given to ``delete`` and every row the
          ORM deleted (cascades, delete-orphan), the old identity of a
          moved primary key, the old values of a changed unique key;
        * ``classes``: classes whose rows the database changed without the
          ORM knowing which (``ON DELETE CASCADE`` foreign keys that no
          relationship handles).

        :raises ValueError: for an action other than ``"put"`` and ``"delete"``.
        :raises StoreError: see :meth:`batch_put` and :meth:`batch_delete`.
        """
        items = list(objs)
        stats = self.stats()
        start = perf_counter()
        try:
            effects = self._write(action, items)
        except StoreError:
            stats.errors += 1
            raise
        stats.timer("batch_put" if action == "put" else "batch_delete").add(perf_counter() - start)
        if action == "put":
            stats.puts += len(items)
        else:
            stats.deletes += len(items)
        return effects

    def _write(self, action: str, objs: list[object]) -> WriteEffects:
        if action not in ("put", "delete"):
            raise ValueError(f"SqlAlchemyStore.write() takes the action 'put' or 'delete'; got {action!r}")
        items, ignored = self._partition(objs, check_keys=action == "put")
        if ignored:
            counts: dict[type, int] = {}
            for obj in ignored:
                counts[type(obj)] = counts.get(type(obj), 0) + 1
            for klass, count in counts.items():
                self._ignore(klass, count)
        if action == "put":
            effects = self._put_items(items) if items else _NO_EFFECTS
            return WriteEffects(stored=(*effects.stored, *ignored), removed=effects.removed, classes=effects.classes)
        effects = self._delete_items(items) if items else _NO_EFFECTS
        return WriteEffects(stored=effects.stored, removed=(*ignored, *effects.removed), classes=effects.classes)

    def _put_items(self, items: list[tuple[Any, _Mapped]]) -> WriteEffects:
        from sqlalchemy.exc import IntegrityError

        try:
            try:
                outcome, identities = self._merge_all(items)
            except IntegrityError:
                # Session.merge() SELECTs, then INSERTs: a concurrent put of the
                # same new primary key can win the race.  A second attempt sees
                # the row and UPDATEs it; a real constraint violation fails again.
                outcome, identities = self._merge_all(items)
        except Exception as exc:  # noqa: BLE001 - mapped into the stockpyle tree or re-raised
            self._raise_mapped(exc, "put")
        for (obj, info), identity in zip(items, identities, strict=True):
            snapshot = outcome.stored.get(identity)
            if snapshot is not None:
                _copy_back(obj, snapshot[1], info)
        return outcome.effects()

    def _merge_all(self, items: list[tuple[Any, _Mapped]]) -> tuple[FlushOutcome, list[Any]]:
        """Merge every object into one transaction; returns what it wrote and each object's identity."""
        from sqlalchemy.orm.attributes import instance_state

        unchanged: dict[Any, tuple[type, dict[str, Any]]] = {}
        session = self._session()
        with session:
            with session.begin():
                # one flush at the end: one read-back per class and chunk
                with session.no_autoflush:
                    loaded = self._preload(session, items)
                    merged = [self._merge_one(session, obj, info, unchanged) for obj, info in items]
                session.flush()
                identities = [instance_state(copy).key for copy in merged]
                del loaded
            outcome: FlushOutcome = session.info.pop(_OUTCOME, None) or FlushOutcome()
        for identity, snapshot in unchanged.items():
            # rows a put found unchanged are re-cached as the database holds them
            if identity not in outcome.deleted:
                outcome.stored.setdefault(identity, snapshot)
        return outcome, identities

    def _preload(self, session: Session, items: list[tuple[Any, _Mapped]]) -> list[Any]:
        """Load the rows of the objects that name one, one SELECT per class and chunk.

        ``Session.merge`` then finds them in the identity map instead of
        sending one SELECT per object; the returned list keeps them alive
        (the identity map holds them weakly).
        """
        from sqlalchemy import select, tuple_
        from sqlalchemy.orm.attributes import instance_state

        wanted: dict[_Mapped, dict[tuple[Any, ...], None]] = {}
        for obj, info in items:
            state = instance_state(obj)
            if state.key is not None:
                ident = tuple(state.key[1])
            else:
                values = state.dict
                ident = tuple([values.get(name) for name in info.pk_names])
            if None not in ident:
                wanted.setdefault(info, {})[ident] = None
        loaded: list[Any] = []
        for info, idents in wanted.items():
            unique = list(idents)
            for start in range(0, len(unique), self.chunk_size):
                chunk = unique[start : start + self.chunk_size]
                if info.preload is not None:
                    found = session.scalars(info.preload, {"stockpyle_idents": [i[0] for i in chunk]})
                else:
                    where = tuple_(*[info.attrs[n] for n in info.pk_names]).in_(chunk)
                    found = session.scalars(select(info.entity).where(where).options(*info.options))
                loaded.extend(found.all())
        return loaded

    def _merge_one(
        self, session: Session, obj: Any, info: _Mapped, unchanged: dict[Any, tuple[type, dict[str, Any]]]
    ) -> Any:
        """Merge one object: all of a new object, only the changed columns of one read from a store."""
        from sqlalchemy.orm.attributes import instance_state

        state = instance_state(obj)
        if state.key is None:
            # a new object (or a transient copy of a row): every value it carries
            return session.merge(obj)
        changed = _changed_columns(state, info)
        if not changed and not any(name in state.dict for name in info.merge_relationships):
            # nothing to write: the row is re-cached as it is (a stale copy
            # must not overwrite it)
            row = session.get(state.mapper.class_, state.key[1], options=info.options)
            if row is not None:
                row_state = instance_state(row)
                values = row_state.dict
                unchanged[row_state.key] = (
                    row_state.class_,
                    {name: values[name] for name in info.column_keys if name in values},
                )
                return row
            # the row is gone: putting the object inserts it again
            return session.merge(obj)
        copy = session.merge(obj)
        _keep_only(session, copy, changed, info)
        return copy

    def _delete_items(self, items: list[tuple[Any, _Mapped]]) -> WriteEffects:
        from sqlalchemy import select, tuple_
        from sqlalchemy.orm.attributes import instance_state

        by_class: dict[_Mapped, list[tuple[Any, ...]]] = {}
        for obj, info in items:
            state = instance_state(obj)
            if state.key is not None:
                # the row this object was loaded from, even if its primary key
                # attribute was changed since
                ident = tuple(state.key[1])
            else:
                ident = tuple([state.dict.get(name) for name in info.pk_names])
            if None not in ident:
                by_class.setdefault(info, []).append(ident)
        outcome: FlushOutcome | None = None
        if by_class:
            session = self._session()
            try:
                with session:
                    with session.begin():
                        for info, idents in by_class.items():
                            unique = list(dict.fromkeys(idents))
                            for start in range(0, len(unique), self.chunk_size):
                                chunk = unique[start : start + self.chunk_size]
                                if len(info.pk_names) == 1:
                                    where = info.attrs[info.pk_names[0]].in_([i[0] for i in chunk])
                                else:
                                    where = tuple_(*[info.attrs[n] for n in info.pk_names]).in_(chunk)
                                result = session.scalars(select(info.entity).where(where))
                                for row in (result.unique() if info.unique_rows else result).all():
                                    session.delete(row)
                    outcome = session.info.pop(_OUTCOME, None)
            except Exception as exc:  # noqa: BLE001 - mapped into the stockpyle tree or re-raised
                self._raise_mapped(exc, "delete")
        effects = outcome.effects() if outcome is not None else _NO_EFFECTS
        # the objects as given first, the rows as the database held them last
        # (a tombstone records the version of the last one written)
        return WriteEffects(
            stored=effects.stored, removed=(*[obj for obj, _info in items], *effects.removed), classes=effects.classes
        )

    # -- lifecycle ----------------------------------------------------------

    def release(self) -> None:
        """Close the pooled connections of an engine this store created from ``uri``."""
        if self._owns_engine and self.engine is not None:
            self.engine.dispose()


def _keep_outcome(session: Session, outcome: FlushOutcome) -> None:
    """Where a store session's recorder leaves what the committed transaction wrote."""
    session.info[_OUTCOME] = outcome


#: One recorder for the write sessions of every SqlAlchemyStore: it listens
#: once per session class, and records only the sessions a store marked.
_RECORDER: Final = FlushRecorder(_keep_outcome, opt_in=True, statements=False)


def _changed_columns(state: Any, info: _Mapped) -> frozenset[str]:
    """The column attributes of ``state`` changed since it was loaded (attribute history)."""
    committed = state.committed_state
    if not committed:
        return frozenset()
    attrs = state.attrs
    return frozenset(name for name in committed if name in info.attrs and attrs[name].history.has_changes())


def _keep_only(session: Session, copy: Any, changed: frozenset[str], info: _Mapped) -> None:
    """Undo, on a merged copy, the columns the caller did not change: the database keeps its values.

    ``Session.merge`` copies every loaded attribute of the given object onto
    the row it loaded; for a copy read a while ago, the unchanged ones may be
    stale and would revert what another writer committed meanwhile.
    """
    from sqlalchemy.orm.attributes import instance_state, set_committed_value
    from sqlalchemy.orm.base import NO_VALUE

    state = instance_state(copy)
    if state.key is None:
        return  # a new row (the object's row was gone): it gets every value
    committed = state.committed_state
    stale = []
    for name in [n for n in committed if n in info.attrs and n not in changed]:
        original = committed[name]
        if original is NO_VALUE:
            stale.append(name)  # never loaded: discard the assignment instead
        else:
            set_committed_value(copy, name, original)
    if stale:
        session.expire(copy, stale)


def _copy_back(obj: Any, values: Mapping[str, Any], info: _Mapped) -> None:
    """Give the caller's ``obj`` the column values the database stored.

    ``Session.merge`` works on another instance; the values the database
    generated or converted (primary keys, defaults, rounding) must reach the
    caller's object too.
    """
    from sqlalchemy.orm import make_transient, make_transient_to_detached, object_session
    from sqlalchemy.orm.attributes import instance_state, set_committed_value

    state = instance_state(obj)
    for name in info.column_keys:
        if name in values:
            set_committed_value(obj, name, values[name])
    if object_session(obj) is None:
        # Transient or detached: make it a detached persistent instance with the
        # new identity (a changed primary key gets a new identity), so adding it
        # to a session later neither INSERTs again nor loses history.
        if state.key is not None:
            make_transient(obj)
        make_transient_to_detached(obj)


# ----------------------------------------------------------------------------
# asyncio

#: What to install for :class:`AsyncSqlAlchemyStore` (SQLAlchemy's asyncio layer needs greenlet).
ASYNC_INSTALL_HINT: Final = (
    "AsyncSqlAlchemyStore requires SQLAlchemy 2 with greenlet: pip install 'stockpyle[sqlalchemy-asyncio]'"
)

#: Some asyncio drivers SQLAlchemy ships dialects for, named in error messages.
ASYNC_DRIVER_EXAMPLES: Final = (
    "postgresql+psycopg_async://, postgresql+asyncpg://, sqlite+aiosqlite://, mysql+aiomysql://, mysql+asyncmy://"
)


def _require_asyncio_sqlalchemy() -> None:
    try:
        require_sqlalchemy()
    except ImportError as exc:
        raise ImportError(f"{ASYNC_INSTALL_HINT} ({exc})") from None
    try:
        # SQLAlchemy's asyncio layer runs the synchronous ORM code in greenlets
        importlib.import_module("greenlet")
    except ImportError:
        raise ImportError(f"{ASYNC_INSTALL_HINT} (greenlet is not installed)") from None


def _call_without_session(_unused: Session, fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


class AsyncSqlAlchemyStore(AsyncBaseStore):
    """:class:`SqlAlchemyStore` for asyncio: an :class:`~sqlalchemy.ext.asyncio.AsyncEngine` as a store.

    ::

        engine = create_async_engine("postgresql+psycopg_async://app@db/app")
        store = AsyncSqlAlchemyStore(engine=engine)
        chain = AsyncChainedStore([ProcessMemoryStore(), store])
        await chain.put(obj)
        found = await chain.get(MyMappedObject, {"foobar": 123})

    Every operation is :class:`SqlAlchemyStore`'s own, run the way
    SQLAlchemy runs ORM code under asyncio: the synchronous ORM code runs
    in a greenlet on the event loop's thread, and each database round trip
    awaits the asyncio driver.  So lookups, write effects (cascades, merged
    children, moved keys), version checks and error translation are those
    of :class:`SqlAlchemyStore` -- its documentation applies -- and the
    operations, :meth:`write` and :meth:`release` are coroutines.  The
    synchronous store that does the work is :attr:`sync_store`.

    * The ORM's Python work (building statements, loading rows) runs on the
      event loop between round trips, as it does with ``AsyncSession``.
    * Each operation checks one connection out of the engine's pool and
      returns it before it finishes -- also when the awaiting task is
      cancelled (``asyncio.timeout``, ``wait_for``, ``TaskGroup``): the
      transaction is rolled back, and a connection caught in the middle of a
      query is closed rather than reused.
    * Tasks share the store freely; no session is shared between operations.

    :param uri: a database URL with an asyncio driver (``postgresql+psycopg_async://``,
        ``postgresql+asyncpg://``, ``sqlite+aiosqlite://``, ``mysql+aiomysql://``,
        ``mysql+asyncmy://`` ...), for :func:`~sqlalchemy.ext.asyncio.create_async_engine`.
    :param engine: an existing :class:`~sqlalchemy.ext.asyncio.AsyncEngine`.
    :param sessionmaker: an :class:`~sqlalchemy.ext.asyncio.async_sessionmaker`
        (or ``async_scoped_session``, whose factory is used) bound to an
        ``AsyncEngine``: the store's sessions get its options and its
        ``sync_session_class`` (so events listening on that class see them).
    :param engine_options: keyword arguments for ``create_async_engine`` (``uri`` only).
    :param chunk_size: lookups per SELECT in batch operations.
    :param polymorphic: as :class:`SqlAlchemyStore`'s.
    :param lifetime_cb: accepted and ignored: rows do not expire.
    :raises ConfigurationError: unless exactly one of ``uri``, ``engine`` and
        ``sessionmaker`` is given; for a URL of a synchronous driver, a
        synchronous :class:`~sqlalchemy.engine.Engine` or ``sessionmaker``
        (use :class:`SqlAlchemyStore` for those); for invalid options.
    :raises ImportError: when SQLAlchemy 2, greenlet or the URL's asyncio
        driver is not installed.
    """

    supports_expiry = False
    #: :meth:`write` reports what each write did (see :class:`~stockpyle.effects.WriteEffects`).
    reports_effects: ClassVar[bool] = True

    def __init__(
        self,
        *,
        uri: Any = None,
        engine: AsyncEngine | None = None,
        sessionmaker: Any = None,
        engine_options: Mapping[str, Any] | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        polymorphic: bool = False,
        lifetime_cb: LifetimeCallback | None = None,
    ) -> None:
        _require_asyncio_sqlalchemy()
        import sqlalchemy as sa
        from sqlalchemy import orm
        from sqlalchemy.ext import asyncio as sa_asyncio

        super().__init__(polymorphic=polymorphic, lifetime_cb=lifetime_cb)
        _check_sources("AsyncSqlAlchemyStore", uri, engine, sessionmaker, engine_options)
        self._owns_engine = False
        sync_maker: Callable[..., Session] | None = None
        if uri is not None:
            engine = self._create_engine(uri, engine_options)
            self._owns_engine = True
        elif engine is not None:
            given_engine: Any = engine  # annotated AsyncEngine, checked: a sync Engine is a common mistake
            if isinstance(given_engine, sa.Engine):
                raise ConfigurationError(
                    f"AsyncSqlAlchemyStore takes an AsyncEngine (sqlalchemy.ext.asyncio.create_async_engine with "
                    f"an asyncio driver); {engine!r} is a synchronous Engine: use SqlAlchemyStore(engine=...)"
                )
            if not isinstance(engine, sa_asyncio.AsyncEngine):
                raise ConfigurationError(f"engine must be a sqlalchemy AsyncEngine; got {engine!r}")
        else:
            if isinstance(sessionmaker, sa_asyncio.async_scoped_session):
                sessionmaker = sessionmaker.session_factory
            if isinstance(sessionmaker, (orm.sessionmaker, orm.scoped_session)):
                raise ConfigurationError(
                    f"AsyncSqlAlchemyStore takes an async_sessionmaker; {sessionmaker!r} makes synchronous "
                    f"sessions: use SqlAlchemyStore(sessionmaker=...)"
                )
            if not isinstance(sessionmaker, sa_asyncio.async_sessionmaker):
                raise ConfigurationError(f"sessionmaker must be a sqlalchemy async_sessionmaker; got {sessionmaker!r}")
            options = dict(sessionmaker.kw)
            bind = options.pop("bind", None)
            if not isinstance(bind, sa_asyncio.AsyncEngine):
                raise ConfigurationError(
                    f"AsyncSqlAlchemyStore needs an async_sessionmaker bound to one AsyncEngine (bind=); "
                    f"{sessionmaker!r} has bind={bind!r}"
                )
            if options.get("binds"):
                raise ConfigurationError(
                    "AsyncSqlAlchemyStore works on one engine: an async_sessionmaker with binds= is not supported"
                )
            options.pop("binds", None)
            sync_class = options.pop("sync_session_class", None) or sessionmaker.class_.sync_session_class
            sync_maker = orm.sessionmaker(bind=bind.sync_engine, class_=sync_class, **options)
            engine = bind
        self.engine: AsyncEngine = engine
        #: The :class:`SqlAlchemyStore` on the engine's ``sync_engine`` that does the work.
        self.sync_store: SqlAlchemyStore = SqlAlchemyStore(
            engine=None if sync_maker is not None else engine.sync_engine,
            sessionmaker=sync_maker,
            chunk_size=chunk_size,
            polymorphic=polymorphic,
        )
        self.chunk_size = chunk_size

    @staticmethod
    def _create_engine(uri: Any, engine_options: Mapping[str, Any] | None) -> AsyncEngine:
        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import create_async_engine

        if not isinstance(uri, (str, sa.URL)):
            raise ConfigurationError(f"uri must be a database URL string; got {uri!r}")
        try:
            url = sa.make_url(uri)
            dialect = url.get_dialect()
        except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
            raise ConfigurationError(f"AsyncSqlAlchemyStore cannot use uri={uri!r}: {exc}") from exc
        shown = url.render_as_string(hide_password=True)
        if not getattr(dialect, "is_async", False):
            raise ConfigurationError(
                f"AsyncSqlAlchemyStore needs a URL with an asyncio driver ({ASYNC_DRIVER_EXAMPLES}); {shown} "
                f"uses the synchronous driver {dialect.driver!r}: use SqlAlchemyStore(uri=...) for it"
            )
        try:
            return create_async_engine(url, **dict(engine_options or {}))
        except ImportError as exc:
            raise ImportError(
                f"AsyncSqlAlchemyStore(uri={shown!r}) needs the asyncio driver {dialect.driver!r}, which is not "
                f"installed ({exc}); {ASYNC_INSTALL_HINT} and install the driver"
            ) from exc
        except (sa.exc.ArgumentError, sa.exc.InvalidRequestError, TypeError) as exc:
            raise ConfigurationError(f"AsyncSqlAlchemyStore cannot use uri={shown!r}: {exc}") from exc

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the synchronous store's ``fn(*args)`` in SQLAlchemy's greenlet bridge.

        ``AsyncSession.run_sync`` is the public way into that bridge: it runs
        a synchronous callable in a greenlet whose database round trips await
        the asyncio driver.  The session it creates is never used (the
        synchronous store opens its own per operation), so it never checks
        out a connection; it costs about 10 us per operation (SQLAlchemy
        2.1.9, measured).  ``AsyncConnection.run_sync`` would hold a second
        pooled connection for every operation.
        """
        from sqlalchemy.ext.asyncio import AsyncSession

        return await AsyncSession().run_sync(_call_without_session, fn, *args)

    def _count_ignored(self, objs: Iterable[object]) -> None:
        ignored = sum(1 for obj in objs if not self.sync_store.maps(type(obj)))
        if ignored:
            self.stats().ignored += ignored

    # -- the contract ---------------------------------------------------------

    def describe(self) -> str:
        """The database URL (password hidden), for messages and ``repr``."""
        return self.sync_store.describe()

    def __repr__(self) -> str:
        return f"<AsyncSqlAlchemyStore {self.describe()}>"

    def maps(self, klass: type) -> bool:
        """Whether ``klass`` is a mapped class (see :meth:`SqlAlchemyStore.maps`)."""
        return self.sync_store.maps(klass)

    async def get(self, klass: type[T], keydict: KeyDict) -> T | None:
        """:meth:`SqlAlchemyStore.get`, awaited."""
        return await self._run(self.sync_store.get, klass, keydict)

    async def batch_get(self, klass: type[T], keydicts: Iterable[KeyDict]) -> list[T | None]:
        """:meth:`SqlAlchemyStore.batch_get`, awaited."""
        return await self._run(self.sync_store.batch_get, klass, list(keydicts))

    async def put(self, obj: object) -> None:
        """:meth:`SqlAlchemyStore.put`, awaited."""
        await self._run(self.sync_store.put, obj)
        self._count_ignored([obj])

    async def batch_put(self, objs: Iterable[object]) -> None:
        """:meth:`SqlAlchemyStore.batch_put`, awaited."""
        items = list(objs)
        await self._run(self.sync_store.batch_put, items)
        self._count_ignored(items)

    async def delete(self, obj: object) -> None:
        """:meth:`SqlAlchemyStore.delete`, awaited."""
        await self._run(self.sync_store.delete, obj)
        self._count_ignored([obj])

    async def batch_delete(self, objs: Iterable[object]) -> None:
        """:meth:`SqlAlchemyStore.batch_delete`, awaited."""
        items = list(objs)
        await self._run(self.sync_store.batch_delete, items)
        self._count_ignored(items)

    async def write(self, action: WriteAction, objs: Sequence[object]) -> WriteEffects:
        """:meth:`SqlAlchemyStore.write`, awaited: put or delete ``objs`` and report what the caches must do.

        :raises ValueError: for an action other than ``"put"`` and ``"delete"``.
        :raises StoreError: see :meth:`SqlAlchemyStore.batch_put` and :meth:`SqlAlchemyStore.batch_delete`.
        """
        items = list(objs)
        stats = self.stats()
        start = perf_counter()
        try:
            effects = await self._run(self.sync_store.write, action, items)
        except StoreError:
            stats.errors += 1
            raise
        stats.timer("batch_put" if action == "put" else "batch_delete").add(perf_counter() - start)
        if action == "put":
            stats.puts += len(items)
        else:
            stats.deletes += len(items)
        self._count_ignored(items)
        return effects

    async def release(self) -> None:
        """Close the pooled connections of an engine this store created from ``uri``."""
        if self._owns_engine:
            await self.engine.dispose()
