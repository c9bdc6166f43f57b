"""Topology fidelity (issue 18): a watertight input gives a watertight output after ``convert`` and after ``fit``
(no boundary, no non-manifold edge once coincident vertices are welded); an open input keeps its number of boundary
loops; ``convert``, ``fit`` and ``metrics`` report the check.

Expectations are independent of the code under test: watertightness of the shared meshes comes from their
MANIFEST, loop counts from the input meshes, and the generated solids are watertight by construction (boundary faces
of a set of cells on one rectilinear grid). The surface sample is kept small (``num_points``; the fit's through
``default_num_points``): for a watertight input the signs come from ray parity, and closing the band does not
depend on the sample's density, only the accuracy does.
"""

import csv
import json

import numpy as np
import pytest
import torch

from sparseflex.cli import main
from sparseflex.data.mesh import Mesh, load_mesh, normalize, save_mesh
from sparseflex.eval.topology import topology, topology_report
from sparseflex.fit import fitter as fitter_module
from sparseflex.fit.convert import mesh_to_sparseflex
from sparseflex.fit.fitter import FitConfig, Fitter

POINTS = 300_000


# -- generated watertight solids with sharp features -------------------------------------------------------------------

def cell_solid(xs, ys, zs, filled, rotate: bool = True) -> Mesh:
    """The boundary of the cells ``filled [X, Y, Z]`` of the rectilinear grid with planes ``xs, ys, zs``: every face
    between a filled and an empty cell, as two triangles facing the empty one. Watertight and edge-manifold as long
    as no two filled cells meet along an edge only. ``rotate`` turns it by a generic rotation, so that its sharp
    edges and thin walls run oblique to the voxel grid."""
    filled = np.pad(np.asarray(filled, dtype=bool), 1)
    planes = [np.asarray(p, dtype=np.float64) for p in (xs, ys, zs)]
    def index(i, j, k):  # the vertex at plane triple (i, j, k)
        return (i * len(planes[1]) + j) * len(planes[2]) + k

    faces = []
    for axis in range(3):
        step = [0, 0, 0]
        step[axis] = 1
        a = filled[1:-1, 1:-1, 1:-1]
        b = filled[1 + step[0]:filled.shape[0] - 1 + step[0], 1 + step[1]:filled.shape[1] - 1 + step[1],
                   1 + step[2]:filled.shape[2] - 1 + step[2]]
        c = filled[1 - step[0]:filled.shape[0] - 1 - step[0], 1 - step[1]:filled.shape[1] - 1 - step[1],
                   1 - step[2]:filled.shape[2] - 1 - step[2]]
        u, v = (axis + 1) % 3, (axis + 2) % 3
        for side, other in ((1, b), (0, c)):
            for cell in np.argwhere(a & ~other):
                base = cell.copy()
                base[axis] += side
                quad = []
                for du, dv in ((0, 0), (1, 0), (1, 1), (0, 1)):
                    p = base.copy()
                    p[u] += du
                    p[v] += dv
                    quad.append(index(*p))
                if side == 0:
                    quad = quad[::-1]
                faces += [[quad[0], quad[1], quad[2]], [quad[0], quad[2], quad[3]]]
    grid = np.stack(np.meshgrid(*planes, indexing="ij"), -1).reshape(-1, 3)
    if rotate:
        ax, ay = np.radians(23.0), np.radians(37.0)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        grid = grid @ (ry @ rx).T
    faces = np.asarray(faces, dtype=np.int64)
    used, inverse = np.unique(faces, return_inverse=True)
    return Mesh(torch.tensor(grid[used], dtype=torch.float32), torch.from_numpy(inverse.reshape(-1, 3)))


def cube(rotate=False):
    return cell_solid([0, 1], [0, 1], [0, 1], np.ones((1, 1, 1)), rotate)


