"""The keyed fast SVD recipe: solvers against a known answer, the sampler loop against the
reference loop on the tiny model, guidance-skipping steps without unconditional calls, first-step
features untouched, the recipe's keys and a version written through it (CPU, tiny sizes)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from typer.testing import CliRunner

from factories import make_dataset, write_episode
import svd_world
from foresight.flows.cli import app
from foresight.flows.configs import GenerateConfig
from foresight.flows.generate import svd_settings, video_params
from foresight.pipelines.svd import SVDParams, generate_clips, load_svd, one_step_features
from foresight.pipelines.svd.loading import SVD_SCHEDULER_CONFIG
from foresight.pipelines.svd.solvers import SOLVERS, model_calls
from foresight.schemas.presets.svd import RECIPE_NAMES, RECIPES, check_recipe
from foresight.schemas.svd import SamplerParams
from foresight.storage.targets import TargetStore

SECOND_ORDER = ("heun", "dpmpp-2m")
DATA_MEAN, DATA_STD = 0.3, 1.0  # the toy data distribution N(mean, std^2), elementwise


def karras_sigmas(steps: int) -> list[float]:
    """The SVD scheduler's sigma grid (Karras, 700 -> 0.002, then 0) at ``steps`` steps."""
    scheduler = EulerDiscreteScheduler.from_config(SVD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    return scheduler.sigmas.tolist()


def toy_error(solver: str, steps: int) -> tuple[float, int]:
    """(relative L2 error at sigma 0, denoiser calls) of ``solver`` on Gaussian data, whose ideal
    denoiser D(x, s) = m + v / (v + s^2) (x - m) gives the ODE's exact solution
    x(0) = m + std / sqrt(std^2 + s0^2) (x(s0) - m)."""
    sigmas = karras_sigmas(steps)
    start = torch.randn(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    exact = DATA_MEAN + DATA_STD / math.sqrt(DATA_STD**2 + sigmas[0] ** 2) * (start - DATA_MEAN)
    calls = [0]

    def denoised(x: torch.Tensor, index: int) -> torch.Tensor:
        calls[0] += 1
        return DATA_MEAN + DATA_STD**2 / (DATA_STD**2 + sigmas[index] ** 2) * (x - DATA_MEAN)

    out = SOLVERS[solver](denoised, start, sigmas)
    return float((out - exact).norm() / exact.norm()), calls[0]


@pytest.mark.parametrize("solver", SECOND_ORDER)
def test_second_order_solvers_converge_to_the_known_answer(solver):
    errors = [toy_error(solver, steps)[0] for steps in (48, 96, 192)]
    assert errors[2] < 1e-3, f"{solver}: relative error {errors[2]:.2e} at 192 steps"
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5, f"{solver}: not second order: {errors}"


def test_euler_converges_at_first_order():
    errors = [toy_error("euler", steps)[0] for steps in (48, 96, 192)]
    assert all(1.7 < a / b < 2.3 for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("steps", [12, 24])
def test_dpmpp_2m_beats_euler_at_the_same_calls(steps):
    assert toy_error("dpmpp-2m", steps)[0] < toy_error("euler", steps)[0]


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_solvers_make_the_calls_they_say(solver):
    assert toy_error(solver, 7)[1] == model_calls(solver, 7)


# ---------------------------------------------------------------- on the tiny SVD
@pytest.fixture(scope="module")
def model():
    return load_svd("tiny")


@pytest.fixture(scope="module")
def inputs():
    return (*svd_world.random_clips(5, 1), np.array([21], dtype=np.int64))


def params(steps: int = 2, sampler: SamplerParams | None = None, **overrides) -> SVDParams:
    return SVDParams(num_frames=4, size=32, steps=steps, sampler=sampler, **overrides)


def test_euler_sampler_is_the_reference_loop_bit_for_bit(model, inputs):
    """Same scaling, timesteps, guidance and v-prediction arithmetic as diffusers' Euler scheduler:
    the sampler loop with Euler and guidance everywhere reproduces the reference's bytes, first-call
    features (``onestep=None``) included."""
    reference = generate_clips(model, params(onestep=None), *inputs, keep_latents=True)
    through_sampler = generate_clips(model, params(sampler=SamplerParams(), onestep=None), *inputs,
                                     keep_latents=True)
    assert np.array_equal(through_sampler.latents, reference.latents)
    assert np.array_equal(through_sampler.frames, reference.frames)
    assert np.array_equal(through_sampler.onestep, reference.onestep)


class CountingSplit:
    """A UNet split that counts conditional and unconditional calls (the latter: zero text states);
    the one-step extraction's head-only call (``features``) is not a denoising call."""

    def __init__(self, split):
        self.split, self.cond, self.uncond = split, 0, 0
        self.features = split.features

    def __call__(self, sample, timestep, text_states, time_ids):
        if torch.count_nonzero(text_states) == 0:
            self.uncond += 1
        else:
            self.cond += 1
        return self.split(sample, timestep, text_states, time_ids)


def counted_calls(model, monkeypatch, svd_params: SVDParams, inputs) -> tuple[int, int]:
    """(conditional, unconditional) UNet calls of one generation."""
    counter = CountingSplit(model.split(svd_params.feature_blocks))
    with monkeypatch.context() as patch:
        patch.setattr(model, "split", lambda blocks: counter)
        generate_clips(model, svd_params, *inputs)
    return counter.cond, counter.uncond


@pytest.mark.parametrize("solver", SECOND_ORDER)
def test_unguided_steps_skip_the_unconditional_call(model, inputs, monkeypatch, solver):
    steps = 3
    sigmas = karras_sigmas(steps)
    guided_from = sigmas[1]  # grid points 0 and 1 guided, 2 conditional only
    fast = params(steps, SamplerParams(solver=solver, guidance_sigma_min=guided_from))
    cond, uncond = counted_calls(model, monkeypatch, fast, inputs)
    calls_at = [0, 1, 1, 2, 2] if solver == "heun" else [0, 1, 2]  # grid point of each call
    assert cond == model_calls(solver, steps) == len(calls_at)
    assert uncond == sum(sigmas[i] >= guided_from for i in calls_at) < cond


def test_the_reference_guides_every_step(model, inputs, monkeypatch):
    assert counted_calls(model, monkeypatch, params(3), inputs) == (3, 3)


def test_fast_recipe_keeps_the_first_step_features(model, inputs):
    """Captured from the first conditional call (``onestep=None``), the features are the
    reference's and the standalone extraction's (the default, the extractor's own head call, does
    not run the sampler at all)."""
    fast_sampler = SamplerParams(**{key.split(".")[1]: item.value for key, item in RECIPES["fast"].items()
                                    if key.startswith("sampler.")})
    reference = generate_clips(model, params(2, onestep=None), *inputs)
    fast = generate_clips(model, params(3, fast_sampler, onestep=None), *inputs)
    assert np.array_equal(fast.onestep, reference.onestep)
    assert np.array_equal(fast.onestep, one_step_features(model, params(3, fast_sampler, onestep=None), *inputs))


# ---------------------------------------------------------------- keys
def config(**overrides) -> GenerateConfig:
    return GenerateConfig(plan="plan-x", text="text-x", model="tiny", device="cpu", **overrides)


def test_recipe_settings_apply_under_explicit_ones_and_over_the_preset():
    fast = config(recipe="fast")
    assert fast.params.steps == 12 and fast.params.sampler == SamplerParams(solver="dpmpp-2m", guidance_sigma_min=1.0)
    calvin = config(recipe="fast", preset="svam-calvin", params={"steps": 16, "sampler": {"solver": "heun"}})
    assert calvin.params.steps == 16 and calvin.params.text_position_encoding is False
    assert calvin.params.sampler == SamplerParams(solver="heun", guidance_sigma_min=1.0)
    assert RECIPE_NAMES == GenerateConfig.model_fields["recipe"].annotation.__args__[0].__args__
    with pytest.raises(ValueError, match="unknown generate recipe 'quick'"):
        check_recipe("quick")


def test_reference_params_carry_no_sampler_key_and_fast_ones_do():
    reference = video_params(config())
    assert "sampler" not in reference and "recipe" not in reference
    fast = video_params(config(recipe="fast"))
    assert fast["recipe"] == "fast" and fast["steps"] == 12
    assert fast["sampler"] == {"solver": "dpmpp-2m", "guidance_sigma_min": 1.0}


def test_a_video_versions_params_give_back_its_svd_settings_whatever_else_it_records():
    """The eval rebuilds the SVD from a version's params: preset, recipe, compile scope and dtype
    are recorded beside the SVDParams fields and must not reach SVDParams."""
    built = config(recipe="fast", preset="svam-calvin", compile="unet", dtype="fp16")
    settings, dtype = svd_settings(video_params(built))
    assert SVDParams.model_validate(settings) == built.params and dtype == "fp16"


def _version_id(result) -> str:
    """The id a command prints (the first ``<kind>-<12 hex>``: log lines may come first)."""
    assert result.exit_code == 0, result.output
    found = re.search(r"\b(plan|text|video)-[0-9a-f]{12}\b", result.output)
    assert found, result.output
    return found.group(0)


def test_generate_through_the_fast_recipe_writes_a_version_that_reads_back(tmp_path):
    root = str(tmp_path)
    store = make_dataset(root, name="fast", camera="cam", size=32)
    write_episode(store, "ep0", length=12, seed=0, camera="cam")
    cli, at = CliRunner(), ["--root", root]
    plan = _version_id(cli.invoke(app, ["plan", "--dataset", "fast", "--frames", "4", "--stride", "1", "--every",
                                        "6", "--limit", "2", *at]))
    text = _version_id(cli.invoke(app, ["text", "--plan", plan, "--model", "tiny", *at]))
    common = ["generate", "--plan", plan, "--text", text, "--model", "tiny", "--size", "32", "--batch", "2",
              "--device", "cpu", "--dtype", "fp32", *at]
    fast = _version_id(cli.invoke(app, [*common, "--recipe", "fast", "--steps", "3"]))
    reference = _version_id(cli.invoke(app, [*common, "--steps", "3"]))
    assert fast != reference and fast.startswith("video-")
    reader = TargetStore(root).open(fast)
    assert reader.manifest.recipe.params["sampler"] == {"solver": "dpmpp-2m", "guidance_sigma_min": 1.0}
    assert reader.manifest.recipe.params["recipe"] == "fast" and reader.manifest.recipe.params["steps"] == 3
    frames = reader.read("frames", slice(0, reader.manifest.num_clips))
    assert frames.shape == (2, 4, 32, 32, 3) and frames.dtype == np.uint8
    assert reader.read("onestep", slice(0, 2)).dtype == np.float16
    again = _version_id(cli.invoke(app, [*common, "--recipe", "fast", "--steps", "3"]))
    assert again == fast
