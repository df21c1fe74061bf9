"""CachedMapping and mapping_view against real Redis and memcached servers."""

from __future__ import annotations

import contextlib
import logging
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from stockpyle.collections import CachedMapping, mapping_view
from stockpyle.exceptions import ConfigurationError, SerializationError, StoreUnavailableError
from stockpyle.serializers import HMACSigner, JSONSerializer

# -- a test collection whose source of truth is a dict the test controls ------


class Source:
    """The "database": what load() returns, and how often it was called."""

    def __init__(self, data: dict[Any, Any] | None = None) -> None:
        self.data: dict[Any, Any] = dict(data or {})
        self.loads = 0


class Items(CachedMapping[Any, Any]):
    def __init__(self, backend: Any, name: str, version: str | int, source: Source, **options: Any) -> None:
        self.source = source
        self.view_calls: list[int] = []
        super().__init__(backend, name, version, **options)

    def load(self) -> dict[Any, Any]:
        self.source.loads += 1
        return dict(self.source.data)

    @mapping_view
    def by_value(self) -> dict[Any, list[Any]]:
        self.view_calls.append(len(self))
        out: dict[Any, list[Any]] = {}
        for key, value in sorted(self.items()):
            out.setdefault(value, []).append(key)
        return out

    @mapping_view
    def total(self) -> int:
        return sum(v for v in self.values() if isinstance(v, int))


@dataclass
class Backend:
    """One backend under test: how to build clients for it, and unique names."""

    kind: str
    url: str
    prefix: str
    make_client: Callable[[], Any]
    mappings: list[CachedMapping[Any, Any]] = field(default_factory=list)

    def name(self, suffix: str = "items") -> str:
        return f"{self.prefix}-{suffix}"

    def mapping(self, source: Source, name: str | None = None, version: str | int = "v1", **options: Any) -> Items:
        options.setdefault("check_interval", 60)
        mapping = Items(self.make_client(), name or self.name(), version, source, **options)
        self.mappings.append(mapping)
        return mapping


def _redis_backend(request: pytest.FixtureRequest) -> Backend:
    client = request.getfixturevalue("redis_client")
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    return Backend("redis", url, prefix, lambda: client)


def _memcache_backend(request: pytest.FixtureRequest) -> Backend:
    server = request.getfixturevalue("memcached_server")
    prefix = request.getfixturevalue("redis_prefix")  # just a unique string
    from pymemcache.client.base import PooledClient

    clients: list[Any] = []

    def make() -> Any:
        client = PooledClient(server.address, default_noreply=False, connect_timeout=2, timeout=5)
        clients.append(client)
        return client

    request.addfinalizer(lambda: [c.close() for c in clients])
    return Backend("memcache", f"memcache://{server.address}", prefix, make)


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("memcache", marks=pytest.mark.memcache),
    ]
)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    made = _redis_backend(request) if request.param == "redis" else _memcache_backend(request)
    yield made
    for mapping in made.mappings:
        with contextlib.suppress(StoreUnavailableError):
            mapping.purge()


# -- the Mapping interface ------------------------------------------------------


def test_reads_like_a_read_only_mapping(backend: Backend) -> None:
    source = Source({1: "one", 2: "two", "k": (1, 2)})
    mapping = backend.mapping(source)
    assert mapping.push() == 1
    assert mapping[1] == "one"
    assert mapping.get(2) == "two"
    assert mapping.get(3) is None
    assert mapping.get(3, "dflt") == "dflt"
    assert 1 in mapping
    assert 3 not in mapping
    assert len(mapping) == 3
    assert sorted(map(str, mapping)) == ["1", "2", "k"]
    assert set(mapping.keys()) == {1, 2, "k"}
    assert sorted(map(str, mapping.values())) == ["(1, 2)", "one", "two"]
    assert dict(mapping.items()) == {1: "one", 2: "two", "k": (1, 2)}
    assert mapping == {1: "one", 2: "two", "k": (1, 2)}
    with pytest.raises(KeyError):
        mapping[3]
    with pytest.raises(TypeError):
        mapping[4] = "four"  # type: ignore[index]
    assert mapping.revision == 1
    assert "revision 1, 3 items" in repr(mapping)


