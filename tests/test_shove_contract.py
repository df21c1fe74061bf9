"""ShoveStore against the store contract, over every built-in shove backend and in a chain."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from typing import Any, ClassVar

import pytest

from stockpyle import ChainedStore, ProcessMemoryStore
from stockpyle.testing import ConsistencyContract, StoreContract

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("shove") is None, reason="shove is not installed: pip install stockpyle[shove]"
)


class ShoveContract(StoreContract):
    """Each make_store() call opens a new, empty backend location."""

    scheme: ClassVar[str]
    _counter = itertools.count()
    _tmp: Path

    @pytest.fixture(autouse=True)
    def _tmp_dir(self, tmp_path: Path) -> None:
        self._tmp = tmp_path

    def uri(self) -> str:
        name = f"store{next(self._counter)}"
        return {
            "simple": "simple://",
            "memory": "memory://",
            "file": f"file://{self._tmp}/{name}",
            "lite": f"lite://{self._tmp}/{name}.sqlite",
            "dbm": f"dbm://{self._tmp}/{name}.dbm",
        }[self.scheme]

    def make_store(self, **options: Any) -> Any:
        from stockpyle.stores.shove import ShoveStore

        return ShoveStore(uri=self.uri(), **options)


class TestSimpleContract(ShoveContract):
    scheme = "simple"


class TestMemoryContract(ShoveContract):
    scheme = "memory"


class TestFileContract(ShoveContract):
    scheme = "file"


class TestLiteContract(ShoveContract):
    scheme = "lite"


class TestDbmContract(ShoveContract):
    scheme = "dbm"


class TestPlainMappingContract(ShoveContract):
    """``shove=`` takes any MutableMapping."""

    def make_store(self, **options: Any) -> Any:
        from stockpyle.stores.shove import ShoveStore

        return ShoveStore(shove={}, **options)


class TestChainedOverFileContract(ShoveContract):
    """ProcessMemoryStore in front of a file-backed ShoveStore."""

    scheme = "file"

    def make_store(self, **options: Any) -> Any:
        from stockpyle.stores.shove import ShoveStore

        return ChainedStore([ProcessMemoryStore(**options), ShoveStore(uri=self.uri(), **options)])


# -- the consistency contract (atomic among the threads of one process) -----------


class ShoveConsistency(ConsistencyContract):
    scheme: ClassVar[str]
    _counter = itertools.count()
    _tmp: Path

    @pytest.fixture(autouse=True)
    def _tmp_dir(self, tmp_path: Path) -> None:
        self._tmp = tmp_path

    def make_store(self, **options: Any) -> Any:
        from stockpyle.stores.shove import ShoveStore

        name = f"consistency{next(self._counter)}"
        uri = {
            "memory": "memory://",
            "file": f"file://{self._tmp}/{name}",
            "lite": f"lite://{self._tmp}/{name}.sqlite",
        }[self.scheme]
        return ShoveStore(uri=uri, **options)


class TestMemoryConsistency(ShoveConsistency):
    scheme = "memory"


class TestFileConsistency(ShoveConsistency):
    scheme = "file"


class TestLiteConsistency(ShoveConsistency):
    scheme = "lite"
