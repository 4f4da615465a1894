"""Data reading as the original does it: the cameras' 512 x 334 pixel space whatever the files'
sizes, the input crop and the render affine of ``data/dataset.py`` / ``common/utils/preprocessing.py``.

``original_*`` below transcribe the original's functions (``get_bbox``, the clipping in
``__getitem__``, ``generate_patch_image``, ``gen_trans_from_patch_cv``) one step at a time, with
numpy scalars and arrays in the same dtypes. The data set stores its images at 256 x 167 and its
depth maps at two other resolutions (128 x 84 for some cameras, 512 x 334 for the others), so
that every rescaling is exercised.
"""

import cv2
import numpy as np
import pytest
import torch

from common.renderer.depth_renderer import DepthRenderer
from common.io.safe_pickle import load_depthmap
from data.dataset import DeepHandMeshDataset
from data.make_synthetic import generate
from tests.test_train import run_script

ORIGINAL = (512, 334)
IMAGE_HW = (256, 167)
DEPTH_SIZES = ((128, 84), (512, 334))
INPUT, RENDER = (64, 64), (32, 32)


# ------------------------------------------------------------------------- the original's steps
def original_bbox(joint_world, joint_valid, camrot, campos, focal, princpt):
    """``get_bbox``: project each joint (world2cam, cam2pixel with +1e-8), keep the valid ones,
    enlarge their extent 1.5x about its centre; float32."""
    cam = np.array([np.dot(camrot, joint_world[i] - campos) for i in range(len(joint_world))]).reshape(-1, 3)
    x = cam[..., 0] / (cam[..., 2] + 1e-8) * focal[0] + princpt[0]
    y = cam[..., 1] / (cam[..., 2] + 1e-8) * focal[1] + princpt[1]
    x, y = x[joint_valid == 1], y[joint_valid == 1]
    xmin, ymin, xmax, ymax = min(x), min(y), max(x), max(y)
    xc, width = (xmin + xmax) / 2., xmax - xmin
    yc, height = (ymin + ymax) / 2., ymax - ymin
    return np.array([xc - 0.5 * width * 1.5, yc - 0.5 * height * 1.5,
                     xc + 0.5 * width * 1.5, yc + 0.5 * height * 1.5]).astype(np.float32)


def original_clip(bbox):
    xmin, ymin, xmax, ymax = bbox
    xmin = max(xmin, 0)
    ymin = max(ymin, 0)
    xmax = min(xmax, ORIGINAL[1] - 1)
    ymax = min(ymax, ORIGINAL[0] - 1)
    return np.array([xmin, ymin, xmax, ymax])


def original_trans(c_x, c_y, src_w, src_h, dst_w, dst_h):
    """``gen_trans_from_patch_cv`` with scale 1 and no rotation."""
    centre = np.array([c_x, c_y], dtype=np.float32)
    down = np.array([0, src_h * 0.5], dtype=np.float32)
    right = np.array([src_w * 0.5, 0], dtype=np.float32)
    src = np.zeros((3, 2), dtype=np.float32)
    src[0], src[1], src[2] = centre, centre + down, centre + right
    dst_centre = np.array([dst_w * 0.5, dst_h * 0.5], dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0] = dst_centre
    dst[1] = dst_centre + np.array([0, dst_h * 0.5], dtype=np.float32)
    dst[2] = dst_centre + np.array([dst_w * 0.5, 0], dtype=np.float32)
    return cv2.getAffineTransform(np.float32(src), np.float32(dst))


def original_input_crop(img_0_255, bbox, out_shape):
    """The input image of ``__getitem__``: the clipped box scaled to the image, then
    ``generate_patch_image`` (bilinear ``warpAffine``), then /255."""
    xmin, ymin, xmax, ymax = bbox
    xmin, xmax = np.array([xmin, xmax]) / ORIGINAL[1] * img_0_255.shape[1]
    ymin, ymax = np.array([ymin, ymax]) / ORIGINAL[0] * img_0_255.shape[0]
    box = np.array([xmin, ymin, xmax - xmin + 1, ymax - ymin + 1])
    c_x, c_y = float(box[0] + 0.5 * box[2]), float(box[1] + 0.5 * box[3])
    trans = original_trans(c_x, c_y, float(box[2]), float(box[3]), out_shape[1], out_shape[0])
    patch = cv2.warpAffine(img_0_255.copy(), trans, (int(out_shape[1]), int(out_shape[0])), flags=cv2.INTER_LINEAR)
    return torch.from_numpy(patch.astype(np.float32).transpose(2, 0, 1)) / 255.


