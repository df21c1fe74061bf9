"""Database fixtures and mapped test models (pytest plugin ``support.databases``).

Fixtures (names are stable; other test modules rely on them):

``sqlite_url``
    A fresh SQLite file URL under ``tmp_path`` (function scope).
``postgres_url`` / ``mariadb_url``
    The server URL from ``STOCKPYLE_POSTGRES_URL`` (default
    ``postgresql+psycopg://postgres@127.0.0.1:5432/test``) and
    ``STOCKPYLE_MARIADB_URL`` (default ``mysql+pymysql://root@127.0.0.1:3306/test``),
    checked with a real connection once per session.  Unreachable servers
    call :func:`support.services.unavailable` (skip, or fail under ``CI=true``).
``database_url``
    Parametrized over ``sqlite`` / ``postgres`` / ``mariadb`` (the latter two
    carry the ``postgres`` / ``mariadb`` marks); ids are the backend names.
``engine``
    An :class:`~sqlalchemy.engine.Engine` for ``database_url`` built by
    :func:`make_engine` (SQLite gets the savepoint recipe), disposed after the
    test.  Server engines are shared per session; tests get a clean pool state.
``sql_tables``
    Creates the tables of :data:`contract_metadata` on ``engine`` before the
    test and drops them after; yields the engine.
``module_engine``
    Module-scoped and parametrized like ``database_url`` (SQLite file under
    ``tmp_path_factory``): one engine per backend for a whole test module, for
    modules that create their tables once (``create_tables``) and empty them
    per test (:func:`empty_tables`).

Helpers: :class:`QueryCounter` (``with QueryCounter(engine) as queries: ...``
counts the statements sent, via ``before_cursor_execute``; transaction
control such as ``BEGIN`` and ``SAVEPOINT`` is not counted).

Isolation: every table name carries :data:`TABLE_SUFFIX`, unique per test
process (``sp_<name>_<pid>_<random>``), so concurrent test runs sharing one
PostgreSQL/MariaDB database never collide; tables are dropped after each test
(:func:`create_tables` / :func:`drop_tables`).  A subprocess that must use the
same tables sets ``STOCKPYLE_TEST_TABLE_SUFFIX`` to the parent's suffix.

Models: :data:`MAPPED_MODELS` is the :class:`stockpyle.testing.ContractModels`
of mapped classes (``SqlItem``, ``SqlAutomobile``/``SqlCar``/``SqlTruck`` with
single-table inheritance, ``SqlFalsy``) for running the store contract against
SQL stores.  :func:`hostile_values_for` gives the contract's hostile key
strings a backend can hold.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from stockpyle.testing import HOSTILE_VALUES, ContractModels

from .services import unavailable

__all__ = [
    "DEFAULT_MARIADB_URL",
    "DEFAULT_POSTGRES_URL",
    "MAPPED_MODELS",
    "MYSQL_TABLE_ARGS",
    "TABLE_SUFFIX",
    "ContractBase",
    "SqlAutomobile",
    "SqlCar",
    "SqlFalsy",
    "SqlItem",
    "SqlTruck",
    "backend_of",
    "contract_metadata",
    "create_tables",
    "QueryCounter",
    "drop_tables",
    "empty_tables",
    "hostile_values_for",
    "key_string",
    "make_engine",
    "table_name",
]

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_MARIADB_URL = "mysql+pymysql://root@127.0.0.1:3306/test"

#: Unique per test process so parallel runs against one database never collide.
TABLE_SUFFIX = os.environ.get("STOCKPYLE_TEST_TABLE_SUFFIX") or f"{os.getpid()}_{secrets.token_hex(3)}"

#: MariaDB/MySQL table options for text keys: full Unicode, and a binary
#: NO PAD collation so keys compare exactly (case and trailing spaces count),
#: as they do in every other store.
MYSQL_TABLE_ARGS: dict[str, str] = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_nopad_bin"}


def table_name(base: str) -> str:
    """``sp_<base>_<suffix>``: a table name private to this test process."""
    return f"sp_{base}_{TABLE_SUFFIX}"


def key_string() -> sa.types.TypeEngine[str]:
    """A text type usable as a primary key everywhere (MariaDB needs a length).

    MariaDB indexes at most 3072 bytes, so a key column there is VARCHAR(700)
    of utf8mb4; PostgreSQL and SQLite keep unbounded text.
    """
    return sa.String().with_variant(sa.String(700), "mysql", "mariadb")


# ----------------------------------------------------------------------------
# mapped contract models


class ContractBase(DeclarativeBase):
    """Declarative base of the mapped contract models (:data:`contract_metadata`)."""


contract_metadata = ContractBase.metadata


class SqlItem(ContractBase):
    """Mapped :class:`stockpyle.testing.Item`: primary key ``key``, unique ``(zap, bar)``."""

    __tablename__ = table_name("item")
    __table_args__ = (sa.UniqueConstraint("zap", "bar"), MYSQL_TABLE_ARGS)
    __stockpyle_keys__: ClassVar[list[Any]] = ["key", ("zap", "bar")]

    key: Mapped[str] = mapped_column(key_string(), primary_key=True)
    zap: Mapped[int] = mapped_column(sa.Integer)
    bar: Mapped[int] = mapped_column(sa.Integer)
    payload: Mapped[str | None] = mapped_column(sa.String(200))

    def __init__(self, key: Any, zap: Any, bar: Any, payload: Any = None) -> None:
        self.key = key
        self.zap = zap
        self.bar = bar
        self.payload = payload

    def __repr__(self) -> str:
        return f"SqlItem(key={self.key!r}, zap={self.zap!r}, bar={self.bar!r}, payload={self.payload!r})"


class SqlAutomobile(ContractBase):
    """Mapped :class:`stockpyle.testing.Automobile` (single-table inheritance root)."""

    __tablename__ = table_name("automobile")
    __table_args__ = (MYSQL_TABLE_ARGS,)
    __stockpyle_keys__: ClassVar[list[Any]] = ["license_plate"]

    license_plate: Mapped[str] = mapped_column(key_string(), primary_key=True)
    color: Mapped[str | None] = mapped_column(sa.String(50))
    kind: Mapped[str] = mapped_column(sa.String(20))

    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_on": "kind", "polymorphic_identity": "automobile"}

    def __init__(self, license_plate: Any, color: Any = None) -> None:
        self.license_plate = license_plate
        self.color = color


class SqlCar(SqlAutomobile):
    """Mapped :class:`stockpyle.testing.Car`."""

    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "car"}


class SqlTruck(SqlAutomobile):
    """Mapped :class:`stockpyle.testing.Truck`."""

    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "truck"}


class SqlFalsy(ContractBase):
    """Mapped :class:`stockpyle.testing.Falsy`: false in a boolean context."""

    __tablename__ = table_name("falsy")
    __table_args__ = (MYSQL_TABLE_ARGS,)
    __stockpyle_keys__: ClassVar[list[Any]] = ["key"]

    key: Mapped[str] = mapped_column(key_string(), primary_key=True)

    def __init__(self, key: Any) -> None:
        self.key = key

    def __len__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return False


MAPPED_MODELS = ContractModels(Item=SqlItem, Automobile=SqlAutomobile, Car=SqlCar, Truck=SqlTruck, Falsy=SqlFalsy)


def hostile_values_for(backend: str) -> tuple[str, ...]:
    """The contract's hostile key strings that ``backend`` can store.

    PostgreSQL text cannot contain NUL characters, so that value is left out;
    MariaDB key columns are VARCHAR(700) (index size limit), so the 10,000
    character key is shortened to 700.
    """
    if backend == "postgres":
        return tuple(v for v in HOSTILE_VALUES if "\x00" not in v)
    if backend == "mariadb":
        return tuple(v if len(v) <= 700 else v[:700] for v in HOSTILE_VALUES)
    return HOSTILE_VALUES


# ----------------------------------------------------------------------------
# engines


def backend_of(url: str | sa.URL) -> str:
    """``"sqlite"``, ``"postgres"`` or ``"mariadb"`` for a database URL."""
    name = sa.make_url(url).get_backend_name()
    return {"postgresql": "postgres", "mysql": "mariadb"}.get(name, name)


def make_engine(url: str | sa.URL, **options: Any) -> sa.Engine:
    """An engine for ``url``; SQLite engines get the SAVEPOINT-correct recipe.

    pysqlite's own transaction handling lets an outer ROLLBACK keep a released
    SAVEPOINT's changes; the recipe from SQLAlchemy's pysqlite documentation
    (driver autocommit plus an explicit ``BEGIN``) makes SQLite transactional
    like the servers.
    """
    engine = sa.create_engine(url, **options)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _no_driver_transactions(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _explicit_begin(connection: sa.Connection) -> None:
            connection.exec_driver_sql("BEGIN")

    return engine


def create_tables(engine: sa.Engine, metadata: sa.MetaData) -> None:
    """Create ``metadata``'s tables on ``engine`` (dropping leftovers first)."""
    metadata.drop_all(engine)
    metadata.create_all(engine)


