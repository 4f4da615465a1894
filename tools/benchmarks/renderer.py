"""Timing of :class:`common.renderer.depth_renderer.DepthRenderer`.

Renders a hand template seen by ``views`` cameras placed around it (as the training loop does:
B = 1 sample, N views, one rasteriser call), each view cropped to its bounding box and warped to
``size × size``, and reports the median time of ``repeats`` calls, with the renderer's backends:
the project's own rasteriser (``native``) or PyTorch3D's kernel (tiled, or untiled with
``tile_size`` 0). Face count is varied with :func:`subdivide`; :func:`memory_growth` measures the
native backend's peak memory. Run through ``python tools/bench.py renderer``.
"""
from __future__ import annotations

import math
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from common.errors import OptionError
from tools.benchmarks.timing import median_seconds
from common.renderer.depth_renderer import DEFAULT_TILE_SIZE, DepthRenderer, project_points

# The data set's cameras' pixel space (KRT_512): 512 high, 334 wide; focal length of that order.
_IMG_H, _IMG_W = 512, 334
_FOCAL = (1200.0, 1200.0)
_PRINCPT = (167.0, 256.0)


def ring_cameras(vertices: np.ndarray, views: int, size: int, distance: float = 650.0):
    """``views`` cameras on a tilted ring ``distance`` mm around the mesh's bounding-box centre,
    each with the crop affine that maps the projected mesh's box (1.5× enlarged) onto a
    ``size × size`` image.

    Returns float32 tensors ``camrot [1, N, 3, 3]``, ``campos [1, N, 3]``, ``focal [1, N, 2]``,
    ``princpt [1, N, 2]``, ``affine [1, N, 2, 3]``.
    """
    verts = np.asarray(vertices, np.float64)
    centre = (verts.min(0) + verts.max(0)) / 2
    rots, poss = [], []
    # The ring goes around the longest axis of the mesh's box, which is also the image's "up", so
    # that a hand stands upright in every view (and no camera looks along "up").
    long_axis = int(np.argmax(verts.max(0) - verts.min(0)))
    up = np.eye(3)[long_axis]
    side_a, side_b = (np.eye(3)[k] for k in range(3) if k != long_axis)
    for i in range(views):
        az = 2 * math.pi * i / views
        el = math.radians(25.0 * math.sin(2 * az))
        campos = centre + distance * (math.cos(el) * (math.sin(az) * side_a - math.cos(az) * side_b)
                                      + math.sin(el) * up)
        z = (centre - campos) / np.linalg.norm(centre - campos)
        y = -(up - (up @ z) * z)
        y /= np.linalg.norm(y)
        rots.append(np.stack([np.cross(y, z), y, z]))
        poss.append(campos)
    camrot = torch.tensor(np.stack(rots), dtype=torch.float32)[None]
    campos = torch.tensor(np.stack(poss), dtype=torch.float32)[None]
    focal = torch.tensor(_FOCAL, dtype=torch.float32).expand(1, views, 2).clone()
    princpt = torch.tensor(_PRINCPT, dtype=torch.float32).expand(1, views, 2).clone()
    uv = project_points(torch.tensor(verts, dtype=torch.float32)[None], camrot, campos, focal, princpt)[0, ..., :2]
    lo, hi = uv.min(1).values, uv.max(1).values                             # [N, 2]
    mid, half = (lo + hi) / 2, (hi - lo) / 2 * 1.5
    x0 = (mid[:, 0] - half[:, 0]).clamp(min=-0.5)
    y0 = (mid[:, 1] - half[:, 1]).clamp(min=-0.5)
    x1 = (mid[:, 0] + half[:, 0]).clamp(max=_IMG_W - 0.5)
    y1 = (mid[:, 1] + half[:, 1]).clamp(max=_IMG_H - 0.5)
    sx, sy = size / (x1 - x0), size / (y1 - y0)
    zero = torch.zeros_like(sx)
    affine = torch.stack([torch.stack([sx, zero, -0.5 - sx * x0], -1),
                          torch.stack([zero, sy, -0.5 - sy * y0], -1)], -2)[None]
    return camrot, campos, focal, princpt, affine


