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

Two readers, one outcome. A pickle is first read by a small stack machine that knows only the
opcodes numpy's pickler writes for a plain array at protocols 2-5 (Python 2 and 3) and builds
the same recorders through the same table of names; it needs no pre-scan, since it reads every
length itself, runs at most a few hundred opcodes and keeps the payload as a view of the file's
bytes. Anything it does not know (another opcode, a protocol 0/1 pickle, a memo index beyond
the limit, bytes after STOP, a refused name, any error) hands the file to the careful reader:
the opcode stream is pre-scanned with ``pickletools`` (bounded opcode count and memo indices)
and unpickled with the restricted C unpickler. The fast reader only ever *accepts*: it returns
an array only where the careful reader returns the same array, and every refusal and its
message come from the careful reader.

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
from typing import Any, Callable, Dict, Optional, Tuple

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
# numpy writes about 65 opcodes for an array (protocol 2); more goes to the careful reader.
MAX_FAST_OPCODES = 256
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
    if not isinstance(raw, (bytes, bytearray, memoryview)):  # memoryview: the fast reader's payload
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


# ------------------------------------------------------------------------------ the fast reader
class _NotFast(Exception):
    """The fast reader leaves this pickle to the careful one."""


# Names as the bytes a GLOBAL opcode carries (ASCII, no backslash: pickletools reads them alike).
_ALLOWED_GLOBALS = {(m.encode("ascii"), n.encode("ascii")): v for (m, n), v in _ALLOWED.items()}


