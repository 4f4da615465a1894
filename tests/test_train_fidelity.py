"""The whole training forward against a loop transcription of the original's ``Model.forward``
(``mode='train'``): values of every per-element loss and the gradient of the summed loss.

The transcription (``original_train_forward``) follows the original step by step: skeleton
corrective added to the local translations, the refined template skeleton by recursive FK from
the template root, a per-sample Kabsch root (SVD, reflection fixed by negating the last column of
V), per-sample recursive FK of ``L'_j · R_j``, the skinning transforms, the pose corrective fed
the detached angles, LBS as a sum over joints, the depth maps one view at a time (our renderer
standing in for neural_renderer), and the four losses with the original's weights: the joint
L1 times validity, the per-view masked smooth-L1 summed and divided by the view count, the
penetration loss of the loops in ``tools.reference`` on the rest mesh skinned by the refined
skeleton at zero angles (``mesh_refined_v``), and the dense Laplacian times its weight.

The scene makes every term matter: skeleton correctives of several mm, pose and identity
correctives of a few mm, flexed poses whose bones collide, and captured depth maps that overlap
the rendering (a displaced copy of the hand), so that the depth loss has a gradient.
"""
import math

import pytest
import torch

from main.loops import split_batch
from data.dataset import DeepHandMeshDataset
from main.config import Config
from main.model import get_model
from tests.conftest import make_tiny_set
from tools.reference import (dense_laplacian_original, fk_recursive, laplacian_loss_dense, penet_loss_loop,
                             random_euler)

VIEWS = 3
RENDER = (24, 24)


def kabsch_original(A, B):
    """The original's ``rigid_transform_3D``: ``(R [3, 3], t [3, 1])`` with ``R A + t ≈ B``."""
    ca, cb = A.mean(0), B.mean(0)
    H = (A - ca).T @ (B - cb)
    U, _s, Vh = torch.linalg.svd(H)
    V = Vh.T
    R = V @ U.T
    if torch.det(R) < 0:
        V = torch.stack((V[:, 0], V[:, 1], -V[:, 2]), 1)
        R = V @ U.T
    t = -R @ ca[:, None] + cb[:, None]
    return R, t


def lbs_sum_over_joints(vertices, weights, transforms):
    """``Σ_j w_j · (T_j [v; 1])[:3]``; vertices ``[B, V, 3]``, transforms ``[B, J, 4, 4]``."""
    v1 = torch.cat([vertices, torch.ones_like(vertices[..., :1])], 2)
    return sum(weights[None, :, j, None] * torch.bmm(transforms[:, j], v1.transpose(1, 2)).transpose(1, 2)[..., :3]
               for j in range(transforms.shape[1]))


def original_train_forward(model, inputs, targets, meta_info, lap_weight):
    """The original's ``'train'`` branch, one sample and one joint at a time (float32).

    Returns ``(losses, tensors)``: the four per-element losses and the tensors whose gradients the
    test compares (``joint_euler``, the posed mesh handed to the renderer)."""
    hand = model.hand_model
    J, root, children = hand.joint_num, hand.root_index, hand.children
    joint_euler = model.pose_net(model.backbone_net(inputs["img"]))
    if joint_euler.requires_grad:
        joint_euler.retain_grad()
    B = joint_euler.shape[0]

    local_refined = model.local_pose.clone()
    local_refined[:, :3, 3] += model.skeleton_refine_net(model.id_code)
    template = [None] * J
    template[root] = model.global_pose[root].clone()
    fk_recursive(children, root, list(local_refined), template)
    template = torch.stack(template)

    align = hand.align_joint_indices
    joints, trans = [], []
    for b in range(B):
        R, t = kabsch_original(template[align, :3, 3], targets["joint_world"][b, align])
        mat = torch.cat([torch.cat([R, t], 1), torch.tensor([[0.0, 0.0, 0.0, 1.0]])])
        rotation = differentiable_euler(joint_euler[b])
        g = [None] * J
        g[root] = mat @ template[root]
        fk_recursive(children, root, list(torch.bmm(local_refined, rotation)), g)
        joints.append(torch.stack([g[j][:3, 3] for j in range(J)]))
        trans.append(torch.stack([g[j] @ model.global_pose_inv[j] for j in range(J)]))
    joint_out, trans = torch.stack(joints), torch.stack(trans)

    pose_c, id_c = model.skin_refine_net(joint_euler.detach(), model.id_code[None].repeat(B, 1))
    rest = model.template_vertices[None] + pose_c + id_c
    mesh_out = lbs_sum_over_joints(rest, model.skinning_weight, trans)
    if mesh_out.requires_grad:
        mesh_out.retain_grad()
    zero_angle = (template @ model.global_pose_inv)[None].expand(B, -1, -1, -1)
    mesh_refined_v = lbs_sum_over_joints(rest, model.skinning_weight, zero_angle)

    depth_loss = []
    for v in range(meta_info["camrot"].shape[1]):
        out = model.objective.renderer(mesh_out, *(meta_info[k][:, v:v + 1] for k in
                                         ("camrot", "campos", "focal", "princpt", "affine")))[:, 0]
        gt = targets["depthmap"][:, v]
        mask = ((out != 0) * (gt != 0)).float()
        depth_loss.append(torch.nn.functional.smooth_l1_loss(out, gt, reduction="none") * mask)
    depth_loss = sum(depth_loss) / len(depth_loss)

    lap = dense_laplacian_original(hand.faces, hand.vertex_num)
    losses = {
        "joint": torch.abs(joint_out - targets["joint_world"]) * targets["joint_valid"][..., None],
        "depthmap": depth_loss,
        "penet": penet_loss_loop(hand, template.detach(), mesh_refined_v.detach(), joint_out, mesh_out),
        "lap": laplacian_loss_dense(lap, mesh_out) * lap_weight,
    }
    return losses, {"joint_euler": joint_euler, "mesh_out": mesh_out}


