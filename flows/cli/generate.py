"""``foresight plan``, ``foresight text`` and ``foresight generate``."""

from __future__ import annotations

import typer

from flows.cli.common import ROOT_OPTION, get_root
from flows.cli.runner import runner_options
from flows.runtime import RunnerChoice
from schemas.presets import check_preset


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
    app.command("text")(runner_options(text))
    app.command("generate")(runner_options(generate))


def plan(
    dataset: str = typer.Option(..., help="Dataset name in the episode store."),
    source: str = typer.Option(None, help="segments | episodes (default: segments when the dataset has any)."),
    frames: int = typer.Option(16, help="Frames per clip."),
    stride: int = typer.Option(2, help="Frames between clip frames."),
    camera: str = typer.Option(None, help="Camera (default: the dataset's first camera)."),
    every: int = typer.Option(8, help="Frames between clip starts."),
    limit: int = typer.Option(None, help="At most N clips, spread evenly over the dataset."),
    split: str = typer.Option(None, help="Only episodes of this split (train, validation, ...)."),
    root: str = ROOT_OPTION,
) -> None:
    """Write a content-addressed clip plan under plans/ and print its id."""
    from flows.generate import PlanConfig, make_plan

    config = PlanConfig(dataset=dataset, source=source, frames=frames, stride=stride, camera=camera, every=every,
                        limit=limit, split=split)
    data_root = get_root(root, writable=True)
    summary = make_plan(data_root.url, config)
    state = "written" if summary.created else "already present"
    typer.echo(f"{summary.plan_id} {state}: {summary.num_clips} clips "
               f"({summary.params['source']}, camera {summary.params['camera']}, {summary.params['frames']} frames "
               f"x stride {summary.params['stride']})")


PRESET_OPTION = typer.Option(None, "--preset", help="Release recipe: svam-calvin | svam-metaworld | vpp (its "
                                                     "settings are the defaults; options given here win).")


def text(
    plan: str = typer.Option(..., "--plan", help="Plan id."),
    model: str = typer.Option(None, help="CLIP text model: hf:<repo>[@rev] | dir:<path> | random | tiny "
                                         "(required unless --preset names one)."),
    max_length: int = typer.Option(None, help="Tokens per instruction (default 20)."),
    preset: str = PRESET_OPTION,
    device: str = typer.Option("cpu", help="Torch device."),
    seed: int = typer.Option(0, help="Initialisation seed of random/tiny models."),
    shard_size: int = typer.Option(256, help="Clips per shard."),
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Write a `text` version: CLIP last_hidden_state (N, 20, D) of each clip's instruction."""
    from flows.generate import TextConfig, text_flow
    from flows.runtime import run_flow

    if preset is not None:
        check_preset(preset)
    config = TextConfig(**_given(plan=plan, model=model, max_length=max_length, preset=preset, device=device,
                                 seed=seed, shard_size=shard_size, workers=runner.tasks))
    data_root = get_root(root, writable=True)
    summary = run_flow(text_flow, runner, data_root, root_url=data_root.url, config=config)
    _report(summary)


def generate(
    plan: str = typer.Option(..., "--plan", help="Plan id."),
    text: str = typer.Option(..., "--text", help="Id of the plan's complete `text` version."),
    model: str = typer.Option(..., help="SVD model: hf:<repo>[@rev] | dir:<path> | random | tiny."),
    steps: int = typer.Option(None, help="Euler denoising steps (default 30)."),
    size: int = typer.Option(None, help="Generated frame size, square (default 256)."),
    batch: int = typer.Option(4, help="Clips per UNet call (H100: 32 with --compile unet)."),
    compile_scope: str = typer.Option("none", "--compile",
                                      help="none | blocks | unet: torch.compile the UNet and decoder per layer "
                                           "or as whole graphs (GPU)."),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)."),
    dtype: str = typer.Option(None, help="fp16 | bf16 | fp32 | fp8 (default: fp16 on cuda, fp32 on cpu); fp8 "
                                         "runs the transformer Linear layers in e4m3 (keyed: a new version)."),
    compression: str = typer.Option("zstd", help="Stored one-step feature codec: zstd | none (none: ~1.1x the "
                                                 "bytes, random access at page-cache speed)."),
    min_guidance: float = typer.Option(None, help="Guidance scale of the first frame (default 1.0)."),
    max_guidance: float = typer.Option(None, help="Guidance scale of the last frame (default 3.0)."),
    fps: int = typer.Option(None, help="Frame-rate conditioning (default 4)."),
    fps_id: str = typer.Option(None, help="How fps enters the generation's time ids: fps-1 (default, diffusers' "
                                          "SVD pipeline) | fps (as is)."),
    motion_bucket: int = typer.Option(None, help="Motion bucket conditioning (default 127)."),
    noise_aug: float = typer.Option(None, help="Noise augmentation of the observed frame (default 0.02)."),
    text_position_encoding: bool = typer.Option(None, "--text-position-encoding/--no-text-position-encoding",
                                                help="Add sine/cosine positions to the text states (default on)."),
    feature_blocks: str = typer.Option(None, help="UNet up_blocks whose first-step outputs are stored "
                                                  "(default 0,1)."),
    onestep: str = typer.Option(None, "--onestep", help="One-step features from: extractor (default: their own "
                                                        "head call with the release extractor's conditioning, "
                                                        "fps as is, no noise augmentation, 20-step schedule) | "
                                                        "generation (the generation's first conditional call)."),
    preset: str = PRESET_OPTION,
    seed: int = typer.Option(0, help="Initialisation seed of random/tiny models."),
    shard_size: int = typer.Option(16, help="Clips per shard (one task writes a whole shard)."),
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Write a `video` version: frames (N, T, S, S, 3) uint8, onestep (N, T, h, w, C) float16, seed (N,).
    T is the plan's clip length."""
    import torch

    from flows.generate import GenerateConfig, generate_flow
    from flows.runtime import run_flow
    from pipelines.svd import SVDParams

    data_root = get_root(root, writable=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("fp16" if device.startswith("cuda") else "fp32")
    if preset is not None:
        check_preset(preset)
    if onestep not in (None, "extractor", "generation"):
        raise ValueError(f"--onestep {onestep!r}: expected extractor or generation")
    params = SVDParams(**_given(
        size=size, steps=steps, fps=fps, fps_id=fps_id, motion_bucket_id=motion_bucket, noise_aug_strength=noise_aug,
        min_guidance=min_guidance, max_guidance=max_guidance, text_position_encoding=text_position_encoding,
        feature_blocks=None if feature_blocks is None else _ints(feature_blocks, "--feature-blocks")))
    if onestep == "generation":
        params.onestep = None
    config = GenerateConfig(plan=plan, text=text, model=model, seed=seed, params=params, dtype=dtype, device=device,
                            batch=batch, compile=compile_scope, shard_size=shard_size, workers=runner.tasks,
                            compression=compression, preset=preset)
    summary = run_flow(generate_flow, runner, data_root, root_url=data_root.url, config=config)
    _report(summary)


def _given(**values):
    """The options the user gave (typer's None = not given), so a preset fills in the others."""
    return {key: value for key, value in values.items() if value is not None}


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated integers, got {text!r}") from None


def _report(summary) -> None:
    if summary.skipped:
        typer.echo(f"{summary.version} already complete (nothing to do)")
        return
    typer.echo(f"{summary.version} {summary.status}: {summary.clips} clips in {summary.shards_written} shards, "
               f"{summary.seconds:.1f}s ({summary.clips_per_hour:.0f} clips/hour)")
