"""Mesh loading (every format, scene transforms), normalisation, surface sampling and voxelisation against
independent references."""

import math

import numpy as np
import pytest
import torch
import trimesh
from scipy.optimize import linprog

from sparseflex.data.mesh import Mesh, load_mesh, normalize
from sparseflex.data.sampling import sample_surface
from sparseflex.data.voxelize import voxelize
from sparseflex.errors import InputError
from sparseflex.eval.topology import signed_volume


def sorted_rows(v) -> np.ndarray:
    v = np.round(np.asarray(v, dtype=np.float64), 5)
    return v[np.lexsort(v.T[::-1])]


@pytest.mark.parametrize("ext", ["obj", "ply", "stl", "off", "glb", "gltf"])
def test_load_every_format(tmp_path, ext):
    box = trimesh.creation.box(extents=(1.0, 2.0, 3.0))
    box.apply_translation([0.5, -1.0, 2.0])
    path = tmp_path / f"box.{ext}"
    box.export(path)
    mesh = load_mesh(path)
    # STL stores 36 corners: welding must bring them back to the 8 box corners
    assert (mesh.num_vertices, mesh.num_faces) == (8, 12)
    assert mesh.vertices.dtype == torch.float32 and mesh.faces.dtype == torch.int64
    assert np.allclose(sorted_rows(mesh.vertices), sorted_rows(box.vertices), atol=1e-6)
    assert signed_volume(mesh.vertices, mesh.faces) == pytest.approx(6.0, rel=1e-6)


@pytest.mark.parametrize("ext", ["ply", "obj", "glb"])
def test_save_round_trips_exactly_and_other_readers_agree(tmp_path, ext):
    from sparseflex.data.mesh import save_mesh
    mesh = Mesh.from_trimesh(trimesh.creation.torus(0.3, 0.1))
    mesh.vertices = mesh.vertices + torch.tensor([0.1, -2.0, 3.0])
    path = save_mesh(tmp_path / f"t.{ext}", mesh)
    back = load_mesh(path)  # welded and renumbered, the same triangles in the same order
    assert torch.equal(back.vertices[back.faces], mesh.vertices[mesh.faces])
    other = trimesh.load(path, force="mesh", process=False)  # an independent reader
    assert np.array_equal(np.asarray(other.vertices, dtype=np.float32), mesh.vertices.numpy())
    assert np.array_equal(np.asarray(other.faces), mesh.faces.numpy())
    assert signed_volume(back.vertices, back.faces) == pytest.approx(
        signed_volume(mesh.vertices, mesh.faces), rel=1e-6)


def test_glb_scene_node_transforms(tmp_path):
    scene = trimesh.Scene()
    a = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    b = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    rot = trimesh.transformations.rotation_matrix(math.pi / 3, [0, 0, 1])
    ta = trimesh.transformations.translation_matrix([3.0, 0.0, 0.0]) @ rot
    tb = trimesh.transformations.translation_matrix([0.0, 2.0, -1.0]) @ np.diag([2.0, 1.0, 1.0, 1.0])
    scene.add_geometry(a, node_name="a", geom_name="a", transform=ta)
    scene.add_geometry(b, node_name="b", geom_name="b", transform=tb)
    scene.add_geometry(a, node_name="child", geom_name="a", parent_node_name="b",  # nested: tb @ shift
                       transform=trimesh.transformations.translation_matrix([0.0, 0.0, 5.0]))
    path = tmp_path / "scene.glb"
    scene.export(path)
    mesh = load_mesh(path)
    expected = np.concatenate([trimesh.transform_points(a.vertices, ta), trimesh.transform_points(b.vertices, tb),
                               trimesh.transform_points(a.vertices, tb @ trimesh.transformations.translation_matrix(
                                   [0.0, 0.0, 5.0]))])
    assert mesh.num_faces == 2 * len(a.faces) + len(b.faces)
    assert np.allclose(sorted_rows(mesh.vertices), sorted_rows(expected), atol=1e-5)


