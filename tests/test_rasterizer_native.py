"""The native rasteriser (common/nets/rasterizer.py) on its own, the renderer's backend option and
the CUDA checks (skipped without CUDA).

These run with and without PyTorch3D: the references are a numpy ray caster, PyTorch3D-free
properties of the kernel's rules and, where present, PyTorch3D itself (skipped with the reason
where it is absent).
"""
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import common.nets.backend as backend_module
from common.nets.rasterizer import default_chunks, rasterize_depth
from common.nets.renderer import DepthRenderer, RendererBackendError, pytorch3d_available, resolve_backend
from tests.conftest import REPO
from tests.test_renderer import (NO_PYTORCH3D, SCENES, _hand_batch, _p3d_reference, brute_force_depth,
                                 backend)  # noqa: F401  (the fixture: both backends)

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device here: this test runs on CUDA (against the CPU)"


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
def test_kernel_rules_on_hand_made_triangles(monkeypatch):
    """Ties (the lower face index wins), zero-area faces, faces entirely behind the near plane,
    faces beyond the image, one vertex behind (cut into two triangles, both keeping the face's
    index), chunking; and non-finite coordinates are refused, naming view and vertex."""
    import common.nets.rasterizer as rasterizer_module
    g = torch.Generator().manual_seed(4)
    H, W = 30, 34
    tris = torch.rand(40, 3, 3, generator=g)
    tris[..., :2] = tris[..., :2] * 2.4 - 1.2          # some reach beyond the image
    tris[..., 2] = 200 + 100 * tris[..., 2]
    tris[5] = tris[3]                                   # a duplicate: equal depth, the tie goes to 3
    tris[7, 2] = tris[7, 0]                             # zero area
    tris[9, :, 2] = 0.5                                 # entirely behind near = 1
    tris[11] = torch.tensor([[-0.9, -0.9, 0.5], [0.9, -0.8, 150.0], [0.0, 0.9, 160.0]])   # one vertex behind
    tris[11, 0, :2] *= 150.0 / 0.5                      # where such a vertex projects: far out
    verts = tris.reshape(1, -1, 3).repeat(2, 1, 1)
    verts[1, :, :2] *= -0.7                             # a second view
    faces = torch.arange(120).reshape(40, 3)
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
        from main.benchmarks.renderer import ring_cameras
        from common.nets.renderer import DepthRenderer
        from common.utils.default_hand import make_default_hand
        hand = make_default_hand()
        cams = [c.expand(8, *c.shape[1:]).contiguous() for c in ring_cameras(hand.vertices, 6, 256)]
        verts = torch.tensor(hand.vertices, dtype=torch.float32)[None].repeat(8, 1, 1).requires_grad_(True)
        renderer = DepthRenderer(torch.as_tensor(hand.faces), (256, 256), backend="native")
        from main.benchmarks.renderer import peak_memory_growth_mb
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
    with caplog.at_level(logging.INFO, logger="common.nets.backend"):
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
    modules = ["common.nets.renderer", "common.nets.backend", "common.nets.tiling", "common.nets.rasterizer",
               "common.nets.loss", "main.model", "main.train", "main.test", "main.bench", "main.trainer", "main.tester",
               "main.benchmarks.renderer", "data.make_synthetic", "data.show_sample", "data.dataset", "demo.demo"]
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
        v = inputs[0].to(device).requires_grad_(True)
        depth = r(v, *(t.to(device) for t in inputs[1:]))
        depth.sum().backward()
        results.append((depth.detach().cpu(), v.grad.cpu()))
    (d0, g0), (d1, g1) = results
    differ = ((d0 > 0) != (d1 > 0)).sum()
    assert differ <= max(2, int((d0 > 0).sum()) // 1000)
    both = (d0 > 0) & (d1 > 0)
    assert torch.allclose(d0[both], d1[both], rtol=1e-5, atol=0)
    assert (g0 - g1).abs().max() <= 1e-2 * g0.abs().max()


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_decode_and_a_training_step_on_cuda_equal_cpu(default_hand, small_cfg, tiny_set):
    from main.model import get_model
    torch.manual_seed(0)
    model = get_model("test", default_hand, small_cfg).eval()
    euler = (torch.rand(3, default_hand.joint_num, 3) - 0.5) * torch.from_numpy(default_hand.dof_mask)
    with torch.no_grad():
        cpu = model.decode(euler)
        gpu = model.to("cuda").decode(euler.cuda())
    for key in ("joint_out", "mesh_out_refined"):
        assert torch.allclose(cpu[key], gpu[key].cpu(), rtol=1e-4, atol=1e-3), key
    steps = [_one_training_step(device, default_hand, tiny_set) for device in ("cpu", "cuda")]
    for name, value in steps[0].items():
        other = steps[1][name].cpu()
        if name.startswith("loss_"):
            assert torch.allclose(value, other, rtol=1e-4, atol=1e-6), (name, value, other)
        else:  # gradients, to float32 accumulation differences
            assert (value - other).abs().max() <= 1e-3 * value.abs().max() + 1e-8, name


def _one_training_step(device, hand, data_dir):
    """The losses of one training forward on a fixed batch of the tiny set, on ``device``, and the
    parameters' gradients (compared before any optimizer step: Adam's first step is about
    lr · sign(gradient), which float rounding may flip where a gradient is near 0)."""
    from main.trainer import split_batch
    from data.dataset import DeepHandMeshDataset
    from main.model import get_model
    from tests.test_train import tiny_config
    config = tiny_config(data_dir)
    dataset = DeepHandMeshDataset.from_config(config, "train", hand, seed=0)
    batch = torch.utils.data.default_collate([dataset[i] for i in range(2)])
    inputs, targets, meta_info = split_batch(batch, torch.device(device))
    torch.manual_seed(0)
    model = get_model("train", hand, config).to(device).train()
    loss = model(inputs, targets, meta_info, "train")
    sum(v.mean() for v in loss.values()).backward()
    out = {f"loss_{k}": v.detach().mean() for k, v in loss.items()}
    out.update({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    return out


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_large_render_on_cuda_fits_in_a_few_gb(default_hand):
    """256 × 256, batch 8 × 6 views of the 9,860-face default hand, forward and backward, native
    backend on CUDA (its larger chunks): at most 3 GB allocated at the peak, and the same coverage
    as the CPU's for one of the samples."""
    from main.benchmarks.renderer import ring_cameras
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
