"""Reader for the released DeepHandMesh data (docs/design.md, "Data set files"; docs/data.md) and the
training samples built from it.

Layout, relative to ``data_dir``::

    images/subject_<S>/<seq>/cam<cam>/image<frame>.jpg|.png
    annotations/KRT_512
    annotations/keypoints/subject_<S>/keypoints<frame:04d>.pts
    annotations/depthmaps/subject_<S>/<frame:06d>/depthmap<cam>.pkl

Selection (as the original): sequences whose name contains ``RT`` and not ``ROM``; cameras of
``KRT_512`` whose name starts with ``40`` (the colour cameras), in file order; every
``image<digits>`` file of such a camera in such a sequence is one sample ``(seq, cam, frame)``.

Split. The original has none: its trainer and tester both read every selected frame (the model
is personalised: fitting this subject is the goal). Here ``mode='train'`` and ``mode='test'``
likewise cover the same samples unless ``holdout_sequences`` is given, in which case those
sequences form the test set and are left out of the training set. Differences between the modes:
the choice of target views (below) and nothing else.

Target views. As the original, ``render_view_num`` cameras are drawn without replacement from
*all* colour cameras; the input camera may be among them (its depth map is then a target too).
With ``seed=None``, training draws from torch's generator, which ``DataLoader`` seeds differently
in every worker it starts (fresh views each epoch, as the original; a persistent worker's draws
go on from one epoch to the next); with an integer seed the draw for sample ``i`` is a function
of ``(seed, epoch, i)`` (call :meth:`set_epoch`; the epoch is shared with workers already
running). In ``mode='test'`` the draw is a function of ``(seed or 0, i)`` only: the same views
every time.

Geometry, as the original (``data/dataset.py``, ``common/utils/preprocessing.py``). The cameras'
``K`` is expressed in one pixel space, ``original_img_shape = (512, 334)`` (H, W), whatever the
size of the image and depth-map files. World -> camera ``x_c = R (x - campos)``, pixel ``u = fx
x/(z + 1e-8) + cx``, ``v = fy y/(z + 1e-8) + cy`` (no skew, no lens distortion). In that space the
valid keypoints (those in front of the camera) are projected, their bounding box is enlarged 1.5x
about its centre and clipped to the pixel centres ``[0, W-1] x [0, H-1]``. The box's corners count
as pixel centres, so the patch is ``x1 - x0 + 1`` wide, centred on ``(x0 + x1 + 1) / 2``:

* the render ``affine`` ``[2, 3]`` (float32) is that patch of the cameras' pixel space mapped onto
  the ``rendered_img_shape`` crop (its centre to the crop's centre, no aspect preservation): apply
  it to ``(u, v, 1)`` of projected vertices before rasterising (docs/renderer.md, "Conventions");
* the input crop scales the box to the image file's resolution first (``x * w / W``, ``y * h /
  H``) and takes the patch there, in image pixels; the picture (0-255) is warped bilinearly to
  ``input_img_shape`` and divided by 255. ``img_affine`` maps the cameras' pixel space to the input
  crop (the image file being that space resampled by the centre-aligned rule below).
* a depth map of any resolution is warped with the render affine composed with depth-map pixels
  -> the cameras' pixels by the centre-aligned rule ``k = (r + 0.5) * W / w - 0.5`` (that of
  ``cv2.resize``), nearest neighbour, so that target and rendering are registered. This is a
  deliberate difference (docs/differences.md): the original scales the box to the depth map and warps
  bilinearly, which puts its ``+1`` in depth-map pixels and invents depths on the silhouette and
  across depth edges by mixing foreground, background and the 0 of empty pixels. Outside the
  source: 0 (image black, depth "no depth").

Errors. Any failure to read a sample's file (image, keypoints, depth map) — missing, not UTF-8,
malformed, non-finite or out-of-range numbers, a depth-map pickle that is not a plain numeric
array or holds impossible depths (see ``common.io.safe_pickle``), or any other exception its
reader raises — becomes a one-line :class:`SampleError` whose message starts with the file's
path. ``on_error='stop'`` raises it (from ``DataLoader`` workers too, with the same message).
``on_error='skip'`` logs a warning the first time a file fails (per process), counts the skipped
sample in :attr:`DeepHandMeshDataset.skipped` (shared by ``DataLoader`` workers, also logged with
every warning), returns the next sample in index order that loads (``i+1``, ``i+2``, ...,
wrapping around: the replacement is deterministic) and lists the errors of the samples it skipped
in that sample's ``skipped`` entry, which :class:`SkipReport` gathers from the batches. After 100
consecutive failures it raises.
Problems of the data set as a whole (missing folders, a malformed ``KRT_512``, no sample, fewer
colour cameras than ``render_view_num``) raise at construction whatever the policy.

The dataset holds no open file and no lambda; it pickles, so it works with ``DataLoader``
workers under ``fork`` and ``spawn``, persistent or not.

Speed. Each process keeps what it made of every frame's keypoint file (the keypoints and the
crop box of each camera; the file is still read for every sample and parsed again when its text
changes); depth maps are read by ``common.io.safe_pickle``'s fast path for numpy's own
pickles, and images are warped in OpenCV's channel order with the channels reversed on the
crop. ``python tools/bench.py data`` compares the reader with the original's on one thread.
"""
from __future__ import annotations

import functools
import logging
import math
import multiprocessing
import multiprocessing.context
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.utils.data

