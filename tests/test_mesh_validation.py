"""Corrupt meshes are refused with one-line InputErrors, never loaded as wrong geometry: truncated files, counts that
disagree with the data, indices outside the vertices, absurd header counts; plus encodings, OBJ relative indices,
compatibility with what trimesh read before, and a fuzz test over every format."""

import json
import signal
import struct
import time
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import trimesh

from sparseflex.cli import main
from sparseflex.data.mesh import Mesh, clean_triangles, load_mesh
from sparseflex.errors import InputError
from sparseflex.eval.topology import signed_volume

# A square pyramid (volume 1/3, outward faces) with one quad, so polygon handling is exercised too.
PYRAMID_V = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.5, 0.5, 1]], dtype=np.float64)
PYRAMID_F = [[0, 3, 2, 1], [0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]]


def rows(v) -> list:
    """Coordinates as Python floats (their repr is the shortest exact decimal)."""
    return np.asarray(v, dtype=np.float64).reshape(-1, 3).tolist()


def fan(faces):
    return [[f[0], f[i], f[i + 1]] for f in faces for i in range(1, len(f) - 1)]


# -- writers, written here from the format specifications (independent of the readers under test) ---------------------

def obj_bytes(v=PYRAMID_V, f=PYRAMID_F, head=b"") -> bytes:
    return head + "".join(f"v {x!r} {y!r} {z!r}\n" for x, y, z in rows(v)).encode() + "".join(
        "f " + " ".join(str(i + 1) for i in face) + "\n" for face in f).encode()


def off_bytes(v=PYRAMID_V, f=PYRAMID_F, counts=None) -> bytes:
    nv, nf = counts or (len(v), len(f))
    return (f"OFF\n{nv} {nf} 0\n" + "".join(f"{x!r} {y!r} {z!r}\n" for x, y, z in rows(v)) +
            "".join(f"{len(face)} " + " ".join(map(str, face)) + "\n" for face in f)).encode()


def ply_bytes(v=PYRAMID_V, f=PYRAMID_F, fmt="ascii", counts=None, index="int") -> bytes:
    nv, nf = counts or (len(v), len(f))
    head = (f"ply\nformat {fmt} 1.0\ncomment written by the test\nelement vertex {nv}\nproperty float x\n"
            f"property float y\nproperty float z\nproperty uchar red\nelement face {nf}\n"
            f"property list uchar {index} vertex_indices\nend_header\n").encode()
    if fmt == "ascii":
        return head + "".join(f"{x!r} {y!r} {z!r} 7\n" for x, y, z in rows(v)).encode() + "".join(
            f"{len(face)} " + " ".join(map(str, face)) + "\n" for face in f).encode()
    e = "<" if fmt == "binary_little_endian" else ">"
    code = {"int": "i", "uint": "I", "short": "h"}[index]
    return head + b"".join(struct.pack(f"{e}fffB", *p, 7) for p in rows(v)) + b"".join(
        struct.pack(f"{e}B{len(face)}{code}", len(face), *face) for face in f)


def stl_ascii_bytes(v=PYRAMID_V, f=PYRAMID_F) -> bytes:
    out = ["solid pyramid"]
    for tri in fan(f):
        out += ["  facet normal 0 0 0", "    outer loop"] + [f"      vertex {x!r} {y!r} {z!r}" for x, y, z in
                                                              rows(v[tri])] + ["    endloop", "  endfacet"]
    return ("\n".join(out + ["endsolid pyramid"]) + "\n").encode()


def stl_binary_bytes(v=PYRAMID_V, f=PYRAMID_F, count=None) -> bytes:
    tris = fan(f)
    rows = b"".join(struct.pack("<12fH", 0, 0, 0, *np.asarray(v)[t].reshape(-1), 0) for t in tris)
    return b"binary stl".ljust(80, b" ") + struct.pack("<I", len(tris) if count is None else count) + rows


