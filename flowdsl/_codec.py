"""The one codec every value crosses: cattrs over JSON-compatible data.

Step arguments, step results, flow inputs and flow results are *encoded* (unstructured by
cattrs, then checked to be JSON text) and *decoded* (parsed, then structured by cattrs into
the type a signature names).  Real-time runs pass values through the same round trip as
batch runs, so a value that would not survive a queue fails in a notebook first.

Nothing here ever executes code found in the data: decoding only builds the type the
caller names (a step's return annotation), never a type named by the data.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import zoneinfo
from typing import Any, Final, get_args, get_origin

import attrs
import cattrs
import cattrs.cols
from cattrs.preconf.json import make_converter

from ._errors import CodecError

__all__ = [
    "MAX_INT_DIGITS",
    "arguments_to_data",
    "decode",
    "dumps",
    "encode",
    "from_data",
    "loads",
    "to_data",
]

converter: Final = make_converter(forbid_extra_keys=True)

#: The longest integer (in decimal digits) that crosses the codec: Python's own limit on
#: converting integers to text, which every reader of the JSON (Python's) would refuse.
MAX_INT_DIGITS: Final = 4300
# An integer under this many bits has at most MAX_INT_DIGITS digits (a cheap test).
_MAX_INT_BITS: Final = int(MAX_INT_DIGITS * 3.3219)


def _too_long(value: int) -> bool:
    if value.bit_length() <= _MAX_INT_BITS:
        return False
    try:
        return len(str(abs(value))) > MAX_INT_DIGITS
    except ValueError:
        return True


def _strict(tp: type, accepts: tuple[type, ...]) -> Any:
    # cattrs structures primitives by calling the type (str([1, 2]) == "[1, 2]"): data
    # read back from a store must already be what the annotation says, or it is refused.
    def structure(value: Any, cl: Any) -> Any:
        if cl is not tp:
            # A subclass (an IntEnum, a StrEnum) reached this hook through the class
            # hierarchy: build it, which refuses values that are not its members.
            return cl(value)
        if type(value) not in accepts:
            raise TypeError(f"expected {tp.__name__}, got {type(value).__name__}")
        return value if type(value) is tp else tp(value)

    return structure


for _tp, _accepts in (
    (str, (str,)),
    (int, (int,)),
    (float, (float, int)),
    (bool, (bool,)),
):
    converter.register_structure_hook(_tp, _strict(_tp, _accepts))


# Datetimes: ISO 8601 text, then the IANA zone key in brackets (as RFC 9557 and java.time
# write it) when the zone is a ZoneInfo, then "[fold=1]" when fold is set.  A ZoneInfo
# datetime *is* a wall time, a key and a fold, and the UTC offset alone cannot give back
# the key nor, outside ambiguous or skipped hours, the fold; comparing a ZoneInfo datetime
# with a fixed-offset one at an ambiguous hour is always unequal.  The offset is written
# for readers; on decoding, the wall time and the key win (the zone's rules may have
# changed since), exactly as Python treats a ZoneInfo datetime.
_ZONE_KEY: Final = re.compile(r"[A-Za-z0-9_+\-]{1,64}(?:/[A-Za-z0-9_+\-]{1,64}){0,3}")
_DATETIME: Final = re.compile(
    r"(?P<iso>[^\[\]]{1,64})(?:\[(?P<zone>[^\[\]=]*)\])?(?P<fold>\[fold=1\])?"
)


def _unstructure_datetime(value: dt.datetime) -> str:
    text = value.isoformat()
    tz = value.tzinfo
    if isinstance(tz, zoneinfo.ZoneInfo) and tz.key is not None and _ZONE_KEY.fullmatch(tz.key):
        text += f"[{tz.key}]"
    elif tz is not None and tz.utcoffset(None) is None:
        # A zone with rules that is not a keyed ZoneInfo (pytz, dateutil, ZoneInfo.from_file):
        # as a fixed offset it would come back as a different value.
        raise CodecError(
            f"cannot encode the datetime {value.isoformat()}: its time zone {tz!r} is neither "
            "a fixed offset nor a ZoneInfo with an IANA key",
            hint="Use zoneinfo.ZoneInfo('Area/City') (its key is kept) or a fixed "
            "datetime.timezone offset",
        )
    return text + "[fold=1]" if value.fold else text


def _structure_datetime(data: Any, _: Any) -> dt.datetime:
    if type(data) is not str:
        raise TypeError(f"expected an ISO 8601 string, got {type(data).__name__}")
    match = _DATETIME.fullmatch(data)
    if match is None:
        raise ValueError(f"not an ISO 8601 datetime: {data[:100]!r}")
    value = dt.datetime.fromisoformat(match["iso"])
    key = match["zone"]
    if key is not None:
        if value.tzinfo is None:
            raise ValueError(f"the zone {key!r} comes without a UTC offset")
        value = value.replace(tzinfo=_zone(key))
    return value.replace(fold=1) if match["fold"] else value


def _zone(key: str) -> zoneinfo.ZoneInfo:
    # The key comes from stored data.  ZoneInfo itself refuses absolute paths and "..";
    # the pattern also keeps out dots, so a key can only name a file under the zoneinfo
    # directories or a data package inside tzdata, never any other file or module.
    if not _ZONE_KEY.fullmatch(key):
        raise ValueError(f"{key[:100]!r} is not an IANA time zone key")
    try:
        return zoneinfo.ZoneInfo(key)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(
            f"unknown time zone {key!r} (this machine's time zone data lacks it; "
            "`pip install tzdata` brings a current copy)"
        ) from exc


converter.register_unstructure_hook(dt.datetime, _unstructure_datetime)
converter.register_structure_hook(dt.datetime, _structure_datetime)


def _require(expected: tuple[type, ...], what: str, inner: Any) -> Any:
    def structure(value: Any, cl: Any) -> Any:
        if type(value) not in expected:
            raise TypeError(f"expected {what}, got {type(value).__name__}")
        return inner(value, cl)

    return structure


def _sequence_hook(tp: Any, conv: Any) -> Any:
    # cattrs structures any iterable as a list: a dict gives its keys, a string its
    # characters. JSON has arrays for sequences, so anything else was not written by us.
    args = get_args(tp)
    if get_origin(tp) is tuple or tp is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            inner = cattrs.cols.homogenous_tuple_structure_factory(tp, conv)
        else:
            item_hooks = [conv.get_structure_hook(a) for a in args]

            def inner(value: Any, _: Any) -> Any:
                if item_hooks and len(value) != len(item_hooks):
                    raise ValueError(f"expected {len(item_hooks)} items, got {len(value)}")
                if not item_hooks:
                    return tuple(value)
                return tuple(h(v, a) for h, v, a in zip(item_hooks, value, args, strict=True))
    else:
        inner = cattrs.cols.list_structure_factory(tp, conv)
    return _require((list, tuple), "a JSON array", inner)


def _mapping_hook(tp: Any, conv: Any) -> Any:
    return _require((dict,), "a JSON object", cattrs.cols.mapping_structure_factory(tp, conv))


converter.register_structure_hook_factory(
    lambda t: (
        (cattrs.cols.is_mutable_sequence(t) or cattrs.cols.is_sequence(t))
        and not cattrs.cols.is_namedtuple(t)
        and t is not str
        and t is not bytes
    ),
    _sequence_hook,
)
converter.register_structure_hook_factory(
    lambda t: cattrs.cols.is_mapping(t) and not cattrs.cols.is_defaultdict(t), _mapping_hook
)

_PRIMITIVES: Final = frozenset({str, int, float, bool, type(None)})
_utf8_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=True)
_dumps_ascii = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=True).encode
_make_encoder: Any = getattr(json.encoder, "c_make_encoder", None)


def _dumps_utf8(data: Any) -> str:
    # What _utf8_encoder.encode(data) does, less the frames around it: the C encoder made
    # with the same settings and a fresh dict of markers (the circular-reference check).
    if _make_encoder is None:  # pragma: no cover - Pythons without the C accelerator
        return _utf8_encoder.encode(data)
    chunks = _make_encoder(
        {},
        _utf8_encoder.default,
        json.encoder.encode_basestring,
        None,
        ":",
        ",",
        False,
        False,
        True,
    )(data, 0)
    return "".join(chunks)


def _dumps(data: Any) -> str:
    text = _dumps_utf8(data)
    if not text.isascii():
        # A lone surrogate (from a decoded byte string, say) cannot be UTF-8 encoded, so
        # no file or broker could carry the text; escaped, it parses back the same.
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return _dumps_ascii(data)
    return text


_decoder = json.JSONDecoder()
_decode = _decoder.decode
_scan: Any = _decoder.scan_once  # type: ignore[attr-defined]


def _loads(text: str) -> Any:
    # The scanner decode() runs once it has skipped leading whitespace, called directly:
    # text that starts with its value and ends with it (all that flowdsl writes) parses
    # without decode()'s two frames and two whitespace matches.  Anything else goes
    # through decode(), which parses it or says why it cannot.
    try:
        value, end = _scan(text, 0)
    except (ValueError, StopIteration):
        return _decode(text)
    return value if end == len(text) else _decode(text)


_HINT: Final = (
    "Values crossing steps must be builtins, attrs classes, dataclasses, enums, "
    "datetimes, bytes or containers of these"
)


def to_data(value: object, *, what: str = "value") -> Any:
    """Unstructure *value* into JSON-compatible data, or raise :class:`CodecError`."""
    cls = type(value)
    if cls in _PRIMITIVES:
        if cls is int and _too_long(value):  # type: ignore[arg-type]
            raise _long_int(what)
        return value
    return _unstructured(value, what)[0]


def arguments_to_data(
    args: tuple[Any, ...], kwargs: dict[str, Any], node: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """:func:`to_data` of node *node*'s arguments, each named in its error."""
    data = tuple(
        [
            value
            if (cls := type(value)) in _TEXT_OR_FLOAT
            or (cls is int and value.bit_length() <= _MAX_INT_BITS)
            else to_data(value, what=f"an argument of {node!r}")
            for value in args
        ]
    )
    if not kwargs:
        return data, {}
    return data, {
        k: to_data(value, what=f"argument {k!r} of {node!r}") for k, value in kwargs.items()
    }


