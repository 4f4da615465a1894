"""The data-set reader on a tiny hand-made data folder (docs/design.md, "Data set files").

The folder has 2 usable RT sequences, an RT ROM one and an LT one; three colour cameras (``40..``)
and one other; 64x48 images with a bright blob where a known keypoint projects, and depth maps
at 40x36 (another resolution, another aspect) with a disc of depth 500 mm at the same point.
"""
import logging
import pickle

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.hand.default_hand import JOINT_NAMES
from data.dataset import (
    PTS_JOINT_NAMES,
    DataFormatError,
    DeepHandMeshDataset,
    SampleError,
    read_krt,
    read_pts,
    read_pts_raw,
    write_krt,
    write_pts,
)
from main.config import Config

IMG_H, IMG_W = 64, 48
DEPTH_H, DEPTH_W = 40, 36
INPUT_SHAPE = (32, 32)
RENDER_SHAPE = (24, 20)
MARKER_PTS = PTS_JOINT_NAMES.index("middle1")  # keypoint painted into images and depth maps
MARKER_DEPTH = 500.0
MARKER_RGB = (255, 200, 100)  # a Gaussian blob of this colour; distinct channels check RGB order
SEQUENCES = {"RT_fist": (1, 2), "RT_open": (3, 4), "RT_ROM_01": (5,), "LT_fist": (6,)}
USED = ["RT_fist", "RT_open"]
COLOUR = ["400100", "400200", "400300"]


def look_at(campos, up=(0.0, -1.0, 0.0)):
    z = -np.asarray(campos, float)
    z /= np.linalg.norm(z)
    y = -(np.asarray(up) - np.dot(up, z) * z)
    y /= np.linalg.norm(y)
    R = np.stack([np.cross(y, z), y, z])
    return R, -R @ np.asarray(campos, float)


def make_cameras():
    cams = {}
    for name, pos, (cx, cy) in [("400100", (0, 0, -300), (23.5, 31.5)),
                                ("510000", (300, 0, 0), (23.5, 31.5)),  # not a colour camera
                                ("400200", (200, -50, -220), (22.0, 30.0)),
                                ("400300", (-150, 60, -250), (6.0, 33.0))]:  # box clipped left
        R, t = look_at(pos)
        K = np.array([[80.0, 0, cx], [0, 82.0, cy], [0, 0, 1]])
        cams[name] = {"K": K, "R": R, "t": t, "dist": np.array([0.01, -0.02, 0.0, 0.0, 0.001])}
    return cams


def keypoints_of(frame):
    rng = np.random.default_rng(frame)
    pts = rng.uniform(-22, 22, size=(21, 3))
    pts[MARKER_PTS] = (6.0 + frame, -4.0, 3.0)
    return pts


def pixel(cam, X):
    x = cam["K"] @ (cam["R"] @ np.asarray(X, float) + cam["t"])
    return x[:2] / x[2]


def hand_box(cam, pts):
    """The crop box computed by hand: 1.5x the projected keypoints' box, clipped to the pixel
    centres of the image (the original's convention)."""
    uv = np.array([pixel(cam, p) for p in pts])
    lo, hi = uv.min(0), uv.max(0)
    c, half = (lo + hi) / 2, (hi - lo) * 0.75
    return np.array([max(c[0] - half[0], 0), max(c[1] - half[1], 0),
                     min(c[0] + half[0], IMG_W - 1), min(c[1] + half[1], IMG_H - 1)])


