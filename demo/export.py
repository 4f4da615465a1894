"""Write the hand as a rigged glTF 2.0 file (``.glb``) for Blender, a game engine or a web page.

    python demo/export.py                                      # rest pose: output/hand.glb
    python demo/export.py --pose fist --out output/fist.glb    # a pose (file or preset), as demo.py
    python demo/export.py --pose fist --euler index1=0,0,45
    python demo/export.py --poses open fist point ok --seconds-per-pose 1 --out output/poses.glb
    python demo/export.py --poses output/fit/fit.npz --fps 30 --out output/fit.glb
    python demo/export.py --subject 4 --test_epoch 34 --pose ok --format fbx --out output/ok.fbx

The file holds the personalised rest mesh (the template with the identity corrective, or the
template without a checkpoint) with its uvs and normals, in metres; the joints as a node hierarchy
named as in ``skeleton.txt``; the skin (the template's inverse bind matrices and every skinning
weight); the pose's joint rotations and its pose corrective as a morph target at weight 1, so that
the file shows exactly the demo's mesh. With ``--poses`` it holds an animation: the joints'
rotations (and a fitted sequence's root transform) keyed at each pose, the pose corrective of
each keyframe as a morph target keyed there. See docs/export.md.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.export.fbx import glb_to_fbx  # noqa: E402
from common.export.gltf import export_glb  # noqa: E402
from common.export.sequence import read_fit  # noqa: E402
from common.utils.pose_io import build_pose, preset_names  # noqa: E402
from demo.demo import add_model_args, check_model_args, load_model, run_cli  # noqa: E402
from demo.pose_edit import euler_tensor, pose_degrees  # noqa: E402

FORMATS = {".glb": "glb", ".fbx": "fbx"}
DEFAULT_FIT_FPS = 30.0


def file_extras(hand_model, ckpt_text: str, what: str) -> dict:
    """What the file was made from, in the glTF asset's ``extras``."""
    return {"deephandmesh": {"hand_model": str(hand_model.source), "checkpoint": ckpt_text, "content": what,
                             "units": "metres (the model's millimetres x 0.001)"}}


def pose_glb(model, euler: torch.Tensor, extras: dict | None = None) -> bytes:
    """The ``.glb`` of one pose ``euler [1, J, 3]`` (radians, as ``demo.py`` decodes it)."""
    return export_glb(model, euler, extras=extras, names=["pose"])


def keyframes_glb(model, keyframes_deg: np.ndarray, seconds_per_pose: float, names=None,
                  extras: dict | None = None) -> bytes:
    """The ``.glb`` animation through ``keyframes_deg [K, J, 3]`` (degrees, as pose files hold them),
    one every ``seconds_per_pose``; each keyframe's angles are the demo's (float32 radians)."""
    euler = euler_tensor(keyframes_deg)
    times = [k * seconds_per_pose for k in range(len(euler))]
    return export_glb(model, euler, times=times, names=names, extras=extras)


def fit_glb(model, path, fps: float | None, extras: dict | None = None) -> tuple:
    """``(bytes, frames, fps)``: the ``.glb`` of a fitted sequence (``fit.npz``), every frame a
    keyframe; ``fps`` (None: the file's, else 30) sets the times."""
    fit = read_fit(path, model.joint_num)
    rate = fps or fit.fps or DEFAULT_FIT_FPS
    euler = torch.from_numpy(fit.euler).float()
    root = torch.from_numpy(fit.root).float()
    names = [f"{Path(path).name} frame {t}" for t in range(len(euler))]
    data = export_glb(model, euler, root=root, times=[t / rate for t in range(len(euler))], names=names,
                      extras=extras)
    return data, len(euler), rate


