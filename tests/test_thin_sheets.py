"""Features thinner than a voxel survive conversion: plates, air gaps and parts touching face to face.

The grids are placed so that no corner lies inside the feature (where an oriented-point SDF never changes sign and
the feature vanishes). Expectations are analytic: points on the features' faces (away from their rims and from the
boxes' sharp edges, which convert rounds off either way) must lie on the extracted surface, and the extracted area
near each feature must be that of its faces.
"""

import numpy as np
import pytest
import torch
import trimesh

from sparseflex.data.mesh import Mesh
from sparseflex.data.sampling import sample_surface
from sparseflex.eval.metrics import SurfaceDistance
from sparseflex.fit.convert import mesh_to_sparseflex
from sparseflex.flexicubes.init_sdf import OrientedPoints
from sparseflex.render import embree_available

R = 32
H = 1.0 / R


def box(lo, hi) -> trimesh.Trimesh:
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    b = trimesh.creation.box(extents=hi - lo)
    b.apply_translation((lo + hi) / 2)
    return b


def as_mesh(*parts: trimesh.Trimesh, transform=None) -> Mesh:
    m = trimesh.util.concatenate(parts)
    if transform is not None:
        m.apply_transform(transform)
    return Mesh(torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces))


def converted(gt: Mesh, thin: bool) -> Mesh:
    ex = mesh_to_sparseflex(gt, R, num_points=400_000, thin_sheets=thin).extract()
    return Mesh(ex.vertices, ex.faces)


def square(z: float, half: float, n: int = 4000, transform=None) -> np.ndarray:
    """Points on the square |x|, |y| <= half at height z (then transformed)."""
    xy = np.random.default_rng(0).uniform(-half, half, (n, 2))
    p = np.concatenate([xy, np.full((n, 1), z)], 1)
    return p if transform is None else trimesh.transform_points(p, transform)


def on_surface(points: np.ndarray, mesh: Mesh, tol: float) -> float:
    """Fraction of ``points`` within ``tol`` of the mesh."""
    if mesh.num_faces == 0:
        return 0.0
    return float((SurfaceDistance(mesh.vertices, mesh.faces).query(points)[0] <= tol).mean())


def area_near(mesh: Mesh, z: float, tol: float, half: float, transform=None) -> float:
    """Area of the faces whose centroid lies within ``tol`` of the plane z (in the untransformed frame) and over
    the square |x|, |y| <= half."""
    c = mesh.vertices[mesh.faces].mean(1).double().numpy()
    if transform is not None:
        c = trimesh.transform_points(c, np.linalg.inv(transform))
    keep = (np.abs(c[:, 2] - z) <= tol) & (np.abs(c[:, :2]) <= half).all(1)
    return float(mesh.face_areas.double().numpy()[keep].sum())


TILT = trimesh.transformations.rotation_matrix(np.radians(25), [1, 0, 0])


@pytest.mark.parametrize("transform", [None, TILT], ids=["axis-aligned", "tilted"])
def test_plate_thinner_than_a_voxel_keeps_both_faces(transform):
    z0, t = -0.5 + 16.37 * H, 0.3 * H                          # between two corner planes: no corner inside
    gt = as_mesh(box([-0.4, -0.4, z0 - t / 2], [0.4, 0.4, z0 + t / 2]), transform=transform)
    assert converted(gt, thin=False).area < 0.1 * gt.area      # the plate vanishes without
    pred = converted(gt, thin=True)
    for z in (z0 - t / 2, z0 + t / 2):
        assert on_surface(square(z, 0.35, transform=transform), pred, 0.05 * H) >= 0.99
    # one layer per face: the area near the plate is twice the square's, nothing more
    assert area_near(pred, z0, H, 0.36, transform) == pytest.approx(2 * 0.72 ** 2, rel=0.02)


