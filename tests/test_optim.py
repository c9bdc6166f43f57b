"""Sectional optimiser (issue 20): lazy Adam on the rows of a section equals plainly written references."""

import math

import pytest
import torch

from sparseflex.fit.optim import RowAdam, SectionalAdam
from sparseflex.flexicubes.representation import SparseFlex
from sparseflex.sparse.coords import dilate

B1, B2, EPS = 0.9, 0.999, 1e-8


def torch_adam_reference(params, grads_per_step, rows_per_step, lrs_per_step, frozen=None, eps=EPS):
    """``torch.optim.Adam`` on full-size tensors: a full gradient that is zero outside the step's rows (and on
    frozen rows), every row updated every step. Float64, so it is the reference for float32 RowAdam."""
    ref = [p.clone().double().requires_grad_(True) for p in params]
    opt = torch.optim.Adam([{"params": [p], "lr": 0.0} for p in ref], eps=eps, foreach=False)
    values = []  # what a loss reads at each step: the parameters before it
    for grads, rows, lrs in zip(grads_per_step, rows_per_step, lrs_per_step):
        values.append([p.detach().clone() for p in ref])
        for i, (p, g, r) in enumerate(zip(ref, grads, rows)):
            full = torch.zeros_like(p)
            full[r] = g.double()
            if frozen is not None and frozen[i] is not None:
                full[frozen[i]] = 0
            p.grad = full
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        opt.step()
    return [p.detach() for p in ref], values


def random_problem(seed=0, steps=12, n=(50, 40), gap=None):
    """Random sections (the last 4 rows of each tensor never in one), gradients and per-step rates (a schedule).
    ``gap``: (first, last) steps between which no row of the first tensor is gathered."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n[0], generator=g), torch.randn(n[1], 3, generator=g)]
    rows, grads, lrs = [], [], []
    for t in range(steps):
        r = [torch.randperm(k - 4, generator=g)[: int(torch.randint(1, k - 4, (), generator=g))].sort().values
             for k in n]
        if gap is not None and gap[0] <= t < gap[1]:
            r[0] = r[0][:0]
        rows.append(r)
        grads.append([torch.randn(len(r[0]), generator=g), torch.randn(len(r[1]), 3, generator=g)])
        lrs.append([0.01 * (1 + math.cos(t)) + 1e-3, 0.003 * (1 + t / steps)])
    return params, rows, grads, lrs


def run_row_adam(params, rows_per_step, grads_per_step, lrs_per_step, seen=None, **kw):
    """RowAdam over the sections; ``seen`` collects the gathered leaves' values (what a loss reads)."""
    params = [p.clone() for p in params]
    opt = RowAdam([{"params": [p], "lr": 0.0} for p in params], **kw)
    for rows, grads, lrs in zip(rows_per_step, grads_per_step, lrs_per_step):
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        leaves = opt.gather(rows)
        if seen is not None:
            seen.append([leaf.detach().clone() for leaf in leaves])
        for leaf, g in zip(leaves, grads):
            leaf.grad = g.clone()
        opt.step()
    return params, opt


def test_row_adam_is_torch_adam_over_a_sequence_of_sections():
    """Every gathered row holds exactly what full-size Adam (zero gradient outside the section, a learning-rate
    schedule) gives it at that step, and after ``sync`` every row is Adam's."""
    params, rows, grads, lrs = random_problem()
    seen = []
    got, opt = run_row_adam(params, rows, grads, lrs, seen=seen)
    want, values = torch_adam_reference(params, grads, rows, lrs)
    for step_seen, step_values, step_rows in zip(seen, values, rows):
        for leaf, full, r in zip(step_seen, step_values, step_rows):
            torch.testing.assert_close(leaf.double(), full[r], rtol=0, atol=2e-6)
    behind = [(last < opt.steps).sum() for last in opt.last.values()]
    assert min(behind) > 0  # some rows were left out of the last step: they are not up to date yet
    opt.sync()
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-6)
    assert all(bool((last == opt.steps).all()) for last in opt.last.values())


