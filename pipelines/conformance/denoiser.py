"""Group ``denoiser``: the action expert's preconditioning, network, noise levels, loss and sampler.

SPEC.md section 4, recomputed by ``trainers.models.denoiser.GCDenoiser`` and the ``release-edm``
objective of ``trainers.models.objectives``, from the fixture's aggregator output and goal.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from foresight.pipelines.conformance import ArrayCheck, compare, group_arrays
from foresight.pipelines.conformance import _models as models
from foresight.trainers.models import objectives

GROUP = "denoiser"
EXACT_TOL = (1e-7, 1e-6)
F64_TOL = (0.0, 1e-9)
NET_TOL = (1e-4, 1e-4)


def applies(io: dict[str, np.ndarray]) -> bool:
    return "denoiser.x0_eval" in io or "denoiser.c_skip" in io


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array))


@torch.no_grad()
def check(fixture_dir: Path, io: dict[str, np.ndarray], config: dict) -> list[ArrayCheck]:
    """Recompute every ``denoiser.*`` output array of the fixture."""
    arrays = group_arrays(io, GROUP)
    model = models.denoiser(fixture_dir, config)
    section = config["denoiser"]
    objective = models.objective(config, section["sigma_min_eval"])
    memory = model.encode(_t(io["glue.state_images"]), _t(io["glue.latent_goal"]))
    checks = _preconditioning(arrays, model, objective)
    checks += _probe(arrays, model, objective, memory)
    checks += _density_and_loss(arrays, model, objective, memory)
    for tag, sigma_min in (("eval", section["sigma_min_eval"]), ("train", section["sigma_min_train_config"])):
        checks += _sampler(arrays, model, objective, memory, tag, sigma_min)
    return checks


def _cmp(name: str, got: torch.Tensor, arrays: dict[str, np.ndarray], tol: tuple[float, float]) -> ArrayCheck:
    return compare(GROUP, name, got.numpy(), arrays[name], *tol)


def _preconditioning(arrays, model, objective) -> list[ArrayCheck]:
    sigmas = _t(arrays["probe_sigmas"])
    c_skip, c_out, c_in = objectives.scalings(sigmas, objective.sigma_data)
    return [_cmp("c_skip", c_skip, arrays, EXACT_TOL), _cmp("c_out", c_out, arrays, EXACT_TOL),
            _cmp("c_in", c_in, arrays, EXACT_TOL), _cmp("c_noise", objectives.c_noise(sigmas), arrays, EXACT_TOL),
            _cmp("sigma_emb", model.inner_model.embed_sigma(sigmas), arrays, (1e-5, 0.0))]


def _probe(arrays, model, objective, memory) -> list[ArrayCheck]:
    x, sigma = _t(arrays["x_probe"]), _t(arrays["sigma_probe"])
    c_in = objectives.append_dims(objectives.scalings(sigma, objective.sigma_data)[2], x.ndim)
    return [_cmp("inner_out_probe", model.network(x * c_in, sigma, memory), arrays, NET_TOL),
            _cmp("denoised_probe", objectives.denoise(model.network, objective, x, sigma, memory), arrays, NET_TOL)]


def _density_and_loss(arrays, model, objective, memory) -> list[ArrayCheck]:
    checks = [_cmp("density_cdf_bounds", objectives.loglogistic_cdf_bounds(objective), arrays, F64_TOL),
              _cmp("density_sigma", objectives.loglogistic_sigmas(_t(arrays["density_u01"]), objective), arrays,
                   EXACT_TOL)]
    sigma = objectives.loglogistic_sigmas(_t(arrays["train_u01"]), objective)
    checks.append(_cmp("train_sigma", sigma, arrays, EXACT_TOL))
    actions, noise = _t(arrays["actions"]), _t(arrays["train_noise"])
    noised = actions + noise * objectives.append_dims(sigma, actions.ndim)
    c_in = objectives.append_dims(objectives.scalings(sigma, objective.sigma_data)[2], actions.ndim)
    checks.append(_cmp("train_model_output", model.network(noised * c_in, sigma, memory), arrays, NET_TOL))
    loss = objectives.diffusion_loss(model.network, objective, actions, memory, sigma_B=sigma, noise_BKA=noise)
    checks.append(_cmp("train_loss", loss.reshape(1), arrays, NET_TOL))
    return checks


def _sampler(arrays, model, objective, memory, tag: str, sigma_min: float) -> list[ArrayCheck]:
    sigmas = objectives.exponential_sigmas(objective.sample_steps, sigma_min, objective.sigma_max)
    final, xs, denoised = objectives.sample_ddim(model.network, objective, _t(arrays["x_T"]), memory, sigmas)
    return [_cmp(f"sched_sigmas_{tag}", sigmas, arrays, EXACT_TOL),
            _cmp(f"traj_x_{tag}", torch.stack(xs), arrays, NET_TOL),
            _cmp(f"traj_denoised_{tag}", torch.stack(denoised), arrays, NET_TOL),
            _cmp(f"x0_{tag}", final, arrays, NET_TOL)]