def subdivide(vertices, faces, times: int = 1) -> SimpleNamespace:
    """Midpoint subdivision, ``times`` times: every triangle becomes four (4× the faces), the new
    vertices at the edges' midpoints, so the surface and its image stay the same.

    Args:
        vertices: ``[V, 3]`` (mm); faces: ``[F, 3]`` vertex indices.
    Returns:
        an object with ``.vertices [V', 3]`` and ``.faces [4^times · F, 3]``, as
        :func:`time_renderer` takes.
    """
    verts = np.asarray(vertices, np.float64)
    tris = np.asarray(faces, np.int64)
    for _ in range(times):
        edges = np.concatenate([tris[:, [0, 1]], tris[:, [1, 2]], tris[:, [2, 0]]])
        unique, inverse = np.unique(np.sort(edges, axis=1), axis=0, return_inverse=True)
        mid = len(verts) + inverse.reshape(3, -1)  # the new vertex on each face's edges 01, 12, 20
        verts = np.concatenate([verts, verts[unique].mean(axis=1)])
        a, b, c = tris.T
        ab, bc, ca = mid
        tris = np.concatenate([np.stack(t, 1) for t in ((a, ab, ca), (ab, b, bc), (ca, bc, c), (ab, bc, ca))])
    return SimpleNamespace(vertices=verts, faces=tris)


def _call(renderer: DepthRenderer, vertices: torch.Tensor, cams, backward: bool) -> torch.Tensor:
    with torch.set_grad_enabled(backward):
        depth = renderer(vertices, *cams)
        if backward:
            depth.sum().backward()
    return depth.detach()


# The variants a benchmark compares: label → DepthRenderer options.
def variant(name: str, tile_size: Optional[int] = DEFAULT_TILE_SIZE) -> Tuple[str, Dict]:
    """``('native', …)``: the project's rasteriser (on CUDA its binned Triton kernel, on the CPU its
    tensor operations); ``native-tensor`` / ``native-triton``: either one explicitly (``nat/ten``,
    ``nat/tri``; the kernel on the CPU runs in Triton's interpreter); ``('pytorch3d', …)``:
    PyTorch3D's kernel (``tile_size`` 0: each view whole); ``('auto', …)``: what
    ``renderer_backend: auto`` runs (with PyTorch3D on the CPU: the vectorised rasteriser where it
    equals PyTorch3D)."""
    if name == "native":
        return "native", {"backend": "native"}
    if name in ("native-tensor", "native-triton"):
        kind = name.split("-")[1]
        return f"nat/{kind[:3]}", {"backend": "native", "native_rasteriser": kind}
    if name == "pytorch3d":
        return f"p3d/t{int(tile_size or 0)}", {"backend": "pytorch3d", "cpu_rasteriser": "pytorch3d",
                                                "tile_size": tile_size}
    if name == "auto":
        return "auto", {"backend": "auto"}
    raise ValueError(f"variant: expected native, native-tensor, native-triton, pytorch3d or auto, got {name!r}")


def time_renderer(hand_model, sizes: Sequence[int] = (64, 128, 256), views: int = 6, repeats: int = 5,
                  device: Optional[torch.device | str] = None, num_threads: Optional[int] = None,
                  backward: bool = False, options: Optional[Dict] = None) -> List[Dict]:
    """Median time of :class:`DepthRenderer` on ``hand_model``'s template.

    Args:
        hand_model: anything with ``.vertices [V, 3]`` (mm) and ``.faces [F, 3]``, e.g. a
            :class:`common.hand.hand_model.HandModel`.
        sizes: square render sizes in pixels.
        views: cameras per call (batch B = 1).
        repeats: timed calls per size (after one untimed warm-up call).
        device: where to render (default CPU).
        num_threads: if given, ``torch.set_num_threads`` for the measurement (restored after).
        backward: time forward + backward of ``depth.sum()`` wrt the vertices instead of
            the forward alone.
        options: :class:`DepthRenderer` keyword arguments (``backend``, ``tile_size``, …).

    Returns:
        One dict per size: ``size``, ``views``, ``faces``, ``vertices``, ``device``,
        ``threads``, ``backward``, ``options``, ``ms_per_call`` (median), ``ms_per_view``
        (= ms_per_call / views), ``coverage`` (mean fraction of pixels with depth, a sanity check).
    """
    device = torch.device(device or "cpu")
    options = dict(options or {})
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        verts = torch.tensor(np.asarray(hand_model.vertices), dtype=torch.float32, device=device)[None]
        faces = torch.as_tensor(np.asarray(hand_model.faces), dtype=torch.int64)
        results = []
        for size in sizes:
            cams = [t.to(device) for t in ring_cameras(hand_model.vertices, views, int(size))]
            renderer = DepthRenderer(faces, image_size=(int(size), int(size)), **options).to(device)
            v = verts.clone().requires_grad_(backward)
            depth = _call(renderer, v, cams, backward)                          # warm-up
            ms = 1000.0 * median_seconds(lambda: _call(renderer, v, cams, backward), repeats, warmup=0,
                                         device=device)
            results.append({
                "size": int(size), "views": int(views), "faces": int(faces.shape[0]),
                "vertices": int(verts.shape[1]), "device": str(device), "threads": torch.get_num_threads(),
                "backward": bool(backward), "options": options, "ms_per_call": ms, "ms_per_view": ms / views,
                "coverage": float((depth > 0).float().mean()),
            })
        return results
    finally:
        torch.set_num_threads(old_threads)