# What to_data gives back as it is, whatever its value (an integer may be too long).
_TEXT_OR_FLOAT: Final = frozenset({str, float, bool, type(None)})


def _unstructured(value: object, what: str) -> tuple[Any, str]:
    """*value* unstructured, and its JSON text; or :class:`CodecError`."""
    try:
        data = converter.unstructure(value)
        # Validate by serializing: cattrs passes unknown objects through untouched.
        text = _dumps(data)
    except RecursionError:
        raise CodecError(
            f"cannot encode {what} of type {_type_name(value)}: it contains itself (a "
            "recursive structure) or is nested too deeply",
            hint=_HINT,
        ) from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):
            raise _long_int(what) from None
        if "Circular reference" in str(exc):
            raise CodecError(
                f"cannot encode {what} of type {_type_name(value)}: it contains itself "
                "(a recursive structure)",
                hint=_HINT,
            ) from None
        raise _unencodable(value, what, exc) from exc
    except (TypeError, cattrs.BaseValidationError) as exc:
        raise _unencodable(value, what, exc) from exc
    return data, text


def _long_int(what: str) -> CodecError:
    return CodecError(
        f"cannot encode {what}: an integer of more than {MAX_INT_DIGITS} digits",
        hint="Pass so large a number as text (str), or split it",
    )


