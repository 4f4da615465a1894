"""Fit the hand model to keypoints: 3D keypoints of one frame or a sequence, or 2D keypoints seen
by several calibrated cameras.

    python main/fit.py --keypoints hand.npy --convention mediapipe --units m --out output/fit
    python main/fit.py --keypoints seq.npz --convention dhm --meshes --personalise skeleton
    python main/fit.py --keypoints2d views.npz --cameras data/annotations/KRT_512 --image_shape 1024,668
    python main/fit.py --keypoints hand.json --hand left --subject 4 --test_epoch 34

Writes into ``--out`` (default ``output/fit``): ``fit.npz`` (``euler``, ``root``, ``joints``,
``keypoints_fitted``, ``residual``, ``frame_ok``), ``report.json`` (residuals per frame and
overall, failed frames and why, the options, the time), ``poses/frame_NNNNN.yaml`` (the angles as
``demo.py --pose`` and the editor read them), with ``--meshes`` ``meshes/frame_NNNNN.obj`` (world
coordinates), with ``--picture 0,10,20`` ``fit.png`` (those frames' input keypoints above the fitted
mesh), and with ``--personalise skeleton`` ``personalised.pth.tar`` (the decoder with the fitted
skeleton, for ``--ckpt``). Ctrl-C stops the optimisation and writes the fit reached so far,
marked as interrupted (exit code 130). Bad input: one line naming the file, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.fitting import CONVENTIONS, FitOptions, FitWeights, MultiViewKeypoints, fit_keypoints  # noqa: E402
from common.fitting.conventions import get_convention  # noqa: E402
from common.fitting.errors import FitInputError  # noqa: E402
from common.fitting.picture import fit_picture  # noqa: E402
from common.fitting.keypoints_io import parse_shape, read_cameras, read_keypoints2d, read_keypoints3d  # noqa: E402
from common.fitting.triangulate import CAMERA_SHAPE  # noqa: E402
from common.io.checkpoint import decoder_snapshot, save_checkpoint  # noqa: E402
from common.io.textio import assign_fields  # noqa: E402
from common.hand.hand_model import save_obj  # noqa: E402
from common.io.atomic import atomic_write_npz, atomic_write_text  # noqa: E402
from common.utils.vis import save_image  # noqa: E402
from common.errors import exit_code  # noqa: E402
from common.export.gltf import export_glb  # noqa: E402
from common.hand.pose_io import pose_yaml  # noqa: E402
from main.model_options import add_model_args, check_model_args, checkpoint_path, load_model  # noqa: E402

INTERRUPTED_EXIT_CODE = 130
MESH_CHUNK = 64  # frames decoded at once for --meshes
PERSONALISED_FILE = "personalised.pth.tar"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--keypoints", help="3D keypoints: .npy [T, 21, 3], .npz (keypoints, confidence) or .json")
    source.add_argument("--keypoints2d", help="2D keypoints of several views: .npz with uv [T, C, 21, 2], "
                        "confidence [T, C, 21], cameras [C]")
    parser.add_argument("--convention", default="dhm", help=f"keypoint order: {', '.join(CONVENTIONS)} (default dhm)")
    parser.add_argument("--units", default="mm", choices=["mm", "m"], help="units of the 3D keypoints (default mm)")
    parser.add_argument("--hand", default="right", choices=["right", "left"],
                        help="a left hand is mirrored (x → −x) onto the right-hand model")
    parser.add_argument("--cameras", help="with --keypoints2d: the camera file (the released KRT_512 format)")
    parser.add_argument("--image_shape", help="with --keypoints2d: H,W of the images the 2D keypoints were "
                        f"measured on (default: the cameras' pixel space, {CAMERA_SHAPE[0]},{CAMERA_SHAPE[1]})")
    parser.add_argument("--camera_shape", default=f"{CAMERA_SHAPE[0]},{CAMERA_SHAPE[1]}",
                        help="H,W of the pixel space the camera file's K is written in (default 512,334, "
                        "the released KRT_512's)")
    add_model_args(parser)
    parser.add_argument("--out", default=str(ROOT / "output" / "fit"), help="output folder (default output/fit)")
    parser.add_argument("--meshes", action="store_true", help="also write an OBJ per frame (world coordinates)")
    parser.add_argument("--glb", action="store_true",
                        help="also write fit.glb: the fitted frames as a rigged glTF animation, the wrist placed by "
                             "root (Blender, three.js, any glTF viewer; docs/export.md)")
    parser.add_argument("--fps", type=float, default=30.0, help="frames per second of --glb's animation (default 30)")
    parser.add_argument("--picture", metavar="FRAMES", help="also draw fit.png: these frames (e.g. 0,10,20), the "
                        "input keypoints above the fitted mesh and keypoints")
    parser.add_argument("--personalise", choices=["skeleton"],
                        help="also fit the bone lengths, shared by every frame, and write personalised.pth.tar")
    parser.add_argument("--no-limits", dest="limits", action="store_false", help="lift the joint limits")
    parser.add_argument("--independent", action="store_true",
                        help="the frames are not a sequence: no smoothness between consecutive frames")
    parser.add_argument("--robust", default="gm", choices=["gm", "huber", "l2"],
                        help="residual cost: Geman-McClure (default), Huber or plain least squares")
    parser.add_argument("--robust_scale", type=float, help="mm: residuals well beyond it are outliers "
                        "(default: three times the measured noise, 5-30 mm)")
    parser.add_argument("--noise", type=float, help="mm: the keypoints' noise (default: measured)")
    parser.add_argument("--iterations", type=int, default=FitOptions.iterations,
                        help=f"iterations of the main pass (default {FitOptions.iterations})")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0: torch's default; fits of up to 128 frames use one)")
    names = [f.name for f in fields(FitWeights)]
    parser.add_argument("--weight", action="append", default=[], metavar="NAME=VALUE",
                        help=f"a prior's weight, repeatable; names: {', '.join(names)}")
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    if args.keypoints2d and not args.cameras:
        parser.error("--keypoints2d needs --cameras (the camera file)")
    if args.keypoints and (args.cameras or args.image_shape):
        parser.error("--cameras and --image_shape go with --keypoints2d")
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if args.threads < 0:
        parser.error("--threads must be 0 (torch's default) or more")
    if args.picture is not None:
        try:
            args.picture_frames = [int(v) for v in args.picture.split(",")]
        except ValueError:
            parser.error(f"--picture {args.picture}: expected frame numbers separated by commas, e.g. 0,10,20")
    return args


def _weight(name: str, text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise ValueError("expected NAME=VALUE with a number") from None
    if not np.isfinite(number) or number < 0:
        raise ValueError("expected a finite weight ≥ 0")
    return number


def fit_weights(items, independent: bool = False) -> FitWeights:
    """The priors' weights: the defaults (``independent``: without the smoothness between frames)
    with ``--weight NAME=VALUE`` items applied in order."""
    weights = FitWeights.independent() if independent else FitWeights()
    return assign_fields(weights, items, "--weight", "prior", _weight, FitInputError)


def _stats(values: np.ndarray) -> dict:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"mean": None, "median": None, "p90": None, "keypoints": 0}
    return {"mean": float(values.mean()), "median": float(np.median(values)),
            "p90": float(np.percentile(values, 90)), "keypoints": int(values.size)}


def report(result, args, input_path: str, device, seconds: float, outputs: dict) -> dict:
    """The ``report.json`` content."""
    units = "px" if args.keypoints2d else result.units
    frames = []
    for t, row in enumerate(result.residual):
        frames.append({"frame": t, **_stats(row)})
    mirrored = ("the input's x was negated before fitting (the model is a right hand): euler, root and joints "
                "describe the right-hand model in that mirrored world; keypoints_fitted, residual and the "
                "meshes are mirrored back into the input's frame") if result.mirrored else None
    return {
        "input": input_path,
        "kind": "2d" if args.keypoints2d else "3d",
        "convention": result.convention,
        "units": units,
        "residual_units": units if not args.keypoints2d else "px (mean reprojection error over the views)",
        "hand": args.hand,
        "mirrored": mirrored,
        "frames": len(result.residual),
        "interrupted": result.interrupted,
        "seconds": seconds,
        "fit_seconds": result.seconds,
        "iterations": result.iterations,
        "device": str(device),
        "residual": _stats(result.residual),
        "frame_residuals": frames,
        "failed": [{"frame": t, "reason": reason} for t, reason in result.failed],
        "noise_mm": result.noise_mm,
        "robust_scale_mm": result.options.get("robust_scale_mm"),
        "limit_clamp_deg": result.limit_clamp_deg,
        "tip_offsets_mm": result.tip_offsets_mm,
        "personalised": None if result.skeleton is None else {
            "scale": result.skeleton.scale,
            "fitted_bones": result.skeleton.fitted_bones,
            "bone_change_mm": {name: float(v) for name, v in zip(result.model.hand_model.joint_names,
                                                                  result.skeleton.bone_mm) if v != 0},
        },
        "options": {k: v for k, v in vars(args).items()},
        "fit_options": result.options,
        "outputs": outputs,
    }


def write_meshes(folder: Path, result, hand_model, device) -> int:
    """One OBJ per frame that has a fit, world coordinates (mm), mirrored back for a left hand."""
    model = result.model
    mesh_model = hand_model
    if result.mirrored:  # mirrored vertices turn the faces inside out: reverse their corners
        import copy

        mesh_model = copy.copy(hand_model)
        mesh_model.faces = hand_model.faces[:, ::-1].copy()
        mesh_model.face_uvs = hand_model.face_uvs[:, ::-1].copy()
    mirror = np.array([-1.0 if result.mirrored else 1.0, 1.0, 1.0])
    frames = [t for t in range(len(result.euler)) if torch.isfinite(result.euler[t]).all()]
    with torch.no_grad():
        identity = model.identity()
        for start in range(0, len(frames), MESH_CHUNK):
            chunk = frames[start:start + MESH_CHUNK]
            posed = model.pose(result.euler[chunk].to(device), result.root[chunk].to(device), identity)
            verts = posed.mesh.double().cpu().numpy() * mirror
            for t, v in zip(chunk, verts):
                save_obj(folder / f"frame_{t:05d}.obj", v, mesh_model)
    return len(frames)


def write_personalised(path: Path, result, source_ckpt) -> None:
    """The decoder of the personalised model, in the original's snapshot layout."""
    info = {"scale": float(result.skeleton.scale), "from_checkpoint": str(source_ckpt) if source_ckpt else ""}
    save_checkpoint(decoder_snapshot(result.model, info), path)


