"""Loading depth-map pickles without letting them run code or touch numpy's own objects.

The released DeepHandMesh depth maps (``annotations/depthmaps/subject_N/<frame>/depthmap<cam>.pkl``)
are pickles of 2-D numpy float arrays (depth in mm, 0 where there is no depth). The original code
calls ``pickle.load`` on them, which runs whatever callable a pickle names, and even numpy's own
reconstruction applies the pickled state to live numpy objects (``ndarray.__setstate__``,
``dtype.__setstate__``): a corrupt pickle can damage numpy's shared type descriptors for the
rest of the process. :func:`load_depthmap` therefore never lets a pickle create a numpy object.
Its unpickler resolves only the names numpy writes when it pickles a plain array, and each
resolves to a *recorder* that keeps its arguments and state as plain Python values:

=====================================================  ==========================================
name in the pickle                                      written by
=====================================================  ==========================================
``numpy.core.multiarray._reconstruct``                  numpy 1.x, protocols 0-4 (and Python 2)
``numpy._core.multiarray._reconstruct``                 numpy 2.x, protocols 0-4
``numpy.ndarray``, ``numpy.dtype``                      every numpy pickle
``numpy.core.numeric._frombuffer`` (and ``numpy._core``)  numpy >= 1.16, protocol 5
``_codecs.encode``                                      Python 3 bytes at protocols 0-2
``builtins.bytes`` / ``__builtin__.bytes``              empty bytes at protocols 0-2
=====================================================  ==========================================

Any other name is refused *before* it is imported or called; ``numpy.ndarray`` can only be handed
to ``_reconstruct`` (calling it would allocate whatever shape the file asks for). After the
pickle is read, the recorded description is validated: a dtype from :data:`ALLOWED_TYPES`
(float, signed and unsigned integers) with a byte order ``<`` or ``>`` (``|``, "none", only for
one-byte types) and no fields, subarray or flags; a shape of non-negative integers; and a byte
string of exactly ``prod(shape) x itemsize`` bytes. Only then is the array built, from a dtype
made from our own type string and ``np.frombuffer`` of those bytes.

Python 2 pickles (``str`` payloads) are read with ``encoding='latin1'``, the setting numpy
documents for them; it changes nothing for Python 3 pickles.

A depth map must then be two-dimensional, non-empty and hold only finite, non-negative depths,
none of them between 0 and ``depth_min`` (exclusive): a depth the renderer can never produce is a
sign of a corrupt file (a byte-order character changed from ``<`` to ``>`` turns 1.0 into 4.6e-41).
It is returned as float32. Every other outcome raises :class:`DepthmapError` (a ``ValueError``)
whose message starts with the file's path (and counts the offending pixels). A file that does not
exist raises the usual ``FileNotFoundError``.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
from typing import Any, Callable, Dict, Tuple

import numpy as np

from common.errors import FileFormatError

__all__ = ["DepthmapError", "load_depthmap", "loads_numeric_array", "ALLOWED_TYPES"]

# The numeric types a depth map may have (kind + item size), as numpy names them in a pickle.
ALLOWED_TYPES = ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8")
MAX_DEPTHMAP_BYTES = 256 * 2 ** 20  # a 512x334 float64 map is 1.4 MB
MAX_DIMS = 32  # numpy's own limit
# A numpy pickle has a few dozen opcodes and memo entries. The C unpickler sizes its memo table
# by the largest index a PUT names: one corrupt LONG_BINPUT index asks for gigabytes of zeroed
# memory, so the opcode stream is checked (without running it) before it is unpickled.
MAX_OPCODES = 10_000
MAX_MEMO_INDEX = 10_000
_MEMO_OPS = ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET")
DEFAULT_DEPTH_MIN = 1.0  # mm, the original's cfg.depth_min (the renderer's near plane)


class DepthmapError(FileFormatError):
    """A depth-map file whose content is not a finite, numeric, 2-D array; the message names it."""


class _Refused(Exception):
    """Raised inside the unpickler; turned into a DepthmapError naming the file."""


class _NdarrayToken:
    """Stands for ``numpy.ndarray`` inside a pickle. It can only be passed to ``_reconstruct``."""

    __slots__ = ()

    def __call__(self, *args, **kwargs):
        raise _Refused("refused to call 'numpy.ndarray' directly; only numpy's own array "
                       "reconstruction is allowed")

    def __reduce__(self):  # never pickled back
        raise TypeError("not picklable")


_NDARRAY = _NdarrayToken()


class _Recorder:
    """A pickled object as plain Python values: the call's arguments and the BUILD state."""

    __slots__ = ("args", "state", "built")

    def __init__(self, *args):
        self.args, self.state, self.built = args, None, False

    def __setstate__(self, state):  # BUILD: record, never apply
        if self.built:
            raise _Refused(f"refused a second state for {self.what}")
        self.state, self.built = state, True

    def __reduce__(self):  # never pickled back
        raise TypeError("not picklable")