def glb_bytes(v=PYRAMID_V, f=PYRAMID_F, *, count=None, view=True, children=None, length=None) -> bytes:
    """One mesh under one node: float32 VEC3 positions and uint32 indices (glTF 2.0 binary container)."""
    pos = np.asarray(v, "<f4").tobytes()
    idx = np.asarray(fan(f), "<u4").tobytes()
    blob = pos + idx
    accessor = {"componentType": 5126, "count": len(v) if count is None else count, "type": "VEC3"}
    if view:
        accessor["bufferView"] = 0
    doc = {"asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": [0]}],
           "nodes": [{"mesh": 0, "children": children or []}] + [{"children": [0]}] * bool(children),
           "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1}]}],
           "buffers": [{"byteLength": len(blob)}],
           "bufferViews": [{"buffer": 0, "byteLength": len(pos)},
                           {"buffer": 0, "byteOffset": len(pos), "byteLength": len(idx)}],
           "accessors": [accessor, {"bufferView": 1, "componentType": 5125, "count": len(idx) // 4,
                                    "type": "SCALAR"}]}
    js = json.dumps(doc).encode()
    js += b" " * (-len(js) % 4)
    body = struct.pack("<II", len(js), 0x4E4F534A) + js + struct.pack("<II", len(blob), 0x004E4942) + blob
    return struct.pack("<4sII", b"glTF", 2, 12 + len(body) if length is None else length) + body


def obj_rich_bytes() -> bytes:
    """The pyramid with the rest of OBJ: materials, texture and normal indices, relative indices, comments."""
    refs = ["{}", "{}/1", "{}//1", "{}/1/1"]
    faces = "".join(f"usemtl m{k % 2}\nf " + " ".join(refs[(k + j) % 4].format(i + 1 if j % 2 else i - 5)
                                                      for j, i in enumerate(face)) + "\n"
                    for k, face in enumerate(PYRAMID_F))
    return b"# pyramid\nmtllib m.mtl\no pyramid\n" + obj_bytes(f=[]) + b"vt 0 0\nvn 0 0 1\ns off\n" + faces.encode()


VALID = {"obj": ("m.obj", obj_rich_bytes), "off": ("m.off", off_bytes), "ply_ascii": ("m.ply", ply_bytes),
         "ply_le": ("m.ply", lambda: ply_bytes(fmt="binary_little_endian")),
         "ply_be": ("m.ply", lambda: ply_bytes(fmt="binary_big_endian")),
         "stl_ascii": ("m.stl", stl_ascii_bytes), "stl_binary": ("m.stl", stl_binary_bytes),
         "glb": ("m.glb", glb_bytes)}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_pyramid(mesh: Mesh):
    got = np.asarray(mesh.vertices, dtype=np.float64)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, PYRAMID_V.tolist()))
    assert mesh.num_faces == 6
    assert signed_volume(mesh.vertices, mesh.faces) == pytest.approx(1 / 3, rel=1e-6)


def refused(path, *patterns):
    """The load raises InputError naming the file and matching every pattern."""
    with pytest.raises(InputError) as info:
        load_mesh(path)
    message = str(info.value)
    assert path.name in message and "\n" not in message
    for pattern in patterns:
        assert pattern in message, message
    return message


@pytest.mark.parametrize("fmt", VALID)
def test_the_valid_files_load(tmp_path, fmt):
    name, make = VALID[fmt]
    assert_pyramid(load_mesh(write(tmp_path, name, make())))


# -- truncated files --------------------------------------------------------------------------------------------------

def _cut(data: bytes, marker: bytes, keep: int = 0) -> bytes:
    """``data`` up to the last ``marker`` (plus ``keep`` bytes of it)."""
    return data[:data.rindex(marker) + keep]


