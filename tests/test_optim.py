"""Sectional optimiser (issue 20): lazy Adam on the rows of a section equals plainly written references."""

import math

import pytest
import torch

from sparseflex.fit.optim import RowAdam, SectionalAdam
from sparseflex.flexicubes.representation import SparseFlex
from sparseflex.sparse.coords import dilate

B1, B2, EPS = 0.9, 0.999, 1e-8


def reference_lazy_adam(params, grads_per_step, rows_per_step, lrs, eps=EPS, frozen=None):
    """The documented rule on full-size tensors: a full gradient (zero outside the rows), moments and parameters
    updated on the step's rows only, bias correction from the global step count."""
    params = [p.clone().double() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, (grads, rows) in enumerate(zip(grads_per_step, rows_per_step), start=1):
        for i, (p, g, r) in enumerate(zip(params, grads, rows)):
            full = torch.zeros_like(p)
            full[r] = g.double()
            if frozen is not None and frozen[i] is not None:
                full[frozen[i]] = 0
            sel = torch.zeros(len(p), dtype=torch.bool)
            sel[r] = True
            m_new = B1 * m[i] + (1 - B1) * full
            v_new = B2 * v[i] + (1 - B2) * full * full
            step = lrs[i] / (1 - B1 ** t) * m_new / (v_new.sqrt() / math.sqrt(1 - B2 ** t) + eps)
            shape = (-1,) + (1,) * (p.dim() - 1)
            m[i] = torch.where(sel.reshape(shape), m_new, m[i])
            v[i] = torch.where(sel.reshape(shape), v_new, v[i])
            params[i] = torch.where(sel.reshape(shape), p - step, p)
    return params


def random_problem(seed=0, steps=12, n=(50, 40)):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n[0], generator=g), torch.randn(n[1], 3, generator=g)]
    rows, grads = [], []
    for _ in range(steps):
        # the last 4 rows of each tensor are never in a section
        r = [torch.randperm(k - 4, generator=g)[: int(torch.randint(1, k - 4, (), generator=g))].sort().values
             for k in n]
        rows.append(r)
        grads.append([torch.randn(len(r[0]), generator=g), torch.randn(len(r[1]), 3, generator=g)])
    return params, rows, grads


def run_row_adam(params, rows_per_step, grads_per_step, lrs, **kw):
    params = [p.clone() for p in params]
    opt = RowAdam([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], **kw)
    for rows, grads in zip(rows_per_step, grads_per_step):
        leaves = opt.gather(rows)
        for leaf, g in zip(leaves, grads):
            leaf.grad = g.clone()
        opt.step()
    return params, opt


def test_row_adam_equals_the_documented_rule_over_a_sequence_of_sections():
    params, rows, grads = random_problem()
    lrs = [0.01, 0.003]
    got, _ = run_row_adam(params, rows, grads, lrs)
    want = reference_lazy_adam(params, grads, rows, lrs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-6)
    # rows never in any section did not move
    seen = torch.zeros(len(params[0]), dtype=torch.bool)
    for r in rows:
        seen[r[0]] = True
    assert 0 < (~seen).sum() and torch.equal(got[0][~seen], params[0][~seen])


def test_row_adam_equals_torch_sparse_adam():
    """torch.optim.SparseAdam is the same lazy rule (it adds eps before the bias correction; tiny eps hides that)."""
    params, rows, grads = random_problem(seed=1)
    got, _ = run_row_adam(params, rows, grads, [0.01, 0.01], eps=1e-14)
    ref = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.SparseAdam(ref, lr=0.01, eps=1e-14)
    for r, g in zip(rows, grads):
        for p, ri, gi in zip(ref, r, g):
            p.grad = torch.sparse_coo_tensor(ri[None], gi, p.shape)
        opt.step()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=2e-6)


def test_row_adam_with_every_row_is_torch_adam():
    params, _, _ = random_problem(seed=2)
    g = torch.Generator().manual_seed(3)
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(10)]
    rows = [[torch.arange(len(p)) for p in params] for _ in range(10)]
    got, _ = run_row_adam(params, rows, grads, [0.02, 0.005])
    ref = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.Adam([{"params": [ref[0]], "lr": 0.02}, {"params": [ref[1]], "lr": 0.005}], foreach=False)
    for step in grads:
        for p, gi in zip(ref, step):
            p.grad = gi.clone()
        opt.step()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)