def thin_walled_part():
    """A CAD-like part: an open-topped box whose walls and floor are 0.4 % of its size thick (a quarter of a voxel
    at 64, one voxel at 256), with a thin rib across it and a square hole through the floor."""
    t = 0.004
    xs = [0, t, 0.45, 0.45 + t, 0.6, 0.7, 1 - t, 1]
    ys = [0, t, 0.4, 0.55, 1 - t, 1]
    zs = [0, t, 0.7]
    filled = np.zeros((7, 5, 2), dtype=bool)
    filled[:, :, 0] = True            # floor
    filled[4, 2, 0] = False           # hole through the floor
    filled[[0, -1], :, 1] = True      # walls along y
    filled[:, [0, -1], 1] = True      # walls along x
    filled[2, :, 1] = True            # the rib
    return cell_solid(xs, ys, zs, filled)


def genus_three():
    """A slab with three square holes through it (genus 3)."""
    xs = [0, 0.1, 0.25, 0.35, 0.5, 0.6, 0.75, 0.85, 1.0]
    filled = np.ones((8, 3, 1), dtype=bool)
    filled[[1, 3, 5], 1, 0] = False
    return cell_solid(xs, [0, 0.15, 0.3, 0.45], [0, 0.12], filled)


def touching_boxes():
    """Two closed boxes that touch face to face (two watertight components sharing part of a face)."""
    a = cell_solid([0, 0.5], [0, 0.5], [0, 0.5], np.ones((1, 1, 1)), rotate=True)
    b = cell_solid([0.5, 0.9], [0.1, 0.4], [0.05, 0.35], np.ones((1, 1, 1)), rotate=True)
    return Mesh(torch.cat([a.vertices, b.vertices]), torch.cat([a.faces, b.faces + len(a.vertices)]))


SOLIDS = {"cube": cube, "rotated_cube": lambda: cube(True), "thin_walled_part": thin_walled_part,
          "genus_three": genus_three, "touching_boxes": touching_boxes}


def test_generated_solids_are_watertight_with_the_intended_genus():
    for name, make in SOLIDS.items():
        mesh = make()
        t = topology(mesh.vertices, mesh.faces)
        assert t["watertight"], name
        v, e = len(np.unique(mesh.faces.numpy())), len(np.unique(np.sort(mesh.faces.numpy()[:, [0, 1, 1, 2, 2, 0]]
                                                                     .reshape(-1, 2), 1), axis=0))
        genus = (2 * t["components"] - (v - e + len(mesh.faces))) // 2
        assert genus == {"genus_three": 3, "thin_walled_part": 1}.get(name, 0), name


# -- helpers ----------------------------------------------------------------------------------------------------------

def manifest(root):
    with open(root / "MANIFEST.tsv") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def shared(root, watertight: bool):
    return [root / r["group"] / r["file"] for r in manifest(root) if (r["watertight"] == "yes") == watertight]


def closed_output(mesh: Mesh):
    t = topology(mesh.vertices, mesh.faces)
    return t["boundary_edges"], t["nonmanifold_edges"]


def loops(mesh: Mesh) -> int:
    return topology(mesh.vertices, mesh.faces)["boundary_loops"]


def convert_and_fit(gt: Mesh, resolution: int, monkeypatch, iterations: int = 8, **config) -> tuple[Mesh, Mesh]:
    """The meshes of ``convert`` and of a short fit from it (the fit converts exactly so; done once for both). The
    SDF's learning rate is 40 times the default, so that within these few steps many corner signs change, those
    on the band's edge included, which is where a fit opened the surface."""
    monkeypatch.setattr(fitter_module, "default_num_points", lambda n: POINTS)
    cfg = FitConfig(resolution=resolution, iterations=iterations, image_size=64, checkpoint_every=0, lr_sdf=0.1,
                    **config)
    fit = Fitter(gt, cfg)
    with torch.no_grad():
        start = fit.state.sf.extract()
    sf = fit.run()
    with torch.no_grad():
        end = sf.extract()
    return Mesh(start.vertices, start.faces), Mesh(end.vertices, end.faces)


