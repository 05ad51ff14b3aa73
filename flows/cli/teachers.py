"""``foresight teachers``: a frozen teacher (DINOv2, DA3, any HF vision backbone) over a video version."""

from __future__ import annotations

import json

import typer

from foresight.flows.cli.common import ROOT_OPTION, get_root
from foresight.flows.cli.options import config_command, config_option, given
from foresight.flows.cli.runner import runner_options
from foresight.flows.configs import TeachersConfig
from foresight.flows.runtime import RunnerChoice
from foresight.schemas.presets import check_preset


def register(app: typer.Typer) -> None:
    app.command("teachers")(runner_options(config_command(teachers)))


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
    video: str = config_option(TeachersConfig, "video"),
    teacher: str = config_option(TeachersConfig, "teacher"),
    model: str = config_option(TeachersConfig, "model"),
    preset: str = config_option(TeachersConfig, "preset", "--preset"),
    batch: int = config_option(TeachersConfig, "batch"),
    device: str = config_option(TeachersConfig, "device"),
    dtype: str = config_option(TeachersConfig, "dtype"),
    settings: str = config_option(TeachersConfig, "settings", extra_help="As JSON, e.g. '{\"stage\": 1}' (da3) or "
                                  "'{\"preprocess\": {\"height\": 448, \"width\": 448}}'."),
    io_processes: bool = config_option(TeachersConfig, "io_processes", "--io-processes/--io-threads"),
    readers: int = config_option(TeachersConfig, "readers"),
    writers: int = config_option(TeachersConfig, "writers"),
    compression: str = config_option(TeachersConfig, "compression"),
    store_codec: str = config_option(TeachersConfig, "store_codec"),
    cuda_graphs: bool = config_option(TeachersConfig, "cuda_graphs", "--cuda-graphs/--no-cuda-graphs"),
    compile_codec: bool = config_option(TeachersConfig, "compile_codec", "--compile-codec/--eager-codec"),
    root: str = ROOT_OPTION,
    runner: RunnerChoice = None,
) -> None:
    """Write a `teacher` version: target (N, T, h, w, C) and reference (N, 1, h, w, C), float16."""
    from foresight.flows.runtime import run_flow
    from foresight.flows.teachers import teachers_flow
    from foresight.flows.teachers_io import open_video
    from foresight.pipelines.teachers import parse_settings
    from foresight.schemas.model import ModelSpec

    if preset is not None:
        check_preset(preset)
    config = TeachersConfig(settings=_settings(settings), workers=runner.tasks, **given(
        video=video, teacher=teacher, model=model, batch=batch, device=device, dtype=dtype, io_processes=io_processes,
        readers=readers, writers=writers, compression=compression, preset=preset,
        store_codec=store_codec, cuda_graphs=cuda_graphs, compile_codec=compile_codec))
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
