"""The training losses against plain loop references written here straight from docs/design.md, "Losses":
nested Python loops over samples, bones, bone pairs and points (the nearest-vertex search of one
point is a numpy min), and a dense Laplacian filled by loops over faces and rows."""
import math

import numpy as np
import pytest
import torch

import common.nets.loss as loss_module
from common.nets.loss import (DepthmapLoss, JointLoss, LaplacianLoss, PenetLoss, _entries_at_most, nearest_vertex,
                              nearest_vertex_per_segment, uniform_laplacian)
from common.hand.kinematics import euler_to_matrix, pose_hand
from main.model import get_model
from tools.reference import bone_paths, dense_laplacian_original, random_euler, random_root, grid_mesh, laplacian_loss_dense, penet_loss_loop


def rel_err(ours, ref):
    ours = torch.as_tensor(ours, dtype=torch.float64)
    ref = torch.as_tensor(np.asarray(ref), dtype=torch.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float((ours - ref).norm() / ref.norm().clamp(min=1e-300))


# ------------------------------------------------------------------------ references
def joint_reference(out, gt, valid):
    B, J, _ = out.shape
    res = np.zeros((B, J, 3))
    for b in range(B):
        for j in range(J):
            for c in range(3):
                res[b, j, c] = abs(float(out[b, j, c]) - float(gt[b, j, c])) * float(valid[b, j])
    return res


def smooth_l1(x, beta=1.0):
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta


def depth_reference(out, gt):
    """Per pixel: the mean over views of smooth-L1 where both depths are non-zero, else 0."""
    B, N, H, W = out.shape
    res = np.zeros((B, H, W))
    for b in range(B):
        for y in range(H):
            for x in range(W):
                total = 0.0
                for v in range(N):
                    o, g = float(out[b, v, y, x]), float(gt[b, v, y, x])
                    if o != 0 and g != 0:
                        total += smooth_l1(o - g)
                res[b, y, x] = total / N
    return res


def penet_reference(names, parents, segmentation, root, non_rigid, template_joints, rest_mesh, joints, mesh,
                    step=0.1, rigid_weight=1.0, non_rigid_weight=5.0):
    """The penetration loss (docs/design.md, "Losses"), one sample, one bone pair, one point at a time.

    Arrays are numpy float64: template_joints ``[B, J, 3]``, rest_mesh/mesh ``[B, V, 3]``,
    joints ``[B, J, 3]``. A non-rigid joint without vertices: its pairs count, contribute 0.
    Returns ``(total, rigid, non_rigid)`` lists of ``B`` floats.
    """
    J = len(parents)
    children = [[c for c in range(J) if parents[c] == j] for j in range(J)]
    ts = []
    while len(ts) * step < 1 - 1e-12:
        ts.append(len(ts) * step)
    n = len(ts)

    paths = bone_paths(children, root)
    bones = [(p[i], p[i + 1]) for p in paths for i in range(len(p) - 1)]

    totals, rigids, non_rigids = [], [], []
    for b in range(len(joints)):
        def at(pos, bone, t):
            s, e = bone
            return [pos[s][c] + t * (pos[e][c] - pos[s][c]) for c in range(3)]

        radius = {}
        for bone in bones:
            for k, t in enumerate(ts):
                p = np.array(at(template_joints[b], bone, t))
                radius[bone, k] = float(np.sqrt(((rest_mesh[b] - p) ** 2).sum(1)).min())
        posed = {(bone, k): at(joints[b], bone, t) for bone in bones for k, t in enumerate(ts)}

        rigid_sum, rigid_cnt = 0.0, 0
        for i in range(len(bones)):
            for j in range(i + 1, len(bones)):
                (s1, e1), (s2, e2) = bones[i], bones[j]
                if s1 == s2 or s1 == e2 or e1 == s2:
                    continue
                acc = 0.0
                for k1 in range(n):
                    for k2 in range(n):
                        d = math.dist(posed[bones[i], k1], posed[bones[j], k2])
                        acc += max(0.0, radius[bones[i], k1] + radius[bones[j], k2] - d)
                rigid_sum += acc / (n * n)
                rigid_cnt += 1
        rigid = rigid_sum / rigid_cnt if rigid_cnt else 0.0

        nr_sum, nr_cnt = 0.0, 0
        for joint in non_rigid:
            skin = np.array([mesh[b][v] for v in range(len(segmentation)) if segmentation[v] == joint])
            for path in paths:
                bone = (path[-2], path[-1])
                if "thumb" in names[bone[0]] or "thumb" in names[bone[1]]:
                    continue
                nr_cnt += 1
                if len(skin) == 0:
                    continue
                d = [float(np.sqrt(((skin - np.array(posed[bone, k])) ** 2).sum(1)).min()) for k in range(n)]
                r = [radius[bone, k] for k in range(n)]
                first = next((k for k in range(n) if d[k] < r[k]), None)
                if first is not None:
                    nr_sum += abs(sum(d[k] - r[k] for k in range(first, n)) / (n - first))
        non_rigid_loss = nr_sum / nr_cnt if nr_cnt else 0.0
        rigids.append(rigid)
        non_rigids.append(non_rigid_loss)
        totals.append(rigid_weight * rigid + non_rigid_weight * non_rigid_loss)
    return totals, rigids, non_rigids


def dense_laplacian_reference(faces, V):
    L = np.zeros((V, V))
    for a, b, c in faces:
        for i, j in ((a, b), (b, c), (c, a)):
            if i != j:
                L[i, j] = L[j, i] = 1.0
    for i in range(V):
        degree = L[i].sum()
        if degree > 0:
            L[i] /= -degree
            L[i, i] = 1.0
    return L


def laplacian_loss_reference(faces, vertices):
    L = dense_laplacian_reference(faces, vertices.shape[1])
    return np.stack([((L @ vertices[b]) ** 2).sum(1) for b in range(len(vertices))])


# ------------------------------------------------------------------------ helpers
_MODELS = {}


def trained_like_model(hand, cfg):
    """A ``'train'`` model (random correctives, as the original initialises them), cached per hand."""
    key = id(hand)
    if key not in _MODELS:
        with torch.random.fork_rng():  # reproducible here, without touching other tests' RNG
            torch.manual_seed(0)
            _MODELS[key] = get_model("train", hand, cfg).eval()
    return _MODELS[key]


def penet_inputs(hand, cfg, batch=3, seed=0, curl=True):
    """float64 ``(template_pose [J,4,4], rest_mesh, joint_out, mesh_out)`` from the model in training mode."""
    model = trained_like_model(hand, cfg)
    with torch.no_grad():
        out = model.pose(random_euler(hand, batch, seed, curl=curl), random_root(batch, seed))
        template = model.refined_template_pose()
    return (template.double(), out.rest_mesh.double(), out.joints.double(), out.mesh.double())


def run_reference(loss, hand, template, rest, joints, mesh, segmentation=None, **kw):
    tj = template[..., :3, 3].expand(joints.shape[0], -1, -1).numpy()
    seg = hand.segmentation if segmentation is None else segmentation
    return penet_reference(hand.joint_names, list(hand.parents), list(seg), hand.root_index,
                           hand.non_rigid_joint_indices, tj, rest.numpy(), joints.numpy(), mesh.numpy(), **kw)


# ------------------------------------------------------------------------ joint, depth
def test_joint_loss_matches_reference_and_zeroes_invalid():
    g = torch.Generator().manual_seed(1)
    out = torch.randn(3, 22, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gt = torch.randn(3, 22, 3, generator=g, dtype=torch.float64)
    valid = (torch.rand(3, 22, generator=g) > 0.3).double()
    valid[:, 4] = 0  # thumb0: never in the keypoint files
    loss = JointLoss()(out, gt, valid)
    assert loss.shape == (3, 22, 3)
    assert rel_err(loss.detach(), joint_reference(out.detach(), gt, valid)) < 1e-12
    assert torch.equal(JointLoss()(out, gt, valid[..., None]), loss)
    loss.mean().backward()
    assert torch.all(out.grad[valid == 0] == 0)
    assert torch.all(out.grad[valid == 1] != 0)


def test_depthmap_loss_matches_reference_and_masks():
    g = torch.Generator().manual_seed(2)
    B, N, H, W = 2, 3, 6, 5
    out = 500 + 3 * torch.randn(B, N, H, W, generator=g, dtype=torch.float64)  # |diff| both < and > β
    gt = out + 2 * torch.randn(B, N, H, W, generator=g, dtype=torch.float64)
    out[torch.rand(B, N, H, W, generator=g) < 0.25] = 0  # rendered empty, captured present
    gt[torch.rand(B, N, H, W, generator=g) < 0.25] = 0  # captured empty, rendered present
    out.requires_grad_(True)
    loss = DepthmapLoss()(out, gt)
    assert loss.shape == (B, H, W)
    assert rel_err(loss.detach(), depth_reference(out.detach(), gt)) < 1e-12
    # The original's list of per-view maps gives the same values.
    as_list = DepthmapLoss()([out[:, v] for v in range(N)], [gt[:, v] for v in range(N)])
    assert torch.allclose(as_list, loss, rtol=0, atol=1e-12)
    loss.mean().backward()
    both = (out.detach() != 0) & (gt != 0)
    assert torch.all(out.grad[~both] == 0)
    assert int((out.grad[both] != 0).sum()) == int(both.sum())
    # Pixels where only one map has depth count as 0, not as a missing pixel.
    only_one = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    assert torch.equal(DepthmapLoss()(only_one + torch.tensor([[1.0, 0], [0, 0]]),
                                      only_one + torch.tensor([[0, 9.0], [0, 0]])), torch.zeros(1, 2, 2))


# ------------------------------------------------------------------------ penetration
def test_penetration_bones_pairs_and_paths(default_hand):
    loss = PenetLoss.from_hand_model(default_hand)
    name = default_hand.joint_index
    # 21 bones × 10 points + one point per leaf (5).
    assert loss.point_num == 21 * 10 + 5 and loss.points_per_bone == 10
    # C(21, 2) pairs minus the 10 pairs of wrist bones and the 16 parent-child pairs.
    assert len(loss.bone_pairs) == 210 - 10 - 16
    pairs = {frozenset(p) for p in loss.bone_pairs}
    wrist_index = (name("wrist"), name("index1"))
    assert frozenset([wrist_index, (name("middle1"), name("middle2"))]) in pairs
    assert frozenset([wrist_index, (name("wrist"), name("middle1"))]) not in pairs
    assert frozenset([wrist_index, (name("index1"), name("index2"))]) not in pairs
    assert sorted(loss.last_bones) == sorted((name(f + "3"), name(f + "_null"))
                                             for f in ("index", "middle", "ring", "pinky"))
    # Index tables never enter a state dict (docs/design.md, "Checkpoints").
    assert loss.state_dict() == {} and LaplacianLoss.from_hand_model(default_hand).state_dict() == {}
    assert {"segmentation", "steps"} <= {n for n, _ in loss.named_buffers()}


def test_penetration_matches_loop_reference(any_hand, small_cfg):
    template, rest, joints, mesh = penet_inputs(any_hand, small_cfg, batch=3, seed=0)
    loss = PenetLoss.from_hand_model(any_hand)
    joints.requires_grad_(True), mesh.requires_grad_(True), rest.requires_grad_(True)
    rigid, non_rigid = loss.terms(template, rest, joints, mesh)
    total = loss(template, rest, joints, mesh)
    ref_total, ref_rigid, ref_non_rigid = run_reference(loss, any_hand, template, rest.detach(),
                                                        joints.detach(), mesh.detach())
    # The poses must exercise both terms, or the comparison says little.
    assert min(ref_rigid) > 0 and sum(x > 0 for x in ref_non_rigid) >= 2
    assert total.shape == (3,)
    assert rel_err(rigid.detach(), ref_rigid) < 1e-5
    assert rel_err(non_rigid.detach(), ref_non_rigid) < 1e-5
    assert rel_err(total.detach(), ref_total) < 1e-5
    # A batched template pose gives the same numbers.
    batched = loss(template.expand(3, -1, -1, -1), rest, joints, mesh)
    assert torch.allclose(batched, total, rtol=1e-12, atol=0)

    total.mean().backward()
    assert torch.isfinite(joints.grad).all() and torch.isfinite(mesh.grad).all()
    assert joints.grad.abs().sum() > 0
    # Only the non-rigid joints' skin is pushed, and only where a fingertip is in it.
    seg = torch.from_numpy(any_hand.segmentation)
    other = ~torch.isin(seg, torch.tensor(any_hand.non_rigid_joint_indices))
    assert mesh.grad[:, other].abs().sum() == 0 and mesh.grad.abs().sum() > 0
    assert rest.grad is None  # radii are thresholds only

    # Other spacing and weights: same reference.
    other_loss = PenetLoss.from_hand_model(any_hand, bone_step_size=0.25, rigid_weight=2.0, non_rigid_weight=3.0)
    assert other_loss.points_per_bone == 4
    ref, _, _ = run_reference(other_loss, any_hand, template, rest.detach(), joints.detach(), mesh.detach(),
                              step=0.25, rigid_weight=2.0, non_rigid_weight=3.0)
    assert rel_err(other_loss(template, rest, joints, mesh).detach(), ref) < 1e-5


def test_penetration_equals_the_originals_loop_structure(any_hand, small_cfg):
    """The benchmark's yardstick (the original's loops, in torch) computes the same loss."""
    template, rest, joints, mesh = penet_inputs(any_hand, small_cfg, batch=3, seed=4)
    ours = PenetLoss.from_hand_model(any_hand)(template, rest, joints, mesh)
    loop = penet_loss_loop(any_hand, template, rest, joints, mesh)
    assert loop.shape == (3,) and bool((loop > 0).all())
    assert rel_err(ours, loop) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_penetration_gradient_equals_autograd_through_the_loops(any_hand, small_cfg, dtype):
    """Our hand-written backward of the rigid term and the nearest-vertex-only backward of the
    non-rigid term give autograd's gradient through the original's loops, in both precisions."""
    template, rest, joints, mesh = (t.to(dtype) for t in penet_inputs(any_hand, small_cfg, batch=3, seed=6))
    weights = torch.tensor([0.5, 1.0, 2.0], dtype=dtype)  # per-sample upstream gradients differ

    def grads(fn):
        j, m = joints.clone().requires_grad_(True), mesh.clone().requires_grad_(True)
        (fn(template, rest, j, m) * weights).sum().backward()
        return j.grad, m.grad

    ours = grads(PenetLoss.from_hand_model(any_hand).to(dtype))
    loop = grads(lambda *a: penet_loss_loop(any_hand, *a))
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for name, a, b in zip(("joint_out", "mesh_out"), ours, loop):
        assert b.abs().sum() > 0, f"the poses must push {name}"
        assert rel_err(a, b) < tol, name


@pytest.mark.parametrize("spread_mm", [0.0, 3.0, 12.0, 300.0])
def test_point_radii_equal_a_full_search(default_hand, small_cfg, spread_mm):
    """The radii search narrows the vertices with the batch's mean mesh (module notes); with
    pose correctives of any spread — none, a few mm, large, absurd (the full-search fallback) —
    every radius equals the nearest distance over all vertices."""
    template, rest, _, _ = penet_inputs(default_hand, small_cfg, batch=4, seed=8)
    g = torch.Generator().manual_seed(3)
    rest = (rest + torch.randn(rest.shape, generator=g, dtype=rest.dtype) * spread_mm / 3).float()
    loss = PenetLoss.from_hand_model(default_hand)
    points = loss.bone_points(template.float())
    full = torch.cdist(points[None].expand(4, -1, -1).double(), rest.double()).amin(dim=2)
    radii = loss.point_radii(template.float(), rest)
    assert radii.shape == (4, loss.point_num)
    assert float((radii.double() - full).abs().max()) < 1e-4


@pytest.mark.parametrize("search", ["exact", "product"])
def test_nearest_vertex_is_the_exact_argmin_with_ties(search, monkeypatch):
    if search == "product":  # the search large meshes take
        monkeypatch.setattr(loss_module, "_EXACT_SEARCH_PAIRS", 0)
    g = torch.Generator().manual_seed(5)
    vertices = torch.randn(3, 500, 3, generator=g) * 40 + 100  # mm, far from the origin
    vertices[:, 250] = vertices[:, 17]  # an exact tie: the lower index wins, as argmin's
    points = vertices[:, [17, 3, 499]] + torch.randn(3, 3, 3, generator=g) * 1e-3
    points = torch.cat([points, torch.randn(3, 20, 3, generator=g) * 40 + 100], dim=1)
    points[:, 0] = vertices[:, 17]
    ours = nearest_vertex(points, vertices)
    exact = torch.cdist(points.double(), vertices.double()).argmin(dim=2)
    assert torch.equal(ours, exact)
    assert bool((ours[:, 0] == 17).all())


@pytest.mark.parametrize("search", ["exact", "product"])
def test_nearest_vertex_per_segment_equals_a_search_per_slice(search, monkeypatch):
    if search == "product":
        monkeypatch.setattr(loss_module, "_EXACT_SEARCH_PAIRS", 0)
    g = torch.Generator().manual_seed(9)
    vertices = torch.randn(2, 1300, 3, generator=g) * 30 + 80
    points = torch.randn(2, 17, 3, generator=g) * 30 + 80
    bounds = [0, 5, 64, 1200, 1300]  # a short segment, one of a whole block, a wide one (blocked search)
    ours = nearest_vertex_per_segment(points, vertices, bounds)
    assert ours.shape == (2, 4, 17)
    for k in range(4):
        lo, hi = bounds[k], bounds[k + 1]
        assert torch.equal(ours[:, k], torch.cdist(points.double(), vertices[:, lo:hi].double()).argmin(dim=2) + lo)


@pytest.mark.parametrize("columns", [1, 63, 200, 1024, 1100, 4932])
def test_entries_at_most_equals_a_full_comparison(columns):
    """The block-pruned search finds exactly the entries a full comparison does, also on a
    column slice of a wider array (rows not contiguous with each other)."""
    g = torch.Generator().manual_seed(columns)
    wide = torch.rand(13, columns + 7, generator=g)
    values = wide[:, 3:3 + columns]
    bound = torch.rand(13, generator=g) * 0.2
    bound[4] = -1.0  # a row with no entry
    bound[5] = 2.0  # a row with all of them
    rows, cols = _entries_at_most(values, bound)
    found = sorted(zip(rows.tolist(), cols.tolist()))
    expected = torch.nonzero(values <= bound[:, None]).tolist()
    assert found == [tuple(e) for e in expected]


def test_penetration_float32_model_outputs(default_hand, small_cfg):
    # The training dtype: finite, and close to the float64 numbers.
    template, rest, joints, mesh = penet_inputs(default_hand, small_cfg, batch=2, seed=3)
    loss = PenetLoss.from_hand_model(default_hand)
    j32 = joints.float().requires_grad_(True)
    ours = loss(template.float(), rest.float(), j32, mesh.float())
    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), loss(template, rest, joints, mesh), rtol=1e-3)
    ours.sum().backward()
    assert torch.isfinite(j32.grad).all()