TRUNCATED = {
    "off_header": ("t.off", off_bytes(counts=(5, 9000)), "header declares 9000 faces but 5 are present"),
    "off_cut": ("t.off", _cut(off_bytes(), b"3 3 0 4"), "header declares 5 faces but 4 are present"),
    "off_cut_line": ("t.off", _cut(off_bytes(), b"3 3 0 4", 5), "line 12: a face line starts with its vertex count"),
    "ply_ascii": ("t.ply", _cut(ply_bytes(), b"3 2 3 4"), "header declares 5 faces but"),
    "ply_ascii_line": ("t.ply", _cut(ply_bytes(), b"3 3 0 4", 5), "header declares 5 faces but"),
    "ply_le": ("t.ply", ply_bytes(fmt="binary_little_endian")[:-6], "header declares 5 faces but 4 are present"),
    "ply_be_vertices": ("t.ply", _cut(ply_bytes(fmt="binary_big_endian"), b"end_header\n", 11 + 40),
                        "header declares 5 vertices but 3 are present"),
    "obj_face": ("t.obj", _cut(obj_bytes(), b"5\n"), "a face needs 3 vertices, found 2"),
    "obj_vertex": ("t.obj", obj_bytes()[:30] + b"\nf 1 2 3\n", "a vertex needs 3 coordinates"),
    "stl_ascii": ("t.stl", _cut(stl_ascii_bytes(), b"endloop"), "ends inside a solid"),
    "stl_ascii_mid": ("t.stl", _cut(stl_ascii_bytes(), b"vertex") + b"vertex 1 2\n  endloop\nendfacet\nendsolid\n",
                      "a vertex needs 3 coordinates"),
    "stl_binary": ("t.stl", stl_binary_bytes()[:-20], "declares 6 triangles (384 bytes) but the file has 364 bytes"),
    "glb": ("t.glb", glb_bytes()[:-12], "GLB header declares"),
    "glb_chunk": ("t.glb", glb_bytes(length=len(glb_bytes()) - 12)[:-12], "GLB chunk at byte"),
}


@pytest.mark.parametrize("case", TRUNCATED)
def test_truncated_files_are_refused(tmp_path, case):
    name, data, phrase = TRUNCATED[case]
    refused(write(tmp_path, name, data), phrase)


# -- indices outside the vertices -------------------------------------------------------------------------------------

BAD_INDEX = {
    "obj_past_end": ("i.obj", obj_bytes(f=PYRAMID_F[:4] + [[3, 0, 5]]), "face index 6 is past the last vertex"),
    "obj_zero": ("i.obj", obj_bytes() + b"f 0 1 2\n", "face index 0"),
    "obj_relative_before_first": ("i.obj", obj_bytes() + b"f -1 -2 -6\n", "relative face index -6 points before"),
    "obj_relative_before_its_line": ("i.obj", b"v 0 0 0\nv 1 0 0\nf -1 -2 -3\nv 0 1 0\nf 1 2 3\n",
                                     "relative face index -3 points before the first vertex (2 defined above it)"),
    "off_negative": ("i.off", off_bytes(f=PYRAMID_F[:4] + [[3, 0, -1]]), "negative vertex index -1"),
    "off_past_end": ("i.off", off_bytes(f=PYRAMID_F[:4] + [[3, 0, 5]]), "vertex index 5 but only 5 vertices"),
    "ply_ascii_negative": ("i.ply", ply_bytes(f=PYRAMID_F[:4] + [[3, 0, -1]]), "face 4: negative vertex index -1"),
    "ply_ascii_past_end": ("i.ply", ply_bytes(f=PYRAMID_F[:4] + [[3, 0, 9]]), "vertex index 9 but only 5"),
    "ply_le_negative": ("i.ply", ply_bytes(f=PYRAMID_F[:4] + [[3, 0, -1]], fmt="binary_little_endian"),
                        "negative vertex index -1"),
    "ply_be_short_negative": ("i.ply", ply_bytes(f=[[4, -2, 1]] + PYRAMID_F[1:], fmt="binary_big_endian",
                                                 index="short"), "face 0: negative vertex index -2"),
    "ply_le_uint_past_end": ("i.ply", ply_bytes(f=PYRAMID_F[:4] + [[3, 0, 2**32 - 1]], fmt="binary_little_endian",
                                                index="uint"), "vertex index 4294967295 but only 5"),
    "glb_past_end": ("i.glb", glb_bytes(f=PYRAMID_F[:4] + [[3, 0, 7]]), "vertex index 7 but only 5"),
}


