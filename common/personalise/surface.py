"""Differentiable point-to-surface distances between a posed mesh and a scan.

``test.py``'s surface metric (:func:`common.metrics.nearest_surface_faces`) is exact but not
differentiable: it searches, among bounding spheres, for the triangle nearest each point. Here the
search runs without gradient and only the distance to the triangle it found is differentiated:
:func:`common.metrics.point_triangle_sq` on that triangle's corners, the closest point taken in the
same Voronoi region (face, edge or corner) as in the search. Where the nearest triangle does not
change under a small move of the vertices (everywhere but on the measure-zero set where two
triangles are equally near), this *is* the gradient of the exact distance: the minimum over
triangles is locally the one active triangle's distance (tests/test_personalise_surface.py checks
it against finite differences of the exact metric).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from common.metrics import nearest_surface_faces, point_triangle_sq

# Point–point pairs measured at once by the nearest-point search of point clouds.
NEAREST_POINT_PAIRS = 1 << 22


@dataclass
class ScanSurface:
    """One scan, in the model's world (mm): ``points [S, 3]`` and, for a mesh, ``faces [F, 3]``
    (None for a point cloud)."""

    points: torch.Tensor
    faces: Optional[torch.Tensor] = None

    def to(self, device, dtype=None) -> "ScanSurface":
        return ScanSurface(self.points.to(device=device, dtype=dtype or self.points.dtype),
                           None if self.faces is None else self.faces.to(device))


def squared_distance_to_faces(points: torch.Tensor, vertices: torch.Tensor, faces: torch.Tensor,
                              nearest: torch.Tensor) -> torch.Tensor:
    """``[P]`` squared distance (mm²) from each point to the triangle ``faces[nearest[p]]`` of
    ``vertices``, differentiable with respect to both ``points`` and ``vertices``."""
    corners = vertices[faces[nearest]]  # [P, 3, 3]
    return point_triangle_sq(points, corners[:, 0], corners[:, 1], corners[:, 2])


@torch.no_grad()
def nearest_points(points: torch.Tensor, cloud: torch.Tensor, max_pairs: int = NEAREST_POINT_PAIRS) -> torch.Tensor:
    """``[P]`` index of each point's nearest point of ``cloud [S, 3]`` (exact, in chunks of at most
    ``max_pairs`` pairs)."""
    chunk = max(1, max_pairs // max(1, cloud.shape[0]))
    return torch.cat([torch.cdist(points[i:i + chunk].double(), cloud.double()).argmin(dim=1)
                      for i in range(0, points.shape[0], chunk)])


def scan_to_mesh(scan: ScanSurface, vertices: torch.Tensor, faces: torch.Tensor,
                 nearest: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``([S] squared distance (mm²) of the scan's points to the mesh surface, differentiable in
    ``vertices [V, 3]``; [S] the triangle of ``faces`` it is measured to)``. The nearest triangle is
    searched without gradient, unless ``nearest`` (from an earlier call) is given: the distance to
    that triangle is then an upper bound of the exact one, equal to it while the nearest triangle
    has not changed."""
    if nearest is None:
        with torch.no_grad():
            _, nearest = nearest_surface_faces(scan.points.detach(), vertices.detach(), faces)
    return squared_distance_to_faces(scan.points.to(vertices.dtype), vertices, faces, nearest), nearest


def mesh_to_scan(vertices: torch.Tensor, scan: ScanSurface,
                 nearest: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``([V] squared distance (mm²) of the mesh's vertices to the scan: to its surface for a mesh,
    to its nearest point for a point cloud; differentiable in ``vertices``; [V] the scan's triangle
    (or point) it is measured to)``. ``nearest`` as in :func:`scan_to_mesh`."""
    points = scan.points.to(vertices.dtype)
    if scan.faces is None:
        if nearest is None:
            nearest = nearest_points(vertices.detach(), points)
        return (vertices - points[nearest]).square().sum(-1), nearest
    if nearest is None:
        with torch.no_grad():
            _, nearest = nearest_surface_faces(vertices.detach(), points, scan.faces)
    return squared_distance_to_faces(vertices, points, scan.faces, nearest), nearest
