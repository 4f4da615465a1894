"""Vectorised kinematics and decode against the plain loop reference of docs/design.md, "Decoding"."""
import math

import numpy as np
import pytest
import torch

from common.hand import kinematics
from common.hand.kinematics import (
    KinematicTree,
    euler_to_matrix,
    euler_to_transform,
    forward_kinematics,
    linear_blend_skinning,
    pose_hand,
    rigid_align,
    tree_levels,
)
from main.model import get_model
from tools.reference import (
    decode_loop_model,
    decode_reference,
    euler_matrix_4x4,
    fk_recursive,
    random_euler,
    random_root,
)


def test_euler_to_matrix_matches_rz_ry_rx():
    theta = (torch.rand(50, 3, dtype=torch.float64) * 2 - 1) * math.pi
    ours = euler_to_matrix(theta)
    ref = torch.stack([euler_matrix_4x4(t)[:3, :3] for t in theta])
    assert torch.allclose(ours, ref, atol=1e-12)
    # Orthonormal with determinant 1.
    eye = torch.eye(3, dtype=torch.float64).expand(50, 3, 3)
    assert torch.allclose(ours @ ours.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.det(ours), torch.ones(50, dtype=torch.float64), atol=1e-12)


def test_euler_z_is_flexion_towards_palm(any_hand):
    # A positive z angle at index1 curls the finger towards the palm, which is the +y side of the
    # wrist frame (y = z × x, x towards the fingers): docs/design.md, "Joints, angles and degrees of freedom".
    e = torch.zeros(1, any_hand.joint_num, 3, dtype=torch.float64)
    rest, _ = pose_hand(any_hand, e)
    tip = any_hand.joint_index("index_null")
    e[0, any_hand.joint_index("index1"), 2] = math.radians(60)
    bent, _ = pose_hand(any_hand, e)
    palm_normal = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    assert float((bent[0, tip] - rest[0, tip]) @ palm_normal) > 10.0


def test_tree_levels_parents_before_children(any_hand):
    levels = tree_levels(any_hand.parents)
    seen = {any_hand.root_index}
    for ids, parents in levels:
        assert all(p in seen for p in parents)
        seen.update(ids)
    assert seen == set(range(22))
    assert len(levels) == 5


def test_tree_levels_rejects_cycle():
    with pytest.raises(ValueError, match="cycle"):
        tree_levels([-1, 2, 1])


def test_euler_to_transform_is_homogeneous_euler_to_matrix():
    theta = (torch.rand(4, 7, 3, dtype=torch.float64) * 2 - 1) * math.pi
    T = euler_to_transform(theta)
    assert T.shape == (4, 7, 4, 4)
    assert torch.equal(T[..., :3, :3], euler_to_matrix(theta))
    assert torch.equal(T[..., :3, 3], torch.zeros(4, 7, 3, dtype=torch.float64))
    assert torch.equal(T[..., 3, :], torch.tensor([0.0, 0, 0, 1], dtype=torch.float64).expand(4, 7, 4))


# Skeletons whose depth levels are not evenly spaced ids (gathers, not slices), with branching at
# several depths and the root in the middle; and the hands' layout (slices and a broadcast root).
IRREGULAR_PARENTS = [3, 0, 0, -1, 3, 4, 1, 2, 7, 5, 3]


@pytest.mark.parametrize("parents", ["irregular", "default_hand", "makehuman"])
def test_forward_kinematics_matches_recursive_reference(parents, request):
    parents = IRREGULAR_PARENTS if parents == "irregular" else list(request.getfixturevalue(parents).parents)
    J, B = len(parents), 3
    tree = KinematicTree.from_parents(parents)
    children = [[c for c in range(J) if parents[c] == j] for j in range(J)]
    local = random_root(B * J, 2).double().view(B, J, 4, 4).requires_grad_()
    root = random_root(B, 3).double().requires_grad_()
    G = forward_kinematics(local, root, tree)
    assert G.shape == (B, J, 4, 4)
    reference = []
    for b in range(B):
        g = [None] * J
        g[tree.root_index] = root[b]
        fk_recursive(children, tree.root_index, local[b], g)
        reference.append(torch.stack(g))
    reference = torch.stack(reference)
    assert torch.allclose(G, reference, atol=1e-9)
    # Gradients equal those through the recursion.
    weights = torch.randn(B, J, 4, 4, dtype=torch.float64)
    grads = torch.autograd.grad((G * weights).sum(), (local, root))
    ref_grads = torch.autograd.grad((reference * weights).sum(), (local, root))
    for ours, theirs in zip(grads, ref_grads):
        assert torch.allclose(ours, theirs, atol=1e-9)


