"""demo/animate.py: rotations interpolated per joint, frames decoded in one batch and rendered as
render.png, an animation file that imageio reads back."""
import numpy as np
import pytest
import torch

from common.hand.kinematics import euler_to_matrix
from common.hand.pose_io import build_pose
from common.utils.vis import fit_views, render_mesh
from common.hand.hand_model_source import resolve_hand_model
from demo import animate, demo
from demo.pose_edit import euler_tensor, pose_degrees


def rotation(euler):
    return euler_to_matrix(torch.as_tensor(euler, dtype=torch.float64)).numpy()


def reference_slerp(R0, R1, t):
    """The rotation a fraction ``t`` of the way from R0 to R1 along the geodesic, via axis-angle."""
    D = R0.T @ R1
    angle = np.arccos(np.clip((np.trace(D) - 1) / 2, -1, 1))
    if angle < 1e-12:
        return R0
    axis = np.array([D[2, 1] - D[1, 2], D[0, 2] - D[2, 0], D[1, 0] - D[0, 1]]) / (2 * np.sin(angle))
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    a = t * angle
    return R0 @ (np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K)


def test_quaternion_matches_the_models_euler_convention():
    rng = np.random.default_rng(0)
    e = rng.uniform(-np.pi, np.pi, (50, 3))
    assert np.abs(animate.quaternion_to_matrix(animate.euler_to_quaternion(e)) - rotation(e)).max() < 1e-12
    near = e + rng.normal(0, 0.05, e.shape)
    back = animate.matrix_to_euler_near(rotation(e), near)
    assert np.abs(back - e).max() < 1e-9  # the solution nearest to a nearby guess is the original


def test_interpolation_on_rotations():
    rng = np.random.default_rng(1)
    keys = rng.uniform(-1.2, 1.2, (3, 5, 3))
    mask = np.ones((5, 3))
    mask[3] = [0, 0, 1]  # a joint that only flexes
    keys *= mask
    frames = animate.interpolate_poses(keys, mask, 4)
    assert frames.shape == (9, 5, 3)
    for index, key in ((0, 0), (4, 1), (8, 2)):
        assert np.array_equal(frames[index], keys[key])
    for i in range(9):
        k, t = divmod(i, 4)
        if t == 0:
            continue
        for j in range(5):
            expected = reference_slerp(rotation(keys[k, j]), rotation(keys[k + 1, j]), t / 4)
            assert np.abs(rotation(frames[i, j]) - expected).max() < 1e-9
    assert np.all(frames[:, 3, :2] == 0)  # no angle appears where the joint cannot turn
    # a single axis: plain linear interpolation of the angle
    assert np.allclose(frames[1:4, 3, 2], keys[0, 3, 2] + (keys[1, 3, 2] - keys[0, 3, 2]) * np.array([1, 2, 3]) / 4)


def test_interpolation_takes_the_short_way_round():
    keys = np.radians([[[170.0, 0, 0]], [[-170.0, 0, 0]]])
    frames = animate.interpolate_poses(keys, np.ones((1, 3)), 4)
    # raw Euler interpolation would sweep 340° through 0; the rotation passes through 180°
    angles = np.degrees(frames[:, 0, 0])
    assert np.allclose(angles, [170, 175, 180, 185, -170]), angles
    assert np.allclose(frames[:, 0, 1:], 0)


def test_frames_equal_the_demos_renders(default_hand):
    model = demo.get_model("test", default_hand)
    model.zero_correctives()
    model.eval()
    keys = np.stack([pose_degrees(default_hand, p) for p in ("open", "fist", "point")])
    frames = animate.render_frames(default_hand, model, torch.device("cpu"), keys, 3, views=("palm", "side"),
                                   image_size=96, progress=False)
    assert frames.shape == (7, 96, 192, 3) and frames.dtype == np.uint8
    # the frames at the key poses are the demo's picture of the demo's mesh of that pose (RGB)
    meshes = {}
    for pose in ("open", "fist", "point"):
        joints, verts = demo.decode_pose(model, build_pose(default_hand, pose), torch.device("cpu"))
        meshes[pose] = (joints[0], verts[0])
    euler = animate.interpolate_poses(euler_tensor(keys).double().numpy(), default_hand.dof_mask, 3)
    _, all_verts = demo.decode_pose(model, torch.from_numpy(euler).float(), torch.device("cpu"))
    fit = fit_views(all_verts, ("palm", "side"), 96)
    for index, pose in ((0, "open"), (3, "fist"), (6, "point")):
        joints, verts = meshes[pose]
        expected = render_mesh(verts, default_hand.faces, image_size=96, views=("palm", "side"), joints_mm=joints,
                               parents=default_hand.parents, fit=fit)[..., ::-1]
        assert np.array_equal(frames[index], expected), pose
    assert not np.array_equal(frames[1], frames[0]) and not np.array_equal(frames[1], frames[3])


def test_fit_views_is_render_meshs_own_framing(default_hand):
    verts = default_hand.vertices
    own = render_mesh(verts, default_hand.faces, image_size=64)
    assert np.array_equal(own, render_mesh(verts, default_hand.faces, image_size=64,
                                           fit=fit_views([verts], image_size=64)))


def test_cli_gif_and_mp4(tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "a.gif"
    code = animate.main(["--poses", "open", "fist", "ok", "--seconds-per-pose", "0.5", "--fps", "8",
                         "--size", "64", "--out", str(out)])
    assert code == 0
    frames = iio.imread(out, index=None)
    assert frames.shape[:3] == (2 * 4 + 1, 64, 192)
    meta = iio.immeta(out, index=0)
    # looping; 8 fps is 125 ms a frame, which a GIF stores to the nearest 10 ms
    assert meta.get("loop") == 0 and meta.get("duration") == animate.gif_frame_ms(8) == 120
    # GIF is palette-quantised: close to the rendered frames, not equal
    hand = resolve_hand_model(None)
    model = demo.get_model("test", hand)
    model.zero_correctives()
    keys = np.stack([pose_degrees(hand, p) for p in ("open", "fist", "ok")])
    rendered = animate.render_frames(hand, model.eval(), torch.device("cpu"), keys, 4, image_size=64, progress=False)
    assert np.abs(frames[..., :3].astype(int) - rendered).mean() < 4

    mp4 = tmp_path / "a.mp4"
    assert animate.main(["--poses", "open", "fist", "--fps", "5", "--views", "palm", "--size", "64",
                         "--out", str(mp4)]) == 0
    video = iio.imread(mp4, index=None, plugin="FFMPEG")
    assert video.shape[:3] == (6, 64, 64)


def test_cli_errors(tmp_path, capsys):
    assert animate.main(["--poses", "open", "fist", "--out", str(tmp_path / "a.avi")]) == 2
    assert "expected a .gif, .mp4 or .glb file" in capsys.readouterr().err
    assert animate.main(["--poses", "open", "fistt", "--out", str(tmp_path / "a.gif")]) == 2
    assert "not a preset name" in capsys.readouterr().err
    assert animate.main(["--poses", "open", "fist", "--size", "65", "--views", "palm",
                         "--out", str(tmp_path / "a.mp4")]) == 2
    assert "even frame size" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing half-written
    with pytest.raises(SystemExit):
        animate.parse_args(["--poses", "open"])
    assert "at least two poses" in capsys.readouterr().err
