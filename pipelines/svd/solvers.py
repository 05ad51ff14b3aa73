"""Deterministic probability-flow ODE solvers in the sigma parametrisation (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models"), model-agnostic.

A solver integrates dx/dsigma = (x - D(x, sigma)) / sigma from ``sigmas[0]`` down to
``sigmas[-1]`` (0) on a fixed grid, where ``denoised(x, i)`` is the model's estimate D of the clean
sample at grid point ``i`` (every call is at a grid sigma, so a model sees only the timesteps of
its scheduler). Coefficients are computed in float64 on the host from the grid; the tensors keep
their dtype (float32 latents). Nothing here waits for the device.

- :func:`euler`: first order, one call per step (the stepping of diffusers' ``EulerDiscreteScheduler``).
- :func:`heun`: EDM's Algorithm 1 without churn: Euler, then the trapezoidal correction from a
  second call at the next sigma (skipped on the last step to sigma 0); 2 calls per step but the last.
- :func:`dpmpp_2m`: DPM-Solver++(2M) (Lu et al. 2022), k-diffusion's ``sample_dpmpp_2m``: second
  order from the previous step's estimate, one call per step; first order on the first step, and
  the last step to sigma 0 returns the estimate itself.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Denoised = Callable[[torch.Tensor, int], torch.Tensor]
"""``denoised(x, i)``: the clean-sample estimate D(x, sigmas[i]) (same shape as ``x``)."""


def euler(denoised: Denoised, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """``len(sigmas) - 1`` Euler steps of the probability-flow ODE from ``x`` at ``sigmas[0]``."""
    for i in range(len(sigmas) - 1):
        derivative = (x - denoised(x, i)) / sigmas[i]
        x = x + derivative * (sigmas[i + 1] - sigmas[i])
    return x


def heun(denoised: Denoised, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """Heun's second-order steps (EDM Algorithm 1, deterministic): the Euler prediction corrected by
    the slope at the next grid sigma, except on a step that ends at sigma 0 (Euler there)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        derivative = (x - denoised(x, i)) / sigma
        x_euler = x + derivative * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
            continue
        derivative_next = (x_euler - denoised(x_euler, i + 1)) / sigma_next
        x = x + (derivative + derivative_next) * (0.5 * (sigma_next - sigma))
    return x


def dpmpp_2m(denoised: Denoised, x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """DPM-Solver++(2M) in log-sigma time (lambda = -log sigma): each step extrapolates the clean
    estimate linearly from this and the previous step (ratio r of the two step lengths)."""
    previous: torch.Tensor | None = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        estimate = denoised(x, i)
        if sigma_next == 0:
            return estimate
        h = math.log(sigma) - math.log(sigma_next)
        target = estimate
        if previous is not None:
            r = (math.log(sigmas[i - 1]) - math.log(sigma)) / h
            target = estimate * (1 + 1 / (2 * r)) - previous * (1 / (2 * r))
        x = x * (sigma_next / sigma) - target * math.expm1(-h)
        previous = estimate
    return x


SOLVERS: dict[str, Callable[[Denoised, torch.Tensor, list[float]], torch.Tensor]] = {
    "euler": euler, "heun": heun, "dpmpp-2m": dpmpp_2m}
"""Solver id (``schemas.svd.SolverId``) -> solver."""


def call_grid_points(solver: str, steps: int) -> list[int]:
    """The grid point of each ``denoised`` call a solver makes over ``steps`` steps ending at sigma
    0, in call order (Heun calls at i and i + 1 on every step but the last)."""
    if solver == "heun":
        return [point for i in range(steps) for point in ((i, i + 1) if i < steps - 1 else (i,))]
    return list(range(steps))


def model_calls(solver: str, steps: int) -> int:
    """Calls of ``denoised`` a solver makes over ``steps`` steps ending at sigma 0."""
    return len(call_grid_points(solver, steps))
