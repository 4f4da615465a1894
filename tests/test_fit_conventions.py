"""The keypoint conventions against their documented orders, and the fingertips on the skin."""
import numpy as np
import pytest
import torch

from common import metrics
from common.fitting.conventions import CONVENTIONS, get_convention, keypoint_map, ray_surface_hits
from common.fitting.errors import FitInputError
from common.fitting.solver import rest_surface, tip_offsets
from data.dataset import PTS_JOINT_NAMES
from tools.fit_synthetic import decoder

# The orders as their documentation lists them, index → joint of the hand (written out here, not
# derived from the table under test). MediaPipe: the Hand Landmarker's landmark list; OpenPose:
# doc/02_output.md "Hand Output Format" (same order); InterHand2.6M: annotations/skeleton.txt.
MEDIAPIPE = {0: "WRIST", 1: "THUMB_CMC", 2: "THUMB_MCP", 3: "THUMB_IP", 4: "THUMB_TIP", 5: "INDEX_FINGER_MCP",
             6: "INDEX_FINGER_PIP", 7: "INDEX_FINGER_DIP", 8: "INDEX_FINGER_TIP", 9: "MIDDLE_FINGER_MCP",
             10: "MIDDLE_FINGER_PIP", 11: "MIDDLE_FINGER_DIP", 12: "MIDDLE_FINGER_TIP", 13: "RING_FINGER_MCP",
             14: "RING_FINGER_PIP", 15: "RING_FINGER_DIP", 16: "RING_FINGER_TIP", 17: "PINKY_MCP", 18: "PINKY_PIP",
             19: "PINKY_DIP", 20: "PINKY_TIP"}
# Anatomical joint of each name: the hand model's joint numbering (1 MCP/CMC … null tip).
ANATOMY = {"WRIST": "wrist", "CMC": "1", "MCP": "1", "PIP": "2", "DIP": "3", "TIP": "_null", "IP": "3"}
INTERHAND = ["r_thumb4", "r_thumb3", "r_thumb2", "r_thumb1", "r_index4", "r_index3", "r_index2", "r_index1",
             "r_middle4", "r_middle3", "r_middle2", "r_middle1", "r_ring4", "r_ring3", "r_ring2", "r_ring1",
             "r_pinky4", "r_pinky3", "r_pinky2", "r_pinky1", "r_wrist"]


def mediapipe_joint(name: str) -> str:
    if name == "WRIST":
        return "wrist"
    digit = name.split("_")[0].lower()
    part = name.split("_")[-1]
    if digit == "thumb":  # thumb: CMC → thumb1, MCP → thumb2, IP → thumb3, TIP → thumb_null
        return {"CMC": "thumb1", "MCP": "thumb2", "IP": "thumb3", "TIP": "thumb_null"}[part]
    return digit + ANATOMY[part]


def test_mediapipe_and_openpose_follow_the_documented_order():
    mp = get_convention("mediapipe")
    assert mp.names == [MEDIAPIPE[i] for i in range(21)]
    assert [k.joint for k in mp.keypoints] == [mediapipe_joint(MEDIAPIPE[i]) for i in range(21)]
    op = get_convention("openpose")
    assert [k.joint for k in op.keypoints] == [k.joint for k in mp.keypoints]
    # OpenPose's pairs: 0-1-2-3-4, 0-5-6-7-8, …: each digit's four points, base to tip.
    for digit in range(5):
        chain = [k.joint for k in op.keypoints[1 + 4 * digit: 5 + 4 * digit]]
        assert chain[-1].endswith("_null") and chain[0].endswith("1")
    # Their tips are on the skin; every other point is a joint.
    for conv in (mp, op):
        assert [k.surface_tip for k in conv.keypoints] == [k.joint.endswith("_null") for k in conv.keypoints]


def test_dhm_and_interhand_are_the_pts_order():
    assert [k.joint for k in get_convention("dhm").keypoints] == list(PTS_JOINT_NAMES)
    interhand = get_convention("interhand")
    assert interhand.names == INTERHAND
    assert [k.joint for k in interhand.keypoints] == list(PTS_JOINT_NAMES)
    assert not any(k.surface_tip for k in interhand.keypoints)


@pytest.mark.parametrize("name", list(CONVENTIONS))
def test_every_convention_maps_21_distinct_joints(name, any_hand):
    kmap = keypoint_map(any_hand, get_convention(name), {f: 1.0 for f in ("thumb", "index", "middle", "ring", "pinky")})
    assert len(set(kmap.joint_index.tolist())) == 21
    assert "b_r_thumb0" not in [any_hand.joint_names[j] for j in kmap.joint_index]


def test_unknown_convention_is_refused():
    with pytest.raises(FitInputError, match="unknown keypoint convention.*mediapipe"):
        get_convention("coco")


def test_tip_offsets_put_the_tips_on_the_surface(any_hand):
    model = decoder(any_hand)
    with torch.no_grad():
        identity = model.identity()
    offsets = tip_offsets(model, identity)
    pose, verts = rest_surface(model, identity)
    faces = torch.as_tensor(any_hand.faces)
    for finger, d in offsets.items():
        j = any_hand.joint_names.index(f"b_r_{finger}_null")
        tip = pose[j, :3, 3] + d * pose[j, :3, 0] / np.linalg.norm(pose[j, :3, 0])
        distance = metrics.point_surface_distance(torch.as_tensor(tip[None]), torch.as_tensor(verts), faces)
        assert float(distance[0]) < 1e-6, (finger, d, float(distance[0]))
        # The outermost crossing: a little further along the bone is outside the hand.
        beyond = tip + 0.5 * pose[j, :3, 0] / np.linalg.norm(pose[j, :3, 0])
        hits = ray_surface_hits(beyond, pose[j, :3, 0] / np.linalg.norm(pose[j, :3, 0]), verts, any_hand.faces)
        assert (hits < 0).all()
        assert abs(d) < 5.0


def test_ray_hits_on_a_cube():
    # A unit cube (two triangles a face): a line through its centre along x crosses it at ±0.5.
    v = np.array([[x, y, z] for x in (-.5, .5) for y in (-.5, .5) for z in (-.5, .5)])
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    faces = np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))])
    hits = np.sort(ray_surface_hits(np.array([0.0, 0.1, 0.2]), np.array([1.0, 0, 0]), v, faces))
    assert np.allclose(hits, [-0.5, 0.5])
