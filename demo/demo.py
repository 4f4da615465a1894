"""Pose a hand from Euler angles and write the mesh, its joints and a picture.

    python demo/demo.py                                   # the original demo's pose, default hand
    python demo/demo.py --pose fist --out output/fist
    python demo/demo.py --subject 4 --test_epoch 34       # demo/subject_4/snapshot_34.pth.tar
    python demo/demo.py --hand_model data/hand_model --euler index1=0,0,45

Writes ``mesh.obj`` (v in mm, the template's vt, f v/vt), ``joints.txt`` (name x y z in mm)
and ``render.png`` into ``--out`` (default ``output/demo``). Any snapshot of this project or of the
original decodes, whatever its backbone: only the decoder's weights are read. Bad input (a pose, a
hand model, a snapshot for another hand) ends with a one-line message and exit code 2; a pose that
looks wrong (radians, a joint given twice, beyond the joint limits) is decoded with a warning.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.hand.hand_model import save_obj  # noqa: E402
from common.io.atomic import atomic_write_text, make_folder  # noqa: E402
from common.hand.pose_io import build_pose, preset_names  # noqa: E402
from common.utils.vis import render_mesh, save_image  # noqa: E402
from common.hand.joint_limits import joint_limits_deg, limit_violations  # noqa: E402
from main.model import get_model  # noqa: E402,F401 - get_model: callers of demo.get_model
from main.model_options import (ConsoleFormatter, add_model_args, check_model_args, checkpoint_path,  # noqa: E402,F401
                                load_model, script_main, setup_console_logging)

DEFAULT_POSE = "original"
log = logging.getLogger("deephandmesh")


def model_and_pose_parser(description: str, default_pose: str, pose_help: str) -> argparse.ArgumentParser:
    """A parser with the model options (:func:`add_model_args`) and ``--pose``, shared by ``demo.py``
    and the editor."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--pose", default=default_pose, help=pose_help)
    return parser


def parse_args(argv=None):
    pose_help = (f"YAML/JSON file {{joint: [x, y, z]}} in degrees, or a preset: {', '.join(preset_names())} "
                 f"(default: {DEFAULT_POSE})")
    parser = model_and_pose_parser(__doc__, DEFAULT_POSE, pose_help)
    parser.add_argument("--euler", action="append", default=[], metavar="NAME=X,Y,Z",
                        help="set one joint's angles in degrees (repeatable; replaces the pose's value)")
    parser.add_argument("--out", default=str(ROOT / "output" / "demo"), help="output folder")
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    return args


def warn_beyond_limits(hand_model, euler_deg: np.ndarray, what: str) -> None:
    """Log a warning naming the angles of ``euler_deg [J, 3]`` (degrees) beyond the joint limits of
    :mod:`common.hand.joint_limits` (the pose is decoded as given)."""
    beyond = limit_violations(hand_model, euler_deg, joint_limits_deg(hand_model))
    if beyond:
        log.warning("%s: beyond the joint limits of common/hand/joint_limits.py (decoded as given): %s", what,
                    "; ".join(beyond))


def decode_pose(model, euler: torch.Tensor, device, identity=None) -> tuple:
    """``euler [B, J, 3]`` radians → ``(joints [B, J, 3], vertices [B, V, 3])`` float64 mm, wrist frame.
    ``identity``: ``model.identity()`` computed once by a caller that decodes many poses, or None."""
    with torch.no_grad():
        out = model.decode(euler.to(device), identity)
    return (out["joint_out"].cpu().numpy().astype(np.float64),
            out["mesh_out_refined"].cpu().numpy().astype(np.float64))


def render_pose(hand_model, verts, joints, **kwargs) -> np.ndarray:
    """The demo's picture of one posed mesh (``render.png``): palm, side and back, joints overlaid.
    ``kwargs`` go to :func:`common.utils.vis.render_mesh` (``image_size``, ``views``, ``fit``)."""
    # decode() puts the root at identity, so the output is in the wrist's own frame.
    return render_mesh(verts, hand_model.faces, joints_mm=joints, parents=hand_model.parents, frame=np.eye(3),
                       **kwargs)


def write_outputs(out_dir: Path, hand_model, verts: np.ndarray, joints: np.ndarray) -> None:
    """``mesh.obj``, ``joints.txt`` and ``render.png`` of one posed mesh (``[V, 3]``, ``[J, 3]`` mm)."""
    out_dir = make_folder(out_dir)
    save_obj(out_dir / "mesh.obj", verts, hand_model)
    lines = [f"{name} {x!r} {y!r} {z!r}" for name, (x, y, z) in zip(hand_model.joint_names, joints.tolist())]
    atomic_write_text(out_dir / "joints.txt", "\n".join(lines) + "\n")
    save_image(out_dir / "render.png", render_pose(hand_model, verts, joints))


def run(args) -> Path:
    hand_model, model, device, ckpt_text = load_model(args)
    print(f"hand model: {hand_model.source} ({hand_model.vertex_num} vertices, {hand_model.joint_num} joints)")
    euler = build_pose(hand_model, args.pose, args.euler)
    warn_beyond_limits(hand_model, np.degrees(euler[0].double().numpy()), "the pose")
    print(ckpt_text)
    joints, verts = decode_pose(model, euler, device)
    out_dir = Path(args.out)
    write_outputs(out_dir, hand_model, verts[0], joints[0])
    print(f"wrote {out_dir / 'mesh.obj'}, {out_dir / 'joints.txt'}, {out_dir / 'render.png'}")
    return out_dir


def main(argv=None) -> int:
    return script_main(run, parse_args, argv)


if __name__ == "__main__":
    from common.utils.allocator import retain_freed_memory

    retain_freed_memory()
    sys.exit(main())