def make_data(root):
    cams = make_cameras()
    ann = root / "annotations"
    (ann / "keypoints" / "subject_4").mkdir(parents=True)
    write_krt(ann / "KRT_512", cams)
    yy, xx = np.mgrid[0:IMG_H, 0:IMG_W]
    dy, dx = np.mgrid[0:DEPTH_H, 0:DEPTH_W]
    for seq, frames in SEQUENCES.items():
        ext = ".jpg" if seq == "RT_open" else ".png"
        for frame in frames:
            pts = keypoints_of(frame)
            lines = [f"{k} {x} {y} {z} 0.9 5" for k, (x, y, z) in enumerate(pts)
                     if not (frame == 2 and k == PTS_JOINT_NAMES.index("index3"))]
            lines.append("25 1.0 2.0 3.0 0.5 3")  # a left-hand keypoint: ignored
            (ann / "keypoints" / "subject_4" / f"keypoints{frame:04d}.pts").write_text(
                "\n".join(lines) + "\n")
            ddir = ann / "depthmaps" / "subject_4" / f"{frame:06d}"
            ddir.mkdir(parents=True)
            for name, cam in cams.items():
                u, v = pixel(cam, pts[MARKER_PTS])
                assert 3 < u < IMG_W - 4 and 3 < v < IMG_H - 4
                blob = np.exp(-((xx - u) ** 2 + (yy - v) ** 2) / (2 * 1.2 ** 2))
                img = np.round(blob[..., None] * MARKER_RGB).astype(np.uint8)
                cam_dir = root / "images" / "subject_4" / seq / f"cam{name}"
                cam_dir.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(cam_dir / f"image{frame:04d}{ext}"), img[:, :, ::-1])
                # depth raster: centre-aligned rescale of the image's pixel space
                ru, rv = (u + 0.5) * DEPTH_W / IMG_W - 0.5, (v + 0.5) * DEPTH_H / IMG_H - 0.5
                depth = np.where((dx - ru) ** 2 + (dy - rv) ** 2 <= 2.5 ** 2, MARKER_DEPTH, 0.0)
                (ddir / f"depthmap{name}.pkl").write_bytes(pickle.dumps(depth.astype(np.float32)))
    (root / "images" / "subject_4" / "RT_notes.txt").write_text("not a sequence")
    (root / "images" / "subject_4" / "RT_fist" / "cam400100" / "notes.txt").write_text("x")
    return cams


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dhm")
    cams = make_data(root)
    return root, cams


@pytest.fixture
def fresh_data(tmp_path):
    make_data(tmp_path)
    return tmp_path


def dataset(root, **kw):
    args = dict(data_dir=root, subject=4, mode="train", joint_names=JOINT_NAMES,
                input_img_shape=INPUT_SHAPE, rendered_img_shape=RENDER_SHAPE, render_view_num=2,
                on_error="stop", seed=0, original_img_shape=(IMG_H, IMG_W))
    args.update(kw)
    return DeepHandMeshDataset(**args)


def bright_centroid(img):
    w = np.clip(img - 0.05, 0, None)
    ys, xs = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()


def apply(affine, uv):
    return np.asarray(affine, float) @ np.append(uv, 1.0)


# ------------------------------------------------------------------------------------ files
def test_krt_round_trip_and_derived_values(tmp_path):
    cams = make_cameras()
    write_krt(tmp_path / "KRT", cams)
    back = read_krt(tmp_path / "KRT")
    assert list(back) == list(cams)
    for name, cam in cams.items():
        for key in ("K", "R", "t", "dist"):
            assert np.array_equal(back[name][key], cam[key]), key
        np.testing.assert_allclose(back[name]["campos"], -cam["R"].T @ cam["t"])
        assert np.array_equal(back[name]["camrot"], cam["R"])
        assert np.array_equal(back[name]["focal"], cam["K"][[0, 1], [0, 1]])
        assert np.array_equal(back[name]["princpt"], cam["K"][:2, 2])
    write_krt(tmp_path / "KRT2", back)
    assert (tmp_path / "KRT2").read_bytes() == (tmp_path / "KRT").read_bytes()


def test_krt_errors_name_file_and_line(tmp_path):
    path = tmp_path / "KRT"
    write_krt(path, make_cameras())
    text = path.read_text().splitlines()
    bad = list(text)
    bad[14] = "1 0 0"  # row 1 of [R|t] of the second camera
    path.write_text("\n".join(bad))
    with pytest.raises(DataFormatError, match=r"KRT:15: camera '510000': row 1 of \[R\|t\] needs 4"):
        read_krt(path)
    path.write_text("\n".join(text[:4]))
    with pytest.raises(DataFormatError, match=r"KRT:4: camera '400100' \(line 1\) ends early"):
        read_krt(path)
    bad = list(text)
    bad[2] = "0 eighty 31.5"
    path.write_text("\n".join(bad))
    with pytest.raises(DataFormatError, match=r"KRT:3: .* row 2 of K must be numbers"):
        read_krt(path)


