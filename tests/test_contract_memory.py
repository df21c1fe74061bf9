"""The store contract against the in-process stores and chains of them."""

from __future__ import annotations

from typing import Any, ClassVar

from stockpyle import BaseDictionaryStore, ChainedStore, ProcessMemoryStore, ThreadLocalStore
from stockpyle.testing import ConsistencyContract, StoreContract


class TestProcessMemoryStore(StoreContract):
    same_instance: ClassVar[bool] = True

    def make_store(self, **options: Any) -> Any:
        return ProcessMemoryStore(**options)


class TestBoundedProcessMemoryStore(StoreContract):
    same_instance: ClassVar[bool] = True

    def make_store(self, **options: Any) -> Any:
        return ProcessMemoryStore(maxsize=1000, **options)


class TestThreadLocalStore(StoreContract):
    same_instance: ClassVar[bool] = True

    def make_store(self, **options: Any) -> Any:
        return ThreadLocalStore(**options)


class TestDictionaryStoreTupleKeys(StoreContract):
    def make_store(self, **options: Any) -> Any:
        return BaseDictionaryStore({}, **options)


class TestDictionaryStoreTextKeys(StoreContract):
    def make_store(self, **options: Any) -> Any:
        return BaseDictionaryStore({}, string_keys=True, **options)


class TestChainOfOne(StoreContract):
    same_instance: ClassVar[bool] = True

    def make_store(self, **options: Any) -> Any:
        return ChainedStore([ProcessMemoryStore(**options)])


class TestChainOfTwo(StoreContract):
    same_instance: ClassVar[bool] = True

    def make_store(self, **options: Any) -> Any:
        return ChainedStore([ThreadLocalStore(**options), ProcessMemoryStore(**options)])


class TestChainOfThree(StoreContract):
    def make_store(self, **options: Any) -> Any:
        return ChainedStore(
            [
                ThreadLocalStore(**options),
                ProcessMemoryStore(maxsize=500, **options),
                BaseDictionaryStore({}, **options),
            ]
        )


# -- the consistency contract -------------------------------------------------


class TestProcessMemoryConsistency(ConsistencyContract):
    def make_store(self, **options: Any) -> Any:
        return ProcessMemoryStore(**options)


class TestBoundedProcessMemoryConsistency(ConsistencyContract):
    def make_store(self, **options: Any) -> Any:
        return ProcessMemoryStore(maxsize=1000, **options)


class TestThreadLocalConsistency(ConsistencyContract):
    def make_store(self, **options: Any) -> Any:
        return ThreadLocalStore(**options)


class TestDictionaryStoreConsistency(ConsistencyContract):
    def make_store(self, **options: Any) -> Any:
        return BaseDictionaryStore({}, **options)


class TestDictionaryStoreTextKeysConsistency(ConsistencyContract):
    def make_store(self, **options: Any) -> Any:
        return BaseDictionaryStore({}, string_keys=True, **options)
