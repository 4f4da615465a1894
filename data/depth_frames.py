"""The frames of a data set in the released layout, read for personalisation: per frame its keypoints
and its depth maps cropped around the hand, as the training's target views (docs/personalise.md).

Layout read (images are not needed; ``images/`` only names the sequences, for ``--sequences``)::

    annotations/KRT_512                                          cameras
    annotations/keypoints/subject_<S>/keypoints<frame:04d>.pts   3D keypoints (mm)
    annotations/depthmaps/subject_<S>/<frame:06d>/depthmap<cam>.pkl
    images/subject_<S>/<seq>/cam<cam>/image<frame>.jpg           (optional)

A frame is one folder of ``depthmaps/``; its views are the colour cameras of ``KRT_512`` (names
starting with ``40``, as the training reader) that have a depth map there. Each view is cropped as
the training reader crops a target view: the box around the keypoints projected into that camera,
enlarged 1.5 times, mapped onto ``render_shape`` pixels (:func:`data.dataset.render_affine`); the
depth map is warped into that crop with nearest neighbours, registered with the rendering.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from common.errors import DataFormatError, MissingFileError, OptionError
from common.io.krt import read_krt
from common.io.safe_pickle import load_depthmap
from common.personalise.errors import PersonaliseInputError
from data.dataset import (COLOUR_CAMERA_PREFIX, IMAGE_RE, ORIGINAL_IMG_SHAPE, PTS_JOINT_NAMES, clip_box,
                          keypoint_box, pts_to_model_index, raster_affine, read_pts, read_pts_raw, read_pts_text,
                          render_affine, warp)

log = logging.getLogger("deephandmesh")

FRAME_DIR_RE = re.compile(r"^(\d+)$")
SUBJECT_RE = re.compile(r"^subject_(\d+)$")


@dataclass
class DepthFrames:
    """The frames of a data set, ready for the depth objective (``T`` frames, ``P`` views in all).

    Views are listed flat (a frame may have fewer views than another): view ``p`` belongs to frame
    ``view_frame[p]``.

    Attributes:
        frames: ``[T]`` frame numbers; names: ``[T]`` ``'<seq>/<frame>'`` or ``'frame <n>'``.
        keypoints_pts: ``[T, 21, 3]`` float64 mm in the ``.pts`` order (``dhm``), NaN where missing.
        joint_world: ``[T, J, 3]`` float32 keypoints in the hand model's joint order (0 where missing).
        joint_valid: ``[T, J]`` float32, 1 where the keypoint exists.
        view_frame: ``[P]`` int64; cameras: ``[P]`` camera names.
        camrot ``[P, 3, 3]``, campos ``[P, 3]``, focal ``[P, 2]``, princpt ``[P, 2]``, affine ``[P, 2, 3]``:
            float32, as the training reader gives them (``affine``: cameras' pixels → crop).
        depth: ``[P, H, W]`` float32 captured depth in the crop (mm, 0 = none).
    """

    data_dir: Path
    subject: int
    frames: List[int]
    names: List[str]
    keypoints_pts: np.ndarray
    joint_world: np.ndarray
    joint_valid: np.ndarray
    view_frame: np.ndarray
    cameras: List[str]
    camrot: np.ndarray
    campos: np.ndarray
    focal: np.ndarray
    princpt: np.ndarray
    affine: np.ndarray
    depth: np.ndarray

    @property
    def frame_num(self) -> int:
        return len(self.frames)

    @property
    def view_num(self) -> int:
        return len(self.view_frame)

    def tensors(self, device, dtype=torch.float32) -> Dict[str, torch.Tensor]:
        """The arrays the objective reads, as tensors on ``device``."""
        as_t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)  # noqa: E731
        return {"camrot": as_t(self.camrot), "campos": as_t(self.campos), "focal": as_t(self.focal),
                "princpt": as_t(self.princpt), "affine": as_t(self.affine), "depth": as_t(self.depth),
                "view_frame": torch.as_tensor(self.view_frame, dtype=torch.long, device=device),
                "joint_world": as_t(self.joint_world), "joint_valid": as_t(self.joint_valid)}


def parse_frame_list(text: str, option: str = "--frames") -> List[int]:
    """``'0,3,5-8'`` → ``[0, 3, 5, 6, 7, 8]`` (frame numbers, in the order given, without repeats)."""
    out: List[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise OptionError(f"{option} {text}: expected frame numbers and ranges such as 0,3,5-8")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first or last - first > 10 ** 6:
            raise OptionError(f"{option} {text}: the range {part} is empty or too long")
        out.extend(f for f in range(first, last + 1) if f not in out)
    if not out:
        raise OptionError(f"{option} {text!r}: no frame number given")
    return out


def find_subject(data_dir: Path, subject: Optional[int]) -> int:
    """The subject to read: ``subject`` when given, else the only ``subject_<S>`` folder of
    ``annotations/depthmaps``."""
    depth_root = data_dir / "annotations" / "depthmaps"
    if not depth_root.is_dir():
        raise MissingFileError(f"{depth_root}: not found; --data_dir needs the released layout "
                               f"(annotations/KRT_512, annotations/keypoints, annotations/depthmaps)")
    if subject is not None:
        return int(subject)
    found = sorted(int(m.group(1)) for d in os.listdir(depth_root) if (m := SUBJECT_RE.match(d)))
    if len(found) != 1:
        raise OptionError(f"{depth_root}: {'no' if not found else len(found)} subject_<N> folder(s) "
                          f"({', '.join(map(str, found))}); choose one with --data_subject")
    return found[0]


def sequence_frames(data_dir: Path, subject: int) -> Dict[str, List[int]]:
    """``{sequence: [frames]}`` from the image folders (``images/subject_<S>/<seq>/cam*/image<f>``);
    empty when there are no images."""
    image_dir = data_dir / "images" / f"subject_{subject}"
    if not image_dir.is_dir():
        return {}
    out: Dict[str, List[int]] = {}
    for seq in sorted(d.name for d in image_dir.iterdir() if d.is_dir()):
        frames = set()
        for cam_dir in (image_dir / seq).iterdir():
            if cam_dir.is_dir():
                frames.update(int(m.group(1)) for name in os.listdir(cam_dir) if (m := IMAGE_RE.match(name)))
        out[seq] = sorted(frames)
    return out


def select_frames(available: Sequence[int], by_sequence: Dict[str, List[int]], frames: Optional[List[int]],
                  sequences: Optional[List[str]], max_frames: int, depth_root: Path) -> List[int]:
    """The frames to personalise on: those asked for (``frames``, ``sequences``) among those with
    depth maps; more than ``max_frames`` are thinned to that many, evenly spaced."""
    chosen = list(available)
    if sequences:
        if not by_sequence:
            raise OptionError(f"--sequences: {depth_root.parents[2] / 'images'} holds no sequence folders, so "
                              f"frames cannot be chosen by sequence; use --frames")
        unknown = [s for s in sequences if s not in by_sequence]
        if unknown:
            raise OptionError(f"--sequences: {unknown} not found; the sequences are {sorted(by_sequence)}")
        wanted = {f for s in sequences for f in by_sequence[s]}
        chosen = [f for f in chosen if f in wanted]
    if frames is not None:
        have = set(available)
        missing = [f for f in frames if f not in have]
        if missing:
            raise PersonaliseInputError(f"--frames: no depth maps for frame(s) {missing[:10]} under {depth_root} "
                                        f"(frames there: {_some(available)})")
        keep = set(chosen)
        chosen = [f for f in frames if f in keep]
    if not chosen:
        raise PersonaliseInputError(f"{depth_root}: no frame to personalise on (frames with depth maps: "
                                    f"{_some(available)}; check --frames and --sequences)")
    if len(chosen) > max_frames:
        picks = np.unique(np.round(np.linspace(0, len(chosen) - 1, max_frames)).astype(int))
        log.info("%d frames selected; personalising on %d of them, evenly spaced (--max_frames)",
                 len(chosen), len(picks))
        chosen = [chosen[i] for i in picks]
    return chosen


def _some(values: Sequence[int]) -> str:
    values = list(values)
    if not values:
        return "none"
    return ", ".join(map(str, values[:8])) + (f", … ({len(values)} in all)" if len(values) > 8 else "")


def read_depth_frames(data_dir, joint_names: Sequence[str], render_shape: Tuple[int, int] = (64, 64),
                      subject: Optional[int] = None, frames: Optional[List[int]] = None,
                      sequences: Optional[List[str]] = None, max_frames: int = 12, depth_min: float = 1.0,
                      original_img_shape: Tuple[int, int] = ORIGINAL_IMG_SHAPE,
                      max_views: Optional[int] = None) -> DepthFrames:
    """Read the chosen frames of a data set in the released layout (module notes).

    Args:
        data_dir: the data set's folder.
        joint_names: the hand model's joint names (the keypoints' order in ``joint_world``).
        render_shape: ``(H, W)`` of the depth crops.
        subject: the ``subject_<S>`` to read (None: the only one).
        frames, sequences: choose frames (None: every frame with depth maps).
        max_frames: at most this many frames, evenly spaced among those chosen.
        depth_min: smallest valid depth (mm), the reader's check of the depth maps.
        original_img_shape: ``(H, W)`` of the cameras' pixel space (the released ``KRT_512``'s 512 × 334).
        max_views: at most this many views per frame (the first cameras of ``KRT_512``); None: all.
    Raises:
        PersonaliseInputError and the readers' errors (one line naming the file) for bad input.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise MissingFileError(f"--data_dir {data_dir}: folder not found")
    subject = find_subject(data_dir, subject)
    depth_root = data_dir / "annotations" / "depthmaps" / f"subject_{subject}"
    keypoint_root = data_dir / "annotations" / "keypoints" / f"subject_{subject}"
    if not depth_root.is_dir():
        raise MissingFileError(f"{depth_root}: depth-map folder not found")
    krt_path = data_dir / "annotations" / "KRT_512"
    krt = read_krt(krt_path)
    cameras = [c for c in krt if c.startswith(COLOUR_CAMERA_PREFIX)]
    if not cameras:
        raise DataFormatError(f"{krt_path}: no colour camera (name starting with '{COLOUR_CAMERA_PREFIX}') "
                              f"among {len(krt)} camera(s)")
    available = sorted(int(m.group(1)) for d in os.listdir(depth_root)
                       if (m := FRAME_DIR_RE.match(d)) and (depth_root / d).is_dir())
    by_sequence = sequence_frames(data_dir, subject)
    chosen = select_frames(available, by_sequence, frames, sequences, max_frames, depth_root)
    seq_of = {f: s for s, fs in by_sequence.items() for f in fs}

    joint_names = list(joint_names)
    model_index = pts_to_model_index(joint_names)
    T, J = len(chosen), len(joint_names)
    kp_pts = np.full((T, len(PTS_JOINT_NAMES), 3), np.nan)
    joint_world = np.zeros((T, J, 3), np.float32)
    joint_valid = np.zeros((T, J), np.float32)
    views: List[Tuple[int, str, np.ndarray, np.ndarray]] = []
    for t, frame in enumerate(chosen):
        pts = keypoint_root / f"keypoints{frame:04d}.pts"
        if not pts.is_file():
            raise PersonaliseInputError(f"{pts}: keypoint file not found; every frame needs its 3D keypoints "
                                        f"(the cameras' crops and the starting pose come from them)")
        text = read_pts_text(pts)
        joint_world[t], joint_valid[t] = read_pts(pts, joint_names, model_index, text)
        for idx, (xyz, _score, _views) in read_pts_raw(pts, text).items():
            if idx < len(PTS_JOINT_NAMES):
                kp_pts[t, idx] = xyz
        points = joint_world[t][joint_valid[t] > 0]
        if len(points) < 3:
            raise PersonaliseInputError(f"{pts}: {len(points)} right-hand keypoint(s); at least 3 are needed "
                                        f"to place the hand and crop the cameras")
        frame_views = 0
        for cam in cameras:
            if max_views is not None and frame_views >= max_views:
                break
            path = depth_root / f"{frame:06d}" / f"depthmap{cam}.pkl"
            if not path.is_file():
                continue
            R = krt[cam]["camrot"].astype(np.float32)
            C = krt[cam]["campos"].astype(np.float32)
            focal = krt[cam]["focal"].astype(np.float32)
            princpt = krt[cam]["princpt"].astype(np.float32)
            front = points[(points - C) @ R[2] > 0]
            try:
                box = clip_box(keypoint_box(front, R, C, focal, princpt), original_img_shape)
            except ValueError as err:
                log.warning("%s: camera %s does not see the keypoints (%s); view left out", pts, cam, err)
                continue
            affine = render_affine(box, render_shape)
            depth = load_depthmap(path, depth_min)
            crop = warp(depth, raster_affine(affine, original_img_shape, depth.shape), render_shape, nearest=True)
            if not (crop > 0).any():
                log.warning("%s: no depth inside the hand's crop; view left out", path)
                continue
            views.append((t, cam, affine, crop.astype(np.float32)))
            frame_views += 1
        if frame_views == 0:
            raise PersonaliseInputError(f"{depth_root / f'{frame:06d}'}: no usable depth map of a colour camera of "
                                        f"{krt_path} (frame {frame})")
    names = [f"{seq_of[f]}/{f}" if f in seq_of else f"frame {f}" for f in chosen]
    cam_of = [v[1] for v in views]
    return DepthFrames(
        data_dir=data_dir, subject=subject, frames=list(chosen), names=names, keypoints_pts=kp_pts,
        joint_world=joint_world, joint_valid=joint_valid,
        view_frame=np.array([v[0] for v in views], np.int64), cameras=cam_of,
        camrot=np.stack([krt[c]["camrot"] for c in cam_of]).astype(np.float32),
        campos=np.stack([krt[c]["campos"] for c in cam_of]).astype(np.float32),
        focal=np.stack([krt[c]["focal"] for c in cam_of]).astype(np.float32),
        princpt=np.stack([krt[c]["princpt"] for c in cam_of]).astype(np.float32),
        affine=np.stack([v[2] for v in views]).astype(np.float32),
        depth=np.stack([v[3] for v in views]).astype(np.float32))
