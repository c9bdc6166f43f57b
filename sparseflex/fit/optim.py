"""Sectional optimisation: Adam that touches only the rows of the current frustum section (issue 20).

``torch.optim.Adam`` over a SparseFlex holds a full-size gradient per parameter and updates every voxel's and
corner's parameters each step, although a step sees only the voxels of one section (10 % of them at 1024). Here each
step gathers the section's rows of the full parameters into small leaf tensors (:meth:`RowAdam.gather`), the loss
is computed and differentiated on those leaves only, and :meth:`RowAdam.step` applies Adam to the gathered rows and
scatters the result back. Nothing of full size is created per step besides the moments, which persist.

The result is ``torch.optim.Adam``'s, deferred. A row outside the section has a zero gradient, so Adam would only
decay its moments and move it along its remaining momentum; those steps depend on nothing but the row's own moments
and the step's learning rate and bias corrections. So each row remembers the step it was last brought up to date,
and when it is next gathered (or at :meth:`RowAdam.sync`) the missed steps are applied at once::

    for j in last+1 .. t:   m *= b1;  v *= b2;  p -= lr_j / (1 - b1^j) * m / (sqrt(v) / sqrt(1 - b2^j) + eps)

(the parameter steps are summed for the first :data:`COAST_STEPS` missed steps, after which momentum has decayed by
``(b1 / sqrt(b2))^200 < 1e-9``; the moments decay exactly). A row sees the same values a full-size Adam would give
it whenever a loss reads it. The moments may be stored in a compact dtype (``bfloat16`` halves their memory; every
update is computed in float32).
"""

from __future__ import annotations

import math

import torch

from ..flexicubes.representation import SparseFlex

