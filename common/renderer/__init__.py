"""Differentiable depth rendering of posed hand meshes.

:class:`DepthRenderer` (in :mod:`.depth_renderer`) renders depth maps of a batch of meshes from
several calibrated cameras each. Its parts: :mod:`.camera` (the pixel and screen conventions),
:mod:`.backend` (which rasteriser runs), :mod:`.rasterizer` (the project's own rasteriser in
tensor operations, CPU and CUDA), :mod:`.triton_rasterizer` (the same rules as one binned GPU
kernel) and :mod:`.tiling` (CPU tiling around PyTorch3D's rasteriser).
"""
from common.renderer.camera import project_points
from common.renderer.depth_renderer import DepthRenderer, plane_depth

__all__ = ["DepthRenderer", "plane_depth", "project_points"]
