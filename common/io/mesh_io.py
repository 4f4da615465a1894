"""Reading and writing triangle meshes and point clouds: Wavefront OBJ and PLY (ASCII and binary).

What a scanner or another program writes: :func:`read_mesh` returns the vertices and the triangles
(polygons split into fans), whatever the file carries besides (normals, colours, texture
coordinates, other PLY elements are read past and dropped). A file with vertices and no faces is a
point cloud: ``faces`` is then ``[0, 3]``; whether that is acceptable is the caller's decision.

Every problem raises :class:`MeshFileError` (a :class:`common.errors.FileFormatError`) whose
message starts with the file's path (and line, for text). Files are data: nothing in them is
evaluated.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import List, Tuple

import numpy as np

from common.errors import FileFormatError, MissingFileError
from common.io.atomic import atomic_write_bytes, atomic_write_text
from common.io.textio import read_text, shown, text_lines

MAX_MESH_BYTES = 2 ** 30  # 1 GiB: a scan of tens of millions of points
MAX_HEADER_BYTES = 1 << 16
MESH_SUFFIXES = (".obj", ".ply")

# PLY scalar types: name -> numpy type code (without byte order).
PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}


class MeshFileError(FileFormatError):
    """A mesh or point-cloud file that cannot be read; the message starts with its path."""


def read_mesh(path: os.PathLike | str) -> Tuple[np.ndarray, np.ndarray]:
    """``(vertices [N, 3] float64, faces [F, 3] int64)`` of an ``.obj`` or ``.ply`` file (faces
    ``[0, 3]`` for a point cloud); the units are the file's.

    Raises:
        MissingFileError: no such file.
        MeshFileError: an unknown suffix, a malformed file, an index out of range.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: mesh file not found")
    suffix = path.suffix.lower()
    if suffix == ".obj":
        vertices, faces = _read_obj(path)
    elif suffix == ".ply":
        vertices, faces = _read_ply(path)
    else:
        raise MeshFileError(f"{path}: unknown mesh format '{shown(path.suffix)}'; expected "
                            f"{' or '.join(MESH_SUFFIXES)}")
    if faces.size and (faces.min() < 0 or faces.max() >= len(vertices)):
        bad = int(faces.max()) if faces.max() >= len(vertices) else int(faces.min())
        raise MeshFileError(f"{path}: a face refers to vertex {bad + 1}, but the file has {len(vertices)} vertices")
    return vertices, faces


def _fan(polygon: List[int]) -> List[List[int]]:
    return [[polygon[0], polygon[k], polygon[k + 1]] for k in range(1, len(polygon) - 1)]


