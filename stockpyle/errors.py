"""Translation of driver errors into the stockpyle exception tree, in one place.

Every store and :class:`~stockpyle.collections.CachedMapping` maps the
exceptions of its driver (pymemcache, pylibmc, redis-py, SQLAlchemy, sockets,
file systems) the same way: through an :class:`ErrorTable`, a list of
:class:`ErrorRule` rows saying which driver exception becomes which stockpyle
error, applied by one context manager::

    TABLE = ErrorTable("memcached", [
        ErrorRule(MemcacheServerError, ValueTooLargeError, when=lambda exc: "too large" in str(exc)),
        ErrorRule((OSError, MemcacheUnexpectedCloseError), StoreUnavailableError),
        ErrorRule(MemcacheError, StoreError),
    ], retry=(MemcacheUnexpectedCloseError, BrokenPipeError))

    with TABLE.translating(store, "get"):
        data = client.get(key)

The first matching row wins.  The stockpyle error is raised ``from`` the
driver's exception and carries ``.store`` and ``.action``.  Exceptions no row
matches (bugs, ``KeyboardInterrupt``) pass through untouched.

:meth:`ErrorTable.call` is the same as a function call, for hot paths::

    data = TABLE.call(store, "get", client.get, key)

A table also names the *retryable* exceptions of its driver: a pooled
connection to a server that restarted fails once on first use, and the driver
then tries the (idempotent) operation once more itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Literal, NoReturn

from .exceptions import ObjectError, StockpyleError, StoreError, StoreUnavailableError

__all__ = ["ErrorRule", "ErrorTable"]

_ErrorClass = type[StoreError] | type[ObjectError]


@dataclass(frozen=True)
class ErrorRule:
    """One row of an :class:`ErrorTable`.

    :param catch: the driver exception class (or classes) this row handles.
    :param raise_as: the stockpyle error class raised instead.
    :param when: an optional test of the exception; the row applies only when
        it returns true (e.g. a server error whose text says "too large").
    :param message: what the error says, after ``"{backend} ({where}) failed to
        {action}: "`` (``"... unavailable while trying to {action}: "`` for
        :class:`~stockpyle.exceptions.StoreUnavailableError`); ``None`` uses the
        driver exception's type and text.
    """

    catch: type[BaseException] | tuple[type[BaseException], ...]
    raise_as: _ErrorClass
    when: Callable[[BaseException], bool] | None = None
    message: str | None = None

    def matches(self, exc: BaseException) -> bool:
        """Whether this row applies to ``exc``."""
        return isinstance(exc, self.catch) and (self.when is None or self.when(exc))


class _Translation:
    """The context manager returned by :meth:`ErrorTable.translating` (a class: cheaper than a generator)."""

    __slots__ = ("_action", "_store", "_table")

    def __init__(self, table: ErrorTable, store: Any, action: str) -> None:
        self._table = table
        self._store = store
        self._action = action

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> Literal[False]:
        if exc is None or isinstance(exc, StockpyleError):
            return False
        mapped = self._table.map(exc, self._store, self._action)
        if mapped is None:
            return False
        raise mapped from exc


class ErrorTable:
    """How one backend's driver exceptions become stockpyle errors.

    :param backend: the backend's name in messages (``"memcached"``, ``"Redis"``).
    :param rules: the rows, tried in order.
    :param retry: exceptions after which the driver tries an idempotent
        operation once more (a pooled connection the server closed).
    :param describe: ``store -> str`` naming where the backend is (servers,
        URL) in messages; by default ``store.describe()`` when the store has it.
    """

    __slots__ = ("backend", "catches", "describe", "retry", "rules")

    def __init__(
        self,
        backend: str,
        rules: Sequence[ErrorRule],
        *,
        retry: tuple[type[BaseException], ...] = (),
        describe: Callable[[Any], str] | None = None,
    ) -> None:
        self.backend = backend
        self.rules: tuple[ErrorRule, ...] = tuple(rules)
        self.retry = retry
        self.describe = describe
        catches: list[type[BaseException]] = []
        for rule in self.rules:
            catches.extend(rule.catch if isinstance(rule.catch, tuple) else (rule.catch,))
        #: every driver exception class some row handles (for ``except`` clauses)
        self.catches: tuple[type[BaseException], ...] = tuple(dict.fromkeys(catches))

    def __repr__(self) -> str:
        return f"<ErrorTable {self.backend} ({len(self.rules)} rules)>"

    def _where(self, store: Any) -> str:
        if self.describe is not None:
            return self.describe(store)
        describe = getattr(store, "describe", None)
        return describe() if callable(describe) else ""

    def map(self, exc: BaseException, store: Any = None, action: str = "operate") -> StoreError | ObjectError | None:
        """The stockpyle error for ``exc``, or ``None`` when no row applies.

        :param exc: the driver's exception.
        :param store: the store that was operating (recorded as ``.store``).
        :param action: what it was doing (recorded as ``.action``).
        """
        for rule in self.rules:
            if rule.matches(exc):
                where = self._where(store)
                head = f"{self.backend} ({where})" if where else self.backend
                detail = rule.message if rule.message is not None else _describe(exc)
                if issubclass(rule.raise_as, StoreUnavailableError):
                    text = f"{head} unavailable while trying to {action}: {detail}"
                else:
                    text = f"{head} failed to {action}: {detail}"
                return rule.raise_as(text, store=store, action=action)
        return None

    def error_for(self, exc: BaseException, store: Any = None, action: str = "operate") -> StoreError | ObjectError:
        """:meth:`map` for an exception known to come from the backend: a plain StoreError when no row applies."""
        mapped = self.map(exc, store, action)
        if mapped is not None:
            return mapped
        return StoreError(f"{self.backend} failed to {action}: {_describe(exc)}", store=store, action=action)

    def translating(self, store: Any, action: str) -> _Translation:
        """A context manager that re-raises driver exceptions as stockpyle errors.

        :param store: recorded as the error's ``.store``.
        :param action: recorded as its ``.action`` and named in its message.
        """
        return _Translation(self, store, action)

    def call(self, store: Any, action: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with its exceptions translated: :meth:`translating` as a call, for hot paths."""
        try:
            return fn(*args)
        except self.catches as exc:
            self.raise_for(exc, store, action)

    def raise_for(self, exc: BaseException, store: Any = None, action: str = "operate") -> NoReturn:
        """Raise the stockpyle error for ``exc`` (chained to it), or ``exc`` itself when no row applies.

        For the hottest paths, which call the driver directly and translate
        only what they catch::

            try:
                data = driver.get(key)
            except table.catches as exc:
                table.raise_for(exc, store, "get")
        """
        mapped = self.map(exc, store, action)
        if mapped is None:
            raise exc
        raise mapped from exc


_MESSAGE_LIMIT: Final = 300


def _describe(exc: BaseException) -> str:
    """A driver exception as ``Type: text``, bounded in length."""
    text = str(exc) or repr(exc)
    if len(text) > _MESSAGE_LIMIT:
        text = text[: _MESSAGE_LIMIT - 3] + "..."
    return f"{type(exc).__name__}: {text}"
