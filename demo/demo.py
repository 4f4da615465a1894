"""Pose a hand from Euler angles and write the mesh, its joints and a picture.

    python demo/demo.py                                   # the original demo's pose, default hand
    python demo/demo.py --pose fist --out output/fist
    python demo/demo.py --subject 4 --test_epoch 34       # demo/subject_4/snapshot_34.pth.tar
    python demo/demo.py --hand_model data/hand_model --euler index1=0,0,45

Writes ``mesh.obj`` (v in mm, the template's vt, f v/vt), ``joints.txt`` (name x y z in mm)
and ``render.png`` into ``--out`` (default ``output/demo``).
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

from common.utils.checkpoint import CheckpointError, load_decoder_checkpoint  # noqa: E402
from common.utils.device import select_device  # noqa: E402
from common.utils.hand_model import HandModelError, save_obj  # noqa: E402
from common.utils.io import atomic_write_text  # noqa: E402
from common.utils.hand_model_source import resolve_hand_model  # noqa: E402
from common.utils.pose_io import PoseError, build_pose, preset_names  # noqa: E402
from common.utils.vis import render_mesh, save_image  # noqa: E402
from main.config import ConfigError, cfg  # noqa: E402
from main.model import get_model  # noqa: E402

DEFAULT_POSE = "original"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The options that choose the hand model, the checkpoint and the device (demo, editor, animate)."""
    parser.add_argument("--hand_model", help="hand-model folder (default: data/hand_model if it holds a "
                        "model, else the project's default hand)")
    parser.add_argument("--ckpt", help="snapshot to load (original layout included)")
    parser.add_argument("--subject", type=int, help="with --test_epoch: demo/subject_N/snapshot_E.pth.tar")
    parser.add_argument("--test_epoch", type=int, help="with --subject: the snapshot's epoch")
    parser.add_argument("--gpu", dest="gpu_ids", help="GPU id; the CPU when absent or no GPU exists")
    parser.add_argument("--resnet_type", type=int, default=cfg.resnet_type,
                        help="backbone depth of the checkpoint (only its decoder is used here)")


def check_model_args(parser: argparse.ArgumentParser, args) -> None:
    if (args.subject is None) != (args.test_epoch is None):
        parser.error("--subject and --test_epoch go together")
    if args.ckpt and args.subject is not None:
        parser.error("give either --ckpt or --subject/--test_epoch, not both")


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


def checkpoint_path(args) -> Path | None:
    if args.ckpt:
        return Path(args.ckpt)
    if args.subject is not None:
        return ROOT / "demo" / f"subject_{args.subject}" / f"snapshot_{args.test_epoch}.pth.tar"
    return None


def load_model(args):
    """The hand model, the decoder (checkpoint loaded or correctives zeroed) and the device.

    Returns:
        ``(hand_model, model, device, checkpoint_text)``; ``checkpoint_text`` says which snapshot
        was loaded, or that the correctives are zero.
    """
    hand_model = resolve_hand_model(args.hand_model)
    device = select_device(args.gpu_ids)
    config = cfg.copy()
    config.resnet_type = args.resnet_type
    model = get_model("test", hand_model, config)
    ckpt = checkpoint_path(args)
    if ckpt is None:
        model.zero_correctives()
        text = "no checkpoint given: skeleton and skin correctives are zero (the template as it is)"
    else:
        info, absent = load_decoder_checkpoint(model, ckpt)
        text = f"checkpoint: {ckpt} (epoch {info.get('epoch', '?')})"
        if absent:
            text += f"\nthe checkpoint holds no {', '.join(absent)}: not used for decoding"
    model.to(device).eval()
    return hand_model, model, device, text


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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_obj(out_dir / "mesh.obj", verts, hand_model)
    lines = [f"{name} {x!r} {y!r} {z!r}" for name, (x, y, z) in zip(hand_model.joint_names, joints.tolist())]
    atomic_write_text(out_dir / "joints.txt", "\n".join(lines) + "\n")
    save_image(out_dir / "render.png", render_pose(hand_model, verts, joints))


def run(args) -> Path:
    hand_model, model, device, ckpt_text = load_model(args)
    print(f"hand model: {hand_model.source} ({hand_model.vertex_num} vertices, {hand_model.joint_num} joints)")
    euler = build_pose(hand_model, args.pose, args.euler)
    print(ckpt_text)
    joints, verts = decode_pose(model, euler, device)
    out_dir = Path(args.out)
    write_outputs(out_dir, hand_model, verts[0], joints[0])
    print(f"wrote {out_dir / 'mesh.obj'}, {out_dir / 'joints.txt'}, {out_dir / 'render.png'}")
    return out_dir


# Errors of the user's input (files, options): one line, exit code 2, no traceback.
USER_ERRORS = (HandModelError, CheckpointError, PoseError, ConfigError, ValueError, OSError)


def run_cli(run_fn, args) -> int:
    """``run_fn(args)``; a :data:`USER_ERRORS` error becomes ``error: …`` on stderr and exit code 2."""
    try:
        run_fn(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    from common.utils.allocator import retain_freed_memory

    retain_freed_memory()
    sys.exit(main())