def test_pts_reader_validity_and_round_trip(data, tmp_path):
    root, _ = data
    path = root / "annotations" / "keypoints" / "subject_4" / "keypoints0002.pts"
    world, valid = read_pts(path, JOINT_NAMES)
    assert world.shape == (22, 3) and world.dtype == np.float32 and valid.shape == (22,)
    invalid = {JOINT_NAMES[j] for j in np.flatnonzero(valid == 0)}
    assert invalid == {"b_r_thumb0", "b_r_index3"}  # thumb0: no keypoint; index3: not in the file
    pts = keypoints_of(2)
    for k, name in enumerate(PTS_JOINT_NAMES):
        if name != "index3":
            np.testing.assert_allclose(world[JOINT_NAMES.index("b_r_" + name)], pts[k], rtol=1e-6)
    assert len(read_pts_raw(path)) == 21  # 20 right-hand + 1 left-hand
    write_pts(tmp_path / "k.pts", world, valid, JOINT_NAMES)
    world2, valid2 = read_pts(tmp_path / "k.pts", JOINT_NAMES)
    assert np.array_equal(world, world2) and np.array_equal(valid, valid2)

    (tmp_path / "bad.pts").write_text("0 1 2 3 1 1\n1 1 2 3 1\n")
    with pytest.raises(DataFormatError, match=r"bad\.pts:2: expected 'idx x y z score num_views'"):
        read_pts(tmp_path / "bad.pts", JOINT_NAMES)
    with pytest.raises(ValueError, match="b_r_index1"):
        read_pts(path, [n for n in JOINT_NAMES if n != "b_r_index1"])


# --------------------------------------------------------------------------------- selection
def test_selection_of_sequences_cameras_frames(data):
    root, _ = data
    ds = dataset(root)
    assert ds.sequences == USED
    assert ds.cameras == COLOUR
    expected = [(s, c, f) for s in USED for c in COLOUR for f in SEQUENCES[s]]
    assert ds.samples == expected and len(ds) == 12
    # a held-out sequence splits the set
    train = dataset(root, holdout_sequences=["RT_open"])
    test = dataset(root, mode="test", holdout_sequences=["RT_open"])
    assert {s for s, _, _ in train.samples} == {"RT_fist"}
    assert {s for s, _, _ in test.samples} == {"RT_open"}
    with pytest.raises(ValueError, match="RT_ROM_01"):
        dataset(root, holdout_sequences=["RT_ROM_01"])
    with pytest.raises(ValueError, match="only 3 colour camera"):
        dataset(root, render_view_num=4)


def test_from_config(data, default_hand):
    root, _ = data
    cfg = Config()
    cfg.data_dir = str(root)
    cfg.render_view_num = 3
    cfg.input_img_shape = INPUT_SHAPE
    ds = DeepHandMeshDataset.from_config(cfg, "test", default_hand, rendered_img_shape=RENDER_SHAPE)
    item = ds[0]
    assert item["img"].shape == (3, *INPUT_SHAPE) and item["depthmap"].shape == (3, *RENDER_SHAPE)


