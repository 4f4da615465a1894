"""The native rasteriser (common/renderer/rasterizer.py) on its own, the renderer's backend option and
the CUDA checks (skipped without CUDA).

These run with and without PyTorch3D: the references are a numpy ray caster, PyTorch3D-free
properties of the kernel's rules and, where present, PyTorch3D itself (skipped with the reason
where it is absent).
"""
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import common.renderer.backend as backend_module
from common.renderer.rasterizer import default_chunks, rasterize_depth
from common.renderer.triton_rasterizer import rasterize_depth_binned, triton_available
from common.renderer.depth_renderer import DepthRenderer, RendererBackendError, pytorch3d_available, resolve_backend
from tests.conftest import REPO
from tests.test_renderer import (NO_PYTORCH3D, SCENES, _hand_batch, _p3d_reference, brute_force_depth,
                                 backend)  # noqa: F401  (the fixture: both backends)

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device here: this test runs on CUDA (against the CPU)"
NO_TRITON = "Triton does not import here: the binned kernel's tests need it (it ships with PyTorch's CUDA wheels)"
needs_triton = pytest.mark.skipif(not triton_available(), reason=NO_TRITON)


def _scene(hand, scene, B=2, N=3, H=40, W=36):
    distance, near = SCENES[scene]
    inputs = _hand_batch(np.asarray(hand.vertices, float), B, N, H, W, distance=distance,
                         shifts={(1, 2): (26.0, -17.0)})
    renderer = DepthRenderer(torch.as_tensor(hand.faces), (H, W), near=near, backend="native")
    return renderer, inputs, renderer.screen_vertices(*inputs).reshape(B * N, -1, 3).float()


# ------------------------------------------------------------ chunks: the CUDA sizes on the CPU
@pytest.mark.parametrize("scene", list(SCENES))
def test_chunk_sizes_do_not_change_the_result(default_hand, scene):
    """The CPU's and CUDA's default chunk sizes, and tiny ones (a few pairs; one view, or a part
    of one, per group), give the same maps bit for bit."""
    renderer, _, verts = _scene(default_hand, scene)
    faces, F = renderer.faces, int(renderer.faces.shape[0])
    args = (verts, faces, renderer.image_size, renderer.near)
    reference = rasterize_depth(*args)
    assert (reference[0] >= 0).sum() > 1000
    cuda_pairs, cuda_faces = default_chunks("cuda")
    assert (cuda_pairs, cuda_faces) != default_chunks("cpu")
    for pairs, group in ((cuda_pairs, cuda_faces), (64, F), (1000, 2 * F + 1), (7, 1)):
        out = rasterize_depth(*args, chunk_pairs=pairs, chunk_faces=group)
        assert torch.equal(out[0], reference[0]) and torch.equal(out[1], reference[1]), (pairs, group)


# --------------------------------------------------------------- against a numpy ray caster
@pytest.mark.parametrize("scene", list(SCENES))
def test_native_depth_equals_the_ray_caster_with_clipping(default_hand, scene):
    """Every view of a batch, the near plane cutting the hand or not: coverage and depth are what
    rays through the pixel centres see of the part in front of the near plane (pixels whose ray
    passes within 1e-6 of an edge, or meets the winning face within 1e-3 mm of the near plane,
    are a matter of rounding and left out)."""
    renderer, inputs, _ = _scene(default_hand, scene, B=2, N=2, H=32, W=28)
    near = renderer.near
    depth = renderer(*inputs).double().numpy()
    verts, camrot, campos, focal, princpt, affine = (t.double().numpy() for t in inputs)
    for b in range(2):
        for n in range(2):
            ref, margin = brute_force_depth(verts[b], default_hand.faces, camrot[b, n], campos[b, n], focal[b, n],
                                            princpt[b, n], affine[b, n], 32, 28, near=near)
            # (margin is 0 where the ray caster sees nothing: those pixels are all checked.)
            clear = (ref == 0) | ((np.abs(margin) > 1e-6) & (np.abs(ref - near) > 1e-3))
            assert clear.mean() > 0.97
            np.testing.assert_array_equal((depth[b, n] > 0)[clear], (ref > 0)[clear])
            both = (depth[b, n] > 0) & (ref > 0)
            assert both.sum() > 50
            assert np.abs(depth[b, n][both] - ref[both]).max() < 1e-3


