"""ShoveStore: any `shove <https://pypi.org/project/shove/>`_ backend (or any mapping) as a store.

Each of an object's keys maps to the entry ``(obj, expires_at)``, where
``expires_at`` is an absolute unix time (wall clock, because shove backends
outlive the process) or ``None``.  Shove keys are human-readable: the
canonical text of :func:`stockpyle.keys.encode_key`, e.g.
``"myapp.models.Foo:key=s:abc"``, so whoever opens the shove sees which class
and which key values each entry belongs to.

Shove's file backend turns a key into a file name with ``quote_plus`` (so
``/`` and NUL cannot form a path), and the text always contains ``:`` (so it
is never ``.`` or ``..``).  Keys whose quoted form would exceed
:data:`MAX_QUOTED_KEY` characters -- file names are limited to 255 bytes --
are shortened to a readable prefix, the marker ``%#`` (which ``encode_key``
never produces, so a shortened key can never equal a natural one) and a
SHA-256 digest of the full text.

shove 0.6.6 does not import on Python 3.10+; see :mod:`stockpyle._shove_compat`
for the narrow compatibility measures applied when a ShoveStore needs shove.

Some backends are bound to the thread that opened them: ``lite://``
(sqlite3) on every Python, and ``dbm://`` from Python 3.13 on, where ``dbm``
creates new databases with ``dbm.sqlite3``.  A store opened from such a URI
opens and uses its shove on one thread of its own
(:class:`OwnerThreadMapping`), so it can be shared between threads -- and
used from a chain that calls it from worker threads -- like every other
store.
"""

from __future__ import annotations

import dbm
import hashlib
import importlib.util
import logging
import pickle
import sqlite3
from collections.abc import Callable, Hashable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any, Final, TypeVar, cast
from urllib.parse import quote_plus

from .._shove_compat import import_shove
from ..errors import ErrorRule, ErrorTable
from ..exceptions import ConfigurationError, SerializationError, StockpyleError, StoreError
from ..keys import Key, encode_key, object_keys
from ..lifetimes import LifetimeCallback
from .base import MISS, BaseDictionaryStore

__all__ = ["MAX_QUOTED_KEY", "OwnerThreadMapping", "ShoveStore", "open_shove", "shove_key"]

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Longest shove key, measured as shove's file backend spells it on disk
#: (``quote_plus``), that is used unshortened; file names may have 255 bytes.
MAX_QUOTED_KEY: Final = 240
_DIGEST_MARK: Final = "%#"
_DIGEST_CHARS: Final = 40
# what the key prefix may take of MAX_QUOTED_KEY once the mark and digest are added
_PREFIX_BUDGET: Final = MAX_QUOTED_KEY - len(quote_plus(_DIGEST_MARK)) - _DIGEST_CHARS

#: shove backends whose data lives in this process: release() must not close them.
_IN_MEMORY_SCHEMES: Final = ("simple", "memory")

# Errors of the built-in backends: files (OSError), lite:// (sqlite3), dbm://.
_BACKEND_ERRORS: Final = (OSError, sqlite3.Error, *dbm.error)

#: How the shove backends' errors map into the stockpyle tree.
ERRORS: Final = ErrorTable(
    "shove backend",
    [
        ErrorRule(_BACKEND_ERRORS, StoreError),
        # shove's file backend reports a failed file write as KeyError
        ErrorRule(KeyError, StoreError, message="the backend could not write the entry"),
    ],
)

# Python 3.13+: new dbm databases are dbm.sqlite3 ones, bound to their thread
_DBM_THREAD_BOUND: Final = importlib.util.find_spec("dbm.sqlite3") is not None


def shove_key(key: Key) -> str:
    """The shove key of one stockpyle key: readable, and a safe file name.

    :param key: a key from :func:`stockpyle.keys.lookup_key` or
        :func:`stockpyle.keys.object_keys`.
    :returns: ``encode_key(key)``, or for long keys a readable prefix of it
        followed by ``%#`` and a digest of the whole text.
    """
    text = encode_key(key)
    # quote_plus writes at most 3 characters per ASCII character, 12 for others
    # (4 UTF-8 bytes as %XX); most keys are short enough to skip measuring
    # (encode_key escapes lone surrogates, so the text always encodes to UTF-8)
    widest = 3 if text.isascii() else 12
    if len(text) * widest <= MAX_QUOTED_KEY or len(quote_plus(text)) <= MAX_QUOTED_KEY:
        return text
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:_DIGEST_CHARS]
    used = 0
    end = 0
    for end, char in enumerate(text):  # noqa: B007 - end is used after the loop
        used += len(quote_plus(char))
        if used > _PREFIX_BUDGET:
            break
    return f"{text[:end]}{_DIGEST_MARK}{digest}"