# ---------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("idx", range(12))
def test_input_box_affine_and_image(data, idx):
    root, cams = data
    ds = dataset(root)
    seq, cam_name, frame = ds.samples[idx]
    cam = cams[cam_name]
    pts = keypoints_of(frame)
    keep = [k for k in range(21) if not (frame == 2 and PTS_JOINT_NAMES[k] == "index3")]
    box = hand_box(cam, pts[keep])
    world, valid = read_pts(ds.keypoint_path(frame), JOINT_NAMES)
    got = ds.sample_box(world, valid, ds.cameras.index(cam_name))
    np.testing.assert_allclose(got, box, atol=2e-3)
    if cam_name == "400300":
        assert box[0] == 0  # clipped at the image's left edge

    item = ds[idx]
    # The box's corners are pixel centres: a patch of (x1 - x0 + 1) pixels centred on (x0 + x1 + 1) / 2.
    H, W = INPUT_SHAPE
    sx, sy = W / (box[2] - box[0] + 1), H / (box[3] - box[1] + 1)
    hand_affine = [[sx, 0, W / 2 - sx * (box[0] + box[2] + 1) / 2],
                   [0, sy, H / 2 - sy * (box[1] + box[3] + 1) / 2]]
    np.testing.assert_allclose(item["img_affine"].numpy(), hand_affine, rtol=1e-4, atol=1e-3)
    img = item["img"].numpy()
    # [0, 1] up to float rounding: OpenCV 5.1's bilinear warp of a 0-255 float picture can give
    # -1e-18 next to black pixels (5.0 gives exactly 0).
    assert img.dtype == np.float32 and -1e-6 <= img.min() and img.max() <= 1 + 1e-6
    assert 0.3 < img.max()  # the hand is in the crop, not a black picture
    expected = apply(item["img_affine"], pixel(cam, pts[MARKER_PTS]))
    found = bright_centroid(img.mean(0))
    assert np.abs(found - expected).max() < 0.25, (found, expected)
    y, x = np.unravel_index(img.mean(0).argmax(), img.shape[1:])
    r, g, b = img[:, y, x]
    assert r > g > b  # RGB, not OpenCV's BGR


def test_images_larger_than_the_camera_pixel_space(fresh_data, data):
    """``original_img_shape`` declares K's pixel space; a 2x image is read in it."""
    root, cams = fresh_data, data[1]
    for path in (root / "images/subject_4/RT_fist/cam400200").iterdir():
        img = cv2.imread(str(path))
        cv2.imwrite(str(path), cv2.resize(img, (2 * IMG_W, 2 * IMG_H), interpolation=cv2.INTER_LINEAR))
    ds = dataset(root)
    for idx in (2, 3):
        seq, cam_name, frame = ds.samples[idx]
        assert cam_name == "400200"
        item = ds[idx]
        expected = apply(item["img_affine"], pixel(cams[cam_name], keypoints_of(frame)[MARKER_PTS]))
        found = bright_centroid(item["img"].numpy().mean(0))
        assert np.abs(found - expected).max() < 0.25, (found, expected)


def test_depth_targets_land_where_the_affine_says(data):
    root, cams = data
    ds = dataset(root, render_view_num=3)
    for idx in range(len(ds)):
        item = ds[idx]
        frame = item["frame"]
        marker = keypoints_of(frame)[MARKER_PTS]
        for k, v in enumerate(item["view_cam_idx"].tolist()):
            cam = cams[ds.cameras[v]]
            np.testing.assert_allclose(item["camrot"][k].numpy(), cam["R"], atol=1e-6)
            np.testing.assert_allclose(item["campos"][k].numpy(), -cam["R"].T @ cam["t"], atol=1e-4)
            np.testing.assert_allclose(item["focal"][k].numpy(), cam["K"][[0, 1], [0, 1]])
            np.testing.assert_allclose(item["princpt"][k].numpy(), cam["K"][:2, 2])
            depth = item["depthmap"][k].numpy()
            assert set(np.unique(depth)) <= {0.0, MARKER_DEPTH}  # nearest: no invented depths
            expected = apply(item["affine"][k], pixel(cam, marker))
            ys, xs = np.nonzero(depth)
            assert len(xs) > 4
            found = np.array([xs.mean(), ys.mean()])
            assert np.abs(found - expected).max() < 1.0, (ds.cameras[v], found, expected)


def test_depth_warp_picks_the_right_raster_pixel(tmp_path):
    """Every crop pixel of a coordinate-coded depth map comes from the raster pixel nearest to
    where the inverse affine sends it (centre-aligned rescale between the resolutions)."""
    from data.dataset import raster_affine, render_affine, warp

    kspace, raster, out = (64, 48), (40, 36), (24, 20)
    rr, cc = np.mgrid[0:raster[0], 0:raster[1]]
    coded = (1 + cc + 100 * rr).astype(np.float32)
    affine = render_affine(np.array([5.3, 7.9, 40.2, 50.6]), out).astype(np.float64)
    crop = warp(coded, raster_affine(affine, kspace, raster), out, nearest=True)
    inv = np.linalg.inv(np.vstack([affine, [0, 0, 1]]))
    ys, xs = np.mgrid[0:out[0], 0:out[1]]
    k = inv @ np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    rx = (k[0] + 0.5) * raster[1] / kspace[1] - 0.5
    ry = (k[1] + 0.5) * raster[0] / kspace[0] - 0.5
    code = crop.ravel()
    assert (code > 0).all()
    got_c, got_r = (code - 1) % 100, (code - 1) // 100
    assert np.abs(got_c - rx).max() <= 0.51 and np.abs(got_r - ry).max() <= 0.51