def original_render_affine(bbox, out_shape):
    xmin, ymin, xmax, ymax = bbox
    return original_trans((xmin + xmax + 1) / 2., (ymin + ymax + 1) / 2., xmax - xmin + 1, ymax - ymin + 1,
                          out_shape[1], out_shape[0]).astype(np.float32)


# ----------------------------------------------------------------------------------- the data
@pytest.fixture(scope="module", params=["default", "makehuman"])
def mixed_set(request, tmp_path_factory):
    """1 sequence x 3 frames x 4 cameras: images at 256 x 167, depth maps of cameras 0 and 2 at
    128 x 84 (generated so) and of cameras 1 and 3 at 512 x 334 (generated at that size)."""
    hand = request.getfixturevalue("default_hand" if request.param == "default" else "makehuman")
    root = tmp_path_factory.mktemp(f"mixed_{request.param}")
    generate(root, hand, seed=2, sequences=1, frames=3, cameras=4, image_hw=IMAGE_HW, depth_hw=DEPTH_SIZES[0],
             progress=False)
    full = tmp_path_factory.mktemp(f"mixed_full_{request.param}")
    generate(full, hand, seed=2, sequences=1, frames=3, cameras=4, image_hw=IMAGE_HW, depth_hw=DEPTH_SIZES[1],
             progress=False)
    depth_root = root / "annotations" / "depthmaps" / "subject_4"
    cams = sorted(p.name[len("depthmap"):-4] for p in (depth_root / "000000").iterdir())
    for frame_dir in depth_root.iterdir():
        for cam in cams[1::2]:
            name = f"depthmap{cam}.pkl"
            (frame_dir / name).write_bytes((full / "annotations" / "depthmaps" / "subject_4" / frame_dir.name / name)
                                           .read_bytes())
    return root, hand


def reader(root, hand, **kw):
    args = dict(subject=4, mode="test", joint_names=hand.joint_names, input_img_shape=INPUT,
                rendered_img_shape=RENDER, render_view_num=4, on_error="stop", seed=0)
    args.update(kw)
    return DeepHandMeshDataset(root, **args)


def test_depth_maps_are_stored_at_two_resolutions(mixed_set):
    root, _ = mixed_set
    shapes = {load_depthmap(p).shape for p in (root / "annotations" / "depthmaps").rglob("*.pkl")}
    assert shapes == set(DEPTH_SIZES)