@pytest.mark.parametrize("case", BAD_INDEX)
def test_indices_outside_the_vertices_are_refused(tmp_path, case):
    name, data, phrase = BAD_INDEX[case]
    refused(write(tmp_path, name, data), phrase)


def test_obj_relative_indices_count_from_the_face_line(tmp_path):
    """Two pyramids, each written as vertices then faces with negative indices: each face refers to its own
    pyramid's vertices (counted back from the line, not from the end of the file)."""
    second = PYRAMID_V + [3.0, 0.0, 0.0]
    text = b""
    for v in (PYRAMID_V, second):
        text += "".join(f"v {x!r} {y!r} {z!r}\n" for x, y, z in rows(v)).encode()
        text += "".join("f " + " ".join(str(i - 5) for i in face) + "\n" for face in PYRAMID_F).encode()
    mesh = load_mesh(write(tmp_path, "two.obj", text))
    got = sorted(map(tuple, mesh.vertices.double().tolist()))
    assert got == sorted(map(tuple, np.concatenate([PYRAMID_V, second]).tolist()))
    assert mesh.num_faces == 12 and signed_volume(mesh.vertices, mesh.faces) == pytest.approx(2 / 3, rel=1e-6)
    # relative and absolute, with texture and normal fields, resolve to the same faces
    mixed = obj_bytes(f=[]) + b"vt 0 0\nvn 0 0 1\n" + b"".join(
        ("f " + " ".join(f"{i + 1}/1/1" if k % 2 else f"{i - 5}//-1" for k, i in enumerate(face)) + "\n").encode()
        for face in PYRAMID_F)
    assert_pyramid(load_mesh(write(tmp_path, "mixed.obj", mixed)))


# -- counts that disagree with the data: absurd, or leaving data over --------------------------------------------------

HUGE = 10**12
ABSURD = {
    "off": ("h.off", off_bytes(counts=(5, HUGE)), f"header declares {HUGE} faces"),
    "off_vertices": ("h.off", off_bytes(counts=(HUGE, 5)), f"header declares {HUGE} vertices"),
    "ply_ascii": ("h.ply", ply_bytes(counts=(5, HUGE)), f"header declares {HUGE} faces"),
    "ply_le_vertices": ("h.ply", ply_bytes(fmt="binary_little_endian", counts=(HUGE, 5)),
                        f"header declares {HUGE} vertices"),
    "ply_be_faces": ("h.ply", ply_bytes(fmt="binary_big_endian", counts=(5, HUGE)), f"header declares {HUGE} faces"),
    "stl_binary": ("h.stl", stl_binary_bytes(count=2**32 - 1), "declares 4294967295 triangles"),
    "glb_accessor": ("h.glb", glb_bytes(count=HUGE), f"accessor 0 declares {HUGE} elements"),
    "glb_no_view": ("h.glb", glb_bytes(count=10**9, view=False), "more than the file has bytes"),
}


@pytest.mark.parametrize("case", ABSURD)
def test_absurd_counts_are_refused_at_once(tmp_path, case):
    name, data, phrase = ABSURD[case]
    start = time.perf_counter()
    with time_limit(5):
        refused(write(tmp_path, name, data), phrase)
    assert time.perf_counter() - start < 2