def test_kinematic_tree_rejects_several_roots():
    with pytest.raises(ValueError, match="exactly one root"):
        KinematicTree.from_parents([-1, 0, -1])


def _skinning_loop(vertices, weights, transforms):
    """``Σ_j w_ij · (T_j · [v_i; 1])[:3]`` joint by joint."""
    v1 = torch.cat([vertices, torch.ones_like(vertices[..., :1])], -1)
    return sum(weights[:, j, None] * (v1 @ transforms[:, j].transpose(1, 2))[..., :3]
               for j in range(weights.shape[1]))


def test_linear_blend_skinning_in_slices_equals_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(4)
    B, V, J = 7, 50, 6
    vertices = (torch.randn(B, V, 3, generator=g, dtype=torch.float64) * 40).requires_grad_()
    weights = torch.rand(V, J, generator=g, dtype=torch.float64) * (torch.rand(V, J, generator=g) < 0.4)
    transforms = random_root(B * J, 5).double().view(B, J, 4, 4).requires_grad_()
    expected = _skinning_loop(vertices, weights, transforms)
    one_pass = linear_blend_skinning(vertices, weights, transforms)
    # Force slices of two samples (the last slice has one).
    per_sample = V * 12 * 8
    monkeypatch.setattr(kinematics, "_BLEND_MAX_BYTES", per_sample * B - 1)
    monkeypatch.setattr(kinematics, "_BLEND_SLICE_BYTES", per_sample * 2)
    sliced = linear_blend_skinning(vertices, weights, transforms)
    assert sliced.shape == (B, V, 3)
    assert torch.allclose(one_pass, expected, atol=1e-9) and torch.equal(sliced, one_pass)
    upstream = torch.randn(B, V, 3, generator=g, dtype=torch.float64)
    sliced_grads = torch.autograd.grad((sliced * upstream).sum(), (vertices, transforms))
    loop_grads = torch.autograd.grad((expected * upstream).sum(), (vertices, transforms))
    for ours, theirs in zip(sliced_grads, loop_grads):
        assert torch.allclose(ours, theirs, atol=1e-9)
    # A rest mesh shared by the batch ([1, V, 3]) is expanded, not sliced past its end.
    shared = linear_blend_skinning(vertices[:1].detach(), weights, transforms.detach())
    expected_shared = _skinning_loop(vertices[:1].detach().expand(B, V, 3), weights, transforms.detach())
    assert torch.allclose(shared, expected_shared, atol=1e-9)


@pytest.mark.parametrize("reflect", [False, True])
def test_rigid_align_recovers_transform(reflect):
    g = torch.Generator().manual_seed(1)
    B, K = 4, 5
    src = torch.randn(B, K, 3, generator=g, dtype=torch.float64) * 50
    R = euler_to_matrix((torch.rand(B, 3, generator=g, dtype=torch.float64) * 2 - 1) * math.pi)
    t = torch.randn(B, 3, generator=g, dtype=torch.float64) * 100
    tgt = src @ R.transpose(1, 2) + t[:, None]
    if reflect:
        # A mirrored target: the best proper rotation, never a reflection.
        tgt = tgt * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    M = rigid_align(src, tgt)
    assert torch.allclose(torch.det(M[:, :3, :3]), torch.ones(B, dtype=torch.float64), atol=1e-9)
    if not reflect:
        assert torch.allclose(M[:, :3, :3], R, atol=1e-9) and torch.allclose(M[:, :3, 3], t, atol=1e-7)
    else:
        # The result is a least-squares optimum: no small rotation about it does better.
        def err(Mx):
            return ((src @ Mx[:, :3, :3].transpose(1, 2) + Mx[:, None, :3, 3] - tgt) ** 2).sum()
        base = err(M)
        for axis in range(3):
            d = torch.zeros(B, 3, dtype=torch.float64)
            d[:, axis] = 1e-3
            Mp = M.clone()
            Mp[:, :3, :3] = euler_to_matrix(d) @ M[:, :3, :3]
            assert err(Mp) >= base - 1e-9


def test_rigid_align_matches_loop_formula():
    # The original's per-sample formula: R = V Uᵀ, flipping V's last column when det < 0.
    g = torch.Generator().manual_seed(3)
    A = torch.randn(6, 5, 3, generator=g, dtype=torch.float64)
    Bp = torch.randn(6, 5, 3, generator=g, dtype=torch.float64)
    M = rigid_align(A, Bp)
    for i in range(6):
        ca, cb = A[i].mean(0), Bp[i].mean(0)
        H = (A[i] - ca).T @ (Bp[i] - cb)
        U, S, V = torch.svd(H)
        R = V @ U.T
        if torch.det(R) < 0:
            V = torch.stack((V[:, 0], V[:, 1], -V[:, 2]), 1)
            R = V @ U.T
        t = cb - R @ ca
        assert torch.allclose(M[i, :3, :3], R, atol=1e-9) and torch.allclose(M[i, :3, 3], t, atol=1e-9)


