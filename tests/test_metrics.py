"""The metrics of common.metrics on inputs whose answer is known by hand or in closed form, and the
exact surface distance against a brute-force reference."""
import math

import numpy as np
import pytest
import torch

from common import metrics
from common.hand.kinematics import euler_to_matrix
from tools.reference import surface_distance_every_triangle


def rotation(seed):
    g = torch.Generator().manual_seed(seed)
    return euler_to_matrix(((torch.rand(3, generator=g) * 2 - 1) * math.pi).double())


# ------------------------------------------------------------------------------ keypoints, depth, vertices
def test_joint_distances_are_euclidean_and_respect_validity():
    gt = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0)) * 50
    shift = torch.tensor([[3.0, -4.0, 12.0], [2.0, 3.0, 6.0]])  # |.| = 13 and 7; L1 sums 19 and 11
    pred = gt + shift[:, None]
    valid = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    dist, mask = metrics.joint_distances(pred, gt, valid)
    expected = torch.tensor([[13.0, 13, 0, 13], [0, 7, 7, 7]])
    assert torch.allclose(dist, expected, atol=1e-5)
    assert mask.tolist() == valid.bool().tolist()
    assert float(dist.sum() / mask.sum()) == pytest.approx((3 * 13 + 3 * 7) / 6, abs=1e-5)  # 10 mm
    with pytest.raises(ValueError, match=r"\[B, J, 3\]"):
        metrics.joint_distances(pred[..., :2], gt[..., :2], valid)


def test_depth_differences_on_a_map_with_known_differences():
    captured = torch.tensor([[[500.0, 510.0, 0.0], [520.0, 530.0, 540.0]]])
    rendered = torch.tensor([[[503.0, 500.0, 505.0], [0.0, 531.5, 536.0]]])
    diff, both = metrics.depth_differences(rendered, captured)
    assert both.tolist() == [[[True, True, False], [False, True, True]]]
    assert torch.allclose(diff, torch.tensor([[[3.0, 10.0, 0.0], [0.0, 1.5, 4.0]]]))
    assert float(diff.sum() / both.sum()) == pytest.approx(18.5 / 4)
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.depth_differences(rendered, captured[..., :2])


def test_vertex_error_of_an_oblique_shift():
    mesh = torch.randn(10, 3, generator=torch.Generator().manual_seed(1)) * 30
    shift = torch.tensor([2.0, -3.0, 6.0])  # |shift| = 7
    assert float(metrics.vertex_error(mesh + shift, mesh)) == pytest.approx(7.0, abs=1e-5)
    half = mesh.clone()
    half[:5] += shift  # half the vertices moved: mean 3.5
    assert float(metrics.vertex_error(half, mesh)) == pytest.approx(3.5, abs=1e-5)


# ------------------------------------------------------------------------------ point to triangle
TRIANGLE = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("point, expected", [
    ((2.0, 3.0, 5.0), 5.0),                     # above the face
    ((-3.0, 5.0, 4.0), 5.0),                    # beside edge a-c: closest (0, 5, 0)
    ((5.0, -2.0, -2.0), math.sqrt(8.0)),        # beside edge a-b: closest (5, 0, 0)
    ((8.0, 8.0, 1.0), math.sqrt(19.0)),         # beside edge b-c: closest (5, 5, 0)
    ((-3.0, -4.0, 0.0), 5.0),                   # corner a
    ((13.0, -4.0, 12.0), 13.0),                 # corner b
    ((-2.0, 14.0, -1.0), math.sqrt(4 + 16 + 1)),  # corner c
    ((1.0, 1.0, 0.0), 0.0),                     # on the face
])
def test_point_triangle_distance_by_region(point, expected):
    R = rotation(3)
    t = torch.tensor([100.0, -50.0, 20.0], dtype=torch.float64)
    tri = TRIANGLE @ R.T + t
    p = torch.tensor([point], dtype=torch.float64) @ R.T + t
    for a, b, c in ((0, 1, 2), (1, 2, 0), (2, 1, 0)):  # any corner order, either orientation
        d2 = metrics.point_triangle_sq(p, tri[a][None], tri[b][None], tri[c][None])
        assert math.sqrt(float(d2)) == pytest.approx(expected, abs=1e-9)