LEFT_OVER = {
    "off": ("x.off", off_bytes() + b"3 0 1 2\n", "1 line after the 5 faces the header declares"),
    "ply_ascii": ("x.ply", ply_bytes() + b"3 0 1 2\n", "4 values after the last element"),
    "ply_le": ("x.ply", ply_bytes(fmt="binary_little_endian") + struct.pack("<B3i", 3, 0, 1, 2),
               "13 bytes after the last element"),
    "stl_binary": ("x.stl", stl_binary_bytes() + b"\x00" * 50, "declares 6 triangles (384 bytes) but the file has 434"),
    "stl_ascii": ("x.stl", stl_ascii_bytes() + b"facet normal 0 0 1\n", "unexpected 'facet'"),
    "glb": ("x.glb", glb_bytes() + b"\x00" * 8, "GLB header declares"),
}


@pytest.mark.parametrize("case", LEFT_OVER)
def test_data_beyond_the_declared_counts_is_refused(tmp_path, case):
    name, data, phrase = LEFT_OVER[case]
    refused(write(tmp_path, name, data), phrase)


def test_ply_elements_without_rows(tmp_path):
    """Empty elements and elements the loader does not use are read past correctly."""
    for fmt in ("ascii", "binary_little_endian"):
        data = ply_bytes(fmt=fmt).replace(b"end_header", b"element edge 0\nproperty int vertex1\nend_header")
        assert_pyramid(load_mesh(write(tmp_path, "edges.ply", data)))
        refused(write(tmp_path, "nofaces.ply", ply_bytes(fmt=fmt, f=[])), "no triangle faces")


def gltf_parts(uri="m.bin") -> tuple[bytes, bytes]:
    """A .gltf (JSON) whose one buffer is the file ``uri``, and that buffer's bytes."""
    pos = np.asarray(PYRAMID_V, "<f4").tobytes()
    idx = np.asarray(fan(PYRAMID_F), "<u4").tobytes()
    doc = {"asset": {"version": "2.0"}, "scene": 0, "scenes": [{"nodes": [0]}], "nodes": [{"mesh": 0}],
           "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1}]}],
           "buffers": [{"byteLength": len(pos) + len(idx), "uri": uri}],
           "bufferViews": [{"buffer": 0, "byteLength": len(pos)},
                           {"buffer": 0, "byteOffset": len(pos), "byteLength": len(idx)}],
           "accessors": [{"bufferView": 0, "componentType": 5126, "count": 5, "type": "VEC3"},
                         {"bufferView": 1, "componentType": 5125, "count": 18, "type": "SCALAR"}]}
    return json.dumps(doc).encode(), pos + idx


def test_gltf_buffers_and_node_tree_are_checked(tmp_path):
    doc, blob = gltf_parts()
    path = write(tmp_path, "m.gltf", doc)
    refused(path, "buffer 0: file 'm.bin' not found")
    write(tmp_path, "m.bin", blob[:-8])
    refused(path, f"buffer 0 declares {len(blob)} bytes but holds {len(blob) - 8}")
    write(tmp_path, "m.bin", blob)
    assert_pyramid(load_mesh(path))
    refused(write(tmp_path, "cycle.glb", glb_bytes(children=[1])), "cycle")


# -- encodings ---------------------------------------------------------------------------------------------------------

def test_obj_in_any_encoding_loads(tmp_path):
    head = ("# modèle exporté, café crème\nmtllib matériaux.mtl\no pyramide_Größe\nusemtl peint_à_la_main\n"
            "g côté\n").encode("latin-1")
    assert_pyramid(load_mesh(write(tmp_path, "latin1.obj", obj_bytes(head=head))))  # the .mtl does not exist
    assert_pyramid(load_mesh(write(tmp_path, "utf8.obj", obj_bytes(head=head.decode("latin-1").encode()))))
    junk = b"# \x80\x81\xfe\xff\x00 binary junk in a comment\ns \xe9\n"
    assert_pyramid(load_mesh(write(tmp_path, "junk.obj", junk + obj_bytes().replace(b"\n", b"\r\n"))))


