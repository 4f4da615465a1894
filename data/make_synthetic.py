"""Write a synthetic data set in exactly the released DeepHandMesh layout (docs/design.md, "Data set files").

    python data/make_synthetic.py --out data/synthetic                 # 2 x 3 frames, 6 cameras
    python data/make_synthetic.py --out data/synth_big --frames 50 --sequences 4 --cameras 12
    python data/make_synthetic.py --out data/synth_small --image_size 256x167 --depth_size 128x84

The cameras' ``KRT_512`` is in the 512 x 334 pixel space of the released data; images and depth
maps are stored at 512 x 334 by default (the hand then spans ~280 pixels, so a 256 x 256 input
crop is not upsampled) or at the sizes asked for, resampled from that space.

Layout written under ``--out``::

    hand_model/                                             the six hand-model files
    images/subject_4/<seq>/cam<cam>/image<frame:04d>.jpg    shaded renders on a background
    annotations/KRT_512                                     cameras
    annotations/keypoints/subject_4/keypoints<frame:04d>.pts
    annotations/depthmaps/subject_4/<frame:06d>/depthmap<cam>.pkl
    gt/                                                     ground truth, never read by the data reader:
        identity.npz   skeleton_offset [J,3] mm, id_corrective [V,3] mm
        frames.npz     frame ids, euler [T,J,3] rad, root [T,4,4], joints [T,J,3] mm, vertices [T,V,3] mm
        meta.json      the options and the camera names

Ground truth comes from the project's own posing code (:func:`common.hand.kinematics.pose_hand`)
with a known identity — non-zero skeleton offsets and a smooth identity corrective of a few mm along
the surface normals — and a known pose-dependent corrective (a soft-tissue bulge near each joint
that grows with its flexion). Poses are random within joint limits; the wrist gets a random rotation
and a position inside the capture volume; the cameras stand on a dome around it. Depth maps are
rendered by the project's :class:`common.renderer.depth_renderer.DepthRenderer`, so a model that recovers the
ground truth renders them back exactly. The output depends only on the options and ``--seed``.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from common.renderer.depth_renderer import DepthRenderer, project_points  # noqa: E402
from common.hand.hand_model import HandModel, save_hand_model  # noqa: E402
from common.hand.hand_model_source import resolve_hand_model  # noqa: E402
from common.hand.kinematics import pose_hand  # noqa: E402
from common.errors import exit_code  # noqa: E402
from common.io.atomic import atomic_write_bytes, atomic_write_npz, make_folder  # noqa: E402
from common.io.textio import pixel_size_type  # noqa: E402
from common.utils.vis import paint_mesh  # noqa: E402
from data.dataset import ORIGINAL_IMG_SHAPE, resample_affine, write_krt, write_pts  # noqa: E402

# Joint limits in degrees, (x, y, z) ranges by joint-name suffix; z is the flexion axis.
JOINT_LIMITS = {
    "thumb0": ((-10, 10), (-10, 10), (-10, 20)),
    "thumb1": ((-15, 15), (-10, 35), (-10, 40)),
    "thumb2": ((0, 0), (0, 0), (-5, 50)),
    "thumb3": ((0, 0), (0, 0), (-5, 70)),
    "1": ((-8, 8), (-15, 15), (-10, 90)),
    "2": ((0, 0), (0, 0), (0, 100)),
    "3": ((0, 0), (0, 0), (0, 80)),
}


def joint_limits(model: HandModel) -> np.ndarray:
    """``[J, 3, 2]`` lower/upper angle (radians) of every joint; zero where it has no DoF."""
    limits = np.zeros((model.joint_num, 3, 2))
    for j, name in enumerate(model.joint_names):
        for suffix in ("thumb0", "thumb1", "thumb2", "thumb3", "1", "2", "3"):
            if name.endswith(suffix) and not name.endswith("null"):
                limits[j] = np.radians(JOINT_LIMITS[suffix])
                break
    return limits * model.dof_mask[:, :, None]


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``[V, 3]`` unit area-weighted vertex normals (outward for an outward-oriented mesh)."""
    tri = vertices[faces]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, faces[:, k], face_n)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def make_identity(model: HandModel, rng: np.random.Generator, skeleton_mm: float = 3.0,
                  corrective_mm: float = 3.0, bumps: int = 8, sigma_mm: float = 25.0):
    """A person: skeleton offsets ``[J, 3]`` and a smooth identity corrective ``[V, 3]`` (mm).

    Bones get longer or shorter by up to ``skeleton_mm`` (mostly along the bone, the local x) and
    the skin swells or shrinks along its normals by a sum of Gaussian bumps, at most ``corrective_mm``.
    """
    J = model.joint_num
    offset = np.zeros((J, 3))
    offset[:, 0] = rng.uniform(-skeleton_mm, skeleton_mm, J)
    offset[:, 1:] = rng.normal(0, skeleton_mm / 4, (J, 2))
    offset[model.root_index] = 0.0  # the root's local pose is never used
    verts = model.vertices
    centres = verts[rng.choice(len(verts), bumps, replace=False)]
    amplitude = rng.uniform(-1, 1, bumps)
    d2 = ((verts[:, None, :] - centres[None]) ** 2).sum(-1)
    field = (np.exp(-d2 / (2 * sigma_mm ** 2)) * amplitude).sum(1)
    field *= corrective_mm / max(np.abs(field).max(), 1e-9)
    return offset, field[:, None] * vertex_normals(verts, model.faces)