def test_penetration_no_collision_is_zero(default_hand, small_cfg):
    template, rest, joints, mesh = penet_inputs(default_hand, small_cfg, batch=2, seed=1)
    loss = PenetLoss.from_hand_model(default_hand)
    # A rest mesh made of the bone points themselves: every radius is 0, nothing can collide.
    points = loss.bone_points(template)
    rest0 = points[torch.arange(rest.shape[1]) % points.shape[0]].expand(2, -1, -1).clone()
    assert loss.point_radii(template, rest0).abs().max() < 1e-9
    joints.requires_grad_(True), mesh.requires_grad_(True)
    total = loss(template, rest0, joints, mesh)
    assert torch.equal(total, torch.zeros(2, dtype=torch.float64))
    total.sum().backward()
    assert torch.all(joints.grad == 0) and torch.all(mesh.grad == 0)
    # Skin far away from every fingertip: the non-rigid term is exactly 0.
    _, non_rigid = loss.terms(template, rest, joints, mesh + 1e4)
    assert torch.equal(non_rigid, torch.zeros(2, dtype=torch.float64))


def test_penetration_collision_at_first_bone_point(default_hand, small_cfg):
    # Rest pose (identity root): one wrist vertex sits on index3, the first point of the index
    # finger's last bone; the other non-rigid skin is far away.
    hand = default_hand
    template, rest, _, _ = penet_inputs(hand, small_cfg, batch=2, seed=2)
    model = trained_like_model(hand, small_cfg)
    with torch.no_grad():
        out = model.pose(torch.zeros(2, hand.joint_num, 3), model.global_pose[model.root_joint_idx])
    joints, mesh = out.joints.double(), out.mesh.double()
    rest = out.rest_mesh.double()
    loss = PenetLoss.from_hand_model(hand)
    seg = torch.from_numpy(hand.segmentation)
    nr = torch.isin(seg, torch.tensor(hand.non_rigid_joint_indices))
    mesh = mesh.clone()
    mesh[:, nr] += 1e4
    vertex = int(torch.nonzero(seg == hand.joint_index("wrist"))[0])
    index3, tip = hand.joint_index("index3"), hand.joint_index("index_null")
    offset = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    mesh[:, vertex] = joints[:, index3] + offset
    mesh.requires_grad_(True)
    rigid, non_rigid = loss.terms(template, rest, joints, mesh)

    t = torch.arange(0, 1, 0.1, dtype=torch.float64)
    bone = joints[:, index3, None] + t[:, None] * (joints[:, tip] - joints[:, index3])[:, None]
    d = (bone - mesh.detach()[:, vertex, None]).norm(dim=-1)
    r = loss.point_radii(template, rest)[:, loss.last_bone_points[0]]
    assert torch.all(d[:, 0] < r[:, 0])  # collision at the first bone point: k = 0
    expected = (d - r).mean(dim=1).abs() / 8  # one of 2 joints × 4 paths
    assert rel_err(non_rigid.detach(), expected) < 1e-9
    ref_total, _, ref_non_rigid = run_reference(loss, hand, template, rest, joints, mesh.detach())
    assert rel_err(non_rigid.detach(), ref_non_rigid) < 1e-5
    non_rigid.sum().backward()
    assert torch.isfinite(mesh.grad).all() and mesh.grad[:, vertex].abs().sum() > 0

    # A vertex beyond the middle of the bone: the first collision is further along the bone.
    mesh2 = mesh.detach().clone()
    mesh2[:, vertex] = bone[:, 7] + offset
    _, non_rigid2 = loss.terms(template, rest, joints, mesh2)
    d2 = (bone - mesh2[:, vertex, None]).norm(dim=-1)
    k = [int(torch.nonzero(d2[b] < r[b])[0]) for b in range(2)]
    assert min(k) > 0
    expected2 = torch.stack([(d2[b, k[b]:] - r[b, k[b]:]).mean().abs() for b in range(2)]) / 8
    assert rel_err(non_rigid2, expected2) < 1e-9
    assert rel_err(non_rigid2, run_reference(loss, hand, template, rest, joints, mesh2)[2]) < 1e-5


