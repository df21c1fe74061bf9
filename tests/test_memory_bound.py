"""In-process stores hold memory proportional to their live entries, whatever was replaced before."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any, ClassVar

import pytest

from stockpyle import ProcessMemoryStore, ThreadLocalStore


class Blob:
    __stockpyle_keys__: ClassVar[list[Any]] = ["key"]

    def __init__(self, key: int) -> None:
        self.key = key
        self.payload = bytearray(4096)


def _traced(fill: Callable[[], object]) -> int:
    """Bytes still allocated after ``fill()`` (its result kept alive while measuring)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = fill()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del kept
    return after - before


@pytest.mark.parametrize("kind", [ProcessMemoryStore, ThreadLocalStore])
@pytest.mark.parametrize("maxsize", [100, None], ids=["bounded", "unbounded"])
def test_twenty_thousand_re_puts_keep_only_the_live_set(kind: type[Any], maxsize: int | None) -> None:
    def live_set() -> object:
        store = kind(maxsize=maxsize, lifetime_cb=lambda obj: 3600)
        store.batch_put([Blob(i) for i in range(50)])
        return store

    def re_puts() -> object:
        store = kind(maxsize=maxsize, lifetime_cb=lambda obj: 3600)
        for n in range(20_000):
            store.put(Blob(n % 50))  # a new copy of one of 50 objects, with an hour to live
        assert len(store) == 50
        return store

    live = _traced(live_set)
    used = _traced(re_puts)
    assert live > 50 * 4096
    assert used <= 2 * live, f"{used} bytes held for a live set of {live} bytes"
