"""The generated default right hand (common/hand/default_hand.py) and the mesh pictures (common/utils/vis.py)."""
import cv2
import numpy as np
import pytest

from common.hand.default_hand import DEFAULT_HAND_NAME, main as default_hand_cli, make_default_hand
from common.hand.hand_model import HAND_MODEL_FILES, load_hand_model, save_hand_model
from common.utils.vis import VIEWS, render_mesh, save_image

# The released model's skeleton.txt, in id order (hard-coded on purpose).
JOINT_NAMES = [
    "b_r_thumb_null", "b_r_thumb3", "b_r_thumb2", "b_r_thumb1", "b_r_thumb0",
    "b_r_index_null", "b_r_index3", "b_r_index2", "b_r_index1",
    "b_r_middle_null", "b_r_middle3", "b_r_middle2", "b_r_middle1",
    "b_r_ring_null", "b_r_ring3", "b_r_ring2", "b_r_ring1",
    "b_r_pinky_null", "b_r_pinky3", "b_r_pinky2", "b_r_pinky1",
    "b_r_wrist",
]
PARENTS = [1, 2, 3, 4, 21, 6, 7, 8, 21, 10, 11, 12, 21, 14, 15, 16, 21, 18, 19, 20, 21, -1]
FINGERS = ("index", "middle", "ring", "pinky")
ARRAYS = ["vertices_cm", "uvs", "faces", "face_uvs", "skinning_weights", "local_pose", "global_pose",
          "global_pose_inv", "parents"]


# ------------------------------------------- a plain reference of docs/design.md, "Decoding"
def euler_matrices(theta):
    """``R = Rz · Ry · Rx`` for ``theta [J, 3]`` (radians)."""
    out = []
    for x, y, z in theta:
        rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
        ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
        rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
        out.append(rz @ ry @ rx)
    return np.array(out)


def pose(model, theta, root=None):
    """FK down the tree and LBS (no correctives). Returns ``(joints, vertices, blended [V, 4, 4])``.

    ``root`` is the root's global transform (the identity in decode mode: the output in the wrist's frame).
    """
    J = model.joint_num
    R = np.tile(np.eye(4), (J, 1, 1))
    R[:, :3, :3] = euler_matrices(theta)
    G = [None] * J
    G[model.root_index] = np.eye(4) if root is None else root
    for j in model.tree_order[1:]:
        G[j] = G[model.parents[j]] @ (model.local_pose[j] @ R[j])
    G = np.array(G)
    blended = np.einsum("vj,jab->vab", model.skinning_weights, G @ model.global_pose_inv)
    v = np.c_[model.vertices, np.ones(model.vertex_num)]
    return G[:, :3, 3], np.einsum("vab,vb->va", blended, v)[:, :3], blended


def angles(model, **by_suffix):
    """Euler angles (degrees in, radians out) by joint-name suffix, e.g. ``index1=(0, 0, 45)``."""
    theta = np.zeros((model.joint_num, 3))
    for suffix, xyz in by_suffix.items():
        theta[model.joint_index(suffix)] = np.radians(xyz)
    return theta


def fist(model):
    """A closed fist: every finger joint flexed 80-90°, the thumb folded across the fingers."""
    kw = {f"{f}{k}": (0, 0, a) for f in FINGERS for k, a in zip("123", (85, 90, 80))}
    kw.update(thumb1=(0, 30, 30), thumb2=(0, 0, 40), thumb3=(0, 0, 40))
    return angles(model, **kw)


def edges(faces):
    return np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])


def face_normals(v, faces):
    return np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])


@pytest.fixture(scope="module")
def hand():
    return make_default_hand()


@pytest.fixture(scope="module")
def frame(hand):
    """The wrist's axes in world coordinates: x to the fingers, y out of the palm, z to the thumb."""
    return hand.global_pose[hand.root_index, :3, :3]


# ------------------------------------------------------------------ format
def test_deterministic(hand):
    again = make_default_hand()
    assert again.joint_names == hand.joint_names
    for key in ARRAYS:
        assert np.array_equal(getattr(hand, key), getattr(again, key)), key