def _fast_description(data: bytes) -> Any:
    """What the restricted unpickler makes of ``data``, for the opcodes numpy writes for an array.

    A stack machine over PROTO 2-5, FRAME, GLOBAL / STACK_GLOBAL (the names of ``_ALLOWED``
    only), MARK, the TUPLE opcodes, REDUCE, BUILD (on a recorder), NONE, NEWTRUE / NEWFALSE,
    BININT1 / BININT2 / BININT, the str / bytes / bytearray opcodes of protocols 2-5, the
    memo's PUT / GET / MEMOIZE, and STOP at the very end. Each behaves as in CPython's
    unpickler reading a file (pops never cross a MARK; Python 2 strings are latin1 text; unicode
    is UTF-8 with surrogatepass; no opcode may run across the end of a FRAME, where the
    unpickler would drop the rest of the frame) and calls the same recorders; large payloads
    stay memoryviews of ``data``.

    Raises:
        _NotFast: any other opcode or anything unusual; the careful reader decides then.
    """
    view = memoryview(data)
    end = len(data)
    frame_end = -1  # end of the FRAME being read; -1: none
    stack: list = []
    marks: list = []
    memo: Dict[int, Any] = {}
    pos = 0
    for _ in range(MAX_FAST_OPCODES):
        if pos == frame_end:
            frame_end = -1
        limit = end if frame_end < 0 else frame_end  # every argument must end by here
        if pos >= limit:
            raise _NotFast
        op = data[pos]
        pos += 1
        floor = marks[-1] if marks else 0
        if op == 0x71:  # BINPUT 'q' (1-byte index)
            if pos >= limit or len(stack) <= floor:
                raise _NotFast
            memo[data[pos]] = stack[-1]
            pos += 1
        elif op == 0x72:  # LONG_BINPUT 'r' (4-byte index)
            if pos + 4 > limit or len(stack) <= floor:
                raise _NotFast
            index = int.from_bytes(data[pos:pos + 4], "little")
            if index > MAX_MEMO_INDEX:
                raise _NotFast
            memo[index] = stack[-1]
            pos += 4
        elif op == 0x94:  # MEMOIZE
            if len(stack) <= floor:
                raise _NotFast
            memo[len(memo)] = stack[-1]
        elif op == 0x68 or op == 0x6A:  # BINGET 'h', LONG_BINGET 'j'
            width = 1 if op == 0x68 else 4
            if pos + width > limit:
                raise _NotFast
            index = data[pos] if width == 1 else int.from_bytes(data[pos:pos + 4], "little")
            if index > MAX_MEMO_INDEX or index not in memo:
                raise _NotFast
            stack.append(memo[index])
            pos += width
        elif op == 0x4B:  # BININT1 'K'
            if pos + 1 > limit:
                raise _NotFast
            stack.append(data[pos])
            pos += 1
        elif op == 0x4D or op == 0x4A:  # BININT2 'M' (unsigned), BININT 'J' (signed)
            width = 2 if op == 0x4D else 4
            if pos + width > limit:
                raise _NotFast
            stack.append(int.from_bytes(data[pos:pos + width], "little", signed=op == 0x4A))
            pos += width
        elif op in _TEXT_OPS:  # str and bytes of every width
            width, kind = _TEXT_OPS[op]
            if pos + width > limit:
                raise _NotFast
            size = int.from_bytes(data[pos:pos + width], "little", signed=op == 0x54)
            pos += width
            if size < 0 or size > limit - pos:
                raise _NotFast
            raw = view[pos:pos + size]
            pos += size
            if kind == "unicode":
                stack.append(str(raw, "utf-8", "surrogatepass"))
            elif kind == "latin1":  # a Python 2 str, read with encoding='latin1'
                stack.append(str(raw, "latin1"))
            elif size <= 256:  # short bytes (a type code): a bytes object, as the unpickler makes
                stack.append(bytes(raw))
            else:  # the array's bytes: no copy
                stack.append(raw)
        elif op == 0x28:  # MARK '('
            marks.append(len(stack))
        elif op == 0x85 or op == 0x86 or op == 0x87:  # TUPLE1, TUPLE2, TUPLE3
            count = op - 0x84
            if len(stack) - floor < count:
                raise _NotFast
            items = tuple(stack[-count:])
            del stack[-count:]
            stack.append(items)
        elif op == 0x74:  # TUPLE 't': the items above the last MARK
            if not marks:
                raise _NotFast
            items = tuple(stack[marks[-1]:])
            del stack[marks.pop():]
            stack.append(items)
        elif op == 0x29:  # EMPTY_TUPLE ')'
            stack.append(())
        elif op == 0x4E:  # NONE 'N'
            stack.append(None)
        elif op == 0x88 or op == 0x89:  # NEWTRUE, NEWFALSE
            stack.append(op == 0x88)
        elif op == 0x63:  # GLOBAL 'c': module and name, one line each
            stop1 = data.find(b"\n", pos, limit)
            stop2 = data.find(b"\n", stop1 + 1, limit) if stop1 >= 0 else -1
            if stop2 < 0:
                raise _NotFast
            try:
                stack.append(_ALLOWED_GLOBALS[(data[pos:stop1], data[stop1 + 1:stop2])])
            except KeyError:
                raise _NotFast from None
            pos = stop2 + 1
        elif op == 0x93:  # STACK_GLOBAL: module and name from the stack (str)
            if len(stack) - floor < 2:
                raise _NotFast
            module, name = stack[-2], stack[-1]
            if type(module) is not str or type(name) is not str or (module, name) not in _ALLOWED:
                raise _NotFast
            stack[-2:] = [_ALLOWED[(module, name)]]
        elif op == 0x52:  # REDUCE 'R': callable(*args) of the recorders' table
            if len(stack) - floor < 2:
                raise _NotFast
            func, args = stack[-2], stack[-1]
            if type(args) is not tuple or id(func) not in _CALLABLE_IDS:
                raise _NotFast
            stack[-2:] = [func(*args)]  # a recorder, or _Refused
        elif op == 0x62:  # BUILD 'b': the state of a recorder
            if len(stack) - floor < 2 or not isinstance(stack[-2], _Recorder):
                raise _NotFast
            stack[-2].__setstate__(stack.pop())
        elif op == 0x80:  # PROTO
            if pos + 1 > limit or not 2 <= data[pos] <= 5:
                raise _NotFast
            pos += 1
        elif op == 0x95:  # FRAME: not inside another; its length must fit in what is left
            if frame_end >= 0 or pos + 8 > end:
                raise _NotFast
            size = int.from_bytes(data[pos:pos + 8], "little")
            pos += 8
            if size > end - pos:
                raise _NotFast
            frame_end = pos + size
        elif op == 0x2E:  # STOP '.': one object, no open MARK, nothing after it
            if len(stack) != 1 or marks or pos != end:
                raise _NotFast
            return stack[0]
        else:
            raise _NotFast
    raise _NotFast