def test_input_crops_and_render_affines_equal_the_originals(mixed_set):
    root, hand = mixed_set
    ds = reader(root, hand)
    assert len(ds) == 12
    for idx in range(len(ds)):
        item = ds[idx]  # on_error='stop': every sample is read
        world, valid = item["joint_world"].numpy(), item["joint_valid"].numpy()
        c = ds.cameras.index(item["cam"])
        bbox = original_clip(original_bbox(world, valid, ds.camrot[c], ds.campos[c], ds.focal[c], ds.princpt[c]))
        img = cv2.imread(str(ds.image_path(idx)), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        img = img[:, :, ::-1].copy().astype(np.float32)
        assert img.shape[:2] == IMAGE_HW
        assert torch.equal(item["img"], original_input_crop(img, bbox, INPUT)), idx
        for k, v in enumerate(item["view_cam_idx"].tolist()):
            box_v = original_clip(original_bbox(world, valid, ds.camrot[v], ds.campos[v], ds.focal[v],
                                                ds.princpt[v]))
            assert np.array_equal(item["affine"][k].numpy(), original_render_affine(box_v, RENDER)), (idx, k)


def test_a_box_clipped_by_the_image_edge_is_the_originals(mixed_set):
    """Clipping switches the box to float64 in the original (Python max of float32 and 0); the
    crop follows the same arithmetic, so it is equal there too."""
    root, hand = mixed_set
    ds = reader(root, hand)
    item = ds[0]
    world, valid = item["joint_world"].numpy().copy(), item["joint_valid"].numpy()
    c = ds.cameras.index(item["cam"])
    # Move the hand towards the image's left edge: project, then push the world points sideways.
    world = world - ds.camrot[c][0] * np.float32(100.0)
    raw = original_bbox(world, valid, ds.camrot[c], ds.campos[c], ds.focal[c], ds.princpt[c])
    assert raw[0] < 0 < raw[2], raw
    ours = ds.sample_box(world, valid, c)
    theirs = original_clip(raw)
    assert ours.dtype == theirs.dtype == np.float64 and np.array_equal(ours, theirs)
    from data.dataset import image_affine, render_affine
    assert np.array_equal(render_affine(ours, RENDER), original_render_affine(theirs, RENDER))
    img = np.random.default_rng(0).uniform(0, 255, IMAGE_HW + (3,)).astype(np.float32)
    from data.dataset import warp
    crop = warp(img, image_affine(ours, ORIGINAL, IMAGE_HW, INPUT), INPUT, nearest=False) / np.float32(255)
    assert torch.equal(torch.from_numpy(crop.transpose(2, 0, 1)), original_input_crop(img, theirs, INPUT))


def test_depth_targets_are_registered_with_the_rendering(mixed_set):
    """At either stored resolution, the target crop and the ground-truth mesh rendered through the
    sample's camera and affine cover the same pixels and agree in depth."""
    root, hand = mixed_set
    ds = reader(root, hand, rendered_img_shape=(64, 64))
    gt = np.load(root / "gt" / "frames.npz")
    renderer = DepthRenderer(torch.as_tensor(hand.faces), (64, 64))
    checked = set()
    for idx in range(0, len(ds), 4):
        item = ds[idx]
        verts = torch.from_numpy(gt["vertices"][list(gt["frame"]).index(item["frame"])]).float()[None]
        cams = {k: item[k][None] for k in ("camrot", "campos", "focal", "princpt", "affine")}
        rendered = renderer(verts, **cams)[0]
        for k, v in enumerate(item["view_cam_idx"].tolist()):
            target = item["depthmap"][k]
            shape = load_depthmap(ds.depthmap_path(item["frame"], ds.cameras[v])).shape
            checked.add(shape)
            a, b = rendered[k] > 0, target > 0
            iou = float((a & b).sum() / (a | b).sum())
            both = a & b
            depth_err = float((rendered[k][both] - target[both]).abs().median())
            # 128 x 84 maps are coarser than the 64 x 64 crop of the hand: the silhouette moves by
            # about a source pixel; 512 x 334 maps are finer than the crop.
            assert iou > (0.97 if shape == (512, 334) else 0.85), (shape, iou)
            assert depth_err < (0.5 if shape == (512, 334) else 2.0), (shape, depth_err)
            ya, xa = torch.nonzero(a, as_tuple=True)
            yb, xb = torch.nonzero(b, as_tuple=True)
            shift = max(abs(float(xa.float().mean() - xb.float().mean())), abs(float(ya.float().mean() - yb.float().mean())))
            assert shift < 0.3, (shape, shift)  # registered: no systematic offset
    assert checked == set(DEPTH_SIZES)


def test_train_and_test_read_every_sample(mixed_set, tmp_path):
    root, hand = mixed_set
    if hand.source != "<deephandmesh_default_right>":
        pytest.skip("one hand is enough for the scripts; the reader is checked on both above")
    args = ["--data_dir", str(root)]
    for item in ("resnet_type=18", "input_img_shape=[32,32]", "rendered_img_shape=[16,16]", "render_view_num=2",
                 "train_batch_size=4", "test_batch_size=4", "num_thread=0", f"output_dir={tmp_path}"):
        args += ["--set", item]
    result = run_script("train.py", "--gpu", "", "--end_epoch", "1", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (tmp_path / "log" / "train_logs.txt").read_text()
    assert "12 samples" in log and "0 sample(s) skipped" in log, log
    result = run_script("test.py", "--gpu", "", "--test_epoch", "0", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    import json
    metrics = json.loads(next(tmp_path.rglob("metrics.json")).read_text())
    assert metrics["skipped_samples"] == 0 and metrics["samples"] == 12, metrics
