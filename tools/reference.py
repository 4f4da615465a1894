"""Plain loop references written straight from docs/design.md, "Decoding" and "Losses", as the
original computes them: per sample, forward kinematics down the tree with 4x4 products, and LBS as a
sum over joints of weight × transformed vertices (batched over samples); the penetration loss with
Python loops over bone points, bone pairs and samples; the Laplacian loss with a dense ``[V, V]``
matrix. They are the yardstick of the tests and of ``tools/bench.py``; they are deliberately simple,
not fast."""
import math

import numpy as np
import torch

from common.hand.kinematics import euler_to_matrix, to_homogeneous


def random_euler(hand, batch, seed, scale=math.pi / 2, curl=False):
    """``[B, J, 3]`` random angles within ±``scale`` on the hand's degrees of freedom; with
    ``curl`` the flexion angles are positive and 1.4× larger (fingers towards the palm), so that
    bones and fingertips collide."""
    g = torch.Generator().manual_seed(seed)
    e = (torch.rand(batch, hand.joint_num, 3, generator=g) * 2 - 1) * scale
    if curl:
        e[..., 2] = e[..., 2].abs() * 1.4
    return e * torch.from_numpy(hand.dof_mask)


def random_root(batch, seed):
    """``[B, 4, 4]`` random rigid root transforms (any rotation, translations of ~100 mm)."""
    g = torch.Generator().manual_seed(seed)
    R = euler_to_matrix((torch.rand(batch, 3, generator=g) * 2 - 1) * math.pi)
    return to_homogeneous(R, torch.randn(batch, 3, generator=g) * 100)


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
    """docs/design.md, "Decoding", step by step in float64, one sample at a time.

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
    The speed yardstick of ``tools/bench.py decode``."""
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


# --------------------------------------------------------------------------- losses, as the original
def bone_paths(children, root):
    """Root-to-leaf joint paths, depth first."""
    paths = []

    def walk(joint, path):
        path = path + [joint]
        if not children[joint]:
            paths.append(path)
        for child in children[joint]:
            walk(child, path)

    walk(root, [])
    return paths


def penet_loss_loop(hand_model, template_pose, rest_mesh, joint_out, mesh_out, step=0.1,
                    rigid_weight=1.0, non_rigid_weight=5.0):
    """The penetration loss (docs/design.md, "Losses") the way the original computes it, in torch:
    the radius of every bone point found one point at a time (batched over samples), every bone pair
    in a Python loop, every (non-rigid joint, path) pair in a loop with the collision search one
    sample at a time.

    Args:
        template_pose: ``[J, 4, 4]`` refined rest poses (mm).
        rest_mesh: ``[B, V, 3]`` rest mesh with correctives (mm).
        joint_out: ``[B, J, 3]`` posed joints; mesh_out: ``[B, V, 3]`` posed mesh (mm).
    Returns:
        ``[B]`` loss (mm). A non-rigid joint without segmented vertices counts, and contributes 0.
    """
    children, root = hand_model.children, hand_model.root_index
    names = hand_model.joint_names
    segmentation = torch.as_tensor(hand_model.segmentation, device=mesh_out.device)
    B = joint_out.shape[0]
    starts, ends, ts, radii = [], [], [], []

    def add_point(start, end, t):
        starts.append(start), ends.append(end), ts.append(float(t))
        position = template_pose[start, :3, 3] + (template_pose[end, :3, 3] - template_pose[start, :3, 3]) * t
        radii.append(torch.sqrt(((rest_mesh - position) ** 2).sum(2)).min(1)[0])  # [B]

    def make_bone(joint):
        if not children[joint]:
            add_point(joint, joint, 0.0)
        for child in children[joint]:
            for t in torch.arange(0, 1, step, dtype=torch.float64).tolist():
                add_point(joint, child, t)
            make_bone(child)

    make_bone(root)
    starts_t, ends_t = torch.tensor(starts), torch.tensor(ends)
    t = torch.tensor(ts, dtype=joint_out.dtype, device=joint_out.device)
    radii = torch.stack(radii)  # [P, B]
    points = joint_out[:, starts_t] + (joint_out[:, ends_t] - joint_out[:, starts_t]) * t[None, :, None]

    def bone_mask(start, end):
        return (starts_t == start) & (ends_t == end)

    paths = bone_paths(children, root)
    bones = [(p[i], p[i + 1]) for p in paths for i in range(len(p) - 1)]
    rigid, rigid_count = 0, 0
    for i in range(len(bones) - 1):
        for j in range(i + 1, len(bones)):
            (s1, e1), (s2, e2) = bones[i], bones[j]
            if s1 == s2 or s1 == e2 or e1 == s2:
                continue
            m1, m2 = bone_mask(s1, e1), bone_mask(s2, e2)
            p1, p2 = points[:, m1], points[:, m2]
            dist = torch.sqrt(((p1[:, :, None] - p2[:, None]) ** 2).sum(3))
            reach = radii[m1].T[:, :, None] + radii[m2].T[:, None]
            rigid = rigid + torch.clamp(reach - dist, min=0).mean((1, 2))
            rigid_count += 1

    non_rigid, non_rigid_count = 0, 0
    for joint in hand_model.non_rigid_joint_indices:
        skin = mesh_out[:, segmentation == joint]
        for path in paths:
            start, end = path[-2], path[-1]
            if "thumb" in names[start].lower() or "thumb" in names[end].lower():
                continue
            non_rigid_count += 1
            if skin.shape[1] == 0:
                continue
            mask = bone_mask(start, end)
            bone = points[:, mask]
            dist = torch.sqrt(((skin[:, :, None] - bone[:, None]) ** 2).sum(3)).min(1)[0]  # [B, n]
            reach = radii[mask].T
            per_sample = []
            for b in range(B):
                hits = torch.nonzero(dist[b] < reach[b])
                if len(hits):
                    first = int(hits.min())
                    per_sample.append(torch.abs((dist[b, first:] - reach[b, first:]).mean()))
                else:
                    per_sample.append(dist.new_zeros(()))
            non_rigid = non_rigid + torch.stack(per_sample)
    zero = joint_out.new_zeros(B)
    rigid = rigid / rigid_count if rigid_count else zero
    non_rigid = non_rigid / non_rigid_count if non_rigid_count else zero
    return rigid_weight * rigid + non_rigid_weight * non_rigid


