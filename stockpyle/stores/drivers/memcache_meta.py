"""A sans-IO codec for memcached's meta protocol: ``mg``, ``ms``, ``md`` and ``mn``.

memcached 1.6 speaks *meta commands* beside the classic text protocol, on the
same connections (``doc/protocol.txt``, "Meta Commands").  They carry what
the classic commands cannot: leases (``mg <key> v c N<ttl>`` creates an empty
stub on a miss and tells exactly one client it won it, ``W``), stale values
(``md <key> I`` keeps the value but flags it ``X``) and compare-and-set
stores of any mode (``ms <key> <size> C<cas>``).

This module only turns requests into bytes and bytes into responses; it never
touches a socket.  :mod:`stockpyle.stores.drivers.pymemcache` drives it over
pymemcache's own pooled connections.  Requests are built by
:func:`meta_get`, :func:`meta_set`, :func:`meta_delete` and :func:`meta_noop`;
a :class:`MetaParser` is fed whatever the connection delivered, in pieces of
any size, and hands back complete :class:`MetaResponse` objects in order::

    parser = MetaParser()
    sock.sendall(meta_get(b"user:1", b"v c N30"))
    while (response := parser.next_response()) is None:
        parser.feed(sock.recv(max(65536, parser.needed())))

A response is never guessed at: a value block must end with ``\\r\\n`` exactly
where its announced size says, a line must be one the protocol defines, and
anything else raises :class:`MetaProtocolError`, after which the connection
is out of step and must be closed.  Error lines (``ERROR``,
``CLIENT_ERROR ...``, ``SERVER_ERROR ...``) are responses like the others
(:attr:`MetaResponse.is_error`): the caller decides, and should close the
connection too, since memcached may go on to read a refused command's data
block as a command of its own.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

__all__ = [
    "ERROR_STATUSES",
    "MAX_KEY_LENGTH",
    "MAX_LINE_LENGTH",
    "MetaParser",
    "MetaProtocolError",
    "MetaResponse",
    "check_key",
    "meta_delete",
    "meta_get",
    "meta_noop",
    "meta_set",
]

#: memcached's longest key, in bytes.
MAX_KEY_LENGTH: Final = 250
#: The longest response line accepted before its ``\\r\\n`` (a meta header is
#: a status, a size and a few short flags; a returned key is at most 250 bytes).
MAX_LINE_LENGTH: Final = 8192
#: The statuses of error lines.
ERROR_STATUSES: Final = frozenset({"ERROR", "CLIENT_ERROR", "SERVER_ERROR"})

# A key is 1-250 bytes without whitespace or control characters; flags are
# space-separated tokens, each a letter and an optional argument.
_KEY: Final = re.compile(rb"[\x21-\x7e\x80-\xff]{1,250}\Z")
_FLAGS: Final = re.compile(rb"(?:[A-Za-z][\x21-\x7e]*(?: [A-Za-z][\x21-\x7e]*)*)?\Z")
_PLAIN: Final = frozenset({b"HD", b"EN", b"NF", b"NS", b"EX", b"MN"})
_ERROR_LINES: Final = ((b"CLIENT_ERROR", "CLIENT_ERROR"), (b"SERVER_ERROR", "SERVER_ERROR"), (b"ERROR", "ERROR"))
_CRLF: Final = b"\r\n"
# the buffer is compacted once this many consumed bytes precede unread ones
_COMPACT: Final = 1 << 16


class MetaProtocolError(Exception):
    """The peer sent bytes that are no meta-protocol response: the connection is out of step."""


class MetaResponse(NamedTuple):
    """One response.

    :ivar status: the two-letter return code (``"VA"``, ``"HD"``, ``"EN"``,
        ``"NF"``, ``"NS"``, ``"EX"``, ``"MN"``) or, for an error line,
        ``"ERROR"``, ``"CLIENT_ERROR"`` or ``"SERVER_ERROR"``.
    :ivar flags: the returned flags, by letter: ``{"c": b"42", "W": b""}``.
    :ivar value: the data block of a ``VA`` response, otherwise ``None``.
    :ivar message: the text of an error line (``""`` otherwise).
    """

    status: str
    flags: dict[str, bytes]
    value: bytes | None = None
    message: str = ""

    @property
    def is_error(self) -> bool:
        """Whether this is an error line."""
        return self.status in ERROR_STATUSES


def check_key(key: bytes) -> bytes:
    """``key`` if it is a valid memcached key (1-250 bytes, no whitespace or control characters).

    :raises TypeError: for a key that is not ``bytes``.
    :raises ValueError: for an invalid key.
    """
    if type(key) is not bytes:
        raise TypeError(f"a memcached key must be bytes; got {type(key).__name__}")
    if _KEY.match(key) is None:
        if not key or len(key) > MAX_KEY_LENGTH:
            raise ValueError(f"a memcached key must be 1 to {MAX_KEY_LENGTH} bytes long; got {len(key)}")
        raise ValueError(f"a memcached key may not contain whitespace or control characters: {key[:60]!r}")
    return key


# flag strings already checked (a driver sends few distinct ones); bounded
_CHECKED: set[bytes] = set()
_CHECKED_LIMIT: Final = 1024


def _check_flags(flags: bytes) -> bytes:
    if flags in _CHECKED:
        return flags
    if type(flags) is not bytes or _FLAGS.match(flags) is None:
        raise ValueError(f"meta flags must be space-separated tokens, each a letter and an argument: {flags!r}")
    if len(_CHECKED) >= _CHECKED_LIMIT:
        _CHECKED.clear()
    _CHECKED.add(flags)
    return flags


def _line(command: bytes, key: bytes, flags: bytes) -> bytes:
    check_key(key)
    if flags:
        return command + key + b" " + _check_flags(flags) + _CRLF
    return command + key + _CRLF


def meta_get(key: bytes, flags: bytes = b"") -> bytes:
    """An ``mg`` request, e.g. ``meta_get(b"k", b"v c N30")``.

    :param flags: the request flags, space separated (``v`` value, ``c`` cas,
        ``N<ttl>`` vivify on miss, ``t`` remaining TTL, ...).
    :raises ValueError: for an invalid key or flags.
    """
    return _line(b"mg ", key, flags)


def meta_set(key: bytes, value: bytes, flags: bytes = b"") -> bytes:
    """An ``ms`` request storing ``value``, e.g. ``meta_set(b"k", data, b"T60 C42")``.

    :raises TypeError: for a value that is not bytes.
    :raises ValueError: for an invalid key or flags.
    """
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"a memcached value must be bytes; got {type(value).__name__}")
    check_key(key)
    size = str(len(value)).encode("ascii")
    head = b"ms " + key + b" " + size
    if flags:
        head += b" " + _check_flags(flags)
    return head + _CRLF + bytes(value) + _CRLF


def meta_delete(key: bytes, flags: bytes = b"") -> bytes:
    """An ``md`` request, e.g. ``meta_delete(b"k", b"I T30")`` (mark stale) or ``meta_delete(b"k", b"C42")``.

    :raises ValueError: for an invalid key or flags.
    """
    return _line(b"md ", key, flags)


def meta_noop() -> bytes:
    """An ``mn`` request: its ``MN`` answer says every earlier request on the connection was answered."""
    return b"mn\r\n"


def _flags_of(tokens: list[bytes]) -> dict[str, bytes]:
    flags = {}
    for token in tokens:
        if token:
            flags[chr(token[0])] = token[1:]
    return flags


class MetaParser:
    """Incremental parser of meta responses (see the module docs).

    Feed it bytes with :meth:`feed` as they arrive; :meth:`next_response`
    returns the next complete response, or ``None`` until enough bytes are
    there.  Values of any size are assembled across pieces.
    """

    __slots__ = ("_buf", "_pending", "_pos")

    def __init__(self) -> None:
        # what was received and not yet returned starts at _pos; a single piece
        # stays the bytes object it arrived as (no copy), several are joined
        self._buf: bytes | bytearray = b""
        self._pos = 0
        # (flags, size) of a VA line whose data block is not complete yet
        self._pending: tuple[dict[str, bytes], int] | None = None

    def feed(self, data: bytes) -> None:
        """Add bytes received from the connection."""
        buf = self._buf
        if self._pos >= len(buf):
            self._buf = data
            self._pos = 0
        elif type(buf) is bytearray:
            buf += data
        else:
            joined = bytearray(buf[self._pos :])
            joined += data
            self._buf = joined
            self._pos = 0

    def buffered(self) -> int:
        """Bytes received but not yet part of a returned response."""
        return len(self._buf) - self._pos

    def needed(self) -> int:
        """How many more bytes the value being received needs (0 when no value is pending)."""
        if self._pending is None:
            return 0
        return max(0, self._pending[1] + 2 - self.buffered())

    def next_response(self) -> MetaResponse | None:
        """The next complete response, or ``None`` when more bytes are needed.

        :raises MetaProtocolError: when the bytes are no valid response.
        """
        buf = self._buf
        pos = self._pos
        pending = self._pending
        if pending is None:
            end = buf.find(_CRLF, pos)
            if end < 0:
                if len(buf) - pos > MAX_LINE_LENGTH:
                    raise MetaProtocolError(f"response line longer than {MAX_LINE_LENGTH} bytes")
                return None
            if end - pos > MAX_LINE_LENGTH:
                raise MetaProtocolError(f"response line longer than {MAX_LINE_LENGTH} bytes")
            line = bytes(buf[pos:end])  # a no-op on bytes
            pos = end + 2
            head = line[:2]
            if head == b"VA" and line[2:3] == b" ":
                size, _space, rest = line[3:].partition(b" ")
                if not size.isdigit() or len(size) > 10:
                    raise MetaProtocolError(f"malformed value line {line[:80]!r}")
                pending = (_flags_of(rest.split(b" ")) if rest else {}, int(size))
            elif head in _PLAIN and (len(line) == 2 or line[2:3] == b" "):
                self._consumed(pos)
                return MetaResponse(head.decode("ascii"), _flags_of(line[3:].split(b" ")))
            else:
                for prefix, status in _ERROR_LINES:
                    if line == prefix or line.startswith(prefix + b" "):
                        self._consumed(pos)
                        text = line[len(prefix) + 1 :].decode("utf-8", "replace")
                        return MetaResponse(status, {}, None, text)
                raise MetaProtocolError(f"unexpected response line {line[:80]!r}")
        flags, size_ = pending
        stop = pos + size_
        if len(buf) < stop + 2:
            self._pos = pos
            self._pending = pending
            return None
        if buf[stop : stop + 2] != _CRLF:
            raise MetaProtocolError(f"a {size_}-byte value block does not end with CRLF where its size says")
        value = bytes(buf[pos:stop])  # a no-op on bytes
        self._pending = None
        self._consumed(stop + 2)
        return MetaResponse("VA", flags, value)

    def _consumed(self, pos: int) -> None:
        buf = self._buf
        if pos >= len(buf):
            self._buf = b""
            pos = 0
        elif pos >= _COMPACT and type(buf) is bytearray:
            del buf[:pos]
            pos = 0
        self._pos = pos