# -- what loaded before loads the same ---------------------------------------------------------------------------------

def trimesh_reference(path):
    """What the loader produced when it read every format through trimesh."""
    scene = trimesh.load(path, force="scene", process=False)
    vertices, faces, offset = [], [], 0
    for node in scene.graph.nodes_geometry:
        transform, name = scene.graph[node]
        geom = scene.geometry[name]
        vertices.append(trimesh.transform_points(np.asarray(geom.vertices, dtype=np.float64), transform))
        faces.append(np.asarray(geom.faces, dtype=np.int64) + offset)
        offset += len(geom.vertices)
    return clean_triangles(np.concatenate(vertices), np.concatenate(faces))


def _polygon_soup(seed=0):
    """A bumpy grid of quads, some split into triangles, some grown into pentagons, in three materials."""
    rng = np.random.default_rng(seed)
    n = 6
    v = [[i, j, rng.uniform(0, 0.3)] for i in range(n) for j in range(n)]
    faces = []
    for k, (i, j) in enumerate((i, j) for i in range(n - 1) for j in range(n - 1)):
        q = [i * n + j, (i + 1) * n + j, (i + 1) * n + j + 1, i * n + j + 1]
        if k % 3 == 0:
            faces += [q[:3], [q[0], q[2], q[3]]]
        elif k % 3 == 1:
            v.append([i + 0.5, j, rng.uniform(0, 0.3)])
            faces.append([q[0], len(v) - 1, q[1], q[2], q[3]])
        else:
            faces.append(q)
    return np.array(v), faces


def test_polygons_triangulate_as_trimesh_did(tmp_path):
    v, f = _polygon_soup()
    quads = [face for face in f if len(face) == 4]
    groups = b"".join(f"usemtl m{k % 3}\n".encode() + obj_bytes(v=[], f=f[k::4]) for k in range(4))
    files = {"mixed.obj": obj_bytes(v, f), "materials.obj": obj_bytes(v, []) + groups,
             "mixed.ply": ply_bytes(v, f), "quads.ply": ply_bytes(v, quads, fmt="binary_little_endian"),
             "quads.off": off_bytes(v, quads), "triangles.off": off_bytes(v, fan(f))}
    for name, data in files.items():
        path = write(tmp_path, name, data)
        mesh = load_mesh(path)
        ref_v, ref_f = trimesh_reference(path)
        assert np.array_equal(mesh.vertices.numpy(), ref_v.astype(np.float32)), name
        assert np.array_equal(mesh.faces.numpy(), ref_f), name
    # trimesh could not read mixed polygons from OFF or binary PLY; the fans are those of the other formats
    for name, data in (("mixed.off", off_bytes(v, f)), ("mixed_le.ply", ply_bytes(v, f, fmt="binary_little_endian"))):
        mesh = load_mesh(write(tmp_path, name, data))
        ref = load_mesh(tmp_path / "mixed.ply")
        assert torch.equal(mesh.faces, ref.faces) and torch.equal(mesh.vertices, ref.vertices), name


def test_shared_meshes_load_as_trimesh_read_them(shared_meshes):
    paths = sorted(p for p in shared_meshes.rglob("*") if p.suffix.lower() in (".obj", ".ply", ".stl", ".glb"))
    assert paths
    for path in paths:
        mesh = load_mesh(path)
        ref_v, ref_f = trimesh_reference(path)
        assert np.array_equal(mesh.vertices.numpy(), ref_v.astype(np.float32)), path.name
        assert np.array_equal(mesh.faces.numpy(), ref_f), path.name


# -- through the command line ------------------------------------------------------------------------------------------

CLI_CASES = {"obj": ("bad.obj", BAD_INDEX["obj_past_end"][1]), "off": ("bad.off", TRUNCATED["off_header"][1]),
             "ply": ("bad.ply", BAD_INDEX["ply_ascii_negative"][1]), "stl": ("bad.stl", TRUNCATED["stl_binary"][1]),
             "glb": ("bad.glb", BAD_INDEX["glb_past_end"][1]), "gltf": ("bad.gltf", gltf_parts("gone.bin")[0])}