def _unencodable(value: object, what: str, exc: BaseException) -> CodecError:
    try:
        culprit = _culprit(value)
    except RecursionError:
        culprit = ": it contains itself (a recursive structure) or is nested too deeply"
    # A hook's own hint (a datetime's zone) says more than the general one.
    hint = exc.hint if isinstance(exc, CodecError) and exc.hint else _HINT
    return CodecError(f"cannot encode {what} of type {_type_name(value)}{culprit}", hint=hint)


def _culprit(value: object) -> str:
    """Where inside a container the value that cannot be encoded sits, if it is inside one."""
    found = _find_unencodable(value, "")
    if found is None or found[0] == "":
        return ""
    path, leaf = found
    return f": {path} is a {_type_name(leaf)}"


def _find_unencodable(value: object, path: str) -> tuple[str, object] | None:
    if isinstance(value, list | tuple | set | frozenset):
        for i, item in enumerate(value):
            found = _find_unencodable(item, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | int | float | bool | type(None)):
                return (f"{path} key" if path else "key") + f" {key!r}", key
            found = _find_unencodable(item, f"{path}[{key!r}]")
            if found is not None:
                return found
        return None
    fields = _fields_of(value)
    if fields is not None:
        for name in fields:
            found = _find_unencodable(getattr(value, name), f"{path}.{name}")
            if found is not None:
                return found
        return None
    try:
        _dumps(converter.unstructure(value))
    except (TypeError, ValueError, cattrs.BaseValidationError):
        return path, value
    return None


