"""Sectional optimisation: Adam that touches only the rows of the current frustum section (issue 20).

``torch.optim.Adam`` over a SparseFlex holds a full-size gradient per parameter and updates every voxel's and
corner's parameters each step, although a step sees only the voxels of one section (10 % of them at 1024). Here each
step gathers the section's rows of the full parameters into small leaf tensors (:meth:`RowAdam.gather`), the loss
is computed and differentiated on those leaves only, and :meth:`RowAdam.step` applies Adam to the gathered rows and
scatters the result back. Nothing of full size is created per step besides the moments, which persist.

The rule (lazy Adam, the semantics of ``torch.optim.SparseAdam`` with ``torch.optim.Adam``'s placement of eps): a
global step counter ``t`` counts :meth:`RowAdam.step` calls; for the rows ``r`` of a parameter in the step, with
gradient ``g``::

    m[r] = b1 m[r] + (1 - b1) g
    v[r] = b2 v[r] + (1 - b2) g^2
    p[r] -= lr / (1 - b1^t) * m[r] / (sqrt(v[r]) / sqrt(1 - b2^t) + eps)

Rows outside the section keep their parameters and moments (``torch.optim.Adam`` would keep moving them with their
decaying momentum). With every row in every step it is exactly ``torch.optim.Adam``. The moments may be stored in a
compact dtype (``bfloat16`` halves their memory; every update is computed in float32).
"""

from __future__ import annotations

import math

import torch

from ..flexicubes.representation import SparseFlex

FORMAT = "sectional-adam-1"
MOMENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RowAdam:
    """Lazy Adam on rows of full-size tensors (see the module's docstring for the rule).

    ``groups``: ``[{"params": [tensor, ...], "lr": float}, ...]`` as for ``torch.optim``; the tensors are updated in
    place and need no ``requires_grad``. ``frozen``: optional ``{id(param): bool [rows]}``; those rows never move
    (their gradient counts as zero, as zeroing a full-size gradient would).
    """

    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 moment_dtype: str = "float32", frozen: dict | None = None):
        if moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"moment dtype must be one of {', '.join(MOMENT_DTYPES)}; got {moment_dtype}")
        self.param_groups = [dict(g, params=list(g["params"])) for g in groups]
        self.params = [p for g in self.param_groups for p in g["params"]]
        self.betas, self.eps, self.moment_dtype = betas, eps, moment_dtype
        self.frozen = {i: frozen[id(p)] for i, p in enumerate(self.params) if frozen and id(p) in frozen}
        self.steps = 0
        self.moments: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.params)
        self._gathered: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.params)

    # -- a step ---------------------------------------------------------------------------------------------------
    def gather(self, rows: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Leaf copies ``params[i][rows[i]]`` (requiring grad) for this step; ``None`` leaves a parameter out."""
        leaves = []
        for i, (p, r) in enumerate(zip(self.params, rows)):
            if r is None:
                self._gathered[i] = None
                leaves.append(None)
                continue
            leaf = p.detach()[r].requires_grad_(True)
            self._gathered[i] = (r, leaf)
            leaves.append(leaf)
        return leaves

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - torch.optim's signature
        """Forget the gathered leaves' gradients (the leaves themselves stay for :meth:`step`)."""
        for entry in self._gathered:
            if entry is not None:
                entry[1].grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Adam on the gathered rows that received a gradient; the global step counts every call."""
        self.steps += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
        dtype = MOMENT_DTYPES[self.moment_dtype]
        i = 0
        for group in self.param_groups:
            for p in group["params"]:
                entry = self._gathered[i]
                if entry is not None and entry[1].grad is not None:
                    rows, leaf = entry
                    g = leaf.grad.to(torch.float32)
                    if i in self.frozen:
                        g = torch.where(self.frozen[i][rows].reshape(-1, *([1] * (g.dim() - 1))), 0.0, g)
                    if self.moments[i] is None:
                        self.moments[i] = (torch.zeros(p.shape, dtype=dtype, device=p.device),
                                           torch.zeros(p.shape, dtype=dtype, device=p.device))
                    exp_avg, exp_avg_sq = self.moments[i]
                    m = exp_avg[rows].to(torch.float32).lerp_(g, 1 - b1)
                    v = exp_avg_sq[rows].to(torch.float32).mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
                    new = leaf.detach().to(torch.float32).addcdiv_(m, denom, value=-group["lr"] / bc1)
                    p[rows] = new.to(p.dtype)
                    exp_avg[rows] = m.to(dtype)
                    exp_avg_sq[rows] = v.to(dtype)
                i += 1
        self._gathered = [None] * len(self.params)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"format": FORMAT, "steps": self.steps, "betas": list(self.betas), "eps": self.eps,
                "moment_dtype": self.moment_dtype, "lrs": [g["lr"] for g in self.param_groups],
                "moments": [None if m is None else {"exp_avg": m[0], "exp_avg_sq": m[1]} for m in self.moments]}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`, or from a ``torch.optim.Adam`` state over the same parameters (a checkpoint
        of the full-size optimiser: the moments carry over, cast to this optimiser's dtype)."""
        dtype = MOMENT_DTYPES[self.moment_dtype]
        if state.get("format") == FORMAT:
            self.steps = int(state["steps"])
            moments = state["moments"]
            lrs = state["lrs"]
        else:  # torch.optim.Adam: {"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...]}
            per = state["state"]
            moments = [per.get(i, per.get(str(i))) for i in range(len(self.params))]
            self.steps = max((int(m["step"]) for m in moments if m is not None), default=0)
            lrs = [g["lr"] for g in state["param_groups"]]
        if len(moments) != len(self.params):
            raise ValueError(f"optimiser state has {len(moments)} parameters, expected {len(self.params)}")
        for i, (p, m) in enumerate(zip(self.params, moments)):
            if m is None:
                self.moments[i] = None
                continue
            if m["exp_avg"].shape != p.shape:
                raise ValueError(f"optimiser state of shape {tuple(m['exp_avg'].shape)} for a parameter of "
                                 f"shape {tuple(p.shape)}")
            self.moments[i] = (m["exp_avg"].to(p.device, dtype, copy=True),
                               m["exp_avg_sq"].to(p.device, dtype, copy=True))
        for g, lr in zip(self.param_groups, lrs):
            g["lr"] = lr

    def moment_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.moments if m is not None for t in m)