def test_warp_into_a_given_array():
    """``warp(out=...)`` fills the array it is given: a slice of the sample's depth array, or (where
    OpenCV would make a new array, another dtype) by a copy."""
    from data.dataset import warp

    rng = np.random.default_rng(0)
    src = rng.uniform(0, 900, (40, 30)).astype(np.float32)
    affine = np.array([[1.1, 0.1, -2.0], [0.05, 0.9, 1.0]])
    plain = warp(src, affine, (16, 12), nearest=True)
    stack = np.full((3, 16, 12), -1, np.float32)
    assert np.shares_memory(warp(src, affine, (16, 12), nearest=True, out=stack[1]), stack)
    assert np.array_equal(stack[1], plain) and (stack[[0, 2]] == -1).all()
    other = np.zeros((16, 12), np.float64)
    assert warp(src, affine, (16, 12), nearest=True, out=other) is other
    assert np.array_equal(other, plain)


# ----------------------------------------------------------------------------- batching, views
def test_shapes_dtypes_and_workers(data):
    root, _ = data
    ds = dataset(root)
    ds = pickle.loads(pickle.dumps(ds))  # no handles, no lambdas
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False, num_workers=2)))
    shapes = {"img": (4, 3, *INPUT_SHAPE), "img_affine": (4, 2, 3), "depthmap": (4, 2, *RENDER_SHAPE),
              "camrot": (4, 2, 3, 3), "campos": (4, 2, 3), "focal": (4, 2, 2), "princpt": (4, 2, 2),
              "affine": (4, 2, 2, 3), "view_cam_idx": (4, 2), "joint_world": (4, 22, 3),
              "joint_valid": (4, 22)}
    for key, shape in shapes.items():
        assert tuple(batch[key].shape) == shape, key
        assert batch[key].dtype == (torch.int64 if key == "view_cam_idx" else torch.float32), key
    assert batch["frame"].tolist() == [1, 2, 1, 2]
    assert batch["cam"] == ["400100", "400100", "400200", "400200"]
    assert batch["seq"] == ["RT_fist"] * 4
    valid = batch["joint_valid"]
    assert valid[:, JOINT_NAMES.index("b_r_thumb0")].eq(0).all()
    assert valid[:, JOINT_NAMES.index("b_r_index3")].tolist() == [1, 0, 1, 0]
    assert batch["joint_world"][valid == 0].eq(0).all()


def test_view_draws(data):
    root, _ = data
    test = dataset(root, mode="test", render_view_num=2, seed=None)
    views = [test.draw_views(i).tolist() for i in range(12)]
    assert views == [test.draw_views(i).tolist() for i in range(12)]
    assert all(len(set(v)) == 2 for v in views) and len({tuple(v) for v in views}) > 1
    train = dataset(root, render_view_num=2, seed=7)
    first = [train.draw_views(i).tolist() for i in range(12)]
    assert first == [train.draw_views(i).tolist() for i in range(12)]
    train.set_epoch(1)
    assert first != [train.draw_views(i).tolist() for i in range(12)]


def test_persistent_workers_draw_the_views_of_the_epoch_set(data):
    """set_epoch reaches DataLoader workers started before it (persistent workers, as training and
    testing use them): every epoch's batches hold the views drawn for that epoch."""
    root, _ = data
    train = dataset(root, render_view_num=2, seed=7)
    loader = DataLoader(train, batch_size=4, shuffle=False, num_workers=2, persistent_workers=True)
    seen = []
    for epoch in (0, 1, 2):
        train.set_epoch(epoch)
        got = torch.cat([batch["view_cam_idx"] for batch in loader]).tolist()
        assert got == [train.draw_views(i).tolist() for i in range(len(train))], epoch
        seen.append(got)
    assert seen[0] != seen[1] and seen[1] != seen[2]
    assert pickle.loads(pickle.dumps(train)).epoch == 2


