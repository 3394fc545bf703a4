"""cape.serdio against serdio 3.1.1: identical bytes, decoding in both directions, lift_io handlers.

serdio's own decoder crashes the interpreter on deeply nested input (see test_nesting_limit),
so no test hands serdio anything nested more than a few dozen levels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import math
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import pytest
import serdio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cape import serdio as ours

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------
# Helpers


def canon(value: Any) -> Any:
    """A comparable form that tells apart types == conflates (1/1.0/True, list/tuple, -0.0)."""
    name = type(value).__name__
    if isinstance(value, set | frozenset):
        return (name, sorted((canon(v) for v in value), key=repr))
    if isinstance(value, list | tuple):
        return (name, [canon(v) for v in value])
    if isinstance(value, dict):
        return (name, [(canon(k), canon(v)) for k, v in value.items()])
    if isinstance(value, float | complex):
        return (name, repr(value))
    return (name, value)


def ext_depth(value: Any) -> int:
    """Extension-type nesting of a value (tuple/set/frozenset one level, complex two)."""
    if isinstance(value, complex):
        return 2
    if isinstance(value, dict):
        children = [*value.keys(), *value.values()]
    elif isinstance(value, list | tuple | set | frozenset):
        children = list(value)
    else:
        return 0
    inner = max((ext_depth(child) for child in children), default=0)
    return inner + (0 if isinstance(value, list | dict) else 1)


def envelope(args: Any, **extra: Any) -> bytes:
    blob: bytes = msgpack.packb({ours.ARGS_KEY: args, **extra})
    return blob


def ext_tuple(*items: Any) -> msgpack.ExtType:
    return msgpack.ExtType(2, msgpack.packb(list(items)))


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float


@dataclasses.dataclass
class Box:
    label: str
    corners: tuple[Point, Point]


def encode_custom(obj: Any) -> Any:
    if isinstance(obj, Point):
        return {"__type__": "Point", "fields": {"x": obj.x, "y": obj.y}}
    if isinstance(obj, Box):
        return {"__type__": "Box", "fields": {"label": obj.label, "corners": obj.corners}}
    return obj


def decode_custom(obj: dict[Any, Any]) -> Any:
    kind = obj.get("__type__")
    if kind == "Point":
        return Point(**obj["fields"])
    if kind == "Box":
        return Box(**obj["fields"])
    return obj


class Pair(NamedTuple):
    left: int
    right: int


class Color(enum.IntEnum):
    RED = 1


# --------------------------------------------------------------------------------------------
# Strategies

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
floats = st.floats(allow_nan=False)
leaves = st.none() | st.booleans() | ints | floats | st.text(max_size=20) | st.binary(max_size=20)
hashables = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)
values = st.recursive(
    leaves | st.complex_numbers(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=6) | st.binary(max_size=6), inner, max_size=4)
        | st.sets(hashables, max_size=4)
        | st.frozensets(hashables, max_size=4)
    ),
    max_leaves=16,
)
kwarg_names = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda name: name != "encoder"
)
points = st.builds(Point, ints, floats)
custom_values = st.recursive(
    leaves | points,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
        | st.builds(Box, st.text(max_size=6), st.tuples(points, points))
    ),
    max_leaves=12,
)


# --------------------------------------------------------------------------------------------
# Wire format: identical bytes, decoding in both directions

MATRIX: list[Any] = [
    0,
    1,
    -1,
    127,
    128,
    255,
    256,
    -32,
    -33,
    -128,
    -129,
    2**16,
    2**31,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**31),
    -(2**63),
    0.0,
    -0.0,
    1.5,
    1e308,
    5e-324,
    math.inf,
    -math.inf,
    None,
    True,
    False,
    "",
    "héllo ✓",
    "x" * 40,
    "x" * 300,
    "x" * 70_000,
    b"",
    b"\x00\xff",
    b"x" * 300,
    b"x" * 70_000,
    [],
    {},
    (),
    [1, [2, [3, []]]],
    (1, (2.0, ("three", ())), None),
    {"a": 1, "b": [1, 2, {"c": (3, 4)}], b"raw": b"bytes"},
    [(1, 2)] * 20,
    tuple(range(20)),
    1 + 2j,
    complex(0.0, -0.0),
    complex(math.inf, -1),
    [1j, (2j, 3j)],
    {1, 2, 3},
    {"a", (1, 2), frozenset({None})},
    frozenset({1.5, b"x"}),
    set(),
    frozenset(),
    {"nested": {"set": {1, 2}, "frozen": frozenset({(1,)})}},
]


@pytest.mark.parametrize("value", MATRIX, ids=lambda v: type(v).__name__)
def test_single_value_bytes_match_and_round_trip(value: Any) -> None:
    blob = ours.serialize(value)
    assert blob == serdio.serialize(value)
    assert canon(ours.deserialize(blob)) == canon(value)
    assert canon(serdio.deserialize(blob)) == canon(value)


@pytest.mark.parametrize("value", MATRIX, ids=lambda v: type(v).__name__)
def test_value_as_kwarg_and_among_args_bytes_match(value: Any) -> None:
    blob = ours.serialize(1, value, "z", kw=value, other=None)
    assert blob == serdio.serialize(1, value, "z", kw=value, other=None)
    for decode in (ours.deserialize, serdio.deserialize):
        args, kwargs = decode(blob, as_signature=True)
        assert canon(tuple(args)) == canon((1, value, "z"))
        assert canon(kwargs) == canon({"kw": value, "other": None})


def test_documented_example_bytes() -> None:
    expected = (
        b"\x82\xad_serdio_args_\xc7\x0b\x02\x92\x02\xcb" + bytes.fromhex("4008000000000000")
    ) + (b"\xaf_serdio_kwargs_\x81\xa1b\xcb" + bytes.fromhex("4000000000000000"))
    assert ours.serialize(2, 3.0, b=2.0) == expected
    assert serdio.serialize(2, 3.0, b=2.0) == expected
    assert ours.deserialize(expected) == (2, 3.0)
    assert ours.deserialize(expected, as_signature=True) == ((2, 3.0), {"b": 2.0})


def test_empty_args_and_return_shapes() -> None:
    empty = ours.serialize()
    assert empty == serdio.serialize() == b"\x81\xad_serdio_args_\xd4\x02\x90"
    assert ours.deserialize(empty) == () == serdio.deserialize(empty)
    assert ours.deserialize(empty, as_signature=True) == ((), {})
    only_kwargs = ours.serialize(a=1)
    assert only_kwargs == serdio.serialize(a=1)
    assert ours.deserialize(only_kwargs) == ()  # keyword values dropped, as in serdio
    assert ours.deserialize(ours.serialize([1, 2])) == [1, 2]  # one value: the value itself
    assert ours.deserialize(ours.serialize(1, 2)) == (1, 2)


def test_nan_bytes_match() -> None:
    blob = ours.serialize(math.nan, [math.nan], complex(math.nan, 1))
    assert blob == serdio.serialize(math.nan, [math.nan], complex(math.nan, 1))
    first, (second,), third = ours.deserialize(blob)
    assert math.isnan(first) and math.isnan(second) and math.isnan(third.real)


def test_other_python_types_msgpack_packs_natively() -> None:
    for value in (bytearray(b"ab"), memoryview(b"ab")):
        blob = ours.serialize(value)
        assert blob == serdio.serialize(value)
        assert ours.deserialize(blob) == b"ab" == serdio.deserialize(blob)
    pair = Pair(1, 2)  # a tuple subclass: serdio sends it as a plain tuple
    assert ours.serialize(pair) == serdio.serialize(pair)
    assert ours.deserialize(ours.serialize(pair)) == (1, 2)
    stamp = msgpack.Timestamp(5, 6)  # msgpack's own extension (-1) passes, as in serdio
    assert ours.serialize([stamp]) == serdio.serialize([stamp])
    assert ours.deserialize(ours.serialize([stamp])) == [stamp]


@PROPERTY
@given(st.lists(values, max_size=4), st.dictionaries(kwarg_names, values, max_size=3))
def test_property_bytes_match_serdio(args: list[Any], kwargs: dict[str, Any]) -> None:
    assume(ext_depth(tuple(args)) <= ours.MAX_NESTING_DEPTH)
    assume(ext_depth(kwargs) < ours.MAX_NESTING_DEPTH)
    blob = ours.serialize(*args, **kwargs)
    assert blob == serdio.serialize(*args, **kwargs)
    expected = canon((tuple(args), kwargs))
    assert canon(ours.deserialize(blob, as_signature=True)) == expected
    got_args, got_kwargs = serdio.deserialize(blob, as_signature=True)
    assert canon((tuple(got_args), got_kwargs)) == expected


@PROPERTY
@given(values)
def test_property_single_value_both_directions(value: Any) -> None:
    assume(ext_depth(value) < ours.MAX_NESTING_DEPTH)
    theirs = serdio.serialize(value)
    assert ours.serialize(value) == theirs
    assert canon(ours.deserialize(theirs)) == canon(value)
    assert canon(serdio.deserialize(ours.serialize(value))) == canon(value)


# --------------------------------------------------------------------------------------------
# Custom-type hooks

CUSTOM: list[Any] = [
    Point(2, 3.0),
    [Point(1, 1.0), {"p": Point(2, 2.0)}],
    (Point(1, 1.0), (Point(2, 2.0),)),
    Box("b", (Point(0, 0.0), Point(1, 1.0))),
    {"classes": (Point(2, 3.0), Point(4, 6.0)), "set": {Point(5, 5.0)}},
]


@pytest.mark.parametrize("value", CUSTOM, ids=lambda v: type(v).__name__)
def test_custom_hooks_bytes_match_and_round_trip(value: Any) -> None:
    blob = ours.serialize(value, 7, encoder=encode_custom)
    assert blob == serdio.serialize(value, 7, encoder=encode_custom)
    assert ours.deserialize(blob, decoder=decode_custom) == (value, 7)
    assert serdio.deserialize(blob, decoder=decode_custom) == (value, 7)


@PROPERTY
@given(st.lists(custom_values, max_size=4))
def test_property_custom_hooks_bytes_match(args: list[Any]) -> None:
    blob = ours.serialize(*args, encoder=encode_custom)
    assert blob == serdio.serialize(*args, encoder=encode_custom)
    expected = canon(tuple(args))
    assert canon(ours.deserialize(blob, decoder=decode_custom, as_signature=True)[0]) == expected
    assert canon(tuple(serdio.deserialize(blob, decoder=decode_custom, as_signature=True)[0])) == (
        expected
    )


def test_encoder_sees_builtin_conversions_first_as_in_serdio() -> None:
    # serdio turns tuples (and tuple subclasses) into extension 2 before calling the encoder,
    # so an encoder for a NamedTuple never sees it; identical bytes need the same order.
    seen: list[type] = []

    def encode_pair(obj: Any) -> Any:
        seen.append(type(obj))
        if isinstance(obj, Pair):
            return {"__type__": "Pair"}
        return obj

    blob = ours.serialize([Pair(1, 2)], encoder=encode_pair)
    assert seen == [msgpack.ExtType]  # the args tuple is never given to the encoder
    assert blob == serdio.serialize([Pair(1, 2)], encoder=encode_pair)
    assert ours.deserialize(blob) == [(1, 2)]


def test_custom_keyword_value_serdio_cannot_encode_but_can_decode() -> None:
    with pytest.raises(TypeError):
        serdio.serialize(1, p=Point(1, 2.0), encoder=encode_custom)
    blob = ours.serialize(1, p=Point(1, 2.0), encoder=encode_custom)
    expected = ((1,), {"p": Point(1, 2.0)})
    assert serdio.deserialize(blob, decoder=decode_custom, as_signature=True) == expected
    assert ours.deserialize(blob, decoder=decode_custom, as_signature=True) == expected


def test_encoder_may_return_a_tuple() -> None:
    def as_tuple(obj: Any) -> Any:
        return ("Point", obj.x, obj.y) if isinstance(obj, Point) else obj

    with pytest.raises(TypeError):
        serdio.serialize([Point(1, 2.0)], encoder=as_tuple)
    blob = ours.serialize([Point(1, 2.0)], encoder=as_tuple)
    assert ours.deserialize(blob) == [("Point", 1, 2.0)] == serdio.deserialize(blob)


def test_decoder_is_not_given_the_envelope() -> None:
    seen: list[dict[Any, Any]] = []

    def record(obj: dict[Any, Any]) -> Any:
        seen.append(dict(obj))
        return obj

    blob = ours.serialize({"a": 1}, k={"b": 2})
    assert ours.deserialize(blob, decoder=record, as_signature=True) == (
        ({"a": 1},),
        {"k": {"b": 2}},
    )
    assert seen == [{"a": 1}, {"b": 2}, {"k": {"b": 2}}]


def test_decoder_value_error_becomes_serdio_error() -> None:
    def refuse(obj: dict[Any, Any]) -> Any:
        raise ValueError("no maps today")

    with pytest.raises(ours.SerdioError, match="no maps today") as info:
        ours.deserialize(ours.serialize({"a": 1}), decoder=refuse)
    assert isinstance(info.value.__cause__, ValueError)


def test_encoder_returning_unsupported_type_names_both_types() -> None:
    with pytest.raises(TypeError, match=r"Point.*datetime"):
        ours.serialize(Point(1, 2.0), encoder=lambda obj: datetime.datetime(2020, 1, 1))


def test_hook_bundle_and_bundle_hooks() -> None:
    bundle = ours.HookBundle(encode_custom, decode_custom)
    assert bundle.unbundle() == (encode_custom, decode_custom)
    assert ours.bundle_hooks(bundle) is bundle
    assert ours.bundle_hooks((encode_custom, decode_custom)) == bundle
    assert ours.bundle_hooks(None) is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.encoder = decode_custom  # type: ignore[misc]
    with pytest.raises(TypeError, match="encoder hook must be callable"):
        ours.HookBundle(1, decode_custom)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="hook bundle must be"):
        ours.bundle_hooks({"encoder_hook": encode_custom})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 3 items"):
        ours.bundle_hooks((encode_custom, decode_custom, decode_custom))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Serialization errors


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (object(), "object"),
        (Color.RED, "Color"),
        (OrderedDict(a=1), "OrderedDict"),
        (datetime.date(2020, 1, 1), "datetime.date"),
        (Point(1, 2.0), "Point"),
    ],
)
def test_unsupported_type_is_a_type_error_naming_it(value: Any, type_name: str) -> None:
    with pytest.raises(TypeError, match=type_name):
        ours.serialize(value)
    with pytest.raises(TypeError, match=type_name):
        ours.serialize(k=[value])
    with pytest.raises(TypeError):
        serdio.serialize(value)


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1])
def test_integer_out_of_range(value: int) -> None:
    for serialize in (ours.serialize, serdio.serialize):
        with pytest.raises(OverflowError):
            serialize(value)
        with pytest.raises(OverflowError):
            serialize(k=[value])
        with pytest.raises(OverflowError):
            serialize(
                [Point(value, 1.0)], encoder=lambda obj: obj.x if isinstance(obj, Point) else obj
            )
    # an encoder may turn a big int into something serializable
    big = lambda obj: str(obj) if type(obj) is int else obj  # noqa: E731
    assert ours.serialize([value], encoder=big) == serdio.serialize([value], encoder=big)


def test_dict_keys_serdio_cannot_decode() -> None:
    # Both encode an int- or tuple-keyed dict; neither decodes it (msgpack's strict_map_key).
    for value in ({1: "a"}, {(1, 2): "a"}):
        blob = ours.serialize(value)
        assert blob == serdio.serialize(value)
        with pytest.raises(ValueError):
            serdio.deserialize(blob)
        with pytest.raises(ours.SerdioError, match="not allowed for map key"):
            ours.deserialize(blob)


def test_non_callable_hooks() -> None:
    with pytest.raises(TypeError, match="encoder must be callable"):
        ours.serialize(1, encoder=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="decoder must be callable"):
        ours.deserialize(ours.serialize(1), decoder=1)  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------------
# Deserialization errors

VALID = ours.serialize(2, (3.0, {1j}), b=[frozenset({4})])


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (b"", "empty"),
        (b"\xc1", "must be a MessagePack map"),
        (b"\xff\x00garbage", "must be a MessagePack map"),
        (b"this is not serdio", "must be a MessagePack map"),
        (msgpack.packb([1, 2]), "must be a MessagePack map"),
        (msgpack.packb("_serdio_args_"), "must be a MessagePack map"),
        (msgpack.packb({}), "no '_serdio_args_' key"),
        (msgpack.packb({"x": 1}), "unexpected key 'x'"),
        (msgpack.packb({ours.KWARGS_KEY: {}}), "no '_serdio_args_' key"),
        (envelope(ext_tuple(1), extra=1), "unexpected key 'extra'"),
        (msgpack.packb({1: ext_tuple(1)}, strict_types=True), "unexpected key 1"),
        (
            b"\x82"
            + msgpack.packb(ours.ARGS_KEY)
            + msgpack.packb(ext_tuple(1))
            + msgpack.packb(ours.ARGS_KEY)
            + msgpack.packb(ext_tuple(2)),
            "appears twice",
        ),
        (VALID + b"\x00", "1 bytes follow"),
        (envelope(5), "must be a tuple, not int"),
        (envelope({"a": 1}), "must be a tuple, not dict"),
        (envelope(msgpack.ExtType(3, msgpack.packb([1]))), "must be a tuple, not set"),
        (envelope(msgpack.Timestamp(1, 0)), "must be a tuple, not msgpack.*Timestamp"),
        (envelope(msgpack.ExtType(9, b"\x90")), "unknown MessagePack extension type 9"),
        (envelope(ext_tuple(msgpack.ExtType(0, b""))), "extension type 0"),
        (envelope(ext_tuple([msgpack.ExtType(127, b"x")])), "extension type 127"),
        (envelope(msgpack.ExtType(2, b"\xc1")), "malformed"),
        (envelope(msgpack.ExtType(2, b"\x92\x01")), "malformed"),
        (envelope(msgpack.ExtType(2, b"\x90\x90")), "malformed"),
        (envelope(msgpack.ExtType(2, msgpack.packb({"a": 1}))), "must hold an array"),
        (envelope(ext_tuple(msgpack.ExtType(1, msgpack.packb([1, 2, 3])))), "two real"),
        (envelope(ext_tuple(msgpack.ExtType(1, msgpack.packb(["a", "b"])))), "two real"),
        (envelope(ext_tuple(msgpack.ExtType(3, msgpack.packb([[1]])))), "not hashable"),
        (envelope(ext_tuple(msgpack.ExtType(4, msgpack.packb(5)))), "must hold an array"),
        (envelope(ext_tuple(), **{ours.KWARGS_KEY: [1]}), "must be a map with str keys"),
        (envelope(ext_tuple(), **{ours.KWARGS_KEY: {b"k": 1}}), "must be a map with str keys"),
        (envelope(ext_tuple({1: 2})), "not allowed for map key"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_bytes_raise_serdio_error(blob: bytes, message: str) -> None:
    with pytest.raises(ours.SerdioError, match=message):
        ours.deserialize(blob)


def test_every_truncation_is_a_serdio_error() -> None:
    for end in range(len(VALID)):
        with pytest.raises(ours.SerdioError):
            ours.deserialize(VALID[:end])
    with pytest.raises(ours.SerdioError, match="truncated"):
        ours.deserialize(VALID[:-1])


def test_serdio_error_is_a_value_error_not_a_msgpack_error() -> None:
    with pytest.raises(ours.SerdioError) as info:
        ours.deserialize(b"\xc1")
    assert isinstance(info.value, ValueError)
    assert not isinstance(info.value, msgpack.UnpackException)


def test_args_as_plain_array_accepted() -> None:
    assert ours.deserialize(envelope([1, 2])) == (1, 2)


def test_input_types() -> None:
    assert ours.deserialize(bytearray(VALID)) == ours.deserialize(memoryview(VALID))
    with pytest.raises(TypeError, match="must be bytes, not str"):
        ours.deserialize("abc")  # type: ignore[call-overload]


@PROPERTY
@given(values, st.data())
def test_property_corrupted_bytes_decode_or_raise_serdio_error(value: Any, data: Any) -> None:
    assume(ext_depth(value) < ours.MAX_NESTING_DEPTH)
    blob = bytearray(ours.serialize(value))
    for _ in range(data.draw(st.integers(1, 3))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    with contextlib.suppress(ours.SerdioError):
        ours.deserialize(bytes(blob))


@PROPERTY
@given(st.binary(max_size=64))
def test_property_random_bytes_decode_or_raise_serdio_error(blob: bytes) -> None:
    with contextlib.suppress(ours.SerdioError):
        ours.deserialize(blob)


def _nested(depth: int) -> Any:
    value: Any = ()
    for _ in range(depth - 2):  # the args tuple is one level, the innermost () another
        value = (value,)
    return value


def test_nesting_limit() -> None:
    # serdio's decoder takes about 40 KiB of C stack per extension level and segfaults near
    # 190 levels; cape's limit keeps both directions far below that.
    deepest = _nested(ours.MAX_NESTING_DEPTH)
    blob = ours.serialize(deepest)
    assert blob == serdio.serialize(deepest)
    assert ours.deserialize(blob) == deepest == serdio.deserialize(blob)
    with pytest.raises(ValueError, match="nest more than 32 deep"):
        ours.serialize((deepest,))
    deep_complex: Any = 1j  # two levels
    for _ in range(ours.MAX_NESTING_DEPTH - 3):
        deep_complex = (deep_complex,)
    blob = ours.serialize(deep_complex)
    assert blob == serdio.serialize(deep_complex)
    assert ours.deserialize(blob) == deep_complex == serdio.deserialize(blob)
    with pytest.raises(ValueError, match="nest more than 32 deep"):
        ours.serialize((deep_complex,))

    payload = msgpack.packb([])
    for _ in range(ours.MAX_NESTING_DEPTH + 1):
        payload = msgpack.packb(msgpack.ExtType(2, payload))
    with pytest.raises(ours.SerdioError, match="nest more than 32 deep"):
        ours.deserialize(msgpack.packb({ours.ARGS_KEY: msgpack.ExtType(2, payload)}))
    for _ in range(1000):  # far beyond what would crash serdio
        payload = msgpack.packb(msgpack.ExtType(2, payload))
    with pytest.raises(ours.SerdioError, match="nest more than 32 deep"):
        ours.deserialize(msgpack.packb({ours.ARGS_KEY: msgpack.ExtType(2, payload)}))


# --------------------------------------------------------------------------------------------
# lift_io


def scale(x: int, y: float, b: float = 1.0) -> float:
    """Scale and shift."""
    return x * y + b


def identities(x: Any, y: Any, z: Any = 1) -> tuple[Any, Any, Any]:
    return x, y, z


def grow(box: Box, by: Point) -> Box:
    first, second = box.corners
    return Box(box.label + "!", (first, Point(second.x + by.x, second.y + by.y)))


def test_lifted_function_still_calls_as_before() -> None:
    lifted = ours.lift_io(scale)
    assert lifted(2, 3.0) == 7.0
    assert lifted(2, 3.0, b=2.0) == 8.0
    assert lifted.__name__ == "scale"
    assert lifted.__doc__ == "Scale and shift."
    assert lifted.__wrapped__ is scale
    assert lifted.func is scale
    assert lifted.hook_bundle is None


@pytest.mark.parametrize(
    ("func", "args", "kwargs"),
    [
        (scale, (2, 3.0), {"b": 2.0}),
        (scale, (2, 3.0, 0.5), {}),
        (identities, (1, [2, (3, 4j)]), {"z": {5, 6}}),
        (identities, (), {"x": "a", "y": b"b", "z": None}),
    ],
)
def test_handlers_interoperate_with_serdio(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    expected = func(*args, **kwargs)
    our_handler = ours.lift_io(func).as_cape_handler()
    their_handler = serdio.lift_io(func).as_cape_handler()
    their_input = serdio.serialize(*args, **kwargs)
    our_input = ours.serialize(*args, **kwargs)
    assert our_input == their_input

    # ours fed serdio bytes, serdio fed ours: the outputs are the same bytes
    from_ours = our_handler(their_input)
    from_theirs = their_handler(our_input)
    assert from_ours == from_theirs == ours.serialize(expected)
    assert from_ours.startswith(b"\x81\xad_serdio_args_")  # {"_serdio_args_": (result,)}
    assert serdio.deserialize(from_ours) == expected
    assert ours.deserialize(from_theirs) == expected


def test_handlers_with_hooks_interoperate_with_serdio() -> None:
    box, by = Box("b", (Point(0, 0.0), Point(1, 1.0))), Point(2, 2.0)
    expected = grow(box, by)
    their_handler = serdio.lift_io(
        grow, encoder_hook=encode_custom, decoder_hook=decode_custom
    ).as_cape_handler()
    their_input = serdio.serialize(box, by, encoder=encode_custom)
    our_input = ours.serialize(box, by, encoder=encode_custom)
    assert our_input == their_input
    for our_handler in (
        ours.lift_io(
            grow, encoder_hook=encode_custom, decoder_hook=decode_custom
        ).as_cape_handler(),
        ours.lift_io(grow, hook_bundle=(encode_custom, decode_custom)).as_bytes_handler(),
        ours.lift_io(hook_bundle=ours.HookBundle(encode_custom, decode_custom), as_handler=True)(
            grow
        ),
    ):
        from_ours = our_handler(their_input)
        assert from_ours == their_handler(our_input)
        assert serdio.deserialize(from_ours, decoder=decode_custom) == expected
        assert ours.deserialize(from_ours, decoder=decode_custom) == expected


def test_decorator_forms() -> None:
    @ours.lift_io
    def plain(x: int) -> int:
        return x + 1

    @ours.lift_io()
    def called(x: int) -> int:
        return x + 2

    @ours.lift_io(as_handler=True)
    def handler(x: int) -> int:
        return x + 3

    assert plain(1) == 2 and called(1) == 3
    assert ours.deserialize(plain.as_cape_handler()(ours.serialize(1))) == 2
    assert ours.deserialize(called.as_bytes_handler()(ours.serialize(1))) == 3
    assert ours.deserialize(handler(ours.serialize(1))) == 4
    assert ours.deserialize(ours.lift_io(scale, as_handler=True)(ours.serialize(1, 2.0, 3.0))) == 5


def test_argument_count_must_match_every_parameter() -> None:
    handler = ours.lift_io(identities).as_cape_handler()
    cases: list[tuple[tuple[int, ...], dict[str, Any]]] = [
        ((1,), {"z": 4}),
        ((1, 2), {}),
        ((1, 2, 3, 4), {}),
    ]
    for args, kwargs in cases:
        blob = ours.serialize(*args, **kwargs)
        with pytest.raises(ours.ArgumentCountError, match="declares 3 parameter") as info:
            handler(blob)
        assert isinstance(info.value, TypeError)
        assert isinstance(info.value, ValueError)  # what serdio raises
        with pytest.raises(ValueError):
            serdio.lift_io(identities).as_cape_handler()(blob)


def test_handler_rejects_bad_bytes_and_propagates_function_errors() -> None:
    with pytest.raises(ours.SerdioError):
        ours.lift_io(scale).as_cape_handler()(b"\xc1")

    def boom(x: int) -> int:
        raise KeyError(x)

    with pytest.raises(KeyError):
        ours.lift_io(boom).as_cape_handler()(ours.serialize(1))


def test_lift_io_argument_checks() -> None:
    with pytest.raises(ValueError, match="both"):
        ours.lift_io(scale, encoder_hook=encode_custom)
    with pytest.raises(ValueError, match="both"):
        ours.lift_io(scale, decoder_hook=decode_custom)
    with pytest.raises(ValueError, match="not both"):
        ours.lift_io(
            scale,
            encoder_hook=encode_custom,
            decoder_hook=decode_custom,
            hook_bundle=(encode_custom, decode_custom),
        )
    with pytest.raises(TypeError, match="callable"):
        ours.lift_io(scale, encoder_hook=1, decoder_hook=2)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="hook bundle must be"):
        ours.lift_io(scale, hook_bundle=object())  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="needs a callable"):
        ours.lift_io(5)  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------------
# Standalone


def test_module_works_copied_alone_as_cape_serdio(tmp_path: Path) -> None:
    source = Path(ours.__file__).read_text(encoding="utf-8")
    (tmp_path / "cape_serdio.py").write_text(source, encoding="utf-8")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["cape"] = None  # any cape import now fails
        import cape_serdio

        @cape_serdio.lift_io
        def scale(x, y, b=1.0):
            return x * y + b

        blob = cape_serdio.serialize(2, 3.0, b=2.0)
        out = scale.as_cape_handler()(blob)
        assert cape_serdio.deserialize(out) == 8.0
        print(blob.hex())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert bytes.fromhex(result.stdout.strip()) == serdio.serialize(2, 3.0, b=2.0)
