"""Scans of a hand as personalisation's data: reading them, and a starting pose where no keypoints
are given (docs/personalise.md, "Method").

A scan is a mesh (``.obj``, ``.ply``; any topology, polygons split into triangles) or, with
``point_cloud=True``, a cloud of points, of the hand in one pose, in mm or metres. Each is checked:
finite coordinates, at least :data:`MIN_SCAN_POINTS` points, faces unless it is a point cloud, and a
size a hand can have.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch

from common.fitting.skeleton import axis_angle_to_matrix
from common.fitting.solver import UNITS
from common.hand.kinematics import rigid_align
from common.io.mesh_io import read_mesh
from common.personalise.errors import PersonaliseInputError
from common.personalise.surface import ScanSurface, nearest_points

MIN_SCAN_POINTS = 100
HAND_SIZE_MM = (50.0, 600.0)  # the diagonal of a hand scan's bounding box, mm: outside it the units are wrong


def read_scan(path, units: str = "mm", point_cloud: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """``(points [S, 3] float64 mm, faces [F, 3] int64 or None)`` of a scan file (module notes).

    Raises:
        PersonaliseInputError (one line naming the file) and the mesh reader's errors.
    """
    if units not in UNITS:
        raise PersonaliseInputError(f"--units {units}: expected mm or m")
    points, faces = read_mesh(path)
    if len(points) < MIN_SCAN_POINTS:
        raise PersonaliseInputError(f"{path}: {len(points)} point(s); a scan of a hand needs at least {MIN_SCAN_POINTS}")
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        raise PersonaliseInputError(f"{path}: {int(bad.sum())} point(s) with a non-finite coordinate (the first: "
                                    f"point {int(np.flatnonzero(bad)[0]) + 1}); expected finite numbers")
    if len(faces) == 0 and not point_cloud:
        raise PersonaliseInputError(f"{path}: no faces; a scan mesh needs triangles (or polygons); for a point cloud "
                                    f"give --point_cloud")
    points = points * UNITS[units]
    size = float(np.linalg.norm(points.max(0) - points.min(0)))
    if not HAND_SIZE_MM[0] <= size <= HAND_SIZE_MM[1]:
        raise PersonaliseInputError(f"{path}: the scan spans {size:.4g} mm with --units {units}; a hand spans "
                                    f"{HAND_SIZE_MM[0]:g}-{HAND_SIZE_MM[1]:g} mm (wrong --units?)")
    if point_cloud:
        return points, None
    return points, faces


def scan_surfaces(scans: Sequence[Tuple[np.ndarray, np.ndarray]], device, dtype=torch.float32) -> List[ScanSurface]:
    """The scans as :class:`ScanSurface` tensors on ``device``."""
    return [ScanSurface(torch.as_tensor(p, dtype=dtype, device=device),
                        None if f is None else torch.as_tensor(f, dtype=torch.long, device=device)) for p, f in scans]


@torch.no_grad()
def align_rest_pose(model, scan: ScanSurface, iterations: int = 30) -> torch.Tensor:
    """A root transform ``[4, 4]`` placing the model, in its rest pose (zero angles), onto a scan
    without keypoints: the centroids matched, the principal axes matched in each of their four
    right-handed sign choices, each refined by rigid ICP (nearest scan point of every vertex,
    then Kabsch), and the start with the smallest mean distance kept. Good for an open hand; a
    scan of a strongly bent hand needs keypoints.

    Args:
        model: a :class:`main.model.Model`.
        scan: the scan (mm).
    """
    dtype = torch.float64
    identity = model.identity()
    root0 = identity.template_pose[model.root_joint_idx].to(dtype)
    zero = torch.zeros(1, model.joint_num, 3, dtype=model.template_vertices.dtype, device=root0.device)
    rest = model.pose(zero, root0.to(zero.dtype), identity).mesh[0].to(dtype)  # [V, 3] in the template's frame
    points = scan.points.to(dtype)
    if len(points) > 20000:  # ICP needs no more points than this to place a hand
        points = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(0))[:20000].to(points.device)]
    rest_c, scan_c = rest.mean(0), points.mean(0)

    def axes(x: torch.Tensor) -> torch.Tensor:
        _, vectors = torch.linalg.eigh((x - x.mean(0)).T @ (x - x.mean(0)))
        vectors = vectors.flip(1)  # largest first
        if torch.det(vectors) < 0:
            vectors[:, 2] = -vectors[:, 2]
        return vectors

    a_rest, a_scan = axes(rest), axes(points)
    best, best_cost = None, math.inf
    for signs in ((1, 1, 1), (-1, -1, 1), (-1, 1, -1), (1, -1, -1)):
        R = a_scan @ torch.diag(torch.tensor(signs, dtype=dtype, device=rest.device)) @ a_rest.T
        transform = torch.eye(4, dtype=dtype, device=rest.device)
        transform[:3, :3], transform[:3, 3] = R, scan_c - R @ rest_c
        for _ in range(iterations):
            moved = rest @ transform[:3, :3].T + transform[:3, 3]
            nearest = nearest_points(moved, points)
            transform = rigid_align(rest[None], points[nearest][None])[0]
        moved = rest @ transform[:3, :3].T + transform[:3, 3]
        cost = float((moved - points[nearest_points(moved, points)]).norm(dim=1).mean())
        if cost < best_cost:
            best, best_cost = transform, cost
    return (best @ root0).to(model.template_vertices.dtype)


def rotation_about(axis_angle: Sequence[float]) -> torch.Tensor:
    """``[3, 3]`` rotation of a rotation vector (radians)."""
    return axis_angle_to_matrix(torch.as_tensor(axis_angle, dtype=torch.float64))


def scan_names(paths: Sequence[str]) -> List[str]:
    return [Path(p).name for p in paths]