class SectionalAdam(RowAdam):
    """:class:`RowAdam` over a SparseFlex's parameters, with :meth:`select` in place of :meth:`SparseFlex.select`:
    the section's SparseFlex whose parameters are this step's leaves. Groups and rates as ``make_optimizer``'s."""

    def __init__(self, sf: SparseFlex, lrs: tuple[float, float, float], moment_dtype: str = "float32",
                 pinned: torch.Tensor | None = None, betas=(0.9, 0.999), eps: float = 1e-8):
        for name in ("sdf", "deform", "alpha_raw", "beta_raw", "gamma_raw"):
            getattr(sf, name).requires_grad_(False)  # gradients reach the leaves only
        self.sf = sf
        frozen = None if pinned is None else {id(sf.sdf): pinned, id(sf.deform): pinned}
        super().__init__([{"params": [sf.sdf], "lr": lrs[0]}, {"params": [sf.deform], "lr": lrs[1]},
                          {"params": [sf.alpha_raw, sf.beta_raw, sf.gamma_raw], "lr": lrs[2]}],
                         betas, eps, moment_dtype, frozen)

    def select(self, voxel_mask: torch.Tensor) -> SparseFlex:
        idx, used, vc = self.sf.section_rows(voxel_mask)
        sdf, deform, alpha, beta, gamma = self.gather([used, used, idx, idx, idx])
        sf = self.sf
        return SparseFlex(sf.coords[idx], sf.resolution, sf.corners[used], vc, sdf, deform, alpha, beta, gamma)
