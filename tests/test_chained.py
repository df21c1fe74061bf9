"""ChainedStore's exact semantics: who is asked, what is back-filled, write order, failures."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pytest

from stockpyle import ChainedStore, MultiStore, ProcessMemoryStore, ThreadLocalStore
from stockpyle.exceptions import (
    ConfigurationError,
    NotStorableError,
    SerializationError,
    StoreError,
    StoreUnavailableError,
)


class Foo:
    __stockpyle_keys__: ClassVar[list[Any]] = ["key", ("zap", "bar")]

    def __init__(self, key: Any, zap: Any = None, bar: Any = 0, payload: Any = None) -> None:
        # by default the composite key follows the primary key, so objects stay distinct
        self.key, self.zap, self.bar, self.payload = key, key if zap is None else zap, bar, payload


class Recording:
    """A real store (process memory) that records every call made to it; duck-typed, no BaseStore."""

    def __init__(self, name: str, log: list[tuple[str, str, Any]], **options: Any) -> None:
        self.name = name
        self.log = log
        self.inner = ProcessMemoryStore(**options)
        self.released = False

    def _note(self, op: str, arg: Any) -> None:
        self.log.append((self.name, op, arg))

    def put(self, obj: Any) -> None:
        self._note("put", obj.key)
        self.inner.put(obj)

    def get(self, klass: type, keydict: Any) -> Any:
        self._note("get", dict(keydict))
        return self.inner.get(klass, keydict)

    def delete(self, obj: Any) -> None:
        self._note("delete", obj.key)
        self.inner.delete(obj)

    def batch_put(self, objs: Any) -> None:
        objs = list(objs)
        self._note("batch_put", [o.key for o in objs])
        self.inner.batch_put(objs)

    def batch_get(self, klass: type, keydicts: Any) -> Any:
        keydicts = list(keydicts)
        self._note("batch_get", [dict(kd) for kd in keydicts])
        return self.inner.batch_get(klass, keydicts)

    def batch_delete(self, objs: Any) -> None:
        objs = list(objs)
        self._note("batch_delete", [o.key for o in objs])
        self.inner.batch_delete(objs)

    def release(self) -> None:
        self.released = True


class Broken(Recording):
    """A cache whose backend is down: every operation fails like an unreachable server."""

    def __init__(self, name: str, log: list[tuple[str, str, Any]], error: Exception | None = None) -> None:
        super().__init__(name, log)
        self.error = error or StoreUnavailableError("connection refused")

    def _note(self, op: str, arg: Any) -> None:
        super()._note(op, arg)
        raise self.error


@pytest.fixture
def calls() -> list[tuple[str, str, Any]]:
    return []


def layers(calls: list[Any], *names: str) -> list[Recording]:
    return [Recording(n, calls) for n in names]


def test_multistore_is_chainedstore() -> None:
    assert MultiStore is ChainedStore


def test_empty_chain_and_non_stores_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="at least one store"):
        ChainedStore([])
    with pytest.raises(ConfigurationError, match="lacks"):
        ChainedStore([ProcessMemoryStore(), object()])
    with pytest.raises(ConfigurationError, match="list of stores"):
        ChainedStore(ProcessMemoryStore())  # type: ignore[arg-type]


def test_get_asks_top_down_once_each_and_backfills_above_the_hit(calls: list[Any]) -> None:
    l1, l2, l3 = layers(calls, "L1", "L2", "L3")
    l3.inner.put(Foo("a", 1, 2))
    chain = ChainedStore([l1, l2, l3])
    found = chain.get(Foo, {"key": "a"})
    assert found is not None and found.key == "a"
    assert calls == [
        ("L1", "get", {"key": "a"}),
        ("L2", "get", {"key": "a"}),
        ("L3", "get", {"key": "a"}),
        ("L2", "put", "a"),
        ("L1", "put", "a"),
    ]
    calls.clear()
    assert chain.get(Foo, {"zap": 1, "bar": 2}) is found
    assert calls == [("L1", "get", {"zap": 1, "bar": 2})]  # lower layers untouched


def test_hit_in_middle_leaves_lower_layers_untouched(calls: list[Any]) -> None:
    l1, l2, l3 = layers(calls, "L1", "L2", "L3")
    l2.inner.put(Foo("m"))
    ChainedStore([l1, l2, l3]).get(Foo, {"key": "m"})
    assert [c[0] for c in calls] == ["L1", "L2", "L1"]


def test_backfill_uses_each_layers_own_lifetime(calls: list[Any]) -> None:
    fast = Recording("L1", calls, lifetime_cb=lambda o: 0.05)
    slow = Recording("L2", calls)
    slow.inner.put(Foo("t"))
    chain = ChainedStore([fast, slow])
    chain.get(Foo, {"key": "t"})
    import time

    time.sleep(0.1)
    assert fast.inner.get(Foo, {"key": "t"}) is None  # expired in L1 by its own lifetime
    assert slow.inner.get(Foo, {"key": "t"}) is not None


def test_batch_get_asks_each_layer_only_for_what_is_missing(calls: list[Any]) -> None:
    l1, l2, l3 = layers(calls, "L1", "L2", "L3")
    l1.inner.put(Foo("a"))
    l2.inner.put(Foo("b"))
    l3.inner.batch_put([Foo("c"), Foo("d")])
    chain = ChainedStore([l1, l2, l3])
    got = chain.batch_get(Foo, [{"key": k} for k in ("a", "b", "c", "x", "d")])
    assert [o.key if o else None for o in got] == ["a", "b", "c", None, "d"]
    assert calls == [
        ("L1", "batch_get", [{"key": k} for k in ("a", "b", "c", "x", "d")]),
        ("L2", "batch_get", [{"key": k} for k in ("b", "c", "x", "d")]),
        ("L3", "batch_get", [{"key": k} for k in ("c", "x", "d")]),
        ("L2", "batch_put", ["c", "d"]),
        ("L1", "batch_put", ["c", "d", "b"]),
    ]


def test_batch_get_stops_when_nothing_is_missing(calls: list[Any]) -> None:
    l1, l2 = layers(calls, "L1", "L2")
    l1.inner.batch_put([Foo("a"), Foo("b")])
    ChainedStore([l1, l2]).batch_get(Foo, [{"key": "a"}, {"key": "b"}])
    assert calls == [("L1", "batch_get", [{"key": "a"}, {"key": "b"}])]
    calls.clear()
    ChainedStore([l1, l2]).batch_get(Foo, [])
    assert calls == []


def test_writes_go_to_the_system_of_record_first(calls: list[Any]) -> None:
    chain = ChainedStore(layers(calls, "L1", "L2", "L3"))
    obj = Foo("w")
    chain.put(obj)
    chain.delete(obj)
    chain.batch_put([Foo("x"), Foo("y")])
    chain.batch_delete([Foo("x")])
    assert calls == [
        ("L3", "put", "w"), ("L2", "put", "w"), ("L1", "put", "w"),
        ("L3", "delete", "w"), ("L2", "delete", "w"), ("L1", "delete", "w"),
        ("L3", "batch_put", ["x", "y"]), ("L2", "batch_put", ["x", "y"]), ("L1", "batch_put", ["x", "y"]),
        ("L3", "batch_delete", ["x"]), ("L2", "batch_delete", ["x"]), ("L1", "batch_delete", ["x"]),
    ]  # fmt: skip


def test_invalid_objects_are_refused_before_any_layer_is_written(calls: list[Any]) -> None:
    chain = ChainedStore(layers(calls, "L1", "L2"))

    class Unkeyed:
        key = "u"

    with pytest.raises(NotStorableError):
        chain.put(Unkeyed())
    with pytest.raises(NotStorableError):
        chain.batch_put([Foo("ok"), Unkeyed()])
    assert calls == []


@pytest.mark.parametrize("error", [StoreUnavailableError("down"), StoreError("boom")])
def test_failing_cache_is_a_miss_and_is_counted_and_logged(
    calls: list[Any], error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    broken = Broken("L1", calls, error)
    (l2,) = layers(calls, "L2")
    l2.inner.put(Foo("a"))
    chain = ChainedStore([broken, l2], failure_threshold=100)  # breaker: see the tests below
    with caplog.at_level(logging.WARNING, logger="stockpyle.chained"):
        found = chain.get(Foo, {"key": "a"})
        assert found is not None and found.key == "a"
        assert [o.key for o in chain.batch_get(Foo, [{"key": "a"}])] == ["a"]  # type: ignore[union-attr]
        chain.put(Foo("b"))  # the write reaches the system of record despite the cache
        chain.delete(Foo("b"))
    assert l2.inner.get(Foo, {"key": "b"}) is None
    stats = chain.stats()
    assert stats[0].errors >= 4
    assert stats[1].hits == 2
    assert "cache layer 0" in caplog.text and "failed" in caplog.text


def test_errors_of_the_last_layer_propagate_and_caches_are_invalidated(calls: list[Any]) -> None:
    l1 = Recording("L1", calls)
    dead = Broken("L2", calls)
    l1.inner.put(Foo("stale", payload="old"))
    chain = ChainedStore([l1, dead])
    with pytest.raises(StoreUnavailableError):
        chain.put(Foo("stale", payload="new"))
    # the system of record may or may not have the write: the cache must not keep the old value
    assert l1.inner.get(Foo, {"key": "stale"}) is None
    with pytest.raises(StoreUnavailableError):
        chain.get(Foo, {"key": "anything"})


def test_cache_write_failure_still_invalidates_that_cache(calls: list[Any]) -> None:
    class WriteFails(Recording):
        def put(self, obj: Any) -> None:
            raise StoreUnavailableError("timeout")

    cache = WriteFails("L1", calls)
    cache.inner.put(Foo("k", payload="old"))
    sor = Recording("L2", calls)
    chain = ChainedStore([cache, sor])
    chain.put(Foo("k", payload="new"))
    assert sor.inner.get(Foo, {"key": "k"}).payload == "new"  # type: ignore[union-attr]
    assert cache.inner.get(Foo, {"key": "k"}) is None  # old value invalidated
    assert chain.get(Foo, {"key": "k"}).payload == "new"  # type: ignore[union-attr]


def test_undeclared_lookup_skips_caches_that_cannot_answer_it() -> None:
    class SearchableStore(ProcessMemoryStore):
        """A system of record that can look objects up by any attribute."""

        def get(self, klass: Any, keydict: Any) -> Any:
            for rec in list(self._table.records.values()):
                if all(getattr(rec.obj, k, object()) == v for k, v in keydict.items()):
                    return rec.obj
            return None

    sor = SearchableStore()
    sor.put(Foo("p", payload="by payload"))
    cache = ProcessMemoryStore()
    chain = ChainedStore([cache, sor])
    found = chain.get(Foo, {"payload": "by payload"})
    assert found is not None and found.key == "p"
    assert cache.get(Foo, {"key": "p"}) is found  # back-filled under its declared keys


def test_stats_count_hits_misses_backfills_and_reset() -> None:
    l1, l2 = ProcessMemoryStore(), ProcessMemoryStore()
    l2.put(Foo("s"))
    chain = ChainedStore([l1, l2])
    chain.get(Foo, {"key": "s"})
    chain.get(Foo, {"key": "s"})
    chain.get(Foo, {"key": "none"})
    first, second = chain.stats()
    assert (first.hits, first.misses, first.backfills) == (1, 2, 1)
    assert (second.hits, second.misses) == (1, 1)
    assert first.hit_ratio == pytest.approx(1 / 3)
    as_dict = first.as_dict()
    assert as_dict["hits"] == 1 and as_dict["hit_ratio"] == pytest.approx(1 / 3)
    chain.reset_stats()
    assert [(s.hits, s.misses, s.errors, s.backfills) for s in chain.stats()] == [(0, 0, 0, 0)] * 2


def test_release_releases_every_layer(calls: list[Any]) -> None:
    chain_layers = layers(calls, "L1", "L2")
    with ChainedStore(chain_layers) as chain:
        chain.put(Foo("r"))
    assert all(layer.released for layer in chain_layers)


def test_configure_reaches_every_layer() -> None:
    l1, l2 = ThreadLocalStore(), ProcessMemoryStore()
    chain = ChainedStore([l1, l2])
    chain.configure(classes=[Foo], lifetime=60)
    assert l1.lifetimes.lifetime_for(Foo("x")) == 60
    assert l2.lifetimes.lifetime_for(Foo("x")) == 60


class Flaky(Recording):
    """A cache whose backend can be taken down and brought back."""

    def __init__(self, name: str, log: list[tuple[str, str, Any]]) -> None:
        super().__init__(name, log)
        self.down = False

    def _note(self, op: str, arg: Any) -> None:
        super()._note(op, arg)
        if self.down:
            raise StoreUnavailableError("connection refused")


def test_breaker_opens_after_threshold_and_skips_the_layer(calls: list[Any], caplog: pytest.LogCaptureFixture) -> None:
    cache = Flaky("L1", calls)
    (sor,) = layers(calls, "L2")
    sor.inner.put(Foo("a"))
    chain = ChainedStore([cache, sor], failure_threshold=2, cooldown=60)
    cache.down = True
    with caplog.at_level(logging.WARNING, logger="stockpyle.chained"):
        for _ in range(5):
            assert chain.get(Foo, {"key": "a"}).key == "a"  # type: ignore[union-attr]
    calls_to_cache = [c for c in calls if c[0] == "L1"]
    # the failing get and the failing back-fill after it open the breaker; then L1 is not called
    assert [c[:2] for c in calls_to_cache] == [("L1", "get"), ("L1", "put")]
    stats = chain.stats()[0]
    assert stats.breaker_opens == 1
    assert stats.skipped >= 3
    assert "skipping it for 60.0s" in caplog.text


def test_open_breaker_remembers_writes_and_invalidates_them_on_rejoin(calls: list[Any]) -> None:
    import time

    cache = Flaky("L1", calls)
    (sor,) = layers(calls, "L2")
    chain = ChainedStore([cache, sor], failure_threshold=1, cooldown=0.05)
    stale = Foo("k", payload="old")
    cache.inner.put(stale)  # the cache holds an old value...
    cache.down = True
    chain.put(Foo("k", payload="new"))  # ...and cannot hear about the new one
    assert chain.stats()[0].breaker_opens == 1
    assert chain.stats()[0].pending_invalidations == 1
    cache.down = False  # the server comes back with its old contents (a partition, not a restart)
    assert cache.inner.get(Foo, {"key": "k"}).payload == "old"  # type: ignore[union-attr]
    time.sleep(0.06)
    found = chain.get(Foo, {"key": "k"})
    assert found is not None
    assert found.payload == "new"  # the missed write was invalidated before the layer rejoined
    assert cache.inner.get(Foo, {"key": "k"}).payload == "new"  # type: ignore[union-attr]
    stats = chain.stats()[0]
    assert stats.pending_invalidations == 0
    assert ("L1", "batch_delete", ["k"]) in calls


def test_probe_failure_keeps_the_breaker_open(calls: list[Any]) -> None:
    import time

    cache = Flaky("L1", calls)
    (sor,) = layers(calls, "L2")
    sor.inner.put(Foo("a"))
    chain = ChainedStore([cache, sor], failure_threshold=1, cooldown=0.05)
    cache.down = True
    chain.get(Foo, {"key": "a"})
    time.sleep(0.06)
    calls.clear()
    chain.get(Foo, {"key": "a"})  # half-open: one probe, which fails
    assert [c[:2] for c in calls if c[0] == "L1"] == [("L1", "get")]
    calls.clear()
    chain.get(Foo, {"key": "a"})
    assert [c for c in calls if c[0] == "L1"] == []  # open again: skipped


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"cooldown": -1}, "cooldown"),
        ({"cooldown": "5"}, "cooldown"),
        ({"max_pending_invalidations": None}, "max_pending_invalidations"),
    ],
)
def test_breaker_settings_are_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        ChainedStore([ProcessMemoryStore()], **kwargs)


def test_backfill_never_replaces_a_newer_value() -> None:
    """Reader misses and reads v1 below; a writer puts v2; the reader's back-fill must lose."""
    import threading

    class Gate(ProcessMemoryStore):
        """The system of record, pausing a reader after it has read (a deterministic interleaving)."""

        def __init__(self) -> None:
            super().__init__()
            self.read_done = threading.Event()
            self.proceed = threading.Event()

        def get(self, klass: Any, keydict: Any) -> Any:
            found = super().get(klass, keydict)
            if threading.current_thread().name == "reader":
                self.read_done.set()
                self.proceed.wait(5)
            return found

    for writer_action in ("put", "delete"):
        l1, sor = ProcessMemoryStore(), Gate()
        chain = ChainedStore([l1, sor])
        sor.put(Foo("x", payload="v1"))
        result: list[Any] = []
        reader = threading.Thread(
            target=lambda out=result, c=chain: out.append(c.get(Foo, {"key": "x"})), name="reader"
        )
        reader.start()
        assert sor.read_done.wait(5)  # the reader holds v1 and has not back-filled yet
        if writer_action == "put":
            chain.put(Foo("x", payload="v2"))
        else:
            chain.delete(sor.get(Foo, {"key": "x"}))
        sor.proceed.set()
        reader.join(5)
        assert result[0].payload == "v1"  # the reader returns what it read...
        cached = l1.get(Foo, {"key": "x"})
        if writer_action == "put":
            assert cached is not None and cached.payload == "v2"  # ...but the cache keeps the newer value
        else:
            assert cached is None  # ...and does not resurrect the deleted object


