"""Tests of the differentiable depth renderer (common/renderer/depth_renderer.py, docs/renderer.md).

The references here are independent of PyTorch3D: analytic planes, a numpy
ray/triangle brute force through every pixel centre, and ``cv2.projectPoints``.
Pixel convention under test: OpenCV, pixel centres at integer coordinates.
"""

import cv2
import numpy as np
import pytest
import torch

from common.renderer.rasterizer import pixel_ndc, rasterize_depth
from common.renderer.depth_renderer import DepthRenderer, project_points, pytorch3d_available
from tests.conftest import MAKEHUMAN_DIR as MAKEHUMAN

HAVE_PYTORCH3D = pytorch3d_available()
NO_PYTORCH3D = "PyTorch3D is not installed here: this test compares with it (the native backend's own tests run)"


def _need_pytorch3d():
    if not HAVE_PYTORCH3D:
        pytest.skip(NO_PYTORCH3D)


@pytest.fixture(params=["native", "pytorch3d"])
def backend(request):
    """Each test using it runs with both rasterisers (PyTorch3D's skipped where it is absent)."""
    if request.param == "pytorch3d" and not HAVE_PYTORCH3D:
        pytest.skip("PyTorch3D is not installed here: this test's pytorch3d-backend run is skipped "
                    "(its native-backend run runs)")
    return request.param


# Full-size camera of the data set (the KRT_512 pixel space: 512 high, 334 wide).
IMG_H, IMG_W = 512, 334
FOCAL = (1210.0, 1195.0)
PRINCPT = (170.3, 251.8)


# ----------------------------------------------------------------- helpers
def makehuman():
    if not MAKEHUMAN.is_dir():
        pytest.skip(f"../shared/hand_models/makehuman_right not found: {MAKEHUMAN}")
    from common.hand.hand_model import load_hand_model
    return load_hand_model(MAKEHUMAN)


def look_at(campos, target, up):
    """World→camera rotation (rows = camera x right, y down, z forward) of a camera at
    ``campos`` looking at ``target`` with ``up`` pointing up in the image."""
    z = np.asarray(target, float) - np.asarray(campos, float)
    z /= np.linalg.norm(z)
    y = -np.asarray(up, float)
    y = y - (y @ z) * z
    y /= np.linalg.norm(y)
    x = np.cross(y, z)
    return np.stack([x, y, z])


def crop_affine(uv, out_h, out_w, scale=1.5, img_h=IMG_H, img_w=IMG_W):
    """2x3 affine taking the bounding box of ``uv`` (enlarged ``scale``× about its centre and
    clipped to the image) onto an ``out_h × out_w`` image, box edges onto image edges, as the
    data pipeline's crop (docs/data.md, "Crops"), in the pixel-centre-at-integer convention."""
    lo, hi = uv.min(0), uv.max(0)
    c, half = (lo + hi) / 2, (hi - lo) / 2 * scale
    x0, y0 = max(c[0] - half[0], -0.5), max(c[1] - half[1], -0.5)
    x1, y1 = min(c[0] + half[0], img_w - 0.5), min(c[1] + half[1], img_h - 0.5)
    sx, sy = out_w / (x1 - x0), out_h / (y1 - y0)
    return np.array([[sx, 0.0, -0.5 - sx * x0], [0.0, sy, -0.5 - sy * y0]])


def cv2_project(points, camrot, campos, focal, princpt):
    rvec, _ = cv2.Rodrigues(np.asarray(camrot, np.float64))
    tvec = -np.asarray(camrot, np.float64) @ np.asarray(campos, np.float64)
    K = np.array([[focal[0], 0, princpt[0]], [0, focal[1], princpt[1]], [0, 0, 1]], np.float64)
    uv, _ = cv2.projectPoints(np.asarray(points, np.float64).reshape(-1, 1, 3), rvec, tvec, K, np.zeros(5))
    return uv.reshape(-1, 2)


def apply_affine(A, uv):
    return uv @ A[:, :2].T + A[:, 2]


