"""A picture of a fit: for some frames, the input keypoints above and the fitted mesh with its
keypoints below, each column seen in the fitted hand's own frame from the palm, turned 35° towards
the thumb side (so that the fingers' curl shows), one framing per column so the rows line up."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch

from common.fitting.conventions import get_convention, keypoint_map
from common.utils.vis import BACKGROUND_BGR, fit_views, render_mesh

INPUT_BGR = (40, 40, 200)     # red: the input points
FITTED_BGR = (40, 150, 40)    # green: the fitted hand's points
FAR_BGR = (0, 140, 255)       # orange: input points far from the fitted hand (outliers)
_C, _S = np.cos(np.radians(35)), np.sin(np.radians(35))
# Rows: the camera's right, up and towards-the-viewer axes in the hand frame (see common.utils.vis):
# the palm view turned 35° towards the thumb side.
THREE_QUARTER = np.array([[0.0, -_S, _C], [1.0, 0.0, 0.0], [0.0, _C, _S]])


def keypoint_parents(hand_model, convention: str) -> list:
    """Per keypoint, the keypoint of the nearest joint above its own (-1 for the wrist)."""
    joints = keypoint_map(hand_model, get_convention(convention), {f: 0.0 for f in
                          ("thumb", "index", "middle", "ring", "pinky")}).joint_index.tolist()
    out = []
    for j in joints:
        p = hand_model.parents[j]
        while p >= 0 and p not in joints:
            p = hand_model.parents[p]
        out.append(joints.index(p) if p >= 0 else -1)
    return out


def _draw_points(img, pixels, parents, color, seen, radius=3):
    pts = np.round(pixels * 16).astype(np.int32)
    for k, p in enumerate(parents):
        if p >= 0 and seen[k] and seen[p]:
            cv2.line(img, tuple(pts[p]), tuple(pts[k]), color, 1, cv2.LINE_AA, shift=4)
    for k in np.flatnonzero(seen):
        cv2.circle(img, tuple(pts[k]), radius * 16, color, -1, cv2.LINE_AA, shift=4)


def fit_picture(result, inputs_mm: np.ndarray, frames: Sequence[int], size: int = 256,
                far_mm: float = 10.0) -> np.ndarray:
    """``uint8 [2·size + 24, len(frames)·size, 3]`` BGR.

    Args:
        result: a :class:`common.fitting.FitResult`.
        inputs_mm: ``[T, 21, 3]`` the input keypoints in the model's frame (mm; mirrored for a left
            hand), NaN where missing.
        frames: the frames to show; those without a fit are drawn empty.
        far_mm: input points farther than this from the fitted ones are drawn orange.
    """
    model = result.model
    hand = model.hand_model
    parents = keypoint_parents(hand, result.convention)
    view = THREE_QUARTER
    mirror = np.array([-1.0 if result.mirrored else 1.0, 1.0, 1.0])
    units = {"mm": 1.0, "m": 1000.0}.get(result.units, 1.0)
    fitted = result.keypoints * mirror * units  # back into the model's frame, mm
    columns = []
    with torch.no_grad():
        identity = model.identity()
    for t in frames:
        top = np.full((size, size, 3), BACKGROUND_BGR, np.uint8)
        if not torch.isfinite(result.euler[t]).all():
            columns.append(np.concatenate([top, top.copy()], 0))
            continue
        device = model.template_vertices.device
        with torch.no_grad():
            posed = model.pose(result.euler[t:t + 1].to(device), result.root[t:t + 1].to(device), identity)
        verts = posed.mesh[0].double().cpu().numpy()
        frame = result.root[t, :3, :3].double().numpy()
        centre, scale = fit_views([verts, np.nan_to_num(inputs_mm[t], nan=verts.mean(0))], [view], size, frame)

        def pixels(points):
            local = (np.nan_to_num(points) @ frame - centre) @ view.T
            return np.stack([size / 2 + local[:, 0] * scale, size / 2 - local[:, 1] * scale], 1)

        seen = np.isfinite(inputs_mm[t]).all(-1)
        far = seen & (np.linalg.norm(np.nan_to_num(inputs_mm[t]) - fitted[t], axis=-1) > far_mm)
        _draw_points(top, pixels(inputs_mm[t]), parents, INPUT_BGR, seen & ~far)
        _draw_points(top, pixels(inputs_mm[t]), [-1] * 21, FAR_BGR, far, radius=4)
        bottom = render_mesh(verts, hand.faces, image_size=size, views=[view], frame=frame, fit=(centre, scale))
        _draw_points(bottom, pixels(fitted[t]), parents, FITTED_BGR, np.isfinite(fitted[t]).all(-1))
        for img, text in ((top, f"input, frame {t}"), (bottom, "fit")):
            cv2.putText(img, text, (8, size - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (90, 90, 90), 1, cv2.LINE_AA)
        columns.append(np.concatenate([top, bottom], 0))
    picture = np.concatenate(columns, 1)
    legend = np.full((24, picture.shape[1], 3), BACKGROUND_BGR, np.uint8)
    x = 8
    for text, color in (("input keypoints", INPUT_BGR), (f"more than {far_mm:g} mm from the fit", FAR_BGR),
                        ("fitted keypoints", FITTED_BGR)):
        cv2.circle(legend, (x + 4, 12), 4, color, -1, cv2.LINE_AA)
        cv2.putText(legend, text, (x + 14, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (70, 70, 70), 1, cv2.LINE_AA)
        x += 24 + 8 * len(text)
    return np.concatenate([picture, legend], 0)
