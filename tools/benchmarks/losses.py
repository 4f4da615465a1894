"""Time of the penetration and Laplacian losses beside the original's way of computing them
(``tools/reference.py``: Python loops over bone points, bone pairs and samples; a dense ``[V, V]``
Laplacian with one product per sample), and the Laplacian's memory, dense against sparse.
Run through ``python tools/bench.py losses``.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from tools.benchmarks.timing import median_seconds
from common.nets.loss import LaplacianLoss, PenetLoss


def posed_batch(hand_model, batch: int, seed: int = 0) -> Tuple[torch.Tensor, ...]:
    """The penetration loss's float32 inputs from a freshly initialised training model: curled
    random poses (so that bones and fingertips collide), random roots.

    Returns ``template_pose [J, 4, 4]``, ``rest_mesh [B, V, 3]``, ``joint_out [B, J, 3]``,
    ``mesh_out [B, V, 3]`` (mm)."""
    from main.config import Config
    from main.model import get_model

    from tools.reference import random_euler, random_root

    config = Config()
    config.resnet_type = 18  # the encoder plays no part here
    torch.manual_seed(seed)
    model = get_model("train", hand_model, config).eval()
    with torch.no_grad():
        out = model.pose(random_euler(hand_model, batch, seed, curl=True), random_root(batch, seed))
        template = model.refined_template_pose()
    return template, out.rest_mesh, out.joints, out.mesh


def _forward_backward(fn, *leaves: torch.Tensor):
    def run():
        inputs = [t.detach().requires_grad_(True) for t in leaves]
        fn(*inputs).sum().backward()
    return run


def time_penetration(hand_model, batch: int, repeats: int) -> Dict[str, float]:
    """ms of our :class:`PenetLoss` and of the loop reference, forward and forward + backward
    (gradients with respect to the posed joints and mesh, as in training)."""
    from tools.reference import penet_loss_loop

    template, rest, joints, mesh = posed_batch(hand_model, batch)
    ours = PenetLoss.from_hand_model(hand_model)

    def loop(j, m):
        return penet_loss_loop(hand_model, template, rest, j, m)

    def fast(j, m):
        return ours(template, rest, j, m)

    loop_repeats = max(3, repeats // 4)
    with torch.no_grad():
        result = {"ours_ms": median_seconds(lambda: fast(joints, mesh), repeats) * 1e3,
                  "loop_ms": median_seconds(lambda: loop(joints, mesh), loop_repeats, warmup=1) * 1e3}
    result["ours_fb_ms"] = median_seconds(_forward_backward(fast, joints, mesh), repeats) * 1e3
    result["loop_fb_ms"] = median_seconds(_forward_backward(loop, joints, mesh), loop_repeats, warmup=1) * 1e3
    return result


def time_laplacian(faces, vertices: torch.Tensor, batch: int, repeats: int) -> Dict[str, float]:
    """ms of our sparse :class:`LaplacianLoss` and of the original's dense one, forward and
    forward + backward, and the bytes each matrix takes (float32).

    Args:
        faces: ``[F, 3]``; vertices: ``[V, 3]`` rest mesh (mm), repeated over the batch with noise.
    """
    from tools.reference import dense_laplacian_original, laplacian_loss_dense

    V = int(vertices.shape[0])
    ours = LaplacianLoss(faces, V)
    L = ours.laplacian
    sparse_bytes = (L._indices().numel() * L._indices().element_size()
                    + L._values().numel() * L._values().element_size())
    dense = dense_laplacian_original(faces, V)
    g = torch.Generator().manual_seed(0)
    verts = (vertices.float()[None] + torch.randn(batch, V, 3, generator=g)).contiguous()
    dense_repeats = max(3, repeats // 4)
    with torch.no_grad():
        result = {"ours_ms": median_seconds(lambda: ours(verts), repeats) * 1e3,
                  "dense_ms": median_seconds(lambda: laplacian_loss_dense(dense, verts), dense_repeats) * 1e3}
    result["ours_fb_ms"] = median_seconds(_forward_backward(ours, verts), repeats) * 1e3
    result["dense_fb_ms"] = median_seconds(
        _forward_backward(lambda v: laplacian_loss_dense(dense, v), verts), dense_repeats) * 1e3
    result.update(vertices=V, nnz=int(L._nnz()), sparse_bytes=int(sparse_bytes),
                  dense_bytes=int(dense.numel() * dense.element_size()))
    return result


def run(hands: Sequence[Tuple[str, object]], batches: Sequence[int], repeats: int,
        grid: Tuple[int, int] = (120, 100)) -> List[Dict]:
    """Print both tables; returns their rows."""
    from tools.reference import grid_mesh

    rows = []
    print(f"penetration loss (rigid + 5 x non-rigid), float32; loop = the original's loops "
          f"(tools/reference.py penet_loss_loop); median of {repeats} runs (loop: {max(3, repeats // 4)})")
    print(f"{'hand':<10} {'V':>6} {'batch':>5} | {'ours ms':>8} {'loop ms':>8} {'speed-up':>8} | "
          f"{'fwd+bwd ours':>12} {'loop':>8} {'speed-up':>8}")
    for name, hand in hands:
        for batch in batches:
            r = time_penetration(hand, batch, repeats)
            print(f"{name:<10} {hand.vertex_num:>6} {batch:>5} | {r['ours_ms']:>8.2f} {r['loop_ms']:>8.1f} "
                  f"{r['loop_ms'] / r['ours_ms']:>7.1f}x | {r['ours_fb_ms']:>12.2f} {r['loop_fb_ms']:>8.1f} "
                  f"{r['loop_fb_ms'] / r['ours_fb_ms']:>7.1f}x")
            rows.append({"loss": "penetration", "hand": name, "batch": batch, **r})

    print(f"\nLaplacian loss, float32; dense = the original's [V, V] matrix, one product per sample; "
          f"median of {repeats} runs (dense: {max(3, repeats // 4)})")
    print(f"{'mesh':<16} {'V':>6} {'batch':>5} | {'sparse MB':>9} {'dense MB':>9} {'ratio':>7} | "
          f"{'ours ms':>8} {'dense ms':>8} | {'fwd+bwd ours':>12} {'dense':>8}")
    grid_verts, grid_faces = grid_mesh(*grid)
    meshes = [(name, hand.faces, torch.as_tensor(hand.vertices)) for name, hand in hands]
    meshes.append((f"grid {grid[0]}x{grid[1]}", grid_faces.numpy(), grid_verts))
    for name, faces, verts in meshes:
        for batch in batches:
            r = time_laplacian(faces, verts, batch, repeats)
            print(f"{name:<16} {r['vertices']:>6} {batch:>5} | {r['sparse_bytes'] / 2**20:>9.3f} "
                  f"{r['dense_bytes'] / 2**20:>9.1f} {100 * r['sparse_bytes'] / r['dense_bytes']:>6.2f}% | "
                  f"{r['ours_ms']:>8.2f} {r['dense_ms']:>8.1f} | {r['ours_fb_ms']:>12.2f} {r['dense_fb_ms']:>8.1f}")
            rows.append({"loss": "laplacian", "mesh": name, "batch": batch, **r})
    return rows