def test_object_faults_do_not_trip_the_breaker_and_writes_report_them(calls: list[Any]) -> None:
    from stockpyle.exceptions import ValueTooLargeError

    class Picky(Recording):
        """A cache that cannot hold objects whose payload says so (like an unpicklable object)."""

        def put(self, obj: Any) -> None:
            if obj.payload == "too big":
                raise ValueTooLargeError("1 MiB limit")
            super().put(obj)

        def add(self, obj: Any) -> bool:
            if obj.payload == "unpicklable":
                raise SerializationError("cannot pickle")
            self.inner.put(obj)
            return True

    cache, sor = Picky("L1", calls), Recording("L2", calls)
    chain = ChainedStore([cache, sor], failure_threshold=1)
    cache.inner.put(Foo("big", payload="old"))
    for _ in range(3):
        with pytest.raises(ValueTooLargeError, match=r"system of record stored the object.*1 MiB limit"):
            chain.put(Foo("big", payload="too big"))
    assert sor.inner.get(Foo, {"key": "big"}).payload == "too big"  # the system of record has it
    assert cache.inner.get(Foo, {"key": "big"}) is None  # and the cache does not keep the old value
    sor.inner.put(Foo("u", payload="unpicklable"))
    assert chain.get(Foo, {"key": "u"}).payload == "unpicklable"  # type: ignore[union-attr]  # back-fill skipped
    stats = chain.stats()[0]
    assert stats.breaker_opens == 0  # one bad object never takes the layer out
    assert stats.errors == 4
    chain.put(Foo("fine"))
    assert cache.inner.get(Foo, {"key": "fine"}) is not None


