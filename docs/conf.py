"""Sphinx configuration for the stockpyle documentation.

Build the HTML pages and run every example as a doctest with (after
``pip install -e ".[all]" --group docs``)::

    sphinx-build -W --keep-going -b html docs docs/_build/html
    sphinx-build -W -b doctest docs docs/_build/doctest
"""

from __future__ import annotations

import os
import sys

# Let autodoc import the package straight from the checkout, without installing it.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import stockpyle  # needs the path set above

project = "stockpyle"
author = "The stockpyle developers"
copyright = "The stockpyle developers"
release = stockpyle.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

# The docs are built offline (no intersphinx); references to the standard
# library are written as plain literals instead.
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
root_doc = "index"

autodoc_member_order = "bysource"
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
# Signatures stay readable: annotations are shown as written in the source.
autodoc_typehints = "signature"
autodoc_preserve_defaults = True

# Every ">>>" block in the pages is a test; output must match exactly.
doctest_test_doctest_blocks = "default"
# Run before every group (and for ":skipif:"): the memcached binary that the
# MemcacheStore page starts a private server from, or None to skip those examples.
doctest_global_setup = """
import os as _os, shutil as _shutil
MEMCACHED_BINARY = _shutil.which("memcached") or (
    "/usr/bin/memcached" if _os.access("/usr/bin/memcached", _os.X_OK) else None
)
REDIS_SERVER_BINARY = _shutil.which("redis-server") or (
    "/usr/bin/redis-server" if _os.access("/usr/bin/redis-server", _os.X_OK) else None
)
"""

# furo: a sidebar with the whole table of contents, a search box, and a
# per-page outline; it needs no network access at build time.
html_theme = "furo"
html_static_path: list[str] = []
html_title = f"stockpyle {release}"
html_theme_options = {
    "navigation_with_keys": True,
}


def _public_bases(app: object, name: str, obj: object, options: object, bases: list[type]) -> None:
    """Show a class's nearest public ancestor instead of a private helper base.

    ``ProcessMemoryStore`` derives from the internal ``_InProcessStore``; the
    reader should see the documented :class:`~stockpyle.stores.base.BaseStore`.
    """
    for index, base in enumerate(bases):
        public = base
        while isinstance(public, type) and public.__name__.startswith("_"):
            public = public.__mro__[1]
        bases[index] = public


def setup(app: object) -> None:
    app.connect("autodoc-process-bases", _public_bases)  # type: ignore[attr-defined]
