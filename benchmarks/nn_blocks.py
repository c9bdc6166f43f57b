"""Sparse building blocks: forward + backward time at ~200k surface voxels beside their dense equivalents.

The voxels are a real mesh's surface band (dense surface samples rounded to the grid, resolution chosen for about
``--voxels`` voxels). Every dense baseline is measured in the same run: Conv3d / pooling on the bounding grid (on a
crop of it, scaled by volume, when the whole grid would not fit in memory), SDPA on the same number of tokens. A
second table sweeps the occupancy of a 64^3 grid to find where sparse convolution stops beating Conv3d.

    python benchmarks/nn_blocks.py [--mesh PATH] [--voxels 200000] [--repeat 2] [--quick]
                                   [--attention auto|buckets|pow2] [--only window,block,...]

``--attention`` forces the layout of the attention rows (see :mod:`sparseflex.nn.attention`; ``auto`` is ``buckets``
on the CPU); ``--only`` keeps some rows: conv, window, module, block, full, cross, norm, resample, pointnet, sweep.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import trimesh

from sparseflex.nn import attention as attention_layouts
from sparseflex.nn import (LocalPointNet, SparseConv3d, SparseCrossAttention, SparseFullSelfAttention,
                           SparseGroupNorm, SparseTensor, SparseTransformerBlock, SparseWindowSelfAttention, conv_plan,
                           sparse_downsample, sparse_subdivide, window_ids, window_plan)
from sparseflex.sparse import dense_grid, unique_coords

DEFAULT_MESH = Path(__file__).resolve().parents[2] / "shared" / "data" / "meshes" / "closed" / "ddg_gargoyle.obj"
DENSE_CROP = 48  # side of the dense crop timed when the bounding grid is too large


def surface_voxels(mesh_path: Path | None, target: int) -> tuple[torch.Tensor, str]:
    """Surface-band voxels of a mesh (or of a sphere if no mesh), at the resolution giving about ``target`` voxels."""
    if mesh_path is not None and mesh_path.is_file():
        mesh = trimesh.load(mesh_path, force="mesh")
        mesh.apply_translation(-mesh.bounds.mean(0))
        mesh.apply_scale(1.0 / mesh.extents.max())

        def voxelise(res):
            pts, _ = trimesh.sample.sample_surface(mesh, 40 * res * res, seed=0)
            c = torch.from_numpy((pts + 0.5) * res).floor().long().clamp(0, res - 1)
            return unique_coords(c)[0]
        name = mesh_path.name
    else:
        def voxelise(res):
            g = dense_grid(res)
            r = ((g[:, 1:].double() + 0.5) - res / 2).norm(dim=1)
            return g[(r - 0.45 * res).abs() < 1.0]
        name = "sphere shell"
    res = 128
    for _ in range(2):  # the count grows as res^2: two corrections land within a few per cent
        res = max(16, round(res * (target / len(voxelise(res))) ** 0.5))
    coords = voxelise(res)
    return coords, f"{name} at {res}^3"


CLOCK = time.perf_counter


def timed(fn, repeat: int) -> float:
    """Best time over ``repeat`` runs after a warm-up (least disturbed by other work on a shared machine)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = CLOCK()
        fn()
        best = min(best, CLOCK() - start)
    return best


def fwd_bwd(fn, *inputs):
    """A closure running ``fn(*inputs)`` and a backward pass into the inputs and parameters."""
    def run():
        xs = [t.detach().requires_grad_() for t in inputs]
        out = fn(*xs)
        out.backward(torch.ones_like(out) / out.numel())
    return run


def row(name, config, sparse_s, dense_s, note=""):
    ratio = f"{sparse_s / dense_s:6.2f}x" if dense_s else "     -"
    dense = f"{dense_s:9.3f}" if dense_s else "        -"
    print(f"{name:<26} {config:<34} {sparse_s:9.3f} {dense} {ratio}  {note}")


def bounding_grid(coords):
    lo = coords[:, 1:].min(0).values
    return coords[:, 1:] - lo, (coords[:, 1:].max(0).values - lo + 1).tolist()


def dense_scaled(fn_on_side, side_full, crop=DENSE_CROP, repeat=1):
    """Time ``fn_on_side(side)`` on the whole grid if small, else on a crop scaled by volume; returns (s, note)."""
    volume = side_full[0] * side_full[1] * side_full[2]
    if volume <= crop ** 3 * 1.5:
        return timed(fn_on_side(tuple(side_full)), repeat), "dense on the whole bounding grid"
    t = timed(fn_on_side((crop, crop, crop)), repeat)
    return t * volume / crop ** 3, f"dense timed on a {crop}^3 crop x {volume / crop ** 3:.0f} (volume ratio)"