class _DtypeDesc(_Recorder):
    __slots__ = ()
    what = "a dtype"


class _ArrayDesc(_Recorder):
    __slots__ = ()
    what = "an array"


class _BufferDesc(_Recorder):
    __slots__ = ()
    what = "an array"

    def __setstate__(self, state):
        raise _Refused("refused a state for an array read from a buffer")


def _reconstruct(subtype, shape, typecode):
    # numpy writes _reconstruct(ndarray, (0,), b'b') and sets shape, dtype and data with BUILD.
    if subtype is not _NDARRAY:
        raise _Refused(f"refused _reconstruct of {type(subtype).__name__}; only numpy.ndarray")
    if shape != (0,) or typecode not in (b"b", "b"):
        raise _Refused("refused _reconstruct with arguments numpy does not write")
    return _ArrayDesc()


def _dtype(spec, *args):
    if not isinstance(spec, (str, bytes)):
        raise _Refused(f"refused numpy.dtype({type(spec).__name__}); only type strings are allowed")
    if len(args) > 2 or not all(isinstance(a, (bool, int)) for a in args):
        raise _Refused("refused numpy.dtype with unexpected arguments")
    return _DtypeDesc(spec.decode("latin1") if isinstance(spec, bytes) else spec)


def _frombuffer(buf, dtype, shape, order):
    return _BufferDesc(buf, dtype, shape, order)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    if (not isinstance(text, str) or not isinstance(encoding, str)
            or encoding.replace("-", "").lower() != "latin1" or errors != "strict"):
        raise _Refused(f"refused _codecs.encode(..., {encoding!r}); only latin1 text is allowed")
    return text.encode("latin1")


def _bytes(*args):
    if args:
        raise _Refused("refused bytes(...) with arguments")
    return b""


_ALLOWED: Dict[Tuple[str, str], Any] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _reconstruct
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _frombuffer
_ALLOWED[("numpy", "ndarray")] = _NDARRAY
_ALLOWED[("numpy", "dtype")] = _dtype
_ALLOWED[("_codecs", "encode")] = _codecs_encode
_ALLOWED[("builtins", "bytes")] = _bytes
_ALLOWED[("__builtin__", "bytes")] = _bytes


class _DescriptionUnpickler(pickle.Unpickler):
    """An unpickler whose globals are limited to the recorders above (nothing is imported)."""

    def find_class(self, module: str, name: str) -> Callable:
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(f"refused to load '{module}.{name}' from a depth-map pickle; only "
                           "numeric arrays are allowed") from None

    def persistent_load(self, pid):
        raise _Refused("refused a persistent id")


# ------------------------------------------------------------------ validating a description
_KIND_NAMES = {"b": "bool", "c": "complex", "O": "object", "U": "str", "S": "bytes", "a": "bytes",
               "V": "void (structured)", "M": "datetime64", "m": "timedelta64"}


def _type_name(spec: str) -> str:
    """A readable name for a refused type string, without asking numpy to parse it."""
    spec = spec.lstrip("<>|=")
    if spec in ALLOWED_TYPES:
        return str(np.dtype(spec))
    kind, size = spec[:1], spec[1:]
    if kind == "c" and size.isdigit():
        return f"complex{8 * int(size)}"
    if kind in _KIND_NAMES:
        return _KIND_NAMES[kind]
    return repr(spec[:20])


