"""Multi-view 2D keypoints: cameras in the released ``KRT_512`` format, pixel spaces, and the
triangulation that starts the 2D fit.

Pixel spaces. A ``KRT_512`` file's intrinsics ``K`` are expressed in one pixel space (the released
file's: 512 × 334, height × width, whatever size the images are stored at). 2D keypoints measured
on images of another size ``(H, W)`` are moved into it by the centre-aligned rule of
``cv2.resize`` (``k = (p + 0.5) · size_K / size − 0.5``), as the project's data reader does for
depth maps. Lens distortion is ignored, as everywhere in this project and the original.

Triangulation: per frame and keypoint, the linear (DLT) solution over the views that see it,
weighted by confidence, in normalised image coordinates; a view whose reprojection error is far
above the others' (more than 3× their median and 10 pixels) is dropped and the point
triangulated again, when at least two views remain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

from common.fitting.errors import FitInputError

CAMERA_SHAPE = (512, 334)  # (H, W) of the released KRT_512's pixel space


@dataclass
class MultiViewKeypoints:
    """2D keypoints of ``C`` calibrated views.

    Attributes:
        uv: ``[T, C, 21, 2]`` pixels (x right, y down, pixel centres at integers) in images of
            ``image_shape``; NaN where missing.
        confidence: ``[T, C, 21]``, 0 where missing.
        camera_names: the ``C`` cameras, each a name in ``cameras``.
        cameras: ``{name: {'K', 'R', 't', ...}}`` as :func:`data.dataset.read_krt` returns.
        image_shape: ``(H, W)`` of the images the keypoints were measured on.
        camera_shape: ``(H, W)`` of the pixel space of the cameras' ``K``.
    """

    uv: np.ndarray
    confidence: np.ndarray
    camera_names: List[str]
    cameras: Dict[str, Dict[str, np.ndarray]]
    image_shape: Tuple[int, int] = CAMERA_SHAPE
    camera_shape: Tuple[int, int] = CAMERA_SHAPE

    def __post_init__(self):
        self.uv = np.asarray(self.uv, np.float64)
        self.confidence = np.asarray(self.confidence, np.float64)
        if self.uv.ndim != 4 or self.uv.shape[2:] != (21, 2):
            raise FitInputError(f"uv: expected [T, C, 21, 2] pixels, got {list(self.uv.shape)}")
        if self.confidence.shape != self.uv.shape[:3]:
            raise FitInputError(f"confidence: expected {list(self.uv.shape[:3])} like uv's [T, C, 21], "
                                f"got {list(self.confidence.shape)}")
        if len(self.camera_names) != self.uv.shape[1]:
            raise FitInputError(f"cameras: {len(self.camera_names)} names for uv's {self.uv.shape[1]} views")
        unknown = [n for n in self.camera_names if n not in self.cameras]
        if unknown:
            raise FitInputError(f"camera {unknown[0]!r} is not in the camera file; it has "
                                f"{', '.join(list(self.cameras)[:10])}{' …' if len(self.cameras) > 10 else ''}")

    def camera_arrays(self) -> Dict[str, np.ndarray]:
        """``camrot [C, 3, 3]``, ``campos [C, 3]`` mm, ``focal [C, 2]``, ``princpt [C, 2]``,
        ``projection [C, 3, 4]`` (``K [R | t]``), in the cameras' pixel space."""
        cams = [self.cameras[n] for n in self.camera_names]
        R = np.stack([np.asarray(c["R"], np.float64) for c in cams])
        t = np.stack([np.asarray(c["t"], np.float64) for c in cams])
        K = np.stack([np.asarray(c["K"], np.float64) for c in cams])
        return {"camrot": R, "campos": -np.einsum("cji,cj->ci", R, t), "focal": K[:, [0, 1], [0, 1]],
                "princpt": K[:, [0, 1], [2, 2]], "projection": K @ np.concatenate([R, t[..., None]], -1)}

    def camera_pixels(self) -> np.ndarray:
        """``uv`` moved into the cameras' pixel space (module notes)."""
        (h, w), (hk, wk) = self.image_shape, self.camera_shape
        scale = np.array([wk / w, hk / h])
        return (self.uv + 0.5) * scale - 0.5