def assert_watertight(gt: Mesh, resolution: int, monkeypatch, name: str, **config):
    """0 boundary and 0 non-manifold edges after convert and after a short fit."""
    for what, mesh in zip(("convert", "fit"), convert_and_fit(gt, resolution, monkeypatch, **config)):
        assert closed_output(mesh) == (0, 0), (name, resolution, what)


# -- watertight inputs: convert and fit -------------------------------------------------------------------------------
# At 256 the fit takes 3 steps (each extracts and renders the whole band); the other shared meshes at 256 are
# measured by benchmarks/fit.py (docs/topology.md).

#: Fit steps per resolution.
STEPS = {64: 8, 128: 8, 256: 3}


@pytest.mark.parametrize("resolution", [64, 128])
@pytest.mark.parametrize("name", SOLIDS)
def test_generated_solids_stay_watertight(name, resolution, monkeypatch):
    assert_watertight(normalize(SOLIDS[name]())[0], resolution, monkeypatch, name, iterations=STEPS[resolution])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["thin_walled_part", "genus_three", "touching_boxes"])
def test_generated_solids_stay_watertight_at_256(name, monkeypatch):
    assert_watertight(normalize(SOLIDS[name]())[0], 256, monkeypatch, name, iterations=STEPS[256])


def test_fit_coarse_to_fine_stays_watertight(monkeypatch):
    """Each refinement closes the finer band like convert: 32, then 64."""
    assert_watertight(normalize(thin_walled_part())[0], 64, monkeypatch, "thin_walled_part", start_resolution=32)


def test_shared_watertight_meshes_stay_watertight_at_64(shared_meshes, monkeypatch):
    paths = shared(shared_meshes, watertight=True)
    assert len(paths) >= 7
    for path in paths:
        assert_watertight(normalize(load_mesh(path))[0], 64, monkeypatch, path.name)


@pytest.mark.slow
def test_shared_watertight_meshes_stay_watertight_at_128(shared_meshes, monkeypatch):
    """convert and a short fit at 128 (at 256: benchmarks/fit.py, docs/topology.md; the CAD part below)."""
    paths = shared(shared_meshes, watertight=True)
    assert len(paths) >= 7
    for path in paths:
        assert_watertight(normalize(load_mesh(path))[0], 128, monkeypatch, path.name, iterations=STEPS[128])


@pytest.mark.slow
def test_cad_part_stays_watertight_at_128_and_256(shared_meshes, monkeypatch):
    """The CAD part had the most holes before (160 boundary edges after convert at 256, 328 after the fit)."""
    gt = normalize(load_mesh(shared_meshes / "closed" / "tm_featuretype.STL"))[0]
    for resolution in (128, 256):
        assert_watertight(gt, resolution, monkeypatch, "featuretype", iterations=STEPS[resolution])


# -- open inputs ------------------------------------------------------------------------------------------------------

OPEN = ("dc_dress_v7k.obj", "dc_skirt7271.obj", "dc_sock1055.obj", "dc_tshirt1900.obj", "dc_wind48x48.obj",
        "ddg_cowhead.obj", "ddg_hemisphere.obj", "gc_moebius.obj")


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [64, 128])
def test_open_meshes_keep_their_boundary_loops_and_components(shared_meshes, resolution):
    """Every open mesh of ../shared/data: as many boundary loops and components as the input, loop for loop (each
    output loop within 2.5 voxels of its input loop), every piece within a voxel of its surface (300,000 samples:
    the t-shirt had a fifth loop at 128 from this sample before ``jump_voxels``). Not yet the dress: at 64 it has 6
    loops (its hem's pleats narrower than a voxel are bridged, its smallest hole, 0.9 voxels across, closes;
    docs/topology.md); at 128 the count is right but not the loops (that hole closes, and a one-quad piece 0.8
    voxels from the surface, sharing its voxels with the sheet, adds a loop and a component)."""
    for name in OPEN:
        gt = normalize(load_mesh(shared_meshes / "open" / name))[0]
        ex = mesh_to_sparseflex(gt, resolution, num_points=POINTS).extract()
        out = Mesh(ex.vertices, ex.faces)
        want, got = topology(gt.vertices, gt.faces), topology(out.vertices, out.faces)
        assert want["boundary_loops"] > 0 and got["nonmanifold_edges"] == 0, name
        if (name, resolution) != ("dc_dress_v7k.obj", 64):
            assert got["boundary_loops"] == want["boundary_loops"], name
        if name != "dc_dress_v7k.obj":
            assert got["components"] == want["components"], name
        if name != "gc_moebius.obj":  # its loop runs along the seam it is cut across, away from the input's boundary
            assert_loops_near_input_boundary(out, gt, resolution)
            if name != "dc_dress_v7k.obj":
                assert_loops_match(out, gt, resolution)
        assert_every_piece_near_input_surface(out, gt, resolution)


