"""demo/export.py and common/export: the rigged .glb read back with pygltflib and skinned with glTF's
own formulas in plain NumPy (tests/gltf_reference.py) equals Model.decode at every keyframe, on the
default and MakeHuman hands, with a checkpoint whose correctives are non-zero; the Khronos glTF
Validator finds no error; bad input is one line and exit code 2."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from common.io.checkpoint import DECODER_PREFIXES, save_checkpoint
from common.hand.hand_model import save_hand_model
from common.hand.pose_io import build_pose
from demo import animate
from demo import export as export_script
from demo.pose_edit import euler_tensor, pose_degrees
from main.model import get_model
from tests.gltf_reference import GltfFile

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "tests" / "web"
TOLERANCE_MM = 1e-3


# ------------------------------------------------------------------ fixtures
def personalised_model(hand, config, seed=0):
    """A model whose skeleton, identity and pose correctives are all non-zero (millimetres)."""
    torch.manual_seed(seed)
    model = get_model("test", hand, config)
    with torch.no_grad():
        for p in model.skin_refine_net.parameters():
            p.normal_(0, 0.05)
        for p in model.skeleton_refine_net.parameters():
            p.normal_(0, 0.15)
    return model.eval()


def save_decoder(model, path):
    """A snapshot of the decoder's weights (what export reads), in the original's layout."""
    state = {"module." + k: v for k, v in model.state_dict().items() if k.startswith(DECODER_PREFIXES)}
    save_checkpoint({"epoch": 1, "network": state}, path)
    return path


@pytest.fixture(params=["default", "makehuman"])
def personalised(request, tmp_path, small_cfg):
    """(hand-model folder, hand, model with non-zero correctives, its checkpoint)."""
    folder = request.getfixturevalue("default_hand_dir" if request.param == "default" else "makehuman_dir")
    hand = request.getfixturevalue("default_hand" if request.param == "default" else "makehuman")
    model = personalised_model(hand, small_cfg)
    return folder, hand, model, save_decoder(model, tmp_path / "snapshot.pth.tar")


def export(tmp_path, *args, name="hand.glb"):
    out = tmp_path / name
    assert export_script.main([*map(str, args), "--out", str(out)]) == 0
    return GltfFile(out.read_bytes())


def model_vertices(f, hand):
    """The model vertex of each of the file's vertices (the first V are the model's, in order)."""
    extras = f.doc.meshes[0].extras
    return np.r_[np.arange(hand.vertex_num), np.asarray(extras["seam_vertex_source"], np.int64)]


def decoded(model, euler, root=None):
    with torch.no_grad():
        if root is None:
            return model.decode(euler)["mesh_out_refined"].double().numpy()
        return model.pose(euler, root).mesh.double().numpy()


def keyframe_meshes(f, times):
    """``[K, N, 3]`` mm: the file's mesh at each time, by glTF's formulas."""
    mesh_node = next(i for i, n in enumerate(f.doc.nodes) if n.skin is not None)
    out = []
    for t in times:
        trs, weights = f.sample(0, t)
        out.append(f.skinned(trs, weights.get(mesh_node)) * 1e3)
    return np.stack(out)


# ------------------------------------------------------------------ the mesh equals the decode
def test_correctives_are_not_zero(personalised):
    """The checkpoint of these tests moves joints and vertices by millimetres (else they test little)."""
    _, hand, model, _ = personalised
    with torch.no_grad():
        identity = model.identity()
        skeleton = identity.local_pose[:, :3, 3] - torch.as_tensor(hand.local_pose[:, :3, 3]).float()
        identity_rest = identity.pose_independent_rest.view(-1, 3) - torch.as_tensor(hand.vertices).float()
        pose = model.rest_vertices(build_pose(hand, "fist"), identity)[0] - identity.pose_independent_rest.view(-1, 3)
    assert skeleton.abs().max() > 1 and identity_rest.abs().max() > 0.5 and pose.abs().max() > 0.5


def test_keyframes_equal_the_decode(personalised, tmp_path):
    folder, hand, model, ckpt = personalised
    poses = ["open", "fist", "point"]
    f = export(tmp_path, "--hand_model", folder, "--ckpt", ckpt, "--poses", *poses, "--seconds-per-pose", "0.5")
    euler = torch.cat([build_pose(hand, p) for p in poses])
    expected = decoded(model, euler)
    got = keyframe_meshes(f, [0.0, 0.5, 1.0])
    source = model_vertices(f, hand)
    assert np.abs(got - expected[:, source]).max() < TOLERANCE_MM
    assert np.abs(expected[1] - expected[0]).max() > 50  # the keyframes differ: the hand moved
    # The correctives are in the file: without the morph targets the mesh is off by millimetres.
    trs, _ = f.sample(0, 0.5)
    no_morph = f.skinned(trs, np.zeros(3)) * 1e3
    assert np.abs(no_morph - expected[1, source]).max() > 0.5


def test_pose_and_rest_files_equal_the_demo(personalised, tmp_path):
    folder, hand, model, ckpt = personalised
    f = export(tmp_path, "--hand_model", folder, "--ckpt", ckpt, "--pose", "fist", "--euler", "index1=0,10,45")
    assert not f.doc.animations
    expected = decoded(model, build_pose(hand, "fist", ["index1=0,10,45"]))[0]
    source = model_vertices(f, hand)
    assert np.abs(f.skinned(f.node_trs()) * 1e3 - expected[source]).max() < TOLERANCE_MM

    rest = export(tmp_path, "--hand_model", folder, "--ckpt", ckpt, name="rest.glb")
    expected = decoded(model, torch.zeros(1, hand.joint_num, 3))[0]
    assert np.abs(rest.skinned(rest.node_trs()) * 1e3 - expected[source]).max() < TOLERANCE_MM


def test_mesh_skeleton_and_skin_as_the_hand_model(personalised, tmp_path):
    """Faces, uvs and joint names as the hand's files; every weight kept (sets of four); the template's
    inverse bind matrices; the base mesh is the rest mesh with the identity corrective, in metres."""
    folder, hand, model, ckpt = personalised
    f = export(tmp_path, "--hand_model", folder, "--ckpt", ckpt)
    prim = f.doc.meshes[0].primitives[0]
    source = model_vertices(f, hand)
    faces = f.array(prim.indices).reshape(-1, 3)
    assert np.array_equal(source[faces], hand.faces)
    uv = f.array(prim.attributes.TEXCOORD_0)
    expected_uv = hand.uvs[hand.face_uvs] * [1, -1] + [0, 1]  # glTF's v runs downwards
    assert np.abs(uv[faces] - expected_uv).max() < 1e-6
    normals = f.array(prim.attributes.NORMAL)
    assert np.abs(np.linalg.norm(normals, axis=1) - 1).max() < 1e-6
    # the joints: names and hierarchy of skeleton.txt, the skin's joint i is joint i
    assert [n.name for n in f.doc.nodes[:hand.joint_num]] == hand.joint_names
    parent = {c: i for i, n in enumerate(f.doc.nodes) for c in (n.children or [])}
    assert [parent.get(j, -1) for j in range(hand.joint_num)] == hand.parents.tolist()
    skin = f.doc.skins[0]
    assert skin.joints == list(range(hand.joint_num))
    ibm = f.array(skin.inverseBindMatrices).reshape(-1, 4, 4).transpose(0, 2, 1)
    template_ibm = hand.global_pose_inv.copy()
    template_ibm[:, :3, 3] *= 1e-3
    assert np.abs(ibm - template_ibm).max() < 1e-6
    # every influence, strongest first
    sets = []
    s = 0
    while getattr(prim.attributes, f"JOINTS_{s}", None) is not None:
        sets.append((f.array(getattr(prim.attributes, f"JOINTS_{s}")), f.array(getattr(prim.attributes, f"WEIGHTS_{s}"))))
        s += 1
    assert len(sets) == -(-int((hand.skinning_weights > 0).sum(1).max()) // 4)
    dense = np.zeros((len(source), hand.joint_num))
    for joints, weights in sets:
        for i in range(4):
            np.add.at(dense, (np.arange(len(source)), joints[:, i].astype(int)), weights[:, i])
    expected = hand.skinning_weights / hand.skinning_weights.sum(1, keepdims=True)
    assert np.abs(dense - expected[source]).max() < 1e-6
    flat = np.concatenate([w for _, w in sets], 1)
    assert np.all(np.diff(flat, axis=1) <= 0)  # descending: set 0 holds the four largest
    # the base mesh: template + identity corrective + pose corrective at zero angles, metres
    with torch.no_grad():
        bind = model.rest_vertices(torch.zeros(1, hand.joint_num, 3))[0].double().numpy()
    assert np.abs(f.array(prim.attributes.POSITION) * 1e3 - bind[source]).max() < 1e-3


def test_interpolation_between_keyframes_is_animates(default_hand, tmp_path, small_cfg):
    """Between keyframes glTF slerps each joint's rotation: the joints are where demo/animate.py's
    per-joint slerp puts them (the correctives blend linearly instead, so only joints are compared)."""
    f = export(tmp_path, "--poses", "open", "fist", "--seconds-per-pose", "2")
    hand = default_hand
    keys = np.stack([pose_degrees(hand, p) for p in ("open", "fist")])
    frames = animate.interpolate_poses(euler_tensor(keys).double().numpy(), hand.dof_mask, 4)
    model = get_model("test", hand, small_cfg)
    model.zero_correctives()
    with torch.no_grad():
        joints = model.eval().decode(torch.from_numpy(frames).float())["joint_out"].double().numpy()
    for i, t in enumerate([0.0, 0.5, 1.0, 1.5, 2.0]):
        trs, _ = f.sample(0, t)
        G = f.global_transforms(trs)[:hand.joint_num]
        assert np.abs(G[:, :3, 3] * 1e3 - joints[i]).max() < TOLERANCE_MM, t


# ------------------------------------------------------------------ fitted sequences
def random_rigid(rng, count):
    """``[count, 4, 4]`` random rotations and translations (mm)."""
    q = rng.normal(size=(count, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    R = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                  2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                  2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], 1).reshape(count, 3, 3)
    out = np.tile(np.eye(4), (count, 1, 1))
    out[:, :3, :3] = R
    out[:, :3, 3] = rng.uniform(-300, 300, (count, 3))
    return out


def make_fit(path, hand, frames=4, seed=0, **extra):
    """A fitted sequence as main/fit.py writes it: euler [T, J, 3] radians, root [T, 4, 4] mm."""
    rng = np.random.default_rng(seed)
    euler = rng.uniform(-0.6, 0.6, (frames, hand.joint_num, 3)) * hand.dof_mask
    root = random_rigid(rng, frames)
    np.savez(path, euler=euler.astype(np.float32), root=root.astype(np.float32), **extra)
    return torch.from_numpy(euler).float(), torch.from_numpy(root).float()


def test_fitted_sequence(personalised, tmp_path):
    folder, hand, model, ckpt = personalised
    euler, root = make_fit(tmp_path / "fit.npz", hand, fps=np.float64(10.0))
    f = export(tmp_path, "--hand_model", folder, "--ckpt", ckpt, "--poses", tmp_path / "fit.npz")
    expected = decoded(model, euler, root)
    times = f.array(f.doc.animations[0].samplers[0].input)
    assert np.allclose(times, np.arange(4) / 10.0)  # the file's fps
    got = keyframe_meshes(f, times.astype(np.float64))
    assert np.abs(got - expected[:, model_vertices(f, hand)]).max() < TOLERANCE_MM
    # the root moves: its node is animated (rotation and translation)
    paths = {(c.target.node, c.target.path) for c in f.doc.animations[0].channels}
    assert {(hand.root_index, "rotation"), (hand.root_index, "translation")} <= paths
    # --fps overrides the file's
    f = export(tmp_path, "--hand_model", folder, "--ckpt", ckpt, "--poses", tmp_path / "fit.npz", "--fps", "25")
    assert np.allclose(f.array(f.doc.animations[0].samplers[0].input), np.arange(4) / 25.0)


# ------------------------------------------------------------------ Khronos glTF Validator
def validate(path):
    """The Khronos glTF Validator's report of ``path`` (skips without Node or the npm packages)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed: the Khronos glTF Validator (npm gltf-validator) runs on it")
    if not (WEB / "node_modules" / "gltf-validator").is_dir():
        pytest.skip("the npm packages of tests/web are not installed (npm ci --prefix tests/web; .ci/run does it)")
    result = subprocess.run([node, str(WEB / "validate.js"), str(path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_khronos_validator_finds_no_error(tmp_path, default_hand_dir, default_hand, small_cfg):
    ckpt = save_decoder(personalised_model(default_hand, small_cfg), tmp_path / "snapshot.pth.tar")
    files = {"rest": ["--ckpt", ckpt], "pose": ["--ckpt", ckpt, "--pose", "ok"],
             "keyframes": ["--ckpt", ckpt, "--poses", "open", "fist", "ok"]}
    make_fit(tmp_path / "fit.npz", default_hand, frames=3)
    files["fit"] = ["--ckpt", ckpt, "--poses", tmp_path / "fit.npz"]
    for name, args in files.items():
        export(tmp_path, "--hand_model", default_hand_dir, *args, name=f"{name}.glb")
        report = validate(tmp_path / f"{name}.glb")
        issues = report["issues"]
        messages = [m for m in issues["messages"] if m["severity"] <= 1]  # errors and warnings
        assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, (name, messages)
        assert report["info"]["hasSkins"], name
        assert report["info"]["hasMorphTargets"] == (name != "rest"), name  # the rest pose needs none
        assert report["info"]["animationCount"] == (1 if name in ("keyframes", "fit") else 0), name


# ------------------------------------------------------------------ bad input
def fails(capsys, argv, *needles):
    code = export_script.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in err, err


def test_bad_input(tmp_path, capsys, default_hand):
    out = ["--out", str(tmp_path / "h.glb")]
    fails(capsys, ["--pose", "fistt", *out], "not a preset name")
    fails(capsys, ["--euler", "index1=0,0", *out], "expected three comma-separated angles")
    fails(capsys, ["--poses", "open", "fistt", *out], "fistt", "not a preset name")
    fails(capsys, ["--poses", str(tmp_path / "none.npz"), *out], "none.npz: no such file")
    # fitted sequences: wrong shapes, a missing key, a non-rigid root, non-finite numbers, pickles
    J = default_hand.joint_num
    eye = np.tile(np.eye(4), (2, 1, 1))
    for name, arrays, needle in (
            ("shape", {"euler": np.zeros((2, J, 2)), "root": eye}, f"'euler' has shape [2, {J}, 2], expected [T, {J}, 3]"),
            ("root", {"euler": np.zeros((2, J, 3)), "root": eye[:1]}, "'root' has shape [1, 4, 4], expected [2, 4, 4]"),
            ("key", {"euler": np.zeros((2, J, 3))}, "no 'root' array"),
            ("scaled", {"euler": np.zeros((2, J, 3)), "root": eye * 2}, "'root' of frame 0: not a rotation and a translation"),
            ("nan", {"euler": np.full((2, J, 3), np.nan), "root": eye}, "'euler' has a non-finite value at frame 0"),
            ("fps", {"euler": np.zeros((2, J, 3)), "root": eye, "fps": -1.0}, "'fps' must be one positive number"),
            ("object", {"euler": np.array([{"a": 1}] * 2, dtype=object), "root": eye}, "fit_object.npz: not a readable")):
        path = tmp_path / f"fit_{name}.npz"
        np.savez(path, **arrays)
        fails(capsys, ["--poses", str(path), *out], str(path) if name != "object" else "", needle)
    (tmp_path / "fit_text.npz").write_text("not a zip")
    fails(capsys, ["--poses", str(tmp_path / "fit_text.npz"), *out], "fit_text.npz: not a readable .npz")
    # a hand model whose local poses are not rotations cannot be written as glTF nodes
    bad = default_hand.local_pose.copy()
    bad[default_hand.joint_index("index2"), :3, :3] *= 1.5
    folder = tmp_path / "scaled_hand"
    save_hand_model(type(default_hand)(**{**default_hand.__dict__, "local_pose": bad}), folder)
    fails(capsys, ["--hand_model", str(folder), *out], "local pose of joint b_r_index2: not a rotation")
    try:
        import bpy  # noqa: F401
    except ImportError:
        fails(capsys, ["--format", "fbx", "--out", str(tmp_path / "h.fbx")], "pip install bpy")
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".glb", ".fbx")]  # nothing half-written


def test_option_errors(capsys):
    for argv, needle in ((["--poses", "open"], "at least two poses"),
                         (["--pose", "fist", "--poses", "open", "fist"], "one or the other"),
                         (["--poses", "a.npz", "open"], "given alone"),
                         (["--out", "hand.obj"], "expected a .glb file"),
                         (["--format", "fbx", "--out", "hand.glb"], "expected a .fbx file"),
                         (["--seconds-per-pose", "0", "--poses", "open", "fist"], "must be positive")):
        with pytest.raises(SystemExit) as stop:
            export_script.parse_args(argv)
        assert stop.value.code == 2
        assert needle in capsys.readouterr().err


def test_animate_writes_the_same_glb(tmp_path):
    """``animate.py --out FILE.glb`` is ``export.py --poses``'s file, byte for byte."""
    poses = ["open", "fist", "ok"]
    assert animate.main(["--poses", *poses, "--seconds-per-pose", "0.5", "--out", str(tmp_path / "a.glb")]) == 0
    assert export_script.main(["--poses", *poses, "--seconds-per-pose", "0.5", "--out", str(tmp_path / "e.glb")]) == 0
    assert (tmp_path / "a.glb").read_bytes() == (tmp_path / "e.glb").read_bytes()


def test_four_influence_loss_is_what_the_first_set_gives(tmp_path, any_hand):
    """``bench.py influences`` measures what a reader of the first set alone (renormalised) shows:
    here computed from the file by glTF's formula with only JOINTS_0/WEIGHTS_0."""
    from tools.benchmarks.influences import four_influence_error

    folder = tmp_path / "hand"
    save_hand_model(any_hand, folder)
    f = export(tmp_path, "--hand_model", folder, "--pose", "fist")
    model = get_model("test", any_hand)
    model.zero_correctives()
    expected = decoded(model.eval(), build_pose(any_hand, "fist"))[0][model_vertices(f, any_hand)]
    first_set = np.linalg.norm(f.skinned(f.node_trs(), max_influences=4) * 1e3 - expected, axis=1).max()
    measured = four_influence_error(any_hand, build_pose(any_hand, "fist"))[0]
    assert measured > 0.05 and abs(measured - first_set) < 1e-3, (measured, first_set)


def test_bench_influences_prints_the_table():
    import sys

    done = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "influences", "--hands", "default",
                           "--random", "3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row = done.stdout.splitlines()[-1].split()
    assert row[:4] == ["default", "4932", "8", "5"], done.stdout
    assert all(0 <= float(x) < 2 for x in row[4:]), done.stdout