def test_load_must_return_a_mapping(backend: Backend) -> None:
    class Bad(CachedMapping[Any, Any]):
        def load(self) -> Any:
            return [1, 2]

    bad = Bad(backend.make_client(), backend.name("bad"), "v1")
    with pytest.raises(TypeError, match=r"load\(\) must return a mapping; got list"):
        bad.push()


# -- push and revisions ---------------------------------------------------------


def test_push_increments_the_revision_and_other_instances_swap(backend: Backend) -> None:
    source = Source({"a": 1})
    writer = backend.mapping(source)
    reader_source = Source({"never": "loaded"})
    reader = backend.mapping(reader_source, check_interval=0.2)
    assert writer.push() == 1
    assert dict(reader) == {"a": 1}
    assert reader_source.loads == 0  # a published snapshot is read, not loaded
    source.data = {"a": 2, "b": 3}
    assert writer.push() == 2
    assert writer.revision == 2
    assert dict(writer) == {"a": 2, "b": 3}  # the pushing process serves it at once
    assert reader["a"] == 1  # within check_interval: still the old copy, no backend call
    time.sleep(0.25)
    assert reader["a"] == 2
    assert reader.revision == 2
    assert reader_source.loads == 0
    assert reader.stats().swaps == 2
    assert source.loads == 2


def test_reads_between_checks_do_not_touch_the_backend(backend: Backend) -> None:
    source = Source({"a": 1})
    writer = backend.mapping(source)
    writer.push()
    reader = backend.mapping(Source(), check_interval=60)
    for _ in range(1000):
        assert reader["a"] == 1
    assert reader.stats().checks == 1
    source.data = {"a": 2}
    writer.push()
    assert reader["a"] == 1
    assert reader.refresh() is True
    assert reader["a"] == 2
    assert reader.refresh() is False
    assert reader.stats().checks == 3


def test_check_interval_zero_checks_every_access(backend: Backend) -> None:
    source = Source({"a": 1})
    writer = backend.mapping(source)
    writer.push()
    reader = backend.mapping(Source(), check_interval=0)
    assert reader["a"] == 1
    source.data = {"a": 5}
    writer.push()
    assert reader["a"] == 5


