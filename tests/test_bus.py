"""The behaviour every invalidation bus shares, against the real servers.

Each test runs on the three buses: a Redis stream (shared Redis, a private
stream), PostgreSQL NOTIFY (shared server, a private channel) and the
memcached epoch ring (the session's memcached, a private namespace).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support.buses import RecordingListener, bus_threads, digests_for, wait_trusted

from stockpyle.bus import BusStats, InvalidationBus, class_digest, key_digest
from stockpyle.exceptions import ConfigurationError, StoreUnavailableError
from stockpyle.keys import lookup_key

KINDS = [
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("memcache", marks=pytest.mark.memcache),
]


class BusFactory:
    """Makes buses of one kind that share one channel; releases them all afterwards."""

    def __init__(self, kind: str, cls_name: str, kwargs: dict[str, Any]) -> None:
        self.kind = kind
        self.cls_name = cls_name
        self.kwargs = kwargs
        self.made: list[Any] = []

    def __call__(self, **overrides: Any) -> Any:
        import stockpyle.bus

        bus = getattr(stockpyle.bus, self.cls_name)(**{**self.kwargs, **overrides})
        self.made.append(bus)
        return bus

    def spec(self) -> str:
        """The bus as JSON, for a subprocess."""
        return json.dumps({"cls": self.cls_name, "kwargs": self.kwargs})

    def close(self) -> None:
        for bus in self.made:
            bus.release()


@pytest.fixture(params=KINDS)
def make_bus(request: pytest.FixtureRequest) -> Iterator[BusFactory]:
    kind = request.param
    tag = "t" + uuid.uuid4().hex[:12]
    if kind == "redis":
        request.getfixturevalue("redis_client")  # skips without Redis; deletes the stream afterwards
        prefix = request.getfixturevalue("redis_prefix")
        factory = BusFactory(kind, "RedisStreamBus", {"url": request.getfixturevalue("redis_url"),
                                                      "stream": f"{prefix}:bus"})  # fmt: skip
    elif kind == "postgres":
        url = request.getfixturevalue("postgres_url")
        factory = BusFactory(kind, "PostgresNotifyBus", {"url": url, "channel": f"stockpyle_{tag}"})
    else:
        server = request.getfixturevalue("memcached_server")
        factory = BusFactory(kind, "MemcacheEpochBus", {"servers": server.address, "namespace": tag})
    try:
        yield factory
    finally:
        factory.close()


def prime(bus: Any) -> None:
    """Publish once, so that a memcached ring has its counter (its first appearance is a gap)."""
    bus.publish([key_digest(lookup_key(_Thing, {"id": -1}))])


class _Thing:
    __stockpyle_keys__ = ("id",)


def listening_pair(make_bus: BusFactory) -> tuple[Any, Any, RecordingListener, RecordingListener]:
    a, b = make_bus(), make_bus()
    prime(a)
    la, lb = RecordingListener(), RecordingListener()
    a.subscribe(la)
    b.subscribe(lb)
    assert wait_trusted(a) and wait_trusted(b)
    return a, b, la, lb


# -- delivery -----------------------------------------------------------------


def test_a_message_reaches_every_subscribed_bus_own_included(make_bus: BusFactory) -> None:
    a, b, la, lb = listening_pair(make_bus)
    digests = [key_digest(lookup_key(_Thing, {"id": n})) for n in range(3)]
    a.publish(digests, origin="writer-1")
    assert lb.wait_digests(digests) and la.wait_digests(digests)
    assert "writer-1" in lb.origins
    # without an origin, listeners are told the sender id of the publishing bus
    other = digests_for("no-origin", 1)
    b.publish(other)
    assert la.wait_digests(other) and lb.wait_digests(other)
    assert la.invalidations[-1][1] == b.sender != a.sender
    assert isinstance(a, InvalidationBus)


def test_large_publications_are_split_and_all_delivered(make_bus: BusFactory) -> None:
    a, _b, _la, lb = listening_pair(make_bus)
    digests = digests_for("large", 5000)
    a.publish(digests)
    assert lb.wait_digests(digests, timeout=10)
    assert lb.digests.count(digests[0]) == 1


def test_class_digests_travel_like_key_digests(make_bus: BusFactory) -> None:
    a, _b, _la, lb = listening_pair(make_bus)
    a.publish([class_digest(_Thing)])
    assert lb.wait_digests([class_digest(_Thing)])


def test_stats_count_what_the_bus_did(make_bus: BusFactory) -> None:
    a, b, _la, lb = listening_pair(make_bus)
    before = b.stats()
    assert before.flushes == 1  # the first connection flushes what was cached before listening
    assert before.gaps == 0
    for n in range(5):
        a.publish(digests_for(f"stats{n}", 2))
    assert lb.wait_digests(digests_for("stats4", 2))
    time.sleep(0.3)
    stats_a, stats_b = a.stats(), b.stats()
    assert stats_a.published == 6 and stats_a.publish_errors == 0
    assert stats_b.published == 0
    assert stats_b.messages - before.messages == 5
    assert stats_b.heartbeats > before.heartbeats
    lag = stats_b.lag.summary()
    assert lag.samples >= 5 and 0 <= lag.median < 1.0
    assert 0.8 < stats_b.trusted_share <= 1.0
    assert stats_b.trusted_seconds <= stats_b.observed_seconds
    assert isinstance(stats_b, BusStats) and stats_b.as_dict()["messages"] == stats_b.messages


# -- trust --------------------------------------------------------------------


def test_trust_advances_with_heartbeats_while_nothing_is_published(make_bus: BusFactory) -> None:
    bus = make_bus()
    listener = RecordingListener()
    bus.subscribe(listener)
    assert wait_trusted(bus)
    samples = []
    for _ in range(10):
        time.sleep(bus.max_staleness / 2)
        samples.append(bus.trusted_until)
        assert bus.trusted_until > time.monotonic()
    assert samples == sorted(samples) and samples[-1] > samples[0]
    assert bus.stats().heartbeats >= 5
    assert listener.invalidations == []


def test_trust_is_zero_before_listening_and_after_release(make_bus: BusFactory) -> None:
    bus = make_bus()
    assert bus.trusted_until == 0.0
    bus.subscribe(RecordingListener())
    assert wait_trusted(bus)
    bus.release()
    assert bus.trusted_until == 0.0
    time.sleep(bus.max_staleness)
    assert bus.trusted_until == 0.0


# -- threads, release, fork ----------------------------------------------------


def test_release_stops_the_thread_and_subscribe_starts_it_again(make_bus: BusFactory) -> None:
    before = set(bus_threads())
    bus = make_bus()
    listener = RecordingListener()
    assert not bus.listening
    bus.subscribe(listener)
    bus.subscribe(listener)  # twice: one thread, one delivery
    assert wait_trusted(bus)
    mine = set(bus_threads()) - before
    assert len(mine) == 1
    bus.release()
    assert set(bus_threads()) - before == set()
    assert not any(t in threading.enumerate() for t in mine)
    # never terminal: publishing reconnects, subscribing listens again
    bus.subscribe(listener)
    assert wait_trusted(bus)
    digests = digests_for("again", 1)
    bus.publish(digests)
    assert listener.wait_digests(digests)
    assert listener.digests.count(digests[0]) == 1
    bus.release()
    assert set(bus_threads()) - before == set()


def test_the_thread_stops_with_the_last_listener(make_bus: BusFactory) -> None:
    before = set(bus_threads())
    bus = make_bus()
    first, second = RecordingListener(), RecordingListener()
    bus.subscribe(first)
    bus.subscribe(second)
    assert wait_trusted(bus)
    bus.unsubscribe(first)
    assert bus.listening
    bus.unsubscribe(second)
    assert not bus.listening and bus.trusted_until == 0.0
    assert set(bus_threads()) - before == set()


def test_a_listener_that_is_garbage_collected_stops_receiving(make_bus: BusFactory) -> None:
    a, _b, _la, lb = listening_pair(make_bus)
    import gc
    import weakref

    extra = RecordingListener()
    a.subscribe(extra)
    ref = weakref.ref(extra)
    del extra
    gc.collect()
    assert ref() is None
    digests = digests_for("gc", 1)
    a.publish(digests)
    assert lb.wait_digests(digests)


FORK_CHILD_TIMEOUT = 10.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_listens_with_a_thread_of_its_own(make_bus: BusFactory) -> None:
    parent_bus = make_bus()
    prime(parent_bus)
    listener = RecordingListener()
    parent_bus.subscribe(listener)
    assert wait_trusted(parent_bus)
    parent_thread = parent_bus._thread
    parent_sender = parent_bus.sender
    child_digests = digests_for("to-the-child", 2)
    read_fd, write_fd = os.pipe()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it sees through the pipe, then leave at once
        code = 1
        try:
            os.close(read_fd)
            os.close(go_write)
            report: dict[str, Any] = {}
            report["trusted"] = wait_trusted(parent_bus, FORK_CHILD_TIMEOUT)
            threads = bus_threads()
            report["threads"] = len(threads)
            report["new_thread"] = bool(threads) and threads[0] is not parent_thread
            report["sender_changed"] = parent_bus.sender != parent_sender
            report["flushes"] = parent_bus.stats().flushes
            os.write(write_fd, b"ready\n")
            os.read(go_read, 1)  # the parent publishes, then lets us go on
            report["received"] = listener.wait_digests(child_digests, FORK_CHILD_TIMEOUT)
            os.write(write_fd, (json.dumps(report) + "\n").encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    os.close(go_read)
    try:
        with os.fdopen(read_fd) as reader:
            assert reader.readline().strip() == "ready"
            parent_bus.publish(child_digests)
            os.write(go_write, b"x")
            report = json.loads(reader.readline())
    finally:
        os.close(go_write)
        _pid, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == {"trusted": True, "threads": 1, "new_thread": True, "sender_changed": True, "flushes": 1,
                      "received": True}  # fmt: skip
    # the parent still listens too
    assert listener.wait_digests(child_digests)
    assert parent_bus.listening and parent_bus._thread is parent_thread


LISTENER_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    import stockpyle.bus
    spec = json.loads(sys.argv[1])
    bus = getattr(stockpyle.bus, spec["cls"])(**spec["kwargs"])
    class Printer:
        def invalidate(self, digests, origin=None):
            for digest in digests:
                print("I", digest, origin, flush=True)
        def flush(self):
            print("F", flush=True)
    printer = Printer()
    bus.subscribe(printer)
    while bus.trusted_until <= time.monotonic():
        time.sleep(0.01)
    print("READY", bus.sender, flush=True)
    sys.stdin.readline()  # until the test closes our stdin
    bus.release()
    print("DONE", flush=True)
    """
)


