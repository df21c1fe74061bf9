"""An invalidation bus on PostgreSQL ``LISTEN``/``NOTIFY``: :class:`PostgresNotifyBus`.

A message is one ``pg_notify(channel, payload)``; PostgreSQL delivers it to
every session listening on the channel **when the sending transaction
commits**, and never if it rolls back.  :meth:`PostgresNotifyBus.publish`
sends it in a transaction of its own; :meth:`PostgresNotifyBus.publish_in`
sends it inside the caller's transaction, so that the invalidation is
delivered exactly when the write commits -- the natural place for an ORM
session hook::

    @event.listens_for(Session, "before_commit")
    def _invalidate(session):
        bus.publish_in(session, digests_of_what_this_session_wrote)

Payloads are JSON, under 8000 bytes (PostgreSQL's limit): a long list of
digests is split into several notifications.

Trust: PostgreSQL pushes nothing when idle, so every ``max_staleness / 3``
seconds the listener sends, on its own connection, a notification to a
*private* channel only it listens on, and waits for it to come back.
PostgreSQL keeps one ordered queue of committed notifications for all
channels and every session reads it in order: when the heartbeat comes back,
every notification committed before it has been delivered, so the moment it
was sent is the evidence.  Nothing else hears a process's heartbeats.  A
heartbeat not back within ``timeout`` seconds reconnects.

Lost messages: PostgreSQL does not lose a notification while the listener is
connected, and keeps none for a listener that is not; so every reconnection
is a gap (the listeners are flushed).

Writes made outside stockpyle (SQL consoles, other applications, migrations)
can feed the bus through a trigger: :meth:`PostgresNotifyBus.trigger_sql`
writes it.  The trigger publishes *class digests*
(:func:`~stockpyle.bus.class_digest`): the listeners drop every in-process
entry of those classes.  A trigger does not publish key digests because
PostgreSQL cannot compute them: they are BLAKE2b hashes (absent from
PostgreSQL and pgcrypto) of stockpyle's canonical key text, whose value tags
and escapes would have to be reproduced in SQL for every column type -- and a
key text that differs by one character invalidates nothing, silently.  A
class-wide flush is always right and costs a refill of that class; writes
from outside are the exception.  A notification on the channel whose payload
is not a stockpyle message (``NOTIFY stockpyle_invalidations``) flushes
everything.
"""

from __future__ import annotations

import json
import logging
import re
import select
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Final

from ..errors import ErrorRule, ErrorTable
from ..exceptions import ConfigurationError, StoreError, StoreUnavailableError
from . import class_digest
from ._base import ListeningBus, Message, call_quietly, check_digests, positive_seconds

__all__ = ["INSTALL_HINT", "MAX_PAYLOAD", "TRIGGER_SETTING", "PostgresNotifyBus", "error_table", "import_psycopg"]

log = logging.getLogger("stockpyle.bus")

INSTALL_HINT: Final = "PostgresNotifyBus requires psycopg 3: pip install stockpyle[postgres]"
#: The longest payload sent, in bytes (PostgreSQL refuses 8000 and more).
MAX_PAYLOAD: Final = 7900
_CHANNEL: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
#: The transaction-local setting with which a writer that publishes its own
#: key digests silences the triggers of :meth:`PostgresNotifyBus.trigger_sql`.
TRIGGER_SETTING: Final = "stockpyle.bus_triggers"


def import_psycopg() -> Any:
    """Import psycopg 3, or raise an ImportError that names the extra to install."""
    try:
        import psycopg
        import psycopg.conninfo
        import psycopg.pq
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return psycopg


_TABLES: dict[bool, ErrorTable] = {}


def error_table() -> ErrorTable:
    """How psycopg, SQLAlchemy and socket errors map into the stockpyle tree."""
    try:
        psycopg = import_psycopg()
    except ImportError:
        psycopg = None
    installed = psycopg is not None
    table = _TABLES.get(installed)
    if table is not None:
        return table
    rules = [ErrorRule((OSError, TimeoutError), StoreUnavailableError)]
    if psycopg is not None:
        rules = [
            ErrorRule((psycopg.OperationalError, OSError, TimeoutError), StoreUnavailableError),
            ErrorRule(psycopg.Error, StoreError),
            *rules,
        ]
    try:
        from sqlalchemy import exc as sa_exc
    except ImportError:  # pragma: no cover - the engine= form needs SQLAlchemy anyway
        pass
    else:
        rules += [
            ErrorRule((sa_exc.OperationalError, sa_exc.DisconnectionError, sa_exc.TimeoutError), StoreUnavailableError),
            ErrorRule(sa_exc.SQLAlchemyError, StoreError),
        ]
    table = _TABLES[installed] = ErrorTable("PostgreSQL", rules)
    return table


