"""The native renderer's binned Triton kernel (common/renderer/triton_rasterizer.py) against the
tensor rasteriser (common/renderer/rasterizer.py).

The kernel runs where Triton runs it: compiled on CUDA, or in Triton's interpreter on the CPU
when ``TRITON_INTERPRET=1`` was set before Python started. The suite runs this module both ways:
directly (on a machine with CUDA: the compiled kernel, depths to float32 rounding) and, through
``tests/test_rasterizer_native.py::test_binned_kernel_in_tritons_interpreter``, in a subprocess
with ``TRITON_INTERPRET=1`` (every machine with Triton: the interpreter, bit for bit).
"""
import inspect

import numpy as np
import pytest
import torch

from common.renderer import triton_rasterizer
from common.renderer.depth_renderer import DepthRenderer
from common.renderer.rasterizer import EMPTY_KEY, rasterize_depth
from common.renderer.triton_rasterizer import (FACES_PER_STEP, TILE_H, TILE_W, bin_faces, interpreting,
                                               rasterize_depth_binned, triton_available)
from tests.test_rasterizer_native import _hand_made_triangles
from tests.test_renderer import SCENES, _hand_batch

if not triton_available():
    DEVICE, WHY = None, "Triton does not import here (it ships with PyTorch's CUDA wheels)"
elif interpreting():
    DEVICE, WHY = "cpu", ""
elif torch.cuda.is_available():
    DEVICE, WHY = "cuda", ""
else:
    DEVICE, WHY = None, ("no CUDA device, and Triton's interpreter is off: this module runs in a subprocess with "
                         "TRITON_INTERPRET=1 (test_rasterizer_native.py::test_binned_kernel_in_tritons_interpreter)")
pytestmark = [pytest.mark.skipif(DEVICE is None, reason=WHY or "-"),
              # The interpreter evaluates masked-out lanes too (0 / 0 where no face covers a pixel).
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]


def _assert_same_maps(ours, reference, what=""):
    """The same faces; the same depths bit for bit in the interpreter, to float32 rounding (a few
    ulps, where a compiler rounds an operation otherwise) on CUDA."""
    face, zbuf = (t.cpu() for t in ours)
    assert torch.equal(face, reference[0]), what
    if DEVICE == "cpu":
        assert torch.equal(zbuf, reference[1]), what
    else:
        seen = reference[1] > 0
        assert torch.equal(zbuf[~seen], reference[1][~seen]), what
        ulps = ((zbuf[seen] - reference[1][seen]).abs() / (torch.finfo(torch.float32).eps * reference[1][seen]))
        print(f"{what}: depth on CUDA against the CPU: largest difference {float(ulps.max()):.1f} ulp")
        assert float(ulps.max()) <= 16, what


@pytest.mark.parametrize("tile, faces_per_step", [((TILE_H, TILE_W), FACES_PER_STEP), ((16, 8), 16)])
def test_binned_kernel_equals_the_tensor_rasteriser(tile, faces_per_step):
    """The hand-made triangles (ties, zero area, faces behind the near plane, cut into one or two
    triangles, beyond the image), a soup of large random triangles overlapping across tiles (odd
    image sizes: partial tiles), and nothing on screen; at several tile sizes and faces per step."""
    verts, faces = _hand_made_triangles()
    H, W = 30, 34
    reference = rasterize_depth(verts, faces, (H, W), 1.0)
    assert (reference[0] == 11).sum() > 20 and (reference[0] == 13).sum() > 5 and (reference[0] == 3).any()
    ours = rasterize_depth_binned(verts.to(DEVICE), faces.to(DEVICE), (H, W), 1.0, tile, faces_per_step)
    _assert_same_maps(ours, reference, "hand-made")
    g = torch.Generator().manual_seed(7)
    soup = torch.rand(3, 60, 3, generator=g) * 2 - 1
    soup[..., 2] = torch.rand(3, 60, generator=g) * 50 + 0.5     # a few vertices behind near = 1
    soup_faces = torch.randint(0, 60, (70, 3), generator=g)
    for size in ((37, 21),):
        reference = rasterize_depth(soup, soup_faces, size, 1.0)
        assert (reference[0] >= 0).float().mean() > 0.3
        ours = rasterize_depth_binned(soup.to(DEVICE), soup_faces.to(DEVICE), size, 1.0, tile, faces_per_step)
        _assert_same_maps(ours, reference, f"soup {size}")
    empty = rasterize_depth_binned((verts + torch.tensor([9.0, 0.0, 0.0])).to(DEVICE), faces.to(DEVICE), (H, W),
                                   1.0, tile, faces_per_step)
    assert (empty[0] == -1).all() and (empty[1] == -1).all()


