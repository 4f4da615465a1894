"""The fitter's joints-only kinematics against the model's decoder, and its closed-form Jacobians
against autograd."""
import math

import numpy as np
import torch
from torch.autograd.functional import jacobian

from common.fitting.skeleton import FitSkeleton, axis_angle_to_matrix, matrix_to_axis_angle
from tools.fit_synthetic import decoder
from tools.reference import random_euler, random_root


def skeleton_of(model, offsets=True):
    hand = model.hand_model
    with torch.no_grad():
        identity = model.identity()
    joints = np.arange(hand.joint_num)
    tips = np.array([3.0 if n.endswith("null") and offsets else 0.0 for n in hand.joint_names])
    return FitSkeleton(hand.parents, identity.local_pose, hand.dof_mask, joints, tips), identity


def test_forward_equals_the_decoder(any_hand):
    model = decoder(any_hand)
    # Non-zero correctives: the skeleton corrective moves the joints.
    torch.manual_seed(0)
    with torch.no_grad():
        model.skeleton_refine_net.fc_skeleton[-1].bias.normal_(0, 3)
    skeleton, identity = skeleton_of(model, offsets=False)
    euler = random_euler(any_hand, 5, seed=1).double()
    root = random_root(5, seed=2).double()
    rotation, position = skeleton.forward(root[:, :3, :3], root[:, :3, 3], euler)
    with torch.no_grad():
        posed = model.double().pose(euler, root, model.identity())
    assert torch.allclose(position, posed.joints, atol=1e-9)


def test_fixed_points_follow_the_joint_axis(default_hand):
    skeleton, _ = skeleton_of(decoder(default_hand))
    euler = random_euler(default_hand, 3, seed=3).double()
    root = random_root(3, seed=4).double()
    rotation, position = skeleton.forward(root[:, :3, :3], root[:, :3, 3], euler)
    points = skeleton.points(rotation, position)
    tip = default_hand.joint_names.index("b_r_index_null")
    expected = position[:, tip] + 3.0 * rotation[:, tip, :, 0]
    assert torch.allclose(points[:, tip], expected)
    # ... which is along the last bone, beyond the tip.
    bone = position[:, tip] - position[:, default_hand.parents[tip]]
    cos = torch.nn.functional.cosine_similarity(points[:, tip] - position[:, tip], bone, dim=-1)
    assert torch.allclose(cos, torch.ones(3, dtype=cos.dtype), atol=1e-6)


def test_point_jacobian_equals_autograd(any_hand):
    skeleton, _ = skeleton_of(decoder(any_hand))
    euler = random_euler(any_hand, 2, seed=5).double()
    root = random_root(2, seed=6).double()
    rotation, position = skeleton.forward(root[:, :3, :3], root[:, :3, 3], euler)
    points = skeleton.points(rotation, position)
    closed = skeleton.point_jacobian(rotation, position, euler, points)
    for b in range(2):
        theta = skeleton.dofs_from_euler(euler[b:b + 1])[0]

        def f(rot, shift, th):
            R, o = skeleton.forward(axis_angle_to_matrix(rot)[None] @ root[b:b + 1, :3, :3],
                                    root[b:b + 1, :3, 3] + shift[None], skeleton.euler_from_dofs(th[None]))
            return skeleton.points(R, o)[0]

        zeros = torch.zeros(3, dtype=torch.float64)
        auto = torch.cat(jacobian(f, (zeros, zeros, theta)), dim=-1)
        # The rest poses are float32 numbers: a frame orthonormal to ~1e-7, levers of ~100 mm.
        assert torch.allclose(closed[b], auto, atol=1e-4), (closed[b] - auto).abs().max()


def test_skeleton_jacobian_equals_autograd(default_hand):
    skeleton, _ = skeleton_of(decoder(default_hand))
    euler = random_euler(default_hand, 2, seed=7).double()
    root = random_root(2, seed=8).double()
    base = skeleton.local_translation.clone()
    directions = skeleton.bone_directions(base)
    rotation, _ = skeleton.forward(root[:, :3, :3], root[:, :3, 3], euler)
    closed = skeleton.skeleton_jacobian(rotation, base, directions)

    def f(p):
        R, o = skeleton.forward(root[:, :3, :3], root[:, :3, 3], euler, base * (1 + p[0]) + directions * p[1:, None])
        return skeleton.points(R, o)

    auto = jacobian(f, torch.zeros(1 + default_hand.joint_num, dtype=torch.float64))
    assert torch.allclose(closed, auto, atol=1e-9)


def test_rotation_vector_round_trip():
    g = torch.Generator().manual_seed(0)
    axis = torch.randn(200, 3, generator=g, dtype=torch.float64)
    axis /= axis.norm(dim=-1, keepdim=True)
    angle = torch.rand(200, 1, generator=g, dtype=torch.float64) * (math.pi - 1e-4)
    v = torch.cat([axis * angle, torch.zeros(1, 3, dtype=torch.float64), axis[:1] * 1e-9])
    R = axis_angle_to_matrix(v)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand_as(R), atol=1e-12)
    assert torch.allclose(matrix_to_axis_angle(R), v, atol=1e-9)
    # Near a half turn the axis comes from the matrix, not its antisymmetric part.
    half = axis[:5] * (math.pi - 1e-7)
    back = matrix_to_axis_angle(axis_angle_to_matrix(half))
    assert torch.allclose(axis_angle_to_matrix(back), axis_angle_to_matrix(half), atol=1e-6)


def test_rotation_gradient_at_zero_is_finite():
    v = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    R = axis_angle_to_matrix(v)
    (R * torch.randn(2, 3, 3, dtype=torch.float64)).sum().backward()
    assert torch.isfinite(v.grad).all()