# ------------------------------------------------------------------ several faces per pixel
def _all_hits(verts, faces, camrot, campos, focal, princpt, affine, H, W, near):
    """Camera depths of every face hit by each pixel's ray at ``z >= near``, float64, ``[H·W]``
    lists sorted nearest first (Möller–Trumbore, as tests.test_renderer.brute_force_depth)."""
    xc = (verts - campos) @ camrot.T
    tri = xc[faces]
    rr, cc = np.mgrid[0:H, 0:W].astype(float)
    uv = (np.stack([cc.ravel(), rr.ravel()], -1) - affine[:, 2]) @ np.linalg.inv(affine[:, :2]).T
    d = np.stack([(uv[:, 0] - princpt[0]) / focal[0], (uv[:, 1] - princpt[1]) / focal[1], np.ones(len(uv))], -1)
    p0, e1, e2 = tri[:, 0], tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    hits = []
    for ray in d:
        pvec = np.cross(ray, e2)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / (pvec * e1).sum(-1)
            a = (-p0 * pvec).sum(-1) * inv
            qvec = np.cross(-p0, e1)
            bb = (ray * qvec).sum(-1) * inv
            t = (e2 * qvec).sum(-1) * inv
            m = np.minimum(np.minimum(a, bb), 1 - a - bb)
        ok = (m > 1e-6) & (t >= near + 1e-3) & np.isfinite(t)
        ambiguous = (np.abs(m) <= 1e-6) | (np.abs(t - near) <= 1e-3)
        hits.append((np.sort(t[ok]), bool(ambiguous.any())))
    return hits


def test_faces_per_pixel_are_the_k_nearest_hits(default_hand):
    """K = 3: layer 0 is the K = 1 map; at each pixel the layers hold distinct faces at the depths
    of the three nearest ray hits, nearest first (the near plane cutting the hand); and with
    PyTorch3D present, its K = 3 maps."""
    K = 3
    renderer, inputs, verts = _scene(default_hand, "near_plane_cut", B=1, N=2, H=20, W=18)
    near = renderer.near
    face, zbuf = rasterize_depth(verts, renderer.faces, renderer.image_size, near, faces_per_pixel=K)
    one = rasterize_depth(verts, renderer.faces, renderer.image_size, near)
    assert face.shape == zbuf.shape == (2, 20, 18, K)
    assert torch.equal(face[..., :1], one[0]) and torch.equal(zbuf[..., :1], one[1])
    filled = face >= 0
    assert (filled[..., 2].sum() > 50) and torch.equal(filled, filled.cummin(-1).values)  # layers fill in order
    assert (zbuf[..., 1:][filled[..., 1:]] >= zbuf[..., :-1][filled[..., 1:]]).all()
    for i, j in ((0, 1), (0, 2), (1, 2)):
        both = filled[..., i] & filled[..., j]
        assert (face[..., i][both] != face[..., j][both]).all()
    v, camrot, campos, focal, princpt, affine = (t.double().numpy() for t in inputs)
    checked = 0
    for n in range(2):
        hits = _all_hits(v[0], np.asarray(default_hand.faces), camrot[0, n], campos[0, n], focal[0, n],
                         princpt[0, n], affine[0, n], 20, 18, near)
        for p, (t, ambiguous) in enumerate(hits):
            if ambiguous:
                continue
            r, c = divmod(p, 18)
            ours = zbuf[n, r, c][face[n, r, c] >= 0].double().numpy()
            assert len(ours) == min(K, len(t)), (n, r, c, ours, t)
            np.testing.assert_allclose(ours, t[:K], rtol=0, atol=1e-3)
            checked += len(ours) == K
    assert checked > 50
    # The renderer's rasterize() gives the same layers (and a gradient for each).
    many = DepthRenderer(renderer.faces, renderer.image_size, near=near, faces_per_pixel=K, backend="native")
    v = inputs[0].clone().requires_grad_(True)
    f2, z2 = many.rasterize(v, *inputs[1:])
    assert torch.equal(f2.reshape(face.shape), face) and torch.equal(z2.detach().reshape(zbuf.shape), zbuf)
    z2[..., 2][f2[..., 2] >= 0].sum().backward()
    assert v.grad.abs().max() > 0
    if pytorch3d_available():
        reference = DepthRenderer(renderer.faces, renderer.image_size, near=near, faces_per_pixel=K, tile_size=None,
                                  backend="pytorch3d").rasterize_whole(verts)
        assert torch.equal(face, reference[0]) and torch.equal(zbuf, reference[1])