class BulgeCorrective:
    """Pose-dependent corrective: skin near a flexing joint bulges outwards along its normal,
    growing linearly with the flexion angle (``bulge_mm`` at 90°), Gaussian in the distance
    to the joint (``radius_mm``)."""

    def __init__(self, model: HandModel, bulge_mm: float = 2.0, radius_mm: float = 12.0):
        flex = [j for j in range(model.joint_num) if model.dof_mask[j, 2] and j != model.root_index]
        centres = model.global_pose[flex, :3, 3]
        d2 = ((model.vertices[:, None, :] - centres[None]) ** 2).sum(-1)
        self.flex_joints = np.array(flex)
        self.falloff = np.exp(-d2 / (2 * radius_mm ** 2))  # [V, Jf]
        self.normals = vertex_normals(model.vertices, model.faces)
        self.bulge_mm = bulge_mm

    def __call__(self, euler: np.ndarray) -> np.ndarray:
        """``euler [B, J, 3]`` radians → ``[B, V, 3]`` mm."""
        flexion = np.clip(euler[:, self.flex_joints, 2], 0, None) / (math.pi / 2)  # [B, Jf]
        amount = flexion @ self.falloff.T * self.bulge_mm  # [B, V]
        return amount[:, :, None] * self.normals[None]


def sample_pose(limits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[J, 3]`` radians, uniform within the limits (fingers flex together more often than not)."""
    lo, hi = limits[..., 0], limits[..., 1]
    u = rng.uniform(0, 1, lo.shape)
    # A shared "grip" term makes curled fingers come together, as real hands do.
    u[:, 2] = np.clip(0.6 * rng.uniform() + 0.4 * u[:, 2] + rng.normal(0, 0.1, len(u)), 0, 1)
    return lo + u * (hi - lo)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly distributed 3x3 rotation."""
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def dome_cameras(count: int, kspace_hw, rng: np.random.Generator, radius_mm: float = 600.0,
                 fill: float = 0.55):
    """Cameras on the upper half of a sphere around the origin, looking at it (world +z is up),
    with ``K`` in the pixel space ``kspace_hw = (H, W)`` (the released ``KRT_512``'s 512 x 334).

    Returns ``{name: {'K' [3,3], 'dist' [5], 'R' [3,3], 't' [3]}}`` with OpenCV conventions
    (``x_c = R x + t``, x right, y down, z forward); names ``400000``, ``400001``… (colour cameras).
    """
    h, w = kspace_hw
    focal = fill * h * radius_mm / 200.0  # a 200 mm hand spans ``fill`` of the image height
    golden = math.pi * (3 - math.sqrt(5))
    cams = {}
    for i in range(count):
        elevation = math.radians(15 + 60 * (i + 0.5) / count)
        azimuth = i * golden + rng.uniform(-0.1, 0.1)
        pos = radius_mm * np.array([math.cos(elevation) * math.cos(azimuth),
                                    math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])
        forward = -pos / np.linalg.norm(pos)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        R = np.stack([right, down, forward])
        K = np.array([[focal, 0, (w - 1) / 2], [0, focal, (h - 1) / 2], [0, 0, 1.0]])
        cams[f"{400000 + i:06d}"] = {"K": K, "dist": np.zeros(5), "R": R, "t": -R @ pos}
    return cams


def render_depth_maps(renderer_faces: torch.Tensor, vertices: np.ndarray, cams, kspace_hw, depth_hw,
                      margin: int = 2) -> np.ndarray:
    """``[N, Hd, Wd]`` float32 depth (mm, 0 empty) of one posed mesh in every camera, at the
    resolution ``depth_hw`` (the cameras' pixel space ``kspace_hw`` resampled by the centre-aligned
    rule the data reader inverts).

    Only the window around the mesh's projection is rasterised (the CPU rasteriser costs
    pixels × faces); the window is the same crop of the full map, so the values are identical.
    """
    names = list(cams)
    N = len(names)
    camrot = torch.tensor(np.stack([cams[c]["R"] for c in names]))[None]
    campos = torch.tensor(np.stack([-cams[c]["R"].T @ cams[c]["t"] for c in names]))[None]
    focal = torch.tensor(np.stack([[cams[c]["K"][0, 0], cams[c]["K"][1, 1]] for c in names]))[None]
    princpt = torch.tensor(np.stack([[cams[c]["K"][0, 2], cams[c]["K"][1, 2]] for c in names]))[None]
    to_depth = torch.tensor(resample_affine(kspace_hw, depth_hw)).expand(1, N, 2, 3)
    verts = torch.tensor(vertices)[None]
    uv = project_points(verts, camrot, campos, focal, princpt, to_depth)[0, ..., :2].numpy()
    lo = np.floor(uv.min(1)).astype(int) - margin
    hi = np.ceil(uv.max(1)).astype(int) + margin
    lo = np.clip(lo, 0, [depth_hw[1] - 1, depth_hw[0] - 1])
    hi = np.clip(hi, 0, [depth_hw[1] - 1, depth_hw[0] - 1])
    win_w, win_h = int((hi - lo)[:, 0].max()) + 1, int((hi - lo)[:, 1].max()) + 1
    shift = to_depth.clone()
    shift[0, :, 0, 2] -= torch.tensor(lo[:, 0], dtype=shift.dtype)
    shift[0, :, 1, 2] -= torch.tensor(lo[:, 1], dtype=shift.dtype)
    window = DepthRenderer(renderer_faces, (win_h, win_w))(verts, camrot, campos, focal, princpt, shift)[0]
    out = np.zeros((N,) + tuple(depth_hw), np.float32)
    for n in range(N):
        x0, y0 = lo[n]
        h = min(win_h, depth_hw[0] - y0)
        w = min(win_w, depth_hw[1] - x0)
        out[n, y0:y0 + h, x0:x0 + w] = window[n, :h, :w].numpy()
    return out


def background(image_hw, rng: np.random.Generator) -> np.ndarray:
    """A studio-like backdrop: a smooth colour gradient with a little noise (uint8 BGR)."""
    h, w = image_hw
    top, bottom = rng.uniform(40, 200, 3), rng.uniform(40, 200, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    img = top * (1 - t) + bottom * t + rng.normal(0, 4, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def render_image(vertices: np.ndarray, faces: np.ndarray, cam, kspace_hw, image_hw, backdrop: np.ndarray,
                 skin_bgr, supersample: int = 2) -> np.ndarray:
    """A shaded picture of the posed mesh through one camera (painter's algorithm), uint8 BGR, of
    ``image_hw`` pixels (``K`` being in the pixel space ``kspace_hw``)."""
    xc = vertices @ cam["R"].T + cam["t"]
    K = cam["K"]
    uv = np.stack([K[0, 0] * xc[:, 0] / xc[:, 2] + K[0, 2], K[1, 1] * xc[:, 1] / xc[:, 2] + K[1, 2]], 1)
    uv = uv @ resample_affine(kspace_hw, image_hw)[:, :2].T + resample_affine(kspace_hw, image_hw)[:, 2]
    s = supersample
    big = cv2.resize(backdrop, (image_hw[1] * s, image_hw[0] * s), interpolation=cv2.INTER_NEAREST)
    # Supersampled pixel centres: (u + 0.5) * s - 0.5. The viewing frame has +z towards the camera.
    paint_mesh(big, (uv + 0.5) * s - 0.5, xc * np.array([1.0, -1.0, -1.0]), faces, skin_bgr)
    return cv2.resize(big, (image_hw[1], image_hw[0]), interpolation=cv2.INTER_AREA)


parse_hw = pixel_size_type(example="128x84")  # the sizes' argparse type (show_sample.py uses it too)


def generate(out: Path, hand_model: HandModel, seed: int = 0, sequences: int = 2, frames: int = 3,
             cameras: int = 6, image_hw=ORIGINAL_IMG_SHAPE, depth_hw=ORIGINAL_IMG_SHAPE, subject: int = 4,
             drop_keypoints: float = 0.05, progress: bool = True, skeleton_mm: float = 3.0,
             identity_mm: float = 3.0, original_img_shape=ORIGINAL_IMG_SHAPE) -> dict:
    """Write the data set; returns the ``gt/meta.json`` dict.

    As in the released data, ``KRT_512`` is in the pixel space ``original_img_shape`` (512 x 334)
    and the images and depth maps are stored at ``image_hw`` and ``depth_hw``, resampled from it.
    ``skeleton_mm`` and ``identity_mm`` bound the person's bone-length changes and identity
    corrective (see :func:`make_identity`)."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    save_hand_model(hand_model, out / "hand_model")
    cams = dome_cameras(cameras, original_img_shape, rng)
    make_folder(out / "annotations")
    write_krt(out / "annotations" / "KRT_512", cams)
    skeleton_offset, id_corrective = make_identity(hand_model, rng, skeleton_mm, identity_mm)
    bulge = BulgeCorrective(hand_model)
    limits = joint_limits(hand_model)
    faces_t = torch.as_tensor(hand_model.faces)
    backdrops = {c: background(image_hw, rng) for c in cams}
    skin = rng.uniform([90, 130, 170], [140, 180, 230])
    seq_names = [f"{i:04d}_RT_synthetic" for i in range(sequences)]
    record = {"frame": [], "sequence": [], "euler": [], "root": [], "joints": [], "vertices": []}
    root_index = hand_model.root_index
    total = sequences * frames
    bar = tqdm(total=total, desc="synthetic frames", disable=not progress, unit="frame")
    for s, seq in enumerate(seq_names):
        for k in range(frames):
            frame = s * frames + k
            euler = sample_pose(limits, rng)[None]
            rest = hand_model.vertices + id_corrective + bulge(euler)[0]
            root = np.eye(4)
            root[:3, :3] = random_rotation(rng)
            root = root @ hand_model.global_pose[root_index]
            e64 = torch.tensor(euler)
            args = (torch.tensor(skeleton_offset), torch.tensor(rest))
            _, verts = pose_hand(hand_model, e64, torch.tensor(root), *args)
            # Move the hand so that its centre lands at a random point of the capture volume.
            root[:3, 3] += rng.uniform(-40, 40, 3) - verts[0].numpy().mean(0)
            joints, verts = pose_hand(hand_model, e64, torch.tensor(root), *args)
            joints, verts = joints[0].numpy(), verts[0].numpy()

            depth = render_depth_maps(faces_t, verts, cams, original_img_shape, depth_hw)
            for n, cam in enumerate(cams):
                img = render_image(verts, hand_model.faces, cams[cam], original_img_shape, image_hw,
                                   backdrops[cam], skin)
                path = out / "images" / f"subject_{subject}" / seq / f"cam{cam}" / f"image{frame:04d}.jpg"
                ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
                if not ok:
                    raise OSError(f"{path}: could not encode the image")
                atomic_write_bytes(path, buf.tobytes())
                pkl = out / "annotations" / "depthmaps" / f"subject_{subject}" / f"{frame:06d}" / f"depthmap{cam}.pkl"
                atomic_write_bytes(pkl, pickle.dumps(depth[n], protocol=2))
            valid = rng.uniform(size=hand_model.joint_num) >= drop_keypoints
            pts = out / "annotations" / "keypoints" / f"subject_{subject}" / f"keypoints{frame:04d}.pts"
            make_folder(pts.parent)
            write_pts(pts, joints, valid, hand_model.joint_names, score=1.0, num_views=cameras)
            for key, value in (("frame", frame), ("sequence", seq), ("euler", euler[0]), ("root", root),
                               ("joints", joints), ("vertices", verts)):
                record[key].append(value)
            bar.update(1)
    bar.close()
    gt = out / "gt"
    atomic_write_npz(gt / "identity.npz", skeleton_offset=skeleton_offset, id_corrective=id_corrective)
    atomic_write_npz(gt / "frames.npz", **{k: np.asarray(v) for k, v in record.items()})
    meta = {"seed": seed, "subject": subject, "sequences": seq_names, "frames_per_sequence": frames,
            "cameras": list(cams), "original_img_shape": list(original_img_shape),
            "image_hw": list(image_hw), "depth_hw": list(depth_hw),
            "hand_model": hand_model.source, "drop_keypoints": drop_keypoints,
            "skeleton_mm": skeleton_mm, "identity_mm": identity_mm}
    atomic_write_bytes(gt / "meta.json", json.dumps(meta, indent=2).encode())
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the data set into")
    parser.add_argument("--hand_model", help="hand-model folder (default: data/hand_model or the default hand)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequences", type=int, default=2, help="RT sequences")
    parser.add_argument("--frames", type=int, default=3, help="frames per sequence")
    parser.add_argument("--cameras", type=int, default=6)
    parser.add_argument("--image_size", type=parse_hw, default=ORIGINAL_IMG_SHAPE,
                        help="HxW of the stored images (default 512x334, the released images')")
    parser.add_argument("--depth_size", type=parse_hw, default=ORIGINAL_IMG_SHAPE,
                        help="HxW of the stored depth maps (default 512x334)")
    parser.add_argument("--original_img_shape", type=parse_hw, default=ORIGINAL_IMG_SHAPE,
                        help="HxW of the cameras' pixel space, that of KRT_512 (default 512x334)")
    parser.add_argument("--subject", type=int, default=4)
    parser.add_argument("--drop_keypoints", type=float, default=0.05,
                        help="probability that a keypoint is missing from a .pts file")
    parser.add_argument("--skeleton_mm", type=float, default=3.0,
                        help="largest change of a bone's length in the person's skeleton (mm)")
    parser.add_argument("--identity_mm", type=float, default=3.0,
                        help="largest displacement of the person's identity corrective along the normals (mm)")
    args = parser.parse_args(argv)
    for name in ("skeleton_mm", "identity_mm", "drop_keypoints"):
        if not math.isfinite(getattr(args, name)) or getattr(args, name) < 0:
            parser.error(f"--{name} must be a finite number >= 0")
    if args.drop_keypoints >= 1:
        parser.error("--drop_keypoints must be below 1")
    for name in ("sequences", "frames", "cameras"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return exit_code(lambda: make_set(args))


def make_set(args) -> None:
    hand = resolve_hand_model(args.hand_model)
    meta = generate(Path(args.out), hand, args.seed, args.sequences, args.frames, args.cameras,
                    args.image_size, args.depth_size, args.subject, args.drop_keypoints,
                    skeleton_mm=args.skeleton_mm, identity_mm=args.identity_mm,
                    original_img_shape=args.original_img_shape)
    print(f"wrote {args.sequences * args.frames} frames × {args.cameras} cameras to {args.out} "
          f"(ground truth in {Path(args.out) / 'gt'}; seed {meta['seed']})")


if __name__ == "__main__":
    sys.exit(main())