def dense_laplacian_original(faces, vertex_num, dtype=np.float32):
    """The original's dense ``[V, V]`` uniform Laplacian (rows divided by degree + 1e-8)."""
    faces = np.asarray(faces)
    lap = np.zeros((vertex_num, vertex_num), dtype=dtype)
    for a, b in ((0, 1), (1, 0), (1, 2), (2, 1), (2, 0), (0, 2)):
        lap[faces[:, a], faces[:, b]] = -1
    rows = np.arange(vertex_num)
    lap[rows, rows] = 0  # a degenerate face's edge to itself is not a neighbour
    lap[rows, rows] = -lap.sum(1)
    for i in range(vertex_num):
        lap[i, :] /= lap[i, i] + 1e-8
    return torch.from_numpy(lap)


def laplacian_loss_dense(laplacian, vertices):
    """The original's Laplacian loss: a dense ``[V, V]`` product per sample. ``vertices [B, V, 3]`` → ``[B, V]``."""
    lap = torch.cat([torch.matmul(laplacian, vertices[b])[None] for b in range(vertices.shape[0])], 0)
    return lap.pow(2).sum(2)


def grid_mesh(rows, cols, spacing=3.0, plane=(0.2, -0.1, 5.0)):
    """A regular grid in the plane ``z = a·x + b·y + c`` (mm), every cell split along the same diagonal."""
    y, x = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                          indexing="ij")
    x, y = x.reshape(-1) * spacing, y.reshape(-1) * spacing
    verts = torch.stack([x, y, plane[0] * x + plane[1] * y + plane[2]], dim=1)
    ids = torch.arange(rows * cols).view(rows, cols)
    a, b, c, d = ids[:-1, :-1].reshape(-1), ids[:-1, 1:].reshape(-1), ids[1:, :-1].reshape(-1), ids[1:, 1:].reshape(-1)
    faces = torch.cat([torch.stack([a, b, d], 1), torch.stack([a, d, c], 1)])
    return verts, faces


def fewer_vertices(state, vertices):
    """A state dict as for a hand of ``vertices`` vertices (the skin layers' outputs cut): a
    snapshot "for another hand model" made from any hand."""
    state = dict(state)
    for layer in ("fc_pose", "fc_id"):
        for kind in ("weight", "bias"):
            key = f"skin_refine_net.{layer}.2.{kind}"
            if key in state:
                state[key] = state[key][:3 * vertices]
    return state


def surface_distance_every_triangle(points, vertices, faces, max_pairs=1 << 21):
    """``[P]`` distance from each point to the nearest of every triangle (no pruning), mm: the
    minimum of ``point_triangle_sq`` over all point-triangle pairs, ``max_pairs`` pairs at a time.

    Args:
        points: ``[P, 3]``; vertices: ``[V, 3]`` float64 mm; faces: ``[F, 3]`` long.
    """
    from common.metrics import point_triangle_sq

    tri = vertices[faces]
    chunk = max(1, max_pairs // len(tri))
    out = []
    for start in range(0, len(points), chunk):
        p = points[start:start + chunk]
        n = p.shape[0]
        d2 = point_triangle_sq(p.repeat_interleave(len(tri), 0), tri[:, 0].repeat(n, 1),
                               tri[:, 1].repeat(n, 1), tri[:, 2].repeat(n, 1))
        out.append(d2.view(n, -1).amin(1).sqrt())
    return torch.cat(out)