def write_glb(path: Path, result, hand_model, ckpt_text: str, input_path, fps: float) -> str:
    """The fitted frames (those with a fit) as a rigged glTF animation, ``fps`` frames per second,
    each frame a keyframe that shows exactly ``result.model``'s mesh of it (common.export)."""
    done = [t for t in range(len(result.euler))
            if bool(torch.isfinite(result.euler[t]).all()) and bool(torch.isfinite(result.root[t]).all())]
    if not done:
        return "none (no frame has a fit)"
    what = f"{len(done)} fitted frame(s) of {input_path} at {fps:g} fps"
    if result.mirrored:
        what += "; a left hand, shown as the right-hand model in the mirrored world (x → −x)"
    extras = {"deephandmesh": {"hand_model": str(hand_model.source), "checkpoint": ckpt_text, "content": what,
                               "units": "metres (the model's millimetres x 0.001)"}}
    export_glb(result.model, result.euler[done], path, root=result.root[done], times=[t / fps for t in done],
               names=[f"frame {t}" for t in done], extras=extras)
    return f"{path} ({what})"


def run(args, outcome: dict) -> Path:
    start = time.perf_counter()
    get_convention(args.convention)  # an unknown name fails before anything is read
    weights = fit_weights(args.weight, args.independent)
    options = FitOptions(robust=args.robust, robust_scale=args.robust_scale, noise=args.noise, limits=args.limits,
                         iterations=args.iterations, personalise=args.personalise)
    if args.keypoints:
        keypoints, confidence = read_keypoints3d(args.keypoints)
        input_path, views = args.keypoints, None
    else:
        uv, confidence2d, names = read_keypoints2d(args.keypoints2d)
        cameras = read_cameras(args.cameras, names, args.keypoints2d)
        camera_shape = parse_shape(args.camera_shape, "--camera_shape")
        image_shape = parse_shape(args.image_shape, "--image_shape") if args.image_shape else camera_shape
        views = MultiViewKeypoints(uv, confidence2d, names, cameras, image_shape, camera_shape)
        input_path = args.keypoints2d
    hand_model, model, device, ckpt_text = load_model(args)
    print(f"hand model: {hand_model.source} ({hand_model.vertex_num} vertices, {hand_model.joint_num} joints)")
    print(ckpt_text)
    if views is None:
        print(f"{input_path}: {len(keypoints)} frame(s), convention {args.convention}, {args.units}, {args.hand} hand")
        result = fit_keypoints(model, keypoints, args.convention, confidence=confidence, units=args.units,
                               hand=args.hand, weights=weights, options=options, progress=True)
    else:
        print(f"{input_path}: {uv.shape[0]} frame(s) in {uv.shape[1]} views, convention {args.convention}, "
              f"{args.hand} hand")
        result = fit_keypoints(model, None, args.convention, views=views, hand=args.hand, weights=weights,
                               options=options, progress=True)
    outcome["interrupted"] = result.interrupted
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = dict(euler=result.euler.numpy(), root=result.root.numpy(), joints=result.joints.numpy(),
                  keypoints_fitted=result.keypoints, residual=result.residual, frame_ok=result.frame_ok)
    if result.triangulated is not None:
        arrays["keypoints_triangulated"] = result.triangulated
    atomic_write_npz(out / "fit.npz", **arrays)
    outputs = {"fit": str(out / "fit.npz"), "poses": str(out / "poses")}
    failed = dict(result.failed)
    written = 0
    for t, euler in enumerate(result.euler):
        if not torch.isfinite(euler).all():
            continue
        comment = (f"Frame {t} of {input_path}, fitted by main/fit.py ({result.convention} keypoints). The hand's "
                   f"placement (the wrist's world transform) is fit.npz's root[{t}].")
        if t in failed:
            comment += f"\nThis frame's fit FAILED: {failed[t]}"
        atomic_write_text(out / "poses" / f"frame_{t:05d}.yaml",
                          pose_yaml(hand_model, np.degrees(euler.double().numpy()), comment))
        written += 1
    if args.meshes:
        count = write_meshes(out / "meshes", result, hand_model, device)
        outputs["meshes"] = f"{out / 'meshes'} ({count} OBJ)"
    if result.skeleton is not None:
        write_personalised(out / PERSONALISED_FILE, result, checkpoint_path(args))
        outputs["personalised"] = str(out / PERSONALISED_FILE)
    if args.glb:
        outputs["glb"] = write_glb(out / "fit.glb", result, hand_model, ckpt_text, input_path, args.fps)
    if args.picture is not None:
        frames = [t for t in args.picture_frames if 0 <= t < len(result.euler)]
        if not frames:
            raise FitInputError(f"--picture {args.picture}: no such frame; the input has {len(result.euler)}")
        mirror = np.array([-1.0 if result.mirrored else 1.0, 1.0, 1.0])
        inputs = (result.triangulated if views is not None else keypoints * {"mm": 1.0, "m": 1000.0}[args.units])
        save_image(out / "fit.png", fit_picture(result, inputs * mirror, frames))
        outputs["picture"] = str(out / "fit.png")
    seconds = time.perf_counter() - start
    atomic_write_text(out / "report.json", json.dumps(report(result, args, input_path, device, seconds, outputs),
                                                       indent=2, allow_nan=False, default=_json_default) + "\n")
    overall = _stats(result.residual)
    unit = "px" if views is not None else result.units
    if overall["mean"] is not None:
        print(f"residual: mean {overall['mean']:.3g} {unit}, median {overall['median']:.3g}, "
              f"90th percentile {overall['p90']:.3g} ({result.iterations} iterations, {result.seconds:.1f} s)")
    for t, reason in result.failed:
        print(f"frame {t}: fit failed: {reason}")
    if result.skeleton is not None:
        print(f"personalised skeleton: scale {result.skeleton.scale:.4f}, {len(result.skeleton.fitted_bones)} bones "
              f"fitted; python demo/demo.py --ckpt {out / PERSONALISED_FILE} "
              f"--pose {out / 'poses' / 'frame_00000.yaml'}")
    if result.interrupted:
        print("interrupted: wrote the fit reached so far (report.json says so)")
    print(f"wrote {out / 'fit.npz'}, {out / 'report.json'}, {written} pose file(s) in {out / 'poses'}")
    return out


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    outcome = {"interrupted": False}
    try:
        code = exit_code(lambda: run(args, outcome))
    except KeyboardInterrupt:  # before the fit began, or while writing it: nothing complete to keep
        print("interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    if code == 0 and outcome["interrupted"]:
        return INTERRUPTED_EXIT_CODE
    return code


if __name__ == "__main__":
    from common.utils.allocator import retain_freed_memory

    retain_freed_memory()
    sys.exit(main())