def bench_conv(x, side, channels, repeat):
    n = len(x)
    layer = SparseConv3d(channels, channels)
    feats = torch.randn(n, channels)
    sparse = timed(fwd_bwd(lambda f: layer(x.replace(f)).feats, feats), repeat)
    w = layer.weight.detach().permute(0, 4, 1, 2, 3).contiguous().requires_grad_()

    def dense_fn(s):
        return fwd_bwd(lambda d: F.conv3d(d, w, padding=1), torch.randn(1, channels, *s))
    dense, note = dense_scaled(dense_fn, side)
    occ = n / (side[0] * side[1] * side[2])
    row("SparseConv3d 3^3", f"C={channels} occ={100 * occ:.1f}%", sparse, dense, note)


def bench_window_attention(x, channels, heads, repeat):
    n = len(x)
    d = channels // heads
    plan = window_plan(x, 8, 0)
    qkv = torch.randn(n, 3, heads, d)  # the fused projection's layout, as the attention layers use it
    sparse = timed(fwd_bwd(plan.attend_packed, qkv), repeat)
    # dense SDPA on the same tokens: equal windows whose length gives the same attention FLOPs (sum L_i^2 / N)
    win_len = _window_lengths(x)
    l_eq = max(1, round(float((win_len.double() ** 2).sum() / n)))

    def dense_sdpa(length):
        m = n // length
        return fwd_bwd(lambda t: F.scaled_dot_product_attention(
            *t[:m * length].view(m, length, 3, heads, d).permute(2, 0, 3, 1, 4)), qkv)
    dense_eq = timed(dense_sdpa(l_eq), repeat)
    dense_512 = timed(dense_sdpa(512), repeat)
    pow2 = plan.layout(attention_layouts.POW2_GRANULARITY)
    note = (f"{len(win_len)} windows, mean {win_len.double().mean():.0f} voxels; {len(plan.buckets)} buckets, "
            f"padding {100 * (len(plan.index) / n - 1):.1f}% (pow2 layout: {len(pow2.buckets)} buckets, "
            f"padding {100 * (len(pow2.index) / n - 1):.1f}%)")
    row("window attention core", f"C={channels} H={heads}, vs SDPA L={l_eq}", sparse, dense_eq, note)
    row("window attention core", f"C={channels} H={heads}, vs full 8^3 windows", sparse, dense_512,
        "dense grid equivalent: N/512 windows of 512")


def _window_lengths(x, shift=0):
    keys = torch.sort(window_ids(x.coords, 8, shift)).values
    return torch.unique_consecutive(keys, return_counts=True)[1]