from common.errors import DataFormatError, DeepHandMeshError, FileFormatError, MissingFileError, OptionError
from common.io.atomic import atomic_write_text
from common.io.safe_pickle import load_depthmap
from common.io.krt import MAX_ABS_VALUE, MAX_KRT_BYTES, format_numbers, read_krt, write_krt  # noqa: F401 (importable from here)
from common.io.textio import read_text, shown, text_lines

logger = logging.getLogger(__name__)

__all__ = [
    "PTS_JOINT_NAMES", "HAND_PREFIX", "DataFormatError", "SampleError", "read_krt", "write_krt",
    "read_pts_text", "read_pts_raw", "read_pts", "write_pts", "pts_to_model_index", "keypoint_box",
    "clip_box", "patch_affine", "render_affine", "image_affine", "resample_affine", "raster_affine", "warp",
    "input_crop",
    "DeepHandMeshDataset", "ORIGINAL_IMG_SHAPE", "SkipReport", "message_path", "hand_model_pts_index",
]

# Right-hand joints of a keypoint file, by their index 0..20 (21..41 are the left hand).
PTS_JOINT_NAMES = (
    "thumb_null", "thumb3", "thumb2", "thumb1",
    "index_null", "index3", "index2", "index1",
    "middle_null", "middle3", "middle2", "middle1",
    "ring_null", "ring3", "ring2", "ring1",
    "pinky_null", "pinky3", "pinky2", "pinky1",
    "wrist",
)
HAND_PREFIX = "b_r_"
PTS_JOINT_COUNT = 42  # 0-20 right hand, 21-41 left hand
# Readers' limits: numbers of a camera or keypoint file at most this large in size (mm, pixels;
# float32 arithmetic on them stays finite) and files at most this many bytes.
MAX_PTS_BYTES = 2 ** 20
BOX_SCALE = 1.5
# (H, W) of the pixel space the released KRT_512 cameras' K is expressed in, whatever the size
# of the image and depth-map files (the original's ``original_img_shape``).
ORIGINAL_IMG_SHAPE = (512, 334)
MAX_CONSECUTIVE_SKIPS = 100
COLOUR_CAMERA_PREFIX = "40"
IMAGE_RE = re.compile(r"^image(\d+)\.(jpg|jpeg|png)$", re.IGNORECASE)


class SampleError(DeepHandMeshError, RuntimeError):
    """One sample could not be built; the message starts with the offending file's path.

    Raised in a ``DataLoader`` worker, torch re-raises it in the main process as
    ``SampleError("Caught SampleError in DataLoader worker … Original Traceback …")``; the
    message is then reduced to the original one line again (``on_error='stop'`` reports the
    same message with and without workers)."""

    def __init__(self, message: str, path: Optional[str] = None):
        message = str(message)
        if path is None and message.startswith("Caught ") and "Original Traceback" in message:
            message = _from_worker(message)
            path = message_path(message)
        super().__init__(message)
        self.path = path


