"""Loading depth-map pickles without letting them run code.

The released DeepHandMesh depth maps (``annotations/depthmaps/subject_N/<frame>/depthmap<cam>.pkl``)
are pickles of 2-D numpy float arrays (depth in mm, 0 where there is no depth). The original code
calls ``pickle.load`` on them, which runs whatever callable a pickle names. :func:`load_depthmap`
instead uses an unpickler that resolves only the handful of names numpy itself writes when it
pickles a plain numeric array:

=====================================================  ==========================================
name in the pickle                                      written by
=====================================================  ==========================================
``numpy.core.multiarray._reconstruct``                  numpy 1.x, protocols 0-4 (and Python 2)
``numpy._core.multiarray._reconstruct``                 numpy 2.x, protocols 0-4
``numpy.ndarray``, ``numpy.dtype``                      every numpy pickle
``numpy.core.multiarray.scalar`` (and ``numpy._core``)  numpy scalars
``numpy.core.numeric._frombuffer`` (and ``numpy._core``)  numpy >= 1.16, protocol 5
``_codecs.encode``                                      Python 3 bytes at protocols 0-2
``builtins.bytes`` / ``__builtin__.bytes``              empty bytes at protocols 0-2
=====================================================  ==========================================

Even these are wrapped: ``numpy.ndarray`` resolves to a token that can only be handed to
``_reconstruct`` (so a pickle cannot call ``ndarray(shape)`` to allocate memory it does not
hold), ``_reconstruct`` always starts from an empty array (the data then comes from the pickle
itself), ``numpy.dtype`` takes only a type string, ``_codecs.encode`` only the latin-1 codec and
``bytes`` no arguments. Any other name is refused *before* it is imported or called.

Python 2 pickles (``str`` payloads) are read with ``encoding='latin1'``, the setting numpy
documents for them; it changes nothing for Python 3 pickles.

The result must be a plain ``numpy.ndarray`` with a numeric (float / signed / unsigned integer)
dtype, two dimensions, at least one element and only finite values; it is returned as float32.
Every other outcome raises :class:`DepthmapError` (a ``ValueError``) whose message starts with the
file's path. A file that does not exist raises the usual ``FileNotFoundError``.
"""
from __future__ import annotations

import io
import os
import pickle
from typing import Any, Callable, Dict, Tuple

import numpy as np

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

__all__ = ["DepthmapError", "load_depthmap", "loads_numeric_array"]

NUMERIC_KINDS = "fiu"  # float, signed int, unsigned int


class DepthmapError(ValueError):
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


def _reconstruct(subtype, shape, typecode):
    # numpy writes _reconstruct(ndarray, (0,), b'b') and then sets the real shape, dtype and data
    # with BUILD (ndarray.__setstate__), which checks the data length against the shape.
    if subtype is not _NDARRAY:
        raise _Refused(f"refused _reconstruct of {type(subtype).__name__!s}; only numpy.ndarray")
    return _multiarray._reconstruct(np.ndarray, (0,), b"b")


def _dtype(spec, *args):
    if not isinstance(spec, (str, bytes)):
        raise _Refused(f"refused numpy.dtype({type(spec).__name__}); only type strings are allowed")
    if isinstance(spec, bytes):
        spec = spec.decode("latin1")
    if len(args) > 2 or not all(isinstance(a, (bool, int)) for a in args):
        raise _Refused("refused numpy.dtype with unexpected arguments")
    return np.dtype(spec, *args)


def _scalar(dtype, *args):
    if not isinstance(dtype, np.dtype) or dtype.kind not in NUMERIC_KINDS + "b":
        raise _Refused(f"refused a numpy scalar of dtype {dtype!r}; only numeric values are allowed")
    return _multiarray.scalar(dtype, *args)


