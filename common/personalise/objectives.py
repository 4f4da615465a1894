"""What personalisation minimises: the data terms against depth maps and against scans, and the
training's regularisers (docs/personalise.md, "Method").

* :class:`DepthObjective`: every view rendered by the project's :class:`DepthRenderer` and
  compared with its captured depth by the training's depth-map loss
  (:class:`common.nets.loss.DepthmapLoss`: smooth L1, β = 1 mm, where both depths exist);
* :class:`ScanObjective`: the point-to-surface distance both ways between the posed mesh and each
  scan (:mod:`common.personalise.surface`), through the same smooth L1 so that both data terms are
  in the same units;
* :class:`Regularisers`: the training's joint loss on the keypoints where there are some, its
  penetration loss and its Laplacian loss, with the training's weights.

Every term is per frame (or per view) so that the report can say what each frame's residual was.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from common.nets.loss import DepthmapLoss, JointLoss, LaplacianLoss, PenetLoss
from common.personalise.surface import ScanSurface, mesh_to_scan, scan_to_mesh
from common.renderer.depth_renderer import DepthRenderer

SMOOTH_L1_BETA = 1.0  # mm: the training's depth-map loss's


@dataclass
class DepthTargets:
    """Depth maps of ``T`` frames in ``P`` views (tensors on one device; see
    :class:`data.depth_frames.DepthFrames`): ``view_frame [P]`` long, ``camrot [P, 3, 3]``,
    ``campos [P, 3]``, ``focal [P, 2]``, ``princpt [P, 2]``, ``affine [P, 2, 3]``, ``depth [P, H, W]``
    (mm, 0 = none)."""

    view_frame: torch.Tensor
    camrot: torch.Tensor
    campos: torch.Tensor
    focal: torch.Tensor
    princpt: torch.Tensor
    affine: torch.Tensor
    depth: torch.Tensor

    @property
    def image_shape(self):
        return tuple(self.depth.shape[-2:])


class DepthObjective(nn.Module):
    """The training's depth-map loss of every view of every frame.

    Args:
        faces: ``[F, 3]`` the hand model's triangles.
        image_shape: ``(H, W)`` of the depth crops.
        near, far: the renderer's clipping depths (mm; the configuration's ``depth_min``, ``depth_max``).
        backend: the renderer's backend (``auto``, ``pytorch3d``, ``native``).
    """

    def __init__(self, faces: torch.Tensor, image_shape, near: float = 1.0, far: float = 99999.0,
                 backend: str = "auto"):
        super().__init__()
        self.renderer = DepthRenderer(faces, tuple(image_shape), near=near, far=far, backend=backend)
        self.loss = DepthmapLoss(SMOOTH_L1_BETA)

    def render(self, mesh: torch.Tensor, targets: DepthTargets) -> torch.Tensor:
        """``[T, V, 3]`` posed meshes (world mm) → ``[P, H, W]`` depth of every view (mm, 0 = none)."""
        views = mesh[targets.view_frame]
        return self.renderer(views, targets.camrot[:, None], targets.campos[:, None], targets.focal[:, None],
                             targets.princpt[:, None], targets.affine[:, None])[:, 0]

    def forward(self, mesh: torch.Tensor, targets: DepthTargets) -> Dict[str, torch.Tensor]:
        """``{'loss': [P] per view (the training's: the per-pixel loss averaged over every pixel),
        'depth': [P, H, W] rendered}``."""
        depth = self.render(mesh, targets)
        per_pixel = self.loss(depth[:, None], targets.depth[:, None])  # [P, H, W]
        return {"loss": per_pixel.mean(dim=(1, 2)), "depth": depth}

    @staticmethod
    @torch.no_grad()
    def residuals(depth: torch.Tensor, targets: DepthTargets, frame_num: int) -> Dict[str, torch.Tensor]:
        """Per frame, ``mean |rendered − captured|`` (mm) over the pixels of its views where both
        exist (``test.py``'s depth error), and the pixel counts: ``{'mean' [T], 'pixels' [T]}``."""
        both = (depth > 0) & (targets.depth > 0)
        diff = torch.where(both, (depth - targets.depth).abs(), torch.zeros_like(depth)).sum(dim=(1, 2))
        count = both.sum(dim=(1, 2)).to(diff.dtype)
        sums = diff.new_zeros(frame_num).index_add(0, targets.view_frame, diff)
        counts = diff.new_zeros(frame_num).index_add(0, targets.view_frame, count)
        return {"mean": torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan"))),
                "pixels": counts}


def smooth_l1_of_distance(squared: torch.Tensor, beta: float = SMOOTH_L1_BETA) -> torch.Tensor:
    """Smooth L1 of distances given squared: ``d²/(2β)`` below ``β``, ``d − β/2`` above; its
    gradient is finite at ``d = 0`` (it never takes the square root there)."""
    near = squared < beta * beta
    safe = torch.where(near, torch.full_like(squared, beta * beta), squared)
    return torch.where(near, 0.5 * squared / beta, safe.sqrt() - 0.5 * beta)


class ScanObjective(nn.Module):
    """The distance both ways between each frame's posed mesh and its scan.

    Per frame ``t``: the mean over the scan's points of the smooth L1 of their distance to the mesh's
    surface, plus the mean over the mesh's vertices of that of their distance to the scan's surface
    (to its points for a point cloud), each direction weighted 1/2: at a perfect fit both vanish,
    and the second keeps the mesh from growing where the scan has no points. The nearest triangle
    (or point) is found without gradient; the distance to it is differentiated (``surface.py``).
    As in ICP, the search runs when asked (``search=True``); in between, the distances are measured
    to the triangles it found last, which change little from one small step to the next.

    Args:
        faces: ``[F, 3]`` the hand model's triangles.
    """

    def __init__(self, faces: torch.Tensor):
        super().__init__()
        self.register_buffer("faces", torch.as_tensor(faces, dtype=torch.long), persistent=False)
        self.nearest: List = []

    def forward(self, mesh: torch.Tensor, scans: List[ScanSurface], search: bool = True) -> Dict[str, torch.Tensor]:
        """``mesh [T, V, 3]`` (world mm) → ``{'loss': [T], 'to_mesh': [T] mean distance of the scan's
        points to the mesh, 'to_scan': [T] of the mesh's vertices to the scan, 'vertex_distance':
        [T, V] each vertex's distance to the scan (mm, no gradient)}``. ``search`` False reuses the
        nearest triangles of the last search (one is made if there was none)."""
        if search or len(self.nearest) != len(scans):
            self.nearest = [(None, None)] * len(scans)
        losses, there, per_vertex, found = [], [], [], []
        for t, scan in enumerate(scans):
            d2_scan, to_mesh = scan_to_mesh(scan, mesh[t], self.faces, self.nearest[t][0])  # [S] squared mm
            d2_mesh, to_scan = mesh_to_scan(mesh[t], scan, self.nearest[t][1])             # [V]
            found.append((to_mesh, to_scan))
            losses.append(0.5 * (smooth_l1_of_distance(d2_scan).mean() + smooth_l1_of_distance(d2_mesh).mean()))
            there.append(d2_scan.detach().sqrt().mean())
            per_vertex.append(d2_mesh.detach().sqrt())
        self.nearest = found
        vertex_distance = torch.stack(per_vertex)
        return {"loss": torch.stack(losses), "to_mesh": torch.stack(there), "to_scan": vertex_distance.mean(dim=1),
                "vertex_distance": vertex_distance}


class Regularisers(nn.Module):
    """The training's joint, penetration and Laplacian losses (``common/nets/loss.py``), per frame.

    Args:
        hand_model: the :class:`common.hand.hand_model.HandModel`.
        bone_step_size, penet_rigid_weight, penet_non_rigid_weight, lap_weight: the training
            configuration's (``bone_step_size``, ``loss_penet_r_weight``, ``loss_penet_nr_weight``,
            ``loss_lap_weight``).
    """

    def __init__(self, hand_model, bone_step_size: float = 0.1, penet_rigid_weight: float = 1.0,
                 penet_non_rigid_weight: float = 5.0, lap_weight: float = 5.0):
        super().__init__()
        self.joint_loss = JointLoss()
        self.penet_loss = PenetLoss.from_hand_model(hand_model, bone_step_size=bone_step_size,
                                                    rigid_weight=penet_rigid_weight,
                                                    non_rigid_weight=penet_non_rigid_weight)
        self.lap_loss = LaplacianLoss.from_hand_model(hand_model)
        self.lap_weight = float(lap_weight)

    @torch.no_grad()
    def radii(self, hand, reference_surface: torch.Tensor) -> torch.Tensor:
        """``[T, P]`` the penetration loss's bone-point radii (mm, no gradient; the training
        measures them at every step, personalisation every few: they follow the rest surface,
        which changes slowly)."""
        return self.penet_loss.point_radii(hand.template_pose.detach(),
                                           reference_surface.detach().contiguous()).to(hand.joints.dtype)

    def forward(self, hand, reference_surface: Optional[torch.Tensor] = None,
                joint_world: Optional[torch.Tensor] = None, joint_valid: Optional[torch.Tensor] = None,
                radii: Optional[torch.Tensor] = None, penetration: bool = True,
                laplacian_of: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Per-frame ``[T]`` losses as the training forward computes them before its means: ``joint``
        (mean L1 over the keypoints' coordinates, mm; absent without keypoints), ``penet`` (mm;
        absent when ``penetration`` is False), ``lap`` (mean over the vertices, × the Laplacian weight).

        Args:
            hand: a :class:`main.model.PosedHand` (``joints``, ``mesh``, ``template_pose``).
            reference_surface: ``[T, V, 3]`` the model's ``skinned_rest_mesh`` (the bone radii's
                surface); not needed when ``radii`` are given.
            joint_world, joint_valid: ``[T, J, 3]`` keypoints (mm) and ``[T, J]`` 1 where they exist.
            radii: ``[T, P]`` bone-point radii (:meth:`radii`), or None to measure them here.
            laplacian_of: ``[T, V, 3]`` the vertices whose Laplacian is penalised (default: the posed
                mesh, as the training).
        """
        out = {"lap": self.lap_loss(hand.mesh if laplacian_of is None else laplacian_of).mean(dim=1)
               * self.lap_weight}
        if penetration:
            if radii is None:
                radii = self.radii(hand, reference_surface)
            points = self.penet_loss.bone_points(hand.joints)
            out["penet"] = (self.penet_loss.rigid_weight * self.penet_loss.rigid_term(points, radii)
                            + self.penet_loss.non_rigid_weight
                            * self.penet_loss.non_rigid_term(points, radii, hand.mesh))
        if joint_world is not None:
            dtype = hand.joints.dtype
            out["joint"] = self.joint_loss(hand.joints, joint_world.to(dtype), joint_valid.to(dtype)).mean(dim=(1, 2))
        return out
