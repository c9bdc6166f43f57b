"""Triangle meshes: loading every common format behind one call, welding, cleaning, saving, normalisation."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, OptionError
from ..io import atomic_path
from .mesh_formats import read_triangles

#: Extensions :func:`load_mesh` reads.
LOAD_FORMATS = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf")
#: Extensions :func:`save_mesh` writes.
SAVE_FORMATS = (".ply", ".obj", ".glb")


@dataclass
class Mesh:
    """A triangle mesh as tensors on any device."""
    vertices: torch.Tensor  # [V, 3] float (float32 when loaded)
    faces: torch.Tensor     # [F, 3] int64

    def __post_init__(self):
        if not isinstance(self.vertices, torch.Tensor):
            self.vertices = torch.as_tensor(np.asarray(self.vertices), dtype=torch.float32)
        if not isinstance(self.faces, torch.Tensor):
            self.faces = torch.as_tensor(np.asarray(self.faces, dtype=np.int64))
        self.faces = self.faces.long()

    def to(self, device) -> "Mesh":
        return Mesh(self.vertices.to(device), self.faces.to(device))

    @property
    def num_vertices(self) -> int:
        return len(self.vertices)

    @property
    def num_faces(self) -> int:
        return len(self.faces)

    def _cross(self) -> torch.Tensor:
        v0, v1, v2 = self.vertices[self.faces].unbind(1)
        return torch.linalg.cross(v1 - v0, v2 - v0)

    @property
    def face_normals(self) -> torch.Tensor:
        """Unit face normals ``[F, 3]`` (right-hand rule on the vertex order; zero for degenerate faces)."""
        return torch.nn.functional.normalize(self._cross(), dim=1)

    @property
    def face_areas(self) -> torch.Tensor:
        return 0.5 * self._cross().norm(dim=1)

    @property
    def area(self) -> float:
        """Total surface area."""
        return float(self.face_areas.sum())

    def to_trimesh(self):
        import trimesh
        return trimesh.Trimesh(self.vertices.detach().cpu().double().numpy(), self.faces.cpu().numpy(), process=False)

    @classmethod
    def from_trimesh(cls, tm) -> "Mesh":
        return cls(torch.as_tensor(np.asarray(tm.vertices, dtype=np.float32)),
                   torch.as_tensor(np.asarray(tm.faces, dtype=np.int64)))


def as_vertices_faces(mesh) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vertices, faces)`` of a :class:`Mesh` or of a ``(vertices, faces)`` pair."""
    if isinstance(mesh, Mesh):
        return mesh.vertices, mesh.faces
    vertices, faces = mesh
    return torch.as_tensor(vertices), torch.as_tensor(faces).long()


# -- loading ----------------------------------------------------------------------------------------------------------

def load_mesh(path: str | os.PathLike) -> Mesh:
    """Read OBJ, PLY, STL, OFF or GLB/GLTF into one welded, clean triangle mesh (float32 vertices, CPU).

    Polygons are fan-triangulated; scenes are flattened with their node transforms applied; vertices at the same
    position are merged (UV and normal seams disappear); faces with a repeated vertex or zero area and unreferenced
    vertices are dropped.

    Validated, each failure an :class:`InputError` naming the file and the problem: the file exists, is not empty
    and has a supported extension; header counts match the data exactly (OFF and PLY, ASCII and binary: no missing
    rows, nothing left over; binary STL: size = 84 + 50 x triangles; GLB: its length and chunk sizes; glTF:
    buffers, buffer views and accessors within the bytes they point into), so truncated files are caught and no
    count is trusted before it is checked against the file size; ASCII STL is complete (every ``solid`` closed)
    and OBJ lines are well formed; every face index lies within the vertices (no negative index in PLY/OFF/glTF;
    OBJ's negative indices count back from the vertices defined above the face, and an OBJ index of 0, before the
    first or after the last vertex is an error); numbers are numbers; faces have 3+ vertices; a glTF node tree has
    no cycle; there are faces, with finite coordinates that fit float32. OBJ text loads in any encoding (only its
    keywords and numbers are read, so comments, names and a missing .mtl do not matter).
    """
    p = Path(path)
    ext = p.suffix.lower()
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if not p.is_file():
        raise InputError(f"{p}: not a file")
    if ext not in LOAD_FORMATS:
        raise InputError(f"{p}: unsupported mesh format {ext or '(no extension)'!r}; use one of "
                         f"{', '.join(e[1:].upper() for e in LOAD_FORMATS)}")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: file is empty")
    vertices, faces = read_triangles(p, ext)
    if len(faces) == 0:
        raise InputError(f"{p}: no triangle faces (a point cloud or empty geometry)")
    used = vertices[np.unique(faces)]
    if not np.isfinite(used).all():
        raise InputError(f"{p}: vertex coordinates contain NaN or infinity")
    with np.errstate(over="ignore"):  # checked before cleaning, whose arithmetic would overflow (with warnings)
        overflow = not np.isfinite(used.astype(np.float32)).all()
    if overflow:
        raise InputError(f"{p}: vertex coordinates overflow float32")
    vertices, faces = clean_triangles(vertices, faces)
    if len(faces) == 0:
        raise InputError(f"{p}: every face is degenerate (zero area)")
    return Mesh(torch.from_numpy(vertices.astype(np.float32)), torch.from_numpy(faces))