def brute_force_depth(verts, faces, camrot, campos, focal, princpt, affine, H, W, near=1.0, chunk=256):
    """Nearest camera depth through every pixel centre by ray/triangle intersection in camera
    space (Möller–Trumbore), float64.  The ray of pixel (r, c) is K⁻¹ A⁻¹ (c, r, 1).

    Returns ``depth [H, W]`` (0 = empty) and ``margin [H, W]``: for the winning face, the
    smallest barycentric coordinate, i.e. how far inside its triangle the ray passes
    (tiny = the pixel centre is on an edge, where coverage is a matter of rounding).
    """
    xc = (np.asarray(verts, float) - np.asarray(campos, float)) @ np.asarray(camrot, float).T
    tri = xc[np.asarray(faces)]                                       # [F, 3, 3]
    rr, cc = np.mgrid[0:H, 0:W].astype(float)
    uvp = np.stack([cc.ravel(), rr.ravel()], -1)
    A = np.eye(3)[:2] if affine is None else np.asarray(affine, float)
    uv = (uvp - A[:, 2]) @ np.linalg.inv(A[:, :2]).T
    d = np.stack([(uv[:, 0] - princpt[0]) / focal[0], (uv[:, 1] - princpt[1]) / focal[1],
                  np.ones(len(uv))], -1)[:, None, :]                  # [P, 1, 3]
    best = np.full(len(uv), np.inf)
    margin = np.zeros(len(uv))
    for s in range(0, len(tri), chunk):
        p0, e1, e2 = tri[s:s + chunk, 0], tri[s:s + chunk, 1] - tri[s:s + chunk, 0], tri[s:s + chunk, 2] - tri[s:s + chunk, 0]
        pvec = np.cross(d, e2)                                        # [P, f, 3]
        det = (pvec * e1).sum(-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / det
            tvec = -p0[None]
            a = (tvec * pvec).sum(-1) * inv
            qvec = np.cross(tvec, e1)
            b = (d * qvec).sum(-1) * inv
            t = (e2 * qvec).sum(-1) * inv                             # ray z = 1, so t = depth
            m = np.minimum(np.minimum(a, b), 1 - a - b)
            hit = (m > 0) & (t >= near) & np.isfinite(t)
        t = np.where(hit, t, np.inf)
        k = t.argmin(1)
        tk = t[np.arange(len(uv)), k]
        better = tk < best
        best[better] = tk[better]
        margin[better] = m[np.arange(len(uv)), k][better]
    depth = np.where(np.isfinite(best), best, 0.0)
    return depth.reshape(H, W), margin.reshape(H, W)


def to_t(x, dtype=torch.float32):
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def cams_t(camrot, campos, focal, princpt, affine=None, dtype=torch.float32):
    """One camera as [1, 1, ...] tensors."""
    out = [to_t(camrot, dtype)[None, None], to_t(campos, dtype)[None, None],
           to_t(focal, dtype)[None, None], to_t(princpt, dtype)[None, None]]
    out.append(None if affine is None else to_t(affine, dtype)[None, None])
    return out


def hand_view(verts, azimuth_deg, elevation_deg, distance=700.0):
    """A camera ``distance`` mm from the mesh's bounding-box centre, looking at it, with the
    box's longest axis (a hand's fingers) up in the image; azimuth turns about that axis,
    elevation tilts towards it."""
    centre = (verts.min(0) + verts.max(0)) / 2
    long_axis = int(np.argmax(verts.max(0) - verts.min(0)))
    e = np.eye(3)
    a, b = (e[i] for i in range(3) if i != long_axis)
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    offset = distance * (np.sin(az) * np.cos(el) * a - np.cos(az) * np.cos(el) * b + np.sin(el) * e[long_axis])
    campos = centre + offset
    return look_at(campos, centre, up=e[long_axis]), campos


# ------------------------------------------------------ 1. analytic planes
@pytest.mark.parametrize("case", ["triangle_fronto", "tilted_plane", "tilted_plane_affine"])
def test_plane_depth_and_coverage_are_exact(case, backend):
    # Non-square on purpose, both ways round: PyTorch3D scales NDC by the shorter side.
    H, W = (56, 42) if case == "tilted_plane_affine" else (40, 56)
    focal, princpt = (61.0, 73.0), (27.3, 19.6)
    camrot, campos = np.eye(3), np.zeros(3)
    affine = None
    if case == "triangle_fronto":
        verts = np.array([[-130.0, -90.0, 500.0], [160.0, -40.0, 500.0], [-20.0, 140.0, 500.0]])
        faces = np.array([[0, 1, 2]])
    else:
        # Depth goes from ~280 to ~730 mm across the image: linear (non-perspective-correct)
        # interpolation would be off by tens of mm.
        xy = np.array([[-150.0, -100], [150, -110], [160, 120], [-140, 115]])
        verts = np.concatenate([xy, 500 + xy @ [[1.25], [0.3]]], 1)
        faces = np.array([[0, 1, 2], [0, 2, 3]])
        # A camera that is not at the origin nor axis-aligned: express the same camera-space
        # geometry in a rotated, shifted world.
        rot = cv2.Rodrigues(np.array([0.3, -0.5, 0.2]))[0]
        campos = np.array([40.0, -25.0, 13.0])
        camrot = rot
        verts = verts @ rot + campos                  # x = Rᵀ x_c + C  ⇔  x_c = R (x − C)
    if case == "tilted_plane_affine":
        # Rotation + anisotropic scale + shift: a general crop affine.
        ang = np.radians(12.0)
        A2 = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]]) @ np.diag([0.8, 0.65])
        affine = np.concatenate([A2, np.array([[6.2], [-3.1]])], 1)
    renderer = DepthRenderer(torch.as_tensor(faces), image_size=(H, W), backend=backend)
    depth = renderer(to_t(verts)[None], *cams_t(camrot, campos, focal, princpt, affine))[0, 0].double().numpy()

    # Analytic depth of the plane along each pixel's ray, and coverage by a 2-D inside test
    # in the output image.
    xc = (verts - campos) @ camrot.T
    n = np.cross(xc[1] - xc[0], xc[2] - xc[0])
    rr, cc = np.mgrid[0:H, 0:W].astype(float)
    uvp = np.stack([cc, rr], -1)
    A = np.eye(3)[:2] if affine is None else affine
    uv = (uvp - A[:, 2]) @ np.linalg.inv(A[:, :2]).T
    ray = np.stack([(uv[..., 0] - princpt[0]) / focal[0], (uv[..., 1] - princpt[1]) / focal[1], np.ones((H, W))], -1)
    z_true = (n @ xc[0]) / (ray @ n)

    proj = apply_affine(A, np.stack([focal[0] * xc[:, 0] / xc[:, 2] + princpt[0],
                                     focal[1] * xc[:, 1] / xc[:, 2] + princpt[1]], -1))
    inside = np.zeros((H, W), bool)
    edge_dist = np.full((H, W), np.inf)
    for f in faces:
        q = proj[f]
        sd = []
        for i in range(3):
            a, b = q[i], q[(i + 1) % 3]
            e = b - a
            cross = e[0] * (uvp[..., 1] - a[1]) - e[1] * (uvp[..., 0] - a[0])
            sd.append(cross / np.linalg.norm(e))
        e1, e2 = q[1] - q[0], q[2] - q[0]
        sd = np.stack(sd) * np.sign(e1[0] * e2[1] - e1[1] * e2[0])
        inside |= (sd > 0).all(0)
        edge_dist = np.minimum(edge_dist, np.abs(sd).min(0))
    # The diagonal shared by the two triangles is not an edge of the plane.
    if len(faces) == 2:
        edge_dist = np.full((H, W), np.inf)
        q = proj[[0, 1, 2, 3]]
        for i in range(4):
            a, b = q[i], q[(i + 1) % 4]
            e = b - a
            cross = e[0] * (uvp[..., 1] - a[1]) - e[1] * (uvp[..., 0] - a[0])
            edge_dist = np.minimum(edge_dist, np.abs(cross) / np.linalg.norm(e))

    covered = depth > 0
    clear = edge_dist > 1e-3
    assert inside.sum() > 300, "test geometry should cover a good part of the image"
    assert (~inside).sum() > 100, "test geometry should leave part of the image empty"
    np.testing.assert_array_equal(covered[clear], inside[clear])
    both = covered & inside
    assert np.abs(depth[both] - z_true[both]).max() < 1e-3