def test_air_gap_thinner_than_a_voxel_separates_the_parts():
    lo, hi = -0.5 + 16.4 * H, -0.5 + 16.65 * H                   # 0.25 voxels of air between two blocks
    gt = as_mesh(box([-0.4, -0.4, -0.4], [0.4, 0.4, lo]), box([-0.4, -0.4, hi], [0.4, 0.4, 0.4]))
    merged, pred = converted(gt, thin=False), converted(gt, thin=True)
    for z in (lo, hi):
        assert on_surface(square(z, 0.38), merged, 0.1 * H) < 0.05  # the facing faces are lost without
        assert on_surface(square(z, 0.35), pred, 0.05 * H) >= 0.99
    assert area_near(pred, (lo + hi) / 2, H, 0.36) == pytest.approx(2 * 0.72 ** 2, rel=0.02)


@pytest.mark.skipif(not embree_available(), reason="embreex not installed")
def test_parts_touching_face_to_face_keep_the_shared_wall():
    wall = -0.5 + 16.3 * H
    gt = as_mesh(box([-0.4, -0.4, -0.4], [0.4, 0.4, wall]), box([-0.4, -0.4, wall], [0.4, 0.4, 0.4]))
    pred = converted(gt, thin=True)
    assert on_surface(square(wall, 0.35), pred, 0.05 * H) >= 0.99
    # both faces of the wall: an air sliver between the parts, two layers
    assert area_near(pred, wall, H, 0.36) == pytest.approx(2 * 0.72 ** 2, rel=0.02)
    # without the ray vote, the nearest sample alone gives each corner by the wall a coin-flip sign
    union = converted(gt, thin=False)
    assert abs(area_near(union, wall, H, 0.36) - 2 * 0.72 ** 2) > 0.1 * 0.72 ** 2


def test_thick_and_single_sheets_are_left_alone():
    """Only features thinner than the corner layer are touched: a thick block and an open sheet keep their SDF."""
    block = as_mesh(box([-0.3, -0.3, -0.3], [0.3, 0.3, 0.3]))
    sheet_v = torch.tensor([[-0.4, -0.4, 0.013], [0.4, -0.4, 0.013], [0.4, 0.4, 0.013], [-0.4, 0.4, 0.013]])
    sheet = Mesh(sheet_v, torch.tensor([[0, 1, 2], [0, 2, 3]]))
    for gt in (block, sheet):
        pts, nrm, _ = sample_surface(gt, 100_000, generator=torch.Generator().manual_seed(0))
        sf = mesh_to_sparseflex(gt, R, samples=OrientedPoints(pts, nrm), thin_sheets=False)
        corners = sf.corners[:, 1:].float() / R - 0.5
        idx, _, _ = OrientedPoints(pts, nrm).thin_sheets(corners, R)
        assert len(idx) == 0


def test_fit_leaves_thin_sheet_corners_and_keeps_the_plate():
    from sparseflex.fit.fitter import FitConfig, Fitter

    z0, t = -0.5 + 16.37 * H, 0.3 * H
    gt = as_mesh(box([-0.4, -0.4, z0 - t / 2], [0.4, 0.4, z0 + t / 2]))
    fitter = Fitter(gt, FitConfig(resolution=R, iterations=6, image_size=64, checkpoint_every=0))
    pinned = fitter.state.pinned
    assert pinned is not None and pinned.sum() > 100          # the plate's mid-sheet layer
    sdf, deform = fitter.state.sf.sdf.clone(), fitter.state.sf.deform.clone()
    sf = fitter.run()
    assert torch.equal(sf.sdf[pinned], sdf[pinned]) and torch.equal(sf.deform[pinned], deform[pinned])
    assert not torch.equal(sf.sdf[~pinned], sdf[~pinned])     # the rest is optimised
    ex = sf.extract()
    pred = Mesh(ex.vertices.detach(), ex.faces)
    for z in (z0 - t / 2, z0 + t / 2):
        assert on_surface(square(z, 0.35), pred, 0.05 * H) >= 0.99