def test_rows_left_out_longer_than_momentum_lasts():
    """A tensor none of whose rows is gathered for 1085 steps (past COAST_STEPS, and across the step where the rate
    history is trimmed) comes back as Adam's."""
    params, rows, grads, lrs = random_problem(seed=7, steps=1100, n=(12, 10), gap=(5, 1090))
    got, opt = run_row_adam(params, rows, grads, lrs)
    opt.sync()
    want, _ = torch_adam_reference(params, grads, rows, lrs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-5)


def test_row_adam_with_every_row_is_torch_adam():
    params, _, _, _ = random_problem(seed=2)
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(10)]
    rows = [[torch.arange(len(p)) for p in params] for _ in range(10)]
    got, _ = run_row_adam(params, rows, grads, [[0.02, 0.005]] * 10)
    ref = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.Adam([{"params": [ref[0]], "lr": 0.02}, {"params": [ref[1]], "lr": 0.005}], foreach=False)
    for step in grads:
        for p, gi in zip(ref, step):
            p.grad = gi.clone()
        opt.step()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)


def test_frozen_rows_count_as_zero_gradient_and_never_move():
    params, rows, grads, lrs = random_problem(seed=4)
    frozen0 = torch.zeros(len(params[0]), dtype=torch.bool)
    frozen0[::3] = True
    work = [p.clone() for p in params]
    opt = RowAdam([{"params": [work[0]], "lr": 0.0}, {"params": [work[1]], "lr": 0.0}],
                  frozen={id(work[0]): frozen0})
    for r, g, lr in zip(rows, grads, lrs):
        for group, x in zip(opt.param_groups, lr):
            group["lr"] = x
        for leaf, gi in zip(opt.gather(r), g):
            leaf.grad = gi.clone()
        opt.step()
    opt.sync()
    want, _ = torch_adam_reference(params, grads, rows, lrs, frozen=[frozen0, None])
    for a, b in zip(work, want):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-6)
    assert torch.equal(work[0][frozen0], params[0][frozen0])


def test_bfloat16_moments_halve_the_state_and_stay_close():
    params, rows, grads, _ = random_problem(seed=5)
    lrs = [[0.01, 0.01]] * len(rows)
    exact, opt32 = run_row_adam(params, rows, grads, lrs)
    compact, opt16 = run_row_adam(params, rows, grads, lrs, moment_dtype="bfloat16")
    assert opt16.moment_bytes() * 2 == opt32.moment_bytes()
    opt32.sync()
    opt16.sync()
    for a, b in zip(compact, exact):
        torch.testing.assert_close(a, b, rtol=0, atol=0.01 * 0.05)  # within 5 % of one step's size


