"""``stockpyle demo``: a read-heavy workload through a chain of caches over a real database.

The chain is ``ThreadLocalStore -> ProcessMemoryStore [-> MemcacheStore]
[-> RedisStore] -> SqlAlchemyStore``; the database is an SQLite file unless ``--database-url``
names another.  Lookups follow a Zipf-like distribution (a few users are
asked for very often, most rarely), with updates, inserts and deletes mixed
in.  At the end the demo prints what each layer did, how many database
queries the caches saved (counted with a ``before_cursor_execute`` listener),
and checks a sample of users read through the chain against the database.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import itertools
import os
import random
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import CLIError

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console
    from sqlalchemy.engine import Engine

    from ..stores.chained import ChainedStore

__all__ = ["add_parser", "run"]

INSTALL_HINT = 'the demo needs SQLAlchemy and rich: pip install "stockpyle[sqlalchemy,cli]"'

#: The operation mix, in percent: reads by id, reads by email, updates, inserts, deletes.
MIX = {"read": 72, "read_email": 18, "update": 6, "insert": 2, "delete": 2}
_MIX_LABELS = {
    "read": "reads by id",
    "read_email": "reads by email",
    "update": "updates",
    "insert": "inserts",
    "delete": "deletes",
}

#: DBAPI module -> the package that provides it, for "driver not installed" errors.
DRIVER_PACKAGES = {
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "asyncpg": "asyncpg",
    "pg8000": "pg8000",
    "pymysql": "PyMySQL",
    "MySQLdb": "mysqlclient",
    "mysql": "mysql-connector-python",
    "mariadb": "mariadb",
    "oracledb": "oracledb",
    "cx_Oracle": "cx_Oracle",
    "pyodbc": "pyodbc",
    "pymssql": "pymssql",
}


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _skew(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 5:
        raise argparse.ArgumentTypeError(f"expected a skew between 0 and 5, got {value}")
    return value


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``demo`` and its options."""
    parser = commands.add_parser(
        "demo",
        help="run a cached workload on embedded defaults (SQLite, no server needed)",
        description=(
            "Store users (an integer id and a unique email, mapped with SQLAlchemy) in a database and read "
            "them through ChainedStore([ThreadLocalStore, ProcessMemoryStore, (MemcacheStore,) (RedisStore,) "
            "SqlAlchemyStore]). "
            # the description is not %-formatted (help texts are): a plain % sign
            "The workload is read-heavy with a Zipf-like key distribution: "
            + ", ".join(f"{share}% {_MIX_LABELS[name]}" for name, share in MIX.items())
            + ". It ends with per-layer statistics, the database queries the caches saved, and a check of "
            'a sample of users against the database. Needs: pip install "stockpyle[sqlalchemy,cli]".'
        ),
    )
    # Each help text states its own default, once: ArgumentDefaultsHelpFormatter
    # would append "(default: None)" to options whose help already explains it.
    parser.add_argument(
        "--operations", type=_positive_int, default=20_000, help="operations in the workload (default: %(default)s)"
    )
    parser.add_argument(
        "--users", type=_positive_int, default=5_000, help="users stored before the workload (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=7,
        help="random seed; the same seed replays the same workload (default: %(default)s)",
    )
    parser.add_argument(
        "--skew",
        type=_skew,
        default=1.1,
        help="Zipf exponent of the key distribution, 0 = uniform (default: %(default)s)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory for the SQLite file stockpyle-demo.sqlite (default: a temporary directory, removed after)",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        metavar="URL",
        help="SQLAlchemy URL of the database instead of SQLite, e.g. postgresql+psycopg://postgres@127.0.0.1/test "
        "or mysql+pymysql://root@127.0.0.1/test; the demo creates and finally drops the table stockpyle_demo_users "
        "(default: an SQLite file, see --dir)",
    )
    parser.add_argument(
        "--memcache",
        default=None,
        metavar="HOST:PORT[,HOST:PORT...]",
        help="add a MemcacheStore layer on these memcached servers; needs stockpyle[memcache] (default: no memcached)",
    )
    parser.add_argument(
        "--redis",
        default=None,
        metavar="URL",
        help="add a RedisStore layer on this Redis, e.g. redis://127.0.0.1:6379/0, and an invalidation bus on a "
        "Redis stream there (needs stockpyle[redis]; its entries, in a fresh namespace, expire after 5 minutes)",
    )
    parser.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")
    parser.set_defaults(handler=run)


# ---------------------------------------------------------------------------
# environment checks: each failure is one actionable line