def test_versioned_tombstone_refuses_a_late_put_of_the_deleted_version() -> None:
    class Doc:
        __stockpyle_keys__: ClassVar[list[Any]] = ["key"]
        __stockpyle_version__ = "version"

        def __init__(self, key: str, version: int) -> None:
            self.key, self.version = key, version

    store = ProcessMemoryStore()
    store.put(Doc("d", 3))
    store.delete(Doc("d", 3))
    store.put(Doc("d", 3))  # a writer that read version 3 before the delete, arriving late
    assert store.get(Doc, {"key": "d"}) is None
    store.put(Doc("d", 4))  # a genuinely newer version is accepted
    assert store.get(Doc, {"key": "d"}).version == 4  # type: ignore[union-attr]
    store.put(Doc("d", 2))  # an older one never replaces it
    assert store.get(Doc, {"key": "d"}).version == 4  # type: ignore[union-attr]


def test_versions_are_only_compared_within_one_object() -> None:
    """A user may take an email address another (deleted or changed) user had at a higher version."""

    class User:
        __stockpyle_keys__: ClassVar[list[Any]] = ["id", "email"]
        __stockpyle_version__ = "version"

        def __init__(self, ident: int, email: str, version: int) -> None:
            self.id, self.email, self.version = ident, email, version

    store = ProcessMemoryStore()
    store.put(User(1, "a@x", 5))
    store.put(User(2, "b@x", 1))
    store.delete(User(1, "a@x", 5))
    store.put(User(2, "a@x", 2))  # user 2 takes the deleted user's address, at its own version 2
    found = store.get(User, {"id": 2})
    assert (found.email, found.version) == ("a@x", 2)  # type: ignore[union-attr]
    assert store.get(User, {"email": "b@x"}) is None
    assert store.get(User, {"email": "a@x"}).id == 2  # type: ignore[union-attr]
    store.put(User(3, "c@x", 9))
    store.put(User(4, "c@x", 1))  # a live entry of another object with a higher version does not block it
    assert store.get(User, {"email": "c@x"}).id == 4  # type: ignore[union-attr]


