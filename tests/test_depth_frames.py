"""Personalisation's reader of a data set in the released layout (data/depth_frames.py): each view's
depth crop registered with the project's rendering, keypoints in both orders, bad input named."""
import numpy as np
import pytest
import torch

from common.errors import MissingFileError, OptionError
from common.personalise.errors import PersonaliseInputError
from common.personalise.objectives import DepthObjective, DepthTargets
from data.dataset import PTS_JOINT_NAMES
from data.depth_frames import parse_frame_list, read_depth_frames
from tests.conftest import make_tiny_set


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, default_hand):
    from data.make_synthetic import generate

    out = tmp_path_factory.mktemp("depth_frames_set")
    generate(out, default_hand, seed=5, sequences=2, frames=2, cameras=4, image_hw=(64, 42), depth_hw=(256, 167),
             progress=False, drop_keypoints=0.0)
    return out


def test_true_meshes_render_onto_the_captured_depth(small_set, default_hand):
    """The true meshes, rendered in every view's crop, land on the captured depth: the crop is the
    rendering's (a shifted or scaled crop, or a view given to the wrong frame, would not)."""
    frames = read_depth_frames(small_set, default_hand.joint_names, (48, 48))
    assert frames.frame_num == 4 and frames.view_num == 16
    gt = np.load(small_set / "gt" / "frames.npz")
    row = {int(f): i for i, f in enumerate(gt["frame"])}
    vertices = torch.tensor(gt["vertices"][[row[f] for f in frames.frames]], dtype=torch.float32)
    t = frames.tensors("cpu")
    targets = DepthTargets(t["view_frame"], t["camrot"], t["campos"], t["focal"], t["princpt"], t["affine"],
                           t["depth"])
    rendered = DepthObjective(torch.as_tensor(default_hand.faces), (48, 48)).render(vertices, targets)
    both, either = (rendered > 0) & (targets.depth > 0), (rendered > 0) | (targets.depth > 0)
    assert float(both.sum() / either.sum()) > 0.95
    assert float((rendered - targets.depth).abs()[both].median()) < 0.5  # mm: resampling alone
    # Keypoints: the joint order and the .pts order hold the same points.
    valid = frames.joint_valid > 0
    assert valid.sum() >= 4 * 21
    np.testing.assert_allclose(frames.joint_world[valid], gt["joints"][[row[f] for f in frames.frames]][valid],
                               atol=1e-3)
    wrist = default_hand.joint_index(PTS_JOINT_NAMES[0])
    np.testing.assert_allclose(frames.keypoints_pts[:, 0], frames.joint_world[:, wrist], atol=1e-6)
    assert frames.names[0] == "0000_RT_synthetic/0"


def test_choosing_frames(small_set, default_hand):
    names = default_hand.joint_names
    assert read_depth_frames(small_set, names, (16, 16), frames=[3, 1]).frames == [3, 1]
    assert read_depth_frames(small_set, names, (16, 16), sequences=["0001_RT_synthetic"]).frames == [2, 3]
    assert read_depth_frames(small_set, names, (16, 16), max_frames=2).frames == [0, 3]
    assert read_depth_frames(small_set, names, (16, 16), max_views=2).view_num == 8
    assert parse_frame_list("0,3,5-7,3") == [0, 3, 5, 6, 7]


@pytest.mark.parametrize("kwargs,error,message", [
    ({"frames": [9]}, PersonaliseInputError, "no depth maps for frame(s) [9]"),
    ({"sequences": ["nope"]}, OptionError, "['nope'] not found"),
    ({"subject": 7}, MissingFileError, "subject_7: depth-map folder not found"),
])
def test_bad_choices_are_named(small_set, default_hand, kwargs, error, message):
    with pytest.raises(error) as err:
        read_depth_frames(small_set, default_hand.joint_names, (16, 16), **kwargs)
    assert message in str(err.value)


def test_frame_without_keypoints_is_named(tmp_path_factory, default_hand):
    data = make_tiny_set(tmp_path_factory, default_hand, "no_keypoints")
    pts = data / "annotations" / "keypoints" / "subject_4" / "keypoints0001.pts"
    pts.unlink()
    with pytest.raises(PersonaliseInputError, match="keypoints0001.pts: keypoint file not found"):
        read_depth_frames(data, default_hand.joint_names, (16, 16))
    with pytest.raises(OptionError, match="expected frame numbers"):
        parse_frame_list("1-x")
