"""Two key values are one in-process key exactly when their canonical encodings are equal.

Property-based (hypothesis) over every supported value type, plus the cases
that broke it: DST-ambiguous aware datetimes (``fold``), aware ``time`` values
in different zones, and lone surrogates (which no database driver can send).
"""

from __future__ import annotations

import datetime as _dt
import uuid
from decimal import Decimal
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stockpyle import ChainedStore, ProcessMemoryStore
from stockpyle.exceptions import StockpyleError, UnsupportedKeyValueError
from stockpyle.keys import canonical_value, encode_value, lookup_key

LONDON = ZoneInfo("Europe/London")
UTC = _dt.timezone.utc


class Event:
    __stockpyle_keys__: ClassVar[list[Any]] = ["at"]

    def __init__(self, at: Any, name: str) -> None:
        self.at, self.name = at, name


def same_key(a: Any, b: Any) -> bool:
    ca, cb = canonical_value(a), canonical_value(b)
    return bool(ca == cb) and hash(ca) == hash(cb)


# -- the cases found by black-box tests ----------------------------------------


def test_the_two_instants_of_a_dst_fold_are_two_keys() -> None:
    first = _dt.datetime(2024, 10, 27, 1, 30, tzinfo=LONDON, fold=0)  # 00:30 UTC
    second = first.replace(fold=1)  # 01:30 UTC, an hour later
    assert first == second  # Python's own (intrazone) comparison ignores fold...
    assert encode_value(first) != encode_value(second)
    assert not same_key(first, second)  # ...stockpyle's keys do not
    store = ProcessMemoryStore()
    store.batch_put([Event(first, "first"), Event(second, "second")])
    assert store.get(Event, {"at": first}).name == "first"  # type: ignore[union-attr]
    assert store.get(Event, {"at": second}).name == "second"  # type: ignore[union-attr]


def test_one_instant_in_two_zones_is_one_key() -> None:
    noon_paris = _dt.datetime(2024, 6, 1, 12, tzinfo=ZoneInfo("Europe/Paris"))
    ten_utc = _dt.datetime(2024, 6, 1, 10, tzinfo=UTC)
    assert same_key(noon_paris, ten_utc)
    assert encode_value(noon_paris) == encode_value(ten_utc)


def test_aware_times_are_keyed_by_their_utc_instant() -> None:
    plus_one = _dt.timezone(_dt.timedelta(hours=1))
    assert same_key(_dt.time(12, tzinfo=plus_one), _dt.time(11, tzinfo=UTC))
    assert encode_value(_dt.time(12, tzinfo=plus_one)) == encode_value(_dt.time(11, tzinfo=UTC))
    # not modulo a day, as Python compares them
    assert not same_key(_dt.time(0, 30, tzinfo=plus_one), _dt.time(23, 30, tzinfo=UTC))
    assert encode_value(_dt.time(0, 30, tzinfo=plus_one)) != encode_value(_dt.time(23, 30, tzinfo=UTC))
    # a zone without a fixed offset gives a time no offset: it keys like the naive time
    assert same_key(_dt.time(12, tzinfo=LONDON), _dt.time(12))
    assert encode_value(_dt.time(12, tzinfo=LONDON)) == encode_value(_dt.time(12))


@pytest.mark.parametrize("value", ["\udce9", "caf\udce9", ("ok", "\ud800")])
def test_lone_surrogates_are_refused_before_any_layer_is_asked(value: Any) -> None:
    class Witness(ProcessMemoryStore):
        def get(self, klass: Any, keydict: Any) -> Any:
            raise AssertionError("a layer was asked")

    chain = ChainedStore([ProcessMemoryStore(), Witness()])
    with pytest.raises(UnsupportedKeyValueError, match="surrogate") as caught:
        chain.get(Event, {"at": value})
    assert isinstance(caught.value, StockpyleError)
    with pytest.raises(UnsupportedKeyValueError):
        chain.put(Event(value, "x"))
    with pytest.raises(UnsupportedKeyValueError):
        lookup_key(Event, {"at": value})


# -- the property ---------------------------------------------------------------

scalars = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=8),
    st.binary(max_size=8),
    st.integers(),
    st.booleans(),
    st.floats(allow_nan=False),
    st.decimals(allow_nan=False, places=None),
    st.uuids(),
    st.dates(),
    st.datetimes(),
    st.datetimes(timezones=st.timezones(), allow_imaginary=False),
    st.times(),
    st.times(timezones=st.timezones()),
    st.times(
        timezones=st.builds(
            _dt.timezone, st.timedeltas(min_value=-_dt.timedelta(hours=23), max_value=_dt.timedelta(hours=23))
        )
    ),
    st.none(),
)
#: local times that occur twice (the hour a DST change repeats), where ``fold`` tells the instants apart
ambiguous = st.builds(
    lambda where, minute, fold: _dt.datetime(*where[1], minute, tzinfo=ZoneInfo(where[0]), fold=fold),
    st.sampled_from(
        [
            ("Europe/London", (2024, 10, 27, 1)),
            ("America/New_York", (2024, 11, 3, 1)),
            ("Australia/Sydney", (2024, 4, 7, 2)),
        ]
    ),
    st.integers(0, 59),
    st.integers(0, 1),
)
values = st.recursive(
    st.one_of(scalars, ambiguous), lambda inner: st.tuples(inner) | st.tuples(inner, inner), max_leaves=4
)


def _neighbours(value: Any) -> list[Any]:
    """Values built to be equal-but-different from ``value``: where key equality and encoding can disagree."""
    out: list[Any] = []
    if isinstance(value, _dt.datetime):
        out.append(value.replace(fold=1 - value.fold))
        if value.utcoffset() is not None:
            out.append(value.astimezone(UTC))
            out.append(value.astimezone(_dt.timezone(_dt.timedelta(hours=5, minutes=30))))
        out.append(value.replace(tzinfo=None))
    elif isinstance(value, _dt.time):
        out.append(value.replace(fold=1 - value.fold))
        out.append(value.replace(tzinfo=None))
        out.append(value.replace(tzinfo=UTC))
        offset = value.utcoffset()
        if offset is not None:  # the same instant written in another offset, when it falls on the same day
            for shift in (_dt.timedelta(hours=1), _dt.timedelta(hours=-3, minutes=-30)):
                moved = _dt.datetime.combine(_dt.date(2000, 1, 2), value.replace(tzinfo=None)) + shift
                if moved.date() == _dt.date(2000, 1, 2) and abs(offset + shift) < _dt.timedelta(hours=24):
                    out.append(moved.time().replace(tzinfo=_dt.timezone(offset + shift)))
    elif isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        out.extend(kind(value) for kind in (int, float, Decimal) if _converts(kind, value))
        out.append(bool(value))
    elif isinstance(value, str):
        out.append(value.encode("utf-8"))
    elif isinstance(value, uuid.UUID):
        out.append(str(value))
    return out


def _converts(kind: type, value: Any) -> bool:
    try:
        kind(value)
    except (OverflowError, ValueError, ArithmeticError):
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(values, values)
def test_same_in_process_key_exactly_when_same_encoding(a: Any, b: Any) -> None:
    for other in [b, *_neighbours(a)]:
        assert same_key(a, other) == (encode_value(a) == encode_value(other)), (a, other)
