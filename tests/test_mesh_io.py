"""Scan files (common/io/mesh_io.py): OBJ and PLY as other programs write them, read back to the
same numbers; malformed files named with their path (and line), never evaluated."""
import struct

import numpy as np
import pytest

from common.errors import MissingFileError
from common.io.mesh_io import MeshFileError, read_mesh, write_obj, write_ply

SQUARE = np.array([[0, 0, 0], [10, 0, 0], [10, 10, 0], [0, 10, 0.5]], np.float64)


def test_obj_as_other_programs_write_it(tmp_path):
    # Texture and normal indices, a quad (split into a fan), a negative (relative) index, comments,
    # groups and materials read past.
    path = tmp_path / "scan.obj"
    path.write_text("# exported\nmtllib a.mtl\no hand\nv 0 0 0\nv 10 0 0\nv 10 10 0\nv 0 10 0.5\n"
                    "vt 0 0\nvn 0 0 1\ng part\nusemtl skin\nf 1/1/1 2/1/1 3/1/1 4/1/1\nf -4 -2 -1\n")
    vertices, faces = read_mesh(path)
    np.testing.assert_array_equal(vertices, SQUARE)
    np.testing.assert_array_equal(faces, [[0, 1, 2], [0, 2, 3], [0, 2, 3]])


@pytest.mark.parametrize("order", ["<", ">"])
def test_binary_ply_written_independently(tmp_path, order):
    # A binary PLY as a scanner writes it (doubles, an extra colour per vertex, a quad, a normal
    # element after the faces), packed here with struct, not by the project's writer.
    fmt = "binary_little_endian" if order == "<" else "binary_big_endian"
    head = (f"ply\nformat {fmt} 1.0\ncomment scanner\nelement vertex 4\nproperty double x\nproperty double y\n"
            f"property double z\nproperty uchar red\nelement face 1\nproperty list uchar int vertex_indices\n"
            f"element extra 1\nproperty float value\nend_header\n").encode()
    body = b"".join(struct.pack(order + "dddB", *v, 200) for v in SQUARE)
    body += struct.pack(order + "Biiii", 4, 0, 1, 2, 3) + struct.pack(order + "f", 1.5)
    path = tmp_path / "scan.ply"
    path.write_bytes(head + body)
    vertices, faces = read_mesh(path)
    np.testing.assert_array_equal(vertices, SQUARE)
    np.testing.assert_array_equal(faces, [[0, 1, 2], [0, 2, 3]])


def test_ascii_ply_and_point_cloud(tmp_path):
    path = tmp_path / "cloud.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
                    "property float z\nproperty float confidence\nend_header\n1 2 3 0.5\n4 5 6 1\n7 8 9 1\n")
    vertices, faces = read_mesh(path)
    np.testing.assert_array_equal(vertices, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert faces.shape == (0, 3)


@pytest.mark.parametrize("suffix,binary", [(".obj", None), (".ply", True), (".ply", False)])
def test_writers_round_trip(tmp_path, default_hand, suffix, binary):
    vertices = np.asarray(default_hand.vertices, np.float64)
    faces = np.asarray(default_hand.faces, np.int64)
    path = tmp_path / f"hand{suffix}"
    if suffix == ".obj":
        write_obj(path, vertices, faces)
    else:
        write_ply(path, vertices, faces, binary=binary)
    got_v, got_f = read_mesh(path)
    np.testing.assert_allclose(got_v, vertices, atol=1e-4 if suffix == ".ply" else 0)  # PLY stores float32
    np.testing.assert_array_equal(got_f, faces)


@pytest.mark.parametrize("name,content,expected", [
    ("bad.obj", "v 0 0 0\nv 1 x 0\n", ":2: expected numbers"),
    ("bad.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 7\n", ":4: face corner '7' refers to no vertex"),
    ("bad.obj", "v 0 0 0\nf 1 2\n", ":2: a face needs at least 3 corners"),
    ("bad.ply", "ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\n"
                "end_header\n1 2 3\n4 5\n", "ends early"),
    ("bad.ply", "ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\nend_header\n1 2\n",
     "no 'z' property"),
    ("bad.ply", "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
                "element face 1\nproperty list uchar int vertex_indices\nend_header\n0 0 0\n1 0 0\n0 1 0\n3 0 1 5\n",
     "refers to vertex 6"),
    ("bad.ply", "hello\n", "not a PLY file"),
    ("bad.stl", "solid\n", "unknown mesh format"),
])
def test_malformed_files_are_named(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MeshFileError) as err:
        read_mesh(path)
    assert str(err.value).startswith(str(path)) and expected in str(err.value)


def test_truncated_binary_ply(tmp_path):
    path = tmp_path / "cut.ply"
    write_ply(path, SQUARE, [[0, 1, 2], [0, 2, 3]])
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(MeshFileError, match="ends early"):
        read_mesh(path)


def test_missing_file(tmp_path):
    with pytest.raises(MissingFileError, match="not found"):
        read_mesh(tmp_path / "none.obj")
