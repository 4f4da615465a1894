"""The optimisation over a person's identity and the per-frame poses (docs/personalise.md, "Method").

Variables:

* per frame, the joint angles on the degrees of freedom and the wrist's placement
  (:class:`common.personalise.poses.FramePoses`), started from the keypoint fit;
* the identity: the skeleton corrective ``[J, 3]`` and the identity corrective ``[V, 3]`` (mm),
  each as the output bias of its network's last layer (below); with ``pose_corrective`` also the
  last layer's weights of the pose corrective.

Why the biases. The identity code is a fixed random vector, so each identity network's output is
``W₂ h + b₂`` with ``h = relu(W₁ c + b₁)`` fixed: a change of any of its weights moves the output by
a vector that a change of ``b₂`` alone gives as well, and ``b₂`` is exactly an additive offset of
the corrective, one variable per coordinate. Optimising the offset itself is the best conditioned
choice (every variable is a millimetre of one joint or vertex, with no product of two unknowns,
as ``W₂ h`` would have with ``W₁``), and it needs no folding afterwards: the snapshot holds the
original's keys and layout, with only those biases changed. The pose corrective is a function of
the angles, so for it the last layer's weight is what changes (its bias stays shared with the
identity's and is left as it is).

Objective (per iteration, every frame at once): the data term (depth maps or scans, per frame
averaged), the training's joint loss on the keypoints where there are some, its penetration and
Laplacian losses, and the joint limits as the keypoint fitter has them. Adam, with a learning rate
per kind of variable that decays along a cosine; a first stage moves the poses alone (the identity
held) so that the identity does not absorb the pose errors the keypoints leave.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from common.hand.joint_limits import joint_limits_deg
from common.personalise.objectives import DepthObjective, DepthTargets, Regularisers, ScanObjective
from common.personalise.poses import FramePoses
from common.personalise.surface import ScanSurface


@dataclass
class PersonaliseOptions:
    """How to personalise (the defaults are those measured in docs/personalise.md)."""

    iterations: int = 200          # in all, the pose-only stage included
    pose_iterations: int = 40      # the first stage: poses alone
    skeleton: bool = True          # adapt the skeleton corrective
    identity: bool = True          # adapt the identity corrective
    pose_corrective: bool = False  # also adapt the pose corrective (its last layer's weights)
    lr_angles: float = 5e-3        # rad per step (Adam's step size)
    lr_rotation: float = 2e-3      # rad
    lr_shift: float = 0.2          # mm
    lr_skeleton: float = 0.05      # mm
    lr_identity: float = 0.3       # mm
    lr_pose_corrective: float = 1e-3
    final_lr_fraction: float = 0.05  # the cosine decay's end, as a fraction of each rate
    data_weight: float = 1.0       # the depth-map (or scan) term
    joint_weight: float = 1.0      # the training's joint loss (keypoints)
    penet_weight: float = 1.0      # the training's penetration loss (its own two weights inside)
    lap_weight: float = 1.0        # the training's Laplacian loss (× loss_lap_weight inside)
    limit_weight: float = 100.0    # per rad² beyond the joint limits (common/hand/joint_limits.py)
    limits: bool = True
    laplacian: str = "change"      # 'change': of the rest surface's change; 'training': of the posed mesh
    views_per_step: Optional[int] = 3  # depth: render this many of each frame's views per iteration (None: all)
    radii_every: int = 10          # iterations between measurements of the penetration loss's radii
    search_every: int = 5          # scans: iterations between searches of the nearest triangles
    seed: int = 0                  # the order of the views


@dataclass
class PersonaliseResult:
    """What :func:`personalise` found.

    Attributes:
        model: the personalised copy of the model (the input model is not changed).
        euler: ``[T, J, 3]`` radians; root: ``[T, 4, 4]`` (mm); joints: ``[T, J, 3]`` mm (world).
        residual_before, residual_after: ``[T]`` per frame, the data residual (mm) at the start
            (the keypoint fit, the starting model) and at the end: the depth error (mean
            ``|rendered − captured|``) or :func:`scan_residual`.
        details_before, details_after: the rest of what :func:`measure` gave then (the joints
            at the end are ``joints``).
        history: per iteration ``{'total', 'data', 'joint', 'penet', 'lap', 'limits'}``.
        seconds: time of the optimisation.
        interrupted: stopped by Ctrl-C.
    """

    model: object
    euler: torch.Tensor
    root: torch.Tensor
    joints: torch.Tensor
    residual_before: np.ndarray
    residual_after: np.ndarray
    details_before: Dict[str, np.ndarray]
    details_after: Dict[str, np.ndarray]
    history: List[Dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False


LAPLACIAN_MODES = ("change", "training")


def identity_parameters(model, options: PersonaliseOptions) -> Dict[str, torch.nn.Parameter]:
    """The model's parameters that personalisation adapts (module notes), by name: the skeleton and
    identity correctives' output biases, the pose corrective's last weights."""
    out = {}
    if options.skeleton:
        out["skeleton"] = model.skeleton_refine_net.fc_skeleton[-1].bias
    if options.identity:
        out["identity"] = model.skin_refine_net.fc_id[-1].bias
    if options.pose_corrective:
        out["pose_corrective"] = model.skin_refine_net.fc_pose[-1].weight
    return out


def limit_penalty(euler: torch.Tensor, limits: torch.Tensor) -> torch.Tensor:
    """``[T]`` ``Σ (θ − clamp(θ, lo, hi))²`` (rad²) of ``euler [T, J, 3]`` and ``limits [J, 3, 2]`` (rad)."""
    excess = euler - torch.maximum(torch.minimum(euler, limits[..., 1]), limits[..., 0])
    return excess.square().sum(dim=(1, 2))


def _cosine(step: int, total: int, final: float) -> float:
    progress = min(1.0, step / max(1, total - 1))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def scan_residual(to_mesh: np.ndarray, to_scan: np.ndarray, scans: List[ScanSurface]) -> np.ndarray:
    """``[T]`` the residual the report gives for scans (mm): the mean of the two directions' mean
    distances for a mesh; for a point cloud the points' distance to the mesh alone, as the
    vertices' distance to the nearest point of a cloud is as large as the cloud is sparse."""
    return np.array([tm if s.faces is None else 0.5 * (tm + ts) for tm, ts, s in zip(to_mesh, to_scan, scans)])


