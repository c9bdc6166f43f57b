"""Local PointNet against a per-voxel loop, with the TripoSF key layout and finite differences."""

from pathlib import Path

import pytest
import torch

from sparseflex.errors import InputError, OptionError
from sparseflex.nn import LocalPointNet, local_point_features


pytestmark = pytest.mark.usefixtures("one_thread")


KEYS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "triposf_vae_keys.tsv"


def published(prefix):
    if not KEYS.is_file():
        pytest.skip(f"key list not found at {KEYS}")
    rows = [line.split("\t") for line in KEYS.read_text().splitlines() if line.startswith(prefix)]
    return {k[len(prefix):]: tuple(int(s) for s in shape.strip("[]").split(",")) for k, shape in rows}


def per_voxel_reference(net, feats, index, num_voxels):
    """Run the network on each voxel's points alone, pooling with plain torch reductions."""
    pool = (lambda t: t.mean(0)) if net.pool == "mean" else (lambda t: t.max(0).values)
    out = torch.zeros(num_voxels, net.fc_c.out_features, dtype=feats.dtype)
    for v in range(num_voxels):
        pts = feats[index == v]
        if len(pts) == 0:
            continue
        h = net.fc_pos(pts)
        for i, block in enumerate(net.blocks):
            if i > 0:
                h = torch.cat([h, pool(h).expand_as(h)], dim=1)
            h = block(h)
        out[v] = pool(net.fc_c(h))
    return out


def test_state_dict_matches_triposf_local_pc_encoder():
    shapes = {k: tuple(v.shape) for k, v in LocalPointNet().state_dict().items()}
    assert shapes == published("local_pc_encoder.")


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_equals_per_voxel_loop(pool):
    net = LocalPointNet(hidden=8, out_channels=5, num_blocks=3, pool=pool).double()
    index = torch.randint(0, 6, (40,))
    index[index == 4] = 3  # voxel 4 stays empty
    feats = torch.randn(40, 6, dtype=torch.float64)
    out = net(feats, index, 6)
    assert torch.allclose(out, per_voxel_reference(net, feats, index, 6), atol=1e-12)
    assert torch.equal(out[4], torch.zeros(5, dtype=torch.float64))


def test_point_order_and_other_voxels_do_not_matter():
    net = LocalPointNet(hidden=8, out_channels=4, num_blocks=2).double()
    index = torch.randint(0, 5, (30,))
    feats = torch.randn(30, 6, dtype=torch.float64)
    out = net(feats, index, 5)
    perm = torch.randperm(30)
    assert torch.allclose(net(feats[perm], index[perm], 5), out, atol=1e-12)
    moved = feats.clone()
    moved[index == 2] += 3.0
    changed = net(moved, index, 5)
    keep = torch.arange(5) != 2
    assert torch.allclose(changed[keep], out[keep], atol=1e-12) and not torch.allclose(changed[2], out[2])


def test_gradients_match_finite_differences():
    net = LocalPointNet(hidden=4, out_channels=3, num_blocks=2, pool="mean").double()
    index = torch.tensor([0, 0, 1, 2, 2, 2])
    feats = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: net(f, index, 3), (feats,))
    net.pool = "max"
    assert torch.autograd.gradcheck(lambda f: net(f, index, 3), (feats,))


def test_local_point_features_scale_to_unit_cube_of_the_voxel():
    res = 4
    voxel = torch.tensor([[1, 2, 3], [1, 2, 3], [0, 0, 0]])
    centre = (voxel[0].double() + 0.5) / res - 0.5
    points = torch.stack([centre, centre + 0.5 / res, torch.full((3,), -0.5, dtype=torch.float64)])
    normals = torch.eye(3, dtype=torch.float64)
    feats = local_point_features(points, normals, voxel, res)
    assert torch.allclose(feats[:, :3], torch.tensor([[0.0, 0, 0], [1, 1, 1], [-1, -1, -1]], dtype=torch.float64))
    assert torch.equal(feats[:, 3:], normals)


def test_bad_input():
    with pytest.raises(OptionError):
        LocalPointNet(pool="sum")
    with pytest.raises(InputError):
        LocalPointNet(hidden=4, out_channels=2)(torch.zeros(3, 6), torch.zeros(2, dtype=torch.long), 1)
