"""PreparedDataset and collate: the agreed item/batch layout, DataLoader and DistributedSampler."""

import pytest
import torch
import trimesh
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from sparseflex.data.dataset import PreparedDataset, collate
from sparseflex.data.item import child_masks, dequantize_points, expand_children, quantize_points
from sparseflex.sparse.coords import coords_to_keys, keys_to_coords
from sparseflex.data.prepare import PrepareConfig, prepare_dataset
from sparseflex.errors import InputError, OptionError

POINTS, RES = 1000, 8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    trimesh.creation.icosphere(subdivisions=1).export(src / "a_sphere.obj")
    trimesh.creation.box(extents=(1, 2, 3)).export(src / "b_box.ply")
    trimesh.creation.cylinder(radius=0.5, height=1.0, sections=12).export(src / "c_cylinder.stl")
    trimesh.creation.cone(radius=0.5, height=1.0, sections=12).export(src / "d_cone.off")
    trimesh.creation.capsule(height=1.0, radius=0.3, count=(8, 8)).export(src / "e_capsule.obj")
    out = tmp_path_factory.mktemp("prepared")
    config = PrepareConfig(points=POINTS, resolution=RES, levels=2, views=2, image_size=24, val_fraction=0.3)
    result = prepare_dataset(src, out, config, workers=0, log=lambda _: None)
    assert result.prepared == 5
    return out


def test_item_layout(root):
    ds = PreparedDataset(root, split="all")
    assert len(ds) == 5
    item = ds[1]
    assert item["name"] == "b_box.ply"
    assert item["points"].dtype == torch.float32 and item["points"].shape == (POINTS, 3)
    assert item["normals"].dtype == torch.float32 and item["normals"].shape == (POINTS, 3)
    assert item["points"].abs().max() <= 0.5
    assert item["coords"].dtype == torch.int64 and item["coords"].shape[1] == 3
    assert item["resolution"] == RES and item["levels"] == [16, 32]
    assert [o.dtype for o in item["occupancy"]] == [torch.int64] * 2
    for res, occ in zip(item["levels"], item["occupancy"]):
        assert occ.shape[1] == 3 and occ.min() >= 0 and occ.max() < res
    # a 1 x 2 x 3 box normalised: z spans [-0.5, 0.5], x +-1/6, and its 12 triangles survive
    assert item["faces"].dtype == torch.int64 and item["faces"].shape == (12, 3)
    assert torch.allclose(item["vertices"].amax(0), torch.tensor([1 / 6, 1 / 3, 0.5]), atol=1e-6)
    # box normals are axis-aligned: every normal has one coordinate of magnitude 1
    assert torch.allclose(item["normals"].abs().amax(1), torch.ones(POINTS), atol=1e-3)
    assert "images" not in item


def test_splits_partition(root):
    train, val, everything = (PreparedDataset(root, s) for s in ("train", "val", "all"))
    names = lambda ds: [ds[i]["name"] for i in range(len(ds))]  # noqa: E731
    assert len(val) >= 1 and len(train) >= 1
    assert sorted(names(train) + names(val)) == names(everything)
    with pytest.raises(OptionError):
        PreparedDataset(root, "test")
    with pytest.raises(InputError):
        PreparedDataset(root / "nowhere")


def test_collate(root):
    ds = PreparedDataset(root, "all", with_images=True)
    items = [ds[i] for i in (0, 2, 3)]
    batch = collate(items)
    sizes = [len(it["points"]) for it in items]
    assert batch["points"].shape == (sum(sizes), 3) and batch["normals"].shape == (sum(sizes), 3)
    assert torch.equal(batch["point_batch"], torch.repeat_interleave(torch.arange(3), torch.tensor(sizes)))
    assert batch["coords"].shape == (sum(len(it["coords"]) for it in items), 4)
    for i, it in enumerate(items):
        assert torch.equal(batch["coords"][batch["coords"][:, 0] == i, 1:], it["coords"])
        for level in range(2):
            occ = batch["occupancy"][level]
            assert torch.equal(occ[occ[:, 0] == i, 1:], it["occupancy"][level])
        assert torch.equal(batch["meshes"][i].faces, it["faces"])
    assert batch["names"] == ["a_sphere.obj", "c_cylinder.stl", "d_cone.off"]
    assert batch["resolution"] == RES and batch["levels"] == [16, 32]
    assert batch["images"][0].shape == (2, 24, 24, 4) and batch["cameras"][0].K.shape == (2, 3, 3)


def test_dataloader_with_distributed_sampler(root):
    ds = PreparedDataset(root, "all")
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        loader = DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate)
        names = [n for batch in loader for n in batch["names"]]
        assert len(names) == 3  # 5 items padded to 6, 3 per rank
        seen.append(names)
    everything = {ds[i]["name"] for i in range(len(ds))}
    assert set(seen[0]) | set(seen[1]) == everything
    assert len(set(seen[0]) & set(seen[1])) == 1  # only the padding item repeats


def test_point_quantisation_round_trip():
    p = torch.rand(10000, 3, dtype=torch.float64) - 0.5
    back = dequantize_points(quantize_points(p))
    assert (back.double() - p).abs().max() <= 0.5 / 65535 + 1e-7
    ends = torch.tensor([[-0.5, 0.5, 0.5]])  # the cube faces are exact (0 is not: 65,535 steps)
    assert torch.equal(dequantize_points(quantize_points(ends)), ends.float())


def test_child_masks_round_trip():
    gen = torch.Generator().manual_seed(0)
    parents = keys_to_coords(torch.unique(coords_to_keys(torch.randint(0, 16, (300, 3), generator=gen))))[:, 1:]
    children = parents.repeat_interleave(8, 0) * 2 + torch.tensor([[i & 1, i >> 1 & 1, i >> 2 & 1] for i in range(8)]
                                                                  ).repeat(len(parents), 1)
    children = children[torch.rand(len(children), generator=gen) < 0.3]
    masks = child_masks(parents, children)
    assert masks.dtype.itemsize == 1 and len(masks) == len(parents)
    # bit i of a parent's mask <-> its child at corner offset i (x fastest)
    first = children[0]
    row = int(((parents == first // 2).all(1)).nonzero())
    bit = int(first[0] % 2 + 2 * (first[1] % 2) + 4 * (first[2] % 2))
    assert masks[row] >> bit & 1
    back = expand_children(parents, masks)
    assert torch.equal(back, children[torch.argsort(coords_to_keys(children))])
    assert int(sum(bin(m).count("1") for m in masks.tolist())) == len(children)