@torch.no_grad()
def measure(model, euler: torch.Tensor, root: torch.Tensor, *, depth: Optional[DepthTargets] = None,
            depth_objective: Optional[DepthObjective] = None,
            scans: Optional[List[ScanSurface]] = None) -> Dict[str, np.ndarray]:
    """The data residual of a model at given poses, per frame (what the report calls before and after).

    Returns:
        ``residual [T]`` (mm): depth maps, the mean ``|rendered − captured|`` over the pixels of the
        frame's views where both exist; scans, :func:`scan_residual`. Depth maps also ``pixels [T]``
        and ``rendered [P, H, W]``; scans ``scan_to_mesh [T]``, ``mesh_to_scan [T]`` (mm) and
        ``vertex_distance [T, V]`` (each vertex's distance to the scan). Both ``mesh [T, V, 3]``
        (float64) and ``joints [T, J, 3]`` (the model's dtype), world mm.
    """
    device = model.template_vertices.device
    dtype = model.template_vertices.dtype
    hand = model.pose(euler.to(device, dtype), root.to(device, dtype))
    T = euler.shape[0]
    out = {"mesh": hand.mesh.cpu().double().numpy(), "joints": hand.joints.cpu().numpy()}
    if depth is not None:
        rendered = depth_objective.to(device).render(hand.mesh, depth)
        r = DepthObjective.residuals(rendered, depth, T)
        out.update(residual=r["mean"].cpu().double().numpy(), pixels=r["pixels"].cpu().numpy(),
                   rendered=rendered.cpu().numpy())
        return out
    objective = ScanObjective(model.faces).to(device)
    data = objective(hand.mesh, [s.to(device, dtype) for s in scans])
    to_mesh, to_scan = data["to_mesh"].cpu().double().numpy(), data["to_scan"].cpu().double().numpy()
    out.update(residual=scan_residual(to_mesh, to_scan, scans), scan_to_mesh=to_mesh, mesh_to_scan=to_scan,
               vertex_distance=data["vertex_distance"].cpu().double().numpy())
    return out