def test_near_plane_clips_triangles_exactly(backend):
    """A triangle with one vertex behind the camera: only the part at z >= near is drawn,
    at its exact depth (the reference intersects every pixel's ray with the 3-D triangle)."""
    H, W = 32, 32
    focal, princpt = (40.0, 40.0), (15.5, 15.5)
    near = 20.0
    verts = np.array([[-200.0, 60.0, 300.0], [230.0, 75.0, 320.0], [15.0, -20.0, -50.0]])
    faces = np.array([[0, 1, 2]])
    renderer = DepthRenderer(torch.as_tensor(faces), image_size=(H, W), near=near, backend=backend)
    camrot, campos = np.eye(3), np.zeros(3)
    depth = renderer(to_t(verts)[None], *cams_t(camrot, campos, focal, princpt))[0, 0].double().numpy()
    ref, margin = brute_force_depth(verts, faces, camrot, campos, focal, princpt, None, H, W, near=near)
    # How far each ray's plane intersection is from the near plane (ambiguous pixels).
    n = np.cross(verts[1] - verts[0], verts[2] - verts[0])
    rr, cc = np.mgrid[0:H, 0:W].astype(float)
    ray = np.stack([(cc - princpt[0]) / focal[0], (rr - princpt[1]) / focal[1], np.ones((H, W))], -1)
    z_plane = (n @ verts[0]) / (ray @ n)
    clear = (np.abs(margin) > 1e-6) & (np.abs(z_plane - near) > 1e-3)
    assert (ref > 0).sum() > 100 and (ref == 0).sum() > 50
    np.testing.assert_array_equal((depth > 0)[clear], (ref > 0)[clear])
    both = (depth > 0) & (ref > 0)
    assert np.abs(depth[both] - ref[both]).max() < 1e-3
    assert depth[depth > 0].min() >= near - 1e-4

    # The far plane empties pixels whose nearest surface lies beyond it.
    far = 200.0
    depth_far = DepthRenderer(torch.as_tensor(faces), image_size=(H, W), near=near, far=far, backend=backend)(
        to_t(verts)[None], *cams_t(camrot, campos, focal, princpt))[0, 0].numpy()
    np.testing.assert_array_equal(depth_far, np.where(depth <= far, depth, 0.0).astype(np.float32))
    assert (depth_far > 0).sum() < (depth > 0).sum()


# ------------------------------------------------- 2. real hand vs brute force
def _check_against_brute_force(verts, faces, backend, size=48, views=((20.0, 10.0), (115.0, -25.0))):
    focal, princpt = FOCAL, PRINCPT
    renderer = DepthRenderer(torch.as_tensor(faces), image_size=(size, size), backend=backend)
    for az, el in views:
        camrot, campos = hand_view(verts, az, el)
        uv = cv2_project(verts, camrot, campos, focal, princpt)
        assert (uv.min(0) > 0).all() and (uv.max(0) < [IMG_W, IMG_H]).all(), "hand must fit the 512x334 image"
        affine = crop_affine(uv, size, size)
        depth = renderer(to_t(verts)[None], *cams_t(camrot, campos, focal, princpt, affine))[0, 0].double().numpy()
        ref, margin = brute_force_depth(verts, faces, camrot, campos, focal, princpt, affine, size, size)
        cov, cov_ref = depth > 0, ref > 0
        iou = (cov & cov_ref).sum() / (cov | cov_ref).sum()
        assert cov_ref.sum() > 0.2 * size * size, "the hand should fill a good part of the crop"
        # docs/renderer.md's claims: coverage IoU 1.0 (every pixel, edge pixels included) and depth
        # within 0.001 mm of the ray caster's.
        assert iou == 1.0, f"view az={az} el={el}: coverage IoU {iou:.6f}, {int((cov != cov_ref).sum())} pixels differ"
        both = cov & cov_ref
        err = np.abs(depth - ref)[both]
        assert err.max() < 1e-3, f"view az={az} el={el}: max depth error {err.max():.4g} mm"
        assert 500 < ref[cov_ref].min() < ref[cov_ref].max() < 800


def test_makehuman_hand_matches_brute_force(backend):
    hand = makehuman()
    _check_against_brute_force(np.asarray(hand.vertices, float), np.asarray(hand.faces), backend)


def test_default_hand_matches_brute_force(backend):
    from common.hand.default_hand import make_default_hand
    hand = make_default_hand()
    _check_against_brute_force(np.asarray(hand.vertices, float), np.asarray(hand.faces), backend)


# ------------------------------------------------------ 3. pixel convention
def test_project_points_matches_cv2(any_hand):
    hand = any_hand
    joints = np.asarray(hand.global_pose, float)[:, :3, 3]
    verts = np.asarray(hand.vertices, float)
    camrot, campos = hand_view(verts, 35.0, 20.0)
    uv_cv = cv2_project(joints, camrot, campos, FOCAL, PRINCPT)
    z_cv = ((joints - campos) @ camrot.T)[:, 2]
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 0.01)):
        cams = cams_t(camrot, campos, FOCAL, PRINCPT, dtype=dtype)
        out = project_points(to_t(joints, dtype)[None], *cams)[0, 0].double().numpy()
        assert np.abs(out[:, :2] - uv_cv).max() < tol
        assert np.abs(out[:, 2] - z_cv).max() < tol
        affine = crop_affine(cv2_project(verts, camrot, campos, FOCAL, PRINCPT), 64, 48)
        cams[-1] = to_t(affine, dtype)[None, None]
        out = project_points(to_t(joints, dtype)[None], *cams)[0, 0].double().numpy()
        assert np.abs(out[:, :2] - apply_affine(affine, uv_cv)).max() < tol


def bicone(centre, camrot, radius, sides=32):
    """A camera-facing double cone about ``centre``: a ``sides``-gon of ``radius`` mm in the
    camera's x-y plane and two apexes ``radius`` mm in front and behind, so that its
    silhouette is a near-disc symmetric about the projected centre."""
    axes = np.asarray(camrot, float)                 # rows: camera x, y, z in world
    ang = 2 * np.pi * (np.arange(sides) + 0.5) / sides
    ring = (np.cos(ang)[:, None] * axes[0] + np.sin(ang)[:, None] * axes[1]) * radius
    v = np.concatenate([ring, -axes[2:] * radius, axes[2:] * radius]) + centre
    i, j = np.arange(sides), (np.arange(sides) + 1) % sides
    f = np.concatenate([np.stack([i, j, np.full(sides, sides)], 1),
                        np.stack([j, i, np.full(sides, sides + 1)], 1)])
    return v, f


