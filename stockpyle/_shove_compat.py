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
"""

from __future__ import annotations

import collections
import collections.abc
import importlib
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

__all__ = ["MISSING_ABC_NAMES", "collections_abc_aliases", "import_shove"]

#: The ``collections`` names shove 0.6.6 and stuf 0.9.16 import at module level.
MISSING_ABC_NAMES: tuple[str, ...] = ("Mapping", "MutableMapping", "Sequence")

# shove itself plus the modules its built-in backends (simple, memory, file,
# lite, dbm stores and caches) are loaded from
_SHOVE_MODULES: tuple[str, ...] = ("shove", "shove.store", "shove.cache")

_lock = threading.Lock()

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


def import_shove() -> ModuleType:
    """Import and return the ``shove`` package, applying the compatibility aliases.

    :returns: the ``shove`` module.
    :raises ImportError: naming ``pip install stockpyle[shove]`` when shove or
        stuf is not installed, or ``setuptools`` when shove's ``pkg_resources``
        import fails.
    """
    if all(sys.modules.get(name) is not None for name in _SHOVE_MODULES):
        return sys.modules["shove"]
    try:
        with collections_abc_aliases(), warnings.catch_warnings():
            # shove 0.6.6 finds its backends with pkg_resources, which newer
            # setuptools releases deprecate with a warning at import time
            warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated")
            for name in _SHOVE_MODULES:
                importlib.import_module(name)
    except ImportError as exc:
        if exc.name == "pkg_resources":
            raise ImportError("shove 0.6.6 needs pkg_resources, part of setuptools: pip install setuptools") from None
        if exc.name in ("shove", "stuf"):
            raise ImportError(INSTALL_HINT) from None
        raise
    return sys.modules["shove"]
