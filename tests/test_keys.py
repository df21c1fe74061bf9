"""The shared key model: declarations, canonical encoding, lookups."""

from __future__ import annotations

import datetime as dt
import enum
import subprocess
import sys
import textwrap
import uuid
from decimal import Decimal
from typing import Any, ClassVar

import pytest

from stockpyle.exceptions import (
    KeyDeclarationError,
    MissingKeyAttributeError,
    NotStorableError,
    UnknownKeyError,
    UnsupportedKeyValueError,
)
from stockpyle.keys import (
    class_name,
    encode_key,
    encode_value,
    key_model,
    lookup_key,
    object_keys,
    register_key_resolver,
)


class Foo:
    __stockpyle_keys__: ClassVar[list[Any]] = ["key", ("zap", "bar")]

    def __init__(self, key: Any, zap: Any, bar: Any) -> None:
        self.key, self.zap, self.bar = key, zap, bar


class Vehicle:
    __stockpyle_keys__: ClassVar[list[Any]] = ["vin"]


class Automobile(Vehicle):
    __stockpyle_keys__: ClassVar[list[Any]] = ["plate"]


class Car(Automobile):
    def __init__(self, vin: str, plate: str) -> None:
        self.vin, self.plate = vin, plate


class Color(enum.IntEnum):
    RED = 1


class Name(str, enum.Enum):
    ALICE = "alice"


def test_composite_key_order_does_not_matter() -> None:
    assert lookup_key(Foo, {"zap": 1, "bar": 2}) == lookup_key(Foo, {"bar": 2, "zap": 1})
    assert encode_key(lookup_key(Foo, {"zap": 1, "bar": 2})) == f"{class_name(Foo)}:bar=i:2,zap=i:1"


def test_values_of_different_types_never_share_a_key() -> None:
    values = [123, "123", 123.0, True, Decimal("123"), b"123", (123,), None, 1, 1.0, Decimal(1), "1"]
    keys = [lookup_key(Foo, {"key": v}) for v in values]
    texts = [encode_value(v) for v in values]
    # 123 vs True etc. differ; 1 vs True vs 1.0 vs Decimal(1) too
    assert len(set(texts)) == len(values)
    assert len(set(keys)) == len(values)


def test_equal_values_share_a_key() -> None:
    utc = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)
    plus2 = utc.astimezone(dt.timezone(dt.timedelta(hours=2)))
    assert encode_value(utc) == encode_value(plus2)
    assert lookup_key(Foo, {"key": utc}) == lookup_key(Foo, {"key": plus2})
    assert encode_value(Decimal("1.50")) == encode_value(Decimal("1.5"))
    assert encode_value(-0.0) == encode_value(0.0)
    assert encode_value(Color.RED) == encode_value(1)
    assert lookup_key(Foo, {"key": Name.ALICE}) == lookup_key(Foo, {"key": "alice"})


def test_naive_and_aware_datetimes_differ() -> None:
    naive = dt.datetime(2024, 5, 1, 12, 0)
    aware = naive.replace(tzinfo=dt.timezone.utc)
    assert encode_value(naive) != encode_value(aware)
    assert lookup_key(Foo, {"key": naive}) != lookup_key(Foo, {"key": aware})


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("a b,c=d", "s:a%20b%2Cc%3Dd"),
        ("line\r\n\x00", "s:line%0D%0A%00"),
        ("caf\u00e9", "s:caf\u00e9"),
        (b"\x00\xff", "y:00ff"),
        (None, "n"),
        (False, "b:0"),
        (-7, "i:-7"),
        (2.5, "f:2.5"),
        (uuid.UUID(int=1), "u:00000000-0000-0000-0000-000000000001"),
        (dt.date(2020, 1, 2), "da:2020-01-02"),
        ((1, ("x", None)), "(i:1,(s:x,n))"),
    ],
)
def test_canonical_text(value: Any, text: str) -> None:
    assert encode_value(value) == text


def test_text_encoding_is_identical_in_another_process() -> None:
    values = ["x", 1, 2.5, Decimal("3.10"), b"\x01", uuid.UUID(int=7), dt.datetime(2020, 1, 1, 1, 2, 3), (1, "a"), None]
    here = [encode_value(v) for v in values]
    script = textwrap.dedent(
        """
        import datetime as dt, uuid, json
        from decimal import Decimal
        from stockpyle.keys import encode_value
        values = ["x", 1, 2.5, Decimal("3.10"), b"\\x01", uuid.UUID(int=7),
                  dt.datetime(2020, 1, 1, 1, 2, 3), (1, "a"), None]
        print(json.dumps([encode_value(v) for v in values]))
        """
    )
    # a different hash seed proves nothing depends on hash()
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "12345"}
    )
    import json

    assert json.loads(out.stdout) == here


