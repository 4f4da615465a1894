"""The batched keypoint fitter: every frame of a sequence in one Levenberg–Marquardt optimisation.

Unknowns per frame: the root's (wrist's) world rotation and translation and the ``D`` Euler angles
of the hand model's degrees of freedom; optionally (personalisation) a global scale of the
skeleton and each bone's length, shared by every frame. The cost of a frame is

* **data**: ``Σ_k c_k ρ(‖q_k − y_k‖)`` over the keypoints ``y`` (mm, confidence ``c``, 0 where
  missing) and the model's points ``q`` (joints, or fingertips on the skin,
  :mod:`common.fitting.conventions`); ``ρ`` is Geman–McClure ``σ²r²/(σ² + r²)`` by default
  (``huber`` and ``l2`` on request), so that a wrong keypoint costs at most ``σ²`` and does not bend
  the hand. For multi-view 2D keypoints the residual is each view's reprojection error, in pixels
  scaled to mm at the point's depth (``z/f``, fixed when that pass starts), so the same weights apply;
* **joint limits**: ``w_limits Σ (θ − clamp(θ, lo, hi))²`` with the editor's table
  (``common/hand/joint_limits.py``); steps stop at the limits, and the result is clamped onto them (by a
  fraction of a degree, :attr:`FitResult.limit_clamp_deg`). ``limits=False`` lifts all three;
* the **statistical priors**, weighted for keypoints with 1 mm of noise and scaled by the square of
  the noise measured after the first pass (precise keypoints are fitted exactly, noisy ones lean on
  the priors): **rest** ``Σ θ²`` (``thumb0``, inside the palm where no keypoint sees it, ten times
  as much); **coupling** of each long finger's DIP flexion to two thirds of its PIP's (and the
  thumb's IP to its MCP); **neighbours**, the same joint's flexion in adjacent long fingers;
  **synergy**, every flexion's fraction of its range drawn to the hand's mean; **penetration**,
  the project's penetration loss (:class:`common.nets.loss.PenetLoss`: bones through bones, and
  optionally fingertips into the palm or thumb); **smoothness** (sequences) of the angles, the
  root's rotation and its translation between consecutive frames.

The solver is Gauss–Newton with a damping per frame (Levenberg–Marquardt): the data term's
Jacobians are in closed form (:mod:`common.fitting.skeleton`), the penetration loss's gradient
comes from autograd, a frame's step is kept only where it lowers that frame's cost, steps are kept
within a trust region. Frames are coupled by the smoothness terms (taken as a block-Jacobi step,
their own diagonal counted twice so that simultaneous steps cannot overshoot) and by the shared
skeleton (a Schur-complement step).

Start: the root from a closed-form (Kabsch) alignment of the model's palm points (wrist, the four
knuckles, the thumb's base) onto the keypoints, robustly reweighted; where that alignment is
ambiguous (fewer than three palm points, or all on a line) several starting rotations about the
line are tried and the best kept. The angles from each bone pointed at the nearest keypoint seen
below it, or per digit one of a few uniform curls, whichever fits the digit's keypoints best. Then
a first pass with a wide robust scale, the noise measured, a main pass from twice the final robust
scale (3× the noise) to it, and a last pass of plain least squares on the keypoints within it.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from common.fitting.conventions import KeypointMap, get_convention, keypoint_map, measure_tip_offsets
from common.fitting.errors import FitInputError
from common.fitting.keypoints_io import check_keypoints
from common.fitting.triangulate import mirror_cameras
from common.fitting.skeleton import FitSkeleton, axis_angle_to_matrix, matrix_to_axis_angle, skew
from common.hand.kinematics import forward_kinematics, euler_to_transform, linear_blend_skinning, to_homogeneous

ROBUST_COSTS = ("gm", "huber", "l2")
DEFAULT_SCALE_GUESS = 10.0  # mm: the robust scale before the data's own is measured
WIDE = 4.0          # the first pass's robust scale, times the final one's guess
LIMIT_MARGIN = 1e-3  # rad: an angle this close to a limit counts as at it
MAX_ANGLE_STEP = 0.5  # rad: the largest change of an angle or of the root's rotation in one step
MAX_SHIFT_STEP = 50.0  # mm: the largest change of the root's position in one step
SCALE_RANGE = (5.0, 30.0)   # mm: the measured robust scale is kept within these
NOISE_FLOOR = 0.05          # mm: the smallest noise level the priors are scaled to
ROBUST_MULTIPLE = 3.0      # the robust scale, times the noise level
UNITS = {"mm": 1.0, "m": 1000.0}
# Joints of the palm, by name suffix: the closed-form start aligns these.
PALM_JOINTS = ("wrist", "index1", "middle1", "ring1", "pinky1", "thumb1")
COLLINEAR_MM = 2.0  # keypoints whose RMS distance from their best line is below this lie on a line
_EPS = 1e-9


@dataclass
class FitWeights:
    """The priors' weights, in mm² (the data term's unit) per unit of each. All but ``limits`` and
    ``bone_length`` are for keypoints with 1 mm of noise: the fitter multiplies them by the square
    of the noise it measures (or is given, :attr:`FitOptions.noise`). Every default is tested."""

    rest: float = 0.2                 # per rad² of every angle (thumb0: 10×)
    coupling: float = 1.0             # per rad² of a finger's DIP flexion away from 2/3 of its PIP flexion
    neighbours: float = 1.0           # per rad² of a finger joint's flexion away from the next finger's
    synergy: float = 20.0             # per unit² of a joint's flexion, as a fraction of its range, away
                                      # from the hand's mean fraction
    limits: float = 1e5               # per rad² beyond the joint limits
    penetration: float = 1.0          # per mm of the penetration loss's bone term (bones through bones),
                                      # summed over the pairs of bones
    penetration_skin: float = 0.0     # per mm of its skin term (fingertips into the palm or thumb; slow)
    smooth_angles: float = 25.0       # per rad² of an angle's change between consecutive frames
    smooth_rotation: float = 100.0    # per rad² of the root's rotation between consecutive frames
    smooth_translation: float = 0.05  # per mm² of the root's translation between consecutive frames
    bone_length: float = 1.0          # personalisation: per mm² of a bone's change beyond the global scale

    @classmethod
    def independent(cls) -> "FitWeights":
        """The defaults without the smoothness between consecutive frames: frames fitted each alone."""
        return cls(smooth_angles=0.0, smooth_rotation=0.0, smooth_translation=0.0)


@dataclass
class FitOptions:
    """How to fit (everything but the priors' weights)."""

    robust: str = "gm"                # 'gm' (Geman–McClure), 'huber' or 'l2'
    robust_scale: Optional[float] = None  # σ, mm: residuals well beyond it count as outliers;
                                      # None: 3× the noise level, 5…30 mm
    noise: Optional[float] = None     # the keypoints' noise, mm (None: measured after the first pass,
                                      # the median distance of the keypoints to the fitted hand)
    limits: bool = True               # the joint limits (cost and final clamp)
    start_iterations: int = 15        # first pass (wide robust scale, several starts)
    iterations: int = 30              # second pass (final scale, every prior)
    refine_iterations: int = 10       # last pass: least squares on the keypoints within σ
    personalise: Optional[str] = None  # None or 'skeleton'
    personalise_iterations: int = 20
    min_bone_frames: int = 5          # a bone's length is fitted when both its ends are seen this often
    starts: int = 8                   # starting rotations where the palm alignment is ambiguous
    min_inlier_fraction: float = 0.5  # a frame fails when fewer of its keypoints lie within σ
    tolerance: float = 1e-6           # stop when no frame's cost falls by more than this fraction


@dataclass
class PersonalisedSkeleton:
    """What ``personalise='skeleton'`` found: ``scale`` of the skeleton, ``bone_mm [J]`` each
    bone's length change beyond it (0 for bones fitted by the scale alone), ``offset_mm [J, 3]``
    the change of every local translation (the skeleton corrective's, in the parent's frame),
    ``fitted_bones`` the names of the bones whose own length was fitted."""

    scale: float
    bone_mm: np.ndarray
    offset_mm: np.ndarray
    fitted_bones: List[str]


@dataclass
class FitResult:
    """A fitted sequence. Model-side quantities (``euler``, ``root``, ``joints``) are those of the
    right-hand model; for a left hand they live in the mirrored world (``x → −x``,
    ``mirrored`` is True). ``keypoints``, ``residual`` are in the input's frame, convention and units.

    Attributes:
        euler: ``[T, J, 3]`` float32 radians (the decoder's input; 0 off the degrees of freedom).
        root: ``[T, 4, 4]`` float32, the wrist's world transform (mm).
        joints: ``[T, J, 3]`` float32 mm, the model's joints in its order.
        keypoints: ``[T, 21, 3]`` float64, the fitted hand's points in the input's convention and units.
        residual: ``[T, 21]`` float64 distance to the input point (input units; 2D input: mean
            reprojection error in pixels); NaN where the input had none.
        failed: ``[(frame, reason)]`` frames whose fit failed; their rows are NaN when the hand
            could not be placed at all.
        interrupted: stopped by Ctrl-C (``KeyboardInterrupt``) before the end.
        model: the model the outputs come from (a personalised copy with ``personalise``).
        skeleton: :class:`PersonalisedSkeleton` or None.
        limit_clamp_deg: the largest change the final clamp onto the joint limits made (degrees).
        seconds, iterations: time and Levenberg–Marquardt iterations spent.
        triangulated: ``[T, 21, 3]`` (2D input) the triangulated start, mm; else None.
        noise_mm: the keypoints' noise the priors were scaled to (measured, or as given).
    """

    euler: torch.Tensor
    root: torch.Tensor
    joints: torch.Tensor
    keypoints: np.ndarray
    residual: np.ndarray
    failed: List[Tuple[int, str]]
    interrupted: bool
    mirrored: bool
    units: str
    convention: str
    model: object
    tip_offsets_mm: Dict[str, float]
    skeleton: Optional[PersonalisedSkeleton] = None
    limit_clamp_deg: float = 0.0
    seconds: float = 0.0
    iterations: int = 0
    triangulated: Optional[np.ndarray] = None
    noise_mm: Optional[float] = None
    options: Dict = field(default_factory=dict)

    @property
    def frame_ok(self) -> np.ndarray:
        """``[T]`` bool: False for the frames in :attr:`failed`."""
        ok = np.ones(len(self.residual), bool)
        for frame, _ in self.failed:
            ok[frame] = False
        return ok


# ------------------------------------------------------------------------------ robust costs
def robust_cost(r: torch.Tensor, sigma: float, kind: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(ρ(r), w)`` for residual norms ``r ≥ 0`` (mm): the cost and the reweighting factor
    ``w = ρ'(r) / 2r`` (so that ``ρ ≈ w r²`` at ``r``), both shaped like ``r``."""
    if kind == "gm":
        s2 = sigma * sigma
        denom = s2 + r * r
        return s2 * r * r / denom, (s2 / denom).square()
    if kind == "huber":
        inside = r <= sigma
        return (torch.where(inside, r * r, 2 * sigma * r - sigma * sigma),
                torch.where(inside, torch.ones_like(r), sigma / r.clamp(min=_EPS)))
    if kind == "l2":
        return r * r, torch.ones_like(r)
    raise FitInputError(f"robust cost {kind!r}: expected one of {', '.join(ROBUST_COSTS)}")


# ------------------------------------------------------------------------------- data terms
class Points3D:
    """3D keypoints as the data term: ``target [B, K, 3]`` mm, ``weight [B, K]`` (0: missing)."""

    def __init__(self, target: torch.Tensor, weight: torch.Tensor):
        self.target = torch.nan_to_num(target, nan=0.0)
        self.weight = weight

    def select(self, index: torch.Tensor) -> "Points3D":
        return Points3D(self.target[index], self.weight[index])

    def terms(self, points: torch.Tensor, sigma: float, robust: str):
        """``(cost [B], info [B, K], grad [B, K, 3])``: the frame's robust cost, and per point the
        scalar information ``c·w`` and the half-gradient ``c·w·r`` of the reweighted least squares."""
        r = points - self.target
        rho, w = robust_cost(r.norm(dim=-1), sigma, robust)
        cw = self.weight * w
        return (self.weight * rho).sum(-1), cw, cw[..., None] * r

    def with_weight(self, weight: torch.Tensor) -> "Points3D":
        return Points3D(self.target, weight)

    def distance_mm(self, points: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` distances of the points to the keypoints (mm), shaped like the weights."""
        return (points - self.target).norm(dim=-1)


class Views2D:
    """Multi-view 2D keypoints as the data term.

    Args:
        uv: ``[B, C, K, 2]`` pixels in the cameras' pixel space; weight: ``[B, C, K]`` (0: missing).
        camrot ``[C, 3, 3]``, campos ``[C, 3]`` mm, focal ``[C, 2]``, princpt ``[C, 2]`` pixels
        (``x_c = camrot (x − campos)``, ``u = fx x_c/z_c + cx``).
        mm_per_pixel: ``[B, C, K]`` scale of each residual (``z/f`` at the start).
    """

    def __init__(self, uv, weight, camrot, campos, focal, princpt, mm_per_pixel):
        self.uv = torch.nan_to_num(uv, nan=0.0)
        self.weight, self.mm_per_pixel = weight, mm_per_pixel
        self.camrot, self.campos, self.focal, self.princpt = camrot, campos, focal, princpt

    def select(self, index: torch.Tensor) -> "Views2D":
        return Views2D(self.uv[index], self.weight[index], self.camrot, self.campos, self.focal, self.princpt,
                       self.mm_per_pixel[index])

    def project(self, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(uv [B, C, K, 2], camera points [B, C, K, 3])`` of world points ``[B, K, 3]``."""
        xc = torch.einsum("cij,bckj->bcki", self.camrot, points[:, None] - self.campos[None, :, None])
        z = xc[..., 2:3].clamp(min=1.0)
        uv = self.focal[None, :, None] * xc[..., :2] / z + self.princpt[None, :, None]
        return uv, xc

    def terms(self, points: torch.Tensor, sigma: float, robust: str):
        """As :meth:`Points3D.terms`, with the information a ``[B, K, 3, 3]`` matrix per point."""
        uv, xc = self.project(points)
        in_front = xc[..., 2] > 1.0
        weight = self.weight * in_front
        res = uv - self.uv  # [B, C, K, 2] pixels
        scale = self.mm_per_pixel
        rho, w = robust_cost(res.norm(dim=-1) * scale, sigma, robust)
        z = xc[..., 2].clamp(min=1.0)
        fx, fy = self.focal[None, :, None, 0], self.focal[None, :, None, 1]
        zero = torch.zeros_like(z)
        d_cam = torch.stack([torch.stack([fx / z, zero, -fx * xc[..., 0] / z.square()], -1),
                             torch.stack([zero, fy / z, -fy * xc[..., 1] / z.square()], -1)], -2)  # [B,C,K,2,3]
        pi = d_cam @ self.camrot[None, :, None]  # ∂uv/∂x, [B, C, K, 2, 3]
        cw = weight * w * scale.square()
        info = torch.einsum("bck,bckai,bckaj->bkij", cw, pi, pi)
        grad = torch.einsum("bck,bckai,bcka->bki", cw, pi, res)
        return (weight * rho).sum(dim=(1, 2)), info, grad

    def with_weight(self, weight: torch.Tensor) -> "Views2D":
        return Views2D(self.uv, weight, self.camrot, self.campos, self.focal, self.princpt, self.mm_per_pixel)

    def distance_mm(self, points: torch.Tensor) -> torch.Tensor:
        """``[B, C, K]`` reprojection errors scaled to mm, shaped like the weights."""
        uv, _ = self.project(points)
        return (uv - self.uv).norm(dim=-1) * self.mm_per_pixel

    def residual_px(self, points: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` mean reprojection error over the views that see each point (pixels), NaN where none."""
        uv, _ = self.project(points)
        d = (uv - self.uv).norm(dim=-1)
        seen = (self.weight > 0).to(d.dtype)
        count = seen.sum(1)
        return torch.where(count > 0, (d * seen).sum(1) / count.clamp(min=1), torch.full_like(count, math.nan))


# ------------------------------------------------------------------------------------ state
@dataclass
class _State:
    rotation: torch.Tensor     # [B, 3, 3]
    translation: torch.Tensor  # [B, 3] mm
    theta: torch.Tensor        # [B, D] radians

    def select(self, keep: torch.Tensor, other: "_State") -> "_State":
        """Where ``keep [B]``: self, else ``other``."""
        k = keep[:, None]
        return _State(torch.where(keep[:, None, None], self.rotation, other.rotation),
                      torch.where(k, self.translation, other.translation), torch.where(k, self.theta, other.theta))

    def index(self, index: torch.Tensor) -> "_State":
        return _State(self.rotation[index], self.translation[index], self.theta[index])

    def step(self, delta: torch.Tensor) -> "_State":
        """Apply ``delta [B, 6 + D]``: rotation on the left, translation and angles added."""
        return _State(axis_angle_to_matrix(delta[:, :3]) @ self.rotation, self.translation + delta[:, 3:6],
                      self.theta + delta[:, 6:])


# ------------------------------------------------------------------------------ penetration
_MEET_CACHE: Dict[str, torch.Tensor] = {}


class _Penetration:
    """The project's penetration loss on the fitter's skeleton (see the module notes).

    The bone points' radii come from the rest pose (zero angles) of the model as loaded; bone pairs
    that already overlap at rest (the palm's bones and the thumb's metacarpal, which lie in one
    block of flesh) are left out, so that only overlap a pose creates costs. The non-rigid term
    (fingertips entering the palm or thumb) poses only the vertices it reads: those of the
    non-rigid joints, from the rest mesh at zero angles.
    """

    def __init__(self, model, hand_model, skeleton: FitSkeleton, identity, skin: bool,
                 limits: Optional[torch.Tensor], bone_step: float = 0.25):
        from common.nets.loss import PenetLoss

        seg = np.asarray(hand_model.segmentation)
        non_rigid = list(hand_model.non_rigid_joint_indices)
        subset = np.concatenate([np.flatnonzero(seg == j) for j in non_rigid]) if non_rigid else np.zeros(0, int)
        self.loss = PenetLoss(hand_model.joint_names, hand_model.parents, seg[subset], hand_model.root_index,
                              non_rigid, bone_step_size=bone_step)
        full = PenetLoss.from_hand_model(hand_model, bone_step_size=bone_step)
        device = skeleton.device
        with torch.no_grad():
            zero = torch.zeros(1, hand_model.joint_num, 3, device=model.template_vertices.device)
            rest = model.rest_vertices(zero, identity)  # [1, V, 3]
            skinned = model.skinned_rest_mesh(rest, identity.template_pose)
            self.radii = full.to(skinned.device).point_radii(identity.template_pose, skinned).float().to(device)
            rest_joints = identity.template_pose[:, :3, 3].float().to(device)
            keep = self._apart_at_rest(rest_joints)
            if limits is not None:
                key = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in (
                    skeleton.local_rotation, skeleton.local_translation, self.radii, limits))).hexdigest()
                if key not in _MEET_CACHE:
                    _MEET_CACHE.clear()  # one hand at a time is what programs fit
                    _MEET_CACHE[key] = self._can_meet(skeleton, limits)
                keep &= _MEET_CACHE[key]
        self.loss.pair_points_first = self.loss.pair_points_first[keep]
        self.loss.pair_points_second = self.loss.pair_points_second[keep]
        self.loss.bone_pairs = [p for p, k in zip(self.loss.bone_pairs, keep.tolist()) if k]
        self.loss = self.loss.to(device)
        index = torch.as_tensor(subset, dtype=torch.long, device=rest.device)
        self.rest_subset = rest[0, index].float().to(device)  # [Vs, 3]
        self.weights_subset = model.skinning_weight[index].float().to(device)  # [Vs, J]
        self.global_pose_inv = model.global_pose_inv.float().to(device)
        self.skin = skin

    def _apart_at_rest(self, joints: torch.Tensor) -> torch.Tensor:
        points = self.loss.bone_points(joints[None])[0]
        first, second = self.loss.pair_points_first, self.loss.pair_points_second
        gap = (points[first][:, :, None] - points[second][:, None]).norm(dim=-1)
        overlap = self.radii[0, first][:, :, None] + self.radii[0, second][:, None] - gap
        return (overlap <= 0).all(dim=-1).all(dim=-1).cpu()

    def _can_meet(self, skeleton: FitSkeleton, limits: torch.Tensor, samples: int = 512,
                  margin: float = 5.0) -> torch.Tensor:
        """``[Q]`` bool: the bone pairs that come within ``margin`` mm of overlapping in some pose
        within the limits (``samples`` poses drawn uniformly, with a fixed seed). The others never
        meet, and are not evaluated."""
        generator = torch.Generator().manual_seed(0)
        lo, hi = limits[:, 0].cpu(), limits[:, 1].cpu()
        theta = lo + torch.rand(samples, lo.numel(), generator=generator, dtype=lo.dtype) * (hi - lo)
        theta = theta.to(skeleton.device, skeleton.dtype)
        eye = torch.eye(3, dtype=skeleton.dtype, device=skeleton.device).expand(samples, 3, 3)
        _, position = skeleton.forward(eye, theta.new_zeros(samples, 3), skeleton.euler_from_dofs(theta))
        points = self.loss.bone_points(position.float())
        first, second = self.loss.pair_points_first, self.loss.pair_points_second
        gap = (points[:, first][:, :, :, None] - points[:, second][:, :, None]).norm(dim=-1)
        overlap = self.radii[0, first][None, :, :, None] + self.radii[0, second][None, :, None] - gap
        return (overlap.flatten(2).amax(-1).amax(0) > -margin).cpu()

    def terms(self, rotation: torch.Tensor, position: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(bones [B], skin [B])``: the loss's rigid term summed over the bone pairs kept, and its
        non-rigid term (mm, unweighted), of posed joints ``rotation [B, J, 3, 3]``,
        ``position [B, J, 3]`` (mm); the skin term is 0 unless this was built with ``skin``."""
        rotation, position = rotation.float(), position.float()
        B = position.shape[0]
        points = self.loss.bone_points(position)
        radii = self.radii.expand(B, -1)
        # The loss averages over the bone pairs; here the sum over the pairs kept, so that a
        # weight means the same whatever pairs the limits rule out.
        rigid = self.loss.rigid_term(points, radii) * self.loss.pair_points_first.shape[0]
        if not self.skin or self.rest_subset.shape[0] == 0:
            return rigid, torch.zeros_like(rigid)
        transforms = to_homogeneous(rotation, position) @ self.global_pose_inv
        skin = linear_blend_skinning(self.rest_subset[None], self.weights_subset, transforms)
        return rigid, self.loss.non_rigid_term(points, radii, skin)


# ---------------------------------------------------------------------------------- problem
class _Problem:
    """Everything a frame's cost depends on but its unknowns."""

    def __init__(self, skeleton: FitSkeleton, data, weights: FitWeights, options: FitOptions,
                 limits: Optional[torch.Tensor], rest_weight: torch.Tensor, penetration: Optional[_Penetration],
                 hand_joint_names: Sequence[str], ranges: Optional[torch.Tensor] = None):
        self.skeleton, self.data, self.weights, self.options = skeleton, data, weights, options
        self.limits, self.rest_weight, self.penetration = limits, rest_weight, penetration
        A, b = linear_priors(skeleton, hand_joint_names, weights, ranges)
        self.prior_matrix = A.to(skeleton.device, skeleton.dtype)
        self.prior_offset = b.to(skeleton.device, skeleton.dtype)
        self.local_translation = skeleton.local_translation
        self.use_penetration = False
        self.smooth = False
        # The statistical priors (rest, couplings, smoothness, penetration) are weighted for 1 mm of keypoint
        # noise; times the square of the noise measured (see :func:`_noise_level`).
        self.prior_scale = 1.0

    @property
    def P(self) -> int:
        return 6 + self.skeleton.dof_num

    def pose(self, state: _State):
        euler = self.skeleton.euler_from_dofs(state.theta)
        rotation, position = self.skeleton.forward(state.rotation, state.translation, euler, self.local_translation)
        return euler, rotation, position

    def evaluate(self, state: _State, sigma: float, parts: Optional[dict] = None):
        """The frame-local part of the cost: ``(cost [B], grad [B, P], hessian [B, P, P])`` (the
        half-gradient and Gauss–Newton half-Hessian). ``parts``, a dict, receives the posed
        skeleton, the points, their Jacobian and the data term's information and gradient."""
        sk = self.skeleton
        euler, rotation, position = self.pose(state)
        points = sk.points(rotation, position)
        cost, info, e = self.data.terms(points, sigma, self.options.robust)
        J = sk.point_jacobian(rotation, position, euler, points)  # [B, K, 3, P]
        B, K = points.shape[:2]
        H = self._gauss_newton(J, info)
        g = (J.reshape(B, 3 * K, -1).transpose(1, 2) @ e.reshape(B, 3 * K, 1))[..., 0]
        if parts is not None:
            parts.update(rotation=rotation, position=position, points=points, info=info, grad=e, jacobian=J)
        D = sk.dof_num
        theta = state.theta
        rest = self.rest_weight * self.prior_scale
        cost = cost + (rest * theta.square()).sum(-1)
        g[:, 6:] += rest * theta
        H[:, 6:, 6:] += torch.diag_embed(rest.expand(B, D))
        if self.prior_matrix.shape[0]:
            A = self.prior_matrix
            r = theta @ A.t() - self.prior_offset  # [B, n]
            scale = self.prior_scale
            cost = cost + scale * r.square().sum(-1)
            g[:, 6:] += scale * (r @ A)
            H[:, 6:, 6:] += scale * (A.t() @ A)
        if self.limits is not None:
            lo, hi = self.limits[:, 0], self.limits[:, 1]
            excess = theta - torch.maximum(torch.minimum(theta, hi), lo)
            w = self.weights.limits
            cost = cost + w * excess.square().sum(-1)
            # The penalty's curvature also where an angle sits at a limit and the rest of the cost
            # pushes it out: else the Gauss–Newton model would step well beyond it.
            push = g[:, 6:]
            active = ((excess != 0) | ((theta >= hi - LIMIT_MARGIN) & (push < 0))
                      | ((theta <= lo + LIMIT_MARGIN) & (push > 0)))
            g[:, 6:] += w * excess
            H[:, 6:, 6:] += torch.diag_embed(w * active.to(theta.dtype))
        if self.use_penetration and self.penetration is not None:
            value, grad = self._penetration(state)
            cost = cost + value
            g += 0.5 * grad
        return cost, g, H

    def _blocks(self):
        """Per group of points that share their degrees of freedom (a digit's, or the root's alone):
        ``(points [n], parameters [c], flat index into P×P [c·c])``."""
        if getattr(self, "_block_cache", None) is None:
            sk = self.skeleton
            mask = sk.point_dof_mask > 0  # [K, D]
            groups: Dict[Tuple[int, ...], List[int]] = {}
            for k in range(sk.point_num):
                groups.setdefault(tuple(torch.nonzero(mask[k], as_tuple=True)[0].tolist()), []).append(k)
            # Merge groups whose degrees of freedom nest (a digit's points share its chain).
            chains: List[Tuple[set, List[int]]] = []
            for dofs, points in sorted(groups.items(), key=lambda item: -len(item[0])):
                for chain in chains:
                    if set(dofs) <= chain[0]:
                        chain[1].extend(points)
                        break
                else:
                    chains.append((set(dofs), list(points)))
            P = self.P
            blocks = []
            for dofs, points in chains:
                cols = torch.as_tensor([0, 1, 2, 3, 4, 5] + [6 + d for d in sorted(dofs)], device=sk.device)
                flat = (cols[:, None] * P + cols[None]).reshape(-1)
                blocks.append((torch.as_tensor(sorted(points), device=sk.device), cols, flat))
            self._block_cache = blocks
        return self._block_cache

    def _gauss_newton(self, J: torch.Tensor, info: torch.Tensor) -> torch.Tensor:
        """``Σ_k J_kᵀ M_k J_k`` (``[B, P, P]``) of the data term, one block per group of points that
        share their degrees of freedom (the zeros elsewhere never multiplied)."""
        B, P = J.shape[0], J.shape[-1]
        H = J.new_zeros(B, P * P)
        for points, cols, flat in self._blocks():
            Jb = J[:, points][..., cols]  # [B, n, 3, c]
            if info.dim() == 2:
                MJ = info[:, points, None, None] * Jb
            else:
                MJ = info[:, points] @ Jb
            n = points.numel()
            Hb = Jb.reshape(B, 3 * n, -1).transpose(1, 2) @ MJ.reshape(B, 3 * n, -1)
            H.index_add_(1, flat, Hb.reshape(B, -1))
        return H.view(B, P, P)

    def step(self, state: _State, delta: torch.Tensor) -> _State:
        """``state`` moved by ``delta [B, P]``, kept to a trust region (each angle and the root's
        rotation by at most :data:`MAX_ANGLE_STEP`, its position by :data:`MAX_SHIFT_STEP`), and an
        angle within its limits stops at them (plus :data:`LIMIT_MARGIN`): the Gauss–Newton model
        knows nothing of a limit it has not reached."""
        rot, shift, angles = delta[:, :3], delta[:, 3:6], delta[:, 6:]
        rot = rot * (MAX_ANGLE_STEP / rot.norm(dim=-1, keepdim=True).clamp(min=MAX_ANGLE_STEP))
        shift = shift * (MAX_SHIFT_STEP / shift.norm(dim=-1, keepdim=True).clamp(min=MAX_SHIFT_STEP))
        angles = angles.clamp(-MAX_ANGLE_STEP, MAX_ANGLE_STEP)
        moved = state.step(torch.cat([rot, shift, angles], -1))
        if self.limits is not None:
            lo, hi = self.limits[:, 0] - LIMIT_MARGIN, self.limits[:, 1] + LIMIT_MARGIN
            inside = (state.theta >= lo) & (state.theta <= hi)
            moved.theta = torch.where(inside, torch.maximum(torch.minimum(moved.theta, hi), lo), moved.theta)
        return moved

    def _penetration(self, state: _State):
        """``(weighted penetration cost [B], its gradient [B, P])``, by autograd."""
        with torch.enable_grad():
            B = state.theta.shape[0]
            rot = torch.zeros(B, 3, dtype=state.theta.dtype, device=state.theta.device, requires_grad=True)
            trans = torch.zeros_like(rot, requires_grad=True)
            theta = state.theta.detach().clone().requires_grad_(True)
            # First order in the rotation's perturbation: the exact derivative at zero.
            rotation = (torch.eye(3, dtype=rot.dtype, device=rot.device) + skew(rot)) @ state.rotation
            euler = self.skeleton.euler_from_dofs(theta)
            R, o = self.skeleton.forward(rotation, state.translation + trans, euler, self.local_translation)
            bones, skin = self.penetration.terms(R, o)
            # A prior like the others: weighted for 1 mm of keypoint noise (see prior_scale).
            value = self.prior_scale * (self.weights.penetration * bones + self.weights.penetration_skin * skin)
            grad = torch.autograd.grad(value.sum(), (rot, trans, theta))
        return value.detach().to(state.theta.dtype), torch.cat([g.to(state.theta.dtype) for g in grad], dim=-1)


# DIP flexion follows the PIP's: about two thirds of it in a finger flexing freely (the coupling
# of the two joints through the deep flexor tendon and the retinacular ligaments).
DIP_PIP_RATIO = 2.0 / 3.0
# The thumb's interphalangeal joint flexes with its metacarpophalangeal joint in grasping (ours: 1:1).
THUMB_IP_MCP_RATIO = 1.0


def linear_priors(skeleton: FitSkeleton, joint_names: Sequence[str], weights: FitWeights,
                  ranges: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(A [n, D], b [n])`` of the priors ``‖A θ − b‖²`` on the flexion (``z``) angles, each row
    scaled by the square root of its weight:

    * coupling: ``θ_DIP − ⅔ θ_PIP`` for each long finger (``X3``, ``X2``), and the thumb's
      ``θ_IP − θ_MCP`` (``thumb3``, ``thumb2``);
    * neighbours: ``θ − θ'`` of the same joint (``X1``, ``X2``, ``X3``) of adjacent long fingers:
      they do not flex independently, the ring finger least of all;
    * synergy: each flexion as a fraction of its range (``ranges [D, 2]``, the limit table's)
      minus the mean fraction of all of them: hands mostly open and close as a whole (the first
      "postural synergy" of grasping).
    """
    rows, offsets = [], []
    index = {(j, a): d for d, (j, a) in enumerate(zip(skeleton.dof_joint, skeleton.dof_axis))}

    def flexion(finger: str, number):
        hits = [j for j, n in enumerate(joint_names) if n.endswith(f"{finger}{number}")]
        return index.get((hits[0], 2)) if len(hits) == 1 else None

    def row(entries, offset: float = 0.0):
        r = torch.zeros(skeleton.dof_num, dtype=torch.float64)
        for d, value in entries:
            r[d] += value
        rows.append(r)
        offsets.append(offset)

    fingers = ("index", "middle", "ring", "pinky")
    if weights.coupling > 0:
        w = math.sqrt(weights.coupling)
        for finger, ratio in zip(fingers + ("thumb",), (DIP_PIP_RATIO,) * 4 + (THUMB_IP_MCP_RATIO,)):
            dip, pip = flexion(finger, 3), flexion(finger, 2)
            if dip is not None and pip is not None:
                row([(dip, w), (pip, -ratio * w)])
    if weights.neighbours > 0:
        w = math.sqrt(weights.neighbours)
        for a, b in zip(fingers[:-1], fingers[1:]):
            for number in (1, 2, 3):
                da, db = flexion(a, number), flexion(b, number)
                if da is not None and db is not None:
                    row([(da, w), (db, -w)])
    if weights.synergy > 0 and ranges is not None:
        w = math.sqrt(weights.synergy)
        flex = [d for d in (flexion(f, n) for f in fingers + ("thumb",) for n in (1, 2, 3)) if d is not None]
        lo = ranges[flex, 0].double().cpu()
        width = (ranges[flex, 1] - ranges[flex, 0]).double().cpu().clamp(min=1e-6)
        n = len(flex)
        centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
        for i in range(n):
            entries = [(flex[m], w * float(centre[i, m]) / float(width[m])) for m in range(n)]
            row(entries, w * float((centre[i] * (lo / width)).sum()))
    if not rows:
        return torch.zeros(0, skeleton.dof_num, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    return torch.stack(rows), torch.tensor(offsets, dtype=torch.float64)


# ------------------------------------------------------------------------------- smoothness
def _smooth_terms(state: _State, before: _State, after: _State, has_before: torch.Tensor,
                  has_after: torch.Tensor, weights: FitWeights, scale: float = 1.0):
    """Smoothness of each frame against given neighbours: ``(cost [B], grad [B, P], diag [B, P])``
    (half-gradient; ``diag`` the Jacobi step's diagonal, twice the exact one)."""
    B, D = state.theta.shape
    cost = state.theta.new_zeros(B)
    grad = state.theta.new_zeros(B, 6 + D)
    diag = state.theta.new_zeros(B, 6 + D)
    w_rot, w_t, w_a = (scale * w for w in (weights.smooth_rotation, weights.smooth_translation, weights.smooth_angles))
    for other, present in ((before, has_before), (after, has_after)):
        m = present.to(state.theta.dtype)
        d_rot = matrix_to_axis_angle(state.rotation @ other.rotation.transpose(1, 2))
        d_t = state.translation - other.translation
        d_a = state.theta - other.theta
        cost += m * (w_rot * d_rot.square().sum(-1) + w_t * d_t.square().sum(-1) + w_a * d_a.square().sum(-1))
        grad += m[:, None] * torch.cat([w_rot * d_rot, w_t * d_t, w_a * d_a], -1)
        diag += 2 * m[:, None] * torch.cat([d_rot.new_full((B, 3), w_rot), d_t.new_full((B, 3), w_t),
                                            d_a.new_full((B, D), w_a)], -1)
    return cost, grad, diag


def _smooth_around(problem, state: _State):
    """The smoothness terms of ``state`` against its neighbouring frames, with those neighbours (a
    candidate step is weighed against the same ones): ``(neighbours, cost, grad, diag)``."""
    neighbours = _neighbours(state)
    return (neighbours, *_smooth_terms(state, *neighbours, problem.weights, problem.prior_scale))


def _neighbours(state: _State) -> Tuple[_State, _State, torch.Tensor, torch.Tensor]:
    B = state.theta.shape[0]
    before = _State(state.rotation.roll(1, 0), state.translation.roll(1, 0), state.theta.roll(1, 0))
    after = _State(state.rotation.roll(-1, 0), state.translation.roll(-1, 0), state.theta.roll(-1, 0))
    idx = torch.arange(B, device=state.theta.device)
    return before, after, idx > 0, idx < B - 1


def _solve(H: torch.Tensor, g: torch.Tensor, mu: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(−(H + μ·diag(H))⁻¹ g [B, P], ok [B])`` by Cholesky; ``ok`` False where it failed (step 0)."""
    d = torch.diagonal(H, dim1=-2, dim2=-1)
    A = H + torch.diag_embed(mu[:, None] * (d + 1e-6 * d.mean(-1, keepdim=True) + _EPS))
    L, info = torch.linalg.cholesky_ex(A)
    ok = info == 0
    L = torch.where(ok[:, None, None], L, torch.eye(A.shape[-1], dtype=A.dtype, device=A.device))
    delta = -torch.cholesky_solve(g[..., None], L)[..., 0]
    return torch.where(ok[:, None], delta, torch.zeros_like(delta)), ok


class _Stopped(Exception):
    """Ctrl-C during the optimisation: carries the state reached, the iterations run and (when
    personalising) the shared parameters."""

    def __init__(self, state: "_State", iterations: int, shared: Optional[torch.Tensor] = None):
        super().__init__("interrupted")
        self.state, self.iterations, self.shared = state, iterations, shared


def _levenberg_marquardt(problem: _Problem, state: _State, sigma: float, iterations: int, tick: Callable,
                         tolerance: float) -> Tuple[_State, torch.Tensor, int]:
    """Per-frame damped Gauss–Newton. Returns ``(state, cost [B], iterations run)``; raises
    :class:`_Stopped` (carrying the state) on Ctrl-C."""
    B = state.theta.shape[0]
    cost, g, H = problem.evaluate(state, sigma)
    mu = torch.full((B,), 1e-3, dtype=cost.dtype, device=cost.device)
    done = 0
    try:
        for _ in range(iterations):
            if problem.smooth:
                neighbours, s_cost, s_grad, s_diag = _smooth_around(problem, state)
                H_step = H + torch.diag_embed(s_diag)
                g_step = g + s_grad
            else:
                H_step, g_step, s_cost = H, g, 0.0
            delta, ok = _solve(H_step, g_step, mu)
            candidate = problem.step(state, delta)
            c_cost, c_g, c_H = problem.evaluate(candidate, sigma)
            if problem.smooth:
                c_s, _, _ = _smooth_terms(candidate, *neighbours, problem.weights, problem.prior_scale)
                new_total, old_total = c_cost + c_s, cost + s_cost
            else:
                new_total, old_total = c_cost, cost
            accept = ok & torch.isfinite(new_total) & (new_total < old_total)
            state = candidate.select(accept, state)
            gain = torch.where(accept, (old_total - new_total) / old_total.abs().clamp(min=_EPS),
                               torch.zeros_like(cost))
            cost = torch.where(accept, c_cost, cost)
            g = torch.where(accept[:, None], c_g, g)
            H = torch.where(accept[:, None, None], c_H, H)
            mu = torch.where(accept, (mu / 3).clamp(min=1e-7), (mu * 4).clamp(max=1e7))
            done += 1
            tick(cost)
            if bool((gain < tolerance).all()) and bool((accept | (mu >= 1e7) | (delta.abs().amax(-1) < 1e-9)).all()):
                if bool((gain[accept] < tolerance).all()):
                    break
    except KeyboardInterrupt:
        raise _Stopped(state, done) from None
    return state, cost, done


# ------------------------------------------------------------------------------ start
def _weighted_kabsch(source: torch.Tensor, target: torch.Tensor,
                     weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotation ``[B, 3, 3]`` and translation ``[B, 3]`` minimising ``Σ w ‖R s + t − y‖²``
    (``source`` ``[K, 3]`` or ``[B, K, 3]``, ``target [B, K, 3]``, ``weight [B, K]``)."""
    source = source.expand_as(target)
    total = weight.sum(-1, keepdim=True).clamp(min=_EPS)
    sm = (weight[..., None] * source).sum(1) / total
    tm = (weight[..., None] * target).sum(1) / total
    cov = ((source - sm[:, None]) * weight[..., None]).transpose(1, 2) @ (target - tm[:, None])
    U, _, Vh = torch.linalg.svd(cov)
    V = Vh.transpose(1, 2)
    sign = torch.sign(torch.det(V @ U.transpose(1, 2)))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    D = torch.ones_like(sm)
    D[:, 2] = sign
    R = (V * D[:, None]) @ U.transpose(1, 2)
    return R, tm - (R @ sm[..., None])[..., 0]


def _spin(axis: torch.Tensor, count: int) -> torch.Tensor:
    """``[B, count, 3, 3]`` rotations by ``2πi / count`` about the unit ``axis [B, 3]``."""
    angles = torch.arange(count, dtype=axis.dtype, device=axis.device) * (2 * math.pi / count)
    return axis_angle_to_matrix(axis[:, None] * angles[None, :, None])


def _starts(rest_points: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, palm: torch.Tensor,
            count: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Starting roots: the robust palm alignment, and where it is ambiguous ``count`` rotations.

    Args:
        rest_points: ``[K, 3]`` the model's points in the rest pose, root at the identity.
        target: ``[B, K, 3]``; weight: ``[B, K]``; palm: ``[K]`` bool, the palm's points.
    Returns:
        ``(frame [N], rotation [N, 3, 3], translation [N, 3])``, each frame once or ``count`` times.
    """
    B = target.shape[0]
    w_palm = weight * palm.to(weight.dtype)
    n_palm = (w_palm > 0).sum(-1)
    # Robust: three reweighted alignments (Geman–McClure, 15 mm) drop a wrong palm keypoint.
    w = w_palm.clone()
    for _ in range(3):
        R, t = _weighted_kabsch(rest_points, target, w)
        r = ((rest_points @ R.transpose(1, 2)) + t[:, None] - target).norm(dim=-1)
        w = w_palm * (225.0 / (225.0 + r.square())).square()
    # Ambiguity: fewer than three palm points, or all on a line (second spread < a fifth of the first).
    mean = (w_palm[..., None] * target).sum(1, keepdim=True) / w_palm.sum(-1).clamp(min=_EPS)[:, None, None]
    centred = target - mean
    spread = torch.linalg.svdvals(centred * (w_palm > 0)[..., None].to(target.dtype))
    ambiguous = (n_palm < 3) | (spread[:, 1] < 0.2 * spread[:, 0].clamp(min=_EPS))
    frames = [torch.arange(B, device=target.device)]
    rotations, translations = [R], [t]
    amb = torch.nonzero(ambiguous, as_tuple=True)[0]
    if amb.numel():
        # Align all valid points (or the palm line) first, then spin about the line's direction
        # (or about three axes when even that is unknown) and keep every spin as a start.
        w_all = weight[amb]
        use_palm = (n_palm[amb] >= 2)[:, None]
        w_fit = torch.where(use_palm, w_palm[amb], w_all)
        R0, t0 = _weighted_kabsch(rest_points, target[amb], w_fit)
        src_c = (w_fit[..., None] * rest_points).sum(1) / w_fit.sum(-1, keepdim=True).clamp(min=_EPS)
        dst = target[amb]
        dst_c = (w_fit[..., None] * dst).sum(1) / w_fit.sum(-1, keepdim=True).clamp(min=_EPS)
        _, _, vh = torch.linalg.svd((dst - dst_c[:, None]) * (w_fit > 0)[..., None].to(dst.dtype))
        axis = vh[:, 0]
        spins = _spin(axis, count)  # [A, count, 3, 3]
        R_all = spins @ R0[:, None]
        t_all = dst_c[:, None] - (R_all @ src_c[:, None, :, None])[..., 0]
        frames.append(amb.repeat_interleave(count))
        rotations.append(R_all.reshape(-1, 3, 3))
        translations.append(t_all.reshape(-1, 3))
        keep = torch.ones(B, dtype=torch.bool, device=target.device)
        keep[amb] = False
        frames[0], rotations[0], translations[0] = frames[0][keep], R[keep], t[keep]
    return torch.cat(frames), torch.cat(rotations), torch.cat(translations)


def _chains(skeleton: FitSkeleton, point_of_joint: Dict[int, List[int]]) -> Dict[int, List[int]]:
    """For every joint with degrees of freedom and one child, the keypoints below it down its
    chain, nearest first (the child's, then the grandchild's, …)."""
    children = {}
    for j, p in enumerate(skeleton.parents):
        if p >= 0:
            children.setdefault(p, []).append(j)
    out = {}
    for j in set(skeleton.dof_joint):
        points, node = [], j
        while len(children.get(node, [])) == 1:
            node = children[node][0]
            points += point_of_joint.get(node, [])
        if points and len(children.get(j, [])) == 1:
            out[j] = points
    return out


def _initial_angles(skeleton: FitSkeleton, state: _State, target: torch.Tensor, weight: torch.Tensor,
                    chains: Dict[int, List[int]], rest_points: torch.Tensor,
                    limits: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, D]`` angles that point every bone at the nearest keypoint seen below it, joint by joint
    from the root (a swing without twist: ``z`` then ``y``; a one-axis joint takes the part of the
    turn about its axis), clamped to the limits; 0 where nothing below the joint is seen.

    Args:
        chains: :func:`_chains`; rest_points: ``[K, 3]`` the keypoints of the rest pose, root at the identity.
    """
    theta = state.theta.clone()
    dof_of = {}
    for d, (j, a) in enumerate(zip(skeleton.dof_joint, skeleton.dof_axis)):
        dof_of.setdefault(j, {})[a] = d
    eye = torch.eye(3, dtype=theta.dtype, device=theta.device)[None]
    zero_t = theta.new_zeros(1, 3)
    zero_angles = skeleton.euler_from_dofs(theta.new_zeros(1, theta.shape[1]))
    rest_rotation, rest_position = skeleton.forward(eye, zero_t, zero_angles)
    for joints, _ in skeleton.tree.steps:
        ids = joints.tolist() if isinstance(joints, torch.Tensor) else list(range(skeleton.joint_num))[joints]
        todo = [j for j in ids if j in chains]
        if not todo:
            continue
        euler = skeleton.euler_from_dofs(theta)
        rotation, position = skeleton.forward(state.rotation, state.translation, euler)
        for j in todo:
            p = skeleton.parents[j]
            frame = rotation[:, p] @ skeleton.local_rotation[j]  # [B, 3, 3] before the joint turns
            rest_frame = rest_rotation[0, p] @ skeleton.local_rotation[j]
            d = torch.zeros_like(target[:, 0])
            u = torch.zeros_like(target[:, 0])
            seen = torch.zeros(target.shape[0], dtype=torch.bool, device=target.device)
            for k in chains[j]:  # nearest seen keypoint first
                take = (weight[:, k] > 0) & ~seen
                d_k = (frame.transpose(1, 2) @ (target[:, k] - position[:, j])[..., None])[..., 0]
                u_k = rest_frame.t() @ (rest_points[k] - rest_position[0, j])
                d = torch.where(take[:, None], d_k, d)
                u = torch.where(take[:, None], u_k.expand_as(d), u)
                seen |= take
            d = d / d.norm(dim=-1, keepdim=True).clamp(min=_EPS)
            u = u / u.norm(dim=-1, keepdim=True).clamp(min=_EPS)
            dz = torch.atan2(d[:, 1], d[:, 0]) - torch.atan2(u[:, 1], u[:, 0])
            dz = torch.remainder(dz + math.pi, 2 * math.pi) - math.pi
            dy = -torch.asin(d[:, 2].clamp(-1, 1)) + torch.asin(u[:, 2].clamp(-1, 1))
            for axis, value in ((2, dz), (1, dy)):
                if axis in dof_of[j]:
                    i = dof_of[j][axis]
                    theta[:, i] = torch.where(seen, value, theta[:, i])
        if limits is not None:
            theta = torch.maximum(torch.minimum(theta, limits[:, 1]), limits[:, 0])
    return theta


CURLS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _digits(skeleton: FitSkeleton, joint_names: Sequence[str], point_joint: Sequence[int]):
    """Per digit (thumb…pinky): ``(dof mask [D], point mask [K])`` of its joints and keypoints."""
    out = []
    for digit in ("thumb", "index", "middle", "ring", "pinky"):
        dofs = torch.as_tensor([digit in joint_names[j] for j in skeleton.dof_joint], device=skeleton.device)
        points = torch.as_tensor([digit in joint_names[j] for j in point_joint], device=skeleton.device)
        out.append((dofs, points))
    return out


def _choose_start_angles(problem: _Problem, state: _State, candidates: torch.Tensor, digits,
                         sigma: float) -> torch.Tensor:
    """``[B, D]``: per frame and digit, the candidate (``[H, B, D]``) whose keypoints of that digit
    have the lowest robust cost."""
    H, B, D = candidates.shape
    sk = problem.skeleton
    flat = candidates.reshape(H * B, D)
    rotation = state.rotation.repeat(H, 1, 1)
    translation = state.translation.repeat(H, 1)
    R, o = sk.forward(rotation, translation, sk.euler_from_dofs(flat), problem.local_translation)
    points = sk.points(R, o).reshape(H, B, -1, 3)
    data = problem.data
    rho, _ = robust_cost((points - data.target[None]).norm(dim=-1), sigma, problem.options.robust)
    rho = rho * data.weight[None]
    out = candidates[0].clone()
    for dofs, pts in digits:
        cost = rho[..., pts].sum(-1)  # [H, B]
        best = cost.argmin(0)  # [B]
        chosen = candidates.gather(0, best[None, :, None].expand(1, B, D))[0]
        out[:, dofs] = chosen[:, dofs]
    return out


def _curl_candidates(skeleton: FitSkeleton, limits: Optional[torch.Tensor], B: int) -> torch.Tensor:
    """``[len(CURLS), B, D]``: every flexion (``z``) angle at a fraction of its upper limit (90° when
    the limits are lifted), the other angles 0."""
    D = skeleton.dof_num
    upper = limits[:, 1] if limits is not None else torch.full((D,), math.pi / 2, dtype=skeleton.dtype,
                                                               device=skeleton.device)
    flexion = torch.as_tensor([a == 2 for a in skeleton.dof_axis], device=skeleton.device)
    curls = torch.as_tensor(CURLS, dtype=skeleton.dtype, device=skeleton.device)
    theta = curls[:, None] * torch.where(flexion, upper, torch.zeros_like(upper))[None]
    return theta[:, None].expand(-1, B, -1).clone()


# ---------------------------------------------------------------------------- personalise
def _personalise(problem: _Problem, state: _State, sigma: float, iterations: int, base: torch.Tensor,
                 directions: torch.Tensor, fitted: torch.Tensor, tick: Callable,
                 shared: Optional[torch.Tensor] = None) -> Tuple[_State, torch.Tensor]:
    """Joint steps on every frame and the shared skeleton (global scale and fitted bones' lengths),
    through the Schur complement of the frames' blocks; one damping for all, a step kept where it
    lowers the total cost. ``shared``: ``[1 + J]`` (scale − 1, bone changes mm) to start from
    (0 when None); returns the state and the shared parameters reached. The local translations
    are ``base · (1 + scale − 1) + directions · change``."""
    sk = problem.skeleton
    S = 1 + sk.joint_num
    shared = torch.zeros(S, dtype=base.dtype, device=base.device) if shared is None else shared.clone()
    active = torch.cat([torch.ones(1, dtype=torch.bool, device=base.device), fitted])
    prior = torch.cat([base.new_zeros(1), base.new_full((sk.joint_num,), problem.weights.bone_length)])

    def translation(p):
        return base * (1 + p[0]) + directions * p[1:, None]

    def evaluate(st, p):
        problem.local_translation = translation(p)
        parts = {}
        cost, g, H = problem.evaluate(st, sigma, parts)
        # The translations are base·(1 + p0) + directions·p: d/dp0 is base, d/dp_j the direction.
        Js = sk.skeleton_jacobian(parts["rotation"], base, directions)  # [B, K, 3, S]
        J, info, e = parts["jacobian"], parts["info"], parts["grad"]
        B, K = J.shape[:2]
        MJs = info[..., None, None] * Js if info.dim() == 2 else info @ Js
        C = J.reshape(B, 3 * K, -1).transpose(1, 2) @ MJs.reshape(B, 3 * K, -1)  # [B, P, S]
        Hs = (Js.reshape(B, 3 * K, -1).transpose(1, 2) @ MJs.reshape(B, 3 * K, -1)).sum(0)
        gs = torch.einsum("bkcs,bkc->s", Js, e)
        total = cost.sum() + (prior * p.square()).sum()
        if problem.smooth:
            total = total + _smooth_total(st, problem.weights, problem.prior_scale)
        return cost, g, H, C, Hs + torch.diag(prior), gs + prior * p, total

    cost, g, H, C, Hs, gs, total = evaluate(state, shared)
    mu = 1e-3
    try:
        for _ in range(iterations):
            d = torch.diagonal(H, dim1=-2, dim2=-1)
            A = H + torch.diag_embed(mu * (d + 1e-6 * d.mean(-1, keepdim=True) + _EPS))
            if problem.smooth:
                _, _, s_grad, s_diag = _smooth_around(problem, state)
                A = A + torch.diag_embed(s_diag)
                g_f = g + s_grad
            else:
                g_f = g
            L = torch.linalg.cholesky(A)
            Ainv_C = torch.cholesky_solve(C, L)             # [B, P, S]
            Ainv_g = torch.cholesky_solve(g_f[..., None], L)[..., 0]
            schur = Hs - (C.transpose(1, 2) @ Ainv_C).sum(0)
            rhs = -gs + (C.transpose(1, 2) @ Ainv_g[..., None])[..., 0].sum(0)
            m = active.to(schur.dtype)
            schur = schur * m[:, None] * m[None] + torch.diag(1 - m) + mu * torch.diag(torch.diagonal(schur) * m)
            d_shared = torch.linalg.solve(schur, rhs * m)
            d_frames = -(Ainv_g + (Ainv_C @ d_shared[:, None])[..., 0])
            cand_state, cand_shared = problem.step(state, d_frames), shared + d_shared
            c = evaluate(cand_state, cand_shared)
            if bool(torch.isfinite(c[-1])) and c[-1] < total:
                state, shared = cand_state, cand_shared
                cost, g, H, C, Hs, gs, total = c
                mu = max(mu / 3, 1e-7)
            else:
                mu = min(mu * 4, 1e7)
            tick(cost)
    except KeyboardInterrupt:
        problem.local_translation = translation(shared)
        raise _Stopped(state, 0, shared) from None
    problem.local_translation = translation(shared)
    return state, shared


def _noise_level(problem: _Problem, state: _State) -> float:
    """The keypoints' noise (mm): the median distance of the keypoints to the fitted hand over all
    frames, at least :data:`NOISE_FLOOR`."""
    with torch.no_grad():
        _, rotation, position = problem.pose(state)
        points = problem.skeleton.points(rotation, position)
        distance = problem.data.distance_mm(points)[problem.data.weight > 0]
    if distance.numel() == 0:
        return DEFAULT_SCALE_GUESS / 3
    return max(float(distance.median()), NOISE_FLOOR)


def _refine_on_inliers(problem: _Problem, state: _State, sigma: float, iterations: int, tick: Callable,
                       tolerance: float) -> _State:
    """A last pass with plain least squares on the keypoints within ``σ`` of the fitted hand (the
    robust cost's outliers left out): as exact as least squares where the data are clean."""
    if iterations <= 0:
        return state
    data = problem.data
    with torch.no_grad():
        _, rotation, position = problem.pose(state)
        points = problem.skeleton.points(rotation, position)
    distance = data.distance_mm(points)
    inlier = data.with_weight(torch.where(distance <= sigma, data.weight, torch.zeros_like(data.weight)))
    robust = problem.options.robust
    problem.data, problem.options.robust = inlier, "l2"
    try:
        state, _, _ = _levenberg_marquardt(problem, state, sigma, iterations, tick, tolerance)
    finally:
        problem.data, problem.options.robust = data, robust
    return state


def _smooth_total(state: _State, weights: FitWeights, scale: float = 1.0) -> torch.Tensor:
    """The sequence's whole smoothness cost (each pair of consecutive frames once)."""
    before, _, has_before, _ = _neighbours(state)
    zeros = torch.zeros_like(has_before)
    cost, _, _ = _smooth_terms(state, before, before, has_before, zeros, weights, scale)
    return cost.sum()


# ------------------------------------------------------------------------------------ inputs
def _as_array(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise FitInputError(f"{name}: expected numbers, got {type(value).__name__}") from None


# -------------------------------------------------------------------------------- the model
def rest_surface(model, identity) -> Tuple[np.ndarray, np.ndarray]:
    """``(rest poses G' [J, 4, 4], rest vertices [V, 3])`` (mm, float64) of the model as loaded, zero angles."""
    with torch.no_grad():
        zero = torch.zeros(1, model.joint_num, 3, device=model.template_vertices.device)
        rest = model.rest_vertices(zero, identity)
        skinned = model.skinned_rest_mesh(rest, identity.template_pose)[0]
    return identity.template_pose.detach().double().cpu().numpy(), skinned.detach().double().cpu().numpy()


def tip_offsets(model, identity=None) -> Dict[str, float]:
    """:func:`common.fitting.conventions.measure_tip_offsets` on ``model``'s rest surface."""
    if identity is None:
        with torch.no_grad():
            identity = model.identity()
    pose, verts = rest_surface(model, identity)
    hand = model.hand_model
    return measure_tip_offsets(hand.joint_names, hand.parents, pose, verts, hand.faces)


def joint_limits_rad(hand_model, dof_flat: torch.Tensor) -> torch.Tensor:
    """``[D, 2]`` lower and upper limits (radians) of the degrees of freedom, from the editor's table."""
    from common.hand.joint_limits import joint_limits_deg

    limits = np.radians(joint_limits_deg(hand_model)).reshape(-1, 2)
    return torch.as_tensor(limits[dof_flat.cpu().numpy()])


def personalise_model(model, identity, offset_mm: torch.Tensor, scale: float):
    """A copy of ``model`` whose skeleton corrective adds ``offset_mm [J, 3]`` to the local
    translations and whose identity corrective scales the rest surface by ``scale`` about the
    skinning (so that the zero pose's skinned mesh is ``scale`` times as large where the bones
    are scaled alone): the last layers' biases take the change, so ``decode`` and a snapshot of
    the copy carry it."""
    personal = copy.deepcopy(model)
    with torch.no_grad():
        layer = personal.skeleton_refine_net.fc_skeleton[-1]
        layer.bias += offset_mm.reshape(-1).to(layer.bias)
        if scale != 1.0:
            zero = torch.zeros(1, model.joint_num, 3, device=model.template_vertices.device)
            rest = model.rest_vertices(zero, identity)[0]  # [V, 3]
            joints = model.global_pose[:, :3, 3]  # template joints: the skinning's bind positions
            bound = model.skinning_weight @ joints  # [V, 3] Σ_j w_vj o_j
            change = (scale - 1.0) * (rest - bound)
            id_layer = personal.skin_refine_net.fc_id[-1]
            id_layer.bias += change.reshape(-1).to(id_layer.bias)
    return personal


# -------------------------------------------------------------------------------------- API
# Up to this many frames the fitter's arrays are small enough that a second CPU thread gains
# little (1,000 frames: 4.0 s with two, 4.8 s with one), while on a machine whose cores are busy
# the threads wait for each other at every operation (1,000 frames at load 8: 75 s against 6.5 s).
SINGLE_THREAD_FRAMES = 128


@contextlib.contextmanager
def _threads_for(device: torch.device, frames: int):
    """One torch thread for a small fit on the CPU (restored afterwards); else as set."""
    if device.type != "cpu" or frames > SINGLE_THREAD_FRAMES or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_keypoints(model, keypoints=None, convention: str = "dhm", *, confidence=None, units: str = "mm",
                  hand: str = "right", views=None, weights: Optional[FitWeights] = None,
                  options: Optional[FitOptions] = None, progress: bool = False) -> FitResult:
    """Fit the hand model to 21 keypoints per frame (see the module notes).

    Args:
        model: a :class:`main.model.Model` (``get_model('test', hand)``, a checkpoint loaded or its
            correctives zeroed), on the device to fit on.
        keypoints: ``[21, 3]`` or ``[T, 21, 3]`` (array or tensor; NaN: missing), in ``units``.
        convention: ``'dhm'``, ``'mediapipe'``, ``'openpose'`` or ``'interhand'``
            (:mod:`common.fitting.conventions`).
        confidence: ``[T, 21]``, 0 for missing points (None: all 1).
        units: ``'mm'`` or ``'m'`` of the keypoints (and of the outputs in their frame).
        hand: ``'right'`` or ``'left'`` (mirrored, ``x → −x``, before fitting).
        views: :class:`common.fitting.triangulate.MultiViewKeypoints` for multi-view 2D fitting
            instead of ``keypoints`` (started from their triangulation; outputs in mm).
        weights, options: :class:`FitWeights`, :class:`FitOptions` (defaults when None).
        progress: show a progress bar over the iterations.
    Returns:
        :class:`FitResult`. On the CPU, a fit of up to :data:`SINGLE_THREAD_FRAMES` frames runs on
        one torch thread (the setting is restored after it).
    """
    frames = (views.uv.shape[0] if views is not None else
              (np.shape(keypoints)[0] if keypoints is not None and np.ndim(keypoints) == 3 else 1))
    with _threads_for(model.template_vertices.device, frames):
        return _fit(model, keypoints, convention, confidence=confidence, units=units, hand=hand, views=views,
                    weights=weights, options=options, progress=progress)


def _fit(model, keypoints, convention: str, *, confidence, units: str, hand: str, views,
         weights: Optional[FitWeights], options: Optional[FitOptions], progress: bool) -> FitResult:
    """:func:`fit_keypoints`."""
    start_time = time.perf_counter()
    weights = weights or FitWeights()
    options = options or FitOptions()
    conv = get_convention(convention)
    if units not in UNITS:
        raise FitInputError(f"--units {units}: expected mm or m")
    if hand not in ("right", "left"):
        raise FitInputError(f"--hand {hand}: expected right or left")
    if options.robust not in ROBUST_COSTS:
        raise FitInputError(f"robust cost {options.robust!r}: expected one of {', '.join(ROBUST_COSTS)}")
    if options.personalise not in (None, "skeleton"):
        raise FitInputError(f"--personalise {options.personalise}: expected skeleton")
    if options.robust_scale is not None and not options.robust_scale > 0:
        raise FitInputError(f"robust scale {options.robust_scale}: expected a positive number of mm")
    mirrored = hand == "left"
    mirror = np.array([-1.0 if mirrored else 1.0, 1.0, 1.0])
    hand_model = model.hand_model
    device = model.template_vertices.device
    dtype = torch.float64
    with torch.no_grad():
        identity = model.identity()
    tips = tip_offsets(model, identity)
    kmap = keypoint_map(hand_model, conv, tips)

    # ------------------------------------------------------------------ the data
    cams = None
    if views is not None:
        if keypoints is not None:
            raise FitInputError("give either 3D keypoints or 2D views, not both")
        cams = views.camera_arrays()
        if mirrored:
            cams = mirror_cameras(cams)
        from common.fitting.triangulate import triangulate

        uv = views.camera_pixels()
        conf2d = np.where(np.isfinite(uv).all(-1), views.confidence, 0.0)
        if not np.isfinite(views.confidence).all() or (views.confidence < 0).any():
            raise FitInputError("keypoints2d: confidence must be finite and at least 0")
        if np.isinf(uv).any():
            raise FitInputError("keypoints2d: uv has infinite numbers; expected finite pixels (NaN for missing)")
        empty = np.flatnonzero((conf2d > 0).sum(axis=(1, 2)) == 0)
        if empty.size:
            raise FitInputError(f"keypoints2d: frame {empty[0]} has every keypoint missing in every view")
        triangulated, used = triangulate(uv, conf2d, cams)
        target = triangulated
        tri_conf = np.where(np.isfinite(triangulated).all(-1), 1.0, 0.0)
        conf = tri_conf
        units = "mm"
        scale_units = 1.0
    else:
        if keypoints is None:
            raise FitInputError("no keypoints given")
        points, conf = check_keypoints("keypoints", _as_array(keypoints, "keypoints"),
                                       None if confidence is None else _as_array(confidence, "confidence"))
        scale_units = UNITS[units]
        target = points * scale_units * mirror
    T = target.shape[0]
    target_t = torch.as_tensor(np.nan_to_num(target), dtype=dtype, device=device)
    conf_t = torch.as_tensor(conf, dtype=dtype, device=device)
    data3d = Points3D(target_t, conf_t)

    # ------------------------------------------------------------------ the problem
    skeleton = FitSkeleton(hand_model.parents, identity.local_pose, hand_model.dof_mask, kmap.joint_index,
                           kmap.offset_mm, dtype=dtype, device=device)
    rest_weight = torch.full((skeleton.dof_num,), float(weights.rest), dtype=dtype, device=device)
    thumb0 = [i for i, j in enumerate(skeleton.dof_joint) if hand_model.joint_names[j].endswith("thumb0")]
    rest_weight[thumb0] *= 10
    ranges = joint_limits_rad(hand_model, skeleton.dof_flat).to(device, dtype)
    limits = ranges if options.limits else None
    penetration = None
    if weights.penetration > 0 or weights.penetration_skin > 0:
        penetration = _Penetration(model, hand_model, skeleton, identity, skin=weights.penetration_skin > 0,
                                   limits=limits)
    problem = _Problem(skeleton, data3d, weights, options, limits, rest_weight, penetration, hand_model.joint_names,
                       ranges)

    # A hand can be placed on 3 or more keypoints that are not all on one line.
    seen = conf_t > 0
    count = seen.sum(-1)
    mean = (target_t * seen[..., None]).sum(1) / count.clamp(min=1)[:, None]
    off_line = torch.linalg.svdvals((target_t - mean[:, None]) * seen[..., None])[:, 1] / count.clamp(min=1).sqrt()
    placed = (count >= 3) & (off_line >= COLLINEAR_MM)
    failed: Dict[int, str] = {}
    for t in torch.nonzero(~placed, as_tuple=True)[0].tolist():
        n = int(count[t])
        what = "keypoint(s)" if views is None else "keypoint(s) seen by two or more views"
        failed[t] = (f"only {n} {what}: placing the hand needs at least 3" if n < 3 else
                     f"its {n} {what} lie on a line: the hand's turn about it is not determined")

    wide = WIDE * (float(options.robust_scale) if options.robust_scale is not None else DEFAULT_SCALE_GUESS)
    stages = [options.start_iterations, options.iterations, options.refine_iterations]
    if options.personalise:
        stages += [options.personalise_iterations, options.iterations // 2]  # (in two halves)
    if views is not None:
        stages += [options.iterations, options.refine_iterations]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(stages), desc="fitting", unit="it", leave=False)
    iterations = [0]

    def tick(cost):
        iterations[0] += 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(cost=f"{float(cost.mean()):.3g}")

    interrupted = False
    shared = None
    noise = options.noise
    sigma = float(options.robust_scale) if options.robust_scale is not None else DEFAULT_SCALE_GUESS
    zero = torch.zeros(1, skeleton.dof_num, dtype=dtype, device=device)
    rest_points = skeleton.points(*skeleton.forward(torch.eye(3, dtype=dtype, device=device)[None],
                                                     torch.zeros(1, 3, dtype=dtype, device=device),
                                                     skeleton.euler_from_dofs(zero)))[0]
    palm = torch.as_tensor([any(hand_model.joint_names[j].endswith(s) for s in PALM_JOINTS) and off == 0
                            for j, off in zip(kmap.joint_index, kmap.offset_mm)], device=device)
    frame, R0, t0 = _starts(rest_points, target_t, conf_t, palm, options.starts)
    state = _State(R0, t0, torch.zeros(R0.shape[0], skeleton.dof_num, dtype=dtype, device=device))
    point_of_joint: Dict[int, List[int]] = {}
    for k, j in enumerate(kmap.joint_index.tolist()):
        point_of_joint.setdefault(int(j), []).append(k)
    problem.data = data3d.select(frame)
    analytic = _initial_angles(skeleton, state, problem.data.target, problem.data.weight,
                               _chains(skeleton, point_of_joint), rest_points, limits)
    candidates = torch.cat([analytic[None], _curl_candidates(skeleton, limits, analytic.shape[0])])
    state.theta = _choose_start_angles(problem, state, candidates,
                                       _digits(skeleton, hand_model.joint_names, kmap.joint_index.tolist()),
                                       DEFAULT_SCALE_GUESS)
    try:
        # First pass: every start, a wide robust scale, no coupling between frames.
        problem.data = data3d.select(frame)
        try:
            state, _, _ = _levenberg_marquardt(problem, state, wide, options.start_iterations, tick,
                                               options.tolerance)
        except _Stopped as stop:
            state = stop.state
            raise
        finally:
            cost, _, _ = problem.evaluate(state, wide)
            best = torch.full((T,), math.inf, dtype=dtype, device=device).scatter_reduce(0, frame, cost, "amin")
            winner = torch.nonzero(cost == best[frame], as_tuple=True)[0]
            pick = torch.zeros(T, dtype=torch.long, device=device)
            pick[frame[winner].flip(0)] = winner.flip(0)  # the first start of each frame that is best
            state = state.index(pick)
            problem.data = data3d
        noise = _noise_level(problem, state) if options.noise is None else float(options.noise)
        problem.prior_scale = noise ** 2
        sigma = (float(options.robust_scale) if options.robust_scale is not None
                 else min(max(ROBUST_MULTIPLE * noise, SCALE_RANGE[0]), SCALE_RANGE[1]))
        # Second pass: the final robust scale (reached from twice it), every prior.
        problem.smooth = T > 1 and (weights.smooth_angles > 0 or weights.smooth_rotation > 0
                                    or weights.smooth_translation > 0)
        third = max(1, options.iterations // 3)
        state, _, _ = _levenberg_marquardt(problem, state, 2 * sigma, third, tick, options.tolerance)
        problem.use_penetration = True
        state, _, _ = _levenberg_marquardt(problem, state, sigma, options.iterations - third, tick,
                                           options.tolerance)
        if options.personalise:
            base = skeleton.local_translation.clone()
            directions = skeleton.bone_directions(base)
            fitted = _fittable_bones(skeleton, hand_model, kmap, conf_t, options.min_bone_frames)
            half = max(1, options.personalise_iterations // 2)
            # The bones from the keypoints alone: smoothness, which is not invariant to the hand's
            # size, could otherwise trade the skeleton's scale for less motion.
            smooth, problem.smooth = problem.smooth, False
            for rounds in (options.personalise_iterations - half, half):
                try:
                    state, shared = _personalise(problem, state, sigma, rounds, base, directions, fitted, tick,
                                                 shared)
                except _Stopped as stop:
                    state, shared = stop.state, stop.shared
                    raise
                # The skeleton changed what is left over: measure the noise again.
                if options.noise is None:
                    noise = _noise_level(problem, state)
                    problem.prior_scale = noise ** 2
                if options.robust_scale is None:
                    sigma = min(max(ROBUST_MULTIPLE * noise, SCALE_RANGE[0]), SCALE_RANGE[1])
            problem.smooth = smooth
            state, _, _ = _levenberg_marquardt(problem, state, sigma, options.iterations // 2, tick,
                                               options.tolerance)
        if views is None:
            state = _refine_on_inliers(problem, state, sigma, options.refine_iterations, tick, options.tolerance)
        if views is not None:
            problem.data = _views_data(views, cams, uv, conf2d, problem, state, dtype, device)
            state, _, _ = _levenberg_marquardt(problem, state, sigma, options.iterations, tick, options.tolerance)
            state = _refine_on_inliers(problem, state, sigma, options.refine_iterations, tick, options.tolerance)
    except (_Stopped, KeyboardInterrupt) as stop:
        # Ctrl-C: inside an optimisation loop it arrives as _Stopped with the state reached; between
        # loops as itself, the state being the last one reached (stage one's starts already chosen).
        interrupted = True
        if isinstance(stop, _Stopped):
            state = stop.state if stop.state.theta.shape[0] == T else state
            if stop.shared is not None:
                shared = stop.shared
    finally:
        if bar is not None:
            bar.close()

    # ------------------------------------------------------------------ the result
    personal = None
    out_model = model
    if options.personalise and shared is not None:
        offset = (problem.local_translation - skeleton.local_translation).float()
        scale = 1.0 + float(shared[0])
        fitted_names = [hand_model.joint_names[j] for j in range(skeleton.joint_num)
                        if bool(_fittable_bones(skeleton, hand_model, kmap, conf_t, options.min_bone_frames)[j])]
        personal = PersonalisedSkeleton(scale, shared[1:].cpu().numpy(), offset.cpu().numpy(), fitted_names)
        out_model = personalise_model(model, identity, offset, scale)
    theta = state.theta
    clamp_deg = 0.0
    if limits is not None:
        clamped = torch.maximum(torch.minimum(theta, limits[:, 1]), limits[:, 0])
        clamp_deg = float(torch.rad2deg((clamped - theta).abs()).max()) if theta.numel() else 0.0
        theta = clamped
    euler = skeleton.euler_from_dofs(theta).float()
    root = to_homogeneous(state.rotation, state.translation).float()
    with torch.no_grad():
        out_identity = out_model.identity()
        G = forward_kinematics(out_identity.local_pose @ euler_to_transform(euler), root, out_model.kinematic_tree)
    joints = G[..., :3, 3]
    jidx = torch.as_tensor(kmap.joint_index, device=device)
    fitted_mm = (G[:, jidx, :3, 3] + G[:, jidx, :3, 0] * torch.as_tensor(kmap.offset_mm, device=device,
                                                                          dtype=G.dtype)[:, None])
    fitted_mm = fitted_mm.double()
    # Failures: not finite, or most keypoints far from the fitted hand.
    finite = torch.isfinite(fitted_mm).all(-1).all(-1) & torch.isfinite(euler).all(-1).all(-1)
    dist = problem.data.distance_mm(fitted_mm.to(dtype)).flatten(1)
    has = (problem.data.weight > 0).flatten(1)
    inliers = ((dist <= sigma) & has).sum(-1).double() / has.sum(-1).clamp(min=1).double()
    for t in range(T):
        if t in failed:
            continue
        if not bool(finite[t]):
            failed[t] = "the fit did not converge to finite numbers"
        elif float(inliers[t]) < options.min_inlier_fraction:
            n_in, n = int(((dist[t] <= sigma) & has[t]).sum()), int(has[t].sum())
            what = "keypoints" if views is None else "view keypoints"
            failed[t] = (f"only {n_in} of {n} {what} lie within {sigma:g} mm of the fitted hand: the keypoints "
                         "do not fit a hand (wrong convention, units or hand side, or too many bad points?)")
    unplaced = torch.as_tensor([t in failed and not bool(placed[t]) for t in range(T)], device=device)
    keypoints_out = fitted_mm.cpu().numpy() * mirror / scale_units
    if views is None:
        residual = np.linalg.norm(keypoints_out - points, axis=-1)
        residual = np.where(conf > 0, residual, np.nan)
    else:
        residual = problem.data.residual_px(fitted_mm).cpu().numpy()
    nan = float("nan")
    if bool(unplaced.any()):
        u = unplaced.cpu().numpy()
        keypoints_out[u] = nan
        residual[u] = nan
        euler[unplaced] = nan
        root[unplaced] = nan
        joints = joints.clone()
        joints[unplaced] = nan
    result = FitResult(
        euler=euler.cpu(), root=root.cpu(), joints=joints.float().cpu(), keypoints=keypoints_out, residual=residual,
        failed=sorted(failed.items()), interrupted=interrupted, mirrored=mirrored, units=units,
        convention=conv.name, model=out_model, tip_offsets_mm=tips, skeleton=personal, limit_clamp_deg=clamp_deg,
        seconds=time.perf_counter() - start_time, iterations=iterations[0], noise_mm=noise,
        triangulated=(triangulated * mirror if views is not None else None),
        options={"robust": options.robust, "robust_scale_mm": sigma, "limits": options.limits,
                 "personalise": options.personalise, "weights": dict(weights.__dict__)})
    return result


def _fittable_bones(skeleton: FitSkeleton, hand_model, kmap: KeypointMap, conf: torch.Tensor,
                    min_frames: int) -> torch.Tensor:
    """``[J]`` bool, by child joint: the bones whose length the keypoints measure. A joint with a
    keypoint and its nearest ancestor with one, seen together in at least ``min_frames`` frames,
    measure the chain between them; its last bone takes the change (``thumb0 → thumb1``: the
    keypoint-less ``thumb0`` keeps the global scale)."""
    J = skeleton.joint_num
    seen = torch.zeros(conf.shape[0], J, dtype=torch.bool, device=conf.device)
    has = torch.zeros(J, dtype=torch.bool)
    for k, j in enumerate(kmap.joint_index.tolist()):
        seen[:, j] |= conf[:, k] > 0
        has[j] = True
    out = torch.zeros(J, dtype=torch.bool, device=conf.device)
    for j, p in enumerate(skeleton.parents):
        if p < 0 or not has[j]:
            continue
        while p >= 0 and not has[p]:
            p = skeleton.parents[p]
        if p >= 0:
            out[j] = int((seen[:, j] & seen[:, p]).sum()) >= min_frames
    return out


def _views_data(views, cams, uv, conf2d, problem: _Problem, state: _State, dtype, device) -> Views2D:
    """The 2D data term, residuals scaled to mm at the depth of the current fit's points."""
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=dtype, device=device)  # noqa: E731
    camrot, campos, focal, princpt = t(cams["camrot"]), t(cams["campos"]), t(cams["focal"]), t(cams["princpt"])
    with torch.no_grad():
        _, rotation, position = problem.pose(state)
        points = problem.skeleton.points(rotation, position)
    xc = torch.einsum("cij,bckj->bcki", camrot, points[:, None] - campos[None, :, None])
    mm_per_pixel = xc[..., 2].clamp(min=1.0) / focal.mean(-1)[None, :, None]
    return Views2D(t(uv), t(conf2d), camrot, campos, focal, princpt, mm_per_pixel)