def test_keypoint_file_changed_after_a_read_is_read_again(fresh_data):
    """The reader keeps what it parsed of each keypoint file, but only while the file says the
    same; the samples it returns are the caller's to change."""
    root = fresh_data
    ds = dataset(root)
    first = ds[0]
    expected = first["joint_world"].clone()
    first["joint_world"].add_(1000.0)
    assert torch.equal(ds[0]["joint_world"], expected)  # not the caller's changed copy
    path = ds.keypoint_path(int(first["frame"]))
    valid = first["joint_valid"].numpy() > 0
    moved = expected.numpy() + np.float32(2.0)
    write_pts(path, moved, valid, JOINT_NAMES)
    again = ds[0]
    assert torch.equal(again["joint_world"][again["joint_valid"] > 0], torch.from_numpy(moved[valid]))
    assert not torch.equal(again["affine"], first["affine"])  # the boxes follow the keypoints
    assert torch.equal(again["affine"], dataset(root)[0]["affine"])
    path.write_bytes(b"1 nan 2 3 1 1\n")  # broken since: the sample fails again, each time
    for _ in range(2):
        with pytest.raises(SampleError, match="non-finite"):
            ds[0]


# ------------------------------------------------------------------------------------ errors
def break_missing_depth(root):
    path = root / "annotations/depthmaps/subject_4/000002/depthmap400200.pkl"
    path.unlink()
    return path, "file not found", [1, 3, 5]


def break_corrupt_image(root):
    path = root / "images/subject_4/RT_fist/cam400200/image0001.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return path, "could not be decoded", [2]


def break_malicious_pickle(root):
    from tests.test_safe_pickle import RunsShell

    path = root / "annotations/depthmaps/subject_4/000003/depthmap400300.pkl"
    path.write_bytes(pickle.dumps(RunsShell(root / "pwned")))
    return path, "refused to load", [6, 8, 10]


def break_missing_keypoints(root):
    path = root / "annotations/keypoints/subject_4/keypoints0004.pts"
    path.unlink()
    return path, "file not found", [7, 9, 11]


BREAKS = [break_missing_depth, break_corrupt_image, break_malicious_pickle, break_missing_keypoints]


@pytest.mark.parametrize("breaker", BREAKS, ids=lambda f: f.__name__[6:])
def test_error_policies(fresh_data, breaker, caplog):
    root = fresh_data
    path, what, bad = breaker(root)
    stop = dataset(root, render_view_num=3, on_error="stop")
    for idx in range(len(stop)):
        if idx in bad:
            with pytest.raises(SampleError) as err:
                stop[idx]
            assert str(err.value).startswith(str(path)) and what in str(err.value)
            assert err.value.path == str(path)
        else:
            stop[idx]

    skip = dataset(root, render_view_num=3, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="data.dataset"):
        items = [skip[idx] for idx in range(len(skip))]
    for idx, item in enumerate(items):
        replacement = idx
        while replacement in bad:
            replacement = (replacement + 1) % len(skip)
        assert item["index"] == replacement  # deterministic: the next sample that loads
    assert skip.skipped == len(bad)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per file
    assert str(path) in warnings[0].getMessage()
    assert "(1 sample(s) skipped so far" in warnings[0].getMessage()
    assert not (root / "pwned").exists()


def test_skip_count_is_shared_by_workers(fresh_data):
    root = fresh_data
    _, _, bad = break_missing_depth(root)
    ds = dataset(root, render_view_num=3, on_error="skip")
    frames = []
    for batch in DataLoader(ds, batch_size=3, shuffle=False, num_workers=2):
        frames += batch["frame"].tolist()
    assert len(frames) == 12 and 2 not in frames
    assert ds.skipped == len(bad)


def test_dataset_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="subject_4"):
        dataset(tmp_path)
    make_data(tmp_path)
    (tmp_path / "annotations" / "KRT_512").write_text("400100\n1 0\n")
    with pytest.raises(DataFormatError, match=r"KRT_512:2: camera '400100': row 1 of K needs 3"):
        dataset(tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        dataset(tmp_path, on_error="ignore")
