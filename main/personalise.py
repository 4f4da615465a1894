"""Personalise the hand model to one person: from a few frames of a data set in the released layout
(depth maps and 3D keypoints), or from scans of the hand (docs/personalise.md).

    python main/personalise.py --data_dir data/me --frames 0-5 --out output/me
    python main/personalise.py --data_dir data/me --sequences 0000_RT_synthetic --ckpt subject4.pth.tar
    python main/personalise.py --scan open.obj fist.obj --scan_keypoints open.npy fist.npy --out output/scan
    python main/personalise.py --scan hand.ply --units m --point_cloud --out output/scan

Each frame's pose is fitted to its keypoints (main/fit.py's fitter, with the person's bone lengths),
then the poses and the person's identity (the skeleton corrective and the identity corrective; with
``--pose_corrective`` also the pose corrective) are refined together against the depth maps, rendered
as in training and compared by the training's depth loss, or against the scans by the
point-to-surface distance both ways; the training's joint, penetration and Laplacian losses regularise.

Writes into ``--out`` (default ``output/personalise``):

* ``model_dump/subject_<S>/snapshot_0.pth.tar``: the personalised model in the original's snapshot
  layout (``demo.py --ckpt``, the editor, ``demo/export.py``; ``test.py --test_epoch 0 --set
  output_dir=<out> --set pose_source=gt`` on a synthetic set);
* ``fit.npz`` (per frame ``euler``, ``root``, ``joints``, ``residual``, ``residual_before``, as
  main/fit.py's), ``poses/frame_NNNNN.yaml`` (``demo.py --pose``), ``rest.obj`` (the personalised hand
  at the zero pose, the wrist's frame);
* ``report.json``: the residual per frame before (the starting model at the keypoint fit) and after,
  the change of the rest surface and of the skeleton, the time taken;
* ``personalise.png``: one frame before and after, coloured by the residual.

Bad input (no frames, a frame without keypoints, a scan without faces or with non-finite points, an
unknown option) ends with one line naming it and exit code 2; Ctrl-C stops the optimisation and
writes what it reached, marked as interrupted (exit code 130).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common import metrics  # noqa: E402
from common.errors import OptionError  # noqa: E402
from common.fitting import FitOptions, FitWeights, fit_keypoints, get_convention  # noqa: E402
from common.fitting.keypoints_io import read_keypoints3d  # noqa: E402
from common.fitting.solver import UNITS  # noqa: E402
from common.hand.hand_model import save_obj  # noqa: E402
from common.hand.pose_io import pose_yaml  # noqa: E402
from common.io.atomic import atomic_write_npz, atomic_write_text  # noqa: E402
from common.io.checkpoint import decoder_snapshot, save_checkpoint  # noqa: E402
from common.io.textio import assign_fields, pixel_size_type, shown  # noqa: E402
from common.personalise import picture  # noqa: E402
from common.personalise.errors import PersonaliseInputError  # noqa: E402
from common.personalise.objectives import DepthObjective, DepthTargets, Regularisers  # noqa: E402
from common.personalise.optimise import LAPLACIAN_MODES, PersonaliseOptions, measure, personalise  # noqa: E402
from common.personalise.scans import align_rest_pose, read_scan, scan_surfaces  # noqa: E402
from common.utils.vis import save_image  # noqa: E402
from data.dataset import ORIGINAL_IMG_SHAPE  # noqa: E402
from data.depth_frames import parse_frame_list, read_depth_frames  # noqa: E402
from main.config import cfg  # noqa: E402
from main.model_options import add_model_args, check_model_args, checkpoint_path, load_model, script_main  # noqa: E402

INTERRUPTED_EXIT_CODE = 130
DEFAULT_RENDER_SIZE = (64, 64)
SCAN_SUBJECT = 4  # the subject number of a snapshot made from scans (the original's default)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_dir", help="a data set in the released layout (annotations/KRT_512, keypoints, "
                        "depth maps; images not needed)")
    source.add_argument("--scan", nargs="+", metavar="FILE", help="scans of the hand (.obj or .ply meshes), one "
                        "per pose")
    add_model_args(parser)
    parser.add_argument("--out", default=str(ROOT / "output" / "personalise"), help="output folder "
                        "(default output/personalise)")
    data = parser.add_argument_group("data sets (--data_dir)")
    data.add_argument("--frames", help="frame numbers and ranges, e.g. 0-5 or 0,7,12 (default: every frame)")
    data.add_argument("--sequences", help="only the frames of these sequences (comma-separated names; needs "
                      "the images/ folders, which name the sequences)")
    data.add_argument("--max_frames", type=int, default=12, help="at most this many frames, evenly spaced "
                      "among those chosen (default 12)")
    data.add_argument("--max_views", type=int, help="at most this many cameras per frame (default: all)")
    data.add_argument("--data_subject", type=int, help="the data's subject_<N> (default: the only one)")
    data.add_argument("--render_size", type=pixel_size_type(8, 1024), default=DEFAULT_RENDER_SIZE,
                      help="HxW of the depth crops compared (default 64x64)")
    scans = parser.add_argument_group("scans (--scan)")
    scans.add_argument("--units", default="mm", choices=list(UNITS), help="units of the scans and their "
                       "keypoints (default mm)")
    scans.add_argument("--scan_keypoints", nargs="+", metavar="FILE", help="3D keypoints to start the poses: one "
                       "file per scan, or one file with a frame per scan (.npy, .npz, .json as main/fit.py)")
    scans.add_argument("--convention", default="dhm", help="the keypoints' order: dhm, interhand, mediapipe, "
                       "openpose (default dhm)")
    scans.add_argument("--point_cloud", action="store_true", help="the scans are point clouds (no faces needed)")
    how = parser.add_argument_group("optimisation")
    how.add_argument("--pose_corrective", action="store_true", help="also adapt the pose corrective (its last "
                     "layer's weights; many frames needed: see docs/personalise.md)")
    how.add_argument("--iterations", type=int, default=PersonaliseOptions.iterations,
                     help=f"optimisation steps (default {PersonaliseOptions.iterations})")
    names = [f.name for f in fields(PersonaliseOptions)]
    how.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                     help=f"an optimisation option, repeatable; names: {', '.join(names)}")
    how.add_argument("--picture_frame", type=int, default=0, help="the frame drawn in personalise.png (its index "
                     "among the frames used; default 0)")
    how.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    how.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    if args.iterations < 0:
        parser.error("--iterations must be 0 or more")
    if args.max_frames < 1:
        parser.error("--max_frames must be at least 1")
    if args.max_views is not None and args.max_views < 1:
        parser.error("--max_views must be at least 1")
    if args.threads < 0:
        parser.error("--threads must be 0 (torch's default) or more")
    if args.scan is None:
        for name in ("scan_keypoints", "point_cloud"):
            if getattr(args, name):
                parser.error(f"--{name} goes with --scan")
    elif args.frames or args.sequences or args.data_subject is not None or args.max_views is not None:
        parser.error("--frames, --sequences, --data_subject and --max_views go with --data_dir")
    return args


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def _option_value(name: str, text: str):
    """``text`` as the type of :class:`PersonaliseOptions`' field ``name`` (its default's type)."""
    default = getattr(PersonaliseOptions, name)
    word = text.lower()
    if isinstance(default, bool):
        if word in _TRUE + _FALSE:
            return word in _TRUE
    elif isinstance(default, int):
        if name == "views_per_step" and word == "none":  # the one optional field: none is all views
            return None
        try:
            return int(text)
        except ValueError:
            pass
    elif isinstance(default, float):
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number >= 0:
            return number
    else:
        return text
    raise ValueError(f"'{shown(text)}' is not a valid value for {name} (default {default!r})")


def personalise_options(args) -> PersonaliseOptions:
    """The optimisation's options: the defaults, ``--iterations``, ``--pose_corrective`` and ``--option``."""
    options = PersonaliseOptions(iterations=args.iterations, pose_corrective=args.pose_corrective)
    assign_fields(options, args.option, "--option", "option", _option_value, OptionError)
    if options.laplacian not in LAPLACIAN_MODES:
        raise OptionError(f"--option laplacian={options.laplacian}: expected {' or '.join(LAPLACIAN_MODES)}")
    if options.iterations < 0 or options.pose_iterations < 0 or options.radii_every < 1 or options.search_every < 1:
        raise OptionError("--option: iterations and pose_iterations must be 0 or more, radii_every and "
                          "search_every at least 1")
    if options.views_per_step is not None and options.views_per_step < 1:
        raise OptionError("--option views_per_step: expected at least 1, or none")
    return options