def differentiable_euler(theta):
    """``[J, 3]`` angles → ``[J, 4, 4]`` ``Rz · Ry · Rx``, entry by entry as the original's euler2mat."""
    x, y, z = theta[:, 0], theta[:, 1], theta[:, 2]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    Rx = torch.stack([one, zero, zero, zero, x.cos(), -x.sin(), zero, x.sin(), x.cos()], 1).view(-1, 3, 3)
    Ry = torch.stack([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], 1).view(-1, 3, 3)
    Rz = torch.stack([z.cos(), -z.sin(), zero, z.sin(), z.cos(), zero, zero, zero, one], 1).view(-1, 3, 3)
    R = torch.bmm(Rz, torch.bmm(Ry, Rx))
    out = torch.zeros(theta.shape[0], 4, 4, dtype=theta.dtype)
    out[:, :3, :3] = R
    out[:, 3, 3] = 1
    return out


@pytest.fixture(scope="module", params=["default", "makehuman"])
def scene(request, tmp_path_factory):
    """A model with visible correctives and flexed predicted poses, a batch of 2 samples with
    ``VIEWS`` target views whose captured depth is the rendering of a displaced hand."""
    hand = request.getfixturevalue("default_hand" if request.param == "default" else "makehuman")
    data_dir = make_tiny_set(tmp_path_factory, hand, f"fidelity_{request.param}", seed=3, cameras=4)
    config = Config()
    config.update_from_strings(["resnet_type=18", "input_img_shape=[32,32]", f"rendered_img_shape={list(RENDER)}",
                                f"render_view_num={VIEWS}"])
    config.data_dir = str(data_dir)
    dataset = DeepHandMeshDataset.from_config(config, "train", hand, seed=0)
    # The transcription's Kabsch (the original's) uses every alignment joint: take samples that have all.
    complete = [s for s in (dataset[i] for i in range(len(dataset)))
                if s["joint_valid"][hand.align_joint_indices].all()]
    assert len(complete) >= 2, "the tiny set needs two samples with every alignment keypoint"
    inputs, targets, meta_info = split_batch(torch.utils.data.default_collate(complete[:2]), torch.device("cpu"))
    torch.manual_seed(0)
    model = get_model("train", hand, config).train()
    with torch.no_grad():
        model.skeleton_refine_net.fc_skeleton[-1].bias.normal_(0, 4.0)  # mm
        model.skin_refine_net.fc_id[-1].bias.normal_(0, 1.5)
        # Pose correctives of ~1 mm per radian: the angles' gradient through them is then large
        # enough to show whether the corrective is fed detached angles, as the original does.
        model.skin_refine_net.fc_pose[0].weight.normal_(0, 0.2)
        model.skin_refine_net.fc_pose[-1].weight.normal_(0, 0.05)
        # Flexed poses, a little different per sample: the angles are the pose net's bias (atanh
        # of the target over pi) plus what its small initial weights make of the image feature.
        target = random_euler(hand, 1, seed=0, scale=math.pi / 2, curl=True)[0]
        slots = torch.nonzero(model.pose_net.DoF.reshape(-1), as_tuple=True)[0]
        model.pose_net.fc[-1].bias.copy_(torch.atanh((target.reshape(-1)[slots] / math.pi).clamp(-0.95, 0.95)))
        # Captured depth: the rendering of the predicted hand pushed 3 mm along a fixed direction
        # and rippled by up to 2 mm, so that rendering and target overlap but differ.
        _, tensors = original_train_forward(model, inputs, dict(targets, depthmap=torch.zeros(
            2, VIEWS, *RENDER)), meta_info, 1.0)
        mesh = tensors["mesh_out"].detach()
        ripple = 2.0 * torch.sin(torch.arange(mesh.shape[1], dtype=mesh.dtype))[None, :, None]
        displaced = mesh + torch.tensor([1.0, -2.0, 2.0]) + ripple
        depth = model.objective.renderer(displaced, meta_info["camrot"], meta_info["campos"], meta_info["focal"],
                               meta_info["princpt"], meta_info["affine"])
        assert model.skeleton_refine_net(model.id_code).abs().max() > 3.0  # mm: G' is not G
    targets = dict(targets, depthmap=depth)
    valid = targets["joint_valid"]
    assert valid[:, model.align_joint_idx].all(), "the transcription's Kabsch uses every alignment joint"
    return model, inputs, targets, meta_info, config


