"""Diffusion objectives of the action expert: EDM preconditioning, training noise levels, loss, sampler.

Both objectives share Karras et al.'s preconditioning D(x; sigma) = c_skip x + c_out F(c_in x, sigma)
(sigma_data 0.5; the network computes c_noise = ln(sigma) / 4 itself) and the loss in F-space,
mean((F - (a - c_skip x_noisy) / c_out)^2). They differ in the noise levels and the sampler:

- ``release-edm`` (S-VAM-Code ``policy_models/edm_diffusion``): training sigmas log-logistic
  (loc ln 0.5, scale 0.5) truncated to [sigma_min, sigma_max] = [0.001, 80]; sampler DDIM
  (DPM-Solver-1 form) on an exponential schedule of ``sample_steps`` = 10 noise levels from
  sigma_max to ``sample_sigma_min`` (1.0 at the release's CALVIN evaluation), then 0;
- ``edm`` (foresight's earlier recipe): training sigmas lognormal (P_mean -1.2, P_std 1.2); sampler
  deterministic Euler on the Karras schedule (rho 7) of diffusers' ``EDMEulerScheduler``.

A network is any callable ``network(scaled_BKA, sigma_B, memory) -> F_BKA``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from diffusers import EDMEulerScheduler
from pydantic import Field

from foresight.schemas.base import StrictModel

ObjectiveName = Literal["release-edm", "edm"]
Network = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ObjectiveConfig(StrictModel):
    """Noise levels, loss and sampler of the diffusion policy; see :meth:`for_kind` for each default."""

    kind: ObjectiveName = Field("release-edm", description="release-edm (S-VAM release) or edm (foresight's).")
    sigma_data: float = Field(0.5, description="EDM sigma_data (std of the normalised actions).")
    sigma_min: float = Field(0.001, description="release-edm: lower truncation of the training sigmas.")
    sigma_max: float = Field(80.0, description="Upper truncation of the training sigmas and first sampler sigma.")
    loc: float = Field(math.log(0.5), description="release-edm: log-logistic location of ln(sigma).")
    scale: float = Field(0.5, description="release-edm: log-logistic scale of ln(sigma).")
    p_mean: float = Field(-1.2, description="edm: mean of the lognormal ln(sigma).")
    p_std: float = Field(1.2, description="edm: std of the lognormal ln(sigma).")
    sample_steps: int = Field(10, description="Sampler steps at inference.")
    sample_sigma_min: float = Field(1.0, description="Last nonzero sampler sigma (release CALVIN eval: 1.0; "
                                                     "edm: 0.002).")
    rho: float = Field(7.0, description="edm: Karras schedule exponent.")

    @classmethod
    def for_kind(cls, kind: ObjectiveName, **overrides) -> "ObjectiveConfig":
        """The defaults of one objective (edm's sampler ends at 0.002) with ``overrides`` on top."""
        base = {"kind": kind} | ({"sample_sigma_min": 0.002} if kind == "edm" else {})
        return cls(**(base | overrides))


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """``x`` with trailing singleton axes up to ``ndim`` (per-sample sigmas against action chunks)."""
    return x.reshape(*x.shape, *([1] * (ndim - x.ndim)))


def scalings(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) of EDM preconditioning at ``sigma``."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
    c_in = 1 / (sigma**2 + sigma_data**2) ** 0.5
    return c_skip, c_out, c_in


def c_noise(sigma: torch.Tensor) -> torch.Tensor:
    """The network's noise conditioning ln(sigma) / 4."""
    return sigma.log() / 4


def loglogistic_cdf_bounds(cfg: ObjectiveConfig) -> torch.Tensor:
    """[cdf(sigma_min), cdf(sigma_max)] of the log-logistic density, float64."""
    bounds = torch.tensor([cfg.sigma_min, cfg.sigma_max], dtype=torch.float64)
    return bounds.log().sub(cfg.loc).div(cfg.scale).sigmoid()


def loglogistic_sigmas(u01: torch.Tensor, cfg: ObjectiveConfig) -> torch.Tensor:
    """Truncated log-logistic sigmas from float64 uniforms (the release's ``rand_log_logistic``), float32."""
    lo, hi = loglogistic_cdf_bounds(cfg).to(u01.device)
    u = u01.to(torch.float64) * (hi - lo) + lo
    return u.logit().mul(cfg.scale).add(cfg.loc).exp().to(torch.float32)


def training_sigmas(cfg: ObjectiveConfig, batch: int, device: torch.device) -> torch.Tensor:
    """One training noise level per sample, drawn from the objective's density (global torch RNG)."""
    if cfg.kind == "release-edm":
        return loglogistic_sigmas(torch.rand(batch, dtype=torch.float64, device=device), cfg)
    return (cfg.p_mean + cfg.p_std * torch.randn(batch, device=device)).exp()


def denoise(network: Network, cfg: ObjectiveConfig, x_BKA: torch.Tensor, sigma_B: torch.Tensor,
            memory: torch.Tensor) -> torch.Tensor:
    """D(x; sigma) = c_skip x + c_out F(c_in x, sigma)."""
    c_skip, c_out, c_in = (append_dims(c, x_BKA.ndim) for c in scalings(sigma_B, cfg.sigma_data))
    return network(x_BKA * c_in, sigma_B, memory) * c_out + x_BKA * c_skip


def diffusion_loss(network: Network, cfg: ObjectiveConfig, actions_BKA: torch.Tensor, memory: torch.Tensor,
                   mask_BK: torch.Tensor | None = None, sigma_B: torch.Tensor | None = None,
                   noise_BKA: torch.Tensor | None = None) -> torch.Tensor:
    """The F-space loss (the release's ``GCDenoiser.loss``); ``mask_BK`` (True = real action) drops padded rows.

    ``sigma_B`` and ``noise_BKA`` default to fresh draws (sigma first, then the noise, as the release).
    """
    if sigma_B is None:
        sigma_B = training_sigmas(cfg, actions_BKA.shape[0], actions_BKA.device)
    if noise_BKA is None:
        noise_BKA = torch.randn_like(actions_BKA)
    sigma = append_dims(sigma_B, actions_BKA.ndim)
    noised = actions_BKA + noise_BKA * sigma
    c_skip, c_out, c_in = scalings(sigma, cfg.sigma_data)
    output = network(noised * c_in, sigma_B, memory).float()
    error_BK = ((output - (actions_BKA - c_skip * noised) / c_out) ** 2).mean(-1)
    if mask_BK is None:
        return error_BK.mean()
    weight_BK = mask_BK.to(error_BK.dtype)
    return (error_BK * weight_BK).sum() / weight_BK.sum().clamp_min(1.0)


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float, device: torch.device | None = None
                       ) -> torch.Tensor:
    """exp(linspace(ln sigma_max, ln sigma_min, steps)) then 0 (the release's ``get_sigmas_exponential``)."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, device=device).exp()
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def sample_ddim(network: Network, cfg: ObjectiveConfig, x_T: torch.Tensor, memory: torch.Tensor,
                sigmas: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The release's deterministic ``sample_ddim``: (final actions, [x_0..x_N], [D_0..D_{N-1}]).

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h) D_i with h = ln(sigma_i / sigma_{i+1}); the last
    step (sigma 0) returns D exactly.
    """
    x, xs, denoised = x_T, [x_T], []
    ones = x_T.new_ones(x_T.shape[0])
    for i in range(len(sigmas) - 1):
        d = denoise(network, cfg, x, sigmas[i] * ones, memory)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        x = ((-t_next).exp() / (-t).exp()) * x - (-(t_next - t)).expm1() * d
        xs.append(x)
        denoised.append(d)
    return x, xs, denoised


