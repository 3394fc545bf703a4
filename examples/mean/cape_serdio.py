"""Serdio: MessagePack serialization of function inputs and outputs, byte-compatible with serdio.

This module reads and writes the wire format of the ``serdio`` package (version 3.1.1), which
pycape used to turn Python functions into Cape handlers (functions mapping bytes to bytes). A
value serialized here deserializes with serdio and vice versa, and for every value serdio can
serialize the bytes are identical.

**Standalone.** This file imports only the standard library and ``msgpack``: never ``cape.*``.
Users copy it next to a deployed function as ``cape_serdio.py``, so it must work on its own
(``tests/unit/test_layering.py`` enforces this).

**Wire format.** A MessagePack map ``{"_serdio_args_": args}`` plus, only when keyword arguments
exist, ``"_serdio_kwargs_": {name: value}``. Values are packed with ``strict_types=True``:
``None``, ``bool``, ``int`` (-2**63 to 2**64 - 1), ``float`` (always float64), ``str``, ``bytes``,
``list`` and ``dict`` map to MessagePack's own types; four Python types become extension types
whose payload is itself packed MessagePack:

======  ===========  =====================================================
code    type         payload
======  ===========  =====================================================
1       complex      the tuple ``(real, imag)``, i.e. itself extension 2
2       tuple        an array of the elements (the args tuple is always 2)
3       set          an array of the elements
4       frozenset    an array of the elements
======  ===========  =====================================================

Other types (including subclasses of ``int``, ``str``, ``dict``, ...) need an *encoder hook*
that turns them into the types above; a *decoder hook* is called on every decoded map and may
turn it back into the custom object.

**Usage** ::

    blob = serialize(2, 3.0, b=2.0)
    assert deserialize(blob) == (2, 3.0)
    assert deserialize(blob, as_signature=True) == ((2, 3.0), {"b": 2.0})

    @lift_io
    def scale(x: int, y: float, b: float = 1.0) -> float:
        return x * y + b

    cape_handler = scale.as_cape_handler()  # bytes -> bytes
    assert deserialize(cape_handler(blob)) == 8.0

Differences from serdio 3.1.1, all on inputs serdio crashes or fails on:

* Deserializing rejects malformed bytes with :class:`SerdioError` (a ``ValueError``) instead of
  raw msgpack errors, ``AttributeError`` or ``TypeError``; unknown extension codes are rejected
  (serdio returns them as ``msgpack.ExtType``), and so are envelope maps with missing or unknown
  keys.
* Extension types may nest at most :data:`MAX_NESTING_DEPTH` deep. serdio's decoder uses about
  40 KiB of C stack per level and crashes the interpreter (segmentation fault) at about 190
  levels, which a 1 KiB input reaches.
* The encoder hook also applies to keyword-argument values (serdio applies it only inside the
  args tuple and fails on a custom-typed keyword argument), and an encoder hook may return a
  tuple, set, frozenset or complex.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, Final, Generic, Literal, ParamSpec, TypeAlias, TypeVar, overload

import msgpack

__all__ = [
    "ARGS_KEY",
    "KWARGS_KEY",
    "MAX_NESTING_DEPTH",
    "ArgumentCountError",
    "BytesHandler",
    "Decoder",
    "Encoder",
    "HookBundle",
    "LiftedFunction",
    "SerdioError",
    "bundle_hooks",
    "deserialize",
    "lift_io",
    "serialize",
]

ARGS_KEY: Final = "_serdio_args_"
KWARGS_KEY: Final = "_serdio_kwargs_"

#: How deep tuples, sets, frozensets and complex numbers (the extension types) may nest, the args
#: tuple included; a complex counts two levels. Both directions enforce it.
MAX_NESTING_DEPTH: Final = 32

_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1

_EXT_COMPLEX: Final = 1
_EXT_TUPLE: Final = 2
_EXT_SET: Final = 3
_EXT_FROZENSET: Final = 4

#: The types msgpack packs itself under ``strict_types=True`` (exact types, not subclasses).
_NATIVE_TYPES: Final[frozenset[type]] = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        str,
        bytes,
        bytearray,
        memoryview,
        list,
        dict,
        msgpack.ExtType,
        msgpack.Timestamp,
    }
)

Encoder: TypeAlias = Callable[[Any], Any]
"""Turns a custom object into msgpack-native values; returns anything else unchanged."""

Decoder: TypeAlias = Callable[[dict[Any, Any]], Any]
"""Called on every decoded map; returns the custom object it encodes, or the map unchanged."""

BytesHandler: TypeAlias = Callable[[bytes], bytes]
"""A function from Serdio bytes (the inputs) to Serdio bytes (the output)."""

_P = ParamSpec("_P")
_R = TypeVar("_R")


class SerdioError(ValueError):
    """Bytes that are not a valid Serdio serialization."""


class ArgumentCountError(SerdioError, TypeError):
    """A handler's input supplies a different number of values than the function declares."""