def test_released_format(hand):
    assert DEFAULT_HAND_NAME == "deephandmesh_default_right"
    hand.validate()
    assert hand.joint_names == JOINT_NAMES
    assert hand.parents.tolist() == PARENTS and hand.root_index == 21
    assert hand.align_joint_indices == [8, 12, 16, 20, 21]
    assert hand.non_rigid_joint_indices == [3, 21]
    assert hand.dof_num == 28
    V, F = hand.vertex_num, len(hand.faces)
    assert 2000 <= V <= 8000
    assert hand.vertices_cm.dtype == np.float64 and hand.faces.dtype == np.int64
    assert hand.face_uvs.shape == (F, 3) and hand.face_uvs.min() >= 0 and hand.face_uvs.max() < len(hand.uvs)
    assert np.all((hand.uvs >= 0) & (hand.uvs <= 1))
    # the wrist joint at the origin, the mesh in cm (a hand is ~19 cm long)
    assert np.allclose(hand.global_pose[21, :3, 3], 0)
    assert 15 < np.ptp(hand.vertices_cm, axis=0).max() < 25


def test_round_trip_exact(hand, tmp_path):
    save_hand_model(hand, tmp_path)
    again = load_hand_model(tmp_path)
    assert again.joint_names == hand.joint_names
    for key in ARRAYS:
        x, y = getattr(hand, key), getattr(again, key)
        assert x.dtype == y.dtype and np.array_equal(x, y), key


def test_cli_writes_the_six_files(tmp_path, capsys):
    default_hand_cli(["--out", str(tmp_path / "hand")])
    assert all((tmp_path / "hand" / name).is_file() for name in HAND_MODEL_FILES)
    assert DEFAULT_HAND_NAME in capsys.readouterr().out
    assert load_hand_model(tmp_path / "hand").vertex_num == make_default_hand().vertex_num


# ------------------------------------------------------------------ the surface
def test_closed_oriented_manifold(hand):
    F, V = hand.faces, hand.vertices
    undirected, counts = np.unique(np.sort(edges(F), axis=1), axis=0, return_counts=True)
    assert np.all(counts == 2), "every edge must be shared by exactly two triangles"
    _, directed = np.unique(edges(F), axis=0, return_counts=True)
    assert np.all(directed == 1), "neighbouring triangles must traverse their shared edge in opposite directions"
    assert len(np.unique(F)) == hand.vertex_num, "no unused vertices"
    assert np.all((F[:, 0] != F[:, 1]) & (F[:, 1] != F[:, 2]) & (F[:, 2] != F[:, 0]))
    # one closed surface of genus 0 (a sphere): V - E + F = 2
    assert hand.vertex_num - len(undirected) + len(F) == 2
    area = 0.5 * np.linalg.norm(face_normals(V, F), axis=1)
    assert area.min() > 0.05, "degenerate triangle (mm²)"
    volume = np.einsum("ij,ij->i", V[F[:, 0]], np.cross(V[F[:, 1]], V[F[:, 2]])).sum() / 6.0
    assert 200e3 < volume < 500e3, f"outward normals give a positive hand-sized volume (mm³), got {volume}"