def test_penetration_joint_without_vertices(default_hand, small_cfg):
    # thumb1's skin given to thumb2: the original's min over no vertices raises; here those
    # (joint, path) pairs contribute 0 and still count in the average.
    hand = default_hand
    template, rest, joints, mesh = penet_inputs(hand, small_cfg, batch=3, seed=0)
    seg = hand.segmentation.copy()
    thumb1 = hand.joint_index("thumb1")
    seg[seg == thumb1] = hand.joint_index("thumb2")
    loss = PenetLoss(hand.joint_names, hand.parents, seg, hand.root_index, hand.non_rigid_joint_indices)
    mesh.requires_grad_(True)
    _, non_rigid = loss.terms(template, rest, joints, mesh)
    _, _, ref = run_reference(loss, hand, template, rest, joints, mesh.detach(), segmentation=seg)
    assert sum(x > 0 for x in ref) >= 2
    assert rel_err(non_rigid.detach(), ref) < 1e-5
    non_rigid.sum().backward()
    assert torch.isfinite(mesh.grad).all()
    # No non-rigid joint has any vertex: the term is 0, not NaN.
    seg[:] = hand.joint_index("index2")
    empty = PenetLoss(hand.joint_names, hand.parents, seg, hand.root_index, hand.non_rigid_joint_indices)
    assert torch.equal(empty.terms(template, rest, joints, mesh)[1], torch.zeros(3, dtype=torch.float64))


