"""Reading the fitter's input files. Every problem is one :class:`FitInputError` line that names
the file and says what was expected. Files are data: ``.npy``/``.npz`` are read without pickles,
JSON with the standard parser, cameras with the project's ``KRT`` reader.

3D keypoints (``--keypoints``), one frame ``[21, 3]`` or a sequence ``[T, 21, 3]``:

* ``.npy``: the array (NaN for a missing point);
* ``.npz``: ``keypoints`` and optionally ``confidence [T, 21]`` (0 for a missing point);
* ``.json``: a list of frames, each a list of 21 ``[x, y, z]`` or ``null`` (one frame alone: the
  list of 21).

2D keypoints (``--keypoints2d``, ``.npz``): ``uv [T, C, 21, 2]`` pixels, ``confidence [T, C, 21]``
and ``cameras``, the ``C`` camera names of the ``KRT`` file (``--cameras``).
"""
from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from common.fitting.errors import FitInputError
from common.io.textio import read_text

MAX_JSON_BYTES = 256 * 2 ** 20
KEYPOINTS = 21


def _load_numpy(path: Path):
    """``np.load`` without pickles; a missing, unreadable or pickled file is a :class:`FitInputError`."""
    if not path.is_file():
        raise FitInputError(f"{path}: file not found")
    try:
        with open(path, "rb") as fp:
            magic = fp.read(6)
    except OSError as err:
        raise FitInputError(f"{path}: cannot read ({err.strerror or err})") from None
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):
        raise FitInputError(f"{path}: not a readable NumPy file (.npy or .npz)")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError:  # object arrays need pickles
        raise FitInputError(f"{path}: not a plain numeric NumPy file (it holds Python objects, which are not "
                            "read); expected numeric arrays") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise FitInputError(f"{path}: not a readable NumPy file ({err})") from None


def _numeric(path: Path, name: str, value) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiub":
        raise FitInputError(f"{path}: '{name}' holds {array.dtype} values; expected numbers")
    return array.astype(np.float64)


def check_keypoints(path, points: np.ndarray, confidence: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Shapes, finiteness and at least one point per frame; returns ``([T, 21, 3], [T, 21])`` with a
    single ``[21, 3]`` frame made a sequence of one, and the confidence 1 where not given. ``path``
    names the input in messages (a file, or ``'keypoints'``)."""
    points = np.asarray(points, np.float64)
    confidence = None if confidence is None else np.asarray(confidence, np.float64)
    if points.ndim == 2:
        points = points[None]
        if confidence is not None and confidence.ndim == 1:
            confidence = confidence[None]
    if points.ndim != 3 or points.shape[1:] != (KEYPOINTS, 3):
        raise FitInputError(f"{path}: keypoints have shape {list(points.shape)}; expected one frame [21, 3] "
                            "or a sequence [T, 21, 3]")
    if points.shape[0] == 0:
        raise FitInputError(f"{path}: no frame; expected [T, 21, 3] with T ≥ 1")
    if np.isinf(points).any():
        t, k, _ = np.argwhere(np.isinf(points))[0]
        raise FitInputError(f"{path}: frame {t}, keypoint {k} is infinite; expected finite numbers "
                            "(NaN for a missing point)")
    if confidence is None:
        confidence = np.ones(points.shape[:2])
    elif confidence.shape != points.shape[:2]:
        raise FitInputError(f"{path}: confidence has shape {list(confidence.shape)}; expected "
                            f"{list(points.shape[:2])} ([T, 21], one per keypoint)")
    if not np.isfinite(confidence).all() or (confidence < 0).any():
        raise FitInputError(f"{path}: confidence must be finite numbers ≥ 0 (0 for a missing point)")
    confidence = np.where(np.isfinite(points).all(-1), confidence, 0.0)  # NaN: missing, whatever the confidence
    empty = np.flatnonzero(~(confidence > 0).any(-1))
    if empty.size:
        more = f" (and {empty.size - 1} more)" if empty.size > 1 else ""
        raise FitInputError(f"{path}: frame {empty[0]}{more} has every keypoint missing (NaN, null or "
                            "confidence 0); expected at least one point per frame")
    return points, confidence


def _json_frame(path: Path, frame, t: int) -> np.ndarray:
    if not isinstance(frame, list) or len(frame) != KEYPOINTS:
        got = f"a list of {len(frame)}" if isinstance(frame, list) else type(frame).__name__
        raise FitInputError(f"{path}: frame {t} is {got}; expected a list of 21 [x, y, z] or null")
    out = np.full((KEYPOINTS, 3), np.nan)
    for k, point in enumerate(frame):
        if point is None:
            continue
        if (not isinstance(point, list) or len(point) != 3
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in point)):
            raise FitInputError(f"{path}: frame {t}, keypoint {k} is {json.dumps(point)[:60]}; expected "
                                "[x, y, z] (numbers) or null")
        values = [float(v) for v in point]
        if not all(math.isfinite(v) for v in values):
            raise FitInputError(f"{path}: frame {t}, keypoint {k} is not finite; expected numbers or null")
        out[k] = values
    return out


def read_keypoints3d(path) -> Tuple[np.ndarray, np.ndarray]:
    """``(keypoints [T, 21, 3] float64 with NaN for missing points, confidence [T, 21])`` of a
    ``.npy``, ``.npz`` or ``.json`` file (module notes)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            text = read_text(path, FitInputError, "keypoint file (JSON)", MAX_JSON_BYTES)
        except FileNotFoundError:
            raise FitInputError(f"{path}: file not found") from None
        except OSError as err:
            raise FitInputError(f"{path}: cannot read ({err.strerror or err})") from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise FitInputError(f"{path}: not valid JSON ({' '.join(str(err).split())[:200]})") from None
        if not isinstance(data, list) or not data:
            raise FitInputError(f"{path}: expected a list of frames, each a list of 21 [x, y, z] or null")
        first = next((p for p in data if p is not None), None)
        single = isinstance(first, list) and len(first) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in first) and len(data) == KEYPOINTS
        frames = [data] if single else data
        points = np.stack([_json_frame(path, frame, t) for t, frame in enumerate(frames)])
        return check_keypoints(path, points, None)
    if suffix == ".npy":
        return check_keypoints(path, _numeric(path, "array", _load_numpy(path)), None)
    if suffix == ".npz":
        with _load_numpy(path) as archive:
            if "keypoints" not in archive.files:
                raise FitInputError(f"{path}: no 'keypoints' array (it has {', '.join(archive.files) or 'none'}); "
                                    "expected keypoints [T, 21, 3] and optionally confidence [T, 21]")
            points = _numeric(path, "keypoints", archive["keypoints"])
            confidence = _numeric(path, "confidence", archive["confidence"]) if "confidence" in archive.files else None
        return check_keypoints(path, points, confidence)
    raise FitInputError(f"{path}: unknown keypoint file type '{path.suffix}'; expected .npy, .npz or .json")