# --------------------------------------------------------------------------------------------
# Serialization


def _type_name(obj: object) -> str:
    cls = type(obj)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


class _Packer:
    """The ``default`` hooks for one :func:`serialize` call.

    serdio's hook converts complex/tuple/set/frozenset first and then hands the result (an
    ``ExtType`` for those four) to the encoder hook, except in the outermost ``packb`` call
    (the envelope map and keyword arguments), where it never calls the encoder hook. Doing the
    same keeps the bytes identical wherever serdio succeeds; where serdio would fail (a custom
    value outside the args tuple, a hook returning a tuple) this goes on instead.
    """

    __slots__ = ("_depth", "_encoder")

    def __init__(self, encoder: Encoder | None) -> None:
        self._encoder = encoder
        self._depth = 0

    def pack(self, obj: object, *, outermost: bool) -> bytes:
        hook = self._outer_hook if outermost else self._inner_hook
        packed: bytes = msgpack.packb(obj, default=hook, strict_types=True)
        return packed

    def _outer_hook(self, obj: object) -> Any:
        return self._hook(obj, outermost=True)

    def _inner_hook(self, obj: object) -> Any:
        return self._hook(obj, outermost=False)

    def _hook(self, obj: object, *, outermost: bool) -> Any:
        # msgpack also calls this hook for ints it cannot pack (outside -2**63 .. 2**64 - 1).
        ext = self._to_ext(obj)
        if self._encoder is None:
            if ext is None:
                _check_int_range(obj)
                raise _unsupported(obj)
            return ext
        if ext is not None and outermost:
            return ext
        out = self._encoder(obj if ext is None else ext)
        if type(out) in _NATIVE_TYPES:
            _check_int_range(out)
            return out
        converted = self._to_ext(out)
        if converted is None:
            raise _unsupported(out, source=obj)
        return converted

    def _to_ext(self, obj: object) -> msgpack.ExtType | None:
        if isinstance(obj, complex):
            return self._ext(_EXT_COMPLEX, (obj.real, obj.imag))
        if isinstance(obj, tuple):
            return self._ext(_EXT_TUPLE, list(obj))
        if isinstance(obj, set):
            return self._ext(_EXT_SET, list(obj))
        if isinstance(obj, frozenset):
            return self._ext(_EXT_FROZENSET, list(obj))
        return None

    def _ext(self, code: int, payload: object) -> msgpack.ExtType:
        if self._depth >= MAX_NESTING_DEPTH:
            raise ValueError(
                f"cannot serialize: tuples, sets, frozensets and complex numbers nest more than "
                f"{MAX_NESTING_DEPTH} deep (a complex counts two levels, the args tuple one)"
            )
        self._depth += 1
        try:
            return msgpack.ExtType(code, self.pack(payload, outermost=False))
        finally:
            self._depth -= 1


def _check_int_range(obj: object) -> None:
    if type(obj) is int and not _INT_MIN <= obj <= _INT_MAX:
        raise OverflowError(f"cannot serialize {obj}: ints must lie in -2**63 .. 2**64 - 1")


def _unsupported(obj: object, *, source: object = None) -> TypeError:
    if source is None:
        return TypeError(
            f"cannot serialize a value of type {_type_name(obj)}: pass an encoder hook that "
            "turns it into None, bool, int, float, str, bytes, list, dict, tuple, set, "
            "frozenset or complex"
        )
    return TypeError(
        f"cannot serialize a value of type {_type_name(source)}: the encoder hook returned a "
        f"value of unsupported type {_type_name(obj)}"
    )


def serialize(*args: Any, encoder: Encoder | None = None, **kwargs: Any) -> bytes:
    """Serialize positional and keyword arguments into Serdio bytes.

    Args:
        *args: The positional values; always stored as a tuple (extension type 2).
        encoder: Optional hook converting custom-typed values into serializable ones.
        **kwargs: The keyword values; stored only when there are any.

    Raises:
        TypeError: a value of an unsupported type, or a non-callable ``encoder``.
        OverflowError: an int outside -2**63 to 2**64 - 1.
        ValueError: values nested more than :data:`MAX_NESTING_DEPTH` deep.
    """
    if encoder is not None and not callable(encoder):
        raise TypeError(f"encoder must be callable, not {_type_name(encoder)}")
    envelope: dict[str, object] = {ARGS_KEY: args}
    if kwargs:
        envelope[KWARGS_KEY] = kwargs
    return _Packer(encoder).pack(envelope, outermost=True)


