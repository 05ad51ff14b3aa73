"""``foresight teachers``: a frozen teacher (DINOv2, DA3, any HF vision backbone) over a video version."""

from __future__ import annotations

import json

import typer

from flows.cli.common import ROOT_OPTION, get_root
from flows.cli.runner import runner_options
from flows.runtime import RunnerChoice
from schemas.presets import check_preset


def register(app: typer.Typer) -> None:
    app.command("teachers")(runner_options(teachers))


def _settings(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--settings: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, dict):
        raise ValueError("--settings: expected a JSON object, e.g. '{\"stage\": 1}'")
    return value


def teachers(
    video: str = typer.Option(..., help="Id of a complete `video` target version."),
    teacher: str = typer.Option(..., help="Teacher: dinov2 | da3 | hf."),
    model: str = typer.Option(None, help="Weights: hf:<repo>[@rev] | dir:<path> | random | tiny (required unless "
                                         "--preset names the teacher's)."),
    preset: str = typer.Option(None, "--preset", help="Release recipe: svam-calvin | svam-metaworld (the teacher's "
                                                      "weights and settings; --settings given here win)."),
    batch: int = typer.Option(4, help="Clips per forward pass (each clip is T frames)."),
    device: str = typer.Option("cpu", help="Torch device: cpu, cuda, cuda:1 ..."),
    dtype: str = typer.Option("fp32", help="Compute dtype: fp32 | bf16 | fp16 (outputs are stored as float16)."),
    settings: str = typer.Option(None, help="Teacher settings as JSON, e.g. '{\"stage\": 1}' (da3) or "
                                            "'{\"preprocess\": {\"height\": 448, \"width\": 448}}'."),
    io_processes: bool = typer.Option(None, "--io-processes/--io-threads",
                                      help="Store I/O in worker processes (default: on with CUDA)."),
    readers: int = typer.Option(None, help="Reader threads/processes (default: from the cores)."),
    writers: int = typer.Option(None, help="Writer threads/processes (default: from the cores)."),
    compression: str = typer.Option("zstd", help="Stored chunk codec: zstd | none (none: faster writes, "
                                                 "about 1.1-1.2x the disk space for float16 tokens)."),
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Write a `teacher` version: target (N, T, h, w, C) and reference (N, 1, h, w, C), float16."""
    from flows.runtime import run_flow
    from flows.teachers import TeachersConfig, teachers_flow
    from flows.teachers_io import open_video
    from pipelines.teachers import parse_settings
    from schemas.model import ModelSpec

    if preset is not None:
        check_preset(preset)
    config = TeachersConfig(video=video, teacher=teacher, model=model, settings=_settings(settings), batch=batch,
                            device=device, dtype=dtype, io_processes=io_processes, readers=readers, writers=writers,
                            compression=compression, workers=runner.tasks, preset=preset)
    data_root = get_root(root, writable=True)
    # Input mistakes fail here, in one line, before any model is loaded or flow started.
    parse_settings(config.teacher, config.settings)
    ModelSpec.parse(config.model)
    open_video(data_root.url, config.video)
    summary = run_flow(teachers_flow, runner, data_root, root_url=data_root.url, config=config)
    if summary.skipped:
        typer.echo(f"{summary.version} already complete (nothing to do)")
        return
    typer.echo(f"{summary.version} {summary.status}: {summary.clips} clips, {summary.frames} frames, "
               f"{summary.shards_written} shards in {summary.seconds:.1f}s ({summary.frames_per_s:.1f} frames/s)")