def test_fast_path_miss_goes_straight_to_the_layers_below(calls: list[Any]) -> None:
    top = ProcessMemoryStore()
    (below,) = layers(calls, "L2")
    below.inner.put(Foo("k"))
    chain = ChainedStore([top, below])
    assert chain.get(Foo, {"key": "k"}).key == "k"  # type: ignore[union-attr]
    assert calls == [("L2", "get", {"key": "k"})]
    assert top.get(Foo, {"key": "k"}) is not None  # back-filled
    stats = chain.stats()
    assert (stats[0].misses, stats[1].hits) == (1, 1)
    from stockpyle.exceptions import UnknownKeyError

    with pytest.raises(UnknownKeyError, match="no key 'nonexistent'"):
        ChainedStore([ProcessMemoryStore(), ProcessMemoryStore()]).get(Foo, {"nonexistent": 1})
    with pytest.raises(UnknownKeyError):
        ChainedStore([ProcessMemoryStore()]).get(Foo, {"nonexistent": "x"})


def test_a_subclass_overriding_get_is_always_called() -> None:
    class Audited(ProcessMemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.reads = 0

        def get(self, klass: Any, keydict: Any) -> Any:
            self.reads += 1
            return super().get(klass, keydict)

    top, bottom = Audited(), ProcessMemoryStore()
    bottom.put(Foo("a"))
    chain = ChainedStore([top, bottom])
    chain.get(Foo, {"key": "a"})  # a miss in the top layer, then back-filled
    chain.get(Foo, {"key": "a"})  # a hit
    assert top.reads == 2  # the chain never reads around an overridden get()


def test_a_write_through_the_chain_reaches_other_threads_thread_local_copies() -> None:
    """A ThreadLocalStore layer used to keep serving a thread its old copy after another thread's write."""
    import threading

    sor = ProcessMemoryStore()
    chain = ChainedStore([ThreadLocalStore(), sor], bus=None)
    chain.put(Foo("k", payload="v1"))
    seen: list[Any] = []
    read = threading.Event()
    written = threading.Event()

    def reader() -> None:
        seen.append(chain.get(Foo, {"key": "k"}).payload)  # type: ignore[union-attr]  # now in its own table
        read.set()
        written.wait(5)
        seen.append(chain.get(Foo, {"key": "k"}).payload)  # type: ignore[union-attr]

    thread = threading.Thread(target=reader)
    thread.start()
    read.wait(5)
    chain.put(Foo("k", payload="v2"))  # from this thread
    written.set()
    thread.join(5)
    assert seen == ["v1", "v2"]