def _valid_dtype(desc) -> np.dtype:
    """The dtype a recorded ``numpy.dtype(spec, ...)`` + state describes, made from our own string."""
    if not isinstance(desc, _DtypeDesc):
        raise _Refused(f"refused an array whose dtype is {_describe(desc)}")
    (spec,) = desc.args
    if spec not in ALLOWED_TYPES:
        raise _Refused(f"expected a numeric 2-D array, found an array of dtype {_type_name(spec)} "
                       "(only float, signed and unsigned integer arrays are allowed)")
    state = desc.state
    if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
        raise _Refused(f"refused a dtype {spec} with a state numpy does not write")
    order, subarray, names, fields, elsize, alignment, flags = state[1:8]
    if order not in ("<", ">", "|", "="):
        raise _Refused(f"refused a dtype {spec} with byte order {shown_value(order)}")
    if order == "|" and spec[1:] != "1":
        # '|' means "byte order does not apply", true only of one-byte types: read in the
        # machine's order, a big-endian map would load as garbage.
        raise _Refused(f"refused a dtype {spec} that has no byte order ('|'); a {spec[1:]}-byte "
                       "number needs '<' or '>'")
    if (subarray, names, fields) != (None, None, None) or (elsize, alignment) != (-1, -1) or flags != 0:
        raise _Refused(f"refused a dtype {spec} with fields, a subarray or flags (numpy writes none "
                       "for a plain numeric dtype)")
    if len(state) == 9 and state[8] is not None:
        raise _Refused(f"refused a dtype {spec} with metadata")
    return np.dtype(("" if order == "|" else order) + spec)


def _valid_shape(shape) -> Tuple[int, ...]:
    if not (isinstance(shape, tuple) and len(shape) <= MAX_DIMS
            and all(type(n) is int and n >= 0 for n in shape)):
        raise _Refused(f"refused an array shape {shown_value(shape)}; expected a tuple of "
                       "non-negative integers")
    return shape


def _array_from(shape, dtype: np.dtype, fortran: bool, raw) -> np.ndarray:
    if isinstance(raw, str):  # a Python 2 str, read as latin1
        raw = raw.encode("latin1")
    if not isinstance(raw, (bytes, bytearray)):
        raise _Refused(f"refused array data given as {_describe(raw)}; expected raw bytes")
    count = math.prod(shape)
    if len(raw) != count * dtype.itemsize:
        raise _Refused(f"the array data has {len(raw)} bytes, but its shape {shape} of {dtype} "
                       f"needs {count * dtype.itemsize}")
    flat = np.frombuffer(raw, dtype=dtype, count=count) if count else np.empty(0, dtype)
    return flat.reshape(shape, order="F" if fortran else "C")


def _build(obj) -> np.ndarray:
    """The array a validated description stands for; anything else is refused."""
    if isinstance(obj, _ArrayDesc):
        state = obj.state
        if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise _Refused("refused an array whose state numpy does not write")
        shape, dtype, fortran, raw = state
        if not isinstance(fortran, bool) and fortran not in (0, 1):
            raise _Refused("refused an array with a malformed memory-order flag")
        return _array_from(_valid_shape(shape), _valid_dtype(dtype), bool(fortran), raw)
    if isinstance(obj, _BufferDesc):
        if len(obj.args) != 4:
            raise _Refused("refused _frombuffer with arguments numpy does not write")
        buf, dtype, shape, order = obj.args
        if order not in ("C", "F"):
            raise _Refused("refused _frombuffer with a malformed order")
        return _array_from(_valid_shape(shape), _valid_dtype(dtype), order == "F", buf)
    raise _Refused(f"expected a numeric 2-D array, found {_describe(obj)}")