def _fields_of(value: object) -> list[str] | None:
    cls = type(value)
    if attrs.has(cls):
        return [f.name for f in attrs.fields(cls)]
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return None


def from_data(data: Any, tp: Any, *, what: str = "value") -> Any:
    """Structure JSON-compatible *data* as *tp*, or raise :class:`CodecError`."""
    if tp is Any or tp is object:
        return data
    if tp in _PRIMITIVES and type(data) is tp:
        return data
    try:
        return converter.structure(data, tp)
    except Exception as exc:  # cattrs raises many kinds; all mean "does not fit"
        detail = (
            "; ".join(cattrs.transform_error(exc))
            if isinstance(exc, cattrs.BaseValidationError)
            else str(exc)
        )
        raise CodecError(
            f"cannot decode {what} as {_type_name_of_type(tp)}: {detail}",
            hint="The stored data does not fit the annotated type; check the step's annotation",
        ) from exc


def dumps(data: Any) -> str:
    """JSON text of already-unstructured *data*."""
    return _dumps(data)


def loads(text: str | bytes) -> Any:
    """Parse JSON text; a parse failure is a :class:`CodecError`."""
    try:
        return _loads(text if isinstance(text, str) else text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"malformed JSON data: {exc}") from exc
    except RecursionError:
        raise CodecError("malformed JSON data: nested too deeply") from None


def encode(value: object, *, what: str = "value") -> str:
    """*value* as JSON text."""
    return _encoded(value, what)[1]


def _encoded(value: object, what: str) -> tuple[Any, str]:
    """:func:`to_data` of *value*, and its JSON text (encoded once)."""
    if type(value) in _PRIMITIVES:
        data = to_data(value, what=what)
        return data, _dumps(data)
    return _unstructured(value, what)


def decode(text: str | bytes, tp: Any, *, what: str = "value") -> Any:
    """JSON text back into *tp*."""
    return from_data(loads(text), tp, what=what)


def roundtrip(value: object, tp: Any, *, what: str = "value") -> tuple[Any, Any]:
    """Encode *value* and decode it as *tp*: returns ``(data, decoded)``.

    What a downstream node receives in real time is exactly what it would receive after
    the value crossed a queue or a store; primitives skip the text round trip since it
    cannot change them.
    """
    cls = type(value)
    if cls in _PRIMITIVES and (tp is Any or tp is object or tp is cls or cls is type(None)):
        if cls is int and _too_long(value):  # type: ignore[arg-type]
            raise _long_int(what)
        return value, value
    if isinstance(value, list) and cls is list and _list_of_primitives(value, tp):
        # A fan-in's list of plain values: a copy is what the round trip would give.
        return list(value), list(value)
    data, text = _encoded(value, what)
    return data, from_data(_loads(text), tp, what=what)


_STR_OR_INT = frozenset({str, int})


def _list_of_primitives(value: list[Any], tp: Any) -> bool:
    """Whether *value* crosses the codec unchanged as *tp* (``Any``, or ``list[X]`` of
    str or int items; floats are left to the codec for NaN's sake)."""
    if tp is Any or tp is object or tp is list:
        allowed: Any = _STR_OR_INT
    elif get_origin(tp) is list and get_args(tp) in ((int,), (str,)):
        allowed = {get_args(tp)[0]}
    else:
        return False
    return all(type(item) in allowed for item in value)


def _type_name(value: object) -> str:
    return _type_name_of_type(type(value))


def _type_name_of_type(tp: Any) -> str:
    if isinstance(tp, type):
        module = tp.__module__
        return tp.__qualname__ if module == "builtins" else f"{module}.{tp.__qualname__}"
    return repr(tp)