@pytest.mark.parametrize("fmt", CLI_CASES)
def test_cli_reports_one_line_and_writes_nothing(tmp_path, capsys, fmt):
    name, data = CLI_CASES[fmt]
    bad = write(tmp_path, name, data)
    out = tmp_path / "out.ply"
    assert main(["convert", str(bad), "-o", str(out), "--resolution", "32"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and name in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_huge_coordinates_are_refused_quietly(tmp_path, capsys):
    """Past float32's range: one error line, not numpy overflow warnings on the way (they would print too)."""
    bad = write(tmp_path, "huge.obj", obj_bytes(v=PYRAMID_V * [1, 1, 1e300]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["convert", str(bad), "-o", str(tmp_path / "out.ply"), "--resolution", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "huge.obj: vertex coordinates overflow float32" in err
    # an unused vertex out there does not matter
    assert_pyramid(load_mesh(write(tmp_path, "far.obj", obj_bytes(v=np.vstack([PYRAMID_V, [[1e300, 0, 0]]])))))


# -- fuzz -----------------------------------------------------------------------------------------------------------

class Hang(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` on the way turns it into an InputError."""


@contextmanager
def time_limit(seconds: float):
    def alarm(signum, frame):
        raise Hang(f"still loading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_INTERESTING = b"0123456789-+. \n\t/#eE\x00\xff"


def mutate(data: bytes, rng, keep_size: bool = False) -> bytes:
    """One to three random byte flips, truncations, insertions, deletions or duplications (only flips with
    ``keep_size``, which get past the size checks of binary formats to what lies behind them)."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        at = int(rng.integers(0, len(out) + 1))
        byte = lambda: (_INTERESTING[int(rng.integers(len(_INTERESTING)))] if rng.random() < 0.5
                        else int(rng.integers(256)))
        kind = 0 if keep_size else int(rng.integers(5))
        if kind == 0 and at < len(out):
            out[at] = byte()
        elif kind == 1:
            del out[at:]
        elif kind == 2:
            out[at:at] = bytes(byte() for _ in range(int(rng.integers(1, 9))))
        elif kind == 3:
            del out[at:at + int(rng.integers(1, 17))]
        else:
            out[at:at] = out[at:at + int(rng.integers(1, 33))]
    return bytes(out)


@pytest.mark.parametrize("fmt", VALID)
def test_fuzz_loads_or_refuses(tmp_path, fmt):
    name, make = VALID[fmt]
    valid = make()
    rng = np.random.default_rng(sum(map(ord, fmt)))
    path = tmp_path / name
    outcomes = {"loaded": 0, "refused": 0}
    for trial in range(300):
        data = mutate(valid, rng, keep_size=trial % 2 == 0)
        path.write_bytes(data)
        start = time.perf_counter()
        try:
            with time_limit(5):
                mesh = load_mesh(path)
        except InputError as exc:
            assert str(exc).startswith(str(path)) and "\n" not in str(exc), (trial, str(exc))
            outcomes["refused"] += 1
        except Exception as exc:  # anything else is a bug: say which input caused it
            pytest.fail(f"{fmt} trial {trial}: {type(exc).__name__}: {exc}; input {data!r}")
        else:
            v, f = mesh.vertices, mesh.faces
            assert v.dtype == torch.float32 and bool(v.isfinite().all()), (trial, data)
            assert f.shape[1] == 3 and int(f.min()) >= 0 and int(f.max()) < len(v), (trial, data)
            outcomes["loaded"] += 1
        assert time.perf_counter() - start < 5, (trial, data)
    assert outcomes["refused"] > 30 and outcomes["loaded"] > 0, outcomes  # both outcomes are exercised
