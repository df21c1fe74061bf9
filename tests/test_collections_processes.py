"""CachedMapping across real processes, through server outages, and the documented example."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

from stockpyle.collections import CachedMapping
from stockpyle.exceptions import StoreUnavailableError

ROOT = Path(__file__).resolve().parent.parent

# A reader process: answers JSON commands on stdin, one JSON line each.
WORKER = r"""
import json, sys, time
from stockpyle.collections import CachedMapping, mapping_view

class Shared(CachedMapping):
    def load(self):
        return {"loaded-by": "child"}

    @mapping_view
    def keys_upper(self):
        return sorted(str(k).upper() for k in self)

url, name, version, interval = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
mapping = Shared(url, name, version, check_interval=interval, publish_missing=False)
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    command = json.loads(line)
    if command["op"] == "quit":
        break
    if command["op"] == "wait":
        # keep reading until the value shows up, as a busy process would
        deadline = time.monotonic() + command["timeout"]
        while mapping.get(command["key"]) != command["value"] and time.monotonic() < deadline:
            time.sleep(0.01)
    print(json.dumps({
        "data": dict(mapping),
        "view": mapping.keys_upper,
        "revision": mapping.revision,
        "stats": mapping.stats().as_dict(),
    }), flush=True)
mapping.close()
"""


class Worker:
    """A reader in a separate Python process."""

    def __init__(self, script: Path, url: str, name: str, version: str = "v1", interval: float = 0.2) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(
            [sys.executable, str(script), url, name, version, str(interval)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self._read() == {"ready": True}

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            assert self.proc.stderr is not None
            raise AssertionError(f"worker died: {self.proc.stderr.read()}")
        return json.loads(line)

    def ask(self, op: str, **args: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if stream is not None and not stream.closed:
                stream.close()


@pytest.fixture
def worker_script(tmp_path: Path) -> Path:
    script = tmp_path / "cached_mapping_worker.py"
    script.write_text(WORKER)
    return script


class Counted(CachedMapping[str, Any]):
    def __init__(self, backend: Any, name: str, version: str, data: dict[str, Any], **options: Any) -> None:
        self.data = data
        self.loads = 0
        super().__init__(backend, name, version, **options)

    def load(self) -> dict[str, Any]:
        self.loads += 1
        return dict(self.data)


def _backend_urls(request: pytest.FixtureRequest) -> tuple[str, str]:
    prefix = request.getfixturevalue("redis_prefix")
    if request.param == "redis":
        request.getfixturevalue("redis_client")  # skips without Redis; cleans the prefix's keys
        return request.getfixturevalue("redis_url"), prefix
    server = request.getfixturevalue("memcached_server")
    return f"memcache://{server.address}", prefix


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("memcache", marks=pytest.mark.memcache),
    ]
)
def shared_url(request: pytest.FixtureRequest) -> tuple[str, str]:
    return _backend_urls(request)


def test_two_processes_see_a_push(shared_url: tuple[str, str], worker_script: Path) -> None:
    url, prefix = shared_url
    name = f"{prefix}-shared"
    writer = Counted(url, name, "v1", {"colour": "red"})
    try:
        assert writer.push() == 1
        workers = [Worker(worker_script, url, name) for _ in range(2)]
        try:
            for worker in workers:
                seen = worker.ask("dump")
                assert seen["data"] == {"colour": "red"}
                assert seen["view"] == ["COLOUR"]
                assert seen["revision"] == 1
                assert seen["stats"]["loads"] == 0  # started after the push: no load()
            writer.data = {"colour": "blue", "size": 3}
            pushed_at = time.monotonic()
            assert writer.push() == 2
            for worker in workers:
                seen = worker.ask("wait", key="colour", value="blue", timeout=5)
                assert time.monotonic() - pushed_at < 3
                assert seen["data"] == {"colour": "blue", "size": 3}
                assert seen["view"] == ["COLOUR", "SIZE"]  # recomputed for revision 2
                assert seen["revision"] == 2
                assert seen["stats"]["loads"] == 0
                assert seen["stats"]["views"] == 2
        finally:
            for worker in workers:
                worker.close()
    finally:
        writer.purge()
        writer.close()


def test_versions_are_isolated_across_processes(shared_url: tuple[str, str], worker_script: Path) -> None:
    url, prefix = shared_url
    name = f"{prefix}-versions"
    old = Counted(url, name, "release-1", {"schema": "old"})
    new = Counted(url, name, "release-2", {"schema": "new"})
    try:
        old.push()
        new.push()
        worker = Worker(worker_script, url, name, version="release-2")
        try:
            assert worker.ask("dump")["data"] == {"schema": "new"}
        finally:
            worker.close()
        old.purge()
        worker = Worker(worker_script, url, name, version="release-1")
        try:
            seen = worker.ask("dump")
            assert seen["data"] == {"loaded-by": "child"}  # purged: the child had to load()
            assert seen["stats"]["loads"] == 1
        finally:
            worker.close()
    finally:
        for mapping in (old, new):
            mapping.purge()
            mapping.close()


# -- outages ------------------------------------------------------------------------


def _assert_keeps_serving(mapping: Counted, stop: Any, caplog: pytest.LogCaptureFixture) -> None:
    assert mapping["k"] == "v1"
    stop()
    with caplog.at_level(logging.WARNING, logger="stockpyle.collections"):
        for _ in range(3):
            time.sleep(0.06)
            assert mapping["k"] == "v1"  # checks fail, the copy is served
            assert dict(mapping) == {"k": "v1"}
    assert mapping.stats().errors >= 1
    assert "cannot reach its backend; serving its current copy" in caplog.text
    assert mapping.loads == 0
    with pytest.raises(StoreUnavailableError) as excinfo:
        mapping.push()
    assert excinfo.value.__cause__ is not None
    with pytest.raises(StoreUnavailableError):
        mapping.purge()


@pytest.mark.redis
@pytest.mark.slow
def test_redis_stopped_mid_read_keeps_serving(redis_server_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = redis_server_factory.start()
    writer = Counted(server.url, "outage", "v1", {"k": "v1"})
    reader = Counted(server.url, "outage", "v1", {"k": "never"}, check_interval=0.05)
    try:
        writer.push()
        _assert_keeps_serving(reader, server.stop, caplog)
        # a process starting during the outage loads on its own
        newcomer = Counted(server.url, "outage", "v1", {"k": "local"})
        assert newcomer["k"] == "local"
        newcomer.close()
        # the server comes back empty: readers keep their copy until the next push
        server.start()
        time.sleep(0.06)
        assert reader["k"] == "v1"
        writer.data = {"k": "v2"}
        assert writer.push() == 1
        time.sleep(0.06)
        assert reader["k"] == "v2"
    finally:
        writer.close()
        reader.close()


@pytest.mark.memcache
@pytest.mark.slow
def test_memcached_stopped_mid_read_keeps_serving(memcached_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    (server,) = memcached_factory.start(count=1)
    url = f"memcache://{server.address}"
    writer = Counted(url, "outage", "v1", {"k": "v1"})
    reader = Counted(url, "outage", "v1", {"k": "never"}, check_interval=0.05)
    try:
        writer.push()
        _assert_keeps_serving(reader, server.stop, caplog)
        server.start()
        writer.data = {"k": "v2"}
        assert writer.push() == 1
        time.sleep(0.06)
        assert reader["k"] == "v2"
    finally:
        writer.close()
        reader.close()


@pytest.mark.memcache
def test_memcached_splits_large_snapshots_and_survives_eviction(memcached_factory: Any) -> None:
    (server,) = memcached_factory.start(count=1, memory_mb=64)
    url = f"memcache://{server.address}"
    big = {f"key{i}": os.urandom(1000) for i in range(2500)}  # about 2.6 MB: three chunks
    writer = Counted(url, "big", "v1", big)
    reader = Counted(url, "big", "v1", {})
    try:
        writer.push()
        pointer = writer._backend.read_pointer(writer._ns)
        assert pointer is not None
        assert pointer.chunks == 3
        assert reader == big
        assert reader.loads == 0
        # one chunk of the next revision disappears (eviction): nobody uses a partial snapshot
        writer.data = {"small": b"x"}
        writer.push()
        pointer = writer._backend.read_pointer(writer._ns)
        assert pointer is not None
        writer._backend.driver.delete_many([writer._ns.chunk(pointer.nonce, 0)])
        assert reader.refresh() is False
        assert reader == big
        assert reader.stats().missing == 1
    finally:
        writer.close()
        reader.close()


@pytest.mark.memcache
def test_memcache_store_as_backend(memcached_server: Any, redis_prefix: str) -> None:
    from stockpyle.stores import MemcacheStore

    store = MemcacheStore(servers=[memcached_server.address])
    name = f"{redis_prefix}-store"
    writer = Counted(store, name, "v1", {"a": 1})
    reader = Counted(store, name, "v1", {})
    try:
        writer.push()
        assert reader["a"] == 1
        assert reader.loads == 0
    finally:
        writer.purge()
        store.release()


# -- missing drivers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "url", "extra"),
    [("redis", "redis://127.0.0.1:6379/0", "redis"), ("pymemcache", "memcache://127.0.0.1:11211", "memcache")],
)
def test_missing_driver_names_the_extra(module: str, url: str, extra: str) -> None:
    code = f"""