def drop_tables(engine: sa.Engine, metadata: sa.MetaData) -> None:
    """Drop ``metadata``'s tables from ``engine``."""
    metadata.drop_all(engine)


def empty_tables(engine: sa.Engine, metadata: sa.MetaData) -> None:
    """Delete every row of ``metadata``'s tables (children first)."""
    with engine.begin() as connection:
        for table in reversed(metadata.sorted_tables):
            connection.execute(table.delete())


_TRANSACTION_CONTROL = frozenset({"BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE"})


class QueryCounter:
    """Count (and keep) the SQL statements an engine sends while the block runs.

    ::

        with QueryCounter(engine) as queries:
            store.batch_get(Model, keys)
        assert queries.count == 1
    """

    def __init__(self, engine: sa.Engine, *, selects_only: bool = False) -> None:
        self.engine = engine
        self.selects_only = selects_only
        self.statements: list[str] = []

    @property
    def count(self) -> int:
        """How many statements were sent."""
        return len(self.statements)

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else ""
        if verb in _TRANSACTION_CONTROL:
            return  # the SQLite recipe's explicit BEGIN, savepoints: not queries
        if not self.selects_only or verb == "SELECT":
            self.statements.append(statement)

    def __enter__(self) -> QueryCounter:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)


_REACHABLE: dict[str, str | None] = {}