class _NoCache:
    """A shove cache that holds nothing, so every read goes to the backend.

    Shove's default cache keeps values for 300 s in process memory, which hides
    writes made by other processes and duplicates stockpyle's own memory layers.
    """

    def __getitem__(self, key: Any) -> Any:
        raise KeyError(key)

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __delitem__(self, key: Any) -> None:
        raise KeyError(key)


def open_shove(uri: str, **options: Any) -> Any:
    """Open a ``shove.Shove`` for ``uri`` the way :class:`ShoveStore` does.

    Unless ``options`` say otherwise, the shove has no cache (``cache=``) and
    writes every change through to the backend at once (``sync=1``), so other
    processes and other ShoveStores on the same URI see it.

    :param uri: a shove store URI such as ``"file:///var/cache/app"``,
        ``"lite:///var/cache/app.sqlite"`` or ``"dbm:///var/cache/app.dbm"``.
    :param options: passed to ``shove.Shove`` (``compress=``, ``protocol=``,
        ``cache=``, ``sync=``...).
    :returns: the open ``shove.Shove``.
    :raises ConfigurationError: for a malformed URI or an unknown backend.
    :raises ImportError: when shove is not installed.
    """
    if not isinstance(uri, str) or "://" not in uri:
        raise ConfigurationError(f"a shove URI looks like 'file:///path/to/dir'; got {uri!r}")
    shove = import_shove()
    from shove import _imports

    scheme = uri.split("://", 1)[0]
    if scheme not in _imports.stores:
        installed = ", ".join(sorted(_imports.stores))
        raise ConfigurationError(
            f"shove has no {scheme!r} backend installed (installed: {installed}); "
            "check the URI or install the package that provides that backend"
        )
    options.setdefault("cache", _NoCache())
    options.setdefault("sync", 1)
    try:
        return shove.Shove(uri, **options)
    except _BACKEND_ERRORS as exc:
        raise ERRORS.error_for(exc, None, f"open {uri!r}") from exc


class OwnerThreadMapping(MutableMapping[Any, Any]):
    """A mapping opened, used and closed on one thread that this object owns.

    For backends whose objects may only be used by the thread that created
    them (``dbm.sqlite3``, the default ``dbm`` of Python 3.13 and later):
    every operation is handed to that thread and its result (or exception)
    handed back, so callers may use the mapping from any thread.  Calls are
    carried out one at a time, in the order they arrive.

    :param opener: called on the owner thread to open the mapping.
    :raises Exception: whatever ``opener`` raises (the owner thread is then stopped).
    """

    def __init__(self, opener: Callable[[], MutableMapping[Any, Any]]) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stockpyle-shove-owner")
        try:
            self.target: MutableMapping[Any, Any] = self._call(opener)
        except BaseException:
            self._executor.shutdown(wait=True)
            raise

    def _call(self, function: Callable[..., T], *args: Any) -> T:
        return self._executor.submit(function, *args).result()

    def __getitem__(self, key: Any) -> Any:
        return self._call(self.target.__getitem__, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._call(self.target.__setitem__, key, value)

    def __delitem__(self, key: Any) -> None:
        self._call(self.target.__delitem__, key)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._call(list, self.target))

    def __len__(self) -> int:
        return self._call(len, self.target)

    def sync(self) -> None:
        """Run the mapping's ``sync()`` (if it has one) on the owner thread."""
        syncer = getattr(self.target, "sync", None)
        if callable(syncer):
            self._call(syncer)

    def close(self) -> None:
        """Close the mapping on the owner thread, then stop that thread."""
        try:
            closer = getattr(self.target, "close", None)
            if callable(closer):
                self._call(closer)
        finally:
            self._executor.shutdown(wait=True)

    # shove's write buffer and cache are plain in-memory objects, safe to reach
    # from any thread (ShoveStore clears them after a failed write)
    @property
    def _buffer(self) -> Any:
        return getattr(self.target, "_buffer", None)

    @property
    def _cache(self) -> Any:
        return getattr(self.target, "_cache", None)


def _is_shove(mapping: object) -> bool:
    module = type(mapping).__module__
    return module == "shove" or module.startswith("shove.")