# ------------------------------------------------------------------------ Laplacian
def test_laplacian_matches_dense_loop_reference(any_hand):
    euler = random_euler(any_hand, 2, seed=5, curl=False).double()
    _, verts = pose_hand(any_hand, euler)
    verts = verts.clone().requires_grad_(True)
    loss64 = LaplacianLoss.from_hand_model(any_hand, dtype=torch.float64)
    ours = loss64(verts)
    assert ours.shape == (2, any_hand.vertex_num)
    ref = laplacian_loss_reference(any_hand.faces, verts.detach().numpy())
    assert rel_err(ours.detach(), ref) < 1e-5
    ours.mean().backward()
    assert torch.isfinite(verts.grad).all() and verts.grad.abs().sum() > 0
    # The default float32 matrix with float32 inputs (training): same numbers to float32 precision.
    loss32 = LaplacianLoss.from_hand_model(any_hand)
    assert loss32.laplacian.dtype == torch.float32 and loss32.laplacian.layout == torch.sparse_coo
    assert rel_err(loss32(verts.detach().float()), ref) < 1e-3


def test_laplacian_equals_the_originals_dense_matrix(any_hand):
    """The benchmark's yardstick: the original's dense matrix (float32, degree + 1e-8) and its
    per-sample products give the sparse loss's numbers."""
    dense = dense_laplacian_original(any_hand.faces, any_hand.vertex_num)
    sparse = uniform_laplacian(any_hand.faces, any_hand.vertex_num).to_dense()
    assert dense.dtype == torch.float32 and dense.shape == sparse.shape
    assert float((dense - sparse).abs().max()) < 1e-6
    _, verts = pose_hand(any_hand, random_euler(any_hand, 2, seed=6, curl=False))
    verts = verts.float()
    ours = LaplacianLoss.from_hand_model(any_hand)(verts)
    assert rel_err(ours, laplacian_loss_dense(dense, verts)) < 1e-3