def _from_worker(message: str) -> str:
    """The one-line message of a SampleError re-raised from a DataLoader worker, whose message
    torch builds from the worker's traceback."""
    lines = [line for line in message.rstrip().split("\n") if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        name, sep, rest = lines[i].partition(": ")
        if sep and name.split(".")[-1] == "SampleError":
            return " ".join([rest] + [line.strip() for line in lines[i + 1:]])
    return lines[-1] if lines else message


def message_path(message: str) -> Optional[str]:
    """The file a one-line sample error starts with (``'<path>[:line]: what'``): the shortest
    prefix before a ``': '`` whose folder exists, without its line number; None when there is none."""
    at = message.find(": ")
    while at > 0:
        path = re.sub(r":\d+$", "", message[:at])
        if Path(path).parent.is_dir():
            return path
        at = message.find(": ", at + 1)
    return None


class SkipReport:
    """The samples ``on_error='skip'`` skipped, per file, gathered from collated batches.

    Every sample carries ``skipped``: the one-line errors of the samples tried before it (``''``
    when none), so the record reaches the main process from ``DataLoader`` workers of any start
    method. ``add(batch)`` takes a collated batch (or one sample)."""

    def __init__(self):
        self.count = 0
        self.files: Dict[str, Tuple[int, str]] = {}  # path -> (skips, first message)

    def add(self, batch: Mapping[str, object]) -> None:
        texts = batch.get("skipped", ())
        for text in ([texts] if isinstance(texts, str) else texts):
            for message in filter(None, text.split("\n")):
                path = message_path(message) or message
                n, first = self.files.get(path, (0, message))
                self.files[path] = (n + 1, first)
                self.count += 1

    def summary(self) -> str:
        """``'3 sample(s) skipped: <path> (2x): <error>; …'``, or ``'no sample skipped'``."""
        if not self.count:
            return "no sample skipped"
        parts = [f"{first} ({n}x)" for _path, (n, first) in sorted(self.files.items())]
        return f"{self.count} sample(s) skipped, {len(self.files)} file(s): " + "; ".join(parts)


# ---------------------------------------------------------------------------- keypoint files
def read_pts_text(path: os.PathLike | str) -> str:
    """The text of a ``.pts`` keypoint file (UTF-8, at most ``MAX_PTS_BYTES``; see ``read_text``)."""
    try:
        return read_text(path, DataFormatError, "keypoint file", MAX_PTS_BYTES)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: keypoint file not found") from None


def read_pts_raw(path: os.PathLike | str, text: Optional[str] = None) -> Dict[int, Tuple[np.ndarray, float, float]]:
    """Read a ``.pts`` keypoint file: ``{index: (xyz [3] world mm, score, num_views)}``.

    Lines are ``idx x y z score num_views``; blank lines and ``#`` comments are skipped.
    ``text``: the file's text when it has been read already (:func:`read_pts_text`).
    """
    path = Path(path)
    if text is None:
        text = read_pts_text(path)
    points: Dict[int, Tuple[np.ndarray, float, float]] = {}
    for number, line in enumerate(text_lines(text), 1):
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        if len(tokens) != 6:
            raise DataFormatError(f"{path}:{number}: expected 'idx x y z score num_views', "
                                  f"found {len(tokens)} field(s)")
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise DataFormatError(f"{path}:{number}: fields must be numbers, found "
                                  f"'{shown(line.strip())}'") from None
        if not all(map(math.isfinite, values)):
            raise DataFormatError(f"{path}:{number}: '{shown(line.strip())}' has a non-finite "
                                  "number (nan or inf)")
        idx = values[0]
        if idx != int(idx) or not 0 <= idx < PTS_JOINT_COUNT:
            raise DataFormatError(f"{path}:{number}: joint index must be an integer 0..."
                                  f"{PTS_JOINT_COUNT - 1} (0-20 right hand, 21-41 left), found "
                                  f"{shown(tokens[0])}")
        if max(map(abs, values[1:4])) > MAX_ABS_VALUE:
            raise DataFormatError(f"{path}:{number}: a coordinate is larger than "
                                  f"{MAX_ABS_VALUE:g} mm in size (not a plausible keypoint)")
        if int(idx) in points:
            raise DataFormatError(f"{path}:{number}: joint {int(idx)} appears twice")
        points[int(idx)] = (np.array(values[1:4]), values[4], values[5])
    return points


def pts_to_model_index(joint_names: Sequence[str]) -> np.ndarray:
    """``[21]`` int64: the hand-model joint of each right-hand keypoint index, matched by name.

    A keypoint ``name`` matches the model joint ``b_r_<name>`` (or ``<name>``). Model joints that
    no keypoint names (``b_r_thumb0``) stay invalid. A keypoint without a model joint is an error.
    """
    names = list(joint_names)
    index = np.empty(len(PTS_JOINT_NAMES), np.int64)
    for k, pts_name in enumerate(PTS_JOINT_NAMES):
        hits = [j for j, n in enumerate(names) if n in (HAND_PREFIX + pts_name, pts_name)]
        if len(hits) != 1:
            found = "none" if not hits else f"{len(hits)}"
            raise FileFormatError(f"the hand model needs exactly one joint named "
                             f"'{HAND_PREFIX}{pts_name}' for keypoint {k}, found {found}; "
                             f"its joints are: {', '.join(names)}")
        index[k] = hits[0]
    return index


def hand_model_pts_index(hand_model) -> np.ndarray:
    """:func:`pts_to_model_index` of a ``HandModel`` (or a list of joint names); a model without
    the keypoints' joints raises a ``ValueError`` naming its ``skeleton.txt``."""
    names = getattr(hand_model, "joint_names", hand_model)
    try:
        return pts_to_model_index(names)
    except ValueError as err:
        source = getattr(hand_model, "source", None)
        if source is None:
            raise
        where = source if str(source).startswith("<") else Path(source) / "skeleton.txt"
        raise FileFormatError(f"{where}: {err}") from None


def read_pts(path: os.PathLike | str, joint_names: Sequence[str],
             model_index: Optional[np.ndarray] = None, text: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Right-hand keypoints of a ``.pts`` file in the hand model's joint order (``text``: the file's
    text when it has been read already).

    Returns:
        ``joint_world [J, 3]`` float32 (mm; 0 for invalid joints), ``joint_valid [J]`` float32
        (1 for joints in the file, 0 otherwise, e.g. always for ``thumb0``).
    """
    if model_index is None:
        model_index = pts_to_model_index(joint_names)
    J = len(joint_names)
    joint_world = np.zeros((J, 3), np.float32)
    joint_valid = np.zeros(J, np.float32)
    for idx, (xyz, _score, _views) in read_pts_raw(path, text).items():
        if idx < len(PTS_JOINT_NAMES):  # 21..41: left hand
            joint_world[model_index[idx]] = xyz
            joint_valid[model_index[idx]] = 1.0
    return joint_world, joint_valid


def write_pts(path: os.PathLike | str, joint_world: np.ndarray, joint_valid: np.ndarray,
              joint_names: Sequence[str], score: float = 1.0, num_views: int = 1) -> None:
    """Write the valid right-hand joints (model order) as a ``.pts`` file, in keypoint order."""
    model_index = pts_to_model_index(joint_names)
    joint_world = np.asarray(joint_world, np.float64).reshape(len(joint_names), 3)
    joint_valid = np.asarray(joint_valid).reshape(len(joint_names))
    lines = []
    for k, j in enumerate(model_index):
        if joint_valid[j] > 0:
            lines.append(f"{k} {format_numbers(joint_world[j])} {score!r} {num_views!r}")
    atomic_write_text(path, "".join(line + "\n" for line in lines))


# --------------------------------------------------------------------------------- geometry
def keypoint_box(joint_world: np.ndarray, camrot: np.ndarray, campos: np.ndarray, focal: np.ndarray,
                 princpt: np.ndarray, scale: float = BOX_SCALE) -> np.ndarray:
    """The original's ``get_bbox``: ``[x0, y0, x1, y1]`` float32 around the projected keypoints.

    Each point goes to the camera one at a time (``R · (x − campos)``) and to pixels with
    ``x = fx·X/(Z + 1e-8) + cx``, all in float32 as the original computes it, so that the box
    (and from it the crop) is the original's to the last bit. The points' extent is enlarged
    ``scale`` times about its centre.

    Args:
        joint_world: ``[P, 3]`` valid keypoints in front of the camera, world mm (float32).
        camrot ``[3, 3]``, campos ``[3]``, focal ``[2]``, princpt ``[2]``: float32, K-space pixels.
    Raises:
        ValueError: no point to frame.
    """
    points = np.asarray(joint_world, np.float32).reshape(-1, 3)
    if len(points) == 0:
        raise ValueError("no keypoint to frame")
    cam = np.array([np.dot(camrot, p - campos) for p in points])
    x = cam[:, 0] / (cam[:, 2] + 1e-8) * focal[0] + princpt[0]
    y = cam[:, 1] / (cam[:, 2] + 1e-8) * focal[1] + princpt[1]
    x0, x1, y0, y1 = x.min(), x.max(), y.min(), y.max()
    xc, yc = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    w, h = x1 - x0, y1 - y0
    return np.array([xc - 0.5 * w * scale, yc - 0.5 * h * scale,
                     xc + 0.5 * w * scale, yc + 0.5 * h * scale]).astype(np.float32)


def clip_box(box: np.ndarray, original_img_shape: Tuple[int, int]) -> np.ndarray:
    """The box clipped to the pixel centres ``[0, W−1] × [0, H−1]`` of the cameras' image.

    Python's ``max``/``min`` on the float32 values, as the original: the array that comes out is
    float64 where a side was clipped and float32 otherwise, and later arithmetic follows that.

    Raises:
        ValueError: the box has no extent inside the image.
    """
    H, W = original_img_shape
    x0, y0, x1, y1 = box
    clipped = np.array([max(x0, 0), max(y0, 0), min(x1, W - 1), min(y1, H - 1)])
    if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
        raise ValueError(f"the keypoints' box {np.round(np.asarray(box, np.float64), 2).tolist()} has no "
                         f"extent inside the {W}x{H} image")
    return clipped


def patch_affine(centre_x: float, centre_y: float, width: float, height: float,
                 out_shape: Tuple[int, int]) -> np.ndarray:
    """``[2, 3]`` affine taking a ``width × height`` patch centred on ``(centre_x, centre_y)`` onto an
    ``out_shape = (H, W)`` crop: the patch centre to ``(W/2, H/2)``, its half extents to ``W/2`` and
    ``H/2`` (no aspect preservation). The original's ``gen_trans_from_patch_cv`` without scale or
    rotation: three float32 point pairs through ``cv2.getAffineTransform``."""
    H, W = out_shape
    centre = np.array([centre_x, centre_y], np.float32)
    src = np.stack([centre, centre + np.array([0, height * 0.5], np.float32),
                    centre + np.array([width * 0.5, 0], np.float32)]).astype(np.float32)
    mid = np.array([W * 0.5, H * 0.5], np.float32)
    dst = np.stack([mid, mid + np.array([0, H * 0.5], np.float32),
                    mid + np.array([W * 0.5, 0], np.float32)]).astype(np.float32)
    return cv2.getAffineTransform(src, dst)


def render_affine(box: np.ndarray, out_shape: Tuple[int, int]) -> np.ndarray:
    """``[2, 3]`` float32: the cameras' pixel space → a rendered crop, for a clipped box.

    As the original: centre ``((x0+x1+1)/2, (y0+y1+1)/2)`` and size ``(x1−x0+1, y1−y0+1)``, the box's
    corners being pixel centres."""
    x0, y0, x1, y1 = box
    return patch_affine((x0 + x1 + 1) / 2.0, (y0 + y1 + 1) / 2.0, x1 - x0 + 1, y1 - y0 + 1,
                        out_shape).astype(np.float32)


def image_affine(box: np.ndarray, original_img_shape: Tuple[int, int], image_shape: Tuple[int, int],
                 out_shape: Tuple[int, int]) -> np.ndarray:
    """``[2, 3]`` affine: pixels of an image of ``image_shape = (h, w)`` → the input crop.

    As the original: the clipped box (cameras' pixel space) is scaled by ``w/W`` and ``h/H``, and
    the patch is centred on ``x0 + (x1−x0+1)/2`` with size ``x1−x0+1`` in *image* pixels."""
    (H, W), (h, w) = original_img_shape, image_shape
    x0, y0, x1, y1 = box
    x0, x1 = np.array([x0, x1]) / W * w
    y0, y1 = np.array([y0, y1]) / H * h
    width, height = x1 - x0 + 1, y1 - y0 + 1
    return patch_affine(float(x0 + 0.5 * width), float(y0 + 0.5 * height), float(width), float(height),
                        out_shape)


def resample_affine(src_shape: Tuple[int, int], dst_shape: Tuple[int, int]) -> np.ndarray:
    """``[2, 3]`` map from the pixels of a raster of ``src_shape = (H, W)`` to those of the same view
    stored at ``dst_shape``, by the centre-aligned rule of ``cv2.resize``: ``r = (k + 0.5) * w/W − 0.5``."""
    sy, sx = dst_shape[0] / src_shape[0], dst_shape[1] / src_shape[1]
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])


def raster_affine(affine: np.ndarray, kspace_shape: Tuple[int, int],
                  raster_shape: Tuple[int, int]) -> np.ndarray:
    """The affine of a raster of ``raster_shape`` whose pixels cover the cameras' pixel space of
    shape ``kspace_shape``: ``affine`` composed with raster -> that space (:func:`resample_affine`)."""
    return np.asarray(affine, np.float64) @ _raster_to_kspace(tuple(raster_shape), tuple(kspace_shape))


@functools.lru_cache(maxsize=64)
def _raster_to_kspace(raster_shape: Tuple[int, int], kspace_shape: Tuple[int, int]) -> np.ndarray:
    """``[3, 3]`` :func:`resample_affine` from a raster to the cameras' pixel space, made once per
    pair of shapes (every sample asks for the same few); read-only, as it is shared."""
    k_from_r = np.vstack([resample_affine(raster_shape, kspace_shape), [0.0, 0.0, 1.0]])
    k_from_r.flags.writeable = False
    return k_from_r


def warp(raster: np.ndarray, affine: np.ndarray, out_shape: Tuple[int, int],
         nearest: bool, out: Optional[np.ndarray] = None) -> np.ndarray:
    """``cv2.warpAffine`` of ``raster`` with the forward map ``affine``; 0 outside the source.

    ``out``: a C-contiguous array of the result's shape and dtype to write into (no new array)."""
    H, W = out_shape
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    result = cv2.warpAffine(raster, np.asarray(affine, np.float64), (int(W), int(H)), dst=out, flags=flags,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if out is not None and result is not out and not np.shares_memory(result, out):
        out[...] = result  # OpenCV made a new array (out of another dtype or shape): copy it in
        return out
    return result


def input_crop(image_bgr: np.ndarray, affine: np.ndarray, out_shape: Tuple[int, int]) -> np.ndarray:
    """The input crop ``[3, H, W]`` float32, RGB in [0, 1], of a decoded ``[h, w, 3]`` uint8 BGR image.

    The original's values exactly: the 0-255 picture as float32, warped bilinearly by ``affine``
    (image pixels -> crop), then divided by 255 in float32. Done in BGR order, with the channels
    reversed while the warped planes are split into the CHW array (each channel is warped
    alone, so the order changes nothing but saves a pass over the full image)."""
    warped = warp(image_bgr.astype(np.float32), affine, out_shape, nearest=False)
    crop = np.empty((3,) + tuple(warped.shape[:2]), np.float32)
    cv2.split(warped, [crop[2], crop[1], crop[0]])
    np.divide(crop, np.float32(255), out=crop)
    return crop


# ---------------------------------------------------------------- counts shared with workers
class _SharedCount:
    """An integer shared by the dataset and its ``DataLoader`` workers (the skip count, the epoch).

    It lives in shared memory (a ``multiprocessing`` raw array that reaches workers by inheritance,
    under ``fork`` and ``spawn`` alike), so that persistent workers, which keep the copy of the
    data set they started with, see the main process's :meth:`set` too. With ``slots > 1`` it is
    a sum with one slot per process: the main process writes slot 0, worker ``w`` slot ``w + 1``
    (:meth:`add`), so no lock is needed. A plain pickle carries only the current value.
    """

    def __init__(self, value: int = 0, slots: int = 1):
        self.slots = int(slots)
        try:
            self._shared = multiprocessing.RawArray("q", self.slots)
        except (OSError, ImportError):  # no shared memory here: this process only
            self._shared = [0] * self.slots
        self._shared[0] = value

    def add(self) -> int:
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None or self.slots == 1 else 1 + info.id % (self.slots - 1)
        self._shared[slot] += 1
        return self.value

    def set(self, value: int) -> None:
        """The value (from the main process; the other slots are cleared)."""
        self._shared[:] = [int(value)] + [0] * (self.slots - 1)

    @property
    def value(self) -> int:
        return int(sum(self._shared[:]))

    def __getstate__(self):
        if (not isinstance(self._shared, list)
                and multiprocessing.context.get_spawning_popen() is not None):
            return {"shared": self._shared, "slots": self.slots}
        return {"value": self.value, "slots": self.slots}

    def __setstate__(self, state):
        if "shared" in state:
            self.slots, self._shared = state["slots"], state["shared"]
        else:
            self.__init__(state["value"], state["slots"])


SKIP_COUNT_SLOTS = 256


# ------------------------------------------------------------------------------ frame cache
class _FrameCache:
    """What this process has made of each frame's keypoint file: ``{frame: (fingerprint of the
    text, joint_world, joint_valid, {camera index: clipped box})}``.

    The file is still read for every sample (a file changed or broken since is noticed); only the
    parsing and the boxes' projections (the original's per-point arithmetic, a tenth of a sample's
    time) are done once per text. The fingerprint is the text's length and 64-bit hash. Not pickled:
    every ``DataLoader`` worker starts empty and fills its own (about 2 kB per frame)."""

    def __init__(self):
        self.entries: Dict[int, tuple] = {}

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.entries = {}


# ---------------------------------------------------------------------------------- dataset
class DeepHandMeshDataset(torch.utils.data.Dataset):
    """Training / test samples of one subject of the released DeepHandMesh data.

    Each item is a dict (collates with the default ``collate_fn``), ``N = render_view_num``:

    ================  ==================  ==========================================================
    ``img``           ``[3, H, W]`` f32    input crop, RGB in [0, 1], ``(H, W) = input_img_shape``
    ``img_affine``    ``[2, 3]`` f32       K space of the input camera -> input crop pixels
    ``depthmap``      ``[N, Hr, Wr]`` f32  target depth crops (mm, 0 = none), ``rendered_img_shape``
    ``camrot``        ``[N, 3, 3]`` f32    R of each target camera (``x_c = R (x - campos)``)
    ``campos``        ``[N, 3]`` f32       camera centres, world mm
    ``focal``         ``[N, 2]`` f32       (fx, fy), K-space pixels
    ``princpt``       ``[N, 2]`` f32       (cx, cy), K-space pixels
    ``affine``        ``[N, 2, 3]`` f32    K space of each target camera -> rendered crop pixels
    ``view_cam_idx``  ``[N]`` int64        indices of the target cameras in :attr:`cameras`
    ``joint_world``   ``[J, 3]`` f32       keypoints in the hand model's joint order, world mm
    ``joint_valid``   ``[J]`` f32          1 where the keypoint file has the joint
    ``index``         int                  the sample's index (after any skip)
    ``frame``         int                  frame number
    ``cam``           str                  input camera name
    ``seq``           str                  sequence name
    ``skipped``       str                  errors of the samples skipped for this one, one a line
    ================  ==================  ==========================================================

    Args:
        data_dir: folder holding ``images/`` and ``annotations/``.
        subject: subject number (``subject_<n>`` folders).
        mode: ``'train'`` or ``'test'`` (see the module notes on the split and view draws).
        joint_names: the hand model's joint names (``HandModel.joint_names``).
        input_img_shape, rendered_img_shape: ``(H, W)`` of the input and target crops.
        render_view_num: target views per sample.
        on_error: ``'stop'`` (raise :class:`SampleError`) or ``'skip'``.
        seed: ``None`` or an integer (see the module notes).
        original_img_shape: ``(H, W)`` of the pixel space of the cameras' ``K`` (the released
            ``KRT_512``: 512 x 334), whatever the size of the image and depth-map files.
        holdout_sequences: sequences kept for ``mode='test'`` and left out of ``'train'``.
        depth_min: smallest valid depth (mm, ``cfg.depth_min``); a depth map with a non-zero
            depth below it is refused as corrupt.
    """

    def __init__(self, data_dir: os.PathLike | str, subject: int = 4, mode: str = "train",
                 joint_names: Sequence[str] = (), input_img_shape: Tuple[int, int] = (256, 256),
                 rendered_img_shape: Tuple[int, int] = (256, 256), render_view_num: int = 6,
                 on_error: str = "stop", seed: Optional[int] = None,
                 original_img_shape: Tuple[int, int] = ORIGINAL_IMG_SHAPE,
                 holdout_sequences: Sequence[str] = (), depth_min: float = 1.0):
        if mode not in ("train", "test"):
            raise ValueError(f"mode must be 'train' or 'test', got {mode!r}")
        if on_error not in ("stop", "skip"):
            raise OptionError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
        if render_view_num < 1:
            raise OptionError(f"render_view_num must be at least 1, got {render_view_num}")
        self.data_dir = Path(data_dir)
        self.subject = int(subject)
        self.mode = mode
        self.joint_names = list(joint_names)
        self.input_img_shape = _image_shape(input_img_shape, "input_img_shape")
        self.rendered_img_shape = _image_shape(rendered_img_shape, "rendered_img_shape")
        self.render_view_num = int(render_view_num)
        self.on_error = on_error
        self.seed = None if seed is None else int(seed)
        self.original_img_shape = _image_shape(original_img_shape, "original_img_shape")
        self.depth_min = float(depth_min)
        self._epoch = _SharedCount(0)  # shared: persistent DataLoader workers see set_epoch
        self._model_index = pts_to_model_index(self.joint_names)

        subject_dir = f"subject_{self.subject}"
        self.image_dir = self.data_dir / "images" / subject_dir
        self.krt_path = self.data_dir / "annotations" / "KRT_512"
        self.keypoint_dir = self.data_dir / "annotations" / "keypoints" / subject_dir
        self.depthmap_dir = self.data_dir / "annotations" / "depthmaps" / subject_dir
        if not self.image_dir.is_dir():
            raise MissingFileError(f"{self.image_dir}: image folder not found")

        # cameras
        krt = read_krt(self.krt_path)
        self.cameras: List[str] = [c for c in krt if c.startswith(COLOUR_CAMERA_PREFIX)]
        if not self.cameras:
            raise DataFormatError(f"{self.krt_path}: no colour camera (name starting with "
                             f"'{COLOUR_CAMERA_PREFIX}') among {len(krt)} camera(s)")
        if self.render_view_num > len(self.cameras):
            raise DataFormatError(f"{self.krt_path}: only {len(self.cameras)} colour camera(s), fewer "
                             f"than render_view_num={self.render_view_num}")
        self.camrot = np.stack([krt[c]["camrot"] for c in self.cameras]).astype(np.float32)
        self.campos = np.stack([krt[c]["campos"] for c in self.cameras]).astype(np.float32)
        self.focal = np.stack([krt[c]["focal"] for c in self.cameras]).astype(np.float32)
        self.princpt = np.stack([krt[c]["princpt"] for c in self.cameras]).astype(np.float32)

        # sequences
        found = sorted(d.name for d in self.image_dir.iterdir() if d.is_dir())
        sequences = [s for s in found if "RT" in s and "ROM" not in s]
        holdout = list(holdout_sequences)
        unknown = [s for s in holdout if s not in sequences]
        if unknown:
            raise OptionError(f"holdout_sequences {unknown} are not among the selected sequences "
                             f"of {self.image_dir}: {sequences}")
        if holdout:
            sequences = [s for s in sequences if (s in holdout) == (mode == "test")]
        self.sequences: List[str] = sequences

        # samples: (sequence index, camera index, frame, image file name)
        samples: List[Tuple[int, int, int, str]] = []
        for si, seq in enumerate(self.sequences):
            for ci, cam in enumerate(self.cameras):
                cam_dir = self.image_dir / seq / f"cam{cam}"
                if not cam_dir.is_dir():
                    continue
                frames: Dict[int, str] = {}
                for name in sorted(os.listdir(cam_dir)):
                    match = IMAGE_RE.match(name)
                    if match:
                        frames.setdefault(int(match.group(1)), name)
                samples.extend((si, ci, f, frames[f]) for f in sorted(frames))
        if not samples:
            raise DataFormatError(f"{self.image_dir}: no image of a colour camera in sequences "
                             f"{self.sequences} (of {found})")
        self._samples = samples
        self._skips = _SharedCount(slots=SKIP_COUNT_SLOTS)
        self._frames = _FrameCache()
        self._warned: set = set()
        logger.info("DeepHandMesh %s set: %d samples from %d sequence(s) %s, %d colour camera(s), "
                    "%d target view(s) each", mode, len(samples), len(self.sequences),
                    self.sequences, len(self.cameras), self.render_view_num)

    @classmethod
    def from_config(cls, cfg, mode: str, hand_model, **overrides) -> "DeepHandMeshDataset":
        """Build from a ``Config`` and a ``HandModel`` (or a list of joint names).

        ``overrides`` set the arguments the configuration does not hold (``seed``) or replace
        those it does.
        """
        names = getattr(hand_model, "joint_names", hand_model)
        hand_model_pts_index(hand_model)  # a model without the keypoints' joints: name its file
        kwargs = dict(data_dir=cfg.data_dir, subject=cfg.subject, mode=mode, joint_names=names,
                      input_img_shape=tuple(cfg.input_img_shape),
                      rendered_img_shape=tuple(cfg.rendered_img_shape),
                      render_view_num=cfg.render_view_num,
                      original_img_shape=tuple(cfg.original_img_shape),
                      holdout_sequences=tuple(getattr(cfg, "holdout_sequences", ()) or ()),
                      depth_min=cfg.depth_min, on_error=getattr(cfg, "on_error", "stop"))
        kwargs.update(overrides)
        return cls(**kwargs)

    # ------------------------------------------------------------------------- access
    def __len__(self) -> int:
        return len(self._samples)

    @property
    def samples(self) -> List[Tuple[str, str, int]]:
        """``(sequence, camera, frame)`` of every sample, in index order."""
        return [(self.sequences[s], self.cameras[c], f) for s, c, f, _ in self._samples]

    @property
    def skipped(self) -> int:
        """Samples skipped so far (``on_error='skip'``), summed over ``DataLoader`` workers."""
        return self._skips.value

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """Vary the target views of a seeded training set from one epoch to the next. Held in shared
        memory: ``DataLoader`` workers started earlier (persistent workers) draw this epoch's views."""
        self._epoch.set(epoch)

    def image_path(self, idx: int) -> Path:
        s, c, _f, name = self._samples[idx]
        return self.image_dir / self.sequences[s] / f"cam{self.cameras[c]}" / name

    def keypoint_path(self, frame: int) -> Path:
        return self.keypoint_dir / f"keypoints{frame:04d}.pts"

    def depthmap_path(self, frame: int, cam: str) -> Path:
        return self.depthmap_dir / f"{frame:06d}" / f"depthmap{cam}.pkl"

    def __getitem__(self, idx: int) -> Dict[str, object]:
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample index {idx} out of range for {n} samples")
        idx %= n
        last: Optional[SampleError] = None
        failures: List[str] = []
        for attempt in range(min(n, MAX_CONSECUTIVE_SKIPS)):
            j = (idx + attempt) % n
            try:
                sample = self.load_sample(j)
                sample["skipped"] = "\n".join(failures)  # read by SkipReport
                return sample
            except SampleError as err:
                if self.on_error == "stop":
                    raise
                self._record_skip(err, j)
                failures.append(" ".join(str(err).split()))
                last = err
        raise SampleError(f"{min(n, MAX_CONSECUTIVE_SKIPS)} consecutive samples from index {idx} "
                          f"could not be loaded; the last error: {last}",
                          None if last is None else last.path)

    def _record_skip(self, err: SampleError, idx: int) -> None:
        count = self._skips.add()
        key = err.path or str(err)
        if key in self._warned:
            logger.debug("skipped sample %d: %s (%d skipped so far)", idx, err, count)
            return
        self._warned.add(key)
        logger.warning("skipped sample %d: %s (%d sample(s) skipped so far; further failures of "
                       "this file are not reported again)", idx, err, count)

    # ------------------------------------------------------------------------- loading
    def draw_views(self, idx: int) -> np.ndarray:
        """Indices into :attr:`cameras` of the target views of sample ``idx``."""
        n, k = len(self.cameras), self.render_view_num
        if self.mode == "train" and self.seed is None:
            return torch.randperm(n)[:k].numpy().astype(np.int64)
        seed = 0 if self.seed is None else self.seed
        key = [seed, idx] if self.mode == "test" else [seed, self.epoch, idx]
        return np.random.default_rng(key).choice(n, size=k, replace=False).astype(np.int64)

    def sample_box(self, joint_world: np.ndarray, joint_valid: np.ndarray, cam_idx: int) -> np.ndarray:
        """The clipped crop box ``[x0, y0, x1, y1]`` of camera ``cam_idx``, in the cameras' pixel
        space (``original_img_shape``), from the valid keypoints in front of the camera."""
        R, C = self.camrot[cam_idx], self.campos[cam_idx]
        points = joint_world[joint_valid > 0]
        points = points[(points - C) @ R[2] > 0]
        box = keypoint_box(points, R, C, self.focal[cam_idx], self.princpt[cam_idx])
        return clip_box(box, self.original_img_shape)

    def _frame_keypoints(self, frame: int, path: Path) -> Tuple[np.ndarray, np.ndarray, Dict[int, np.ndarray]]:
        """``joint_world``, ``joint_valid`` (:func:`read_pts`) and the frame's boxes by camera so far.
        The file is read every time and parsed when its text is not the one parsed last (:class:`_FrameCache`)."""
        text = read_pts_text(path)
        fingerprint = (len(text), hash(text))
        entry = self._frames.entries.get(frame)
        if entry is None or entry[0] != fingerprint:
            joint_world, joint_valid = read_pts(path, self.joint_names, self._model_index, text=text)
            entry = self._frames.entries[frame] = (fingerprint, joint_world, joint_valid, {})
        return entry[1], entry[2], entry[3]

    def load_sample(self, idx: int) -> Dict[str, object]:
        """Build sample ``idx`` (no skipping); raises :class:`SampleError`."""
        s, c, frame, _name = self._samples[idx]
        cam = self.cameras[c]

        kp_path = self.keypoint_path(frame)
        try:
            joint_world, joint_valid, boxes = self._frame_keypoints(frame, kp_path)
        except Exception as err:  # any failure to read one file costs one sample (on_error)
            raise _sample_error(kp_path, err) from err
        if not joint_valid.any():
            raise SampleError(f"{kp_path}: no right-hand keypoint (indices 0-20)", str(kp_path))

        def box_of(view: int) -> np.ndarray:
            box = boxes.get(view)
            if box is None:
                try:
                    box = boxes[view] = self.sample_box(joint_world, joint_valid, view)
                except ValueError as err:
                    raise SampleError(f"{kp_path}: camera {self.cameras[view]}: {err}", str(kp_path)) from None
            return box

        img_path = self.image_path(idx)
        try:
            img = _read_image(img_path)
        except Exception as err:
            raise _sample_error(img_path, err) from err
        h, w = img.shape[:2]
        to_crop = image_affine(box_of(c), self.original_img_shape, (h, w), self.input_img_shape)
        # As the original: the 0-255 picture is warped, then divided by 255 (in float32).
        img = input_crop(img, to_crop, self.input_img_shape)
        # Where a point of the cameras' pixel space appears in the crop (the image being that
        # space resampled); at 512 x 334 exactly the crop's own affine.
        img_affine = raster_affine(to_crop, (h, w), self.original_img_shape)

        views = self.draw_views(idx)
        depthmaps = np.empty((len(views),) + self.rendered_img_shape, np.float32)  # warped into
        affines = []
        for k, v in enumerate(views):
            affine = render_affine(box_of(int(v)), self.rendered_img_shape)
            path = self.depthmap_path(frame, self.cameras[v])
            try:
                depth = load_depthmap(path, self.depth_min)
                # The render affine itself, composed with depth-map pixels -> the cameras' pixels:
                # target and rendering are registered at any depth-map resolution.
                warp(depth, raster_affine(affine, self.original_img_shape, depth.shape),
                     self.rendered_img_shape, nearest=True, out=depthmaps[k])
            except Exception as err:  # e.g. a map too large for cv2.warpAffine
                raise _sample_error(path, err) from err
            affines.append(affine)

        return {
            "img": torch.from_numpy(img),
            "img_affine": torch.from_numpy(img_affine.astype(np.float32)),
            "depthmap": torch.from_numpy(depthmaps),
            "camrot": torch.from_numpy(self.camrot[views]),
            "campos": torch.from_numpy(self.campos[views]),
            "focal": torch.from_numpy(self.focal[views]),
            "princpt": torch.from_numpy(self.princpt[views]),
            "affine": torch.from_numpy(np.stack(affines).astype(np.float32)),
            "view_cam_idx": torch.from_numpy(views),
            "joint_world": torch.from_numpy(joint_world.copy()),  # (the cache keeps its own)
            "joint_valid": torch.from_numpy(joint_valid.copy()),
            "index": idx,
            "frame": frame,
            "cam": cam,
            "seq": self.sequences[s],
        }


# -------------------------------------------------------------------------------- helpers
def _image_shape(value, what: str) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise OptionError(f"{what} must be (height, width), got {value!r}") from None
    if h < 1 or w < 1:
        raise OptionError(f"{what} must be positive, got {value!r}")
    return h, w


def _sample_error(path: Path, err: Exception) -> SampleError:
    """The SampleError of any exception reading ``path`` raised: one line starting with the path."""
    if isinstance(err, SampleError):
        return err
    text = " ".join(str(err).split())
    if isinstance(err, FileNotFoundError):
        text = f"{path}: file not found"
    elif not text.startswith(str(path)):
        text = f"{path}: {type(err).__name__}: {text}"
    return SampleError(text, str(path))


def _read_image(path: Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 BGR, as OpenCV decodes it; SampleError naming ``path`` on failure."""
    if not path.is_file():
        raise SampleError(f"{path}: file not found", str(path))
    data = np.fromfile(str(path), np.uint8)
    img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if img is None:
        raise SampleError(f"{path}: could not be decoded as an image (corrupt or not an image)",
                          str(path))
    return img