class ShoveStore(BaseDictionaryStore):
    """A store on any shove backend, a ``shove.Shove`` object or any MutableMapping.

    Entries are ``(obj, expires_at)`` tuples under human-readable keys (see
    :func:`shove_key`); ``expires_at`` is an absolute unix time, so lifetimes
    hold across processes.  An expired entry is never returned and is removed
    when read.  A re-put after a key attribute changed removes the entries
    under the old values: the keys an entry occupies are recomputed from the
    stored copy.  A read only returns an object whose own keys include the one
    asked for, so no file-system quirk (case-insensitive names) or shortened
    key can ever hand back another object.

    :param shove: a ``shove.Shove`` (or any MutableMapping) to store into.
    :param shoveuri: a shove URI; the store opens it with :func:`open_shove`.
    :param polymorphic: also index objects under their storable base classes.
    :param lifetime_cb: ``obj -> lifetime`` for this store.
    :param uri: the modern spelling of ``shoveuri``.
    :param tombstone_lifetime: seconds a deleted key keeps a
        :class:`~stockpyle.stores.base.Tombstone` entry that refuses back-fills
        (:meth:`add`); ``0`` deletes the entries plainly.
    :param shove_options: passed to ``shove.Shove`` when a URI is given.
    :raises ConfigurationError: unless exactly one of ``shove`` and a URI is
        given, or when the URI is malformed or names no installed backend.
    :raises ImportError: when a URI is given and shove is not installed.
    """

    def __init__(
        self,
        shove: MutableMapping[Any, Any] | None = None,
        shoveuri: str | None = None,
        polymorphic: bool = False,
        lifetime_cb: LifetimeCallback | None = None,
        *,
        uri: str | None = None,
        tombstone_lifetime: float = 5.0,
        **shove_options: Any,
    ) -> None:
        if isinstance(shove, str):
            # ShoveStore("file:///...") reads naturally but the first argument is the shove object
            raise ConfigurationError(
                f"ShoveStore's first argument is a shove.Shove or a MutableMapping, not a URI; "
                f"to open a shove URI write ShoveStore(uri={shove!r})"
            )
        if uri is not None and shoveuri is not None:
            raise ConfigurationError("give the shove URI once: uri= and shoveuri= are the same argument")
        uri = shoveuri if uri is None else uri
        if (shove is None) == (uri is None):
            raise ConfigurationError(
                "ShoveStore needs exactly one of shove= (a shove.Shove or any MutableMapping) "
                "and uri= (a shove URI such as 'file:///path/to/dir')"
            )
        if shove is not None and shove_options:
            raise ConfigurationError(f"shove options {sorted(shove_options)} only apply when ShoveStore opens a URI")
        if shove is not None and not isinstance(cast(object, shove), MutableMapping):
            raise ConfigurationError(f"shove= takes a shove.Shove or a MutableMapping; got {type(shove).__name__}")
        # validate the other arguments (BaseStore does) before any file is opened
        super().__init__(
            {},
            polymorphic=polymorphic,
            lifetime_cb=lifetime_cb,
            string_keys=True,
            tombstone_lifetime=tombstone_lifetime,
        )
        self.uri = uri
        self._shove_options = shove_options
        if uri is not None:
            self.mapping = self._open(uri)
        elif shove is not None:
            self.mapping = shove
        # shove backends pickle what they hold: check that up front, because the
        # file backend truncates a file before it pickles into it, and a failure
        # there would lose the previous entry
        self._pickles = _is_shove(self.mapping.target if isinstance(self.mapping, OwnerThreadMapping) else self.mapping)
        self._released = False

    # -- hooks of BaseDictionaryStore ---------------------------------------

    def map_key(self, key: Key) -> Hashable:
        """The shove key of one stockpyle key (see :func:`shove_key`)."""
        return shove_key(key)

    def _make_entry(self, obj: object, expires: float | None, mkeys: tuple[Hashable, ...]) -> Any:
        # the documented shove layout: the keys are recomputed from the object
        return (obj, expires)

    def _entry_keys(self, entry: Any) -> set[Hashable]:
        # the shove keys a stored copy occupies, under any storage mode: an old
        # copy indexed polymorphically is stale under its base-class keys too
        try:
            return {shove_key(k) for k in object_keys(entry[0], True)}
        except StockpyleError:
            # the class's key declaration changed since it was stored
            return set()

    def _load(self, mkey: Hashable) -> Any:
        """Return the entry ``(obj, expires_at)`` at ``mkey``, or :data:`MISS`."""
        try:
            entry = self.mapping[mkey]
        except KeyError:
            return MISS
        except _BACKEND_ERRORS as exc:
            raise ERRORS.error_for(exc, self, f"read {mkey!r}") from exc
        except Exception as exc:
            raise SerializationError(f"the shove entry {mkey!r} could not be decoded: {exc!r}") from exc
        if type(entry) is not tuple or len(entry) != 2 or not (entry[1] is None or isinstance(entry[1], (int, float))):
            raise SerializationError(
                f"the shove entry {mkey!r} is not a stockpyle (obj, expires_at) tuple; "
                "is another program writing to this shove?"
            )
        return entry

    def _owns(self, key: Key, obj: object) -> bool:
        # a shortened key, or a case-insensitive file system, must never hand
        # back another object: the object's own keys must include the one asked
        try:
            if key in object_keys(obj, True):
                return True
        except StockpyleError:
            pass
        log.debug("shove entry for %r holds an object that does not have this key; treated as a miss", key)
        return False

    def _check_value(self, obj: object, expires: float | None) -> None:
        # Shove backends pickle what they hold. Check that up front, before the
        # write starts: the file backend truncates a file before it pickles
        # into it (a failure there loses the previous entry), the others would
        # raise a raw pickling error midway through an object's keys, and shove
        # would keep the failed item in its write buffer. One extra pickle per
        # put buys a clean SerializationError with nothing written.
        if not self._pickles:
            return
        try:
            pickle.dumps((obj, expires), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise SerializationError(
                f"{type(obj).__qualname__} object cannot be stored in a shove: it cannot be pickled ({exc})"
            ) from exc

    @contextmanager
    def _reading(self) -> Iterator[None]:
        with self._lock:
            self._reopen()
            yield

    @contextmanager
    def _writing(self, action: str) -> Iterator[None]:
        with self._lock, self._backend_errors(action):
            self._reopen()
            yield
            self._sync()

    def release(self) -> None:
        """Write everything through and free the backend's files and connections.

        Releasing is not final: a store that opened its shove from a URI
        closes it and opens it again on its next operation.  Shoves that hold
        their data in this process's memory (``simple://``, ``memory://``) are
        not closed, since reopening would lose it, and neither is a shove
        passed in with ``shove=`` (it is yours to close): both are synced only.
        """
        with self._lock:
            if self._released:
                return
            with self._backend_errors("close"):
                self._sync()
                if self.uri is not None and self.uri.split("://", 1)[0] not in _IN_MEMORY_SCHEMES:
                    self._released = True
                    closer = getattr(self.mapping, "close", None)
                    if callable(closer):
                        closer()

    # -- helpers ------------------------------------------------------------

    def _sync(self) -> None:
        # a shove given by the caller may buffer writes (shove's default sync=2)
        syncer = getattr(self.mapping, "sync", None)
        if callable(syncer):
            syncer()

    def _reopen(self) -> None:
        if self._released and self.uri is not None:
            with self._backend_errors("reopen"):
                self.mapping = self._open(self.uri)
            self._released = False

    def _open(self, uri: str) -> MutableMapping[Any, Any]:
        """Open the shove at ``uri`` (thread-bound backends on a thread of their own)."""
        options = self._shove_options
        if isinstance(uri, str) and (uri.startswith("lite://") or (_DBM_THREAD_BOUND and uri.startswith("dbm://"))):
            return OwnerThreadMapping(lambda: open_shove(uri, **options))
        return cast("MutableMapping[Any, Any]", open_shove(uri, **options))

    def describe(self) -> str:
        return self._where()

    def _where(self) -> str:
        return repr(self.uri) if self.uri is not None else type(self.mapping).__name__

    @contextmanager
    def _backend_errors(self, action: str) -> Iterator[None]:
        try:
            with ERRORS.translating(self, action):
                yield
        except StoreError:
            self._drop_unwritten()
            raise

    def _drop_unwritten(self) -> None:
        # Shove.sync() keeps its write buffer when the backend fails, and every
        # later read or write would retry (and fail on) it: the failed write is
        # reported to the caller instead, so forget it, also in shove's cache.
        buffer = getattr(self.mapping, "_buffer", None)
        if not isinstance(buffer, dict) or not buffer:
            return
        cache = getattr(self.mapping, "_cache", None)
        if cache is not None:
            for key in list(buffer):
                with suppress(Exception):
                    del cache[key]
        buffer.clear()

    def __repr__(self) -> str:
        return f"<ShoveStore {self._where()} polymorphic={self.polymorphic}>"