def _prescan(data: bytes) -> None:
    """Walk the opcode stream (``pickletools.genops`` reads it, runs nothing): every length must fit
    in the data and the stream must end with STOP; bounded opcode count and memo indices."""
    memo = 0
    for count, (opcode, arg, _pos) in enumerate(pickletools.genops(data), 1):
        if count > MAX_OPCODES:
            raise _Refused(f"refused a pickle of more than {MAX_OPCODES} opcodes (a depth map has a few dozen)")
        if opcode.name in _MEMO_OPS and not (isinstance(arg, int) and 0 <= arg <= MAX_MEMO_INDEX):
            raise _Refused(f"refused a pickle memo index {shown_value(arg)} (corrupt)")
        if opcode.name == "MEMOIZE":
            memo += 1
            if memo > MAX_MEMO_INDEX:
                raise _Refused("refused a pickle with too many memo entries (corrupt)")


def loads_numeric_array(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Unpickle ``data`` that must hold one numeric numpy array (any shape, dtype kept).

    The array is built by ``np.frombuffer`` from a validated description (module notes); it is
    read-only when it shares the pickle's bytes.

    Raises:
        DepthmapError: anything else, with ``source`` at the start of the message.
    """
    try:
        _prescan(data)
        obj = _DescriptionUnpickler(io.BytesIO(data), encoding="latin1").load()
        return _build(obj)
    except _Refused as err:
        raise DepthmapError(f"{source}: {err}") from None
    except RecursionError:
        raise DepthmapError(f"{source}: not a readable depth-map pickle (nested too deeply)") from None
    except MemoryError:
        raise DepthmapError(f"{source}: not a readable depth-map pickle (it asks for too much memory)") from None
    except Exception as err:  # truncated / malformed pickles raise many different types
        text = " ".join(str(err).split())[:200]
        raise DepthmapError(f"{source}: not a readable depth-map pickle "
                            f"({type(err).__name__}: {text})") from None


def load_depthmap(path: os.PathLike | str, depth_min: float = DEFAULT_DEPTH_MIN) -> np.ndarray:
    """Read one depth-map pickle safely.

    Args:
        depth_min: smallest valid depth in mm (``cfg.depth_min``); 0 marks "no depth".

    Returns:
        ``[H, W]`` float32 depth in mm, 0 where there is no depth.

    Raises:
        FileNotFoundError: the file does not exist.
        DepthmapError: the file is not a pickle of a numeric, non-empty 2-D array of depths that
            are 0 or at least ``depth_min`` and finite (the message starts with the path and says
            what was found, with the number of offending pixels).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read(MAX_DEPTHMAP_BYTES + 1)
    if len(data) > MAX_DEPTHMAP_BYTES:
        raise DepthmapError(f"{path}: larger than {MAX_DEPTHMAP_BYTES} bytes, too large for a depth map")
    arr = loads_numeric_array(data, source=path)
    if arr.ndim != 2:
        raise DepthmapError(f"{path}: expected a 2-D depth map, found an array of shape {arr.shape}")
    if arr.size == 0:
        raise DepthmapError(f"{path}: expected a 2-D depth map, found an empty array {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    bad = int((~np.isfinite(out)).sum())
    if bad:
        raise DepthmapError(f"{path}: depth map has {bad} non-finite pixel(s) (NaN/inf, or too "
                            "large for float32)")
    bad = int((out < 0).sum())
    if bad:
        raise DepthmapError(f"{path}: depth map has {bad} negative pixel(s) (depth is in mm, "
                            "0 where there is none)")
    bad = int(((out > 0) & (out < depth_min)).sum())
    if bad:
        raise DepthmapError(f"{path}: depth map has {bad} pixel(s) with a depth between 0 and "
                            f"depth_min = {depth_min:g} mm (a corrupt file, e.g. a wrong byte order?)")
    return out


def shown_value(value: Any) -> str:
    """A pickled value for a message, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def _describe(obj: Any) -> str:
    if isinstance(obj, (str, bytes)):
        return f"a {type(obj).__name__} of length {len(obj)}"
    if isinstance(obj, (list, tuple, dict)):
        return f"a {type(obj).__name__} of {len(obj)} item(s)"
    if isinstance(obj, _DtypeDesc):
        return "a numpy dtype"
    return f"an object of type {type(obj).__name__}"