def bench_window_module(x, channels, heads, repeat):
    n = len(x)
    layer = SparseWindowSelfAttention(channels, heads, 8, 4)
    feats = torch.randn(n, channels)
    window_plan(x, 8, 4)
    sparse = timed(fwd_bwd(lambda f: layer(x.replace(f)).feats, feats), repeat)
    l_eq = max(1, round(float((_window_lengths(x, 4).double() ** 2).sum() / n)))
    m = n // l_eq

    def dense(f):
        qkv = layer.to_qkv(f[:m * l_eq]).view(m, l_eq, 3, heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return layer.to_out(o.transpose(1, 2).reshape(m * l_eq, channels))
    row("SparseWindowSelfAttention", f"C={channels} H={heads} shift 4", sparse, timed(fwd_bwd(dense, feats), repeat),
        f"with projections; dense = same layer on equal windows of {l_eq}")


def bench_block(x, channels, heads, repeat):
    n = len(x)
    block = SparseTransformerBlock(channels, heads, shift=4)
    feats = torch.randn(n, channels)
    window_plan(x, 8, 4)
    sparse = timed(fwd_bwd(lambda f: block(x.replace(f)).feats, feats), repeat)
    l_eq = max(1, round(float((_window_lengths(x, 4).double() ** 2).sum() / n)))
    m = n // l_eq

    def dense(f):
        f = f[:m * l_eq]
        h = F.layer_norm(f, (channels,), eps=1e-6)
        qkv = block.attn.to_qkv(h).view(m, l_eq, 3, heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2).reshape(m * l_eq, channels)
        f = f + block.attn.to_out(o)
        return f + block.mlp.mlp(F.layer_norm(f, (channels,), eps=1e-6))
    row("SparseTransformerBlock", f"C={channels} H={heads} window 8 shift 4", sparse,
        timed(fwd_bwd(dense, feats), repeat), f"dense = same block, SDPA on equal windows of {l_eq}")
    block.use_checkpoint = True
    ck = timed(fwd_bwd(lambda f: block(x.replace(f)).feats, feats), repeat)
    row("  + activation checkpoint", f"C={channels} H={heads}", ck, sparse, "ratio to the block without checkpointing")


def bench_full_attention(channels, heads, repeat, samples=4, tokens=2048):
    # O(n^2) per sample: 200k tokens would be hours on this CPU, so a batch of smaller samples
    lens = torch.tensor([tokens - 300, tokens + 100, tokens + 300, tokens - 100])[:samples]
    coords = torch.cat([torch.stack([torch.full((n,), b), torch.arange(n), torch.zeros(n, dtype=torch.long),
                                     torch.zeros(n, dtype=torch.long)], 1) for b, n in enumerate(lens.tolist())])
    x = SparseTensor(coords, torch.zeros(len(coords), 1))
    layer = SparseFullSelfAttention(channels, heads)
    feats = torch.randn(len(x), channels)
    sparse = timed(fwd_bwd(lambda f: layer(x.replace(f)).feats, feats), repeat)
    length = int(lens.double().square().sum().div(lens.sum()).round())  # equal attention FLOPs
    m = len(x) // length

    def dense(f):
        qkv = layer.to_qkv(f[:m * length]).view(m, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return layer.to_out(o.transpose(1, 2).reshape(m * length, channels))
    row("SparseFullSelfAttention", f"C={channels} {samples} samples ~{tokens} tok", sparse,
        timed(fwd_bwd(dense, feats), repeat), "scaled down (quadratic); dense = equal-length samples")


def bench_cross_attention(x, channels, heads, repeat, context_len=1024, queries=50_000):
    sub = x.select(torch.arange(min(queries, len(x))))
    layer = SparseCrossAttention(channels, channels, heads)
    feats = torch.randn(len(sub), channels)
    context = torch.randn(1, context_len, channels)
    sparse = timed(fwd_bwd(lambda f, c: layer(sub.replace(f), c).feats, feats, context), repeat)

    def dense(f, c):
        q = layer.to_q(f).view(1, len(f), heads, -1).transpose(1, 2)
        kv = layer.to_kv(c).view(1, context_len, 2, heads, -1).permute(2, 0, 3, 1, 4)
        return layer.to_out(F.scaled_dot_product_attention(q, kv[0], kv[1]).transpose(1, 2).reshape(len(f), channels))
    row("SparseCrossAttention", f"C={channels} {len(sub)} q x {context_len} ctx", sparse,
        timed(fwd_bwd(dense, feats, context), repeat), "scaled down queries; dense = one SDPA")


def bench_group_norm(x, channels, repeat):
    gn = SparseGroupNorm(32, channels)
    feats = torch.randn(len(x), channels)
    sparse = timed(fwd_bwd(lambda f: gn(x.replace(f)).feats, feats), repeat)
    dense = timed(fwd_bwd(lambda f: F.group_norm(f.t()[None], 32, gn.weight, gn.bias), feats), repeat)
    row("SparseGroupNorm(32)", f"C={channels}", sparse, dense, "dense = torch group_norm on [1, C, N]")


def bench_resample(x, side, channels, repeat):
    feats = torch.randn(len(x), channels)
    sub = timed(fwd_bwd(lambda f: sparse_subdivide(x.replace(f)).feats, feats), repeat)
    dense, note = dense_scaled(lambda s: fwd_bwd(lambda d: F.interpolate(d, scale_factor=2, mode="nearest"),
                                                 torch.randn(1, channels, *s)), side)
    row("sparse_subdivide", f"C={channels}", sub, dense, "dense = nearest x2 upsampling; " + note)
    down = timed(fwd_bwd(lambda f: sparse_downsample(x.replace(f), 2).feats, feats), repeat)
    dense, note = dense_scaled(lambda s: fwd_bwd(lambda d: F.avg_pool3d(d, 2), torch.randn(1, channels, *s)), side)
    row("sparse_downsample (mean)", f"C={channels}", down, dense, "dense = avg_pool3d; " + note)


def bench_pointnet(n_voxels, repeat, points_per_voxel=2, hidden=128):
    n_points = n_voxels * points_per_voxel
    net = LocalPointNet(hidden=hidden, out_channels=2 * hidden)
    index = torch.randint(0, n_voxels, (n_points,))
    feats = torch.rand(n_points, 6) * 2 - 1
    sparse = timed(fwd_bwd(lambda f: net(f, index, n_voxels), feats), repeat)

    def no_pool(f):  # the same layers with the per-voxel pooling replaced by the point's own feature
        h = net.fc_pos(f)
        for i, block in enumerate(net.blocks):
            h = block(torch.cat([h, h], 1) if i else h)
        return net.fc_c(h)
    row("LocalPointNet", f"hidden {hidden}, {n_points} pts", sparse, timed(fwd_bwd(no_pool, feats), repeat),
        "scaled down from hidden 256 / 819k points; dense = same MLP without pooling")


def occupancy_sweep(channels, repeat, side=64):
    print(f"\nSparseConv3d 3^3 vs Conv3d on a {side}^3 grid, C={channels}, forward+backward (s):")
    print(f"{'layout':<22} {'occupancy':>9} {'sparse':>9} {'dense':>9} {'ratio':>7}")
    grid = dense_grid(side)
    w = torch.randn(channels, channels, 3, 3, 3).requires_grad_()
    dense = timed(fwd_bwd(lambda d: F.conv3d(d, w, padding=1), torch.randn(1, channels, side, side, side)), repeat)
    centre = (grid[:, 1:].double() + 0.5 - side / 2)
    layouts = [("random", p, grid[torch.rand(len(grid)) < p]) for p in (0.01, 0.05, 0.10, 0.20, 0.40)]
    for p in (0.05, 0.10):  # a solid ball: every neighbour active, the worst case for a given occupancy
        radius = (3 * p * side ** 3 / (4 * torch.pi)) ** (1 / 3)
        layouts.append(("solid ball", p, grid[centre.norm(dim=1) < radius]))
    radius = 0.4 * side
    layouts.append(("sphere shell", None, grid[(centre.norm(dim=1) - radius).abs() < 1.0]))
    for name, _, coords in layouts:
        x = SparseTensor(coords, torch.zeros(len(coords), 1))
        layer = SparseConv3d(channels, channels)
        feats = torch.randn(len(x), channels)
        layer(x.replace(feats))
        sparse = timed(fwd_bwd(lambda f: layer(x.replace(f)).feats, feats), repeat)
        print(f"{name:<22} {100 * len(x) / side ** 3:8.1f}% {sparse:9.3f} {dense:9.3f} {sparse / dense:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", type=Path, default=DEFAULT_MESH)
    parser.add_argument("--voxels", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; with 1 (default) the figures are process CPU time, else wall time")
    parser.add_argument("--quick", action="store_true", help="64 channels only, skip the 256-channel rows")
    parser.add_argument("--attention", default="auto", choices=attention_layouts.BACKENDS[:3],
                        help="layout of the attention rows (auto: buckets on the CPU)")
    parser.add_argument("--only", default="", help="comma-separated rows to run (default: all)")
    args = parser.parse_args()
    attention_layouts.set_attention_backend(args.attention)
    only = set(filter(None, args.only.split(",")))
    keep = lambda name: not only or name in only  # noqa: E731
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.threads == 1 else time.perf_counter

    coords, name = surface_voxels(args.mesh, args.voxels)
    x = SparseTensor(coords, torch.zeros(len(coords), 1))
    rel, side = bounding_grid(coords)
    clock = "process CPU time" if args.threads == 1 else "wall time"
    print(f"{len(x)} voxels: {name}, bounding grid {side[0]}x{side[1]}x{side[2]}, torch {torch.__version__}, "
          f"{args.threads} thread(s), {clock}; forward+backward, best of {args.repeat}; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if args.threads == 1:
        print("(one thread by default: on a shared, oversubscribed machine multi-threaded timings of the many small "
              "ops of sparse code measure thread scheduling, not the code; use --threads 2 for wall time)")
    print(f"{'block':<26} {'config':<34} {'sparse s':>9} {'dense s':>9} {'ratio':>7}")
    wide = [64] if args.quick else [64, 256]
    if keep("conv"):
        start = time.perf_counter()
        conv_plan(x, 3)
        print(f"{'  neighbour pairs (once)':<26} {'cached per coordinate set':<34} {time.perf_counter() - start:9.3f}")
        for c in wide:
            bench_conv(x, side, c, args.repeat)
    if keep("window"):
        start = time.perf_counter()
        window_plan(x, 8, 0).buckets  # the sort and the padded layout
        print(f"{'  window plan (once)':<26} {'cached per coordinate set':<34} {time.perf_counter() - start:9.3f}")
        for c, h in ([(64, 1)] if args.quick else [(64, 1), (256, 4)]):
            bench_window_attention(x, c, h, args.repeat)
    if keep("module"):
        bench_window_module(x, 128, 2, args.repeat)
    if keep("block"):
        bench_block(x, 128, 2, args.repeat)
    if keep("full"):
        bench_full_attention(128, 2, args.repeat)
    if keep("cross"):
        bench_cross_attention(x, 128, 2, args.repeat)
    if keep("norm"):
        for c in wide:
            bench_group_norm(x, c, args.repeat)
    if keep("resample"):
        bench_resample(x, side, 64, args.repeat)
    if keep("pointnet"):
        bench_pointnet(25_000, args.repeat)
    if keep("sweep"):
        occupancy_sweep(32, args.repeat)


if __name__ == "__main__":
    main()
