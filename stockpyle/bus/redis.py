"""An invalidation bus on a Redis stream: :class:`RedisStreamBus`.

Publishing appends one entry to the stream (``XADD ... MAXLEN ~ maxlen``)
through a small Lua script that also numbers it: every entry carries the
stream's *epoch* (a random id chosen by the entry that started the stream) and
a *sequence number* one higher than the entry before it.  Every process reads
the stream on a connection of its own with ``XREAD BLOCK``:

* an entry whose sequence number is not the next one means entries were
  trimmed past this reader (it fell more than ``maxlen`` entries behind, or
  someone ran ``XTRIM``): a gap, the listeners are flushed;
* an entry of another epoch means the stream was deleted and started again
  (``DEL``, a server restarted without persistence): a gap;
* each (re)connection positions the reader at the last entry and flushes (the
  first one drops what was cached before the bus listened; a reconnection is
  counted as a gap, because a failover to a replica that had not received the
  last entries would reuse their sequence numbers).

Trust: the listener keeps one ``XREAD BLOCK`` outstanding on one connection
(it delivers a message within a round trip of its ``XADD``) and, every
``max_staleness / 3`` seconds, *probes* the stream on a second connection with
a non-blocking ``XREAD COUNT 1`` from its position.  An empty answer proves
that every entry added before the probe was sent has been delivered here: the
moment the probe was sent is the evidence.  (The blocking read cannot be the
heartbeat: Redis checks the timeouts of blocked clients only ``hz`` times a
second, every 100 ms by default.)  An idle process therefore costs the server
about ``3 / max_staleness`` cheap commands a second -- 30 at the default of
0.1 s.  A frozen server or a killed connection answers nothing: trust lapses
``max_staleness`` after the last probe that was answered, and a probe that
times out (``socket_timeout``) reconnects.
"""

from __future__ import annotations

import functools
import secrets
import threading
import time
from typing import Any, Final

from ..exceptions import ConfigurationError
from ..stores.drivers.redis import build_client, error_table, import_redis
from ._base import ListeningBus, Message, call_quietly, positive_seconds

__all__ = ["DEFAULT_MAXLEN", "DEFAULT_URL", "PUBLISH_SCRIPT", "RedisStreamBus"]

DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"
#: Entries kept in the stream (approximately): a reader more than this many
#: messages behind detects a gap.
DEFAULT_MAXLEN: Final = 10_000
#: Digests per stream entry (a larger publish is split into several entries).
_DIGESTS_PER_ENTRY: Final = 4096
#: Entries fetched per read.
_COUNT: Final = 256
#: The blocking read's timeout.  It is not the heartbeat: Redis checks the
#: timeouts of blocked clients only ``hz`` times a second (every 100 ms by
#: default), far too coarse for a staleness bound of 100 ms.
_BLOCK_MS: Final = 2000
#: How late after its timeout Redis may answer a blocking read (``1/hz``, with room).
_BLOCK_SLACK: Final = 0.5

#: ``KEYS[1]``: the stream; ``ARGV``: maxlen, an epoch for a new stream, the
#: sender, the origin ('' for none), the send time, the digests (concatenated).
#: Returns ``{id, epoch, sequence}``.
PUBLISH_SCRIPT: Final = """
local epoch = ARGV[2]
local seq = 1
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if last[1] then
  local fields = last[1][2]
  local e, s
  for i = 1, #fields, 2 do
    if fields[i] == 'e' then e = fields[i + 1] elseif fields[i] == 's' then s = tonumber(fields[i + 1]) end
  end
  if e and s then
    epoch = e
    seq = s + 1
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
  'e', epoch, 's', seq, 'p', ARGV[3], 'o', ARGV[4], 't', ARGV[5], 'd', ARGV[6])
return {id, epoch, seq}
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _fields(raw: Any) -> dict[str, Any]:
    """An entry's fields, from a flat ``[f, v, ...]`` list or a mapping, with text names."""
    if isinstance(raw, dict):
        return {_text(k): v for k, v in raw.items()}
    return {_text(raw[i]): raw[i + 1] for i in range(0, len(raw) - 1, 2)}