def test_proportions(hand, frame):
    G = hand.global_pose[:, :3, 3]
    local = hand.vertices @ frame  # wrist frame: x to the fingers, y palm normal, z radial
    assert 175 <= local[:, 0].max() <= 195, "wrist crease to middle fingertip"
    assert 95 <= np.linalg.norm(G[hand.joint_index("middle1")]) <= 100
    expected = {"index": (40, 23, 18), "middle": (45, 27, 19), "ring": (42, 26, 19), "pinky": (33, 18, 17),
                "thumb": (45, 32, 27)}
    for finger, lengths in expected.items():
        chain = [hand.joint_index(f"{finger}{s}") for s in ("1", "2", "3", "_null")]
        assert np.allclose(np.linalg.norm(np.diff(G[chain], axis=0), axis=1), lengths, atol=0.5), finger
    # knuckle arc: the little finger's lowest, the middle finger's highest
    knuckle = {f: G[hand.joint_index(f"{f}1")] @ frame[:, 0] for f in FINGERS}
    assert knuckle["pinky"] < min(knuckle["ring"], knuckle["index"]) < knuckle["middle"]
    # breadth across the index-little knuckles, the thumb left out
    thumb = [j for j, n in enumerate(hand.joint_names) if "thumb" in n]
    free = hand.skinning_weights[:, thumb].sum(axis=1) == 0
    level = free & (local[:, 0] > knuckle["pinky"]) & (local[:, 0] < knuckle["middle"])
    assert 70 <= np.ptp(local[level, 2]) <= 90
    # the thumb: CMC on the radial side, ~1/3 of the way to the index knuckle, pointing ~40° from the index
    cmc, index1 = G[hand.joint_index("thumb1")] @ frame, G[hand.joint_index("index1")] @ frame
    assert 0.2 < cmc[0] / index1[0] < 0.45 and cmc[2] > 10
    d = G[hand.joint_index("thumb2")] - G[hand.joint_index("thumb1")]
    u = G[hand.joint_index("index2")] - G[hand.joint_index("index1")]
    angle = np.degrees(np.arccos(d @ u / np.linalg.norm(d) / np.linalg.norm(u)))
    assert 35 <= angle <= 45
    assert d @ frame[:, 1] > 0, "the thumb is rotated towards the palm"
    # finger width: 17-20 mm at the base, 13-16 mm near the tip (middle finger, across the radial axis)
    seg = hand.segmentation
    for joint, lo, hi in (("middle1", 17, 20.5), ("middle3", 13, 16.5)):
        width = np.ptp(local[seg == hand.joint_index(joint), 2])
        assert lo <= width <= hi, (joint, width)


# ------------------------------------------------------------------ skeleton
def test_joint_frames(hand, frame):
    G = hand.global_pose
    children = hand.children
    for j, name in enumerate(hand.joint_names):
        R = G[j, :3, :3]
        assert np.allclose(R.T @ R, np.eye(3), atol=1e-12) and np.isclose(np.linalg.det(R), 1.0), name
        if name.endswith("null"):
            assert np.allclose(R, G[hand.parents[j], :3, :3]), f"{name} keeps its parent's orientation"
        elif name != "b_r_wrist":
            (child,) = children[j]
            bone = G[child, :3, 3] - G[j, :3, 3]
            assert np.dot(R[:, 0], bone / np.linalg.norm(bone)) > 1 - 1e-9, f"{name}: x points at the child"
            assert np.allclose(np.cross(R[:, 2], R[:, 0]), R[:, 1]), name  # y = z × x
    middle = G[hand.joint_index("middle1"), :3, 3]
    assert np.allclose(frame[:, 0], middle / np.linalg.norm(middle)), "the wrist's x points at the middle knuckle"
    for f in FINGERS:  # fingers' palm side (y) is the palm's normal
        assert np.dot(G[hand.joint_index(f"{f}1"), :3, 1], frame[:, 1]) > 0.99


def test_local_global_consistent(hand):
    G, L, Ginv = hand.global_pose, hand.local_pose, hand.global_pose_inv
    assert np.allclose(Ginv, np.linalg.inv(G), atol=1e-12)
    for j, p in enumerate(hand.parents):
        expected = G[j] if p < 0 else np.linalg.inv(G[p]) @ G[j]
        assert np.allclose(L[j], expected, atol=1e-12), hand.joint_names[j]
    # FK of the local poses with zero angles, root at its global pose, reproduces the global poses
    root = G[hand.root_index]
    joints, verts, _ = pose(hand, np.zeros((22, 3)), root)
    assert np.allclose(joints, G[:, :3, 3], atol=1e-9)
    assert np.allclose(verts, hand.vertices, atol=1e-9)


