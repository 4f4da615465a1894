"""One picture of one training sample, to see that crops, cameras and the renderer line up.

    python data/show_sample.py --data data/synthetic --index 0 --out output/vis/sample0.png

Top left: the input crop with the keypoints projected through the input camera and its affine.
Then one column per target view: the target depth map with the keypoints projected through that
view's camera and affine; below it, where the data set has ground truth (``gt/`` of a synthetic
set), the ground-truth mesh rendered through the same camera and affine, and the difference of
the two where both have depth (blue: rendered nearer, red: rendered farther, ±5 mm full scale).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.renderer.depth_renderer import DepthRenderer, project_points  # noqa: E402
from common.errors import OptionError, exit_code  # noqa: E402
from common.hand.hand_model import is_hand_model_folder, load_hand_model  # noqa: E402
from common.hand.hand_model_source import resolve_hand_model  # noqa: E402
from common.utils.vis import save_image  # noqa: E402
from data.dataset import ORIGINAL_IMG_SHAPE, DeepHandMeshDataset  # noqa: E402
from data.make_synthetic import parse_hw  # noqa: E402

DIFF_FULL_SCALE_MM = 5.0


def colour_depth(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Depth map (mm, 0 empty) → BGR, near bright; empty pixels black."""
    scaled = np.clip((hi - depth) / max(hi - lo, 1e-6), 0, 1)
    img = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)
    img[depth <= 0] = 0
    return img


def colour_difference(rendered: np.ndarray, target: np.ndarray) -> np.ndarray:
    both = (rendered > 0) & (target > 0)
    diff = np.clip((rendered - target) / DIFF_FULL_SCALE_MM, -1, 1)
    img = np.full(rendered.shape + (3,), 40, np.uint8)
    img[both] = 255
    img[..., 0][both] = (255 * (1 - np.clip(diff[both], 0, 1))).astype(np.uint8)  # blue kept when nearer
    img[..., 2][both] = (255 * (1 - np.clip(-diff[both], 0, 1))).astype(np.uint8)
    img[..., 1][both] = (255 * (1 - np.abs(diff[both]))).astype(np.uint8)
    return img


def draw_points(img: np.ndarray, uv: np.ndarray, valid: np.ndarray, scale: float) -> np.ndarray:
    for (u, v), ok in zip(uv, valid):
        if ok and np.isfinite(u) and np.isfinite(v):
            centre = (int(round((u + 0.5) * scale - 0.5)), int(round((v + 0.5) * scale - 0.5)))
            cv2.circle(img, centre, max(2, int(scale)), (40, 40, 230), -1, cv2.LINE_AA)
    return img


def label(img: np.ndarray, text: str) -> np.ndarray:
    cv2.putText(img, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def ground_truth_vertices(data_dir: Path, frame: int):
    path = data_dir / "gt" / "frames.npz"
    if not path.is_file():
        return None
    gt = np.load(path)
    hits = np.flatnonzero(gt["frame"] == frame)
    return None if len(hits) == 0 else gt["vertices"][hits[0]]


def show_sample(data_dir: Path, index: int, subject: int = 4, size: int = 128, views: int = 4,
                scale: float = 2.0, original_img_shape=ORIGINAL_IMG_SHAPE) -> np.ndarray:
    """The picture described in the module docstring, as a BGR uint8 image."""
    hand_dir = data_dir / "hand_model"
    hand = load_hand_model(hand_dir) if is_hand_model_folder(hand_dir) else resolve_hand_model()
    dataset = DeepHandMeshDataset(data_dir, subject=subject, mode="test", joint_names=hand.joint_names,
                                  input_img_shape=(size, size), rendered_img_shape=(size, size),
                                  render_view_num=views, original_img_shape=original_img_shape)
    if not 0 <= index < len(dataset):
        raise OptionError(f"--index {index}: the data set has {len(dataset)} samples (0..{len(dataset) - 1})")
    sample = dataset.load_sample(index)
    cams = {k: sample[k][None].double() for k in ("camrot", "campos", "focal", "princpt", "affine")}
    joints = sample["joint_world"][None].double()
    valid = sample["joint_valid"].numpy() > 0
    up = lambda img: cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)  # noqa: E731

    rgb = (sample["img"].numpy().transpose(1, 2, 0) * 255).astype(np.uint8)[..., ::-1].copy()
    cam_index = dataset.cameras.index(sample["cam"])
    own = {k: torch.from_numpy(np.asarray(getattr(dataset, k)[cam_index]))[None, None].double()
           for k in ("camrot", "campos", "focal", "princpt")}
    uv_in = project_points(joints, own["camrot"], own["campos"], own["focal"], own["princpt"],
                           sample["img_affine"][None, None].double())[0, 0, :, :2].numpy()
    tile_in = label(draw_points(up(rgb), uv_in, valid, scale), f"input cam {sample['cam']}")

    targets = sample["depthmap"].numpy()
    gt_verts = ground_truth_vertices(data_dir, int(sample["frame"]))
    rendered = None
    if gt_verts is not None:
        renderer = DepthRenderer(torch.as_tensor(hand.faces), (size, size))
        rendered = renderer(torch.from_numpy(gt_verts)[None], **cams)[0].numpy()
    present = targets[targets > 0]
    lo, hi = (present.min(), present.max()) if present.size else (0.0, 1.0)
    uv = project_points(joints, **cams)[0, ..., :2].numpy()
    columns = []
    for n, cam in enumerate(sample["view_cam_idx"].tolist()):
        tiles = [label(draw_points(up(colour_depth(targets[n], lo, hi)), uv[n], valid, scale),
                       f"target {dataset.cameras[cam]}")]
        if rendered is not None:
            tiles.append(label(up(colour_depth(rendered[n], lo, hi)), "gt mesh rendered"))
            tiles.append(label(up(colour_difference(rendered[n], targets[n])), "difference"))
        columns.append(np.concatenate(tiles, 0))
    grid = np.concatenate(columns, 1)
    top = np.zeros((tile_in.shape[0], grid.shape[1], 3), np.uint8)
    top[:, :tile_in.shape[1]] = tile_in
    return np.concatenate([top, grid], 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="data folder in the released layout")
    parser.add_argument("--index", type=int, default=0, help="sample index")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--subject", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="crop size of the input and the depth maps")
    parser.add_argument("--views", type=int, default=4, help="target views to show")
    parser.add_argument("--original_img_shape", type=parse_hw, default=ORIGINAL_IMG_SHAPE,
                        help="HxW of the cameras' pixel space (that of KRT_512; default 512x334)")
    args = parser.parse_args(argv)
    return exit_code(lambda: write_sample(args))


def write_sample(args) -> None:
    img = show_sample(Path(args.data), args.index, args.subject, args.size, args.views,
                      original_img_shape=args.original_img_shape)
    save_image(args.out, img)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