FORMAT = "sectional-adam-1"  # rows are all up to date in a saved state (state_dict syncs), as version 1 had them
COAST_STEPS = 200
MOMENT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RowAdam:
    """``torch.optim.Adam`` on rows of full-size tensors, each step touching only its rows (see the module's
    docstring for how the rows left out catch up).

    ``groups``: ``[{"params": [tensor, ...], "lr": float}, ...]`` as for ``torch.optim``; the tensors are updated in
    place and need no ``requires_grad``. ``frozen``: optional ``{id(param): bool [rows]}``; those rows get a zero
    gradient (as zeroing a full-size gradient would; with no momentum they never move). ``row_spaces``: optional
    space id per parameter (in order); parameters of one space share their rows (one voxel's or one corner's
    values), are always gathered with the same rows, and share one record of when each row was last up to date.
    One step counter serves all parameters: a gathered parameter without a gradient takes a zero-gradient step.
    """

    def __init__(self, groups: list[dict], betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 moment_dtype: str = "float32", frozen: dict | None = None, row_spaces: list[int] | None = None):
        if moment_dtype not in MOMENT_DTYPES:
            raise ValueError(f"moment dtype must be one of {', '.join(MOMENT_DTYPES)}; got {moment_dtype}")
        self.param_groups = [dict(g, params=list(g["params"])) for g in groups]
        self.params = [p for g in self.param_groups for p in g["params"]]
        self.group_of = [k for k, g in enumerate(self.param_groups) for _ in g["params"]]
        self.space = list(row_spaces) if row_spaces is not None else list(range(len(self.params)))
        if len(self.space) != len(self.params):
            raise ValueError(f"{len(self.space)} row spaces for {len(self.params)} parameters")
        self.betas, self.eps, self.moment_dtype = betas, eps, moment_dtype
        self.frozen = {i: frozen[id(p)] for i, p in enumerate(self.params) if frozen and id(p) in frozen}
        self.steps = 0
        self.moments: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(self.params)
        self.last: dict[int, torch.Tensor] = {}  # per row space, int32 [rows]: the step each row is up to date at
        self._lrs: list[list[float]] = []  # the rates of the steps after step _lrs_from, per group
        self._lrs_from = 0
        self._gathered: list[list | None] = [None] * len(self.params)  # rows, leaf, their moments

    # -- a step ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def gather(self, rows: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Leaf copies ``params[i][rows[i]]`` (requiring grad) for this step, brought up to date first (written back
        to the parameters too); ``None`` leaves a parameter out."""
        self._put_back()
        leaves, behind = [], {}
        for i, (p, r) in enumerate(zip(self.params, rows)):
            if r is None:
                leaves.append(None)
                continue
            values = p[r]
            m = v = None
            if self.moments[i] is not None:  # the moments are read here once and kept for step()
                m, v = (x[r].to(torch.float32) for x in self.moments[i])
                space = self.space[i]
                if space not in behind:
                    late = self.steps - self.last[space][r].long()
                    behind[space] = late if bool((late > 0).any()) else None
                if behind[space] is not None:
                    values = self._coast(i, behind[space], values, m, v)
                    p[r] = values
            leaf = values.requires_grad_(True)
            self._gathered[i] = [r, leaf, m, v]
            leaves.append(leaf)
        return leaves

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - torch.optim's signature
        """Forget the gathered leaves' gradients (the leaves themselves stay for :meth:`step`)."""
        for entry in self._gathered:
            if entry is not None:
                entry[1].grad = None

    @torch.no_grad()
    def step(self) -> None:
        """Adam on the gathered rows; the global step counts every call."""
        self.steps += 1
        self._lrs.append([g["lr"] for g in self.param_groups])
        if self.steps % 1024 == 0 and self.last:  # forget the rates no row can still need
            oldest = min(int(last.min()) for last in self.last.values())
            del self._lrs[: oldest - self._lrs_from]
            self._lrs_from = oldest
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.steps, 1 - b2 ** self.steps
        dtype = MOMENT_DTYPES[self.moment_dtype]
        for i, p in enumerate(self.params):
            entry = self._gathered[i]
            if entry is None:
                continue
            rows, leaf, m, v = entry
            g = leaf.grad.to(torch.float32) if leaf.grad is not None else torch.zeros_like(leaf, dtype=torch.float32)
            if i in self.frozen:
                g = torch.where(self.frozen[i][rows].reshape(-1, *([1] * (g.dim() - 1))), 0.0, g)
            if self.moments[i] is None:  # rows without momentum never move: all up to date
                self.moments[i] = (torch.zeros(p.shape, dtype=dtype, device=p.device),
                                   torch.zeros(p.shape, dtype=dtype, device=p.device))
                if self.space[i] not in self.last:
                    self.last[self.space[i]] = torch.full((len(p),), self.steps, dtype=torch.int32, device=p.device)
                m, v = torch.zeros_like(g), torch.zeros_like(g)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
            lr = self.param_groups[self.group_of[i]]["lr"]
            p[rows] = leaf.detach().to(torch.float32).addcdiv_(m, denom, value=-lr / bc1).to(p.dtype)
            entry[2], entry[3] = m, v
        self._put_back()

    def _put_back(self) -> None:
        """The gathered rows' moments go back (after a step, or when a gather had no step), up to date now."""
        for i, entry in enumerate(self._gathered):
            if entry is None or entry[2] is None:
                continue
            rows, _, m, v = entry
            dtype = MOMENT_DTYPES[self.moment_dtype]
            exp_avg, exp_avg_sq = self.moments[i]
            exp_avg[rows] = m.to(dtype)
            exp_avg_sq[rows] = v.to(dtype)
            if self.space[i] in self.last:
                self.last[self.space[i]][rows] = self.steps
        self._gathered = [None] * len(self.params)

    # -- rows left out --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sync(self, chunk: int = 1 << 20) -> None:
        """Bring every row up to date (before the full parameters are read: extraction, refinement, a checkpoint)."""
        self._put_back()
        dtype = MOMENT_DTYPES[self.moment_dtype]
        for space, last in self.last.items():
            members = [i for i in range(len(self.params)) if self.space[i] == space and self.moments[i] is not None]
            for start in range(0, len(last), chunk):
                behind = self.steps - last[start: start + chunk].long()
                late = (behind > 0).nonzero().squeeze(1)
                if not len(late):
                    continue
                rows = late + start
                for i in members:
                    p, (exp_avg, exp_avg_sq) = self.params[i], self.moments[i]
                    m, v = exp_avg[rows].to(torch.float32), exp_avg_sq[rows].to(torch.float32)
                    p[rows] = self._coast(i, behind[late], p[rows], m, v)
                    exp_avg[rows], exp_avg_sq[rows] = m.to(dtype), v.to(dtype)
                last[rows] = self.steps

    def _coast(self, i: int, behind: torch.Tensor, values: torch.Tensor, m: torch.Tensor,
               v: torch.Tensor) -> torch.Tensor:
        """Adam's steps ``last+1 .. t`` with zero gradient on some rows of parameter ``i``: ``behind`` = t - last
        (>= 0) per row, ``values`` their parameters, ``m`` and ``v`` their moments in float32 (decayed in place).
        Returns the parameters after those steps.

        With zero gradients the moments only decay, ``m_j = b1^k m`` and ``sqrt(v_j) = b2^(k/2) sqrt(v)`` after k
        missed steps, so step j moves an entry by ``m a_k / (q + e_k)``, ``q = sqrt(v)``, with per-row scalars
        ``a_k = lr_j sqrt(1 - b2^j) / (1 - b1^j) (b1 / sqrt(b2))^k`` and ``e_k = eps sqrt(1 - b2^j) / b2^(k/2)``.
        Where ``q`` is over 100 times any ``e_k``, ``1 / (q + e) = 1/q - e/q^2`` to 1e-4 (of a coast that is itself
        a fraction of the row's last steps), so the sums over k are scalars per distinct last step
        (``S_n = sum_k a_k e_k^n``); the entries with a smaller ``q`` (gradients near eps) sum their terms one by
        one."""
        p = self.params[i]
        b1, b2 = self.betas
        last = self.steps - behind
        oldest = int(last.min())
        # the steps some row missed, their rates and bias corrections (made on the parameter's device)
        j = torch.arange(oldest + 1, self.steps + 1, dtype=torch.float64, device=p.device)
        lrs = torch.tensor([r[self.group_of[i]] for r in self._lrs[oldest - self._lrs_from:]], dtype=torch.float64,
                           device=p.device)
        root = torch.sqrt(1 - b2 ** j)
        a_tab = lrs * root / (1 - b1 ** j)
        e_tab = self.eps * root
        # The terms depend on a row's last step only: a table [distinct last steps, missed steps] (zero past the
        # row's own count), built at once.
        present = torch.zeros(self.steps - oldest + 1, dtype=torch.bool, device=p.device)
        present[last - oldest] = True  # the distinct last steps without a sort: they lie in a short range
        starts = present.nonzero().squeeze(1)
        inverse = (present.cumsum(0) - 1)[last - oldest]
        ks = torch.arange(1, min(int(behind.max()), COAST_STEPS) + 1, device=p.device)
        idx = (starts[:, None] + ks - 1).clamp_max(len(a_tab) - 1)
        kd = ks.double()
        a = torch.where(ks <= (self.steps - oldest - starts)[:, None], a_tab[idx] * (b1 / math.sqrt(b2)) ** kd, 0.0)
        e = e_tab[idx] / b2 ** (kd / 2)
        q = v.sqrt()
        shape = (-1,) + (1,) * (m.dim() - 1)
        s0, s1 = (x.float()[inverse].reshape(shape) for x in (a.sum(1), (a * e).sum(1)))
        floor = 100 * self.eps / b2 ** (COAST_STEPS / 2)
        qc = q.clamp_min(floor)
        acc = s0.sub(s1 / qc).div_(qc)
        exact = (q < floor) & (m != 0)  # below the floor the series is not accurate; no momentum: no movement
        if bool(exact.any()):
            u = inverse[exact.nonzero()[:, 0]]
            qe = q[exact]
            a, e = a.float(), e.float()
            total = torch.empty_like(qe)
            for c in range(0, len(qe), 1 << 14):  # [entries, missed steps] in chunks
                uu = u[c: c + (1 << 14)]
                total[c: c + (1 << 14)] = (a[uu] / (qe[c: c + (1 << 14), None] + e[uu])).sum(1)
            acc[exact] = total
        new = (values.to(torch.float32) - m * acc).to(values.dtype)
        decay = behind.double()
        m.mul_((b1 ** decay).float().reshape(shape))
        v.mul_((b2 ** decay).float().reshape(shape))
        return new

    # -- checkpoints ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The moments and the step count, every row brought up to date first (so the parameters saved beside it
        are Adam's and no per-row bookkeeping needs saving)."""
        self.sync()
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
        self.last = {}
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
            self.last[self.space[i]] = torch.full((len(p),), self.steps, dtype=torch.int32, device=p.device)
        self._lrs, self._lrs_from = [], self.steps  # every row is up to date: no earlier rate is needed
        for g, lr in zip(self.param_groups, lrs):
            g["lr"] = lr

    def moment_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.moments if m is not None for t in m)


