"""The fitter's accuracy on keypoints made by decoding poses drawn within the joint limits, for the
default and the MakeHuman hands: noise-free, noisy with missing and displaced points (every
convention), multi-view 2D, and the personalised skeleton."""

import numpy as np
import pytest
import torch

from common.fitting import FitOptions, FitWeights, MultiViewKeypoints, fit_keypoints
from common.fitting.conventions import get_convention, keypoint_map
from common.fitting.solver import joint_limits_rad, tip_offsets
from data.make_synthetic import dome_cameras
from tools.fit_synthetic import corrupt, decoder, keypoints_of, project, random_poses, random_roots

# Random frames are not a sequence: no smoothness between them.
INDEPENDENT = dict(smooth_angles=0.0, smooth_rotation=0.0, smooth_translation=0.0)
CONVENTIONS = ["dhm", "mediapipe", "openpose", "interhand"]


def determined_dofs(hand):
    """The angles 21 keypoints determine whatever the pose: the flexion of every finger joint and
    the thumb's two distal joints, and the knuckles' spread (a straight finger's twist, and the
    split of the thumb's base between thumb0 and thumb1, they do not)."""
    out = np.zeros((hand.joint_num, 3), bool)
    for j, name in enumerate(hand.joint_names):
        if name.endswith(("2", "3")):
            out[j, 2] = True
        elif name.endswith("1") and "thumb" not in name:
            out[j, 1:] = True
    return out


def check_within_limits(hand, euler):
    limits = joint_limits_rad(hand, torch.nonzero(torch.as_tensor(hand.dof_mask).reshape(-1))[:, 0])
    theta = euler.reshape(len(euler), -1)[:, torch.as_tensor(hand.dof_mask).reshape(-1) > 0].double()
    assert (theta >= limits[:, 0] - 1e-6).all() and (theta <= limits[:, 1] + 1e-6).all()


@pytest.mark.parametrize("convention", ["dhm", "mediapipe"])
def test_noise_free_keypoints_are_fitted_exactly(any_hand, convention):
    model = decoder(any_hand)
    rng = np.random.default_rng(10)
    truth = keypoints_of(model, convention, random_poses(any_hand, 16, rng), random_roots(16, rng))
    result = fit_keypoints(model, truth.keypoints, convention, weights=FitWeights(**INDEPENDENT))
    assert not result.failed
    assert np.nanmean(result.residual) < 0.5
    # The angles where keypoints determine them, and the wrist's placement.
    mask = torch.as_tensor(determined_dofs(any_hand))
    error = (result.euler - truth.euler).abs()[:, mask].rad2deg()
    assert float(error.max()) < 2.0, float(error.max())
    assert float(error.mean()) < 0.3
    R = result.root[:, :3, :3].double() @ truth.root[:, :3, :3].double().transpose(1, 2)
    angle = torch.rad2deg(torch.acos(((R.diagonal(dim1=1, dim2=2).sum(-1) - 1) / 2).clamp(-1, 1)))
    assert float(angle.max()) < 0.5
    assert float((result.root[:, :3, 3] - truth.root[:, :3, 3]).norm(dim=-1).max()) < 0.5


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_noisy_keypoints_with_missing_and_wrong_points(any_hand, convention):
    """2 mm noise per axis, 10 % missing, 5 % moved by 30 mm: the fitted points, missing ones
    included, within 2.8 mm of the noise-free ones on average, every angle within the limits."""
    model = decoder(any_hand)
    rng = np.random.default_rng(20)
    truth = keypoints_of(model, convention, random_poses(any_hand, 60, rng), random_roots(60, rng))
    noisy, missing, moved = corrupt(truth.keypoints, rng)
    result = fit_keypoints(model, noisy, convention, weights=FitWeights(**INDEPENDENT))
    error = np.linalg.norm(result.keypoints - truth.keypoints, axis=-1)
    # The mean error of the input points themselves, for scale: 2 mm per axis is 3.2 mm.
    input_error = np.nanmean(np.linalg.norm(noisy - truth.keypoints, axis=-1)[~moved])
    assert 3.0 < input_error < 3.4
    assert error.mean() < 2.8, (error.mean(), error[missing].mean(), error[moved].mean())
    assert not result.failed
    check_within_limits(any_hand, result.euler)
    assert np.isnan(result.residual[missing]).all() and np.isfinite(result.residual[~missing]).all()