@pytest.mark.slow
def test_fit_of_open_meshes_keeps_their_boundary_loops(shared_meshes):
    for name in ("ddg_cowhead.obj", "dc_sock1055.obj", "gc_moebius.obj"):
        gt = normalize(load_mesh(shared_meshes / "open" / name))[0]
        cfg = FitConfig(resolution=64, iterations=8, image_size=64, checkpoint_every=0, lr_sdf=0.1)
        with torch.no_grad():
            ex = Fitter(gt, cfg).run().extract()
        assert loops(Mesh(ex.vertices, ex.faces)) == loops(gt), name


@pytest.mark.slow
def test_moebius_keeps_its_boundary_loop_at_256(shared_meshes):
    """A non-orientable strip: no signed field holds it whole, so the band is cut across it along an orientation
    seam (a strip cut across is a disk: still one boundary loop)."""
    gt = normalize(load_mesh(shared_meshes / "open" / "gc_moebius.obj"))[0]
    ex = mesh_to_sparseflex(gt, 256).extract()
    assert loops(Mesh(ex.vertices, ex.faces)) == loops(gt) == 1


def output_loops(mesh: Mesh) -> list[np.ndarray]:
    """The vertices ``[k, 3]`` of each boundary loop of a mesh (after welding)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from sparseflex.eval.topology import boundary_edges, weld

    b = boundary_edges(weld(mesh.vertices, mesh.faces))
    if not len(b):
        return []
    used, inv = np.unique(b, return_inverse=True)
    inv = inv.reshape(-1, 2)
    n, label = connected_components(coo_matrix((np.ones(len(inv)), (inv[:, 0], inv[:, 1])),
                                               shape=(len(used), len(used))), directed=False)
    v = mesh.vertices.detach().double().numpy()
    return [v[used[label == i]] for i in range(n)]


def boundary_points(mesh: Mesh, spacing: float) -> np.ndarray:
    """Points at most ``spacing`` apart along the boundary edges of a mesh (after welding)."""
    from sparseflex.eval.topology import boundary_edges, weld

    b = boundary_edges(weld(mesh.vertices, mesh.faces))
    v = mesh.vertices.detach().double().numpy()
    a, c = v[b[:, 0]], v[b[:, 1]]
    steps = int(np.ceil(np.linalg.norm(c - a, axis=1).max() / spacing)) + 1
    t = np.linspace(0, 1, steps)[None, :, None]
    return (a[:, None] + t * (c - a)[:, None]).reshape(-1, 3)


def assert_loops_near_input_boundary(out: Mesh, gt: Mesh, resolution: int, within: float = 2.5):
    """Every boundary loop of ``out`` lies within ``within`` voxels of the input's boundary (all of it)."""
    from scipy.spatial import cKDTree

    tree = cKDTree(boundary_points(gt, 0.1 / resolution))
    for loop in output_loops(out):
        far = tree.query(loop)[0].max() * resolution
        assert far <= within, (len(loop), far, (loop.mean(0) + 0.5) * resolution)