def read_keypoints2d(path) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """``(uv [T, C, 21, 2] float64, confidence [T, C, 21], camera names [C])`` of a ``.npz`` file."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        raise FitInputError(f"{path}: 2D keypoints must be a .npz file with uv [T, C, 21, 2], confidence "
                            "[T, C, 21] and cameras [C]")
    with _load_numpy(path) as archive:
        missing = [k for k in ("uv", "confidence", "cameras") if k not in archive.files]
        if missing:
            raise FitInputError(f"{path}: no {', '.join(repr(m) for m in missing)} array; expected uv [T, C, 21, 2] "
                                "pixels, confidence [T, C, 21] and cameras [C] (names in the camera file)")
        uv = _numeric(path, "uv", archive["uv"])
        confidence = _numeric(path, "confidence", archive["confidence"])
        names = archive["cameras"]
    if uv.ndim != 4 or uv.shape[2:] != (KEYPOINTS, 2) or uv.shape[0] == 0 or uv.shape[1] == 0:
        raise FitInputError(f"{path}: uv has shape {list(uv.shape)}; expected [T, C, 21, 2] pixels")
    if confidence.shape != uv.shape[:3]:
        raise FitInputError(f"{path}: confidence has shape {list(confidence.shape)}; expected {list(uv.shape[:3])} "
                            "([T, C, 21])")
    if names.dtype.kind not in "US" or names.ndim != 1 or len(names) != uv.shape[1]:
        raise FitInputError(f"{path}: cameras must be {uv.shape[1]} names (strings), one per view of uv; "
                            f"got {names.dtype} of shape {list(names.shape)}")
    names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names.tolist()]
    if np.isinf(uv).any():
        raise FitInputError(f"{path}: uv has infinite numbers; expected finite pixels (NaN for a missing point)")
    if not np.isfinite(confidence).all() or (confidence < 0).any():
        raise FitInputError(f"{path}: confidence must be finite numbers ≥ 0 (0 for a missing point)")
    seen = np.isfinite(uv).all(-1) & (confidence > 0)
    empty = np.flatnonzero(~seen.any(axis=(1, 2)))
    if empty.size:
        raise FitInputError(f"{path}: frame {empty[0]} has every keypoint missing in every view; expected at "
                            "least one point per frame")
    return uv, confidence, names


def read_cameras(path, names: List[str], keypoints_path) -> dict:
    """The cameras ``names`` of a ``KRT`` file (the released ``KRT_512`` format), read by the
    project's reader; a name the file lacks is an error naming both files."""
    from common.io.krt import read_krt

    try:
        cameras = read_krt(path)
    except FileNotFoundError as err:
        raise FitInputError(str(err)) from None
    unknown = [n for n in names if n not in cameras]
    if unknown:
        have = list(cameras)
        raise FitInputError(f"{keypoints_path}: camera '{unknown[0]}' is not in {path}; it has "
                            f"{', '.join(have[:12])}{' …' if len(have) > 12 else ''}")
    return cameras


def parse_shape(text: str, option: str) -> Tuple[int, int]:
    """``'512,334'`` → ``(512, 334)`` (height, width in pixels)."""
    try:
        h, w = (int(v) for v in str(text).split(","))
    except ValueError:
        raise FitInputError(f"{option} {text}: expected H,W in pixels, e.g. 512,334") from None
    if h <= 0 or w <= 0:
        raise FitInputError(f"{option} {text}: expected positive H,W in pixels")
    return h, w
