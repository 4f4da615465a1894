"""Each prior of the fitter does what it says, and its default leaves the data alone where the data
decide (the noise-free test in test_fit_accuracy.py fits to 0.5 mm with every default)."""
import math

import numpy as np
import pytest
import torch

from common.fitting import FitOptions, FitWeights, fit_keypoints
from common.fitting.solver import joint_limits_rad
from common.nets.loss import PenetLoss
from tools.fit_synthetic import decoder, keypoints_of, random_poses, random_roots

QUIET = dict(smooth_angles=0.0, smooth_rotation=0.0, smooth_translation=0.0)
NO_RELATIONS = dict(coupling=0.0, neighbours=0.0, synergy=0.0)


def angle(hand, euler, joint, axis=2):
    """Degrees of ``euler [T, J, 3]`` at ``b_r_<joint>``."""
    return torch.rad2deg(euler[:, hand.joint_names.index(f"b_r_{joint}"), axis]).numpy()


def single_pose(hand, **degrees):
    """``[1, J, 3]`` radians: the named joints' flexion (``index2=60``) or ``(x, y, z)``."""
    euler = torch.zeros(1, hand.joint_num, 3)
    for name, value in degrees.items():
        j = hand.joint_names.index(f"b_r_{name}")
        euler[0, j] = torch.tensor(np.radians(value if isinstance(value, tuple) else (0, 0, value)))
    return euler


@pytest.fixture(scope="module")
def model(default_hand):
    return decoder(default_hand)


def points_of(model, euler, convention="dhm"):
    return keypoints_of(model, convention, euler, torch.eye(4).expand(len(euler), 4, 4)).keypoints


def test_joint_limits(model):
    hand = model.hand_model
    # Keypoints of a PIP joint bent backwards by 30° (its limits: 0…100°).
    keypoints = points_of(model, single_pose(hand, index2=-30.0, index1=20.0))
    limited = fit_keypoints(model, keypoints, weights=FitWeights(**QUIET))
    free = fit_keypoints(model, keypoints, weights=FitWeights(**QUIET), options=FitOptions(limits=False))
    assert abs(angle(hand, free.euler, "index2")[0] + 30) < 0.5
    assert 0 <= angle(hand, limited.euler, "index2")[0] < 0.05
    assert np.nanmean(free.residual) < 0.1 < np.nanmean(limited.residual)