def mirror_cameras(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The same cameras seeing the world mirrored ``x → −x`` (for left hands): a point ``M x``
    projects through the mirrored cameras where ``x`` projected through the originals."""
    M = np.diag([-1.0, 1.0, 1.0])
    out = dict(arrays)
    out["camrot"] = arrays["camrot"] @ M
    out["campos"] = arrays["campos"] @ M
    out["projection"] = arrays["projection"] @ np.diag([-1.0, 1.0, 1.0, 1.0])
    return out


def _dlt(uv: torch.Tensor, weight: torch.Tensor, projection: torch.Tensor, focal: torch.Tensor) -> torch.Tensor:
    """Weighted linear triangulation: ``uv [N, C, 2]``, ``weight [N, C]``, ``projection [C, 3, 4]``
    → ``[N, 3]``. Each view's rows are divided by its focal length (normalised coordinates)."""
    P = projection[None]
    scale = (weight / focal.mean(-1)[None])[..., None]
    rows_u = (uv[..., 0:1] * P[:, :, 2] - P[:, :, 0]) * scale
    rows_v = (uv[..., 1:2] * P[:, :, 2] - P[:, :, 1]) * scale
    A = torch.cat([rows_u, rows_v], dim=1)  # [N, 2C, 4]
    _, _, vh = torch.linalg.svd(A, full_matrices=False)
    X = vh[:, -1]
    w = X[:, 3:4]
    return X[:, :3] / torch.where(w.abs() < 1e-12, torch.full_like(w, 1e-12), w)


def project(points: torch.Tensor, projection: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[N, 3]`` → ``(uv [N, C, 2], depth [N, C])`` through ``projection [C, 3, 4]``."""
    h = torch.cat([points, torch.ones_like(points[:, :1])], -1)
    x = torch.einsum("cij,nj->nci", projection, h)
    z = x[..., 2]
    return x[..., :2] / torch.where(z.abs() < 1e-9, torch.full_like(z, 1e-9), z)[..., None], z


def triangulate(uv: np.ndarray, weight: np.ndarray, cameras: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Points from views (module notes).

    Args:
        uv: ``[T, C, K, 2]`` in the cameras' pixel space; weight: ``[T, C, K]`` (0: not seen).
        cameras: :meth:`MultiViewKeypoints.camera_arrays` (``projection``, ``focal``).
    Returns:
        ``(points [T, K, 3] mm, NaN where fewer than two views see the point or it falls behind
        one of them; views used [T, K, C] bool)``.
    """
    T, C, K, _ = uv.shape
    P = torch.as_tensor(cameras["projection"], dtype=torch.float64)
    focal = torch.as_tensor(cameras["focal"], dtype=torch.float64)
    x = torch.as_tensor(np.nan_to_num(uv), dtype=torch.float64).permute(0, 2, 1, 3).reshape(T * K, C, 2)
    w = torch.as_tensor(weight, dtype=torch.float64).permute(0, 2, 1).reshape(T * K, C)
    w = torch.where(torch.isfinite(torch.as_tensor(uv)).all(-1).permute(0, 2, 1).reshape(T * K, C), w,
                    torch.zeros_like(w))
    used = w > 0
    points = _dlt(x, w, P, focal)
    err = (project(points, P)[0] - x).norm(dim=-1)
    err_used = torch.where(used, err, torch.full_like(err, float("nan")))
    median = torch.nanmedian(err_used, dim=1, keepdim=True).values
    outlier = used & (err > 3 * median) & (err > 10.0) & (used.sum(1, keepdim=True) >= 3)
    if bool(outlier.any()):
        used = used & ~outlier
        w = torch.where(used, w, torch.zeros_like(w))
        again = outlier.any(1)
        points[again] = _dlt(x[again], w[again], P, focal)
    _, depth = project(points, P)
    ok = (used.sum(1) >= 2) & torch.isfinite(points).all(-1) & ((depth > 0) | ~used).all(-1)
    points = torch.where(ok[:, None], points, torch.full_like(points, float("nan")))
    return (points.reshape(T, K, 3).numpy(), used.reshape(T, K, C).numpy())