@pytest.mark.parametrize("convention", ["dhm", "mediapipe"])
def test_four_views_of_2d_keypoints(any_hand, convention):
    """4 calibrated views at 512×334, 1 pixel of noise: the fitted points within 3 mm."""
    model = decoder(any_hand)
    rng = np.random.default_rng(30)
    T = 12
    truth = keypoints_of(model, convention, random_poses(any_hand, T, rng), random_roots(T, rng, spread_mm=50))
    cameras = dome_cameras(4, (512, 334), rng)
    names = list(cameras)
    uv = project(truth.keypoints, cameras) + rng.normal(0, 1.0, (T, 4, 21, 2))
    views = MultiViewKeypoints(uv, np.ones(uv.shape[:3]), names, cameras)
    result = fit_keypoints(model, None, convention, views=views, weights=FitWeights(**INDEPENDENT))
    error = np.linalg.norm(result.keypoints - truth.keypoints, axis=-1)
    assert error.mean() < 3.0
    assert not result.failed
    assert np.nanmean(result.residual) < 2.0  # pixels: about the noise
    # The triangulated start is itself close; the fit is closer.
    start = np.linalg.norm(result.triangulated - truth.keypoints, axis=-1)
    assert error.mean() < np.nanmean(start)


def rest_bone_lengths(model, local_pose, convention="dhm"):
    """Lengths (mm) of the 20 bones between the 21 keypoints' joints, in the rest pose."""
    hand = model.hand_model
    seq = keypoints_of(model, convention, torch.zeros(1, hand.joint_num, 3), torch.eye(4)[None], local_pose)
    kmap = keypoint_map(hand, get_convention(convention), tip_offsets(model))
    joints = kmap.joint_index.tolist()
    out = []
    for k, j in enumerate(joints):
        p = hand.parents[j]
        while p >= 0 and p not in joints:
            p = hand.parents[p]
        if p >= 0:
            out.append(np.linalg.norm(seq.keypoints[0, k] - seq.keypoints[0, joints.index(p)]))
    return np.array(out)


@pytest.fixture(scope="module")
def other_hand_keypoints(default_hand):
    """50 frames of a hand whose bones are 0.9 times the model's and then ±5 mm each; 1 mm noise."""
    model = decoder(default_hand)
    rng = np.random.default_rng(40)
    with torch.no_grad():
        local = model.identity().local_pose.double().clone()
    t = local[:, :3, 3]
    length = t.norm(dim=-1, keepdim=True).clamp(min=1e-9)
    change = torch.as_tensor(rng.uniform(-5, 5, (default_hand.joint_num, 1)))
    change[default_hand.root_index] = 0
    local[:, :3, 3] = 0.9 * t + change * t / length
    truth = keypoints_of(model, "dhm", random_poses(default_hand, 50, rng), random_roots(50, rng), local)
    noisy = truth.keypoints + rng.normal(0, 1.0, truth.keypoints.shape)
    return model, local, truth, noisy


def test_personalised_skeleton(other_hand_keypoints):
    model, true_local, truth, noisy = other_hand_keypoints
    weights = FitWeights(**INDEPENDENT)
    plain = fit_keypoints(model, noisy, "dhm", weights=weights)
    personal = fit_keypoints(model, noisy, "dhm", weights=weights, options=FitOptions(personalise="skeleton"))
    # The reference: the same noisy keypoints fitted by a model that has the true skeleton.
    true_model = decoder(model.hand_model)
    with torch.no_grad():
        offset = (true_local - model.identity().local_pose.double())[:, :3, 3]
        true_model.skeleton_refine_net.fc_skeleton[-1].bias += offset.reshape(-1).float()
    reference = fit_keypoints(true_model, noisy, "dhm", weights=weights)
    noise_level = np.nanmean(reference.residual)
    assert np.nanmean(plain.residual) > 2 * noise_level  # the wrong bones cost a lot
    assert np.nanmean(personal.residual) < 1.1 * noise_level
    with torch.no_grad():
        fitted_local = personal.model.identity().local_pose.double()
    error = np.abs(rest_bone_lengths(model, fitted_local) - rest_bone_lengths(model, true_local))
    assert error.max() < 1.0, error
    assert abs(personal.skeleton.scale - 0.9) < 0.02
    assert len(personal.skeleton.fitted_bones) == 20


def test_few_frames_fit_only_a_global_scale(other_hand_keypoints):
    model, true_local, truth, noisy = other_hand_keypoints
    result = fit_keypoints(model, noisy[:3], "dhm", weights=FitWeights(**INDEPENDENT),
                           options=FitOptions(personalise="skeleton"))
    assert result.skeleton.fitted_bones == []
    assert np.allclose(result.skeleton.bone_mm, 0)
    assert abs(result.skeleton.scale - 0.9) < 0.05