def small_sparseflex(seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = dilate(torch.tensor([[0, 4, 4, 4], [0, 5, 4, 4], [0, 9, 9, 9]]), 1)
    sf = SparseFlex.from_sdf(coords, 16, lambda p: p.norm(dim=1) - 0.2)
    for name in ("deform", "alpha_raw", "beta_raw", "gamma_raw"):
        getattr(sf, name).copy_(0.3 * torch.randn(getattr(sf, name).shape, generator=g))
    return sf


def section_loss(sub: SparseFlex) -> torch.Tensor:
    pos = sub.corner_positions()
    return ((sub.sdf * pos[:, 0]).sum() + (pos ** 2).sum() + sub.alpha_raw.sin().sum()
            + (sub.beta_raw ** 3).sum() + sub.gamma_raw.cos().sum())


def test_sectional_adam_on_a_sparseflex_is_the_full_size_adam():
    """The fitter's two paths side by side: full-size parameters, a differentiable ``select`` and torch.optim.Adam
    (pinned corners' gradients zeroed), against SectionalAdam's leaves. Each step's leaves hold the full path's
    values and receive its gradients' rows (zero elsewhere); after ``sync`` the parameters agree."""
    sf = small_sparseflex()
    names = ("sdf", "deform", "alpha_raw", "beta_raw", "gamma_raw")
    full = [getattr(sf, k).clone().requires_grad_(True) for k in names]
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(sf.num_voxels, generator=g) < 0.4 for _ in range(8)]
    pinned = torch.zeros(len(sf.corners), dtype=torch.bool)
    pinned[::5] = True
    lrs = (0.01, 0.02, 0.03)
    adam = torch.optim.Adam([{"params": [full[0]], "lr": lrs[0]}, {"params": [full[1]], "lr": lrs[1]},
                             {"params": full[2:], "lr": lrs[2]}], foreach=False)
    opt = SectionalAdam(sf, lrs, pinned=pinned)
    start_sdf = sf.sdf.clone()
    for mask in masks:
        adam.zero_grad()
        section_loss(SparseFlex(sf.coords, sf.resolution, sf.corners, sf.voxel_corners, *full).select(mask)).backward()
        full[0].grad[pinned] = 0
        full[1].grad[pinned] = 0
        sub = opt.select(mask)
        idx, used, _ = sf.section_rows(mask)
        for f, leaf, r in zip(full, (sub.sdf, sub.deform, sub.alpha_raw, sub.beta_raw, sub.gamma_raw),
                              [used, used, idx, idx, idx]):
            torch.testing.assert_close(leaf.detach(), f.detach()[r], rtol=0, atol=1e-5)  # the values it reads
        section_loss(sub).backward()
        for f, leaf, r in zip(full, (sub.sdf, sub.deform, sub.alpha_raw, sub.beta_raw, sub.gamma_raw),
                              [used, used, idx, idx, idx]):
            outside = torch.ones(len(f), dtype=torch.bool)
            outside[r] = False
            assert not f.grad[outside].any()
            free = ~pinned[r] if len(f) == len(pinned) else torch.ones(len(r), dtype=torch.bool)
            torch.testing.assert_close(leaf.grad[free], f.grad[r][free], rtol=1e-4, atol=1e-5)
        adam.step()
        opt.step()
    opt.sync()
    for k, f in zip(names, full):
        torch.testing.assert_close(getattr(sf, k), f.detach(), rtol=0, atol=1e-5)
    assert torch.equal(sf.sdf[pinned], start_sdf[pinned])
    assert not sf.sdf.requires_grad  # no full-size gradient anywhere
    assert sorted(opt.last) == [0, 1]  # one record per row space: corners, voxels


def test_state_dict_round_trip_and_torch_adam_state():
    params, rows, grads, _ = random_problem(seed=6)
    half = len(rows) // 2
    _, opt = run_row_adam(params, rows[:half], grads[:half], [[0.01, 0.01]] * half)
    state = opt.state_dict()  # brings every row up to date first
    a = [p.clone() for p in opt.params]
    resumed = RowAdam([{"params": [a[0]], "lr": 0.0}, {"params": [a[1]], "lr": 0.0}])
    resumed.load_state_dict(state)
    for r, g in zip(rows[half:], grads[half:]):
        for o in (opt, resumed):
            for leaf, gi in zip(o.gather(r), g):
                leaf.grad = gi.clone()
            o.step()
    for x, y in zip(opt.params, resumed.params):
        assert torch.equal(x, y)
    # a torch.optim.Adam state over the same parameters carries its moments and step
    ref = [p.clone().requires_grad_(True) for p in params]
    adam = torch.optim.Adam([{"params": [ref[0]], "lr": 0.01}, {"params": [ref[1]], "lr": 0.02}])
    for p in ref:
        p.grad = torch.ones_like(p)
    adam.step()
    adam.step()
    conv = RowAdam([{"params": [params[0].clone()], "lr": 0}, {"params": [params[1].clone()], "lr": 0}])
    conv.load_state_dict(adam.state_dict())
    assert conv.steps == 2 and [g["lr"] for g in conv.param_groups] == [0.01, 0.02]
    torch.testing.assert_close(conv.moments[1][0], adam.state[ref[1]]["exp_avg"])
    with pytest.raises(ValueError):
        RowAdam([{"params": [torch.zeros(3)], "lr": 0}], moment_dtype="int8")