def test_non_finite_vertices_and_the_wrong_device_are_refused():
    verts, faces = _hand_made_triangles()
    bad = verts.clone()
    bad[1, 4, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite screen coordinates .* at view 1, vertex 4"):
        rasterize_depth_binned(bad.to(DEVICE), faces.to(DEVICE), (30, 34), 1.0)
    if DEVICE == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match="CPU tensors only"):
            rasterize_depth_binned(verts.cuda(), faces.cuda(), (30, 34), 1.0)


def test_binning_lists_every_tile_a_face_reaches():
    """Each face is listed in exactly the tiles its range of pixel centres meets, in every view,
    and the tiles' lists follow one another (start offsets)."""
    g = torch.Generator().manual_seed(2)
    H, W, M = 70, 45, 3
    r0, c0 = torch.randint(0, H, (50,), generator=g), torch.randint(0, W, (50,), generator=g)
    rows = torch.minimum(torch.randint(1, 40, (50,), generator=g), H - r0)
    cols = torch.minimum(torch.randint(1, 40, (50,), generator=g), W - c0)
    view = torch.randint(0, M, (50,), generator=g)
    for h, w in ((TILE_H, TILE_W), (16, 8)):
        start, pairs = bin_faces(torch.stack((r0, c0, rows, cols)), view, (H, W), M, (h, w))
        down, across = -(-H // h), -(-W // w)
        assert len(start) == M * down * across + 1 and int(start[-1]) == len(pairs)
        for t in range(M * down * across):
            m, ty, tx = t // (down * across), (t % (down * across)) // across, t % across
            listed = sorted(pairs[start[t]:start[t + 1]].tolist())
            expected = [i for i in range(50) if view[i] == m
                        and r0[i] <= ty * h + h - 1 and r0[i] + rows[i] - 1 >= ty * h
                        and c0[i] <= tx * w + w - 1 and c0[i] + cols[i] - 1 >= tx * w]
            assert listed == expected, (h, w, t)


def test_kernel_empty_key_is_the_rasterisers():
    """The kernel writes ``0x7FFF…`` where no face covers a pixel: the tensor path's empty key."""
    assert EMPTY_KEY == 0x7FFFFFFFFFFFFFFF
    assert "0x7FFFFFFFFFFFFFFF" in inspect.getsource(triton_rasterizer)


def test_renderer_with_the_kernel_equals_the_tensor_path(default_hand):
    """DepthRenderer's native backend through the kernel against its tensor operations: the same
    depth maps and the same vertex and camera gradients, the near plane cutting the hand or not (a
    coarse copy of the hand keeps the interpreter quick)."""
    faces = torch.as_tensor(default_hand.faces)[::4].contiguous()
    for scene in SCENES:
        distance, near = SCENES[scene]
        inputs = _hand_batch(np.asarray(default_hand.vertices, float), 1, 2, 24, 22, distance=distance)
        results = []
        for kind in ("tensor", "triton"):
            r = DepthRenderer(faces, (24, 22), near=near, backend="native", native_rasteriser=kind).to(DEVICE)
            assert r.uses_kernel(torch.device(DEVICE)) == (kind == "triton")
            v = inputs[0].detach().clone().to(DEVICE).requires_grad_(True)
            campos = inputs[2].detach().clone().to(DEVICE).requires_grad_(True)
            cams = [t.to(DEVICE) for t in inputs[1:]]
            depth = r(v, cams[0], campos, *cams[2:])
            weights = torch.linspace(0.5, 1.5, depth.numel(), device=DEVICE).reshape(depth.shape)
            (depth * weights).sum().backward()
            results.append((depth.detach().cpu(), v.grad.cpu(), campos.grad.cpu()))
        (d0, g0, c0), (d1, g1, c1) = results
        assert (d0 > 0).sum() > 100, scene
        if DEVICE == "cpu":
            assert torch.equal(d0, d1) and torch.equal(g0, g1) and torch.equal(c0, c1), scene
        else:
            assert torch.equal(d0 > 0, d1 > 0), scene
            assert torch.allclose(d0, d1, rtol=2e-6, atol=0), scene
            assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-6 * float(g0.abs().max())), scene
            assert torch.allclose(c0, c1, rtol=1e-4, atol=1e-6 * float(c0.abs().max())), scene
