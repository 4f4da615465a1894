"""The synthetic data set: deterministic, in the released layout, readable by the data reader,
and its depth maps agree with the ground-truth mesh rendered through the same cameras."""
import hashlib
import math
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from common.renderer.depth_renderer import DepthRenderer
from common.hand.hand_model import load_hand_model
from common.io.safe_pickle import load_depthmap
from data.dataset import DeepHandMeshDataset, read_krt, read_pts
from data.dataset import ORIGINAL_IMG_SHAPE, resample_affine
from data.make_synthetic import BulgeCorrective, generate, joint_limits
from tests.conftest import REPO

CAMERAS, FRAMES, SEQUENCES = 4, 2, 2
IMAGE_HW, DEPTH_HW = (256, 167), (128, 84)  # both other than the cameras' 512 x 334


@pytest.fixture(scope="session")
def synth(tmp_path_factory, default_hand):
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, default_hand, seed=1, sequences=SEQUENCES, frames=FRAMES, cameras=CAMERAS,
             image_hw=IMAGE_HW, depth_hw=DEPTH_HW, progress=False)
    return out


def tree_digest(folder):
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_deterministic(tmp_path, default_hand):
    kwargs = dict(sequences=1, frames=1, cameras=2, image_hw=(48, 32), depth_hw=(24, 16), progress=False)
    generate(tmp_path / "a", default_hand, seed=5, **kwargs)
    generate(tmp_path / "b", default_hand, seed=5, **kwargs)
    generate(tmp_path / "c", default_hand, seed=6, **kwargs)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_layout(synth, default_hand):
    hand = load_hand_model(synth / "hand_model")
    assert np.array_equal(hand.vertices_cm, default_hand.vertices_cm)
    krt = read_krt(synth / "annotations" / "KRT_512")
    assert len(krt) == CAMERAS and all(name.startswith("40") for name in krt)
    frames = SEQUENCES * FRAMES
    for frame in range(frames):
        assert (synth / "annotations" / "keypoints" / "subject_4" / f"keypoints{frame:04d}.pts").is_file()
        for cam in krt:
            depth = load_depthmap(synth / "annotations" / "depthmaps" / "subject_4" / f"{frame:06d}" / f"depthmap{cam}.pkl")
            assert depth.shape == DEPTH_HW and depth.dtype == np.float32 and (depth > 0).any()
    images = sorted((synth / "images" / "subject_4").glob("*/cam*/image*.jpg"))
    assert len(images) == frames * CAMERAS
    assert all("RT" in p.parts[-3] for p in images)
    img = cv2.imread(str(images[0]))
    assert img.shape == IMAGE_HW + (3,)


def test_ground_truth(synth, default_hand):
    identity = np.load(synth / "gt" / "identity.npz")
    corrective = np.linalg.norm(identity["id_corrective"], axis=1)
    assert 2.5 < corrective.max() <= 3.0 + 1e-9  # "a few mm"
    assert np.abs(identity["skeleton_offset"]).max() > 1.0
    gt = np.load(synth / "gt" / "frames.npz")
    limits = joint_limits(default_hand)
    assert np.all(gt["euler"] >= limits[..., 0] - 1e-12) and np.all(gt["euler"] <= limits[..., 1] + 1e-12)
    # The keypoint files hold the ground-truth joints of the valid keypoints.
    for frame, joints in zip(gt["frame"], gt["joints"]):
        world, valid = read_pts(synth / "annotations" / "keypoints" / "subject_4" / f"keypoints{frame:04d}.pts",
                                default_hand.joint_names)
        assert valid[default_hand.joint_index("thumb0")] == 0
        assert np.abs(world[valid > 0] - joints[valid > 0]).max() < 1e-4
    # The hand lies inside the capture volume, about 600 mm from every camera.
    assert np.abs(gt["vertices"].mean(1)).max() < 45


def test_bulge_grows_with_flexion(default_hand):
    bulge = BulgeCorrective(default_hand)
    euler = np.zeros((3, default_hand.joint_num, 3))
    index2 = default_hand.joint_index("index2")
    euler[1, index2, 2], euler[2, index2, 2] = math.radians(45), math.radians(90)
    amount = np.linalg.norm(bulge(euler), axis=2).max(1)
    assert amount[0] == 0 and 0 < amount[1] < amount[2] <= 2.0 + 1e-9