def randomise_correctives(model, seed):
    """Give the corrective networks random weights so that correctives are a few mm, not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in (model.skeleton_refine_net, model.skin_refine_net):
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_equals_loop_reference(any_hand, small_cfg, batch):
    torch.manual_seed(0)
    model = get_model("test", any_hand, small_cfg).eval()
    randomise_correctives(model, seed=batch)
    euler = random_euler(any_hand, batch, seed=batch)
    with torch.no_grad():
        out = model.decode(euler)
        skeleton_c = model.skeleton_refine_net(model.id_code)
        pose_c, id_c = model.skin_refine_net(euler, model.id_code[None])
    assert skeleton_c.abs().max() > 0.5 and pose_c.abs().max() > 0.5 and id_c.abs().max() > 0.5
    joints, verts = decode_reference(any_hand, euler.double(), skeleton_c, pose_c, id_c[0])
    assert out["joint_out"].shape == (batch, any_hand.joint_num, 3)
    assert out["mesh_out_refined"].shape == (batch, any_hand.vertex_num, 3)
    assert (out["joint_out"].double() - joints).abs().max() < 1e-4
    assert (out["mesh_out_refined"].double() - verts).abs().max() < 1e-4
    # The original's own float32 loop approach agrees too.
    with torch.no_grad():
        j2, v2 = decode_loop_model(model, euler)
    assert (j2.double() - joints).abs().max() < 1e-4 and (v2.double() - verts).abs().max() < 1e-4


def test_decode_rest_pose_reproduces_template_in_wrist_frame(any_hand, small_cfg):
    model = get_model("test", any_hand, small_cfg).eval()
    model.zero_correctives()
    with torch.no_grad():
        out = model.decode(torch.zeros(2, any_hand.joint_num, 3))
    inv_root = torch.from_numpy(any_hand.global_pose_inv[any_hand.root_index])
    v = torch.from_numpy(any_hand.vertices)
    expected = v @ inv_root[:3, :3].T + inv_root[:3, 3]
    wsum = torch.from_numpy(any_hand.skinning_weights.sum(1))[:, None]
    # LBS of the rest pose maps every vertex by the root's inverse, scaled by its weight sum.
    assert (out["mesh_out_refined"][0].double() - expected * wsum).abs().max() < 1e-3
    joints = torch.from_numpy(any_hand.global_pose[:, :3, 3])
    expected_j = joints @ inv_root[:3, :3].T + inv_root[:3, 3]
    assert (out["joint_out"][1].double() - expected_j).abs().max() < 1e-3


def test_decode_root_transform_training_mode(any_hand, small_cfg):
    # With a root transform (training mode), joints follow [R|t] · G'_root.
    model = get_model("test", any_hand, small_cfg).eval()
    randomise_correctives(model, seed=7)
    euler = random_euler(any_hand, 2, seed=5)
    root = torch.eye(4).repeat(2, 1, 1)
    root[:, :3, :3] = euler_to_matrix(torch.tensor([[0.3, -0.2, 1.0], [1.2, 0.1, -0.5]]))
    root[:, :3, 3] = torch.tensor([[10.0, -20.0, 500.0], [0.0, 5.0, 700.0]])
    G_root = model.refined_template_pose()[model.root_joint_idx]
    with torch.no_grad():
        out = model.pose(euler, root @ G_root)
        skeleton_c = model.skeleton_refine_net(model.id_code)
        pose_c, id_c = model.skin_refine_net(euler, model.id_code[None])
        ref_root = (root @ G_root).double()
    joints, verts = decode_reference(any_hand, euler.double(), skeleton_c, pose_c, id_c[0], root_transform=ref_root)
    assert (out.joints.double() - joints).abs().max() < 1e-3
    assert (out.mesh.double() - verts).abs().max() < 1e-3


def test_decode_gradients_flow(any_hand, small_cfg):
    model = get_model("train", any_hand, small_cfg)
    euler = random_euler(any_hand, 2, seed=2).requires_grad_(True)
    out = model.decode(euler)
    (out["mesh_out_refined"].square().mean() + out["joint_out"].square().mean()).backward()
    assert torch.isfinite(euler.grad).all() and euler.grad.abs().sum() > 0
    for name in ("skeleton_refine_net.fc_skeleton.2.weight", "skin_refine_net.fc_pose.2.weight",
                 "skin_refine_net.fc_id.2.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_decode_rejects_wrong_shape(any_hand, small_cfg):
    model = get_model("test", any_hand, small_cfg)
    with pytest.raises(ValueError, match=r"expected shape \[B, 22, 3\]"):
        model.decode(torch.zeros(1, 21, 3))


def test_pose_net_fills_dof_slots_in_row_major_order(any_hand, small_cfg):
    model = get_model("test", any_hand, small_cfg)
    D = any_hand.dof_num
    raw = torch.linspace(-2, 2, D)[None]
    euler = model.pose_net.output_to_euler_angle(raw)
    slots = np.argwhere(any_hand.dof_mask > 0)
    assert euler.shape == (1, 22, 3)
    for k, (j, axis) in enumerate(slots):
        assert torch.isclose(euler[0, j, axis], torch.tanh(raw[0, k]) * math.pi)
    mask = torch.from_numpy(any_hand.dof_mask) == 0
    assert (euler[0][mask] == 0).all()


@pytest.mark.parametrize("resnet_type,channels", [(18, 512), (34, 512), (50, 2048)])
def test_model_forward_image_to_mesh(any_hand, small_cfg, resnet_type, channels):
    small_cfg.resnet_type = resnet_type
    model = get_model("test", any_hand, small_cfg).eval()
    assert model.backbone_net.resnet.out_channels == channels
    with torch.no_grad():
        out = model({"img": torch.rand(2, 3, 64, 64)})
    assert out["mesh_out_refined"].shape == (2, any_hand.vertex_num, 3) and out["joint_euler"].shape == (2, 22, 3)
    assert (out["joint_euler"].abs() <= math.pi).all()


def test_decode_never_serves_stale_identity_results(any_hand, small_cfg, tmp_path):
    from common.io.checkpoint import load_checkpoint, save_checkpoint

    model = get_model("test", any_hand, small_cfg).eval()
    euler = random_euler(any_hand, 2, seed=11)

    def fresh():
        return model.decode(euler, model.identity())["mesh_out_refined"]

    with torch.no_grad():
        first = model.decode(euler)["mesh_out_refined"]
        assert torch.equal(model.decode(euler)["mesh_out_refined"], first)  # deterministic
        # In-place changes of every input of the identity part show in the next decode.
        for tensor in (model.skin_refine_net.fc_id[2].weight, model.skeleton_refine_net.fc_skeleton[0].bias,
                       model.skin_refine_net.fc_pose[2].bias, model.id_code):
            before = model.decode(euler)["mesh_out_refined"]
            tensor.add_(0.5)
            after = model.decode(euler)["mesh_out_refined"]
            assert not torch.allclose(before, after), "cache ignored an in-place change"
            assert torch.equal(after, fresh())
        path = tmp_path / "s.pth.tar"
        save_checkpoint({"epoch": 0, "network": get_model("test", any_hand, small_cfg).state_dict()}, path)
        load_checkpoint(model, path)
        assert torch.equal(model.decode(euler)["mesh_out_refined"], fresh())
    # With gradients the identity part carries the graph.
    model.decode(euler)["mesh_out_refined"].sum().backward()
    assert model.skin_refine_net.fc_id[2].weight.grad is not None


def test_pose_hand_with_explicit_correctives_matches_reference(any_hand):
    g = torch.Generator().manual_seed(4)
    euler = random_euler(any_hand, 2, seed=9).double()
    offset = torch.randn(any_hand.joint_num, 3, generator=g, dtype=torch.float64) * 2
    rest = torch.from_numpy(any_hand.vertices) + torch.randn(2, any_hand.vertex_num, 3, generator=g,
                                                             dtype=torch.float64)
    root = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    root[:, :3, :3] = euler_to_matrix(torch.tensor([[0.1, 0.2, 0.3], [-1.0, 0.5, 2.0]], dtype=torch.float64))
    root[:, :3, 3] = torch.tensor([[5.0, 6.0, 7.0], [-50.0, 0.0, 900.0]], dtype=torch.float64)
    joints, verts = pose_hand(any_hand, euler, root, offset, rest)
    ref_j, ref_v = decode_reference(any_hand, euler, offset, rest - torch.from_numpy(any_hand.vertices),
                                    None, root_transform=root)
    assert (joints - ref_j).abs().max() < 1e-9 and (verts - ref_v).abs().max() < 1e-9
