"""Personalisation's parts, each against an independent reference: the nearest triangle of the
surface metric, the differentiable point-to-surface distance (finite differences of the exact
metric), the training's smooth L1 on distances, the frames' poses."""
import numpy as np
import pytest
import torch

from common import metrics
from common.hand.default_hand import make_default_hand
from common.personalise.objectives import smooth_l1_of_distance
from common.personalise.poses import FramePoses
from common.personalise.surface import ScanSurface, mesh_to_scan, nearest_points, scan_to_mesh
from tools.reference import surface_distance_every_triangle


@pytest.fixture(scope="module")
def hand():
    return make_default_hand()


def _points_near(vertices, count, shift_mm, seed):
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(vertices.shape[0], generator=gen)[:count]
    return vertices[picked] + shift_mm * torch.randn(count, 3, generator=gen, dtype=vertices.dtype)


@pytest.mark.parametrize("shift_mm", [0.5, 4.0])
def test_nearest_face_holds_the_minimum_over_every_triangle(hand, shift_mm):
    vertices = torch.tensor(hand.vertices, dtype=torch.float64)
    faces = torch.tensor(hand.faces, dtype=torch.long)
    points = _points_near(vertices, 200, shift_mm, 3)
    distance, nearest = metrics.nearest_surface_faces(points, vertices, faces)
    every = surface_distance_every_triangle(points, vertices, faces)
    torch.testing.assert_close(distance, every, rtol=0, atol=1e-12)
    tri = vertices[faces[nearest]]
    to_found = metrics.point_triangle_sq(points, tri[:, 0], tri[:, 1], tri[:, 2]).sqrt()
    torch.testing.assert_close(to_found, every, rtol=0, atol=1e-12)


def test_scan_distances_and_their_gradient_equal_the_exact_metric(hand):
    """scan_to_mesh and mesh_to_scan are the exact metric's squared distances, and their gradient
    with respect to the mesh's vertices is that of the exact metric (central differences)."""
    vertices = torch.tensor(hand.vertices, dtype=torch.float64)
    faces = torch.tensor(hand.faces, dtype=torch.long)
    scan = ScanSurface(_points_near(vertices, 300, 2.0, 5), None)
    scan_mesh = ScanSurface(vertices + torch.tensor([0.7, -0.4, 0.3], dtype=torch.float64), faces)

    def exact(v, index):
        # Moving vertex ``index`` changes the scan's distances to the mesh and that vertex's own.
        return (metrics.point_surface_distance(scan.points, v, faces).square().sum()
                + metrics.point_surface_distance(v[index:index + 1], scan_mesh.points, faces).square().sum())

    moving = vertices.clone().requires_grad_(True)
    (d2_scan, _), (d2_mesh, _) = scan_to_mesh(scan, moving, faces), mesh_to_scan(moving, scan_mesh)
    torch.testing.assert_close(d2_scan.detach().sqrt(), metrics.point_surface_distance(scan.points, vertices, faces))
    torch.testing.assert_close(d2_mesh.detach().sqrt(), metrics.point_surface_distance(vertices, scan_mesh.points,
                                                                                        faces))
    (d2_scan.sum() + d2_mesh.sum()).backward()
    grad = moving.grad
    touched = torch.nonzero(grad.abs().sum(1) > 1e-3)[:, 0]
    assert len(touched) > 100
    eps = 1e-5
    for index in touched[torch.randperm(len(touched), generator=torch.Generator().manual_seed(0))[:12]]:
        for axis in range(3):
            step = torch.zeros_like(vertices)
            step[index, axis] = eps
            numeric = (exact(vertices + step, index) - exact(vertices - step, index)) / (2 * eps)
            assert abs(float(numeric) - float(grad[index, axis])) < 1e-4 * max(1.0, abs(float(numeric)))


def test_point_cloud_distance_is_to_the_nearest_point(hand):
    vertices = torch.tensor(hand.vertices, dtype=torch.float64)
    cloud = _points_near(vertices, 500, 1.0, 8)
    got, _ = mesh_to_scan(vertices, ScanSurface(cloud, None))
    expected = torch.cdist(vertices, cloud).amin(1).square()
    torch.testing.assert_close(got, expected)
    np.testing.assert_array_equal(nearest_points(vertices, cloud, max_pairs=1000).numpy(),
                                  torch.cdist(vertices, cloud).argmin(1).numpy())


def test_smooth_l1_of_distance_is_the_trainings_smooth_l1():
    d = torch.tensor([0.0, 0.3, 0.999, 1.0, 2.5, 40.0], dtype=torch.float64, requires_grad=True)
    got = smooth_l1_of_distance(d.square())
    torch.testing.assert_close(got, torch.nn.functional.smooth_l1_loss(d, torch.zeros_like(d), reduction="none",
                                                                       beta=1.0))
    got.sum().backward()
    assert torch.isfinite(d.grad).all()


def test_frame_poses_start_at_the_given_poses_and_move_only_the_degrees_of_freedom(hand):
    T, J = 2, hand.joint_num
    dof = np.asarray(hand.dof_mask)
    euler = torch.tensor(np.random.default_rng(0).normal(0, 0.3, (T, J, 3)) * dof, dtype=torch.float64)
    root = torch.eye(4, dtype=torch.float64).repeat(T, 1, 1)
    root[:, :3, 3] = torch.tensor([[10.0, 20.0, 500.0], [-5.0, 0.0, 450.0]])
    poses = FramePoses(euler, root, dof)
    torch.testing.assert_close(poses.euler(), euler)
    torch.testing.assert_close(poses.root(), root)
    (poses.euler().sum() + poses.root().sum()).backward()
    assert poses.angles.grad.shape == (T, int(dof.sum()))
    with torch.no_grad():
        poses.rotation[0] = torch.tensor([0.0, 0.0, np.pi / 2], dtype=torch.float64)
        poses.shift[1] = torch.tensor([1.0, 2.0, 3.0])
    quarter = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(poses.root()[0, :3, :3], quarter, atol=1e-12, rtol=0)
    torch.testing.assert_close(poses.root()[1, :3, 3], torch.tensor([-4.0, 2.0, 453.0], dtype=torch.float64))
    assert (poses.euler()[:, ~torch.as_tensor(dof, dtype=torch.bool)] == 0).all()