@pytest.mark.slow
def test_invalidations_reach_other_processes(make_bus: BusFactory) -> None:
    publisher = make_bus()
    prime(publisher)
    children = [
        subprocess.Popen(
            [sys.executable, "-c", LISTENER_SCRIPT, make_bus.spec()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.path.dirname(__file__),
        )
        for _ in range(2)
    ]
    try:
        senders = []
        for child in children:
            assert child.stdout is not None
            line = child.stdout.readline().split()
            while line[:1] == ["F"]:  # the first connection flushes
                line = child.stdout.readline().split()
            assert line[:1] == ["READY"], line
            senders.append(line[1])
        assert len(set(senders)) == 2
        digests = digests_for("processes", 50)
        for digest in digests:
            publisher.publish([digest], origin="the-parent")
        outputs = []
        for child in children:
            assert child.stdin is not None and child.stdout is not None
            lines = []
            while sum(1 for line in lines if line.endswith(" the-parent")) < len(digests):
                line = child.stdout.readline()
                assert line, "the child stopped before receiving every message"
                lines.append(line.rstrip("\n"))
            child.stdin.close()  # the child releases its bus and exits
            outputs.append("\n".join(lines) + "\n" + child.stdout.read())
            child.wait(20)
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            for stream in (child.stdin, child.stdout):
                if stream is not None:
                    stream.close()
    for output in outputs:
        received = [line.split() for line in output.splitlines() if line.startswith("I ")]
        assert [digest for _tag, digest, _origin in received if _origin == "the-parent"] == digests
        assert output.rstrip().endswith("DONE")


# -- bad input and outages -----------------------------------------------------


def test_publish_refuses_what_is_not_a_digest(make_bus: BusFactory) -> None:
    bus = make_bus()
    with pytest.raises(TypeError, match="not a single string"):
        bus.publish(key_digest(lookup_key(_Thing, {"id": 1})))
    with pytest.raises(ValueError, match="not a key digest"):
        bus.publish(["Thing:1"])
    with pytest.raises(TypeError):
        bus.publish([b"0" * 32])
    with pytest.raises(ValueError, match="origin"):
        bus.publish(digests_for("x", 1), origin="o" * 201)
    with pytest.raises(TypeError):
        bus.subscribe(object())  # type: ignore[arg-type]
    bus.publish([])  # nothing to say: nothing sent
    assert bus.stats().published == 0


def test_bad_arguments_are_configuration_errors(make_bus: BusFactory) -> None:
    for bad in (0, -1, float("nan"), float("inf"), "0.1", True):
        option = "interval" if make_bus.kind == "memcache" else "max_staleness"
        with pytest.raises(ConfigurationError, match=option):
            make_bus(**{option: bad})
    extra: dict[str, list[dict[str, Any]]] = {
        "redis": [{"stream": ""}, {"maxlen": 0}, {"url": "http://x"}, {"client": object()}],
        "postgres": [{"channel": "no spaces"}, {"channel": "x" * 64}, {"engine": object()}, {"timeout": 0}],
        "memcache": [{"ring": 1}, {"namespace": "has space"}, {"store": object()}, {"servers": [42]},
                     {"timeout": -1}],
    }  # fmt: skip
    for overrides in extra[make_bus.kind]:
        with pytest.raises(ConfigurationError):
            make_bus(**overrides)


UNREACHABLE: dict[str, Callable[[], dict[str, Any]]] = {
    "redis": lambda: {"url": "redis://127.0.0.1:9/0"},
    "postgres": lambda: {"url": "postgresql://postgres@127.0.0.1:9/test"},
    "memcache": lambda: {"servers": "127.0.0.1:9"},
}


def test_publishing_to_an_unreachable_server_raises_store_unavailable(make_bus: BusFactory) -> None:
    bus = make_bus(**UNREACHABLE[make_bus.kind]())
    with pytest.raises(StoreUnavailableError) as info:
        bus.publish(digests_for("down", 1))
    assert info.value.store is bus and info.value.__cause__ is not None
    assert bus.stats().publish_errors == 1
    # a listener on an unreachable server is never trusted, and release() still stops it
    before = set(bus_threads())
    bus.subscribe(RecordingListener())
    time.sleep(0.3)
    assert bus.trusted_until == 0.0
    bus.release()
    assert set(bus_threads()) <= before


MISSING_DRIVER = textwrap.dedent(
    """
    import sys
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == sys.argv[1]:
                raise ImportError(f"No module named {name!r}")
            return None
    sys.meta_path.insert(0, Refuse())
    import stockpyle.bus
    try:
        getattr(stockpyle.bus, sys.argv[2])()
    except ImportError as exc:
        print(exc)
    """
)


@pytest.mark.parametrize(
    ("module", "cls", "extra"),
    [("redis", "RedisStreamBus", "stockpyle[redis]"), ("psycopg", "PostgresNotifyBus", "stockpyle[postgres]"),
     ("pymemcache", "MemcacheEpochBus", "stockpyle[memcache]")],
)  # fmt: skip
def test_a_missing_driver_is_an_import_error_naming_the_extra(module: str, cls: str, extra: str) -> None:
    out = subprocess.run([sys.executable, "-c", MISSING_DRIVER, module, cls], capture_output=True, text=True,
                         check=True)  # fmt: skip
    assert extra in out.stdout, out.stdout + out.stderr