def clean_triangles(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weld vertices with identical float32 positions, drop degenerate faces and unreferenced vertices."""
    with np.errstate(over="ignore"):  # an unused vertex past float32's range: inf, then dropped
        v32 = np.ascontiguousarray(vertices, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0 before comparing
    _, first, inverse = np.unique(v32.view(np.dtype((np.void, 12))).ravel(), return_index=True, return_inverse=True)
    faces = inverse.reshape(-1)[faces]
    vertices = np.asarray(vertices, dtype=np.float64)[first]
    repeated = (faces[:, 0] == faces[:, 1]) | (faces[:, 1] == faces[:, 2]) | (faces[:, 2] == faces[:, 0])
    tri = vertices[faces]
    twice_area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    faces = faces[~repeated & (twice_area > 0)]
    used, faces = np.unique(faces, return_inverse=True)
    return vertices[used], faces.reshape(-1, 3).astype(np.int64)


# -- saving -----------------------------------------------------------------------------------------------------------

def save_mesh(path: str | os.PathLike, mesh) -> Path:
    """Write a :class:`Mesh` or ``(vertices, faces)`` as PLY (binary), OBJ or GLB (binary glTF 2.0), chosen by
    extension, atomically."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in SAVE_FORMATS:
        raise OptionError(f"{p}: cannot write {ext or '(no extension)'!r}; use .ply, .obj or .glb")
    vertices, faces = as_vertices_faces(mesh)
    v = vertices.detach().cpu().numpy().astype(np.float32)
    f = faces.cpu().numpy().astype(np.int64)
    with atomic_path(p) as tmp, open(tmp, "wb") as out:
        {".ply": _write_ply, ".obj": _write_obj, ".glb": _write_glb}[ext](out, v, f)
    return p


def _write_ply(out, v: np.ndarray, f: np.ndarray) -> None:
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(v)}\nproperty float x\nproperty float y\nproperty float z\n"
              f"element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n")
    out.write(header.encode("ascii"))
    out.write(v.astype("<f4").tobytes())
    rows = np.zeros(len(f), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    rows["n"], rows["i"] = 3, f
    out.write(rows.tobytes())


def _write_glb(out, v: np.ndarray, f: np.ndarray) -> None:
    """One glTF 2.0 mesh (positions and uint32 triangle indices, no material) in a binary container."""
    import json
    positions = np.ascontiguousarray(v, dtype="<f4").tobytes()
    indices = np.ascontiguousarray(f, dtype="<u4").tobytes()
    lo = v.min(0).tolist() if len(v) else [0.0] * 3
    hi = v.max(0).tolist() if len(v) else [0.0] * 3
    doc = {"asset": {"version": "2.0", "generator": "sparseflex"}, "scene": 0, "scenes": [{"nodes": [0]}],
           "nodes": [{"mesh": 0}],
           "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1, "mode": 4}]}],
           "accessors": [{"bufferView": 0, "componentType": 5126, "count": len(v), "type": "VEC3", "min": lo,
                          "max": hi},
                         {"bufferView": 1, "componentType": 5125, "count": 3 * len(f), "type": "SCALAR"}],
           "bufferViews": [{"buffer": 0, "byteOffset": 0, "byteLength": len(positions), "target": 34962},
                           {"buffer": 0, "byteOffset": len(positions), "byteLength": len(indices), "target": 34963}],
           "buffers": [{"byteLength": len(positions) + len(indices)}]}
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 4)  # chunks are 4-byte aligned: JSON pads with spaces, binary with zeros
    binary = positions + indices
    binary += b"\0" * (-len(binary) % 4)
    total = 12 + 8 + len(text) + 8 + len(binary)
    out.write(b"glTF" + (2).to_bytes(4, "little") + total.to_bytes(4, "little"))
    out.write(len(text).to_bytes(4, "little") + b"JSON" + text)
    out.write(len(binary).to_bytes(4, "little") + b"BIN\0" + binary)


def _write_obj(out, v: np.ndarray, f: np.ndarray) -> None:
    # %.9g round-trips float32 exactly
    lines = [f"v {x:.9g} {y:.9g} {z:.9g}\n" for x, y, z in v.tolist()]
    lines += [f"f {a} {b} {c}\n" for a, b, c in (f + 1).tolist()]
    out.write("".join(lines).encode("ascii"))


# -- normalisation ----------------------------------------------------------------------------------------------------

@dataclass
class Normalization:
    """The similarity ``x -> (x - center) * scale`` that maps a mesh's bounding box into [-0.5, 0.5]^3."""
    center: torch.Tensor  # [3]
    scale: float

    @classmethod
    def of(cls, mesh) -> "Normalization":
        """Bounding-box centre to the origin, longest side to 1."""
        vertices, _ = as_vertices_faces(mesh)
        if len(vertices) == 0:
            raise InputError("cannot normalise a mesh without vertices")
        lo, hi = vertices.detach().amin(0), vertices.detach().amax(0)
        extent = float((hi - lo).max())
        if not extent > 0 or not np.isfinite(extent):
            raise InputError(f"cannot normalise a mesh whose bounding box has longest side {extent}")
        return cls(((lo + hi) / 2).cpu(), 1.0 / extent)

    def apply(self, points: torch.Tensor) -> torch.Tensor:
        return (points - self.center.to(points)) * self.scale

    def invert(self, points: torch.Tensor) -> torch.Tensor:
        return points / self.scale + self.center.to(points)


def normalize(mesh: Mesh) -> tuple[Mesh, Normalization]:
    """The mesh moved into [-0.5, 0.5]^3 (bounding-box centre at 0, longest side 1) and the transform used."""
    t = Normalization.of(mesh)
    return Mesh(t.apply(mesh.vertices), mesh.faces), t