def test_rendered_blob_lands_where_cv2_projects(backend, any_hand):
    hand = any_hand
    verts = np.asarray(hand.vertices, float)
    camrot, campos = hand_view(verts, -30.0, 15.0)
    H, W = 48, 64
    for j in (hand.joint_index("index2"), hand.joint_index("thumb3"), hand.joint_index("wrist")):
        centre = np.asarray(hand.global_pose, float)[j, :3, 3]
        uv = cv2_project(centre[None], camrot, campos, FOCAL, PRINCPT)[0]
        # Crop a 48x64 window around the point, scaled 1.3x, with the point off the
        # pixel grid (u' = 30.37, v' = 21.71), so that half-pixel slips would show.
        s = 1.3
        affine = np.array([[s, 0.0, 30.37 - s * uv[0]], [0.0, s, 21.71 - s * uv[1]]])
        target = apply_affine(affine, uv[None])[0]
        radius = 6.0                                 # ~14 px in the crop
        bv, bf = bicone(centre, camrot, radius)
        depth = DepthRenderer(torch.as_tensor(bf), image_size=(H, W), backend=backend)(
            to_t(bv)[None], *cams_t(camrot, campos, FOCAL, PRINCPT, affine))[0, 0].numpy()
        rr, cc = np.nonzero(depth > 0)
        assert len(rr) > 300
        centroid = np.array([cc.mean(), rr.mean()])
        # A half-pixel convention error would move the centroid by 0.5 px; sampling a disc
        # this size on the pixel grid moves it by a few hundredths.
        assert np.abs(centroid - target).max() < 0.1, (centroid, target)
        # The pixel nearest the projected point sees the blob's front, close to its apex.
        z_c = ((centre - campos) @ camrot.T)[2]
        d = depth[int(round(target[1])), int(round(target[0]))]
        assert z_c - radius - 1e-3 <= d <= z_c - radius + 1.0
        # And pixel by pixel it is what rays through the pixel centres see.
        ref, margin = brute_force_depth(bv, bf, camrot, campos, FOCAL, PRINCPT, affine, H, W)
        clear = np.abs(margin) > 1e-6
        np.testing.assert_array_equal((depth > 0)[clear], (ref > 0)[clear])
        both = (depth > 0) & (ref > 0)
        assert np.abs(depth[both] - ref[both]).max() < 1e-3


# ----------------------------------------------------------------- 4. batch
def test_batched_views_equal_separate_renders(backend, any_hand):
    hand = any_hand
    verts0 = np.asarray(hand.vertices, float)
    faces = torch.as_tensor(hand.faces)
    size = 24
    rng = np.random.default_rng(0)
    B, N = 2, 3
    verts = np.stack([verts0, verts0 + rng.normal(0, 2.0, verts0.shape)])
    rots, poss, affs = [], [], []
    for b in range(B):
        for n in range(N):
            camrot, campos = hand_view(verts[b], 60.0 * n + 25.0 * b, 10.0 * n - 15.0)
            rots.append(camrot)
            poss.append(campos)
            affs.append(crop_affine(cv2_project(verts[b], camrot, campos, FOCAL, PRINCPT), size, size))
    camrot = to_t(np.stack(rots)).reshape(B, N, 3, 3)
    campos = to_t(np.stack(poss)).reshape(B, N, 3)
    affine = to_t(np.stack(affs)).reshape(B, N, 2, 3)
    focal = to_t(FOCAL).expand(B, N, 2).clone()
    focal[1, 2] = torch.tensor([1100.0, 1150.0])
    princpt = to_t(PRINCPT).expand(B, N, 2).clone()
    renderer = DepthRenderer(faces, image_size=(size, size), backend=backend)
    v = to_t(verts)
    together = renderer(v, camrot, campos, focal, princpt, affine)
    assert together.shape == (B, N, size, size)
    for b in range(B):
        for n in range(N):
            alone = renderer(v[b:b + 1], camrot[b:b + 1, n:n + 1], campos[b:b + 1, n:n + 1],
                             focal[b:b + 1, n:n + 1], princpt[b:b + 1, n:n + 1], affine[b:b + 1, n:n + 1])
            assert (alone[0, 0] > 0).sum() > 50
            assert torch.equal(together[b, n], alone[0, 0]), (b, n)
    # project_points is batched the same way.
    proj = project_points(v, camrot, campos, focal, princpt, affine)
    assert torch.equal(proj[1, 2], project_points(v[1:], camrot[1:, 2:], campos[1:, 2:], focal[1:, 2:],
                                                  princpt[1:, 2:], affine[1:, 2:])[0, 0])


# ------------------------------------------------------------- 5. gradients
def test_depth_loss_gradient_descends(backend, any_hand):
    hand = any_hand
    verts0 = np.asarray(hand.vertices, float)
    size = 32
    camrot, campos = hand_view(verts0, 10.0, 5.0)
    affine = crop_affine(cv2_project(verts0, camrot, campos, FOCAL, PRINCPT), size, size)
    cams = cams_t(camrot, campos, FOCAL, PRINCPT, affine)
    renderer = DepthRenderer(torch.as_tensor(hand.faces), image_size=(size, size), backend=backend)
    # Target: the same hand 3 mm farther from the camera.
    view_dir = to_t(camrot[2])
    target = renderer(to_t(verts0)[None] + 3.0 * view_dir, *cams).detach()

    def loss_of(v):
        d = renderer(v, *cams)
        both = (d > 0) & (target > 0)
        return (d - target).abs()[both].mean()

    v = to_t(verts0)[None].clone().requires_grad_(True)
    loss = loss_of(v)
    loss.backward()
    g = v.grad
    assert torch.isfinite(g).all()
    assert g.abs().sum() > 0
    # Most of the gradient pushes vertices away from the camera (towards the target).
    assert (g[0] @ view_dir).sum() < 0
    with torch.no_grad():
        stepped = v - 0.5 * g / g.abs().max()
        assert loss_of(stepped) < loss.detach() - 1e-3


