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
from typing import List, NamedTuple, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.export.fbx import glb_to_fbx, import_bpy  # noqa: E402
from common.export.gltf import export_glb  # noqa: E402
from common.export.sequence import read_fit  # noqa: E402
from common.hand.hand_model_source import resolve_hand_model  # noqa: E402
from common.io.atomic import atomic_write_bytes  # noqa: E402
from common.hand.pose_io import build_pose, preset_names  # noqa: E402
from demo.demo import add_model_args, check_model_args, load_model, script_main  # noqa: E402
from demo.pose_edit import euler_tensor, pose_degrees  # noqa: E402

FORMATS = {".glb": "glb", ".fbx": "fbx"}
DEFAULT_FIT_FPS = 30.0


def file_extras(hand_model, ckpt_text: str, what: str) -> dict:
    """What the file was made from, in the glTF asset's ``extras``."""
    return {"deephandmesh": {"hand_model": str(hand_model.source), "checkpoint": ckpt_text, "content": what,
                             "units": "metres (the model's millimetres x 0.001)"}}


class Request(NamedTuple):
    """What to write, read and checked before the model is built: ``euler [K, J, 3]`` radians (as
    ``demo.py`` decodes them), ``root [K, 4, 4]`` mm or None (decode mode), ``times`` (s) or None for
    one static pose, the keyframes' names and a description."""

    euler: torch.Tensor
    root: Optional[torch.Tensor]
    times: Optional[List[float]]
    names: List[str]
    what: str


def pose_request(hand_model, pose: Optional[str], overrides=()) -> Request:
    """One pose, a file or preset with ``--euler`` overrides, as ``demo.py`` reads it (None: the rest pose)."""
    euler = build_pose(hand_model, pose, overrides)
    what = f"pose {pose}" if pose else "the rest pose"
    if overrides:
        what += " with " + " ".join(f"--euler {e}" for e in overrides)
    return Request(euler, None, None, ["pose"], what)


def pose_request_degrees(euler_deg: np.ndarray, what: str) -> Request:
    """One pose given in degrees ``[J, 3]`` (the editor's), as ``demo.py`` converts it."""
    return Request(euler_tensor(euler_deg), None, None, ["pose"], what)


def keyframes_request(keyframes_deg: np.ndarray, seconds_per_pose: float, names: Sequence[str]) -> Request:
    """An animation through ``keyframes_deg [K, J, 3]`` (degrees, as pose files hold them), one every
    ``seconds_per_pose``; each keyframe's angles are the demo's (float32 radians)."""
    times = [k * seconds_per_pose for k in range(len(keyframes_deg))]
    return Request(euler_tensor(keyframes_deg), None, times, list(names),
                   f"an animation of {len(keyframes_deg)} keyframes, {seconds_per_pose:g} s apart")


def fit_request(hand_model, path, fps: Optional[float]) -> Request:
    """A fitted sequence (``fit.npz``), every frame a keyframe; ``fps`` (None: the file's, else 30)."""
    fit = read_fit(path, hand_model.joint_num)
    rate = fps or fit.fps or DEFAULT_FIT_FPS
    frames = len(fit.euler)
    return Request(torch.from_numpy(fit.euler).float(), torch.from_numpy(fit.root).float(),
                   [t / rate for t in range(frames)], [f"{Path(path).name} frame {t}" for t in range(frames)],
                   f"an animation of {frames} fitted frames at {rate:g} fps")


def request_of(args, hand_model) -> Request:
    """The :class:`Request` the command line asks for."""
    if args.poses and is_fit_file(args.poses[0]):
        return fit_request(hand_model, args.poses[0], args.fps)
    if args.poses:
        keyframes = np.stack([pose_degrees(hand_model, pose) for pose in args.poses])
        return keyframes_request(keyframes, args.seconds_per_pose, [Path(p).stem for p in args.poses])
    return pose_request(hand_model, args.pose, args.euler)


def request_glb(model, request: Request, extras: Optional[dict] = None) -> bytes:
    """The ``.glb`` bytes of ``request`` for ``model`` (its checkpoint loaded or correctives zeroed)."""
    return export_glb(model, request.euler, root=request.root, times=request.times, names=request.names,
                      extras=extras)


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


def run(args) -> Path:
    out = Path(args.out)
    if args.format == "fbx":
        import_bpy()  # before any work: says in one line how to install it where it is missing
    # The poses are read and checked first: a bad file fails before the model is built.
    request = request_of(args, resolve_hand_model(args.hand_model))
    hand_model, model, _device, ckpt_text = load_model(args)
    print(f"hand model: {hand_model.source} ({hand_model.vertex_num} vertices, {hand_model.joint_num} joints)")
    print(ckpt_text)
    model.cpu()  # a few decodes: the CPU is quick, and exact
    data = request_glb(model, request, file_extras(hand_model, ckpt_text, request.what))
    if args.format == "glb":
        atomic_write_bytes(out, data)
    else:
        with tempfile.TemporaryDirectory(prefix="export_") as folder:
            glb = Path(folder) / "hand.glb"
            glb.write_bytes(data)
            glb_to_fbx(glb, out)
    print(f"wrote {out}: {request.what} ({out.stat().st_size / 1e6:.1f} MB)")
    return out


def main(argv=None) -> int:
    return script_main(run, parse_args, argv)


if __name__ == "__main__":
    sys.exit(main())