def _require_packages() -> None:
    missing = []
    for module in ("sqlalchemy", "rich"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise CLIError(f"{' and '.join(missing)} not installed; {INSTALL_HINT}")
    import sqlalchemy

    if int(sqlalchemy.__version__.split(".")[0]) < 2:
        raise CLIError(f"SQLAlchemy {sqlalchemy.__version__} is too old; {INSTALL_HINT}")


def _memcache_servers(spec: str) -> list[str]:
    """Parse and probe ``host:port[,host:port...]``."""
    try:
        import pymemcache  # noqa: F401
    except ImportError:
        raise CLIError('--memcache needs pymemcache: pip install "stockpyle[memcache]"') from None
    servers = []
    for part in spec.split(","):
        address = part.strip()
        host, sep, port_text = address.rpartition(":")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise CLIError(f"--memcache {spec!r}: {address!r} is not host:port (e.g. 127.0.0.1:11211)")
        try:
            with socket.create_connection((host.strip("[]"), int(port_text)), timeout=2):
                pass
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise CLIError(
                f"cannot reach memcached at {address} ({reason}); start memcached there or leave out --memcache"
            ) from None
        servers.append(address)
    return servers


def _missing_driver(drivername: str, exc: ImportError) -> str:
    """What to install for the URL's driver, named after the module that failed to import."""
    module = (exc.name or "").split(".")[0]
    package = DRIVER_PACKAGES.get(module)
    if package is not None:
        fix = f'pip install "{package}"'
    elif module:
        fix = f"install the package that provides the Python module {module!r}"
    else:
        fix = "install its DBAPI driver"
    return f"SQLAlchemy's {drivername!r} dialect needs a driver that is not installed ({exc}); {fix}"


def _redis_store(url: str) -> Any:
    """A RedisStore on ``url`` in a fresh namespace, probed with PING."""
    try:
        import redis
    except ImportError:
        raise CLIError('--redis needs redis-py: pip install "stockpyle[redis]"') from None
    from ..exceptions import ConfigurationError
    from ..stores.redis import RedisStore

    try:
        # a fresh namespace: entries of earlier runs (other databases) are never read
        store = RedisStore(url, namespace=f"demo-{uuid.uuid4().hex[:12]}", max_lifetime=300)
    except ConfigurationError as exc:
        raise CLIError(f"--redis {url!r}: {exc}") from None
    try:
        store.client.ping()
    except (redis.RedisError, OSError) as exc:
        store.release()
        raise CLIError(
            f"cannot reach Redis at {store.describe()} ({exc}); start redis-server there or leave out --redis"
        ) from None
    return store


def _engine(url_text: str) -> Engine:
    """Create and probe the engine; every failure becomes a :class:`CLIError`."""
    import sqlalchemy as sa
    from sqlalchemy import event

    try:
        url = sa.make_url(url_text)
    except sa.exc.ArgumentError:
        raise CLIError(
            f"--database-url {url_text!r} is not a database URL; use e.g. sqlite:///demo.sqlite, "
            "postgresql+psycopg://user@host/db or mysql+pymysql://user@host/db"
        ) from None
    shown = url.render_as_string(hide_password=True)
    options: dict[str, Any] = {}
    if url.get_backend_name() in ("postgresql", "mysql", "mariadb"):
        options["connect_args"] = {"connect_timeout": 5}
    try:
        engine = sa.create_engine(url, **options)
    except sa.exc.NoSuchModuleError:
        raise CLIError(
            f"--database-url {shown}: SQLAlchemy has no dialect {url.drivername!r}; "
            "use sqlite, postgresql+psycopg or mysql+pymysql"
        ) from None
    except ImportError as exc:
        raise CLIError(f"--database-url {shown}: {_missing_driver(url.drivername, exc)}") from None
    except (sa.exc.ArgumentError, TypeError) as exc:
        raise CLIError(f"--database-url {shown}: {exc}") from None
    if url.get_backend_name() == "sqlite":
        # The demo measures caching, not disk flushes: WAL without a sync per
        # commit keeps thousands of small write transactions fast.
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

    try:
        with engine.connect():
            pass
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        lines = str(exc.orig).strip().splitlines() if exc.orig is not None else []
        reason = lines[0] if lines else type(exc.orig).__name__
        raise CLIError(f"cannot connect to the database at {shown}: {reason}") from None
    return engine


# ---------------------------------------------------------------------------
# the workload


@dataclass
class _Counters:
    """What the workload did, and what the database saw."""

    done: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MIX, 0))
    lookups: int = 0
    found: int = 0
    lookup_queries: int = 0
    other_statements: int = 0
    in_lookup: bool = False
    counting: bool = False

    def statement(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # a before_cursor_execute listener: every SQL statement sent to the database
        if not self.counting:
            return
        if self.in_lookup:
            self.lookup_queries += 1
        else:
            self.other_statements += 1


class _Zipf:
    """Draws ranks 0..n-1 with probability proportional to ``1 / (rank + 1) ** skew``."""

    def __init__(self, n: int, skew: float, rng: random.Random) -> None:
        self._cumulative = list(itertools.accumulate(1.0 / (rank + 1) ** skew for rank in range(n)))
        self._total = self._cumulative[-1]
        self._rng = rng

    def draw(self) -> int:
        return bisect.bisect_left(self._cumulative, self._rng.random() * self._total)


@dataclass
class _World:
    """The demo's view of the data: which users exist and their current emails."""

    emails: dict[int, str]
    hot_ids: list[int]  # rank -> user id (the popular users are not simply the lowest ids)
    next_id: int
    old_emails: list[str] = field(default_factory=list)


def _email(ident: int, version: int = 0) -> str:
    return f"user{ident}@example.com" if not version else f"user{ident}.v{version}@example.org"


def _workload(
    chain: ChainedStore, world: _World, counters: _Counters, args: argparse.Namespace, console: Console
) -> float:
    """Run ``args.operations`` operations; returns the elapsed seconds."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .demo_model import DemoUser

    rng = random.Random(args.seed)
    zipf = _Zipf(len(world.hot_ids), args.skew, rng)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=args.operations)
    get = chain.get

    def lookup(keydict: dict[str, Any]) -> DemoUser | None:
        counters.lookups += 1
        counters.in_lookup = True
        try:
            user = get(DemoUser, keydict)
        finally:
            counters.in_lookup = False
        counters.found += user is not None
        return user

    progress = Progress(
        TextColumn("[bold]workload"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("operations"),
        TimeElapsedColumn(),
        console=console,
        disable=args.no_progress,
    )
    step = max(1, args.operations // 200)
    started = time.perf_counter()
    with progress:
        task = progress.add_task("workload", total=args.operations)
        for number, kind in enumerate(kinds, 1):
            ident = world.hot_ids[zipf.draw()]
            if kind == "read":
                lookup({"id": ident})
            elif kind == "read_email":
                lookup({"email": world.emails.get(ident, _email(ident))})
            elif kind == "update":
                user = lookup({"id": ident})
                if user is not None:
                    user.visits += 1
                    if rng.random() < 0.1:  # the email changes: the old one must stop answering
                        world.old_emails.append(user.email)
                        user.email = _email(ident, number)
                        world.emails[ident] = user.email
                    chain.put(user)
            elif kind == "insert":
                ident = world.next_id
                world.next_id += 1
                world.emails[ident] = _email(ident)
                chain.put(DemoUser(id=ident, email=world.emails[ident], name=f"User {ident}", visits=0))
            else:  # delete: an inactive account (from the less popular half), not a hot one
                ident = world.hot_ids[rng.randrange(len(world.hot_ids) // 2, len(world.hot_ids))]
                user = lookup({"id": ident})
                if user is not None:
                    chain.delete(user)
                    del world.emails[ident]
            counters.done[kind] += 1
            if number % step == 0:
                progress.update(task, completed=number)
        progress.update(task, completed=args.operations)
    return time.perf_counter() - started


def _verify(chain: ChainedStore, engine: Engine, world: _World, rng: random.Random) -> tuple[int, list[str]]:
    """Compare a sample of users read through the chain with the database rows."""
    from sqlalchemy.orm import Session

    from .demo_model import DemoUser

    def state(user: DemoUser | None) -> tuple[Any, ...] | None:
        return None if user is None else (user.id, user.email, user.name, user.visits)

    sample = rng.sample(range(world.next_id), min(300, world.next_id))
    problems: list[str] = []
    with Session(engine) as session:
        for ident in sample:
            row = state(session.get(DemoUser, ident))
            by_id = state(chain.get(DemoUser, {"id": ident}))
            if by_id != row:
                problems.append(f"user {ident}: the chain returned {by_id}, the database has {row}")
            if row is not None:
                by_email = state(chain.get(DemoUser, {"email": row[1]}))
                if by_email != row:
                    problems.append(f"email {row[1]}: the chain returned {by_email}, the database has {row}")
    current = set(world.emails.values())
    for email in world.old_emails[:200]:
        if email not in current and chain.get(DemoUser, {"email": email}) is not None:
            problems.append(f"the old email {email} still finds a user")
    return len(sample) + min(200, len(world.old_emails)), problems


# ---------------------------------------------------------------------------
# output


def _duration(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


def _layer_name(store: Any) -> str:
    name = type(store).__name__
    servers = getattr(store, "servers", None)
    if servers:
        return f"{name} ({', '.join(servers)})"
    from ..stores.kv import KeyValueStore

    if isinstance(store, KeyValueStore):
        return f"{name} ({store.describe()})"
    engine = getattr(store, "engine", None)
    if engine is not None:
        return f"{name} ({engine.dialect.name})"
    return name


def _layer_table(console: Console, chain: ChainedStore) -> Any:
    """The per-layer statistics as a rich table that fits the console.

    The boxed table with each layer's server or dialect needs about 110
    columns; in a narrower terminal (80 columns is common) a compact table
    without borders, with two-line headers and bare store names (the chain
    line above the table names the servers), takes about 75.
    """
    from rich import box
    from rich.table import Table

    rows = []
    for index, layer in enumerate(chain.stats(), 1):
        latency = layer.latency.summary()
        rows.append(
            (
                index,
                layer.store,
                f"{layer.hits:,}",
                f"{layer.misses:,}",
                f"{layer.hit_ratio:.1%}",
                f"{layer.backfills:,}",
                f"{layer.errors:,}",
                _duration(latency.median),
                _duration(latency.p99),
            )
        )
    full = Table(title="Per-layer statistics", title_justify="left")
    for column in ("Layer", "Hits", "Misses", "Hit ratio", "Backfills", "Errors", "Median", "p99"):
        full.add_column(column, justify="left" if column == "Layer" else "right", no_wrap=True)
    for index, store, *cells in rows:
        full.add_row(f"{index}. {_layer_name(store)}", *cells)
    if console.measure(full, options=console.options.update_width(1_000)).maximum <= console.width:
        return full
    compact = Table(
        title="Per-layer statistics", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0)
    )
    for column in ("Layer", "Hits", "Misses", "Hit\nratio", "Back-\nfills", "Errors", "Median", "p99"):
        compact.add_column(column, justify="left" if column == "Layer" else "right", no_wrap=column != "Layer")
    for _index, store, *cells in rows:
        compact.add_row(type(store).__name__, *cells)
    return compact


def _report(
    console: Console, chain: ChainedStore, counters: _Counters, elapsed: float, args: argparse.Namespace
) -> None:
    table = _layer_table(console, chain)
    done = counters.done
    console.print(
        f"{args.operations:,} operations in {elapsed:.2f} s ({args.operations / elapsed:,.0f}/s): "
        f"{done['read'] + done['read_email']:,} reads ({done['read_email']:,} by email), "
        f"{done['update']:,} updates, {done['insert']:,} inserts, {done['delete']:,} deletes"
    )
    console.print(table)
    saved = counters.lookups - counters.lookup_queries
    share = saved / counters.lookups if counters.lookups else 0.0
    console.print(
        f"Database queries: {counters.lookups:,} lookups sent {counters.lookup_queries:,} queries to the database; "
        f"without the caches every lookup is a query, so the caches saved {saved:,} queries ({share:.1%})."
    )
    console.print(f"Writes sent {counters.other_statements:,} SQL statements (every write goes to the database).")


def _redis_bus(layer: Any) -> Any:
    """A RedisStreamBus on the Redis layer's server, on a stream of this run only."""
    from ..bus.redis import RedisStreamBus

    return RedisStreamBus(client=layer.client, stream=f"sp:demo-{uuid.uuid4().hex[:12]}:invalidations")


def _report_bus(console: Console, bus: Any) -> None:
    """What the invalidation bus did; then its stream is removed (the demo's keys all expire)."""
    stats = bus.stats()
    lag = stats.lag.summary()
    lag_text = (
        f"delivery lag median {lag.median * 1000:.1f} ms, p99 {lag.p99 * 1000:.1f} ms"
        if lag.samples
        else "no lag sampled"
    )
    console.print(
        f"Invalidation bus ({type(bus).__name__}, max_staleness {bus.max_staleness * 1000:.0f} ms): "
        f"{stats.published:,} messages published, {stats.messages:,} heard, {stats.gaps:,} gaps, "
        f"trusted {stats.trusted_share:.1%} of the time; {lag_text}."
    )
    bus.release()
    bus.client.delete(bus.stream)


# ---------------------------------------------------------------------------
# the command


@contextlib.contextmanager
def _database(args: argparse.Namespace) -> Iterator[tuple[Engine, str]]:
    """The engine and a description; an SQLite file in ``--dir`` or a temporary directory."""
    if args.database_url is not None:
        engine = _engine(args.database_url)
        try:
            yield engine, engine.url.render_as_string(hide_password=True)
        finally:
            engine.dispose()
        return
    with contextlib.ExitStack() as stack:
        if args.dir is None:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="stockpyle-demo-")))
        else:
            directory = args.dir
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CLIError(f"--dir {str(directory)!r} cannot be used: {exc.strerror or exc}") from None
            if not os.access(directory, os.W_OK):
                raise CLIError(f"--dir {str(directory)!r} is not writable")
        path = directory / "stockpyle-demo.sqlite"
        engine = _engine(f"sqlite:///{path}")
        try:
            yield engine, f"SQLite file {path}"
        finally:
            engine.dispose()


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status (1 when the final check finds stale data)."""
    _require_packages()
    from rich.console import Console
    from sqlalchemy import event, insert

    from .. import ChainedStore, ProcessMemoryStore, ThreadLocalStore
    from ..stores.sqlalchemy import SqlAlchemyStore
    from .demo_model import DemoBase, DemoUser

    servers = _memcache_servers(args.memcache) if args.memcache else None
    redis_layer = _redis_store(args.redis) if args.redis else None
    console = Console(highlight=False)
    if not console.is_terminal:  # piped or captured: wide enough for the table, no wrapping
        console = Console(highlight=False, width=120, soft_wrap=True)
    rng = random.Random(args.seed)
    with _database(args) as (engine, where):
        DemoBase.metadata.drop_all(engine)
        DemoBase.metadata.create_all(engine)
        try:
            emails = {ident: _email(ident) for ident in range(args.users)}
            with engine.begin() as conn:
                conn.execute(
                    insert(DemoUser),
                    [{"id": i, "email": e, "name": f"User {i}", "visits": 0} for i, e in emails.items()],
                )
            hot_ids = list(emails)
            rng.shuffle(hot_ids)
            world = _World(emails, hot_ids, args.users)

            # small, LRU-bounded in-process layers: hot users stay in the thread
            # layer, warm ones in the process layer, the long tail comes from below
            local = ThreadLocalStore(maxsize=max(10, args.users // 50))
            local.configure(classes=[DemoUser], lifetime=5)
            memory = ProcessMemoryStore(maxsize=max(50, args.users // 5))
            memory.configure(classes=[DemoUser], lifetime=60)
            layers: list[Any] = [local, memory]
            if servers:
                from ..stores.memcache import MemcacheStore

                # a fresh namespace: entries of earlier runs (other databases) are never read
                shared = MemcacheStore(servers, namespace=f"demo-{uuid.uuid4().hex[:12]}", max_lifetime=300)
                shared.configure(classes=[DemoUser], lifetime=300)
                layers.append(shared)
            if redis_layer is not None:
                redis_layer.configure(classes=[DemoUser], lifetime=300)
                layers.append(redis_layer)
            layers.append(SqlAlchemyStore(engine=engine))
            bus = _redis_bus(redis_layer) if redis_layer is not None else None
            # with Redis, the in-process layers follow writes through a Redis stream, as
            # they would across the processes of a deployment; otherwise one process has
            # nothing to keep coherent
            chain = ChainedStore(layers, bus=bus)

            console.print(
                f"[bold]stockpyle demo[/bold]: {args.users:,} users in {where}; "
                f"chain: {' -> '.join(_layer_name(layer) for layer in layers)}"
            )
            counters = _Counters()
            event.listen(engine, "before_cursor_execute", counters.statement)
            counters.counting = True
            try:
                elapsed = _workload(chain, world, counters, args, console)
            finally:
                counters.counting = False
                event.remove(engine, "before_cursor_execute", counters.statement)
            _report(console, chain, counters, elapsed, args)
            checked, problems = _verify(chain, engine, world, rng)
            chain.release()
            if bus is not None:
                _report_bus(console, bus)
        finally:
            if engine.dialect.name != "sqlite" or args.dir is None:
                DemoBase.metadata.drop_all(engine)
    if problems:
        console.print(f"[red]Check failed: {len(problems)} of {checked} lookups disagree with the database:[/red]")
        for problem in problems[:10]:
            console.print(f"  {problem}")
        return 1
    console.print(f"Check: {checked:,} lookups through the chain agree with the database.")
    return 0