def test_stored_depth_equals_full_frame_render(synth, default_hand):
    # The generator rasterises only the hand's window; the result must be the full frame's.
    gt = np.load(synth / "gt" / "frames.npz")
    krt = read_krt(synth / "annotations" / "KRT_512")
    names = list(krt)
    camrot = torch.tensor(np.stack([krt[c]["camrot"] for c in names]))[None]
    campos = torch.tensor(np.stack([krt[c]["campos"] for c in names]))[None]
    focal = torch.tensor(np.stack([krt[c]["focal"] for c in names]))[None]
    princpt = torch.tensor(np.stack([krt[c]["princpt"] for c in names]))[None]
    affine = torch.tensor(resample_affine(ORIGINAL_IMG_SHAPE, DEPTH_HW)).expand(1, len(names), 2, 3)
    renderer = DepthRenderer(torch.as_tensor(default_hand.faces), DEPTH_HW)
    for frame, verts in zip(gt["frame"], gt["vertices"]):
        full = renderer(torch.from_numpy(verts)[None], camrot, campos, focal, princpt, affine)[0].numpy()
        for n, cam in enumerate(names):
            stored = load_depthmap(synth / "annotations" / "depthmaps" / "subject_4" / f"{frame:06d}" / f"depthmap{cam}.pkl")
            both = (stored > 0) & (full[n] > 0)
            assert both.sum() / ((stored > 0) | (full[n] > 0)).sum() > 0.995
            assert np.abs(stored - full[n])[both].max() < 0.01


def test_reader_crops_agree_with_rendered_ground_truth(synth, default_hand):
    dataset = DeepHandMeshDataset(synth, mode="test", joint_names=default_hand.joint_names,
                                  input_img_shape=(64, 64), rendered_img_shape=(64, 64), render_view_num=3)
    assert len(dataset) == SEQUENCES * FRAMES * CAMERAS
    gt = np.load(synth / "gt" / "frames.npz")
    renderer = DepthRenderer(torch.as_tensor(default_hand.faces), (64, 64))
    for index in range(0, len(dataset), 3):
        sample = dataset[index]
        verts = torch.from_numpy(gt["vertices"][list(gt["frame"]).index(sample["frame"])])[None]
        cams = [sample[k][None].double() for k in ("camrot", "campos", "focal", "princpt", "affine")]
        rendered = renderer(verts, *cams)[0].numpy()
        target = sample["depthmap"].numpy()
        both = (rendered > 0) & (target > 0)
        # Nearest-neighbour resampling of the stored maps moves depth by at most half a source
        # pixel along the surface: a fraction of a mm inside, more only at occlusion edges.
        assert both.sum() / ((rendered > 0) | (target > 0)).sum() > 0.9
        diff = np.abs(rendered - target)[both]
        assert np.median(diff) < 1.0 and np.percentile(diff, 90) < 3.0


def test_cli_and_show_sample(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "data" / "make_synthetic.py"), "--out", str(tmp_path / "s"),
                             "--sequences", "1", "--frames", "1", "--cameras", "3", "--image_size", "64x42",
                             "--depth_size", "32x21"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "s" / "gt" / "meta.json").is_file()
    show = [sys.executable, str(REPO / "data" / "show_sample.py"), "--data", str(tmp_path / "s"), "--views", "3",
            "--size", "32"]
    result = subprocess.run(show + ["--index", "1", "--out", str(tmp_path / "v.png")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    img = cv2.imread(str(tmp_path / "v.png"))
    # The input crop on top, then per view: target, rendered ground truth, difference.
    assert img.shape == (4 * 64, 3 * 64, 3)
    result = subprocess.run(show + ["--index", "99", "--out", str(tmp_path / "w.png")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and "has 3 samples" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, str(REPO / "data" / "make_synthetic.py"), "--out", str(tmp_path / "x"),
                             "--image_size", "12"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "expected HxW" in result.stderr
