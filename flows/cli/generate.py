"""``foresight plan``, ``foresight text`` and ``foresight generate``."""

from __future__ import annotations

import typer

from flows.cli.common import ROOT_OPTION, get_root
from flows.cli.runner import runner_options
from flows.runtime import RunnerChoice


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


def text(
    plan: str = typer.Option(..., "--plan", help="Plan id."),
    model: str = typer.Option(..., help="CLIP text model: hf:<repo>[@rev] | dir:<path> | random | tiny."),
    device: str = typer.Option("cpu", help="Torch device."),
    seed: int = typer.Option(0, help="Initialisation seed of random/tiny models."),
    shard_size: int = typer.Option(256, help="Clips per shard."),
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Write a `text` version: CLIP last_hidden_state (N, 20, D) of each clip's instruction."""
    from flows.generate import TextConfig, text_flow
    from flows.runtime import run_flow

    config = TextConfig(plan=plan, model=model, device=device, seed=seed, shard_size=shard_size,
                        workers=runner.tasks)
    data_root = get_root(root, writable=True)
    summary = run_flow(text_flow, runner, data_root, root_url=data_root.url, config=config)
    _report(summary)


def generate(
    plan: str = typer.Option(..., "--plan", help="Plan id."),
    text: str = typer.Option(..., "--text", help="Id of the plan's complete `text` version."),
    model: str = typer.Option(..., help="SVD model: hf:<repo>[@rev] | dir:<path> | random | tiny."),
    steps: int = typer.Option(30, help="Euler denoising steps."),
    size: int = typer.Option(256, help="Generated frame size (square)."),
    batch: int = typer.Option(4, help="Clips per UNet call (H100: 32 with --compile unet)."),
    compile_scope: str = typer.Option("none", "--compile",
                                      help="none | blocks | unet: torch.compile the UNet and decoder per layer "
                                           "or as whole graphs (GPU)."),
    device: str = typer.Option(None, help="cuda | cpu (default: cuda when available)."),
    dtype: str = typer.Option(None, help="fp16 | bf16 | fp32 | fp8 (default: fp16 on cuda, fp32 on cpu); fp8 "
                                         "runs the transformer Linear layers in e4m3 (keyed: a new version)."),
    compression: str = typer.Option("zstd", help="Stored one-step feature codec: zstd | none (none: ~1.1x the "
                                                 "bytes, random access at page-cache speed)."),
    min_guidance: float = typer.Option(1.0, help="Guidance scale of the first frame."),
    max_guidance: float = typer.Option(3.0, help="Guidance scale of the last frame."),
    fps: int = typer.Option(4, help="Frame-rate conditioning."),
    motion_bucket: int = typer.Option(127, help="Motion bucket conditioning."),
    noise_aug: float = typer.Option(0.02, help="Noise augmentation of the observed frame."),
    feature_blocks: str = typer.Option("0,1", help="UNet up_blocks whose first-step outputs are stored."),
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
    params = SVDParams(size=size, steps=steps, fps=fps, motion_bucket_id=motion_bucket,
                       noise_aug_strength=noise_aug, min_guidance=min_guidance, max_guidance=max_guidance,
                       feature_blocks=_ints(feature_blocks, "--feature-blocks"))
    config = GenerateConfig(plan=plan, text=text, model=model, seed=seed, params=params, dtype=dtype, device=device,
                            batch=batch, compile=compile_scope, shard_size=shard_size, workers=runner.tasks,
                            compression=compression)
    summary = run_flow(generate_flow, runner, data_root, root_url=data_root.url, config=config)
    _report(summary)


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