def assert_loops_match(out: Mesh, gt: Mesh, resolution: int, within: float = 2.5):
    """Loop for loop: each output loop comes within ``within`` voxels of exactly one input loop, and each input loop
    has exactly one such output loop."""
    from scipy.spatial import cKDTree

    trees = [cKDTree(loop) for loop in output_loops(gt)]
    near = np.array([[t.query(loop)[0].min() * resolution <= within for t in trees] for loop in output_loops(out)])
    assert near.shape[0] == len(trees) and (near.sum(1) == 1).all() and (near.sum(0) == 1).all(), near.astype(int)


def assert_every_piece_near_input_surface(out: Mesh, gt: Mesh, resolution: int, within: float = 1.0):
    """Every connected component of ``out`` comes within ``within`` voxels of the input's surface."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from sparseflex.eval.metrics import SurfaceDistance
    from sparseflex.eval.topology import weld

    f = weld(out.vertices, out.faces)
    n = len(out.vertices)
    _, label = connected_components(coo_matrix((np.ones(2 * len(f)), (np.r_[f[:, 0], f[:, 1]], np.r_[f[:, 1], f[:, 2]])),
                                               shape=(n, n)), directed=False)
    used = np.unique(f)
    dist = SurfaceDistance(gt.vertices, gt.faces).query(out.vertices.detach().double().numpy()[used])[0]
    nearest = np.full(int(label.max()) + 1, np.inf)
    np.minimum.at(nearest, label[used], dist)
    pieces = np.unique(label[used])
    assert (nearest[pieces] * resolution <= within).all(), np.sort(nearest[pieces] * resolution)[-5:]


@pytest.mark.slow
def test_dress_keeps_its_loops_and_stays_one_piece_at_256(shared_meshes):
    """The dress (5 loops, one piece) with the default sample (15.4 million points, about a minute). It gave 6
    loops before ``stray_pieces`` (a two-triangle fragment two voxels past an armhole, made by a crossing of the
    tangent-plane field between two sheets' samples away from the surface, with its 4 voxels in the band), and 5
    loops in 6 pieces with ``jump_voxels`` alone (closed slivers of a folded double layer, up to 8 corners each:
    ``bubbles``). Every loop within 2.5 voxels of the input's boundary, every piece within a voxel of its surface."""
    gt = normalize(load_mesh(shared_meshes / "open" / "dc_dress_v7k.obj"))[0]
    ex = mesh_to_sparseflex(gt, 256).extract()
    out = Mesh(ex.vertices, ex.faces)
    got = topology(out.vertices, out.faces)
    assert (got["boundary_loops"], got["components"], got["nonmanifold_edges"]) == (loops(gt), 1, 0) == (5, 1, 0)
    assert_every_piece_near_input_surface(out, gt, 256)
    assert_loops_near_input_boundary(out, gt, 256)


# -- the repairs of a tangent-plane field (open inputs), one by one ---------------------------------------------------

def open_square(z: float, half: float = 0.3, flip: bool = False) -> Mesh:
    """A square sheet at height ``z`` facing +z (-z with ``flip``): an open surface of one boundary loop."""
    v = torch.tensor([[-half, -half, z], [half, -half, z], [half, half, z], [-half, half, z]])
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    return Mesh(v, f.flip(1) if flip else f)


def field_of(mesh: Mesh, points: int, seed: int = 0):
    from sparseflex.data.sampling import sample_surface
    from sparseflex.fit.convert import CornerField
    from sparseflex.flexicubes.init_sdf import OrientedPoints

    pts, nrm = sample_surface(mesh, points, generator=torch.Generator().manual_seed(seed))[:2]
    return CornerField(mesh, OrientedPoints(pts, nrm), thin_sheets=False, closed=False)


def block(lo, hi, resolution: int, value):
    """A SparseFlex on the voxels ``lo <= (x, y, z) < hi`` whose corner ``c`` (integer, ``[M, 3]``) has SDF
    ``value(c)`` (world units)."""
    from sparseflex.fit.convert import sparseflex_from_values
    from sparseflex.sparse.coords import batched, coords_to_keys, corner_lattice

    axes = [torch.arange(a, b) for a, b in zip(lo, hi)]
    coords = batched(torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3))
    corners, _ = corner_lattice(coords)
    sdf = value(corners[:, 1:]).to(torch.float32)
    return sparseflex_from_values(coords, resolution, coords_to_keys(corners), sdf, torch.zeros(len(sdf), 3))


