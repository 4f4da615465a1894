"""An animation through hand poses: GIF or MP4, each frame the demo's picture (``render.png``).

    python demo/animate.py --poses open fist point ok --out output/poses.gif
    python demo/animate.py --poses open my_pose.yaml --seconds-per-pose 2 --fps 30 --out output/a.mp4
    python demo/animate.py --poses open fist --views palm --size 384 --out output/fist.gif
    python demo/animate.py --poses open fist point ok --out output/poses.glb   # rigged glTF (demo/export.py)

Between two poses each joint turns along the shortest rotation from one to the other (a spherical
interpolation of its rotation ``Rz·Ry·Rx``, not of the raw Euler triples, which can take the long
way round); all frames are decoded in one batched call, rendered with the project's renderer and
shading (``common.utils.vis``, as ``render.png``, with one framing for the whole animation) and
written with ``imageio``. The first frame is the first pose, the last frame the last pose.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.hand.hand_model import HandModel  # noqa: E402
from common.io.atomic import atomic_write_bytes  # noqa: E402
from common.hand.pose_io import preset_names  # noqa: E402
from common.utils.vis import VIEWS, fit_views  # noqa: E402
from common.errors import OptionError  # noqa: E402
from demo.demo import (add_model_args, check_model_args, decode_pose, load_model, render_pose,  # noqa: E402
                       script_main, warn_beyond_limits)
from demo.pose_edit import euler_tensor, pose_degrees  # noqa: E402

FORMATS = (".gif", ".mp4", ".glb")
DEFAULT_VIEWS = ("palm", "side", "back")


# ------------------------------------------------------------ rotations (numpy, float64)
def euler_to_quaternion(euler: np.ndarray) -> np.ndarray:
    """``[..., 3]`` radians (x, y, z) → ``[..., 4]`` unit quaternions (w, x, y, z) of ``Rz·Ry·Rx``."""
    half = np.asarray(euler, np.float64) / 2
    c, s = np.cos(half), np.sin(half)
    cx, cy, cz = c[..., 0], c[..., 1], c[..., 2]
    sx, sy, sz = s[..., 0], s[..., 1], s[..., 2]
    return np.stack([cz * cy * cx + sz * sy * sx,
                     cz * cy * sx - sz * sy * cx,
                     cz * sy * cx + sz * cy * sx,
                     sz * cy * cx - cz * sy * sx], -1)


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """``[..., 4]`` unit quaternions (w, x, y, z) → ``[..., 3, 3]`` rotation matrices."""
    w, x, y, z = np.moveaxis(q, -1, 0)
    entries = [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
               2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
               2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]
    return np.stack(entries, -1).reshape(*q.shape[:-1], 3, 3)


def slerp(q0: np.ndarray, q1: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation ``[..., 4]`` along the shorter arc (``q`` and ``-q`` are one rotation)."""
    dot = (q0 * q1).sum(-1, keepdims=True)
    q1 = np.where(dot < 0, -q1, q1)
    dot = np.abs(dot)
    angle = np.arccos(np.clip(dot, -1.0, 1.0))
    small = angle < 1e-8
    sin = np.where(small, 1.0, np.sin(angle))
    w0 = np.where(small, 1 - t, np.sin((1 - t) * angle) / sin)
    w1 = np.where(small, t, np.sin(t * angle) / sin)
    out = w0 * q0 + w1 * q1
    return out / np.linalg.norm(out, axis=-1, keepdims=True)


def matrix_to_euler_near(R: np.ndarray, near: np.ndarray) -> np.ndarray:
    """Euler angles (x, y, z) radians of ``R = Rz·Ry·Rx`` ``[..., 3, 3]``: of the two solutions and
    their 2π shifts, the one nearest to ``near [..., 3]`` (so that a sequence of frames changes its
    angles continuously)."""
    y = np.arcsin(np.clip(-R[..., 2, 0], -1.0, 1.0))
    x = np.arctan2(R[..., 2, 1], R[..., 2, 2])
    z = np.arctan2(R[..., 1, 0], R[..., 0, 0])
    first = np.stack([x, y, z], -1)
    second = np.stack([x + np.pi, np.pi - y, z + np.pi], -1)
    best, best_dist = None, None
    for candidate in (first, second):
        candidate = near + (candidate - near + np.pi) % (2 * np.pi) - np.pi  # each angle's nearest 2π shift
        dist = np.abs(candidate - near).sum(-1, keepdims=True)
        best = candidate if best is None else np.where(dist < best_dist, candidate, best)
        best_dist = dist if best_dist is None else np.minimum(dist, best_dist)
    return best