def scan_keypoints(args, count: int):
    """``(keypoints [T, 21, 3], confidence [T, 21])`` in the input's units, one frame per scan, or None."""
    if not args.scan_keypoints:
        return None
    frames = [read_keypoints3d(path) for path in args.scan_keypoints]
    if len(frames) == 1 and frames[0][0].shape[0] == count:
        return frames[0]
    if len(frames) != count or any(f[0].shape[0] != 1 for f in frames):
        raise PersonaliseInputError(f"--scan_keypoints: {len(frames)} file(s) with "
                                    f"{[f[0].shape[0] for f in frames]} frame(s) for {count} scan(s); expected "
                                    f"one file per scan with one frame each, or one file with {count} frames")
    return np.concatenate([f[0] for f in frames]), np.concatenate([f[1] for f in frames])


def joint_targets(hand_model, keypoints_mm: np.ndarray, confidence: np.ndarray, convention: str):
    """Keypoints in the model's joint order for the joint loss: ``(joint_world [T, J, 3] mm,
    joint_valid [T, J])``; fingertips on the skin (MediaPipe's, OpenPose's) are not joints and left out."""
    T = keypoints_mm.shape[0]
    joint_world = np.zeros((T, hand_model.joint_num, 3), np.float32)
    joint_valid = np.zeros((T, hand_model.joint_num), np.float32)
    for k, point in enumerate(get_convention(convention).keypoints):
        if point.surface_tip:
            continue
        j = hand_model.joint_index(point.joint)
        ok = np.isfinite(keypoints_mm[:, k]).all(axis=1) & (confidence[:, k] > 0)
        joint_world[ok, j] = keypoints_mm[ok, k]
        joint_valid[ok, j] = 1.0
    return joint_world, joint_valid