@pytest.mark.skipif(not pytorch3d_available(), reason=NO_PYTORCH3D)
def test_faces_per_pixel_equal_pytorch3d_on_realistic_views(default_hand):
    K = 4
    renderer, _, verts = _scene(default_hand, "realistic", H=32, W=30)
    ours = rasterize_depth(verts, renderer.faces, renderer.image_size, renderer.near, faces_per_pixel=K)
    reference = DepthRenderer(renderer.faces, renderer.image_size, faces_per_pixel=K, tile_size=None,
                              backend="pytorch3d").rasterize_whole(verts)
    assert (ours[0][..., 3] >= 0).sum() > 100
    assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])


# ------------------------------------------------------------------------ kernel rules, corners
def _hand_made_triangles():
    g = torch.Generator().manual_seed(4)
    tris = torch.rand(40, 3, 3, generator=g)
    tris[..., :2] = tris[..., :2] * 2.4 - 1.2          # some reach beyond the image
    tris[..., 2] = 200 + 100 * tris[..., 2]
    tris[5] = tris[3]                                   # a duplicate: equal depth, the tie goes to 3
    tris[7, 2] = tris[7, 0]                             # zero area
    tris[9, :, 2] = 0.5                                 # entirely behind near = 1
    tris[11] = torch.tensor([[-0.9, -0.9, 0.5], [0.9, -0.8, 150.0], [0.0, 0.9, 160.0]])   # one vertex behind
    tris[11, 0, :2] *= 150.0 / 0.5                      # where such a vertex projects: far out
    # Two vertices behind (camera points (0.3, −0.2, 0.4), (−0.5, 0.4, 0.7), (72, 54, 90)): a small
    # piece in front, reaching depth 1 at its cut edge.
    tris[13] = torch.tensor([[0.3 / 0.4, -0.2 / 0.4, 0.4], [-0.5 / 0.7, 0.4 / 0.7, 0.7], [0.8, 0.6, 90.0]])
    verts = tris.reshape(1, -1, 3).repeat(2, 1, 1)
    verts[1, :, :2] *= -0.7                             # a second view
    return verts, torch.arange(120).reshape(40, 3)


