"""Signed entries: forged, replayed and foreign entries are never unpickled; keys rotate."""

from __future__ import annotations

import os
import pickle
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymemcache.client.base import Client

from stockpyle import MemcacheStore
from stockpyle.exceptions import ConfigurationError, SerializationError, SignatureError
from stockpyle.serializers import Codec, HMACSigner, JSONSerializer, PickleSerializer
from stockpyle.stores.kv import REPLAY_TOLERANCE
from stockpyle.testing import Item

pytestmark = pytest.mark.memcache


class Exploit:
    """Unpickling this creates a marker file: proof that attacker code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def raw(memcached_server: Any) -> Iterator[Client]:
    client = Client(memcached_server.address, default_noreply=False, timeout=2)
    yield client
    client.close()


@pytest.fixture
def store_factory(memcached_server: Any) -> Iterator[Any]:
    made: list[MemcacheStore] = []

    def make(**options: Any) -> MemcacheStore:
        options.setdefault("namespace", "sec" + uuid.uuid4().hex[:10])
        store = MemcacheStore([memcached_server.address], **options)
        made.append(store)
        return store

    yield make
    for store in made:
        store.release()


def forged_entries(marker: Path, key: str) -> list[bytes]:
    """Attacker-written values: a raw pickle and envelope-shaped ones that carry it."""
    evil = pickle.dumps(Exploit(marker))
    plain = b"SP" + bytes((1, 1, 0))
    signed = b"SP" + bytes((2, 1, 0)) + b"\x00" * 32
    names = key.encode()
    frame = len(names).to_bytes(4, "big") + names + evil
    return [evil, plain + frame, signed + frame, b"SP" + bytes((2, 1, 9)) + b"\x11" * 32 + frame, b"SP", b""]


@pytest.mark.parametrize("variant", range(6))
def test_forged_entry_is_never_unpickled(variant: int, tmp_path: Path, raw: Client, store_factory: Any) -> None:
    marker = tmp_path / "pwned"
    store = store_factory(secret=b"s3cret-key-for-tests")
    key = store.key_for(Item, {"key": "victim"})
    raw.set(key, forged_entries(marker, key)[variant])
    assert store.get(Item, {"key": "victim"}) is None
    assert store.batch_get(Item, [{"key": "victim"}]) == [None]
    assert not marker.exists(), "attacker code ran during unpickle"
    if variant == 5:
        # an empty value carries nothing to run: it is what a lease stub looks like,
        # so it is a miss and stays (deleting it would end another reader's lease)
        assert (store.rejected, raw.get(key)) == (0, b"")
        return
    assert store.rejected == 1  # counted once: the first read deleted the entry
    assert raw.get(key) is None


def test_unsigned_store_rejects_raw_pickles(tmp_path: Path, raw: Client, store_factory: Any) -> None:
    # Without a secret an envelope-shaped pickle would load; a bare one never does.
    marker = tmp_path / "pwned"
    store = store_factory()
    key = store.key_for(Item, {"key": "victim"})
    raw.set(key, pickle.dumps(Exploit(marker)))
    assert store.get(Item, {"key": "victim"}) is None
    assert not marker.exists()
    assert store.rejected == 1


def test_entry_replayed_under_another_key_is_rejected(raw: Client, store_factory: Any) -> None:
    store = store_factory(secret="another secret")
    store.put(Item("admin", 1, 2, "root rights"))
    store.put(Item("guest", 3, 4, "nothing"))
    admin_entry = raw.get(store.key_for(Item, {"key": "admin"}))
    raw.set(store.key_for(Item, {"key": "guest"}), admin_entry)
    assert store.get(Item, {"key": "guest"}) is None
    assert store.rejected == 1
    assert store.get(Item, {"key": "admin"}).payload == "root rights"  # type: ignore[union-attr]


def test_entry_copied_from_another_namespace_is_rejected(raw: Client, store_factory: Any) -> None:
    first = store_factory(secret=b"same secret", namespace="one")
    second = store_factory(secret=b"same secret", namespace="two")
    first.put(Item("k", 1, 2, "from one"))
    raw.set(second.key_for(Item, {"key": "k"}), raw.get(first.key_for(Item, {"key": "k"})))
    assert second.get(Item, {"key": "k"}) is None
    assert second.rejected == 1
    first.delete(Item("k", 1, 2))


def test_wrong_secret_is_a_miss_not_an_error(store_factory: Any) -> None:
    namespace = "rot" + uuid.uuid4().hex[:8]
    writer = store_factory(secret=b"secret one", namespace=namespace)
    reader = store_factory(secret=b"secret two", namespace=namespace)
    writer.put(Item("k", 1, 2))
    assert reader.get(Item, {"key": "k"}) is None
    assert reader.rejected == 1


def test_key_rotation(store_factory: Any) -> None:
    namespace = "rot" + uuid.uuid4().hex[:8]
    old = store_factory(secret={1: b"old secret"}, namespace=namespace)
    old.put(Item("k", 1, 2, "signed with 1"))
    rotating = store_factory(secret={1: b"old secret", 2: b"new secret"}, namespace=namespace)
    assert rotating.get(Item, {"key": "k"}).payload == "signed with 1"  # type: ignore[union-attr]
    rotating.put(Item("k2", 3, 4, "signed with 2"))
    new_only = store_factory(secret={2: b"new secret"}, namespace=namespace)
    assert new_only.get(Item, {"key": "k2"}).payload == "signed with 2"  # type: ignore[union-attr]
    assert new_only.get(Item, {"key": "k"}) is None  # key 1 retired
    assert new_only.rejected == 1


def test_unsigned_entries_are_rejected_by_a_signing_store(store_factory: Any) -> None:
    namespace = "mix" + uuid.uuid4().hex[:8]
    store_factory(namespace=namespace).put(Item("k", 1, 2))
    signed = store_factory(namespace=namespace, secret=b"secret")
    assert signed.get(Item, {"key": "k"}) is None
    assert signed.rejected == 1


def test_signing_store_with_a_signer_object(store_factory: Any) -> None:
    store = store_factory(signer=HMACSigner({7: "seven"}, current=7))
    store.put(Item("k", 1, 2, "x"))
    assert store.get(Item, {"zap": 1, "bar": 2}) == Item("k", 1, 2, "x")


def test_json_serializer_refuses_objects_clearly(store_factory: Any) -> None:
    store = store_factory(serializer=JSONSerializer())
    with pytest.raises(SerializationError, match="JSONSerializer cannot encode Item"):
        store.put(Item("k", 1, 2))


# ---------------------------------------------------------------------------
# the codec on its own


def test_codec_round_trips_and_binds_the_logical_key() -> None:
    codec = Codec(PickleSerializer(), HMACSigner(b"k" * 32))
    data = codec.encode("logical:a", {"x": (1, 2)})
    assert data[:2] == b"SP"
    assert len(data) == len(codec.encode("logical:b", {"x": (1, 2)}))
    assert codec.decode("logical:a", data) == {"x": (1, 2)}
    with pytest.raises(SignatureError):
        codec.decode("logical:b", data)
    tampered = data[:-1] + bytes((data[-1] ^ 1,))
    with pytest.raises(SignatureError):
        codec.decode("logical:a", tampered)
    with pytest.raises(SerializationError, match="bad magic"):
        codec.decode("logical:a", b"\x80\x05junk")
    with pytest.raises(SerializationError, match="serializer id"):
        Codec(JSONSerializer(), HMACSigner(b"k" * 32)).decode("logical:a", data)


def test_json_serializer_keeps_types() -> None:
    import datetime as _dt
    from decimal import Decimal

    value = {
        "when": _dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=_dt.timezone.utc),
        "day": _dt.date(2024, 5, 6),
        "price": Decimal("9.99"),
        "id": uuid.UUID(int=42),
        "blob": b"\x00\xff",
        "pair": (1, "two"),
        "tags": {"a", "b"},
        (1, 2): "tuple key",
        "__sp__": "a user key that looks like our tag",
        "nested": [{"t": (None, 1.5)}],
    }
    codec = Codec(JSONSerializer(), HMACSigner("json secret"))
    assert codec.decode("k", codec.encode("k", value)) == value


def test_signer_rejects_bad_configuration() -> None:
    with pytest.raises(ConfigurationError):
        HMACSigner(b"")
    with pytest.raises(ConfigurationError):
        HMACSigner({})
    with pytest.raises(ConfigurationError):
        HMACSigner({300: b"x"})
    with pytest.raises(ConfigurationError):
        HMACSigner({1: b"x"}, current=2)
    assert "x" not in repr(HMACSigner({1: b"x" * 20}))


# -- replays of the key's own old entries -------------------------------------------


class Account:
    __stockpyle_keys__ = ["name"]  # noqa: RUF012

    def __init__(self, name: str, role: str) -> None:
        self.name, self.role = name, role


def test_an_old_entry_replayed_after_a_change_is_refused(raw: Client, store_factory: Any) -> None:
    """An attacker who can write to memcached replays the 'admin' entry after a demotion."""
    store = store_factory(secret=b"replay-secret-0123456")
    key = store.key_for(Account, {"name": "mallory"})
    store.put(Account("mallory", "admin"))
    admin_entry = raw.get(key)
    time.sleep(REPLAY_TOLERANCE + 0.2)
    store.put(Account("mallory", "user"))  # the demotion
    raw.set(key, admin_entry)  # the replay, without expiry
    assert store.get(Account, {"name": "mallory"}) is None  # refused: written before a newer write
    assert store.rejected == 1
    assert raw.get(key) is None  # and deleted


def test_an_old_entry_replayed_after_a_delete_is_refused(raw: Client, store_factory: Any) -> None:
    store = store_factory(secret=b"replay-secret-0123456")
    key = store.key_for(Account, {"name": "gone"})
    store.put(Account("gone", "admin"))
    entry = raw.get(key)
    time.sleep(REPLAY_TOLERANCE + 0.2)
    store.delete(Account("gone", "admin"))
    raw.set(key, entry)
    assert store.get(Account, {"name": "gone"}) is None
    assert store.rejected == 1


def test_an_entry_older_than_max_lifetime_is_refused_by_any_reader(raw: Client, store_factory: Any) -> None:
    """A reader that has seen nothing of the key (another process) still refuses an outlived entry."""
    writer = store_factory(secret=b"replay-secret-0123456", max_lifetime=1)
    key = writer.key_for(Account, {"name": "old"})
    writer.put(Account("old", "admin"))
    entry = raw.get(key)
    generation_key = writer._generation_key(Account)  # the class's generation
    generation = raw.get(generation_key)
    time.sleep(2 + REPLAY_TOLERANCE + 0.3)  # the expiry is rounded up to whole seconds
    # memcached dropped both after their second; the attacker puts them back for ever
    raw.set(generation_key, generation)
    raw.set(key, entry)
    reader = store_factory(secret=b"replay-secret-0123456", max_lifetime=3600, namespace=writer.namespace)
    assert reader.get(Account, {"name": "old"}) is None  # its own signed expiry has passed
    assert reader.rejected == 1


def test_entries_of_an_unsigned_release_are_misses_for_a_signing_store(raw: Client, store_factory: Any) -> None:
    store = store_factory(secret=b"replay-secret-0123456")
    key = store.key_for(Account, {"name": "legacy"})
    codec = Codec(signer=HMACSigner(b"replay-secret-0123456"))
    # an entry in the layout of stockpyle 0.2 (no signed write time): section length first
    section = key.encode()
    raw.set(key, codec.seal(key, len(section).to_bytes(4, "big") + section + pickle.dumps(Account("legacy", "x"))))
    assert store.get(Account, {"name": "legacy"}) is None
    assert store.rejected == 1