def test_frozen_rows_count_as_zero_gradient_and_never_move():
    params, rows, grads = random_problem(seed=4)
    frozen0 = torch.zeros(len(params[0]), dtype=torch.bool)
    frozen0[::3] = True
    work = [p.clone() for p in params]
    opt = RowAdam([{"params": [work[0]], "lr": 0.01}, {"params": [work[1]], "lr": 0.01}],
                  frozen={id(work[0]): frozen0})
    for r, g in zip(rows, grads):
        for leaf, gi in zip(opt.gather(r), g):
            leaf.grad = gi.clone()
        opt.step()
    want = reference_lazy_adam(params, grads, rows, [0.01, 0.01], frozen=[frozen0, None])
    for a, b in zip(work, want):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=2e-6)
    assert torch.equal(work[0][frozen0], params[0][frozen0])


def test_bfloat16_moments_halve_the_state_and_stay_close():
    params, rows, grads = random_problem(seed=5)
    exact, opt32 = run_row_adam(params, rows, grads, [0.01, 0.01])
    compact, opt16 = run_row_adam(params, rows, grads, [0.01, 0.01], moment_dtype="bfloat16")
    assert opt16.moment_bytes() * 2 == opt32.moment_bytes()
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


def test_sectional_adam_on_a_sparseflex_equals_full_gradients_and_the_reference():
    """Gradients through the section's leaves are the rows of the full-size gradient (which is zero elsewhere), and
    the updates follow the rule over a sequence of sections."""
    sf = small_sparseflex()
    names = ("sdf", "deform", "alpha_raw", "beta_raw", "gamma_raw")
    start = [getattr(sf, k).clone() for k in names]
    g = torch.Generator().manual_seed(1)
    masks = [torch.rand(sf.num_voxels, generator=g) < 0.4 for _ in range(6)]
    pinned = torch.zeros(len(sf.corners), dtype=torch.bool)
    pinned[::5] = True
    lrs = (0.01, 0.02, 0.03)
    opt = SectionalAdam(sf, lrs, pinned=pinned)
    full = SparseFlex(sf.coords, sf.resolution, sf.corners, sf.voxel_corners, *[t.clone() for t in start])
    grads_per_step, rows_per_step = [], []
    for mask in masks:
        # full-size path: differentiable select of the current full parameters
        leaves_full = [getattr(sf, k).clone().requires_grad_(True) for k in names]
        full = SparseFlex(sf.coords, sf.resolution, sf.corners, sf.voxel_corners, *leaves_full)
        section_loss(full.select(mask)).backward()
        sub = opt.select(mask)
        section_loss(sub).backward()
        idx, used, _ = sf.section_rows(mask)
        rows = [used, used, idx, idx, idx]
        for leaf_full, leaf, r in zip(leaves_full, (sub.sdf, sub.deform, sub.alpha_raw, sub.beta_raw, sub.gamma_raw),
                                      rows):
            torch.testing.assert_close(leaf.grad, leaf_full.grad[r])
            outside = torch.ones(len(leaf_full), dtype=torch.bool)
            outside[r] = False
            assert not leaf_full.grad[outside].any()
        grads_per_step.append([leaf.grad.clone() for leaf in (sub.sdf, sub.deform, sub.alpha_raw, sub.beta_raw,
                                                                   sub.gamma_raw)])
        rows_per_step.append(rows)
        opt.step()
    want = reference_lazy_adam(start, grads_per_step, rows_per_step, [lrs[0], lrs[1], lrs[2], lrs[2], lrs[2]],
                               frozen=[pinned, pinned, None, None, None])
    for k, w in zip(names, want):
        torch.testing.assert_close(getattr(sf, k).double(), w, rtol=0, atol=2e-6)
    assert torch.equal(sf.sdf[pinned], start[0][pinned])
    assert not sf.sdf.requires_grad  # no full-size gradient anywhere


def test_state_dict_round_trip_and_torch_adam_state():
    params, rows, grads = random_problem(seed=6)
    half = len(rows) // 2
    _, opt = run_row_adam(params, rows[:half], grads[:half], [0.01, 0.01])
    a = [p.clone() for p in opt.params]
    resumed = RowAdam([{"params": [a[0]], "lr": 0.0}, {"params": [a[1]], "lr": 0.0}])
    resumed.load_state_dict(opt.state_dict())
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