def _interleaved_ms(calls: Dict[str, object], repeats: int, device: torch.device,
                    clock: str = "wall") -> Dict[str, float]:
    """Median ms of each of ``calls`` (label → function), timed in turn, A B C A B C …, so that
    every variant sees the same load of the machine (after one untimed call of each).
    ``clock='thread'``: the CPU time of the calling thread instead of wall time (with one torch
    thread on the CPU all the work is on it), which other jobs on the machine hardly change."""
    import statistics
    import time

    from tools.benchmarks.timing import synchronize

    timer = time.thread_time if clock == "thread" else time.perf_counter

    for fn in calls.values():
        fn()
    times = {label: [] for label in calls}
    for _ in range(max(1, repeats)):
        for label, fn in calls.items():
            synchronize(device)
            start = timer()
            fn()
            synchronize(device)
            times[label].append(1000.0 * (timer() - start))
    return {label: statistics.median(t) for label, t in times.items()}


def compare_renderers(hands: Sequence, sizes: Sequence[int] = (64, 128, 256), views: int = 6, repeats: int = 5,
                      variants: Sequence[Tuple[str, Dict]] = (variant("native"), variant("pytorch3d")),
                      num_threads: Optional[int] = None, device: Optional[str] = None, clock: str = "wall",
                      print_fn=print, batch: int = 1) -> List[Dict]:
    """Time forward and forward + backward for each ``(label, options)`` variant (see
    :func:`variant`), the variants' calls interleaved (``clock``: see :func:`_interleaved_ms`), and print one row per (hand, size,
    variant), with how many times faster the first variant is than each other one.

    ``hands``: ``(name, hand_model)`` pairs; ``batch``: samples per call (copies of the template,
    each seen by the ``views`` cameras).  Returns the rows as dicts (``hand``, ``size``,
    ``variant``, ``faces``, ``ms_per_view``, ``ms_per_view_backward``, ``coverage``).
    """
    device = torch.device(device or "cpu")
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    if clock == "thread" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise OptionError("--clock thread measures the CPU time of one thread: use it on the CPU with --threads 1")
    print_fn(f"depth renderer on {device}, {torch.get_num_threads()} threads; B={batch} sample(s) x {views} views in one "
             f"call; median of {repeats} runs ({'CPU time of the thread' if clock == 'thread' else 'wall time'}), "
             f"the variants' calls interleaved; p3d/tN = PyTorch3D's kernel, "
             f"N-pixel tiles (0: untiled)")
    first = variants[0][0]
    print_fn(f"{'hand':<12} {'faces':>6} {'size':>9} {'variant':>8} | {'ms/view':>8} {'ms/call':>8} | "
             f"{'+backward ms/view':>17} | {first + ' faster: fwd':>18} {'+bwd':>6}")
    out = []
    try:
        for name, hand in hands:
            verts = torch.tensor(np.asarray(hand.vertices), dtype=torch.float32, device=device)[None]
            verts = verts.repeat(batch, 1, 1)
            faces = torch.as_tensor(np.asarray(hand.faces), dtype=torch.int64)
            for size in sizes:
                cams = [t.to(device).expand(batch, *t.shape[1:]).contiguous()
                        for t in ring_cameras(hand.vertices, views, int(size))]
                renderers = {label: DepthRenderer(faces, image_size=(int(size), int(size)), **options).to(device)
                             for label, options in variants}
                ms = {}
                for backward in (False, True):
                    v = verts.clone().requires_grad_(backward)
                    calls = {label: (lambda r=r: _call(r, v, cams, backward)) for label, r in renderers.items()}
                    ms[backward] = _interleaved_ms(calls, repeats, device, clock)
                coverage = float((_call(renderers[first], verts, cams, False) > 0).float().mean())
                for label, _ in variants:
                    fwd, bwd = ms[False][label] / (batch * views), ms[True][label] / (batch * views)
                    gain = ""
                    if label != first:
                        gain = (f"{ms[False][label] / ms[False][first]:>17.1f}x "
                                f"{ms[True][label] / ms[True][first]:>5.1f}x")
                    print_fn(f"{name:<12} {faces.shape[0]:>6} {size:>4}x{size:<4} {label:>8} | {fwd:>8.3f} "
                             f"{ms[False][label]:>8.2f} | {bwd:>17.3f} | {gain}")
                    out.append({"hand": name, "size": int(size), "variant": label, "faces": int(faces.shape[0]),
                                "ms_per_view": fwd, "ms_per_view_backward": bwd, "coverage": coverage})
    finally:
        torch.set_num_threads(old_threads)
    return out


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def peak_memory_growth_mb(fn) -> float:
    """How far ``fn()`` raises this process's resident memory above what it holds before (MB):
    freed heap memory is first given back to the system (``malloc_trim``) and the kernel's peak
    counter reset (``/proc/self/clear_refs``), then the peak (``VmHWM``) read after the call.
    Linux only; elsewhere the growth of ``ru_maxrss``, a lower bound."""
    import ctypes
    import gc
    import resource

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return (_status_kb("VmHWM") - before) / 1024.0
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024.0