def test_jump_voxels_are_those_whose_every_crossing_misses_the_surface():
    """A sheet at grid height 8.48; the field crosses zero there (the surface) and again between heights 10 and 11,
    1.5 and 2.5 voxels from it (a jump: no surface can cross an edge whose ends are 4 voxels from it together)."""
    from sparseflex.fit.convert import jump_voxels

    R, z0 = 16, 0.03
    field = field_of(open_square(z0), 4000)
    world = lambda c: c.to(torch.float64) / R - 0.5  # noqa: E731
    sf = block((4, 4, 5), (12, 12, 13), R, lambda c: torch.where(c[:, 2] <= 10, world(c)[:, 2] - z0,
                                                                  z0 - world(c)[:, 2]))
    drop = jump_voxels(sf, field, R)
    z = sf.coords[:, 3]
    assert bool(drop[z == 10].all()) and not bool(drop[z != 10].any())
    # a voxel with one real crossing is kept, whatever else it holds. The sheet at height 8.9, and the corner
    # (7, 7, 8), 0.9 voxels below it, on the wrong side: its edges to its neighbours at height 8 are jumps (0.9 + 0.9
    # voxels from the surface), and so is its edge down to (7, 7, 7); the 4 voxels above it hold the sheet's
    # crossings too, the 4 below only jumps
    z0 = 8.9 / R - 0.5
    field = field_of(open_square(z0), 4000)
    wrong = torch.tensor([7, 7, 8])
    sf = block((4, 4, 6), (12, 12, 11), R, lambda c: torch.where((c == wrong).all(1), 0.9 / R,
                                                                  world(c)[:, 2] - z0))
    drop = jump_voxels(sf, field, R)
    below = ((sf.coords[:, 1:3] >= 6) & (sf.coords[:, 1:3] <= 7)).all(1) & (sf.coords[:, 3] == 7)
    assert torch.equal(drop, below) and int(below.sum()) == 4


def test_bubbles_are_small_closed_sets_of_corners():
    from sparseflex.fit.convert import bubbles

    inside = {(3, 3, 3), (4, 3, 3),                        # two corners: a bubble
              (7, 7, 7),                                    # one corner: a bubble
              *((x, y, 3) for x in range(6, 9) for y in range(6, 9)),  # nine: larger than max_corners
              (0, 5, 5)}                                    # on the block's face: a neighbour is missing

    def value(c):
        out = torch.ones(len(c))
        for p in inside:
            out[(c == torch.tensor(p)).all(1)] = -1.0
        return out

    sf = block((0, 0, 0), (10, 10, 10), 16, value)
    got = {tuple(p) for p in sf.corners[bubbles(sf), 1:].tolist()}
    assert got == {(3, 3, 3), (4, 3, 3), (7, 7, 7)}
    assert {tuple(p) for p in sf.corners[bubbles(sf, max_corners=9), 1:].tolist()} == got | {
        (x, y, 3) for x in range(6, 9) for y in range(6, 9)}


def test_corner_signs_do_not_come_from_the_far_sheet_of_a_thin_plate():
    """Two sheets a hundredth of a voxel apart, facing away from each other (a plate, or a fold of cloth), with a
    sample sparser than that: the sample nearest to a corner is as often on the far sheet, whose plane gives the
    wrong sign at full size. Every corner outside the plate is outside."""
    R, z0 = 32, 0.01
    t = 0.01 / R
    plate = open_square(z0 + t)
    below = open_square(z0, flip=True)
    mesh = Mesh(torch.cat([plate.vertices, below.vertices]), torch.cat([plate.faces, below.faces + 4]))
    field = field_of(mesh, 3000)
    axes = torch.arange(10, 22)
    grid = torch.stack(torch.meshgrid(axes, axes, torch.arange(12, 22), indexing="ij"), -1).reshape(-1, 3)
    pos = grid.to(torch.float32) / R - 0.5
    away = (pos[:, 2] - z0).abs() >= 1.0 / R
    assert bool((field.samples.sdf(pos)[away] < 0).any())  # the nearest sample alone is wrong somewhere
    sdf, _ = field(grid, R)
    assert bool((sdf[away] > 0).all())