class SectionalAdam(RowAdam):
    """:class:`RowAdam` over a SparseFlex's parameters, with :meth:`select` in place of :meth:`SparseFlex.select`:
    the section's SparseFlex whose parameters are this step's leaves. Groups and rates as ``make_optimizer``'s.
    ``settle`` (optional) runs after the section's rows catch up and before they are gathered: a constraint that
    full-size Adam's caller applies after every step (the fitter's rim signs) then holds for them too."""

    def __init__(self, sf: SparseFlex, lrs: tuple[float, float, float], moment_dtype: str = "float32",
                 pinned: torch.Tensor | None = None, betas=(0.9, 0.999), eps: float = 1e-8, settle=None):
        for name in ("sdf", "deform", "alpha_raw", "beta_raw", "gamma_raw"):
            getattr(sf, name).requires_grad_(False)  # gradients reach the leaves only
        self.sf, self.settle = sf, settle
        frozen = None if pinned is None else {id(sf.sdf): pinned, id(sf.deform): pinned}
        super().__init__([{"params": [sf.sdf], "lr": lrs[0]}, {"params": [sf.deform], "lr": lrs[1]},
                          {"params": [sf.alpha_raw, sf.beta_raw, sf.gamma_raw], "lr": lrs[2]}],
                         betas, eps, moment_dtype, frozen, row_spaces=[0, 0, 1, 1, 1])

    def select(self, voxel_mask: torch.Tensor) -> SparseFlex:
        idx, used, vc = self.sf.section_rows(voxel_mask)
        rows = [used, used, idx, idx, idx]
        leaves = self.gather(rows)
        if self.settle is not None and self.settle():  # it changed some rows: gather their new values
            for leaf, p, r in zip(leaves, self.params, rows):
                leaf.data.copy_(p[r])
        sdf, deform, alpha, beta, gamma = leaves
        sf = self.sf
        return SparseFlex(sf.coords[idx], sf.resolution, sf.corners[used], vc, sdf, deform, alpha, beta, gamma)