def test_load_errors(tmp_path):
    for name, data in (("empty.obj", b""), ("bad.ply", b"ply\ngarbage\x00\xff" * 20),
                       ("nan.obj", b"v 0 0 0\nv 1 0 0\nv 0 nan 0\nf 1 2 3\n"), ("points.obj", b"v 0 0 0\nv 1 0 0\n"),
                       ("mesh.xyz", b"0 0 0\n")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            load_mesh(tmp_path / name)
    with pytest.raises(InputError, match="no such file"):
        load_mesh(tmp_path / "missing.obj")


def test_normalisation_round_trip():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(50, 3, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 0.5, 1.0]) + 7
    mesh = Mesh(v, torch.randint(0, 50, (30, 3), generator=gen))
    normed, t = normalize(mesh)
    lo, hi = normed.vertices.amin(0), normed.vertices.amax(0)
    assert torch.allclose((lo + hi) / 2, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert float((hi - lo).max()) == pytest.approx(1.0, abs=1e-12)
    assert t.scale == pytest.approx(1.0 / float((v.amax(0) - v.amin(0)).max()))
    assert torch.allclose(t.invert(normed.vertices), v, atol=1e-12)
    assert torch.equal(normed.faces, mesh.faces)
    with pytest.raises(InputError):
        normalize(Mesh(torch.ones(3, 3), torch.tensor([[0, 1, 2]])))


def test_sample_surface_on_sphere():
    sphere = trimesh.creation.icosphere(subdivisions=4)  # radius 1, 5120 faces
    mesh = Mesh.from_trimesh(sphere)
    n = 200_000
    pts, normals, face = sample_surface(mesh, n, generator=torch.Generator().manual_seed(0))
    tri = mesh.vertices[mesh.faces].double()
    plane = (torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])).double()
    inradius = (torch.nn.functional.normalize(plane, dim=1) * tri[:, 0]).sum(1).abs().min()
    r = pts.double().norm(dim=1)
    assert r.max() <= 1 + 1e-6 and r.min() >= inradius - 1e-6
    # face normals point outward, within the angle a face spans around its centre (~2 degrees)
    assert (normals.double() * pts.double() / r[:, None]).sum(1).min() > math.cos(math.radians(3))
    assert torch.allclose(normals.norm(dim=1), torch.ones(n), atol=1e-5)
    # uniform by area: a cap z > 1/2 holds (1 - 1/2) / 2 = 1/4 of a sphere's area (Archimedes); octants 1/8 each
    tol = 4 * math.sqrt(0.25 * 0.75 / n) + 2e-3  # sampling noise + the polyhedron's deviation from the sphere
    assert abs(float((pts[:, 2] > 0.5).double().mean()) - 0.25) < tol
    octant = ((pts > 0).long() * torch.tensor([1, 2, 4])).sum(1)
    assert (torch.bincount(octant, minlength=8).double() / n - 0.125).abs().max() < tol
    # the sampled point lies on the face it reports
    on_plane = ((pts.double() - tri[face, 0]) * torch.nn.functional.normalize(plane[face], dim=1)).sum(1)
    assert on_plane.abs().max() < 1e-6


def test_sample_surface_weights_by_area():
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 0, 0], [8, 0, 0], [5, 2, 0]])
    mesh = Mesh(v, torch.tensor([[0, 1, 2], [3, 4, 5]]))  # areas 0.5 and 3
    n = 100_000
    pts, _, face = sample_surface(mesh, n, generator=torch.Generator().manual_seed(0))
    assert abs(float((face == 0).double().mean()) - 0.5 / 3.5) < 4 * math.sqrt(1 / 7 * 6 / 7 / n)
    second = pts[face == 1].double()
    # uniform in the triangle: mean at the centroid, the central midpoint triangle holds 1/4
    assert torch.allclose(second.mean(0), torch.tensor([6.0, 2 / 3, 0.0], dtype=torch.float64), atol=0.02)
    x, y = second[:, 0] - 5, second[:, 1]  # local frame: corners (0, 0), (3, 0), (0, 2)
    central = (y < 1) & (x < 1.5) & (x / 3 + y / 2 > 0.5)
    assert abs(float(central.double().mean()) - 0.25) < 0.01


def touches_lp(tri: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bool:
    """Whether a triangle and a closed box share a point: feasibility of barycentrics b >= 0, sum 1, with
    lo <= b @ tri <= hi (a linear programme, independent of the separating-axis code under test)."""
    a_ub = np.concatenate([tri.T, -tri.T])
    b_ub = np.concatenate([hi, -lo]) + 1e-9
    res = linprog(np.zeros(3), A_ub=a_ub, b_ub=b_ub, A_eq=np.ones((1, 3)), b_eq=[1.0], bounds=[(0, None)] * 3,
                  method="highs")
    return res.status == 0


def test_voxelize_matches_dense_reference():
    r = 6
    gen = np.random.default_rng(3)
    tris = [gen.uniform(-0.5, 0.5, (3, 3)) for _ in range(3)]
    tris.append(gen.uniform(-0.7, 0.2, (3, 3)))              # partly outside the cube
    z = -0.5 + 2 / r                                         # lying on a grid plane: both layers touch it
    tris.append(np.array([[-0.3, -0.2, z], [0.25, -0.1, z], [0.0, 0.3, z]]))
    tris.append(np.array([[-0.4, -0.4, -0.4], [0.4, 0.4, 0.4], [0.4, 0.41, 0.4]]))  # a sliver along a diagonal
    v = torch.tensor(np.concatenate(tris), dtype=torch.float64)
    faces = torch.arange(len(v)).reshape(-1, 3)
    got = voxelize((v, faces), r)
    expected = []
    for i in range(r):
        for j in range(r):
            for k in range(r):
                lo = np.array([i, j, k]) / r - 0.5
                if any(touches_lp(t, lo, lo + 1 / r) for t in tris):
                    expected.append([i, j, k])
    assert got.tolist() == expected  # same set, sorted with x slowest
    # dilation grows the set by the Chebyshev ball, clipped to the grid
    grown = {tuple(c) for c in voxelize((v, faces), r, dilation=1).tolist()}
    ref = {(i + a, j + b, k + c) for i, j, k in expected for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)}
    assert grown == {c for c in ref if all(0 <= x < r for x in c)}