def interpolate_poses(keyframes: np.ndarray, dof_mask: np.ndarray, frames_per_pose: int) -> np.ndarray:
    """Frames between key poses, per joint on rotations.

    Args:
        keyframes: ``[K, J, 3]`` Euler angles (radians), K ≥ 1.
        dof_mask: ``[J, 3]``, 1 where a joint turns about that axis (the others stay exactly 0).
        frames_per_pose: frames from one key pose to the next (≥ 1).
    Returns:
        ``[(K - 1) · frames_per_pose + 1, J, 3]`` radians; frame ``i · frames_per_pose`` is key pose
        ``i`` exactly, the frames between follow the slerp of each joint's rotation, as the Euler
        angles nearest the previous frame's. (A key pose whose angles lie a full turn away from where
        the slerp arrives, e.g. −170° reached from 170° through 180°, is still taken as written:
        the same rotation, while the pose corrective sees the angles as given.)
    """
    keyframes = np.asarray(keyframes, np.float64)
    if keyframes.ndim != 3 or keyframes.shape[0] < 1 or keyframes.shape[2] != 3:
        raise ValueError(f"interpolate_poses: expected key poses [K >= 1, J, 3], got {keyframes.shape}")
    if frames_per_pose < 1:
        raise ValueError(f"interpolate_poses: frames_per_pose must be >= 1, got {frames_per_pose}")
    quats = euler_to_quaternion(keyframes)
    frames = [keyframes[0]]
    for k in range(len(keyframes) - 1):
        for i in range(1, frames_per_pose):
            R = quaternion_to_matrix(slerp(quats[k], quats[k + 1], i / frames_per_pose))
            frames.append(matrix_to_euler_near(R, frames[-1]) * dof_mask)
        frames.append(keyframes[k + 1])
    return np.stack(frames)


# ------------------------------------------------------------ frames and files
def render_frames(hand_model: HandModel, model, device, keyframes_deg: np.ndarray, frames_per_pose: int,
                  views: Sequence[str] = DEFAULT_VIEWS, image_size: int = 256, progress: bool = True,
                  on_frame: Optional[Callable[[int, int], None]] = None, lock=None) -> np.ndarray:
    """The animation's frames: interpolate, decode in one batched call, render each frame.

    Args:
        keyframes_deg: ``[K, J, 3]`` key poses in degrees (as pose files hold them).
        views: panels of each frame (:data:`common.utils.vis.VIEWS`), side by side.
        image_size: side of a panel in pixels.
        on_frame: called with ``(frames done, frames in all)`` after each frame (the editor's progress bar).
        lock: held while decoding (the editor shares one model between its browser tabs).
    Returns:
        ``uint8 [N, image_size, image_size · len(views), 3]`` RGB frames.
    """
    keyframes = euler_tensor(keyframes_deg).double().numpy()  # the demo's radians, float32 values
    euler = interpolate_poses(keyframes, hand_model.dof_mask, frames_per_pose)
    with lock or nullcontext():
        joints, verts = decode_pose(model, torch.from_numpy(euler).float(), device)
    # One framing for all frames, so that the hand does not jump as its extent changes.
    fit = fit_views(verts, views, image_size)
    frames = []
    for i in tqdm(range(len(verts)), desc="rendering", unit="frame", disable=not progress, leave=False):
        frames.append(render_pose(hand_model, verts[i], joints[i], image_size=image_size, views=views,
                                  fit=fit)[..., ::-1])
        if on_frame is not None:
            on_frame(i + 1, len(verts))
    return np.ascontiguousarray(np.stack(frames))


def check_format(path: Path, image_size: int, panels: int) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise OptionError(f"--out {path}: expected a .gif, .mp4 or .glb file")
    if suffix == ".mp4" and (image_size % 2 or (image_size * panels) % 2):
        raise OptionError(f"--size {image_size}: an MP4 needs an even frame size")
    return suffix


