"""The one codec: round trips of every kind of value it carries, and what it refuses."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import math
from typing import Any
from zoneinfo import ZoneInfo

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowdsl as fd
from flowdsl import _codec


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@attrs.frozen
class Tag:
    name: str
    weight: float = 1.0


@attrs.frozen
class Ticket:
    id: int
    text: str
    tags: tuple[Tag, ...]
    color: Color
    level: Level
    opened: dt.datetime
    attachment: bytes
    meta: dict[str, list[int]]
    parent: int | None = None


@dataclasses.dataclass(frozen=True)
class Point:
    x: float
    y: float
    day: dt.date
    labels: list[str] = dataclasses.field(default_factory=list)


@attrs.frozen
class Nested:
    points: list[Point]
    by_name: dict[str, Ticket]
    pair: tuple[int, str]


# --- strategies ---------------------------------------------------------------------------

finite = st.floats(allow_nan=False)  # NaN never equals itself; tested on its own below
texts = st.text(max_size=10)
aware = st.datetimes(timezones=st.timezones())
fixed_offset = st.datetimes(
    timezones=st.timedeltas(
        dt.timedelta(hours=-23, minutes=-59), dt.timedelta(hours=23, minutes=59)
    ).map(dt.timezone)
)
tags = st.builds(Tag, texts, finite)
tickets = st.builds(
    Ticket,
    id=st.integers(),
    text=texts,
    tags=st.lists(tags, max_size=3).map(tuple),
    color=st.sampled_from(Color),
    level=st.sampled_from(Level),
    opened=st.one_of(st.datetimes(), aware),
    attachment=st.binary(max_size=20),
    meta=st.dictionaries(texts, st.lists(st.integers(), max_size=3), max_size=3),
    parent=st.none() | st.integers(),
)
points = st.builds(Point, finite, finite, st.dates(), st.lists(texts, max_size=3))
nested = st.builds(
    Nested,
    st.lists(points, max_size=3),
    st.dictionaries(texts, tickets, max_size=2),
    st.tuples(st.integers(), texts),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=20,
)


def roundtrip(value: Any, tp: Any) -> Any:
    text = _codec.encode(value)
    json.loads(text)  # real JSON text
    return _codec.decode(text, tp)


# --- round trips --------------------------------------------------------------------------


@given(value=json_values)
def test_json_values_round_trip_as_any(value: Any) -> None:
    assert roundtrip(value, Any) == value


@given(value=st.integers())
def test_ints(value: int) -> None:
    assert roundtrip(value, int) == value


@given(value=texts)
def test_strings(value: str) -> None:
    assert roundtrip(value, str) == value


@given(value=st.text(alphabet=st.characters(categories=["Cs"]), min_size=1, max_size=1))
def test_lone_surrogates(value: str) -> None:
    # (Two surrogates in a row would come back as the one character they pair into.)
    text = _codec.encode(value)
    text.encode("utf-8")  # a file or broker can carry it
    assert _codec.decode(text, str) == value


@given(value=finite)
def test_floats(value: float) -> None:
    assert roundtrip(value, float) == value


def test_non_finite_floats() -> None:
    assert roundtrip(math.inf, float) == math.inf
    assert roundtrip(-math.inf, float) == -math.inf
    assert math.isnan(roundtrip(math.nan, float))


@given(value=st.binary())
def test_bytes(value: bytes) -> None:
    assert roundtrip(value, bytes) == value


def _same_datetime(back: dt.datetime, value: dt.datetime) -> None:
    # `==` alone is not enough: it ignores fold between datetimes of one zone, and is
    # always False between zones at an ambiguous hour.
    assert back == value
    assert type(back) is dt.datetime
    assert back.replace(tzinfo=None, fold=0) == value.replace(tzinfo=None, fold=0)  # wall time
    assert back.fold == value.fold
    assert back.utcoffset() == value.utcoffset()
    assert back.tzname() == value.tzname()
    if isinstance(value.tzinfo, ZoneInfo):
        assert back.tzinfo is ZoneInfo(value.tzinfo.key)
    elif value.tzinfo is not None:
        assert isinstance(back.tzinfo, dt.timezone)
    else:
        assert back.tzinfo is None


# Every zone this machine knows and every instant, including skipped and repeated hours,
# with fold drawn either way (hypothesis draws fold for naive datetimes too).
@given(value=st.one_of(st.datetimes(), aware, fixed_offset))
def test_datetimes(value: dt.datetime) -> None:
    _same_datetime(roundtrip(value, dt.datetime), value)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (
            dt.datetime(2000, 10, 29, 1, 0, tzinfo=ZoneInfo("Asia/Istanbul")),
            "2000-10-29T01:00:00+03:00[Asia/Istanbul]",
        ),
        (
            dt.datetime(2000, 10, 29, 1, 0, tzinfo=ZoneInfo("Asia/Istanbul"), fold=1),
            "2000-10-29T01:00:00+02:00[Asia/Istanbul][fold=1]",
        ),
        (
            dt.datetime(2024, 3, 31, 2, 30, tzinfo=ZoneInfo("Europe/Paris")),  # skipped hour
            "2024-03-31T02:30:00+01:00[Europe/Paris]",
        ),
        (dt.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC), "2024-01-02T03:04:05.000006+00:00"),
        (
            dt.datetime(2024, 1, 2, tzinfo=dt.timezone(dt.timedelta(hours=-3, minutes=-30))),
            "2024-01-02T00:00:00-03:30",
        ),
        (dt.datetime(2024, 1, 2, 3, 4), "2024-01-02T03:04:00"),
        (dt.datetime(2024, 1, 2, 3, 4, fold=1), "2024-01-02T03:04:00[fold=1]"),
    ],
)
def test_datetime_text(value: dt.datetime, text: str) -> None:
    assert _codec.to_data(value) == text
    _same_datetime(_codec.from_data(text, dt.datetime), value)


def test_an_ambiguous_hour_keeps_its_instant() -> None:
    first = dt.datetime(2000, 10, 29, 1, 0, tzinfo=ZoneInfo("Asia/Istanbul"))
    second = first.replace(fold=1)
    assert (
        roundtrip(second, dt.datetime).timestamp() - roundtrip(first, dt.datetime).timestamp()
        == 3600
    )


def test_datetimes_written_before_zone_keys_still_decode() -> None:
    assert _codec.from_data("2024-01-02T03:04:05+01:00", dt.datetime) == dt.datetime(
        2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1))
    )


@given(value=st.dates())
def test_dates(value: dt.date) -> None:
    assert roundtrip(value, dt.date) == value


@given(value=st.sampled_from(Color) | st.sampled_from(Level))
def test_enums(value: enum.Enum) -> None:
    assert roundtrip(value, type(value)) is value


@given(value=tickets)
def test_attrs_classes(value: Ticket) -> None:
    assert roundtrip(value, Ticket) == value


@given(value=points)
def test_dataclasses(value: Point) -> None:
    assert roundtrip(value, Point) == value


@given(value=nested)
def test_nested_containers(value: Nested) -> None:
    assert roundtrip(value, Nested) == value
    assert roundtrip([value, value], list[Nested]) == [value, value]
    assert roundtrip({"k": (value,)}, dict[str, tuple[Nested, ...]]) == {"k": (value,)}


@given(value=st.tuples(st.integers(), texts), as_list=st.booleans())
def test_tuples_and_lists(value: tuple[int, str], as_list: bool) -> None:
    # What comes back is what the annotation names; under `Any`, what JSON gives.
    assert roundtrip(value, tuple[int, str]) == value
    assert roundtrip(list(value), Any) == list(value)
    assert roundtrip(value, Any) == list(value)


@given(value=st.frozensets(st.integers(), max_size=5))
def test_sets(value: frozenset[int]) -> None:
    assert roundtrip(value, frozenset[int]) == value
    assert roundtrip(set(value), set[int]) == set(value)


@given(value=nested)
def test_roundtrip_gives_data_and_value(value: Nested) -> None:
    data, back = _codec.roundtrip(value, Nested)
    assert back == value
    assert _codec.from_data(json.loads(_codec.dumps(data)), Nested) == value


@pytest.mark.parametrize("value", [None, True, 0, -3, 1.5, "x"])
def test_primitives_skip_the_text_round_trip(value: Any) -> None:
    data, back = _codec.roundtrip(value, Any)
    assert data is value
    assert back is value


# --- refusals -----------------------------------------------------------------------------

HINT = (
    r"\. Values crossing steps must be builtins, attrs classes, dataclasses, enums, datetimes, "
    r"bytes or containers of these$"
)


class Opaque:
    pass


@attrs.frozen
class Holder:
    inside: Any


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (Opaque(), r"^cannot encode value of type test_codec\.Opaque"),
        (
            {"reply": [1, Opaque()]},
            r"^cannot encode value of type dict: \['reply'\]\[1\] is a test_codec\.Opaque",
        ),
        (
            Holder(Opaque()),
            r"^cannot encode value of type test_codec\.Holder: \.inside is a test_codec\.Opaque",
        ),
        ({(1, 2): "x"}, r"^cannot encode value of type dict: key \(1, 2\) is a tuple"),
        (lambda: 1, r"^cannot encode value of type function"),
        (1j, r"^cannot encode value of type complex"),
    ],
)
def test_unencodable_values_are_named(value: Any, match: str) -> None:
    with pytest.raises(fd.CodecError, match=match + HINT):
        _codec.encode(value)


def test_what_is_named_in_the_message() -> None:
    with pytest.raises(fd.CodecError, match=r"^cannot encode the result of 'draft' of type "):
        _codec.to_data(Opaque(), what="the result of 'draft'")


DECODE_HINT = r"\. The stored data does not fit the annotated type; check the step's annotation$"


@pytest.mark.parametrize(
    ("text", "tp", "match"),
    [
        (
            '{"name": "a", "weight": 1.0, "extra": 1}',
            Tag,
            r"^cannot decode value as test_codec\.Tag: extra fields found \(extra\) @ \$",
        ),
        (
            '{"name": "a", "weight": "heavy"}',
            Tag,
            r"^cannot decode value as test_codec\.Tag: invalid value for type, expected float "
            r"@ \$\.weight",
        ),
        ('"purple"', Color, r"^cannot decode value as test_codec\.Color: "),
        ('"x"', int, r"^cannot decode value as int: "),
    ],
)
def test_data_that_does_not_fit_is_refused(text: str, tp: Any, match: str) -> None:
    with pytest.raises(fd.CodecError, match=match + ".*" + DECODE_HINT):
        _codec.decode(text, tp)


class _Rules(dt.tzinfo):
    """A zone with daylight saving that is not a ZoneInfo (as pytz's and dateutil's are)."""

    def utcoffset(self, value: dt.datetime | None) -> dt.timedelta | None:
        return None if value is None else dt.timedelta(hours=1 + (4 <= value.month <= 9))

    def dst(self, value: dt.datetime | None) -> dt.timedelta | None:
        return None

    def tzname(self, value: dt.datetime | None) -> str:
        return "Rules"


def test_a_zone_without_a_key_is_refused_where_it_is_encoded() -> None:
    with pytest.raises(
        fd.CodecError,
        match=r"^cannot encode value of type test_codec\.Holder: \.inside is a datetime\.datetime"
        r"\. "
        r"Use zoneinfo\.ZoneInfo\('Area/City'\) \(its key is kept\) or a fixed "
        r"datetime\.timezone offset$",
    ):
        _codec.encode(Holder(dt.datetime(2024, 6, 1, tzinfo=_Rules())))


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        ("2024-01-02T03:04:05+01:00[Mars/Olympus_Mons]", "unknown time zone 'Mars/Olympus_Mons'"),
        ("2024-01-02T03:04:05+01:00[America]", "unknown time zone 'America'"),  # a directory
        ("2024-01-02T03:04:05+01:00[leapseconds]", "unknown time zone 'leapseconds'"),  # no TZif
        ("2024-01-02T03:04:05+01:00[../../etc/passwd]", "is not an IANA time zone key"),
        ("2024-01-02T03:04:05+01:00[/etc/passwd]", "is not an IANA time zone key"),
        ("2024-01-02T03:04:05+01:00[os.path]", "is not an IANA time zone key"),
        ("2024-01-02T03:04:05+01:00[]", "is not an IANA time zone key"),
        ("2024-01-02T03:04:05[Europe/Paris]", "comes without a UTC offset"),
        ("2024-01-02T03:04:05+01:00[Europe/Paris][fold=2]", "not an ISO 8601 datetime"),
        ("2024-01-02T03:04:05+01:00[Europe/Paris][x]", "not an ISO 8601 datetime"),
        ("tomorrow", "Invalid isoformat string"),
        (1704164645, "expected an ISO 8601 string, got int"),
    ],
)
def test_untrusted_datetimes_are_refused(data: Any, detail: str) -> None:
    with pytest.raises(
        fd.CodecError, match=r"^cannot decode value as datetime\.datetime: .*"
    ) as info:
        _codec.from_data(data, dt.datetime)
    assert detail in str(info.value)


@pytest.mark.parametrize("text", ["not json", "[1, 2", b"\xff\xfe"])
def test_malformed_json_is_refused(text: str | bytes) -> None:
    with pytest.raises(fd.CodecError, match=r"^malformed JSON data: "):
        _codec.loads(text)


def test_decoding_never_builds_a_type_the_data_names() -> None:
    text = '{"__class__": "os.system", "py/object": "builtins.eval", "args": ["id"]}'
    assert _codec.decode(text, Any) == json.loads(text)
    with pytest.raises(fd.CodecError):
        _codec.decode(text, Tag)


def test_codec_error_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        _codec.encode(Opaque())