def test_degenerate_triangle_is_its_edges():
    a, b, c = (torch.tensor([[0.0, 0, 0]]), torch.tensor([[10.0, 0, 0]]), torch.tensor([[4.0, 0, 0]]))
    p = torch.tensor([[5.0, 3.0, 4.0]])
    assert float(metrics.point_triangle_sq(p.double(), a.double(), b.double(), c.double())) == pytest.approx(25.0)
    point = torch.tensor([[13.0, 4.0, 0.0]], dtype=torch.float64)  # all three corners at one point
    zero = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    assert float(metrics.point_triangle_sq(point, zero, zero, zero)) == pytest.approx(144 + 4 + 9)


def reference_distance(p, vertices, faces):
    """Brute force in plain Python: for every triangle, the projection onto its plane when it
    falls inside (barycentric coordinates), else the nearest of its three edges; the minimum."""
    def seg(p, a, b):
        ab = b - a
        t = min(1.0, max(0.0, float(np.dot(p - a, ab) / np.dot(ab, ab))))
        return float(np.linalg.norm(p - (a + t * ab)))

    best = math.inf
    for f in faces:
        a, b, c = vertices[f[0]], vertices[f[1]], vertices[f[2]]
        n = np.cross(b - a, c - a)
        n /= np.linalg.norm(n)
        q = p - np.dot(p - a, n) * n
        # Barycentric coordinates of q by areas.
        area = np.dot(np.cross(b - a, c - a), n)
        u = np.dot(np.cross(c - b, q - b), n) / area
        v = np.dot(np.cross(a - c, q - c), n) / area
        w = 1 - u - v
        if min(u, v, w) >= 0:
            d = abs(float(np.dot(p - a, n)))
        else:
            d = min(seg(p, a, b), seg(p, b, c), seg(p, c, a))
        best = min(best, d)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_point_surface_distance_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    vertices = rng.normal(0, 10, (20, 3))
    faces = np.array([rng.choice(20, 3, replace=False) for _ in range(25)])
    points = np.concatenate([rng.normal(0, 12, (40, 3)), vertices[:5] + 1e-3])
    expected = np.array([reference_distance(p, vertices, faces) for p in points])
    for max_pairs in (metrics.MAX_PAIRS, 1, 37):  # one chunk, one point at a time, uneven chunks
        got = metrics.point_surface_distance(torch.tensor(points), torch.tensor(vertices), torch.tensor(faces),
                                             max_pairs=max_pairs)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-9)
    # Not the distance to the nearest vertex: most points are nearer to a triangle's inside or edge.
    nearest_vertex = np.linalg.norm(points[:, None] - vertices[None], axis=-1).min(1)
    assert (nearest_vertex > expected + 0.1).mean() > 0.5


@pytest.mark.parametrize("shift_mm", [0.0, 0.5, 4.0, 40.0])
def test_pruned_search_equals_every_triangle_on_a_hand(shift_mm):
    """On the default hand (9,860 faces, hundreds of face blocks): the block and face pruning of
    point_surface_distance gives exactly the minimum over every triangle, for points on, near,
    and far from the surface, including a hand moved by its own size."""
    from common.hand.default_hand import make_default_hand
    hand = make_default_hand()
    vertices = torch.tensor(hand.vertices, dtype=torch.float64)
    faces = torch.tensor(hand.faces, dtype=torch.long)
    gen = torch.Generator().manual_seed(int(shift_mm * 10))
    picked = torch.randperm(vertices.shape[0], generator=gen)[:150]
    points = vertices[picked] + shift_mm * torch.randn(150, 3, generator=gen, dtype=torch.float64)
    every = surface_distance_every_triangle(points, vertices, faces)
    for max_pairs in (metrics.MAX_PAIRS, 20_000):
        got = metrics.point_surface_distance(points, vertices, faces, max_pairs=max_pairs)
        torch.testing.assert_close(got, every, rtol=0, atol=1e-12)
    assert metrics.FACE_BLOCK < faces.shape[0] // 100  # the blocks are many, not one