def test_laplacian_flat_grid_interior_is_zero():
    rows, cols = 7, 9
    verts, faces = grid_mesh(rows, cols)
    loss = LaplacianLoss(faces, rows * cols, dtype=torch.float64)
    # Two samples: the plane and the plane moved rigidly.
    R = euler_to_matrix(torch.tensor([0.3, -0.5, 1.1], dtype=torch.float64))
    batch = torch.stack([verts, verts @ R.T + torch.tensor([10.0, -4.0, 7.0], dtype=torch.float64)])
    out = loss(batch).view(2, rows, cols)
    assert out[:, 1:-1, 1:-1].abs().max() < 1e-20
    assert torch.all(out[:, 0, :].sum(1) > 0)  # boundary vertices are not at their neighbours' mean
    assert rel_err(out.view(2, -1), laplacian_loss_reference(faces.numpy(), batch.numpy())) < 1e-5


def test_laplacian_sparse_memory_at_12k_vertices():
    verts, faces = grid_mesh(120, 100)
    V = verts.shape[0]
    assert V == 12000
    loss = LaplacianLoss(faces, V)
    L = loss.laplacian
    assert L.layout == torch.sparse_coo
    sparse_bytes = L._indices().numel() * L._indices().element_size() + L._values().numel() * L._values().element_size()
    assert sparse_bytes < 0.01 * V * V * 4
    assert loss(verts[None].float().expand(2, -1, -1)).shape == (2, V)