def _memory_probe(mesh_path: str, size: int, views: int, backend: str) -> None:
    """Run in a fresh process (see :func:`memory_growth`): print the peak memory growth (MB) of one
    forward + backward render, after a first small render has loaded the code."""
    mesh = np.load(mesh_path)
    hand = SimpleNamespace(vertices=mesh["vertices"], faces=mesh["faces"])
    cams = ring_cameras(hand.vertices, views, size)
    renderer = DepthRenderer(torch.as_tensor(hand.faces), (size, size), backend=backend)
    small = DepthRenderer(torch.as_tensor(hand.faces), (8, 8), backend=backend)
    verts = torch.tensor(hand.vertices, dtype=torch.float32)[None]
    _call(small, verts.clone().requires_grad_(True), ring_cameras(hand.vertices, 1, 8), True)
    print(peak_memory_growth_mb(lambda: _call(renderer, verts.clone().requires_grad_(True), cams, True)))


def memory_growth(hands: Sequence, sizes: Sequence[int] = (64, 128, 256), views: int = 6, backend: str = "native",
                  device: Optional[str] = None, print_fn=print) -> List[Dict]:
    """Peak memory of one forward + backward render (B = 1 × ``views``) against image size and face
    count: on the CPU the growth of the peak resident memory of a fresh process (MB), on CUDA
    ``torch.cuda.max_memory_allocated`` above what was allocated before (MB)."""
    device = str(device or "cpu")
    print_fn(f"peak memory of one forward + backward, {backend} backend on {device}, B=1 x {views} views (MB)")
    print_fn(f"{'hand':<12} {'faces':>6} " + " ".join(f"{s:>4}x{s:<4}" for s in sizes))
    out = []
    for name, hand in hands:
        row = []
        for size in sizes:
            if device.startswith("cuda"):
                cams = [t.to(device) for t in ring_cameras(hand.vertices, views, int(size))]
                renderer = DepthRenderer(torch.as_tensor(np.asarray(hand.faces)), (size, size), backend=backend).to(device)
                verts = torch.tensor(np.asarray(hand.vertices), dtype=torch.float32, device=device)[None]
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                _call(renderer, verts.clone().requires_grad_(True), cams, True)
                mb = (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    path = str(Path(tmp) / "mesh.npz")
                    np.savez(path, vertices=np.asarray(hand.vertices, np.float64), faces=np.asarray(hand.faces))
                    code = (f"from tools.benchmarks.renderer import _memory_probe; "
                            f"_memory_probe({path!r}, {int(size)}, {int(views)}, {backend!r})")
                    root = Path(__file__).resolve().parents[2]
                    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                                          check=True)
                    mb = float(done.stdout.split()[-1])
            row.append(mb)
            out.append({"hand": name, "faces": int(len(hand.faces)), "size": int(size), "mb": mb})
        print_fn(f"{name:<12} {len(hand.faces):>6} " + " ".join(f"{mb:>9.0f}" for mb in row))
    return out