def _read_obj(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    text = read_text(path, MeshFileError, "mesh file", MAX_MESH_BYTES)
    verts: List[List[float]] = []
    faces: List[List[int]] = []
    for number, line in enumerate(text_lines(text), start=1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "v":
            if len(words) < 4:
                raise MeshFileError(f"{path}:{number}: expected 'v x y z', got '{shown(line.strip())}'")
            try:
                verts.append([float(w) for w in words[1:4]])
            except ValueError:
                raise MeshFileError(f"{path}:{number}: expected numbers in 'v x y z', got "
                                    f"'{shown(line.strip())}'") from None
        elif words[0] == "f":
            if len(words) < 4:
                raise MeshFileError(f"{path}:{number}: a face needs at least 3 corners, got {len(words) - 1}")
            polygon = []
            for corner in words[1:]:
                token = corner.split("/")[0]
                try:
                    index = int(token)
                except ValueError:
                    raise MeshFileError(f"{path}:{number}: expected a vertex index in face corner "
                                        f"'{shown(corner)}'") from None
                # OBJ indices start at 1; negative ones count back from the last vertex read so far.
                if index == 0 or abs(index) > len(verts):
                    raise MeshFileError(f"{path}:{number}: face corner '{shown(corner)}' refers to no vertex "
                                        f"({len(verts)} read so far)")
                polygon.append(index - 1 if index > 0 else len(verts) + index)
            faces.extend(_fan(polygon))
    return np.asarray(verts, np.float64).reshape(-1, 3), np.asarray(faces, np.int64).reshape(-1, 3)


def _ply_header(path: Path, data: bytes):
    end = re.search(rb"end_header\r?\n", data[:MAX_HEADER_BYTES])
    if not data.startswith(b"ply") or end is None:
        raise MeshFileError(f"{path}: not a PLY file (it must start with 'ply' and have an 'end_header' line)")
    try:
        header = data[:end.start()].decode("ascii")
    except UnicodeDecodeError:
        raise MeshFileError(f"{path}: the PLY header is not ASCII text") from None
    fmt, elements = None, []
    for number, line in enumerate(header.splitlines(), start=1):
        words = line.split()
        if not words or words[0] in ("ply", "comment", "obj_info"):
            continue
        if words[0] == "format":
            if len(words) < 2 or words[1] not in ("ascii", "binary_little_endian", "binary_big_endian"):
                raise MeshFileError(f"{path}:{number}: unknown PLY format '{shown(line.strip())}'")
            fmt = words[1]
        elif words[0] == "element":
            if len(words) != 3 or not words[2].isdigit():
                raise MeshFileError(f"{path}:{number}: expected 'element <name> <count>', got '{shown(line.strip())}'")
            elements.append({"name": words[1], "count": int(words[2]), "properties": []})
        elif words[0] == "property":
            if not elements:
                raise MeshFileError(f"{path}:{number}: a property before any element")
            if len(words) == 5 and words[1] == "list" and words[2] in PLY_TYPES and words[3] in PLY_TYPES:
                elements[-1]["properties"].append((words[4], "list", PLY_TYPES[words[2]], PLY_TYPES[words[3]]))
            elif len(words) == 3 and words[1] in PLY_TYPES:
                elements[-1]["properties"].append((words[2], PLY_TYPES[words[1]], None, None))
            else:
                raise MeshFileError(f"{path}:{number}: unknown property '{shown(line.strip())}'")
        else:
            raise MeshFileError(f"{path}:{number}: unexpected header line '{shown(line.strip())}'")
    if fmt is None:
        raise MeshFileError(f"{path}: the PLY header has no 'format' line")
    return fmt, elements, end.end()


def _read_ply(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    size = path.stat().st_size
    if size > MAX_MESH_BYTES:
        raise MeshFileError(f"{path}: larger than {MAX_MESH_BYTES} bytes, too large for a scan")
    data = path.read_bytes()
    fmt, elements, offset = _ply_header(path, data)
    vertex = next((e for e in elements if e["name"] == "vertex"), None)
    if vertex is None:
        raise MeshFileError(f"{path}: the PLY file has no 'vertex' element")
    names = [p[0] for p in vertex["properties"]]
    for axis in "xyz":
        if axis not in names:
            raise MeshFileError(f"{path}: the 'vertex' element has no '{axis}' property")
    if fmt == "ascii":
        tables = _ply_ascii(path, data[offset:], elements)
    else:
        tables = _ply_binary(path, data, offset, elements, "<" if fmt == "binary_little_endian" else ">")
    columns = tables["vertex"]
    vertices = np.stack([np.asarray(columns[a], np.float64) for a in "xyz"], axis=1).reshape(-1, 3)
    faces = np.zeros((0, 3), np.int64)
    if "face" in tables:
        lists = [v for k, v in tables["face"].items() if k in ("vertex_indices", "vertex_index")]
        if not lists:
            raise MeshFileError(f"{path}: the 'face' element has no 'vertex_indices' list")
        triangles = [t for polygon in lists[0] for t in _fan([int(i) for i in polygon])] \
            if not isinstance(lists[0], np.ndarray) else lists[0]
        faces = np.asarray(triangles, np.int64).reshape(-1, 3)
    return vertices, faces


def _body_ends_early(path: Path, element: dict) -> MeshFileError:
    return MeshFileError(f"{path}: the PLY body ends early (element '{element['name']}')")


def _ply_ascii(path: Path, body: bytes, elements) -> dict:
    try:
        words = body.decode("ascii").split()
    except UnicodeDecodeError:
        raise MeshFileError(f"{path}: the ASCII PLY body is not ASCII text") from None
    at = 0
    tables = {}

    def take(kind: str):
        nonlocal at
        if at >= len(words):
            raise _body_ends_early(path, element)
        token = words[at]
        at += 1
        try:
            return float(token) if kind.startswith("f") else int(token)
        except ValueError:
            raise MeshFileError(f"{path}: expected a number in element '{element['name']}', "
                                f"got '{shown(token)}'") from None

    for element in elements:
        props = element["properties"]
        simple = all(p[1] != "list" for p in props)
        if simple and element["count"]:
            n = len(props) * element["count"]
            if at + n > len(words):
                raise _body_ends_early(path, element)
            try:
                block = np.asarray(words[at:at + n], dtype=np.float64).reshape(element["count"], len(props))
            except ValueError:
                raise MeshFileError(f"{path}: a value of element '{element['name']}' is not a number") from None
            at += n
            tables[element["name"]] = {p[0]: block[:, k] for k, p in enumerate(props)}
            continue
        columns = {p[0]: [] for p in props}
        for _ in range(element["count"]):
            for name, kind, count_type, item_type in props:
                if kind == "list":
                    count = take(count_type)
                    if count < 0:
                        raise MeshFileError(f"{path}: a negative list length in element '{element['name']}'")
                    columns[name].append([take(item_type) for _ in range(count)])
                else:
                    columns[name].append(take(kind))
        tables[element["name"]] = columns
    return tables


def _ply_binary(path: Path, data: bytes, offset: int, elements, order: str) -> dict:
    tables = {}
    for element in elements:
        props, count = element["properties"], element["count"]
        if all(p[1] != "list" for p in props):
            dtype = np.dtype([(f"p{k}", order + p[1]) for k, p in enumerate(props)])
            end = offset + dtype.itemsize * count
            if end > len(data):
                raise _body_ends_early(path, element)
            block = np.frombuffer(data, dtype, count, offset)
            tables[element["name"]] = {p[0]: block[f"p{k}"] for k, p in enumerate(props)}
            offset = end
            continue
        # Elements with lists: triangles of one layout read at once, anything else item by item.
        if len(props) == 1 and count:
            _, _, count_type, item_type = props[0]
            dtype = np.dtype([("n", order + count_type), ("i", order + item_type, (3,))])
            end = offset + dtype.itemsize * count
            if end <= len(data):
                block = np.frombuffer(data, dtype, count, offset)
                if (block["n"] == 3).all():
                    tables[element["name"]] = {props[0][0]: block["i"].astype(np.int64)}
                    offset = end
                    continue
        columns = {p[0]: [] for p in props}
        for _ in range(count):
            for name, kind, count_type, item_type in props:
                if kind == "list":
                    n, offset = _binary_value(path, data, offset, order + count_type, element)
                    items = np.dtype(order + item_type)
                    if n < 0 or offset + items.itemsize * int(n) > len(data):
                        raise _body_ends_early(path, element)
                    columns[name].append(np.frombuffer(data, items, int(n), offset).tolist())
                    offset += items.itemsize * int(n)
                else:
                    value, offset = _binary_value(path, data, offset, order + kind, element)
                    columns[name].append(value)
        tables[element["name"]] = columns
    return tables


def _binary_value(path: Path, data: bytes, offset: int, code: str, element):
    dtype = np.dtype(code)
    if offset + dtype.itemsize > len(data):
        raise _body_ends_early(path, element)
    return np.frombuffer(data, dtype, 1, offset)[0].item(), offset + dtype.itemsize


# --------------------------------------------------------------------------------- writing
def _number(x: float) -> str:
    return repr(float(x)) if math.isfinite(x) else str(x)


def write_obj(path: os.PathLike | str, vertices: np.ndarray, faces: np.ndarray = None) -> None:
    """An OBJ of ``vertices [N, 3]`` and ``faces [F, 3]`` (0-based; none for a point cloud), atomically."""
    lines = [f"v {_number(x)} {_number(y)} {_number(z)}" for x, y, z in np.asarray(vertices, np.float64)]
    if faces is not None:
        lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in np.asarray(faces, np.int64)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_ply(path: os.PathLike | str, vertices: np.ndarray, faces: np.ndarray = None, binary: bool = True) -> None:
    """A PLY of ``vertices [N, 3]`` (float32) and ``faces [F, 3]`` (none for a point cloud), binary
    little-endian or ASCII, atomically."""
    vertices = np.asarray(vertices, np.float32).reshape(-1, 3)
    faces = None if faces is None else np.asarray(faces, np.int32).reshape(-1, 3)
    header = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0",
              f"element vertex {len(vertices)}", "property float x", "property float y", "property float z"]
    if faces is not None:
        header += [f"element face {len(faces)}", "property list uchar int vertex_indices"]
    header.append("end_header")
    head = ("\n".join(header) + "\n").encode("ascii")
    if binary:
        body = vertices.astype("<f4").tobytes()
        if faces is not None:
            rows = np.zeros(len(faces), np.dtype([("n", "u1"), ("i", "<i4", (3,))]))
            rows["n"], rows["i"] = 3, faces
            body += rows.tobytes()
    else:
        text = [" ".join(repr(float(v)) for v in row) for row in vertices]
        if faces is not None:
            text += [f"3 {a} {b} {c}" for a, b, c in faces]
        body = ("\n".join(text) + "\n").encode("ascii")
    atomic_write_bytes(path, head + body)