def _conninfo_url(url: str) -> str:
    # an SQLAlchemy URL names its driver: postgresql+psycopg://... -> postgresql://...
    return re.sub(r"^(postgres(?:ql)?)\+[A-Za-z0-9_]+://", r"\1://", url)


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class PostgresNotifyBus(ListeningBus):
    """Invalidations through PostgreSQL ``NOTIFY``, delivered when the writing transaction commits.

    :param url: a libpq URL or key=value string (an SQLAlchemy URL such as
        ``postgresql+psycopg://...`` is accepted: its driver name is dropped);
        default: libpq's defaults and ``PG*`` environment variables.
    :param engine: an SQLAlchemy engine on PostgreSQL instead of ``url``:
        :meth:`publish` uses its pool, the listener a psycopg connection to
        the engine's URL.
    :param channel: the channel name (a plain identifier), shared by every
        process of the deployment.
    :param max_staleness: seconds an in-process entry may be served after the
        last heartbeat that came back.
    :param timeout: seconds a heartbeat may take before the listener
        reconnects.
    :param connect_timeout: seconds a connection attempt may take (whole seconds, at least 2 for libpq).
    :raises ConfigurationError: for bad arguments.
    :raises ImportError: without psycopg 3 (``pip install stockpyle[postgres]``).
    """

    kind = "postgres"

    def __init__(
        self,
        url: str | None = None,
        *,
        engine: Any = None,
        channel: str = "stockpyle_invalidations",
        max_staleness: float = 0.5,
        timeout: float = 2.0,
        connect_timeout: float = 2.0,
    ) -> None:
        psycopg = import_psycopg()
        owner = type(self).__name__
        if url is not None and engine is not None:
            raise ConfigurationError(f"{owner} takes url= or engine=, not both")
        if not isinstance(channel, str) or not _CHANNEL.fullmatch(channel):
            raise ConfigurationError(
                f"{owner} channel must be an identifier of letters, digits and _ (at most 63); got {channel!r}"
            )
        timeout = positive_seconds(owner, "timeout", timeout)
        connect_timeout = positive_seconds(owner, "connect_timeout", connect_timeout)
        super().__init__(max_staleness=max_staleness)
        self.errors = error_table()
        self._psycopg = psycopg
        if engine is not None:
            dialect = getattr(getattr(engine, "dialect", None), "name", None)
            if dialect != "postgresql":
                raise ConfigurationError(
                    f"{owner}(engine=...) needs an SQLAlchemy engine on PostgreSQL; got {type(engine).__name__} "
                    f"({dialect or 'no dialect'})"
                )
            target = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        elif url is None:
            target = ""
        elif isinstance(url, str):
            target = _conninfo_url(url)
        else:
            raise ConfigurationError(f"{owner} url must be a string; got {type(url).__name__}")
        self.engine = engine
        self.channel = channel
        self.timeout = timeout
        self._connect_timeout = max(2, round(connect_timeout))
        try:
            self._conninfo = psycopg.conninfo.make_conninfo(target)
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(f"{owner} cannot use url {url!r}: {exc}") from None
        #: seconds between two heartbeats of the listener
        self.heartbeat_interval = self.max_staleness / 3
        self._publisher: Any = None
        self._publisher_lock = threading.Lock()
        self._pg: Any = None
        self._heartbeat_sent: float | None = None
        self._heartbeat_token = ""
        self._next_heartbeat = 0.0
        self._query_pending = False
        self._tokens = 0
        self._foreign_logged = False

    def describe(self) -> str:
        info = self._psycopg.conninfo.conninfo_to_dict(self._conninfo)
        where = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
        return f"PostgreSQL {where} channel {self.channel!r}"

    @property
    def heartbeat_channel(self) -> str:
        """The private channel of this process's heartbeats."""
        return f"stockpyle_hb_{self.sender}"

    @property
    def application_name(self) -> str:
        """The ``application_name`` of the listener's connection (``pg_stat_activity`` shows it)."""
        return f"stockpyle-bus-{self.sender[:16]}"

    # -- payloads -----------------------------------------------------------

    def payloads(self, digests: Sequence[str], origin: str | None = None, sent: float | None = None) -> list[str]:
        """The notification payloads of one invalidation (each under :data:`MAX_PAYLOAD` bytes)."""
        checked = check_digests(digests)
        stamp = time.time() if sent is None else sent
        head = json.dumps({"p": self.sender, "o": origin, "t": stamp, "d": ""}, separators=(",", ":"))
        room = (MAX_PAYLOAD - len(head.encode())) // 32
        if room < 1:
            raise ValueError("origin is too long for a PostgreSQL notification")
        out = []
        for start in range(0, len(checked), room):
            body = {"p": self.sender, "o": origin, "t": stamp, "d": "".join(checked[start : start + room])}
            out.append(json.dumps(body, separators=(",", ":")))
        return out

    # -- publishing ---------------------------------------------------------

    def _send(self, digests: tuple[str, ...], origin: str | None, sent: float) -> None:
        payloads = self.payloads(digests, origin, sent)
        if self.engine is not None:
            from sqlalchemy import text

            with self.engine.begin() as connection:
                for payload in payloads:
                    connection.execute(text("SELECT pg_notify(:channel, :payload)"),
                                       {"channel": self.channel, "payload": payload})  # fmt: skip
            return
        with self._publisher_lock:
            conn = self._publisher
            if conn is None or conn.closed:
                conn = self._publisher = self._psycopg.Connection.connect(
                    self._conninfo, autocommit=True, connect_timeout=self._connect_timeout
                )
            try:
                with conn.transaction():
                    for payload in payloads:
                        conn.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))
            except self._psycopg.OperationalError:
                call_quietly(conn.close)
                self._publisher = None
                raise

    def publish_in(self, connection: Any, digests: Sequence[str], origin: str | None = None) -> None:
        """Queue one invalidation in the caller's open transaction: delivered when it commits, dropped on rollback.

        :param connection: an SQLAlchemy ``Connection`` or ``Session`` on
            PostgreSQL, or a psycopg ``Connection``/``Cursor``, inside the
            transaction that makes the writes.  Call it before the commit
            (an ORM ``before_commit`` hook, or after the flush).
        :raises StoreError: when the notification cannot be queued.
        :raises TypeError: for another kind of connection.
        """
        checked = check_digests(digests)
        if not checked:
            return
        payloads = self.payloads(checked, origin)
        execute = self._executor(connection)
        try:
            with self.errors.translating(self, "queue an invalidation"):
                for payload in payloads:
                    execute(payload)
        except StoreError:
            with self._stats_lock:
                self._stats.publish_errors += 1
            raise
        with self._stats_lock:
            self._stats.published += 1

    def quiet_triggers(self, connection: Any) -> None:
        """Silence the triggers of :meth:`trigger_sql` for the rest of the caller's transaction.

        For a writer that publishes the key digests of its writes itself
        (:meth:`publish_in`): the class-wide flushes of the triggers would only
        repeat them, wider.  Call it before the writes.
        """
        sql = f"SELECT set_config('{TRIGGER_SETTING}', 'off', true)"
        self._run_sql(connection, sql)

    def _executor(self, connection: Any) -> Any:
        channel = self.channel
        sqlalchemy_types = _sqlalchemy_types()
        if isinstance(connection, sqlalchemy_types):
            from sqlalchemy import text

            statement = text("SELECT pg_notify(:channel, :payload)")
            dialect = connection.get_bind().dialect if hasattr(connection, "get_bind") else connection.dialect
            if dialect.name != "postgresql":
                raise ConfigurationError(f"publish_in() needs a PostgreSQL connection; got {dialect.name}")
            return lambda payload: connection.execute(statement, {"channel": channel, "payload": payload})
        psycopg = self._psycopg
        if isinstance(connection, (psycopg.Connection, psycopg.Cursor)):
            return lambda payload: connection.execute("SELECT pg_notify(%s, %s)", (channel, payload))
        raise TypeError(
            "publish_in() needs an SQLAlchemy Connection or Session, or a psycopg Connection or Cursor; "
            f"got {type(connection).__name__}"
        )

    def _run_sql(self, connection: Any, sql: str) -> None:
        with self.errors.translating(self, "configure the transaction"):
            if isinstance(connection, _sqlalchemy_types()):
                from sqlalchemy import text

                connection.execute(text(sql))
            elif isinstance(connection, (self._psycopg.Connection, self._psycopg.Cursor)):
                connection.execute(sql)
            else:
                raise TypeError(f"needs an SQLAlchemy or psycopg connection; got {type(connection).__name__}")

    def _close_publisher(self) -> None:
        with self._publisher_lock:
            conn, self._publisher = self._publisher, None
        if conn is not None:
            call_quietly(conn.close)

    # -- the trigger for writes made outside stockpyle ------------------------

    def trigger_sql(self, table: str, classes: Iterable[type], *, function: str = "stockpyle_bus_notify") -> str:
        """The SQL that makes writes to ``table`` flush the in-process entries of ``classes`` in every process.

        A statement-level trigger (``INSERT``, ``UPDATE``, ``DELETE``,
        ``TRUNCATE``) that sends one notification per statement, at commit,
        with the :func:`~stockpyle.bus.class_digest` of each class.  A class
        mapped by SQLAlchemy brings its mapped subclasses along (single-table
        inheritance stores them in the same table).  A transaction in which
        :meth:`quiet_triggers` was called sends nothing.

        :param table: the table, optionally schema-qualified (``"shop.item"``).
        :param classes: the classes whose objects the table's rows become.
        :param function: the name of the trigger function (shared by every
            table: it takes the channel and the digests as arguments).
        :returns: SQL for one ``execute`` (PL/pgSQL, PostgreSQL 11 or later).
        """
        if not isinstance(table, str) or not table or len(table) > 127:
            raise ConfigurationError(f"trigger_sql() needs a table name; got {table!r}")
        if not _CHANNEL.fullmatch(function):
            raise ConfigurationError(f"trigger_sql() function must be a plain identifier; got {function!r}")
        digests = "".join(dict.fromkeys(class_digest(klass) for klass in _with_mapped_subclasses(classes)))
        if not digests:
            raise ConfigurationError("trigger_sql() needs at least one class")
        if len(digests) > MAX_PAYLOAD - 200:
            raise ConfigurationError("trigger_sql(): too many classes for one notification")
        qualified = ".".join(_quote_ident(part) for part in table.split("."))
        trigger = _quote_ident(("stockpyle_bus_" + re.sub(r"\W", "_", table))[:63])
        arguments = f"{_quote_literal(self.channel)}, {_quote_literal(digests)}"
        return f"""CREATE OR REPLACE FUNCTION {_quote_ident(function)}() RETURNS trigger LANGUAGE plpgsql AS $stockpyle$
BEGIN
  IF current_setting('{TRIGGER_SETTING}', true) = 'off' THEN
    RETURN NULL;
  END IF;
  PERFORM pg_notify(TG_ARGV[0], json_build_object(
    'p', 'sql:' || TG_TABLE_NAME, 'o', NULL, 't', extract(epoch FROM clock_timestamp()), 'd', TG_ARGV[1])::text);
  RETURN NULL;
END
$stockpyle$;
DROP TRIGGER IF EXISTS {trigger} ON {qualified};
CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {qualified}
  FOR EACH STATEMENT EXECUTE FUNCTION {_quote_ident(function)}({arguments});
"""

    # -- listening ----------------------------------------------------------

    def _run_query(self, sql: bytes) -> None:
        """Send ``sql`` on the listener's connection and wait for its results (at most ``timeout``)."""
        pg = self._pg
        pg.send_query(sql)
        deadline = time.monotonic() + self.timeout
        while True:
            while pg.is_busy():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"PostgreSQL did not answer within {self.timeout}s")
                select.select([pg.socket], [], [], remaining)
                pg.consume_input()
            result = pg.get_result()
            if result is None:
                return
            self._check_result(result)

    def _check_result(self, result: Any) -> None:
        status = self._psycopg.pq.ExecStatus
        if result.status not in (status.COMMAND_OK, status.TUPLES_OK):
            message = result.error_message.decode(errors="replace").strip() or "query failed"
            raise self._psycopg.OperationalError(message)

    def _connect_listener(self) -> bool:
        pq = self._psycopg.pq
        conninfo = self._psycopg.conninfo.make_conninfo(
            self._conninfo, application_name=self.application_name, connect_timeout=self._connect_timeout
        )
        pg = pq.PGconn.connect(conninfo.encode())
        if pg.status != pq.ConnStatus.OK:
            message = pg.error_message.decode(errors="replace").strip()
            pg.finish()
            raise self._psycopg.OperationalError(message or "connection failed")
        self._pg = pg
        self._heartbeat_sent = None
        self._query_pending = False
        self._run_query(f"LISTEN {_quote_ident(self.channel)}; LISTEN {_quote_ident(self.heartbeat_channel)}".encode())
        self._next_heartbeat = time.monotonic()
        return False  # no replay: a reconnection is a gap

    def _listen_once(self, stop: threading.Event) -> None:
        pg = self._pg
        if pg is None:
            raise self._psycopg.OperationalError("the listener connection is closed")
        now = time.monotonic()
        if self._heartbeat_sent is None and now >= self._next_heartbeat:
            self._tokens += 1
            self._heartbeat_token = str(self._tokens)
            sql = f"SELECT pg_notify({_quote_literal(self.heartbeat_channel)}, '{self._heartbeat_token}')"
            pg.send_query(sql.encode())
            self._heartbeat_sent = now
            self._query_pending = True
            self._next_heartbeat = now + self.heartbeat_interval
        if self._heartbeat_sent is not None and now - self._heartbeat_sent > self.timeout:
            raise TimeoutError(f"a heartbeat did not come back from PostgreSQL within {self.timeout}s")
        # waiting for the heartbeat to come back, or for the next one to be due
        wait = self.heartbeat_interval if self._heartbeat_sent is not None else max(0.0, self._next_heartbeat - now)
        readable, _, _ = select.select([pg.socket], [], [], wait)
        if not readable:
            return
        pg.consume_input()
        if pg.status != self._psycopg.pq.ConnStatus.OK:
            raise self._psycopg.OperationalError(pg.error_message.decode(errors="replace").strip() or "connection lost")
        while self._query_pending and not pg.is_busy():
            result = pg.get_result()
            if result is None:
                self._query_pending = False
            else:
                self._check_result(result)
        self._drain(pg)

    def _drain(self, pg: Any) -> None:
        messages: list[Message] = []
        evidence: float | None = None
        heartbeat = self.heartbeat_channel.encode()
        while (note := pg.notifies()) is not None:
            if note.relname == heartbeat:
                if self._heartbeat_sent is not None and note.extra.decode() == self._heartbeat_token:
                    evidence, self._heartbeat_sent = self._heartbeat_sent, None
                continue
            message = self._parse(note.extra)
            if message is None:
                messages.clear()  # the flush covers them
                self._foreign(note.extra[:60])
            else:
                messages.append(message)
        if messages or evidence is not None:
            self._heard(messages, evidence)

    def _parse(self, payload: bytes) -> Message | None:
        try:
            body = json.loads(payload)
            digests_text = body["d"]
            sent = float(body["t"])
            sender = str(body["p"])
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(digests_text, str) or len(digests_text) % 32:
            return None
        origin = body.get("o")
        digests = tuple(digests_text[i : i + 32] for i in range(0, len(digests_text), 32))
        return Message(digests, origin if isinstance(origin, str) else None, sender, sent)

    def _foreign(self, payload: bytes) -> None:
        """A notification on the channel that is no stockpyle message: flush everything."""
        with self._stats_lock:
            self._stats.messages += 1
        if not self._foreign_logged:
            self._foreign_logged = True
            log.info(
                "stockpyle: %r: a notification that is no invalidation (%r...) flushes the in-process layers",
                self,
                payload,
            )
        self._flush()

    def _close_listener(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None:
            call_quietly(pg.finish)

    def _abandon_connections(self) -> None:
        # psycopg never closes a connection inherited from the parent (it
        # checks the pid), which would end the parent's session: just drop them
        self._pg = None
        self._publisher = None
        self._publisher_lock = threading.Lock()


def _sqlalchemy_types() -> tuple[Any, ...]:
    """SQLAlchemy's ``Connection`` and ``Session`` classes, or nothing without SQLAlchemy."""
    try:
        from sqlalchemy.engine import Connection
        from sqlalchemy.orm import Session
    except ImportError:  # pragma: no cover - SQLAlchemy is optional here
        return ()
    return (Connection, Session)


def _with_mapped_subclasses(classes: Iterable[type]) -> list[type]:
    out: list[type] = []
    for klass in classes:
        if not isinstance(klass, type):
            raise ConfigurationError(f"trigger_sql() takes classes; got {klass!r}")
        out.append(klass)
        try:
            from sqlalchemy import inspect
            from sqlalchemy.exc import NoInspectionAvailable
        except ImportError:  # pragma: no cover
            continue
        try:
            mapper: Any = inspect(klass)
        except NoInspectionAvailable:
            continue
        out.extend(m.class_ for m in mapper.self_and_descendants if m.class_ is not klass)
    return out