def fit_start(model, keypoints, confidence, convention: str, units: str, frame_names):
    """The keypoint fits: ``(plain, personalised)``, the starting model's and that with the person's
    skeleton fitted to the keypoints (main/fit.py's ``--personalise skeleton``)."""
    plain = fit_keypoints(model, keypoints, convention, confidence=confidence, units=units,
                          weights=FitWeights.independent())
    unplaced = [frame_names[t] for t in range(len(plain.euler)) if not torch.isfinite(plain.euler[t]).all()]
    if unplaced:
        raise PersonaliseInputError(f"the keypoints of {', '.join(unplaced)} cannot place the hand (fewer than 3, "
                                    f"or all on a line)")
    personal = fit_keypoints(model, keypoints, convention, confidence=confidence, units=units,
                             weights=FitWeights.independent(), options=FitOptions(personalise="skeleton"))
    return plain, personal


@torch.no_grad()
def rest_change(start_model, model) -> dict:
    """How the personalised hand differs from the starting one at the zero pose (the wrist's frame): the
    surface distance both ways, the vertices' displacement, and each joint's and bone's change (mm)."""
    zero = torch.zeros(1, start_model.joint_num, 3, dtype=start_model.template_vertices.dtype,
                       device=start_model.template_vertices.device)
    a, b = start_model.decode(zero), model.decode(zero)
    before, after = a["mesh_out_refined"][0].cpu().double(), b["mesh_out_refined"][0].cpu().double()
    faces = torch.as_tensor(start_model.hand_model.faces, dtype=torch.long)
    there, back = metrics.surface_distances(after, before, faces)
    shift = (after - before).norm(dim=1).numpy()
    joints_a, joints_b = a["joint_out"][0].cpu().double().numpy(), b["joint_out"][0].cpu().double().numpy()
    hand = start_model.hand_model
    bones = {}
    for j, parent in enumerate(hand.parents):
        if parent >= 0:
            length = lambda js: float(np.linalg.norm(js[j] - js[parent]))  # noqa: E731
            bones[hand.joint_names[j]] = length(joints_b) - length(joints_a)
    return {"surface_distance_mm": {"mean": float(0.5 * (there.mean() + back.mean())),
                                    "p90": float(np.percentile(np.concatenate([there.numpy(), back.numpy()]), 90))},
            "vertex_displacement_mm": {"mean": float(shift.mean()), "rms": float(np.sqrt((shift ** 2).mean())),
                                       "max": float(shift.max())},
            "joint_displacement_mm": {hand.joint_names[j]: float(np.linalg.norm(joints_b[j] - joints_a[j]))
                                      for j in range(hand.joint_num)},
            "bone_length_change_mm": bones}