def assert_gradient_matches_finite_differences(renderer, v0, cams, min_pixels, h=0.25):
    """d(sum of depth over the pixels covered throughout)/d(vertex) from autograd against central
    differences of the rendered depth, for every coordinate of every vertex."""
    v = v0.clone().requires_grad_(True)
    depth = renderer(v, *cams)
    for i in range(v0.shape[1]):
        for k in range(3):
            dv = torch.zeros_like(v0)
            dv[0, i, k] = h
            plus, minus = renderer(v0 + dv, *cams), renderer(v0 - dv, *cams)
            mask = (depth > 0) & (plus > 0) & (minus > 0)
            assert mask.sum() > min_pixels
            (g,) = torch.autograd.grad((depth * mask).sum(), v, retain_graph=True)
            fd = ((plus - minus) * mask).sum() / (2 * h)
            assert abs(g[0, i, k] - fd) <= 0.01 * abs(fd) + 1e-2, (i, k, float(g[0, i, k]), float(fd))
    return depth.detach()


def test_depth_gradient_matches_finite_differences(backend):
    """On a tilted triangle, and on one cut by the near plane: autograd agrees with central
    differences. At the cut too: the renderer's own plane-depth gradient is exact there, where
    PyTorch3D's clipper detaches one of the cut-point weights."""
    H, W = 32, 32
    cams = cams_t(np.eye(3), np.zeros(3), (40.0, 40.0), (15.5, 15.5), dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    v0 = torch.tensor([[[-200.0, 60.0, 300.0], [230.0, 75.0, 420.0], [15.0, -180.0, 250.0]]], dtype=torch.float64)
    assert_gradient_matches_finite_differences(DepthRenderer(faces, image_size=(H, W), backend=backend), v0, cams, 100)
    v0 = torch.tensor([[[-200.0, 60.0, 300.0], [230.0, 75.0, 320.0], [15.0, -20.0, -50.0]]], dtype=torch.float64)
    depth = assert_gradient_matches_finite_differences(DepthRenderer(faces, image_size=(H, W), near=20.0,
                                                                     backend=backend),
                                                       v0, cams, 50)
    assert float(depth[depth > 0].min()) >= 20.0 - 1e-3  # nothing in front of the near plane


def test_own_gradient_equals_pytorch3d_gradient():
    """forward's gradient (plane depth of the covering face) against PyTorch3D's backward (the
    differentiable zbuf of ``rasterize``), on hand renders: equal to float32 rounding."""
    _need_pytorch3d()
    from common.hand.default_hand import make_default_hand
    hand = make_default_hand()
    H, W = 32, 40
    inputs = _hand_batch(np.asarray(hand.vertices, float), 2, 3, H, W, seed=2)
    weight = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    # Untiled: forward's values come from the vectorised rasteriser, rasterize()'s (with a
    # gradient) from PyTorch3D's whole-view kernel, which agree exactly here; tiles could pick
    # the other of two faces meeting at a pixel centre.
    renderer = DepthRenderer(torch.as_tensor(hand.faces), (H, W), tile_size=None, backend="pytorch3d")
    v = inputs[0].clone().requires_grad_(True)
    depth = renderer(v, *inputs[1:])
    (depth * weight).sum().backward()
    ours = v.grad
    v = inputs[0].clone().requires_grad_(True)
    face, zbuf = renderer.rasterize(v, *inputs[1:])
    reference = torch.where(face[..., 0] >= 0, zbuf[..., 0], torch.zeros_like(zbuf[..., 0]))
    assert torch.equal(depth.detach(), reference.detach())
    (reference * weight).sum().backward()
    assert ours.abs().max() > 1 and torch.equal(ours != 0, v.grad != 0)
    assert (ours - v.grad).abs().max() <= 1e-3 * v.grad.abs().max()
    # With a camera that needs a gradient, PyTorch3D's backward is used (and reaches the camera).
    campos = inputs[2].clone().requires_grad_(True)
    renderer(inputs[0], inputs[1], campos, *inputs[3:]).sum().backward()
    assert campos.grad is not None and torch.isfinite(campos.grad).all()


# ---------------------------------------------------------------- 6. errors
def test_shape_errors_are_clear():
    faces = torch.tensor([[0, 1, 2]])
    r = DepthRenderer(faces, image_size=(8, 8))
    assert "faces" not in r.state_dict()
    assert r.faces.dtype == torch.int64
    B, N = 2, 3
    v = torch.zeros(B, 3, 3)
    rot = torch.eye(3).expand(B, N, 3, 3)
    pos, f, c, a = torch.zeros(B, N, 3), torch.ones(B, N, 2), torch.zeros(B, N, 2), torch.zeros(B, N, 2, 3)
    with pytest.raises(ValueError, match=r"camrot: expected \[B, N, 3, 3\] matching vertices' batch B=2"):
        r(v, rot[:1], pos, f, c, a)
    with pytest.raises(ValueError, match=r"camrot: expected \[B, N, 3, 3\]"):
        r(v, torch.eye(3).expand(B, 3, 3), pos, f, c, a)
    with pytest.raises(ValueError, match=r"vertices: expected \[B, V, 3\]"):
        r(v[0], rot, pos, f, c, a)
    with pytest.raises(ValueError, match=r"campos: expected \[B, N, 3\] with B=2, N=3"):
        r(v, rot, pos[:, :2], f, c, a)
    with pytest.raises(ValueError, match=r"focal: expected \[B, N, 2\]"):
        r(v, rot, pos, f[..., :1], c, a)
    with pytest.raises(ValueError, match=r"princpt: expected \[B, N, 2\]"):
        r(v, rot, pos, f, c.transpose(0, 1), a)
    with pytest.raises(ValueError, match=r"affine: expected \[B, N, 2, 3\]"):
        r(v, rot, pos, f, c, a[..., :2])
    with pytest.raises(ValueError, match=r"vertices: faces index vertex 2, but vertices has only V=2"):
        r(v[:, :2], rot, pos, f, c, a)
    with pytest.raises(ValueError, match=r"points: expected \[B, V, 3\]"):
        project_points(v[..., :2], rot, pos, f, c)
    with pytest.raises(ValueError, match=r"faces: expected \[F, 3\]"):
        DepthRenderer(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"image_size"):
        DepthRenderer(faces, image_size=(8, 0))
    with pytest.raises(ValueError, match=r"near"):
        DepthRenderer(faces, near=0.0)
    # Right shapes work, affine optional.
    assert r(v, rot, pos, f, c, None).shape == (B, N, 8, 8)


# ------------------------------------------------------------ 7. CPU tiling
# On the CPU the renderer cuts each view into tiles and rasterises every non-empty tile as its
# own small mesh (the renderer's module docstring).  Each pixel meets the same candidate faces
# either way, so the result must be the untiled one up to float32 rounding: the same coverage,
# the same face at each pixel (but where two faces meet at the pixel at the same depth, when
# rounding may pick either), the same depth to a few ulps and the same gradients.
DEPTH_ULPS = 32          # tolerance on depth, in float32 epsilons of the depth (observed <= 11)


def _hand_batch(verts0, B, N, H, W, distance=700.0, shifts=None, seed=0):
    """``B`` jittered copies of a hand, each seen by ``N`` cameras cropped onto ``H × W``;
    ``shifts[(b, n)]`` moves that view's crop (pixels), e.g. so the hand leaves the image."""
    rng = np.random.default_rng(seed)
    verts = np.stack([verts0 + rng.normal(0, 1.5, verts0.shape) for _ in range(B)])
    rots, poss, affs = [], [], []
    for b in range(B):
        for n in range(N):
            camrot, campos = hand_view(verts[b], 60.0 * n + 25.0 * b + 7.0, 10.0 * n - 15.0, distance)
            affine = crop_affine(cv2_project(verts[b], camrot, campos, FOCAL, PRINCPT), H, W)
            affine[:, 2] += (shifts or {}).get((b, n), (0.0, 0.0))
            rots.append(camrot)
            poss.append(campos)
            affs.append(affine)
    return (to_t(verts), to_t(np.stack(rots)).reshape(B, N, 3, 3), to_t(np.stack(poss)).reshape(B, N, 3),
            to_t(FOCAL).expand(B, N, 2).clone(), to_t(PRINCPT).expand(B, N, 2).clone(),
            to_t(np.stack(affs)).reshape(B, N, 2, 3))


def _assert_same_fragments(whole, tiled, what):
    (f0, z0), (f1, z1) = whole, tiled
    seen = f0 >= 0
    assert seen.sum() > 0.05 * seen.numel(), f"{what}: the hand should cover part of the images"
    assert torch.equal(seen, f1 >= 0), f"{what}: coverage differs at {int((seen != (f1 >= 0)).sum())} pixels"
    tol = DEPTH_ULPS * torch.finfo(torch.float32).eps * z0[seen].abs()
    err = (z1[seen] - z0[seen]).abs()
    assert (err <= tol).all(), f"{what}: depth differs by up to {float(err.max()):.3g} mm"
    # Rounding may pick the other of two faces that meet at the pixel centre at the same depth
    # (the depth check above holds there too); that is rare.
    other = int((f0 != f1).sum())
    assert other <= max(2, int(seen.sum()) // 1000), f"{what}: other face at {other} pixels"
    return other


@pytest.mark.parametrize("hand_name", ["default", "makehuman"])
def test_tiled_rasterisation_equals_untiled(hand_name):
    _need_pytorch3d()
    if hand_name == "default":
        from common.hand.default_hand import make_default_hand
        hand = make_default_hand()
    else:
        hand = makehuman()
    faces = torch.as_tensor(hand.faces)
    H, W = 48, 64
    # Views (1, 2) and (0, 1) have their crops moved so that the hand leaves the image.
    inputs = _hand_batch(np.asarray(hand.vertices, float), 2, 3, H, W, shifts={(1, 2): (26.0, -17.0),
                                                                                 (0, 1): (-35.0, 0.0)})
    whole = DepthRenderer(faces, (H, W), tile_size=None, backend="pytorch3d")
    face0, zbuf0 = whole.rasterize(*inputs)
    assert face0.shape == zbuf0.shape == (2, 3, H, W, 1)
    ref = f0, _ = face0.reshape(6, H, W, 1), zbuf0.reshape(6, H, W, 1)
    verts = whole.screen_vertices(*inputs).reshape(6, -1, 3).float()
    assert ((f0[[4, 5]] >= 0).any((1, 2, 3)) & (f0[[4, 5]] < 0).any((1, 2, 3))).all()
    # 16 divides H and W; 20 divides neither (partial tiles on both edges); 64 makes one 48 × 64
    # tile (non-square, larger than H).
    for tile_size in (16, 20, 64):
        tiled = DepthRenderer(faces, (H, W), tile_size=tile_size, backend="pytorch3d")
        out = tiled.rasterize_tiled(verts)
        assert out is not None, f"tile_size={tile_size}: the tiled path should have been taken"
        _assert_same_fragments(ref, out, f"{hand_name}, tile_size={tile_size}")
    # And through the public entry point, with the default tile size.
    depth0 = torch.where(face0 >= 0, zbuf0, torch.zeros_like(zbuf0))[..., 0]
    depth1 = DepthRenderer(faces, (H, W), backend="pytorch3d")(*inputs)
    assert torch.equal(depth0 > 0, depth1 > 0)
    assert torch.allclose(depth1, depth0, rtol=DEPTH_ULPS * torch.finfo(torch.float32).eps, atol=0)


def test_tiled_rasterisation_with_near_plane_clipping():
    """A camera 250 mm from the hand with the near plane through it: faces entirely behind
    it, faces cut by it (which every tile gets), faces in front; a tall image."""
    _need_pytorch3d()
    from common.hand.default_hand import make_default_hand
    hand = make_default_hand()
    faces = torch.as_tensor(hand.faces)
    H, W, near = 44, 36, 235.0
    inputs = _hand_batch(np.asarray(hand.vertices, float), 1, 2, H, W, distance=250.0)
    whole = DepthRenderer(faces, (H, W), near=near, tile_size=None, backend="pytorch3d")
    verts = whole.screen_vertices(*inputs).reshape(2, -1, 3).float()
    behind = (verts[:, faces, 2] < near).sum(-1)
    assert ((behind > 0) & (behind < 3)).sum() > 100 and (behind == 3).sum() > 100 and (behind == 0).sum() > 100
    tiled = DepthRenderer(faces, (H, W), near=near, tile_size=10, backend="pytorch3d")
    out = tiled.rasterize_tiled(verts)
    assert out is not None
    _assert_same_fragments(whole.rasterize_whole(verts), out, "near-plane clipping")


def test_tiled_gradients_equal_untiled():
    _need_pytorch3d()
    from common.hand.default_hand import make_default_hand
    hand = make_default_hand()
    faces = torch.as_tensor(hand.faces)
    H, W = 32, 40
    inputs = _hand_batch(np.asarray(hand.vertices, float), 2, 3, H, W, seed=1)
    weight = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    grads, faces_seen = [], []
    for tile_size in (None, 12):
        renderer = DepthRenderer(faces, (H, W), tile_size=tile_size, backend="pytorch3d")
        v = inputs[0].clone().requires_grad_(True)
        face, zbuf = renderer.rasterize(v, *inputs[1:])
        depth = torch.where(face[..., 0] >= 0, zbuf[..., 0], torch.zeros_like(zbuf[..., 0]))
        (depth * weight).sum().backward()
        grads.append(v.grad)
        faces_seen.append(face)
    # Where the same face is found everywhere, the gradients are PyTorch3D's for the same faces,
    # computed in the tiles' coordinates: equal up to float32 rounding.  (Moving the vertices by
    # 3e-5 mm, a few float32 ulps, changes them ~5x more than tiling does.)
    assert torch.equal(faces_seen[0], faces_seen[1])
    g0, g1 = grads
    assert g0.abs().max() > 1 and (g0 != 0).sum() > 1000
    assert torch.equal(g0 != 0, g1 != 0)
    assert (g1 - g0).abs().max() <= 1e-3 * g0.abs().max()


def test_tiling_options_and_empty_views(backend):
    faces = torch.tensor([[0, 1, 2]])
    for bad in (-1, 2.5, True, "16"):
        with pytest.raises((ValueError, TypeError), match=r"tile_size"):
            DepthRenderer(faces, tile_size=bad)
    assert DepthRenderer(faces, tile_size=0).tile_size is None
    assert DepthRenderer(faces, tile_size=None).tile_size is None
    assert "tile_size=16" in repr(DepthRenderer(faces))
    # Nothing on screen (off to the side, then behind the camera): zeros, and zero gradients.
    verts = torch.tensor([[[-130.0, -90.0, 500.0], [160.0, -40.0, 500.0], [-20.0, 140.0, 500.0]]])
    cams = cams_t(np.eye(3), np.zeros(3), (61.0, 73.0), (27.3, 19.6))
    r = DepthRenderer(faces, (40, 56), tile_size=8, backend=backend)
    for shift in ((2000.0, 0.0, 0.0), (0.0, 0.0, -900.0)):
        v = (verts + torch.tensor(shift)).requires_grad_(True)
        depth = r(v, *cams)
        assert depth.shape == (1, 1, 40, 56) and (depth == 0).all()
        depth.sum().backward()
        assert (v.grad == 0).all()
    assert (r(verts, *cams) > 0).sum() > 300


# ------------------------------------------------------ 8. vectorised CPU rasteriser
# common/renderer/rasterizer.py takes PyTorch3D's CPU kernel's decisions for all (face, pixel)
# pairs at once.  Its reference is PyTorch3D itself (each view rendered whole): the same
# coverage, the same face at each pixel and the same depth (observed bit for bit on this
# machine; the tolerance allows a compiler's fused multiply-adds in the kernel).
def _p3d_reference(faces, size, verts, near=1.0):
    _need_pytorch3d()
    return DepthRenderer(faces, size, near=near, tile_size=None, cpu_rasteriser="pytorch3d",
                         backend="pytorch3d").rasterize_whole(verts)


# The scenes both backends render: (camera distance, near plane) in mm. At 700 mm (a realistic
# capture) nothing is clipped; at 250 mm with the near plane at 235 mm it cuts through the hand:
# faces entirely behind it, cut by it into one or two triangles, and in front.
SCENES = {"realistic": (700.0, 1.0), "near_plane_cut": (250.0, 235.0)}


@pytest.mark.parametrize("hand_name", ["default", "makehuman"])
@pytest.mark.parametrize("size", [(48, 64), (40, 27), (96, 96)])
@pytest.mark.parametrize("scene", list(SCENES))
def test_native_backend_equals_pytorch3d(hand_name, size, scene):
    """Batch 2 × 3 views: the native rasteriser's face and depth maps equal PyTorch3D's kernel's
    bit for bit (clipping included), and so do the renderer's depth maps and their gradients with
    respect to the vertices; with respect to a camera and through ``rasterize`` the native
    gradient (plane_depth) equals PyTorch3D's backward to float32 rounding where nothing is
    clipped (where it is, PyTorch3D 0.7.9's clipper detaches a weight; finite differences
    check the native one there, in test_depth_gradient_matches_finite_differences)."""
    _need_pytorch3d()
    if hand_name == "default":
        from common.hand.default_hand import make_default_hand
        hand = make_default_hand()
    else:
        hand = makehuman()
    faces = torch.as_tensor(hand.faces)
    H, W = size
    distance, near = SCENES[scene]
    inputs = _hand_batch(np.asarray(hand.vertices, float), 2, 3, H, W, distance=distance,
                         shifts={(1, 2): (26.0, -17.0), (0, 1): (-35.0, 0.0)})
    native = DepthRenderer(faces, size, near=near, backend="native")
    reference = DepthRenderer(faces, size, near=near, tile_size=None, cpu_rasteriser="pytorch3d", backend="pytorch3d")
    verts = native.screen_vertices(*inputs).reshape(6, -1, 3).float()
    behind = (verts[:, faces, 2] < near).sum(-1)
    cut = int(((behind > 0) & (behind < 3)).sum())
    assert (cut > 500) == (scene == "near_plane_cut"), cut
    ours = rasterize_depth(verts, native.faces, size, near)
    assert ours[0].shape == ours[1].shape == (6, H, W, 1)
    assert ours[0].dtype == torch.int64 and ours[1].dtype == torch.float32
    theirs = reference.rasterize_whole(verts)
    seen = theirs[0] >= 0
    assert 0.05 * seen.numel() < seen.sum() < seen.numel(), "the hand should cover part of the images"
    assert torch.equal(ours[0], theirs[0]), f"face maps differ at {int((ours[0] != theirs[0]).sum())} pixels"
    assert torch.equal(ours[1], theirs[1]), f"depth differs by up to {float((ours[1] - theirs[1]).abs().max())} mm"
    # The renderers' depth maps and gradients, wrt the vertices.
    weight = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    grads = []
    for renderer in (native, reference):
        v = inputs[0].clone().requires_grad_(True)
        depth = renderer(v, *inputs[1:])
        (depth * weight).sum().backward()
        grads.append((depth.detach(), v.grad))
    (d0, g0), (d1, g1) = grads
    assert torch.equal(d0, d1)
    # The same function of the same faces; only the order of the backward's float32 accumulation
    # (threads) may differ, even between two calls of one backend.
    assert g0.abs().max() > 0.1 and torch.equal(g0 != 0, g1 != 0)
    assert (g0 - g1).abs().max() <= 1e-5 * g1.abs().max()
    if scene != "realistic":
        return
    # Wrt a camera position (the reference: PyTorch3D's backward) ...
    camera_grads = []
    for renderer in (native, reference):
        campos = inputs[2].clone().requires_grad_(True)
        (renderer(inputs[0], inputs[1], campos, *inputs[3:]) * weight).sum().backward()
        camera_grads.append(campos.grad)
    c0, c1 = camera_grads
    assert c1.abs().max() > 1
    # (Each entry sums thousands of pixels' float32 terms of either sign.)
    assert (c0 - c1).abs().max() <= 5e-4 * c1.abs().max(), (c0, c1)
    # ... and through rasterize()'s zbuf (PyTorch3D's backward on its side).
    raster_grads = []
    for renderer in (native, reference):
        v = inputs[0].clone().requires_grad_(True)
        face, zbuf = renderer.rasterize(v, *inputs[1:])
        (torch.where(face[..., 0] >= 0, zbuf[..., 0], 0.0) * weight).sum().backward()
        raster_grads.append(v.grad)
    r0, r1 = raster_grads
    assert torch.equal(r0 != 0, r1 != 0)
    assert (r0 - r1).abs().max() <= 1e-3 * r1.abs().max()   # as test_own_gradient_equals_pytorch3d_gradient


def test_vectorised_rasteriser_is_taken_and_falls_back(monkeypatch):
    """The pytorch3d backend takes the vectorised rasteriser on the CPU for depth without a
    gradient through the rasteriser and no face cut by the near plane (where the two are equal
    bit for bit); PyTorch3D renders when a face is cut, when the rasteriser's own gradient is
    asked for, and with ``cpu_rasteriser='pytorch3d'``."""
    _need_pytorch3d()
    import common.renderer.depth_renderer as renderer_module
    from common.hand.default_hand import make_default_hand
    hand = make_default_hand()
    faces = torch.as_tensor(hand.faces)
    calls = []
    original = renderer_module.rasterize_depth

    def counting(*args, **kwargs):
        calls.append(True)
        return original(*args, **kwargs)

    monkeypatch.setattr(renderer_module, "rasterize_depth", counting)
    H, W = 44, 36
    inputs = _hand_batch(np.asarray(hand.vertices, float), 1, 2, H, W, distance=250.0)
    # Near plane through the hand: faces cut by it, so PyTorch3D clips and renders.
    near = 235.0
    clipped = DepthRenderer(faces, (H, W), near=near, backend="pytorch3d")
    face, zbuf = clipped.rasterize(*inputs)
    assert calls == []
    verts = clipped.screen_vertices(*inputs).reshape(2, -1, 3).float()
    _assert_same_fragments(_p3d_reference(faces, (H, W), verts, near), (face.reshape(2, H, W, 1),
                                                                      zbuf.reshape(2, H, W, 1)), "clipped")
    # No face cut: the vectorised path.
    DepthRenderer(faces, (H, W), near=1.0, backend="pytorch3d").rasterize(*inputs)
    assert calls == [True]
    # A gradient through rasterize() is PyTorch3D's; so is everything with cpu_rasteriser="pytorch3d".
    DepthRenderer(faces, (H, W), backend="pytorch3d")(inputs[0].clone().requires_grad_(True), *inputs[1:])
    assert calls == [True, True]  # forward's own gradient: the values need no graph
    DepthRenderer(faces, (H, W), backend="pytorch3d").rasterize(inputs[0].clone().requires_grad_(True), *inputs[1:])
    DepthRenderer(faces, (H, W), cpu_rasteriser="pytorch3d", backend="pytorch3d")(*inputs)
    assert calls == [True, True]
    # The native backend takes it always, clipping included.
    DepthRenderer(faces, (H, W), near=near, backend="native").rasterize(*inputs)
    assert calls == [True, True, True]
    with pytest.raises(ValueError, match=r"cpu_rasteriser"):
        DepthRenderer(faces, cpu_rasteriser="numpy")


# The kernel's rules on hand-made triangles (ties, zero area, culling, clipping, chunks, non-finite
# input) are checked in tests/test_rasterizer_native.py, against PyTorch3D where it is present.


def test_pixel_ndc_is_pytorch3d_sampling():
    """The NDC points PyTorch3D samples, as the renderer's docstring states them:
    ``x = (W − 1 − 2c) / min(H, W)`` (and y alike), for square, wide and tall images."""
    for H, W in ((32, 32), (20, 57), (61, 18)):
        S = min(H, W)
        assert torch.allclose(pixel_ndc(W, H).double(), (W - 1 - 2 * torch.arange(W, dtype=torch.float64)) / S,
                              rtol=0, atol=4e-7 * W / S)
        assert torch.allclose(pixel_ndc(H, W).double(), (H - 1 - 2 * torch.arange(H, dtype=torch.float64)) / S,
                              rtol=0, atol=4e-7 * H / S)