# opcode -> (width of its length field in bytes, what it holds)
_TEXT_OPS = {
    0x8C: (1, "unicode"),  # SHORT_BINUNICODE
    0x58: (4, "unicode"),  # BINUNICODE 'X'
    0x55: (1, "latin1"),   # SHORT_BINSTRING 'U' (Python 2)
    0x54: (4, "latin1"),   # BINSTRING 'T' (Python 2; signed length)
    0x43: (1, "bytes"),    # SHORT_BINBYTES 'C'
    0x42: (4, "bytes"),    # BINBYTES 'B'
    0x8E: (8, "bytes"),    # BINBYTES8
    0x96: (8, "bytes"),    # BYTEARRAY8 (numpy's protocol 5)
}
# REDUCE calls only these: the recorder functions of _ALLOWED and the ndarray token (which refuses
# calls). They live as long as the module, so their ids stay theirs.
_CALLABLE_IDS = frozenset(id(v) for v in _ALLOWED.values())


def _fast_array(data: bytes) -> Optional[np.ndarray]:
    """The array of a pickle numpy wrote, read without a pre-scan; None: ask the careful reader."""
    try:
        return _build(_fast_description(data))
    except Exception:  # _NotFast, _Refused or any error: the careful reader names it
        return None


def loads_numeric_array(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Unpickle ``data`` that must hold one numeric numpy array (any shape, dtype kept).

    The array is built by ``np.frombuffer`` from a validated description (module notes); it may
    be read-only (it shares the pickle's bytes).

    Raises:
        DepthmapError: anything else, with ``source`` at the start of the message.
    """
    array = _fast_array(data)
    if array is not None:
        return array
    return _careful_array(data, source)


def _careful_array(data: bytes, source: str) -> np.ndarray:
    """The careful reader: the pre-scan, then the restricted unpickler (module notes)."""
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
        # The file's size when it has one (asking for the limit's worth of bytes costs a
        # 256 MB allocation per read); a pipe or /proc file reads up to the limit.
        size = os.fstat(f.fileno()).st_size
        data = f.read(size + 1 if 0 < size <= MAX_DEPTHMAP_BYTES else MAX_DEPTHMAP_BYTES + 1)
    if len(data) > MAX_DEPTHMAP_BYTES:
        raise DepthmapError(f"{path}: larger than {MAX_DEPTHMAP_BYTES} bytes, too large for a depth map")
    arr = loads_numeric_array(data, source=path)
    if arr.ndim != 2:
        raise DepthmapError(f"{path}: expected a 2-D depth map, found an array of shape {arr.shape}")
    if arr.size == 0:
        raise DepthmapError(f"{path}: expected a 2-D depth map, found an empty array {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    if _plausible_depths(out, depth_min):
        return out
    # Something is wrong: count the offending pixels for the message.
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


_ZERO = np.zeros(1, np.float32)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _plausible_depths(depth: np.ndarray, depth_min: float) -> bool:
    """True only when ``depth`` (float32) is finite, non-negative and has no depth in
    ``(0, depth_min)``, i.e. when the three counts of :func:`load_depthmap` are all zero; False
    sends it to those counts. Three quick passes instead of six: the maximum is NaN or inf if any
    pixel is; and when 0 counts as below ``depth_min`` (compared as the counts compare), every
    negative pixel, -inf or depth in ``(0, depth_min)`` does too, so the pixels below it are
    exactly the zeros (``-0.0`` included) only when there is none of those."""
    if not _ZERO < depth_min:  # depth_min <= 0 (as float32): the counts decide
        return False
    with np.errstate(invalid="ignore"):
        if not depth.max() <= _FLOAT32_MAX:
            return False
        return np.count_nonzero(depth < depth_min) == np.count_nonzero(depth == 0)


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