def test_laplacian_gradient_and_devices():
    verts, faces = grid_mesh(4, 5)
    loss = LaplacianLoss(faces, 20, dtype=torch.float64)
    bumpy = (verts + 0.3 * torch.randn(2, 20, 3, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: loss(v), (bumpy,))
    # Odd corners: an isolated vertex (empty row, as the original) and a degenerate face.
    odd = LaplacianLoss(torch.cat([faces, torch.tensor([[0, 0, 1]])]), 21, dtype=torch.float64)
    v21 = torch.cat([bumpy.detach(), torch.full((2, 1, 3), 50.0, dtype=torch.float64)], dim=1)
    assert torch.allclose(odd(v21)[:, :20], loss(bumpy.detach()), rtol=1e-12, atol=0)
    assert torch.equal(odd(v21)[:, 20], torch.zeros(2, dtype=torch.float64))
    dense = torch.as_tensor(dense_laplacian_reference(faces.numpy(), 20))
    assert torch.allclose(uniform_laplacian(faces, 20, torch.float64).to_dense(), dense, rtol=0, atol=1e-15)
    if torch.cuda.is_available():
        cuda = LaplacianLoss(faces, 20).to("cuda")
        assert cuda.laplacian.is_cuda
        x = bumpy.detach().float().cuda().requires_grad_(True)
        cuda(x).sum().backward()
        assert torch.allclose(cuda(x).cpu().double(), loss(bumpy.detach()), rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_penetration_on_cuda(default_hand, small_cfg):
    template, rest, joints, mesh = penet_inputs(default_hand, small_cfg, batch=2, seed=0)
    loss = PenetLoss.from_hand_model(default_hand)
    cpu = loss(template, rest, joints, mesh)
    gpu = loss.to("cuda")(template.cuda(), rest.cuda(), joints.cuda(), mesh.cuda())
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-9)