def _stats(values) -> dict:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return {"mean": None, "median": None, "max": None}
    return {"mean": float(values.mean()), "median": float(np.median(values)), "max": float(values.max())}


def run(args, outcome: dict) -> Path:
    start_time = time.perf_counter()
    options = personalise_options(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    get_convention(args.convention)
    hand_model, model, device, ckpt_text = load_model(args)
    print(f"hand model: {hand_model.source} ({hand_model.vertex_num} vertices, {hand_model.joint_num} joints)")
    print(ckpt_text)
    depth_targets = depth_objective = scans = camera_names = None
    if args.data_dir:
        frames = read_depth_frames(
            args.data_dir, hand_model.joint_names, args.render_size, subject=args.data_subject,
            frames=parse_frame_list(args.frames) if args.frames else None,
            sequences=[s.strip() for s in args.sequences.split(",") if s.strip()] if args.sequences else None,
            max_frames=args.max_frames, depth_min=cfg.depth_min,
            original_img_shape=tuple(cfg.original_img_shape) or ORIGINAL_IMG_SHAPE, max_views=args.max_views)
        names, subject, camera_names = frames.names, frames.subject, frames.cameras
        print(f"{args.data_dir}: subject {subject}, {frames.frame_num} frame(s) ({', '.join(names)}), "
              f"{frames.view_num} depth map(s) cropped to {args.render_size[0]}x{args.render_size[1]}")
        keypoints, confidence = frames.keypoints_pts, np.isfinite(frames.keypoints_pts).all(-1).astype(np.float64)
        convention, units = "dhm", "mm"
        joint_world, joint_valid = frames.joint_world, frames.joint_valid
        t = frames.tensors(device)
        depth_targets = DepthTargets(t["view_frame"], t["camrot"], t["campos"], t["focal"], t["princpt"],
                                     t["affine"], t["depth"])
        depth_objective = DepthObjective(model.faces, args.render_size, near=cfg.depth_min, far=cfg.depth_max,
                                         backend=cfg.renderer_backend).to(device)
    else:
        raw = [read_scan(path, args.units, args.point_cloud) for path in args.scan]
        names, subject = [Path(p).name for p in args.scan], SCAN_SUBJECT
        scans = scan_surfaces(raw, device)
        print(f"{len(raw)} scan(s): " + ", ".join(f"{n} ({len(p)} points, {0 if f is None else len(f)} faces)"
                                                  for n, (p, f) in zip(names, raw)))
        found = scan_keypoints(args, len(raw))
        convention, units = args.convention, args.units
        if found is not None:
            keypoints, confidence = found
            joint_world, joint_valid = joint_targets(hand_model, keypoints * UNITS[units], confidence, convention)
        else:
            keypoints = confidence = joint_world = joint_valid = None

    if keypoints is not None:
        plain, personal = fit_start(model, keypoints, confidence, convention, units, names)
        before_euler, before_root = plain.euler, plain.root
        start_model, start_euler, start_root = personal.model, personal.euler, personal.root
        print(f"keypoint fit: mean residual {np.nanmean(plain.residual):.2f} {units} (the starting model), "
              f"{np.nanmean(personal.residual):.2f} {units} with the person's bone lengths "
              f"(scale {personal.skeleton.scale:.3f})")
    else:
        print("no keypoints: each scan's pose starts from the rest pose aligned to it (principal axes, rigid ICP)")
        roots = torch.stack([align_rest_pose(model, s) for s in scans])
        before_euler = torch.zeros(len(scans), hand_model.joint_num, 3)
        before_root, start_model, start_euler, start_root = roots, model, before_euler, roots

    data_kwargs = dict(depth=depth_targets, depth_objective=depth_objective, scans=scans)
    before = measure(model, before_euler, before_root, **data_kwargs)
    regularisers = Regularisers(hand_model, bone_step_size=cfg.bone_step_size, penet_rigid_weight=cfg.loss_penet_r_weight,
                                penet_non_rigid_weight=cfg.loss_penet_nr_weight, lap_weight=cfg.loss_lap_weight)
    as_t = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    bar = tqdm(total=options.iterations, desc="personalise", unit="it", disable=args.quiet, dynamic_ncols=True)

    def progress(step: int, record: dict) -> None:
        bar.update(1)
        if step % 5 == 0:
            bar.set_postfix(data=f"{record['data']:.3f}", total=f"{record['total']:.3f}")

    try:
        result = personalise(start_model, start_euler, start_root, joint_world=as_t(joint_world),
                             joint_valid=as_t(joint_valid), regularisers=regularisers, options=options,
                             progress=progress, **data_kwargs)
    finally:
        bar.close()
    outcome["interrupted"] = result.interrupted
    after = {"residual": result.residual_after, **result.details_after}  # measured at the end by personalise()
    print(f"residual per frame ({'depth error' if scans is None else 'surface distance'}, mm): before "
          f"{np.nanmean(before['residual']):.2f}, after {np.nanmean(after['residual']):.2f}")
    return write_outputs(args, hand_model, model, result, before, after, names, subject, depth_targets, scans,
                         options, start_time, device, ckpt_text, camera_names)


def write_outputs(args, hand_model, start_model, result, before, after, names, subject, depth_targets, scans,
                  options, start_time, device, ckpt_text, camera_names=None) -> Path:
    out = Path(args.out)
    source = checkpoint_path(args)
    snap_path = out / "model_dump" / f"subject_{subject}" / "snapshot_0.pth.tar"
    info = {"from_checkpoint": str(source) if source else "", "frames": list(names),
            "source": str(args.data_dir) if args.data_dir else [str(p) for p in args.scan],
            "pose_corrective": bool(options.pose_corrective)}
    # The starting snapshot's encoder goes with it, so that test.py can still read images.
    save_checkpoint(decoder_snapshot(result.model, info, encoder_from=source), snap_path)
    atomic_write_npz(out / "fit.npz", euler=result.euler.cpu().numpy(), root=result.root.cpu().numpy(),
             joints=result.joints.cpu().numpy(), residual=after["residual"], residual_before=before["residual"],
             names=np.array(names), frame_ok=np.isfinite(after["residual"]))
    for t, name in enumerate(names):
        comment = (f"Frame {t} ({name}) personalised by main/personalise.py; decode it with the personalised "
                   f"snapshot {snap_path}. The hand's placement (the wrist's world transform) is fit.npz's root[{t}].")
        atomic_write_text(out / "poses" / f"frame_{t:05d}.yaml",
                          pose_yaml(hand_model, np.degrees(result.euler[t].double().cpu().numpy()), comment))
    with torch.no_grad():
        zero = torch.zeros(1, hand_model.joint_num, 3, device=result.model.template_vertices.device)
        rest = result.model.decode(zero)["mesh_out_refined"][0].double().cpu().numpy()
    save_obj(out / "rest.obj", rest, hand_model)
    figure = out / "personalise.png"
    frame = min(max(0, args.picture_frame), len(names) - 1)
    save_image(figure, make_picture(frame, names, before, after, depth_targets, scans, hand_model, result,
                                    camera_names))
    change = rest_change(start_model, result.model)
    kind = "depth" if scans is None else "scan"
    frames_report = []
    for t, name in enumerate(names):
        row = {"frame": name, "residual_before_mm": float(before["residual"][t]),
               "residual_after_mm": float(after["residual"][t])}
        if scans is not None:
            row.update(scan_to_mesh_before_mm=float(before["scan_to_mesh"][t]),
                       scan_to_mesh_after_mm=float(after["scan_to_mesh"][t]),
                       mesh_to_scan_before_mm=float(before["mesh_to_scan"][t]),
                       mesh_to_scan_after_mm=float(after["mesh_to_scan"][t]))
        else:
            row.update(pixels_before=int(before["pixels"][t]), pixels_after=int(after["pixels"][t]))
        frames_report.append(row)
    report = {
        "kind": kind,
        "residual": ("mean |rendered - captured| over the pixels of the frame's views where both have depth (mm)"
                     if kind == "depth" else
                     "mean of the two directions' mean point-to-surface distance, scan to mesh and mesh to scan (mm); "
                     "for point clouds the points' distance to the mesh alone"),
        "before": "the starting model posed by the keypoint fit (the rest pose aligned to the scan without keypoints)",
        "frames": frames_report,
        "residual_before_mm": _stats(before["residual"]),
        "residual_after_mm": _stats(after["residual"]),
        "rest_change": change,
        "seconds": time.perf_counter() - start_time,
        "optimisation_seconds": result.seconds,
        "iterations": len(result.history),
        "interrupted": result.interrupted,
        "device": str(device),
        "checkpoint": ckpt_text,
        "hand_model": str(hand_model.source),
        "options": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                    for k, v in vars(args).items()},
        "optimisation": {f.name: getattr(options, f.name) for f in fields(PersonaliseOptions)},
        "losses_first_last": [result.history[0], result.history[-1]] if result.history else [],
        "outputs": {"snapshot": str(snap_path), "fit": str(out / "fit.npz"), "poses": str(out / "poses"),
                    "rest_mesh": str(out / "rest.obj"), "picture": str(figure)},
    }
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    print(f"rest surface moved by {change['vertex_displacement_mm']['mean']:.2f} mm on average "
          f"(max {change['vertex_displacement_mm']['max']:.2f}); {report['seconds']:.0f} s")
    print(f"wrote {snap_path}, {out / 'fit.npz'}, {out / 'report.json'}, {figure}")
    print(f"look at it: python demo/demo.py --ckpt {snap_path} --pose {out / 'poses' / 'frame_00000.yaml'}")
    return snap_path