@pytest.mark.parametrize("seed", range(6))
def test_pruning_keeps_large_triangles_of_several_blocks(seed):
    """Random triangles as large as the cloud itself (60 vertices, 80 faces: 5 blocks of 16),
    points near them and around: a block's sphere must hold its triangles whole, not just their
    centroids, or a block whose large triangle passes near a point is dropped."""
    rng = np.random.default_rng(seed)
    vertices = rng.normal(0, 20, (60, 3))
    faces = np.array([rng.choice(60, 3, replace=False) for _ in range(80)])
    on_faces = np.einsum("pk,pkc->pc", rng.dirichlet(np.ones(3), 60), vertices[faces[rng.integers(80, size=60)]])
    points = np.concatenate([on_faces + rng.normal(0, 2, (60, 3)), rng.normal(0, 25, (40, 3))])
    assert faces.shape[0] > 4 * metrics.FACE_BLOCK  # several blocks
    points, vertices, faces = torch.tensor(points), torch.tensor(vertices), torch.tensor(faces)
    every = surface_distance_every_triangle(points, vertices, faces)
    for max_pairs in (metrics.MAX_PAIRS, 500):
        got = metrics.point_surface_distance(points, vertices, faces, max_pairs=max_pairs)
        torch.testing.assert_close(got, every, rtol=0, atol=1e-12)


def test_face_blocks_cover_every_face_in_compact_groups():
    rng = np.random.default_rng(3)
    centres = torch.tensor(rng.uniform(-50, 50, (1000, 3)))
    blocks = metrics._face_blocks(centres, 16)
    assert blocks.shape == (64, 16)  # 1000 faces padded to 16 * 2^6
    assert set(blocks.reshape(-1).tolist()) == set(range(1000))
    # A k-d split: each block spans far less than the cloud (100 mm wide).
    spans = (centres[blocks].amax(1) - centres[blocks].amin(1)).amax(1)
    assert float(spans.median()) < 40


def cube_mesh(half: float, n: int):
    """A closed cube of side ``2 * half`` centred at the origin, each face an ``n x n`` grid of
    squares split into two triangles: ``(vertices [V, 3], faces [F, 3])``."""
    verts, faces, index = [], [], {}

    def vid(p):
        key = tuple(np.round(p, 9))
        if key not in index:
            index[key] = len(verts)
            verts.append(p)
        return index[key]

    ticks = np.linspace(-half, half, n + 1)
    for axis in range(3):
        for sign in (-1.0, 1.0):
            u, v = [k for k in range(3) if k != axis]
            for i in range(n):
                for j in range(n):
                    quad = []
                    for di, dj in ((0, 0), (1, 0), (1, 1), (0, 1)):
                        p = np.zeros(3)
                        p[axis], p[u], p[v] = sign * half, ticks[i + di], ticks[j + dj]
                        quad.append(vid(p))
                    faces += [[quad[0], quad[1], quad[2]], [quad[0], quad[2], quad[3]]]
    return np.array(verts), np.array(faces)


def test_surface_distances_between_nested_cubes_in_closed_form():
    """Inner cube (half side 10) inside an outer one (half side 12), both moved by one oblique
    rigid motion. Every inner vertex p is 12 - max|p_k| from the outer surface (2 mm: it lies on
    the inner surface); every outer vertex q is ||max(|q_k| - 10, 0)|| from the inner cube (2 mm
    on the faces, sqrt(8) on the edges, sqrt(12) at the corners)."""
    inner, inner_f = cube_mesh(10.0, 4)
    outer, outer_f = cube_mesh(12.0, 3)  # another grid: the nearest vertex is not below the point
    R, t = rotation(5).numpy(), np.array([30.0, -20.0, 55.0])
    moved = lambda x: torch.tensor(x @ R.T + t)  # noqa: E731
    inner_to_outer, outer_to_inner = metrics.surface_distances(
        moved(inner), moved(outer), torch.tensor(inner_f), torch.tensor(outer_f))
    expected_in = 12.0 - np.abs(inner).max(1)
    expected_out = np.linalg.norm(np.maximum(np.abs(outer) - 10.0, 0.0), axis=1)
    np.testing.assert_allclose(inner_to_outer.numpy(), expected_in, atol=1e-9)
    np.testing.assert_allclose(outer_to_inner.numpy(), expected_out, atol=1e-9)
    assert np.allclose(expected_in, 2.0) and expected_out.max() == pytest.approx(math.sqrt(12))

    summary = metrics.summarise_surface(inner_to_outer.numpy(), outer_to_inner.numpy())
    assert summary["surface_out_to_gt_mean_mm"] == pytest.approx(2.0)
    assert summary["surface_out_to_gt_p90_mm"] == pytest.approx(2.0)
    assert summary["surface_gt_to_out_mean_mm"] == pytest.approx(expected_out.mean())
    assert summary["surface_gt_to_out_p90_mm"] == pytest.approx(np.percentile(expected_out, 90))
    assert summary["surface_error_mm"] == pytest.approx(0.5 * (2.0 + expected_out.mean()))
    assert 2.0 < expected_out.mean() < math.sqrt(8)