# ------------------------------------------------------------------ skinning
def test_skinning_weights(hand):
    W = hand.skinning_weights
    assert W.min() >= 0 and np.allclose(W.sum(axis=1), 1.0, atol=1e-9)
    assert np.all(W.max(axis=1) > 0)
    nulls = [j for j, n in enumerate(hand.joint_names) if n.endswith("null")]
    assert np.all(W[:, nulls] == 0), "tips carry no weight"
    seg = set(hand.segmentation.tolist())
    assert seg == set(range(22)) - set(nulls), "every other joint owns part of the surface"
    assert (hand.segmentation == hand.root_index).mean() > 0.15, "the palm goes to the wrist"


def test_smooth_blend_across_knuckles(hand):
    """Along a finger's back the weight passes from parent to child over several mm, not in one step."""
    W, V = hand.skinning_weights, hand.vertices
    G = hand.global_pose
    for f in FINGERS:
        for a, b in (("1", "2"), ("2", "3")):
            ja, jb = hand.joint_index(f + a), hand.joint_index(f + b)
            axis = G[jb, :3, 0]
            s = (V - G[jb, :3, 3]) @ axis
            near_axis = np.linalg.norm((V - G[jb, :3, 3]) - s[:, None] * axis, axis=1) < 12
            mixed = near_axis & (W[:, ja] > 0.05) & (W[:, jb] > 0.05)
            assert np.ptp(s[mixed]) > 12, f"{f}{a}->{b}: blend region only {np.ptp(s[mixed]):.1f} mm long"


@pytest.mark.parametrize("joint", ["index1", "index2", "index3", "middle1", "ring2", "pinky3"])
def test_positive_z_curls_towards_the_palm(hand, frame, joint):
    root = hand.global_pose[hand.root_index]
    j = hand.joint_index(joint)
    tip = hand.joint_index(joint[:-1] + "_null")
    # the finger's skin beyond the joint
    rel = hand.vertices - hand.global_pose[j, :3, 3]
    along = rel @ hand.global_pose[j, :3, 0]
    beyond = (along > 5) & (np.linalg.norm(rel - along[:, None] * hand.global_pose[j, :3, 0], axis=1) < 12)
    j0, v0, _ = pose(hand, np.zeros((22, 3)), root)
    j1, v1, _ = pose(hand, angles(hand, **{joint: (0, 0, 45)}), root)
    palm_normal = frame[:, 1]
    assert (j1[tip] - j0[tip]) @ palm_normal > 5
    assert beyond.sum() > 50 and np.all((v1[beyond] - v0[beyond]) @ palm_normal > 0)


def test_thumb_flexion_curls_across_the_palm(hand, frame):
    root = hand.global_pose[hand.root_index]
    tip = hand.joint_index("thumb_null")
    j0, _, _ = pose(hand, np.zeros((22, 3)), root)
    for joint in ("thumb1", "thumb2", "thumb3"):
        j1, _, _ = pose(hand, angles(hand, **{joint: (0, 0, 30)}), root)
        move = j1[tip] - j0[tip]
        assert move @ hand.global_pose[hand.joint_index(joint), :3, 1] > 5, joint  # towards its pad
        assert move @ frame[:, 2] < 0, f"{joint}: the thumb tip moves towards the little finger"


def test_fist_without_tearing_or_collapse(hand):
    root = hand.global_pose[hand.root_index]
    F = hand.faces
    _, rest, _ = pose(hand, np.zeros((22, 3)), root)
    joints, posed, blended = pose(hand, fist(hand), root)
    # the fingertips really are curled back towards the wrist
    to_fingers = root[:3, 0]
    for f in FINGERS:
        tip, knuckle = joints[hand.joint_index(f + "_null")], joints[hand.joint_index(f + "1")]
        assert (tip - knuckle) @ to_fingers < 0, f
    # orientation of every triangle vs its rest normal carried along by the skinning's rotation
    rot = blended[:, :3, :3][F].mean(axis=1)
    u, _, vt = np.linalg.svd(rot)
    n_rest = np.einsum("fab,fb->fa", u @ vt, face_normals(rest, F))
    n_posed = face_normals(posed, F)
    flipped = np.einsum("fa,fa->f", n_rest, n_posed) <= 0
    assert flipped.mean() < 0.005, f"{flipped.sum()} triangles flip in a fist"
    area_ratio = np.linalg.norm(n_posed, axis=1) / np.linalg.norm(face_normals(rest, F), axis=1)
    assert area_ratio.min() > 0.05, "no triangle collapses"
    e = np.unique(np.sort(edges(F), axis=1), axis=0)
    rest_len = np.linalg.norm(rest[e[:, 0]] - rest[e[:, 1]], axis=1)
    posed_len = np.linalg.norm(posed[e[:, 0]] - posed[e[:, 1]], axis=1)
    assert posed_len.min() > 0.2 * rest_len.min()
    assert posed_len.max() < 3.0 * rest_len.max(), "no tearing: edges do not stretch apart"