import sys
sys.modules[{module!r}] = None  # the driver is "not installed"
from stockpyle.collections import CachedMapping

class M(CachedMapping):
    def load(self):
        return {{}}

try:
    M({url!r}, "n", "v")
except ImportError as exc:
    print(exc)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert f"pip install stockpyle[{extra}]" in out.stdout


def test_module_imports_without_drivers() -> None:
    code = "import sys; sys.modules['redis'] = sys.modules['pymemcache'] = None; import stockpyle.collections"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# -- the documented example -------------------------------------------------------------


def _example_code() -> str:
    text = (ROOT / "docs" / "collections.rst").read_text()
    section = text.split("\nExample\n-------\n", 1)[1].split("\nThe backend\n-----------\n", 1)[0]
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:   .*\n|\n)+)", section)
    assert len(blocks) == 3
    return "\n".join("\n".join(line[3:] for line in block.splitlines()) for block in blocks)


@pytest.mark.redis
def test_documented_example(
    redis_client: Any, redis_url: str, redis_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _example_code()
    code = code.replace('"redis://127.0.0.1:6379/0"', repr(redis_url))
    code = code.replace('"sqlite:///entities.db"', repr(f"sqlite:///{tmp_path / 'entities.db'}"))
    code = code.replace('"entity-name"', repr(f"{redis_prefix}-entity-name"))
    # a real module, so the example's namedtuple pickles as it would in an application
    module = types.ModuleType(f"collections_example_{redis_prefix}")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "docs/collections.rst", "exec"), module.__dict__)
        assert capsys.readouterr().out.splitlines() == ["Europe", "Norway", "Portugal"]
        mapping = module.cached_entity_mapping
        assert module.revision == 1
        assert mapping[2] == module.CachedEntity(2, 1, "Norway")
        assert mapping.by_parent_id[None] == (module.CachedEntity(1, None, "Europe"),)
        # another process (a fresh instance) reads the snapshot without querying the database
        fresh = module.CachedEntityMapping(redis_client, f"{redis_prefix}-entity-name", module.SOURCE_CODE_VERSION)
        module.engine.dispose()
        (tmp_path / "entities.db").unlink()
        assert [child.name for child in fresh.by_parent_id[1]] == ["Norway", "Portugal"]
        mapping.purge()
        mapping.close()
        module.engine.dispose()
    finally:
        del sys.modules[module.__name__]