def _server_url(variable: str, default: str) -> str:
    url = os.environ.get(variable) or default
    if url not in _REACHABLE:
        try:
            probe = sa.create_engine(url, pool_pre_ping=False, connect_args=_connect_timeout(url))
            try:
                with probe.connect() as connection:
                    connection.exec_driver_sql("SELECT 1")
            finally:
                probe.dispose()
            _REACHABLE[url] = None
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
            _REACHABLE[url] = f"{type(exc).__name__}: {exc}"
    problem = _REACHABLE[url]
    if problem is not None:
        shown = sa.make_url(url).render_as_string(hide_password=True)
        unavailable(f"database {shown} ({variable}) is unavailable: {problem}")
    return url


def _connect_timeout(url: str) -> dict[str, Any]:
    backend = backend_of(url)
    if backend == "postgres":
        return {"connect_timeout": 3}
    if backend == "mariadb":
        return {"connect_timeout": 3}
    return {}


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    """A URL of a fresh SQLite database file under ``tmp_path``."""
    return f"sqlite:///{tmp_path / 'stockpyle.sqlite'}"


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL URL (``STOCKPYLE_POSTGRES_URL``); unavailable() when unreachable."""
    return _server_url("STOCKPYLE_POSTGRES_URL", DEFAULT_POSTGRES_URL)


@pytest.fixture(scope="session")
def mariadb_url() -> str:
    """The MariaDB URL (``STOCKPYLE_MARIADB_URL``); unavailable() when unreachable."""
    return _server_url("STOCKPYLE_MARIADB_URL", DEFAULT_MARIADB_URL)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
    ]
)
def database_url(request: pytest.FixtureRequest) -> str:
    """A database URL for each backend in turn (sqlite, postgres, mariadb)."""
    backend = request.param
    if backend == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue(f"{backend}_url"))


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    """An engine for ``database_url`` (see :func:`make_engine`), disposed after the test."""
    built = make_engine(database_url)
    try:
        yield built
    finally:
        built.dispose()


@pytest.fixture
def sql_tables(engine: sa.Engine) -> Iterator[sa.Engine]:
    """The mapped contract tables on ``engine`` for one test; yields the engine."""
    create_tables(engine, contract_metadata)
    try:
        yield engine
    finally:
        drop_tables(engine, contract_metadata)


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
        pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
    ],
)
def module_engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[sa.Engine]:
    """One engine per backend for a whole test module (see the module docstring)."""
    backend = request.param
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'module.sqlite'}"
    else:
        url = str(request.getfixturevalue(f"{backend}_url"))
    built = make_engine(url)
    try:
        yield built
    finally:
        built.dispose()
