"""The compatibility measure that lets shove 0.6.6 import on Python 3.10+.

These tests run in fresh interpreters, because an imported shove stays in
``sys.modules`` and would hide whether the measure is needed or works.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest

# find_spec, not importorskip: importing shove is what is under test
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("shove") is None, reason="shove is not installed: pip install stockpyle[shove]"
)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_plain_import_of_shove_still_fails() -> None:
    # When this starts failing, shove (or stuf) was fixed upstream: the
    # compatibility measure in stockpyle/_shove_compat.py can go.
    result = run_python("import shove")
    assert result.returncode == 1
    assert "cannot import name 'MutableMapping' from 'collections'" in result.stderr


def test_the_only_missing_names_are_the_aliased_ones() -> None:
    # Each alias on its own is not enough; all three together are.
    from stockpyle._shove_compat import MISSING_ABC_NAMES

    assert MISSING_ABC_NAMES == ("Mapping", "MutableMapping", "Sequence")
    result = run_python(
        """
        import collections, collections.abc
        from stockpyle._shove_compat import pkg_resources_standin
        for name in ("Mapping", "MutableMapping", "Sequence"):
            setattr(collections, name, getattr(collections.abc, name))
        with pkg_resources_standin():
            import shove, shove.store, shove.cache
        print("imported")
        """
    )
    assert result.stdout.strip() == "imported", result.stderr


def test_shove_imports_without_pkg_resources() -> None:
    # As with setuptools 82+ (no pkg_resources) or a Python 3.12+ venv (no
    # setuptools): shove's one pkg_resources function comes from the stand-in,
    # which is gone again afterwards, and the backends are the declared ones.
    result = run_python(
        """
        import sys
        sys.modules["pkg_resources"] = None  # any import of it fails
        from stockpyle._shove_compat import import_shove
        shove = import_shove()
        from shove import _imports
        print(sorted(_imports.stores), sorted(_imports.caches), sys.modules["pkg_resources"])
        s = shove.Shove("simple://")
        s["k"] = 1
        print(s["k"])
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "['dbm', 'file', 'lite', 'memory', 'simple'] "
        "['file', 'filelru', 'lite', 'memlru', 'memory', 'simple', 'simplelru'] None",
        "1",
    ]


def test_the_standin_is_used_only_during_the_import() -> None:
    result = run_python(
        """
        import sys
        from stockpyle._shove_compat import import_shove
        import_shove()
        from shove import _imports
        print("pkg_resources" in sys.modules, _imports.iter_entry_points.__module__)
        """
    )
    assert result.stdout.split() == ["False", "stockpyle._shove_compat"], result.stderr


def test_an_imported_pkg_resources_is_used_as_it_is() -> None:
    result = run_python(
        """
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # setuptools 81 warns that pkg_resources is deprecated
            try:
                import pkg_resources
            except ImportError:
                raise SystemExit("no pkg_resources")
        from stockpyle._shove_compat import import_shove
        import_shove()
        from shove import _imports
        print(_imports.iter_entry_points is pkg_resources.iter_entry_points, sorted(_imports.stores))
        """
    )
    if "no pkg_resources" in result.stderr:
        pytest.skip("this environment has no pkg_resources (setuptools 82+ or none)")
    assert result.stdout.strip() == "True ['dbm', 'file', 'lite', 'memory', 'simple']", result.stderr


def test_iter_entry_points_matches_pkg_resources_semantics() -> None:
    from stockpyle._shove_compat import iter_entry_points

    stores = {entry_point.name: entry_point for entry_point in iter_entry_points("shove.stores")}
    assert set(stores) == {"dbm", "file", "lite", "memory", "simple"}
    assert [entry_point.name for entry_point in iter_entry_points("shove.stores", "file")] == ["file"]
    assert list(iter_entry_points("stockpyle.no-such-group")) == []


def test_import_shove_works_and_removes_the_aliases_afterwards() -> None:
    result = run_python(
        """
        import collections, sys, tempfile
        from stockpyle._shove_compat import import_shove
        shove = import_shove()
        print(sorted(n for n in ("Mapping", "MutableMapping", "Sequence") if hasattr(collections, n)))
        # the built-in backends load after the aliases are gone
        d = tempfile.mkdtemp()
        for uri in ("simple://", "memory://", f"file://{d}/f", f"lite://{d}/l.db", f"dbm://{d}/d"):
            s = shove.Shove(uri)
            s["k"] = ("v", None)
            s.sync()
            assert s["k"] == ("v", None), uri
            s.close()
        print("backends ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "backends ok"]


def test_importing_stockpyle_applies_nothing_and_imports_no_driver() -> None:
    result = run_python(
        """
        import collections, sys
        import stockpyle
        from stockpyle.stores import ShoveStore
        assert stockpyle.ShoveStore is ShoveStore
        print(hasattr(collections, "MutableMapping"), "shove" in sys.modules, "stuf" in sys.modules)
        """
    )
    assert result.stdout.strip() == "False False False", result.stderr


def test_shove_store_without_shove_names_the_extra() -> None:
    result = run_python(
        """
        import sys
        sys.modules["shove"] = None  # as if shove were not installed
        from stockpyle import ShoveStore
        from stockpyle.testing import Item
        store = ShoveStore(shove={})  # a plain mapping needs no shove
        store.put(Item("k", 1, 2))
        assert store.get(Item, {"key": "k"}).zap == 1
        try:
            ShoveStore(uri="simple://")
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.stdout.strip() == "ShoveStore requires shove: pip install stockpyle[shove]", result.stderr


def test_missing_stuf_also_names_the_extra() -> None:
    result = run_python(
        """
        import sys
        sys.modules["stuf"] = None
        from stockpyle import ShoveStore
        try:
            ShoveStore(uri="simple://")
        except ImportError as exc:
            print(exc, exc.__cause__, exc.__suppress_context__)
        """
    )
    assert result.stdout.strip() == "ShoveStore requires shove: pip install stockpyle[shove] None True", result.stderr


def test_aliases_that_python_still_has_are_left_alone() -> None:
    import collections

    from stockpyle._shove_compat import collections_abc_aliases

    sentinel = object()
    collections.Sequence = sentinel  # type: ignore[attr-defined]
    try:
        with collections_abc_aliases() as added:
            assert added == ["Mapping", "MutableMapping"]
            assert collections.Sequence is sentinel  # type: ignore[attr-defined]
        assert not hasattr(collections, "MutableMapping")
        assert collections.Sequence is sentinel  # type: ignore[attr-defined]
    finally:
        del collections.Sequence  # type: ignore[attr-defined]