def gif_frame_ms(fps: float) -> int:
    """A GIF frame's duration in ms: ``1/fps`` to the nearest hundredth of a second (at least one)."""
    return 10 * max(1, round(100.0 / fps))


def encode_animation(frames: np.ndarray, fps: float, suffix: str) -> bytes:
    """``frames [N, H, W, 3]`` uint8 RGB → the bytes of a looping GIF or an H.264 MP4 (imageio)."""
    import imageio.v3 as iio

    if suffix == ".gif":
        # GIF stores frame durations in whole hundredths of a second: the nearest one.
        return iio.imwrite("<bytes>", frames, extension=".gif", duration=gif_frame_ms(fps), loop=0)
    with tempfile.TemporaryDirectory(prefix="animate_") as folder:
        path = Path(folder) / "animation.mp4"
        # macro_block_size=1: keep the frame size as it is (the renderer's panels), no rescaling.
        iio.imwrite(path, frames, plugin="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                    macro_block_size=1)
        return path.read_bytes()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poses", nargs="+", required=True, metavar="POSE",
                        help=f"two or more pose files or presets ({', '.join(preset_names())}), in order")
    parser.add_argument("--seconds-per-pose", type=float, default=1.0, help="time from one pose to the next (1)")
    parser.add_argument("--fps", type=float, default=20.0, help="frames per second (20)")
    parser.add_argument("--out", default=str(ROOT / "output" / "animation.gif"),
                        help="FILE.gif, FILE.mp4, or FILE.glb: a rigged glTF animation (see demo/export.py)")
    parser.add_argument("--views", nargs="+", default=list(DEFAULT_VIEWS), choices=sorted(VIEWS),
                        help="panels of each frame (default: palm side back, as render.png)")
    parser.add_argument("--size", type=int, default=256, help="side of a panel in pixels (256)")
    add_model_args(parser)
    args = parser.parse_args(argv)
    check_model_args(parser, args)
    if len(args.poses) < 2:
        parser.error("--poses: give at least two poses to move between")
    if not (args.fps > 0 and args.seconds_per_pose > 0):
        parser.error("--fps and --seconds-per-pose must be positive")
    if args.size < 16:
        parser.error("--size: at least 16 pixels")
    return args


def frames_per_pose(seconds_per_pose: float, fps: float) -> int:
    return max(1, round(seconds_per_pose * fps))


def run(args) -> Path:
    out = Path(args.out)
    suffix = check_format(out, args.size, len(args.views))
    hand_model, model, device, ckpt_text = load_model(args)
    print(f"hand model: {hand_model.source} ({hand_model.vertex_num} vertices, {hand_model.joint_num} joints)")
    print(ckpt_text)
    keyframes = np.stack([pose_degrees(hand_model, pose) for pose in args.poses])
    for pose, degrees in zip(args.poses, keyframes):
        warn_beyond_limits(hand_model, degrees, f"--poses {pose}")
    if suffix == ".glb":
        return write_glb(args, out, hand_model, model, ckpt_text, keyframes)
    frames = render_frames(hand_model, model, device, keyframes, frames_per_pose(args.seconds_per_pose, args.fps),
                           views=args.views, image_size=args.size)
    atomic_write_bytes(out, encode_animation(frames, args.fps, suffix))
    print(f"wrote {out} ({len(frames)} frames of {frames.shape[2]}x{frames.shape[1]}, {args.fps:g} fps)")
    return out


def write_glb(args, out: Path, hand_model, model, ckpt_text: str, keyframes: np.ndarray) -> Path:
    """``--out FILE.glb``: the keyframes as a rigged glTF animation, ``--seconds-per-pose`` apart
    (``demo/export.py --poses`` writes the same file; ``--fps``, ``--views`` and ``--size`` are for
    the rendered formats: a glTF player interpolates between the keyframes itself)."""
    from demo.export import file_extras, keyframes_request, request_glb

    request = keyframes_request(keyframes, args.seconds_per_pose, [Path(p).stem for p in args.poses])
    atomic_write_bytes(out, request_glb(model, request, file_extras(hand_model, ckpt_text, request.what)))
    print(f"wrote {out}: rigged glTF, {request.what}")
    return out


def main(argv=None) -> int:
    return script_main(run, parse_args, argv)


if __name__ == "__main__":
    from common.utils.allocator import retain_freed_memory

    retain_freed_memory()
    sys.exit(main())
