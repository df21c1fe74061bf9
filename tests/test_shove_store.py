"""ShoveStore behaviour specific to shove: keys, files, persistence, expiry, errors."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote_plus

import pytest

from stockpyle import ChainedStore, ProcessMemoryStore
from stockpyle.exceptions import ConfigurationError, SerializationError, StoreError, UnsupportedKeyValueError
from stockpyle.keys import encode_key, lookup_key
from stockpyle.testing import Automobile, Car, Item

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("shove") is None, reason="shove is not installed: pip install stockpyle[shove]"
)

from stockpyle.stores.base import Tombstone  # noqa: E402
from stockpyle.stores.shove import MAX_QUOTED_KEY, ShoveStore, open_shove, shove_key  # noqa: E402

PERSISTENT = ("file", "lite", "dbm")


def uri_for(scheme: str, tmp_path: Path) -> str:
    return {
        "simple": "simple://",
        "memory": "memory://",
        "file": f"file://{tmp_path}/files",
        "lite": f"lite://{tmp_path}/store.sqlite",
        "dbm": f"dbm://{tmp_path}/store.dbm",
    }[scheme]


@pytest.fixture
def opened() -> Iterator[Callable[..., ShoveStore]]:
    """Build ShoveStores that are released after the test."""
    stores: list[ShoveStore] = []

    def make(*args: Any, **kwargs: Any) -> ShoveStore:
        store = ShoveStore(*args, **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.release()


def raw_entries(uri: str) -> dict[str, Any]:
    raw = open_shove(uri)
    try:
        return {key: raw[key] for key in raw}
    finally:
        raw.close()


# -- construction ----------------------------------------------------------------


def test_constructor_spellings(tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    uri = uri_for("file", tmp_path)
    for store in (opened(shoveuri=uri), opened(uri=uri), opened(None, uri), opened(shove={})):
        store.put(Item("k", 1, 2, "v"))
        assert store.get(Item, {"key": "k"}) == Item("k", 1, 2, "v")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of shove="),
        ({"shove": {}, "uri": "simple://"}, "exactly one of shove="),
        ({"uri": "simple://", "shoveuri": "simple://"}, "same argument"),
        ({"shove": {}, "compress": True}, "only apply when ShoveStore opens a URI"),
        ({"shove": [1, 2]}, "MutableMapping"),
        ({"uri": "/no/scheme"}, "file:///path/to/dir"),
        ({"uri": 42}, "file:///path/to/dir"),
        ({"uri": "simple://", "polymorphic": "yes"}, "polymorphic"),
        ({"uri": "simple://", "lifetime_cb": 30}, "lifetime_cb"),
    ],
)
def test_constructor_misuse_is_a_configuration_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        ShoveStore(**kwargs)
    assert isinstance(info.value, ValueError)


def test_a_uri_as_first_argument_suggests_uri_keyword() -> None:
    with pytest.raises(ConfigurationError, match=r"write ShoveStore\(uri='memory://'\)"):
        ShoveStore("memory://")  # type: ignore[arg-type]


def test_bad_arguments_open_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        ShoveStore(uri=uri_for("file", tmp_path), polymorphic=1)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_lists_the_installed_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"no 's3' backend installed \(installed: dbm, file, lite"):
        ShoveStore(shoveuri="s3://s3key:s3secret@your_s3_bucket_name")


def test_shove_options_reach_shove(tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    store = opened(uri=uri_for("file", tmp_path), compress=True)
    store.put(Item("k", 1, 2, "x" * 1000))
    stored = (tmp_path / "files" / "stockpyle.testing.Item%3Akey%3Ds%3Ak").read_bytes()
    assert len(stored) < 200  # compressed by shove
    assert store.get(Item, {"key": "k"}).payload == "x" * 1000


# -- entries and keys ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", PERSISTENT)
def test_entries_are_obj_expiry_tuples_under_readable_keys(
    scheme: str, tmp_path: Path, opened: Callable[..., ShoveStore]
) -> None:
    uri = uri_for(scheme, tmp_path)
    store = opened(uri=uri, lifetime_cb=lambda obj: 60 if obj.key == "mortal" else None)
    before = time.time()
    store.batch_put([Item("abc", 1, 2, "p"), Item("mortal", 3, 4, "q")])
    store.release()
    entries = raw_entries(uri)
    assert sorted(entries) == [
        "stockpyle.testing.Item:bar=i:2,zap=i:1",
        "stockpyle.testing.Item:bar=i:4,zap=i:3",
        "stockpyle.testing.Item:key=s:abc",
        "stockpyle.testing.Item:key=s:mortal",
    ]
    assert entries["stockpyle.testing.Item:key=s:abc"] == (Item("abc", 1, 2, "p"), None)
    obj, expires = entries["stockpyle.testing.Item:key=s:mortal"]
    assert obj == Item("mortal", 3, 4, "q")
    assert before + 60 <= expires <= time.time() + 60  # absolute unix time


def test_shove_keys_are_the_canonical_encoding() -> None:
    key = lookup_key(Item, {"zap": 1, "bar": "two"})
    assert shove_key(key) == encode_key(key) == "stockpyle.testing.Item:bar=s:two,zap=i:1"


HOSTILE = [
    "..",
    ".",
    "../../escape",
    "/tmp/absolute",
    "C:\\windows\\path",
    "nul\x00byte",
    "new\nline",
    "x" * 10_000,
    "\u65e5" * 2_000,
    "\U0001f600" * 300,
    "",
]


def test_lone_surrogates_are_refused_like_in_every_store(tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    store = opened(uri=uri_for("file", tmp_path))
    with pytest.raises(UnsupportedKeyValueError, match="surrogate"):
        store.put(Item("lone \ud800 surrogate", 1, 1))
    assert list(store.mapping) == []


@pytest.mark.parametrize("scheme", PERSISTENT)
def test_key_values_never_leave_the_store(scheme: str, tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    uri = uri_for(scheme, workdir)
    store = opened(uri=uri)
    objs = [Item(value, i, -i, f"v{i}") for i, value in enumerate(HOSTILE)]
    store.batch_put(objs)
    for i, value in enumerate(HOSTILE):
        assert store.get(Item, {"key": value}) == Item(value, i, -i, f"v{i}")
    store.batch_delete(objs)
    assert store.batch_get(Item, [{"key": v} for v in HOSTILE]) == [None] * len(HOSTILE)
    store.batch_put(objs)
    # nothing was written beside the store, or anywhere else under tmp_path
    assert [p.name for p in tmp_path.iterdir()] == ["work"]
    assert not Path("/tmp/absolute").exists()
    if scheme == "file":
        files = os.listdir(workdir / "files")
        assert len(files) == 2 * len(HOSTILE)
        for name in files:
            assert "/" not in name
            assert len(name.encode()) <= MAX_QUOTED_KEY
            assert (workdir / "files" / name).is_file()


def test_long_keys_are_shortened_to_a_readable_prefix_and_digest() -> None:
    long_a = shove_key(lookup_key(Item, {"key": "x" * 5000 + "a"}))
    long_b = shove_key(lookup_key(Item, {"key": "x" * 5000 + "b"}))
    assert long_a != long_b
    assert long_a.startswith("stockpyle.testing.Item:key=s:xxxxxxxx")
    prefix, digest = long_a.split("%#")
    assert len(prefix) > 150  # readable: most of the budget is the key itself
    assert len(digest) == 40
    int(digest, 16)
    # the marker "%#" is never produced by encode_key, so a natural key that
    # spells out a shortened key cannot collide with it
    lookalike = lookup_key(Item, {"key": long_a.split("key=s:", 1)[1]})
    assert shove_key(lookalike) != long_a
    wide = shove_key(lookup_key(Item, {"key": "\u65e5" * 300}))
    assert len(quote_plus(wide)) <= MAX_QUOTED_KEY


def test_every_shove_key_fits_a_file_name() -> None:
    class K:
        __stockpyle_keys__: ClassVar[list[str]] = ["k"]

    K.__module__ = "m"  # a short class name leaves the most room for the value
    for value in ["\U0001f600" * n for n in range(1, 120)] + ["\u00e9" * n for n in range(1, 150, 7)]:
        assert len(quote_plus(shove_key(lookup_key(K, {"k": value})))) <= MAX_QUOTED_KEY


@pytest.mark.parametrize("scheme", ["simple", "file"])
def test_an_entry_holding_another_object_is_never_returned(
    scheme: str, tmp_path: Path, opened: Callable[..., ShoveStore]
) -> None:
    # e.g. two keys that differ only in case on a case-insensitive file system
    uri = uri_for(scheme, tmp_path)
    store = opened(uri=uri)
    store.put(Item("ABC", 1, 2))
    store.mapping["stockpyle.testing.Item:key=s:abc"] = (Item("ABC", 1, 2), None)
    assert store.get(Item, {"key": "abc"}) is None
    assert store.get(Item, {"key": "ABC"}) == Item("ABC", 1, 2)


# -- stale keys, polymorphism ------------------------------------------------------


@pytest.mark.parametrize("scheme", PERSISTENT)
def test_stale_keys_are_removed_from_the_backend(
    scheme: str, tmp_path: Path, opened: Callable[..., ShoveStore]
) -> None:
    uri = uri_for(scheme, tmp_path)
    store = opened(uri=uri)
    obj = Item("k1", 1, 2, "v")
    store.put(obj)
    obj.zap, obj.bar = 3, 4
    store.put(obj)
    # a copy built elsewhere (another process) replaces every old key too
    store.put(Item("k1", 5, 6, "v2"))
    store.release()
    assert sorted(raw_entries(uri)) == [
        "stockpyle.testing.Item:bar=i:6,zap=i:5",
        "stockpyle.testing.Item:key=s:k1",
    ]


def test_stale_keys_of_a_polymorphic_copy_are_removed(tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    uri = uri_for("file", tmp_path)
    poly = opened(uri=uri, polymorphic=True)
    poly.put(Car("OLD", "red"))
    assert poly.get(Automobile, {"license_plate": "OLD"}) == Car("OLD", "red")
    # a plain store on the same files deletes the object: its base-class entry goes too
    plain = opened(uri=uri)
    plain.delete(Car("OLD", "red"))
    assert poly.get(Automobile, {"license_plate": "OLD"}) is None
    # what is left under both keys is a short-lived tombstone, not the object
    entries = [plain.mapping[name] for name in plain.mapping]
    assert len(entries) == 2
    assert all(isinstance(obj, Tombstone) and expires is not None for obj, expires in entries)
    # without tombstones, nothing is left at all
    poly.put(Car("OLD", "red"))
    opened(uri=uri, tombstone_lifetime=0).delete(Car("OLD", "red"))
    assert os.listdir(tmp_path / "files") == []


# -- expiry ----------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["memory", *PERSISTENT])
def test_expired_entry_is_removed_when_read(scheme: str, tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    uri = uri_for(scheme, tmp_path)
    store = opened(uri=uri, lifetime_cb=lambda obj: 0.2 if obj.payload == "short" else None)
    store.batch_put([Item("short", 1, 1, "short"), Item("long", 2, 2, "long")])
    time.sleep(0.3)
    assert store.get(Item, {"key": "short"}) is None
    assert store.get(Item, {"key": "long"}) == Item("long", 2, 2, "long")
    keys = set(store.mapping)
    assert "stockpyle.testing.Item:key=s:short" not in keys
    # the other key of the expired object is still there until it is read
    assert "stockpyle.testing.Item:bar=i:1,zap=i:1" in keys
    assert store.get(Item, {"zap": 1, "bar": 1}) is None
    assert "stockpyle.testing.Item:bar=i:1,zap=i:1" not in set(store.mapping)


def test_a_fresh_entry_written_meanwhile_is_not_discarded(opened: Callable[..., ShoveStore]) -> None:
    store = opened(uri="simple://")
    key = "stockpyle.testing.Item:key=s:k"
    fresh = (Item("k", 1, 1, "fresh"), None)
    store.mapping[key] = fresh
    store._discard(key)  # a read saw an expired entry here; another writer has replaced it since
    assert store.mapping[key] == fresh


# -- persistence across processes ----------------------------------------------------


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("scheme", PERSISTENT)
def test_data_survives_release_for_another_process(scheme: str, tmp_path: Path) -> None:
    uri = uri_for(scheme, tmp_path)
    run_python(
        f"""
        from stockpyle import ShoveStore
        from stockpyle.testing import Item
        store = ShoveStore(uri={uri!r}, lifetime_cb=lambda obj: 0.3 if obj.payload == "brief" else 3600)
        store.batch_put([Item("kept", 1, 2, "kept"), Item("brief", 3, 4, "brief"), Item("gone", 5, 6)])
        store.delete(Item("gone", 5, 6))
        store.release()
        """
    )
    time.sleep(0.4)
    out = run_python(
        f"""
        from stockpyle import ShoveStore
        from stockpyle.testing import Item
        with ShoveStore(uri={uri!r}) as store:
            found = store.batch_get(Item, [{{"zap": 1, "bar": 2}}, {{"key": "brief"}}, {{"key": "gone"}}])
            print(found)
        """
    )
    assert out == "[Item(bar=2, key='kept', payload='kept', zap=1), None, None]"


def test_writes_are_visible_to_another_store_before_release(tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    uri = uri_for("lite", tmp_path)
    writer, reader = opened(uri=uri), opened(uri=uri)
    writer.put(Item("k", 1, 2, "one"))
    assert reader.get(Item, {"key": "k"}) == Item("k", 1, 2, "one")
    writer.put(Item("k", 1, 2, "two"))  # no stale cached copy in the reader
    assert reader.get(Item, {"key": "k"}) == Item("k", 1, 2, "two")


def test_a_users_buffering_shove_is_synced(tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    from stockpyle._shove_compat import import_shove

    uri = uri_for("file", tmp_path)
    users_shove = import_shove().Shove(uri)  # shove's defaults: buffers 2 writes, 300 s cache
    store = opened(shove=users_shove)
    store.put(Car("ONE"))
    assert raw_entries(uri) == {"stockpyle.testing.Car:license_plate=s:ONE": (Car("ONE"), None)}


# -- release and errors ------------------------------------------------------------


@pytest.mark.parametrize("scheme", PERSISTENT)
def test_release_is_idempotent_and_the_store_reopens(scheme: str, tmp_path: Path) -> None:
    store = ShoveStore(uri=uri_for(scheme, tmp_path))
    store.put(Item("k", 1, 2, "kept"))
    store.release()
    store.release()
    assert store.get(Item, {"key": "k"}) == Item("k", 1, 2, "kept")  # reopened on first use
    store.put(Item("k2", 3, 4))
    store.release()
    assert store.get(Item, {"key": "k2"}) == Item("k2", 3, 4)
    store.release()


def test_a_shove_passed_in_is_synced_not_closed_by_release(tmp_path: Path) -> None:
    shove = open_shove(uri_for("file", tmp_path))
    store = ShoveStore(shove)
    store.put(Item("k", 1, 2))
    store.release()
    assert store.get(Item, {"key": "k"}) == Item("k", 1, 2)
    shove.close()


def test_unpicklable_object_is_refused_and_loses_nothing(tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    store = opened(uri=uri_for("file", tmp_path))
    store.put(Item("k", 1, 2, "original"))
    with pytest.raises(SerializationError, match="cannot be pickled"):
        store.put(Item("k", 1, 2, lambda: None))
    with pytest.raises(SerializationError):
        store.batch_put([Item("other", 7, 7), Item("k", 1, 2, lambda: None)])
    assert store.get(Item, {"key": "k"}) == Item("k", 1, 2, "original")
    assert store.get(Item, {"key": "other"}) is None


def test_undecodable_entry_is_an_error_that_a_put_or_delete_repairs(
    tmp_path: Path, opened: Callable[..., ShoveStore]
) -> None:
    store = opened(uri=uri_for("file", tmp_path))
    store.put(Item("k", 1, 2))
    path = tmp_path / "files" / "stockpyle.testing.Item%3Akey%3Ds%3Ak"
    path.write_bytes(pickle.dumps(("k", 1, 2))[:5])  # a torn write
    with pytest.raises(SerializationError, match="could not be decoded"):
        store.get(Item, {"key": "k"})
    store.put(Item("k", 1, 2, "repaired"))
    assert store.get(Item, {"key": "k"}) == Item("k", 1, 2, "repaired")
    path.write_bytes(pickle.dumps("not an entry"))
    with pytest.raises(SerializationError, match=r"not a stockpyle \(obj, expires_at\) tuple"):
        store.get(Item, {"key": "k"})
    store.delete(Item("k", 1, 2))
    assert store.get(Item, {"key": "k"}) is None


def test_backend_failures_are_store_errors(tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    store = opened(uri=uri_for("file", tmp_path))
    (tmp_path / "files").rmdir()  # the directory vanished under the store
    with pytest.raises(StoreError, match="failed to write"):
        store.put(Item("k", 1, 2))


def test_unwritable_location_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    with pytest.raises(StoreError, match=r"failed to open .*sub\.sqlite"):
        ShoveStore(uri=f"lite://{tmp_path}/afile/sub.sqlite")


# -- the seed's examples -------------------------------------------------------------


def test_seed_s3_example_with_a_local_backend(tmp_path: Path) -> None:
    # The seed's example opens Amazon S3:
    #     s3_store = ShoveStore(shoveuri="s3://s3key:s3secret@your_s3_bucket_name")
    # shove 0.6.6 ships no S3 backend (and tests use no network), so the same
    # code runs on a local file backend; an s3:// URI is a clear error.
    from stockpyle.stores import ShoveStore as SeedShoveStore

    s3_store = SeedShoveStore(shoveuri=f"file://{tmp_path}/bucket")
    car = Car(license_plate="1234 XYZ")
    s3_store.put(car)
    assert s3_store.get(Car, {"license_plate": "1234 XYZ"}) == car
    s3_store.release()
    # "Every object stored in the Shove is stored at a human-readable key, as a tuple of (obj, expiredate)."
    assert raw_entries(f"file://{tmp_path}/bucket") == {"stockpyle.testing.Car:license_plate=s:1234%20XYZ": (car, None)}


class Foo:
    __stockpyle_keys__: ClassVar[list[str]] = ["key"]

    def __init__(self, key: str) -> None:
        self.key = key


class Bar:
    __stockpyle_keys__: ClassVar[list[str]] = ["key"]

    def __init__(self, key: str) -> None:
        self.key = key


def test_seed_lifetime_callback_example(tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    def my_lifetime_cb(obj: object) -> int | None:
        if isinstance(obj, Foo):
            return 20
        if isinstance(obj, Bar):
            return 5 * 60
        return None

    store = opened(shoveuri=f"lite://{tmp_path}/seed.sqlite", lifetime_cb=my_lifetime_cb)
    now = time.time()
    store.put(Foo("my_unique_key_123"))
    store.put(Bar("bar"))
    assert store.get(Foo, {"key": "my_unique_key_123"}).key == "my_unique_key_123"
    expiries = {key: entry[1] for key, entry in ((k, store.mapping[k]) for k in store.mapping)}
    assert expiries[f"{__name__}.Foo:key=s:my_unique_key_123"] == pytest.approx(now + 20, abs=2)
    assert expiries[f"{__name__}.Bar:key=s:bar"] == pytest.approx(now + 300, abs=2)


@pytest.mark.parametrize("scheme", ["simple", "file"])
def test_seed_polymorphic_example(scheme: str, tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    store = opened(shoveuri=uri_for(scheme, tmp_path), polymorphic=True)
    car = Car(license_plate="1234 XYZ")
    store.put(car)  # the seed writes store.put(), a typo for store.put(car)
    car = store.get(Car, {"license_plate": "1234 XYZ"})
    automobile = store.get(Automobile, {"license_plate": "1234 XYZ"})
    assert car == automobile
    assert isinstance(automobile, Car)
    if scheme == "simple":
        assert car is automobile  # simple:// keeps the object itself; other backends pickle


def test_in_a_chain_under_process_memory(tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    shove_layer = opened(uri=uri_for("file", tmp_path))
    chain = ChainedStore([ProcessMemoryStore(), shove_layer])
    chain.put(Item("k", 1, 2, "v"))
    fresh_chain = ChainedStore([ProcessMemoryStore(), shove_layer])
    assert fresh_chain.get(Item, {"zap": 1, "bar": 2}) == Item("k", 1, 2, "v")
    chain.delete(Item("k", 1, 2))
    assert shove_layer.get(Item, {"key": "k"}) is None


# -- threads --------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["simple", "memory", "file", "dbm", "lite"])
def test_threads_can_share_a_store(scheme: str, tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    import threading

    store = opened(uri=uri_for(scheme, tmp_path))
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(30):
                store.put(Item(f"t{n}-{i}", n, i, "v"))
                assert store.get(Item, {"zap": n, "bar": i}) == Item(f"t{n}-{i}", n, i, "v")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(store.mapping)) == 4 * 30 * 2


def test_owner_thread_mapping_makes_a_thread_bound_backend_shareable(tmp_path: Path) -> None:
    # lite:// is bound to the thread that opened it on every Python (sqlite3)
    import threading

    from stockpyle.stores.shove import OwnerThreadMapping

    mapping = OwnerThreadMapping(lambda: open_shove(uri_for("lite", tmp_path)))
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                mapping[f"{n}-{i}"] = (n, i)
                assert mapping[f"{n}-{i}"] == (n, i)
            del mapping[f"{n}-0"]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(mapping) == 3 * 19
    with pytest.raises(KeyError):
        mapping["1-0"]
    mapping.close()
    assert raw_entries(uri_for("lite", tmp_path))["2-5"] == (2, 5)


def test_owner_thread_mapping_passes_on_an_opening_error() -> None:
    from stockpyle.stores.shove import OwnerThreadMapping

    with pytest.raises(ConfigurationError, match="no 'nosuch' backend"):
        OwnerThreadMapping(lambda: open_shove("nosuch://x"))


@pytest.mark.skipif(sys.version_info < (3, 13), reason="dbm.sqlite3 (thread-bound) is the default from Python 3.13")
def test_dbm_store_on_python_313_runs_on_its_own_thread(tmp_path: Path, opened: Callable[..., ShoveStore]) -> None:
    import dbm

    from stockpyle.stores.shove import OwnerThreadMapping

    store = opened(uri=uri_for("dbm", tmp_path))
    store.put(Item("k", 1, 2, "v"))
    assert isinstance(store.mapping, OwnerThreadMapping)
    assert dbm.whichdb(str(tmp_path / "store.dbm")) == "dbm.sqlite3"