def test_vertices_sliding_along_the_surface_have_no_surface_error():
    """A flat grid whose inner vertices slide within the plane: per-vertex error, none on the surface."""
    n = 6
    ticks = np.linspace(0.0, 50.0, n + 1)
    grid = np.array([[x, y, 0.0] for y in ticks for x in ticks])
    faces = []
    for j in range(n):
        for i in range(n):
            a = j * (n + 1) + i
            faces += [[a, a + 1, a + n + 2], [a, a + n + 2, a + n + 1]]
    faces = torch.tensor(faces)
    slid = grid.copy()
    inner = (grid[:, 0] > 0) & (grid[:, 0] < 50) & (grid[:, 1] > 0) & (grid[:, 1] < 50)
    slid[inner, 0] += 3.0
    slid[inner, 1] -= 2.0
    R = rotation(8).numpy()
    a, b = torch.tensor(slid @ R.T), torch.tensor(grid @ R.T)
    assert float(metrics.vertex_error(a, b)) == pytest.approx(math.sqrt(13) * inner.sum() / len(grid))
    there, back = metrics.surface_distances(a, b, faces)
    assert float(there.max()) < 1e-9 and float(back.max()) < 1e-9
    # Lifted off the plane by 1.5 mm along its normal: 1.5 mm everywhere, both ways.
    there, back = metrics.surface_distances(a + 1.5 * torch.tensor(R[:, 2]), b, faces)
    np.testing.assert_allclose(there.numpy(), 1.5, atol=1e-9)
    np.testing.assert_allclose(back.numpy(), 1.5, atol=1e-9)


def test_surface_distance_rejects_bad_input():
    v, f = torch.zeros(4, 3), torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        metrics.point_surface_distance(torch.zeros(3, 2), v, f)
    with pytest.raises(ValueError, match=r"face indices must lie in \[0, 4\)"):
        metrics.point_surface_distance(torch.zeros(3, 3), v, torch.tensor([[0, 1, 4]]))
    with pytest.raises(ValueError, match="non-empty"):
        metrics.point_surface_distance(torch.zeros(3, 3), v, torch.zeros(0, 3, dtype=torch.long))


# ------------------------------------------------------------------------------ summaries, correlations
def test_summary_mean_and_90th_percentile():
    s = metrics.summarise_surface(np.arange(11.0), np.array([1.0, 3.0]), prefix="rest_surface")
    assert s == {"rest_surface_error_mm": pytest.approx(0.5 * (5.0 + 2.0)),
                 "rest_surface_out_to_gt_mean_mm": 5.0, "rest_surface_out_to_gt_p90_mm": pytest.approx(9.0),
                 "rest_surface_gt_to_out_mean_mm": 2.0, "rest_surface_gt_to_out_p90_mm": pytest.approx(2.8)}


def test_pearson_and_rms_known_values():
    assert metrics.pearson(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5)
    a = np.random.default_rng(0).normal(size=(30, 3))
    assert metrics.pearson(a, 2 * a + 3) == pytest.approx(1.0)
    assert metrics.pearson(a, -a) == pytest.approx(-1.0)
    assert metrics.pearson(a, np.ones_like(a)) is None  # a constant has no correlation
    assert metrics.rms(np.array([3.0, -4.0])) == pytest.approx(math.sqrt(12.5))
    with pytest.raises(ValueError, match="entries"):
        metrics.pearson(np.zeros(3), np.zeros(4))