def _subset(depth: DepthTargets, views: torch.Tensor) -> DepthTargets:
    return DepthTargets(depth.view_frame[views], depth.camrot[views], depth.campos[views], depth.focal[views],
                        depth.princpt[views], depth.affine[views], depth.depth[views])


def view_subsets(view_frame: np.ndarray, per_frame: Optional[int], seed: int = 0):
    """An endless sequence of view index arrays: each frame's views in a shuffled order, ``per_frame``
    of them at a time (every view once per round); all views every time when ``per_frame`` is None."""
    frames = [np.flatnonzero(view_frame == t) for t in np.unique(view_frame)]
    if per_frame is None or all(len(f) <= per_frame for f in frames):
        everything = np.arange(len(view_frame))
        while True:
            yield everything
    rng = np.random.default_rng(seed)
    queues = [[] for _ in frames]
    while True:
        picked = []
        for t, views in enumerate(frames):
            take = []
            while len(take) < min(per_frame, len(views)):
                if not queues[t]:
                    queues[t] = [v for v in rng.permutation(views) if v not in take]
                take.append(queues[t].pop())
            picked.extend(take)
        yield np.sort(np.array(picked))


def personalise(model, euler: torch.Tensor, root: torch.Tensor, *, depth: Optional[DepthTargets] = None,
                depth_objective: Optional[DepthObjective] = None, scans: Optional[List[ScanSurface]] = None,
                joint_world: Optional[torch.Tensor] = None, joint_valid: Optional[torch.Tensor] = None,
                regularisers: Regularisers, options: Optional[PersonaliseOptions] = None,
                progress: Optional[Callable[[int, Dict[str, float]], None]] = None) -> PersonaliseResult:
    """Adapt a model's identity and the frames' poses to depth maps or to scans (module notes).

    Args:
        model: a :class:`main.model.Model` (a decoder will do) on the device to work on; copied.
        euler, root: ``[T, J, 3]`` (radians) and ``[T, 4, 4]`` (mm) starting poses (the keypoint fit).
        depth, depth_objective: the frames' depth maps and the objective comparing them (depth mode).
        scans: one :class:`ScanSurface` per frame (scan mode; give either ``depth`` or ``scans``).
        joint_world, joint_valid: ``[T, J, 3]`` keypoints (mm) and ``[T, J]`` validity, or None.
        regularisers: the training's joint, penetration and Laplacian losses.
        options: :class:`PersonaliseOptions`.
        progress: called after every iteration with ``(iteration, losses)``.
    Returns:
        :class:`PersonaliseResult`.
    """
    if (depth is None) == (scans is None):
        raise ValueError("personalise: give either depth targets or scans")
    if depth is not None and depth_objective is None:
        raise ValueError("personalise: depth targets need their depth_objective")
    options = options or PersonaliseOptions()
    if options.laplacian not in LAPLACIAN_MODES:
        raise ValueError(f"laplacian {options.laplacian!r}: expected one of {', '.join(LAPLACIAN_MODES)}")
    start_time = time.perf_counter()
    model = copy.deepcopy(model)
    model.requires_grad_(False)
    adapted = identity_parameters(model, options)
    for p in adapted.values():
        p.requires_grad_(True)
    device = model.template_vertices.device
    dtype = model.template_vertices.dtype
    poses = FramePoses(euler.to(device, dtype), root.to(device, dtype), model.hand_model.dof_mask).to(device)
    limits = torch.as_tensor(np.radians(joint_limits_deg(model.hand_model, lifted=not options.limits)),
                             dtype=dtype, device=device)
    scan_objective = ScanObjective(model.faces).to(device) if scans is not None else None
    if scans is not None:
        scans = [s.to(device, dtype) for s in scans]
    if depth_objective is not None:
        depth_objective = depth_objective.to(device)
    regularisers = regularisers.to(device)
    T = poses.frame_num
    if joint_world is not None:
        joint_world, joint_valid = joint_world.to(device, dtype), joint_valid.to(device, dtype)
    if depth is not None:
        subsets = view_subsets(depth.view_frame.cpu().numpy(), options.views_per_step, options.seed)
    radii = None  # the penetration loss's radii, measured every radii_every iterations

    with torch.no_grad():
        start_euler, start_root = poses.euler(), poses.root()
        before = measure(model, start_euler, start_root, depth=depth, depth_objective=depth_objective, scans=scans)
        before.pop("joints")
        start_rest = model.pose(start_euler, start_root).rest_mesh

    def evaluate(views: Optional[np.ndarray], refresh_radii: bool, search: bool):
        """The objective at the present variables: ``(total, {term: value})``."""
        nonlocal radii
        hand = model.pose(poses.euler(), poses.root())
        if refresh_radii or radii is None:
            reference = model.skinned_rest_mesh(hand.rest_mesh, hand.template_pose)
            radii = regularisers.radii(hand, reference)
        if depth is not None:
            targets = depth if views is None else _subset(depth, torch.as_tensor(views, device=device))
            data = depth_objective(hand.mesh, targets)
            counts = torch.bincount(targets.view_frame, minlength=T).to(dtype)
            frame_loss = hand.mesh.new_zeros(T).index_add(0, targets.view_frame, data["loss"]) / counts.clamp(min=1)
        else:
            frame_loss = scan_objective(hand.mesh, scans, search=search)["loss"]
        change = hand.rest_mesh - start_rest if options.laplacian == "change" else None
        reg = regularisers(hand, joint_world=joint_world, joint_valid=joint_valid, radii=radii,
                           penetration=options.penet_weight > 0, laplacian_of=change)
        terms = {"data": frame_loss.mean() * options.data_weight,
                 "lap": reg["lap"].mean() * options.lap_weight,
                 "limits": limit_penalty(poses.euler(), limits).mean() * options.limit_weight}
        if "penet" in reg:
            terms["penet"] = reg["penet"].mean() * options.penet_weight
        if "joint" in reg:
            terms["joint"] = reg["joint"].mean() * options.joint_weight
        return sum(terms.values()), terms

    groups = [{"params": [poses.angles], "lr": options.lr_angles, "name": "angles"},
              {"params": [poses.rotation], "lr": options.lr_rotation, "name": "rotation"},
              {"params": [poses.shift], "lr": options.lr_shift, "name": "shift"}]
    rates = {"skeleton": options.lr_skeleton, "identity": options.lr_identity,
             "pose_corrective": options.lr_pose_corrective}
    identity_groups = [{"params": [p], "lr": 0.0, "name": name} for name, p in adapted.items()]
    optimiser = torch.optim.Adam(groups + identity_groups)
    base = {g["name"]: g["lr"] for g in groups}
    base.update({name: rates[name] for name in adapted})
    history: List[Dict[str, float]] = []
    interrupted = False
    iterations = max(0, int(options.iterations))
    pose_iterations = min(iterations, max(0, int(options.pose_iterations)))
    try:
        for step in range(iterations):
            for g in optimiser.param_groups:
                if g["name"] in adapted:
                    # The identity starts after the pose-only stage and has its own cosine.
                    g["lr"] = 0.0 if step < pose_iterations else base[g["name"]] * _cosine(
                        step - pose_iterations, iterations - pose_iterations, options.final_lr_fraction)
                else:
                    g["lr"] = base[g["name"]] * _cosine(step, iterations, options.final_lr_fraction)
            optimiser.zero_grad(set_to_none=True)
            views = next(subsets) if depth is not None else None
            total, terms = evaluate(views, refresh_radii=step % options.radii_every == 0,
                                    search=step % options.search_every == 0)
            if not torch.isfinite(total):
                raise FloatingPointError(f"personalise: the objective became {float(total)} at iteration {step} "
                                         f"({ {k: float(v) for k, v in terms.items()} })")
            total.backward()
            optimiser.step()
            record = {"total": float(total.detach()), **{k: float(v.detach()) for k, v in terms.items()}}
            history.append(record)
            if progress is not None:
                progress(step, record)
    except KeyboardInterrupt:
        interrupted = True
    for p in adapted.values():
        p.requires_grad_(False)
    euler, root = poses.euler().detach(), poses.root().detach()
    after = measure(model, euler, root, depth=depth, depth_objective=depth_objective, scans=scans)
    return PersonaliseResult(
        model=model, euler=euler, root=root, joints=torch.from_numpy(after.pop("joints")),
        residual_before=before.pop("residual"), residual_after=after.pop("residual"),
        details_before=before, details_after=after, history=history,
        seconds=time.perf_counter() - start_time, interrupted=interrupted)