def _entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``<ms>-<seq>``) as numbers, for ordering."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _entries(reply: Any) -> list[tuple[str, dict[str, Any]]]:
    """The entries of a raw ``XREAD`` reply for one stream (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    streams = list(reply.values()) if isinstance(reply, dict) else [item[1] for item in reply]
    out = []
    for entries in streams:
        for entry in entries:
            out.append((_text(entry[0]), _fields(entry[1])))
    return out


class RedisStreamBus(ListeningBus):
    """Invalidations through a Redis stream, with gap detection by sequence numbers and epochs.

    :param url: ``redis://host:port/db`` (default ``redis://127.0.0.1:6379/0``);
        options in the query string are redis-py's (``?protocol=2``).
    :param client: a ``redis.Redis`` client instead of ``url`` (its pool
        also provides the listener's own connection, held for as long as the
        bus listens).
    :param stream: the stream's key, shared by every process of the deployment.
    :param max_staleness: seconds an in-process entry may be served after the
        last read that proved nothing older was pending.
    :param maxlen: entries kept in the stream (``MAXLEN ~``: approximately,
        at least this many); a reader that falls further behind detects a gap.
    :param socket_timeout: timeout of a request (a publication, a probe);
        a listener whose probe times out reconnects.
    :param connect_timeout: timeout of connecting.
    :raises ConfigurationError: for bad arguments, or a client that is not a
        standalone ``redis.Redis`` (a Redis Cluster is not supported: use a
        separate standalone server, or a client of the node that holds the stream).
    :raises ImportError: without redis-py (``pip install stockpyle[redis]``).
    """

    kind = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        client: Any = None,
        stream: str = "stockpyle:invalidations",
        max_staleness: float = 0.1,
        maxlen: int = DEFAULT_MAXLEN,
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.25,
    ) -> None:
        redis = import_redis()
        owner = type(self).__name__
        if url is not None and client is not None:
            raise ConfigurationError(f"{owner} takes url= or client=, not both")
        if not isinstance(stream, str) or not stream:
            raise ConfigurationError(f"{owner} stream must be a non-empty key name; got {stream!r}")
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
            raise ConfigurationError(f"{owner} maxlen must be a positive number of entries; got {maxlen!r}")
        socket_timeout = positive_seconds(owner, "socket_timeout", socket_timeout)
        connect_timeout = positive_seconds(owner, "connect_timeout", connect_timeout)
        super().__init__(max_staleness=max_staleness)
        self.errors = error_table()
        self._redis = redis
        if client is None:
            target = url if url is not None else DEFAULT_URL
            if not isinstance(target, str) or not target.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigurationError(f"{owner} url must be a redis://, rediss:// or unix:// URL; got {target!r}")
            try:
                client = build_client(target, cluster=False, socket_timeout=socket_timeout,
                                      connect_timeout=connect_timeout)  # fmt: skip
            except ValueError as exc:
                raise ConfigurationError(f"{owner} cannot use url {target!r}: {exc}") from None
            self._owns_client = True
        else:
            if isinstance(client, redis.cluster.RedisCluster) or not isinstance(client, redis.Redis):
                raise ConfigurationError(
                    f"{owner}(client=...) needs a standalone redis.Redis client (a stream lives on one node); "
                    f"got {type(client).__name__}"
                )
            self._owns_client = False
        self.client = client
        self.stream = stream
        self.maxlen = maxlen
        self.socket_timeout = socket_timeout
        #: seconds between two probes of the stream (the heartbeat)
        self.probe_interval = self.max_staleness / 3
        self._script = client.register_script(PUBLISH_SCRIPT)
        self._conn: Any = None  # the blocking reads
        self._probe: Any = None  # the heartbeat probes
        self._read_sent_at: float | None = None
        self._next_probe = 0.0
        self._conn_lock = threading.Lock()
        self._position: str = "0-0"
        self._epoch: str | None = None
        self._seq = 0

    def describe(self) -> str:
        kwargs = self.client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
        return f"Redis {where}/{kwargs.get('db', 0)} stream {self.stream!r}"

    @property
    def client_name(self) -> str:
        """The name the listener's connection gives itself (``CLIENT LIST`` shows it)."""
        return f"stockpyle-bus-{self.sender[:16]}"

    # -- publishing ---------------------------------------------------------

    def _send(self, digests: tuple[str, ...], origin: str | None, sent: float) -> None:
        epoch = secrets.token_hex(8)
        for start in range(0, len(digests), _DIGESTS_PER_ENTRY):
            chunk = "".join(digests[start : start + _DIGESTS_PER_ENTRY])
            args = [self.maxlen, epoch, self.sender, origin or "", repr(sent), chunk]
            try:
                self._script(keys=[self.stream], args=args)
            except self.errors.retry:  # a pooled connection the server closed: once more
                self._script(keys=[self.stream], args=args)

    def _close_publisher(self) -> None:
        if self._owns_client:
            call_quietly(self.client.connection_pool.disconnect)

    # -- listening ----------------------------------------------------------

    def _command(self, conn: Any, *args: Any) -> Any:
        if conn is None:
            raise self._redis.exceptions.ConnectionError("the listener connection is closed")
        conn.send_command(*args)
        return conn.read_response(disable_decoding=True, timeout=self.socket_timeout)

    def _connect_listener(self) -> bool:
        pool = self.client.connection_pool
        with self._conn_lock:
            self._conn = pool.get_connection()
            self._probe = pool.get_connection()
        self._read_sent_at = None
        for conn in (self._conn, self._probe):
            self._command(conn, "CLIENT", "SETNAME", self.client_name)
        # position at the last entry: what came before is covered by the flush that follows
        tail = self._command(self._probe, "XREVRANGE", self.stream, "+", "-", "COUNT", 1)
        if tail:
            entry_id, fields = _text(tail[0][0]), _fields(tail[0][1])
            self._position = entry_id
            self._epoch = _text(fields["e"]) if "e" in fields else None
            self._seq = int(fields["s"]) if "s" in fields else 0
        else:
            self._position, self._epoch, self._seq = "0-0", None, 0
        self._next_probe = time.monotonic()
        return False  # positioned anew: a reconnection flushes

    def _listen_once(self, stop: threading.Event) -> None:
        conn = self._conn
        if conn is None:
            raise self._redis.exceptions.ConnectionError("the listener connection is closed")
        if self._read_sent_at is None:
            self._read_sent_at = time.monotonic()
            conn.send_command("XREAD", "COUNT", _COUNT, "BLOCK", _BLOCK_MS, "STREAMS", self.stream, self._position)
        now = time.monotonic()
        if conn.can_read(timeout=max(0.0, self._next_probe - now)):
            sent_at, self._read_sent_at = self._read_sent_at, None
            self._received(conn.read_response(disable_decoding=True, timeout=self.socket_timeout), sent_at)
            return
        if now - self._read_sent_at > _BLOCK_MS / 1000 + _BLOCK_SLACK + self.socket_timeout:
            raise self._redis.exceptions.TimeoutError(f"no answer to XREAD BLOCK within {_BLOCK_MS} ms")
        # The probe: the stream's last entry.  Newer than our position: the
        # blocked read is about to deliver it.  Ours (or none): every entry
        # added before the probe was sent has been delivered here.  Anything
        # else is a stream deleted and started again at or below our position
        # (its first entry can even take our entry's id, within the same
        # millisecond): the blocked read would never see it.
        probed_at = time.monotonic()
        self._next_probe = probed_at + self.probe_interval
        tail = self._command(self._probe, "XREVRANGE", self.stream, "+", "-", "COUNT", 1)
        if not tail:
            self._heard((), probed_at)
            return
        entry_id, fields = _text(tail[0][0]), _fields(tail[0][1])
        if _entry_order(entry_id) > _entry_order(self._position):
            return
        epoch = _text(fields["e"]) if "e" in fields else None
        seq = _text(fields["s"]) if "s" in fields else None
        if entry_id == self._position and epoch == self._epoch and (epoch is None or seq == str(self._seq)):
            self._heard((), probed_at)
            return
        self._gap(f"stream {self.stream!r} started again at or below entry {self._position}")
        self._position, self._epoch = entry_id, epoch
        self._seq = int(seq) if seq is not None and seq.isdigit() else 0
        self._restart_read()

    def _restart_read(self) -> None:
        """Abandon the blocked read (it waits for entries after a position that is no longer ours)."""
        pool = self.client.connection_pool
        with self._conn_lock:
            old, self._conn = self._conn, pool.get_connection()
        if old is not None:
            call_quietly(old.disconnect)
            call_quietly(functools.partial(pool.release, old))
        self._read_sent_at = None
        self._command(self._conn, "CLIENT", "SETNAME", self.client_name)

    def _received(self, reply: Any, sent_at: float) -> None:
        entries = _entries(reply)
        messages: list[Message] = []
        for entry_id, fields in entries:
            self._position = entry_id
            message = self._check(entry_id, fields)
            if message is None:
                messages.clear()  # the flush that _check did covers everything before it
            else:
                messages.append(message)
        # a full batch may have more behind it: then only its last entry's send time is evidence
        self._heard(messages, sent_at if len(entries) < _COUNT else None)

    def _check(self, entry_id: str, fields: dict[str, Any]) -> Message | None:
        """The message of one entry; ``None`` after a gap (the sequence or epoch check failed: flushed)."""
        try:
            epoch = _text(fields["e"])
            seq = int(fields["s"])
            digests_text = _text(fields["d"])
            sender = _text(fields["p"])
            origin = _text(fields["o"]) or None
            sent = float(fields["t"])
        except (KeyError, ValueError, TypeError):
            self._gap(f"entry {entry_id} of stream {self.stream!r} is not an invalidation")
            self._epoch, self._seq = None, 0
            return None
        known, expected = self._epoch, self._seq + 1
        self._epoch, self._seq = epoch, seq
        if epoch != known:
            if known is not None or seq != 1:
                self._gap(f"stream {self.stream!r} started again (epoch {epoch}, entry {seq})")
                return None
        elif seq != expected:
            self._gap(f"entries {expected}..{seq - 1} of stream {self.stream!r} were trimmed before being read")
            return None
        digests = tuple(digests_text[i : i + 32] for i in range(0, len(digests_text), 32))
        return Message(digests, origin, sender, sent)

    def _close_listener(self) -> None:
        with self._conn_lock:
            conns, self._conn, self._probe = (self._conn, self._probe), None, None
        pool = self.client.connection_pool
        for conn in conns:
            if conn is not None:
                call_quietly(conn.disconnect)
                call_quietly(functools.partial(pool.release, conn))

    def _interrupt(self) -> None:
        # shut the sockets down under a blocked read; the thread then sees stop
        for conn in (self._conn, self._probe):
            if conn is not None:
                call_quietly(conn.disconnect)

    def _abandon_connections(self) -> None:
        # redis-py pools reset themselves in a child; the listener's connections are dropped
        self._conn = self._probe = None
        self._conn_lock = threading.Lock()

    # -- for tests and operators ---------------------------------------------

    def position(self) -> tuple[str, str | None, int]:
        """The listener's position: last entry id, epoch and sequence number read."""
        return self._position, self._epoch, self._seq