def test_same_numbers_as_the_project_kinematics(hand):
    torch = pytest.importorskip("torch")
    kinematics = pytest.importorskip("common.hand.kinematics")
    theta = fist(hand)
    joints, verts = kinematics.pose_hand(hand, torch.as_tensor(theta[None], dtype=torch.float64))
    ref_joints, ref_verts, _ = pose(hand, theta)  # decode mode: root at identity
    assert np.allclose(joints[0].numpy(), ref_joints, atol=1e-9)
    assert np.allclose(verts[0].numpy(), ref_verts, atol=1e-9)


# ------------------------------------------------------------------ pictures
def foreground(panel):
    return np.any(np.abs(panel.astype(int) - panel[0, 0].astype(int)) > 12, axis=2)


@pytest.mark.parametrize("which", ["default", "makehuman"])
def test_render_mesh(which, hand, request):
    model = hand if which == "default" else request.getfixturevalue("makehuman")
    frame = model.global_pose[model.root_index, :3, :3]
    img = render_mesh(model.vertices, model.faces, 160, ("palm", "side", "back"), frame=frame,
                      joints_mm=model.global_pose[:, :3, 3], parents=model.parents)
    assert img.shape == (160, 480, 3) and img.dtype == np.uint8
    for k in range(3):
        fraction = foreground(img[:, 160 * k:160 * (k + 1)]).mean()
        assert 0.08 < fraction < 0.7, (k, fraction)
    # palm view: a right hand's thumb on the viewer's right; back view: on the left
    thumb = np.isin(np.argmax(model.skinning_weights, axis=1)[model.faces].max(axis=1),
                    [model.joint_index(s) for s in ("thumb1", "thumb2", "thumb3")])
    colors = np.where(thumb[:, None], [0.0, 0.0, 255.0], [200.0, 200.0, 200.0])
    img = render_mesh(model.vertices, model.faces, 160, ("palm", "back"), frame=frame, face_colors=colors)
    for k, side in ((0, 1), (1, -1)):
        panel = img[:, 160 * k:160 * (k + 1)].astype(int)
        red = (panel[..., 2] - panel[..., 1] > 60)
        assert red.sum() > 50
        assert side * (np.nonzero(red)[1].mean() - 80) > 10, ("palm", "back")[k]


def test_render_mesh_views_and_errors(hand):
    img = render_mesh(hand.vertices, hand.faces, 64, [VIEWS["palm"], "ulnar"], cull_back=False)
    assert img.shape == (64, 128, 3)
    with pytest.raises(ValueError, match="unknown view"):
        render_mesh(hand.vertices, hand.faces, 64, ("top-secret",))
    with pytest.raises(ValueError, match="faces"):
        render_mesh(hand.vertices, hand.faces + hand.vertex_num, 64)


def test_save_image(tmp_path):
    img = np.zeros((8, 12, 3), np.uint8)
    img[2:5, 3:9] = (10, 200, 30)
    path = tmp_path / "sub" / "pic.png"
    save_image(path, img)
    assert np.array_equal(cv2.imread(str(path)), img)
    assert sorted(p.name for p in path.parent.iterdir()) == ["pic.png"], "no temporary file left"
    with pytest.raises(OSError, match="could not write"):
        save_image(tmp_path / "pic.not-an-image-format", img)
    assert not any(p.name.startswith(".pic") for p in tmp_path.iterdir())