def is_fit_file(pose: str) -> bool:
    return pose.lower().endswith(".npz")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--pose", help=f"YAML/JSON file {{joint: [x, y, z]}} in degrees, or a preset: "
                        f"{', '.join(preset_names())} (default: the rest pose, every angle 0)")
    parser.add_argument("--euler", action="append", default=[], metavar="NAME=X,Y,Z",
                        help="with or without --pose: set one joint's angles in degrees (repeatable)")
    parser.add_argument("--poses", nargs="+", metavar="POSE",
                        help="an animation: two or more pose files or presets, in order; or one fitted "
                        "sequence (fit.npz: euler [T, J, 3] radians, root [T, 4, 4] mm)")
    parser.add_argument("--seconds-per-pose", type=float, default=1.0,
                        help="with --poses POSE…: time from one keyframe to the next (1)")
    parser.add_argument("--fps", type=float, help="with --poses fit.npz: frames per second "
                        f"(default: the file's 'fps', else {DEFAULT_FIT_FPS:g})")
    parser.add_argument("--format", choices=sorted(set(FORMATS.values())),
                        help="glb (glTF 2.0) or fbx (through Blender's bpy); default: from --out's suffix")
    parser.add_argument("--out", help="output file (default output/hand.glb, or .fbx with --format fbx)")
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    if args.poses is not None:
        if args.pose is not None or args.euler:
            parser.error("--pose/--euler make one pose; --poses an animation: give one or the other")
        fits = [p for p in args.poses if is_fit_file(p)]
        if fits and len(args.poses) != 1:
            parser.error("--poses: a fitted sequence (.npz) is given alone")
        if not fits and len(args.poses) < 2:
            parser.error("--poses: give at least two poses to move between (one pose: --pose)")
    if not args.seconds_per_pose > 0:
        parser.error("--seconds-per-pose must be positive")
    if args.fps is not None and not args.fps > 0:
        parser.error("--fps must be positive")
    suffix = Path(args.out).suffix.lower() if args.out else None
    if args.format is None:
        args.format = FORMATS.get(suffix, "glb")
    if args.out is None:
        args.out = str(ROOT / "output" / f"hand.{args.format}")
    elif suffix != f".{args.format}":
        parser.error(f"--out {args.out}: expected a .{args.format} file for --format {args.format}")
    return args


def make_glb(args, hand_model, model, ckpt_text: str) -> tuple:
    """``(bytes, one-line description)`` of the file the arguments ask for."""
    if args.poses and is_fit_file(args.poses[0]):
        extras = file_extras(hand_model, ckpt_text, f"fitted sequence {args.poses[0]}")
        data, frames, fps = fit_glb(model, args.poses[0], args.fps, extras)
        return data, f"an animation of {frames} fitted frames at {fps:g} fps"
    if args.poses:
        keyframes = np.stack([pose_degrees(hand_model, pose) for pose in args.poses])
        extras = file_extras(hand_model, ckpt_text, f"keyframes {' '.join(args.poses)}")
        names = [Path(p).stem for p in args.poses]
        data = keyframes_glb(model, keyframes, args.seconds_per_pose, names, extras)
        return data, f"an animation of {len(keyframes)} keyframes, {args.seconds_per_pose:g} s apart"
    euler = build_pose(hand_model, args.pose, args.euler)
    what = f"pose {args.pose}" if args.pose else "the rest pose"
    if args.euler:
        what += " with " + " ".join(f"--euler {e}" for e in args.euler)
    return pose_glb(model, euler, file_extras(hand_model, ckpt_text, what)), what


def run(args) -> Path:
    out = Path(args.out)
    if args.format == "fbx":
        from common.export.fbx import import_bpy

        import_bpy()  # before any work: says in one line how to install it where it is missing
    hand_model, model, _device, ckpt_text = load_model(args)
    print(f"hand model: {hand_model.source} ({hand_model.vertex_num} vertices, {hand_model.joint_num} joints)")
    print(ckpt_text)
    model.cpu()  # the file is made from a few decodes: the CPU is exact and quick
    data, what = make_glb(args, hand_model, model, ckpt_text)
    if args.format == "glb":
        from common.utils.io import atomic_write_bytes

        atomic_write_bytes(out, data)
    else:
        with tempfile.TemporaryDirectory(prefix="export_") as folder:
            glb = Path(folder) / "hand.glb"
            glb.write_bytes(data)
            glb_to_fbx(glb, out)
    print(f"wrote {out}: {what} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def main(argv=None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