def _frombuffer(buf, dtype, shape, order):
    if not isinstance(buf, (bytes, bytearray)):
        raise _Refused(f"refused _frombuffer on {type(buf).__name__}")
    if not isinstance(dtype, np.dtype) or dtype.kind not in NUMERIC_KINDS + "b":
        raise _Refused(f"refused an array of dtype {dtype!r}; only numeric arrays are allowed")
    if not (isinstance(shape, tuple) and all(isinstance(s, int) for s in shape)):
        raise _Refused("refused _frombuffer with a malformed shape")
    if order not in ("C", "F"):
        raise _Refused("refused _frombuffer with a malformed order")
    return _numeric._frombuffer(buf, dtype, shape, order)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1" or errors != "strict":
        raise _Refused(f"refused _codecs.encode(..., {encoding!r}); only latin1 text is allowed")
    return text.encode("latin1")


def _bytes(*args):
    if args:
        raise _Refused("refused bytes(...) with arguments")
    return b""


_ALLOWED: Dict[Tuple[str, str], Any] = {}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _reconstruct
    _ALLOWED[(_mod, "scalar")] = _scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _frombuffer
_ALLOWED[("numpy", "ndarray")] = _NDARRAY
_ALLOWED[("numpy", "dtype")] = _dtype
_ALLOWED[("_codecs", "encode")] = _codecs_encode
_ALLOWED[("builtins", "bytes")] = _bytes
_ALLOWED[("__builtin__", "bytes")] = _bytes


class _NumericArrayUnpickler(pickle.Unpickler):
    """An unpickler whose globals are limited to the table above (nothing is imported)."""

    def find_class(self, module: str, name: str) -> Callable:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Refused(f"refused to load '{module}.{name}' from a depth-map pickle; only "
                           "numeric arrays are allowed") from None

    def persistent_load(self, pid):
        raise _Refused("refused a persistent id")


def loads_numeric_array(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Unpickle ``data`` that must hold one numeric numpy array (any shape, dtype kept).

    Raises:
        DepthmapError: anything else, with ``source`` at the start of the message.
    """
    try:
        obj = _NumericArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except _Refused as err:
        raise DepthmapError(f"{source}: {err}") from None
    except RecursionError:
        raise DepthmapError(f"{source}: not a readable depth-map pickle (nested too deeply)") from None
    except Exception as err:  # truncated / malformed pickles raise many different types
        raise DepthmapError(f"{source}: not a readable depth-map pickle "
                            f"({type(err).__name__}: {err})") from None
    if type(obj) is not np.ndarray:
        raise DepthmapError(f"{source}: expected a numeric 2-D array, found {_describe(obj)}")
    if obj.dtype.kind not in NUMERIC_KINDS:
        raise DepthmapError(f"{source}: expected a numeric 2-D array, found an array of dtype "
                            f"{obj.dtype}")
    return obj


def load_depthmap(path: os.PathLike | str) -> np.ndarray:
    """Read one depth-map pickle safely.

    Returns:
        ``[H, W]`` float32 depth in mm, 0 where there is no depth.

    Raises:
        FileNotFoundError: the file does not exist.
        DepthmapError: the file is not a pickle of a finite, numeric, non-empty 2-D array (the
            message starts with the path and says what was found).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    arr = loads_numeric_array(data, source=path)
    if arr.ndim != 2:
        raise DepthmapError(f"{path}: expected a 2-D depth map, found an array of shape {arr.shape}")
    if arr.size == 0:
        raise DepthmapError(f"{path}: expected a 2-D depth map, found an empty array {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        raise DepthmapError(f"{path}: depth map has {bad} non-finite value(s) (NaN/inf, or too "
                            "large for float32)")
    return out


def _describe(obj: Any) -> str:
    if isinstance(obj, (str, bytes)):
        return f"a {type(obj).__name__} of length {len(obj)}"
    if isinstance(obj, (list, tuple, dict)):
        return f"a {type(obj).__name__} of {len(obj)} item(s)"
    if isinstance(obj, np.generic):
        return f"a numpy scalar of dtype {obj.dtype}"
    return f"an object of type {type(obj).__name__}"