@needs_triton
def test_binned_kernel_in_tritons_interpreter():
    """tests/test_triton_kernel.py run with TRITON_INTERPRET=1: the binned kernel evaluated by
    Triton's interpreter on the CPU against the tensor rasteriser, bit for bit (how CI, which has no
    GPU, checks the kernel's rules)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                          "tests/test_triton_kernel.py"], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout and "skipped" not in out.stdout.splitlines()[-1], out.stdout[-2000:]


def test_kernel_rules_on_hand_made_triangles(monkeypatch):
    """Ties (the lower face index wins), zero-area faces, faces entirely behind the near plane,
    faces beyond the image, one vertex behind (cut into two triangles, both keeping the face's
    index), chunking; and non-finite coordinates are refused, naming view and vertex."""
    import common.renderer.rasterizer as rasterizer_module
    H, W = 30, 34
    verts, faces = _hand_made_triangles()
    ours = rasterize_depth(verts, faces, (H, W), 1.0)
    assert (ours[0] == 3).any() and not (ours[0] == 5).any()
    assert not (ours[0] == 7).any() and not (ours[0] == 9).any()
    assert (ours[0] == 11).sum() > 20 and (ours[1][ours[0] == 11] >= 1.0).all()
    assert torch.equal(ours[1][ours[0] < 0], torch.full_like(ours[1][ours[0] < 0], -1.0))
    # Chunks of a few pairs give the same result.
    monkeypatch.setattr(rasterizer_module, "_CHUNK_PAIRS", {"cpu": 50, "cuda": 50})
    chunked = rasterize_depth(verts, faces, (H, W), 1.0)
    assert torch.equal(chunked[0], ours[0]) and torch.equal(chunked[1], ours[1])
    # Nothing on screen.
    empty = rasterize_depth(verts + torch.tensor([9.0, 0.0, 0.0]), faces, (H, W), 1.0)
    assert (empty[0] == -1).all() and (empty[1] == -1).all()
    if pytorch3d_available():
        reference = _p3d_reference(faces, (H, W), verts)
        assert torch.equal(ours[0], reference[0]) and torch.equal(ours[1], reference[1])
    bad = verts.clone()
    bad[1, 4, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite screen coordinates .* at view 1, vertex 4"):
        rasterize_depth(bad, faces, (H, W), 1.0)
    # An unused vertex may be anything.
    extra = torch.cat((verts, torch.full((2, 1, 3), float("inf"))), 1)
    assert torch.equal(rasterize_depth(extra, faces, (H, W), 1.0)[0], ours[0])


@pytest.mark.parametrize("name, index", [("vertices", (0, 2, 1)), ("campos", (0, 0, 2)), ("focal", (0, 0, 0)),
                                         ("affine", (0, 0, 1, 2))])
def test_non_finite_inputs_are_refused(backend, name, index):
    faces = torch.tensor([[0, 1, 2]])
    inputs = dict(vertices=torch.tensor([[[-130.0, -90.0, 500.0], [160.0, -40.0, 500.0], [-20.0, 140.0, 500.0]]]),
                  camrot=torch.eye(3)[None, None], campos=torch.zeros(1, 1, 3), focal=torch.tensor([[[61.0, 73.0]]]),
                  princpt=torch.tensor([[[27.3, 19.6]]]), affine=torch.tensor([[[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0]]]]))
    r = DepthRenderer(faces, (40, 56), backend=backend)
    assert (r(**inputs) > 0).sum() > 300
    for value in (float("nan"), float("inf")):
        bad = dict(inputs)
        bad[name] = inputs[name].clone()
        bad[name][index] = value
        with pytest.raises(ValueError, match=rf"^{name}: non-finite value") as err:
            r(**bad)
        assert f"{value} at index {index}" in str(err.value), str(err.value)


# ------------------------------------------------------------------------------------ memory
def test_memory_of_a_large_render_is_bounded():
    """256 × 256, batch 8 × 6 views of the 9,860-face default hand, forward and backward, on the
    CPU: the process's peak grows by well under 2 GB (measured ~0.5 GB; the rasteriser's part is
    bounded by its chunk sizes, the rest is the output and the gradient's covered pixels)."""
    code = textwrap.dedent("""
        import torch
        torch.set_num_threads(2)
        from tools.benchmarks.renderer import ring_cameras
        from common.renderer.depth_renderer import DepthRenderer
        from common.hand.default_hand import make_default_hand
        hand = make_default_hand()
        cams = [c.expand(8, *c.shape[1:]).contiguous() for c in ring_cameras(hand.vertices, 6, 256)]
        verts = torch.tensor(hand.vertices, dtype=torch.float32)[None].repeat(8, 1, 1).requires_grad_(True)
        renderer = DepthRenderer(torch.as_tensor(hand.faces), (256, 256), backend="native")
        from tools.benchmarks.renderer import peak_memory_growth_mb
        out = {}
        def render():
            out["depth"] = renderer(verts, *cams).detach()
            renderer(verts, *cams).sum().backward()
        grown = peak_memory_growth_mb(render)
        print(len(hand.faces), float((out["depth"] > 0).float().mean()), int(grown))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    faces, coverage, grown_mb = out.stdout.split()
    assert int(faces) == 9860 and 0.1 < float(coverage) < 0.6
    assert int(grown_mb) < 2048, f"peak memory grew by {grown_mb} MB"


# ------------------------------------------------------------------------------- the option
def test_backend_option_resolves_and_logs_once(monkeypatch, caplog, default_hand, small_cfg):
    monkeypatch.setattr(backend_module, "_ANNOUNCED", set())
    faces = torch.as_tensor(default_hand.faces)
    with caplog.at_level(logging.INFO, logger="common.renderer.backend"):
        chosen = DepthRenderer(faces, 8).backend
        DepthRenderer(faces, 8)
        DepthRenderer(faces, 8, backend="native")
        DepthRenderer(faces, 8, backend="native")
    assert chosen == ("pytorch3d" if pytorch3d_available() else "native")
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("renderer backend:")]
    expected = 1 if chosen == "native" else 2
    assert len(messages) == expected, messages
    assert ("auto: PyTorch3D imports" if chosen == "pytorch3d" else "auto: PyTorch3D does not import") in messages[0]
    with pytest.raises(RendererBackendError, match=r"renderer_backend: expected one of auto, pytorch3d, native"):
        DepthRenderer(faces, 8, backend="opengl")
    # The option reaches the model's renderer.
    from main.model import get_model
    small_cfg.renderer_backend = "native"
    assert get_model("train", default_hand, small_cfg).objective.renderer.backend == "native"


def test_pytorch3d_backend_without_pytorch3d_says_how_to_install(monkeypatch, tmp_path, tiny_set):
    """Where PyTorch3D does not import (simulated where it does), ``renderer_backend: pytorch3d``
    stops with one line naming the requirements file; ``auto`` falls back to the native one."""
    monkeypatch.setattr(backend_module, "_PYTORCH3D", {"error": "ModuleNotFoundError: No module named 'pytorch3d'"})
    with pytest.raises(RendererBackendError) as err:
        resolve_backend("pytorch3d")
    message = str(err.value)
    assert "\n" not in message and "pip install -r requirements.txt" in message and "renderer_backend" in message
    assert resolve_backend("auto") == "native"
    # train.py: exit code 2 and that line in its log, no traceback.
    from main import train as train_script
    from tests.test_train import tiny_args
    args = tiny_args(tiny_set, tmp_path) + ["--set", "renderer_backend=pytorch3d"]
    assert train_script.main(args) == 2
    log = (tmp_path / "log" / "train_logs.txt").read_text()
    assert f"error: {message}" in log and "Traceback" not in log


def test_no_module_imports_pytorch3d_at_import_time():
    modules = ["common.renderer.depth_renderer", "common.renderer.backend", "common.renderer.tiling", "common.renderer.rasterizer",
               "common.nets.loss", "main.model", "main.train", "main.test", "tools.bench", "main.trainer", "main.tester",
               "tools.benchmarks.renderer", "data.make_synthetic", "data.show_sample", "data.dataset", "demo.demo"]
    code = ("import sys, importlib\nsys.path.insert(0, '.')\n"
            f"for m in {modules!r}:\n    importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pytorch3d'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- CUDA against CPU
@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("scene", list(SCENES))
def test_renderer_on_cuda_equals_cpu(default_hand, backend, scene):
    """Both backends on CUDA against the CPU: the same coverage (but for pixel centres within
    rounding of an edge), depths and vertex gradients to float32 tolerance."""
    renderer, inputs, _ = _scene(default_hand, scene)
    renderer = DepthRenderer(renderer.faces, renderer.image_size, near=renderer.near, backend=backend)
    results = []
    for device in ("cpu", "cuda"):
        r = renderer.to(device)
        # A fresh leaf on each device (.to("cpu") of a CPU tensor is the tensor itself).
        v = inputs[0].detach().clone().to(device).requires_grad_(True)
        depth = r(v, *(t.to(device) for t in inputs[1:]))
        depth.sum().backward()
        assert v.grad is not None, device
        results.append((depth.detach().cpu(), v.grad.cpu()))
    (d0, g0), (d1, g1) = results
    differ = ((d0 > 0) != (d1 > 0)).sum()
    assert differ <= max(2, int((d0 > 0).sum()) // 1000)
    both = (d0 > 0) & (d1 > 0)
    assert torch.allclose(d0[both], d1[both], rtol=1e-5, atol=0)
    assert (g0 - g1).abs().max() <= 1e-2 * g0.abs().max()


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@needs_triton
@pytest.mark.parametrize("scene", list(SCENES))
def test_binned_kernel_on_cuda_equals_the_cpu(default_hand, scene):
    """The compiled kernel on CUDA (no fused multiply-add, IEEE division) against the tensor
    rasteriser on the CPU, from the same screen vertices: the same faces, the depths to rounding;
    and the renderer's forward and vertex gradient through it against the CPU's."""
    renderer, inputs, verts = _scene(default_hand, scene, B=2, N=3, H=64, W=58)
    reference = rasterize_depth(verts, renderer.faces, renderer.image_size, renderer.near)
    ours = rasterize_depth_binned(verts.cuda(), renderer.faces.cuda(), renderer.image_size, renderer.near)
    assert (reference[0] >= 0).sum() > 1000
    assert torch.equal(ours[0].cpu(), reference[0])
    _assert_depths_within_rounding(ours[1].cpu(), reference[1], "kernel")
    gpu = DepthRenderer(renderer.faces, renderer.image_size, near=renderer.near, backend="native").cuda()
    assert gpu.uses_kernel(torch.device("cuda"))
    results = []
    for r, device in ((renderer, "cpu"), (gpu, "cuda")):
        v = inputs[0].detach().clone().to(device).requires_grad_(True)
        face, zbuf = r.rasterize(v, *(t.to(device) for t in inputs[1:]))
        depth = r(v, *(t.to(device) for t in inputs[1:]))
        depth.sum().backward()
        results.append((face.cpu(), zbuf.detach().cpu(), depth.detach().cpu(), v.grad.cpu()))
    (f0, z0, d0, g0), (f1, z1, d1, g1) = results
    assert torch.equal(f0, f1)
    _assert_depths_within_rounding(z1, z0, "rasterize")
    _assert_depths_within_rounding(d1, d0, "forward")
    assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-6 * float(g0.abs().max()))


def _assert_depths_within_rounding(ours, reference, what):
    """Depths of the same faces computed on CUDA and on the CPU: equal to float32 rounding (the
    kernel's operations are the CPU's, unfused; a compiler's contraction of a multiply and an add
    would show here as a few ulps). Prints the largest difference in ulps (``pytest -rA``)."""
    seen = reference > 0
    ulp = torch.finfo(torch.float32).eps * reference[seen].abs()
    ulps = float(((ours[seen] - reference[seen]).abs() / ulp).max()) if bool(seen.any()) else 0.0
    print(f"{what} depth on CUDA against the CPU: largest difference {ulps:.1f} ulp, "
          f"{int((ours[seen] != reference[seen]).sum())} of {int(seen.sum())} pixels differ")
    assert torch.equal(ours[~seen], reference[~seen])
    assert ulps <= 16, f"{what}: {ulps:.1f} ulp"


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_decode_on_cuda_equals_cpu(default_hand, small_cfg):
    from main.model import get_model
    torch.manual_seed(0)
    model = get_model("test", default_hand, small_cfg).eval()
    euler = (torch.rand(3, default_hand.joint_num, 3) - 0.5) * torch.from_numpy(default_hand.dof_mask)
    with torch.no_grad():
        cpu = model.decode(euler)
        gpu = model.to("cuda").decode(euler.cuda())
    for key in ("joint_out", "mesh_out_refined"):
        assert torch.allclose(cpu[key], gpu[key].cpu(), rtol=1e-4, atol=1e-3), key


# What a training step on CUDA is compared on, and how. One step of the tiny set (batch 2) in
# float64 on the CPU is the reference; the float32 step on CUDA must be within ERROR_FACTOR times
# the CPU's own float32 error of it (or ERROR_FLOOR of the quantity's largest value), for the four
# losses, the gradient reaching the Euler angles and the posed (rendered) vertices, and the
# gradients of the pose decoder and the correctives: the decoder and the losses from the same
# angles; the encoder with its batch norm in eval mode and TF32 off. Not compared: the encoder's
# gradient with batch norm in training mode. Over a batch of 2 (2 × 2 pixels a channel at a
# ResNet-18's last stage on 64 × 64 crops) it amplifies rounding some 3,600-fold on the CPU alone:
# an input moved by 1e-5 of its values moves conv1's gradient by 3.6 % of its largest value,
# BENCHMARKS.md), so a float32 comparison of it measures the conditioning, not the code.
ERROR_FACTOR = 20.0
ERROR_FLOOR = 1e-5
DECODER_GRADIENTS = ("pose_net.fc.2.weight", "skeleton_refine_net.fc_skeleton.2.weight",
                     "skin_refine_net.fc_pose.2.weight", "skin_refine_net.fc_id.2.weight")
ENCODER_GRADIENTS = ("backbone_net.resnet.conv1.weight", "backbone_net.resnet.layer4.1.conv2.weight",
                     "backbone_net.fc.0.weight")


def _relative_error(value, reference):
    return float((value.double().cpu() - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def _compare_steps(names, reference, cpu, cuda, floor=ERROR_FLOOR):
    report = []
    for name in names:
        cpu_error, cuda_error = _relative_error(cpu[name], reference[name]), _relative_error(cuda[name], reference[name])
        report.append(f"{name}: cpu {cpu_error:.2e}, cuda {cuda_error:.2e}")
        assert cuda_error <= max(ERROR_FACTOR * cpu_error, floor), "\n".join(report)
    print("\n".join(report))


@pytest.fixture
def no_tf32():
    """float32 convolutions and matrix products on CUDA in full float32 (cuDNN's default is TF32)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_decoder_and_losses_on_cuda_equal_cpu(default_hand, tiny_set, no_tf32):
    """From the same Euler angles: losses, the gradient at the angles and at the rendered vertices,
    and the decoder's and correctives' gradients."""
    g = torch.Generator().manual_seed(3)
    euler = (torch.rand(2, default_hand.joint_num, 3, generator=g, dtype=torch.float64) - 0.5) \
        * torch.from_numpy(default_hand.dof_mask)
    steps = [_one_training_step(device, dtype, default_hand, tiny_set, euler=euler)
             for device, dtype in (("cpu", torch.float64), ("cpu", torch.float32), ("cuda", torch.float32))]
    names = [n for n in steps[0] if n.startswith(("loss_", "grad_")) or n in DECODER_GRADIENTS]
    assert len(names) == 9
    _compare_steps(names, *steps)


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_encoder_gradient_on_cuda_equals_cpu(default_hand, tiny_set, no_tf32):
    """The whole step through the encoder, its batch norm in eval mode: the same quantities and the
    encoder's gradients (to 1e-4 of their largest value at least: cuDNN picks its own convolution
    algorithms, whose float32 sums run in another order)."""
    steps = [_one_training_step(device, dtype, default_hand, tiny_set, encoder_batch_norm="eval")
             for device, dtype in (("cpu", torch.float64), ("cpu", torch.float32), ("cuda", torch.float32))]
    names = [n for n in steps[0] if n.startswith(("loss_", "grad_")) or n in DECODER_GRADIENTS]
    _compare_steps(names, *steps)
    _compare_steps(ENCODER_GRADIENTS, *steps, floor=1e-4)


def _one_training_step(device, dtype, hand, data_dir, encoder_batch_norm="train", euler=None):
    """The losses of one training forward on a fixed batch of the tiny set, on ``device`` in
    ``dtype``, the gradients reaching the Euler angles (``grad_euler``) and the posed vertices
    (``grad_mesh``), and the parameters' gradients (compared before any optimizer step: Adam's
    first step is about lr · sign(gradient), which float rounding may flip where a gradient is
    near 0). ``encoder_batch_norm='eval'``: the encoder's batch norm uses its running statistics;
    ``euler`` (``[2, J, 3]``): these angles instead of the encoder's (decoder-only)."""
    from main.loops import split_batch
    from data.dataset import DeepHandMeshDataset
    from main.model import get_model
    from tests.test_train import tiny_config
    config = tiny_config(data_dir)
    dataset = DeepHandMeshDataset.from_config(config, "train", hand, seed=0)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(2)])
    inputs, targets, meta_info = split_batch(batch, torch.device(device))
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    targets = {k: v.to(dtype) if v.is_floating_point() else v for k, v in targets.items()}
    if euler is not None:
        inputs["joint_euler"] = euler.detach().to(device, dtype).clone().requires_grad_(True)
    torch.manual_seed(0)
    model = get_model("train", hand, config).to(device, dtype).train()
    if encoder_batch_norm == "eval":
        model.backbone_net.eval()
    kept = {}
    angles, pose_on_keypoints = model.angles, model.pose_on_keypoints

    def keep_angles(*args):
        kept["euler"] = angles(*args)
        if not kept["euler"].is_leaf:
            kept["euler"].retain_grad()
        return kept["euler"]

    def keep_mesh(*args):
        hand_out, placed = pose_on_keypoints(*args)
        hand_out.mesh.retain_grad()
        kept["mesh"] = hand_out.mesh
        return hand_out, placed

    model.angles, model.pose_on_keypoints = keep_angles, keep_mesh
    loss = model(inputs, targets, meta_info, "train")
    sum(v.mean() for v in loss.values()).backward()
    out = {f"loss_{k}": v.detach().mean() for k, v in loss.items()}
    out.update(grad_euler=kept["euler"].grad, grad_mesh=kept["mesh"].grad)
    out.update({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    return {k: v.double().cpu() for k, v in out.items()}


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_large_render_on_cuda_fits_in_a_few_gb(default_hand):
    """256 × 256, batch 8 × 6 views of the 9,860-face default hand, forward and backward, native
    backend on CUDA (its larger chunks): at most 3 GB allocated at the peak, and the same coverage
    as the CPU's for one of the samples."""
    from tools.benchmarks.renderer import ring_cameras
    cams = [c.expand(8, *c.shape[1:]).contiguous().cuda() for c in ring_cameras(default_hand.vertices, 6, 256)]
    verts = torch.tensor(default_hand.vertices, dtype=torch.float32)[None].repeat(8, 1, 1).cuda().requires_grad_(True)
    renderer = DepthRenderer(torch.as_tensor(default_hand.faces), (256, 256), backend="native").cuda()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    depth = renderer(verts, *cams)
    depth.sum().backward()
    torch.cuda.synchronize()
    peak_gb = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
    assert peak_gb < 3, f"{peak_gb:.2f} GB"
    cpu = DepthRenderer(torch.as_tensor(default_hand.faces), (256, 256), backend="native")(
        verts[:1].detach().cpu(), *(c[:1].cpu() for c in cams))
    differ = int(((cpu > 0) != (depth[:1].detach().cpu() > 0)).sum())
    assert (cpu > 0).sum() > 10000 and differ <= int((cpu > 0).sum()) // 1000