# The kernel settings of BENCHMARKS.md's table: (tile height, tile width, faces per step, warps).
KERNEL_SETTINGS = ((16, 16, 1, 4), (8, 8, 1, 2), (8, 8, 4, 2), (8, 8, 8, 4),
                   (8, 8, 16, 4), (16, 16, 4, 4), (16, 16, 8, 8), (8, 16, 8, 4))


def kernel_tiles(hand, size: int = 256, views: int = 6, batch: int = 8, repeats: int = 20,
                 tiles: Optional[Sequence[Tuple[int, int, int, int]]] = None,
                 device: str = "cuda", print_fn=print) -> List[Dict]:
    """The binned kernel's rasterisation alone (no gradient) of ``batch`` × ``views`` views of
    ``hand``, per ``(tile height, tile width, faces per step, warps)`` of ``tiles`` (None:
    :data:`KERNEL_SETTINGS`); and the part before the kernel (clipping, per-face values, binning).
    Median ms of ``repeats`` calls."""
    from common.renderer.rasterizer import check_screen_vertices, clip_near, prepare_faces
    from common.renderer.triton_rasterizer import TILE_H, TILE_W, bin_faces, rasterize_depth_binned

    device = torch.device(device)
    faces = torch.as_tensor(np.asarray(hand.faces), dtype=torch.int64, device=device)
    cams = [t.to(device).expand(batch, *t.shape[1:]).contiguous() for t in ring_cameras(hand.vertices, views, size)]
    verts = torch.tensor(np.asarray(hand.vertices), dtype=torch.float32, device=device)[None].repeat(batch, 1, 1)
    renderer = DepthRenderer(faces.cpu(), (size, size), backend="native").to(device)
    screen = renderer.screen_vertices(verts, *cams).reshape(batch * views, -1, 3).contiguous()
    M, F = screen.shape[0], faces.shape[0]

    def before_kernel():
        check_screen_vertices(screen, faces)
        fv = screen[:, faces].permute(3, 2, 0, 1).reshape(3, 3, M * F)
        fv, owner = clip_near(fv, torch.arange(M * F, device=device), renderer.near)
        values, ranges, owner = prepare_faces(fv, owner, size, size)
        return bin_faces(ranges, torch.div(owner, F, rounding_mode="floor"), (size, size), M)

    rows = []
    prep = 1000 * median_seconds(before_kernel, repeats, device=device)
    start, pairs = before_kernel()
    print_fn(f"binned kernel on {device}: {batch} x {views} views of {size}x{size}, {F} faces; "
             f"{len(pairs)} (tile, face) pairs at {TILE_H}x{TILE_W}; before the kernel (clip, faces, binning): "
             f"{prep:.3f} ms; the whole rasterisation per tile, faces per step, warps:")
    for h, w, step, warps in tiles or KERNEL_SETTINGS:
        fn = lambda: rasterize_depth_binned(screen, faces, (size, size), renderer.near, (h, w), step, warps)  # noqa: E731
        fn()
        ms = 1000 * median_seconds(fn, repeats, device=device)
        print_fn(f"  tile {h:>2}x{w:<2} {step:>2} faces {warps} warps: {ms:.3f} ms per call, {ms / M * 1000:.1f} us per view")
        rows.append({"tile": (h, w), "faces_per_step": step, "warps": warps, "ms": ms})
    return rows