def model_forward_with_mesh_grad(model, inputs, targets, meta_info):
    """The model's training losses, plus the angles and the renderer's input vertices (gradients retained)."""
    seen = {}

    def keep_angles(_module, _args, output):
        output.retain_grad()
        seen["joint_euler"] = output

    def keep_vertices(_module, args):
        if args[0].requires_grad:
            args[0].retain_grad()
        seen["mesh_out"] = args[0]

    hooks = [model.pose_net.register_forward_hook(keep_angles),
             model.objective.renderer.register_forward_pre_hook(keep_vertices)]
    try:
        losses = model(inputs, targets, meta_info, "train")
    finally:
        for h in hooks:
            h.remove()
    return losses, seen


def corrective_and_pose_parameters(model):
    return {name: p for name, p in model.named_parameters()
            if name.startswith(("skeleton_refine_net.", "skin_refine_net.", "pose_net."))}


def test_training_forward_equals_the_original_loops(scene):
    model, inputs, targets, meta_info, config = scene
    ref, ref_t = original_train_forward(model, inputs, targets, meta_info, config.loss_lap_weight)
    assert ref["penet"].min() > 0.3, f"the flexed poses must collide: {ref['penet']}"
    assert (ref["depthmap"] > 0).float().mean() > 0.05, "rendering and target must overlap"
    sum(v.mean() for v in ref.values()).backward()
    params = corrective_and_pose_parameters(model)
    ref_grads = {n: p.grad.clone() for n, p in params.items()}
    ref_angle_grad, ref_mesh_grad = ref_t["joint_euler"].grad.clone(), ref_t["mesh_out"].grad.clone()
    model.zero_grad()

    ours, seen = model_forward_with_mesh_grad(model, inputs, targets, meta_info)
    assert set(ours) == set(ref)
    for key in ref:
        assert ours[key].shape == ref[key].shape, key
        scale = float(ref[key].detach().abs().max())
        err = float((ours[key] - ref[key]).detach().abs().max())
        assert err <= 1e-4 * max(scale, 1.0), (key, err, scale)
    sum(v.mean() for v in ours.values()).backward()

    def close(a, b, what):
        assert a is not None, f"{what}: no gradient"
        scale = float(b.abs().max())
        assert scale > 0, f"{what}: the reference gradient is zero"
        err = float((a - b).abs().max())
        assert err <= 2e-3 * scale, (what, err, scale)

    for name, p in params.items():
        close(p.grad, ref_grads[name], name)
    close(seen["joint_euler"].grad, ref_angle_grad, "d loss / d joint_euler")
    close(seen["mesh_out"].grad, ref_mesh_grad, "d loss / d rendered vertices")