# --------------------------------------------------------------------------------------------
# Deserialization


class _Unpacker:
    """The ``ext_hook`` for one :func:`deserialize` call, tracking the nesting depth."""

    __slots__ = ("_decoder", "_depth")

    def __init__(self, decoder: Decoder | None) -> None:
        self._decoder = decoder
        self._depth = 0

    def ext_hook(self, code: int, data: bytes) -> object:
        if code not in (_EXT_COMPLEX, _EXT_TUPLE, _EXT_SET, _EXT_FROZENSET):
            raise SerdioError(
                f"unknown MessagePack extension type {code}: Serdio uses 1 (complex), "
                "2 (tuple), 3 (set) and 4 (frozenset)"
            )
        if self._depth >= MAX_NESTING_DEPTH:
            raise SerdioError(
                f"tuples, sets, frozensets and complex numbers nest more than "
                f"{MAX_NESTING_DEPTH} deep"
            )
        self._depth += 1
        try:
            items = msgpack.unpackb(data, ext_hook=self.ext_hook, object_hook=self._decoder)
        finally:
            self._depth -= 1
        if code == _EXT_COMPLEX:
            if not (
                isinstance(items, tuple | list)
                and len(items) == 2
                and all(isinstance(part, int | float) for part in items)
            ):
                raise SerdioError("a complex (extension type 1) must hold two real numbers")
            return complex(items[0], items[1])
        if not isinstance(items, list):
            raise SerdioError(f"extension type {code} must hold an array, not {_type_name(items)}")
        if code == _EXT_TUPLE:
            return tuple(items)
        try:
            return set(items) if code == _EXT_SET else frozenset(items)
        except TypeError as exc:
            raise SerdioError(f"a set element is not hashable: {exc}") from exc

    def envelope(self, data: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # The envelope map is read by hand so the decoder hook never sees it (serdio passes it
        # to the hook too) and so its structure can be checked.
        unpacker = msgpack.Unpacker(
            None,
            ext_hook=self.ext_hook,
            object_hook=self._decoder,
            max_buffer_size=len(data),
        )
        unpacker.feed(data)
        args: object = None
        kwargs: object = {}
        seen: set[str] = set()
        try:
            entries = unpacker.read_map_header()
        except ValueError as exc:  # any header but a map's (OutOfData, for no bytes, passes)
            raise SerdioError(
                f"Serdio bytes must be a MessagePack map with the key {ARGS_KEY!r}"
            ) from exc
        for _ in range(entries):
            key = unpacker.unpack()
            if key not in (ARGS_KEY, KWARGS_KEY):
                raise SerdioError(
                    f"unexpected key {key!r} in the Serdio map (expected {ARGS_KEY!r} and "
                    f"optionally {KWARGS_KEY!r})"
                )
            if key in seen:
                raise SerdioError(f"key {key!r} appears twice in the Serdio map")
            seen.add(key)
            if key == ARGS_KEY:
                args = unpacker.unpack()
            else:
                kwargs = unpacker.unpack()
        if unpacker.tell() != len(data):
            raise SerdioError(f"{len(data) - unpacker.tell()} bytes follow the Serdio map")
        if ARGS_KEY not in seen:
            raise SerdioError(f"the Serdio map has no {ARGS_KEY!r} key")
        if not isinstance(args, tuple | list):
            raise SerdioError(f"{ARGS_KEY!r} must be a tuple, not {_type_name(args)}")
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise SerdioError(f"{KWARGS_KEY!r} must be a map with str keys")
        return tuple(args), kwargs


@overload
def deserialize(
    data: bytes | bytearray | memoryview,
    decoder: Decoder | None = None,
    as_signature: Literal[False] = False,
) -> Any: ...


@overload
def deserialize(
    data: bytes | bytearray | memoryview,
    decoder: Decoder | None = None,
    *,
    as_signature: Literal[True],
) -> tuple[tuple[Any, ...], dict[str, Any]]: ...


@overload
def deserialize(
    data: bytes | bytearray | memoryview,
    decoder: Decoder | None,
    as_signature: Literal[True],
) -> tuple[tuple[Any, ...], dict[str, Any]]: ...


@overload
def deserialize(
    data: bytes | bytearray | memoryview,
    decoder: Decoder | None = None,
    as_signature: bool = False,
) -> Any: ...


def deserialize(
    data: bytes | bytearray | memoryview,
    decoder: Decoder | None = None,
    as_signature: bool = False,
) -> Any:
    """Deserialize Serdio bytes.

    Args:
        data: The Serdio bytes.
        decoder: Optional hook called on every decoded map (but not on the envelope map).
        as_signature: Return ``(args, kwargs)`` instead of the values.

    Returns:
        With ``as_signature``, the tuple of positional values and the dict of keyword values.
        Otherwise the single positional value if there is exactly one, else the tuple of them
        (keyword values are dropped, as in serdio).

    Raises:
        SerdioError: ``data`` is not a valid Serdio serialization (including dict keys other
            than str and bytes, which serdio rejects too). A ``ValueError`` raised by the
            decoder hook is reported as a ``SerdioError`` caused by it.
        TypeError: ``data`` is not bytes-like, or ``decoder`` is not callable.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"Serdio data must be bytes, not {_type_name(data)}")
    if decoder is not None and not callable(decoder):
        raise TypeError(f"decoder must be callable, not {_type_name(decoder)}")
    blob = bytes(data)
    if not blob:
        raise SerdioError("cannot deserialize empty Serdio bytes")
    try:
        args, kwargs = _Unpacker(decoder).envelope(blob)
    except SerdioError:
        raise
    except msgpack.OutOfData as exc:
        raise SerdioError("truncated Serdio bytes") from exc
    except (ValueError, msgpack.UnpackException) as exc:
        detail = str(exc) or type(exc).__name__
        raise SerdioError(f"malformed Serdio bytes: {detail}") from exc
    except RecursionError as exc:
        raise SerdioError("Serdio bytes nest too deeply to decode here") from exc
    if as_signature:
        return args, kwargs
    return args[0] if len(args) == 1 else args


# --------------------------------------------------------------------------------------------
# Hooks


@dataclasses.dataclass(frozen=True, slots=True)
class HookBundle:
    """An encoder hook and the decoder hook that inverts it.

    For a custom object ``x``, ``decoder(encoder(x)) == x`` should hold, where ``encoder(x)``
    is built from serializable values (typically a dict such as ``{"__type__": "Point",
    "fields": {...}}``) and the decoder recognizes that dict.
    """

    encoder: Encoder
    decoder: Decoder

    def __post_init__(self) -> None:
        for name in ("encoder", "decoder"):
            hook = getattr(self, name)
            if not callable(hook):
                raise TypeError(f"{name} hook must be callable, not {_type_name(hook)}")

    def unbundle(self) -> tuple[Encoder, Decoder]:
        """The pair ``(encoder, decoder)``."""
        return self.encoder, self.decoder


def bundle_hooks(
    hooks: HookBundle | tuple[Encoder, Decoder] | list[Callable[..., Any]] | None,
) -> HookBundle | None:
    """Coerce an ``(encoder, decoder)`` pair, a :class:`HookBundle` or ``None``.

    Raises:
        TypeError: any other type, or hooks that are not callable.
        ValueError: a tuple or list that does not hold exactly two hooks.
    """
    if hooks is None or isinstance(hooks, HookBundle):
        return hooks
    if isinstance(hooks, tuple | list):
        if len(hooks) != 2:
            raise ValueError(f"hook bundle needs (encoder, decoder), got {len(hooks)} items")
        return HookBundle(hooks[0], hooks[1])
    raise TypeError(
        f"hook bundle must be a HookBundle, an (encoder, decoder) tuple or None, "
        f"not {_type_name(hooks)}"
    )


# --------------------------------------------------------------------------------------------
# Lifting functions into bytes handlers


def _parameter_count(func: Callable[..., Any]) -> int | None:
    try:
        return len(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # no introspectable signature (some builtins)
        return None


class LiftedFunction(Generic[_P, _R]):
    """A function that still calls as before and can also become a :data:`BytesHandler`.

    It carries the function's ``__name__``, ``__doc__``, ``__wrapped__`` etc.
    (``functools.update_wrapper``).
    """

    __name__: str
    __wrapped__: Callable[_P, _R]

    def __init__(self, func: Callable[_P, _R], hooks: HookBundle | None = None) -> None:
        if not callable(func):
            raise TypeError(f"lift_io needs a callable, not {_type_name(func)}")
        self._func = func
        self._hooks = hooks
        functools.update_wrapper(self, func)

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return self._func(*args, **kwargs)

    @property
    def func(self) -> Callable[_P, _R]:
        """The wrapped function."""
        return self._func

    @property
    def hook_bundle(self) -> HookBundle | None:
        """The encoder/decoder hooks used by the bytes handler, if any."""
        return self._hooks

    def as_bytes_handler(self) -> BytesHandler:
        """The function as a bytes handler: Serdio inputs in, Serdio output out.

        The handler deserializes its input as ``(args, kwargs)``, requires that together they
        supply exactly as many values as the function declares parameters (as serdio does:
        parameters with defaults must be supplied too), calls the function and serializes its
        return value as the single positional value.
        """
        func = self._func
        encoder, decoder = self._hooks.unbundle() if self._hooks else (None, None)
        expected = _parameter_count(func)
        name = getattr(func, "__qualname__", _type_name(func))

        def cape_handler(input_bytes: bytes) -> bytes:
            args, kwargs = deserialize(input_bytes, decoder, as_signature=True)
            supplied = len(args) + len(kwargs)
            if expected is not None and supplied != expected:
                raise ArgumentCountError(
                    f"{name} declares {expected} parameter(s) but the Serdio input supplies "
                    f"{supplied} ({len(args)} positional, {len(kwargs)} keyword); every "
                    "parameter, including those with defaults, must be supplied"
                )
            return serialize(func(*args, **kwargs), encoder=encoder)

        return cape_handler

    def as_cape_handler(self) -> BytesHandler:
        """Alias of :meth:`as_bytes_handler`."""
        return self.as_bytes_handler()


def _resolve_hooks(
    encoder_hook: Encoder | None,
    decoder_hook: Decoder | None,
    hook_bundle: HookBundle | tuple[Encoder, Decoder] | None,
) -> HookBundle | None:
    if (encoder_hook is None) != (decoder_hook is None):
        raise ValueError("lift_io needs both encoder_hook and decoder_hook, or neither")
    if encoder_hook is not None and decoder_hook is not None:
        if hook_bundle is not None:
            raise ValueError("lift_io takes encoder_hook/decoder_hook or hook_bundle, not both")
        return HookBundle(encoder_hook, decoder_hook)
    return bundle_hooks(hook_bundle)


@overload
def lift_io(
    func: Callable[_P, _R],
    /,
    *,
    encoder_hook: Encoder | None = None,
    decoder_hook: Decoder | None = None,
    hook_bundle: HookBundle | tuple[Encoder, Decoder] | None = None,
    as_handler: Literal[False] = False,
) -> LiftedFunction[_P, _R]: ...


@overload
def lift_io(
    func: Callable[..., Any],
    /,
    *,
    encoder_hook: Encoder | None = None,
    decoder_hook: Decoder | None = None,
    hook_bundle: HookBundle | tuple[Encoder, Decoder] | None = None,
    as_handler: Literal[True],
) -> BytesHandler: ...


@overload
def lift_io(
    func: None = None,
    /,
    *,
    encoder_hook: Encoder | None = None,
    decoder_hook: Decoder | None = None,
    hook_bundle: HookBundle | tuple[Encoder, Decoder] | None = None,
    as_handler: Literal[False] = False,
) -> Callable[[Callable[_P, _R]], LiftedFunction[_P, _R]]: ...


@overload
def lift_io(
    func: None = None,
    /,
    *,
    encoder_hook: Encoder | None = None,
    decoder_hook: Decoder | None = None,
    hook_bundle: HookBundle | tuple[Encoder, Decoder] | None = None,
    as_handler: Literal[True],
) -> Callable[[Callable[..., Any]], BytesHandler]: ...


def lift_io(
    func: Callable[..., Any] | None = None,
    /,
    *,
    encoder_hook: Encoder | None = None,
    decoder_hook: Decoder | None = None,
    hook_bundle: HookBundle | tuple[Encoder, Decoder] | None = None,
    as_handler: bool = False,
) -> Any:
    """Lift a function so it can serve as a Cape handler over Serdio bytes.

    Use as ``@lift_io`` or ``@lift_io(encoder_hook=..., decoder_hook=...)``. Give the hooks
    either as ``encoder_hook`` and ``decoder_hook`` together or as ``hook_bundle``.

    Returns:
        A :class:`LiftedFunction` (call it as the original function; get the handler with
        ``.as_cape_handler()``), or with ``as_handler=True`` the bytes handler itself.

    Raises:
        ValueError: only one of ``encoder_hook``/``decoder_hook``, or hooks and a bundle.
        TypeError: hooks that are not callable, or a bundle of the wrong type.
    """
    hooks = _resolve_hooks(encoder_hook, decoder_hook, hook_bundle)

    def lift(target: Callable[..., Any]) -> Any:
        lifted = LiftedFunction(target, hooks)
        return lifted.as_bytes_handler() if as_handler else lifted

    return lift if func is None else lift(func)