# -- the reports ------------------------------------------------------------------------------------------------------

def test_topology_report_names_every_difference():
    closed = normalize(cube())[0]
    opened = Mesh(closed.vertices, closed.faces[2:])  # one face of the cube gone: one boundary loop
    report = topology_report(opened, closed)
    assert report["input"]["watertight"] and not report["output"]["watertight"]
    assert (report["input"]["boundary_loops"], report["output"]["boundary_loops"]) == (0, 1)
    assert len(report["differences"]) == 2  # watertightness and loops; one component each
    assert topology_report(closed, closed)["differences"] == []


def test_convert_and_metrics_report_topology(tmp_path, capsys):
    path = tmp_path / "slab.ply"
    save_mesh(path, genus_three())
    assert main(["convert", str(path), "-o", str(tmp_path / "out.ply"), "--resolution", "64", "--no-metrics"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out)["topology"]
    assert report["input"]["watertight"] and report["output"]["watertight"]
    assert report["output"]["boundary_loops"] == 0 and report["output"]["components"] == 1
    assert report["differences"] == [] and "warning" not in out.err
    sheet = Mesh(torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0.2]]), torch.tensor([[0, 1, 2], [1, 3, 2]]))
    save_mesh(tmp_path / "sheet.ply", sheet)
    assert main(["metrics", str(tmp_path / "sheet.ply"), str(path), "--points", "2000", "--no-ceiling"]) == 0
    report = json.loads(capsys.readouterr().out)["topology"]
    assert not report["prediction"]["watertight"] and report["reference"]["watertight"]
    assert (report["prediction"]["boundary_loops"], report["reference"]["boundary_loops"]) == (1, 0)


def test_fit_writes_topology_and_warns_when_it_differs(tmp_path, capsys):
    """At 16^3 the walls of the thin-walled part (a twentieth of a voxel) come apart in places: the output is still
    watertight, its components are not the input's, metrics.json says so and the command prints one warning."""
    path = tmp_path / "part.ply"
    save_mesh(path, thin_walled_part())
    argv = ["fit", str(path), "-o", str(tmp_path / "fit"), "--resolution", "16", "--iterations", "2",
            "--image-size", "32", "--metrics-points", "2000", "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "fit" / "metrics.json").read_text())["topology"]
    assert report["input"]["watertight"] and report["output"]["watertight"]
    assert report["input"]["components"] == 1 and report["output"]["components"] > 1
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"components: input 1, output {report['output']['components']}" in warnings[0]


def test_close_band_in_chunks_equals_one_pass(shared_meshes, monkeypatch):
    """close_band checks the crossing edges chunk by chunk (to bound its memory at 1024^3); a chunk of 5 edges
    gives the same voxels, corner values and counts as one pass (the dress at 64: voxels added, crossings refused
    next to its boundaries)."""
    import sparseflex.fit.convert as convert_module

    gt = normalize(load_mesh(shared_meshes / "open" / "dc_dress_v7k.obj"))[0]
    results = []
    for chunk in (1 << 21, 5):
        monkeypatch.setattr(convert_module, "_CLOSE_CHUNK", chunk)
        info = {}
        sf = mesh_to_sparseflex(gt, 64, num_points=50_000, info=info)
        results.append((sf, info))
    (a, ia), (b, ib) = results
    assert ia == ib and ia["added"] > 0 and ia["refused"] > 0
    assert torch.equal(a.coords, b.coords) and torch.equal(a.sdf, b.sdf) and torch.equal(a.deform, b.deform)