def test_concurrent_pushes_get_consecutive_revisions(backend: Backend) -> None:
    source = Source({"a": 0})
    pushers = [backend.mapping(source) for _ in range(4)]
    revisions: list[int] = []
    lock = threading.Lock()

    def push_some(mapping: Items) -> None:
        for _ in range(5):
            revision = mapping.push()
            with lock:
                revisions.append(revision)

    threads = [threading.Thread(target=push_some, args=(m,)) for m in pushers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(revisions) == list(range(1, 21))
    reader = backend.mapping(Source())
    assert reader["a"] == 0
    assert reader.revision == 20


def test_old_snapshot_stays_readable_for_the_grace_period(backend: Backend) -> None:
    source = Source({"a": 1})
    writer = backend.mapping(source, grace=30)
    writer.push()
    old = writer._current.pointer  # type: ignore[union-attr]
    source.data = {"a": 2}
    writer.push()
    old_blob = writer._backend.read_snapshot(writer._ns, old)  # type: ignore[arg-type]
    assert old_blob is not None  # a reader that read the old pointer still finds its data
    if backend.kind == "redis":
        client = writer._backend.driver.client  # type: ignore[attr-defined]
        ttl = client.ttl(writer._ns.chunk(old.nonce, 0))  # type: ignore[union-attr]
        assert 0 < ttl <= 30
        assert client.ttl(writer._ns.pointer) == -1  # the current data never expires


def test_grace_zero_deletes_the_replaced_snapshot(backend: Backend) -> None:
    source = Source({"a": 1})
    writer = backend.mapping(source, grace=0)
    writer.push()
    old = writer._current.pointer  # type: ignore[union-attr]
    writer.push()
    assert writer._backend.read_snapshot(writer._ns, old) is None  # type: ignore[arg-type]


# -- first access ------------------------------------------------------------------


def test_first_access_without_a_push_loads_and_publishes(backend: Backend) -> None:
    first_source = Source({"x": 1})
    first = backend.mapping(first_source)
    assert first["x"] == 1
    assert first_source.loads == 1
    assert first.revision == 1
    later_source = Source({"x": "not this"})
    later = backend.mapping(later_source)
    assert later["x"] == 1
    assert later_source.loads == 0


def test_publish_missing_false_loads_locally_only(backend: Backend) -> None:
    source = Source({"x": 1})
    local = backend.mapping(source, publish_missing=False)
    assert local["x"] == 1
    assert local.revision is None
    other_source = Source({"x": 2})
    other = backend.mapping(other_source, publish_missing=False)
    assert other["x"] == 2  # nothing was published: each process loaded its own
    assert other_source.loads == 1


def test_a_process_that_lost_the_first_publish_adopts_the_winner(backend: Backend) -> None:
    winner = backend.mapping(Source({"x": "winner"}))
    assert winner["x"] == "winner"
    loser_source = Source({"x": "loser"})
    loser = backend.mapping(loser_source)
    # simulate the race: the loser loaded before seeing the winner's pointer
    state, recheck = loser._load_local(publish=True)
    assert state.data == {"x": "loser"}
    assert recheck is True
    assert winner.revision == 1
    assert loser["x"] == "winner"


# -- views ---------------------------------------------------------------------------


def test_views_are_computed_once_per_revision(backend: Backend) -> None:
    source = Source({1: "a", 2: "b", 3: "a"})
    writer = backend.mapping(source)
    writer.push()
    reader = backend.mapping(Source(), check_interval=0)
    assert reader.by_value == {"a": [1, 3], "b": [2]}
    assert reader.by_value is reader.by_value
    assert reader.view_calls == [3]
    source.data = {1: "a", 2: "a"}
    writer.push()
    assert reader.by_value == {"a": [1, 2]}
    assert reader.by_value == {"a": [1, 2]}
    assert reader.view_calls == [3, 2]
    assert reader.stats().views == 2
    assert Items.by_value.name == "by_value"  # on the class: the descriptor itself


def test_views_are_computed_once_across_threads(backend: Backend) -> None:
    source = Source({i: i % 7 for i in range(2000)})
    writer = backend.mapping(source)
    writer.push()
    reader = backend.mapping(Source())
    results: list[Any] = []
    barrier = threading.Barrier(8)

    def read() -> None:
        barrier.wait()
        results.append(reader.by_value)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert reader.view_calls == [2000]
    assert all(result is results[0] for result in results)


def test_a_view_sees_only_the_revision_it_is_computed_for(backend: Backend) -> None:
    source = Source({"a": 1, "b": 2})
    pusher = backend.mapping(source)
    pusher.push()

    class Racing(Items):
        @mapping_view
        def snapshot_pair(self) -> tuple[int, int]:
            before = sum(self.values())
            # another process pushes while this view is being computed
            source.data = {"a": 100, "b": 200}
            pusher.push()
            time.sleep(0.01)
            return before, sum(self.values())

    reader = Racing(backend.make_client(), backend.name(), "v1", Source(), check_interval=0)
    backend.mappings.append(reader)
    assert reader.snapshot_pair == (3, 3)  # both reads from revision 1
    assert reader.total == 300  # the next access swapped to revision 2
    assert reader.revision == 2


def test_view_is_read_only_and_needs_a_cached_mapping(backend: Backend) -> None:
    mapping = backend.mapping(Source({"a": 1}))
    with pytest.raises(AttributeError, match="read-only"):
        mapping.by_value = {}  # type: ignore[misc]

    class NotAMapping:
        view = mapping_view(lambda self: 1)

    with pytest.raises(TypeError, match="CachedMapping subclasses only"):
        NotAMapping().view


def test_snapshot_is_pinned(backend: Backend) -> None:
    source = Source({"a": 1})
    writer = backend.mapping(source)
    writer.push()
    reader = backend.mapping(Source(), check_interval=0)
    pinned = reader.snapshot()
    source.data = {"a": 2}
    writer.push()
    assert pinned["a"] == 1
    assert pinned.total == 1
    assert reader["a"] == 2
    assert pinned["a"] == 1


# -- versions and purge -----------------------------------------------------------


def test_versions_are_isolated_and_purge_removes_one(backend: Backend) -> None:
    v1 = backend.mapping(Source({"release": 1}), version="v1")
    v2 = backend.mapping(Source({"release": 2}), version=2)
    v1.push()
    v2.push()
    v1.push()
    assert backend.mapping(Source(), version="v1")["release"] == 1
    assert backend.mapping(Source(), version=2)["release"] == 2
    assert backend.mapping(Source(), version="2")["release"] == 2  # str(version) names the namespace

    deleted = v1.purge()
    assert deleted >= 2  # the pointer and at least the current snapshot
    if backend.kind == "redis":
        client = backend.make_client()
        assert list(client.scan_iter(match=f"{v1._ns.prefix}*")) == []
        assert list(client.scan_iter(match=f"{v2._ns.prefix}*")) != []
    fresh_v1_source = Source({"release": "reloaded"})
    fresh_v1 = backend.mapping(fresh_v1_source, version="v1", publish_missing=False)
    assert fresh_v1["release"] == "reloaded"
    assert fresh_v1_source.loads == 1
    fresh_v2_source = Source({"release": "not loaded"})
    assert backend.mapping(fresh_v2_source, version=2)["release"] == 2
    assert fresh_v2_source.loads == 0
    # a process still holding the purged version keeps serving its copy
    assert v1.refresh() is False
    assert v1["release"] == 1


def test_names_are_isolated(backend: Backend) -> None:
    a = backend.mapping(Source({"n": "a"}), name=backend.name("x:y"), version="z")
    b = backend.mapping(Source({"n": "b"}), name=backend.name("x"), version="y:z")
    a.push()
    b.push()
    assert backend.mapping(Source(), name=backend.name("x:y"), version="z")["n"] == "a"
    assert backend.mapping(Source(), name=backend.name("x"), version="y:z")["n"] == "b"


# -- serialization and signing --------------------------------------------------------


class _Boom:
    """Unpickling this runs code: it must never happen for a refused snapshot."""

    ran = False

    def __reduce__(self) -> Any:
        return (_Boom._trigger, ())

    @staticmethod
    def _trigger() -> None:
        _Boom.ran = True


def _overwrite_snapshot(mapping: Items, blob: bytes) -> None:
    pointer = mapping._backend.read_pointer(mapping._ns)
    assert pointer is not None
    driver = mapping._backend.driver
    driver.set_many({mapping._ns.chunk(pointer.nonce, 0): blob}, driver.ttl(None))
    driver.delete_many([mapping._ns.chunk(pointer.nonce, index) for index in range(1, pointer.chunks)])


def test_signed_snapshots_refuse_forgeries(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    source = Source({"a": 1})
    writer = backend.mapping(source, secret=b"s" * 32)
    writer.push()
    reader = backend.mapping(Source({"a": "local"}), secret=b"s" * 32, check_interval=0)
    assert reader["a"] == 1
    source.data = {"a": 2}
    writer.push()
    _overwrite_snapshot(writer, pickle.dumps({"format": 1, "nonce": "x", "data": _Boom()}))
    with caplog.at_level(logging.ERROR, logger="stockpyle.collections"):
        assert reader["a"] == 1  # keeps its copy
    assert _Boom.ran is False
    assert reader.stats().corrupt == 1
    assert "refused a published snapshot" in caplog.text
    # a process without a copy falls back to load()
    newcomer_source = Source({"a": "from load"})
    newcomer = backend.mapping(newcomer_source, secret=b"s" * 32)
    assert newcomer["a"] == "from load"
    assert newcomer_source.loads == 1


def test_signed_reader_refuses_unsigned_snapshots(backend: Backend) -> None:
    backend.mapping(Source({"a": 1})).push()
    reader_source = Source({"a": "local"})
    reader = backend.mapping(reader_source, signer=HMACSigner({1: b"k" * 32}))
    assert reader["a"] == "local"
    assert reader.stats().corrupt == 1


def test_unsigned_reader_refuses_garbage(backend: Backend) -> None:
    source = Source({"a": 1})
    writer = backend.mapping(source)
    writer.push()
    _overwrite_snapshot(writer, b"not an envelope")
    reader_source = Source({"a": "local"})
    reader = backend.mapping(reader_source)
    assert reader["a"] == "local"
    assert reader.stats().corrupt == 1


def test_a_snapshot_copied_under_another_pointer_is_refused(backend: Backend) -> None:
    source = Source({"a": 1})
    writer = backend.mapping(source)
    writer.push()
    old = writer._backend.read_snapshot(writer._ns, writer._current.pointer)  # type: ignore[arg-type,union-attr]
    source.data = {"a": 2}
    writer.push()
    assert old is not None
    _overwrite_snapshot(writer, old)  # revision 1's data under revision 2's name
    reader = backend.mapping(Source({"a": "local"}))
    assert reader["a"] == "local"
    assert reader.stats().corrupt == 1


def test_json_serializer_keeps_key_and_value_types(backend: Backend) -> None:
    source = Source({1: ("a", 2), "1": [3], (2, 3): {"x": None}})
    writer = backend.mapping(source, serializer=JSONSerializer())
    writer.push()
    reader = backend.mapping(Source(), serializer=JSONSerializer())
    assert dict(reader) == {1: ("a", 2), "1": [3], (2, 3): {"x": None}}


def test_unserializable_data_fails_the_push(backend: Backend) -> None:
    writer = backend.mapping(Source({"a": object()}), serializer=JSONSerializer())
    with pytest.raises(SerializationError):
        writer.push()


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        (("", "v1"), {}, "name must be a non-empty string"),
        (("n", ""), {}, "version must be a non-empty string"),
        (("n", None), {}, "version must be a non-empty string"),
        (("n", "v"), {"check_interval": -1}, "check_interval must be a number"),
        (("n", "v"), {"grace": "x"}, "grace must be a number"),
        (("n", "v"), {"secret": b"k" * 16, "signer": HMACSigner(b"k" * 16)}, "either secret= or signer="),
    ],
)
def test_bad_arguments(args: tuple[Any, ...], options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Items("redis://127.0.0.1:1/0", *args, source=Source(), **options)


def test_unknown_backend() -> None:
    with pytest.raises(ConfigurationError, match=r"backend must be a redis\.Redis or RedisCluster client"):
        Items(object(), "n", "v", Source())
    with pytest.raises(ConfigurationError, match="unsupported CachedMapping URL"):
        Items("http://example.invalid/", "n", "v", Source())
    with pytest.raises(ConfigurationError, match="bad memcached address"):
        Items("memcache://127.0.0.1:notaport", "n", "v", Source())


def test_load_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        CachedMapping("redis://127.0.0.1:1/0", "n", "v")  # type: ignore[abstract]


def test_threads_read_whole_revisions_while_pushes_happen(backend: Backend) -> None:
    source = Source({"a": 0, "b": 0})
    writer = backend.mapping(source)
    writer.push()
    reader = backend.mapping(Source(), check_interval=0)
    stop = threading.Event()
    torn: list[tuple[int, int, int]] = []

    def read() -> None:
        while not stop.is_set():
            pinned = reader.snapshot()
            a, b, total = pinned["a"], pinned["b"], pinned.total
            if a != b or total != a + b:
                torn.append((a, b, total))

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for i in range(1, 16):
            source.data = {"a": i, "b": i}
            writer.push()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert torn == []
    assert reader["a"] == 15
    stats = reader.stats()
    assert (stats.errors, stats.corrupt, stats.missing) == (0, 0, 0)