@pytest.mark.parametrize("value", [object(), [1], {"a": 1}, {1, 2}, float("nan"), Decimal("NaN"), (1, [2])])
def test_unsupported_values_are_refused(value: Any) -> None:
    with pytest.raises(UnsupportedKeyValueError):
        lookup_key(Foo, {"key": value})


def test_unsupported_value_error_names_the_type_and_the_alternatives() -> None:
    with pytest.raises(UnsupportedKeyValueError, match=r"type list is not supported; use str, bytes, int"):
        lookup_key(Foo, {"key": [1]})


def test_unknown_key_names_list_the_declared_keys() -> None:
    with pytest.raises(UnknownKeyError) as info:
        lookup_key(Foo, {"zap": 1})
    message = str(info.value)
    assert "Foo has no key 'zap'" in message
    assert "'key', ('bar', 'zap')" in message
    with pytest.raises(UnknownKeyError):
        lookup_key(Foo, {"key": 1, "zap": 2})
    with pytest.raises(UnknownKeyError):
        lookup_key(Foo, {})


def test_lookup_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match="dict of key attribute values"):
        lookup_key(Foo, [("key", 1)])  # type: ignore[arg-type]


def test_object_keys_cover_every_declared_key() -> None:
    keys = object_keys(Foo("k", 1, 2))
    assert [encode_key(k) for k in keys] == [f"{class_name(Foo)}:key=s:k", f"{class_name(Foo)}:bar=i:2,zap=i:1"]


def test_polymorphic_keys_include_every_storable_base() -> None:
    car = Car("VIN1", "PLATE1")
    plain = [encode_key(k) for k in object_keys(car)]
    assert plain == [f"{class_name(Car)}:plate=s:PLATE1"]
    poly = [encode_key(k) for k in object_keys(car, polymorphic=True)]
    assert poly == [
        f"{class_name(Car)}:plate=s:PLATE1",
        f"{class_name(Automobile)}:plate=s:PLATE1",
        f"{class_name(Vehicle)}:vin=s:VIN1",
    ]


def test_inherited_declaration_is_used() -> None:
    assert key_model(Car).specs == (("plate",),)


def test_missing_key_attribute_is_named() -> None:
    obj = Foo("k", 1, 2)
    del obj.zap
    with pytest.raises(MissingKeyAttributeError, match=r"no attribute 'zap'.*\('bar', 'zap'\)"):
        object_keys(obj)


def test_classes_without_keys_are_not_storable() -> None:
    class Plain:
        pass

    with pytest.raises(NotStorableError, match="declare __stockpyle_keys__"):
        object_keys(Plain())
    with pytest.raises(NotStorableError, match="expected a class"):
        key_model("Foo")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "declared",
    ["key", [], [""], [("a", "a")], [1], [("a", 2)], ["not an identifier"], [b"key"], 5, [{"a": 1}]],
)
def test_malformed_declarations_are_reported(declared: Any) -> None:
    klass = type("Bad", (), {"__stockpyle_keys__": declared})
    with pytest.raises(KeyDeclarationError, match="__stockpyle_keys__"):
        key_model(klass)


def test_duplicate_specs_are_merged() -> None:
    klass = type("Dup", (), {"__stockpyle_keys__": [("a", "b"), ("b", "a"), "c"]})
    assert key_model(klass).specs == (("a", "b"), ("c",))


def test_key_resolver_supplies_keys_for_undeclared_classes() -> None:
    class Mapped:
        def __init__(self, ident: int) -> None:
            self.ident = ident

    def resolver(klass: type) -> list[str] | None:
        return ["ident"] if klass is Mapped else None

    register_key_resolver(resolver)
    try:
        assert encode_key(object_keys(Mapped(5))[0]) == f"{class_name(Mapped)}:ident=i:5"
        # an explicit declaration still wins over a resolver
        assert key_model(Foo).specs == (("key",), ("bar", "zap"))
    finally:
        from stockpyle import keys

        keys._RESOLVERS.remove(resolver)
        keys._MODELS.clear()
