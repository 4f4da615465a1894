"""Plain loop references written straight from DESIGN §3, as the original computes them:
per sample, forward kinematics down the tree with 4x4 products, and LBS as a sum over joints of
weight × transformed vertices (batched over samples). They are the yardstick of the tests and of
``main/bench.py``; they are deliberately simple, not fast."""
import math

import torch

from common.utils.kinematics import euler_to_matrix, to_homogeneous


def rot_x(a):
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=torch.float64)


def rot_y(a):
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64)


def rot_z(a):
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=torch.float64)


def euler_matrix_4x4(theta):
    """One joint's ``Rz · Ry · Rx`` as a 4x4 float64 matrix; ``theta`` = (x, y, z) radians."""
    x, y, z = (float(t) for t in theta)
    out = torch.eye(4, dtype=torch.float64)
    out[:3, :3] = rot_z(z) @ rot_y(y) @ rot_x(x)
    return out


def fk_recursive(children, joint, local, global_pose):
    """``global_pose[child] = global_pose[joint] · local[child]``, depth first from ``joint``."""
    for child in children[joint]:
        global_pose[child] = global_pose[joint] @ local[child]
        fk_recursive(children, child, local, global_pose)


def decode_reference(hand_model, euler, skeleton_corrective=None, pose_corrective=None, id_corrective=None,
                     root_transform=None):
    """DESIGN §3 step by step in float64, one sample at a time.

    Args:
        euler: ``[B, J, 3]`` radians.
        skeleton_corrective: ``[J, 3]`` mm or None.
        pose_corrective: ``[B, V, 3]`` mm or None; id_corrective: ``[V, 3]`` mm or None.
        root_transform: ``[B, 4, 4]`` or None (identity, the decode mode).
    Returns:
        joints ``[B, J, 3]``, vertices ``[B, V, 3]`` (float64, mm).
    """
    f64 = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    B, J = euler.shape[:2]
    local = f64(hand_model.local_pose).clone()
    if skeleton_corrective is not None:
        local[:, :3, 3] += f64(skeleton_corrective)
    inv = f64(hand_model.global_pose_inv)
    weights = f64(hand_model.skinning_weights)
    children, root = hand_model.children, hand_model.root_index
    joints, verts = [], []
    for b in range(B):
        posed_local = [local[j] @ euler_matrix_4x4(euler[b, j]) for j in range(J)]
        g = [None] * J
        g[root] = torch.eye(4, dtype=torch.float64) if root_transform is None else f64(root_transform[b])
        fk_recursive(children, root, posed_local, g)
        v = f64(hand_model.vertices).clone()
        if pose_corrective is not None:
            v = v + f64(pose_corrective[b])
        if id_corrective is not None:
            v = v + f64(id_corrective)
        v1 = torch.cat([v, torch.ones(len(v), 1, dtype=torch.float64)], 1)
        out = torch.zeros_like(v)
        for j in range(J):
            out += weights[:, j:j + 1] * (g[j] @ inv[j] @ v1.T).T[:, :3]
        joints.append(torch.stack([g[j][:3, 3] for j in range(J)]))
        verts.append(out)
    return torch.stack(joints), torch.stack(verts)


def decode_loop_model(model, euler):
    """The original's ``decode`` approach with the model's own networks, in float32: per-sample FK in a
    Python loop, the identity code repeated over the batch, LBS summed over joints with ``bmm``.
    The speed yardstick of ``main/bench.py decode``."""
    B, J = euler.shape[:2]
    dev = euler.device
    skeleton_corrective = model.skeleton_refine_net(model.id_code)
    local = model.local_pose.clone()
    local[:, :3, 3] += skeleton_corrective
    # The original's euler2mat is vectorised over samples and joints; so is this yardstick's.
    rot = to_homogeneous(euler_to_matrix(euler))
    children, root = model.hand_model.children, model.root_joint_idx
    joint_out, trans = [], []
    for b in range(B):
        g = [None] * J
        g[root] = torch.eye(4, device=dev)
        fk_recursive(children, root, torch.bmm(local, rot[b]), g)
        joint_out.append(torch.stack([g[j][:3, 3] for j in range(J)]))
        trans.append(torch.stack([g[j] @ model.global_pose_inv[j] for j in range(J)]))
    trans = torch.stack(trans).permute(1, 0, 2, 3)  # [J, B, 4, 4]
    pose_c, id_c = model.skin_refine_net(euler, model.id_code[None].repeat(B, 1))
    v = model.template_vertices[None].repeat(B, 1, 1) + pose_c + id_c
    v1 = torch.cat([v, torch.ones_like(v[:, :, :1])], 2)
    w = model.skinning_weight[None].repeat(B, 1, 1)
    mesh = sum(w[:, :, j, None] * torch.bmm(trans[j], v1.permute(0, 2, 1)).permute(0, 2, 1)[:, :, :3]
               for j in range(J))
    return torch.stack(joint_out), mesh