def make_picture(t: int, names, before, after, depth_targets, scans, hand_model, result,
                 camera_names=None) -> np.ndarray:
    if scans is None:
        views = (depth_targets.view_frame == t).nonzero(as_tuple=True)[0].cpu().numpy()
        cams = [camera_names[v] for v in views]
        title = (f"{names[t]}: depth error {before['residual'][t]:.2f} mm before, "
                 f"{after['residual'][t]:.2f} mm after")
        return picture.depth_picture(depth_targets.depth[views].cpu().numpy(), before["rendered"][views],
                                     after["rendered"][views], cams, title)
    scan = scans[t]
    title = f"{names[t]}: surface distance {before['residual'][t]:.2f} mm before, {after['residual'][t]:.2f} mm after"
    frame = result.root[t, :3, :3].double().cpu().numpy()
    return picture.scan_picture(scan.points.double().cpu().numpy(),
                                None if scan.faces is None else scan.faces.cpu().numpy(),
                                before["mesh"][t], after["mesh"][t], hand_model.faces,
                                before["vertex_distance"][t], after["vertex_distance"][t], frame, title)


def main(argv=None) -> int:
    outcome = {"interrupted": False}

    def work(args):
        run(args, outcome)
        return INTERRUPTED_EXIT_CODE if outcome["interrupted"] else 0

    return script_main(work, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
