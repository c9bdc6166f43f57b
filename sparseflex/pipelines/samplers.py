"""Sampling a rectified-flow model: an Euler loop over a time grid and small wrappers around the model function.

The sampler integrates ``dx/dt = v(x, t)`` from pure noise at t = 1 to data at t = 0 (SPEC section 4: Euler, 50
steps, classifier-free guidance 3.5). It only ever calls a *velocity function* ``velocity(x, t) -> v`` with ``t`` a
Python float in [0, 1]; everything else is a wrapper that builds one (k-diffusion style)::

    v_c = model_velocity(model, cond)                  # model(x, 1000 t, cond), the network's convention
    v_u = model_velocity(model, torch.zeros_like(cond))
    v = classifier_free_guidance(v_c, v_u, 3.5)        # v_u + 3.5 (v_c - v_u)
    v = guidance_interval(v, v_c, (0.5, 1.0))          # guided only for t in [0.5, 1]
    x0 = euler_sample(v, gaussian_noise(shape, seed))

:func:`guided_velocity` composes the usual case in one call.

Conventions versus TRELLIS (``trellis/pipelines/samplers``): its ``cfg_strength`` w computes ``(1 + w) v_c - w v_u``,
which is the standard guidance ``g = 1 + w`` used here (TRELLIS-image-large's released structure sampler,
``cfg_strength`` 7.5, is ``g = 8.5``). Its ``rescale_t`` s is our ``shift``; its sampler class defaults to s = 1, but
the released image pipeline samples both flows with s = 3, so that is our default (:data:`DEFAULT_SHIFT`): it puts
more steps at large t, where the coarse layout is decided. The paper gives only "Euler, 50 steps, CFG 3.5".
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import InputError, OptionError, check_range
from ..models.flow import TIME_SCALE, Latent, batch_size

VelocityFn = Callable[[Latent, float], Latent]

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 3.5
DEFAULT_SHIFT = 3.0


def shift_time(t, shift: float = DEFAULT_SHIFT):
    """Time shift ``t' = s t / (1 + (s - 1) t)``: fixes 0 and 1, identity for ``s = 1``; ``s > 1`` moves the grid
    towards t = 1 (TRELLIS' ``rescale_t``; the SD3 shift of the noise level)."""
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int = DEFAULT_STEPS, shift: float = DEFAULT_SHIFT) -> list[float]:
    """The ``steps + 1`` sampling times from 1 down to 0: ``linspace(1, 0, steps + 1)``, shifted (float64)."""
    if not isinstance(steps, int) or steps < 1:
        raise OptionError(f"steps must be an integer >= 1; got {steps!r}")
    check_range("shift", shift, 0.0, low_open=True)
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    t = shift_time(t, shift)
    t[0], t[-1] = 1.0, 0.0  # exact ends whatever the rounding
    return t.tolist()


def gaussian_noise(shape, seed: int | torch.Generator, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``seed`` (an int or a CPU generator), then moved to ``device``:
    the same seed gives the same numbers on every device."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen, dtype=dtype).to(device)


def model_velocity(model: Callable, cond=None) -> VelocityFn:
    """The velocity function of a flow network ``model(x, 1000 t [B], cond)`` (the training convention of
    :meth:`~sparseflex.models.flow.RectifiedFlow.loss`) for a fixed condition. A condition of one item is expanded
    to the batch."""
    def velocity(x, t: float):
        b = batch_size(x)
        c = cond
        if isinstance(c, torch.Tensor) and len(c) == 1 and b > 1:
            c = c.expand(b, *c.shape[1:])
        device = x.device
        return model(x, torch.full((b,), TIME_SCALE * t, device=device), c)
    return velocity


def classifier_free_guidance(cond_velocity: VelocityFn, uncond_velocity: VelocityFn,
                             guidance: float = DEFAULT_GUIDANCE) -> VelocityFn:
    """Classifier-free guidance ``v = v_u + g (v_c - v_u)`` (``g = 1``: the conditional model alone, and the
    unconditional one is not evaluated; TRELLIS' ``cfg_strength`` w is ``g = 1 + w``)."""
    check_range("guidance", guidance)

    def velocity(x, t: float):
        v_c = cond_velocity(x, t)
        if guidance == 1:
            return v_c
        v_u = uncond_velocity(x, t)
        return v_u + (v_c - v_u) * guidance
    return velocity


def guidance_interval(guided: VelocityFn, plain: VelocityFn, interval: tuple[float, float]) -> VelocityFn:
    """Use ``guided`` for ``t_lo <= t <= t_hi`` and ``plain`` (normally the conditional velocity, i.e. g = 1)
    elsewhere, where only it is evaluated (the guidance-interval idea; TRELLIS' ``cfg_interval``)."""
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo <= hi <= 1.0:
        raise OptionError(f"guidance interval must satisfy 0 <= t_lo <= t_hi <= 1; got {interval!r}")

    def velocity(x, t: float):
        return guided(x, t) if lo <= t <= hi else plain(x, t)
    return velocity


def guided_velocity(model: Callable, cond, uncond=None, guidance: float = DEFAULT_GUIDANCE,
                    interval: tuple[float, float] | None = None) -> VelocityFn:
    """The usual composition: classifier-free guidance of ``model`` between ``cond`` and ``uncond`` (default zeros
    shaped like ``cond``, the unconditional input of training), optionally only inside ``interval``."""
    v_c = model_velocity(model, cond)
    if uncond is None:
        if not isinstance(cond, torch.Tensor):
            raise InputError("guided_velocity needs a tensor condition (or an explicit uncond)")
        uncond = torch.zeros_like(cond)
    v = classifier_free_guidance(v_c, model_velocity(model, uncond), guidance)
    return guidance_interval(v, v_c, interval) if interval is not None else v


@torch.no_grad()
def euler_sample(velocity: VelocityFn, noise: Latent, steps: int = DEFAULT_STEPS, shift: float = DEFAULT_SHIFT,
                 callback: Callable | None = None) -> Latent:
    """Integrate ``dx/dt = velocity(x, t)`` from ``noise`` at t = 1 to t = 0 with Euler steps
    ``x_{t_next} = x_t + (t_next - t) v(x_t, t)`` on :func:`time_grid` (``steps``, ``shift``).

    Works on dense tensors and SparseTensors alike. ``callback(step, steps, t, x)`` (if given) runs after every step
    with the 1-based step number, the new time and the new ``x`` (e.g. to advance a progress bar). Deterministic for
    a given noise: draw it with :func:`gaussian_noise`.
    """
    grid = time_grid(steps, shift)
    x = noise
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        v = velocity(x, t)
        x = x + v * (t_next - t)
        if callback is not None:
            callback(i + 1, steps, t_next, x)
    return x