def edm_scheduler(cfg: ObjectiveConfig) -> EDMEulerScheduler:
    """A fresh diffusers EDM Euler scheduler (Karras schedule) for the ``edm`` objective."""
    return EDMEulerScheduler(sigma_min=cfg.sample_sigma_min, sigma_max=cfg.sigma_max, sigma_data=cfg.sigma_data,
                             sigma_schedule="karras", rho=cfg.rho, prediction_type="epsilon")


def sample_karras_euler(network: Network, cfg: ObjectiveConfig, x_T: torch.Tensor, memory: torch.Tensor
                        ) -> torch.Tensor:
    """Deterministic Euler steps (the DDIM update) on the Karras schedule of :func:`edm_scheduler`."""
    scheduler = edm_scheduler(cfg)
    scheduler.set_timesteps(cfg.sample_steps, device=x_T.device)
    batch, sample = x_T.shape[0], x_T
    for index, timestep in enumerate(scheduler.timesteps):
        sigma_B = scheduler.sigmas[index].to(x_T.device).expand(batch)
        output = network(scheduler.scale_model_input(sample, timestep), sigma_B, memory)
        sample = scheduler.step(output, timestep, sample).prev_sample
    return sample


def sample_actions(network: Network, cfg: ObjectiveConfig, memory: torch.Tensor, shape: tuple[int, ...],
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Action chunks of ``shape`` from N(0, 1) * sigma_max by the objective's sampler (noise drawn on the CPU)."""
    noise = torch.randn(*shape, generator=generator, device="cpu").to(memory.device)
    x_T = noise * cfg.sigma_max
    if cfg.kind == "release-edm":
        sigmas = exponential_sigmas(cfg.sample_steps, cfg.sample_sigma_min, cfg.sigma_max, memory.device)
        return sample_ddim(network, cfg, x_T, memory, sigmas)[0]
    return sample_karras_euler(network, cfg, x_T, memory)
