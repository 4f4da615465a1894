"""The keypoint fitter's speed and accuracy, on keypoints made by decoding poses drawn within the
joint limits (as the tests make them). Run through ``python tools/bench.py fit``.

Speed: a sequence of ``--frames`` frames (default 1,000) of 3D keypoints (a hand moving through
random poses, 2 mm of noise) fitted in one call, and a single frame (the median of
``--repeats`` calls; the first call, which also prepares the hand's tables, printed apart).
Accuracy: per hand and convention, noise-free keypoints (mean residual), noisy ones (2 mm per
axis, 10 % missing, 5 % moved by 30 mm: mean distance of the fitted points to the noise-free
ones, missing points included) over ``--seeds`` draws of ``--accuracy-frames`` frames, four views
of 2D keypoints (1 pixel of noise at 512×334), and the personalised skeleton (50 frames of a
hand 0.9 times as large with bones ±5 mm, 1 and 2 mm of noise).
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from tools.benchmarks.timing import load_hands, machine_description, synchronize


def add_arguments(parser) -> None:
    parser.add_argument("--frames", type=int, default=1000, help="frames of the timed sequence")
    parser.add_argument("--repeats", type=int, default=10, help="single-frame fits timed")
    parser.add_argument("--hands", nargs="+", default=["default", "makehuman"])
    parser.add_argument("--conventions", nargs="+", default=["dhm", "mediapipe", "openpose", "interhand"])
    parser.add_argument("--seeds", type=int, default=5, help="draws of the noisy accuracy test")
    parser.add_argument("--accuracy-frames", dest="accuracy_frames", type=int, default=60)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--no-accuracy", dest="accuracy", action="store_false", help="time only")
    parser.add_argument("--example", metavar="FILE.npy", help="only write an example input: a hand closing and "
                        "opening, MediaPipe's order, metres, 2 mm of noise, 5 %% of the points missing")


def moving_hand(model, frames: int, rng: np.random.Generator):
    """A hand moving through random poses (a new one every 30 frames, interpolated) along a path."""
    from tools.fit_synthetic import keypoints_of, random_poses, random_roots

    keys = random_poses(model.hand_model, frames // 30 + 2, rng)
    s = torch.arange(frames, dtype=torch.float32) / 30
    i = s.long()
    f = (s - i)[:, None, None]
    euler = keys[i] * (1 - f) + keys[i + 1] * f
    root = random_roots(1, rng).expand(frames, 4, 4).clone()
    root[:, :3, 3] += torch.stack([200 * torch.sin(s / 3), 100 * torch.cos(s / 5), 50 * torch.sin(s / 7)], -1)
    return keypoints_of(model, "dhm", euler, root)


def time_speed(model, args, rng) -> None:
    from common.fitting import fit_keypoints

    truth = moving_hand(model, args.frames, rng)
    noisy = truth.keypoints + rng.normal(0, 2.0, truth.keypoints.shape)
    device = torch.device(args.device)
    fit_keypoints(model, noisy[:2])  # warm-up: the hand's tables
    synchronize(device)
    start = time.perf_counter()
    result = fit_keypoints(model, noisy)
    synchronize(device)
    seconds = time.perf_counter() - start
    error = np.linalg.norm(result.keypoints - truth.keypoints, axis=-1).mean()
    print(f"  sequence of {args.frames} frames: {seconds:.2f} s ({seconds / args.frames * 1e3:.1f} ms a frame, "
          f"{result.iterations} iterations; mean error {error:.2f} mm against the noise-free keypoints)")
    from common.fitting import solver

    solver._MEET_CACHE.clear()  # the first call below prepares the hand's tables again
    start = time.perf_counter()
    fit_keypoints(model, noisy[:1])
    first = time.perf_counter() - start
    times = []
    for t in range(args.repeats):
        synchronize(device)
        start = time.perf_counter()
        fit_keypoints(model, noisy[t + 1:t + 2])
        synchronize(device)
        times.append(time.perf_counter() - start)
    print(f"  one frame: median {statistics.median(times) * 1e3:.0f} ms of {args.repeats} "
          f"(first call, tables included: {first * 1e3:.0f} ms)")


def accuracy(model, name: str, args) -> None:
    from common.fitting import FitOptions, FitWeights, MultiViewKeypoints, fit_keypoints
    from data.make_synthetic import dome_cameras
    from tools.fit_synthetic import corrupt, keypoints_of, project, random_poses, random_roots

    hand = model.hand_model
    independent = FitWeights.independent()
    for convention in args.conventions:
        rng = np.random.default_rng(0)
        clean = keypoints_of(model, convention, random_poses(hand, 30, rng), random_roots(30, rng))
        exact = np.nanmean(fit_keypoints(model, clean.keypoints, convention, weights=independent).residual)
        errors, inputs = [], []
        for seed in range(args.seeds):
            rng = np.random.default_rng(1000 + seed)
            truth = keypoints_of(model, convention, random_poses(hand, args.accuracy_frames, rng),
                                 random_roots(args.accuracy_frames, rng))
            noisy, missing, moved = corrupt(truth.keypoints, rng)
            result = fit_keypoints(model, noisy, convention, weights=independent)
            errors.append(np.linalg.norm(result.keypoints - truth.keypoints, axis=-1).mean())
            inputs.append(np.nanmean(np.linalg.norm(noisy - truth.keypoints, axis=-1)[~moved]))
        print(f"  {name:<10} {convention:<10} | noise-free {exact:6.3f} mm | noisy: input {np.mean(inputs):.2f} mm, "
              f"fitted {np.mean(errors):.2f} ± {np.std(errors):.2f} mm (min {np.min(errors):.2f}, "
              f"max {np.max(errors):.2f}, {args.seeds} × {args.accuracy_frames} frames)")
    rng = np.random.default_rng(7)
    T = 20
    truth = keypoints_of(model, "dhm", random_poses(hand, T, rng), random_roots(T, rng, spread_mm=50))
    cameras = dome_cameras(4, (512, 334), rng)
    uv = project(truth.keypoints, cameras) + rng.normal(0, 1.0, (T, 4, 21, 2))
    views = MultiViewKeypoints(uv, np.ones(uv.shape[:3]), list(cameras), cameras)
    result = fit_keypoints(model, None, "dhm", views=views, weights=independent)
    fitted = np.linalg.norm(result.keypoints - truth.keypoints, axis=-1).mean()
    start = np.nanmean(np.linalg.norm(result.triangulated - truth.keypoints, axis=-1))
    print(f"  {name:<10} 4 views, 1 px: fitted {fitted:.2f} mm, triangulated {start:.2f} mm")
    for noise in (1.0, 2.0):
        bones, residual = personalisation(model, noise, independent, FitOptions, fit_keypoints, keypoints_of,
                                          random_poses, random_roots)
        print(f"  {name:<10} personalised, {noise:g} mm noise: bone lengths within {bones.max():.2f} mm "
              f"(mean {bones.mean():.2f}); residual {residual[0]:.2f} mm against {residual[1]:.2f} mm with the "
              f"true bones, {residual[2]:.2f} mm without personalising")


def personalisation(model, noise, weights, FitOptions, fit_keypoints, keypoints_of, random_poses, random_roots):
    from tests.test_fit_accuracy import rest_bone_lengths

    hand = model.hand_model
    rng = np.random.default_rng(40)
    with torch.no_grad():
        local = model.identity().local_pose.double().clone()
    t = local[:, :3, 3]
    change = torch.as_tensor(rng.uniform(-5, 5, (hand.joint_num, 1)))
    change[hand.root_index] = 0
    local[:, :3, 3] = 0.9 * t + change * t / t.norm(dim=-1, keepdim=True).clamp(min=1e-9)
    truth = keypoints_of(model, "dhm", random_poses(hand, 50, rng), random_roots(50, rng), local)
    noisy = truth.keypoints + rng.normal(0, noise, truth.keypoints.shape)
    personal = fit_keypoints(model, noisy, "dhm", weights=weights, options=FitOptions(personalise="skeleton"))
    plain = fit_keypoints(model, noisy, "dhm", weights=weights)
    import copy

    true_model = copy.deepcopy(model)
    with torch.no_grad():
        offset = (local - model.identity().local_pose.double())[:, :3, 3]
        true_model.skeleton_refine_net.fc_skeleton[-1].bias += offset.reshape(-1).float()
    reference = fit_keypoints(true_model, noisy, "dhm", weights=weights)
    with torch.no_grad():
        fitted = personal.model.identity().local_pose.double()
    bones = np.abs(rest_bone_lengths(model, fitted) - rest_bone_lengths(model, local))
    return bones, (np.nanmean(personal.residual), np.nanmean(reference.residual), np.nanmean(plain.residual))


def write_example(path: str, frames: int = 48) -> None:
    """A hand closing into a fist and opening again while it turns, as MediaPipe-ordered keypoints
    in metres (``main/fit.py --convention mediapipe --units m``): the README's picture."""
    from common.hand.default_hand import make_default_hand
    from common.hand.kinematics import to_homogeneous
    from common.fitting.skeleton import axis_angle_to_matrix
    from tools.fit_synthetic import corrupt, decoder, keypoints_of

    hand = make_default_hand()
    model = decoder(hand)
    rng = np.random.default_rng(0)
    fist = np.zeros((hand.joint_num, 3))
    for j, name in enumerate(hand.joint_names):
        if name.endswith(("1", "2", "3")) and "thumb" not in name:
            fist[j, 2] = {"1": 80, "2": 95, "3": 70}[name[-1]]
    for name, value in (("thumb1", (0, 30, 30)), ("thumb2", (0, 0, 40)), ("thumb3", (0, 0, 50))):
        fist[hand.joint_names.index(f"b_r_{name}")] = value
    s = 0.5 - 0.5 * np.cos(np.linspace(0, 2 * np.pi, frames))  # open → fist → open
    euler = torch.tensor(np.radians(fist)[None] * s[:, None, None], dtype=torch.float32)
    turn = torch.as_tensor(np.linspace(0, 1.2, frames))[:, None] * torch.tensor([0.2, 1.0, 0.1], dtype=torch.float64)
    rotation = axis_angle_to_matrix(turn) @ axis_angle_to_matrix(torch.tensor([[1.2, 0.0, 0.3]], dtype=torch.float64))
    root = to_homogeneous(rotation.float(), torch.tensor([30.0, -20.0, 500.0]).expand(frames, 3))
    truth = keypoints_of(model, "mediapipe", euler, root)
    noisy, _, _ = corrupt(truth.keypoints, rng, noise_mm=2.0, missing=0.05, outliers=0.02)
    np.save(path, noisy / 1000.0)
    print(f"wrote {path}: {frames} frames of 21 MediaPipe-ordered keypoints in metres")


def run(args) -> None:
    from tools.fit_synthetic import decoder

    if args.example:
        write_example(args.example)
        return

    print(f"fit: {machine_description()}; device {args.device}")
    for name, hand in load_hands(args.hands):
        model = decoder(hand).to(args.device)
        print(f"{name} hand ({hand.vertex_num} vertices), speed:")
        time_speed(model, args, np.random.default_rng(0))
        if args.accuracy:
            print(f"{name} hand, accuracy (mean distances in mm):")
            accuracy(model, name, args)