def test_limit_cost_grows_beyond_the_limits(model):
    from common.fitting.solver import FitSkeleton, Points3D, _Problem, _State

    hand = model.hand_model
    with torch.no_grad():
        identity = model.identity()
    sk = FitSkeleton(hand.parents, identity.local_pose, hand.dof_mask, [21], [0.0])
    limits = joint_limits_rad(hand, sk.dof_flat).double()
    data = Points3D(torch.zeros(1, 1, 3, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    weights = FitWeights(rest=0.0, **NO_RELATIONS, limits=7.0)
    problem = _Problem(sk, data, weights, FitOptions(), limits, torch.zeros(sk.dof_num, dtype=torch.float64),
                       None, hand.joint_names)
    inside = limits.mean(-1)[None]
    beyond = inside.clone()
    beyond[0, 0] = limits[0, 1] + 0.1
    beyond[0, 1] = limits[1, 0] - 0.2
    eye = torch.eye(3, dtype=torch.float64)[None]
    zero = torch.zeros(1, 3, dtype=torch.float64)
    cost_in, _, _ = problem.evaluate(_State(eye, zero, inside), 10.0)
    cost_out, grad, _ = problem.evaluate(_State(eye, zero, beyond), 10.0)
    assert float(cost_in) == 0
    assert math.isclose(float(cost_out), 7.0 * (0.1 ** 2 + 0.2 ** 2), rel_tol=1e-9)
    assert grad[0, 6] > 0 > grad[0, 7]  # back towards the limits


def test_rest_pose_pull(model):
    """A curled index finger seen only at its knuckle: the rest prior straightens it, more with a
    larger weight; the data (the knuckle) still decide the hand's placement."""
    hand = model.hand_model
    euler = single_pose(hand, index1=40.0, index2=60.0, index3=40.0, middle2=30.0)
    keypoints = points_of(model, euler)
    hidden = [4, 5, 6]  # index_null, index3, index2
    keypoints[:, hidden] = np.nan
    flex = []
    for rest in (0.2, 20.0):
        result = fit_keypoints(model, keypoints, weights=FitWeights(rest=rest, **NO_RELATIONS, **QUIET),
                               options=FitOptions(noise=1.0))
        flex.append(angle(hand, result.euler, "index2")[0])
        assert np.nanmean(result.residual) < 0.3
    assert abs(flex[1]) < abs(flex[0]) + 1e-9 and abs(flex[1]) < 1.0


def test_dip_follows_pip(model):
    """The fingertip missing: the DIP joint's flexion is where the coupling (towards two thirds of
    the PIP's) and the rest pull (towards 0) balance, ``c·⅔·pip / (c + r)``; without the coupling
    it stays straight."""
    hand = model.hand_model
    keypoints = points_of(model, single_pose(hand, index1=20.0, index2=60.0, index3=40.0))
    keypoints[:, 4] = np.nan  # index_null
    weights = FitWeights(**QUIET, neighbours=0.0, synergy=0.0)
    coupled = fit_keypoints(model, keypoints, weights=weights, options=FitOptions(noise=1.0))
    free = fit_keypoints(model, keypoints, weights=FitWeights(**QUIET, **NO_RELATIONS), options=FitOptions(noise=1.0))
    pip, dip = angle(hand, coupled.euler, "index2")[0], angle(hand, coupled.euler, "index3")[0]
    c, r = weights.coupling, weights.rest
    assert abs(pip - 60) < 1 and abs(dip - c * (2 / 3) * pip / (c + r)) < 0.5
    assert abs(angle(hand, free.euler, "index3")[0]) < 1  # only the rest pull: straight


def test_neighbouring_fingers(model):
    """The ring finger seen only at its knuckle: it flexes with the middle and little fingers."""
    hand = model.hand_model
    euler = single_pose(hand, middle1=50.0, middle2=70.0, middle3=50.0, ring1=50.0, ring2=70.0, ring3=50.0,
                        pinky1=50.0, pinky2=70.0, pinky3=50.0)
    keypoints = points_of(model, euler)
    keypoints[:, [12, 13, 14]] = np.nan  # ring_null, ring3, ring2
    near = fit_keypoints(model, keypoints, weights=FitWeights(**QUIET, coupling=0.0, synergy=0.0),
                         options=FitOptions(noise=1.0))
    alone = fit_keypoints(model, keypoints, weights=FitWeights(**QUIET, **NO_RELATIONS), options=FitOptions(noise=1.0))
    for joint, value in (("ring1", 50), ("ring2", 70), ("ring3", 50)):
        assert abs(angle(hand, near.euler, joint)[0] - value) < 8, joint
        assert abs(angle(hand, alone.euler, joint)[0]) < abs(angle(hand, near.euler, joint)[0]) - 20


def test_grip_synergy(model):
    """The thumb seen only at its base, the fingers closed: the thumb closes with them."""
    hand = model.hand_model
    fingers = {f"{f}{n}": v for f in ("index", "middle", "ring", "pinky") for n, v in ((1, 70.0), (2, 80.0), (3, 70.0))}
    keypoints = points_of(model, single_pose(hand, **fingers))
    keypoints[:, [0, 1, 2]] = np.nan  # thumb_null, thumb3, thumb2
    grip = fit_keypoints(model, keypoints, weights=FitWeights(**QUIET, coupling=0.0, neighbours=0.0),
                         options=FitOptions(noise=1.0))
    alone = fit_keypoints(model, keypoints, weights=FitWeights(**QUIET, **NO_RELATIONS), options=FitOptions(noise=1.0))
    # Thumb MCP limits 0…50°, IP −20…80°: the fingers are at about 80 % of their ranges.
    assert angle(hand, grip.euler, "thumb2")[0] > 25 and angle(hand, grip.euler, "thumb3")[0] > 35
    assert abs(angle(hand, alone.euler, "thumb2")[0]) < 2 and abs(angle(hand, alone.euler, "thumb3")[0]) < 2


def test_penetration_keeps_fingers_apart(model):
    """Every finger spread 20° towards the thumb side, the middle finger seen only at its knuckle:
    the rest pull alone straightens it into the index finger; the penetration prior keeps them
    apart. (The other relations between fingers are off, to see this prior alone.)"""
    hand = model.hand_model
    euler = single_pose(hand, index1=(0, 20, 0), middle1=(0, 20, 0), ring1=(0, 20, 0), pinky1=(0, 20, 0))
    keypoints = points_of(model, euler)
    keypoints[:, [8, 9, 10]] = np.nan  # middle_null, middle3, middle2
    loss = PenetLoss.from_hand_model(hand)

    def overlap(result):
        with torch.no_grad():
            posed = result.model.pose(result.euler, result.root)
            rest = result.model.skinned_rest_mesh(posed.rest_mesh, posed.template_pose)
            return float(loss.terms(posed.template_pose, rest, posed.joints, posed.mesh)[0])

    with torch.no_grad():
        truth = overlap(fit_keypoints(model, points_of(model, euler), weights=FitWeights(**QUIET, penetration=0.0),
                                      options=FitOptions(noise=1.0)))
    free = fit_keypoints(model, keypoints, weights=FitWeights(**QUIET, **NO_RELATIONS, penetration=0.0),
                         options=FitOptions(noise=1.0))
    kept = fit_keypoints(model, keypoints, weights=FitWeights(**QUIET, **NO_RELATIONS), options=FitOptions(noise=1.0))
    # The overlap beyond the rest pose's (the palm's bones lie in one block of flesh).
    assert overlap(free) - truth > 0.02
    assert overlap(kept) - truth < 0.2 * (overlap(free) - truth)
    assert angle(hand, kept.euler, "middle1", axis=1)[0] > 5  # spread away from the index


def test_smoothness_over_a_sequence(model):
    """A hand moving smoothly, 2 mm of noise: the smoothness prior brings the fit closer to the
    truth and removes the frame-to-frame jitter."""
    hand = model.hand_model
    rng = np.random.default_rng(50)
    T = 24
    keys = random_poses(hand, 2, rng)
    s = torch.linspace(0, 1, T)[:, None, None]
    euler = keys[0] * (1 - s) + keys[1] * s
    root = random_roots(1, rng).expand(T, 4, 4).clone()
    root[:, :3, 3] += torch.linspace(0, 40, T)[:, None]
    truth = keypoints_of(model, "dhm", euler, root)
    noisy = truth.keypoints + rng.normal(0, 2.0, truth.keypoints.shape)
    errors, jitter = {}, {}
    for label, weights in (("smooth", FitWeights()), ("independent", FitWeights(**QUIET))):
        result = fit_keypoints(model, noisy, weights=weights)
        errors[label] = np.linalg.norm(result.keypoints - truth.keypoints, axis=-1).mean()
        jitter[label] = float((result.euler[2:] - 2 * result.euler[1:-1] + result.euler[:-2]).abs().mean())
    assert errors["smooth"] < 0.9 * errors["independent"], errors
    assert jitter["smooth"] < 0.5 * jitter["independent"], jitter


def test_a_wrong_keypoint_does_not_bend_the_hand(model):
    hand = model.hand_model
    rng = np.random.default_rng(60)
    truth = keypoints_of(model, "dhm", random_poses(hand, 8, rng), random_roots(8, rng))
    keypoints = truth.keypoints.copy()
    keypoints[:, 5] += np.array([0.0, 30.0, 0.0])  # index3 (DIP) 30 mm off in every frame
    errors = {}
    for robust in ("gm", "l2"):
        result = fit_keypoints(model, keypoints, weights=FitWeights(**QUIET), options=FitOptions(robust=robust))
        others = np.delete(np.arange(21), 5)
        errors[robust] = np.linalg.norm(result.keypoints - truth.keypoints, axis=-1)[:, others].mean()
    assert errors["gm"] < 0.5 < errors["l2"], errors


def test_frames_that_cannot_be_fitted_are_reported(model):
    hand = model.hand_model
    rng = np.random.default_rng(70)
    truth = keypoints_of(model, "dhm", random_poses(hand, 4, rng), random_roots(4, rng))
    keypoints = truth.keypoints.copy()
    keypoints[1, 2:] = np.nan  # two points: the hand cannot be placed
    keypoints[2] = rng.normal(0, 80, (21, 3))  # not a hand
    keypoints[3, :16] = np.nan  # a straight line of keypoints: the little finger's, and the wrist
    keypoints[3, 16:] = np.linspace(0, 1, 5)[:, None] * np.array([100.0, 20.0, 5.0])
    result = fit_keypoints(model, keypoints, weights=FitWeights(**QUIET))
    failed = dict(result.failed)
    assert sorted(failed) == [1, 2, 3]
    assert "at least 3" in failed[1] and "do not fit a hand" in failed[2] and "lie on a line" in failed[3]
    assert np.isnan(result.keypoints[[1, 3]]).all() and torch.isnan(result.euler[[1, 3]]).all()
    assert np.isfinite(result.keypoints[[0, 2]]).all()
    assert list(result.frame_ok) == [True, False, False, False]
    assert np.nanmean(result.residual[0]) < 0.5


def test_ambiguous_palm_alignment_tries_several_starts(model):
    """Only two palm points (index and little knuckles) seen, the wrist and the thumb's base
    missing: the closed-form alignment leaves the turn about their line open, and the fitter keeps
    several starts about it. With one start a frame of these lands in a wrong placement."""
    hand = model.hand_model
    rng = np.random.default_rng(5)
    truth = keypoints_of(model, "dhm", random_poses(hand, 16, rng), random_roots(16, rng))
    keypoints = truth.keypoints.copy()
    keypoints[:, [3, 11, 15, 20]] = np.nan  # thumb1, middle1, ring1, wrist
    errors = {}
    for starts in (1, FitOptions().starts):
        result = fit_keypoints(model, keypoints, weights=FitWeights(**QUIET), options=FitOptions(starts=starts))
        errors[starts] = np.linalg.norm(result.keypoints - truth.keypoints, axis=-1).mean(axis=1)
    assert errors[FitOptions().starts].max() < 0.5
    assert errors[1].max() > 2.0
