"""``foresight plan``, ``foresight text`` and ``foresight generate``."""

from __future__ import annotations

import typer

from foresight.flows.cli.common import ROOT_OPTION, get_root
from foresight.flows.cli.options import config_command, config_option, given, int_list
from foresight.flows.cli.runner import runner_options
from foresight.flows.configs import GenerateConfig, PlanConfig, TextConfig
from foresight.flows.runtime import RunnerChoice
from foresight.schemas.svd import SamplerParams, SVDParams
from foresight.schemas.presets import check_preset

ONESTEP_CHOICES = ["extractor", "generation"]
"""--onestep: ``params.onestep`` as the release extractor's head call (the field's default) or None."""


def register(app: typer.Typer) -> None:
    app.command("plan")(config_command(plan))
    app.command("text")(runner_options(config_command(text)))
    app.command("generate")(runner_options(config_command(generate)))


def plan(
    dataset: str = config_option(PlanConfig, "dataset"),
    source: str = config_option(PlanConfig, "source"),
    frames: int = config_option(PlanConfig, "frames"),
    stride: int = config_option(PlanConfig, "stride"),
    camera: str = config_option(PlanConfig, "camera"),
    every: int = config_option(PlanConfig, "every"),
    limit: int = config_option(PlanConfig, "limit"),
    split: str = config_option(PlanConfig, "split"),
    root: str = ROOT_OPTION,
) -> None:
    """Write a content-addressed clip plan under plans/ and print its id."""
    from foresight.flows.generate import make_plan

    config = PlanConfig(**given(dataset=dataset, source=source, frames=frames, stride=stride, camera=camera,
                                every=every, limit=limit, split=split))
    data_root = get_root(root, writable=True)
    summary = make_plan(data_root.url, config)
    state = "written" if summary.created else "already present"
    typer.echo(f"{summary.plan_id} {state}: {summary.num_clips} clips "
               f"({summary.params['source']}, camera {summary.params['camera']}, {summary.params['frames']} frames "
               f"x stride {summary.params['stride']})")


def text(
    plan: str = config_option(TextConfig, "plan", "--plan"),
    model: str = config_option(TextConfig, "model"),
    max_length: int = config_option(TextConfig, "max_length"),
    preset: str = config_option(TextConfig, "preset", "--preset"),
    device: str = config_option(TextConfig, "device"),
    seed: int = config_option(TextConfig, "seed"),
    shard_size: int = config_option(TextConfig, "shard_size"),
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Write a `text` version: CLIP last_hidden_state (N, 20, D) of each clip's instruction."""
    from foresight.flows.generate import text_flow
    from foresight.flows.runtime import run_flow

    if preset is not None:
        check_preset(preset)
    config = TextConfig(**given(plan=plan, model=model, max_length=max_length, preset=preset, device=device,
                                seed=seed, shard_size=shard_size), workers=runner.tasks)
    data_root = get_root(root, writable=True)
    summary = run_flow(text_flow, runner, data_root, root_url=data_root.url, config=config)
    _report(summary)


def generate(
    plan: str = config_option(GenerateConfig, "plan", "--plan"),
    text: str = config_option(GenerateConfig, "text", "--text"),
    model: str = config_option(GenerateConfig, "model"),
    steps: int = config_option(SVDParams, "steps"),
    size: int = config_option(SVDParams, "size"),
    batch: int = config_option(GenerateConfig, "batch"),
    compile_scope: str = config_option(GenerateConfig, "compile", "--compile"),
    attention: str = config_option(GenerateConfig, "attention", "--attention"),
    cross_context: str = config_option(GenerateConfig, "cross_context", "--cross-context"),
    device: str = config_option(GenerateConfig, "device"),
    dtype: str = config_option(GenerateConfig, "dtype"),
    compression: str = config_option(GenerateConfig, "compression"),
    min_guidance: float = config_option(SVDParams, "min_guidance"),
    max_guidance: float = config_option(SVDParams, "max_guidance"),
    fps: int = config_option(SVDParams, "fps"),
    fps_id: str = config_option(SVDParams, "fps_id"),
    motion_bucket: int = config_option(SVDParams, "motion_bucket_id", "--motion-bucket"),
    noise_aug: float = config_option(SVDParams, "noise_aug_strength", "--noise-aug"),
    text_position_encoding: bool = config_option(SVDParams, "text_position_encoding",
                                                 "--text-position-encoding/--no-text-position-encoding"),
    feature_blocks: str = config_option(SVDParams, "feature_blocks", extra_help="Comma-separated."),
    onestep: str = config_option(SVDParams, "onestep", "--onestep", choices=ONESTEP_CHOICES,
                                 show_default=ONESTEP_CHOICES[0],
                                 extra_help="extractor: that default; generation: None."),
    preset: str = config_option(GenerateConfig, "preset", "--preset"),
    recipe: str = config_option(GenerateConfig, "recipe", "--recipe"),
    solver: str = config_option(SamplerParams, "solver", "--solver"),
    guidance_sigma_min: float = config_option(SamplerParams, "guidance_sigma_min", "--guidance-sigma-min"),
    seed: int = config_option(GenerateConfig, "seed"),
    shard_size: int = config_option(GenerateConfig, "shard_size"),
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Write a `video` version: frames (N, T, S, S, 3) uint8, onestep (N, T, h, w, C) float16, seed (N,).
    T is the plan's clip length."""
    from foresight.flows.generate import generate_flow
    from foresight.flows.runtime import run_flow

    data_root = get_root(root, writable=True)
    if preset is not None:
        check_preset(preset)
    params = SVDParams(**given(
        size=size, steps=steps, fps=fps, fps_id=fps_id, motion_bucket_id=motion_bucket, noise_aug_strength=noise_aug,
        min_guidance=min_guidance, max_guidance=max_guidance, text_position_encoding=text_position_encoding,
        feature_blocks=int_list(feature_blocks, "--feature-blocks")))
    if onestep == "generation":
        params.onestep = None
    if solver is not None or guidance_sigma_min is not None:
        params.sampler = SamplerParams(**given(solver=solver, guidance_sigma_min=guidance_sigma_min))
    config = GenerateConfig(plan=plan, text=text, model=model, params=params, workers=runner.tasks, **given(
        seed=seed, dtype=dtype, device=device, batch=batch, compile=compile_scope, attention=attention,
        cross_context=cross_context, shard_size=shard_size, compression=compression, preset=preset, recipe=recipe))
    summary = run_flow(generate_flow, runner, data_root, root_url=data_root.url, config=config)
    _report(summary)


def _report(summary) -> None:
    if summary.skipped:
        typer.echo(f"{summary.version} already complete (nothing to do)")
        return
    typer.echo(f"{summary.version} {summary.status}: {summary.clips} clips in {summary.shards_written} shards, "
               f"{summary.seconds:.1f}s ({summary.clips_per_hour:.0f} clips/hour)")
