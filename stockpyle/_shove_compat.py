"""Import shove 0.6.6 (its last release) on Python 3.10 and later.

What breaks: shove and its dependency stuf import abstract base classes from
the ``collections`` module, which Python 3.10 removed (they live in
``collections.abc`` since 3.3)::

    shove/core.py     from collections import MutableMapping
    shove/store.py    from collections import MutableMapping
    stuf/_core.py     from collections import MutableMapping
    stuf/base.py      from collections import Sequence, Mapping
    stuf/core.py      from collections import Mapping, defaultdict, namedtuple

so ``import shove`` fails with ``ImportError: cannot import name
'MutableMapping' from 'collections'``.  Every one of these is a ``from ...
import`` at module level: neither package looks ``collections.X`` up later, at
call time.

The measure, kept as narrow as possible: :func:`import_shove` adds exactly the
three missing names (``Mapping``, ``MutableMapping``, ``Sequence``) to the
``collections`` module, imports shove together with the modules holding its
built-in backends (shove otherwise imports those later, when a ``Shove`` is
first built, through its entry points), and removes the names again.  Nothing
happens when stockpyle is imported: only a :class:`~stockpyle.stores.ShoveStore`
that needs shove calls it.  Names the running Python still has are left alone,
so when shove is fixed upstream the aliases are simply not needed (the test
suite asserts that a plain ``import shove`` still fails, to notice that day).

The second break: shove imports ``pkg_resources``, which setuptools 82 and
later no longer contain (81 still has it, with a deprecation warning), and a
virtual environment made by Python 3.12 or later has no setuptools at all.
shove uses exactly one function of it, in ``shove/_imports.py``::

    from pkg_resources import iter_entry_points
    stores = dict((_store.name, _store) for _store in iter_entry_points('shove.stores'))
    caches = dict((_cache.name, _cache) for _cache in iter_entry_points('shove.caches'))

and later calls ``.load()`` on the entry points it found.  The entry points
of ``importlib.metadata`` have the same ``.name`` and ``.load()``, so while
shove is imported, a stand-in module named ``pkg_resources`` offering only
``iter_entry_points`` (read from ``importlib.metadata``) sits in
``sys.modules``; it is taken out again afterwards.  A real ``pkg_resources``
that something had already imported is used as it is.
"""

from __future__ import annotations

import collections
import collections.abc
import importlib
import importlib.metadata
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

__all__ = ["MISSING_ABC_NAMES", "collections_abc_aliases", "import_shove", "iter_entry_points", "pkg_resources_standin"]

#: The ``collections`` names shove 0.6.6 and stuf 0.9.16 import at module level.
MISSING_ABC_NAMES: tuple[str, ...] = ("Mapping", "MutableMapping", "Sequence")

# shove itself plus the modules its built-in backends (simple, memory, file,
# lite, dbm stores and caches) are loaded from
_SHOVE_MODULES: tuple[str, ...] = ("shove", "shove.store", "shove.cache")

# re-entrant: import_shove holds it around both measures, which take it too
_lock = threading.RLock()
_ABSENT = object()

INSTALL_HINT = "ShoveStore requires shove: pip install stockpyle[shove]"


@contextmanager
def collections_abc_aliases() -> Iterator[list[str]]:
    """Provide the removed ``collections`` ABC aliases for the duration of the block.

    Only names missing from ``collections`` are added, and exactly those are
    removed afterwards (unless something else replaced them meanwhile).

    :returns: (as the ``with`` target) the names that were added.
    """
    with _lock:
        added = [name for name in MISSING_ABC_NAMES if name not in vars(collections)]
        for name in added:
            setattr(collections, name, getattr(collections.abc, name))
        try:
            yield added
        finally:
            for name in added:
                if vars(collections).get(name) is getattr(collections.abc, name):
                    delattr(collections, name)


def iter_entry_points(group: str, name: str | None = None) -> Iterator[importlib.metadata.EntryPoint]:
    """The entry points of ``group``, as ``pkg_resources.iter_entry_points`` yields them.

    Read from ``importlib.metadata``.  When several installed distributions
    declare the same name, the first one found on ``sys.path`` wins, as with
    ``pkg_resources``.

    :param group: the entry point group, e.g. ``"shove.stores"``.
    :param name: only the entry point of this name.
    :returns: an iterator of entry points, each with ``.name`` and ``.load()``.
    """
    seen: set[str] = set()
    for entry_point in importlib.metadata.entry_points(group=group):
        if entry_point.name in seen or (name is not None and entry_point.name != name):
            continue
        seen.add(entry_point.name)
        yield entry_point


@contextmanager
def pkg_resources_standin() -> Iterator[bool]:
    """Make ``from pkg_resources import iter_entry_points`` work for the duration of the block.

    A ``pkg_resources`` module that is already imported is left alone.
    Otherwise a stand-in that has only :func:`iter_entry_points` is placed in
    ``sys.modules`` and removed afterwards.  Importing the real
    ``pkg_resources`` instead would fail with setuptools 82 and later, warn
    with 81, and scan every installed distribution.

    :returns: (as the ``with`` target) whether the stand-in was used.
    """
    with _lock:
        if isinstance(sys.modules.get("pkg_resources"), ModuleType):
            yield False
            return
        previous = sys.modules.get("pkg_resources", _ABSENT)
        standin = ModuleType("pkg_resources", "stockpyle's stand-in for the one pkg_resources function shove uses")
        standin.iter_entry_points = iter_entry_points  # type: ignore[attr-defined]
        sys.modules["pkg_resources"] = standin
        try:
            yield True
        finally:
            if sys.modules.get("pkg_resources") is standin:
                if previous is _ABSENT:
                    del sys.modules["pkg_resources"]
                else:
                    sys.modules["pkg_resources"] = previous  # type: ignore[assignment]


def import_shove() -> ModuleType:
    """Import and return the ``shove`` package, applying both compatibility measures.

    :returns: the ``shove`` module.
    :raises ImportError: naming ``pip install stockpyle[shove]`` when shove or
        one of its dependencies (stuf, parse) is not installed.
    """
    if all(sys.modules.get(name) is not None for name in _SHOVE_MODULES):
        return sys.modules["shove"]
    try:
        with _lock, collections_abc_aliases(), pkg_resources_standin():
            for name in _SHOVE_MODULES:
                importlib.import_module(name)
    except ImportError as exc:
        if exc.name in ("shove", "stuf", "parse"):
            raise ImportError(INSTALL_HINT) from None
        raise
    return sys.modules["shove"]
